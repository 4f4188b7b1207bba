//! Metering: estimate a request's maximum cost, hold it, and turn the hold into an exact charge.
//!
//! `reserve` runs before forwarding (402 when not affordable). The returned [`Hold`] must end in
//! exactly one `finish` (charge from usage) or release; dropping it releases it, so a cancelled
//! handler can never leak a hold. Both hand work to the [`settler`], off the client's path.

pub mod pricing;
pub mod pricing_sync;
pub mod settler;

use std::sync::Arc;

use async_trait::async_trait;
use rust_decimal::Decimal;

use crate::cache::{HoldSpec, ReserveError, SharedCache, SnapshotSource};
use crate::config::{InsufficientPolicy, MeteringConfig};
use crate::domain::{AccountId, Credits, RequestId, TokenUsage};
use crate::http::error::ApiError;
use crate::ledger::{
    Bucket, InFlight, LedgerError, Settlement, SharedLedger, Snapshot, UsageSource, now_ms,
};
use pricing::PricingHandle;
use settler::{Job, SettlerHandle};

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
    pub prompt_tokens: u64,
    /// `max_tokens` and friends, if the request set one.
    pub max_output_tokens: Option<u64>,
    /// Embeddings produce no output tokens.
    pub produces_output: bool,
}

/// The result of a successful reservation.
pub struct Reserved {
    pub hold: Hold,
    /// Set when the `cap_max_tokens` policy lowered the request's output cap.
    pub capped_max_tokens: Option<u64>,
}

