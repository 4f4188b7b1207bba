//! BPE token counting (tiktoken's o200k_base and cl100k_base, ranks embedded, works offline).
//!
//! Used to estimate a request's prompt before reserving credits, and to count prompt and
//! completion tokens when an upstream reports no usage. Each encoder is built once, on first use,
//! by tiktoken-rs's own singletons, so a gateway whose models all use one encoding never holds
//! the other's ranks, and an idle one holds neither. Measured in a release build on the 2-core
//! development machine: o200k_base takes about 45 MiB and its first request 0.3 s longer,
//! cl100k_base about 25 MiB and 0.13 s; an idle gateway stays near 20 MiB.

use serde_json::{Map, Value};
use tiktoken_rs::CoreBPE;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};

use super::Endpoint;

/// Framing tokens around every chat message (`<|start|>{role}<|message|>…<|end|>`), per OpenAI's
/// cookbook "How to count tokens with tiktoken" for every current chat model.
const TOKENS_PER_MESSAGE: u64 = 3;
/// A message's `name` costs one token on top of its text.
const TOKENS_PER_NAME: u64 = 1;
/// Every reply is primed with `<|start|>assistant<|message|>`.
const REPLY_PRIMING: u64 = 3;
/// Images (and any other non-text content part: audio, files) cannot be tokenized here, so each
/// counts a flat 85 tokens, OpenAI's charge for one low-detail image. This keeps an estimate
/// above zero; when the upstream reports usage, its numbers win.
const NON_TEXT_PART_TOKENS: u64 = 85;

/// Counts `text` with the model's encoding; special-token text such as `<|endoftext|>` is
/// counted as ordinary text, which is how the upstream treats it inside user content.
pub fn count_text(model: &str, text: &str) -> u64 {
    count_with(encoder_for(model), text)
}

/// Estimates the prompt tokens of a request body the way the upstream will bill them.
///
/// - chat: the cookbook framing (3 per message, +1 per `name`, +3 reply priming) plus every
///   string field of each message, text parts of content arrays, tool calls' names and
///   arguments, and the JSON text of `tools`/`functions`;
/// - completions: `prompt` (a string, strings, or token arrays counted by their length);
/// - embeddings: `input` (same shapes);
/// - responses: `instructions` (framed as one message) plus `input` (a string, framed as one user
///   message, or an array of items counted like chat messages), priming and `tools`.
pub fn count_prompt(endpoint: Endpoint, model: &str, request: &Value) -> u64 {
    let bpe = encoder_for(model);
    match endpoint {
        Endpoint::ChatCompletions => {
            let messages = request.get("messages").and_then(Value::as_array);
            let framed = messages.into_iter().flatten().fold(REPLY_PRIMING, |n, m| {
                n.saturating_add(message_tokens(bpe, m))
            });
            framed.saturating_add(tool_definitions(bpe, request))
        }
        Endpoint::Completions => request.get("prompt").map_or(0, |p| raw_input(bpe, p)),
        Endpoint::Embeddings => request.get("input").map_or(0, |i| raw_input(bpe, i)),
        Endpoint::Responses => {
            let mut n = REPLY_PRIMING;
            if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
                n = n
                    .saturating_add(TOKENS_PER_MESSAGE)
                    .saturating_add(count_with(bpe, instructions));
            }
            match request.get("input") {
                Some(Value::String(text)) => {
                    n = n
                        .saturating_add(TOKENS_PER_MESSAGE)
                        .saturating_add(count_with(bpe, "user"))
                        .saturating_add(count_with(bpe, text));
                }
                Some(Value::Array(items)) => {
                    n = items
                        .iter()
                        .fold(n, |n, m| n.saturating_add(message_tokens(bpe, m)));
                }
                _ => {}
            }
            n.saturating_add(tool_definitions(bpe, request))
        }
    }
}

