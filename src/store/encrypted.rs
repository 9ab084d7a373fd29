//! Envelope encryption at rest: [`EncryptedStore`] wraps any [`TokenStore`].
//!
//! # Key hierarchy, and why
//!
//! Three levels of keys:
//!
//! 1. **Key-encryption keys (KEKs)** stay in the [`KeyProvider`]: a [`StaticKeyring`] in the
//!    process, or a key management service (KMS) whose keys never leave it.
//! 2. **Intermediate keys.** Each process draws a random 32-byte key and has the provider wrap
//!    it **once**, under the primary KEK, with a fixed context
//!    (`tokenbroker/intermediate-key/\xE2`, not a record's). It encrypts every record the process
//!    writes for [`with_intermediate_key_lifetime`](EncryptedStore::with_intermediate_key_lifetime)
//!    (default 1 hour), or until the provider's primary KEK changes; then the next write draws
//!    and wraps a new one. Its wrapped form goes into every envelope, so any process that can
//!    reach the provider can read the record.
//! 3. **Records.** The payload is encrypted with XChaCha20-Poly1305 directly under the
//!    intermediate key (random 192-bit nonce), authenticating
//!    `tokenbroker/record/ | format | realm | subject | provider | KEK id` (each part
//!    length-prefixed): a ciphertext copied to another row, or relabelled with another KEK id,
//!    does not decrypt.
//!
//! Readers keep the intermediate keys they unwrapped in a bounded cache keyed by the envelope
//! header (KEK id and wrapped bytes, so a cached key is only ever used for exactly the wrapped
//! key it came from), for [`with_key_cache_ttl`](EncryptedStore::with_key_cache_ttl) (default
//! 1 hour). Concurrent reads needing the same key wait for one unwrap. So the provider is called
//! once per intermediate key and cache TTL in each process, not once per read: a KMS-backed
//! provider makes a few billed calls an hour per process (one wrap per lifetime, one unwrap per
//! writer's key seen) instead of one per read, and a KMS outage no longer stops every read.
//!
//! Why this shape and not another:
//! - **Payload under the intermediate key, no per-record data key.** A per-record key wrapped
//!   locally would cost a second AEAD call per read and protect nothing more: the key that
//!   wraps it sits in the same memory. XChaCha20's 192-bit random nonces make the number of
//!   records under one key a non-issue (96-bit AES-GCM nonces would cap it near 2³²).
//! - **A fixed context for the wrap, the per-record binding in the payload's AAD.** One wrapped
//!   key serves every record, and every read still checks that the ciphertext belongs to its
//!   row.
//! - **Keys cached, never records.** Every read still authenticates and decrypts what the
//!   database holds, so tampering is seen at once and no second plain copy of the tokens lives
//!   here (the broker's hot cache is the one place decoded sets are kept).
//! - **Per process, not shared through the store.** No coordination between instances, and
//!   each key covers what one process wrote in one lifetime.
//!
//! # When the key provider is down
//!
//! - Reads of records whose intermediate key is cached (or is this process's current one) go
//!   on. A read that needs a new unwrap fails with [`StoreError::Backend`] (store
//!   `encryption`): retry later. It is never [`StoreError::Corrupt`].
//! - Writes use the current intermediate key without asking the provider until it is due for
//!   rotation; the first write after that has to wrap a new one and fails with
//!   [`StoreError::Backend`] while the provider is down (and the next write tries again). An
//!   outage therefore stops writes after at most the lifetime, reads of keys this process has
//!   not seen at once, and reads of cached keys after the cache TTL. Keys are not used past
//!   their time limit during an outage: the limit is also how long a KEK disabled at the KMS
//!   keeps working here.
//!
//! # What memory holds
//!
//! The unwrapped intermediate keys of the last TTL, this process's current one, and format-1
//! data keys (below), each zeroized on drop and redacted in `Debug`. Someone who can read the
//! process's memory gets them, and so every record written under them; with a
//! [`StaticKeyring`] they also get the KEKs themselves. That is no worse than before: the
//! broker's hot cache already holds decoded token sets, and encryption at rest answers a leaked
//! database or backup, not a compromised process. With a KMS the KEK itself stays out of
//! reach.
//!
//! # Formats
//!
//! Writes use envelope format 2 (`0xE2`). Format 1 (`0xE1`, before 0.2: a per-record data key
//! wrapped by the provider with the record's key as context) still reads; its unwrapped data
//! keys are cached per record (bounded, same TTL), so repeated reads of one record do not call
//! the provider, and [`EncryptedStore::rewrap`] rewrites such records in format 2. Plain
//! records (from before encryption was turned on) are JSON objects; see
//! [`EncryptedStore::accept_plain_records`] for how they are told apart and migrated.

