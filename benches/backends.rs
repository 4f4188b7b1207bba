//! Throughput and latency of the production backends, against the real services on this machine.
//!
//! 1. Settlements into MariaDB through `Ledger::settle_batch` (`MySqlLedger`): one busy account,
//!    then 1000 accounts (settlements spread round-robin), each with batches of 1, 64 and 512
//!    settlements written by 1 and by 4 concurrent writers (tasks calling `settle_batch` at
//!    once, as several gateway instances would). Ends with `verify()` and a check that every
//!    balance is its grant less the summed costs.
//! 2. Hold round trips (`reserve` then `release`) on the Redis `BalanceCache`: latency from one
//!    task, then throughput of 32 tasks on 32 accounts and on one shared account. Snapshots come
//!    from a fixed source (a large balance), so the ledger plays no part in this part.
//! 3. The same hold measurements on the in-process `LocalCache`, for comparison.
//!
//! Uses its own database `tg_bench_<random>` on `mysql://root@127.0.0.1:3306` and its own key
//! prefix (the same name) on `redis://127.0.0.1:6379`; both are removed at the end, also after a
//! failure. Run: `cargo bench --bench backends` (options: `SETTLEMENTS` per case, default 5120;
//! `RESERVATIONS` per hold case, default 10240).

mod support;

use support::{env_or, percentile};

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection};
use tollgate::cache::local::LocalCache;
use tollgate::cache::redis::RedisCache;
use tollgate::cache::{BalanceCache, HoldSpec, SnapshotSource};
use tollgate::domain::time::now_ms;
use tollgate::domain::{AccountId, Credits, RequestId, TokenUsage};
use tollgate::ledger::mysql::MySqlLedger;
use tollgate::ledger::{
    Bucket, EntryType, GrantRequest, InFlight, Ledger, LedgerError, Settlement, Snapshot,
    UsageSource,
};

const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";
const REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Accounts of the spread-out settlement cases.
const ACCOUNTS: usize = 1000;
/// Granted to every account before the run, in whole credits.
const GRANT: i64 = 1_000_000;
const BATCH_SIZES: [usize; 3] = [1, 64, 512];
const WRITERS: [usize; 2] = [1, 4];
/// Concurrent tasks of the hold throughput cases.
const TASKS: usize = 32;
/// Connections of the ledger's pool (more than the writers, as in the gateway).
const POOL: u32 = 8;
/// What every hold reserves, in micro-credits.
const HOLD_MICROS: i64 = 5_000;

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Per second, integer arithmetic only.
fn per_second(count: usize, elapsed: Duration) -> u128 {
    (count as u128) * 1_000_000_000 / elapsed.as_nanos().max(1)
}

/// Microseconds with two decimals, integer arithmetic only.
fn micros(d: Duration) -> String {
    let ns = d.as_nanos();
    format!("{}.{:02}", ns / 1000, ns % 1000 / 10)
}

fn account(name: &str) -> AccountId {
    AccountId::parse(name).expect("account id")
}

fn settlement(account: &AccountId, cost_micros: i64) -> Settlement {
    let now = now_ms();
    Settlement {
        request_id: RequestId::new(),
        account: account.clone(),
        api_key_id: None,
        endpoint: "/v1/chat/completions".into(),
        model: "mock-1".into(),
        upstream: "fake".into(),
        usage: TokenUsage {
            prompt_tokens: 120,
            completion_tokens: 48,
            cached_tokens: 0,
        },
        source: UsageSource::Reported,
        cost: Credits::from_micros(cost_micros),
        uncharged: Credits::ZERO,
        hold: Credits::from_micros(HOLD_MICROS),
        stream: false,
        status: "completed".into(),
        started_at_ms: now - 250,
        finished_at_ms: now,
    }
}

