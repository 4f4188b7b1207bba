//! SQLite ledger adapter: the embedded default (one file, WAL).
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single write lock up
//! front; balances, debts and grants read inside such a transaction cannot change under it, so
//! updates may set absolute values computed from those reads.
//!
//! # Durability
//!
//! Every write but one commits with `synchronous = FULL`: it is on the disk before the call
//! returns, so a payment credited (and acknowledged to its provider) survives a power loss. The
//! exception is the settle batch, on a connection of its own with `synchronous = NORMAL`: its
//! commit is in the WAL file, which a crash of the process cannot lose (docs/architecture.md I4), but is not
//! waited onto the disk, which would cost every response of the batch a disk flush (about 1 to 5
//! ms here). A power loss or OS crash may therefore lose the settlements of the last moments,
//! never more than that (the file stays consistent, and the next `FULL` commit flushes them too):
//! what a Redis journal with its default persistence also risks.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

use super::grants::{GrantRow, drawing_order};
use super::settle_plan::{self, AccountState as BatchAccount, BatchState, SettlePlan};
use super::settle_writes;
use super::sql::rows::credits;
use super::sql::statements::Statements;
use super::sql::{MigrationFile, SqlAdapter, migrator_of};
use super::{
    ApiKeyRecord, EntryType, GrantOutcome, GrantRequest, LedgerError, SettleOutcome, Settlement,
    Snapshot,
};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};

/// Migrations embedded at compile time, so the binary needs no `migrations/` folder at run time:
/// `(version, description, sql, no_tx)`.
const MIGRATIONS: &[MigrationFile] = &[
    (
        1,
        "ledger",
        include_str!("../../migrations/sqlite/0001_ledger.sql"),
        false,
    ),
    // Rebuilds `credit_transactions` with foreign keys off, which SQLite only allows outside a
    // transaction: the script opens (and commits) its own.
    (
        2,
        "grants",
        include_str!("../../migrations/sqlite/0002_grants.sql"),
        true,
    ),
    (
        3,
        "payments",
        include_str!("../../migrations/sqlite/0003_payments.sql"),
        false,
    ),
    (
        4,
        "coupons",
        include_str!("../../migrations/sqlite/0004_coupons.sql"),
        false,
    ),
    (
        5,
        "statements",
        include_str!("../../migrations/sqlite/0005_statements.sql"),
        false,
    ),
    (
        6,
        "settlement bounds",
        include_str!("../../migrations/sqlite/0006_settlement_bounds.sql"),
        false,
    ),
    (
        7,
        "settlements set aside",
        include_str!("../../migrations/sqlite/0007_settlements_set_aside.sql"),
        false,
    ),
];

fn migrator() -> Migrator {
    migrator_of(MIGRATIONS)
}

/// The shared statements, on SQLite.
type Sql = Statements<Sqlite>;

pub struct SqliteLedger {
    pool: SqlitePool,
    /// Settle batches only: one connection with `synchronous = NORMAL` (see the module docs).
    settle_pool: SqlitePool,
    options: SqliteConnectOptions,
}

impl SqliteLedger {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options.clone())
            .await?;
        // Its statements' text varies with the batch's size (one row or list item per
        // settlement), so its statement cache holds more than the default 100; a connection in
        // this process needs no liveness test before each batch.
        let settle_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_lazy_with(
                options
                    .clone()
                    .synchronous(SqliteSynchronous::Normal)
                    .statement_cache_capacity(SETTLE_STATEMENT_CACHE),
            );
        Ok(SqliteLedger {
            pool,
            settle_pool,
            options,
        })
    }

    pub async fn open_file(path: &Path) -> Result<Self, LedgerError> {
        Self::connect(&format!("sqlite://{}", path.display()), 4).await
    }
}

