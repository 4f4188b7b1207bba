//! [`PricingHandle`]: the table in force, swapped atomically on reload, and the watcher that
//! polls the file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use super::*;

/// The prices in force, shared by every request and swapped atomically on reload.
///
/// A `std::sync::RwLock` around an `Arc` (no extra dependency): readers hold the lock only long
/// enough to clone the `Arc`, and writes happen at most once per poll interval.
#[derive(Debug, Clone)]
pub struct PricingHandle {
    current: Arc<RwLock<Arc<PriceTable>>>,
}

impl PricingHandle {
    /// Installs `table` as version 1.
    pub fn new(mut table: PriceTable) -> Self {
        table.version = 1;
        PricingHandle {
            current: Arc::new(RwLock::new(Arc::new(table))),
        }
    }

    /// The table in force; keep it for the whole request so reserve and settle use one price.
    pub fn current(&self) -> Arc<PriceTable> {
        // The lock only guards an `Arc` swap, so a poisoned lock still holds a valid table.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn version(&self) -> u64 {
        self.current().version()
    }

    /// Re-reads `path`; on success installs it and returns the new version, on error keeps the
    /// table in force. Does a small blocking read.
    pub fn reload_from(&self, path: &Path) -> Result<u64, PricingError> {
        PriceTable::load(path).map(|table| self.install(table))
    }

    pub(super) fn install(&self, mut table: PriceTable) -> u64 {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        // Numbered under the write lock so concurrent reloads still get increasing versions.
        table.version = current.version.saturating_add(1);
        let version = table.version;
        *current = Arc::new(table);
        version
    }

    /// Polls `path` every `interval` (and whenever `nudge` is notified, e.g. by a sibling
    /// instance that saw the file change) and reloads it when its modified time, length or
    /// content hash changes (the hash catches same-second, same-length edits). A rejected file is
    /// logged and the last good prices stay in force. Stops when `shutdown` becomes `true` or its
    /// sender is dropped; aborting the returned handle also stops it. Must be called inside a
    /// Tokio runtime; it reads the file once, synchronously, to record the starting state.
    pub fn spawn_watcher(
        &self,
        path: PathBuf,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
        nudge: Arc<tokio::sync::Notify>,
    ) -> JoinHandle<()> {
        let handle = self.clone();
        // Taken before spawning so an edit made right after this call is not mistaken for the
        // starting state.
        let mut seen = PricingFile::read_blocking(&path)
            .ok()
            .map(|snapshot| snapshot.fingerprint);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                if *shutdown.borrow_and_update() {
                    break;
                }
                tokio::select! {
                    _ = ticker.tick() => {}
                    () = nudge.notified() => {}
                    changed = shutdown.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        continue;
                    }
                }
                match handle.poll_once(&path, &mut seen).await {
                    PollOutcome::Unchanged => {}
                    PollOutcome::Reloaded(version) => {
                        tracing::info!(version, path = %path.display(), "pricing reloaded");
                    }
                    PollOutcome::Rejected(error) => {
                        tracing::error!(
                            %error,
                            version = handle.version(),
                            "pricing file rejected; the last good prices stay in force"
                        );
                    }
                }
            }
        })
    }

    /// One watcher step: reloads if the file differs from `seen`. An unreadable file is reported
    /// once, not on every tick, and a rejected file is not re-parsed until it changes again.
    pub(super) async fn poll_once(
        &self,
        path: &Path,
        seen: &mut Option<Fingerprint>,
    ) -> PollOutcome {
        let origin = path.display().to_string();
        let snapshot = match PricingFile::read(path).await {
            Ok(snapshot) => snapshot,
            Err(cause) => {
                if seen.take().is_none() {
                    return PollOutcome::Unchanged;
                }
                return PollOutcome::Rejected(PricingError::Read { origin, cause });
            }
        };
        if seen.as_ref() == Some(&snapshot.fingerprint) {
            return PollOutcome::Unchanged;
        }
        *seen = Some(snapshot.fingerprint);
        match utf8(snapshot.bytes, &origin).and_then(|text| PriceTable::parse(&text, &origin)) {
            Ok(table) => PollOutcome::Reloaded(self.install(table)),
            Err(error) => PollOutcome::Rejected(error),
        }
    }
}

#[derive(Debug)]
pub(super) enum PollOutcome {
    Unchanged,
    Reloaded(u64),
    Rejected(PricingError),
}

/// What the watcher compares between polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    sha256: [u8; 32],
}

/// The file's bytes and the fingerprint of exactly those bytes (read through one open handle, so
/// a rename mid-read cannot mix two versions).
pub(super) struct PricingFile {
    bytes: Vec<u8>,
    pub(super) fingerprint: Fingerprint,
}

impl PricingFile {
    pub(super) async fn read(path: &Path) -> std::io::Result<PricingFile> {
        let mut file = tokio::fs::File::open(path).await?;
        let metadata = file.metadata().await?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).await?;
        Ok(PricingFile::new(bytes, &metadata))
    }

    pub(super) fn read_blocking(path: &Path) -> std::io::Result<PricingFile> {
        use std::io::Read as _;
        let mut file = std::fs::File::open(path)?;
        let metadata = file.metadata()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(PricingFile::new(bytes, &metadata))
    }

    pub(super) fn new(bytes: Vec<u8>, metadata: &std::fs::Metadata) -> PricingFile {
        let fingerprint = Fingerprint {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            sha256: Sha256::digest(&bytes).into(),
        };
        PricingFile { bytes, fingerprint }
    }
}
