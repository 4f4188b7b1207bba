//! The balance-cache contract: what every adapter must do, run against each of them (the
//! in-process cache's and the Redis cache's unit tests call these with their own cache).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use async_trait::async_trait;

use super::{BalanceCache, HoldSpec, ReserveError, SnapshotSource};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};
use crate::ledger::{Bucket, InFlight, LedgerError, Snapshot};

/// A ledger stand-in holding one balance whose revision moves with each change; counts loads.
pub(crate) struct FixedSource {
    pub(crate) balance: AtomicI64,
    pub(crate) rev: AtomicI64,
    loads: AtomicUsize,
}

impl FixedSource {
    pub(crate) fn new(credits: Credits) -> Self {
        FixedSource {
            balance: AtomicI64::new(credits.micros()),
            rev: AtomicI64::new(1),
            loads: AtomicUsize::new(0),
        }
    }

    pub(crate) fn loads(&self) -> usize {
        self.loads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl SnapshotSource for FixedSource {
    async fn load(&self, _bucket: &Bucket, _in_flight: InFlight) -> Result<Snapshot, LedgerError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        Ok(Snapshot::plain(
            Credits::from_micros(self.balance.load(Ordering::SeqCst)),
            self.rev.load(Ordering::SeqCst),
        ))
    }
}

/// A ledger stand-in that answers each load with the next of its snapshots (the last one
/// again once the others are used) and records what each load was told is in flight.
pub(crate) struct ScriptedSource {
    snapshots: std::sync::Mutex<Vec<Snapshot>>,
    told: std::sync::Mutex<Vec<InFlight>>,
}

impl ScriptedSource {
    pub(crate) fn new(snapshots: Vec<Snapshot>) -> Self {
        ScriptedSource {
            snapshots: std::sync::Mutex::new(snapshots),
            told: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// What each load so far was told is in flight.
    pub(crate) fn told(&self) -> Vec<Credits> {
        let told = self.told.lock().expect("lock");
        told.iter().map(|in_flight| in_flight.amount).collect()
    }
}

#[async_trait]
impl SnapshotSource for ScriptedSource {
    async fn load(&self, _bucket: &Bucket, in_flight: InFlight) -> Result<Snapshot, LedgerError> {
        self.told.lock().expect("lock").push(in_flight);
        let mut snapshots = self.snapshots.lock().expect("lock");
        let next = if snapshots.len() > 1 {
            snapshots.remove(0)
        } else {
            snapshots[0]
        };
        Ok(next)
    }
}

pub(crate) fn expiring(
    balance: i64,
    rev: i64,
    next_expiry_ms: Option<i64>,
    lapsed: i64,
) -> Snapshot {
    Snapshot {
        balance: credits(balance),
        rev,
        next_expiry_ms,
        lapsed: credits(lapsed),
    }
}

pub(crate) fn bucket() -> Bucket {
    Bucket::Account(AccountId::parse("alice").expect("valid"))
}

pub(crate) fn credits(whole: i64) -> Credits {
    Credits::from_whole(whole).expect("small")
}

pub(crate) fn hold(id: &str, amount: Credits) -> HoldSpec {
    HoldSpec {
        request_id: id.to_owned(),
        amount,
        owner: "test".into(),
        deadline_ms: i64::MAX,
    }
}

/// 100 requests of 1 credit each, spread over `caches` (instances sharing one store), racing
/// for the balance of `source`: how many got their hold.
pub(crate) async fn race<C>(caches: &[Arc<C>], source: Arc<FixedSource>) -> usize
where
    C: BalanceCache + ?Sized + 'static,
{
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let cache = caches[i % caches.len()].clone();
            let source = source.clone();
            tokio::spawn(async move {
                cache
                    .reserve(
                        &bucket(),
                        &hold(&format!("r{i}"), credits(1)),
                        Credits::ZERO,
                        &*source,
                    )
                    .await
                    .is_ok()
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        granted += usize::from(task.await.expect("task"));
    }
    granted
}

/// Many requests racing for one balance: exactly as many holds as it covers.
pub(crate) async fn concurrent_reservations_never_exceed_the_balance(cache: Arc<dyn BalanceCache>) {
    let source = Arc::new(FixedSource::new(credits(10)));
    assert_eq!(race(std::slice::from_ref(&cache), source.clone()).await, 10);
    let view = cache.view(&bucket(), &*source).await.expect("view");
    assert_eq!(view.available, Credits::ZERO);
    assert_eq!(view.held, credits(10));
}

/// Each request holds, settles, commits and releases at most once, whatever is repeated; a snapshot never goes back in time.
pub(crate) async fn settle_commit_and_release_are_idempotent_per_request(cache: &dyn BalanceCache) {
    let source = FixedSource::new(credits(10));
    cache
        .reserve(&bucket(), &hold("a", credits(4)), Credits::ZERO, &source)
        .await
        .expect("fits");
    cache
        .reserve(&bucket(), &hold("b", credits(4)), Credits::ZERO, &source)
        .await
        .expect("fits");
    // The same request reserving twice holds once.
    cache
        .reserve(&bucket(), &hold("b", credits(4)), Credits::ZERO, &source)
        .await
        .expect("same hold");
    let err = cache
        .reserve(&bucket(), &hold("c", credits(4)), Credits::ZERO, &source)
        .await
        .expect_err("too much");
    assert!(matches!(err, ReserveError::Insufficient { available } if available == credits(2)));
    // `a` costs 3 of its 4 (settled twice: counted once); `b` is released twice.
    cache
        .settle(&bucket(), "a", credits(3), Some("{}"))
        .await
        .expect("settle");
    cache
        .settle(&bucket(), "a", credits(3), Some("{}"))
        .await
        .expect("settle");
    cache.release(&bucket(), "b").await.expect("release");
    cache.release(&bucket(), "b").await.expect("release");
    let view = cache.view(&bucket(), &source).await.expect("view");
    assert_eq!(
        (view.balance, view.held, view.available),
        (credits(7), Credits::ZERO, credits(7))
    );
    // The ledger writes it: the pending cost moves into the snapshot, once.
    let written = Snapshot::plain(credits(7), 2);
    cache
        .committed(&bucket(), "a", written)
        .await
        .expect("commit");
    cache
        .committed(&bucket(), "a", written)
        .await
        .expect("commit");
    assert_eq!(
        cache.view(&bucket(), &source).await.expect("view").balance,
        credits(7)
    );
    // A stale snapshot never overwrites a newer one; a newer one does.
    cache
        .apply(&bucket(), Snapshot::plain(credits(100), 1))
        .await
        .expect("apply");
    assert_eq!(
        cache.view(&bucket(), &source).await.expect("view").balance,
        credits(7)
    );
    cache
        .apply(&bucket(), Snapshot::plain(credits(9), 3))
        .await
        .expect("apply");
    assert_eq!(
        cache.view(&bucket(), &source).await.expect("view").balance,
        credits(9)
    );
}

/// A floor below zero lets holds go that far below, and no further.
pub(crate) async fn overdraft_floor_allows_going_negative_that_far(cache: &dyn BalanceCache) {
    let source = FixedSource::new(credits(1));
    cache
        .reserve(&bucket(), &hold("a", credits(3)), credits(-2), &source)
        .await
        .expect("within overdraft");
    assert!(
        cache
            .reserve(
                &bucket(),
                &hold("b", Credits::from_micros(1)),
                credits(-2),
                &source
            )
            .await
            .is_err()
    );
    let view = cache.view(&bucket(), &source).await.expect("view");
    assert_eq!(view.available, credits(-2));
}

/// A balance stays cached until an invalidation (from `sibling`, an instance sharing the cache; the same cache where there is no sharing), then reloads once.
pub(crate) async fn invalidation_reloads_external_changes(
    cache: &dyn BalanceCache,
    sibling: &dyn BalanceCache,
) {
    let source = FixedSource::new(credits(1));
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
    assert_eq!(source.loads(), 1);
    // Any instance's invalidation reaches every instance.
    sibling.invalidate_all().await.expect("invalidate");
    assert_eq!(
        cache.view(&bucket(), &source).await.expect("view").balance,
        credits(6)
    );
    assert_eq!(source.loads(), 2, "one reload, then cached again");
    cache
        .reserve(&bucket(), &hold("a", credits(6)), Credits::ZERO, &source)
        .await
        .expect("the granted credits are usable");
    assert_eq!(source.loads(), 2);
}

/// A snapshot that still counts a lapsed grant is reloaded before any hold uses it.
pub(crate) async fn a_snapshot_counting_a_lapsed_grant_is_reloaded_and_lapsed_credits_are_unavailable(
    cache: &dyn BalanceCache,
) {
    // The first load raced the grant's lapse: it still counts the grant as live, so no
    // reservation may use it. The reload reports 4 of the 10 as lapsed, not swept yet.
    let source = ScriptedSource::new(vec![
        expiring(10, 1, Some(now_ms() - 1), 0),
        expiring(10, 1, None, 4),
    ]);
    let err = cache
        .reserve(&bucket(), &hold("a", credits(7)), Credits::ZERO, &source)
        .await
        .expect_err("lapsed credits are not available");
    assert!(
        matches!(err, ReserveError::Insufficient { available } if available == credits(6)),
        "{err:?}"
    );
    assert_eq!(source.told().len(), 2);
    cache
        .reserve(&bucket(), &hold("a", credits(6)), Credits::ZERO, &source)
        .await
        .expect("fits");
    let view = cache.view(&bucket(), &source).await.expect("view");
    assert_eq!(
        (view.balance, view.held, view.available),
        (credits(10), credits(6), Credits::ZERO)
    );
    assert_eq!(source.told().len(), 2, "a fresh snapshot is not reloaded");
}

/// An expiry sweep's fence makes later holds reload, and what was in flight at the lapse stays counted.
pub(crate) async fn a_sweeps_fence_makes_later_reservations_reload_keeping_what_is_in_flight(
    cache: &dyn BalanceCache,
) {
    let lapses_at = now_ms() + 3_600_000;
    let source = ScriptedSource::new(vec![
        expiring(10, 1, Some(lapses_at), 0),
        // After the sweep that kept 4 of the lapsed grant for the requests in flight.
        expiring(6, 2, None, 4),
    ]);
    cache
        .reserve(&bucket(), &hold("a", credits(4)), Credits::ZERO, &source)
        .await
        .expect("fits");
    cache
        .reserve(&bucket(), &hold("p", credits(1)), Credits::ZERO, &source)
        .await
        .expect("fits");
    cache
        .settle(&bucket(), "p", credits(1), None)
        .await
        .expect("settle");
    // The sweep reads what is held (4) or pending (1) and fences the bucket at the lapse,
    // even though this clock has not reached it.
    assert_eq!(
        cache
            .in_flight(&bucket(), lapses_at)
            .await
            .expect("in flight"),
        credits(5)
    );
    let other = Bucket::Account(AccountId::parse("nobody").expect("valid"));
    assert_eq!(
        cache.in_flight(&other, lapses_at).await.expect("in flight"),
        Credits::ZERO
    );
    // So the next reservation reloads, telling the ledger what is in flight, and the kept
    // credits stay unavailable: 6 - 1 pending - 4 held - 4 lapsed.
    let err = cache
        .reserve(&bucket(), &hold("b", credits(1)), Credits::ZERO, &source)
        .await
        .expect_err("nothing available");
    assert!(
        matches!(err, ReserveError::Insufficient { available } if available == credits(-3)),
        "{err:?}"
    );
    assert_eq!(source.told(), [Credits::ZERO, credits(5)]);
    // Once the request that reserved before the lapse is gone, the rest is available.
    cache.release(&bucket(), "a").await.expect("release");
    cache
        .reserve(&bucket(), &hold("b", credits(1)), Credits::ZERO, &source)
        .await
        .expect("fits");
    let view = cache.view(&bucket(), &source).await.expect("view");
    assert_eq!(
        (view.balance, view.held, view.available),
        (credits(5), credits(1), Credits::ZERO)
    );
}
