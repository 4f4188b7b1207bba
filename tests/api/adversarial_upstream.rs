//! An adversarial upstream: the mock's knobs for what real providers do (reasoning and audio
//! tokens, usage riding on a content chunk, every SSE framing, in-band failures, a stream that
//! stalls). Each test checks what a user can: the status and bytes the client got, the usage
//! records, the balance, and that no hold is left behind.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tollgate::proxy::Endpoint;
use tollgate::proxy::tokens::{count_prompt, count_text};

use crate::helpers::*;

/// The test pricing: 1 credit per 1000 prompt or completion tokens.
fn cost(prompt: u64, completion: u64) -> Decimal {
    Decimal::new(i64::try_from(prompt + completion).expect("small"), 3)
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .expect("ascii request id")
        .to_owned()
}

/// Calls the fake upstream directly with exactly what the gateway sent it last.
async fn direct_replay(app: &TestApp, path: &str) -> Vec<u8> {
    let sent = app.upstream.log.last().expect("the upstream was called");
    let response = reqwest::Client::new()
        .post(format!("{}{path}", app.upstream.url))
        .json(&sent.body)
        .send()
        .await
        .expect("direct call");
    assert_eq!(response.status(), 200);
    response.bytes().await.expect("direct body").to_vec()
}

/// The raw events of an SSE stream, each with the blank line that ends it, whatever its line
/// ends (LF, CRLF or CR). Concatenated they give back `bytes`.
fn raw_events(bytes: &[u8]) -> Vec<&[u8]> {
    let mut events = Vec::new();
    let (mut start, mut line_start, mut i) = (0, 0, 0);
    while i < bytes.len() {
        let eol = match (bytes[i], bytes.get(i + 1)) {
            (b'\r', Some(b'\n')) => 2,
            (b'\r' | b'\n', _) => 1,
            _ => {
                i += 1;
                continue;
            }
        };
        let blank = i == line_start;
        i += eol;
        line_start = i;
        if blank {
            events.push(&bytes[start..i]);
            start = i;
        }
    }
    assert_eq!(start, bytes.len(), "the stream ends with a whole event");
    events
}

/// The `data` of one raw event (lines joined by `\n`), or `None` for a comment-only event.
fn event_data(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).expect("an event is UTF-8");
    let lines: Vec<&str> = text
        .split(['\r', '\n'])
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|value| value.strip_prefix(' ').unwrap_or(value))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// The JSON payloads of a stream (not `[DONE]`, not comments).
fn payloads(bytes: &[u8]) -> Vec<Value> {
    raw_events(bytes)
        .into_iter()
        .filter_map(event_data)
        .filter(|data| data != "[DONE]")
        .map(|data| serde_json::from_str(&data).expect("data is JSON"))
        .collect()
}

fn is_usage_only(event: &[u8]) -> bool {
    event_data(event)
        .and_then(|data| serde_json::from_str::<Value>(&data).ok())
        .is_some_and(|chunk| chunk["choices"] == json!([]) && chunk["usage"].is_object())
}

/// `bytes` without its one usage-only event: what a client that did not ask for usage gets.
fn without_usage_chunk(bytes: &[u8]) -> Vec<u8> {
    let events = raw_events(bytes);
    assert_eq!(
        events.iter().filter(|e| is_usage_only(e)).count(),
        1,
        "one usage-only chunk upstream"
    );
    events
        .into_iter()
        .filter(|e| !is_usage_only(e))
        .flatten()
        .copied()
        .collect()
}

/// `(prompt, completion)` tokens the upstream reported in a stream (the last usage it sent).
fn reported_in_stream(bytes: &[u8]) -> (u64, u64) {
    let usage = payloads(bytes)
        .into_iter()
        .rev()
        .find_map(|p| {
            [p["usage"].clone(), p["response"]["usage"].clone()]
                .into_iter()
                .find(Value::is_object)
        })
        .expect("the upstream reported usage");
    reported(&usage)
}

