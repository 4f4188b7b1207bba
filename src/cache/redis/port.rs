//! [`BalanceCache`] on Redis: each operation is one script call on the bucket's keys (see the
//! module docs of [`super`]).

use super::*;

#[async_trait]
impl BalanceCache for RedisCache {
    async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let pong = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await
        .map_err(|_| unavailable("PING timed out"))?
        .map_err(unavailable)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(unavailable(format_args!("unexpected PING answer `{pong}`")))
        }
    }

    fn journal_outlives_process(&self) -> bool {
        true
    }

    async fn stop(&self) {
        if let Some(task) = self.heartbeat_task() {
            task.abort();
            // Cancelled, or ended by a panic already logged: either way it beats no more.
            let _ = task.await;
        }
    }

    async fn reserve(
        &self,
        bucket: &Bucket,
        hold: &HoldSpec,
        floor: Credits,
        source: &dyn SnapshotSource,
    ) -> Result<(), ReserveError> {
        let keys = self.keys.bucket(bucket);
        let reserving = self.start_reserving(&keys.base);
        let owner_key = self.keys.owner(&self.instance);
        let generation_key = self.keys.generation();
        // On a single server the script reads the generation and adds the bucket to this
        // instance's owner set itself: one round trip. In a cluster those keys live in other
        // slots, so they are read and written first; either way the bucket joins the owner set
        // before any hold exists, so a crash right after still leaves the hold findable by a
        // sibling's reaper.
        let (script_keys, generation): (Vec<&str>, i64) = if self.conn.is_single() {
            (
                vec![&keys.base, &keys.holds, &generation_key, &owner_key],
                0,
            )
        } else {
            let mut sadd = command("SADD");
            sadd.arg(&owner_key).arg(&keys.base);
            let (generation, _) =
                tokio::try_join!(self.generation(), query::<i64>(&self.conn, &sadd))?;
            (vec![&keys.base, &keys.holds], generation)
        };
        let (amount, floor, deadline, generation_arg) = (
            exact(hold.amount.micros()).to_string(),
            exact(floor.micros()).to_string(),
            hold.deadline_ms.to_string(),
            generation.to_string(),
        );
        for _ in 0..=MAX_LOADS {
            let reply: Vec<i64> = match eval_attempt(
                &self.conn,
                &SCRIPTS.reserve,
                &script_keys,
                &[
                    &hold.request_id,
                    &amount,
                    &floor,
                    &deadline,
                    &self.instance,
                    &generation_arg,
                    &reserving.token.to_string(),
                    &now_ms().to_string(),
                    &keys.base,
                ],
            )
            .await
            {
                Ok(reply) => reply,
                Err(failed) => {
                    if failed.maybe_ran {
                        self.abandon_in_background(&keys, &hold.request_id, reserving.token);
                    }
                    return Err(failed.error.into());
                }
            };
            match reply.as_slice() {
                [1] => return Ok(()),
                [2, available] => {
                    return Err(ReserveError::Insufficient {
                        available: Credits::from_micros(*available),
                    });
                }
                [0, generation] => self.load(bucket, &keys, *generation, source).await?,
                other => return Err(unavailable(format_args!("reserve answered {other:?}")).into()),
            }
        }
        Err(unavailable("the bucket vanished after every load").into())
    }

    async fn settle(
        &self,
        bucket: &Bucket,
        request_id: &str,
        cost: Credits,
        record: Option<&str>,
    ) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        let index = self.keys.pending_index();
        let member = index_member(&keys.base, request_id);
        let settled_at = now_ms().to_string();
        let mut script_keys = vec![
            keys.base.as_str(),
            &keys.holds,
            &keys.pending,
            &keys.journal,
            &keys.progress,
        ];
        if self.conn.is_single() {
            // The script indexes the record in the same step.
            script_keys.push(&index);
        } else if record.is_some() {
            // Indexed before the settlement exists: a crash in between leaves an index entry
            // pointing at nothing (skipped and removed by `orphans`), never an unindexed record.
            // NX keeps the first settle time of a repeated settle.
            let mut zadd = command("ZADD");
            zadd.arg(&index).arg("NX").arg(&settled_at).arg(&member);
            query::<i64>(&self.conn, &zadd).await?;
        }
        let cost = exact(cost.micros()).to_string();
        eval::<i64>(
            &self.conn,
            &SCRIPTS.settle,
            &script_keys,
            &[
                request_id,
                &cost,
                record.unwrap_or(""),
                &member,
                &settled_at,
            ],
        )
        .await
        .map(drop)
    }

    async fn renew(
        &self,
        bucket: &Bucket,
        request_id: &str,
        deadline_ms: i64,
        progress: Option<&str>,
    ) -> Result<bool, CacheError> {
        let keys = self.keys.bucket(bucket);
        let deadline = deadline_ms.to_string();
        let mut args = vec![request_id, deadline.as_str()];
        args.extend(progress);
        let renewed: i64 = eval(
            &self.conn,
            &SCRIPTS.renew,
            &[&keys.holds, &keys.progress],
            &args,
        )
        .await?;
        Ok(renewed == 1)
    }

    async fn release(&self, bucket: &Bucket, request_id: &str) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        eval::<i64>(
            &self.conn,
            &SCRIPTS.release,
            &[&keys.base, &keys.holds, &keys.progress],
            &[request_id],
        )
        .await
        .map(drop)
    }

    async fn committed(
        &self,
        bucket: &Bucket,
        request_id: &str,
        snapshot: Snapshot,
    ) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        let [balance, rev, next_expiry, lapsed] = snapshot_args(&snapshot);
        let index = self.keys.pending_index();
        let member = index_member(&keys.base, request_id);
        let single = self.conn.is_single();
        let mut script_keys = vec![
            keys.base.as_str(),
            &keys.pending,
            &keys.journal,
            &keys.holds,
            &keys.progress,
        ];
        if single {
            // The script drops the index entry in the same step.
            script_keys.push(&index);
        }
        let journaled: i64 = eval(
            &self.conn,
            &SCRIPTS.committed,
            &script_keys,
            &[request_id, &balance, &rev, &next_expiry, &lapsed, &member],
        )
        .await?;
        if journaled > 0 && !single {
            let mut zrem = command("ZREM");
            zrem.arg(&index).arg(&member);
            query::<i64>(&self.conn, &zrem).await?;
        }
        Ok(())
    }

    async fn apply(&self, bucket: &Bucket, snapshot: Snapshot) -> Result<(), CacheError> {
        let keys = self.keys.bucket(bucket);
        let [balance, rev, next_expiry, lapsed] = snapshot_args(&snapshot);
        eval::<i64>(
            &self.conn,
            &SCRIPTS.apply,
            &[&keys.base],
            &[&balance, &rev, &next_expiry, &lapsed],
        )
        .await
        .map(drop)
    }

    async fn invalidate_all(&self) -> Result<(), CacheError> {
        eval::<i64>(
            &self.conn,
            &SCRIPTS.invalidate,
            &[&self.keys.generation()],
            &[],
        )
        .await
        .map(drop)
    }

    async fn view(
        &self,
        bucket: &Bucket,
        source: &dyn SnapshotSource,
    ) -> Result<BalanceView, CacheError> {
        let keys = self.keys.bucket(bucket);
        let generation = self.generation().await?;
        let generation_arg = generation.to_string();
        for _ in 0..=MAX_LOADS {
            let reply: Vec<i64> = eval(
                &self.conn,
                &SCRIPTS.view,
                &[&keys.base],
                &[&generation_arg, &now_ms().to_string()],
            )
            .await?;
            match reply.as_slice() {
                [1, balance, held, lapsed] => {
                    return Ok(BalanceView {
                        balance: Credits::from_micros(*balance),
                        held: Credits::from_micros(*held),
                        available: Credits::saturating_from_micros(
                            i128::from(*balance) - i128::from(*held) - i128::from(*lapsed),
                        ),
                    });
                }
                [0] => self.load(bucket, &keys, generation, source).await?,
                other => return Err(unavailable(format_args!("view answered {other:?}"))),
            }
        }
        Err(unavailable("the bucket vanished after every load"))
    }

    async fn in_flight(&self, bucket: &Bucket, at_ms: i64) -> Result<Credits, CacheError> {
        self.fence(&self.keys.bucket(bucket), at_ms).await
    }

    async fn reap_holds(&self, now_ms: i64) -> Result<usize, CacheError> {
        let owner_key = self.keys.owner(&self.instance);
        let own: Vec<String> = query(&self.conn, command("SMEMBERS").arg(&owner_key)).await?;
        let mut released =
            reaping::reap_each(own, |base| self.reap_own(base, now_ms, &owner_key)).await?;
        let dead: Vec<String> = eval(
            &self.conn,
            &SCRIPTS.dead,
            &[&self.keys.instances()],
            &[
                &INSTANCE_DEAD_AFTER_MS.to_string(),
                &self.instance,
                &DEAD_BATCH.to_string(),
            ],
        )
        .await?;
        for instance in &dead {
            released += self.reap_dead(instance, now_ms).await?;
        }
        Ok(released)
    }

    async fn orphans(&self, now_ms: i64, older_than_ms: i64) -> Result<Vec<Orphan>, CacheError> {
        let index = self.keys.pending_index();
        let cutoff = now_ms.saturating_sub(older_than_ms);
        let mut range = command("ZRANGEBYSCORE");
        range
            .arg(&index)
            .arg("-inf")
            .arg(format!("({cutoff}"))
            .arg("LIMIT")
            .arg(0)
            .arg(ORPHAN_BATCH);
        let members: Vec<String> = query(&self.conn, &range).await?;
        let mut orphans = Vec::new();
        for member in members {
            let Some((base, request_id)) = parse_index_member(&member) else {
                continue;
            };
            let Some(bucket) = self.keys.parse_bucket(base) else {
                tracing::warn!(member, "pending index entry names no bucket; skipped");
                continue;
            };
            let keys = BucketKeys::from_base(base.to_owned());
            let reply: Vec<Value> = eval(
                &self.conn,
                &SCRIPTS.orphan,
                &[&keys.pending, &keys.journal],
                &[&request_id],
            )
            .await?;
            match reply.as_slice() {
                [Value::Int(0)] => {
                    // Committed (its ZREM was lost) or never settled (a crash after the ZADD).
                    query::<i64>(&self.conn, command("ZREM").arg(&index).arg(&member)).await?;
                }
                [Value::Int(1), record] => {
                    let record = String::from_redis_value_ref(record).map_err(unavailable)?;
                    orphans.push(Orphan {
                        bucket,
                        request_id,
                        record,
                    });
                }
                _ => {}
            }
        }
        Ok(orphans)
    }
}
