//! Builds the gateway from a validated [`Config`]: ledger, cache, pricing, settler, router;
//! binds the listener; serves until the shutdown future resolves, then drains open streams and
//! flushes every pending settlement.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::auth::api_keys::ApiKeyCache;
use crate::auth::jwt::JwtVerifier;
use crate::cache::SharedCache;
use crate::config::Config;
use crate::config::JwtSettings;
use crate::ledger::sqlite::SqliteLedger;
use crate::ledger::{Ledger, SharedLedger};
use crate::metering::Meter;
use crate::metering::pricing::{PriceTable, PricingHandle};
use crate::metering::pricing_sync::{self, PricingRegistry};
use crate::metering::settler::{self, SettlerConfig};
use crate::proxy::Proxy;
use crate::proxy::upstream::Upstreams;
use crate::routes;
use crate::state::AppState;

/// How often each instance reads the ledger's cache epoch. A change made outside the process
/// is seen within this plus one ledger read; the request path reads nothing for it.
pub const EPOCH_POLL: Duration = Duration::from_millis(100);

/// Reads the cache epoch every [`EPOCH_POLL`] until `stop`. While the ledger does not answer,
/// the cached balances and holds still bound spending; only out-of-band changes (a CLI grant,
/// a key revoked elsewhere) wait until it answers again. Failing and recovering are logged
/// once each, not at every tick.
fn spawn_epoch_watcher(
    state: AppState,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> JoinHandle<()> {
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

/// Opens the ledger named by the config and applies its migrations: `mysql://` opens the shared
/// production store, `sqlite:` the embedded file (whose directory is created if missing).
pub async fn open_ledger(config: &Config) -> anyhow::Result<SharedLedger> {
    let url = &config.database.url;
    let max_connections = config.database.max_connections;
    let ledger: SharedLedger = if url.starts_with("mysql://") {
        // The URL may carry a password: name only what follows the credentials.
        let shown = url.rsplit_once('@').map_or(url.as_str(), |(_, host)| host);
        let ledger = crate::ledger::mysql::MySqlLedger::connect(url, max_connections)
            .await
            .with_context(|| format!("opening MySQL database {shown}"))?;
        ledger.migrate().await.context("applying migrations")?;
        Arc::new(ledger)
    } else if url.starts_with("sqlite:") {
        if let Some(path) = config.sqlite_path()
            && let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let ledger = SqliteLedger::connect(url, max_connections)
            .await
            .with_context(|| format!("opening database {url}"))?;
        ledger.migrate().await.context("applying migrations")?;
        Arc::new(ledger)
    } else {
        anyhow::bail!("database.url: use sqlite://PATH or mysql://USER@HOST/DB");
    };
    Ok(ledger)
}

/// Builds the JWT verifier, or none when no key source is configured.
pub async fn jwt_verifier(settings: &JwtSettings) -> anyhow::Result<Option<JwtVerifier>> {
    let configured = settings.secret.as_ref().is_some_and(|s| !s.is_empty())
        || settings.public_key_file.is_some()
        || settings.jwks_file.is_some()
        || settings.jwks_url.is_some();
    if !configured {
        return Ok(None);
    }
    Ok(Some(JwtVerifier::from_settings(settings).await?))
}

pub struct App {
    listener: TcpListener,
    router: Router,
    state: AppState,
    settler_task: JoinHandle<()>,
    pricing_watcher: JoinHandle<()>,
    recovery: JoinHandle<()>,
    pricing_sync: Option<JoinHandle<()>>,
    epoch_watcher: JoinHandle<()>,
    /// Tells the background tasks (pricing watcher, recovery, epoch watcher) to stop.
    stop_background: tokio::sync::watch::Sender<bool>,
    shutdown_grace: Duration,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let instance = format!("gw_{}", uuid::Uuid::new_v4().simple());
        let ledger = open_ledger(&config).await?;
        let cache: SharedCache = crate::cache::open(&config.cache, &instance)
            .await
            .context("opening the balance cache")?;
        let pricing_path = config.metering.pricing_file.clone();
        let table = PriceTable::load(&pricing_path)?;
        let pricing = PricingHandle::new(table);
        let (stop_background, watcher_stopped) = tokio::sync::watch::channel(false);
        let nudge = Arc::new(tokio::sync::Notify::new());
        let pricing_watcher = pricing.spawn_watcher(
            pricing_path,
            Duration::from_millis(config.metering.pricing_poll_ms.max(50)),
            watcher_stopped,
            nudge.clone(),
        );
        let pricing_registry = match config.cache.redis_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => PricingRegistry::new(url, &config.cache.key_prefix)
                .transpose()
                .context("cache.redis_url")?,
            None => None,
        };
        let pricing_sync = pricing_registry.clone().map(|registry| {
            pricing_sync::spawn(
                registry,
                pricing.clone(),
                nudge,
                instance.clone(),
                stop_background.subscribe(),
            )
        });
        let (settler, settler_task) = settler::spawn(
            ledger.clone(),
            cache.clone(),
            SettlerConfig {
                batch_max: config.metering.settle_batch_max,
                set_aside_after: Duration::from_secs(config.metering.set_aside_after_secs),
            },
        );
        let meter = Meter::new(
            ledger.clone(),
            cache.clone(),
            pricing,
            config.metering.clone(),
            config.accounts.signup_grant,
            settler.clone(),
            instance.clone(),
        );
        let packages = Arc::new(config.packages.clone());
        let payments = Arc::new(
            crate::billing::service::Payments::new(
                &config,
                ledger.clone(),
                cache.clone(),
                packages.clone(),
            )
            .context("config: payments")?,
        );
        let recovery = spawn_recovery(
            ledger.clone(),
            cache.clone(),
            payments.clone(),
            Duration::from_millis(config.metering.recovery_interval_ms.max(100)),
            Duration::from_secs(config.metering.orphan_after_secs.max(1)),
            Duration::from_secs(config.metering.expiry_sweep_secs.max(1)),
            stop_background.subscribe(),
        );
        let jwt = jwt_verifier(&config.auth.jwt).await?;
        if jwt.is_none() {
            tracing::warn!("no JWT key configured: only gateway API keys can call /v1");
        }
        let auth = Authenticator::new(
            jwt,
            ApiKeyCache::new(ledger.clone()),
            config.admin.token.clone(),
            config.admin.jwt_role.clone(),
        );
        let upstreams = config
            .resolve_upstreams(|name| std::env::var(name).ok())
            .map_err(|e| anyhow::anyhow!("config: {e}"))?;
        let epoch = ledger.cache_epoch().await?;
        let upstreams = Arc::new(Upstreams::new(upstreams));
        let state = AppState {
            ledger,
            cache,
            proxy: Proxy::new(
                meter.clone(),
                upstreams.clone(),
                config.server.body_limit_bytes,
            ),
            meter,
            auth: Arc::new(auth),
            upstreams,
            settler,
            pricing_registry,
            pricing_path: config.metering.pricing_file.clone(),
            packages,
            payments,
            epoch: Arc::new(AtomicI64::new(epoch)),
        };
        let listener = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let epoch_watcher = spawn_epoch_watcher(state.clone(), stop_background.subscribe());
        Ok(App {
            router: routes::router(state.clone()),
            epoch_watcher,
            listener,
            state,
            settler_task,
            pricing_watcher,
            pricing_sync,
            recovery,
            stop_background,
            shutdown_grace: Duration::from_secs(config.server.shutdown_grace_secs),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves and waits up to the grace period for open requests. Then
    /// cuts the requests still running (each is billed for what it delivered), waits for every
    /// hold to end, stops the background tasks, and stops the settler last, once it has written
    /// every settlement.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let stopping = Arc::new(tokio::sync::Notify::new());
        let signal = stopping.clone();
        // Small writes (an SSE event, a short answer) go out at once: with Nagle's algorithm a
        // write waits for the ACK of the previous one, which the client's delayed ACK holds
        // back for tens of milliseconds.
        let listener = self.listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
            }
        });
        let server = axum::serve(listener, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: draining open requests");
            signal.notify_one();
        });
        let grace = self.shutdown_grace;
        tokio::select! {
            result = server.into_future() => result.context("serving")?,
            () = async { stopping.notified().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "grace period over; cutting the remaining requests");
            }
        }
        // Connections still open run on their own tasks: cutting ends their streams, which
        // queue their settlements as they end.
        let meter = &self.state.meter;
        meter.cut();
        if tokio::time::timeout(DRAIN_AFTER_CUT, meter.drained())
            .await
            .is_err()
        {
            tracing::error!(
                timeout = ?DRAIN_AFTER_CUT,
                "requests still hold credits after being cut; their holds expire at their deadlines"
            );
        }
        let _ = self.stop_background.send(true);
        let _ = self.pricing_watcher.await;
        let _ = self.recovery.await;
        let _ = self.epoch_watcher.await;
        if let Some(pricing_sync) = self.pricing_sync {
            let _ = pricing_sync.await;
        }
        // Last: everything queued is written before the settler stops.
        match tokio::time::timeout(SETTLER_STOP, self.state.settler.stop()).await {
            Ok(()) => {
                let _ = self.settler_task.await;
                tracing::info!("all settlements written");
            }
            Err(_) => tracing::error!(
                timeout = ?SETTLER_STOP,
                "the ledger did not take the last settlements in time; stopping without them \
                 (with Redis they stay journaled for a sibling or the next start)"
            ),
        }
        Ok(())
    }
}

/// How long shutdown waits for cut requests to end their holds.
const DRAIN_AFTER_CUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the ledger to take the last settlements.
const SETTLER_STOP: Duration = Duration::from_secs(30);

/// Every `interval`: release expired holds, write settlements orphaned by a dead instance (or
/// set aside those the ledger refuses) and apply order credit moves left pending;
/// every `sweep_every`: take expired grant remainders out of balances.
fn spawn_recovery(
    ledger: SharedLedger,
    cache: SharedCache,
    payments: Arc<crate::billing::service::Payments>,
    interval: Duration,
    orphan_age: Duration,
    sweep_every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
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
