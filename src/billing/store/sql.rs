//! [`SqlPaymentStore`]: the payments port on the ledger's database, one implementation for
//! both drivers. The SQL is the same on both; what differs (starting a write transaction,
//! locking a row, two upserts, which failures re-run a transaction) is the driver's
//! [`PaymentDialect`]. The transactions that lock and write several tables are in
//! [`super::transitions`]; the payment books' checks in [`super::verify`].

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Encode, Executor, Pool, SqlSafeStr as _, Type};

use super::dialect::PaymentDialect;
use super::rows;
use super::{CouponCheck, EventRecord, OrderLookup, PaymentStore, StepFn, UpdateOutcome};
use crate::billing::coupons::Coupon;
use crate::billing::invoice::Invoice;
use crate::billing::orders::{CreditMove, Order, Provider};
use crate::billing::statements;
use crate::domain::{AccountId, Credits};
use crate::ledger::{Columns as _, LedgerError, Page, VerifyProblem};

/// Orders, payment events, coupons, invoices and statements, in the tables the ledger's
/// migrations create beside its own. Cheap to clone (the pool is shared).
pub struct SqlPaymentStore<DB: sqlx::Database> {
    pub(super) pool: Pool<DB>,
}

impl<DB: sqlx::Database> SqlPaymentStore<DB> {
    pub fn new(pool: Pool<DB>) -> Self {
        SqlPaymentStore { pool }
    }
}

