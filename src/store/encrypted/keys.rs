//! Key material and key providers: [`KeyId`], [`DataKey`], [`WrappedKey`], [`KeyError`], the
//! [`KeyProvider`] trait and the in-process [`StaticKeyring`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload as AeadPayload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use secrecy::zeroize::{Zeroize, Zeroizing};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};

use super::{KEY_LEN, NONCE_LEN, STATIC_WRAPPED_LEN};
use crate::error::BoxError;
use crate::ids::InvalidId;

/// The id of a key-encryption key, stored in clear in every envelope so that reads find the key.
///
/// Rules: 1 to 64 bytes of printable ASCII, without space, `,` or `:` (they separate entries in
/// [`StaticKeyring::from_config_str`]).
///
/// ```
/// use tokenbroker::store::KeyId;
/// assert!(KeyId::new("2026-01").is_ok());
/// assert!(KeyId::new("a:b").is_err());
/// assert!(KeyId::new("").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(Box<str>);

impl KeyId {
    /// The longest key id, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a key id.
    pub fn new(value: impl AsRef<str>) -> Result<Self, InvalidId> {
        let value = value.as_ref();
        match key_id_rule(value) {
            None => Ok(KeyId(value.into())),
            Some(rule) => Err(InvalidId {
                kind: "key id",
                value: value.chars().take(64).collect(),
                rule,
            }),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn key_id_rule(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        Some("must not be empty")
    } else if value.len() > KeyId::MAX_LEN {
        Some("must be at most 64 bytes")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b',' && b != b':')
    {
        Some("may contain only printable ASCII other than space, ',' and ':'")
    } else {
        None
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({:?})", &*self.0)
    }
}

impl FromStr for KeyId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        KeyId::new(s)
    }
}

impl AsRef<str> for KeyId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A 32-byte symmetric key that is stored only wrapped by a [`KeyProvider`]: an
/// [`EncryptedStore`](super::EncryptedStore) intermediate key (which encrypts the records one
/// process writes during the key's lifetime), or the per-record data key of a format-1
/// envelope written before 0.2.
///
/// Zeroized on drop; `Debug` shows nothing of it.
///
/// ```
/// use tokenbroker::store::DataKey;
/// let key = DataKey::from_slice(&[1u8; 32])?;
/// assert_eq!(format!("{key:?}"), "DataKey([redacted])");
/// assert!(DataKey::from_slice(&[1u8; 31]).is_err());
/// # Ok::<(), tokenbroker::store::KeyError>(())
/// ```
pub struct DataKey(SecretBox<[u8; KEY_LEN]>);

impl DataKey {
    /// The length of a data key in bytes.
    pub const LEN: usize = KEY_LEN;

    /// A fresh random key from the operating system's generator.
    pub(super) fn generate() -> Result<Self, KeyError> {
        let mut key = SecretBox::<[u8; KEY_LEN]>::default();
        getrandom::fill(key.expose_secret_mut()).map_err(|e| {
            KeyError::unavailable(RandomFailed {
                code: e.raw_os_error(),
            })
        })?;
        Ok(DataKey(key))
    }

    /// A data key from bytes, e.g. what a key service unwrapped. Fails unless there are exactly
    /// 32 bytes; the caller should zeroize its copy.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let bytes: &[u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::InvalidKey {
            reason: "a data key must be 32 bytes",
        })?;
        Ok(DataKey(SecretBox::init_with_mut(
            |k: &mut [u8; KEY_LEN]| k.copy_from_slice(bytes),
        )))
    }

    /// The key bytes, to wrap them. Never log them.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

/// A data key wrapped by a key-encryption key, as a [`KeyProvider`] returns it.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WrappedKey {
    /// The key-encryption key used; stored in clear and passed back to
    /// [`KeyProvider::unwrap`].
    pub key_id: KeyId,
    /// The wrapped key, opaque to the store (at most 65535 bytes).
    pub wrapped: Vec<u8>,
}

impl WrappedKey {
    /// Builds a wrapped key.
    pub fn new(key_id: KeyId, wrapped: Vec<u8>) -> Self {
        WrappedKey { key_id, wrapped }
    }
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("key_id", &self.key_id)
            .field("wrapped_len", &self.wrapped.len())
            .finish()
    }
}

