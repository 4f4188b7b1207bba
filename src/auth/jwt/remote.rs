//! A JWK set served over HTTP(S): fetched, cached for `jwks_refresh_secs`, refetched (at most
//! every few seconds) when a token names a key it does not hold.

use std::error::Error as StdError;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt as _, Empty, Limited};
use jsonwebtoken::jwk::JwkSet;

use super::*;
use crate::net::{HttpsClient, https_client};

pub(super) fn parse_jwks_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a valid URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must be an http:// or https:// URL".to_owned()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("must name a host".to_owned());
    }
    Ok(uri)
}

// ---- remote JWKS --------------------------------------------------------------------------

pub(super) struct RemoteJwks {
    url: Uri,
    client: HttpsClient<Empty<Bytes>>,
    timing: Timing,
    /// Never held across an await; a poisoned lock is recovered because every write leaves the
    /// state consistent.
    state: RwLock<CacheState>,
    /// Held across one fetch so that concurrent callers share it instead of fetching again.
    fetch_lock: tokio::sync::Mutex<()>,
}

#[derive(Clone, Default)]
pub(super) struct CacheState {
    keys: Option<Arc<[VerifyKey]>>,
    fetched_at: Option<Instant>,
    failed_at: Option<Instant>,
    kid_refetch_at: Option<Instant>,
    /// Bumped after every fetch attempt (under `fetch_lock`), so a caller that waited for the
    /// lock can tell that someone already fetched for it.
    generation: u64,
}

impl CacheState {
    pub(super) fn is_fresh(&self, now: Instant, refresh_every: Duration) -> bool {
        self.fetched_at
            .is_some_and(|at| now.duration_since(at) < refresh_every)
    }

    pub(super) fn recently_failed(&self, now: Instant, gap: Duration) -> bool {
        self.failed_at
            .is_some_and(|at| now.duration_since(at) < gap)
    }

