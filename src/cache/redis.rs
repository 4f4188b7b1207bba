//! Redis balance cache: the production adapter of [`BalanceCache`], shared by every gateway
//! instance in front of one ledger, so that an account's holds and pending settlements are seen
//! (and bounded, docs/architecture.md I1) by all of them at once. Its semantics are those of
//! [`LocalCache`](super::local::LocalCache); what differs is where the state lives and that it
//! outlives a gateway process (I4).
//!
//! # Key layout
//!
//! `P` is the configured key prefix. A bucket's keys share one hash tag, so they live in one
//! Redis Cluster slot and one script may touch all of them:
//!
//! | key | type | content |
//! |---|---|---|
//! | `{P:a:<account>}`, `{P:k:<key id>}` | hash | `bal`, `rev`, `nexp`, `lapsed`, `fence`, `gen`, `held`, `pend` |
//! | `{…}:holds` | hash | request id → `amount\|deadline ms\|token\|owner` |
//! | `{…}:pending` | hash | request id → cost (settled, not yet in the ledger) |
//! | `{…}:journal` | hash | request id → serialized settlement, for a sibling to write |
//!
//! `bal`, `rev`, `nexp` and `lapsed` are the ledger snapshot (micro-credits, revision, next grant
//! expiry in ms or empty, lapsed micro-credits not swept yet), always replaced together; `fence`
//! the latest cutoff of an expiry sweep that read the bucket's holds; `gen` the invalidation
//! generation the snapshot was loaded in; `held` and `pend` the sums of the two hashes. The
//! global keys live in other slots; on a single server the reserve, settle and committed
//! scripts also touch the ones their step needs (so a request costs two round trips: reserve,
//! settle), in a cluster they are each used alone, in a command of their own:
//!
//! | key | type | content |
//! |---|---|---|
//! | `P:gen` | string | invalidation generation |
//! | `P:instances` | sorted set | instance id, score = last heartbeat (ms, Redis clock) |
//! | `P:owner:<instance>` | set | bucket keys where that instance may hold something |
//! | `P:pending` | sorted set | `<bucket key>\|<request id>`, score = settled at (ms) |
//!
//! An invalidation sets `P:gen` to max(gen + 1, Redis time in ms): it grows like `INCR`, and
//! still moves past every generation stamped on a bucket if the key itself is lost. In
//! `P:pending` members, `%` and `|` in the request id are escaped, so the last `|` splits.
//!
//! # Atomicity
//!
//! Every change to a bucket is one Lua script (`src/cache/lua/`, sent by hash with the
//! EVALSHA→EVAL fallback of [`Script`]) over that bucket's keys only. Redis runs a script to the
//! end before any other command, so the check `balance - lapsed - pending - held - amount >=
//! floor` and the hold that follows are one step however many instances race; Rust never reads
//! a value to decide a write. Amounts are integer micro-credits: Lua's numbers are doubles, exact to 2^53
//! (9 × 10^9 credits), so the adapter saturates every amount at ±2^53 before sending it and the
//! scripts write numbers back with `string.format('%d')` (never `tostring`, which rounds to 14
//! digits).
//!
//! In a cluster, work that spans slots is ordered so that a crash between two steps leaves only
//! something a later pass can see and fix (on a single server each is one script, one step): the bucket joins the owner's set before the hold is taken, and
//! the index entry of a pending settlement is written before the settlement, then removed after
//! the commit (an entry pointing at nothing is skipped and removed by [`orphans`]). A reserve
//! whose answer is lost (a timeout after Redis ran it) is abandoned in the background: its hold
//! is dropped if it still carries that call's token, so the failed request does not keep
//! credits held until the deadline.
//!
//! # Staleness and misses
//!
//! The generation is read first (by the reserve script itself on a single server; in a cluster
//! it lives in another slot) and passed to the reserve and view scripts, which answer "load" when the bucket has no snapshot, one from an older generation,
//! or one counting a grant that has lapsed (`nexp` reached by the caller's clock, also passed
//! in, or by `fence`); the adapter then fences the bucket and reads what it holds or has pending
//! (`fence.lua`), loads the snapshot from the ledger (which sweeps the lapsed grants first,
//! keeping that much back: see [`crate::ledger::grants`]), installs it with a script that keeps
//! the newer revision, and tries again. The fence matters because a reserve script may run
//! later than its caller read the clock: once a sweep has read the holds, no reservation,
//! whatever clock it carries, may count the grants that sweep takes. A flushed or restarted Redis therefore costs a
//! reload per bucket. (Holds and pending settlements flushed with it are gone: requests in flight
//! then settle into the ledger all the same, but their cost is not counted against the balance
//! until the ledger has it.)
//!
//! One deliberate difference from the in-process cache: `settle` records the pending settlement
//! (and its journal record) even when the bucket has no snapshot, so a settlement is never lost
//! to a flush that happened while its request ran; a later load sums it in.
//!
//! # Owners and heartbeats
//!
//! Each adapter is one instance: it stamps its instance id on its holds (the id given to
//! [`RedisCache::connect`], which the gateway also puts in [`HoldSpec::owner`]), adds each
//! bucket it reserves in to its owner set, and beats every 2 s. `reap_holds` releases expired
//! holds in its own buckets and every hold of an instance silent for 10 s (then forgets that
//! instance). Heartbeats use the Redis clock, so gateway clock skew cannot make a live instance
//! look dead; an instance that stalls longer than 10 s does lose its holds (its requests still
//! settle). `reap_holds` also prunes the owner set of buckets where the instance holds nothing
//! any more; a process-local count of reservations in flight keeps that from racing a new hold.
//!
//! # Connection
//!
//! `redis://[user:pass@]host:port[/db]` uses one multiplexed connection that reconnects by
//! itself; `redis+cluster://[user:pass@]host:port,host:port,...` uses a Redis Cluster
//! connection (the nodes are seeds; the rest are discovered). TLS (`rediss://`) is not built in.
//! Connection and response timeouts are 1 s and every call is capped at 2 s, so a Redis outage
//! answers [`CacheError::Unavailable`] quickly instead of hanging a request.
//!
//! Redis must be 5 or newer (scripts read `TIME` before writing) and must keep keys
//! (`maxmemory-policy noeviction`): an evicted hold would let a bucket overspend.
//!
//! [`orphans`]: BalanceCache::orphans

use std::future::Future;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Client, Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Script, Value};
use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::stream::{self, StreamExt};

use super::{
    BalanceCache, BalanceView, CacheError, HoldSpec, Orphan, ReserveError, SnapshotSource,
};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};
use crate::ledger::{Bucket, InFlight, Snapshot};

/// Largest magnitude Lua (doubles) holds exactly; amounts beyond it are saturated.
pub const MAX_EXACT_MICROS: i64 = 1 << 53;
/// How often an instance refreshes its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// An instance whose heartbeat is older than this is dead: its holds are released.
pub const INSTANCE_DEAD_AFTER_MS: i64 = 10_000;
/// The URL scheme that selects a Redis Cluster connection.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest one Redis call may take, reconnecting included.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Loads per reserve or view before giving up (each retry only follows a concurrent flush, or a
/// grant lapsing or a sweep's fence between the load and the script).
const MAX_LOADS: usize = 3;
/// Index entries examined per `orphans` call; the recovery loop comes back for the rest.
const ORPHAN_BATCH: usize = 1000;
/// Dead instances handled per `reap_holds` call.
const DEAD_BATCH: usize = 100;
/// Attempts to drop the hold of a reservation whose answer was lost (over about 15 s).
const ABANDON_ATTEMPTS: usize = 5;
/// Buckets reaped concurrently (one script each, pipelined on the multiplexed connection).
const REAP_CONCURRENCY: usize = 16;

