//! Builds the gateway from a validated [`Config`]: ledger, cache, pricing, settler, router;
//! binds the listener; serves until the shutdown future resolves, then drains open streams and
//! flushes every pending settlement.

pub mod tasks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::auth::api_keys::ApiKeyCache;
use crate::auth::jwt::JwtVerifier;
use crate::billing::store::{PaymentStore, SharedPaymentStore, SqlPaymentStore};
use crate::cache::SharedCache;
use crate::config::Config;
use crate::config::JwtSettings;
use crate::ledger::mysql::MySqlLedger;
use crate::ledger::sql::SqlAdapter;
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
pub use tasks::{EPOCH_POLL, Supervisor, sweep_expired_grants};

/// The ledger and the payments store, on one database.
pub struct Stores {
    pub ledger: SharedLedger,
    pub payments: SharedPaymentStore,
}

/// Opens the database named by the config and applies its migrations: `mysql://` opens the
/// shared production store, `sqlite:` the embedded file (whose directory is created if
/// missing). The ledger and the payments store share its connection pool.
pub async fn open_stores(config: &Config) -> anyhow::Result<Stores> {
    let url = &config.database.url;
    let max_connections = config.database.max_connections;
    if url.starts_with("mysql://") {
        // The URL may carry a password: name only what follows the credentials.
        let shown = url.rsplit_once('@').map_or(url.as_str(), |(_, host)| host);
        let ledger = MySqlLedger::connect(url, max_connections)
            .await
            .with_context(|| format!("opening MySQL database {shown}"))?;
        stores_on(ledger).await
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
        stores_on(ledger).await
    } else {
        anyhow::bail!("database.url: use sqlite://PATH or mysql://USER@HOST/DB");
    }
}

/// Migrates the opened database and builds the payments store on the ledger's pool.
async fn stores_on<L>(ledger: L) -> anyhow::Result<Stores>
where
    L: SqlAdapter + Ledger,
    SqlPaymentStore<L::Db>: PaymentStore,
{
    Ledger::migrate(&ledger)
        .await
        .context("applying migrations")?;
    Ok(Stores {
        payments: Arc::new(SqlPaymentStore::new(ledger.pool().clone())),
        ledger: Arc::new(ledger),
    })
}

/// Opens the ledger alone (see [`open_stores`]).
pub async fn open_ledger(config: &Config) -> anyhow::Result<SharedLedger> {
    Ok(open_stores(config).await?.ledger)
}

/// Builds the JWT verifier, or none when no key source is configured.
pub async fn jwt_verifier(settings: &JwtSettings) -> anyhow::Result<Option<JwtVerifier>> {
    if !settings.has_key_source() {
        return Ok(None);
    }
    Ok(Some(JwtVerifier::from_settings(settings).await?))
}

pub struct App {
    listener: TcpListener,
    router: Router,
    state: AppState,
    /// The background tasks: pricing watcher and sync, recovery, epoch watcher, settler.
    tasks: Supervisor,
    shutdown_grace: Duration,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let instance = format!("gw_{}", uuid::Uuid::new_v4().simple());
        let Stores {
            ledger,
            payments: payment_store,
        } = open_stores(&config).await?;
        let cache: SharedCache = crate::cache::open(&config.cache, &instance)
            .await
            .context("opening the balance cache")?;
        let pricing_path = config.metering.pricing_file.clone();
        let table = PriceTable::load(&pricing_path)?;
        let pricing = PricingHandle::new(table);
        let mut tasks = Supervisor::new();
        let nudge = Arc::new(tokio::sync::Notify::new());
        tasks.supervise(
            "pricing watcher",
            pricing.spawn_watcher(
                pricing_path,
                Duration::from_millis(config.metering.pricing_poll_ms.max(50)),
                tasks.stop_signal(),
                nudge.clone(),
            ),
        );
        let pricing_registry = match config.cache.redis_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => PricingRegistry::new(url, &config.cache.key_prefix)
                .transpose()
                .context("cache.redis_url")?,
            None => None,
        };
        if let Some(registry) = pricing_registry.clone() {
            let sync = pricing_sync::spawn(
                registry,
                pricing.clone(),
                nudge,
                instance.clone(),
                tasks.stop_signal(),
            );
            tasks.supervise("pricing sync", sync);
        }
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
                payment_store,
                cache.clone(),
                packages.clone(),
            )
            .context("config: payments")?,
        );
        tasks.supervise_settler(settler.clone(), settler_task);
        tasks.supervise_cache(cache.clone());
        let recovery = tasks::spawn_recovery(
            ledger.clone(),
            cache.clone(),
            payments.clone(),
            Duration::from_millis(config.metering.recovery_interval_ms.max(100)),
            Duration::from_secs(config.metering.orphan_after_secs.max(1)),
            Duration::from_secs(config.metering.expiry_sweep_secs.max(1)),
            tasks.stop_signal(),
        );
        tasks.supervise("recovery", recovery);
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
        tasks.supervise(
            "epoch watcher",
            tasks::spawn_epoch_watcher(state.clone(), tasks.stop_signal()),
        );
        Ok(App {
            router: routes::router(state.clone()),
            listener,
            state,
            tasks,
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
        // Last: the background tasks, then the settler once it has written everything queued.
        self.tasks.stop().await;
        Ok(())
    }
}

/// How long shutdown waits for cut requests to end their holds.
const DRAIN_AFTER_CUT: Duration = Duration::from_secs(10);
