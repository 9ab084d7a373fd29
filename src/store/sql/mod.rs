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

/// Binds a key's columns as `$1`, `$2`, `$3`, the order of [`key_where!`].
macro_rules! bind_key {
    ($query:expr, $key:expr) => {
        $query
            .bind($key.realm.as_str())
            .bind($key.subject.as_str())
            .bind($key.provider.as_str())
    };
}
pub(crate) use bind_key;

/// The one SQL code path of both stores: migrations, purge, load, list, scan, insert,
/// compare-and-swap, delete and the fenced lease, written once. Expanded inside each store's
/// inherent `impl`, where `self.pool`, `backend`, `STORE` and `MIGRATIONS` are that store's, and
/// so are the few things a dialect does its own way:
///
/// - `db_now_ms!()`: the database's clock in unix milliseconds, which judges every lease;
/// - `next_version!()`: the expression that gives a write its version, and
///   `self.versioned_write(query)`, which runs such a write (PostgreSQL: one statement drawing
///   from a sequence; SQLite: the counter bumped in the same `BEGIN IMMEDIATE` transaction);
/// - `with_presence!(statement)` and `self.run_with_presence(query, key)`: a statement on one
///   key together with whether the key's row was there, judged at the same moment (PostgreSQL:
///   one statement; SQLite: one `BEGIN IMMEDIATE` transaction);
/// - `self.begin_migration()`: a migration's transaction, under the dialect's lock.
macro_rules! shared_link_queries {
    () => {
        /// Applies the embedded migrations the database does not have yet, each in its own
        /// transaction. Idempotent, and safe when several processes start at once: each
        /// migration runs under the database's lock (SQLite's write lock, a PostgreSQL
        /// advisory lock), taken before the applied versions are read.
        ///
        /// A database made by an earlier version is upgraded in place, its links and leases
        /// kept. Instances of the earlier version keep working on it during a rolling upgrade,
        /// but their leases carry no fencing token: fencing holds once every instance runs this
        /// version.
        pub async fn migrate(&self) -> Result<(), StoreError> {
            for migration in MIGRATIONS {
                let mut tx = self.begin_migration().await?;
                sqlx::query(
                    "CREATE TABLE IF NOT EXISTS tokenbroker_schema_migrations \
                     (version INT PRIMARY KEY, applied_at BIGINT NOT NULL)",
                )
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
                let applied: Option<i32> = sqlx::query_scalar(
                    "SELECT version FROM tokenbroker_schema_migrations WHERE version = $1",
                )
                .bind(migration.version)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
                if applied.is_some() {
                    // Ended here, not on drop: a dropped transaction is rolled back only when
                    // its connection is next used, and until then it keeps the lock that the
                    // next migration's transaction, on another connection of the same pool,
                    // would wait for.
                    tx.rollback().await.map_err(backend)?;
                    continue;
                }
                sqlx::raw_sql(migration.sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
                sqlx::query(concat!(
                    "INSERT INTO tokenbroker_schema_migrations (version, applied_at) VALUES ($1, ",
                    db_now_ms!(),
                    ")"
                ))
                .bind(migration.version)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
                tx.commit().await.map_err(backend)?;
                tracing::info!(
                    store = STORE,
                    version = migration.version,
                    "applied schema migration"
                );
            }
            Ok(())
        }

        /// Deletes old links as `policy` says, one statement per rule, by the database's
        /// clock; links with an unexpired lease are kept.
        pub async fn purge(
            &self,
            policy: &super::RetentionPolicy,
        ) -> Result<super::PurgeReport, StoreError> {
            let mut report = super::PurgeReport::default();
            if let Some(age) = policy.unused_for {
                report.unused = self
                    .purge_older_than(
                        concat!(
                            "DELETE FROM tokenbroker_links WHERE updated_at < ",
                            db_now_ms!(),
                            " - $1 AND ",
                            super::lease_is_free!(db_now_ms!())
                        ),
                        age,
                    )
                    .await?;
            }
            if let Some(age) = policy.relink_required_for {
                report.relink_required = self
                    .purge_older_than(
                        concat!(
                            "DELETE FROM tokenbroker_links WHERE state = 'relink_required' \
                             AND relink_since < ",
                            db_now_ms!(),
                            " - $1 AND ",
                            super::lease_is_free!(db_now_ms!())
                        ),
                        age,
                    )
                    .await?;
            }
            Ok(report)
        }

        /// Runs one retention rule, a `DELETE` of the rows older than `$1` milliseconds.
        async fn purge_older_than(
            &self,
            statement: &'static str,
            age: std::time::Duration,
        ) -> Result<u64, StoreError> {
            let deleted = sqlx::query(statement)
                .bind(super::duration_ms(age))
                .execute(&self.pool)
                .await
                .map_err(backend)?;
            Ok(deleted.rows_affected())
        }

        async fn load_link(
            &self,
            key: &crate::ids::TokenKey,
        ) -> Result<Option<crate::store::StoredRecord>, StoreError> {
            use sqlx::Row as _;
            let query = sqlx::query(concat!(
                "SELECT ",
                super::link_columns!(),
                ", payload FROM tokenbroker_links WHERE ",
                super::key_where!()
            ));
            let row = super::bind_key!(query, key)
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
            let Some(row) = row else { return Ok(None) };
            let payload: Vec<u8> = row.try_get("payload").map_err(backend)?;
            super::RawLink::from_row(&row)
                .map_err(backend)?
                .into_stored(payload)
                .map(Some)
        }

        async fn list_links(
            &self,
            realm: &crate::ids::Realm,
            subject: &crate::ids::Subject,
        ) -> Result<Vec<crate::ids::TokenKey>, StoreError> {
            let providers: Vec<String> = sqlx::query_scalar(
                "SELECT provider FROM tokenbroker_links WHERE realm = $1 AND subject = $2 \
                 ORDER BY provider",
            )
            .bind(realm.as_str())
            .bind(subject.as_str())
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
            providers
                .iter()
                .map(|p| super::parse_key(realm.as_str(), subject.as_str(), p))
                .collect()
        }

        /// A page of a walk in primary-key order; one row more than asked for tells whether the
        /// walk goes on.
        async fn scan_links(
            &self,
            cursor: Option<&crate::store::ScanCursor>,
            limit: usize,
        ) -> Result<crate::store::ScanPage, StoreError> {
            let after = cursor.map(crate::store::ScanCursor::key).transpose()?;
            let wanted = limit.max(1);
            let fetch = i64::try_from(wanted.saturating_add(1)).unwrap_or(i64::MAX);
            let rows = match &after {
                None => {
                    sqlx::query(concat!(
                        "SELECT ",
                        super::link_columns!(),
                        " FROM tokenbroker_links ORDER BY realm, subject, provider LIMIT $1"
                    ))
                    .bind(fetch)
                    .fetch_all(&self.pool)
                    .await
                }
                Some(after) => {
                    // Bytewise order in both (SQLite's BINARY collation, the "C" collation of
                    // the PostgreSQL columns, which wins over the parameters' default one), so
                    // the row-value comparison walks the primary key.
                    let query = sqlx::query(concat!(
                        "SELECT ",
                        super::link_columns!(),
                        " FROM tokenbroker_links WHERE (realm, subject, provider) > ($1, $2, $3) \
                         ORDER BY realm, subject, provider LIMIT $4"
                    ));
                    super::bind_key!(query, after)
                        .bind(fetch)
                        .fetch_all(&self.pool)
                        .await
                }
            }
            .map_err(backend)?;
            let links = rows
                .iter()
                .map(|row| {
                    super::RawLink::from_row(row)
                        .map_err(backend)?
                        .into_scanned()
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(crate::store::ScanPage::from_ordered(links, wanted))
        }

        async fn insert_link(
            &self,
            key: &crate::ids::TokenKey,
            record: &crate::store::Record,
        ) -> Result<crate::store::Version, StoreError> {
            let query = sqlx::query_scalar(concat!(
                "INSERT INTO tokenbroker_links (realm, subject, provider, version, payload, \
                 state, relink_reason, relink_since, expires_at, created_at, updated_at) \
                 VALUES ($1, $2, $3, ",
                next_version!(),
                ", $4, $5, $6, $7, $8, $9, $10) \
                 ON CONFLICT (realm, subject, provider) DO NOTHING RETURNING version"
            ));
            let query = super::bind_key!(query, key).bind(record.payload.expose_secret());
            let query = super::bind_columns!(query, super::Columns::of(&record.meta));
            super::written_version(key, self.versioned_write(query).await?)
        }

        async fn swap_link(
            &self,
            key: &crate::ids::TokenKey,
            expected: crate::store::Version,
            record: &crate::store::Record,
            fence: Option<&crate::store::LeaseToken>,
        ) -> Result<crate::store::Version, StoreError> {
            // The lease columns are left alone: a write does not need the lease, and must not
            // free or steal one a refresh is holding. The fence is checked in the same
            // statement, so a concurrent try_lease that changes the token either comes first
            // (and this write matches no row) or after.
            let query = sqlx::query_scalar(concat!(
                "UPDATE tokenbroker_links SET version = ",
                next_version!(),
                ", payload = $5, state = $6, relink_reason = $7, relink_since = $8, \
                 expires_at = $9, created_at = $10, updated_at = $11 WHERE ",
                super::key_where!(),
                " AND version = $4 AND ",
                super::fence_holds!("$12"),
                " RETURNING version"
            ));
            let query = super::bind_key!(query, key)
                .bind(super::version_to_db(&expected))
                .bind(record.payload.expose_secret());
            let query = super::bind_columns!(query, super::Columns::of(&record.meta))
                .bind(fence.map(crate::store::LeaseToken::as_str));
            super::written_version(key, self.versioned_write(query).await?)
        }

        async fn delete_link(
            &self,
            key: &crate::ids::TokenKey,
            expected: Option<crate::store::Version>,
        ) -> Result<bool, StoreError> {
            let Some(expected) = expected else {
                let query = sqlx::query(concat!(
                    "DELETE FROM tokenbroker_links WHERE ",
                    super::key_where!()
                ));
                let deleted = super::bind_key!(query, key)
                    .execute(&self.pool)
                    .await
                    .map_err(backend)?;
                return Ok(deleted.rows_affected() > 0);
            };
            let query = sqlx::query(with_presence!(concat!(
                "DELETE FROM tokenbroker_links WHERE ",
                super::key_where!(),
                " AND version = $4 RETURNING version"
            )));
            let query = super::bind_key!(query, key).bind(super::version_to_db(&expected));
            match self.run_with_presence(query, key).await? {
                (Some(_), _) => Ok(true),
                (None, true) => Err(StoreError::Conflict { key: key.clone() }),
                (None, false) => Ok(false),
            }
        }

        async fn try_lease_link(
            &self,
            key: &crate::ids::TokenKey,
            holder: &crate::store::LeaseHolder,
            ttl: std::time::Duration,
        ) -> Result<crate::store::LeaseAttempt, StoreError> {
            let token = crate::store::LeaseToken::random();
            let query = sqlx::query(with_presence!(concat!(
                "UPDATE tokenbroker_links SET lease_holder = $4, lease_token = $6, \
                 lease_expires_at = ",
                db_now_ms!(),
                " + $5 WHERE ",
                super::key_where!(),
                " AND ",
                super::lease_is_free!(db_now_ms!()),
                " RETURNING lease_expires_at"
            )));
            let query = super::bind_key!(query, key)
                .bind(holder.as_str())
                .bind(super::duration_ms(ttl))
                .bind(token.as_str());
            Ok(match self.run_with_presence(query, key).await? {
                (Some(until), _) => super::acquired(key, holder, token, until)?,
                (None, true) => crate::store::LeaseAttempt::Busy,
                (None, false) => crate::store::LeaseAttempt::Missing,
            })
        }

        /// Releases the lease whose token is bound as `$4`, and only that one: a stale token
        /// (the lease was taken again since) matches no row. Clearing the holder too is what
        /// frees the lease for `lease_is_free!`.
        async fn release_link_lease(&self, lease: &crate::store::Lease) -> Result<(), StoreError> {
            let query = sqlx::query(concat!(
                "UPDATE tokenbroker_links SET lease_holder = NULL, lease_token = NULL, \
                 lease_expires_at = NULL WHERE ",
                super::key_where!(),
                " AND lease_token = $4"
            ));
            super::bind_key!(query, lease.key)
                .bind(lease.token.as_str())
                .execute(&self.pool)
                .await
                .map_err(backend)?;
            Ok(())
        }

        /// Extends the lease whose token is bound as `$4` to `$5` milliseconds after the
        /// database's clock; a stale token matches no row.
        async fn extend_link_lease(
            &self,
            lease: &crate::store::Lease,
            ttl: std::time::Duration,
        ) -> Result<Option<crate::store::Lease>, StoreError> {
            let query = sqlx::query_scalar(concat!(
                "UPDATE tokenbroker_links SET lease_expires_at = ",
                db_now_ms!(),
                " + $5 WHERE ",
                super::key_where!(),
                " AND lease_token = $4 RETURNING lease_expires_at"
            ));
            let until: Option<i64> = super::bind_key!(query, lease.key)
                .bind(lease.token.as_str())
                .bind(super::duration_ms(ttl))
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
            let Some(until) = until else { return Ok(None) };
            let mut extended = lease.clone();
            extended.expires_at =
                super::from_ms(until, "lease_expires_at").map_err(super::corrupt(&lease.key))?;
            Ok(Some(extended))
        }
    };
}
pub(crate) use shared_link_queries;

/// The revocation outbox, `tokenbroker_revocations` (migration 3), the same on both engines
/// but for the claim's row lock (`claim_lock!`: PostgreSQL skips rows another claim holds;
/// SQLite has one writer, so it needs none) and how a write transaction starts
/// (`begin_write_tx`).
macro_rules! shared_outbox_queries {
    () => {
        async fn delete_link_and_enqueue(
            &self,
            key: &crate::ids::TokenKey,
            expected: Option<crate::store::Version>,
            revocation: &crate::store::PendingRevocation,
        ) -> Result<bool, StoreError> {
            // One transaction: the entry exists exactly when the link was deleted.
            let mut tx = self.begin_write_tx().await?;
            let query = sqlx::query(concat!(
                "DELETE FROM tokenbroker_links WHERE ",
                super::key_where!(),
                " AND ($4 IS NULL OR version = $4)"
            ));
            let deleted = super::bind_key!(query, key)
                .bind(expected.as_ref().map(super::version_to_db))
                .execute(&mut *tx)
                .await
                .map_err(backend)?
                .rows_affected();
            if deleted == 0 {
                let query = sqlx::query_scalar(concat!(
                    "SELECT version FROM tokenbroker_links WHERE ",
                    super::key_where!()
                ));
                let present: Option<i64> = super::bind_key!(query, key)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(backend)?;
                tx.rollback().await.map_err(backend)?;
                return match present {
                    Some(_) => Err(StoreError::Conflict { key: key.clone() }),
                    None => Ok(false),
                };
            }
            Self::insert_revocation(&mut *tx, revocation).await?;
            tx.commit().await.map_err(backend)?;
            Ok(true)
        }

        async fn insert_revocation(
            conn: &mut <Self as super::Dialect>::Connection,
            revocation: &crate::store::PendingRevocation,
        ) -> Result<(), StoreError> {
            let query = sqlx::query(
                "INSERT INTO tokenbroker_revocations (id, realm, subject, provider, payload, \
                 attempts, due_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (id) DO UPDATE SET payload = excluded.payload, \
                 attempts = excluded.attempts, due_at = excluded.due_at",
            );
            super::bind_key!(query.bind(revocation.id.as_str()), revocation.key)
                .bind(revocation.payload.expose_secret())
                .bind(i64::from(revocation.attempts))
                .bind(super::to_ms(revocation.due_at))
                .bind(super::to_ms(revocation.created_at))
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
            Ok(())
        }

        async fn enqueue_link_revocation(
            &self,
            revocation: &crate::store::PendingRevocation,
        ) -> Result<(), StoreError> {
            let mut conn = self.pool.acquire().await.map_err(backend)?;
            Self::insert_revocation(&mut *conn, revocation).await
        }

        async fn claim_link_revocations(
            &self,
            now: time::OffsetDateTime,
            until: time::OffsetDateTime,
            limit: usize,
        ) -> Result<Vec<crate::store::PendingRevocation>, StoreError> {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let rows = sqlx::query(concat!(
                "UPDATE tokenbroker_revocations SET attempts = attempts + 1, due_at = $2 \
                 WHERE id IN (SELECT id FROM tokenbroker_revocations WHERE due_at <= $1 \
                 ORDER BY due_at LIMIT $3",
                claim_lock!(),
                ") RETURNING id, realm, subject, provider, payload, attempts, due_at, created_at"
            ))
            .bind(super::to_ms(now))
            .bind(super::to_ms(until))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
            rows.iter().map(super::revocation_from_row).collect()
        }

        async fn reschedule_link_revocation(
            &self,
            claimed: &crate::store::PendingRevocation,
            due_at: time::OffsetDateTime,
        ) -> Result<bool, StoreError> {
            let updated = sqlx::query(
                "UPDATE tokenbroker_revocations SET due_at = $1 WHERE id = $2 AND attempts = $3",
            )
            .bind(super::to_ms(due_at))
            .bind(claimed.id.as_str())
            .bind(i64::from(claimed.attempts))
            .execute(&self.pool)
            .await
            .map_err(backend)?
            .rows_affected();
            Ok(updated > 0)
        }

        async fn remove_link_revocation(
            &self,
            id: &crate::store::RevocationId,
        ) -> Result<(), StoreError> {
            sqlx::query("DELETE FROM tokenbroker_revocations WHERE id = $1")
                .bind(id.as_str())
                .execute(&self.pool)
                .await
                .map_err(backend)?;
            Ok(())
        }
    };
}
pub(crate) use shared_outbox_queries;

/// What the shared query macros need to name of a dialect.
pub(crate) trait Dialect {
    /// A connection of the dialect's driver.
    type Connection;
}

/// Reads an outbox row on either driver.
pub(crate) fn revocation_from_row<'r, R>(
    row: &'r R,
) -> Result<crate::store::PendingRevocation, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let field = |e: sqlx::Error| StoreError::Backend {
        store: "sql",
        source: std::sync::Arc::new(e),
    };
    let id: String = row.try_get("id").map_err(field)?;
    let realm: String = row.try_get("realm").map_err(field)?;
    let subject: String = row.try_get("subject").map_err(field)?;
    let provider: String = row.try_get("provider").map_err(field)?;
    let key = parse_key(&realm, &subject, &provider)?;
    let corrupt = |reason: String| StoreError::Corrupt {
        key: key.clone(),
        reason: format!("revocation {id}: {reason}"),
        version: None,
    };
    let payload: Vec<u8> = row.try_get("payload").map_err(field)?;
    let attempts: i64 = row.try_get("attempts").map_err(field)?;
    let due_at: i64 = row.try_get("due_at").map_err(field)?;
    let created_at: i64 = row.try_get("created_at").map_err(field)?;
    Ok(crate::store::PendingRevocation::from_parts(
        crate::store::RevocationId::new(id.clone()),
        key.clone(),
        Payload::new(payload),
        u32::try_from(attempts).map_err(|_| corrupt(format!("attempts is {attempts}")))?,
        from_ms(due_at, "due_at").map_err(corrupt)?,
        from_ms(created_at, "created_at").map_err(corrupt)?,
    ))
}

/// Implements [`TokenStore`](crate::store::TokenStore) for a SQL store over its inherent
/// methods, those of `shared_link_queries!` and `shared_outbox_queries!`.
macro_rules! sql_token_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl crate::store::TokenStore for $store {
            async fn load(
                &self,
                key: &crate::ids::TokenKey,
            ) -> Result<Option<crate::store::StoredRecord>, StoreError> {
                self.load_link(key).await
            }

            async fn insert(
                &self,
                key: &crate::ids::TokenKey,
                record: &crate::store::Record,
            ) -> Result<crate::store::Version, StoreError> {
                self.insert_link(key, record).await
            }

            async fn compare_and_swap(
                &self,
                key: &crate::ids::TokenKey,
                expected: crate::store::Version,
                record: &crate::store::Record,
                fence: Option<&crate::store::LeaseToken>,
            ) -> Result<crate::store::Version, StoreError> {
                self.swap_link(key, expected, record, fence).await
            }

            async fn delete(
                &self,
                key: &crate::ids::TokenKey,
                expected: Option<crate::store::Version>,
            ) -> Result<bool, StoreError> {
                self.delete_link(key, expected).await
            }

            async fn list(
                &self,
                realm: &crate::ids::Realm,
                subject: &crate::ids::Subject,
            ) -> Result<Vec<crate::ids::TokenKey>, StoreError> {
                self.list_links(realm, subject).await
            }

            async fn scan(
                &self,
                cursor: Option<&crate::store::ScanCursor>,
                limit: usize,
            ) -> Result<crate::store::ScanPage, StoreError> {
                self.scan_links(cursor, limit).await
            }

            async fn try_lease(
                &self,
                key: &crate::ids::TokenKey,
                holder: &crate::store::LeaseHolder,
                ttl: std::time::Duration,
            ) -> Result<crate::store::LeaseAttempt, StoreError> {
                self.try_lease_link(key, holder, ttl).await
            }

            async fn release_lease(&self, lease: &crate::store::Lease) -> Result<(), StoreError> {
                self.release_link_lease(lease).await
            }

            async fn extend_lease(
                &self,
                lease: &crate::store::Lease,
                ttl: std::time::Duration,
            ) -> Result<Option<crate::store::Lease>, StoreError> {
                self.extend_link_lease(lease, ttl).await
            }

            async fn delete_and_enqueue_revocation(
                &self,
                key: &crate::ids::TokenKey,
                expected: Option<crate::store::Version>,
                revocation: &crate::store::PendingRevocation,
            ) -> Result<bool, StoreError> {
                self.delete_link_and_enqueue(key, expected, revocation)
                    .await
            }

            async fn enqueue_revocation(
                &self,
                revocation: &crate::store::PendingRevocation,
            ) -> Result<(), StoreError> {
                self.enqueue_link_revocation(revocation).await
            }

            async fn claim_revocations(
                &self,
                now: time::OffsetDateTime,
                until: time::OffsetDateTime,
                limit: usize,
            ) -> Result<Vec<crate::store::PendingRevocation>, StoreError> {
                self.claim_link_revocations(now, until, limit).await
            }

            async fn reschedule_revocation(
                &self,
                claimed: &crate::store::PendingRevocation,
                due_at: time::OffsetDateTime,
            ) -> Result<bool, StoreError> {
                self.reschedule_link_revocation(claimed, due_at).await
            }

            async fn remove_revocation(
                &self,
                id: &crate::store::RevocationId,
            ) -> Result<(), StoreError> {
                self.remove_link_revocation(id).await
            }
        }
    };
}
pub(crate) use sql_token_store;

