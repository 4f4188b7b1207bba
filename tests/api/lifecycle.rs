//! The gateway's life: graceful shutdown flushes every settlement, readiness, pricing hot
//! reload, the model list, request ids, and accounts created on first sight.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate::domain::AccountId;
use tollgate::ledger::Page;

use crate::helpers::*;

fn request_id(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("no x-request-id on a {} answer", response.status()))
        .to_str()
        .expect("ascii request id")
        .to_owned()
}

/// Replaces `path` atomically (write a sibling, rename over), as an editor or a deploy would.
fn replace_file(path: &Path, text: &str) {
    let staging = path.with_extension("toml.new");
    std::fs::write(&staging, text).expect("write staging file");
    std::fs::rename(&staging, path).expect("rename over");
}

fn pricing_with_mock_1_at(price: &str) -> String {
    format!(
        "rounding = \"exact\"\ndefault_max_output_tokens = 256\n[default]\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\n[[models]]\nmatch = \"mock-1\"\nprompt_per_1k = \"{price}\"\ncompletion_per_1k = \"{price}\"\n"
    )
}

/// Makes one priced request, waits for its settlement and returns its usage record.
async fn priced_request(app: &TestApp, bearer: &str) -> Value {
    let response = app
        .chat(bearer, &chat_body("mock-1", "what does this cost now"))
        .await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    app.settled_balance(bearer).await;
    let usage = app.list("/api/credits/usage", bearer).await;
    assert_eq!(usage[0]["request_id"], id.as_str(), "newest usage record");
    usage[0].clone()
}

/// The cost of `record`'s tokens at `per_1k` credits per 1000 prompt and completion tokens.
fn cost_at(record: &Value, per_1k: i64) -> Decimal {
    let tokens = record["prompt_tokens"].as_i64().expect("prompt")
        + record["completion_tokens"].as_i64().expect("completion");
    Decimal::new(tokens * per_1k, 3)
}

/// Makes requests until one is charged at `per_1k`, for at most 5 seconds.
async fn wait_for_price(app: &TestApp, bearer: &str, per_1k: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let record = priced_request(app, bearer).await;
        if credits(&record["cost"]) == cost_at(&record, per_1k) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "price {per_1k} never applied: last record {record}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_writes_every_settlement() {
    let mut app = spawn_app().await;
    let alice = token("alice");
    app.grant("alice", "100").await;

    let body = chat_body("mock-1", "settle me before you go");
    let responses = join_all((0..20).map(|_| app.chat(&alice, &body))).await;
    let mut ids = HashSet::new();
    for response in &responses {
        assert_eq!(response.status(), 200);
        ids.insert(request_id(response));
    }
    assert_eq!(ids.len(), 20);
    app.stop().await;

    let ledger = app.reopen_ledger().await;
    let account = AccountId::parse("alice").expect("id");
    let usage = ledger
        .usage(
            &account,
            Page {
                limit: 100,
                before: None,
            },
        )
        .await
        .expect("usage");
    assert_eq!(usage.len(), 20);
    let settled: HashSet<String> = usage.iter().map(|u| u.request_id.clone()).collect();
    assert_eq!(settled, ids);
    let spent: i64 = usage.iter().map(|u| u.cost.micros()).sum();
    assert!(spent > 0);
    let record = ledger
        .account(&account)
        .await
        .expect("account")
        .expect("exists");
    assert_eq!(record.balance.micros(), 100_000_000 - spent);
    let entries = ledger
        .transactions(
            &account,
            Page {
                limit: 100,
                before: None,
            },
        )
        .await
        .expect("entries");
    assert_eq!(entries.len(), 21);
    let problems = ledger
        .verify(app.config.metering.overdraft)
        .await
        .expect("verify");
    assert!(problems.is_empty(), "{problems:?}");
}

#[tokio::test]
async fn readyz_answers_without_a_credential() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "ready");
}

