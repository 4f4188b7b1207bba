//! `spawn_app()`: a gateway with its own temp directory (SQLite file, config, pricing), a fake
//! upstream on its own port, and typed helpers for what the tests check.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::app::App;
use tollgate::config::Config;
use tollgate::ledger::{Ledger, VerifyProblem};
use tollgate::mock::{self, MockLog};
use tollgate::state::AppState;

/// Which backends a test binary runs the gateway on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file and the in-process cache.
    Embedded,
    /// MariaDB/MySQL and Redis (see [`mariadb`] and [`shared_redis`]); each test gets its own
    /// database and key prefix.
    Production,
}

#[path = "../support/mod.rs"]
#[allow(dead_code, reason = "the library's unit tests use other parts of it")]
mod support;
pub use support::services::*;
pub use support::time_limit::*;

// ---------------------------------------------------------------------------------------------
// Test databases and key prefixes
// ---------------------------------------------------------------------------------------------

/// Creates a fresh database on `server` (`mysql://USER@HOST:PORT`) and returns its name.
pub async fn create_test_database(server: &str) -> String {
    use sqlx::Connection;
    let name = unique_test_name();
    let mut admin = sqlx::MySqlConnection::connect(server)
        .await
        .unwrap_or_else(|e| panic!("MariaDB/MySQL at {server}: {e}"));
    // The server's default character set on purpose: the migrations must not depend on it.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    admin.close().await.expect("close the admin connection");
    name
}

/// Drops a test database, first killing what is still connected to it (a gateway not stopped,
/// or an open transaction of a failed test, would make `DROP DATABASE` wait for its locks).
/// Synchronous, for `Drop`: it runs on a thread of its own with a small runtime.
pub fn drop_test_database(server: &str, name: &str) -> Result<(), String> {
    let (server, name) = (server.to_owned(), name.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime
            .block_on(async {
                use sqlx::Connection;
                let mut conn = sqlx::MySqlConnection::connect(&server).await?;
                let leftovers: Vec<i64> = sqlx::query_scalar(
                    "SELECT id FROM information_schema.processlist \
                     WHERE db = ? AND id <> CONNECTION_ID()",
                )
                .bind(&name)
                .fetch_all(&mut conn)
                .await?;
                for id in leftovers {
                    // It may have ended by itself since the list was read.
                    if let Err(error) = sqlx::query(sqlx::AssertSqlSafe(format!("KILL {id}")))
                        .execute(&mut conn)
                        .await
                        && !error.to_string().contains("Unknown thread id")
                    {
                        return Err(error);
                    }
                }
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS `{name}`"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
            .map_err(|e| format!("dropping test database {name}: {e}"))
    })
    .join()
    .unwrap_or_else(|_| Err("dropping a test database panicked".into()))
}

/// Deletes every key under `prefix` (both `prefix:…` and the hash-tagged `{prefix:…`).
pub fn delete_test_keys(url: &str, prefix: &str) -> Result<(), String> {
    let script = "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do \
                  n = n + redis.call('DEL', k) end return n";
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .map_err(|e| format!("Redis at {url}: {e}"))?;
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        redis::cmd("EVAL")
            .arg(script)
            .arg(0)
            .arg(&pattern)
            .query::<i64>(&mut conn)
            .map_err(|e| format!("deleting {pattern} from {url}: {e}"))?;
    }
    Ok(())
}

/// Fails the test with a clean-up error, unless it is failing already (a second panic while
/// unwinding would abort the whole binary).
fn cleaned_up(outcome: Result<(), String>) {
    if let Err(error) = outcome {
        if std::thread::panicking() {
            eprintln!("{error}");
        } else {
            panic!("{error}");
        }
    }
}

/// A database and key prefix of one test, removed when dropped.
pub struct Isolation {
    pub database_url: String,
    /// The shared Redis and this test's key prefix in it (production backends only).
    pub redis: Option<(String, String)>,
    /// The MariaDB server and this test's database on it (production backends only).
    mysql: Option<(String, String)>,
}

impl Isolation {
    pub async fn new(backend: Backend, dir: &Path) -> Isolation {
        match backend {
            Backend::Embedded => Isolation {
                database_url: format!("sqlite://{}", dir.join("ledger.db").display()),
                redis: None,
                mysql: None,
            },
            Backend::Production => {
                let (Some(mariadb), Some(redis)) = (mariadb(), shared_redis()) else {
                    panic!(
                        "the production backends are missing: run the test through run_test, \
                         which skips it then"
                    );
                };
                let name = create_test_database(&mariadb.server).await;
                Isolation {
                    database_url: format!("{}/{name}", mariadb.server),
                    redis: Some((redis.url.clone(), unique_test_name())),
                    mysql: Some((mariadb.server.clone(), name)),
                }
            }
        }
    }
}

