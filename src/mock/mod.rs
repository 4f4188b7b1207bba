//! A deterministic fake OpenAI API, as an axum router. It is the gateway's built-in `mock` upstream
//! (so a new user can try Tollgate offline) and the integration tests' fake upstream (served on a
//! loopback port). It speaks OpenAI's wire protocol faithfully, SSE streaming included, so the
//! gateway's forwarding, stream observer and usage accounting run exactly as against a provider.
//!
//! # Routes (base path `/v1`)
//! `POST /chat/completions`, `POST /completions`, `POST /responses` (each streaming when the body
//! has `"stream": true`), `POST /embeddings`, `GET /models` (lists `mock-1` and `mock-large`; any
//! model name is accepted elsewhere). Unknown paths answer 404 and a malformed body 400, both in
//! OpenAI's error shape `{"error":{"message","type","param","code"}}`. As at OpenAI,
//! `stream_options` without `"stream": true` is a 400, so a gateway that injects it wrongly fails.
//!
//! # Reply and usage rules (what the mock "reports"; not tiktoken)
//! - Reply: the words of `"Mock reply to: " + <last user message>` repeated or truncated to exactly
//!   N words, N = `max_completion_tokens` / `max_tokens` (chat), `max_tokens` (completions),
//!   `max_output_tokens` (responses), else 16; capped at 4096. `n` (chat, completions) and
//!   `best_of` (completions) are honoured: `n` choices with the same words, and usage counts
//!   every generated choice (`max(n, best_of)` of them). Words are joined by one space, and
//!   each word is one streamed delta (every delta after the first starts with its space).
//! - Completion / output tokens = number of reply words.
//! - Chat prompt tokens = for every message, 3 + the whitespace-separated words of its content (a
//!   string, or the `text` of each content part). Responses input tokens = the same rule over
//!   `instructions` (one message) and `input` (a string is one message, else one per item).
//!   Completions and embeddings: the words of each prompt/input string, or the length of each
//!   token-id array; no per-message overhead.
//! - `cached_tokens` is 0 unless the `-cached` knob is on. Embeddings are 8 numbers per input, a
//!   pure function of that input (`k / 65536`, exact in f32), also as base64 f32 little-endian when
//!   `encoding_format` is `"base64"`. `id`s derive from a hash of the request body; `created` is a
//!   fixed timestamp (2026-01-01); `finish_reason` is `"stop"`.
//!
//! # Streams
//! `content-type: text/event-stream`, one `data: {json}\n\n` event per body frame (the stream
//! yields to the runtime between frames so each is flushed on its own, as a real upstream's are).
//! Chat and completions end with `data: [DONE]`; with `stream_options.include_usage: true` every
//! chunk carries `"usage": null` and a last chunk with `"choices": []` carries the usage. Responses
//! streams send `event:` lines (`response.created`, `response.in_progress`, output item/part
//! events, one `response.output_text.delta` per word, `response.completed` with `usage`) and, like
//! OpenAI's, end after `response.completed` with no `[DONE]`.
//!
//! # Test knobs (substrings of the request's `model`; they combine, e.g. `mock-slow-nousage`)
//! - `-nousage`: never report usage: no `usage` in JSON bodies or chat/completions streams (even
//!   when `include_usage` is asked), `"usage": null` in the Responses object.
//! - `-slow`: wait 50 ms between streamed frames (default 0 ms, still one frame per event).
//! - `-error500` / `-error429`: answer 500 `server_error` / 429 `rate_limit_exceeded` in OpenAI's
//!   error shape before any output (streaming requests too).
//! - `-cached`: report half the prompt tokens (rounded down) as cached, in chat
//!   (`prompt_tokens_details.cached_tokens`) and responses (`input_tokens_details.cached_tokens`).
//! - `-verbose`: with no output cap in the request, answer 4096 words instead of 16 (as a real
//!   model may run to its own limit).
//! - `-overreport`: report 1000 more completion tokens than the reply has (an upstream whose
//!   usage exceeds every cap the gateway sent).
//! - `-late`: wait 500 ms before answering (before the headers of a stream or JSON answer).
//! - `-midfail`: send 3 frames (stream events, or for a JSON answer its first half) and then abort
//!   the connection: the body stream returns an error, so the client sees a broken transfer.
//! - `-stall`: send 3 frames (as `-midfail`) and then nothing more, without closing the connection,
//!   until the client goes away (an upstream that hangs mid-answer). `-midfail` wins over it.
//! - `-hangopen` (streams): send every frame, then keep the connection open without ending the
//!   response (an upstream that never closes after its last event, e.g. after an in-band error).
//!
//! ## Tokens a client cannot see
//! - `-reasoning` (chat, responses): a reasoning model. Half of each choice's output budget N
//!   (rounded down) goes to reasoning, the visible reply has the other N - N/2 words. As at
//!   OpenAI, reasoning tokens are part of `completion_tokens` / `output_tokens` (so the total
//!   stays within the cap) and are itemised in `completion_tokens_details.reasoning_tokens` /
//!   `output_tokens_details.reasoning_tokens`; a Responses answer also gets a `reasoning` output
//!   item (empty summary) before its message, announced in a stream by `output_item` events.
//! - `-audio` (chat): every `input_audio` content part counts 120 prompt tokens, included in
//!   `prompt_tokens` and itemised in `prompt_tokens_details.audio_tokens` (without the knob such
//!   a part counts nothing).
//!
//! ## Where usage comes
//! - `-inlineusage` (chat, completions streams with `include_usage`): no `"usage": null` on
//!   chunks and no usage-only chunk: the last word of each choice rides on its `finish_reason`
//!   chunk, and the last choice's one also carries the `usage` (as some providers send it).
//!
//! ## SSE framing (every streaming endpoint)
//! - `-comments`: a `: keep-alive` comment event (its own frame) before every event.
//! - `-eventlines`: chat and completions events get an `event: message` line before their data
//!   (Responses events always have their own `event:` lines).
//! - `-crlf`: every line ends with `\r\n` (so every event with `\r\n\r\n`).
//! - `-nospace`: `data:{json}` and `event:name`, without the optional space after the colon.
//! - `-merged`: every 3 events (comment events included) are sent as one frame.
//! - `-split`: the stream's bytes are re-cut into frames at awkward offsets: after the second
//!   byte of every `data` field name (`da|ta:`), after the first byte of the first multi-byte
//!   UTF-8 character of every line, and between every CR and its LF. Frames then straddle
//!   events; `-merged` has no effect under `-split`. (Multi-byte characters come from the
//!   prompt: the reply repeats its words.)
//!
//! ## In-band failures (a `200` whose body says it failed)
//! - `-inbanderror`: streams send 3 words of output (chat: after the role chunk) and then an
//!   error instead of the rest: chat and completions `data: {"error": {…}}` in OpenAI's error
//!   shape, Responses an `event: error` (`{"type": "error", "code", "message", "param"}`); then
//!   the stream ends, with no usage and no `[DONE]` or terminal event. A JSON answer is a `200`
//!   whose body is only the `{"error": {…}}` object (embeddings too).
//! - `-incomplete` (responses): the answer stops after 3 words with `status: "incomplete"`,
//!   `incomplete_details.reason: "content_filter"` and usage for what was produced; a stream
//!   ends with `response.incomplete` (carrying that usage) instead of `response.completed`.
//! - `-failed` (responses): the answer stops after 3 words with `status: "failed"`, an `error`
//!   object and `usage: null`; a stream ends with `response.failed` carrying that response.
//!   At most one of these three applies: `-inbanderror` first, then `-failed`, then
//!   `-incomplete`.
//!
//! The mock requires no credential and echoes none. [`router_with_log`] also returns a [`MockLog`]
//! that records every request (method, path, headers, parsed JSON body) for tests to inspect.
//!
//! Length: a fifth of this file is this description of the mock's behaviour and knobs; the rest is
//! the router and the request handling every endpoint shares (each endpoint's replies are in its
//! own file).