/// o200k_base for the GPT-4o/4.1/5 and o-series families, cl100k_base for everything else.
///
/// Those families are matched by prefix (so new snapshots such as `gpt-5.2` need no update);
/// tiktoken-rs's own table then catches the rest of its o200k models (gpt-4.5, gpt-oss,
/// codex-mini). Its older encodings (p50k, r50k) are deliberately not used: the models that
/// needed them are retired, and unknown or OpenAI-compatible models are closest to cl100k.
fn encoder_for(model: &str) -> &'static CoreBPE {
    if uses_o200k(model) {
        tiktoken_rs::o200k_base_singleton()
    } else {
        tiktoken_rs::cl100k_base_singleton()
    }
}

fn uses_o200k(model: &str) -> bool {
    // Routed names such as `openai/gpt-4o` and fine-tunes such as `ft:gpt-4o-mini:org::id` are
    // billed as their base model.
    let name = model.rsplit('/').next().unwrap_or(model);
    let name = match name.strip_prefix("ft:") {
        Some(rest) => rest.split(':').next().unwrap_or(rest),
        None => name,
    };
    const O200K_PREFIXES: [&str; 7] =
        ["gpt-4o", "gpt-4.1", "gpt-5", "o1", "o3", "o4", "chatgpt-4o"];
    O200K_PREFIXES.iter().any(|p| name.starts_with(p))
        || matches!(
            get_tokenizer(name),
            Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony)
        )
}

/// Texts are encoded in segments of at most this many bytes. tiktoken-rs unwraps its regex's
/// "backtrack limit exceeded" error, which a run of about a million spaces triggers (measured:
/// it panics); no match can outgrow a segment this size, so user input cannot panic a request.
const SEGMENT_BYTES: usize = 64 * 1024;

fn count_with(bpe: &CoreBPE, text: &str) -> u64 {
    let mut total = 0u64;
    let mut rest = text;
    while !rest.is_empty() {
        let (segment, tail) = rest.split_at(segment_end(rest));
        total = total.saturating_add(encode_len(bpe, segment));
        rest = tail;
    }
    total
}

/// Where the next segment ends: the whole text if short enough; else just after the last
/// newline that is followed by a letter or digit, which is always a boundary of tiktoken's
/// pre-tokenizer (so the count stays exact); else, for a text without such a newline in 64 KiB,
/// at a character boundary (the count may then differ by a token per cut).
fn segment_end(text: &str) -> usize {
    if text.len() <= SEGMENT_BYTES {
        return text.len();
    }
    let bytes = text.as_bytes();
    let mut search_end = SEGMENT_BYTES;
    while let Some(newline) = bytes[..search_end].iter().rposition(|&b| b == b'\n') {
        let next = newline + 1;
        if text[next..]
            .chars()
            .next()
            .is_some_and(char::is_alphanumeric)
        {
            return next;
        }
        search_end = newline;
    }
    text.floor_char_boundary(SEGMENT_BYTES)
}

fn encode_len(bpe: &CoreBPE, segment: &str) -> u64 {
    // Segments keep the regex within its limits; should another input still make tiktoken-rs
    // panic, estimate instead of failing the request (4 bytes per token is OpenAI's rule of thumb).
    let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        bpe.encode_ordinary(segment).len()
    }));
    let tokens = counted.unwrap_or_else(|_| segment.len().div_ceil(4));
    u64::try_from(tokens).unwrap_or(u64::MAX)
}

/// A prompt or embedding input: strings are encoded, numbers are already tokens.
fn raw_input(bpe: &CoreBPE, value: &Value) -> u64 {
    match value {
        Value::String(s) => count_with(bpe, s),
        Value::Number(_) => 1,
        Value::Array(items) => items
            .iter()
            .fold(0, |n, v| n.saturating_add(raw_input(bpe, v))),
        _ => 0,
    }
}

