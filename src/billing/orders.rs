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

use serde::{Deserialize, Serialize};

use super::invoice::{Invoice, InvoiceLine, Party};
use super::money::from_minor;
use crate::config::InvoiceSettings;
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
            reference: bonus_reference(&key),
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
    // The refund owns its share of the credits. Where a dispute already took part of that
    // share, the dispute's claim shrinks (a won dispute must not give back refunded credits),
    // so only what neither has taken yet leaves the balance now.
    let granted = order.total_credits().micros();
    let refunded = pro_rata(order.total_credits(), total, paid)
        .micros()
        .max(order.credits_refunded.micros());
    let disputed = order
        .dispute_credits
        .micros()
        .min(granted.saturating_sub(refunded).max(0));
    let take = (refunded + disputed)
        .saturating_sub(order.credits_refunded.micros() + order.dispute_credits.micros())
        .max(0);
    let mut next = order.clone();
    next.refunded_amount = total;
    next.credits_refunded = Credits::from_micros(refunded);
    next.dispute_credits = Credits::from_micros(disputed);
    next.refunded_at_ms = Some(now_ms);
    next.updated_at_ms = now_ms;
    if !matches!(
        order.status,
        OrderStatus::Disputed | OrderStatus::ChargedBack
    ) {
        next.status = refund_status(total, paid);
    }
    let reference = format!(
        "{}:refund:{}",
        order.payment_key(),
        from_minor(total, &order.currency)
    );
    let description = format!(
        "Refund of {} {} (order {})",
        from_minor(total - order.refunded_amount, &order.currency),
        order.currency,
        order.id
    );
    taking_back(order, next, take, EntryType::Refund, reference, description)
}

