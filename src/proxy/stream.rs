//! The metered response body: upstream SSE frames go to the client as they arrive, a copy goes
//! through the [`SseObserver`], and the request is settled when the stream ends.
//!
//! Settlement lives in `Drop`, so every ending is billed exactly once: the upstream finished, the
//! upstream failed, the stream went idle, the gateway cut it at shutdown, or the client hung up
//! (hyper drops the body). For a client that hung up, the `finish` policy reads the rest of the
//! upstream's answer on its own task and bills the usage the upstream reports; `cancel` drops
//! (and so cancels) the upstream request and bills what was produced.

use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream};
use http_body_util::BodyExt;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::charge::Charge;
use super::sse::SseObserver;
use crate::config::DisconnectPolicy;
use crate::metering::{RENEWAL_GRACE, RenewError};

/// How long to wait, after the terminal event, for the upstream to end its response.
const END_AFTER_TERMINAL_EVENT: Duration = Duration::from_secs(1);

struct Metered {
    upstream: Body,
    observer: SseObserver,
    charge: Option<Charge>,
    idle_timeout: Duration,
    status: &'static str,
    /// From the terminal event on, what the client gets is held back here until the
    /// settlement is durable: the response's last bytes leave only after it (docs/architecture.md I4).
    tail: BytesMut,
    /// Resolves when the gateway shuts down and cuts the requests still running.
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Ticks when the hold is due for renewal.
    renew: tokio::time::Interval,
    /// When the hold was last renewed (or taken).
    renewed_at: tokio::time::Instant,
    /// What the upstream's body gave while frames were being gathered into one write (its end
    /// or an error), to be handled next.
    pending: Option<Next>,
    /// When the previous upstream frame arrived.
    last_frame_at: Option<tokio::time::Instant>,
}

impl Drop for Metered {
    fn drop(&mut self) {
        let Some(charge) = self.charge.take() else {
            return;
        };
        let config = charge.meter.config();
        let finish = config.on_client_disconnect == DisconnectPolicy::Finish;
        let bound = Duration::from_secs(config.disconnect_finish_secs);
        if finish && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // The client hung up: read the rest of the answer for the usage the upstream
            // reports (reasoning and media tokens included), as the upstream bills it.
            let upstream = std::mem::replace(&mut self.upstream, Body::empty());
            let observer =
                std::mem::replace(&mut self.observer, SseObserver::new(charge.endpoint, false));
            runtime.spawn(finish_after_disconnect(
                upstream,
                observer,
                charge,
                bound,
                self.idle_timeout,
            ));
            return;
        }
        let (_, summary) = self.observer.finish();
        // Queued now; nobody is left to wait for it.
        let _ = charge.settle(
            summary.usage,
            &summary.output_text,
            summary.saw_output,
            self.status,
        );
    }
}

/// Reads a stream whose client hung up to its end (within `bound`, and `idle_timeout` between
/// frames), then bills it: the usage the upstream reported, or what was produced by then.
async fn finish_after_disconnect(
    mut upstream: Body,
    mut observer: SseObserver,
    charge: Charge,
    bound: Duration,
    idle_timeout: Duration,
) {
    let deadline = tokio::time::Instant::now() + bound;
    let mut cut = Box::pin(charge.meter.cut_signal());
    let mut renew = charge.meter.renewal_ticker();
    while !observer.completed() && !observer.failed() {
        let frame = tokio::select! {
            frame = tokio::time::timeout(idle_timeout, upstream.frame()) => frame,
            () = tokio::time::sleep_until(deadline) => break,
            () = &mut cut => break,
            _ = renew.tick() => {
                // The hold must outlive the drain; once it is gone, stop and bill what came.
                if let Err(RenewError::Lost) = charge.meter.renew(&charge.hold, None).await {
                    break;
                }
                continue;
            }
        };
        match frame {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    observer.observe(data);
                }
            }
            Ok(Some(Err(_)) | None) | Err(_) => break,
        }
    }
    // Cancels the upstream call if it is still running.
    drop(upstream);
    let (_, summary) = observer.finish();
    let _ = charge.settle(
        summary.usage,
        &summary.output_text,
        summary.saw_output,
        "client_disconnected",
    );
}

