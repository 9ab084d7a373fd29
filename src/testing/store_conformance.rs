//! The [`TokenStore`] conformance suite: the contract every store must keep, as executable
//! checks.
//!
//! The broker's refresh protocol is only as correct as the store under it: a compare-and-swap
//! that lets two writers win, a lease two holders can take, or a version that comes back after a
//! delete each lead to a refresh token spent twice or a write lost. Run this suite on your own
//! store before trusting it with users' tokens. Every store in this crate passes it.
//!
//! Each check is a public async function that panics with a message naming the broken rule.
//! The checks use their own random realm, so they can share one store (and one database) with
//! each other and with other data; only the `scan` checks read other realms' links, and they
//! tolerate them.
//!
//! Run everything at once with [`run_all`], or get one `#[tokio::test]` per check with
//! [`store_conformance_tests!`](crate::store_conformance_tests):
//!
//! ```
//! use std::sync::Arc;
//! use tokenbroker::{MemoryStore, TokenStore};
//! use tokenbroker::testing::store_conformance;
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
//! store_conformance::run_all(&store).await;
//! # });
//! ```
//!
//! Leases are checked with real time (a short TTL and polling), because a store judges leases by
//! its own clock, which for a database is the server's. To learn that a lease has expired
//! without taking it over, a check takes a second lease with the same TTL on a probe key right
//! after it, and polls the probe: once the probe can be taken, the store's clock is past the
//! first lease's expiry too.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::ids::{ProviderId, Realm, Subject, TokenKey};
use crate::store::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, LinkState, PendingRevocation, Record, RecordMeta,
    RevocationId, ScanCursor, ScannedLink, StoreError, TokenStore, Version,
};
use crate::token::Payload;

/// A store as the checks take it: shared, so that concurrency checks can hand it to tasks.
pub type SharedStore = Arc<dyn TokenStore>;

/// The lease TTL used by the checks that wait for a lease to expire.
pub const SHORT_LEASE: Duration = Duration::from_millis(300);

/// How long the expiry checks wait for an expired lease to become free before failing.
const LEASE_EXPIRY_PATIENCE: Duration = Duration::from_secs(20);

/// How many tasks race in the concurrency checks.
pub const RACERS: usize = 32;

/// The list of checks, kept once: it hands the names to the macro named in `callback`, after
/// the tokens in `context`, so that [`run_all`] and
/// [`store_conformance_tests!`](crate::store_conformance_tests) cannot drift apart.
#[doc(hidden)]
#[macro_export]
macro_rules! __store_conformance_checks {
    (callback = [$($callback:tt)*], context = [$($context:tt)*]) => {
        $($callback)*! { $($context)* ;
            load_missing, insert_and_load, insert_existing_conflicts, compare_and_swap_replaces,
            compare_and_swap_stale_conflicts, compare_and_swap_missing_conflicts,
            versions_never_repeat, delete_semantics, list_by_subject, list_is_case_sensitive,
            realms_are_isolated, scan_visits_every_link_once,
            scan_during_writes_returns_survivors_once, scan_rejects_a_foreign_cursor,
            metadata_round_trips, inserted_metadata_round_trips, large_and_odd_values,
            lease_is_exclusive, lease_on_missing_key, lease_reports_its_expiry, lease_expires,
            short_lease_is_held_until_it_expires, lease_is_independent_of_writes,
            delete_drops_lease, lease_of_a_deleted_record_is_gone,
            stale_lease_token_is_fenced_out, expired_lease_not_taken_over_stays_current,
            fenced_write_with_current_token_succeeds, extend_lease_moves_expiry,
            released_lease_token_cannot_write, released_lease_token_cannot_release_the_next,
            unfenced_write_ignores_lease,
            concurrent_compare_and_swap_has_one_winner, concurrent_insert_has_one_winner,
            concurrent_lease_has_one_holder, outbox_delete_and_enqueue_is_atomic,
            outbox_claim_reschedule_remove, outbox_concurrent_claims_are_disjoint,
            instances_and_readers_refresh_once_per_expiry }
    };
}

/// Runs every check, one after the other, panicking at the first broken rule.
///
/// The outbox checks claim every outbox entry due before their own instants, which lie in the
/// 1970s–1990s: never run them on a store whose outbox a broker drains, and do not run two of
/// them at once on one store.
pub async fn run_all(store: &SharedStore) {
    macro_rules! run_each {
        ($store:ident ; $($check:ident),* $(,)?) => {
            $( $check($store).await; )*
        };
    }
    crate::__store_conformance_checks!(callback = [run_each], context = [store]);
}

/// Generates one `#[tokio::test]` per conformance check, each on a store made by the given
/// async expression (evaluated once per test, so each test may get a fresh store).
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
///
/// ```
/// mod memory_store_conformance {
///     use std::sync::Arc;
///     use tokenbroker::{MemoryStore, TokenStore};
///
///     tokenbroker::store_conformance_tests!(async {
///         Arc::new(MemoryStore::new()) as Arc<dyn TokenStore>
///     });
/// }
/// ```
#[macro_export]
macro_rules! store_conformance_tests {
    ($make:expr) => {
        $crate::__store_conformance_checks!(
            callback = [$crate::store_conformance_tests],
            context = [@each $make]
        );
    };
    (@each $make:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let store: $crate::testing::store_conformance::SharedStore = $make.await;
                $crate::testing::store_conformance::$check(&store).await;
            }
        )*
    };
}

/// A realm no other check (or earlier run) uses.
fn fresh_realm() -> Realm {
    Realm::new(format!("conformance-{}", crate::secret::random_token(8)))
        .expect("generated realm is valid")
}

fn key(realm: &Realm, subject: &str, provider: &str) -> TokenKey {
    TokenKey::new(
        realm.clone(),
        Subject::new(subject).expect("valid subject"),
        ProviderId::new(provider).expect("valid provider"),
    )
}

/// Now, cut to whole milliseconds: stores must keep times at least to the millisecond.
fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.millisecond() as u32 * 1_000_000)
        .expect("valid nanosecond")
}

fn record(bytes: &[u8]) -> Record {
    let now = now_ms();
    Record::new(
        Payload::new(bytes.to_vec()),
        RecordMeta::new(
            LinkState::Active,
            Some(now + Duration::from_secs(3600)),
            now,
            now,
        ),
    )
}

async fn must_insert(store: &SharedStore, key: &TokenKey, bytes: &[u8]) -> Version {
    store
        .insert(key, &record(bytes))
        .await
        .unwrap_or_else(|e| panic!("insert of a new key failed: {e}"))
}

async fn payload_of(store: &SharedStore, key: &TokenKey) -> Option<Vec<u8>> {
    store
        .load(key)
        .await
        .unwrap_or_else(|e| panic!("load failed: {e}"))
        .map(|r| r.record.payload.expose_secret().to_vec())
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("{what}: expected StoreError::Conflict, got {other:?}"),
    }
}

