//! EncryptedStore: round trip, what the inner store sees, tampering, row binding, rotation and
//! rewrap (including a rewrap racing a writer), key configuration and redaction.
#![cfg(feature = "encryption")]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use time::macros::datetime;
use tokenbroker::store::{
    DataKey, EncryptedStore, KeyError, KeyId, KeyProvider, KeyringError, Lease, LeaseAttempt,
    LeaseHolder, LeaseToken, LinkState, Record, RecordMeta, ScannedLink, StaticKeyring,
    StoredRecord, Version, WrappedKey, key_id_of,
};
use tokenbroker::testing::ManualClock;
use tokenbroker::{
    MemoryStore, Payload, Realm, Secret, StoreError, Subject, TokenKey, TokenSet, TokenStore,
};

const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x22; 32];

fn id(s: &str) -> KeyId {
    KeyId::new(s).unwrap()
}

fn key(subject: &str) -> TokenKey {
    TokenKey::parse("acme", subject, "google").unwrap()
}

fn ring_k1() -> Arc<dyn KeyProvider> {
    Arc::new(StaticKeyring::new(id("k1"), K1))
}

/// k2 primary, k1 kept for old records.
fn ring_k2() -> Arc<dyn KeyProvider> {
    Arc::new(
        StaticKeyring::new(id("k1"), K1)
            .with_key(id("k2"), K2)
            .unwrap()
            .with_primary(&id("k2"))
            .unwrap(),
    )
}

fn token_set(access: &str) -> TokenSet {
    TokenSet::new(Secret::new(access), datetime!(2026-01-01 0:00 UTC))
        .with_refresh_token(Secret::new(format!("{access}-refresh")))
        .with_expires_at(datetime!(2026-01-01 1:00 UTC))
}

fn record(access: &str) -> Record {
    let set = token_set(access);
    let now = datetime!(2026-01-01 0:00 UTC);
    Record::new(
        set.to_payload(),
        RecordMeta::new(LinkState::Active, set.expires_at(), now, now),
    )
}

fn access_token(stored: &StoredRecord) -> String {
    TokenSet::from_payload(&stored.record.payload)
        .unwrap()
        .access_token()
        .expose_secret()
        .to_owned()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The reason of a `Corrupt` load; fails the test on anything else.
#[track_caller]
fn corrupt_reason(result: Result<Option<StoredRecord>, StoreError>) -> String {
    match result {
        Err(StoreError::Corrupt { reason, .. }) => reason,
        Err(other) => panic!("expected Corrupt, got {other:?}"),
        Ok(got) => panic!("expected Corrupt, got Ok({got:?})"),
    }
}

async fn raw(inner: &MemoryStore, key: &TokenKey) -> StoredRecord {
    inner
        .load(key)
        .await
        .unwrap()
        .expect("record in the inner store")
}

/// Replaces the inner record's payload with `bytes`, keeping its meta.
async fn put_raw(inner: &MemoryStore, key: &TokenKey, bytes: Vec<u8>) {
    let current = inner.load(key).await.unwrap();
    let meta = record("x").meta;
    let rec = Record::new(Payload::new(bytes), meta);
    match current {
        Some(c) => inner
            .compare_and_swap(key, c.version, &rec, None)
            .await
            .unwrap(),
        None => inner.insert(key, &rec).await.unwrap(),
    };
}

#[tokio::test]
async fn round_trip_keeps_payload_meta_and_versions() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), ring_k1());
    let k = key("alice");
    let written = record("at-round-trip");

    let v1 = store.insert(&k, &written).await.unwrap();
    let loaded = store.load(&k).await.unwrap().unwrap();
    assert_eq!(loaded.version.clone(), v1);
    assert_eq!(
        loaded.record.payload.expose_secret(),
        written.payload.expose_secret()
    );
    assert_eq!(loaded.record.meta, written.meta);
    assert_eq!(access_token(&loaded), "at-round-trip");

    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record("at-second"), None)
        .await
        .unwrap();
    assert_ne!(v1, v2);
    assert_eq!(
        access_token(&store.load(&k).await.unwrap().unwrap()),
        "at-second"
    );
    assert!(matches!(
        store
            .compare_and_swap(&k, v1.clone(), &record("stale"), None)
            .await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.insert(&k, &record("dup")).await,
        Err(StoreError::Conflict { .. })
    ));

    // Pass-through: versions, meta in scan, list, leases, delete, missing keys.
    let scanned = store.scan(None, 10).await.unwrap().links;
    assert_eq!(scanned.len(), 1);
    assert_eq!(scanned[0].version, v2);
    assert_eq!(scanned[0].meta, written.meta);
    assert_eq!(
        store.list(&k.realm, &k.subject).await.unwrap(),
        vec![k.clone()]
    );
    let holder = LeaseHolder::new("test");
    let LeaseAttempt::Acquired(lease) = store
        .try_lease(&k, &holder, Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("lease not acquired");
    };
    assert_eq!(
        store
            .try_lease(&k, &holder, Duration::from_secs(30))
            .await
            .unwrap(),
        LeaseAttempt::Busy
    );
    store.release_lease(&lease).await.unwrap();
    assert!(store.load(&key("nobody")).await.unwrap().is_none());
    assert!(store.delete(&k, Some(v2.clone())).await.unwrap());
    assert!(store.load(&k).await.unwrap().is_none());
    assert!(inner.is_empty());
}

#[tokio::test]
async fn inner_store_never_sees_the_plaintext() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), ring_k1());
    let k = key("alice");
    let written = record("at-very-secret-access-token");
    store.insert(&k, &written).await.unwrap();

    let stored = raw(&inner, &k).await;
    let bytes = stored.record.payload.expose_secret();
    assert!(!contains(bytes, b"at-very-secret-access-token"));
    assert!(!contains(bytes, b"refresh"));
    // No 8-byte run of the plaintext survives.
    let plain = written.payload.expose_secret();
    assert!(plain.windows(8).all(|w| !contains(bytes, w)));
    // The meta stays plain on purpose: stores index it.
    assert_eq!(stored.record.meta, written.meta);
    assert_eq!(key_id_of(&stored), Some(id("k1")));

    // Two writes of the same plaintext differ (fresh data key and nonce each time).
    let k2 = key("bob");
    store.insert(&k2, &written).await.unwrap();
    assert_ne!(raw(&inner, &k2).await.record.payload.expose_secret(), bytes);
}

#[tokio::test]
async fn a_ciphertext_moved_to_another_row_is_corrupt() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), ring_k1());
    let from = TokenKey::parse("acme", "alice", "google").unwrap();
    store.insert(&from, &record("at-alice")).await.unwrap();
    let bytes = raw(&inner, &from)
        .await
        .record
        .payload
        .expose_secret()
        .to_vec();

    // Each part of the key matters, and boundaries between parts cannot shift.
    for (realm, subject, provider) in [
        ("other", "alice", "google"),
        ("acme", "mallory", "google"),
        ("acme", "alice", "github"),
        ("acmealice", "x", "google"),
        ("acm", "ealice", "google"),
    ] {
        let to = TokenKey::new(
            Realm::new(realm).unwrap(),
            Subject::new(subject).unwrap(),
            tokenbroker::ProviderId::new(provider).unwrap(),
        );
        put_raw(&inner, &to, bytes.clone()).await;
        let reason = corrupt_reason(store.load(&to).await);
        assert!(reason.contains("failed authentication"), "{to}: {reason}");
    }
    // The original row still reads.
    assert_eq!(
        access_token(&store.load(&from).await.unwrap().unwrap()),
        "at-alice"
    );
}

