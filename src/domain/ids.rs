//! Who a request is billed to and which request it is.

use std::fmt;

use serde::{Deserialize, Serialize};

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

/// The id of one proxied request; the idempotency key of its settlement (docs/architecture.md I2).
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
}