/// Takes a lease on a key that is expected to be free.
async fn must_lease(
    store: &SharedStore,
    key: &TokenKey,
    holder: &LeaseHolder,
    ttl: Duration,
) -> Lease {
    match store.try_lease(key, holder, ttl).await.expect("lease") {
        LeaseAttempt::Acquired(lease) => lease,
        other => panic!("a lease on a free key was not acquired: {other:?}"),
    }
}

/// Polls `try_lease` until the key's current lease has expired by the store's clock and
/// `holder` gets it; panics after [`LEASE_EXPIRY_PATIENCE`].
async fn lease_after_expiry(
    store: &SharedStore,
    key: &TokenKey,
    holder: &LeaseHolder,
    ttl: Duration,
) -> Lease {
    let deadline = tokio::time::Instant::now() + LEASE_EXPIRY_PATIENCE;
    loop {
        match store.try_lease(key, holder, ttl).await.expect("lease") {
            LeaseAttempt::Acquired(lease) => return lease,
            LeaseAttempt::Busy => {}
            LeaseAttempt::Missing => panic!("the record vanished"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a lease with a {SHORT_LEASE:?} TTL was still held after {LEASE_EXPIRY_PATIENCE:?}"
        );
        tokio::time::sleep(SHORT_LEASE / 4).await;
    }
}

/// A probe for "has a lease taken just before now expired?", judged by the store's clock:
/// leases `probe` for [`SHORT_LEASE`] now; [`ExpiryProbe::wait`] returns once that lease has
/// expired, hence every lease of at most [`SHORT_LEASE`] taken before the probe too.
struct ExpiryProbe {
    key: TokenKey,
}

impl ExpiryProbe {
    async fn start(store: &SharedStore, realm: &Realm) -> Self {
        let key = key(realm, "expiry-probe", "example");
        must_insert(store, &key, b"probe").await;
        must_lease(store, &key, &LeaseHolder::random(), SHORT_LEASE).await;
        ExpiryProbe { key }
    }

    async fn wait(self, store: &SharedStore) {
        let lease = lease_after_expiry(store, &self.key, &LeaseHolder::random(), SHORT_LEASE).await;
        store.release_lease(&lease).await.expect("release");
    }
}

/// Whether another holder finds the key's lease busy.
async fn held_by_someone(store: &SharedStore, key: &TokenKey) -> bool {
    match store
        .try_lease(key, &LeaseHolder::random(), Duration::from_secs(60))
        .await
        .expect("lease")
    {
        LeaseAttempt::Busy => true,
        LeaseAttempt::Acquired(lease) => {
            store.release_lease(&lease).await.expect("release");
            false
        }
        LeaseAttempt::Missing => panic!("the record vanished"),
    }
}

/// `load` of a key that was never written is `Ok(None)`.
pub async fn load_missing(store: &SharedStore) {
    let k = key(&fresh_realm(), "nobody", "example");
    let loaded = store
        .load(&k)
        .await
        .expect("load of a missing key is not an error");
    assert!(loaded.is_none(), "load of a missing key returned a record");
}

/// What `insert` wrote, `load` returns, with the version `insert` returned.
pub async fn insert_and_load(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let rec = record(b"payload-1");
    let v = store.insert(&k, &rec).await.expect("insert");
    let loaded = store.load(&k).await.expect("load").expect("record present");
    assert_eq!(
        loaded.version, v,
        "load returned another version than insert"
    );
    assert_eq!(loaded.record.payload.expose_secret(), b"payload-1");
    assert_eq!(loaded.record.meta, rec.meta, "metadata changed on the way");
}

/// `insert` on a present key is a conflict and leaves the record as it was.
pub async fn insert_existing_conflicts(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v = must_insert(store, &k, b"first").await;
    assert_conflict(
        store.insert(&k, &record(b"second")).await,
        "insert over a record",
    );
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(loaded.record.payload.expose_secret(), b"first");
    assert_eq!(loaded.version, v, "a refused insert changed the version");
}

/// `compare_and_swap` with the current version writes and returns a new version.
pub async fn compare_and_swap_replaces(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v1 = must_insert(store, &k, b"one").await;
    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"two"), None)
        .await
        .expect("CAS with the current version");
    assert_ne!(v1, v2, "a write must produce a new version");
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(loaded.version, v2);
    assert_eq!(loaded.record.payload.expose_secret(), b"two");
}

/// `compare_and_swap` with an old version is a conflict and writes nothing.
pub async fn compare_and_swap_stale_conflicts(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v1 = must_insert(store, &k, b"one").await;
    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"two"), None)
        .await
        .expect("CAS");
    assert_conflict(
        store
            .compare_and_swap(&k, v1.clone(), &record(b"three"), None)
            .await,
        "CAS with a stale version",
    );
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(loaded.version, v2);
    assert_eq!(loaded.record.payload.expose_secret(), b"two");
}

/// `compare_and_swap` on a missing key is a conflict and creates nothing.
pub async fn compare_and_swap_missing_conflicts(store: &SharedStore) {
    let realm = fresh_realm();
    let k = key(&realm, "alice", "example");
    // A version that some other key really has, so a store that ignores the key is caught.
    let other = key(&realm, "bob", "example");
    let v = must_insert(store, &other, b"bob").await;
    assert_conflict(
        store
            .compare_and_swap(&k, v.clone(), &record(b"x"), None)
            .await,
        "CAS on a missing key",
    );
    assert!(
        payload_of(store, &k).await.is_none(),
        "CAS created a record"
    );
}

/// Every write gives a version the key never had, also across delete and re-insert.
pub async fn versions_never_repeat(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let mut seen = HashSet::new();
    for round in 0..3 {
        let mut v = must_insert(store, &k, b"a").await;
        assert!(
            seen.insert(v.clone()),
            "version {v} repeated after re-insert (round {round})"
        );
        for _ in 0..3 {
            v = store
                .compare_and_swap(&k, v.clone(), &record(b"b"), None)
                .await
                .expect("CAS");
            assert!(seen.insert(v.clone()), "version {v} repeated after CAS");
        }
        assert!(store.delete(&k, Some(v.clone())).await.expect("delete"));
    }
}

/// `delete` with a version deletes only that version; without one, whatever is there.
pub async fn delete_semantics(store: &SharedStore) {
    let realm = fresh_realm();
    let k = key(&realm, "alice", "example");
    assert!(
        !store
            .delete(&k, None)
            .await
            .expect("delete of a missing key"),
        "deleting a missing key reported a deletion"
    );
    let v1 = must_insert(store, &k, b"one").await;
    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"two"), None)
        .await
        .expect("CAS");
    assert_conflict(
        store.delete(&k, Some(v1.clone())).await,
        "delete with a stale version",
    );
    assert!(
        payload_of(store, &k).await.is_some(),
        "a refused delete deleted"
    );
    assert!(
        store
            .delete(&k, Some(v2.clone()))
            .await
            .expect("delete with the version")
    );
    assert!(
        payload_of(store, &k).await.is_none(),
        "record still there after delete"
    );
    assert!(
        !store
            .delete(&k, Some(v2.clone()))
            .await
            .expect("second delete"),
        "deleting a missing key with a version must answer Ok(false)"
    );
    must_insert(store, &k, b"three").await;
    assert!(store.delete(&k, None).await.expect("unconditional delete"));
    assert!(payload_of(store, &k).await.is_none());
}

