//! The database-independent part of [`Ledger::verify`](super::Ledger::verify).
//!
//! Each adapter reads its rows inside one read transaction and feeds them to [`Checks`];
//! [`Checks::finish`] then reports, account by account (in account id order), every mismatch
//! between balances, debts, ledger entries, grants and grant draws.

use std::collections::{BTreeMap, HashMap};

use futures_util::{TryStream, TryStreamExt};
use sqlx::{ColumnIndex, Database, Decode, Executor, IntoArguments, Row, Type};

use super::VerifyProblem;

/// Every account with its balance and debt, for [`Checks::accounts`].
const ACCOUNTS: &str = "SELECT id, balance, debt FROM accounts";
/// Every ledger entry in id order (per account, each account's own entry order), for
/// [`Checks::entries`].
const ENTRIES: &str = "SELECT id, account_id, amount, balance_before, balance_after \
     FROM credit_transactions ORDER BY id";
/// Every grant in id order, for [`Checks::grants`].
const GRANTS: &str = "SELECT id, account_id, amount, debt_paid, remaining, expired_at \
     FROM credit_grants ORDER BY id";

/// The column reads the checks need, for the rows of any sqlx driver.
pub(crate) trait Columns {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn optional_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
}

impl<R> Columns for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    fn text(&self, column: &str) -> Result<String, sqlx::Error> {
        self.try_get(column)
    }

    fn int(&self, column: &str) -> Result<i64, sqlx::Error> {
        self.try_get(column)
    }

    fn optional_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(column)
    }

    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(column)
    }
}

/// Per-account state while the ledger is walked.
#[derive(Default)]
struct AccountCheck {
    exists: bool,
    balance: i64,
    debt: i64,
    running: i64,
    sum: i128,
    /// Σ remaining of the account's unswept grants.
    live_remaining: i128,
    problems: Vec<String>,
}

/// One grant row, checked in [`Checks::finish`] once every draw is known.
struct GrantCheck {
    account: String,
    grant_id: i64,
    amount: i64,
    debt_paid: i64,
    remaining: i64,
    live: bool,
}

/// Accumulates the rows of one consistent snapshot of the ledger.
#[derive(Default)]
pub(crate) struct Checks {
    accounts: BTreeMap<String, AccountCheck>,
    drawn: HashMap<i64, i128>,
    grants: Vec<GrantCheck>,
}

impl Checks {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// One row of `accounts`.
    pub(crate) fn account(&mut self, id: String, balance: i64, debt: i64) {
        let check = self.accounts.entry(id).or_default();
        check.exists = true;
        check.balance = balance;
        check.debt = debt;
    }

    /// One ledger entry; per account, entries must come in ascending id order (one pass over
    /// all entries `ORDER BY id` does). An account that does not exist is reported by `finish`.
    pub(crate) fn entry(
        &mut self,
        account: String,
        entry_id: i64,
        amount: i64,
        before: i64,
        after: i64,
    ) {
        let check = self.accounts.entry(account).or_default();
        if before != check.running {
            check.problems.push(format!(
                "entry {entry_id}: balance_before {before} but the previous entry left {}",
                check.running
            ));
        }
        if i128::from(before) + i128::from(amount) != i128::from(after) {
            check
                .problems
                .push(format!("entry {entry_id}: {before} + {amount} != {after}"));
        }
        check.running = after;
        check.sum += i128::from(amount);
    }

    /// A draw (or the sum of several draws) on a grant; may come before or after the grant.
    pub(crate) fn draw(&mut self, grant_id: i64, amount: i128) {
        *self.drawn.entry(grant_id).or_default() += amount;
    }

    /// One row of `credit_grants`; per account, grants are reported in the order they are fed.
    pub(crate) fn grant(
        &mut self,
        account: String,
        grant_id: i64,
        amount: i64,
        debt_paid: i64,
        remaining: i64,
        expired_at: Option<i64>,
    ) {
        self.grants.push(GrantCheck {
            account,
            grant_id,
            amount,
            debt_paid,
            remaining,
            live: expired_at.is_none(),
        });
    }

