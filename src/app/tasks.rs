//! The gateway's background tasks, owned by one [`Supervisor`]: one stop signal for all of
//! them, and a shutdown that awaits each one, the settler last (docs/architecture.md, section 5).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::SharedCache;
use crate::ledger::{Ledger, SharedLedger};
use crate::metering::settler::{self, SettlerHandle};
use crate::state::AppState;

/// Owns the background tasks. Each watches [`Supervisor::stop_signal`]; it turns true at
/// [`Supervisor::stop`], and a supervisor dropped without stopping (a gateway that failed to
/// start) drops the signal's sender, which ends them too.
pub struct Supervisor {
    stop: watch::Sender<bool>,
    /// In start order; stopped together, awaited in this order.
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    /// Stopped once nothing can settle any more, and awaited.
    settler: Option<(SettlerHandle, JoinHandle<()>)>,
    /// Its own background work (the Redis heartbeat) ends last: until the settler has written
    /// everything, siblings must count this instance alive.
    cache: Option<SharedCache>,
}

/// How long shutdown waits for a background task to end once told to.
const TASK_STOP: Duration = Duration::from_secs(10);
/// How long shutdown waits for the ledger to take the last settlements.
const SETTLER_STOP: Duration = Duration::from_secs(30);

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Supervisor {
            stop: watch::channel(false).0,
            tasks: Vec::new(),
            settler: None,
            cache: None,
        }
    }

    /// The signal every background task watches: true (or closed) when it must end.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Takes charge of a task that ends when [`Self::stop_signal`] turns true.
    pub fn supervise(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.tasks.push((name, task));
    }

    /// Takes charge of the settler, which is stopped through its handle, after everything else.
    pub fn supervise_settler(&mut self, handle: SettlerHandle, task: JoinHandle<()>) {
        self.settler = Some((handle, task));
    }

    /// Takes charge of the cache's own background work, ended after the settler.
    pub fn supervise_cache(&mut self, cache: SharedCache) {
        self.cache = Some(cache);
    }

    /// Stops every task and waits for each; then stops the settler once it has written
    /// everything queued (or set aside what the ledger refuses), and waits for it; then the
    /// cache's heartbeat. Call it once no request can settle any more.
    pub async fn stop(mut self) {
        self.stop_tasks_and_settler().await;
        if let Some(cache) = self.cache.take()
            && tokio::time::timeout(TASK_STOP, cache.stop()).await.is_err()
        {
            tracing::error!(timeout = ?TASK_STOP, "the cache's heartbeat did not stop in time");
        }
    }

    async fn stop_tasks_and_settler(&mut self) {
        let _ = self.stop.send(true);
        for (name, task) in self.tasks.drain(..) {
            match tokio::time::timeout(TASK_STOP, task).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(task = name, %error, "background task failed"),
                Err(_) => {
                    tracing::error!(task = name, timeout = ?TASK_STOP, "background task did not stop in time")
                }
            }
        }
        let Some((handle, task)) = self.settler.take() else {
            return;
        };
        match tokio::time::timeout(SETTLER_STOP, handle.stop()).await {
            Ok(()) => {
                if let Err(error) = task.await {
                    tracing::error!(%error, "the settler failed");
                }
                tracing::info!("all settlements written");
            }
            Err(_) => tracing::error!(
                timeout = ?SETTLER_STOP,
                "the ledger did not take the last settlements in time; stopping without them \
                 (with Redis they stay journaled for a sibling or the next start)"
            ),
        }
    }
}

/// How often each instance reads the ledger's cache epoch. A change made outside the process
/// is seen within this plus one ledger read; the request path reads nothing for it.
pub const EPOCH_POLL: Duration = Duration::from_millis(100);

/// Reads the cache epoch every [`EPOCH_POLL`] until `stop`. While the ledger does not answer,
/// the cached balances and holds still bound spending; only out-of-band changes (a CLI grant,
/// a key revoked elsewhere) wait until it answers again. Failing and recovering are logged
/// once each, not at every tick.
pub fn spawn_epoch_watcher(state: AppState, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(EPOCH_POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            match state.sync_external_changes().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("out-of-band ledger changes are seen again");
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    failing = true;
                    tracing::warn!(%error, "out-of-band ledger changes wait; serving from cache");
                }
                Err(_) => {}
            }
        }
    })
}