/// Migration 2 (both engines): the fencing token of the current lease acquisition.
///
/// Existing rows get `NULL`. A lease taken before the upgrade keeps its holder and expiry, so
/// it still keeps new holders out until it expires; no token matches it, which is right, since
/// its holder (an instance of the earlier version) never fences. Instances of the earlier
/// version keep working on the new table, as they never name the column, but a lease they take
/// leaves the previous token in place: fencing holds once every instance runs this version.
pub(crate) const ADD_LEASE_TOKEN: &str =
    "ALTER TABLE tokenbroker_links ADD COLUMN lease_token TEXT NULL;";

/// Migration 1's `tokenbroker_links` and its indexes, in the dialect's words: `$key_text`, the
/// type of the key columns, must compare bytewise (the order of Rust's `str`, which `scan`
/// relies on: SQLite's `TEXT` has the BINARY collation, PostgreSQL's needs `COLLATE "C"`,
/// since the database's default collation may be locale-aware); `$binary` is the payload's
/// type. The key's (realm, subject) prefix also serves `list`, so that needs no index of its
/// own. Sweeps use the others: retention by last write, refresh-ahead by expiry, purge of dead
/// links.
macro_rules! links_table {
    ($key_text:literal, $binary:literal) => {
        concat!(
            "
CREATE TABLE tokenbroker_links (
    realm            ",
            $key_text,
            " NOT NULL,
    subject          ",
            $key_text,
            " NOT NULL,
    provider         ",
            $key_text,
            " NOT NULL,
    version          BIGINT NOT NULL,
    payload          ",
            $binary,
            " NOT NULL,
    state            TEXT   NOT NULL,
    relink_reason    TEXT   NULL,
    relink_since     BIGINT NULL,
    expires_at       BIGINT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    lease_holder     TEXT   NULL,
    lease_expires_at BIGINT NULL,
    PRIMARY KEY (realm, subject, provider)
);
CREATE INDEX tokenbroker_links_updated_at ON tokenbroker_links (updated_at);
CREATE INDEX tokenbroker_links_expires_at ON tokenbroker_links (expires_at);
CREATE INDEX tokenbroker_links_relink_since ON tokenbroker_links (relink_since)
    WHERE state = 'relink_required';
"
        )
    };
}
pub(crate) use links_table;

