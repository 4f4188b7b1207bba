//! How answers go out: SSE events framed as the knobs ask, played back with delays and
//! failures.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde_json::Value;

use super::*;

/// One SSE event before it is framed for the wire: an optional `event:` name and one `data:`.
pub(super) struct Event {
    pub(super) name: Option<String>,
    pub(super) data: String,
}

pub(super) fn sse_data(value: &Value) -> Event {
    Event {
        name: None,
        data: value.to_string(),
    }
}

pub(super) fn sse_done() -> Event {
    Event {
        name: None,
        data: "[DONE]".to_owned(),
    }
}

/// The body frames of `events` as the wire knobs shape them: one event per frame, unless
/// `-merged` or `-split` say otherwise.
pub(super) fn wire_frames(events: &[Event], wire: Wire) -> Vec<Bytes> {
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
pub(super) fn split_awkwardly(stream: &[u8]) -> Vec<Bytes> {
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

pub(super) fn sse_response(events: Vec<Event>, knobs: Knobs) -> Response {
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

pub(super) fn json_response(body: &Value, knobs: Knobs) -> Response {
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
pub(super) enum Stop {
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
pub(super) struct MidFail;

pub(super) struct Playback {
    pub(super) frames: std::vec::IntoIter<Bytes>,
    pub(super) sent: usize,
    pub(super) delay: Duration,
    pub(super) stop: Option<(usize, Stop)>,
    pub(super) failed: bool,
}

/// A body that yields `frames` one per poll-cycle, pausing `delay` between them, and after
/// `stop`'s count of frames errors or stalls. Pausing (even for zero time) before each frame but
/// the first lets hyper flush what it has, so every frame leaves as its own write, and the
/// frames before a `-midfail` error or a `-stall` really reach the client.
pub(super) fn playback(frames: Vec<Bytes>, delay: Duration, stop: Option<(usize, Stop)>) -> Body {
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

pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(super) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
