//! Throughput of the SSE metering tap on a realistic ~10 MB chat stream.
//!
//! Run: `cargo bench --bench sse_observer`. The stream is built in memory (short content deltas
//! of ~200-byte `chat.completion.chunk` events, a usage-only chunk, `[DONE]`) and fed in 16 KiB
//! chunks, as hyper hands them over, with and without removing the usage chunk. Prints the
//! median MB/s of several runs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tollgate::proxy::Endpoint;
use tollgate::proxy::sse::SseObserver;

const TARGET_BYTES: usize = 10 * 1024 * 1024;
const CHUNK_BYTES: usize = 16 * 1024;
const RUNS: usize = 9;

fn build_stream() -> Bytes {
    const WORDS: [&str; 8] = [
        " the",
        " gateway",
        " meters",
        " every",
        " token,",
        " naïvely",
        "\\n",
        " 東京",
    ];
    let mut stream = String::with_capacity(TARGET_BYTES + 1024);
    let mut i = 0usize;
    while stream.len() < TARGET_BYTES {
        let word = WORDS[i % WORDS.len()];
        stream.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\
             \"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n"
        ));
        i += 1;
    }
    stream.push_str(
        "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\
         \"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\
         \"completion_tokens\":52000,\"total_tokens\":52019,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n\
         data: [DONE]\n\n",
    );
    Bytes::from(stream)
}

/// One pass over the stream; returns the elapsed time and the bytes the client would get.
fn run(stream: &Bytes, strip: bool) -> (Duration, usize) {
    let started = Instant::now();
    let mut observer = SseObserver::new(Endpoint::ChatCompletions, strip);
    let mut sent = 0usize;
    let mut offset = 0;
    while offset < stream.len() {
        let end = (offset + CHUNK_BYTES).min(stream.len());
        sent += black_box(observer.observe(stream.slice(offset..end))).len();
        offset = end;
    }
    let (tail, summary) = observer.finish();
    sent += tail.len();
    assert!(
        summary.completed && summary.usage.is_some(),
        "the stream must be metered"
    );
    black_box(summary);
    (started.elapsed(), sent)
}

/// Bytes per microsecond is MB/s (10^6 bytes); integer tenths keep the bench float-free.
fn mb_per_s(bytes: usize, elapsed: Duration) -> String {
    let tenths = u128::try_from(bytes).unwrap_or(u128::MAX) * 10_000 / elapsed.as_nanos().max(1);
    format!("{}.{}", tenths / 10, tenths % 10)
}

fn main() {
    let stream = build_stream();
    let events = stream.iter().filter(|&&b| b == b'\n').count() / 2;
    println!(
        "sse_observer: {} bytes, {events} events, {} KiB chunks, median of {RUNS} runs",
        stream.len(),
        CHUNK_BYTES / 1024
    );
    for strip in [false, true] {
        let _ = run(&stream, strip); // warm-up
        let mut times: Vec<Duration> = Vec::with_capacity(RUNS);
        let mut sent = 0;
        for _ in 0..RUNS {
            let (elapsed, bytes) = run(&stream, strip);
            times.push(elapsed);
            sent = bytes;
        }
        times.sort();
        let median = times[RUNS / 2];
        println!(
            "  strip={strip:<5} median {median:>8.2?} = {} MB/s   (best {})   {sent} bytes forwarded",
            mb_per_s(stream.len(), median),
            mb_per_s(stream.len(), times[0]),
        );
    }
}
