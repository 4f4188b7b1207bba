//! The `[auth.jwt]` table: where the keys that verify users' JWTs come from, and the claims read.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

/// The `[auth.jwt]` table of `config/tollgate.toml`. Several key sources may be set at once.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtSettings {
    /// HS256 shared secret (at least 32 bytes); `TOLLGATE_JWT_SECRET` overrides it.
    pub secret: Option<String>,
    /// PEM public key: RSA → RS256, EC P-256 → ES256 (detected from the PEM).
    pub public_key_file: Option<PathBuf>,
    /// A JWK set on disk (RS256 and ES256 keys are used; others are ignored).
    pub jwks_file: Option<PathBuf>,
    /// A JWK set served over http or https (cached for `jwks_refresh_secs`).
    pub jwks_url: Option<String>,
    pub jwks_refresh_secs: u64,
    /// When set, tokens must carry exactly this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud` (alone or in their audience list).
    pub audience: Option<String>,
    /// Claim holding the caller's identity; must be a non-empty string.
    pub subject_claim: String,
    /// Claim holding the caller's role (optional in tokens; string values only).
    pub role_claim: String,
    /// Clock skew allowed when checking `exp` and `nbf`.
    pub leeway_secs: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            secret: None,
            public_key_file: None,
            jwks_file: None,
            jwks_url: None,
            jwks_refresh_secs: 300,
            issuer: None,
            audience: None,
            subject_claim: "sub".to_owned(),
            role_claim: "role".to_owned(),
            leeway_secs: 30,
        }
    }
}

// Hand-written so that logging the configuration never prints the shared secret.
impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSettings")
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("public_key_file", &self.public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("jwks_url", &self.jwks_url)
            .field("jwks_refresh_secs", &self.jwks_refresh_secs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("subject_claim", &self.subject_claim)
            .field("role_claim", &self.role_claim)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

impl JwtSettings {
    /// Whether any key source is set, i.e. whether JWT authentication should be enabled.
    /// An empty secret counts as unset (an empty `TOLLGATE_JWT_SECRET` disables HS256).
    pub fn has_key_source(&self) -> bool {
        self.secret.as_deref().is_some_and(|s| !s.is_empty())
            || self.public_key_file.is_some()
            || self.jwks_file.is_some()
            || self.jwks_url.is_some()
    }
}
