//! The payments port ([`PaymentStore`](crate::billing::store::PaymentStore)) on the ledger's
//! database, for both adapters.
//!
//! The SQL is the same in both dialects (`?` placeholders, standard statements); only the
//! transaction start, the row lock and the counter upsert differ. [`impl_payment_store!`]
//! instantiates the one implementation for each adapter with those three pieces, and the row
//! decoding is generic over the driver ([`Columns`]).

use crate::billing::coupons::{Coupon, CouponKind};
use crate::billing::invoice::Invoice;
use crate::billing::orders::{CreditMove, Order, OrderStatus, Provider};
use crate::billing::store::EventRecord;
use crate::domain::{AccountId, Credits};
use crate::ledger::verify::Columns;
use crate::ledger::{EntryType, LedgerError, VerifyProblem};

pub(crate) const ORDER_COLUMNS: &str = "seq, id, account_id, package_id, description, provider, \
     status, checkout_id, checkout_url, provider_order_id, payment_ref, credits, bonus_credits, \
     validity_days, currency, list_amount, discount_amount, amount, paid_amount, \
     refunded_amount, credits_refunded, dispute_id, dispute_status, dispute_credits, \
     coupon_code, invoice_id, buyer_email, buyer_name, review_reason, grant_expires_at, \
     created_at, updated_at, paid_at, refunded_at, closed_at";

pub(crate) const INSERT_ORDER: &str = "INSERT INTO orders (id, account_id, package_id, \
     description, provider, status, checkout_id, checkout_url, provider_order_id, payment_ref, \
     credits, bonus_credits, validity_days, currency, list_amount, discount_amount, amount, \
     paid_amount, refunded_amount, credits_refunded, dispute_id, dispute_status, \
     dispute_credits, coupon_code, invoice_id, buyer_email, buyer_name, review_reason, \
     grant_expires_at, created_at, updated_at, paid_at, refunded_at, closed_at) VALUES \
     (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, \
     ?, ?, ?, ?)";

/// Every column a transition may change (all but the id, account, package and prices).
pub(crate) const UPDATE_ORDER: &str = "UPDATE orders SET status = ?, checkout_id = ?, \
     checkout_url = ?, provider_order_id = ?, payment_ref = ?, bonus_credits = ?, \
     paid_amount = ?, refunded_amount = ?, credits_refunded = ?, dispute_id = ?, \
     dispute_status = ?, dispute_credits = ?, invoice_id = ?, buyer_email = ?, buyer_name = ?, \
     review_reason = ?, grant_expires_at = ?, updated_at = ?, paid_at = ?, refunded_at = ?, \
     closed_at = ? WHERE id = ?";

pub(crate) const INSERT_MOVE: &str = "INSERT INTO order_credit_moves (reference, order_id, \
     account_id, entry_type, amount, description, expires_at, created_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

pub(crate) const MOVE_COLUMNS: &str =
    "reference, order_id, account_id, entry_type, amount, description, expires_at";

pub(crate) const EVENT_COLUMNS: &str =
    "seq, provider, event_id, event_type, outcome, order_id, detail, payload, received_at";

pub(crate) const INSERT_EVENT: &str = "INSERT INTO payment_events (provider, event_id, \
     event_type, outcome, order_id, detail, payload, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)";

pub(crate) const INSERT_INVOICE: &str = "INSERT INTO invoices (id, number, order_id, account_id, \
     issued_at, document) VALUES (?, ?, ?, ?, ?, ?)";

pub(crate) const COUPON_COLUMNS: &str = "code, kind, percent_off_bp, amount_off, currency, \
     bonus_credits, valid_from, valid_until, max_uses, max_uses_per_account, min_package, \
     active, uses, created_at, updated_at";

/// The uses of a coupon (`?`) that an account (`?`) holds.
pub(crate) const HELD_USES: &str = "SELECT COUNT(*) AS held FROM coupon_redemptions \
     WHERE code = ? AND account_id = ? AND released_at IS NULL";

pub(crate) const INSERT_COUPON: &str = "INSERT INTO coupons (code, kind, percent_off_bp, \
     amount_off, currency, bonus_credits, valid_from, valid_until, max_uses, \
     max_uses_per_account, min_package, active, uses, created_at, updated_at) \
     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

