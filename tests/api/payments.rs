//! Selling credits through Stripe: checkout against a fake Stripe API on loopback, signed
//! webhooks, replays, out-of-order delivery, refunds, disputes, invoices. After each story the
//! ledger verifies (docs/architecture.md I2, I3, I6).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::fakes::*;
use crate::helpers::*;

pub const WHSEC: &str = "whsec_tollgate_test_current";
pub const WHSEC_OLD: &str = "whsec_tollgate_test_previous";

/// The shop's config; `stripe_extra` goes into its `[payments.stripe]` table, `extra` at the
/// end.
pub fn shop_config(stripe_base: &str, stripe_extra: &str, extra: &str) -> String {
    format!(
        r#"
[[packages]]
id = "starter"
name = "Starter"
credits = "1000"
price = "9.99"
currency = "USD"

[[packages]]
id = "yearly"
name = "Yearly"
credits = "15000"
price = "99.99"
currency = "USD"
validity_days = 365

[payments]
success_url = "https://app.test/paid?order={{ORDER_ID}}"
cancel_url = "https://app.test/cancelled"

[payments.stripe]
secret_key = "sk_test_tollgate"
webhook_secrets = ["{WHSEC}", "{WHSEC_OLD}"]
api_base = "{stripe_base}"
{stripe_extra}

[invoices]
tax_rate_percent = "19"
notes = ["Thank you for your purchase."]

[invoices.seller]
name = "Tollgate Test Ltd"
address = ["1 Test Street", "Testville"]
tax_id = "GB123456789"
{extra}
"#
    )
}

pub struct Shop {
    pub app: TestApp,
    pub stripe: FakeStripe,
}

pub async fn shop() -> Shop {
    shop_with("").await
}

pub async fn shop_with(extra: &str) -> Shop {
    shop_with_stripe("", extra).await
}

/// A shop whose `[payments.stripe]` table also has `stripe_extra`.
pub async fn shop_with_stripe(stripe_extra: &str, extra: &str) -> Shop {
    let stripe = FakeStripe::start().await;
    let app = spawn_app_with(Options {
        extra: shop_config(&stripe.base, stripe_extra, extra),
        ..Options::default()
    })
    .await;
    Shop { app, stripe }
}

/// The calendar year (UTC) an invoice was issued in: invoice numbers run per year.
fn issue_year(invoice: &Value) -> i32 {
    let issued_at = invoice["issued_at"].as_str().expect("issued_at");
    issued_at
        .get(..4)
        .and_then(|year| year.parse().ok())
        .unwrap_or_else(|| panic!("issued_at {issued_at}"))
}

/// What the invoice numbers of one year must be, given how many were issued in it (in any
/// order): `INV-YYYY-000001` up to that count, with no gap or repeat. Invoices are grouped
/// by the year each was issued in, so that a run across New Year's midnight proves the same.
fn assert_numbered_per_year(invoices: &[Value]) {
    let mut by_year: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for invoice in invoices {
        let number = invoice["number"].as_str().expect("number").to_owned();
        by_year.entry(issue_year(invoice)).or_default().push(number);
    }
    for (year, mut numbers) in by_year {
        numbers.sort();
        let expected: Vec<String> = (1..=numbers.len())
            .map(|n| format!("INV-{year}-{n:06}"))
            .collect();
        assert_eq!(numbers, expected);
    }
}

