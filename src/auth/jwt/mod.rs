//! JWT bearer tokens: verification with an HS256 shared secret, an RS256/ES256 public key (PEM),
//! and JWK sets from a file or a URL (cached, refetched on key rotation, rate-limited).
//! Every key is bound to exactly one algorithm when it is loaded, and only HS256, RS256 and ES256
//! exist here, so a token can never choose how it is checked: no `alg: none`, no HMAC keyed with
//! a public key, no key taken from the token's own header (`jwk`, `jku` are ignored).
//!
//! Length: the settings-to-verifier path and the verification, with the algorithm binding that
//! makes it safe, read best together; key loading (`keys.rs`) and the remote JWKS cache
//! (`remote.rs`) are apart.

mod keys;
mod remote;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::config::JwtSettings;
use keys::*;
use remote::*;

/// A JWKS endpoint gets this long to answer (connect, headers and body together).
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger JWKS bodies are refused: real key sets are a few KiB.
const JWKS_MAX_BYTES: usize = 1024 * 1024;
/// Minimum gap between refetches caused by unknown `kid`s (and between failed fetches), so
/// tokens with made-up kids cannot make us hammer the JWKS endpoint.
const KID_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output (256 bits).
const MIN_SECRET_BYTES: usize = 32;
/// RFC 7518 §3.3 requires 2048 bits; the RSA backend refuses keys above 4096 bits.
const MIN_RSA_BITS: usize = 2048;
const MAX_RSA_BITS: usize = 4096;
/// More clock skew than this is a misconfiguration (and absurd values overflow the check).
const MAX_LEEWAY_SECS: u64 = 3600;
/// Refreshing a remote key set more often than this only loads the identity provider.
const MIN_JWKS_REFRESH_SECS: u64 = 10;
/// Bearer tokens larger than this are refused before any parsing or cryptography.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A configuration problem found at start-up; the message starts with the field's path.
#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    #[error(
        "auth.jwt: no key source configured; set `secret` (or TOLLGATE_JWT_SECRET), \
         `public_key_file`, `jwks_file` or `jwks_url`"
    )]
    NoKeySource,
    #[error("auth.jwt.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
}

/// An HS256 secret must be at least [`MIN_SECRET_BYTES`] long: what verifying and minting
/// both require.
pub fn check_hs256_secret(secret: &str) -> Result<(), JwtSetupError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(invalid(
            "secret",
            format!(
                "must be at least {MIN_SECRET_BYTES} bytes for HS256 (also applies to \
                 TOLLGATE_JWT_SECRET)"
            ),
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, message: impl Into<String>) -> JwtSetupError {
    JwtSetupError::Invalid {
        field,
        message: message.into(),
    }
}

/// Why a token was refused. `Display` is the message a client may be shown: it never contains
/// key material or anything the token did not already say.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("token algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("invalid token signature")]
    InvalidSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token issuer mismatch")]
    IssuerMismatch,
    #[error("token audience mismatch")]
    AudienceMismatch,
    #[error("token is missing the `{0}` claim")]
    MissingClaim(String),
    #[error("token claim `{0}` is invalid")]
    InvalidClaim(String),
    /// Our side's problem (the JWKS endpoint cannot be reached): callers may map it to 503.
    #[error("token signing keys are temporarily unavailable")]
    KeysUnavailable,
    #[error("JWT authentication is not enabled")]
    NotEnabled,
}

/// A token whose signature and time/issuer/audience claims all checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The value of the configured subject claim.
    pub subject: String,
    /// The value of the configured role claim, when it is a non-empty string.
    pub role: Option<String>,
    /// The whole claims object, for callers that need more.
    pub claims: Value,
}

/// Verifies bearer JWTs against the configured keys. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct JwtVerifier {
    /// `None` when JWT authentication is disabled.
    inner: Option<Arc<Inner>>,
}

