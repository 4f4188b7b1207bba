//! `config/tollgate.toml`: loaded and validated once at start-up, then environment overrides.
//!
//! Every error names the file, the field path and the reason, so a bad config stops start-up
//! with one readable line and never surfaces later inside a request.
//!
//! Length: the config's types sit with their validation, so each field's rule is next to the field;
//! the sections that grew rules of their own are apart (`jwt.rs`, `payments.rs`, `packages.rs`,
//! `invoices.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use serde::Deserialize;

mod invoices;
mod jwt;
pub mod packages;
pub mod payments;

use crate::domain::Credits;
pub use invoices::InvoiceSettings;
pub use jwt::JwtSettings;
use packages::Package;

/// Environment variables that override the file (secrets belong here, not in the file).
pub const ENV_LISTEN: &str = "TOLLGATE_LISTEN";
pub const ENV_DATABASE_URL: &str = "TOLLGATE_DATABASE_URL";
pub const ENV_REDIS_URL: &str = "TOLLGATE_REDIS_URL";
pub const ENV_JWT_SECRET: &str = "TOLLGATE_JWT_SECRET";
pub const ENV_ADMIN_TOKEN: &str = "TOLLGATE_ADMIN_TOKEN";

/// The built-in mock upstream's `base_url`: served in-process, no network needed.
pub const BUILTIN_MOCK_URL: &str = "builtin:mock";

#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub accounts: AccountsConfig,
    #[serde(default)]
    pub metering: MeteringConfig,
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Credit packages on sale (`GET /api/credits/packages`).
    #[serde(default)]
    pub packages: Vec<Package>,
    #[serde(default)]
    pub payments: payments::PaymentsConfig,
    /// Seller details and tax printed on invoices.
    #[serde(default)]
    pub invoices: InvoiceSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted on `/v1` (413 beyond).
    pub body_limit_bytes: usize,
    /// How long a graceful shutdown waits for open streams before cutting them (and billing
    /// what they produced).
    pub shutdown_grace_secs: u64,
    pub log_format: LogFormat,
    /// A setup for trying Tollgate out: only then may `serve` and `token mint` use the
    /// development secrets shipped in `config/tollgate.toml` ([`SHIPPED_JWT_SECRET`],
    /// [`SHIPPED_ADMIN_TOKEN`]).
    pub development: bool,
}

/// The JWT secret shipped in `config/tollgate.toml`: public, so fit for trying out only.
pub const SHIPPED_JWT_SECRET: &str = "tollgate-dev-secret-change-me-in-production";
/// The admin token shipped in `config/tollgate.toml`: public, so fit for trying out only.
pub const SHIPPED_ADMIN_TOKEN: &str = "tollgate-dev-admin-token";

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 16 * 1024 * 1024,
            shutdown_grace_secs: 30,
            log_format: LogFormat::Text,
            development: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://path/to/file.db` (created if missing).
    pub url: String,
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://data/tollgate.db".to_owned(),
            max_connections: 8,
        }
    }
}