#[async_trait]
impl<DB> PaymentStore for SqlPaymentStore<DB>
where
    DB: PaymentDialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    Option<i64>: for<'q> Encode<'q, DB> + Type<DB>,
{
    async fn insert_order(&self, order: &Order) -> Result<(), LedgerError> {
        Self::bind_order(order).execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_order_with_coupon(
        &self,
        order: &Order,
        check: &CouponCheck<'_>,
    ) -> Result<Result<(), String>, LedgerError> {
        DB::rerun("insert_order_with_coupon", || {
            self.insert_order_with_coupon_once(order, check)
        })
        .await
    }

    async fn create_coupon(&self, coupon: &Coupon) -> Result<bool, LedgerError> {
        let inserted = sqlx::query::<DB>(rows::INSERT_COUPON.into_sql_str())
            .bind(coupon.code.as_str())
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

    async fn coupon(&self, code: &str) -> Result<Option<Coupon>, LedgerError> {
        let sql = format!(
            "SELECT {} FROM coupons WHERE code = ?",
            rows::COUPON_COLUMNS
        );
        sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
            .bind(code)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::coupon_from_row(&row))
            .transpose()
    }

    async fn coupons(&self) -> Result<Vec<Coupon>, LedgerError> {
        let sql = format!("SELECT {} FROM coupons ORDER BY code", rows::COUPON_COLUMNS);
        sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::coupon_from_row)
            .collect()
    }

    async fn set_coupon_active(
        &self,
        code: &str,
        active: bool,
        now_ms: i64,
    ) -> Result<bool, LedgerError> {
        let result =
            sqlx::query::<DB>("UPDATE coupons SET active = ?, updated_at = ? WHERE code = ?")
                .bind(i64::from(active))
                .bind(now_ms)
                .bind(code)
                .execute(&self.pool)
                .await?;
        Ok(DB::rows_affected(&result) > 0)
    }

    async fn usage_by_model(
        &self,
        account: &AccountId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<statements::ModelUsage>, LedgerError> {
        // Sums are cast back to BIGINT: MySQL sums BIGINTs as DECIMAL.
        let rows = sqlx::query::<DB>(
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
                Ok(statements::ModelUsage {
                    model: row.text("model")?,
                    requests: row.int("requests")?,
                    prompt_tokens: row.int("prompt_tokens")?,
                    completion_tokens: row.int("completion_tokens")?,
                    cost: Credits::from_micros(row.int("cost")?),
                })
            })
            .collect()
    }

    async fn save_statement(
        &self,
        statement: &statements::Statement,
        now_ms: i64,
    ) -> Result<(), LedgerError> {
        let document = serde_json::to_string(statement)
            .map_err(|e| LedgerError::Corrupt(format!("statement document: {e}")))?;
        sqlx::query::<DB>(DB::UPSERT_STATEMENT)
            .bind(statement.account_id.as_str())
            .bind(statement.billing_month.as_str())
            .bind(document.as_str())
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn statements(
        &self,
        account: &AccountId,
    ) -> Result<Vec<statements::Statement>, LedgerError> {
        sqlx::query::<DB>(
            "SELECT document FROM usage_statements WHERE account_id = ? \
             ORDER BY billing_month DESC",
        )
        .bind(account.as_str())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let document = row.text("document")?;
            serde_json::from_str(&document)
                .map_err(|e| LedgerError::Corrupt(format!("statement document: {e}")))
        })
        .collect()
    }

    async fn coupon_uses_by(&self, code: &str, account: &AccountId) -> Result<i64, LedgerError> {
        let held: i64 = sqlx::query::<DB>(rows::HELD_USES)
            .bind(code)
            .bind(account.as_str())
            .fetch_one(&self.pool)
            .await?
            .int("held")?;
        Ok(held)
    }

    async fn order(&self, id: &str) -> Result<Option<Order>, LedgerError> {
        let sql = format!("SELECT {} FROM orders WHERE id = ?", rows::ORDER_COLUMNS);
        sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| rows::order_from_row(&row))
            .transpose()
    }

    async fn find_order(
        &self,
        provider: Provider,
        lookup: &OrderLookup,
    ) -> Result<Option<Order>, LedgerError> {
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
                rows::ORDER_COLUMNS
            );
            let row = sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
                .bind(provider.as_str())
                .bind(value.as_str())
                .fetch_optional(&self.pool)
                .await?;
            if let Some(row) = row {
                return rows::order_from_row(&row).map(Some);
            }
        }
        Ok(None)
    }

    async fn orders(
        &self,
        account: &AccountId,
        page: Page,
    ) -> Result<Vec<(i64, Order)>, LedgerError> {
        let sql = format!(
            "SELECT {} FROM orders WHERE account_id = ? AND seq < ? \
             ORDER BY seq DESC LIMIT ?",
            rows::ORDER_COLUMNS
        );
        let rows = sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
            .bind(account.as_str())
            .bind(page.before.unwrap_or(i64::MAX))
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let cursor = row.int("seq")?;
                Ok((cursor, rows::order_from_row(row)?))
            })
            .collect()
    }

    async fn update_order(
        &self,
        order_id: &str,
        step: &StepFn<'_>,
    ) -> Result<UpdateOutcome, LedgerError> {
        DB::rerun("update_order", || self.update_order_once(order_id, step)).await
    }

    async fn pending_moves(
        &self,
        order_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CreditMove>, LedgerError> {
        let filter = if order_id.is_some() {
            "AND order_id = ?"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {} FROM order_credit_moves WHERE applied_at IS NULL {filter} \
             ORDER BY created_at, reference LIMIT ?",
            rows::MOVE_COLUMNS
        );
        let mut query = sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str());
        if let Some(id) = order_id {
            query = query.bind(id);
        }
        query
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::move_from_row)
            .collect()
    }

    async fn mark_move_applied(&self, reference: &str, now_ms: i64) -> Result<(), LedgerError> {
        sqlx::query::<DB>(
            "UPDATE order_credit_moves SET applied_at = ? \
             WHERE reference = ? AND applied_at IS NULL",
        )
        .bind(now_ms)
        .bind(reference)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn event_seen(&self, provider: Provider, event_id: &str) -> Result<bool, LedgerError> {
        let row = sqlx::query::<DB>(
            "SELECT 1 AS seen FROM payment_events WHERE provider = ? AND event_id = ?",
        )
        .bind(provider.as_str())
        .bind(event_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    async fn record_event(&self, event: &EventRecord) -> Result<bool, LedgerError> {
        let inserted = sqlx::query::<DB>(rows::INSERT_EVENT.into_sql_str())
            .bind(event.provider.as_str())
            .bind(event.event_id.as_str())
            .bind(event.event_type.as_str())
            .bind(event.outcome.as_str())
            .bind(event.order_id.as_deref())
            .bind(event.detail.as_str())
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
        page: Page,
    ) -> Result<Vec<EventRecord>, LedgerError> {
        let filter = if outcome.is_some() {
            "AND outcome = ?"
        } else {
            ""
        };
        let sql = format!(
            "SELECT {} FROM payment_events WHERE seq < ? {filter} \
             ORDER BY seq DESC LIMIT ?",
            rows::EVENT_COLUMNS
        );
        let mut query = sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
            .bind(page.before.unwrap_or(i64::MAX));
        if let Some(outcome) = outcome {
            query = query.bind(outcome);
        }
        query
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(rows::event_from_row)
            .collect()
    }

    async fn invoice(&self, id: &str) -> Result<Option<Invoice>, LedgerError> {
        sqlx::query::<DB>("SELECT document FROM invoices WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| {
                let document = row.text("document")?;
                rows::invoice_from_json(&document)
            })
            .transpose()
    }

    async fn verify(&self) -> Result<Vec<VerifyProblem>, LedgerError> {
        let mut tx = DB::read_snapshot(&self.pool).await?;
        let problems = super::verify::problems::<DB>(&mut *tx).await?;
        tx.rollback().await?;
        Ok(problems)
    }
}
