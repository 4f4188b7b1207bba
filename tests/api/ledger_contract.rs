//! The ledger contract: one set of checks, each run against both adapters (a fresh SQLite file
//! and a fresh MariaDB/MySQL database), so the two behave the same (docs/architecture.md I2, I3).
//!
//! Each test `NAME` is a module with two tests, `NAME::sqlite` and `NAME::mysql`. The MySQL
//! half creates its own database (`tg_<random hex>`, see `helpers::unique_test_name`) on the
//! MariaDB that `helpers::mariadb` finds or starts, and drops it afterwards, so tests run in
//! parallel without sharing state and leave nothing behind. Without MariaDB the MySQL halves
//! are skipped (they fail under `CI=true`).

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, MySqlPool, SqlSafeStr, SqlitePool};
use tempfile::TempDir;
use tollgate::domain::time::now_ms;
use tollgate::domain::{AccountId, Credits, RequestId, TokenUsage};
use tollgate::ledger::mysql::MySqlLedger;
use tollgate::ledger::sqlite::SqliteLedger;
use tollgate::ledger::{
    ApiKeyRecord, Bucket, EntryType, GrantRecord, GrantRequest, InFlight, Ledger, LedgerEntry,
    LedgerError, NothingInFlight, Page, SetAside, Settlement, UsageSource,
};

