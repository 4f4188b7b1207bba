//! The settler: one task that turns finished requests into ledger writes, in batches.
//!
//! Requests hand it jobs through an unbounded channel (never blocking a response, and usable
//! from `Drop`). A finished request is first recorded in the balance cache (hold → pending
//! settlement, with the serialized settlement as its journal record), then written with others
//! in one ledger transaction per batch (group commit), retried until the ledger accepts it, and
//! finally marked committed in the cache. `flush` waits until everything queued before it is
//! written. [`recover`] writes the settlements a crashed instance left in a shared cache.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cache::{BalanceCache, SharedCache};
use crate::ledger::{Bucket, Ledger, SettleOutcome, Settlement, SharedLedger, now_ms};

pub enum Job {
    Settle {
        settlement: Box<Settlement>,
        /// The key whose spending limit was also held, if any.
        limited_key: Option<String>,
        /// Whether the settlement is already recorded in the cache.
        recorded: bool,
    },
    Release {
        buckets: Vec<Bucket>,
        request_id: String,
    },
    Flush(oneshot::Sender<()>),
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

    /// Returns once every job sent before this call has been applied and written.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Flush(tx));
        let _ = rx.await;
    }
}

pub struct SettlerConfig {
    pub batch_max: usize,
    pub flush_window: Duration,
}

pub fn spawn(
    ledger: SharedLedger,
    cache: SharedCache,
    config: SettlerConfig,
) -> (SettlerHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let settler = Settler {
        rx,
        ledger,
        cache,
        config,
    };
    (SettlerHandle { tx }, tokio::spawn(settler.run()))
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

struct Settler {
    rx: mpsc::UnboundedReceiver<Job>,
    ledger: SharedLedger,
    cache: SharedCache,
    config: SettlerConfig,
}

#[derive(Default)]
struct Batch {
    settlements: Vec<(Settlement, Option<String>)>,
    waiters: Vec<oneshot::Sender<()>>,
}

impl Settler {
    async fn run(mut self) {
        let mut batch = Batch::default();
        while let Some(job) = self.rx.recv().await {
            self.apply(job, &mut batch).await;
            // Group commit: take what is already queued, then wait a short window for more.
            let deadline = tokio::time::Instant::now() + self.config.flush_window;
            while batch.settlements.len() < self.config.batch_max && batch.waiters.is_empty() {
                let next = match self.rx.try_recv() {
                    Ok(job) => Some(job),
                    Err(mpsc::error::TryRecvError::Empty) if !batch.settlements.is_empty() => {
                        tokio::time::timeout_at(deadline, self.rx.recv())
                            .await
                            .unwrap_or_default()
                    }
                    Err(_) => None,
                };
                match next {
                    Some(job) => self.apply(job, &mut batch).await,
                    None => break,
                }
            }
            self.write(&mut batch).await;
        }
        self.write(&mut batch).await;
    }

    async fn apply(&self, job: Job, batch: &mut Batch) {
        match job {
            Job::Settle {
                settlement,
                limited_key,
                recorded,
            } => {
                if !recorded {
                    record(&*self.cache, &settlement, limited_key.as_deref()).await;
                }
                batch.settlements.push((*settlement, limited_key));
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
            Job::Flush(waiter) => batch.waiters.push(waiter),
        }
    }

    async fn write(&self, batch: &mut Batch) {
        if !batch.settlements.is_empty() {
            let settlements: Vec<Settlement> =
                batch.settlements.iter().map(|(s, _)| s.clone()).collect();
            let mut backoff = Duration::from_millis(50);
            let outcomes = loop {
                match self.ledger.settle_batch(&settlements).await {
                    Ok(outcomes) => break outcomes,
                    Err(error) => {
                        tracing::error!(%error, pending = settlements.len(), "ledger write failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            for ((settlement, limited_key), outcome) in batch.settlements.iter().zip(&outcomes) {
                if !outcome.applied {
                    tracing::info!(request_id = %settlement.request_id, "settlement replayed; ledger unchanged");
                }
                mark_committed(&*self.cache, settlement, limited_key.as_deref(), outcome).await;
            }
            batch.settlements.clear();
        }
        for waiter in batch.waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
}