/// A dialect's schema, in order: 1 (the links, and `$version_counter`, the dialect's counter of
/// versions: bumped by every write, never reset, so a key deleted and inserted again gets a
/// version it never had, the broker's guard against ABA), 2 (the lease token), 3 (the outbox),
/// then the dialect's own. Never edit a shipped migration: append a new one.
macro_rules! migrations {
    (key_text: $key_text:literal, binary: $binary:literal, version_counter: $counter:literal
     $(, $own:expr)* $(,)?) => {
        static MIGRATIONS: &[super::Migration] = &[
            super::Migration {
                version: 1,
                sql: concat!(super::links_table!($key_text, $binary), $counter),
            },
            super::Migration {
                version: 2,
                sql: super::ADD_LEASE_TOKEN,
            },
            super::Migration {
                version: 3,
                sql: super::revocation_outbox_table!($binary),
            },
            $($own,)*
        ];
    };
}
pub(crate) use migrations;

/// What a dialect file declares about itself: its name in errors, its pool and connection
/// types, the row lock of the outbox claim's inner `SELECT` (`claim_lock!`), and what the
/// docs of `from_pool` add for it. Gives the store the constructors and accessors that are
/// the same for both: `from_pool`, `pool`, and `migrated` (a new pool, its schema brought up to
/// date) for the dialect's own `open`/`connect`.
macro_rules! dialect {
    (store: $store:ident, name: $name:literal, pool: $pool:ty, connection: $connection:ty,
     claim_lock: $lock:literal $(, from_pool_doc: $doc:literal)? $(,)?) => {
        const STORE: &str = $name;

        macro_rules! claim_lock {
            () => {
                $lock
            };
        }

        impl super::Dialect for $store {
            type Connection = $connection;
        }

        fn backend(e: sqlx::Error) -> StoreError {
            StoreError::backend(STORE, e)
        }

        impl $store {
            /// Uses a pool the host configured. Nothing is checked or created: call
            /// [`migrate`](Self::migrate) before use.
            $(#[doc = $doc])?
            pub fn from_pool(pool: $pool) -> Self {
                $store { pool }
            }

            /// The pool, e.g. to share it with the host's own tables.
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            /// Wraps a pool this store made and brings the schema up to date.
            async fn migrated(pool: $pool) -> Result<Self, StoreError> {
                let store = Self::from_pool(pool);
                store.migrate().await?;
                Ok(store)
            }
        }
    };
}
pub(crate) use dialect;

/// Binds a record's plain columns (a [`Columns`]), in the order every write lists them:
/// state, relink_reason, relink_since, expires_at, created_at, updated_at.
macro_rules! bind_columns {
    ($query:expr, $c:expr) => {
        $query
            .bind($c.state)
            .bind($c.relink_reason)
            .bind($c.relink_since)
            .bind($c.expires_at)
            .bind($c.created_at)
            .bind($c.updated_at)
    };
}
pub(crate) use bind_columns;

/// The answer of a `try_lease` that took the lease until `until` (unix milliseconds, the
/// database's clock).
pub(crate) fn acquired(
    key: &TokenKey,
    holder: &crate::store::LeaseHolder,
    token: crate::store::LeaseToken,
    until: i64,
) -> Result<crate::store::LeaseAttempt, StoreError> {
    let expires_at = from_ms(until, "lease_expires_at").map_err(corrupt(key))?;
    Ok(crate::store::LeaseAttempt::Acquired(
        crate::store::Lease::new(key.clone(), holder.clone(), token, expires_at),
    ))
}

/// The answer of an insert or compare-and-swap that returned the row's new version, or
/// nothing (no row written: the key is present for an insert, or the version or fence did not
/// match for a compare-and-swap).
pub(crate) fn written_version(key: &TokenKey, written: Option<i64>) -> Result<Version, StoreError> {
    match written {
        Some(v) => version_from_db(v).map_err(corrupt(key)),
        None => Err(StoreError::Conflict { key: key.clone() }),
    }
}

/// Makes a reason why a value read back for `key` is invalid into [`StoreError::Corrupt`].
pub(crate) fn corrupt(key: &TokenKey) -> impl Fn(String) -> StoreError + '_ {
    move |reason| StoreError::Corrupt {
        key: key.clone(),
        reason,
        version: None,
    }
}

