//! [`CachedStore`]: a read-through near cache in front of a shared store, invalidated across
//! instances by a [`ChangeFeed`].
//!
//! # What it is for
//!
//! With a shared store every `retrieve` is a round trip (about 130 µs and one query per read
//! on PostgreSQL). A `CachedStore` keeps the records it loaded in process memory, so that a
//! read of a fresh token costs no round trip: it hands back the very record it loaded earlier
//! (the [`Payload`](crate::Payload) is shared, so the broker's own cache of decoded token sets
//! recognises it by pointer). Writes go through to the store.
//!
//! # What is cached
//!
//! - **Records that exist**, each with the time it was loaded (by the cache's
//!   [`Clock`](crate::Clock)). A cached record is served while it is younger than the limit
//!   below, and nobody said it changed.
//! - **Not** the absence of a record. A miss is what a user who just linked an account sees
//!   on another instance; caching it would answer "not linked" until the notification
//!   arrives. Reads of unlinked keys always reach the store.
//! - Not `list`, `scan`, leases or the revocation outbox: they are forwarded as they are.
//!
//! A successful write (`insert`, `compare_and_swap`) caches the record written, with the
//! version the store gave it; a delete evicts. A write that fails in any way (a conflict, a
//! back-end error, an unknown outcome) evicts the key: what the store holds is unknown.
//!
//! # Leases: the engine always sees the store
//!
//! The refresh protocol re-reads the record under the lease to find out whether another
//! instance refreshed meanwhile; a stale record there would present a spent refresh token to
//! the provider. So when [`try_lease`](TokenStore::try_lease) through a `CachedStore` acquires
//! a lease, the key is evicted and marked *leased here*: every `load` of it goes to the store,
//! and nothing loaded is cached, until the lease is released, an `extend_lease` answers that it
//! was taken over, or (for a holder that never released it) twice its TTL after it was taken
//! or last extended. A lease that is busy (another instance is refreshing) or a missing key
//! evicts the key too, so the engine's waits re-read the store. None of this needs the engine
//! to know about the cache: it reaches the store through the same trait.
//!
//! With encryption, either order works. `CachedStore<EncryptedStore<S>>` caches decrypted
//! records (a cached read decrypts nothing; the plaintext lives in memory, as the broker's own
//! cache of decoded sets already does); a key rotation's `rewrap`, run on the inner
//! `EncryptedStore`, bypasses this cache, and its writes reach the caches through the feed or
//! the TTL (they change no token, only the envelope). `EncryptedStore<CachedStore<S>>` caches
//! ciphertext, so every read still decrypts, and `rewrap` takes its leases through the cache.
//!
//! # Staleness bound
//!
//! A record changed by another instance may still be served here:
//!
//! - **with a live change feed**: until this instance has *received* the change's
//!   notification (milliseconds after the write commits; the notification is sent by the
//!   database or Redis itself, atomically with the write), and never longer than
//!   [`max_age`](CachedStoreBuilder::max_age) (default 30 s, a safety net for a connection that
//!   died without anyone noticing);
//! - **without a feed, or while it is down**: at most [`ttl`](CachedStoreBuilder::ttl)
//!   (default 1 s) after the record was loaded. When a feed is lost the whole cache is
//!   cleared, and cleared again when it is back (notifications may have been missed in
//!   between).
//!
//! What can be stale within that bound: an access token that is still valid although another
//! instance refreshed it (both work: the provider issued both); a link that another instance
//! unlinked or marked relink-required (served until the bound; the revocation upstream still
//! happens). Why that is safe for the refresh protocol: a refresh never trusts the cache. It
//! takes the store's lease and re-reads the store under it (see above), and every write is a
//! compare-and-swap on the version, so a stale cached record can make a write conflict (the
//! cache then evicts it), never overwrite a newer record or spend a refresh token twice.
//!
//! # Memory
//!
//! Bounded by a number of entries (default 100,000) and by the bytes of their payloads (default
//! 64 MiB), split evenly over 16 shards. Inserting into a full shard evicts an entry chosen by
//! the shard's randomly seeded iteration order, which needs no bookkeeping on the read path. A
//! record larger than a shard's share of the bytes is not cached.
//!
//! # Example
//!
//! ```
//! # async fn run() -> Result<(), tokenbroker::StoreError> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use tokenbroker::store::CachedStore;
//! use tokenbroker::{MemoryStore, TokenStore};
//!
//! // A store without notifications: entries are served for at most 500 ms.
//! let store = CachedStore::builder(MemoryStore::new())
//!     .ttl(Duration::from_millis(500))
//!     .max_entries(10_000)
//!     .build();
//! let store: Arc<dyn TokenStore> = Arc::new(store);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, PendingRevocation, Record, RevocationId,
    ScanCursor, ScanPage, StoreError, StoredRecord, TokenStore, Version,
};
use crate::clock::{self, SharedClock};
use crate::ids::{Realm, Subject, TokenKey};

