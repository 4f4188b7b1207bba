//! Stage 1: the recorder applies every queued job to the balance cache at once and passes
//! the settlements on to the committer.

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use crate::cache::{BalanceCache, SharedCache};
use crate::ledger::{Bucket, Settlement};

use super::*;

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
    // Both at once: on Redis they share the connection's pipeline.
    let account = async {
        let bucket = Bucket::Account(settlement.account.clone());
        let recorded = cache
            .settle(&bucket, id, settlement.cost, Some(&journal))
            .await;
        if let Err(error) = &recorded {
            tracing::error!(%error, request_id = id, "cannot record a settlement in the cache");
        }
        recorded.is_ok()
    };
    let key = async {
        let Some(key) = limited_key else {
            return true;
        };
        let bucket = Bucket::KeyLimit(key.to_owned());
        let recorded = cache.settle(&bucket, id, settlement.cost, None).await;
        if let Err(error) = &recorded {
            tracing::error!(%error, request_id = id, "cannot record a key's spend in the cache");
        }
        recorded.is_ok()
    };
    let (account, key) = tokio::join!(account, key);
    account && key
}

/// Stage 1: applies jobs to the balance cache, as many at once as are queued.
pub(super) struct Recorder {
    pub(super) rx: mpsc::UnboundedReceiver<Job>,
    pub(super) commits: mpsc::UnboundedSender<Commit>,
    pub(super) cache: SharedCache,
    pub(super) batch_max: usize,
}

impl Recorder {
    pub(super) async fn run(mut self) {
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
                    let _ = self.commits.send(Commit::Stop(flushed));
                    drop(self.commits);
                    let _ = wait.await;
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    pub(super) async fn apply(&self, job: Job) {
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
