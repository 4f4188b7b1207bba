//! Credit grants: where an account's credits came from and when they expire.
//!
//! Every credit arrives as a grant (a purchase, bonus, positive adjustment or refund) with an
//! optional expiry. Debits (usage, negative adjustments) draw from live grants, the
//! soonest-expiring first, then the oldest; what no grant covers becomes the account's debt,
//! which the next grant pays off first. A debit that takes particular credits back (a refund or
//! a dispute taking back what its order bought) names the grants it draws from first, and only
//! what they no longer hold is drawn in the usual order ([`plan_debit_from`]). So for every
//! account, at all times:
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

/// Plans a debit like [`plan_debit`], but draws from the grants whose ids are in `first`
/// before any other, in that order: a refund takes back the credits its own purchase granted,
/// not credits that happen to expire sooner. A named grant that is expired, used up or not
/// among `grants` is passed over; what the named grants do not cover is drawn in the usual
/// order. Each grant appears at most once in the plan.
pub fn plan_debit_from(
    grants: &mut [GrantRow],
    first: &[i64],
    amount: i64,
    now_ms: i64,
) -> DebitPlan {
    let mut left = amount.max(0);
    let mut draws = Vec::new();
    for id in first {
        if left == 0 {
            break;
        }
        let Some(grant) = grants.iter_mut().find(|g| g.id == *id) else {
            continue;
        };
        if grant.remaining <= 0 || !grant.is_live(now_ms) {
            continue;
        }
        let take = grant.remaining.min(left);
        grant.remaining -= take;
        left -= take;
        draws.push((grant.id, take));
    }
    // A named grant left with credits means the debit is covered (`left == 0`), so the usual
    // pass below takes nothing from it again.
    let rest = plan_debit(grants, left, now_ms);
    draws.extend(rest.draws);
    DebitPlan {
        draws,
        uncovered: rest.uncovered,
    }
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
    fn a_named_grant_is_drawn_first_and_the_rest_in_the_usual_order() {
        // Grant 1 expires soonest; grant 3 (never expiring) is the one named.
        let mut grants = vec![
            grant(1, 5, Some(100), 0),
            grant(2, 5, Some(200), 0),
            grant(3, 4, None, 0),
        ];
        drawing_order(&mut grants);
        let plan = plan_debit_from(&mut grants, &[3], 3, 50);
        assert_eq!(plan.draws, [(3, 3)]);
        assert_eq!(plan.uncovered, 0);
        // It holds 1 more: that, then the soonest-expiring, then the next; the rest is debt.
        let plan = plan_debit_from(&mut grants, &[3], 13, 50);
        assert_eq!(plan.draws, [(3, 1), (1, 5), (2, 5)]);
        assert_eq!(plan.uncovered, 2);
        let left: Vec<i64> = grants.iter().map(|g| g.remaining).collect();
        assert_eq!(left, [0, 0, 0]);
    }

    #[test]
    fn named_grants_go_in_the_order_given_and_expired_unknown_or_empty_ones_are_passed_over() {
        let mut grants = vec![
            grant(1, 5, Some(100), 0),
            grant(2, 5, None, 0),
            grant(3, 5, None, 1),
            grant(4, 5, Some(10), 0),
            grant(5, 0, None, 0),
        ];
        drawing_order(&mut grants);
        // Grant 4 has expired at 50, 5 is empty and 9 is not the account's.
        let plan = plan_debit_from(&mut grants, &[4, 9, 5, 3, 2], 12, 50);
        assert_eq!(plan.draws, [(3, 5), (2, 5), (1, 2)]);
        assert_eq!(plan.uncovered, 0);
        assert_eq!(
            grants.iter().find(|g| g.id == 4).map(|g| g.remaining),
            Some(5)
        );
        // Naming nothing is the usual order.
        let mut a = vec![grant(1, 5, Some(100), 0), grant(2, 5, None, 0)];
        let mut b = a.clone();
        assert_eq!(
            plan_debit_from(&mut a, &[], 7, 50),
            plan_debit(&mut b, 7, 50)
        );
        assert_eq!(a, b);
    }

    #[test]
    fn credits_pay_debt_first() {
        assert_eq!(plan_credit(0, 10), (0, 10));
        assert_eq!(plan_credit(4, 10), (4, 6));
        assert_eq!(plan_credit(15, 10), (10, 0));
    }
}
