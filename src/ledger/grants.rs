//! Credit grants: where an account's credits came from and when they expire.
//!
//! Every credit arrives as a grant (a purchase, bonus, positive adjustment or refund) with an
//! optional expiry. Debits (usage, negative adjustments) draw from live grants, the
//! soonest-expiring first, then the oldest; what no grant covers becomes the account's debt,
//! which the next grant pays off first. So for every account, at all times:
//! `balance = Σ remaining of grants not yet swept − debt`, with `debt > 0` only when no live
//! grant has anything left. These functions only plan; the ledger adapters apply the plan inside
//! the transaction that holds the account's lock.

/// A grant's state as a debit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRow {
    pub id: i64,
    /// Micro-credits left.
    pub remaining: i64,
    /// Unix ms; `None` never expires.
    pub expires_at_ms: Option<i64>,
    pub created_at_ms: i64,
}

impl GrantRow {
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_none_or(|at| at > now_ms)
    }
}

/// How a debit is covered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DebitPlan {
    /// `(grant id, micro-credits taken)`, in drawing order.
    pub draws: Vec<(i64, i64)>,
    /// What no live grant covered: added to the account's debt.
    pub uncovered: i64,
}

/// Orders grants the way debits draw from them: soonest-expiring first (never-expiring last),
/// then oldest, then by id.
pub fn drawing_order(grants: &mut [GrantRow]) {
    grants.sort_by_key(|g| {
        (
            g.expires_at_ms.is_none(),
            g.expires_at_ms,
            g.created_at_ms,
            g.id,
        )
    });
}

/// Plans a debit of `amount` (> 0) against `grants`, updating their `remaining` in place.
/// Grants must already be in [`drawing_order`]; expired ones (at `now_ms`) are skipped.
pub fn plan_debit(grants: &mut [GrantRow], amount: i64, now_ms: i64) -> DebitPlan {
    let mut left = amount.max(0);
    let mut plan = DebitPlan::default();
    for grant in grants.iter_mut() {
        if left == 0 {
            break;
        }
        if grant.remaining <= 0 || !grant.is_live(now_ms) {
            continue;
        }
        let take = grant.remaining.min(left);
        grant.remaining -= take;
        left -= take;
        plan.draws.push((grant.id, take));
    }
    plan.uncovered = left;
    plan
}

/// A new grant of `amount` (> 0) pays off `debt` first. Returns `(debt paid, grant remaining)`.
pub fn plan_credit(debt: i64, amount: i64) -> (i64, i64) {
    let paid = debt.clamp(0, amount.max(0));
    (paid, amount - paid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: i64, remaining: i64, expires: Option<i64>, created: i64) -> GrantRow {
        GrantRow {
            id,
            remaining,
            expires_at_ms: expires,
            created_at_ms: created,
        }
    }

    #[test]
    fn soonest_expiring_first_then_oldest_and_never_expiring_last() {
        let mut grants = vec![
            grant(1, 5, None, 10),
            grant(2, 5, Some(500), 30),
            grant(3, 5, Some(200), 40),
            grant(4, 5, None, 5),
            grant(5, 5, Some(200), 20),
        ];
        drawing_order(&mut grants);
        let order: Vec<i64> = grants.iter().map(|g| g.id).collect();
        assert_eq!(order, [5, 3, 2, 4, 1]);
    }

    #[test]
    fn a_debit_can_span_grants_and_overflow_into_debt() {
        let mut grants = vec![grant(1, 3, Some(100), 0), grant(2, 4, None, 0)];
        let plan = plan_debit(&mut grants, 5, 50);
        assert_eq!(plan.draws, [(1, 3), (2, 2)]);
        assert_eq!(plan.uncovered, 0);
        assert_eq!((grants[0].remaining, grants[1].remaining), (0, 2));
        let plan = plan_debit(&mut grants, 10, 50);
        assert_eq!(plan.draws, [(2, 2)]);
        assert_eq!(plan.uncovered, 8);
    }

    #[test]
    fn expired_grants_are_not_drawn() {
        let mut grants = vec![grant(1, 3, Some(100), 0), grant(2, 4, None, 0)];
        let plan = plan_debit(&mut grants, 2, 100);
        assert_eq!(plan.draws, [(2, 2)]);
        assert_eq!(grants[0].remaining, 3);
    }

    #[test]
    fn credits_pay_debt_first() {
        assert_eq!(plan_credit(0, 10), (0, 10));
        assert_eq!(plan_credit(4, 10), (4, 6));
        assert_eq!(plan_credit(15, 10), (10, 0));
    }
}
