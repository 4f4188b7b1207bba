//! Money: exact credits as integer micro-credits (docs/architecture.md I3).
//!
//! `Decimal` is used only for prices and cost arithmetic, and is rounded once into [`Credits`].

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Micro-credits in one credit.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;

/// An exact amount of credits, stored as integer micro-credits (1 credit = 1,000,000).
///
/// Arithmetic is checked: an overflow is an error, never a wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Credits(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditsError {
    #[error("`{0}` is not a decimal number of credits")]
    NotANumber(String),
    #[error("`{0}` has more than 6 decimal places (the ledger's scale is 1 micro-credit)")]
    TooPrecise(String),
    #[error("`{0}` is out of range")]
    OutOfRange(String),
}

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn from_micros(micros: i64) -> Self {
        Credits(micros)
    }

    /// `micros` (a wide sum), saturated at the ends of the `i64` range.
    pub fn saturating_from_micros(micros: i128) -> Self {
        Credits(i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX }))
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    pub fn from_whole(credits: i64) -> Option<Self> {
        credits.checked_mul(MICROS_PER_CREDIT).map(Credits)
    }

    /// Converts an exact decimal amount; fails if it has more than 6 decimal places.
    pub fn from_decimal(value: Decimal) -> Result<Self, CreditsError> {
        let micros = value
            .checked_mul(Decimal::from(MICROS_PER_CREDIT))
            .ok_or_else(|| CreditsError::OutOfRange(value.to_string()))?;
        if micros.fract() != Decimal::ZERO {
            return Err(CreditsError::TooPrecise(value.to_string()));
        }
        i64::try_from(micros)
            .map(Credits)
            .map_err(|_| CreditsError::OutOfRange(value.to_string()))
    }

    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.0, 6).normalize()
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).map(Credits)
    }

    pub fn checked_sub(self, other: Credits) -> Option<Credits> {
        self.0.checked_sub(other.0).map(Credits)
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }
}

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.to_decimal(), f)
    }
}

impl FromStr for Credits {
    type Err = CreditsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let value =
            Decimal::from_str_exact(trimmed).map_err(|_| CreditsError::NotANumber(s.to_owned()))?;
        Credits::from_decimal(value)
    }
}

/// Credits travel as decimal strings in every API (`"12.5"`), never as JSON floats.
impl Serialize for Credits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_sums_saturate_at_the_ends_of_the_range() {
        assert_eq!(Credits::saturating_from_micros(-5).micros(), -5);
        let beyond = i128::from(i64::MAX) + 1;
        assert_eq!(Credits::saturating_from_micros(beyond).micros(), i64::MAX);
        assert_eq!(
            Credits::saturating_from_micros(-beyond - 1).micros(),
            i64::MIN
        );
    }

    #[test]
    fn parses_and_prints_decimal_strings_exactly() {
        let c: Credits = "12.345678".parse().expect("valid");
        assert_eq!(c.micros(), 12_345_678);
        assert_eq!(c.to_string(), "12.345678");
        assert_eq!("100".parse::<Credits>().expect("valid").to_string(), "100");
        assert_eq!("-0.5".parse::<Credits>().expect("valid").micros(), -500_000);
    }

    #[test]
    fn rejects_sub_micro_precision_and_garbage() {
        assert!(matches!(
            "0.0000001".parse::<Credits>(),
            Err(CreditsError::TooPrecise(_))
        ));
        assert!(matches!(
            "abc".parse::<Credits>(),
            Err(CreditsError::NotANumber(_))
        ));
        assert!(matches!(
            "1e3".parse::<Credits>(),
            Err(CreditsError::NotANumber(_))
        ));
        assert!(matches!(
            "99999999999999999".parse::<Credits>(),
            Err(CreditsError::OutOfRange(_))
        ));
    }

    #[test]
    fn checked_arithmetic_never_wraps() {
        let max = Credits::from_micros(i64::MAX);
        assert_eq!(max.checked_add(Credits::from_micros(1)), None);
        assert_eq!(
            Credits::from_micros(i64::MIN).checked_sub(Credits::from_micros(1)),
            None
        );
    }
}
