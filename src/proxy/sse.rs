//! An incremental Server-Sent-Events observer: the metering tap on a streamed upstream answer.
//!
//! Upstream bytes pass straight through to the client while a copy is parsed for usage, generated
//! text and completion. The one rewrite: when the gateway itself asked a chat stream for usage,
//! the usage-only chunk that request produced is removed, which needs holding back the bytes of
//! at most the one event being received (docs/architecture.md, "The request path", step 8).
//!
//! Length: one incremental parser, and the decisions it feeds (usage, text, completion, the one
//! rewrite) share its buffer state; its fast path is apart (`chunk_skim.rs`).

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::Endpoint;
use super::chunk_skim::{ChatSkimmer, Skim};
use super::usage::{RawUsage, lenient_str};
use crate::domain::TokenUsage;

/// An event longer than this cannot be a usage-only chunk (those are well under 1 KiB), so it is
/// forwarded instead of held: holding back is bounded even if an upstream never ends an event.
const MAX_HELD_EVENT: usize = 64 * 1024;
/// An event whose data outgrows this is forwarded but not parsed, so a broken upstream cannot
/// make the observer buffer without bound. (The largest legitimate events, a Responses API
/// `response.completed` repeating the whole output, are far smaller.)
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// What a stream produced, as far as it was observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// The last usage the upstream reported, if any.
    pub usage: Option<TokenUsage>,
    /// The generated text (content, refusals, tool-call arguments), for counting completion
    /// tokens when no usage came.
    pub output_text: String,
    /// Whether any output (text or a tool call) was produced; an error before output is free.
    pub saw_output: bool,
    /// Whether the stream ended properly (`[DONE]`, or a terminal Responses API event).
    pub completed: bool,
    /// Whether the upstream reported a failure inside the stream (a `200` whose answer turned
    /// into an error): a chunk `{"error": …}`, or a Responses API `error` or `response.failed`
    /// event. What is billed does not change (usage if reported, else the output); the status
    /// recorded does.
    pub failed: bool,
    /// Upstream bytes observed (before any stripping).
    pub bytes_in: u64,
}

/// Removing the usage-only chunk: off, watching for it, or done (at most one per stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Strip {
    Off,
    Watching,
    /// Stripped already. `drop_lf`: the stripped event ended with a `\r` at the very end of a
    /// chunk, so a `\n` starting the next chunk is the rest of its CRLF and is dropped too.
    Done {
        drop_lf: bool,
    },
}

/// Parses a stream incrementally; see the module docs. One per upstream response.
#[derive(Debug)]
pub struct SseObserver {
    endpoint: Endpoint,
    strip: Strip,
    /// The start of a line whose end has not arrived yet (only lines split across chunks).
    partial_line: Vec<u8>,
    /// The current line outgrew `MAX_EVENT_BYTES`; its bytes are being skipped.
    line_too_long: bool,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to that line end.
    pending_cr: bool,
    /// No line has been processed yet (a leading byte-order mark is ignored).
    at_stream_start: bool,
    /// The current event's `data:` lines, each followed by `\n`.
    data: Vec<u8>,
    has_data: bool,
    /// The current event outgrew `MAX_EVENT_BYTES`: it will not be parsed.
    event_too_big: bool,
    /// Strip mode: ends of events completed in the current chunk (offset after the blank line,
    /// and whether the event is the usage-only chunk). Reused across chunks.
    event_ends: Vec<(usize, bool)>,
    /// Strip mode: the bytes of the current, incomplete event received in earlier chunks.
    held: Vec<u8>,
    /// Strip mode: the current event outgrew `MAX_HELD_EVENT` and is being forwarded as it comes.
    event_forwarded: bool,
    /// The fast path for chat and completions chunks.
    skimmer: ChatSkimmer,
    summary: StreamSummary,
}

