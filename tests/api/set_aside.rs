//! A settlement the ledger refuses on its own (here a negative cost, which both adapters refuse;
//! on MySQL also a model name over 64 KiB, which no usage row can hold) is set aside for an
//! admin: it holds up no other settlement, no recovery pass and no shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use tollgate::cache::HoldSpec;
use tollgate::domain::time::now_ms;
use tollgate::domain::{AccountId, Credits, RequestId, TokenUsage};
use tollgate::ledger::{Bucket, Page, Settlement, UsageSource};
use tollgate::metering::settler;

use crate::helpers::*;

fn settlement(account: &str, cost: Credits) -> Settlement {
    Settlement {
        request_id: RequestId::new(),
        account: AccountId::parse(account).expect("valid account"),
        api_key_id: None,
        endpoint: "chat/completions".into(),
        model: "mock-1".into(),
        upstream: "fake".into(),
        usage: TokenUsage {
            prompt_tokens: 10,
            completion_tokens: 20,
            cached_tokens: 0,
        },
        source: UsageSource::Reported,
        cost,
        uncharged: Credits::ZERO,
        hold: Credits::from_whole(1).expect("small"),
        stream: false,
        status: "completed".into(),
        started_at_ms: now_ms(),
        finished_at_ms: now_ms(),
    }
}

/// Settlements of `account` that the ledger refuses: a negative cost on both backends, and on
/// MySQL a model name longer than any TEXT column (the case that once stalled the settler).
fn refused(account: &str) -> Vec<Settlement> {
    let mut refused = vec![settlement(account, Credits::from_micros(-1))];
    if crate::BACKEND == Backend::Production {
        let mut long = settlement(account, Credits::from_micros(10_000));
        long.model = "m".repeat(70 * 1024);
        refused.push(long);
    }
    refused
}

/// Holds a request's credits in the balance cache, as a reservation does.
async fn hold(app: &TestApp, settlement: &Settlement) {
    app.state
        .cache
        .reserve(
            &Bucket::Account(settlement.account.clone()),
            &HoldSpec {
                request_id: settlement.request_id.to_string(),
                amount: settlement.hold,
                owner: app.state.meter.instance().to_owned(),
                deadline_ms: now_ms() + 600_000,
            },
            Credits::ZERO,
            app.state.meter.source(),
        )
        .await
        .expect("the hold fits");
}

/// Waits until the clock has passed the millisecond it is in: recovery takes journal records
/// in the order of the millisecond each was recorded in, and only once older than that.
async fn next_millisecond() {
    let recorded_at = now_ms();
    eventually(Duration::from_secs(1), async || {
        match now_ms() > recorded_at {
            true => Ok(()),
            false => Err(format!("the clock stands at {recorded_at}")),
        }
    })
    .await;
}

async fn set_aside_list(app: &TestApp, query: &str) -> Vec<Value> {
    app.list(&format!("/admin/settlements/set-aside{query}"), ADMIN_TOKEN)
        .await
}

async fn usage_count(app: &TestApp, account: &str) -> usize {
    app.ledger
        .usage(
            &AccountId::parse(account).expect("valid"),
            Page {
                limit: 100,
                before: None,
            },
        )
        .await
        .expect("usage")
        .len()
}

