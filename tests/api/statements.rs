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

/// The month the test's usage is moved into, whatever today's date: a month long past.
const PAST_MONTH: &str = "2025-06";

async fn generate(app: &TestApp, user: &str, month: &str) -> Value {
    let response = app
        .post(
            "/v1/billing/invoices/generate",
            &token(user),
            &json!({"billing_month": month}),
        )
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("statement json")
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
        let response = app
            .chat(&token("statement-other"), &chat_body("mock-small", "hi"))
            .await;
        assert_eq!(response.status(), 200);
        app.settled_balance(&token("statement-other")).await;
        // A statement sums the usage settled in its month. So that no test run straddles a
        // month's end (its usage in one month, its statement of the next), every usage record
        // is moved to the middle of a past month: 2025-06-15T12:00:00Z.
        app.execute_sql("UPDATE usage_records SET settled_at = 1749988800000")
            .await;

        // The month the usage left has none of it now.
        let month = this_month();
        let current = generate(&app, user, &month).await;
        assert_eq!(current["billing_month"], month.as_str());
        assert_eq!(current["total"], "0", "{current}");
        assert_eq!(current["lines"], json!([]), "{current}");
        // A month still running is provisional. (Only when the clock passed a month's end
        // while the statement was made can that have been the next month's, and final.)
        if this_month() == month {
            assert_eq!(current["status"], "provisional", "{current}");
        }

        let month = PAST_MONTH;
        let statement = generate(&app, user, month).await;
        assert_eq!(statement["status"], "final");
        assert_eq!(statement["billing_month"], month);

        // Expected: the usage records, summed per model by the test itself.
        let mut expected: BTreeMap<String, (i64, i64, Decimal)> = BTreeMap::new();
        for record in app.list("/api/credits/usage?limit=100", &token(user)).await {
            let entry = expected
                .entry(record["model"].as_str().expect("model").to_owned())
                .or_default();
            entry.0 += record["prompt_tokens"].as_i64().expect("prompt tokens");
            entry.1 += record["completion_tokens"]
                .as_i64()
                .expect("completion tokens");
            entry.2 += credits(&record["cost"]);
        }
        let lines = statement["lines"].as_array().cloned().expect("lines");
        assert_eq!(lines.len(), 2, "{statement}");
        for line in &lines {
            let (prompt, completion, cost) = expected[line["model"].as_str().expect("model")];
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

        // Generating again replaces the statement; the list has it once (beside the current
        // month's).
        let again = generate(&app, user, month).await;
        let undated = |statement: &Value| {
            let mut statement = statement.clone();
            let fields = statement.as_object_mut().expect("a statement object");
            fields.remove("generated_at").expect("generated_at");
            statement
        };
        assert_eq!(
            undated(&again),
            undated(&statement),
            "a final month is rebuilt the same"
        );
        let listed = app.list("/v1/billing/invoices", &token(user)).await;
        let past: Vec<&Value> = listed
            .iter()
            .filter(|s| s["billing_month"] == month)
            .collect();
        assert_eq!(past.len(), 1, "{listed:?}");
        assert_eq!(past[0]["lines"], statement["lines"]);
        assert_eq!(listed.len(), 2, "{listed:?}");
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
