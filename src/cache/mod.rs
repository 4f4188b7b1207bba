//! The balance-cache port: cached balances, in-flight holds and not-yet-written settlements.
//!
//! The ledger is the source of truth (docs/architecture.md I5). A cache entry is a snapshot of a ledger
//! balance (with its revision) plus the holds of requests in flight and the settlements that are
//! finished but not yet in the ledger. Holds and pending settlements are keyed by request id, so
//! every operation on them is idempotent. A reservation succeeds only if, atomically,
//! `balance - lapsed - pending - held - amount >= floor` (I1).
//!
//! Expired credits stop counting the moment they lapse (see [`crate::ledger::grants`]): a
//! snapshot is stale once its `next_expiry_ms` has passed, by the caller's clock or by a fence a
//! sweep raised ([`BalanceCache::in_flight`]), and is then reloaded before any reservation or
//! view uses it; the reload sweeps the lapsed grants first, keeping back what the bucket holds
//! or has pending. The `lapsed` part of a snapshot (kept for requests that started before their
//! grant lapsed) is never available.
//!
//! A pending settlement carries its serialized [`Settlement`](crate::ledger::Settlement), so in
//! a shared cache (Redis) a sibling instance can write it to the ledger if its owner dies (I4).

#[cfg(test)]
mod contract;
pub mod local;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::domain::{AccountId, Credits};
use crate::ledger::{Bucket, InFlight, KeepBack, LedgerError, Snapshot};

pub type SharedCache = Arc<dyn BalanceCache>;

