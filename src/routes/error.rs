//! The one request-error type, answered in OpenAI's shape:
//! `{"error":{"message","type","param","code"}}`.
//!
//! `status()` is the single place a variant maps to an HTTP status; internal errors are logged
//! here and reach the client only as a generic message.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, Request};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use crate::auth::AuthError;
use crate::cache::CacheError;
use crate::ledger::LedgerError;
use crate::metering::HoldRefused;
use crate::proxy::ProxyError;
use crate::proxy::upstream::UpstreamError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The balance (or a key's limit) cannot cover the request: 402.
    #[error("{0}")]
    InsufficientCredits(String),
    #[error("The model `{0}` does not exist or is not served by this gateway")]
    ModelNotFound(String),
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
        code: Option<&'static str>,
    },
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state; retrying later may succeed.
    #[error("{0}")]
    Conflict(String),
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    #[error("{message}")]
    Upstream { status: StatusCode, message: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    pub fn internal(error: impl std::fmt::Display) -> Self {
        ApiError::Internal(error.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::InsufficientCredits(_) => StatusCode::PAYMENT_REQUIRED,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Upstream { status, .. } => *status,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>, Option<&'static str>) {
        match self {
            ApiError::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            ApiError::Forbidden(_) => ("permission_error", None, Some("permission_denied")),
            ApiError::InsufficientCredits(_) => {
                ("insufficient_quota", None, Some("insufficient_credits"))
            }
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            ApiError::BadRequest { param, code, .. } => ("invalid_request_error", *param, *code),
            ApiError::PayloadTooLarge(_) => {
                ("invalid_request_error", None, Some("request_too_large"))
            }
            ApiError::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            ApiError::Conflict(_) => ("invalid_request_error", None, Some("conflict")),
            ApiError::MethodNotAllowed(_) => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            ApiError::Upstream { .. } => ("upstream_error", None, Some("upstream_error")),
            ApiError::Unavailable(_) => ("server_error", None, Some("service_unavailable")),
            ApiError::Internal(_) => ("server_error", None, None),
        }
    }
}

/// The OpenAI-shaped error body.
pub fn error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> serde_json::Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(error = %detail, "internal error");
        }
        let (kind, param, code) = self.kind_and_code();
        let body = error_body(&self.to_string(), kind, param, code);
        (self.status(), Json(body)).into_response()
    }
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> Self {
        match error {
            // The database is down or busy: the client may retry; details stay in our logs.
            LedgerError::Database(e) => {
                tracing::warn!(error = %e, "ledger unavailable");
                ApiError::Unavailable("ledger unavailable; try again shortly".into())
            }
            e => ApiError::internal(e),
        }
    }
}

impl From<CacheError> for ApiError {
    fn from(error: CacheError) -> Self {
        match error {
            // Fail closed: no reservation can be made, so no request is forwarded.
            CacheError::Unavailable(_) => {
                ApiError::Unavailable("balance cache unavailable; try again shortly".into())
            }
            CacheError::Load(e) => ApiError::from(e),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unauthenticated(message) => ApiError::Unauthorized(message),
            AuthError::Forbidden(message) => ApiError::Forbidden(message),
            AuthError::Unavailable(message) => ApiError::Unavailable(message),
            AuthError::Ledger(e) => ApiError::from(e),
        }
    }
}

impl From<HoldRefused> for ApiError {
    fn from(error: HoldRefused) -> Self {
        match error {
            HoldRefused::UnsizedInput { field } => ApiError::BadRequest {
                message: error.to_string(),
                param: Some(field),
                code: Some("unsupported_input"),
            },
            HoldRefused::InsufficientCredits { .. } => {
                ApiError::InsufficientCredits(error.to_string())
            }
            HoldRefused::Cache(e) => ApiError::from(e),
        }
    }
}

impl From<ProxyError> for ApiError {
    fn from(error: ProxyError) -> Self {
        let upstream = |status: StatusCode, message: String| ApiError::Upstream { status, message };
        match error {
            ProxyError::BodyTooLarge(limit) => ApiError::PayloadTooLarge(limit),
            ProxyError::BodyUnreadable | ProxyError::NotJson(_) | ProxyError::NotAnObject => {
                ApiError::bad_request(error.to_string())
            }
            ProxyError::MissingModel => ApiError::BadRequest {
                message: error.to_string(),
                param: Some("model"),
                code: None,
            },
            ProxyError::InvalidField(invalid) => ApiError::BadRequest {
                message: invalid.message,
                param: Some(invalid.field),
                code: Some("invalid_value"),
            },
            ProxyError::ModelNotAllowed(_) => ApiError::Forbidden(error.to_string()),
            ProxyError::ModelNotFound(model) => ApiError::ModelNotFound(model),
            ProxyError::HoldRefused(refused) => ApiError::from(refused),
            ProxyError::Upstream(e @ UpstreamError::Timeout { .. }) => {
                upstream(StatusCode::GATEWAY_TIMEOUT, e.to_string())
            }
            ProxyError::AnswerTimedOut => upstream(StatusCode::GATEWAY_TIMEOUT, error.to_string()),
            ProxyError::Upstream(e) => upstream(StatusCode::BAD_GATEWAY, e.to_string()),
            ProxyError::AnswerUnreadable => upstream(StatusCode::BAD_GATEWAY, error.to_string()),
            ProxyError::ShuttingDown => ApiError::Unavailable(error.to_string()),
            ProxyError::Internal(detail) => ApiError::Internal(detail),
        }
    }
}

/// `Json<T>` whose rejections are answered in OpenAI's shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::BytesRejection(rejection)) => Err(unread_body(&rejection)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

/// How much body the routes outside `/v1` read (webhooks, admin and billing requests); `/v1`
/// streams its body under `server.body_limit_bytes` instead.
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The raw body (`Bytes`, at most [`BODY_LIMIT`]) whose rejections are answered in OpenAI's
/// shape: 413 past the limit, 400 when it cannot be read.
pub struct ApiBytes(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        Bytes::from_request(req, state)
            .await
            .map(ApiBytes)
            .map_err(|rejection| unread_body(&rejection))
    }
}

fn unread_body(rejection: &BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(BODY_LIMIT)
    } else {
        ApiError::bad_request("could not read the request body")
    }
}
