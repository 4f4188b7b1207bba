//! The OpenAI-compatible routes: parse, route, reserve, forward, stream back, settle.
//!
//! Request bodies pass upstream untouched unless the gateway must change them (injecting
//! `stream_options.include_usage`, or lowering the output cap under the `cap_max_tokens`
//! policy); the caller's credential never goes upstream.

pub mod bounds;
mod chunk_skim;
pub mod mock;
pub mod sse;
pub mod stream;
pub mod tokens;
pub mod upstream;
pub mod usage;

use axum::Extension;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value, json};

use crate::app::AppState;
use crate::auth::Caller;
use crate::config::DisconnectPolicy;
use crate::domain::RequestId;
use crate::http::error::ApiError;
use crate::metering::CostRequest;
use stream::Billing;
use upstream::UpstreamError;
use usage::Endpoint;

/// Largest non-streamed upstream answer the gateway reads (embeddings can be large).
const MAX_UPSTREAM_BODY: usize = 256 * 1024 * 1024;

pub async fn chat_completions(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::ChatCompletions, body)
        .await
        .into_response()
}

pub async fn completions(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::Completions, body)
        .await
        .into_response()
}

pub async fn embeddings(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::Embeddings, body)
        .await
        .into_response()
}

pub async fn responses(
    state: State<AppState>,
    caller: Extension<Caller>,
    id: Extension<RequestId>,
    body: Body,
) -> Response {
    forward(state, caller, id, Endpoint::Responses, body)
        .await
        .into_response()
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

async fn forward(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(request_id): Extension<RequestId>,
    endpoint: Endpoint,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = state.body_limit;
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ApiError::PayloadTooLarge(limit)
            } else {
                ApiError::bad_request("could not read the request body")
            }
        })?
        .to_bytes();
    let mut request: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    let object = request
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("The request body must be a JSON object"))?;
    let model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        _ => {
            return Err(ApiError::BadRequest {
                message: "You must provide a model parameter".into(),
                param: Some("model"),
                code: None,
            });
        }
    };
    bounds::check_model_name(&model)?;
    if !caller.may_use(&model) {
        return Err(ApiError::Forbidden(format!(
            "This API key may not use the model `{model}`"
        )));
    }
    let candidates = state.upstreams.candidates(&model);
    if candidates.is_empty() {
        return Err(ApiError::ModelNotFound(model));
    }
    let stream =
        endpoint != Endpoint::Embeddings && object.get("stream") == Some(&Value::Bool(true));

    let prompt_tokens = tokens::count_prompt(endpoint, &model, &request);
    let choices = bounds::generated_choices(endpoint, &request)?;
    let output_cap = bounds::requested_cap(endpoint, &request)?;
    let limited_key = caller
        .key
        .as_ref()
        .filter(|k| k.spend_limit.is_some())
        .map(|k| k.id.as_str());
    let reserved = state
        .meter
        .reserve(
            CostRequest {
                account: &caller.account,
                limited_key,
                model: &model,
                prompt_tokens,
                unsized_input: bounds::unsized_input(endpoint, &request),
                output_cap,
                choices,
                produces_output: endpoint != Endpoint::Embeddings,
            },
            request_id.clone(),
        )
        .await?;

    let object = request
        .as_object_mut()
        .ok_or_else(|| ApiError::internal("request is not an object"))?;
    // The upstream gets the cap the hold paid for, so it cannot produce more (I1).
    let mut rewritten = reserved
        .output_per_choice
        .is_some_and(|cap| enforce_output_cap(endpoint, object, cap));
    let strip_usage_chunk = stream
        && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
        && inject_include_usage(object);
    rewritten |= strip_usage_chunk;
    let upstream_body = if rewritten {
        Bytes::from(serde_json::to_vec(&request).map_err(ApiError::internal)?)
    } else {
        bytes
    };

    let call = UpstreamCall {
        state: state.clone(),
        endpoint,
        body: upstream_body,
        strip_usage_chunk,
        billing: Billing {
            meter: state.meter.clone(),
            hold: reserved.hold,
            api_key_id: caller.key.as_ref().map(|k| k.id.clone()),
            endpoint,
            model,
            upstream: String::new(),
            prompt_tokens,
            stream,
        },
    };
    match state.meter.config().on_client_disconnect {
        // On its own task, the call outlives a client that hangs up before the answer: the
        // upstream bills that work, so it is finished and billed too (dropping the response
        // then only drops the answer).
        DisconnectPolicy::Finish => tokio::spawn(call.run())
            .await
            .unwrap_or_else(|error| Err(ApiError::internal(error))),
        DisconnectPolicy::Cancel => call.run().await,
    }
}