/// `(prompt, completion)` of a `usage` object in either naming.
fn reported(usage: &Value) -> (u64, u64) {
    let tokens = |a: &str, b: &str| usage[a].as_u64().or(usage[b].as_u64()).expect("tokens");
    (
        tokens("prompt_tokens", "input_tokens"),
        tokens("completion_tokens", "output_tokens"),
    )
}

/// The visible text of a stream's payloads (chat deltas, completions text, Responses deltas).
fn streamed_text(payloads: &[Value]) -> String {
    payloads
        .iter()
        .filter_map(|p| {
            p["choices"][0]["delta"]["content"]
                .as_str()
                .or(p["choices"][0]["text"].as_str())
                .or(p["delta"]
                    .as_str()
                    .filter(|_| p["type"] == "response.output_text.delta"))
        })
        .collect()
}

/// Waits (at most `within`) until the account holds nothing, then for every settlement to be
/// written; returns the balance.
async fn released_within(app: &TestApp, bearer: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let balance = app.balance(bearer).await;
        if balance["held"] == "0" {
            app.state.settler.flush().await;
            return app.balance(bearer).await;
        }
        assert!(
            Instant::now() < deadline,
            "a hold outlived its response by {within:?}: {balance}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The account's usage records, oldest first.
async fn records(app: &TestApp, bearer: &str) -> Vec<Value> {
    let mut usage = app.list("/api/credits/usage?limit=100", bearer).await;
    usage.reverse();
    usage
}

/// Asserts a usage record: its request, tokens, source, status and exact cost.
fn assert_record(
    record: &Value,
    id: &str,
    (prompt, completion): (u64, u64),
    source: &str,
    status: &str,
) {
    assert_eq!(record["request_id"], id, "{record}");
    assert_eq!(record["prompt_tokens"], prompt, "{record}");
    assert_eq!(record["completion_tokens"], completion, "{record}");
    assert_eq!(record["source"], source, "{record}");
    assert_eq!(record["status"], status, "{record}");
    assert_eq!(
        credits(&record["cost"]),
        cost(prompt, completion),
        "{record}"
    );
    assert_eq!(record["uncharged"], "0", "{record}");
}

/// The balance after `records` were charged against `granted`.
fn assert_balance(balance: &Value, granted: i64, records: &[Value]) {
    let spent: Decimal = records.iter().map(|r| credits(&r["cost"])).sum();
    assert_eq!(
        credits(&balance["balance"]),
        Decimal::from(granted) - spent,
        "{balance}"
    );
    assert_eq!(balance["held"], "0");
}

fn chat_request(model: &str, content: &str, max_tokens: u64, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_completion_tokens": max_tokens,
        "stream": stream,
    })
}

// ---------------------------------------------------------------------------------------------
// Tokens the client never sees

