//! Planning a settle batch ([`super::Ledger::settle_batch`]), shared by both adapters.
//!
//! An adapter reads, inside its write transaction, the state a batch depends on
//! ([`BatchState`]: the accounts, their live grants, the keys, which request ids are settled
//! already) in a few statements whatever the batch's size, plans the whole batch here in Rust,
//! then writes the plan with one multi-row statement per table. So a batch of many settlements
//! costs about as many statements as a batch of one (a group commit shares them all).
//!
//! The plan: which settlements apply (a request id settled before, or twice in the batch, applies
//! once); each charge's usage entry, its before/after chained through the batch; the grants each
//! charge draws from, as the earlier ones left them; each touched account's new
//! balance, debt and revision, moved once per batch; each key's new spend. All arithmetic is
//! checked, and an overflow or a negative cost fails the plan before anything is written.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::grants::{GrantRow, plan_debit};
use super::{LedgerError, SettleOutcome, Settlement, Snapshot};
use crate::domain::{AccountId, Credits};

/// An account as the batch's transaction read it.
#[derive(Debug, Clone, Copy)]
pub(super) struct AccountState {
    pub balance: Credits,
    pub rev: i64,
    /// Micro-credits of debits that no grant covered (see [`super::grants`]).
    pub debt: i64,
}

/// An API key's spending as the batch's transaction read it.
#[derive(Debug, Clone, Copy)]
pub(super) struct KeySpend {
    /// Micro-credits; `None` means no limit.
    pub limit: Option<i64>,
    pub spent: i64,
    pub rev: i64,
}

impl KeySpend {
    /// The remaining spend, if the key has a limit.
    pub fn limit_snapshot(&self) -> Option<Snapshot> {
        self.limit.map(|limit| {
            Snapshot::plain(
                Credits::from_micros(limit.saturating_sub(self.spent)),
                self.rev,
            )
        })
    }
}

/// What a batch's plan depends on, read inside the transaction that writes it.
#[derive(Debug, Default)]
pub(super) struct BatchState {
    /// Every account of the batch (the adapter creates the missing ones first).
    pub accounts: HashMap<AccountId, AccountState>,
    /// The live grants (unswept, something left) of the batch's accounts, each account's in
    /// [`super::grants::drawing_order`]; an account without any may be absent.
    pub grants: HashMap<AccountId, Vec<GrantRow>>,
    /// The batch's keys that exist (an unknown key has no spend to track).
    pub keys: HashMap<String, KeySpend>,
    /// The batch's request ids that already have a usage record.
    pub settled: HashSet<String>,
}

/// One usage entry to write.
pub(super) struct PlannedEntry<'a> {
    pub settlement: &'a Settlement,
    /// `-cost`.
    pub amount: i64,
    pub before: Credits,
    pub after: Credits,
}

impl PlannedEntry<'_> {
    pub fn description(&self) -> String {
        let s = self.settlement;
        format!(
            "{} {}: {} prompt + {} completion tokens ({})",
            s.endpoint,
            s.model,
            s.usage.prompt_tokens,
            s.usage.completion_tokens,
            s.source.as_str()
        )
    }
}

/// One grant draw of a usage entry to write. The entry's id is not known before it is written:
/// it is found by the entry's unique key (account, `usage`, request id).
pub(super) struct PlannedDraw<'a> {
    pub settlement: &'a Settlement,
    pub grant_id: i64,
    pub amount: i64,
}

/// An account's row after the batch.
pub(super) struct AccountWrite<'a> {
    pub account: &'a AccountId,
    pub balance: Credits,
    pub debt: i64,
    pub rev: i64,
}

/// A key's row after the batch.
pub(super) struct KeyWrite<'a> {
    pub key: &'a str,
    pub spent: i64,
    pub rev: i64,
}

/// Everything a batch writes, and what it reports once committed.
pub(super) struct SettlePlan<'a> {
    /// The settlements that apply, each getting a usage record, in batch order.
    pub records: Vec<&'a Settlement>,
    /// The usage entries of the charged ones (a zero cost writes no entry).
    pub entries: Vec<PlannedEntry<'a>>,
    pub draws: Vec<PlannedDraw<'a>>,
    /// `(grant id, remaining)` of every grant drawn from, ascending by id.
    pub grants: Vec<(i64, i64)>,
    /// The accounts an applied settlement touched, ascending by id (each gets a new revision).
    pub accounts: Vec<AccountWrite<'a>>,
    /// The keys whose spend changed, ascending by id.
    pub keys: Vec<KeyWrite<'a>>,
    /// One per settlement of the batch, in batch order.
    pub outcomes: Vec<SettleOutcome>,
}