/// One chat message or Responses API input item.
fn message_tokens(bpe: &CoreBPE, message: &Value) -> u64 {
    let Value::Object(fields) = message else {
        return match message {
            Value::String(s) => TOKENS_PER_MESSAGE.saturating_add(count_with(bpe, s)),
            _ => 0,
        };
    };
    fields.iter().fold(TOKENS_PER_MESSAGE, |n, (key, value)| {
        let field = match (key.as_str(), value) {
            // Discriminators and ids of Responses items are not rendered into the prompt.
            ("type" | "id" | "status", _) => 0,
            ("name", Value::String(s)) => count_with(bpe, s).saturating_add(TOKENS_PER_NAME),
            (_, Value::String(s)) => count_with(bpe, s),
            ("content", Value::Array(parts)) => parts
                .iter()
                .fold(0u64, |n, p| n.saturating_add(content_part(bpe, p))),
            ("tool_calls", Value::Array(calls)) => calls.iter().fold(0u64, |n, call| {
                let function = call.get("function").and_then(Value::as_object);
                n.saturating_add(function.map_or(0, |f| function_call(bpe, f)))
            }),
            ("function_call", Value::Object(f)) => function_call(bpe, f),
            _ => 0,
        };
        n.saturating_add(field)
    })
}

fn content_part(bpe: &CoreBPE, part: &Value) -> u64 {
    match part {
        Value::String(s) => count_with(bpe, s),
        Value::Object(fields) => {
            // `text`/`input_text`/`output_text` parts carry `text`; a refusal part its `refusal`.
            match (fields.get("text"), fields.get("refusal")) {
                (Some(Value::String(s)), _) | (_, Some(Value::String(s))) => count_with(bpe, s),
                _ => NON_TEXT_PART_TOKENS,
            }
        }
        _ => 0,
    }
}

fn function_call(bpe: &CoreBPE, function: &Map<String, Value>) -> u64 {
    ["name", "arguments"]
        .iter()
        .filter_map(|key| function.get(*key).and_then(Value::as_str))
        .fold(0, |n, s| n.saturating_add(count_with(bpe, s)))
}

