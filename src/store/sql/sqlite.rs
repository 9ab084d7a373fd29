//! [`SqliteStore`]: links in one SQLite file, shared by the processes that open it.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::{
    Columns, duration_ms, fence_holds, key_where, lease_is_free, version_from_db, version_to_db,
};
use crate::ids::TokenKey;
use crate::store::{LeaseAttempt, LeaseHolder, LeaseToken, Record, StoreError, Version};

super::dialect!(
    store: SqliteStore,
    name: "sqlite",
    connection: sqlx::SqliteConnection,
    claim_lock: "",
);

/// The database's clock in unix milliseconds. `unixepoch('subsec')` needs SQLite 3.42; the
/// bundled library is newer. SQLite keeps `'now'` fixed within one statement, so every use in
/// a statement sees the same instant.
macro_rules! db_now_ms {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

super::migrations!(
    key_text: "TEXT",
    binary: "BLOB",
    version_counter: "
CREATE TABLE tokenbroker_link_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n  BIGINT  NOT NULL
);
INSERT INTO tokenbroker_link_version (id, n) VALUES (1, 0);
",
);

/// A [`TokenStore`](crate::TokenStore) in a SQLite database file (feature `sqlite`).
///
/// Several processes may open the same file: versions, compare-and-swap and the refresh lease
/// all work across them, because every decision is one statement or one `BEGIN IMMEDIATE`
/// transaction in the database, and leases are judged by SQLite's clock, not the caller's. The
/// file is in WAL mode, so readers do not wait for the writer; writers queue for up to five
/// seconds (`busy_timeout`) before a write fails with [`StoreError::Backend`]. Each lease
/// acquisition stores a fresh fencing token; release, extension and fenced compare-and-swap
/// compare it in the same statement.
///
/// Times in [`RecordMeta`](crate::store::RecordMeta) are kept to the millisecond.
/// Tables are created by [`migrate`](SqliteStore::migrate), which [`open`](SqliteStore::open)
/// runs for you. Old links are removed with [`purge`](SqliteStore::purge).
///
/// ```no_run
/// # async fn run() -> Result<(), tokenbroker::StoreError> {
/// use std::sync::Arc;
/// use tokenbroker::{SqliteStore, TokenStore};
///
/// let store: Arc<dyn TokenStore> = Arc::new(SqliteStore::open("/var/lib/myapp/links.db").await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A file name carries no credentials; print it and nothing else of the options.
        f.debug_struct("SqliteStore")
            .field("file", &self.pool.connect_options().get_filename())
            .finish_non_exhaustive()
    }
}

/// How long [`SqliteStore::open`] keeps retrying a first connection that another process's
/// switch of a new file to WAL mode holds off; the same as the busy timeout.
const WAL_SWITCH_WAIT: Duration = Duration::from_secs(5);

/// Opens the pool, retrying while the file is locked by another process's switch to WAL.
///
/// Turning a new database file into WAL mode takes an exclusive lock that SQLite's busy
/// handler does not wait for, so when several processes create one file at once all but one
/// fail their first `PRAGMA journal_mode = WAL` with `SQLITE_BUSY` at once. Once the file is in
/// WAL mode the pragma needs no such lock, so a short retry is all it takes.
async fn connect_waiting_out_wal_switch(
    options: SqliteConnectOptions,
) -> Result<SqlitePool, StoreError> {
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        match SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
        {
            Ok(pool) => return Ok(pool),
            Err(e) if is_busy(&e) && started.elapsed() < WAL_SWITCH_WAIT => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(backend(e)),
        }
    }
}

/// `SQLITE_BUSY` or one of its extended codes (the primary code is the low byte).
fn is_busy(e: &sqlx::Error) -> bool {
    const SQLITE_BUSY: i64 = 5;
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|c| c.parse::<i64>().ok())
            .is_some_and(|c| c & 0xff == SQLITE_BUSY),
        _ => false,
    }
}

impl SqliteStore {
    super::shared_link_queries!();
    super::shared_outbox_queries!();

