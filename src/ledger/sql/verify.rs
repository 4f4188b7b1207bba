//! [`Ledger::verify`](crate::ledger::Ledger::verify) on either database: one consistent read
//! feeds [`Checks`], then the set-aside, usage-entry and key-spend checks. Sums are read as
//! text, so a total beyond 64 bits is compared exactly instead of failing.

use std::collections::HashMap;

use futures_util::TryStreamExt as _;
use sqlx::{AssertSqlSafe, Executor, Pool, SqlSafeStr as _};

use super::SqlDialect;
use crate::domain::Credits;
use crate::ledger::verify::Checks;
use crate::ledger::{Columns as _, LedgerError, VerifyProblem, set_aside};

pub(super) async fn problems<DB>(
    pool: &Pool<DB>,
    overdraft: Credits,
) -> Result<Vec<VerifyProblem>, LedgerError>
where
    DB: SqlDialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    // One snapshot for every read, so settlements committing meanwhile cannot make balances,
    // entries and grants disagree.
    let mut tx = DB::read_snapshot(pool).await?;
    let mut checks = Checks::read::<DB>(&mut tx, overdraft).await?;
    {
        let sql = format!(
            "SELECT grant_id, CAST(SUM(amount) AS {}) AS drawn FROM grant_draws GROUP BY grant_id",
            DB::TEXT
        );
        let mut rows = sqlx::query::<DB>(AssertSqlSafe(sql).into_sql_str()).fetch(&mut *tx);
        while let Some(row) = rows.try_next().await? {
            let grant_id = row.int("grant_id")?;
            let drawn = exact_sum(&row.text("drawn")?, || format!("grant {grant_id}: draws"))?;
            checks.draw(grant_id, drawn);
        }
    }
    let mut problems = checks.finish();
    problems.extend(set_aside::verify::<DB>(&mut tx).await?);

    let orphans = format!(
        "SELECT u.request_id, u.account_id FROM usage_records u \
         LEFT JOIN credit_transactions t ON t.id = u.transaction_id \
         WHERE u.cost <> 0 \
         AND (t.id IS NULL OR t.amount <> -u.cost OR t.reference <> u.request_id) \
         ORDER BY u.{}",
        DB::USAGE_ORDER
    );
    for row in sqlx::query::<DB>(AssertSqlSafe(orphans).into_sql_str())
        .fetch_all(&mut *tx)
        .await?
    {
        problems.push(VerifyProblem {
            account: row.text("account_id")?,
            problem: format!(
                "usage record {} has no matching ledger entry",
                row.text("request_id")?
            ),
        });
    }

    let used = format!(
        "SELECT api_key_id, CAST(SUM(cost) AS {}) AS used FROM usage_records \
         WHERE api_key_id IS NOT NULL GROUP BY api_key_id",
        DB::TEXT
    );
    let mut used_by_key = HashMap::new();
    for row in sqlx::query::<DB>(AssertSqlSafe(used).into_sql_str())
        .fetch_all(&mut *tx)
        .await?
    {
        let key = row.text("api_key_id")?;
        let used = exact_sum(&row.text("used")?, || format!("api key {key}: usage"))?;
        used_by_key.insert(key, used);
    }
    for row in sqlx::query::<DB>("SELECT id, account_id, spent FROM api_keys ORDER BY id")
        .fetch_all(&mut *tx)
        .await?
    {
        let key = row.text("id")?;
        let spent = row.int("spent")?;
        let used = used_by_key.get(&key).copied().unwrap_or(0);
        if i128::from(spent) != used {
            problems.push(VerifyProblem {
                account: row.text("account_id")?,
                problem: format!("api key {key}: spent {spent} but its usage records cost {used}"),
            });
        }
    }
    tx.rollback().await?;
    Ok(problems)
}

/// A `SUM` read as text.
fn exact_sum(text: &str, what: impl FnOnce() -> String) -> Result<i128, LedgerError> {
    text.parse()
        .map_err(|_| LedgerError::Corrupt(format!("{} sum `{text}`", what())))
}
