//! Code shared by the SQL stores: row mapping, time and duration conversions, migrations, and
//! the retention policy.
//!
//! Both stores keep one row per [`TokenKey`] in `tokenbroker_links`. Times are `BIGINT` unix
//! milliseconds (so no date-time type mapping differs between drivers), versions come from a
//! counter that never goes back (so a key deleted and inserted again never reuses a version),
//! and the refresh lease lives in the same row, judged by the database's clock: its holder, its
//! expiry and the fencing token of the current acquisition (`lease_token`), which release,
//! extension and fenced writes compare in the same statement that acts.

#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(feature = "sqlite")]
pub(crate) mod sqlite;

use std::time::Duration;

use sqlx::{ColumnIndex, Decode, Row, Type};
use time::OffsetDateTime;

use super::{LinkState, Record, RecordMeta, ScannedLink, StoreError, StoredRecord, Version};
use crate::ids::{ProviderId, Realm, Subject, TokenKey};
use crate::token::Payload;

/// Which old links the SQL stores' `purge` deletes (`SqliteStore::purge`,
/// `PostgresStore::purge`).
///
/// Both limits are judged by the database's clock, and a link whose refresh lease is still held
/// is never purged (a refresh is writing it right now). `None` turns a rule off; the default
/// turns both off.
///
/// ```
/// use std::time::Duration;
/// use tokenbroker::store::RetentionPolicy;
///
/// let policy = RetentionPolicy::default()
///     .with_unused_for(Duration::from_secs(400 * 24 * 3600))
///     .with_relink_required_for(Duration::from_secs(30 * 24 * 3600));
/// assert!(policy.unused_for.is_some());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionPolicy {
    /// Delete links whose record was last written longer ago than this (`updated_at`).
    pub unused_for: Option<Duration>,
    /// Delete links that have needed a re-link for longer than this (`relink_since`).
    pub relink_required_for: Option<Duration>,
}

impl RetentionPolicy {
    /// Sets [`unused_for`](Self::unused_for).
    pub fn with_unused_for(mut self, age: Duration) -> Self {
        self.unused_for = Some(age);
        self
    }

    /// Sets [`relink_required_for`](Self::relink_required_for).
    pub fn with_relink_required_for(mut self, age: Duration) -> Self {
        self.relink_required_for = Some(age);
        self
    }
}

/// What a purge deleted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PurgeReport {
    /// Links deleted because they were not written for [`RetentionPolicy::unused_for`].
    pub unused: u64,
    /// Links deleted because they needed a re-link for [`RetentionPolicy::relink_required_for`].
    pub relink_required: u64,
}

impl PurgeReport {
    /// All links deleted.
    pub fn total(&self) -> u64 {
        self.unused + self.relink_required
    }
}

/// One embedded schema migration. Versions are applied in ascending order, each once, each in
/// its own transaction together with its row in `tokenbroker_schema_migrations`.
#[derive(Debug)]
pub(crate) struct Migration {
    pub(crate) version: i32,
    pub(crate) sql: &'static str,
}

/// The upper bound for any duration sent to the database, in milliseconds (about 100 years).
/// Clamping keeps `now + ttl` and `now - age` inside `BIGINT` on both engines: PostgreSQL
/// raises on overflow and SQLite silently turns the result into a float.
const MAX_MS: i64 = 100 * 366 * 24 * 3600 * 1000;

/// A duration in whole milliseconds, rounded up so that a short but non-zero TTL never becomes
/// an already-expired lease, and clamped to [`MAX_MS`].
pub(crate) fn duration_ms(d: Duration) -> i64 {
    let ms = d.as_nanos().div_ceil(1_000_000);
    i64::try_from(ms).map_or(MAX_MS, |ms| ms.min(MAX_MS))
}

/// An instant as unix milliseconds (sub-millisecond precision is dropped, rounding down).
pub(crate) fn to_ms(t: OffsetDateTime) -> i64 {
    // Every `OffsetDateTime` (years ±9999) fits in i64 milliseconds.
    (t.unix_timestamp_nanos().div_euclid(1_000_000)) as i64
}

/// Unix milliseconds as an instant, or a description of why they are out of range.
pub(crate) fn from_ms(ms: i64, column: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|_| format!("column {column} holds an out-of-range time ({ms})"))
}

