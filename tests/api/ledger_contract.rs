//! The ledger contract: one set of checks, each run against both adapters (a fresh SQLite file
//! and a fresh MariaDB/MySQL database), so the two behave the same (DESIGN.md I2, I3).
//!
//! Each test `NAME` is a module with two tests, `NAME::sqlite` and `NAME::mysql`. The MySQL
//! half creates its own database `tg_<random hex>` on `TOLLGATE_TEST_MYSQL_URL` (default
//! `mysql://root@127.0.0.1:3306/test`, the CI machine's MariaDB) and drops it afterwards, so
//! tests run in parallel without sharing state and leave nothing behind.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{AssertSqlSafe, Connection, MySqlConnection, MySqlPool, SqlitePool};
use tempfile::TempDir;
use tollgate::domain::{AccountId, Credits, RequestId, TokenUsage};
use tollgate::ledger::mysql::MySqlLedger;
use tollgate::ledger::sqlite::SqliteLedger;
use tollgate::ledger::{
    ApiKeyRecord, Bucket, EntryType, GrantRequest, Ledger, LedgerError, Page, Settlement,
    UsageSource, now_ms,
};

const DEFAULT_MYSQL_URL: &str = "mysql://root@127.0.0.1:3306/test";

/// A fresh ledger of one backend, a raw connection to the same database (to tamper with it
/// behind the adapter's back), and what removes the database afterwards.
pub struct Fixture {
    pub ledger: Arc<dyn Ledger>,
    raw: Raw,
    mysql: Option<Arc<MySqlLedger>>,
    // Declared last: dropped after the pools above.
    _dir: Option<TempDir>,
    _database: Option<DropDatabase>,
}

enum Raw {
    Sqlite(SqlitePool),
    MySql(MySqlPool),
}

impl Fixture {
    pub async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let ledger = SqliteLedger::connect(&url, 8).await.expect("open sqlite");
        ledger.migrate().await.expect("migrate sqlite");
        let raw = SqlitePool::connect(&url).await.expect("raw sqlite pool");
        Fixture {
            ledger: Arc::new(ledger),
            raw: Raw::Sqlite(raw),
            mysql: None,
            _dir: Some(dir),
            _database: None,
        }
    }

    pub async fn mysql() -> Fixture {
        let admin_url =
            std::env::var("TOLLGATE_TEST_MYSQL_URL").unwrap_or_else(|_| DEFAULT_MYSQL_URL.into());
        let name = format!("tg_{}", uuid::Uuid::new_v4().simple());
        let mut admin = MySqlConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!("MariaDB/MySQL at {admin_url} (TOLLGATE_TEST_MYSQL_URL): {e}")
            });
        // The server's default character set on purpose: the migration must not depend on it.
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE `{name}`")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let cleanup = DropDatabase {
            admin_url: admin_url.clone(),
            name: name.clone(),
        };
        let (base, _) = admin_url
            .rsplit_once('/')
            .expect("the MySQL URL names a database");
        let url = format!("{base}/{name}");
        let ledger = Arc::new(MySqlLedger::connect(&url, 8).await.expect("open mysql"));
        ledger.migrate().await.expect("migrate mysql");
        let raw = MySqlPool::connect(&url).await.expect("raw mysql pool");
        Fixture {
            ledger: ledger.clone(),
            raw: Raw::MySql(raw),
            mysql: Some(ledger),
            _dir: None,
            _database: Some(cleanup),
        }
    }

    /// Runs `sql` with one bound string, bypassing the adapter.
    pub async fn raw_execute(&self, sql: &'static str, value: &str) {
        match &self.raw {
            Raw::Sqlite(pool) => {
                sqlx::query(sql)
                    .bind(value)
                    .execute(pool)
                    .await
                    .expect("raw sqlite");
            }
            Raw::MySql(pool) => {
                sqlx::query(sql)
                    .bind(value)
                    .execute(pool)
                    .await
                    .expect("raw mysql");
            }
        }
    }

    /// Closes the pools, so the database is dropped with no connection left on it.
    pub async fn close(self) {
        match &self.raw {
            Raw::Sqlite(pool) => pool.close().await,
            Raw::MySql(pool) => pool.close().await,
        }
        if let Some(ledger) = &self.mysql {
            ledger.close().await;
        }
    }
}