mod chat;
mod completions;
mod counts;
mod embeddings;
mod responses;
#[cfg(test)]
mod tests;
mod wire;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use chat::*;
use completions::*;
use counts::*;
use embeddings::*;
use responses::*;
use wire::*;

/// The models `GET /v1/models` lists; any other name is accepted by the generating routes.
pub const MODELS: [&str; 2] = ["mock-1", "mock-large"];

/// Larger than OpenAI's own limit would need, so the gateway's limit is the one tests exercise.
const BODY_LIMIT: usize = 32 * 1024 * 1024;
const DEFAULT_REPLY_WORDS: usize = 16;
/// Keeps a huge `max_tokens` (which reservation tests like to send) from allocating a huge reply.
const MAX_REPLY_WORDS: usize = 4096;
const SLOW_DELAY: Duration = Duration::from_millis(50);
const LATE_DELAY: Duration = Duration::from_millis(500);
const MIDFAIL_AFTER_FRAMES: usize = 3;
/// `-inbanderror`, `-incomplete`, `-failed`: words of output before the answer goes wrong.
const FAIL_AFTER_WORDS: usize = 3;
/// `-audio`: prompt tokens of one `input_audio` part (not the gateway's 85 for a media part).
const AUDIO_PART_TOKENS: u64 = 120;
/// `-merged`: events per frame.
const MERGED_EVENTS: usize = 3;
const EMBEDDING_DIMENSIONS: usize = 8;
/// Fixed so that two runs of the same request give byte-identical answers.
const CREATED: u64 = 1_767_225_600;
const MESSAGE_OVERHEAD: u64 = 3;

