//! Envelope encryption at rest: [`EncryptedStore`] wraps any [`TokenStore`].
//!
//! Each write draws a fresh random data key, encrypts the payload with it
//! (XChaCha20-Poly1305), and stores the data key wrapped by a key-encryption key (KEK) from a
//! [`KeyProvider`]. Both layers authenticate the record's key, so a ciphertext copied to another
//! row does not decrypt.

mod keys;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use super::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, Record, ScannedLink, StoreError, StoredRecord,
    TokenStore, Version,
};
use crate::ids::{Realm, Subject, TokenKey};
use crate::token::Payload;
pub use keys::{DataKey, KeyError, KeyId, KeyProvider, KeyringError, StaticKeyring, WrappedKey};
use keys::{EncryptFailed, put_len_prefixed};

/// The `store` name of [`StoreError::Backend`] errors raised by the encryption layer.
const STORE_NAME: &str = "encryption";

/// Envelope format 1: XChaCha20-Poly1305 for the payload, key id and wrapped data key in front.
/// Not `{` (0x7B), the first byte of a plain JSON payload, so a plain record is told apart.
const FORMAT_V1: u8 = 0xE1;
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

/// What a payload's encryption authenticates: the format and the record's key, each part
/// length-prefixed so that no two keys encode alike (`a/bc` vs `ab/c`).
fn record_aad(key: &TokenKey) -> Vec<u8> {
    let parts = [
        key.realm.as_str(),
        key.subject.as_str(),
        key.provider.as_str(),
    ];
    let mut aad = Vec::with_capacity(64 + parts.iter().map(|p| p.len()).sum::<usize>());
    aad.extend_from_slice(b"tokenbroker/record/");
    aad.push(FORMAT_V1);
    for part in parts {
        put_len_prefixed(&mut aad, part.as_bytes());
    }
    aad
}

/// A parsed envelope, borrowing the stored bytes.
///
/// Layout (format 1): `0xE1 | id_len: u8 | key id | wrapped_len: u16 BE | wrapped key |
/// nonce (24) | ciphertext || tag (16)`.
struct Envelope<'a> {
    key_id: KeyId,
    wrapped: &'a [u8],
    nonce: &'a [u8],
    ciphertext: &'a [u8],
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    if rest.len() < n {
        return Err("truncated envelope");
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

impl<'a> Envelope<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self, &'static str> {
        let mut rest = bytes;
        match take(&mut rest, 1)? {
            [FORMAT_V1] => {}
            [b'{'] => return Err("not encrypted (a plain payload)"),
            _ => return Err("unknown envelope format"),
        }
        let id_len = usize::from(take(&mut rest, 1)?[0]);
        let key_id = std::str::from_utf8(take(&mut rest, id_len)?)
            .ok()
            .and_then(|id| KeyId::new(id).ok())
            .ok_or("invalid key id in envelope")?;
        let wrapped_len = take(&mut rest, 2)?;
        let wrapped_len = usize::from(u16::from_be_bytes([wrapped_len[0], wrapped_len[1]]));
        let wrapped = take(&mut rest, wrapped_len)?;
        let nonce = take(&mut rest, NONCE_LEN)?;
        if rest.len() < TAG_LEN {
            return Err("truncated envelope");
        }
        Ok(Envelope {
            key_id,
            wrapped,
            nonce,
            ciphertext: rest,
        })
    }
}

/// The id of the key-encryption key a stored record's data key is wrapped under, as the inner
/// store of an [`EncryptedStore`] holds it; `None` if the payload is not an envelope.
///
/// It parses the envelope without decrypting anything: use it to see how far a rotation got.
pub fn key_id_of(stored: &StoredRecord) -> Option<KeyId> {
    Envelope::parse(stored.record.payload.expose_secret())
        .ok()
        .map(|e| e.key_id)
}

