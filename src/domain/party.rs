//! Who sells and who buys, as an invoice names them.

use serde::{Deserialize, Serialize};

/// A seller or buyer as printed on the invoice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub name: String,
    /// Address lines, printed one per line.
    #[serde(default)]
    pub address: Vec<String>,
    #[serde(default)]
    pub email: Option<String>,
    /// VAT or other tax registration number.
    #[serde(default)]
    pub tax_id: Option<String>,
}
