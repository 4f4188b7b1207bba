//! `/api/payment/*`: checkout, the caller's orders and invoices, and the providers' webhooks.
//!
//! Webhook routes are the only unauthenticated ones besides health: their signature is their
//! credential. A webhook that is unsigned, forged, stale or malformed is answered 400/401 and
//! logged, and changes nothing (docs/architecture.md I6).

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::credits::{PageQuery, list};
use crate::auth::Caller;
use crate::billing::money::from_minor;
use crate::billing::orders::{Order, Provider};
use crate::billing::provider::ProviderError;
use crate::billing::service::{Handled, PaymentError};
use crate::billing::signatures::{self, SignatureError, StandardWebhookHeaders};
use crate::billing::webhooks::{self, ParsedEvent};
use crate::domain::time::rfc3339;
use crate::routes::error::{ApiBytes, ApiError, ApiJson};
use crate::state::AppState;

/// Webhook routes: no caller credentials, the provider's signature instead.
pub const WEBHOOK_ROUTES: &[&str] = &[
    "/api/payment/webhook",
    "/api/payment/webhook/lemonsqueezy",
    "/api/payment/webhook/polar",
];

impl From<PaymentError> for ApiError {
    fn from(error: PaymentError) -> Self {
        match error {
            PaymentError::Invalid { message, param } => ApiError::BadRequest {
                message,
                param,
                code: None,
            },
            PaymentError::NotFound(what) => ApiError::NotFound(what),
            PaymentError::Retry(why) => ApiError::Conflict(why),
            PaymentError::Provider(ProviderError::Config(detail)) => ApiError::internal(detail),
            PaymentError::Provider(error) => {
                tracing::warn!(%error, "payment provider call failed");
                ApiError::Upstream {
                    status: StatusCode::BAD_GATEWAY,
                    message: error.to_string(),
                }
            }
            PaymentError::Ledger(error) => error.into(),
            PaymentError::Cache(error) => error.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    package_id: String,
    #[serde(default)]
    coupon_code: Option<String>,
    #[serde(default)]
    provider: Option<String>,
}

/// `POST /api/payment/create-checkout`.
pub async fn create_checkout(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let coupon = body.coupon_code.as_deref().filter(|c| !c.trim().is_empty());
    let started = state
        .payments
        .create_checkout(
            &caller.account,
            &body.package_id,
            body.provider.as_deref(),
            coupon,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "order_id": started.order.id,
            "checkout_url": started.checkout_url,
            "provider": started.order.provider,
            "order": order_json(&started.order),
        })),
    ))
}

pub fn order_json(order: &Order) -> Value {
    let money = |minor: i64| from_minor(minor, &order.currency).to_string();
    let time = |ms: Option<i64>| ms.map(rfc3339);
    json!({
        "id": order.id,
        "object": "order",
        "status": order.status,
        "package_id": order.package_id,
        "description": order.description,
        "provider": order.provider,
        "credits": order.credits,
        "bonus_credits": order.bonus_credits,
        "currency": order.currency,
        "list_price": money(order.list_amount),
        "discount": money(order.discount_amount),
        "amount": money(order.amount),
        "amount_paid": order.paid_amount.map(money),
        "amount_refunded": money(order.refunded_amount),
        "credits_refunded": order.credits_refunded,
        "coupon_code": order.coupon_code,
        "checkout_url": order.checkout_url.as_ref().filter(|_| order.status == crate::billing::orders::OrderStatus::Pending),
        "invoice_id": order.invoice_id,
        "dispute_status": order.dispute_status,
        "review_reason": order.review_reason,
        "credits_expire_at": time(order.grant_expires_at_ms),
        "created_at": rfc3339(order.created_at_ms),
        "updated_at": rfc3339(order.updated_at_ms),
        "paid_at": time(order.paid_at_ms),
        "refunded_at": time(order.refunded_at_ms),
        "closed_at": time(order.closed_at_ms),
    })
}

/// `GET /api/payment/orders`: the caller's orders, newest first.
pub async fn orders(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = query.page()?;
    let orders = state.payments.store().orders(&caller.account, page).await?;
    let last = orders.last().map(|(cursor, _)| *cursor);
    Ok(list(
        orders.iter().map(|(_, order)| order_json(order)).collect(),
        last,
        page.limit,
    ))
}

/// `GET /api/payment/orders/{id}`: one of the caller's orders.
pub async fn order(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.payments.store().order(&id).await? {
        Some(order) if order.account == caller.account => Ok(Json(order_json(&order))),
        _ => Err(ApiError::NotFound(format!("no order {id}"))),
    }
}

async fn own_invoice(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<crate::billing::invoice::Invoice, ApiError> {
    match state.payments.store().invoice(id).await? {
        // Someone else's invoice is reported exactly like a missing one.
        Some(invoice) if invoice.account_id == caller.account.as_str() => Ok(invoice),
        _ => Err(ApiError::NotFound(format!("no invoice {id}"))),
    }
}

/// `GET /api/payment/invoices/{id}`.
pub async fn invoice(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let invoice = own_invoice(&state, &caller, &id).await?;
    let mut value = serde_json::to_value(&invoice).map_err(ApiError::internal)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("object".into(), json!("invoice"));
    }
    Ok(Json(value))
}

