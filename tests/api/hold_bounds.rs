//! I1: the hold is an upper bound of what its request is charged, whatever the request's shape
//! (`n`, `best_of`, no cap, unsized input), a price reload while it runs, or an upstream that
//! reports more than it was allowed. Each shape is raced against a balance that affords only a
//! few requests, with no overdraft.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::helpers::*;

/// Sends `count` copies of `body` to `path` at once; returns the statuses.
async fn race(
    app: &Arc<TestApp>,
    bearer: &str,
    path: &str,
    body: &Value,
    count: usize,
) -> Vec<u16> {
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (app, bearer, body, path) = (
                app.clone(),
                bearer.to_owned(),
                body.clone(),
                path.to_owned(),
            );
            tokio::spawn(async move {
                let response = app.post(&path, &bearer, &body).await;
                let status = response.status().as_u16();
                // Read whole: an answer cut short must fail the race, not pass unseen.
                let body = response.bytes().await.expect("the whole answer");
                assert!(!body.is_empty(), "an empty {status} answer");
                assert!(
                    status == 200 || status == 402,
                    "unexpected {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.expect("task"));
    }
    statuses
}

/// After a race: no balance below zero (overdraft 0), every usage record charged at most its
/// hold, and the ledger adds up.
async fn assert_bounded(app: &TestApp, bearer: &str, statuses: &[u16]) -> Vec<Value> {
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 402),
        "unexpected statuses: {statuses:?}"
    );
    assert!(
        statuses.contains(&200),
        "nothing went through: {statuses:?}"
    );
    let balance = app.settled_balance(bearer).await;
    assert!(
        credits(&balance["balance"]) >= Decimal::ZERO,
        "overspent: {balance}"
    );
    let usage = app.list("/api/credits/usage?limit=100", bearer).await;
    assert_eq!(
        usage.len(),
        statuses.iter().filter(|s| **s == 200).count(),
        "every answered request is billed once"
    );
    for record in &usage {
        assert!(
            credits(&record["cost"]) <= credits(&record["hold"]),
            "charged more than its hold: {record}"
        );
    }
    app.assert_ledger_consistent().await;
    usage
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn n_choices_without_a_cap_are_capped_upstream_and_held_in_full() {
    run_test(async || {
        let app = Arc::new(spawn_app().await);
        let user = token("n8");
        app.grant("n8", "5").await;
        // Without a cap the verbose model answers 4096 words per choice; the default cap is 256.
        let body = json!({
            "model": "mock-verbose",
            "messages": [{"role": "user", "content": "eight answers please"}],
            "n": 8
        });
        let statuses = race(&app, &user, "/v1/chat/completions", &body, 10).await;
        let usage = assert_bounded(&app, &user, &statuses).await;
        for record in &usage {
            assert_eq!(record["completion_tokens"], 8 * 256, "{record}");
            assert_eq!(record["uncharged"], "0");
        }
        let sent = app.upstream.log.last().expect("a request went upstream");
        assert_eq!(sent.body["max_completion_tokens"], 256);
        assert_eq!(sent.body["n"], 8);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn best_of_is_held_for_every_generated_completion() {
    run_test(async || {
        let app = Arc::new(spawn_app().await);
        let user = token("bestof");
        app.grant("bestof", "4").await;
        let body =
            json!({"model": "mock-verbose", "prompt": "pick the best", "best_of": 5, "n": 1});
        let statuses = race(&app, &user, "/v1/completions", &body, 10).await;
        let usage = assert_bounded(&app, &user, &statuses).await;
        for record in &usage {
            assert_eq!(record["completion_tokens"], 5 * 256, "{record}");
        }
        let sent = app.upstream.log.last().expect("a request went upstream");
        assert_eq!(sent.body["max_tokens"], 256);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_with_n_choices_are_capped_and_bounded() {
    run_test(async || {
        let app = Arc::new(spawn_app().await);
        let user = token("nstream");
        app.grant("nstream", "3").await;
        let body = json!({
            "model": "mock-verbose",
            "messages": [{"role": "user", "content": "stream three"}],
            "n": 3,
            "stream": true
        });
        let statuses = race(&app, &user, "/v1/chat/completions", &body, 8).await;
        let usage = assert_bounded(&app, &user, &statuses).await;
        for record in &usage {
            assert_eq!(record["completion_tokens"], 3 * 256, "{record}");
            assert_eq!(record["source"], "reported");
        }
    })
    .await;
}

#[tokio::test]
async fn a_malformed_n_or_cap_is_refused_before_anything_is_held() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("shapes");
        app.grant("shapes", "5").await;
        let before = app.row_counts().await;
        for (body, param) in [
            (json!({"model": "mock-1", "messages": [], "n": 0}), "n"),
            (json!({"model": "mock-1", "messages": [], "n": "8"}), "n"),
            (json!({"model": "mock-1", "messages": [], "n": 1000}), "n"),
            (
                json!({"model": "mock-1", "messages": [], "max_tokens": -1}),
                "max_tokens",
            ),
            (
                json!({"model": "mock-1", "messages": [], "max_completion_tokens": 1.5}),
                "max_completion_tokens",
            ),
        ] {
            let error = openai_error(app.chat(&user, &body).await, 400).await;
            assert_eq!(error["param"], param, "{body}");
        }
        let error = openai_error(
            app.post(
                "/v1/completions",
                &user,
                &json!({"model": "mock-1", "prompt": "x", "best_of": 500}),
            )
            .await,
            400,
        )
        .await;
        assert_eq!(error["param"], "best_of");
        assert_eq!(app.row_counts().await, before, "bad input changes nothing");
        assert_eq!(app.balance(&user).await["held"], "0");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_reporting_more_than_the_cap_is_charged_its_hold_and_the_rest_recorded() {
    run_test(async || {
        let app = Arc::new(spawn_app().await);
        let user = token("over");
        app.grant("over", "2").await;
        // The model reports 1000 completion tokens more than it produced, above any cap.
        let body = json!({
            "model": "mock-overreport",
            "messages": [{"role": "user", "content": "count me wrong"}],
            "max_tokens": 10
        });
        let statuses = race(&app, &user, "/v1/chat/completions", &body, 20).await;
        let usage = assert_bounded(&app, &user, &statuses).await;
        for record in &usage {
            assert_eq!(
                record["cost"], record["hold"],
                "charged its whole hold: {record}"
            );
            let uncharged = credits(&record["uncharged"]);
            assert!(uncharged > Decimal::ONE / Decimal::from(2), "{record}");
            // The full price is what was charged plus what was not.
            let tokens = record["prompt_tokens"].as_i64().expect("prompt")
                + record["completion_tokens"].as_i64().expect("completion");
            assert_eq!(
                credits(&record["cost"]) + uncharged,
                Decimal::new(tokens, 3),
                "{record}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_keeps_the_prices_it_was_reserved_under() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("reload");
        app.grant("reload", "5").await;
        // A slow stream, reserved at 1 credit per 1000 tokens.
        let body = json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "slowly"}],
            "max_tokens": 40,
            "stream": true
        });
        let response = app.chat(&user, &body).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        stream.next().await.expect("first chunk").expect("chunk");
        // The price rises a thousandfold while it runs.
        let expensive = DEFAULT_PRICING.replace(
            "[default]\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"",
            "[default]\nprompt_per_1k = \"1000\"\ncompletion_per_1k = \"1000\"",
        );
        assert_ne!(expensive, DEFAULT_PRICING);
        std::fs::write(&app.pricing_path, expensive).expect("write pricing");
        let old_version = app.state.meter.pricing().version();
        eventually(Duration::from_secs(5), async || {
            match app.state.meter.pricing().version() == old_version {
                true => Err("the new prices never loaded".to_owned()),
                false => Ok(()),
            }
        })
        .await;
        while let Some(chunk) = stream.next().await {
            chunk.expect("chunk");
        }
        let balance = app.settled_balance(&user).await;
        let usage = app.list("/api/credits/usage", &user).await;
        let record = &usage[0];
        let tokens = record["prompt_tokens"].as_i64().expect("prompt")
            + record["completion_tokens"].as_i64().expect("completion");
        assert_eq!(
            credits(&record["cost"]),
            Decimal::new(tokens, 3),
            "{record}"
        );
        assert_eq!(record["uncharged"], "0");
        assert!(credits(&balance["balance"]) >= Decimal::ZERO);
        // The next request pays the new price.
        let response = app.chat(&user, &chat_body("mock-1", "now")).await;
        assert_eq!(
            response.status(),
            402,
            "a request at 1 credit per token exceeds what is left"
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

fn image_request(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is in this picture"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
        ]}],
        "max_tokens": 10
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn input_the_gateway_cannot_size_is_held_at_the_models_context_window() {
    run_test(async || {
        let pricing = DEFAULT_PRICING.replace(
            "default_max_output_tokens = 256",
            "default_max_output_tokens = 256\ndefault_max_input_tokens = 2000",
        );
        let app = Arc::new(
            spawn_app_with(Options {
                pricing,
                ..Options::default()
            })
            .await,
        );
        let user = token("image");
        app.grant("image", "5").await;
        // Each holds 2000 input tokens plus 10 output: two fit in 5 credits, not three.
        let statuses = race(
            &app,
            &user,
            "/v1/chat/completions",
            &image_request("mock-slow"),
            6,
        )
        .await;
        let usage = assert_bounded(&app, &user, &statuses).await;
        for record in &usage {
            assert!(
                credits(&record["hold"]) >= Decimal::new(2010, 3),
                "{record}"
            );
        }
        // A request the balance cannot hold at the context window is refused, however small it
        // looks.
        let poor = token("poor");
        app.grant("poor", "1").await;
        let error = openai_error(app.chat(&poor, &image_request("mock-1")).await, 402).await;
        assert_eq!(error["code"], "insufficient_credits");
        // Responses that continue an earlier one are unsized too.
        let error = openai_error(
            app.post(
                "/v1/responses",
                &poor,
                &json!({"model": "mock-1", "input": "go on", "previous_response_id": "resp_1"}),
            )
            .await,
            402,
        )
        .await;
        assert_eq!(error["code"], "insufficient_credits");
    })
    .await;
}

#[tokio::test]
async fn the_reject_policy_refuses_unsized_input_with_a_400_naming_the_field() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "on_unsized_input = \"reject\"".into(),
            ..Options::default()
        })
        .await;
        let user = token("strict");
        app.grant("strict", "100").await;
        let before = app.row_counts().await;
        let error = openai_error(app.chat(&user, &image_request("mock-1")).await, 400).await;
        assert_eq!(error["param"], "messages");
        let error = openai_error(
            app.post(
                "/v1/responses",
                &user,
                &json!({"model": "mock-1", "input": "go on", "previous_response_id": "resp_1"}),
            )
            .await,
            400,
        )
        .await;
        assert_eq!(error["param"], "previous_response_id");
        assert_eq!(app.row_counts().await, before);
        // Text alone is sized and served.
        assert_eq!(
            app.chat(&user, &chat_body("mock-1", "plain text"))
                .await
                .status(),
            200
        );
    })
    .await;
}

#[tokio::test]
async fn an_oversized_model_name_is_refused_at_the_edge() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("longname");
        app.grant("longname", "100").await;
        let before = app.row_counts().await;
        let model = format!("mock-{}", "x".repeat(4096));
        let error = openai_error(app.chat(&user, &chat_body(&model, "hi")).await, 400).await;
        assert_eq!(error["param"], "model");
        assert_eq!(app.row_counts().await, before);
        // Later requests are served and settled as usual.
        assert_eq!(
            app.chat(&user, &chat_body("mock-1", "hi")).await.status(),
            200
        );
        app.settled_balance(&user).await;
        app.assert_ledger_consistent().await;
    })
    .await;
}