/// The outcome of a [`EncryptedStore::rewrap`] or [`EncryptedStore::rewrap_page`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RewrapReport {
    /// Links visited.
    pub scanned: usize,
    /// Records re-encrypted under the primary key.
    pub rewrapped: usize,
    /// Records already under the primary key, left alone.
    pub already_primary: usize,
    /// Records changed or deleted between the load and the write: left as the concurrent writer
    /// left them (a concurrent write already uses the primary key).
    pub skipped_conflict: usize,
    /// Records not under the primary key whose refresh lease was held by someone else (a
    /// refresh, or another rewrap, at work on them): left untouched, so as not to make that
    /// refresh's write conflict. Run the rewrap again later; do not retire an old key while
    /// this is not zero.
    pub skipped_busy: usize,
    /// Records that could not be decrypted (see [`StoreError::Corrupt`]), left untouched. Do not
    /// retire an old key while this is not zero: the records are logged with their keys.
    pub corrupt: usize,
}

impl RewrapReport {
    fn add(&mut self, other: &RewrapReport) {
        self.scanned += other.scanned;
        self.rewrapped += other.rewrapped;
        self.already_primary += other.already_primary;
        self.skipped_conflict += other.skipped_conflict;
        self.skipped_busy += other.skipped_busy;
        self.corrupt += other.corrupt;
    }

    fn count(&mut self, outcome: Rewrapped) {
        let counter = match outcome {
            Rewrapped::Done => &mut self.rewrapped,
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
    AlreadyPrimary,
    Conflict,
    Busy,
    Corrupt,
}

/// A [`TokenStore`] that encrypts payloads before they reach the inner store.
///
/// Every write draws a fresh random 32-byte data key and encrypts the payload with
/// XChaCha20-Poly1305 (random 24-byte nonce). The data key is wrapped by the
/// [`KeyProvider`]'s primary key, and the envelope (format byte, key id, wrapped key, nonce,
/// ciphertext) is what the inner store keeps as the payload. Both layers authenticate the
/// record's key (realm, subject, provider), so a ciphertext copied to another row fails.
///
/// **Only the payload is encrypted.** The [`RecordMeta`](super::RecordMeta) (state, expiry,
/// timestamps), the keys, versions and leases pass through in clear, because stores index them
/// for sweeps and leases.
///
/// A record that fails to parse or decrypt (truncated, tampered, moved, under an unknown key)
/// loads as [`StoreError::Corrupt`]; a failing [`KeyProvider`] is a
/// [`StoreError::Backend`] with store `encryption`.
///
/// Records the inner store already holds in plain text are not migrated: they load as
/// [`StoreError::Corrupt`] ("not encrypted"), since accepting plain payloads would let anyone
/// with write access to the database plant tokens.
///
/// Key rotation: make a new key primary while keeping the old ones; new writes use it, old
/// records still read, and [`EncryptedStore::rewrap`] moves old records over so that the old
/// keys can be retired. A rewrap writes each record under the key's refresh lease, taken as
/// [`EncryptedStore::lease_holder`] (random unless set with
/// [`with_lease_holder`](EncryptedStore::with_lease_holder)).
///
/// **No decrypted copy is kept here.** Every load unwraps the data key and decrypts (some
/// 7 µs for a 2.5 KB set on a 2-core bench machine, `benches/encrypted_read.rs`), so every
/// read still authenticates what the database holds. Encryption at rest answers a leaked
/// database or backup, not the process: the broker above already keeps the decoded sets of recent reads in
/// its own bounded hot cache (and drops a link's on unlink), so a second plain copy here
/// would add memory and no speed worth having on top of a database round trip.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
/// use tokenbroker::{MemoryStore, TokenStore};
///
/// // In production: StaticKeyring::from_env("TOKENBROKER_KEYS")?
/// let keys = StaticKeyring::new(KeyId::new("k1")?, [7; 32]);
/// let store = Arc::new(EncryptedStore::new(MemoryStore::new(), Arc::new(keys)));
/// let shared: Arc<dyn TokenStore> = store.clone();
/// // ... hand `shared` to TokenBroker::builder().with_store(..)
///
/// // Later, after making a new key primary:
/// let report = store.rewrap(100).await?;
/// assert_eq!(report.corrupt, 0);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct EncryptedStore<S> {
    inner: S,
    keys: Arc<dyn KeyProvider>,
    holder: LeaseHolder,
}

impl<S: TokenStore> EncryptedStore<S> {
    /// Encrypts what goes into `inner` with keys from `keys`. Rewraps take leases as a random
    /// [`LeaseHolder`].
    pub fn new(inner: S, keys: Arc<dyn KeyProvider>) -> Self {
        EncryptedStore {
            inner,
            keys,
            holder: LeaseHolder::random(),
        }
    }

