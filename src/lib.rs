//! Tollgate: an OpenAI-compatible gateway that meters every token in credits.
//!
//! Crate map, in the order a request travels:
//! - [`app`]: builds state and the router, binds, serves, shuts down gracefully.
//! - [`config`]: `config/tollgate.toml` loading, env overrides and validation.
//! - [`auth`]: bearer token → principal (JWT verifier, gateway API keys, admin token).
//! - [`proxy`]: the `/v1` routes, upstream client, SSE observer, token counting, mock upstream.
//! - [`metering`]: prices, estimate and hold, exact cost, the batching settler.
//! - [`ledger`]: the ledger port and its SQLite adapter (source of truth for money).
//! - [`cache`]: the balance-cache port and its in-process adapter (holds, pending settlements).
//! - [`http`]: the OpenAI-shaped error type, `/api/credits` routes, health checks.
//! - [`billing`]: credit packages and payment providers' webhook signatures.
//! - [`admin`]: admin operations shared by `/admin` routes and the CLI.
//! - [`cli`]: the `tollgate` command line.
//! - [`domain`]: money and id newtypes.

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
