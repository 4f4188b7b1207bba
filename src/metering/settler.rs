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
//! last bytes of its response leave (docs/architecture.md I4). [`recover`] writes the settlements a crashed
//! instance left in a shared cache.
//!
//! # A settlement the ledger refuses
//!
//! When the ledger refuses a batch but still answers ([`Ledger::ping`]), something in the batch
//! is bad (a record it cannot store): each settlement is then written alone, so the good ones
//! commit at once. One refused alone is retried apart from the batches, with backoff, for up to
//! `metering.set_aside_after_secs` (see [`verdict`]); then it is *set aside*
//! ([`crate::ledger::set_aside`]): kept in the ledger for an admin, uncharged, its waiter told
//! and its pending charge dropped from the cache. So a bad settlement never holds up the others,
//! nor shutdown: when the settler stops, what is still refused is set aside at once. While the
//! ledger does not answer, nothing is set aside: writes wait for it as long as it takes.
//! [`recover`] likewise sets aside an orphan the ledger refuses and goes on with the others.

use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cache::{BalanceCache, SharedCache};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};
use crate::ledger::{
    Bucket, Ledger, LedgerError, SetAside, SettleOutcome, Settlement, SharedLedger, Snapshot,
};

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

    /// Returns once every job sent before this call has been applied and written (or, refused
    /// by the ledger, set aside: up to `set_aside_after` later).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Flush(tx));
        let _ = rx.await;
    }

    /// Writes everything queued before this call (setting aside at once what the ledger
    /// refuses), then stops the settler. Jobs sent later are dropped (and logged), so call it
    /// only once nothing can settle any more.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Stop(tx));
        let _ = rx.await;
    }
}

pub struct SettlerConfig {
    pub batch_max: usize,
    /// How long a settlement the ledger refuses on its own, while it answers, is retried before
    /// it is set aside.
    pub set_aside_after: Duration,
}

/// The first pause before a write is tried again; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The pause after `backoff`: twice as long, up to [`MAX_BACKOFF`]. Never shorter, so a ledger
/// that keeps failing is tried less and less often, never in a tight loop.
fn doubled(backoff: Duration) -> Duration {
    (backoff * 2).min(MAX_BACKOFF)
}

/// When to try again, `backoff` after `now`.
fn retry_after(now: Instant, backoff: Duration) -> Instant {
    now + backoff
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
        set_aside_after: config.set_aside_after,
        refused: Vec::new(),
        next_seq: 0,
        flushes: Vec::new(),
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

/// Tells the cache that written settlements are in the ledger.
async fn mark_committed(
    cache: &dyn BalanceCache,
    settlement: &Settlement,
    limited_key: Option<&str>,
    outcome: &SettleOutcome,
) {
    let id = settlement.request_id.as_str();
    let account = async {
        let bucket = Bucket::Account(settlement.account.clone());
        if let Err(error) = cache.committed(&bucket, id, outcome.account).await {
            tracing::warn!(%error, request_id = id, "cannot mark a settlement committed in the cache");
        }
    };
    let key = async {
        if let (Some(key), Some(snapshot)) = (limited_key, outcome.key_limit)
            && let Err(error) = cache
                .committed(&Bucket::KeyLimit(key.to_owned()), id, snapshot)
                .await
        {
            tracing::warn!(%error, request_id = id, "cannot mark a key's spend committed in the cache");
        }
    };
    tokio::join!(account, key);
}

/// Sets aside a settlement the ledger refuses on its own ([`crate::ledger::set_aside`]), and
/// drops it from the cache: nothing was charged, so its buckets take the ledger's balance as it
/// stands in place of its pending charge (and lose its hold, if the charge never reached the
/// cache).
async fn set_aside(
    ledger: &dyn Ledger,
    cache: &dyn BalanceCache,
    settlement: &Settlement,
    limited_key: Option<&str>,
    error: &str,
) -> Result<(), LedgerError> {
    ledger
        .set_aside(&SetAside::new(settlement, error, now_ms()))
        .await?;
    let id = settlement.request_id.as_str();
    tracing::error!(
        request_id = id,
        account = %settlement.account,
        error,
        "the ledger refuses this settlement on its own: set aside uncharged for an admin \
         (GET /admin/settlements/set-aside)"
    );
    let mut buckets = vec![(
        Bucket::Account(settlement.account.clone()),
        current_balance(ledger, &settlement.account).await,
    )];
    if let Some(key) = limited_key {
        let bucket = Bucket::KeyLimit(key.to_owned());
        let snapshot = ledger.snapshot(&bucket, Credits::ZERO).await;
        buckets.push((bucket, snapshot));
    }
    for (bucket, snapshot) in buckets {
        let dropped = match snapshot {
            Ok(snapshot) => cache
                .committed(&bucket, id, snapshot)
                .await
                .map_err(|e| e.to_string()),
            Err(error) => Err(error.to_string()),
        };
        if let Err(error) = dropped {
            tracing::warn!(%error, request_id = id, "cannot drop a set-aside settlement from the cache");
        }
    }
    Ok(())
}

/// The account's balance as the ledger has it, without creating an account it does not have (a
/// refused settlement may name one): such an account has nothing cached to correct either.
async fn current_balance(
    ledger: &dyn Ledger,
    account: &AccountId,
) -> Result<Snapshot, LedgerError> {
    if ledger.account(account).await?.is_none() {
        return Ok(Snapshot::plain(Credits::ZERO, 0));
    }
    // The account exists, so this only reads its snapshot (with its expiry outlook).
    ledger
        .snapshot(&Bucket::Account(account.clone()), Credits::ZERO)
        .await
}

/// What one [`recover`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Holds released (expired, or of a dead instance).
    pub reaped: usize,
    /// Orphaned settlements written to the ledger.
    pub written: usize,
    /// Orphaned settlements the ledger refused on their own, set aside.
    pub set_aside: usize,
}

