//! In-process balance cache (the embedded default): one `DashMap` entry per bucket, updated
//! under the entry's shard lock so check-and-hold is a single atomic step (docs/architecture.md I1).
//!
//! Ledger loads happen outside the lock; snapshots carry the ledger's revision so a slow load
//! can never overwrite a newer balance. Holds and pending settlements die with the process, so
//! there is no owner to track here.
//!
//! A reservation reads the clock under the entry's lock and compares it (and the entry's fence)
//! with the snapshot's next expiry there: the expiry sweep raises the fence under the same lock
//! when it reads what to keep back, so a hold is either in that figure or taken against a
//! snapshot that no longer counts the lapsed grant (see [`crate::ledger::grants`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;

use super::{
    BalanceCache, BalanceView, CacheError, HoldSpec, Orphan, ReserveError, SnapshotSource,
};
use crate::domain::Credits;
use crate::domain::time::now_ms;
use crate::ledger::{Bucket, InFlight, LedgerError, Snapshot};

/// Loads per reservation before giving up (each retry only follows a grant lapsing, or a sweep's
/// fence, between a load and the reservation).
const MAX_LOADS: usize = 3;

#[derive(Debug, Clone)]
struct Pending {
    cost: i128,
    record: Option<String>,
    since_ms: i64,
}

#[derive(Debug, Clone)]
struct Entry {
    snapshot: Snapshot,
    /// Holds of requests in flight: request id → (micro-credits, deadline).
    holds: HashMap<String, (i128, i64)>,
    held: i128,
    /// Settled by this process, not yet in the ledger: request id → cost and record.
    pending: HashMap<String, Pending>,
    pending_total: i128,
    /// The invalidation generation this snapshot was loaded in; older means stale.
    generation: u64,
    /// The latest cutoff (Unix ms) of an expiry sweep that read this bucket's holds: grants
    /// lapsed by then may be swept, so a snapshot counting one as live is stale.
    fence: i64,
}

impl Entry {
    fn new(snapshot: Snapshot, generation: u64) -> Self {
        Entry {
            snapshot,
            holds: HashMap::new(),
            held: 0,
            pending: HashMap::new(),
            pending_total: 0,
            generation,
            fence: 0,
        }
    }

    fn balance(&self) -> i128 {
        i128::from(self.snapshot.balance.micros()) - self.pending_total
    }

    fn available(&self) -> i128 {
        self.balance() - self.held - i128::from(self.snapshot.lapsed.micros())
    }

    /// Whether every grant the snapshot counts as live still is, at `now_ms` and at the fence.
    fn unexpired(&self, now_ms: i64) -> bool {
        self.snapshot
            .next_expiry_ms
            .is_none_or(|at| now_ms.max(self.fence) < at)
    }

    /// Raises the fence to `at_ms` and returns what is held or pending (see
    /// [`BalanceCache::in_flight`]).
    fn fence(&mut self, at_ms: i64) -> Credits {
        self.fence = self.fence.max(at_ms);
        Credits::saturating_from_micros(self.held + self.pending_total)
    }

    fn absorb(&mut self, snapshot: Snapshot) {
        if snapshot.rev > self.snapshot.rev {
            self.snapshot = snapshot;
        }
    }

    fn drop_hold(&mut self, request_id: &str) {
        if let Some((amount, _)) = self.holds.remove(request_id) {
            self.held -= amount;
        }
    }
}

fn vanished() -> CacheError {
    CacheError::Load(LedgerError::Corrupt("cache entry vanished".into()))
}

#[derive(Default)]
pub struct LocalCache {
    entries: DashMap<Bucket, Entry>,
    generation: AtomicU64,
}

