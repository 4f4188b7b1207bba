//! Settlements set aside: what the settler keeps for an admin when the ledger refuses one
//! settlement on its own while it answers (a record it cannot store), instead of retrying it
//! forever in front of every other settlement (see [`crate::metering::settler`]).
//!
//! Nothing is charged for a settlement set aside: no usage record, no ledger entry. Each one is
//! a problem of [`Ledger::verify`](super::Ledger::verify) until an admin resolves it with a
//! note (`POST /admin/settlements/set-aside/{request_id}/resolve`), having charged what is owed
//! by hand if anything is. The SQL is the same in both dialects but for the insert's conflict
//! clause, which each adapter writes; rows decode generically ([`Columns`]).

use super::verify::Columns;
use super::{LedgerError, Settlement, VerifyProblem};

/// The longest error text kept (bytes): an error may quote the value it refused.
const MAX_ERROR_BYTES: usize = 4096;

/// One row of `settlements_set_aside`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub request_id: String,
    /// Text, not an [`AccountId`](crate::domain::AccountId): the row must keep whatever the
    /// refused settlement named.
    pub account: String,
    /// The serialized [`Settlement`] as it was refused (its journal record).
    pub record: String,
    /// Why the ledger refused it: its last error.
    pub error: String,
    pub set_aside_at_ms: i64,
    pub resolved_at_ms: Option<i64>,
    pub resolved_note: Option<String>,
}

impl SetAside {
    /// `settlement`, refused with `error`, set aside at `now_ms` (unresolved).
    pub fn new(settlement: &Settlement, error: &str, now_ms: i64) -> SetAside {
        let record = serde_json::to_string(settlement).unwrap_or_else(|e| {
            // A settlement is plain data; this cannot fail, but the row must exist regardless.
            format!("{{\"unserializable\":\"{e}\"}}")
        });
        SetAside {
            request_id: settlement.request_id.as_str().to_owned(),
            account: settlement.account.as_str().to_owned(),
            record,
            error: truncate(error, MAX_ERROR_BYTES).to_owned(),
            set_aside_at_ms: now_ms,
            resolved_at_ms: None,
            resolved_note: None,
        }
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncate(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

macro_rules! select_set_aside {
    () => {
        "SELECT request_id, account_id, record, error, set_aside_at, resolved_at, resolved_note \
         FROM settlements_set_aside "
    };
}

/// Newest first; ties (same millisecond) by request id, so the order is stable.
const ALL: &str = concat!(
    select_set_aside!(),
    "ORDER BY set_aside_at DESC, request_id DESC"
);
const UNRESOLVED: &str = concat!(
    select_set_aside!(),
    "WHERE resolved_at IS NULL ORDER BY set_aside_at DESC, request_id DESC"
);
const RESOLVED: &str = concat!(
    select_set_aside!(),
    "WHERE resolved_at IS NOT NULL ORDER BY set_aside_at DESC, request_id DESC"
);

/// The listing for [`Ledger::set_aside_settlements`](super::Ledger::set_aside_settlements).
pub(crate) fn list_sql(resolved: Option<bool>) -> &'static str {
    match resolved {
        None => ALL,
        Some(true) => RESOLVED,
        Some(false) => UNRESOLVED,
    }
}

/// One row by request id (`?`).
pub(crate) const ONE: &str = concat!(select_set_aside!(), "WHERE request_id = ?");

/// Resolves (`resolved_at = ?`, `resolved_note = ?`) the row of request id `?`, once: a second
/// resolution changes nothing.
pub(crate) const RESOLVE: &str = "UPDATE settlements_set_aside SET resolved_at = ?, \
     resolved_note = ? WHERE request_id = ? AND resolved_at IS NULL";

pub(crate) fn from_row<R: Columns>(row: &R) -> Result<SetAside, LedgerError> {
    Ok(SetAside {
        request_id: row.text("request_id")?,
        account: row.text("account_id")?,
        record: row.text("record")?,
        error: row.text("error")?,
        set_aside_at_ms: row.int("set_aside_at")?,
        resolved_at_ms: row.optional_int("resolved_at")?,
        resolved_note: row.optional_text("resolved_note")?,
    })
}

/// The set-aside check of [`Ledger::verify`](super::Ledger::verify), inside the caller's read
/// transaction: every settlement set aside and not resolved yet is a problem (it was not
/// charged, and nobody has said why that is right).
pub(crate) async fn verify<DB>(conn: &mut DB::Connection) -> Result<Vec<VerifyProblem>, LedgerError>
where
    DB: sqlx::Database,
    DB::Row: Columns,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    DB::Arguments: sqlx::IntoArguments<DB>,
{
    let mut problems = Vec::new();
    let rows = sqlx::query::<DB>(concat!(
        select_set_aside!(),
        "WHERE resolved_at IS NULL ORDER BY set_aside_at, request_id"
    ))
    .fetch_all(&mut *conn)
    .await?;
    for row in &rows {
        let entry = from_row(row)?;
        problems.push(VerifyProblem {
            account: entry.account,
            problem: format!(
                "settlement {} was set aside unresolved (nothing charged): {}",
                entry.request_id, entry.error
            ),
        });
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_is_cut_at_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        // `é` is two bytes: a cut inside it falls back before it.
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn each_filter_has_its_listing() {
        assert!(!list_sql(None).contains("WHERE"));
        assert!(list_sql(Some(true)).contains("IS NOT NULL"));
        assert!(list_sql(Some(false)).contains("resolved_at IS NULL"));
    }
}