const SHARDS: usize = 16;

/// The default [`ttl`](CachedStoreBuilder::ttl): 1 s.
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);
/// The default [`max_age`](CachedStoreBuilder::max_age): 30 s.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30);
/// The default [`max_entries`](CachedStoreBuilder::max_entries): 100,000.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// The default [`max_bytes`](CachedStoreBuilder::max_bytes): 64 MiB.
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

/// What an entry costs besides its payload: the key, the metadata, the map's slot.
const ENTRY_OVERHEAD: usize = 192;

/// Something that happened to a store's links, as a [`ChangeFeed`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FeedEvent {
    /// The feed is (again) subscribed: every change committed from now on will be reported.
    /// Changes made before may have been missed, so the cache clears itself.
    Subscribed,
    /// The record of this key changed (inserted, written, deleted).
    Changed(TokenKey),
    /// Any record may have changed (a notification too large to name its key, or one that did
    /// not parse): the cache clears itself.
    ChangedAll,
    /// The feed lost its connection: changes may be missed until the next
    /// [`Subscribed`](FeedEvent::Subscribed). The cache clears itself and serves entries for at
    /// most its TTL meanwhile.
    Lost,
}

/// A stream of changes to a store's links, which a [`CachedStore`] subscribes to so that a
/// write on one instance evicts the record from the caches of the others.
///
/// A feed reconnects by itself: after [`FeedEvent::Lost`], the next calls try again (with a
/// backoff of the feed's choosing) and answer [`FeedEvent::Subscribed`] once they are back.
/// `None` ends the feed for good (the cache then stays on its TTL).
///
/// Built in: [`PostgresStore::change_feed`](crate::PostgresStore::change_feed) (`LISTEN/NOTIFY`,
/// feature `postgres`), [`RedisStore::change_feed`](crate::RedisStore::change_feed) (pub/sub,
/// feature `redis`), and a `tokio::sync::mpsc::Receiver<FeedEvent>`, for a host that carries
/// changes over a bus of its own.
///
/// ```
/// use tokenbroker::store::{ChangeFeed, FeedEvent};
///
/// let (tx, rx) = tokio::sync::mpsc::channel::<FeedEvent>(64);
/// let feed: Box<dyn ChangeFeed> = Box::new(rx);
/// # drop((tx, feed));
/// ```
#[async_trait]
pub trait ChangeFeed: Send + 'static {
    /// Waits for the next event; `None` when the feed has ended for good.
    async fn next_event(&mut self) -> Option<FeedEvent>;
}

#[async_trait]
impl ChangeFeed for tokio::sync::mpsc::Receiver<FeedEvent> {
    async fn next_event(&mut self) -> Option<FeedEvent> {
        self.recv().await
    }
}

#[async_trait]
impl<F: ChangeFeed + ?Sized> ChangeFeed for Box<F> {
    async fn next_event(&mut self) -> Option<FeedEvent> {
        (**self).next_event().await
    }
}

