//! Storage of links: the [`TokenStore`] trait, its record types, and [`MemoryStore`].
//!
//! # Implementing a `TokenStore`
//!
//! A store keeps one row per [`TokenKey`]: an opaque, secret [`Payload`] (the encoded token set),
//! some plain [`RecordMeta`] it may index, a store-assigned [`Version`], and a short refresh
//! lease. The broker never compares secrets to detect races: it compares versions.
//!
//! The trait uses `#[async_trait]` rather than native `async fn` so that hosts can choose a store
//! at run time as `Arc<dyn TokenStore>`; the boxed future costs nothing next to a database round
//! trip.
//!
//! A SQL store needs one table:
//!
//! ```sql
//! CREATE TABLE links (
//!   realm TEXT, subject TEXT, provider TEXT, version BIGINT NOT NULL,
//!   payload BLOB NOT NULL, state TEXT NOT NULL, expires_at BIGINT, ...,
//!   lease_holder TEXT, lease_token TEXT, lease_expires_at BIGINT,
//!   PRIMARY KEY (realm, subject, provider));
//! -- compare_and_swap:  UPDATE links SET ..., version = version + 1
//! --                    WHERE realm = $1 AND subject = $2 AND provider = $3 AND version = $4
//! -- try_lease:         UPDATE links SET lease_holder = $4, lease_token = $5,
//! --                    lease_expires_at = now() + ttl
//! --                    WHERE ... AND (lease_holder IS NULL OR lease_expires_at <= now())
//! -- release_lease:     UPDATE links SET lease_holder = NULL, lease_token = NULL, ...
//! --                    WHERE ... AND lease_token = $4          -- fenced, never by holder
//! ```
//!
//! A complete store, one lock around everything (correct, if not fast), checked by the
//! conformance suite (the `testing` feature; this example runs with `cargo test
//! --all-features`):
//!
//! ```
//! use std::collections::{BTreeMap, HashMap};
//! use std::sync::Mutex;
//! use std::time::Duration;
//!
//! use async_trait::async_trait;
//! use time::OffsetDateTime;
//! use tokenbroker::store::*;
//! use tokenbroker::{Realm, Subject, TokenKey};
//!
//! #[derive(Debug, Default)]
//! struct OneLockStore(Mutex<State>);
//!
//! #[derive(Debug, Default)]
//! struct State {
//!     next_version: u64,
//!     // Ordered by key, so that `scan` can resume after a cursor.
//!     links: BTreeMap<TokenKey, Row>,
//!     outbox: HashMap<RevocationId, PendingRevocation>,
//! }
//!
//! #[derive(Debug)]
//! struct Row {
//!     record: Record,
//!     version: Version,
//!     // The current lease token and its expiry, kept after expiry until replaced or released.
//!     lease: Option<(LeaseToken, OffsetDateTime)>,
//! }
//!
//! impl State {
//!     fn version(&mut self) -> Version {
//!         self.next_version += 1; // never reused, even after a delete
//!         // Any string the store can compare will do: versions are opaque to the broker.
//!         Version::from_tag(format!("g{}", self.next_version))
//!     }
//! }
//!
//! fn conflict(key: &TokenKey) -> StoreError {
//!     StoreError::Conflict { key: key.clone() }
//! }
//!
//! impl OneLockStore {
//!     fn state(&self) -> std::sync::MutexGuard<'_, State> {
//!         self.0.lock().unwrap()
//!     }
//!
//!     fn delete_in(state: &mut State, key: &TokenKey, expected: Option<Version>)
//!         -> Result<bool, StoreError> {
//!         match (state.links.get(key), expected) {
//!             (None, _) => Ok(false),
//!             (Some(row), Some(v)) if row.version != v => Err(conflict(key)),
//!             _ => Ok(state.links.remove(key).is_some()),
//!         }
//!     }
//! }
//!
//! #[async_trait]
//! impl TokenStore for OneLockStore {
//!     async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
//!         let state = self.state();
//!         Ok(state.links.get(key).map(|r| StoredRecord::new(r.record.clone(), r.version.clone())))
//!     }
//!
//!     async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
//!         let mut state = self.state();
//!         if state.links.contains_key(key) {
//!             return Err(conflict(key));
//!         }
//!         let version = state.version();
//!         let row = Row { record: record.clone(), version: version.clone(), lease: None };
//!         state.links.insert(key.clone(), row);
//!         Ok(version)
//!     }
//!
//!     async fn compare_and_swap(&self, key: &TokenKey, expected: Version, record: &Record,
//!         fence: Option<&LeaseToken>) -> Result<Version, StoreError> {
//!         let mut state = self.state();
//!         let version = state.version();
//!         match state.links.get_mut(key) {
//!             Some(row) if row.version == expected
//!                 && fence.is_none_or(|f| row.lease.as_ref().is_some_and(|(t, _)| t == f)) => {
//!                 row.record = record.clone();
//!                 row.version = version.clone();
//!                 Ok(version)
//!             }
//!             _ => Err(conflict(key)),
//!         }
//!     }
//!
//!     async fn delete(&self, key: &TokenKey, expected: Option<Version>)
//!         -> Result<bool, StoreError> {
//!         Self::delete_in(&mut self.state(), key, expected)
//!     }
//!
//!     async fn list(&self, realm: &Realm, subject: &Subject)
//!         -> Result<Vec<TokenKey>, StoreError> {
//!         let state = self.state();
//!         Ok(state.links.keys()
//!             .filter(|k| &k.realm == realm && &k.subject == subject)
//!             .cloned()
//!             .collect())
//!     }
//!
//!     async fn scan(&self, cursor: Option<&ScanCursor>, limit: usize)
//!         -> Result<ScanPage, StoreError> {
//!         let after = cursor.map(ScanCursor::key).transpose()?;
//!         let state = self.state();
//!         // One link more than asked for tells whether the pass goes on.
//!         let links = state.links.iter()
//!             .filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a))
//!             .take(limit.max(1) + 1)
//!             .map(|(k, r)| ScannedLink::new(k.clone(), r.record.meta.clone(), r.version.clone()))
//!             .collect();
//!         Ok(ScanPage::from_ordered(links, limit))
//!     }
//!
//!     async fn try_lease(&self, key: &TokenKey, holder: &LeaseHolder, ttl: Duration)
//!         -> Result<LeaseAttempt, StoreError> {
//!         let now = OffsetDateTime::now_utc(); // the store's clock judges leases
//!         let mut state = self.state();
//!         let Some(row) = state.links.get_mut(key) else { return Ok(LeaseAttempt::Missing) };
//!         if row.lease.as_ref().is_some_and(|(_, until)| *until > now) {
//!             return Ok(LeaseAttempt::Busy); // not re-entrant, even for the same holder
//!         }
//!         let token = LeaseToken::random();
//!         row.lease = Some((token.clone(), now + ttl));
//!         Ok(LeaseAttempt::Acquired(Lease::new(key.clone(), holder.clone(), token, now + ttl)))
//!     }
//!
//!     async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
//!         let mut state = self.state();
//!         if let Some(row) = state.links.get_mut(&lease.key) {
//!             if row.lease.as_ref().is_some_and(|(t, _)| *t == lease.token) {
//!                 row.lease = None; // by its token only: a stale holder frees nothing
//!             }
//!         }
//!         Ok(())
//!     }
//!
//!     async fn extend_lease(&self, lease: &Lease, ttl: Duration)
//!         -> Result<Option<Lease>, StoreError> {
//!         let now = OffsetDateTime::now_utc();
//!         let mut state = self.state();
//!         match state.links.get_mut(&lease.key).and_then(|r| r.lease.as_mut()) {
//!             Some((token, until)) if *token == lease.token => {
//!                 *until = now + ttl;
//!                 let mut extended = lease.clone();
//!                 extended.expires_at = *until;
//!                 Ok(Some(extended))
//!             }
//!             _ => Ok(None),
//!         }
//!     }
//!
//!     async fn delete_and_enqueue_revocation(&self, key: &TokenKey,
//!         expected: Option<Version>, revocation: &PendingRevocation)
//!         -> Result<bool, StoreError> {
//!         let mut state = self.state(); // one lock: the delete and the entry are one step
//!         let deleted = Self::delete_in(&mut state, key, expected)?;
//!         if deleted {
//!             state.outbox.insert(revocation.id.clone(), revocation.clone());
//!         }
//!         Ok(deleted)
//!     }
//!
//!     async fn enqueue_revocation(&self, revocation: &PendingRevocation)
//!         -> Result<(), StoreError> {
//!         self.state().outbox.insert(revocation.id.clone(), revocation.clone());
//!         Ok(())
//!     }
//!
//!     async fn claim_revocations(&self, now: OffsetDateTime, until: OffsetDateTime,
//!         limit: usize) -> Result<Vec<PendingRevocation>, StoreError> {
//!         let mut state = self.state();
//!         Ok(state.outbox.values_mut()
//!             .filter(|r| r.due_at <= now)
//!             .take(limit)
//!             .map(|r| {
//!                 r.attempts += 1;
//!                 r.due_at = until;
//!                 r.clone()
//!             })
//!             .collect())
//!     }
//!
//!     async fn reschedule_revocation(&self, claimed: &PendingRevocation,
//!         due_at: OffsetDateTime) -> Result<bool, StoreError> {
//!         let mut state = self.state();
//!         match state.outbox.get_mut(&claimed.id) {
//!             Some(r) if r.attempts == claimed.attempts => {
//!                 r.due_at = due_at;
//!                 Ok(true)
//!             }
//!             _ => Ok(false),
//!         }
//!     }
//!
//!     async fn remove_revocation(&self, id: &RevocationId) -> Result<(), StoreError> {
//!         self.state().outbox.remove(id);
//!         Ok(())
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! let store: std::sync::Arc<dyn TokenStore> = std::sync::Arc::new(OneLockStore::default());
//! tokenbroker::testing::store_conformance::run_all(&store).await;
//! # });
//! ```

