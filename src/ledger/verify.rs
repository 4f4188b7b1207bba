//! The database-independent part of [`Ledger::verify`](super::Ledger::verify).
//!
//! The shared SQL ([`super::sql`]) reads the rows inside one read transaction and feeds them
//! to [`Checks`]; [`Checks::finish`] then reports, account by account (in account id order),
//! every mismatch between balances, debts, ledger entries, grants and grant draws, every usage
//! record that cost more than its hold, and every debit that took a balance below `-overdraft`
//! without a documented cause:
//!
//! - a refund or negative adjustment (disputes are refunds) may create debt by itself;
//! - a usage entry may end below only if, while it ran (from its record's `started_at` to its
//!   entry), a refund, negative adjustment or expiry landed on the account: the reservation was
//!   checked against a balance that those then lowered;
//! - an expiry entry may end below only if a refund or negative adjustment landed on the account
//!   between the grant's expiry and the entry. Otherwise it exposes debt that usage ran up while
//!   the lapsed credits still propped the balance up: the overspend that [`super::grants`] rules
//!   out.
//!
//! A cost above the hold explains nothing: the gateway charges at most a request's hold and
//! records the excess as `uncharged` (docs/architecture.md I1), so a usage record with `cost > hold` can
//! only come from tampering or an old bug, and is a problem of its own.
//!
//! Length: the checks share one walk over the accounts and the causes of their debits; split, the
//! overdraft rule and its explanations would live in two places.

use std::collections::{BTreeMap, HashMap};

use futures_util::{TryStream, TryStreamExt};
use sqlx::{ColumnIndex, Database, Decode, Executor, IntoArguments, Row, Type};

use super::VerifyProblem;
use crate::domain::Credits;

/// Every account with its balance and debt, for [`Checks::accounts`].
const ACCOUNTS: &str = "SELECT id, balance, debt FROM accounts";
/// Every ledger entry in id order (per account, each account's own entry order), with its
/// usage record's start for a usage entry, for [`Checks::entries`].
const ENTRIES: &str = "SELECT t.id, t.account_id, t.`type`, t.amount, t.balance_before, \
     t.balance_after, t.reference, t.created_at, u.started_at \
     FROM credit_transactions t \
     LEFT JOIN usage_records u ON t.`type` = 'usage' AND u.request_id = t.reference \
     ORDER BY t.id";
/// Every grant in id order, for [`Checks::grants`].
const GRANTS: &str = "SELECT id, account_id, amount, debt_paid, remaining, expires_at, \
     expired_at FROM credit_grants ORDER BY id";
/// Every usage record that cost more than its hold, for [`Checks::above_hold`].
const ABOVE_HOLD: &str = "SELECT request_id, account_id, cost, hold FROM usage_records \
     WHERE cost > hold ORDER BY started_at, request_id";

/// The column reads the shared SQL needs, for the rows of any sqlx driver.
pub trait Columns {
    fn text(&self, column: &str) -> Result<String, sqlx::Error>;
    fn int(&self, column: &str) -> Result<i64, sqlx::Error>;
    fn optional_int(&self, column: &str) -> Result<Option<i64>, sqlx::Error>;
    fn optional_text(&self, column: &str) -> Result<Option<String>, sqlx::Error>;
    fn flag(&self, column: &str) -> Result<bool, sqlx::Error>;
}

impl<R> Columns for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> bool: Decode<'r, R::Database> + Type<R::Database>,
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

    fn flag(&self, column: &str) -> Result<bool, sqlx::Error> {
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
    /// Debits that may explain a balance below `-overdraft`: `(created_at, what)`.
    causes: Vec<(i64, Cause)>,
    /// Debits that left the balance below `-overdraft`, each to be explained by a cause.
    below: Vec<Below>,
    problems: Vec<String>,
}

/// A debit that can lower a balance below what reservations were checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// A refund or a negative adjustment.
    Taken,
    /// An expiry entry.
    Expiry,
}