#[tokio::test]
async fn reasoning_tokens_are_billed_as_completion_tokens_with_or_without_a_stream() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("thinker");
        app.grant("thinker", "10").await;

        // A 20-token budget: 10 reasoning tokens, 10 visible words.
        let response = app
            .chat(
                &user,
                &chat_request("mock-reasoning", "think it over", 20, false),
            )
            .await;
        assert_eq!(response.status(), 200);
        let plain_id = request_id(&response);
        let answer: Value = response.json().await.expect("json");
        let usage = &answer["usage"];
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 10);
        let content = answer["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert_eq!(content.split_whitespace().count(), 10, "{content}");
        let plain = reported(usage);
        assert_eq!(plain.1, 20, "completion tokens include the reasoning");

        let response = app
            .chat(
                &user,
                &chat_request("mock-reasoning", "think it over", 20, true),
            )
            .await;
        assert_eq!(response.status(), 200);
        let stream_id = request_id(&response);
        let through = response.bytes().await.expect("stream").to_vec();
        let upstream = direct_replay(&app, "/chat/completions").await;
        assert_eq!(through, without_usage_chunk(&upstream));
        let visible = streamed_text(&payloads(&through));
        assert_eq!(visible.split_whitespace().count(), 10, "{visible}");
        let streamed = reported_in_stream(&upstream);
        assert_eq!(streamed, plain);

        let balance = released_within(&app, &user, Duration::from_secs(5)).await;
        let usage = records(&app, &user).await;
        assert_eq!(usage.len(), 2);
        assert_record(&usage[0], &plain_id, plain, "reported", "completed");
        assert_record(&usage[1], &stream_id, streamed, "reported", "completed");
        assert_balance(&balance, 10, &usage);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn responses_reasoning_tokens_are_billed_as_output_tokens() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("reasoner");
        app.grant("reasoner", "10").await;
        let request = json!({"model": "mock-reasoning", "input": "why is the sky blue",
        "max_output_tokens": 30});

        let response = app.post("/v1/responses", &user, &request).await;
        assert_eq!(response.status(), 200);
        let plain_id = request_id(&response);
        let answer: Value = response.json().await.expect("json");
        assert_eq!(answer["output"][0]["type"], "reasoning");
        assert_eq!(
            answer["usage"]["output_tokens_details"]["reasoning_tokens"],
            15
        );
        let plain = reported(&answer["usage"]);
        assert_eq!(plain.1, 30);

        let mut streaming = request.clone();
        streaming["stream"] = json!(true);
        let response = app.post("/v1/responses", &user, &streaming).await;
        assert_eq!(response.status(), 200);
        let stream_id = request_id(&response);
        let through = response.bytes().await.expect("stream").to_vec();
        assert_eq!(through, direct_replay(&app, "/responses").await);
        let streamed = reported_in_stream(&through);
        assert_eq!(streamed, plain);
        let visible = streamed_text(&payloads(&through));
        assert_eq!(visible.split_whitespace().count(), 15, "{visible}");

        let balance = released_within(&app, &user, Duration::from_secs(5)).await;
        let usage = records(&app, &user).await;
        assert_eq!(usage.len(), 2);
        assert_record(&usage[0], &plain_id, plain, "reported", "completed");
        assert_record(&usage[1], &stream_id, streamed, "reported", "completed");
        assert_balance(&balance, 10, &usage);
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// The default `on_client_disconnect = "finish"`: a client that hangs up early still owes the
/// reasoning the upstream bills, which no count of the visible text could find.
#[tokio::test]
async fn a_client_that_leaves_a_reasoning_stream_pays_for_the_reasoning() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("quitter");
        app.grant("quitter", "10").await;
        // 40 tokens: 20 of reasoning and 20 words, one every 50 ms; the client leaves after 2.
        let request = chat_request("mock-slow-reasoning", "take your time", 40, true);
        let response = app.chat(&user, &request).await;
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let mut stream = response.bytes_stream();
        let mut received = Vec::new();
        while streamed_text(&sse_json(&received))
            .split_whitespace()
            .count()
            < 2
        {
            let chunk = stream.next().await.expect("more chunks").expect("chunk");
            received.extend_from_slice(&chunk);
        }
        drop(stream);

        let upstream = direct_replay(&app, "/chat/completions").await;
        let reported = reported_in_stream(&upstream);
        assert_eq!(reported.1, 40);
        let balance = released_within(&app, &user, Duration::from_secs(10)).await;
        let usage = records(&app, &user).await;
        assert_eq!(usage.len(), 1);
        assert_record(&usage[0], &id, reported, "reported", "client_disconnected");
        assert_balance(&balance, 10, &usage);
        app.assert_ledger_consistent().await;
    })
    .await;
}