/// Releases expired holds and writes pending settlements older than `orphan_age` (left by an
/// instance that died before writing them). An orphan the ledger refuses while it answers is set
/// aside and the pass goes on; a ledger that does not answer ends the pass with an error (the
/// next pass tries again). Safe to run on every instance at once: settlements are idempotent by
/// request id, and so is setting one aside.
pub async fn recover(
    ledger: &dyn Ledger,
    cache: &dyn BalanceCache,
    orphan_age: Duration,
) -> Result<Recovered, String> {
    let now = now_ms();
    let reaped = cache.reap_holds(now).await.map_err(|e| e.to_string())?;
    let age = i64::try_from(orphan_age.as_millis()).unwrap_or(i64::MAX);
    let orphans = cache.orphans(now, age).await.map_err(|e| e.to_string())?;
    let mut recovered = Recovered {
        reaped,
        ..Recovered::default()
    };
    for orphan in orphans {
        let settlement: Settlement = match serde_json::from_str(&orphan.record) {
            Ok(settlement) => settlement,
            Err(error) => {
                tracing::error!(%error, request_id = orphan.request_id, "unreadable settlement record");
                continue;
            }
        };
        let outcomes = match ledger.settle_batch(std::slice::from_ref(&settlement)).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                // A ledger that does not answer ends the pass: an outage, not a bad record.
                ledger.ping().await.map_err(|_| error.to_string())?;
                // The key's limit is unknown here (no outcome): its cached entry, if any, is
                // corrected all the same.
                let key = settlement.api_key_id.as_deref();
                match set_aside(ledger, cache, &settlement, key, &error.to_string()).await {
                    Ok(()) => recovered.set_aside += 1,
                    Err(error) => tracing::error!(
                        %error,
                        request_id = orphan.request_id,
                        "cannot set a refused settlement aside; it stays journaled for the next pass"
                    ),
                }
                continue;
            }
        };
        if let Some(outcome) = outcomes.first() {
            let limited_key = outcome.key_limit.and(settlement.api_key_id.as_deref());
            mark_committed(cache, &settlement, limited_key, outcome).await;
            if outcome.applied {
                recovered.written += 1;
                tracing::warn!(
                    request_id = orphan.request_id,
                    "wrote a settlement left by another instance"
                );
            }
        }
    }
    Ok(recovered)
}

/// What becomes of a settlement the ledger has just refused when written alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Try it again then.
    RetryAt(Instant),
    SetAside,
}

