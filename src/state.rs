//! [`AppState`]: what every route handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::auth::Authenticator;
use crate::billing::service::Payments;
use crate::cache::SharedCache;
use crate::config::packages::Package;
use crate::ledger::SharedLedger;
use crate::metering::Meter;
use crate::metering::pricing_sync::PricingRegistry;
use crate::metering::settler::SettlerHandle;
use crate::proxy::Proxy;
use crate::proxy::upstream::Upstreams;

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub ledger: SharedLedger,
    pub cache: SharedCache,
    pub meter: Meter,
    pub auth: Arc<Authenticator>,
    pub upstreams: Arc<Upstreams>,
    pub settler: SettlerHandle,
    /// The `/v1` routes' forwarding: body limit, routing, hold, upstream call, settlement.
    pub proxy: Proxy,
    /// Where instances announce their price versions (with Redis only).
    pub pricing_registry: Option<PricingRegistry>,
    pub pricing_path: std::path::PathBuf,
    /// Credit packages on sale, from the config.
    pub packages: Arc<Vec<Package>>,
    pub payments: Arc<Payments>,
    /// The last cache epoch seen; a different one in the ledger means someone else changed it.
    pub(crate) epoch: Arc<AtomicI64>,
}

impl AppState {
    /// Drops in-process caches (API keys, cached balances) if the ledger's cache epoch moved:
    /// someone changed the ledger outside this process (the CLI, an admin route on another
    /// instance). Called by the epoch watcher every [`EPOCH_POLL`](crate::app::EPOCH_POLL). (An
    /// admin route updates this instance's caches itself: a grant applies its snapshot, a
    /// revoke clears the keys.)
    ///
    /// The epoch counts as seen only once the caches are dropped: a failure is tried again.
    pub async fn sync_external_changes(&self) -> Result<(), String> {
        let epoch = self
            .ledger
            .cache_epoch()
            .await
            .map_err(|e| format!("cannot read the cache epoch: {e}"))?;
        if self.epoch.load(Ordering::Acquire) == epoch {
            return Ok(());
        }
        self.auth.keys().clear();
        self.cache
            .invalidate_all()
            .await
            .map_err(|e| format!("cannot drop the cached balances: {e}"))?;
        self.epoch.store(epoch, Ordering::Release);
        Ok(())
    }
}
