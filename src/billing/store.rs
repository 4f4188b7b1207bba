//! The payments port: orders, their credit moves, processed provider events and invoices.
//!
//! Implemented by both ledger adapters on the ledger's own database (`src/ledger/payments.rs`),
//! reached through [`Ledger::payments`](crate::ledger::Ledger::payments).

use async_trait::async_trait;
use serde::Serialize;

use super::invoice::Invoice;
use super::orders::{CreditMove, Deferred, Order, Provider, Step};
use crate::domain::AccountId;
use crate::ledger::{LedgerError, Page};

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

/// How an event finds its order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderLookup {
    /// Tollgate's order id, from the provider's metadata.
    pub order_id: Option<String>,
    pub provider_order_id: Option<String>,
    pub payment_ref: Option<String>,
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
}
