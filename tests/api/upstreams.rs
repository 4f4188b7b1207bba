//! Upstream routing: fallbacks on connect errors, 429 and 5xx; timeouts; what the upstream gets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::json;

use crate::helpers::*;

/// A real HTTP server on loopback that answers every POST with `status` after `delay`,
/// in OpenAI's error shape, counting the calls.
async fn scripted_upstream(status: StatusCode, delay: Duration) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            // The slowness under test, not a wait for something.
            tokio::time::sleep(delay).await;
            let body = json!({"error": {"message": "scripted failure", "type": "server_error", "param": null, "code": null}});
            (status, axum::Json(body)).into_response()
        }
    };
    let router = Router::new().route("/v1/{*rest}", post(handler));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("the scripted upstream serves");
    });
    (format!("http://{addr}/v1"), calls)
}

/// A loopback address that refuses connections (bound, then closed).
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}/v1")
}

fn two_upstreams(first: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"first\"\nbase_url = \"{first}\"\nmodels = [\"mock-*\"]\nconnect_timeout_secs = 2\n\n\
         [[upstreams]]\nname = \"second\"\nbase_url = \"{{fake}}\"\napi_key = \"{UPSTREAM_KEY}\"\nmodels = [\"mock-*\"]\n"
    )
}

#[tokio::test]
async fn connect_errors_429_and_5xx_fall_back_to_the_next_upstream() {
    run_test(async || {
        for (name, first) in [
            ("refused", closed_port().await),
            (
                "429",
                scripted_upstream(StatusCode::TOO_MANY_REQUESTS, Duration::ZERO)
                    .await
                    .0,
            ),
            (
                "503",
                scripted_upstream(StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)
                    .await
                    .0,
            ),
        ] {
            let app = spawn_app_with(Options {
                upstreams: Some(two_upstreams(&first)),
                ..Options::default()
            })
            .await;
            let user = token("fallback");
            app.grant("fallback", "5").await;
            let response = app.chat(&user, &chat_body("mock-1", "hello")).await;
            assert_eq!(response.status(), 200, "{name}");
            app.settled_balance(&user).await;
            let usage = app.list("/api/credits/usage", &user).await;
            assert_eq!(usage.len(), 1, "{name}");
            assert_eq!(usage[0]["upstream"], "second", "{name}");
            app.assert_ledger_consistent().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_error_from_the_upstream_is_not_retried_and_costs_nothing() {
    run_test(async || {
        let (first, calls) = scripted_upstream(StatusCode::BAD_REQUEST, Duration::ZERO).await;
        let app = spawn_app_with(Options {
            upstreams: Some(two_upstreams(&first)),
            ..Options::default()
        })
        .await;
        let user = token("rejected");
        app.grant("rejected", "5").await;
        let error = openai_error(app.chat(&user, &chat_body("mock-1", "hello")).await, 400).await;
        assert_eq!(
            error["message"], "scripted failure",
            "the upstream's error is passed on"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(
            app.upstream.log.requests().is_empty(),
            "a 400 must not be retried elsewhere"
        );
        let balance = app.settled_balance(&user).await;
        assert_eq!(balance["balance"], "5");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn when_every_upstream_fails_the_last_answer_is_returned_and_nothing_is_charged() {
    run_test(async || {
        let (first, _) = scripted_upstream(StatusCode::BAD_GATEWAY, Duration::ZERO).await;
        let upstreams = format!(
            "[[upstreams]]\nname = \"first\"\nbase_url = \"{first}\"\nmodels = [\"mock-*\"]\n\n\
             [[upstreams]]\nname = \"second\"\nbase_url = \"{}\"\nmodels = [\"mock-*\"]\n",
            closed_port().await
        );
        let app = spawn_app_with(Options {
            upstreams: Some(upstreams),
            ..Options::default()
        })
        .await;
        let user = token("stranded");
        app.grant("stranded", "5").await;
        let error = openai_error(app.chat(&user, &chat_body("mock-1", "hello")).await, 502).await;
        assert_eq!(error["code"], "upstream_error");
        let balance = app.settled_balance(&user).await;
        assert_eq!(balance["balance"], "5");
        assert!(app.list("/api/credits/usage", &user).await.is_empty());
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_gets_504_and_no_charge() {
    run_test(async || {
        let (slow, _) = scripted_upstream(StatusCode::OK, Duration::from_secs(30)).await;
        let upstreams = format!(
            "[[upstreams]]\nname = \"slow\"\nbase_url = \"{slow}\"\nmodels = [\"mock-*\"]\n\
             request_timeout_secs = 1\n"
        );
        let app = spawn_app_with(Options {
            upstreams: Some(upstreams),
            ..Options::default()
        })
        .await;
        let user = token("patient");
        app.grant("patient", "5").await;
        let error = openai_error(app.chat(&user, &chat_body("mock-1", "hello")).await, 504).await;
        assert!(
            error["message"]
                .as_str()
                .expect("message")
                .contains("did not answer"),
            "{error}"
        );
        let balance = app.settled_balance(&user).await;
        assert_eq!(balance["balance"], "5");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_lets_an_open_stream_finish_and_bills_it() {
    run_test(async || {
        let mut app = spawn_app().await;
        let user = token("draining");
        app.grant("draining", "5").await;
        let body = json!({
            "model": "mock-slow",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10,
            "stream": true
        });
        let response = app.chat(&user, &body).await;
        assert_eq!(response.status(), 200);
        // Shut down while the ~0.5 s stream is open (its first chunk is in): it must still
        // complete.
        let mut stream = response.bytes_stream();
        let mut received = stream
            .next()
            .await
            .expect("a first chunk")
            .expect("chunk")
            .to_vec();
        assert!(!received.ends_with(b"data: [DONE]\n\n"), "not finished yet");
        let reader = tokio::spawn(async move {
            while let Some(chunk) = stream.next().await {
                received.extend_from_slice(&chunk.expect("the stream completed"));
            }
            received
        });
        app.stop().await;
        let bytes = reader.await.expect("reader");
        assert!(String::from_utf8_lossy(&bytes).ends_with("data: [DONE]\n\n"));
        let ledger = app.reopen_ledger().await;
        let account = tollgate::domain::AccountId::parse("draining").expect("id");
        let usage = tollgate::ledger::Ledger::usage(
            &*ledger,
            &account,
            tollgate::ledger::Page {
                limit: 10,
                before: None,
            },
        )
        .await
        .expect("usage");
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].status, "completed");
        assert_eq!(usage[0].completion_tokens, 10);
        assert!(
            tollgate::ledger::Ledger::verify(&*ledger, app.config.metering.overdraft)
                .await
                .expect("verify")
                .is_empty()
        );
    })
    .await;
}
