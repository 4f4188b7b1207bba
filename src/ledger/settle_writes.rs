//! The statements that write a settle plan's new row values ([`super::settle_plan`]), built the
//! same way for either database: one `UPDATE … SET column = CASE id WHEN … THEN … END, …
//! WHERE id IN (…)` per chunk of rows, which both SQLite and MySQL accept. Each is pushed onto
//! the caller's query, which may hold other statements before it (SQLite runs several in one
//! query).

use sqlx::{Database, Encode, QueryBuilder, Type};

use super::settle_plan::{AccountWrite, KeyWrite};

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
