//! Credit grants with expiry through the admin API, and pricing administration.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate::domain::{AccountId, Credits};

use crate::helpers::*;

async fn admin_grant(app: &TestApp, account: &str, body: Value) {
    let response = app
        .post(
            &format!("/admin/accounts/{account}/credits"),
            ADMIN_TOKEN,
            &body,
        )
        .await;
    let status = response.status();
    let text = response.text().await.expect("grant answer");
    assert_eq!(status, 201, "{text}");
}

async fn admin_pricing(app: &TestApp) -> Value {
    let response = app.get("/admin/pricing", ADMIN_TOKEN).await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

async fn admin_account(app: &TestApp, account: &str) -> Value {
    let response = app
        .get(&format!("/admin/accounts/{account}"), ADMIN_TOKEN)
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

#[tokio::test]
async fn expiring_credits_are_spent_first_and_swept_when_they_expire() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("expiring");
        admin_grant(
            &app,
            "expiring",
            json!({"amount": "5", "type": "bonus", "description": "forever"}),
        )
        .await;
        admin_grant(
            &app,
            "expiring",
            json!({"amount": "10", "type": "bonus", "description": "trial", "expires_in": "2s"}),
        )
        .await;

        assert_eq!(
            app.chat(&user, &chat_body("mock-1", "spend the trial first"))
                .await
                .status(),
            200
        );
        let balance = app.settled_balance(&user).await;
        let cost = Decimal::from(15) - credits(&balance["balance"]);
        assert!(cost > Decimal::ZERO);

        let grants = admin_account(&app, "expiring").await["grants"]
            .as_array()
            .cloned()
            .expect("grants");
        assert_eq!(grants.len(), 2);
        let trial = grants
            .iter()
            .find(|g| g["amount"] == "10")
            .expect("trial grant");
        let forever = grants
            .iter()
            .find(|g| g["amount"] == "5")
            .expect("permanent grant");
        assert_eq!(
            credits(&trial["remaining"]),
            Decimal::from(10) - cost,
            "usage drew from the expiring grant"
        );
        assert_eq!(forever["remaining"], "5");
        assert!(trial["expires_at"].is_string() && forever["expires_at"].is_null());

        // Once expired, the sweep takes the trial's remainder out with one `expiry` entry.
        // (Waiting out the grant's 2 s is the point; the clock is polled until its expiry.)
        let trial_expiry = app
            .ledger
            .grants(&AccountId::parse("expiring").expect("account id"))
            .await
            .expect("grants")
            .iter()
            .find_map(|g| g.expires_at_ms)
            .expect("the trial expires");
        wait_until(trial_expiry).await;
        tollgate::app::sweep_expired_grants(&*app.state.ledger, &*app.state.cache).await;
        tollgate::app::sweep_expired_grants(&*app.state.ledger, &*app.state.cache).await;
        let balance = app.settled_balance(&user).await;
        assert_eq!(balance["balance"], "5");
        let entries = app.list("/api/credits/transactions", &user).await;
        let expiries: Vec<&Value> = entries.iter().filter(|e| e["type"] == "expiry").collect();
        assert_eq!(expiries.len(), 1, "{entries:?}");
        assert_eq!(credits(&expiries[0]["amount"]), cost - Decimal::from(10));
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// A gateway whose periodic expiry sweep runs once at start-up and then not for an hour: only
/// the lapse itself can stop expired credits from being spent.
async fn spawn_app_without_periodic_sweeps() -> TestApp {
    spawn_app_with(Options {
        extra: "expiry_sweep_secs = 3600".into(),
        ..Options::default()
    })
    .await
}

/// When the account's only grant lapses (Unix ms).
async fn lapse_of_only_grant(app: &TestApp, account: &str) -> i64 {
    let grants = app
        .ledger
        .grants(&AccountId::parse(account).expect("account id"))
        .await
        .expect("grants");
    assert_eq!(grants.len(), 1);
    grants[0].expires_at_ms.expect("an expiring grant")
}

/// Polls the clock (no fixed sleep) until `at_ms` has passed.
async fn wait_until(at_ms: i64) {
    eventually(Duration::from_secs(10), async || {
        match tollgate::domain::time::now_ms() > at_ms {
            true => Ok(()),
            false => Err(format!("{at_ms} never came")),
        }
    })
    .await;
}

/// No ledger entry of the account ever left its balance below zero (the default overdraft).
async fn assert_never_below_zero(app: &TestApp, bearer: &str) -> Vec<Value> {
    let entries = app
        .list("/api/credits/transactions?limit=100", bearer)
        .await;
    for entry in &entries {
        assert!(
            credits(&entry["balance_after"]) >= Decimal::ZERO,
            "below -overdraft: {entry}"
        );
    }
    entries
}

#[tokio::test]
async fn requests_after_a_grant_lapses_are_refused_before_any_sweep() {
    run_test(async || {
        let app = spawn_app_without_periodic_sweeps().await;
        // On the production backends a second instance serves every other request: the lapse must
        // stop both.
        let mut sibling = match crate::BACKEND {
            Backend::Production => Some(app.spawn_sibling().await),
            Backend::Embedded => None,
        };
        let bases: Vec<String> = std::iter::once(app.base.clone())
            .chain(sibling.iter().map(|s| s.base.clone()))
            .collect();
        let user = token("lapsing");
        admin_grant(
            &app,
            "lapsing",
            json!({"amount": "1", "type": "bonus", "expires_in": "2s"}),
        )
        .await;
        let lapses_at = lapse_of_only_grant(&app, "lapsing").await;
        let chat = |base: &str, i: usize| {
            app.client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&user)
                .json(&chat_body("mock-1", &format!("request {i}")))
                .send()
        };
        for (i, base) in bases.iter().enumerate() {
            assert_eq!(chat(base, i).await.expect("sent").status(), 200);
        }
        let before = app.settled_balance(&user).await;
        assert!(credits(&before["available"]) > Decimal::ZERO);

        wait_until(lapses_at).await;
        // Twenty requests after the lapse, each instance in turn (the sibling first): every one
        // is refused, though no periodic sweep has run.
        for i in 0..20 {
            let base = &bases[(i + 1) % bases.len()];
            let response = chat(base, i).await.expect("sent");
            let error = openai_error(response, 402).await;
            assert_eq!(
                error["code"], "insufficient_credits",
                "request {i}: {error}"
            );
        }
        let balance = app.settled_balance(&user).await;
        assert_eq!(
            (balance["balance"].as_str(), balance["available"].as_str()),
            (Some("0"), Some("0")),
            "{balance}"
        );
        let entries = assert_never_below_zero(&app, &user).await;
        let usage = entries.iter().filter(|e| e["type"] == "usage").count();
        assert_eq!(usage, bases.len(), "only the requests before the lapse ran");
        app.assert_ledger_consistent().await;
        if let Some(sibling) = &mut sibling {
            sibling.stop().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_request_running_when_its_grant_lapses_settles_within_the_overdraft() {
    run_test(async || {
        let app = spawn_app_without_periodic_sweeps().await;
        let user = token("streaming-lapse");
        admin_grant(
            &app,
            "streaming-lapse",
            json!({"amount": "1", "type": "bonus", "expires_in": "2s"}),
        )
        .await;
        let lapses_at = lapse_of_only_grant(&app, "streaming-lapse").await;
        // A slow stream (a frame every 50 ms, 80 of them) reserves before the lapse and ends after.
        let body = json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "a long answer, please"}],
            "max_tokens": 80,
            "stream": true,
        });
        let response = app.chat(&user, &body).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        stream.next().await.expect("a first frame").expect("bytes");

        wait_until(lapses_at).await;
        let running = app.balance(&user).await;
        assert_ne!(running["held"], "0", "the stream still runs: {running}");
        // Both sweeps run while the stream still holds its credits: the one a reload runs (the
        // view above) and the periodic one. Neither takes what the stream may still use, and no
        // new request gets the lapsed credits.
        tollgate::app::sweep_expired_grants(&*app.state.ledger, &*app.state.cache).await;
        assert_eq!(
            app.chat(&user, &chat_body("mock-1", "after the lapse"))
                .await
                .status(),
            402
        );
        while let Some(chunk) = stream.next().await {
            chunk.expect("the stream ends cleanly");
        }
        app.settled_balance(&user).await;
        // What the stream did not use leaves at the next sweep.
        tollgate::app::sweep_expired_grants(&*app.state.ledger, &*app.state.cache).await;
        let balance = app.settled_balance(&user).await;
        assert_eq!(balance["balance"], "0", "{balance}");

        let entries = assert_never_below_zero(&app, &user).await;
        let total = |kind: &str| -> Decimal {
            entries
                .iter()
                .filter(|e| e["type"] == kind)
                .map(|e| credits(&e["amount"]))
                .sum()
        };
        let cost = -total("usage");
        assert!(cost > Decimal::ZERO, "{entries:?}");
        assert_eq!(total("expiry"), cost - Decimal::ONE, "{entries:?}");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn bad_expiries_are_refused_and_change_nothing() {
    run_test(async || {
        let app = spawn_app().await;
        for body in [
            json!({"amount": "1", "expires_at": "yesterday"}),
            json!({"amount": "1", "expires_at": "2001-01-01T00:00:00Z"}),
            json!({"amount": "1", "expires_in": "0s"}),
            json!({"amount": "1", "expires_in": "3 weeks"}),
            json!({"amount": "1", "expires_in": "1d", "expires_at": "2099-01-01T00:00:00Z"}),
        ] {
            let response = app
                .post("/admin/accounts/careful/credits", ADMIN_TOKEN, &body)
                .await;
            openai_error(response, 400).await;
        }
        assert_eq!(
            app.get("/admin/accounts/careful", ADMIN_TOKEN)
                .await
                .status(),
            404
        );
        let response = app
            .post(
                "/admin/accounts/careful/credits",
                ADMIN_TOKEN,
                &json!({"amount": "1", "expires_at": "2099-01-01T00:00:00Z"}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let grants = admin_account(&app, "careful").await["grants"].clone();
        assert_eq!(grants[0]["expires_at"], "2099-01-01T00:00:00Z");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn the_cli_grants_expiring_credits() {
    run_test(async || {
        let app = spawn_app().await;
        let mut command = app.tollgate_cli();
        command.args(["credits", "grant", "cli-user", "7", "--expires-in", "1d"]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let grants = admin_account(&app, "cli-user").await["grants"].clone();
        assert_eq!(grants[0]["amount"], "7");
        assert!(grants[0]["expires_at"].is_string());
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn admin_pricing_shows_and_reloads_the_prices_in_force() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "pricing_poll_ms = 600000".into(),
            ..Options::default()
        })
        .await;
        let before = admin_pricing(&app).await;
        assert_eq!(before["version"], 1);
        assert_eq!(before["models"][0]["match"], "mock-pricey*");
        assert_eq!(before["default"]["prompt_per_1k"], "1");

        std::fs::write(
            &app.pricing_path,
            DEFAULT_PRICING.replace("prompt_per_1k = \"10\"", "prompt_per_1k = \"11\""),
        )
        .expect("edit");
        let response = app
            .post("/admin/pricing/reload", ADMIN_TOKEN, &json!({}))
            .await;
        assert_eq!(response.status(), 200);
        let after = admin_pricing(&app).await;
        assert_eq!(after["version"], 2);
        assert_eq!(after["models"][0]["prompt_per_1k"], "11");
        assert_ne!(after["fingerprint"], before["fingerprint"]);

        // A broken file is refused with its line; the prices in force stay.
        std::fs::write(
            &app.pricing_path,
            "[default]\nprompt_per_1k = \"abc\"\ncompletion_per_1k = \"1\"\n",
        )
        .expect("edit");
        let error = openai_error(
            app.post("/admin/pricing/reload", ADMIN_TOKEN, &json!({}))
                .await,
            400,
        )
        .await;
        assert!(
            error["message"]
                .as_str()
                .expect("message")
                .contains("line 2"),
            "{error}"
        );
        assert_eq!(
            admin_pricing(&app).await["fingerprint"],
            after["fingerprint"]
        );
        let started = Instant::now();
        assert_eq!(app.get("/readyz", "").await.status(), 200);
        assert!(started.elapsed() < Duration::from_secs(5));
    })
    .await;
}

#[tokio::test]
async fn ledger_verify_exits_1_and_names_the_account_when_a_balance_is_tampered_with() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("tampered", "10").await;
        app.grant("honest", "10").await;
        app.assert_ledger_consistent().await;
        app.execute_sql("UPDATE accounts SET balance = balance + 1 WHERE id = 'tampered'")
            .await;

        let mut command = app.tollgate_cli();
        command.args(["ledger", "verify"]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run");
        assert_eq!(output.status.code(), Some(1));
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(report.contains("account tampered:"), "{report}");
        assert!(!report.contains("account honest:"), "{report}");
    })
    .await;
}

#[tokio::test]
async fn ledger_verify_reports_usage_that_took_a_balance_below_the_overdraft() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("forged");
        app.grant("forged", "1").await;
        assert_eq!(
            app.chat(&user, &chat_body("mock-1", "hello"))
                .await
                .status(),
            200
        );
        app.settled_balance(&user).await;
        app.assert_ledger_consistent().await;

        // The request now looks as if it cost 2 credits more, within its hold, and every total
        // agrees: only the balance floor can tell that no reservation would have allowed it.
        app.execute_sql(
            "UPDATE credit_transactions SET amount = amount - 2000000, \
             balance_after = balance_after - 2000000 WHERE account_id = 'forged' AND type = 'usage'",
        )
        .await;
        app.execute_sql(
            "UPDATE usage_records SET cost = cost + 2000000, hold = hold + 2000000 \
             WHERE account_id = 'forged'",
        )
        .await;
        app.execute_sql(
            "UPDATE accounts SET balance = balance - 2000000, debt = debt + 2000000 \
             WHERE id = 'forged'",
        )
        .await;

        let mut command = app.tollgate_cli();
        command.args(["ledger", "verify"]);
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .expect("join")
            .expect("run");
        assert_eq!(output.status.code(), Some(1));
        let report = String::from_utf8_lossy(&output.stdout);
        assert!(report.contains("account forged: entry"), "{report}");
        assert!(report.contains("(usage) left the balance at -"), "{report}");
        assert!(report.contains("1 problem(s) found"), "{report}");
        // With an overdraft of 2 credits a reservation could have allowed it.
        let allowed = Credits::from_whole(2).expect("amount");
        assert!(
            app.ledger.verify(allowed).await.expect("verify").is_empty(),
            "an overdraft of 2 allows it"
        );
    })
    .await;
}

/// `overdraft` lets an account spend that far below zero and no further: a request whose hold
/// fits in it goes through with no credits at all, one whose hold does not is refused.
#[tokio::test]
async fn an_overdraft_lets_requests_spend_that_far_below_zero_and_no_further() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "overdraft = \"1\"".into(),
            ..Options::default()
        })
        .await;
        let user = token("overdrawn");
        let small = json!({"model": "mock-1", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hi"}]});
        // About 0.03 credits each (1 credit per 1000 tokens): 20 of them fit in the overdraft.
        for _ in 0..20 {
            let response = app.chat(&user, &small).await;
            assert_eq!(
                response.status(),
                200,
                "{}",
                response.text().await.unwrap_or_default()
            );
        }
        let balance = app.settled_balance(&user).await;
        assert!(credits(&balance["balance"]) < Decimal::ZERO, "{balance}");
        // A hold of 2,000 output tokens (2 credits) does not fit in what is left of it.
        let big = json!({"model": "mock-1", "max_tokens": 2000,
                         "messages": [{"role": "user", "content": "hi"}]});
        openai_error(app.chat(&user, &big).await, 402).await;
        // Nor do small requests once the overdraft is used up: the balance stays above -1.
        loop {
            let response = app.chat(&user, &small).await;
            if response.status() == 402 {
                break;
            }
            assert_eq!(response.status(), 200);
        }
        let balance = app.settled_balance(&user).await;
        assert!(
            credits(&balance["balance"]) >= Decimal::from(-1),
            "{balance}"
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}