use crate::helpers::{
    Service, create_test_database, drop_test_database, mariadb, run_test, services,
};

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
        Self::sqlite_at(true).await
    }

    pub async fn mysql() -> Fixture {
        Self::mysql_at(true).await
    }

    /// A fresh database with only the first migration applied (the schema from before grants).
    pub async fn sqlite_v1() -> Fixture {
        let fx = Self::sqlite_at(false).await;
        fx.migrate_to_v1().await;
        fx
    }

    pub async fn mysql_v1() -> Fixture {
        let fx = Self::mysql_at(false).await;
        fx.migrate_to_v1().await;
        fx
    }

    async fn migrate_to_v1(&self) {
        // The adapters' first migration exactly (same version and checksum), alone.
        let v1 = |sql: &'static str| {
            Migrator::with_migrations(vec![Migration::new(
                1,
                "ledger".into(),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )])
        };
        match &self.raw {
            Raw::Sqlite(pool) => v1(include_str!("../../migrations/sqlite/0001_ledger.sql"))
                .run(pool)
                .await
                .expect("sqlite v1"),
            Raw::MySql(pool) => v1(include_str!("../../migrations/mysql/0001_ledger.sql"))
                .run(pool)
                .await
                .expect("mysql v1"),
        }
    }

    async fn sqlite_at(migrate: bool) -> Fixture {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("ledger.db").display());
        let ledger = SqliteLedger::connect(&url, 8).await.expect("open sqlite");
        if migrate {
            ledger.migrate().await.expect("migrate sqlite");
        }
        let raw = SqlitePool::connect(&url).await.expect("raw sqlite pool");
        Fixture {
            ledger: Arc::new(ledger),
            raw: Raw::Sqlite(raw),
            mysql: None,
            _dir: Some(dir),
            _database: None,
        }
    }

    async fn mysql_at(migrate: bool) -> Fixture {
        let server = &mariadb()
            .expect("the mysql half checks for MariaDB first")
            .server;
        let name = create_test_database(server).await;
        let cleanup = DropDatabase {
            server: server.clone(),
            name: name.clone(),
        };
        let url = format!("{server}/{name}");
        let ledger = Arc::new(MySqlLedger::connect(&url, 8).await.expect("open mysql"));
        if migrate {
            ledger.migrate().await.expect("migrate mysql");
        }
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

    /// Runs `sql` (any number of statements, no parameters), bypassing the adapter.
    pub async fn raw_script(&self, sql: &str) {
        let sql = AssertSqlSafe(sql.to_owned());
        match &self.raw {
            Raw::Sqlite(pool) => {
                sqlx::raw_sql(sql).execute(pool).await.expect("raw sqlite");
            }
            Raw::MySql(pool) => {
                sqlx::raw_sql(sql).execute(pool).await.expect("raw mysql");
            }
        }
    }

    /// The number of rows `sql` returns, bypassing the adapter.
    pub async fn raw_rows(&self, sql: &'static str) -> usize {
        match &self.raw {
            Raw::Sqlite(pool) => sqlx::query(sql)
                .fetch_all(pool)
                .await
                .expect("raw sqlite")
                .len(),
            Raw::MySql(pool) => sqlx::query(sql)
                .fetch_all(pool)
                .await
                .expect("raw mysql")
                .len(),
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

/// Drops a test database (with `helpers::drop_test_database`), and fails the test if it cannot.
struct DropDatabase {
    server: String,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        if let Err(error) = drop_test_database(&self.server, &self.name) {
            // A second panic while the test is failing already would abort the binary.
            if std::thread::panicking() {
                eprintln!("{error}");
            } else {
                panic!("{error}");
            }
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
            (sqlite, mysql),
            |$fx| $body
        );
    };
    // On a database that has only the first migration: the body runs the rest.
    (v1 $name:ident, |$fx:ident| $body:block) => {
        contract!(@emit $name, [tokio::test], (sqlite_v1, mysql_v1), |$fx| $body);
    };
    (@emit $name:ident, [$($runtime:tt)*], |$fx:ident| $body:block) => {
        contract!(@emit $name, [$($runtime)*], (sqlite, mysql), |$fx| $body);
    };
    (@emit $name:ident, [$($runtime:tt)*], ($sqlite:ident, $mysql:ident), |$fx:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn check($fx: &Fixture) $body

            #[$($runtime)*]
            async fn sqlite() {
                run_test(async || {
                    let fixture = Fixture::$sqlite().await;
                    check(&fixture).await;
                    fixture.close().await;
                })
                .await;
            }

            #[$($runtime)*]
            async fn mysql() {
                if !services(&[Service::MariaDb]) {
                    return;
                }
                run_test(async || {
                    let fixture = Fixture::$mysql().await;
                    check(&fixture).await;
                    fixture.close().await;
                })
                .await;
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
        draw_first_from: Vec::new(),
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
        uncharged: Credits::ZERO,
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
    assert_consistent_within(fx, 0).await;
}

/// Consistent with a balance floor of `-overdraft` micro-credits: for scenarios that run into
/// debt through the ledger on purpose, as a gateway with that overdraft could have let them.
async fn assert_consistent_within(fx: &Fixture, overdraft: i64) {
    let problems = fx.ledger.verify(micros(overdraft)).await.expect("verify");
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

// A batch bigger than one statement's share (each adapter writes a batch with one multi-row
// statement per table per 256 rows): every row of every share is written, once.
contract!(
    a_batch_spanning_many_statements_settles_every_row_once,
    |fx| {
        const ACCOUNTS: usize = 300;
        let id = |n: usize| format!("big-{n}");
        for n in 0..ACCOUNTS {
            // Two grants each, so a charge of 15 draws from both: over 256 draws per batch.
            for amount in [10, 1_000] {
                let mut request = grant(&id(n), EntryType::Purchase, amount, None);
                request.expires_at_ms = (amount == 10).then(|| now_ms() + 3_600_000);
                fx.ledger.grant(&request).await.expect("grant");
            }
        }
        fx.ledger
            .create_api_key(&api_key("big-key", "big-0", Some(1_000_000)))
            .await
            .expect("key");
        let mut batch = Vec::new();
        for n in 0..ACCOUNTS {
            let key = (n % 2 == 0).then_some("big-key");
            batch.push(settlement(&format!("big-a-{n}"), &id(n), 15, key));
            batch.push(settlement(&format!("big-b-{n}"), &id(n), 1, None));
        }
        // A repeat inside the batch and a new account among them.
        batch.push(settlement("big-a-7", &id(7), 15, None));
        batch.push(settlement("big-new", "big-new", 0, None));
        let outcomes = fx.ledger.settle_batch(&batch).await.expect("settle");
        assert_eq!(outcomes.len(), 2 * ACCOUNTS + 2);
        assert_eq!(outcomes.iter().filter(|o| !o.applied).count(), 1);
        for n in 0..ACCOUNTS {
            assert_eq!(
                balance(fx, &id(n)).await,
                1_010 - 16,
                "balance of {}",
                id(n)
            );
        }
        // Each first charge emptied the expiring grant and took 5 from the other; the second, 1.
        for n in [0, ACCOUNTS / 2, ACCOUNTS - 1] {
            assert_eq!(remainders(fx, &id(n)).await, [(0, 0), (994, 0)]);
        }
        let first = usage_entry(fx, "big-a-299", &id(ACCOUNTS - 1)).await;
        let draws = draws_of(fx, first.id).await;
        assert_eq!(draws.iter().map(|(_, amount)| amount).sum::<i64>(), 15);
        assert_eq!(draws.len(), 2);
        let key = fx
            .ledger
            .api_key_by_hash("hash-of-big-key")
            .await
            .expect("key")
            .expect("exists");
        assert_eq!(key.spent.micros(), 15 * (ACCOUNTS as i64 / 2));
        assert_eq!(balance(fx, "big-new").await, 0);
        assert_consistent(fx).await;
    }
);

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
        let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
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

// ---- Credit grants (src/ledger/grants.rs): drawing order, debt, expiry. ----

const HOUR_MS: i64 = 3_600_000;

fn expiring(
    id: &str,
    entry_type: EntryType,
    amount: i64,
    expires_at_ms: Option<i64>,
) -> GrantRequest {
    GrantRequest {
        expires_at_ms,
        ..grant(id, entry_type, amount, None)
    }
}

/// Applies a grant and returns its `credit_grants` row (the newest of the account).
async fn add_grant(fx: &Fixture, request: &GrantRequest) -> GrantRecord {
    let outcome = fx.ledger.grant(request).await.expect("grant");
    assert!(outcome.applied);
    let grants = grants_of(fx, request.account.as_str()).await;
    let record = grants.last().expect("the grant has a row").clone();
    assert_eq!(record.transaction_id, Some(outcome.entry.id));
    assert_eq!(record.source, request.entry_type.as_str());
    assert_eq!(record.amount, request.amount);
    assert_eq!(record.expires_at_ms, request.expires_at_ms);
    assert_eq!(record.expired_at_ms, None);
    record
}

async fn grants_of(fx: &Fixture, id: &str) -> Vec<GrantRecord> {
    fx.ledger.grants(&account(id)).await.expect("grants")
}

/// `(remaining, debt_paid)` of each of the account's grants, oldest first.
async fn remainders(fx: &Fixture, id: &str) -> Vec<(i64, i64)> {
    grants_of(fx, id)
        .await
        .iter()
        .map(|g| (g.remaining.micros(), g.debt_paid.micros()))
        .collect()
}

async fn entries_of(fx: &Fixture, id: &str) -> Vec<LedgerEntry> {
    fx.ledger
        .transactions(&account(id), first_page(1_000))
        .await
        .expect("entries")
}

/// Settles one request and returns its usage entry.
async fn charge(fx: &Fixture, request_id: &str, id: &str, cost: i64) -> LedgerEntry {
    let outcomes = fx
        .ledger
        .settle_batch(&[settlement(request_id, id, cost, None)])
        .await
        .expect("settle");
    assert!(outcomes[0].applied);
    usage_entry(fx, request_id, id).await
}

/// Settles one request that started at `started_at_ms` and returns its usage entry.
async fn charge_started(
    fx: &Fixture,
    request_id: &str,
    id: &str,
    cost: i64,
    started_at_ms: i64,
) -> LedgerEntry {
    let mut s = settlement(request_id, id, cost, None);
    s.started_at_ms = started_at_ms;
    let outcomes = fx.ledger.settle_batch(&[s]).await.expect("settle");
    assert!(outcomes[0].applied);
    usage_entry(fx, request_id, id).await
}

async fn usage_entry(fx: &Fixture, request_id: &str, id: &str) -> LedgerEntry {
    entries_of(fx, id)
        .await
        .into_iter()
        .find(|e| e.entry_type == EntryType::Usage && e.reference.as_deref() == Some(request_id))
        .unwrap_or_else(|| panic!("usage entry of {request_id}"))
}

async fn draws_of(fx: &Fixture, entry_id: i64) -> Vec<(i64, i64)> {
    fx.ledger
        .draws(entry_id)
        .await
        .expect("draws")
        .into_iter()
        .map(|(grant, amount)| (grant, amount.micros()))
        .collect()
}

fn expiry_entries(entries: &[LedgerEntry]) -> Vec<&LedgerEntry> {
    entries
        .iter()
        .filter(|e| e.entry_type == EntryType::Expiry)
        .collect()
}

contract!(signup_grants_and_purchases_become_grants, |fx| {
    let snapshot = fx
        .ledger
        .ensure_account(&account("sg"), micros(5_000))
        .await
        .expect("ensure");
    assert_eq!(snapshot.balance.micros(), 5_000);
    let grants = grants_of(fx, "sg").await;
    assert_eq!(grants.len(), 1);
    let signup = &entries_of(fx, "sg").await[0];
    assert_eq!(grants[0].source, "bonus");
    assert_eq!(grants[0].transaction_id, Some(signup.id));
    assert_eq!(
        (grants[0].amount.micros(), grants[0].remaining.micros()),
        (5_000, 5_000)
    );
    assert_eq!(grants[0].expires_at_ms, None);
    // Every kind of positive entry is a grant; a zero adjustment is an entry and no grant.
    let expires = now_ms() + HOUR_MS;
    add_grant(fx, &expiring("sg", EntryType::Purchase, 10, Some(expires))).await;
    add_grant(fx, &expiring("sg", EntryType::Refund, 20, None)).await;
    add_grant(fx, &expiring("sg", EntryType::Adjustment, 30, None)).await;
    fx.ledger
        .grant(&grant("sg", EntryType::Adjustment, 0, None))
        .await
        .expect("zero adjustment");
    let sources: Vec<String> = grants_of(fx, "sg")
        .await
        .into_iter()
        .map(|g| g.source)
        .collect();
    assert_eq!(sources, ["bonus", "purchase", "refund", "adjustment"]);
    assert_eq!(balance(fx, "sg").await, 5_060);
    // Replaying a referenced grant adds no second grant.
    for _ in 0..2 {
        fx.ledger
            .grant(&grant("sg", EntryType::Purchase, 7, Some("once")))
            .await
            .expect("grant");
    }
    assert_eq!(grants_of(fx, "sg").await.len(), 5);
    assert!(
        fx.ledger
            .grants(&account("nobody"))
            .await
            .expect("grants")
            .is_empty()
    );
    assert!(fx.ledger.draws(signup.id).await.expect("draws").is_empty());
    assert_consistent(fx).await;
});

contract!(usage_draws_soonest_expiring_first_then_oldest, |fx| {
    let now = now_ms();
    let a = add_grant(fx, &expiring("dr", EntryType::Purchase, 100, None)).await;
    let b = add_grant(
        fx,
        &expiring("dr", EntryType::Bonus, 50, Some(now + HOUR_MS)),
    )
    .await;
    let c = add_grant(
        fx,
        &expiring("dr", EntryType::Bonus, 30, Some(now + 2 * HOUR_MS)),
    )
    .await;
    let d = add_grant(fx, &expiring("dr", EntryType::Purchase, 20, None)).await;
    assert_eq!(balance(fx, "dr").await, 200);

    // The soonest-expiring grant first.
    let first = charge(fx, "dr-1", "dr", 40).await;
    assert_eq!(draws_of(fx, first.id).await, [(b.id, 40)]);
    assert_consistent(fx).await;

    // One usage spanning two grants: two draws that add up to the cost.
    let second = charge(fx, "dr-2", "dr", 30).await;
    let draws = draws_of(fx, second.id).await;
    assert_eq!(draws, [(b.id, 10), (c.id, 20)]);
    assert_eq!(draws.iter().map(|(_, amount)| amount).sum::<i64>(), 30);
    assert_consistent(fx).await;

    // In one batch, each settlement draws from what the earlier ones left; never-expiring
    // grants come last, the oldest of them first.
    let outcomes = fx
        .ledger
        .settle_batch(&[
            settlement("dr-3", "dr", 50, None),
            settlement("dr-4", "dr", 70, None),
        ])
        .await
        .expect("settle");
    assert_eq!(outcomes[1].account.balance.micros(), 10);
    let third = usage_entry(fx, "dr-3", "dr").await;
    let fourth = usage_entry(fx, "dr-4", "dr").await;
    assert_eq!(draws_of(fx, third.id).await, [(c.id, 10), (a.id, 40)]);
    assert_eq!(draws_of(fx, fourth.id).await, [(a.id, 60), (d.id, 10)]);
    assert_eq!(
        remainders(fx, "dr").await,
        [(0, 0), (0, 0), (0, 0), (10, 0)]
    );
    assert_eq!(balance(fx, "dr").await, 10);
    assert_consistent(fx).await;
});

contract!(
    uncovered_usage_becomes_debt_that_the_next_grant_pays,
    |fx| {
        // Charges run into debt (as with `cost <= hold`) up to 50 below zero.
        const OVERDRAWN: i64 = 50;
        let first = add_grant(fx, &expiring("debt", EntryType::Purchase, 100, None)).await;
        let usage = charge(fx, "debt-1", "debt", 150).await;
        // The grant covers 100; the other 50 is debt.
        assert_eq!(draws_of(fx, usage.id).await, [(first.id, 100)]);
        assert_eq!(balance(fx, "debt").await, -50);
        assert_eq!(remainders(fx, "debt").await, [(0, 0)]);
        assert_consistent_within(fx, OVERDRAWN).await;

        // A grant smaller than the debt goes wholly to it.
        let small = add_grant(fx, &expiring("debt", EntryType::Purchase, 30, None)).await;
        assert_eq!(
            (small.debt_paid.micros(), small.remaining.micros()),
            (30, 0)
        );
        assert_eq!(balance(fx, "debt").await, -20);
        assert_consistent_within(fx, OVERDRAWN).await;

        // The next one pays the rest first and keeps the remainder.
        let big = add_grant(
            fx,
            &expiring("debt", EntryType::Bonus, 80, Some(now_ms() + HOUR_MS)),
        )
        .await;
        assert_eq!((big.debt_paid.micros(), big.remaining.micros()), (20, 60));
        assert_eq!(balance(fx, "debt").await, 60);
        let after = charge(fx, "debt-2", "debt", 10).await;
        assert_eq!(draws_of(fx, after.id).await, [(big.id, 10)]);
        assert_eq!(remainders(fx, "debt").await, [(0, 0), (0, 30), (50, 20)]);
        // With no debt left, a grant keeps all of it.
        let clean = add_grant(fx, &expiring("debt", EntryType::Purchase, 5, None)).await;
        assert_eq!((clean.debt_paid.micros(), clean.remaining.micros()), (0, 5));
        assert_eq!(balance(fx, "debt").await, 55);
        assert_consistent_within(fx, OVERDRAWN).await;

        // No grant at all: the whole cost is debt, and the entry draws nothing.
        let bare = charge(fx, "debt-3", "debt-bare", 7).await;
        assert!(draws_of(fx, bare.id).await.is_empty());
        assert_eq!(balance(fx, "debt-bare").await, -7);
        assert_consistent_within(fx, OVERDRAWN).await;

        // A negative cost is refused, and the batch changes nothing.
        let refused = fx
            .ledger
            .settle_batch(&[
                settlement("debt-4", "debt", 1, None),
                settlement("debt-5", "debt", -1, None),
            ])
            .await;
        assert!(
            matches!(refused, Err(LedgerError::Corrupt(_))),
            "{refused:?}"
        );
        assert_eq!(balance(fx, "debt").await, 55);
        assert_consistent_within(fx, OVERDRAWN).await;
    }
);

contract!(negative_adjustments_draw_like_usage, |fx| {
    let purchase = add_grant(
        fx,
        &GrantRequest {
            reference: Some("order-1".into()),
            ..expiring("na", EntryType::Purchase, 100, None)
        },
    )
    .await;
    let bonus = add_grant(
        fx,
        &expiring("na", EntryType::Bonus, 40, Some(now_ms() + HOUR_MS)),
    )
    .await;
    let taken = fx
        .ledger
        .grant(&grant("na", EntryType::Adjustment, -60, Some("fix-1")))
        .await
        .expect("adjust");
    assert_eq!(
        draws_of(fx, taken.entry.id).await,
        [(bonus.id, 40), (purchase.id, 20)]
    );
    // A negative adjustment is no grant.
    assert_eq!(grants_of(fx, "na").await.len(), 2);
    assert_consistent(fx).await;
    // Replayed: nothing drawn twice.
    fx.ledger
        .grant(&grant("na", EntryType::Adjustment, -60, Some("fix-1")))
        .await
        .expect("replay");
    assert_eq!(remainders(fx, "na").await, [(80, 0), (0, 0)]);

    // A refund does not draw like usage: it takes back the purchase it names first, though
    // another grant expires sooner.
    let soon = add_grant(
        fx,
        &expiring("na", EntryType::Bonus, 10, Some(now_ms() + HOUR_MS)),
    )
    .await;
    let refund = |amount: i64, reference: &str| GrantRequest {
        draw_first_from: vec![(EntryType::Purchase, "order-1".into())],
        ..grant("na", EntryType::Refund, amount, Some(reference))
    };
    let first = fx
        .ledger
        .grant(&refund(-60, "order-1:refund:1"))
        .await
        .expect("refund");
    assert_eq!(draws_of(fx, first.entry.id).await, [(purchase.id, 60)]);
    assert_eq!(remainders(fx, "na").await, [(20, 0), (0, 0), (10, 0)]);
    assert_consistent(fx).await;
    // What the purchase no longer holds is drawn in the usual order; what no grant covers is
    // debt, which the next grant pays.
    let second = fx
        .ledger
        .grant(&refund(-40, "order-1:refund:2"))
        .await
        .expect("refund");
    assert_eq!(
        draws_of(fx, second.entry.id).await,
        [(soon.id, 10), (purchase.id, 20)]
    );
    assert_eq!(second.snapshot.balance.micros(), -10);
    assert_consistent(fx).await;
    let next = add_grant(fx, &expiring("na", EntryType::Purchase, 50, None)).await;
    assert_eq!((next.debt_paid.micros(), next.remaining.micros()), (10, 40));
    assert_eq!(balance(fx, "na").await, 40);
    assert_consistent(fx).await;
});

contract!(a_debit_draws_from_the_grants_it_names_first, |fx| {
    let now = now_ms();
    let named =
        |reference: &str, entry_type: EntryType, amount: i64, expires: Option<i64>| GrantRequest {
            reference: Some(reference.into()),
            ..expiring("nf", entry_type, amount, expires)
        };
    let bought = add_grant(fx, &named("pay-1", EntryType::Purchase, 100, None)).await;
    let bonus = add_grant(fx, &named("pay-1:bonus", EntryType::Bonus, 20, None)).await;
    let lapsed = add_grant(fx, &named("pay-2", EntryType::Purchase, 30, Some(now - 1))).await;
    let soon = add_grant(
        fx,
        &expiring("nf", EntryType::Bonus, 40, Some(now + HOUR_MS)),
    )
    .await;
    // The same reference on another account names nothing here.
    add_grant(
        fx,
        &GrantRequest {
            reference: Some("pay-3".into()),
            ..expiring("nf-other", EntryType::Purchase, 50, None)
        },
    )
    .await;

    // Named in order: the bonus, then the purchase. An expired grant, an entry of another
    // type, another account's entry and an unknown reference are passed over.
    let take = |amount: i64, reference: &str| GrantRequest {
        draw_first_from: vec![
            (EntryType::Purchase, "pay-2".into()),
            (EntryType::Purchase, "pay-1:bonus".into()),
            (EntryType::Purchase, "pay-3".into()),
            (EntryType::Bonus, "pay-1:bonus".into()),
            (EntryType::Purchase, "nowhere".into()),
            (EntryType::Purchase, "pay-1".into()),
        ],
        ..grant("nf", EntryType::Adjustment, amount, Some(reference))
    };
    let taken = fx.ledger.grant(&take(-50, "take-1")).await.expect("take");
    // (`draws` lists them in the usual drawing order: the older grant first.)
    assert_eq!(
        draws_of(fx, taken.entry.id).await,
        [(bought.id, 30), (bonus.id, 20)]
    );
    // Replayed: nothing drawn twice.
    let replay = fx.ledger.grant(&take(-50, "take-1")).await.expect("replay");
    assert!(!replay.applied);
    assert_eq!(
        remainders(fx, "nf").await,
        [(70, 0), (0, 0), (30, 0), (40, 0)]
    );
    assert_consistent(fx).await;

    // Beyond the named grants: the live ones in the usual order (never the expired one),
    // then debt.
    let all = fx.ledger.grant(&take(-120, "take-2")).await.expect("take");
    assert_eq!(
        draws_of(fx, all.entry.id).await,
        [(soon.id, 40), (bought.id, 70)]
    );
    assert_eq!(all.snapshot.balance.micros(), 30 - 10);
    assert_eq!(
        remainders(fx, "nf").await,
        [(0, 0), (0, 0), (30, 0), (0, 0)]
    );
    assert_eq!(lapsed.remaining.micros(), 30);
    assert_eq!(balance(fx, "nf-other").await, 50);
    assert_consistent(fx).await;
});

contract!(
    usage_after_a_grants_expiry_skips_it_before_the_sweep,
    |fx| {
        // The charges below run 25 into debt, as a gateway with that overdraft could allow.
        const OVERDRAWN: i64 = 25;
        let lapsed_at = now_ms() - 10_000;
        // Already past its expiry when it arrives: it counts in the balance until swept, but
        // every snapshot reports it as lapsed, so no reservation can count it.
        let lapsed = add_grant(fx, &expiring("lx", EntryType::Bonus, 100, Some(lapsed_at))).await;
        let open = add_grant(fx, &expiring("lx", EntryType::Purchase, 50, None)).await;
        let snapshot = fx
            .ledger
            .snapshot(&Bucket::Account(account("lx")), Credits::ZERO)
            .await
            .expect("snapshot");
        assert_eq!(
            (
                snapshot.balance.micros(),
                snapshot.lapsed.micros(),
                snapshot.next_expiry_ms
            ),
            (150, 100, None)
        );
        // Requests that started after the lapse do not draw from it, whenever they settle.
        let first = charge(fx, "lx-1", "lx", 10).await;
        assert_eq!(draws_of(fx, first.id).await, [(open.id, 10)]);
        let second = charge(fx, "lx-2", "lx", 60).await;
        assert_eq!(draws_of(fx, second.id).await, [(open.id, 40)]);
        assert_eq!(balance(fx, "lx").await, 80);
        assert_eq!(remainders(fx, "lx").await, [(100, 0), (0, 0)]);
        assert_consistent_within(fx, OVERDRAWN).await;
        // One that started before it reserved against it, so it may still draw from it.
        let older = charge_started(fx, "lx-0", "lx", 30, lapsed_at - 1).await;
        assert_eq!(draws_of(fx, older.id).await, [(lapsed.id, 30)]);
        assert_eq!(remainders(fx, "lx").await, [(70, 0), (0, 0)]);
        // A debit made now skips it too.
        let adjusted = fx
            .ledger
            .grant(&grant("lx", EntryType::Adjustment, -5, None))
            .await
            .expect("adjust");
        assert!(draws_of(fx, adjusted.entry.id).await.is_empty());
        assert_eq!(adjusted.snapshot.lapsed.micros(), 70);
        assert_eq!(balance(fx, "lx").await, 45);
        assert_consistent_within(fx, OVERDRAWN).await;

        // The sweep takes the lapsed remainder out; the debt stays.
        let changed = fx
            .ledger
            .expire_grants(now_ms(), &NothingInFlight)
            .await
            .expect("sweep");
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].1.balance.micros(), -25);
        assert_eq!(changed[0].1.lapsed, Credits::ZERO);
        let entries = entries_of(fx, "lx").await;
        let expiries = expiry_entries(&entries);
        assert_eq!(expiries.len(), 1);
        assert_eq!(draws_of(fx, expiries[0].id).await, [(lapsed.id, 70)]);
        assert_consistent_within(fx, OVERDRAWN).await;
        // The next grant pays the debt.
        let next = add_grant(fx, &expiring("lx", EntryType::Purchase, 30, None)).await;
        assert_eq!((next.debt_paid.micros(), next.remaining.micros()), (25, 5));
        assert_eq!(balance(fx, "lx").await, 5);
        assert_consistent_within(fx, OVERDRAWN).await;
    }
);

/// What the sweep keeps back per account, as a balance cache would report it.
struct Keep(i64);

#[async_trait::async_trait]
impl tollgate::ledger::KeepBack for Keep {
    async fn keep_back(&self, _account: &AccountId, _at_ms: i64) -> Option<Credits> {
        Some(micros(self.0))
    }
}

contract!(
    the_sweep_keeps_back_what_requests_in_flight_may_still_draw,
    |fx| {
        let now = now_ms();
        let early = add_grant(
            fx,
            &expiring("kb", EntryType::Bonus, 30, Some(now - 20_000)),
        )
        .await;
        let later = add_grant(
            fx,
            &expiring("kb", EntryType::Purchase, 100, Some(now - 10_000)),
        )
        .await;
        let future = now + HOUR_MS;
        add_grant(fx, &expiring("kb", EntryType::Bonus, 10, Some(future))).await;
        add_grant(fx, &expiring("kb", EntryType::Purchase, 20, None)).await;
        let bucket = Bucket::Account(account("kb"));
        let before = fx
            .ledger
            .snapshot(&bucket, Credits::ZERO)
            .await
            .expect("snapshot");
        assert_eq!(
            (
                before.balance.micros(),
                before.lapsed.micros(),
                before.next_expiry_ms
            ),
            (160, 130, Some(future))
        );

        // A cache reload while 60 is held: the sweep keeps 60 back, in the grant that lapsed
        // last, and takes the rest.
        let in_flight = InFlight {
            at_ms: now,
            amount: micros(60),
        };
        let reloaded = fx
            .ledger
            .reload(&bucket, Credits::ZERO, in_flight)
            .await
            .expect("reload");
        assert_eq!(
            (
                reloaded.balance.micros(),
                reloaded.lapsed.micros(),
                reloaded.next_expiry_ms
            ),
            (90, 60, Some(future))
        );
        assert!(reloaded.rev > before.rev);
        let entries = entries_of(fx, "kb").await;
        let expiries = expiry_entries(&entries);
        let mut taken: Vec<(Option<String>, i64)> = expiries
            .iter()
            .map(|e| (e.reference.clone(), e.amount.micros()))
            .collect();
        taken.sort();
        assert_eq!(
            taken,
            [
                (Some(format!("grant:{}", early.id)), -30),
                (Some(format!("grant:{}:100", later.id)), -40),
            ]
        );
        let states: Vec<(i64, Option<i64>)> = grants_of(fx, "kb")
            .await
            .iter()
            .take(2)
            .map(|g| (g.remaining.micros(), g.expired_at_ms))
            .collect();
        assert_eq!(states, [(0, Some(now)), (60, None)]);
        assert_consistent(fx).await;

        // Nothing more to take while that much is in flight: no entry, no write.
        let again = fx
            .ledger
            .reload(&bucket, Credits::ZERO, in_flight)
            .await
            .expect("reload");
        assert_eq!((again.balance, again.rev), (reloaded.balance, reloaded.rev));
        assert!(
            fx.ledger
                .expire_grants(now, &Keep(60))
                .await
                .expect("sweep")
                .is_empty()
        );
        assert_eq!(entries_of(fx, "kb").await.len(), entries.len());

        // The request that reserved before the lapse settles from what was kept for it.
        let usage = charge_started(fx, "kb-1", "kb", 45, now - 15_000).await;
        assert_eq!(draws_of(fx, usage.id).await, [(later.id, 45)]);
        assert_eq!(balance(fx, "kb").await, 45);

        // Once nothing is in flight the next sweep takes the rest and ends the grant.
        let changed = fx
            .ledger
            .expire_grants(now + 1, &Keep(0))
            .await
            .expect("sweep");
        assert_eq!(changed.len(), 1);
        assert_eq!(
            (changed[0].1.balance.micros(), changed[0].1.lapsed.micros()),
            (30, 0)
        );
        let last = entries_of(fx, "kb").await;
        let last = expiry_entries(&last)[0];
        assert_eq!(last.reference, Some(format!("grant:{}", later.id)));
        assert_eq!(last.amount.micros(), -15);
        assert_eq!(draws_of(fx, last.id).await, [(later.id, 15)]);
        let swept = &grants_of(fx, "kb").await[1];
        assert_eq!(
            (swept.remaining.micros(), swept.expired_at_ms),
            (0, Some(now + 1))
        );
        // 160 in, 45 used, 85 expired: never below zero.
        assert_eq!(balance(fx, "kb").await, 30);
        assert_consistent(fx).await;
    }
);

contract!(
    verify_flags_a_debit_below_the_overdraft_without_a_cause,
    |fx| {
        // Charged 30 against 10 within its hold: no reservation with overdraft 0 allows that.
        add_grant(fx, &expiring("over", EntryType::Purchase, 10, None)).await;
        let overspent = charge(fx, "over-1", "over", 30).await;
        let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].account, "over");
        assert!(
            problems[0]
                .problem
                .contains(&format!("entry {} (usage)", overspent.id)),
            "{problems:?}"
        );
        // An overdraft of 20 allows it.
        assert_consistent_within(fx, 20).await;

        // A refund that landed while the request ran is a documented cause.
        add_grant(fx, &expiring("refunded", EntryType::Purchase, 10, None)).await;
        fx.ledger
            .grant(&grant("refunded", EntryType::Refund, -8, None))
            .await
            .expect("refund");
        charge(fx, "refunded-1", "refunded", 5).await;
        assert_eq!(balance(fx, "refunded").await, -3);
        assert_consistent_within(fx, 20).await;

        // Usage that ran into debt while lapsed credits propped the balance up looks fine until
        // the sweep takes them: then the expiry entry has no cause.
        let lapsed_at = now_ms() - 10_000;
        add_grant(
            fx,
            &expiring("propped", EntryType::Bonus, 100, Some(lapsed_at)),
        )
        .await;
        add_grant(fx, &expiring("propped", EntryType::Purchase, 5, None)).await;
        charge(fx, "propped-1", "propped", 60).await;
        assert_eq!(balance(fx, "propped").await, 45);
        assert_consistent_within(fx, 20).await;
        fx.ledger
            .expire_grants(now_ms(), &NothingInFlight)
            .await
            .expect("sweep");
        let expiry = expiry_entries(&entries_of(fx, "propped").await)[0].clone();
        assert_eq!(expiry.balance_after.micros(), -55);
        let problems = fx.ledger.verify(micros(20)).await.expect("verify");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].account, "propped");
        assert!(
            problems[0]
                .problem
                .contains(&format!("entry {} (expiry)", expiry.id)),
            "{problems:?}"
        );
    }
);

