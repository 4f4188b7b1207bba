//! Metering: estimate a request's maximum cost, hold it, and turn the hold into an exact charge.
//!
//! `reserve` runs before forwarding (402 when not affordable). The returned [`Hold`] must end in
//! exactly one `finish` (charge from usage) or release; dropping it releases it, so a cancelled
//! handler can never leak a hold. Both hand work to the [`settler`] with a synchronous send, so
//! no cancellation can come between a hold's end and its settlement being queued.
//!
//! Every hold counts as a request in flight until it ends; at shutdown the gateway cuts the
//! requests still running ([`Meter::cut`]) and waits for their holds to end
//! ([`Meter::drained`]) before it stops the settler.
//!
//! Length: the `Meter` and its `Hold` are one life cycle (reserve, renew, finish or release,
//! drain); split, the hold's invariants would live in two places.

pub mod pricing;
pub mod pricing_sync;
pub mod settler;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rust_decimal::Decimal;

use crate::cache::{CacheError, HoldSpec, ReserveError, SharedCache, SnapshotSource};
use crate::config::{InsufficientPolicy, MeteringConfig, UnsizedInputPolicy};
use crate::domain::time::now_ms;
use crate::domain::{AccountId, Credits, RequestId, TokenUsage};
use crate::ledger::{
    Bucket, InFlight, LedgerError, Settlement, SharedLedger, Snapshot, UsageSource,
};
use pricing::{PriceTable, PricingHandle};
use settler::{Durable, Job, SettlerHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

/// Loads cache snapshots from the ledger, creating accounts on first sight.
pub struct LedgerSource {
    pub ledger: SharedLedger,
    pub signup_grant: Credits,
}

#[async_trait]
impl SnapshotSource for LedgerSource {
    async fn load(&self, bucket: &Bucket, in_flight: InFlight) -> Result<Snapshot, LedgerError> {
        self.ledger
            .reload(bucket, self.signup_grant, in_flight)
            .await
    }
}

/// What the caller asked for, as far as cost is concerned.
pub struct CostRequest<'a> {
    pub account: &'a AccountId,
    /// The key's id, when the key has a spending limit.
    pub limited_key: Option<&'a str>,
    pub model: &'a str,
    /// The tokenizer's count of the prompt.
    pub prompt_tokens: u64,
    /// Set (to the offending field) when some input cannot be sized from the body: the prompt
    /// is then reserved at the model's `max_input_tokens`.
    pub unsized_input: Option<&'static str>,
    /// The output cap per choice the request set (`max_tokens` and friends), if any.
    pub output_cap: Option<u64>,
    /// Choices the upstream generates (`n`, `best_of`), each up to the output cap.
    pub choices: u64,
    /// Embeddings produce no output tokens.
    pub produces_output: bool,
}

/// The result of a successful reservation.
pub struct Reserved {
    pub hold: Hold,
    /// The output cap per choice the hold paid for, which must be sent upstream so the upstream
    /// cannot produce more (`None` for requests without output).
    pub output_per_choice: Option<u64>,
}

/// Credits held for one request in flight. Dropping it unused releases the credits.
pub struct Hold {
    pub request_id: RequestId,
    pub account: AccountId,
    pub limited_key: Option<String>,
    pub amount: Credits,
    pub started_at_ms: i64,
    /// The prices the hold was computed with; the request is charged with the same ones, so a
    /// reload while it runs cannot make it cost more than it holds.
    pub prices: Arc<PriceTable>,
    settler: Option<SettlerHandle>,
    /// Counts this request as in flight until the hold ends (settled or released).
    _in_flight: TaskTrackerToken,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(settler) = self.settler.take() {
            settler.send(Job::Release {
                buckets: buckets(&self.account, self.limited_key.as_deref()),
                request_id: self.request_id.to_string(),
            });
        }
    }
}

fn buckets(account: &AccountId, limited_key: Option<&str>) -> Vec<Bucket> {
    let mut buckets = vec![Bucket::Account(account.clone())];
    if let Some(key) = limited_key {
        buckets.push(Bucket::KeyLimit(key.to_owned()));
    }
    buckets
}

/// How a request ended, for its settlement.
pub struct Finished {
    pub api_key_id: Option<String>,
    pub endpoint: &'static str,
    pub model: String,
    pub upstream: String,
    pub usage: TokenUsage,
    pub source: UsageSource,
    pub stream: bool,
    pub status: &'static str,
}

#[derive(Clone)]
pub struct Meter {
    inner: Arc<MeterInner>,
}

