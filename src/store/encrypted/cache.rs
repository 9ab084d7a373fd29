//! Unwrapped keys kept in memory, so that the [`KeyProvider`](super::KeyProvider) is asked once
//! per wrapped key and time limit, not once per read: the process's own intermediate key for
//! writes ([`WriteKey`]), the intermediate keys it has unwrapped, and the per-record data keys
//! of format-1 envelopes. Every key is a [`DataKey`] (zeroized on drop, redacted in `Debug`);
//! the maps are bounded and their entries expire.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use time::OffsetDateTime;

use super::{DataKey, KeyId};
use crate::ids::TokenKey;

type RandomState = foldhash::fast::RandomState;
/// One unwrap under way: callers take turns on it.
type FlightSlot = Arc<tokio::sync::Mutex<()>>;

/// Whether something that started at `since` is younger than `limit` at `now`. A clock that
/// went backwards makes it old: the conservative answer for keys.
pub(super) fn younger_than(since: OffsetDateTime, now: OffsetDateTime, limit: Duration) -> bool {
    let age = now - since;
    !age.is_negative() && age < limit
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// The intermediate key this process encrypts new records under.
pub(super) struct WriteKey {
    /// The envelope header naming it (KEK id and wrapped key), copied into every envelope.
    pub(super) header: Box<[u8]>,
    /// The KEK the provider wrapped it under.
    pub(super) kek_id: KeyId,
    /// The provider's primary key id when it was made: a new primary means a new key.
    pub(super) primary: KeyId,
    /// The key.
    pub(super) key: Arc<DataKey>,
    /// When it was made.
    pub(super) created: OffsetDateTime,
}

impl fmt::Debug for WriteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteKey")
            .field("kek_id", &self.kek_id)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

struct Entry {
    key: Arc<DataKey>,
    since: OffsetDateTime,
}

/// A bounded map of unwrapped keys that expire `ttl` after they were unwrapped. When full, an
/// insertion first drops expired entries, then the oldest one: O(n), but only after a call to
/// the key provider, which costs far more.
struct Bounded<K, V> {
    map: RwLock<HashMap<K, V, RandomState>>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> Bounded<K, V> {
    fn new(capacity: usize) -> Self {
        Bounded {
            map: RwLock::new(HashMap::default()),
            capacity,
        }
    }

    fn insert(
        &self,
        key: K,
        value: V,
        since: impl Fn(&V) -> OffsetDateTime,
        fresh: impl Fn(&V) -> bool,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut map = write(&self.map);
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, v| fresh(v));
        }
        while map.len() >= self.capacity && !map.contains_key(&key) {
            let Some(oldest) = map
                .iter()
                .min_by_key(|(_, v)| since(v))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            map.remove(&oldest);
        }
        map.insert(key, value);
    }

    fn len(&self) -> usize {
        read(&self.map).len()
    }
}

/// The unwrapped keys of one [`EncryptedStore`](super::EncryptedStore).
pub(super) struct KeyCache {
    ttl: Duration,
    /// Intermediate keys, by envelope header (KEK id and wrapped key).
    intermediate: Bounded<Box<[u8]>, Entry>,
    /// Format-1 data keys, by record key; the header tells whether the record still holds the
    /// data key cached for it. Keyed by record because a format-1 data key is wrapped for one
    /// record (its AAD), so the cache must not hand it to another.
    legacy: Bounded<TokenKey, (Box<[u8]>, Entry)>,
    /// Unwraps under way, by header: concurrent reads needing the same key wait for one call.
    flights: Mutex<HashMap<Box<[u8]>, FlightSlot, RandomState>>,
}

impl KeyCache {
    pub(super) fn new(ttl: Duration, intermediate: usize, legacy: usize) -> Self {
        KeyCache {
            ttl,
            intermediate: Bounded::new(intermediate),
            legacy: Bounded::new(legacy),
            flights: Mutex::new(HashMap::default()),
        }
    }

