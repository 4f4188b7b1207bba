//! The ledger port: the source of truth for balances, ledger entries, usage records and API keys.
//!
//! Domain code talks to `dyn Ledger`, never to a driver. Every write is idempotent: settlements
//! are keyed by request id (docs/architecture.md I2) and grants by an optional caller reference; every
//! balance change is one ledger entry with `balance_before`/`balance_after` (I3).
//!
//! Length: the port and the records it speaks in; the adapters and their shared SQL are apart.

pub mod grants;
pub mod mysql;
pub mod set_aside;
mod settle_plan;
mod settle_writes;
pub mod sql;
pub mod sqlite;
mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::domain::{AccountId, Credits, RequestId, TokenUsage};
pub use set_aside::SetAside;
pub use verify::Columns;

pub type SharedLedger = Arc<dyn Ledger>;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("balance arithmetic overflow for account {0}")]
    Overflow(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// A balance (or a key's remaining spend) with the revision it was read at, and what it says
/// about expiring credits (see [`grants`], "Between a grant's lapse and its sweep").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub balance: Credits,
    pub rev: i64,
    /// When the next grant counted as live lapses (Unix ms); a cache must reload the snapshot
    /// from then on. `None`: nothing counted as live expires.
    pub next_expiry_ms: Option<i64>,
    /// The part of `balance` left in lapsed grants not swept yet: kept for requests that started
    /// before they lapsed, so never available to a new reservation.
    pub lapsed: Credits,
}

impl Snapshot {
    /// A bucket without expiring credits (an API key's remaining spend).
    pub fn plain(balance: Credits, rev: i64) -> Snapshot {
        Snapshot {
            balance,
            rev,
            next_expiry_ms: None,
            lapsed: Credits::ZERO,
        }
    }

    /// An account's snapshot, with the outlook at `at_ms` of its unswept `grants`.
    pub(crate) fn of_account(
        balance: Credits,
        rev: i64,
        grants: &[grants::GrantRow],
        at_ms: i64,
    ) -> Snapshot {
        let outlook = grants::outlook(grants, at_ms);
        Snapshot {
            balance,
            rev,
            next_expiry_ms: outlook.next_expiry_ms,
            lapsed: Credits::from_micros(outlook.lapsed),
        }
    }
}

/// What a balance cache knew of an account's requests in flight when it asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// The cache's fence (see [`KeepBack`]): grants lapsed at or before it may be swept.
    pub at_ms: i64,
    /// What the account held or had pending then: kept back from its lapsed grants.
    pub amount: Credits,
}

/// Tells the expiry sweep what to keep back from an account's lapsed grants: what requests
/// that reserved before they lapsed may still draw from them (see [`grants`]).
#[async_trait]
pub trait KeepBack: Send + Sync {
    /// What `account` holds or has pending, read together with a fence at `at_ms`: from then on
    /// no reservation trusts a snapshot that counts a grant lapsed by `at_ms` as live. `None`
    /// when that cannot be known now; the sweep then leaves the account for its next run.
    async fn keep_back(&self, account: &AccountId, at_ms: i64) -> Option<Credits>;
}

/// Nothing in flight anywhere: the sweep takes every lapsed remainder (tools and tests that run
/// without a gateway).
pub struct NothingInFlight;

#[async_trait]
impl KeepBack for NothingInFlight {
    async fn keep_back(&self, _account: &AccountId, _at_ms: i64) -> Option<Credits> {
        Some(Credits::ZERO)
    }
}

/// What a reservation is made against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// An account's balance.
    Account(AccountId),
    /// An API key's remaining spend limit (`spend_limit - spent`).
    KeyLimit(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    Purchase,
    Usage,
    Refund,
    Bonus,
    Adjustment,
    /// An expired grant's remainder leaving the balance.
    Expiry,
}