/// Migration 3 (both engines, `$payload` being the dialect's binary type): the revocation
/// outbox. Entries are not links, so `scan` and `list` never see them; `due_at` is indexed for
/// the claim.
macro_rules! revocation_outbox_table {
    ($payload:literal) => {
        concat!(
            "CREATE TABLE tokenbroker_revocations (
    id         TEXT   NOT NULL PRIMARY KEY,
    realm      TEXT   NOT NULL,
    subject    TEXT   NOT NULL,
    provider   TEXT   NOT NULL,
    payload    ",
            $payload,
            " NOT NULL,
    attempts   BIGINT NOT NULL,
    due_at     BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX tokenbroker_revocations_due_at ON tokenbroker_revocations (due_at);
"
        )
    };
}
pub(crate) use revocation_outbox_table;

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
        let version = version_from_db(self.version).map_err(corrupt(&key))?;
        // From here on the row's version is known: a caller can replace or delete the row by it.
        let corrupt = |reason: String| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: Some(version.clone()),
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
        Ok(n) if n > 0 => Ok(Version::from_number(n)),
        _ => Err(format!("column version holds {v}")),
    }
}

/// A version to bind: versions we hand out are numbers from a `BIGINT` counter, so any other
/// version (a larger number, a tag) cannot match a row and is mapped to -1, which no row has.
pub(crate) fn version_to_db(v: &Version) -> i64 {
    v.number().and_then(|n| i64::try_from(n).ok()).unwrap_or(-1)
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