mod cache;
mod envelope;
mod keys;

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, PendingRevocation, Record, RevocationId,
    ScanCursor, ScanPage, StoreError, StoredRecord, TokenStore, Version,
};
use crate::clock::SharedClock;
use crate::ids::{Realm, Subject, TokenKey};
use crate::token::Payload;
use cache::{KeyCache, WriteKey, younger_than};
use envelope::{
    Envelope, FORMAT_V1, FORMAT_V2, INTERMEDIATE_KEY_AAD, Parsed, record_aad_v1, record_aad_v2,
};
use keys::EncryptFailed;
pub use keys::{DataKey, KeyError, KeyId, KeyProvider, KeyringError, StaticKeyring, WrappedKey};
use time::OffsetDateTime;

/// The `store` name of [`StoreError::Backend`] errors raised by the encryption layer.
const STORE_NAME: &str = "encryption";

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// A [`StaticKeyring`]'s wrapped data key: nonce, encrypted key, tag.
const STATIC_WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;
/// How long a rewrap holds one key's refresh lease: enough for a load, an unwrap and a wrap
/// (possibly at a key service) and a write. It only matters if the rewrap stops without
/// releasing (a crash, a dropped future): refreshes of that key then wait this long at most.
/// A rewrap slower than this loses nothing either: its write is fenced by the lease.
const REWRAP_LEASE_TTL: Duration = Duration::from_secs(30);

const DEFAULT_INTERMEDIATE_KEY_LIFETIME: Duration = Duration::from_secs(3600);
const DEFAULT_KEY_CACHE_TTL: Duration = Duration::from_secs(3600);
const DEFAULT_KEY_CACHE_CAPACITY: usize = 1024;
const DEFAULT_LEGACY_KEY_CACHE_CAPACITY: usize = 4096;
/// How many distinct keys of plain records are logged; after that they are only counted.
const PLAIN_WARN_LIMIT: usize = 1024;

/// The id of the key-encryption key a stored record is encrypted under (through its
/// intermediate key, or its format-1 data key), as the inner store of an [`EncryptedStore`]
/// holds it; `None` if the payload is not an envelope (a plain record, or garbage).
///
/// It parses the envelope without decrypting anything: use it to see how far a rotation or a
/// migration of plain records got.
pub fn key_id_of(stored: &StoredRecord) -> Option<KeyId> {
    match envelope::parse(stored.record.payload.expose_secret()) {
        Ok(Parsed::Envelope(e)) => Some(e.key_id),
        _ => None,
    }
}

/// The outcome of a [`EncryptedStore::rewrap`] or [`EncryptedStore::rewrap_page`]. Every
/// scanned link lands in exactly one of the other counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RewrapReport {
    /// Links visited.
    pub scanned: usize,
    /// Envelopes re-encrypted under the primary key in the current format: those under another
    /// key, and format-1 envelopes.
    pub rewrapped: usize,
    /// Plain records (written before encryption was turned on) encrypted for the first time.
    /// Only with [`EncryptedStore::accept_plain_records`]; without it they count as
    /// [`corrupt`](Self::corrupt).
    pub encrypted_plain: usize,
    /// Records already under the primary key in the current format, left alone.
    pub already_primary: usize,
    /// Records changed or deleted between the load and the write: left as the concurrent writer
    /// left them (a concurrent write already uses the primary key).
    pub skipped_conflict: usize,
    /// Records not under the primary key whose refresh lease was held by someone else (a
    /// refresh, or another rewrap, at work on them): left untouched, so as not to make that
    /// refresh's write conflict. Run the rewrap again later; do not retire an old key while
    /// this is not zero.
    pub skipped_busy: usize,
    /// Records that could not be decrypted (see [`StoreError::Corrupt`]), and plain records
    /// while they are not accepted, left untouched. Do not retire an old key while this is not
    /// zero: the records are logged with their keys.
    pub corrupt: usize,
}

impl RewrapReport {
    fn add(&mut self, other: &RewrapReport) {
        self.scanned += other.scanned;
        self.rewrapped += other.rewrapped;
        self.encrypted_plain += other.encrypted_plain;
        self.already_primary += other.already_primary;
        self.skipped_conflict += other.skipped_conflict;
        self.skipped_busy += other.skipped_busy;
        self.corrupt += other.corrupt;
    }

    fn count(&mut self, outcome: Rewrapped) {
        let counter = match outcome {
            Rewrapped::Done => &mut self.rewrapped,
            Rewrapped::EncryptedPlain => &mut self.encrypted_plain,
            Rewrapped::AlreadyPrimary => &mut self.already_primary,
            Rewrapped::Conflict => &mut self.skipped_conflict,
            Rewrapped::Busy => &mut self.skipped_busy,
            Rewrapped::Corrupt => &mut self.corrupt,
        };
        *counter += 1;
    }
}

/// What a rewrap did with one record (one counter of [`RewrapReport`] each).
#[derive(Debug, Clone, Copy)]
enum Rewrapped {
    Done,
    EncryptedPlain,
    AlreadyPrimary,
    Conflict,
    Busy,
    Corrupt,
}

/// Who opens a record: a caller of [`TokenStore::load`], or a rewrap (which does not count
/// plain records as served).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opener {
    Load,
    Rewrap,
    Outbox,
}

