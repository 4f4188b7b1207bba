//! The statements that write a settle plan ([`super::settle_plan`]), built the same way for
//! either database: multi-row inserts of its new rows, and one `UPDATE … SET column = CASE id
//! WHEN … THEN … END, … WHERE id IN (…)` per chunk of changed rows, which both SQLite and MySQL
//! accept (as they accept `` `type` ``, MySQL's quoting). Each is pushed onto the caller's query,
//! which may hold other statements before it (SQLite runs several in one query).

use sqlx::query_builder::Separated;
use sqlx::{Database, Encode, QueryBuilder, Type};

use super::Settlement;
use super::settle_plan::{AccountWrite, KeyWrite, PlannedDraw, PlannedEntry};
use crate::domain::{AccountId, Credits};

/// Inserts accounts a batch sees for the first time: no balance, revision 0.
pub(super) fn new_accounts<'a, DB>(
    query: &mut QueryBuilder<DB>,
    accounts: &[&'a AccountId],
    now: i64,
) where
    DB: Database,
    DB::Arguments: Default,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    query.push("INSERT INTO accounts (id, balance, rev, created_at, updated_at) ");
    query.push_values(accounts, |mut row, account| {
        row.push_bind(account.as_str())
            .push("0")
            .push("0")
            .push_bind(now)
            .push_bind(now);
    });
}

/// Inserts the usage entries of a batch's charged settlements.
pub(super) fn usage_entries<'a, DB>(
    query: &mut QueryBuilder<DB>,
    entries: &'a [PlannedEntry<'a>],
    now: i64,
) where
    DB: Database,
    DB::Arguments: Default,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
    String: Encode<'a, DB> + Type<DB>,
{
    query.push(
        "INSERT INTO credit_transactions (account_id, `type`, amount, balance_before, \
         balance_after, description, reference, created_at) ",
    );
    query.push_values(entries, |mut row, entry| {
        let s = entry.settlement;
        row.push_bind(s.account.as_str())
            .push("'usage'")
            .push_bind(entry.amount)
            .push_bind(entry.before.micros())
            .push_bind(entry.after.micros())
            .push_bind(entry.description())
            .push_bind(s.request_id.as_str())
            .push_bind(now);
    });
}

/// Inserts the usage records of a batch's applied settlements. A charged record finds its usage
/// entry's id by the entry's unique key in a subquery ([`push_usage_entry_id`]).
pub(super) fn usage_records<'a, DB>(
    query: &mut QueryBuilder<DB>,
    records: &[&'a Settlement],
    now: i64,
) where
    DB: Database,
    DB::Arguments: Default,
    i64: Encode<'a, DB> + Type<DB>,
    bool: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
{
    query.push(
        "INSERT INTO usage_records (request_id, account_id, api_key_id, endpoint, model, \
         upstream, prompt_tokens, completion_tokens, cached_tokens, cost, uncharged, hold, \
         source, stream, status, started_at, finished_at, settled_at, transaction_id) ",
    );
    query.push_values(records, |mut row, s| {
        row.push_bind(s.request_id.as_str())
            .push_bind(s.account.as_str())
            .push_bind(s.api_key_id.as_deref())
            .push_bind(s.endpoint.as_str())
            .push_bind(s.model.as_str())
            .push_bind(s.upstream.as_str())
            .push_bind(tokens(s.usage.prompt_tokens))
            .push_bind(tokens(s.usage.completion_tokens))
            .push_bind(tokens(s.usage.cached_tokens))
            .push_bind(s.cost.micros())
            .push_bind(s.uncharged.micros())
            .push_bind(s.hold.micros())
            .push_bind(s.source.as_str())
            .push_bind(s.stream)
            .push_bind(s.status.as_str())
            .push_bind(s.started_at_ms)
            .push_bind(s.finished_at_ms)
            .push_bind(now);
        push_usage_entry_id(&mut row, s);
    });
}

/// Inserts the grant draws of a batch's usage entries, each finding its entry's id as a usage
/// record does.
pub(super) fn usage_draws<'a, DB>(query: &mut QueryBuilder<DB>, draws: &'a [PlannedDraw<'a>])
where
    DB: Database,
    DB::Arguments: Default,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    query.push("INSERT INTO grant_draws (transaction_id, grant_id, amount) ");
    query.push_values(draws, |mut row, draw| {
        push_usage_entry_id(&mut row, draw.settlement);
        row.push_bind(draw.grant_id).push_bind(draw.amount);
    });
}

