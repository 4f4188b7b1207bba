//! Webhook handling: how fast signed Stripe payments become credits, and how long an invoice
//! PDF takes to render.
//!
//! Starts a gateway (temp SQLite ledger, or `TOLLGATE_DATABASE_URL=mysql://…`) that accepts
//! Stripe webhooks, then posts signed `checkout.session.completed` events for payments
//! Tollgate did not start (each names an account and a package, so each creates its order,
//! issues its invoice and grants credits): first one at a time (latency), then `CONCURRENCY`
//! at a time (throughput). Ends by checking that the ledger verifies, then renders one of the
//! invoices as PDF repeatedly.
//! Run: `cargo bench --bench payments` (options: `EVENTS`, default 500; `CONCURRENCY`,
//! default 8).

mod support;

use support::{env_or, percentile};

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;
use tollgate::app::App;
use tollgate::config::Config;

const WHSEC: &str = "whsec_benchmark_secret";

fn us(d: Duration) -> u128 {
    d.as_micros()
}

/// A signed walk-in payment of the `starter` package by `account`.
fn signed_event(n: u64, account: &str) -> (String, String) {
    let body = json!({
        "id": format!("evt_bench_{n}"),
        "object": "event",
        "type": "checkout.session.completed",
        "data": {"object": {
            "id": format!("cs_bench_{n}"),
            "object": "checkout.session",
            "payment_status": "paid",
            "amount_total": 999,
            "currency": "usd",
            "payment_intent": format!("pi_bench_{n}"),
            "metadata": {"account_id": account, "package_id": "starter"},
            "customer_details": {"email": "bench@example.test", "name": "Bench Buyer"}
        }}
    })
    .to_string();
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let mut mac = Hmac::<Sha256>::new_from_slice(WHSEC.as_bytes()).expect("any key length");
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let signature = format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    );
    (body, signature)
}

async fn deliver(client: &reqwest::Client, url: &str, n: u64) -> Duration {
    let (body, signature) = signed_event(n, &format!("bench-{}", n % 50));
    let start = Instant::now();
    let response = client
        .post(url)
        .header("stripe-signature", signature)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    let status = response.status();
    let text = response.text().await.expect("body");
    assert!(
        status.is_success() && text.contains("processed"),
        "{status} {text}"
    );
    start.elapsed()
}

#[tokio::main]
async fn main() {
    let events = env_or("EVENTS", 500).max(10);
    let concurrency = env_or("CONCURRENCY", 8).max(1);

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
            "[server]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = \"sqlite://{}\"\n\
             [metering]\npricing_file = \"{}\"\n\
             [[packages]]\nid = \"starter\"\nname = \"Starter\"\ncredits = \"1000\"\nprice = \"9.99\"\ncurrency = \"USD\"\n\
             [payments.stripe]\nwebhook_secrets = [\"{WHSEC}\"]\n\
             [invoices]\ntax_rate_percent = \"19\"\n[invoices.seller]\nname = \"Bench Ltd\"\naddress = [\"1 Bench Road\"]\n\
             [[upstreams]]\nname = \"mock\"\nbase_url = \"builtin:mock\"\nmodels = [\"mock-*\"]\n",
            dir.path().join("ledger.db").display(),
            pricing.display()
        ),
    )
    .expect("config");
    let config = Config::load(&config_path).expect("config");
    let shown = config
        .database
        .url
        .rsplit_once('@')
        .map_or(config.database.url.clone(), |(_, h)| h.to_owned());
    let app = App::build(config).await.expect("app");
    let url = format!(
        "http://{}/api/payment/webhook",
        app.local_addr().expect("addr")
    );
    let state = app.state().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    // Warm the connection pool and the database.
    for n in 0..20 {
        deliver(&client, &url, 1_000_000 + n).await;
    }

    println!("database {shown}; {events} signed walk-in payments (order + invoice + grant each)");
    let mut sequential = Vec::with_capacity(events as usize);
    for n in 0..events {
        sequential.push(deliver(&client, &url, n).await);
    }
    sequential.sort();
    println!(
        "one at a time   p50={:>6} us  p99={:>6} us  max={:>6} us",
        us(percentile(&sequential, 50)),
        us(percentile(&sequential, 99)),
        us(sequential[sequential.len() - 1])
    );

    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let (client, url) = (client.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let mut n = events + worker;
            while n < 2 * events {
                deliver(&client, &url, n).await;
                n += concurrency;
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let per_second = u128::from(events) * 1_000_000 / elapsed.as_micros().max(1);
    println!(
        "{concurrency} at a time     {per_second} payments/s ({events} in {} ms)",
        elapsed.as_millis()
    );

    let problems = tollgate::billing::store::verify_books(
        state.ledger.as_ref(),
        state.payments.store(),
        tollgate::domain::Credits::ZERO,
    )
    .await
    .expect("verify");
    assert!(
        problems.is_empty(),
        "ledger inconsistent after the run: {problems:?}"
    );

    let account = tollgate::domain::AccountId::parse("bench-1").expect("id");
    let orders = state
        .payments
        .store()
        .orders(
            &account,
            tollgate::ledger::Page {
                limit: 1,
                before: None,
            },
        )
        .await
        .expect("orders");
    let invoice_id = orders[0].1.invoice_id.clone().expect("invoiced");
    let invoice = state
        .payments
        .store()
        .invoice(&invoice_id)
        .await
        .expect("invoice")
        .expect("exists");
    let renders = 200;
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..renders {
        bytes = tollgate::billing::pdf::render(&invoice).len();
    }
    println!(
        "invoice PDF     {} us per render ({bytes} bytes)",
        started.elapsed().as_micros() / renders
    );
    let _ = stop.send(());
    server.await.expect("server").expect("clean stop");
}
