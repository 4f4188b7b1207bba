//! HTTP edges that are not the proxy: the error type, credits routes and health checks.

pub mod billing;
pub mod credits;
pub mod error;
pub mod health;
pub mod payments;

/// RFC 3339 UTC time of Unix milliseconds, as the APIs show timestamps.
pub fn rfc3339(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
