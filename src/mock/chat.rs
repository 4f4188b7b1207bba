//! `POST /v1/chat/completions`.

use axum::response::Response;
use serde_json::{Value, json};

use super::*;

pub(super) fn chat_completions(call: &Call) -> Result<Response, ApiError> {
    let messages = call
        .body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::missing("messages"))?;
    let stream = call.stream()?;
    let budget = call.reply_len(&["max_completion_tokens", "max_tokens"])?;
    let (visible, reasoning) = call.knobs.split_budget(budget);
    let audio: u64 = if call.knobs.audio {
        let parts: u64 = messages
            .iter()
            .map(|message| audio_parts(message.get("content")))
            .sum();
        parts * AUDIO_PART_TOKENS
    } else {
        0
    };
    let text_tokens: u64 = messages
        .iter()
        .map(|message| MESSAGE_OVERHEAD + count_words(&content_text(message.get("content"))))
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .map(|message| content_text(message.get("content")))
        .unwrap_or_default();
    let words = reply_words(&last_user, visible);
    let (n, generated) = call.choices(false)?;
    let counts = Counts::new(
        text_tokens + audio,
        audio,
        (words.len(), reasoning),
        generated,
        call.knobs,
    );
    let id = format!("chatcmpl-mock{}", call.id);

    if !stream {
        if call.knobs.inband_error {
            return Ok(json_response(&inband_error(), call.knobs));
        }
        let choices: Vec<Value> = (0..n)
            .map(|index| {
                json!({
                    "index": index,
                    "message": {
                        "role": "assistant",
                        "content": words.join(" "),
                        "refusal": null,
                        "annotations": [],
                    },
                    "logprobs": null,
                    "finish_reason": "stop",
                })
            })
            .collect();
        let mut body = json!({
            "id": id,
            "object": "chat.completion",
            "created": CREATED,
            "model": call.model,
            "choices": choices,
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
        });
        if !call.knobs.no_usage {
            body["usage"] = counts.chat();
        }
        return Ok(json_response(&body, call.knobs));
    }

    let include_usage = call.include_usage();
    let inline_usage = include_usage && call.knobs.inline_usage;
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": call.model,
            "service_tier": "default",
            "system_fingerprint": "fp_mock",
            "choices": choices,
        });
        match usage {
            Some(usage) => chunk["usage"] = usage,
            None if include_usage && !inline_usage => chunk["usage"] = Value::Null,
            None => {}
        }
        sse_data(&chunk)
    };
    let choice = |index: usize, delta: Value, finish_reason: Value| json!([{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]);
    let role = || json!({"role": "assistant", "content": ""});
    let mut events = Vec::new();
    if call.knobs.inband_error {
        events.push(chunk(choice(0, role(), Value::Null), None));
        events.extend(
            word_deltas(&words)
                .take(FAIL_AFTER_WORDS)
                .map(|delta| chunk(choice(0, json!({"content": delta}), Value::Null), None)),
        );
        events.push(sse_data(&inband_error()));
        return Ok(sse_response(events, call.knobs));
    }
    for index in 0..n {
        events.push(chunk(choice(index, role(), Value::Null), None));
        let mut deltas: Vec<String> = word_deltas(&words).collect();
        // `-inlineusage`: the last word rides on the finish chunk, which may carry the usage.
        let last_word = if inline_usage { deltas.pop() } else { None };
        events.extend(
            deltas
                .into_iter()
                .map(|delta| chunk(choice(index, json!({"content": delta}), Value::Null), None)),
        );
        let finish_delta = last_word.map_or_else(|| json!({}), |delta| json!({"content": delta}));
        let usage = (inline_usage && index + 1 == n).then(|| counts.chat());
        events.push(chunk(choice(index, finish_delta, json!("stop")), usage));
    }
    if include_usage && !inline_usage {
        events.push(chunk(json!([]), Some(counts.chat())));
    }
    events.push(sse_done());
    Ok(sse_response(events, call.knobs))
}
