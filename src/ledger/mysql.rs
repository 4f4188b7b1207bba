//! MySQL ledger adapter: the production store that several gateway instances share (MySQL 8;
//! MariaDB 10.11 in CI, so the SQL sticks to what both accept: no `RETURNING` in particular).
//!
//! It behaves exactly like the SQLite adapter, but where SQLite has one writer at a time, here
//! many transactions from many processes run at once, so the write paths are built for that:
//!
//! - Every balance-changing transaction first locks the account rows it changes with one
//!   `SELECT … FOR UPDATE` over the sorted ids (InnoDB locks them in index order, so two
//!   transactions never wait for each other in a cycle), reads the balances under that lock,
//!   computes the new ones in Rust with checked arithmetic, and writes absolute values.
//! - A settle batch moves each account's balance once, however many of its settlements the batch
//!   holds, so a busy account costs one row update per batch.
//! - Credit grants (see [`super::grants`]) change only under their account's lock: a debit locks
//!   the account's live grants after the account, and an API key after those; the expiry sweep
//!   takes one account at a time.
//! - Connections run at READ COMMITTED: locking reads take no gap locks, and the duplicate
//!   checks made after taking the locks see every row committed before them.
//! - A deadlock, a lock wait timeout, or a duplicate key lost to a racing writer rolls the whole
//!   transaction back and runs it again after a short random pause; the re-run sees the winner's
//!   row and reports a replay instead of an error.
//!
//! Length: these are the adapter's locking writes, which all follow one lock order (accounts, then
//! grants, then keys); they are kept together so that order can be checked in one read.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use sqlx::migrate::Migrator;
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPoolOptions, MySqlRow};
use sqlx::{Executor, MySql, MySqlConnection, MySqlPool, QueryBuilder, Row};

use super::grants::{GrantRow, drawing_order};
use super::settle_plan::{self, AccountState as BatchAccount, BatchState, SettlePlan};
use super::settle_writes;
use super::sql::rows::{credits, grant_row, parse_account};
use super::sql::statements::{CHUNK, Statements};
use super::sql::{MigrationFile, SqlAdapter, migrator_of};
use super::{
    ApiKeyRecord, EntryType, GrantOutcome, GrantRequest, LedgerError, SettleOutcome, Settlement,
    Snapshot,
};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};

/// Migrations embedded at compile time, so the binary needs no `migrations/` folder at run time.
const MIGRATIONS: &[MigrationFile] = &[
    (
        1,
        "ledger",
        include_str!("../../migrations/mysql/0001_ledger.sql"),
        false,
    ),
    (
        2,
        "grants",
        include_str!("../../migrations/mysql/0002_grants.sql"),
        false,
    ),
    (
        3,
        "payments",
        include_str!("../../migrations/mysql/0003_payments.sql"),
        false,
    ),
    (
        4,
        "coupons",
        include_str!("../../migrations/mysql/0004_coupons.sql"),
        false,
    ),
    (
        5,
        "statements",
        include_str!("../../migrations/mysql/0005_statements.sql"),
        false,
    ),
    (
        6,
        "settlement bounds",
        include_str!("../../migrations/mysql/0006_settlement_bounds.sql"),
        false,
    ),
    (
        7,
        "settlements set aside",
        include_str!("../../migrations/mysql/0007_settlements_set_aside.sql"),
        false,
    ),
];

fn migrator() -> Migrator {
    migrator_of(MIGRATIONS)
}

/// Server error numbers this adapter reacts to.
const ER_DUP_ENTRY: u16 = 1062;
const ER_LOCK_WAIT_TIMEOUT: u16 = 1205;
const ER_LOCK_DEADLOCK: u16 = 1213;

/// Attempts of one transaction before a lock conflict is returned to the caller (who may retry
/// later: the settler does).
const MAX_ATTEMPTS: u32 = 6;

