//! `/v1/billing/*`: coupons and monthly usage statements, authenticated like `/v1`.

use axum::Extension;
use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::app::AppState;
use crate::auth::Caller;
use crate::billing::money::from_minor;
use crate::http::error::{ApiError, ApiJson};

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