/// Wraps an upstream SSE body; `strip_usage_chunk` removes the usage chunk the gateway asked for.
pub fn metered_body(
    upstream: Body,
    charge: Charge,
    strip_usage_chunk: bool,
    idle_timeout: Duration,
) -> Body {
    let observer = SseObserver::new(charge.endpoint, strip_usage_chunk);
    let cut = Box::pin(charge.meter.cut_signal());
    let renew = charge.meter.renewal_ticker();
    let state = Metered {
        upstream,
        observer,
        charge: Some(charge),
        idle_timeout,
        // Until the stream ends by itself, a drop means the client went away.
        status: "client_disconnected",
        tail: BytesMut::new(),
        cut,
        renew,
        renewed_at: tokio::time::Instant::now(),
        pending: None,
        last_frame_at: None,
    };
    Body::from_stream(frames(state))
}

/// What ended the wait for the next upstream frame.
enum Next {
    Frame(Option<Result<http_body::Frame<Bytes>, axum::Error>>),
    Idle,
    Cut,
    Renew,
}

fn frames(state: Metered) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send {
    futures_util::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            let wait = if state.observer.completed() || state.observer.failed() {
                END_AFTER_TERMINAL_EVENT.min(state.idle_timeout)
            } else {
                state.idle_timeout
            };
            let next = match state.pending.take() {
                Some(next) => next,
                None => tokio::select! {
                    frame = tokio::time::timeout(wait, state.upstream.frame()) => {
                        frame.map_or(Next::Idle, Next::Frame)
                    }
                    () = &mut state.cut => Next::Cut,
                    _ = state.renew.tick() => Next::Renew,
                },
            };
            match next {
                Next::Frame(Some(Ok(frame))) => {
                    let now = tokio::time::Instant::now();
                    let back_to_back = state
                        .last_frame_at
                        .replace(now)
                        .is_some_and(|previous| now - previous < BACK_TO_BACK);
                    let Some(out) = observe_frame(&mut state, frame) else {
                        continue;
                    };
                    let out = gather_ready_frames(&mut state, out, back_to_back).await;
                    if out.is_empty() {
                        continue;
                    }
                    return Some((Ok(out), Some(state)));
                }
                Next::Frame(None) => {
                    state.status = ended_status(&state.observer);
                    let rest = settle_now(&mut state).await;
                    return rest.map(|bytes| (Ok(bytes), None));
                }
                // Nothing after a terminal event or an in-band failure changes what is owed.
                Next::Idle if state.observer.completed() || state.observer.failed() => {
                    // The answer is over (whole, or failed in-band); only the upstream's end of
                    // the response is missing.
                    state.status = ended_status(&state.observer);
                    let rest = settle_now(&mut state).await;
                    return rest.map(|bytes| (Ok(bytes), None));
                }
                Next::Frame(Some(Err(error))) => {
                    tracing::warn!(%error, "upstream stream failed");
                    state.status = "upstream_failed";
                    settle_now(&mut state).await;
                    return Some((Err(std::io::Error::other("upstream stream failed")), None));
                }
                Next::Idle => {
                    tracing::warn!(timeout = ?state.idle_timeout, "upstream stream went idle");
                    state.status = "upstream_timeout";
                    settle_now(&mut state).await;
                    return Some((
                        Err(std::io::Error::other("upstream stream timed out")),
                        None,
                    ));
                }
                Next::Renew => {
                    if renew_hold(&mut state).await {
                        continue;
                    }
                    state.status = "hold_lost";
                    settle_now(&mut state).await;
                    return Some((
                        Err(std::io::Error::other("the request's credit hold was lost")),
                        None,
                    ));
                }
                Next::Cut => {
                    tracing::warn!("gateway shutting down: stream cut");
                    state.status = "cut_at_shutdown";
                    settle_now(&mut state).await;
                    return Some((Err(std::io::Error::other("gateway shutting down")), None));
                }
            }
        }
    })
}

/// Observes one upstream frame; returns what the client gets for it now, or `None` when it
/// holds no data or the answer is complete (the terminal event and what follows wait in `tail`
/// until the settlement is durable).
fn observe_frame(state: &mut Metered, frame: http_body::Frame<Bytes>) -> Option<Bytes> {
    let data = frame.into_data().ok()?;
    let out = state.observer.observe(data);
    if state.observer.completed() {
        state.tail.extend_from_slice(&out);
        return None;
    }
    Some(out)
}

/// Most frames gathered into one write.
const MAX_GATHERED_FRAMES: usize = 64;
/// Bytes past which no more frames are gathered: a write is then large enough to pay for
/// itself, and a stream of large frames never holds more than this (plus one frame) in memory.
const MAX_GATHERED_BYTES: usize = 64 * 1024;
/// Scheduler turns without a new frame after which the frames gathered so far are sent. A frame
/// the upstream's connection has already read takes up to two turns to be handed over (measured
/// by `streaming::frames_that_arrive_together_leave_in_one_write`).
const IDLE_TURNS: u32 = 2;
/// A frame that arrives within this of the previous one is part of a burst: more may be waiting.
const BACK_TO_BACK: Duration = Duration::from_millis(1);

