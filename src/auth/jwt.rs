//! JWT bearer tokens: verification with an HS256 shared secret, an RS256/ES256 public key (PEM),
//! and JWK sets from a file or a URL (cached, refetched on key rotation, rate-limited).
//! Every key is bound to exactly one algorithm when it is loaded, and only HS256, RS256 and ES256
//! exist here, so a token can never choose how it is checked: no `alg: none`, no HMAC keyed with
//! a public key, no key taken from the token's own header (`jwk`, `jku` are ignored).

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

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
            Some(secret) if secret.len() < MIN_SECRET_BYTES => {
                return Err(invalid(
                    "secret",
                    format!(
                        "must be at least {MIN_SECRET_BYTES} bytes for HS256 (also applies to \
                         TOLLGATE_JWT_SECRET)"
                    ),
                ));
            }
            Some(secret) => Some(DecodingKey::from_secret(secret.as_bytes())),
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

async fn load_pem_file(path: &Path) -> Result<VerifyKey, String> {
    let pem = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    key_from_pem(&pem)
}

fn key_from_pem(pem: &[u8]) -> Result<VerifyKey, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file".to_owned())?;
    let label = pem_label(text).ok_or_else(|| "not a PEM file (no BEGIN line)".to_owned())?;
    if label.contains("PRIVATE") {
        return Err("holds a private key; configure its public key instead \
                    (`openssl pkey -in key.pem -pubout`)"
            .to_owned());
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        check_rsa_key(&key)?;
        return Ok(VerifyKey {
            alg: Algorithm::RS256,
            kid: None,
            key,
        });
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        check_es256_key(&key)?;
        return Ok(VerifyKey {
            alg: Algorithm::ES256,
            kid: None,
            key,
        });
    }
    Err("expected an RSA or EC P-256 public key".to_owned())
}

fn pem_label(text: &str) -> Option<&str> {
    const BEGIN: &str = "-----BEGIN ";
    let start = text.find(BEGIN)? + BEGIN.len();
    let rest = &text[start..];
    Some(&rest[..rest.find("-----")?])
}

fn check_rsa_key(key: &DecodingKey) -> Result<(), String> {
    // Extracting the public components parses the key, which jsonwebtoken otherwise only does
    // when the first token arrives.
    let jwk = Jwk::from_decoding_key(key, None).map_err(|_| "not a valid RSA public key")?;
    let AlgorithmParameters::RSA(params) = &jwk.algorithm else {
        return Err("not an RSA public key".to_owned());
    };
    let modulus = URL_SAFE_NO_PAD
        .decode(&params.n)
        .map_err(|_| "invalid RSA modulus")?;
    let exponent = URL_SAFE_NO_PAD
        .decode(&params.e)
        .map_err(|_| "invalid RSA exponent")?;
    if significant_bits(&exponent) == 0 {
        return Err("invalid RSA exponent".to_owned());
    }
    let bits = significant_bits(&modulus);
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(format!(
            "RSA key is {bits} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} bits are supported"
        ));
    }
    Ok(())
}

fn significant_bits(big_endian: &[u8]) -> usize {
    let start = big_endian
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(big_endian.len());
    match big_endian[start..].first() {
        None => 0,
        Some(first) => (big_endian.len() - start - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

fn check_es256_key(key: &DecodingKey) -> Result<(), String> {
    // Building an ES256 verifier parses the point; the empty signature then simply fails.
    jsonwebtoken::crypto::verify("", b"", key, Algorithm::ES256)
        .map(|_| ())
        .map_err(|_| "not a valid EC P-256 public key (only ES256 is supported)".to_owned())
}

async fn load_jwks_file(path: &Path) -> Result<Vec<VerifyKey>, String> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let set: JwkSet =
        serde_json::from_slice(&bytes).map_err(|e| format!("not a valid JWK set: {e}"))?;
    let (keys, problems) = keys_from_jwk_set(&set);
    if let Some(problem) = problems.into_iter().next() {
        return Err(problem);
    }
    if keys.is_empty() {
        return Err("holds no RS256 or ES256 signing key".to_owned());
    }
    Ok(keys)
}

/// The usable keys of a set, and a message for each RS256/ES256 key that is broken. Keys of other
/// types or for other uses (encryption, `oct` secrets, other curves) are skipped: a JWK set must
/// never be able to switch on HS256.
fn keys_from_jwk_set(set: &JwkSet) -> (Vec<VerifyKey>, Vec<String>) {
    let mut keys = Vec::new();
    let mut problems = Vec::new();
    for jwk in &set.keys {
        match key_from_jwk(jwk) {
            Ok(Some(key)) => keys.push(key),
            Ok(None) => {}
            Err(problem) => {
                let kid = jwk.common.key_id.as_deref().unwrap_or("(no kid)");
                problems.push(format!("key `{kid}`: {problem}"));
            }
        }
    }
    (keys, problems)
}

fn key_from_jwk(jwk: &Jwk) -> Result<Option<VerifyKey>, String> {
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Ok(None);
    }
    let declared = jwk.common.key_algorithm;
    let alg = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) if declared.is_none_or(|a| a == KeyAlgorithm::RS256) => {
            Algorithm::RS256
        }
        AlgorithmParameters::EllipticCurve(params)
            if params.curve == EllipticCurve::P256
                && declared.is_none_or(|a| a == KeyAlgorithm::ES256) =>
        {
            Algorithm::ES256
        }
        _ => return Ok(None),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "invalid key parameters".to_owned())?;
    if alg == Algorithm::RS256 {
        check_rsa_key(&key)?;
    } else {
        check_es256_key(&key)?;
    }
    Ok(Some(VerifyKey {
        alg,
        kid: jwk.common.key_id.clone(),
        key,
    }))
}