/// Writes `total` settlements spread round-robin over `accounts`, in batches of `batch`, with
/// `writers` tasks taking the next batch as they finish one. Adds each cost to `spent`.
async fn settle_case(
    ledger: &Arc<MySqlLedger>,
    accounts: &[AccountId],
    total: usize,
    batch: usize,
    writers: usize,
    spent: &mut HashMap<AccountId, i128>,
) -> Duration {
    let mut all = Vec::with_capacity(total);
    for i in 0..total {
        let account = &accounts[i % accounts.len()];
        let cost = 1_000 + (i % 97) as i64;
        *spent.entry(account.clone()).or_default() += i128::from(cost);
        all.push(settlement(account, cost));
    }
    let batches: Arc<Vec<Vec<Settlement>>> =
        Arc::new(all.chunks(batch).map(<[_]>::to_vec).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (ledger, batches, next) = (ledger.clone(), batches.clone(), next.clone());
            tokio::spawn(async move {
                while let Some(batch) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let outcomes = ledger.settle_batch(batch).await.expect("settle_batch");
                    assert!(
                        outcomes.iter().all(|o| o.applied),
                        "a settlement was skipped"
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    start.elapsed()
}

/// The snapshot source of the hold cases: a fixed large balance, so no hold is ever refused.
struct FixedSource;

#[async_trait]
impl SnapshotSource for FixedSource {
    async fn load(&self, _bucket: &Bucket, _in_flight: InFlight) -> Result<Snapshot, LedgerError> {
        Ok(Snapshot::plain(Credits::from_micros(1 << 50), 1))
    }
}

/// One hold round trip: reserve, then release; returns how long both took.
async fn round_trip(
    cache: &dyn BalanceCache,
    bucket: &Bucket,
    owner: &str,
    id: String,
) -> Duration {
    let hold = HoldSpec {
        request_id: id,
        amount: Credits::from_micros(HOLD_MICROS),
        owner: owner.to_owned(),
        deadline_ms: now_ms() + 600_000,
    };
    let start = Instant::now();
    cache
        .reserve(bucket, &hold, Credits::ZERO, &FixedSource)
        .await
        .expect("reserve");
    cache
        .release(bucket, &hold.request_id)
        .await
        .expect("release");
    start.elapsed()
}

/// Latencies (sorted) and wall time of `tasks` tasks doing `total` round trips between them,
/// task `t` on `buckets[t % buckets.len()]`.
async fn hold_case(
    cache: &Arc<dyn BalanceCache>,
    owner: &str,
    buckets: &[Bucket],
    tasks: usize,
    total: usize,
    tag: &str,
) -> (Vec<Duration>, Duration) {
    let per_task = total / tasks;
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let (cache, owner, bucket) = (
                cache.clone(),
                owner.to_owned(),
                buckets[t % buckets.len()].clone(),
            );
            let tag = format!("{tag}-{t}");
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let id = format!("{tag}-{i}");
                    latencies.push(round_trip(cache.as_ref(), &bucket, &owner, id).await);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(per_task * tasks);
    for handle in handles {
        latencies.extend(handle.await.expect("hold task"));
    }
    let elapsed = start.elapsed();
    latencies.sort();
    (latencies, elapsed)
}

/// The three hold measurements on one cache; prints a row each.
async fn hold_cases(name: &str, cache: Arc<dyn BalanceCache>, owner: &str, reservations: usize) {
    let own: Vec<Bucket> = (0..TASKS)
        .map(|t| Bucket::Account(account(&format!("hold-{t:02}"))))
        .collect();
    let shared = [Bucket::Account(account("hold-shared"))];
    // Warm-up: every bucket loaded, connections and scripts in place.
    hold_case(&cache, owner, &own, TASKS, TASKS * 20, "warm-own").await;
    hold_case(&cache, owner, &shared, TASKS, TASKS * 20, "warm-shared").await;

    let cases: [(&str, &[Bucket], usize); 3] = [
        ("1 task, 1 account", &own[..1], 1),
        ("32 tasks, 32 accounts", &own, TASKS),
        ("32 tasks, 1 shared account", &shared, TASKS),
    ];
    for (case, buckets, tasks) in cases {
        let (latencies, elapsed) =
            hold_case(&cache, owner, buckets, tasks, reservations, case).await;
        println!(
            "{name:<6} {case:<27} {:>6} {:>10} {:>9} {:>9} {:>9}",
            latencies.len(),
            per_second(latencies.len(), elapsed),
            micros(percentile(&latencies, 50)),
            micros(percentile(&latencies, 99)),
            micros(latencies[latencies.len() - 1]),
        );
    }
    for bucket in own.iter().chain(&shared) {
        let view = cache.view(bucket, &FixedSource).await.expect("view");
        assert_eq!(view.held, Credits::ZERO, "a hold was left behind");
    }
}

async fn run(database: String, prefix: String) {
    let settlements = env_or("SETTLEMENTS", 5120).max(512);
    let reservations = env_or("RESERVATIONS", 10_240).max(TASKS * 10);
    println!("load average at start: {}", load_average());

    // Part 1: settlements into MariaDB.
    let ledger = Arc::new(
        MySqlLedger::connect(&format!("{MYSQL_SERVER}/{database}"), POOL)
            .await
            .expect("connect to the bench database"),
    );
    ledger.migrate().await.expect("migrate");
    let busy = vec![account("busy")];
    let many: Vec<AccountId> = (0..ACCOUNTS)
        .map(|i| account(&format!("acct-{i:04}")))
        .collect();
    let started = Instant::now();
    let everyone: Arc<Vec<AccountId>> = Arc::new(busy.iter().chain(&many).cloned().collect());
    let next = Arc::new(AtomicUsize::new(0));
    let granters: Vec<_> = (0..4)
        .map(|_| {
            let (ledger, everyone, next) = (ledger.clone(), everyone.clone(), next.clone());
            tokio::spawn(async move {
                while let Some(account) = everyone.get(next.fetch_add(1, Ordering::Relaxed)) {
                    ledger
                        .grant(&GrantRequest {
                            account: account.clone(),
                            entry_type: EntryType::Bonus,
                            amount: Credits::from_whole(GRANT).expect("amount"),
                            description: "benchmark".into(),
                            reference: Some("bench-grant".into()),
                            expires_at_ms: None,
                            draw_first_from: Vec::new(),
                        })
                        .await
                        .expect("grant");
                }
            })
        })
        .collect();
    for granter in granters {
        granter.await.expect("granter");
    }
    println!(
        "granted {GRANT} credits to {} accounts in {} ms",
        everyone.len(),
        started.elapsed().as_millis()
    );

    let mut spent: HashMap<AccountId, i128> = HashMap::new();
    // Warm-up (not reported): every pooled connection opened, the tables' pages in memory.
    settle_case(&ledger, &many, 1024, 16, 4, &mut spent).await;

    println!();
    println!("settle_batch into MariaDB, {settlements} settlements per case");
    println!(
        "{:<12} {:>5} {:>7} {:>6} {:>10} {:>13}",
        "accounts", "batch", "writers", "n", "time ms", "settlements/s"
    );
    for (label, accounts) in [("1 busy", &busy), ("1000", &many)] {
        for batch in BATCH_SIZES {
            for writers in WRITERS {
                let elapsed =
                    settle_case(&ledger, accounts, settlements, batch, writers, &mut spent).await;
                println!(
                    "{label:<12} {batch:>5} {writers:>7} {settlements:>6} {:>10} {:>13}",
                    elapsed.as_millis(),
                    per_second(settlements, elapsed)
                );
            }
        }
    }

    let started = Instant::now();
    let problems = ledger.verify(Credits::ZERO).await.expect("verify");
    assert!(problems.is_empty(), "ledger inconsistent: {problems:?}");
    let grant = i128::from(Credits::from_whole(GRANT).expect("amount").micros());
    for account in everyone.iter() {
        let record = ledger
            .account(account)
            .await
            .expect("account")
            .expect("account exists");
        let expected = grant - spent.get(account).copied().unwrap_or(0);
        assert_eq!(
            i128::from(record.balance.micros()),
            expected,
            "balance of {account}"
        );
    }
    println!(
        "verify: no problems; {} balances = grant - summed costs (checked in {} ms)",
        everyone.len(),
        started.elapsed().as_millis()
    );
    ledger.close().await;

    // Parts 2 and 3: hold round trips.
    println!();
    println!(
        "hold round trips (reserve + release), {reservations} per case, fixed snapshot source; \
         latencies in us"
    );
    println!(
        "{:<6} {:<27} {:>6} {:>10} {:>9} {:>9} {:>9}",
        "cache", "case", "n", "trips/s", "p50", "p99", "max"
    );
    let instance = format!("{prefix}-instance");
    let redis = Arc::new(
        RedisCache::connect(REDIS_URL, &prefix, &instance)
            .await
            .expect("Redis on 127.0.0.1:6379"),
    );
    hold_cases("redis", redis.clone(), &instance, reservations).await;
    redis.stop().await;
    drop(redis);
    hold_cases(
        "local",
        Arc::new(LocalCache::new()),
        &instance,
        reservations,
    )
    .await;
    println!();
    println!("load average at end: {}", load_average());
}

async fn drop_database(name: &str) {
    let mut admin = MySqlConnection::connect(&format!("{MYSQL_SERVER}/test"))
        .await
        .expect("MariaDB on 127.0.0.1:3306");
    // Connections left open by a failed run would block the drop.
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT CAST(id AS SIGNED) FROM information_schema.processlist WHERE db = ?",
    )
    .bind(name)
    .fetch_all(&mut admin)
    .await
    .expect("processlist");
    for id in ids {
        let _ = sqlx::query(AssertSqlSafe(format!("KILL {id}")))
            .execute(&mut admin)
            .await;
    }
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`")))
        .execute(&mut admin)
        .await
        .expect("drop the bench database");
    let _ = admin.close().await;
}

/// Deletes every key under `prefix`; returns how many.
async fn delete_keys(prefix: &str) -> usize {
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379");
    let mut deleted = 0;
    for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            if !keys.is_empty() {
                let _: usize = redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("del");
                deleted += keys.len();
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    deleted
}

#[tokio::main]
async fn main() {
    let name = format!(
        "tg_bench_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut admin = MySqlConnection::connect(&format!("{MYSQL_SERVER}/test"))
        .await
        .expect("MariaDB on 127.0.0.1:3306");
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
        .execute(&mut admin)
        .await
        .expect("create the bench database");
    let _ = admin.close().await;
    println!("database and key prefix: {name}");

    // The run is its own task so that a failure still reaches the clean-up below.
    let outcome = tokio::spawn(run(name.clone(), name.clone())).await;
    drop_database(&name).await;
    let deleted = delete_keys(&name).await;
    println!("cleaned up: dropped database {name}, deleted {deleted} Redis keys");
    if let Err(error) = outcome {
        match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("bench task: {error}"),
        }
    }
}