/// A debit entry as the overdraft check sees it (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Debit {
    pub entry_id: i64,
    pub entry_type: String,
    pub balance_after: i64,
    pub created_at: i64,
    /// A usage entry's record: its request's `started_at`. `None` for other entries, or a usage
    /// entry without a record (reported elsewhere).
    pub usage: Option<i64>,
    /// The grant an expiry entry swept (from its reference `grant:<id>[:…]`).
    pub grant: Option<i64>,
}

/// A debit that left the balance below `-overdraft`.
struct Below {
    entry_id: i64,
    entry_type: String,
    balance_after: i64,
    created_at: i64,
    /// Usage: its request's start; expiry: the grant it swept.
    since: Since,
}

enum Since {
    Started(i64),
    GrantExpired(Option<i64>),
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
    /// Each grant's expiry, for the expiry entries that end below `-overdraft`.
    expiries: HashMap<i64, i64>,
    /// Micro-credits a balance may be reserved below zero (`metering.overdraft`).
    overdraft: i64,
}

impl Checks {
    /// With no overdraft.
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Checks against a balance floor of `-overdraft` (micro-credits, ≥ 0).
    pub(crate) fn with_overdraft(overdraft: i64) -> Self {
        Checks {
            overdraft: overdraft.max(0),
            ..Self::default()
        }
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

    /// A debit entry (amount < 0), for the overdraft check; per account in entry order.
    pub(crate) fn debit(&mut self, account: String, debit: Debit) {
        let floor = -i128::from(self.overdraft);
        let check = self.accounts.entry(account).or_default();
        let cause = match debit.entry_type.as_str() {
            "usage" => None,
            "expiry" => Some(Cause::Expiry),
            _ => Some(Cause::Taken),
        };
        if let Some(cause) = cause {
            check.causes.push((debit.created_at, cause));
        }
        if i128::from(debit.balance_after) >= floor || cause == Some(Cause::Taken) {
            return;
        }
        let since = match debit.entry_type.as_str() {
            // Without a record (reported as such elsewhere): only its own moment counts.
            "usage" => Since::Started(debit.usage.unwrap_or(debit.created_at)),
            _ => Since::GrantExpired(debit.grant),
        };
        check.below.push(Below {
            entry_id: debit.entry_id,
            entry_type: debit.entry_type,
            balance_after: debit.balance_after,
            created_at: debit.created_at,
            since,
        });
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

    /// A usage record that cost more than its hold: charged more than the gateway ever charges.
    pub(crate) fn above_hold(&mut self, account: String, request_id: &str, cost: i64, hold: i64) {
        self.accounts
            .entry(account)
            .or_default()
            .problems
            .push(format!(
                "usage record {request_id} cost {cost} but its hold was {hold}: the gateway \
                 charges at most the hold"
            ));
    }

    /// One grant's expiry time (grants without one need none).
    pub(crate) fn grant_expiry(&mut self, grant_id: i64, expires_at: i64) {
        self.expiries.insert(grant_id, expires_at);
    }

    /// Reads [`ACCOUNTS`], [`ENTRIES`], [`GRANTS`] and [`ABOVE_HOLD`] on `conn`, inside the
    /// caller's read transaction; the caller then feeds the grant draws with [`Checks::draw`].
    pub(crate) async fn read<DB>(
        conn: &mut DB::Connection,
        overdraft: Credits,
    ) -> Result<Self, sqlx::Error>
    where
        DB: Database,
        DB::Row: Columns,
        for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
        DB::Arguments: IntoArguments<DB>,
    {
        let mut checks = Self::with_overdraft(overdraft.micros());
        checks
            .accounts(sqlx::query::<DB>(ACCOUNTS).fetch(&mut *conn))
            .await?;
        checks
            .entries(sqlx::query::<DB>(ENTRIES).fetch(&mut *conn))
            .await?;
        checks
            .grants(sqlx::query::<DB>(GRANTS).fetch(&mut *conn))
            .await?;
        checks
            .above_holds(sqlx::query::<DB>(ABOVE_HOLD).fetch(&mut *conn))
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
            let account = row.text("account_id")?;
            let entry_id = row.int("id")?;
            let amount = row.int("amount")?;
            let balance_after = row.int("balance_after")?;
            self.entry(
                account.clone(),
                entry_id,
                amount,
                row.int("balance_before")?,
                balance_after,
            );
            if amount < 0 {
                let usage = row.optional_int("started_at")?;
                let grant = row
                    .optional_text("reference")?
                    .as_deref()
                    .and_then(|r| r.strip_prefix("grant:"))
                    .and_then(|r| r.split(':').next())
                    .and_then(|id| id.parse().ok());
                self.debit(
                    account,
                    Debit {
                        entry_id,
                        entry_type: row.text("type")?,
                        balance_after,
                        created_at: row.int("created_at")?,
                        usage,
                        grant,
                    },
                );
            }
        }
        Ok(())
    }

    /// Feeds the rows of [`ABOVE_HOLD`].
    async fn above_holds<S>(&mut self, mut rows: S) -> Result<(), sqlx::Error>
    where
        S: TryStream<Error = sqlx::Error> + Unpin,
        S::Ok: Columns,
    {
        while let Some(row) = rows.try_next().await? {
            self.above_hold(
                row.text("account_id")?,
                &row.text("request_id")?,
                row.int("cost")?,
                row.int("hold")?,
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
            let grant_id = row.int("id")?;
            self.grant(
                row.text("account_id")?,
                grant_id,
                row.int("amount")?,
                row.int("debt_paid")?,
                row.int("remaining")?,
                row.optional_int("expired_at")?,
            );
            if let Some(expires_at) = row.optional_int("expires_at")? {
                self.grant_expiry(grant_id, expires_at);
            }
        }
        Ok(())
    }

    /// Every problem found, by account id; per account: a missing account, then the entries'
    /// problems and the usage records above their hold, then the grants', then the debits below
    /// `-overdraft`, then the account's totals.
    pub(crate) fn finish(mut self) -> Vec<VerifyProblem> {
        for grant in std::mem::take(&mut self.grants) {
            self.check_grant(grant);
        }
        for check in self.accounts.values_mut() {
            for below in std::mem::take(&mut check.below) {
                if let Some(problem) = unexplained(&below, &check.causes, &self.expiries) {
                    check.problems.push(format!(
                        "{problem}, below the overdraft floor of {}",
                        -i128::from(self.overdraft)
                    ));
                }
            }
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

/// Why `below` is a problem, or `None` when a cause in its window explains it (module docs).
fn unexplained(
    below: &Below,
    causes: &[(i64, Cause)],
    expiries: &HashMap<i64, i64>,
) -> Option<String> {
    let Below {
        entry_id,
        entry_type,
        balance_after,
        created_at,
        since,
    } = below;
    let (from, explains): (i64, fn(Cause) -> bool) = match since {
        Since::Started(at) => (*at, |_| true),
        Since::GrantExpired(grant) => (
            grant
                .and_then(|id| expiries.get(&id).copied())
                .unwrap_or(i64::MIN),
            |cause| cause != Cause::Expiry,
        ),
    };
    let explained = causes
        .iter()
        .any(|(at, cause)| (from..=*created_at).contains(at) && explains(*cause));
    (!explained).then(|| {
        let unexplained = match since {
            Since::Started(_) => "no refund, adjustment or expiry while its request ran",
            Since::GrantExpired(_) => "no refund or adjustment since its grant expired",
        };
        format!(
            "entry {entry_id} ({entry_type}) left the balance at {balance_after} with \
             {unexplained} to explain it"
        )
    })
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

    fn debit(
        id: i64,
        entry_type: &str,
        after: i64,
        at: i64,
        usage: Option<i64>,
        grant: Option<i64>,
    ) -> Debit {
        Debit {
            entry_id: id,
            entry_type: entry_type.into(),
            balance_after: after,
            created_at: at,
            usage,
            grant,
        }
    }

    /// Overdraft problems only (the entries fed here do not chain; those problems are ignored).
    fn below(checks: Checks) -> Vec<String> {
        problems(checks)
            .into_iter()
            .map(|(_, problem)| problem)
            .filter(|problem| problem.contains("overdraft"))
            .collect()
    }

    #[test]
    fn usage_below_the_overdraft_needs_a_cause_while_its_request_ran() {
        let mut checks = Checks::with_overdraft(10);
        // At the floor is fine; below it is not.
        checks.debit("acct".into(), debit(1, "usage", -10, 100, Some(90), None));
        checks.debit("acct".into(), debit(2, "usage", -11, 200, Some(190), None));
        assert_eq!(
            below(checks),
            [
                "entry 2 (usage) left the balance at -11 with no refund, adjustment or expiry \
              while its request ran to explain it, below the overdraft floor of -10"
            ]
        );

        // A refund before the request started explains nothing; one while it ran does, as does
        // an expiry. Other usage explains nothing: it was reserved too.
        for (cause, explained) in [
            (debit(1, "refund", 0, 149, None, None), false),
            (debit(1, "refund", -20, 150, None, None), true),
            (debit(1, "adjustment", 5, 170, None, None), true),
            (debit(1, "expiry", 5, 200, None, Some(7)), true),
            (debit(1, "usage", 5, 160, Some(100), None), false),
        ] {
            let mut checks = Checks::new();
            checks.debit("acct".into(), cause.clone());
            checks.debit("acct".into(), debit(2, "usage", -1, 200, Some(150), None));
            assert_eq!(below(checks).is_empty(), explained, "{cause:?}");
        }
    }

    #[test]
    fn usage_that_cost_more_than_its_hold_is_reported_and_explains_nothing() {
        // The gateway charges at most the hold; a record above it is a problem of its own, and
        // no longer excuses its entry (or another) for going below the overdraft floor.
        let mut checks = Checks::new();
        checks.above_hold("acct".into(), "req-1", 30, 5);
        checks.debit("acct".into(), debit(2, "usage", -1, 200, Some(150), None));
        assert_eq!(
            problems(checks),
            vec![
                (
                    "acct".into(),
                    "entries or grants belong to an account that does not exist".into()
                ),
                (
                    "acct".into(),
                    "usage record req-1 cost 30 but its hold was 5: the gateway charges at most \
                     the hold"
                        .into()
                ),
                (
                    "acct".into(),
                    "entry 2 (usage) left the balance at -1 with no refund, adjustment or expiry \
                     while its request ran to explain it, below the overdraft floor of 0"
                        .into()
                ),
            ]
        );
    }

    #[test]
    fn refunds_and_adjustments_may_go_below_the_overdraft() {
        let mut checks = Checks::new();
        checks.debit("acct".into(), debit(1, "refund", -50, 100, None, None));
        checks.debit("acct".into(), debit(2, "adjustment", -60, 110, None, None));
        assert!(below(checks).is_empty());
    }

    #[test]
    fn an_expiry_below_the_overdraft_needs_a_cause_since_its_grant_expired() {
        let expired = |cause: Option<Debit>| {
            let mut checks = Checks::new();
            checks.grant_expiry(7, 1_000);
            if let Some(cause) = cause {
                checks.debit("acct".into(), cause);
            }
            checks.debit("acct".into(), debit(9, "expiry", -5, 2_000, None, Some(7)));
            below(checks)
        };
        assert_eq!(
            expired(None),
            [
                "entry 9 (expiry) left the balance at -5 with no refund or adjustment since its \
              grant expired to explain it, below the overdraft floor of 0"
            ]
        );
        // Usage within its hold that ran into debt while the lapsed grant propped the balance up
        // is what this catches; another expiry explains nothing either.
        assert_eq!(
            expired(Some(debit(1, "usage", 3, 1_500, Some(1_400), None))).len(),
            1
        );
        assert_eq!(
            expired(Some(debit(1, "expiry", 3, 1_500, None, Some(6)))).len(),
            1
        );
        // A refund after the grant expired explains it; before, not.
        assert!(expired(Some(debit(1, "refund", 3, 1_000, None, None))).is_empty());
        assert_eq!(
            expired(Some(debit(1, "refund", 3, 999, None, None))).len(),
            1
        );
    }
}