struct MeterInner {
    cache: SharedCache,
    source: LedgerSource,
    pricing: PricingHandle,
    config: MeteringConfig,
    settler: SettlerHandle,
    /// This gateway instance: the owner of the holds it takes.
    instance: String,
    /// Requests holding credits; closed and awaited at shutdown.
    in_flight: TaskTracker,
    /// Cancelled at the end of the shutdown grace period: open streams end and settle.
    cut: CancellationToken,
}

impl Meter {
    pub fn new(
        ledger: SharedLedger,
        cache: SharedCache,
        pricing: PricingHandle,
        config: MeteringConfig,
        signup_grant: Credits,
        settler: SettlerHandle,
        instance: String,
    ) -> Self {
        Meter {
            inner: Arc::new(MeterInner {
                cache,
                source: LedgerSource {
                    ledger,
                    signup_grant,
                },
                pricing,
                config,
                settler,
                instance,
                in_flight: TaskTracker::new(),
                cut: CancellationToken::new(),
            }),
        }
    }

    pub fn config(&self) -> &MeteringConfig {
        &self.inner.config
    }

    /// Resolves when the gateway cuts the requests still running at the end of shutdown's grace
    /// period.
    pub fn cut_signal(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.inner.cut.clone().cancelled_owned()
    }

    /// Cuts every request still running: streams end, are billed for what they delivered, and
    /// settle.
    pub fn cut(&self) {
        self.inner.cut.cancel();
    }

    /// Ticks when a running stream is due to renew its hold: every third of the hold's lifetime,
    /// at most every 2 s (so a hold a sibling released is noticed quickly), at least every
    /// 100 ms. The first tick comes one period after the hold was taken.
    pub fn renewal_ticker(&self) -> tokio::time::Interval {
        renewal_ticker(Duration::from_secs(self.inner.config.hold_ttl_secs))
    }

    /// When a hold taken or renewed now expires: a whole hold lifetime out.
    fn hold_deadline_ms(&self) -> i64 {
        let ttl_ms = self.inner.config.hold_ttl_secs.saturating_mul(1000);
        now_ms().saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
    }

