//! Orders and what payment events do to them.
//!
//! An order is one attempt to buy one package. Its life: `pending` → `paid` → `refunded` /
//! `partially_refunded` / `disputed` → (`paid` again if the dispute is won) / `charged_back`;
//! or `pending` → `failed` / `expired`; or `review` when a payment did not match the order
//! (wrong amount or currency) and an admin must look.
//!
//! Every function here is pure: it takes the order as read under the store's row lock and
//! returns the [`Transition`] to write — the new order row, the credit moves it causes and the
//! invoice it issues — all in one transaction. The moves are then applied to the ledger under
//! their references, which the ledger treats as idempotency keys (docs/architecture.md I2).
//!
//! Claw-backs are cumulative and pro rata: a refund of `r` of a paid `p` takes back
//! `⌊credits × r / p⌋` in total, minus what earlier refunds took, so partial refunds never
//! round past the full refund, and a replayed or older refund total takes nothing.

#[cfg(test)]
mod tests;
mod transitions;

use serde::{Deserialize, Serialize};

use super::invoice::Invoice;
use crate::domain::{AccountId, Credits};
use crate::ledger::{EntryType, GrantRequest};

pub use transitions::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Stripe,
    LemonSqueezy,
    Polar,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Stripe => "stripe",
            Provider::LemonSqueezy => "lemonsqueezy",
            Provider::Polar => "polar",
        }
    }

    pub fn parse(raw: &str) -> Option<Provider> {
        Some(match raw {
            "stripe" => Provider::Stripe,
            "lemonsqueezy" => Provider::LemonSqueezy,
            "polar" => Provider::Polar,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Paid,
    PartiallyRefunded,
    Refunded,
    Disputed,
    ChargedBack,
    Failed,
    Expired,
    Review,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Paid => "paid",
            OrderStatus::PartiallyRefunded => "partially_refunded",
            OrderStatus::Refunded => "refunded",
            OrderStatus::Disputed => "disputed",
            OrderStatus::ChargedBack => "charged_back",
            OrderStatus::Failed => "failed",
            OrderStatus::Expired => "expired",
            OrderStatus::Review => "review",
        }
    }

    pub fn parse(raw: &str) -> Option<OrderStatus> {
        Some(match raw {
            "pending" => OrderStatus::Pending,
            "paid" => OrderStatus::Paid,
            "partially_refunded" => OrderStatus::PartiallyRefunded,
            "refunded" => OrderStatus::Refunded,
            "disputed" => OrderStatus::Disputed,
            "charged_back" => OrderStatus::ChargedBack,
            "failed" => OrderStatus::Failed,
            "expired" => OrderStatus::Expired,
            "review" => OrderStatus::Review,
            _ => return None,
        })
    }

    /// Money was received for the order (whatever happened to it since).
    pub fn was_paid(self) -> bool {
        matches!(
            self,
            OrderStatus::Paid
                | OrderStatus::PartiallyRefunded
                | OrderStatus::Refunded
                | OrderStatus::Disputed
                | OrderStatus::ChargedBack
        )
    }
}

/// One row of `orders`. Money is in the currency's minor unit, credits in micro-credits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: String,
    pub account: AccountId,
    pub package_id: String,
    /// The package's name when ordered (printed on the invoice).
    pub description: String,
    pub provider: Provider,
    pub status: OrderStatus,
    pub checkout_id: Option<String>,
    pub checkout_url: Option<String>,
    /// The provider's id of the payment (Stripe Checkout Session, Lemon Squeezy or Polar
    /// order): unique per provider, so a payment credits one order once.
    pub provider_order_id: Option<String>,
    /// What refunds and disputes name (Stripe's PaymentIntent).
    pub payment_ref: Option<String>,
    pub credits: Credits,
    /// Extra credits from a coupon.
    pub bonus_credits: Credits,
    pub validity_days: Option<u32>,
    pub currency: String,
    /// The package price.
    pub list_amount: i64,
    pub discount_amount: i64,
    /// What the buyer must pay: `list_amount - discount_amount`.
    pub amount: i64,
    pub paid_amount: Option<i64>,
    /// The provider's cumulative refunded amount, as last applied.
    pub refunded_amount: i64,
    /// Credits taken back by refunds so far.
    pub credits_refunded: Credits,
    pub dispute_id: Option<String>,
    /// `open`, `won` or `lost`.
    pub dispute_status: Option<String>,
    /// Credits taken back by an open or lost dispute.
    pub dispute_credits: Credits,
    pub coupon_code: Option<String>,
    pub invoice_id: Option<String>,
    pub buyer_email: Option<String>,
    pub buyer_name: Option<String>,
    pub review_reason: Option<String>,
    /// When the credits bought expire (from the package's `validity_days` at payment).
    pub grant_expires_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub paid_at_ms: Option<i64>,
    pub refunded_at_ms: Option<i64>,
    /// When the order failed or expired.
    pub closed_at_ms: Option<i64>,
}

