//! `CachedStore`: the conformance suite through the cache (memory, PostgreSQL and Redis with
//! their change feeds), two instances invalidating each other through one backend, the
//! engine reading the store (never the cache) under its lease, the TTL fallback while a feed
//! is down, and the memory bound.
//!
//! Loads that reach the store are counted by a wrapper under the cache. Nothing asserts on
//! wall-clock time: "B stopped serving the old record" is checked after B has *received* A's
//! notification (its counter), and time-to-live is moved with a `ManualClock`. The waits only
//! bound how long a broken feed can hang a test.
//!
//! PostgreSQL and Redis come from `TOKENBROKER_TEST_POSTGRES_URL` and
//! `TOKENBROKER_TEST_REDIS_URL` (scripts/test.sh starts both).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokenbroker::store::{
    CachedStore, FeedEvent, Lease, LeaseAttempt, LeaseHolder, LeaseToken, LinkState,
    PendingRevocation, Record, RecordMeta, RevocationId, StoreError, StoredRecord, Version,
};
use tokenbroker::testing::{FakeProvider, ManualClock};
use tokenbroker::{
    Caller, LoginOptions, MemoryStore, Payload, ProviderPolicy, Realm, Subject, TokenBroker,
    TokenKey, TokenStore,
};

/// Counts the loads that reach the store under the cache.
#[derive(Debug)]
struct Counting<S> {
    inner: S,
    loads: Arc<AtomicU64>,
}

impl<S> Counting<S> {
    fn new(inner: S) -> (Self, Arc<AtomicU64>) {
        let loads = Arc::new(AtomicU64::new(0));
        (
            Counting {
                inner,
                loads: loads.clone(),
            },
            loads,
        )
    }
}

#[async_trait]
impl<S: TokenStore> TokenStore for Counting<S> {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        self.inner.load(key).await
    }
    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        self.inner.insert(key, record).await
    }
    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        self.inner
            .compare_and_swap(key, expected.clone(), record, fence)
            .await
    }
    async fn delete(&self, key: &TokenKey, expected: Option<Version>) -> Result<bool, StoreError> {
        self.inner.delete(key, expected).await
    }
    async fn list(&self, realm: &Realm, subject: &Subject) -> Result<Vec<TokenKey>, StoreError> {
        self.inner.list(realm, subject).await
    }
    async fn scan(
        &self,
        cursor: Option<&tokenbroker::store::ScanCursor>,
        limit: usize,
    ) -> Result<tokenbroker::store::ScanPage, StoreError> {
        self.inner.scan(cursor, limit).await
    }
    async fn try_lease(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        self.inner.try_lease(key, holder, ttl).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release_lease(lease).await
    }
    async fn extend_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.inner.extend_lease(lease, ttl).await
    }
    async fn delete_and_enqueue_revocation(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
        revocation: &PendingRevocation,
    ) -> Result<bool, StoreError> {
        self.inner
            .delete_and_enqueue_revocation(key, expected, revocation)
            .await
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

fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap()
}

fn record(secret: &str) -> Record {
    let now = now_ms();
    Record::new(
        Payload::new(secret.as_bytes().to_vec()),
        RecordMeta::new(
            LinkState::Active,
            Some(now + Duration::from_secs(600)),
            now - Duration::from_secs(3600),
            now,
        ),
    )
}

fn relink_required(secret: &str) -> Record {
    let now = now_ms();
    Record::new(
        Payload::new(secret.as_bytes().to_vec()),
        RecordMeta::new(
            LinkState::RelinkRequired {
                reason: "invalid_grant".into(),
                since: now,
            },
            None,
            now - Duration::from_secs(3600),
            now,
        ),
    )
}

fn unique_key(tag: &str) -> TokenKey {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    TokenKey::parse(
        "acme",
        &format!("{tag}-{}-{n}", std::process::id()),
        "google",
    )
    .unwrap()
}

/// Waits until `cond` holds; panics after 20 s (a feed that never delivers), never asserts on
/// how long it took.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

fn bytes(stored: &StoredRecord) -> &[u8] {
    stored.record.payload.expose_secret()
}

// ---------------------------------------------------------------------------------------------
// Memory: the conformance suite, reads, writes, leases, TTL, feed states, bounds.

