//! The transitions: what each payment event does to an order (see [`super`]).

use super::*;
use crate::billing::invoice::{Invoice, InvoiceLine, Party};
use crate::billing::money::from_minor;
use crate::config::InvoiceSettings;

pub(super) const DAY_MS: i64 = 86_400_000;

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
    let exponent = crate::billing::money::exponent(&currency);
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