impl Order {
    /// Credits the order grants when paid: the package's and the coupon's bonus.
    pub fn total_credits(&self) -> Credits {
        Credits::from_micros(
            self.credits
                .micros()
                .saturating_add(self.bonus_credits.micros()),
        )
    }

    /// The natural key of the payment: `<provider>:<provider order id>`.
    fn payment_key(&self) -> String {
        format!(
            "{}:{}",
            self.provider.as_str(),
            self.provider_order_id.as_deref().unwrap_or(&self.id)
        )
    }

    /// The ledger entries, as `(type, reference)`, whose grants the order's payment created:
    /// its purchase and, with a bonus coupon, its bonus (see [`pay`]).
    pub fn granting_entries(&self) -> Vec<(EntryType, String)> {
        let key = self.payment_key();
        let bonus = bonus_reference(&key);
        vec![(EntryType::Purchase, key), (EntryType::Bonus, bonus)]
    }
}

/// The reference of the bonus credits a coupon added to the payment `payment_key`.
fn bonus_reference(payment_key: &str) -> String {
    format!("{payment_key}:bonus")
}

/// One credit change caused by an order; applied to the ledger as a grant under `reference`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditMove {
    pub reference: String,
    pub order_id: String,
    pub account: AccountId,
    pub entry_type: EntryType,
    pub amount: Credits,
    pub description: String,
    pub expires_at_ms: Option<i64>,
}

impl CreditMove {
    /// The ledger grant that applies this move; `order` is the move's order, if it exists.
    ///
    /// A move that takes credits (a refund or an opened dispute) takes back what the order's
    /// payment granted: it draws from the order's own grants first, and only what they no
    /// longer hold (spent, expired) comes from the account's other credits in the usual order.
    /// Drawn the usual way, refunding a never-expiring package would eat a newer package's
    /// soon-expiring credits and leave the refunded ones in place.
    pub fn grant_request(&self, order: Option<&Order>) -> GrantRequest {
        let draw_first_from = match order {
            Some(order) if self.amount.is_negative() => order.granting_entries(),
            _ => Vec::new(),
        };
        GrantRequest {
            account: self.account.clone(),
            entry_type: self.entry_type,
            amount: self.amount,
            description: self.description.clone(),
            reference: Some(self.reference.clone()),
            expires_at_ms: self.expires_at_ms,
            draw_first_from,
        }
    }
}

/// An invoice to issue; the store gives it its id and its number (gap-free per `year`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceDraft {
    pub year: i32,
    pub invoice: Invoice,
}

/// What one event does to one order, written atomically by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub order: Order,
    pub moves: Vec<CreditMove>,
    pub invoice: Option<InvoiceDraft>,
    /// Give the order's coupon use back (the order will never be paid).
    pub release_coupon: bool,
}

impl Transition {
    pub fn order_only(order: Order) -> Transition {
        Transition {
            order,
            moves: Vec::new(),
            invoice: None,
            release_coupon: false,
        }
    }
}

/// Why an event could not be applied to an order now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Deferred {
    /// It may apply later (a refund that arrived before the payment): the provider should
    /// deliver it again.
    #[error("not applicable yet: {0}")]
    Retry(String),
    /// It can never apply automatically: kept for an admin.
    #[error("needs review: {0}")]
    Review(String),
}

pub type Step = Result<Option<Transition>, Deferred>;

/// The payment as a provider reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentFacts {
    pub provider_order_id: String,
    pub payment_ref: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub buyer_email: Option<String>,
    pub buyer_name: Option<String>,
}
