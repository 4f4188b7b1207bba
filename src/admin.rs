//! Admin operations, shared by the `/admin` routes and the CLI so both change the ledger the
//! same way. Each operation bumps the shared cache epoch, so every running gateway drops its
//! in-process caches within one epoch poll (`app::EPOCH_POLL`, 100 ms).

use crate::auth::api_keys;
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits};
use crate::ledger::{ApiKeyRecord, EntryType, GrantOutcome, GrantRequest, Ledger, LedgerError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    /// The amount itself is the problem (answered naming the `amount` field).
    #[error("{0}")]
    InvalidAmount(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Grants (or, for an adjustment, possibly takes) credits.
pub async fn grant(ledger: &dyn Ledger, request: GrantRequest) -> Result<GrantOutcome, AdminError> {
    match request.entry_type {
        EntryType::Bonus | EntryType::Purchase if !request.amount.is_positive() => {
            return Err(AdminError::InvalidAmount(format!(
                "a {} must add a positive amount",
                request.entry_type.as_str()
            )));
        }
        EntryType::Usage => {
            return Err(AdminError::Invalid(
                "usage entries are written by the metering path only".into(),
            ));
        }
        _ if request.amount == Credits::ZERO => {
            return Err(AdminError::InvalidAmount("amount must not be zero".into()));
        }
        _ => {}
    }
    let outcome = ledger.grant(&request).await.map_err(|error| match error {
        // A grant's only arithmetic is this amount on the account's balance and debt, and the
        // ledger checks it before writing anything: an overflow is a bad amount, not a fault.
        LedgerError::Overflow(_) => AdminError::InvalidAmount(format!(
            "amount {} cannot be applied to account {}: its balance or debt would pass the \
             ledger's limit of ±{} credits",
            request.amount,
            request.account,
            Credits::from_micros(i64::MAX)
        )),
        error => error.into(),
    })?;
    ledger.bump_cache_epoch().await?;
    Ok(outcome)
}

/// A new key: its secret (shown once) and its record.
pub struct CreatedKey {
    pub secret: String,
    pub record: ApiKeyRecord,
}

pub async fn create_key(
    ledger: &dyn Ledger,
    account: AccountId,
    name: String,
    spend_limit: Option<Credits>,
    allowed_models: Option<Vec<String>>,
) -> Result<CreatedKey, AdminError> {
    if spend_limit.is_some_and(|limit| limit.is_negative()) {
        return Err(AdminError::Invalid(
            "spend_limit must not be negative".into(),
        ));
    }
    if let Some(models) = &allowed_models {
        for pattern in models {
            globset::Glob::new(pattern).map_err(|e| {
                AdminError::Invalid(format!("models: `{pattern}` is not a valid pattern: {e}"))
            })?;
        }
    }
    let key = api_keys::generate();
    let record = ApiKeyRecord {
        id: key.id,
        account,
        key_hash: key.hash,
        prefix: key.prefix,
        name,
        spend_limit,
        spent: Credits::ZERO,
        allowed_models,
        created_at_ms: now_ms(),
        revoked_at_ms: None,
    };
    ledger.create_api_key(&record).await?;
    ledger.bump_cache_epoch().await?;
    Ok(CreatedKey {
        secret: key.secret,
        record,
    })
}

/// Revokes a key; false if it did not exist or was revoked already.
pub async fn revoke_key(ledger: &dyn Ledger, key_id: &str) -> Result<bool, AdminError> {
    let revoked = ledger.revoke_api_key(key_id).await?;
    ledger.bump_cache_epoch().await?;
    Ok(revoked)
}