/// A [`KeyProvider`] failed. No variant carries key material.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// No key-encryption key has this id (it was retired, or the stored id is wrong).
    /// Reads report it as [`StoreError::Corrupt`](crate::StoreError::Corrupt).
    #[error("unknown key id {key_id}")]
    UnknownKeyId {
        /// The id asked for.
        key_id: KeyId,
    },
    /// The wrapped key did not authenticate: tampered, wrapped under another key, or wrapped
    /// for another record. Reads report it as [`StoreError::Corrupt`](crate::StoreError::Corrupt).
    #[error("wrapped data key under {key_id} failed authentication")]
    Rejected {
        /// The key-encryption key tried.
        key_id: KeyId,
    },
    /// Key bytes had the wrong shape.
    #[error("invalid key: {reason}")]
    InvalidKey {
        /// What was wrong, without the bytes.
        reason: &'static str,
    },
    /// The key service or the random number generator failed; nothing is known about the
    /// data. Reported as [`StoreError::Backend`](crate::StoreError::Backend): retry later.
    #[error("key provider unavailable")]
    Unavailable {
        /// The underlying error. It must not contain key material.
        #[source]
        source: BoxError,
    },
}

impl KeyError {
    /// An [`KeyError::Unavailable`] from any error value (a KMS client's error).
    pub fn unavailable(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        KeyError::Unavailable {
            source: Arc::new(source),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the operating system's random number generator failed (os error {code:?})")]
struct RandomFailed {
    code: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct EncryptFailed(pub(super) &'static str);

/// Wraps and unwraps data keys under key-encryption keys: a [`StaticKeyring`], or a host's
/// client for a key management service.
///
/// `aad` binds a wrapped key to its use; an implementation must authenticate it (a KMS
/// "encryption context"), so that a wrapped key used in another context fails to unwrap.
/// [`EncryptedStore`](super::EncryptedStore) wraps one intermediate key per process and
/// lifetime, with a fixed `aad`, and unwraps each wrapped key it meets once per cache TTL: the
/// provider is called a handful of times an hour, not once per read. (Format-1 envelopes,
/// written before 0.2, hold a data key per record wrapped with the record's key as `aad`;
/// they are still unwrapped, once per record and cache TTL.)
///
/// ```
/// use async_trait::async_trait;
/// use tokenbroker::store::{DataKey, KeyError, KeyId, KeyProvider, StaticKeyring, WrappedKey};
///
/// /// Stands in for a KMS client: the calls would go over the network.
/// #[derive(Debug)]
/// struct Kms(StaticKeyring);
///
/// #[async_trait]
/// impl KeyProvider for Kms {
///     fn primary_key_id(&self) -> KeyId {
///         self.0.primary_key_id()
///     }
///     async fn wrap(&self, data_key: &DataKey, aad: &[u8]) -> Result<WrappedKey, KeyError> {
///         self.0.wrap(data_key, aad).await
///     }
///     async fn unwrap(&self, key_id: &KeyId, wrapped: &[u8], aad: &[u8])
///         -> Result<DataKey, KeyError> {
///         self.0.unwrap(key_id, wrapped, aad).await
///     }
/// }
/// ```
#[async_trait]
pub trait KeyProvider: fmt::Debug + Send + Sync + 'static {
    /// The key new writes are wrapped under.
    fn primary_key_id(&self) -> KeyId;

    /// Wraps `data_key` under the primary key, authenticating `aad`. The returned key id is
    /// what the envelope records; a KMS may name a key version other than
    /// [`KeyProvider::primary_key_id`], and later reads will ask for that one.
    async fn wrap(&self, data_key: &DataKey, aad: &[u8]) -> Result<WrappedKey, KeyError>;

    /// Unwraps a key wrapped by [`KeyProvider::wrap`] under `key_id` with the same `aad`.
    async fn unwrap(&self, key_id: &KeyId, wrapped: &[u8], aad: &[u8])
    -> Result<DataKey, KeyError>;
}

/// A key-encryption key held in memory.
struct Kek(SecretBox<[u8; KEY_LEN]>);

impl Kek {
    fn from_bytes(mut bytes: [u8; KEY_LEN]) -> Self {
        let kek = Kek(SecretBox::init_with_mut(|k: &mut [u8; KEY_LEN]| *k = bytes));
        bytes.zeroize();
        kek
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.0.expose_secret().into())
    }
}

/// Key-encryption keys held by the process, one of them primary: the simple [`KeyProvider`].
///
/// New keys are wrapped under the primary key; records under the other keys still read, until
/// [`EncryptedStore::rewrap`](super::EncryptedStore::rewrap) has moved them. Wrapping is XChaCha20-Poly1305 with a random
/// nonce, authenticating the caller's `aad` and the key id.
///
/// `Debug` shows the key ids only.
///
/// ```
/// use tokenbroker::store::{KeyId, KeyProvider, StaticKeyring};
///
/// // "id:base64(32 bytes)", comma-separated, the first one primary.
/// let keys = StaticKeyring::from_config_str(
///     "k2:AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=,k1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
/// )?;
/// assert_eq!(keys.primary_key_id().as_str(), "k2");
/// assert!(!format!("{keys:?}").contains("AgIC"));
///
/// // The same, built in code.
/// let keys = StaticKeyring::new(KeyId::new("k1")?, [1; 32])
///     .with_key(KeyId::new("k2")?, [2; 32])?
///     .with_primary(&KeyId::new("k2")?)?;
/// assert_eq!(keys.primary_key_id().as_str(), "k2");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct StaticKeyring {
    primary: KeyId,
    keys: BTreeMap<KeyId, Kek>,
}

/// A keyring could not be built. No variant carries key material; a configuration entry is
/// named by its position (from 1), not by its text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// The configuration holds no key.
    #[error("no key-encryption key configured")]
    Empty,
    /// The environment variable is not set, or is not valid UTF-8.
    #[error("environment variable {var} is not set or not valid UTF-8")]
    MissingEnv {
        /// The variable's name.
        var: String,
    },
    /// An entry is not `id:base64key`, or its id breaks the [`KeyId`] rules.
    #[error("key entry {entry} is malformed: {reason}")]
    Malformed {
        /// The entry's position, from 1.
        entry: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// An entry's key is not valid base64.
    #[error("key entry {entry}: the key is not valid base64")]
    BadBase64 {
        /// The entry's position, from 1.
        entry: usize,
    },
    /// An entry's key does not decode to 32 bytes.
    #[error("key entry {entry}: the key is {len} bytes, expected 32")]
    WrongLength {
        /// The entry's position, from 1.
        entry: usize,
        /// The decoded length.
        len: usize,
    },
    /// Two keys have the same id.
    #[error("key id {key_id} is given twice")]
    DuplicateKeyId {
        /// The id.
        key_id: KeyId,
    },
    /// [`StaticKeyring::with_primary`] named a key that is not in the keyring.
    #[error("key id {key_id} is not in the keyring")]
    UnknownKeyId {
        /// The id.
        key_id: KeyId,
    },
}

impl StaticKeyring {
    /// A keyring with one key, which is primary. The keyring keeps its own zeroized copy of
    /// `key`; zeroize yours if it lives on.
    pub fn new(primary_id: KeyId, key: [u8; 32]) -> Self {
        let mut keys = BTreeMap::new();
        keys.insert(primary_id.clone(), Kek::from_bytes(key));
        StaticKeyring {
            primary: primary_id,
            keys,
        }
    }

    /// Adds a key (an older one that records may still be wrapped under, or the next primary).
    pub fn with_key(mut self, id: KeyId, key: [u8; 32]) -> Result<Self, KeyringError> {
        let kek = Kek::from_bytes(key);
        if self.keys.contains_key(&id) {
            return Err(KeyringError::DuplicateKeyId { key_id: id });
        }
        self.keys.insert(id, kek);
        Ok(self)
    }

    /// Makes `id`, already in the keyring, the primary key.
    pub fn with_primary(mut self, id: &KeyId) -> Result<Self, KeyringError> {
        if !self.keys.contains_key(id) {
            return Err(KeyringError::UnknownKeyId { key_id: id.clone() });
        }
        self.primary = id.clone();
        Ok(self)
    }

    /// Parses `id1:BASE64KEY,id2:BASE64KEY`: standard base64 of 32 bytes each (padding
    /// optional), the first entry primary. Spaces and newlines around entries are ignored.
    ///
    /// Generate a key with `openssl rand -base64 32`.
    pub fn from_config_str(config: &str) -> Result<Self, KeyringError> {
        let config = config.trim();
        if config.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut ring: Option<StaticKeyring> = None;
        for (i, entry) in config.split(',').enumerate() {
            let entry_no = i + 1;
            let malformed = |reason| KeyringError::Malformed {
                entry: entry_no,
                reason,
            };
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(malformed("empty entry"));
            }
            let (id, key) = entry
                .split_once(':')
                .ok_or(malformed("expected id:base64key"))?;
            let id = id.trim();
            if let Some(rule) = key_id_rule(id) {
                return Err(malformed(rule));
            }
            let id = KeyId(id.into());
            let key = decode_key(key.trim(), entry_no)?;
            ring = Some(match ring {
                None => StaticKeyring::new(id, key),
                Some(ring) => ring.with_key(id, key)?,
            });
        }
        ring.ok_or(KeyringError::Empty)
    }

    /// Reads [`StaticKeyring::from_config_str`]'s format from the environment variable `var`.
    pub fn from_env(var: &str) -> Result<Self, KeyringError> {
        let config = Zeroizing::new(std::env::var(var).map_err(|_| KeyringError::MissingEnv {
            var: var.to_owned(),
        })?);
        StaticKeyring::from_config_str(&config)
    }

    /// The ids of all keys, in order.
    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }
}