#[tokio::test]
async fn every_flipped_byte_and_every_truncation_is_corrupt() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), ring_k1());
    let k = key("alice");
    store.insert(&k, &record("at")).await.unwrap();
    let good = raw(&inner, &k)
        .await
        .record
        .payload
        .expose_secret()
        .to_vec();

    for i in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            put_raw(&inner, &k, bad).await;
            corrupt_reason(store.load(&k).await);
        }
    }
    for len in 0..good.len() {
        put_raw(&inner, &k, good[..len].to_vec()).await;
        corrupt_reason(store.load(&k).await);
    }
    let mut longer = good.clone();
    longer.push(0);
    put_raw(&inner, &k, longer).await;
    corrupt_reason(store.load(&k).await);

    // A plain (unencrypted) payload is refused, not passed through.
    put_raw(
        &inner,
        &k,
        token_set("at-plain").to_payload().expose_secret().to_vec(),
    )
    .await;
    let reason = corrupt_reason(store.load(&k).await);
    assert!(reason.contains("not encrypted"), "{reason}");
    assert!(!reason.contains("at-plain"));

    // The untouched bytes still decrypt: the loop above proved something.
    put_raw(&inner, &k, good).await;
    assert_eq!(access_token(&store.load(&k).await.unwrap().unwrap()), "at");
}

#[tokio::test]
async fn an_unknown_key_id_is_corrupt() {
    let inner = Arc::new(MemoryStore::new());
    let k = key("alice");
    EncryptedStore::new(inner.clone(), ring_k1())
        .insert(&k, &record("at"))
        .await
        .unwrap();

    // A keyring that lost k1 (same bytes under another id do not help either).
    let without_k1 = EncryptedStore::new(inner.clone(), Arc::new(StaticKeyring::new(id("k9"), K1)));
    let reason = corrupt_reason(without_k1.load(&k).await);
    assert!(reason.contains("unknown key id k1"), "{reason}");

    // Same id, different bytes: the wrapped key does not authenticate.
    let wrong_bytes =
        EncryptedStore::new(inner.clone(), Arc::new(StaticKeyring::new(id("k1"), K2)));
    let reason = corrupt_reason(wrong_bytes.load(&k).await);
    assert!(reason.contains("failed authentication"), "{reason}");
}

#[tokio::test]
async fn rotation_reads_old_records_and_writes_under_the_new_primary() {
    let inner = Arc::new(MemoryStore::new());
    let (old, new) = (key("old"), key("new"));
    EncryptedStore::new(inner.clone(), ring_k1())
        .insert(&old, &record("at-old"))
        .await
        .unwrap();

    let rotated = EncryptedStore::new(inner.clone(), ring_k2());
    assert_eq!(
        access_token(&rotated.load(&old).await.unwrap().unwrap()),
        "at-old"
    );
    assert_eq!(key_id_of(&raw(&inner, &old).await), Some(id("k1")));

    rotated.insert(&new, &record("at-new")).await.unwrap();
    assert_eq!(key_id_of(&raw(&inner, &new).await), Some(id("k2")));
    // A rewrite of an old record moves it to the primary too.
    let v = rotated.load(&old).await.unwrap().unwrap().version;
    rotated
        .compare_and_swap(&old, v.clone(), &record("at-old-2"), None)
        .await
        .unwrap();
    assert_eq!(key_id_of(&raw(&inner, &old).await), Some(id("k2")));

    // The old keyring cannot read what the new primary wrote.
    let reason = corrupt_reason(
        EncryptedStore::new(inner.clone(), ring_k1())
            .load(&new)
            .await,
    );
    assert!(reason.contains("unknown key id k2"), "{reason}");
}

#[tokio::test]
async fn rewrap_moves_everything_to_the_primary_in_batches() {
    let inner = Arc::new(MemoryStore::new());
    let before = EncryptedStore::new(inner.clone(), ring_k1());
    let keys: Vec<TokenKey> = (0..7).map(|i| key(&format!("user-{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        before.insert(k, &record(&format!("at-{i}"))).await.unwrap();
    }
    let store = EncryptedStore::new(inner.clone(), ring_k2());
    // One record already under the primary.
    let v = store.load(&keys[3]).await.unwrap().unwrap().version;
    store
        .compare_and_swap(&keys[3], v, &record("at-3"), None)
        .await
        .unwrap();
    let meta_before: Vec<ScannedLink> = inner.scan(None, 100).await.unwrap().links;

    // Page by page: the cursor advances and ends.
    let (page, next) = store.rewrap_page(None, 2).await.unwrap();
    assert_eq!((page.scanned, page.rewrapped), (2, 2));
    // The inner MemoryStore walks in key order, so its cursor names the last key of the page.
    assert_eq!(next.map(|c| c.key().unwrap()), Some(keys[1].clone()));

    let report = store.rewrap(2).await.unwrap();
    assert_eq!(report.scanned, 7);
    assert_eq!(report.rewrapped, 4);
    assert_eq!(report.already_primary, 3);
    assert_eq!((report.skipped_conflict, report.corrupt), (0, 0));

    for (i, k) in keys.iter().enumerate() {
        assert_eq!(key_id_of(&raw(&inner, k).await), Some(id("k2")), "{k}");
        assert_eq!(
            access_token(&store.load(k).await.unwrap().unwrap()),
            format!("at-{i}")
        );
    }
    // Rewrapping changes versions, not meta.
    let meta_after = inner.scan(None, 100).await.unwrap().links;
    for (a, b) in meta_before.iter().zip(&meta_after) {
        assert_eq!((&a.key, &a.meta), (&b.key, &b.meta));
    }

    let again = store.rewrap(2).await.unwrap();
    assert_eq!(
        (again.scanned, again.rewrapped, again.already_primary),
        (7, 0, 7)
    );
    // k1 can now be retired.
    let k2_only = EncryptedStore::new(inner.clone(), Arc::new(StaticKeyring::new(id("k2"), K2)));
    for k in &keys {
        k2_only.load(k).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn rewrap_counts_and_skips_records_it_cannot_read() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), ring_k1());
    store.insert(&key("a"), &record("at-a")).await.unwrap();
    put_raw(&inner, &key("b"), b"garbage".to_vec()).await;
    store.insert(&key("c"), &record("at-c")).await.unwrap();

    let report = EncryptedStore::new(inner.clone(), ring_k2())
        .rewrap(10)
        .await
        .unwrap();
    assert_eq!(
        (report.scanned, report.rewrapped, report.corrupt),
        (3, 2, 1)
    );
    assert_eq!(
        raw(&inner, &key("b")).await.record.payload.expose_secret(),
        b"garbage"
    );
}

/// What a [`RacingStore`] does when the rewrap loads the contested key under its lease.
#[derive(Debug)]
enum Race {
    /// A writer that takes no lease (a re-link, say) compare-and-swaps the key.
    Write(Record),
    /// The rewrap's lease expires (the store's clock jumps) and a refresher takes it over.
    StealLease(Arc<ManualClock>, LeaseHolder),
}

/// A MemoryStore that fires a [`Race`] on one key at the first load after a lease on that key
/// was acquired: between the rewrap's load under the lease and its write.
#[derive(Debug)]
struct RacingStore {
    inner: MemoryStore,
    race: Mutex<Option<(TokenKey, Race)>>,
    /// Whether the contested key's lease has been acquired (the race is due at the next load).
    due: AtomicBool,
    /// Set by [`Race::StealLease`]: the refresher's lease.
    stolen: Mutex<Option<Lease>>,
    /// Holders of every lease acquired through this store.
    holders: Mutex<Vec<LeaseHolder>>,
}

impl RacingStore {
    fn new(inner: MemoryStore) -> Self {
        RacingStore {
            inner,
            race: Mutex::new(None),
            due: AtomicBool::new(false),
            stolen: Mutex::new(None),
            holders: Mutex::new(Vec::new()),
        }
    }

    fn arm(&self, key: &TokenKey, race: Race) {
        *self.race.lock().unwrap() = Some((key.clone(), race));
    }

    fn fired(&self) -> bool {
        self.race.lock().unwrap().is_none()
    }
}

#[async_trait]
impl TokenStore for RacingStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        let loaded = self.inner.load(key).await?;
        let armed = {
            let mut race = self.race.lock().unwrap();
            if race.as_ref().is_some_and(|(k, _)| k == key) && self.due.load(Ordering::SeqCst) {
                race.take()
            } else {
                None
            }
        };
        match (armed, &loaded) {
            (Some((_, Race::Write(write))), Some(stored)) => {
                self.inner
                    .compare_and_swap(key, stored.version.clone(), &write, None)
                    .await
                    .expect("the concurrent writer's CAS");
            }
            (Some((_, Race::StealLease(clock, thief))), Some(_)) => {
                clock.advance(Duration::from_secs(3600));
                let LeaseAttempt::Acquired(lease) = self
                    .inner
                    .try_lease(key, &thief, Duration::from_secs(60))
                    .await?
                else {
                    panic!("the expired lease could not be taken over");
                };
                *self.stolen.lock().unwrap() = Some(lease);
            }
            _ => {}
        }
        Ok(loaded)
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
        let attempt = self.inner.try_lease(key, holder, ttl).await?;
        if matches!(attempt, LeaseAttempt::Acquired(_)) {
            self.holders.lock().unwrap().push(holder.clone());
            if self
                .race
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|(k, _)| k == key)
            {
                self.due.store(true, Ordering::SeqCst);
            }
        }
        Ok(attempt)
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

    // The revocation outbox is passed through untouched.
    async fn delete_and_enqueue_revocation(
        &self,
        key: &tokenbroker::TokenKey,
        expected: Option<tokenbroker::store::Version>,
        revocation: &tokenbroker::store::PendingRevocation,
    ) -> Result<bool, tokenbroker::StoreError> {
        self.inner
            .delete_and_enqueue_revocation(key, expected, revocation)
            .await
    }
    async fn enqueue_revocation(
        &self,
        revocation: &tokenbroker::store::PendingRevocation,
    ) -> Result<(), tokenbroker::StoreError> {
        self.inner.enqueue_revocation(revocation).await
    }
    async fn claim_revocations(
        &self,
        now: time::OffsetDateTime,
        until: time::OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<tokenbroker::store::PendingRevocation>, tokenbroker::StoreError> {
        self.inner.claim_revocations(now, until, limit).await
    }
    async fn reschedule_revocation(
        &self,
        claimed: &tokenbroker::store::PendingRevocation,
        due_at: time::OffsetDateTime,
    ) -> Result<bool, tokenbroker::StoreError> {
        self.inner.reschedule_revocation(claimed, due_at).await
    }
    async fn remove_revocation(
        &self,
        id: &tokenbroker::store::RevocationId,
    ) -> Result<(), tokenbroker::StoreError> {
        self.inner.remove_revocation(id).await
    }
}