/// The ledger refused a settlement alone at `now`, and first did so at `since`. If the ledger
/// does not answer (`answers` is false), that is an outage, not a bad settlement: it is retried
/// after `backoff` however long that lasts. Otherwise it is retried (the last time exactly at
/// `since + set_aside_after`, so the bound holds whatever the backoff) and set aside once that
/// has passed, or at once when the settler is stopping and no later retry would come.
fn verdict(
    answers: bool,
    stopping: bool,
    since: Instant,
    now: Instant,
    backoff: Duration,
    set_aside_after: Duration,
) -> Verdict {
    if !answers {
        return Verdict::RetryAt(now + backoff);
    }
    let deadline = since + set_aside_after;
    if stopping || now >= deadline {
        Verdict::SetAside
    } else {
        Verdict::RetryAt((now + backoff).min(deadline))
    }
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
    /// Write (or set aside) everything passed on before it, then end.
    Stop(oneshot::Sender<()>),
}

/// A settlement the ledger refused when written alone, retried apart from the batches.
struct Refused {
    queued: Queued,
    /// Its place among the refused settlements, for the flushes that wait for it.
    seq: u64,
    /// The ledger's last refusal (an outage's error is not kept: it says nothing of the record).
    error: String,
    /// When the ledger first refused it alone.
    since: Instant,
    retry_at: Instant,
    /// The pause after the next refusal.
    backoff: Duration,
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
                    let _ = self.commits.send(Commit::Stop(flushed));
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
    set_aside_after: Duration,
    /// Settlements the ledger refused alone, each until it is written or set aside.
    refused: Vec<Refused>,
    /// The `seq` of the next refused settlement.
    next_seq: u64,
    /// Flushes waiting for the refused settlements queued before them: each waits for those
    /// whose `seq` is below its number.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
}

