//! `/admin/*` routes (admin token or an admin-role JWT; checked by the auth middleware).

use axum::Json;
use axum::extract::{Path, State};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminError;
use crate::app::AppState;
use crate::domain::{AccountId, Credits};
use crate::http::credits::entry_json;
use crate::http::error::{ApiError, ApiJson};
use crate::ledger::{Bucket, EntryType, GrantRequest};

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::Invalid(message) => ApiError::bad_request(message),
            AdminError::Ledger(e) => ApiError::from(e),
        }
    }
}

fn account_id(raw: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(raw).map_err(|e| ApiError::bad_request(format!("account: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    amount: Credits,
    #[serde(rename = "type", default = "default_grant_type")]
    entry_type: String,
    #[serde(default)]
    description: String,
    /// Idempotency key: repeating a grant with the same reference changes nothing.
    reference: Option<String>,
}

fn default_grant_type() -> String {
    "bonus".into()
}

pub async fn grant(
    State(state): State<AppState>,
    Path(account): Path<String>,
    ApiJson(body): ApiJson<GrantBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = account_id(&account)?;
    let entry_type = match EntryType::parse(&body.entry_type) {
        Some(
            t
            @ (EntryType::Bonus | EntryType::Adjustment | EntryType::Purchase | EntryType::Refund),
        ) => t,
        _ => {
            return Err(ApiError::BadRequest {
                message: "type must be one of bonus, adjustment, purchase, refund".into(),
                param: Some("type"),
                code: None,
            });
        }
    };
    let outcome = super::grant(
        &*state.ledger,
        GrantRequest {
            account: account.clone(),
            entry_type,
            amount: body.amount,
            description: body.description,
            reference: body.reference,
            expires_at_ms: None,
        },
    )
    .await?;
    state
        .cache
        .apply(&Bucket::Account(account.clone()), outcome.snapshot)
        .await?;
    let status = if outcome.applied {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "account": account,
            "applied": outcome.applied,
            "transaction": entry_json(&outcome.entry),
            "balance": outcome.snapshot.balance,
        })),
    ))
}

pub async fn account(
    State(state): State<AppState>,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = account_id(&account)?;
    let record = state
        .ledger
        .account(&account)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("account `{account}` does not exist")))?;
    let view = state
        .cache
        .view(&Bucket::Account(account.clone()), state.meter.source())
        .await?;
    let keys = state.ledger.api_keys(&account).await?;
    Ok(Json(json!({
        "account": record.id,
        "balance": view.balance,
        "held": view.held,
        "available": view.available,
        "created_at": crate::http::rfc3339(record.created_at_ms),
        "api_keys": keys.iter().map(key_json).collect::<Vec<_>>(),
    })))
}

fn key_json(key: &crate::ledger::ApiKeyRecord) -> Value {
    json!({
        "id": key.id,
        "account": key.account,
        "prefix": key.prefix,
        "name": key.name,
        "spend_limit": key.spend_limit,
        "spent": key.spent,
        "models": key.allowed_models,
        "created_at": crate::http::rfc3339(key.created_at_ms),
        "revoked": key.is_revoked(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    #[serde(default)]
    name: String,
    spend_limit: Option<Credits>,
    models: Option<Vec<String>>,
}

pub async fn create_key(
    State(state): State<AppState>,
    Path(account): Path<String>,
    ApiJson(body): ApiJson<CreateKeyBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = account_id(&account)?;
    let created = super::create_key(
        &*state.ledger,
        account,
        body.name,
        body.spend_limit,
        body.models,
    )
    .await?;
    let mut value = key_json(&created.record);
    if let Some(object) = value.as_object_mut() {
        object.insert("key".into(), Value::String(created.secret));
    }
    Ok((StatusCode::CREATED, Json(value)))
}

pub async fn revoke_key(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !super::revoke_key(&*state.ledger, &key_id).await? {
        return Err(ApiError::NotFound(format!("no live API key `{key_id}`")));
    }
    state.auth.keys().clear();
    Ok(Json(json!({"id": key_id, "revoked": true})))
}
