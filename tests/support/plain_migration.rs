//! Turning encryption on for a SQL store that already holds plain records, shared by
//! `tests/sqlite_store.rs` and `tests/postgres_store.rs`.
//!
//! Include it with `#[path = "support/plain_migration.rs"] mod plain_migration;` (feature
//! `encryption`).
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;

use time::OffsetDateTime;
use tokenbroker::store::{
    EncryptedStore, KeyId, KeyProvider, LinkState, Record, RecordMeta, StaticKeyring, StoredRecord,
    key_id_of,
};
use tokenbroker::testing::FakeProvider;
use tokenbroker::{
    Caller, LoginOptions, ProviderPolicy, Secret, TokenBroker, TokenKey, TokenSet, TokenStore,
};

fn keys() -> Arc<dyn KeyProvider> {
    Arc::new(StaticKeyring::new(
        KeyId::new("2026-11").unwrap(),
        [0x5A; 32],
    ))
}

fn access_token(stored: &StoredRecord) -> String {
    TokenSet::from_payload(&stored.record.payload)
        .unwrap()
        .access_token()
        .expose_secret()
        .to_owned()
}

async fn link_through_a_broker(store: Arc<dyn TokenStore>, key: &TokenKey) -> String {
    let fake = Arc::new(FakeProvider::new(key.provider.as_str()).unwrap());
    let broker = TokenBroker::builder()
        .with_provider(fake.clone(), ProviderPolicy::default())
        .with_store(store)
        .build()
        .unwrap();
    let start = broker
        .begin_login(key, LoginOptions::default())
        .await
        .unwrap();
    let callback = fake
        .approve(&start.authorization_url, key.subject.as_str())
        .unwrap();
    broker
        .complete_login(start.pending, &callback)
        .await
        .unwrap();
    retrieve(&broker, key).await
}

async fn retrieve(broker: &TokenBroker, key: &TokenKey) -> String {
    let caller = Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope();
    broker
        .retrieve(&caller, key)
        .await
        .unwrap()
        .tokens
        .access_token()
        .expose_secret()
        .to_owned()
}

fn broker_over(store: Arc<dyn TokenStore>, provider: &str) -> TokenBroker {
    TokenBroker::builder()
        .with_provider(
            Arc::new(FakeProvider::new(provider).unwrap()),
            ProviderPolicy::default(),
        )
        .with_store(store)
        .build()
        .unwrap()
}

/// `open` opens the same database each time, as a restarted app would. The app first runs
/// without encryption and links accounts (one through a broker, the rest written as the broker
/// writes them); it is then redeployed with an `EncryptedStore` that accepts plain records:
/// everything reads, new writes are envelopes, and `rewrap` encrypts every plain record, after
/// which the table holds only envelopes; redeployed once more without the opt-in, everything
/// still reads.
pub async fn turn_encryption_on<S, F, Fut>(open: F)
where
    S: TokenStore,
    F: Fn() -> Fut,
    Fut: Future<Output = S>,
{
    // 1. Before encryption.
    let plain_store: Arc<dyn TokenStore> = Arc::new(open().await);
    let by_broker = TokenKey::parse("acme", "alice", "fake").unwrap();
    let brokered_token = link_through_a_broker(plain_store.clone(), &by_broker).await;
    let now = OffsetDateTime::now_utc();
    let mut links = vec![(by_broker.clone(), brokered_token.clone())];
    for i in 0..24 {
        let k = TokenKey::parse(
            ["acme", "globex"][i % 2],
            &format!("user-{i:02}"),
            ["google", "github"][i % 3 % 2],
        )
        .unwrap();
        let access = format!("at-plain-{i}-{}", "x".repeat(i * 10));
        let set = TokenSet::new(Secret::new(access.clone()), now)
            .with_refresh_token(Secret::new(format!("rt-plain-{i}")));
        plain_store
            .insert(
                &k,
                &Record::new(
                    set.to_payload(),
                    RecordMeta::new(LinkState::Active, None, now, now),
                ),
            )
            .await
            .unwrap();
        links.push((k, access));
    }
    drop(plain_store);

    // 2. Redeployed with encryption and the opt-in.
    let migrating = Arc::new(
        EncryptedStore::new(open().await, keys())
            .accept_plain_records(true)
            .with_lease_holder(tokenbroker::store::LeaseHolder::new("migration-job")),
    );
    for (k, access) in &links {
        let loaded = migrating.load(k).await.unwrap().unwrap();
        assert_eq!(&access_token(&loaded), access, "{k}");
        assert_eq!(
            key_id_of(&migrating.inner().load(k).await.unwrap().unwrap()),
            None
        );
    }
    assert_eq!(migrating.plain_records_served(), links.len() as u64);
    let broker = broker_over(migrating.clone(), "fake");
    assert_eq!(retrieve(&broker, &by_broker).await, brokered_token);
    // A link made during the migration is encrypted at once.
    let during = TokenKey::parse("acme", "zed", "fake").unwrap();
    let during_token = link_through_a_broker(migrating.clone(), &during).await;
    let raw = migrating.inner().load(&during).await.unwrap().unwrap();
    assert!(key_id_of(&raw).is_some());

    // 3. The batch job: every plain record encrypted, in pages, under the lease.
    let report = migrating.rewrap(7).await.unwrap();
    assert_eq!(report.scanned, links.len() + 1, "{report:?}");
    assert_eq!(report.encrypted_plain, links.len(), "{report:?}");
    assert_eq!(report.already_primary, 1, "{report:?}");
    assert_eq!(
        (
            report.rewrapped,
            report.skipped_busy,
            report.skipped_conflict,
            report.corrupt
        ),
        (0, 0, 0, 0),
        "{report:?}"
    );
    let again = migrating.rewrap(7).await.unwrap();
    assert_eq!(
        (again.encrypted_plain, again.already_primary),
        (0, links.len() + 1)
    );

    // The table now holds only envelopes, none of them showing a token.
    let inner = migrating.inner();
    let mut after = None;
    let mut seen = 0;
    loop {
        let page = inner.scan(after.as_ref(), 10).await.unwrap();
        for link in &page.links {
            let raw = inner.load(&link.key).await.unwrap().unwrap();
            assert_eq!(
                key_id_of(&raw),
                Some(KeyId::new("2026-11").unwrap()),
                "{}",
                link.key
            );
            let bytes = raw.record.payload.expose_secret();
            assert_eq!(bytes[0], 0xE2, "{}", link.key);
            assert!(
                !bytes.windows(8).any(|w| w == b"at-plain"),
                "{}: plaintext in the table",
                link.key
            );
            seen += 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, links.len() + 1);
    drop(broker);
    drop(migrating);

    // 4. Redeployed without the opt-in: everything reads.
    let encrypted: Arc<EncryptedStore<S>> = Arc::new(EncryptedStore::new(open().await, keys()));
    for (k, access) in &links {
        assert_eq!(
            &access_token(&encrypted.load(k).await.unwrap().unwrap()),
            access,
            "{k}"
        );
    }
    let broker = broker_over(encrypted.clone(), "fake");
    assert_eq!(retrieve(&broker, &by_broker).await, brokered_token);
    assert_eq!(retrieve(&broker, &during).await, during_token);
    assert_eq!(encrypted.plain_records_served(), 0);
}
