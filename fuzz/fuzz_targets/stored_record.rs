//! What comes back from a database: `TokenSet::from_payload` on any bytes, and an
//! `EncryptedStore` loading any bytes its inner store holds.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tokenbroker::store::{EncryptedStore, KeyId, LinkState, Record, RecordMeta, StaticKeyring};
use tokenbroker::{MemoryStore, Payload, StoreError, TokenKey, TokenSet, TokenStore};

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
    if let Ok(set) = TokenSet::from_payload(&payload) {
        // Whatever decodes, re-encodes and decodes to the same set.
        let again = TokenSet::from_payload(&set.to_payload()).expect("re-encoded set decodes");
        assert_eq!(again.expires_at(), set.expires_at());
        assert_eq!(again.scopes(), set.scopes());
        let _ = format!("{set:?}");
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
