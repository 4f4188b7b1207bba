//! The payments port: orders, their credit moves, processed provider events, coupons,
//! invoices and statements.
//!
//! [`SqlPaymentStore`] implements it on the ledger's database, for both drivers (their
//! differences are a [`PaymentDialect`]). The store never moves credits: an order's credit
//! moves are written here, in the order's transaction, and applied to the ledger afterwards
//! through the ledger's own idempotent grants ([`super::service`]).

mod dialect;
mod rows;
mod sql;
mod transitions;
mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

pub use dialect::PaymentDialect;
pub use sql::SqlPaymentStore;

use super::coupons::Coupon;
use super::invoice::Invoice;
use super::orders::{CreditMove, Deferred, Order, Provider, Step};
use crate::domain::AccountId;
use crate::domain::Credits;
use crate::ledger::{Ledger, LedgerError, Page, VerifyProblem};

pub type SharedPaymentStore = Arc<dyn PaymentStore>;

/// Decides an order's next state from its current one (see [`super::orders`]). May run more
/// than once when the database asks for a transaction to be re-run.
pub type StepFn<'a> = dyn Fn(&Order) -> Step + Send + Sync + 'a;

#[derive(Debug)]
pub enum UpdateOutcome {
    NotFound,
    /// The order after the step (unchanged if the step had nothing to do).
    Applied(Box<Order>),
    /// The step refused; nothing was written.
    Deferred(Deferred),
}

/// Re-checks a coupon under its row lock, given the uses the account already holds; the error
/// says why it no longer applies.
pub type CouponCheck<'a> = dyn Fn(&Coupon, i64) -> Result<(), String> + Send + Sync + 'a;

/// How an event finds its order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderLookup {
    /// Tollgate's order id, from the provider's metadata.
    pub order_id: Option<String>,
    pub provider_order_id: Option<String>,
    pub payment_ref: Option<String>,
    /// The payment may be one whose order is created only when its paid event arrives (a
    /// checkout Tollgate did not start): a refund or dispute that finds no order may then have
    /// overtaken that event, and must wait for it instead of being dismissed as not Tollgate's.
    pub order_may_follow: bool,
}

/// One provider event as recorded (`payment_events`).
#[derive(Debug, Clone, Serialize)]
pub struct EventRecord {
    pub provider: Provider,
    pub event_id: String,
    pub event_type: String,
    /// `processed`, `ignored` or `review`.
    pub outcome: String,
    pub order_id: Option<String>,
    pub detail: String,
    /// The raw body, kept for events an admin must look at.
    pub payload: Option<String>,
    pub received_at_ms: i64,
    #[serde(skip)]
    pub cursor: i64,
}

#[async_trait]
pub trait PaymentStore: Send + Sync {
    async fn insert_order(&self, order: &Order) -> Result<(), LedgerError>;

    async fn order(&self, id: &str) -> Result<Option<Order>, LedgerError>;

    /// Finds an order by Tollgate id, else by the provider's payment id, else by its payment
    /// reference.
    async fn find_order(
        &self,
        provider: Provider,
        lookup: &OrderLookup,
    ) -> Result<Option<Order>, LedgerError>;

    /// The account's orders, newest first, each with its paging cursor.
    async fn orders(
        &self,
        account: &AccountId,
        page: Page,
    ) -> Result<Vec<(i64, Order)>, LedgerError>;

    /// Locks the order, runs `step` on it and writes the transition it returns — the order,
    /// its credit moves (once per reference) and its invoice (numbered gap-free per year) — in
    /// one transaction.
    async fn update_order(
        &self,
        order_id: &str,
        step: &StepFn<'_>,
    ) -> Result<UpdateOutcome, LedgerError>;

    /// Moves not yet applied to the ledger: of one order, or of any order (oldest first).
    async fn pending_moves(
        &self,
        order_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<CreditMove>, LedgerError>;

    async fn mark_move_applied(&self, reference: &str, now_ms: i64) -> Result<(), LedgerError>;

    /// Whether this provider event was processed before.
    async fn event_seen(&self, provider: Provider, event_id: &str) -> Result<bool, LedgerError>;

    /// Records a processed event; false if it was recorded before (by a concurrent delivery).
    async fn record_event(&self, event: &EventRecord) -> Result<bool, LedgerError>;

    /// Recorded events, newest first; only those with `outcome` if given.
    async fn events(
        &self,
        outcome: Option<&str>,
        page: Page,
    ) -> Result<Vec<EventRecord>, LedgerError>;

    async fn invoice(&self, id: &str) -> Result<Option<Invoice>, LedgerError>;

    /// Writes `order` holding one use of its coupon: under the coupon's row lock, `check` sees
    /// the current uses, then the use is counted. `Ok(Err(why))` writes nothing.
    async fn insert_order_with_coupon(
        &self,
        order: &Order,
        check: &CouponCheck<'_>,
    ) -> Result<Result<(), String>, LedgerError>;

    /// False if the code exists already.
    async fn create_coupon(&self, coupon: &Coupon) -> Result<bool, LedgerError>;

    async fn coupon(&self, code: &str) -> Result<Option<Coupon>, LedgerError>;

    async fn coupons(&self) -> Result<Vec<Coupon>, LedgerError>;

    /// Turns a coupon on or off; false if there is no such code.
    async fn set_coupon_active(
        &self,
        code: &str,
        active: bool,
        now_ms: i64,
    ) -> Result<bool, LedgerError>;

    /// The account's usage between `from_ms` (inclusive) and `to_ms`, summed per model.
    async fn usage_by_model(
        &self,
        account: &AccountId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<super::statements::ModelUsage>, LedgerError>;

    /// Stores (or replaces) the account's statement of its month.
    async fn save_statement(
        &self,
        statement: &super::statements::Statement,
        now_ms: i64,
    ) -> Result<(), LedgerError>;

    /// The account's statements, newest month first.
    async fn statements(
        &self,
        account: &AccountId,
    ) -> Result<Vec<super::statements::Statement>, LedgerError>;

    /// Uses of `code` the account holds (orders not failed or expired).
    async fn coupon_uses_by(&self, code: &str, account: &AccountId) -> Result<i64, LedgerError>;

    /// The payment books' own problems: an applied credit move missing from the ledger, a paid
    /// order without its invoice, a gap in a year's invoice numbers, a coupon whose use count
    /// differs from the orders holding it.
    async fn verify(&self) -> Result<Vec<VerifyProblem>, LedgerError>;
}

/// Every problem in the books: the ledger's own (see [`Ledger::verify`]) and the payments'.
pub async fn verify_books(
    ledger: &dyn Ledger,
    payments: &dyn PaymentStore,
    overdraft: Credits,
) -> Result<Vec<VerifyProblem>, LedgerError> {
    let mut problems = ledger.verify(overdraft).await?;
    problems.extend(payments.verify().await?);
    Ok(problems)
}