impl SseObserver {
    /// `strip_usage_chunk`: remove the usage-only chunk from what the client sees (only for chat
    /// and completions streams, whose `stream_options.include_usage` the gateway injected).
    pub fn new(endpoint: Endpoint, strip_usage_chunk: bool) -> Self {
        let strippable = matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions);
        SseObserver {
            endpoint,
            strip: if strip_usage_chunk && strippable {
                Strip::Watching
            } else {
                Strip::Off
            },
            partial_line: Vec::new(),
            line_too_long: false,
            pending_cr: false,
            at_stream_start: true,
            data: Vec::new(),
            has_data: false,
            event_too_big: false,
            event_ends: Vec::new(),
            held: Vec::new(),
            event_forwarded: false,
            skimmer: ChatSkimmer::default(),
            summary: StreamSummary::default(),
        }
    }

    /// Observes one upstream chunk and returns the bytes to send to the client now.
    ///
    /// Without stripping (or once the usage chunk is gone) that is `chunk` itself, unchanged.
    pub fn observe(&mut self, chunk: Bytes) -> Bytes {
        let len = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
        self.summary.bytes_in = self.summary.bytes_in.saturating_add(len);
        match self.strip {
            Strip::Off => {
                self.scan(&chunk);
                chunk
            }
            Strip::Done { drop_lf } => {
                self.strip = Strip::Done { drop_lf: false };
                self.scan(&chunk);
                if drop_lf && chunk.first() == Some(&b'\n') {
                    chunk.slice(1..)
                } else {
                    chunk
                }
            }
            Strip::Watching => self.observe_watching(chunk),
        }
    }

    /// The upstream ended: parses a final event that lacked its blank line and returns whatever
    /// was held back (empty unless stripping) together with the final summary. Idempotent.
    pub fn finish(&mut self) -> (Bytes, StreamSummary) {
        self.pending_cr = false;
        if std::mem::take(&mut self.line_too_long) {
            self.event_too_big = true;
        } else if !self.partial_line.is_empty() {
            let line = std::mem::take(&mut self.partial_line);
            self.process_line(&line);
        }
        let usage_only = self.dispatch();
        let tail = if self.strip == Strip::Watching && usage_only && !self.event_forwarded {
            self.strip = Strip::Done { drop_lf: false };
            Bytes::new()
        } else {
            Bytes::from(std::mem::take(&mut self.held))
        };
        self.held.clear();
        (tail, self.summary.clone())
    }

    /// Whether the stream's terminal event (`[DONE]`, or a terminal Responses API event) has
    /// been seen: nothing after it changes what is owed.
    pub fn completed(&self) -> bool {
        self.summary.completed
    }

    /// Whether the upstream reported a failure in the stream (see [`StreamSummary::failed`]).
    pub fn failed(&self) -> bool {
        self.summary.failed
    }

    /// A snapshot of what was observed so far (for a client that disconnected mid-stream).
    pub fn summary(&self) -> StreamSummary {
        self.summary.clone()
    }

    /// Strip mode: forwards every complete event except the usage-only one and holds back the
    /// incomplete event at the end of the chunk.
    fn observe_watching(&mut self, chunk: Bytes) -> Bytes {
        let len = chunk.len();
        let held_at_start = !self.held.is_empty();
        self.event_ends.clear();
        let skipped_lf = self.scan(&chunk);
        // A `\n` finishing the CRLF of an event forwarded in the previous chunk goes out at once.
        let mut event_start = usize::from(skipped_lf && !held_at_start);
        // The held bytes belong to the first event that ends here: forwarded before this chunk's
        // bytes, or dropped with it.
        let mut emit_held = false;
        let mut dropped: Option<(usize, usize)> = None;
        for i in 0..self.event_ends.len() {
            let (end, usage_only) = self.event_ends[i];
            if usage_only && !self.event_forwarded {
                if i == 0 {
                    self.held.clear();
                }
                dropped = Some((event_start, end));
                self.strip = Strip::Done {
                    drop_lf: end == len && self.pending_cr,
                };
                break;
            }
            emit_held |= i == 0 && held_at_start;
            self.event_forwarded = false;
            event_start = end;
        }
        let mut emit_end = len;
        if self.strip == Strip::Watching {
            let tail_len = len - event_start;
            let held_len = if emit_held { 0 } else { self.held.len() };
            if self.event_forwarded || held_len.saturating_add(tail_len) > MAX_HELD_EVENT {
                self.event_forwarded = true;
                emit_held |= held_at_start;
            } else {
                emit_end = event_start;
            }
        }
        let out = self.emit(&chunk, emit_held, emit_end, dropped);
        if emit_held {
            self.held.clear();
        }
        if emit_end < len {
            self.held.extend_from_slice(&chunk[emit_end..]);
        }
        out
    }

    /// `held` (when `emit_held`), then `chunk[..emit_end]` without `dropped`; zero-copy slices
    /// of the chunk whenever no held bytes go first.
    fn emit(
        &self,
        chunk: &Bytes,
        held_emitted: bool,
        emit_end: usize,
        dropped: Option<(usize, usize)>,
    ) -> Bytes {
        let prefix: &[u8] = if held_emitted { &self.held } else { &[] };
        match dropped {
            None if prefix.is_empty() => chunk.slice(..emit_end),
            Some((start, end)) if prefix.is_empty() && start == 0 => chunk.slice(end..emit_end),
            Some((start, end)) if prefix.is_empty() && end == emit_end => chunk.slice(..start),
            _ => {
                let (first, second) = match dropped {
                    Some((start, end)) => (&chunk[..start], &chunk[end..emit_end]),
                    None => (&chunk[..emit_end], &chunk[emit_end..emit_end]),
                };
                let mut out = BytesMut::with_capacity(prefix.len() + first.len() + second.len());
                out.extend_from_slice(prefix);
                out.extend_from_slice(first);
                out.extend_from_slice(second);
                out.freeze()
            }
        }
    }

    /// Splits `buf` into lines and processes them; in strip mode records where events end.
    /// Returns whether a leading `\n` was skipped as the end of a CRLF split across chunks.
    fn scan(&mut self, buf: &[u8]) -> bool {
        let mut pos = 0;
        let mut skipped_lf = false;
        if std::mem::take(&mut self.pending_cr) && buf.first() == Some(&b'\n') {
            pos = 1;
            skipped_lf = true;
        }
        let record_ends = self.strip == Strip::Watching;
        while pos < buf.len() {
            let Some(offset) = find_line_end(&buf[pos..]) else {
                self.keep_partial_line(&buf[pos..]);
                break;
            };
            let eol = pos + offset;
            let mut next = eol + 1;
            if buf[eol] == b'\r' {
                match buf.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
            let blank = if std::mem::take(&mut self.line_too_long) {
                self.event_too_big = true;
                false
            } else if self.partial_line.is_empty() {
                self.process_line(&buf[pos..eol])
            } else {
                let mut line = std::mem::take(&mut self.partial_line);
                line.extend_from_slice(&buf[pos..eol]);
                let blank = self.process_line(&line);
                line.clear();
                self.partial_line = line;
                blank
            };
            if blank {
                let usage_only = self.dispatch();
                if record_ends {
                    self.event_ends.push((next, usage_only));
                }
            }
            pos = next;
        }
        skipped_lf
    }

    fn keep_partial_line(&mut self, bytes: &[u8]) {
        if self.line_too_long {
            return;
        }
        if self.partial_line.len().saturating_add(bytes.len()) > MAX_EVENT_BYTES {
            self.line_too_long = true;
            self.partial_line = Vec::new();
        } else {
            self.partial_line.extend_from_slice(bytes);
        }
    }

    /// Handles one complete line; returns whether it was blank (the end of an event).
    fn process_line(&mut self, mut line: &[u8]) -> bool {
        if std::mem::take(&mut self.at_stream_start) {
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            return true;
        }
        if line[0] == b':' {
            return false;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        if field == b"data" && !self.event_too_big {
            if self.data.len().saturating_add(value.len()) >= MAX_EVENT_BYTES {
                self.event_too_big = true;
                self.data = Vec::new();
            } else {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
        }
        false
    }

    /// Ends the current event: parses its data. Returns whether it was the usage-only chunk.
    fn dispatch(&mut self) -> bool {
        let has_data = std::mem::take(&mut self.has_data);
        if std::mem::take(&mut self.event_too_big) {
            self.data.clear();
            return false;
        }
        if !has_data {
            return false;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line is not part of the payload
        let usage_only = self.handle_payload(&data);
        data.clear();
        self.data = data;
        usage_only
    }

    fn handle_payload(&mut self, payload: &[u8]) -> bool {
        let trimmed = payload.trim_ascii();
        if trimmed == b"[DONE]" {
            self.summary.completed = true;
            return false;
        }
        if trimmed.first() != Some(&b'{') {
            return false;
        }
        match self.endpoint {
            Endpoint::ChatCompletions | Endpoint::Completions => self.handle_chunk(trimmed),
            Endpoint::Responses => {
                if let Ok(json) = std::str::from_utf8(trimmed) {
                    self.handle_responses_event(json);
                }
                false
            }
            Endpoint::Embeddings => false,
        }
    }

    fn handle_chunk(&mut self, json: &[u8]) -> bool {
        match self.skimmer.skim(json) {
            Skim::Nothing => false,
            Skim::Content(text) => {
                push_output(&mut self.summary, Some(&text));
                false
            }
            // Validating UTF-8 once here lets serde_json skip validating every key and string.
            Skim::Parse => std::str::from_utf8(json).is_ok_and(|json| self.parse_chunk(json)),
        }
    }

    /// [`Self::handle_chunk`] by parsing the JSON (every shape the fast path does not take).
    fn parse_chunk(&mut self, json: &str) -> bool {
        let Ok(chunk) = serde_json::from_str::<ChunkIn<'_>>(json) else {
            return false;
        };
        let summary = &mut self.summary;
        summary.failed |= chunk.error.is_some();
        for choice in chunk.choices.iter().flatten() {
            push_output(summary, choice.text.as_deref());
            let Some(delta) = &choice.delta else { continue };
            push_output(summary, delta.content.as_deref());
            push_output(summary, delta.refusal.as_deref());
            for call in delta.tool_calls.iter().flatten() {
                summary.saw_output = true;
                if let Some(function) = &call.function {
                    push_output(summary, function.arguments.as_deref());
                }
            }
            if let Some(function) = &delta.function_call {
                summary.saw_output = true;
                push_output(summary, function.arguments.as_deref());
            }
        }
        let has_usage = match chunk.usage {
            Some(raw) => match raw.into_usage(self.endpoint) {
                Some(usage) => {
                    summary.usage = Some(usage);
                    true
                }
                None => false,
            },
            None => false,
        };
        let expected_object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            _ => "chat.completion.chunk",
        };
        has_usage
            && chunk.choices.is_some_and(|c| c.is_empty())
            && chunk.object.as_deref().is_none_or(|o| o == expected_object)
    }

    fn handle_responses_event(&mut self, json: &str) {
        let Ok(event) = serde_json::from_str::<ResponsesEventIn<'_>>(json) else {
            return;
        };
        let summary = &mut self.summary;
        match event.kind.as_deref() {
            Some(
                "response.output_text.delta"
                | "response.refusal.delta"
                | "response.function_call_arguments.delta",
            ) => push_output(summary, event.delta.as_deref()),
            Some("error") => summary.failed = true,
            Some(kind @ ("response.completed" | "response.incomplete" | "response.failed")) => {
                summary.completed = true;
                summary.failed |= kind == "response.failed";
                let raw = event.response.and_then(|r| r.usage);
                if let Some(usage) = raw.and_then(|u| u.into_usage(Endpoint::Responses)) {
                    summary.usage = Some(usage);
                }
            }
            _ => {}
        }
    }
}

