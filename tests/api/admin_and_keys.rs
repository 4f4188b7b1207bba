//! The admin API (grants, adjustments, accounts), gateway API keys (billing, model lists, spend
//! limits, revocation) and the `tollgate` CLI against a running gateway's own database.

use std::process::Output;
use std::time::Duration;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate::domain::AccountId;

use crate::helpers::*;

/// Runs the real `tollgate` binary with the app's config and `args`.
async fn cli(app: &TestApp, args: &[&str]) -> Output {
    let mut command = app.tollgate_cli();
    command.args(args);
    tokio::task::spawn_blocking(move || command.output().expect("run tollgate"))
        .await
        .expect("cli task")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

/// Creates a key through the admin API; returns the whole answer (with `key` and `id`).
async fn create_key(app: &TestApp, account: &str, body: &Value) -> Value {
    let response = app
        .post(
            &format!("/admin/accounts/{account}/keys"),
            ADMIN_TOKEN,
            body,
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json().await.expect("key json")
}

async fn admin_account(app: &TestApp, account: &str) -> Value {
    let response = app
        .get(&format!("/admin/accounts/{account}"), ADMIN_TOKEN)
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("account json")
}

fn small_chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
}

#[tokio::test]
async fn grants_are_idempotent_by_reference_and_adjustments_take_credits() {
    run_test(async || {
        let app = spawn_app().await;
        let a = token("a");
        let path = "/admin/accounts/a/credits";
        let grant =
            json!({"amount": "12.5", "type": "bonus", "description": "d", "reference": "grant-1"});

        let response = app.post(path, ADMIN_TOKEN, &grant).await;
        assert_eq!(response.status(), 201);
        let first: Value = response.json().await.expect("json");
        assert_eq!(first["applied"], true);
        assert_eq!(first["balance"], "12.5");
        assert_eq!(first["account"], "a");
        assert_eq!(first["transaction"]["type"], "bonus");
        assert_eq!(first["transaction"]["amount"], "12.5");
        assert_eq!(first["transaction"]["description"], "d");
        assert_eq!(first["transaction"]["reference"], "grant-1");

        let response = app.post(path, ADMIN_TOKEN, &grant).await;
        assert_eq!(response.status(), 200);
        let second: Value = response.json().await.expect("json");
        assert_eq!(second["applied"], false);
        assert_eq!(second["balance"], "12.5");
        assert_eq!(second["transaction"]["id"], first["transaction"]["id"]);
        assert_eq!(app.balance(&a).await["balance"], "12.5");

        let response = app
            .post(
                path,
                ADMIN_TOKEN,
                &json!({"amount": "-2.5", "type": "adjustment", "description": "correction"}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let adjusted: Value = response.json().await.expect("json");
        assert_eq!(adjusted["balance"], "10");
        assert_eq!(app.balance(&a).await["balance"], "10");

        let transactions = app.list("/api/credits/transactions", &a).await;
        assert_eq!(transactions.len(), 2, "{transactions:?}");
        assert_eq!(transactions[0]["type"], "adjustment");
        assert_eq!(transactions[0]["amount"], "-2.5");
        assert_eq!(transactions[0]["balance_before"], "12.5");
        assert_eq!(transactions[0]["balance_after"], "10");
        assert_eq!(transactions[1]["type"], "bonus");

        // Bad amounts and types: 400 in OpenAI's shape, nothing written.
        let bad_bodies = [
            json!({"amount": "0", "type": "bonus"}),
            json!({"amount": "-1", "type": "bonus"}),
            json!({"amount": "abc", "type": "bonus"}),
            json!({"amount": "0.0000001", "type": "bonus"}),
            json!({"amount": 5, "type": "bonus"}),
            json!({"amount": "-1", "type": "purchase"}),
            json!({"amount": "0", "type": "adjustment"}),
            json!({"amount": "5", "type": "usage"}),
            json!({"amount": "5", "type": "gift"}),
            json!({"type": "bonus"}),
            json!({"amount": "5", "type": "bonus", "unexpected": true}),
        ];
        for body in &bad_bodies {
            let response = app.post(path, ADMIN_TOKEN, body).await;
            let error = openai_error(response, 400).await;
            assert_eq!(error["type"], "invalid_request_error", "{body}: {error}");
        }
        assert_eq!(app.balance(&a).await["balance"], "10");
        assert_eq!(app.list("/api/credits/transactions", &a).await.len(), 2);

        let account = admin_account(&app, "a").await;
        assert_eq!(account["account"], "a");
        assert_eq!(account["balance"], "10");
        assert_eq!(account["held"], "0");
        assert_eq!(account["available"], "10");
        assert_eq!(account["api_keys"], json!([]));

        let error = openai_error(app.get("/admin/accounts/nobody", ADMIN_TOKEN).await, 404).await;
        assert_eq!(error["code"], "not_found");
        assert!(
            app.ledger
                .account(&AccountId::parse("nobody").expect("id"))
                .await
                .expect("ledger")
                .is_none(),
            "looking an account up created it"
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn an_api_key_authenticates_bills_its_account_and_is_listed() {
    run_test(async || {
        let app = spawn_app().await;
        let a = token("a");
        app.grant("a", "10").await;
        let key = create_key(&app, "a", &json!({"name": "ci"})).await;
        let secret = key["key"].as_str().expect("key").to_owned();
        let id = key["id"].as_str().expect("id").to_owned();
        assert!(secret.starts_with("tg-"), "{secret}");
        assert!(!id.is_empty());
        assert_eq!(key["name"], "ci");
        assert_eq!(key["account"], "a");

        let response = app.chat(&secret, &chat_body("mock-1", "paid by key")).await;
        assert_eq!(response.status(), 200);
        let request_id = response.headers()["x-request-id"]
            .to_str()
            .expect("ascii")
            .to_owned();
        let balance = app.settled_balance(&a).await;

        // The key's caller sees account a's balance.
        let by_key = app.balance(&secret).await;
        assert_eq!(by_key["account"], "a");
        assert_eq!(by_key["balance"], balance["balance"]);

        let usage = app.list("/api/credits/usage", &a).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["request_id"], request_id.as_str());
        assert_eq!(usage[0]["api_key_id"], id.as_str());
        let cost = credits(&usage[0]["cost"]);
        assert!(cost > Decimal::ZERO);
        assert_eq!(credits(&balance["balance"]), Decimal::from(10) - cost);

        // A JWT request for the same account carries no key id.
        assert_eq!(
            app.chat(&a, &chat_body("mock-1", "paid by jwt"))
                .await
                .status(),
            200
        );
        app.settled_balance(&a).await;
        let usage = app.list("/api/credits/usage", &a).await;
        assert_eq!(usage.len(), 2);
        assert_eq!(usage[0]["api_key_id"], Value::Null);

        let account = admin_account(&app, "a").await;
        let keys = account["api_keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["id"], id.as_str());
        assert_eq!(keys[0]["name"], "ci");
        assert_eq!(keys[0]["revoked"], false);
        assert!(
            !account.to_string().contains(&secret[3..]),
            "the secret is shown again: {account}"
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_key_limited_to_models_gets_403_for_others() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("a", "10").await;
        let key = create_key(&app, "a", &json!({"name": "m", "models": ["mock-1"]})).await;
        let secret = key["key"].as_str().expect("key");

        let error = openai_error(app.chat(secret, &small_chat("mock-large")).await, 403).await;
        assert_eq!(error["code"], "permission_denied");
        assert!(app.upstream.log.requests().is_empty());
        assert_eq!(app.chat(secret, &small_chat("mock-1")).await.status(), 200);

        let balance = app.settled_balance(&token("a")).await;
        let usage = app.list("/api/credits/usage", &token("a")).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["model"], "mock-1");
        assert_eq!(
            credits(&balance["balance"]),
            Decimal::from(10) - credits(&usage[0]["cost"])
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_key_with_a_spend_limit_stops_at_it_while_the_account_has_credits() {
    run_test(async || {
        let app = spawn_app().await;
        let a = token("a");
        app.grant("a", "10").await;
        let key = create_key(&app, "a", &json!({"name": "capped", "spend_limit": "0.05"})).await;
        let secret = key["key"].as_str().expect("key").to_owned();
        let id = key["id"].as_str().expect("id").to_owned();
        assert_eq!(key["spend_limit"], "0.05");

        let mut successes = 0;
        let mut refused = None;
        for _ in 0..50 {
            let response = app.chat(&secret, &small_chat("mock-1")).await;
            if response.status() == 402 {
                refused = Some(response);
                break;
            }
            assert_eq!(response.status(), 200);
            successes += 1;
            // Settle before the next one, so a 402 means the limit, not a hold still in flight.
            app.settled_balance(&a).await;
        }
        let refused = refused.expect("the key was never refused");
        let error = openai_error(refused, 402).await;
        assert_eq!(error["code"], "insufficient_credits");
        assert!(successes >= 2, "only {successes} requests before the limit");

        // Still refused once everything has settled.
        app.settled_balance(&a).await;
        openai_error(app.chat(&secret, &small_chat("mock-1")).await, 402).await;

        let usage = app.list("/api/credits/usage?limit=100", &a).await;
        assert_eq!(usage.len(), successes);
        let spent: Decimal = usage
            .iter()
            .filter(|u| u["api_key_id"] == id.as_str())
            .map(|u| credits(&u["cost"]))
            .sum();
        assert!(spent > Decimal::ZERO);
        assert!(
            spent <= "0.05".parse::<Decimal>().expect("decimal"),
            "the key spent {spent}"
        );
        let account = admin_account(&app, "a").await;
        assert_eq!(credits(&account["api_keys"][0]["spent"]), spent);

        // The account itself still has credits: its JWT is not limited by the key.
        let balance = app.balance(&a).await;
        assert_eq!(credits(&balance["balance"]), Decimal::from(10) - spent);
        assert_eq!(app.chat(&a, &small_chat("mock-1")).await.status(), 200);
        app.settled_balance(&a).await;
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_revoked_key_gets_401_at_the_next_request() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("a", "10").await;
        let key = create_key(&app, "a", &json!({"name": "doomed"})).await;
        let secret = key["key"].as_str().expect("key");
        let id = key["id"].as_str().expect("id");
        assert_eq!(app.chat(secret, &small_chat("mock-1")).await.status(), 200);

        let response = app
            .client
            .delete(app.url(&format!("/admin/keys/{id}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("delete");
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["revoked"], true);

        let error = openai_error(app.chat(secret, &small_chat("mock-1")).await, 401).await;
        assert_eq!(error["code"], "invalid_api_key");
        openai_error(app.get("/api/credits/balance", secret).await, 401).await;
        assert_eq!(app.upstream.log.requests().len(), 1);

        // Revoking again, or a key that never existed: 404.
        for missing in [id, "key_0000000000000000"] {
            let response = app
                .client
                .delete(app.url(&format!("/admin/keys/{missing}")))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .expect("delete");
            openai_error(response, 404).await;
        }
        let account = admin_account(&app, "a").await;
        assert_eq!(account["api_keys"][0]["revoked"], true);
        app.settled_balance(&token("a")).await;
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn bad_key_requests_are_400_and_create_nothing() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("a", "10").await;
        for body in [
            json!({"name": "x", "spend_limit": "-1"}),
            json!({"name": "x", "spend_limit": "abc"}),
            json!({"name": "x", "models": ["[unclosed"]}),
            json!({"name": "x", "unknown": 1}),
        ] {
            let response = app.post("/admin/accounts/a/keys", ADMIN_TOKEN, &body).await;
            openai_error(response, 400).await;
        }
        assert_eq!(admin_account(&app, "a").await["api_keys"], json!([]));
    })
    .await;
}

/// The largest balance the ledger holds: `i64::MAX` micro-credits.
const MAX_CREDITS: &str = "9223372036854.775807";

#[tokio::test]
async fn a_grant_that_would_overflow_the_ledger_is_400_naming_the_amount_and_writes_nothing() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("big", "1000").await;
        // The most a balance (or a debt) can hold, on an empty account, is still a valid grant.
        for (account, amount, kind) in [
            ("full", MAX_CREDITS.to_owned(), "bonus"),
            ("deep", format!("-{MAX_CREDITS}"), "adjustment"),
        ] {
            let response = app
                .post(
                    &format!("/admin/accounts/{account}/credits"),
                    ADMIN_TOKEN,
                    &json!({"amount": amount, "type": kind}),
                )
                .await;
            assert_eq!(response.status(), 201);
        }
        let counts = app.row_counts().await;

        for (account, amount, kind) in [
            // Past the most a balance holds, on top of what the account has.
            ("big", MAX_CREDITS, "bonus"),
            ("big", "9223372036853.775808", "purchase"),
            // Anything at all on a full balance.
            ("full", "0.000001", "bonus"),
            // A debit whose size cannot be negated, and one that pushes the debt past the limit.
            ("big", "-9223372036854.775808", "adjustment"),
            ("deep", "-0.000001", "refund"),
            // Not even a number of micro-credits the ledger can store.
            ("big", "9223372036854.775808", "bonus"),
            ("big", "-9223372036855", "adjustment"),
        ] {
            let body =
                json!({"amount": amount, "type": kind, "reference": format!("ovf-{amount}")});
            let response = app
                .post(
                    &format!("/admin/accounts/{account}/credits"),
                    ADMIN_TOKEN,
                    &body,
                )
                .await;
            let error = openai_error(response, 400).await;
            assert_eq!(error["type"], "invalid_request_error", "{body}: {error}");
            assert_eq!(error["param"], "amount", "{body}: {error}");
            assert!(
                error["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(amount)),
                "{body}: {error}"
            );
        }
        assert_eq!(app.row_counts().await, counts, "no ledger entry");
        assert_eq!(app.balance(&token("big")).await["balance"], "1000");
        // (From the ledger: the Redis cache holds balances only up to ±2^53 micro-credits.)
        for (account, expected) in [
            ("full", MAX_CREDITS.to_owned()),
            ("deep", format!("-{MAX_CREDITS}")),
        ] {
            let record = app
                .ledger
                .account(&AccountId::parse(account).expect("id"))
                .await
                .expect("ledger")
                .expect("account");
            assert_eq!(record.balance.to_string(), expected);
        }
        app.assert_ledger_consistent().await;

        // The CLI refuses it too: a clear message, a non-zero exit, nothing written.
        let output = cli(&app, &["credits", "grant", "big", MAX_CREDITS]).await;
        assert!(!output.status.success(), "{}", stdout(&output));
        let message = stderr(&output);
        assert!(
            message.contains("amount") && message.contains(MAX_CREDITS),
            "{message}"
        );
        assert!(!message.contains("internal"), "{message}");
        assert_eq!(app.row_counts().await, counts, "no ledger entry");
        assert_eq!(app.balance(&token("big")).await["balance"], "1000");
        app.assert_ledger_consistent().await;
    })
    .await;
}

// ---- CLI against the running gateway's database ---------------------------------------------

#[tokio::test]
async fn a_cli_grant_reaches_the_running_gateway() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        // Warm the gateway's cache with the old balance.
        assert_eq!(app.balance(&alice).await["balance"], "0");
        openai_error(app.chat(&alice, &small_chat("mock-1")).await, 402).await;

        let output = cli(&app, &["credits", "grant", "alice", "7"]).await;
        assert_success(&output);
        assert!(stdout(&output).contains("balance 7"), "{}", stdout(&output));

        // The gateway polls the database's cache epoch in the background (every 100 ms).
        eventually(Duration::from_secs(5), async || {
            let balance = app.balance(&alice).await;
            (balance["balance"] == "7" && balance["available"] == "7")
                .then_some(())
                .ok_or(format!("balance {balance}"))
        })
        .await;
        assert_eq!(app.chat(&alice, &small_chat("mock-1")).await.status(), 200);
        let balance = app.settled_balance(&alice).await;
        let usage = app.list("/api/credits/usage", &alice).await;
        assert_eq!(
            credits(&balance["balance"]),
            Decimal::from(7) - credits(&usage[0]["cost"])
        );

        // The CLI sees what the gateway settled.
        let output = cli(&app, &["credits", "balance", "alice"]).await;
        assert_success(&output);
        let expected = format!(
            "alice: {} credits",
            balance["balance"].as_str().expect("str")
        );
        assert_eq!(stdout(&output).trim(), expected);

        let output = cli(&app, &["ledger", "verify"]).await;
        assert_success(&output);
        assert!(
            stdout(&output).contains("ledger consistent"),
            "{}",
            stdout(&output)
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn cli_keys_work_at_once_and_stop_working_once_revoked() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("alice", "10").await;
        let output = cli(&app, &["keys", "create", "alice", "--name", "cli"]).await;
        assert_success(&output);
        let secret = stdout(&output).trim().to_owned();
        assert!(
            secret.starts_with("tg-") && !secret.contains(char::is_whitespace),
            "{secret}"
        );
        let id = stderr(&output)
            .split_whitespace()
            .find(|word| word.starts_with("key_"))
            .expect("key id on stderr")
            .to_owned();

        assert_eq!(app.chat(&secret, &small_chat("mock-1")).await.status(), 200);
        app.settled_balance(&token("alice")).await;
        let usage = app.list("/api/credits/usage", &token("alice")).await;
        assert_eq!(usage[0]["api_key_id"], id.as_str());
        let keys = admin_account(&app, "alice").await["api_keys"].clone();
        assert_eq!(keys[0]["name"], "cli");

        let output = cli(&app, &["keys", "revoke", &id]).await;
        assert_success(&output);
        // The gateway learns of the CLI's change from its background poll (every 100 ms).
        let response = eventually(Duration::from_secs(5), async || {
            let response = app.chat(&secret, &small_chat("mock-1")).await;
            match response.status().as_u16() {
                401 => Ok(response),
                other => Err(format!("status {other}")),
            }
        })
        .await;
        let error = openai_error(response, 401).await;
        assert_eq!(error["code"], "invalid_api_key");

        // Revoking it twice fails.
        let output = cli(&app, &["keys", "revoke", &id]).await;
        assert!(!output.status.success());
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn cli_pricing_check_names_the_bad_line() {
    run_test(async || {
        let app = spawn_app().await;
        let bad = app.dir.path().join("bad-pricing.toml");
        std::fs::write(
            &bad,
            "rounding = \"exact\"\ndefault_max_output_tokens = 256\n\n\
             [default]\nprompt_per_1k = \"abc\"\ncompletion_per_1k = \"1\"\n",
        )
        .expect("write bad pricing");
        let output = cli(
            &app,
            &["pricing", "check", bad.to_str().expect("utf8 path")],
        )
        .await;
        assert!(!output.status.success(), "a bad pricing file passed");
        let message = format!("{}{}", stdout(&output), stderr(&output));
        assert!(message.contains("line 5"), "{message}");
        assert!(message.contains("prompt_per_1k"), "{message}");

        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pricing.toml");
        let output = cli(&app, &["pricing", "check", shipped]).await;
        assert_success(&output);

        let missing = app.dir.path().join("missing.toml");
        let output = cli(&app, &["pricing", "check", missing.to_str().expect("utf8")]).await;
        assert!(!output.status.success());
    })
    .await;
}

#[tokio::test]
async fn cli_minted_token_authenticates() {
    run_test(async || {
        let app = spawn_app().await;
        let output = cli(&app, &["token", "mint", "--sub", "zed"]).await;
        assert_success(&output);
        let jwt = stdout(&output).trim().to_owned();
        assert_eq!(jwt.split('.').count(), 3, "{jwt}");
        let balance = app.balance(&jwt).await;
        assert_eq!(balance["account"], "zed");

        let output = cli(
            &app,
            &[
                "token", "mint", "--sub", "root", "--role", "admin", "--ttl", "5m",
            ],
        )
        .await;
        assert_success(&output);
        let admin = stdout(&output).trim().to_owned();
        assert_eq!(app.get("/admin/accounts/zed", &admin).await.status(), 200);
    })
    .await;
}