/// `GET /api/payment/invoices/{id}/download`: the invoice as a PDF.
pub async fn invoice_pdf(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let invoice = own_invoice(&state, &caller, &id).await?;
    let pdf = crate::billing::pdf::render(&invoice);
    let disposition = format!("attachment; filename=\"{}.pdf\"", invoice.number);
    Ok((
        [
            (header::CONTENT_TYPE, "application/pdf".to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        pdf,
    )
        .into_response())
}

/// `POST /api/payment/webhook`: Stripe.
pub async fn stripe_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    let provider = Provider::Stripe;
    let config = state
        .payments
        .stripe_webhook()
        .ok_or_else(|| not_configured(provider))?;
    let signature = header_str(&headers, "stripe-signature");
    signatures::verify_stripe(
        &body,
        signature,
        &config.webhook_secrets,
        unix_now(),
        config.tolerance_secs,
    )
    .map_err(|e| rejected(provider, e))?;
    let parsed = webhooks::stripe::parse(&body).map_err(|e| malformed(provider, e))?;
    handle(&state, provider, parsed, &body).await
}

/// `POST /api/payment/webhook/lemonsqueezy`.
pub async fn lemonsqueezy_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    let provider = Provider::LemonSqueezy;
    let secret = state
        .payments
        .lemonsqueezy_secret()
        .ok_or_else(|| not_configured(provider))?;
    signatures::verify_lemonsqueezy(&body, header_str(&headers, "x-signature"), secret)
        .map_err(|e| rejected(provider, e))?;
    let parsed = webhooks::lemonsqueezy::parse(&body).map_err(|e| malformed(provider, e))?;
    handle(&state, provider, parsed, &body).await
}

/// `POST /api/payment/webhook/polar`: Standard Webhooks.
pub async fn polar_webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Json<Value>, ApiError> {
    let provider = Provider::Polar;
    let config = state
        .payments
        .polar_webhook()
        .ok_or_else(|| not_configured(provider))?;
    let signed = StandardWebhookHeaders {
        id: header_str(&headers, "webhook-id"),
        timestamp: header_str(&headers, "webhook-timestamp"),
        signature: header_str(&headers, "webhook-signature"),
    };
    signatures::verify_standard_webhook(
        &body,
        &signed,
        &config.webhook_secret,
        config.encoding.into(),
        unix_now(),
        config.tolerance_secs,
    )
    .map_err(|e| rejected(provider, e))?;
    let parsed =
        webhooks::polar::parse(&body, signed.id.trim()).map_err(|e| malformed(provider, e))?;
    handle(&state, provider, parsed, &body).await
}

async fn handle(
    state: &AppState,
    provider: Provider,
    event: ParsedEvent,
    body: &[u8],
) -> Result<Json<Value>, ApiError> {
    let (event_id, event_type) = (event.event_id.clone(), event.event_type.clone());
    let handled = match state.payments.handle_event(provider, event, body).await {
        Ok(handled) => handled,
        Err(error) => {
            tracing::warn!(provider = provider.as_str(), event = %event_id, %event_type, %error,
                "webhook not applied; the provider will deliver it again");
            return Err(error.into());
        }
    };
    let (outcome, detail) = match &handled {
        Handled::Duplicate => ("duplicate", None),
        Handled::Processed { .. } => ("processed", None),
        Handled::Ignored(why) => ("ignored", Some(why.as_str())),
        Handled::Review(why) => ("review", Some(why.as_str())),
    };
    tracing::info!(provider = provider.as_str(), event = %event_id, %event_type, outcome,
        "webhook handled");
    Ok(Json(
        json!({"received": true, "outcome": outcome, "detail": detail}),
    ))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn unix_now() -> i64 {
    crate::domain::time::now_ms() / 1000
}

fn not_configured(provider: Provider) -> ApiError {
    ApiError::NotFound(format!("{} webhooks are not configured", provider.as_str()))
}

/// A webhook whose signature does not check out.
fn rejected(provider: Provider, error: SignatureError) -> ApiError {
    tracing::warn!(provider = provider.as_str(), %error, "webhook rejected");
    match error {
        SignatureError::MissingHeader | SignatureError::MalformedHeader => {
            ApiError::bad_request(error.to_string())
        }
        SignatureError::BadSecretEncoding => ApiError::internal(error),
        SignatureError::TimestampOutsideTolerance | SignatureError::NoMatchingSignature => {
            ApiError::Unauthorized(error.to_string())
        }
    }
}

fn malformed(provider: Provider, error: webhooks::Malformed) -> ApiError {
    tracing::warn!(provider = provider.as_str(), %error, "signed webhook with a malformed body");
    ApiError::bad_request(error.to_string())
}
