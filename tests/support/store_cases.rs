//! Store behaviour checks shared by the SQL store tests (`tests/sqlite_store.rs`,
//! `tests/postgres_store.rs`): what only a SQL store has (purge, the upgrade from schema v1,
//! `BIGINT` versions), and the races and expiry across two stores, that is two pools on one
//! database standing in for two app instances (the public conformance suite gets one store per
//! check). Everything a store of any kind must do is in `tokenbroker::testing::store_conformance`,
//! which both SQL tests run too.
//!
//! Include it with `#[path = "support/store_cases.rs"] mod store_cases;`.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokenbroker::store::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, LinkState, Record, RecordMeta, StoreError,
    Version,
};
use tokenbroker::{Payload, TokenKey, TokenStore};

/// Now, cut to whole milliseconds: the SQL stores keep milliseconds, so such times round-trip
/// exactly.
pub fn now_ms() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap()
}

pub fn key(realm: &str, subject: &str, provider: &str) -> TokenKey {
    TokenKey::parse(realm, subject, provider).unwrap()
}

pub fn record(secret: &str, state: LinkState, updated_at: OffsetDateTime) -> Record {
    let created = updated_at - Duration::from_secs(3600);
    Record::new(
        Payload::new(secret.as_bytes().to_vec()),
        RecordMeta::new(
            state,
            Some(updated_at + Duration::from_secs(600)),
            created,
            updated_at,
        ),
    )
}

pub fn active(secret: &str) -> Record {
    record(secret, LinkState::Active, now_ms())
}

pub fn is_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Conflict { .. }))
}

/// A version beyond `BIGINT`, which the SQL stores can never have handed out, matches no row
/// (it is not cut down to one that might). The rest of insert / load / compare-and-swap /
/// delete is the public conformance suite's.
pub async fn version_beyond_bigint_never_matches(store: &dyn TokenStore) {
    let k = key("acme", "alice", "google");
    let v = store.insert(&k, &active("secret")).await.unwrap();
    for beyond in [u64::MAX, 1 << 63] {
        assert!(
            is_conflict(
                store
                    .compare_and_swap(&k, Version::from_number(beyond), &active("x"), None)
                    .await
            ),
            "version {beyond} matched"
        );
        assert!(is_conflict(
            store.delete(&k, Some(Version::from_number(beyond))).await
        ));
    }
    let stored = store.load(&k).await.unwrap().unwrap();
    assert_eq!(stored.version, v);
    assert_eq!(stored.record.payload.expose_secret(), b"secret");
}

/// A `scan` pass visits every link once, whatever the page size, with keys that differ only in
/// case, accents and punctuation (collations must not merge them).
pub async fn scan_walks_in_key_order(store: &dyn TokenStore) {
    let mut expected = Vec::new();
    for r in ["acme", "Acme", "ácme", "b"] {
        for s in ["a", "B", "a b", "ab", "z", "é", "Ω", "a-1"] {
            for p in ["google", "a", "0x"] {
                let k = key(r, s, p);
                let v = store.insert(&k, &active("x")).await.unwrap();
                expected.push((k, v));
            }
        }
    }
    expected.sort_by(|a, b| a.0.cmp(&b.0));

    for page_size in [0, 1, 7, 1000] {
        let mut walked = Vec::new();
        let mut cursor = None;
        loop {
            let page = store.scan(cursor.as_ref(), page_size).await.unwrap();
            assert!(page.links.len() <= page_size.max(1));
            walked.extend(page.links.into_iter().map(|l| (l.key, l.version)));
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        walked.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(walked, expected, "page size {page_size}");
    }

    // A scanned row carries the same meta as a load.
    let first = store.scan(None, 1).await.unwrap().links.remove(0);
    let loaded = store.load(&first.key).await.unwrap().unwrap();
    assert_eq!(first.meta, loaded.record.meta);
    assert_eq!(first.version, loaded.version);
}

/// A short lease expires by itself, and then another holder takes it (possibly through another
/// store on the same database).
pub async fn lease_expires(a_store: &dyn TokenStore, b_store: &dyn TokenStore) {
    let k = key("acme", "dave", "google");
    a_store.insert(&k, &active("x")).await.unwrap();
    let a = LeaseHolder::new("holder-a");
    let b = LeaseHolder::new("holder-b");
    assert!(matches!(
        a_store
            .try_lease(&k, &a, Duration::from_millis(300))
            .await
            .unwrap(),
        LeaseAttempt::Acquired(_)
    ));
    assert_eq!(
        b_store
            .try_lease(&k, &b, Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseAttempt::Busy
    );
    // Poll rather than sleep a fixed time: how long it takes is the database clock's business.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match b_store
            .try_lease(&k, &b, Duration::from_secs(60))
            .await
            .unwrap()
        {
            LeaseAttempt::Acquired(lease) => {
                assert_eq!(lease.holder, b);
                break;
            }
            LeaseAttempt::Busy => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the lease never expired"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            LeaseAttempt::Missing => panic!("record vanished"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // And the former holder cannot take it back while B holds it.
    assert_eq!(
        a_store
            .try_lease(&k, &a, Duration::from_secs(60))
            .await
            .unwrap(),
        LeaseAttempt::Busy
    );
}

/// 50 holders, spread over two stores on one database, race for one lease: exactly one wins.
pub async fn lease_race(stores: [Arc<dyn TokenStore>; 2]) {
    let k = key("acme", "erin", "google");
    stores[0].insert(&k, &active("x")).await.unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = stores[i % 2].clone();
            let k = k.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .try_lease(
                        &k,
                        &LeaseHolder::new(format!("holder-{i}")),
                        Duration::from_secs(60),
                    )
                    .await
            })
        })
        .collect();
    let mut acquired = 0;
    for t in tasks {
        match t.await.unwrap().expect("no backend error under contention") {
            LeaseAttempt::Acquired(_) => acquired += 1,
            LeaseAttempt::Busy => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acquired, 1, "exactly one holder gets the lease");
}