pub mod cached;
#[cfg(feature = "encryption")]
mod encrypted;
mod memory;
mod outbox;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis_store;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;

use std::fmt::{self, Debug};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::BoxError;
use crate::ids::{Realm, Subject, TokenKey};
use crate::token::Payload;

/// The `redis` crate the Redis store is built on, so that a host builds a `ConnectionManager`
/// of the same version for [`RedisStore::from_manager`].
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use ::redis;
pub use cached::{CacheStats, CachedStore, CachedStoreBuilder, ChangeFeed, FeedEvent};
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub use encrypted::{
    DataKey, EncryptedStore, KeyError, KeyId, KeyProvider, KeyringError, RewrapReport,
    StaticKeyring, WrappedKey, key_id_of,
};
pub use memory::MemoryStore;
pub use outbox::{PendingRevocation, RevocationId};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis_store::{RedisChangeFeed, RedisStore};
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use sql::postgres::{PgChangeFeed, PostgresStore};
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use sql::sqlite::SqliteStore;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub use sql::{PurgeReport, RetentionPolicy};
/// The `sqlx` the SQL stores are built on, so that a host builds pools of the same version.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "sqlite", feature = "postgres"))))]
pub use sqlx;

/// A record version, assigned by the store and opaque to everybody else.
///
/// The broker only compares versions for equality and hands them back to the store that made
/// them. A store chooses the form that suits its backend: a counter
/// ([`from_number`](Self::from_number), as the stores in this crate use) or a tag such as an
/// HTTP `ETag` or a generation string ([`from_tag`](Self::from_tag)). A version of one form
/// never equals one of the other, so a store should use one form throughout. Every successful
/// write gives a record a version it never had before.
///
/// ```
/// use tokenbroker::store::Version;
///
/// let counted = Version::from_number(7);
/// assert_eq!(counted.number(), Some(7));
///
/// let etag = Version::from_tag("\"33a64df5\"");
/// assert_eq!(etag.tag(), Some("\"33a64df5\""));
/// assert_ne!(etag, Version::from_tag("\"33a64df6\""));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Version(VersionRepr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum VersionRepr {
    // A counter needs no allocation, which keeps the read path free of one.
    Number(u64),
    Tag(Arc<str>),
}