    /// Pushes the hold's deadline a whole hold lifetime out, for a request that is still
    /// running (a long stream), on every bucket it holds. `progress` is what the request has
    /// delivered so far: if this instance dies, a sibling bills the request for it.
    pub async fn renew(&self, hold: &Hold, progress: Option<Finished>) -> Result<(), RenewError> {
        let deadline = self.hold_deadline_ms();
        let id = hold.request_id.as_str();
        let record = progress
            .map(|finished| serde_json::to_string(&Self::priced(hold, finished)))
            .transpose()
            .map_err(|e| RenewError::Unreachable(CacheError::Unavailable(e.to_string())))?;
        for bucket in buckets(&hold.account, hold.limited_key.as_deref()) {
            // The progress record lives with the account's hold.
            let progress = match bucket {
                Bucket::Account(_) => record.as_deref(),
                Bucket::KeyLimit(_) => None,
            };
            match self
                .inner
                .cache
                .renew(&bucket, id, deadline, progress)
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(RenewError::Lost),
                Err(error) => return Err(RenewError::Unreachable(error)),
            }
        }
        Ok(())
    }

    /// Waits until every hold has ended (settled or released).
    pub async fn drained(&self) {
        self.inner.in_flight.close();
        self.inner.in_flight.wait().await;
    }

    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    pub fn pricing(&self) -> &PricingHandle {
        &self.inner.pricing
    }

    pub fn source(&self) -> &LedgerSource {
        &self.inner.source
    }

    fn padded_prompt(&self, prompt_tokens: u64) -> u64 {
        padded_prompt(prompt_tokens, self.inner.config.estimate_margin_percent)
    }

    /// Holds the request's maximum cost against the key's limit and the account's balance.
    ///
    /// The maximum is the padded prompt (or the model's whole `max_input_tokens` when some input
    /// cannot be sized) plus the output cap per choice times the choices. The cap is the
    /// request's own, else the model's `max_output_tokens`; it is returned so the caller sends it
    /// upstream, which makes the hold a true bound of what the upstream may produce (I1).
    pub async fn reserve(
        &self,
        request: CostRequest<'_>,
        request_id: RequestId,
    ) -> Result<Reserved, HoldRefused> {
        // Before the reservation: a settlement may draw from grants live at this instant, and
        // the hold is only taken against grants still live then (ledger::grants).
        let started_at_ms = now_ms();
        let table = self.inner.pricing.current();
        let price = table.price_for(request.model);
        let prompt = match request.unsized_input {
            Some(field) if self.inner.config.on_unsized_input == UnsizedInputPolicy::Reject => {
                return Err(HoldRefused::UnsizedInput { field });
            }
            Some(_) => self
                .padded_prompt(request.prompt_tokens)
                .max(price.max_input_tokens),
            None => self.padded_prompt(request.prompt_tokens),
        };
        let choices = request.choices.max(1);
        let per_choice = if request.produces_output {
            request.output_cap.unwrap_or(price.max_output_tokens)
        } else {
            0
        };
        let estimate = table.estimate(
            request.model,
            prompt,
            Some(per_choice.saturating_mul(choices)),
        );
        let floor = Credits::from_micros(-self.inner.config.overdraft.micros());
        let account_bucket = Bucket::Account(request.account.clone());
        let key_bucket = request.limited_key.map(|k| Bucket::KeyLimit(k.to_owned()));

        let hold_spec = |amount: Credits| HoldSpec {
            request_id: request_id.to_string(),
            amount,
            owner: self.inner.instance.clone(),
            deadline_ms: self.hold_deadline_ms(),
        };
        let attempt = self
            .try_hold(
                &account_bucket,
                key_bucket.as_ref(),
                &hold_spec(estimate),
                floor,
            )
            .await;
        let (amount, per_choice) = match attempt {
            Ok(()) => (estimate, per_choice),
            Err(HoldFailure::Insufficient {
                available,
                key_limited,
            }) if self.inner.config.on_insufficient == InsufficientPolicy::CapMaxTokens
                && request.produces_output =>
            {
                let prompt_cost = table.estimate(request.model, prompt, Some(0));
                let spendable = available.checked_sub(floor).unwrap_or(Credits::ZERO);
                let left = spendable.checked_sub(prompt_cost).unwrap_or(Credits::ZERO);
                let per_token = price.completion_per_1k / Decimal::from(1000);
                let affordable: u64 = if per_token.is_zero() {
                    per_choice.saturating_mul(choices)
                } else {
                    (left.to_decimal() / per_token)
                        .floor()
                        .try_into()
                        .unwrap_or(0u64)
                };
                // Every choice gets the same cap, so the total stays within what is affordable.
                let capped = (affordable / choices).min(per_choice);
                if capped == 0 {
                    return Err(self
                        .insufficient(request.account, available, estimate, key_limited)
                        .await);
                }
                let capped_estimate =
                    table.estimate(request.model, prompt, Some(capped.saturating_mul(choices)));
                match self
                    .try_hold(
                        &account_bucket,
                        key_bucket.as_ref(),
                        &hold_spec(capped_estimate),
                        floor,
                    )
                    .await
                {
                    Ok(()) => (capped_estimate, capped),
                    Err(HoldFailure::Insufficient {
                        available,
                        key_limited,
                    }) => {
                        return Err(self
                            .insufficient(request.account, available, capped_estimate, key_limited)
                            .await);
                    }
                    Err(HoldFailure::Other(e)) => return Err(HoldRefused::Cache(e)),
                }
            }
            Err(HoldFailure::Insufficient {
                available,
                key_limited,
            }) => {
                return Err(self
                    .insufficient(request.account, available, estimate, key_limited)
                    .await);
            }
            Err(HoldFailure::Other(e)) => return Err(HoldRefused::Cache(e)),
        };
        Ok(Reserved {
            hold: Hold {
                request_id,
                account: request.account.clone(),
                limited_key: request.limited_key.map(str::to_owned),
                amount,
                started_at_ms,
                prices: table,
                settler: Some(self.inner.settler.clone()),
                _in_flight: self.inner.in_flight.token(),
            },
            output_per_choice: request.produces_output.then_some(per_choice),
        })
    }

    async fn try_hold(
        &self,
        account: &Bucket,
        key: Option<&Bucket>,
        hold: &HoldSpec,
        floor: Credits,
    ) -> Result<(), HoldFailure> {
        let cache = &self.inner.cache;
        let source = &self.inner.source;
        let on_account = cache.reserve(account, hold, floor, source);
        let Some(key) = key else {
            return on_account
                .await
                .map_err(|e| HoldFailure::from_reserve(e, false));
        };
        // Both at once (on Redis, one round trip); a key's limit has no overdraft: its floor is
        // zero. When one refuses, the other's hold goes again; the key's refusal is the one
        // reported when both refuse.
        let on_key = cache.reserve(key, hold, Credits::ZERO, source);
        let (on_account, on_key) = tokio::join!(on_account, on_key);
        let (undo, failure) = match (on_key, on_account) {
            (Ok(()), Ok(())) => return Ok(()),
            (Err(e), on_account) => (
                on_account.is_ok().then_some(account),
                HoldFailure::from_reserve(e, true),
            ),
            (Ok(()), Err(e)) => (Some(key), HoldFailure::from_reserve(e, false)),
        };
        if let Some(bucket) = undo
            && let Err(error) = cache.release(bucket, &hold.request_id).await
        {
            tracing::warn!(%error, "could not release a hold; it expires at its deadline");
        }
        Err(failure)
    }

    async fn insufficient(
        &self,
        account: &AccountId,
        available: Credits,
        estimate: Credits,
        key_limited: bool,
    ) -> HoldRefused {
        if key_limited {
            return HoldRefused::InsufficientCredits {
                balance: available,
                available,
                estimate,
            };
        }
        let balance = match self
            .inner
            .cache
            .view(&Bucket::Account(account.clone()), &self.inner.source)
            .await
        {
            Ok(view) => view.balance,
            Err(_) => available,
        };
        HoldRefused::InsufficientCredits {
            balance,
            available,
            estimate,
        }
    }

    /// What `finished` is charged under the prices its hold was taken with: its price, but
    /// never more than the hold (I1); any excess is `uncharged`.
    fn priced(hold: &Hold, finished: Finished) -> Settlement {
        let full = hold.prices.cost(&finished.model, &finished.usage);
        let cost = full.min(hold.amount);
        Settlement {
            request_id: hold.request_id.clone(),
            account: hold.account.clone(),
            api_key_id: finished.api_key_id,
            endpoint: finished.endpoint.to_owned(),
            model: finished.model,
            upstream: finished.upstream,
            usage: finished.usage,
            source: finished.source,
            cost,
            uncharged: full.checked_sub(cost).unwrap_or(Credits::ZERO),
            hold: hold.amount,
            stream: finished.stream,
            status: finished.status.to_owned(),
            started_at_ms: hold.started_at_ms,
            finished_at_ms: now_ms(),
        }
    }

    fn settlement(&self, hold: &mut Hold, finished: Finished) -> Settlement {
        let settlement = Self::priced(hold, finished);
        // The cap the hold paid for went upstream, so usage above the hold means the upstream
        // ignored it or counted far more prompt than the estimate. The excess is recorded with
        // the usage, never taken from the balance.
        if settlement.uncharged.is_positive() {
            tracing::error!(
                request_id = %hold.request_id,
                account = %hold.account,
                model = %settlement.model,
                upstream = %settlement.upstream,
                charged = %settlement.cost,
                uncharged = %settlement.uncharged,
                "upstream usage exceeds the request's hold; charged the hold, the rest is recorded as uncharged"
            );
        }
        // Settling consumes the hold: it must not also be released on drop.
        hold.settler = None;
        settlement
    }

    /// Whether renewals should carry the request's progress: only a shared cache can hand it
    /// to a sibling if this instance dies.
    pub fn keeps_progress(&self) -> bool {
        self.inner.cache.journal_outlives_process()
    }

    /// Charges the exact cost of a finished request. The settlement is queued before this
    /// returns; the [`Durable`] resolves once a crash can no longer lose it, which is what the
    /// response waits for before its last bytes leave. Callers that cannot wait (a `Drop`) may
    /// ignore it.
    pub fn finish(&self, mut hold: Hold, finished: Finished) -> Durable {
        let settlement = self.settlement(&mut hold, finished);
        log_request(&settlement);
        self.inner
            .settler
            .settle(settlement, hold.limited_key.clone())
    }
}