pub(crate) fn coupon_from_row<R: Columns>(row: &R) -> Result<Coupon, LedgerError> {
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

pub(crate) fn order_from_row<R: Columns>(row: &R) -> Result<Order, LedgerError> {
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

pub(crate) fn move_from_row<R: Columns>(row: &R) -> Result<CreditMove, LedgerError> {
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

pub(crate) fn event_from_row<R: Columns>(row: &R) -> Result<EventRecord, LedgerError> {
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

pub(crate) fn invoice_from_json(json: &str) -> Result<Invoice, LedgerError> {
    serde_json::from_str(json).map_err(|e| LedgerError::Corrupt(format!("invoice document: {e}")))
}

/// `INV-2026-000123`.
pub(crate) fn invoice_number(year: i32, seq: i64) -> String {
    format!("INV-{year}-{seq:06}")
}

/// `INSERT_ORDER` with every column of `$order` bound, ready to execute.
macro_rules! bind_order {
    ($order:expr) => {{
        use sqlx::SqlSafeStr as _;
        let order = $order;
        sqlx::query($crate::ledger::payments::INSERT_ORDER.into_sql_str())
            .bind(&order.id)
            .bind(order.account.as_str())
            .bind(&order.package_id)
            .bind(&order.description)
            .bind(order.provider.as_str())
            .bind(order.status.as_str())
            .bind(order.checkout_id.as_deref())
            .bind(order.checkout_url.as_deref())
            .bind(order.provider_order_id.as_deref())
            .bind(order.payment_ref.as_deref())
            .bind(order.credits.micros())
            .bind(order.bonus_credits.micros())
            .bind(order.validity_days.map(i64::from))
            .bind(&order.currency)
            .bind(order.list_amount)
            .bind(order.discount_amount)
            .bind(order.amount)
            .bind(order.paid_amount)
            .bind(order.refunded_amount)
            .bind(order.credits_refunded.micros())
            .bind(order.dispute_id.as_deref())
            .bind(order.dispute_status.as_deref())
            .bind(order.dispute_credits.micros())
            .bind(order.coupon_code.as_deref())
            .bind(order.invoice_id.as_deref())
            .bind(order.buyer_email.as_deref())
            .bind(order.buyer_name.as_deref())
            .bind(order.review_reason.as_deref())
            .bind(order.grant_expires_at_ms)
            .bind(order.created_at_ms)
            .bind(order.updated_at_ms)
            .bind(order.paid_at_ms)
            .bind(order.refunded_at_ms)
            .bind(order.closed_at_ms)
    }};
}

pub(crate) use bind_order;

/// Implements [`PaymentStore`](crate::billing::store::PaymentStore) for a ledger adapter with
/// a `pool` field. `begin` starts a write transaction, `lock` is appended to the order's
/// SELECT to lock its row, `bump_counter` increments (or creates at 1) a year's invoice
/// counter, `rerun(what, attempt)` runs a whole transaction again where the database asks for
/// it, and `upsert_statement` writes a usage statement over an older one.
macro_rules! impl_payment_store {
    ($ledger:ty, begin = $begin:literal, lock = $lock:literal, bump_counter = $bump:literal,
     rerun = $rerun:path, upsert_statement = $upsert_statement:literal) => {
        #[async_trait::async_trait]
        impl $crate::billing::store::PaymentStore for $ledger {
            async fn insert_order(
                &self,
                order: &$crate::billing::orders::Order,
            ) -> Result<(), $crate::ledger::LedgerError> {
                $crate::ledger::payments::bind_order!(order)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn insert_order_with_coupon(
                &self,
                order: &$crate::billing::orders::Order,
                check: &$crate::billing::store::CouponCheck<'_>,
            ) -> Result<Result<(), String>, $crate::ledger::LedgerError> {
                $rerun("insert_order_with_coupon", || {
                    self.insert_order_with_coupon_once(order, check)
                })
                .await
            }

            async fn create_coupon(
                &self,
                coupon: &$crate::billing::coupons::Coupon,
            ) -> Result<bool, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                let inserted = sqlx::query($crate::ledger::payments::INSERT_COUPON.into_sql_str())
                    .bind(&coupon.code)
                    .bind(coupon.kind.as_str())
                    .bind(coupon.percent_off_bp)
                    .bind(coupon.amount_off)
                    .bind(coupon.currency.as_deref())
                    .bind(coupon.bonus_credits.micros())
                    .bind(coupon.valid_from_ms)
                    .bind(coupon.valid_until_ms)
                    .bind(coupon.max_uses)
                    .bind(coupon.max_uses_per_account)
                    .bind(coupon.min_package.as_deref())
                    .bind(i64::from(coupon.active))
                    .bind(coupon.uses)
                    .bind(coupon.created_at_ms)
                    .bind(coupon.updated_at_ms)
                    .execute(&self.pool)
                    .await;
                match inserted {
                    Ok(_) => Ok(true),
                    Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Ok(false),
                    Err(error) => Err(error.into()),
                }
            }

            async fn coupon(
                &self,
                code: &str,
            ) -> Result<Option<$crate::billing::coupons::Coupon>, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                let sql = format!(
                    "SELECT {} FROM coupons WHERE code = ?",
                    $crate::ledger::payments::COUPON_COLUMNS
                );
                sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                    .bind(code)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|row| $crate::ledger::payments::coupon_from_row(&row))
                    .transpose()
            }

            async fn coupons(
                &self,
            ) -> Result<Vec<$crate::billing::coupons::Coupon>, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                let sql = format!(
                    "SELECT {} FROM coupons ORDER BY code",
                    $crate::ledger::payments::COUPON_COLUMNS
                );
                sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map($crate::ledger::payments::coupon_from_row)
                    .collect()
            }

            async fn set_coupon_active(
                &self,
                code: &str,
                active: bool,
                now_ms: i64,
            ) -> Result<bool, $crate::ledger::LedgerError> {
                let result =
                    sqlx::query("UPDATE coupons SET active = ?, updated_at = ? WHERE code = ?")
                        .bind(i64::from(active))
                        .bind(now_ms)
                        .bind(code)
                        .execute(&self.pool)
                        .await?;
                Ok(result.rows_affected() > 0)
            }

            async fn usage_by_model(
                &self,
                account: &$crate::domain::AccountId,
                from_ms: i64,
                to_ms: i64,
            ) -> Result<Vec<$crate::billing::statements::ModelUsage>, $crate::ledger::LedgerError>
            {
                use sqlx::Row as _;
                // Sums are cast back to BIGINT: MySQL sums BIGINTs as DECIMAL.
                let rows = sqlx::query(
                    "SELECT model, COUNT(*) AS requests, \
                     CAST(SUM(prompt_tokens) AS SIGNED) AS prompt_tokens, \
                     CAST(SUM(completion_tokens) AS SIGNED) AS completion_tokens, \
                     CAST(SUM(cost) AS SIGNED) AS cost \
                     FROM usage_records WHERE account_id = ? AND settled_at >= ? \
                     AND settled_at < ? GROUP BY model ORDER BY model",
                )
                .bind(account.as_str())
                .bind(from_ms)
                .bind(to_ms)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|row| {
                        Ok($crate::billing::statements::ModelUsage {
                            model: row.try_get("model")?,
                            requests: row.try_get("requests")?,
                            prompt_tokens: row.try_get("prompt_tokens")?,
                            completion_tokens: row.try_get("completion_tokens")?,
                            cost: $crate::domain::Credits::from_micros(row.try_get("cost")?),
                        })
                    })
                    .collect()
            }

            async fn save_statement(
                &self,
                statement: &$crate::billing::statements::Statement,
                now_ms: i64,
            ) -> Result<(), $crate::ledger::LedgerError> {
                let document = serde_json::to_string(statement).map_err(|e| {
                    $crate::ledger::LedgerError::Corrupt(format!("statement document: {e}"))
                })?;
                sqlx::query($upsert_statement)
                    .bind(&statement.account_id)
                    .bind(&statement.billing_month)
                    .bind(document)
                    .bind(now_ms)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn statements(
                &self,
                account: &$crate::domain::AccountId,
            ) -> Result<Vec<$crate::billing::statements::Statement>, $crate::ledger::LedgerError>
            {
                use sqlx::Row as _;
                sqlx::query(
                    "SELECT document FROM usage_statements WHERE account_id = ? \
                     ORDER BY billing_month DESC",
                )
                .bind(account.as_str())
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| {
                    let document: String = row.try_get("document")?;
                    serde_json::from_str(&document).map_err(|e| {
                        $crate::ledger::LedgerError::Corrupt(format!("statement document: {e}"))
                    })
                })
                .collect()
            }

            async fn coupon_uses_by(
                &self,
                code: &str,
                account: &$crate::domain::AccountId,
            ) -> Result<i64, $crate::ledger::LedgerError> {
                use sqlx::Row as _;
                let held: i64 = sqlx::query($crate::ledger::payments::HELD_USES)
                    .bind(code)
                    .bind(account.as_str())
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("held")?;
                Ok(held)
            }

            async fn order(
                &self,
                id: &str,
            ) -> Result<Option<$crate::billing::orders::Order>, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                let sql = format!(
                    "SELECT {} FROM orders WHERE id = ?",
                    $crate::ledger::payments::ORDER_COLUMNS
                );
                sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|row| $crate::ledger::payments::order_from_row(&row))
                    .transpose()
            }

            async fn find_order(
                &self,
                provider: $crate::billing::orders::Provider,
                lookup: &$crate::billing::store::OrderLookup,
            ) -> Result<Option<$crate::billing::orders::Order>, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                // An order id from metadata names an order of this provider only: another
                // provider's signed event cannot pay (or refund) it.
                if let Some(id) = &lookup.order_id
                    && let Some(order) = self.order(id).await?
                    && order.provider == provider
                {
                    return Ok(Some(order));
                }
                for (column, value) in [
                    ("provider_order_id", &lookup.provider_order_id),
                    ("payment_ref", &lookup.payment_ref),
                ] {
                    let Some(value) = value else { continue };
                    let sql = format!(
                        "SELECT {} FROM orders WHERE provider = ? AND {column} = ? \
                         ORDER BY seq LIMIT 1",
                        $crate::ledger::payments::ORDER_COLUMNS
                    );
                    let row = sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                        .bind(provider.as_str())
                        .bind(value)
                        .fetch_optional(&self.pool)
                        .await?;
                    if let Some(row) = row {
                        return $crate::ledger::payments::order_from_row(&row).map(Some);
                    }
                }
                Ok(None)
            }

            async fn orders(
                &self,
                account: &$crate::domain::AccountId,
                page: $crate::ledger::Page,
            ) -> Result<Vec<(i64, $crate::billing::orders::Order)>, $crate::ledger::LedgerError>
            {
                use sqlx::{Row as _, SqlSafeStr as _};
                let sql = format!(
                    "SELECT {} FROM orders WHERE account_id = ? AND seq < ? \
                     ORDER BY seq DESC LIMIT ?",
                    $crate::ledger::payments::ORDER_COLUMNS
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                    .bind(account.as_str())
                    .bind(page.before.unwrap_or(i64::MAX))
                    .bind(i64::from(page.limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let cursor: i64 = row.try_get("seq")?;
                        Ok((cursor, $crate::ledger::payments::order_from_row(row)?))
                    })
                    .collect()
            }

            async fn update_order(
                &self,
                order_id: &str,
                step: &$crate::billing::store::StepFn<'_>,
            ) -> Result<$crate::billing::store::UpdateOutcome, $crate::ledger::LedgerError> {
                $rerun("update_order", || self.update_order_once(order_id, step)).await
            }

            async fn pending_moves(
                &self,
                order_id: Option<&str>,
                limit: u32,
            ) -> Result<Vec<$crate::billing::orders::CreditMove>, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                let filter = if order_id.is_some() {
                    "AND order_id = ?"
                } else {
                    ""
                };
                let sql = format!(
                    "SELECT {} FROM order_credit_moves WHERE applied_at IS NULL {filter} \
                     ORDER BY created_at, reference LIMIT ?",
                    $crate::ledger::payments::MOVE_COLUMNS
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str());
                if let Some(id) = order_id {
                    query = query.bind(id);
                }
                query
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map($crate::ledger::payments::move_from_row)
                    .collect()
            }

            async fn mark_move_applied(
                &self,
                reference: &str,
                now_ms: i64,
            ) -> Result<(), $crate::ledger::LedgerError> {
                sqlx::query(
                    "UPDATE order_credit_moves SET applied_at = ? \
                     WHERE reference = ? AND applied_at IS NULL",
                )
                .bind(now_ms)
                .bind(reference)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn event_seen(
                &self,
                provider: $crate::billing::orders::Provider,
                event_id: &str,
            ) -> Result<bool, $crate::ledger::LedgerError> {
                let row = sqlx::query(
                    "SELECT 1 AS seen FROM payment_events WHERE provider = ? AND event_id = ?",
                )
                .bind(provider.as_str())
                .bind(event_id)
                .fetch_optional(&self.pool)
                .await?;
                Ok(row.is_some())
            }

            async fn record_event(
                &self,
                event: &$crate::billing::store::EventRecord,
            ) -> Result<bool, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                let inserted = sqlx::query($crate::ledger::payments::INSERT_EVENT.into_sql_str())
                    .bind(event.provider.as_str())
                    .bind(&event.event_id)
                    .bind(&event.event_type)
                    .bind(&event.outcome)
                    .bind(event.order_id.as_deref())
                    .bind(&event.detail)
                    .bind(event.payload.as_deref())
                    .bind(event.received_at_ms)
                    .execute(&self.pool)
                    .await;
                match inserted {
                    Ok(_) => Ok(true),
                    Err(sqlx::Error::Database(error)) if error.is_unique_violation() => Ok(false),
                    Err(error) => Err(error.into()),
                }
            }

            async fn events(
                &self,
                outcome: Option<&str>,
                page: $crate::ledger::Page,
            ) -> Result<Vec<$crate::billing::store::EventRecord>, $crate::ledger::LedgerError> {
                use sqlx::SqlSafeStr as _;
                let filter = if outcome.is_some() {
                    "AND outcome = ?"
                } else {
                    ""
                };
                let sql = format!(
                    "SELECT {} FROM payment_events WHERE seq < ? {filter} \
                     ORDER BY seq DESC LIMIT ?",
                    $crate::ledger::payments::EVENT_COLUMNS
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                    .bind(page.before.unwrap_or(i64::MAX));
                if let Some(outcome) = outcome {
                    query = query.bind(outcome);
                }
                query
                    .bind(i64::from(page.limit))
                    .fetch_all(&self.pool)
                    .await?
                    .iter()
                    .map($crate::ledger::payments::event_from_row)
                    .collect()
            }

            async fn invoice(
                &self,
                id: &str,
            ) -> Result<Option<$crate::billing::invoice::Invoice>, $crate::ledger::LedgerError>
            {
                use sqlx::Row as _;
                sqlx::query("SELECT document FROM invoices WHERE id = ?")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await?
                    .map(|row| {
                        let document: String = row.try_get("document")?;
                        $crate::ledger::payments::invoice_from_json(&document)
                    })
                    .transpose()
            }
        }

        impl $ledger {
            /// One attempt of [`PaymentStore::insert_order_with_coupon`].
            async fn insert_order_with_coupon_once(
                &self,
                order: &$crate::billing::orders::Order,
                check: &$crate::billing::store::CouponCheck<'_>,
            ) -> Result<Result<(), String>, $crate::ledger::LedgerError> {
                use sqlx::{Row as _, SqlSafeStr as _};
                let Some(code) = order.coupon_code.as_deref() else {
                    return Err($crate::ledger::LedgerError::Corrupt(
                        "an order without a coupon written as holding one".into(),
                    ));
                };
                let mut tx = self.pool.begin_with($begin).await?;
                let sql = format!(
                    "SELECT {} FROM coupons WHERE code = ?{}",
                    $crate::ledger::payments::COUPON_COLUMNS,
                    $lock
                );
                let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                    .bind(code)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(Err("no such coupon".to_owned()));
                };
                let coupon = $crate::ledger::payments::coupon_from_row(&row)?;
                let held: i64 = sqlx::query($crate::ledger::payments::HELD_USES)
                    .bind(code)
                    .bind(order.account.as_str())
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("held")?;
                if let Err(why) = check(&coupon, held) {
                    return Ok(Err(why));
                }
                $crate::ledger::payments::bind_order!(order)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO coupon_redemptions (order_id, code, account_id, \
                     created_at) VALUES (?, ?, ?, ?)",
                )
                .bind(&order.id)
                .bind(code)
                .bind(order.account.as_str())
                .bind(order.created_at_ms)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE coupons SET uses = uses + 1, updated_at = ? WHERE code = ?")
                    .bind(order.created_at_ms)
                    .bind(code)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(()))
            }

            /// One attempt of [`PaymentStore::update_order`].
            async fn update_order_once(
                &self,
                order_id: &str,
                step: &$crate::billing::store::StepFn<'_>,
            ) -> Result<$crate::billing::store::UpdateOutcome, $crate::ledger::LedgerError> {
                use sqlx::{Row as _, SqlSafeStr as _};
                use $crate::billing::store::UpdateOutcome;
                let mut tx = self.pool.begin_with($begin).await?;
                let sql = format!(
                    "SELECT {} FROM orders WHERE id = ?{}",
                    $crate::ledger::payments::ORDER_COLUMNS,
                    $lock
                );
                let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql).into_sql_str())
                    .bind(order_id)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(UpdateOutcome::NotFound);
                };
                let current = $crate::ledger::payments::order_from_row(&row)?;
                let transition = match step(&current) {
                    Ok(Some(transition)) => transition,
                    Ok(None) => return Ok(UpdateOutcome::Applied(Box::new(current))),
                    Err(deferred) => return Ok(UpdateOutcome::Deferred(deferred)),
                };
                let now = $crate::domain::time::now_ms();
                let mut order = transition.order;
                if let Some(draft) = transition.invoice
                    && current.invoice_id.is_none()
                {
                    sqlx::query($bump)
                        .bind(draft.year)
                        .execute(&mut *tx)
                        .await?;
                    let seq: i64 =
                        sqlx::query("SELECT last_number FROM invoice_counters WHERE year = ?")
                            .bind(draft.year)
                            .fetch_one(&mut *tx)
                            .await?
                            .try_get("last_number")?;
                    let mut invoice = draft.invoice;
                    invoice.id = format!("inv_{}", uuid::Uuid::new_v4().simple());
                    invoice.number = $crate::ledger::payments::invoice_number(draft.year, seq);
                    let document = serde_json::to_string(&invoice).map_err(|e| {
                        $crate::ledger::LedgerError::Corrupt(format!("invoice document: {e}"))
                    })?;
                    sqlx::query($crate::ledger::payments::INSERT_INVOICE.into_sql_str())
                        .bind(&invoice.id)
                        .bind(&invoice.number)
                        .bind(&invoice.order_id)
                        .bind(&invoice.account_id)
                        .bind(now)
                        .bind(document)
                        .execute(&mut *tx)
                        .await?;
                    order.invoice_id = Some(invoice.id);
                }
                sqlx::query($crate::ledger::payments::UPDATE_ORDER.into_sql_str())
                    .bind(order.status.as_str())
                    .bind(order.checkout_id.as_deref())
                    .bind(order.checkout_url.as_deref())
                    .bind(order.provider_order_id.as_deref())
                    .bind(order.payment_ref.as_deref())
                    .bind(order.bonus_credits.micros())
                    .bind(order.paid_amount)
                    .bind(order.refunded_amount)
                    .bind(order.credits_refunded.micros())
                    .bind(order.dispute_id.as_deref())
                    .bind(order.dispute_status.as_deref())
                    .bind(order.dispute_credits.micros())
                    .bind(order.invoice_id.as_deref())
                    .bind(order.buyer_email.as_deref())
                    .bind(order.buyer_name.as_deref())
                    .bind(order.review_reason.as_deref())
                    .bind(order.grant_expires_at_ms)
                    .bind(order.updated_at_ms)
                    .bind(order.paid_at_ms)
                    .bind(order.refunded_at_ms)
                    .bind(order.closed_at_ms)
                    .bind(&order.id)
                    .execute(&mut *tx)
                    .await?;
                for credit in &transition.moves {
                    let inserted =
                        sqlx::query($crate::ledger::payments::INSERT_MOVE.into_sql_str())
                            .bind(&credit.reference)
                            .bind(&credit.order_id)
                            .bind(credit.account.as_str())
                            .bind(credit.entry_type.as_str())
                            .bind(credit.amount.micros())
                            .bind(&credit.description)
                            .bind(credit.expires_at_ms)
                            .bind(now)
                            .execute(&mut *tx)
                            .await;
                    match inserted {
                        // Written before under the same reference: the same move, kept once.
                        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {}
                        Err(error) => return Err(error.into()),
                        Ok(_) => {}
                    }
                }
                if transition.release_coupon
                    && let Some(code) = order.coupon_code.as_deref()
                {
                    let released = sqlx::query(
                        "UPDATE coupon_redemptions SET released_at = ? \
                         WHERE order_id = ? AND released_at IS NULL",
                    )
                    .bind(now)
                    .bind(&order.id)
                    .execute(&mut *tx)
                    .await?;
                    if released.rows_affected() > 0 {
                        sqlx::query(
                            "UPDATE coupons SET uses = uses - 1, updated_at = ? \
                             WHERE code = ? AND uses > 0",
                        )
                        .bind(now)
                        .bind(code)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
                tx.commit().await?;
                Ok(UpdateOutcome::Applied(Box::new(order)))
            }
        }
    };
}

