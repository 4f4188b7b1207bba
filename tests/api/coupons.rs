//! Coupons: admin-managed, quoted by `/v1/billing/coupons/apply`, applied by create-checkout,
//! and counted atomically (no oversubscription under races).

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::fakes::*;
use crate::helpers::*;
use crate::payments::{Shop, dec, shop};

async fn create_coupon(shop: &Shop, body: Value) -> reqwest::Response {
    shop.app.post("/admin/coupons", ADMIN_TOKEN, &body).await
}

async fn checkout_with(shop: &Shop, user: &str, coupon: &str) -> reqwest::Response {
    shop.app
        .post(
            "/api/payment/create-checkout",
            &token(user),
            &json!({"package_id": "starter", "coupon_code": coupon}),
        )
        .await
}

async fn coupon_uses(shop: &Shop, code: &str) -> i64 {
    let coupons = shop.app.list("/admin/coupons", ADMIN_TOKEN).await;
    let coupon = coupons
        .iter()
        .find(|c| c["code"] == code)
        .unwrap_or_else(|| panic!("{code} is not listed: {coupons:?}"));
    coupon["uses"]
        .as_i64()
        .unwrap_or_else(|| panic!("uses of {coupon}"))
}

#[tokio::test]
async fn a_percentage_coupon_is_quoted_charged_and_invoiced() {
    run_test(async || {
        let shop = shop().await;
        let user = "coupon-1";
        let response = create_coupon(
            &shop,
            json!({"code": "spring25", "kind": "percent", "percent_off": "25"}),
        )
        .await;
        assert_eq!(response.status(), 201);

        let response = shop
            .app
            .post(
                "/v1/billing/coupons/apply",
                &token(user),
                &json!({"code": "Spring25", "package_id": "starter"}),
            )
            .await;
        assert_eq!(response.status(), 200);
        let quote: Value = response.json().await.expect("quote json");
        // 25 % of 9.99 is 2.4975: rounded down to 2.49.
        assert_eq!(
            (quote["discount"].as_str(), quote["total"].as_str()),
            (Some("2.49"), Some("7.50"))
        );
        assert_eq!(
            coupon_uses(&shop, "SPRING25").await,
            0,
            "a quote holds no use"
        );

        let response = checkout_with(&shop, user, "spring25").await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.expect("checkout json");
        let order_id = body["order_id"].as_str().expect("order id").to_owned();
        assert_eq!(body["order"]["discount"], "2.49");
        assert_eq!(body["order"]["coupon_code"], "SPRING25");
        let session = shop.stripe.sessions().pop().expect("a session");
        assert_eq!(session.amount, 750, "Stripe charges the discounted price");
        assert_eq!(coupon_uses(&shop, "SPRING25").await, 1);

        let outcome = shop
            .accepted(
                "evt_c1",
                "checkout.session.completed",
                shop.paid_session(&session, user, 750),
            )
            .await;
        assert_eq!(outcome, "processed");
        assert_eq!(shop.balance_of(user).await, dec("1000"));
        let order = shop.order(user, &order_id).await;
        let invoice_id = order["invoice_id"].as_str().expect("invoice");
        let response = shop
            .app
            .get(&format!("/api/payment/invoices/{invoice_id}"), &token(user))
            .await;
        assert_eq!(response.status(), 200);
        let invoice: Value = response.json().await.expect("invoice json");
        assert_eq!(
            (
                invoice["subtotal"].as_str(),
                invoice["discount"].as_str(),
                invoice["total"].as_str()
            ),
            (Some("9.99"), Some("2.49"), Some("7.50"))
        );
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_bonus_coupon_adds_credits_that_a_refund_takes_back_too() {
    run_test(async || {
        let shop = shop().await;
        let user = "coupon-2";
        let response = create_coupon(
            &shop,
            json!({"code": "EXTRA", "kind": "bonus", "bonus_credits": "100"}),
        )
        .await;
        assert_eq!(response.status(), 201);
        let response = checkout_with(&shop, user, "extra").await;
        assert_eq!(response.status(), 201);
        let session = shop.stripe.sessions().pop().expect("a session");
        assert_eq!(session.amount, 999);
        assert_eq!(
            shop.accepted(
                "evt_b1",
                "checkout.session.completed",
                shop.paid_session(&session, user, 999),
            )
            .await,
            "processed"
        );
        assert_eq!(shop.balance_of(user).await, dec("1100"));
        let entries = shop
            .app
            .list("/api/credits/transactions", &token(user))
            .await;
        assert!(
            entries
                .iter()
                .any(|e| e["type"] == "bonus" && e["amount"] == "100")
        );

        let (status, body) = shop.charge_refunded("evt_b2", &session, 999).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (200, Some("processed")),
            "{body}"
        );
        assert_eq!(shop.balance_of(user).await, Decimal::ZERO);
        shop.app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn racing_buyers_never_hold_more_uses_than_the_coupon_allows() {
    run_test(async || {
        let shop = shop().await;
        let response = create_coupon(
            &shop,
            json!({"code": "FIVE", "kind": "fixed", "amount_off": "1.00",
        "currency": "USD", "max_uses": 5}),
        )
        .await;
        assert_eq!(response.status(), 201);
        let attempts = (0..12).map(|i| {
            let shop = &shop;
            async move {
                checkout_with(shop, &format!("racer-{i}"), "FIVE")
                    .await
                    .status()
                    .as_u16()
            }
        });
        let statuses = futures_util::future::join_all(attempts).await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 201).count(),
            5,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 400).count(),
            7,
            "{statuses:?}"
        );
        assert_eq!(coupon_uses(&shop, "FIVE").await, 5);

        // An order that expires gives its use back.
        let session = shop.stripe.sessions().pop().expect("a session");
        let mut expired = checkout_session_object(
            &session.id,
            &session.metadata["order_id"],
            &session.metadata["account_id"],
            "starter",
            899,
            "usd",
            "unpaid",
            "",
        );
        expired["status"] = json!("expired");
        assert_eq!(
            shop.accepted("evt_x", "checkout.session.expired", expired)
                .await,
            "processed"
        );
        assert_eq!(coupon_uses(&shop, "FIVE").await, 4);
        assert_eq!(
            checkout_with(&shop, "late-buyer", "FIVE").await.status(),
            201
        );
        assert_eq!(
            checkout_with(&shop, "later-buyer", "FIVE").await.status(),
            400
        );
    })
    .await;
}

#[tokio::test]
async fn per_account_limits_windows_and_retired_coupons_refuse_with_a_reason() {
    run_test(async || {
        let shop = shop().await;
        let user = "coupon-4";
        let response = create_coupon(
        &shop,
        json!({"code": "ONCE", "kind": "percent", "percent_off": "10", "max_uses_per_account": 1}),
    )
        .await;
        assert_eq!(response.status(), 201);
        let response = create_coupon(
            &shop,
            json!({"code": "OLD", "kind": "percent", "percent_off": "10",
        "valid_until": "2020-01-01T00:00:00Z"}),
        )
        .await;
        assert_eq!(response.status(), 201);
        let response = create_coupon(
        &shop,
        json!({"code": "BIGONLY", "kind": "percent", "percent_off": "10", "min_package": "yearly"}),
    )
        .await;
        assert_eq!(response.status(), 201);

        assert_eq!(checkout_with(&shop, user, "ONCE").await.status(), 201);
        let error = openai_error(checkout_with(&shop, user, "ONCE").await, 400).await;
        assert_eq!(error["param"], "coupon_code");
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("already used")),
            "{error}"
        );
        // Another account still may.
        assert_eq!(
            checkout_with(&shop, "coupon-4b", "ONCE").await.status(),
            201
        );

        for (code, reason) in [
            ("OLD", "expired"),
            ("BIGONLY", "yearly"),
            ("NOPE", "no such coupon"),
        ] {
            let response = shop
                .app
                .post(
                    "/v1/billing/coupons/apply",
                    &token(user),
                    &json!({"code": code, "package_id": "starter"}),
                )
                .await;
            let error = openai_error(response, 400).await;
            assert!(
                error["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(reason)),
                "{code}: {error}"
            );
        }
        let response = shop
            .app
            .post(
                "/v1/billing/coupons/apply",
                &token(user),
                &json!({"code": "BIGONLY", "package_id": "yearly"}),
            )
            .await;
        assert_eq!(response.status(), 200);

        let response = shop
            .app
            .client
            .patch(shop.app.url("/admin/coupons/bigonly"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"active": false}))
            .send()
            .await
            .expect("patch");
        assert_eq!(response.status(), 200);
        let response = shop
            .app
            .post(
                "/v1/billing/coupons/apply",
                &token(user),
                &json!({"code": "BIGONLY", "package_id": "yearly"}),
            )
            .await;
        openai_error(response, 400).await;
    })
    .await;
}