impl Version {
    /// A version that is a number, e.g. a counter the store increments on every write.
    pub const fn from_number(n: u64) -> Self {
        Version(VersionRepr::Number(n))
    }

    /// A version that is a string the backend gave, e.g. an `ETag`.
    pub fn from_tag(tag: impl Into<Arc<str>>) -> Self {
        Version(VersionRepr::Tag(tag.into()))
    }

    /// The number, for a version made by [`from_number`](Self::from_number).
    pub fn number(&self) -> Option<u64> {
        match &self.0 {
            VersionRepr::Number(n) => Some(*n),
            VersionRepr::Tag(_) => None,
        }
    }

    /// The tag, for a version made by [`from_tag`](Self::from_tag).
    pub fn tag(&self) -> Option<&str> {
        match &self.0 {
            VersionRepr::Number(_) => None,
            VersionRepr::Tag(tag) => Some(tag),
        }
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            VersionRepr::Number(n) => write!(f, "v{n}"),
            VersionRepr::Tag(tag) => write!(f, "v{tag:?}"),
        }
    }
}

/// Where a [`scan`](TokenStore::scan) goes on from: made by the store, opaque to callers.
///
/// A caller only passes back the cursor of the page it got. A store puts in it whatever it
/// needs to find the rest of its pass: the last key of a walk in key order
/// ([`after_key`](Self::after_key), as the stores in this crate do), a backend's own cursor
/// or continuation token ([`new`](Self::new)). Cursors are plain text, not secrets, and may be
/// kept to resume a pass later, on the same store.
///
/// ```
/// use tokenbroker::store::ScanCursor;
/// use tokenbroker::TokenKey;
///
/// let key = TokenKey::parse("acme", "user:42", "google").unwrap();
/// let cursor = ScanCursor::after_key(&key);
/// assert_eq!(cursor.key().unwrap(), key);
///
/// let dynamo = ScanCursor::new("eyJwayI6ImxpbmsjNDIifQ");
/// assert!(dynamo.key().is_err()); // not a key cursor: a store that made it knows how to read it
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ScanCursor(Arc<str>);

