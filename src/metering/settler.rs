//! The settler: turns finished requests into ledger writes, in batches, off the request's task.
//!
//! Requests hand it jobs through an unbounded channel: sending never blocks and works from
//! `Drop`, so once a request has queued its settlement, nothing that happens to the request's
//! task (a client hanging up, a cancelled future) can lose it. Two stages run in order:
//!
//! 1. The recorder takes every queued job and applies it to the balance cache at once: a
//!    finished request's hold becomes a pending settlement carrying its serialized record (its
//!    journal), an abandoned request's hold is released.
//! 2. The committer writes what the recorder passed on, in one ledger transaction per batch, and
//!    marks it committed in the cache. There is no fixed wait window: a batch is whatever queued
//!    while the previous commit ran, so one request alone pays one commit and many share one.
//!
//! A settlement is *durable* once a crash of this process cannot lose it: when the cache's
//! journal outlives the process (Redis) as soon as it is recorded there, otherwise (the
//! in-process cache) once the ledger has committed it. The request waits for that before the
//! last bytes of its response leave (DESIGN.md I4). A settlement the ledger refuses on its own
//! (while others in its batch commit) is retried alone and then set aside for an admin, so it
//! can never hold up the others. [`recover`] writes the settlements a crashed instance left in a
//! shared cache.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cache::{BalanceCache, SharedCache};
use crate::ledger::{Bucket, Ledger, SettleOutcome, Settlement, SharedLedger, now_ms};

/// Resolves once its settlement is durable (see the module docs). A settler that stopped
/// resolves it too: the request must end either way.
pub type Durable = oneshot::Receiver<()>;

pub enum Job {
    Settle {
        settlement: Box<Settlement>,
        /// The key whose spending limit was also held, if any.
        limited_key: Option<String>,
        /// Told when the settlement is durable; `None` when nobody waits.
        durable: Option<oneshot::Sender<()>>,
    },
    Release {
        buckets: Vec<Bucket>,
        request_id: String,
    },
    Flush(oneshot::Sender<()>),
    /// Write everything queued before it, then stop.
    Stop(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct SettlerHandle {
    tx: mpsc::UnboundedSender<Job>,
}

impl SettlerHandle {
    pub fn send(&self, job: Job) {
        if self.tx.send(job).is_err() {
            tracing::error!("settler has stopped; a settlement or release was dropped");
        }
    }

    /// Queues a settlement; the returned [`Durable`] resolves once it cannot be lost.
    pub fn settle(&self, settlement: Settlement, limited_key: Option<String>) -> Durable {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Settle {
            settlement: Box::new(settlement),
            limited_key,
            durable: Some(tx),
        });
        rx
    }

    /// Returns once every job sent before this call has been applied and written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Flush(tx));
        let _ = rx.await;
    }

    /// Writes everything queued before this call, then stops the settler. Jobs sent later are
    /// dropped (and logged), so call it only once nothing can settle any more.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Stop(tx));
        let _ = rx.await;
    }
}

pub struct SettlerConfig {
    pub batch_max: usize,
}

pub fn spawn(
    ledger: SharedLedger,
    cache: SharedCache,
    config: SettlerConfig,
) -> (SettlerHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (commits_tx, commits_rx) = mpsc::unbounded_channel();
    let batch_max = config.batch_max.max(1);
    let recorder = Recorder {
        rx,
        commits: commits_tx,
        cache: cache.clone(),
        batch_max,
    };
    let committer = Committer {
        rx: commits_rx,
        ledger,
        cache,
        batch_max,
    };
    let task = tokio::spawn(async move {
        let committer = tokio::spawn(committer.run());
        recorder.run().await;
        let _ = committer.await;
    });
    (SettlerHandle { tx }, task)
}

