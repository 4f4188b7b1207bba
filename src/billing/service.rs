//! The payments use cases: create a checkout, handle a verified provider event, apply the
//! credit moves orders cause to the ledger.
//!
//! Exactly-once crediting rests on three keys, each checked in the database:
//! - the provider's event id (`payment_events`): a replayed delivery changes nothing;
//! - the provider's payment id (`orders.provider_order_id`, unique per provider): a second
//!   event about the same payment finds the order already paid;
//! - each credit move's reference (`order_credit_moves`, then the ledger's own idempotent
//!   grant reference): a move is applied once however often it is retried.
//!
//! An event is recorded as processed only after its moves are in the ledger. If anything fails
//! in between, the provider's retry (or the recovery task's sweep of pending moves) finishes
//! the job, and the keys above make the second run a replay.

use std::sync::Arc;

use super::coupons::{self, Coupon};
use super::lemonsqueezy::LemonSqueezyApi;
use super::money::to_minor;
use super::orders::{self, Deferred, Order, OrderStatus, Provider};
use super::provider::{CheckoutRequest, ProviderError};
use super::store::{
    EventRecord, OrderLookup, PaymentStore, SharedPaymentStore, StepFn, UpdateOutcome,
};
use super::stripe::StripeApi;
use super::webhooks::{Action, Claim, ParsedEvent};
use crate::cache::SharedCache;
use crate::config::Config;
use crate::config::packages::Package;
use crate::config::payments::{ResolvedLemonSqueezy, ResolvedPolar, ResolvedStripe};
use crate::domain::AccountId;
use crate::domain::time::now_ms;
use crate::ledger::{Bucket, LedgerError, SharedLedger};

#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The event may apply later; the provider should deliver it again.
    #[error("{0}")]
    Retry(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("balance cache: {0}")]
    Cache(#[from] crate::cache::CacheError),
}

impl PaymentError {
    fn invalid(message: impl Into<String>, param: &'static str) -> PaymentError {
        PaymentError::Invalid {
            message: message.into(),
            param: Some(param),
        }
    }
}

/// A coupon applied to a package.
#[derive(Debug, Clone)]
pub struct Quote {
    pub coupon: Coupon,
    pub package: Package,
    pub discount: coupons::Discount,
    /// The package price in minor units, before the discount.
    pub price: i64,
}

/// What `create-checkout` returns.
#[derive(Debug, Clone)]
pub struct CheckoutStarted {
    pub order: Order,
    pub checkout_url: String,
}

/// What became of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Seen before: nothing changed.
    Duplicate,
    Processed {
        order_id: String,
    },
    Ignored(String),
    /// Kept for an admin, not credited.
    Review(String),
}

struct StripeSetup {
    api: Option<StripeApi>,
    webhook: ResolvedStripe,
}

struct LemonSqueezySetup {
    api: Option<LemonSqueezyApi>,
    config: ResolvedLemonSqueezy,
}

pub struct Payments {
    ledger: SharedLedger,
    /// Orders and events. An order's credit moves are written here and applied afterwards
    /// through the ledger's own idempotent grants.
    store: SharedPaymentStore,
    cache: SharedCache,
    packages: Arc<Vec<Package>>,
    invoices: crate::config::InvoiceSettings,
    success_url: String,
    cancel_url: String,
    default_provider: Option<Provider>,
    stripe: Option<StripeSetup>,
    lemonsqueezy: Option<LemonSqueezySetup>,
    polar: Option<ResolvedPolar>,
}

