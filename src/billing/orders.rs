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
//! their references, which the ledger treats as idempotency keys (DESIGN.md I2).
//!
//! Claw-backs are cumulative and pro rata: a refund of `r` of a paid `p` takes back
//! `⌊credits × r / p⌋` in total, minus what earlier refunds took, so partial refunds never
//! round past the full refund, and a replayed or older refund total takes nothing.

use serde::{Deserialize, Serialize};

use super::invoice::{Invoice, InvoiceLine, Party};
use super::money::from_minor;
use crate::domain::{AccountId, Credits};
use crate::ledger::{EntryType, GrantRequest};

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
    pub fn grant_request(&self) -> GrantRequest {
        GrantRequest {
            account: self.account.clone(),
            entry_type: self.entry_type,
            amount: self.amount,
            description: self.description.clone(),
            reference: Some(self.reference.clone()),
            expires_at_ms: self.expires_at_ms,
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

/// Invoice settings from `[invoices]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvoiceSettings {
    pub seller: Party,
    /// Tax included in prices, in percent (`"19"`); `"0"` prints no tax.
    #[serde(with = "rust_decimal::serde::str")]
    pub tax_rate_percent: rust_decimal::Decimal,
    /// Printed under the totals of every invoice.
    pub notes: Vec<String>,
}

const DAY_MS: i64 = 86_400_000;

/// A payment arrived for `order`.
pub fn pay(order: &Order, facts: &PaymentFacts, settings: &InvoiceSettings, now_ms: i64) -> Step {
    if order.status.was_paid() {
        return if order.provider_order_id.as_deref() == Some(facts.provider_order_id.as_str()) {
            Ok(None)
        } else {
            Err(Deferred::Review(format!(
                "order {} was already paid by {}; this payment is {}",
                order.id,
                order.provider_order_id.as_deref().unwrap_or("?"),
                facts.provider_order_id
            )))
        };
    }
    if order.status == OrderStatus::Review {
        return Ok(None);
    }
    let mut next = order.clone();
    next.provider_order_id = Some(facts.provider_order_id.clone());
    next.payment_ref = facts.payment_ref.clone().or(next.payment_ref);
    next.buyer_email = facts.buyer_email.clone().or(next.buyer_email);
    next.buyer_name = facts.buyer_name.clone().or(next.buyer_name);
    next.paid_amount = Some(facts.amount);
    next.updated_at_ms = now_ms;
    if !facts.currency.eq_ignore_ascii_case(&order.currency) || facts.amount != order.amount {
        next.status = OrderStatus::Review;
        next.review_reason = Some(format!(
            "paid {} {} but the order is for {} {}",
            from_minor(facts.amount, &facts.currency),
            facts.currency.to_ascii_uppercase(),
            from_minor(order.amount, &order.currency),
            order.currency
        ));
        return Ok(Some(Transition::order_only(next)));
    }
    next.status = OrderStatus::Paid;
    next.paid_at_ms = Some(now_ms);
    next.closed_at_ms = None;
    next.grant_expires_at_ms = order
        .validity_days
        .map(|days| now_ms.saturating_add(i64::from(days).saturating_mul(DAY_MS)));
    let key = next.payment_key();
    let mut moves = vec![CreditMove {
        reference: key.clone(),
        order_id: order.id.clone(),
        account: order.account.clone(),
        entry_type: EntryType::Purchase,
        amount: order.credits,
        description: format!("{} (order {})", order.description, order.id),
        expires_at_ms: next.grant_expires_at_ms,
    }];
    if order.bonus_credits.is_positive() {
        moves.push(CreditMove {
            reference: format!("{key}:bonus"),
            order_id: order.id.clone(),
            account: order.account.clone(),
            entry_type: EntryType::Bonus,
            amount: order.bonus_credits,
            description: format!(
                "Coupon {} bonus (order {})",
                order.coupon_code.as_deref().unwrap_or(""),
                order.id
            ),
            expires_at_ms: next.grant_expires_at_ms,
        });
    }
    let invoice = invoice_draft(&next, settings, now_ms);
    Ok(Some(Transition {
        order: next,
        moves,
        invoice: Some(invoice),
        release_coupon: false,
    }))
}

/// The provider reports that `refunded_total` (cumulative) of the payment was refunded.
pub fn refund(order: &Order, refunded_total: i64, currency: &str, now_ms: i64) -> Step {
    let paid = paid_amount(order)?;
    if !currency.eq_ignore_ascii_case(&order.currency) {
        return Err(Deferred::Review(format!(
            "refund in {currency} for an order paid in {}",
            order.currency
        )));
    }
    let total = refunded_total.clamp(0, paid);
    if total <= order.refunded_amount {
        return Ok(None);
    }
    let target = pro_rata(order.total_credits(), total, paid);
    let unclawed = order
        .total_credits()
        .micros()
        .saturating_sub(order.credits_refunded.micros())
        .saturating_sub(order.dispute_credits.micros());
    let take = target
        .micros()
        .saturating_sub(order.credits_refunded.micros())
        .clamp(0, unclawed.max(0));
    let mut next = order.clone();
    next.refunded_amount = total;
    next.credits_refunded = Credits::from_micros(order.credits_refunded.micros() + take);
    next.refunded_at_ms = Some(now_ms);
    next.updated_at_ms = now_ms;
    if !matches!(
        order.status,
        OrderStatus::Disputed | OrderStatus::ChargedBack
    ) {
        next.status = refund_status(total, paid);
    }
    let moves = if take > 0 {
        vec![CreditMove {
            reference: format!(
                "{}:refund:{}",
                order.payment_key(),
                from_minor(total, &order.currency)
            ),
            order_id: order.id.clone(),
            account: order.account.clone(),
            entry_type: EntryType::Refund,
            amount: Credits::from_micros(-take),
            description: format!(
                "Refund of {} {} (order {})",
                from_minor(total - order.refunded_amount, &order.currency),
                order.currency,
                order.id
            ),
            expires_at_ms: None,
        }]
    } else {
        Vec::new()
    };
    Ok(Some(Transition {
        order: next,
        moves,
        invoice: None,
        release_coupon: false,
    }))
}

/// The buyer disputed `amount` of the payment: its credits are taken back while it is open.
pub fn dispute_opened(
    order: &Order,
    dispute_id: &str,
    amount: i64,
    currency: &str,
    now_ms: i64,
) -> Step {
    let paid = paid_amount(order)?;
    if order.dispute_id.as_deref() == Some(dispute_id) {
        return Ok(None);
    }
    if order.dispute_id.is_some() {
        return Err(Deferred::Review(format!(
            "order {} already has dispute {}",
            order.id,
            order.dispute_id.as_deref().unwrap_or("?")
        )));
    }
    if !currency.eq_ignore_ascii_case(&order.currency) {
        return Err(Deferred::Review(format!(
            "dispute in {currency} for an order paid in {}",
            order.currency
        )));
    }
    let unclawed = order
        .total_credits()
        .micros()
        .saturating_sub(order.credits_refunded.micros())
        .max(0);
    let take = pro_rata(order.total_credits(), amount.clamp(0, paid), paid)
        .micros()
        .min(unclawed);
    let mut next = order.clone();
    next.dispute_id = Some(dispute_id.to_owned());
    next.dispute_status = Some("open".to_owned());
    next.dispute_credits = Credits::from_micros(take);
    next.status = OrderStatus::Disputed;
    next.updated_at_ms = now_ms;
    let moves = if take > 0 {
        vec![CreditMove {
            reference: format!("{}:dispute:{dispute_id}", order.provider.as_str()),
            order_id: order.id.clone(),
            account: order.account.clone(),
            entry_type: EntryType::Adjustment,
            amount: Credits::from_micros(-take),
            description: format!(
                "Payment disputed (order {}, dispute {dispute_id})",
                order.id
            ),
            expires_at_ms: None,
        }]
    } else {
        Vec::new()
    };
    Ok(Some(Transition {
        order: next,
        moves,
        invoice: None,
        release_coupon: false,
    }))
}

/// The dispute closed: won gives the credits back, lost keeps them taken.
pub fn dispute_closed(order: &Order, dispute_id: &str, won: bool, now_ms: i64) -> Step {
    if order.dispute_id.as_deref() != Some(dispute_id) {
        return Err(Deferred::Retry(format!(
            "dispute {dispute_id} has not been opened on order {}",
            order.id
        )));
    }
    if order.dispute_status.as_deref() != Some("open") {
        return Ok(None);
    }
    let paid = paid_amount(order)?;
    let mut next = order.clone();
    next.updated_at_ms = now_ms;
    let mut moves = Vec::new();
    if won {
        next.dispute_status = Some("won".to_owned());
        next.status = if order.refunded_amount > 0 {
            refund_status(order.refunded_amount, paid)
        } else {
            OrderStatus::Paid
        };
        if order.dispute_credits.is_positive() {
            moves.push(CreditMove {
                reference: format!("{}:dispute:{dispute_id}:won", order.provider.as_str()),
                order_id: order.id.clone(),
                account: order.account.clone(),
                entry_type: EntryType::Adjustment,
                amount: order.dispute_credits,
                description: format!("Dispute won (order {}, dispute {dispute_id})", order.id),
                expires_at_ms: order.grant_expires_at_ms,
            });
        }
        next.dispute_credits = Credits::ZERO;
    } else {
        next.dispute_status = Some("lost".to_owned());
        next.status = OrderStatus::ChargedBack;
    }
    Ok(Some(Transition {
        order: next,
        moves,
        invoice: None,
        release_coupon: false,
    }))
}

/// The payment failed or the checkout expired: only a pending order closes.
pub fn close(order: &Order, status: OrderStatus, now_ms: i64) -> Step {
    debug_assert!(matches!(status, OrderStatus::Failed | OrderStatus::Expired));
    if order.status != OrderStatus::Pending {
        return Ok(None);
    }
    let mut next = order.clone();
    next.status = status;
    next.closed_at_ms = Some(now_ms);
    next.updated_at_ms = now_ms;
    Ok(Some(Transition {
        release_coupon: order.coupon_code.is_some(),
        ..Transition::order_only(next)
    }))
}

/// A checkout finished without money yet (an asynchronous payment method): remember the
/// provider's ids so later events find the order.
pub fn awaiting_payment(
    order: &Order,
    provider_order_id: &str,
    payment_ref: Option<&str>,
    now_ms: i64,
) -> Step {
    if order.status != OrderStatus::Pending
        || (order.provider_order_id.as_deref() == Some(provider_order_id)
            && (payment_ref.is_none() || order.payment_ref.as_deref() == payment_ref))
    {
        return Ok(None);
    }
    let mut next = order.clone();
    next.provider_order_id = Some(provider_order_id.to_owned());
    if let Some(reference) = payment_ref {
        next.payment_ref = Some(reference.to_owned());
    }
    next.updated_at_ms = now_ms;
    Ok(Some(Transition::order_only(next)))
}

fn paid_amount(order: &Order) -> Result<i64, Deferred> {
    match order.paid_amount {
        Some(paid) if order.status.was_paid() && paid > 0 => Ok(paid),
        _ if order.status == OrderStatus::Review => Err(Deferred::Review(format!(
            "order {} is held for review",
            order.id
        ))),
        _ => Err(Deferred::Retry(format!(
            "order {} is {}, not paid yet",
            order.id,
            order.status.as_str()
        ))),
    }
}

fn refund_status(refunded: i64, paid: i64) -> OrderStatus {
    if refunded >= paid {
        OrderStatus::Refunded
    } else {
        OrderStatus::PartiallyRefunded
    }
}

/// `⌊credits × part / whole⌋`, exact in 128 bits.
fn pro_rata(credits: Credits, part: i64, whole: i64) -> Credits {
    if whole <= 0 {
        return Credits::ZERO;
    }
    let micros = i128::from(credits.micros()) * i128::from(part) / i128::from(whole);
    Credits::from_micros(i64::try_from(micros).unwrap_or(i64::MAX))
}

fn invoice_draft(order: &Order, settings: &InvoiceSettings, now_ms: i64) -> InvoiceDraft {
    use rust_decimal::Decimal;
    let issued = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let currency = order.currency.clone();
    let exponent = super::money::exponent(&currency);
    let list = from_minor(order.list_amount, &currency);
    let total = from_minor(order.paid_amount.unwrap_or(order.amount), &currency);
    let rate = settings.tax_rate_percent;
    // Prices include tax: tax = total × rate / (100 + rate), to the minor unit.
    let tax = if rate.is_zero() {
        Decimal::ZERO
    } else {
        (total * rate / (Decimal::ONE_HUNDRED + rate)).round_dp(exponent)
    };
    let mut lines = vec![InvoiceLine {
        description: format!("{} — {} credits", order.description, order.credits),
        quantity: 1,
        unit_price: list,
        amount: list,
    }];
    if order.bonus_credits.is_positive() {
        lines.push(InvoiceLine {
            description: format!(
                "Bonus: {} credits (coupon {})",
                order.bonus_credits,
                order.coupon_code.as_deref().unwrap_or("")
            ),
            quantity: 1,
            unit_price: Decimal::ZERO,
            amount: Decimal::ZERO,
        });
    }
    let mut notes = settings.notes.clone();
    if let Some(days) = order.validity_days {
        notes.push(format!("Credits expire {days} days after purchase."));
    }
    let invoice = Invoice {
        id: String::new(),
        number: String::new(),
        order_id: order.id.clone(),
        account_id: order.account.as_str().to_owned(),
        issued_at: issued
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        currency,
        seller: settings.seller.clone(),
        buyer: Party {
            name: order
                .buyer_name
                .clone()
                .unwrap_or_else(|| order.account.as_str().to_owned()),
            address: Vec::new(),
            email: order.buyer_email.clone(),
            tax_id: None,
        },
        lines,
        subtotal: list,
        discount: from_minor(order.discount_amount, &order.currency),
        tax_rate_percent: rate,
        tax,
        total_excluding_tax: total - tax,
        total,
        notes,
    };
    InvoiceDraft {
        year: issued.year(),
        invoice,
    }
}
