//! `/admin/*` routes (admin token or an admin-role JWT; checked by the auth middleware).
//!
//! Length: one file per HTTP surface (docs/architecture.md, "Map of src/"): these are the `/admin`
//! handlers, each thin; the operations are in `src/admin.rs`.

use axum::Json;
use axum::extract::{Path, Query, State};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::{self, AdminError};
use crate::domain::{AccountId, Credits};
use crate::ledger::{Bucket, EntryType, GrantRequest};
use crate::routes::credits::entry_json;
use crate::routes::error::{ApiError, ApiJson};
use crate::state::AppState;

impl From<AdminError> for ApiError {
    fn from(error: AdminError) -> Self {
        match error {
            AdminError::Invalid(message) => ApiError::bad_request(message),
            AdminError::InvalidAmount(message) => ApiError::BadRequest {
                message,
                param: Some("amount"),
                code: None,
            },
            AdminError::Ledger(e) => ApiError::from(e),
        }
    }
}

fn account_id(raw: &str) -> Result<AccountId, ApiError> {
    AccountId::parse(raw).map_err(|e| ApiError::bad_request(format!("account: {e}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// Credits as a decimal string; parsed by the handler, so a bad one names its field.
    amount: String,
    #[serde(rename = "type", default = "default_grant_type")]
    entry_type: String,
    #[serde(default)]
    description: String,
    /// Idempotency key: repeating a grant with the same reference changes nothing.
    reference: Option<String>,
    /// When the granted credits expire: an RFC 3339 time…
    expires_at: Option<String>,
    /// …or a lifetime such as `30d`, `12h`.
    expires_in: Option<String>,
}

/// The expiry of a grant from `expires_at` or `expires_in` (not both), as Unix ms.
fn expiry(body: &GrantBody) -> Result<Option<i64>, ApiError> {
    let invalid = |message: String, param: &'static str| ApiError::BadRequest {
        message,
        param: Some(param),
        code: None,
    };
    match (&body.expires_at, &body.expires_in) {
        (Some(_), Some(_)) => Err(invalid(
            "set expires_at or expires_in, not both".into(),
            "expires_at",
        )),
        (Some(at), None) => {
            let time =
                time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                    .map_err(|_| {
                        invalid(
                            format!("expires_at `{at}` is not an RFC 3339 time"),
                            "expires_at",
                        )
                    })?;
            let ms = i64::try_from(time.unix_timestamp_nanos() / 1_000_000)
                .map_err(|_| invalid(format!("expires_at `{at}` is out of range"), "expires_at"))?;
            if ms <= crate::domain::time::now_ms() {
                return Err(invalid(
                    format!("expires_at `{at}` is in the past"),
                    "expires_at",
                ));
            }
            Ok(Some(ms))
        }
        (None, Some(lifetime)) => {
            let duration = crate::domain::time::parse_duration(lifetime)
                .map_err(|e| invalid(e, "expires_in"))?;
            if duration.is_zero() {
                return Err(invalid("expires_in must be positive".into(), "expires_in"));
            }
            let ms = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
            Ok(Some(crate::domain::time::now_ms().saturating_add(ms)))
        }
        (None, None) => Ok(None),
    }
}

fn default_grant_type() -> String {
    "bonus".into()
}

pub async fn grant(
    State(state): State<AppState>,
    Path(account): Path<String>,
    ApiJson(body): ApiJson<GrantBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = account_id(&account)?;
    let amount: Credits = body.amount.parse().map_err(|e| ApiError::BadRequest {
        message: format!("amount: {e}"),
        param: Some("amount"),
        code: None,
    })?;
    let expires_at_ms = expiry(&body)?;
    let entry_type = match EntryType::parse(&body.entry_type) {
        Some(
            t
            @ (EntryType::Bonus | EntryType::Adjustment | EntryType::Purchase | EntryType::Refund),
        ) => t,
        _ => {
            return Err(ApiError::BadRequest {
                message: "type must be one of bonus, adjustment, purchase, refund".into(),
                param: Some("type"),
                code: None,
            });
        }
    };
    let outcome = admin::grant(
        &*state.ledger,
        GrantRequest {
            account: account.clone(),
            entry_type,
            amount,
            description: body.description,
            reference: body.reference,
            expires_at_ms,
            draw_first_from: Vec::new(),
        },
    )
    .await?;
    state
        .cache
        .apply(&Bucket::Account(account.clone()), outcome.snapshot)
        .await?;
    let status = if outcome.applied {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "account": account,
            "applied": outcome.applied,
            "transaction": entry_json(&outcome.entry),
            "balance": outcome.snapshot.balance,
        })),
    ))
}

