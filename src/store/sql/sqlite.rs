//! [`SqliteStore`]: links in one SQLite file, shared by the processes that open it.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite, Transaction};

use super::key_where;
use crate::ids::TokenKey;
use crate::store::StoreError;

super::dialect!(
    store: SqliteStore,
    name: "sqlite",
    pool: SqlitePool,
    connection: sqlx::SqliteConnection,
    claim_lock: "",
    from_pool_doc: "The pool should have a busy timeout (sqlx's default is 5 s), or concurrent \
                    writers fail at once instead of queueing.",
);

/// The database's clock in unix milliseconds. `unixepoch('subsec')` needs SQLite 3.42; the
/// bundled library is newer. SQLite keeps `'now'` fixed within one statement, so every use in
/// a statement sees the same instant.
macro_rules! db_now_ms {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

/// The version of a write: the counter, which `versioned_write` bumps in the same transaction
/// just before.
macro_rules! next_version {
    () => {
        "(SELECT n FROM tokenbroker_link_version WHERE id = 1)"
    };
}

/// A statement on one key, as `run_with_presence` runs it: unchanged, since the presence check
/// is a second statement in the same transaction.
macro_rules! with_presence {
    ($statement:expr) => {
        $statement
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

    /// Starts a transaction that writes: `BEGIN IMMEDIATE` takes SQLite's write lock now
    /// (waiting out the busy timeout), so nothing the transaction reads changes before it
    /// writes.
    async fn begin_write_tx(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)
    }

    /// Opens a migration's transaction under SQLite's write lock, so two processes cannot both
    /// see a migration as missing.
    async fn begin_migration(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.begin_write_tx().await
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
        Self::migrated(pool).await
    }

    /// Runs an insert or compare-and-swap that sets `version = next_version!()` and returns
    /// it: under the write lock, after bumping the counter. Nothing written, nothing kept: the
    /// counter's bump is rolled back too.
    async fn versioned_write(
        &self,
        query: sqlx::query::QueryScalar<'_, Sqlite, i64, SqliteArguments>,
    ) -> Result<Option<i64>, StoreError> {
        let mut tx = self.begin_write_tx().await?;
        sqlx::query("UPDATE tokenbroker_link_version SET n = n + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let version = query.fetch_optional(&mut *tx).await.map_err(backend)?;
        if version.is_some() {
            tx.commit().await.map_err(backend)?;
        } else {
            tx.rollback().await.map_err(backend)?;
        }
        Ok(version)
    }

    /// Runs a statement on `key` that returns one `BIGINT` when it acts, and tells whether the
    /// key's row was there: under the write lock, so that "did nothing" and "present" describe
    /// the same moment.
    async fn run_with_presence(
        &self,
        query: sqlx::query::Query<'_, Sqlite, SqliteArguments>,
        key: &TokenKey,
    ) -> Result<(Option<i64>, bool), StoreError> {
        let mut tx = self.begin_write_tx().await?;
        let acted: Option<i64> = match query.fetch_optional(&mut *tx).await.map_err(backend)? {
            Some(row) => Some(row.try_get(0).map_err(backend)?),
            None => None,
        };
        let present = acted.is_some() || {
            let query = sqlx::query_scalar::<_, i64>(concat!(
                "SELECT 1 FROM tokenbroker_links WHERE ",
                key_where!()
            ));
            super::bind_key!(query, key)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?
                .is_some()
        };
        tx.commit().await.map_err(backend)?;
        Ok((acted, present))
    }
}

super::sql_token_store!(SqliteStore);