#[tokio::test]
async fn pricing_reloads_while_running_and_a_bad_file_keeps_the_last_good_prices() {
    let app = spawn_app().await;
    let alice = token("alice");
    app.grant("alice", "1000").await;

    // The test pricing: 1 credit per 1000 tokens.
    let record = priced_request(&app, &alice).await;
    assert_eq!(credits(&record["cost"]), cost_at(&record, 1));

    replace_file(&app.pricing_path, &pricing_with_mock_1_at("100"));
    wait_for_price(&app, &alice, 100).await;
    let version = app.state.meter.pricing().version();

    // An invalid edit: rejected, requests keep working at the last good price.
    replace_file(
        &app.pricing_path,
        "rounding = \"exact\"\n[default]\nprompt_per_1k = \"abc\"\ncompletion_per_1k = \"1\"\n",
    );
    let until = Instant::now() + Duration::from_millis(400);
    let mut checked = 0;
    while Instant::now() < until || checked < 3 {
        let record = priced_request(&app, &alice).await;
        assert_eq!(credits(&record["cost"]), cost_at(&record, 100), "{record}");
        checked += 1;
    }
    assert_eq!(app.state.meter.pricing().version(), version);

    // The watcher is still alive: a good file applies again.
    replace_file(&app.pricing_path, &pricing_with_mock_1_at("7"));
    wait_for_price(&app, &alice, 7).await;

    let balance = app.settled_balance(&alice).await;
    let usage = app.list("/api/credits/usage?limit=100", &alice).await;
    let spent: Decimal = usage.iter().map(|u| credits(&u["cost"])).sum();
    assert_eq!(credits(&balance["balance"]), Decimal::from(1000) - spent);
    app.assert_ledger_consistent().await;
}

#[tokio::test]
async fn models_lists_the_routed_models_with_their_prices() {
    let app = spawn_app().await;
    let response = app.get("/v1/models", &token("alice")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().expect("data");
    let mock = data
        .iter()
        .find(|m| m["id"] == "mock-*")
        .unwrap_or_else(|| panic!("no mock-* in {body}"));
    assert_eq!(mock["object"], "model");
    assert_eq!(mock["owned_by"], "fake");
    let pricing = &mock["pricing"];
    assert!(pricing.is_object(), "{mock}");
    assert_eq!(credits(&pricing["prompt_per_1k"]), Decimal::ONE);
    assert_eq!(credits(&pricing["completion_per_1k"]), Decimal::ONE);
    // Listing models costs nothing and calls no upstream.
    assert!(app.upstream.log.requests().is_empty());
}

#[tokio::test]
async fn every_response_carries_its_own_request_id() {
    let app = spawn_app().await;
    let alice = token("alice");
    let poor = token("poor");
    app.grant("alice", "10").await;
    let mut ids = Vec::new();

    let ok = app.chat(&alice, &chat_body("mock-1", "an id please")).await;
    assert_eq!(ok.status(), 200);
    let chat_id = request_id(&ok);
    ids.push(chat_id.clone());

    let mut answers = vec![
        app.chat(&alice, &chat_body("mock-1", "another one")).await,
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("healthz"),
        app.client
            .post(app.url("/v1/chat/completions"))
            .json(&chat_body("mock-1", "no credential"))
            .send()
            .await
            .expect("401"),
        app.get("/v1/nope", &alice).await,
        app.client
            .post(app.url("/v1/chat/completions"))
            .bearer_auth(&alice)
            .body("{bad json")
            .send()
            .await
            .expect("400"),
        app.chat(&alice, &chat_body("gpt-nope", "unknown")).await,
        app.chat(&poor, &chat_body("mock-1", "no money")).await,
        app.chat(&alice, &chat_body("mock-error500", "upstream fails"))
            .await,
        app.get("/admin/accounts/alice", &alice).await,
    ];
    let statuses: Vec<u16> = answers.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [200, 200, 401, 404, 400, 404, 402, 500, 403]);
    for answer in answers.drain(..) {
        let id = request_id(&answer);
        assert!(!id.is_empty());
        ids.push(id);
    }
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "request ids repeat: {ids:?}");

    app.settled_balance(&alice).await;
    let usage = app.list("/api/credits/usage", &alice).await;
    assert_eq!(usage.len(), 2);
    assert!(usage.iter().any(|u| u["request_id"] == chat_id.as_str()));
    let transactions = app.list("/api/credits/transactions", &alice).await;
    assert!(
        transactions
            .iter()
            .any(|t| t["type"] == "usage" && t["reference"] == chat_id.as_str())
    );
    app.assert_ledger_consistent().await;
}

