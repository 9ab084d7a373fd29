//! A per-broker cache of decoded token sets, so that a cached read does not decode JSON.
//!
//! The store stays the source of truth: every read still loads the record (that is what makes
//! a refresh by another instance, a re-link or an unlink visible at once). The cache only
//! answers "have I already decoded exactly these bytes?". An entry is reused when the loaded
//! record has the same version *and* the same payload bytes as when it was decoded, so a
//! store that reuses a version after a delete and re-insert still never gets a stale set back.
//! For `MemoryStore` the payload is the very same allocation (`Payload` is an `Arc`), so the
//! check is a pointer comparison; for the other stores it is one `memcmp` of ~2.5 KB, far
//! below the JSON decode it replaces.
//!
//! Bounded: a fixed number of entries per shard; inserting into a full shard evicts an entry
//! chosen by the map's (randomly seeded) iteration order, which is as good as random and needs
//! no bookkeeping on the read path.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock};

use crate::ids::TokenKey;
use crate::store::{StoredRecord, Version};
use crate::token::{Payload, TokenSet};

const SHARDS: usize = 16;

/// Seeded at random per cache; see `MemoryStore` for why not SipHash.
type RandomState = foldhash::fast::RandomState;
type Shard = HashMap<TokenKey, Entry, RandomState>;

/// The default number of decoded sets a broker keeps (about 2.5 KB each for typical tokens,
/// plus the payload, which `MemoryStore` shares).
pub(crate) const DEFAULT_CAPACITY: usize = 4096;

struct Entry {
    version: Version,
    payload: Payload,
    set: Arc<TokenSet>,
}

pub(crate) struct HotCache {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    per_shard: usize,
}

impl std::fmt::Debug for HotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotCache")
            .field("capacity", &(self.per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl HotCache {
    /// A cache of about `capacity` sets; 0 turns it off.
    pub(crate) fn new(capacity: usize) -> Self {
        HotCache {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            hasher: RandomState::default(),
            per_shard: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: &TokenKey) -> &RwLock<Shard> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// The set decoded earlier from exactly `stored`'s payload, if any.
    pub(crate) fn get(&self, key: &TokenKey, stored: &StoredRecord) -> Option<Arc<TokenSet>> {
        if self.per_shard == 0 {
            return None;
        }
        // A poisoned shard only means a panic elsewhere between two plain assignments.
        let shard = self.shard(key).read().unwrap_or_else(|e| e.into_inner());
        let entry = shard.get(key)?;
        // Not constant-time, and need not be: both sides are bytes this process already holds,
        // and the answer only decides whether to decode them again.
        (entry.version == stored.version && entry.payload.same_bytes(&stored.record.payload))
            .then(|| Arc::clone(&entry.set))
    }

    /// Remembers `set` as the decoding of `stored`'s payload.
    pub(crate) fn put(&self, key: &TokenKey, stored: &StoredRecord, set: Arc<TokenSet>) {
        if self.per_shard == 0 {
            return;
        }
        let entry = Entry {
            version: stored.version.clone(),
            payload: stored.record.payload.clone(),
            set,
        };
        let mut shard = self.shard(key).write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = shard.get_mut(key) {
            *slot = entry;
            return;
        }
        if shard.len() >= self.per_shard
            && let Some(victim) = shard.keys().next().cloned()
        {
            shard.remove(&victim);
        }
        shard.insert(key.clone(), entry);
    }

    /// Forgets `key` (unlink), so that its tokens do not outlive the link in memory.
    pub(crate) fn remove(&self, key: &TokenKey) {
        if self.per_shard == 0 {
            return;
        }
        self.shard(key)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;
    use crate::store::{LinkState, Record, RecordMeta};
    use time::macros::datetime;

    fn stored(access: &str, version: u64) -> StoredRecord {
        let at = datetime!(2026-01-01 0:00 UTC);
        let set = TokenSet::new(Secret::new(access), at);
        StoredRecord::new(
            Record::new(
                set.to_payload(),
                RecordMeta::new(LinkState::Active, None, at, at),
            ),
            Version::from_number(version),
        )
    }

    fn key(i: usize) -> TokenKey {
        TokenKey::parse("r", &format!("u{i}"), "p").unwrap()
    }

    #[test]
    fn hit_needs_same_version_and_same_bytes() {
        let cache = HotCache::new(64);
        let a = stored("at-1", 1);
        let set = Arc::new(TokenSet::from_payload(&a.record.payload).unwrap());
        cache.put(&key(0), &a, set.clone());
        assert!(Arc::ptr_eq(&cache.get(&key(0), &a).unwrap(), &set));
        // Same bytes in another allocation (an SQL or encrypted store): still a hit.
        let copy = StoredRecord::new(
            Record::new(
                Payload::new(a.record.payload.expose_secret().to_vec()),
                a.record.meta.clone(),
            ),
            a.version.clone(),
        );
        assert!(cache.get(&key(0), &copy).is_some());
        // A newer version, or the same version with other bytes (re-inserted): a miss.
        assert!(cache.get(&key(0), &stored("at-1", 2)).is_none());
        assert!(cache.get(&key(0), &stored("at-2", 1)).is_none());
        assert!(cache.get(&key(1), &a).is_none());
        cache.remove(&key(0));
        assert!(cache.get(&key(0), &a).is_none());
    }

    #[test]
    fn stays_bounded_and_can_be_off() {
        let cache = HotCache::new(32);
        let s = stored("at", 1);
        let set = Arc::new(TokenSet::from_payload(&s.record.payload).unwrap());
        for i in 0..1000 {
            cache.put(&key(i), &s, set.clone());
        }
        let len: usize = cache.shards.iter().map(|s| s.read().unwrap().len()).sum();
        assert!(len <= 32, "{len} entries");
        let off = HotCache::new(0);
        off.put(&key(0), &s, set);
        assert!(off.get(&key(0), &s).is_none());
    }
}