/// The record as a broker on the new keyring would write it for `key`: encrypted under k2.
async fn sealed_under_k2(key: &TokenKey, access: &str) -> Record {
    let scratch = EncryptedStore::new(MemoryStore::new(), ring_k2());
    scratch.insert(key, &record(access)).await.unwrap();
    scratch.inner().load(key).await.unwrap().unwrap().record
}

/// Fails unless every key's lease is free: a rewrap must leave none held.
async fn assert_no_lease_held(store: &dyn TokenStore, keys: &[TokenKey]) {
    for k in keys {
        match store
            .try_lease(k, &LeaseHolder::random(), Duration::from_secs(30))
            .await
            .unwrap()
        {
            LeaseAttempt::Acquired(lease) => store.release_lease(&lease).await.unwrap(),
            other => panic!("{k}: lease left held after the rewrap ({other:?})"),
        }
    }
}

#[tokio::test]
async fn a_rewrap_racing_a_writer_loses_nothing() {
    let racing = Arc::new(RacingStore::new(MemoryStore::new()));
    let keys: Vec<TokenKey> = (0..4).map(|i| key(&format!("user-{i}"))).collect();
    let old = EncryptedStore::new(racing.clone(), ring_k1());
    for k in &keys {
        old.insert(k, &record("at-before")).await.unwrap();
    }

    // A writer that takes no lease writes between the rewrap's load under the lease and its
    // write.
    let contested = keys[2].clone();
    racing.arm(
        &contested,
        Race::Write(sealed_under_k2(&contested, "at-from-writer").await),
    );

    let store = EncryptedStore::new(racing.clone(), ring_k2());
    let report = store.rewrap(2).await.unwrap();
    assert!(racing.fired(), "the race never fired");
    assert_eq!(report.scanned, 4);
    assert_eq!(report.skipped_conflict, 1);
    assert_eq!(report.rewrapped, 3);
    assert_eq!(report.skipped_busy, 0);

    assert_eq!(
        access_token(&store.load(&contested).await.unwrap().unwrap()),
        "at-from-writer"
    );
    for k in &keys {
        let raw = racing.inner.load(k).await.unwrap().unwrap();
        assert_eq!(key_id_of(&raw), Some(id("k2")), "{k}");
    }
    assert_no_lease_held(&racing.inner, &keys).await;
    assert_eq!(store.rewrap(2).await.unwrap().already_primary, 4);
}

#[tokio::test]
async fn rewrap_skips_and_reports_leased_keys_and_leaves_them_untouched() {
    let inner = Arc::new(MemoryStore::new());
    let keys: Vec<TokenKey> = (0..4).map(|i| key(&format!("user-{i}"))).collect();
    let old = EncryptedStore::new(inner.clone(), ring_k1());
    for (i, k) in keys.iter().enumerate() {
        old.insert(k, &record(&format!("at-{i}"))).await.unwrap();
    }
    let store = EncryptedStore::new(inner.clone(), ring_k2());

    // A refresh is under way on key 1: it loaded the record and holds the lease.
    let refreshing = &keys[1];
    let loaded = store.load(refreshing).await.unwrap().unwrap();
    let refresher = LeaseHolder::new("refresher");
    let LeaseAttempt::Acquired(refresh_lease) = store
        .try_lease(refreshing, &refresher, Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("the refresher's lease was not acquired");
    };
    // Another key's lease is held by someone who will give it up without writing.
    let idle = &keys[3];
    let LeaseAttempt::Acquired(idle_lease) = inner
        .try_lease(idle, &LeaseHolder::random(), Duration::from_secs(60))
        .await
        .unwrap()
    else {
        panic!("lease not acquired");
    };
    let before = [raw(&inner, refreshing).await, raw(&inner, idle).await];

    let report = store.rewrap(10).await.unwrap();
    assert_eq!(report.scanned, 4);
    assert_eq!(report.rewrapped, 2);
    assert_eq!(report.skipped_busy, 2);
    assert_eq!(
        (
            report.already_primary,
            report.skipped_conflict,
            report.corrupt
        ),
        (0, 0, 0)
    );
    for (k, before) in [refreshing, idle].into_iter().zip(&before) {
        let after = raw(&inner, k).await;
        assert_eq!(after.version, before.version, "{k}: rewritten while leased");
        assert_eq!(
            after.record.payload.expose_secret(),
            before.record.payload.expose_secret(),
            "{k}: payload changed while leased"
        );
        assert_eq!(after.record.meta, before.record.meta);
        assert_eq!(key_id_of(&after), Some(id("k1")));
    }
    // The leases are still there, and the refresh's write at the version it loaded succeeds.
    assert_eq!(
        inner
            .try_lease(refreshing, &LeaseHolder::random(), Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseAttempt::Busy
    );
    store
        .compare_and_swap(
            refreshing,
            loaded.version,
            &record("at-refreshed"),
            Some(&refresh_lease.token),
        )
        .await
        .expect("the refresh's write did not conflict with the rewrap");
    store.release_lease(&refresh_lease).await.unwrap();
    inner.release_lease(&idle_lease).await.unwrap();

    // The next pass finishes the job.
    let again = store.rewrap(10).await.unwrap();
    assert_eq!(
        (again.rewrapped, again.already_primary, again.skipped_busy),
        (1, 3, 0)
    );
    for k in &keys {
        assert_eq!(key_id_of(&raw(&inner, k).await), Some(id("k2")), "{k}");
    }
    assert_eq!(
        access_token(&store.load(refreshing).await.unwrap().unwrap()),
        "at-refreshed"
    );
    assert_no_lease_held(&*inner, &keys).await;
}

#[tokio::test]
async fn a_rewrap_that_lost_its_lease_writes_nothing_and_frees_nothing() {
    let clock = Arc::new(ManualClock::starting_now());
    let racing = Arc::new(RacingStore::new(MemoryStore::with_clock(clock.clone())));
    let k = key("alice");
    EncryptedStore::new(racing.clone(), ring_k1())
        .insert(&k, &record("at-before"))
        .await
        .unwrap();
    let before = racing.inner.load(&k).await.unwrap().unwrap();

    // The rewrap stalls past its lease (the clock jumps) and a refresher takes the lease over
    // before the rewrap writes. Nobody wrote meanwhile, so only the fence stops the write.
    let thief = LeaseHolder::new("refresher");
    racing.arm(&k, Race::StealLease(clock.clone(), thief.clone()));
    let store = EncryptedStore::new(racing.clone(), ring_k2())
        .with_lease_holder(LeaseHolder::new("rotation-job"));
    let report = store.rewrap(10).await.unwrap();
    assert!(racing.fired(), "the race never fired");
    assert_eq!(
        (report.rewrapped, report.skipped_conflict),
        (0, 1),
        "{report:?}"
    );
    assert_eq!(
        racing.holders.lock().unwrap()[0],
        LeaseHolder::new("rotation-job"),
        "the rewrap took its lease as the holder it was given"
    );

    let after = racing.inner.load(&k).await.unwrap().unwrap();
    assert_eq!(after.version, before.version);
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret()
    );
    // The rewrap's release (with its own, stale, token) left the refresher's lease alone.
    assert_eq!(
        racing
            .inner
            .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseAttempt::Busy
    );
    let stolen = racing.stolen.lock().unwrap().take().unwrap();
    assert_eq!(stolen.holder, thief);
    racing
        .inner
        .compare_and_swap(
            &k,
            before.version,
            &sealed_under_k2(&k, "at-refreshed").await,
            Some(&stolen.token),
        )
        .await
        .expect("the refresher's write under its lease");
}

