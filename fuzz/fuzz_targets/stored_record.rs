//! What comes back from a database: `TokenSet::from_payload` on any bytes (the stored format's
//! decoder, formats 1 and 2, and the version dispatch), and an `EncryptedStore` loading any
//! bytes its inner store holds.
//!
//! The seeds include the committed fixtures of `tests/fixtures/stored/` (`seed-fixture-*`).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tokenbroker::store::{EncryptedStore, KeyId, LinkState, Record, RecordMeta, StaticKeyring};
use tokenbroker::{
    DecodeError, MemoryStore, Payload, Secret, StoreError, TokenKey, TokenSet, TokenStore,
};

/// Every field the public API shows. Extras are compared by name only: a JSON number with a
/// fraction need not parse back to the same `f64`.
fn assert_same(a: &TokenSet, b: &TokenSet) {
    let secret = |s: Option<&Secret>| s.map(|s| s.expose_secret().to_owned());
    assert_eq!(
        a.access_token().expose_secret(),
        b.access_token().expose_secret()
    );
    assert_eq!(a.token_type(), b.token_type());
    assert_eq!(secret(a.refresh_token()), secret(b.refresh_token()));
    assert_eq!(secret(a.id_token()), secret(b.id_token()));
    assert_eq!(a.expires_at(), b.expires_at());
    assert_eq!(a.refresh_expires_at(), b.refresh_expires_at());
    assert_eq!(a.scopes(), b.scopes());
    assert_eq!(a.obtained_at(), b.obtained_at());
    assert!(a.extras().keys().eq(b.extras().keys()));
    assert_eq!(a.account(), b.account());
    assert_eq!(
        a.account().and_then(|a| a.email()),
        b.account().and_then(|b| b.email())
    );
    // Debug names the narrowed slots.
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let payload = Payload::new(data.to_vec());
    match TokenSet::from_payload(&payload) {
        Ok(set) => {
            // Whatever decodes, re-encodes (in the current format) and decodes to the same set.
            let bytes = set.to_payload();
            assert!(bytes.expose_secret().starts_with(br#"{"v":2,"#));
            let again = TokenSet::from_payload(&bytes).expect("re-encoded set decodes");
            assert_same(&again, &set);
            let _ = format!("{set:?}");
        }
        // The message never quotes the input's strings (where a token would be).
        Err(DecodeError::Malformed { reason }) => assert!(!reason.contains('"'), "{reason}"),
        Err(DecodeError::UnsupportedVersion { version }) => assert!(version != 1 && version != 2),
        Err(e) => panic!("unexpected decode error: {e:?}"),
    }

    runtime().block_on(async {
        let key = TokenKey::parse("acme", "alice", "fake").unwrap();
        let now = time::OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap();
        let inner = MemoryStore::new();
        inner
            .insert(
                &key,
                &Record::new(
                    payload.clone(),
                    RecordMeta::new(LinkState::Active, None, now, now),
                ),
            )
            .await
            .unwrap();
        let keys = StaticKeyring::new(KeyId::new("k1").unwrap(), [7; 32]);
        let store = EncryptedStore::new(inner, Arc::new(keys));
        match store.load(&key).await {
            // Arbitrary bytes cannot carry a valid tag under the key.
            Ok(Some(_)) => panic!("forged envelope decrypted"),
            Ok(None) => panic!("record vanished"),
            Err(StoreError::Corrupt { .. }) => {}
            Err(e) => panic!("unexpected error kind: {e:?}"),
        }
    });
});