/// A statement waits this many seconds for a row lock before failing with 1205 (and being run
/// again): the server default, 50 s, would stall a settle batch far longer than a retry does.
const SET_LOCK_WAIT_TIMEOUT: &str = "SET SESSION innodb_lock_wait_timeout = 10";

/// The shared statements, on MySQL.
type Sql = Statements<MySql>;

pub struct MySqlLedger {
    pool: MySqlPool,
}

impl MySqlLedger {
    /// Connects to `url` (`mysql://USER[:PASSWORD]@HOST[:PORT]/DB`); the database must exist.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        let options = MySqlConnectOptions::from_str(url)?.charset("utf8mb4");
        let pool = MySqlPoolOptions::new()
            .max_connections(max_connections.max(1))
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // Every transaction of this adapter locks what it changes, so it needs no
                    // repeatable snapshot; READ COMMITTED spares it InnoDB's gap locks.
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        .await?;
                    conn.execute(SET_LOCK_WAIT_TIMEOUT).await?;
                    // Too-long or invalid values must fail, never be truncated with a warning,
                    // whatever the server's own sql_mode says.
                    conn.execute(
                        "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES')",
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(MySqlLedger { pool })
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Which errors re-run a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Deadlocks and lock wait timeouts.
    LockConflicts,
    /// Those, and duplicate keys: used where every insert is preceded by a check made under
    /// the account lock, so a duplicate means a racing writer won and a re-run is a replay.
    LockConflictsAndDuplicates,
}

fn server_error_number(error: &LedgerError) -> Option<u16> {
    match error {
        LedgerError::Database(sqlx::Error::Database(db)) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    }
}

fn is_transient(error: &LedgerError, retry: Retry) -> bool {
    match server_error_number(error) {
        Some(ER_LOCK_DEADLOCK | ER_LOCK_WAIT_TIMEOUT) => true,
        Some(ER_DUP_ENTRY) => retry == Retry::LockConflictsAndDuplicates,
        _ => false,
    }
}

/// The pause after failed attempt `attempt` (1, 2, …): 10 ms doubling each time, plus up to as
/// much again at random, so transactions that collided once do not collide again in lockstep.
fn backoff(attempt: u32) -> Duration {
    let base: u64 = 5 << attempt.min(6);
    let jitter = rand::rng().random_range(0..=base);
    Duration::from_millis(base + jitter)
}

/// [`retrying`] on deadlocks and lock wait timeouts: the shared SQL's transactions
/// ([`SqlDialect::rerun`](super::sql::SqlDialect::rerun)).
pub(crate) async fn rerun_on_lock_conflict<T, F, Fut>(
    what: &'static str,
    attempt: F,
) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, LedgerError>>,
{
    retrying(what, Retry::LockConflicts, attempt).await
}

/// Runs `attempt` (one whole transaction) until it succeeds, fails for good, or has been tried
/// [`MAX_ATTEMPTS`] times. A failed attempt's transaction is rolled back when it is dropped.
async fn retrying<T, F, Fut>(
    what: &'static str,
    retry: Retry,
    mut attempt: F,
) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, LedgerError>>,
{
    let mut tried = 1;
    loop {
        match attempt().await {
            Err(error) if tried < MAX_ATTEMPTS && is_transient(&error, retry) => {
                tracing::debug!(%error, tried, what, "ledger transaction conflicted; re-running");
                tokio::time::sleep(backoff(tried)).await;
                tried += 1;
            }
            result => return result,
        }
    }
}

/// The balance and revision of an `accounts` row; the outlook is added once the transaction's
/// writes are planned ([`with_outlook`]).
fn snapshot_from_row(row: &MySqlRow) -> Result<Snapshot, LedgerError> {
    Ok(Snapshot::plain(
        credits(row, "balance")?,
        row.try_get("rev")?,
    ))
}

fn not_locked(account: &AccountId) -> LedgerError {
    LedgerError::Corrupt(format!("account {account} was not locked"))
}

/// The accounts a transaction has locked, with their balances and debts as read under the lock.
struct Locked {
    balances: HashMap<AccountId, Snapshot>,
    /// Micro-credits of debits that no grant covered (see [`super::grants`]).
    debts: HashMap<AccountId, i64>,
    /// Accounts this transaction inserted (they did not exist before it).
    created: HashSet<AccountId>,
}

impl Locked {
    fn get(&self, account: &AccountId) -> Result<Snapshot, LedgerError> {
        self.balances
            .get(account)
            .copied()
            .ok_or_else(|| not_locked(account))
    }

