//! Selling credits through Lemon Squeezy and Polar: a checkout against a fake Lemon Squeezy
//! API on loopback, signed webhooks of both providers (replays, cumulative refunds, orders
//! Tollgate did not start, wrong amounts), both Polar secret encodings, and what an
//! unconfigured provider answers. After each story that moved credits the ledger verifies.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::fakes::*;
use crate::helpers::*;
use crate::payments::dec;

const LS_SIGNING_SECRET: &str = "ls_signing_secret_tollgate_test";
const LS_API_KEY: &str = "ls_test_tollgate_key";
const LS_STORE_ID: &str = "4242";
const LS_STARTER_VARIANT: &str = "111";
pub const POLAR_SECRET: &str = "polar_whs_tollgate_test_secret";

/// The packages sold, and where buyers return; `providers` adds the `[payments.*]` tables.
fn providers_config(providers: &str) -> String {
    format!(
        r#"
[[packages]]
id = "starter"
name = "Starter"
credits = "1000"
price = "9.99"
currency = "USD"

[[packages]]
id = "pro"
name = "Pro"
credits = "2000"
price = "20.00"
currency = "USD"

[payments]
success_url = "https://app.test/paid?order={{ORDER_ID}}"
cancel_url = "https://app.test/cancelled"
{providers}
"#
    )
}

fn lemonsqueezy_table(api_base: &str) -> String {
    format!(
        r#"
[payments.lemonsqueezy]
api_key = "{LS_API_KEY}"
store_id = "{LS_STORE_ID}"
signing_secret = "{LS_SIGNING_SECRET}"
api_base = "{api_base}"
variants = {{ starter = "{LS_STARTER_VARIANT}" }}
"#
    )
}

pub fn polar_table(secret: &str, encoding: &str) -> String {
    format!(
        r#"
[payments.polar]
webhook_secret = "{secret}"
secret_encoding = "{encoding}"
"#
    )
}

pub async fn app_with(providers: &str) -> TestApp {
    spawn_app_with(Options {
        extra: providers_config(providers),
        ..Options::default()
    })
    .await
}

/// A gateway selling through the fake Lemon Squeezy.
pub async fn lemon_shop() -> (TestApp, FakeLemonSqueezy) {
    let lemon = FakeLemonSqueezy::start().await;
    let app = app_with(&lemonsqueezy_table(&lemon.base)).await;
    (app, lemon)
}

pub async fn balance_of(app: &TestApp, user: &str) -> Decimal {
    credits(&app.balance(&token(user)).await["balance"])
}

pub async fn order_of(app: &TestApp, user: &str, order_id: &str) -> Value {
    let response = app
        .get(&format!("/api/payment/orders/{order_id}"), &token(user))
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("order json")
}

/// Starts a checkout; returns the response body.
pub async fn checkout(app: &TestApp, user: &str, body: Value) -> Value {
    let response = app
        .post("/api/payment/create-checkout", &token(user), &body)
        .await;
    assert_eq!(response.status(), 201);
    response.json().await.expect("checkout json")
}

async fn post_lemonsqueezy(
    app: &TestApp,
    body: &str,
    signature: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/api/payment/webhook/lemonsqueezy"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(signature) = signature {
        request = request.header("x-signature", signature);
    }
    request.send().await.expect("webhook reaches the gateway")
}

/// Sends a correctly signed Lemon Squeezy webhook; returns the status and body.
pub async fn lemonsqueezy_event(app: &TestApp, body: &str) -> (u16, Value) {
    let signature = lemonsqueezy_signature(LS_SIGNING_SECRET, body);
    let response = post_lemonsqueezy(app, body, Some(&signature)).await;
    status_and_json(response).await
}

/// A webhook answer's status and JSON body; an answer that is not JSON fails the test.
async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("webhook answer");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a {status} answer that is not JSON ({e}): {text}"));
    (status, body)
}