pub fn dec(raw: &str) -> Decimal {
    Decimal::from_str(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
}

impl Shop {
    /// Starts a checkout; returns the order id and the session the fake Stripe created.
    pub async fn checkout(&self, user: &str, package: &str) -> (String, StripeSession) {
        let response = self
            .app
            .post(
                "/api/payment/create-checkout",
                &token(user),
                &json!({"package_id": package}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("checkout json");
        let order_id = body["order_id"].as_str().expect("order id").to_owned();
        let url = body["checkout_url"].as_str().expect("checkout url");
        let session = self
            .stripe
            .sessions()
            .into_iter()
            .find(|s| s.url == url)
            .expect("the returned URL is the fake session's");
        (order_id, session)
    }

    /// Posts a raw Stripe webhook with the given signature header.
    pub async fn post_webhook(&self, body: &str, signature: Option<String>) -> reqwest::Response {
        let mut request = self
            .app
            .client
            .post(self.app.url("/api/payment/webhook"))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send().await.expect("webhook reaches the gateway")
    }

    /// Sends a correctly signed event; returns the status and body.
    pub async fn event(&self, event_id: &str, kind: &str, object: Value) -> (u16, Value) {
        let body = stripe_event(event_id, kind, object);
        let response = self
            .post_webhook(
                &body,
                Some(stripe_signature_header(WHSEC, now_unix(), &body)),
            )
            .await;
        let status = response.status().as_u16();
        let text = response.text().await.expect("webhook answer");
        let body = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{event_id}: a {status} answer that is not JSON ({e}): {text}")
        });
        (status, body)
    }

    /// Sends a correctly signed event that must be accepted (200); returns its outcome.
    pub async fn accepted(&self, event_id: &str, kind: &str, object: Value) -> String {
        let (status, body) = self.event(event_id, kind, object).await;
        assert_eq!(status, 200, "{event_id}: {body}");
        body["outcome"]
            .as_str()
            .unwrap_or_else(|| panic!("{event_id}: no outcome in {body}"))
            .to_owned()
    }

    /// The completed, paid session event for an order.
    pub fn paid_session(&self, session: &StripeSession, user: &str, amount: i64) -> Value {
        checkout_session_object(
            &session.id,
            &session.metadata["order_id"],
            user,
            &session.metadata["package_id"],
            amount,
            "usd",
            "paid",
            &format!("pi_{}", session.id),
        )
    }

    pub async fn pay(&self, user: &str, package: &str, amount: i64) -> (String, StripeSession) {
        let (order_id, session) = self.checkout(user, package).await;
        let object = self.paid_session(&session, user, amount);
        let (status, body) = self
            .event(
                &format!("evt_paid_{}", session.id),
                "checkout.session.completed",
                object,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["outcome"], "processed", "{body}");
        (order_id, session)
    }

    pub async fn balance_of(&self, user: &str) -> Decimal {
        credits(&self.app.balance(&token(user)).await["balance"])
    }

    pub async fn order(&self, user: &str, order_id: &str) -> Value {
        let response = self
            .app
            .get(&format!("/api/payment/orders/{order_id}"), &token(user))
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.expect("order json")
    }

    pub async fn charge_refunded(
        &self,
        event_id: &str,
        session: &StripeSession,
        refunded: i64,
    ) -> (u16, Value) {
        let charge = charge_object(
            &format!("ch_{}", session.id),
            &format!("pi_{}", session.id),
            999,
            refunded,
            "usd",
            json!({}),
        );
        self.event(event_id, "charge.refunded", charge).await
    }
}

#[tokio::test]
async fn a_paid_checkout_credits_the_account_for_its_next_request() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-1";
        let (order_id, session) = shop.checkout(user, "starter").await;

        // The session carries the account, order and package, and is idempotent per order.
        assert_eq!(session.amount, 999);
        assert_eq!(session.currency, "usd");
        for metadata in [&session.metadata, &session.payment_intent_metadata] {
            assert_eq!(metadata["account_id"], user);
            assert_eq!(metadata["order_id"], order_id);
            assert_eq!(metadata["package_id"], "starter");
        }
        assert_eq!(
            session.client_reference_id.as_deref(),
            Some(format!("{order_id}:{user}").as_str())
        );
        assert_eq!(
            session.idempotency_key.as_deref(),
            Some(format!("tollgate-checkout-{order_id}").as_str())
        );
        assert_eq!(
            session.success_url.as_deref(),
            Some(format!("https://app.test/paid?order={order_id}").as_str())
        );
        let pending = shop.order(user, &order_id).await;
        assert_eq!(pending["status"], "pending");
        assert_eq!(pending["amount"], "9.99");
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);

        let object = shop.paid_session(&session, user, 999);
        let (status, body) = shop
            .event("evt_1", "checkout.session.completed", object)
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("processed")));

        // Visible to the very next request, and spendable.
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        let response = shop
            .app
            .chat(&token(user), &chat_body("mock-small", "hi"))
            .await;
        assert_eq!(response.status(), 200);
        let after = credits(&shop.app.settled_balance(&token(user)).await["balance"]);
        assert!(after < dec("1000") && after > dec("999"), "{after}");

        let paid = shop.order(user, &order_id).await;
        assert_eq!(paid["status"], "paid");
        assert_eq!(paid["amount_paid"], "9.99");
        assert!(paid["paid_at"].is_string());
        assert!(
            paid["checkout_url"].is_null(),
            "a paid order offers no checkout"
        );
        let orders = shop.app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0]["invoice_id"], paid["invoice_id"]);

        let entries = shop
            .app
            .list("/api/credits/transactions", &token(user))
            .await;
        let purchases: Vec<&Value> = entries.iter().filter(|e| e["type"] == "purchase").collect();
        assert_eq!(purchases.len(), 1);
        assert_eq!(purchases[0]["reference"], format!("stripe:{}", session.id));

        shop.app.assert_ledger_consistent().await;
        let verify = shop
            .app
            .tollgate_cli()
            .args(["ledger", "verify"])
            .output()
            .expect("run tollgate ledger verify");
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
    })
    .await;
}