/// `list` returns one subject's keys in one realm, and nothing else.
pub async fn list_by_subject(store: &SharedStore) {
    let realm = fresh_realm();
    for provider in ["github", "google", "microsoft"] {
        must_insert(store, &key(&realm, "alice", provider), b"a").await;
    }
    must_insert(store, &key(&realm, "bob", "google"), b"b").await;
    // A subject that is a prefix of another must not match it.
    must_insert(store, &key(&realm, "alice2", "google"), b"c").await;
    let alice = Subject::new("alice").expect("subject");
    let mut listed = store.list(&realm, &alice).await.expect("list");
    listed.sort();
    let expected: Vec<TokenKey> = ["github", "google", "microsoft"]
        .iter()
        .map(|p| key(&realm, "alice", p))
        .collect();
    assert_eq!(listed, expected, "list returned the wrong keys");
    let nobody = Subject::new("nobody").expect("subject");
    assert!(store.list(&realm, &nobody).await.expect("list").is_empty());
}

/// `list` matches the subject exactly, case included: `Alice` is another subject than `alice`.
pub async fn list_is_case_sensitive(store: &SharedStore) {
    let realm = fresh_realm();
    let lower = key(&realm, "alice", "google");
    let upper = key(&realm, "Alice", "github");
    must_insert(store, &lower, b"lower").await;
    must_insert(store, &upper, b"upper").await;
    for (subject, expected) in [
        ("alice", vec![lower.clone()]),
        ("Alice", vec![upper.clone()]),
        ("ALICE", vec![]),
    ] {
        let subject = Subject::new(subject).expect("subject");
        assert_eq!(
            store.list(&realm, &subject).await.expect("list"),
            expected,
            "list of {subject} ignored the case of subjects"
        );
    }
    assert_eq!(
        payload_of(store, &lower).await.as_deref(),
        Some(&b"lower"[..])
    );
    assert_eq!(
        payload_of(store, &upper).await.as_deref(),
        Some(&b"upper"[..])
    );
}

/// The same subject and provider in two realms are two independent records.
pub async fn realms_are_isolated(store: &SharedStore) {
    let (r1, r2) = (fresh_realm(), fresh_realm());
    let (k1, k2) = (key(&r1, "alice", "google"), key(&r2, "alice", "google"));
    let v1 = must_insert(store, &k1, b"realm-1").await;
    assert!(
        payload_of(store, &k2).await.is_none(),
        "a record leaked into another realm"
    );
    must_insert(store, &k2, b"realm-2").await;
    store
        .compare_and_swap(&k1, v1.clone(), &record(b"realm-1b"), None)
        .await
        .expect("CAS");
    assert_eq!(
        payload_of(store, &k2).await.as_deref(),
        Some(&b"realm-2"[..])
    );
    let alice = Subject::new("alice").expect("subject");
    assert_eq!(
        store.list(&r2, &alice).await.expect("list"),
        vec![k2.clone()]
    );
    assert!(store.delete(&k1, None).await.expect("delete"));
    assert!(
        payload_of(store, &k2).await.is_some(),
        "delete reached another realm"
    );
}

/// One complete pass of `scan` in pages of `limit`: every link it returned, in the order it
/// returned them.
async fn scan_pass(store: &SharedStore, limit: usize) -> Vec<ScannedLink> {
    let mut walked = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    for _ in 0..1_000_000 {
        let page = store.scan(cursor.as_ref(), limit).await.expect("scan");
        assert!(
            page.links.len() <= limit.max(1),
            "scan returned {} links for a limit of {limit}",
            page.links.len()
        );
        walked.extend(page.links);
        match page.next {
            Some(next) => cursor = Some(next),
            None => return walked,
        }
    }
    panic!("a scan pass did not end: the cursor does not advance");
}

/// The keys of `realm` among `links`, each with how many times it was returned.
fn counted_in(realm: &Realm, links: &[ScannedLink]) -> BTreeMap<TokenKey, usize> {
    let mut counts = BTreeMap::new();
    for link in links.iter().filter(|l| &l.key.realm == realm) {
        *counts.entry(link.key.clone()).or_insert(0) += 1;
    }
    counts
}

/// A complete `scan` pass returns every link exactly once, with its version and metadata,
/// whatever the page size (0 is taken as 1); no order is assumed.
pub async fn scan_visits_every_link_once(store: &SharedStore) {
    let realm = fresh_realm();
    // Subjects whose byte order differs from "natural" or case-insensitive orders, for stores
    // that walk in key order.
    let subjects = ["A", "B", "a", "a b", "a-b", "ab", "b", "zz", "é", "😀"];
    let mut expected = BTreeMap::new();
    for s in subjects {
        for p in ["google", "github"] {
            let k = key(&realm, s, p);
            must_insert(store, &k, b"x").await;
            expected.insert(k, 1);
        }
    }
    for limit in [0, 1, 3, 7, 20, 1000] {
        let walked = scan_pass(store, limit).await;
        assert_eq!(
            counted_in(&realm, &walked),
            expected,
            "a scan pass in pages of {limit} missed, invented or repeated links"
        );
        if limit == 3 {
            for link in walked.iter().filter(|l| l.key.realm == realm) {
                let loaded = store.load(&link.key).await.expect("load").expect("present");
                assert_eq!(
                    link.version, loaded.version,
                    "scan reported another version"
                );
                assert_eq!(
                    link.meta, loaded.record.meta,
                    "scan reported other metadata"
                );
            }
        }
    }
}

