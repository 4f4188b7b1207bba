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

mod conn;
mod layout;
mod port;
mod reaping;
mod reserving;
mod scripts;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, FromRedisValue, Value};
use async_trait::async_trait;
use dashmap::DashMap;
use futures_util::stream::{self, StreamExt};

use super::{
    BalanceCache, BalanceView, CacheError, HoldSpec, Orphan, ReserveError, SnapshotSource,
};
use crate::domain::Credits;
use crate::domain::time::now_ms;
use crate::ledger::{Bucket, InFlight, Snapshot};

use conn::*;
use layout::*;
use reserving::*;
use scripts::*;

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

/// The Redis adapter; one per gateway process (it is that process's instance).
pub struct RedisCache {
    conn: Conn,
    keys: Keys,
    instance: String,
    reserving: DashMap<String, Reserving>,
    sequence: AtomicU64,
    /// The heartbeat task, until [`BalanceCache::stop`] ends it (or the adapter is dropped).
    heartbeat: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for RedisCache {
    fn drop(&mut self) {
        if let Some(task) = self.heartbeat_task() {
            task.abort();
        }
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
        ));
        Ok(RedisCache {
            conn,
            keys,
            instance: instance.to_owned(),
            reserving: DashMap::new(),
            sequence: AtomicU64::new(0),
            heartbeat: std::sync::Mutex::new(Some(heartbeat)),
        })
    }

    /// The heartbeat task, taken out (the one caller that ends it owns it).
    fn heartbeat_task(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.heartbeat
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
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