/// `[cache]`: where balances, holds and pending settlements are cached.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Unset (the default): an in-process cache, right for a single instance. Set it to share
    /// one Redis between instances: `redis://[user:pass@]host:port[/db]`, or
    /// `redis+cluster://[user:pass@]host:port,host:port` for Redis Cluster.
    /// `TOLLGATE_REDIS_URL` overrides it.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub key_prefix: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            redis_url: None,
            key_prefix: "tollgate".to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub jwt: JwtSettings,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for `/admin/*`; `TOLLGATE_ADMIN_TOKEN` overrides it. Empty disables the
    /// token (admin-role JWTs still work).
    pub token: Option<String>,
    /// A JWT whose role claim equals this value may call `/admin/*`.
    pub jwt_role: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// Credits granted (as a `bonus` ledger entry) when an account is first seen.
    pub signup_grant: Credits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    pub pricing_file: PathBuf,
    /// How far below zero a balance may be reserved into (docs/architecture.md I1).
    pub overdraft: Credits,
    /// Percentage added to the tokenizer's prompt count when estimating the hold.
    pub estimate_margin_percent: u32,
    /// `reject` answers 402 when the estimate is not affordable; `cap_max_tokens` lowers the
    /// request's output cap to what the balance affords (still 402 if not even the prompt is).
    pub on_insufficient: InsufficientPolicy,
    /// Largest number of settlements written in one ledger transaction. A batch is whatever
    /// queued while the previous one was being written; there is no wait to fill it.
    pub settle_batch_max: usize,
    /// How long a settlement the ledger refuses on its own, while it answers, is retried before
    /// it is set aside for an admin (`GET /admin/settlements/set-aside`). An outage sets
    /// nothing aside: settlements wait for the ledger to come back.
    pub set_aside_after_secs: u64,
    pub pricing_poll_ms: u64,
    /// How long a hold lives without renewal; after it, any instance may release it. Running
    /// streams renew their holds (every third of this, at most every 2 s), so it need not
    /// exceed the longest stream.
    pub hold_ttl_secs: u64,
    /// How often each instance releases expired holds and writes settlements orphaned by a
    /// crashed instance.
    pub recovery_interval_ms: u64,
    /// A settlement recorded in the cache but not in the ledger after this long is written by
    /// whichever instance finds it (writes are idempotent, so a slow owner is harmless).
    pub orphan_after_secs: u64,
    /// How often each instance sweeps expired grant remainders out of balances.
    pub expiry_sweep_secs: u64,
    /// What happens to an upstream call whose client hung up: `finish` lets it run (for up to
    /// `disconnect_finish_secs`) and bills the usage the upstream reports, as the upstream bills
    /// the work; `cancel` cancels it and bills what was produced so far.
    pub on_client_disconnect: DisconnectPolicy,
    /// Longest an upstream call runs on after its client hung up (`finish` policy); then it is
    /// cancelled and billed for what it produced.
    pub disconnect_finish_secs: u64,
    /// A request with input the gateway cannot size from its body (images, audio, files,
    /// `previous_response_id`, …): `reserve` holds the model's whole `max_input_tokens` for its
    /// prompt; `reject` answers 400.
    pub on_unsized_input: UnsizedInputPolicy,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            pricing_file: PathBuf::from("config/pricing.toml"),
            overdraft: Credits::ZERO,
            estimate_margin_percent: 10,
            on_insufficient: InsufficientPolicy::Reject,
            settle_batch_max: 512,
            set_aside_after_secs: 30,
            pricing_poll_ms: 500,
            hold_ttl_secs: 3600,
            recovery_interval_ms: 2000,
            orphan_after_secs: 30,
            expiry_sweep_secs: 60,
            on_client_disconnect: DisconnectPolicy::Finish,
            disconnect_finish_secs: 120,
            on_unsized_input: UnsizedInputPolicy::Reserve,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnsizedInputPolicy {
    Reserve,
    Reject,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectPolicy {
    Finish,
    Cancel,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InsufficientPolicy {
    Reject,
    CapMaxTokens,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// e.g. `https://api.openai.com/v1`, or `builtin:mock`.
    pub base_url: String,
    pub api_key: Option<String>,
    /// Name of the environment variable holding the API key (must be set at start-up).
    pub api_key_env: Option<String>,
    /// Exact model names and glob patterns (`gpt-4o*`) this upstream serves.
    pub models: Vec<String>,
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Time allowed until the upstream's response headers arrive.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Longest silence allowed between two chunks of a streamed response.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
}

fn default_connect_timeout() -> u64 {
    10
}
fn default_request_timeout() -> u64 {
    600
}
fn default_idle_timeout() -> u64 {
    300
}

impl UpstreamConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

/// An upstream after validation: its key resolved and its model patterns compiled.
#[derive(Debug, Clone)]
pub struct ResolvedUpstream {
    pub config: UpstreamConfig,
    pub api_key: Option<String>,
    pub matchers: Vec<GlobMatcher>,
}

impl ResolvedUpstream {
    pub fn serves(&self, model: &str) -> bool {
        self.matchers.iter().any(|m| m.is_match(model))
    }

    pub fn is_builtin_mock(&self) -> bool {
        self.config.base_url == BUILTIN_MOCK_URL
    }
}

/// A secret given in the file as `name`, or named by `name_env` as an environment variable
/// (read with `lookup`); both at once is an error. Errors name the field under `path`.
pub(crate) fn secret_or_env(
    path: &str,
    name: &str,
    value: &Option<String>,
    env: &Option<String>,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    match (value, env) {
        (Some(_), Some(_)) => Err(format!(
            "{path}.{name}: set either {name} or {name}_env, not both"
        )),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(var)) => lookup(var)
            .filter(|v| !v.is_empty())
            .map(Some)
            .ok_or_else(|| format!("{path}.{name}_env: environment variable `{var}` is not set")),
        (None, None) => Ok(None),
    }
}

impl Config {
    /// Reads, parses, applies environment overrides and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Config::parse(&text, &file)?;
        config.apply_env(|name| std::env::var(name).ok(), &file)?;
        config.validate(&file)?;
        Ok(config)
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let error = |message: String| ConfigError {
            file: file.to_owned(),
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| error(e.to_string()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let inner = inner.trim_end();
            if path == "." {
                error(inner.to_owned())
            } else {
                error(format!("{path}: {inner}"))
            }
        })
    }

    /// Applies `TOLLGATE_*` overrides; `lookup` is `std::env::var` outside tests.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
        file: &str,
    ) -> Result<(), ConfigError> {
        if let Some(listen) = lookup(ENV_LISTEN) {
            self.server.listen = listen.parse().map_err(|e| ConfigError {
                file: file.to_owned(),
                message: format!("{ENV_LISTEN}: `{listen}` is not a socket address: {e}"),
            })?;
        }
        if let Some(url) = lookup(ENV_DATABASE_URL) {
            self.database.url = url;
        }
        if let Some(url) = lookup(ENV_REDIS_URL) {
            self.cache.redis_url = Some(url);
        }
        if let Some(secret) = lookup(ENV_JWT_SECRET) {
            self.auth.jwt.secret = Some(secret);
        }
        if let Some(token) = lookup(ENV_ADMIN_TOKEN) {
            self.admin.token = Some(token);
        }
        Ok(())
    }

    /// Refuses the shipped development secrets outside a development setup
    /// (`server.development`): `serve` and `token mint` call it, after the environment's
    /// overrides are applied.
    pub fn check_secrets(&self) -> Result<(), String> {
        if self.server.development {
            return Ok(());
        }
        let shipped = [
            (
                "auth.jwt.secret",
                "TOLLGATE_JWT_SECRET",
                self.auth.jwt.secret.as_deref() == Some(SHIPPED_JWT_SECRET),
            ),
            (
                "admin.token",
                "TOLLGATE_ADMIN_TOKEN",
                self.admin.token.as_deref() == Some(SHIPPED_ADMIN_TOKEN),
            ),
        ];
        match shipped.iter().find(|(_, _, is_shipped)| *is_shipped) {
            Some((field, variable, _)) => Err(format!(
                "{field} is the development value shipped in config/tollgate.toml, which anyone \
                 can read: set your own ({variable}), or set server.development = true to try \
                 Tollgate out"
            )),
            None => Ok(()),
        }
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let error = |message: String| ConfigError {
            file: file.to_owned(),
            message,
        };
        if !(self.database.url.starts_with("sqlite:") || self.database.url.starts_with("mysql://"))
        {
            return Err(error(format!(
                "database.url: `{}` is not supported (use sqlite://PATH or mysql://USER@HOST/DB)",
                self.database.url
            )));
        }
        if self.server.body_limit_bytes == 0 {
            return Err(error("server.body_limit_bytes: must be positive".into()));
        }
        if self.metering.overdraft.is_negative() {
            return Err(error("metering.overdraft: must not be negative".into()));
        }
        if self.metering.settle_batch_max == 0 {
            return Err(error("metering.settle_batch_max: must be positive".into()));
        }
        if self.accounts.signup_grant.is_negative() {
            return Err(error("accounts.signup_grant: must not be negative".into()));
        }
        self.resolve_upstreams(|name| std::env::var(name).ok())
            .map_err(error)?;
        packages::validate(&self.packages).map_err(error)?;
        self.resolve_payments(|name| std::env::var(name).ok())
            .map_err(error)?;
        if self.invoices.tax_rate_percent.is_sign_negative() {
            return Err(error(
                "invoices.tax_rate_percent: must not be negative".into(),
            ));
        }
        Ok(())
    }

    /// Validates `[payments]` and reads the providers' secrets.
    pub fn resolve_payments(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<payments::ResolvedPayments, String> {
        let ids: Vec<&str> = self.packages.iter().map(|p| p.id.as_str()).collect();
        self.payments.resolve(&ids, lookup)
    }

    /// Validates every upstream and resolves its API key (from the file or its env var).
    pub fn resolve_upstreams(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<ResolvedUpstream>, String> {
        let mut names = std::collections::HashSet::new();
        self.upstreams
            .iter()
            .enumerate()
            .map(|(i, upstream)| {
                let field = |name: &str| format!("upstreams[{i}].{name}");
                if upstream.name.is_empty() || !names.insert(upstream.name.clone()) {
                    return Err(format!("{}: must be non-empty and unique", field("name")));
                }
                if upstream.base_url != BUILTIN_MOCK_URL {
                    let uri: http::Uri = upstream.base_url.parse().map_err(|e| {
                        format!(
                            "{}: `{}` is not a URL: {e}",
                            field("base_url"),
                            upstream.base_url
                        )
                    })?;
                    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                        return Err(format!(
                            "{}: `{}` must be an http(s) URL with a host, or `{BUILTIN_MOCK_URL}`",
                            field("base_url"),
                            upstream.base_url
                        ));
                    }
                }
                let api_key = secret_or_env(
                    &format!("upstreams[{i}]"),
                    "api_key",
                    &upstream.api_key,
                    &upstream.api_key_env,
                    &lookup,
                )?;
                if upstream.models.is_empty() {
                    return Err(format!(
                        "{}: list at least one model or pattern",
                        field("models")
                    ));
                }
                let matchers = upstream
                    .models
                    .iter()
                    .enumerate()
                    .map(|(j, pattern)| {
                        Glob::new(pattern)
                            .map(|g| g.compile_matcher())
                            .map_err(|e| {
                                format!(
                                    "{}[{j}]: `{pattern}` is not a valid pattern: {e}",
                                    field("models")
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                for (name, value) in &upstream.headers {
                    http::HeaderName::try_from(name.as_str()).map_err(|_| {
                        format!("{}: `{name}` is not a header name", field("headers"))
                    })?;
                    http::HeaderValue::try_from(value.as_str()).map_err(|_| {
                        format!("{}.{name}: not a valid header value", field("headers"))
                    })?;
                }
                if upstream.connect_timeout_secs == 0 || upstream.request_timeout_secs == 0 {
                    return Err(format!("{}: timeouts must be positive", field("timeouts")));
                }
                Ok(ResolvedUpstream {
                    config: upstream.clone(),
                    api_key,
                    matchers,
                })
            })
            .collect()
    }

    /// The SQLite file path of `database.url`, for creating its directory.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        let rest = self.database.url.strip_prefix("sqlite:")?;
        let rest = rest.trim_start_matches("//");
        let path = rest.split('?').next().unwrap_or(rest);
        (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "tollgate.toml")
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").expect("valid");
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.server.body_limit_bytes, 16 * 1024 * 1024);
        assert_eq!(config.metering.overdraft, Credits::ZERO);
    }

    #[test]
    fn unknown_key_names_the_field() {
        let err = parse("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n").expect_err("unknown");
        assert!(err.to_string().contains("listne"), "{err}");
        assert!(err.to_string().starts_with("tollgate.toml:"), "{err}");
    }

    #[test]
    fn bad_value_names_the_path() {
        let err = parse("[accounts]\nsignup_grant = \"ten\"\n").expect_err("bad credits");
        assert!(err.to_string().contains("accounts.signup_grant"), "{err}");
    }

    fn upstream(extra: &str) -> String {
        format!("[[upstreams]]\nname = \"a\"\nmodels = [\"gpt-4o*\"]\n{extra}\n")
    }

    #[test]
    fn upstream_validation_names_field_and_reason() {
        let resolve = |text: &str| {
            parse(text)
                .expect("parses")
                .resolve_upstreams(|_| None)
                .map(|_| ())
        };
        let err = resolve(&upstream("base_url = \"ftp://x\"")).expect_err("scheme");
        assert!(err.contains("upstreams[0].base_url"), "{err}");
        let err = resolve(&upstream("base_url = \"http://x\"\napi_key_env = \"NOPE\""))
            .expect_err("missing env");
        assert!(
            err.contains("upstreams[0].api_key_env") && err.contains("NOPE"),
            "{err}"
        );
        let text = "[[upstreams]]\nname = \"a\"\nbase_url = \"http://x\"\nmodels = [\"gpt-[\"]\n";
        let err = resolve(text).expect_err("glob");
        assert!(err.contains("upstreams[0].models[0]"), "{err}");
        assert!(resolve(&upstream("base_url = \"http://127.0.0.1:9/v1\"")).is_ok());
    }

    #[test]
    fn env_overrides_win_over_the_file() {
        let mut config = parse("[admin]\ntoken = \"file\"\n").expect("valid");
        config
            .apply_env(
                |name| match name {
                    ENV_ADMIN_TOKEN => Some("env".into()),
                    ENV_LISTEN => Some("127.0.0.1:9999".into()),
                    _ => None,
                },
                "t",
            )
            .expect("valid env");
        assert_eq!(config.admin.token.as_deref(), Some("env"));
        assert_eq!(config.server.listen.port(), 9999);
        let err = config
            .apply_env(|n| (n == ENV_LISTEN).then(|| "nope".into()), "t")
            .expect_err("bad listen");
        assert!(err.to_string().contains(ENV_LISTEN));
    }

    #[test]
    fn redis_url_comes_from_the_file_or_the_environment() {
        let config = parse("").expect("valid");
        assert_eq!(config.cache.redis_url, None);
        assert_eq!(config.cache.key_prefix, "tollgate");
        let mut config = parse("[cache]\nredis_url = \"redis://file:6379\"\nkey_prefix = \"tg\"\n")
            .expect("valid");
        assert_eq!(config.cache.redis_url.as_deref(), Some("redis://file:6379"));
        config
            .apply_env(
                |name| (name == ENV_REDIS_URL).then(|| "redis://env:6379".into()),
                "t",
            )
            .expect("valid env");
        assert_eq!(config.cache.redis_url.as_deref(), Some("redis://env:6379"));
        assert_eq!(config.cache.key_prefix, "tg");
        let err = parse("[cache]\nredis = \"x\"\n").expect_err("unknown field");
        assert!(err.to_string().contains("redis"), "{err}");
    }

    #[test]
    fn the_shipped_config_is_valid() {
        let config = parse(include_str!("../../config/tollgate.toml")).expect("parses");
        config.validate("config/tollgate.toml").expect("validates");
        // A development setup, whose secrets are the ones `check_secrets` knows as shipped.
        assert!(config.server.development);
        assert_eq!(config.auth.jwt.secret.as_deref(), Some(SHIPPED_JWT_SECRET));
        assert_eq!(config.admin.token.as_deref(), Some(SHIPPED_ADMIN_TOKEN));
        config.check_secrets().expect("allowed while developing");
        // No user JWT reaches /admin unless the operator names the role.
        assert_eq!(config.admin.jwt_role, None);
        let mut production = config.clone();
        production.server.development = false;
        let refused = production
            .check_secrets()
            .expect_err("refused in production");
        assert!(refused.contains("auth.jwt.secret"), "{refused}");
        production.auth.jwt.secret = Some("a-secret-of-our-own-long-enough-for-hs256".into());
        let refused = production.check_secrets().expect_err("the admin token too");
        assert!(refused.contains("admin.token"), "{refused}");
        assert_eq!(config.upstreams[0].base_url, BUILTIN_MOCK_URL);
        let ids: Vec<&str> = config.packages.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["starter", "professional", "enterprise"]);
        assert_eq!(config.packages[0].price.to_string(), "9.99");
    }

    #[test]
    fn a_bad_package_stops_start_up_naming_the_field() {
        let text = "[[packages]]\nid = \"a\"\nname = \"A\"\ncredits = \"0\"\nprice = \"1\"\ncurrency = \"USD\"\n";
        let err = parse(text)
            .expect("parses")
            .validate("t")
            .expect_err("zero credits");
        assert!(err.to_string().contains("packages[0].credits"), "{err}");
    }

    #[test]
    fn sqlite_path_is_extracted() {
        let mut config = parse("").expect("valid");
        assert_eq!(
            config.sqlite_path(),
            Some(PathBuf::from("data/tollgate.db"))
        );
        config.database.url = "sqlite:///tmp/x.db?mode=rwc".into();
        assert_eq!(config.sqlite_path(), Some(PathBuf::from("/tmp/x.db")));
    }
}