/// Links written and deleted during a pass: every link that exists throughout is returned
/// exactly once, and no link more than once.
pub async fn scan_during_writes_returns_survivors_once(store: &SharedStore) {
    let realm = fresh_realm();
    let mut kept = BTreeMap::new();
    let mut doomed = Vec::new();
    for i in 0..30 {
        let k = key(&realm, &format!("user-{i:02}"), "example");
        let v = must_insert(store, &k, b"x").await;
        if i % 3 == 0 {
            doomed.push((k, v));
        } else {
            kept.insert(k, 1);
        }
    }
    let mut walked = Vec::new();
    let mut cursor: Option<ScanCursor> = None;
    let mut round = 0;
    loop {
        let page = store.scan(cursor.as_ref(), 4).await.expect("scan");
        walked.extend(page.links);
        // Between pages: delete one doomed link, add a new one, rewrite a kept one.
        if let Some((k, v)) = doomed.pop() {
            assert!(store.delete(&k, Some(v)).await.expect("delete"));
        }
        must_insert(
            store,
            &key(&realm, &format!("new-{round:02}"), "example"),
            b"y",
        )
        .await;
        let (rewrite, _) = kept.iter().nth(round % kept.len()).expect("a kept link");
        let current = store.load(rewrite).await.expect("load").expect("present");
        store
            .compare_and_swap(rewrite, current.version, &record(b"z"), None)
            .await
            .expect("CAS during the pass");
        round += 1;
        assert!(round < 10_000, "a scan pass did not end");
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let counts = counted_in(&realm, &walked);
    for (k, n) in &counts {
        assert_eq!(*n, 1, "{k} was returned {n} times in one pass");
    }
    for k in kept.keys() {
        assert!(
            counts.contains_key(k),
            "{k} existed throughout the pass and was not returned"
        );
    }
}

/// A cursor the store did not make is [`StoreError::InvalidCursor`], not a panic or a pass
/// from the start.
pub async fn scan_rejects_a_foreign_cursor(store: &SharedStore) {
    let foreign = ScanCursor::new("\u{0}not a cursor of any store\u{0}");
    match store.scan(Some(&foreign), 10).await {
        Err(StoreError::InvalidCursor { .. }) => {}
        other => panic!("a foreign scan cursor gave {other:?}, not StoreError::InvalidCursor"),
    }
}

/// Metadata comes back as written: relink-required state with its reason and time, no expiry.
pub async fn metadata_round_trips(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v = must_insert(store, &k, b"x").await;
    let since = now_ms();
    let meta = RecordMeta::new(
        LinkState::RelinkRequired {
            reason: "Token has been expired or revoked. 'quoted' \"double\" ✓".into(),
            since,
        },
        None,
        since - Duration::from_secs(86_400),
        since,
    );
    let rec = Record::new(Payload::new(b"y".to_vec()), meta.clone());
    store
        .compare_and_swap(&k, v.clone(), &rec, None)
        .await
        .expect("CAS");
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(loaded.record.meta, meta, "metadata changed on the way");
}

/// Metadata comes back as `insert` wrote it too: relink-required state with its reason and
/// time, and an expiry.
pub async fn inserted_metadata_round_trips(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let now = now_ms();
    let meta = RecordMeta::new(
        LinkState::RelinkRequired {
            reason: "invalid_grant: revoked".into(),
            since: now - Duration::from_secs(60),
        },
        Some(now + Duration::from_secs(600)),
        now - Duration::from_secs(3600),
        now,
    );
    let v = store
        .insert(&k, &Record::new(Payload::new(b"x".to_vec()), meta.clone()))
        .await
        .expect("insert");
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(
        loaded.version, v,
        "load returned another version than insert"
    );
    assert_eq!(loaded.record.meta, meta, "metadata changed on the way");
}

/// Large payloads, every byte value, and subjects with quotes and SQL-looking text survive.
pub async fn large_and_odd_values(store: &SharedStore) {
    let realm = fresh_realm();
    let big: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 31 % 256) as u8).collect();
    let k = key(&realm, "alice", "example");
    must_insert(store, &k, &big).await;
    assert!(
        payload_of(store, &k).await.as_deref() == Some(&big[..]),
        "1 MiB payload changed"
    );
    for subject in [
        "o'brien",
        "\"; DROP TABLE links; --",
        "日本語",
        "a\\b",
        "%_*?",
    ] {
        let k = key(&realm, subject, "example");
        must_insert(store, &k, subject.as_bytes()).await;
        assert_eq!(
            payload_of(store, &k).await.as_deref(),
            Some(subject.as_bytes())
        );
    }
    let empty = key(&realm, "empty", "example");
    must_insert(store, &empty, b"").await;
    assert_eq!(payload_of(store, &empty).await.as_deref(), Some(&b""[..]));
}

/// One holder at a time; not re-entrant; only the lease's token releases it; release is
/// idempotent.
pub async fn lease_is_exclusive(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let (a, b) = (LeaseHolder::random(), LeaseHolder::random());
    let ttl = Duration::from_secs(60);
    let LeaseAttempt::Acquired(lease) = store.try_lease(&k, &a, ttl).await.expect("lease") else {
        panic!("the first lease on a free key was not acquired");
    };
    assert_eq!(lease.key, k);
    assert_eq!(lease.holder, a);
    assert_eq!(
        store.try_lease(&k, &b, ttl).await.expect("lease"),
        LeaseAttempt::Busy
    );
    assert_eq!(
        store.try_lease(&k, &a, ttl).await.expect("lease"),
        LeaseAttempt::Busy,
        "leases must not be re-entrant"
    );
    // A release with another token (a forged lease) frees nothing, even from the holder.
    let mut forged = lease.clone();
    forged.token = LeaseToken::random();
    store.release_lease(&forged).await.expect("release");
    assert_eq!(
        store.try_lease(&k, &b, ttl).await.expect("lease"),
        LeaseAttempt::Busy,
        "a release with a token that was never handed out freed the lease"
    );
    store.release_lease(&lease).await.expect("release");
    store
        .release_lease(&lease)
        .await
        .expect("a second release is not an error");
    assert!(
        matches!(
            store.try_lease(&k, &b, ttl).await.expect("lease"),
            LeaseAttempt::Acquired(_)
        ),
        "a released lease could not be taken"
    );
}

/// A lease on a key without a record is `Missing`.
pub async fn lease_on_missing_key(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let attempt = store
        .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(60))
        .await
        .expect("lease");
    assert_eq!(attempt, LeaseAttempt::Missing);
}

/// How far a store's clock may be from the test's in [`lease_reports_its_expiry`], the one
/// check that compares them.
const CLOCK_SKEW_TOLERANCE: Duration = Duration::from_secs(300);

/// `try_lease` reports when the lease expires: its TTL after the store's clock took it. Two
/// leases with TTLs a minute apart, taken one after the other, expire a minute apart (give or
/// take the time between them), whatever the store's clock says; and that clock is within
/// five minutes of the test's.
pub async fn lease_reports_its_expiry(store: &SharedStore) {
    let realm = fresh_realm();
    let (k1, k2) = (
        key(&realm, "alice", "example"),
        key(&realm, "bob", "example"),
    );
    must_insert(store, &k1, b"x").await;
    must_insert(store, &k2, b"x").await;
    let minute = Duration::from_secs(60);
    let before = OffsetDateTime::now_utc();
    let started = tokio::time::Instant::now();
    let first = must_lease(store, &k1, &LeaseHolder::random(), minute).await;
    let second = must_lease(store, &k2, &LeaseHolder::random(), 2 * minute).await;
    let took = started.elapsed();
    let gap = second.expires_at - first.expires_at;
    let slack = Duration::from_secs(1);
    assert!(
        gap >= minute - slack && gap <= minute + took + slack,
        "leases of 60 s and 120 s taken {took:?} apart expire {gap} apart"
    );
    let off = first.expires_at - (before + minute);
    assert!(
        off.unsigned_abs() <= CLOCK_SKEW_TOLERANCE + took,
        "a 60 s lease taken at {before} expires at {}",
        first.expires_at
    );
    store.release_lease(&first).await.expect("release");
    store.release_lease(&second).await.expect("release");
}

