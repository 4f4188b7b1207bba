//! The integration suite again, on the production backends: MySQL/MariaDB ledger and Redis
//! cache (127.0.0.1:3306 and :6379), each test in its own database and key prefix. Plus what
//! only the shared backends can show: several instances, a crash, Redis and MySQL faults.

#[path = "../api/fakes.rs"]
mod fakes;
#[path = "../api/helpers.rs"]
mod helpers;

/// This binary runs every test on MySQL + Redis.
pub const BACKEND: helpers::Backend = helpers::Backend::Production;

#[path = "../api/admin_and_keys.rs"]
mod admin_and_keys;
#[path = "../api/adversarial_upstream.rs"]
mod adversarial_upstream;
#[path = "../api/auth.rs"]
mod auth;
#[path = "../api/bad_input.rs"]
mod bad_input;
#[path = "../api/billing.rs"]
mod billing;
#[path = "../api/concurrency.rs"]
mod concurrency;
#[path = "../api/coupons.rs"]
mod coupons;
#[path = "../api/grants_and_pricing.rs"]
mod grants_and_pricing;
#[path = "../api/hold_bounds.rs"]
mod hold_bounds;
#[path = "../api/lifecycle.rs"]
mod lifecycle;
#[path = "../api/metering.rs"]
mod metering;
#[path = "../api/payment_event_sequences.rs"]
mod payment_event_sequences;
#[path = "../api/payments.rs"]
mod payments;
#[path = "../api/payments_providers.rs"]
mod payments_providers;
#[path = "../api/set_aside.rs"]
mod set_aside;
#[path = "../api/statements.rs"]
mod statements;
#[path = "../api/streaming.rs"]
mod streaming;
#[path = "../api/upstreams.rs"]
mod upstreams;

mod cluster;
mod faults;
