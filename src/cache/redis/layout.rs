//! What lives where in Redis: key names (one hash tag per bucket) and how amounts are
//! encoded (exact integers up to 2^53 micro-credits, saturating beyond).

use crate::domain::AccountId;
use crate::ledger::{Bucket, Snapshot};

use super::*;

/// Key names (see the module docs for the layout).
#[derive(Clone)]
pub(super) struct Keys {
    pub(super) prefix: String,
}

/// The keys of one bucket; all share the base key's hash tag.
pub(super) struct BucketKeys {
    pub(super) base: String,
    pub(super) holds: String,
    pub(super) pending: String,
    pub(super) journal: String,
    /// Running requests' progress records (see [`BalanceCache::renew`]).
    pub(super) progress: String,
}

impl BucketKeys {
    pub(super) fn from_base(base: String) -> Self {
        // The base key ends with the `}` closing its hash tag, so every suffixed key has the
        // same tag (Redis hashes the text between the first `{` and the first `}` after it).
        BucketKeys {
            holds: format!("{base}:holds"),
            pending: format!("{base}:pending"),
            journal: format!("{base}:journal"),
            progress: format!("{base}:progress"),
            base,
        }
    }
}

impl Keys {
    pub(super) fn bucket(&self, bucket: &Bucket) -> BucketKeys {
        let base = match bucket {
            Bucket::Account(account) => format!("{{{}:a:{}}}", self.prefix, account.as_str()),
            Bucket::KeyLimit(key) => format!("{{{}:k:{}}}", self.prefix, key),
        };
        BucketKeys::from_base(base)
    }

    /// The bucket a base key names, if it is one of ours.
    pub(super) fn parse_bucket(&self, base: &str) -> Option<Bucket> {
        let rest = base
            .strip_prefix('{')?
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(':')?
            .strip_suffix('}')?;
        if let Some(account) = rest.strip_prefix("a:") {
            AccountId::parse(account).ok().map(Bucket::Account)
        } else {
            rest.strip_prefix("k:")
                .map(|key| Bucket::KeyLimit(key.to_owned()))
        }
    }

    pub(super) fn generation(&self) -> String {
        format!("{}:gen", self.prefix)
    }

    pub(super) fn instances(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    pub(super) fn owner(&self, instance: &str) -> String {
        format!("{}:owner:{instance}", self.prefix)
    }

    pub(super) fn pending_index(&self) -> String {
        format!("{}:pending", self.prefix)
    }
}

/// `<bucket key>|<request id>` with `%` and `|` escaped in the id, so the last `|` always
/// separates the two (account ids may contain `|`).
pub(super) fn index_member(base: &str, request_id: &str) -> String {
    let escaped = request_id.replace('%', "%25").replace('|', "%7C");
    format!("{base}|{escaped}")
}

pub(super) fn parse_index_member(member: &str) -> Option<(&str, String)> {
    let (base, escaped) = member.rsplit_once('|')?;
    Some((base, escaped.replace("%7C", "|").replace("%25", "%")))
}

/// Saturates micro-credits to what Lua represents exactly.
pub(super) fn exact(micros: i64) -> i64 {
    micros.clamp(-MAX_EXACT_MICROS, MAX_EXACT_MICROS)
}

/// A snapshot's fields as the scripts take them: balance, rev, next expiry ('' for none), lapsed.
pub(super) fn snapshot_args(snapshot: &Snapshot) -> [String; 4] {
    [
        exact(snapshot.balance.micros()).to_string(),
        snapshot.rev.to_string(),
        snapshot
            .next_expiry_ms
            .map_or_else(String::new, |at| at.to_string()),
        exact(snapshot.lapsed.micros()).to_string(),
    ]
}