#[tokio::test]
async fn replays_and_reissued_events_credit_once() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-2";
        let (order_id, session) = shop.checkout(user, "starter").await;
        let object = shop.paid_session(&session, user, 999);

        let first = shop
            .accepted("evt_a", "checkout.session.completed", object.clone())
            .await;
        assert_eq!(first, "processed");
        // The same event again: acknowledged, nothing changes.
        let (status, replay) = shop
            .event("evt_a", "checkout.session.completed", object.clone())
            .await;
        assert_eq!(
            (status, replay["outcome"].as_str()),
            (200, Some("duplicate"))
        );
        // The same payment under another event id: the order is already paid by this session.
        let (status, other) = shop
            .event("evt_b", "checkout.session.async_payment_succeeded", object)
            .await;
        assert_eq!(
            (status, other["outcome"].as_str()),
            (200, Some("processed"))
        );

        assert_eq!(shop.balance_of(user).await, dec("1000"));
        assert_eq!(shop.order(user, &order_id).await["status"], "paid");
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_deliveries_of_one_payment_credit_once() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-3";
        let (_, session) = shop.checkout(user, "starter").await;
        let object = shop.paid_session(&session, user, 999);
        let deliveries = (0..12).map(|i| {
            let object = object.clone();
            let shop = &shop;
            async move {
                // Half replay one event id, half are distinct events about the same payment.
                let id = if i % 2 == 0 {
                    "evt_same".to_owned()
                } else {
                    format!("evt_{i}")
                };
                shop.event(&id, "checkout.session.completed", object).await
            }
        });
        let results = futures_util::future::join_all(deliveries).await;
        for (status, body) in &results {
            assert_eq!(*status, 200, "{body}");
        }
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        let entries = shop
            .app
            .list("/api/credits/transactions", &token(user))
            .await;
        assert_eq!(
            entries.iter().filter(|e| e["type"] == "purchase").count(),
            1
        );
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn partial_then_full_refunds_claw_back_pro_rata_and_only_the_new_part() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-4";
        let (order_id, session) = shop.pay(user, "starter", 999).await;

        // 3.33 of 9.99 refunded: a third of the credits go.
        let (status, body) = shop.charge_refunded("evt_r1", &session, 333).await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("processed")));
        assert_eq!(shop.balance_of(user).await, dec("666.666667"));
        let order = shop.order(user, &order_id).await;
        assert_eq!(order["status"], "partially_refunded");
        assert_eq!(order["amount_refunded"], "3.33");

        // A replay of the same cumulative total under a new event id takes nothing more.
        let (status, _) = shop.charge_refunded("evt_r1_again", &session, 333).await;
        assert_eq!(status, 200);
        assert_eq!(shop.balance_of(user).await, dec("666.666667"));

        // Fully refunded: exactly everything is gone, no rounding left over.
        let (status, _) = shop.charge_refunded("evt_r2", &session, 999).await;
        assert_eq!(status, 200);
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert_eq!(shop.order(user, &order_id).await["status"], "refunded");

        // An older partial total arriving late changes nothing.
        let (status, _) = shop.charge_refunded("evt_r_late", &session, 333).await;
        assert_eq!(status, 200);
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        let refunds = shop
            .app
            .list("/api/credits/transactions", &token(user))
            .await;
        assert_eq!(refunds.iter().filter(|e| e["type"] == "refund").count(), 2);
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_refund_of_spent_credits_leaves_a_debt_that_blocks_usage_until_topped_up() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-5";
        let (_, session) = shop.pay(user, "starter", 999).await;
        // Spend some credits, then the whole payment is refunded.
        let response = shop
            .app
            .post(
                &format!("/admin/accounts/{user}/credits"),
                ADMIN_TOKEN,
                &json!({"amount": "-400", "type": "adjustment", "description": "spent elsewhere"}),
            )
            .await;
        assert_eq!(response.status(), 201);
        assert_eq!(shop.balance_of(user).await, dec("600"));
        let (status, _) = shop.charge_refunded("evt_full", &session, 999).await;
        assert_eq!(status, 200);
        // The balance goes negative by what was spent, no further.
        assert_eq!(shop.balance_of(user).await, dec("-400"));
        let response = shop
            .app
            .chat(&token(user), &chat_body("mock-small", "hi"))
            .await;
        openai_error(response, 402).await;

        // A new purchase pays the debt first.
        shop.pay(user, "starter", 999).await;
        assert_eq!(shop.balance_of(user).await, dec("600"));
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_refund_before_the_payment_is_retried_and_then_applied() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-6";
        let (order_id, session) = shop.checkout(user, "starter").await;
        let charge = charge_object(
            &format!("ch_{}", session.id),
            &format!("pi_{}", session.id),
            999,
            999,
            "usd",
            json!({"order_id": order_id}),
        );
        let (status, _) = shop
            .event("evt_early_refund", "charge.refunded", charge.clone())
            .await;
        assert_eq!(status, 409, "the provider must deliver it again");
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);

        let object = shop.paid_session(&session, user, 999);
        assert_eq!(
            shop.accepted("evt_paid", "checkout.session.completed", object)
                .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        // Stripe's retry of the refund now applies.
        let (status, body) = shop
            .event("evt_early_refund", "charge.refunded", charge)
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("processed")));
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert_eq!(shop.order(user, &order_id).await["status"], "refunded");
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_payment_link_refund_before_its_payment_is_retried_until_the_payment_arrives() {
    run_test(async || {
        let shop = shop().await;
        let user = "link-buyer-1";
        // A Payment Link's session: Tollgate did not start it, so its order is created when the
        // paid event arrives; its charge names only the PaymentIntent.
        let mut session = checkout_session_object(
            "cs_link_1",
            "",
            user,
            "starter",
            999,
            "usd",
            "paid",
            "pi_link_1",
        );
        session["client_reference_id"] = Value::Null;
        session["payment_link"] = json!("plink_1");
        let charge = charge_object("ch_link_1", "pi_link_1", 999, 999, "usd", json!({}));

        // Delivered before the payment: 409, and nothing is recorded or changed.
        let (status, body) = shop
            .event("evt_link_refund", "charge.refunded", charge.clone())
            .await;
        assert_eq!(status, 409, "the provider must deliver it again: {body}");
        assert_eq!(body["error"]["code"], "conflict", "{body}");
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert!(
            shop.app
                .list("/api/payment/orders", &token(user))
                .await
                .is_empty()
        );
        let events = shop.app.list("/admin/payments/events", ADMIN_TOKEN).await;
        assert!(events.is_empty(), "nothing recorded: {events:?}");
        assert_eq!(shop.app.row_counts().await[1], 0, "no ledger entry");

        // The payment arrives and is credited.
        let (status, body) = shop
            .event("evt_link_paid", "checkout.session.completed", session)
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("processed")));
        assert_eq!(shop.balance_of(user).await, dec("1000"));

        // Stripe's retry of the refund now claws the credits back; a replay is a duplicate.
        let (status, body) = shop
            .event("evt_link_refund", "charge.refunded", charge.clone())
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("processed")));
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        let orders = shop.app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1, "{orders:?}");
        assert_eq!(orders[0]["status"], "refunded");
        let (status, body) = shop
            .event("evt_link_refund", "charge.refunded", charge)
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("duplicate")));
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_won_dispute_gives_the_credits_back_and_a_lost_one_keeps_them_taken() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-7";
        let (won_order, won) = shop.pay(user, "starter", 999).await;
        let (lost_order, lost) = shop.pay(user, "starter", 999).await;
        assert_eq!(shop.balance_of(user).await, dec("2000"));

        let dispute = |session: &StripeSession, id: &str, status: &str| {
            dispute_object(
                id,
                &format!("ch_{}", session.id),
                &format!("pi_{}", session.id),
                999,
                "usd",
                status,
            )
        };
        let (status, _) = shop
            .event(
                "evt_d1",
                "charge.dispute.created",
                dispute(&won, "dp_won", "needs_response"),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            shop.accepted(
                "evt_d2",
                "charge.dispute.created",
                dispute(&lost, "dp_lost", "needs_response"),
            )
            .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert_eq!(shop.order(user, &won_order).await["status"], "disputed");

        assert_eq!(
            shop.accepted(
                "evt_d3",
                "charge.dispute.closed",
                dispute(&won, "dp_won", "won"),
            )
            .await,
            "processed"
        );
        assert_eq!(
            shop.accepted(
                "evt_d4",
                "charge.dispute.closed",
                dispute(&lost, "dp_lost", "lost"),
            )
            .await,
            "processed"
        );
        // Replays of the closing events change nothing.
        assert_eq!(
            shop.accepted(
                "evt_d3b",
                "charge.dispute.closed",
                dispute(&won, "dp_won", "won"),
            )
            .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        assert_eq!(shop.order(user, &won_order).await["status"], "paid");
        let lost_view = shop.order(user, &lost_order).await;
        assert_eq!(lost_view["status"], "charged_back");
        assert_eq!(lost_view["dispute_status"], "lost");
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

/// The account's grants as the admin API shows them, oldest first.
async fn grants_of(app: &TestApp, account: &str) -> Vec<Value> {
    let response = app
        .get(&format!("/admin/accounts/{account}"), ADMIN_TOKEN)
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("account json");
    body["grants"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("no grants list: {body}"))
}

/// `(source, amount, remaining)` of each grant, oldest first.
fn remainders(grants: &[Value]) -> Vec<(String, Decimal, Decimal)> {
    grants
        .iter()
        .map(|g| {
            (
                g["source"].as_str().expect("source").to_owned(),
                credits(&g["amount"]),
                credits(&g["remaining"]),
            )
        })
        .collect()
}

fn row(source: &str, amount: &str, remaining: &str) -> (String, Decimal, Decimal) {
    (source.to_owned(), dec(amount), dec(remaining))
}

#[tokio::test]
async fn a_refund_takes_back_its_own_purchase_before_credits_that_expire_sooner() {
    run_test(async || {
        let shop = shop().await;
        let user = "own-grant-1";
        // Starter never expires; Yearly expires in 365 days, so usage would draw it first.
        let (_, starter) = shop.pay(user, "starter", 999).await;
        shop.pay(user, "yearly", 9999).await;
        assert_eq!(shop.balance_of(user).await, dec("16000"));

        // A third of Starter refunded, then all of it: both come out of Starter's own grant.
        let (status, _) = shop.charge_refunded("evt_own_r1", &starter, 333).await;
        assert_eq!(status, 200);
        assert_eq!(
            remainders(&grants_of(&shop.app, user).await),
            [
                row("purchase", "1000", "666.666667"),
                row("purchase", "15000", "15000")
            ]
        );
        let (status, _) = shop.charge_refunded("evt_own_r2", &starter, 999).await;
        assert_eq!(status, 200);
        assert_eq!(shop.balance_of(user).await, dec("15000"));
        assert_eq!(
            remainders(&grants_of(&shop.app, user).await),
            [
                row("purchase", "1000", "0"),
                row("purchase", "15000", "15000")
            ]
        );
        shop.app.assert_ledger_consistent().await;

        // Starter partly spent before Yearly arrived: the refund takes what Starter still holds,
        // then the rest in the usual drawing order (Yearly), and nothing becomes debt.
        let user = "own-grant-2";
        let (_, starter) = shop.pay(user, "starter", 999).await;
        let response = shop
            .app
            .post(
                &format!("/admin/accounts/{user}/credits"),
                ADMIN_TOKEN,
                &json!({"amount": "-400", "type": "adjustment", "description": "spent"}),
            )
            .await;
        assert_eq!(response.status(), 201);
        shop.pay(user, "yearly", 9999).await;
        let (status, _) = shop.charge_refunded("evt_own_r3", &starter, 999).await;
        assert_eq!(status, 200);
        assert_eq!(shop.balance_of(user).await, dec("14600"));
        assert_eq!(
            remainders(&grants_of(&shop.app, user).await),
            [
                row("purchase", "1000", "0"),
                row("purchase", "15000", "14600")
            ]
        );
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_dispute_takes_back_its_own_purchase_and_a_won_one_returns_it_with_its_expiry() {
    run_test(async || {
        let shop = shop().await;
        let user = "own-grant-3";
        let (starter_order, starter) = shop.pay(user, "starter", 999).await;
        let (_, yearly) = shop.pay(user, "yearly", 9999).await;
        let dispute = |session: &StripeSession, id: &str, amount: i64, status: &str| {
            dispute_object(
                id,
                &format!("ch_{}", session.id),
                &format!("pi_{}", session.id),
                amount,
                "usd",
                status,
            )
        };

        // Starter disputed, then lost: its own grant pays, Yearly is untouched.
        let (status, _) = shop
            .event(
                "evt_own_d1",
                "charge.dispute.created",
                dispute(&starter, "dp_own_s", 999, "needs_response"),
            )
            .await;
        assert_eq!(status, 200);
        let (status, _) = shop
            .event(
                "evt_own_d2",
                "charge.dispute.closed",
                dispute(&starter, "dp_own_s", 999, "lost"),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            shop.order(user, &starter_order).await["status"],
            "charged_back"
        );
        assert_eq!(shop.balance_of(user).await, dec("15000"));
        assert_eq!(
            remainders(&grants_of(&shop.app, user).await),
            [
                row("purchase", "1000", "0"),
                row("purchase", "15000", "15000")
            ]
        );
        shop.app.assert_ledger_consistent().await;

        // Yearly disputed and won: its credits come back as a new grant that expires when the
        // Yearly purchase does (a dispute neither shortens nor extends the credits' life).
        assert_eq!(
            shop.accepted(
                "evt_own_d3",
                "charge.dispute.created",
                dispute(&yearly, "dp_own_y", 9999, "needs_response"),
            )
            .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert_eq!(
            shop.accepted(
                "evt_own_d4",
                "charge.dispute.closed",
                dispute(&yearly, "dp_own_y", 9999, "won"),
            )
            .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, dec("15000"));
        let grants = grants_of(&shop.app, user).await;
        assert_eq!(
            remainders(&grants),
            [
                row("purchase", "1000", "0"),
                row("purchase", "15000", "0"),
                row("adjustment", "15000", "15000")
            ]
        );
        assert!(grants[1]["expires_at"].is_string(), "{grants:?}");
        assert_eq!(grants[2]["expires_at"], grants[1]["expires_at"]);
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn delayed_payments_failures_and_expiries_move_the_order_without_credit() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-8";
        let (slow_order, slow) = shop.checkout(user, "starter").await;
        let unpaid = checkout_session_object(
            &slow.id,
            &slow_order,
            user,
            "starter",
            999,
            "usd",
            "unpaid",
            "pi_slow",
        );
        let (status, _) = shop
            .event("evt_s1", "checkout.session.completed", unpaid.clone())
            .await;
        assert_eq!(status, 200);
        assert_eq!(shop.order(user, &slow_order).await["status"], "pending");
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        let mut succeeded = unpaid;
        succeeded["payment_status"] = json!("paid");
        assert_eq!(
            shop.accepted(
                "evt_s2",
                "checkout.session.async_payment_succeeded",
                succeeded,
            )
            .await,
            "processed"
        );
        assert_eq!(shop.order(user, &slow_order).await["status"], "paid");
        assert_eq!(shop.balance_of(user).await, dec("1000"));

        let (failed_order, failed) = shop.checkout(user, "starter").await;
        let object = checkout_session_object(
            &failed.id,
            &failed_order,
            user,
            "starter",
            999,
            "usd",
            "unpaid",
            "pi_failed",
        );
        assert_eq!(
            shop.accepted("evt_f", "checkout.session.async_payment_failed", object)
                .await,
            "processed"
        );
        let failed_view = shop.order(user, &failed_order).await;
        assert_eq!(failed_view["status"], "failed");
        assert!(failed_view["closed_at"].is_string());

        let (expired_order, expired) = shop.checkout(user, "starter").await;
        let mut object = checkout_session_object(
            &expired.id,
            &expired_order,
            user,
            "starter",
            999,
            "usd",
            "unpaid",
            "",
        );
        object["status"] = json!("expired");
        assert_eq!(
            shop.accepted("evt_e", "checkout.session.expired", object)
                .await,
            "processed"
        );
        assert_eq!(shop.order(user, &expired_order).await["status"], "expired");
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn forged_stale_unsigned_and_malformed_webhooks_change_nothing() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-9";
        let (order_id, session) = shop.checkout(user, "starter").await;
        let body = stripe_event(
            "evt_forged",
            "checkout.session.completed",
            shop.paid_session(&session, user, 999),
        );
        let now = now_unix();
        let cases = [
            // Signed with a secret Tollgate does not hold.
            (
                Some(stripe_signature_header("whsec_attacker", now, &body)),
                401,
            ),
            // Signed correctly, but ten minutes old (a replay of a captured request).
            (Some(stripe_signature_header(WHSEC, now - 600, &body)), 401),
            (None, 400),
            (Some("t=abc,v1=zz".to_owned()), 400),
        ];
        for (signature, expected) in cases {
            let response = shop.post_webhook(&body, signature.clone()).await;
            assert_eq!(response.status(), expected, "{signature:?}");
            let error: Value = response.json().await.expect("error json");
            assert!(error["error"]["message"].is_string());
        }
        // A body altered after signing.
        let signature = stripe_signature_header(WHSEC, now, &body);
        let tampered = body.replace("999", "1");
        assert_eq!(
            shop.post_webhook(&tampered, Some(signature)).await.status(),
            401
        );
        // Signed but not an event.
        let junk = "{\"hello\": 1}";
        let response = shop
            .post_webhook(junk, Some(stripe_signature_header(WHSEC, now, junk)))
            .await;
        assert_eq!(response.status(), 400);

        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert_eq!(shop.order(user, &order_id).await["status"], "pending");
        let counts = shop.app.row_counts().await;
        assert_eq!(counts[1], 0, "no ledger entry: {counts:?}");
        let events = shop.app.list("/admin/payments/events", ADMIN_TOKEN).await;
        assert!(events.is_empty(), "nothing recorded: {events:?}");
    })
    .await;
}

#[tokio::test]
async fn an_oversized_webhook_body_is_refused_in_the_error_shape_and_changes_nothing() {
    run_test(async || {
        let shop = shop().await;
        // One byte past the webhook limit (2 MiB), signed: the size alone refuses it.
        let body = format!("{{\"pad\": \"{}\"}}", "x".repeat(2 * 1024 * 1024));
        let signature = stripe_signature_header(WHSEC, now_unix(), &body);
        let error = openai_error(shop.post_webhook(&body, Some(signature)).await, 413).await;
        assert_eq!(error["code"], "request_too_large");
        for path in [
            "/api/payment/webhook/lemonsqueezy",
            "/api/payment/webhook/polar",
        ] {
            let response = reqwest::Client::new()
                .post(shop.app.url(path))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .expect("webhook reaches the gateway");
            let error = openai_error(response, 413).await;
            assert_eq!(error["code"], "request_too_large", "{path}");
        }
        let events = shop.app.list("/admin/payments/events", ADMIN_TOKEN).await;
        assert!(events.is_empty(), "nothing recorded: {events:?}");
    })
    .await;
}

#[tokio::test]
async fn both_secrets_verify_during_a_rotation() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-10";
        let (_, first) = shop.checkout(user, "starter").await;
        let (_, second) = shop.checkout(user, "starter").await;
        let now = now_unix();
        let old_only = stripe_event(
            "evt_old",
            "checkout.session.completed",
            shop.paid_session(&first, user, 999),
        );
        let response = shop
            .post_webhook(
                &old_only,
                Some(stripe_signature_header(WHSEC_OLD, now, &old_only)),
            )
            .await;
        assert_eq!(response.status(), 200);
        // Stripe signs with both secrets while a rotation is under way: one v1 per secret.
        let both = stripe_event(
            "evt_both",
            "checkout.session.completed",
            shop.paid_session(&second, user, 999),
        );
        let header = stripe_signature_header_multi(&["whsec_retired_long_ago", WHSEC], now, &both);
        assert_eq!(shop.post_webhook(&both, Some(header)).await.status(), 200);
        assert_eq!(shop.balance_of(user).await, dec("2000"));
    })
    .await;
}

#[tokio::test]
async fn a_wrong_amount_or_unknown_package_is_kept_for_review_and_not_credited() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-11";
        let (order_id, session) = shop.checkout(user, "starter").await;
        let (status, body) = shop
            .event(
                "evt_cheap",
                "checkout.session.completed",
                shop.paid_session(&session, user, 1),
            )
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("review")));
        let order = shop.order(user, &order_id).await;
        assert_eq!(order["status"], "review");
        assert!(
            order["review_reason"]
                .as_str()
                .is_some_and(|r| r.contains("0.01")),
            "{order}"
        );

        // A session Tollgate never created, naming a package that does not exist.
        let stray = checkout_session_object(
            "cs_stray", "", user, "platinum", 5000, "usd", "paid", "pi_x",
        );
        let (status, body) = shop
            .event("evt_stray", "checkout.session.completed", stray)
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("review")));
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);

        let response = shop
            .app
            .get("/admin/payments/events?outcome=review", ADMIN_TOKEN)
            .await;
        assert_eq!(response.status(), 200);
        let events: Value = response.json().await.expect("events json");
        let ids: Vec<&str> = events["data"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["event_id"].as_str().expect("event_id"))
            .collect();
        assert_eq!(ids, ["evt_stray", "evt_cheap"]);
        assert!(
            events["data"][0]["payload"]
                .as_str()
                .is_some_and(|p| p.contains("cs_stray"))
        );
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_session_stripe_completed_without_payment_is_held_for_review_not_credited() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-free-ride";
        let (order_id, session) = shop.checkout(user, "starter").await;
        // A promotion code for 100 % entered on Stripe's page: Stripe completes the session
        // with nothing paid and no PaymentIntent.
        let free = checkout_session_object(
            &session.id,
            &order_id,
            user,
            "starter",
            0,
            "usd",
            "no_payment_required",
            "",
        );
        let (status, body) = shop
            .event("evt_free", "checkout.session.completed", free.clone())
            .await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("review")),
            "{body}"
        );
        let order = shop.order(user, &order_id).await;
        assert_eq!(order["status"], "review");
        assert!(
            order["review_reason"]
                .as_str()
                .is_some_and(|r| r.contains("paid 0.00 USD but the order is for 9.99 USD")),
            "{order}"
        );
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert!(
            shop.app
                .list("/api/credits/transactions", &token(user))
                .await
                .is_empty()
        );
        // Told again, or by the other event Stripe may send for it: still nothing.
        let (_, body) = shop
            .event("evt_free", "checkout.session.completed", free.clone())
            .await;
        assert_eq!(body["outcome"], "duplicate");
        shop.accepted(
            "evt_free_async",
            "checkout.session.async_payment_succeeded",
            free,
        )
        .await;
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        assert_eq!(shop.order(user, &order_id).await["status"], "review");
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_free_package_is_credited_by_its_session_completed_without_payment() {
    run_test(async || {
        // No coupon makes a package free (they are refused), but a package may cost nothing:
        // its order is for 0, and Stripe completes its session with nothing to pay.
        let shop = shop_with(
            "[[packages]]\nid = \"trial\"\nname = \"Trial\"\ncredits = \"50\"\nprice = \"0\"\ncurrency = \"USD\"\n",
        )
        .await;
        let user = "buyer-trial";
        let (order_id, session) = shop.checkout(user, "trial").await;
        assert_eq!(session.amount, 0);
        let free = checkout_session_object(
            &session.id,
            &order_id,
            user,
            "trial",
            0,
            "usd",
            "no_payment_required",
            "",
        );
        assert_eq!(
            shop.accepted("evt_trial", "checkout.session.completed", free.clone())
                .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, dec("50"));
        let order = shop.order(user, &order_id).await;
        assert_eq!(order["status"], "paid");
        assert_eq!(order["amount_paid"], "0.00");
        assert_eq!(
            shop.accepted("evt_trial_again", "checkout.session.completed", free)
                .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, dec("50"));
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_event_types_are_acknowledged_and_ignored() {
    run_test(async || {
        let shop = shop().await;
        let (status, body) = shop
            .event(
                "evt_other",
                "customer.created",
                json!({"id": "cus_1", "object": "customer"}),
            )
            .await;
        assert_eq!((status, body["outcome"].as_str()), (200, Some("ignored")));
    })
    .await;
}

#[tokio::test]
async fn a_failing_provider_answers_502_and_leaves_a_failed_order() {
    run_test(async || {
        let shop = shop().await;
        let user = "buyer-12";
        shop.stripe.fail_next(500);
        let response = shop
            .app
            .post(
                "/api/payment/create-checkout",
                &token(user),
                &json!({"package_id": "starter"}),
            )
            .await;
        let error = openai_error(response, 502).await;
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("unavailable")),
            "{error}"
        );
        let orders = shop.app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0]["status"], "failed");

        for (body, param) in [
            (json!({"package_id": "nope"}), "package_id"),
            (
                json!({"package_id": "starter", "provider": "paypal"}),
                "provider",
            ),
            (
                json!({"package_id": "starter", "provider": "lemonsqueezy"}),
                "provider",
            ),
        ] {
            let response = shop
                .app
                .post("/api/payment/create-checkout", &token(user), &body)
                .await;
            let error = openai_error(response, 400).await;
            assert_eq!(error["param"], param, "{body}");
        }
        let response = shop
            .app
            .post(
                "/api/payment/create-checkout",
                "not-a-token",
                &json!({"package_id": "starter"}),
            )
            .await;
        assert_eq!(response.status(), 401);
    })
    .await;
}