mod conformance_memory {
    use std::sync::Arc;
    use tokenbroker::store::CachedStore;
    use tokenbroker::{MemoryStore, TokenStore};

    tokenbroker::store_conformance_tests!(async {
        Arc::new(CachedStore::new(MemoryStore::new())) as Arc<dyn TokenStore>
    });
}

#[tokio::test]
async fn a_fresh_read_costs_no_round_trip_and_shares_the_payload() {
    let (counting, loads) = Counting::new(MemoryStore::new());
    let cache = CachedStore::new(counting);
    let k = unique_key("fresh");
    cache
        .inner()
        .inner
        .insert(&k, &record("one"))
        .await
        .unwrap();
    let first = cache.load(&k).await.unwrap().unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    for _ in 0..100 {
        let again = cache.load(&k).await.unwrap().unwrap();
        assert_eq!(again.version, first.version);
        assert_eq!(bytes(&again), b"one");
    }
    assert_eq!(
        loads.load(Ordering::SeqCst),
        1,
        "cached reads reach the store"
    );
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.misses), (100, 1));
    // A missing key is not cached: a link made elsewhere shows up at once.
    let missing = unique_key("missing");
    assert!(cache.load(&missing).await.unwrap().is_none());
    assert!(cache.load(&missing).await.unwrap().is_none());
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    cache
        .inner()
        .inner
        .insert(&missing, &record("new"))
        .await
        .unwrap();
    assert!(cache.load(&missing).await.unwrap().is_some());
}

#[tokio::test]
async fn writes_go_through_and_update_or_evict() {
    let (counting, loads) = Counting::new(MemoryStore::new());
    let cache = CachedStore::new(counting);
    let k = unique_key("writes");
    let v1 = cache.insert(&k, &record("one")).await.unwrap();
    // The insert cached what it wrote.
    let got = cache.load(&k).await.unwrap().unwrap();
    assert_eq!(
        (got.version.clone(), bytes(&got)),
        (v1.clone(), &b"one"[..])
    );
    assert_eq!(loads.load(Ordering::SeqCst), 0);
    let v2 = cache
        .compare_and_swap(&k, v1.clone(), &record("two"), None)
        .await
        .unwrap();
    let got = cache.load(&k).await.unwrap().unwrap();
    assert_eq!(
        (got.version.clone(), bytes(&got)),
        (v2.clone(), &b"two"[..])
    );
    assert_eq!(loads.load(Ordering::SeqCst), 0);
    // A conflict evicts: the next read asks the store.
    assert!(matches!(
        cache
            .compare_and_swap(&k, v1.clone(), &record("x"), None)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(!cache.is_cached(&k));
    assert_eq!(cache.load(&k).await.unwrap().unwrap().version, v2.clone());
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    // A write behind the cache's back is not seen until the TTL (no feed here) ...
    let v3 = cache
        .inner()
        .inner
        .compare_and_swap(&k, v2.clone(), &record("three"), None)
        .await
        .unwrap();
    assert_eq!(cache.load(&k).await.unwrap().unwrap().version, v2.clone());
    // ... but a write through the cache on the stale version conflicts and evicts.
    assert!(
        cache
            .compare_and_swap(&k, v2.clone(), &record("y"), None)
            .await
            .is_err()
    );
    assert_eq!(cache.load(&k).await.unwrap().unwrap().version, v3.clone());
    // Delete evicts.
    assert!(cache.delete(&k, Some(v3.clone())).await.unwrap());
    assert!(!cache.is_cached(&k));
    assert!(cache.load(&k).await.unwrap().is_none());
}

/// Under a lease taken through the cache every load reaches the store, until the release.
#[tokio::test]
async fn loads_under_a_lease_taken_here_reach_the_store() {
    let (counting, loads) = Counting::new(MemoryStore::new());
    let cache = CachedStore::new(counting);
    let k = unique_key("lease");
    let v1 = cache.insert(&k, &record("one")).await.unwrap();
    cache.load(&k).await.unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 0);

    let holder = LeaseHolder::random();
    let LeaseAttempt::Acquired(lease) = cache
        .try_lease(&k, &holder, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("lease not taken");
    };
    assert!(!cache.is_cached(&k), "the lease evicts the key");
    // Another instance writes meanwhile (behind this cache).
    let v2 = cache
        .inner()
        .inner
        .compare_and_swap(&k, v1.clone(), &record("two"), None)
        .await
        .unwrap();
    for i in 1..=3 {
        let got = cache.load(&k).await.unwrap().unwrap();
        assert_eq!(
            got.version.clone(),
            v2,
            "the engine sees the store under the lease"
        );
        assert_eq!(loads.load(Ordering::SeqCst), i);
        assert!(!cache.is_cached(&k), "nothing is cached under the lease");
    }
    // A fenced write under the lease, then the release: caching resumes.
    let v3 = cache
        .compare_and_swap(&k, v2.clone(), &record("three"), Some(&lease.token))
        .await
        .unwrap();
    assert_eq!(cache.load(&k).await.unwrap().unwrap().version, v3.clone());
    assert_eq!(loads.load(Ordering::SeqCst), 4);
    cache.release_lease(&lease).await.unwrap();
    assert_eq!(cache.load(&k).await.unwrap().unwrap().version, v3.clone());
    assert_eq!(cache.load(&k).await.unwrap().unwrap().version, v3.clone());
    assert_eq!(
        loads.load(Ordering::SeqCst),
        5,
        "cached again after the release"
    );

    // A busy lease (another instance refreshing) evicts too, so the waiting engine re-reads.
    let LeaseAttempt::Acquired(theirs) = cache
        .inner()
        .inner
        .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("lease not taken");
    };
    assert!(cache.is_cached(&k));
    assert_eq!(
        cache
            .try_lease(&k, &holder, Duration::from_secs(30))
            .await
            .unwrap(),
        LeaseAttempt::Busy
    );
    assert!(!cache.is_cached(&k));
    cache.inner().inner.release_lease(&theirs).await.unwrap();

    // An extension that finds the lease taken over ends the bypass too.
    let LeaseAttempt::Acquired(mine) = cache
        .try_lease(&k, &holder, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("lease not taken");
    };
    cache.inner().inner.release_lease(&mine).await.unwrap();
    assert_eq!(
        cache
            .extend_lease(&mine, Duration::from_secs(30))
            .await
            .unwrap(),
        None
    );
    cache.load(&k).await.unwrap();
    let before = loads.load(Ordering::SeqCst);
    cache.load(&k).await.unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), before, "cached again");
}

