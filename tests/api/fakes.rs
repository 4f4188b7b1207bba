//! Fake payment provider APIs on loopback, and webhook bodies signed the way the providers sign
//! them.
//!
//! - [`FakeStripe`]: `POST /v1/checkout/sessions` as async-stripe sends it (form-encoded,
//!   `Idempotency-Key` honoured), answering with a complete `checkout.session`. It pushes
//!   back on request: Stripe's own error objects and headers for 5xx and 429 (`fail_next`),
//!   answers that come late (`delay_next`), a session without a `url`.
//! - [`FakeLemonSqueezy`]: `POST /v1/checkouts` (JSON:API), with `fail_next` and `delay_next`.
//! - Webhook bodies with every field the providers send: Stripe's `checkout.session`,
//!   `charge`, `refund` and `dispute` as its spec defines them (checked against async-stripe's
//!   generated types), in event envelopes with `previous_attributes` for `*.updated`; Lemon
//!   Squeezy and Polar orders with every key of their documented examples
//!   (`tests/fixtures/webhooks/{lemonsqueezy,polar}`). Both checked by `fakes_tests.rs`.
//! - Webhook signatures: Stripe (`Stripe-Signature`), Lemon Squeezy (`X-Signature`), Polar /
//!   Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature`). The HMACs are
//!   computed here, independently of the crate's verifier, and checked against the shared
//!   vectors in `tests/fixtures/webhooks/webhook-signatures.json` (by `fakes_tests.rs`).
//!
//! Included by both the api and the production test binaries; not every item is used by both.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

type HmacSha256 = Hmac<Sha256>;

/// Now, in Unix seconds (webhook timestamps).
pub fn now_unix() -> i64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    i64::try_from(secs).expect("unix time fits i64")
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .expect("valid timestamp")
        .format(&time::format_description::well_known::Rfc3339)
        .expect("formats")
}