/// A refund of `amount` that the provider could not complete (failed, or canceled before it
/// went out). It changes nothing: the refunded total that took its credits back
/// (`charge.refunded`, cumulative) has counted it, and taking them back stays right if the
/// merchant pays the buyer another way. Whether the buyer keeps the money instead is for a
/// person to decide, so the event is held for review with what an admin needs to give the
/// credits back. A refund issued again later takes nothing more while the cumulative total
/// does not grow past what was already taken for.
pub fn refund_failed(
    order: &Order,
    refund_id: &str,
    amount: i64,
    currency: &str,
    reason: &str,
) -> Step {
    let paid = paid_amount(order)?;
    let share = if currency.eq_ignore_ascii_case(&order.currency) {
        pro_rata(order.total_credits(), amount.clamp(0, paid), paid)
    } else {
        Credits::ZERO
    };
    Err(Deferred::Review(format!(
        "refund {refund_id} of {} {} on order {} failed ({reason}); the credits taken back \
         when it was issued stay taken. If the buyer keeps the money, give back its share \
         ({share} credits) with POST /admin/accounts/{}/credits and reference \
         refund-failed:{refund_id}",
        from_minor(amount, currency),
        currency.to_ascii_uppercase(),
        order.id,
        order.account.as_str(),
    )))
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
    let reference = format!("{}:dispute:{dispute_id}", order.provider.as_str());
    let description = format!(
        "Payment disputed (order {}, dispute {dispute_id})",
        order.id
    );
    taking_back(
        order,
        next,
        take,
        EntryType::Adjustment,
        reference,
        description,
    )
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
            // The credits come back as a new grant carrying the purchase's own expiry: winning
            // a dispute restores what the buyer had, it neither extends nor shortens the
            // credits' life. If that expiry passed while the dispute was open, the returned
            // credits are already expired: they count until the next sweep takes them out
            // (an `expiry` entry), as they would have lapsed had the dispute never been opened.
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

/// The transition to `next` that takes `take` micro-credits (if any) back from the account.
fn taking_back(
    order: &Order,
    next: Order,
    take: i64,
    entry_type: EntryType,
    reference: String,
    description: String,
) -> Step {
    let moves = (take > 0)
        .then(|| CreditMove {
            reference,
            order_id: order.id.clone(),
            account: order.account.clone(),
            entry_type,
            amount: Credits::from_micros(-take),
            description,
            expires_at_ms: None,
        })
        .into_iter()
        .collect();
    Ok(Some(Transition {
        moves,
        ..Transition::order_only(next)
    }))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The names stored in the database are the names the API shows (serde's), and each reads
    /// back as what was stored.
    #[test]
    fn stored_names_are_the_api_names_and_read_back() {
        let api_name = |value: serde_json::Value| value.as_str().map(str::to_owned);
        for status in [
            OrderStatus::Pending,
            OrderStatus::Paid,
            OrderStatus::PartiallyRefunded,
            OrderStatus::Refunded,
            OrderStatus::Disputed,
            OrderStatus::ChargedBack,
            OrderStatus::Failed,
            OrderStatus::Expired,
            OrderStatus::Review,
        ] {
            let json = serde_json::to_value(status).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(api_name(json).as_deref(), Some(status.as_str()));
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        }
        for provider in [Provider::Stripe, Provider::LemonSqueezy, Provider::Polar] {
            let json = serde_json::to_value(provider).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(api_name(json).as_deref(), Some(provider.as_str()));
            assert_eq!(Provider::parse(provider.as_str()), Some(provider));
        }
        assert_eq!(OrderStatus::parse("settled"), None);
        assert_eq!(Provider::parse("paypal"), None);
    }

    fn order() -> Order {
        Order {
            id: "ord_1".into(),
            account: AccountId::parse("alice").unwrap_or_else(|_| panic!("account id")),
            package_id: "starter".into(),
            description: "Starter".into(),
            provider: Provider::Stripe,
            status: OrderStatus::Pending,
            checkout_id: Some("cs_1".into()),
            checkout_url: None,
            provider_order_id: Some("cs_1".into()),
            payment_ref: None,
            credits: Credits::from_micros(1_000_000_000),
            bonus_credits: Credits::ZERO,
            validity_days: Some(30),
            currency: "USD".into(),
            list_amount: 999,
            discount_amount: 0,
            amount: 999,
            paid_amount: None,
            refunded_amount: 0,
            credits_refunded: Credits::ZERO,
            dispute_id: None,
            dispute_status: None,
            dispute_credits: Credits::ZERO,
            coupon_code: None,
            invoice_id: None,
            buyer_email: None,
            buyer_name: None,
            review_reason: None,
            grant_expires_at_ms: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            paid_at_ms: None,
            refunded_at_ms: None,
            closed_at_ms: None,
        }
    }

    fn facts(amount: i64) -> PaymentFacts {
        PaymentFacts {
            provider_order_id: "cs_1".into(),
            payment_ref: Some("pi_1".into()),
            amount,
            currency: "usd".into(),
            buyer_email: None,
            buyer_name: None,
        }
    }

    fn step(result: Step) -> Transition {
        match result {
            Ok(Some(transition)) => transition,
            other => panic!("expected a transition, got {other:?}"),
        }
    }

    fn paid() -> Order {
        step(pay(
            &order(),
            &facts(999),
            &InvoiceSettings::default(),
            1_000,
        ))
        .order
    }

    #[test]
    fn a_payment_grants_once_with_the_package_expiry_and_an_invoice() {
        let t = step(pay(
            &order(),
            &facts(999),
            &InvoiceSettings::default(),
            1_000,
        ));
        assert_eq!(t.order.status, OrderStatus::Paid);
        assert_eq!(t.moves.len(), 1);
        assert_eq!(t.moves[0].reference, "stripe:cs_1");
        assert_eq!(t.moves[0].expires_at_ms, Some(1_000 + 30 * DAY_MS));
        assert!(t.invoice.is_some());
        // The same payment again changes nothing; another payment for it is for an admin.
        assert_eq!(
            pay(&t.order, &facts(999), &InvoiceSettings::default(), 2_000),
            Ok(None)
        );
        let mut other = facts(999);
        other.provider_order_id = "cs_2".into();
        assert!(matches!(
            pay(&t.order, &other, &InvoiceSettings::default(), 2_000),
            Err(Deferred::Review(_))
        ));
    }

    /// A coupon's bonus is a grant of its own, under a reference tied to its payment: two
    /// orders' bonuses never share one (the ledger would apply the second as a replay), and a
    /// refund finds the bonus among the grants the order created.
    #[test]
    fn each_payment_grants_its_bonus_under_a_reference_of_its_own() {
        let bonus_move = |session: &str| {
            let mut with_bonus = order();
            with_bonus.bonus_credits = Credits::from_micros(100_000_000);
            let mut paid_by = facts(999);
            paid_by.provider_order_id = session.into();
            let t = step(pay(
                &with_bonus,
                &paid_by,
                &InvoiceSettings::default(),
                1_000,
            ));
            let [purchase, bonus] = t.moves.as_slice() else {
                panic!("{:?}", t.moves)
            };
            assert_eq!(bonus.entry_type, EntryType::Bonus);
            assert_ne!(bonus.reference, purchase.reference);
            assert_eq!(
                t.order.granting_entries(),
                vec![
                    (EntryType::Purchase, purchase.reference.clone()),
                    (EntryType::Bonus, bonus.reference.clone())
                ]
            );
            bonus.reference.clone()
        };
        let (one, two) = (bonus_move("cs_1"), bonus_move("cs_2"));
        assert_ne!(one, two);
        assert!(one.starts_with("stripe:cs_1"), "{one}");
    }

    #[test]
    fn a_wrong_amount_holds_the_order_for_review_without_credit() {
        let t = step(pay(
            &order(),
            &facts(998),
            &InvoiceSettings::default(),
            1_000,
        ));
        assert_eq!(t.order.status, OrderStatus::Review);
        assert!(t.moves.is_empty() && t.invoice.is_none());
    }

    #[test]
    fn partial_refunds_in_any_steps_take_back_exactly_everything_in_the_end() {
        for steps in [
            vec![1, 2, 3, 999],
            vec![333, 666, 999],
            vec![998, 999],
            vec![500, 400, 999],
        ] {
            let mut current = paid();
            let mut taken = 0;
            for total in steps {
                if let Ok(Some(t)) = refund(&current, total, "USD", 5) {
                    taken -= t.moves.iter().map(|m| m.amount.micros()).sum::<i64>();
                    current = t.order;
                }
            }
            assert_eq!(taken, 1_000_000_000);
            assert_eq!(current.status, OrderStatus::Refunded);
        }
    }

    #[test]
    fn refunds_and_disputes_never_take_more_than_was_granted() {
        let all = 1_000_000_000;
        let disputed = step(dispute_opened(&paid(), "dp_1", 999, "usd", 5)).order;
        assert_eq!(disputed.dispute_credits, Credits::from_micros(all));
        // The dispute took everything: a refund of a third takes nothing more, but that third
        // now belongs to the refund, so a won dispute gives back only the other two thirds.
        let refunded = step(refund(&disputed, 333, "usd", 6));
        assert!(refunded.moves.is_empty());
        assert_eq!(refunded.order.status, OrderStatus::Disputed);
        assert_eq!(
            refunded.order.credits_refunded,
            Credits::from_micros(all / 3)
        );
        let won = step(dispute_closed(&refunded.order, "dp_1", true, 7));
        assert_eq!(won.moves[0].amount, Credits::from_micros(all - all / 3));
        assert_eq!(won.order.status, OrderStatus::PartiallyRefunded);
        // Fully refunded while disputed: winning gives nothing back.
        let full = step(refund(&disputed, 999, "usd", 6)).order;
        let won = step(dispute_closed(&full, "dp_1", true, 7));
        assert!(won.moves.is_empty());
        assert_eq!(won.order.status, OrderStatus::Refunded);
    }

    /// A dispute over part of the payment, then a refund of part of the rest: the refund takes
    /// its own share on top of what the dispute holds; winning gives back the dispute's share.
    #[test]
    fn a_refund_beside_a_partial_dispute_takes_its_own_share() {
        let all: i64 = 1_000_000_000;
        // Disputed: 333 of 999 paid, a third of the credits.
        let disputed = step(dispute_opened(&paid(), "dp_1", 333, "usd", 5)).order;
        assert_eq!(disputed.dispute_credits, Credits::from_micros(all / 3));
        // Refunded: 333 more, another third, which the dispute never held.
        let refunded = step(refund(&disputed, 333, "usd", 6));
        let taken: i64 = refunded.moves.iter().map(|m| -m.amount.micros()).sum();
        assert_eq!(taken, all / 3);
        assert_eq!(
            refunded.order.dispute_credits,
            Credits::from_micros(all / 3)
        );
        let won = step(dispute_closed(&refunded.order, "dp_1", true, 7));
        assert_eq!(won.moves[0].amount, Credits::from_micros(all / 3));
        assert_eq!(won.order.status, OrderStatus::PartiallyRefunded);
        // Without a refund, a won dispute leaves the order simply paid.
        let won = step(dispute_closed(&disputed, "dp_1", true, 7));
        assert_eq!(won.order.status, OrderStatus::Paid);
    }

    /// A checkout finished without money yet: the pending order learns the provider's ids, once;
    /// a later event adds a payment reference it lacked; an order past pending stays as it is.
    #[test]
    fn awaiting_payment_records_the_providers_ids_on_a_pending_order_only() {
        let mut pending = order();
        pending.provider_order_id = None;
        let noted = step(awaiting_payment(&pending, "cs_1", Some("pi_1"), 5)).order;
        assert_eq!(noted.provider_order_id.as_deref(), Some("cs_1"));
        assert_eq!(noted.payment_ref.as_deref(), Some("pi_1"));
        assert_eq!(noted.status, OrderStatus::Pending);
        // The same news again, with or without the reference: nothing to change.
        assert_eq!(awaiting_payment(&noted, "cs_1", Some("pi_1"), 6), Ok(None));
        assert_eq!(awaiting_payment(&noted, "cs_1", None, 6), Ok(None));
        // Another session for the order, or the reference arriving later: recorded.
        let moved = step(awaiting_payment(&noted, "cs_2", None, 7)).order;
        assert_eq!(moved.provider_order_id.as_deref(), Some("cs_2"));
        assert_eq!(moved.payment_ref.as_deref(), Some("pi_1"));
        let mut without_ref = noted.clone();
        without_ref.payment_ref = None;
        let referenced = step(awaiting_payment(&without_ref, "cs_1", Some("pi_9"), 8)).order;
        assert_eq!(referenced.payment_ref.as_deref(), Some("pi_9"));
        // Paid already: a late "awaiting" event changes nothing.
        assert_eq!(awaiting_payment(&paid(), "cs_3", Some("pi_3"), 9), Ok(None));
    }

    /// An order held for review was never credited: a refund or dispute of its payment takes
    /// nothing and waits for the admin, as does one of an order not paid yet.
    #[test]
    fn refunds_and_disputes_of_an_uncredited_order_take_nothing() {
        let in_review = step(pay(
            &order(),
            &facts(500),
            &InvoiceSettings::default(),
            1_000,
        ))
        .order;
        assert_eq!(in_review.status, OrderStatus::Review);
        assert_eq!(in_review.paid_amount, Some(500));
        assert!(matches!(
            refund(&in_review, 500, "usd", 2_000),
            Err(Deferred::Review(_))
        ));
        assert!(matches!(
            dispute_opened(&in_review, "dp_1", 500, "usd", 2_000),
            Err(Deferred::Review(_))
        ));
        let mut unpaid = order();
        unpaid.paid_amount = Some(999);
        assert!(matches!(
            refund(&unpaid, 999, "usd", 2_000),
            Err(Deferred::Retry(_))
        ));
    }

    /// The invoice of a payment: issued when the payment arrived (its year numbers it), and
    /// the tax included in the price worked out of the total.
    #[test]
    fn a_payment_invoices_the_price_with_its_tax_on_the_day_it_arrived() {
        let settings = InvoiceSettings {
            tax_rate_percent: rust_decimal::Decimal::from(19),
            ..InvoiceSettings::default()
        };
        let mut priced = order();
        (priced.list_amount, priced.amount) = (11_900, 11_900);
        // 2027-03-15T12:00:00Z
        let at_ms = 1_805_112_000_000;
        let draft = step(pay(&priced, &facts(11_900), &settings, at_ms))
            .invoice
            .expect("an invoice");
        assert_eq!(draft.year, 2027);
        assert_eq!(draft.invoice.issued_at, "2027-03-15T12:00:00Z");
        let invoice = &draft.invoice;
        assert_eq!(invoice.total.to_string(), "119.00");
        assert_eq!(invoice.tax.to_string(), "19.00");
        assert_eq!(invoice.total_excluding_tax.to_string(), "100.00");
    }

    #[test]
    fn claw_backs_draw_from_the_grants_the_payment_created_first() {
        let mut with_bonus = order();
        with_bonus.bonus_credits = Credits::from_micros(5_000_000);
        with_bonus.coupon_code = Some("MORE".into());
        let paid = step(pay(
            &with_bonus,
            &facts(999),
            &InvoiceSettings::default(),
            1_000,
        ));
        // The entries named are exactly those the payment's moves write.
        let granted: Vec<(EntryType, String)> = paid
            .moves
            .iter()
            .map(|m| (m.entry_type, m.reference.clone()))
            .collect();
        assert_eq!(paid.order.granting_entries(), granted);
        let refund = step(refund(&paid.order, 999, "usd", 2_000));
        let request = refund.moves[0].grant_request(Some(&paid.order));
        assert_eq!(request.draw_first_from, granted);
        // Without its order (a move left by a crash for an order since lost), or for a move
        // that gives credits, the usual order applies.
        assert!(
            refund.moves[0]
                .grant_request(None)
                .draw_first_from
                .is_empty()
        );
        assert!(
            paid.moves[0]
                .grant_request(Some(&paid.order))
                .draw_first_from
                .is_empty()
        );
    }

    #[test]
    fn a_won_dispute_gives_the_credits_back_with_the_purchase_expiry_even_if_passed() {
        let mut order = paid();
        let expires = order.grant_expires_at_ms;
        assert_eq!(expires, Some(1_000 + 30 * DAY_MS));
        order = step(dispute_opened(&order, "dp_1", 999, "usd", 5)).order;
        for now in [10, 1_000 + 31 * DAY_MS] {
            let won = step(dispute_closed(&order, "dp_1", true, now));
            assert_eq!(won.moves[0].expires_at_ms, expires);
            assert_eq!(won.moves[0].amount, order.total_credits());
        }
    }

    #[test]
    fn a_failed_refund_changes_nothing_and_tells_the_admin_what_to_give_back() {
        let refunded = step(refund(&paid(), 333, "usd", 5)).order;
        let why = match refund_failed(&refunded, "re_1", 333, "usd", "expired_or_canceled_card") {
            Err(Deferred::Review(why)) => why,
            other => panic!("{other:?}"),
        };
        for expected in [
            "refund re_1 of 3.33 USD on order ord_1 failed (expired_or_canceled_card)",
            "stay taken",
            // ⌊1000 × 333 / 999⌋ credits, to the micro-credit.
            "(333.333333 credits)",
            "POST /admin/accounts/alice/credits",
            "refund-failed:re_1",
        ] {
            assert!(why.contains(expected), "{expected} not in {why}");
        }
        // Before its payment it waits like a refund; on an order in review it stays there.
        assert!(matches!(
            refund_failed(&order(), "re_1", 333, "usd", "unknown"),
            Err(Deferred::Retry(_))
        ));
        let mut in_review = order();
        in_review.status = OrderStatus::Review;
        assert!(matches!(
            refund_failed(&in_review, "re_1", 333, "usd", "unknown"),
            Err(Deferred::Review(why)) if why.contains("held for review")
        ));
        // A re-issued refund of the same total takes nothing more.
        assert_eq!(refund(&refunded, 333, "usd", 6), Ok(None));
    }

    #[test]
    fn events_before_the_payment_are_retried_and_closing_releases_the_coupon() {
        assert!(matches!(
            refund(&order(), 100, "usd", 1),
            Err(Deferred::Retry(_))
        ));
        assert!(matches!(
            dispute_closed(&paid(), "dp_9", false, 1),
            Err(Deferred::Retry(_))
        ));
        let mut with_coupon = order();
        with_coupon.coupon_code = Some("SAVE".into());
        let closed = step(close(&with_coupon, OrderStatus::Expired, 1));
        assert!(closed.release_coupon);
        assert_eq!(close(&paid(), OrderStatus::Expired, 1), Ok(None));
    }
}
