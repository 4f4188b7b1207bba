//! `spawn_app()`: a gateway with its own temp directory (SQLite file, config, pricing), a fake
//! upstream on its own port, and typed helpers for what the tests check.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate::app::{App, AppState};
use tollgate::config::Config;
use tollgate::ledger::Ledger;
use tollgate::proxy::mock::{self, MockLog};

/// Which backends a test binary runs the gateway on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file and the in-process cache.
    Embedded,
    /// MariaDB/MySQL and Redis (see [`mariadb`] and [`shared_redis`]); each test gets its own
    /// database and key prefix.
    Production,
}

// ---------------------------------------------------------------------------------------------
// Services: the one place that decides what a test does when MariaDB or Redis is missing
// ---------------------------------------------------------------------------------------------

/// A service that some tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// A MariaDB/MySQL server on which `root` (no password) creates the tests' databases.
    MariaDb,
    /// A Redis server the tests share, each under its own key prefix.
    Redis,
}

/// Under `CI=true` every service is required: a missing one fails the test instead of
/// skipping it.
pub fn services_required() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true" || value == "1")
}

/// Whether every service in `needs` is there: answering at its usual address, or started by
/// this test binary for itself. When one is not, the caller returns at once: the test is
/// skipped, with one line on stderr naming what is missing, or under `CI=true` it fails here.
pub fn services(needs: &[Service]) -> bool {
    // Every one is looked for, so that each missing one is named.
    let found: Vec<bool> = needs
        .iter()
        .map(|service| match service {
            Service::MariaDb => mariadb().is_some(),
            Service::Redis => shared_redis().is_some(),
        })
        .collect();
    found.into_iter().all(|found| found)
}

/// What a test does without something it needs: under `CI=true` it fails; otherwise it is
/// skipped, and `why` is printed once per test binary, past the test harness's output
/// capture so that it shows in a plain `cargo test`.
pub fn missing(why: &str) {
    assert!(
        !services_required(),
        "{why} (CI=true: every service is required)"
    );
    static SAID: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = SAID
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(why.to_owned());
    if first {
        // A closed stderr leaves nothing else to tell.
        let _ = writeln!(std::io::stderr(), "skipping: {why}");
    }
}

/// A MariaDB/MySQL server for the tests.
pub struct MariaDb {
    /// `mysql://USER@HOST:PORT`, to which `/DATABASE` is appended.
    pub server: String,
    /// Set when this test binary started the server itself.
    _private: Option<PrivateServer>,
}

/// A Redis server the tests share.
pub struct SharedRedis {
    pub url: String,
    /// Set when this test binary started the server itself.
    _private: Option<PrivateServer>,
}

/// The MariaDB the tests use, found or started once per test binary: `TOLLGATE_TEST_MYSQL_URL`
/// if set (`mysql://USER@HOST:PORT/DATABASE`), else the one answering on 127.0.0.1:3306, else a
/// private `mariadbd` (set up with `mariadb-install-db` in a temp dir, on a free port). `None`
/// (after [`missing`]) when there is none.
pub fn mariadb() -> Option<&'static MariaDb> {
    static FOUND: OnceLock<Result<MariaDb, String>> = OnceLock::new();
    found(FOUND.get_or_init(find_mariadb))
}

/// The Redis the tests share, found or started once per test binary: `TOLLGATE_TEST_REDIS_URL`
/// if set, else the one answering on 127.0.0.1:6379, else a private `redis-server` on a free
/// port. `None` (after [`missing`]) when there is none.
pub fn shared_redis() -> Option<&'static SharedRedis> {
    static FOUND: OnceLock<Result<SharedRedis, String>> = OnceLock::new();
    found(FOUND.get_or_init(find_redis))
}