contract!(verify_flags_usage_that_cost_more_than_its_hold, |fx| {
    // The gateway charges at most the hold (the excess is recorded as `uncharged`): a record
    // above it is a problem of its own, and excuses no balance below the overdraft floor.
    add_grant(fx, &expiring("above", EntryType::Purchase, 100, None)).await;
    let mut above = settlement("above-1", "above", 30, None);
    above.hold = micros(5);
    add_grant(fx, &expiring("under", EntryType::Purchase, 10, None)).await;
    let mut under = settlement("under-1", "under", 30, None);
    under.hold = micros(5);
    fx.ledger
        .settle_batch(&[above, under])
        .await
        .expect("settle");
    let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
    let found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.account.as_str(), p.problem.as_str()))
        .collect();
    assert_eq!(found.len(), 3, "{problems:?}");
    assert_eq!(found[0].0, "above");
    assert!(
        found[0]
            .1
            .starts_with("usage record above-1 cost 30 but its hold was 5"),
        "{problems:?}"
    );
    assert_eq!(found[1].0, "under");
    assert!(
        found[1].1.starts_with("usage record under-1 cost 30"),
        "{problems:?}"
    );
    assert_eq!(found[2].0, "under");
    assert!(
        found[2].1.contains("(usage) left the balance at -20"),
        "{problems:?}"
    );
});

