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

mod committer;
mod recorder;
mod recover;
#[cfg(test)]
mod tests;

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cache::{BalanceCache, SharedCache};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};
use crate::ledger::{
    Bucket, Ledger, LedgerError, SetAside, SettleOutcome, Settlement, SharedLedger, Snapshot,
};

use committer::*;
pub use recorder::record;
use recorder::*;
pub use recover::{Recovered, recover};

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
