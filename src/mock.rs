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

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use futures_util::stream;
use serde_json::{Map, Value, json};

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

/// Token counts the mock reports for one answer.
struct Counts {
    /// Audio tokens included.
    prompt: u64,
    audio: u64,
    /// Reasoning tokens included.
    completion: u64,
    reasoning: u64,
    cached: u64,
}

impl Counts {
    /// `visible` words and `reasoning` tokens in each of `generated` choices; `audio` of the
    /// `prompt` tokens were audio.
    fn new(
        prompt: u64,
        audio: u64,
        (visible, reasoning): (usize, usize),
        generated: usize,
        knobs: Knobs,
    ) -> Self {
        let extra = if knobs.overreport { 1000 } else { 0 };
        Self {
            prompt,
            audio,
            completion: ((visible + reasoning) * generated) as u64 + extra,
            reasoning: (reasoning * generated) as u64,
            cached: if knobs.cached { prompt / 2 } else { 0 },
        }
    }

    fn chat(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": self.audio},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        })
    }

    fn completions(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
        })
    }

    fn responses(&self) -> Value {
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.completion,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.prompt + self.completion,
        })
    }
}

/// The body of an in-band error (`-inbanderror`), in OpenAI's error shape.
fn inband_error() -> Value {
    json!({"error": {
        "message": "The server had an error while processing your request. Sorry about that! \
                    (mock knob -inbanderror)",
        "type": "server_error",
        "param": null,
        "code": "server_error",
    }})
}

fn count_words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// The text of a message `content`: a string, or the `text` of each content part.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|part| {
                part.as_str()
                    .or_else(|| part.get("text").and_then(Value::as_str))
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

fn reply_words(prompt: &str, len: usize) -> Vec<String> {
    let base: Vec<&str> = "Mock reply to:"
        .split_whitespace()
        .chain(prompt.split_whitespace())
        .collect();
    base.iter()
        .cycle()
        .take(len)
        .map(|word| (*word).to_owned())
        .collect()
}

/// One streamed delta per word; concatenated they equal the non-streamed text.
fn word_deltas(words: &[String]) -> impl Iterator<Item = String> + '_ {
    words.iter().enumerate().map(|(i, word)| {
        if i == 0 {
            word.clone()
        } else {
            format!(" {word}")
        }
    })
}

/// The `input_audio` parts of a message `content`.
fn audio_parts(content: Option<&Value>) -> u64 {
    let parts = content
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    parts
        .iter()
        .filter(|part| part.get("type").and_then(Value::as_str) == Some("input_audio"))
        .count() as u64
}

