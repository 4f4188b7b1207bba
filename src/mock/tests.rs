//! The mock against real clients: every endpoint, knob and wire shape.

use super::*;
use futures_util::StreamExt as _;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::header;
use base64::Engine as _;

const REPLY_16: &str = "Mock reply to: Hello there mock Mock reply to: Hello there mock \
                        Mock reply to: Hello";

async fn spawn(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

async fn post(base: &str, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .expect("send request")
}

async fn body_json(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// A system and a user message: 12 prompt tokens by the documented rule.
fn chat(model: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello there mock"},
    ]});
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

#[derive(Debug)]
struct Event {
    name: Option<String>,
    data: String,
}

fn parse_sse(text: &str) -> Vec<Event> {
    assert!(
        text.ends_with("\n\n"),
        "an SSE stream ends with a blank line: {text:?}"
    );
    text.split("\n\n")
        .filter(|block| !block.is_empty())
        .map(|block| {
            let mut event = Event {
                name: None,
                data: String::new(),
            };
            for line in block.lines() {
                if let Some(name) = line.strip_prefix("event: ") {
                    event.name = Some(name.to_owned());
                } else if let Some(data) = line.strip_prefix("data: ") {
                    assert!(event.data.is_empty(), "one data line per event: {block:?}");
                    event.data = data.to_owned();
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            event
        })
        .collect()
}

async fn stream_events(response: reqwest::Response) -> Vec<Event> {
    assert_eq!(response.status(), 200);
    assert_eq!(content_type(&response), "text/event-stream");
    parse_sse(&response.text().await.expect("stream body"))
}

/// The JSON chunks of a chat/completions stream, checking it ends with exactly one `[DONE]`.
fn data_chunks(events: &[Event]) -> Vec<Value> {
    let (last, chunks) = events.split_last().expect("at least one event");
    assert_eq!(last.data, "[DONE]");
    chunks
        .iter()
        .map(|event| {
            assert_eq!(event.name, None, "chat streams have no event: lines");
            serde_json::from_str(&event.data).expect("chunk is JSON")
        })
        .collect()
}

fn chat_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Every body frame with its arrival time, and whether the transfer ended in an error.
async fn frames(response: reqwest::Response) -> (Vec<(Instant, String)>, bool) {
    let mut body = response.bytes_stream();
    let mut frames = Vec::new();
    while let Some(frame) = body.next().await {
        match frame {
            Ok(bytes) => {
                let text = std::str::from_utf8(&bytes).expect("UTF-8 frame").to_owned();
                frames.push((Instant::now(), text));
            }
            Err(_) => return (frames, true),
        }
    }
    (frames, false)
}

#[tokio::test]
async fn chat_non_stream_has_openai_shape_and_usage() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let response = post(&base, "/chat/completions", &chat("mock-1", json!({}))).await;
        assert_eq!(response.status(), 200);
        assert_eq!(content_type(&response), "application/json");
        let body = body_json(response).await;
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "mock-1");
        assert!(body["id"].as_str().expect("id").starts_with("chatcmpl-"));
        let choice = &body["choices"][0];
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], REPLY_16);
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(body["usage"]["prompt_tokens"], 12);
        assert_eq!(body["usage"]["completion_tokens"], 16);
        assert_eq!(body["usage"]["total_tokens"], 28);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

        let again =
            body_json(post(&base, "/chat/completions", &chat("mock-1", json!({}))).await).await;
        assert_eq!(again, body, "the same request gets the same answer");
    })
    .await;
}

