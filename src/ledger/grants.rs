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
//!
//! # Between a grant's lapse and its sweep (docs/architecture.md I1)
//!
//! A grant lapses at its `expires_at`; a sweep (the periodic one, or the one a cache reload
//! runs) later takes its remainder out of the balance. Three rules keep the balance at or above
//! `−overdraft` in between:
//!
//! 1. **No reservation counts a lapsed grant.** Every account snapshot carries the soonest
//!    expiry of the grants it counts as live ([`ExpiryOutlook::next_expiry_ms`]) and the lapsed,
//!    unswept part of its balance ([`ExpiryOutlook::lapsed`]). A balance cache reloads a snapshot
//!    whose next expiry has passed (the reload sweeps first) and never lets a reservation use the
//!    lapsed part: `available = balance − lapsed − pending − held`.
//! 2. **A request draws from what it reserved against.** A settlement draws from the grants that
//!    were live when its request started (`started_at`, taken before its reservation), so a
//!    request that reserved before a lapse may still draw from that grant's unswept remainder.
//! 3. **The sweep keeps that remainder for them.** It keeps back, in the lapsed grants, what the
//!    cache holds or has pending for the account ([`plan_expiry`]'s `keep`). The cache reads that
//!    figure and raises a fence in one atomic step: no reservation after it trusts a snapshot
//!    that counts those grants as live, so every request that may still draw from them is in the
//!    figure. What is kept stays unswept (and in `lapsed`, so still unavailable); a later sweep
//!    takes whatever those requests did not use.
//!
//! Why that is enough: write the balance as `O + L − D` (remainders of live grants, of lapsed
//! unswept grants, and debt). Requests that reserved before the lapse were checked against
//! `O + L − D`; they draw from `L` first (it expires soonest), and the sweep left in `L` what they
//! hold (or all of `L`), so the rest of their cost fits in `O − D + overdraft`. Every reservation
//! after the lapse was checked against `O − D` less everything held or pending, theirs included,
//! so it fits there too. No charge exceeds its hold (the excess is recorded as `uncharged`), so
//! nothing goes further.

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
/// Grants must already be in [`drawing_order`]; those lapsed at `live_at_ms` are skipped. That is
/// now for a debit made now, and its request's start for a usage charge (see the module docs).
pub fn plan_debit(grants: &mut [GrantRow], amount: i64, live_at_ms: i64) -> DebitPlan {
    let mut left = amount.max(0);
    let mut plan = DebitPlan::default();
    for grant in grants.iter_mut() {
        if left == 0 {
            break;
        }
        if grant.remaining <= 0 || !grant.is_live(live_at_ms) {
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

/// What a snapshot taken at some instant says about an account's expiring credits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExpiryOutlook {
    /// The soonest expiry among the unswept grants with something left that had not lapsed
    /// yet; `None` if none of them expires. Until then nothing else lapses.
    pub next_expiry_ms: Option<i64>,
    /// Micro-credits left in unswept grants that had lapsed: part of the balance, drawn only by
    /// requests that started before they lapsed, never available to a new reservation.
    pub lapsed: i64,
}

/// The outlook at `at_ms` of an account whose unswept grants are `grants` (any order).
pub fn outlook(grants: &[GrantRow], at_ms: i64) -> ExpiryOutlook {
    let mut outlook = ExpiryOutlook::default();
    for grant in grants.iter().filter(|g| g.remaining > 0) {
        match grant.expires_at_ms {
            Some(at) if at <= at_ms => {
                outlook.lapsed = outlook.lapsed.saturating_add(grant.remaining);
            }
            Some(at) => {
                outlook.next_expiry_ms = Some(outlook.next_expiry_ms.map_or(at, |n| n.min(at)));
            }
            None => {}
        }
    }
    outlook
}

/// What the sweep does to one lapsed grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryStep {
    pub grant: i64,
    /// Micro-credits that leave the balance now (an `expiry` entry when > 0).
    pub take: i64,
    /// Micro-credits kept in the grant for requests that reserved before it lapsed. Zero means
    /// the grant is swept for good; otherwise it stays unswept with `remaining = keep`.
    pub keep: i64,
}

/// Plans the sweep of `due` (unswept grants that have lapsed, in [`drawing_order`]), keeping
/// back `keep` micro-credits for the requests in flight (see the module docs).
///
/// What is kept goes to the latest-expiring grants first: a grant that lapsed later was live for
/// every request that any earlier one was live for, so whichever of those requests settles can
/// draw from it.
pub fn plan_expiry(due: &[GrantRow], keep: i64) -> Vec<ExpiryStep> {
    let mut left = keep.max(0);
    let mut steps: Vec<ExpiryStep> = due
        .iter()
        .rev()
        .map(|grant| {
            let remaining = grant.remaining.max(0);
            let kept = remaining.min(left);
            left -= kept;
            ExpiryStep {
                grant: grant.id,
                take: remaining - kept,
                keep: kept,
            }
        })
        .collect();
    steps.reverse();
    steps
}

/// The description and reference of the `expiry` entry that sweeps `grant` (keeping `keep` in
/// it), the same in both adapters. The reference is unique per grant and sweep:
/// `grant:<id>` for the sweep that ends the grant, and while part of it is kept,
/// `grant:<id>:<remaining before>` (its remaining only shrinks, so no two sweeps share one).
pub fn expiry_entry_text(
    grant: &GrantRow,
    source: &str,
    amount: crate::domain::Credits,
    keep: i64,
) -> (String, String) {
    let left = crate::domain::Credits::from_micros(grant.remaining);
    if keep == 0 {
        (
            format!(
                "grant {} ({source} of {amount} credits) expired with {left} credits left",
                grant.id
            ),
            format!("grant:{}", grant.id),
        )
    } else {
        (
            format!(
                "grant {} ({source} of {amount} credits) expired with {left} credits left; \
                 {} of them stay for requests that started before it expired",
                grant.id,
                crate::domain::Credits::from_micros(keep),
            ),
            format!("grant:{}:{}", grant.id, grant.remaining),
        )
    }
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
    fn each_sweep_of_a_grant_has_its_own_reference_and_the_last_ends_it() {
        let amount = crate::domain::Credits::from_micros(5_000_000);
        let (partial, partial_ref) = expiry_entry_text(
            &grant(7, 3_000_000, Some(10), 0),
            "bonus",
            amount,
            1_000_000,
        );
        assert_eq!(partial_ref, "grant:7:3000000");
        assert_eq!(
            partial,
            "grant 7 (bonus of 5 credits) expired with 3 credits left; 1 of them stay for \
             requests that started before it expired"
        );
        // A later partial sweep of the same grant (less left) cannot reuse that reference.
        let (_, later_ref) =
            expiry_entry_text(&grant(7, 2_000_000, Some(10), 0), "bonus", amount, 500_000);
        assert_eq!(later_ref, "grant:7:2000000");
        let (last, last_ref) =
            expiry_entry_text(&grant(7, 1_000_000, Some(10), 0), "bonus", amount, 0);
        assert_eq!(last_ref, "grant:7");
        assert_eq!(
            last,
            "grant 7 (bonus of 5 credits) expired with 1 credits left"
        );
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
    fn a_settlement_draws_from_grants_live_when_its_request_started() {
        // The request started at 90, before grant 1 lapsed at 100, and settles at 150.
        let mut grants = vec![grant(1, 3, Some(100), 0), grant(2, 4, None, 0)];
        let plan = plan_debit(&mut grants, 5, 90);
        assert_eq!(plan.draws, [(1, 3), (2, 2)]);
        // One that started at 100 or later no longer can.
        let mut grants = vec![grant(1, 3, Some(100), 0), grant(2, 4, None, 0)];
        let plan = plan_debit(&mut grants, 5, 100);
        assert_eq!((plan.draws, plan.uncovered), (vec![(2, 4)], 1));
    }

    #[test]
    fn the_outlook_splits_lapsed_credits_from_the_next_expiry() {
        let grants = [
            grant(1, 3, Some(100), 0),
            grant(2, 4, Some(50), 0),
            grant(3, 0, Some(120), 0),
            grant(4, 5, Some(300), 0),
            grant(5, 6, Some(200), 0),
            grant(6, 7, None, 0),
        ];
        assert_eq!(
            outlook(&grants, 100),
            ExpiryOutlook {
                next_expiry_ms: Some(200),
                lapsed: 7,
            },
            "lapsed at or before 100: grants 1 and 2; the used-up grant 3 does not count"
        );
        assert_eq!(
            outlook(&grants, 49),
            ExpiryOutlook {
                next_expiry_ms: Some(50),
                lapsed: 0,
            }
        );
        assert_eq!(
            outlook(&grants, 1_000),
            ExpiryOutlook {
                next_expiry_ms: None,
                lapsed: 18,
            },
            "the never-expiring grant 6 never lapses"
        );
        assert_eq!(outlook(&[], 0), ExpiryOutlook::default());
    }

    #[test]
    fn the_sweep_takes_everything_when_nothing_is_in_flight() {
        let due = [grant(1, 3, Some(50), 0), grant(2, 0, Some(60), 0)];
        assert_eq!(
            plan_expiry(&due, 0),
            [
                ExpiryStep {
                    grant: 1,
                    take: 3,
                    keep: 0,
                },
                ExpiryStep {
                    grant: 2,
                    take: 0,
                    keep: 0,
                },
            ]
        );
        assert_eq!(plan_expiry(&due, -5), plan_expiry(&due, 0));
    }

    #[test]
    fn the_sweep_keeps_what_is_in_flight_in_the_latest_expiring_grants() {
        let due = [
            grant(1, 10, Some(50), 0),
            grant(2, 4, Some(60), 0),
            grant(3, 3, Some(70), 0),
        ];
        let steps = plan_expiry(&due, 5);
        let by_grant: Vec<(i64, i64, i64)> =
            steps.iter().map(|s| (s.grant, s.take, s.keep)).collect();
        assert_eq!(by_grant, [(1, 10, 0), (2, 2, 2), (3, 0, 3)]);
        // Each grant's remainder is either taken or kept, never both more than it has.
        for (step, grant) in steps.iter().zip(&due) {
            assert_eq!(step.take + step.keep, grant.remaining);
        }
        // More in flight than lapsed: everything is kept and nothing leaves yet.
        let all: Vec<(i64, i64)> = plan_expiry(&due, 100)
            .iter()
            .map(|s| (s.take, s.keep))
            .collect();
        assert_eq!(all, [(0, 10), (0, 4), (0, 3)]);
    }

    #[test]
    fn credits_pay_debt_first() {
        assert_eq!(plan_credit(0, 10), (0, 10));
        assert_eq!(plan_credit(4, 10), (4, 6));
        assert_eq!(plan_credit(15, 10), (10, 0));
    }
}