    fn debt(&self, account: &AccountId) -> Result<i64, LedgerError> {
        self.debts
            .get(account)
            .copied()
            .ok_or_else(|| not_locked(account))
    }
}

/// Locks `accounts` for update, creating the missing ones, inside the caller's transaction.
///
/// The ids are locked in ascending order by one statement per chunk, which every transaction of
/// this adapter does the same way, so lock waits cannot form a cycle. Missing accounts are then
/// inserted (a racing creator makes the insert fail with a duplicate key, and the caller re-runs
/// the transaction, which then finds the row).
async fn lock_accounts(
    conn: &mut MySqlConnection,
    accounts: &BTreeSet<&AccountId>,
) -> Result<Locked, LedgerError> {
    let sorted: Vec<&AccountId> = accounts.iter().copied().collect();
    let mut found: HashMap<String, (Snapshot, i64)> = HashMap::with_capacity(sorted.len());
    for chunk in sorted.chunks(CHUNK) {
        let mut query =
            QueryBuilder::<MySql>::new("SELECT id, balance, rev, debt FROM accounts WHERE id IN (");
        let mut list = query.separated(", ");
        for account in chunk {
            list.push_bind(account.as_str());
        }
        query.push(") ORDER BY id FOR UPDATE");
        for row in query.build().fetch_all(&mut *conn).await? {
            found.insert(
                row.try_get("id")?,
                (snapshot_from_row(&row)?, row.try_get("debt")?),
            );
        }
    }
    let mut locked = Locked {
        balances: HashMap::with_capacity(sorted.len()),
        debts: HashMap::with_capacity(sorted.len()),
        created: HashSet::new(),
    };
    let mut missing = Vec::new();
    for account in &sorted {
        match found.get(account.as_str()) {
            Some((snapshot, debt)) => {
                locked.balances.insert((*account).clone(), *snapshot);
                locked.debts.insert((*account).clone(), *debt);
            }
            None => missing.push(*account),
        }
    }
    let now = now_ms();
    for chunk in missing.chunks(CHUNK) {
        let mut insert = QueryBuilder::<MySql>::new("");
        settle_writes::new_accounts(&mut insert, chunk, now);
        insert.build().execute(&mut *conn).await?;
        for account in chunk {
            let account = (*account).clone();
            locked
                .balances
                .insert(account.clone(), Snapshot::plain(Credits::ZERO, 0));
            locked.debts.insert(account.clone(), 0);
            locked.created.insert(account);
        }
    }
    Ok(locked)
}

async fn lock_account(
    conn: &mut MySqlConnection,
    account: &AccountId,
) -> Result<Locked, LedgerError> {
    lock_accounts(conn, &BTreeSet::from([account])).await
}

/// Locks the live grants (unswept, something left) of `accounts`, whose rows the caller has
/// already locked, and returns them per account in [`drawing_order`]. Every transaction that
/// changes a grant holds its account's lock first, so these locks never wait in a cycle.
async fn lock_live_grants(
    conn: &mut MySqlConnection,
    accounts: &BTreeSet<&AccountId>,
) -> Result<HashMap<AccountId, Vec<GrantRow>>, LedgerError> {
    let sorted: Vec<&AccountId> = accounts.iter().copied().collect();
    let mut grants: HashMap<AccountId, Vec<GrantRow>> = HashMap::with_capacity(sorted.len());
    for chunk in sorted.chunks(CHUNK) {
        let mut query = QueryBuilder::<MySql>::new(
            "SELECT id, account_id, remaining, expires_at, created_at FROM credit_grants \
             WHERE expired_at IS NULL AND remaining > 0 AND account_id IN (",
        );
        let mut list = query.separated(", ");
        for account in chunk {
            list.push_bind(account.as_str());
        }
        query.push(") ORDER BY id FOR UPDATE");
        for row in query.build().fetch_all(&mut *conn).await? {
            let account: String = row.try_get("account_id")?;
            grants
                .entry(parse_account(&account)?)
                .or_default()
                .push(grant_row(&row)?);
        }
    }
    for account_grants in grants.values_mut() {
        drawing_order(account_grants);
    }
    Ok(grants)
}

/// Writes a settle plan's new rows: usage entries, then the records and draws that find those
/// entries' ids, one multi-row statement per table (per [`CHUNK`]).
async fn insert_settle_rows(
    conn: &mut MySqlConnection,
    plan: &SettlePlan<'_>,
    now: i64,
) -> Result<(), LedgerError> {
    for chunk in plan.entries.chunks(CHUNK) {
        let mut insert = QueryBuilder::<MySql>::new("");
        settle_writes::usage_entries(&mut insert, chunk, now);
        insert.build().execute(&mut *conn).await?;
    }
    for chunk in plan.records.chunks(CHUNK) {
        let mut insert = QueryBuilder::<MySql>::new("");
        settle_writes::usage_records(&mut insert, chunk, now);
        insert.build().execute(&mut *conn).await?;
    }
    for chunk in plan.draws.chunks(CHUNK) {
        let mut insert = QueryBuilder::<MySql>::new("");
        settle_writes::usage_draws(&mut insert, chunk);
        insert.build().execute(&mut *conn).await?;
    }
    Ok(())
}

impl MySqlLedger {
    async fn create_account_once(
        &self,
        account: &AccountId,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let locked = lock_account(&mut tx, account).await?;
        let mut snapshot =
            Sql::with_outlook(&mut tx, account, locked.get(account)?, now_ms()).await?;
        if locked.created.contains(account) && signup_grant.is_positive() {
            let (_, after) = Sql::append_entry(
                &mut tx,
                account,
                snapshot,
                locked.debt(account)?,
                EntryType::Bonus,
                signup_grant,
                "signup grant",
                Some("signup"),
                None,
                &[],
            )
            .await?;
            snapshot = after;
        }
        tx.commit().await?;
        Ok(snapshot)
    }