contract!(
    settlements_set_aside_are_kept_verified_and_resolved_once,
    |fx| {
        // A record no usage row could hold (a model name over 64 KiB) is kept whole.
        let mut big = settlement("refused-1", "sa", 30, None);
        big.model = "m".repeat(70 * 1024);
        let first = SetAside::new(&big, "data too long for column `model`", 1_000);
        fx.ledger.set_aside(&first).await.expect("set aside");
        // Idempotent: a second instance (or a recovery pass) setting it aside keeps the first row.
        fx.ledger
            .set_aside(&SetAside::new(&big, "another error", 2_000))
            .await
            .expect("set aside again");
        let second = SetAside::new(
            &settlement("refused-2", "sb", -1, None),
            "negative cost",
            3_000,
        );
        fx.ledger.set_aside(&second).await.expect("set aside");

        // Newest first, filtered by resolution.
        let all = fx.ledger.set_aside_settlements(None).await.expect("list");
        assert_eq!(all, [second.clone(), first.clone()]);
        assert_eq!(
            fx.ledger
                .set_aside_settlements(Some(false))
                .await
                .expect("list"),
            all
        );
        assert!(
            fx.ledger
                .set_aside_settlements(Some(true))
                .await
                .expect("list")
                .is_empty()
        );
        let record: Settlement =
            serde_json::from_str(&all[1].record).expect("the whole settlement");
        assert_eq!(record.model.len(), 70 * 1024);
        assert_eq!(record.cost, micros(30));
        // Nothing was charged: the ledger does not even know the accounts.
        assert!(
            fx.ledger
                .account(&account("sa"))
                .await
                .expect("read")
                .is_none()
        );

        // Unresolved, each is a problem naming its request, account and error.
        let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
        let found: Vec<(&str, &str)> = problems
            .iter()
            .map(|p| (p.account.as_str(), p.problem.as_str()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "sa",
                    "settlement refused-1 was set aside unresolved (nothing charged): data too long \
                 for column `model`"
                ),
                (
                    "sb",
                    "settlement refused-2 was set aside unresolved (nothing charged): negative cost"
                ),
            ]
        );

        // Resolved once: a second resolution keeps the first.
        let resolved = fx
            .ledger
            .resolve_set_aside("refused-1", "charged by hand", 5_000)
            .await
            .expect("resolve")
            .expect("was set aside");
        assert_eq!(
            (resolved.resolved_at_ms, resolved.resolved_note.as_deref()),
            (Some(5_000), Some("charged by hand"))
        );
        let again = fx
            .ledger
            .resolve_set_aside("refused-1", "something else", 6_000)
            .await
            .expect("resolve")
            .expect("was set aside");
        assert_eq!(again, resolved);
        assert!(
            fx.ledger
                .resolve_set_aside("never-set-aside", "note", 6_000)
                .await
                .expect("resolve")
                .is_none()
        );
        assert_eq!(
            fx.ledger
                .set_aside_settlements(Some(true))
                .await
                .expect("list"),
            [resolved]
        );
        assert_eq!(
            fx.ledger
                .set_aside_settlements(Some(false))
                .await
                .expect("list"),
            [second]
        );
        assert_eq!(
            fx.ledger.verify(Credits::ZERO).await.expect("verify").len(),
            1
        );
        fx.ledger
            .resolve_set_aside("refused-2", "waived", 7_000)
            .await
            .expect("resolve");
        assert_consistent(fx).await;
    }
);