async fn resolve(app: &TestApp, request_id: &str, note: &str) -> reqwest::Response {
    app.post(
        &format!("/admin/settlements/set-aside/{request_id}/resolve"),
        ADMIN_TOKEN,
        &json!({ "note": note }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_settlement_is_set_aside_and_holds_up_no_other_request() {
    run_test(async || {
        let app = Arc::new(
            spawn_app_with(Options {
                extra: "set_aside_after_secs = 1".into(),
                ..Options::default()
            })
            .await,
        );
        let others: Vec<String> = (0..6).map(|i| format!("other-{i}")).collect();
        for account in others.iter().map(String::as_str).chain(["refused"]) {
            app.grant(account, "10").await;
        }
        let bad = refused("refused");
        for settlement in &bad {
            hold(&app, settlement).await;
        }
        let before = app.balance(&token("refused")).await;
        assert_eq!(before["held"], json!(format!("{}", bad.len())));

        // The refused settlements go in first, then requests of other accounts race them.
        let durables: Vec<_> = bad
            .iter()
            .map(|s| app.state.settler.settle(s.clone(), None))
            .collect();
        let started = Instant::now();
        let requests = others.iter().flat_map(|account| {
            let app = app.clone();
            let user = token(account);
            (0..3).map(move |i| {
                let (app, user) = (app.clone(), user.clone());
                async move {
                    let response = app
                        .chat(&user, &chat_body("mock-1", &format!("race {i}")))
                        .await;
                    let status = response.status();
                    let body = response.text().await.expect("the answer");
                    (status, body)
                }
            })
        });
        let answers = tokio::time::timeout(Duration::from_secs(15), join_all(requests))
            .await
            .expect("requests of other accounts waited behind the refused settlement");
        for (status, body) in answers {
            assert_eq!(status, 200, "{body}");
        }
        // Every one of them is in the ledger promptly, while the refused ones wait apart.
        loop {
            let mut written = 0;
            for account in &others {
                written += usage_count(&app, account).await;
            }
            if written == others.len() * 3 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "only {written} of {} settlements of other accounts were written",
                others.len() * 3
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // After `set_aside_after_secs`, each refused one is set aside and its waiter told (with
        // Redis, it was told as soon as its journal record was written).
        for durable in durables {
            tokio::time::timeout(Duration::from_secs(15), durable)
                .await
                .expect("the refused settlement's waiter was told")
                .expect("told, not dropped");
        }
        let listed = loop {
            let listed = set_aside_list(&app, "").await;
            if listed.len() == bad.len() {
                break listed;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "not set aside: {listed:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for settlement in &bad {
            let entry = listed
                .iter()
                .find(|e| e["request_id"] == settlement.request_id.as_str())
                .unwrap_or_else(|| panic!("{} is listed: {listed:?}", settlement.request_id));
            assert_eq!(entry["account"], "refused");
            assert_eq!(entry["settlement"]["cost"], json!(settlement.cost));
            assert_eq!(entry["settlement"]["model"], json!(settlement.model));
            assert!(
                !entry["error"].as_str().expect("error").is_empty(),
                "{entry}"
            );
            assert!(entry["set_aside_at"].is_string(), "{entry}");
            assert_eq!(entry["resolved"], false);
            assert_eq!(entry["resolved_at"], Value::Null);
        }
        assert_eq!(
            set_aside_list(&app, "?resolved=false").await.len(),
            bad.len()
        );
        assert!(set_aside_list(&app, "?resolved=true").await.is_empty());
        let error = openai_error(
            app.get("/admin/settlements/set-aside?resolved=maybe", ADMIN_TOKEN)
                .await,
            400,
        )
        .await;
        assert_eq!(error["param"], "resolved");
        openai_error(
            app.get("/admin/settlements/set-aside", &token("refused"))
                .await,
            403,
        )
        .await;

        // Nothing was charged, and nothing is left held or pending for them.
        let after = app.settled_balance(&token("refused")).await;
        assert_eq!(
            (&after["balance"], &after["held"]),
            (&json!("10"), &json!("0"))
        );
        assert_eq!(usage_count(&app, "refused").await, 0);

        // Verify reports each until it is resolved.
        app.state.settler.flush().await;
        let problems = app
            .ledger
            .verify(app.config.metering.overdraft)
            .await
            .expect("verify");
        assert_eq!(problems.len(), bad.len(), "{problems:?}");
        for settlement in &bad {
            assert!(
                problems.iter().any(|p| p.account == "refused"
                    && p.problem.contains(&format!(
                        "settlement {} was set aside unresolved",
                        settlement.request_id
                    ))),
                "{problems:?}"
            );
        }

        // Resolving: a note is required, an unknown request is 404, a second resolution changes
        // nothing.
        let id = bad[0].request_id.to_string();
        let error = openai_error(resolve(&app, &id, "  ").await, 400).await;
        assert_eq!(error["param"], "note");
        openai_error(resolve(&app, "req_never_set_aside", "note").await, 404).await;
        for settlement in &bad {
            let response = resolve(&app, settlement.request_id.as_str(), "waived: test").await;
            assert_eq!(response.status(), 200);
            let entry: Value = response.json().await.expect("json");
            assert_eq!(entry["resolved"], true);
            assert_eq!(entry["resolved_note"], "waived: test");
        }
        let first: Value = set_aside_list(&app, "?resolved=true")
            .await
            .into_iter()
            .find(|e| e["request_id"] == id.as_str())
            .expect("resolved");
        let response = resolve(&app, &id, "another note").await;
        assert_eq!(response.status(), 200);
        let again: Value = response.json().await.expect("json");
        assert_eq!(again, first);
        assert!(set_aside_list(&app, "?resolved=false").await.is_empty());
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_sets_a_refused_orphan_aside_and_writes_the_others() {
    run_test(async || {
        let app = spawn_app().await;
        app.grant("orphan-good", "10").await;
        app.grant("orphan-bad", "10").await;
        // The cache has both accounts (the in-process cache records settlements only for those).
        app.balance(&token("orphan-good")).await;
        app.balance(&token("orphan-bad")).await;

        // Journal records left as a dead instance leaves them: the refused one first.
        let bad = settlement("orphan-bad", Credits::from_micros(-1));
        let good = settlement("orphan-good", Credits::from_micros(30_000));
        for settlement in [&bad, &good] {
            app.state
                .cache
                .settle(
                    &Bucket::Account(settlement.account.clone()),
                    settlement.request_id.as_str(),
                    settlement.cost,
                    Some(&serde_json::to_string(settlement).expect("json")),
                )
                .await
                .expect("recorded");
            next_millisecond().await;
        }

        let recovered = settler::recover(&*app.ledger, &*app.state.cache, Duration::ZERO)
            .await
            .expect("the pass goes past the refused orphan");
        assert_eq!((recovered.written, recovered.set_aside), (1, 1));
        assert_eq!(usage_count(&app, "orphan-good").await, 1);
        assert_eq!(usage_count(&app, "orphan-bad").await, 0);
        let listed = set_aside_list(&app, "").await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["request_id"], bad.request_id.as_str());
        assert_eq!(listed[0]["account"], "orphan-bad");

        // Both are gone from the cache: the next pass finds nothing, and the balances are the
        // ledger's (the refused one's pending -0.000001 no longer counts).
        let again = settler::recover(&*app.ledger, &*app.state.cache, Duration::ZERO)
            .await
            .expect("second pass");
        assert_eq!((again.written, again.set_aside), (0, 0));
        let balance = app.balance(&token("orphan-bad")).await;
        assert_eq!(
            (&balance["balance"], &balance["held"]),
            (&json!("10"), &json!("0"))
        );
        let balance = app.balance(&token("orphan-good")).await;
        assert_eq!(balance["balance"], "9.97");

        let problems = app.ledger.verify(Credits::ZERO).await.expect("verify");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].account, "orphan-bad");
        assert_eq!(
            resolve(&app, bad.request_id.as_str(), "waived")
                .await
                .status(),
            200
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_is_prompt_with_a_refused_settlement_queued() {
    run_test(async || {
        // The default `set_aside_after_secs` (30 s): shutdown must not wait that out.
        let mut app = spawn_app().await;
        app.grant("stopping", "10").await;
        let bad = refused("stopping");
        let good = settlement("stopping", Credits::from_micros(30_000));
        for settlement in &bad {
            drop(app.state.settler.settle(settlement.clone(), None));
        }
        drop(app.state.settler.settle(good.clone(), None));

        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(15), app.stop())
            .await
            .expect("shutdown waited for the refused settlement");
        assert!(started.elapsed() < Duration::from_secs(15));

        // The good one was written; the refused ones were set aside on the way out.
        let ledger = app.reopen_ledger().await;
        let account = AccountId::parse("stopping").expect("valid");
        let usage = ledger
            .usage(
                &account,
                Page {
                    limit: 10,
                    before: None,
                },
            )
            .await
            .expect("usage");
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].request_id, good.request_id.as_str());
        let mut set_aside: Vec<String> = ledger
            .set_aside_settlements(Some(false))
            .await
            .expect("list")
            .into_iter()
            .map(|entry| entry.request_id)
            .collect();
        set_aside.sort();
        let mut expected: Vec<String> = bad.iter().map(|s| s.request_id.to_string()).collect();
        expected.sort();
        assert_eq!(set_aside, expected);
    })
    .await;
}