#[tokio::test]
async fn without_a_feed_entries_live_for_the_ttl() {
    let clock = Arc::new(ManualClock::starting_now());
    let (counting, loads) = Counting::new(MemoryStore::new());
    let cache = CachedStore::builder(counting)
        .ttl(Duration::from_secs(1))
        .clock(clock.clone())
        .build();
    let k = unique_key("ttl");
    cache
        .inner()
        .inner
        .insert(&k, &record("one"))
        .await
        .unwrap();
    cache.load(&k).await.unwrap();
    clock.advance(Duration::from_millis(900));
    cache.load(&k).await.unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    clock.advance(Duration::from_millis(200));
    cache.load(&k).await.unwrap();
    assert_eq!(
        loads.load(Ordering::SeqCst),
        2,
        "older than the TTL: reloaded"
    );
}

/// With a live feed entries live up to `max_age`; a lost feed clears the cache and falls back
/// to the TTL; a new subscription clears it again. Driven by a feed of our own.
#[tokio::test]
async fn feed_states_switch_between_max_age_and_ttl() {
    let clock = Arc::new(ManualClock::starting_now());
    let (counting, loads) = Counting::new(MemoryStore::new());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let cache = CachedStore::builder(counting)
        .ttl(Duration::from_secs(1))
        .max_age(Duration::from_secs(30))
        .clock(clock.clone())
        .change_feed(rx)
        .build();
    assert!(cache.has_change_feed());
    let k = unique_key("feed");
    cache
        .inner()
        .inner
        .insert(&k, &record("one"))
        .await
        .unwrap();
    let count = || loads.load(Ordering::SeqCst);

    // Not subscribed yet: the TTL applies.
    assert!(!cache.stats().feed_live);
    tx.send(FeedEvent::Subscribed).await.unwrap();
    wait_until("subscribed", || cache.stats().feed_live).await;
    cache.load(&k).await.unwrap();
    clock.advance(Duration::from_secs(10));
    cache.load(&k).await.unwrap();
    assert_eq!(count(), 1, "a live feed serves past the TTL");
    clock.advance(Duration::from_secs(21));
    cache.load(&k).await.unwrap();
    assert_eq!(count(), 2, "never past max_age");

    // A change evicts the key.
    tx.send(FeedEvent::Changed(k.clone())).await.unwrap();
    wait_until("invalidated", || cache.stats().invalidations_received == 1).await;
    assert!(!cache.is_cached(&k));
    cache.load(&k).await.unwrap();
    assert_eq!(count(), 3);

    // Lost: cleared, then the TTL.
    tx.send(FeedEvent::Lost).await.unwrap();
    wait_until("lost", || cache.stats().feed_losses == 1).await;
    let stats = cache.stats();
    assert!(!stats.feed_live);
    assert_eq!(stats.entries, 0, "cleared when the feed was lost");
    cache.load(&k).await.unwrap();
    assert_eq!(count(), 4);
    clock.advance(Duration::from_secs(2));
    cache.load(&k).await.unwrap();
    assert_eq!(
        count(),
        5,
        "while the feed is down, nothing older than the TTL"
    );

    // Back: cleared again (changes may have been missed), then max_age.
    tx.send(FeedEvent::Subscribed).await.unwrap();
    wait_until("resubscribed", || cache.stats().feed_subscriptions == 2).await;
    assert_eq!(cache.stats().entries, 0);
    cache.load(&k).await.unwrap();
    clock.advance(Duration::from_secs(2));
    cache.load(&k).await.unwrap();
    assert_eq!(count(), 6);

    // ChangedAll clears everything.
    tx.send(FeedEvent::ChangedAll).await.unwrap();
    wait_until("flushed", || cache.stats().invalidations_received == 2).await;
    assert_eq!(cache.stats().entries, 0);

    // Dropping the cache ends the feed's task (it drops the receiver).
    drop(cache);
    tokio::time::timeout(Duration::from_secs(20), tx.closed())
        .await
        .expect("the feed's task ended with the cache");
}

