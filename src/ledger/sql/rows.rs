//! The ledger's rows as both adapters read them: the columns each record needs and its
//! decoding, for the rows of either driver ([`Columns`]).

use crate::domain::{AccountId, Credits};
use crate::ledger::grants::GrantRow;
use crate::ledger::{
    ApiKeyRecord, Columns, EntryType, GrantRecord, LedgerEntry, LedgerError, UsageRecord,
};

/// The columns [`entry_from_row`] reads, followed by a `WHERE`.
pub(crate) const SELECT_ENTRIES: &str = "SELECT id, account_id, `type`, amount, \
     balance_before, balance_after, description, reference, created_at FROM credit_transactions ";

/// A grant's entry, found by its reference: `(account_id, type, reference)`.
pub(crate) const ENTRY_BY_REFERENCE: &str = "SELECT id, account_id, `type`, amount, \
     balance_before, balance_after, description, reference, created_at FROM credit_transactions \
     WHERE account_id = ? AND `type` = ? AND reference = ?";

/// The columns [`key_from_row`] reads, followed by a `WHERE`.
pub(crate) const SELECT_KEYS: &str = "SELECT id, account_id, key_hash, prefix, name, \
     spend_limit, spent, allowed_models, created_at, revoked_at FROM api_keys ";

/// The columns [`grant_from_row`] reads, followed by a `WHERE`.
pub(crate) const SELECT_GRANTS: &str = "SELECT id, source, transaction_id, amount, debt_paid, \
     remaining, expires_at, expired_at, created_at FROM credit_grants ";

/// The columns [`usage_from_row`] reads besides the cursor, which each database names its own
/// way ([`super::SqlDialect::USAGE_ORDER`]).
pub(crate) const USAGE_COLUMNS: &str = "request_id, api_key_id, endpoint, model, upstream, \
     prompt_tokens, completion_tokens, cached_tokens, cost, uncharged, hold, source, stream, \
     status, settled_at";

pub(crate) fn credits<R: Columns>(row: &R, column: &str) -> Result<Credits, sqlx::Error> {
    row.int(column).map(Credits::from_micros)
}

pub(crate) fn parse_account(raw: &str) -> Result<AccountId, LedgerError> {
    AccountId::parse(raw).map_err(|_| LedgerError::Corrupt(format!("account id `{raw}`")))
}

pub(crate) fn entry_from_row<R: Columns>(row: &R) -> Result<LedgerEntry, LedgerError> {
    let raw_type = row.text("type")?;
    Ok(LedgerEntry {
        id: row.int("id")?,
        account: parse_account(&row.text("account_id")?)?,
        entry_type: EntryType::parse(&raw_type)
            .ok_or_else(|| LedgerError::Corrupt(format!("entry type `{raw_type}`")))?,
        amount: credits(row, "amount")?,
        balance_before: credits(row, "balance_before")?,
        balance_after: credits(row, "balance_after")?,
        description: row.text("description")?,
        reference: row.optional_text("reference")?,
        created_at_ms: row.int("created_at")?,
    })
}

pub(crate) fn key_from_row<R: Columns>(row: &R) -> Result<ApiKeyRecord, LedgerError> {
    let allowed_models = row
        .optional_text("allowed_models")?
        .map(|json| serde_json::from_str::<Vec<String>>(&json))
        .transpose()
        .map_err(|e| LedgerError::Corrupt(format!("api key allowed_models: {e}")))?;
    Ok(ApiKeyRecord {
        id: row.text("id")?,
        account: parse_account(&row.text("account_id")?)?,
        key_hash: row.text("key_hash")?,
        prefix: row.text("prefix")?,
        name: row.text("name")?,
        spend_limit: row.optional_int("spend_limit")?.map(Credits::from_micros),
        spent: credits(row, "spent")?,
        allowed_models,
        created_at_ms: row.int("created_at")?,
        revoked_at_ms: row.optional_int("revoked_at")?,
    })
}

pub(crate) fn grant_from_row<R: Columns>(row: &R) -> Result<GrantRecord, LedgerError> {
    Ok(GrantRecord {
        id: row.int("id")?,
        source: row.text("source")?,
        transaction_id: row.optional_int("transaction_id")?,
        amount: credits(row, "amount")?,
        debt_paid: credits(row, "debt_paid")?,
        remaining: credits(row, "remaining")?,
        expires_at_ms: row.optional_int("expires_at")?,
        expired_at_ms: row.optional_int("expired_at")?,
        created_at_ms: row.int("created_at")?,
    })
}

/// A grant as the drawing order sees it.
pub(crate) fn grant_row<R: Columns>(row: &R) -> Result<GrantRow, sqlx::Error> {
    Ok(GrantRow {
        id: row.int("id")?,
        remaining: row.int("remaining")?,
        expires_at_ms: row.optional_int("expires_at")?,
        created_at_ms: row.int("created_at")?,
    })
}

/// A usage record whose paging cursor was selected as `page_cursor`.
pub(crate) fn usage_from_row<R: Columns>(row: &R) -> Result<UsageRecord, LedgerError> {
    Ok(UsageRecord {
        cursor: row.int("page_cursor")?,
        request_id: row.text("request_id")?,
        api_key_id: row.optional_text("api_key_id")?,
        endpoint: row.text("endpoint")?,
        model: row.text("model")?,
        upstream: row.text("upstream")?,
        prompt_tokens: row.int("prompt_tokens")?,
        completion_tokens: row.int("completion_tokens")?,
        cached_tokens: row.int("cached_tokens")?,
        cost: credits(row, "cost")?,
        uncharged: credits(row, "uncharged")?,
        hold: credits(row, "hold")?,
        source: row.text("source")?,
        stream: row.flag("stream")?,
        status: row.text("status")?,
        settled_at_ms: row.int("settled_at")?,
    })
}