/// The plain columns of a record, ready to bind.
pub(crate) struct Columns<'a> {
    pub(crate) state: &'static str,
    pub(crate) relink_reason: Option<&'a str>,
    pub(crate) relink_since: Option<i64>,
    pub(crate) expires_at: Option<i64>,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
}

impl<'a> Columns<'a> {
    pub(crate) fn of(meta: &'a RecordMeta) -> Self {
        let (relink_reason, relink_since) = match &meta.state {
            LinkState::Active => (None, None),
            LinkState::RelinkRequired { reason, since } => {
                (Some(reason.as_str()), Some(to_ms(*since)))
            }
        };
        Columns {
            state: meta.state.name(),
            relink_reason,
            relink_since,
            expires_at: meta.expires_at.map(to_ms),
            created_at: to_ms(meta.created_at),
            updated_at: to_ms(meta.updated_at),
        }
    }
}

/// The columns every read selects, in this order (the payload is selected separately, only
/// where it is needed).
macro_rules! link_columns {
    () => {
        "realm, subject, provider, version, state, relink_reason, relink_since, expires_at, \
         created_at, updated_at"
    };
}
pub(crate) use link_columns;

/// The key of `tokenbroker_links`, for `WHERE` clauses: `$1`, `$2`, `$3`.
macro_rules! key_where {
    () => {
        "realm = $1 AND subject = $2 AND provider = $3"
    };
}
pub(crate) use key_where;

/// The condition "the key's lease may be taken": nobody holds it (never taken, or released),
/// or it expired by the database's clock `$now` (each store's `db_now_ms!()`). Purges use it
/// too, so a row is purged exactly when a refresh could take its lease.
///
/// It looks at the holder, not at `lease_token`: a lease taken by an instance of a version
/// before fencing (migration 2) has a holder and no token, and must still keep others out until
/// it expires.
macro_rules! lease_is_free {
    ($now:expr) => {
        concat!("(lease_holder IS NULL OR lease_expires_at <= ", $now, ")")
    };
}
pub(crate) use lease_is_free;

/// The fence of a compare-and-swap, for `WHERE` clauses: true when the bound fence `$p` is
/// `NULL` (an unfenced write), or is the key's current lease token. Expiry is not looked at:
/// a lease that ran out but was not taken over is still current (see the trait's contract).
macro_rules! fence_holds {
    ($p:literal) => {
        concat!("(", $p, " IS NULL OR lease_token = ", $p, ")")
    };
}
pub(crate) use fence_holds;

/// Releases the lease whose token is bound as `$4`, and only that one: a stale token (the
/// lease was taken again since) matches no row. Clearing the holder too is what frees the
/// lease for `lease_is_free!`.
pub(crate) const RELEASE_LEASE: &str = concat!(
    "UPDATE tokenbroker_links SET lease_holder = NULL, lease_token = NULL, \
     lease_expires_at = NULL WHERE ",
    key_where!(),
    " AND lease_token = $4"
);

/// Extends the lease whose token is bound as `$4` to `$5` milliseconds after the database's
/// clock `$now`, returning the new expiry; a stale token matches no row.
macro_rules! extend_lease_sql {
    ($now:expr) => {
        concat!(
            "UPDATE tokenbroker_links SET lease_expires_at = ",
            $now,
            " + $5 WHERE ",
            $crate::store::sql::key_where!(),
            " AND lease_token = $4 RETURNING lease_expires_at"
        )
    };
}
pub(crate) use extend_lease_sql;

/// Migration 2 (both engines): the fencing token of the current lease acquisition.
///
/// Existing rows get `NULL`. A lease taken before the upgrade keeps its holder and expiry, so
/// it still keeps new holders out until it expires; no token matches it, which is right, since
/// its holder (an instance of the earlier version) never fences. Instances of the earlier
/// version keep working on the new table, as they never name the column, but a lease they take
/// leaves the previous token in place: fencing holds once every instance runs this version.
pub(crate) const ADD_LEASE_TOKEN: &str =
    "ALTER TABLE tokenbroker_links ADD COLUMN lease_token TEXT NULL;";