    async fn grant_once(&self, grant: &GrantRequest) -> Result<GrantOutcome, LedgerError> {
        let mut tx = self.pool.begin().await?;
        let locked = lock_account(&mut tx, &grant.account).await?;
        let before = locked.get(&grant.account)?;
        // Under the account's lock: a grant racing with this one for the same reference has
        // either committed (and is seen here) or waits for this transaction.
        if let Some(entry) = Sql::granted_before(&mut tx, grant).await? {
            let snapshot = Sql::with_outlook(&mut tx, &grant.account, before, now_ms()).await?;
            tx.commit().await?;
            return Ok(GrantOutcome {
                entry,
                applied: false,
                snapshot,
            });
        }
        let debt = locked.debt(&grant.account)?;
        let (entry, snapshot) = Sql::append_grant(&mut tx, grant, before, debt).await?;
        tx.commit().await?;
        Ok(GrantOutcome {
            entry,
            applied: true,
            snapshot,
        })
    }

    async fn settle_once(&self, batch: &[Settlement]) -> Result<Vec<SettleOutcome>, LedgerError> {
        let accounts: BTreeSet<&AccountId> = batch.iter().map(|s| &s.account).collect();
        let keys: BTreeSet<&str> = batch
            .iter()
            .filter_map(|s| s.api_key_id.as_deref())
            .collect();
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let locked = lock_accounts(&mut tx, &accounts).await?;
        let mut state = BatchState {
            settled: Sql::settled_request_ids(&mut tx, batch).await?,
            // Locked after the accounts; every account's are read, since each outcome reports
            // the account's expiry outlook.
            grants: lock_live_grants(&mut tx, &accounts).await?,
            keys: Sql::key_spends(&mut tx, &keys).await?,
            ..BatchState::default()
        };
        for (account, snapshot) in &locked.balances {
            let read = BatchAccount {
                balance: snapshot.balance,
                rev: snapshot.rev,
                debt: locked.debt(account)?,
            };
            state.accounts.insert(account.clone(), read);
        }
        let plan = settle_plan::plan(batch, state, now)?;
        insert_settle_rows(&mut tx, &plan, now).await?;
        Sql::in_chunks(&mut tx, &plan.grants, settle_writes::grants_remaining).await?;
        Sql::in_chunks(&mut tx, &plan.accounts, |update, chunk| {
            settle_writes::accounts(update, chunk, now)
        })
        .await?;
        Sql::in_chunks(&mut tx, &plan.keys, settle_writes::key_spend).await?;
        tx.commit().await?;
        Ok(plan.outcomes)
    }