impl LocalCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure the bucket has a fresh snapshot, loading it from the ledger if not (missing,
    /// invalidated, or counting a grant that has lapsed since).
    async fn refresh(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<(), CacheError> {
        let generation = self.generation.load(Ordering::Acquire);
        let now = now_ms();
        let fresh = self
            .entries
            .get(bucket)
            .is_some_and(|entry| entry.generation >= generation && entry.unexpired(now));
        if fresh {
            return Ok(());
        }
        // The reload sweeps what lapsed by `now`, keeping back what is in flight here.
        let amount = match self.entries.get_mut(bucket) {
            Some(mut entry) => entry.fence(now),
            None => Credits::ZERO,
        };
        let snapshot = source.load(bucket, InFlight { at_ms: now, amount }).await?;
        self.entries
            .entry(bucket.clone())
            .and_modify(|entry| {
                // A load is fresh as of its start, so an equal revision is current too.
                if snapshot.rev >= entry.snapshot.rev {
                    entry.snapshot = snapshot;
                }
                entry.generation = entry.generation.max(generation);
            })
            .or_insert_with(|| Entry::new(snapshot, generation));
        Ok(())
    }
}

#[async_trait]
impl BalanceCache for LocalCache {
    async fn reserve(
        &self,
        bucket: &Bucket,
        hold: &HoldSpec,
        floor: Credits,
        source: &dyn SnapshotSource,
    ) -> Result<(), ReserveError> {
        for _ in 0..=MAX_LOADS {
            self.refresh(bucket, source).await?;
            let mut entry = self.entries.get_mut(bucket).ok_or_else(vanished)?;
            if entry.holds.contains_key(&hold.request_id) {
                return Ok(());
            }
            // Again under the lock, on a clock read under it (see the module docs).
            if !entry.unexpired(now_ms()) {
                continue;
            }
            let amount = i128::from(hold.amount.micros());
            let available = entry.available();
            if available - amount < i128::from(floor.micros()) {
                return Err(ReserveError::Insufficient {
                    available: Credits::saturating_from_micros(available),
                });
            }
            entry
                .holds
                .insert(hold.request_id.clone(), (amount, hold.deadline_ms));
            entry.held += amount;
            return Ok(());
        }
        Err(CacheError::Unavailable("the balance kept lapsing after every load".into()).into())
    }

    async fn settle(
        &self,
        bucket: &Bucket,
        request_id: &str,
        cost: Credits,
        record: Option<&str>,
    ) -> Result<(), CacheError> {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            entry.drop_hold(request_id);
            if !entry.pending.contains_key(request_id) {
                let cost = i128::from(cost.micros());
                entry.pending.insert(
                    request_id.to_owned(),
                    Pending {
                        cost,
                        record: record.map(str::to_owned),
                        since_ms: now_ms(),
                    },
                );
                entry.pending_total += cost;
            }
        }
        Ok(())
    }

    async fn renew(
        &self,
        bucket: &Bucket,
        request_id: &str,
        deadline_ms: i64,
        _progress: Option<&str>,
    ) -> Result<bool, CacheError> {
        // No sibling could write a progress record of this process's requests.
        let Some(mut entry) = self.entries.get_mut(bucket) else {
            return Ok(false);
        };
        Ok(match entry.holds.get_mut(request_id) {
            Some((_, deadline)) => {
                *deadline = deadline_ms;
                true
            }
            None => false,
        })
    }

    async fn release(&self, bucket: &Bucket, request_id: &str) -> Result<(), CacheError> {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            entry.drop_hold(request_id);
        }
        Ok(())
    }

    async fn committed(
        &self,
        bucket: &Bucket,
        request_id: &str,
        snapshot: Snapshot,
    ) -> Result<(), CacheError> {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            if let Some(pending) = entry.pending.remove(request_id) {
                entry.pending_total -= pending.cost;
            }
            // Left only if the settlement never reached the cache; the ledger has it now.
            if let Some((amount, _)) = entry.holds.remove(request_id) {
                entry.held -= amount;
            }
            entry.absorb(snapshot);
        }
        Ok(())
    }

    async fn apply(&self, bucket: &Bucket, snapshot: Snapshot) -> Result<(), CacheError> {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            entry.absorb(snapshot);
        }
        Ok(())
    }

    async fn invalidate_all(&self) -> Result<(), CacheError> {
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    async fn view(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<BalanceView, CacheError> {
        self.refresh(bucket, source).await?;
        let entry = self.entries.get(bucket).ok_or_else(vanished)?;
        Ok(BalanceView {
            balance: Credits::saturating_from_micros(entry.balance()),
            held: Credits::saturating_from_micros(entry.held),
            available: Credits::saturating_from_micros(entry.available()),
        })
    }

    async fn in_flight(&self, bucket: &Bucket, at_ms: i64) -> Result<Credits, CacheError> {
        // No entry: nothing is held here, and a reservation must load (and sweep) first.
        Ok(self
            .entries
            .get_mut(bucket)
            .map_or(Credits::ZERO, |mut entry| entry.fence(at_ms)))
    }

    async fn reap_holds(&self, now_ms: i64) -> Result<usize, CacheError> {
        let mut reaped = 0;
        for mut entry in self.entries.iter_mut() {
            let expired: Vec<String> = entry
                .holds
                .iter()
                .filter(|(_, (_, deadline))| *deadline < now_ms)
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                entry.drop_hold(&id);
                reaped += 1;
            }
        }
        Ok(reaped)
    }

    async fn orphans(&self, now_ms: i64, older_than_ms: i64) -> Result<Vec<Orphan>, CacheError> {
        let mut orphans = Vec::new();
        for entry in self.entries.iter() {
            for (request_id, pending) in &entry.pending {
                if let Some(record) = &pending.record
                    && now_ms - pending.since_ms > older_than_ms
                {
                    orphans.push(Orphan {
                        bucket: entry.key().clone(),
                        request_id: request_id.clone(),
                        record: record.clone(),
                    });
                }
            }
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::contract::{self, *};
    use crate::test_support::time_limit::limited;

    #[tokio::test]
    async fn concurrent_reservations_never_exceed_the_balance() {
        limited(contract::concurrent_reservations_never_exceed_the_balance(
            Arc::new(LocalCache::new()),
        ))
        .await;
    }

    #[tokio::test]
    async fn settle_commit_and_release_are_idempotent_per_request() {
        limited(contract::settle_commit_and_release_are_idempotent_per_request(&LocalCache::new()))
            .await;
    }

    #[tokio::test]
    async fn overdraft_floor_allows_going_negative_that_far() {
        limited(contract::overdraft_floor_allows_going_negative_that_far(
            &LocalCache::new(),
        ))
        .await;
    }

    #[tokio::test]
    async fn invalidation_reloads_external_changes() {
        let cache = LocalCache::new();
        limited(contract::invalidation_reloads_external_changes(
            &cache, &cache,
        ))
        .await;
    }

    #[tokio::test]
    async fn expired_holds_are_reaped_and_old_pending_settlements_reported() {
        limited(async move {
            let cache = LocalCache::new();
            let source = FixedSource::new(credits(10));
            let mut short = hold("short", credits(2));
            short.deadline_ms = 1_000;
            cache
                .reserve(&bucket(), &short, Credits::ZERO, &source)
                .await
                .expect("fits");
            cache
                .reserve(&bucket(), &hold("long", credits(3)), Credits::ZERO, &source)
                .await
                .expect("fits");
            assert_eq!(cache.reap_holds(2_000).await.expect("reap"), 1);
            assert_eq!(
                cache.view(&bucket(), &source).await.expect("view").held,
                credits(3)
            );
            cache
                .settle(&bucket(), "long", credits(1), Some("record"))
                .await
                .expect("settle");
            assert!(
                cache
                    .orphans(now_ms(), 60_000)
                    .await
                    .expect("orphans")
                    .is_empty()
            );
            let orphans = cache
                .orphans(now_ms() + 120_000, 60_000)
                .await
                .expect("orphans");
            assert_eq!(orphans.len(), 1);
            assert_eq!(
                (orphans[0].request_id.as_str(), orphans[0].record.as_str()),
                ("long", "record")
            );
        })
        .await;
    }

    #[tokio::test]
    async fn a_snapshot_counting_a_lapsed_grant_is_reloaded_and_lapsed_credits_are_unavailable() {
        limited(contract::a_snapshot_counting_a_lapsed_grant_is_reloaded_and_lapsed_credits_are_unavailable(&LocalCache::new())).await;
    }

    #[tokio::test]
    async fn a_sweeps_fence_makes_later_reservations_reload_keeping_what_is_in_flight() {
        limited(
            contract::a_sweeps_fence_makes_later_reservations_reload_keeping_what_is_in_flight(
                &LocalCache::new(),
            ),
        )
        .await;
    }
}