#[tokio::test]
async fn chat_reply_length_follows_max_tokens_and_content_parts() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let short = chat(
            "mock-1",
            json!({"max_completion_tokens": 2, "max_tokens": 9}),
        );
        let body = body_json(post(&base, "/chat/completions", &short).await).await;
        assert_eq!(body["choices"][0]["message"]["content"], "Mock reply");
        assert_eq!(body["usage"]["completion_tokens"], 2);

        let long = chat("mock-1", json!({"max_tokens": 8}));
        let body = body_json(post(&base, "/chat/completions", &long).await).await;
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "Mock reply to: Hello there mock Mock reply"
        );

        let parts = json!({"model": "mock-1", "max_tokens": 5, "messages": [{"role": "user",
        "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "you all"}]}]});
        let body = body_json(post(&base, "/chat/completions", &parts).await).await;
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "Mock reply to: Hi you"
        );
        assert_eq!(body["usage"]["prompt_tokens"], 3 + 3);
    })
    .await;
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat("mock-1", json!({"stream": true}));
        let chunks =
            data_chunks(&stream_events(post(&base, "/chat/completions", &request).await).await);
        assert_eq!(chunks.len(), 1 + 16 + 1);
        let first = &chunks[0]["choices"][0];
        assert_eq!(first["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(first["finish_reason"], Value::Null);
        for chunk in &chunks[1..17] {
            let delta = chunk["choices"][0]["delta"]
                .as_object()
                .expect("delta object");
            assert_eq!(
                delta.len(),
                1,
                "a content delta carries only content: {delta:?}"
            );
            assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        }
        let last = &chunks[17]["choices"][0];
        assert_eq!(last["delta"], json!({}));
        assert_eq!(last["finish_reason"], "stop");
        assert_eq!(chat_text(&chunks), REPLY_16);
        for chunk in &chunks {
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert!(
                chunk.get("usage").is_none(),
                "no usage without include_usage: {chunk}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn chat_stream_with_include_usage_ends_with_usage_chunk() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat(
            "mock-1",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let chunks =
            data_chunks(&stream_events(post(&base, "/chat/completions", &request).await).await);
        assert_eq!(chunks.len(), 1 + 16 + 1 + 1);
        let (usage_chunk, content_chunks) = chunks.split_last().expect("chunks");
        for chunk in content_chunks {
            assert_eq!(
                chunk.get("usage"),
                Some(&Value::Null),
                "usage: null on {chunk}"
            );
        }
        assert_eq!(content_chunks[17]["choices"][0]["finish_reason"], "stop");
        assert_eq!(usage_chunk["choices"], json!([]));
        let usage = &usage_chunk["usage"];
        assert_eq!(usage["prompt_tokens"], 12);
        assert_eq!(usage["completion_tokens"], 16);
        assert_eq!(usage["total_tokens"], 28);
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
        assert_eq!(chat_text(&chunks), REPLY_16);
    })
    .await;
}

#[tokio::test]
async fn each_event_is_its_own_frame() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat("mock-1", json!({"stream": true, "max_tokens": 3}));
        let (frames, failed) = frames(post(&base, "/chat/completions", &request).await).await;
        assert!(!failed);
        assert_eq!(frames.len(), 1 + 3 + 1 + 1);
        for (_, frame) in &frames {
            assert_eq!(parse_sse(frame).len(), 1, "one event per frame: {frame:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn nousage_knob_never_reports_usage() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let body =
            body_json(post(&base, "/chat/completions", &chat("mock-nousage", json!({}))).await)
                .await;
        assert_eq!(body["choices"][0]["message"]["content"], REPLY_16);
        assert!(body.get("usage").is_none());

        let request = chat(
            "mock-nousage",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let chunks =
            data_chunks(&stream_events(post(&base, "/chat/completions", &request).await).await);
        assert_eq!(chunks.len(), 1 + 16 + 1);
        assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));

        let completion = json!({"model": "mock-nousage", "prompt": "hi"});
        assert!(
            body_json(post(&base, "/completions", &completion).await)
                .await
                .get("usage")
                .is_none()
        );
        let embedding = json!({"model": "mock-nousage", "input": "hi"});
        assert!(
            body_json(post(&base, "/embeddings", &embedding).await)
                .await
                .get("usage")
                .is_none()
        );
        let response = json!({"model": "mock-nousage", "input": "hi"});
        assert_eq!(
            body_json(post(&base, "/responses", &response).await).await["usage"],
            Value::Null
        );
    })
    .await;
}

#[tokio::test]
async fn slow_knob_spaces_frames_and_combines_with_nousage() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat(
            "mock-slow-nousage",
            json!({"stream": true, "max_tokens": 2, "stream_options": {"include_usage": true}}),
        );
        let started = Instant::now();
        let (frames, failed) = frames(post(&base, "/chat/completions", &request).await).await;
        assert!(!failed);
        assert_eq!(frames.len(), 1 + 2 + 1 + 1, "no usage chunk under -nousage");
        // Timing of single gaps depends on the scheduler; the total cannot be shorter.
        assert!(started.elapsed() >= SLOW_DELAY * 4);
        for (_, frame) in &frames {
            assert_eq!(parse_sse(frame).len(), 1, "one event per frame: {frame:?}");
        }
        let text: String = frames.iter().map(|(_, frame)| frame.as_str()).collect();
        assert!(!text.contains("\"usage\""), "no usage key: {text}");
        assert!(text.ends_with("data: [DONE]\n\n"));
    })
    .await;
}

#[tokio::test]
async fn error_knobs_answer_in_openai_error_shape_before_output() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        for (model, status, kind, code) in [
            ("mock-error500", 500, "server_error", Value::Null),
            (
                "mock-error429",
                429,
                "requests",
                json!("rate_limit_exceeded"),
            ),
        ] {
            let requests = [
                ("/chat/completions", chat(model, json!({"stream": true}))),
                ("/chat/completions", chat(model, json!({}))),
                (
                    "/completions",
                    json!({"model": model, "prompt": "hi", "stream": true}),
                ),
                ("/embeddings", json!({"model": model, "input": "hi"})),
                (
                    "/responses",
                    json!({"model": model, "input": "hi", "stream": true}),
                ),
            ];
            for (path, request) in requests {
                let response = post(&base, path, &request).await;
                assert_eq!(response.status(), status, "{model} on {path}");
                assert_eq!(content_type(&response), "application/json");
                let error = &body_json(response).await["error"];
                assert!(!error["message"].as_str().expect("message").is_empty());
                assert_eq!(error["type"], kind);
                assert_eq!(error["param"], Value::Null);
                assert_eq!(error["code"], code);
            }
        }
    })
    .await;
}