/// Inserts the account if it does not exist; returns true if it was created now.
async fn insert_account(
    conn: &mut SqliteConnection,
    account: &AccountId,
) -> Result<bool, LedgerError> {
    let now = now_ms();
    let done = sqlx::query(
        "INSERT INTO accounts (id, balance, rev, created_at, updated_at) VALUES (?, 0, 0, ?, ?) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(account.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// An account as a write transaction sees it: balance, revision and debt.
#[derive(Debug, Clone, Copy)]
struct AccountState {
    snapshot: Snapshot,
    /// Micro-credits of debits that no grant covered (see [`super::grants`]).
    debt: i64,
}

async fn read_state(
    conn: &mut SqliteConnection,
    account: &AccountId,
) -> Result<AccountState, LedgerError> {
    let row = sqlx::query("SELECT balance, rev, debt FROM accounts WHERE id = ?")
        .bind(account.as_str())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| LedgerError::Corrupt(format!("account {account} vanished")))?;
    Ok(AccountState {
        // Its outlook is filled in once the transaction's writes are planned.
        snapshot: Snapshot::plain(credits(&row, "balance")?, row.try_get("rev")?),
        debt: row.try_get("debt")?,
    })
}

/// Most rows (or list items) one statement of a settle batch carries, well under SQLite's limit
/// on bound parameters.
const CHUNK: usize = 256;

/// Prepared statements the settle connection keeps: about ten kinds, each in as many shapes as
/// there are batch sizes.
const SETTLE_STATEMENT_CACHE: usize = 1024;

/// Reads what a settle batch's plan depends on (see [`settle_plan`]), creating the batch's
/// missing accounts, inside the caller's `BEGIN IMMEDIATE` transaction: nothing read can change
/// before it commits. One statement per kind (per [`CHUNK`]), whatever the batch's size.
async fn read_batch_state(
    conn: &mut SqliteConnection,
    batch: &[Settlement],
) -> Result<BatchState, LedgerError> {
    let accounts: Vec<&AccountId> = batch
        .iter()
        .map(|s| &s.account)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let keys: BTreeSet<&str> = batch
        .iter()
        .filter_map(|s| s.api_key_id.as_deref())
        .collect();
    let mut state = BatchState::default();
    for chunk in accounts.chunks(CHUNK) {
        // One statement, so the balances and the grants come from the same state.
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT a.id AS account_id, a.balance, a.rev, a.debt, g.id AS grant_id, g.remaining, \
             g.expires_at, g.created_at FROM accounts a LEFT JOIN credit_grants g \
             ON g.account_id = a.id AND g.expired_at IS NULL AND g.remaining > 0 WHERE a.id IN (",
        );
        let mut list = query.separated(", ");
        for account in chunk {
            list.push_bind(account.as_str());
        }
        query.push(")");
        for row in query.build().fetch_all(&mut *conn).await? {
            let raw: String = row.try_get("account_id")?;
            let account = AccountId::parse(&raw)
                .map_err(|_| LedgerError::Corrupt(format!("account id `{raw}`")))?;
            if !state.accounts.contains_key(&account) {
                let read = BatchAccount {
                    balance: credits(&row, "balance")?,
                    rev: row.try_get("rev")?,
                    debt: row.try_get("debt")?,
                };
                state.accounts.insert(account.clone(), read);
            }
            if let Some(id) = row.try_get::<Option<i64>, _>("grant_id")? {
                state.grants.entry(account).or_default().push(GrantRow {
                    id,
                    remaining: row.try_get("remaining")?,
                    expires_at_ms: row.try_get("expires_at")?,
                    created_at_ms: row.try_get("created_at")?,
                });
            }
        }
    }
    for grants in state.grants.values_mut() {
        drawing_order(grants);
    }
    let missing: Vec<&AccountId> = accounts
        .iter()
        .copied()
        .filter(|account| !state.accounts.contains_key(*account))
        .collect();
    let now = now_ms();
    for chunk in missing.chunks(CHUNK) {
        let mut insert = QueryBuilder::<Sqlite>::new("");
        settle_writes::new_accounts(&mut insert, chunk, now);
        insert.build().execute(&mut *conn).await?;
        for account in chunk {
            let created = BatchAccount {
                balance: Credits::ZERO,
                rev: 0,
                debt: 0,
            };
            state.accounts.insert((*account).clone(), created);
        }
    }
    state.settled = Sql::settled_request_ids(&mut *conn, batch).await?;
    state.keys = Sql::key_spends(&mut *conn, &keys).await?;
    Ok(state)
}

/// Writes a settle batch's plan: one multi-row statement per table (per [`CHUNK`]), all sent
/// as one query, so the whole write costs one hand-off to sqlx's worker thread for the
/// connection instead of one per statement (about 0.25 ms less per response at one connection).
///
/// sqlx's SQLite driver runs every statement of a query, binding each one's `?` parameters in
/// turn from the query's one argument list. sqlx calls that behaviour deprecated (its issue
/// 3108) and may one day refuse such a query: the ledger contract tests (a batch spanning many
/// statements, verify after every settle) would then fail, and this should become one query
/// per statement again.
async fn write_settle_plan(
    conn: &mut SqliteConnection,
    plan: &SettlePlan<'_>,
    now: i64,
) -> Result<(), LedgerError> {
    let mut writes = QueryBuilder::<Sqlite>::new("");
    // Starts the next statement of the query.
    let next = |writes: &mut QueryBuilder<Sqlite>| {
        if !writes.sql().as_str().is_empty() {
            writes.push("; ");
        }
    };
    for chunk in plan.entries.chunks(CHUNK) {
        next(&mut writes);
        settle_writes::usage_entries(&mut writes, chunk, now);
    }
    for chunk in plan.records.chunks(CHUNK) {
        next(&mut writes);
        settle_writes::usage_records(&mut writes, chunk, now);
    }
    for chunk in plan.draws.chunks(CHUNK) {
        next(&mut writes);
        settle_writes::usage_draws(&mut writes, chunk);
    }
    for chunk in plan.grants.chunks(CHUNK) {
        next(&mut writes);
        settle_writes::grants_remaining(&mut writes, chunk);
    }
    for chunk in plan.accounts.chunks(CHUNK) {
        next(&mut writes);
        settle_writes::accounts(&mut writes, chunk, now);
    }
    for chunk in plan.keys.chunks(CHUNK) {
        next(&mut writes);
        settle_writes::key_spend(&mut writes, chunk);
    }
    if !writes.sql().as_str().is_empty() {
        writes.build().execute(&mut *conn).await?;
    }
    Ok(())
}

impl SqliteLedger {
    /// Sweeps one account's due grants in one transaction (see [`Ledger::expire_account`]).
    async fn sweep(
        &self,
        account: &AccountId,
        now: i64,
        keep: Credits,
    ) -> Result<(Snapshot, bool), LedgerError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let state = read_state(&mut tx, account).await?;
        let swept = Sql::sweep_due_grants(&mut tx, account, now, keep, state.snapshot).await?;
        tx.commit().await?;
        Ok(swept)
    }
}