contract!(concurrent the_sweep_expires_each_remainder_once, |fx| {
    let t0 = now_ms();
    let soon = add_grant(fx, &expiring("sw", EntryType::Bonus, 30, Some(t0 + 500))).await;
    let due = add_grant(fx, &expiring("sw", EntryType::Purchase, 100, Some(t0 + 1_000))).await;
    let later = add_grant(
        fx,
        &expiring("sw", EntryType::Bonus, 50, Some(t0 + 1_000 * HOUR_MS)),
    )
    .await;
    let never = add_grant(fx, &expiring("sw", EntryType::Purchase, 20, None)).await;
    // Uses all of `soon` and some of `due`.
    let usage = charge(fx, "sw-1", "sw", 40).await;
    assert_eq!(draws_of(fx, usage.id).await, [(soon.id, 30), (due.id, 10)]);
    // An account whose due grant is used up: swept, but its balance does not move.
    add_grant(fx, &expiring("sw-empty", EntryType::Bonus, 10, Some(t0 + 1_000))).await;
    charge(fx, "sw-2", "sw-empty", 10).await;
    let before = fx.ledger.account(&account("sw")).await.expect("read").expect("exists");

    // Nothing is due yet.
    assert!(fx.ledger.expire_grants(t0 + 499, &NothingInFlight).await.expect("early sweep").is_empty());
    assert!(expiry_entries(&entries_of(fx, "sw").await).is_empty());

    let swept_at = t0 + 2_000;
    let changed = fx.ledger.expire_grants(swept_at, &NothingInFlight).await.expect("sweep");
    assert_eq!(changed.len(), 1, "{changed:?}");
    let (changed_account, snapshot) = &changed[0];
    assert_eq!(changed_account, &account("sw"));
    let record = fx.ledger.account(&account("sw")).await.expect("read").expect("exists");
    assert_eq!((snapshot.balance, snapshot.rev), (record.balance, record.rev));
    assert_eq!(snapshot.balance.micros(), 70);
    assert!(snapshot.rev > before.rev);

    let entries = entries_of(fx, "sw").await;
    let expiries = expiry_entries(&entries);
    assert_eq!(expiries.len(), 1);
    let expiry = expiries[0];
    assert_eq!(expiry.amount.micros(), -90);
    assert_eq!(
        (expiry.balance_before.micros(), expiry.balance_after.micros()),
        (160, 70)
    );
    assert_eq!(expiry.reference, Some(format!("grant:{}", due.id)));
    assert!(
        expiry.description.contains(&due.id.to_string()),
        "{}",
        expiry.description
    );
    assert_eq!(draws_of(fx, expiry.id).await, [(due.id, 90)]);
    let states: Vec<(i64, i64, Option<i64>)> = grants_of(fx, "sw")
        .await
        .iter()
        .map(|g| (g.id, g.remaining.micros(), g.expired_at_ms))
        .collect();
    assert_eq!(
        states,
        [
            (soon.id, 0, Some(swept_at)),
            (due.id, 0, Some(swept_at)),
            (later.id, 50, None),
            (never.id, 20, None),
        ]
    );
    let empty = grants_of(fx, "sw-empty").await;
    assert_eq!(empty[0].expired_at_ms, Some(swept_at));
    assert!(expiry_entries(&entries_of(fx, "sw-empty").await).is_empty());
    assert_consistent(fx).await;

    // Again: nothing left to do.
    assert!(fx.ledger.expire_grants(swept_at + 1, &NothingInFlight).await.expect("second sweep").is_empty());
    assert_eq!(entries_of(fx, "sw").await.len(), entries.len());
    assert_consistent(fx).await;

    // Eight sweeps at once over four accounts with three due grants each: one expiry entry
    // per grant, and each account reported by exactly one sweep.
    let due_at = t0 + 3_000;
    let accounts: Vec<String> = (0..4).map(|n| format!("par-{n}")).collect();
    for id in &accounts {
        for amount in [3, 5, 7] {
            add_grant(fx, &expiring(id, EntryType::Bonus, amount, Some(due_at))).await;
        }
        add_grant(fx, &expiring(id, EntryType::Purchase, 11, None)).await;
    }
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let ledger = fx.ledger.clone();
            tokio::spawn(async move { ledger.expire_grants(due_at + 1, &NothingInFlight).await })
        })
        .collect();
    let mut reported = Vec::new();
    for task in tasks {
        let changed = task.await.expect("task").expect("sweep");
        reported.extend(changed.into_iter().map(|(id, _)| id.as_str().to_owned()));
    }
    reported.sort();
    assert_eq!(reported, accounts);
    for id in &accounts {
        let entries = entries_of(fx, id).await;
        let mut amounts: Vec<i64> = expiry_entries(&entries)
            .iter()
            .map(|e| e.amount.micros())
            .collect();
        amounts.sort();
        assert_eq!(amounts, [-7, -5, -3], "{id}");
        assert_eq!(balance(fx, id).await, 11);
    }
    assert_consistent(fx).await;
});