impl Committer {
    async fn run(mut self) {
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
    async fn write(&mut self, mut batch: Vec<Queued>) {
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

    async fn write_alone(&mut self, mut queued: Queued) {
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

    fn refuse(&mut self, queued: Queued, error: String) {
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
    async fn retry_due(&mut self, stopping: bool) {
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
    async fn write_or_set_aside_refused(&mut self) {
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
    async fn retry(&mut self, mut refused: Refused, stopping: bool) -> Option<Refused> {
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
    fn answer_flushes(&mut self) {
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
    async fn committed(&self, batch: &mut [Queued], outcomes: &[SettleOutcome]) {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::local::LocalCache;
    use crate::domain::{RequestId, TokenUsage};
    use crate::ledger::sqlite::SqliteLedger;
    use crate::ledger::{EntryType, GrantRequest, UsageSource};
    use crate::metering::LedgerSource;

    #[test]
    fn a_refusal_while_the_ledger_answers_is_retried_until_the_bound_then_set_aside() {
        let since = Instant::now();
        let bound = Duration::from_secs(30);
        let backoff = Duration::from_secs(5);
        let at = |secs| since + Duration::from_secs(secs);
        // Retried after the backoff; the last retry falls exactly on the bound.
        assert_eq!(
            verdict(true, false, since, at(1), backoff, bound),
            Verdict::RetryAt(at(6))
        );
        assert_eq!(
            verdict(true, false, since, at(28), backoff, bound),
            Verdict::RetryAt(at(30))
        );
        assert_eq!(
            verdict(true, false, since, at(30), backoff, bound),
            Verdict::SetAside
        );
        // Stopping: no later retry would come.
        assert_eq!(
            verdict(true, true, since, at(1), backoff, bound),
            Verdict::SetAside
        );
    }

    #[test]
    fn each_retry_waits_longer_than_the_last_up_to_the_cap() {
        let mut pauses = vec![FIRST_BACKOFF];
        while pauses.len() < 10 {
            let next = doubled(*pauses.last().expect("one"));
            pauses.push(next);
        }
        let millis: Vec<u128> = pauses.iter().map(Duration::as_millis).collect();
        assert_eq!(
            millis,
            [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]
        );
        // A retry is due one pause after the failure, never before it.
        let now = Instant::now();
        assert_eq!(
            retry_after(now, Duration::from_millis(800)),
            now + Duration::from_millis(800)
        );
        assert!(retry_after(now, FIRST_BACKOFF) > now);
    }

    #[test]
    fn an_outage_sets_nothing_aside_however_long_it_lasts() {
        let since = Instant::now();
        let later = since + Duration::from_secs(3600);
        let backoff = Duration::from_secs(5);
        for stopping in [false, true] {
            assert_eq!(
                verdict(false, stopping, since, later, backoff, Duration::ZERO),
                Verdict::RetryAt(later + backoff)
            );
        }
    }

    struct Fixture {
        ledger: SharedLedger,
        cache: SharedCache,
        account: AccountId,
        dir: tempfile::TempDir,
    }

    /// A fresh SQLite ledger where `acct` has 10 credits, and an in-process cache that has
    /// loaded `acct`.
    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let ledger = SqliteLedger::open_file(&dir.path().join("ledger.db"))
            .await
            .expect("open");
        ledger.migrate().await.expect("migrate");
        let ledger: SharedLedger = Arc::new(ledger);
        let account = AccountId::parse("acct").expect("valid");
        ledger
            .grant(&GrantRequest {
                account: account.clone(),
                entry_type: EntryType::Bonus,
                amount: Credits::from_whole(10).expect("small"),
                description: "test".into(),
                reference: None,
                expires_at_ms: None,
                draw_first_from: Vec::new(),
            })
            .await
            .expect("grant");
        let cache: SharedCache = Arc::new(LocalCache::new());
        let fixture = Fixture {
            ledger,
            cache,
            account,
            dir,
        };
        fixture.view().await;
        fixture
    }

    impl Fixture {
        async fn view(&self) -> crate::cache::BalanceView {
            let source = LedgerSource {
                ledger: self.ledger.clone(),
                signup_grant: Credits::ZERO,
            };
            self.cache
                .view(&Bucket::Account(self.account.clone()), &source)
                .await
                .expect("view")
        }

        /// A settlement of `acct`; a negative cost makes both ledgers refuse it.
        fn settlement(&self, id: &str, cost: i64) -> Settlement {
            Settlement {
                request_id: RequestId::from_string(id.into()),
                account: self.account.clone(),
                api_key_id: None,
                endpoint: "chat/completions".into(),
                model: "mock-1".into(),
                upstream: "fake".into(),
                usage: TokenUsage {
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    cached_tokens: 0,
                },
                source: UsageSource::Reported,
                cost: Credits::from_micros(cost),
                uncharged: Credits::ZERO,
                hold: Credits::from_micros(cost.abs()),
                stream: false,
                status: "completed".into(),
                started_at_ms: now_ms(),
                finished_at_ms: now_ms(),
            }
        }

        /// Renames the ledger's table of set-aside settlements away (`away`) or back, from a
        /// connection of its own: while it is away, setting a settlement aside fails though the
        /// ledger still answers.
        async fn take_set_aside_table(&self, away: bool) {
            use sqlx::Connection as _;
            let url = format!("sqlite://{}", self.dir.path().join("ledger.db").display());
            let mut conn = sqlx::SqliteConnection::connect(&url)
                .await
                .expect("a second connection");
            let sql = if away {
                "ALTER TABLE settlements_set_aside RENAME TO set_aside_away"
            } else {
                "ALTER TABLE set_aside_away RENAME TO settlements_set_aside"
            };
            sqlx::query(sql).execute(&mut conn).await.expect("rename");
            conn.close().await.expect("close");
        }

        async fn balance(&self) -> Credits {
            self.ledger
                .account(&self.account)
                .await
                .expect("read")
                .expect("exists")
                .balance
        }

        async fn set_aside(&self) -> Vec<String> {
            self.ledger
                .set_aside_settlements(None)
                .await
                .expect("list")
                .into_iter()
                .map(|entry| entry.request_id)
                .collect()
        }
    }

    /// A recovery pass says what it did: the holds it released, the orphans it wrote.
    #[tokio::test]
    async fn a_recovery_pass_counts_the_holds_it_released() {
        crate::test_support::time_limit::limited(async move {
            let fx = fixture().await;
            let source = LedgerSource {
                ledger: fx.ledger.clone(),
                signup_grant: Credits::ZERO,
            };
            for (id, deadline_ms) in [("gone", 1), ("running", i64::MAX)] {
                let hold = crate::cache::HoldSpec {
                    request_id: id.into(),
                    amount: Credits::from_whole(1).expect("small"),
                    owner: "test".into(),
                    deadline_ms,
                };
                fx.cache
                    .reserve(
                        &Bucket::Account(fx.account.clone()),
                        &hold,
                        Credits::ZERO,
                        &source,
                    )
                    .await
                    .expect("fits");
            }
            let recovered = recover(&*fx.ledger, &*fx.cache, Duration::from_secs(60))
                .await
                .expect("recovers");
            assert_eq!(
                recovered,
                Recovered {
                    reaped: 1,
                    written: 0,
                    set_aside: 0
                }
            );
            assert_eq!(fx.view().await.held, Credits::from_whole(1).expect("small"));
        })
        .await;
    }

    // On a current-thread runtime nothing runs before the test awaits, so the three settlements
    // reach the committer as one batch, which the ledger refuses for the bad one.
    #[tokio::test]
    async fn a_refused_settlement_holds_up_neither_its_batch_nor_later_ones() {
        crate::test_support::time_limit::limited(async move {
            let fx = fixture().await;
            let (settler, task) = spawn(
                fx.ledger.clone(),
                fx.cache.clone(),
                SettlerConfig {
                    batch_max: 16,
                    set_aside_after: Duration::from_secs(2),
                },
            );
            let good = settler.settle(fx.settlement("good-1", 1_000), None);
            let bad = settler.settle(fx.settlement("bad", -1), None);
            let also_good = settler.settle(fx.settlement("good-2", 2_000), None);
            let quick = Duration::from_millis(1_500);
            tokio::time::timeout(quick, good)
                .await
                .expect("good-1 in time")
                .expect("told");
            tokio::time::timeout(quick, also_good)
                .await
                .expect("good-2 in time")
                .expect("told");
            // A later settlement is not held up either.
            let later = settler.settle(fx.settlement("good-3", 3_000), None);
            tokio::time::timeout(quick, later)
                .await
                .expect("good-3 in time")
                .expect("told");
            assert_eq!(
                fx.ledger
                    .account(&fx.account)
                    .await
                    .expect("read")
                    .expect("exists")
                    .balance,
                Credits::from_micros(10_000_000 - 6_000)
            );
            assert!(fx.set_aside().await.is_empty(), "set aside before its time");

            // The bad one is set aside after its bound (about 2 s); its waiter is told, a flush
            // waits for it, and the cache no longer counts its pending charge.
            settler.flush().await;
            assert_eq!(fx.set_aside().await, ["bad"]);
            tokio::time::timeout(quick, bad)
                .await
                .expect("told in time")
                .expect("told");
            let entry = &fx
                .ledger
                .set_aside_settlements(Some(false))
                .await
                .expect("list")[0];
            assert!(entry.error.contains("negative cost"), "{entry:?}");
            assert_eq!(entry.account, "acct");
            let record: Settlement = serde_json::from_str(&entry.record).expect("the record");
            assert_eq!(record.cost, Credits::from_micros(-1));
            let view = fx.view().await;
            assert_eq!(
                (view.balance, view.held),
                (Credits::from_micros(10_000_000 - 6_000), Credits::ZERO)
            );
            let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].problem.contains("settlement bad was set aside"));
            settler.stop().await;
            task.await.expect("settler ends");
        })
        .await;
    }

    /// A settlement waiting for its retry, an hour from being set aside, does not stop the
    /// committer: every settlement sent meanwhile is written.
    #[tokio::test]
    async fn settlements_keep_being_written_while_a_refused_one_waits() {
        crate::test_support::time_limit::limited(async move {
            let fx = fixture().await;
            let (settler, task) = spawn(
                fx.ledger.clone(),
                fx.cache.clone(),
                SettlerConfig {
                    batch_max: 16,
                    set_aside_after: Duration::from_secs(3600),
                },
            );
            let bad = settler.settle(fx.settlement("bad", -1), None);
            // Refused alone, it now waits apart for its retry.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for (id, cost) in [("good-1", 1_000), ("good-2", 2_000), ("good-3", 3_000)] {
                let durable = settler.settle(fx.settlement(id, cost), None);
                tokio::time::timeout(Duration::from_millis(1_500), durable)
                    .await
                    .expect("in time")
                    .unwrap_or_else(|_| panic!("{id} was dropped unwritten"));
            }
            assert_eq!(fx.balance().await, Credits::from_micros(10_000_000 - 6_000));
            assert!(fx.set_aside().await.is_empty(), "set aside before its time");
            settler.stop().await;
            task.await.expect("settler ends");
            bad.await.expect("told");
            assert_eq!(fx.set_aside().await, ["bad"]);
        })
        .await;
    }

    /// Without `stop`, dropping every handle ends the settler all the same: what was queued is
    /// written, and what the ledger refuses is set aside at once (no later try would come).
    #[tokio::test]
    async fn a_settler_whose_handles_are_all_dropped_writes_what_was_queued_and_ends() {
        crate::test_support::time_limit::limited(async move {
            let fx = fixture().await;
            let config = || SettlerConfig {
                batch_max: 16,
                set_aside_after: Duration::from_secs(3600),
            };
            let (settler, task) = spawn(fx.ledger.clone(), fx.cache.clone(), config());
            let good = settler.settle(fx.settlement("good-1", 1_000), None);
            drop(settler);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("ends once no handle is left")
                .expect("no panic");
            good.await.expect("told");
            assert_eq!(fx.balance().await, Credits::from_micros(10_000_000 - 1_000));

            let (settler, task) = spawn(fx.ledger.clone(), fx.cache.clone(), config());
            let good = settler.settle(fx.settlement("good-2", 2_000), None);
            let bad = settler.settle(fx.settlement("bad", -1), None);
            drop(settler);
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("ends once no handle is left, though one settlement is refused")
                .expect("no panic");
            good.await.expect("told");
            bad.await.expect("told");
            assert_eq!(fx.balance().await, Credits::from_micros(10_000_000 - 3_000));
            assert_eq!(fx.set_aside().await, ["bad"]);
        })
        .await;
    }

    /// A refused settlement that cannot be set aside either (the ledger answers but fails the
    /// write) is kept and tried again, its waiter and flushes still waiting, until it can be.
    #[tokio::test]
    async fn a_refused_settlement_that_cannot_be_set_aside_yet_is_kept_until_it_can() {
        crate::test_support::time_limit::limited(async move {
            let fx = fixture().await;
            fx.take_set_aside_table(true).await;
            let (settler, task) = spawn(
                fx.ledger.clone(),
                fx.cache.clone(),
                SettlerConfig {
                    batch_max: 16,
                    set_aside_after: Duration::from_millis(200),
                },
            );
            let mut bad = settler.settle(fx.settlement("bad", -1), None);
            // Past its bound, setting it aside has failed several times.
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(
                matches!(bad.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
                "told before it was set aside"
            );
            fx.take_set_aside_table(false).await;
            tokio::time::timeout(Duration::from_secs(10), settler.flush())
                .await
                .expect("set aside once it can be");
            assert_eq!(fx.set_aside().await, ["bad"]);
            bad.await.expect("told");
            assert_eq!(fx.balance().await, Credits::from_whole(10).expect("small"));
            settler.stop().await;
            task.await.expect("settler ends");
        })
        .await;
    }

    /// At the stop no later try would come: a refused settlement that cannot be set aside is
    /// given up (its record logged; a shared cache still journals it), and the stop ends.
    #[tokio::test]
    async fn stopping_gives_up_a_refused_settlement_that_cannot_be_set_aside() {
        crate::test_support::time_limit::limited(async move {
            let fx = fixture().await;
            fx.take_set_aside_table(true).await;
            let (settler, task) = spawn(
                fx.ledger.clone(),
                fx.cache.clone(),
                SettlerConfig {
                    batch_max: 16,
                    set_aside_after: Duration::from_secs(3600),
                },
            );
            let bad = settler.settle(fx.settlement("bad", -1), None);
            tokio::time::timeout(Duration::from_secs(5), settler.stop())
                .await
                .expect("stopped promptly");
            task.await.expect("settler ends");
            bad.await.expect("its waiter was told");
            fx.take_set_aside_table(false).await;
            assert!(fx.set_aside().await.is_empty());
            assert_eq!(fx.balance().await, Credits::from_whole(10).expect("small"));
        })
        .await;
    }

    #[tokio::test]
    async fn stopping_sets_a_refused_settlement_aside_at_once() {
        crate::test_support::time_limit::limited(async move {
            let fx = fixture().await;
            let (settler, task) = spawn(
                fx.ledger.clone(),
                fx.cache.clone(),
                SettlerConfig {
                    batch_max: 16,
                    set_aside_after: Duration::from_secs(3600),
                },
            );
            let bad = settler.settle(fx.settlement("bad", -1), None);
            tokio::time::timeout(Duration::from_secs(5), settler.stop())
                .await
                .expect("stopped promptly");
            task.await.expect("settler ends");
            bad.await.expect("its waiter was told");
            assert_eq!(fx.set_aside().await, ["bad"]);
        })
        .await;
    }
}
