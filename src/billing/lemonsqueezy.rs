//! Lemon Squeezy API client: creates a custom-priced checkout for one order
//! (`POST /v1/checkouts`, JSON:API).

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Value, json};

use super::provider::{CheckoutCreated, CheckoutRequest, ProviderError};
use super::stripe::normalize_base;
use crate::net::{HttpsClient, https_client};

/// Lemon Squeezy's API, used when no base is configured.
pub const DEFAULT_API_BASE: &str = "https://api.lemonsqueezy.com/";

/// The most one create call may take, connect to last byte of the answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers larger than this are not read (a checkout is a few kilobytes).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

const JSON_API: &str = "application/vnd.api+json";

/// A Lemon Squeezy API client for one API key and store. Cheap to clone (the connection pool
/// is shared).
#[derive(Clone)]
pub struct LemonSqueezyApi {
    client: HttpsClient<Full<Bytes>>,
    checkouts_url: Uri,
    /// `Bearer <key>`, marked sensitive.
    authorization: HeaderValue,
    store_id: String,
}

impl fmt::Debug for LemonSqueezyApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LemonSqueezyApi")
            .field("checkouts_url", &self.checkouts_url)
            .field("store_id", &self.store_id)
            .finish_non_exhaustive()
    }
}

impl LemonSqueezyApi {
    /// `api_base` None = Lemon Squeezy's. Accepts a base like `http://127.0.0.1:1234`.
    pub fn new(
        api_key: &str,
        store_id: &str,
        api_base: Option<&str>,
    ) -> Result<Self, ProviderError> {
        if api_key.trim().is_empty() {
            return Err(ProviderError::Config(
                "the Lemon Squeezy API key is empty".into(),
            ));
        }
        if store_id.trim().is_empty() {
            return Err(ProviderError::Config(
                "the Lemon Squeezy store id is empty".into(),
            ));
        }
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {api_key}")).map_err(|_| {
                ProviderError::Config(
                    "the Lemon Squeezy API key can only hold visible ASCII characters".into(),
                )
            })?;
        authorization.set_sensitive(true);
        let base = normalize_base(api_base.unwrap_or(DEFAULT_API_BASE), "Lemon Squeezy")?;
        let checkouts_url: Uri = format!("{base}v1/checkouts").parse().map_err(|_| {
            ProviderError::Config(format!("Lemon Squeezy API base {base:?} is not a URL"))
        })?;

        let client = https_client(REQUEST_TIMEOUT, Duration::from_secs(60));
        Ok(LemonSqueezyApi {
            client,
            checkouts_url,
            authorization,
            store_id: store_id.to_owned(),
        })
    }

    /// POST {base}/v1/checkouts for the given variant, with `custom_price` = amount_minor,
    /// `checkout_data.custom` = {account_id, order_id, package_id} and
    /// `product_options.redirect_url` = success_url.
    pub async fn create_checkout(
        &self,
        request: &CheckoutRequest,
        variant_id: &str,
    ) -> Result<CheckoutCreated, ProviderError> {
        let body = checkout_body(request, &self.store_id, variant_id);
        let http_request = Request::builder()
            .method(Method::POST)
            .uri(self.checkouts_url.clone())
            .header(AUTHORIZATION, self.authorization.clone())
            .header(ACCEPT, JSON_API)
            .header(CONTENT_TYPE, JSON_API)
            .header(USER_AGENT, concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|err| ProviderError::Config(format!("Lemon Squeezy request: {err}")))?;

        let call = async {
            let response = self.client.request(http_request).await.map_err(|err| {
                ProviderError::Unavailable(format!("could not reach Lemon Squeezy: {err}"))
            })?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|err| {
                    ProviderError::Unavailable(format!(
                        "could not read Lemon Squeezy's answer ({status}): {err}"
                    ))
                })?
                .to_bytes();
            Ok::<_, ProviderError>((status, bytes))
        };
        let (status, bytes) =
            tokio::time::timeout(REQUEST_TIMEOUT, call)
                .await
                .map_err(|_| {
                    ProviderError::Unavailable(format!(
                        "Lemon Squeezy did not answer within {}s",
                        REQUEST_TIMEOUT.as_secs()
                    ))
                })??;
        interpret(status, &bytes)
    }
}

fn checkout_body(request: &CheckoutRequest, store_id: &str, variant_id: &str) -> Value {
    json!({
        "data": {
            "type": "checkouts",
            "attributes": {
                "custom_price": request.amount_minor,
                "product_options": { "redirect_url": request.success_url },
                "checkout_data": {
                    "custom": {
                        "account_id": request.account_id,
                        "order_id": request.order_id,
                        "package_id": request.package_id,
                    }
                }
            },
            "relationships": {
                "store": { "data": { "type": "stores", "id": store_id } },
                "variant": { "data": { "type": "variants", "id": variant_id } }
            }
        }
    })
}

