//! SQLite ledger adapter: the embedded default (one file, WAL, `synchronous = FULL`).
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's single write lock up
//! front; balances read inside such a transaction cannot change under it, so balance updates
//! may set absolute values computed from those reads.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlSafeStr, SqliteConnection, SqlitePool};

use super::{
    AccountRecord, ApiKeyRecord, Bucket, EntryType, GrantOutcome, GrantRequest, Ledger,
    LedgerEntry, LedgerError, Page, SettleOutcome, Settlement, Snapshot, UsageRecord,
    VerifyProblem, now_ms,
};
use crate::domain::{AccountId, Credits};

/// Migrations embedded at compile time, so the binary needs no `migrations/` folder at run time.
const MIGRATIONS: &[(i64, &str, &str)] = &[(
    1,
    "ledger",
    include_str!("../../migrations/sqlite/0001_ledger.sql"),
)];

fn migrator() -> Migrator {
    Migrator::with_migrations(
        MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    (*description).into(),
                    MigrationType::Simple,
                    (*sql).into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

pub struct SqliteLedger {
    pool: SqlitePool,
}

impl SqliteLedger {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await?;
        Ok(SqliteLedger { pool })
    }

    pub async fn open_file(path: &Path) -> Result<Self, LedgerError> {
        Self::connect(&format!("sqlite://{}", path.display()), 4).await
    }
}

fn credits(row: &sqlx::sqlite::SqliteRow, column: &str) -> Result<Credits, sqlx::Error> {
    row.try_get::<i64, _>(column).map(Credits::from_micros)
}

fn entry_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<LedgerEntry, LedgerError> {
    let raw_type: String = row.try_get("type")?;
    let account: String = row.try_get("account_id")?;
    Ok(LedgerEntry {
        id: row.try_get("id")?,
        account: AccountId::parse(&account)
            .map_err(|_| LedgerError::Corrupt(format!("account id `{account}`")))?,
        entry_type: EntryType::parse(&raw_type)
            .ok_or_else(|| LedgerError::Corrupt(format!("entry type `{raw_type}`")))?,
        amount: credits(row, "amount")?,
        balance_before: credits(row, "balance_before")?,
        balance_after: credits(row, "balance_after")?,
        description: row.try_get("description")?,
        reference: row.try_get("reference")?,
        created_at_ms: row.try_get("created_at")?,
    })
}

fn key_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<ApiKeyRecord, LedgerError> {
    let account: String = row.try_get("account_id")?;
    let models: Option<String> = row.try_get("allowed_models")?;
    let allowed_models = models
        .map(|json| serde_json::from_str::<Vec<String>>(&json))
        .transpose()
        .map_err(|e| LedgerError::Corrupt(format!("api key allowed_models: {e}")))?;
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        account: AccountId::parse(&account)
            .map_err(|_| LedgerError::Corrupt(format!("account id `{account}`")))?,
        key_hash: row.try_get("key_hash")?,
        prefix: row.try_get("prefix")?,
        name: row.try_get("name")?,
        spend_limit: row
            .try_get::<Option<i64>, _>("spend_limit")?
            .map(Credits::from_micros),
        spent: credits(row, "spent")?,
        allowed_models,
        created_at_ms: row.try_get("created_at")?,
        revoked_at_ms: row.try_get("revoked_at")?,
    })
}