/// Counters of a [`CachedStore`], for metrics and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Records cached now.
    pub entries: usize,
    /// Bytes they take (payloads plus a fixed overhead per entry).
    pub bytes: usize,
    /// Loads answered from the cache.
    pub hits: u64,
    /// Loads that went to the store (not cached, too old, or under a lease held here).
    pub misses: u64,
    /// Change notifications received from the feed (`Changed` and `ChangedAll`).
    pub invalidations_received: u64,
    /// Times the feed was lost (or ended).
    pub feed_losses: u64,
    /// Times the feed (re)subscribed.
    pub feed_subscriptions: u64,
    /// Times the whole cache was cleared.
    pub flushes: u64,
    /// Entries evicted to stay within the bounds.
    pub capacity_evictions: u64,
    /// Whether a feed is subscribed now (entries then live up to `max_age`, else up to `ttl`).
    pub feed_live: bool,
}

struct Config {
    ttl: Duration,
    max_age: Duration,
    per_shard_entries: usize,
    per_shard_bytes: usize,
}

type RandomState = foldhash::fast::RandomState;

#[derive(Default)]
struct Shard {
    map: HashMap<TokenKey, Slot, RandomState>,
    /// Bumped by every invalidation of a key of this shard: a load that started before it
    /// does not cache what it read.
    epoch: u64,
    entries: usize,
    bytes: usize,
}

#[derive(Default)]
struct Slot {
    entry: Option<Entry>,
    /// Leases taken through this cache on the key and not released yet.
    leases: Vec<Mark>,
    /// Writes through this cache under way on the key.
    writes: u32,
}

struct Entry {
    stored: StoredRecord,
    /// When the load that read it started (or the write that wrote it ended).
    at: OffsetDateTime,
    bytes: usize,
}

struct Mark {
    token: LeaseToken,
    /// Past this the mark is ignored (a holder that never released its lease).
    lapses_at: OffsetDateTime,
}

impl Slot {
    fn leased(&self, now: OffsetDateTime) -> bool {
        self.leases.iter().any(|m| now < m.lapses_at)
    }
    fn is_empty(&self) -> bool {
        self.entry.is_none() && self.leases.is_empty() && self.writes == 0
    }
}

struct Shared {
    shards: Box<[RwLock<Shard>]>,
    hasher: RandomState,
    config: Config,
    clock: SharedClock,
    feed_live: AtomicBool,
    has_feed: bool,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    feed_losses: AtomicU64,
    feed_subscriptions: AtomicU64,
    flushes: AtomicU64,
    capacity_evictions: AtomicU64,
    /// Dropped with the cache: stops the feed's task.
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

// A poisoned shard only means a panic elsewhere between plain assignments.
fn read(lock: &RwLock<Shard>) -> std::sync::RwLockReadGuard<'_, Shard> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}
fn write(lock: &RwLock<Shard>) -> std::sync::RwLockWriteGuard<'_, Shard> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// Whether something made at `at` is younger than `limit` at `now`. A clock that went
/// backwards makes it old.
fn younger_than(at: OffsetDateTime, now: OffsetDateTime, limit: Duration) -> bool {
    let age = now - at;
    !age.is_negative() && age < limit
}

impl Shard {
    fn remove_entry(&mut self, key: &TokenKey) {
        if let Some(slot) = self.map.get_mut(key) {
            if let Some(old) = slot.entry.take() {
                self.entries -= 1;
                self.bytes -= old.bytes;
            }
            if slot.is_empty() {
                self.map.remove(key);
            }
        }
    }

    fn clear_entries(&mut self) {
        self.map.retain(|_, slot| {
            slot.entry = None;
            !slot.is_empty()
        });
        self.entries = 0;
        self.bytes = 0;
        self.epoch += 1;
    }
}

impl Shared {
    fn shard(&self, key: &TokenKey) -> &RwLock<Shard> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    fn limit(&self) -> Duration {
        if self.feed_live.load(Ordering::Acquire) {
            self.config.max_age
        } else {
            self.config.ttl
        }
    }

    /// Forgets `key` and makes loads under way not cache what they read.
    fn evict(&self, key: &TokenKey) {
        let mut shard = write(self.shard(key));
        shard.epoch += 1;
        shard.remove_entry(key);
    }

    /// Drops the entry of `key`, if there is one, without touching loads under way (for a
    /// load that found the key gone: nothing newer can be lost by it).
    fn forget(&self, key: &TokenKey) {
        if read(self.shard(key))
            .map
            .get(key)
            .is_some_and(|slot| slot.entry.is_some())
        {
            write(self.shard(key)).remove_entry(key);
        }
    }