fn decode_key(text: &str, entry: usize) -> Result<[u8; KEY_LEN], KeyringError> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    // The decoder's own error names the offending byte, which is key material: drop it.
    let decoded = Zeroizing::new(
        STANDARD
            .decode(text)
            .or_else(|_| STANDARD_NO_PAD.decode(text))
            .map_err(|_| KeyringError::BadBase64 { entry })?,
    );
    let len = decoded.len();
    <[u8; KEY_LEN]>::try_from(decoded.as_slice())
        .map_err(|_| KeyringError::WrongLength { entry, len })
}

impl fmt::Debug for StaticKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeyring")
            .field("primary", &self.primary)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What the KEK authenticates: the record's AAD and the key id, each length-prefixed, so that
/// neither can be shifted into the other.
fn kek_aad(record_aad: &[u8], key_id: &KeyId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(24 + record_aad.len() + key_id.0.len());
    aad.extend_from_slice(b"tokenbroker/kek/1");
    put_len_prefixed(&mut aad, record_aad);
    put_len_prefixed(&mut aad, key_id.as_str().as_bytes());
    aad
}

pub(super) fn put_len_prefixed(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u64).to_be_bytes());
    out.extend_from_slice(part);
}

#[async_trait]
impl KeyProvider for StaticKeyring {
    fn primary_key_id(&self) -> KeyId {
        self.primary.clone()
    }

