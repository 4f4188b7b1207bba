//! The HTTP edge: every route, the middleware in front of them, and the one error type that
//! answers in OpenAI's shape. Handlers are thin: parse, call the domain, present.
//!
//! One file per surface: [`openai`] (`/v1`, the metered proxy), [`billing`] (`/v1/billing`),
//! [`credits`] (`/api/credits`), [`payments`] (`/api/payment`), [`admin`] (`/admin`),
//! [`health`].

pub mod admin;
pub mod billing;
pub mod credits;
pub mod error;
pub mod health;
pub mod openai;
pub mod payments;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use http::HeaderValue;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::{Instrument, Level};

use crate::auth::{Principal, UNAUTHENTICATED_ROUTES};
use crate::domain::RequestId;
use crate::state::AppState;
use error::ApiError;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Every route, behind the request id, trace and authentication middleware.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/chat/completions", post(openai::chat_completions))
        .route("/completions", post(openai::completions))
        .route("/embeddings", post(openai::embeddings))
        .route("/responses", post(openai::responses))
        .route("/models", get(openai::models))
        .route("/billing/coupons/apply", post(billing::apply_coupon))
        .route(
            "/billing/invoices/generate",
            post(billing::generate_statement),
        )
        .route("/billing/invoices", get(billing::statements));
    let credits = Router::new()
        .route("/balance", get(credits::balance))
        .route("/transactions", get(credits::transactions))
        .route("/usage", get(credits::usage))
        .route("/packages", get(credits::packages));
    let payment = Router::new()
        .route("/create-checkout", post(payments::create_checkout))
        .route("/orders", get(payments::orders))
        .route("/orders/{id}", get(payments::order))
        .route("/invoices/{id}", get(payments::invoice))
        .route("/invoices/{id}/download", get(payments::invoice_pdf))
        .route("/webhook", post(payments::stripe_webhook))
        .route(
            "/webhook/lemonsqueezy",
            post(payments::lemonsqueezy_webhook),
        )
        .route("/webhook/polar", post(payments::polar_webhook));
    let admin = Router::new()
        .route("/accounts/{account}", get(admin::account))
        .route("/accounts/{account}/credits", post(admin::grant))
        .route("/accounts/{account}/keys", post(admin::create_key))
        .route("/keys/{key_id}", delete(admin::revoke_key))
        .route("/pricing", get(admin::pricing))
        .route("/pricing/reload", post(admin::reload_pricing))
        .route("/payments/events", get(admin::payment_events))
        .route("/orders/{id}", get(admin::order))
        .route("/coupons", get(admin::coupons).post(admin::create_coupon))
        .route("/coupons/{code}", patch(admin::update_coupon))
        .route("/settlements/set-aside", get(admin::set_aside_settlements))
        .route(
            "/settlements/set-aside/{request_id}/resolve",
            post(admin::resolve_set_aside),
        );
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .nest("/v1", v1)
        .nest("/api/credits", credits)
        .nest("/api/payment", payment)
        .nest("/admin", admin)
        // On the routes only: an unknown path answers 404 whoever asks.
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(error::BODY_LIMIT))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let id = request
                .extensions()
                .get::<RequestId>()
                .map(ToString::to_string)
                .unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }).on_response(DefaultOnResponse::new().level(Level::INFO)))
        .layer(middleware::from_fn(request_id))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("Unknown route".into())
}

async fn method_not_allowed(method: http::Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

/// Gives every request an id (the settlement's idempotency key), returned as `x-request-id`.
async fn request_id(mut request: Request, next: Next) -> Response {
    let id = RequestId::new();
    request.extensions_mut().insert(id.clone());
    let span = tracing::debug_span!("request_id", request_id = %id);
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Authenticates every route except [`UNAUTHENTICATED_ROUTES`] and the payment providers'
/// webhooks (which carry their own signatures).
async fn authenticate(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if UNAUTHENTICATED_ROUTES.contains(&path) || payments::WEBHOOK_ROUTES.contains(&path) {
        return next.run(request).await;
    }
    let is_admin = path == "/admin" || path.starts_with("/admin/");
    if is_admin {
        match state.auth.admin(request.headers()).await {
            Ok(principal) => {
                request.extensions_mut().insert(principal);
            }
            Err(error) => return ApiError::from(error).into_response(),
        }
    } else {
        match state.auth.user(request.headers()).await {
            Ok(caller) => {
                request
                    .extensions_mut()
                    .insert(Principal::User(caller.clone()));
                request.extensions_mut().insert(caller);
            }
            Err(error) => return ApiError::from(error).into_response(),
        }
    }
    next.run(request).await
}