contract!(
    verify_names_an_account_whose_grants_were_tampered_with,
    |fx| {
        for id in ["tampered", "honest"] {
            add_grant(fx, &expiring(id, EntryType::Purchase, 100, None)).await;
            charge(fx, &format!("t-{id}"), id, 30).await;
        }
        assert_consistent(fx).await;
        let grant_id = grants_of(fx, "tampered").await[0].id;

        fx.raw_execute(
            "UPDATE credit_grants SET remaining = remaining + 1 WHERE account_id = ?",
            "tampered",
        )
        .await;
        let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
        assert!(!problems.is_empty());
        assert!(
            problems.iter().all(|p| p.account == "tampered"),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.problem.contains(&format!("grant {grant_id}"))),
            "{problems:?}"
        );
        fx.raw_execute(
            "UPDATE credit_grants SET remaining = remaining - 1 WHERE account_id = ?",
            "tampered",
        )
        .await;
        assert_consistent(fx).await;

        // A debt changed behind the ledger's back no longer matches the balance.
        fx.raw_execute(
            "UPDATE accounts SET debt = debt + 1 WHERE id = ?",
            "tampered",
        )
        .await;
        let problems = fx.ledger.verify(Credits::ZERO).await.expect("verify");
        assert!(!problems.is_empty());
        assert!(
            problems.iter().all(|p| p.account == "tampered"),
            "{problems:?}"
        );
    }
);

