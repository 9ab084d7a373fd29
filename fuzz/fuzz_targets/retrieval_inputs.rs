//! The retrieval endpoint's path parameters, as a router hands them over: any realm and alias
//! strings, for a fixed authenticated caller with one stored link.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tokenbroker::store::{LinkState, Record, RecordMeta};
use tokenbroker::testing::FakeProvider;
use tokenbroker::{
    Caller, MemoryStore, ProviderPolicy, Realm, Secret, Subject, TokenBroker, TokenKey, TokenSet,
    TokenStore,
};

struct World {
    rt: tokio::runtime::Runtime,
    broker: TokenBroker,
    caller: Caller,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let store = Arc::new(MemoryStore::new());
        let key = TokenKey::parse("acme", "alice", "fake").unwrap();
        let now = time::OffsetDateTime::now_utc();
        let set =
            TokenSet::new(Secret::new("at"), now).with_expires_at(now + time::Duration::days(3650));
        rt.block_on(store.insert(
            &key,
            &Record::new(
                set.to_payload(),
                RecordMeta::new(LinkState::Active, set.expires_at(), now, now),
            ),
        ))
        .unwrap();
        let broker = TokenBroker::builder()
            .with_provider(
                Arc::new(FakeProvider::new("fake").unwrap()),
                ProviderPolicy::default(),
            )
            .with_store(store)
            .build()
            .unwrap();
        let caller = Caller::new(
            Realm::new("acme").unwrap(),
            Subject::new("alice").unwrap(),
            "app",
        )
        .with_role("read-token").with_full_client_scope();
        World { rt, broker, caller }
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (realm, alias) = text.split_once('\u{0}').unwrap_or((&text, "fake"));
    let w = world();
    let response =
        w.rt.block_on(tokenbroker::endpoints::read_tokens(&w.broker, Some(&w.caller), realm, alias));
    let status = response.status.as_u16();
    assert!(
        matches!(status, 200 | 400 | 403 | 404),
        "status {status} for {realm:?}/{alias:?}"
    );
    if status == 200 {
        assert_eq!(
            (realm, alias),
            ("acme", "fake"),
            "only the caller's own link"
        );
    }
    let body = response.json().expect("every answer is JSON");
    if status != 200 {
        // Error bodies never carry tokens.
        assert!(body.get("access_token").is_none());
    }
});