fn push_output(summary: &mut StreamSummary, text: Option<&str>) {
    if let Some(text) = text.filter(|t| !t.is_empty()) {
        summary.output_text.push_str(text);
        summary.saw_output = true;
    }
}

/// The first `\n` or `\r` (every SSE line end starts with one of them).
fn find_line_end(buf: &[u8]) -> Option<usize> {
    memchr::memchr2(b'\n', b'\r', buf)
}

// Only the fields metering needs; serde skips the rest without allocating, and text borrows
// from the chunk unless it contains escapes.

#[derive(Deserialize)]
struct ChunkIn<'a> {
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    object: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChoiceIn<'a>>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    /// An in-band error (`null` reads as absent).
    #[serde(default)]
    error: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ChoiceIn<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaIn<'a>>,
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DeltaIn<'a> {
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallIn<'a>>>,
    #[serde(default, borrow)]
    function_call: Option<FunctionIn<'a>>,
}

#[derive(Deserialize)]
struct ToolCallIn<'a> {
    #[serde(default, borrow)]
    function: Option<FunctionIn<'a>>,
}

#[derive(Deserialize)]
struct FunctionIn<'a> {
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ResponsesEventIn<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "lenient_str")]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "lenient_str")]
    delta: Option<Cow<'a, str>>,
    #[serde(default)]
    response: Option<ResponseIn>,
}