struct Inner {
    hmac: Option<DecodingKey>,
    pem: Option<VerifyKey>,
    jwks_file: Vec<VerifyKey>,
    remote: Option<RemoteJwks>,
    issuer: Option<String>,
    audience: Option<String>,
    subject_claim: String,
    role_claim: String,
    leeway_secs: u64,
}

/// A public key together with the single algorithm it may verify.
#[derive(Clone, Debug)]
struct VerifyKey {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// Timings of the remote key set; a parameter so tests need not wait for the real ones.
#[derive(Clone, Copy, Debug)]
struct Timing {
    refresh_every: Duration,
    kid_refetch_every: Duration,
    fetch_timeout: Duration,
}

impl JwtVerifier {
    /// Loads and checks every configured key source. A JWKS URL that cannot be fetched now only
    /// logs a warning: it is fetched again on first use.
    pub async fn from_settings(settings: &JwtSettings) -> Result<JwtVerifier, JwtSetupError> {
        let timing = Timing {
            refresh_every: Duration::from_secs(settings.jwks_refresh_secs),
            kid_refetch_every: KID_REFETCH_INTERVAL,
            fetch_timeout: JWKS_FETCH_TIMEOUT,
        };
        Self::build(settings, timing).await
    }

    /// A verifier that accepts nothing, for deployments that authenticate with API keys only.
    pub fn disabled() -> JwtVerifier {
        JwtVerifier { inner: None }
    }

    /// Whether JWT authentication is enabled (at least one key source is configured).
    pub fn is_configured(&self) -> bool {
        self.inner.is_some()
    }

    /// Checks the signature and claims of a compact JWS token (without the `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, JwtError> {
        let inner = self.inner.as_ref().ok_or(JwtError::NotEnabled)?;
        inner.verify(token).await
    }

    async fn build(settings: &JwtSettings, timing: Timing) -> Result<JwtVerifier, JwtSetupError> {
        check_plain_settings(settings)?;
        if !settings.has_key_source() {
            return Err(JwtSetupError::NoKeySource);
        }
        let hmac = match settings.secret.as_deref().filter(|s| !s.is_empty()) {
            Some(secret) => {
                check_hs256_secret(secret)?;
                Some(DecodingKey::from_secret(secret.as_bytes()))
            }
            None => None,
        };
        let pem = match &settings.public_key_file {
            Some(path) => Some(load_pem_file(path).await.map_err(|message| {
                invalid("public_key_file", format!("{}: {message}", path.display()))
            })?),
            None => None,
        };
        let jwks_file = match &settings.jwks_file {
            Some(path) => load_jwks_file(path).await.map_err(|message| {
                invalid("jwks_file", format!("{}: {message}", path.display()))
            })?,
            None => Vec::new(),
        };
        let remote = match &settings.jwks_url {
            Some(url) => {
                let url = parse_jwks_url(url).map_err(|message| invalid("jwks_url", message))?;
                let remote = RemoteJwks::new(url, timing);
                remote.initial_fetch().await;
                Some(remote)
            }
            None => None,
        };
        Ok(JwtVerifier {
            inner: Some(Arc::new(Inner {
                hmac,
                pem,
                jwks_file,
                remote,
                issuer: settings.issuer.clone(),
                audience: settings.audience.clone(),
                subject_claim: settings.subject_claim.clone(),
                role_claim: settings.role_claim.clone(),
                leeway_secs: settings.leeway_secs,
            })),
        })
    }
}

// Lists the key sources but never their contents.
impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(inner) = &self.inner else {
            return f.write_str("JwtVerifier(disabled)");
        };
        f.debug_struct("JwtVerifier")
            .field("hs256_secret", &inner.hmac.is_some())
            .field("pem_key", &inner.pem.as_ref().map(|k| k.alg))
            .field("jwks_file_keys", &inner.jwks_file.len())
            .field("jwks_url", &inner.remote.as_ref().map(|r| r.display_url()))
            .field("issuer", &inner.issuer)
            .field("audience", &inner.audience)
            .finish()
    }
}