/// A reserved request on its way upstream and back.
struct UpstreamCall {
    state: AppState,
    endpoint: Endpoint,
    body: Bytes,
    strip_usage_chunk: bool,
    /// Its hold; `upstream` is filled in once one answers.
    billing: Billing,
}

impl UpstreamCall {
    async fn run(self) -> Result<Response, ApiError> {
        // Cut at shutdown: the hold is released (nothing was produced for the client).
        let cut = self.state.meter.cut_signal();
        tokio::select! {
            response = self.exchange() => response,
            () = cut => Err(ApiError::Unavailable(
                "the gateway is shutting down; the request was not completed".into(),
            )),
        }
    }

    async fn exchange(self) -> Result<Response, ApiError> {
        let UpstreamCall {
            state,
            endpoint,
            body,
            strip_usage_chunk,
            mut billing,
        } = self;
        let candidates = state.upstreams.candidates(&billing.model);
        let answer = state
            .upstreams
            .send(&candidates, endpoint, body)
            .await
            .map_err(|error| match error {
                UpstreamError::Timeout { .. } => ApiError::Upstream {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    message: error.to_string(),
                },
                UpstreamError::Connect { .. } | UpstreamError::Failed { .. } => {
                    ApiError::Upstream {
                        status: StatusCode::BAD_GATEWAY,
                        message: error.to_string(),
                    }
                }
            })?;
        let upstream = answer.upstream;
        billing.upstream.clone_from(&upstream.config.name);
        let (parts, upstream_body) = answer.response.into_parts();
        if !parts.status.is_success() {
            // The upstream refused before producing output: no charge (dropping `billing`
            // releases the hold), and its error body — already in OpenAI's shape — goes back
            // as it is.
            drop(billing);
            tracing::info!(upstream = %upstream.config.name, status = %parts.status, "upstream answered with an error");
            return Ok(Response::from_parts(
                passthrough_parts(parts),
                upstream_body,
            ));
        }
        let is_event_stream = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_event_stream {
            let body = stream::metered_body(
                upstream_body,
                billing,
                strip_usage_chunk,
                upstream.config.idle_timeout(),
            );
            return Ok(Response::from_parts(passthrough_parts(parts), body));
        }

        let idle = upstream.config.idle_timeout();
        let collected = tokio::time::timeout(
            idle,
            Limited::new(upstream_body, MAX_UPSTREAM_BODY).collect(),
        )
        .await;
        let body = match collected {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(error)) => {
                tracing::warn!(%error, "upstream body failed");
                return Err(ApiError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message: "the upstream's answer could not be read".into(),
                });
            }
            Err(_) => {
                return Err(ApiError::Upstream {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    message: "the upstream's answer did not complete in time".into(),
                });
            }
        };
        match serde_json::from_slice::<Value>(&body) {
            Ok(json) => {
                let reported = usage::usage_from_json(endpoint, &json);
                let text = usage::output_text_from_json(endpoint, &json);
                // A 2xx JSON answer is output even when its text is empty (embeddings, tool
                // calls) — unless it is an error: a `200` whose body is `{"error": {…}}`
                // produced nothing, and like an error status it is free unless the upstream
                // reported usage. (A failed response with partial output is billed for it.)
                let failed = usage::reports_error(&json);
                let produced = !(failed && text.is_empty());
                let status = if failed {
                    "upstream_failed"
                } else {
                    "completed"
                };
                // The answer leaves once its settlement is durable (DESIGN.md I4).
                if let Some(durable) = billing.settle(reported, &text, produced, status) {
                    let _ = durable.await;
                }
            }
            Err(_) => {
                tracing::warn!(upstream = %upstream.config.name, "upstream answered 2xx with a body that is not JSON; not charged");
                drop(billing);
            }
        }
        Ok(Response::from_parts(
            passthrough_parts(parts),
            Body::from(body),
        ))
    }
}

