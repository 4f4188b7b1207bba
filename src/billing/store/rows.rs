//! The payments tables' SQL text and row decoding, shared by both drivers: the statements use
//! `?` placeholders and standard SQL, and rows decode through [`Columns`].

use crate::billing::coupons::{Coupon, CouponKind};
use crate::billing::invoice::Invoice;
use crate::billing::orders::{CreditMove, Order, OrderStatus, Provider};
use crate::billing::store::EventRecord;
use crate::domain::{AccountId, Credits};
use crate::ledger::{Columns, EntryType, LedgerError};

pub(super) const ORDER_COLUMNS: &str = "seq, id, account_id, package_id, description, provider, \
     status, checkout_id, checkout_url, provider_order_id, payment_ref, credits, bonus_credits, \
     validity_days, currency, list_amount, discount_amount, amount, paid_amount, \
     refunded_amount, credits_refunded, dispute_id, dispute_status, dispute_credits, \
     coupon_code, invoice_id, buyer_email, buyer_name, review_reason, grant_expires_at, \
     created_at, updated_at, paid_at, refunded_at, closed_at";

pub(super) const INSERT_ORDER: &str = "INSERT INTO orders (id, account_id, package_id, \
     description, provider, status, checkout_id, checkout_url, provider_order_id, payment_ref, \
     credits, bonus_credits, validity_days, currency, list_amount, discount_amount, amount, \
     paid_amount, refunded_amount, credits_refunded, dispute_id, dispute_status, \
     dispute_credits, coupon_code, invoice_id, buyer_email, buyer_name, review_reason, \
     grant_expires_at, created_at, updated_at, paid_at, refunded_at, closed_at) VALUES \
     (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
     ?, ?, ?, ?)";

/// Every column a transition may change (all but the id, account, package and prices).
pub(super) const UPDATE_ORDER: &str = "UPDATE orders SET status = ?, checkout_id = ?, \
     checkout_url = ?, provider_order_id = ?, payment_ref = ?, bonus_credits = ?, \
     paid_amount = ?, refunded_amount = ?, credits_refunded = ?, dispute_id = ?, \
     dispute_status = ?, dispute_credits = ?, invoice_id = ?, buyer_email = ?, buyer_name = ?, \
     review_reason = ?, grant_expires_at = ?, updated_at = ?, paid_at = ?, refunded_at = ?, \
     closed_at = ? WHERE id = ?";

pub(super) const INSERT_MOVE: &str = "INSERT INTO order_credit_moves (reference, order_id, \
     account_id, entry_type, amount, description, expires_at, created_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

pub(super) const MOVE_COLUMNS: &str =
    "reference, order_id, account_id, entry_type, amount, description, expires_at";

pub(super) const EVENT_COLUMNS: &str =
    "seq, provider, event_id, event_type, outcome, order_id, detail, payload, received_at";

pub(super) const INSERT_EVENT: &str = "INSERT INTO payment_events (provider, event_id, \
     event_type, outcome, order_id, detail, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

pub(super) const INSERT_INVOICE: &str = "INSERT INTO invoices (id, number, order_id, account_id, \
     issued_at, document) VALUES (?, ?, ?, ?, ?, ?)";

pub(super) const COUPON_COLUMNS: &str = "code, kind, percent_off_bp, amount_off, currency, \
     bonus_credits, valid_from, valid_until, max_uses, max_uses_per_account, min_package, \
     active, uses, created_at, updated_at";

/// The uses of a coupon (`?`) that an account (`?`) holds.
pub(super) const HELD_USES: &str = "SELECT COUNT(*) AS held FROM coupon_redemptions \
     WHERE code = ? AND account_id = ? AND released_at IS NULL";

pub(super) const INSERT_COUPON: &str = "INSERT INTO coupons (code, kind, percent_off_bp, \
     amount_off, currency, bonus_credits, valid_from, valid_until, max_uses, \
     max_uses_per_account, min_package, active, uses, created_at, updated_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

pub(super) fn coupon_from_row<R: Columns>(row: &R) -> Result<Coupon, LedgerError> {
    let kind = row.text("kind")?;
    Ok(Coupon {
        code: row.text("code")?,
        kind: CouponKind::parse(&kind).ok_or_else(|| corrupt("coupon kind", &kind))?,
        percent_off_bp: row.optional_int("percent_off_bp")?,
        amount_off: row.optional_int("amount_off")?,
        currency: row.optional_text("currency")?,
        bonus_credits: Credits::from_micros(row.int("bonus_credits")?),
        valid_from_ms: row.optional_int("valid_from")?,
        valid_until_ms: row.optional_int("valid_until")?,
        max_uses: row.optional_int("max_uses")?,
        max_uses_per_account: row.optional_int("max_uses_per_account")?,
        min_package: row.optional_text("min_package")?,
        active: row.int("active")? != 0,
        uses: row.int("uses")?,
        created_at_ms: row.int("created_at")?,
        updated_at_ms: row.int("updated_at")?,
    })
}