/// Plain records served: counted, and each key logged once (up to [`PLAIN_WARN_LIMIT`] keys).
#[derive(Default)]
struct PlainReads {
    count: AtomicU64,
    warned: Mutex<HashSet<TokenKey, foldhash::fast::RandomState>>,
}

impl PlainReads {
    fn note(&self, key: &TokenKey) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        if warned.len() < PLAIN_WARN_LIMIT && warned.insert(key.clone()) {
            // The key only: never the payload.
            tracing::warn!(
                %key,
                "EncryptedStore: served a plain (unencrypted) record; run rewrap to encrypt it"
            );
            if warned.len() == PLAIN_WARN_LIMIT {
                tracing::warn!(
                    "EncryptedStore: {PLAIN_WARN_LIMIT} keys with plain records logged; further \
                     ones are only counted (plain_records_served)"
                );
            }
        }
    }
}

fn backend(e: KeyError) -> StoreError {
    StoreError::Backend {
        store: STORE_NAME,
        source: Arc::new(e),
    }
}

/// A [`TokenStore`] that encrypts payloads before they reach the inner store.
///
/// Each process encrypts the records it writes under an *intermediate key* of its own, which
/// the [`KeyProvider`] wraps once under its primary key-encryption key (KEK); the wrapped key
/// travels in every envelope. The payload is encrypted with XChaCha20-Poly1305 (random 24-byte
/// nonce), authenticating the record's key (realm, subject, provider) and the KEK id, so a
/// ciphertext copied to another row fails. Unwrapped keys are cached, bounded and for a limited
/// time, so the provider is asked once per key and time limit, not once per read; a failing
/// provider stops only what needs a new key. The module source (`store/encrypted.rs`) explains
/// the hierarchy and its trade-offs; in short:
///
/// | setting | default | what it bounds |
/// |---|---|---|
/// | [`with_intermediate_key_lifetime`](Self::with_intermediate_key_lifetime) | 1 hour | how long one intermediate key encrypts new records (and how long writes go on while the provider is down) |
/// | [`with_key_cache_ttl`](Self::with_key_cache_ttl) | 1 hour | how long an unwrapped key is used without asking the provider again |
/// | [`with_key_cache_capacity`](Self::with_key_cache_capacity) | 1024 | intermediate keys kept |
/// | [`with_legacy_key_cache_capacity`](Self::with_legacy_key_cache_capacity) | 4096 | data keys of format-1 records kept |
///
/// **Only the payload is encrypted.** The [`RecordMeta`](super::RecordMeta) (state, expiry,
/// timestamps), the keys, versions and leases pass through in clear, because stores index them
/// for sweeps and leases.
///
/// A record that fails to parse or decrypt (truncated, tampered, moved, under an unknown key,
/// plain while plain records are not accepted) loads as [`StoreError::Corrupt`] carrying the
/// record's version: [`compare_and_swap`](TokenStore::compare_and_swap) at that version (a
/// re-link) and [`delete`](TokenStore::delete) at it (an unlink) work without decrypting the old
/// record. A failing [`KeyProvider`] is a [`StoreError::Backend`] with store `encryption`.
///
/// Key rotation: make a new key primary while keeping the old ones; new writes use it (through
/// a new intermediate key), old records still read, and [`EncryptedStore::rewrap`] moves old
/// records over so that the old keys can be retired. A rewrap writes each record under the
/// key's refresh lease, taken as [`EncryptedStore::lease_holder`] (random unless set with
/// [`with_lease_holder`](EncryptedStore::with_lease_holder)).
///
/// Turning encryption on for a store that already holds plain records: see
/// [`accept_plain_records`](Self::accept_plain_records).
///
/// **No decrypted copy is kept here**, only keys: every load decrypts what the inner store
/// holds, so every read authenticates it. The broker above keeps the decoded sets of recent
/// reads in its own bounded hot cache (and drops a link's on unlink).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
/// use tokenbroker::{MemoryStore, TokenStore};
///
/// // In production: StaticKeyring::from_env("TOKENBROKER_KEYS")?, or a KMS client.
/// let keys = StaticKeyring::new(KeyId::new("k1")?, [7; 32]);
/// let store = Arc::new(
///     EncryptedStore::new(MemoryStore::new(), Arc::new(keys))
///         .with_intermediate_key_lifetime(Duration::from_secs(6 * 3600))
///         .with_key_cache_ttl(Duration::from_secs(6 * 3600)),
/// );
/// let shared: Arc<dyn TokenStore> = store.clone();
/// // ... hand `shared` to TokenBroker::builder().with_store(..)
///
/// // Later, after making a new key primary:
/// let report = store.rewrap(100).await?;
/// assert_eq!(report.corrupt, 0);
/// # Ok(()) }
/// ```
pub struct EncryptedStore<S> {
    /// Shared, so that a rewrap whose caller gives up can still release the lease it holds.
    inner: Arc<S>,
    keys: Arc<dyn KeyProvider>,
    holder: LeaseHolder,
    clock: SharedClock,
    accept_plain: bool,
    intermediate_key_lifetime: Duration,
    cache: KeyCache,
    /// The intermediate key new records are encrypted under, once the first write made it.
    writer: RwLock<Option<Arc<WriteKey>>>,
    /// Held while a new intermediate key is wrapped, so that concurrent writes wait for one
    /// provider call instead of each making their own.
    rotation: tokio::sync::Mutex<()>,
    plain: PlainReads,
}

