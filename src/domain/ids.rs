//! Who a request is billed to and which request it is.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The account a request is billed to (a JWT subject or an API key's owner).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "account id must be 1-128 bytes of visible characters: no spaces, control, invisible or \
     bidi formatting characters"
)]
pub struct InvalidAccountId;

/// The longest account id, in bytes (UTF-8).
pub const MAX_ACCOUNT_ID_BYTES: usize = 128;

impl AccountId {
    /// An account id: 1 to [`MAX_ACCOUNT_ID_BYTES`] bytes of visible characters in any script.
    /// Refused: whitespace, control characters, and the invisible formatting characters
    /// (Unicode category Cf: zero-width spaces and joiners, bidi marks, overrides and isolates,
    /// the byte order mark, tag characters), so that two ids that look alike are alike.
    pub fn parse(raw: &str) -> Result<Self, InvalidAccountId> {
        let valid = !raw.is_empty()
            && raw.len() <= MAX_ACCOUNT_ID_BYTES
            && raw.chars().all(|c| {
                c.is_ascii_graphic()
                    || (!c.is_ascii() && !c.is_whitespace() && !c.is_control() && !is_format(c))
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

/// Unicode's format characters (general category Cf): invisible, or changing how the text
/// around them is shown.
fn is_format(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{600}'..='\u{605}'
            | '\u{61c}'
            | '\u{6dd}'
            | '\u{70f}'
            | '\u{890}'..='\u{891}'
            | '\u{8e2}'
            | '\u{180e}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffb}'
            | '\u{110bd}'
            | '\u{110cd}'
            | '\u{13430}'..='\u{1343f}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0001}'
            | '\u{e0020}'..='\u{e007f}'
    )
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

    /// Two ids that look the same must be the same id: nothing invisible, and nothing that
    /// reorders how the rest is shown (`alice\u{202e}gnp.exe` shows as `aliceexe.png`).
    #[test]
    fn account_ids_hold_no_invisible_or_bidi_control_characters() {
        for id in [
            "ali\u{200b}ce",    // zero-width space
            "ali\u{200d}ce",    // zero-width joiner
            "alice\u{200f}",    // right-to-left mark
            "alice\u{202e}gnp", // right-to-left override
            "alice\u{2066}x",   // left-to-right isolate
            "\u{feff}alice",    // byte order mark
            "ali\u{ad}ce",      // soft hyphen
            "alice\u{e0041}",   // tag character
            "ali\u{2060}ce",    // word joiner
            "alice\u{61c}",     // Arabic letter mark
            "alice\u{fff9}",    // interlinear annotation
        ] {
            assert_eq!(AccountId::parse(id), Err(InvalidAccountId), "{id:?}");
        }
        // At most 128 bytes, whatever the script: 42 three-byte characters fit, 43 do not.
        assert!(AccountId::parse(&"用".repeat(42)).is_ok());
        assert!(AccountId::parse(&"用".repeat(43)).is_err());
    }
}