#[tokio::test]
async fn audio_prompt_tokens_are_billed_as_the_upstream_reports_them() {
    run_test(async || {
    let app = spawn_app().await;
    let user = token("listener");
    // Audio cannot be sized before the call: the hold covers the model's whole context window.
    app.grant("listener", "1000").await;
    let request = json!({
        "model": "mock-audio",
        "max_tokens": 8,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is said here"},
            {"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZF", "format": "wav"}},
        ]}],
    });
    let response = app.chat(&user, &request).await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let answer: Value = response.json().await.expect("json");
    assert_eq!(
        answer["usage"]["prompt_tokens_details"]["audio_tokens"],
        120
    );
    let tokens = reported(&answer["usage"]);
    assert_eq!(tokens.0, 3 + 4 + 120, "text and audio");
    assert_ne!(
        tokens.0,
        count_prompt(Endpoint::ChatCompletions, "mock-audio", &request),
        "the gateway's own estimate differs, so the bill shows which one was used"
    );

    let balance = released_within(&app, &user, Duration::from_secs(5)).await;
    let usage = records(&app, &user).await;
    assert_eq!(usage.len(), 1);
    assert_record(&usage[0], &id, tokens, "reported", "completed");
    assert!(
        credits(&usage[0]["hold"]) >= Decimal::from(128),
        "{}",
        usage[0]
    );
    assert_balance(&balance, 1000, &usage);
    app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Usage on a content chunk

#[tokio::test]
async fn usage_on_the_last_content_chunk_is_forwarded_untouched_and_billed_once() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("inline");
        app.grant("inline", "10").await;
        let chat = chat_request("mock-inlineusage", "say something short", 6, true);
        let mut asked = chat.clone();
        asked["stream_options"] = json!({"include_usage": true});
        let completions = json!({"model": "mock-inlineusage", "prompt": "once upon a time",
        "max_tokens": 5, "stream": true});
        let cases = [
            ("/v1/chat/completions", "/chat/completions", &chat),
            ("/v1/chat/completions", "/chat/completions", &asked),
            ("/v1/completions", "/completions", &completions),
        ];
        let mut expected = Vec::new();
        for (path, upstream_path, request) in cases {
            let response = app.post(path, &user, request).await;
            assert_eq!(response.status(), 200);
            let id = request_id(&response);
            let through = response.bytes().await.expect("stream").to_vec();
            let upstream = direct_replay(&app, upstream_path).await;
            // The usage rides on a chunk with output: it is not the gateway's to remove.
            assert_eq!(
                through, upstream,
                "{path}: the client gets the upstream's bytes"
            );
            let with_usage: Vec<Value> = payloads(&through)
                .into_iter()
                .filter(|p| p["usage"].is_object())
                .collect();
            assert_eq!(with_usage.len(), 1, "{path}");
            assert_ne!(with_usage[0]["choices"], json!([]), "{path}");
            expected.push((id, reported(&with_usage[0]["usage"])));
        }

        let balance = released_within(&app, &user, Duration::from_secs(5)).await;
        let usage = records(&app, &user).await;
        assert_eq!(usage.len(), expected.len(), "one record per request");
        for (record, (id, tokens)) in usage.iter().zip(&expected) {
            assert_record(record, id, *tokens, "reported", "completed");
        }
        let charges = app
            .list("/api/credits/transactions?limit=100", &user)
            .await
            .into_iter()
            .filter(|t| t["type"] == "usage")
            .count();
        assert_eq!(charges, expected.len(), "each request charged once");
        assert_balance(&balance, 10, &usage);
        app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// SSE framing

