//! The Redis cache against a real Redis (and a cluster, where one is found).

use std::sync::Arc;

use std::time::Instant;

use super::*;
use crate::cache::contract::{self, *};
use crate::domain::AccountId;

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
        contract::overdraft_floor_allows_going_negative_that_far(&space.cache("gw1").await).await;
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

/// What the supervisor's last step relies on: once `stop` returns, the instance beats no more,
/// so its siblings will count it gone; until then it beats.
#[tokio::test]
async fn stop_ends_the_heartbeat_and_waits_for_it() {
    crate::test_support::time_limit::limited(async move {
        let Some(space) = Space::new() else {
            return;
        };
        let cache = space.cache("gw_stopping").await;
        let mut conn = space.conn().await;
        let instances = cache.keys.instances();
        let last_beat = |conn: &mut ::redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            let instances = instances.clone();
            async move {
                let score: Option<f64> = command("ZSCORE")
                    .arg(&instances)
                    .arg("gw_stopping")
                    .query_async(&mut conn)
                    .await
                    .expect("zscore");
                score.expect("the instance is registered")
            }
        };
        let set_beat = |conn: &mut ::redis::aio::MultiplexedConnection, at: i64| {
            let mut conn = conn.clone();
            let instances = instances.clone();
            async move {
                let _: i64 = command("ZADD")
                    .arg(&instances)
                    .arg(at)
                    .arg("gw_stopping")
                    .query_async(&mut conn)
                    .await
                    .expect("zadd");
            }
        };
        // Alive: an old score is overwritten by the next beat.
        set_beat(&mut conn, 1).await;
        tokio::time::sleep(HEARTBEAT_EVERY + Duration::from_millis(500)).await;
        assert!(last_beat(&mut conn).await > 1.0, "a live instance beats");
        // Stopped: nothing overwrites it any more.
        cache.stop().await;
        set_beat(&mut conn, 1).await;
        tokio::time::sleep(HEARTBEAT_EVERY + Duration::from_millis(500)).await;
        assert_eq!(
            last_beat(&mut conn).await,
            1.0,
            "a stopped instance beats no more"
        );
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
        dead.stop().await;
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

/// The hold of `request_id` as stored: `amount|deadline|token|owner`.
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
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:6379").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
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
        if line.contains(&space.prefix) && !line.contains(" lua]") && !line.contains(":instances") {
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
            let account = Bucket::Account(AccountId::parse(&format!("acct{i}")).expect("valid"));
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