    /// Reads [`ACCOUNTS`], [`ENTRIES`] and [`GRANTS`] on `conn`, inside the caller's read
    /// transaction; the caller then feeds the grant draws with [`Checks::draw`].
    pub(crate) async fn read<DB>(conn: &mut DB::Connection) -> Result<Self, sqlx::Error>
    where
        DB: Database,
        DB::Row: Columns,
        for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
        DB::Arguments: IntoArguments<DB>,
    {
        let mut checks = Self::new();
        checks
            .accounts(sqlx::query::<DB>(ACCOUNTS).fetch(&mut *conn))
            .await?;
        checks
            .entries(sqlx::query::<DB>(ENTRIES).fetch(&mut *conn))
            .await?;
        checks
            .grants(sqlx::query::<DB>(GRANTS).fetch(&mut *conn))
            .await?;
        Ok(checks)
    }

    /// Feeds the rows of [`ACCOUNTS`].
    async fn accounts<S>(&mut self, mut rows: S) -> Result<(), sqlx::Error>
    where
        S: TryStream<Error = sqlx::Error> + Unpin,
        S::Ok: Columns,
    {
        while let Some(row) = rows.try_next().await? {
            self.account(row.text("id")?, row.int("balance")?, row.int("debt")?);
        }
        Ok(())
    }

    /// Feeds the rows of [`ENTRIES`].
    async fn entries<S>(&mut self, mut rows: S) -> Result<(), sqlx::Error>
    where
        S: TryStream<Error = sqlx::Error> + Unpin,
        S::Ok: Columns,
    {
        while let Some(row) = rows.try_next().await? {
            self.entry(
                row.text("account_id")?,
                row.int("id")?,
                row.int("amount")?,
                row.int("balance_before")?,
                row.int("balance_after")?,
            );
        }
        Ok(())
    }

    /// Feeds the rows of [`GRANTS`].
    async fn grants<S>(&mut self, mut rows: S) -> Result<(), sqlx::Error>
    where
        S: TryStream<Error = sqlx::Error> + Unpin,
        S::Ok: Columns,
    {
        while let Some(row) = rows.try_next().await? {
            self.grant(
                row.text("account_id")?,
                row.int("id")?,
                row.int("amount")?,
                row.int("debt_paid")?,
                row.int("remaining")?,
                row.optional_int("expired_at")?,
            );
        }
        Ok(())
    }

    /// Every problem found, by account id; per account: a missing account, then the entries'
    /// problems, then the grants', then the account's totals.
    pub(crate) fn finish(mut self) -> Vec<VerifyProblem> {
        for grant in std::mem::take(&mut self.grants) {
            self.check_grant(grant);
        }
        let mut problems = Vec::new();
        for (account, check) in self.accounts {
            let mut report = |problem: String| {
                problems.push(VerifyProblem {
                    account: account.clone(),
                    problem,
                });
            };
            if !check.exists {
                report("entries or grants belong to an account that does not exist".into());
            }
            for problem in check.problems {
                report(problem);
            }
            if check.sum != i128::from(check.balance) {
                report(format!(
                    "entries sum to {} micro-credits but the balance is {}",
                    check.sum, check.balance
                ));
            }
            if check.debt < 0 {
                report(format!("debt {} is negative", check.debt));
            }
            if check.live_remaining - i128::from(check.debt) != i128::from(check.balance) {
                report(format!(
                    "live grants hold {} and the debt is {}, but the balance is {}",
                    check.live_remaining, check.debt, check.balance
                ));
            }
        }
        problems
    }

