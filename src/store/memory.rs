//! The embedded default store: a sharded in-process map.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::BuildHasher;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, PendingRevocation, Record, RevocationId,
    ScanCursor, ScanPage, ScannedLink, StoreError, StoredRecord, TokenStore, Version,
};
use crate::clock::{self, SharedClock};
use crate::ids::{Realm, Subject, TokenKey};

const SHARDS: usize = 32;

/// An in-process [`TokenStore`]: fast, and gone when the process exits.
///
/// It is the right store for one instance, for tests, and as the quickstart default. Several
/// broker instances in one process may share one `MemoryStore` (through an `Arc`), and then
/// refresh correctly across each other, as with a database.
///
/// Keys are spread over 32 shards, each behind its own lock, so readers of different keys do not
/// contend; no lock is held across an `.await`. Leases are judged by the store's [`Clock`]
/// (the system clock unless [`MemoryStore::with_clock`] is used).
///
/// [`Clock`]: crate::Clock
///
/// ```
/// use std::sync::Arc;
/// use tokenbroker::{MemoryStore, TokenStore};
///
/// let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
/// ```
pub struct MemoryStore {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    next_version: AtomicU64,
    clock: SharedClock,
    /// The revocation outbox. Locked after a shard, never before, so that a delete and its
    /// entry are one step.
    outbox: std::sync::Mutex<HashMap<RevocationId, PendingRevocation, RandomState>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("links", &self.len())
            .field("clock", &self.clock)
            .finish()
    }
}

// foldhash rather than SipHash: hashing the key twice per read (shard, then map) was a third
// of a cached read. Both are seeded at random per store.
type RandomState = foldhash::fast::RandomState;
type Shard = HashMap<TokenKey, Slot, RandomState>;

#[derive(Debug)]
struct Slot {
    record: Record,
    version: Version,
    /// The current lease: its token and expiry. Kept after expiry until released or
    /// replaced, so that the token stays current (see the trait's contract).
    lease: Option<(LeaseToken, OffsetDateTime)>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store on the system clock.
    pub fn new() -> Self {
        MemoryStore::with_clock(clock::system())
    }

    /// An empty store whose leases follow `clock` (use a `ManualClock` in tests).
    pub fn with_clock(clock: SharedClock) -> Self {
        MemoryStore {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(HashMap::default()))
                .collect(),
            hasher: RandomState::default(),
            next_version: AtomicU64::new(1),
            clock,
            outbox: std::sync::Mutex::default(),
        }
    }

    /// The number of stored links.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    /// Whether the store holds no link.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &TokenKey) -> &RwLock<Shard> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        &self.shards[i]
    }

    /// Deletes like `TokenStore::delete` and runs `then` under the shard's lock when a record
    /// was deleted.
    fn delete_then(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
        then: impl FnOnce(),
    ) -> Result<bool, StoreError> {
        let mut shard = write(self.shard(key));
        match (shard.get(key), expected) {
            (None, _) => Ok(false),
            (Some(slot), Some(v)) if slot.version != v => {
                Err(StoreError::Conflict { key: key.clone() })
            }
            (Some(_), _) => {
                shard.remove(key);
                then();
                Ok(true)
            }
        }
    }

    fn outbox(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<RevocationId, PendingRevocation, RandomState>> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_version(&self) -> Version {
        Version::from_number(self.next_version.fetch_add(1, Ordering::Relaxed))
    }
}