    /// The same cache, empty, with another TTL.
    pub(super) fn with_ttl(&self, ttl: Duration) -> Self {
        KeyCache::new(ttl, self.intermediate.capacity, self.legacy.capacity)
    }

    /// The same cache, empty, keeping at most `capacity` intermediate keys.
    pub(super) fn with_capacity(&self, capacity: usize) -> Self {
        KeyCache::new(self.ttl, capacity, self.legacy.capacity)
    }

    /// The same cache, empty, keeping at most `capacity` format-1 data keys.
    pub(super) fn with_legacy_capacity(&self, capacity: usize) -> Self {
        KeyCache::new(self.ttl, self.intermediate.capacity, capacity)
    }

    /// The intermediate key named by `header`, if unwrapped less than the TTL ago.
    pub(super) fn intermediate(&self, header: &[u8], now: OffsetDateTime) -> Option<Arc<DataKey>> {
        let map = read(&self.intermediate.map);
        let entry = map.get(header)?;
        younger_than(entry.since, now, self.ttl).then(|| Arc::clone(&entry.key))
    }

    pub(super) fn put_intermediate(&self, header: &[u8], key: Arc<DataKey>, now: OffsetDateTime) {
        let ttl = self.ttl;
        self.intermediate.insert(
            header.into(),
            Entry { key, since: now },
            |e| e.since,
            |e| younger_than(e.since, now, ttl),
        );
    }

    /// The format-1 data key of `record`, if it still holds the envelope `header` and the key
    /// was unwrapped less than the TTL ago.
    pub(super) fn legacy(
        &self,
        record: &TokenKey,
        header: &[u8],
        now: OffsetDateTime,
    ) -> Option<Arc<DataKey>> {
        let map = read(&self.legacy.map);
        let (cached_header, entry) = map.get(record)?;
        (**cached_header == *header && younger_than(entry.since, now, self.ttl))
            .then(|| Arc::clone(&entry.key))
    }

    pub(super) fn put_legacy(
        &self,
        record: &TokenKey,
        header: &[u8],
        key: Arc<DataKey>,
        now: OffsetDateTime,
    ) {
        let ttl = self.ttl;
        self.legacy.insert(
            record.clone(),
            (header.into(), Entry { key, since: now }),
            |(_, e)| e.since,
            |(_, e)| younger_than(e.since, now, ttl),
        );
    }

    /// Waits for this process's turn to unwrap the key named by `header`: after an earlier
    /// holder finished, the caller should look in the cache again before calling the provider.
    pub(super) async fn flight(&self, header: &[u8]) -> Flight<'_> {
        let slot = {
            let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(flights.entry(header.into()).or_default())
        };
        let turn = Arc::clone(&slot).lock_owned().await;
        Flight {
            cache: self,
            header: header.into(),
            slot,
            _turn: turn,
        }
    }

    /// How many keys are cached: intermediate keys, format-1 data keys.
    pub(super) fn sizes(&self) -> (usize, usize) {
        (self.intermediate.len(), self.legacy.len())
    }
}

impl fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (intermediate, legacy) = self.sizes();
        f.debug_struct("KeyCache")
            .field("ttl", &self.ttl)
            .field("intermediate_keys", &intermediate)
            .field("intermediate_capacity", &self.intermediate.capacity)
            .field("legacy_data_keys", &legacy)
            .field("legacy_capacity", &self.legacy.capacity)
            .finish()
    }
}

/// One caller's turn at unwrapping a key (see [`KeyCache::flight`]). Dropping it, also by
/// cancellation, lets the next waiter in and forgets the flight once nobody else joined it.
pub(super) struct Flight<'a> {
    cache: &'a KeyCache,
    header: Box<[u8]>,
    slot: FlightSlot,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut flights = self
            .cache
            .flights
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only our own slot: a later flight for the same header may have replaced it. Waiters
        // still queued on ours keep their clone and look in the cache when their turn comes.
        if flights
            .get(&self.header)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            flights.remove(&self.header);
        }
    }
}
