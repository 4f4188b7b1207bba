//! What the payments store needs to know about each SQL driver: how a writing transaction
//! starts and locks a row, the two upserts, a consistent read, and which failures re-run a
//! transaction. Everything else ([`super::sql`]) is the same SQL on both.

use std::future::Future;

use sqlx::mysql::MySqlQueryResult;
use sqlx::sqlite::SqliteQueryResult;
use sqlx::{Database, IntoArguments, MySql, Pool, Sqlite, Transaction};

use crate::ledger::{Columns, LedgerError};

pub trait PaymentDialect: Database<Row: Columns, Arguments: IntoArguments<Self>> {
    /// Starts a transaction that will write.
    const BEGIN: &'static str;
    /// Appended to a `SELECT … WHERE <key> = ?` to lock the row it reads until commit.
    const LOCK: &'static str;
    /// Increments a year's (`?`) invoice counter, creating it at 1.
    const BUMP_INVOICE_COUNTER: &'static str;
    /// Writes an account's statement of a month over an older one: `(account_id,
    /// billing_month, document, generated_at)`.
    const UPSERT_STATEMENT: &'static str;

    fn rows_affected(result: &Self::QueryResult) -> u64;

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
impl PaymentDialect for Sqlite {
    const BEGIN: &'static str = "BEGIN IMMEDIATE";
    const LOCK: &'static str = "";
    const BUMP_INVOICE_COUNTER: &'static str = "INSERT INTO invoice_counters (year, last_number) \
         VALUES (?, 1) ON CONFLICT (year) DO UPDATE SET last_number = last_number + 1";
    const UPSERT_STATEMENT: &'static str = "INSERT INTO usage_statements (account_id, \
         billing_month, document, generated_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (account_id, billing_month) \
         DO UPDATE SET document = excluded.document, generated_at = excluded.generated_at";

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
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
impl PaymentDialect for MySql {
    const BEGIN: &'static str = "BEGIN";
    const LOCK: &'static str = " FOR UPDATE";
    const BUMP_INVOICE_COUNTER: &'static str = "INSERT INTO invoice_counters (year, last_number) \
         VALUES (?, 1) ON DUPLICATE KEY UPDATE last_number = last_number + 1";
    const UPSERT_STATEMENT: &'static str = "INSERT INTO usage_statements (account_id, \
         billing_month, document, generated_at) VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
         document = VALUES(document), generated_at = VALUES(generated_at)";

    fn rows_affected(result: &MySqlQueryResult) -> u64 {
        result.rows_affected()
    }

    fn read_snapshot(
        pool: &Pool<MySql>,
    ) -> impl Future<Output = Result<Transaction<'static, MySql>, sqlx::Error>> + Send {
        crate::ledger::mysql::read_snapshot(pool)
    }

    fn rerun<T, F, Fut>(
        what: &'static str,
        attempt: F,
    ) -> impl Future<Output = Result<T, LedgerError>> + Send
    where
        T: Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, LedgerError>> + Send,
    {
        crate::ledger::mysql::rerun_on_lock_conflict(what, attempt)
    }
}
