//! Bearer credentials → [`Principal`]: a user's JWT, a gateway API key, or the admin token.
//!
//! Authentication is on by default: the middleware in `routes` runs it for every route except
//! [`UNAUTHENTICATED_ROUTES`], so a new route cannot silently skip it.

pub mod api_keys;
pub mod jwt;

use std::sync::Arc;

use http::HeaderMap;
use subtle_eq::constant_time_eq;

use crate::domain::AccountId;
use crate::ledger::{ApiKeyRecord, LedgerError};
use api_keys::ApiKeyCache;
use jwt::JwtVerifier;

/// Routes anyone may call.
pub const UNAUTHENTICATED_ROUTES: &[&str] = &["/healthz", "/readyz"];

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Principal {
    User(Caller),
    Admin,
}

/// A user request's account, and the API key it came with (if any).
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: AccountId,
    pub key: Option<Arc<ApiKeyRecord>>,
}

impl Caller {
    /// Whether this caller's key allows `model` (JWT callers may use every routed model).
    pub fn may_use(&self, model: &str) -> bool {
        let Some(allowed) = self.key.as_ref().and_then(|k| k.allowed_models.as_ref()) else {
            return true;
        };
        allowed.iter().any(|pattern| {
            globset::Glob::new(pattern)
                .map(|glob| glob.compile_matcher().is_match(model))
                .unwrap_or(false)
        })
    }
}

/// Why a caller was not let in. The edge answers each in OpenAI's shape (401, 403, 503).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credentials are missing or wrong.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the right to this route.
    #[error("{0}")]
    Forbidden(String),
    /// Our side cannot check the credentials right now (a key server does not answer); the
    /// caller did nothing wrong.
    #[error("{0}")]
    Unavailable(String),
    /// The ledger could not be asked about an API key.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    keys: ApiKeyCache,
    admin_token: Option<String>,
    admin_role: Option<String>,
}

impl Authenticator {
    pub fn new(
        jwt: Option<JwtVerifier>,
        keys: ApiKeyCache,
        admin_token: Option<String>,
        admin_role: Option<String>,
    ) -> Self {
        Authenticator {
            jwt,
            keys,
            admin_token: admin_token.filter(|t| !t.is_empty()),
            admin_role,
        }
    }

    pub fn keys(&self) -> &ApiKeyCache {
        &self.keys
    }

    /// Authenticates a `/v1` or `/api` caller.
    pub async fn user(&self, headers: &HeaderMap) -> Result<Caller, AuthError> {
        let token = bearer(headers)?;
        if api_keys::looks_like_key(token) {
            let key = self.keys.lookup(token).await?.ok_or_else(|| {
                AuthError::Unauthenticated("Incorrect or revoked API key provided".into())
            })?;
            return Ok(Caller {
                account: key.account.clone(),
                key: Some(key),
            });
        }
        let jwt = self.jwt.as_ref().ok_or_else(|| {
            AuthError::Unauthenticated("Invalid bearer token (JWT auth is not configured)".into())
        })?;
        let verified = jwt.verify(token).await.map_err(|e| match e {
            // Our side cannot check the token right now; the caller did nothing wrong.
            jwt::JwtError::KeysUnavailable => AuthError::Unavailable(e.to_string()),
            e => AuthError::Unauthenticated(format!("Invalid bearer token: {e}")),
        })?;
        let account = AccountId::parse(&verified.subject).map_err(|e| {
            AuthError::Unauthenticated(format!("Invalid bearer token: subject: {e}"))
        })?;
        Ok(Caller { account, key: None })
    }

    /// Authenticates an `/admin` caller: the admin token, or a JWT with the admin role.
    pub async fn admin(&self, headers: &HeaderMap) -> Result<Principal, AuthError> {
        let token = bearer(headers)?;
        if let Some(admin_token) = &self.admin_token
            && constant_time_eq(token.as_bytes(), admin_token.as_bytes())
        {
            return Ok(Principal::Admin);
        }
        if let (Some(jwt), Some(role)) = (&self.jwt, &self.admin_role)
            && !api_keys::looks_like_key(token)
            && let Ok(verified) = jwt.verify(token).await
        {
            if verified.role.as_deref() == Some(role.as_str()) {
                return Ok(Principal::Admin);
            }
            return Err(AuthError::Forbidden(
                "This token does not have the admin role".into(),
            ));
        }
        Err(AuthError::Unauthenticated(
            "Invalid admin credentials".into(),
        ))
    }
}

fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
        AuthError::Unauthenticated("Missing bearer token in the Authorization header".into())
    })?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Unauthenticated("Malformed Authorization header".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            AuthError::Unauthenticated("The Authorization header must be `Bearer <token>`".into())
        })?;
    Ok(token)
}

/// Constant-time comparison, so the admin token cannot be guessed byte by byte from timings.
mod subtle_eq {
    pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}