/// The mock API with no request log (the gateway's built-in `mock` upstream: it must not grow).
pub fn router() -> Router {
    build(MockState { log: None })
}

/// The mock API plus a handle on the log of every request it receives, for tests.
pub fn router_with_log() -> (Router, MockLog) {
    let log = MockLog::default();
    (
        build(MockState {
            log: Some(log.clone()),
        }),
        log,
    )
}

/// Serves [`router`] on `listener` until the task is dropped or the listener fails. Like the
/// gateway, it writes small frames at once (`TCP_NODELAY`), as a provider's servers do.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    let listener = listener.tap_io(|tcp| {
        // Without it the mock is only slower, never wrong.
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router()).await
}

/// One request as the mock received it.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// The URI path only, e.g. `/v1/chat/completions`.
    pub path: String,
    /// In arrival order; names are lower-case, values lossily decoded as UTF-8.
    pub headers: Vec<(String, String)>,
    /// The parsed JSON body, or `Value::Null` when the body was empty or not JSON.
    pub body: Value,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Shared, append-only record of the requests a [`router_with_log`] router received.
#[derive(Clone, Debug, Default)]
pub struct MockLog {
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
}

impl MockLog {
    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().clone()
    }

    /// The most recent request, if any.
    pub fn last(&self) -> Option<RecordedRequest> {
        self.lock().last().cloned()
    }

    fn push(&self, request: RecordedRequest) {
        self.lock().push(request);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        // A panicking test thread must not hide the log from the others.
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Clone, Default)]
struct MockState {
    log: Option<MockLog>,
}

impl MockState {
    fn record(&self, method: &Method, path: &str, headers: &HeaderMap, body: &Value) {
        let Some(log) = &self.log else { return };
        log.push(RecordedRequest {
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            headers: headers
                .iter()
                .map(|(name, value)| {
                    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                    (name.as_str().to_owned(), value)
                })
                .collect(),
            body: body.clone(),
        });
    }
}

fn build(state: MockState) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            post(|State(s): State<MockState>, r: Request| handle(s, r, chat_completions)),
        )
        .route(
            "/v1/completions",
            post(|State(s): State<MockState>, r: Request| handle(s, r, completions)),
        )
        .route(
            "/v1/embeddings",
            post(|State(s): State<MockState>, r: Request| handle(s, r, embeddings)),
        )
        .route(
            "/v1/responses",
            post(|State(s): State<MockState>, r: Request| handle(s, r, responses)),
        )
        .route("/v1/models", get(list_models))
        .fallback(not_found)
        .with_state(state)
}

