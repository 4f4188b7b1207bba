//! Statements the adapters' locking writes share, inside the caller's transaction: the caller
//! has taken whatever lock its database needs (SQLite's write lock, MySQL's account row lock)
//! before it calls these.
//!
//! Length: one `impl` block, so the driver bounds of its where-clause are written once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::marker::PhantomData;

use sqlx::{Encode, Executor, QueryBuilder, Type};

use super::SqlDialect;
use super::rows::{ENTRY_BY_REFERENCE, credits, entry_from_row, grant_row};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};
use crate::ledger::grants::{
    GrantRow, drawing_order, expiry_entry_text, plan_credit, plan_debit_from, plan_expiry,
};
use crate::ledger::settle_plan::KeySpend;
use crate::ledger::settle_writes;
use crate::ledger::{
    ApiKeyRecord, Columns as _, EntryType, GrantRequest, LedgerEntry, LedgerError, Settlement,
    Snapshot,
};

/// Values per IN list and rows per multi-row statement: far below either database's limit on
/// bound parameters, and big enough for a whole default settle batch (512) to take few
/// statements.
pub(in crate::ledger) const CHUNK: usize = 256;

/// The shared statements on database `DB` (a namespace: `Statements::<Sqlite>::…`).
pub(in crate::ledger) struct Statements<DB>(PhantomData<DB>);