#[tokio::test]
async fn cached_knob_reports_half_the_prompt_as_cached() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let body =
            body_json(post(&base, "/chat/completions", &chat("mock-cached", json!({}))).await)
                .await;
        assert_eq!(body["usage"]["prompt_tokens"], 12);
        assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 6);

        let request = chat(
            "mock-cached",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let chunks =
            data_chunks(&stream_events(post(&base, "/chat/completions", &request).await).await);
        let usage = &chunks.last().expect("usage chunk")["usage"];
        assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 6);

        // "one two three four five" is 3 + 5 = 8 input tokens.
        let request = json!({"model": "mock-cached", "input": "one two three four five"});
        let body = body_json(post(&base, "/responses", &request).await).await;
        assert_eq!(body["usage"]["input_tokens"], 8);
        assert_eq!(body["usage"]["input_tokens_details"]["cached_tokens"], 4);
    })
    .await;
}

#[tokio::test]
async fn midfail_knob_aborts_after_three_frames() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat("mock-midfail", json!({"stream": true}));
        let response = post(&base, "/chat/completions", &request).await;
        assert_eq!(response.status(), 200);
        let (frames, failed) = frames(response).await;
        assert!(failed, "the transfer must break, not end cleanly");
        let text: String = frames.iter().map(|(_, frame)| frame.as_str()).collect();
        let events = parse_sse(&text);
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|event| event.data != "[DONE]"));
        let chunks: Vec<Value> = events
            .iter()
            .map(|event| serde_json::from_str(&event.data).expect("chunk JSON"))
            .collect();
        assert_eq!(chat_text(&chunks), "Mock reply");

        let response = post(&base, "/chat/completions", &chat("mock-midfail", json!({}))).await;
        assert_eq!(response.status(), 200);
        assert!(
            response.bytes().await.is_err(),
            "a JSON answer is cut off too"
        );
    })
    .await;
}

/// Every body frame as raw bytes (a frame may end mid-character), and whether the transfer
/// ended in an error.
async fn raw_frames(response: reqwest::Response) -> (Vec<Bytes>, bool) {
    let mut body = response.bytes_stream();
    let mut frames = Vec::new();
    while let Some(frame) = body.next().await {
        match frame {
            Ok(bytes) => frames.push(bytes),
            Err(_) => return (frames, true),
        }
    }
    (frames, false)
}

/// Parses any framing the wire knobs produce: CRLF or LF, with or without the space after
/// the colon, comment lines skipped. Events without data (comment-only) are dropped.
fn parse_wire(bytes: &[u8]) -> Vec<Event> {
    let text = std::str::from_utf8(bytes).expect("a whole stream is UTF-8");
    let text = text.replace("\r\n", "\n");
    assert!(text.ends_with("\n\n"), "ends with a blank line: {text:?}");
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = Event {
                name: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').expect("field: value");
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event.name = Some(value.to_owned()),
                    "data" => {
                        assert!(!has_data, "one data line per event: {block:?}");
                        event.data = value.to_owned();
                        has_data = true;
                    }
                    _ => panic!("unexpected SSE line {line:?}"),
                }
            }
            has_data.then_some(event)
        })
        .collect()
}

