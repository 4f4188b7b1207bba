//! Invoices: the document issued for each paid order, frozen at issue time.
//!
//! Amounts are exact decimals in the invoice currency, with its decimal places (2 for USD).
//! Prices are tax-inclusive: `total` is what the buyer paid, and `tax` is the part of it that is
//! tax.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

pub use crate::domain::Party;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvoiceLine {
    pub description: String,
    pub quantity: u32,
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// One invoice document, as returned by `GET /api/payment/invoices/{id}` and rendered to PDF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// `inv_…`
    pub id: String,
    /// Gap-free per calendar year: `INV-2026-000123`.
    pub number: String,
    pub order_id: String,
    pub account_id: String,
    /// RFC 3339, UTC.
    pub issued_at: String,
    /// ISO 4217, upper case.
    pub currency: String,
    pub seller: Party,
    pub buyer: Party,
    pub lines: Vec<InvoiceLine>,
    /// Σ line amounts, before the discount.
    #[serde(with = "rust_decimal::serde::str")]
    pub subtotal: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub discount: Decimal,
    /// e.g. `19` for 19 %; `0` when the seller charges no tax.
    #[serde(with = "rust_decimal::serde::str")]
    pub tax_rate_percent: Decimal,
    /// The tax included in `total`.
    #[serde(with = "rust_decimal::serde::str")]
    pub tax: Decimal,
    /// `total - tax`.
    #[serde(with = "rust_decimal::serde::str")]
    pub total_excluding_tax: Decimal,
    /// What the buyer paid: `subtotal - discount`.
    #[serde(with = "rust_decimal::serde::str")]
    pub total: Decimal,
    /// Free text printed under the totals (e.g. "Credits expire 365 days after purchase.").
    #[serde(default)]
    pub notes: Vec<String>,
}