fn corrupt(what: &str, raw: &str) -> LedgerError {
    LedgerError::Corrupt(format!("{what} `{raw}`"))
}

pub(super) fn order_from_row<R: Columns>(row: &R) -> Result<Order, LedgerError> {
    let account = row.text("account_id")?;
    let provider = row.text("provider")?;
    let status = row.text("status")?;
    let credits = |column: &str| row.int(column).map(Credits::from_micros);
    Ok(Order {
        id: row.text("id")?,
        account: AccountId::parse(&account).map_err(|_| corrupt("account id", &account))?,
        package_id: row.text("package_id")?,
        description: row.text("description")?,
        provider: Provider::parse(&provider).ok_or_else(|| corrupt("provider", &provider))?,
        status: OrderStatus::parse(&status).ok_or_else(|| corrupt("order status", &status))?,
        checkout_id: row.optional_text("checkout_id")?,
        checkout_url: row.optional_text("checkout_url")?,
        provider_order_id: row.optional_text("provider_order_id")?,
        payment_ref: row.optional_text("payment_ref")?,
        credits: credits("credits")?,
        bonus_credits: credits("bonus_credits")?,
        validity_days: row
            .optional_int("validity_days")?
            .map(|days| {
                u32::try_from(days).map_err(|_| corrupt("validity_days", &days.to_string()))
            })
            .transpose()?,
        currency: row.text("currency")?,
        list_amount: row.int("list_amount")?,
        discount_amount: row.int("discount_amount")?,
        amount: row.int("amount")?,
        paid_amount: row.optional_int("paid_amount")?,
        refunded_amount: row.int("refunded_amount")?,
        credits_refunded: credits("credits_refunded")?,
        dispute_id: row.optional_text("dispute_id")?,
        dispute_status: row.optional_text("dispute_status")?,
        dispute_credits: credits("dispute_credits")?,
        coupon_code: row.optional_text("coupon_code")?,
        invoice_id: row.optional_text("invoice_id")?,
        buyer_email: row.optional_text("buyer_email")?,
        buyer_name: row.optional_text("buyer_name")?,
        review_reason: row.optional_text("review_reason")?,
        grant_expires_at_ms: row.optional_int("grant_expires_at")?,
        created_at_ms: row.int("created_at")?,
        updated_at_ms: row.int("updated_at")?,
        paid_at_ms: row.optional_int("paid_at")?,
        refunded_at_ms: row.optional_int("refunded_at")?,
        closed_at_ms: row.optional_int("closed_at")?,
    })
}

pub(super) fn move_from_row<R: Columns>(row: &R) -> Result<CreditMove, LedgerError> {
    let account = row.text("account_id")?;
    let entry_type = row.text("entry_type")?;
    Ok(CreditMove {
        reference: row.text("reference")?,
        order_id: row.text("order_id")?,
        account: AccountId::parse(&account).map_err(|_| corrupt("account id", &account))?,
        entry_type: EntryType::parse(&entry_type)
            .ok_or_else(|| corrupt("entry type", &entry_type))?,
        amount: Credits::from_micros(row.int("amount")?),
        description: row.text("description")?,
        expires_at_ms: row.optional_int("expires_at")?,
    })
}

pub(super) fn event_from_row<R: Columns>(row: &R) -> Result<EventRecord, LedgerError> {
    let provider = row.text("provider")?;
    Ok(EventRecord {
        provider: Provider::parse(&provider).ok_or_else(|| corrupt("provider", &provider))?,
        event_id: row.text("event_id")?,
        event_type: row.text("event_type")?,
        outcome: row.text("outcome")?,
        order_id: row.optional_text("order_id")?,
        detail: row.text("detail")?,
        payload: row.optional_text("payload")?,
        received_at_ms: row.int("received_at")?,
        cursor: row.int("seq")?,
    })
}

pub(super) fn invoice_from_json(json: &str) -> Result<Invoice, LedgerError> {
    serde_json::from_str(json).map_err(|e| LedgerError::Corrupt(format!("invoice document: {e}")))
}

/// `INV-2026-000123`.
pub(super) fn invoice_number(year: i32, seq: i64) -> String {
    format!("INV-{year}-{seq:06}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn invoice_numbers_are_zero_padded_per_year() {
        assert_eq!(super::invoice_number(2026, 123), "INV-2026-000123");
        assert_eq!(super::invoice_number(2027, 1), "INV-2027-000001");
    }
}
