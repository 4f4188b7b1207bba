//! The `[invoices]` table: who issues the invoices, the tax rate, the notes.

use serde::Deserialize;

use crate::domain::Party;

/// Invoice settings from `[invoices]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InvoiceSettings {
    pub seller: Party,
    /// Tax included in prices, in percent (`"19"`); `"0"` prints no tax.
    #[serde(with = "rust_decimal::serde::str")]
    pub tax_rate_percent: rust_decimal::Decimal,
    /// Printed under the totals of every invoice.
    pub notes: Vec<String>,
}