    fn check_grant(&mut self, grant: GrantCheck) {
        let GrantCheck {
            account,
            grant_id,
            amount,
            debt_paid,
            remaining,
            live,
        } = grant;
        let draws = self.drawn.get(&grant_id).copied().unwrap_or(0);
        let expected = i128::from(amount) - i128::from(debt_paid) - draws;
        let check = self.accounts.entry(account).or_default();
        if remaining < 0 {
            check.problems.push(format!(
                "grant {grant_id}: remaining {remaining} is negative"
            ));
        }
        if i128::from(remaining) != expected {
            check.problems.push(format!(
                "grant {grant_id}: remaining {remaining} but amount {amount} - debt paid \
                 {debt_paid} - drawn {draws} = {expected}"
            ));
        }
        if live {
            check.live_remaining += i128::from(remaining);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(checks: Checks) -> Vec<(String, String)> {
        checks
            .finish()
            .into_iter()
            .map(|p| (p.account, p.problem))
            .collect()
    }

    /// `acct`: a 100 grant, 30 of it drawn by a debit; balance 70, no debt.
    fn consistent() -> Checks {
        let mut checks = Checks::new();
        checks.account("acct".into(), 70, 0);
        checks.entry("acct".into(), 1, 100, 0, 100);
        checks.entry("acct".into(), 2, -30, 100, 70);
        checks.draw(10, 30);
        checks.grant("acct".into(), 10, 100, 0, 70, None);
        checks
    }

    #[test]
    fn a_consistent_account_has_no_problem() {
        assert_eq!(problems(consistent()), vec![]);
    }

    #[test]
    fn draws_may_come_after_their_grant_and_expired_grants_do_not_count() {
        let mut checks = Checks::new();
        checks.account("acct".into(), 70, 0);
        checks.entry("acct".into(), 1, 100, 0, 100);
        checks.entry("acct".into(), 2, 5, 100, 105);
        checks.entry("acct".into(), 3, -35, 105, 70);
        checks.grant("acct".into(), 10, 100, 0, 70, None);
        checks.grant("acct".into(), 11, 5, 0, 0, Some(1));
        checks.draw(10, 20);
        checks.draw(10, 10);
        checks.draw(11, 5);
        assert_eq!(problems(checks), vec![]);
    }

    #[test]
    fn a_broken_chain_is_reported() {
        let mut checks = Checks::new();
        checks.account("acct".into(), 70, 0);
        checks.entry("acct".into(), 1, 100, 0, 100);
        checks.entry("acct".into(), 2, -30, 90, 70);
        checks.draw(10, 30);
        checks.grant("acct".into(), 10, 100, 0, 70, None);
        assert_eq!(
            problems(checks),
            vec![
                (
                    "acct".into(),
                    "entry 2: balance_before 90 but the previous entry left 100".into()
                ),
                ("acct".into(), "entry 2: 90 + -30 != 70".into()),
            ]
        );
    }

    #[test]
    fn a_wrong_sum_is_reported() {
        let mut checks = Checks::new();
        checks.account("acct".into(), 80, 0);
        checks.entry("acct".into(), 1, 100, 0, 100);
        checks.entry("acct".into(), 2, -30, 100, 70);
        checks.draw(10, 20);
        checks.grant("acct".into(), 10, 100, 0, 80, None);
        assert_eq!(
            problems(checks),
            vec![(
                "acct".into(),
                "entries sum to 70 micro-credits but the balance is 80".into()
            )]
        );
    }

    #[test]
    fn a_negative_debt_is_reported() {
        let mut checks = consistent();
        checks.account("acct".into(), 70, -5);
        assert_eq!(
            problems(checks),
            vec![
                ("acct".into(), "debt -5 is negative".into()),
                (
                    "acct".into(),
                    "live grants hold 70 and the debt is -5, but the balance is 70".into()
                ),
            ]
        );
    }

    #[test]
    fn a_grant_whose_remaining_does_not_add_up_is_reported() {
        let mut checks = Checks::new();
        checks.account("acct".into(), 70, 0);
        checks.entry("acct".into(), 1, 100, 0, 100);
        checks.entry("acct".into(), 2, -30, 100, 70);
        checks.draw(10, 30);
        checks.grant("acct".into(), 10, 100, 5, 70, None);
        assert_eq!(
            problems(checks),
            vec![(
                "acct".into(),
                "grant 10: remaining 70 but amount 100 - debt paid 5 - drawn 30 = 65".into()
            )]
        );
    }

    #[test]
    fn a_negative_remaining_and_a_missing_account_are_reported() {
        let mut checks = consistent();
        checks.entry("ghost".into(), 3, 0, 0, 0);
        checks.grant("ghost".into(), 11, 0, 0, -1, Some(1));
        checks.draw(11, 1);
        assert_eq!(
            problems(checks),
            vec![
                (
                    "ghost".into(),
                    "entries or grants belong to an account that does not exist".into()
                ),
                ("ghost".into(), "grant 11: remaining -1 is negative".into()),
            ]
        );
    }
}