/// The one log line of a metered request: who, what and what it cost (never a credential).
fn log_request(settlement: &Settlement) {
    tracing::info!(
        request_id = %settlement.request_id,
        account = %settlement.account,
        key_id = settlement.api_key_id.as_deref().unwrap_or("-"),
        endpoint = %settlement.endpoint,
        model = %settlement.model,
        upstream = %settlement.upstream,
        prompt_tokens = settlement.usage.prompt_tokens,
        completion_tokens = settlement.usage.completion_tokens,
        cached_tokens = settlement.usage.cached_tokens,
        usage_source = settlement.source.as_str(),
        stream = settlement.stream,
        cost = %settlement.cost,
        uncharged = %settlement.uncharged,
        status = %settlement.status,
        "request metered"
    );
}

/// Why a request was refused its hold, so it is not forwarded.
#[derive(Debug, thiserror::Error)]
pub enum HoldRefused {
    /// Some input cannot be sized before the call (`on_unsized_input = "reject"`), so its cost
    /// cannot be bounded. `field` names the request field.
    #[error(
        "This gateway cannot size the input in `{field}` (images, audio, files, earlier \
         responses, conversations, stored prompts or hosted tools) before the call, so it \
         cannot bound its cost and does not accept it"
    )]
    UnsizedInput { field: &'static str },
    /// The balance (or the key's spending limit) cannot cover the request's maximum cost.
    #[error(
        "insufficient credits: balance {balance}, available {available}, this request needs up to {estimate}"
    )]
    InsufficientCredits {
        balance: Credits,
        available: Credits,
        estimate: Credits,
    },
    /// The balance cache (or the ledger behind it) did not answer: fail closed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// Why a hold could not be renewed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The hold is gone: it expired, or a sibling released it taking this instance for dead.
    /// The request is no longer covered and must stop.
    #[error("the request's hold is gone")]
    Lost,
    /// The cache did not answer; the hold stands until its deadline.
    #[error("cannot renew the hold: {0}")]
    Unreachable(CacheError),
}

