//! Gateway API keys (`tg-…`): generated here, shown once, stored only as a SHA-256 hash.
//!
//! Keys are cached in-process by hash; the cache is dropped whenever the shared cache epoch
//! moves (a key revoked by the CLI or another admin call), so a revoked key stops working
//! within one epoch poll (`app::EPOCH_POLL`, 100 ms).

use std::sync::Arc;

use dashmap::DashMap;
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::ledger::{ApiKeyRecord, LedgerError, SharedLedger};

pub const KEY_PREFIX: &str = "tg-";

/// A new key: the secret (shown once) and its id.
pub struct NewKey {
    pub secret: String,
    pub id: String,
    pub hash: String,
    pub prefix: String,
}

pub fn generate() -> NewKey {
    let mut rng = rand::rng();
    let secret_bytes: [u8; 24] = rng.random();
    let id_bytes: [u8; 8] = rng.random();
    let secret = format!("{KEY_PREFIX}{}", hex::encode(secret_bytes));
    NewKey {
        id: format!("key_{}", hex::encode(id_bytes)),
        hash: hash(&secret),
        prefix: secret.chars().take(KEY_PREFIX.len() + 6).collect(),
        secret,
    }
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn looks_like_key(token: &str) -> bool {
    token.starts_with(KEY_PREFIX)
}

/// Known keys by hash. Unknown keys are not cached, so guessing cannot grow this map.
#[derive(Clone)]
pub struct ApiKeyCache {
    ledger: SharedLedger,
    keys: Arc<DashMap<String, Arc<ApiKeyRecord>>>,
}

impl ApiKeyCache {
    pub fn new(ledger: SharedLedger) -> Self {
        ApiKeyCache {
            ledger,
            keys: Arc::new(DashMap::new()),
        }
    }

    /// The live (not revoked) key record for `secret`, if any.
    pub async fn lookup(&self, secret: &str) -> Result<Option<Arc<ApiKeyRecord>>, LedgerError> {
        let hash = hash(secret);
        if let Some(record) = self.keys.get(&hash) {
            return Ok((!record.is_revoked()).then(|| record.clone()));
        }
        let Some(record) = self.ledger.api_key_by_hash(&hash).await? else {
            return Ok(None);
        };
        let record = Arc::new(record);
        self.keys.insert(hash, record.clone());
        Ok((!record.is_revoked()).then_some(record))
    }

    pub fn clear(&self) {
        self.keys.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_unique_prefixed_and_hashed() {
        let a = generate();
        let b = generate();
        assert_ne!(a.secret, b.secret);
        assert_ne!(a.id, b.id);
        assert!(a.secret.starts_with("tg-") && a.secret.len() == 3 + 48);
        assert_eq!(a.hash, hash(&a.secret));
        assert_eq!(a.hash.len(), 64);
        assert!(a.secret.starts_with(&a.prefix));
        assert!(!a.hash.contains(&a.secret[3..]));
    }
}
