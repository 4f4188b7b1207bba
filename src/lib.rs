//! Tollgate: an OpenAI-compatible gateway that meters every token in credits.
//!
//! Crate map, top down: the edge first, the modules every other one uses last. Each module
//! uses only modules below it (`tests/module_layers.rs` checks it; docs/architecture.md has
//! the map in full).
//! - [`cli`]: the `tollgate` command line.
//! - [`app`]: builds the gateway from the config, serves, shuts down gracefully.
//! - [`routes`]: the HTTP edge: router, middleware, OpenAI-shaped errors, one file per surface.
//! - [`state`]: what every route handler shares.
//! - [`proxy`]: the metered forward: hold, upstream call, SSE observer, token counting.
//! - [`admin`]: admin operations shared by `/admin` routes and the CLI.
//! - [`auth`]: bearer token → principal (JWT verifier, gateway API keys, admin token).
//! - [`metering`]: prices, estimate and hold, exact cost, the batching settler.
//! - [`billing`]: credit packages, orders, coupons, invoices, payment providers and webhooks.
//! - [`cache`]: the balance-cache port and its in-process and Redis adapters.
//! - [`ledger`]: the ledger port and its SQLite and MySQL adapters (source of truth for money).
//! - [`telemetry`]: logging set-up.
//! - [`config`]: `config/tollgate.toml` loading, env overrides and validation.
//! - [`domain`]: money, ids, token counts and time.
//! - [`mock`]: the built-in mock upstream.
//! - [`net`]: the one outbound HTTP(S) client set-up.

pub mod admin;
pub mod app;
pub mod auth;
pub mod billing;
pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod ledger;
pub mod metering;
pub mod mock;
pub mod net;
pub mod proxy;
pub mod routes;
pub mod state;
pub mod telemetry;

/// For the unit tests, as for the integration tests: MariaDB and Redis found, started or
/// skipped in one place, and time limits.
#[cfg(test)]
#[path = "../tests/support/mod.rs"]
#[allow(dead_code, reason = "the unit tests use a part of it")]
pub(crate) mod test_support;