/// A lease expires after its TTL by the store's clock, and then anyone may take it; the old
/// holder's late release does not free the new holder's lease, which has a token of its own.
pub async fn lease_expires(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let (a, b) = (LeaseHolder::random(), LeaseHolder::random());
    let old = must_lease(store, &k, &a, SHORT_LEASE).await;
    let new = lease_after_expiry(store, &k, &b, SHORT_LEASE * 100).await;
    assert_ne!(
        old.token, new.token,
        "two acquisitions of one key got the same lease token"
    );
    store.release_lease(&old).await.expect("late release");
    assert_eq!(
        store.try_lease(&k, &a, SHORT_LEASE).await.expect("lease"),
        LeaseAttempt::Busy,
        "the expired holder's release freed the new holder's lease"
    );
    store.release_lease(&new).await.expect("release");
}

/// A lease with a short TTL ([`SHORT_LEASE`]) is held until it expires, not rounded down to
/// nothing (as an expiry in whole seconds would): another holder finds it busy right after it
/// was taken. (When the store answered too slowly to tell, the check passes.)
pub async fn short_lease_is_held_until_it_expires(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let started = tokio::time::Instant::now();
    let lease = must_lease(store, &k, &LeaseHolder::random(), SHORT_LEASE).await;
    match store
        .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(60))
        .await
        .expect("lease")
    {
        LeaseAttempt::Busy => store.release_lease(&lease).await.expect("release"),
        LeaseAttempt::Acquired(other) => {
            assert!(
                started.elapsed() >= SHORT_LEASE,
                "a lease with a {SHORT_LEASE:?} TTL was free again at once"
            );
            store.release_lease(&other).await.expect("release");
        }
        LeaseAttempt::Missing => panic!("the record vanished"),
    }
}

/// Taking a lease does not change the version, and writes succeed whoever holds the lease.
pub async fn lease_is_independent_of_writes(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v1 = must_insert(store, &k, b"x").await;
    let holder = LeaseHolder::random();
    let LeaseAttempt::Acquired(lease) = store
        .try_lease(&k, &holder, Duration::from_secs(60))
        .await
        .expect("lease")
    else {
        panic!("lease not acquired");
    };
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(loaded.version, v1, "taking a lease changed the version");
    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"y"), None)
        .await
        .expect("a CAS must not need the lease");
    assert_eq!(
        store
            .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(60))
            .await
            .expect("lease"),
        LeaseAttempt::Busy,
        "a write dropped the lease"
    );
    store.release_lease(&lease).await.expect("release");
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(loaded.version, v2, "releasing a lease changed the version");
}

/// Deleting a record drops its lease: a new record under the key is free to lease.
pub async fn delete_drops_lease(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let holder = LeaseHolder::random();
    let attempt = store
        .try_lease(&k, &holder, Duration::from_secs(600))
        .await
        .expect("lease");
    assert!(matches!(attempt, LeaseAttempt::Acquired(_)));
    assert!(store.delete(&k, None).await.expect("delete"));
    must_insert(store, &k, b"y").await;
    assert!(
        matches!(
            store
                .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(60))
                .await
                .expect("lease"),
            LeaseAttempt::Acquired(_)
        ),
        "a deleted record's lease survived into the new record"
    );
}

/// Deleting a leased record ends the lease: the key is `Missing` to a lease, and the old
/// lease's token does not release the lease of a record inserted under the key again.
pub async fn lease_of_a_deleted_record_is_gone(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let old = must_lease(store, &k, &LeaseHolder::random(), Duration::from_secs(600)).await;
    assert!(store.delete(&k, None).await.expect("delete"));
    assert_eq!(
        store
            .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(60))
            .await
            .expect("lease"),
        LeaseAttempt::Missing,
        "a deleted record's lease still answers"
    );
    must_insert(store, &k, b"y").await;
    let new = must_lease(store, &k, &LeaseHolder::random(), Duration::from_secs(60)).await;
    store.release_lease(&old).await.expect("late release");
    assert!(
        held_by_someone(store, &k).await,
        "the lease of a deleted record released the lease of the new one"
    );
    store.release_lease(&new).await.expect("release");
}

/// A lease token replaced by a later acquisition (here by the same holder, as an instance
/// whose refresh outlived its lease would) can neither release, extend nor write: the later
/// lease stays held and the record unchanged.
pub async fn stale_lease_token_is_fenced_out(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let holder = LeaseHolder::random();
    let stale = must_lease(store, &k, &holder, SHORT_LEASE).await;
    let current = lease_after_expiry(store, &k, &holder, Duration::from_secs(60)).await;
    assert_ne!(
        stale.token, current.token,
        "two acquisitions of one key got the same lease token"
    );
    let before = store.load(&k).await.expect("load").expect("present");

    store.release_lease(&stale).await.expect("release");
    assert!(
        held_by_someone(store, &k).await,
        "a stale lease token released a later acquisition by the same holder"
    );
    assert_eq!(
        store
            .extend_lease(&stale, Duration::from_secs(60))
            .await
            .expect("extend"),
        None,
        "a stale lease token was extended"
    );
    assert_conflict(
        store
            .compare_and_swap(
                &k,
                before.version.clone(),
                &record(b"stale"),
                Some(&stale.token),
            )
            .await,
        "a write fenced by a stale lease token",
    );
    let after = store.load(&k).await.expect("load").expect("present");
    assert_eq!(
        (after.version, after.record.payload.expose_secret()),
        (before.version, &b"x"[..]),
        "a write fenced by a stale lease token changed the record"
    );
    assert!(
        held_by_someone(store, &k).await,
        "the later acquisition was lost"
    );
    store.release_lease(&current).await.expect("release");
}