/// Credits held for one request in flight. Dropping it unused releases the credits.
pub struct Hold {
    pub request_id: RequestId,
    pub account: AccountId,
    pub limited_key: Option<String>,
    pub amount: Credits,
    pub started_at_ms: i64,
    settler: Option<SettlerHandle>,
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
            }),
        }
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

    /// The prompt count the estimate uses: the tokenizer's count plus the configured margin.
    fn padded_prompt(&self, prompt_tokens: u64) -> u64 {
        let margin = prompt_tokens
            .saturating_mul(u64::from(self.inner.config.estimate_margin_percent))
            / 100;
        prompt_tokens.saturating_add(margin).saturating_add(8)
    }

    /// Holds the request's maximum cost against the key's limit and the account's balance.
    pub async fn reserve(
        &self,
        request: CostRequest<'_>,
        request_id: RequestId,
    ) -> Result<Reserved, ApiError> {
        // Before the reservation: a settlement may draw from grants live at this instant, and
        // the hold is only taken against grants still live then (ledger::grants).
        let started_at_ms = now_ms();
        let table = self.inner.pricing.current();
        let prompt = self.padded_prompt(request.prompt_tokens);
        let output_cap = if request.produces_output {
            Some(
                request
                    .max_output_tokens
                    .unwrap_or(table.price_for(request.model).max_output_tokens),
            )
        } else {
            Some(0)
        };
        let estimate = table.estimate(request.model, prompt, output_cap);
        let floor = Credits::from_micros(-self.inner.config.overdraft.micros());
        let account_bucket = Bucket::Account(request.account.clone());
        let key_bucket = request.limited_key.map(|k| Bucket::KeyLimit(k.to_owned()));

        let ttl_ms = self.inner.config.hold_ttl_secs.saturating_mul(1000);
        let hold_spec = |amount: Credits| HoldSpec {
            request_id: request_id.to_string(),
            amount,
            owner: self.inner.instance.clone(),
            deadline_ms: now_ms().saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX)),
        };
        let attempt = self
            .try_hold(
                &account_bucket,
                key_bucket.as_ref(),
                &hold_spec(estimate),
                floor,
            )
            .await;
        let (amount, capped) = match attempt {
            Ok(()) => (estimate, None),
            Err(HoldFailure::Insufficient {
                available,
                key_limited,
            }) if self.inner.config.on_insufficient == InsufficientPolicy::CapMaxTokens
                && request.produces_output =>
            {
                let price = table.price_for(request.model);
                let prompt_cost = table.estimate(request.model, prompt, Some(0));
                let spendable = available.checked_sub(floor).unwrap_or(Credits::ZERO);
                let left = spendable.checked_sub(prompt_cost).unwrap_or(Credits::ZERO);
                let per_token = price.completion_per_1k / Decimal::from(1000);
                let tokens = if per_token.is_zero() {
                    output_cap.unwrap_or(0)
                } else {
                    (left.to_decimal() / per_token)
                        .floor()
                        .try_into()
                        .unwrap_or(0u64)
                };
                if tokens == 0 {
                    return Err(self
                        .insufficient(request.account, available, estimate, key_limited)
                        .await);
                }
                let capped_estimate = table.estimate(request.model, prompt, Some(tokens));
                match self
                    .try_hold(
                        &account_bucket,
                        key_bucket.as_ref(),
                        &hold_spec(capped_estimate),
                        floor,
                    )
                    .await
                {
                    Ok(()) => (capped_estimate, Some(tokens)),
                    Err(HoldFailure::Insufficient {
                        available,
                        key_limited,
                    }) => {
                        return Err(self
                            .insufficient(request.account, available, capped_estimate, key_limited)
                            .await);
                    }
                    Err(HoldFailure::Other(e)) => return Err(e),
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
            Err(HoldFailure::Other(e)) => return Err(e),
        };
        Ok(Reserved {
            hold: Hold {
                request_id,
                account: request.account.clone(),
                limited_key: request.limited_key.map(str::to_owned),
                amount,
                started_at_ms,
                settler: Some(self.inner.settler.clone()),
            },
            capped_max_tokens: capped,
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
        // A key's limit has no overdraft: its floor is zero.
        if let Some(key) = key {
            cache
                .reserve(key, hold, Credits::ZERO, source)
                .await
                .map_err(|e| HoldFailure::from_reserve(e, true))?;
        }
        if let Err(e) = cache.reserve(account, hold, floor, source).await {
            if let Some(key) = key
                && let Err(error) = cache.release(key, &hold.request_id).await
            {
                tracing::warn!(%error, "could not release a key hold; it expires at its deadline");
            }
            return Err(HoldFailure::from_reserve(e, false));
        }
        Ok(())
    }

    async fn insufficient(
        &self,
        account: &AccountId,
        available: Credits,
        estimate: Credits,
        key_limited: bool,
    ) -> ApiError {
        if key_limited {
            return ApiError::InsufficientCredits {
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
        ApiError::InsufficientCredits {
            balance,
            available,
            estimate,
        }
    }

    fn settlement(&self, hold: &mut Hold, finished: Finished) -> Settlement {
        let cost = self
            .inner
            .pricing
            .current()
            .cost(&finished.model, &finished.usage);
        if cost > hold.amount {
            tracing::warn!(
                request_id = %hold.request_id,
                cost = %cost,
                hold = %hold.amount,
                "request cost more than its hold; charged in full"
            );
        }
        // Settling consumes the hold: it must not also be released on drop.
        hold.settler = None;
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
            hold: hold.amount,
            stream: finished.stream,
            status: finished.status.to_owned(),
            started_at_ms: hold.started_at_ms,
            finished_at_ms: now_ms(),
        }
    }

    /// Charges the exact cost of a finished request from a context that cannot wait (a
    /// `Drop`): the settler records it in the balance cache, then writes it to the ledger.
    pub fn finish(&self, mut hold: Hold, finished: Finished) {
        let settlement = self.settlement(&mut hold, finished);
        self.inner.settler.send(Job::Settle {
            settlement: Box::new(settlement),
            limited_key: hold.limited_key.clone(),
            recorded: false,
        });
    }

    /// Charges the exact cost of a finished request, recording it in the balance cache (its
    /// journal) before returning; the ledger write follows in the settler's next batch.
    pub async fn finish_recorded(&self, mut hold: Hold, finished: Finished) {
        let settlement = self.settlement(&mut hold, finished);
        let recorded =
            settler::record(&*self.inner.cache, &settlement, hold.limited_key.as_deref()).await;
        self.inner.settler.send(Job::Settle {
            settlement: Box::new(settlement),
            limited_key: hold.limited_key.clone(),
            recorded,
        });
    }
}

enum HoldFailure {
    Insufficient {
        available: Credits,
        key_limited: bool,
    },
    Other(ApiError),
}

impl HoldFailure {
    fn from_reserve(error: ReserveError, key_limited: bool) -> Self {
        match error {
            ReserveError::Insufficient { available } => HoldFailure::Insufficient {
                available,
                key_limited,
            },
            ReserveError::Cache(e) => HoldFailure::Other(ApiError::from(e)),
        }
    }
}
