//! Stripe API client: creates Checkout Sessions (payment mode, one inline-priced line item)
//! through async-stripe.
//!
//! Notes on async-stripe 1.0.0-rc.10 that shape this file:
//! - The client joins its base and the request path as `format!("{base}v1{path}")` (the base
//!   as an `http::Uri`), so a base must end in `/`; [`StripeApi::new`] checks and normalises it.
//! - `RequestStrategy::Idempotent` sends `Idempotency-Key` and makes exactly one attempt.
//! - An error answer whose body is not a Stripe error object comes back as
//!   `StripeError::JSONDeserialize` with the status lost; so does a 2xx body missing a field
//!   the `CheckoutSession` deserializer requires. Both are treated as "unavailable".

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use http::Uri;
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_checkout::CheckoutSessionMode;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionLineItemsPriceData,
    CreateCheckoutSessionPaymentIntentData, ProductData,
};

use super::provider::{CheckoutCreated, CheckoutRequest, ProviderError};

/// Stripe's API, used when no base is configured.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com/";

/// A Stripe API client for one secret key. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct StripeApi {
    client: Client,
    api_base: String,
    timeout: Duration,
}

impl fmt::Debug for StripeApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StripeApi")
            .field("api_base", &self.api_base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl StripeApi {
    /// `api_base` None = Stripe's. Accepts a base like `http://127.0.0.1:1234` (with or
    /// without a trailing `/`; a path prefix is kept). `timeout` bounds each API call.
    pub fn new(
        secret_key: &str,
        api_base: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ProviderError> {
        if secret_key.trim().is_empty() {
            return Err(ProviderError::Config(
                "the Stripe secret key is empty".into(),
            ));
        }
        let api_base = normalize_base(api_base.unwrap_or(DEFAULT_API_BASE), "Stripe")?;
        let client = ClientBuilder::new(secret_key)
            .url(api_base.clone())
            .timeout(timeout)
            .build()
            // The builder's errors name the bad setting, never the key itself.
            .map_err(|err| ProviderError::Config(format!("Stripe client: {err}")))?;
        Ok(StripeApi {
            client,
            api_base,
            timeout,
        })
    }

    /// Creates a Checkout Session in `payment` mode for one order.
    ///
    /// The idempotency key is derived from the order id, so creating again for the same order
    /// (a retry after a lost answer) returns the same session.
    pub async fn create_checkout(
        &self,
        request: &CheckoutRequest,
    ) -> Result<CheckoutCreated, ProviderError> {
        let key = IdempotencyKey::new(format!("tollgate-checkout-{}", request.order_id))
            .map_err(|err| ProviderError::Config(format!("Stripe idempotency key: {err}")))?;
        let session = build_session(request)
            .customize()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await
            .map_err(|err| map_error(err, self.timeout))?;
        let id = session.id.to_string();
        match session.url {
            Some(url) if !url.is_empty() => Ok(CheckoutCreated {
                checkout_id: id,
                url,
            }),
            _ => Err(ProviderError::Unavailable(format!(
                "Stripe created checkout session {id} without a url (is it a hosted-page session?)"
            ))),
        }
    }
}

/// The request for one order: one inline-priced line item, quantity 1, the order's ids in the
/// session's and the PaymentIntent's metadata.
fn build_session(request: &CheckoutRequest) -> CreateCheckoutSession {
    let currency = request.currency.to_ascii_lowercase();
    let price_data = CreateCheckoutSessionLineItemsPriceData {
        // `Currency::from_str` is infallible (unknown codes are kept as they are).
        currency: match currency.parse() {
            Ok(currency) => currency,
            Err(never) => match never {},
        },
        product: None,
        product_data: Some(ProductData::new(request.product_name.clone())),
        recurring: None,
        tax_behavior: None,
        unit_amount: Some(request.amount_minor),
        unit_amount_decimal: None,
    };
    let mut line_item = CreateCheckoutSessionLineItems::new();
    line_item.price_data = Some(price_data);
    line_item.quantity = Some(1);

    let metadata = HashMap::from([
        ("account_id".to_owned(), request.account_id.clone()),
        ("order_id".to_owned(), request.order_id.clone()),
        ("package_id".to_owned(), request.package_id.clone()),
    ]);
    let mut payment_intent_data = CreateCheckoutSessionPaymentIntentData::new();
    payment_intent_data.metadata = Some(metadata.clone());

    CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Payment)
        .line_items(vec![line_item])
        .success_url(request.success_url.clone())
        .cancel_url(request.cancel_url.clone())
        .client_reference_id(format!("{}:{}", request.order_id, request.account_id))
        .metadata(metadata)
        .payment_intent_data(payment_intent_data)
}

fn map_error(err: StripeError, timeout: Duration) -> ProviderError {
    match err {
        StripeError::Stripe(errors, status) => {
            let message = errors
                .message
                .clone()
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| errors.type_.as_str().to_owned());
            if status == 429 || status >= 500 || !(400..500).contains(&status) {
                ProviderError::Unavailable(format!("Stripe answered {status}: {message}"))
            } else {
                ProviderError::Rejected { status, message }
            }
        }
        StripeError::JSONDeserialize(msg) => {
            ProviderError::Unavailable(format!("unexpected answer from Stripe: {msg}"))
        }
        StripeError::ClientError(msg) => {
            ProviderError::Unavailable(format!("could not reach Stripe: {msg}"))
        }
        StripeError::Timeout => ProviderError::Unavailable(format!(
            "Stripe did not answer within {}s",
            timeout.as_secs()
        )),
        StripeError::ConfigError(msg) => ProviderError::Config(format!("Stripe client: {msg}")),
    }
}