/// A lease that expired but was not taken over is still current: its token extends it and
/// writes under it.
pub async fn expired_lease_not_taken_over_stays_current(store: &SharedStore) {
    let realm = fresh_realm();
    let k = key(&realm, "alice", "example");
    let v1 = must_insert(store, &k, b"x").await;
    let lease = must_lease(store, &k, &LeaseHolder::random(), SHORT_LEASE).await;
    ExpiryProbe::start(store, &realm).await.wait(store).await;

    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"late"), Some(&lease.token))
        .await
        .unwrap_or_else(|e| {
            panic!("a write fenced by an expired lease that nobody took over failed: {e}")
        });
    assert_eq!(payload_of(store, &k).await.as_deref(), Some(&b"late"[..]));
    let extended = store
        .extend_lease(&lease, Duration::from_secs(60))
        .await
        .expect("extend")
        .unwrap_or_else(|| panic!("an expired lease that nobody took over was not extended"));
    assert_eq!(
        (&extended.key, &extended.holder, &extended.token),
        (&lease.key, &lease.holder, &lease.token),
        "extend_lease changed the lease's key, holder or token"
    );
    assert!(
        held_by_someone(store, &k).await,
        "an extended lease was free to take"
    );
    store
        .compare_and_swap(&k, v2.clone(), &record(b"later"), Some(&extended.token))
        .await
        .expect("a write fenced by an extended lease");
    store.release_lease(&extended).await.expect("release");
    assert!(
        !held_by_someone(store, &k).await,
        "releasing an extended lease did not free it"
    );
}

/// A write fenced by the current lease token succeeds and keeps the lease; a fence on a key
/// that has no lease is a conflict.
pub async fn fenced_write_with_current_token_succeeds(store: &SharedStore) {
    let realm = fresh_realm();
    let k = key(&realm, "alice", "example");
    let v1 = must_insert(store, &k, b"x").await;
    let lease = must_lease(store, &k, &LeaseHolder::random(), Duration::from_secs(60)).await;
    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"fenced"), Some(&lease.token))
        .await
        .unwrap_or_else(|e| panic!("a write fenced by the current lease token failed: {e}"));
    assert_ne!(v1, v2, "a write must produce a new version");
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(
        (loaded.version, loaded.record.payload.expose_secret()),
        (v2.clone(), &b"fenced"[..])
    );
    assert!(
        held_by_someone(store, &k).await,
        "a fenced write dropped the lease"
    );
    assert_conflict(
        store
            .compare_and_swap(&k, v1.clone(), &record(b"stale"), Some(&lease.token))
            .await,
        "a fenced write with a stale version",
    );
    store
        .compare_and_swap(&k, v2.clone(), &record(b"again"), Some(&lease.token))
        .await
        .expect("a second write under the same lease");
    store.release_lease(&lease).await.expect("release");

    let never_leased = key(&realm, "bob", "example");
    let v = must_insert(store, &never_leased, b"y").await;
    assert_conflict(
        store
            .compare_and_swap(
                &never_leased,
                v.clone(),
                &record(b"z"),
                Some(&LeaseToken::random()),
            )
            .await,
        "a write fenced by a token on a key that has no lease",
    );
    assert_eq!(
        payload_of(store, &never_leased).await.as_deref(),
        Some(&b"y"[..])
    );
}

/// `extend_lease` really moves the expiry: another holder stays `Busy` past the original TTL.
pub async fn extend_lease_moves_expiry(store: &SharedStore) {
    let realm = fresh_realm();
    let k = key(&realm, "alice", "example");
    must_insert(store, &k, b"x").await;
    let lease = must_lease(store, &k, &LeaseHolder::random(), SHORT_LEASE).await;
    let probe = ExpiryProbe::start(store, &realm).await;
    let extended = store
        .extend_lease(&lease, Duration::from_secs(60))
        .await
        .expect("extend")
        .unwrap_or_else(|| panic!("the current lease was not extended"));
    assert_eq!(
        (&extended.key, &extended.holder, &extended.token),
        (&lease.key, &lease.holder, &lease.token),
        "extend_lease changed the lease's key, holder or token"
    );
    assert!(
        extended.expires_at > lease.expires_at,
        "extend_lease did not report a later expiry ({} then {})",
        lease.expires_at,
        extended.expires_at
    );
    probe.wait(store).await;
    assert!(
        held_by_someone(store, &k).await,
        "an extended lease could be taken once its original TTL ran out"
    );
    // The token is unchanged, so the lease as first taken releases it.
    store.release_lease(&lease).await.expect("release");
    assert!(
        !held_by_someone(store, &k).await,
        "releasing an extended lease did not free it"
    );
}

/// A released lease token no longer writes, nor extends.
pub async fn released_lease_token_cannot_write(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v = must_insert(store, &k, b"x").await;
    let lease = must_lease(store, &k, &LeaseHolder::random(), Duration::from_secs(60)).await;
    store.release_lease(&lease).await.expect("release");
    assert_conflict(
        store
            .compare_and_swap(&k, v.clone(), &record(b"after-release"), Some(&lease.token))
            .await,
        "a write fenced by a released lease token",
    );
    assert_eq!(
        store
            .extend_lease(&lease, Duration::from_secs(60))
            .await
            .expect("extend"),
        None,
        "a released lease was extended"
    );
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(
        (loaded.version, loaded.record.payload.expose_secret()),
        (v, &b"x"[..]),
        "a write fenced by a released lease token changed the record"
    );
    assert!(
        !held_by_someone(store, &k).await,
        "extending a released lease took it again"
    );
}

/// A released lease token, released again after another holder took the lease, frees
/// nothing: the other holder keeps it.
pub async fn released_lease_token_cannot_release_the_next(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let first = must_lease(store, &k, &LeaseHolder::random(), Duration::from_secs(60)).await;
    store.release_lease(&first).await.expect("release");
    let next = must_lease(store, &k, &LeaseHolder::random(), Duration::from_secs(60)).await;
    store.release_lease(&first).await.expect("late release");
    assert!(
        held_by_someone(store, &k).await,
        "a released lease token released the next holder's lease"
    );
    assert_eq!(
        store
            .try_lease(&k, &first.holder, Duration::from_secs(60))
            .await
            .expect("lease"),
        LeaseAttempt::Busy,
        "the first holder took the lease back while the next one held it"
    );
    store.release_lease(&next).await.expect("release");
}

/// A write without a fence ignores the lease: it succeeds while another holder has the lease,
/// and neither frees nor replaces that lease's token.
pub async fn unfenced_write_ignores_lease(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v1 = must_insert(store, &k, b"x").await;
    let lease = must_lease(store, &k, &LeaseHolder::random(), Duration::from_secs(60)).await;
    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"unfenced"), None)
        .await
        .unwrap_or_else(|e| panic!("an unfenced write failed while a lease was held: {e}"));
    assert!(
        held_by_someone(store, &k).await,
        "an unfenced write dropped the lease"
    );
    store
        .compare_and_swap(&k, v2.clone(), &record(b"fenced"), Some(&lease.token))
        .await
        .unwrap_or_else(|e| {
            panic!("the lease token stopped being current after an unfenced write: {e}")
        });
    store.release_lease(&lease).await.expect("release");
    let v3 = store
        .load(&k)
        .await
        .expect("load")
        .expect("present")
        .version;
    store
        .compare_and_swap(&k, v3.clone(), &record(b"no-lease"), None)
        .await
        .unwrap_or_else(|e| panic!("an unfenced write failed on a key without a lease: {e}"));
}

