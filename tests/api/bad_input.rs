//! docs/architecture.md I6: bad input is answered with a clear error in OpenAI's shape and changes nothing;
//! good input reaches the upstream untouched, with the gateway's credential, never the caller's.

use serde_json::{Value, json};

use crate::helpers::*;

/// What a user can see of their account, to compare before and after.
#[derive(Debug, PartialEq)]
struct Visible {
    balance: Value,
    transactions: Vec<Value>,
    usage: Vec<Value>,
}

async fn visible(app: &TestApp, bearer: &str) -> Visible {
    Visible {
        balance: app.settled_balance(bearer).await,
        transactions: app
            .list("/api/credits/transactions?limit=100", bearer)
            .await,
        usage: app.list("/api/credits/usage?limit=100", bearer).await,
    }
}

async fn post_raw(
    app: &TestApp,
    path: &str,
    bearer: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .bearer_auth(bearer)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent")
}

const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

#[tokio::test]
async fn bad_requests_are_refused_in_openai_shape_and_change_nothing() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        app.grant("alice", "10").await;
        // One real request first, so there is usage to keep unchanged.
        assert_eq!(
            app.chat(&alice, &chat_body("mock-1", "a real request"))
                .await
                .status(),
            200
        );
        let before = visible(&app, &alice).await;
        assert_eq!(before.usage.len(), 1);
        assert_eq!(before.transactions.len(), 2);
        let upstream_calls = app.upstream.log.requests().len();
        assert_eq!(upstream_calls, 1);

        for path in ENDPOINTS {
            let error = openai_error(
                post_raw(&app, path, &alice, "{\"model\": \"mock-1\",").await,
                400,
            )
            .await;
            assert_eq!(error["type"], "invalid_request_error", "{path}: {error}");
            let message = error["message"].as_str().expect("message");
            assert!(message.to_lowercase().contains("json"), "{path}: {message}");

            let error = openai_error(post_raw(&app, path, &alice, "[1, 2, 3]").await, 400).await;
            assert_eq!(error["type"], "invalid_request_error", "{path}: {error}");

            let error = openai_error(post_raw(&app, path, &alice, "").await, 400).await;
            assert_eq!(error["type"], "invalid_request_error", "{path}: {error}");

            let missing_model = json!({
                "messages": [{"role": "user", "content": "hi"}], "input": "hi", "prompt": "hi"
            });
            let error = openai_error(app.post(path, &alice, &missing_model).await, 400).await;
            assert_eq!(error["param"], "model", "{path}: {error}");

            for model in [json!(""), json!(42), json!(null)] {
                let body = json!({"model": model, "messages": [], "input": "hi", "prompt": "hi"});
                let error = openai_error(app.post(path, &alice, &body).await, 400).await;
                assert_eq!(error["param"], "model", "{path} {model}: {error}");
            }

            let unknown = json!({
                "model": "gpt-nope",
                "messages": [{"role": "user", "content": "hi"}],
                "input": "hi",
                "prompt": "hi"
            });
            let error = openai_error(app.post(path, &alice, &unknown).await, 404).await;
            assert_eq!(error["code"], "model_not_found", "{path}: {error}");
            assert_eq!(error["param"], "model", "{path}: {error}");
            assert!(
                error["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("gpt-nope")),
                "{error}"
            );
        }

        // Larger than the test config's 65536-byte limit, although valid JSON.
        let big = chat_body("mock-1", &"word ".repeat(14_000));
        assert!(serde_json::to_vec(&big).expect("json").len() > 65_536);
        let error = openai_error(app.chat(&alice, &big).await, 413).await;
        assert_eq!(error["code"], "request_too_large");

        // Bad paging parameters.
        for (query, param) in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("cursor=abc", "cursor"),
        ] {
            for list in ["transactions", "usage"] {
                let response = app
                    .get(&format!("/api/credits/{list}?{query}"), &alice)
                    .await;
                let error = openai_error(response, 400).await;
                assert_eq!(error["param"], param, "{list}?{query}: {error}");
            }
        }

        assert_eq!(
            app.upstream.log.requests().len(),
            upstream_calls,
            "bad input reached the upstream"
        );
        let after = visible(&app, &alice).await;
        assert_eq!(after, before);
        assert_eq!(after.balance["held"], "0");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_paging_parameter_of_the_wrong_type_is_answered_in_openai_shape() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        app.grant("alice", "1").await;
        for query in ["limit=abc", "limit=-1", "limit=99999999999"] {
            let response = app
                .get(&format!("/api/credits/transactions?{query}"), &alice)
                .await;
            let error = openai_error(response, 400).await;
            assert_eq!(error["param"], "limit", "{query}: {error}");
        }
        assert_eq!(app.list("/api/credits/transactions", &alice).await.len(), 1);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_wrong_method_is_answered_in_openai_shape() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        let response = app.get("/v1/chat/completions", &alice).await;
        let error = openai_error(response, 405).await;
        assert_eq!(error["type"], "invalid_request_error");
        assert!(app.upstream.log.requests().is_empty());
    })
    .await;
}

