//! `/healthz` (the process serves requests) and `/readyz` (its ledger and balance cache answer,
//! each named in the answer).

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};

use crate::routes::error::error_body;
use crate::state::AppState;

/// How long `/readyz` waits for each dependency: a paused database must make it answer "not
/// ready" in time for a probe, not hang it.
const READY_CHECK: Duration = Duration::from_secs(2);

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// 200 `{"status": "ready", "checks": {…}}` when the ledger and the balance cache both answer;
/// otherwise 503 in the error shape, naming what is not ready, with the same `checks`.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (ledger, cache) = tokio::join!(
        check(async { state.ledger.ping().await.map_err(|e| e.to_string()) }),
        check(async { state.cache.ping().await.map_err(|e| e.to_string()) }),
    );
    let checks = [("ledger", ledger), ("balance_cache", cache)];
    let report: serde_json::Map<String, Value> = checks
        .iter()
        .map(|(name, verdict)| {
            let text = verdict
                .as_ref()
                .map_or_else(Clone::clone, |()| "ok".to_owned());
            ((*name).to_owned(), Value::from(text))
        })
        .collect();
    let failing: Vec<String> = checks
        .iter()
        .filter_map(|(name, verdict)| verdict.as_ref().err().map(|why| format!("{name}: {why}")))
        .collect();
    if failing.is_empty() {
        return Json(json!({"status": "ready", "checks": report})).into_response();
    }
    let mut body = error_body(
        &format!("not ready: {}", failing.join("; ")),
        "server_error",
        None,
        Some("service_unavailable"),
    );
    body["status"] = Value::from("not_ready");
    body["checks"] = Value::Object(report);
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

/// One dependency's answer within [`READY_CHECK`].
async fn check(ping: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    tokio::time::timeout(READY_CHECK, ping)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", READY_CHECK.as_secs())))
}
