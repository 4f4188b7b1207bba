//! `/healthz` (the process serves requests) and `/readyz` (and its ledger and balance cache answer).

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::routes::error::ApiError;
use crate::state::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state
        .ledger
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("ledger unavailable: {e}")))?;
    state
        .cache
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("balance cache unavailable: {e}")))?;
    Ok(Json(json!({"status": "ready"})))
}