/// An answer in OpenAI's error shape.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn missing(param: &'static str) -> Self {
        Self::invalid(
            format!("Missing required parameter: '{param}'."),
            Some(param),
        )
    }

    fn invalid_value(param: &'static str, expected: &str) -> Self {
        Self::invalid(
            format!("Invalid value for '{param}': expected {expected}."),
            Some(param),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Knobs {
    no_usage: bool,
    slow: bool,
    error500: bool,
    error429: bool,
    cached: bool,
    midfail: bool,
    stall: bool,
    hang_open: bool,
    late: bool,
    verbose: bool,
    overreport: bool,
    reasoning: bool,
    audio: bool,
    inline_usage: bool,
    inband_error: bool,
    incomplete: bool,
    failed: bool,
    wire: Wire,
}

/// The SSE framing knobs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Wire {
    comments: bool,
    event_lines: bool,
    crlf: bool,
    no_space: bool,
    merged: bool,
    split: bool,
}

impl Knobs {
    fn from_model(model: &str) -> Self {
        Self {
            no_usage: model.contains("-nousage"),
            slow: model.contains("-slow"),
            error500: model.contains("-error500"),
            error429: model.contains("-error429"),
            cached: model.contains("-cached"),
            midfail: model.contains("-midfail"),
            stall: model.contains("-stall"),
            hang_open: model.contains("-hangopen"),
            late: model.contains("-late"),
            verbose: model.contains("-verbose"),
            overreport: model.contains("-overreport"),
            reasoning: model.contains("-reasoning"),
            audio: model.contains("-audio"),
            inline_usage: model.contains("-inlineusage"),
            inband_error: model.contains("-inbanderror"),
            incomplete: model.contains("-incomplete"),
            failed: model.contains("-failed"),
            wire: Wire {
                comments: model.contains("-comments"),
                event_lines: model.contains("-eventlines"),
                crlf: model.contains("-crlf"),
                no_space: model.contains("-nospace"),
                merged: model.contains("-merged"),
                split: model.contains("-split"),
            },
        }
    }

    /// `(visible words, reasoning tokens)` of one choice with an output budget of `budget`.
    fn split_budget(self, budget: usize) -> (usize, usize) {
        if self.reasoning {
            (budget - budget / 2, budget / 2)
        } else {
            (budget, 0)
        }
    }

    /// What interrupts playback after [`MIDFAIL_AFTER_FRAMES`] frames, if anything.
    fn stop(self) -> Option<Stop> {
        if self.midfail {
            Some(Stop::Fail)
        } else if self.stall {
            Some(Stop::Stall)
        } else {
            None
        }
    }
}

/// A parsed, recorded request that passed the checks every generating route shares.
struct Call {
    body: Map<String, Value>,
    model: String,
    knobs: Knobs,
    /// Hex hash of the raw body: makes response ids deterministic.
    id: String,
}

impl Call {
    /// Whether to stream; like OpenAI, rejects `stream_options` on a non-streaming request.
    fn stream(&self) -> Result<bool, ApiError> {
        let stream = match self.body.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(_) => return Err(ApiError::invalid_value("stream", "a boolean")),
        };
        let has_options = self
            .body
            .get("stream_options")
            .is_some_and(|o| !o.is_null());
        if has_options && !stream {
            return Err(ApiError::invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                Some("stream_options"),
            ));
        }
        Ok(stream)
    }

    /// Whether a streamed answer ends with a usage chunk (chat and completions).
    fn include_usage(&self) -> bool {
        let asked = self
            .body
            .get("stream_options")
            .and_then(|options| options.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        asked && !self.knobs.no_usage
    }

    /// The reply length: the first of `keys` that is set, else the default.
    fn reply_len(&self, keys: &[&'static str]) -> Result<usize, ApiError> {
        for &key in keys {
            match self.body.get(key) {
                None | Some(Value::Null) => {}
                Some(value) => {
                    let n = value
                        .as_u64()
                        .ok_or_else(|| ApiError::invalid_value(key, "a non-negative integer"))?;
                    return Ok(usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(MAX_REPLY_WORDS));
                }
            }
        }
        Ok(if self.knobs.verbose {
            MAX_REPLY_WORDS
        } else {
            DEFAULT_REPLY_WORDS
        })
    }

    /// `(choices returned, choices generated)`: `n`, and `max(n, best_of)` where the endpoint
    /// takes `best_of` (the upstream bills every generated choice).
    fn choices(&self, best_of: bool) -> Result<(usize, usize), ApiError> {
        let count = |key: &'static str| match self.body.get(key) {
            None | Some(Value::Null) => Ok(1),
            Some(value) => value
                .as_u64()
                .filter(|n| (1..=128).contains(n))
                .map(|n| n as usize)
                .ok_or_else(|| ApiError::invalid_value(key, "an integer from 1 to 128")),
        };
        let n = count("n")?;
        let generated = if best_of { count("best_of")?.max(n) } else { n };
        Ok((n, generated))
    }
}