    fn flush(&self) {
        for shard in self.shards.iter() {
            write(shard).clear_entries();
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Caches `stored` unless the key was invalidated since `epoch` was read, is leased here or
    /// is being written.
    fn fill(&self, key: &TokenKey, epoch: u64, stored: StoredRecord, at: OffsetDateTime) {
        let bytes = stored.record.payload.len() + key_len(key) + ENTRY_OVERHEAD;
        let mut shard = write(self.shard(key));
        if shard.epoch != epoch {
            return;
        }
        if bytes > self.config.per_shard_bytes || self.config.per_shard_entries == 0 {
            shard.remove_entry(key);
            return;
        }
        let now = self.clock.now();
        if let Some(slot) = shard.map.get(key)
            && (slot.leased(now) || slot.writes > 0)
        {
            return;
        }
        shard.remove_entry(key);
        self.make_room(&mut shard, bytes);
        shard.entries += 1;
        shard.bytes += bytes;
        shard.map.entry(key.clone()).or_default().entry = Some(Entry { stored, at, bytes });
    }

    fn make_room(&self, shard: &mut Shard, bytes: usize) {
        while shard.entries > 0
            && (shard.entries + 1 > self.config.per_shard_entries
                || shard.bytes + bytes > self.config.per_shard_bytes)
        {
            let Some(victim) = shard
                .map
                .iter()
                .find(|(_, slot)| slot.entry.is_some())
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            shard.remove_entry(&victim);
            self.capacity_evictions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A write on `key` starts: evict it, keep loads from caching it until the write ends.
    /// Returns the epoch to pass to [`end_write`](Self::end_write).
    fn begin_write(&self, key: &TokenKey) -> u64 {
        let mut shard = write(self.shard(key));
        shard.epoch += 1;
        shard.remove_entry(key);
        shard.map.entry(key.clone()).or_default().writes += 1;
        shard.epoch
    }

    /// A write on `key` ended: cache what it wrote if nothing invalidated the key since it
    /// began (another write included), else evict.
    fn end_write(&self, key: &TokenKey, epoch: u64, written: Option<StoredRecord>) {
        let at = self.clock.now();
        {
            let mut shard = write(self.shard(key));
            if let Some(slot) = shard.map.get_mut(key) {
                slot.writes = slot.writes.saturating_sub(1);
            }
            if written.is_none() || shard.epoch != epoch {
                shard.epoch += 1;
                shard.remove_entry(key);
                return;
            }
            if let Some(slot) = shard.map.get(key)
                && slot.is_empty()
            {
                shard.map.remove(key);
            }
        }
        if let Some(stored) = written {
            self.fill(key, epoch, stored, at);
        }
    }

    fn mark_leased(&self, key: &TokenKey, lease: &Lease, ttl: Duration) {
        let now = self.clock.now();
        let mut shard = write(self.shard(key));
        shard.epoch += 1;
        shard.remove_entry(key);
        let slot = shard.map.entry(key.clone()).or_default();
        slot.leases.retain(|m| now < m.lapses_at);
        slot.leases.push(Mark {
            token: lease.token.clone(),
            lapses_at: later(now, ttl.saturating_mul(2)),
        });
    }

    fn extend_mark(&self, key: &TokenKey, token: &LeaseToken, ttl: Duration) {
        let now = self.clock.now();
        let mut shard = write(self.shard(key));
        if let Some(slot) = shard.map.get_mut(key)
            && let Some(mark) = slot.leases.iter_mut().find(|m| &m.token == token)
        {
            mark.lapses_at = later(now, ttl.saturating_mul(2));
        }
    }

    fn unmark(&self, key: &TokenKey, token: &LeaseToken) {
        let mut shard = write(self.shard(key));
        if let Some(slot) = shard.map.get_mut(key) {
            slot.leases.retain(|m| &m.token != token);
            if slot.is_empty() {
                shard.map.remove(key);
            }
        }
    }

    fn apply(&self, event: FeedEvent) {
        match event {
            FeedEvent::Changed(key) => {
                self.evict(&key);
                self.invalidations.fetch_add(1, Ordering::Release);
            }
            FeedEvent::ChangedAll => {
                self.flush();
                self.invalidations.fetch_add(1, Ordering::Release);
            }
            FeedEvent::Lost => self.lost(),
            FeedEvent::Subscribed => {
                // Cleared first: what was loaded before the subscription may have missed a
                // change. Loads from now on see every change reported.
                self.flush();
                self.feed_live.store(true, Ordering::Release);
                self.feed_subscriptions.fetch_add(1, Ordering::Release);
            }
        }
    }

    fn lost(&self) {
        // Down first, so that what is loaded from now on lives only for the TTL.
        self.feed_live.store(false, Ordering::Release);
        self.flush();
        self.feed_losses.fetch_add(1, Ordering::Release);
    }
}

/// `now + d`, saturating far in the future.
fn later(now: OffsetDateTime, d: Duration) -> OffsetDateTime {
    time::Duration::try_from(d)
        .ok()
        .and_then(|d| now.checked_add(d))
        .unwrap_or(time::macros::datetime!(9999-01-01 0:00 UTC))
}

/// A write through the cache under way: ends it (evicting the key) even when the caller drops
/// the write's future, so that a cancelled write never leaves the key bypassing the cache.
struct WriteGuard<'a> {
    shared: &'a Shared,
    key: &'a TokenKey,
    epoch: u64,
    ended: bool,
}

impl<'a> WriteGuard<'a> {
    fn begin(shared: &'a Shared, key: &'a TokenKey) -> Self {
        WriteGuard {
            shared,
            key,
            epoch: shared.begin_write(key),
            ended: false,
        }
    }

    fn end(mut self, written: Option<StoredRecord>) {
        self.ended = true;
        self.shared.end_write(self.key, self.epoch, written);
    }
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.end_write(self.key, self.epoch, None);
        }
    }
}

fn key_len(key: &TokenKey) -> usize {
    key.realm.as_str().len() + key.subject.as_str().len() + key.provider.as_str().len()
}

/// A read-through near cache in front of a shared [`TokenStore`] (see the [module
/// docs](crate::store::cached) for what is cached, the lease bypass and the staleness bound).
///
/// `Debug` shows the counters and the inner store, never a payload.
///
/// With PostgreSQL and its `LISTEN/NOTIFY` feed:
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn run() -> Result<(), tokenbroker::StoreError> {
/// use std::sync::Arc;
/// use tokenbroker::store::CachedStore;
/// use tokenbroker::{PostgresStore, TokenStore};
///
/// let pg = PostgresStore::connect("postgres://app@db.internal/app").await?;
/// let feed = pg.change_feed();
/// let store: Arc<dyn TokenStore> = Arc::new(CachedStore::with_change_feed(pg, feed));
/// # Ok(()) }
/// ```
pub struct CachedStore<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = self.stats();
        f.debug_struct("CachedStore")
            .field("inner", &self.inner)
            .field("entries", &stats.entries)
            .field("bytes", &stats.bytes)
            .field("feed_live", &stats.feed_live)
            .field("ttl", &self.shared.config.ttl)
            .field("max_age", &self.shared.config.max_age)
            .finish_non_exhaustive()
    }
}

/// Builds a [`CachedStore`] with other limits than the defaults.
///
/// ```
/// use std::time::Duration;
/// use tokenbroker::MemoryStore;
/// use tokenbroker::store::CachedStore;
///
/// let store = CachedStore::builder(MemoryStore::new())
///     .ttl(Duration::from_millis(250))
///     .max_age(Duration::from_secs(10))
///     .max_entries(50_000)
///     .max_bytes(32 << 20)
///     .build();
/// assert_eq!(store.stats().entries, 0);
/// ```
pub struct CachedStoreBuilder<S> {
    inner: S,
    ttl: Duration,
    max_age: Duration,
    max_entries: usize,
    max_bytes: usize,
    clock: SharedClock,
    feed: Option<Box<dyn ChangeFeed>>,
}

impl<S> fmt::Debug for CachedStoreBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStoreBuilder")
            .field("ttl", &self.ttl)
            .field("max_age", &self.max_age)
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("feed", &self.feed.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: TokenStore> CachedStoreBuilder<S> {
    /// How long an entry is served when no live feed would report its changes (no feed, or the
    /// feed is down): the staleness bound then. Default [`DEFAULT_TTL`] (1 s).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::builder(MemoryStore::new()).ttl(Duration::from_millis(100)).build();
    /// # drop(store);
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long an entry is served at most while the feed is live: a safety net for a
    /// connection that died unnoticed. Default [`DEFAULT_MAX_AGE`] (30 s). Never less than the
    /// TTL.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::builder(MemoryStore::new()).max_age(Duration::from_secs(5)).build();
    /// # drop(store);
    /// ```
    pub fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// The most records cached at once. Default [`DEFAULT_MAX_ENTRIES`]; 0 turns caching off.
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::builder(MemoryStore::new()).max_entries(1_000).build();
    /// # drop(store);
    /// ```
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// The most bytes of cached records (payloads plus a fixed overhead per entry). Default
    /// [`DEFAULT_MAX_BYTES`].
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::builder(MemoryStore::new()).max_bytes(8 << 20).build();
    /// # drop(store);
    /// ```
    pub fn max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The clock entries' ages are judged by (use a `ManualClock` in tests). Default: the
    /// system clock.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tokenbroker::{MemoryStore, SystemClock, store::CachedStore};
    /// let store = CachedStore::builder(MemoryStore::new()).clock(Arc::new(SystemClock)).build();
    /// # drop(store);
    /// ```
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Subscribes to `feed`: its events evict entries, and while it is live entries are served
    /// up to `max_age` instead of the TTL. The feed runs in a task spawned by
    /// [`build`](Self::build) on the current Tokio runtime, which ends when the store is
    /// dropped.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tokenbroker::MemoryStore;
    /// use tokenbroker::store::{CachedStore, FeedEvent};
    ///
    /// let (tx, rx) = tokio::sync::mpsc::channel::<FeedEvent>(64);
    /// let store = CachedStore::builder(MemoryStore::new()).change_feed(rx).build();
    /// # drop((tx, store));
    /// # }
    /// ```
    pub fn change_feed(mut self, feed: impl ChangeFeed) -> Self {
        self.feed = Some(Box::new(feed));
        self
    }

    /// Builds the store.
    ///
    /// # Panics
    ///
    /// With a change feed, outside a Tokio runtime (the feed's task is spawned on it).
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::builder(MemoryStore::new()).build();
    /// # drop(store);
    /// ```
    pub fn build(self) -> CachedStore<S> {
        let per_shard_entries = self.max_entries / SHARDS
            + usize::from(self.max_entries > 0 && self.max_entries < SHARDS);
        let (stop, stopped) = match self.feed {
            Some(_) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::default(),
            config: Config {
                ttl: self.ttl,
                max_age: self.max_age.max(self.ttl),
                // Below 16 entries, shards take turns: at most `max_entries` in all.
                per_shard_entries,
                per_shard_bytes: self.max_bytes / SHARDS,
            },
            clock: self.clock,
            feed_live: AtomicBool::new(false),
            has_feed: self.feed.is_some(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            feed_losses: AtomicU64::new(0),
            feed_subscriptions: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            capacity_evictions: AtomicU64::new(0),
            _stop: stop,
        });
        if let (Some(feed), Some(stopped)) = (self.feed, stopped) {
            tokio::spawn(run_feed(Arc::downgrade(&shared), feed, stopped));
        }
        CachedStore {
            inner: self.inner,
            shared,
        }
    }
}

/// The feed's task: applies its events until the cache is dropped or the feed ends.
async fn run_feed(
    shared: Weak<Shared>,
    mut feed: Box<dyn ChangeFeed>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let event = tokio::select! {
            biased;
            _ = &mut stopped => return,
            event = feed.next_event() => event,
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match event {
            Some(event) => shared.apply(event),
            None => {
                tracing::warn!(target: "tokenbroker", "cache change feed ended; entries now live for the TTL");
                shared.lost();
                return;
            }
        }
    }
}

impl<S: TokenStore> CachedStore<S> {
    /// A cache in front of `inner` without a change feed: entries are served for at most
    /// [`DEFAULT_TTL`] (1 s), the staleness bound.
    ///
    /// ```
    /// use tokenbroker::MemoryStore;
    /// use tokenbroker::store::CachedStore;
    ///
    /// let store = CachedStore::new(MemoryStore::new());
    /// assert!(!store.stats().feed_live);
    /// ```
    pub fn new(inner: S) -> Self {
        Self::builder(inner).build()
    }

    /// A cache in front of `inner`, invalidated by `feed` (e.g.
    /// [`PostgresStore::change_feed`](crate::PostgresStore::change_feed)), with the default
    /// limits.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tokenbroker::MemoryStore;
    /// use tokenbroker::store::{CachedStore, FeedEvent};
    ///
    /// let (tx, rx) = tokio::sync::mpsc::channel::<FeedEvent>(64);
    /// let store = CachedStore::with_change_feed(MemoryStore::new(), rx);
    /// # drop((tx, store));
    /// # }
    /// ```
    pub fn with_change_feed(inner: S, feed: impl ChangeFeed) -> Self {
        Self::builder(inner).change_feed(feed).build()
    }

    /// A builder, for other limits than the defaults.
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::builder(MemoryStore::new()).max_entries(100).build();
    /// # drop(store);
    /// ```
    pub fn builder(inner: S) -> CachedStoreBuilder<S> {
        CachedStoreBuilder {
            inner,
            ttl: DEFAULT_TTL,
            max_age: DEFAULT_MAX_AGE,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_bytes: DEFAULT_MAX_BYTES,
            clock: clock::system(),
            feed: None,
        }
    }
}

impl<S> CachedStore<S> {
    /// The store behind the cache. Writes made on it directly bypass the cache (and are seen
    /// here only through the feed or the TTL).
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::new(MemoryStore::new());
    /// assert!(store.inner().is_empty());
    /// ```
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The counters.
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::new(MemoryStore::new());
    /// assert_eq!(store.stats().hits, 0);
    /// ```
    pub fn stats(&self) -> CacheStats {
        let s = &self.shared;
        let (mut entries, mut bytes) = (0, 0);
        for shard in s.shards.iter() {
            let shard = read(shard);
            entries += shard.entries;
            bytes += shard.bytes;
        }
        CacheStats {
            entries,
            bytes,
            hits: s.hits.load(Ordering::Relaxed),
            misses: s.misses.load(Ordering::Relaxed),
            invalidations_received: s.invalidations.load(Ordering::Acquire),
            feed_losses: s.feed_losses.load(Ordering::Acquire),
            feed_subscriptions: s.feed_subscriptions.load(Ordering::Acquire),
            flushes: s.flushes.load(Ordering::Relaxed),
            capacity_evictions: s.capacity_evictions.load(Ordering::Relaxed),
            feed_live: s.feed_live.load(Ordering::Acquire),
        }
    }

    /// Whether the record of `key` is cached now (whether or not it is still young enough to
    /// be served).
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, TokenKey, store::CachedStore};
    /// let store = CachedStore::new(MemoryStore::new());
    /// let key = TokenKey::parse("realm", "user", "google").unwrap();
    /// assert!(!store.is_cached(&key));
    /// ```
    pub fn is_cached(&self, key: &TokenKey) -> bool {
        read(self.shared.shard(key))
            .map
            .get(key)
            .is_some_and(|slot| slot.entry.is_some())
    }

    /// Whether a change feed was configured.
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// assert!(!CachedStore::new(MemoryStore::new()).has_change_feed());
    /// ```
    pub fn has_change_feed(&self) -> bool {
        self.shared.has_feed
    }

    /// Drops every cached record.
    ///
    /// ```
    /// # use tokenbroker::{MemoryStore, store::CachedStore};
    /// let store = CachedStore::new(MemoryStore::new());
    /// store.clear();
    /// assert_eq!(store.stats().entries, 0);
    /// ```
    pub fn clear(&self) {
        self.shared.flush();
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: TokenStore> TokenStore for CachedStore<S> {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        let shared = &self.shared;
        let now = shared.clock.now();
        let (epoch, bypass) = {
            let shard = read(shared.shard(key));
            let mut bypass = false;
            if let Some(slot) = shard.map.get(key) {
                if slot.leased(now) || slot.writes > 0 {
                    bypass = true;
                } else if let Some(entry) = &slot.entry
                    && younger_than(entry.at, now, shared.limit())
                {
                    shared.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Some(entry.stored.clone()));
                }
            }
            (shard.epoch, bypass)
        };
        shared.misses.fetch_add(1, Ordering::Relaxed);
        let loaded = self.inner.load(key).await;
        if bypass {
            return loaded;
        }
        match &loaded {
            Ok(Some(stored)) => shared.fill(key, epoch, stored.clone(), now),
            // Gone (or unreadable): drop what may be cached; misses are not cached.
            Ok(None) | Err(_) => shared.forget(key),
        }
        loaded
    }

    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        let guard = WriteGuard::begin(&self.shared, key);
        let written = self.inner.insert(key, record).await;
        let cached = written
            .as_ref()
            .ok()
            .map(|v| StoredRecord::new(record.clone(), v.clone()));
        guard.end(cached);
        written
    }

    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let guard = WriteGuard::begin(&self.shared, key);
        let written = self
            .inner
            .compare_and_swap(key, expected, record, fence)
            .await;
        let cached = written
            .as_ref()
            .ok()
            .map(|v| StoredRecord::new(record.clone(), v.clone()));
        guard.end(cached);
        written
    }

    async fn delete(&self, key: &TokenKey, expected: Option<Version>) -> Result<bool, StoreError> {
        let guard = WriteGuard::begin(&self.shared, key);
        let deleted = self.inner.delete(key, expected).await;
        guard.end(None);
        deleted
    }

    async fn list(&self, realm: &Realm, subject: &Subject) -> Result<Vec<TokenKey>, StoreError> {
        self.inner.list(realm, subject).await
    }

    async fn scan(
        &self,
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage, StoreError> {
        self.inner.scan(cursor, limit).await
    }

    async fn try_lease(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        let attempt = self.inner.try_lease(key, holder, ttl).await;
        match &attempt {
            Ok(LeaseAttempt::Acquired(lease)) => self.shared.mark_leased(key, lease, ttl),
            // Busy: another instance is refreshing, the record is about to change; missing or
            // unknown: the cached record is wrong or may be. Either way the next load asks.
            _ => self.shared.evict(key),
        }
        attempt
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let released = self.inner.release_lease(lease).await;
        // Whatever the answer: the holder is done with the key (a lease that could not be
        // released expires in the store by itself).
        self.shared.unmark(&lease.key, &lease.token);
        released
    }

    async fn extend_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let extended = self.inner.extend_lease(lease, ttl).await;
        match &extended {
            Ok(Some(new)) => self.shared.extend_mark(&lease.key, &new.token, ttl),
            Ok(None) => {
                self.shared.unmark(&lease.key, &lease.token);
                self.shared.evict(&lease.key);
            }
            Err(_) => {}
        }
        extended
    }

    async fn delete_and_enqueue_revocation(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
        revocation: &PendingRevocation,
    ) -> Result<bool, StoreError> {
        let guard = WriteGuard::begin(&self.shared, key);
        let deleted = self
            .inner
            .delete_and_enqueue_revocation(key, expected, revocation)
            .await;
        guard.end(None);
        deleted
    }

    async fn enqueue_revocation(&self, revocation: &PendingRevocation) -> Result<(), StoreError> {
        self.inner.enqueue_revocation(revocation).await
    }

    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<PendingRevocation>, StoreError> {
        self.inner.claim_revocations(now, until, limit).await
    }

    async fn reschedule_revocation(
        &self,
        claimed: &PendingRevocation,
        due_at: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.inner.reschedule_revocation(claimed, due_at).await
    }

    async fn remove_revocation(&self, id: &RevocationId) -> Result<(), StoreError> {
        self.inner.remove_revocation(id).await
    }
}