/// Unwraps with the old keys but cannot wrap: a key service that fails half-way.
#[derive(Debug)]
struct WrapFails(Arc<dyn KeyProvider>);

#[async_trait]
impl KeyProvider for WrapFails {
    fn primary_key_id(&self) -> KeyId {
        self.0.primary_key_id()
    }
    async fn wrap(&self, _: &DataKey, _: &[u8]) -> Result<WrappedKey, KeyError> {
        Err(KeyError::unavailable(Unreachable))
    }
    async fn unwrap(
        &self,
        key_id: &KeyId,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<DataKey, KeyError> {
        self.0.unwrap(key_id, wrapped, aad).await
    }
}

#[tokio::test]
async fn no_lease_is_left_held_after_a_rewrap() {
    let inner = Arc::new(MemoryStore::new());
    let old = EncryptedStore::new(inner.clone(), ring_k1());
    let new = EncryptedStore::new(inner.clone(), ring_k2());
    // One of each outcome: rewrapped, already primary, corrupt.
    let (moved, current, garbage) = (key("moved"), key("current"), key("garbage"));
    old.insert(&moved, &record("at-moved")).await.unwrap();
    new.insert(&current, &record("at-current")).await.unwrap();
    put_raw(&inner, &garbage, b"garbage".to_vec()).await;
    let all = [moved.clone(), current.clone(), garbage.clone()];

    let report = new.rewrap(10).await.unwrap();
    assert_eq!(
        (report.rewrapped, report.already_primary, report.corrupt),
        (1, 1, 1)
    );
    assert_no_lease_held(&*inner, &all).await;

    // A pass that fails half-way (the key service cannot wrap) releases the lease it held.
    let failing_key = key("failing");
    old.insert(&failing_key, &record("at-failing"))
        .await
        .unwrap();
    let failing = EncryptedStore::new(inner.clone(), Arc::new(WrapFails(ring_k2())));
    match failing.rewrap(10).await {
        Err(StoreError::Backend { store, .. }) => assert_eq!(store, "encryption"),
        other => panic!("expected a Backend error, got {other:?}"),
    }
    assert_eq!(key_id_of(&raw(&inner, &failing_key).await), Some(id("k1")));
    assert_no_lease_held(&*inner, &[&all[..], &[failing_key]].concat()).await;
}

/// A key service that is down.
#[derive(Debug)]
struct DownKms;

#[derive(Debug, thiserror::Error)]
#[error("kms unreachable")]
struct Unreachable;

#[async_trait]
impl KeyProvider for DownKms {
    fn primary_key_id(&self) -> KeyId {
        id("kms-1")
    }
    async fn wrap(&self, _: &DataKey, _: &[u8]) -> Result<WrappedKey, KeyError> {
        Err(KeyError::unavailable(Unreachable))
    }
    async fn unwrap(&self, _: &KeyId, _: &[u8], _: &[u8]) -> Result<DataKey, KeyError> {
        Err(KeyError::unavailable(Unreachable))
    }
}

#[tokio::test]
async fn a_failing_key_provider_is_a_backend_error() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), Arc::new(DownKms));
    let k = key("alice");
    match store.insert(&k, &record("at")).await {
        Err(StoreError::Backend { store, .. }) => assert_eq!(store, "encryption"),
        other => panic!("expected Backend, got {other:?}"),
    }
    assert!(inner.is_empty(), "nothing written");

    // On read, an outage is not corruption: the host should retry, not re-link.
    EncryptedStore::new(inner.clone(), ring_k1())
        .insert(&k, &record("at"))
        .await
        .unwrap();
    assert!(matches!(
        store.load(&k).await,
        Err(StoreError::Backend {
            store: "encryption",
            ..
        })
    ));
}

#[tokio::test]
async fn debug_output_and_errors_hold_no_key_material() {
    let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(201));
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    let forbidden = [
        format!("{bytes:?}"),
        format!("{:?}", &bytes[..8])
            .trim_end_matches(']')
            .to_owned(),
        b64.clone(),
        b64[..16].to_owned(),
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()[..16].to_owned(),
    ];
    let check = |what: &str, text: String| {
        for f in &forbidden {
            assert!(!text.contains(f.as_str()), "{what} shows key bytes: {text}");
        }
    };

    let ring = StaticKeyring::from_config_str(&format!("k1:{b64}")).unwrap();
    check("keyring", format!("{ring:?}"));
    let store = EncryptedStore::new(MemoryStore::new(), Arc::new(ring));
    check("store", format!("{store:?}"));
    check("store (alternate)", format!("{store:#?}"));
    let data_key = DataKey::from_slice(&bytes).unwrap();
    check("data key", format!("{data_key:?}"));
    assert_eq!(format!("{data_key:?}"), "DataKey([redacted])");
    let wrapped = store.key_provider().wrap(&data_key, b"aad").await.unwrap();
    check("wrapped key", format!("{wrapped:?}"));

    // Errors about a bad configuration do not echo it.
    let mut short = b64.clone();
    short.truncate(40);
    for config in [
        format!("k1:{b64}!"),
        format!("k1:{short}"),
        b64.clone(),
        format!("k1:{b64},k1:{b64}"),
    ] {
        let err = StaticKeyring::from_config_str(&config).unwrap_err();
        check("keyring error", format!("{err} {err:?}"));
    }
}

