//! `/api/credits/*`: the caller's balance, ledger entries and usage records (newest first).

use axum::Extension;
use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::domain::time::rfc3339;
use crate::ledger::{Bucket, LedgerEntry, Page, UsageRecord};
use crate::routes::error::ApiError;
use crate::state::AppState;

const DEFAULT_LIMIT: u32 = 20;
const MAX_LIMIT: u32 = 100;

/// Paging parameters, read as strings so that every bad value gets an OpenAI-shaped 400.
#[derive(Debug, Deserialize)]
pub struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

impl PageQuery {
    pub(crate) fn page(&self) -> Result<Page, ApiError> {
        let limit = match self.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(raw) => raw.parse::<u32>().unwrap_or(0),
        };
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(ApiError::BadRequest {
                message: format!("limit must be between 1 and {MAX_LIMIT}"),
                param: Some("limit"),
                code: None,
            });
        }
        let before = self
            .cursor
            .as_deref()
            .map(|c| {
                c.parse::<i64>().map_err(|_| ApiError::BadRequest {
                    message: "cursor is not one this API returned".into(),
                    param: Some("cursor"),
                    code: None,
                })
            })
            .transpose()?;
        Ok(Page { limit, before })
    }
}

pub(crate) fn list(data: Vec<Value>, last_cursor: Option<i64>, limit: u32) -> Json<Value> {
    let full = data.len() == limit as usize;
    let next_cursor = last_cursor.filter(|_| full).map(|c| c.to_string());
    Json(json!({"object": "list", "data": data, "next_cursor": next_cursor}))
}

pub fn entry_json(entry: &LedgerEntry) -> Value {
    json!({
        "id": entry.id,
        "type": entry.entry_type,
        "amount": entry.amount,
        "balance_before": entry.balance_before,
        "balance_after": entry.balance_after,
        "description": entry.description,
        "reference": entry.reference,
        "created_at": rfc3339(entry.created_at_ms),
    })
}

fn usage_json(record: &UsageRecord) -> Value {
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "created_at".into(),
            Value::String(rfc3339(record.settled_at_ms)),
        );
    }
    value
}

pub async fn balance(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let view = state
        .cache
        .view(
            &Bucket::Account(caller.account.clone()),
            state.meter.source(),
        )
        .await?;
    Ok(Json(json!({
        "account": caller.account,
        "balance": view.balance,
        "held": view.held,
        "available": view.available,
    })))
}

pub async fn transactions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = query.page()?;
    let entries = state.ledger.transactions(&caller.account, page).await?;
    let last = entries.last().map(|e| e.id);
    Ok(list(
        entries.iter().map(entry_json).collect(),
        last,
        page.limit,
    ))
}

pub async fn usage(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = query.page()?;
    let records = state.ledger.usage(&caller.account, page).await?;
    let last = records.last().map(|r| r.cursor);
    Ok(list(
        records.iter().map(usage_json).collect(),
        last,
        page.limit,
    ))
}

/// `GET /api/credits/packages`: the active credit packages, in config order.
pub async fn packages(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<&crate::config::packages::Package> =
        state.packages.iter().filter(|p| p.active).collect();
    Json(json!({"object": "list", "data": data}))
}