#[tokio::test]
async fn a_checkout_stripe_answers_too_late_fails_in_time_and_its_late_session_credits_once() {
    run_test(async || {
        let shop = shop_with_stripe("api_timeout_secs = 1", "").await;
        let user = "buyer-slow-stripe";
        // Stripe creates the session but answers after 3 s: Tollgate stops waiting at 1 s.
        shop.stripe.delay_next(Duration::from_secs(3));
        let started = Instant::now();
        let response = shop
            .app
            .post(
                "/api/payment/create-checkout",
                &token(user),
                &json!({"package_id": "starter"}),
            )
            .await;
        let waited = started.elapsed();
        let error = openai_error(response, 502).await;
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("did not answer within 1s")),
            "{error}"
        );
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(2500),
            "answered after {waited:?}"
        );
        let orders = shop.app.list("/api/payment/orders", &token(user)).await;
        assert_eq!(orders.len(), 1);
        assert_eq!(orders[0]["status"], "failed");
        let first_order = orders[0]["id"].as_str().expect("order id").to_owned();
        let late = shop.stripe.sessions().remove(0);
        assert_eq!(late.metadata["order_id"], first_order);

        // The buyer starts again: a new order and a new session, paid as usual.
        let (second_order, second) = shop.checkout(user, "starter").await;
        assert_ne!(second_order, first_order);
        assert_ne!(second.id, late.id);
        assert_eq!(shop.stripe.sessions().len(), 2);

        // The late session was paid after all: its webhook credits the order it names, once.
        let paid_late = shop.paid_session(&late, user, 999);
        assert_eq!(
            shop.accepted("evt_late", "checkout.session.completed", paid_late.clone())
                .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        let (_, body) = shop
            .event("evt_late", "checkout.session.completed", paid_late.clone())
            .await;
        assert_eq!(body["outcome"], "duplicate");
        shop.accepted(
            "evt_late_again",
            "checkout.session.async_payment_succeeded",
            paid_late,
        )
        .await;
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        assert_eq!(shop.order(user, &first_order).await["status"], "paid");
        assert_eq!(shop.order(user, &second_order).await["status"], "pending");
        let entries = shop
            .app
            .list("/api/credits/transactions", &token(user))
            .await;
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0]["reference"], format!("stripe:{}", late.id));
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn invoices_are_numbered_without_gaps_and_readable_only_by_their_owner() {
    run_test(async || {
        let shop = shop().await;
        let (first_order, _) = shop.pay("inv-a", "starter", 999).await;
        let (second_order, _) = shop.pay("inv-b", "yearly", 9999).await;

        let first = shop.order("inv-a", &first_order).await;
        let invoice_id = first["invoice_id"].as_str().expect("invoice id").to_owned();
        let response = shop
            .app
            .get(
                &format!("/api/payment/invoices/{invoice_id}"),
                &token("inv-a"),
            )
            .await;
        assert_eq!(response.status(), 200);
        let invoice: Value = response.json().await.expect("invoice json");
        let number = format!("INV-{}-000001", issue_year(&invoice));
        assert_eq!(invoice["number"], number);
        assert_eq!(invoice["total"], "9.99");
        assert_eq!(invoice["tax_rate_percent"], "19");
        // 9.99 includes 19 % tax: 9.99 × 19 / 119 = 1.595… → 1.60.
        assert_eq!(invoice["tax"], "1.60");
        assert_eq!(invoice["total_excluding_tax"], "8.39");
        assert_eq!(invoice["seller"]["name"], "Tollgate Test Ltd");
        assert_eq!(invoice["buyer"]["email"], "buyer@example.test");
        assert_eq!(invoice["order_id"], first_order);

        let second = shop.order("inv-b", &second_order).await;
        let second_invoice = second["invoice_id"].as_str().expect("invoice id");
        let response = shop
            .app
            .get(
                &format!("/api/payment/invoices/{second_invoice}"),
                &token("inv-b"),
            )
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("invoice json");
        // The next number of the same year (the first of the next, had New Year come between).
        assert_numbered_per_year(&[invoice.clone(), body.clone()]);
        assert_ne!(body["number"], invoice["number"]);
        assert!(
            body["notes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n.as_str().is_some_and(|n| n.contains("365 days"))),
            "{body}"
        );

        // Another account's invoice is not found, in JSON or PDF.
        for path in [
            format!("/api/payment/invoices/{invoice_id}"),
            format!("/api/payment/invoices/{invoice_id}/download"),
        ] {
            assert_eq!(shop.app.get(&path, &token("inv-b")).await.status(), 404);
        }

        let response = shop
            .app
            .get(
                &format!("/api/payment/invoices/{invoice_id}/download"),
                &token("inv-a"),
            )
            .await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().ok(),
            Some("application/pdf")
        );
        let pdf = response.bytes().await.expect("pdf bytes");
        assert!(pdf.starts_with(b"%PDF-"));
        let document = lopdf::Document::load_mem(&pdf).expect("a PDF parser reads it");
        let text = document.extract_text(&[1]).expect("page 1 has text");
        for expected in [
            number,
            "Tollgate Test Ltd".into(),
            "9.99".into(),
            "inv-a".into(),
        ] {
            assert!(text.contains(&expected), "{expected} not in {text}");
        }
    })
    .await;
}