    pub(super) fn kid_refetch_allowed(&self, now: Instant, gap: Duration) -> bool {
        self.kid_refetch_at
            .is_none_or(|at| now.duration_since(at) >= gap)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reason {
    Missing,
    Stale,
    UnknownKid,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum FetchError {
    #[error("request failed: {0}")]
    Request(String),
    #[error("server answered {0}")]
    Status(http::StatusCode),
    #[error("could not read the body (limit {JWKS_MAX_BYTES} bytes): {0}")]
    Body(String),
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("not a valid JWK set: {0}")]
    Json(serde_json::Error),
    #[error("the set holds no usable RS256 or ES256 signing key")]
    NoUsableKey,
}

impl RemoteJwks {
    pub(super) fn new(url: Uri, timing: Timing) -> Self {
        let client = https_client(timing.fetch_timeout, Duration::from_secs(90));
        Self {
            url,
            client,
            timing,
            state: RwLock::new(CacheState::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Scheme, host and path only: a URL may carry credentials in its user-info or query.
    pub(super) fn display_url(&self) -> String {
        format!(
            "{}://{}{}",
            self.url.scheme_str().unwrap_or("http"),
            self.url.host().unwrap_or(""),
            self.url.path()
        )
    }

    pub(super) fn snapshot(&self) -> CacheState {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(super) fn update(&self, change: impl FnOnce(&mut CacheState)) {
        change(&mut self.state.write().unwrap_or_else(PoisonError::into_inner));
    }

    /// A failure here is not recorded as one, so the first request fetches again at once.
    pub(super) async fn initial_fetch(&self) {
        match self.fetch().await {
            Ok(keys) => self.update(|state| {
                state.keys = Some(keys.into());
                state.fetched_at = Some(Instant::now());
                state.generation += 1;
            }),
            Err(error) => tracing::warn!(
                url = %self.display_url(),
                error = %error,
                "could not fetch auth.jwt.jwks_url at start-up; will retry on first use"
            ),
        }
    }

    /// The key set to check a token against, refreshed when stale or when `kid` is unknown
    /// (within the rate limit). `None` only when no set has ever been fetched.
    pub(super) async fn keys_for(&self, kid: Option<&str>) -> Option<Arc<[VerifyKey]>> {
        let now = Instant::now();
        let snap = self.snapshot();
        let gap = self.timing.kid_refetch_every;
        let Some(keys) = snap.keys.clone() else {
            if snap.recently_failed(now, gap) {
                return None;
            }
            return self.refresh(snap.generation, Reason::Missing).await;
        };
        if !snap.is_fresh(now, self.timing.refresh_every) && !snap.recently_failed(now, gap) {
            // Whoever cannot take the lock keeps using the stale set: a slow identity provider
            // must not stall every request.
            if let Ok(guard) = self.fetch_lock.try_lock() {
                let fresh = self
                    .refresh_locked(guard, snap.generation, Reason::Stale)
                    .await;
                return Some(fresh.unwrap_or(keys));
            }
        }
        let kid_known = kid.is_none_or(|kid| keys.iter().any(|k| k.kid.as_deref() == Some(kid)));
        if kid_known || !snap.kid_refetch_allowed(now, gap) || snap.recently_failed(now, gap) {
            return Some(keys);
        }
        let fresh = self.refresh(snap.generation, Reason::UnknownKid).await;
        Some(fresh.unwrap_or(keys))
    }

    pub(super) async fn refresh(
        &self,
        seen_generation: u64,
        reason: Reason,
    ) -> Option<Arc<[VerifyKey]>> {
        let guard = self.fetch_lock.lock().await;
        self.refresh_locked(guard, seen_generation, reason).await
    }

    /// Fetches unless another caller already did since `seen_generation`; returns the set held
    /// afterwards (the old one if the fetch failed).
    pub(super) async fn refresh_locked(
        &self,
        _guard: tokio::sync::MutexGuard<'_, ()>,
        seen_generation: u64,
        reason: Reason,
    ) -> Option<Arc<[VerifyKey]>> {
        let snap = self.snapshot();
        if snap.generation != seen_generation {
            return snap.keys;
        }
        if reason == Reason::UnknownKid {
            self.update(|state| state.kid_refetch_at = Some(Instant::now()));
        }
        match self.fetch().await {
            Ok(keys) => {
                let keys: Arc<[VerifyKey]> = keys.into();
                tracing::debug!(url = %self.display_url(), keys = keys.len(), ?reason, "fetched JWKS");
                self.update(|state| {
                    state.keys = Some(Arc::clone(&keys));
                    state.fetched_at = Some(Instant::now());
                    state.failed_at = None;
                    state.generation += 1;
                });
                Some(keys)
            }
            Err(error) => {
                tracing::warn!(
                    url = %self.display_url(),
                    error = %error,
                    ?reason,
                    "could not fetch auth.jwt.jwks_url; keeping the previous key set"
                );
                self.update(|state| {
                    state.failed_at = Some(Instant::now());
                    state.generation += 1;
                });
                snap.keys
            }
        }
    }

    pub(super) async fn fetch(&self) -> Result<Vec<VerifyKey>, FetchError> {
        let download = async {
            let request = http::Request::get(self.url.clone())
                .header(http::header::ACCEPT, "application/json")
                .body(Empty::<Bytes>::new())
                .map_err(|e| FetchError::Request(e.to_string()))?;
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| FetchError::Request(chain(&e)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(FetchError::Status(status));
            }
            let body = Limited::new(response.into_body(), JWKS_MAX_BYTES)
                .collect()
                .await
                .map_err(|e| FetchError::Body(chain(e.as_ref())))?;
            Ok(body.to_bytes())
        };
        let timeout = self.timing.fetch_timeout;
        let body = tokio::time::timeout(timeout, download)
            .await
            .map_err(|_| FetchError::Timeout(timeout))??;
        let set: JwkSet = serde_json::from_slice(&body).map_err(FetchError::Json)?;
        let (keys, problems) = keys_from_jwk_set(&set);
        for problem in problems {
            tracing::warn!(url = %self.display_url(), "skipping a JWKS key: {problem}");
        }
        if keys.is_empty() {
            return Err(FetchError::NoUsableKey);
        }
        Ok(keys)
    }
}

/// An error and its sources on one line (hyper's own message is only "client error (Connect)").
pub(super) fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