/// The prefix of cursors made by [`ScanCursor::after_key`].
const KEY_CURSOR_PREFIX: &str = "k1:";

impl ScanCursor {
    /// A cursor holding a store's own position.
    pub fn new(position: impl Into<Arc<str>>) -> Self {
        ScanCursor(position.into())
    }

    /// The cursor of a walk in key order that has returned `key` last.
    pub fn after_key(key: &TokenKey) -> Self {
        // Lengths first, so that any bytes in the parts read back unambiguously.
        let (realm, subject, provider) = (
            key.realm.as_str(),
            key.subject.as_str(),
            key.provider.as_str(),
        );
        ScanCursor(
            format!(
                "{KEY_CURSOR_PREFIX}{}:{}:{realm}{subject}{provider}",
                realm.len(),
                subject.len()
            )
            .into(),
        )
    }

    /// The key of a cursor made by [`after_key`](Self::after_key), or
    /// [`StoreError::InvalidCursor`] for any other cursor.
    pub fn key(&self) -> Result<TokenKey, StoreError> {
        let invalid = || StoreError::InvalidCursor {
            reason: "not a cursor of a walk in key order".into(),
        };
        let rest = self.0.strip_prefix(KEY_CURSOR_PREFIX).ok_or_else(invalid)?;
        let (realm_len, rest) = rest.split_once(':').ok_or_else(invalid)?;
        let (subject_len, rest) = rest.split_once(':').ok_or_else(invalid)?;
        let realm_len: usize = realm_len.parse().map_err(|_| invalid())?;
        let subject_len: usize = subject_len.parse().map_err(|_| invalid())?;
        let realm = rest.get(..realm_len).ok_or_else(invalid)?;
        let rest = &rest[realm_len..];
        let subject = rest.get(..subject_len).ok_or_else(invalid)?;
        let provider = &rest[subject_len..];
        TokenKey::parse(realm, subject, provider).map_err(|e| StoreError::InvalidCursor {
            reason: format!("its key is not valid: {e}"),
        })
    }

    /// The cursor as text, to keep it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ScanCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScanCursor({:?})", &*self.0)
    }
}

/// One page of a [`scan`](TokenStore::scan).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ScanPage {
    /// The links of this page, in no promised order. A page may hold fewer links than asked
    /// for, even none, and still not be the last.
    pub links: Vec<ScannedLink>,
    /// Where the pass goes on, or `None` when this was its last page.
    pub next: Option<ScanCursor>,
}

impl ScanPage {
    /// A page (for store implementations).
    pub fn new(links: Vec<ScannedLink>, next: Option<ScanCursor>) -> Self {
        ScanPage { links, next }
    }

    /// The page of a walk in key order, from up to `limit + 1` links read in ascending key
    /// order: it keeps `limit` of them and, when there was one more, gives the cursor after
    /// the last one kept (for store implementations that read one link ahead).
    pub fn from_ordered(mut links: Vec<ScannedLink>, limit: usize) -> Self {
        let limit = limit.max(1);
        let more = links.len() > limit;
        links.truncate(limit);
        let next = if more {
            links.last().map(|l| ScanCursor::after_key(&l.key))
        } else {
            None
        };
        ScanPage { links, next }
    }
}