#[tokio::test]
async fn reasoning_knob_spends_half_the_budget_on_invisible_tokens() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat("mock-reasoning", json!({"max_completion_tokens": 11}));
        let body = body_json(post(&base, "/chat/completions", &request).await).await;
        // 11 tokens: 5 of reasoning, 6 words of reply.
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "Mock reply to: Hello there mock"
        );
        let usage = &body["usage"];
        assert_eq!(usage["completion_tokens"], 11);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 5);
        assert_eq!(usage["total_tokens"], 12 + 11);

        let request = chat(
            "mock-reasoning",
            json!({"max_tokens": 11, "n": 2, "stream": true,
               "stream_options": {"include_usage": true}}),
        );
        let chunks =
            data_chunks(&stream_events(post(&base, "/chat/completions", &request).await).await);
        let text: String = chunks
            .iter()
            .filter(|chunk| chunk["choices"][0]["index"] == 1)
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Mock reply to: Hello there mock");
        let usage = &chunks.last().expect("usage chunk")["usage"];
        assert_eq!(usage["completion_tokens"], 22, "both choices reasoned");
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 10);

        let request =
            json!({"model": "mock-reasoning", "input": "Hi there", "max_output_tokens": 6});
        let body = body_json(post(&base, "/responses", &request).await).await;
        assert_eq!(body["output"][0]["type"], "reasoning");
        assert_eq!(body["output"][0]["summary"], json!([]));
        assert_eq!(body["output"][1]["content"][0]["text"], "Mock reply to:");
        assert_eq!(body["usage"]["output_tokens"], 6);
        assert_eq!(
            body["usage"]["output_tokens_details"]["reasoning_tokens"],
            3
        );

        let mut request = request;
        request["stream"] = json!(true);
        let events = stream_events(post(&base, "/responses", &request).await).await;
        let payloads: Vec<Value> = events
            .iter()
            .map(|event| serde_json::from_str(&event.data).expect("JSON"))
            .collect();
        let kinds: Vec<&str> = payloads
            .iter()
            .map(|p| p["type"].as_str().expect("type"))
            .collect();
        assert_eq!(
            kinds[..5],
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.output_item.done",
                "response.output_item.added"
            ]
        );
        assert_eq!(payloads[2]["item"]["type"], "reasoning");
        assert_eq!(payloads[4]["output_index"], 1);
        for delta in payloads
            .iter()
            .filter(|p| p["type"] == "response.output_text.delta")
        {
            assert_eq!(delta["output_index"], 1);
        }
        let completed = &payloads.last().expect("events")["response"];
        assert_eq!(completed["usage"], body["usage"]);
        assert_eq!(completed["output"][0]["type"], "reasoning");
        assert_eq!(
            completed["output"][1]["content"],
            body["output"][1]["content"]
        );
    })
    .await;
}

#[tokio::test]
async fn audio_knob_counts_input_audio_parts() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let audio =
            json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}});
        let messages = json!([{"role": "user", "content": [
        {"type": "text", "text": "Hello there"}, audio, audio]}]);
        let request = json!({"model": "mock-audio", "messages": messages});
        let body = body_json(post(&base, "/chat/completions", &request).await).await;
        assert_eq!(body["usage"]["prompt_tokens"], 3 + 2 + 2 * 120);
        assert_eq!(body["usage"]["prompt_tokens_details"]["audio_tokens"], 240);
        assert_eq!(body["usage"]["completion_tokens"], 16);

        let request = json!({"model": "mock-1", "messages": messages});
        let body = body_json(post(&base, "/chat/completions", &request).await).await;
        assert_eq!(
            body["usage"]["prompt_tokens"],
            3 + 2,
            "audio is free without the knob"
        );
        assert_eq!(body["usage"]["prompt_tokens_details"]["audio_tokens"], 0);
    })
    .await;
}

#[tokio::test]
async fn inlineusage_knob_puts_usage_on_the_last_content_chunk() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat(
            "mock-inlineusage",
            json!({"max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}}),
        );
        let chunks =
            data_chunks(&stream_events(post(&base, "/chat/completions", &request).await).await);
        assert_eq!(chunks.len(), 1 + 3, "no finish-only or usage-only chunk");
        assert_eq!(chat_text(&chunks), "Mock reply to:");
        let (last, rest) = chunks.split_last().expect("chunks");
        assert!(rest.iter().all(|chunk| chunk.get("usage").is_none()));
        assert_eq!(last["choices"][0]["delta"], json!({"content": " to:"}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["usage"]["completion_tokens"], 3);
        assert_eq!(last["usage"]["prompt_tokens"], 12);

        let request = json!({"model": "mock-inlineusage", "prompt": "Say hi", "max_tokens": 2,
        "n": 2, "stream": true, "stream_options": {"include_usage": true}});
        let chunks = data_chunks(&stream_events(post(&base, "/completions", &request).await).await);
        assert_eq!(chunks.len(), 2 * 2);
        let with_usage: Vec<&Value> = chunks.iter().filter(|c| c.get("usage").is_some()).collect();
        assert_eq!(with_usage.len(), 1);
        assert_eq!(with_usage[0]["choices"][0]["index"], 1);
        assert_eq!(with_usage[0]["choices"][0]["text"], " reply");
        assert_eq!(with_usage[0]["choices"][0]["finish_reason"], "stop");
        assert_eq!(with_usage[0]["usage"]["completion_tokens"], 4);

        // Without include_usage there is still no usage at all.
        let request = chat("mock-inlineusage", json!({"max_tokens": 3, "stream": true}));
        let chunks =
            data_chunks(&stream_events(post(&base, "/chat/completions", &request).await).await);
        assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
    })
    .await;
}