pub async fn account(
    State(state): State<AppState>,
    Path(account): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = account_id(&account)?;
    let record = state
        .ledger
        .account(&account)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("account `{account}` does not exist")))?;
    let view = state
        .cache
        .view(&Bucket::Account(account.clone()), state.meter.source())
        .await?;
    let keys = state.ledger.api_keys(&account).await?;
    let grants = state.ledger.grants(&account).await?;
    Ok(Json(json!({
        "account": record.id,
        "balance": view.balance,
        "held": view.held,
        "available": view.available,
        "created_at": crate::domain::time::rfc3339(record.created_at_ms),
        "api_keys": keys.iter().map(key_json).collect::<Vec<_>>(),
        "grants": grants.iter().map(grant_json).collect::<Vec<_>>(),
    })))
}

fn grant_json(grant: &crate::ledger::GrantRecord) -> Value {
    let mut value = serde_json::to_value(grant).unwrap_or(Value::Null);
    if let Some(object) = value.as_object_mut() {
        let time = |ms: Option<i64>| ms.map(crate::domain::time::rfc3339);
        object.insert("expires_at".into(), json!(time(grant.expires_at_ms)));
        object.insert("expired_at".into(), json!(time(grant.expired_at_ms)));
        object.insert(
            "created_at".into(),
            json!(crate::domain::time::rfc3339(grant.created_at_ms)),
        );
    }
    value
}