/// Drops a test database. Drop cannot await, so it runs on its own thread with its own small
/// runtime; it first kills what a failed test may have left connected (an open transaction would
/// make `DROP DATABASE` wait for its locks).
struct DropDatabase {
    admin_url: String,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let (url, name) = (self.admin_url.clone(), self.name.clone());
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(async {
                    let mut conn = MySqlConnection::connect(&url).await?;
                    let leftovers: Vec<u64> = sqlx::query_scalar(
                        "SELECT id FROM information_schema.processlist \
                         WHERE db = ? AND id <> CONNECTION_ID()",
                    )
                    .bind(&name)
                    .fetch_all(&mut conn)
                    .await?;
                    for id in leftovers {
                        let _ = sqlx::query(AssertSqlSafe(format!("KILL {id}")))
                            .execute(&mut conn)
                            .await;
                    }
                    sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{name}`")))
                        .execute(&mut conn)
                        .await?;
                    conn.close().await
                })
                .map_err(|e| e.to_string())
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("could not drop test database {}: {error}", self.name),
            Err(_) => eprintln!("dropping test database {} panicked", self.name),
        }
    }
}

/// Declares a contract test: a module holding the body once and a `sqlite` and a `mysql` test
/// that run it. `concurrent` ones run on a multi-threaded runtime.
macro_rules! contract {
    ($name:ident, |$fx:ident| $body:block) => {
        contract!(@emit $name, [tokio::test], |$fx| $body);
    };
    (concurrent $name:ident, |$fx:ident| $body:block) => {
        contract!(
            @emit $name,
            [tokio::test(flavor = "multi_thread", worker_threads = 4)],
            |$fx| $body
        );
    };
    (@emit $name:ident, [$($runtime:tt)*], |$fx:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn check($fx: &Fixture) $body

            #[$($runtime)*]
            async fn sqlite() {
                let fixture = Fixture::sqlite().await;
                check(&fixture).await;
                fixture.close().await;
            }

            #[$($runtime)*]
            async fn mysql() {
                let fixture = Fixture::mysql().await;
                check(&fixture).await;
                fixture.close().await;
            }
        }
    };
}

fn account(id: &str) -> AccountId {
    AccountId::parse(id).expect("valid account id")
}

fn micros(amount: i64) -> Credits {
    Credits::from_micros(amount)
}

fn grant(id: &str, entry_type: EntryType, amount: i64, reference: Option<&str>) -> GrantRequest {
    GrantRequest {
        account: account(id),
        entry_type,
        amount: micros(amount),
        description: format!("{} of {amount}", entry_type.as_str()),
        reference: reference.map(str::to_owned),
        expires_at_ms: None,
    }
}

fn settlement(request_id: &str, id: &str, cost: i64, key: Option<&str>) -> Settlement {
    let now = now_ms();
    Settlement {
        request_id: RequestId::from_string(request_id.to_owned()),
        account: account(id),
        api_key_id: key.map(str::to_owned),
        endpoint: "chat/completions".into(),
        model: "mock-1".into(),
        upstream: "fake".into(),
        usage: TokenUsage {
            prompt_tokens: 10,
            completion_tokens: 20,
            cached_tokens: 3,
        },
        source: UsageSource::Reported,
        cost: micros(cost),
        hold: micros(cost + 5),
        stream: true,
        status: "completed".into(),
        started_at_ms: now - 100,
        finished_at_ms: now,
    }
}

fn api_key(id: &str, owner: &str, limit: Option<i64>) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.to_owned(),
        account: account(owner),
        key_hash: format!("hash-of-{id}"),
        prefix: format!("tg_{id}"),
        name: format!("key {id}"),
        spend_limit: limit.map(micros),
        spent: Credits::ZERO,
        allowed_models: Some(vec!["mock-*".into(), "gpt-4o".into()]),
        created_at_ms: now_ms(),
        revoked_at_ms: None,
    }
}

fn first_page(limit: u32) -> Page {
    Page {
        limit,
        before: None,
    }
}

async fn balance(fx: &Fixture, id: &str) -> i64 {
    fx.ledger
        .account(&account(id))
        .await
        .expect("read account")
        .unwrap_or_else(|| panic!("account {id} exists"))
        .balance
        .micros()
}

async fn assert_consistent(fx: &Fixture) {
    let problems = fx.ledger.verify().await.expect("verify");
    assert!(problems.is_empty(), "ledger problems: {problems:?}");
}

contract!(migrating_twice_is_a_no_op, |fx| {
    fx.ledger
        .grant(&grant("m", EntryType::Purchase, 42, Some("o-1")))
        .await
        .expect("grant");
    fx.ledger.migrate().await.expect("second migrate");
    fx.ledger.migrate().await.expect("third migrate");
    assert_eq!(fx.ledger.cache_epoch().await.expect("epoch"), 0);
    assert_eq!(balance(fx, "m").await, 42);
    fx.ledger.ping().await.expect("ping");
});

contract!(concurrent ensure_account_grants_signup_once, |fx| {
    let alice = account("alice");
    let first = fx
        .ledger
        .ensure_account(&alice, micros(5_000_000))
        .await
        .expect("ensure");
    assert_eq!((first.balance.micros(), first.rev), (5_000_000, 1));
    let again = fx
        .ledger
        .ensure_account(&alice, micros(5_000_000))
        .await
        .expect("ensure again");
    assert_eq!(again, first);
    let entries = fx
        .ledger
        .transactions(&alice, first_page(10))
        .await
        .expect("entries");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].entry_type, EntryType::Bonus);
    assert_eq!(entries[0].reference.as_deref(), Some("signup"));
    assert_eq!(
        (entries[0].balance_before.micros(), entries[0].balance_after.micros()),
        (0, 5_000_000)
    );

    // No grant configured: the account starts empty, with no entry.
    let bob = account("bob");
    let snapshot = fx
        .ledger
        .ensure_account(&bob, Credits::ZERO)
        .await
        .expect("ensure bob");
    assert_eq!((snapshot.balance, snapshot.rev), (Credits::ZERO, 0));
    assert!(fx.ledger.transactions(&bob, first_page(10)).await.expect("entries").is_empty());

    // An account first seen through its API key was not created by ensure_account: no grant.
    fx.ledger
        .create_api_key(&api_key("k-dave", "dave", None))
        .await
        .expect("create key");
    let dave = fx
        .ledger
        .ensure_account(&account("dave"), micros(5_000_000))
        .await
        .expect("ensure dave");
    assert_eq!(dave.balance, Credits::ZERO);

    // Sixteen first sightings at once: one signup grant.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let ledger = fx.ledger.clone();
            tokio::spawn(async move { ledger.ensure_account(&account("carol"), micros(7)).await })
        })
        .collect();
    for task in tasks {
        let snapshot = task.await.expect("task").expect("ensure carol");
        assert_eq!(snapshot.balance.micros(), 7);
    }
    let entries = fx
        .ledger
        .transactions(&account("carol"), first_page(10))
        .await
        .expect("entries");
    assert_eq!(entries.len(), 1);
    assert_consistent(fx).await;
});

contract!(grants_are_idempotent_by_reference, |fx| {
    let first = fx
        .ledger
        .grant(&grant(
            "g",
            EntryType::Purchase,
            10_000_000,
            Some("order-1"),
        ))
        .await
        .expect("grant");
    assert!(first.applied);
    assert_eq!(first.snapshot.balance.micros(), 10_000_000);
    assert_eq!(first.entry.balance_before, Credits::ZERO);
    assert_eq!(first.entry.balance_after.micros(), 10_000_000);

    let replay = fx
        .ledger
        .grant(&grant(
            "g",
            EntryType::Purchase,
            10_000_000,
            Some("order-1"),
        ))
        .await
        .expect("replayed grant");
    assert!(!replay.applied);
    assert_eq!(replay.entry.id, first.entry.id);
    assert_eq!(replay.snapshot, first.snapshot);

    // The same reference under another type, or another account, is another grant.
    let bonus = fx
        .ledger
        .grant(&grant("g", EntryType::Bonus, 1, Some("order-1")))
        .await
        .expect("bonus");
    assert!(bonus.applied);
    let other = fx
        .ledger
        .grant(&grant("h", EntryType::Purchase, 3, Some("order-1")))
        .await
        .expect("other account");
    assert!(other.applied);
    // No reference: every call applies.
    for _ in 0..2 {
        let unreferenced = fx
            .ledger
            .grant(&grant("g", EntryType::Bonus, 2, None))
            .await
            .expect("unreferenced");
        assert!(unreferenced.applied);
    }
    assert_eq!(balance(fx, "g").await, 10_000_005);
    assert_eq!(balance(fx, "h").await, 3);
    let record = fx
        .ledger
        .account(&account("g"))
        .await
        .expect("account")
        .expect("exists");
    assert_eq!(record.rev, 4);
    assert_consistent(fx).await;
});

contract!(concurrent racing_grants_with_one_reference_apply_once, |fx| {
    // Half on an existing account, half on one the grants themselves create.
    fx.ledger
        .grant(&grant("race-old", EntryType::Bonus, 1, None))
        .await
        .expect("seed");
    for id in ["race-old", "race-new"] {
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let ledger = fx.ledger.clone();
                let request = grant(id, EntryType::Purchase, 1_000, Some("checkout-7"));
                tokio::spawn(async move { ledger.grant(&request).await })
            })
            .collect();
        let mut applied = 0;
        let mut entry_ids = Vec::new();
        for task in tasks {
            let outcome = task.await.expect("task").expect("grant");
            applied += usize::from(outcome.applied);
            entry_ids.push(outcome.entry.id);
        }
        assert_eq!(applied, 1, "{id}: exactly one grant applies");
        entry_ids.dedup();
        assert_eq!(entry_ids.len(), 1, "{id}: every caller sees the same entry");
    }
    assert_eq!(balance(fx, "race-old").await, 1_001);
    assert_eq!(balance(fx, "race-new").await, 1_000);
    assert_consistent(fx).await;
});

contract!(negative_adjustments_take_credits, |fx| {
    fx.ledger
        .grant(&grant("adj", EntryType::Purchase, 10_000_000, None))
        .await
        .expect("grant");
    let taken = fx
        .ledger
        .grant(&grant(
            "adj",
            EntryType::Adjustment,
            -3_000_000,
            Some("fix-1"),
        ))
        .await
        .expect("adjust");
    assert!(taken.applied);
    assert_eq!(taken.entry.amount.micros(), -3_000_000);
    assert_eq!(taken.entry.balance_before.micros(), 10_000_000);
    assert_eq!(taken.entry.balance_after.micros(), 7_000_000);
    // The ledger records what it is told; overdraft policy lives in the reservation.
    let below = fx
        .ledger
        .grant(&grant("adj", EntryType::Refund, -9_000_000, None))
        .await
        .expect("refund");
    assert_eq!(below.snapshot.balance.micros(), -2_000_000);
    assert_eq!(balance(fx, "adj").await, -2_000_000);
    assert_consistent(fx).await;
});

contract!(settle_batch_applies_each_request_once, |fx| {
    fx.ledger
        .grant(&grant("sa", EntryType::Purchase, 100, None))
        .await
        .expect("grant");
    let batch = vec![
        settlement("req-1", "sa", 3, None),
        settlement("req-2", "sb", 0, None),
        settlement("req-1", "sa", 3, None),
        settlement("req-3", "sa", 4, None),
    ];
    let outcomes = fx.ledger.settle_batch(&batch).await.expect("settle");
    let applied: Vec<bool> = outcomes.iter().map(|o| o.applied).collect();
    assert_eq!(applied, [true, true, false, true]);
    let request_ids: Vec<&str> = outcomes.iter().map(|o| o.request_id.as_str()).collect();
    assert_eq!(request_ids, ["req-1", "req-2", "req-1", "req-3"]);
    // Every outcome carries the balance after the whole batch; the balance moved once (rev 1 → 2).
    for outcome in [&outcomes[0], &outcomes[2], &outcomes[3]] {
        assert_eq!(
            (outcome.account.balance.micros(), outcome.account.rev),
            (93, 2)
        );
    }
    assert_eq!(
        (outcomes[1].account.balance, outcomes[1].account.rev),
        (Credits::ZERO, 1)
    );
    assert!(outcomes.iter().all(|o| o.key_limit.is_none()));

    let entries = fx
        .ledger
        .transactions(&account("sa"), first_page(10))
        .await
        .expect("entries");
    let chain: Vec<(i64, i64, i64, Option<&str>)> = entries
        .iter()
        .map(|e| {
            (
                e.amount.micros(),
                e.balance_before.micros(),
                e.balance_after.micros(),
                e.reference.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        chain,
        [
            (-4, 97, 93, Some("req-3")),
            (-3, 100, 97, Some("req-1")),
            (100, 0, 100, None),
        ]
    );
    assert!(
        entries[..2]
            .iter()
            .all(|e| e.entry_type == EntryType::Usage)
    );
    assert_eq!(
        entries[0].description,
        "chat/completions mock-1: 10 prompt + 20 completion tokens (reported)"
    );
    // Zero cost: a usage record, no ledger entry; the account exists.
    assert!(
        fx.ledger
            .transactions(&account("sb"), first_page(10))
            .await
            .expect("entries")
            .is_empty()
    );
    let usage = fx
        .ledger
        .usage(&account("sb"), first_page(10))
        .await
        .expect("usage");
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].cost, Credits::ZERO);
    let usage = fx
        .ledger
        .usage(&account("sa"), first_page(10))
        .await
        .expect("usage");
    let ids: Vec<&str> = usage.iter().map(|u| u.request_id.as_str()).collect();
    assert_eq!(ids, ["req-3", "req-1"]);
    let record = &usage[1];
    assert_eq!(
        (
            record.prompt_tokens,
            record.completion_tokens,
            record.cached_tokens
        ),
        (10, 20, 3)
    );
    assert_eq!((record.cost.micros(), record.hold.micros()), (3, 8));
    assert_eq!(
        (
            record.endpoint.as_str(),
            record.model.as_str(),
            record.upstream.as_str()
        ),
        ("chat/completions", "mock-1", "fake")
    );
    assert_eq!(
        (record.source.as_str(), record.status.as_str()),
        ("reported", "completed")
    );
    assert!(record.stream);
    assert!(record.api_key_id.is_none());

    // A replay of the batch with one new request: only the new one applies.
    let replay = vec![
        settlement("req-3", "sa", 4, None),
        settlement("req-4", "sa", 1, None),
        settlement("req-1", "sa", 3, None),
    ];
    let outcomes = fx.ledger.settle_batch(&replay).await.expect("replay");
    let applied: Vec<bool> = outcomes.iter().map(|o| o.applied).collect();
    assert_eq!(applied, [false, true, false]);
    assert!(outcomes.iter().all(|o| o.account.balance.micros() == 92));
    // A batch of replays only changes nothing, not even the revision.
    let outcomes = fx
        .ledger
        .settle_batch(&replay[..1])
        .await
        .expect("pure replay");
    assert!(!outcomes[0].applied);
    assert_eq!(
        (
            outcomes[0].account.balance.micros(),
            outcomes[0].account.rev
        ),
        (92, 3)
    );
    assert!(
        fx.ledger
            .settle_batch(&[])
            .await
            .expect("empty batch")
            .is_empty()
    );
    assert_eq!(balance(fx, "sa").await, 92);
    assert_consistent(fx).await;
});

contract!(concurrent concurrent_settle_batches_add_up, |fx| {
    const TASKS: usize = 8;
    const PER_TASK: usize = 50;
    const BATCH: usize = 10;
    let accounts = ["cc-0", "cc-1", "cc-2"];
    for id in accounts {
        fx.ledger
            .grant(&grant(id, EntryType::Purchase, 1_000_000, None))
            .await
            .expect("fund");
    }
    fx.ledger
        .create_api_key(&api_key("cc-key", "cc-0", Some(500_000)))
        .await
        .expect("key");
    let plan = |task: usize, i: usize| {
        let n = task * PER_TASK + i;
        let owner = accounts[(task + i) % accounts.len()];
        let key = (owner == "cc-0").then_some("cc-key");
        settlement(&format!("cc-{task}-{i}"), owner, 1 + (n % 7) as i64, key)
    };
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let ledger = fx.ledger.clone();
            let settlements: Vec<Settlement> = (0..PER_TASK).map(|i| plan(task, i)).collect();
            tokio::spawn(async move {
                for batch in settlements.chunks(BATCH) {
                    let outcomes = ledger.settle_batch(batch).await.expect("settle");
                    assert!(outcomes.iter().all(|o| o.applied));
                }
                // Replaying a batch (a retry after a lost reply) changes nothing.
                let outcomes = ledger
                    .settle_batch(&settlements[..BATCH])
                    .await
                    .expect("replay");
                assert!(outcomes.iter().all(|o| !o.applied));
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let mut expected: HashMap<&str, i64> = accounts.iter().map(|id| (*id, 1_000_000)).collect();
    let mut key_spent = 0;
    for task in 0..TASKS {
        for i in 0..PER_TASK {
            let s = plan(task, i);
            let owner = accounts[(task + i) % accounts.len()];
            *expected.get_mut(owner).expect("known account") -= s.cost.micros();
            if s.api_key_id.is_some() {
                key_spent += s.cost.micros();
            }
        }
    }
    let mut usage_count = 0;
    for id in accounts {
        assert_eq!(balance(fx, id).await, expected[id], "balance of {id}");
        usage_count += fx
            .ledger
            .usage(&account(id), first_page(1_000))
            .await
            .expect("usage")
            .len();
    }
    assert_eq!(usage_count, TASKS * PER_TASK);
    let key = fx
        .ledger
        .api_key_by_hash("hash-of-cc-key")
        .await
        .expect("key")
        .expect("exists");
    assert_eq!(key.spent.micros(), key_spent);
    assert_consistent(fx).await;
});

contract!(settlements_track_key_spend, |fx| {
    fx.ledger
        .grant(&grant("kk", EntryType::Purchase, 1_000_000, None))
        .await
        .expect("grant");
    fx.ledger
        .create_api_key(&api_key("k-limited", "kk", Some(100_000)))
        .await
        .expect("limited key");
    fx.ledger
        .create_api_key(&api_key("k-open", "kk", None))
        .await
        .expect("open key");
    let batch = vec![
        settlement("kr-1", "kk", 30_000, Some("k-limited")),
        settlement("kr-2", "kk", 20_000, Some("k-open")),
        settlement("kr-3", "kk", 0, Some("k-limited")),
        settlement("kr-4", "kk", 5_000, Some("k-limited")),
        settlement("kr-5", "kk", 1_000, Some("k-ghost")),
    ];
    let outcomes = fx.ledger.settle_batch(&batch).await.expect("settle");
    assert!(outcomes.iter().all(|o| o.applied));
    let limited = outcomes[0]
        .key_limit
        .expect("limited key reports its remaining spend");
    assert_eq!((limited.balance.micros(), limited.rev), (65_000, 1));
    assert_eq!(outcomes[2].key_limit, Some(limited));
    assert_eq!(outcomes[3].key_limit, Some(limited));
    assert_eq!(outcomes[1].key_limit, None, "no limit, no snapshot");
    assert_eq!(outcomes[4].key_limit, None, "unknown key");
    assert_eq!(outcomes[0].account.balance.micros(), 944_000);

    let key = fx
        .ledger
        .api_key_by_hash("hash-of-k-limited")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(key.spent.micros(), 35_000);
    let open = fx
        .ledger
        .api_key_by_hash("hash-of-k-open")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(open.spent.micros(), 20_000);
    let snapshot = fx
        .ledger
        .snapshot(&Bucket::KeyLimit("k-limited".into()), Credits::ZERO)
        .await
        .expect("key snapshot");
    assert_eq!((snapshot.balance.micros(), snapshot.rev), (65_000, 1));
    let unlimited = fx
        .ledger
        .snapshot(&Bucket::KeyLimit("k-open".into()), Credits::ZERO)
        .await
        .expect("open key snapshot");
    assert_eq!(unlimited.balance.micros(), i64::MAX - 20_000);
    assert!(matches!(
        fx.ledger
            .snapshot(&Bucket::KeyLimit("k-ghost".into()), Credits::ZERO)
            .await,
        Err(LedgerError::Corrupt(_))
    ));

    // A replay does not count twice.
    let outcomes = fx.ledger.settle_batch(&batch[..1]).await.expect("replay");
    assert!(!outcomes[0].applied);
    assert_eq!(outcomes[0].key_limit, Some(limited));
    let usage = fx
        .ledger
        .usage(&account("kk"), first_page(10))
        .await
        .expect("usage");
    assert_eq!(usage.len(), 5);
    assert_eq!(usage[4].api_key_id.as_deref(), Some("k-limited"));
    assert_consistent(fx).await;
});

contract!(transactions_and_usage_page_newest_first, |fx| {
    let mut ids = Vec::new();
    for n in 0..5 {
        let reference = format!("g{n}");
        let outcome = fx
            .ledger
            .grant(&grant("pg", EntryType::Purchase, n + 1, Some(&reference)))
            .await
            .expect("grant");
        ids.push(outcome.entry.id);
    }
    // Another account's entries never show up.
    fx.ledger
        .grant(&grant("pg-other", EntryType::Purchase, 9, None))
        .await
        .expect("other");
    let pg = account("pg");
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = fx
            .ledger
            .transactions(&pg, Page { limit: 2, before })
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2);
        before = page.last().map(|e| e.id);
        seen.extend(page.iter().map(|e| (e.id, e.reference.clone())));
    }
    let expected: Vec<(i64, Option<String>)> = ids
        .iter()
        .enumerate()
        .rev()
        .map(|(n, id)| (*id, Some(format!("g{n}"))))
        .collect();
    assert_eq!(seen, expected);

    for batch in [0..3, 3..5] {
        let settlements: Vec<Settlement> = batch
            .map(|n| settlement(&format!("pu-{n}"), "pg", 1, None))
            .collect();
        fx.ledger.settle_batch(&settlements).await.expect("settle");
    }
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = fx
            .ledger
            .usage(&pg, Page { limit: 2, before })
            .await
            .expect("usage page");
        if page.is_empty() {
            break;
        }
        before = page.last().map(|u| u.cursor);
        seen.extend(page.iter().map(|u| (u.cursor, u.request_id.clone())));
    }
    let request_ids: Vec<&str> = seen.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(request_ids, ["pu-4", "pu-3", "pu-2", "pu-1", "pu-0"]);
    assert!(seen.windows(2).all(|w| w[0].0 > w[1].0), "cursors decrease");
    let first = fx
        .ledger
        .usage(&pg, first_page(1))
        .await
        .expect("first page");
    assert_eq!(first.len(), 1);
    assert!(first[0].settled_at_ms > 0);
});

contract!(api_keys_are_listed_and_revoked, |fx| {
    let key = api_key("k-rev", "rk", Some(1_000));
    fx.ledger.create_api_key(&key).await.expect("create");
    let mut second = api_key("k-rev-2", "rk", None);
    second.allowed_models = None;
    fx.ledger
        .create_api_key(&second)
        .await
        .expect("create second");
    // The same hash again is refused, not a second key.
    let mut clash = api_key("k-rev-3", "rk", None);
    clash.key_hash = key.key_hash.clone();
    assert!(fx.ledger.create_api_key(&clash).await.is_err());

    let found = fx
        .ledger
        .api_key_by_hash("hash-of-k-rev")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!(found.id, "k-rev");
    assert_eq!(found.account, account("rk"));
    assert_eq!(
        (found.prefix.as_str(), found.name.as_str()),
        ("tg_k-rev", "key k-rev")
    );
    assert_eq!(found.spend_limit, Some(micros(1_000)));
    assert_eq!(found.spent, Credits::ZERO);
    assert_eq!(found.allowed_models, key.allowed_models);
    assert_eq!(found.created_at_ms, key.created_at_ms);
    assert!(!found.is_revoked());
    assert!(
        fx.ledger
            .api_key_by_hash("no-such-hash")
            .await
            .expect("read")
            .is_none()
    );

    assert!(fx.ledger.revoke_api_key("k-rev").await.expect("revoke"));
    assert!(
        !fx.ledger
            .revoke_api_key("k-rev")
            .await
            .expect("revoke twice")
    );
    assert!(
        !fx.ledger
            .revoke_api_key("no-such-key")
            .await
            .expect("revoke unknown")
    );
    let listed = fx.ledger.api_keys(&account("rk")).await.expect("list");
    let states: Vec<(&str, bool, bool)> = listed
        .iter()
        .map(|k| (k.id.as_str(), k.is_revoked(), k.allowed_models.is_some()))
        .collect();
    assert_eq!(states, [("k-rev", true, true), ("k-rev-2", false, false)]);
    assert!(
        fx.ledger
            .api_keys(&account("nobody"))
            .await
            .expect("list")
            .is_empty()
    );
});

contract!(cache_epoch_bumps, |fx| {
    assert_eq!(fx.ledger.cache_epoch().await.expect("epoch"), 0);
    assert_eq!(fx.ledger.bump_cache_epoch().await.expect("bump"), 1);
    assert_eq!(fx.ledger.bump_cache_epoch().await.expect("bump"), 2);
    assert_eq!(fx.ledger.cache_epoch().await.expect("epoch"), 2);
});

contract!(
    verify_names_an_account_whose_balance_was_changed_behind_its_back,
    |fx| {
        for id in ["victim", "bystander"] {
            fx.ledger
                .grant(&grant(id, EntryType::Purchase, 1_000, None))
                .await
                .expect("grant");
            fx.ledger
                .settle_batch(&[settlement(&format!("v-{id}"), id, 10, None)])
                .await
                .expect("settle");
        }
        assert_consistent(fx).await;
        fx.raw_execute(
            "UPDATE accounts SET balance = balance + 1 WHERE id = ?",
            "victim",
        )
        .await;
        let problems = fx.ledger.verify().await.expect("verify");
        assert!(!problems.is_empty());
        assert!(
            problems.iter().all(|p| p.account == "victim"),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.problem.contains("990") && p.problem.contains("991")),
            "{problems:?}"
        );
    }
);

contract!(balance_overflow_is_an_error_and_changes_nothing, |fx| {
    fx.ledger
        .grant(&grant("rich", EntryType::Purchase, i64::MAX - 10, None))
        .await
        .expect("grant near the top");
    let overflow = fx
        .ledger
        .grant(&grant("rich", EntryType::Bonus, 100, None))
        .await;
    assert!(
        matches!(overflow, Err(LedgerError::Overflow(ref id)) if id == "rich"),
        "{overflow:?}"
    );
    assert_eq!(balance(fx, "rich").await, i64::MAX - 10);

    fx.ledger
        .grant(&grant("poor", EntryType::Adjustment, i64::MIN + 5, None))
        .await
        .expect("grant near the bottom");
    fx.ledger
        .grant(&grant("fine", EntryType::Purchase, 100, None))
        .await
        .expect("grant");
    let batch = vec![
        settlement("of-1", "fine", 1, None),
        settlement("of-2", "poor", 3, None),
        settlement("of-3", "poor", 3, None),
    ];
    let overflow = fx.ledger.settle_batch(&batch).await;
    assert!(
        matches!(overflow, Err(LedgerError::Overflow(ref id)) if id == "poor"),
        "{overflow:?}"
    );
    // The whole batch was rolled back, the account that did not overflow included.
    assert_eq!(balance(fx, "fine").await, 100);
    assert_eq!(balance(fx, "poor").await, i64::MIN + 5);
    for id in ["fine", "poor"] {
        assert!(
            fx.ledger
                .usage(&account(id), first_page(10))
                .await
                .expect("usage")
                .is_empty()
        );
    }
    assert_consistent(fx).await;
});

contract!(account_ids_are_case_sensitive, |fx| {
    fx.ledger
        .grant(&grant("Alice", EntryType::Purchase, 5, Some("r")))
        .await
        .expect("grant Alice");
    let lower = fx
        .ledger
        .grant(&grant("alice", EntryType::Purchase, 7, Some("r")))
        .await
        .expect("grant alice");
    assert!(
        lower.applied,
        "a different account, so a different reference scope"
    );
    assert_eq!(balance(fx, "Alice").await, 5);
    assert_eq!(balance(fx, "alice").await, 7);
    assert!(
        fx.ledger
            .account(&account("ALICE"))
            .await
            .expect("read")
            .is_none()
    );
    // Request ids too: these are two requests.
    let outcomes = fx
        .ledger
        .settle_batch(&[
            settlement("Req-X", "alice", 1, None),
            settlement("req-x", "alice", 1, None),
        ])
        .await
        .expect("settle");
    assert!(outcomes.iter().all(|o| o.applied));
    assert_eq!(balance(fx, "alice").await, 5);
    assert_consistent(fx).await;
});
