//! The gateway's life: graceful shutdown flushes every settlement, readiness, pricing hot
//! reload, the model list, request ids, and accounts created on first sight.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// The account's usage records (up to 100), read straight from the ledger.
async fn usage_of(
    ledger: &dyn tollgate::ledger::Ledger,
    account: &AccountId,
) -> Vec<tollgate::ledger::UsageRecord> {
    let page = Page {
        limit: 100,
        before: None,
    };
    ledger.usage(account, page).await.expect("usage")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_writes_every_settlement() {
    run_test(async || {
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
        let usage = usage_of(&*ledger, &account).await;
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
    })
    .await;
}

#[tokio::test]
async fn readyz_answers_without_a_credential() {
    run_test(async || {
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
        assert_eq!(
            body["checks"],
            json!({"ledger": "ok", "balance_cache": "ok"})
        );
    })
    .await;
}

#[tokio::test]
async fn pricing_reloads_while_running_and_a_bad_file_keeps_the_last_good_prices() {
    run_test(async || {
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
    })
    .await;
}

#[tokio::test]
async fn models_lists_the_routed_models_with_their_prices() {
    run_test(async || {
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
    })
    .await;
}

#[tokio::test]
async fn every_response_carries_its_own_request_id() {
    run_test(async || {
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
    })
    .await;
}

#[tokio::test]
async fn a_new_account_starts_at_zero_without_a_signup_grant() {
    run_test(async || {
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
    })
    .await;
}

fn signup_grant_options() -> Options {
    Options {
        extra: "[accounts]\nsignup_grant = \"3\"".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_new_account_gets_the_signup_grant_once() {
    run_test(async || {
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

        let small = json!({
            "model": "mock-1",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8
        });
        for _ in 0..4 {
            let response = app.chat(&fresh, &small).await;
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
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_first_requests_create_each_account_once() {
    run_test(async || {
        let app = spawn_app_with(signup_grant_options()).await;
        // Sixteen new users at once, and one new user sixteen times at once.
        let users: Vec<String> = (0..16).map(|i| format!("racer-{i}")).collect();
        let twin = token("twin");
        let mut bearers: Vec<String> = users.iter().map(|u| token(u)).collect();
        bearers.extend(std::iter::repeat_n(twin.clone(), 16));

        let calls = join_all(bearers.iter().map(|bearer| async {
            let response = app.get("/api/credits/balance", bearer).await;
            let status = response.status();
            let body: Value = response.json().await.expect("a JSON answer");
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
    })
    .await;
}

/// Streams still open when the grace period ends are cut, billed for what they delivered, and
/// written before the gateway exits (the settler stops last).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_cut_at_the_end_of_the_grace_period_are_billed() {
    run_test(async || {
        use futures_util::StreamExt;
        let mut app = spawn_app_with(Options {
            shutdown_grace_secs: 1,
            ..Options::default()
        })
        .await;
        let alice = token("alice");
        app.grant("alice", "100").await;
        // 200 words at 50 ms each would take 10 s: far longer than the grace period.
        let body = serde_json::json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "a long slow answer"}],
            "max_tokens": 200,
            "stream": true
        });
        let mut readers = Vec::new();
        for _ in 0..3 {
            let response = app.chat(&alice, &body).await;
            assert_eq!(response.status(), 200);
            let mut stream = response.bytes_stream();
            let first = stream.next().await.expect("a first chunk").expect("chunk");
            readers.push(tokio::spawn(async move {
                let mut received = first.to_vec();
                let mut broken = false;
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(chunk) => received.extend_from_slice(&chunk),
                        Err(_) => {
                            broken = true;
                            break;
                        }
                    }
                }
                (received, broken)
            }));
        }
        let stopping = Instant::now();
        app.stop().await;
        assert!(
            stopping.elapsed() < Duration::from_secs(6),
            "shutdown waited for the streams to finish by themselves"
        );
        let mut delivered = Vec::new();
        for reader in readers {
            let (received, broken) = reader.await.expect("reader");
            assert!(broken, "a cut stream must not look complete to its client");
            let words = sse_json(&received)
                .iter()
                .filter(|c| c["choices"][0]["delta"]["content"].is_string())
                .count();
            delivered.push(words);
        }

        let ledger = app.reopen_ledger().await;
        let account = AccountId::parse("alice").expect("id");
        let usage = usage_of(&*ledger, &account).await;
        assert_eq!(usage.len(), 3, "every cut stream is billed");
        for record in &usage {
            assert_eq!(record.status, "cut_at_shutdown");
            assert!(
                record.completion_tokens > 0 && record.completion_tokens < 200,
                "billed for what it delivered: {record:?} (delivered {delivered:?})"
            );
        }
        let problems = ledger
            .verify(app.config.metering.overdraft)
            .await
            .expect("verify");
        assert!(problems.is_empty(), "{problems:?}");
    })
    .await;
}

/// I4: a `kill -9` while requests flow loses none whose answer was delivered. On the embedded
/// default the answer waits for the SQLite commit; with Redis for its journal record, which the
/// surviving instance writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_loses_no_request_whose_answer_was_delivered() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "recovery_interval_ms = 200\norphan_after_secs = 1".into(),
            ..Options::default()
        })
        .await;
        let user = token("killed");
        app.grant("killed", "1000").await;
        let (mut child, base) = spawn_binary(&app).await;
        // The first request waits for the tokenizer to load.
        let warm_up = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&user)
            .json(&chat_body("mock-1", "warm up"))
            .send()
            .await
            .expect("warm-up request");
        assert_eq!(warm_up.status(), 200);

        // Eight clients send requests back to back, each noting the requests it got whole.
        // Until the kill, every request must be answered whole.
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let whole_answers = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for worker in 0..8 {
            let (base, user) = (base.clone(), user.clone());
            let (stop, killed, whole_answers) =
                (stop.clone(), killed.clone(), whole_answers.clone());
            workers.push(tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut delivered = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let mut body = chat_body("mock-1", "deliver me");
                    if worker % 2 == 1 {
                        body["stream"] = json!(true);
                    }
                    let response = match client
                        .post(format!("{base}/v1/chat/completions"))
                        .bearer_auth(&user)
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(response) => response,
                        Err(error) => {
                            assert!(killed.load(Ordering::SeqCst), "before the kill: {error}");
                            break;
                        }
                    };
                    let id = response.headers()["x-request-id"]
                        .to_str()
                        .expect("id")
                        .to_owned();
                    let status = response.status();
                    let bytes = match response.bytes().await {
                        Ok(bytes) => bytes,
                        Err(error) => {
                            assert!(killed.load(Ordering::SeqCst), "before the kill: {error}");
                            break;
                        }
                    };
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
                    let whole = if worker % 2 == 1 {
                        String::from_utf8_lossy(&bytes).contains("data: [DONE]")
                    } else {
                        serde_json::from_slice::<Value>(&bytes).is_ok()
                    };
                    if whole {
                        delivered.push(id);
                        whole_answers.fetch_add(1, Ordering::SeqCst);
                    } else {
                        assert!(
                            killed.load(Ordering::SeqCst),
                            "cut short before the kill: {}",
                            String::from_utf8_lossy(&bytes)
                        );
                    }
                }
                delivered
            }));
        }
        // The kill comes once traffic flows (at least forty answers delivered), not after a
        // guessed while.
        eventually(Duration::from_secs(20), async || {
            let answered = whole_answers.load(Ordering::SeqCst);
            match answered >= 40 {
                true => Ok(()),
                false => Err(format!("only {answered} answers delivered")),
            }
        })
        .await;
        killed.store(true, Ordering::SeqCst);
        child.start_kill().expect("kill -9");
        child.wait().await.expect("reaped");
        stop.store(true, Ordering::SeqCst);
        let mut delivered = Vec::new();
        for worker in workers {
            delivered.extend(worker.await.expect("worker"));
        }
        assert!(
            delivered.len() > 20,
            "too little traffic: {}",
            delivered.len()
        );

        // The surviving instance (or, on the embedded default, the commit before the answer)
        // has every delivered request in the ledger, each once.
        eventually(Duration::from_secs(20), async || {
            let usage = app.list("/api/credits/usage?limit=100", &user).await;
            let ids: Vec<&str> = usage
                .iter()
                .map(|u| u["request_id"].as_str().expect("id"))
                .collect();
            let settled: HashSet<&str> = ids.iter().copied().collect();
            assert_eq!(settled.len(), ids.len(), "a request billed twice");
            let missing: Vec<&String> = delivered
                .iter()
                .filter(|id| !settled.contains(id.as_str()))
                .collect();
            match missing.is_empty() {
                true => Ok(()),
                false => Err(format!(
                    "{} of {} delivered answers are not in the ledger: {missing:?}",
                    missing.len(),
                    delivered.len()
                )),
            }
        })
        .await;
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// Text logs written to a pipe or a file carry no terminal colour codes.
#[tokio::test]
async fn text_logs_to_a_pipe_have_no_colour_codes() {
    run_test(async || {
        let app = spawn_app().await;
        let (mut child, mut lines) = serve_binary(&app.config_path);
        let line = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                if line.contains("tollgate listening") {
                    return line;
                }
            }
            panic!("the gateway stopped before logging its address");
        })
        .await
        .expect("the gateway started in time");
        assert!(!line.contains('\u{1b}'), "colour codes in {line:?}");
        child.kill().await.expect("stop tollgate");
    })
    .await;
}