#[test]
fn keyring_configuration_errors_are_typed() {
    let k = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
    let parse = StaticKeyring::from_config_str;

    assert_eq!(parse("").unwrap_err(), KeyringError::Empty);
    assert_eq!(parse("  \n").unwrap_err(), KeyringError::Empty);
    assert!(matches!(
        parse(&k(1)).unwrap_err(),
        KeyringError::Malformed { entry: 1, .. }
    ));
    assert!(matches!(
        parse(&format!("k1:{},", k(1))).unwrap_err(),
        KeyringError::Malformed { entry: 2, .. }
    ));
    assert!(matches!(
        parse(&format!("k1:{},bad id:{}", k(1), k(2))).unwrap_err(),
        KeyringError::Malformed { entry: 2, .. }
    ));
    assert!(matches!(
        parse(&format!(":{}", k(1))).unwrap_err(),
        KeyringError::Malformed { entry: 1, .. }
    ));
    assert_eq!(
        parse("k1:not*base64").unwrap_err(),
        KeyringError::BadBase64 { entry: 1 }
    );
    assert_eq!(
        parse(&format!(
            "k1:{},k2:{}",
            k(1),
            base64::engine::general_purpose::STANDARD.encode([2u8; 16])
        ))
        .unwrap_err(),
        KeyringError::WrongLength { entry: 2, len: 16 }
    );
    assert_eq!(
        parse(&format!("k1:{}, k2:{} ,k1:{}", k(1), k(2), k(3))).unwrap_err(),
        KeyringError::DuplicateKeyId { key_id: id("k1") }
    );
    assert_eq!(
        StaticKeyring::from_env("TOKENBROKER_TEST_SURELY_UNSET_VAR").unwrap_err(),
        KeyringError::MissingEnv {
            var: "TOKENBROKER_TEST_SURELY_UNSET_VAR".into()
        }
    );
    assert_eq!(
        StaticKeyring::new(id("k1"), K1)
            .with_key(id("k1"), K2)
            .unwrap_err(),
        KeyringError::DuplicateKeyId { key_id: id("k1") }
    );
    assert_eq!(
        StaticKeyring::new(id("k1"), K1)
            .with_primary(&id("k2"))
            .unwrap_err(),
        KeyringError::UnknownKeyId { key_id: id("k2") }
    );

    // Valid: first entry primary, padding optional, spaces tolerated.
    let unpadded = k(2).trim_end_matches('=').to_owned();
    let ring = parse(&format!(" k2:{unpadded} ,\n k1:{}\n", k(1))).unwrap();
    assert_eq!(ring.primary_key_id(), id("k2"));
    assert_eq!(
        ring.key_ids().cloned().collect::<Vec<_>>(),
        vec![id("k1"), id("k2")]
    );
}

#[test]
fn key_ids_are_validated() {
    for ok in ["k1", "2026-01", "kms/alias@v3", &"x".repeat(64)] {
        assert!(KeyId::new(ok).is_ok(), "{ok}");
    }
    for bad in ["", "a b", "a:b", "a,b", "é", "a\n", &"x".repeat(65)] {
        assert_eq!(KeyId::new(bad).unwrap_err().kind, "key id", "{bad:?}");
    }
}

#[tokio::test]
async fn a_broker_on_an_encrypted_store_links_and_reads() {
    use tokenbroker::testing::FakeProvider;
    use tokenbroker::{Caller, LoginOptions, ProviderPolicy, TokenBroker};

    let inner = Arc::new(MemoryStore::new());
    let google = Arc::new(FakeProvider::new("google").unwrap());
    let broker = TokenBroker::builder()
        .with_provider(google.clone(), ProviderPolicy::default())
        .with_store(Arc::new(EncryptedStore::new(inner.clone(), ring_k1())))
        .build()
        .unwrap();
    let k = key("alice");
    let start = broker
        .begin_login(&k, LoginOptions::default())
        .await
        .unwrap();
    let callback = google.approve(&start.authorization_url, "alice").unwrap();
    broker
        .complete_login(start.pending, &callback)
        .await
        .unwrap();

    let caller = Caller::new(k.realm.clone(), k.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope();
    let tokens = broker.retrieve(&caller, &k).await.unwrap().tokens;
    let access = tokens.access_token().expose_secret().to_owned();
    assert!(!access.is_empty());
    let stored = raw(&inner, &k).await;
    assert!(!contains(
        stored.record.payload.expose_secret(),
        access.as_bytes()
    ));
    assert_eq!(key_id_of(&stored), Some(id("k1")));
}

/// The version a `Corrupt` load reports; fails the test on anything else.
#[track_caller]
fn corrupt_version(result: Result<Option<StoredRecord>, StoreError>) -> Version {
    match result {
        Err(StoreError::Corrupt {
            version: Some(v), ..
        }) => v,
        Err(other) => panic!("expected Corrupt with a version, got {other:?}"),
        Ok(got) => panic!("expected Corrupt, got Ok({got:?})"),
    }
}

/// Writes into `inner` three records that a store on `ring_k2` cannot read, named
/// `<what>-<suffix>`: a flipped bit, a key the keyring does not have, and a plain record written
/// before encryption was turned on.
async fn unreadable_records(inner: &Arc<MemoryStore>, suffix: &str) -> [TokenKey; 3] {
    let store = EncryptedStore::new(inner.clone(), ring_k2());
    let tampered = key(&format!("tampered-{suffix}"));
    store.insert(&tampered, &record("at-t")).await.unwrap();
    let mut bytes = raw(inner, &tampered)
        .await
        .record
        .payload
        .expose_secret()
        .to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    put_raw(inner, &tampered, bytes).await;

    let retired = key(&format!("retired-{suffix}"));
    EncryptedStore::new(
        inner.clone(),
        Arc::new(StaticKeyring::new(id("k0"), [0x33; 32])),
    )
    .insert(&retired, &record("at-r"))
    .await
    .unwrap();

    let plain = key(&format!("plain-{suffix}"));
    inner.insert(&plain, &record("at-p")).await.unwrap();
    [tampered, retired, plain]
}

/// Records nobody can read load as `Corrupt` with the version the inner store holds, and that
/// version is enough to replace them (a re-link) or delete them (an unlink): neither needs the
/// old record to decrypt.
#[tokio::test]
async fn unreadable_records_report_their_version_and_can_be_replaced_or_deleted() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), ring_k2());

    for k in &unreadable_records(&inner, "relink").await {
        let v = corrupt_version(store.load(k).await);
        assert_eq!(v, raw(&inner, k).await.version, "{k}");
        let replaced = store
            .compare_and_swap(k, v.clone(), &record("at-relinked"), None)
            .await
            .unwrap_or_else(|e| panic!("{k}: CAS over an unreadable record: {e:?}"));
        let loaded = store.load(k).await.unwrap().unwrap();
        assert_eq!(loaded.version.clone(), replaced);
        assert_eq!(access_token(&loaded), "at-relinked");
        // The stale version no longer matches.
        assert!(matches!(
            store
                .compare_and_swap(k, v.clone(), &record("late"), None)
                .await,
            Err(StoreError::Conflict { .. })
        ));
    }

    for k in &unreadable_records(&inner, "unlink").await {
        let v = corrupt_version(store.load(k).await);
        assert_eq!(v, raw(&inner, k).await.version, "{k}");
        // Another version conflicts and deletes nothing; the reported one deletes.
        assert!(matches!(
            store
                .delete(k, Some(Version::from_number(v.number().unwrap() + 1000)))
                .await,
            Err(StoreError::Conflict { .. })
        ));
        assert!(store.delete(k, Some(v.clone())).await.unwrap(), "{k}");
        assert!(store.load(k).await.unwrap().is_none());
        assert!(inner.load(k).await.unwrap().is_none());
    }
}

// ---------------------------------------------------------------------------------------------
// Key hierarchy: intermediate keys, key caches, outages, format-1 envelopes.

/// A key service seen from outside: counts calls, can be down, can be slow, can change its
/// primary key (a keyring reloaded), and remembers the plaintext keys it was asked to wrap (so
/// that a test can look for them where they must not be; its `Debug` leaves them out).
struct CountingKms {
    ring: Mutex<Arc<dyn KeyProvider>>,
    wraps: AtomicUsize,
    unwraps: AtomicUsize,
    down: AtomicBool,
    delay: Mutex<Duration>,
    wrapped_plain: Mutex<Vec<[u8; 32]>>,
}

impl std::fmt::Debug for CountingKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingKms")
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

impl CountingKms {
    fn new(ring: Arc<dyn KeyProvider>) -> Arc<Self> {
        Arc::new(CountingKms {
            ring: Mutex::new(ring),
            wraps: AtomicUsize::new(0),
            unwraps: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            delay: Mutex::new(Duration::ZERO),
            wrapped_plain: Mutex::new(Vec::new()),
        })
    }
    fn ring(&self) -> Arc<dyn KeyProvider> {
        self.ring.lock().unwrap().clone()
    }
    fn calls(&self) -> (usize, usize) {
        (
            self.wraps.load(Ordering::SeqCst),
            self.unwraps.load(Ordering::SeqCst),
        )
    }
    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
    async fn pause(&self) {
        let delay = *self.delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }
}

