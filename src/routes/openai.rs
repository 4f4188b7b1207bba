//! `/v1`: the OpenAI-compatible routes. Each forwards through the metered
//! [`Proxy`](crate::proxy::Proxy) and answers its refusals in OpenAI's error shape.

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::error::ApiError;
use crate::auth::Caller;
use crate::domain::RequestId;
use crate::proxy::Endpoint;
use crate::state::AppState;

pub async fn chat_completions(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::ChatCompletions, body).await
}

pub async fn completions(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::Completions, body).await
}

pub async fn embeddings(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::Embeddings, body).await
}

pub async fn responses(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::Responses, body).await
}

async fn forward(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    endpoint: Endpoint,
    body: Body,
) -> Response {
    match state
        .proxy
        .forward(caller, request_id, endpoint, body)
        .await
    {
        Ok(response) => response,
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// `GET /v1/models`: every model name or pattern the config routes, with its price.
pub async fn models(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<Value> {
    let table = state.meter.pricing().current();
    let data: Vec<Value> = state
        .upstreams
        .all()
        .iter()
        .flat_map(|upstream| {
            upstream
                .config
                .models
                .iter()
                .map(move |model| (upstream, model))
        })
        .filter(|(_, model)| caller.may_use(model))
        .map(|(upstream, model)| {
            let is_pattern = model.contains(['*', '?', '[', '{']);
            json!({
                "id": model,
                "object": "model",
                "created": 0,
                "owned_by": upstream.config.name,
                "pattern": is_pattern,
                "pricing": table.price_for(model),
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}
