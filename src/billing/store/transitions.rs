//! The payments store's locking transactions: an order's transition (with its credit moves,
//! invoice and coupon release) and an order written holding a coupon use.

use sqlx::query::Query;
use sqlx::{AssertSqlSafe, Encode, Executor, SqlSafeStr as _, Type};

use super::dialect::PaymentDialect;
use super::rows;
use super::sql::SqlPaymentStore;
use super::{CouponCheck, StepFn, UpdateOutcome};
use crate::billing::orders::Order;
use crate::domain::time::now_ms;
use crate::ledger::{Columns as _, LedgerError};

impl<DB> SqlPaymentStore<DB>
where
    DB: PaymentDialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    Option<i64>: for<'q> Encode<'q, DB> + Type<DB>,
{
    /// [`rows::INSERT_ORDER`] with every column of `order` bound.
    pub(super) fn bind_order(order: &Order) -> Query<'static, DB, DB::Arguments> {
        sqlx::query::<DB>(rows::INSERT_ORDER)
            .bind(order.id.as_str())
            .bind(order.account.as_str())
            .bind(order.package_id.as_str())
            .bind(order.description.as_str())
            .bind(order.provider.as_str())
            .bind(order.status.as_str())
            .bind(order.checkout_id.as_deref())
            .bind(order.checkout_url.as_deref())
            .bind(order.provider_order_id.as_deref())
            .bind(order.payment_ref.as_deref())
            .bind(order.credits.micros())
            .bind(order.bonus_credits.micros())
            .bind(order.validity_days.map(i64::from))
            .bind(order.currency.as_str())
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
    }

    /// One attempt of [`PaymentStore::insert_order_with_coupon`].
    pub(super) async fn insert_order_with_coupon_once(
        &self,
        order: &Order,
        check: &CouponCheck<'_>,
    ) -> Result<Result<(), String>, LedgerError> {
        let Some(code) = order.coupon_code.as_deref() else {
            return Err(LedgerError::Corrupt(
                "an order without a coupon written as holding one".into(),
            ));
        };
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        let sql = format!(
            "SELECT {} FROM coupons WHERE code = ?{}",
            rows::COUPON_COLUMNS,
            DB::LOCK
        );
        let Some(row) = sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
            .bind(code)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Err("no such coupon".to_owned()));
        };
        let coupon = rows::coupon_from_row(&row)?;
        let held: i64 = sqlx::query::<DB>(rows::HELD_USES)
            .bind(code)
            .bind(order.account.as_str())
            .fetch_one(&mut *tx)
            .await?
            .int("held")?;
        if let Err(why) = check(&coupon, held) {
            return Ok(Err(why));
        }
        Self::bind_order(order).execute(&mut *tx).await?;
        sqlx::query::<DB>(
            "INSERT INTO coupon_redemptions (order_id, code, account_id, \
             created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(order.id.as_str())
        .bind(code)
        .bind(order.account.as_str())
        .bind(order.created_at_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query::<DB>("UPDATE coupons SET uses = uses + 1, updated_at = ? WHERE code = ?")
            .bind(order.created_at_ms)
            .bind(code)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    /// One attempt of [`PaymentStore::update_order`].
    pub(super) async fn update_order_once(
        &self,
        order_id: &str,
        step: &StepFn<'_>,
    ) -> Result<UpdateOutcome, LedgerError> {
        let mut tx = self.pool.begin_with(DB::BEGIN_WRITE).await?;
        let sql = format!(
            "SELECT {} FROM orders WHERE id = ?{}",
            rows::ORDER_COLUMNS,
            DB::LOCK
        );
        let Some(row) = sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str())
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(UpdateOutcome::NotFound);
        };
        let current = rows::order_from_row(&row)?;
        let transition = match step(&current) {
            Ok(Some(transition)) => transition,
            Ok(None) => return Ok(UpdateOutcome::Applied(Box::new(current))),
            Err(deferred) => return Ok(UpdateOutcome::Deferred(deferred)),
        };
        let now = now_ms();
        let mut order = transition.order;
        if let Some(draft) = transition.invoice
            && current.invoice_id.is_none()
        {
            sqlx::query::<DB>(DB::BUMP_INVOICE_COUNTER)
                .bind(i64::from(draft.year))
                .execute(&mut *tx)
                .await?;
            let seq: i64 =
                sqlx::query::<DB>("SELECT last_number FROM invoice_counters WHERE year = ?")
                    .bind(i64::from(draft.year))
                    .fetch_one(&mut *tx)
                    .await?
                    .int("last_number")?;
            let mut invoice = draft.invoice;
            invoice.id = format!("inv_{}", uuid::Uuid::new_v4().simple());
            invoice.number = rows::invoice_number(draft.year, seq);
            let document = serde_json::to_string(&invoice)
                .map_err(|e| LedgerError::Corrupt(format!("invoice document: {e}")))?;
            sqlx::query::<DB>(rows::INSERT_INVOICE.into_sql_str())
                .bind(invoice.id.as_str())
                .bind(invoice.number.as_str())
                .bind(invoice.order_id.as_str())
                .bind(invoice.account_id.as_str())
                .bind(now)
                .bind(document.as_str())
                .execute(&mut *tx)
                .await?;
            order.invoice_id = Some(invoice.id);
        }
        sqlx::query::<DB>(rows::UPDATE_ORDER.into_sql_str())
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
            .bind(order.id.as_str())
            .execute(&mut *tx)
            .await?;
        for credit in &transition.moves {
            let inserted = sqlx::query::<DB>(rows::INSERT_MOVE.into_sql_str())
                .bind(credit.reference.as_str())
                .bind(credit.order_id.as_str())
                .bind(credit.account.as_str())
                .bind(credit.entry_type.as_str())
                .bind(credit.amount.micros())
                .bind(credit.description.as_str())
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
            let released = sqlx::query::<DB>(
                "UPDATE coupon_redemptions SET released_at = ? \
                 WHERE order_id = ? AND released_at IS NULL",
            )
            .bind(now)
            .bind(order.id.as_str())
            .execute(&mut *tx)
            .await?;
            if DB::rows_affected(&released) > 0 {
                sqlx::query::<DB>(
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