/// Whether a link can still be used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
#[non_exhaustive]
pub enum LinkState {
    /// The grant is believed to be alive.
    Active,
    /// The provider rejected the refresh token (`invalid_grant`) while the record was unchanged:
    /// the user must link the account again. The record is kept so that the host can tell the
    /// user what happened and which account to re-link.
    RelinkRequired {
        /// The provider's `error_description`, or a short reason of ours. Never a token.
        reason: String,
        /// When the broker found out.
        #[serde(with = "time::serde::timestamp")]
        since: OffsetDateTime,
    },
}

impl LinkState {
    /// Whether the link needs the user to sign in again.
    pub fn is_relink_required(&self) -> bool {
        matches!(self, LinkState::RelinkRequired { .. })
    }

    /// A short name: `active` or `relink_required` (for SQL columns and logs).
    pub fn name(&self) -> &'static str {
        match self {
            LinkState::Active => "active",
            LinkState::RelinkRequired { .. } => "relink_required",
        }
    }
}

/// Plain (non-secret) facts about a record, which a store may keep in columns and index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RecordMeta {
    /// Whether the link is usable.
    pub state: LinkState,
    /// When the access token expires, if known (for sweeps).
    #[serde(with = "time::serde::timestamp::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// When the link was first stored.
    #[serde(with = "time::serde::timestamp")]
    pub created_at: OffsetDateTime,
    /// When the record was last written.
    #[serde(with = "time::serde::timestamp")]
    pub updated_at: OffsetDateTime,
}

impl RecordMeta {
    /// Metadata of an active link.
    pub fn new(
        state: LinkState,
        expires_at: Option<OffsetDateTime>,
        created_at: OffsetDateTime,
        updated_at: OffsetDateTime,
    ) -> Self {
        RecordMeta {
            state,
            expires_at,
            created_at,
            updated_at,
        }
    }
}

/// What a store writes for one key.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Record {
    /// The encoded token set: secret, opaque to the store.
    pub payload: Payload,
    /// Plain metadata.
    pub meta: RecordMeta,
}

impl Record {
    /// Builds a record.
    pub fn new(payload: Payload, meta: RecordMeta) -> Self {
        Record { payload, meta }
    }
}

/// A record as loaded, with the version to pass to [`TokenStore::compare_and_swap`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StoredRecord {
    /// The record.
    pub record: Record,
    /// Its current version.
    pub version: Version,
}

impl StoredRecord {
    /// Builds a loaded record (for store implementations).
    pub fn new(record: Record, version: Version) -> Self {
        StoredRecord { record, version }
    }
}

/// The identity of a lease holder: one per broker instance, random, never reused.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaseHolder(Arc<str>);

impl LeaseHolder {
    /// A fresh random holder id.
    pub fn random() -> Self {
        LeaseHolder(format!("tb-{}", crate::secret::random_token(12)).into())
    }
    /// A holder id chosen by the host (e.g. a pod name plus a random suffix). It must be unique
    /// among all instances sharing a store.
    pub fn new(id: impl Into<String>) -> Self {
        LeaseHolder(id.into().into())
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LeaseHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseHolder({})", self.0)
    }
}

/// The fencing token of one lease acquisition: unique per successful
/// [`TokenStore::try_lease`], never reused.
///
/// Release, extension and writes made under a lease are checked against this token, never
/// against the [`LeaseHolder`]: a holder that outlived its lease (stuck in a slow call) must
/// not free or overwrite a later acquisition, even one made by the same instance. A token is
/// not a secret; it only tells acquisitions apart.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(Arc<str>);

impl LeaseToken {
    /// A fresh random token (128 bits), for stores that do not make their own.
    pub fn random() -> Self {
        LeaseToken(crate::secret::random_token(16).into())
    }
    /// A token a store made or read back (e.g. from its `lease_token` column).
    pub fn new(token: impl Into<String>) -> Self {
        LeaseToken(token.into().into())
    }
    /// The token as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({})", self.0)
    }
}

