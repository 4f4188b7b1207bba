//! The two upserts of the payments store that each database spells its own way; the rest of
//! what differs (starting a write transaction, the row lock, a consistent read, re-runs) is the
//! ledger's [`SqlDialect`], which the store shares.

use sqlx::{MySql, Sqlite};

use crate::ledger::sql::SqlDialect;

pub trait PaymentDialect: SqlDialect {
    /// Increments a year's (`?`) invoice counter, creating it at 1.
    const BUMP_INVOICE_COUNTER: &'static str;
    /// Writes an account's statement of a month over an older one: `(account_id,
    /// billing_month, document, generated_at)`.
    const UPSERT_STATEMENT: &'static str;
}

impl PaymentDialect for Sqlite {
    const BUMP_INVOICE_COUNTER: &'static str = "INSERT INTO invoice_counters (year, last_number) \
         VALUES (?, 1) ON CONFLICT (year) DO UPDATE SET last_number = last_number + 1";
    const UPSERT_STATEMENT: &'static str = "INSERT INTO usage_statements (account_id, \
         billing_month, document, generated_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (account_id, billing_month) \
         DO UPDATE SET document = excluded.document, generated_at = excluded.generated_at";
}

impl PaymentDialect for MySql {
    const BUMP_INVOICE_COUNTER: &'static str = "INSERT INTO invoice_counters (year, last_number) \
         VALUES (?, 1) ON DUPLICATE KEY UPDATE last_number = last_number + 1";
    const UPSERT_STATEMENT: &'static str = "INSERT INTO usage_statements (account_id, \
         billing_month, document, generated_at) VALUES (?, ?, ?, ?) ON DUPLICATE KEY UPDATE \
         document = VALUES(document), generated_at = VALUES(generated_at)";
}