impl Drop for Isolation {
    fn drop(&mut self) {
        if let Some((server, name)) = &self.mysql {
            cleaned_up(drop_test_database(server, name));
        }
        if let Some((url, prefix)) = &self.redis {
            cleaned_up(delete_test_keys(url, prefix));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a test
// ---------------------------------------------------------------------------------------------

/// Runs a test's body: at once returns (the test is skipped, see [`services`]) when this
/// binary's backends are missing, and fails the test if the body runs past
/// [`TEST_TIME_LIMIT`].
pub async fn run_test(body: impl AsyncFnOnce()) {
    run_test_within(TEST_TIME_LIMIT, body).await;
}

/// [`run_test`] with another time limit, for a test that waits out long timeouts on purpose.
pub async fn run_test_within(limit: Duration, body: impl AsyncFnOnce()) {
    if crate::BACKEND == Backend::Production && !services(&[Service::MariaDb, Service::Redis]) {
        return;
    }
    within(limit, body()).await;
}

pub const JWT_SECRET: &str = "integration-test-secret-at-least-32-bytes";
pub const ADMIN_TOKEN: &str = "integration-admin-token";
pub const UPSTREAM_KEY: &str = "sk-upstream-secret";

pub const DEFAULT_PRICING: &str = r#"
rounding = "exact"
default_max_output_tokens = 256
[default]
prompt_per_1k = "1"
completion_per_1k = "1"
[[models]]
match = "mock-pricey*"
prompt_per_1k = "10"
completion_per_1k = "20"
"#;

/// A fake upstream: the mock OpenAI router on its own loopback port.
pub struct FakeUpstream {
    pub url: String,
    pub log: MockLog,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn fake_upstream() -> FakeUpstream {
    let (router, log) = mock::router_with_log();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("the fake upstream serves");
    });
    FakeUpstream {
        url: format!("http://{addr}/v1"),
        log,
        task,
    }
}

pub struct Options {
    pub pricing: String,
    /// Extra TOML appended to the config (before the upstreams).
    pub extra: String,
    /// Upstream tables; `None` means one upstream, `fake`, serving `mock-*` from the fake.
    pub upstreams: Option<String>,
    /// Production backend only: another Redis than the shared one.
    pub redis_url: Option<String>,
    /// `server.shutdown_grace_secs`.
    pub shutdown_grace_secs: u64,
    /// `admin.jwt_role`: the role claim that lets a JWT call `/admin` (`None`: no JWT may).
    pub admin_jwt_role: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pricing: DEFAULT_PRICING.to_owned(),
            extra: String::new(),
            upstreams: None,
            redis_url: None,
            shutdown_grace_secs: 5,
            admin_jwt_role: Some("admin"),
        }
    }
}

pub struct TestApp {
    pub config: Config,
    pub base: String,
    pub client: reqwest::Client,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub pricing_path: PathBuf,
    pub upstream: FakeUpstream,
    pub state: AppState,
    /// A second connection to the same database, for checking what was written.
    pub ledger: Arc<dyn Ledger>,
    gateway: Gateway,
    // Last: the database and keys outlive every connection above.
    _isolation: Isolation,
}

/// One running gateway instance.
pub struct Gateway {
    pub base: String,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    pub async fn start(config: &Config) -> Gateway {
        let app = App::build(config.clone()).await.expect("app builds");
        let addr = app.local_addr().expect("bound");
        let state = app.state().clone();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            // Told to stop, or the Gateway was dropped: either way, stop.
            let _ = rx.await;
        }));
        Gateway {
            base: format!("http://{addr}"),
            state,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Stops gracefully (drain, flush) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            // Refused only if the server ended already; awaiting it tells how.
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stopped cleanly");
        }
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    let upstream = fake_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pricing_path = dir.path().join("pricing.toml");
    std::fs::write(&pricing_path, &options.pricing).expect("write pricing");
    let backend = crate::BACKEND;
    let isolation = Isolation::new(backend, dir.path()).await;
    let cache_table = match &isolation.redis {
        Some((shared, prefix)) => format!(
            "[cache]\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n",
            options.redis_url.as_deref().unwrap_or(shared)
        ),
        None => String::new(),
    };
    let upstreams = options.upstreams.unwrap_or_else(|| {
        format!(
            "[[upstreams]]\nname = \"fake\"\nbase_url = \"{}\"\napi_key = \"{UPSTREAM_KEY}\"\nmodels = [\"mock-*\"]\nidle_timeout_secs = 5\n",
            upstream.url
        )
    });
    let upstreams = upstreams.replace("{fake}", &upstream.url);
    let config_text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 65536
shutdown_grace_secs = {grace}

[database]
url = "{db}"

{cache_table}