fn key_json(key: &crate::ledger::ApiKeyRecord) -> Value {
    json!({
        "id": key.id,
        "account": key.account,
        "prefix": key.prefix,
        "name": key.name,
        "spend_limit": key.spend_limit,
        "spent": key.spent,
        "models": key.allowed_models,
        "created_at": crate::domain::time::rfc3339(key.created_at_ms),
        "revoked": key.is_revoked(),
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyBody {
    #[serde(default)]
    name: String,
    spend_limit: Option<Credits>,
    models: Option<Vec<String>>,
}

pub async fn create_key(
    State(state): State<AppState>,
    Path(account): Path<String>,
    ApiJson(body): ApiJson<CreateKeyBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let account = account_id(&account)?;
    let created = admin::create_key(
        &*state.ledger,
        account,
        body.name,
        body.spend_limit,
        body.models,
    )
    .await?;
    let mut value = key_json(&created.record);
    if let Some(object) = value.as_object_mut() {
        object.insert("key".into(), Value::String(created.secret));
    }
    Ok((StatusCode::CREATED, Json(value)))
}

pub async fn revoke_key(
    State(state): State<AppState>,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !admin::revoke_key(&*state.ledger, &key_id).await? {
        return Err(ApiError::NotFound(format!("no live API key `{key_id}`")));
    }
    state.auth.keys().clear();
    Ok(Json(json!({"id": key_id, "revoked": true})))
}

/// `GET /admin/pricing`: the prices in force here, and every instance's price version.
pub async fn pricing(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let table = state.meter.pricing().current();
    let models: Vec<Value> = table
        .entries()
        .map(|(pattern, price)| {
            let mut entry = serde_json::to_value(price).unwrap_or(Value::Null);
            if let Some(object) = entry.as_object_mut() {
                object.insert("match".into(), Value::String(pattern.to_owned()));
            }
            entry
        })
        .collect();
    let instances =
        match &state.pricing_registry {
            Some(registry) => Some(registry.versions().await.map_err(|e| {
                ApiError::Unavailable(format!("cannot read instance versions: {e}"))
            })?),
            None => None,
        };
    Ok(Json(json!({
        "instance": state.meter.instance(),
        "version": table.version(),
        "fingerprint": crate::metering::pricing_sync::fingerprint(&table),
        "rounding": table.rounding(),
        "default": table.default_price(),
        "models": models,
        "instances": instances,
    })))
}

/// `POST /admin/pricing/reload`: re-reads the pricing file now (siblings follow through Redis).
pub async fn reload_pricing(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let version = state
        .meter
        .pricing()
        .reload_from(&state.pricing_path)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let table = state.meter.pricing().current();
    Ok(Json(json!({
        "version": version,
        "fingerprint": crate::metering::pricing_sync::fingerprint(&table),
    })))
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    outcome: Option<String>,
    #[serde(flatten)]
    page: crate::routes::credits::PageQuery,
}

/// `GET /admin/payments/events[?outcome=review]`: provider events as processed, newest first;
/// those kept for review carry their raw payload.
pub async fn payment_events(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
) -> Result<Json<Value>, ApiError> {
    let page = query.page.page()?;
    if let Some(outcome) = &query.outcome
        && !["processed", "ignored", "review"].contains(&outcome.as_str())
    {
        return Err(ApiError::BadRequest {
            message: "outcome must be one of processed, ignored, review".into(),
            param: Some("outcome"),
            code: None,
        });
    }
    let events = state
        .payments
        .store()
        .events(query.outcome.as_deref(), page)
        .await?;
    let last = events.last().map(|e| e.cursor);
    let data = events
        .iter()
        .map(|event| {
            let mut value = serde_json::to_value(event).unwrap_or(Value::Null);
            if let Some(object) = value.as_object_mut() {
                object.remove("received_at_ms");
                object.insert(
                    "received_at".into(),
                    json!(crate::domain::time::rfc3339(event.received_at_ms)),
                );
            }
            value
        })
        .collect();
    Ok(crate::routes::credits::list(data, last, page.limit))
}

/// `GET /admin/orders/{id}`: any account's order.
pub async fn order(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match state.payments.store().order(&id).await? {
        Some(order) => {
            let mut value = crate::routes::payments::order_json(&order);
            value["account_id"] = json!(order.account);
            Ok(Json(value))
        }
        None => Err(ApiError::NotFound(format!("no order {id}"))),
    }
}

pub fn coupon_json(coupon: &crate::billing::coupons::Coupon) -> Value {
    let time = |ms: Option<i64>| ms.map(crate::domain::time::rfc3339);
    json!({
        "code": coupon.code,
        "kind": coupon.kind,
        "percent_off": coupon
            .percent_off_bp
            .map(|bp| rust_decimal::Decimal::new(bp, 2).normalize().to_string()),
        "amount_off": coupon.amount_off.zip(coupon.currency.as_deref()).map(|(minor, currency)| {
            crate::billing::money::from_minor(minor, currency).to_string()
        }),
        "currency": coupon.currency,
        "bonus_credits": coupon.bonus_credits,
        "valid_from": time(coupon.valid_from_ms),
        "valid_until": time(coupon.valid_until_ms),
        "max_uses": coupon.max_uses,
        "max_uses_per_account": coupon.max_uses_per_account,
        "min_package": coupon.min_package,
        "active": coupon.active,
        "uses": coupon.uses,
        "created_at": crate::domain::time::rfc3339(coupon.created_at_ms),
    })
}

/// `POST /admin/coupons`.
pub async fn create_coupon(
    State(state): State<AppState>,
    ApiJson(spec): ApiJson<crate::billing::coupons::CouponSpec>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let coupon = spec
        .into_coupon(&state.packages, crate::domain::time::now_ms())
        .map_err(|(message, param)| ApiError::BadRequest {
            message,
            param: Some(param),
            code: None,
        })?;
    if !state.payments.store().create_coupon(&coupon).await? {
        return Err(ApiError::Conflict(format!(
            "coupon {} exists already",
            coupon.code
        )));
    }
    Ok((StatusCode::CREATED, Json(coupon_json(&coupon))))
}

/// `GET /admin/coupons`.
pub async fn coupons(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let coupons = state.payments.store().coupons().await?;
    let data: Vec<Value> = coupons.iter().map(coupon_json).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CouponPatch {
    active: bool,
}

/// `PATCH /admin/coupons/{code}` `{"active": false}`: retires (or revives) a coupon.
pub async fn update_coupon(
    State(state): State<AppState>,
    Path(code): Path<String>,
    ApiJson(patch): ApiJson<CouponPatch>,
) -> Result<Json<Value>, ApiError> {
    let code = crate::billing::coupons::normalize_code(&code)
        .ok_or_else(|| ApiError::NotFound(format!("no coupon {code}")))?;
    let store = state.payments.store();
    if !store
        .set_coupon_active(&code, patch.active, crate::domain::time::now_ms())
        .await?
    {
        return Err(ApiError::NotFound(format!("no coupon {code}")));
    }
    let coupon = store
        .coupon(&code)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no coupon {code}")))?;
    Ok(Json(coupon_json(&coupon)))
}

/// The longest note an admin may leave on a resolved settlement (bytes).
const MAX_NOTE_BYTES: usize = 4096;

#[derive(Debug, Deserialize)]
pub struct SetAsideQuery {
    resolved: Option<String>,
}

fn set_aside_json(entry: &crate::ledger::SetAside) -> Value {
    // The record is the settlement's JSON; shown as text only if it is not JSON at all.
    let settlement = serde_json::from_str::<Value>(&entry.record)
        .unwrap_or_else(|_| Value::String(entry.record.clone()));
    json!({
        "request_id": entry.request_id,
        "account": entry.account,
        "settlement": settlement,
        "error": entry.error,
        "set_aside_at": crate::domain::time::rfc3339(entry.set_aside_at_ms),
        "resolved": entry.resolved_at_ms.is_some(),
        "resolved_at": entry.resolved_at_ms.map(crate::domain::time::rfc3339),
        "resolved_note": entry.resolved_note,
    })
}

/// `GET /admin/settlements/set-aside[?resolved=true|false]`: the settlements the ledger refused
/// on their own and the settler set aside uncharged, newest first.
pub async fn set_aside_settlements(
    State(state): State<AppState>,
    Query(query): Query<SetAsideQuery>,
) -> Result<Json<Value>, ApiError> {
    let resolved = match query.resolved.as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return Err(ApiError::BadRequest {
                message: "resolved must be true or false".into(),
                param: Some("resolved"),
                code: None,
            });
        }
    };
    let entries = state.ledger.set_aside_settlements(resolved).await?;
    let data: Vec<Value> = entries.iter().map(set_aside_json).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveBody {
    /// What the admin did about it (charged it by hand, waived it, …).
    note: String,
}

/// `POST /admin/settlements/set-aside/{request_id}/resolve` `{"note": "…"}`: marks a set-aside
/// settlement dealt with, so `ledger verify` stops reporting it. Idempotent: resolving it again
/// answers the first resolution unchanged.
pub async fn resolve_set_aside(
    State(state): State<AppState>,
    Path(request_id): Path<String>,
    ApiJson(body): ApiJson<ResolveBody>,
) -> Result<Json<Value>, ApiError> {
    let note = body.note.trim();
    if note.is_empty() || note.len() > MAX_NOTE_BYTES {
        return Err(ApiError::BadRequest {
            message: format!("note must be 1 to {MAX_NOTE_BYTES} bytes saying what was done"),
            param: Some("note"),
            code: None,
        });
    }
    match state
        .ledger
        .resolve_set_aside(&request_id, note, crate::domain::time::now_ms())
        .await?
    {
        Some(entry) => Ok(Json(set_aside_json(&entry))),
        None => Err(ApiError::NotFound(format!(
            "no settlement {request_id} was set aside"
        ))),
    }
}
