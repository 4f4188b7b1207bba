//! This instance's reservations in flight per bucket: what the owner-set clean-up checks so it
//! never drops a bucket that a reservation is about to hold in.

use std::sync::atomic::Ordering;

use dashmap::DashMap;

use super::RedisCache;

/// Reservations of this instance in flight on one bucket, and the sequence number of the last
/// one to start: what the owner-set cleanup checks so it never drops a bucket that a
/// reservation is about to hold in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reserving {
    pub(super) in_flight: u32,
    pub(super) last: u64,
}

/// Counts one reservation in flight until dropped (a cancelled request included).
pub(super) struct ReservingGuard<'a> {
    map: &'a DashMap<String, Reserving>,
    base: &'a str,
    /// Unique to this call within the instance: the token its hold carries.
    pub(super) token: u64,
}

impl Drop for ReservingGuard<'_> {
    fn drop(&mut self) {
        if let Some(mut entry) = self.map.get_mut(self.base) {
            entry.in_flight = entry.in_flight.saturating_sub(1);
        }
    }
}

impl RedisCache {
    pub(super) fn start_reserving<'a>(&'a self, base: &'a str) -> ReservingGuard<'a> {
        let last = self.sequence.fetch_add(1, Ordering::Relaxed);
        self.reserving
            .entry(base.to_owned())
            .and_modify(|entry| {
                entry.in_flight += 1;
                entry.last = last;
            })
            .or_insert(Reserving { in_flight: 1, last });
        ReservingGuard {
            map: &self.reserving,
            base,
            token: last,
        }
    }

    pub(super) fn reserving(&self, base: &str) -> Option<Reserving> {
        self.reserving.get(base).map(|entry| *entry)
    }
}
