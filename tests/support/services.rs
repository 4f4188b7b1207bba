//! The services some tests need (MariaDB, Redis) and the names tests give what they create in
//! them: one place decides what a test does when a service is missing (use the one answering at
//! its usual address, start a private one, or skip; under `CI=true`, fail).
//!
//! Std only (plus `tempfile` and `uuid`), so that the library's unit tests include it
//! (`src/lib.rs`) as well as the integration test binaries (through `tests/api/helpers.rs`).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tempfile::TempDir;

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
// Names of test databases and key prefixes
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