/// The events of `model`'s chat stream (include_usage) and its frames.
async fn wire_stream(base: &str, model: &str) -> (Vec<Bytes>, Vec<Event>) {
    let request = json!({"model": model, "max_tokens": 4, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "héllo 東京 🎉"}]});
    let response = post(base, "/chat/completions", &request).await;
    assert_eq!(response.status(), 200);
    let (frames, failed) = raw_frames(response).await;
    assert!(!failed);
    let events = parse_wire(&frames.concat());
    // Whatever the framing: role, 4 words, finish, usage, [DONE].
    assert_eq!(events.len(), 1 + 4 + 1 + 1 + 1, "{model}");
    assert_eq!(events[7].data, "[DONE]");
    let chunks: Vec<Value> = events[..7]
        .iter()
        .map(|event| serde_json::from_str(&event.data).expect("chunk JSON"))
        .collect();
    assert_eq!(chat_text(&chunks), "Mock reply to: héllo", "{model}");
    assert_eq!(chunks[6]["usage"]["completion_tokens"], 4, "{model}");
    (frames, events)
}

#[tokio::test]
async fn wire_knobs_change_the_framing_and_nothing_else() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;

        let (frames, _) = wire_stream(&base, "mock-comments").await;
        assert_eq!(frames.len(), 2 * 8);
        for pair in frames.chunks(2) {
            assert_eq!(pair[0], ": keep-alive\n\n");
            assert!(pair[1].starts_with(b"data: "));
        }

        let (frames, events) = wire_stream(&base, "mock-eventlines").await;
        assert_eq!(frames.len(), 8);
        assert!(
            frames
                .iter()
                .all(|f| f.starts_with(b"event: message\ndata: "))
        );
        assert!(events.iter().all(|e| e.name.as_deref() == Some("message")));

        let (frames, _) = wire_stream(&base, "mock-crlf").await;
        for frame in &frames {
            assert!(frame.ends_with(b"\r\n\r\n"), "{frame:?}");
            let text = String::from_utf8_lossy(frame);
            assert_eq!(text.matches('\n').count(), text.matches("\r\n").count());
        }

        let (frames, _) = wire_stream(&base, "mock-nospace-eventlines").await;
        for frame in &frames {
            assert!(frame.starts_with(b"event:message\ndata:"), "{frame:?}");
            assert!(!frame.windows(6).any(|w| w == b"data: "));
        }

        let (frames, _) = wire_stream(&base, "mock-merged").await;
        assert_eq!(frames.len(), 3, "8 events, 3 to a frame");
        assert_eq!(parse_wire(&frames[0]).len(), 3);
        assert_eq!(parse_wire(&frames[2]).len(), 2);

        let (frames, _) = wire_stream(&base, "mock-split-crlf").await;
        let starts = |prefix: &[u8]| frames.iter().filter(|f| f.starts_with(prefix)).count();
        assert_eq!(starts(b"ta: "), 8, "every data field name is cut");
        assert_eq!(starts(b"\n"), 2 * 8, "every CRLF is cut");
        let mid_character = frames
            .iter()
            .filter(|f| f.first().is_some_and(|b| (0x80..0xC0).contains(b)))
            .count();
        // One line has a multi-byte character: the delta " héllo" (the reply's 4th word).
        assert_eq!(mid_character, 1, "a frame starts inside a character");
        assert!(frames.iter().all(|f| !f.is_empty()));
    })
    .await;
}

#[tokio::test]
async fn wire_knobs_apply_to_responses_and_completions_streams() {
    crate::test_support::time_limit::limited(async move {
    let base = spawn(router()).await;
    let request = json!({"model": "mock-crlf-nospace-comments", "input": "Hi", "max_output_tokens": 2,
        "stream": true});
    let (frames, _) = raw_frames(post(&base, "/responses", &request).await).await;
    let bytes = frames.concat();
    let text = std::str::from_utf8(&bytes).expect("UTF-8");
    assert!(text.starts_with(": keep-alive\r\n\r\nevent:response.created\r\ndata:{"));
    let events = parse_wire(&bytes);
    assert_eq!(
        events.last().expect("events").name.as_deref(),
        Some("response.completed")
    );

    let request = json!({"model": "mock-eventlines-merged", "prompt": "Hi", "max_tokens": 2,
        "stream": true});
    let (frames, _) = raw_frames(post(&base, "/completions", &request).await).await;
    let events = parse_wire(&frames.concat());
    assert_eq!(
        frames.len(),
        2,
        "2 words, finish, [DONE]: 4 events, 3 to a frame"
    );
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| e.name.as_deref() == Some("message")));
    })
    .await;
}