#[tokio::test]
async fn memory_stays_bounded() {
    let cache = CachedStore::builder(MemoryStore::new())
        .max_entries(100)
        .build();
    for i in 0..1000 {
        let k = TokenKey::parse("acme", &format!("u{i}"), "google").unwrap();
        cache.insert(&k, &record("x")).await.unwrap();
        cache.load(&k).await.unwrap();
    }
    let stats = cache.stats();
    assert!(
        stats.entries <= 100 && stats.entries >= 50,
        "{} entries",
        stats.entries
    );
    assert!(stats.capacity_evictions >= 900);
    assert_eq!(cache.inner().len(), 1000, "the store keeps everything");

    // Bytes: 16 shards of 64 KiB; 10 KiB records.
    let cache = CachedStore::builder(MemoryStore::new())
        .max_bytes(16 * 64 * 1024)
        .build();
    let big = "x".repeat(10 * 1024);
    for i in 0..1000 {
        let k = TokenKey::parse("acme", &format!("u{i}"), "google").unwrap();
        cache.insert(&k, &record(&big)).await.unwrap();
    }
    let stats = cache.stats();
    assert!(stats.bytes <= 16 * 64 * 1024, "{} bytes", stats.bytes);
    assert!(stats.entries > 0);
    // A record larger than a shard's share is not cached at all.
    let huge = "x".repeat(100 * 1024);
    let k = unique_key("huge");
    cache.insert(&k, &record(&huge)).await.unwrap();
    cache.load(&k).await.unwrap();
    assert!(!cache.is_cached(&k));
}

#[tokio::test]
async fn debug_shows_no_payload() {
    let cache = CachedStore::new(MemoryStore::new());
    let k = unique_key("debug");
    cache.insert(&k, &record("top-secret-token")).await.unwrap();
    cache.load(&k).await.unwrap();
    let debug = format!("{cache:?}");
    assert!(!debug.contains("top-secret"), "{debug}");
    assert!(debug.contains("entries: 1"), "{debug}");
}

