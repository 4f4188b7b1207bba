//! `POST /v1/completions`, and the prompt pieces (text or token ids) it and embeddings take.

use axum::response::Response;
use serde_json::{Value, json};

use super::*;

/// A `prompt` (completions) or `input` (embeddings) entry: text, or pre-tokenized ids.
pub(super) enum Piece {
    Text(String),
    Tokens(Vec<u64>),
}

impl Piece {
    pub(super) fn tokens(&self) -> u64 {
        match self {
            Self::Text(text) => count_words(text),
            Self::Tokens(ids) => ids.len() as u64,
        }
    }
}

/// Parses OpenAI's four accepted forms: a string, strings, one id array, id arrays.
pub(super) fn pieces(value: Option<&Value>, param: &'static str) -> Result<Vec<Piece>, ApiError> {
    let invalid =
        || ApiError::invalid_value(param, "a string, an array of strings, or token arrays");
    let ids = |items: &[Value]| {
        items
            .iter()
            .map(Value::as_u64)
            .collect::<Option<Vec<u64>>>()
    };
    match value {
        None | Some(Value::Null) => Err(ApiError::missing(param)),
        Some(Value::String(text)) => Ok(vec![Piece::Text(text.clone())]),
        Some(Value::Array(items)) if items.is_empty() => Err(invalid()),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => ids(items)
            .map(|ids| vec![Piece::Tokens(ids)])
            .ok_or_else(invalid),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => Some(Piece::Text(text.clone())),
                Value::Array(inner) => ids(inner).map(Piece::Tokens),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(invalid),
        Some(_) => Err(invalid()),
    }
}

pub(super) fn completions(call: &Call) -> Result<Response, ApiError> {
    let prompt = pieces(call.body.get("prompt"), "prompt")?;
    let stream = call.stream()?;
    let len = call.reply_len(&["max_tokens"])?;
    let last_text = prompt
        .iter()
        .rev()
        .find_map(|piece| match piece {
            Piece::Text(text) => Some(text.as_str()),
            Piece::Tokens(_) => None,
        })
        .unwrap_or_default();
    let words = reply_words(last_text, len);
    let (n, generated) = call.choices(true)?;
    let counts = Counts::new(
        prompt.iter().map(Piece::tokens).sum(),
        0,
        (words.len(), 0),
        generated,
        call.knobs,
    );
    let id = format!("cmpl-mock{}", call.id);
    let body = |choices: Value| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": CREATED,
            "model": call.model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        })
    };
    let choice = |index: usize, text: &str, finish_reason: Value| json!({"text": text, "index": index, "logprobs": null, "finish_reason": finish_reason});

    if !stream {
        if call.knobs.inband_error {
            return Ok(json_response(&inband_error(), call.knobs));
        }
        let text = words.join(" ");
        let choices: Vec<Value> = (0..n)
            .map(|index| choice(index, &text, json!("stop")))
            .collect();
        let mut body = body(Value::Array(choices));
        if !call.knobs.no_usage {
            body["usage"] = counts.completions();
        }
        return Ok(json_response(&body, call.knobs));
    }

    let include_usage = call.include_usage();
    let inline_usage = include_usage && call.knobs.inline_usage;
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut chunk = body(choices);
        match usage {
            Some(usage) => chunk["usage"] = usage,
            None if include_usage && !inline_usage => chunk["usage"] = Value::Null,
            None => {}
        }
        sse_data(&chunk)
    };
    let mut events = Vec::new();
    if call.knobs.inband_error {
        events.extend(
            word_deltas(&words)
                .take(FAIL_AFTER_WORDS)
                .map(|delta| chunk(json!([choice(0, &delta, Value::Null)]), None)),
        );
        events.push(sse_data(&inband_error()));
        return Ok(sse_response(events, call.knobs));
    }
    for index in 0..n {
        let mut deltas: Vec<String> = word_deltas(&words).collect();
        // `-inlineusage`: the last word rides on the finish chunk, which may carry the usage.
        let last_word = if inline_usage { deltas.pop() } else { None };
        events.extend(
            deltas
                .iter()
                .map(|delta| chunk(json!([choice(index, delta, Value::Null)]), None)),
        );
        let usage = (inline_usage && index + 1 == n).then(|| counts.completions());
        let finish = choice(index, last_word.as_deref().unwrap_or(""), json!("stop"));
        events.push(chunk(json!([finish]), usage));
    }
    if include_usage && !inline_usage {
        events.push(chunk(json!([]), Some(counts.completions())));
    }
    events.push(sse_done());
    Ok(sse_response(events, call.knobs))
}