/// Tool and function definitions are rendered into the prompt; their JSON text is a close proxy.
fn tool_definitions(bpe: &CoreBPE, request: &Value) -> u64 {
    ["tools", "functions"]
        .iter()
        .filter_map(|key| request.get(*key))
        .filter(|v| !v.is_null())
        .fold(0, |n, v| n.saturating_add(count_with(bpe, &v.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn o200k(text: &str) -> u64 {
        tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(text)
            .len() as u64
    }

    fn cl100k(text: &str) -> u64 {
        tiktoken_rs::cl100k_base_singleton()
            .encode_ordinary(text)
            .len() as u64
    }

    #[test]
    fn hello_world_has_the_real_token_counts() {
        assert_eq!(count_text("gpt-4o", "hello world"), 2);
        assert_eq!(count_text("gpt-3.5-turbo", "hello world"), 2);
        assert_eq!(count_text("gpt-4o", ""), 0);
    }

    #[test]
    fn model_families_pick_their_encoding() {
        // Chosen because the two encodings split it differently (checked with the encoders).
        let text = "Größenordnung naïveté — 東京都の天気は晴れです。";
        let (o, c) = (o200k(text), cl100k(text));
        assert_ne!(o, c, "test text must tell the encodings apart");
        for model in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1-nano",
            "gpt-5",
            "o1",
            "o3-mini",
            "o4-mini",
            "chatgpt-4o-latest",
            "openai/gpt-4o",
            "ft:gpt-4o-mini:acme::abc",
            "gpt-oss-20b",
        ] {
            assert_eq!(count_text(model, text), o, "{model}");
        }
        for model in [
            "gpt-4",
            "gpt-3.5-turbo",
            "text-embedding-3-small",
            "mock-echo",
            "llama-3",
        ] {
            assert_eq!(count_text(model, text), c, "{model}");
        }
    }

    #[test]
    fn special_token_text_is_counted_as_ordinary_text() {
        // Encoded ordinarily, `<|endoftext|>` is several tokens, never the single special one.
        assert_eq!(
            count_text("gpt-4", "<|endoftext|>"),
            cl100k("<|endoftext|>")
        );
        assert!(count_text("gpt-4", "<|endoftext|>") > 1);
    }

    #[test]
    fn chat_prompt_follows_the_cookbook_framing() {
        let request = json!({
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "name": "ann", "content": "What is 2+2?"}
            ]
        });
        let expected = 3
            + o200k("system")
            + o200k("You are terse.")
            + 3
            + o200k("user")
            + o200k("ann")
            + 1
            + o200k("What is 2+2?")
            + 3;
        assert_eq!(
            count_prompt(Endpoint::ChatCompletions, "gpt-4o", &request),
            expected
        );
        // tiktoken-rs's own cookbook implementation agrees, and so does the number itself.
        let message = |role: &str, name: Option<&str>, content: &str| {
            tiktoken_rs::ChatCompletionRequestMessage {
                role: role.to_owned(),
                name: name.map(str::to_owned),
                content: Some(content.to_owned()),
                ..Default::default()
            }
        };
        let messages = [
            message("system", None, "You are terse."),
            message("user", Some("ann"), "What is 2+2?"),
        ];
        let theirs = tiktoken_rs::num_tokens_from_messages("gpt-4o", &messages).expect("supported");
        assert_eq!(expected, theirs as u64);
        assert_eq!(expected, 24);
    }

    #[test]
    fn chat_prompt_counts_parts_images_tool_calls_and_tools() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        let request = json!({
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "f", "arguments": "{\"x\":1}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "tools": tools
        });
        let expected = 3
            + cl100k("user")
            + cl100k("Describe")
            + 85
            + 3
            + cl100k("assistant")
            + cl100k("f")
            + cl100k("{\"x\":1}")
            + 3
            + cl100k("tool")
            + cl100k("c1")
            + cl100k("42")
            + 3
            + cl100k(&tools.to_string());
        assert_eq!(
            count_prompt(Endpoint::ChatCompletions, "mock-echo", &request),
            expected
        );
    }

    #[test]
    fn completions_and_embeddings_count_strings_and_token_arrays() {
        let one = json!({"prompt": "Say this is a test"});
        assert_eq!(
            count_prompt(Endpoint::Completions, "gpt-3.5-turbo-instruct", &one),
            cl100k("Say this is a test")
        );
        let many = json!({"prompt": ["a b", "c"]});
        assert_eq!(
            count_prompt(Endpoint::Completions, "x", &many),
            cl100k("a b") + cl100k("c")
        );
        let tokens = json!({"input": [[1, 2, 3], [4, 5]]});
        assert_eq!(
            count_prompt(Endpoint::Embeddings, "text-embedding-3-small", &tokens),
            5
        );
        let flat = json!({"input": [9, 9, 9, 9]});
        assert_eq!(
            count_prompt(Endpoint::Embeddings, "text-embedding-3-small", &flat),
            4
        );
        let text = json!({"input": "The food was delicious"});
        assert_eq!(
            count_prompt(Endpoint::Embeddings, "text-embedding-3-small", &text),
            cl100k("The food was delicious")
        );
        assert_eq!(count_prompt(Endpoint::Embeddings, "x", &json!({})), 0);
    }

    #[test]
    fn responses_prompt_counts_instructions_and_input() {
        let plain = json!({"instructions": "Be brief.", "input": "Hi there"});
        assert_eq!(
            count_prompt(Endpoint::Responses, "gpt-4.1", &plain),
            3 + (3 + o200k("Be brief.")) + (3 + o200k("user") + o200k("Hi there"))
        );
        let items = json!({"input": [
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Hello"}]}
        ]});
        assert_eq!(
            count_prompt(Endpoint::Responses, "gpt-4.1", &items),
            3 + (3 + o200k("user") + o200k("Hello"))
        );
    }

    #[test]
    fn long_texts_are_counted_exactly_in_segments() {
        let text = "The quick brown fox jumps over the lazy dog.\nÉtoile 東京 42\n".repeat(5_000);
        assert!(text.len() > 4 * SEGMENT_BYTES);
        assert_eq!(count_text("gpt-4o", &text), o200k(&text));
        assert_eq!(count_text("gpt-4", &text), cl100k(&text));
    }

    #[test]
    fn a_huge_whitespace_run_is_counted_not_panicked_on() {
        // Unsegmented, tiktoken-rs panics on this (its regex hits its backtrack limit).
        let text = format!("{}x", " ".repeat(1_100_000));
        let n = count_text("gpt-4o", &text);
        assert!((1_000..=1_000_000).contains(&n), "{n} tokens");
    }
}