    /// Sets the holder id under which [`rewrap`](Self::rewrap) takes refresh leases, e.g. to
    /// tell a rotation job's leases apart in the database. Like every holder id, it must be
    /// unique among the instances sharing the store.
    pub fn with_lease_holder(mut self, holder: LeaseHolder) -> Self {
        self.holder = holder;
        self
    }

    /// The holder id under which [`rewrap`](Self::rewrap) takes refresh leases.
    pub fn lease_holder(&self) -> &LeaseHolder {
        &self.holder
    }

    /// The inner store, which holds envelopes.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The key provider.
    pub fn key_provider(&self) -> &Arc<dyn KeyProvider> {
        &self.keys
    }

    async fn encrypt(&self, key: &TokenKey, record: &Record) -> Result<Record, StoreError> {
        let backend = |e: KeyError| StoreError::Backend {
            store: STORE_NAME,
            source: Arc::new(e),
        };
        let aad = record_aad(key);
        let data_key = DataKey::generate().map_err(backend)?;
        let wrapped = self.keys.wrap(&data_key, &aad).await.map_err(backend)?;
        let wrapped_len = u16::try_from(wrapped.wrapped.len()).map_err(|_| {
            backend(KeyError::InvalidKey {
                reason: "the wrapped data key is longer than 65535 bytes",
            })
        })?;
        let nonce = XNonce::try_generate().map_err(|e| backend(KeyError::unavailable(e)))?;
        let ciphertext = XChaCha20Poly1305::new(data_key.expose_secret().into())
            .encrypt(
                &nonce,
                AeadPayload {
                    msg: record.payload.expose_secret(),
                    aad: &aad,
                },
            )
            .map_err(|_| {
                backend(KeyError::unavailable(EncryptFailed(
                    "payload encryption failed",
                )))
            })?;
        let id = wrapped.key_id.as_str().as_bytes();
        let mut out =
            Vec::with_capacity(4 + id.len() + wrapped.wrapped.len() + NONCE_LEN + ciphertext.len());
        out.push(FORMAT_V1);
        // KeyId guarantees 1..=64 bytes.
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&wrapped_len.to_be_bytes());
        out.extend_from_slice(&wrapped.wrapped);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        Ok(Record::new(Payload::new(out), record.meta.clone()))
    }