impl EntryType {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Purchase => "purchase",
            EntryType::Usage => "usage",
            EntryType::Refund => "refund",
            EntryType::Bonus => "bonus",
            EntryType::Adjustment => "adjustment",
            EntryType::Expiry => "expiry",
        }
    }

    pub fn parse(raw: &str) -> Option<EntryType> {
        Some(match raw {
            "purchase" => EntryType::Purchase,
            "usage" => EntryType::Usage,
            "refund" => EntryType::Refund,
            "bonus" => EntryType::Bonus,
            "adjustment" => EntryType::Adjustment,
            "expiry" => EntryType::Expiry,
            _ => return None,
        })
    }
}

/// One row of `credit_transactions`.
#[derive(Debug, Clone, Serialize)]
pub struct LedgerEntry {
    pub id: i64,
    pub account: AccountId,
    #[serde(rename = "type")]
    pub entry_type: EntryType,
    pub amount: Credits,
    pub balance_before: Credits,
    pub balance_after: Credits,
    pub description: String,
    pub reference: Option<String>,
    /// Unix milliseconds.
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// A credit grant, debit or adjustment made outside the request path.
#[derive(Debug, Clone)]
pub struct GrantRequest {
    pub account: AccountId,
    pub entry_type: EntryType,
    /// Positive adds credits, negative takes them (adjustments and refunds).
    pub amount: Credits,
    pub description: String,
    /// Idempotency key: a second grant with the same account, type and reference changes nothing.
    pub reference: Option<String>,
    /// When a positive grant's remainder expires (Unix ms); `None` never expires.
    pub expires_at_ms: Option<i64>,
    /// For a debit: the ledger entries, as `(type, reference)`, whose grants it draws from
    /// before any other, in this order (a refund names the purchase it refunds). What those
    /// grants no longer hold is drawn in the usual order ([`grants::plan_debit_from`]). Empty
    /// for the usual order; ignored by credits.
    pub draw_first_from: Vec<(EntryType, String)>,
}

/// One credit grant (see [`grants`]): where credits came from and what is left of them.
#[derive(Debug, Clone, Serialize)]
pub struct GrantRecord {
    pub id: i64,
    /// The entry type that brought the credits, or `migrated` for pre-grant balances.
    pub source: String,
    /// The ledger entry that created the grant (none for migrated balances).
    pub transaction_id: Option<i64>,
    pub amount: Credits,
    /// Part of `amount` that paid off debt when the grant arrived.
    pub debt_paid: Credits,
    pub remaining: Credits,
    #[serde(skip)]
    pub expires_at_ms: Option<i64>,
    /// Set once the expiry sweep has taken the remainder out of the balance.
    #[serde(skip)]
    pub expired_at_ms: Option<i64>,
    #[serde(skip)]
    pub created_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct GrantOutcome {
    pub entry: LedgerEntry,
    /// False when the reference had been applied before (the earlier entry is returned).
    pub applied: bool,
    pub snapshot: Snapshot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// The upstream reported the token counts.
    Reported,
    /// The upstream reported none; the gateway counted them with the BPE tokenizer.
    Counted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Counted => "counted",
        }
    }
}

/// One finished request, ready to be written (usage record + ledger entry, atomically).
///
/// Serializable because it is also the journal record kept in the balance cache until the
/// ledger has it, so a sibling instance can write it if this one dies first (docs/architecture.md I4).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Settlement {
    pub request_id: RequestId,
    pub account: AccountId,
    pub api_key_id: Option<String>,
    pub endpoint: String,
    pub model: String,
    pub upstream: String,
    pub usage: TokenUsage,
    pub source: UsageSource,
    /// What is charged: the usage's price, but never more than the hold (I1).
    pub cost: Credits,
    /// What the usage's price exceeded the hold by (the upstream ignored the cap it was sent):
    /// recorded, never charged.
    #[serde(default)]
    pub uncharged: Credits,
    pub hold: Credits,
    pub stream: bool,
    /// `completed`, `client_disconnected`, `upstream_failed`, `upstream_timeout`,
    /// `cut_at_shutdown`, `hold_lost` (the stream's hold was gone, so it was cut) or
    /// `instance_lost` (its progress, billed by a sibling after this instance died).
    pub status: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
}