/// Every `interval`: release expired holds, write settlements orphaned by a dead instance (or
/// set aside those the ledger refuses) and apply order credit moves left pending;
/// every `sweep_every`: take expired grant remainders out of balances.
pub fn spawn_recovery(
    ledger: SharedLedger,
    cache: SharedCache,
    payments: Arc<crate::billing::service::Payments>,
    interval: Duration,
    orphan_age: Duration,
    sweep_every: Duration,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            match settler::recover(&*ledger, &*cache, orphan_age).await {
                Ok(recovered) if recovered == settler::Recovered::default() => {}
                Ok(settler::Recovered {
                    reaped,
                    written,
                    set_aside,
                }) => {
                    tracing::info!(
                        reaped,
                        written,
                        set_aside,
                        "recovered holds and settlements"
                    )
                }
                Err(error) => {
                    tracing::warn!(%error, "recovery pass failed; retrying next interval")
                }
            }
            // Credit moves whose webhook failed half-way and was not delivered again.
            match payments.apply_moves(None).await {
                Ok(0) => {}
                Ok(applied) => tracing::info!(applied, "applied pending order credit moves"),
                Err(error) => tracing::warn!(%error, "applying order credit moves failed"),
            }
            if last_sweep.is_none_or(|at| at.elapsed() >= sweep_every) {
                last_sweep = Some(tokio::time::Instant::now());
                sweep_expired_grants(&*ledger, &*cache).await;
            }
        }
    })
}

/// Takes expired grant remainders out of the ledger and updates the cached balances, keeping
/// back what the cache holds or has pending for requests that started before they lapsed.
pub async fn sweep_expired_grants(ledger: &dyn Ledger, cache: &dyn crate::cache::BalanceCache) {
    let in_flight = crate::cache::InFlightHolds(cache);
    match ledger
        .expire_grants(crate::domain::time::now_ms(), &in_flight)
        .await
    {
        Ok(changed) => {
            for (account, snapshot) in &changed {
                if let Err(error) = cache
                    .apply(&crate::ledger::Bucket::Account(account.clone()), *snapshot)
                    .await
                {
                    tracing::warn!(%error, %account, "cannot update a cached balance after expiry");
                }
            }
            if !changed.is_empty() {
                tracing::info!(accounts = changed.len(), "expired grant remainders swept");
            }
        }
        Err(error) => tracing::warn!(%error, "expiry sweep failed; retrying next time"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A task like every background task: ends when its stop signal turns true or closes, and
    /// counts that it ended.
    fn task(mut stop: watch::Receiver<bool>, ended: Arc<AtomicUsize>) -> JoinHandle<()> {
        tokio::spawn(async move {
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
            ended.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[tokio::test]
    async fn stopping_ends_every_task_and_waits_for_each() {
        let ended = Arc::new(AtomicUsize::new(0));
        let mut supervisor = Supervisor::new();
        for name in ["one", "two", "three"] {
            supervisor.supervise(name, task(supervisor.stop_signal(), ended.clone()));
        }
        supervisor.stop().await;
        assert_eq!(
            ended.load(Ordering::SeqCst),
            3,
            "stop returned before its tasks ended"
        );
    }

    #[tokio::test]
    async fn a_supervisor_dropped_without_stopping_still_ends_its_tasks() {
        let ended = Arc::new(AtomicUsize::new(0));
        let mut supervisor = Supervisor::new();
        let handle = task(supervisor.stop_signal(), ended.clone());
        supervisor.supervise("orphan", tokio::spawn(async {}));
        drop(supervisor);
        tokio::time::timeout(Duration::from_secs(5), handle)
            .await
            .expect("the task ended")
            .expect("the task did not panic");
        assert_eq!(ended.load(Ordering::SeqCst), 1);
    }
}