fn found<T>(service: &'static Result<T, String>) -> Option<&'static T> {
    match service {
        Ok(service) => Some(service),
        Err(why) => {
            missing(why);
            None
        }
    }
}

fn find_mariadb() -> Result<MariaDb, String> {
    if let Ok(url) = std::env::var("TOLLGATE_TEST_MYSQL_URL") {
        let server = url
            .rsplit_once('/')
            .map(|(server, _)| server)
            .filter(|server| server.contains("://"))
            .unwrap_or_else(|| {
                panic!(
                    "TOLLGATE_TEST_MYSQL_URL={url} names no database (mysql://USER@HOST:PORT/DB)"
                )
            });
        return Ok(MariaDb {
            server: server.to_owned(),
            _private: None,
        });
    }
    if answers(3306) {
        return Ok(MariaDb {
            server: "mysql://root@127.0.0.1:3306".into(),
            _private: None,
        });
    }
    let (Some(mariadbd), Some(install_db)) = (
        program(&["mariadbd", "mysqld"]),
        program(&["mariadb-install-db", "mysql_install_db"]),
    ) else {
        return Err("MariaDB not reachable at 127.0.0.1:3306 and no mariadbd to start".into());
    };
    let server = start_mariadb(&mariadbd, &install_db).map_err(|error| {
        format!("MariaDB not reachable at 127.0.0.1:3306, and a private mariadbd failed: {error}")
    })?;
    Ok(MariaDb {
        server: format!("mysql://root@127.0.0.1:{}", server.port),
        _private: Some(server),
    })
}

fn find_redis() -> Result<SharedRedis, String> {
    if let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS_URL") {
        return Ok(SharedRedis {
            url,
            _private: None,
        });
    }
    if answers(6379) {
        return Ok(SharedRedis {
            url: "redis://127.0.0.1:6379".into(),
            _private: None,
        });
    }
    let Some(redis_server) = program(&["redis-server"]) else {
        return Err("Redis not reachable at 127.0.0.1:6379 and no redis-server to start".into());
    };
    let server = start_redis(&redis_server).map_err(|error| {
        format!("Redis not reachable at 127.0.0.1:6379, and a private redis-server failed: {error}")
    })?;
    Ok(SharedRedis {
        url: format!("redis://127.0.0.1:{}", server.port),
        _private: Some(server),
    })
}

/// Whether something accepts connections on this loopback port.
fn answers(port: u16) -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    std::net::TcpStream::connect_timeout(&address, Duration::from_millis(500)).is_ok()
}

/// The first of `names` found on `PATH` or in the sbin directories (where Debian puts
/// `mariadbd`, often off a user's `PATH`).
fn program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .collect();
    names
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt as _;
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A server this test binary started for itself: on a free loopback port, with its files in a
/// temp dir. A watchdog shell kills it and removes the dir once this process is gone, so a
/// test binary that ends (or is killed) leaves nothing running; dropping it does the same at
/// once.
pub struct PrivateServer {
    pub port: u16,
    program: PathBuf,
    args: fn(u16, &Path) -> Vec<String>,
    dir: PathBuf,
    /// The server and its watchdog, while running.
    running: Option<(std::process::Child, std::process::Child)>,
}

