//! In-process balance cache (the embedded default): one `DashMap` entry per bucket, updated
//! under the entry's shard lock so check-and-hold is a single atomic step (DESIGN.md I1).
//!
//! Ledger loads happen outside the lock; snapshots carry the ledger's revision so a slow load
//! can never overwrite a newer balance.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use dashmap::DashMap;

use super::{BalanceCache, BalanceView, CacheError, ReserveError, SnapshotSource};
use crate::domain::Credits;
use crate::ledger::{Bucket, Snapshot};

#[derive(Debug, Clone, Copy)]
struct Entry {
    snapshot: Snapshot,
    /// Settled by this process, not yet written to the ledger (micro-credits).
    pending: i128,
    /// Reserved by requests in flight (micro-credits).
    held: i128,
    /// The invalidation generation this snapshot was loaded in; older means stale.
    generation: u64,
}

impl Entry {
    fn balance(&self) -> i128 {
        i128::from(self.snapshot.balance.micros()) - self.pending
    }

    fn available(&self) -> i128 {
        self.balance() - self.held
    }

    fn absorb(&mut self, snapshot: Snapshot) {
        if snapshot.rev > self.snapshot.rev {
            self.snapshot = snapshot;
        }
    }
}

fn clamp(micros: i128) -> Credits {
    Credits::from_micros(i64::try_from(micros).unwrap_or(if micros < 0 {
        i64::MIN
    } else {
        i64::MAX
    }))
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

    /// Makes sure the bucket has a fresh snapshot, loading it from the ledger if not.
    async fn refresh(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<(), CacheError> {
        let generation = self.generation.load(Ordering::Acquire);
        let fresh = self
            .entries
            .get(bucket)
            .is_some_and(|entry| entry.generation >= generation);
        if fresh {
            return Ok(());
        }
        let snapshot = source.load(bucket).await?;
        self.entries
            .entry(bucket.clone())
            .and_modify(|entry| {
                // A load is fresh as of its start, so an equal revision is current too.
                if snapshot.rev >= entry.snapshot.rev {
                    entry.snapshot = snapshot;
                }
                entry.generation = entry.generation.max(generation);
            })
            .or_insert(Entry {
                snapshot,
                pending: 0,
                held: 0,
                generation,
            });
        Ok(())
    }
}

#[async_trait]
impl BalanceCache for LocalCache {
    async fn reserve(
        &self,
        bucket: &Bucket,
        amount: Credits,
        floor: Credits,
        source: &dyn SnapshotSource,
    ) -> Result<(), ReserveError> {
        self.refresh(bucket, source).await?;
        let mut entry =
            self.entries
                .get_mut(bucket)
                .ok_or(ReserveError::Cache(CacheError::Load(
                    crate::ledger::LedgerError::Corrupt("cache entry vanished".into()),
                )))?;
        let available = entry.available();
        if available - i128::from(amount.micros()) < i128::from(floor.micros()) {
            return Err(ReserveError::Insufficient {
                available: clamp(available),
            });
        }
        entry.held += i128::from(amount.micros());
        Ok(())
    }

    async fn settle(&self, bucket: &Bucket, hold: Credits, cost: Credits) {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            entry.held -= i128::from(hold.micros());
            entry.pending += i128::from(cost.micros());
        }
    }

    async fn release(&self, bucket: &Bucket, hold: Credits) {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            entry.held -= i128::from(hold.micros());
        }
    }

    async fn committed(&self, bucket: &Bucket, cost: Credits, snapshot: Snapshot) {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            entry.pending -= i128::from(cost.micros());
            entry.absorb(snapshot);
        }
    }

    async fn apply(&self, bucket: &Bucket, snapshot: Snapshot) {
        if let Some(mut entry) = self.entries.get_mut(bucket) {
            entry.absorb(snapshot);
        }
    }

    async fn invalidate_all(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn view(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<BalanceView, CacheError> {
        self.refresh(bucket, source).await?;
        let entry = self
            .entries
            .get(bucket)
            .map(|e| *e)
            .ok_or(CacheError::Load(crate::ledger::LedgerError::Corrupt(
                "cache entry vanished".into(),
            )))?;
        Ok(BalanceView {
            balance: clamp(entry.balance()),
            held: clamp(entry.held),
            available: clamp(entry.available()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicI64;

    use super::*;
    use crate::domain::AccountId;
    use crate::ledger::LedgerError;

    /// A ledger stand-in holding one balance whose revision moves with each change.
    struct FixedSource {
        balance: AtomicI64,
        rev: AtomicI64,
    }

    #[async_trait]
    impl SnapshotSource for FixedSource {
        async fn load(&self, _bucket: &Bucket) -> Result<Snapshot, LedgerError> {
            Ok(Snapshot {
                balance: Credits::from_micros(self.balance.load(Ordering::SeqCst)),
                rev: self.rev.load(Ordering::SeqCst),
            })
        }
    }

    fn bucket() -> Bucket {
        Bucket::Account(AccountId::parse("alice").expect("valid"))
    }

    fn credits(whole: i64) -> Credits {
        Credits::from_whole(whole).expect("small")
    }

    #[tokio::test]
    async fn concurrent_reservations_never_exceed_the_balance() {
        let cache = Arc::new(LocalCache::new());
        let source = Arc::new(FixedSource {
            balance: AtomicI64::new(credits(10).micros()),
            rev: AtomicI64::new(1),
        });
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (cache, source) = (cache.clone(), source.clone());
                tokio::spawn(async move {
                    cache
                        .reserve(&bucket(), credits(1), Credits::ZERO, &*source)
                        .await
                        .is_ok()
                })
            })
            .collect();
        let mut granted = 0;
        for task in tasks {
            granted += usize::from(task.await.expect("task"));
        }
        assert_eq!(granted, 10);
        let view = cache.view(&bucket(), &*source).await.expect("view");
        assert_eq!(view.available, Credits::ZERO);
        assert_eq!(view.held, credits(10));
    }

    #[tokio::test]
    async fn settle_commit_and_release_keep_the_arithmetic() {
        let cache = LocalCache::new();
        let source = FixedSource {
            balance: AtomicI64::new(credits(10).micros()),
            rev: AtomicI64::new(1),
        };
        cache
            .reserve(&bucket(), credits(4), Credits::ZERO, &source)
            .await
            .expect("fits");
        cache
            .reserve(&bucket(), credits(4), Credits::ZERO, &source)
            .await
            .expect("fits");
        let err = cache
            .reserve(&bucket(), credits(4), Credits::ZERO, &source)
            .await
            .expect_err("too much");
        assert!(matches!(err, ReserveError::Insufficient { available } if available == credits(2)));
        // One request costs 3 of its 4; the other is released.
        cache.settle(&bucket(), credits(4), credits(3)).await;
        cache.release(&bucket(), credits(4)).await;
        let view = cache.view(&bucket(), &source).await.expect("view");
        assert_eq!(
            (view.balance, view.held, view.available),
            (credits(7), Credits::ZERO, credits(7))
        );
        // The ledger writes it: the pending cost moves into the snapshot.
        cache
            .committed(
                &bucket(),
                credits(3),
                Snapshot {
                    balance: credits(7),
                    rev: 2,
                },
            )
            .await;
        let view = cache.view(&bucket(), &source).await.expect("view");
        assert_eq!(view.balance, credits(7));
        // A stale snapshot never overwrites a newer one.
        cache
            .apply(
                &bucket(),
                Snapshot {
                    balance: credits(100),
                    rev: 1,
                },
            )
            .await;
        assert_eq!(
            cache.view(&bucket(), &source).await.expect("view").balance,
            credits(7)
        );
    }

    #[tokio::test]
    async fn overdraft_floor_allows_going_negative_that_far() {
        let cache = LocalCache::new();
        let source = FixedSource {
            balance: AtomicI64::new(credits(1).micros()),
            rev: AtomicI64::new(1),
        };
        cache
            .reserve(&bucket(), credits(3), credits(-2), &source)
            .await
            .expect("within overdraft");
        assert!(
            cache
                .reserve(&bucket(), Credits::from_micros(1), credits(-2), &source)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn invalidation_reloads_external_changes() {
        let cache = LocalCache::new();
        let source = FixedSource {
            balance: AtomicI64::new(credits(1).micros()),
            rev: AtomicI64::new(1),
        };
        assert_eq!(
            cache.view(&bucket(), &source).await.expect("view").balance,
            credits(1)
        );
        // Another process grants 5 credits.
        source.balance.store(credits(6).micros(), Ordering::SeqCst);
        source.rev.store(2, Ordering::SeqCst);
        assert_eq!(
            cache.view(&bucket(), &source).await.expect("view").balance,
            credits(1),
            "cached until invalidated"
        );
        cache.invalidate_all().await;
        assert_eq!(
            cache.view(&bucket(), &source).await.expect("view").balance,
            credits(6)
        );
    }
}