/// Many tasks compare-and-swap on one version at once: exactly one wins, the rest conflict.
pub async fn concurrent_compare_and_swap_has_one_winner(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let v = must_insert(store, &k, b"start").await;
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let (store, k, v) = (store.clone(), k.clone(), v.clone());
        tasks.push(tokio::spawn(async move {
            let body = format!("writer-{i}");
            (
                i,
                store
                    .compare_and_swap(&k, v.clone(), &record(body.as_bytes()), None)
                    .await,
            )
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (i, result) = task.await.expect("task");
        match result {
            Ok(version) => winners.push((i, version)),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("concurrent CAS failed with something else than a conflict: {e}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "{} writers won the same version",
        winners.len()
    );
    let (i, version) = winners.swap_remove(0);
    let loaded = store.load(&k).await.expect("load").expect("present");
    assert_eq!(loaded.version, version);
    assert_eq!(
        loaded.record.payload.expose_secret(),
        format!("writer-{i}").as_bytes()
    );
}

/// Many tasks insert one new key at once: exactly one succeeds.
pub async fn concurrent_insert_has_one_winner(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let (store, k) = (store.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            store
                .insert(&k, &record(format!("inserter-{i}").as_bytes()))
                .await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => wins += 1,
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("concurrent insert failed with something else than a conflict: {e}"),
        }
    }
    assert_eq!(wins, 1, "{wins} inserts of one key succeeded");
}

/// Many holders try to lease one key at once: exactly one gets it.
pub async fn concurrent_lease_has_one_holder(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    must_insert(store, &k, b"x").await;
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let (store, k) = (store.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            store
                .try_lease(&k, &LeaseHolder::random(), Duration::from_secs(60))
                .await
        }));
    }
    let mut acquired = 0;
    for task in tasks {
        match task.await.expect("task").expect("lease") {
            LeaseAttempt::Acquired(_) => acquired += 1,
            LeaseAttempt::Busy => {}
            LeaseAttempt::Missing => panic!("the record vanished"),
        }
    }
    assert_eq!(acquired, 1, "{acquired} holders got the same lease");
}

// ---------------------------------------------------------------------------------------------
// The revocation outbox
// ---------------------------------------------------------------------------------------------

/// An instant of its own for one outbox check, in whole milliseconds, far in the past (so that
/// no real entry, due about now, is ever before it) and random (so that checks of earlier runs
/// on the same store are told apart by id, not by time).
fn outbox_instant() -> OffsetDateTime {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("randomness");
    // 1971 to about 2000.
    let ms = 31_536_000_000 + (u64::from_le_bytes(bytes) % 900_000_000_000) as i64;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).expect("in range")
}

fn revocation(key: &TokenKey, payload: &[u8], at: OffsetDateTime) -> PendingRevocation {
    PendingRevocation::from_parts(
        RevocationId::random(),
        key.clone(),
        Payload::new(payload.to_vec()),
        1,
        at,
        at,
    )
}

/// Claims everything due at `now` and returns those of `ids` (others' entries are claimed too,
/// and left so).
async fn claim_ours(
    store: &SharedStore,
    now: OffsetDateTime,
    until: OffsetDateTime,
    ids: &[&RevocationId],
) -> Vec<PendingRevocation> {
    store
        .claim_revocations(now, until, 100_000)
        .await
        .unwrap_or_else(|e| panic!("claim_revocations failed: {e}"))
        .into_iter()
        .filter(|r| ids.contains(&&r.id))
        .collect()
}

/// `delete_and_enqueue_revocation` deletes and writes the entry together, or neither: a stale
/// version and a missing key write no entry; entries are not links.
pub async fn outbox_delete_and_enqueue_is_atomic(store: &SharedStore) {
    let realm = fresh_realm();
    let k = key(&realm, "alice", "example");
    let at = outbox_instant();
    let later = at + Duration::from_secs(60);
    let v1 = must_insert(store, &k, b"one").await;
    let v2 = store
        .compare_and_swap(&k, v1.clone(), &record(b"two"), None)
        .await
        .expect("CAS");

    let refused = revocation(&k, b"tokens of v1", at);
    assert_conflict(
        store
            .delete_and_enqueue_revocation(&k, Some(v1.clone()), &refused)
            .await,
        "delete_and_enqueue_revocation with a stale version",
    );
    assert!(
        payload_of(store, &k).await.is_some(),
        "a refused delete_and_enqueue_revocation deleted the link"
    );
    let missing = key(&realm, "nobody", "example");
    let nothing = revocation(&missing, b"no tokens", at);
    assert!(
        !store
            .delete_and_enqueue_revocation(&missing, None, &nothing)
            .await
            .expect("delete_and_enqueue_revocation of a missing key"),
        "deleting a missing key reported a deletion"
    );
    assert!(
        claim_ours(store, at, later, &[&refused.id, &nothing.id])
            .await
            .is_empty(),
        "an entry was written although no link was deleted"
    );

    let owed = revocation(&k, b"tokens of v2", at);
    assert!(
        store
            .delete_and_enqueue_revocation(&k, Some(v2.clone()), &owed)
            .await
            .expect("delete_and_enqueue_revocation with the version"),
        "the link was not reported deleted"
    );
    assert!(
        payload_of(store, &k).await.is_none(),
        "link still there after delete_and_enqueue_revocation"
    );
    assert!(
        store
            .list(&realm, &k.subject)
            .await
            .expect("list")
            .is_empty(),
        "an outbox entry shows up in list"
    );
    let claimed = claim_ours(store, at, later, &[&owed.id]).await;
    assert_eq!(
        claimed.len(),
        1,
        "the entry was not written with the delete"
    );
    let entry = &claimed[0];
    assert_eq!(entry.key, k, "the entry's key");
    assert_eq!(
        entry.payload.expose_secret(),
        b"tokens of v2",
        "the entry's payload"
    );
    assert_eq!(entry.attempts, 2, "a claim adds one to attempts");
    assert_eq!(entry.due_at, later, "a claim sets due_at to `until`");
    assert_eq!(entry.created_at, at, "created_at round-trips");
    store.remove_revocation(&owed.id).await.expect("remove");
}

