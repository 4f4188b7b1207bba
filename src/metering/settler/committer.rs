//! Stage 2: the committer writes each batch in one ledger transaction (group commit), retries
//! and sets aside what the ledger refuses, and tells the waiters.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::cache::SharedCache;
use crate::ledger::{SettleOutcome, Settlement, SharedLedger};

use super::*;

/// A settlement on its way to the ledger.
pub(super) struct Queued {
    pub(super) settlement: Settlement,
    pub(super) limited_key: Option<String>,
    /// Still to be told; `None` once told (or when nobody waits).
    pub(super) durable: Option<oneshot::Sender<()>>,
}

/// What the recorder passes to the committer.
pub(super) enum Commit {
    Settle(Box<Queued>),
    Flush(oneshot::Sender<()>),
    /// Write (or set aside) everything passed on before it, then end.
    Stop(oneshot::Sender<()>),
}

/// A settlement the ledger refused when written alone, retried apart from the batches.
pub(super) struct Refused {
    pub(super) queued: Queued,
    /// Its place among the refused settlements, for the flushes that wait for it.
    pub(super) seq: u64,
    /// The ledger's last refusal (an outage's error is not kept: it says nothing of the record).
    pub(super) error: String,
    /// When the ledger first refused it alone.
    pub(super) since: Instant,
    pub(super) retry_at: Instant,
    /// The pause after the next refusal.
    pub(super) backoff: Duration,
}

/// Stage 2: group commit into the ledger.
pub(super) struct Committer {
    pub(super) rx: mpsc::UnboundedReceiver<Commit>,
    pub(super) ledger: SharedLedger,
    pub(super) cache: SharedCache,
    pub(super) batch_max: usize,
    pub(super) set_aside_after: Duration,
    /// Settlements the ledger refused alone, each until it is written or set aside.
    pub(super) refused: Vec<Refused>,
    /// The `seq` of the next refused settlement.
    pub(super) next_seq: u64,
    /// Flushes waiting for the refused settlements queued before them: each waits for those
    /// whose `seq` is below its number.
    pub(super) flushes: Vec<(u64, oneshot::Sender<()>)>,
}