/// An absolute http(s) base without query or fragment, ending in `/`.
pub(crate) fn normalize_base(base: &str, provider: &str) -> Result<String, ProviderError> {
    let bad = |why: &str| ProviderError::Config(format!("{provider} API base {base:?} {why}"));
    let uri: Uri = base.trim().parse().map_err(|_| bad("is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("must start with http:// or https://"));
    }
    match uri.host() {
        Some(host) if !host.is_empty() => {}
        _ => return Err(bad("has no host")),
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    let mut normalized = uri.to_string();
    if !normalized.ends_with('/') {
        normalized.push('/');
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> CheckoutRequest {
        crate::billing::provider::sample_request()
    }

    #[test]
    fn base_urls_are_checked_and_end_in_a_slash() {
        assert_eq!(
            normalize_base("http://127.0.0.1:1234", "Stripe").expect("valid"),
            "http://127.0.0.1:1234/"
        );
        assert_eq!(
            normalize_base("https://proxy.test/stripe", "Stripe").expect("valid"),
            "https://proxy.test/stripe/"
        );
        assert_eq!(
            normalize_base(DEFAULT_API_BASE, "Stripe").expect("valid"),
            DEFAULT_API_BASE
        );
        for bad in [
            "",
            "not a url",
            "ftp://x/",
            "/v1",
            "127.0.0.1:80",
            "http://h/?a=b",
        ] {
            assert!(
                matches!(normalize_base(bad, "Stripe"), Err(ProviderError::Config(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn new_rejects_bad_configuration_and_debug_hides_the_key() {
        assert!(matches!(
            StripeApi::new(
                "",
                None,
                crate::config::payments::DEFAULT_STRIPE_API_TIMEOUT
            ),
            Err(ProviderError::Config(_))
        ));
        assert!(matches!(
            StripeApi::new(
                "sk_test_x",
                Some("nope"),
                crate::config::payments::DEFAULT_STRIPE_API_TIMEOUT
            ),
            Err(ProviderError::Config(_))
        ));
        assert!(matches!(
            StripeApi::new(
                "sk_test_\nx",
                None,
                crate::config::payments::DEFAULT_STRIPE_API_TIMEOUT
            ),
            Err(ProviderError::Config(_))
        ));
        let api = StripeApi::new(
            "sk_test_secret_value",
            Some("http://127.0.0.1:9"),
            crate::config::payments::DEFAULT_STRIPE_API_TIMEOUT,
        )
        .expect("valid");
        let debug = format!("{api:?}");
        assert!(debug.contains("127.0.0.1:9"), "{debug}");
        assert!(!debug.contains("secret_value"), "{debug}");
    }

    #[test]
    fn the_form_carries_the_order() {
        let body = build_session(&order()).build().body.unwrap_or_default();
        let body = body.replace("%5B", "[").replace("%5D", "]");
        for expected in [
            "mode=payment",
            "line_items[0][price_data][currency]=usd",
            "line_items[0][price_data][unit_amount]=1234",
            "line_items[0][quantity]=1",
            "client_reference_id=ord_1:acct_1",
            "metadata[order_id]=ord_1",
            "payment_intent_data[metadata][package_id]=pkg_small",
        ] {
            assert!(body.contains(expected), "{expected} not in {body}");
        }
    }

    #[test]
    fn errors_map_by_status() {
        let api_error = |status: u16, message: &str| {
            let errors = stripe::ApiErrors {
                advice_code: None,
                charge: None,
                code: None,
                decline_code: None,
                doc_url: None,
                message: Some(message.to_owned()),
                network_advice_code: None,
                network_decline_code: None,
                param: None,
                payment_intent: None,
                payment_method: None,
                payment_method_type: None,
                request_log_url: None,
                setup_intent: None,
                source: None,
                type_: stripe::ApiErrorsType::InvalidRequestError,
            };
            StripeError::Stripe(Box::new(errors), status)
        };
        let map_error = |err| map_error(err, Duration::from_secs(3));
        assert!(matches!(
            map_error(api_error(500, "boom")),
            ProviderError::Unavailable(_)
        ));
        assert!(matches!(
            map_error(api_error(429, "slow down")),
            ProviderError::Unavailable(_)
        ));
        match map_error(api_error(400, "No such price")) {
            ProviderError::Rejected { status, message } => {
                assert_eq!(status, 400);
                assert_eq!(message, "No such price");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            map_error(StripeError::ClientError("refused".into())),
            ProviderError::Unavailable(_)
        ));
        // The configured timeout, not a fixed one, is what the message names.
        assert!(matches!(
            map_error(StripeError::Timeout),
            ProviderError::Unavailable(ref m) if m.contains("within 3s")
        ));
    }
}
