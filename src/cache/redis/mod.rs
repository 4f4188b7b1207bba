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
mod scripts;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
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
                        available: Credits::saturating_from_micros(
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