contract!(key_spend_overflow_is_an_error_and_changes_nothing, |fx| {
    add_grant(fx, &expiring("ko", EntryType::Purchase, 1_000, None)).await;
    fx.ledger
        .create_api_key(&api_key("k-over", "ko", None))
        .await
        .expect("key");
    fx.raw_execute(
        "UPDATE api_keys SET spent = 9223372036854775800 WHERE id = ?",
        "k-over",
    )
    .await;
    let overflow = fx
        .ledger
        .settle_batch(&[settlement("ko-1", "ko", 100, Some("k-over"))])
        .await;
    assert!(
        matches!(overflow, Err(LedgerError::Overflow(ref id)) if id == "ko"),
        "{overflow:?}"
    );
    assert_eq!(balance(fx, "ko").await, 1_000);
    assert_eq!(remainders(fx, "ko").await, [(1_000, 0)]);
    assert!(
        fx.ledger
            .usage(&account("ko"), first_page(10))
            .await
            .expect("usage")
            .is_empty()
    );
});

/// What a database written before grants holds: a funded account with usage through an API
/// key, an account in the red, and one at zero.
const V1_DATA: &str = "
INSERT INTO accounts (id, balance, rev, created_at, updated_at) VALUES
    ('old-rich', 4000000, 3, 1000, 1003),
    ('old-poor', -200, 2, 1000, 1005),
    ('old-zero', 0, 2, 1000, 1007);
