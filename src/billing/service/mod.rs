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

mod checkout;
mod events;

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
}
