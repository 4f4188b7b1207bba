//! [`recover`]: writing the settlements a crashed instance left journaled in a shared cache.

use std::time::Duration;

use crate::cache::BalanceCache;
use crate::domain::time::now_ms;
use crate::ledger::{Ledger, Settlement};

use super::*;

/// What one [`recover`] pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Holds released (expired, or of a dead instance).
    pub reaped: usize,
    /// Orphaned settlements written to the ledger.
    pub written: usize,
    /// Orphaned settlements the ledger refused on their own, set aside.
    pub set_aside: usize,
}

/// Releases expired holds and writes pending settlements older than `orphan_age` (left by an
/// instance that died before writing them). An orphan the ledger refuses while it answers is set
/// aside and the pass goes on; a ledger that does not answer ends the pass with an error (the
/// next pass tries again). Safe to run on every instance at once: settlements are idempotent by
/// request id, and so is setting one aside.
pub async fn recover(
    ledger: &dyn Ledger,
    cache: &dyn BalanceCache,
    orphan_age: Duration,
) -> Result<Recovered, String> {
    let now = now_ms();
    let reaped = cache.reap_holds(now).await.map_err(|e| e.to_string())?;
    let age = i64::try_from(orphan_age.as_millis()).unwrap_or(i64::MAX);
    let orphans = cache.orphans(now, age).await.map_err(|e| e.to_string())?;
    let mut recovered = Recovered {
        reaped,
        ..Recovered::default()
    };
    for orphan in orphans {
        let settlement: Settlement = match serde_json::from_str(&orphan.record) {
            Ok(settlement) => settlement,
            Err(error) => {
                tracing::error!(%error, request_id = orphan.request_id, "unreadable settlement record");
                continue;
            }
        };
        let outcomes = match ledger.settle_batch(std::slice::from_ref(&settlement)).await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                // A ledger that does not answer ends the pass: an outage, not a bad record.
                ledger.ping().await.map_err(|_| error.to_string())?;
                // The key's limit is unknown here (no outcome): its cached entry, if any, is
                // corrected all the same.
                let key = settlement.api_key_id.as_deref();
                match set_aside(ledger, cache, &settlement, key, &error.to_string()).await {
                    Ok(()) => recovered.set_aside += 1,
                    Err(error) => tracing::error!(
                        %error,
                        request_id = orphan.request_id,
                        "cannot set a refused settlement aside; it stays journaled for the next pass"
                    ),
                }
                continue;
            }
        };
        if let Some(outcome) = outcomes.first() {
            let limited_key = outcome.key_limit.and(settlement.api_key_id.as_deref());
            mark_committed(cache, &settlement, limited_key, outcome).await;
            if outcome.applied {
                recovered.written += 1;
                tracing::warn!(
                    request_id = orphan.request_id,
                    "wrote a settlement left by another instance"
                );
            }
        }
    }
    Ok(recovered)
}