/// 50 writers, spread over two stores on one database, compare-and-swap the same version:
/// exactly one wins, the others see a conflict.
pub async fn cas_race(stores: [Arc<dyn TokenStore>; 2]) {
    let k = key("acme", "frank", "google");
    let v = stores[0].insert(&k, &active("start")).await.unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let store = stores[i % 2].clone();
            let (k, v) = (k.clone(), v.clone());
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .compare_and_swap(&k, v, &active(&format!("writer-{i}")), None)
                    .await
                    .map(|v| (i, v))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(won) => winners.push(won),
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => panic!("unexpected error under contention: {e:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one writer wins: {winners:?}");
    let (i, won) = winners.swap_remove(0);
    let stored = stores[1].load(&k).await.unwrap().unwrap();
    assert_eq!(stored.version, won);
    assert_eq!(
        stored.record.payload.expose_secret(),
        format!("writer-{i}").as_bytes()
    );
}

/// What a purge must delete and keep. `purge` runs the store's purge with the given policy.
pub async fn purge<F, Fut>(store: &dyn TokenStore, purge: F)
where
    F: Fn(tokenbroker::store::RetentionPolicy) -> Fut,
    Fut: std::future::Future<Output = tokenbroker::store::PurgeReport>,
{
    use tokenbroker::store::RetentionPolicy;
    let day = Duration::from_secs(24 * 3600);
    let now = now_ms();
    let dead = |since| LinkState::RelinkRequired {
        reason: "invalid_grant".into(),
        since,
    };
    let old_unused = key("acme", "u1", "google");
    let fresh = key("acme", "u2", "google");
    let old_relink = key("acme", "u3", "google");
    let new_relink = key("acme", "u4", "google");
    let old_but_leased = key("acme", "u5", "google");
    let old_relink_leased = key("acme", "u6", "google");
    store
        .insert(&old_unused, &record("x", LinkState::Active, now - 10 * day))
        .await
        .unwrap();
    // A second old, so that the zero-age purges below find them strictly older than "now".
    let second = Duration::from_secs(1);
    store
        .insert(&fresh, &record("x", LinkState::Active, now - second))
        .await
        .unwrap();
    store
        .insert(&old_relink, &record("x", dead(now - 10 * day), now))
        .await
        .unwrap();
    store
        .insert(&new_relink, &record("x", dead(now - second), now))
        .await
        .unwrap();
    store
        .insert(
            &old_but_leased,
            &record("x", LinkState::Active, now - 10 * day),
        )
        .await
        .unwrap();
    store
        .insert(&old_relink_leased, &record("x", dead(now - 10 * day), now))
        .await
        .unwrap();
    for k in [&old_but_leased, &old_relink_leased] {
        assert!(matches!(
            store
                .try_lease(k, &LeaseHolder::new("refresher"), Duration::from_secs(600))
                .await
                .unwrap(),
            LeaseAttempt::Acquired(_)
        ));
    }

    let report = purge(RetentionPolicy::default()).await;
    assert_eq!(report.total(), 0, "the default policy deletes nothing");

    let report = purge(
        RetentionPolicy::default()
            .with_unused_for(5 * day)
            .with_relink_required_for(5 * day),
    )
    .await;
    assert_eq!(
        (report.unused, report.relink_required),
        (1, 1),
        "{report:?}"
    );
    assert!(store.load(&old_unused).await.unwrap().is_none());
    assert!(store.load(&old_relink).await.unwrap().is_none());
    for kept in [&fresh, &new_relink, &old_but_leased, &old_relink_leased] {
        assert!(
            store.load(kept).await.unwrap().is_some(),
            "{kept} was purged"
        );
    }

    // Each rule alone.
    let report = purge(RetentionPolicy::default().with_relink_required_for(Duration::ZERO)).await;
    assert_eq!(
        (report.unused, report.relink_required),
        (0, 1),
        "{report:?}"
    );
    assert!(store.load(&new_relink).await.unwrap().is_none());
    let report = purge(RetentionPolicy::default().with_unused_for(Duration::ZERO)).await;
    assert_eq!(
        (report.unused, report.relink_required),
        (1, 0),
        "{report:?}"
    );
    assert!(store.load(&fresh).await.unwrap().is_none());
}