impl Committer {
    pub(super) async fn run(mut self) {
        let mut incoming = Vec::with_capacity(self.batch_max);
        loop {
            // New work, or a refused settlement due again, whichever comes first (`recv_many`
            // is cancel-safe: a timeout loses nothing).
            let open = match self.refused.iter().map(|r| r.retry_at).min() {
                Some(due) => {
                    tokio::time::timeout_at(due, self.rx.recv_many(&mut incoming, self.batch_max))
                        .await
                        .map_or(true, |received| received > 0)
                }
                None => self.rx.recv_many(&mut incoming, self.batch_max).await > 0,
            };
            let mut batch = Vec::with_capacity(incoming.len());
            let mut waiters = Vec::new();
            let mut stop = None;
            for commit in incoming.drain(..) {
                match commit {
                    Commit::Settle(queued) => batch.push(*queued),
                    // Everything before a flush is in this batch or an earlier one.
                    Commit::Flush(waiter) => waiters.push(waiter),
                    Commit::Stop(done) => stop = Some(done),
                }
            }
            self.write(batch).await;
            let stopping = stop.is_some() || !open;
            if stopping {
                self.write_or_set_aside_refused().await;
            } else {
                self.retry_due(false).await;
            }
            let queued_before = self.next_seq;
            self.flushes
                .extend(waiters.into_iter().map(|waiter| (queued_before, waiter)));
            self.answer_flushes();
            if stopping {
                if let Some(done) = stop {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// Writes a batch in one transaction. If the ledger refuses it while it answers, each of its
    /// settlements is written alone, so the good ones commit now and only the refused ones wait
    /// (apart, in `refused`). While the ledger does not answer, the whole batch is retried until
    /// it does.
    pub(super) async fn write(&mut self, mut batch: Vec<Queued>) {
        if batch.is_empty() {
            return;
        }
        let settlements: Vec<Settlement> = batch.iter().map(|q| q.settlement.clone()).collect();
        let mut backoff = FIRST_BACKOFF;
        loop {
            match self.ledger.settle_batch(&settlements).await {
                Ok(outcomes) => {
                    self.committed(&mut batch, &outcomes).await;
                    return;
                }
                Err(error) if self.ledger.ping().await.is_ok() => {
                    if batch.len() == 1 {
                        self.refuse(batch.remove(0), error.to_string());
                    } else {
                        tracing::warn!(%error, pending = batch.len(), "the ledger refused a batch; writing its settlements one by one");
                        for queued in batch {
                            self.write_alone(queued).await;
                        }
                    }
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, pending = settlements.len(), "ledger write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = doubled(backoff);
                }
            }
        }
    }

    pub(super) async fn write_alone(&mut self, mut queued: Queued) {
        match self
            .ledger
            .settle_batch(std::slice::from_ref(&queued.settlement))
            .await
        {
            Ok(outcomes) => {
                self.committed(std::slice::from_mut(&mut queued), &outcomes)
                    .await;
            }
            Err(error) => self.refuse(queued, error.to_string()),
        }
    }

    pub(super) fn refuse(&mut self, queued: Queued, error: String) {
        tracing::warn!(
            request_id = %queued.settlement.request_id,
            %error,
            "the ledger refuses a settlement on its own; retrying it apart"
        );
        let now = Instant::now();
        self.refused.push(Refused {
            queued,
            seq: self.next_seq,
            error,
            since: now,
            retry_at: retry_after(now, FIRST_BACKOFF),
            backoff: doubled(FIRST_BACKOFF),
        });
        self.next_seq += 1;
    }

    /// Tries again the refused settlements that are due (all of them when `stopping`).
    pub(super) async fn retry_due(&mut self, stopping: bool) {
        let now = Instant::now();
        let (due, later): (Vec<Refused>, Vec<Refused>) = std::mem::take(&mut self.refused)
            .into_iter()
            .partition(|refused| stopping || refused.retry_at <= now);
        self.refused = later;
        for refused in due {
            if let Some(refused) = self.retry(refused, stopping).await {
                self.refused.push(refused);
            }
        }
    }

    /// At the stop: writes or sets aside every refused settlement now. Only an outage makes this
    /// wait (and shutdown stops waiting for the settler after its own timeout).
    pub(super) async fn write_or_set_aside_refused(&mut self) {
        loop {
            self.retry_due(true).await;
            self.answer_flushes();
            let Some(next) = self.refused.iter().map(|r| r.retry_at).min() else {
                return;
            };
            tokio::time::sleep_until(next).await;
        }
    }

    /// One more try of a refused settlement. Returns it if it is still to be tried later.
    pub(super) async fn retry(&mut self, mut refused: Refused, stopping: bool) -> Option<Refused> {
        match self
            .ledger
            .settle_batch(std::slice::from_ref(&refused.queued.settlement))
            .await
        {
            Ok(outcomes) => {
                self.committed(std::slice::from_mut(&mut refused.queued), &outcomes)
                    .await;
                return None;
            }
            Err(error) => {
                let answers = self.ledger.ping().await.is_ok();
                if answers {
                    refused.error = error.to_string();
                }
                let now = Instant::now();
                let backoff = refused.backoff;
                refused.backoff = doubled(backoff);
                match verdict(
                    answers,
                    stopping,
                    refused.since,
                    now,
                    backoff,
                    self.set_aside_after,
                ) {
                    Verdict::RetryAt(at) => {
                        refused.retry_at = at;
                        return Some(refused);
                    }
                    // Kept for another try should setting it aside fail.
                    Verdict::SetAside => refused.retry_at = retry_after(now, backoff),
                }
            }
        }
        let queued = &mut refused.queued;
        match set_aside(
            &*self.ledger,
            &*self.cache,
            &queued.settlement,
            queued.limited_key.as_deref(),
            &refused.error,
        )
        .await
        {
            Ok(()) => {}
            Err(error) if !stopping || self.ledger.ping().await.is_err() => {
                tracing::warn!(%error, request_id = %queued.settlement.request_id, "cannot set a refused settlement aside; retrying");
                return Some(refused);
            }
            // No later try would come: the record goes to the log rather than nowhere (and
            // stays in a shared cache's journal for recovery).
            Err(error) => tracing::error!(
                %error,
                record = %serde_json::to_string(&queued.settlement).unwrap_or_default(),
                "cannot set a refused settlement aside while stopping; dropped"
            ),
        }
        if let Some(durable) = queued.durable.take() {
            let _ = durable.send(());
        }
        None
    }

    /// Answers the flushes no refused settlement holds up any more.
    pub(super) fn answer_flushes(&mut self) {
        let oldest = self.refused.iter().map(|r| r.seq).min();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(before, _)| oldest.is_none_or(|seq| seq >= *before));
        self.flushes = waiting;
        for (_, waiter) in ready {
            let _ = waiter.send(());
        }
    }

    /// Marks a committed batch in the cache, all at once (on Redis the calls share the
    /// connection's pipeline), then tells the waiters.
    pub(super) async fn committed(&self, batch: &mut [Queued], outcomes: &[SettleOutcome]) {
        join_all(batch.iter().zip(outcomes).map(|(queued, outcome)| {
            if !outcome.applied {
                tracing::info!(request_id = %queued.settlement.request_id, "settlement replayed; ledger unchanged");
            }
            mark_committed(
                &*self.cache,
                &queued.settlement,
                queued.limited_key.as_deref(),
                outcome,
            )
        }))
        .await;
        for queued in batch {
            if let Some(durable) = queued.durable.take() {
                let _ = durable.send(());
            }
        }
    }
}
