//! Pricing across instances: when any instance reloads `pricing.toml`, it announces its new
//! price version over Redis pub/sub and every sibling re-reads its own file at once instead of
//! waiting for its next poll. Each instance also records `instance → version` in a Redis hash,
//! which `/admin/pricing` shows, so an operator can see that every instance has the new prices.
//!
//! Without Redis (or on a Redis Cluster URL) each instance still polls its file every
//! `metering.pricing_poll_ms`; only the nudge and the shared version list are missing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use sha2::{Digest, Sha256};

use super::pricing::{PriceTable, PricingHandle};
use crate::domain::time::now_ms;

/// An instance that has not re-announced for this long is left out of the version list.
const STALE_AFTER_MS: i64 = 30_000;
const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// Where the versions live in Redis.
#[derive(Clone)]
pub struct PricingRegistry {
    client: redis::Client,
    channel: String,
    versions: String,
}

impl PricingRegistry {
    /// `None` for a cluster URL (pub/sub nudges are a single-server feature here).
    pub fn new(redis_url: &str, key_prefix: &str) -> Option<Result<Self, redis::RedisError>> {
        if redis_url.starts_with("redis+cluster://") {
            return None;
        }
        Some(
            redis::Client::open(redis_url).map(|client| PricingRegistry {
                client,
                channel: format!("{key_prefix}:pricing:changed"),
                versions: format!("{key_prefix}:pricing:versions"),
            }),
        )
    }

    /// What the instances that announced within the last 30 s have in force.
    pub async fn versions(&self) -> Result<BTreeMap<String, InstancePricing>, redis::RedisError> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        let raw: BTreeMap<String, String> = conn.hgetall(&self.versions).await?;
        let now = now_ms();
        Ok(raw
            .into_iter()
            .filter_map(|(instance, value)| {
                let (state, at) = value.split_once('@')?;
                let (version, fingerprint) = state.split_once('|')?;
                let at: i64 = at.parse().ok()?;
                let pricing = InstancePricing {
                    version: version.parse().ok()?,
                    fingerprint: fingerprint.to_owned(),
                };
                (now - at < STALE_AFTER_MS).then_some((instance, pricing))
            })
            .collect())
    }

    async fn announce(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        instance: &str,
        pricing: &PricingHandle,
        publish: bool,
    ) -> redis::RedisResult<()> {
        let table = pricing.current();
        let value = format!("{}|{}@{}", table.version(), fingerprint(&table), now_ms());
        let () = conn.hset(&self.versions, instance, value).await?;
        if publish {
            let _: i64 = conn.publish(&self.channel, instance).await?;
        }
        Ok(())
    }
}

/// One instance's prices: its local reload counter and a digest of the prices themselves
/// (equal digests mean equal prices, whatever the counters say).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstancePricing {
    pub version: u64,
    pub fingerprint: String,
}

/// A short digest of what a price table charges (rounding, default and every entry, in order).
pub fn fingerprint(table: &PriceTable) -> String {
    let entries: Vec<_> = table.entries().collect();
    let canonical = serde_json::json!([table.rounding(), table.default_price(), entries]);
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    hex::encode(&digest[..6])
}

/// Runs until `stop` turns true: announces local reloads and nudges `nudge` on a sibling's.
pub fn spawn(
    registry: PricingRegistry,
    pricing: PricingHandle,
    nudge: Arc<Notify>,
    instance: String,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(200);
        loop {
            if *stop.borrow() {
                break;
            }
            match run(&registry, &pricing, &nudge, &instance, &mut stop).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(%error, "pricing sync lost Redis; reconnecting");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if let Ok(mut conn) = registry.client.get_multiplexed_async_connection().await {
            let _: redis::RedisResult<i64> = conn.hdel(&registry.versions, &instance).await;
        }
    })
}

async fn run(
    registry: &PricingRegistry,
    pricing: &PricingHandle,
    nudge: &Notify,
    instance: &str,
    stop: &mut watch::Receiver<bool>,
) -> redis::RedisResult<()> {
    let mut pubsub = registry.client.get_async_pubsub().await?;
    pubsub.subscribe(&registry.channel).await?;
    let mut conn = registry.client.get_multiplexed_async_connection().await?;
    let mut announced = pricing.version();
    registry
        .announce(&mut conn, instance, pricing, false)
        .await?;
    let mut messages = pubsub.on_message();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_announce = tokio::time::Instant::now();
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Err(redis::RedisError::from((redis::ErrorKind::Io, "pub/sub connection closed")));
                };
                let from: String = message.get_payload().unwrap_or_default();
                if from != instance {
                    nudge.notify_one();
                }
            }
            _ = tick.tick() => {
                let version = pricing.version();
                if version != announced {
                    announced = version;
                    registry.announce(&mut conn, instance, pricing, true).await?;
                    last_announce = tokio::time::Instant::now();
                } else if last_announce.elapsed() >= ANNOUNCE_EVERY {
                    registry.announce(&mut conn, instance, pricing, false).await?;
                    last_announce = tokio::time::Instant::now();
                }
            }
            _ = stop.changed() => return Ok(()),
        }
    }
}