impl PrivateServer {
    /// Starts `program` with `args(port, dir)` and waits until it accepts connections. A port
    /// taken between choosing it and the server binding it costs a retry on another.
    fn start(
        program: PathBuf,
        dir: PathBuf,
        args: fn(u16, &Path) -> Vec<String>,
    ) -> Result<PrivateServer, String> {
        let mut server = PrivateServer {
            port: 0,
            program,
            args,
            dir,
            running: None,
        };
        let mut last_error = String::new();
        for _ in 0..3 {
            server.port = free_port().map_err(|e| format!("no free port: {e}"))?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    fn launch(&mut self) -> Result<(), String> {
        let port = self.port;
        let log_path = self.dir.join(format!("server-{port}.log"));
        let log = std::fs::File::create(&log_path).map_err(|e| format!("log file: {e}"))?;
        let err_log = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let mut server = std::process::Command::new(&self.program)
            .args((self.args)(port, &self.dir))
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .map_err(|e| format!("{} did not start: {e}", self.program.display()))?;
        // It waits for this process to end, then kills the server and removes its files. The
        // server stays this process's child until then, so its pid cannot have been reused.
        let watchdog = std::process::Command::new("sh")
            .args([
                "-c",
                r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -9 "$2"; rm -rf "$3""#,
                "watchdog",
                &std::process::id().to_string(),
                &server.id().to_string(),
            ])
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let watchdog = match watchdog {
            Ok(watchdog) => watchdog,
            Err(error) => {
                end(&mut server);
                return Err(format!("no watchdog shell: {error}"));
            }
        };
        self.running = Some((server, watchdog));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if answers(port) {
                return Ok(());
            }
            let (server, _) = self.running.as_mut().expect("just started");
            let exited = server.try_wait().map_err(|e| e.to_string())?;
            if exited.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            self.kill();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let mut tail: Vec<&str> = log.lines().rev().take(5).collect();
            tail.reverse();
            return Err(format!(
                "{} on port {port} {}: {}",
                self.program.display(),
                exited.map_or("did not answer within 30 s".to_owned(), |s| format!(
                    "exited ({s})"
                )),
                tail.join(" | ")
            ));
        }
    }

    /// Kills the server, as a crash would (and its watchdog); its files stay.
    pub fn kill(&mut self) {
        if let Some((mut server, mut watchdog)) = self.running.take() {
            end(&mut server);
            end(&mut watchdog);
        }
    }

    /// Starts the server again, on the same port.
    #[allow(dead_code, reason = "the production binary's fault tests restart one")]
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.launch()
    }
}

/// Kills a child process and reaps it; one that has exited already needs nothing more.
fn end(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
        // Best effort: a temp dir left behind is harmless.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(prefix: &str) -> Result<PathBuf, String> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map(TempDir::keep)
        .map_err(|e| format!("temp dir: {e}"))
}

/// `--user=NAME` of whoever runs the tests: mariadbd runs as root only when told so.
fn user_flag() -> Option<String> {
    let output = std::process::Command::new("id").arg("-un").output().ok()?;
    let user = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (output.status.success() && !user.is_empty()).then(|| format!("--user={user}"))
}

/// A private `mariadbd` with a fresh data directory, root without a password.
fn start_mariadb(mariadbd: &Path, install_db: &Path) -> Result<PrivateServer, String> {
    let dir = temp_dir("tollgate-mariadb-")?;
    let installed = std::process::Command::new(install_db)
        .arg("--no-defaults")
        .arg(format!("--datadir={}", dir.join("data").display()))
        .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
        .args(user_flag())
        .output()
        .map_err(|e| format!("{}: {e}", install_db.display()))?;
    if !installed.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!(
            "{} failed: {}{}",
            install_db.display(),
            String::from_utf8_lossy(&installed.stdout),
            String::from_utf8_lossy(&installed.stderr)
        ));
    }
    PrivateServer::start(mariadbd.to_owned(), dir, |port, dir| {
        let mut args = vec![
            "--no-defaults".to_owned(),
            format!("--datadir={}", dir.join("data").display()),
            format!("--socket={}", dir.join("mariadbd.sock").display()),
            format!("--pid-file={}", dir.join("mariadbd.pid").display()),
            format!("--port={port}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--skip-log-bin".to_owned(),
            "--max-connections=1000".to_owned(),
            "--innodb-buffer-pool-size=64M".to_owned(),
        ];
        args.extend(user_flag());
        args
    })
}