// A poisoned shard only means another thread panicked while holding it; every mutation below
// is a single assignment, so the map is still consistent and we keep serving.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl TokenStore for MemoryStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        let shard = read(self.shard(key));
        Ok(shard
            .get(key)
            .map(|slot| StoredRecord::new(slot.record.clone(), slot.version.clone())))
    }

    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        let mut shard = write(self.shard(key));
        match shard.entry(key.clone()) {
            Entry::Occupied(_) => Err(StoreError::Conflict { key: key.clone() }),
            Entry::Vacant(v) => {
                let version = self.next_version();
                v.insert(Slot {
                    record: record.clone(),
                    version: version.clone(),
                    lease: None,
                });
                Ok(version)
            }
        }
    }

    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let mut shard = write(self.shard(key));
        match shard.get_mut(key) {
            Some(slot)
                if slot.version == expected
                    && fence.is_none_or(|f| slot.lease.as_ref().is_some_and(|(t, _)| t == f)) =>
            {
                slot.version = self.next_version();
                slot.record = record.clone();
                Ok(slot.version.clone())
            }
            _ => Err(StoreError::Conflict { key: key.clone() }),
        }
    }

    async fn delete(&self, key: &TokenKey, expected: Option<Version>) -> Result<bool, StoreError> {
        self.delete_then(key, expected, || {})
    }

    async fn list(&self, realm: &Realm, subject: &Subject) -> Result<Vec<TokenKey>, StoreError> {
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            let shard = read(shard);
            keys.extend(
                shard
                    .keys()
                    .filter(|k| &k.realm == realm && &k.subject == subject)
                    .cloned(),
            );
        }
        Ok(keys)
    }

    async fn scan(
        &self,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        let after = cursor.map(ScanCursor::key).transpose()?;
        // Shards are hashed, not ordered: collect what lies after the cursor, then keep the
        // lowest keys. A walk costs O(n) per page, which is fine for an in-process store of
        // this size.
        let mut links = Vec::new();
        for shard in self.shards.iter() {
            let shard = read(shard);
            links.extend(
                shard
                    .iter()
                    .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
                    .map(|(k, slot)| {
                        ScannedLink::new(k.clone(), slot.record.meta.clone(), slot.version.clone())
                    }),
            );
        }
        let keep = limit.max(1) + 1;
        if links.len() > keep {
            links.select_nth_unstable_by(keep - 1, |a, b| a.key.cmp(&b.key));
            links.truncate(keep);
        }
        links.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        Ok(ScanPage::from_ordered(links, limit))
    }

    async fn try_lease(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        let now = self.clock.now();
        let mut shard = write(self.shard(key));
        let Some(slot) = shard.get_mut(key) else {
            return Ok(LeaseAttempt::Missing);
        };
        if let Some((_, until)) = &slot.lease
            && *until > now
        {
            return Ok(LeaseAttempt::Busy);
        }
        let expires_at = now + ttl;
        let token = LeaseToken::random();
        slot.lease = Some((token.clone(), expires_at));
        Ok(LeaseAttempt::Acquired(Lease::new(
            key.clone(),
            holder.clone(),
            token,
            expires_at,
        )))
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut shard = write(self.shard(&lease.key));
        if let Some(slot) = shard.get_mut(&lease.key)
            && slot
                .lease
                .as_ref()
                .is_some_and(|(token, _)| token == &lease.token)
        {
            slot.lease = None;
        }
        Ok(())
    }

    async fn extend_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let now = self.clock.now();
        let mut shard = write(self.shard(&lease.key));
        let Some(slot) = shard.get_mut(&lease.key) else {
            return Ok(None);
        };
        match &mut slot.lease {
            Some((token, until)) if token == &lease.token => {
                *until = now + ttl;
                let mut extended = lease.clone();
                extended.expires_at = *until;
                Ok(Some(extended))
            }
            _ => Ok(None),
        }
    }

    async fn delete_and_enqueue_revocation(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
        revocation: &PendingRevocation,
    ) -> Result<bool, StoreError> {
        self.delete_then(key, expected, || {
            self.outbox()
                .insert(revocation.id.clone(), revocation.clone());
        })
    }

    async fn enqueue_revocation(&self, revocation: &PendingRevocation) -> Result<(), StoreError> {
        self.outbox()
            .insert(revocation.id.clone(), revocation.clone());
        Ok(())
    }

    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<PendingRevocation>, StoreError> {
        let mut outbox = self.outbox();
        let mut due: Vec<&mut PendingRevocation> =
            outbox.values_mut().filter(|r| r.due_at <= now).collect();
        due.sort_unstable_by_key(|r| r.due_at);
        Ok(due
            .into_iter()
            .take(limit)
            .map(|r| {
                r.attempts = r.attempts.saturating_add(1);
                r.due_at = until;
                r.clone()
            })
            .collect())
    }

    async fn reschedule_revocation(
        &self,
        claimed: &PendingRevocation,
        due_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        Ok(match self.outbox().get_mut(&claimed.id) {
            Some(r) if r.attempts == claimed.attempts => {
                r.due_at = due_at;
                true
            }
            _ => false,
        })
    }

    async fn remove_revocation(&self, id: &RevocationId) -> Result<(), StoreError> {
        self.outbox().remove(id);
        Ok(())
    }
}