#[tokio::test]
async fn bad_coupon_definitions_are_refused_with_the_field_named() {
    run_test(async || {
        let shop = shop().await;
        let cases = [
            (
                json!({"code": "A B", "kind": "percent", "percent_off": "10"}),
                "code",
            ),
            (
                json!({"code": "P", "kind": "percent", "percent_off": "150"}),
                "percent_off",
            ),
            (
                json!({"code": "F", "kind": "fixed", "amount_off": "1.00"}),
                "currency",
            ),
            (
                json!({"code": "F", "kind": "fixed", "amount_off": "0.001", "currency": "USD"}),
                "amount_off",
            ),
            (json!({"code": "B", "kind": "bonus"}), "bonus_credits"),
            (
                json!({"code": "M", "kind": "bonus", "bonus_credits": "5", "min_package": "gold"}),
                "min_package",
            ),
            (
                json!({"code": "W", "kind": "bonus", "bonus_credits": "5",
                "valid_from": "2030-01-01T00:00:00Z", "valid_until": "2029-01-01T00:00:00Z"}),
                "valid_until",
            ),
        ];
        for (body, param) in cases {
            let error = openai_error(create_coupon(&shop, body.clone()).await, 400).await;
            assert_eq!(error["param"], param, "{body}");
        }
        let ok = json!({"code": "DUP", "kind": "bonus", "bonus_credits": "5"});
        assert_eq!(create_coupon(&shop, ok.clone()).await.status(), 201);
        assert_eq!(create_coupon(&shop, ok).await.status(), 409);
        // Only admins manage coupons.
        let response = shop
            .app
            .post(
                "/admin/coupons",
                &token("coupon-5"),
                &json!({"code": "MINE", "kind": "bonus", "bonus_credits": "5"}),
            )
            .await;
        assert_eq!(response.status(), 403);
    })
    .await;
}
