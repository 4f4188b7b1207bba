//! Provider webhooks, parsed into one vocabulary of [`Action`]s.
//!
//! Each provider module checks nothing but the shape of a body whose signature the HTTP
//! handler has already verified (`super::signatures`), and says what the event means for an
//! order. [`super::service::Payments::handle_event`] does the rest the same way for all.

pub mod lemonsqueezy;
pub mod polar;
pub mod stripe;

use serde_json::Value;

use super::orders::{OrderStatus, PaymentFacts};
use super::store::OrderLookup;

/// Who bought what, for a paid event that Tollgate did not start: read from the provider's
/// metadata (`account_id`, `package_id`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Claim {
    pub account_id: Option<String>,
    pub package_id: Option<String>,
}

impl Claim {
    /// It names who buys what: a paid event with this claim creates its order on arrival.
    pub fn names_a_purchase(&self) -> bool {
        self.account_id.is_some() && self.package_id.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Money arrived.
    Paid {
        lookup: OrderLookup,
        claim: Claim,
        facts: PaymentFacts,
    },
    /// The checkout finished but the money has not arrived yet (a delayed payment method).
    AwaitingPayment {
        lookup: OrderLookup,
        provider_order_id: String,
        payment_ref: Option<String>,
    },
    /// The payment failed or the checkout expired.
    Closed {
        lookup: OrderLookup,
        status: OrderStatus,
    },
    /// `refunded_total` of the payment has been refunded so far (cumulative).
    Refunded {
        lookup: OrderLookup,
        refunded_total: i64,
        currency: String,
    },
    /// A refund the provider could not complete (failed, or canceled before it went out). The
    /// refunded total that took credits back arrives separately (Stripe's `charge.refunded`).
    RefundFailed {
        lookup: OrderLookup,
        refund_id: String,
        amount: i64,
        currency: String,
        /// The provider's failure reason, or the status when it gives none.
        reason: String,
    },
    DisputeOpened {
        lookup: OrderLookup,
        dispute_id: String,
        amount: i64,
        currency: String,
    },
    DisputeClosed {
        lookup: OrderLookup,
        dispute_id: String,
        won: bool,
    },
    /// Nothing to do (an event type Tollgate does not act on).
    Ignore(String),
}

/// A verified, parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedEvent {
    /// Unique per provider: the key that makes a replay change nothing.
    pub event_id: String,
    pub event_type: String,
    pub action: Action,
}

/// A body that is signed but not an event of the shape expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed webhook body: {0}")]
pub struct Malformed(pub String);

pub(crate) fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path)?.as_str()
}

pub(crate) fn int_at(value: &Value, path: &[&str]) -> Option<i64> {
    at(value, path)?.as_i64()
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key))
}

pub(crate) fn required_str(value: &Value, path: &[&str]) -> Result<String, Malformed> {
    str_at(value, path)
        .map(str::to_owned)
        .ok_or_else(|| Malformed(format!("`{}` is missing or not a string", path.join("."))))
}

pub(crate) fn required_int(value: &Value, path: &[&str]) -> Result<i64, Malformed> {
    int_at(value, path)
        .ok_or_else(|| Malformed(format!("`{}` is missing or not an integer", path.join("."))))
}

/// A metadata string, treating `""` as absent.
pub(crate) fn metadata(value: &Value, path: &[&str], key: &str) -> Option<String> {
    at(value, path)?
        .get(key)?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

pub(crate) fn parse_json(body: &[u8]) -> Result<Value, Malformed> {
    serde_json::from_slice(body).map_err(|e| Malformed(format!("not JSON: {e}")))
}