impl<S: fmt::Debug> fmt::Debug for EncryptedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys appear as ids and counts only: `WriteKey` and `KeyCache` redact the rest.
        let writer = self.writer.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("EncryptedStore")
            .field("inner", &self.inner)
            .field("keys", &self.keys)
            .field("holder", &self.holder)
            .field("accept_plain_records", &self.accept_plain)
            .field("intermediate_key_lifetime", &self.intermediate_key_lifetime)
            .field("write_key", &*writer)
            .field("key_cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl<S: TokenStore> EncryptedStore<S> {
    /// Encrypts what goes into `inner` with keys from `keys`, with the defaults in the table
    /// above. Rewraps take leases as a random [`LeaseHolder`].
    pub fn new(inner: S, keys: Arc<dyn KeyProvider>) -> Self {
        EncryptedStore {
            inner: Arc::new(inner),
            keys,
            holder: LeaseHolder::random(),
            clock: crate::clock::system(),
            accept_plain: false,
            intermediate_key_lifetime: DEFAULT_INTERMEDIATE_KEY_LIFETIME,
            cache: KeyCache::new(
                DEFAULT_KEY_CACHE_TTL,
                DEFAULT_KEY_CACHE_CAPACITY,
                DEFAULT_LEGACY_KEY_CACHE_CAPACITY,
            ),
            writer: RwLock::new(None),
            rotation: tokio::sync::Mutex::new(()),
            plain: PlainReads::default(),
        }
    }

    /// Sets the holder id under which [`rewrap`](Self::rewrap) takes refresh leases, e.g. to
    /// tell a rotation job's leases apart in the database. Like every holder id, it must be
    /// unique among the instances sharing the store.
    pub fn with_lease_holder(mut self, holder: LeaseHolder) -> Self {
        self.holder = holder;
        self
    }

    /// How long this process encrypts new records under one intermediate key (default 1
    /// hour). After that, the next write draws a new key and has the provider wrap it: one
    /// provider call per lifetime. A new primary key at the provider also starts a new key, at
    /// the next write.
    ///
    /// It is also how long writes go on while the provider is down, and how long this process
    /// reads the records it wrote under its current key without asking the provider. Shorter
    /// limits what one key covers and how long a KEK disabled at the KMS keeps working here;
    /// longer rides out longer outages. `Duration::ZERO` wraps a new key for every write.
    pub fn with_intermediate_key_lifetime(mut self, lifetime: Duration) -> Self {
        self.intermediate_key_lifetime = lifetime;
        self
    }

    /// How long an unwrapped key (another process's intermediate key, an older one of this
    /// process, a format-1 data key) is used without asking the provider again (default 1
    /// hour). Reads of such records go on for that long while the provider is down.
    /// `Duration::ZERO` turns the cache off: every such read calls the provider.
    pub fn with_key_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache = self.cache.with_ttl(ttl);
        self
    }

    /// How many unwrapped intermediate keys are kept (default 1024; 0 keeps none). Each
    /// process makes one per lifetime, so a store read by few processes needs few. When full,
    /// expired keys go first, then the oldest.
    pub fn with_key_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = self.cache.with_capacity(capacity);
        self
    }

    /// How many data keys of format-1 records (written before 0.2, one per record) are kept
    /// (default 4096; 0 keeps none), so that repeated reads of one such record do not call the
    /// provider. They go away as [`rewrap`](Self::rewrap) or ordinary writes move records to
    /// the current format.
    pub fn with_legacy_key_cache_capacity(mut self, capacity: usize) -> Self {
        self.cache = self.cache.with_legacy_capacity(capacity);
        self
    }

    /// The clock that times the intermediate key's lifetime and the key cache (the system
    /// clock by default; tests pass a `testing::ManualClock`).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Whether records the inner store holds in plain text (written before encryption was
    /// turned on) are served as they are (`true`), or load as [`StoreError::Corrupt`]
    /// (`false`, the default). **An opt-in for the migration only.**
    ///
    /// To turn encryption on for a store that holds plain records:
    /// 1. deploy with `accept_plain_records(true)`: plain records read, every write encrypts;
    /// 2. run [`rewrap`](Self::rewrap) (with the opt-in on it encrypts plain records, under the
    ///    lease and fenced, and counts them in [`RewrapReport::encrypted_plain`]) until a pass
    ///    reports `encrypted_plain == 0`, `skipped_busy == 0` and `corrupt == 0`;
    /// 3. deploy without the opt-in.
    ///
    /// While it is on, anyone who can write to the database can plant a record that is served
    /// as a token set; that is why plain records are refused by default.
    ///
    /// How a plain record is told from an envelope: envelopes start with a format byte in
    /// `0xE0..=0xEF` (`0xE1`, `0xE2` so far), which no JSON text can start with, and a payload
    /// with such a first byte is only ever read as an envelope (one that does not parse is
    /// corrupt, never plain). A plain record is one complete JSON object (the first byte that is
    /// not JSON whitespace is `{`, and the whole payload parses), as every payload format of
    /// the broker is, versioned or not. Anything else is corrupt.
    ///
    /// Each plain record served is counted ([`plain_records_served`](Self::plain_records_served))
    /// and its key is logged once at `warn` (the first 1024 keys); the payload never is.
    pub fn accept_plain_records(mut self, accept: bool) -> Self {
        self.accept_plain = accept;
        self
    }

    /// How many plain records this store has served since it was built (see
    /// [`accept_plain_records`](Self::accept_plain_records)); reads by a rewrap are not counted.
    pub fn plain_records_served(&self) -> u64 {
        self.plain.count.load(Ordering::Relaxed)
    }

    /// The holder id under which [`rewrap`](Self::rewrap) takes refresh leases.
    pub fn lease_holder(&self) -> &LeaseHolder {
        &self.holder
    }

    /// The inner store, which holds envelopes (and, before a migration is done, plain records).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The key provider.
    pub fn key_provider(&self) -> &Arc<dyn KeyProvider> {
        &self.keys
    }

    /// This process's intermediate key if it may still encrypt: younger than its lifetime and
    /// made under the provider's current primary key.
    fn usable_write_key(&self, primary: &KeyId) -> Option<Arc<WriteKey>> {
        let writer = self.writer.read().unwrap_or_else(PoisonError::into_inner);
        let current = writer.as_ref()?;
        (current.primary == *primary
            && younger_than(
                current.created,
                self.clock.now(),
                self.intermediate_key_lifetime,
            ))
        .then(|| Arc::clone(current))
    }

    /// The intermediate key to encrypt with, made (one provider call) when there is none yet
    /// or the current one is due for rotation.
    async fn write_key(&self) -> Result<Arc<WriteKey>, StoreError> {
        let primary = self.keys.primary_key_id();
        if let Some(key) = self.usable_write_key(&primary) {
            return Ok(key);
        }
        let _turn = self.rotation.lock().await;
        // Someone else may have made one while this write waited.
        if let Some(key) = self.usable_write_key(&primary) {
            return Ok(key);
        }
        let key = DataKey::generate().map_err(backend)?;
        let wrapped = self
            .keys
            .wrap(&key, INTERMEDIATE_KEY_AAD)
            .await
            .map_err(backend)?;
        let header = envelope::header(&wrapped.key_id, &wrapped.wrapped).ok_or_else(|| {
            backend(KeyError::InvalidKey {
                reason: "the wrapped key is longer than 65535 bytes",
            })
        })?;
        let now = self.clock.now();
        let key = Arc::new(key);
        // Reads of what this process writes need no unwrap, for the cache TTL and (through
        // `own_key`) for the key's lifetime.
        self.cache.put_intermediate(&header, Arc::clone(&key), now);
        let made = Arc::new(WriteKey {
            header,
            kek_id: wrapped.key_id,
            primary,
            key,
            created: now,
        });
        *self.writer.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&made));
        Ok(made)
    }

    /// Encrypts a record in the current format (2) under this process's intermediate key.
    async fn seal(&self, key: &TokenKey, record: &Record) -> Result<Record, StoreError> {
        let payload = self.seal_payload(key, &record.payload).await?;
        Ok(Record::new(payload, record.meta.clone()))
    }

    /// Encrypts a payload bound to `key` (a record's, or an outbox entry's of that link).
    async fn seal_payload(&self, key: &TokenKey, payload: &Payload) -> Result<Payload, StoreError> {
        let write_key = self.write_key().await?;
        let aad = record_aad_v2(key, &write_key.kek_id);
        let nonce = XNonce::try_generate().map_err(|e| backend(KeyError::unavailable(e)))?;
        let ciphertext = XChaCha20Poly1305::new(write_key.key.expose_secret().into())
            .encrypt(
                &nonce,
                AeadPayload {
                    msg: payload.expose_secret(),
                    aad: &aad,
                },
            )
            .map_err(|_| {
                backend(KeyError::unavailable(EncryptFailed(
                    "payload encryption failed",
                )))
            })?;
        let mut out = Vec::with_capacity(1 + write_key.header.len() + NONCE_LEN + ciphertext.len());
        out.push(FORMAT_V2);
        out.extend_from_slice(&write_key.header);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(Payload::new(out))
    }

    /// Decrypts an outbox entry's payload. One that cannot be decrypted is passed on as it is:
    /// the broker then fails to decode it and gives the entry up, with an outcome that says
    /// so, rather than letting it block the outbox. A key provider that is unavailable is an
    /// error, so the entry is tried again later.
    async fn open_revocation(
        &self,
        sealed: PendingRevocation,
    ) -> Result<PendingRevocation, StoreError> {
        // The envelope code works on records; the meta and version are placeholders that
        // nothing reads back.
        let now = self.clock.now();
        let as_record = StoredRecord::new(
            Record::new(
                sealed.payload.clone(),
                super::RecordMeta::new(super::LinkState::Active, None, now, now),
            ),
            Version::from_number(0),
        );
        match self.open(&sealed.key, as_record, Opener::Outbox).await {
            Ok(opened) => Ok(sealed.with_payload(opened.record.payload)),
            Err(StoreError::Corrupt { .. }) => Ok(sealed),
            Err(e) => Err(e),
        }
    }

    /// This process's current intermediate key, if `header` names it and it is within its
    /// lifetime (its cache entry may have expired sooner).
    fn own_key(&self, header: &[u8]) -> Option<Arc<DataKey>> {
        let writer = self.writer.read().unwrap_or_else(PoisonError::into_inner);
        let current = writer.as_ref()?;
        (*current.header == *header
            && younger_than(
                current.created,
                self.clock.now(),
                self.intermediate_key_lifetime,
            ))
        .then(|| Arc::clone(&current.key))
    }

    /// The intermediate key of a format-2 envelope: cached, this process's own, or unwrapped
    /// (once, however many reads wait for it).
    async fn intermediate_key(&self, envelope: &Envelope<'_>) -> Result<Arc<DataKey>, KeyError> {
        let header = envelope.header;
        if let Some(key) = self.cache.intermediate(header, self.clock.now()) {
            return Ok(key);
        }
        if let Some(key) = self.own_key(header) {
            return Ok(key);
        }
        let _flight = self.cache.flight(header).await;
        if let Some(key) = self.cache.intermediate(header, self.clock.now()) {
            return Ok(key);
        }
        let key = Arc::new(
            self.keys
                .unwrap(&envelope.key_id, envelope.wrapped, INTERMEDIATE_KEY_AAD)
                .await?,
        );
        self.cache
            .put_intermediate(header, Arc::clone(&key), self.clock.now());
        Ok(key)
    }

    /// The data key of a format-1 envelope of `record`: cached for that record, or unwrapped.
    async fn legacy_data_key(
        &self,
        record: &TokenKey,
        envelope: &Envelope<'_>,
        aad: &[u8],
    ) -> Result<Arc<DataKey>, KeyError> {
        let header = envelope.header;
        if let Some(key) = self.cache.legacy(record, header, self.clock.now()) {
            return Ok(key);
        }
        let _flight = self.cache.flight(header).await;
        if let Some(key) = self.cache.legacy(record, header, self.clock.now()) {
            return Ok(key);
        }
        let key = Arc::new(
            self.keys
                .unwrap(&envelope.key_id, envelope.wrapped, aad)
                .await?,
        );
        self.cache
            .put_legacy(record, header, Arc::clone(&key), self.clock.now());
        Ok(key)
    }

    /// Decrypts what the inner store holds (or passes a plain record through, when accepted).
    async fn open(
        &self,
        key: &TokenKey,
        stored: StoredRecord,
        opener: Opener,
    ) -> Result<StoredRecord, StoreError> {
        let version = stored.version.clone();
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: Some(version.clone()),
        };
        let bytes = stored.record.payload.expose_secret();
        let envelope = match envelope::parse(bytes) {
            Ok(Parsed::Envelope(envelope)) => envelope,
            Ok(Parsed::Plain) if self.accept_plain => {
                if !envelope::is_json_object(bytes) {
                    return Err(corrupt(
                        "neither an envelope nor a plain record (not one JSON object)".to_owned(),
                    ));
                }
                if opener == Opener::Load {
                    self.plain.note(key);
                }
                return Ok(stored);
            }
            Ok(Parsed::Plain) => {
                return Err(corrupt(
                    "not encrypted (a plain payload, refused unless accept_plain_records is on)"
                        .to_owned(),
                ));
            }
            Err(reason) => return Err(corrupt(reason.to_owned())),
        };
        let (what, data_key, aad) = if envelope.format == FORMAT_V2 {
            let aad = record_aad_v2(key, &envelope.key_id);
            (
                "intermediate key",
                self.intermediate_key(&envelope).await,
                aad,
            )
        } else {
            debug_assert_eq!(envelope.format, FORMAT_V1);
            let aad = record_aad_v1(key);
            let data_key = self.legacy_data_key(key, &envelope, &aad).await;
            ("data key", data_key, aad)
        };
        let data_key = match data_key {
            Ok(k) => k,
            Err(KeyError::UnknownKeyId { key_id }) => {
                return Err(corrupt(format!(
                    "{what} is wrapped under unknown key id {key_id}"
                )));
            }
            Err(KeyError::Rejected { .. } | KeyError::InvalidKey { .. }) => {
                return Err(corrupt(format!(
                    "{what} under {} failed authentication (tampered, or copied from another record)",
                    envelope.key_id
                )));
            }
            Err(e) => return Err(backend(e)),
        };
        let nonce = XNonce::try_from(envelope.nonce)
            .map_err(|_| corrupt("truncated envelope".to_owned()))?;
        let plain = XChaCha20Poly1305::new(data_key.expose_secret().into())
            .decrypt(
                &nonce,
                AeadPayload {
                    msg: envelope.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| {
                corrupt(
                    "payload failed authentication (tampered, or copied from another record)"
                        .to_owned(),
                )
            })?;
        Ok(StoredRecord::new(
            Record::new(Payload::new(plain), stored.record.meta),
            stored.version,
        ))
    }

    /// Whether a stored record needs no rewrap: a current-format envelope under the primary
    /// key (or under the KEK this process's current intermediate key is wrapped under, for a
    /// provider that names key versions apart from its primary key id).
    fn is_current(&self, raw: &StoredRecord, primary: &KeyId) -> bool {
        let Ok(Parsed::Envelope(envelope)) = envelope::parse(raw.record.payload.expose_secret())
        else {
            return false;
        };
        if envelope.format != FORMAT_V2 {
            return false;
        }
        if envelope.key_id == *primary {
            return true;
        }
        let writer = self.writer.read().unwrap_or_else(PoisonError::into_inner);
        writer
            .as_ref()
            .is_some_and(|w| w.primary == *primary && w.kek_id == envelope.key_id)
    }

    /// Re-encrypts every record that is not current (under another key, in format 1, or plain
    /// while [`accept_plain_records`](Self::accept_plain_records) is on), walking the inner
    /// store in pages of `batch_size` (at least 1). See [`EncryptedStore::rewrap_page`].
    ///
    /// Safe to run on a live store and to repeat: each record is rewritten under its key's
    /// refresh lease, with a compare-and-swap on the version loaded under the lease and fenced
    /// by it, so a concurrent write is never overwritten, a refresh in progress never has its
    /// write made to conflict (which could lose a rotated refresh token), and a second pass
    /// finds nothing to do. On an error the pass stops; what it rewrote stays rewritten, and no
    /// lease it took is left held.
    pub async fn rewrap(&self, batch_size: usize) -> Result<RewrapReport, StoreError> {
        let mut total = RewrapReport::default();
        let mut cursor: Option<ScanCursor> = None;
        loop {
            let (report, next) = self.rewrap_page(cursor.as_ref(), batch_size).await?;
            total.add(&report);
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(total),
            }
        }
    }

    /// Re-encrypts, under the primary key and in the current format, the records among the
    /// next page of at most `batch_size` links (at least 1) of a pass over the inner store that
    /// are not current, and returns the cursor to pass next (`None` when the pass is done).
    /// Start a pass with `None`. Lets a host bound the work per call; the cursor is plain text
    /// ([`ScanCursor::as_str`]) and may be kept to resume the pass later.
    ///
    /// A record is current when it is a format-2 envelope whose KEK id is the provider's
    /// primary key id. Records under the primary but under an older intermediate key are
    /// current: intermediate keys are not rotated by rewrapping. Format-1 envelopes are
    /// rewritten in format 2 ([`RewrapReport::rewrapped`]), and so are plain records while
    /// [`accept_plain_records`](Self::accept_plain_records) is on
    /// ([`RewrapReport::encrypted_plain`]); without it they are counted in
    /// [`RewrapReport::corrupt`].
    ///
    /// Key rotation is a writer that is not a refresh, so it must not race one: a refresh that
    /// has spent a refresh token and then finds its write in conflict may lose the rotated
    /// token. For each record that is not current (read first without a lease, so that
    /// records already moved cost no lease), the rewrap takes the key's refresh lease
    /// (for 30 s, as [`lease_holder`](Self::lease_holder)); a busy lease skips the record,
    /// counted in [`RewrapReport::skipped_busy`]. Under the lease the record is loaded again,
    /// decrypted, encrypted under this process's current intermediate key, and written with a
    /// `compare_and_swap` on that version, fenced by the lease; then the lease is released,
    /// also when something failed. A conflict means someone wrote meanwhile (under the primary
    /// key) and is counted in [`RewrapReport::skipped_conflict`]. Records that do not decrypt
    /// are counted in [`RewrapReport::corrupt`], logged, and left alone.
    pub async fn rewrap_page(
        &self,
        cursor: Option<&ScanCursor>,
        batch_size: usize,
    ) -> Result<(RewrapReport, Option<ScanCursor>), StoreError> {
        let page = self.inner.scan(cursor, batch_size.max(1)).await?;
        let primary = self.keys.primary_key_id();
        let mut report = RewrapReport::default();
        for link in &page.links {
            report.scanned += 1;
            report.count(self.rewrap_one(&link.key, &primary).await?);
        }
        Ok((report, page.next))
    }

    /// Rewraps one record under its lease (see [`rewrap_page`](Self::rewrap_page)).
    async fn rewrap_one(&self, key: &TokenKey, primary: &KeyId) -> Result<Rewrapped, StoreError> {
        match self.inner.load(key).await? {
            None => return Ok(Rewrapped::Conflict),
            Some(raw) if self.is_current(&raw, primary) => return Ok(Rewrapped::AlreadyPrimary),
            Some(_) => {}
        }
        let lease = match self
            .inner
            .try_lease(key, &self.holder, REWRAP_LEASE_TTL)
            .await?
        {
            LeaseAttempt::Acquired(lease) => lease,
            LeaseAttempt::Busy => return Ok(Rewrapped::Busy),
            LeaseAttempt::Missing => return Ok(Rewrapped::Conflict),
        };
        // Released however this ends: a rewrap job dropped or timed out by its host while it
        // holds a lease would otherwise keep refreshes of the key waiting for the lease's TTL.
        let guard = ReleaseOnDrop {
            store: Arc::clone(&self.inner),
            lease: Some(lease),
        };
        let lease = guard.lease.as_ref().expect("just set");
        let outcome = self.rewrap_leased(key, primary, lease).await;
        let released = self.inner.release_lease(lease).await;
        guard.disarm();
        match (outcome, released) {
            (Ok(outcome), Ok(())) => Ok(outcome),
            (Err(e), Ok(())) | (Ok(_), Err(e)) => Err(e),
            (Err(e), Err(release)) => {
                // The first error is the one to report; the lease expires by itself.
                tracing::warn!(%key, error = %release, "rewrap: releasing the lease failed");
                Err(e)
            }
        }
    }

    /// The part of [`rewrap_one`](Self::rewrap_one) done under the lease.
    async fn rewrap_leased(
        &self,
        key: &TokenKey,
        primary: &KeyId,
        lease: &Lease,
    ) -> Result<Rewrapped, StoreError> {
        // Loaded again: the record may have been written between the first read and the lease.
        let Some(raw) = self.inner.load(key).await? else {
            return Ok(Rewrapped::Conflict);
        };
        if self.is_current(&raw, primary) {
            return Ok(Rewrapped::AlreadyPrimary);
        }
        let was_plain = matches!(
            envelope::parse(raw.record.payload.expose_secret()),
            Ok(Parsed::Plain)
        );
        let plain = match self.open(key, raw, Opener::Rewrap).await {
            Ok(plain) => plain,
            Err(StoreError::Corrupt { key, reason, .. }) => {
                tracing::warn!(%key, %reason, "rewrap: record does not decrypt; left as is");
                return Ok(Rewrapped::Corrupt);
            }
            Err(e) => return Err(e),
        };
        let record = self.seal(key, &plain.record).await?;
        match self
            .inner
            .compare_and_swap(key, plain.version, &record, Some(&lease.token))
            .await
        {
            Ok(_) if was_plain => Ok(Rewrapped::EncryptedPlain),
            Ok(_) => Ok(Rewrapped::Done),
            Err(StoreError::Conflict { .. }) => Ok(Rewrapped::Conflict),
            Err(e) => Err(e),
        }
    }
}

