//! What the two SQL adapters share: [`Ledger`] is implemented once, here, for every
//! [`SqlAdapter`]. The reads, the simple writes and `verify` are the same SQL on both databases
//! (their differences are a [`SqlDialect`]); each adapter keeps only the writes that lock and
//! plan differently ([`SqlAdapter`]'s methods).

mod dialect;
pub(crate) mod rows;
pub(crate) mod statements;
mod verify;

use async_trait::async_trait;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, Encode, Executor, Pool, SqlSafeStr as _, Type};

pub use dialect::SqlDialect;
use rows::{
    SELECT_ENTRIES, SELECT_GRANTS, SELECT_KEYS, USAGE_COLUMNS, credits, entry_from_row,
    grant_from_row, key_from_row, parse_account, usage_from_row,
};

use super::{
    AccountRecord, ApiKeyRecord, Bucket, Columns as _, GrantOutcome, GrantRecord, GrantRequest,
    Ledger, LedgerEntry, LedgerError, Page, SetAside, SettleOutcome, Settlement, Snapshot,
    UsageRecord, VerifyProblem, set_aside,
};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};

/// An embedded migration: version, description, SQL, and whether it runs outside a
/// transaction.
pub(in crate::ledger) type MigrationFile = (i64, &'static str, &'static str, bool);

/// The migrator of an adapter's embedded migrations.
pub(in crate::ledger) fn migrator_of(migrations: &[MigrationFile]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, description, sql, no_tx)| {
                Migration::new(
                    version,
                    description.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    no_tx,
                )
            })
            .collect(),
    )
}

/// A ledger on a SQL database: its pool, and the [`Ledger`] writes whose locking and planning
/// differ by database. Each method means what the [`Ledger`] method of the same name says.
#[async_trait]
pub trait SqlAdapter: Send + Sync + 'static {
    type Db: SqlDialect;

    /// The pool the shared reads and writes use.
    fn pool(&self) -> &Pool<Self::Db>;

    async fn migrate(&self) -> Result<(), LedgerError>;

    async fn ensure_account(
        &self,
        account: &AccountId,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError>;

    async fn grant(&self, grant: &GrantRequest) -> Result<GrantOutcome, LedgerError>;

    async fn settle_batch(&self, batch: &[Settlement]) -> Result<Vec<SettleOutcome>, LedgerError>;

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), LedgerError>;

    async fn expire_account(
        &self,
        account: &AccountId,
        now_ms: i64,
        keep: Credits,
    ) -> Result<(Snapshot, bool), LedgerError>;
}

