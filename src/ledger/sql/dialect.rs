//! What differs between the two SQL databases where the adapters share their SQL: how a writing
//! transaction starts and locks a row, a consistent read, which failures re-run a transaction,
//! and a few spellings. The payments store builds on the same trait.

use std::future::Future;

use sqlx::mysql::MySqlQueryResult;
use sqlx::sqlite::SqliteQueryResult;
use sqlx::{
    Database, Executor as _, IntoArguments, MySql, Pool, SqlSafeStr as _, Sqlite, Transaction,
};

use crate::ledger::{Columns, LedgerError};

pub trait SqlDialect: Database<Row: Columns, Arguments: IntoArguments<Self>> {
    /// Starts a transaction that will write.
    const BEGIN_WRITE: &'static str;
    /// Appended to a `SELECT … WHERE <key> = ?` to lock the row it reads until commit.
    const LOCK: &'static str;
    /// The type a `CAST` turns a number into text with (sums that may not fit 64 bits).
    const TEXT: &'static str;
    /// The column that orders `usage_records` as they were written (the paging cursor).
    const USAGE_ORDER: &'static str;
    /// Inserts a settlement set aside, or nothing if its request id is there already:
    /// `(request_id, account_id, record, error, set_aside_at)`.
    const INSERT_SET_ASIDE: &'static str;

    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// The id a single-row insert gave its row.
    fn last_insert_id(result: &Self::QueryResult) -> Option<i64>;

    /// A read-only transaction in which every read sees the same snapshot.
    fn read_snapshot(
        pool: &Pool<Self>,
    ) -> impl Future<Output = Result<Transaction<'static, Self>, sqlx::Error>> + Send;

    /// Runs `attempt` (one whole transaction) again where the database asks for it.
    fn rerun<T, F, Fut>(
        what: &'static str,
        attempt: F,
    ) -> impl Future<Output = Result<T, LedgerError>> + Send
    where
        T: Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, LedgerError>> + Send;
}

/// The embedded database: one writer at a time, so a write transaction takes the database's
/// write lock at its start and never conflicts later.
impl SqlDialect for Sqlite {
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    const LOCK: &'static str = "";
    const TEXT: &'static str = "TEXT";
    const USAGE_ORDER: &'static str = "rowid";
    const INSERT_SET_ASIDE: &'static str = "INSERT INTO settlements_set_aside (request_id, \
         account_id, record, error, set_aside_at) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (request_id) DO NOTHING";

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    fn last_insert_id(result: &SqliteQueryResult) -> Option<i64> {
        Some(result.last_insert_rowid())
    }

    async fn read_snapshot(
        pool: &Pool<Sqlite>,
    ) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        // In WAL mode every read of one transaction sees the snapshot its first read took.
        pool.begin().await
    }

    async fn rerun<T, F, Fut>(_what: &'static str, mut attempt: F) -> Result<T, LedgerError>
    where
        T: Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, LedgerError>> + Send,
    {
        // Once: SQLite's one writer waits for the write lock (`busy_timeout`) instead of
        // failing, so a transaction never needs running again.
        attempt().await
    }
}

/// The shared database: row locks, and deadlocks or lock wait timeouts re-run the transaction.
impl SqlDialect for MySql {
    const BEGIN_WRITE: &'static str = "BEGIN";
    const LOCK: &'static str = " FOR UPDATE";
    const TEXT: &'static str = "CHAR";
    const USAGE_ORDER: &'static str = "id";
    const INSERT_SET_ASIDE: &'static str = "INSERT INTO settlements_set_aside (request_id, \
         account_id, record, error, set_aside_at) VALUES (?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE request_id = request_id";

    fn rows_affected(result: &MySqlQueryResult) -> u64 {
        result.rows_affected()
    }

    fn last_insert_id(result: &MySqlQueryResult) -> Option<i64> {
        i64::try_from(result.last_insert_id()).ok()
    }

    async fn read_snapshot(pool: &Pool<MySql>) -> Result<Transaction<'static, MySql>, sqlx::Error> {
        // The session default is READ COMMITTED; the `SET` applies to the next transaction only.
        let mut conn = pool.acquire().await?;
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await?;
        Transaction::begin(
            conn,
            Some("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY".into_sql_str()),
        )
        .await
    }

    async fn rerun<T, F, Fut>(what: &'static str, attempt: F) -> Result<T, LedgerError>
    where
        T: Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, LedgerError>> + Send,
    {
        crate::ledger::mysql::rerun_on_lock_conflict(what, attempt).await
    }
}