/// A refresh lease held on one key: one acquisition, told apart from every other by its
/// [`token`](Lease::token).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// The key it covers.
    pub key: TokenKey,
    /// Who holds it.
    pub holder: LeaseHolder,
    /// This acquisition's fencing token.
    pub token: LeaseToken,
    /// When it expires, by the **store's** clock: after that instant (as the store judges
    /// it) anyone may take the lease. The holder uses it only to bound its own work, with a
    /// margin for clock skew between it and the store
    /// ([`LEASE_MARGIN`](crate::LEASE_MARGIN)); no decision about who holds the lease is ever
    /// made on the holder's clock.
    pub expires_at: OffsetDateTime,
}

impl Lease {
    /// Builds a lease (for store implementations).
    pub fn new(
        key: TokenKey,
        holder: LeaseHolder,
        token: LeaseToken,
        expires_at: OffsetDateTime,
    ) -> Self {
        Lease {
            key,
            holder,
            token,
            expires_at,
        }
    }
}

/// The result of [`TokenStore::try_lease`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeaseAttempt {
    /// The caller holds the lease until it releases it or it expires.
    Acquired(Lease),
    /// Another holder has an unexpired lease on the key.
    Busy,
    /// No record exists for the key.
    Missing,
}

/// One row of a [`TokenStore::scan`]: a key with its plain metadata and version, without the
/// payload.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScannedLink {
    /// The key.
    pub key: TokenKey,
    /// Its plain metadata.
    pub meta: RecordMeta,
    /// Its version when scanned.
    pub version: Version,
}

impl ScannedLink {
    /// Builds a scanned row (for store implementations).
    pub fn new(key: TokenKey, meta: RecordMeta, version: Version) -> Self {
        ScannedLink { key, meta, version }
    }
}

/// Errors from a store.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `insert` found the key present, or `compare_and_swap`/`delete` found another version (or
    /// no record). The broker re-reads and goes on; it is the only kind it retries on.
    #[error("record {key} already exists or was changed concurrently")]
    Conflict {
        /// The key written.
        key: TokenKey,
    },
    /// A scan was given a cursor this store did not make, or cannot read any more.
    #[error("scan cursor not valid for this store: {reason}")]
    InvalidCursor {
        /// What was wrong with it.
        reason: String,
    },
    /// The backend failed (connection lost, disk full, database down). Nothing was written, or
    /// the write's outcome is unknown.
    #[error("{store} store backend error")]
    Backend {
        /// Which store, e.g. `postgres`.
        store: &'static str,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// A stored record could not be decoded or decrypted (tampered, truncated, wrong key).
    ///
    /// The record is still there, and nobody can read it: the way out is to overwrite or
    /// delete it by its version (both work without reading the old record), e.g. when the user
    /// links the account again or unlinks it.
    #[error("stored record {key} could not be read: {reason}")]
    Corrupt {
        /// The key read.
        key: TokenKey,
        /// What was wrong, without the data.
        reason: String,
        /// The version of the record that could not be read, when the store knows it, so that
        /// a caller can replace it with [`TokenStore::compare_and_swap`] or delete it with
        /// [`TokenStore::delete`]`(key, Some(version))`. `None` when the version itself could
        /// not be read, or the error is not about a loaded record.
        version: Option<Version>,
    },
}

impl StoreError {
    /// A backend error from any error value.
    pub fn backend(
        store: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            store,
            source: Arc::new(source),
        }
    }
}