#[async_trait]
impl KeyProvider for CountingKms {
    fn primary_key_id(&self) -> KeyId {
        self.ring().primary_key_id()
    }
    async fn wrap(&self, data_key: &DataKey, aad: &[u8]) -> Result<WrappedKey, KeyError> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        self.pause().await;
        if self.down.load(Ordering::SeqCst) {
            return Err(KeyError::unavailable(Unreachable));
        }
        self.wrapped_plain
            .lock()
            .unwrap()
            .push(*data_key.expose_secret());
        self.ring().wrap(data_key, aad).await
    }
    async fn unwrap(
        &self,
        key_id: &KeyId,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<DataKey, KeyError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.pause().await;
        if self.down.load(Ordering::SeqCst) {
            return Err(KeyError::unavailable(Unreachable));
        }
        self.ring().unwrap(key_id, wrapped, aad).await
    }
}

/// The envelope's format byte and header (KEK id and wrapped intermediate key), as stored.
fn format_and_header(stored: &StoredRecord) -> (u8, Vec<u8>) {
    let bytes = stored.record.payload.expose_secret();
    let id_len = usize::from(bytes[1]);
    let wrapped_len = usize::from(u16::from_be_bytes([bytes[2 + id_len], bytes[3 + id_len]]));
    (bytes[0], bytes[1..4 + id_len + wrapped_len].to_vec())
}

#[track_caller]
fn assert_backend<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    match result {
        Err(StoreError::Backend { store, source }) => {
            assert_eq!(store, "encryption");
            assert!(
                matches!(
                    source.downcast_ref::<KeyError>(),
                    Some(KeyError::Unavailable { .. })
                ),
                "{source:?}"
            );
        }
        other => panic!("expected Backend from the encryption layer, got {other:?}"),
    }
}