impl<DB> Statements<DB>
where
    DB: SqlDialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB> + Type<DB>,
    i64: for<'q> Encode<'q, DB> + Type<DB>,
    Option<i64>: for<'q> Encode<'q, DB> + Type<DB>,
{
    /// The account's snapshot with the outlook of its unswept grants now; `None` if there is
    /// no such account. One statement, so the balance and the grants come from one state.
    pub(in crate::ledger) async fn account_snapshot(
        conn: &mut DB::Connection,
        account: &AccountId,
    ) -> Result<Option<Snapshot>, LedgerError> {
        let rows = sqlx::query::<DB>(
            "SELECT a.balance, a.rev, g.id, g.remaining, g.expires_at, g.created_at \
             FROM accounts a LEFT JOIN credit_grants g \
             ON g.account_id = a.id AND g.expired_at IS NULL AND g.remaining > 0 WHERE a.id = ?",
        )
        .bind(account.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut grants = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.optional_int("id")?.is_some() {
                grants.push(grant_row(row)?);
            }
        }
        Ok(Some(Snapshot::of_account(
            credits(first, "balance")?,
            first.int("rev")?,
            &grants,
            now_ms(),
        )))
    }

    /// The account's grants a debit may draw from, in [`drawing_order`], as the caller's
    /// transaction sees them (its own writes included); `lock`ed for a debit where the
    /// database locks rows.
    pub(in crate::ledger) async fn live_grants(
        conn: &mut DB::Connection,
        account: &AccountId,
        lock: bool,
    ) -> Result<Vec<GrantRow>, LedgerError> {
        let sql = format!(
            "SELECT id, remaining, expires_at, created_at FROM credit_grants \
             WHERE account_id = ? AND expired_at IS NULL AND remaining > 0 ORDER BY id{}",
            if lock { DB::LOCK } else { "" }
        );
        let mut grants = sqlx::query::<DB>(sqlx::AssertSqlSafe(sql))
            .bind(account.as_str())
            .fetch_all(&mut *conn)
            .await?
            .iter()
            .map(grant_row)
            .collect::<Result<Vec<_>, _>>()?;
        drawing_order(&mut grants);
        Ok(grants)
    }

    /// `snapshot` with the outlook at `at_ms` of the account's unswept grants.
    pub(in crate::ledger) async fn with_outlook(
        conn: &mut DB::Connection,
        account: &AccountId,
        snapshot: Snapshot,
        at_ms: i64,
    ) -> Result<Snapshot, LedgerError> {
        let grants = Self::live_grants(conn, account, false).await?;
        Ok(Snapshot::of_account(
            snapshot.balance,
            snapshot.rev,
            &grants,
            at_ms,
        ))
    }

    /// The ids of the grants that the account's entries `keys` (`(type, reference)`, unique
    /// per account) created, in the order of `keys`; an entry that does not exist or created
    /// no grant is left out. A grant's creating entry never changes, so this needs no lock.
    pub(in crate::ledger) async fn grants_created_by(
        conn: &mut DB::Connection,
        account: &AccountId,
        keys: &[(EntryType, String)],
    ) -> Result<Vec<i64>, LedgerError> {
        let mut ids = Vec::with_capacity(keys.len());
        for (entry_type, reference) in keys {
            let row = sqlx::query::<DB>(
                "SELECT g.id FROM credit_transactions t \
                 JOIN credit_grants g ON g.transaction_id = t.id \
                 WHERE t.account_id = ? AND t.`type` = ? AND t.reference = ?",
            )
            .bind(account.as_str())
            .bind(entry_type.as_str())
            .bind(reference.as_str())
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                ids.push(row.int("id")?);
            }
        }
        Ok(ids)
    }

    /// Appends one ledger entry (the account's balance is the caller's to write) and returns
    /// its id.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::ledger) async fn insert_entry(
        conn: &mut DB::Connection,
        account: &AccountId,
        entry_type: EntryType,
        amount: i64,
        before: Credits,
        after: Credits,
        description: &str,
        reference: Option<&str>,
        now: i64,
    ) -> Result<i64, LedgerError> {
        let inserted = sqlx::query::<DB>(
            "INSERT INTO credit_transactions (account_id, `type`, amount, balance_before, \
             balance_after, description, reference, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(account.as_str())
        .bind(entry_type.as_str())
        .bind(amount)
        .bind(before.micros())
        .bind(after.micros())
        .bind(description)
        .bind(reference)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        // A single-row insert: the last id is exactly this row's.
        DB::last_insert_id(&inserted)
            .ok_or_else(|| LedgerError::Corrupt("ledger entry id out of range".into()))
    }

    /// The grant a credit entry `transaction_id` creates: `amount`, of which `paid` paid the
    /// account's debt off and `remaining` is left to draw.
    #[allow(clippy::too_many_arguments)]
    async fn insert_grant(
        conn: &mut DB::Connection,
        account: &AccountId,
        source: EntryType,
        transaction_id: i64,
        amount: Credits,
        (paid, remaining): (i64, i64),
        expires_at_ms: Option<i64>,
        now: i64,
    ) -> Result<(), LedgerError> {
        sqlx::query::<DB>(
            "INSERT INTO credit_grants (account_id, source, transaction_id, amount, debt_paid, \
             remaining, expires_at, expired_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?)",
        )
        .bind(account.as_str())
        .bind(source.as_str())
        .bind(transaction_id)
        .bind(amount.micros())
        .bind(paid)
        .bind(remaining)
        .bind(expires_at_ms)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Records which grants the entry `entry_id` drew from, one statement per [`CHUNK`].
    pub(in crate::ledger) async fn insert_draws(
        conn: &mut DB::Connection,
        entry_id: i64,
        draws: &[(i64, i64)],
    ) -> Result<(), LedgerError> {
        Self::in_chunks(conn, draws, |insert, chunk| {
            insert.push("INSERT INTO grant_draws (transaction_id, grant_id, amount) ");
            insert.push_values(chunk, |mut row, (grant_id, amount)| {
                row.push_bind(entry_id)
                    .push_bind(*grant_id)
                    .push_bind(*amount);
            });
        })
        .await
    }

    /// Runs one statement per [`CHUNK`] of `items`, each built by `build`.
    pub(in crate::ledger) async fn in_chunks<'a, T>(
        conn: &mut DB::Connection,
        items: &'a [T],
        build: impl Fn(&mut QueryBuilder<DB>, &'a [T]),
    ) -> Result<(), LedgerError> {
        for chunk in items.chunks(CHUNK) {
            let mut statement = QueryBuilder::<DB>::new("");
            build(&mut statement, chunk);
            statement.build().execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// The request ids of `batch` that already have a usage record. Called under the write
    /// lock (SQLite) or after the batch's accounts are locked (MySQL), so every earlier
    /// settlement of these accounts has committed and is visible here.
    pub(in crate::ledger) async fn settled_request_ids(
        conn: &mut DB::Connection,
        batch: &[Settlement],
    ) -> Result<HashSet<String>, LedgerError> {
        let mut settled = HashSet::new();
        for chunk in batch.chunks(CHUNK) {
            let mut query = QueryBuilder::<DB>::new(
                "SELECT request_id FROM usage_records WHERE request_id IN (",
            );
            let mut list = query.separated(", ");
            for s in chunk {
                list.push_bind(s.request_id.as_str());
            }
            query.push(")");
            for row in query.build().fetch_all(&mut *conn).await? {
                settled.insert(row.text("request_id")?);
            }
        }
        Ok(settled)
    }

    /// The spend of the given API keys (those that exist), locked where the database locks
    /// rows: in ascending id order, after the accounts, the one order every transaction takes
    /// them in.
    pub(in crate::ledger) async fn key_spends(
        conn: &mut DB::Connection,
        keys: &BTreeSet<&str>,
    ) -> Result<HashMap<String, KeySpend>, LedgerError> {
        let sorted: Vec<&str> = keys.iter().copied().collect();
        let mut found = HashMap::with_capacity(sorted.len());
        for chunk in sorted.chunks(CHUNK) {
            let mut query = QueryBuilder::<DB>::new(
                "SELECT id, spend_limit, spent, rev FROM api_keys WHERE id IN (",
            );
            let mut list = query.separated(", ");
            for key in chunk {
                list.push_bind(*key);
            }
            query.push(") ORDER BY id");
            query.push(DB::LOCK);
            for row in query.build().fetch_all(&mut *conn).await? {
                let spend = KeySpend {
                    limit: row.optional_int("spend_limit")?,
                    spent: row.int("spent")?,
                    rev: row.int("rev")?,
                };
                found.insert(row.text("id")?, spend);
            }
        }
        Ok(found)
    }

    /// Writes a new key (its account exists).
    pub(in crate::ledger) async fn insert_api_key(
        conn: &mut DB::Connection,
        key: &ApiKeyRecord,
    ) -> Result<(), LedgerError> {
        let models = key
            .allowed_models
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| LedgerError::Corrupt(format!("api key allowed_models: {e}")))?;
        sqlx::query::<DB>(
            "INSERT INTO api_keys (id, account_id, key_hash, prefix, name, spend_limit, spent, \
             rev, allowed_models, created_at) VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?)",
        )
        .bind(key.id.as_str())
        .bind(key.account.as_str())
        .bind(key.key_hash.as_str())
        .bind(key.prefix.as_str())
        .bind(key.name.as_str())
        .bind(key.spend_limit.map(Credits::micros))
        .bind(models.as_deref())
        .bind(key.created_at_ms)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Appends one ledger entry and moves the account's balance from `before` and its debt
    /// from `debt` (both read under the account's lock), and applies the entry to the
    /// account's grants: a credit becomes a new grant (which pays the debt off first), a debit
    /// draws from the live grants (those created by the entries `draw_first` names first) and
    /// what they do not cover becomes debt.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::ledger) async fn append_entry(
        conn: &mut DB::Connection,
        account: &AccountId,
        before: Snapshot,
        debt: i64,
        entry_type: EntryType,
        amount: Credits,
        description: &str,
        reference: Option<&str>,
        expires_at_ms: Option<i64>,
        draw_first: &[(EntryType, String)],
    ) -> Result<(LedgerEntry, Snapshot), LedgerError> {
        let overflow = || LedgerError::Overflow(account.to_string());
        let after = before.balance.checked_add(amount).ok_or_else(overflow)?;
        let rev = before.rev.checked_add(1).ok_or_else(overflow)?;
        let now = now_ms();
        // Planned before anything is written, so an overflow changes nothing.
        let mut new_debt = debt;
        let mut credit = None;
        let mut debit = None;
        if amount.is_positive() {
            let (paid, remaining) = plan_credit(debt, amount.micros());
            new_debt -= paid;
            credit = Some((paid, remaining));
        } else if amount.is_negative() {
            let taken = amount.micros().checked_neg().ok_or_else(overflow)?;
            let mut grants = Self::live_grants(conn, account, true).await?;
            let first = Self::grants_created_by(conn, account, draw_first).await?;
            let plan = plan_debit_from(&mut grants, &first, taken, now);
            new_debt = debt.checked_add(plan.uncovered).ok_or_else(overflow)?;
            debit = Some((plan, grants));
        }
        let id = Self::insert_entry(
            conn,
            account,
            entry_type,
            amount.micros(),
            before.balance,
            after,
            description,
            reference,
            now,
        )
        .await?;
        sqlx::query::<DB>(
            "UPDATE accounts SET balance = ?, debt = ?, rev = ?, updated_at = ? WHERE id = ?",
        )
        .bind(after.micros())
        .bind(new_debt)
        .bind(rev)
        .bind(now)
        .bind(account.as_str())
        .execute(&mut *conn)
        .await?;
        if let Some(split) = credit {
            Self::insert_grant(
                conn,
                account,
                entry_type,
                id,
                amount,
                split,
                expires_at_ms,
                now,
            )
            .await?;
        }
        if let Some((plan, grants)) = debit {
            let drawn: BTreeSet<i64> = plan.draws.iter().map(|(grant, _)| *grant).collect();
            // In ascending id order, the order the grants were locked in.
            let remaining: BTreeMap<i64, i64> = grants
                .iter()
                .filter(|g| drawn.contains(&g.id))
                .map(|g| (g.id, g.remaining))
                .collect();
            let remaining: Vec<(i64, i64)> = remaining.into_iter().collect();
            Self::in_chunks(conn, &remaining, settle_writes::grants_remaining).await?;
            Self::insert_draws(conn, id, &plan.draws).await?;
        }
        let entry = LedgerEntry {
            id,
            account: account.clone(),
            entry_type,
            amount,
            balance_before: before.balance,
            balance_after: after,
            description: description.to_owned(),
            reference: reference.map(str::to_owned),
            created_at_ms: now,
        };
        let snapshot = Self::with_outlook(conn, account, Snapshot::plain(after, rev), now).await?;
        Ok((entry, snapshot))
    }

    /// The entry a grant with the same reference wrote before, if any (a grant without a
    /// reference is never a replay).
    pub(in crate::ledger) async fn granted_before(
        conn: &mut DB::Connection,
        grant: &GrantRequest,
    ) -> Result<Option<LedgerEntry>, LedgerError> {
        let Some(reference) = &grant.reference else {
            return Ok(None);
        };
        sqlx::query::<DB>(ENTRY_BY_REFERENCE)
            .bind(grant.account.as_str())
            .bind(grant.entry_type.as_str())
            .bind(reference.as_str())
            .fetch_optional(&mut *conn)
            .await?
            .as_ref()
            .map(entry_from_row)
            .transpose()
    }

    /// [`Self::append_entry`] of a grant request.
    pub(in crate::ledger) async fn append_grant(
        conn: &mut DB::Connection,
        grant: &GrantRequest,
        before: Snapshot,
        debt: i64,
    ) -> Result<(LedgerEntry, Snapshot), LedgerError> {
        Self::append_entry(
            conn,
            &grant.account,
            before,
            debt,
            grant.entry_type,
            grant.amount,
            &grant.description,
            grant.reference.as_deref(),
            grant.expires_at_ms,
            &grant.draw_first_from,
        )
        .await
    }

    /// Sweeps the account's grants due at `now` (see
    /// [`Ledger::expire_account`](crate::ledger::Ledger::expire_account)), from `snapshot`, the
    /// account's balance and revision read under its lock. Returns the snapshot after the
    /// sweep and whether its balance moved; the caller commits.
    pub(in crate::ledger) async fn sweep_due_grants(
        conn: &mut DB::Connection,
        account: &AccountId,
        now: i64,
        keep: Credits,
        mut snapshot: Snapshot,
    ) -> Result<(Snapshot, bool), LedgerError> {
        // Read under the account's lock: a sweep that committed meanwhile has set `expired_at`
        // or taken its part, and one still running waits for this transaction.
        let sql = format!(
            "SELECT id, source, amount, remaining, expires_at, created_at FROM credit_grants \
             WHERE account_id = ? AND expired_at IS NULL AND expires_at <= ? ORDER BY id{}",
            DB::LOCK
        );
        let rows = sqlx::query::<DB>(sqlx::AssertSqlSafe(sql))
            .bind(account.as_str())
            .bind(now)
            .fetch_all(&mut *conn)
            .await?;
        let mut due = Vec::with_capacity(rows.len());
        let mut origin = HashMap::with_capacity(rows.len());
        for row in &rows {
            let grant = grant_row(row)?;
            origin.insert(grant.id, (row.text("source")?, credits(row, "amount")?));
            due.push(grant);
        }
        drawing_order(&mut due);
        let overflow = || LedgerError::Overflow(account.to_string());
        let clock = now_ms();
        let mut moved = false;
        for (step, grant) in plan_expiry(&due, keep.micros()).iter().zip(&due) {
            if step.take > 0 {
                let (source, amount) = origin
                    .get(&grant.id)
                    .ok_or_else(|| LedgerError::Corrupt(format!("grant {} vanished", grant.id)))?;
                let before = snapshot.balance;
                let after = before
                    .checked_sub(Credits::from_micros(step.take))
                    .ok_or_else(overflow)?;
                // The reference names the grant and this sweep of it: a racing sweeper's entry
                // for the same sweep hits the unique key.
                let (description, reference) = expiry_entry_text(grant, source, *amount, step.keep);
                let entry_id = Self::insert_entry(
                    conn,
                    account,
                    EntryType::Expiry,
                    -step.take,
                    before,
                    after,
                    &description,
                    Some(&reference),
                    clock,
                )
                .await?;
                Self::insert_draws(conn, entry_id, &[(grant.id, step.take)]).await?;
                snapshot.balance = after;
                moved = true;
            }
            if step.keep == 0 {
                sqlx::query::<DB>(
                    "UPDATE credit_grants SET remaining = 0, expired_at = ? WHERE id = ?",
                )
                .bind(now)
                .bind(grant.id)
                .execute(&mut *conn)
                .await?;
            } else if step.take > 0 {
                sqlx::query::<DB>("UPDATE credit_grants SET remaining = ? WHERE id = ?")
                    .bind(step.keep)
                    .bind(grant.id)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        if moved {
            snapshot.rev = snapshot.rev.checked_add(1).ok_or_else(overflow)?;
            sqlx::query::<DB>(
                "UPDATE accounts SET balance = ?, rev = ?, updated_at = ? WHERE id = ?",
            )
            .bind(snapshot.balance.micros())
            .bind(snapshot.rev)
            .bind(clock)
            .bind(account.as_str())
            .execute(&mut *conn)
            .await?;
        }
        // The outlook from the later of the sweep's cutoff and now: a grant that lapsed in
        // between is reported lapsed (unavailable) rather than live.
        let snapshot = Self::with_outlook(conn, account, snapshot, now.max(clock)).await?;
        Ok((snapshot, moved))
    }
}