/// The cache the config asks for: Redis (shared by every instance) when `redis_url` is set,
/// else the in-process cache. `instance` is this gateway's id, unique per process.
pub async fn open(
    config: &crate::config::CacheConfig,
    instance: &str,
) -> Result<SharedCache, CacheError> {
    match config.redis_url.as_deref().filter(|url| !url.is_empty()) {
        Some(url) => Ok(Arc::new(
            redis::RedisCache::connect(url, &config.key_prefix, instance).await?,
        )),
        None => Ok(Arc::new(local::LocalCache::new())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot load balance: {0}")]
    Load(#[from] LedgerError),
    #[error("balance cache unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The bucket cannot cover the amount; `available` is what it could cover.
    #[error("insufficient credits: available {available}")]
    Insufficient { available: Credits },
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Where the cache loads a bucket's snapshot from on a miss, after an invalidation, or once a
/// grant it counts has lapsed.
#[async_trait]
pub trait SnapshotSource: Send + Sync {
    /// `in_flight` is what the bucket held or had pending when the cache fenced it: an
    /// account's lapsed grants are swept first, keeping that much back
    /// ([`crate::ledger::Ledger::reload`]).
    async fn load(&self, bucket: &Bucket, in_flight: InFlight) -> Result<Snapshot, LedgerError>;
}

/// One request's hold.
#[derive(Debug, Clone)]
pub struct HoldSpec {
    pub request_id: String,
    pub amount: Credits,
    /// The gateway instance serving the request.
    pub owner: String,
    /// Unix ms after which the hold may be released by anyone (the request cannot still run).
    pub deadline_ms: i64,
}

/// A pending settlement left behind by an instance that did not write it in time.
#[derive(Debug, Clone)]
pub struct Orphan {
    pub bucket: Bucket,
    pub request_id: String,
    /// The serialized settlement.
    pub record: String,
}

/// A bucket as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BalanceView {
    /// The ledger balance less settlements not yet written.
    pub balance: Credits,
    /// Reserved by requests in flight.
    pub held: Credits,
    /// `balance - held`, less credits of lapsed grants that are not swept yet (kept for
    /// requests that started before they lapsed).
    pub available: Credits,
}

#[async_trait]
pub trait BalanceCache: Send + Sync + 'static {
    /// Atomically holds `hold.amount` if `available - amount >= floor` (floor is `-overdraft`).
    async fn reserve(
        &self,
        bucket: &Bucket,
        hold: &HoldSpec,
        floor: Credits,
        source: &dyn SnapshotSource,
    ) -> Result<(), ReserveError>;

    /// The request finished: its hold becomes a pending settlement of `cost`, with its journal
    /// `record` when given. A second call for the same request changes nothing.
    async fn settle(
        &self,
        bucket: &Bucket,
        request_id: &str,
        cost: Credits,
        record: Option<&str>,
    ) -> Result<(), CacheError>;

    /// The request is still running: its hold's deadline moves to `deadline_ms`. Returns false
    /// when the hold is gone (expired, or released by a sibling that took this instance for
    /// dead): the request is no longer covered.
    ///
    /// `progress` is the serialized settlement of what the request has delivered so far. A
    /// shared cache keeps it with the hold, and a sibling that reaps the hold (this instance
    /// died) turns it into a pending settlement instead of releasing it.
    async fn renew(
        &self,
        bucket: &Bucket,
        request_id: &str,
        deadline_ms: i64,
        progress: Option<&str>,
    ) -> Result<bool, CacheError>;

    /// The request is abandoned without charge: its hold (if still there) is dropped.
    async fn release(&self, bucket: &Bucket, request_id: &str) -> Result<(), CacheError>;

    /// The request's settlement is in the ledger; `snapshot` is the bucket's balance after it.
    /// Drops the request's pending settlement, and its hold if the settlement never reached the
    /// cache (the ledger's balance carries the charge now).
    async fn committed(
        &self,
        bucket: &Bucket,
        request_id: &str,
        snapshot: Snapshot,
    ) -> Result<(), CacheError>;

    /// The ledger changed the bucket outside the request path (a grant); newer snapshots win.
    async fn apply(&self, bucket: &Bucket, snapshot: Snapshot) -> Result<(), CacheError>;

    /// Someone else changed the ledger: every snapshot must be reloaded before its next use.
    async fn invalidate_all(&self) -> Result<(), CacheError>;

    async fn view(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<BalanceView, CacheError>;

    /// For the expiry sweep, in one atomic step: raises the bucket's fence to `at_ms`, so that
    /// no later reservation or view trusts a snapshot counting a grant lapsed by then as live,
    /// and returns what the bucket holds or has pending (what the sweep keeps back).
    async fn in_flight(&self, bucket: &Bucket, at_ms: i64) -> Result<Credits, CacheError>;

    /// Releases holds whose deadline has passed or whose owner is gone; returns how many.
    async fn reap_holds(&self, now_ms: i64) -> Result<usize, CacheError>;

    /// Pending settlements whose owner is gone or that are older than `older_than_ms`.
    async fn orphans(&self, now_ms: i64, older_than_ms: i64) -> Result<Vec<Orphan>, CacheError>;

    /// Whether a settlement recorded here survives this process being killed: true for a shared
    /// cache whose journal a sibling instance writes to the ledger (see
    /// [`crate::metering::settler`]), false for an in-process cache.
    fn journal_outlives_process(&self) -> bool {
        false
    }

    /// Whether the cache answers (for `/readyz`).
    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }

    /// Ends the cache's own background work (the Redis adapter's heartbeat) and waits for it.
    /// The supervisor calls it last, once nothing settles any more: until then siblings must
    /// count this instance alive. Afterwards the cache still answers, but a shared cache's
    /// siblings treat the instance as gone within [`redis::INSTANCE_DEAD_AFTER_MS`].
    async fn stop(&self) {}
}

/// The expiry sweep's [`KeepBack`]: what the cache holds or has pending per account, fenced.
pub struct InFlightHolds<'a>(pub &'a dyn BalanceCache);

#[async_trait]
impl KeepBack for InFlightHolds<'_> {
    async fn keep_back(&self, account: &AccountId, at_ms: i64) -> Option<Credits> {
        match self
            .0
            .in_flight(&Bucket::Account(account.clone()), at_ms)
            .await
        {
            Ok(amount) => Some(amount),
            Err(error) => {
                tracing::warn!(%error, %account, "cannot read holds; expiry sweep skips the account");
                None
            }
        }
    }
}