pub(crate) use impl_payment_store;

/// Applied credit moves whose ledger entry is missing or differs.
const UNMATCHED_MOVES: &str = "SELECT m.account_id, m.reference FROM order_credit_moves m \
     LEFT JOIN credit_transactions t ON t.account_id = m.account_id \
     AND t.type = m.entry_type AND t.reference = m.reference \
     WHERE m.applied_at IS NOT NULL AND (t.id IS NULL OR t.amount <> m.amount) \
     ORDER BY m.reference";

/// Orders that were paid but carry no invoice.
const UNINVOICED_ORDERS: &str = "SELECT account_id, id FROM orders WHERE paid_at IS NOT NULL \
     AND status <> 'review' AND invoice_id IS NULL ORDER BY seq";

const INVOICE_NUMBERS: &str = "SELECT number FROM invoices";
const INVOICE_COUNTERS: &str = "SELECT year, last_number FROM invoice_counters";

/// Coupons whose use count differs from the redemptions holding a use.
const COUPON_USES: &str = "SELECT c.code, c.uses, (SELECT COUNT(*) FROM coupon_redemptions r \
     WHERE r.code = c.code AND r.released_at IS NULL) AS held FROM coupons c ORDER BY c.code";

/// The payment checks of [`Ledger::verify`](super::Ledger::verify), inside the caller's read
/// transaction: every applied credit move is in the ledger, every paid order has its invoice,
/// each year's invoice numbers run from 1 to its counter without a gap, and each coupon's use
/// count matches the orders holding it.
pub(crate) async fn verify<DB>(conn: &mut DB::Connection) -> Result<Vec<VerifyProblem>, LedgerError>
where
    DB: sqlx::Database,
    DB::Row: Columns,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let mut problems = Vec::new();
    for row in sqlx::query::<DB>(UNMATCHED_MOVES)
        .fetch_all(&mut *conn)
        .await?
    {
        problems.push(VerifyProblem {
            account: row.text("account_id")?,
            problem: format!(
                "order credit move {} is marked applied but has no matching ledger entry",
                row.text("reference")?
            ),
        });
    }
    for row in sqlx::query::<DB>(UNINVOICED_ORDERS)
        .fetch_all(&mut *conn)
        .await?
    {
        problems.push(VerifyProblem {
            account: row.text("account_id")?,
            problem: format!("order {} was paid but has no invoice", row.text("id")?),
        });
    }
    let mut issued: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for row in sqlx::query::<DB>(INVOICE_NUMBERS)
        .fetch_all(&mut *conn)
        .await?
    {
        let number = row.text("number")?;
        let parsed = number
            .strip_prefix("INV-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(year, seq)| Some((year.parse().ok()?, seq.parse().ok()?)));
        match parsed {
            Some((year, seq)) => issued.entry(year).or_default().push(seq),
            None => problems.push(VerifyProblem {
                account: String::new(),
                problem: format!("invoice number `{number}` is not INV-YYYY-NNNNNN"),
            }),
        }
    }
    for row in sqlx::query::<DB>(INVOICE_COUNTERS)
        .fetch_all(&mut *conn)
        .await?
    {
        let year = row.int("year")?;
        let last = row.int("last_number")?;
        let mut numbers = issued.remove(&year).unwrap_or_default();
        numbers.sort_unstable();
        if !numbers.iter().copied().eq(1..=last) {
            problems.push(VerifyProblem {
                account: String::new(),
                problem: format!(
                    "invoice numbers of {year} are not 1..={last} without gaps ({} issued)",
                    numbers.len()
                ),
            });
        }
    }
    for year in issued.keys() {
        problems.push(VerifyProblem {
            account: String::new(),
            problem: format!("invoices of {year} have no number counter"),
        });
    }
    for row in sqlx::query::<DB>(COUPON_USES).fetch_all(&mut *conn).await? {
        let (uses, held) = (row.int("uses")?, row.int("held")?);
        if uses != held {
            problems.push(VerifyProblem {
                account: String::new(),
                problem: format!(
                    "coupon {} counts {uses} uses but {held} orders hold one",
                    row.text("code")?
                ),
            });
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    #[test]
    fn invoice_numbers_are_zero_padded_per_year() {
        assert_eq!(super::invoice_number(2026, 123), "INV-2026-000123");
        assert_eq!(super::invoice_number(2027, 1), "INV-2027-000001");
    }
}