/// Records a finished request in the cache: its holds become a pending settlement carrying the
/// serialized settlement. Returns false if the cache could not take it (it is then written to
/// the ledger all the same; the cache catches up at the commit or the next reload).
pub async fn record(
    cache: &dyn BalanceCache,
    settlement: &Settlement,
    limited_key: Option<&str>,
) -> bool {
    let id = settlement.request_id.as_str();
    let journal = match serde_json::to_string(settlement) {
        Ok(json) => json,
        Err(error) => {
            tracing::error!(%error, request_id = id, "cannot serialize a settlement");
            return false;
        }
    };
    let account = Bucket::Account(settlement.account.clone());
    let mut ok = true;
    if let Err(error) = cache
        .settle(&account, id, settlement.cost, Some(&journal))
        .await
    {
        tracing::error!(%error, request_id = id, "cannot record a settlement in the cache");
        ok = false;
    }
    if let Some(key) = limited_key
        && let Err(error) = cache
            .settle(&Bucket::KeyLimit(key.to_owned()), id, settlement.cost, None)
            .await
    {
        tracing::error!(%error, request_id = id, "cannot record a key's spend in the cache");
        ok = false;
    }
    ok
}

/// Tells the cache that written settlements are in the ledger.
async fn mark_committed(
    cache: &dyn BalanceCache,
    settlement: &Settlement,
    limited_key: Option<&str>,
    outcome: &SettleOutcome,
) {
    let id = settlement.request_id.as_str();
    let account = Bucket::Account(settlement.account.clone());
    if let Err(error) = cache.committed(&account, id, outcome.account).await {
        tracing::warn!(%error, request_id = id, "cannot mark a settlement committed in the cache");
    }
    if let (Some(key), Some(snapshot)) = (limited_key, outcome.key_limit)
        && let Err(error) = cache
            .committed(&Bucket::KeyLimit(key.to_owned()), id, snapshot)
            .await
    {
        tracing::warn!(%error, request_id = id, "cannot mark a key's spend committed in the cache");
    }
}

/// Releases expired holds and writes pending settlements older than `orphan_age` (left by an
/// instance that died before writing them). Safe to run on every instance at once: settlements
/// are idempotent by request id.
pub async fn recover(
    ledger: &dyn Ledger,
    cache: &dyn BalanceCache,
    orphan_age: Duration,
) -> Result<(usize, usize), String> {
    let now = now_ms();
    let reaped = cache.reap_holds(now).await.map_err(|e| e.to_string())?;
    let age = i64::try_from(orphan_age.as_millis()).unwrap_or(i64::MAX);
    let orphans = cache.orphans(now, age).await.map_err(|e| e.to_string())?;
    let mut written = 0;
    for orphan in orphans {
        let settlement: Settlement = match serde_json::from_str(&orphan.record) {
            Ok(settlement) => settlement,
            Err(error) => {
                tracing::error!(%error, request_id = orphan.request_id, "unreadable settlement record");
                continue;
            }
        };
        let outcomes = ledger
            .settle_batch(std::slice::from_ref(&settlement))
            .await
            .map_err(|e| e.to_string())?;
        if let Some(outcome) = outcomes.first() {
            let limited_key = outcome.key_limit.and(settlement.api_key_id.as_deref());
            mark_committed(cache, &settlement, limited_key, outcome).await;
            if outcome.applied {
                written += 1;
                tracing::warn!(
                    request_id = orphan.request_id,
                    "wrote a settlement left by another instance"
                );
            }
        }
    }
    Ok((reaped, written))
}

/// A settlement on its way to the ledger.
struct Queued {
    settlement: Settlement,
    limited_key: Option<String>,
    /// Still to be told; `None` once told (or when nobody waits).
    durable: Option<oneshot::Sender<()>>,
}

/// What the recorder passes to the committer.
enum Commit {
    Settle(Box<Queued>),
    Flush(oneshot::Sender<()>),
}

/// Stage 1: applies jobs to the balance cache, as many at once as are queued.
struct Recorder {
    rx: mpsc::UnboundedReceiver<Job>,
    commits: mpsc::UnboundedSender<Commit>,
    cache: SharedCache,
    batch_max: usize,
}

