//! Monthly usage statements: per account and calendar month (UTC), one line per model with its
//! tokens, its effective unit price and its amount, built from the usage records the metering
//! path wrote. A statement of a month still running is `provisional` and is rebuilt on every
//! request; one generated after the month ended is `final` (rebuilding it gives the same lines).

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::{Credits, MICROS_PER_CREDIT};

/// One model's usage in a month, as summed by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelUsage {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: Credits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementLine {
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub total_tokens: i64,
    /// Credits per 1,000 tokens, averaged over the month (prompt and completion prices may
    /// differ), to 6 decimals.
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price_per_1k_tokens: Decimal,
    pub amount: Credits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// `stmt_2026-11`: unique per account.
    pub id: String,
    pub account_id: String,
    /// `YYYY-MM`.
    pub billing_month: String,
    /// RFC 3339, inclusive.
    pub period_start: String,
    /// RFC 3339, exclusive.
    pub period_end: String,
    /// `provisional` while the month runs, `final` after.
    pub status: String,
    pub currency: String,
    pub lines: Vec<StatementLine>,
    pub total_tokens: i64,
    pub total: Credits,
    pub generated_at: String,
}

/// A month's bounds in Unix ms: `"2026-11"` → [Nov 1, Dec 1).
pub fn month_bounds(month: &str) -> Option<(i64, i64)> {
    let (year, month_number) = month.split_once('-')?;
    if year.len() != 4 || month_number.len() != 2 {
        return None;
    }
    let year: i32 = year.parse().ok()?;
    let month_number: u8 = month_number.parse().ok()?;
    let start_month = time::Month::try_from(month_number).ok()?;
    let start = time::Date::from_calendar_date(year, start_month, 1).ok()?;
    let end = if start_month == time::Month::December {
        time::Date::from_calendar_date(year.checked_add(1)?, time::Month::January, 1).ok()?
    } else {
        time::Date::from_calendar_date(year, start_month.next(), 1).ok()?
    };
    let ms = |date: time::Date| {
        i64::try_from(date.midnight().assume_utc().unix_timestamp_nanos() / 1_000_000).ok()
    };
    Some((ms(start)?, ms(end)?))
}

/// Builds the statement of `month` (whose bounds are `bounds`) from its per-model sums.
pub fn build(
    account_id: &str,
    month: &str,
    bounds: (i64, i64),
    usage: &[ModelUsage],
    now_ms: i64,
) -> Statement {
    let lines: Vec<StatementLine> = usage
        .iter()
        .map(|u| {
            let total_tokens = u.prompt_tokens.saturating_add(u.completion_tokens);
            let unit_price = if total_tokens > 0 {
                (Decimal::from(u.cost.micros()) * Decimal::from(1000)
                    / Decimal::from(MICROS_PER_CREDIT)
                    / Decimal::from(total_tokens))
                .round_dp(6)
            } else {
                Decimal::ZERO
            };
            StatementLine {
                model: u.model.clone(),
                requests: u.requests,
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens,
                unit_price_per_1k_tokens: unit_price,
                amount: u.cost,
            }
        })
        .collect();
    let total = Credits::from_micros(lines.iter().map(|l| l.amount.micros()).sum());
    Statement {
        id: format!("stmt_{month}"),
        account_id: account_id.to_owned(),
        billing_month: month.to_owned(),
        period_start: crate::domain::time::rfc3339(bounds.0),
        period_end: crate::domain::time::rfc3339(bounds.1),
        status: if now_ms >= bounds.1 {
            "final"
        } else {
            "provisional"
        }
        .to_owned(),
        currency: "credits".to_owned(),
        total_tokens: lines.iter().map(|l| l.total_tokens).sum(),
        lines,
        total,
        generated_at: crate::domain::time::rfc3339(now_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_calendar_months_in_utc() {
        let (start, end) = month_bounds("2026-12").unwrap_or_default();
        assert_eq!(crate::domain::time::rfc3339(start), "2026-12-01T00:00:00Z");
        assert_eq!(crate::domain::time::rfc3339(end), "2027-01-01T00:00:00Z");
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-00"] {
            assert_eq!(month_bounds(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_line_per_model_with_its_effective_unit_price() {
        let usage = [ModelUsage {
            model: "gpt-x".into(),
            requests: 2,
            prompt_tokens: 1000,
            completion_tokens: 500,
            cost: Credits::from_micros(2_500_000),
        }];
        let bounds = month_bounds("2026-11").unwrap_or_default();
        let statement = build("alice", "2026-11", bounds, &usage, bounds.1);
        assert_eq!(statement.status, "final");
        assert_eq!(statement.lines[0].total_tokens, 1500);
        // 2.5 credits for 1500 tokens: 1.666667 per 1K.
        assert_eq!(
            statement.lines[0].unit_price_per_1k_tokens.to_string(),
            "1.666667"
        );
        assert_eq!(statement.total, Credits::from_micros(2_500_000));
    }
}
