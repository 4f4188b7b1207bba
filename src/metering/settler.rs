//! The settler: one task that turns finished requests into ledger writes, in batches.
//!
//! Requests hand it jobs through an unbounded channel (never blocking a response, and usable
//! from `Drop`). It applies each job to the balance cache at once (hold → pending settlement, or
//! release), then writes the pending settlements in one ledger transaction per batch (group
//! commit), retrying until the ledger accepts them, and finally moves them from pending into the
//! cached balance. `flush` waits until everything queued before it is written.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::cache::SharedCache;
use crate::domain::Credits;
use crate::ledger::{Bucket, Settlement, SharedLedger};

pub enum Job {
    Settle {
        settlement: Box<Settlement>,
        /// The key whose spending limit was also held, if any.
        limited_key: Option<String>,
    },
    Release {
        buckets: Vec<Bucket>,
        amount: Credits,
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
            } => {
                let account = Bucket::Account(settlement.account.clone());
                self.cache
                    .settle(&account, settlement.hold, settlement.cost)
                    .await;
                if let Some(key) = &limited_key {
                    self.cache
                        .settle(
                            &Bucket::KeyLimit(key.clone()),
                            settlement.hold,
                            settlement.cost,
                        )
                        .await;
                }
                batch.settlements.push((*settlement, limited_key));
            }
            Job::Release { buckets, amount } => {
                for bucket in &buckets {
                    self.cache.release(bucket, amount).await;
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
            for ((settlement, limited_key), outcome) in batch.settlements.iter().zip(outcomes) {
                if !outcome.applied {
                    tracing::info!(request_id = %settlement.request_id, "settlement replayed; ledger unchanged");
                }
                let account = Bucket::Account(settlement.account.clone());
                self.cache
                    .committed(&account, settlement.cost, outcome.account)
                    .await;
                if let (Some(key), Some(snapshot)) = (limited_key, outcome.key_limit) {
                    self.cache
                        .committed(&Bucket::KeyLimit(key.clone()), settlement.cost, snapshot)
                        .await;
                }
            }
            batch.settlements.clear();
        }
        for waiter in batch.waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
}