fn chat_completions(call: &Call) -> Result<Response, ApiError> {
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

/// A `prompt` (completions) or `input` (embeddings) entry: text, or pre-tokenized ids.
enum Piece {
    Text(String),
    Tokens(Vec<u64>),
}

impl Piece {
    fn tokens(&self) -> u64 {
        match self {
            Self::Text(text) => count_words(text),
            Self::Tokens(ids) => ids.len() as u64,
        }
    }
}

/// Parses OpenAI's four accepted forms: a string, strings, one id array, id arrays.
fn pieces(value: Option<&Value>, param: &'static str) -> Result<Vec<Piece>, ApiError> {
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

fn completions(call: &Call) -> Result<Response, ApiError> {
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

fn embeddings(call: &Call) -> Result<Response, ApiError> {
    let input = pieces(call.body.get("input"), "input")?;
    if call.knobs.inband_error {
        return Ok(json_response(&inband_error(), call.knobs));
    }
    let base64 = match call.body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(format)) if format == "float" => false,
        Some(Value::String(format)) if format == "base64" => true,
        Some(_) => {
            return Err(ApiError::invalid_value(
                "encoding_format",
                "'float' or 'base64'",
            ));
        }
    };
    let data: Vec<Value> = input
        .iter()
        .enumerate()
        .map(|(index, piece)| {
            let seed = match piece {
                Piece::Text(text) => fnv1a(text.as_bytes()),
                Piece::Tokens(ids) => {
                    let bytes: Vec<u8> = ids.iter().flat_map(|id| id.to_le_bytes()).collect();
                    fnv1a(&bytes)
                }
            };
            let vector = embedding(seed);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let mut body = json!({"object": "list", "data": data, "model": call.model});
    if !call.knobs.no_usage {
        let tokens: u64 = input.iter().map(Piece::tokens).sum();
        body["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    Ok(json_response(&body, call.knobs))
}

/// Eight numbers in [-1, 1], a pure function of `seed`.
#[expect(
    clippy::float_arithmetic,
    reason = "embedding components are plain numbers, not money; k / 65536 is exact in f32"
)]
fn embedding(seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..EMBEDDING_DIMENSIONS)
        .map(|_| {
            // The modulus keeps the value within 17 bits, so both casts are exact.
            let k = (splitmix64(&mut state) % 131_073) as i32 - 65_536;
            k as f32 / 65_536.0
        })
        .collect()
}

fn responses(call: &Call) -> Result<Response, ApiError> {
    let stream = call.stream()?;
    let budget = call.reply_len(&["max_output_tokens"])?;
    let (visible, reasoning) = call.knobs.split_budget(budget);
    let instructions = match call.body.get("instructions") {
        Some(Value::String(text)) => MESSAGE_OVERHEAD + count_words(text),
        _ => 0,
    };
    let (input_tokens, last_user) = match call.body.get("input") {
        Some(Value::String(text)) => (MESSAGE_OVERHEAD + count_words(text), text.clone()),
        Some(Value::Array(items)) => {
            let tokens: u64 = items
                .iter()
                .map(|item| MESSAGE_OVERHEAD + count_words(&content_text(item.get("content"))))
                .sum();
            let last_user = items
                .iter()
                .rev()
                .find(|item| item.get("role").and_then(Value::as_str) == Some("user"))
                .map(|item| content_text(item.get("content")))
                .unwrap_or_default();
            (tokens, last_user)
        }
        None | Some(Value::Null) => return Err(ApiError::missing("input")),
        Some(_) => {
            return Err(ApiError::invalid_value(
                "input",
                "a string or an array of items",
            ));
        }
    };
    let ending = Ending::of(call.knobs);
    let mut words = reply_words(&last_user, visible);
    if ending != Ending::Completed {
        words.truncate(FAIL_AFTER_WORDS);
    }
    let text = words.join(" ");
    let counts = Counts::new(
        instructions + input_tokens,
        0,
        (words.len(), reasoning),
        1,
        call.knobs,
    );
    let usage = if call.knobs.no_usage || ending == Ending::Failed {
        Value::Null
    } else {
        counts.responses()
    };
    if !stream && ending == Ending::Error {
        return Ok(json_response(&inband_error(), call.knobs));
    }
    let response_id = format!("resp_mock{}", call.id);
    let item_id = format!("msg_mock{}", call.id);
    let response = |status: &str, output: Value, usage: Value| {
        let mut response = json!({
            "id": response_id,
            "object": "response",
            "created_at": CREATED,
            "status": status,
            "error": null,
            "incomplete_details": null,
            "instructions": call.body.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": call.body.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "model": call.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "metadata": {},
            "usage": usage,
        });
        match status {
            "failed" => {
                response["error"] = json!({"code": "server_error", "message": "The model failed \
                    to generate a response. (mock knob -failed)"});
            }
            "incomplete" => {
                response["incomplete_details"] = json!({"reason": "content_filter"});
            }
            _ => {}
        }
        response
    };
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let message = |status: &str, content: Value| json!({"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content});
    // `-reasoning`: a reasoning item (its summary not asked for) comes before the message.
    let reasoning_item = (reasoning > 0)
        .then(|| json!({"id": format!("rs_mock{}", call.id), "type": "reasoning", "summary": []}));
    let message_index = usize::from(reasoning_item.is_some());
    let output = |message: Value| {
        let mut output: Vec<Value> = reasoning_item.iter().cloned().collect();
        output.push(message);
        Value::Array(output)
    };
    let (status, message_status) = match ending {
        Ending::Completed | Ending::Error => ("completed", "completed"),
        Ending::Incomplete => ("incomplete", "incomplete"),
        Ending::Failed => ("failed", "in_progress"),
    };
    let final_message = message(message_status, json!([part(&text)]));

    if !stream {
        let body = response(status, output(final_message), usage);
        return Ok(json_response(&body, call.knobs));
    }

    let in_progress = response("in_progress", json!([]), Value::Null);
    let at = |fields: Value| {
        let mut fields = fields;
        fields["item_id"] = json!(item_id);
        fields["output_index"] = json!(message_index);
        fields["content_index"] = json!(0);
        fields
    };
    let mut events = ResponseEvents::default();
    events.push("response.created", json!({"response": in_progress}));
    events.push("response.in_progress", json!({"response": in_progress}));
    if let Some(item) = &reasoning_item {
        events.push(
            "response.output_item.added",
            json!({"output_index": 0, "item": item}),
        );
        events.push(
            "response.output_item.done",
            json!({"output_index": 0, "item": item}),
        );
    }
    let added = json!({"output_index": message_index, "item": message("in_progress", json!([]))});
    events.push("response.output_item.added", added);
    events.push("response.content_part.added", at(json!({"part": part("")})));
    for delta in word_deltas(&words) {
        events.push(
            "response.output_text.delta",
            at(json!({"delta": delta, "logprobs": []})),
        );
    }
    match ending {
        Ending::Error => {
            let error = inband_error();
            let fields = json!({"code": error["error"]["code"], "message": error["error"]["message"], "param": null});
            events.push("error", fields);
        }
        Ending::Failed => {
            let failed = response(status, output(final_message), usage);
            events.push("response.failed", json!({"response": failed}));
        }
        Ending::Completed | Ending::Incomplete => {
            events.push(
                "response.output_text.done",
                at(json!({"text": text, "logprobs": []})),
            );
            events.push(
                "response.content_part.done",
                at(json!({"part": part(&text)})),
            );
            let item_done = json!({"output_index": message_index, "item": final_message});
            events.push("response.output_item.done", item_done);
            let terminal = response(status, output(final_message), usage);
            events.push(&format!("response.{status}"), json!({"response": terminal}));
        }
    }
    Ok(sse_response(events.events, call.knobs))
}

/// How a Responses answer ends (the in-band failure knobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    Completed,
    /// `-inbanderror`: an `error` event, or a `200` error body.
    Error,
    /// `-failed`: `status: "failed"`, no usage.
    Failed,
    /// `-incomplete`: `status: "incomplete"` with usage.
    Incomplete,
}

impl Ending {
    fn of(knobs: Knobs) -> Self {
        if knobs.inband_error {
            Self::Error
        } else if knobs.failed {
            Self::Failed
        } else if knobs.incomplete {
            Self::Incomplete
        } else {
            Self::Completed
        }
    }
}

/// Numbers Responses stream events as OpenAI does (`sequence_number` from 0).
#[derive(Default)]
struct ResponseEvents {
    events: Vec<Event>,
}

impl ResponseEvents {
    fn push(&mut self, name: &str, mut fields: Value) {
        fields["type"] = json!(name);
        fields["sequence_number"] = json!(self.events.len());
        self.events.push(Event {
            name: Some(name.to_owned()),
            data: fields.to_string(),
        });
    }
}

/// One SSE event before it is framed for the wire: an optional `event:` name and one `data:`.
struct Event {
    name: Option<String>,
    data: String,
}

fn sse_data(value: &Value) -> Event {
    Event {
        name: None,
        data: value.to_string(),
    }
}

fn sse_done() -> Event {
    Event {
        name: None,
        data: "[DONE]".to_owned(),
    }
}

/// The body frames of `events` as the wire knobs shape them: one event per frame, unless
/// `-merged` or `-split` say otherwise.
fn wire_frames(events: &[Event], wire: Wire) -> Vec<Bytes> {
    let eol = if wire.crlf { "\r\n" } else { "\n" };
    let space = if wire.no_space { "" } else { " " };
    let mut frames = Vec::new();
    for event in events {
        if wire.comments {
            frames.push(Bytes::from(format!(": keep-alive{eol}{eol}")));
        }
        let name = match &event.name {
            Some(name) => Some(name.as_str()),
            None => wire.event_lines.then_some("message"),
        };
        let name_line = name.map_or(String::new(), |name| format!("event:{space}{name}{eol}"));
        let data = &event.data;
        frames.push(Bytes::from(format!(
            "{name_line}data:{space}{data}{eol}{eol}"
        )));
    }
    if wire.split {
        return split_awkwardly(&frames.concat());
    }
    if wire.merged {
        return frames
            .chunks(MERGED_EVENTS)
            .map(|group| Bytes::from(group.concat()))
            .collect();
    }
    frames
}

/// `-split`: cuts `stream` after the second byte of every `data` field name, after the first
/// byte of the first multi-byte character of every line, and between every CR and LF.
fn split_awkwardly(stream: &[u8]) -> Vec<Bytes> {
    let mut cuts = Vec::new();
    let mut line_start = true;
    let mut cut_a_character = false;
    for (i, &byte) in stream.iter().enumerate() {
        if line_start && stream[i..].starts_with(b"data") {
            cuts.push(i + 2);
        }
        // A UTF-8 lead byte of a multi-byte character is 0b11xxxxxx.
        if byte >= 0xC0 && !cut_a_character {
            cuts.push(i + 1);
            cut_a_character = true;
        }
        let next = stream.get(i + 1).copied();
        if byte == b'\r' && next == Some(b'\n') {
            cuts.push(i + 1);
        }
        line_start = byte == b'\n' || (byte == b'\r' && next != Some(b'\n'));
        if line_start {
            cut_a_character = false;
        }
    }
    cuts.push(stream.len());
    cuts.dedup();
    let mut start = 0;
    cuts.into_iter()
        .map(|end| {
            let frame = Bytes::copy_from_slice(&stream[start..end]);
            start = end;
            frame
        })
        .collect()
}

fn sse_response(events: Vec<Event>, knobs: Knobs) -> Response {
    let delay = if knobs.slow {
        SLOW_DELAY
    } else {
        Duration::ZERO
    };
    let stop = match knobs.stop() {
        Some(stop) => Some((MIDFAIL_AFTER_FRAMES, stop)),
        None if knobs.hang_open => Some((usize::MAX, Stop::HangAtEnd)),
        None => None,
    };
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    let frames = wire_frames(&events, knobs.wire);
    (headers, playback(frames, delay, stop)).into_response()
}

fn json_response(body: &Value, knobs: Knobs) -> Response {
    let Some(stop) = knobs.stop() else {
        return Json(body).into_response();
    };
    let bytes = Bytes::from(body.to_string());
    let half = bytes.slice(..bytes.len() / 2);
    let headers = [(header::CONTENT_TYPE, "application/json")];
    (
        headers,
        playback(vec![half], Duration::ZERO, Some((1, stop))),
    )
        .into_response()
}

/// How playback stops early: `-midfail` or `-stall`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The body stream returns an error: the client sees an aborted transfer.
    Fail,
    /// Nothing more is sent and the connection stays open, until the client goes away.
    Stall,
    /// Every frame is sent, then the response never ends (`-hangopen`).
    HangAtEnd,
}

/// Why a `-midfail` body stops: surfaces to the client as an aborted transfer.
#[derive(Debug, thiserror::Error)]
#[error("mock upstream aborted the response on purpose (model knob -midfail)")]
struct MidFail;

struct Playback {
    frames: std::vec::IntoIter<Bytes>,
    sent: usize,
    delay: Duration,
    stop: Option<(usize, Stop)>,
    failed: bool,
}

/// A body that yields `frames` one per poll-cycle, pausing `delay` between them, and after
/// `stop`'s count of frames errors or stalls. Pausing (even for zero time) before each frame but
/// the first lets hyper flush what it has, so every frame leaves as its own write, and the
/// frames before a `-midfail` error or a `-stall` really reach the client.
fn playback(frames: Vec<Bytes>, delay: Duration, stop: Option<(usize, Stop)>) -> Body {
    let state = Playback {
        frames: frames.into_iter(),
        sent: 0,
        delay,
        stop,
        failed: false,
    };
    Body::from_stream(stream::unfold(state, |mut state| async move {
        if state.failed {
            return None;
        }
        if state.sent > 0 {
            if state.delay.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(state.delay).await;
            }
        }
        match state.stop {
            Some((after, Stop::Fail)) if after == state.sent => {
                state.failed = true;
                return Some((Err(MidFail), state));
            }
            Some((after, Stop::Stall)) if after == state.sent => {
                // Dropped (and the connection closed) when the client goes away.
                std::future::pending::<()>().await;
            }
            _ => {}
        }
        let Some(frame) = state.frames.next() else {
            if matches!(state.stop, Some((_, Stop::HangAtEnd))) {
                // Dropped (and the connection closed) when the client goes away.
                std::future::pending::<()>().await;
            }
            return None;
        };
        state.sent += 1;
        Some((Ok(frame), state))
    }))
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use std::time::Instant;

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
            let chunks =
                data_chunks(&stream_events(post(&base, "/completions", &request).await).await);
            assert_eq!(chunks.len(), 2 * 2);
            let with_usage: Vec<&Value> =
                chunks.iter().filter(|c| c.get("usage").is_some()).collect();
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
            let chunks =
                data_chunks(&stream_events(post(&base, "/completions", &request).await).await);
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
}