#[tokio::test]
async fn every_sse_framing_reaches_the_client_byte_exact_and_is_billed_exactly() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("framer");
        app.grant("framer", "100").await;
        // Multi-byte characters in the prompt come back in the reply, so `-split` cuts inside them.
        let prompt = "héllo 東京 🎉 wörld";
        let wires: [(&str, &[u8]); 9] = [
            ("mock-comments", b": keep-alive"),
            ("mock-eventlines", b"event: message\n"),
            ("mock-crlf", b"\r\n\r\n"),
            ("mock-nospace", b"data:{"),
            ("mock-merged", b""),
            ("mock-split", b""),
            ("mock-split-crlf", b"\r\n"),
            (
                "mock-crlf-nospace-eventlines-comments-merged",
                b"event:message\r\n",
            ),
            (
                "mock-split-crlf-nospace-eventlines-comments",
                b": keep-alive\r\n\r\nevent:message\r\ndata:{",
            ),
        ];
        let mut expected = Vec::new();
        for (model, marker) in wires {
            let chat = json!({"model": model, "max_tokens": 8, "stream": true,
            "messages": [{"role": "user", "content": prompt}]});
            let mut asked = chat.clone();
            asked["stream_options"] = json!({"include_usage": true});
            let completions =
                json!({"model": model, "prompt": prompt, "max_tokens": 7, "stream": true});
            let responses =
                json!({"model": model, "input": prompt, "max_output_tokens": 6, "stream": true});
            let cases = [
                ("/v1/chat/completions", "/chat/completions", &chat, true),
                ("/v1/chat/completions", "/chat/completions", &asked, false),
                ("/v1/completions", "/completions", &completions, true),
                ("/v1/responses", "/responses", &responses, false),
            ];
            for (path, upstream_path, request, stripped) in cases {
                let response = app.post(path, &user, request).await;
                assert_eq!(response.status(), 200, "{model} {path}");
                let id = request_id(&response);
                let through = response.bytes().await.expect("stream").to_vec();
                let upstream = direct_replay(&app, upstream_path).await;
                // Responses streams always have their own `event:` lines.
                if path != "/v1/responses" && !marker.is_empty() {
                    let on_the_wire = upstream.windows(marker.len()).any(|w| w == marker);
                    assert!(on_the_wire, "{model} is not on the wire");
                }
                let want = if stripped {
                    without_usage_chunk(&upstream)
                } else {
                    upstream.clone()
                };
                assert!(
                    through == want,
                    "{model} {path}: the client got\n{}\ninstead of\n{}",
                    String::from_utf8_lossy(&through).escape_debug(),
                    String::from_utf8_lossy(&want).escape_debug()
                );
                let text = streamed_text(&payloads(&through));
                assert!(text.contains("héllo"), "{model} {path}: {text}");
                expected.push((id, reported_in_stream(&upstream)));
            }
        }

        let balance = released_within(&app, &user, Duration::from_secs(5)).await;
        let usage = records(&app, &user).await;
        assert_eq!(usage.len(), expected.len());
        for (record, (id, tokens)) in usage.iter().zip(&expected) {
            assert_record(record, id, *tokens, "reported", "completed");
        }
        assert_balance(&balance, 100, &usage);
        app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// In-band failures

/// Reads a whole response: its status, request id, bytes, and when its last byte came.
async fn read_all(response: reqwest::Response) -> (u16, String, Vec<u8>, Instant) {
    let status = response.status().as_u16();
    let id = request_id(&response);
    let bytes = response.bytes().await.expect("a whole body").to_vec();
    (status, id, bytes, Instant::now())
}

/// What is left of a second since `ended`.
fn rest_of_a_second(ended: Instant) -> Duration {
    Duration::from_secs(1).saturating_sub(ended.elapsed())
}

