//! The payment books' own checks, run by `ledger verify` beside the ledger's
//! ([`verify_books`](super::verify_books)).

use std::collections::BTreeMap;

use super::dialect::PaymentDialect;
use crate::ledger::{Columns as _, LedgerError, VerifyProblem};

/// Applied credit moves whose ledger entry is missing or differs.
const UNMATCHED_MOVES: &str = "SELECT m.account_id, m.reference FROM order_credit_moves m \
     LEFT JOIN credit_transactions t ON t.account_id = m.account_id \
     AND t.type = m.entry_type AND t.reference = m.reference \
     WHERE m.applied_at IS NOT NULL AND (t.id IS NULL OR t.amount <> m.amount) \
     ORDER BY m.reference";

/// Orders that were paid but carry no invoice.
const UNINVOICED_ORDERS: &str = "SELECT account_id, id FROM orders WHERE paid_at IS NOT NULL \
     AND status <> 'review' AND invoice_id IS NULL ORDER BY seq";

const INVOICE_NUMBERS: &str = "SELECT number FROM invoices";
const INVOICE_COUNTERS: &str = "SELECT year, last_number FROM invoice_counters";

/// Coupons whose use count differs from the redemptions holding a use.
const COUPON_USES: &str = "SELECT c.code, c.uses, (SELECT COUNT(*) FROM coupon_redemptions r \
     WHERE r.code = c.code AND r.released_at IS NULL) AS held FROM coupons c ORDER BY c.code";

/// The payment checks, inside the caller's read transaction: every applied credit move is in
/// the ledger, every paid order has its invoice, each year's invoice numbers run from 1 to its
/// counter without a gap, and each coupon's use count matches the orders holding it.
pub(super) async fn problems<DB>(
    conn: &mut DB::Connection,
) -> Result<Vec<VerifyProblem>, LedgerError>
where
    DB: PaymentDialect,
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    let mut problems = Vec::new();
    for row in sqlx::query::<DB>(UNMATCHED_MOVES)
        .fetch_all(&mut *conn)
        .await?
    {
        problems.push(VerifyProblem {
            account: row.text("account_id")?,
            problem: format!(
                "order credit move {} is marked applied but has no matching ledger entry",
                row.text("reference")?
            ),
        });
    }
    for row in sqlx::query::<DB>(UNINVOICED_ORDERS)
        .fetch_all(&mut *conn)
        .await?
    {
        problems.push(VerifyProblem {
            account: row.text("account_id")?,
            problem: format!("order {} was paid but has no invoice", row.text("id")?),
        });
    }
    let mut issued: BTreeMap<i64, Vec<i64>> = Default::default();
    for row in sqlx::query::<DB>(INVOICE_NUMBERS)
        .fetch_all(&mut *conn)
        .await?
    {
        let number = row.text("number")?;
        let parsed = number
            .strip_prefix("INV-")
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(year, seq)| Some((year.parse().ok()?, seq.parse().ok()?)));
        match parsed {
            Some((year, seq)) => issued.entry(year).or_default().push(seq),
            None => problems.push(VerifyProblem {
                account: String::new(),
                problem: format!("invoice number `{number}` is not INV-YYYY-NNNNNN"),
            }),
        }
    }
    for row in sqlx::query::<DB>(INVOICE_COUNTERS)
        .fetch_all(&mut *conn)
        .await?
    {
        let year = row.int("year")?;
        let last = row.int("last_number")?;
        let mut numbers = issued.remove(&year).unwrap_or_default();
        numbers.sort_unstable();
        if !numbers.iter().copied().eq(1..=last) {
            problems.push(VerifyProblem {
                account: String::new(),
                problem: format!(
                    "invoice numbers of {year} are not 1..={last} without gaps ({} issued)",
                    numbers.len()
                ),
            });
        }
    }
    for year in issued.keys() {
        problems.push(VerifyProblem {
            account: String::new(),
            problem: format!("invoices of {year} have no number counter"),
        });
    }
    for row in sqlx::query::<DB>(COUPON_USES).fetch_all(&mut *conn).await? {
        let (uses, held) = (row.int("uses")?, row.int("held")?);
        if uses != held {
            problems.push(VerifyProblem {
                account: String::new(),
                problem: format!(
                    "coupon {} counts {uses} uses but {held} orders hold one",
                    row.text("code")?
                ),
            });
        }
    }
    Ok(problems)
}
