//! Builds the gateway from a validated [`Config`]: ledger, cache, pricing, settler, router;
//! binds the listener; serves until the shutdown future resolves, then drains open streams and
//! flushes every pending settlement.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use ::http::HeaderValue;
use anyhow::Context;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Instrument;
use tracing::Level;

use crate::auth::api_keys::ApiKeyCache;
use crate::auth::jwt::{JwtSettings, JwtVerifier};
use crate::auth::{Authenticator, Principal, UNAUTHENTICATED_ROUTES};
use crate::cache::SharedCache;
use crate::config::Config;
use crate::domain::RequestId;
use crate::http::error::ApiError;
use crate::ledger::sqlite::SqliteLedger;
use crate::ledger::{Ledger, SharedLedger};
use crate::metering::Meter;
use crate::metering::pricing::{PriceTable, PricingHandle};
use crate::metering::pricing_sync::{self, PricingRegistry};
use crate::metering::settler::{self, SettlerConfig, SettlerHandle};
use crate::proxy::upstream::Upstreams;
use crate::{admin, http, proxy};

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub ledger: SharedLedger,
    pub cache: SharedCache,
    pub meter: Meter,
    pub auth: Arc<Authenticator>,
    pub upstreams: Arc<Upstreams>,
    pub settler: SettlerHandle,
    pub body_limit: usize,
    /// Where instances announce their price versions (with Redis only).
    pub pricing_registry: Option<PricingRegistry>,
    pub pricing_path: std::path::PathBuf,
    /// Credit packages on sale, from the config.
    pub packages: Arc<Vec<crate::billing::packages::Package>>,
    pub payments: Arc<crate::billing::service::Payments>,
    /// The last cache epoch seen; a different one in the ledger means someone else changed it.
    epoch: Arc<AtomicI64>,
}

impl AppState {
    /// Drops in-process caches (API keys, cached balances) if the ledger's cache epoch moved:
    /// someone changed the ledger outside this process (the CLI, an admin route on another
    /// instance). Called by [`spawn_epoch_watcher`] every [`EPOCH_POLL`]. (An admin route
    /// updates this instance's caches itself: a grant applies its snapshot, a revoke clears
    /// the keys.)
    ///
    /// The epoch counts as seen only once the caches are dropped: a failure is tried again.
    async fn sync_external_changes(&self) -> Result<(), String> {
        let epoch = self
            .ledger
            .cache_epoch()
            .await
            .map_err(|e| format!("cannot read the cache epoch: {e}"))?;
        if self.epoch.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        self.auth.keys().clear();
        self.cache
            .invalidate_all()
            .await
            .map_err(|e| format!("cannot drop the cached balances: {e}"))?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(())
    }
}

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
        let state = AppState {
            ledger,
            cache,
            meter,
            auth: Arc::new(auth),
            upstreams: Arc::new(Upstreams::new(upstreams)),
            settler,
            body_limit: config.server.body_limit_bytes,
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
            router: router(state.clone()),
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
        .expire_grants(crate::ledger::now_ms(), &in_flight)
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

fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(proxy::chat_completions))
        .route("/completions", post(proxy::completions))
        .route("/embeddings", post(proxy::embeddings))
        .route("/responses", post(proxy::responses))
        .route("/models", get(proxy::models))
        .route("/billing/coupons/apply", post(http::billing::apply_coupon))
        .route(
            "/billing/invoices/generate",
            post(http::billing::generate_statement),
        )
        .route("/billing/invoices", get(http::billing::statements));
    let credits = Router::new()
        .route("/balance", get(http::credits::balance))
        .route("/transactions", get(http::credits::transactions))
        .route("/usage", get(http::credits::usage))
        .route("/packages", get(http::credits::packages));
    let payment = Router::new()
        .route("/create-checkout", post(http::payments::create_checkout))
        .route("/orders", get(http::payments::orders))
        .route("/orders/{id}", get(http::payments::order))
        .route("/invoices/{id}", get(http::payments::invoice))
        .route("/invoices/{id}/download", get(http::payments::invoice_pdf))
        .route("/webhook", post(http::payments::stripe_webhook))
        .route(
            "/webhook/lemonsqueezy",
            post(http::payments::lemonsqueezy_webhook),
        )
        .route("/webhook/polar", post(http::payments::polar_webhook));
    let admin = Router::new()
        .route("/accounts/{account}", get(admin::routes::account))
        .route("/accounts/{account}/credits", post(admin::routes::grant))
        .route("/accounts/{account}/keys", post(admin::routes::create_key))
        .route("/keys/{key_id}", delete(admin::routes::revoke_key))
        .route("/pricing", get(admin::routes::pricing))
        .route("/pricing/reload", post(admin::routes::reload_pricing))
        .route("/payments/events", get(admin::routes::payment_events))
        .route("/orders/{id}", get(admin::routes::order))
        .route(
            "/coupons",
            get(admin::routes::coupons).post(admin::routes::create_coupon),
        )
        .route("/coupons/{code}", patch(admin::routes::update_coupon))
        .route(
            "/settlements/set-aside",
            get(admin::routes::set_aside_settlements),
        )
        .route(
            "/settlements/set-aside/{request_id}/resolve",
            post(admin::routes::resolve_set_aside),
        );
    Router::new()
        .route("/healthz", get(http::health::healthz))
        .route("/readyz", get(http::health::readyz))
        .nest("/v1", v1)
        .nest("/api/credits", credits)
        .nest("/api/payment", payment)
        .nest("/admin", admin)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request
                .extensions()
                .get::<RequestId>()
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }).on_response(DefaultOnResponse::new().level(Level::INFO)))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Unknown route".into())
}

async fn method_not_allowed(method: ::http::Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// Gives every request an id (the settlement's idempotency key), returned as `x-request-id`.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = RequestId::new();
    request.extensions_mut().insert(id.clone());
    let span = tracing::debug_span!("request_id", request_id = %id);
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Authenticates every route except [`UNAUTHENTICATED_ROUTES`].
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if UNAUTHENTICATED_ROUTES.contains(&path) || http::payments::WEBHOOK_ROUTES.contains(&path) {
        return next.run(request).await;
    }
    let is_admin = path == "/admin" || path.starts_with("/admin/");
    if is_admin {
        match state.auth.admin(request.headers()).await {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
            }
            Err(error) => return error.into_response(),
        }
    } else {
        match state.auth.user(request.headers()).await {
            Ok(caller) => {
                request
                    .extensions_mut()
                    .insert(Principal::User(caller.clone()));
                request.extensions_mut().insert(caller);
            }
            Err(error) => return error.into_response(),
        }
    }
    next.run(request).await
}