struct Scripts {
    reserve: Script,
    fence: Script,
    abandon: Script,
    load: Script,
    settle: Script,
    release: Script,
    renew: Script,
    committed: Script,
    apply: Script,
    view: Script,
    reap: Script,
    orphan: Script,
    heartbeat: Script,
    dead: Script,
    forget: Script,
    invalidate: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    reserve: Script::new(include_str!("lua/reserve.lua")),
    fence: Script::new(include_str!("lua/fence.lua")),
    abandon: Script::new(include_str!("lua/abandon.lua")),
    load: Script::new(include_str!("lua/load.lua")),
    settle: Script::new(include_str!("lua/settle.lua")),
    release: Script::new(include_str!("lua/release.lua")),
    renew: Script::new(include_str!("lua/renew.lua")),
    committed: Script::new(include_str!("lua/committed.lua")),
    apply: Script::new(include_str!("lua/apply.lua")),
    view: Script::new(include_str!("lua/view.lua")),
    reap: Script::new(include_str!("lua/reap.lua")),
    orphan: Script::new(include_str!("lua/orphan.lua")),
    heartbeat: Script::new(include_str!("lua/heartbeat.lua")),
    dead: Script::new(include_str!("lua/dead.lua")),
    forget: Script::new(include_str!("lua/forget.lua")),
    invalidate: Script::new(include_str!("lua/invalidate.lua")),
});

/// One Redis server or a cluster, behind the same command interface.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// One server: a script may touch any key. In a cluster a script touches one slot only.
    fn is_single(&self) -> bool {
        matches!(self, Conn::Single(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Key names (see the module docs for the layout).
#[derive(Clone)]
struct Keys {
    prefix: String,
}

/// The keys of one bucket; all share the base key's hash tag.
struct BucketKeys {
    base: String,
    holds: String,
    pending: String,
    journal: String,
    /// Running requests' progress records (see [`BalanceCache::renew`]).
    progress: String,
}

impl BucketKeys {
    fn from_base(base: String) -> Self {
        // The base key ends with the `}` closing its hash tag, so every suffixed key has the
        // same tag (Redis hashes the text between the first `{` and the first `}` after it).
        BucketKeys {
            holds: format!("{base}:holds"),
            pending: format!("{base}:pending"),
            journal: format!("{base}:journal"),
            progress: format!("{base}:progress"),
            base,
        }
    }
}

impl Keys {
    fn bucket(&self, bucket: &Bucket) -> BucketKeys {
        let base = match bucket {
            Bucket::Account(account) => format!("{{{}:a:{}}}", self.prefix, account.as_str()),
            Bucket::KeyLimit(key) => format!("{{{}:k:{}}}", self.prefix, key),
        };
        BucketKeys::from_base(base)
    }

    /// The bucket a base key names, if it is one of ours.
    fn parse_bucket(&self, base: &str) -> Option<Bucket> {
        let rest = base
            .strip_prefix('{')?
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?
            .strip_suffix('}')?;
        if let Some(account) = rest.strip_prefix("a:") {
            AccountId::parse(account).ok().map(Bucket::Account)
        } else {
            rest.strip_prefix("k:")
                .map(|key| Bucket::KeyLimit(key.to_owned()))
        }
    }

    fn generation(&self) -> String {
        format!("{}:gen", self.prefix)
    }

    fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    fn owner(&self, instance: &str) -> String {
        format!("{}:owner:{instance}", self.prefix)
    }

    fn pending_index(&self) -> String {
        format!("{}:pending", self.prefix)
    }
}

/// `<bucket key>|<request id>` with `%` and `|` escaped in the id, so the last `|` always
/// separates the two (account ids may contain `|`).
fn index_member(base: &str, request_id: &str) -> String {
    let escaped = request_id.replace('%', "%25").replace('|', "%7C");
    format!("{base}|{escaped}")
}

fn parse_index_member(member: &str) -> Option<(&str, String)> {
    let (base, escaped) = member.rsplit_once('|')?;
    Some((base, escaped.replace("%7C", "|").replace("%25", "%")))
}

/// Saturates micro-credits to what Lua represents exactly.
fn exact(micros: i64) -> i64 {
    micros.clamp(-MAX_EXACT_MICROS, MAX_EXACT_MICROS)
}

/// A snapshot's fields as the scripts take them: balance, rev, next expiry ('' for none), lapsed.
fn snapshot_args(snapshot: &Snapshot) -> [String; 4] {
    [
        exact(snapshot.balance.micros()).to_string(),
        snapshot.rev.to_string(),
        snapshot
            .next_expiry_ms
            .map_or_else(String::new, |at| at.to_string()),
        exact(snapshot.lapsed.micros()).to_string(),
    ]
}

fn clamp(micros: i128) -> Credits {
    Credits::from_micros(i64::try_from(micros).unwrap_or(if micros < 0 {
        i64::MIN
    } else {
        i64::MAX
    }))
}

fn unavailable(error: impl std::fmt::Display) -> CacheError {
    CacheError::Unavailable(format!("redis: {error}"))
}

/// A failed call, and whether Redis may have run it all the same.
struct Failed {
    error: CacheError,
    maybe_ran: bool,
}

/// Runs one Redis call, mapping its failure and a hang past [`CALL_TIMEOUT`] to `Unavailable`.
async fn attempt<T>(call: impl Future<Output = RedisResult<T>>) -> Result<T, Failed> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failed {
            // A refused connection sent nothing; any other failure may come after the server
            // ran the command (a timeout, a connection dropped before the answer).
            maybe_ran: !error.is_connection_refusal(),
            error: unavailable(error),
        }),
        Err(_) => Err(Failed {
            maybe_ran: true,
            error: unavailable(format_args!(
                "no answer within {} ms",
                CALL_TIMEOUT.as_millis()
            )),
        }),
    }
}

async fn timed<T>(call: impl Future<Output = RedisResult<T>>) -> Result<T, CacheError> {
    attempt(call).await.map_err(|failed| failed.error)
}

async fn eval_attempt<T: FromRedisValue>(
    conn: &Conn,
    script: &Script,
    keys: &[&str],
    args: &[&str],
) -> Result<T, Failed> {
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(*key);
    }
    for arg in args {
        invocation.arg(*arg);
    }
    let mut conn = conn.clone();
    attempt(invocation.invoke_async(&mut conn)).await
}

async fn eval<T: FromRedisValue>(
    conn: &Conn,
    script: &Script,
    keys: &[&str],
    args: &[&str],
) -> Result<T, CacheError> {
    eval_attempt(conn, script, keys, args)
        .await
        .map_err(|failed| failed.error)
}

async fn query<T: FromRedisValue>(conn: &Conn, cmd: &Cmd) -> Result<T, CacheError> {
    let mut conn = conn.clone();
    timed(cmd.query_async(&mut conn)).await
}

fn command(name: &str) -> Cmd {
    ::redis::cmd(name)
}

/// Reservations of this instance in flight on one bucket, and the sequence number of the last
/// one to start: what the owner-set cleanup checks so it never drops a bucket that a
/// reservation is about to hold in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reserving {
    in_flight: u32,
    last: u64,
}

/// Counts one reservation in flight until dropped (a cancelled request included).
struct ReservingGuard<'a> {
    map: &'a DashMap<String, Reserving>,
    base: &'a str,
    /// Unique to this call within the instance: the token its hold carries.
    token: u64,
}