[auth.jwt]
secret = "{JWT_SECRET}"

[admin]
token = "{ADMIN_TOKEN}"
{jwt_role}

[metering]
pricing_file = "{pricing}"
{poll}
{extra}

{upstreams}
"#,
        db = isolation.database_url,
        grace = options.shutdown_grace_secs,
        jwt_role = options
            .admin_jwt_role
            .map_or_else(String::new, |role| format!("jwt_role = \"{role}\"")),
        pricing = pricing_path.display(),
        // A test may set its own poll interval in `extra`.
        poll = if options.extra.contains("pricing_poll_ms") {
            ""
        } else {
            "pricing_poll_ms = 50"
        },
        extra = options.extra,
    );
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, &config_text).expect("write config");
    let config = Config::load(&config_path).expect("valid test config");
    let gateway = Gateway::start(&config).await;
    let ledger = tollgate::app::open_ledger(&config)
        .await
        .expect("open ledger");
    TestApp {
        config,
        _isolation: isolation,
        base: gateway.base.clone(),
        client: reqwest::Client::new(),
        dir,
        config_path,
        pricing_path,
        upstream,
        state: gateway.state.clone(),
        ledger,
        gateway,
    }
}

pub fn token(sub: &str) -> String {
    tollgate::auth::jwt::mint_hs256(JWT_SECRET, sub, Duration::from_secs(3600), None, None, None)
        .expect("mint")
}

pub fn chat_body(model: &str, content: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 16})
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, bearer: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(bearer)
            .json(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn get(&self, path: &str, bearer: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(bearer)
            .send()
            .await
            .expect("request sent")
    }

    /// Grants credits through the admin API.
    pub async fn grant(&self, account: &str, amount: &str) {
        let response = self
            .post(
                &format!("/admin/accounts/{account}/credits"),
                ADMIN_TOKEN,
                &json!({"amount": amount, "type": "bonus", "description": "test grant"}),
            )
            .await;
        let status = response.status();
        let text = response.text().await.expect("grant answer");
        assert_eq!(status, 201, "grant failed: {text}");
    }

    pub async fn chat(&self, bearer: &str, body: &Value) -> reqwest::Response {
        self.post("/v1/chat/completions", bearer, body).await
    }

    pub async fn balance(&self, bearer: &str) -> Value {
        let response = self.get("/api/credits/balance", bearer).await;
        assert_eq!(response.status(), 200);
        response.json().await.expect("balance json")
    }

    /// Waits until no hold is left for the account and every settlement is written, then
    /// returns the balance.
    pub async fn settled_balance(&self, bearer: &str) -> Value {
        eventually(Duration::from_secs(10), async || {
            let balance = self.balance(bearer).await;
            match balance["held"] == "0" {
                true => Ok(()),
                false => Err(format!("holds never released: {balance}")),
            }
        })
        .await;
        self.state.settler.flush().await;
        self.balance(bearer).await
    }

    /// Every item of a list route (`{"object": "list", "data": […]}`), following `next_cursor`
    /// through every page. Anything else than such a list fails the test.
    pub async fn list(&self, path: &str, bearer: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut page_path = path.to_owned();
        loop {
            let response = self.get(&page_path, bearer).await;
            let status = response.status();
            let text = response.text().await.expect("list body");
            assert_eq!(status, 200, "GET {page_path}: {text}");
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("GET {page_path}: not JSON ({e}): {text}"));
            assert_eq!(body["object"], "list", "GET {page_path}: {body}");
            let data = body["data"]
                .as_array()
                .unwrap_or_else(|| panic!("GET {page_path}: no data array: {body}"));
            items.extend(data.iter().cloned());
            match &body["next_cursor"] {
                Value::Null => return items,
                Value::String(cursor) => {
                    assert!(!data.is_empty(), "GET {page_path}: a cursor past nothing");
                    let separator = if path.contains('?') { '&' } else { '?' };
                    page_path = format!("{path}{separator}cursor={cursor}");
                }
                other => panic!("GET {page_path}: next_cursor is {other}"),
            }
        }
    }

    /// I3: every account's entries add up to its balance, every charge has its entry; and
    /// the payment books agree with the ledger.
    pub async fn assert_ledger_consistent(&self) {
        self.state.settler.flush().await;
        let problems = self.verify_books().await;
        assert!(problems.is_empty(), "ledger inconsistent: {problems:?}");
    }

    /// Every problem `ledger verify` would report.
    pub async fn verify_books(&self) -> Vec<VerifyProblem> {
        tollgate::billing::store::verify_books(
            self.ledger.as_ref(),
            self.state.payments.store(),
            self.config.metering.overdraft,
        )
        .await
        .expect("verify runs")
    }

    /// Stops the gateway gracefully (drain, flush) and waits for it.
    pub async fn stop(&mut self) {
        self.gateway.stop().await;
    }

    /// A fresh connection to this test's ledger (e.g. after the gateway stopped).
    pub async fn reopen_ledger(&self) -> Arc<dyn Ledger> {
        tollgate::app::open_ledger(&self.config)
            .await
            .expect("reopen ledger")
    }

    /// Runs one statement on this test's database behind the gateway's back (to corrupt it).
    pub async fn execute_sql(&self, sql: &'static str) {
        let url = &self.config.database.url;
        if url.starts_with("mysql:") {
            let pool = sqlx::MySqlPool::connect(url).await.expect("open db");
            sqlx::query(sql)
                .execute(&pool)
                .await
                .expect("statement runs");
            pool.close().await;
        } else {
            let pool = sqlx::SqlitePool::connect(url).await.expect("open db");
            sqlx::query(sql)
                .execute(&pool)
                .await
                .expect("statement runs");
            pool.close().await;
        }
    }

    /// Rows in the tables a request could write: accounts, ledger entries, usage, keys.
    pub async fn row_counts(&self) -> [i64; 4] {
        let queries = [
            "SELECT COUNT(*) FROM accounts",
            "SELECT COUNT(*) FROM credit_transactions",
            "SELECT COUNT(*) FROM usage_records",
            "SELECT COUNT(*) FROM api_keys",
        ];
        let mut counts = [0; 4];
        let url = &self.config.database.url;
        if url.starts_with("mysql:") {
            let pool = sqlx::MySqlPool::connect(url).await.expect("open db");
            for (count, query) in counts.iter_mut().zip(queries) {
                *count = sqlx::query_scalar::<_, i64>(query)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
            }
            pool.close().await;
        } else {
            let pool = sqlx::SqlitePool::connect(url).await.expect("open db");
            for (count, query) in counts.iter_mut().zip(queries) {
                *count = sqlx::query_scalar::<_, i64>(query)
                    .fetch_one(&pool)
                    .await
                    .expect("count");
            }
            pool.close().await;
        }
        counts
    }

    /// Another gateway instance on the same ledger, cache and upstream.
    pub async fn spawn_sibling(&self) -> Gateway {
        Gateway::start(&self.config).await
    }

    pub fn tollgate_cli(&self) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command.arg("--config").arg(&self.config_path);
        command
    }
}

