//! The metered response body: upstream SSE frames go to the client as they arrive, a copy goes
//! through the [`SseObserver`], and the request is settled when the stream ends.
//!
//! Settlement lives in `Drop`, so every ending is billed exactly once: the upstream finished, the
//! upstream failed, the stream went idle, or the client hung up (hyper drops the body, which
//! also drops — and so cancels — the upstream request).

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::Stream;
use http_body_util::BodyExt;

use super::sse::SseObserver;
use super::usage::Endpoint;
use crate::domain::TokenUsage;
use crate::ledger::UsageSource;
use crate::metering::{Finished, Hold, Meter};

/// Everything needed to settle a request once its output is known.
pub struct Billing {
    pub meter: Meter,
    pub hold: Hold,
    pub api_key_id: Option<String>,
    pub endpoint: Endpoint,
    pub model: String,
    pub upstream: String,
    /// The tokenizer's count of the prompt, used when the upstream reports no usage.
    pub prompt_tokens: u64,
    pub stream: bool,
}

impl Billing {
    /// What to charge: reported usage, or counted usage when there is output (or the client
    /// hung up); `None` when nothing is owed (an upstream that failed before producing output).
    fn charge(
        &self,
        reported: Option<TokenUsage>,
        output_text: &str,
        saw_output: bool,
        status: &'static str,
    ) -> Option<Finished> {
        let (usage, source) = match reported {
            Some(usage) => (usage, UsageSource::Reported),
            None if saw_output || status == "client_disconnected" => {
                let usage = TokenUsage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: super::tokens::count_text(&self.model, output_text),
                    cached_tokens: 0,
                };
                (usage, UsageSource::Counted)
            }
            None => return None,
        };
        Some(Finished {
            api_key_id: self.api_key_id.clone(),
            endpoint: self.endpoint.path(),
            model: self.model.clone(),
            upstream: self.upstream.clone(),
            usage,
            source,
            stream: self.stream,
            status,
        })
    }

    /// Settles from a context that cannot wait (a `Drop`). Dropping the hold unused releases it.
    pub fn settle(
        self,
        reported: Option<TokenUsage>,
        output_text: &str,
        saw_output: bool,
        status: &'static str,
    ) {
        if let Some(finished) = self.charge(reported, output_text, saw_output, status) {
            self.meter.finish(self.hold, finished);
        }
    }

    /// Settles and records the charge in the balance cache before returning.
    pub async fn settle_recorded(
        self,
        reported: Option<TokenUsage>,
        output_text: &str,
        saw_output: bool,
        status: &'static str,
    ) {
        if let Some(finished) = self.charge(reported, output_text, saw_output, status) {
            self.meter.finish_recorded(self.hold, finished).await;
        }
    }
}

struct Metered {
    upstream: Body,
    observer: SseObserver,
    billing: Option<Billing>,
    idle_timeout: Duration,
    status: &'static str,
}

impl Drop for Metered {
    fn drop(&mut self) {
        if let Some(billing) = self.billing.take() {
            let (_, summary) = self.observer.finish();
            billing.settle(
                summary.usage,
                &summary.output_text,
                summary.saw_output,
                self.status,
            );
        }
    }
}

/// Wraps an upstream SSE body; `strip_usage_chunk` removes the usage chunk the gateway asked for.
pub fn metered_body(
    upstream: Body,
    billing: Billing,
    strip_usage_chunk: bool,
    idle_timeout: Duration,
) -> Body {
    let observer = SseObserver::new(billing.endpoint, strip_usage_chunk);
    let state = Metered {
        upstream,
        observer,
        billing: Some(billing),
        idle_timeout,
        // Until the stream ends by itself, a drop means the client went away.
        status: "client_disconnected",
    };
    Body::from_stream(frames(state))
}

fn frames(state: Metered) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            let next = tokio::time::timeout(state.idle_timeout, state.upstream.frame()).await;
            match next {
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let out = state.observer.observe(data);
                    if out.is_empty() {
                        continue;
                    }
                    return Some((Ok(out), Some(state)));
                }
                Ok(None) => {
                    state.status = "completed";
                    let rest = settle_now(&mut state).await;
                    return rest.map(|bytes| (Ok(bytes), None));
                }
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "upstream stream failed");
                    state.status = "upstream_failed";
                    settle_now(&mut state).await;
                    return Some((Err(std::io::Error::other("upstream stream failed")), None));
                }
                Err(_) => {
                    tracing::warn!(timeout = ?state.idle_timeout, "upstream stream went idle");
                    state.status = "upstream_timeout";
                    settle_now(&mut state).await;
                    return Some((
                        Err(std::io::Error::other("upstream stream timed out")),
                        None,
                    ));
                }
            }
        }
    })
}

/// Settles with the final summary, recorded before the response ends; returns any bytes the
/// observer still held back.
async fn settle_now(state: &mut Metered) -> Option<Bytes> {
    let (rest, summary) = state.observer.finish();
    if let Some(billing) = state.billing.take() {
        billing
            .settle_recorded(
                summary.usage,
                &summary.output_text,
                summary.saw_output,
                state.status,
            )
            .await;
    }
    (!rest.is_empty()).then_some(rest)
}