#[tokio::test]
async fn ten_thousand_reads_make_a_handful_of_key_provider_calls() {
    let inner = Arc::new(MemoryStore::new());
    let kms = CountingKms::new(ring_k1());
    let writer = EncryptedStore::new(inner.clone(), kms.clone());
    let keys: Vec<TokenKey> = (0..100).map(|i| key(&format!("user-{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        writer.insert(k, &record(&format!("at-{i}"))).await.unwrap();
    }
    // One intermediate key for all 100 writes: one wrap, and every envelope carries it.
    assert_eq!(kms.calls(), (1, 0));
    let first = format_and_header(&raw(&inner, &keys[0]).await);
    assert_eq!(first.0, 0xE2, "format 2");
    for k in &keys {
        assert_eq!(format_and_header(&raw(&inner, k).await), first, "{k}");
    }

    // Another process reads each record 100 times: one unwrap.
    let reader = EncryptedStore::new(inner.clone(), kms.clone());
    for round in 0..100 {
        for (i, k) in keys.iter().enumerate() {
            let loaded = reader.load(k).await.unwrap().unwrap();
            if round == 0 {
                assert_eq!(access_token(&loaded), format!("at-{i}"));
            }
        }
    }
    assert_eq!(kms.calls(), (1, 1), "10,000 reads");
    // The writer reads its own records without asking at all.
    for k in &keys {
        writer.load(k).await.unwrap().unwrap();
    }
    assert_eq!(kms.calls(), (1, 1));

    // 50 concurrent first reads in a third process, against a slow key service, wait for one
    // unwrap; 50 concurrent first writes in a fourth wait for one wrap.
    *kms.delay.lock().unwrap() = Duration::from_millis(50);
    let third = Arc::new(EncryptedStore::new(inner.clone(), kms.clone()));
    let mut reads = tokio::task::JoinSet::new();
    for k in &keys[..50] {
        let (third, k) = (third.clone(), k.clone());
        reads.spawn(async move { third.load(&k).await.unwrap().unwrap() });
    }
    while let Some(read) = reads.join_next().await {
        read.unwrap();
    }
    assert_eq!(kms.calls(), (1, 2));
    let fourth = Arc::new(EncryptedStore::new(inner.clone(), kms.clone()));
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..50 {
        let fourth = fourth.clone();
        writes.spawn(async move {
            fourth
                .insert(&key(&format!("new-{i}")), &record("at-new"))
                .await
                .unwrap()
        });
    }
    while let Some(write) = writes.join_next().await {
        write.unwrap();
    }
    assert_eq!(kms.calls(), (2, 2));
}

#[tokio::test]
async fn intermediate_keys_rotate_and_cached_keys_expire() {
    let clock = Arc::new(ManualClock::starting_now());
    let inner = Arc::new(MemoryStore::new());
    let kms = CountingKms::new(ring_k1());
    let writer = EncryptedStore::new(inner.clone(), kms.clone())
        .with_clock(clock.clone())
        .with_intermediate_key_lifetime(Duration::from_secs(3600));
    let (a, b, c, d) = (key("a"), key("b"), key("c"), key("d"));

    writer.insert(&a, &record("at-a")).await.unwrap();
    clock.advance(Duration::from_secs(59 * 60));
    writer.insert(&b, &record("at-b")).await.unwrap();
    assert_eq!(kms.calls(), (1, 0), "one key for the whole lifetime");
    assert_eq!(
        format_and_header(&raw(&inner, &a).await),
        format_and_header(&raw(&inner, &b).await)
    );
    clock.advance(Duration::from_secs(2 * 60));
    writer.insert(&c, &record("at-c")).await.unwrap();
    assert_eq!(kms.calls(), (2, 0), "a new key after the lifetime");
    assert_ne!(
        format_and_header(&raw(&inner, &a).await),
        format_and_header(&raw(&inner, &c).await)
    );

    // A new primary key (the keyring reloaded) starts a new intermediate key at once.
    *kms.ring.lock().unwrap() = ring_k2();
    writer.insert(&d, &record("at-d")).await.unwrap();
    assert_eq!(kms.calls(), (3, 0));
    assert_eq!(key_id_of(&raw(&inner, &d).await), Some(id("k2")));
    assert_eq!(key_id_of(&raw(&inner, &c).await), Some(id("k1")));
    // The writer reads the records under its older keys from its cache while they are
    // younger than the cache TTL (1 hour by default): the first key, made 61 minutes ago, is
    // unwrapped once.
    for (k, at) in [(&a, "at-a"), (&b, "at-b"), (&c, "at-c"), (&d, "at-d")] {
        assert_eq!(access_token(&writer.load(k).await.unwrap().unwrap()), at);
    }
    assert_eq!(kms.calls(), (3, 1));

    // A reader keeps unwrapped keys for its cache TTL only.
    let reader = EncryptedStore::new(inner.clone(), kms.clone())
        .with_clock(clock.clone())
        .with_key_cache_ttl(Duration::from_secs(600));
    for _ in 0..10 {
        reader.load(&a).await.unwrap().unwrap();
        reader.load(&b).await.unwrap().unwrap();
    }
    assert_eq!(kms.calls(), (3, 2), "a and b share a key");
    clock.advance(Duration::from_secs(599));
    reader.load(&a).await.unwrap().unwrap();
    assert_eq!(kms.calls(), (3, 2));
    clock.advance(Duration::from_secs(2));
    reader.load(&a).await.unwrap().unwrap();
    assert_eq!(kms.calls(), (3, 3), "unwrapped again after the TTL");

    // A cache of one intermediate key: reading two keys in turn unwraps every time.
    let tiny = EncryptedStore::new(inner.clone(), kms.clone())
        .with_clock(clock.clone())
        .with_key_cache_capacity(1);
    for _ in 0..3 {
        tiny.load(&a).await.unwrap().unwrap();
        tiny.load(&c).await.unwrap().unwrap();
    }
    assert_eq!(kms.calls(), (3, 9));
    // And none at all: every read unwraps.
    let uncached = EncryptedStore::new(inner.clone(), kms.clone())
        .with_clock(clock.clone())
        .with_key_cache_ttl(Duration::ZERO);
    for _ in 0..3 {
        uncached.load(&a).await.unwrap().unwrap();
    }
    assert_eq!(kms.calls(), (3, 12));
}

#[tokio::test]
async fn a_key_provider_outage_stops_only_what_needs_a_new_key() {
    let clock = Arc::new(ManualClock::starting_now());
    let inner = Arc::new(MemoryStore::new());
    let kms = CountingKms::new(ring_k1());
    let hour = Duration::from_secs(3600);
    let store = |kms: &Arc<CountingKms>| {
        EncryptedStore::new(inner.clone(), kms.clone())
            .with_clock(clock.clone())
            .with_intermediate_key_lifetime(hour)
            .with_key_cache_ttl(hour)
    };
    let writer = store(&kms);
    let keys: Vec<TokenKey> = (0..20).map(|i| key(&format!("user-{i}"))).collect();
    for k in &keys {
        writer.insert(k, &record("at")).await.unwrap();
    }
    let reader = store(&kms);
    for k in &keys {
        reader.load(k).await.unwrap().unwrap();
    }
    assert_eq!(kms.calls(), (1, 1));

    kms.set_down(true);
    clock.advance(Duration::from_secs(30 * 60));
    // Cached keys: reads go on, in the writer and in the reader, and so do the writer's writes
    // under its current intermediate key.
    for k in &keys {
        reader.load(k).await.unwrap().unwrap();
        writer.load(k).await.unwrap().unwrap();
    }
    let during = key("written-during-the-outage");
    writer.insert(&during, &record("at-during")).await.unwrap();
    assert_eq!(
        access_token(&reader.load(&during).await.unwrap().unwrap()),
        "at-during"
    );
    assert_eq!(kms.calls(), (1, 1), "nobody asked the key service");

    // A process that has not seen the key cannot read, and one that has no key cannot write:
    // clearly a backend error (retry later), never Corrupt.
    let fresh = store(&kms);
    assert_backend(fresh.load(&keys[0]).await);
    assert_backend(fresh.insert(&key("fresh"), &record("x")).await);
    assert!(inner.load(&key("fresh")).await.unwrap().is_none());

    // Past the time limits, cached keys are no longer used while the service is down.
    clock.advance(Duration::from_secs(31 * 60));
    assert_backend(reader.load(&keys[0]).await);
    assert_backend(writer.load(&keys[0]).await);
    let before = raw(&inner, &keys[1]).await.version;
    let v = before.clone();
    assert_backend(
        writer
            .compare_and_swap(&keys[1], v.clone(), &record("y"), None)
            .await,
    );
    assert_eq!(
        raw(&inner, &keys[1]).await.version,
        before,
        "nothing written"
    );
    // Deleting needs no key at all.
    assert!(writer.delete(&during, None).await.unwrap());

    // The service is back: everything works again, with one new unwrap and one new wrap.
    kms.set_down(false);
    let (wraps, unwraps) = kms.calls();
    for k in &keys {
        reader.load(k).await.unwrap().unwrap();
    }
    writer
        .compare_and_swap(&keys[1], v, &record("at-after"), None)
        .await
        .unwrap();
    assert_eq!(kms.calls(), (wraps + 1, unwraps + 1));
}

/// Format-1 envelopes, written by tokenbroker 0.1 (commit a4d6328, `StaticKeyring` k1 =
/// `[0x11; 32]`) for `acme/<name>/google` holding the access token `at-legacy-<name>`.
const FORMAT_1_ALICE: &str = concat!(
    "e1026b3100482954eb8da2eb22d27a10e58d4b65a669accbd969d65fdee9074ad8ecad6dad89ce7eb63d0f01",
    "2c8578928d7fe026650d9287e455ba834f7d962ed019de07b19261dd18cf5211d6b47c7edec81b62fb1d80b0",
    "a066d8c08e0c1a4ab729a482623101504c1c831f9e60c873aa35df30d2b1ccb6effb5750893cf71d1a0197df",
    "184ee7b01838cf33fbdbd72ffb37cb7048c8ecb64cfed4eb9066d5312c83c839541d775a15f4bb4a5f7abff3",
    "3f82991f94049c7a373bfd492a45b4a8b0e8f1ee2f5d1879abe54a239c14fa00e7fe234c79d1a83809a3078a",
    "0a38cb91ca36000c0fa5a3afde617e629c20a4667ba693e5c01b9578f117d43edb3eecd2b8726abbed67e7f0",
    "03157a508ea57f50d773134c3d552e47e781d9fe36465cefbdb278",
);
const FORMAT_1_BOB: &str = concat!(
    "e1026b310048129f5f6b591b0e197e4d7e5cf941b0d84f129790bdf52c1da0d1c420a4b9f5a7c8990703a450",
    "2636c9927aedc7aec07799be59897174a24c517179e2e9caca979b58efb58e1543856bda389113da18f40895",
    "f1fa27c23f4f6f02deb3e4d56c62b2b38be9d6ae475bbdc03d19bc2b674d46bf0217f658e3e3331a93c42489",
    "e76dcf8c321a25ecdd214a997e0b315d3f5a461cd1f9f7b69102c9f706729a0b8d87498b0ea745cfcd0bf1ae",
    "1731a8cecce6006ae01376a98b1890d0e68d050f8a06ebeb3693e365d1927400dd9c7343393a5c9c18a262d4",
    "4d511a2df98587787ccdbcbe46dfc022d13bb37db1cf18a337f9fcd018bb1c957d95b2202b145ed9e132fcd9",
    "18972aa0f139edfb5a316b462d98d3e0f759748df66ce8",
);
const FORMAT_1_CAROL: &str = concat!(
    "e1026b31004882ccf972efec74d365459952810f9ac4b042e6c1affb40f34a622eb4012c6428f84df28ab3c3",
    "e2790b5a6b3c7a2ce7266344e31f4b66fe97c278ff5d4706214de36de213853c7b107cf8c03561d3dd4c3693",
    "6d77d82820167aa0c42b4543d7fb04acba2a4617d3a548bf6d55df0ab35223be26c55168f399b6747ecf3c16",
    "db3e5ffc361231d4cdf991918790a8c6a4024df8447858c89cab720e7f7004ea4aa432ebb3665f80d155373f",
    "5e0d4e0fa8982c52b6ecf223d29f5038211f9bc1fa047ee5c523cc3821fb961f8788d1ed9898f4cd5e2069cc",
    "efa8db23074b425f943f0870bc1a72ebc309d9287a131a8b4ca0a2bb39a565031c36a9fc178727c59e498251",
    "7e304770e3e6a0a266e125aa107c83aa1faf9c19466291a55b80ab",
);

fn from_hex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn format_1_records_still_read_with_their_data_keys_cached_and_rewrap_upgrades_them() {
    let inner = Arc::new(MemoryStore::new());
    let fixtures = [
        ("alice", FORMAT_1_ALICE),
        ("bob", FORMAT_1_BOB),
        ("carol", FORMAT_1_CAROL),
    ];
    for (name, hex) in fixtures {
        put_raw(&inner, &key(name), from_hex(hex)).await;
    }
    let kms = CountingKms::new(ring_k1());
    let store = EncryptedStore::new(inner.clone(), kms.clone());

    for (name, _) in fixtures {
        let k = key(name);
        assert_eq!(key_id_of(&raw(&inner, &k).await), Some(id("k1")));
        assert_eq!(format_and_header(&raw(&inner, &k).await).0, 0xE1);
        for _ in 0..1000 {
            let loaded = store.load(&k).await.unwrap().unwrap();
            assert_eq!(access_token(&loaded), format!("at-legacy-{name}"));
        }
    }
    assert_eq!(kms.calls(), (0, 3), "one unwrap per record, not per read");

    // A data key cached for alice is not handed to another row holding alice's envelope.
    let mallory = key("mallory");
    put_raw(&inner, &mallory, from_hex(FORMAT_1_ALICE)).await;
    let reason = corrupt_reason(store.load(&mallory).await);
    assert!(reason.contains("failed authentication"), "{reason}");
    assert_eq!(
        kms.calls(),
        (0, 4),
        "mallory's row asked the key service, which refused"
    );
    store.delete(&mallory, None).await.unwrap();

    // Bounded: with room for two data keys, reading three in turn unwraps every time.
    let small = EncryptedStore::new(inner.clone(), kms.clone()).with_legacy_key_cache_capacity(2);
    for _ in 0..2 {
        for (name, _) in fixtures {
            small.load(&key(name)).await.unwrap().unwrap();
        }
    }
    assert_eq!(kms.calls(), (0, 4 + 6));

    // k1 is the primary, but format 1 is not current: the rewrap moves the records to
    // format 2, under the lease, and a second pass finds nothing to do.
    let report = store.rewrap(10).await.unwrap();
    assert_eq!((report.scanned, report.rewrapped), (3, 3), "{report:?}");
    for (name, _) in fixtures {
        let k = key(name);
        assert_eq!(format_and_header(&raw(&inner, &k).await).0, 0xE2);
        assert_eq!(
            access_token(&store.load(&k).await.unwrap().unwrap()),
            format!("at-legacy-{name}")
        );
    }
    assert_no_lease_held(&*inner, &fixtures.map(|(n, _)| key(n))).await;
    let again = store.rewrap(10).await.unwrap();
    assert_eq!((again.rewrapped, again.already_primary), (0, 3));
}

#[tokio::test]
async fn no_intermediate_key_shows_in_debug_output() {
    let kms = CountingKms::new(ring_k1());
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), kms.clone());
    let k = key("alice");
    store.insert(&k, &record("at")).await.unwrap();
    store.load(&k).await.unwrap().unwrap();
    // A second process with the key in its read cache.
    let reader = EncryptedStore::new(inner, kms.clone());
    reader.load(&k).await.unwrap().unwrap();

    let keys = kms.wrapped_plain.lock().unwrap().clone();
    assert_eq!(keys.len(), 1);
    let ik = keys[0];
    let b64 = base64::engine::general_purpose::STANDARD.encode(ik);
    let forbidden = [
        format!("{ik:?}"),
        format!("{:?}", &ik[..8]).trim_end_matches(']').to_owned(),
        b64[..16].to_owned(),
        ik.iter().map(|b| format!("{b:02x}")).collect::<String>()[..16].to_owned(),
    ];
    for text in [
        format!("{store:?}"),
        format!("{store:#?}"),
        format!("{reader:?}"),
        format!("{reader:#?}"),
    ] {
        for f in &forbidden {
            assert!(
                !text.contains(f.as_str()),
                "debug output shows the key: {text}"
            );
        }
        assert!(text.contains("key_cache"), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Turning encryption on for a store that holds plain records.

#[tokio::test]
async fn plain_records_read_only_with_the_opt_in_and_rewrap_encrypts_them() {
    let inner = Arc::new(MemoryStore::new());
    // Written before encryption: plain JSON payloads, as the broker writes them.
    let plain: Vec<TokenKey> = (0..5).map(|i| key(&format!("plain-{i}"))).collect();
    for (i, k) in plain.iter().enumerate() {
        inner.insert(k, &record(&format!("at-{i}"))).await.unwrap();
    }
    // One plain record whose refresh is under way: its lease is held.
    let LeaseAttempt::Acquired(held) = inner
        .try_lease(
            &plain[4],
            &LeaseHolder::new("refresher"),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
    else {
        panic!("lease not acquired");
    };
    // Garbage that starts like JSON, and an envelope whose format byte became `{`.
    let (not_json, forged) = (key("not-json"), key("forged"));
    put_raw(&inner, &not_json, b"{\"v\":1, garbage".to_vec()).await;
    let sealer = EncryptedStore::new(inner.clone(), ring_k2());
    sealer.insert(&forged, &record("at-forged")).await.unwrap();
    let mut bytes = raw(&inner, &forged)
        .await
        .record
        .payload
        .expose_secret()
        .to_vec();
    bytes[0] = b'{';
    put_raw(&inner, &forged, bytes).await;

    // Without the opt-in, plain records are corrupt.
    let strict = EncryptedStore::new(inner.clone(), ring_k2());
    let reason = corrupt_reason(strict.load(&plain[0]).await);
    assert!(reason.contains("not encrypted"), "{reason}");

    // With it, they read as they are, and are counted.
    let store = EncryptedStore::new(inner.clone(), ring_k2()).accept_plain_records(true);
    for (i, k) in plain.iter().enumerate() {
        assert_eq!(
            access_token(&store.load(k).await.unwrap().unwrap()),
            format!("at-{i}")
        );
    }
    store.load(&plain[0]).await.unwrap().unwrap();
    assert_eq!(store.plain_records_served(), 6);
    // Not for anything that is not one JSON object.
    for k in [&not_json, &forged] {
        let reason = corrupt_reason(store.load(k).await);
        assert!(reason.contains("not one JSON object"), "{k}: {reason}");
    }
    // Writes encrypt as always.
    let new = key("new");
    store.insert(&new, &record("at-new")).await.unwrap();
    assert_eq!(key_id_of(&raw(&inner, &new).await), Some(id("k2")));

    // Without the opt-in, a rewrap leaves plain records alone: the four it could lease are
    // counted as corrupt, with the two that are not plain.
    let report = strict.rewrap(3).await.unwrap();
    assert_eq!(
        (report.encrypted_plain, report.corrupt, report.skipped_busy),
        (0, 4 + 2, 1),
        "{report:?}"
    );
    assert_eq!(key_id_of(&raw(&inner, &plain[0]).await), None);

    // With it, the rewrap encrypts them, under the lease and fenced, skipping the busy one.
    let report = store.rewrap(3).await.unwrap();
    assert_eq!(report.scanned, 8, "{report:?}");
    assert_eq!(report.encrypted_plain, 4, "{report:?}");
    assert_eq!(report.skipped_busy, 1, "{report:?}");
    assert_eq!(report.already_primary, 1, "{report:?}");
    assert_eq!(report.corrupt, 2, "{report:?}");
    assert_eq!(report.rewrapped, 0, "{report:?}");
    assert_eq!(
        store.plain_records_served(),
        6,
        "a rewrap's reads are not served"
    );
    assert_eq!(key_id_of(&raw(&inner, &plain[4]).await), None);
    inner.release_lease(&held).await.unwrap();
    let report = store.rewrap(3).await.unwrap();
    assert_eq!(
        (
            report.encrypted_plain,
            report.already_primary,
            report.corrupt
        ),
        (1, 4 + 1, 2),
        "{report:?}"
    );
    assert_no_lease_held(&*inner, &plain).await;

    // Every plain record is now an envelope, and reads without the opt-in.
    let after = EncryptedStore::new(inner.clone(), ring_k2());
    for (i, k) in plain.iter().enumerate() {
        let stored = raw(&inner, k).await;
        assert_eq!(key_id_of(&stored), Some(id("k2")), "{k}");
        assert!(!contains(
            stored.record.payload.expose_secret(),
            format!("at-{i}").as_bytes()
        ));
        assert_eq!(
            access_token(&after.load(k).await.unwrap().unwrap()),
            format!("at-{i}")
        );
    }
    assert_eq!(after.plain_records_served(), 0);
}

/// With plain records accepted, a tampered envelope is still never read as plain: every flipped
/// byte and every truncation of an envelope stays corrupt.
#[tokio::test]
async fn the_opt_in_lets_no_tampered_envelope_through() {
    let inner = Arc::new(MemoryStore::new());
    let store = EncryptedStore::new(inner.clone(), ring_k1()).accept_plain_records(true);
    let k = key("alice");
    store.insert(&k, &record("at")).await.unwrap();
    let good = raw(&inner, &k)
        .await
        .record
        .payload
        .expose_secret()
        .to_vec();
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xFF] {
            let mut bad = good.clone();
            bad[i] ^= mask;
            put_raw(&inner, &k, bad).await;
            corrupt_reason(store.load(&k).await);
        }
    }
    for len in 0..good.len() {
        put_raw(&inner, &k, good[..len].to_vec()).await;
        corrupt_reason(store.load(&k).await);
    }
    put_raw(&inner, &k, good).await;
    assert_eq!(access_token(&store.load(&k).await.unwrap().unwrap()), "at");
    assert_eq!(store.plain_records_served(), 0);
}