    /// Starts a transaction that writes.
    async fn begin_write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }

    /// Opens a migration's transaction under SQLite's write lock: `BEGIN IMMEDIATE` takes it
    /// now (waiting out the busy timeout), so two processes cannot both see a migration as
    /// missing.
    async fn begin_migration(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }

    /// Opens (creating it if needed) the database file at `path`, in WAL mode with
    /// `synchronous=NORMAL` and a 5 s busy timeout, and brings its schema up to date.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable against application crashes in WAL mode; a power loss may lose
            // the last commits, which the broker survives (it re-links or refreshes again).
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = connect_waiting_out_wal_switch(options).await?;
        let store = SqliteStore::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Uses a pool the host configured. Nothing is checked or created: call
    /// [`migrate`](Self::migrate) before use. The pool should have a busy timeout (sqlx's
    /// default is 5 s), or concurrent writers fail at once instead of queueing.
    pub fn from_pool(pool: SqlitePool) -> Self {
        SqliteStore { pool }
    }

    /// The pool, e.g. to share it with the host's own tables.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Starts a write: takes the write lock and draws the next version. Dropping the
    /// transaction without committing rolls both back.
    async fn begin_write(&self) -> Result<(Transaction<'static, Sqlite>, i64), StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let n: i64 = sqlx::query_scalar(
            "UPDATE tokenbroker_link_version SET n = n + 1 WHERE id = 1 RETURNING n",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        Ok((tx, n))
    }

    async fn exists(conn: &mut sqlx::SqliteConnection, key: &TokenKey) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar(concat!(
            "SELECT 1 FROM tokenbroker_links WHERE ",
            key_where!()
        ))
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .fetch_optional(conn)
        .await
        .map_err(backend)?;
        Ok(found.is_some())
    }
}

/// The statements this dialect does its own way. `sql_token_store!` implements
/// [`TokenStore`](crate::store::TokenStore) over them and the shared queries.
impl SqliteStore {
    async fn insert_link(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        let c = Columns::of(&record.meta);
        let (mut tx, version) = self.begin_write().await?;
        let query = sqlx::query(
            "INSERT INTO tokenbroker_links (realm, subject, provider, version, payload, state, \
             relink_reason, relink_since, expires_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (realm, subject, provider) DO NOTHING",
        )
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(version)
        .bind(record.payload.expose_secret());
        let inserted = super::bind_columns!(query, c)
            .execute(&mut *tx)
            .await
            .map_err(backend)?
            .rows_affected();
        if inserted == 0 {
            return Err(StoreError::Conflict { key: key.clone() });
        }
        tx.commit().await.map_err(backend)?;
        version_from_db(version).map_err(|reason| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: None,
        })
    }

    async fn swap_link(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let c = Columns::of(&record.meta);
        let (mut tx, version) = self.begin_write().await?;
        // The lease columns are left alone: a write does not need the lease, and must not free
        // or steal one a refresh is holding. The fence is checked in the same statement.
        let query = sqlx::query(concat!(
            "UPDATE tokenbroker_links SET version = $5, payload = $6, state = $7, \
             relink_reason = $8, relink_since = $9, expires_at = $10, created_at = $11, \
             updated_at = $12 WHERE ",
            key_where!(),
            " AND version = $4 AND ",
            fence_holds!("$13")
        ))
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(version_to_db(&expected))
        .bind(version)
        .bind(record.payload.expose_secret());
        let updated = super::bind_columns!(query, c)
            .bind(fence.map(LeaseToken::as_str))
            .execute(&mut *tx)
            .await
            .map_err(backend)?
            .rows_affected();
        if updated == 0 {
            return Err(StoreError::Conflict { key: key.clone() });
        }
        tx.commit().await.map_err(backend)?;
        version_from_db(version).map_err(|reason| StoreError::Corrupt {
            key: key.clone(),
            reason,
            version: None,
        })
    }

    async fn delete_link(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
    ) -> Result<bool, StoreError> {
        let Some(expected) = expected else {
            return self.delete_link_unconditionally(key).await;
        };
        // One transaction, so "not deleted" and "present" are judged on the same state.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let deleted = sqlx::query(concat!(
            "DELETE FROM tokenbroker_links WHERE ",
            key_where!(),
            " AND version = $4"
        ))
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(version_to_db(&expected))
        .execute(&mut *tx)
        .await
        .map_err(backend)?
        .rows_affected();
        if deleted > 0 {
            tx.commit().await.map_err(backend)?;
            return Ok(true);
        }
        let present = Self::exists(&mut tx, key).await?;
        tx.commit().await.map_err(backend)?;
        if present {
            Err(StoreError::Conflict { key: key.clone() })
        } else {
            Ok(false)
        }
    }

    async fn try_lease_link(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        // Under the write lock, so that "not taken" and "present" describe the same moment.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let token = LeaseToken::random();
        let taken: Option<i64> = sqlx::query_scalar(concat!(
            "UPDATE tokenbroker_links SET lease_holder = $4, lease_token = $6, \
             lease_expires_at = ",
            db_now_ms!(),
            " + $5 WHERE ",
            key_where!(),
            " AND ",
            lease_is_free!(db_now_ms!()),
            " RETURNING lease_expires_at"
        ))
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(holder.as_str())
        .bind(duration_ms(ttl))
        .bind(token.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        let attempt = match taken {
            Some(until) => super::acquired(key, holder, token, until)?,
            None if Self::exists(&mut tx, key).await? => LeaseAttempt::Busy,
            None => LeaseAttempt::Missing,
        };
        tx.commit().await.map_err(backend)?;
        Ok(attempt)
    }
}

super::sql_token_store!(SqliteStore);