/// Adds `more`'s fields to the object `target` (big literals exceed `json!`'s recursion limit).
fn extend(target: &mut Value, more: Value) {
    if let (Value::Object(target), Value::Object(more)) = (target, more) {
        target.extend(more);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn serve(router: Router) -> (String, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake provider");
    let addr = listener.local_addr().expect("fake provider addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("the fake provider serves");
    });
    (format!("http://{addr}"), task)
}

/// Decodes an `application/x-www-form-urlencoded` body into (key, value) pairs, in order.
pub fn parse_form(body: &str) -> Vec<(String, String)> {
    let url = reqwest::Url::parse(&format!("http://form.invalid/?{body}")).expect("form body");
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The entries of `form` under `prefix[...]`, keyed by what is inside the brackets
/// (`metadata[order_id]` → `order_id` for prefix `metadata`).
fn bracketed(form: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    let start = format!("{prefix}[");
    form.iter()
        .filter_map(|(k, v)| {
            let inner = k.strip_prefix(&start)?.strip_suffix(']')?;
            (!inner.contains('[')).then(|| (inner.to_owned(), v.clone()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Stripe
// ---------------------------------------------------------------------------------------------

/// One Checkout Session the fake created.
#[derive(Debug, Clone)]
pub struct StripeSession {
    pub id: String,
    pub url: String,
    /// Every form field as received (keys decoded, e.g. `line_items[0][price_data][currency]`).
    pub form: BTreeMap<String, String>,
    /// `unit_amount × quantity` of the line items.
    pub amount: i64,
    /// As sent (async-stripe lower-cases nothing itself; tollgate sends lower case).
    pub currency: String,
    pub product_name: Option<String>,
    pub quantity: Option<i64>,
    pub mode: Option<String>,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    pub client_reference_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub payment_intent_metadata: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    /// The `Stripe-Version` header the client sent.
    pub stripe_version: Option<String>,
    /// The JSON the fake answered with (replayed as-is for the same idempotency key).
    pub response: Value,
}

#[derive(Default)]
struct StripeState {
    sessions: Vec<StripeSession>,
    /// Idempotency key → index in `sessions`.
    by_key: HashMap<String, usize>,
    create_calls: usize,
    fail_next: Option<u16>,
    delay_next: Option<Duration>,
    omit_url_next: bool,
    next_id: u64,
}

/// A fake Stripe API on 127.0.0.1. `base` is what `StripeApi::new` takes as its API base.
pub struct FakeStripe {
    pub base: String,
    state: Arc<Mutex<StripeState>>,
    task: JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeStripe {
    pub async fn start() -> FakeStripe {
        let state = Arc::new(Mutex::new(StripeState::default()));
        let router = Router::new()
            .route("/v1/checkout/sessions", post(stripe_create_session))
            .fallback(|| async {
                stripe_error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    None,
                    None,
                    "Unrecognized request URL (POST: /v1/…). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
                )
            })
            .with_state(state.clone());
        let (base, task) = serve(router).await;
        FakeStripe { base, state, task }
    }

    /// The next create answers `status` with the error object Stripe sends for it (an
    /// `api_error` for 5xx, `rate_limit` for 429) and creates nothing.
    pub fn fail_next(&self, status: u16) {
        lock(&self.state).fail_next = Some(status);
    }

    /// The next create is answered only after `delay`. What it does is done at once: a
    /// session is created (and kept) even if the client has given up waiting by then, as
    /// Stripe would.
    pub fn delay_next(&self, delay: Duration) {
        lock(&self.state).delay_next = Some(delay);
    }

    /// The next session created is answered without a `url` (as an embedded session would be).
    pub fn omit_url_next(&self) {
        lock(&self.state).omit_url_next = true;
    }

    /// The sessions created, oldest first (idempotent replays do not add one).
    pub fn sessions(&self) -> Vec<StripeSession> {
        lock(&self.state).sessions.clone()
    }

    pub fn session(&self, id: &str) -> Option<StripeSession> {
        lock(&self.state)
            .sessions
            .iter()
            .find(|s| s.id == id)
            .cloned()
    }

    /// Every `POST /v1/checkout/sessions` received: creates, idempotent replays and failures.
    pub fn create_calls(&self) -> usize {
        lock(&self.state).create_calls
    }
}

/// Stripe's error object (`{"error": {…}}`) with the headers Stripe sends with it: the
/// request id, and `Stripe-Should-Retry` where retrying may succeed.
fn stripe_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> Response {
    let request_id = format!("req_{}", tag(&format!("{kind}{code:?}{message}"), 14));
    let mut error = json!({
        "message": message,
        "request_log_url": format!(
            "https://dashboard.stripe.com/test/logs/{request_id}?t={}",
            now_unix()
        ),
        "type": kind,
    });
    if let Some(code) = code {
        error["code"] = json!(code);
        error["doc_url"] = json!(format!(
            "https://stripe.com/docs/error-codes/{}",
            code.replace('_', "-")
        ));
    }
    if let Some(param) = param {
        error["param"] = json!(param);
    }
    let retry = status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    let mut response = (status, axum::Json(json!({ "error": error }))).into_response();
    let headers = response.headers_mut();
    headers.insert(
        "request-id",
        request_id.parse().expect("a request id is a header value"),
    );
    if retry {
        headers.insert("stripe-should-retry", "true".parse().expect("header value"));
    }
    response
}

/// The error Stripe answers a create with for `status` (as `fail_next` asks).
fn stripe_failure(status: StatusCode) -> Response {
    match status.as_u16() {
        429 => stripe_error(
            status,
            "invalid_request_error",
            Some("rate_limit"),
            None,
            "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.",
        ),
        500.. => stripe_error(status, "api_error", None, None, "An unknown error occurred"),
        _ => stripe_error(
            status,
            "invalid_request_error",
            Some("parameter_invalid_empty"),
            Some("line_items"),
            &format!("Fake Stripe failure ({})", status.as_u16()),
        ),
    }
}

async fn stripe_create_session(
    State(state): State<Arc<Mutex<StripeState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (response, delay) = {
        let mut state = lock(&state);
        let delay = state.delay_next.take();
        (create_session(&mut state, &headers, &body), delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response
}

fn create_session(state: &mut StripeState, headers: &HeaderMap, body: &Bytes) -> Response {
    state.create_calls += 1;

    let authorized = header(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        .is_some_and(|key| key.starts_with("sk_test_") && key.len() > "sk_test_".len());
    if !authorized {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            None,
            "Invalid API Key provided: sk_****",
        );
    }
    if let Some(status) = state.fail_next.take() {
        return stripe_failure(
            StatusCode::from_u16(status).expect("fail_next: a valid HTTP status"),
        );
    }

    let form: BTreeMap<String, String> = parse_form(&String::from_utf8_lossy(body))
        .into_iter()
        .collect();
    let idempotency_key = header(headers, "idempotency-key");
    if let Some(key) = &idempotency_key
        && let Some(&index) = state.by_key.get(key)
    {
        let earlier = &state.sessions[index];
        if earlier.form != form {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                None,
                None,
                &format!(
                    "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."
                ),
            );
        }
        let mut replay = (StatusCode::OK, axum::Json(earlier.response.clone())).into_response();
        replay
            .headers_mut()
            .insert("idempotent-replayed", "true".parse().expect("header value"));
        return replay;
    }

    let Some(unit_amount) = form
        .get("line_items[0][price_data][unit_amount]")
        .and_then(|v| v.parse::<i64>().ok())
    else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("parameter_missing"),
            Some("line_items[0][price_data][unit_amount]"),
            "Missing required param: line_items[0][price_data][unit_amount].",
        );
    };
    let quantity = form
        .get("line_items[0][quantity]")
        .and_then(|v| v.parse::<i64>().ok());
    let Some(currency) = form.get("line_items[0][price_data][currency]").cloned() else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("parameter_missing"),
            Some("line_items[0][price_data][currency]"),
            "Missing required param: line_items[0][price_data][currency].",
        );
    };
    let amount = unit_amount
        .checked_mul(quantity.unwrap_or(1))
        .expect("amount fits i64");

    state.next_id += 1;
    let id = format!("cs_test_{}", state.next_id);
    let url = format!("https://checkout.stripe.test/c/pay/{id}");
    let omit_url = std::mem::take(&mut state.omit_url_next);
    let metadata = bracketed(&form, "metadata");
    let payment_intent_metadata = bracketed(&form, "payment_intent_data[metadata]");
    let created = now_unix();
    // A new session, as Stripe answers a create: open, unpaid, no customer yet.
    let mut response = session_shape(&id, created, amount, &currency, json!(metadata));
    extend(
        &mut response,
        json!({
            "cancel_url": form.get("cancel_url"),
            "client_reference_id": form.get("client_reference_id"),
            "mode": form.get("mode").map_or("payment", String::as_str),
            "payment_status": "unpaid",
            "status": "open",
            "success_url": form.get("success_url"),
            "url": if omit_url { Value::Null } else { json!(url) },
        }),
    );
    let session = StripeSession {
        id,
        url,
        amount,
        currency,
        product_name: form
            .get("line_items[0][price_data][product_data][name]")
            .cloned(),
        quantity,
        mode: form.get("mode").cloned(),
        success_url: form.get("success_url").cloned(),
        cancel_url: form.get("cancel_url").cloned(),
        client_reference_id: form.get("client_reference_id").cloned(),
        metadata,
        payment_intent_metadata,
        idempotency_key: idempotency_key.clone(),
        stripe_version: header(headers, "stripe-version"),
        form,
        response: response.clone(),
    };
    state.sessions.push(session);
    if let Some(key) = idempotency_key {
        let index = state.sessions.len() - 1;
        state.by_key.insert(key, index);
    }
    (StatusCode::OK, axum::Json(response)).into_response()
}

// ---------------------------------------------------------------------------------------------
// Lemon Squeezy
// ---------------------------------------------------------------------------------------------

/// One checkout the fake created.
#[derive(Debug, Clone)]
pub struct LemonSqueezyCheckout {
    pub id: String,
    pub url: String,
    pub store_id: Option<String>,
    pub variant_id: Option<String>,
    pub custom_price: Option<i64>,
    /// `checkout_data.custom` as sent.
    pub custom: Value,
    pub redirect_url: Option<String>,
    /// The whole request body.
    pub body: Value,
}

#[derive(Default)]
struct LemonSqueezyState {
    checkouts: Vec<LemonSqueezyCheckout>,
    create_calls: usize,
    fail_next: Option<u16>,
    delay_next: Option<Duration>,
}

/// A fake Lemon Squeezy API on 127.0.0.1. `base` is what `LemonSqueezyApi::new` takes.
pub struct FakeLemonSqueezy {
    pub base: String,
    state: Arc<Mutex<LemonSqueezyState>>,
    task: JoinHandle<()>,
}

impl Drop for FakeLemonSqueezy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeLemonSqueezy {
    pub async fn start() -> FakeLemonSqueezy {
        let state = Arc::new(Mutex::new(LemonSqueezyState::default()));
        let router = Router::new()
            .route("/v1/checkouts", post(ls_create_checkout))
            .fallback(|| async { ls_error(StatusCode::NOT_FOUND, "Not Found", "Not found.") })
            .with_state(state.clone());
        let (base, task) = serve(router).await;
        FakeLemonSqueezy { base, state, task }
    }

    /// The next create answers `status` with a JSON:API error body (and creates nothing).
    pub fn fail_next(&self, status: u16) {
        lock(&self.state).fail_next = Some(status);
    }

    /// The next create is answered only after `delay` (the checkout is created at once).
    pub fn delay_next(&self, delay: Duration) {
        lock(&self.state).delay_next = Some(delay);
    }

    pub fn checkouts(&self) -> Vec<LemonSqueezyCheckout> {
        lock(&self.state).checkouts.clone()
    }

    /// Every `POST /v1/checkouts` received, failures included.
    pub fn create_calls(&self) -> usize {
        lock(&self.state).create_calls
    }
}

fn ls_error(status: StatusCode, title: &str, detail: &str) -> Response {
    let body = json!({
        "jsonapi": { "version": "1.0" },
        "errors": [{ "detail": detail, "status": status.as_u16().to_string(), "title": title }]
    });
    (
        status,
        [("content-type", "application/vnd.api+json")],
        body.to_string(),
    )
        .into_response()
}

async fn ls_create_checkout(
    State(state): State<Arc<Mutex<LemonSqueezyState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (response, delay) = {
        let mut state = lock(&state);
        let delay = state.delay_next.take();
        (ls_checkout(&mut state, &headers, &body), delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response
}

fn ls_checkout(state: &mut LemonSqueezyState, headers: &HeaderMap, body: &Bytes) -> Response {
    state.create_calls += 1;

    let authorized = header(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned))
        .is_some_and(|key| key.starts_with("ls_test_") && key.len() > "ls_test_".len());
    if !authorized {
        return ls_error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthenticated.");
    }
    if let Some(status) = state.fail_next.take() {
        let status = StatusCode::from_u16(status).expect("fail_next: a valid HTTP status");
        return ls_error(
            status,
            status.canonical_reason().unwrap_or("Error"),
            &format!("Fake Lemon Squeezy failure ({})", status.as_u16()),
        );
    }
    let json_api = "application/vnd.api+json";
    if header(headers, "content-type").as_deref() != Some(json_api) {
        return ls_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type",
            "Content-Type must be application/vnd.api+json.",
        );
    }
    if header(headers, "accept").as_deref() != Some(json_api) {
        return ls_error(
            StatusCode::NOT_ACCEPTABLE,
            "Not Acceptable",
            "Accept must be application/vnd.api+json.",
        );
    }
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return ls_error(StatusCode::BAD_REQUEST, "Bad Request", "Invalid JSON body.");
    };
    if request.pointer("/data/type").and_then(Value::as_str) != Some("checkouts") {
        return ls_error(
            StatusCode::CONFLICT,
            "Conflict",
            "The resource type must be checkouts.",
        );
    }
    let id_at = |pointer: &str| {
        request.pointer(pointer).and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let store_id = id_at("/data/relationships/store/data/id");
    let variant_id = id_at("/data/relationships/variant/data/id");
    if store_id.is_none() || variant_id.is_none() {
        return ls_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Unprocessable Entity",
            "The store and variant relationships are required.",
        );
    }
    let attributes = request
        .pointer("/data/attributes")
        .cloned()
        .unwrap_or(Value::Null);
    let custom_price = attributes.get("custom_price").and_then(Value::as_i64);
    let custom = attributes
        .pointer("/checkout_data/custom")
        .cloned()
        .unwrap_or(Value::Null);
    let redirect_url = attributes
        .pointer("/product_options/redirect_url")
        .and_then(Value::as_str)
        .map(str::to_owned);

    let id = uuid::Uuid::new_v4().to_string();
    let url = format!("https://tollgate-test.lemonsqueezy.test/checkout/custom/{id}");
    let now = rfc3339(now_unix());
    let as_number = |id: &Option<String>| {
        id.as_deref()
            .and_then(|s| s.parse::<i64>().ok())
            .map_or_else(|| json!(id), |n| json!(n))
    };
    let response = json!({
        "jsonapi": { "version": "1.0" },
        "links": { "self": format!("https://api.lemonsqueezy.test/v1/checkouts/{id}") },
        "data": {
            "type": "checkouts",
            "id": id,
            "attributes": {
                "store_id": as_number(&store_id),
                "variant_id": as_number(&variant_id),
                "custom_price": custom_price,
                "product_options": attributes.get("product_options").cloned().unwrap_or(json!({})),
                "checkout_options": attributes.get("checkout_options").cloned().unwrap_or(json!({})),
                "checkout_data": attributes.get("checkout_data").cloned().unwrap_or(json!({})),
                "preview": false,
                "expires_at": null,
                "created_at": now,
                "updated_at": now,
                "test_mode": true,
                "url": url
            },
            "relationships": {
                "store": { "links": {} },
                "variant": { "links": {} }
            },
            "links": { "self": format!("https://api.lemonsqueezy.test/v1/checkouts/{id}") }
        }
    });
    state.checkouts.push(LemonSqueezyCheckout {
        id,
        url,
        store_id,
        variant_id,
        custom_price,
        custom,
        redirect_url,
        body: request,
    });
    (
        StatusCode::CREATED,
        [("content-type", "application/vnd.api+json")],
        response.to_string(),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Webhooks: signatures
// ---------------------------------------------------------------------------------------------

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn stripe_v1(secret: &str, timestamp: i64, body: &str) -> String {
    hex::encode(hmac_sha256(
        secret.as_bytes(),
        &[timestamp.to_string().as_bytes(), b".", body.as_bytes()],
    ))
}

/// `Stripe-Signature`: `t=<ts>,v1=<hex HMAC-SHA256(secret bytes, "{ts}.{body}")>`.
pub fn stripe_signature_header(secret: &str, timestamp: i64, body: &str) -> String {
    stripe_signature_header_multi(&[secret], timestamp, body)
}

/// `Stripe-Signature` during secret rotation: one `v1=` per secret, in the order given.
pub fn stripe_signature_header_multi(secrets: &[&str], timestamp: i64, body: &str) -> String {
    let mut header = format!("t={timestamp}");
    for secret in secrets {
        header.push_str(",v1=");
        header.push_str(&stripe_v1(secret, timestamp, body));
    }
    header
}

/// `X-Signature`: hex HMAC-SHA256 of the raw body, keyed by the signing secret's bytes.
pub fn lemonsqueezy_signature(secret: &str, body: &str) -> String {
    hex::encode(hmac_sha256(secret.as_bytes(), &[body.as_bytes()]))
}

/// Standard Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`), signed
/// over `"{id}.{ts}.{body}"`. The key is the secret string's UTF-8 bytes when
/// `encoding_is_polar`, else the base64 decoding of the part after `whsec_`.
pub fn polar_signature_headers(
    secret: &str,
    encoding_is_polar: bool,
    msg_id: &str,
    timestamp: i64,
    body: &str,
) -> [(String, String); 3] {
    let key = if encoding_is_polar {
        secret.as_bytes().to_vec()
    } else {
        let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
        BASE64
            .decode(encoded)
            .expect("a Standard Webhooks secret is base64 after whsec_")
    };
    let signature = BASE64.encode(hmac_sha256(
        &key,
        &[
            msg_id.as_bytes(),
            b".",
            timestamp.to_string().as_bytes(),
            b".",
            body.as_bytes(),
        ],
    ));
    [
        ("webhook-id".to_owned(), msg_id.to_owned()),
        ("webhook-timestamp".to_owned(), timestamp.to_string()),
        ("webhook-signature".to_owned(), format!("v1,{signature}")),
    ]
}

// ---------------------------------------------------------------------------------------------
// Webhooks: bodies
// ---------------------------------------------------------------------------------------------

/// A stable short hex tag derived from `seed` (for ids the providers would generate).
fn tag(seed: &str, len: usize) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    hex::encode(digest)[..len].to_owned()
}

/// A UUID-shaped id derived from `seed`, the same for the same seed.
fn uuid_like(seed: &str) -> String {
    let h = tag(seed, 32);
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The API version Stripe renders events in for this account: the one the pinned client
/// (async-stripe) is generated from and sends as `Stripe-Version`.
pub fn stripe_api_version() -> String {
    stripe_shared::version::VERSION.as_str().to_owned()
}

/// The JSON body of a Stripe event wrapping `object`. For `*.updated` events use
/// [`stripe_updated_event`], which says what changed.
pub fn stripe_event(event_id: &str, event_type: &str, object: Value) -> String {
    assert!(
        !event_type.ends_with(".updated"),
        "{event_type}: Stripe sends previous_attributes with it; use stripe_updated_event"
    );
    stripe_envelope(event_id, event_type, object, None)
}

/// The JSON body of a `*.updated` event: `previous` holds the changed fields' old values
/// (`data.previous_attributes`).
pub fn stripe_updated_event(
    event_id: &str,
    event_type: &str,
    object: Value,
    previous: Value,
) -> String {
    stripe_envelope(event_id, event_type, object, Some(previous))
}

fn stripe_envelope(
    event_id: &str,
    event_type: &str,
    object: Value,
    previous: Option<Value>,
) -> String {
    let mut data = json!({ "object": object });
    if let Some(previous) = previous {
        data["previous_attributes"] = previous;
    }
    // Events caused by an API call (a refund issued from the Dashboard or the API) name the
    // request; those caused by a buyer, a bank or Stripe itself do not.
    let request = match event_type {
        "charge.refunded" | "refund.created" => json!({
            "id": format!("req_{}", tag(event_id, 14)),
            "idempotency_key": uuid_like(&format!("idempotency:{event_id}")),
        }),
        _ => json!({ "id": null, "idempotency_key": null }),
    };
    json!({
        "id": event_id,
        "object": "event",
        "api_version": stripe_api_version(),
        "created": now_unix(),
        "data": data,
        "livemode": false,
        "pending_webhooks": 1,
        "request": request,
        "type": event_type
    })
    .to_string()
}

fn stripe_address(postal_code: &str) -> Value {
    json!({
        "city": null,
        "country": "US",
        "line1": null,
        "line2": null,
        "postal_code": postal_code,
        "state": null
    })
}

/// Every field of a `checkout.session` (Stripe's API reference; null where absent) for a
/// one-line payment of `amount`, as a session is first created. Callers set what differs.
fn session_shape(id: &str, created: i64, amount: i64, currency: &str, metadata: Value) -> Value {
    let mut session = json!({
        "id": id,
        "object": "checkout.session",
        "adaptive_pricing": { "enabled": false },
        "after_expiration": null,
        "allow_promotion_codes": null,
        "allowed_payment_method_types": null,
        "amount_subtotal": amount,
        "amount_total": amount,
        "automatic_tax": { "enabled": false, "liability": null, "provider": null, "status": null },
        "billing_address_collection": null,
        "branding_settings": null,
        "cancel_url": null,
        "client_reference_id": null,
        "client_secret": null,
        "collected_information": null,
        "consent": null,
        "consent_collection": null,
        "created": created,
        "currency": currency.to_ascii_lowercase(),
        "currency_conversion": null,
        "custom_fields": [],
        "custom_text": {
            "after_submit": null,
            "shipping_address": null,
            "submit": null,
            "terms_of_service_acceptance": null
        },
        "customer": null,
        "customer_account": null,
        "customer_creation": "if_required",
        "customer_details": null,
        "customer_email": null,
        "discounts": [],
        "excluded_payment_method_types": null,
    });
    extend(
        &mut session,
        json!({
            "expires_at": created + 24 * 3600,
            "integration_identifier": null,
            "invoice": null,
            "invoice_creation": {
                "enabled": false,
                "invoice_data": {
                    "account_tax_ids": null,
                    "custom_fields": null,
                    "description": null,
                    "footer": null,
                    "issuer": null,
                    "metadata": {},
                    "rendering_options": null
                }
            },
            "line_items": null,
            "livemode": false,
            "locale": null,
            "managed_payments": null,
            "metadata": metadata,
            "mode": "payment",
            "name_collection": null,
            "optional_items": null,
            "origin_context": null,
            "payment_intent": null,
            "payment_link": null,
            "payment_method_collection": "if_required",
            "payment_method_configuration_details": null,
            "payment_method_options": { "card": { "request_three_d_secure": "automatic" } },
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
        }),
    );
    extend(
        &mut session,
        json!({
            "permissions": null,
            "phone_number_collection": { "enabled": false },
            "presentment_details": null,
            "recovered_from": null,
            "redirect_on_completion": null,
            "return_url": null,
            "saved_payment_method_options": null,
            "setup_intent": null,
            "shipping_address_collection": null,
            "shipping_cost": null,
            "shipping_options": [],
            "status": "open",
            "submit_type": null,
            "subscription": null,
            "success_url": null,
            "tax_id_collection": { "enabled": false, "required": "never" },
            // `breakdown` only when expanded.
            "total_details": {
                "amount_discount": 0,
                "amount_shipping": 0,
                "amount_tax": 0,
                "breakdown": null
            },
            "ui_mode": "hosted_page",
            "url": null,
            "wallet_options": null
        }),
    );
    session
}

/// A `checkout.session` as Stripe sends it in `checkout.session.*` events: `status` is
/// `complete` (set `obj["status"]` yourself for an expired one); `payment_intent` empty → null.
/// A session Stripe completed without payment (`no_payment_required`, a 100 % promotion
/// code) has `amount_total` 0 and no PaymentIntent: pass 0 and `""`.
#[allow(clippy::too_many_arguments)]
pub fn checkout_session_object(
    session_id: &str,
    order_id: &str,
    account_id: &str,
    package_id: &str,
    amount_total: i64,
    currency: &str,
    payment_status: &str,
    payment_intent: &str,
) -> Value {
    let created = now_unix() - 60;
    let metadata = json!({
        "account_id": account_id,
        "order_id": order_id,
        "package_id": package_id
    });
    let mut object = session_shape(session_id, created, amount_total, currency, metadata);
    extend(
        &mut object,
        json!({
            "cancel_url": "https://tollgate.test/billing/cancel",
            "client_reference_id": format!("{order_id}:{account_id}"),
            "collected_information": { "business_name": null, "individual_name": null, "shipping_details": null },
            "customer_details": {
                "address": stripe_address("94107"),
                "business_name": null,
                "email": "buyer@example.test",
                "individual_name": null,
                "name": "Test Buyer",
                "phone": null,
                "tax_exempt": "none",
                "tax_ids": []
            },
            "payment_intent": if payment_intent.is_empty() { Value::Null } else { json!(payment_intent) },
            "payment_status": payment_status,
            "status": "complete",
            "success_url": "https://tollgate.test/billing/success",
        }),
    );
    object
}

/// A `charge` (for `charge.refunded` and the like). `refunded` is true once fully refunded.
pub fn charge_object(
    charge_id: &str,
    payment_intent: &str,
    amount: i64,
    amount_refunded: i64,
    currency: &str,
    metadata: Value,
) -> Value {
    let mut charge = json!({
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": amount_refunded,
        "application": null,
        "application_fee": null,
        "application_fee_amount": null,
        "authorization_code": null,
        "balance_transaction": format!("txn_{}", tag(charge_id, 24)),
        "billing_details": {
            "address": stripe_address("94107"),
            "email": "buyer@example.test",
            "name": "Test Buyer",
            "phone": null,
            "tax_id": null
        },
        "calculated_statement_descriptor": "TOLLGATE CREDITS",
        "captured": true,
        "created": now_unix() - 60,
        "currency": currency.to_ascii_lowercase(),
        "customer": null,
        "description": null,
        "disputed": false,
        "failure_balance_transaction": null,
        "failure_code": null,
        "failure_message": null,
        "fraud_details": { "stripe_report": null, "user_report": null },
    });
    extend(
        &mut charge,
        json!({
            "level3": null,
            "livemode": false,
            "metadata": metadata,
            "on_behalf_of": null,
            "outcome": {
                "advice_code": null,
                "network_advice_code": null,
                "network_decline_code": null,
                "network_status": "approved_by_network",
                "reason": null,
                "risk_level": "normal",
                "risk_score": 32,
                "rule": null,
                "seller_message": "Payment complete.",
                "type": "authorized"
            },
            "paid": true,
            "payment_intent": payment_intent,
            "payment_method": format!("pm_{}", tag(charge_id, 24)),
            "payment_method_details": {
                "card": { "brand": "visa", "country": "US", "exp_month": 12, "exp_year": 2034, "last4": "4242" },
                "type": "card"
            },
            "presentment_details": null,
            "radar_options": null,
            "receipt_email": null,
            "receipt_number": null,
            "receipt_url": format!("https://pay.stripe.test/receipts/{charge_id}"),
            "refunded": amount > 0 && amount_refunded >= amount,
            // Not included by default since API version 2022-11-15.
            "refunds": null,
            "review": null,
            "shipping": null,
            "source": null,
            "source_transfer": null,
            "statement_descriptor": null,
            "statement_descriptor_suffix": null,
            "status": "succeeded",
            "transfer": null,
            "transfer_data": null,
            "transfer_group": null
        }),
    );
    charge
}

/// A `refund` (for `refund.*` and `charge.refund.updated`). `status` is `pending`,
/// `requires_action`, `succeeded`, `failed` or `canceled`; `failure_reason` goes with
/// `failed` (e.g. `expired_or_canceled_card`).
pub fn refund_object(
    refund_id: &str,
    charge_id: &str,
    payment_intent: &str,
    amount: i64,
    currency: &str,
    status: &str,
    failure_reason: Option<&str>,
) -> Value {
    let failed = status == "failed";
    json!({
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": format!("txn_{}", tag(refund_id, 24)),
        "charge": charge_id,
        "created": now_unix() - 30,
        "currency": currency.to_ascii_lowercase(),
        "customer": null,
        "customer_account": null,
        "description": null,
        "destination_details": {
            "card": {
                "reference": null,
                "reference_status": "pending",
                "reference_type": "acquirer_reference_number",
                "type": "refund"
            },
            "type": "card"
        },
        "failure_balance_transaction": if failed { json!(format!("txn_{}", tag(&format!("failure:{refund_id}"), 24))) } else { Value::Null },
        "failure_reason": failure_reason,
        "instructions_email": null,
        "metadata": {},
        "next_action": null,
        "payment_intent": payment_intent,
        "payment_method": format!("pm_{}", tag(charge_id, 24)),
        "pending_reason": null,
        "presentment_details": null,
        "reason": "requested_by_customer",
        "receipt_number": null,
        "source_transfer_reversal": null,
        "status": status,
        "transfer_reversal": null
    })
}

/// A `balance_transaction` of a dispute: funds withdrawn (negative) or reinstated.
fn dispute_balance_transaction(dispute_id: &str, amount: i64, fee: i64, currency: &str) -> Value {
    let id = format!("txn_{}", tag(&format!("{dispute_id}:{amount}"), 24));
    let created = now_unix() - 30;
    let fee_details = if fee == 0 {
        json!([])
    } else {
        json!([{
            "amount": fee,
            "application": null,
            "currency": currency,
            "description": "Dispute fee",
            "type": "stripe_fee"
        }])
    };
    json!({
        "id": id,
        "object": "balance_transaction",
        "amount": amount,
        "available_on": created,
        "balance_type": "payments",
        "created": created,
        "currency": currency,
        "description": if amount < 0 { "Chargeback withdrawal for a payment" } else { "Chargeback reversal for a payment" },
        "exchange_rate": null,
        "fee": fee,
        "fee_details": fee_details,
        "net": amount - fee,
        "reporting_category": if amount < 0 { "dispute" } else { "dispute_reversal" },
        "source": dispute_id,
        "status": "available",
        "type": "adjustment"
    })
}

/// A `dispute` (for `charge.dispute.*`). `status` e.g. `warning_needs_response`,
/// `warning_closed` (an inquiry), `needs_response`, `under_review`, `won`, `lost`. A
/// chargeback (not an inquiry) carries the withdrawal in `balance_transactions`, and a won
/// one the reinstatement too.
pub fn dispute_object(
    dispute_id: &str,
    charge_id: &str,
    payment_intent: &str,
    amount: i64,
    currency: &str,
    status: &str,
) -> Value {
    let created = now_unix() - 60;
    let currency = currency.to_ascii_lowercase();
    let inquiry = status.starts_with("warning_");
    let mut balance_transactions = Vec::new();
    if !inquiry {
        balance_transactions.push(dispute_balance_transaction(
            dispute_id, -amount, 1500, &currency,
        ));
    }
    if status == "won" {
        balance_transactions.push(dispute_balance_transaction(
            dispute_id, amount, -1500, &currency,
        ));
    }
    let evidence = json!({
        "access_activity_log": null,
        "billing_address": null,
        "cancellation_policy": null,
        "cancellation_policy_disclosure": null,
        "cancellation_rebuttal": null,
        "customer_communication": null,
        "customer_email_address": null,
        "customer_name": null,
        "customer_purchase_ip": null,
        "customer_signature": null,
        "duplicate_charge_documentation": null,
        "duplicate_charge_explanation": null,
        "duplicate_charge_id": null,
        "enhanced_evidence": {
            "mastercard_compliance": null,
            "visa_compelling_evidence_3": null,
            "visa_compliance": null
        },
        "product_description": null,
        "receipt": null,
        "refund_policy": null,
        "refund_policy_disclosure": null,
        "refund_refusal_explanation": null,
        "service_date": null,
        "service_documentation": null,
        "shipping_address": null,
        "shipping_carrier": null,
        "shipping_date": null,
        "shipping_documentation": null,
        "shipping_tracking_number": null,
        "uncategorized_file": null,
        "uncategorized_text": null
    });
    json!({
        "id": dispute_id,
        "object": "dispute",
        "amount": amount,
        "balance_transactions": balance_transactions,
        "charge": charge_id,
        "created": created,
        "currency": currency,
        "enhanced_eligibility_types": [],
        "evidence": evidence,
        "evidence_details": {
            "due_by": created + 7 * 24 * 3600,
            "enhanced_eligibility": {
                "mastercard_compliance": null,
                "visa_compelling_evidence_3": null,
                "visa_compliance": null
            },
            "has_evidence": false,
            "past_due": false,
            "submission_count": 0
        },
        "is_charge_refundable": false,
        "livemode": false,
        "metadata": {},
        "network_reason_code": "10.4",
        "payment_intent": payment_intent,
        "payment_method_details": {
            "card": {
                "brand": "visa",
                "case_type": if inquiry { "inquiry" } else { "chargeback" },
                "network": "visa",
                "network_reason_code": "10.4"
            },
            "type": "card"
        },
        "reason": "fraudulent",
        "status": status
    })
}

/// An amount as Lemon Squeezy formats it for people (`$9.99`, `12.50 EUR`).
fn ls_formatted(amount: i64, currency: &str) -> String {
    let (units, cents) = (amount / 100, (amount % 100).abs());
    match currency {
        "USD" => format!("${units}.{cents:02}"),
        other => format!("{units}.{cents:02} {other}"),
    }
}

/// The body of a Lemon Squeezy `orders` webhook (`order_created`, `order_refunded`, …), with
/// every key of the documented examples (`tests/fixtures/webhooks/lemonsqueezy`). `refunded`
/// is true only once `refunded_amount` reaches the total: the API reference shows a partially
/// refunded order as still `paid` and not `refunded` (pass the `status` you mean).
pub fn lemonsqueezy_order_event(
    event_name: &str,
    ls_order_id: &str,
    status: &str,
    total: i64,
    refunded_amount: i64,
    currency: &str,
    custom_data: Value,
) -> String {
    let now = rfc3339(now_unix());
    let created = rfc3339(now_unix() - 60);
    let order_number = ls_order_id
        .parse::<i64>()
        .unwrap_or_else(|_| i64::from_str_radix(&tag(ls_order_id, 6), 16).expect("hex tag parses"));
    let refunded = total > 0 && refunded_amount >= total;
    let status_formatted = match status {
        "paid" => "Paid".to_owned(),
        "pending" => "Pending".to_owned(),
        "failed" => "Failed".to_owned(),
        "refunded" => "Refunded".to_owned(),
        "partial_refund" => "Partial refund".to_owned(),
        other => other.to_owned(),
    };
    let first_order_item = json!({
        "id": order_number + 1000,
        "order_id": order_number,
        "product_id": 55,
        "variant_id": 777,
        "price_id": 888,
        "product_name": "Tollgate credits",
        "variant_name": "Custom amount",
        "price": total,
        "quantity": 1,
        "created_at": created,
        "updated_at": now,
        "deleted_at": null,
        "test_mode": true
    });
    let identifier = uuid_like(&format!("order:{ls_order_id}"));
    let mut attributes = json!({
        "store_id": 4242,
        "customer_id": 777,
        "identifier": identifier,
        "order_number": order_number,
        "user_name": "Test Buyer",
        "user_email": "buyer@example.test",
        "currency": currency,
        "currency_rate": "1.00000000",
        "subtotal": total,
        "setup_fee": 0,
        "discount_total": 0,
        "tax": 0,
        "total": total,
        "refunded_amount": refunded_amount,
    });
    extend(
        &mut attributes,
        json!({
            "subtotal_usd": total,
            "setup_fee_usd": 0,
            "discount_total_usd": 0,
            "tax_usd": 0,
            "total_usd": total,
            "refunded_amount_usd": refunded_amount,
            "tax_name": null,
            "tax_rate": "0.00",
            "tax_inclusive": false,
            "status": status,
            "status_formatted": status_formatted,
            "refunded": refunded,
            "refunded_at": if refunded { json!(now) } else { Value::Null },
        }),
    );
    extend(
        &mut attributes,
        json!({
            "subtotal_formatted": ls_formatted(total, currency),
            "setup_fee_formatted": ls_formatted(0, currency),
            "discount_total_formatted": ls_formatted(0, currency),
            "tax_formatted": ls_formatted(0, currency),
            "total_formatted": ls_formatted(total, currency),
            "refunded_amount_formatted": ls_formatted(refunded_amount, currency),
            "first_order_item": first_order_item,
            "urls": { "receipt": format!("https://app.lemonsqueezy.test/my-orders/{identifier}") },
            "created_at": created,
            "updated_at": now,
            "test_mode": true
        }),
    );
    let relationships: serde_json::Map<String, Value> = [
        "store",
        "customer",
        "order-items",
        "subscriptions",
        "license-keys",
        "discount-redemptions",
    ]
    .into_iter()
    .map(|name| {
        let base = format!("https://api.lemonsqueezy.test/v1/orders/{ls_order_id}");
        let links = json!({ "links": {
            "related": format!("{base}/{name}"),
            "self": format!("{base}/relationships/{name}")
        }});
        (name.to_owned(), links)
    })
    .collect();
    json!({
        "meta": {
            "test_mode": true,
            "event_name": event_name,
            "webhook_id": uuid_like(&format!("webhook:{event_name}:{ls_order_id}")),
            "custom_data": custom_data
        },
        "data": {
            "type": "orders",
            "id": ls_order_id,
            "attributes": attributes,
            "relationships": relationships,
            "links": { "self": format!("https://api.lemonsqueezy.test/v1/orders/{ls_order_id}") }
        }
    })
    .to_string()
}

/// The body of a Polar order webhook (`order.paid`, `order.refunded`, …), with every key of
/// Polar's `Order` schema (`tests/fixtures/webhooks/polar`). Amounts are in minor units;
/// `currency` is lower case as Polar sends it. No tax, no discount, so `total_amount` =
/// `subtotal_amount` = `net_amount`.
pub fn polar_order_event(
    event_type: &str,
    polar_order_id: &str,
    status: &str,
    net_amount: i64,
    refunded_amount: i64,
    currency: &str,
    metadata: Value,
) -> String {
    let now = rfc3339(now_unix());
    let created = rfc3339(now_unix() - 60);
    let customer_id = uuid_like(&format!("customer:{polar_order_id}"));
    let product_id = uuid_like("product:tollgate-credits");
    let organization_id = uuid_like("organization:tollgate");
    let address = json!({
        "line1": null,
        "line2": null,
        "postal_code": "94107",
        "city": null,
        "state": null,
        "country": "US"
    });
    let customer = json!({
        "id": customer_id,
        "created_at": created,
        "modified_at": null,
        "metadata": {},
        "external_id": null,
        "email": "buyer@example.test",
        "email_verified": false,
        "type": "individual",
        "name": "Test Buyer",
        "billing_name": "Test Buyer",
        "billing_address": address,
        "tax_id": null,
        "locale": null,
        "organization_id": organization_id,
        "default_payment_method_id": null,
        "deleted_at": null,
        "avatar_url": null
    });
    let product = json!({
        "metadata": {},
        "id": product_id,
        "created_at": created,
        "modified_at": null,
        "trial_interval": null,
        "trial_interval_count": null,
        "name": "Tollgate credits",
        "description": null,
        "visibility": "public",
        "recurring_interval": null,
        "recurring_interval_count": null,
        "meter_interval": null,
        "meter_interval_count": null,
        "is_recurring": false,
        "is_archived": false,
        "organization_id": organization_id
    });
    let items = json!([{
        "created_at": created,
        "modified_at": null,
        "id": uuid_like(&format!("item:{polar_order_id}")),
        "label": "Tollgate credits",
        "amount": net_amount,
        "tax_amount": 0,
        "proration": false,
        "product_price_id": uuid_like("price:tollgate-credits")
    }]);
    let mut data = json!({
        "id": polar_order_id,
        "created_at": created,
        "modified_at": now,
        "status": status,
        "paid": matches!(status, "paid" | "refunded" | "partially_refunded"),
        "subtotal_amount": net_amount,
        "discount_amount": 0,
        "net_amount": net_amount,
        "tax_amount": 0,
        "total_amount": net_amount,
        "applied_balance_amount": 0,
        "due_amount": 0,
        "refunded_amount": refunded_amount,
        "refunded_tax_amount": 0,
        "currency": currency,
        "billing_reason": "purchase",
    });
    extend(
        &mut data,
        json!({
            "billing_name": "Test Buyer",
            "billing_address": address,
            "invoice_number": format!("TOLL-{}", tag(polar_order_id, 6).to_ascii_uppercase()),
            "is_invoice_generated": false,
            "receipt_number": null,
            "seats": null,
            "customer_id": customer_id,
            "product_id": product_id,
            "discount_id": null,
            "subscription_id": null,
            "checkout_id": uuid_like(&format!("checkout:{polar_order_id}")),
            "next_payment_attempt_at": null,
            "metadata": metadata,
            "custom_field_data": {},
            "platform_fee_amount": 0,
            "platform_fee_currency": null,
        }),
    );
    extend(
        &mut data,
        json!({
            "customer": customer,
            "product": product,
            "discount": null,
            "subscription": null,
            "items": items,
            "description": "Tollgate credits",
            "refundable_amount": (net_amount - refunded_amount).max(0),
            "refundable_tax_amount": 0
        }),
    );
    json!({ "type": event_type, "timestamp": now, "data": data }).to_string()
}