#[tokio::test]
async fn inbanderror_knob_fails_after_three_words_with_a_200() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat(
            "mock-inbanderror",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let events = stream_events(post(&base, "/chat/completions", &request).await).await;
        let chunks: Vec<Value> = events
            .iter()
            .map(|event| serde_json::from_str(&event.data).expect("JSON, no [DONE]"))
            .collect();
        assert_eq!(chunks.len(), 1 + 3 + 1);
        assert_eq!(chat_text(&chunks), "Mock reply to:");
        let error = &chunks[4];
        assert_eq!(
            error.as_object().expect("object").len(),
            1,
            "only the error: {error}"
        );
        assert_eq!(error["error"]["type"], "server_error");
        assert!(chunks.iter().all(|chunk| !chunk["usage"].is_object()));

        let request = json!({"model": "mock-inbanderror", "prompt": "hi", "stream": true});
        let events = stream_events(post(&base, "/completions", &request).await).await;
        assert_eq!(events.len(), 3 + 1);
        assert!(events[3].data.starts_with("{\"error\":"));

        let request = json!({"model": "mock-inbanderror", "input": "hi", "stream": true});
        let events = stream_events(post(&base, "/responses", &request).await).await;
        let last = events.last().expect("events");
        assert_eq!(last.name.as_deref(), Some("error"));
        let error: Value = serde_json::from_str(&last.data).expect("JSON");
        assert_eq!(error["type"], "error");
        assert_eq!(error["code"], "server_error");
        let deltas = events
            .iter()
            .filter(|e| e.name.as_deref() == Some("response.output_text.delta"))
            .count();
        assert_eq!(deltas, 3);

        for (path, request) in [
            ("/chat/completions", chat("mock-inbanderror", json!({}))),
            (
                "/completions",
                json!({"model": "mock-inbanderror", "prompt": "hi"}),
            ),
            (
                "/embeddings",
                json!({"model": "mock-inbanderror", "input": "hi"}),
            ),
            (
                "/responses",
                json!({"model": "mock-inbanderror", "input": "hi"}),
            ),
        ] {
            let response = post(&base, path, &request).await;
            assert_eq!(response.status(), 200, "{path}");
            let body = body_json(response).await;
            assert_eq!(body.as_object().expect("object").len(), 1, "{path}: {body}");
            assert_eq!(body["error"]["type"], "server_error");
        }
    })
    .await;
}

#[tokio::test]
async fn incomplete_and_failed_knobs_end_a_response_after_three_words() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = json!({"model": "mock-incomplete", "input": "hi there", "stream": true});
        let events = stream_events(post(&base, "/responses", &request).await).await;
        let last = events.last().expect("events");
        assert_eq!(last.name.as_deref(), Some("response.incomplete"));
        let response = &serde_json::from_str::<Value>(&last.data).expect("JSON")["response"];
        assert_eq!(response["status"], "incomplete");
        assert_eq!(response["incomplete_details"]["reason"], "content_filter");
        assert_eq!(response["output"][0]["status"], "incomplete");
        assert_eq!(
            response["output"][0]["content"][0]["text"],
            "Mock reply to:"
        );
        assert_eq!(response["usage"]["output_tokens"], 3);
        assert_eq!(response["usage"]["input_tokens"], 3 + 2);
        let mut plain = request.clone();
        plain["stream"] = json!(false);
        let body = body_json(post(&base, "/responses", &plain).await).await;
        for key in ["status", "incomplete_details", "usage"] {
            assert_eq!(body[key], response[key], "{key}");
        }
        assert_eq!(
            body["output"][0]["content"],
            response["output"][0]["content"]
        );

        let request = json!({"model": "mock-failed", "input": "hi there", "stream": true});
        let events = stream_events(post(&base, "/responses", &request).await).await;
        let last = events.last().expect("events");
        assert_eq!(last.name.as_deref(), Some("response.failed"));
        let response = &serde_json::from_str::<Value>(&last.data).expect("JSON")["response"];
        assert_eq!(response["status"], "failed");
        assert_eq!(response["error"]["code"], "server_error");
        assert_eq!(response["usage"], Value::Null);
        assert_eq!(
            response["output"][0]["content"][0]["text"],
            "Mock reply to:"
        );
        let deltas = events
            .iter()
            .filter(|e| e.name.as_deref() == Some("response.output_text.delta"))
            .count();
        assert_eq!(deltas, 3);
        let mut plain = request.clone();
        plain["stream"] = json!(false);
        let body = body_json(post(&base, "/responses", &plain).await).await;
        for key in ["status", "error", "usage"] {
            assert_eq!(body[key], response[key], "{key}");
        }
        assert_eq!(
            body["output"][0]["content"],
            response["output"][0]["content"]
        );
    })
    .await;
}

#[tokio::test]
async fn stall_knob_stops_sending_without_closing() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = chat("mock-stall", json!({"stream": true}));
        let response = post(&base, "/chat/completions", &request).await;
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let mut received = Vec::new();
        while parse_wire_prefix(&received) < 3 {
            let frame = body.next().await.expect("a frame").expect("not an error");
            received.extend_from_slice(&frame);
        }
        // Nothing more comes, and the transfer does not end either: it hangs.
        let more = tokio::time::timeout(Duration::from_millis(300), body.next()).await;
        assert!(more.is_err(), "the stream went on: {more:?}");
        assert_eq!(parse_wire(&received).len(), 3);

        let response = post(&base, "/chat/completions", &chat("mock-stall", json!({}))).await;
        assert_eq!(response.status(), 200);
        let mut body = response.bytes_stream();
        let first = body.next().await.expect("half the body").expect("bytes");
        assert!(first.starts_with(b"{"));
        let more = tokio::time::timeout(Duration::from_millis(300), body.next()).await;
        assert!(more.is_err(), "the JSON answer went on: {more:?}");
    })
    .await;
}