#[tokio::test]
async fn a_new_account_starts_at_zero_without_a_signup_grant() {
    let app = spawn_app().await;
    let newbie = token("newbie");
    let id = AccountId::parse("newbie").expect("id");
    assert!(app.ledger.account(&id).await.expect("ledger").is_none());

    let balance = app.balance(&newbie).await;
    assert_eq!(balance["account"], "newbie");
    assert_eq!(balance["balance"], "0");
    assert_eq!(balance["held"], "0");
    assert_eq!(balance["available"], "0");
    assert!(
        app.list("/api/credits/transactions", &newbie)
            .await
            .is_empty()
    );
    let record = app
        .ledger
        .account(&id)
        .await
        .expect("ledger")
        .expect("created on first sight");
    assert_eq!(record.balance.micros(), 0);

    let error = openai_error(app.chat(&newbie, &chat_body("mock-1", "free?")).await, 402).await;
    assert_eq!(error["code"], "insufficient_credits");
    assert!(app.upstream.log.requests().is_empty());
    app.assert_ledger_consistent().await;
}

fn signup_grant_options() -> Options {
    Options {
        extra: "[accounts]\nsignup_grant = \"3\"".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_new_account_gets_the_signup_grant_once() {
    let app = spawn_app_with(signup_grant_options()).await;
    let fresh = token("fresh");
    let balance = app.balance(&fresh).await;
    assert_eq!(balance["balance"], "3");
    assert_eq!(balance["available"], "3");
    let transactions = app.list("/api/credits/transactions", &fresh).await;
    assert_eq!(transactions.len(), 1, "{transactions:?}");
    assert_eq!(transactions[0]["type"], "bonus");
    assert_eq!(transactions[0]["amount"], "3");
    assert_eq!(transactions[0]["balance_before"], "0");
    assert_eq!(transactions[0]["balance_after"], "3");

    for _ in 0..4 {
        let response = app
            .chat(&fresh, &json!({"model": "mock-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}))
            .await;
        assert_eq!(response.status(), 200);
    }
    let balance = app.settled_balance(&fresh).await;
    let transactions = app.list("/api/credits/transactions", &fresh).await;
    let bonuses = transactions.iter().filter(|t| t["type"] == "bonus").count();
    assert_eq!(bonuses, 1, "{transactions:?}");
    assert_eq!(transactions.len(), 5);
    let usage = app.list("/api/credits/usage", &fresh).await;
    let spent: Decimal = usage.iter().map(|u| credits(&u["cost"])).sum();
    assert_eq!(credits(&balance["balance"]), Decimal::from(3) - spent);
    app.assert_ledger_consistent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_first_requests_create_each_account_once() {
    let app = spawn_app_with(signup_grant_options()).await;
    // Sixteen new users at once, and one new user sixteen times at once.
    let users: Vec<String> = (0..16).map(|i| format!("racer-{i}")).collect();
    let twin = token("twin");
    let mut bearers: Vec<String> = users.iter().map(|u| token(u)).collect();
    bearers.extend(std::iter::repeat_n(twin.clone(), 16));

    let calls = join_all(bearers.iter().map(|bearer| async {
        let response = app.get("/api/credits/balance", bearer).await;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }));
    let answers = tokio::time::timeout(Duration::from_secs(20), calls)
        .await
        .expect("first-sight requests hung");
    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["balance"], "3", "{body}");
    }
    for bearer in users.iter().map(|u| token(u)).chain([twin]) {
        let transactions = app.list("/api/credits/transactions", &bearer).await;
        assert_eq!(transactions.len(), 1, "{transactions:?}");
        assert_eq!(transactions[0]["type"], "bonus");
    }
    app.assert_ledger_consistent().await;
}
