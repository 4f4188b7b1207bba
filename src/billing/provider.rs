//! What every payment provider's API client takes and returns.

/// A hosted checkout to create for one pending order.
#[derive(Debug, Clone)]
pub struct CheckoutRequest {
    pub order_id: String,
    pub account_id: String,
    pub package_id: String,
    /// Shown to the buyer on the provider's page (the package name).
    pub product_name: String,
    /// ISO 4217, upper case (`USD`).
    pub currency: String,
    /// The amount to charge in the currency's minor unit (cents for USD).
    pub amount_minor: i64,
    pub success_url: String,
    pub cancel_url: String,
}

/// The provider's checkout, created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutCreated {
    /// The provider's id for the checkout (a Stripe Checkout Session id, a Lemon Squeezy
    /// checkout id).
    pub checkout_id: String,
    /// Where to send the buyer.
    pub url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider could not be reached or answered 5xx/429: worth retrying later.
    #[error("payment provider unavailable: {0}")]
    Unavailable(String),
    /// The provider refused the request (4xx): retrying the same request will not help.
    #[error("payment provider rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    /// Tollgate's own configuration is unusable (bad URL, bad key format).
    #[error("payment provider misconfigured: {0}")]
    Config(String),
}

/// A checkout request for provider client tests.
#[cfg(test)]
pub(crate) fn sample_request() -> CheckoutRequest {
    CheckoutRequest {
        order_id: "ord_1".into(),
        account_id: "acct_1".into(),
        package_id: "pkg_small".into(),
        product_name: "Small pack".into(),
        currency: "USD".into(),
        amount_minor: 1234,
        success_url: "https://app.test/ok".into(),
        cancel_url: "https://app.test/cancel".into(),
    }
}