/// Inserts the account if it does not exist; returns true if it was created now.
async fn insert_account(
    conn: &mut SqliteConnection,
    account: &AccountId,
) -> Result<bool, LedgerError> {
    let now = now_ms();
    let done = sqlx::query(
        "INSERT INTO accounts (id, balance, rev, created_at, updated_at) VALUES (?, 0, 0, ?, ?) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(account.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

async fn read_account(
    conn: &mut SqliteConnection,
    account: &AccountId,
) -> Result<Option<Snapshot>, LedgerError> {
    let row = sqlx::query("SELECT balance, rev FROM accounts WHERE id = ?")
        .bind(account.as_str())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|row| {
        Ok(Snapshot {
            balance: credits(&row, "balance")?,
            rev: row.try_get("rev")?,
        })
    })
    .transpose()
}

/// Appends one ledger entry and moves the account's balance, inside the caller's transaction.
async fn append_entry(
    conn: &mut SqliteConnection,
    account: &AccountId,
    entry_type: EntryType,
    amount: Credits,
    description: &str,
    reference: Option<&str>,
) -> Result<(LedgerEntry, Snapshot), LedgerError> {
    let before = read_account(conn, account)
        .await?
        .ok_or_else(|| LedgerError::Corrupt(format!("account {account} vanished")))?;
    let after = before
        .balance
        .checked_add(amount)
        .ok_or_else(|| LedgerError::Overflow(account.to_string()))?;
    let now = now_ms();
    let id = sqlx::query(
        "INSERT INTO credit_transactions \
         (account_id, type, amount, balance_before, balance_after, description, reference, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(account.as_str())
    .bind(entry_type.as_str())
    .bind(amount.micros())
    .bind(before.balance.micros())
    .bind(after.micros())
    .bind(description)
    .bind(reference)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .last_insert_rowid();
    sqlx::query("UPDATE accounts SET balance = ?, rev = rev + 1, updated_at = ? WHERE id = ?")
        .bind(after.micros())
        .bind(now)
        .bind(account.as_str())
        .execute(&mut *conn)
        .await?;
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
    Ok((
        entry,
        Snapshot {
            balance: after,
            rev: before.rev + 1,
        },
    ))
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn migrate(&self) -> Result<(), LedgerError> {
        migrator().run(&self.pool).await?;
        Ok(())
    }

    async fn ensure_account(
        &self,
        account: &AccountId,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError> {
        {
            let mut conn = self.pool.acquire().await?;
            if let Some(snapshot) = read_account(&mut conn, account).await? {
                return Ok(snapshot);
            }
            // Returned to the pool before the transaction takes one, or concurrent first
            // sightings could each hold a connection while waiting for another.
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let created = insert_account(&mut tx, account).await?;
        if created && signup_grant.is_positive() {
            append_entry(
                &mut tx,
                account,
                EntryType::Bonus,
                signup_grant,
                "signup grant",
                Some("signup"),
            )
            .await?;
        }
        let snapshot = read_account(&mut tx, account)
            .await?
            .ok_or_else(|| LedgerError::Corrupt(format!("account {account} vanished")))?;
        tx.commit().await?;
        Ok(snapshot)
    }

    async fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, LedgerError> {
        let row = sqlx::query("SELECT id, balance, rev, created_at FROM accounts WHERE id = ?")
            .bind(account.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok(AccountRecord {
                id: account.clone(),
                balance: credits(&row, "balance")?,
                rev: row.try_get("rev")?,
                created_at_ms: row.try_get("created_at")?,
            })
        })
        .transpose()
    }

    async fn snapshot(
        &self,
        bucket: &Bucket,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError> {
        match bucket {
            Bucket::Account(account) => self.ensure_account(account, signup_grant).await,
            Bucket::KeyLimit(key_id) => {
                let row = sqlx::query("SELECT spend_limit, spent, rev FROM api_keys WHERE id = ?")
                    .bind(key_id)
                    .fetch_optional(&self.pool)
                    .await?
                    .ok_or_else(|| LedgerError::Corrupt(format!("api key {key_id} vanished")))?;
                let limit: Option<i64> = row.try_get("spend_limit")?;
                let spent: i64 = row.try_get("spent")?;
                Ok(Snapshot {
                    balance: Credits::from_micros(limit.unwrap_or(i64::MAX).saturating_sub(spent)),
                    rev: row.try_get("rev")?,
                })
            }
        }
    }

    async fn grant(&self, grant: &GrantRequest) -> Result<GrantOutcome, LedgerError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_account(&mut tx, &grant.account).await?;
        if let Some(reference) = &grant.reference {
            let existing = sqlx::query(
                "SELECT id, account_id, type, amount, balance_before, balance_after, description, reference, created_at \
                 FROM credit_transactions WHERE account_id = ? AND type = ? AND reference = ?",
            )
            .bind(grant.account.as_str())
            .bind(grant.entry_type.as_str())
            .bind(reference)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = existing {
                let entry = entry_from_row(&row)?;
                let snapshot = read_account(&mut tx, &grant.account)
                    .await?
                    .ok_or_else(|| LedgerError::Corrupt("account vanished".into()))?;
                tx.commit().await?;
                return Ok(GrantOutcome {
                    entry,
                    applied: false,
                    snapshot,
                });
            }
        }
        let (entry, snapshot) = append_entry(
            &mut tx,
            &grant.account,
            grant.entry_type,
            grant.amount,
            &grant.description,
            grant.reference.as_deref(),
        )
        .await?;
        tx.commit().await?;
        Ok(GrantOutcome {
            entry,
            applied: true,
            snapshot,
        })
    }

    async fn settle_batch(&self, batch: &[Settlement]) -> Result<Vec<SettleOutcome>, LedgerError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now = now_ms();
        // Balances move once per account per batch; entries chain through this map.
        let mut balances: HashMap<AccountId, Snapshot> = HashMap::new();
        let mut key_spend: HashMap<String, i64> = HashMap::new();
        let mut applied = Vec::with_capacity(batch.len());
        for s in batch {
            // The usage record references the account, so the account must exist first.
            if !balances.contains_key(&s.account) {
                insert_account(&mut tx, &s.account).await?;
            }
            let inserted = sqlx::query(
                "INSERT INTO usage_records (request_id, account_id, api_key_id, endpoint, model, upstream, \
                 prompt_tokens, completion_tokens, cached_tokens, cost, hold, source, stream, status, \
                 started_at, finished_at, settled_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
            )
            .bind(s.request_id.as_str())
            .bind(s.account.as_str())
            .bind(s.api_key_id.as_deref())
            .bind(&s.endpoint)
            .bind(&s.model)
            .bind(&s.upstream)
            .bind(i64::try_from(s.usage.prompt_tokens).unwrap_or(i64::MAX))
            .bind(i64::try_from(s.usage.completion_tokens).unwrap_or(i64::MAX))
            .bind(i64::try_from(s.usage.cached_tokens).unwrap_or(i64::MAX))
            .bind(s.cost.micros())
            .bind(s.hold.micros())
            .bind(s.source.as_str())
            .bind(s.stream)
            .bind(&s.status)
            .bind(s.started_at_ms)
            .bind(s.finished_at_ms)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            applied.push(inserted);
            if !inserted {
                continue;
            }
            let before = match balances.get(&s.account) {
                Some(snapshot) => snapshot.balance,
                None => {
                    let snapshot = read_account(&mut tx, &s.account).await?.ok_or_else(|| {
                        LedgerError::Corrupt(format!("account {} vanished", s.account))
                    })?;
                    balances.insert(s.account.clone(), snapshot);
                    snapshot.balance
                }
            };
            if s.cost == Credits::ZERO {
                continue;
            }
            let after = before
                .checked_sub(s.cost)
                .ok_or_else(|| LedgerError::Overflow(s.account.to_string()))?;
            let description = format!(
                "{} {}: {} prompt + {} completion tokens ({})",
                s.endpoint,
                s.model,
                s.usage.prompt_tokens,
                s.usage.completion_tokens,
                s.source.as_str()
            );
            let entry_id = sqlx::query(
                "INSERT INTO credit_transactions \
                 (account_id, type, amount, balance_before, balance_after, description, reference, created_at) \
                 VALUES (?, 'usage', ?, ?, ?, ?, ?, ?)",
            )
            .bind(s.account.as_str())
            .bind(-s.cost.micros())
            .bind(before.micros())
            .bind(after.micros())
            .bind(description)
            .bind(s.request_id.as_str())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .last_insert_rowid();
            sqlx::query("UPDATE usage_records SET transaction_id = ? WHERE request_id = ?")
                .bind(entry_id)
                .bind(s.request_id.as_str())
                .execute(&mut *tx)
                .await?;
            if let Some(snapshot) = balances.get_mut(&s.account) {
                snapshot.balance = after;
            }
            if let Some(key) = &s.api_key_id {
                let spent = key_spend.entry(key.clone()).or_default();
                *spent = spent.saturating_add(s.cost.micros());
            }
        }
        for (account, snapshot) in &mut balances {
            sqlx::query(
                "UPDATE accounts SET balance = ?, rev = rev + 1, updated_at = ? WHERE id = ?",
            )
            .bind(snapshot.balance.micros())
            .bind(now)
            .bind(account.as_str())
            .execute(&mut *tx)
            .await?;
            snapshot.rev += 1;
        }
        for (key, spent) in &key_spend {
            sqlx::query("UPDATE api_keys SET spent = spent + ?, rev = rev + 1 WHERE id = ?")
                .bind(spent)
                .bind(key)
                .execute(&mut *tx)
                .await?;
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for (s, applied) in batch.iter().zip(applied) {
            let account = match balances.get(&s.account) {
                Some(snapshot) => *snapshot,
                None => read_account(&mut tx, &s.account)
                    .await?
                    .unwrap_or(Snapshot {
                        balance: Credits::ZERO,
                        rev: 0,
                    }),
            };
            let key_limit = match &s.api_key_id {
                Some(key) => {
                    let row =
                        sqlx::query("SELECT spend_limit, spent, rev FROM api_keys WHERE id = ?")
                            .bind(key)
                            .fetch_optional(&mut *tx)
                            .await?;
                    match row {
                        Some(row) => {
                            let limit: Option<i64> = row.try_get("spend_limit")?;
                            let spent: i64 = row.try_get("spent")?;
                            limit.map(|limit| Snapshot {
                                balance: Credits::from_micros(limit.saturating_sub(spent)),
                                rev: row.try_get("rev").unwrap_or(0),
                            })
                        }
                        None => None,
                    }
                }
                None => None,
            };
            outcomes.push(SettleOutcome {
                request_id: s.request_id.clone(),
                applied,
                account,
                key_limit,
            });
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn transactions(
        &self,
        account: &AccountId,
        page: Page,
    ) -> Result<Vec<LedgerEntry>, LedgerError> {
        let sql = "SELECT id, account_id, type, amount, balance_before, balance_after, description, reference, created_at \
                   FROM credit_transactions WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?";
        let rows = sqlx::query(sql)
            .bind(account.as_str())
            .bind(page.before.unwrap_or(i64::MAX))
            .bind(i64::from(page.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(entry_from_row).collect()
    }

    async fn usage(
        &self,
        account: &AccountId,
        page: Page,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let rows = sqlx::query(
            "SELECT rowid, request_id, api_key_id, endpoint, model, upstream, prompt_tokens, completion_tokens, \
             cached_tokens, cost, hold, source, stream, status, settled_at \
             FROM usage_records WHERE account_id = ? AND rowid < ? ORDER BY rowid DESC LIMIT ?",
        )
        .bind(account.as_str())
        .bind(page.before.unwrap_or(i64::MAX))
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(UsageRecord {
                    cursor: row.try_get("rowid")?,
                    request_id: row.try_get("request_id")?,
                    api_key_id: row.try_get("api_key_id")?,
                    endpoint: row.try_get("endpoint")?,
                    model: row.try_get("model")?,
                    upstream: row.try_get("upstream")?,
                    prompt_tokens: row.try_get("prompt_tokens")?,
                    completion_tokens: row.try_get("completion_tokens")?,
                    cached_tokens: row.try_get("cached_tokens")?,
                    cost: credits(row, "cost")?,
                    hold: credits(row, "hold")?,
                    source: row.try_get("source")?,
                    stream: row.try_get("stream")?,
                    status: row.try_get("status")?,
                    settled_at_ms: row.try_get("settled_at")?,
                })
            })
            .collect()
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), LedgerError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert_account(&mut tx, &key.account).await?;
        let models = key
            .allowed_models
            .as_ref()
            .map(|m| serde_json::to_string(m).unwrap_or_else(|_| "[]".into()));
        sqlx::query(
            "INSERT INTO api_keys (id, account_id, key_hash, prefix, name, spend_limit, spent, rev, allowed_models, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, 0, 0, ?, ?)",
        )
        .bind(&key.id)
        .bind(key.account.as_str())
        .bind(&key.key_hash)
        .bind(&key.prefix)
        .bind(&key.name)
        .bind(key.spend_limit.map(Credits::micros))
        .bind(models)
        .bind(key.created_at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, LedgerError> {
        let row = sqlx::query("SELECT * FROM api_keys WHERE key_hash = ?")
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    async fn api_keys(&self, account: &AccountId) -> Result<Vec<ApiKeyRecord>, LedgerError> {
        let rows =
            sqlx::query("SELECT * FROM api_keys WHERE account_id = ? ORDER BY created_at, id")
                .bind(account.as_str())
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(key_from_row).collect()
    }

    async fn revoke_api_key(&self, key_id: &str) -> Result<bool, LedgerError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = ?, rev = rev + 1 WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(now_ms())
        .bind(key_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn cache_epoch(&self) -> Result<i64, LedgerError> {
        let epoch = sqlx::query_scalar::<_, i64>("SELECT epoch FROM cache_epoch WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(epoch)
    }

    async fn bump_cache_epoch(&self) -> Result<i64, LedgerError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE cache_epoch SET epoch = epoch + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        let epoch = sqlx::query_scalar::<_, i64>("SELECT epoch FROM cache_epoch WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(epoch)
    }

    async fn verify(&self) -> Result<Vec<VerifyProblem>, LedgerError> {
        let mut problems = Vec::new();
        let accounts = sqlx::query("SELECT id, balance FROM accounts ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        for row in &accounts {
            let id: String = row.try_get("id")?;
            let balance: i64 = row.try_get("balance")?;
            let entries = sqlx::query(
                "SELECT id, amount, balance_before, balance_after FROM credit_transactions \
                 WHERE account_id = ? ORDER BY id",
            )
            .bind(&id)
            .fetch_all(&self.pool)
            .await?;
            let mut running: i64 = 0;
            let mut sum: i128 = 0;
            for entry in &entries {
                let entry_id: i64 = entry.try_get("id")?;
                let amount: i64 = entry.try_get("amount")?;
                let before: i64 = entry.try_get("balance_before")?;
                let after: i64 = entry.try_get("balance_after")?;
                if before != running {
                    problems.push(VerifyProblem {
                        account: id.clone(),
                        problem: format!("entry {entry_id}: balance_before {before} but the previous entry left {running}"),
                    });
                }
                if i128::from(before) + i128::from(amount) != i128::from(after) {
                    problems.push(VerifyProblem {
                        account: id.clone(),
                        problem: format!("entry {entry_id}: {before} + {amount} != {after}"),
                    });
                }
                running = after;
                sum += i128::from(amount);
            }
            if sum != i128::from(balance) {
                problems.push(VerifyProblem {
                    account: id.clone(),
                    problem: format!(
                        "entries sum to {sum} micro-credits but the balance is {balance}"
                    ),
                });
            }
        }
        let orphans = sqlx::query(
            "SELECT u.request_id, u.account_id FROM usage_records u \
             LEFT JOIN credit_transactions t ON t.id = u.transaction_id \
             WHERE u.cost <> 0 AND (t.id IS NULL OR t.amount <> -u.cost OR t.reference <> u.request_id)",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in &orphans {
            let request: String = row.try_get("request_id")?;
            problems.push(VerifyProblem {
                account: row.try_get("account_id")?,
                problem: format!("usage record {request} has no matching ledger entry"),
            });
        }
        let keys = sqlx::query(
            "SELECT k.id, k.account_id, k.spent, COALESCE(SUM(u.cost), 0) AS used FROM api_keys k \
             LEFT JOIN usage_records u ON u.api_key_id = k.id GROUP BY k.id, k.account_id, k.spent",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in &keys {
            let spent: i64 = row.try_get("spent")?;
            let used: i64 = row.try_get("used")?;
            if spent != used {
                let key: String = row.try_get("id")?;
                problems.push(VerifyProblem {
                    account: row.try_get("account_id")?,
                    problem: format!(
                        "api key {key}: spent {spent} but its usage records cost {used}"
                    ),
                });
            }
        }
        Ok(problems)
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