/// A private `redis-server` that keeps nothing on disk.
fn start_redis(redis_server: &Path) -> Result<PrivateServer, String> {
    PrivateServer::start(
        redis_server.to_owned(),
        temp_dir("tollgate-redis-")?,
        |port, dir| {
            let dir = dir.display().to_string();
            let port = port.to_string();
            [
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            .into_iter()
            .chain(["--dir", &dir])
            .map(str::to_owned)
            .collect()
        },
    )
}

/// A Redis server of one test's own, for faults that must not disturb the tests beside it.
#[allow(dead_code, reason = "for the production binary's fault tests")]
pub struct PrivateRedis {
    server: PrivateServer,
}

#[allow(dead_code, reason = "for the production binary's fault tests")]
impl PrivateRedis {
    /// A private `redis-server`, or `None` (after [`missing`]) when there is none to start.
    pub fn start() -> Option<PrivateRedis> {
        let Some(program) = program(&["redis-server"]) else {
            missing("no redis-server to start a test's private Redis");
            return None;
        };
        let server = start_redis(&program).expect("a private redis-server starts");
        Some(PrivateRedis { server })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.server.port)
    }

    /// Kills it, as a crash would.
    pub fn kill(&mut self) {
        self.server.kill();
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.server
            .restart()
            .expect("the private Redis restarts on its port");
    }
}

// ---------------------------------------------------------------------------------------------
// Test databases and key prefixes
// ---------------------------------------------------------------------------------------------

/// What every test database and Redis key prefix starts with: `TOLLGATE_TEST_DB_PREFIX`, or
/// `tg_`. A CI run sets a prefix of its own, so that it can remove what it left behind
/// without touching another run's.
pub fn test_name_prefix() -> String {
    let prefix = std::env::var("TOLLGATE_TEST_DB_PREFIX").unwrap_or_else(|_| "tg_".into());
    assert!(
        !prefix.is_empty()
            && prefix.len() <= 30
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "TOLLGATE_TEST_DB_PREFIX={prefix:?}: 1 to 30 letters, digits or underscores"
    );
    prefix
}

/// A fresh name for a test database or key prefix: the run's prefix and a random part.
pub fn unique_test_name() -> String {
    format!("{}{}", test_name_prefix(), uuid::Uuid::new_v4().simple())
}

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

/// How long a test may run before it fails as stuck (a settler that never finishes, a lost
/// wake-up) instead of hanging the run.
pub const TEST_TIME_LIMIT: Duration = Duration::from_secs(60);

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
    // On the heap: a test's future is large, and a test thread's stack is not.
    if tokio::time::timeout(limit, Box::pin(body())).await.is_err() {
        panic!("the test did not finish within {limit:?}");
    }
}

/// How often [`eventually`] checks.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// Checks `check` until it gives `Ok`, every 20 ms, and returns that; fails with the last
/// `Err` (what was seen instead) once `within` has passed. For waiting on what the gateway
/// does in the background, in place of a sleep that guesses how long it takes.
pub async fn eventually<T>(
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "not so within {within:?}: {seen}"
            ),
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pricing: DEFAULT_PRICING.to_owned(),
            extra: String::new(),
            upstreams: None,
            redis_url: None,
            shutdown_grace_secs: 5,
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
jwt_role = "admin"

[metering]
pricing_file = "{pricing}"
{poll}
{extra}

{upstreams}
"#,
        db = isolation.database_url,
        grace = options.shutdown_grace_secs,
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

    /// I3: every account's entries add up to its balance, every charge has its entry.
    pub async fn assert_ledger_consistent(&self) {
        self.state.settler.flush().await;
        let problems = self
            .ledger
            .verify(self.config.metering.overdraft)
            .await
            .expect("verify runs");
        assert!(problems.is_empty(), "ledger inconsistent: {problems:?}");
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

/// Starts the real binary on the test's config (JSON logs) and returns it with its base URL.
pub async fn spawn_binary(app: &TestApp) -> (tokio::process::Child, String) {
    let text = std::fs::read_to_string(&app.config_path).expect("config");
    let text = text.replacen("[server]\n", "[server]\nlog_format = \"json\"\n", 1);
    let path = app.dir.path().join("child.toml");
    std::fs::write(&path, text).expect("child config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&path)
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn tollgate");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
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
    // Keep draining its logs so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, format!("http://{address}"))
}