/// A 200 stream that turns into an error after some output is billed for that output: the
/// upstream reported no usage, so the prompt and the text are counted. The record says the
/// upstream failed, and the hold is gone within a second.
#[tokio::test]
async fn an_error_inside_a_200_stream_bills_the_output_before_it() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("inband");
        app.grant("inband", "10").await;
        let model = "mock-inbanderror";
        let chat = chat_request(model, "tell me a long story", 30, true);
        let completions = json!({"model": model, "prompt": "a long story", "max_tokens": 30,
        "stream": true});
        let responses = json!({"model": model, "input": "a long story", "max_output_tokens": 30,
        "stream": true});
        let cases = [
            (Endpoint::ChatCompletions, &chat),
            (Endpoint::Completions, &completions),
            (Endpoint::Responses, &responses),
        ];
        let mut expected = Vec::new();
        for (endpoint, request) in cases {
            let path = format!("/v1/{}", endpoint.path());
            let (status, id, through, ended) =
                read_all(app.post(&path, &user, request).await).await;
            assert_eq!(status, 200, "{path}");
            let upstream = direct_replay(&app, &format!("/{}", endpoint.path())).await;
            assert_eq!(
                through, upstream,
                "{path}: the error reaches the client as sent"
            );
            let sent = payloads(&through);
            let last = sent.last().expect("payloads");
            assert!(
                last["error"].is_object() || last["type"] == "error",
                "{path}: ends with the error: {last}"
            );
            assert!(!String::from_utf8_lossy(&through).contains("[DONE]"));
            let text = streamed_text(&sent);
            assert_eq!(text.split_whitespace().count(), 3, "{path}: {text}");

            released_within(&app, &user, rest_of_a_second(ended)).await;
            let counted = (
                count_prompt(endpoint, model, request),
                count_text(model, &text),
            );
            expected.push((id, counted));
        }

        let balance = released_within(&app, &user, Duration::from_secs(1)).await;
        let usage = records(&app, &user).await;
        assert_eq!(usage.len(), expected.len());
        for (record, (id, tokens)) in usage.iter().zip(&expected) {
            assert_record(record, id, *tokens, "counted", "upstream_failed");
        }
        assert_balance(&balance, 10, &usage);
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// `response.incomplete` carries usage: that is billed. `response.failed` carries none: the
/// output before it is counted. Both with and without a stream; every hold gone within a second.
#[tokio::test]
async fn a_response_that_ends_incomplete_or_failed_bills_usage_or_output() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("partial");
        app.grant("partial", "10").await;
        let mut expected = Vec::new();
        for model in ["mock-incomplete", "mock-failed"] {
            for stream in [true, false] {
                let request = json!({"model": model, "input": "write me an essay",
                "max_output_tokens": 40, "stream": stream});
                let (status, id, through, ended) =
                    read_all(app.post("/v1/responses", &user, &request).await).await;
                assert_eq!(status, 200, "{model} stream {stream}");
                assert_eq!(through, direct_replay(&app, "/responses").await);
                let response = if stream {
                    payloads(&through).pop().expect("events")["response"].clone()
                } else {
                    serde_json::from_slice(&through).expect("json")
                };
                let text = response["output"][0]["content"][0]["text"]
                    .as_str()
                    .expect("partial text");
                assert_eq!(text, "Mock reply to:");
                let (tokens, source, status) = if model == "mock-incomplete" {
                    assert_eq!(response["status"], "incomplete");
                    (reported(&response["usage"]), "reported", "completed")
                } else {
                    assert_eq!(response["status"], "failed");
                    assert_eq!(response["usage"], Value::Null);
                    let counted = (
                        count_prompt(Endpoint::Responses, model, &request),
                        count_text(model, text),
                    );
                    (counted, "counted", "upstream_failed")
                };
                released_within(&app, &user, rest_of_a_second(ended)).await;
                expected.push((id, tokens, source, status));
            }
        }

        let balance = released_within(&app, &user, Duration::from_secs(1)).await;
        let usage = records(&app, &user).await;
        assert_eq!(usage.len(), expected.len());
        for (record, (id, tokens, source, status)) in usage.iter().zip(&expected) {
            assert_record(record, id, *tokens, source, status);
        }
        assert_balance(&balance, 10, &usage);
        app.assert_ledger_consistent().await;
    })
    .await;
}

/// A `200` whose body is only an error object produced nothing and reported nothing: nothing
/// is charged, and the client gets the body as the upstream sent it.
#[tokio::test]
async fn a_200_answer_that_is_an_error_costs_nothing() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("errbody");
        app.grant("errbody", "10").await;
        let model = "mock-inbanderror";
        let cases = [
            ("chat/completions", chat_request(model, "hello", 10, false)),
            (
                "completions",
                json!({"model": model, "prompt": "hello", "max_tokens": 10}),
            ),
            ("embeddings", json!({"model": model, "input": "hello"})),
            ("responses", json!({"model": model, "input": "hello"})),
        ];
        for (path, request) in cases {
            let (status, _, through, ended) =
                read_all(app.post(&format!("/v1/{path}"), &user, &request).await).await;
            assert_eq!(status, 200, "{path}");
            assert_eq!(through, direct_replay(&app, &format!("/{path}")).await);
            let body: Value = serde_json::from_slice(&through).expect("json");
            assert_eq!(body["error"]["type"], "server_error", "{path}: {body}");
            let balance = released_within(&app, &user, rest_of_a_second(ended)).await;
            assert_eq!(balance["balance"], "10", "{path}: charged for an error");
        }
        assert!(app.list("/api/credits/usage", &user).await.is_empty());
        app.assert_ledger_consistent().await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A stream that stalls