impl Payments {
    pub fn new(
        config: &Config,
        ledger: SharedLedger,
        store: SharedPaymentStore,
        cache: SharedCache,
        packages: Arc<Vec<Package>>,
    ) -> anyhow::Result<Payments> {
        let resolved = config
            .resolve_payments(|name| std::env::var(name).ok())
            .map_err(anyhow::Error::msg)?;
        let stripe = resolved
            .stripe
            .map(|webhook| -> anyhow::Result<StripeSetup> {
                let api = webhook
                    .secret_key
                    .as_deref()
                    .map(|key| {
                        StripeApi::new(key, webhook.api_base.as_deref(), webhook.api_timeout)
                    })
                    .transpose()?;
                Ok(StripeSetup { api, webhook })
            })
            .transpose()?;
        let lemonsqueezy = resolved
            .lemonsqueezy
            .map(|config| -> anyhow::Result<LemonSqueezySetup> {
                let api = config
                    .api_key
                    .as_deref()
                    .map(|key| {
                        LemonSqueezyApi::new(key, &config.store_id, config.api_base.as_deref())
                    })
                    .transpose()?;
                Ok(LemonSqueezySetup { api, config })
            })
            .transpose()?;
        let default_provider = match config.payments.default_provider.as_deref() {
            Some(name) => Provider::parse(name),
            None if stripe.as_ref().is_some_and(|s| s.api.is_some()) => Some(Provider::Stripe),
            None if lemonsqueezy.as_ref().is_some_and(|l| l.api.is_some()) => {
                Some(Provider::LemonSqueezy)
            }
            None => None,
        };
        Ok(Payments {
            ledger,
            store,
            cache,
            packages,
            invoices: config.invoices.clone(),
            success_url: config.payments.success_url.clone(),
            cancel_url: config.payments.cancel_url.clone(),
            default_provider,
            stripe,
            lemonsqueezy,
            polar: resolved.polar,
        })
    }

    /// The orders, events, coupons, invoices and statements.
    pub fn store(&self) -> &dyn PaymentStore {
        self.store.as_ref()
    }

    pub fn stripe_webhook(&self) -> Option<&ResolvedStripe> {
        self.stripe.as_ref().map(|s| &s.webhook)
    }

    pub fn lemonsqueezy_secret(&self) -> Option<&str> {
        self.lemonsqueezy
            .as_ref()
            .map(|l| l.config.signing_secret.as_str())
    }

    pub fn polar_webhook(&self) -> Option<&ResolvedPolar> {
        self.polar.as_ref()
    }