/// Pushes, as one value of a multi-row insert, the id of `s`'s usage entry, found by the entry's
/// unique key (account, `usage`, request id): a multi-row insert's auto-increment ids are not
/// guaranteed to be consecutive (MySQL's interleaved lock mode, Galera's increments). `NULL` for
/// a settlement without a charge.
fn push_usage_entry_id<'a, DB>(row: &mut Separated<'_, DB, &str>, s: &'a Settlement)
where
    DB: Database,
    DB::Arguments: Default,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    if s.cost == Credits::ZERO {
        row.push("NULL");
        return;
    }
    row.push("(SELECT t.id FROM credit_transactions t WHERE t.account_id = ")
        .push_bind_unseparated(s.account.as_str())
        .push_unseparated(" AND t.`type` = 'usage' AND t.reference = ")
        .push_bind_unseparated(s.request_id.as_str())
        .push_unseparated(")");
}

/// A token count as stored (saturating: counts beyond `i64` cannot occur in practice).
fn tokens(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Sets the planned `remaining` of grants, `(id, remaining)`.
pub(super) fn grants_remaining<'a, DB>(query: &mut QueryBuilder<DB>, grants: &[(i64, i64)])
where
    DB: Database,
    DB::Arguments: Default,
    i64: Encode<'a, DB> + Type<DB>,
{
    let rows: Vec<(i64, [i64; 1])> = grants.iter().map(|&(id, left)| (id, [left])).collect();
    case_update(query, "credit_grants", ["remaining"], &rows, None);
}

/// Sets the balance, debt and revision of a batch's accounts, and `updated_at`.
pub(super) fn accounts<'a, DB>(
    query: &mut QueryBuilder<DB>,
    accounts: &'a [AccountWrite<'_>],
    now: i64,
) where
    DB: Database,
    DB::Arguments: Default,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    let rows: Vec<(&str, [i64; 3])> = accounts
        .iter()
        .map(|a| (a.account.as_str(), [a.balance.micros(), a.debt, a.rev]))
        .collect();
    case_update(
        query,
        "accounts",
        ["balance", "debt", "rev"],
        &rows,
        Some(("updated_at", now)),
    );
}

/// Sets the spend and revision of a batch's keys.
pub(super) fn key_spend<'a, DB>(query: &mut QueryBuilder<DB>, keys: &'a [KeyWrite<'a>])
where
    DB: Database,
    DB::Arguments: Default,
    i64: Encode<'a, DB> + Type<DB>,
    &'a str: Encode<'a, DB> + Type<DB>,
{
    let rows: Vec<(&str, [i64; 2])> = keys.iter().map(|k| (k.key, [k.spent, k.rev])).collect();
    case_update(query, "api_keys", ["spent", "rev"], &rows, None);
}

/// `UPDATE table SET columns[j] = CASE id WHEN id_i THEN values_i[j] … END, …[, also = value]
/// WHERE id IN (ids)`.
fn case_update<'a, DB, Id, const N: usize>(
    update: &mut QueryBuilder<DB>,
    table: &str,
    columns: [&str; N],
    rows: &[(Id, [i64; N])],
    also: Option<(&str, i64)>,
) where
    DB: Database,
    DB::Arguments: Default,
    Id: Copy + Encode<'a, DB> + Type<DB>,
    i64: Encode<'a, DB> + Type<DB>,
{
    update.push("UPDATE ").push(table).push(" SET ");
    for (j, column) in columns.iter().enumerate() {
        if j > 0 {
            update.push(", ");
        }
        update.push(column).push(" = CASE id");
        for (id, values) in rows {
            update.push(" WHEN ").push_bind(*id);
            update.push(" THEN ").push_bind(values[j]);
        }
        update.push(" END");
    }
    if let Some((column, value)) = also {
        update.push(", ").push(column).push(" = ").push_bind(value);
    }
    update.push(" WHERE id IN (");
    let mut list = update.separated(", ");
    for (id, _) in rows {
        list.push_bind(*id);
    }
    update.push(")");
}
