//! An encrypted cached read: `retrieve` of a fresh 2.5 KB set on `EncryptedStore<MemoryStore>`
//! against its floor: `DashMap::get` of the sealed bytes, one AEAD decrypt, and the JSON decode
//! of the same payload.
//!
//! Two floors are measured. The ratio is taken against the XChaCha20-Poly1305 floor, the cipher
//! `EncryptedStore` uses; an AES-256-GCM floor (hardware AES) is shown for reference, because a
//! host comparing with an AES-GCM scheme of its own would ask.
//!
//! `cargo bench --all-features --bench encrypted_read`

mod common;

use std::sync::Arc;
use std::time::Instant;

use aes_gcm::Aes256Gcm;
use chacha20poly1305::aead::{Aead, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use criterion::Criterion;
use dashmap::DashMap;
use std::hint::black_box;
use time::OffsetDateTime;
use tokenbroker::store::KeyId;
use tokenbroker::{
    EncryptedStore, MemoryStore, Payload, StaticKeyring, TokenKey, TokenSet, TokenStore,
};

use common::{Pair, caller, key, read_broker, record, token_set};

const AAD: &[u8] = b"tokenbroker/record/\xE1\x04acme\x06user-7\x04fake";

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let now = OffsetDateTime::now_utc();
    let set = token_set(now, 7);
    let k = key(7);
    let who = caller(&k);
    let kek = [7u8; 32];

    let keyring = Arc::new(StaticKeyring::new(KeyId::new("bench-1").unwrap(), kek));
    let store = Arc::new(EncryptedStore::new(MemoryStore::new(), keyring));
    rt.block_on(store.insert(&k, &record(&set, now))).unwrap();
    let broker = read_broker(store);
    let got = rt.block_on(broker.retrieve(&who, &k)).unwrap();
    assert_eq!(
        got.tokens.access_token().expose_secret(),
        set.access_token().expose_secret()
    );

    let plain = set.to_payload();
    let data_key = [9u8; 32];
    // Floor 1: the store's cipher, XChaCha20-Poly1305 with a 24-byte nonce in front.
    let xnonce = XNonce::from([3u8; 24]);
    let xchacha = XChaCha20Poly1305::new((&data_key).into());
    let mut sealed_x = xnonce.to_vec();
    sealed_x.extend(
        xchacha
            .encrypt(
                &xnonce,
                AeadPayload {
                    msg: plain.expose_secret(),
                    aad: AAD,
                },
            )
            .unwrap(),
    );
    let floor_x: DashMap<TokenKey, Vec<u8>> = DashMap::new();
    floor_x.insert(k.clone(), sealed_x);
    // Floor 2: AES-256-GCM with a 12-byte nonce in front.
    let gnonce = aes_gcm::Nonce::from([4u8; 12]);
    let aes = Aes256Gcm::new((&data_key).into());
    let mut sealed_g = gnonce.to_vec();
    sealed_g.extend(
        aes.encrypt(
            &gnonce,
            AeadPayload {
                msg: plain.expose_secret(),
                aad: AAD,
            },
        )
        .unwrap(),
    );
    let floor_g: DashMap<TokenKey, Vec<u8>> = DashMap::new();
    floor_g.insert(k.clone(), sealed_g);

    // The floors build the cipher from the key on every read, as a store that keeps no key
    // schedule between reads must; it is a few hundred nanoseconds at most.
    let read_x = || {
        let sealed = floor_x.get(&k).unwrap();
        let (nonce, ct) = sealed.split_at(24);
        let plain = XChaCha20Poly1305::new((&data_key).into())
            .decrypt(
                &XNonce::try_from(nonce).unwrap(),
                AeadPayload { msg: ct, aad: AAD },
            )
            .unwrap();
        TokenSet::from_payload(&Payload::new(plain)).unwrap()
    };
    let read_g = || {
        let sealed = floor_g.get(&k).unwrap();
        let (nonce, ct) = sealed.split_at(12);
        let plain = Aes256Gcm::new((&data_key).into())
            .decrypt(
                &aes_gcm::Nonce::try_from(nonce).unwrap(),
                AeadPayload { msg: ct, aad: AAD },
            )
            .unwrap();
        TokenSet::from_payload(&Payload::new(plain)).unwrap()
    };
    assert_eq!(
        read_x().access_token().expose_secret(),
        set.access_token().expose_secret()
    );
    assert_eq!(
        read_g().access_token().expose_secret(),
        set.access_token().expose_secret()
    );

    let mut g = c.benchmark_group("encrypted_read");
    g.bench_function("tokenbroker", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(broker.retrieve(&who, &k).await.unwrap()) })
    });
    g.bench_function("floor_xchacha20poly1305", |b| {
        b.iter(|| black_box(read_x()))
    });
    g.bench_function("floor_aes256gcm", |b| b.iter(|| black_box(read_g())));
    g.finish();

    common::paired(
        "encrypted_read/tokenbroker",
        "encrypted_read/floor_xchacha20poly1305",
        |n| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..n {
                    black_box(broker.retrieve(&who, &k).await.unwrap());
                }
                start.elapsed()
            })
        },
        |n| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(read_x());
            }
            start.elapsed()
        },
    );
}

fn main() {
    let mut c = common::criterion();
    benches(&mut c);
    c.final_summary();
    common::print_summary(
        "encrypted_read",
        &[
            Pair::new(
                "encrypted cached read (EncryptedStore<MemoryStore>)",
                "encrypted_read/tokenbroker",
                "encrypted_read/floor_xchacha20poly1305",
                1.2,
            ),
            Pair::new(
                "same, against an AES-256-GCM floor",
                "encrypted_read/tokenbroker",
                "encrypted_read/floor_aes256gcm",
                f64::INFINITY,
            ),
        ],
    );
}
