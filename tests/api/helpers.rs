//! `spawn_app()`: a gateway with its own temp directory (SQLite file, config, pricing), a fake
//! upstream on its own port, and typed helpers for what the tests check.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::app::{App, AppState};
use tollgate::config::Config;
use tollgate::ledger::Ledger;
use tollgate::ledger::sqlite::SqliteLedger;
use tollgate::proxy::mock::{self, MockLog};

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
        let _ = axum::serve(listener, router).await;
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pricing: DEFAULT_PRICING.to_owned(),
            extra: String::new(),
            upstreams: None,
        }
    }
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub pricing_path: PathBuf,
    pub upstream: FakeUpstream,
    pub state: AppState,
    /// A second connection to the same database, for checking what was written.
    pub ledger: Arc<dyn Ledger>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Options::default()).await
}

pub async fn spawn_app_with(options: Options) -> TestApp {
    let upstream = fake_upstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pricing_path = dir.path().join("pricing.toml");
    std::fs::write(&pricing_path, &options.pricing).expect("write pricing");
    let db_path = dir.path().join("ledger.db");
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
shutdown_grace_secs = 5

[database]
url = "sqlite://{db}"

[auth.jwt]
secret = "{JWT_SECRET}"

[admin]
token = "{ADMIN_TOKEN}"
jwt_role = "admin"

[metering]
pricing_file = "{pricing}"
pricing_poll_ms = 50
{extra}

{upstreams}
"#,
        db = db_path.display(),
        pricing = pricing_path.display(),
        extra = options.extra,
    );
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, &config_text).expect("write config");
    let config = Config::load(&config_path).expect("valid test config");
    let app = App::build(config).await.expect("app builds");
    let addr = app.local_addr().expect("bound");
    let state = app.state().clone();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    let ledger = Arc::new(
        SqliteLedger::open_file(&db_path)
            .await
            .expect("open ledger"),
    ) as Arc<dyn Ledger>;
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        dir,
        config_path,
        pricing_path,
        upstream,
        state,
        ledger,
        shutdown: Some(tx),
        server: Some(server),
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
        assert_eq!(
            response.status(),
            201,
            "grant failed: {}",
            response.text().await.unwrap_or_default()
        );
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
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let balance = self.balance(bearer).await;
            if balance["held"] == "0" {
                self.state.settler.flush().await;
                return self.balance(bearer).await;
            }
            assert!(Instant::now() < deadline, "holds never released: {balance}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn list(&self, path: &str, bearer: &str) -> Vec<Value> {
        let response = self.get(path, bearer).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("list json");
        body["data"].as_array().cloned().unwrap_or_default()
    }

    /// I3: every account's entries add up to its balance, every charge has its entry.
    pub async fn assert_ledger_consistent(&self) {
        self.state.settler.flush().await;
        let problems = self.ledger.verify().await.expect("verify runs");
        assert!(problems.is_empty(), "ledger inconsistent: {problems:?}");
    }

    /// Stops the gateway gracefully (drain, flush) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stopped cleanly");
        }
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