    async fn decrypt(
        &self,
        key: &TokenKey,
        stored: StoredRecord,
    ) -> Result<StoredRecord, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: Some(stored.version),
        };
        let envelope = Envelope::parse(stored.record.payload.expose_secret())
            .map_err(|r| corrupt(r.to_owned()))?;
        let aad = record_aad(key);
        let data_key = match self
            .keys
            .unwrap(&envelope.key_id, envelope.wrapped, &aad)
            .await
        {
            Ok(k) => k,
            Err(KeyError::UnknownKeyId { key_id }) => {
                return Err(corrupt(format!(
                    "data key is wrapped under unknown key id {key_id}"
                )));
            }
            Err(KeyError::Rejected { .. } | KeyError::InvalidKey { .. }) => {
                return Err(corrupt(format!(
                    "data key under {} failed authentication (tampered, or copied from another record)",
                    envelope.key_id
                )));
            }
            Err(e) => {
                return Err(StoreError::Backend {
                    store: STORE_NAME,
                    source: Arc::new(e),
                });
            }
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

    /// Re-encrypts every record that is not under the primary key, walking the inner store in
    /// pages of `batch_size` (at least 1). See [`EncryptedStore::rewrap_page`].
    ///
    /// Safe to run on a live store and to repeat: each record is rewritten under its key's
    /// refresh lease, with a compare-and-swap on the version loaded under the lease and fenced
    /// by it, so a concurrent write is never overwritten, a refresh in progress never has its
    /// write made to conflict (which could lose a rotated refresh token), and a second pass
    /// finds nothing to do. On an error the pass stops; what it rewrote stays rewritten, and no
    /// lease it took is left held.
    pub async fn rewrap(&self, batch_size: usize) -> Result<RewrapReport, StoreError> {
        let mut total = RewrapReport::default();
        let mut cursor: Option<TokenKey> = None;
        loop {
            let (report, next) = self.rewrap_page(cursor.as_ref(), batch_size).await?;
            total.add(&report);
            match next {
                Some(next) => cursor = Some(next),
                None => return Ok(total),
            }
        }
    }

    /// Re-encrypts, under the primary key, the records among the next `batch_size` links (at
    /// least 1) strictly after `after`, and returns the cursor to pass next (`None` when the
    /// walk is done). Lets a host bound the work per call.
    ///
    /// Key rotation is a writer that is not a refresh, so it must not race one: a refresh that
    /// has spent a refresh token and then finds its write in conflict may lose the rotated
    /// token. For each record not under the primary key (read first without a lease, so that
    /// records already moved cost no lease), the rewrap takes the key's refresh lease
    /// (for 30 s, as [`lease_holder`](Self::lease_holder)); a busy lease skips the record,
    /// counted in [`RewrapReport::skipped_busy`]. Under the lease the record is loaded again,
    /// decrypted, encrypted with a fresh data key under the primary, and written with a
    /// `compare_and_swap` on that version, fenced by the lease; then the lease is released,
    /// also when something failed. A conflict means someone wrote meanwhile (under the primary
    /// key) and is counted in [`RewrapReport::skipped_conflict`]. Records that do not decrypt
    /// are counted in [`RewrapReport::corrupt`], logged, and left alone.
    pub async fn rewrap_page(
        &self,
        after: Option<&TokenKey>,
        batch_size: usize,
    ) -> Result<(RewrapReport, Option<TokenKey>), StoreError> {
        let limit = batch_size.max(1);
        let links = self.inner.scan(after, limit).await?;
        let primary = self.keys.primary_key_id();
        let mut report = RewrapReport::default();
        for link in &links {
            report.scanned += 1;
            report.count(self.rewrap_one(&link.key, &primary).await?);
        }
        let next = if links.len() == limit {
            links.last().map(|l| l.key.clone())
        } else {
            None
        };
        Ok((report, next))
    }

    /// Rewraps one record under its lease (see [`rewrap_page`](Self::rewrap_page)).
    async fn rewrap_one(&self, key: &TokenKey, primary: &KeyId) -> Result<Rewrapped, StoreError> {
        match self.inner.load(key).await? {
            None => return Ok(Rewrapped::Conflict),
            Some(raw) if key_id_of(&raw).as_ref() == Some(primary) => {
                return Ok(Rewrapped::AlreadyPrimary);
            }
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
        let outcome = self.rewrap_leased(key, primary, &lease).await;
        let released = self.inner.release_lease(&lease).await;
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
        if key_id_of(&raw).as_ref() == Some(primary) {
            return Ok(Rewrapped::AlreadyPrimary);
        }
        let plain = match self.decrypt(key, raw).await {
            Ok(plain) => plain,
            Err(StoreError::Corrupt { key, reason, .. }) => {
                tracing::warn!(%key, %reason, "rewrap: record does not decrypt; left as is");
                return Ok(Rewrapped::Corrupt);
            }
            Err(e) => return Err(e),
        };
        let record = self.encrypt(key, &plain.record).await?;
        match self
            .inner
            .compare_and_swap(key, plain.version, &record, Some(&lease.token))
            .await
        {
            Ok(_) => Ok(Rewrapped::Done),
            Err(StoreError::Conflict { .. }) => Ok(Rewrapped::Conflict),
            Err(e) => Err(e),
        }
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<S: TokenStore> TokenStore for EncryptedStore<S> {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        match self.inner.load(key).await? {
            Some(stored) => self.decrypt(key, stored).await.map(Some),
            None => Ok(None),
        }
    }

    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        let sealed = self.encrypt(key, record).await?;
        self.inner.insert(key, &sealed).await
    }

    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let sealed = self.encrypt(key, record).await?;
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
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<ScannedLink>, StoreError> {
        self.inner.scan(after, limit).await
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
}