    async fn wrap(&self, data_key: &DataKey, aad: &[u8]) -> Result<WrappedKey, KeyError> {
        let kek = self
            .keys
            .get(&self.primary)
            .ok_or_else(|| KeyError::UnknownKeyId {
                key_id: self.primary.clone(),
            })?;
        let nonce = XNonce::try_generate().map_err(KeyError::unavailable)?;
        let sealed = kek
            .cipher()
            .encrypt(
                &nonce,
                AeadPayload {
                    msg: data_key.expose_secret(),
                    aad: &kek_aad(aad, &self.primary),
                },
            )
            .map_err(|_| KeyError::unavailable(EncryptFailed("data key wrapping failed")))?;
        let mut wrapped = Vec::with_capacity(STATIC_WRAPPED_LEN);
        wrapped.extend_from_slice(&nonce);
        wrapped.extend_from_slice(&sealed);
        Ok(WrappedKey::new(self.primary.clone(), wrapped))
    }

    async fn unwrap(
        &self,
        key_id: &KeyId,
        wrapped: &[u8],
        aad: &[u8],
    ) -> Result<DataKey, KeyError> {
        let kek = self
            .keys
            .get(key_id)
            .ok_or_else(|| KeyError::UnknownKeyId {
                key_id: key_id.clone(),
            })?;
        let rejected = || KeyError::Rejected {
            key_id: key_id.clone(),
        };
        if wrapped.len() != STATIC_WRAPPED_LEN {
            return Err(rejected());
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| rejected())?;
        let key = Zeroizing::new(
            kek.cipher()
                .decrypt(
                    &nonce,
                    AeadPayload {
                        msg: sealed,
                        aad: &kek_aad(aad, key_id),
                    },
                )
                .map_err(|_| rejected())?,
        );
        DataKey::from_slice(&key).map_err(|_| rejected())
    }
}