/// The result of writing one settlement.
#[derive(Debug, Clone)]
pub struct SettleOutcome {
    pub request_id: RequestId,
    /// False when the request id had been settled before (nothing changed).
    pub applied: bool,
    /// The account's balance after the whole batch committed.
    pub account: Snapshot,
    /// The key's remaining spend after the batch, if the key has a limit.
    pub key_limit: Option<Snapshot>,
}

/// One row of `usage_records`.
#[derive(Debug, Clone, Serialize)]
pub struct UsageRecord {
    pub request_id: String,
    pub api_key_id: Option<String>,
    pub endpoint: String,
    pub model: String,
    pub upstream: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub cost: Credits,
    /// Priced but not charged: what the usage exceeded the hold by.
    pub uncharged: Credits,
    pub hold: Credits,
    pub source: String,
    pub stream: bool,
    pub status: String,
    #[serde(skip)]
    pub settled_at_ms: i64,
    #[serde(skip)]
    pub cursor: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub account: AccountId,
    #[serde(skip)]
    pub key_hash: String,
    pub prefix: String,
    pub name: String,
    pub spend_limit: Option<Credits>,
    pub spent: Credits,
    /// `None` allows every model.
    pub allowed_models: Option<Vec<String>>,
    #[serde(skip)]
    pub created_at_ms: i64,
    #[serde(skip)]
    pub revoked_at_ms: Option<i64>,
}

impl ApiKeyRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at_ms.is_some()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AccountRecord {
    pub id: AccountId,
    pub balance: Credits,
    #[serde(skip)]
    pub rev: i64,
    #[serde(skip)]
    pub created_at_ms: i64,
}

/// A mismatch found by [`Ledger::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblem {
    pub account: String,
    pub problem: String,
}

/// A page request: newest first, `before` is the cursor of the last item of the previous page.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: u32,
    pub before: Option<i64>,
}