/// Plans `batch` against `state`, at `now` (Unix ms). See the module docs.
pub(super) fn plan(
    batch: &[Settlement],
    mut state: BatchState,
    now: i64,
) -> Result<SettlePlan<'_>, LedgerError> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(batch.len());
    let mut applied = Vec::with_capacity(batch.len());
    let mut records = Vec::with_capacity(batch.len());
    let mut entries = Vec::with_capacity(batch.len());
    let mut draws = Vec::new();
    let mut drawn: BTreeSet<i64> = BTreeSet::new();
    let mut touched: BTreeSet<&AccountId> = BTreeSet::new();
    let mut spent: BTreeMap<&str, i64> = BTreeMap::new();
    for s in batch {
        let id = s.request_id.as_str();
        let fresh = !state.settled.contains(id) && seen.insert(id);
        applied.push(fresh);
        if !fresh {
            continue;
        }
        records.push(s);
        touched.insert(&s.account);
        if s.cost == Credits::ZERO {
            continue;
        }
        if s.cost.is_negative() {
            return Err(LedgerError::Corrupt(format!(
                "settlement {id} has a negative cost"
            )));
        }
        let account = state
            .accounts
            .get_mut(&s.account)
            .ok_or_else(|| not_read(&s.account))?;
        let before = account.balance;
        let after = before
            .checked_sub(s.cost)
            .ok_or_else(|| overflow(&s.account))?;
        let amount = s
            .cost
            .micros()
            .checked_neg()
            .ok_or_else(|| overflow(&s.account))?;
        // From the grants live when the request started: it reserved against them.
        let debit = plan_debit(
            state.grants.entry(s.account.clone()).or_default(),
            s.cost.micros(),
            s.started_at_ms.min(now),
        );
        account.debt = account
            .debt
            .checked_add(debit.uncovered)
            .ok_or_else(|| overflow(&s.account))?;
        account.balance = after;
        entries.push(PlannedEntry {
            settlement: s,
            amount,
            before,
            after,
        });
        for (grant_id, amount) in debit.draws {
            drawn.insert(grant_id);
            draws.push(PlannedDraw {
                settlement: s,
                grant_id,
                amount,
            });
        }
        if let Some(key) = s.api_key_id.as_deref()
            && let Some(spend) = state.keys.get_mut(key)
        {
            spend.spent = spend
                .spent
                .checked_add(s.cost.micros())
                .ok_or_else(|| overflow(&s.account))?;
            spent.insert(key, spend.spent);
        }
    }

    let grants = state
        .grants
        .values()
        .flatten()
        .filter(|g| drawn.contains(&g.id))
        .map(|g| (g.id, g.remaining))
        .collect::<BTreeMap<i64, i64>>()
        .into_iter()
        .collect();
    let mut accounts = Vec::with_capacity(touched.len());
    for account in touched {
        let row = state
            .accounts
            .get_mut(account)
            .ok_or_else(|| not_read(account))?;
        row.rev = row.rev.checked_add(1).ok_or_else(|| overflow(account))?;
        accounts.push(AccountWrite {
            account,
            balance: row.balance,
            debt: row.debt,
            rev: row.rev,
        });
    }
    let mut keys = Vec::with_capacity(spent.len());
    for (key, spent) in spent {
        let spend = state
            .keys
            .get_mut(key)
            .ok_or_else(|| LedgerError::Corrupt(format!("api key {key} was not read")))?;
        spend.rev = spend
            .rev
            .checked_add(1)
            .ok_or_else(|| LedgerError::Overflow(format!("api key {key}")))?;
        keys.push(KeyWrite {
            key,
            spent,
            rev: spend.rev,
        });
    }
    let outcomes = batch
        .iter()
        .zip(applied)
        .map(|(s, applied)| {
            let account = state
                .accounts
                .get(&s.account)
                .ok_or_else(|| not_read(&s.account))?;
            Ok(SettleOutcome {
                request_id: s.request_id.clone(),
                applied,
                account: Snapshot::of_account(
                    account.balance,
                    account.rev,
                    state.grants.get(&s.account).map_or(&[], Vec::as_slice),
                    now,
                ),
                key_limit: s
                    .api_key_id
                    .as_deref()
                    .and_then(|key| state.keys.get(key))
                    .and_then(KeySpend::limit_snapshot),
            })
        })
        .collect::<Result<_, LedgerError>>()?;
    Ok(SettlePlan {
        records,
        entries,
        draws,
        grants,
        accounts,
        keys,
        outcomes,
    })
}

fn overflow(account: &AccountId) -> LedgerError {
    LedgerError::Overflow(account.to_string())
}

fn not_read(account: &AccountId) -> LedgerError {
    LedgerError::Corrupt(format!("account {account} was not read"))
}
