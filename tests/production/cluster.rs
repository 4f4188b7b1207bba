//! Several gateway instances sharing one ledger and one cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_racing_one_balance_never_overspend() {
    run_test(async || {
        let app = spawn_app().await;
        let mut second = app.spawn_sibling().await;
        let mut third = app.spawn_sibling().await;
        let bases = Arc::new([app.base.clone(), second.base.clone(), third.base.clone()]);
        let body = chat_body("mock-1", "how much does this cost across instances");

        // What one such request really costs.
        let probe = token("probe");
        app.grant("probe", "10").await;
        assert_eq!(app.chat(&probe, &body).await.status(), 200);
        app.settled_balance(&probe).await;
        let cost = credits(&app.list("/api/credits/usage", &probe).await[0]["cost"]);

        // A balance that affords exactly fifty; three hundred requests over three instances.
        let racer = token("racer");
        let funds = cost * Decimal::from(50);
        app.grant("racer", &funds.to_string()).await;
        let client = reqwest::Client::new();
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let (client, bases, racer, body) =
                    (client.clone(), bases.clone(), racer.clone(), body.clone());
                tokio::spawn(async move {
                    let response = client
                        .post(format!("{}/v1/chat/completions", bases[i % 3]))
                        .bearer_auth(&racer)
                        .json(&body)
                        .send()
                        .await
                        .expect("sent");
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
        assert!((1..=50).contains(&ok), "{ok} requests went through");
        second.state.settler.flush().await;
        third.state.settler.flush().await;
        let balance = app.settled_balance(&racer).await;
        let left = credits(&balance["balance"]);
        assert!(left >= Decimal::ZERO, "overspent: {balance}");
        assert_eq!(left, funds - cost * Decimal::from(ok));
        let usage = app.list("/api/credits/usage?limit=100", &racer).await;
        assert_eq!(usage.len(), ok);
        app.assert_ledger_consistent().await;
        second.stop().await;
        third.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_instance_loses_no_finished_request_and_bills_its_open_streams() {
    run_test_within(Duration::from_secs(120), async || {
        let app = spawn_app_with(Options {
            extra: "recovery_interval_ms = 200\norphan_after_secs = 1".into(),
            ..Options::default()
        })
        .await;
        let user = token("crash");
        app.grant("crash", "100").await;
        let (mut child, base) = spawn_binary(&app).await;
        let client = reqwest::Client::new();

        // Requests that finish before the crash must each be billed exactly once.
        let mut finished = Vec::new();
        for _ in 0..20 {
            let response = client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&user)
                .json(&chat_body("mock-1", "finish me"))
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), 200);
            finished.push(
                response.headers()["x-request-id"]
                    .to_str()
                    .expect("id")
                    .to_owned(),
            );
            response.bytes().await.expect("body");
        }
        // Fifty streams open through the instance when it dies. Each is read on its own task,
        // counting the tokens of the text its client received.
        let stream_body = json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 200,
            "stream": true
        });
        let mut streams = Vec::new();
        for _ in 0..50 {
            let response = client
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&user)
                .json(&stream_body)
                .send()
                .await
                .expect("sent");
            assert_eq!(response.status(), 200);
            let id = response.headers()["x-request-id"]
                .to_str()
                .expect("id")
                .to_owned();
            let mut body = response.bytes_stream();
            let first = body.next().await.expect("first chunk").expect("chunk");
            streams.push((
                id,
                tokio::spawn(async move {
                    let mut received = first.to_vec();
                    while let Some(Ok(chunk)) = body.next().await {
                        received.extend_from_slice(&chunk);
                    }
                    let text: String = sse_json(&received)
                        .iter()
                        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                        .collect();
                    tollgate::proxy::tokens::count_text("mock-slow", &text)
                }),
            ));
        }
        assert_ne!(
            app.balance(&user).await["held"],
            "0",
            "the streams hold credits"
        );
        // The kill comes once every stream has renewed its hold (every 2 s), which records its
        // progress beside the hold in Redis.
        let progress = format!("{{{}:a:crash}}:progress", app.config.cache.key_prefix);
        let redis_url = app
            .config
            .cache
            .redis_url
            .as_deref()
            .expect("a Redis cache");
        let redis = redis::Client::open(redis_url).expect("redis url");
        let conn = redis
            .get_multiplexed_async_connection()
            .await
            .expect("connect to Redis");
        eventually(Duration::from_secs(10), async || {
            let recorded: usize = redis::cmd("HLEN")
                .arg(&progress)
                .query_async(&mut conn.clone())
                .await
                .expect("HLEN");
            match recorded == streams.len() {
                true => Ok(()),
                false => Err(format!(
                    "{recorded} of {} streams recorded progress",
                    streams.len()
                )),
            }
        })
        .await;
        child.start_kill().expect("kill -9");
        child.wait().await.expect("reaped");
        let mut open = Vec::new();
        for (id, reader) in streams {
            open.push((id, reader.await.expect("reader")));
        }

        // The surviving instance writes what the dead one left behind: the finished requests, and
        // each open stream billed for what it had delivered by its last renewal.
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let balance = app.balance(&user).await;
            // 70 requests in all: one page holds them.
            let usage = app.list("/api/credits/usage?limit=100", &user).await;
            let billed = |id: &str| usage.iter().filter(|u| u["request_id"] == id).count();
            let finished_billed = finished.iter().filter(|id| billed(id) > 0).count();
            let open_billed = open.iter().filter(|(id, _)| billed(id) > 0).count();
            let all_billed = finished_billed == finished.len() && open_billed == open.len();
            if balance["held"] == "0" && all_billed {
                for id in finished.iter().chain(open.iter().map(|(id, _)| id)) {
                    assert_eq!(billed(id), 1, "{id} billed twice");
                }
                for (id, delivered) in &open {
                    let record = usage
                        .iter()
                        .find(|u| u["request_id"] == id.as_str())
                        .expect("billed");
                    assert_eq!(record["status"], "instance_lost", "{record}");
                    let completion = record["completion_tokens"].as_u64().expect("tokens");
                    assert!(
                        completion >= 1 && completion <= *delivered,
                        "billed {completion} tokens of a stream that delivered {delivered}: \
                         {record}"
                    );
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not recovered: {balance}, {finished_billed} of {} finished and {open_billed} \
                 of {} open requests billed",
                finished.len(),
                open.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pricing_reload_reaches_sibling_instances_without_waiting_for_their_poll() {
    run_test(async || {
        // Polling is effectively off: only the Redis nudge can spread the change.
        let app = spawn_app_with(Options {
            extra: "pricing_poll_ms = 600000".into(),
            ..Options::default()
        })
        .await;
        let mut sibling = app.spawn_sibling().await;
        let client = reqwest::Client::new();
        let pricing = |base: String| {
            let client = client.clone();
            async move {
                let response = client
                    .get(format!("{base}/admin/pricing"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .expect("sent");
                assert_eq!(response.status(), 200);
                response.json::<Value>().await.expect("json")
            }
        };
        let old = pricing(sibling.base.clone()).await["fingerprint"].clone();
        std::fs::write(
            &app.pricing_path,
            DEFAULT_PRICING.replace("completion_per_1k = \"20\"", "completion_per_1k = \"30\""),
        )
        .expect("edit");
        let response = app
            .post("/admin/pricing/reload", ADMIN_TOKEN, &json!({}))
            .await;
        assert_eq!(response.status(), 200);
        let new: Value = response.json().await.expect("json");
        assert_ne!(new["fingerprint"], old);

        let started = Instant::now();
        loop {
            let seen = pricing(sibling.base.clone()).await;
            if seen["fingerprint"] == new["fingerprint"] {
                let instances = seen["instances"]
                    .as_object()
                    .cloned()
                    .expect("instances listed");
                assert!(instances.len() >= 2, "{seen}");
                break;
            }
            // Without the nudge this would take the 600 s poll; the bound is loose so a loaded
            // machine cannot fail it (the nudge itself takes one pub/sub hop plus a 100 ms tick).
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the sibling still has the old prices: {seen}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Both instances list each other with the same prices (an instance announces its reload
        // on its next 100 ms tick, so the list may lag the reload itself by that much).
        let started = Instant::now();
        loop {
            let listed = pricing(app.base.clone()).await["instances"].clone();
            let entries = listed.as_object().cloned().expect("map");
            if entries.len() >= 2
                && entries
                    .values()
                    .all(|i| i["fingerprint"] == new["fingerprint"])
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "instances disagree: {listed}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Each instance names itself, and the list holds both under those names.
        let here = pricing(app.base.clone()).await;
        let there = pricing(sibling.base.clone()).await;
        assert_ne!(here["instance"], there["instance"]);
        let listed = here["instances"].as_object().cloned().expect("map");
        for own in [&here["instance"], &there["instance"]] {
            assert!(
                own.as_str().is_some_and(|id| listed.contains_key(id)),
                "{own} is not among {listed:?}"
            );
        }
        sibling.stop().await;
    })
    .await;
}