#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    async fn migrate(&self) -> Result<(), LedgerError>;

    /// Creates the account on first sight (with `signup_grant` as a `bonus` entry) and returns
    /// its current balance.
    async fn ensure_account(
        &self,
        account: &AccountId,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError>;

    async fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, LedgerError>;

    /// The current value of a bucket (creating the account if needed).
    async fn snapshot(
        &self,
        bucket: &Bucket,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError>;

    /// Applies a grant idempotently (by `reference`, when given).
    async fn grant(&self, grant: &GrantRequest) -> Result<GrantOutcome, LedgerError>;

    /// Writes a batch of settlements in one transaction. A request id settled before is skipped
    /// and reported with `applied = false`.
    async fn settle_batch(&self, batch: &[Settlement]) -> Result<Vec<SettleOutcome>, LedgerError>;

    async fn transactions(
        &self,
        account: &AccountId,
        page: Page,
    ) -> Result<Vec<LedgerEntry>, LedgerError>;

    async fn usage(&self, account: &AccountId, page: Page)
    -> Result<Vec<UsageRecord>, LedgerError>;

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), LedgerError>;

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, LedgerError>;

    async fn api_keys(&self, account: &AccountId) -> Result<Vec<ApiKeyRecord>, LedgerError>;

    /// Returns false if the key does not exist or was revoked before.
    async fn revoke_api_key(&self, key_id: &str) -> Result<bool, LedgerError>;

    /// The shared cache epoch; bumped by [`Ledger::bump_cache_epoch`] after out-of-band changes.
    async fn cache_epoch(&self) -> Result<i64, LedgerError>;

    async fn bump_cache_epoch(&self) -> Result<i64, LedgerError>;

    /// Checks every account: entries sum to the balance, each entry's before/after chain,
    /// every charged usage record has its entry and costs no more than its hold, each key's
    /// spend matches its usage; the grants: `Σ remaining of unswept grants − debt = balance`
    /// with `debt ≥ 0`, and every grant's `remaining = amount − debt_paid − Σ its draws ≥ 0`;
    /// no debit took a balance below `-overdraft` without a documented cause (see `verify.rs`);
    /// and no settlement set aside is left unresolved ([`set_aside`]). Empty means consistent.
    /// (The payment tables have their own checks: `billing::store::verify_books` runs both.)
    async fn verify(&self, overdraft: Credits) -> Result<Vec<VerifyProblem>, LedgerError>;

    /// Keeps a settlement the ledger refused on its own for an admin ([`set_aside`]); nothing
    /// is charged. Idempotent by request id: a second call keeps the first row.
    async fn set_aside(&self, entry: &SetAside) -> Result<(), LedgerError>;

    /// The settlements set aside, newest first: all of them, or only the resolved
    /// (`Some(true)`) or unresolved (`Some(false)`) ones.
    async fn set_aside_settlements(
        &self,
        resolved: Option<bool>,
    ) -> Result<Vec<SetAside>, LedgerError>;

    /// Marks a settlement set aside as resolved at `now_ms` with an admin's `note`, and returns
    /// it. Resolving it again keeps the first resolution. `None` when no settlement with that
    /// request id was set aside.
    async fn resolve_set_aside(
        &self,
        request_id: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<Option<SetAside>, LedgerError>;

    /// Whether the database answers (for `/readyz`).
    async fn ping(&self) -> Result<(), LedgerError>;

    /// The account's grants, oldest first (swept ones included).
    async fn grants(&self, account: &AccountId) -> Result<Vec<GrantRecord>, LedgerError>;

    /// Which grants a debit entry drew from: `(grant id, amount)`, listed in the usual drawing
    /// order (also for a debit that drew a named grant first).
    async fn draws(&self, transaction_id: i64) -> Result<Vec<(i64, Credits)>, LedgerError>;

    /// The accounts with unswept grants whose expiry is at or before `now_ms`.
    async fn accounts_due(&self, now_ms: i64) -> Result<Vec<AccountId>, LedgerError>;

    /// Sweeps the account's unswept grants whose expiry is at or before `now_ms`, keeping back
    /// `keep` in them for the requests in flight ([`grants::plan_expiry`]). What is taken from a
    /// grant leaves the balance as one `expiry` entry drawn from it (reference `grant:<id>`, or
    /// `grant:<id>:<remaining before>` while part of it is kept); a grant with nothing kept is
    /// marked swept (`expired_at = now_ms`). Idempotent and safe to run on several instances at
    /// once. Returns the account's snapshot (outlook at `now_ms`) and whether its balance moved.
    async fn expire_account(
        &self,
        account: &AccountId,
        now_ms: i64,
        keep: Credits,
    ) -> Result<(Snapshot, bool), LedgerError>;

    /// Sweeps every account with grants due at `now_ms` ([`Ledger::expire_account`]), keeping
    /// back what `keep` says is in flight. Returns the accounts whose balance changed, with
    /// their new snapshots.
    async fn expire_grants(
        &self,
        now_ms: i64,
        keep: &dyn KeepBack,
    ) -> Result<Vec<(AccountId, Snapshot)>, LedgerError> {
        let mut changed = Vec::new();
        for account in self.accounts_due(now_ms).await? {
            // Read (and fenced) before the sweep's transaction, which it must not wait inside.
            let Some(kept) = keep.keep_back(&account, now_ms).await else {
                continue;
            };
            let (snapshot, moved) = self.expire_account(&account, now_ms, kept).await?;
            if moved {
                changed.push((account, snapshot));
            }
        }
        Ok(changed)
    }

    /// A balance cache's reload: the bucket's snapshot, after sweeping what an account has
    /// lapsed by `in_flight.at_ms` beyond what is kept for its requests in flight. Nothing is
    /// written when nothing needs sweeping (the common case: a miss or an invalidation).
    async fn reload(
        &self,
        bucket: &Bucket,
        signup_grant: Credits,
        in_flight: InFlight,
    ) -> Result<Snapshot, LedgerError> {
        let snapshot = self.snapshot(bucket, signup_grant).await?;
        match bucket {
            Bucket::Account(account) if snapshot.lapsed > in_flight.amount => Ok(self
                .expire_account(account, in_flight.at_ms, in_flight.amount)
                .await?
                .0),
            _ => Ok(snapshot),
        }
    }
}
