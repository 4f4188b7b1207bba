//! `/v1/billing/*`: coupons and monthly usage statements, authenticated like `/v1`.
//! (Usage statements live under `invoices` in the URL; payment invoices are under
//! `/api/payment/invoices`.)

use axum::Extension;
use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::Caller;
use crate::billing::money::from_minor;
use crate::billing::statements;
use crate::routes::error::{ApiError, ApiJson};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyCouponBody {
    code: String,
    package_id: String,
}

/// `POST /v1/billing/coupons/apply`: what a coupon takes off a package for the caller. Holds no
/// use: `create-checkout` counts it.
pub async fn apply_coupon(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<ApplyCouponBody>,
) -> Result<Json<Value>, ApiError> {
    let quote = state
        .payments
        .quote(&caller.account, &body.code, &body.package_id)
        .await?;
    let currency = &quote.package.currency;
    Ok(Json(json!({
        "valid": true,
        "code": quote.coupon.code,
        "kind": quote.coupon.kind,
        "package_id": quote.package.id,
        "currency": currency,
        "price": from_minor(quote.price, currency).to_string(),
        "discount": from_minor(quote.discount.amount_off, currency).to_string(),
        "total": from_minor(quote.price - quote.discount.amount_off, currency).to_string(),
        "credits": quote.package.credits,
        "bonus_credits": quote.discount.bonus_credits,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    billing_month: String,
}

/// `POST /v1/billing/invoices/generate {"billing_month":"2026-11"}`: the caller's usage
/// statement of that month, (re)built from its usage records.
pub async fn generate_statement(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(body): ApiJson<GenerateBody>,
) -> Result<Json<Value>, ApiError> {
    let month = body.billing_month.trim();
    let bounds = statements::month_bounds(month).ok_or_else(|| ApiError::BadRequest {
        message: format!("billing_month `{month}` is not a month like 2026-11"),
        param: Some("billing_month"),
        code: None,
    })?;
    let now = crate::domain::time::now_ms();
    if bounds.0 > now {
        return Err(ApiError::BadRequest {
            message: format!("billing_month `{month}` has not started yet"),
            param: Some("billing_month"),
            code: None,
        });
    }
    let store = state.payments.store();
    let usage = store
        .usage_by_model(&caller.account, bounds.0, bounds.1)
        .await?;
    let statement = statements::build(caller.account.as_str(), month, bounds, &usage, now);
    store.save_statement(&statement, now).await?;
    Ok(Json(statement_json(&statement)))
}

/// `GET /v1/billing/invoices`: the caller's usage statements, newest month first.
pub async fn statements(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    let statements = state.payments.store().statements(&caller.account).await?;
    let data: Vec<Value> = statements.iter().map(statement_json).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

fn statement_json(statement: &statements::Statement) -> Value {
    let mut value = serde_json::to_value(statement).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        object.insert("object".into(), json!("usage_statement"));
    }
    value
}
