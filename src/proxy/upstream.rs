//! Upstream providers: model routing and the pooled HTTP client that calls them.
//!
//! The first upstream whose patterns match a model serves it; the others that match are
//! fallbacks, tried in order on a connect error, 429 or 5xx (all before any byte reached the
//! client). The built-in `mock` upstream is served in-process by [`crate::mock`].

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use tower::ServiceExt;

use super::Endpoint;
use crate::config::ResolvedUpstream;
use crate::net::{HttpsClient, https_client};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream `{upstream}` could not be reached: {detail}")]
    Connect { upstream: String, detail: String },
    #[error("upstream `{upstream}` failed: {detail}")]
    Failed { upstream: String, detail: String },
    #[error("upstream `{upstream}` did not answer within {timeout:?}")]
    Timeout { upstream: String, timeout: Duration },
}

/// The upstreams in config order and a shared connection pool.
pub struct Upstreams {
    upstreams: Vec<ResolvedUpstream>,
    client: HttpsClient<Full<Bytes>>,
    mock: axum::Router,
}

/// A response from the upstream that served the request.
pub struct Answer<'a> {
    pub upstream: &'a ResolvedUpstream,
    pub response: Response<Body>,
}

impl Upstreams {
    pub fn new(upstreams: Vec<ResolvedUpstream>) -> Self {
        let connect_timeout = upstreams.iter().map(|u| u.config.connect_timeout()).max();
        let client = https_client(
            connect_timeout.unwrap_or(Duration::from_secs(10)),
            Duration::from_secs(90),
        );
        Upstreams {
            upstreams,
            client,
            mock: crate::mock::router(),
        }
    }

    pub fn all(&self) -> &[ResolvedUpstream] {
        &self.upstreams
    }

    /// The upstreams that serve `model`, in the order they are tried.
    pub fn candidates(&self, model: &str) -> Vec<&ResolvedUpstream> {
        self.upstreams.iter().filter(|u| u.serves(model)).collect()
    }

    /// Sends `body` to the first candidate that answers with something other than a connect
    /// error, 429 or 5xx; returns the last such answer if they all fail that way.
    pub async fn send<'a>(
        &self,
        candidates: &[&'a ResolvedUpstream],
        endpoint: Endpoint,
        body: Bytes,
    ) -> Result<Answer<'a>, UpstreamError> {
        let mut last_error = None;
        for (i, upstream) in candidates.iter().enumerate() {
            let is_last = i + 1 == candidates.len();
            match self.send_one(upstream, endpoint, body.clone()).await {
                Ok(response) if is_last || !retryable(response.status()) => {
                    return Ok(Answer { upstream, response });
                }
                Ok(response) => {
                    tracing::warn!(upstream = %upstream.config.name, status = %response.status(), "upstream failed; trying the next one");
                }
                Err(error @ UpstreamError::Connect { .. }) if !is_last => {
                    tracing::warn!(%error, "trying the next upstream");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| UpstreamError::Connect {
            upstream: "none".into(),
            detail: "no upstream serves this model".into(),
        }))
    }

    async fn send_one(
        &self,
        upstream: &ResolvedUpstream,
        endpoint: Endpoint,
        body: Bytes,
    ) -> Result<Response<Body>, UpstreamError> {
        let timeout = upstream.config.request_timeout();
        let timed_out = || UpstreamError::Timeout {
            upstream: upstream.config.name.clone(),
            timeout,
        };
        if upstream.is_builtin_mock() {
            let request = build_request(upstream, endpoint, "http://mock/v1", Body::from(body))?;
            let response = tokio::time::timeout(timeout, self.mock.clone().oneshot(request))
                .await
                .map_err(|_| timed_out())?;
            return Ok(response.unwrap_or_else(|never| match never {}));
        }
        let base = upstream.config.base_url.trim_end_matches('/');
        let request = build_request(upstream, endpoint, base, Full::new(body))?;
        let response = tokio::time::timeout(timeout, self.client.request(request))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| {
                let (upstream, detail) = (upstream.config.name.clone(), error_chain(&e));
                // Only a failed connect is known not to have reached the upstream.
                if e.is_connect() {
                    UpstreamError::Connect { upstream, detail }
                } else {
                    UpstreamError::Failed { upstream, detail }
                }
            })?;
        Ok(response.map(Body::new))
    }
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

fn build_request<B>(
    upstream: &ResolvedUpstream,
    endpoint: Endpoint,
    base: &str,
    body: B,
) -> Result<Request<B>, UpstreamError> {
    let mut builder = Request::post(format!("{base}/{}", endpoint.path()))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(key) = &upstream.api_key {
        let mut value =
            HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| UpstreamError::Connect {
                upstream: upstream.config.name.clone(),
                detail: "the API key is not a valid header value".into(),
            })?;
        value.set_sensitive(true);
        builder = builder.header(header::AUTHORIZATION, value);
    }
    for (name, value) in &upstream.config.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.body(body).map_err(|e| UpstreamError::Connect {
        upstream: upstream.config.name.clone(),
        detail: e.to_string(),
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
