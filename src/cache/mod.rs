//! The balance-cache port: cached balances, in-flight holds and not-yet-committed settlements.
//!
//! The ledger is the source of truth (DESIGN.md I5); a cache entry is a snapshot of a ledger
//! balance (with its revision) plus what this gateway has reserved (`held`) and settled but not
//! yet written (`pending`). A reservation succeeds only if, atomically,
//! `balance - pending - held - amount >= -overdraft` (I1).

pub mod local;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::domain::Credits;
use crate::ledger::{Bucket, LedgerError, Snapshot};

pub type SharedCache = Arc<dyn BalanceCache>;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot load balance: {0}")]
    Load(#[from] LedgerError),
}

#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The bucket cannot cover the amount; `available` is what it could cover.
    #[error("insufficient credits: available {available}")]
    Insufficient { available: Credits },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Where the cache loads a bucket's snapshot from on a miss or after an invalidation.
#[async_trait]
pub trait SnapshotSource: Send + Sync {
    async fn load(&self, bucket: &Bucket) -> Result<Snapshot, LedgerError>;
}

/// A bucket as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BalanceView {
    /// The ledger balance less settlements not yet written.
    pub balance: Credits,
    /// Reserved by requests in flight.
    pub held: Credits,
    /// `balance - held`.
    pub available: Credits,
}

#[async_trait]
pub trait BalanceCache: Send + Sync + 'static {
    /// Atomically holds `amount` if `available - amount >= floor` (floor is `-overdraft`).
    async fn reserve(
        &self,
        bucket: &Bucket,
        amount: Credits,
        floor: Credits,
        source: &dyn SnapshotSource,
    ) -> Result<(), ReserveError>;

    /// The request finished: its hold becomes a pending settlement of `cost`.
    async fn settle(&self, bucket: &Bucket, hold: Credits, cost: Credits);

    /// The request is abandoned without charge: its hold is dropped.
    async fn release(&self, bucket: &Bucket, hold: Credits);

    /// A settlement of `cost` was written; `snapshot` is the bucket's balance after it.
    async fn committed(&self, bucket: &Bucket, cost: Credits, snapshot: Snapshot);

    /// The ledger changed the bucket outside the request path (a grant); newer snapshots win.
    async fn apply(&self, bucket: &Bucket, snapshot: Snapshot);

    /// Someone else changed the ledger: every snapshot must be reloaded before its next use.
    async fn invalidate_all(&self);

    async fn view(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<BalanceView, CacheError>;
}