#[async_trait]
impl SqlAdapter for SqliteLedger {
    type Db = Sqlite;

    fn pool(&self) -> &sqlx::Pool<Sqlite> {
        &self.pool
    }

    async fn migrate(&self) -> Result<(), LedgerError> {
        // On a connection of its own, closed afterwards: a migration run outside a transaction
        // that failed half-way may leave its own transaction open and foreign keys off on it,
        // which must not reach the pool.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(self.options.clone())
            .await?;
        let outcome = migrator().run(&pool).await;
        pool.close().await;
        outcome?;
        Ok(())
    }

    async fn ensure_account(
        &self,
        account: &AccountId,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError> {
        {
            let mut conn = self.pool.acquire().await?;
            if let Some(snapshot) = Sql::account_snapshot(&mut conn, account).await? {
                return Ok(snapshot);
            }
            // Returned to the pool before the transaction takes one, or concurrent first
            // sightings could each hold a connection while waiting for another.
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let created = insert_account(&mut tx, account).await?;
        if created && signup_grant.is_positive() {
            let state = read_state(&mut tx, account).await?;
            Sql::append_entry(
                &mut tx,
                account,
                state.snapshot,
                state.debt,
                EntryType::Bonus,
                signup_grant,
                "signup grant",
                Some("signup"),
                None,
                &[],
            )
            .await?;
        }
        let snapshot = Sql::account_snapshot(&mut tx, account)
            .await?
            .ok_or_else(|| LedgerError::Corrupt(format!("account {account} vanished")))?;
        tx.commit().await?;
        Ok(snapshot)
    }

    async fn grant(&self, grant: &GrantRequest) -> Result<GrantOutcome, LedgerError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_account(&mut tx, &grant.account).await?;
        if let Some(entry) = Sql::granted_before(&mut tx, grant).await? {
            let snapshot = Sql::account_snapshot(&mut tx, &grant.account)
                .await?
                .ok_or_else(|| LedgerError::Corrupt("account vanished".into()))?;
            tx.commit().await?;
            return Ok(GrantOutcome {
                entry,
                applied: false,
                snapshot,
            });
        }
        let state = read_state(&mut tx, &grant.account).await?;
        let (entry, snapshot) =
            Sql::append_grant(&mut tx, grant, state.snapshot, state.debt).await?;
        tx.commit().await?;
        Ok(GrantOutcome {
            entry,
            applied: true,
            snapshot,
        })
    }

    async fn settle_batch(&self, batch: &[Settlement]) -> Result<Vec<SettleOutcome>, LedgerError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut tx = self.settle_pool.begin_with("BEGIN IMMEDIATE").await?;
        let state = read_batch_state(&mut tx, batch).await?;
        let plan = settle_plan::plan(batch, state, now)?;
        write_settle_plan(&mut tx, &plan, now).await?;
        tx.commit().await?;
        Ok(plan.outcomes)
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_account(&mut tx, &key.account).await?;
        Sql::insert_api_key(&mut tx, key).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn expire_account(
        &self,
        account: &AccountId,
        now: i64,
        keep: Credits,
    ) -> Result<(Snapshot, bool), LedgerError> {
        self.sweep(account, now, keep).await
    }
}