#[derive(Deserialize)]
struct ResponseIn {
    #[serde(default)]
    usage: Option<RawUsage>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT_EVENTS: [&str; 7] = [
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Héllo, 東京"},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":" \"wörld\"\n🎉"},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":"}}]},"finish_reason":null}],"usage":null}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}],"usage":null}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,"prompt_tokens_details":{"cached_tokens":3}}}"#,
        "[DONE]",
    ];
    const USAGE_EVENT: usize = 5;
    const CHAT_TEXT: &str = "Héllo, 東京 \"wörld\"\n🎉{\"city\":";

    #[test]
    fn the_fast_path_meters_every_chunk_as_the_full_parse_does() {
        let chunk = |delta: &str| {
            format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            )
        };
        let mut payloads: Vec<String> = CHAT_EVENTS.iter().map(|p| (*p).to_owned()).collect();
        for text in [
            r#""""#,
            r#"" the""#,
            r#""\u00e9\ud83c\udf89 \"q\" \\ \n\t""#,
            r#""東京""#,
            r#""\ud800""#,
            "null",
            "7",
        ] {
            payloads.push(chunk(&format!(r#"{{"content":{text}}}"#)));
            payloads.push(chunk(&format!(
                r#"{{"role":"assistant","content":{text}}}"#
            )));
            payloads.push(chunk(&format!(r#"{{"content":{text},"refusal":null}}"#)));
        }
        payloads.extend([
            chunk("{}"),
            chunk(r#"{"content":"a"},"logprobs":{"content":[{"token":"a"}]}"#),
            chunk(r#"{"content":"a"}},{"index":1,"delta":{"content":"b"}"#),
            chunk(r#"{"content":"a"}},{"index":1,"delta":{}"#),
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#.to_owned(),
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4},"error":null}"#.to_owned(),
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#.to_owned(),
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"usage":nul}"#.to_owned(),
        ]);
        // Each payload also comes after a content delta with the same prefix, which the fast
        // path remembers.
        let seed = chunk(r#"{"content":"seed"}"#);
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions] {
            for payload in &payloads {
                for seeded in [false, true] {
                    let mut fast = SseObserver::new(endpoint, false);
                    let mut full = SseObserver::new(endpoint, false);
                    if seeded {
                        fast.handle_chunk(seed.as_bytes());
                        full.parse_chunk(&seed);
                    }
                    let fast_usage_only = fast.handle_chunk(payload.as_bytes());
                    let full_usage_only = full.parse_chunk(payload);
                    assert_eq!(
                        (fast_usage_only, fast.summary),
                        (full_usage_only, full.summary),
                        "{payload} (after a delta: {seeded})"
                    );
                }
            }
        }
    }

    /// One SSE event per payload, every line ended with `eol`.
    fn sse(payloads: &[&str], eol: &str) -> Vec<Vec<u8>> {
        payloads
            .iter()
            .map(|p| format!("data: {p}{eol}{eol}").into_bytes())
            .collect()
    }

    /// Feeds `input` split at `cuts`; returns what the client got and the summary.
    fn run_cuts(
        endpoint: Endpoint,
        strip: bool,
        input: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, StreamSummary) {
        let mut observer = SseObserver::new(endpoint, strip);
        let mut out = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            out.extend_from_slice(&observer.observe(Bytes::copy_from_slice(&input[start..cut])));
            start = cut;
        }
        let (tail, summary) = observer.finish();
        out.extend_from_slice(&tail);
        (out, summary)
    }

    /// Asserts that splitting at any single offset, and into single bytes, changes nothing.
    fn assert_split_invariant(
        endpoint: Endpoint,
        strip: bool,
        input: &[u8],
    ) -> (Vec<u8>, StreamSummary) {
        let whole = run_cuts(endpoint, strip, input, &[]);
        for cut in 0..=input.len() {
            assert_eq!(
                run_cuts(endpoint, strip, input, &[cut]),
                whole,
                "split at {cut}"
            );
        }
        let every_byte: Vec<usize> = (1..input.len()).collect();
        assert_eq!(
            run_cuts(endpoint, strip, input, &every_byte),
            whole,
            "one byte at a time"
        );
        whole
    }

    fn expected_chat_summary(bytes_in: usize) -> StreamSummary {
        StreamSummary {
            usage: Some(TokenUsage {
                prompt_tokens: 19,
                completion_tokens: 10,
                cached_tokens: 3,
            }),
            output_text: CHAT_TEXT.to_owned(),
            saw_output: true,
            completed: true,
            failed: false,
            bytes_in: bytes_in as u64,
        }
    }

    #[test]
    fn chat_stream_is_metered_the_same_however_it_is_split() {
        for eol in ["\n", "\r\n", "\r"] {
            let input = sse(&CHAT_EVENTS, eol).concat();
            let (out, summary) = assert_split_invariant(Endpoint::ChatCompletions, false, &input);
            assert_eq!(out, input, "eol {eol:?}");
            assert_eq!(summary, expected_chat_summary(input.len()), "eol {eol:?}");
        }
    }

    #[test]
    fn stripping_removes_exactly_the_usage_only_event() {
        for eol in ["\n", "\r\n", "\r"] {
            let events = sse(&CHAT_EVENTS, eol);
            let input = events.concat();
            let mut expected = events.clone();
            expected.remove(USAGE_EVENT);
            let (out, summary) = assert_split_invariant(Endpoint::ChatCompletions, true, &input);
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expected.concat())
            );
            assert_eq!(summary, expected_chat_summary(input.len()), "eol {eol:?}");
        }
    }

    #[test]
    fn without_stripping_the_same_bytes_are_returned_without_copying() {
        let input = Bytes::from(sse(&CHAT_EVENTS, "\n").concat());
        let mut observer = SseObserver::new(Endpoint::ChatCompletions, false);
        for part in [
            input.slice(..100),
            input.slice(100..457),
            input.slice(457..),
        ] {
            let out = observer.observe(part.clone());
            assert_eq!(out, part);
            assert_eq!(
                out.as_ptr(),
                part.as_ptr(),
                "must be the chunk itself, not a copy"
            );
        }
        assert!(observer.finish().0.is_empty());
    }

    #[test]
    fn stripping_keeps_usage_that_rides_on_a_content_chunk() {
        // Some upstreams put usage on the last content chunk: that chunk is output, never removed.
        let payload = r#"{"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ok"}}],"usage":{"prompt_tokens":2,"completion_tokens":1}}"#;
        let input = sse(&[payload, "[DONE]"], "\n").concat();
        let (out, summary) = assert_split_invariant(Endpoint::ChatCompletions, true, &input);
        assert_eq!(out, input);
        assert_eq!(
            summary.usage,
            Some(TokenUsage {
                prompt_tokens: 2,
                completion_tokens: 1,
                cached_tokens: 0
            })
        );
        assert_eq!(summary.output_text, "ok");
    }

    #[test]
    fn comments_fields_and_multi_line_data_are_parsed() {
        let input = concat!(
            "\u{FEFF}: OPENROUTER PROCESSING\n\n",
            "retry: 1000\nid: 7\nevent: message\n",
            "data:{\"choices\":[{\"delta\":\n",
            "data: {\"content\":\"multi\"}}]}\n",
            ": keep-alive inside an event\n\n",
            "data: not json at all\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"-line\"}}]}\n\n",
            ":\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes();
        for strip in [false, true] {
            let (out, summary) = assert_split_invariant(Endpoint::ChatCompletions, strip, input);
            assert_eq!(
                out, input,
                "strip {strip}: nothing here is a usage-only chunk"
            );
            assert_eq!(summary.output_text, "multi-line");
            assert!(summary.completed && summary.saw_output);
            assert_eq!(summary.usage, None);
        }
    }

    #[test]
    fn completions_stream_collects_text_and_usage() {
        let events = sse(
            &[
                r#"{"object":"text_completion","choices":[{"text":"Once","index":0}]}"#,
                r#"{"object":"text_completion","choices":[{"text":" upon","index":0}]}"#,
                r#"{"object":"text_completion","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}"#,
                "[DONE]",
            ],
            "\n",
        );
        let input = events.concat();
        let (out, summary) = assert_split_invariant(Endpoint::Completions, true, &input);
        assert_eq!(
            out,
            [&events[0][..], &events[1][..], &events[3][..]].concat()
        );
        assert_eq!(summary.output_text, "Once upon");
        assert_eq!(
            summary.usage,
            Some(TokenUsage {
                prompt_tokens: 4,
                completion_tokens: 2,
                cached_tokens: 0
            })
        );
    }

    #[test]
    fn responses_stream_reads_deltas_and_completed_usage() {
        let input = concat!(
            "event: response.created\n",
            "data: {\"type\":\"response.created\",\"response\":{\"id\":\"r1\",\"status\":\"in_progress\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"m1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"m1\",\"output_index\":0,\"content_index\":0,\"delta\":\" there\"}\n\n",
            "event: response.output_text.done\n",
            "data: {\"type\":\"response.output_text.done\",\"text\":\"Hi there\"}\n\n",
            "event: response.completed\n",
            "data: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"status\":\"completed\",",
            "\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi there\"}]}],",
            "\"usage\":{\"input_tokens\":11,\"input_tokens_details\":{\"cached_tokens\":0},",
            "\"output_tokens\":2,\"output_tokens_details\":{\"reasoning_tokens\":0},\"total_tokens\":13}}}\n\n",
        )
        .as_bytes();
        // Stripping applies to chat streams only: a Responses stream passes through whole.
        let (out, summary) = assert_split_invariant(Endpoint::Responses, true, input);
        assert_eq!(out, input);
        assert_eq!(
            summary,
            StreamSummary {
                usage: Some(TokenUsage {
                    prompt_tokens: 11,
                    completion_tokens: 2,
                    cached_tokens: 0
                }),
                output_text: "Hi there".to_owned(),
                saw_output: true,
                completed: true,
                failed: false,
                bytes_in: input.len() as u64,
            }
        );
    }

    #[test]
    fn an_error_inside_the_stream_is_noted() {
        let input = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"error\":null}\n\n",
            "data: {\"error\":{\"message\":\"boom\",\"type\":\"server_error\"}}\n\n",
        )
        .as_bytes();
        let (out, summary) = assert_split_invariant(Endpoint::ChatCompletions, true, input);
        assert_eq!(out, input, "the error reaches the client");
        assert!(summary.failed && summary.saw_output && !summary.completed);
        assert_eq!(summary.output_text, "Hi");

        let clean = sse(&CHAT_EVENTS, "\n").concat();
        let (_, summary) = run_cuts(Endpoint::ChatCompletions, true, &clean, &[]);
        assert!(!summary.failed, "a clean stream did not fail");

        for (event, completed) in [("error", false), ("response.failed", true)] {
            let input = format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}}\n\n\
                 event: {event}\ndata: {{\"type\":\"{event}\",\"code\":\"server_error\",\"response\":{{\"usage\":null}}}}\n\n"
            );
            let (_, summary) = assert_split_invariant(Endpoint::Responses, false, input.as_bytes());
            assert!(summary.failed, "{event}");
            assert_eq!(summary.completed, completed, "{event}");
            assert_eq!(summary.usage, None);
        }
        let completed = "data: {\"type\":\"response.incomplete\",\"response\":{}}\n\n";
        let (_, summary) = run_cuts(Endpoint::Responses, false, completed.as_bytes(), &[]);
        assert!(summary.completed && !summary.failed);
    }

    #[test]
    fn snapshot_mid_stream_shows_output_so_far() {
        let events = sse(&CHAT_EVENTS, "\n");
        let mut observer = SseObserver::new(Endpoint::ChatCompletions, true);
        for event in &events[..3] {
            observer.observe(Bytes::copy_from_slice(event));
        }
        let summary = observer.summary();
        assert_eq!(summary.output_text, "Héllo, 東京 \"wörld\"\n🎉");
        assert!(summary.saw_output);
        assert!(!summary.completed);
        assert_eq!(summary.usage, None);
    }

    #[test]
    fn a_stream_without_output_says_so() {
        let input = sse(&[CHAT_EVENTS[0], "[DONE]"], "\n").concat();
        let (_, summary) = run_cuts(Endpoint::ChatCompletions, false, &input, &[]);
        assert!(!summary.saw_output);
        assert!(summary.completed);
    }

    #[test]
    fn finish_flushes_an_unterminated_last_event() {
        // The upstream closed without the final blank line: the held bytes still reach the client.
        let input = format!("data: {}\n\ndata: {}", CHAT_EVENTS[1], CHAT_EVENTS[2]);
        let (out, summary) = run_cuts(Endpoint::ChatCompletions, true, input.as_bytes(), &[30]);
        assert_eq!(out, input.as_bytes());
        assert_eq!(summary.output_text, "Héllo, 東京 \"wörld\"\n🎉");
        // ... and an unterminated usage-only chunk is still metered and still removed.
        let input = format!(
            "data: {}\n\ndata: {}\n",
            CHAT_EVENTS[1], CHAT_EVENTS[USAGE_EVENT]
        );
        let (out, summary) = run_cuts(Endpoint::ChatCompletions, true, input.as_bytes(), &[]);
        assert_eq!(out, format!("data: {}\n\n", CHAT_EVENTS[1]).as_bytes());
        assert_eq!(summary.usage.map(|u| u.prompt_tokens), Some(19));
    }

    #[test]
    fn strip_mode_holds_back_at_most_the_current_event() {
        let events = sse(&CHAT_EVENTS, "\n");
        let mut observer = SseObserver::new(Endpoint::ChatCompletions, true);
        // A whole event and half of the next: exactly the whole event goes out.
        let first = [&events[0][..], &events[1][..10]].concat();
        assert_eq!(observer.observe(Bytes::from(first)), events[0]);
        // An event far larger than a usage chunk is forwarded before its end arrives.
        let mut observer = SseObserver::new(Endpoint::ChatCompletions, true);
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}",
            "x".repeat(MAX_HELD_EVENT)
        );
        let out = observer.observe(Bytes::from(big.clone()));
        assert_eq!(out, big.as_bytes());
        assert_eq!(observer.observe(Bytes::from_static(b"\n\n")), &b"\n\n"[..]);
        let usage = format!("data: {}\n\n", CHAT_EVENTS[USAGE_EVENT]);
        assert!(observer.observe(Bytes::from(usage)).is_empty());
        assert_eq!(observer.finish().1.output_text.len(), MAX_HELD_EVENT);
    }

    #[test]
    fn a_runaway_event_is_forwarded_but_not_buffered() {
        let mut observer = SseObserver::new(Endpoint::ChatCompletions, false);
        let start = Bytes::from_static(b"data: {\"choices\":\"");
        assert_eq!(observer.observe(start.clone()), start);
        let piece = Bytes::from(vec![b'x'; 1024 * 1024]);
        for _ in 0..20 {
            assert_eq!(observer.observe(piece.clone()), piece);
            assert!(observer.partial_line.capacity() <= 2 * MAX_EVENT_BYTES);
        }
        assert_eq!(
            observer.partial_line.capacity(),
            0,
            "the runaway line was let go"
        );
        let rest = format!("\"}}\n\ndata: {}\n\ndata: [DONE]\n\n", CHAT_EVENTS[1]);
        observer.observe(Bytes::from(rest.clone()));
        let (_, summary) = observer.finish();
        assert_eq!(
            summary.output_text, "Héllo, 東京",
            "later events are still metered"
        );
        assert!(summary.completed);
        let total = start.len() + 20 * piece.len() + rest.len();
        assert_eq!(summary.bytes_in, total as u64);
    }
}