/// Releases a lease when dropped before [`disarm`](Self::disarm), in a task of its own (a
/// fenced release, so a late one frees nothing that was taken again since).
struct ReleaseOnDrop<S: TokenStore> {
    store: Arc<S>,
    lease: Option<Lease>,
}

impl<S: TokenStore> ReleaseOnDrop<S> {
    fn disarm(mut self) {
        self.lease = None;
    }
}

impl<S: TokenStore> Drop for ReleaseOnDrop<S> {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = Arc::clone(&self.store);
            runtime.spawn(async move {
                if let Err(e) = store.release_lease(&lease).await {
                    tracing::warn!(key = %lease.key, error = %e, "rewrap: releasing an abandoned lease failed");
                }
            });
        }
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: TokenStore> TokenStore for EncryptedStore<S> {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        match self.inner.load(key).await? {
            Some(stored) => self.open(key, stored, Opener::Load).await.map(Some),
            None => Ok(None),
        }
    }

    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        let sealed = self.seal(key, record).await?;
        self.inner.insert(key, &sealed).await
    }

    // The record replaced is never decrypted: a record that does not decrypt (reported as
    // `Corrupt` with its version) can be replaced at that version.
    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let sealed = self.seal(key, record).await?;
        self.inner
            .compare_and_swap(key, expected, &sealed, fence)
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

    // The entry is encrypted under the link's binding, as the record was.
    async fn delete_and_enqueue_revocation(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
        revocation: &PendingRevocation,
    ) -> Result<bool, StoreError> {
        let sealed = revocation.with_payload(self.seal_payload(key, &revocation.payload).await?);
        self.inner
            .delete_and_enqueue_revocation(key, expected, &sealed)
            .await
    }

    async fn enqueue_revocation(&self, revocation: &PendingRevocation) -> Result<(), StoreError> {
        let sealed = revocation.with_payload(
            self.seal_payload(&revocation.key, &revocation.payload)
                .await?,
        );
        self.inner.enqueue_revocation(&sealed).await
    }

    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<PendingRevocation>, StoreError> {
        let mut opened = Vec::new();
        for sealed in self.inner.claim_revocations(now, until, limit).await? {
            opened.push(self.open_revocation(sealed).await?);
        }
        Ok(opened)
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