/// What a database made before fenced leases (`tests/support/schema_v1/*.sql`, schema
/// migration 1 only) must hold after `migrate`: its links as they were, the lease an instance of
/// that version holds still keeping others out (and no token freeing or fencing it), an expired
/// one taken over with a token that fences, and versions going on from the old counter.
pub async fn upgraded_from_v1(store: &dyn TokenStore) {
    let idle = key("acme", "idle", "google");
    let leased = key("acme", "leased", "google");
    let expired = key("acme", "expired", "google");
    let written_at = OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
    for (k, version, payload) in [
        (&idle, 1, "payload-idle"),
        (&leased, 2, "payload-leased"),
        (&expired, 3, "payload-expired"),
    ] {
        let stored = store.load(k).await.unwrap().expect("the link was kept");
        assert_eq!(stored.version, Version::from_number(version), "{k}");
        assert_eq!(stored.record.payload.expose_secret(), payload.as_bytes());
        assert_eq!(stored.record.meta.state, LinkState::Active);
        assert_eq!(stored.record.meta.updated_at, written_at);
        assert_eq!(
            stored.record.meta.expires_at,
            Some(written_at + Duration::from_secs(3600))
        );
    }
    let mut versions: std::collections::HashSet<Version> =
        (1..=3).map(Version::from_number).collect();
    let holder = LeaseHolder::new("holder-new");
    let ttl = Duration::from_secs(60);

    // The old instance's lease: still held, and no token reaches it.
    assert_eq!(
        store.try_lease(&leased, &holder, ttl).await.unwrap(),
        LeaseAttempt::Busy,
        "a lease taken before the upgrade was lost"
    );
    let forged = Lease::new(
        leased.clone(),
        LeaseHolder::new("tb-old-instance"),
        LeaseToken::random(),
        OffsetDateTime::now_utc() + ttl,
    );
    store.release_lease(&forged).await.unwrap();
    assert_eq!(store.extend_lease(&forged, ttl).await.unwrap(), None);
    assert!(is_conflict(
        store
            .compare_and_swap(
                &leased,
                Version::from_number(2),
                &active("fenced"),
                Some(&forged.token)
            )
            .await
    ));
    assert_eq!(
        store.try_lease(&leased, &holder, ttl).await.unwrap(),
        LeaseAttempt::Busy
    );
    // Writes without a fence go on as before.
    versions.insert(
        store
            .compare_and_swap(&leased, Version::from_number(2), &active("unfenced"), None)
            .await
            .unwrap(),
    );

    // The lease the old version never released has expired: taken over, with a fencing token.
    let lease = match store.try_lease(&expired, &holder, ttl).await.unwrap() {
        LeaseAttempt::Acquired(lease) => lease,
        other => panic!("the expired lease was not taken over: {other:?}"),
    };
    let v = store
        .compare_and_swap(
            &expired,
            Version::from_number(3),
            &active("refreshed"),
            Some(&lease.token),
        )
        .await
        .unwrap();
    versions.insert(v.clone());
    assert!(store.extend_lease(&lease, ttl).await.unwrap().is_some());
    store.release_lease(&lease).await.unwrap();
    assert!(is_conflict(
        store
            .compare_and_swap(&expired, v, &active("late"), Some(&lease.token))
            .await
    ));

    // A row that never had a lease.
    let lease = match store.try_lease(&idle, &holder, ttl).await.unwrap() {
        LeaseAttempt::Acquired(lease) => lease,
        other => panic!("the free row's lease was not acquired: {other:?}"),
    };
    versions.insert(
        store
            .compare_and_swap(
                &idle,
                Version::from_number(1),
                &active("idle-2"),
                Some(&lease.token),
            )
            .await
            .unwrap(),
    );
    store.release_lease(&lease).await.unwrap();

    // Versions go on from the old counter: none is handed out twice.
    let v = store
        .insert(&key("acme", "new", "google"), &active("new"))
        .await
        .unwrap();
    assert!(
        versions.insert(v.clone()),
        "{v} was handed out before the upgrade"
    );
    assert_eq!(versions.len(), 7);
}