fn check_plain_settings(settings: &JwtSettings) -> Result<(), JwtSetupError> {
    if settings.leeway_secs > MAX_LEEWAY_SECS {
        return Err(invalid(
            "leeway_secs",
            format!("must be at most {MAX_LEEWAY_SECS}"),
        ));
    }
    if settings.jwks_refresh_secs < MIN_JWKS_REFRESH_SECS {
        return Err(invalid(
            "jwks_refresh_secs",
            format!("must be at least {MIN_JWKS_REFRESH_SECS}"),
        ));
    }
    if settings.subject_claim.trim().is_empty() {
        return Err(invalid("subject_claim", "must not be empty"));
    }
    if settings.role_claim.trim().is_empty() {
        return Err(invalid("role_claim", "must not be empty"));
    }
    if settings
        .issuer
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        return Err(invalid("issuer", "must not be empty when set"));
    }
    if settings
        .audience
        .as_deref()
        .is_some_and(|s| s.trim().is_empty())
    {
        return Err(invalid("audience", "must not be empty when set"));
    }
    Ok(())
}

/// What one key made of a token.
enum Attempt {
    Verified(Value),
    /// The token is bad whichever key is tried (malformed, or signed right but expired, ...).
    Rejected(JwtError),
    /// This key did not produce a valid signature; another key might.
    WrongKey,
}

impl Inner {
    async fn verify(&self, token: &str) -> Result<VerifiedToken, JwtError> {
        let header = peek_header(token)?;
        let alg = header.alg;
        if !self.alg_allowed(alg) {
            return Err(JwtError::AlgorithmNotAllowed);
        }
        let validation = self.validation(alg);

        if alg == Algorithm::HS256 {
            let key = self.hmac.as_ref().ok_or(JwtError::AlgorithmNotAllowed)?;
            return match try_key(token, key, &validation) {
                Attempt::Verified(claims) => self.finish(claims),
                Attempt::Rejected(error) => Err(error),
                Attempt::WrongKey => Err(JwtError::InvalidSignature),
            };
        }

        let kid = header.kid.as_deref();
        let mut tried_a_key = false;
        // A PEM key has no kid: the operator named it explicitly, so it is tried for any kid.
        let static_keys = self
            .pem
            .iter()
            .filter(|k| k.alg == alg)
            .chain(matching_keys(&self.jwks_file, alg, kid));
        for candidate in static_keys {
            tried_a_key = true;
            match try_key(token, &candidate.key, &validation) {
                Attempt::Verified(claims) => return self.finish(claims),
                Attempt::Rejected(error) => return Err(error),
                Attempt::WrongKey => {}
            }
        }

        if let Some(remote) = &self.remote {
            match remote.keys_for(kid).await {
                Some(keys) => {
                    for candidate in matching_keys(&keys, alg, kid) {
                        tried_a_key = true;
                        match try_key(token, &candidate.key, &validation) {
                            Attempt::Verified(claims) => return self.finish(claims),
                            Attempt::Rejected(error) => return Err(error),
                            Attempt::WrongKey => {}
                        }
                    }
                }
                None if !tried_a_key => return Err(JwtError::KeysUnavailable),
                None => {}
            }
        }

        Err(if tried_a_key {
            JwtError::InvalidSignature
        } else {
            JwtError::UnknownKey
        })
    }