    fn package(&self, id: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.id == id)
    }

    /// A package buyers may order now.
    fn active_package(&self, id: &str) -> Result<&Package, PaymentError> {
        self.package(id)
            .filter(|p| p.active)
            .ok_or_else(|| PaymentError::invalid(format!("no active package `{id}`"), "package_id"))
    }

    /// A new pending order for `package_id` and the provider's hosted checkout for it.
    pub async fn create_checkout(
        &self,
        account: &AccountId,
        package_id: &str,
        provider: Option<&str>,
        coupon_code: Option<&str>,
    ) -> Result<CheckoutStarted, PaymentError> {
        let package = self.active_package(package_id)?;
        let provider = match provider {
            Some(name) => Provider::parse(name).ok_or_else(|| {
                PaymentError::invalid(
                    format!("provider `{name}` is not one of stripe, lemonsqueezy"),
                    "provider",
                )
            })?,
            None => self.default_provider.ok_or_else(|| {
                PaymentError::invalid("no payment provider is configured", "provider")
            })?,
        };
        let amount = to_minor(package.price, &package.currency).ok_or_else(|| {
            PaymentError::invalid(
                format!("package `{package_id}` has a price its currency cannot charge"),
                "package_id",
            )
        })?;
        let now = now_ms();
        let mut order = new_order(account, package, provider, amount, now);
        let quoted = match coupon_code {
            Some(code) => Some(self.quote(account, code, package_id).await?),
            None => None,
        };
        if let Some(quote) = &quoted {
            order.coupon_code = Some(quote.coupon.code.clone());
            order.discount_amount = quote.discount.amount_off;
            order.amount = amount - quote.discount.amount_off;
            order.bonus_credits = quote.discount.bonus_credits;
        }
        let request = CheckoutRequest {
            order_id: order.id.clone(),
            account_id: account.as_str().to_owned(),
            package_id: package.id.clone(),
            product_name: package.name.clone(),
            currency: package.currency.clone(),
            amount_minor: order.amount,
            success_url: self.success_url.replace("{ORDER_ID}", &order.id),
            cancel_url: self.cancel_url.replace("{ORDER_ID}", &order.id),
        };
        // Checked before the order is written, so a refused request leaves nothing behind.
        match provider {
            Provider::Stripe if self.stripe.as_ref().is_some_and(|s| s.api.is_some()) => {}
            Provider::LemonSqueezy => {
                let setup = self
                    .lemonsqueezy
                    .as_ref()
                    .filter(|l| l.api.is_some())
                    .ok_or_else(|| not_configured(provider))?;
                if !setup.config.variants.contains_key(&package.id) {
                    return Err(PaymentError::invalid(
                        format!("package `{package_id}` is not sold through Lemon Squeezy"),
                        "package_id",
                    ));
                }
            }
            _ => return Err(not_configured(provider)),
        }
        match &quoted {
            None => self.store().insert_order(&order).await?,
            Some(quote) => {
                // Re-checked under the coupon's lock, where the use is counted: the quote must
                // still hold, or the buyer is told why not.
                let expected = quote.discount;
                let check = |coupon: &Coupon, held: i64| {
                    let now = now_ms();
                    match coupons::evaluate(coupon, package, &self.packages, held, now) {
                        Ok(discount) if discount == expected => Ok(()),
                        Ok(_) => Err("this coupon changed; apply it again".to_owned()),
                        Err(why) => Err(why),
                    }
                };
                if let Err(why) = self
                    .store()
                    .insert_order_with_coupon(&order, &check)
                    .await?
                {
                    return Err(PaymentError::invalid(why, "coupon_code"));
                }
            }
        }
        let created = match self.call_provider(provider, &request, &package.id).await {
            Ok(created) => created,
            Err(error) => {
                // The buyer can start again; this order will never be paid.
                let failed = self
                    .store()
                    .update_order(&order.id, &|o| {
                        orders::close(o, OrderStatus::Failed, now_ms())
                    })
                    .await;
                if let Err(store_error) = failed {
                    tracing::warn!(%store_error, order = %order.id, "cannot close a failed order");
                }
                return Err(error.into());
            }
        };
        let (checkout_id, url) = (created.checkout_id, created.url);
        let outcome = self
            .store()
            .update_order(&order.id, &|o| {
                let mut next = o.clone();
                next.checkout_id = Some(checkout_id.clone());
                next.checkout_url = Some(url.clone());
                if provider == Provider::Stripe && next.provider_order_id.is_none() {
                    // A Stripe session is the payment's natural key.
                    next.provider_order_id = Some(checkout_id.clone());
                }
                Ok(Some(orders::Transition::order_only(next)))
            })
            .await?;
        let order = match outcome {
            UpdateOutcome::Applied(order) => *order,
            _ => order,
        };
        Ok(CheckoutStarted {
            order,
            checkout_url: url,
        })
    }

    /// What `code` takes off `package_id` for this account, without holding a use of it.
    pub async fn quote(
        &self,
        account: &AccountId,
        code: &str,
        package_id: &str,
    ) -> Result<Quote, PaymentError> {
        let package = self.active_package(package_id)?;
        let unknown = || PaymentError::invalid("no such coupon", "coupon_code");
        let code = coupons::normalize_code(code).ok_or_else(unknown)?;
        let coupon = self.store().coupon(&code).await?.ok_or_else(unknown)?;
        let held = self.store().coupon_uses_by(&code, account).await?;
        let discount = coupons::evaluate(&coupon, package, &self.packages, held, now_ms())
            .map_err(|why| PaymentError::invalid(why, "coupon_code"))?;
        let price = to_minor(package.price, &package.currency).unwrap_or(0);
        Ok(Quote {
            coupon,
            package: package.clone(),
            discount,
            price,
        })
    }

    async fn call_provider(
        &self,
        provider: Provider,
        request: &CheckoutRequest,
        package_id: &str,
    ) -> Result<super::provider::CheckoutCreated, ProviderError> {
        match provider {
            Provider::Stripe => {
                let api = self.stripe.as_ref().and_then(|s| s.api.as_ref());
                let api = api.ok_or_else(|| ProviderError::Config("stripe".into()))?;
                api.create_checkout(request).await
            }
            Provider::LemonSqueezy => {
                let setup = self.lemonsqueezy.as_ref();
                let (api, variant) = setup
                    .and_then(|l| Some((l.api.as_ref()?, l.config.variants.get(package_id)?)))
                    .ok_or_else(|| ProviderError::Config("lemonsqueezy".into()))?;
                api.create_checkout(request, variant).await
            }
            Provider::Polar => Err(ProviderError::Config(
                "Polar checkouts are created in Polar".into(),
            )),
        }
    }

    /// Applies one verified event. `raw` is kept when the event is left for an admin.
    pub async fn handle_event(
        &self,
        provider: Provider,
        event: ParsedEvent,
        raw: &[u8],
    ) -> Result<Handled, PaymentError> {
        if self.store().event_seen(provider, &event.event_id).await? {
            return Ok(Handled::Duplicate);
        }
        let handled = self.apply_action(provider, &event.action).await?;
        let (outcome, order_id, detail) = match &handled {
            Handled::Processed { order_id } => ("processed", Some(order_id.clone()), String::new()),
            Handled::Ignored(why) => ("ignored", None, why.clone()),
            Handled::Review(why) => ("review", None, why.clone()),
            Handled::Duplicate => return Ok(Handled::Duplicate),
        };
        if let Handled::Review(why) = &handled {
            tracing::warn!(provider = provider.as_str(), event = %event.event_id, %why,
                "payment event kept for review; nothing credited");
        }
        let record = EventRecord {
            provider,
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            outcome: outcome.to_owned(),
            order_id,
            detail,
            payload: matches!(handled, Handled::Review(_))
                .then(|| String::from_utf8_lossy(raw).into_owned()),
            received_at_ms: now_ms(),
            cursor: 0,
        };
        if !self.store().record_event(&record).await? {
            return Ok(Handled::Duplicate);
        }
        Ok(handled)
    }

    async fn apply_action(
        &self,
        provider: Provider,
        action: &Action,
    ) -> Result<Handled, PaymentError> {
        let now = now_ms();
        let (lookup, step): (&OrderLookup, Box<StepFn<'_>>) = match action {
            Action::Ignore(why) => return Ok(Handled::Ignored(why.clone())),
            Action::Paid { lookup, facts, .. } => {
                let invoices = &self.invoices;
                (
                    lookup,
                    Box::new(move |o| orders::pay(o, facts, invoices, now)),
                )
            }
            Action::AwaitingPayment {
                lookup,
                provider_order_id,
                payment_ref,
            } => (
                lookup,
                Box::new(move |o| {
                    orders::awaiting_payment(o, provider_order_id, payment_ref.as_deref(), now)
                }),
            ),
            Action::Closed { lookup, status } => {
                (lookup, Box::new(move |o| orders::close(o, *status, now)))
            }
            Action::Refunded {
                lookup,
                refunded_total,
                currency,
            } => (
                lookup,
                Box::new(move |o| orders::refund(o, *refunded_total, currency, now)),
            ),
            Action::RefundFailed {
                lookup,
                refund_id,
                amount,
                currency,
                reason,
            } => (
                lookup,
                Box::new(move |o| orders::refund_failed(o, refund_id, *amount, currency, reason)),
            ),
            Action::DisputeOpened {
                lookup,
                dispute_id,
                amount,
                currency,
            } => (
                lookup,
                Box::new(move |o| orders::dispute_opened(o, dispute_id, *amount, currency, now)),
            ),
            Action::DisputeClosed {
                lookup,
                dispute_id,
                won,
            } => (
                lookup,
                Box::new(move |o| orders::dispute_closed(o, dispute_id, *won, now)),
            ),
        };
        let mut found = self.store().find_order(provider, lookup).await?;
        if found.is_none()
            && let Action::Paid { claim, facts, .. } = action
        {
            // A payment Tollgate did not start: its order is created as it arrives.
            if let Err(why) = self.order_on_arrival(provider, claim, facts, now).await? {
                return Ok(Handled::Review(why));
            }
            found = self.store().find_order(provider, lookup).await?;
        }
        let Some(order) = found else {
            return Ok(match action {
                // The payment's own event, which creates the order, has not arrived yet:
                // providers do not deliver events in order. Answered 409 and not recorded, so
                // the provider's retry applies it once the payment is in (recorded as ignored,
                // the payment would later be credited and never clawed back).
                Action::Refunded { .. }
                | Action::RefundFailed { .. }
                | Action::DisputeOpened { .. }
                | Action::DisputeClosed { .. }
                    if lookup.order_id.is_none() && lookup.order_may_follow =>
                {
                    return Err(PaymentError::Retry(
                        "no order is paid by this payment yet; its payment event may still \
                         be on its way"
                            .into(),
                    ));
                }
                // Not an order of ours: another integration's payment on the same account.
                Action::Refunded { .. }
                | Action::RefundFailed { .. }
                | Action::DisputeOpened { .. }
                | Action::DisputeClosed { .. }
                    if lookup.order_id.is_none() =>
                {
                    Handled::Ignored("no order of Tollgate's is paid by this payment".into())
                }
                _ if lookup.order_id.is_some() => Handled::Review(format!(
                    "order {} does not exist",
                    lookup.order_id.as_deref().unwrap_or("")
                )),
                _ => Handled::Ignored("no order of Tollgate's matches this event".into()),
            });
        };
        match self.store().update_order(&order.id, &*step).await? {
            UpdateOutcome::NotFound => Err(PaymentError::NotFound(order.id)),
            UpdateOutcome::Deferred(Deferred::Retry(why)) => Err(PaymentError::Retry(why)),
            UpdateOutcome::Deferred(Deferred::Review(why)) => Ok(Handled::Review(why)),
            UpdateOutcome::Applied(order) => {
                let order = *order;
                self.apply_moves(Some(&order.id)).await?;
                if order.status == OrderStatus::Review {
                    return Ok(Handled::Review(
                        order
                            .review_reason
                            .unwrap_or_else(|| "held for review".into()),
                    ));
                }
                Ok(Handled::Processed { order_id: order.id })
            }
        }
    }

    /// Creates the order for a paid event Tollgate did not start, from the account and package
    /// its metadata names. `Err(why)` when it names no known package or account.
    async fn order_on_arrival(
        &self,
        provider: Provider,
        claim: &Claim,
        facts: &orders::PaymentFacts,
        now: i64,
    ) -> Result<Result<(), String>, PaymentError> {
        let Some(package) = claim.package_id.as_deref().and_then(|id| self.package(id)) else {
            return Ok(Err(format!(
                "payment {} names no known package ({:?})",
                facts.provider_order_id, claim.package_id
            )));
        };
        let Some(account) = claim
            .account_id
            .as_deref()
            .and_then(|id| AccountId::parse(id).ok())
        else {
            return Ok(Err(format!(
                "payment {} names no valid account_id",
                facts.provider_order_id
            )));
        };
        let Some(amount) = to_minor(package.price, &package.currency) else {
            return Ok(Err(format!("package {} cannot be charged", package.id)));
        };
        let mut order = new_order(&account, package, provider, amount, now);
        order.provider_order_id = Some(facts.provider_order_id.clone());
        match self.store().insert_order(&order).await {
            Ok(()) => Ok(Ok(())),
            // A concurrent delivery of the same payment created it first.
            Err(LedgerError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                Ok(Ok(()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Applies pending credit moves (of one order, or of all) to the ledger and the cache.
    pub async fn apply_moves(&self, order_id: Option<&str>) -> Result<usize, PaymentError> {
        let moves = self.store().pending_moves(order_id, 500).await?;
        for credit in &moves {
            // A claw-back draws from its order's own grants first, so it needs the order.
            let order = if credit.amount.is_negative() {
                self.store().order(&credit.order_id).await?
            } else {
                None
            };
            let request = credit.grant_request(order.as_ref());
            let outcome = self.ledger.grant(&request).await?;
            // The move stays pending until the cache has the new balance too: a retry then
            // replays the grant (a no-op returning the current balance) and updates the cache.
            self.cache
                .apply(&Bucket::Account(credit.account.clone()), outcome.snapshot)
                .await?;
            self.store()
                .mark_move_applied(&credit.reference, now_ms())
                .await?;
            tracing::info!(order = %credit.order_id, reference = %credit.reference,
                amount = %credit.amount, applied = outcome.applied, "order credit move applied");
        }
        Ok(moves.len())
    }
}

fn not_configured(provider: Provider) -> PaymentError {
    PaymentError::invalid(
        format!("checkout through {} is not configured", provider.as_str()),
        "provider",
    )
}

fn new_order(
    account: &AccountId,
    package: &Package,
    provider: Provider,
    amount: i64,
    now: i64,
) -> Order {
    Order {
        id: format!("ord_{}", uuid::Uuid::new_v4().simple()),
        account: account.clone(),
        package_id: package.id.clone(),
        description: package.name.clone(),
        provider,
        status: OrderStatus::Pending,
        checkout_id: None,
        checkout_url: None,
        provider_order_id: None,
        payment_ref: None,
        credits: package.credits,
        bonus_credits: crate::domain::Credits::ZERO,
        validity_days: package.validity_days,
        currency: package.currency.clone(),
        list_amount: amount,
        discount_amount: 0,
        amount,
        paid_amount: None,
        refunded_amount: 0,
        credits_refunded: crate::domain::Credits::ZERO,
        dispute_id: None,
        dispute_status: None,
        dispute_credits: crate::domain::Credits::ZERO,
        coupon_code: None,
        invoice_id: None,
        buyer_email: None,
        buyer_name: None,
        review_reason: None,
        grant_expires_at_ms: None,
        created_at_ms: now,
        updated_at_ms: now,
        paid_at_ms: None,
        refunded_at_ms: None,
        closed_at_ms: None,
    }
}
