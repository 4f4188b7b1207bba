//! The metered reverse proxy behind the `/v1` routes: parse, route, reserve, forward, stream
//! back, settle.
//!
//! Request bodies pass upstream untouched unless the gateway must change them (injecting
//! `stream_options.include_usage`, or lowering the output cap under the `cap_max_tokens`
//! policy); the caller's credential never goes upstream.

pub mod bounds;
mod charge;
mod chunk_skim;
mod endpoint;
mod error;
mod rewrite;
pub mod sse;
pub mod stream;
pub mod tokens;
pub mod upstream;
pub mod usage;

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use crate::auth::Caller;
use crate::config::DisconnectPolicy;
use crate::domain::RequestId;
use crate::metering::{CostRequest, Meter};
use charge::Charge;
pub use endpoint::Endpoint;
pub use error::ProxyError;
use rewrite::{enforce_output_cap, inject_include_usage};
use upstream::Upstreams;

/// Forwards metered requests; cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    meter: Meter,
    upstreams: Arc<Upstreams>,
    /// The largest request body read, in bytes.
    body_limit: usize,
}

/// Largest non-streamed upstream answer the gateway reads (embeddings can be large).
const MAX_UPSTREAM_BODY: usize = 256 * 1024 * 1024;

impl Proxy {
    pub fn new(meter: Meter, upstreams: Arc<Upstreams>, body_limit: usize) -> Self {
        Proxy {
            meter,
            upstreams,
            body_limit,
        }
    }

    /// Forwards one request from `caller` to `endpoint`: holds its maximum cost, calls the
    /// upstream, and answers with the upstream's response, metered and settled.
    pub async fn forward(
        &self,
        caller: Caller,
        request_id: RequestId,
        endpoint: Endpoint,
        body: Body,
    ) -> Result<Response, ProxyError> {
        let limit = self.body_limit;
        let bytes = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<LengthLimitError>().is_some() {
                    ProxyError::BodyTooLarge(limit)
                } else {
                    ProxyError::BodyUnreadable
                }
            })?
            .to_bytes();
        let mut request: Value =
            serde_json::from_slice(&bytes).map_err(|e| ProxyError::NotJson(e.to_string()))?;
        let object = request.as_object_mut().ok_or(ProxyError::NotAnObject)?;
        let model = match object.get("model") {
            Some(Value::String(model)) if !model.is_empty() => model.clone(),
            _ => return Err(ProxyError::MissingModel),
        };
        bounds::check_model_name(&model)?;
        if !caller.may_use(&model) {
            return Err(ProxyError::ModelNotAllowed(model));
        }
        if self.upstreams.candidates(&model).is_empty() {
            return Err(ProxyError::ModelNotFound(model));
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
        let reserved = self
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
            .ok_or_else(|| ProxyError::Internal("request is not an object".into()))?;
        // The upstream gets the cap the hold paid for, so it cannot produce more (I1).
        let mut rewritten = reserved
            .output_per_choice
            .is_some_and(|cap| enforce_output_cap(endpoint, object, cap));
        let strip_usage_chunk = stream
            && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
            && inject_include_usage(object);
        rewritten |= strip_usage_chunk;
        let upstream_body = if rewritten {
            Bytes::from(
                serde_json::to_vec(&request).map_err(|e| ProxyError::Internal(e.to_string()))?,
            )
        } else {
            bytes
        };

        let call = UpstreamCall {
            upstreams: self.upstreams.clone(),
            endpoint,
            body: upstream_body,
            strip_usage_chunk,
            charge: Charge {
                meter: self.meter.clone(),
                hold: reserved.hold,
                api_key_id: caller.key.as_ref().map(|k| k.id.clone()),
                endpoint,
                model,
                upstream: String::new(),
                prompt_tokens,
                stream,
            },
        };
        match self.meter.config().on_client_disconnect {
            // On its own task, the call outlives a client that hangs up before the answer: the
            // upstream bills that work, so it is finished and billed too (dropping the response
            // then only drops the answer).
            DisconnectPolicy::Finish => tokio::spawn(call.run())
                .await
                .unwrap_or_else(|error| Err(ProxyError::Internal(error.to_string()))),
            DisconnectPolicy::Cancel => call.run().await,
        }
    }
}

/// A reserved request on its way upstream and back.
struct UpstreamCall {
    upstreams: Arc<Upstreams>,
    endpoint: Endpoint,
    body: Bytes,
    strip_usage_chunk: bool,
    /// Its hold; `upstream` is filled in once one answers.
    charge: Charge,
}

impl UpstreamCall {
    async fn run(self) -> Result<Response, ProxyError> {
        // Cut at shutdown: the hold is released (nothing was produced for the client).
        let cut = self.charge.meter.cut_signal();
        tokio::select! {
            response = self.exchange() => response,
            () = cut => Err(ProxyError::ShuttingDown),
        }
    }

    async fn exchange(self) -> Result<Response, ProxyError> {
        let UpstreamCall {
            upstreams,
            endpoint,
            body,
            strip_usage_chunk,
            mut charge,
        } = self;
        let candidates = upstreams.candidates(&charge.model);
        let answer = upstreams.send(&candidates, endpoint, body).await?;
        let upstream = answer.upstream;
        charge.upstream.clone_from(&upstream.config.name);
        let (parts, upstream_body) = answer.response.into_parts();
        if !parts.status.is_success() {
            // The upstream refused before producing output: no charge (dropping `charge`
            // releases the hold), and its error body — already in OpenAI's shape — goes back
            // as it is.
            drop(charge);
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
                charge,
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
                return Err(ProxyError::AnswerUnreadable);
            }
            Err(_) => return Err(ProxyError::AnswerTimedOut),
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
                // The answer leaves once its settlement is durable (docs/architecture.md I4).
                if let Some(durable) = charge.settle(reported, &text, produced, status) {
                    let _ = durable.await;
                }
            }
            Err(_) => {
                tracing::warn!(upstream = %upstream.config.name, "upstream answered 2xx with a body that is not JSON; not charged");
                drop(charge);
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
