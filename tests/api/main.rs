//! Integration tests: the real gateway on an ephemeral loopback port, a fake OpenAI upstream
//! (a real HTTP server) and a real HTTP client. One binary keeps link time down.

mod fakes;
mod fakes_tests;
mod helpers;

/// This binary runs every test on the embedded default (SQLite, in-process cache).
pub const BACKEND: helpers::Backend = helpers::Backend::Embedded;

mod admin_and_keys;
mod adversarial_upstream;
mod auth;
mod bad_input;
mod billing;
mod concurrency;
mod coupons;
mod grants_and_pricing;
mod hold_bounds;
mod ledger_contract;
mod lifecycle;
mod metering;
mod payment_event_sequences;
mod payments;
mod payments_providers;
mod set_aside;
mod statements;
mod streaming;
mod upstreams;