/// Entries become claimable at `due_at`, a claim hides them until `until`, a reschedule acts
/// only for the latest claim, and removal is idempotent.
pub async fn outbox_claim_reschedule_remove(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let at = outbox_instant();
    let ms = Duration::from_millis(1);
    let entry = revocation(&k, b"owed", at);
    store.enqueue_revocation(&entry).await.expect("enqueue");
    // Writing the same id again replaces it: still one entry.
    store
        .enqueue_revocation(&entry)
        .await
        .expect("enqueue again");
    assert!(
        claim_ours(store, at - ms, at + ms, &[&entry.id])
            .await
            .is_empty(),
        "an entry was claimed before it was due"
    );
    assert!(
        payload_of(store, &k).await.is_none(),
        "an outbox entry shows up as a link"
    );
    let first = claim_ours(store, at, at + Duration::from_secs(3600), &[&entry.id]).await;
    assert_eq!(
        first.len(),
        1,
        "a due entry was not claimed (or claimed twice)"
    );
    assert!(
        claim_ours(store, at + ms, at + Duration::from_secs(7200), &[&entry.id])
            .await
            .is_empty(),
        "a claimed entry was claimed again before its claim ran out"
    );
    let retry_at = at + 5 * ms;
    assert!(
        store
            .reschedule_revocation(&first[0], retry_at)
            .await
            .expect("reschedule"),
        "rescheduling the latest claim was refused"
    );
    let second = claim_ours(store, retry_at, retry_at + ms, &[&entry.id]).await;
    assert_eq!(
        second.len(),
        1,
        "a rescheduled entry was not claimed when due"
    );
    assert_eq!(second[0].attempts, first[0].attempts + 1);
    assert!(
        !store
            .reschedule_revocation(&first[0], at)
            .await
            .expect("stale reschedule"),
        "a reschedule by an earlier claim was accepted"
    );
    assert!(
        claim_ours(store, retry_at, retry_at + ms, &[&entry.id])
            .await
            .is_empty(),
        "a stale reschedule moved the entry"
    );
    store.remove_revocation(&entry.id).await.expect("remove");
    store
        .remove_revocation(&entry.id)
        .await
        .expect("removing a removed entry");
    assert!(
        claim_ours(
            store,
            at + Duration::from_secs(86_400 * 365),
            at,
            &[&entry.id]
        )
        .await
        .is_empty(),
        "a removed entry was claimed"
    );
}

/// Many claims at once never hand out the same entry twice, and together take every due one.
pub async fn outbox_concurrent_claims_are_disjoint(store: &SharedStore) {
    let k = key(&fresh_realm(), "alice", "example");
    let at = outbox_instant();
    let entries: Vec<PendingRevocation> = (0..20)
        .map(|i| revocation(&k, format!("owed-{i}").as_bytes(), at))
        .collect();
    for e in &entries {
        store.enqueue_revocation(e).await.expect("enqueue");
    }
    let ours: BTreeSet<RevocationId> = entries.iter().map(|e| e.id.clone()).collect();
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .claim_revocations(at, at + Duration::from_secs(3600), 3)
                .await
        }));
    }
    let mut seen = Vec::new();
    for task in tasks {
        seen.extend(
            task.await
                .expect("task")
                .expect("claim")
                .into_iter()
                .map(|r| r.id)
                .filter(|id| ours.contains(id)),
        );
    }
    let distinct: BTreeSet<RevocationId> = seen.iter().cloned().collect();
    assert_eq!(
        distinct.len(),
        seen.len(),
        "concurrent claims handed out the same entry twice"
    );
    // Entries of earlier runs due before `at` may have taken some of the claims' room.
    let rest = claim_ours(
        store,
        at,
        at + Duration::from_secs(3600),
        &ours.iter().collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(
        distinct.len() + rest.len(),
        entries.len(),
        "some due entries were never claimed"
    );
    for e in &entries {
        store.remove_revocation(&e.id).await.expect("remove");
    }
}

// ---------------------------------------------------------------------------------------------
// The whole protocol on top of the store
// ---------------------------------------------------------------------------------------------

/// Broker instances sharing the store in [`instances_and_readers_refresh_once_per_expiry`].
pub const INSTANCES: usize = 4;
/// Concurrent readers per instance in [`instances_and_readers_refresh_once_per_expiry`].
pub const READERS: usize = 25;

/// [`INSTANCES`] brokers over this one store, [`READERS`] concurrent readers each, read one
/// expired link of a provider that rotates refresh tokens and revokes the grant when a spent
/// one comes back: the provider sees exactly one refresh per expiry, every reader gets the new
/// token, and no refresh token is presented twice. This is what the rest of the contract is
/// for; a store that passes the other checks but fails this one has a gap they missed.
///
/// The brokers share one manual clock (for expiry); leases are judged by the store's clock.
pub async fn instances_and_readers_refresh_once_per_expiry(store: &SharedStore) {
    use crate::testing::{FakeProvider, ManualClock};
    use crate::{Caller, LoginOptions, ProviderPolicy, TokenBroker};

    let realm = fresh_realm();
    let k = key(&realm, "alice", "fake");
    let idp = Arc::new(FakeProvider::new("fake").expect("valid alias"));
    idp.set_rotation(true);
    idp.set_strict_reuse(true);
    let clock = Arc::new(ManualClock::starting_now());
    let brokers: Vec<TokenBroker> = (0..INSTANCES)
        .map(|_| {
            TokenBroker::builder()
                .with_provider(idp.clone(), ProviderPolicy::default())
                .with_store(store.clone())
                .with_clock(clock.clone())
                .with_refresh_timeout(Duration::from_secs(5))
                .build()
                .expect("broker")
        })
        .collect();
    let caller = Caller::new(k.realm.clone(), k.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope();
    let start = brokers[0]
        .begin_login(&k, LoginOptions::default())
        .await
        .expect("begin_login");
    let callback = idp
        .approve(&start.authorization_url, "alice")
        .expect("approve");
    brokers[0]
        .complete_login(start.pending, &callback)
        .await
        .expect("complete_login");

    for round in 1..=2u64 {
        clock.advance(Duration::from_secs(2 * 3600));
        let before = idp.counters();
        let mut readers = Vec::new();
        for broker in &brokers {
            for _ in 0..READERS {
                let (broker, caller, k) = (broker.clone(), caller.clone(), k.clone());
                readers.push(tokio::spawn(async move {
                    broker
                        .retrieve(&caller, &k)
                        .await
                        .map(|read| read.tokens.access_token().expose_secret().to_owned())
                }));
            }
        }
        let mut tokens = BTreeSet::new();
        for reader in readers {
            match reader.await.expect("reader task") {
                Ok(token) => {
                    tokens.insert(token);
                }
                Err(e) => panic!("round {round}: a reader failed: {e}"),
            }
        }
        let after = idp.counters();
        assert_eq!(
            after.refresh_calls - before.refresh_calls,
            1,
            "round {round}: {INSTANCES} instances x {READERS} readers made {} refreshes of one \
             expired link",
            after.refresh_calls - before.refresh_calls
        );
        assert_eq!(
            after.reuse_detected, 0,
            "a spent refresh token was presented again"
        );
        assert_eq!(
            tokens.len(),
            1,
            "round {round}: readers got different tokens"
        );
        let token = tokens.into_iter().next().expect("one token");
        assert!(
            idp.is_active(&token),
            "round {round}: the token served is not live"
        );
    }
    for broker in &brokers {
        broker.unlink(&k).await.expect("unlink");
    }
}