pub fn credits(value: &Value) -> rust_decimal::Decimal {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a credits string: {value}"))
}

/// Asserts the OpenAI error shape and returns the error object.
pub async fn openai_error(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("error body is JSON");
    let error = body["error"].clone();
    assert!(error["message"].is_string(), "message: {body}");
    assert!(error["type"].is_string(), "type: {body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "param/code: {body}"
    );
    error
}

/// Splits an SSE byte stream into its events (text between blank lines).
pub fn sse_events(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// The JSON payloads of an SSE stream's `data:` lines (skipping `[DONE]`).
pub fn sse_json(bytes: &[u8]) -> Vec<Value> {
    sse_events(bytes)
        .iter()
        .flat_map(|event| {
            event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|data| data != "[DONE]")
        .map(|data| serde_json::from_str(&data).expect("data is JSON"))
        .collect()
}

/// The lines the binary writes on stdout.
pub type LogLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// Runs `tollgate --config <config> serve` (killed when dropped), with its stdout piped.
pub fn serve_binary(config: &Path) -> (tokio::process::Child, LogLines) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tollgate");
    let stdout = child.stdout.take().expect("stdout");
    let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    (child, lines)
}

/// Starts the real binary on the test's config (JSON logs) and returns it with its base URL.
pub async fn spawn_binary(app: &TestApp) -> (tokio::process::Child, String) {
    let (child, base, mut lines) = spawn_binary_with_logs(app).await;
    // Keep draining its logs so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, base)
}

/// [`spawn_binary`], handing over its JSON log lines after the start; the caller must keep
/// reading them (a full pipe blocks the gateway).
pub async fn spawn_binary_with_logs(app: &TestApp) -> (tokio::process::Child, String, LogLines) {
    let text = std::fs::read_to_string(&app.config_path).expect("config");
    let text = text.replacen("[server]\n", "[server]\nlog_format = \"json\"\n", 1);
    let path = app.dir.path().join("child.toml");
    std::fs::write(&path, text).expect("child config");
    let (child, mut lines) = serve_binary(&path);
    let address = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read log") {
            if let Ok(log) = serde_json::from_str::<Value>(&line)
                && log["fields"]["message"] == "tollgate listening"
            {
                return log["fields"]["address"].as_str().map(str::to_owned);
            }
        }
        None
    })
    .await
    .expect("the gateway started in time")
    .expect("the gateway logged its address");
    (child, format!("http://{address}"), lines)
}