/// Complete events in a stream received so far.
fn parse_wire_prefix(bytes: &[u8]) -> usize {
    String::from_utf8_lossy(bytes).matches("\n\n").count()
}

#[tokio::test]
async fn bad_requests_get_400_in_openai_shape() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let response = reqwest::Client::new()
            .post(format!("{base}/chat/completions"))
            .header("content-type", "application/json")
            .body("{\"model\": \"mock-1\", \"messages\": [")
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 400);
        let body = body_json(response).await;
        let error = body["error"].as_object().expect("error object");
        assert_eq!(error.len(), 4);
        assert!(!error["message"].as_str().expect("message").is_empty());
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], Value::Null);
        assert_eq!(error["code"], Value::Null);

        let cases = [
            (json!({"model": "mock-1"}), Some("messages")),
            (json!({"messages": []}), None),
            (
                chat("mock-1", json!({"stream_options": {"include_usage": true}})),
                Some("stream_options"),
            ),
            (
                chat("mock-1", json!({"max_tokens": "many"})),
                Some("max_tokens"),
            ),
        ];
        for (request, param) in cases {
            let response = post(&base, "/chat/completions", &request).await;
            assert_eq!(response.status(), 400, "{request}");
            let error = &body_json(response).await["error"];
            assert_eq!(error["type"], "invalid_request_error");
            assert_eq!(error["param"], json!(param));
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_route_is_404_in_openai_shape() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let response = post(&base, "/nope", &json!({})).await;
        assert_eq!(response.status(), 404);
        let error = &body_json(response).await["error"];
        assert_eq!(error["message"], "Invalid URL (POST /v1/nope)");
        assert_eq!(error["type"], "invalid_request_error");
    })
    .await;
}

#[tokio::test]
async fn embeddings_are_deterministic_vectors_of_eight() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = json!({"model": "mock-1", "input": ["hello world", "a second input"]});
        let body = body_json(post(&base, "/embeddings", &request).await).await;
        assert_eq!(body["object"], "list");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "total_tokens": 5})
        );
        let data = body["data"].as_array().expect("data");
        assert_eq!(data.len(), 2);
        let vectors: Vec<Vec<f64>> = data
            .iter()
            .enumerate()
            .map(|(i, item)| {
                assert_eq!(item["object"], "embedding");
                assert_eq!(item["index"], i);
                let vector = item["embedding"].as_array().expect("vector");
                vector.iter().map(|x| x.as_f64().expect("number")).collect()
            })
            .collect();
        for vector in &vectors {
            assert_eq!(vector.len(), 8);
            assert!(vector.iter().all(|x| (-1.0..=1.0).contains(x)));
        }
        assert_ne!(vectors[0], vectors[1]);

        let single = json!({"model": "mock-1", "input": "hello world"});
        let body = body_json(post(&base, "/embeddings", &single).await).await;
        assert_eq!(
            body["data"][0]["embedding"], data[0]["embedding"],
            "a pure function of the input"
        );

        let encoded =
            json!({"model": "mock-1", "input": "hello world", "encoding_format": "base64"});
        let body = body_json(post(&base, "/embeddings", &encoded).await).await;
        let b64 = body["data"][0]["embedding"]
            .as_str()
            .expect("base64 string");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64");
        let decoded: Vec<f64> = bytes
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        assert_eq!(decoded, vectors[0]);
    })
    .await;
}

#[tokio::test]
async fn completions_stream_and_non_stream() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = json!({"model": "mock-1", "prompt": "Say hi please", "max_tokens": 4});
        let body = body_json(post(&base, "/completions", &request).await).await;
        assert_eq!(body["object"], "text_completion");
        assert_eq!(body["choices"][0]["text"], "Mock reply to: Say");
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7})
        );

        let request = json!({"model": "mock-1", "prompt": "Say hi please", "max_tokens": 4,
        "stream": true, "stream_options": {"include_usage": true}});
        let chunks = data_chunks(&stream_events(post(&base, "/completions", &request).await).await);
        assert_eq!(chunks.len(), 4 + 1 + 1);
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(text, "Mock reply to: Say");
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[5]["choices"], json!([]));
        assert_eq!(chunks[5]["usage"]["total_tokens"], 7);
        assert!(
            chunks[..5]
                .iter()
                .all(|c| c.get("usage") == Some(&Value::Null))
        );
    })
    .await;
}