type Endpoint = fn(&Call) -> Result<Response, ApiError>;

async fn handle(state: MockState, request: Request, endpoint: Endpoint) -> Response {
    let call = match accept(&state, request).await {
        Ok(call) => call,
        Err(error) => return error.into_response(),
    };
    if call.knobs.late {
        tokio::time::sleep(LATE_DELAY).await;
    }
    endpoint(&call).unwrap_or_else(IntoResponse::into_response)
}

/// Reads, records and validates a request; applies the error knobs before any output.
async fn accept(state: &MockState, request: Request) -> Result<Call, ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, BODY_LIMIT).await;
    let parsed = bytes
        .as_ref()
        .ok()
        .map(|raw| serde_json::from_slice::<Value>(raw));
    let recorded = match &parsed {
        Some(Ok(value)) => value,
        _ => &Value::Null,
    };
    state.record(&parts.method, parts.uri.path(), &parts.headers, recorded);

    let Ok(bytes) = bytes else {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "Request body too large: the mock accepts at most {BODY_LIMIT} bytes."
            ),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    };
    let body = match parsed {
        Some(Ok(Value::Object(body))) => body,
        Some(Ok(_)) => {
            return Err(ApiError::invalid(
                "The request body must be a JSON object.",
                None,
            ));
        }
        _ => {
            return Err(ApiError::invalid(
                "We could not parse the JSON body of your request. (HINT: This likely means you \
                 aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
                 but what was sent was not valid JSON.)",
                None,
            ));
        }
    };
    let Some(model) = body.get("model").and_then(Value::as_str).map(str::to_owned) else {
        return Err(ApiError::invalid(
            "you must provide a model parameter",
            None,
        ));
    };
    let knobs = Knobs::from_model(&model);
    if knobs.error500 {
        return Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "The server had an error while processing your request. Sorry about that! \
                      (mock knob -error500)"
                .to_owned(),
            kind: "server_error",
            param: None,
            code: None,
        });
    }
    if knobs.error429 {
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "Rate limit reached for {model} on requests per min (RPM): Limit 1, Used 1, \
                 Requested 1. Please try again in 1s. (mock knob -error429)"
            ),
            kind: "requests",
            param: None,
            code: Some("rate_limit_exceeded"),
        });
    }
    Ok(Call {
        body,
        model,
        knobs,
        id: format!("{:016x}", fnv1a(&bytes)),
    })
}

async fn list_models(State(state): State<MockState>, request: Request) -> Response {
    state.record(
        request.method(),
        request.uri().path(),
        request.headers(),
        &Value::Null,
    );
    let data: Vec<Value> = MODELS
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": CREATED, "owned_by": "tollgate-mock"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn not_found(State(state): State<MockState>, request: Request) -> Response {
    let (method, path) = (request.method(), request.uri().path());
    state.record(method, path, request.headers(), &Value::Null);
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("Invalid URL ({method} {path})"),
        kind: "invalid_request_error",
        param: None,
        code: None,
    }
    .into_response()
}