#[tokio::test]
async fn unknown_fields_pass_through_to_the_upstream_untouched() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        app.grant("alice", "10").await;
        let body = json!({
            "model": "mock-1",
            "messages": [{"role": "user", "content": "keep my fields"}],
            "max_tokens": 4,
            "custom_field": {"nested": [1, 2, 3]},
            "temperature": 0.5,
        });
        let response = app.chat(&alice, &body).await;
        assert_eq!(response.status(), 200);
        let reply: Value = response.json().await.expect("json");
        assert_eq!(reply["usage"]["completion_tokens"], 4);

        let sent = app.upstream.log.requests();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].path, "/v1/chat/completions");
        assert_eq!(sent[0].method, "POST");
        assert_eq!(sent[0].body, body, "the upstream got a different body");
        assert_eq!(sent[0].body["temperature"], json!(0.5));
        assert_eq!(sent[0].body["custom_field"], json!({"nested": [1, 2, 3]}));
        app.settled_balance(&alice).await;
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn the_upstream_gets_the_gateway_key_never_the_callers_credential() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        app.grant("alice", "10").await;
        let response = app
            .post(
                "/admin/accounts/alice/keys",
                ADMIN_TOKEN,
                &json!({"name": "leak-check"}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let key: Value = response.json().await.expect("json");
        let api_key = key["key"].as_str().expect("key").to_owned();

        for bearer in [alice.as_str(), api_key.as_str()] {
            assert_eq!(
                app.chat(bearer, &chat_body("mock-1", "who am i"))
                    .await
                    .status(),
                200
            );
            let mut stream = chat_body("mock-1", "who am i");
            stream["stream"] = json!(true);
            let response = app.chat(bearer, &stream).await;
            assert_eq!(response.status(), 200);
            let streamed = response.bytes().await.expect("stream body");
            assert!(streamed.ends_with(b"data: [DONE]\n\n"), "a whole stream");
            assert_eq!(
                app.post(
                    "/v1/embeddings",
                    bearer,
                    &json!({"model": "mock-1", "input": "x"})
                )
                .await
                .status(),
                200
            );
        }

        let sent = app.upstream.log.requests();
        assert_eq!(sent.len(), 6);
        for request in &sent {
            let authorizations: Vec<&str> = request
                .headers
                .iter()
                .filter(|(name, _)| name == "authorization")
                .map(|(_, value)| value.as_str())
                .collect();
            assert_eq!(
                authorizations,
                [format!("Bearer {UPSTREAM_KEY}")],
                "{}",
                request.path
            );
            for (name, value) in &request.headers {
                assert!(
                    !value.contains(&alice) && !value.contains(&api_key),
                    "caller credential leaked upstream in header {name}"
                );
            }
            let body = request.body.to_string();
            assert!(!body.contains(&alice) && !body.contains(&api_key));
        }
        app.settled_balance(&alice).await;
        app.assert_ledger_consistent().await;
    })
    .await;
}
