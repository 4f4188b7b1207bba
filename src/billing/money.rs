//! Prices in a currency's minor unit, as payment providers count them (cents for USD, yen for
//! JPY). Conversions are exact: a price that does not fit the currency's minor unit is refused,
//! never rounded.

use rust_decimal::Decimal;

/// Currencies whose minor unit is the major unit (Stripe's zero-decimal list).
const ZERO_DECIMAL: &[&str] = &[
    "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
    "XAF", "XOF", "XPF",
];
/// Currencies with three decimal places.
const THREE_DECIMAL: &[&str] = &["BHD", "JOD", "KWD", "OMR", "TND"];

/// Decimal places of the currency's minor unit.
pub fn exponent(currency: &str) -> u32 {
    let code = currency.to_ascii_uppercase();
    if ZERO_DECIMAL.contains(&code.as_str()) {
        0
    } else if THREE_DECIMAL.contains(&code.as_str()) {
        3
    } else {
        2
    }
}

/// `9.99 USD` → `999`; `None` if the amount has finer precision than the currency or overflows.
pub fn to_minor(amount: Decimal, currency: &str) -> Option<i64> {
    let scaled = amount.checked_mul(Decimal::from(10_i64.pow(exponent(currency))))?;
    if !scaled.fract().is_zero() {
        return None;
    }
    i64::try_from(scaled.trunc()).ok()
}

/// `999` USD → `9.99`.
pub fn from_minor(minor: i64, currency: &str) -> Decimal {
    Decimal::new(minor, exponent(currency))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(raw: &str) -> Decimal {
        raw.parse().unwrap_or_default()
    }

    #[test]
    fn converts_exactly_in_each_currency_kind() {
        assert_eq!(to_minor(dec("9.99"), "USD"), Some(999));
        assert_eq!(to_minor(dec("100"), "usd"), Some(10_000));
        assert_eq!(to_minor(dec("1200"), "JPY"), Some(1200));
        assert_eq!(to_minor(dec("1.234"), "KWD"), Some(1234));
        assert_eq!(from_minor(999, "USD").to_string(), "9.99");
        assert_eq!(from_minor(1200, "JPY").to_string(), "1200");
    }

    #[test]
    fn refuses_amounts_finer_than_the_minor_unit() {
        assert_eq!(to_minor(dec("9.995"), "USD"), None);
        assert_eq!(to_minor(dec("0.5"), "JPY"), None);
    }
}
