//! Races: reservations never overspend (I1), settlements and grants apply exactly once (I2).

use std::sync::Arc;

use rust_decimal::Decimal;
use serde_json::Value;
use tollgate::domain::{AccountId, Credits, RequestId, TokenUsage};
use tollgate::ledger::{EntryType, GrantRequest, Settlement, UsageSource};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_racing_requests_never_overspend() {
    run_test(async || {
        let app = Arc::new(spawn_app().await);
        let body = chat_body("mock-1", "how much does this cost");

        // What one such request really costs.
        let probe = token("probe");
        app.grant("probe", "10").await;
        assert_eq!(app.chat(&probe, &body).await.status(), 200);
        app.settled_balance(&probe).await;
        let cost = credits(&app.list("/api/credits/usage", &probe).await[0]["cost"]);
        assert!(cost > Decimal::ZERO);

        // A balance that affords exactly ten of them.
        let racer = token("racer");
        let funds = cost * Decimal::from(10);
        app.grant("racer", &funds.to_string()).await;
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (app, racer, body) = (app.clone(), racer.clone(), body.clone());
                tokio::spawn(async move {
                    let response = app.chat(&racer, &body).await;
                    let status = response.status().as_u16();
                    let json: Value = response.json().await.expect("a JSON answer");
                    (status, json)
                })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            let (status, json) = task.await.expect("task");
            match status {
                200 => ok += 1,
                402 => assert_eq!(json["error"]["code"], "insufficient_credits"),
                other => panic!("unexpected status {other}: {json}"),
            }
        }
        assert!((1..=10).contains(&ok), "{ok} requests went through");

        let balance = app.settled_balance(&racer).await;
        let left = credits(&balance["balance"]);
        assert!(left >= Decimal::ZERO, "overspent: {balance}");
        assert_eq!(left, funds - cost * Decimal::from(ok));
        let entries = app
            .list("/api/credits/transactions?limit=100", &racer)
            .await;
        assert!(
            entries
                .iter()
                .all(|e| credits(&e["balance_after"]) >= Decimal::ZERO),
            "a balance went negative"
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

fn settlement(request_id: &RequestId, account: &AccountId) -> Settlement {
    Settlement {
        request_id: request_id.clone(),
        account: account.clone(),
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
        cost: Credits::from_micros(30_000),
        uncharged: Credits::ZERO,
        hold: Credits::from_micros(50_000),
        stream: false,
        status: "completed".into(),
        started_at_ms: 0,
        finished_at_ms: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_settlement_changes_nothing() {
    run_test(async || {
        // The account has no credits: with an overdraft of 1 its reservations could have been taken.
        let app = spawn_app_with(Options {
            extra: "overdraft = \"1\"".into(),
            ..Options::default()
        })
        .await;
        let account = AccountId::parse("replay").expect("valid");
        let request_id = RequestId::new();
        let first = app
            .ledger
            .settle_batch(&[settlement(&request_id, &account)])
            .await
            .expect("settles");
        assert!(first[0].applied);
        assert_eq!(first[0].account.balance, Credits::from_micros(-30_000));

        // Replayed one by one and all at once from several tasks: never applied again.
        let second = app
            .ledger
            .settle_batch(&[settlement(&request_id, &account)])
            .await
            .expect("settles");
        assert!(!second[0].applied);
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (ledger, id, account) =
                    (app.ledger.clone(), request_id.clone(), account.clone());
                tokio::spawn(async move { ledger.settle_batch(&[settlement(&id, &account)]).await })
            })
            .collect();
        for racer in racers {
            assert!(!racer.await.expect("task").expect("settles")[0].applied);
        }
        let record = app
            .ledger
            .account(&account)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(record.balance, Credits::from_micros(-30_000));
        // A batch holding the same request twice applies it once.
        let other = RequestId::new();
        let batch = app
            .ledger
            .settle_batch(&[settlement(&other, &account), settlement(&other, &account)])
            .await
            .expect("settles");
        assert_eq!(batch.iter().filter(|o| o.applied).count(), 1);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_grants_with_one_reference_apply_once() {
    run_test(async || {
        let app = spawn_app().await;
        let account = AccountId::parse("granted").expect("valid");
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (ledger, account) = (app.ledger.clone(), account.clone());
                tokio::spawn(async move {
                    ledger
                        .grant(&GrantRequest {
                            account,
                            entry_type: EntryType::Purchase,
                            amount: Credits::from_whole(5).expect("small"),
                            description: "order 42".into(),
                            reference: Some("order-42".into()),
                            expires_at_ms: None,
                            draw_first_from: Vec::new(),
                        })
                        .await
                })
            })
            .collect();
        let mut applied = 0;
        for task in tasks {
            applied += usize::from(task.await.expect("task").expect("grant").applied);
        }
        assert_eq!(applied, 1);
        let record = app
            .ledger
            .account(&account)
            .await
            .expect("reads")
            .expect("exists");
        assert_eq!(record.balance, Credits::from_whole(5).expect("small"));
        app.assert_ledger_consistent().await;
    })
    .await;
}
