//! Domain newtypes shared by every layer: money, accounts and request ids.
//!
//! Money is integer micro-credits everywhere it is stored or cached (DESIGN.md I3); `Decimal` is
//! used only for prices and cost arithmetic, and is rounded once into [`Credits`].

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

/// The account a request is billed to (a JWT subject or an API key's owner).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account id must be 1-128 printable characters without spaces")]
pub struct InvalidAccountId;

impl AccountId {
    pub fn parse(raw: &str) -> Result<Self, InvalidAccountId> {
        let valid = !raw.is_empty()
            && raw.len() <= 128
            && raw.chars().all(|c| {
                c.is_ascii_graphic() || (!c.is_ascii() && !c.is_whitespace() && !c.is_control())
            });
        if valid {
            Ok(AccountId(raw.to_owned()))
        } else {
            Err(InvalidAccountId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of one proxied request; the idempotency key of its settlement (DESIGN.md I2).
///
/// `req_` and a version 7 UUID: unique across instances, and ordered by creation time, so the
/// ledger's indexes on it (usage records, usage entries) grow at their end instead of at a
/// random page each: a settle batch then writes a few pages, not one per settlement.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(String);

impl RequestId {
    pub fn new() -> Self {
        RequestId(format!("req_{}", uuid::Uuid::now_v7().simple()))
    }

    pub fn from_string(raw: String) -> Self {
        RequestId(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Token counts of one request, as reported by the upstream or counted by the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Prompt tokens served from the upstream's prompt cache (a subset of `prompt_tokens`).
    pub cached_tokens: u64,
}

impl TokenUsage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_and_sort_in_creation_order() {
        let ids: Vec<RequestId> = (0..1000).map(|_| RequestId::new()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0].as_str() < pair[1].as_str(), "{pair:?}");
        }
        assert!(
            ids.iter()
                .all(|id| id.as_str().len() == 36 && id.as_str().starts_with("req_"))
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

    #[test]
    fn account_ids_are_validated() {
        assert!(AccountId::parse("alice").is_ok());
        assert!(AccountId::parse("").is_err());
        assert!(AccountId::parse("a b").is_err());
        assert!(AccountId::parse(&"x".repeat(129)).is_err());
    }

    #[test]
    fn account_ids_may_be_written_in_any_script_but_without_blanks_or_controls() {
        for id in ["josé", "用户-7", "ünïcødé_ok"] {
            assert_eq!(
                AccountId::parse(id).map(|a| a.to_string()),
                Ok(id.to_owned())
            );
        }
        // An ideographic or no-break space, a C1 control.
        for id in ["a\u{3000}b", "a\u{a0}b", "a\u{80}b"] {
            assert_eq!(AccountId::parse(id), Err(InvalidAccountId), "{id:?}");
        }
    }

    #[test]
    fn a_requests_tokens_add_up_without_overflowing() {
        let usage = TokenUsage {
            prompt_tokens: 1_000,
            completion_tokens: 24,
            cached_tokens: 600,
        };
        assert_eq!(usage.total(), 1_024);
        let huge = TokenUsage {
            prompt_tokens: u64::MAX,
            completion_tokens: 1,
            cached_tokens: 0,
        };
        assert_eq!(huge.total(), u64::MAX);
    }
}
