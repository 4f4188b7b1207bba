//! Added latency and throughput of the gateway over calling the fake upstream directly.
//!
//! Starts the mock OpenAI upstream and a gateway (temp SQLite ledger) on loopback ports, then
//! sends the same chat request (non-streaming, or streaming with `STREAM=1`):
//! - at a fixed rate (open loop: a request is started every interval whether or not earlier
//!   ones finished), first straight to the upstream, then through the gateway, and prints
//!   p50/p99/max of each and the difference;
//! - from `CONCURRENCY` clients back to back for `SECONDS` (closed loop), and prints requests
//!   per second, direct and through the gateway.
//!
//! Every request through the gateway waits for its settlement to be committed to SQLite before
//! its response ends (group commit).
//! Run: `cargo bench --bench gateway` (options: `RATE` per second, default 200; `REQUESTS`,
//! default 2000; `STREAM`, 0 or 1; `CONCURRENCY`, default 32; `SECONDS`, default 5).

mod support;

use support::{env_or, percentile};

use std::time::{Duration, Instant};

use serde_json::json;
use tollgate::app::App;
use tollgate::config::Config;
use tollgate::domain::{AccountId, Credits};
use tollgate::ledger::{EntryType, GrantRequest};

const JWT_SECRET: &str = "benchmark-secret-of-at-least-32-bytes!!";

fn body(stream: bool) -> serde_json::Value {
    json!({"model": "mock-1", "messages": [{"role": "user", "content": "benchmark this request please"}], "max_tokens": 16, "stream": stream})
}

/// One request, read to its end.
async fn one(client: &reqwest::Client, url: &str, bearer: &str, body: &serde_json::Value) {
    let response = client
        .post(url)
        .bearer_auth(bearer)
        .json(body)
        .send()
        .await
        .expect("sent");
    assert!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    response.bytes().await.expect("body");
}

/// Requests per second from `concurrency` clients sending back to back for `seconds`.
async fn throughput(
    client: &reqwest::Client,
    url: &str,
    bearer: &str,
    body: &serde_json::Value,
    concurrency: u64,
    seconds: u64,
) -> u64 {
    let until = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, bearer, body) = (
                client.clone(),
                url.to_owned(),
                bearer.to_owned(),
                body.clone(),
            );
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < until {
                    one(&client, &url, &bearer, &body).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    total / seconds.max(1)
}

async fn run(
    client: &reqwest::Client,
    url: &str,
    bearer: &str,
    body: &serde_json::Value,
    rate: u64,
    count: u64,
) -> Vec<Duration> {
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        ticker.tick().await;
        let (client, url, bearer, body) = (
            client.clone(),
            url.to_owned(),
            bearer.to_owned(),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            one(&client, &url, &bearer, &body).await;
            start.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    for task in tasks {
        latencies.push(task.await.expect("task"));
    }
    latencies.sort();
    latencies
}

/// Microseconds, for printing (integer arithmetic only).
fn us(d: Duration) -> i128 {
    i128::try_from(d.as_micros()).unwrap_or(i128::MAX)
}

fn report(name: &str, latencies: &[Duration]) -> (Duration, Duration) {
    let (p50, p99) = (percentile(latencies, 50), percentile(latencies, 99));
    println!(
        "{name:<10} n={:<5} p50={:>6} us  p99={:>6} us  max={:>6} us",
        latencies.len(),
        us(p50),
        us(p99),
        us(latencies[latencies.len() - 1])
    );
    (p50, p99)
}

#[tokio::main]
async fn main() {
    let rate = env_or("RATE", 200).max(1);
    let count = env_or("REQUESTS", 2000).max(10);
    let stream = env_or("STREAM", 0) == 1;
    let concurrency = env_or("CONCURRENCY", 32).max(1);
    let seconds = env_or("SECONDS", 5).max(1);
    let body = body(stream);

    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_url = format!("http://{}/v1", upstream.local_addr().expect("addr"));
    tokio::spawn(async move { tollgate::mock::serve(upstream).await });

    let dir = tempfile::tempdir().expect("temp dir");
    let pricing = dir.path().join("pricing.toml");
    std::fs::write(
        &pricing,
        "[default]\nprompt_per_1k = \"1\"\ncompletion_per_1k = \"1\"\n",
    )
    .expect("pricing");
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n[auth.jwt]\nsecret = \"{JWT_SECRET}\"\n\
             [metering]\npricing_file = \"{}\"\n[[upstreams]]\nname = \"fake\"\nbase_url = \"{upstream_url}\"\nmodels = [\"mock-*\"]\n",
            dir.path().join("ledger.db").display(),
            pricing.display()
        ),
    )
    .expect("config");
    let app = App::build(Config::load(&config_path).expect("config"))
        .await
        .expect("app");
    let gateway_url = format!(
        "http://{}/v1/chat/completions",
        app.local_addr().expect("addr")
    );
    let state = app.state().clone();
    state
        .ledger
        .grant(&GrantRequest {
            account: AccountId::parse("bench").expect("id"),
            entry_type: EntryType::Bonus,
            amount: Credits::from_whole(1_000_000).expect("amount"),
            description: "benchmark".into(),
            reference: None,
            expires_at_ms: None,
            draw_first_from: Vec::new(),
        })
        .await
        .expect("grant");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let token = tollgate::auth::jwt::mint_hs256(
        JWT_SECRET,
        "bench",
        Duration::from_secs(3600),
        None,
        None,
        None,
    )
    .expect("token");

    let client = reqwest::Client::new();
    // Warm both paths (connection pools, tokenizer) before measuring.
    let direct_url = format!("{upstream_url}/chat/completions");
    run(&client, &direct_url, "x", &body, 100, 50).await;
    run(&client, &gateway_url, &token, &body, 100, 50).await;

    let kind = if stream { "streaming" } else { "non-streaming" };
    println!("fixed rate {rate} req/s, {count} requests each, {kind} chat, loopback");
    let direct = run(&client, &direct_url, "x", &body, rate, count).await;
    let (d50, d99) = report("direct", &direct);
    let through = run(&client, &gateway_url, &token, &body, rate, count).await;
    let (g50, g99) = report("gateway", &through);
    println!(
        "added      p50={:>6} us  p99={:>6} us",
        us(g50) - us(d50),
        us(g99) - us(d99)
    );
    println!("closed loop, {concurrency} clients, {seconds} s each");
    let direct = throughput(&client, &direct_url, "x", &body, concurrency, seconds).await;
    println!("direct     {direct:>6} req/s");
    let through = throughput(&client, &gateway_url, &token, &body, concurrency, seconds).await;
    println!("gateway    {through:>6} req/s");

    state.settler.flush().await;
    let problems = state.ledger.verify(Credits::ZERO).await.expect("verify");
    assert!(
        problems.is_empty(),
        "ledger inconsistent after the run: {problems:?}"
    );
    let _ = stop.send(());
    server.await.expect("server").expect("clean stop");
}
