//! Releasing what a reservation left behind: expired holds in this instance's buckets, the holds
//! of instances whose heartbeat stopped, and reservations whose outcome is unknown.

use super::*;

impl RedisCache {
    /// Releases expired holds in one of this instance's buckets; drops the bucket from the
    /// owner set when this instance holds nothing there any more.
    pub(super) async fn reap_own(
        &self,
        base: String,
        now_ms: i64,
        owner_key: &str,
    ) -> Result<usize, CacheError> {
        // Read before the script: a reservation that starts after this point changes `last`.
        let before = self.reserving(&base);
        let keys = BucketKeys::from_base(base);
        let (released, remaining, progressed): (usize, usize, Vec<String>) = eval(
            &self.conn,
            &SCRIPTS.reap,
            &[&keys.base, &keys.holds, &keys.progress],
            &[&now_ms.to_string(), &self.instance, "0"],
        )
        .await?;
        let released = released + self.settle_progress(&keys, &progressed).await?;
        if remaining > 0 || before.is_some_and(|r| r.in_flight > 0) {
            return Ok(released);
        }
        query::<i64>(&self.conn, command("SREM").arg(owner_key).arg(&keys.base)).await?;
        let after = self.reserving(&keys.base);
        if after != before {
            // A reservation started meanwhile; its SADD may have come before our SREM. Put the
            // bucket back so its hold stays findable.
            query::<i64>(&self.conn, command("SADD").arg(owner_key).arg(&keys.base)).await?;
        } else if let Some(before) = before {
            self.reserving
                .remove_if(&keys.base, |_, current| *current == before);
        }
        Ok(released)
    }

    /// Releases every hold of `owner` (and every expired hold) in one bucket.
    async fn reap_all_of(
        &self,
        base: String,
        now_ms: i64,
        owner: &str,
    ) -> Result<usize, CacheError> {
        let keys = BucketKeys::from_base(base);
        let (released, _, progressed): (usize, usize, Vec<String>) = eval(
            &self.conn,
            &SCRIPTS.reap,
            &[&keys.base, &keys.holds, &keys.progress],
            &[&now_ms.to_string(), owner, "1"],
        )
        .await?;
        Ok(released + self.settle_progress(&keys, &progressed).await?)
    }

    /// Turns reaped holds that carry a progress record into pending settlements of that record
    /// (journaled, so the recovery pass writes them): a stream of a dead instance is billed for
    /// what it had delivered at its last renewal. Returns how many holds it ended.
    async fn settle_progress(
        &self,
        keys: &BucketKeys,
        request_ids: &[String],
    ) -> Result<usize, CacheError> {
        let mut ended = 0;
        for request_id in request_ids {
            let record: Option<String> = query(
                &self.conn,
                command("HGET").arg(&keys.progress).arg(request_id),
            )
            .await?;
            let Some(record) = record else {
                continue;
            };
            let cost = match serde_json::from_str::<crate::ledger::Settlement>(&record) {
                Ok(settlement) => settlement.cost,
                Err(error) => {
                    tracing::error!(%error, request_id, "unreadable progress record; releasing the hold");
                    eval::<i64>(
                        &self.conn,
                        &SCRIPTS.release,
                        &[&keys.base, &keys.holds, &keys.progress],
                        &[request_id],
                    )
                    .await?;
                    ended += 1;
                    continue;
                }
            };
            let bucket = self
                .keys
                .parse_bucket(&keys.base)
                .ok_or_else(|| unavailable(format_args!("`{}` names no bucket", keys.base)))?;
            self.settle(&bucket, request_id, cost, Some(&record))
                .await?;
            tracing::warn!(
                request_id,
                "a stream of a silent instance is billed for what it had delivered"
            );
            ended += 1;
        }
        Ok(ended)
    }

    /// Releases every hold of a dead instance, then forgets the instance.
    pub(super) async fn reap_dead(&self, dead: &str, now_ms: i64) -> Result<usize, CacheError> {
        let owner_key = self.keys.owner(dead);
        let buckets: Vec<String> = query(&self.conn, command("SMEMBERS").arg(&owner_key)).await?;
        let released =
            reap_each(buckets.clone(), |base| self.reap_all_of(base, now_ms, dead)).await?;
        // Remove only what was reaped (an instance that came back may have added buckets since),
        // and forget the instance only if it is still silent.
        if !buckets.is_empty() {
            query::<i64>(&self.conn, command("SREM").arg(&owner_key).arg(&buckets)).await?;
        }
        eval::<i64>(
            &self.conn,
            &SCRIPTS.forget,
            &[&self.keys.instances()],
            &[dead, &INSTANCE_DEAD_AFTER_MS.to_string()],
        )
        .await?;
        if released > 0 {
            tracing::warn!(
                instance = dead,
                released,
                "released the holds of a dead instance"
            );
        }
        Ok(released)
    }

    /// After a reserve call whose outcome is unknown (Redis may have run the script before the
    /// answer was lost): drop the hold it may have taken, since the caller treats the
    /// reservation as failed, but only if the hold still carries that call's token. Retried for
    /// a while in the background; otherwise the hold would last until its deadline.
    pub(super) fn abandon_in_background(&self, keys: &BucketKeys, request_id: &str, token: u64) {
        let conn = self.conn.clone();
        let instance = self.instance.clone();
        let (base, holds, request_id) =
            (keys.base.clone(), keys.holds.clone(), request_id.to_owned());
        tokio::spawn(async move {
            let token = token.to_string();
            let mut backoff = Duration::from_millis(500);
            for _ in 0..ABANDON_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                let args = [request_id.as_str(), token.as_str(), instance.as_str()];
                match eval::<i64>(&conn, &SCRIPTS.abandon, &[&base, &holds], &args).await {
                    Ok(_) => return,
                    Err(error) => {
                        tracing::debug!(%error, request_id, "cannot abandon a reservation yet");
                    }
                }
                backoff *= 2;
            }
            tracing::warn!(
                request_id,
                "a reservation of unknown outcome is left to its deadline"
            );
        });
    }
}

/// Runs `reap` on every bucket, [`REAP_CONCURRENCY`] at a time, and adds up the holds they
/// released; the first error fails the whole.
pub(super) async fn reap_each<F, Fut>(buckets: Vec<String>, reap: F) -> Result<usize, CacheError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<usize, CacheError>>,
{
    let results: Vec<Result<usize, CacheError>> = stream::iter(buckets)
        .map(reap)
        .buffer_unordered(REAP_CONCURRENCY)
        .collect()
        .await;
    results.into_iter().sum()
}