#[async_trait]
impl<A> Ledger for A
where
    A: SqlAdapter,
    for<'c> &'c mut <A::Db as sqlx::Database>::Connection: Executor<'c, Database = A::Db>,
    for<'q> &'q str: Encode<'q, A::Db> + Type<A::Db>,
    i64: for<'q> Encode<'q, A::Db> + Type<A::Db>,
{
    async fn migrate(&self) -> Result<(), LedgerError> {
        SqlAdapter::migrate(self).await
    }

    async fn ensure_account(
        &self,
        account: &AccountId,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError> {
        SqlAdapter::ensure_account(self, account, signup_grant).await
    }

    async fn account(&self, account: &AccountId) -> Result<Option<AccountRecord>, LedgerError> {
        let row =
            sqlx::query::<A::Db>("SELECT balance, rev, created_at FROM accounts WHERE id = ?")
                .bind(account.as_str())
                .fetch_optional(self.pool())
                .await?;
        row.map(|row| {
            Ok(AccountRecord {
                id: account.clone(),
                balance: credits(&row, "balance")?,
                rev: row.int("rev")?,
                created_at_ms: row.int("created_at")?,
            })
        })
        .transpose()
    }

    async fn snapshot(
        &self,
        bucket: &Bucket,
        signup_grant: Credits,
    ) -> Result<Snapshot, LedgerError> {
        let key_id = match bucket {
            Bucket::Account(account) => {
                return SqlAdapter::ensure_account(self, account, signup_grant).await;
            }
            Bucket::KeyLimit(key_id) => key_id,
        };
        let row = sqlx::query::<A::Db>("SELECT spend_limit, spent, rev FROM api_keys WHERE id = ?")
            .bind(key_id.as_str())
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| LedgerError::Corrupt(format!("api key {key_id} vanished")))?;
        let limit = row.optional_int("spend_limit")?.unwrap_or(i64::MAX);
        Ok(Snapshot::plain(
            Credits::from_micros(limit.saturating_sub(row.int("spent")?)),
            row.int("rev")?,
        ))
    }

    async fn grant(&self, grant: &GrantRequest) -> Result<GrantOutcome, LedgerError> {
        SqlAdapter::grant(self, grant).await
    }

    async fn settle_batch(&self, batch: &[Settlement]) -> Result<Vec<SettleOutcome>, LedgerError> {
        SqlAdapter::settle_batch(self, batch).await
    }

    async fn transactions(
        &self,
        account: &AccountId,
        page: Page,
    ) -> Result<Vec<LedgerEntry>, LedgerError> {
        let sql =
            format!("{SELECT_ENTRIES}WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?");
        sqlx::query::<A::Db>(AssertSqlSafe(sql).into_sql_str())
            .bind(account.as_str())
            .bind(page.before.unwrap_or(i64::MAX))
            .bind(i64::from(page.limit))
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(entry_from_row)
            .collect()
    }

    async fn usage(
        &self,
        account: &AccountId,
        page: Page,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let order = <A::Db as SqlDialect>::USAGE_ORDER;
        let sql = format!(
            "SELECT {order} AS page_cursor, {USAGE_COLUMNS} FROM usage_records \
             WHERE account_id = ? AND {order} < ? ORDER BY {order} DESC LIMIT ?"
        );
        sqlx::query::<A::Db>(AssertSqlSafe(sql).into_sql_str())
            .bind(account.as_str())
            .bind(page.before.unwrap_or(i64::MAX))
            .bind(i64::from(page.limit))
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(usage_from_row)
            .collect()
    }

    async fn create_api_key(&self, key: &ApiKeyRecord) -> Result<(), LedgerError> {
        SqlAdapter::create_api_key(self, key).await
    }

    async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, LedgerError> {
        let sql = format!("{SELECT_KEYS}WHERE key_hash = ?");
        sqlx::query::<A::Db>(AssertSqlSafe(sql).into_sql_str())
            .bind(key_hash)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(key_from_row)
            .transpose()
    }

    async fn api_keys(&self, account: &AccountId) -> Result<Vec<ApiKeyRecord>, LedgerError> {
        let sql = format!("{SELECT_KEYS}WHERE account_id = ? ORDER BY created_at, id");
        sqlx::query::<A::Db>(AssertSqlSafe(sql).into_sql_str())
            .bind(account.as_str())
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(key_from_row)
            .collect()
    }

    async fn revoke_api_key(&self, key_id: &str) -> Result<bool, LedgerError> {
        A::Db::rerun("revoke_api_key", || async {
            let done = sqlx::query::<A::Db>(
                "UPDATE api_keys SET revoked_at = ?, rev = rev + 1 \
                 WHERE id = ? AND revoked_at IS NULL",
            )
            .bind(now_ms())
            .bind(key_id)
            .execute(self.pool())
            .await?;
            Ok(A::Db::rows_affected(&done) == 1)
        })
        .await
    }

    async fn cache_epoch(&self) -> Result<i64, LedgerError> {
        let row = sqlx::query::<A::Db>("SELECT epoch FROM cache_epoch WHERE id = 1")
            .fetch_one(self.pool())
            .await?;
        Ok(row.int("epoch")?)
    }

    async fn bump_cache_epoch(&self) -> Result<i64, LedgerError> {
        A::Db::rerun("bump_cache_epoch", || async {
            let mut tx = self.pool().begin_with(A::Db::BEGIN_WRITE).await?;
            sqlx::query::<A::Db>("UPDATE cache_epoch SET epoch = epoch + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await?;
            let epoch = sqlx::query::<A::Db>("SELECT epoch FROM cache_epoch WHERE id = 1")
                .fetch_one(&mut *tx)
                .await?
                .int("epoch")?;
            tx.commit().await?;
            Ok(epoch)
        })
        .await
    }

    async fn verify(&self, overdraft: Credits) -> Result<Vec<VerifyProblem>, LedgerError> {
        verify::problems::<A::Db>(self.pool(), overdraft).await
    }

    async fn set_aside(&self, entry: &SetAside) -> Result<(), LedgerError> {
        sqlx::query::<A::Db>(A::Db::INSERT_SET_ASIDE)
            .bind(entry.request_id.as_str())
            .bind(entry.account.as_str())
            .bind(entry.record.as_str())
            .bind(entry.error.as_str())
            .bind(entry.set_aside_at_ms)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn set_aside_settlements(
        &self,
        resolved: Option<bool>,
    ) -> Result<Vec<SetAside>, LedgerError> {
        sqlx::query::<A::Db>(set_aside::list_sql(resolved))
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(set_aside::from_row)
            .collect()
    }

    async fn resolve_set_aside(
        &self,
        request_id: &str,
        note: &str,
        now_ms: i64,
    ) -> Result<Option<SetAside>, LedgerError> {
        sqlx::query::<A::Db>(set_aside::RESOLVE)
            .bind(now_ms)
            .bind(note)
            .bind(request_id)
            .execute(self.pool())
            .await?;
        sqlx::query::<A::Db>(set_aside::ONE)
            .bind(request_id)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(set_aside::from_row)
            .transpose()
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        sqlx::query::<A::Db>("SELECT 1")
            .execute(self.pool())
            .await?;
        Ok(())
    }

    async fn grants(&self, account: &AccountId) -> Result<Vec<GrantRecord>, LedgerError> {
        let sql = format!("{SELECT_GRANTS}WHERE account_id = ? ORDER BY id");
        sqlx::query::<A::Db>(AssertSqlSafe(sql).into_sql_str())
            .bind(account.as_str())
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(grant_from_row)
            .collect()
    }

    async fn draws(&self, transaction_id: i64) -> Result<Vec<(i64, Credits)>, LedgerError> {
        // In drawing order.
        sqlx::query::<A::Db>(
            "SELECT d.grant_id, d.amount FROM grant_draws d \
             JOIN credit_grants g ON g.id = d.grant_id WHERE d.transaction_id = ? \
             ORDER BY g.expires_at IS NULL, g.expires_at, g.created_at, g.id",
        )
        .bind(transaction_id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|row| Ok((row.int("grant_id")?, credits(row, "amount")?)))
        .collect()
    }

    async fn accounts_due(&self, now: i64) -> Result<Vec<AccountId>, LedgerError> {
        sqlx::query::<A::Db>(
            "SELECT DISTINCT account_id FROM credit_grants \
             WHERE expired_at IS NULL AND expires_at <= ? ORDER BY account_id",
        )
        .bind(now)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|row| parse_account(&row.text("account_id")?))
        .collect()
    }

    async fn expire_account(
        &self,
        account: &AccountId,
        now: i64,
        keep: Credits,
    ) -> Result<(Snapshot, bool), LedgerError> {
        SqlAdapter::expire_account(self, account, now, keep).await
    }
}