/// One row as the database returned it, before validation.
pub(crate) struct RawLink {
    realm: String,
    subject: String,
    provider: String,
    version: i64,
    state: String,
    relink_reason: Option<String>,
    relink_since: Option<i64>,
    expires_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl RawLink {
    /// Reads the [`link_columns!`] of a row, on either driver.
    pub(crate) fn from_row<'r, R>(row: &'r R) -> Result<Self, sqlx::Error>
    where
        R: Row,
        &'static str: ColumnIndex<R>,
        String: Decode<'r, R::Database> + Type<R::Database>,
        i64: Decode<'r, R::Database> + Type<R::Database>,
    {
        Ok(RawLink {
            realm: row.try_get("realm")?,
            subject: row.try_get("subject")?,
            provider: row.try_get("provider")?,
            version: row.try_get("version")?,
            state: row.try_get("state")?,
            relink_reason: row.try_get("relink_reason")?,
            relink_since: row.try_get("relink_since")?,
            expires_at: row.try_get("expires_at")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }

    /// Validates the row into a scanned link; anything that does not map back is
    /// [`StoreError::Corrupt`].
    pub(crate) fn into_scanned(self) -> Result<ScannedLink, StoreError> {
        let key = parse_key(&self.realm, &self.subject, &self.provider)?;
        let version = version_from_db(self.version).map_err(|reason| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: None,
        })?;
        // From here on the row's version is known: a caller can replace or delete the row by it.
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: Some(version),
        };
        let state = match (self.state.as_str(), self.relink_reason, self.relink_since) {
            ("active", _, _) => LinkState::Active,
            ("relink_required", Some(reason), Some(since)) => LinkState::RelinkRequired {
                reason,
                since: from_ms(since, "relink_since").map_err(corrupt)?,
            },
            ("relink_required", _, _) => {
                return Err(corrupt(
                    "state relink_required without relink_reason and relink_since".into(),
                ));
            }
            (other, _, _) => {
                // State names are ours, not secrets; cut them anyway so a garbage column
                // cannot flood a log line.
                let shown: String = other.chars().take(32).collect();
                return Err(corrupt(format!("unknown state {shown:?}")));
            }
        };
        let expires_at = self
            .expires_at
            .map(|ms| from_ms(ms, "expires_at"))
            .transpose()
            .map_err(corrupt)?;
        let created_at = from_ms(self.created_at, "created_at").map_err(corrupt)?;
        let updated_at = from_ms(self.updated_at, "updated_at").map_err(corrupt)?;
        Ok(ScannedLink::new(
            key,
            RecordMeta::new(state, expires_at, created_at, updated_at),
            version,
        ))
    }

    /// Validates the row and attaches its payload.
    pub(crate) fn into_stored(self, payload: Vec<u8>) -> Result<StoredRecord, StoreError> {
        let link = self.into_scanned()?;
        Ok(StoredRecord::new(
            Record::new(Payload::new(payload), link.meta),
            link.version,
        ))
    }
}

/// A version column as a [`Version`]. Both engines' counters start at 1, so a value below 1
/// was not written by us.
pub(crate) fn version_from_db(v: i64) -> Result<Version, String> {
    match u64::try_from(v) {
        Ok(n) if n > 0 => Ok(Version::new(n)),
        _ => Err(format!("column version holds {v}")),
    }
}

/// A version to bind: versions we hand out come from a `BIGINT` counter, so any larger value
/// cannot match a row and is mapped to -1, which no row has.
pub(crate) fn version_to_db(v: Version) -> i64 {
    i64::try_from(v.get()).unwrap_or(-1)
}

/// Parses the key columns of a row. A part that is not a valid identifier makes the row
/// [`StoreError::Corrupt`]; since the error must name a key, the invalid parts are replaced by
/// the marker `(invalid)`/`invalid`, and the reason says which part was wrong and why
/// (identifiers are not secrets, and [`InvalidId`](crate::InvalidId) cuts them to 64 characters).
pub(crate) fn parse_key(
    realm: &str,
    subject: &str,
    provider: &str,
) -> Result<TokenKey, StoreError> {
    match TokenKey::parse(realm, subject, provider) {
        Ok(key) => Ok(key),
        Err(e) => {
            let marker = "(invalid)";
            let key = TokenKey::new(
                Realm::new(realm).unwrap_or_else(|_| Realm::new(marker).expect("valid realm")),
                Subject::new(subject)
                    .unwrap_or_else(|_| Subject::new(marker).expect("valid subject")),
                ProviderId::new(provider)
                    .unwrap_or_else(|_| ProviderId::new("invalid").expect("valid provider")),
            );
            Err(StoreError::Corrupt {
                key,
                reason: format!("stored key does not parse: {e}"),
                version: None,
            })
        }
    }
}