#[tokio::test]
async fn responses_non_stream_carries_output_and_usage() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let request = json!({"model": "mock-1", "instructions": "Be brief", "input": "Hello there",
        "max_output_tokens": 3});
        let body = body_json(post(&base, "/responses", &request).await).await;
        assert_eq!(body["object"], "response");
        assert_eq!(body["status"], "completed");
        assert_eq!(body["output"][0]["content"][0]["text"], "Mock reply to:");
        assert_eq!(body["usage"]["input_tokens"], 5 + 5);
        assert_eq!(body["usage"]["output_tokens"], 3);
        assert_eq!(body["usage"]["total_tokens"], 13);
        assert_eq!(body["usage"]["input_tokens_details"]["cached_tokens"], 0);
    })
    .await;
}

#[tokio::test]
async fn responses_stream_ends_with_completed_usage() {
    crate::test_support::time_limit::limited(async move {
    let base = spawn(router()).await;
    let request = json!({"model": "mock-1", "stream": true, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there"}]},
    ]});
    let events = stream_events(post(&base, "/responses", &request).await).await;
    let payloads: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let payload: Value = serde_json::from_str(&event.data).expect("event JSON");
            let name = event
                .name
                .as_deref()
                .expect("every event has an event: line");
            assert_eq!(payload["type"], name);
            assert_eq!(payload["sequence_number"], i);
            payload
        })
        .collect();
    assert_eq!(payloads[0]["type"], "response.created");
    assert_eq!(payloads[0]["response"]["status"], "in_progress");
    let text: String = payloads
        .iter()
        .filter(|p| p["type"] == "response.output_text.delta")
        .map(|p| p["delta"].as_str().expect("delta"))
        .collect();
    let expected =
        "Mock reply to: Hi there Mock reply to: Hi there Mock reply to: Hi there Mock";
    assert_eq!(text, expected);
    let completed = payloads.last().expect("events");
    assert_eq!(completed["type"], "response.completed");
    assert_eq!(completed["response"]["status"], "completed");
    assert_eq!(
        completed["response"]["output"][0]["content"][0]["text"],
        expected
    );
    let usage = &completed["response"]["usage"];
    assert_eq!(usage["input_tokens"], 3 + 2);
    assert_eq!(usage["output_tokens"], 16);
    assert_eq!(usage["total_tokens"], 21);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    })
    .await;
}

#[tokio::test]
async fn models_lists_the_mock_models() {
    crate::test_support::time_limit::limited(async move {
        let base = spawn(router()).await;
        let response = reqwest::get(format!("{base}/models")).await.expect("send");
        assert_eq!(response.status(), 200);
        let body = body_json(response).await;
        assert_eq!(body["object"], "list");
        let ids: Vec<&str> = body["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|model| model["id"].as_str().expect("id"))
            .collect();
        assert_eq!(ids, ["mock-1", "mock-large"]);
    })
    .await;
}

#[tokio::test]
async fn log_records_path_headers_and_body_without_echoing_the_key() {
    crate::test_support::time_limit::limited(async move {
        let (app, log) = router_with_log();
        let base = spawn(app).await;
        let request = chat(
            "mock-1",
            json!({"stream": true, "stream_options": {"include_usage": true},
               "x_unknown": {"nested": [1, 2]}}),
        );
        let response = reqwest::Client::new()
            .post(format!("{base}/chat/completions"))
            .header("authorization", "Bearer sk-upstream-secret")
            .header("x-custom", "yes")
            .json(&request)
            .send()
            .await
            .expect("send");
        let text = response.text().await.expect("body");
        assert!(!text.contains("sk-upstream-secret"));
        reqwest::get(format!("{base}/models")).await.expect("send");

        let requests = log.requests();
        assert_eq!(requests.len(), 2);
        let chat_request = &requests[0];
        assert_eq!(chat_request.method, "POST");
        assert_eq!(chat_request.path, "/v1/chat/completions");
        assert_eq!(
            chat_request.header("Authorization"),
            Some("Bearer sk-upstream-secret")
        );
        assert_eq!(chat_request.header("x-custom"), Some("yes"));
        assert_eq!(chat_request.body, request);
        let models_request = log.last().expect("last request");
        assert_eq!(models_request.path, "/v1/models");
        assert_eq!(models_request.body, Value::Null);
    })
    .await;
}

#[tokio::test]
async fn serve_runs_the_mock_on_a_listener() {
    crate::test_support::time_limit::limited(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(serve(listener));
        let request = chat("mock-large", json!({"max_tokens": 1}));
        let body =
            body_json(post(&format!("http://{addr}/v1"), "/chat/completions", &request).await)
                .await;
        assert_eq!(body["choices"][0]["message"]["content"], "Mock");
        assert_eq!(body["model"], "mock-large");
    })
    .await;
}
