//! Selling credits: packages, payment providers' checkouts and webhooks, orders and invoices.

pub mod coupons;
pub mod invoice;
pub mod lemonsqueezy;
pub mod money;
pub mod orders;
pub mod pdf;
pub mod provider;
pub mod service;
pub mod signatures;
pub mod statements;
pub mod store;
pub mod stripe;
pub mod webhooks;