impl Drop for ReservingGuard<'_> {
    fn drop(&mut self) {
        if let Some(mut entry) = self.map.get_mut(self.base) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

/// The Redis adapter; one per gateway process (it is that process's instance).
pub struct RedisCache {
    conn: Conn,
    keys: Keys,
    instance: String,
    reserving: DashMap<String, Reserving>,
    sequence: AtomicU64,
    heartbeat: tokio::task::AbortHandle,
}

impl Drop for RedisCache {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl RedisCache {
    /// Connects, records this instance's first heartbeat and starts beating every 2 s.
    /// `url` is `redis://…` or `redis+cluster://host:port,host:port` (see the module docs);
    /// `instance` must be unique per gateway process. Fails with `Unavailable` (within about
    /// 2 s) when Redis cannot be reached.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        instance: &str,
    ) -> Result<RedisCache, CacheError> {
        let cache = Self::open(url, key_prefix, instance).await?;
        cache.beat().await?;
        Ok(cache)
    }

    /// Builds the adapter without waiting for Redis (a single server is connected on first
    /// use; a cluster needs its topology now) and starts the heartbeat.
    async fn open(url: &str, key_prefix: &str, instance: &str) -> Result<RedisCache, CacheError> {
        if key_prefix.is_empty() || key_prefix.contains(['{', '}']) {
            return Err(unavailable(format_args!(
                "key prefix `{key_prefix}` must be non-empty, without `{{` or `}}` (hash tags)"
            )));
        }
        if instance.is_empty() {
            return Err(unavailable("instance id must be non-empty"));
        }
        let conn = match url.strip_prefix(CLUSTER_SCHEME) {
            Some(nodes) => Conn::Cluster(connect_cluster(nodes).await?),
            None => {
                let client = Client::open(url).map_err(unavailable)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    // One attempt per reconnection: a call waits for at most one connect.
                    .set_number_of_retries(0)
                    .set_max_delay(Duration::from_millis(200));
                Conn::Single(
                    ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?,
                )
            }
        };
        let keys = Keys {
            prefix: key_prefix.to_owned(),
        };
        let heartbeat = tokio::spawn(heartbeat_loop(
            conn.clone(),
            keys.instances(),
            instance.to_owned(),
        ))
        .abort_handle();
        Ok(RedisCache {
            conn,
            keys,
            instance: instance.to_owned(),
            reserving: DashMap::new(),
            sequence: AtomicU64::new(0),
            heartbeat,
        })
    }

    /// Stops the heartbeat. Call it when the gateway stops: within 10 s siblings treat this
    /// instance as gone and release whatever it still holds. Dropping the adapter does the same.
    pub fn shutdown(&self) {
        self.heartbeat.abort();
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    async fn beat(&self) -> Result<(), CacheError> {
        eval::<i64>(
            &self.conn,
            &SCRIPTS.heartbeat,
            &[&self.keys.instances()],
            &[&self.instance],
        )
        .await
        .map(drop)
    }

    async fn generation(&self) -> Result<i64, CacheError> {
        let generation: Option<i64> =
            query(&self.conn, command("GET").arg(self.keys.generation())).await?;
        Ok(generation.unwrap_or(0))
    }

    /// Fences the bucket at `at_ms` and returns what it holds or has pending (`fence.lua`).
    async fn fence(&self, keys: &BucketKeys, at_ms: i64) -> Result<Credits, CacheError> {
        let amount: i64 = eval(
            &self.conn,
            &SCRIPTS.fence,
            &[&keys.base, &keys.holds, &keys.pending],
            &[&at_ms.to_string()],
        )
        .await?;
        Ok(Credits::from_micros(amount))
    }

    /// Loads the bucket's snapshot from the ledger and installs it (the newer revision wins).
    async fn load(
        &self,
        bucket: &Bucket,
        keys: &BucketKeys,
        generation: i64,
        source: &dyn SnapshotSource,
    ) -> Result<(), CacheError> {
        // Only an account has grants to sweep; a key's limit needs no fence.
        let at_ms = now_ms();
        let amount = match bucket {
            Bucket::Account(_) => self.fence(keys, at_ms).await?,
            Bucket::KeyLimit(_) => Credits::ZERO,
        };
        let snapshot = source.load(bucket, InFlight { at_ms, amount }).await?;
        let [balance, rev, next_expiry, lapsed] = snapshot_args(&snapshot);
        eval::<i64>(
            &self.conn,
            &SCRIPTS.load,
            &[&keys.base, &keys.holds, &keys.pending],
            &[
                &balance,
                &rev,
                &generation.to_string(),
                &next_expiry,
                &lapsed,
            ],
        )
        .await
        .map(drop)
    }

    fn start_reserving<'a>(&'a self, base: &'a str) -> ReservingGuard<'a> {
        let last = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.reserving
            .entry(base.to_owned())
            .and_modify(|entry| {
                entry.in_flight += 1;
                entry.last = last;
            })
            .or_insert(Reserving { in_flight: 1, last });
        ReservingGuard {
            map: &self.reserving,
            base,
            token: last,
        }
    }

    fn reserving(&self, base: &str) -> Option<Reserving> {
        self.reserving.get(base).map(|entry| *entry)
    }

    /// Releases expired holds in one of this instance's buckets; drops the bucket from the
    /// owner set when this instance holds nothing there any more.
    async fn reap_own(
        &self,
        base: String,
        now_ms: i64,
        owner_key: &str,
    ) -> Result<usize, CacheError> {
        // Read before the script: a reservation that starts after this point changes `last`.
        let before = self.reserving(&base);
        let keys = BucketKeys::from_base(base);
        let (released, remaining, progressed): (usize, usize, Vec<String>) = eval(
            &self.conn,
            &SCRIPTS.reap,
            &[&keys.base, &keys.holds, &keys.progress],
            &[&now_ms.to_string(), &self.instance, "0"],
        )
        .await?;
        let released = released + self.settle_progress(&keys, &progressed).await?;
        if remaining > 0 || before.is_some_and(|r| r.in_flight > 0) {
            return Ok(released);
        }
        query::<i64>(&self.conn, command("SREM").arg(owner_key).arg(&keys.base)).await?;
        let after = self.reserving(&keys.base);
        if after != before {
            // A reservation started meanwhile; its SADD may have come before our SREM. Put the
            // bucket back so its hold stays findable.
            query::<i64>(&self.conn, command("SADD").arg(owner_key).arg(&keys.base)).await?;
        } else if let Some(before) = before {
            self.reserving
                .remove_if(&keys.base, |_, current| *current == before);
        }
        Ok(released)
    }

    /// Releases every hold of `owner` (and every expired hold) in one bucket.
    async fn reap_all_of(
        &self,
        base: String,
        now_ms: i64,
        owner: &str,
    ) -> Result<usize, CacheError> {
        let keys = BucketKeys::from_base(base);
        let (released, _, progressed): (usize, usize, Vec<String>) = eval(
            &self.conn,
            &SCRIPTS.reap,
            &[&keys.base, &keys.holds, &keys.progress],
            &[&now_ms.to_string(), owner, "1"],
        )
        .await?;
        Ok(released + self.settle_progress(&keys, &progressed).await?)
    }

    /// Turns reaped holds that carry a progress record into pending settlements of that record
    /// (journaled, so the recovery pass writes them): a stream of a dead instance is billed for
    /// what it had delivered at its last renewal. Returns how many holds it ended.
    async fn settle_progress(
        &self,
        keys: &BucketKeys,
        request_ids: &[String],
    ) -> Result<usize, CacheError> {
        let mut ended = 0;
        for request_id in request_ids {
            let record: Option<String> = query(
                &self.conn,
                command("HGET").arg(&keys.progress).arg(request_id),
            )
            .await?;
            let Some(record) = record else {
                continue;
            };
            let cost = match serde_json::from_str::<crate::ledger::Settlement>(&record) {
                Ok(settlement) => settlement.cost,
                Err(error) => {
                    tracing::error!(%error, request_id, "unreadable progress record; releasing the hold");
                    eval::<i64>(
                        &self.conn,
                        &SCRIPTS.release,
                        &[&keys.base, &keys.holds, &keys.progress],
                        &[request_id],
                    )
                    .await?;
                    ended += 1;
                    continue;
                }
            };
            let bucket = self
                .keys
                .parse_bucket(&keys.base)
                .ok_or_else(|| unavailable(format_args!("`{}` names no bucket", keys.base)))?;
            self.settle(&bucket, request_id, cost, Some(&record))
                .await?;
            tracing::warn!(
                request_id,
                "a stream of a silent instance is billed for what it had delivered"
            );
            ended += 1;
        }
        Ok(ended)
    }

    /// Releases every hold of a dead instance, then forgets the instance.
    async fn reap_dead(&self, dead: &str, now_ms: i64) -> Result<usize, CacheError> {
        let owner_key = self.keys.owner(dead);
        let buckets: Vec<String> = query(&self.conn, command("SMEMBERS").arg(&owner_key)).await?;
        let results: Vec<Result<usize, CacheError>> = stream::iter(buckets.clone())
            .map(|base| self.reap_all_of(base, now_ms, dead))
            .buffer_unordered(REAP_CONCURRENCY)
            .collect()
            .await;
        let mut released = 0;
        for result in results {
            released += result?;
        }
        // Remove only what was reaped (an instance that came back may have added buckets since),
        // and forget the instance only if it is still silent.
        if !buckets.is_empty() {
            query::<i64>(&self.conn, command("SREM").arg(&owner_key).arg(&buckets)).await?;
        }
        eval::<i64>(
            &self.conn,
            &SCRIPTS.forget,
            &[&self.keys.instances()],
            &[dead, &INSTANCE_DEAD_AFTER_MS.to_string()],
        )
        .await?;
        if released > 0 {
            tracing::warn!(
                instance = dead,
                released,
                "released the holds of a dead instance"
            );
        }
        Ok(released)
    }

    /// After a reserve call whose outcome is unknown (Redis may have run the script before the
    /// answer was lost): drop the hold it may have taken, since the caller treats the
    /// reservation as failed, but only if the hold still carries that call's token. Retried for
    /// a while in the background; otherwise the hold would last until its deadline.
    fn abandon_in_background(&self, keys: &BucketKeys, request_id: &str, token: u64) {
        let conn = self.conn.clone();
        let instance = self.instance.clone();
        let (base, holds, request_id) =
            (keys.base.clone(), keys.holds.clone(), request_id.to_owned());
        tokio::spawn(async move {
            let token = token.to_string();
            let mut backoff = Duration::from_millis(500);
            for _ in 0..ABANDON_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                let args = [request_id.as_str(), token.as_str(), instance.as_str()];
                match eval::<i64>(&conn, &SCRIPTS.abandon, &[&base, &holds], &args).await {
                    Ok(_) => return,
                    Err(error) => {
                        tracing::debug!(%error, request_id, "cannot abandon a reservation yet");
                    }
                }
                backoff *= 2;
            }
            tracing::warn!(
                request_id,
                "a reservation of unknown outcome is left to its deadline"
            );
        });
    }
}

async fn connect_cluster(nodes: &str) -> Result<ClusterConnection, CacheError> {
    // `user:pass@` on the first node applies to every node.
    let (auth, hosts) = match nodes.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), nodes),
    };
    let urls: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|host| !host.is_empty())
        .map(|host| format!("redis://{auth}{host}"))
        .collect();
    if urls.is_empty() {
        return Err(unavailable(format_args!(
            "{CLUSTER_SCHEME} needs at least one host:port"
        )));
    }
    let client = ClusterClientBuilder::new(urls)
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT)
        .retries(2)
        .build()
        .map_err(unavailable)?;
    timed(client.get_async_connection()).await
}