fn parse_jwks_url(url: &str) -> Result<Uri, String> {
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

type HttpsClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

struct RemoteJwks {
    url: Uri,
    client: HttpsClient,
    timing: Timing,
    /// Never held across an await; a poisoned lock is recovered because every write leaves the
    /// state consistent.
    state: RwLock<CacheState>,
    /// Held across one fetch so that concurrent callers share it instead of fetching again.
    fetch_lock: tokio::sync::Mutex<()>,
}

#[derive(Clone, Default)]
struct CacheState {
    keys: Option<Arc<[VerifyKey]>>,
    fetched_at: Option<Instant>,
    failed_at: Option<Instant>,
    kid_refetch_at: Option<Instant>,
    /// Bumped after every fetch attempt (under `fetch_lock`), so a caller that waited for the
    /// lock can tell that someone already fetched for it.
    generation: u64,
}

impl CacheState {
    fn is_fresh(&self, now: Instant, refresh_every: Duration) -> bool {
        self.fetched_at
            .is_some_and(|at| now.duration_since(at) < refresh_every)
    }

    fn recently_failed(&self, now: Instant, gap: Duration) -> bool {
        self.failed_at
            .is_some_and(|at| now.duration_since(at) < gap)
    }

    fn kid_refetch_allowed(&self, now: Instant, gap: Duration) -> bool {
        self.kid_refetch_at
            .is_none_or(|at| now.duration_since(at) >= gap)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Missing,
    Stale,
    UnknownKid,
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
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
    fn new(url: Uri, timing: Timing) -> Self {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_all_versions()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            url,
            client,
            timing,
            state: RwLock::new(CacheState::default()),
            fetch_lock: tokio::sync::Mutex::new(()),
        }
    }

    /// Scheme, host and path only: a URL may carry credentials in its user-info or query.
    fn display_url(&self) -> String {
        format!(
            "{}://{}{}",
            self.url.scheme_str().unwrap_or("http"),
            self.url.host().unwrap_or(""),
            self.url.path()
        )
    }

    fn snapshot(&self) -> CacheState {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn update(&self, change: impl FnOnce(&mut CacheState)) {
        change(&mut self.state.write().unwrap_or_else(PoisonError::into_inner));
    }

    /// A failure here is not recorded as one, so the first request fetches again at once.
    async fn initial_fetch(&self) {
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
    async fn keys_for(&self, kid: Option<&str>) -> Option<Arc<[VerifyKey]>> {
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

    async fn refresh(&self, seen_generation: u64, reason: Reason) -> Option<Arc<[VerifyKey]>> {
        let guard = self.fetch_lock.lock().await;
        self.refresh_locked(guard, seen_generation, reason).await
    }

    /// Fetches unless another caller already did since `seen_generation`; returns the set held
    /// afterwards (the old one if the fetch failed).
    async fn refresh_locked(
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

    async fn fetch(&self) -> Result<Vec<VerifyKey>, FetchError> {
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
fn chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::Router;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::get;
    use futures_util::future::join_all;
    use serde_json::json;

    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt");
    const SECRET: &str = "test-only-hs256-secret-of-more-than-32-bytes";

    fn fixture(name: &str) -> PathBuf {
        Path::new(FIXTURES).join(name)
    }

    fn read_fixture(name: &str) -> Vec<u8> {
        std::fs::read(fixture(name)).expect("fixture is readable")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// `sub: user-1`, `exp` in five minutes, then `extra` (a `null` removes a claim).
    fn claims(extra: Value) -> Value {
        let mut claims = json!({ "sub": "user-1", "exp": now() + 300 });
        if let (Some(map), Value::Object(extra)) = (claims.as_object_mut(), extra) {
            for (name, value) in extra {
                if value.is_null() {
                    map.remove(&name);
                } else {
                    map.insert(name, value);
                }
            }
        }
        claims
    }

    fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).expect("token signs")
    }

    fn hs256(claims: &Value) -> String {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            None,
            claims,
        )
    }

    fn rsa_signer() -> EncodingKey {
        EncodingKey::from_rsa_pem(&read_fixture("rsa_private.pem")).expect("rsa private key")
    }

    fn ec_signer() -> EncodingKey {
        EncodingKey::from_ec_pem(&read_fixture("ec_private.pem")).expect("ec private key")
    }

    fn b64_json(value: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
    }

    fn secret_settings() -> JwtSettings {
        JwtSettings {
            secret: Some(SECRET.to_owned()),
            ..JwtSettings::default()
        }
    }

    async fn verifier(settings: &JwtSettings) -> JwtVerifier {
        JwtVerifier::from_settings(settings)
            .await
            .expect("verifier builds")
    }

    async fn setup_error(settings: &JwtSettings) -> String {
        JwtVerifier::from_settings(settings)
            .await
            .expect_err("settings are rejected")
            .to_string()
    }

    #[tokio::test]
    async fn hs256_token_is_accepted() {
        crate::test_support::time_limit::limited(async move {
            let v = verifier(&secret_settings()).await;
            assert!(v.is_configured());
            let token = hs256(&claims(json!({ "plan": "pro" })));
            let verified = v.verify(&token).await.expect("valid token");
            assert_eq!(verified.subject, "user-1");
            assert_eq!(verified.role, None);
            assert_eq!(verified.claims["plan"], "pro");
        })
        .await;
    }

    #[tokio::test]
    async fn expired_token_is_rejected() {
        crate::test_support::time_limit::limited(async move {
            let v = verifier(&secret_settings()).await;
            let token = hs256(&claims(json!({ "exp": now() - 120 })));
            let error = v.verify(&token).await.expect_err("expired");
            assert_eq!(error, JwtError::Expired);
            assert_eq!(error.to_string(), "token expired");
        })
        .await;
    }

    #[tokio::test]
    async fn token_without_exp_is_rejected() {
        crate::test_support::time_limit::limited(async move {
            let v = verifier(&secret_settings()).await;
            let token = hs256(&claims(json!({ "exp": null })));
            assert_eq!(
                v.verify(&token).await,
                Err(JwtError::MissingClaim("exp".to_owned()))
            );
            let token = hs256(&claims(json!({ "exp": "tomorrow" })));
            assert!(v.verify(&token).await.is_err());
        })
        .await;
    }

    #[tokio::test]
    async fn not_yet_valid_token_is_rejected() {
        crate::test_support::time_limit::limited(async move {
            let v = verifier(&secret_settings()).await;
            let token = hs256(&claims(json!({ "nbf": now() + 120 })));
            let error = v.verify(&token).await.expect_err("not yet valid");
            assert_eq!(error, JwtError::NotYetValid);
            assert_eq!(error.to_string(), "token not yet valid");
        })
        .await;
    }

    #[tokio::test]
    async fn leeway_accepts_small_clock_skew_only() {
        crate::test_support::time_limit::limited(async move {
            let skewed = hs256(&claims(json!({ "exp": now() - 10, "nbf": now() + 10 })));
            let v = verifier(&secret_settings()).await;
            assert!(
                v.verify(&skewed).await.is_ok(),
                "within the default 30 s leeway"
            );

            let strict = JwtSettings {
                leeway_secs: 0,
                ..secret_settings()
            };
            let v = verifier(&strict).await;
            assert_eq!(v.verify(&skewed).await, Err(JwtError::Expired));
        })
        .await;
    }

    #[tokio::test]
    async fn tampered_payload_or_signature_is_rejected() {
        crate::test_support::time_limit::limited(async move {
            let v = verifier(&secret_settings()).await;
            let token = hs256(&claims(json!({ "role": "user" })));
            let parts: Vec<&str> = token.split('.').collect();

            let forged_payload = b64_json(&claims(json!({ "role": "admin" })));
            let tampered = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
            assert_eq!(v.verify(&tampered).await, Err(JwtError::InvalidSignature));

            let mut signature: Vec<char> = parts[2].chars().collect();
            let middle = signature.len() / 2;
            signature[middle] = if signature[middle] == 'A' { 'B' } else { 'A' };
            let signature: String = signature.into_iter().collect();
            let tampered = format!("{}.{}.{signature}", parts[0], parts[1]);
            let error = v.verify(&tampered).await.expect_err("tampered signature");
            assert_eq!(error.to_string(), "invalid token signature");

            assert_eq!(v.verify("not-a-token").await, Err(JwtError::Malformed));
            assert_eq!(
                v.verify(&format!("{token}.extra")).await,
                Err(JwtError::Malformed)
            );
        })
        .await;
    }

    #[tokio::test]
    async fn alg_none_and_other_algorithms_are_rejected() {
        crate::test_support::time_limit::limited(async move {
            let v = verifier(&secret_settings()).await;
            let payload = b64_json(&claims(json!({})));
            for alg in ["none", "None", "NONE"] {
                let header = b64_json(&json!({ "alg": alg, "typ": "JWT" }));
                let unsigned = format!("{header}.{payload}.");
                let error = v.verify(&unsigned).await.expect_err("unsigned token");
                assert_eq!(
                    error.to_string(),
                    "token algorithm not allowed",
                    "alg {alg}"
                );
            }
            let hs512 = sign(
                Algorithm::HS512,
                &EncodingKey::from_secret(SECRET.as_bytes()),
                None,
                &claims(json!({})),
            );
            assert_eq!(v.verify(&hs512).await, Err(JwtError::AlgorithmNotAllowed));
        })
        .await;
    }

    #[tokio::test]
    async fn algorithm_confusion_is_rejected() {
        crate::test_support::time_limit::limited(async move {
            let public_pem = read_fixture("rsa_public.pem");
            let confused = sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(&public_pem),
                None,
                &claims(json!({ "role": "admin" })),
            );

            let rsa_only = JwtSettings {
                public_key_file: Some(fixture("rsa_public.pem")),
                ..JwtSettings::default()
            };
            let v = verifier(&rsa_only).await;
            assert_eq!(
                v.verify(&confused).await,
                Err(JwtError::AlgorithmNotAllowed)
            );

            // Even with HS256 enabled the RSA key is never used as an HMAC secret.
            let both = JwtSettings {
                secret: Some(SECRET.to_owned()),
                ..rsa_only
            };
            let v = verifier(&both).await;
            assert_eq!(v.verify(&confused).await, Err(JwtError::InvalidSignature));

            // And the reverse: an RS256 token is not checked against the shared secret.
            let v = verifier(&secret_settings()).await;
            let rs256 = sign(Algorithm::RS256, &rsa_signer(), None, &claims(json!({})));
            assert_eq!(v.verify(&rs256).await, Err(JwtError::AlgorithmNotAllowed));
        })
        .await;
    }

    #[tokio::test]
    async fn rs256_via_pem_is_accepted() {
        crate::test_support::time_limit::limited(async move {
            let settings = JwtSettings {
                public_key_file: Some(fixture("rsa_public.pem")),
                ..JwtSettings::default()
            };
            let v = verifier(&settings).await;
            let token = sign(Algorithm::RS256, &rsa_signer(), None, &claims(json!({})));
            assert_eq!(
                v.verify(&token).await.expect("valid RS256").subject,
                "user-1"
            );

            let es256 = sign(Algorithm::ES256, &ec_signer(), None, &claims(json!({})));
            assert_eq!(v.verify(&es256).await, Err(JwtError::AlgorithmNotAllowed));
        })
        .await;
    }

    #[tokio::test]
    async fn es256_via_pem_is_accepted() {
        crate::test_support::time_limit::limited(async move {
            let settings = JwtSettings {
                public_key_file: Some(fixture("ec_public.pem")),
                ..JwtSettings::default()
            };
            let v = verifier(&settings).await;
            let token = sign(
                Algorithm::ES256,
                &ec_signer(),
                Some("any-kid"),
                &claims(json!({})),
            );
            assert_eq!(
                v.verify(&token).await.expect("valid ES256").subject,
                "user-1"
            );

            let rs256 = sign(Algorithm::RS256, &rsa_signer(), None, &claims(json!({})));
            assert_eq!(v.verify(&rs256).await, Err(JwtError::AlgorithmNotAllowed));
        })
        .await;
    }

    #[tokio::test]
    async fn jwks_file_picks_the_key_by_kid() {
        crate::test_support::time_limit::limited(async move {
            let settings = JwtSettings {
                jwks_file: Some(fixture("jwks.json")),
                ..JwtSettings::default()
            };
            let v = verifier(&settings).await;
            let body = claims(json!({}));

            let rs = sign(Algorithm::RS256, &rsa_signer(), Some("rsa-1"), &body);
            assert!(v.verify(&rs).await.is_ok(), "RS256 with kid rsa-1");
            let es = sign(Algorithm::ES256, &ec_signer(), Some("ec-1"), &body);
            assert!(v.verify(&es).await.is_ok(), "ES256 with kid ec-1");

            let no_kid = sign(Algorithm::ES256, &ec_signer(), None, &body);
            assert!(
                v.verify(&no_kid).await.is_ok(),
                "no kid: keys of the right type are tried"
            );

            let wrong_kid = sign(Algorithm::ES256, &ec_signer(), Some("rsa-1"), &body);
            assert_eq!(v.verify(&wrong_kid).await, Err(JwtError::UnknownKey));
            let unknown = sign(Algorithm::RS256, &rsa_signer(), Some("rsa-2"), &body);
            let error = v.verify(&unknown).await.expect_err("unknown kid");
            assert_eq!(error.to_string(), "token signed by an unknown key");
        })
        .await;
    }

    #[tokio::test]
    async fn jwks_symmetric_keys_never_enable_hs256() {
        crate::test_support::time_limit::limited(async move {
            let mut set: Value =
                serde_json::from_slice(&read_fixture("jwks.json")).expect("fixture jwks");
            let oct = json!({ "kty": "oct", "kid": "shared", "k": URL_SAFE_NO_PAD.encode(SECRET) });
            set["keys"].as_array_mut().expect("keys array").push(oct);
            let file = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(file.path(), set.to_string()).expect("write jwks");

            let settings = JwtSettings {
                jwks_file: Some(file.path().to_owned()),
                ..JwtSettings::default()
            };
            let v = verifier(&settings).await;
            let token = sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(SECRET.as_bytes()),
                Some("shared"),
                &claims(json!({})),
            );
            assert_eq!(v.verify(&token).await, Err(JwtError::AlgorithmNotAllowed));
        })
        .await;
    }

    #[tokio::test]
    async fn issuer_and_audience_are_checked_when_configured() {
        crate::test_support::time_limit::limited(async move {
            let settings = JwtSettings {
                issuer: Some("https://id.tollgate.test".to_owned()),
                audience: Some("tollgate".to_owned()),
                ..secret_settings()
            };
            let v = verifier(&settings).await;
            let good = json!({ "iss": "https://id.tollgate.test", "aud": "tollgate" });
            assert!(v.verify(&hs256(&claims(good))).await.is_ok());
            let listed = json!({ "iss": "https://id.tollgate.test", "aud": ["other", "tollgate"] });
            assert!(v.verify(&hs256(&claims(listed))).await.is_ok());

            let wrong_iss = json!({ "iss": "https://evil.test", "aud": "tollgate" });
            let error = v
                .verify(&hs256(&claims(wrong_iss)))
                .await
                .expect_err("wrong iss");
            assert_eq!(error.to_string(), "token issuer mismatch");
            let no_iss = json!({ "aud": "tollgate" });
            assert_eq!(
                v.verify(&hs256(&claims(no_iss))).await,
                Err(JwtError::MissingClaim("iss".to_owned()))
            );
            let wrong_aud = json!({ "iss": "https://id.tollgate.test", "aud": "other" });
            assert_eq!(
                v.verify(&hs256(&claims(wrong_aud))).await,
                Err(JwtError::AudienceMismatch)
            );
            let no_aud = json!({ "iss": "https://id.tollgate.test" });
            assert_eq!(
                v.verify(&hs256(&claims(no_aud))).await,
                Err(JwtError::MissingClaim("aud".to_owned()))
            );

            // Without configured values, whatever iss/aud a token carries is accepted.
            let v = verifier(&secret_settings()).await;
            let any = json!({ "iss": "https://elsewhere.test", "aud": "someone" });
            assert!(v.verify(&hs256(&claims(any))).await.is_ok());
        })
        .await;
    }

    #[tokio::test]
    async fn subject_comes_from_the_configured_claim() {
        crate::test_support::time_limit::limited(async move {
            let settings = JwtSettings {
                subject_claim: "email".to_owned(),
                ..secret_settings()
            };
            let v = verifier(&settings).await;
            let token = hs256(&claims(json!({ "email": "ada@tollgate.test" })));
            assert_eq!(
                v.verify(&token).await.expect("valid").subject,
                "ada@tollgate.test"
            );

            let error = v
                .verify(&hs256(&claims(json!({}))))
                .await
                .expect_err("no email claim");
            assert_eq!(error.to_string(), "token is missing the `email` claim");
            for bad in [json!(""), json!(42), json!(["a"])] {
                let token = hs256(&claims(json!({ "email": bad })));
                assert_eq!(
                    v.verify(&token).await,
                    Err(JwtError::InvalidClaim("email".to_owned()))
                );
            }

            let v = verifier(&secret_settings()).await;
            let error = v
                .verify(&hs256(&claims(json!({ "sub": null }))))
                .await
                .expect_err("no sub");
            assert_eq!(error.to_string(), "token is missing the `sub` claim");
        })
        .await;
    }

    #[tokio::test]
    async fn role_comes_from_the_configured_claim() {
        crate::test_support::time_limit::limited(async move {
            let v = verifier(&secret_settings()).await;
            let token = hs256(&claims(json!({ "role": "admin" })));
            assert_eq!(
                v.verify(&token).await.expect("valid").role.as_deref(),
                Some("admin")
            );

            let custom = JwtSettings {
                role_claim: "https://tollgate/role".to_owned(),
                ..secret_settings()
            };
            let v = verifier(&custom).await;
            let token = hs256(&claims(
                json!({ "role": "admin", "https://tollgate/role": "billing" }),
            ));
            assert_eq!(
                v.verify(&token).await.expect("valid").role.as_deref(),
                Some("billing")
            );
            let token = hs256(&claims(json!({ "role": "admin" })));
            assert_eq!(v.verify(&token).await.expect("valid").role, None);
        })
        .await;
    }

    #[tokio::test]
    async fn minted_tokens_verify() {
        crate::test_support::time_limit::limited(async move {
            let token = mint_hs256(
                SECRET,
                "acct-7",
                Duration::from_secs(600),
                Some("tollgate"),
                Some("tollgate-api"),
                Some("admin"),
            )
            .expect("mint");
            let settings = JwtSettings {
                issuer: Some("tollgate".to_owned()),
                audience: Some("tollgate-api".to_owned()),
                ..secret_settings()
            };
            let verified = verifier(&settings)
                .await
                .verify(&token)
                .await
                .expect("minted token");
            assert_eq!(verified.subject, "acct-7");
            assert_eq!(verified.role.as_deref(), Some("admin"));
            let exp = verified.claims["exp"].as_u64().expect("numeric exp");
            assert!(exp.abs_diff(now() + 600) <= 2, "exp is now + ttl");

            let other = mint_hs256(
                "another-secret-that-is-long-enough-xx",
                "x",
                Duration::from_secs(60),
                None,
                None,
                None,
            )
            .expect("mint");
            assert_eq!(
                verifier(&secret_settings()).await.verify(&other).await,
                Err(JwtError::InvalidSignature)
            );
        })
        .await;
    }

    #[tokio::test]
    async fn empty_secret_counts_as_unset() {
        crate::test_support::time_limit::limited(async move {
            let empty = JwtSettings {
                secret: Some(String::new()),
                ..JwtSettings::default()
            };
            assert!(!empty.has_key_source());
            let with_pem = JwtSettings {
                public_key_file: Some(fixture("rsa_public.pem")),
                ..empty
            };
            let v = verifier(&with_pem).await;
            let forged = sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b""),
                None,
                &claims(json!({})),
            );
            assert_eq!(v.verify(&forged).await, Err(JwtError::AlgorithmNotAllowed));
        })
        .await;
    }

    #[tokio::test]
    async fn disabled_verifier_accepts_nothing() {
        crate::test_support::time_limit::limited(async move {
            let v = JwtVerifier::disabled();
            assert!(!v.is_configured());
            assert!(!JwtSettings::default().has_key_source());
            assert_eq!(
                v.verify(&hs256(&claims(json!({})))).await,
                Err(JwtError::NotEnabled)
            );
        })
        .await;
    }

    #[test]
    fn settings_parse_from_toml_with_defaults() {
        let settings: JwtSettings =
            toml::from_str("secret = \"s\"\njwks_url = \"https://id.tollgate.test/jwks\"")
                .expect("valid table");
        assert_eq!(settings.jwks_refresh_secs, 300);
        assert_eq!(settings.subject_claim, "sub");
        assert_eq!(settings.role_claim, "role");
        assert_eq!(settings.leeway_secs, 30);
        assert!(settings.has_key_source());
        assert!(
            !format!("{settings:?}").contains("\"s\""),
            "Debug hides the secret"
        );
        assert!(
            toml::from_str::<JwtSettings>("secrett = \"s\"").is_err(),
            "typos are refused"
        );
    }

    #[tokio::test]
    async fn startup_errors_name_the_field() {
        crate::test_support::time_limit::limited(async move {
            let message = setup_error(&JwtSettings::default()).await;
            assert!(
                message.starts_with("auth.jwt:") && message.contains("secret"),
                "{message}"
            );

            let short = JwtSettings {
                secret: Some("hunter2".to_owned()),
                ..JwtSettings::default()
            };
            let message = setup_error(&short).await;
            assert!(message.starts_with("auth.jwt.secret:"), "{message}");
            assert!(
                !message.contains("hunter2"),
                "the secret is not echoed: {message}"
            );

            let cases = [
                (
                    "auth.jwt.public_key_file:",
                    JwtSettings {
                        public_key_file: Some(fixture("missing.pem")),
                        ..JwtSettings::default()
                    },
                ),
                (
                    "auth.jwt.public_key_file:",
                    JwtSettings {
                        public_key_file: Some(fixture("jwks.json")),
                        ..JwtSettings::default()
                    },
                ),
                (
                    "auth.jwt.public_key_file:",
                    JwtSettings {
                        public_key_file: Some(fixture("rsa_private.pem")),
                        ..JwtSettings::default()
                    },
                ),
                (
                    "auth.jwt.jwks_file:",
                    JwtSettings {
                        jwks_file: Some(fixture("rsa_public.pem")),
                        ..JwtSettings::default()
                    },
                ),
                (
                    "auth.jwt.jwks_file:",
                    JwtSettings {
                        jwks_file: Some(fixture("missing.json")),
                        ..JwtSettings::default()
                    },
                ),
                (
                    "auth.jwt.jwks_url:",
                    JwtSettings {
                        jwks_url: Some("ftp://127.0.0.1/jwks.json".to_owned()),
                        ..JwtSettings::default()
                    },
                ),
                (
                    "auth.jwt.jwks_url:",
                    JwtSettings {
                        jwks_url: Some("not a url".to_owned()),
                        ..JwtSettings::default()
                    },
                ),
                (
                    "auth.jwt.leeway_secs:",
                    JwtSettings {
                        leeway_secs: 1 << 40,
                        ..secret_settings()
                    },
                ),
                (
                    "auth.jwt.jwks_refresh_secs:",
                    JwtSettings {
                        jwks_refresh_secs: 0,
                        ..secret_settings()
                    },
                ),
                (
                    "auth.jwt.subject_claim:",
                    JwtSettings {
                        subject_claim: String::new(),
                        ..secret_settings()
                    },
                ),
            ];
            for (prefix, settings) in cases {
                let message = setup_error(&settings).await;
                assert!(
                    message.starts_with(prefix),
                    "expected {prefix}, got {message}"
                );
            }

            let message = setup_error(&JwtSettings {
                public_key_file: Some(fixture("rsa_private.pem")),
                ..JwtSettings::default()
            })
            .await;
            assert!(message.contains("private key"), "{message}");
            assert!(
                !message.contains("MII"),
                "no key material in the message: {message}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn broken_keys_in_a_jwks_file_are_reported_with_their_kid() {
        crate::test_support::time_limit::limited(async move {
            let set = json!({ "keys": [
                { "kty": "EC", "kid": "bent", "crv": "P-256", "x": "AAAA", "y": "AAAA" },
            ]});
            let file = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(file.path(), set.to_string()).expect("write jwks");
            let settings = JwtSettings {
                jwks_file: Some(file.path().to_owned()),
                ..JwtSettings::default()
            };
            let message = setup_error(&settings).await;
            assert!(
                message.starts_with("auth.jwt.jwks_file:") && message.contains("bent"),
                "{message}"
            );
        })
        .await;
    }

    #[test]
    fn debug_output_hides_key_material() {
        let rendered = format!("{:?}", secret_settings());
        assert!(!rendered.contains(SECRET), "{rendered}");
        let key = key_from_pem(&read_fixture("rsa_public.pem")).expect("rsa public key");
        assert_eq!(key.alg, Algorithm::RS256);
        assert!(!format!("{key:?}").contains("MII"));
        let key = key_from_pem(&read_fixture("ec_public.pem")).expect("ec public key");
        assert_eq!(key.alg, Algorithm::ES256);
    }

    // ---- JWKS over HTTP --------------------------------------------------------------------

    #[derive(Clone)]
    struct Reply {
        status: StatusCode,
        body: String,
        delay: Duration,
    }

    /// A real loopback HTTP server that serves a JWK set and counts how often it is asked.
    #[derive(Clone)]
    struct JwksServer {
        url: String,
        hits: Arc<AtomicUsize>,
        reply: Arc<Mutex<Reply>>,
    }

    impl JwksServer {
        async fn start(body: String) -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind loopback");
            let addr = listener.local_addr().expect("local addr");
            let server = JwksServer {
                url: format!("http://{addr}/jwks.json"),
                hits: Arc::new(AtomicUsize::new(0)),
                reply: Arc::new(Mutex::new(Reply {
                    status: StatusCode::OK,
                    body,
                    delay: Duration::ZERO,
                })),
            };
            let app = Router::new()
                .route("/jwks.json", get(serve_jwks))
                .with_state(server.clone());
            tokio::spawn(async move { axum::serve(listener, app).await });
            server
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn set(&self, change: impl FnOnce(&mut Reply)) {
            change(&mut self.reply.lock().expect("reply lock"));
        }

        fn settings(&self) -> JwtSettings {
            JwtSettings {
                jwks_url: Some(self.url.clone()),
                ..JwtSettings::default()
            }
        }
    }

    async fn serve_jwks(State(server): State<JwksServer>) -> (StatusCode, String) {
        server.hits.fetch_add(1, Ordering::SeqCst);
        let reply = server.reply.lock().expect("reply lock").clone();
        tokio::time::sleep(reply.delay).await;
        (reply.status, reply.body)
    }

    /// The fixture set restricted to the given kids.
    fn jwks_with(kids: &[&str]) -> String {
        let mut set: Value =
            serde_json::from_slice(&read_fixture("jwks.json")).expect("fixture jwks");
        set["keys"]
            .as_array_mut()
            .expect("keys array")
            .retain(|k| kids.contains(&k["kid"].as_str().unwrap_or_default()));
        set.to_string()
    }

    fn timing(refresh_every: Duration, kid_refetch_every: Duration) -> Timing {
        Timing {
            refresh_every,
            kid_refetch_every,
            fetch_timeout: JWKS_FETCH_TIMEOUT,
        }
    }

    #[tokio::test]
    async fn jwks_url_is_cached_and_refetched_on_unknown_kid_within_the_rate_limit() {
        crate::test_support::time_limit::limited(async move {
            let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
            let v = verifier(&server.settings()).await;
            assert_eq!(server.hits(), 1, "fetched once at start-up");

            let rs = sign(
                Algorithm::RS256,
                &rsa_signer(),
                Some("rsa-1"),
                &claims(json!({})),
            );
            for _ in 0..3 {
                assert!(v.verify(&rs).await.is_ok());
            }
            assert_eq!(server.hits(), 1, "served from the cache");

            // The provider rotates in a new key: its first token triggers one refetch.
            server.set(|r| r.body = jwks_with(&["rsa-1", "ec-1"]));
            let es = sign(
                Algorithm::ES256,
                &ec_signer(),
                Some("ec-1"),
                &claims(json!({})),
            );
            assert!(
                v.verify(&es).await.is_ok(),
                "new kid accepted after refetch"
            );
            assert_eq!(server.hits(), 2);

            // Made-up kids cannot make us hammer the endpoint, one by one or all at once.
            let forged = sign(
                Algorithm::RS256,
                &rsa_signer(),
                Some("made-up"),
                &claims(json!({})),
            );
            for _ in 0..5 {
                assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
            }
            let results = join_all((0..20).map(|_| v.verify(&forged))).await;
            assert!(results.iter().all(|r| *r == Err(JwtError::UnknownKey)));
            assert_eq!(server.hits(), 2, "no refetch within 10 s of the last one");
            assert!(v.verify(&es).await.is_ok(), "known kids still work");
        })
        .await;
    }

    #[tokio::test]
    async fn unknown_kid_refetches_again_once_the_interval_has_passed() {
        crate::test_support::time_limit::limited(async move {
            let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
            let t = timing(Duration::from_secs(300), Duration::from_secs(1));
            let v = JwtVerifier::build(&server.settings(), t)
                .await
                .expect("verifier");
            let forged = sign(
                Algorithm::RS256,
                &rsa_signer(),
                Some("made-up"),
                &claims(json!({})),
            );

            assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
            assert_eq!(server.hits(), 2, "start-up fetch plus one refetch");
            assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
            assert_eq!(server.hits(), 2, "rate limited");
            tokio::time::sleep(Duration::from_millis(1100)).await;
            assert_eq!(v.verify(&forged).await, Err(JwtError::UnknownKey));
            assert_eq!(server.hits(), 3, "allowed again after the interval");
        })
        .await;
    }

    #[tokio::test]
    async fn jwks_cache_expires_after_the_refresh_interval() {
        crate::test_support::time_limit::limited(async move {
            let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
            let t = timing(Duration::from_secs(1), KID_REFETCH_INTERVAL);
            let v = JwtVerifier::build(&server.settings(), t)
                .await
                .expect("verifier");
            let rs = sign(
                Algorithm::RS256,
                &rsa_signer(),
                Some("rsa-1"),
                &claims(json!({})),
            );

            assert!(v.verify(&rs).await.is_ok());
            assert_eq!(server.hits(), 1);
            tokio::time::sleep(Duration::from_millis(1100)).await;
            assert!(v.verify(&rs).await.is_ok());
            assert_eq!(server.hits(), 2, "stale set refreshed");
            assert!(v.verify(&rs).await.is_ok());
            assert_eq!(server.hits(), 2, "fresh again");

            // When the provider is down, the last good set keeps working.
            server.set(|r| r.status = StatusCode::SERVICE_UNAVAILABLE);
            tokio::time::sleep(Duration::from_millis(1100)).await;
            assert!(
                v.verify(&rs).await.is_ok(),
                "stale keys used while the endpoint fails"
            );
            assert_eq!(server.hits(), 3);
            assert!(v.verify(&rs).await.is_ok());
            assert_eq!(server.hits(), 3, "failed fetches are not retried at once");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_jwks_url_is_not_fatal_and_fetched_on_first_use() {
        crate::test_support::time_limit::limited(async move {
            let server = JwksServer::start(jwks_with(&["rsa-1", "ec-1"])).await;
            server.set(|r| r.status = StatusCode::SERVICE_UNAVAILABLE);
            let v = verifier(&server.settings()).await;
            assert_eq!(server.hits(), 1, "tried at start-up");

            // Concurrent first requests share one slow fetch.
            server.set(|r| {
                r.status = StatusCode::OK;
                r.delay = Duration::from_millis(300);
            });
            let token = sign(
                Algorithm::ES256,
                &ec_signer(),
                Some("ec-1"),
                &claims(json!({})),
            );
            let results = join_all((0..20).map(|_| v.verify(&token))).await;
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            assert_eq!(server.hits(), 2, "one shared fetch");

            // Nothing listening at all: start-up still succeeds, requests get a clear error.
            let port = {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                listener.local_addr().expect("addr").port()
            };
            let dead = JwtSettings {
                jwks_url: Some(format!("http://127.0.0.1:{port}/jwks.json")),
                ..JwtSettings::default()
            };
            let v = verifier(&dead).await;
            let error = v.verify(&token).await.expect_err("no keys");
            assert_eq!(error, JwtError::KeysUnavailable);
        })
        .await;
    }

    #[tokio::test]
    async fn jwks_fetch_enforces_body_limit_and_timeout() {
        crate::test_support::time_limit::limited(async move {
            let token = sign(
                Algorithm::RS256,
                &rsa_signer(),
                Some("rsa-1"),
                &claims(json!({})),
            );
            let padded = |pad: usize| {
                let mut set: Value = serde_json::from_str(&jwks_with(&["rsa-1"])).expect("jwks");
                set["padding"] = Value::from("x".repeat(pad));
                set.to_string()
            };

            let server = JwksServer::start(padded(1000)).await;
            let v = verifier(&server.settings()).await;
            assert!(v.verify(&token).await.is_ok(), "a small padded set is fine");

            let server = JwksServer::start(padded(JWKS_MAX_BYTES)).await;
            let v = verifier(&server.settings()).await;
            assert_eq!(
                v.verify(&token).await,
                Err(JwtError::KeysUnavailable),
                "over 1 MiB"
            );

            let server = JwksServer::start(jwks_with(&["rsa-1"])).await;
            server.set(|r| r.delay = Duration::from_secs(3));
            let t = Timing {
                refresh_every: Duration::from_secs(300),
                kid_refetch_every: KID_REFETCH_INTERVAL,
                fetch_timeout: Duration::from_millis(200),
            };
            let started = Instant::now();
            let v = JwtVerifier::build(&server.settings(), t)
                .await
                .expect("slow endpoint is not fatal");
            assert_eq!(v.verify(&token).await, Err(JwtError::KeysUnavailable));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "gave up after the timeout"
            );
        })
        .await;
    }
}
