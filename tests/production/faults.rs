//! Faults of the shared backends: a Redis restart and a paused MySQL. Each test uses its own
//! Redis process or its own database's locks, so it never disturbs tests running beside it.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_fails_closed_then_recovers_and_loses_nothing() {
    run_test(async || {
        let Some(mut redis) = PrivateRedis::start() else {
            return;
        };
        let app = spawn_app_with(Options {
            redis_url: Some(redis.url()),
            ..Options::default()
        })
        .await;
        let user = token("restart");
        app.grant("restart", "100").await;
        let body = chat_body("mock-1", "survive a restart");
        let mut billed = 0;
        for _ in 0..5 {
            assert_eq!(app.chat(&user, &body).await.status(), 200);
            billed += 1;
        }

        // Redis gone: requests are refused in OpenAI's shape, never served unmetered.
        redis.kill();
        let response = app.chat(&user, &body).await;
        let error = openai_error(response, 503).await;
        assert_eq!(error["code"], "service_unavailable");
        // Readiness names what is missing, and only that.
        let ready = reqwest::get(app.url("/readyz")).await.expect("readyz");
        assert_eq!(ready.status(), 503);
        let ready: Value = ready.json().await.expect("json");
        assert_eq!(ready["checks"]["ledger"], "ok", "{ready}");
        assert_ne!(ready["checks"]["balance_cache"], "ok", "{ready}");
        let message = ready["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("balance_cache") && !message.contains("ledger"),
            "{ready}"
        );

        // Redis back (empty): the gateway reconnects by itself and reloads balances from MySQL.
        redis.restart();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let response = app.chat(&user, &body).await;
            if response.status() == 200 {
                billed += 1;
                break;
            }
            assert_eq!(response.status(), 503);
            assert!(
                Instant::now() < deadline,
                "did not recover after Redis came back"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ready = reqwest::get(app.url("/readyz")).await.expect("readyz");
        assert_eq!(ready.status(), 200);
        let ready: Value = ready.json().await.expect("json");
        assert_eq!(ready["checks"]["balance_cache"], "ok", "{ready}");
        for _ in 0..5 {
            assert_eq!(app.chat(&user, &body).await.status(), 200);
            billed += 1;
        }
        app.settled_balance(&user).await;
        let usage = app.list("/api/credits/usage?limit=100", &user).await;
        assert_eq!(usage.len(), billed);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_mysql_delays_settlements_but_loses_none() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("paused");
        app.grant("paused", "100").await;
        let body = chat_body("mock-1", "wait for the ledger");
        assert_eq!(app.chat(&user, &body).await.status(), 200);
        app.settled_balance(&user).await;

        // Freeze writes to this test's ledger tables from another connection for three seconds.
        let pause = lock_ledger_tables(&app, Duration::from_secs(3)).await;
        // Requests keep being served while the ledger cannot take their settlements.
        let started = Instant::now();
        for _ in 0..10 {
            let response = app.chat(&user, &body).await;
            assert_eq!(response.status(), 200);
            let _: Value = response.json().await.expect("json");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "requests waited for the ledger"
        );
        pause.await.expect("pause task");

        app.settled_balance(&user).await;
        let usage = app.list("/api/credits/usage?limit=100", &user).await;
        assert_eq!(usage.len(), 11);
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// A client that hangs up while its stream's settlement is still on its way into Redis (here:
/// Redis pauses writes just as the stream ends) must not leave the request unsettled: the
/// settlement is queued before anything waits, and the response's end waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hang_up_while_the_settlement_is_being_recorded_loses_nothing() {
    run_test(async || {
        use futures_util::StreamExt;
        let Some(redis) = PrivateRedis::start() else {
            return;
        };
        let app = spawn_app_with(Options {
            redis_url: Some(redis.url()),
            ..Options::default()
        })
        .await;
        let user = token("hangup");
        app.grant("hangup", "100").await;
        let body = serde_json::json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "a few slow words"}],
            "max_tokens": 6,
            "stream": true
        });
        let response = app.chat(&user, &body).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let first = stream.next().await.expect("a first chunk").expect("chunk");
        assert!(!first.is_empty());

        // Writes to Redis stall for 1.5 s from now: the stream ends (about 300 ms on) while its
        // settlement cannot be recorded yet.
        pause_redis_writes(&redis, Duration::from_millis(1500)).await;
        let paused_until = Instant::now() + Duration::from_millis(1500);
        let mut received = first.to_vec();
        let give_up = Instant::now() + Duration::from_millis(800);
        while !String::from_utf8_lossy(&received).contains("[DONE]") && Instant::now() < give_up {
            match tokio::time::timeout_at(give_up.into(), stream.next()).await {
                Ok(Some(Ok(chunk))) => received.extend_from_slice(&chunk),
                _ => break,
            }
        }
        // The client hangs up, as an SDK does once it has `[DONE]` (or here, as it gives up).
        drop(stream);

        let deadline = paused_until + Duration::from_secs(1);
        loop {
            let balance = app.balance(&user).await;
            if balance["held"] == "0" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the hold outlived its response by over a second after Redis resumed: {balance}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        app.state.settler.flush().await;
        let usage = app.list("/api/credits/usage", &user).await;
        assert_eq!(usage.len(), 1, "the stream is billed once: {usage:?}");
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// When Redis cannot journal a settlement, only the ledger makes it safe from a crash: the
/// stream's last event (`[DONE]`) waits for the ledger's commit, here held up by locked tables,
/// rather than going out as soon as the Redis write has failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_a_stream_ends_only_once_the_ledger_has_its_settlement() {
    run_test(async || {
        use futures_util::StreamExt;
        let Some(redis) = PrivateRedis::start() else {
            return;
        };
        let app = spawn_app_with(Options {
            redis_url: Some(redis.url()),
            ..Options::default()
        })
        .await;
        let user = token("unjournaled");
        app.grant("unjournaled", "100").await;
        let body = serde_json::json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "a few slow words"}],
            "max_tokens": 6,
            "stream": true
        });
        let response = app.chat(&user, &body).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let first = stream.next().await.expect("a first chunk").expect("chunk");

        // From now: Redis takes no write for 4 s (the settlement's record fails after its 2 s
        // call limit), and the ledger's tables stay locked for 5 s.
        pause_redis_writes(&redis, Duration::from_millis(4000)).await;
        let pause = lock_ledger_tables(&app, Duration::from_secs(5)).await;

        let mut received = first.to_vec();
        while let Some(chunk) = stream.next().await {
            received.extend_from_slice(&chunk.expect("chunk"));
        }
        let ended = Instant::now();
        assert!(
            String::from_utf8_lossy(&received).contains("[DONE]"),
            "{}",
            String::from_utf8_lossy(&received)
        );
        let unlocked = pause.await.expect("pause task");
        assert!(
            ended >= unlocked,
            "the stream ended {:?} before the ledger could take its settlement",
            unlocked - ended
        );
        let usage = app.list("/api/credits/usage", &user).await;
        assert_eq!(usage.len(), 1, "billed once: {usage:?}");
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// A stream whose hold disappears (a sibling released it, taking this instance for dead) is no
/// longer covered: it is cut at its next renewal and billed for what it delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_hold_is_gone_is_cut_and_billed_for_what_it_delivered() {
    run_test(async || {
        use futures_util::StreamExt;
        let app = spawn_app_with(Options {
            extra: "hold_ttl_secs = 3".into(),
            ..Options::default()
        })
        .await;
        let user = token("lost");
        app.grant("lost", "10").await;
        let body = serde_json::json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "a long slow answer"}],
            "max_tokens": 200,
            "stream": true
        });
        let response = app.chat(&user, &body).await;
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        stream.next().await.expect("first chunk").expect("chunk");

        // What a sibling's reaper does to a silent instance's holds.
        let holds = format!("{{{}:a:lost}}:holds", app.config.cache.key_prefix);
        let url = app
            .config
            .cache
            .redis_url
            .as_deref()
            .expect("a Redis cache");
        let client = redis::Client::open(url).expect("url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let removed: i64 = redis::cmd("DEL")
            .arg(&holds)
            .query_async(&mut conn)
            .await
            .expect("DEL");
        assert_eq!(removed, 1, "the stream's hold was in {holds}");
        let lost_at = Instant::now();

        let mut broken = false;
        while let Some(chunk) = stream.next().await {
            if chunk.is_err() {
                broken = true;
                break;
            }
        }
        assert!(broken, "the stream ran on without a hold");
        assert!(
            lost_at.elapsed() < Duration::from_secs(3),
            "cut only after {:?}",
            lost_at.elapsed()
        );
        app.state.settler.flush().await;
        let usage = app.list("/api/credits/usage", &user).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["status"], "hold_lost");
        let completion = usage[0]["completion_tokens"].as_u64().expect("tokens");
        assert!((1..200).contains(&completion), "{completion}");
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// Freezes writes to the test's ledger tables from another connection for `hold` (the pause
/// under test: how long the ledger cannot take a write). Returns once they are locked; the
/// task ends at the unlock and gives its time.
async fn lock_ledger_tables(app: &TestApp, hold: Duration) -> tokio::task::JoinHandle<Instant> {
    let url = app.config.database.url.clone();
    let (locked, is_locked) = tokio::sync::oneshot::channel();
    let pause = tokio::spawn(async move {
        use sqlx::Connection;
        let mut conn = sqlx::MySqlConnection::connect(&url).await.expect("connect");
        sqlx::query(
            "LOCK TABLES accounts READ, credit_transactions READ, usage_records READ, \
             api_keys READ, cache_epoch READ",
        )
        .execute(&mut conn)
        .await
        .expect("lock");
        locked.send(()).expect("the test waits for the lock");
        tokio::time::sleep(hold).await;
        sqlx::query("UNLOCK TABLES")
            .execute(&mut conn)
            .await
            .expect("unlock");
        Instant::now()
    });
    is_locked.await.expect("the tables were locked");
    pause
}

/// Makes `redis` take no write for `pause` from now (`CLIENT PAUSE … WRITE`).
async fn pause_redis_writes(redis: &PrivateRedis, pause: Duration) {
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(pause.as_millis().to_string())
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .expect("CLIENT PAUSE");
}
