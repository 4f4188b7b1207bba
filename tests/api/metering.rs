//! Metering through the real HTTP path: holds, exact settlement, counted usage, pricing.

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn a_chat_completion_is_billed_exactly_from_reported_usage() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        app.grant("alice", "100").await;

        let response = app
            .chat(&alice, &chat_body("mock-1", "hello there gateway"))
            .await;
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let body: Value = response.json().await.expect("json");
        let prompt = body["usage"]["prompt_tokens"]
            .as_u64()
            .expect("prompt tokens");
        let completion = body["usage"]["completion_tokens"]
            .as_u64()
            .expect("completion tokens");

        let balance = app.settled_balance(&alice).await;
        // 1 credit per 1000 tokens by default.
        let expected = rust_decimal::Decimal::from(100)
            - rust_decimal::Decimal::new((prompt + completion) as i64, 3);
        assert_eq!(credits(&balance["balance"]), expected);
        assert_eq!(balance["held"], "0");

        let usage = app.list("/api/credits/usage", &alice).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["request_id"], request_id.as_str());
        assert_eq!(usage[0]["source"], "reported");
        assert_eq!(usage[0]["prompt_tokens"], prompt);
        assert_eq!(usage[0]["completion_tokens"], completion);
        assert_eq!(usage[0]["upstream"], "fake");

        let transactions = app.list("/api/credits/transactions", &alice).await;
        assert_eq!(transactions.len(), 2, "{transactions:?}");
        assert_eq!(transactions[0]["type"], "usage");
        assert_eq!(transactions[0]["reference"], request_id.as_str());
        assert_eq!(transactions[0]["balance_before"], "100");
        assert_eq!(credits(&transactions[0]["balance_after"]), expected);
        assert_eq!(transactions[1]["type"], "bonus");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn no_usage_from_the_upstream_means_tokens_are_counted() {
    run_test(async || {
        let app = spawn_app().await;
        let bob = token("bob");
        app.grant("bob", "10").await;
        let response = app
            .chat(&bob, &chat_body("mock-nousage", "count me please"))
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert!(
            body.get("usage").is_none(),
            "the mock reported usage: {body}"
        );
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");

        app.settled_balance(&bob).await;
        let usage = app.list("/api/credits/usage", &bob).await;
        assert_eq!(usage[0]["source"], "counted");
        assert_eq!(
            usage[0]["completion_tokens"],
            tollgate::proxy::tokens::count_text("mock-nousage", text)
        );
        let request = chat_body("mock-nousage", "count me please");
        let prompt = tollgate::proxy::tokens::count_prompt(
            tollgate::proxy::Endpoint::ChatCompletions,
            "mock-nousage",
            &request,
        );
        assert_eq!(usage[0]["prompt_tokens"], prompt);
        assert!(usage[0]["cost"] != "0");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn per_model_prices_apply() {
    run_test(async || {
        let app = spawn_app().await;
        let carol = token("carol");
        app.grant("carol", "50").await;
        let response = app
            .chat(&carol, &chat_body("mock-pricey", "expensive words"))
            .await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        let prompt = body["usage"]["prompt_tokens"].as_i64().expect("prompt");
        let completion = body["usage"]["completion_tokens"]
            .as_i64()
            .expect("completion");
        app.settled_balance(&carol).await;
        let usage = app.list("/api/credits/usage", &carol).await;
        // 10 per 1k prompt, 20 per 1k completion.
        let expected = rust_decimal::Decimal::new(prompt * 10 + completion * 20, 3);
        assert_eq!(credits(&usage[0]["cost"]), expected);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn an_unaffordable_request_is_refused_with_402_and_costs_nothing() {
    run_test(async || {
        let app = spawn_app().await;
        let dave = token("dave");
        app.grant("dave", "0.01").await;
        let response = app
            .chat(
                &dave,
                &json!({
                    "model": "mock-1",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 100000
                }),
            )
            .await;
        let error = openai_error(response, 402).await;
        assert_eq!(error["code"], "insufficient_credits");
        let message = error["message"].as_str().expect("message");
        assert!(message.contains("balance 0.01"), "{message}");
        assert!(
            app.upstream.log.requests().is_empty(),
            "the upstream was called"
        );
        let balance = app.settled_balance(&dave).await;
        assert_eq!(balance["balance"], "0.01");
        assert_eq!(app.list("/api/credits/transactions", &dave).await.len(), 1);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn cap_max_tokens_policy_lowers_the_cap_instead_of_refusing() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "on_insufficient = \"cap_max_tokens\"".into(),
            ..Options::default()
        })
        .await;
        let erin = token("erin");
        app.grant("erin", "0.1").await;
        let response = app
            .chat(
                &erin,
                &json!({
                    "model": "mock-1",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 100000
                }),
            )
            .await;
        assert_eq!(response.status(), 200);
        let sent = app.upstream.log.last().expect("upstream called");
        let cap = sent.body["max_tokens"].as_u64().expect("max_tokens sent");
        assert!(cap < 100 && cap > 0, "cap {cap}");
        let balance = app.settled_balance(&erin).await;
        assert!(!credits(&balance["balance"]).is_sign_negative());
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// With several choices the affordable output is shared: each gets the same, lower cap, and
/// together they stay within the balance.
#[tokio::test]
async fn cap_max_tokens_policy_shares_the_affordable_output_among_the_choices() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "on_insufficient = \"cap_max_tokens\"".into(),
            ..Options::default()
        })
        .await;
        let user = token("chooser");
        // 0.1 credits at 1 credit per 1000 tokens: 100 tokens, prompt included.
        app.grant("chooser", "0.1").await;
        let ask = |n: u64| {
            json!({"model": "mock-1", "n": n, "max_tokens": 100000,
                   "messages": [{"role": "user", "content": "hi"}]})
        };
        let mut caps = Vec::new();
        for n in [1, 3] {
            let response = app.chat(&user, &ask(n)).await;
            assert_eq!(response.status(), 200, "n = {n}");
            let sent = app.upstream.log.last().expect("upstream called");
            caps.push(sent.body["max_tokens"].as_u64().expect("max_tokens sent"));
            // Give back what the request cost, so both see the same balance.
            app.settled_balance(&user).await;
            let usage = app.list("/api/credits/usage", &user).await;
            app.grant("chooser", usage[0]["cost"].as_str().expect("cost"))
                .await;
        }
        let (one, three) = (caps[0], caps[1]);
        assert!(one > 0 && one < 100, "one choice: cap {one}");
        assert_eq!(three, one / 3, "three choices share one choice's output");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn upstream_error_before_output_is_free_and_releases_the_hold() {
    run_test(async || {
        let app = spawn_app().await;
        let fay = token("fay");
        app.grant("fay", "5").await;
        let response = app.chat(&fay, &chat_body("mock-error500", "fail")).await;
        assert_eq!(response.status(), 500);
        let mut stream = chat_body("mock-error500", "fail");
        stream["stream"] = json!(true);
        assert_eq!(app.chat(&fay, &stream).await.status(), 500);
        let balance = app.settled_balance(&fay).await;
        assert_eq!(balance["balance"], "5");
        assert_eq!(balance["available"], "5");
        assert!(app.list("/api/credits/usage", &fay).await.is_empty());
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn embeddings_completions_and_responses_are_billed() {
    run_test(async || {
        let app = spawn_app().await;
        let gus = token("gus");
        app.grant("gus", "10").await;
        let embeddings = app
            .post(
                "/v1/embeddings",
                &gus,
                &json!({"model": "mock-1", "input": ["a b c", "d e"]}),
            )
            .await;
        assert_eq!(embeddings.status(), 200);
        let completions = app
            .post(
                "/v1/completions",
                &gus,
                &json!({"model": "mock-1", "prompt": "say", "max_tokens": 5}),
            )
            .await;
        assert_eq!(completions.status(), 200);
        let responses = app
            .post(
                "/v1/responses",
                &gus,
                &json!({"model": "mock-1", "input": "hi", "max_output_tokens": 7}),
            )
            .await;
        assert_eq!(responses.status(), 200);
        let streamed = app
            .post(
                "/v1/responses",
                &gus,
                &json!({"model": "mock-1", "input": "hi", "max_output_tokens": 4, "stream": true}),
            )
            .await;
        assert_eq!(streamed.status(), 200);
        let events = String::from_utf8(streamed.bytes().await.expect("stream body").to_vec())
            .expect("utf-8 events");
        assert!(events.contains("response.completed"), "{events}");
        app.settled_balance(&gus).await;
        let usage = app.list("/api/credits/usage", &gus).await;
        let mut endpoints: Vec<&str> = usage
            .iter()
            .map(|u| u["endpoint"].as_str().expect("endpoint"))
            .collect();
        endpoints.sort();
        assert_eq!(
            endpoints,
            ["completions", "embeddings", "responses", "responses"]
        );
        for record in &usage {
            assert_eq!(record["source"], "reported", "{record}");
        }
        let embedding = usage
            .iter()
            .find(|u| u["endpoint"] == "embeddings")
            .expect("embedding usage");
        assert_eq!(embedding["completion_tokens"], 0);
        let streamed = usage
            .iter()
            .find(|u| u["endpoint"] == "responses" && u["stream"] == true)
            .expect("stream usage");
        assert_eq!(streamed["completion_tokens"], 4);
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// A client that gives up before a non-streamed answer arrives does not stop the upstream's
/// (billed) work: by default the call finishes and its reported usage is billed.
#[tokio::test]
async fn a_client_that_gives_up_before_the_answer_is_billed_what_the_upstream_reports() {
    run_test(async || {
        let app = spawn_app().await;
        let gail = token("gail");
        app.grant("gail", "10").await;
        // Once the tokenizer is loaded, the request reaches the upstream well within the timeout.
        assert_eq!(
            app.chat(&gail, &chat_body("mock-1", "warm up"))
                .await
                .status(),
            200
        );
        let gave_up = app
            .client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&gail)
            .json(&chat_body("mock-late", "answer me slowly"))
            .timeout(std::time::Duration::from_millis(100))
            .send()
            .await;
        assert!(gave_up.is_err(), "the client gave up before the answer");

        let usage = eventually(std::time::Duration::from_secs(5), async || {
            let usage: Vec<Value> = app
                .list("/api/credits/usage", &gail)
                .await
                .into_iter()
                .filter(|u| u["model"] == "mock-late")
                .collect();
            match usage.is_empty() {
                true => Err("never billed".to_owned()),
                false => Ok(usage),
            }
        })
        .await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["source"], "reported");
        assert_eq!(usage[0]["status"], "completed");
        assert_eq!(usage[0]["completion_tokens"], 16);
        let balance = app.settled_balance(&gail).await;
        assert_eq!(balance["held"], "0");
        app.assert_ledger_consistent().await;
    })
    .await;
}