INSERT INTO credit_transactions
    (id, account_id, `type`, amount, balance_before, balance_after, description, reference, created_at)
VALUES
    (1, 'old-rich', 'purchase', 5000000, 0, 5000000, 'order', 'order-1', 1001),
    (2, 'old-rich', 'usage', -1200000, 5000000, 3800000, 'chat', 'old-req-1', 1002),
    (3, 'old-rich', 'bonus', 200000, 3800000, 4000000, 'bonus', NULL, 1003),
    (4, 'old-poor', 'purchase', 100, 0, 100, 'order', NULL, 1004),
    (5, 'old-poor', 'usage', -300, 100, -200, 'chat', 'old-req-2', 1005),
    (6, 'old-zero', 'purchase', 50, 0, 50, 'order', NULL, 1006),
    (7, 'old-zero', 'adjustment', -50, 50, 0, 'fix', NULL, 1007);
INSERT INTO api_keys (id, account_id, key_hash, prefix, name, spend_limit, spent, rev, allowed_models, created_at)
VALUES ('old-key', 'old-rich', 'hash-of-old-key', 'tg_old', 'old', NULL, 1200000, 1, NULL, 1000);
INSERT INTO usage_records (request_id, account_id, api_key_id, endpoint, model, upstream,
    prompt_tokens, completion_tokens, cached_tokens, cost, hold, source, stream, status,
    started_at, finished_at, settled_at, transaction_id)
VALUES
    ('old-req-1', 'old-rich', 'old-key', 'chat/completions', 'm', 'u', 1, 2, 0, 1200000, 1300000,
     'reported', 1, 'completed', 1001, 1002, 1002, 2),
    ('old-req-2', 'old-poor', NULL, 'chat/completions', 'm', 'u', 1, 2, 0, 300, 300,
     'counted', 0, 'completed', 1004, 1005, 1005, 5);
";

contract!(v1 migrating_a_database_from_before_grants_keeps_every_balance, |fx| {
    fx.raw_script(V1_DATA).await;
    fx.ledger.migrate().await.expect("migrate to grants");
    fx.ledger.migrate().await.expect("migrate again");

    assert_eq!(balance(fx, "old-rich").await, 4_000_000);
    assert_eq!(balance(fx, "old-poor").await, -200);
    assert_eq!(balance(fx, "old-zero").await, 0);
    let ids: Vec<(i64, i64)> = entries_of(fx, "old-rich")
        .await
        .iter()
        .map(|e| (e.id, e.amount.micros()))
        .collect();
    assert_eq!(ids, [(3, 200_000), (2, -1_200_000), (1, 5_000_000)]);
    assert_eq!(entries_of(fx, "old-poor").await.len(), 2);
    let usage = fx
        .ledger
        .usage(&account("old-rich"), first_page(10))
        .await
        .expect("usage");
    assert_eq!(usage.len(), 1);

    // A positive balance is one never-expiring `migrated` grant; a negative one is debt.
    let grants = grants_of(fx, "old-rich").await;
    assert_eq!(grants.len(), 1);
    let migrated = &grants[0];
    assert_eq!(migrated.source, "migrated");
    assert_eq!(migrated.transaction_id, None);
    assert_eq!(
        (migrated.amount.micros(), migrated.remaining.micros(), migrated.debt_paid.micros()),
        (4_000_000, 4_000_000, 0)
    );
    assert_eq!((migrated.expires_at_ms, migrated.expired_at_ms), (None, None));
    assert_eq!(migrated.created_at_ms, 1003);
    assert!(grants_of(fx, "old-poor").await.is_empty());
    assert!(grants_of(fx, "old-zero").await.is_empty());
    // `old-poor` was charged 200 below zero before grants (under an overdraft).
    assert_consistent_within(fx, 200).await;

    // The migrated ledger works on: usage draws from the migrated grant (new entry ids follow
    // the old ones), a grant pays the old debt, and `expiry` entries are allowed.
    let used = charge(fx, "new-req-1", "old-rich", 1_000_000).await;
    assert!(used.id > 7, "entry id {} reused", used.id);
    assert_eq!(used.balance_before.micros(), 4_000_000);
    assert_eq!(draws_of(fx, used.id).await, [(migrated.id, 1_000_000)]);
    let paid = add_grant(fx, &expiring("old-poor", EntryType::Purchase, 500, None)).await;
    assert_eq!((paid.debt_paid.micros(), paid.remaining.micros()), (200, 300));
    assert_eq!(balance(fx, "old-poor").await, 300);
    add_grant(
        fx,
        &expiring("old-zero", EntryType::Bonus, 9, Some(now_ms() - 1)),
    )
    .await;
    let changed = fx.ledger.expire_grants(now_ms(), &NothingInFlight).await.expect("sweep");
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].0, account("old-zero"));
    assert_eq!(balance(fx, "old-zero").await, 0);
    assert_eq!(expiry_entries(&entries_of(fx, "old-zero").await).len(), 1);
    let key = fx
        .ledger
        .api_key_by_hash("hash-of-old-key")
        .await
        .expect("key")
        .expect("exists");
    assert_eq!(key.spent.micros(), 1_200_000);
    assert_consistent_within(fx, 200).await;
    // No row points at a missing one (SQLite rebuilt the entries table with foreign keys off).
    if matches!(fx.raw, Raw::Sqlite(_)) {
        assert_eq!(fx.raw_rows("PRAGMA foreign_key_check").await, 0);
    }
});
