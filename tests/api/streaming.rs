//! Streams: the client gets the upstream's bytes, the usage chunk the gateway asked for is
//! removed, and every way a stream can end is billed once.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::*;

fn stream_body(model: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "stream some words to me"}],
        "max_tokens": max_tokens,
        "stream": true
    })
}

/// Calls the fake upstream directly with exactly what the gateway sent it.
async fn direct(app: &TestApp, path: &str, body: &Value) -> Vec<u8> {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", app.upstream.url))
        .json(body)
        .send()
        .await
        .expect("direct call");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("direct body").to_vec()
}

/// A stream's whole body, once its answer is checked: 200 and an event stream.
async fn streamed(response: reqwest::Response) -> bytes::Bytes {
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii content type");
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    response.bytes().await.expect("stream")
}

fn is_usage_only_event(event: &str) -> bool {
    event
        .strip_prefix("data: ")
        .and_then(|data| serde_json::from_str::<Value>(data).ok())
        .is_some_and(|chunk| chunk["choices"] == json!([]) && chunk["usage"].is_object())
}

#[tokio::test]
async fn a_stream_is_the_upstreams_bytes_minus_the_injected_usage_chunk() {
    run_test(async || {
        let app = spawn_app().await;
        let alice = token("alice");
        app.grant("alice", "10").await;

        let response = app.chat(&alice, &stream_body("mock-1", 12)).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .starts_with("text/event-stream")
        );
        let through_gateway = response.bytes().await.expect("stream").to_vec();

        // The gateway asked the upstream for usage on the client's behalf...
        let sent = app.upstream.log.last().expect("upstream called");
        assert_eq!(sent.body["stream_options"]["include_usage"], json!(true));
        // ...and the client got exactly the upstream's bytes without the usage-only chunk.
        let upstream_bytes = direct(&app, "/chat/completions", &sent.body).await;
        let events = sse_events(&upstream_bytes);
        assert_eq!(events.iter().filter(|e| is_usage_only_event(e)).count(), 1);
        let expected: String = events
            .iter()
            .filter(|e| !is_usage_only_event(e))
            .map(|e| format!("{e}\n\n"))
            .collect();
        assert_eq!(String::from_utf8_lossy(&through_gateway), expected);
        assert!(
            !sse_json(&through_gateway)
                .iter()
                .any(|c| c["usage"].is_object())
        );

        // Billed from the usage the client never saw.
        let usage_chunk = sse_json(&upstream_bytes)
            .into_iter()
            .find(|c| c["usage"].is_object())
            .expect("usage chunk");
        app.settled_balance(&alice).await;
        let usage = app.list("/api/credits/usage", &alice).await;
        assert_eq!(usage[0]["source"], "reported");
        assert_eq!(usage[0]["stream"], true);
        assert_eq!(usage[0]["status"], "completed");
        assert_eq!(
            usage[0]["completion_tokens"],
            usage_chunk["usage"]["completion_tokens"]
        );
        assert_eq!(
            usage[0]["prompt_tokens"],
            usage_chunk["usage"]["prompt_tokens"]
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_the_stream_byte_identical() {
    run_test(async || {
        let app = spawn_app().await;
        let bob = token("bob");
        app.grant("bob", "10").await;
        let mut body = stream_body("mock-1", 8);
        body["stream_options"] = json!({"include_usage": true});
        let through_gateway = streamed(app.chat(&bob, &body).await).await.to_vec();
        let sent = app.upstream.log.last().expect("upstream called");
        assert_eq!(sent.body, body, "the body went upstream untouched");
        assert_eq!(
            through_gateway,
            direct(&app, "/chat/completions", &body).await
        );
        assert_eq!(
            sse_json(&through_gateway)
                .iter()
                .filter(|c| c["usage"].is_object())
                .count(),
            1
        );
        app.settled_balance(&bob).await;
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn completions_and_responses_streams_pass_through() {
    run_test(async || {
        let app = spawn_app().await;
        let carol = token("carol");
        app.grant("carol", "10").await;

        let completions =
            json!({"model": "mock-1", "prompt": "go on", "max_tokens": 6, "stream": true});
        let through = streamed(app.post("/v1/completions", &carol, &completions).await).await;
        let sent = app.upstream.log.last().expect("upstream called");
        assert_eq!(sent.body["stream_options"]["include_usage"], json!(true));
        let upstream_bytes = direct(&app, "/completions", &sent.body).await;
        let expected: String = sse_events(&upstream_bytes)
            .iter()
            .filter(|e| !is_usage_only_event(e))
            .map(|e| format!("{e}\n\n"))
            .collect();
        assert_eq!(String::from_utf8_lossy(&through), expected);

        let responses =
            json!({"model": "mock-1", "input": "tell me", "max_output_tokens": 5, "stream": true});
        let through = streamed(app.post("/v1/responses", &carol, &responses).await).await;
        assert_eq!(
            app.upstream.log.last().expect("called").body,
            responses,
            "responses bodies are not rewritten"
        );
        assert_eq!(
            through.to_vec(),
            direct(&app, "/responses", &responses).await
        );

        app.settled_balance(&carol).await;
        let usage = app.list("/api/credits/usage", &carol).await;
        assert_eq!(usage.len(), 2);
        assert!(usage.iter().all(|u| u["source"] == "reported"), "{usage:?}");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn a_stream_without_usage_is_counted_with_the_tokenizer() {
    run_test(async || {
        let app = spawn_app().await;
        let dan = token("dan");
        app.grant("dan", "10").await;
        let bytes = streamed(app.chat(&dan, &stream_body("mock-nousage", 10)).await).await;
        let text: String = sse_json(&bytes)
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert!(!text.is_empty());
        app.settled_balance(&dan).await;
        let usage = app.list("/api/credits/usage", &dan).await;
        assert_eq!(usage[0]["source"], "counted");
        assert_eq!(
            usage[0]["completion_tokens"],
            tollgate::proxy::tokens::count_text("mock-nousage", &text)
        );
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// Reads a slow stream until it has `words` content deltas, then hangs up.
async fn hang_up_after(app: &TestApp, bearer: &str, body: &Value, words: usize) {
    let response = app.chat(bearer, body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    while sse_json(&received)
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"].is_string())
        .count()
        < words
    {
        let chunk = stream.next().await.expect("more chunks").expect("chunk");
        received.extend_from_slice(&chunk);
    }
}

/// The default policy (`finish`): a client that hangs up does not stop the work the upstream
/// bills, so the gateway reads the answer to its end and bills the usage the upstream reports.
#[tokio::test]
async fn a_client_that_disconnects_is_billed_what_the_upstream_reports() {
    run_test(async || {
        let app = spawn_app().await;
        let eve = token("eve");
        app.grant("eve", "10").await;
        // 40 words at 50 ms each take 2 s; the client leaves after 4.
        hang_up_after(&app, &eve, &stream_body("mock-slow", 40), 4).await;

        let balance = app.settled_balance(&eve).await;
        let usage = app.list("/api/credits/usage", &eve).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["status"], "client_disconnected");
        assert_eq!(usage[0]["source"], "reported");
        assert_eq!(usage[0]["completion_tokens"], 40, "{usage:?}");
        let prompt = usage[0]["prompt_tokens"].as_u64().expect("prompt tokens");
        assert_eq!(
            credits(&balance["balance"]),
            rust_decimal::Decimal::from(10)
                - rust_decimal::Decimal::from(prompt + 40) / rust_decimal::Decimal::from(1000)
        );
        assert_eq!(balance["held"], "0");
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// `on_client_disconnect = "cancel"`: the upstream call is cancelled at once and what was
/// produced by then is billed.
#[tokio::test]
async fn the_cancel_policy_cancels_a_disconnected_stream_and_bills_what_was_produced() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "on_client_disconnect = \"cancel\"".into(),
            ..Options::default()
        })
        .await;
        let eve = token("eve");
        app.grant("eve", "10").await;
        // 200 words at 50 ms each would take 10 s; the client leaves after 4.
        let started = Instant::now();
        hang_up_after(&app, &eve, &stream_body("mock-slow", 200), 4).await;

        let balance = app.settled_balance(&eve).await;
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "settled only when the upstream finished"
        );
        let usage = app.list("/api/credits/usage", &eve).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["status"], "client_disconnected");
        assert_eq!(usage[0]["source"], "counted");
        let completion = usage[0]["completion_tokens"].as_u64().expect("tokens");
        assert!(
            (3..200).contains(&completion),
            "completion tokens {completion}"
        );
        assert!(credits(&balance["balance"]) < rust_decimal::Decimal::from(10));
        assert_eq!(balance["held"], "0");
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_dies_mid_stream_is_billed_for_its_output() {
    run_test(async || {
        let app = spawn_app().await;
        let fred = token("fred");
        app.grant("fred", "10").await;
        let response = app.chat(&fred, &stream_body("mock-midfail", 50)).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.bytes().await.is_err(),
            "the client must see a broken stream"
        );
        let balance = app.settled_balance(&fred).await;
        let usage = app.list("/api/credits/usage", &fred).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["status"], "upstream_failed");
        assert_eq!(usage[0]["source"], "counted");
        assert!(credits(&balance["balance"]) < rust_decimal::Decimal::from(10));
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// A client that hangs up the moment it has `[DONE]` (as the official SDKs do) races the
/// gateway's settlement of the stream's end: the settlement must survive the hang-up.
#[tokio::test]
async fn a_client_that_hangs_up_after_done_is_settled_at_once() {
    run_test(async || {
        let app = spawn_app().await;
        let gus = token("gus");
        app.grant("gus", "100").await;
        for round in 0..30 {
            let response = app.chat(&gus, &stream_body("mock-1", 7)).await;
            assert_eq!(response.status(), 200);
            let mut body = response.bytes_stream();
            let mut received = Vec::new();
            while !String::from_utf8_lossy(&received).contains("data: [DONE]") {
                let chunk = body.next().await.expect("more chunks").expect("chunk");
                received.extend_from_slice(&chunk);
            }
            drop(body);
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                let balance = app.balance(&gus).await;
                if balance["held"] == "0" {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: a hold outlived its response by a second: {balance}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        app.state.settler.flush().await;
        let usage = app.list("/api/credits/usage?limit=100", &gus).await;
        assert_eq!(usage.len(), 30, "every stream is billed once");
        assert!(usage.iter().all(|u| u["status"] == "completed"));
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// A stream that outlives `hold_ttl_secs` renews its hold: the recovery task, which releases
/// expired holds, never frees credits a running request still stands on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_hold_lifetime_keeps_its_hold() {
    run_test(async || {
        let app = spawn_app_with(Options {
            extra: "hold_ttl_secs = 1\nrecovery_interval_ms = 100".into(),
            ..Options::default()
        })
        .await;
        let ivy = token("ivy");
        app.grant("ivy", "10").await;
        // 60 words at 50 ms each: three times the hold's lifetime.
        let response = app.chat(&ivy, &stream_body("mock-slow", 60)).await;
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let started = Instant::now();
        let mut received = Vec::new();
        let mut checked_late = false;
        while let Some(chunk) = body.next().await {
            received.extend_from_slice(&chunk.expect("an uncut stream"));
            if !checked_late && started.elapsed() > Duration::from_millis(2000) {
                let balance = app.balance(&ivy).await;
                assert_ne!(
                    balance["held"], "0",
                    "the hold of a running stream was released: {balance}"
                );
                checked_late = true;
            }
        }
        assert!(checked_late, "the stream ended too early to check");
        assert!(String::from_utf8_lossy(&received).contains("data: [DONE]"));
        let balance = app.settled_balance(&ivy).await;
        assert_eq!(balance["held"], "0");
        let usage = app.list("/api/credits/usage", &ivy).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["status"], "completed");
        assert_eq!(usage[0]["completion_tokens"], 60);
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// An upstream that answers one chat stream with every event in a single write: `events`, each
/// an HTTP chunk of its own, as a provider's frames that reached the gateway together.
async fn burst_upstream(events: Vec<String>) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        // The request: headers, then a body of `content-length` bytes.
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = socket.read(&mut buf).await.expect("read");
            assert!(n > 0, "the request ended early");
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length: usize = text
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let mut response = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            .to_vec();
        for event in &events {
            response.extend_from_slice(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes());
        }
        response.extend_from_slice(b"0\r\n\r\n");
        socket.write_all(&response).await.expect("write");
        socket.shutdown().await.expect("close");
    });
    (url, task)
}

/// A gateway whose only upstream is a [`burst_upstream`] answering with `events`.
async fn burst_app(events: Vec<String>) -> (TestApp, tokio::task::JoinHandle<()>) {
    let (url, upstream) = burst_upstream(events).await;
    let app = spawn_app_with(Options {
        upstreams: Some(format!(
            "[[upstreams]]\nname = \"burst\"\nbase_url = \"{url}\"\nmodels = [\"mock-*\"]\n"
        )),
        ..Options::default()
    })
    .await;
    (app, upstream)
}

#[tokio::test]
async fn frames_that_arrive_together_leave_in_one_write() {
    run_test(async || {
        let chunk = |delta: &str, finish: &str| {
            format!(
                "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"mock-1\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]}}\n\n"
            )
        };
        let mut events = vec![chunk(r#"{"role":"assistant","content":""}"#, "null")];
        for word in ["one", " two", " three", " four", " five", " six", " seven", " eight"] {
            events.push(chunk(&format!(r#"{{"content":"{word}"}}"#), "null"));
        }
        events.push(chunk("{}", r#""stop""#));
        let usage = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"mock-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":900,\"total_tokens\":1000}}\n\n";
        events.push(usage.to_owned());
        events.push("data: [DONE]\n\n".to_owned());
        let (app, upstream) = burst_app(events.clone()).await;
        let alice = token("alice");
        app.grant("alice", "10").await;

        let mut response = app.chat(&alice, &stream_body("mock-1", 1000)).await;
        assert_eq!(response.status(), 200);
        let mut writes = 0;
        let mut body = Vec::new();
        while let Some(part) = response.chunk().await.expect("stream") {
            writes += 1;
            body.extend_from_slice(&part);
        }
        // Every event but the usage chunk the gateway asked for, in order.
        let expected: String = events.iter().filter(|e| e.as_str() != usage).cloned().collect();
        assert_eq!(String::from_utf8_lossy(&body), expected);
        // The first event alone (nothing came before it to tell a burst from a trickle), the
        // rest before the terminal one in one write, then the held-back `[DONE]`.
        assert_eq!(writes, 3, "the first event, the rest of the burst, its end");
        // Billed the usage the upstream reported: 1000 tokens at 1 credit per 1000.
        assert_eq!(credits(&app.settled_balance(&alice).await["balance"]), rust_decimal::Decimal::from(9));
        upstream.await.expect("the upstream task");
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// Sends a chat request over a raw connection and returns the sizes of the HTTP chunks of the
/// answer's body, in order: one per write the gateway made.
async fn chunk_sizes_on_the_wire(app: &TestApp, bearer: &str, body: &Value) -> Vec<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let body = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {bearer}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.expect("read");
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&raw[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &raw[head_end + 4..];
    let mut sizes = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size");
        let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.trim(), 16).expect("hex size");
        if size == 0 {
            return sizes;
        }
        sizes.push(size);
        rest = &rest[line_end + 2 + size + 2..];
    }
}

#[tokio::test]
async fn gathering_frames_stops_at_64_kib() {
    run_test(async || {
        // Six content deltas of 40,000 characters each, all in one segment.
        let text = "x".repeat(40_000);
        let chunk = |delta: &str| {
            format!(
                "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"mock-1\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n"
            )
        };
        let mut events = vec![chunk(&format!(r#"{{"content":"{text}"}}"#)); 6];
        events.push("data: [DONE]\n\n".to_owned());
        let event_len = events[0].len();
        let (app, upstream) = burst_app(events).await;
        let alice = token("alice");
        app.grant("alice", "1000").await;

        let sizes = chunk_sizes_on_the_wire(&app, &alice, &stream_body("mock-1", 50_000)).await;
        // Every event arrived, gathered, but no write went past 64 KiB by more than one event.
        assert_eq!(sizes.iter().sum::<usize>(), 6 * event_len + "data: [DONE]\n\n".len());
        assert!(sizes.len() < 7, "frames were gathered: {sizes:?}");
        assert!(
            sizes.iter().all(|&size| size < 64 * 1024 + event_len),
            "{sizes:?}"
        );
        upstream.await.expect("the upstream task");
        app.assert_ledger_consistent().await;
    })
    .await;
}
