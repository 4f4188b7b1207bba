//! Monthly usage statements (`/v1/billing/invoices`): one line per model, built from the usage
//! records, adding up to what the ledger charged.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::helpers::*;

fn this_month() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}", now.year(), u8::from(now.month()))
}

#[tokio::test]
async fn a_statement_has_a_line_per_model_that_adds_up_to_the_usage_charged() {
    run_test(async || {
        let app = spawn_app().await;
        let user = "statement-1";
        app.grant(user, "1000").await;
        for (model, content) in [
            ("mock-small", "hello there"),
            ("mock-small", "and again"),
            ("mock-pricey-1", "something costly"),
        ] {
            let response = app.chat(&token(user), &chat_body(model, content)).await;
            assert_eq!(response.status(), 200);
        }
        app.settled_balance(&token(user)).await;
        // Someone else's usage stays off this statement.
        app.grant("statement-other", "10").await;
        app.chat(&token("statement-other"), &chat_body("mock-small", "hi"))
            .await;
        app.settled_balance(&token("statement-other")).await;

        let month = this_month();
        let response = app
            .post(
                "/v1/billing/invoices/generate",
                &token(user),
                &json!({"billing_month": month}),
            )
            .await;
        assert_eq!(response.status(), 200);
        let statement: Value = response.json().await.expect("statement json");
        assert_eq!(statement["status"], "provisional");
        assert_eq!(statement["billing_month"], month.as_str());

        // Expected: the usage records, summed per model by the test itself.
        let mut expected: BTreeMap<String, (i64, i64, Decimal)> = BTreeMap::new();
        for record in app.list("/api/credits/usage?limit=100", &token(user)).await {
            let entry = expected
                .entry(record["model"].as_str().unwrap_or_default().to_owned())
                .or_default();
            entry.0 += record["prompt_tokens"].as_i64().unwrap_or_default();
            entry.1 += record["completion_tokens"].as_i64().unwrap_or_default();
            entry.2 += credits(&record["cost"]);
        }
        let lines = statement["lines"].as_array().cloned().unwrap_or_default();
        assert_eq!(lines.len(), 2, "{statement}");
        for line in &lines {
            let (prompt, completion, cost) = expected[line["model"].as_str().unwrap_or_default()];
            assert_eq!(line["prompt_tokens"].as_i64(), Some(prompt));
            assert_eq!(line["completion_tokens"].as_i64(), Some(completion));
            assert_eq!(credits(&line["amount"]), cost);
            let unit: Decimal = line["unit_price_per_1k_tokens"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("unit price");
            let exact = cost * Decimal::from(1000) / Decimal::from(prompt + completion);
            assert_eq!(unit, exact.round_dp(6));
        }
        let pricey = lines
            .iter()
            .find(|l| l["model"] == "mock-pricey-1")
            .expect("pricey line");
        let small = lines
            .iter()
            .find(|l| l["model"] == "mock-small")
            .expect("small line");
        assert_eq!(small["requests"], 2);
        assert!(
            credits(&pricey["unit_price_per_1k_tokens"])
                > credits(&small["unit_price_per_1k_tokens"])
        );

        // The total is what the ledger charged as usage.
        let charged: Decimal = app
            .list("/api/credits/transactions?limit=100", &token(user))
            .await
            .iter()
            .filter(|e| e["type"] == "usage")
            .map(|e| -credits(&e["amount"]))
            .sum();
        assert_eq!(credits(&statement["total"]), charged);

        // Generating again replaces the statement; the list has it once.
        app.post(
            "/v1/billing/invoices/generate",
            &token(user),
            &json!({"billing_month": month}),
        )
        .await;
        let listed = app.list("/v1/billing/invoices", &token(user)).await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["lines"], statement["lines"]);
        assert!(
            app.list("/v1/billing/invoices", &token("statement-nobody"))
                .await
                .is_empty()
        );
    })
    .await;
}

#[tokio::test]
async fn an_empty_or_past_month_gives_an_empty_final_statement_and_bad_months_are_refused() {
    run_test(async || {
        let app = spawn_app().await;
        let user = "statement-2";
        let response = app
            .post(
                "/v1/billing/invoices/generate",
                &token(user),
                &json!({"billing_month": "2024-02"}),
            )
            .await;
        assert_eq!(response.status(), 200);
        let statement: Value = response.json().await.expect("json");
        assert_eq!(statement["status"], "final");
        assert_eq!(statement["total"], "0");
        assert_eq!(statement["period_end"], "2024-03-01T00:00:00Z");
        for month in ["2024-13", "Nov 2026", "2999-01"] {
            let response = app
                .post(
                    "/v1/billing/invoices/generate",
                    &token(user),
                    &json!({"billing_month": month}),
                )
                .await;
            let error = openai_error(response, 400).await;
            assert_eq!(error["param"], "billing_month", "{month}");
        }
        let response = app
            .post(
                "/v1/billing/invoices/generate",
                "bad-token",
                &json!({"billing_month": "2024-02"}),
            )
            .await;
        assert_eq!(response.status(), 401);
    })
    .await;
}