/// Storage for links, shared by every broker instance of a deployment.
///
/// # Contract
///
/// The conformance suite (`testing::store_conformance`, feature `testing`) checks each point.
/// - `load` returns `Ok(None)` for a missing key, never an error.
/// - `insert` writes only when the key is absent, and returns the new version; otherwise
///   [`StoreError::Conflict`].
/// - `compare_and_swap` writes only when the stored version equals `expected`, and returns
///   the new version; a stale version or a missing record is [`StoreError::Conflict`]. With a
///   `fence`, it also writes only while that token is the key's **current** lease token (see
///   below); a stale fence is [`StoreError::Conflict`] too, and writes nothing. Without a fence
///   the lease is not looked at: writes do not need a lease.
/// - Versions are assigned by the store and every successful write produces a version the key
///   never had before (a counter that only grows is enough).
/// - `delete` with `Some(version)` deletes only that version (a mismatch is `Conflict`;
///   a missing key is `Ok(false)`); with `None` it deletes whatever is there. It returns
///   whether a record was deleted.
/// - `list` returns the keys of one subject in one realm, and nothing of other realms or
///   subjects.
/// - `scan` walks every link of every realm in pages. A *pass* starts with `cursor` `None` and
///   goes on with each page's [`ScanPage::next`] until that is `None`. A complete pass returns
///   every link that exists throughout it **exactly once**; a link written or deleted during
///   the pass is returned at most once. Nothing is promised about order, and a page may hold
///   fewer than `limit` links (even none) without being the last; it never holds more.
///   A `limit` of 0 is taken as 1. A cursor is valid only on the store that made it (and on
///   wrappers that pass `scan` through); one the store cannot read is
///   [`StoreError::InvalidCursor`]. Sweeps, retention and key rotation are built on it.
/// - `try_lease` is atomic: at most one holder has an unexpired lease on a key at any time.
///   A lease is judged by the **store's** clock and expires `ttl` after it was taken; once
///   expired, anyone may take it. Taking a lease on a missing key answers
///   [`LeaseAttempt::Missing`]. The holder that already holds an unexpired lease gets `Busy`
///   too: leases are not re-entrant. Every acquisition carries a new [`LeaseToken`], which
///   becomes the key's *current* lease token.
/// - The current lease token stays current until the lease is released or the next
///   acquisition replaces it, **expired or not**: a lease that ran out but was not taken over
///   can still be extended, written under and released by its token (nobody else can have
///   spent the refresh token meanwhile).
/// - `release_lease` frees the lease only if `lease.token` is the current lease token; a stale
///   token (the lease was taken again since, by anyone, this holder included) changes nothing.
///   Releasing is idempotent.
/// - `extend_lease` sets the expiry to `ttl` from now (the store's clock) and returns the
///   extended lease if `lease.token` is the current lease token; otherwise it changes nothing
///   and returns `Ok(None)`.
/// - Leases do not change a record's version: the lease only keeps refresh tokens from being
///   spent twice; versions keep writes from being lost.
/// - Deleting a record drops its lease.
///
/// The revocation outbox (see [`PendingRevocation`]) lives in the same store, so that a link
/// and the revocation it leaves behind are written together:
/// - `delete_and_enqueue_revocation` is `delete` and, **in the same atomic step**, only when a
///   record was deleted, the write of the entry; on `Conflict`, on `Ok(false)` and on an error
///   nothing is written. A store that cannot do both atomically must not claim to be
///   conformant: a crash between them leaves either a live grant without a record or a
///   revocation of a link that still exists.
/// - `enqueue_revocation` writes an entry (replacing one with the same id).
/// - Entries are not links: `load`, `list` and `scan` never see them.
/// - `claim_revocations(now, until, limit)` atomically takes up to `limit` entries whose
///   `due_at` is at or before `now`, sets their `due_at` to `until`, adds one to their
///   `attempts`, and returns them as claimed. Two concurrent claims never return the same
///   entry. `now` is the caller's clock: a claim only keeps instances from doing the same work
///   at once, since revoking twice is harmless.
/// - `reschedule_revocation` sets `due_at` only while the entry's `attempts` is still the
///   claimed one (nobody claimed it since); it returns whether it did.
/// - `remove_revocation` deletes an entry; removing a missing one is `Ok`.
#[async_trait]
pub trait TokenStore: Debug + Send + Sync + 'static {
    /// Loads a record.
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError>;

    /// Writes a record for a key that has none.
    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError>;

    /// Replaces the record if its version is still `expected` and, with a `fence`, the key's
    /// current lease token is still `fence`.
    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError>;

    /// Deletes the record, if it is at version `expected` (or unconditionally with `None`).
    async fn delete(&self, key: &TokenKey, expected: Option<Version>) -> Result<bool, StoreError>;

    /// The keys of one subject's links in one realm, in any order.
    async fn list(&self, realm: &Realm, subject: &Subject) -> Result<Vec<TokenKey>, StoreError>;

    /// The next page of a pass over every link: from the start with `None`, then from the
    /// previous page's [`ScanPage::next`].
    async fn scan(&self, cursor: Option<&ScanCursor>, limit: usize)
    -> Result<ScanPage, StoreError>;

    /// Tries to take the refresh lease on a key for `ttl`.
    async fn try_lease(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError>;

    /// Releases a lease taken by `try_lease`, if its token is still the current one.
    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Extends a lease to `ttl` from now, if its token is still the current one: the extended
    /// lease, or `None` when the lease was taken again since.
    async fn extend_lease(&self, lease: &Lease, ttl: Duration)
    -> Result<Option<Lease>, StoreError>;

    /// Deletes the record like [`delete`](Self::delete) and, in the same atomic step, writes
    /// `revocation` to the outbox if a record was deleted.
    async fn delete_and_enqueue_revocation(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
        revocation: &PendingRevocation,
    ) -> Result<bool, StoreError>;

    /// Writes a revocation to the outbox (replacing one with the same id).
    async fn enqueue_revocation(&self, revocation: &PendingRevocation) -> Result<(), StoreError>;

    /// Claims up to `limit` revocations due at `now`: each gets `due_at = until` and one more
    /// attempt, atomically, and is returned as claimed.
    async fn claim_revocations(
        &self,
        now: OffsetDateTime,
        until: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<PendingRevocation>, StoreError>;

    /// Sets a claimed revocation's `due_at`, if nobody claimed it since (its `attempts` is
    /// unchanged). Whether it did.
    async fn reschedule_revocation(
        &self,
        claimed: &PendingRevocation,
        due_at: OffsetDateTime,
    ) -> Result<bool, StoreError>;

    /// Removes a revocation from the outbox: done, or given up. Idempotent.
    async fn remove_revocation(&self, id: &RevocationId) -> Result<(), StoreError>;
}

macro_rules! forward_store {
    ($ty:ty) => {
        #[deny(clippy::missing_trait_methods)]
        #[async_trait]
        impl<T: TokenStore + ?Sized> TokenStore for $ty {
            async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
                (**self).load(key).await
            }
            async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
                (**self).insert(key, record).await
            }
            async fn compare_and_swap(
                &self,
                key: &TokenKey,
                expected: Version,
                record: &Record,
                fence: Option<&LeaseToken>,
            ) -> Result<Version, StoreError> {
                (**self)
                    .compare_and_swap(key, expected, record, fence)
                    .await
            }
            async fn delete(
                &self,
                key: &TokenKey,
                expected: Option<Version>,
            ) -> Result<bool, StoreError> {
                (**self).delete(key, expected).await
            }
            async fn list(
                &self,
                realm: &Realm,
                subject: &Subject,
            ) -> Result<Vec<TokenKey>, StoreError> {
                (**self).list(realm, subject).await
            }
            async fn scan(
                &self,
                cursor: Option<&ScanCursor>,
                limit: usize,
            ) -> Result<ScanPage, StoreError> {
                (**self).scan(cursor, limit).await
            }
            async fn try_lease(
                &self,
                key: &TokenKey,
                holder: &LeaseHolder,
                ttl: Duration,
            ) -> Result<LeaseAttempt, StoreError> {
                (**self).try_lease(key, holder, ttl).await
            }
            async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
                (**self).release_lease(lease).await
            }
            async fn extend_lease(
                &self,
                lease: &Lease,
                ttl: Duration,
            ) -> Result<Option<Lease>, StoreError> {
                (**self).extend_lease(lease, ttl).await
            }
            async fn delete_and_enqueue_revocation(
                &self,
                key: &TokenKey,
                expected: Option<Version>,
                revocation: &PendingRevocation,
            ) -> Result<bool, StoreError> {
                (**self)
                    .delete_and_enqueue_revocation(key, expected, revocation)
                    .await
            }
            async fn enqueue_revocation(
                &self,
                revocation: &PendingRevocation,
            ) -> Result<(), StoreError> {
                (**self).enqueue_revocation(revocation).await
            }
            async fn claim_revocations(
                &self,
                now: OffsetDateTime,
                until: OffsetDateTime,
                limit: usize,
            ) -> Result<Vec<PendingRevocation>, StoreError> {
                (**self).claim_revocations(now, until, limit).await
            }
            async fn reschedule_revocation(
                &self,
                claimed: &PendingRevocation,
                due_at: OffsetDateTime,
            ) -> Result<bool, StoreError> {
                (**self).reschedule_revocation(claimed, due_at).await
            }
            async fn remove_revocation(&self, id: &RevocationId) -> Result<(), StoreError> {
                (**self).remove_revocation(id).await
            }
        }
    };
}

forward_store!(Arc<T>);
forward_store!(Box<T>);