/// The upstream's status and the headers worth passing on (content type, OpenAI's metadata).
fn passthrough_parts(parts: http::response::Parts) -> http::response::Parts {
    let mut out = http::Response::new(()).into_parts().0;
    out.status = parts.status;
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        let keep = name == header::CONTENT_TYPE
            || name == header::CACHE_CONTROL
            || name.as_str().starts_with("openai-")
            || name.as_str().starts_with("x-ratelimit-");
        if keep {
            headers.append(name.clone(), value.clone());
        }
    }
    out.headers = headers;
    out
}

/// Makes every output-cap field the request set equal `cap` (per choice), or sets the
/// endpoint's preferred field when it set none; returns whether the body changed.
fn enforce_output_cap(endpoint: Endpoint, object: &mut Map<String, Value>, cap: u64) -> bool {
    let fields = bounds::cap_fields(endpoint);
    let mut changed = false;
    let mut present = false;
    for &name in fields {
        if let Some(value) = object.get_mut(name)
            && !value.is_null()
        {
            present = true;
            if value.as_u64() != Some(cap) {
                *value = Value::from(cap);
                changed = true;
            }
        }
    }
    if !present && let Some(&preferred) = fields.first() {
        object.insert(preferred.to_owned(), Value::from(cap));
        changed = true;
    }
    changed
}

/// Asks the upstream to report usage on a stream; returns true if the client had not asked
/// (so the usage-only chunk must be removed from what the client sees).
fn inject_include_usage(object: &mut Map<String, Value>) -> bool {
    let options = object
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !options.is_object() {
        *options = Value::Object(Map::new());
    }
    let Some(options) = options.as_object_mut() else {
        return false;
    };
    if options.get("include_usage") == Some(&Value::Bool(true)) {
        return false;
    }
    options.insert("include_usage".into(), Value::Bool(true));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_is_injected_only_when_missing() {
        let mut asked = json!({"stream_options": {"include_usage": true}});
        assert!(!inject_include_usage(
            asked.as_object_mut().expect("object")
        ));
        let mut silent = json!({"model": "m"});
        assert!(inject_include_usage(
            silent.as_object_mut().expect("object")
        ));
        assert_eq!(silent["stream_options"]["include_usage"], json!(true));
        let mut refused = json!({"stream_options": {"include_usage": false, "x": 1}});
        assert!(inject_include_usage(
            refused.as_object_mut().expect("object")
        ));
        assert_eq!(
            refused["stream_options"],
            json!({"include_usage": true, "x": 1})
        );
    }

    #[test]
    fn the_cap_the_hold_paid_for_replaces_or_joins_the_requests_own() {
        let mut none = json!({"model": "m"});
        assert!(enforce_output_cap(
            Endpoint::ChatCompletions,
            none.as_object_mut().expect("object"),
            256
        ));
        assert_eq!(none["max_completion_tokens"], 256);
        let mut same = json!({"max_tokens": 7});
        assert!(!enforce_output_cap(
            Endpoint::ChatCompletions,
            same.as_object_mut().expect("object"),
            7
        ));
        let mut both = json!({"max_tokens": 10, "max_completion_tokens": 9});
        assert!(enforce_output_cap(
            Endpoint::ChatCompletions,
            both.as_object_mut().expect("object"),
            3
        ));
        assert_eq!(both, json!({"max_tokens": 3, "max_completion_tokens": 3}));
        let mut responses = json!({"input": "hi"});
        enforce_output_cap(
            Endpoint::Responses,
            responses.as_object_mut().expect("object"),
            5,
        );
        assert_eq!(responses["max_output_tokens"], 5);
    }
}