pub fn ls_paid(ls_order_id: &str, total: i64, custom_data: Value) -> String {
    lemonsqueezy_order_event(
        "order_created",
        ls_order_id,
        "paid",
        total,
        0,
        "USD",
        custom_data,
    )
}

async fn post_polar(app: &TestApp, body: &str, headers: &[(String, String)]) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/api/payment/webhook/polar"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    request.send().await.expect("webhook reaches the gateway")
}

/// Sends a Polar webhook signed with `secret` (as Polar encodes it, or as Standard Webhooks
/// does) at `timestamp`; returns the status and body.
pub async fn polar_event(
    app: &TestApp,
    secret: &str,
    encoding_is_polar: bool,
    msg_id: &str,
    timestamp: i64,
    body: &str,
) -> (u16, Value) {
    let headers = polar_signature_headers(secret, encoding_is_polar, msg_id, timestamp, body);
    let response = post_polar(app, body, &headers).await;
    status_and_json(response).await
}

async fn events(app: &TestApp, query: &str) -> Vec<Value> {
    app.list(&format!("/admin/payments/events{query}"), ADMIN_TOKEN)
        .await
}

fn event_ids(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().expect("event_id"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Lemon Squeezy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_lemonsqueezy_checkout_paid_by_its_signed_webhook_credits_once() {
    run_test(async || {
        let (app, lemon) = lemon_shop().await;
        let user = "ls-buyer-1";
        let started = checkout(
            &app,
            user,
            json!({"package_id": "starter", "provider": "lemonsqueezy"}),
        )
        .await;
        let order_id = started["order_id"].as_str().expect("order id").to_owned();
        assert_eq!(started["provider"], "lemonsqueezy");
        assert_eq!(started["order"]["id"], order_id);
        assert_eq!(started["order"]["status"], "pending");
        assert_eq!(started["order"]["provider"], "lemonsqueezy");
        assert_eq!(started["order"]["amount"], "9.99");

        // The fake received one custom-priced checkout for the configured variant and store,
        // carrying who buys what; its URL is the one returned.
        let checkouts = lemon.checkouts();
        assert_eq!(checkouts.len(), 1, "{checkouts:?}");
        let created = &checkouts[0];
        assert_eq!(started["checkout_url"], created.url.as_str());
        assert_eq!(started["order"]["checkout_url"], created.url.as_str());
        assert_eq!(created.variant_id.as_deref(), Some(LS_STARTER_VARIANT));
        assert_eq!(created.store_id.as_deref(), Some(LS_STORE_ID));
        assert_eq!(created.custom_price, Some(999));
        assert_eq!(created.custom["account_id"], user);
        assert_eq!(created.custom["order_id"], order_id.as_str());
        assert_eq!(created.custom["package_id"], "starter");
        assert_eq!(
            created.redirect_url.as_deref(),
            Some(format!("https://app.test/paid?order={order_id}").as_str())
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);

        // Lemon Squeezy reports the order paid, echoing the checkout's custom data.
        let body = ls_paid("5001", 999, created.custom.clone());
        let (status, outcome) = lemonsqueezy_event(&app, &body).await;
        assert_eq!(
            (status, outcome["outcome"].as_str()),
            (200, Some("processed")),
            "{outcome}"
        );
        assert_eq!(outcome["received"], true);
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        let paid = order_of(&app, user, &order_id).await;
        assert_eq!(paid["status"], "paid");
        assert_eq!(paid["amount_paid"], "9.99");
        assert!(paid["paid_at"].is_string(), "{paid}");
        assert!(paid["invoice_id"].is_string(), "{paid}");
        assert!(
            paid["checkout_url"].is_null(),
            "a paid order offers no checkout"
        );
        let orders = app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0]["id"], order_id.as_str());

        // The very same delivery again: acknowledged as a duplicate, nothing changes.
        let (status, replay) = lemonsqueezy_event(&app, &body).await;
        assert_eq!(
            (status, replay["outcome"].as_str()),
            (200, Some("duplicate")),
            "{replay}"
        );
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        let entries = app.list("/api/credits/transactions", &token(user)).await;
        let purchases: Vec<&Value> = entries.iter().filter(|e| e["type"] == "purchase").collect();
        assert_eq!(purchases.len(), 1, "{entries:?}");
        assert_eq!(purchases[0]["reference"], "lemonsqueezy:5001");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn lemonsqueezy_refunds_are_cumulative_and_claw_back_pro_rata() {
    run_test(async || {
        let (app, lemon) = lemon_shop().await;
        let user = "ls-buyer-2";
        // With Lemon Squeezy the only configured checkout provider, it is the default.
        let started = checkout(&app, user, json!({"package_id": "starter"})).await;
        assert_eq!(started["provider"], "lemonsqueezy");
        let order_id = started["order_id"].as_str().expect("order id").to_owned();
        let custom = lemon.checkouts()[0].custom.clone();
        let (status, _) = lemonsqueezy_event(&app, &ls_paid("5002", 999, custom.clone())).await;
        assert_eq!(status, 200);
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        let refund = |refunded: i64, status: &str| {
            lemonsqueezy_order_event(
                "order_refunded",
                "5002",
                status,
                999,
                refunded,
                "USD",
                custom.clone(),
            )
        };

        // 3.33 of 9.99 refunded: a third of the credits go.
        let partial = refund(333, "partial_refund");
        let (status, body) = lemonsqueezy_event(&app, &partial).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("666.666667"));
        let order = order_of(&app, user, &order_id).await;
        assert_eq!(order["status"], "partially_refunded");
        assert_eq!(order["amount_refunded"], "3.33");

        // The same cumulative total delivered again is the same event.
        let (status, body) = lemonsqueezy_event(&app, &partial).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("duplicate")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("666.666667"));

        // Then refunded in full (cumulative 9.99): exactly the rest goes.
        let (status, body) = lemonsqueezy_event(&app, &refund(999, "refunded")).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        let order = order_of(&app, user, &order_id).await;
        assert_eq!(order["status"], "refunded");
        assert_eq!(order["amount_refunded"], "9.99");
        assert!(order["refunded_at"].is_string(), "{order}");

        let entries = app.list("/api/credits/transactions", &token(user)).await;
        assert_eq!(entries.iter().filter(|e| e["type"] == "refund").count(), 2);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn forged_unsigned_or_tampered_lemonsqueezy_webhooks_change_nothing() {
    run_test(async || {
        let (app, lemon) = lemon_shop().await;
        let user = "ls-buyer-3";
        let started = checkout(
            &app,
            user,
            json!({"package_id": "starter", "provider": "lemonsqueezy"}),
        )
        .await;
        let order_id = started["order_id"].as_str().expect("order id").to_owned();
        let body = ls_paid("5003", 999, lemon.checkouts()[0].custom.clone());

        let forged = lemonsqueezy_signature("attacker_secret", &body);
        let response = post_lemonsqueezy(&app, &body, Some(&forged)).await;
        openai_error(response, 401).await;
        let response = post_lemonsqueezy(&app, &body, None).await;
        openai_error(response, 400).await;
        let response = post_lemonsqueezy(&app, &body, Some("not-hex")).await;
        openai_error(response, 400).await;
        // Signed, then altered: a cheaper total.
        let signature = lemonsqueezy_signature(LS_SIGNING_SECRET, &body);
        let tampered = body.replace("\"total\":999", "\"total\":1");
        assert_ne!(tampered, body);
        let response = post_lemonsqueezy(&app, &tampered, Some(&signature)).await;
        openai_error(response, 401).await;
        // Signed, but not an order event.
        let junk = "{\"hello\": 1}";
        let response = post_lemonsqueezy(
            &app,
            junk,
            Some(&lemonsqueezy_signature(LS_SIGNING_SECRET, junk)),
        )
        .await;
        openai_error(response, 400).await;

        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        assert_eq!(order_of(&app, user, &order_id).await["status"], "pending");
        let counts = app.row_counts().await;
        assert_eq!(counts[1], 0, "no ledger entry: {counts:?}");
        assert!(events(&app, "").await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn lemonsqueezy_wrong_amounts_and_unknown_packages_are_kept_for_review_and_walk_ins_are_credited()
 {
    run_test(async || {
        let (app, lemon) = lemon_shop().await;
        let user = "ls-buyer-4";

        // Paid 1.00 for a 9.99 order: held for review, nothing credited.
        let started = checkout(
            &app,
            user,
            json!({"package_id": "starter", "provider": "lemonsqueezy"}),
        )
        .await;
        let cheap_order = started["order_id"].as_str().expect("order id").to_owned();
        let custom = lemon.checkouts()[0].custom.clone();
        let (status, body) = lemonsqueezy_event(&app, &ls_paid("6001", 100, custom)).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("review")),
            "{body}"
        );
        let order = order_of(&app, user, &cheap_order).await;
        assert_eq!(order["status"], "review");
        assert!(
            order["review_reason"]
                .as_str()
                .is_some_and(|r| r.contains("1.00")),
            "{order}"
        );
        assert!(order["invoice_id"].is_null(), "{order}");
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);

        // Tax Lemon Squeezy added on top is not part of the price: 11.89 total, 1.90 tax.
        let started = checkout(
            &app,
            user,
            json!({"package_id": "starter", "provider": "lemonsqueezy"}),
        )
        .await;
        let taxed_order = started["order_id"].as_str().expect("order id").to_owned();
        let custom = lemon.checkouts()[1].custom.clone();
        let mut taxed: Value = serde_json::from_str(&ls_paid("6002", 1189, custom)).expect("json");
        taxed["data"]["attributes"]["tax"] = json!(190);
        let (status, body) = lemonsqueezy_event(&app, &taxed.to_string()).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(order_of(&app, user, &taxed_order).await["status"], "paid");
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        // A paid order Tollgate never started (a shared checkout link), naming a known account
        // and package: the order is created on arrival and credited.
        let walk_in = "ls-walk-in";
        let (status, body) = lemonsqueezy_event(
            &app,
            &ls_paid(
                "6003",
                999,
                json!({"account_id": walk_in, "package_id": "starter"}),
            ),
        )
        .await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, walk_in).await, dec("1000"));
        let orders = app.list("/api/payment/orders", &token(walk_in)).await;
        assert_eq!(orders.len(), 1, "{orders:?}");
        assert_eq!(orders[0]["status"], "paid");
        assert_eq!(orders[0]["provider"], "lemonsqueezy");
        assert_eq!(orders[0]["package_id"], "starter");
        assert_eq!(orders[0]["amount_paid"], "9.99");
        assert!(orders[0]["invoice_id"].is_string(), "{orders:?}");

        // One naming a package that does not exist: kept for review, nothing credited.
        let (status, body) = lemonsqueezy_event(
            &app,
            &ls_paid(
                "6004",
                5000,
                json!({"account_id": user, "package_id": "platinum"}),
            ),
        )
        .await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("review")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("1000"));
        assert_eq!(
            app.list("/api/payment/orders", &token(user)).await.len(),
            2,
            "no order for an unknown package"
        );

        let review = events(&app, "?outcome=review").await;
        assert_eq!(
            event_ids(&review),
            ["order_created:6004", "order_created:6001"]
        );
        assert!(
            review[0]["payload"]
                .as_str()
                .is_some_and(|p| p.contains("platinum")),
            "{review:?}"
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_lemonsqueezy_refund_before_its_order_is_retried_until_the_payment_arrives() {
    run_test(async || {
        let (app, _lemon) = lemon_shop().await;
        let user = "ls-early-refund";
        // A shared checkout link: the order is created when `order_created` arrives.
        let custom = json!({"account_id": user, "package_id": "starter"});
        let refund = lemonsqueezy_order_event(
            "order_refunded",
            "8001",
            "refunded",
            999,
            999,
            "USD",
            custom.clone(),
        );

        // Delivered before the payment: 409, and nothing is recorded or changed.
        let (status, body) = lemonsqueezy_event(&app, &refund).await;
        assert_eq!(status, 409, "the provider must deliver it again: {body}");
        assert_eq!(body["error"]["code"], "conflict", "{body}");
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        assert!(
            app.list("/api/payment/orders", &token(user))
                .await
                .is_empty()
        );
        assert!(events(&app, "").await.is_empty(), "nothing recorded");
        assert_eq!(app.row_counts().await[1], 0, "no ledger entry");

        // The payment arrives and is credited.
        let (status, body) = lemonsqueezy_event(&app, &ls_paid("8001", 999, custom)).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        // The refund delivered again now claws the credits back; once more is a duplicate.
        let (status, body) = lemonsqueezy_event(&app, &refund).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        let orders = app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1, "{orders:?}");
        assert_eq!(orders[0]["status"], "refunded");
        let (status, body) = lemonsqueezy_event(&app, &refund).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("duplicate")),
            "{body}"
        );

        // A refund of an order that names no Tollgate account or package is not Tollgate's: it is
        // acknowledged and ignored, not retried.
        let foreign = lemonsqueezy_order_event(
            "order_refunded",
            "8002",
            "refunded",
            999,
            999,
            "USD",
            json!({}),
        );
        let (status, body) = lemonsqueezy_event(&app, &foreign).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("ignored")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Polar
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_polar_refund_before_its_order_is_paid_is_retried_until_the_payment_arrives() {
    run_test(async || {
        let app = app_with(&polar_table(POLAR_SECRET, "polar")).await;
        let user = "polar-early-refund";
        let metadata = json!({"account_id": user, "package_id": "starter"});
        let refund = polar_order_event(
            "order.refunded",
            "po_early",
            "refunded",
            999,
            999,
            "usd",
            metadata.clone(),
        );
        let now = now_unix();

        // Delivered before `order.paid`: 409, and nothing is recorded or changed.
        let (status, body) =
            polar_event(&app, POLAR_SECRET, true, "msg_early_r", now, &refund).await;
        assert_eq!(status, 409, "the provider must deliver it again: {body}");
        assert_eq!(body["error"]["code"], "conflict", "{body}");
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        assert!(
            app.list("/api/payment/orders", &token(user))
                .await
                .is_empty()
        );
        assert!(events(&app, "").await.is_empty(), "nothing recorded");
        assert_eq!(app.row_counts().await[1], 0, "no ledger entry");

        // The payment arrives and is credited.
        let paid = polar_paid("po_early", 999, metadata);
        let (status, body) = polar_event(&app, POLAR_SECRET, true, "msg_early_p", now, &paid).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        // Polar's retry of the refund (same webhook-id) now claws back; a replay is a duplicate.
        let (status, body) =
            polar_event(&app, POLAR_SECRET, true, "msg_early_r", now, &refund).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        let orders = app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1, "{orders:?}");
        assert_eq!(orders[0]["status"], "refunded");
        let (status, body) =
            polar_event(&app, POLAR_SECRET, true, "msg_early_r", now, &refund).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("duplicate")),
            "{body}"
        );

        // A refund naming no Tollgate account or package is not Tollgate's: ignored.
        let foreign = polar_order_event(
            "order.refunded",
            "po_foreign",
            "refunded",
            999,
            999,
            "usd",
            json!({}),
        );
        let (status, body) =
            polar_event(&app, POLAR_SECRET, true, "msg_foreign", now, &foreign).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("ignored")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        app.assert_ledger_consistent().await;
    })
    .await;
}

pub fn polar_paid(polar_order_id: &str, net_amount: i64, metadata: Value) -> String {
    polar_order_event(
        "order.paid",
        polar_order_id,
        "paid",
        net_amount,
        0,
        "usd",
        metadata,
    )
}

#[tokio::test]
async fn polar_orders_credit_once_per_order_and_refunds_claw_back_pro_rata() {
    run_test(async || {
        let app = app_with(&polar_table(POLAR_SECRET, "polar")).await;
        let user = "polar-buyer-1";
        let metadata = json!({"account_id": user, "package_id": "pro"});
        let paid = polar_paid("po_1", 2000, metadata.clone());
        let now = now_unix();

        let (status, body) = polar_event(&app, POLAR_SECRET, true, "msg_paid_1", now, &paid).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("2000"));
        let orders = app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1, "{orders:?}");
        let order_id = orders[0]["id"].as_str().expect("order id").to_owned();
        assert_eq!(orders[0]["provider"], "polar");
        assert_eq!(orders[0]["status"], "paid");
        assert_eq!(orders[0]["amount_paid"], "20.00");

        // A redelivery under the same webhook-id is a duplicate.
        let (status, body) = polar_event(&app, POLAR_SECRET, true, "msg_paid_1", now, &paid).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("duplicate")),
            "{body}"
        );
        // The same Polar order under another webhook-id pays the same order: nothing more.
        let (status, body) = polar_event(&app, POLAR_SECRET, true, "msg_paid_2", now, &paid).await;
        assert_eq!(status, 200, "{body}");
        assert_ne!(body["outcome"], "review", "{body}");
        assert_eq!(balance_of(&app, user).await, dec("2000"));
        assert_eq!(app.list("/api/payment/orders", &token(user)).await.len(), 1);

        // Half the payment refunded: half the credits go.
        let refunded = polar_order_event(
            "order.refunded",
            "po_1",
            "partially_refunded",
            2000,
            1000,
            "usd",
            metadata.clone(),
        );
        let (status, body) =
            polar_event(&app, POLAR_SECRET, true, "msg_refund_1", now, &refunded).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("1000"));
        let order = order_of(&app, user, &order_id).await;
        assert_eq!(order["status"], "partially_refunded");
        assert_eq!(order["amount_refunded"], "10.00");

        // The same cumulative total under another webhook-id takes nothing more.
        let (status, _) =
            polar_event(&app, POLAR_SECRET, true, "msg_refund_2", now, &refunded).await;
        assert_eq!(status, 200);
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        let entries = app.list("/api/credits/transactions", &token(user)).await;
        let purchases: Vec<&Value> = entries.iter().filter(|e| e["type"] == "purchase").collect();
        assert_eq!(purchases.len(), 1, "{entries:?}");
        assert_eq!(purchases[0]["reference"], "polar:po_1");
        assert_eq!(entries.iter().filter(|e| e["type"] == "refund").count(), 1);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_polar_deliveries_of_one_order_create_and_credit_it_once() {
    run_test(async || {
        let app = app_with(&polar_table(POLAR_SECRET, "polar")).await;
        let user = "polar-buyer-4";
        let body = polar_paid(
            "po_race",
            999,
            json!({"account_id": user, "package_id": "starter"}),
        );
        let now = now_unix();
        // Half replay one webhook-id, half are distinct deliveries of the same Polar order; all
        // race to create the order on arrival.
        let deliveries = (0..12).map(|i| {
            let (app, body) = (&app, &body);
            async move {
                let id = if i % 2 == 0 {
                    "msg_same".to_owned()
                } else {
                    format!("msg_{i}")
                };
                polar_event(app, POLAR_SECRET, true, &id, now, body).await
            }
        });
        for (status, body) in futures_util::future::join_all(deliveries).await {
            assert_eq!(status, 200, "{body}");
            assert_ne!(body["outcome"], "review", "{body}");
        }
        assert_eq!(balance_of(&app, user).await, dec("1000"));
        let orders = app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1, "{orders:?}");
        assert_eq!(orders[0]["status"], "paid");
        let entries = app.list("/api/credits/transactions", &token(user)).await;
        assert_eq!(
            entries.iter().filter(|e| e["type"] == "purchase").count(),
            1
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn stale_forged_or_unsigned_polar_webhooks_are_refused() {
    run_test(async || {
        let app = app_with(&polar_table(POLAR_SECRET, "polar")).await;
        let user = "polar-buyer-2";
        let body = polar_paid(
            "po_2",
            999,
            json!({"account_id": user, "package_id": "starter"}),
        );
        let now = now_unix();

        // Correctly signed, but ten minutes old (a captured request replayed).
        let (status, _) =
            polar_event(&app, POLAR_SECRET, true, "msg_stale", now - 600, &body).await;
        assert_eq!(status, 401);
        // Signed with a secret Tollgate does not hold.
        let (status, _) =
            polar_event(&app, "polar_whs_attacker", true, "msg_forged", now, &body).await;
        assert_eq!(status, 401);
        // Signed for another webhook-id than the one sent.
        let mut headers = polar_signature_headers(POLAR_SECRET, true, "msg_a", now, &body);
        headers[0].1 = "msg_b".to_owned();
        openai_error(post_polar(&app, &body, &headers).await, 401).await;
        // Signed, then altered.
        let headers = polar_signature_headers(POLAR_SECRET, true, "msg_tampered", now, &body);
        let tampered = body.replace("\"net_amount\":999", "\"net_amount\":1");
        assert_ne!(tampered, body);
        openai_error(post_polar(&app, &tampered, &headers).await, 401).await;
        // No signature headers at all.
        openai_error(post_polar(&app, &body, &[]).await, 400).await;

        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        assert!(
            app.list("/api/payment/orders", &token(user))
                .await
                .is_empty()
        );
        let counts = app.row_counts().await;
        assert_eq!(counts[1], 0, "no ledger entry: {counts:?}");
        assert!(events(&app, "").await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn polar_standard_encoding_keys_on_the_base64_decoded_secret() {
    run_test(async || {
        // Key bytes that are not text, as a Standard Webhooks secret may hold.
        let key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
        let secret = format!("whsec_{}", BASE64.encode(&key));
        let app = app_with(&polar_table(&secret, "standard")).await;
        let user = "polar-buyer-3";
        let metadata = json!({"account_id": user, "package_id": "starter"});
        let now = now_unix();

        let body = polar_paid("po_3", 999, metadata.clone());
        let (status, outcome) = polar_event(&app, &secret, false, "msg_std_1", now, &body).await;
        assert_eq!(
            (status, outcome["outcome"].as_str()),
            (200, Some("processed")),
            "{outcome}"
        );
        assert_eq!(balance_of(&app, user).await, dec("1000"));

        // Signed as if the secret string itself were the key (Polar's encoding): refused.
        let other = polar_paid("po_4", 999, metadata);
        let (status, _) = polar_event(&app, &secret, true, "msg_std_2", now, &other).await;
        assert_eq!(status, 401);
        assert_eq!(balance_of(&app, user).await, dec("1000"));
        assert_eq!(app.list("/api/payment/orders", &token(user)).await.len(), 1);
        app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Unconfigured providers
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unconfigured_providers_have_no_webhook_and_no_checkout() {
    run_test(async || {
        let app = app_with("").await;
        let user = "nobody-sells";

        let ls_body = ls_paid(
            "7001",
            999,
            json!({"account_id": user, "package_id": "starter"}),
        );
        let signature = lemonsqueezy_signature(LS_SIGNING_SECRET, &ls_body);
        let response = post_lemonsqueezy(&app, &ls_body, Some(&signature)).await;
        openai_error(response, 404).await;

        let polar_body = polar_paid(
            "po_7",
            999,
            json!({"account_id": user, "package_id": "starter"}),
        );
        let headers = polar_signature_headers(POLAR_SECRET, true, "msg_7", now_unix(), &polar_body);
        openai_error(post_polar(&app, &polar_body, &headers).await, 404).await;

        let response = app
            .client
            .post(app.url("/api/payment/webhook"))
            .header("content-type", "application/json")
            .header("stripe-signature", "t=1,v1=00")
            .body("{}")
            .send()
            .await
            .expect("webhook reaches the gateway");
        openai_error(response, 404).await;

        for body in [
            json!({"package_id": "starter", "provider": "lemonsqueezy"}),
            json!({"package_id": "starter", "provider": "stripe"}),
            json!({"package_id": "starter", "provider": "polar"}),
            json!({"package_id": "starter"}),
        ] {
            let response = app
                .post("/api/payment/create-checkout", &token(user), &body)
                .await;
            let error = openai_error(response, 400).await;
            assert_eq!(error["param"], "provider", "{body}");
        }
        // A refused checkout leaves no order behind, and no webhook credited anything.
        assert!(
            app.list("/api/payment/orders", &token(user))
                .await
                .is_empty()
        );
        assert_eq!(balance_of(&app, user).await, Decimal::ZERO);
        assert!(events(&app, "").await.is_empty());
    })
    .await;
}

#[tokio::test]
async fn lemonsqueezy_configured_for_webhooks_only_offers_no_checkout() {
    run_test(async || {
        let app = app_with(&format!(
            "\n[payments.lemonsqueezy]\nsigning_secret = \"{LS_SIGNING_SECRET}\"\n"
        ))
        .await;
        let user = "ls-webhooks-only";
        let response = app
            .post(
                "/api/payment/create-checkout",
                &token(user),
                &json!({"package_id": "starter", "provider": "lemonsqueezy"}),
            )
            .await;
        let error = openai_error(response, 400).await;
        assert_eq!(error["param"], "provider");
        assert!(
            app.list("/api/payment/orders", &token(user))
                .await
                .is_empty()
        );

        // Its webhooks still work: a paid order naming the account and package is credited.
        let (status, body) = lemonsqueezy_event(
            &app,
            &ls_paid(
                "7002",
                999,
                json!({"account_id": user, "package_id": "starter"}),
            ),
        )
        .await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(balance_of(&app, user).await, dec("1000"));
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn an_event_cannot_pay_an_order_started_with_another_provider() {
    run_test(async || {
        let lemon = FakeLemonSqueezy::start().await;
        let app = app_with(&format!(
            "{}{}",
            lemonsqueezy_table(&lemon.base),
            polar_table(POLAR_SECRET, "polar")
        ))
        .await;
        let user = "cross-provider";
        let started = checkout(
            &app,
            user,
            json!({"package_id": "starter", "provider": "lemonsqueezy"}),
        )
        .await;
        let ls_order = started["order_id"].as_str().expect("order id").to_owned();

        // A genuine Polar payment whose metadata names the Lemon Squeezy order.
        let body = polar_paid(
            "polar_cross_1",
            999,
            json!({"order_id": ls_order, "account_id": user, "package_id": "starter"}),
        );
        let (status, outcome) =
            polar_event(&app, POLAR_SECRET, true, "msg_cross", now_unix(), &body).await;
        assert_eq!(
            (status, outcome["outcome"].as_str()),
            (200, Some("processed"))
        );

        // The Lemon Squeezy order is untouched; the Polar payment became its own order.
        assert_eq!(order_of(&app, user, &ls_order).await["status"], "pending");
        let orders = app.list("/api/payment/orders", &token(user)).await;
        let providers: Vec<&str> = orders
            .iter()
            .map(|o| o["provider"].as_str().expect("provider"))
            .collect();
        assert_eq!(providers, ["polar", "lemonsqueezy"]);
        assert_eq!(orders[0]["status"], "paid");
        assert_eq!(balance_of(&app, user).await, dec("1000"));
        app.assert_ledger_consistent().await;
    })
    .await;
}