async fn heartbeat_loop(conn: Conn, instances: String, instance: String) {
    let mut ticker = tokio::time::interval(HEARTBEAT_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if let Err(error) =
            eval::<i64>(&conn, &SCRIPTS.heartbeat, &[&instances], &[&instance]).await
        {
            tracing::warn!(%error, instance, "heartbeat failed");
        }
    }
}

#[async_trait]
impl BalanceCache for RedisCache {
    async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let pong = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        .map_err(|_| unavailable("PING timed out"))?
        .map_err(unavailable)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(unavailable(format_args!("unexpected PING answer `{pong}`")))
        }
    }

    fn journal_outlives_process(&self) -> bool {
        true
    }

    async fn reserve(
        &self,
        bucket: &Bucket,
        hold: &HoldSpec,
        floor: Credits,
        source: &dyn SnapshotSource,
    ) -> Result<(), ReserveError> {
        let keys = self.keys.bucket(bucket);
        let reserving = self.start_reserving(&keys.base);
        let owner_key = self.keys.owner(&self.instance);
        let generation_key = self.keys.generation();
        // On a single server the script reads the generation and adds the bucket to this
        // instance's owner set itself: one round trip. In a cluster those keys live in other
        // slots, so they are read and written first; either way the bucket joins the owner set
        // before any hold exists, so a crash right after still leaves the hold findable by a
        // sibling's reaper.
        let (script_keys, generation): (Vec<&str>, i64) = if self.conn.is_single() {
            (
                vec![&keys.base, &keys.holds, &generation_key, &owner_key],
                0,
            )
        } else {
            let mut sadd = command("SADD");
            sadd.arg(&owner_key).arg(&keys.base);
            let (generation, _) =
                tokio::try_join!(self.generation(), query::<i64>(&self.conn, &sadd))?;
            (vec![&keys.base, &keys.holds], generation)
        };
        let (amount, floor, deadline, generation_arg) = (
            exact(hold.amount.micros()).to_string(),
            exact(floor.micros()).to_string(),
            hold.deadline_ms.to_string(),
            generation.to_string(),
        );
        for _ in 0..=MAX_LOADS {
            let reply: Vec<i64> = match eval_attempt(
                &self.conn,
                &SCRIPTS.reserve,
                &script_keys,
                &[
                    &hold.request_id,
                    &amount,
                    &floor,
                    &deadline,
                    &self.instance,
                    &generation_arg,
                    &reserving.token.to_string(),
                    &now_ms().to_string(),
                    &keys.base,
                ],
            )
            .await
            {
                Ok(reply) => reply,
                Err(failed) => {
                    if failed.maybe_ran {
                        self.abandon_in_background(&keys, &hold.request_id, reserving.token);
                    }
                    return Err(failed.error.into());
                }
            };
            match reply.as_slice() {
                [1] => return Ok(()),
                [2, available] => {
                    return Err(ReserveError::Insufficient {
                        available: Credits::from_micros(*available),
                    });
                }
                [0, generation] => self.load(bucket, &keys, *generation, source).await?,
                other => return Err(unavailable(format_args!("reserve answered {other:?}")).into()),
            }
        }
        Err(unavailable("the bucket vanished after every load").into())
    }

    async fn settle(
        &self,
        bucket: &Bucket,
        request_id: &str,
        cost: Credits,
        record: Option<&str>,
    ) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        let index = self.keys.pending_index();
        let member = index_member(&keys.base, request_id);
        let settled_at = now_ms().to_string();
        let mut script_keys = vec![
            keys.base.as_str(),
            &keys.holds,
            &keys.pending,
            &keys.journal,
            &keys.progress,
        ];
        if self.conn.is_single() {
            // The script indexes the record in the same step.
            script_keys.push(&index);
        } else if record.is_some() {
            // Indexed before the settlement exists: a crash in between leaves an index entry
            // pointing at nothing (skipped and removed by `orphans`), never an unindexed record.
            // NX keeps the first settle time of a repeated settle.
            let mut zadd = command("ZADD");
            zadd.arg(&index).arg("NX").arg(&settled_at).arg(&member);
            query::<i64>(&self.conn, &zadd).await?;
        }
        let cost = exact(cost.micros()).to_string();
        eval::<i64>(
            &self.conn,
            &SCRIPTS.settle,
            &script_keys,
            &[
                request_id,
                &cost,
                record.unwrap_or(""),
                &member,
                &settled_at,
            ],
        )
        .await
        .map(drop)
    }

    async fn renew(
        &self,
        bucket: &Bucket,
        request_id: &str,
        deadline_ms: i64,
        progress: Option<&str>,
    ) -> Result<bool, CacheError> {
        let keys = self.keys.bucket(bucket);
        let deadline = deadline_ms.to_string();
        let mut args = vec![request_id, deadline.as_str()];
        args.extend(progress);
        let renewed: i64 = eval(
            &self.conn,
            &SCRIPTS.renew,
            &[&keys.holds, &keys.progress],
            &args,
        )
        .await?;
        Ok(renewed == 1)
    }

    async fn release(&self, bucket: &Bucket, request_id: &str) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        eval::<i64>(
            &self.conn,
            &SCRIPTS.release,
            &[&keys.base, &keys.holds, &keys.progress],
            &[request_id],
        )
        .await
        .map(drop)
    }

    async fn committed(
        &self,
        bucket: &Bucket,
        request_id: &str,
        snapshot: Snapshot,
    ) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        let [balance, rev, next_expiry, lapsed] = snapshot_args(&snapshot);
        let index = self.keys.pending_index();
        let member = index_member(&keys.base, request_id);
        let single = self.conn.is_single();
        let mut script_keys = vec![
            keys.base.as_str(),
            &keys.pending,
            &keys.journal,
            &keys.holds,
            &keys.progress,
        ];
        if single {
            // The script drops the index entry in the same step.
            script_keys.push(&index);
        }
        let journaled: i64 = eval(
            &self.conn,
            &SCRIPTS.committed,
            &script_keys,
            &[request_id, &balance, &rev, &next_expiry, &lapsed, &member],
        )
        .await?;
        if journaled > 0 && !single {
            let mut zrem = command("ZREM");
            zrem.arg(&index).arg(&member);
            query::<i64>(&self.conn, &zrem).await?;
        }
        Ok(())
    }

    async fn apply(&self, bucket: &Bucket, snapshot: Snapshot) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        let [balance, rev, next_expiry, lapsed] = snapshot_args(&snapshot);
        eval::<i64>(
            &self.conn,
            &SCRIPTS.apply,
            &[&keys.base],
            &[&balance, &rev, &next_expiry, &lapsed],
        )
        .await
        .map(drop)
    }

    async fn invalidate_all(&self) -> Result<(), CacheError> {
        eval::<i64>(
            &self.conn,
            &SCRIPTS.invalidate,
            &[&self.keys.generation()],
            &[],
        )
        .await
        .map(drop)
    }

    async fn view(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<BalanceView, CacheError> {
        let keys = self.keys.bucket(bucket);
        let generation = self.generation().await?;
        let generation_arg = generation.to_string();
        for _ in 0..=MAX_LOADS {
            let reply: Vec<i64> = eval(
                &self.conn,
                &SCRIPTS.view,
                &[&keys.base],
                &[&generation_arg, &now_ms().to_string()],
            )
            .await?;
            match reply.as_slice() {
                [1, balance, held, lapsed] => {
                    return Ok(BalanceView {
                        balance: Credits::from_micros(*balance),
                        held: Credits::from_micros(*held),
                        available: clamp(
                            i128::from(*balance) - i128::from(*held) - i128::from(*lapsed),
                        ),
                    });
                }
                [0] => self.load(bucket, &keys, generation, source).await?,
                other => return Err(unavailable(format_args!("view answered {other:?}"))),
            }
        }
        Err(unavailable("the bucket vanished after every load"))
    }

    async fn in_flight(&self, bucket: &Bucket, at_ms: i64) -> Result<Credits, CacheError> {
        self.fence(&self.keys.bucket(bucket), at_ms).await
    }

    async fn reap_holds(&self, now_ms: i64) -> Result<usize, CacheError> {
        let owner_key = self.keys.owner(&self.instance);
        let own: Vec<String> = query(&self.conn, command("SMEMBERS").arg(&owner_key)).await?;
        let results: Vec<Result<usize, CacheError>> = stream::iter(own)
            .map(|base| self.reap_own(base, now_ms, &owner_key))
            .buffer_unordered(REAP_CONCURRENCY)
            .collect()
            .await;
        let mut released = 0;
        for result in results {
            released += result?;
        }
        let dead: Vec<String> = eval(
            &self.conn,
            &SCRIPTS.dead,
            &[&self.keys.instances()],
            &[
                &INSTANCE_DEAD_AFTER_MS.to_string(),
                &self.instance,
                &DEAD_BATCH.to_string(),
            ],
        )
        .await?;
        for instance in &dead {
            released += self.reap_dead(instance, now_ms).await?;
        }
        Ok(released)
    }

    async fn orphans(&self, now_ms: i64, older_than_ms: i64) -> Result<Vec<Orphan>, CacheError> {
        let index = self.keys.pending_index();
        let cutoff = now_ms.saturating_sub(older_than_ms);
        let mut range = command("ZRANGEBYSCORE");
        range
            .arg(&index)
            .arg("-inf")
            .arg(format!("({cutoff}"))
            .arg("LIMIT")
            .arg(0)
            .arg(ORPHAN_BATCH);
        let members: Vec<String> = query(&self.conn, &range).await?;
        let mut orphans = Vec::new();
        for member in members {
            let Some((base, request_id)) = parse_index_member(&member) else {
                continue;
            };
            let Some(bucket) = self.keys.parse_bucket(base) else {
                tracing::warn!(member, "pending index entry names no bucket; skipped");
                continue;
            };
            let keys = BucketKeys::from_base(base.to_owned());
            let reply: Vec<Value> = eval(
                &self.conn,
                &SCRIPTS.orphan,
                &[&keys.pending, &keys.journal],
                &[&request_id],
            )
            .await?;
            match reply.as_slice() {
                [Value::Int(0)] => {
                    // Committed (its ZREM was lost) or never settled (a crash after the ZADD).
                    query::<i64>(&self.conn, command("ZREM").arg(&index).arg(&member)).await?;
                }
                [Value::Int(1), record] => {
                    let record = String::from_redis_value_ref(record).map_err(unavailable)?;
                    orphans.push(Orphan {
                        bucket,
                        request_id,
                        record,
                    });
                }
                _ => {}
            }
        }
        Ok(orphans)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::time::Instant;

    use super::*;
    use crate::cache::contract::{self, *};

    /// A key prefix of its own per test, so tests run in parallel on one Redis.
    struct Space {
        url: &'static str,
        prefix: String,
    }

    impl Space {
        /// `None` (the test is skipped, or fails under `CI=true`) when there is no Redis.
        fn new() -> Option<Self> {
            Some(Space {
                url: &crate::test_support::services::shared_redis()?.url,
                prefix: crate::test_support::services::unique_test_name(),
            })
        }

        async fn cache(&self, instance: &str) -> RedisCache {
            RedisCache::connect(self.url, &self.prefix, instance)
                .await
                .unwrap_or_else(|e| panic!("Redis at {}: {e}", self.url))
        }

        async fn conn(&self) -> ::redis::aio::MultiplexedConnection {
            Client::open(self.url)
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("redis")
        }

        /// Every key of this test (what a FLUSHALL would do to it).
        async fn keys(&self) -> Vec<String> {
            let mut conn = self.conn().await;
            let mut cursor = 0u64;
            let mut keys = Vec::new();
            loop {
                let (next, batch): (u64, Vec<String>) = command("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("*{}*", self.prefix))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .expect("scan");
                keys.extend(batch);
                if next == 0 {
                    return keys;
                }
                cursor = next;
            }
        }

        async fn flush(&self) {
            let keys = self.keys().await;
            if !keys.is_empty() {
                let mut conn = self.conn().await;
                let _: i64 = command("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("del");
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_reservations_never_exceed_the_balance() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            contract::concurrent_reservations_never_exceed_the_balance(Arc::new(
                space.cache("gw1").await,
            ))
            .await;
            space.flush().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_gateways_racing_on_one_account_never_overspend() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let one = Arc::new(space.cache("gw1").await);
            let two = Arc::new(space.cache("gw2").await);
            let source = Arc::new(FixedSource::new(credits(10)));
            assert_eq!(race(&[one.clone(), two.clone()], source.clone()).await, 10);
            for cache in [&one, &two] {
                let view = cache.view(&bucket(), &*source).await.expect("view");
                assert_eq!((view.held, view.available), (credits(10), Credits::ZERO));
            }
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn settle_commit_and_release_are_idempotent_per_request() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            contract::settle_commit_and_release_are_idempotent_per_request(&cache).await;
            // Nothing is left behind for the request: no journal record, no index entry.
            let keys = cache.keys.bucket(&bucket());
            let mut conn = space.conn().await;
            let journal: i64 = command("HLEN")
                .arg(&keys.journal)
                .query_async(&mut conn)
                .await
                .expect("hlen");
            let index: i64 = command("ZCARD")
                .arg(cache.keys.pending_index())
                .query_async(&mut conn)
                .await
                .expect("zcard");
            assert_eq!((journal, index), (0, 0));
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn overdraft_floor_allows_going_negative_that_far() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            contract::overdraft_floor_allows_going_negative_that_far(&space.cache("gw1").await)
                .await;
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn invalidation_reloads_external_changes() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            let sibling = space.cache("gw2").await;
            contract::invalidation_reloads_external_changes(&cache, &sibling).await;
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_flushed_redis_only_costs_a_reload() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            let source = FixedSource::new(credits(10));
            cache
                .reserve(&bucket(), &hold("a", credits(4)), Credits::ZERO, &source)
                .await
                .expect("fits");
            assert_eq!(source.loads(), 1);
            space.flush().await;
            let view = cache.view(&bucket(), &source).await.expect("view");
            assert_eq!(
                (view.balance, view.held, view.available),
                (credits(10), Credits::ZERO, credits(10))
            );
            assert_eq!(source.loads(), 2);
            cache
                .reserve(&bucket(), &hold("b", credits(10)), Credits::ZERO, &source)
                .await
                .expect("fits after the reload");
            assert!(
                cache
                    .reserve(
                        &bucket(),
                        &hold("c", Credits::from_micros(1)),
                        Credits::ZERO,
                        &source
                    )
                    .await
                    .is_err()
            );
            assert_eq!(source.loads(), 2);
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn reap_releases_expired_holds_and_those_of_dead_instances_only() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let me = space.cache("gw_me").await;
            let dead = space.cache("gw_dead").await;
            let alive = space.cache("gw_alive").await;
            let source = FixedSource::new(credits(100));
            let bob = Bucket::Account(AccountId::parse("bob").expect("valid"));
            let mut expired = hold("me-expired", credits(1));
            expired.deadline_ms = 1_000;
            let mut expired_bob = hold("me-expired-bob", credits(1));
            expired_bob.deadline_ms = 1_000;
            for (cache, bucket, hold) in [
                (&me, &bucket(), expired),
                (&me, &bob, expired_bob),
                (&me, &bucket(), hold("me-live", credits(2))),
                (&dead, &bucket(), hold("dead-1", credits(4))),
                (&dead, &bob, hold("dead-2", credits(8))),
                (&alive, &bucket(), hold("alive-1", credits(16))),
            ] {
                cache
                    .reserve(bucket, &hold, Credits::ZERO, &source)
                    .await
                    .expect("fits");
            }
            // `gw_dead` stops beating and its last beat is a minute old.
            dead.shutdown();
            let mut conn = space.conn().await;
            let instances = me.keys.instances();
            let _: i64 = command("ZADD")
                .arg(&instances)
                .arg(now_ms() - 60_000)
                .arg("gw_dead")
                .query_async(&mut conn)
                .await
                .expect("zadd");

            assert_eq!(me.reap_holds(now_ms()).await.expect("reap"), 4);
            let view = me.view(&bucket(), &source).await.expect("view");
            assert_eq!(view.held, credits(2 + 16));
            assert_eq!(
                me.view(&bob, &source).await.expect("view").held,
                Credits::ZERO
            );
            // The dead instance is forgotten; the live ones are not.
            let members: Vec<String> = command("ZRANGE")
                .arg(&instances)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .expect("zrange");
            assert!(!members.contains(&"gw_dead".to_owned()), "{members:?}");
            assert!(members.contains(&"gw_alive".to_owned()), "{members:?}");
            let dead_set: i64 = command("EXISTS")
                .arg(me.keys.owner("gw_dead"))
                .query_async(&mut conn)
                .await
                .expect("exists");
            assert_eq!(dead_set, 0);
            // My owner set keeps the bucket where I still hold, and drops the one where I do not.
            let mine: Vec<String> = command("SMEMBERS")
                .arg(me.keys.owner("gw_me"))
                .query_async(&mut conn)
                .await
                .expect("smembers");
            assert_eq!(mine, vec![me.keys.bucket(&bucket()).base]);
            // Nothing more to release.
            assert_eq!(me.reap_holds(now_ms()).await.expect("reap"), 0);
            drop(dead);
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn orphans_are_old_recorded_settlements_until_committed() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            let source = FixedSource::new(credits(10));
            let key = Bucket::KeyLimit("key_1".into());
            for bucket in [&bucket(), &key] {
                cache
                    .reserve(bucket, &hold("req|1", credits(2)), Credits::ZERO, &source)
                    .await
                    .expect("fits");
            }
            cache
                .settle(&bucket(), "req|1", credits(1), Some("{\"the\":\"record\"}"))
                .await
                .expect("settle");
            cache
                .settle(&key, "req|1", credits(1), None)
                .await
                .expect("settle");
            // A crash between the index entry and the settlement leaves an entry pointing nowhere.
            let mut conn = space.conn().await;
            let index = cache.keys.pending_index();
            let dangling = index_member(&cache.keys.bucket(&bucket()).base, "req_lost");
            let _: i64 = command("ZADD")
                .arg(&index)
                .arg(0)
                .arg(&dangling)
                .query_async(&mut conn)
                .await
                .expect("zadd");

            // Too young to be an orphan (the dangling entry is old, but points at nothing).
            assert!(
                cache
                    .orphans(now_ms(), 60_000)
                    .await
                    .expect("orphans")
                    .is_empty()
            );
            let gone: Option<f64> = command("ZSCORE")
                .arg(&index)
                .arg(&dangling)
                .query_async(&mut conn)
                .await
                .expect("zscore");
            assert_eq!(gone, None, "a dangling index entry is removed");

            let orphans = cache
                .orphans(now_ms() + 120_000, 60_000)
                .await
                .expect("orphans");
            assert_eq!(orphans.len(), 1);
            assert_eq!(orphans[0].bucket, bucket());
            assert_eq!(
                (orphans[0].request_id.as_str(), orphans[0].record.as_str()),
                ("req|1", "{\"the\":\"record\"}")
            );
            // A sibling can see it too.
            let sibling = space.cache("gw2").await;
            assert_eq!(
                sibling
                    .orphans(now_ms() + 120_000, 60_000)
                    .await
                    .expect("orphans")
                    .len(),
                1
            );
            let written = Snapshot::plain(credits(9), 2);
            cache
                .committed(&bucket(), "req|1", written)
                .await
                .expect("commit");
            assert!(
                cache
                    .orphans(now_ms() + 120_000, 60_000)
                    .await
                    .expect("orphans")
                    .is_empty()
            );
            let left: i64 = command("ZCARD")
                .arg(&index)
                .query_async(&mut conn)
                .await
                .expect("zcard");
            assert_eq!(left, 0);
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn amounts_beyond_lua_precision_saturate() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            let source = FixedSource::new(Credits::from_micros(i64::MAX));
            let view = cache.view(&bucket(), &source).await.expect("view");
            assert_eq!(view.balance, Credits::from_micros(MAX_EXACT_MICROS));
            let err = cache
                .reserve(
                    &bucket(),
                    &hold("huge", Credits::from_micros(i64::MAX)),
                    Credits::from_micros(1),
                    &source,
                )
                .await
                .expect_err("2^53 - 2^53 < 1");
            assert!(matches!(err, ReserveError::Insufficient { .. }));
            // Below 2^53 every micro-credit counts.
            let exact_source = FixedSource::new(Credits::from_micros(MAX_EXACT_MICROS - 1));
            let other = Bucket::Account(AccountId::parse("exact").expect("valid"));
            cache
                .reserve(
                    &other,
                    &hold("a", Credits::from_micros(MAX_EXACT_MICROS - 2)),
                    Credits::ZERO,
                    &exact_source,
                )
                .await
                .expect("fits");
            let view = cache.view(&other, &exact_source).await.expect("view");
            assert_eq!(view.available, Credits::from_micros(1));
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn unreachable_redis_answers_unavailable_quickly() {
        crate::test_support::time_limit::limited(async move {
            // A port nothing listens on: bind, note the port, close.
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .expect("bind")
                .local_addr()
                .expect("addr")
                .port();
            let url = format!("redis://127.0.0.1:{port}");
            let started = Instant::now();
            let err = RedisCache::connect(&url, "tgtest_down", "gw1")
                .await
                .err()
                .expect("nothing listens");
            assert!(matches!(err, CacheError::Unavailable(_)), "{err}");
            assert!(started.elapsed() < Duration::from_millis(2500));

            let cache = RedisCache::open(&url, "tgtest_down", "gw1")
                .await
                .expect("lazy");
            let source = FixedSource::new(credits(10));
            for _ in 0..3 {
                let started = Instant::now();
                let err = cache
                    .reserve(&bucket(), &hold("a", credits(1)), Credits::ZERO, &source)
                    .await
                    .expect_err("down");
                assert!(
                    matches!(err, ReserveError::Cache(CacheError::Unavailable(_))),
                    "{err}"
                );
                assert!(started.elapsed() < Duration::from_millis(2500));
                let started = Instant::now();
                assert!(matches!(
                    cache.view(&bucket(), &source).await,
                    Err(CacheError::Unavailable(_))
                ));
                assert!(
                    cache
                        .settle(&bucket(), "a", credits(1), Some("{}"))
                        .await
                        .is_err()
                );
                assert!(cache.reap_holds(now_ms()).await.is_err());
                assert!(started.elapsed() < Duration::from_millis(2500));
            }
            assert_eq!(source.loads(), 0);
        })
        .await;
    }

    /// The hold of `request_id` as stored: `amount|deadline|token|owner`.
    #[tokio::test]
    async fn a_snapshot_counting_a_lapsed_grant_is_reloaded_and_lapsed_credits_are_unavailable() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            contract::a_snapshot_counting_a_lapsed_grant_is_reloaded_and_lapsed_credits_are_unavailable(&space.cache("gw1").await).await;
            space.flush().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_sweeps_fence_makes_later_reservations_reload_keeping_what_is_in_flight() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            contract::a_sweeps_fence_makes_later_reservations_reload_keeping_what_is_in_flight(
                &space.cache("gw1").await,
            )
            .await;
            space.flush().await;
        })
        .await;
    }

    async fn stored_hold(space: &Space, cache: &RedisCache, request_id: &str) -> Option<String> {
        let mut conn = space.conn().await;
        command("HGET")
            .arg(cache.keys.bucket(&bucket()).holds)
            .arg(request_id)
            .query_async(&mut conn)
            .await
            .expect("hget")
    }

    fn token_of(hold: &str) -> u64 {
        hold.split('|')
            .nth(2)
            .expect("token")
            .parse()
            .expect("number")
    }

    #[tokio::test]
    async fn a_reservation_of_unknown_outcome_is_abandoned_by_its_token_only() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            let source = FixedSource::new(credits(10));
            let keys = cache.keys.bucket(&bucket());
            cache
                .reserve(&bucket(), &hold("a", credits(4)), Credits::ZERO, &source)
                .await
                .expect("fits");
            let first = token_of(&stored_hold(&space, &cache, "a").await.expect("held"));
            // The same request reserved again: its hold now answers to the second call.
            cache
                .reserve(&bucket(), &hold("a", credits(4)), Credits::ZERO, &source)
                .await
                .expect("same hold");
            let second = token_of(&stored_hold(&space, &cache, "a").await.expect("held"));
            assert_ne!(first, second);
            cache.abandon_in_background(&keys, "a", first);
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(
                cache.view(&bucket(), &source).await.expect("view").held,
                credits(4),
                "an earlier call's abandon leaves the hold"
            );
            cache.abandon_in_background(&keys, "a", second);
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert_eq!(
                cache.view(&bucket(), &source).await.expect("view").held,
                Credits::ZERO
            );
            space.flush().await;
        })
        .await;
    }

    /// A TCP relay to the test Redis that can be cut and restored, to play a Redis outage.
    struct Relay {
        port: u16,
        tasks: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    }

    impl Relay {
        async fn start(port: u16) -> Relay {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let tasks = Arc::new(std::sync::Mutex::new(Vec::new()));
            let registry = tasks.clone();
            let accept = tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let relay = tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect("127.0.0.1:6379").await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    registry.lock().expect("lock").push(relay.abort_handle());
                }
            });
            tasks.lock().expect("lock").push(accept.abort_handle());
            Relay { port, tasks }
        }

        fn cut(&self) {
            for task in self.tasks.lock().expect("lock").drain(..) {
                task.abort();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_answers_unavailable_and_the_connection_comes_back_by_itself() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let relay = Relay::start(0).await;
            let url = format!("redis://127.0.0.1:{}", relay.port);
            let cache = RedisCache::connect(&url, &space.prefix, "gw1")
                .await
                .expect("through the relay");
            let source = FixedSource::new(credits(10));
            cache
                .reserve(&bucket(), &hold("a", credits(4)), Credits::ZERO, &source)
                .await
                .expect("fits");

            relay.cut();
            tokio::time::sleep(Duration::from_millis(100)).await;
            for _ in 0..3 {
                let started = Instant::now();
                assert!(matches!(
                    cache.view(&bucket(), &source).await,
                    Err(CacheError::Unavailable(_))
                ));
                assert!(started.elapsed() < Duration::from_millis(2500));
            }

            let relay = Relay::start(relay.port).await;
            let started = Instant::now();
            let view = loop {
                match cache.view(&bucket(), &source).await {
                    Ok(view) => break view,
                    Err(error) => {
                        assert!(started.elapsed() < Duration::from_secs(5), "{error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            // Redis itself kept everything: the hold is still there, no reload was needed.
            assert_eq!(view.held, credits(4));
            assert_eq!(source.loads(), 1);
            relay.cut();
            space.flush().await;
        })
        .await;
    }

    /// The same semantics on Redis Cluster, where a bucket's keys must share a slot. Needs a
    /// cluster: `TOLLGATE_TEST_REDIS_CLUSTER=redis+cluster://127.0.0.1:7101,127.0.0.1:7102`
    /// (its keys are left behind: use a throwaway cluster).
    /// The commands clients sent on this test's keys while `work` ran, as Redis's `MONITOR`
    /// reports them: one per round trip (the calls scripts make, and heartbeats, which run on
    /// their own clock, are left out).
    async fn commands_during(space: &Space, work: impl Future<Output = ()>) -> Vec<String> {
        let client = Client::open(space.url).expect("url");
        let mut monitor = client
            .get_async_monitor()
            .await
            .expect("monitor")
            .into_on_message::<String>();
        let done = format!("{}-done", space.prefix);
        work.await;
        let mut conn = space.conn().await;
        let _: String = command("ECHO")
            .arg(&done)
            .query_async(&mut conn)
            .await
            .expect("echo");
        let mut seen = Vec::new();
        while let Some(line) = monitor.next().await {
            if line.contains(&done) {
                return seen;
            }
            if line.contains(&space.prefix)
                && !line.contains(" lua]")
                && !line.contains(":instances")
            {
                seen.push(line);
            }
        }
        panic!("the monitor ended before the marker");
    }

    /// The command name of a `MONITOR` line (`<time> [<db> <client>] "NAME" "arg" …`).
    fn command_name(line: &str) -> &str {
        line.split('"').nth(1).unwrap_or(line)
    }

    #[tokio::test]
    async fn a_request_costs_two_round_trips_and_its_commit_one_on_one_server() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            let source = FixedSource::new(credits(10));
            // The first call loads the bucket (and Redis the scripts); later ones do not.
            cache
                .reserve(&bucket(), &hold("warm", credits(1)), Credits::ZERO, &source)
                .await
                .expect("fits");
            cache
                .settle(&bucket(), "warm", credits(1), Some("{}"))
                .await
                .expect("settle");
            cache
                .committed(&bucket(), "warm", Snapshot::plain(credits(9), 2))
                .await
                .expect("commit");

            let request = commands_during(&space, async {
                cache
                    .reserve(&bucket(), &hold("r", credits(4)), Credits::ZERO, &source)
                    .await
                    .expect("fits");
                cache
                    .settle(&bucket(), "r", credits(3), Some("{}"))
                    .await
                    .expect("settle");
            })
            .await;
            let names: Vec<&str> = request.iter().map(|line| command_name(line)).collect();
            assert_eq!(names, ["EVALSHA", "EVALSHA"], "{request:#?}");
            // The journal record is indexed for a sibling's recovery, and the bucket is in this
            // instance's owner set, by those two scripts.
            assert_eq!(cache.orphans(i64::MAX, 0).await.expect("orphans").len(), 1);
            let mut conn = space.conn().await;
            let owned: Vec<String> = command("SMEMBERS")
                .arg(cache.keys.owner("gw1"))
                .query_async(&mut conn)
                .await
                .expect("owner set");
            assert_eq!(owned, [cache.keys.bucket(&bucket()).base]);

            let commit = commands_during(&space, async {
                cache
                    .committed(&bucket(), "r", Snapshot::plain(credits(6), 3))
                    .await
                    .expect("commit");
            })
            .await;
            let names: Vec<&str> = commit.iter().map(|line| command_name(line)).collect();
            assert_eq!(names, ["EVALSHA"], "{commit:#?}");
            assert!(
                cache
                    .orphans(i64::MAX, 0)
                    .await
                    .expect("orphans")
                    .is_empty()
            );
            space.flush().await;
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "needs a Redis Cluster (TOLLGATE_TEST_REDIS_CLUSTER)"]
    async fn redis_cluster_keeps_the_semantics() {
        crate::test_support::time_limit::limited(async move {
            let Ok(url) = std::env::var("TOLLGATE_TEST_REDIS_CLUSTER") else {
                return;
            };
            let prefix = format!("tgtest_{}", uuid::Uuid::new_v4().simple());
            let connect = |instance: &'static str| {
                let (url, prefix) = (url.clone(), prefix.clone());
                async move {
                    RedisCache::connect(&url, &prefix, instance)
                        .await
                        .expect("cluster")
                }
            };
            let one = Arc::new(connect("gw1").await);
            let two = Arc::new(connect("gw2").await);
            let source = Arc::new(FixedSource::new(credits(10)));
            assert_eq!(race(&[one.clone(), two.clone()], source.clone()).await, 10);
            // The winners are any 10 of the 100: release them all, then record 10 free settlements.
            for i in 0..100 {
                two.release(&bucket(), &format!("r{i}"))
                    .await
                    .expect("release");
            }
            for i in 0..10 {
                one.settle(&bucket(), &format!("s{i}"), Credits::ZERO, Some("{}"))
                    .await
                    .expect("settle");
            }
            // Many accounts, so many slots (and nodes): each bucket works on its own.
            for i in 0..50 {
                let account =
                    Bucket::Account(AccountId::parse(&format!("acct{i}")).expect("valid"));
                two.reserve(&account, &hold("x", credits(1)), Credits::ZERO, &*source)
                    .await
                    .expect("fits");
                two.settle(&account, "x", credits(1), Some("{}"))
                    .await
                    .expect("settle");
            }
            two.invalidate_all().await.expect("invalidate");
            let view = one.view(&bucket(), &*source).await.expect("view");
            assert_eq!(view.available, credits(10));
            assert_eq!(
                one.orphans(now_ms() + 120_000, 60_000)
                    .await
                    .expect("orphans")
                    .len(),
                60
            );
            let mut expired = hold("late", credits(1));
            expired.deadline_ms = 1;
            one.reserve(&bucket(), &expired, Credits::ZERO, &*source)
                .await
                .expect("fits");
            assert_eq!(one.reap_holds(now_ms()).await.expect("reap"), 1);
        })
        .await;
    }

    #[test]
    fn keys_of_a_bucket_share_one_hash_tag() {
        let keys = Keys {
            prefix: "tg".into(),
        };
        let tag = |key: &str| -> String {
            let open = key.find('{').expect("tag");
            let close = key[open + 1..].find('}').expect("tag") + open + 1;
            key[open + 1..close].to_owned()
        };
        for account in ["alice", "a}b{c", "x}|y", "%7C"] {
            let bucket = Bucket::Account(AccountId::parse(account).expect("valid"));
            let k = keys.bucket(&bucket);
            let base = tag(&k.base);
            for key in [&k.holds, &k.pending, &k.journal] {
                assert_eq!(tag(key), base, "{key}");
            }
            assert_eq!(keys.parse_bucket(&k.base), Some(bucket.clone()));
            for request_id in ["req_1", "a|b", "%7C|%25"] {
                let member = index_member(&k.base, request_id);
                let (parsed_base, parsed_id) = parse_index_member(&member).expect("parses");
                assert_eq!(
                    (parsed_base, parsed_id.as_str()),
                    (k.base.as_str(), request_id)
                );
            }
        }
        let key = Bucket::KeyLimit("key_1".into());
        assert_eq!(keys.parse_bucket(&keys.bucket(&key).base), Some(key));
        assert_eq!(keys.parse_bucket("{other:a:alice}"), None);
    }

    /// Reservation latency on this machine: `cargo test --lib cache::redis -- --ignored
    /// --nocapture reserve_latency`.
    #[tokio::test]
    #[ignore = "a measurement, not a check"]
    async fn reserve_latency() {
        crate::test_support::time_limit::limited(async move {
            let Some(space) = Space::new() else {
                return;
            };
            let cache = space.cache("gw1").await;
            let source = FixedSource::new(credits(1_000_000));
            cache.view(&bucket(), &source).await.expect("warm");
            let n = 1000u32;
            let started = Instant::now();
            for i in 0..n {
                cache
                    .reserve(
                        &bucket(),
                        &hold(&format!("r{i}"), credits(1)),
                        Credits::ZERO,
                        &source,
                    )
                    .await
                    .expect("fits");
            }
            let reserve = started.elapsed() / n;
            let started = Instant::now();
            for i in 0..n {
                cache
                    .settle(&bucket(), &format!("r{i}"), credits(1), Some("{}"))
                    .await
                    .expect("settle");
            }
            let settle = started.elapsed() / n;
            println!("mean of {n} sequential calls: reserve {reserve:?}, settle {settle:?}");
            space.flush().await;
        })
        .await;
    }
}