#[tokio::test]
async fn concurrent_payments_take_invoice_numbers_without_gaps_or_repeats() {
    run_test(async || {
        let shop = shop().await;
        let mut sessions = Vec::new();
        for i in 0..8 {
            let user = format!("numbered-{i}");
            let (order_id, session) = shop.checkout(&user, "starter").await;
            sessions.push((user, order_id, session));
        }
        let payments = sessions.iter().map(|(user, _, session)| {
            let shop = &shop;
            async move {
                let object = shop.paid_session(session, user, 999);
                shop.event(
                    &format!("evt_n_{}", session.id),
                    "checkout.session.completed",
                    object,
                )
                .await
            }
        });
        for (status, body) in futures_util::future::join_all(payments).await {
            assert_eq!(status, 200, "{body}");
        }
        let mut invoices = Vec::new();
        for (user, order_id, _) in &sessions {
            let order = shop.order(user, order_id).await;
            let invoice_id = order["invoice_id"].as_str().expect("invoice id");
            let response = shop
                .app
                .get(&format!("/api/payment/invoices/{invoice_id}"), &token(user))
                .await;
            assert_eq!(response.status(), 200);
            invoices.push(response.json::<Value>().await.expect("invoice json"));
        }
        assert_eq!(invoices.len(), 8);
        assert_numbered_per_year(&invoices);
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn ledger_verify_reports_payment_records_that_disagree() {
    run_test(async || {
        let shop = shop().await;
        shop.pay("verify-1", "starter", 999).await;
        shop.app.assert_ledger_consistent().await;
        // Behind the gateway's back: an invoice number skipped, a move that the ledger lacks,
        // a coupon counting a use nobody holds.
        shop.app
            .execute_sql("UPDATE invoice_counters SET last_number = last_number + 1")
            .await;
        shop.app
            .execute_sql("UPDATE order_credit_moves SET amount = amount + 1")
            .await;
        shop.app
        .execute_sql(
            "INSERT INTO coupons (code, kind, bonus_credits, active, uses, created_at, updated_at) \
             VALUES ('GHOST', 'bonus', 1, 1, 1, 0, 0)",
        )
        .await;
        let problems = shop.app.verify_books().await;
        let text = format!("{problems:?}");
        for expected in ["without gaps", "no matching ledger entry", "coupon GHOST"] {
            assert!(text.contains(expected), "{expected} not in {text}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_credit_left_pending_by_a_crash_is_applied_by_the_recovery_task() {
    run_test(async || {
        let shop = shop().await;
        let user = "recover-1";
        // As if the process died after writing an order's change and before the ledger grant.
        shop.app
            .execute_sql(
                "INSERT INTO order_credit_moves (reference, order_id, account_id, entry_type, \
                 amount, description, expires_at, created_at) VALUES ('stripe:cs_crashed', \
                 'ord_crashed', 'recover-1', 'purchase', 5000000, 'Starter (order ord_crashed)', \
                 NULL, 0)",
            )
            .await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while shop.balance_of(user).await != dec("5") {
            assert!(
                Instant::now() < deadline,
                "the pending credit was never applied"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let entries = shop
            .app
            .list("/api/credits/transactions", &token(user))
            .await;
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["reference"], "stripe:cs_crashed");
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}