impl Recorder {
    async fn run(mut self) {
        let mut jobs = Vec::with_capacity(self.batch_max);
        loop {
            if self.rx.recv_many(&mut jobs, self.batch_max).await == 0 {
                return;
            }
            let stop = jobs.iter().position(|job| matches!(job, Job::Stop(_)));
            let after_stop = stop.map(|at| jobs.split_off(at));
            join_all(jobs.drain(..).map(|job| self.apply(job))).await;
            if let Some(mut rest) = after_stop {
                if rest.len() > 1 {
                    tracing::error!(
                        dropped = rest.len() - 1,
                        "settler has stopped; settlements or releases sent after the stop were dropped"
                    );
                }
                if let Some(Job::Stop(done)) = rest.drain(..).next() {
                    // The committer writes everything passed on so far, then ends.
                    let (flushed, wait) = oneshot::channel();
                    let _ = self.commits.send(Commit::Flush(flushed));
                    drop(self.commits);
                    let _ = wait.await;
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    async fn apply(&self, job: Job) {
        match job {
            Job::Settle {
                settlement,
                limited_key,
                durable,
            } => {
                let recorded = record(&*self.cache, &settlement, limited_key.as_deref()).await;
                let mut queued = Box::new(Queued {
                    settlement: *settlement,
                    limited_key,
                    durable,
                });
                if recorded && self.cache.journal_outlives_process() {
                    // A sibling writes the journal record if this process dies now.
                    if let Some(durable) = queued.durable.take() {
                        let _ = durable.send(());
                    }
                }
                let _ = self.commits.send(Commit::Settle(queued));
            }
            Job::Release {
                buckets,
                request_id,
            } => {
                for bucket in &buckets {
                    if let Err(error) = self.cache.release(bucket, &request_id).await {
                        tracing::warn!(%error, request_id, "cannot release a hold; it expires at its deadline");
                    }
                }
            }
            Job::Flush(waiter) => {
                let _ = self.commits.send(Commit::Flush(waiter));
            }
            Job::Stop(_) => unreachable!("the recorder splits the stop off first"),
        }
    }
}

/// Stage 2: group commit into the ledger.
struct Committer {
    rx: mpsc::UnboundedReceiver<Commit>,
    ledger: SharedLedger,
    cache: SharedCache,
    batch_max: usize,
}

impl Committer {
    async fn run(mut self) {
        let mut incoming = Vec::with_capacity(self.batch_max);
        while self.rx.recv_many(&mut incoming, self.batch_max).await > 0 {
            let mut batch = Vec::with_capacity(incoming.len());
            let mut waiters = Vec::new();
            for commit in incoming.drain(..) {
                match commit {
                    Commit::Settle(queued) => batch.push(*queued),
                    // Everything before a flush is in this batch or an earlier one.
                    Commit::Flush(waiter) => waiters.push(waiter),
                }
            }
            self.write(batch).await;
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
    }

    async fn write(&self, mut batch: Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let settlements: Vec<Settlement> = batch.iter().map(|q| q.settlement.clone()).collect();
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.ledger.settle_batch(&settlements).await {
                Ok(outcomes) => {
                    self.committed(&mut batch, &outcomes).await;
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, pending = settlements.len(), "ledger write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn committed(&self, batch: &mut [Queued], outcomes: &[SettleOutcome]) {
        for (queued, outcome) in batch.iter_mut().zip(outcomes) {
            if !outcome.applied {
                tracing::info!(request_id = %queued.settlement.request_id, "settlement replayed; ledger unchanged");
            }
            mark_committed(
                &*self.cache,
                &queued.settlement,
                queued.limited_key.as_deref(),
                outcome,
            )
            .await;
            if let Some(durable) = queued.durable.take() {
                let _ = durable.send(());
            }
        }
    }
}