    fn alg_allowed(&self, alg: Algorithm) -> bool {
        match alg {
            Algorithm::HS256 => self.hmac.is_some(),
            Algorithm::RS256 | Algorithm::ES256 => {
                self.pem.as_ref().is_some_and(|k| k.alg == alg)
                    || self.jwks_file.iter().any(|k| k.alg == alg)
                    || self.remote.is_some()
            }
            _ => false,
        }
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // jsonwebtoken only compares iss/aud when the token has them, so configured ones must
        // also be required.
        let mut required = vec!["exp"];
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    fn finish(&self, claims: Value) -> Result<VerifiedToken, JwtError> {
        let Value::Object(map) = &claims else {
            return Err(JwtError::Malformed);
        };
        let subject = match map.get(&self.subject_claim) {
            None | Some(Value::Null) => {
                return Err(JwtError::MissingClaim(self.subject_claim.clone()));
            }
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(_) => return Err(JwtError::InvalidClaim(self.subject_claim.clone())),
        };
        let role = map
            .get(&self.role_claim)
            .and_then(Value::as_str)
            .filter(|r| !r.trim().is_empty())
            .map(str::to_owned);
        Ok(VerifiedToken {
            subject,
            role,
            claims,
        })
    }
}

/// JWKS keys usable for a token: same algorithm, and the token's kid if it has one.
fn matching_keys<'a>(
    keys: &'a [VerifyKey],
    alg: Algorithm,
    kid: Option<&'a str>,
) -> impl Iterator<Item = &'a VerifyKey> {
    keys.iter()
        .filter(move |k| k.alg == alg && kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)))
}

fn try_key(token: &str, key: &DecodingKey, validation: &Validation) -> Attempt {
    match jsonwebtoken::decode::<Value>(token, key, validation) {
        Ok(data) => Attempt::Verified(data.claims),
        Err(error) => match error.kind() {
            ErrorKind::InvalidSignature => Attempt::WrongKey,
            ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::Provider(_) => {
                tracing::debug!(error = %error, "a configured JWT key could not be used");
                Attempt::WrongKey
            }
            kind => Attempt::Rejected(map_error_kind(kind)),
        },
    }
}

fn map_error_kind(kind: &ErrorKind) -> JwtError {
    match kind {
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYetValid,
        ErrorKind::InvalidIssuer => JwtError::IssuerMismatch,
        ErrorKind::InvalidAudience => JwtError::AudienceMismatch,
        ErrorKind::MissingRequiredClaim(claim) => JwtError::MissingClaim(claim.clone()),
        ErrorKind::InvalidClaimFormat(claim) => JwtError::InvalidClaim(claim.clone()),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::MissingAlgorithm => JwtError::AlgorithmNotAllowed,
        ErrorKind::InvalidSignature => JwtError::InvalidSignature,
        _ => JwtError::Malformed,
    }
}

/// The parts of the header we decide on before any key is touched.
struct PeekedHeader {
    alg: Algorithm,
    kid: Option<String>,
}

/// Reads `alg` and `kid` ourselves so that `none`, `HS512` and friends are refused with a clear
/// error whatever jsonwebtoken would make of them.
fn peek_header(token: &str) -> Result<PeekedHeader, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed)?;
    let Ok(Value::Object(header)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(JwtError::Malformed);
    };
    let alg = match header.get("alg").and_then(Value::as_str) {
        Some("HS256") => Algorithm::HS256,
        Some("RS256") => Algorithm::RS256,
        Some("ES256") => Algorithm::ES256,
        Some(_) => return Err(JwtError::AlgorithmNotAllowed),
        None => return Err(JwtError::Malformed),
    };
    // RFC 7515 §4.1.11: critical extensions we do not understand make the token invalid.
    if header.contains_key("crit") {
        return Err(JwtError::Malformed);
    }
    let kid = match header.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::Malformed),
    };
    Ok(PeekedHeader { alg, kid })
}

/// Signs an HS256 token for `tollgate token mint` (claims `sub`, `iat`, `exp`, and `iss`, `aud`,
/// `role` when given).
pub fn mint_hs256(
    secret: &str,
    subject: &str,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
    role: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = Map::new();
    claims.insert("sub".to_owned(), Value::from(subject));
    claims.insert("iat".to_owned(), Value::from(now));
    claims.insert(
        "exp".to_owned(),
        Value::from(now.saturating_add(ttl.as_secs())),
    );
    if let Some(issuer) = issuer {
        claims.insert("iss".to_owned(), Value::from(issuer));
    }
    if let Some(audience) = audience {
        claims.insert("aud".to_owned(), Value::from(audience));
    }
    if let Some(role) = role {
        claims.insert("role".to_owned(), Value::from(role));
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

// ---- key loading -------------------------------------------------------------------------