#[tokio::test]
async fn a_stream_that_stalls_is_cut_at_the_idle_timeout_and_billed_for_its_output() {
    run_test(async || {
    let upstreams = format!(
        "[[upstreams]]\nname = \"fake\"\nbase_url = \"{{fake}}\"\napi_key = \"{UPSTREAM_KEY}\"\n\
         models = [\"mock-*\"]\nidle_timeout_secs = 1\n"
    );
    let app = spawn_app_with(Options {
        upstreams: Some(upstreams),
        ..Options::default()
    })
    .await;
    let user = token("staller");
    app.grant("staller", "10").await;
    let model = "mock-stall";
    let request = chat_request(model, "never finish", 50, true);

    let started = Instant::now();
    let response = app.chat(&user, &request).await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    let broke = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => received.extend_from_slice(&bytes),
                Err(_) => return true,
            }
        }
        false
    })
    .await
    .expect("the gateway gave up on the stalled upstream within 10 s");
    assert!(
        broke,
        "the client must see a broken stream, not a clean end"
    );
    let ended = Instant::now();
    assert!(
        ended - started >= Duration::from_secs(1),
        "cut before the idle timeout"
    );
    // The 3 frames before the stall: the role chunk and two words.
    let text = streamed_text(&sse_json(&received));
    assert_eq!(text, "Mock reply");

    let balance = released_within(&app, &user, rest_of_a_second(ended)).await;
    let usage = records(&app, &user).await;
    assert_eq!(usage.len(), 1);
    let counted = (
        count_prompt(Endpoint::ChatCompletions, model, &request),
        count_text(model, &text),
    );
    assert_record(&usage[0], &id, counted, "counted", "upstream_timeout");
    assert_balance(&balance, 10, &usage);

    // A plain answer that stalls half-way is a 504 and costs nothing.
    let response = app
        .chat(&user, &chat_request(model, "never finish", 50, false))
        .await;
    let error = openai_error(response, 504).await;
    assert!(!error["message"].as_str().expect("message").is_empty());
    let after = released_within(&app, &user, Duration::from_secs(1)).await;
    assert_eq!(after["balance"], balance["balance"]);
    assert_eq!(records(&app, &user).await.len(), 1);
    app.assert_ledger_consistent().await;
    })
    .await;
}

/// An upstream that reports an error in-band and then keeps the connection open: nothing after
/// the error changes what is owed, so the stream ends (and settles) a second later instead of
/// waiting out the idle timeout with the client hanging and the hold held.
#[tokio::test]
async fn an_in_band_error_on_a_connection_left_open_ends_the_stream_promptly() {
    run_test(async || {
        let app = spawn_app().await;
        let user = token("hangopen");
        app.grant("hangopen", "10").await;
        let body = json!({
            "model": "mock-inbanderror-hangopen",
            "messages": [{"role": "user", "content": "fail and hang"}],
            "max_tokens": 20,
            "stream": true
        });
        let started = Instant::now();
        let response = app.chat(&user, &body).await;
        assert_eq!(response.status(), 200);
        let bytes = response
            .bytes()
            .await
            .expect("the stream ends cleanly after the error");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the stream waited {:?} for an upstream that had already failed (idle timeout is 5 s)",
            started.elapsed()
        );
        assert!(String::from_utf8_lossy(&bytes).contains("\"error\""));
        let balance = app.settled_balance(&user).await;
        assert_eq!(balance["held"], "0");
        let usage = app.list("/api/credits/usage", &user).await;
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0]["status"], "upstream_failed");
        app.assert_ledger_consistent().await;
    })
    .await;
}