// ---------------------------------------------------------------------------------------------
// Brokers on top: the engine reads the store under its lease, never the cache.

fn caller(key: &TokenKey) -> Caller {
    Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope()
}

fn broker(
    idp: &Arc<FakeProvider>,
    clock: &Arc<ManualClock>,
    store: Arc<dyn TokenStore>,
) -> TokenBroker {
    TokenBroker::builder()
        .with_provider(idp.clone(), ProviderPolicy::default())
        .with_store(store)
        .with_clock(clock.clone())
        .with_refresh_timeout(Duration::from_millis(2000))
        .with_lease_ttl(Duration::from_millis(2000) + tokenbroker::LEASE_MARGIN)
        .build()
        .unwrap()
}

/// Two brokers, each on its own `CachedStore` (no feed, a TTL far longer than the test) over
/// one backend. Both have the link cached; it expires; A refreshes (the provider rotates and
/// revokes the grant on reuse); B still holds the old record, with the spent refresh token, in
/// its cache. B's refresh takes the lease, which sends its loads to the store: it finds A's
/// tokens and never presents the spent one.
async fn engine_under_lease_reads_the_store(backend: Arc<dyn TokenStore>) {
    let clock = Arc::new(ManualClock::starting_now());
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    idp.set_rotation(true);
    idp.set_strict_reuse(true);
    let cached = |clock: &Arc<ManualClock>| -> Arc<dyn TokenStore> {
        Arc::new(
            CachedStore::builder(backend.clone())
                .ttl(Duration::from_secs(30 * 24 * 3600))
                .clock(clock.clone())
                .build(),
        )
    };
    let a = broker(&idp, &clock, cached(&clock));
    let b = broker(&idp, &clock, cached(&clock));
    let key = TokenKey::parse("acme", unique_key("engine").subject.as_str(), "fake").unwrap();
    let start = a.begin_login(&key, LoginOptions::default()).await.unwrap();
    let callback = idp.approve(&start.authorization_url, "alice").unwrap();
    a.complete_login(start.pending, &callback).await.unwrap();
    let who = caller(&key);
    let first_a = a.retrieve(&who, &key).await.unwrap();
    let first_b = b.retrieve(&who, &key).await.unwrap();
    assert_eq!(
        first_a.tokens.access_token().expose_secret(),
        first_b.tokens.access_token().expose_secret()
    );

    clock.advance(Duration::from_secs(3600 + 1));
    let on_a = a.retrieve(&who, &key).await.unwrap();
    let on_b = b.retrieve(&who, &key).await.unwrap();
    let counters = idp.counters();
    assert_eq!(counters.refresh_calls, 1, "{counters:?}");
    assert_eq!(counters.reuse_detected, 0, "{counters:?}");
    assert_eq!(
        on_a.tokens.access_token().expose_secret(),
        on_b.tokens.access_token().expose_secret(),
        "B serves A's refreshed tokens"
    );
    assert!(idp.is_active(on_b.tokens.access_token().expose_secret()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_under_lease_reads_the_store_memory() {
    engine_under_lease_reads_the_store(Arc::new(MemoryStore::new())).await;
}

// ---------------------------------------------------------------------------------------------
// Two instances over one backend, with their feeds.

/// A on one instance, B on another, both over one backend with their own feeds. A inserts,
/// refreshes (a new version), marks the link relink-required and unlinks it; after each, once
/// B has received A's notification, B's next load returns the new state; a fresh read on B
/// costs no round trip.
async fn two_instances_invalidate_each_other<S: TokenStore>(
    a: CachedStore<Counting<S>>,
    b: CachedStore<Counting<S>>,
    b_loads: Arc<AtomicU64>,
) {
    wait_until("A's feed is subscribed", || a.stats().feed_live).await;
    wait_until("B's feed is subscribed", || b.stats().feed_live).await;
    let k = unique_key("two");
    let count = || b_loads.load(Ordering::SeqCst);
    let received = |n: u64| {
        let b = &b;
        move || b.stats().invalidations_received >= n
    };

    let v1 = a.insert(&k, &record("one")).await.unwrap();
    wait_until("B received the insert", received(1)).await;
    let got = b.load(&k).await.unwrap().unwrap();
    assert_eq!(
        (got.version.clone(), bytes(&got)),
        (v1.clone(), &b"one"[..])
    );
    assert_eq!(count(), 1);
    for _ in 0..10 {
        assert_eq!(b.load(&k).await.unwrap().unwrap().version, v1.clone());
    }
    assert_eq!(count(), 1, "a fresh read costs no round trip");

    // A refresh on A: a new version.
    let v2 = a
        .compare_and_swap(&k, v1.clone(), &record("two"), None)
        .await
        .unwrap();
    wait_until("B received the refresh", received(2)).await;
    let got = b.load(&k).await.unwrap().unwrap();
    assert_eq!(
        (got.version.clone(), bytes(&got)),
        (v2.clone(), &b"two"[..])
    );
    assert_eq!(count(), 2);
    b.load(&k).await.unwrap();
    assert_eq!(count(), 2);

    // Relink required on A.
    let v3 = a
        .compare_and_swap(&k, v2.clone(), &relink_required("two"), None)
        .await
        .unwrap();
    wait_until("B received the relink mark", received(3)).await;
    let got = b.load(&k).await.unwrap().unwrap();
    assert_eq!(got.version.clone(), v3);
    assert!(got.record.meta.state.is_relink_required());
    assert_eq!(count(), 3);

    // A lease taken and released on A is no change: B keeps its entry.
    let LeaseAttempt::Acquired(lease) = a
        .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("lease not taken");
    };
    a.release_lease(&lease).await.unwrap();

    // Unlink on A.
    assert!(a.delete(&k, Some(v3.clone())).await.unwrap());
    wait_until("B received the unlink", received(4)).await;
    assert!(b.load(&k).await.unwrap().is_none());
    assert_eq!(count(), 4);
    assert_eq!(
        b.stats().invalidations_received,
        4,
        "lease-only updates send nothing"
    );
}

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use std::str::FromStr;
    use tokenbroker::PostgresStore;
    use tokenbroker::store::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
    use tokenbroker::store::sqlx::{self, AssertSqlSafe};

    fn server_url() -> String {
        std::env::var("TOKENBROKER_TEST_POSTGRES_URL")
            .expect("TOKENBROKER_TEST_POSTGRES_URL is not set: run scripts/test.sh")
    }

    /// A fresh schema; its stores' connections carry `application_name` = the schema, so that
    /// a test can find its own feed's connection.
    pub(crate) struct TestDb {
        url: String,
        pub(crate) schema: String,
    }

    impl TestDb {
        pub(crate) async fn new() -> Self {
            let url = server_url();
            let schema = format!("c_{}", unique_key("s").subject.as_str().replace('-', "_"));
            let admin = PgPool::connect(&url).await.unwrap();
            sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            TestDb { url, schema }
        }

        pub(crate) async fn open(&self) -> PostgresStore {
            let options = PgConnectOptions::from_str(&self.url)
                .unwrap()
                .options([("search_path", self.schema.as_str())])
                .application_name(&self.schema);
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect_with(options)
                .await
                .unwrap();
            let store = PostgresStore::from_pool(pool);
            store.migrate().await.unwrap();
            store
        }

        pub(crate) async fn admin(&self) -> PgPool {
            PgPool::connect(&self.url).await.unwrap()
        }
    }

    pub(crate) async fn instance(
        db: &TestDb,
    ) -> (CachedStore<Counting<PostgresStore>>, Arc<AtomicU64>) {
        let store = db.open().await;
        let feed = store.change_feed();
        let (counting, loads) = Counting::new(store);
        (CachedStore::with_change_feed(counting, feed), loads)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_with_feed() {
        let db = TestDb::new().await;
        let store = db.open().await;
        let feed = store.change_feed();
        let cache = CachedStore::with_change_feed(store, feed);
        wait_until("subscribed", || cache.stats().feed_live).await;
        let store: Arc<dyn TokenStore> = Arc::new(cache);
        tokenbroker::testing::store_conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances() {
        let db = TestDb::new().await;
        let (a, _) = instance(&db).await;
        let (b, b_loads) = instance(&db).await;
        two_instances_invalidate_each_other(a, b, b_loads).await;
    }

    /// Another schema's changes on the same server are not this feed's business.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn other_schemas_do_not_invalidate() {
        let db = TestDb::new().await;
        let other = TestDb::new().await;
        let (a, _) = instance(&db).await;
        wait_until("subscribed", || a.stats().feed_live).await;
        let theirs = other.open().await;
        let k = unique_key("other");
        theirs.insert(&k, &record("x")).await.unwrap();
        // Then one of ours: once it arrived, the other schema's (sent before) was seen too.
        let mine = db.open().await;
        mine.insert(&k, &record("y")).await.unwrap();
        wait_until("ours received", || a.stats().invalidations_received >= 1).await;
        assert_eq!(a.stats().invalidations_received, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_under_lease_reads_the_store_postgres() {
        let db = TestDb::new().await;
        engine_under_lease_reads_the_store(Arc::new(db.open().await)).await;
    }

    /// The feed's connection ended by an administrator: lost (cache cleared, TTL), then back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn feed_lost_and_back() {
        let db = TestDb::new().await;
        let (a, _) = instance(&db).await;
        let (b, _) = instance(&db).await;
        wait_until("subscribed", || b.stats().feed_live).await;
        let k = unique_key("lost");
        a.insert(&k, &record("one")).await.unwrap();
        wait_until("insert received", || b.stats().invalidations_received >= 1).await;
        b.load(&k).await.unwrap();
        assert!(b.is_cached(&k));

        let admin = db.admin().await;
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        )
        .bind(&db.schema)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert_eq!(killed, vec![true, true], "both feeds' connections ended");
        wait_until("B lost its feed", || b.stats().feed_losses >= 1).await;
        // Cleared on the loss (and again on the new subscription).
        assert!(!b.is_cached(&k));
        wait_until("B subscribed again", || b.stats().feed_subscriptions >= 2).await;
        // And notifications flow again.
        let seen = b.stats().invalidations_received;
        let v = b.load(&k).await.unwrap().unwrap().version;
        a.compare_and_swap(&k, v.clone(), &record("two"), None)
            .await
            .unwrap();
        wait_until("change after reconnect", || {
            b.stats().invalidations_received > seen
        })
        .await;
        assert_eq!(bytes(&b.load(&k).await.unwrap().unwrap()), b"two");
        admin.close().await;
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use tokenbroker::RedisStore;

    fn server_url() -> String {
        std::env::var("TOKENBROKER_TEST_REDIS_URL")
            .expect("TOKENBROKER_TEST_REDIS_URL is not set: run scripts/test.sh")
    }

    fn unique_prefix() -> String {
        format!("cached-{}", unique_key("p").subject.as_str())
    }

    async fn open(prefix: &str) -> RedisStore {
        RedisStore::connect(&server_url())
            .await
            .unwrap()
            .with_prefix(prefix)
    }

    async fn instance(prefix: &str) -> (CachedStore<Counting<RedisStore>>, Arc<AtomicU64>) {
        let store = open(prefix).await;
        let feed = store.change_feed().unwrap();
        let (counting, loads) = Counting::new(store);
        (CachedStore::with_change_feed(counting, feed), loads)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_with_feed() {
        let store = open(&unique_prefix()).await;
        let feed = store.change_feed().unwrap();
        let cache = CachedStore::with_change_feed(store, feed);
        wait_until("subscribed", || cache.stats().feed_live).await;
        let store: Arc<dyn TokenStore> = Arc::new(cache);
        tokenbroker::testing::store_conformance::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances() {
        let prefix = unique_prefix();
        let (a, _) = instance(&prefix).await;
        let (b, b_loads) = instance(&prefix).await;
        two_instances_invalidate_each_other(a, b, b_loads).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_under_lease_reads_the_store_redis() {
        engine_under_lease_reads_the_store(Arc::new(open(&unique_prefix()).await)).await;
    }

    #[tokio::test]
    async fn a_feed_needs_a_client() {
        use tokenbroker::store::redis::{Client, aio::ConnectionManager};
        let client = Client::open(server_url()).unwrap();
        let manager = ConnectionManager::new(client.clone()).await.unwrap();
        let store = RedisStore::from_manager(manager);
        assert!(store.change_feed().is_err());
        let store = store.with_client(client);
        assert!(store.change_feed().is_ok());
    }
}