/// Appends to `first` the frames the upstream's connection has already read, so that they leave
/// in one write to the client instead of one write each (frames that reach the gateway together,
/// in one segment or back to back, are handed over by hyper's client one at a time). Waits for
/// no frame that has not arrived: in a burst (`back_to_back`) it lets the other tasks run between
/// frames ([`tokio::task::yield_now`]) and sends what it has after [`IDLE_TURNS`] turns bring
/// nothing; otherwise (a stream that trickles) it takes only what is ready at once.
async fn gather_ready_frames(state: &mut Metered, first: Bytes, back_to_back: bool) -> Bytes {
    let turns = if back_to_back { IDLE_TURNS } else { 0 };
    let mut gathered: Option<BytesMut> = None;
    let mut idle_turns = 0;
    for _ in 0..MAX_GATHERED_FRAMES {
        if gathered.as_ref().map_or(first.len(), BytesMut::len) >= MAX_GATHERED_BYTES {
            break;
        }
        match state.upstream.frame().now_or_never() {
            Some(Some(Ok(frame))) => {
                idle_turns = 0;
                state.last_frame_at = Some(tokio::time::Instant::now());
                if let Some(out) = observe_frame(state, frame) {
                    gathered
                        .get_or_insert_with(|| BytesMut::from(&first[..]))
                        .extend_from_slice(&out);
                } else if state.observer.completed() {
                    break;
                }
            }
            Some(end_or_error) => {
                state.pending = Some(Next::Frame(end_or_error));
                break;
            }
            None if idle_turns < turns => {
                tokio::task::yield_now().await;
                idle_turns += 1;
            }
            None => break,
        }
    }
    gathered.map_or(first, BytesMut::freeze)
}

/// The status of a stream that ended by itself: `upstream_failed` when the upstream said so in
/// the stream (an error chunk or event, `response.failed`), else `completed`. Charge is the
/// same either way (usage if reported, else the output); only the record tells them apart.
fn ended_status(observer: &SseObserver) -> &'static str {
    if observer.failed() {
        "upstream_failed"
    } else {
        "completed"
    }
}

/// Renews the stream's hold; false when the stream must stop because its hold is no longer
/// covered: gone, or unrenewable for so long that siblings may have released it.
async fn renew_hold(state: &mut Metered) -> bool {
    let Some(charge) = &state.charge else {
        return true;
    };
    // What this stream has delivered so far, billed by a sibling if this instance dies.
    let progress = if charge.meter.keeps_progress() {
        let summary = state.observer.summary();
        charge.finished(
            summary.usage,
            &summary.output_text,
            summary.saw_output,
            "instance_lost",
        )
    } else {
        None
    };
    match charge.meter.renew(&charge.hold, progress).await {
        Ok(()) => {
            state.renewed_at = tokio::time::Instant::now();
            true
        }
        Err(RenewError::Lost) => {
            tracing::error!(request_id = %charge.hold.request_id, "a running stream's hold is gone; cutting it");
            false
        }
        Err(error) if state.renewed_at.elapsed() >= RENEWAL_GRACE => {
            tracing::error!(%error, request_id = %charge.hold.request_id, "a running stream's hold could not be renewed in time; cutting it");
            false
        }
        Err(error) => {
            tracing::warn!(%error, request_id = %charge.hold.request_id, "cannot renew a running stream's hold; retrying");
            true
        }
    }
}

/// Settles with the final summary and waits until the settlement is durable, so the response
/// ends only once a crash can no longer lose its charge; returns the bytes held back (the
/// terminal event and anything the observer kept): the last bytes of the response.
///
/// Cancellation-safe: the settlement is queued before the first await, so a client that hangs
/// up during the wait (dropping this future) changes nothing.
async fn settle_now(state: &mut Metered) -> Option<Bytes> {
    let (rest, summary) = state.observer.finish();
    let durable = state.charge.take().and_then(|charge| {
        charge.settle(
            summary.usage,
            &summary.output_text,
            summary.saw_output,
            state.status,
        )
    });
    if let Some(durable) = durable {
        let _ = durable.await;
    }
    state.tail.extend_from_slice(&rest);
    let tail = state.tail.split().freeze();
    (!tail.is_empty()).then_some(tail)
}