/// One log line per metered request names who, what and what it cost, and no credential.
#[tokio::test]
async fn each_metered_request_logs_one_line_with_its_account_model_tokens_and_cost() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("logged-1", "10").await;
        let (mut child, base, mut lines) = spawn_binary_with_logs(&app).await;
        let user = token("logged-1");
        let response = app
            .client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&user)
            .json(&chat_body("mock-1", "log me"))
            .send()
            .await
            .expect("chat");
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let body: Value = response.json().await.expect("json");
        let line = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await.expect("read log") {
                if line.contains("request metered") {
                    return line;
                }
            }
            panic!("the gateway stopped before logging the request");
        })
        .await
        .expect("the request was logged in time");
        let log: Value = serde_json::from_str(&line).expect("json log");
        let fields = &log["fields"];
        assert_eq!(fields["request_id"], request_id.as_str(), "{line}");
        assert_eq!(fields["account"], "logged-1", "{line}");
        assert_eq!(fields["model"], "mock-1", "{line}");
        assert_eq!(fields["upstream"], "fake", "{line}");
        assert_eq!(fields["status"], "completed", "{line}");
        assert_eq!(
            fields["prompt_tokens"], body["usage"]["prompt_tokens"],
            "{line}"
        );
        assert_eq!(
            fields["completion_tokens"], body["usage"]["completion_tokens"],
            "{line}"
        );
        assert!(
            fields["cost"].as_str().is_some_and(|c| !c.is_empty()),
            "{line}"
        );
        for secret in [user.as_str(), JWT_SECRET, ADMIN_TOKEN, UPSTREAM_KEY] {
            assert!(!line.contains(secret), "a credential in {line}");
        }
        child.kill().await.expect("stop tollgate");
    })
    .await;
}