/// How long a request may go without renewing its hold before it must stop: less than the
/// silence after which siblings release an instance's holds (`INSTANCE_DEAD_AFTER_MS`, 10 s),
/// so an instance cut off from the cache never serves a request its siblings think is over.
pub const RENEWAL_GRACE: Duration = Duration::from_secs(7);

enum HoldFailure {
    Insufficient {
        available: Credits,
        key_limited: bool,
    },
    Other(CacheError),
}

impl HoldFailure {
    fn from_reserve(error: ReserveError, key_limited: bool) -> Self {
        match error {
            ReserveError::Insufficient { available } => HoldFailure::Insufficient {
                available,
                key_limited,
            },
            ReserveError::Cache(e) => HoldFailure::Other(e),
        }
    }
}

/// See [`Meter::renewal_ticker`].
fn renewal_ticker(hold_ttl: Duration) -> tokio::time::Interval {
    let every = (hold_ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker
}

/// The prompt count the estimate uses: the tokenizer's count, plus `margin_percent` of it
/// (rounded down), plus 8 for the chat template's framing.
fn padded_prompt(prompt_tokens: u64, margin_percent: u32) -> u64 {
    let margin = prompt_tokens.saturating_mul(u64::from(margin_percent)) / 100;
    prompt_tokens.saturating_add(margin).saturating_add(8)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{RENEWAL_GRACE, padded_prompt, renewal_ticker};
    use crate::cache::redis::INSTANCE_DEAD_AFTER_MS;

    #[test]
    fn the_prompt_estimate_adds_the_margin_and_the_framing() {
        assert_eq!(padded_prompt(1000, 10), 1108);
        assert_eq!(padded_prompt(1999, 10), 2206);
        assert_eq!(padded_prompt(9, 10), 17);
        assert_eq!(padded_prompt(0, 0), 8);
        assert_eq!(padded_prompt(u64::MAX, 50), u64::MAX);
    }

    /// A stream renews its hold a third of the way through the hold's life, not as it starts.
    #[tokio::test(start_paused = true)]
    async fn renewals_tick_a_third_of_a_hold_lifetime_apart() {
        crate::test_support::time_limit::limited(async move {
            for (ttl, every) in [
                (Duration::from_secs(3), Duration::from_secs(1)),
                (Duration::from_secs(60), Duration::from_secs(2)),
                (Duration::from_millis(60), Duration::from_millis(100)),
            ] {
                let started = tokio::time::Instant::now();
                let mut ticker = renewal_ticker(ttl);
                ticker.tick().await;
                assert_eq!(started.elapsed(), every, "first tick, hold of {ttl:?}");
                ticker.tick().await;
                assert_eq!(started.elapsed(), every * 2, "second tick, hold of {ttl:?}");
            }
        })
        .await;
    }

    #[test]
    fn a_stream_stops_before_siblings_would_release_its_hold() {
        let grace_ms = i64::try_from(RENEWAL_GRACE.as_millis()).unwrap_or(i64::MAX);
        // A renewal attempt every 2 s must still fall inside the silence siblings allow.
        assert!(grace_ms + 2_000 < INSTANCE_DEAD_AFTER_MS);
    }
}