fn interpret(status: StatusCode, bytes: &[u8]) -> Result<CheckoutCreated, ProviderError> {
    let json: Option<Value> = serde_json::from_slice(bytes).ok();
    if status.is_success() {
        let data = json.as_ref().and_then(|v| v.get("data"));
        let id = data.and_then(|d| match d.get("id") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        });
        let url = data
            .and_then(|d| d.pointer("/attributes/url"))
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty());
        return match (id, url) {
            (Some(checkout_id), Some(url)) => Ok(CheckoutCreated {
                checkout_id,
                url: url.to_owned(),
            }),
            (Some(id), None) => Err(ProviderError::Unavailable(format!(
                "Lemon Squeezy created checkout {id} without a url"
            ))),
            (None, _) => Err(ProviderError::Unavailable(format!(
                "unexpected answer from Lemon Squeezy ({status}): no data.id"
            ))),
        };
    }
    let message = json.as_ref().and_then(error_details).unwrap_or_else(|| {
        status
            .canonical_reason()
            .unwrap_or("no error detail")
            .to_owned()
    });
    let code = status.as_u16();
    if status == StatusCode::TOO_MANY_REQUESTS || !status.is_client_error() {
        Err(ProviderError::Unavailable(format!(
            "Lemon Squeezy answered {code}: {message}"
        )))
    } else {
        Err(ProviderError::Rejected {
            status: code,
            message,
        })
    }
}

/// `{"errors":[{"detail":..,"title":..}]}` → the details, joined.
fn error_details(json: &Value) -> Option<String> {
    let details: Vec<&str> = json
        .get("errors")?
        .as_array()?
        .iter()
        .filter_map(|e| {
            e.get("detail")
                .or_else(|| e.get("title"))
                .and_then(Value::as_str)
        })
        .filter(|d| !d.is_empty())
        .collect();
    if details.is_empty() {
        json.get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
    } else {
        Some(details.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> CheckoutRequest {
        crate::billing::provider::sample_request()
    }

    #[test]
    fn body_is_json_api() {
        let body = checkout_body(&order(), "42", "777");
        assert_eq!(body["data"]["type"], "checkouts");
        assert_eq!(body["data"]["attributes"]["custom_price"], 1234);
        assert_eq!(
            body["data"]["attributes"]["product_options"]["redirect_url"],
            "https://app.test/ok"
        );
        assert_eq!(
            body["data"]["attributes"]["checkout_data"]["custom"],
            json!({"account_id": "acct_1", "order_id": "ord_1", "package_id": "pkg_small"})
        );
        assert_eq!(
            body["data"]["relationships"]["store"]["data"],
            json!({"type": "stores", "id": "42"})
        );
        assert_eq!(
            body["data"]["relationships"]["variant"]["data"],
            json!({"type": "variants", "id": "777"})
        );
    }

    #[test]
    fn answers_map_to_results() {
        let ok = br#"{"data":{"type":"checkouts","id":"abc","attributes":{"url":"https://x.test/c/abc"}}}"#;
        assert_eq!(
            interpret(StatusCode::CREATED, ok).expect("valid"),
            CheckoutCreated {
                checkout_id: "abc".into(),
                url: "https://x.test/c/abc".into()
            }
        );
        assert!(matches!(
            interpret(
                StatusCode::CREATED,
                br#"{"data":{"id":"abc","attributes":{}}}"#
            ),
            Err(ProviderError::Unavailable(_))
        ));
        let err = br#"{"errors":[{"status":"422","title":"Unprocessable","detail":"The variant must belong to the store."}]}"#;
        match interpret(StatusCode::UNPROCESSABLE_ENTITY, err) {
            Err(ProviderError::Rejected { status, message }) => {
                assert_eq!(status, 422);
                assert_eq!(message, "The variant must belong to the store.");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            interpret(StatusCode::TOO_MANY_REQUESTS, b""),
            Err(ProviderError::Unavailable(_))
        ));
        assert!(matches!(
            interpret(StatusCode::BAD_GATEWAY, b"<html>"),
            Err(ProviderError::Unavailable(_))
        ));
    }

    #[test]
    fn new_checks_configuration_and_debug_hides_the_key() {
        assert!(matches!(
            LemonSqueezyApi::new("", "1", None),
            Err(ProviderError::Config(_))
        ));
        assert!(matches!(
            LemonSqueezyApi::new("k", "", None),
            Err(ProviderError::Config(_))
        ));
        assert!(matches!(
            LemonSqueezyApi::new("k", "1", Some("ftp://x")),
            Err(ProviderError::Config(_))
        ));
        let api = LemonSqueezyApi::new("ls_test_secret_value", "1", Some("http://127.0.0.1:9/"))
            .expect("valid");
        let debug = format!("{api:?}");
        assert!(debug.contains("http://127.0.0.1:9/v1/checkouts"), "{debug}");
        assert!(!debug.contains("secret_value"), "{debug}");
    }
}