    /// Sweeps one account's due grants in one transaction (see [`Ledger::expire_account`]).
    async fn expire_account_once(
        &self,
        account: &AccountId,
        now: i64,
        keep: Credits,
    ) -> Result<(Snapshot, bool), LedgerError> {
        let mut tx = self.pool.begin().await?;
        let locked = lock_account(&mut tx, account).await?;
        let swept =
            Sql::sweep_due_grants(&mut tx, account, now, keep, locked.get(account)?).await?;
        tx.commit().await?;
        Ok(swept)
    }

    async fn create_api_key_once(&self, key: &ApiKeyRecord) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin().await?;
        // The key's owner must exist; creating it changes no balance, so no lock is needed
        // beyond the one this upsert takes, and a racing creator is no error.
        let now = now_ms();
        sqlx::query(
            "INSERT INTO accounts (id, balance, rev, created_at, updated_at) \
             VALUES (?, 0, 0, ?, ?) ON DUPLICATE KEY UPDATE id = id",
        )
        .bind(key.account.as_str())
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Sql::insert_api_key(&mut tx, key).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl SqlAdapter for MySqlLedger {
    type Db = MySql;

    fn pool(&self) -> &sqlx::Pool<MySql> {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), LedgerError> {
        // sqlx holds a named server lock while it migrates, so instances starting together
        // apply each migration once.
        migrator().run(&self.pool).await?;
        Ok(())
    }

    async fn ensure_account(
        &self,
        account: &AccountId,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError> {
        if let Some(snapshot) =
            Sql::account_snapshot(&mut *self.pool.acquire().await?, account).await?
        {
            return Ok(snapshot);
        }
        retrying("ensure_account", Retry::LockConflictsAndDuplicates, || {
            self.create_account_once(account, signup_grant)
        })
        .await
    }

    async fn grant(&self, grant: &GrantRequest) -> Result<GrantOutcome, LedgerError> {
        retrying("grant", Retry::LockConflictsAndDuplicates, || {
            self.grant_once(grant)
        })
        .await
    }

    async fn settle_batch(&self, batch: &[Settlement]) -> Result<Vec<SettleOutcome>, LedgerError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        retrying("settle_batch", Retry::LockConflictsAndDuplicates, || {
            self.settle_once(batch)
        })
        .await
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), LedgerError> {
        // Not re-run on a duplicate key: a second key with the same id or hash is an error.
        retrying("create_api_key", Retry::LockConflicts, || {
            self.create_api_key_once(key)
        })
        .await
    }

    async fn expire_account(
        &self,
        account: &AccountId,
        now: i64,
        keep: Credits,
    ) -> Result<(Snapshot, bool), LedgerError> {
        // A racing sweeper's expiry entry for the same grant hits the unique key; the re-run
        // then finds the grant swept and does nothing.
        retrying("expire_grants", Retry::LockConflictsAndDuplicates, || {
            self.expire_account_once(account, now, keep)
        })
        .await
    }
}
