//! [`PostgresStore`]: links in a PostgreSQL database, shared by every instance of a deployment.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};

use super::{
    Columns, duration_ms, fence_holds, key_where, lease_is_free, version_from_db, version_to_db,
};
use crate::ids::TokenKey;
use crate::store::{
    ChangeFeed, FeedEvent, LeaseAttempt, LeaseHolder, LeaseToken, Record, StoreError, Version,
};

super::dialect!(
    store: PostgresStore,
    name: "postgres",
    connection: sqlx::PgConnection,
    claim_lock: " FOR UPDATE SKIP LOCKED",
);

/// The database's clock in unix milliseconds. `clock_timestamp()` rather than `now()`, which is
/// frozen at the start of the transaction and would make a lease look younger than it is.
macro_rules! db_now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// The key of the transaction-scoped advisory lock that serialises migrations ("tokenbrk").
const MIGRATION_LOCK: i64 = 0x746f_6b65_6e62_726b;

super::migrations!(
    key_text: "TEXT COLLATE \"C\"",
    binary: "BYTEA",
    version_counter: "CREATE SEQUENCE tokenbroker_link_version AS BIGINT START 1;\n",
    super::Migration {
        version: 4,
        sql: NOTIFY_CHANGES,
    },
);

/// The channel [`PostgresStore::change_feed`] listens on.
pub(crate) const CHANGES_CHANNEL: &str = "tokenbroker_links";

/// Migration 4: every change of a link (insert, delete, an update that moves its version,
/// payload or state, not a lease-only update) notifies `tokenbroker_links` with the key as JSON
/// (`{"s": schema, "r": realm, "u": subject, "p": provider}`), or `{"s": schema, "all": true}`
/// when that would not fit in a notification (8000 bytes). A trigger, so that writers of every
/// version (and the host's own SQL) notify too; `pg_notify` is delivered at commit.
const NOTIFY_CHANGES: &str = r#"
CREATE OR REPLACE FUNCTION tokenbroker_links_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r RECORD;
    msg TEXT;
BEGIN
    IF TG_OP = 'UPDATE'
        AND OLD.version IS NOT DISTINCT FROM NEW.version
        AND OLD.payload IS NOT DISTINCT FROM NEW.payload
        AND OLD.state IS NOT DISTINCT FROM NEW.state
        AND OLD.realm = NEW.realm AND OLD.subject = NEW.subject AND OLD.provider = NEW.provider
    THEN
        RETURN NULL; -- a lease taken, extended or released: nothing a reader sees
    END IF;
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    msg := json_build_object('s', TG_TABLE_SCHEMA, 'r', r.realm, 'u', r.subject, 'p', r.provider)::text;
    IF octet_length(msg) > 7900 THEN
        msg := json_build_object('s', TG_TABLE_SCHEMA, 'all', true)::text;
    END IF;
    PERFORM pg_notify('tokenbroker_links', msg);
    IF TG_OP = 'UPDATE' AND (OLD.realm, OLD.subject, OLD.provider)
        IS DISTINCT FROM (NEW.realm, NEW.subject, NEW.provider) THEN
        msg := json_build_object('s', TG_TABLE_SCHEMA, 'r', OLD.realm, 'u', OLD.subject, 'p', OLD.provider)::text;
        IF octet_length(msg) > 7900 THEN
            msg := json_build_object('s', TG_TABLE_SCHEMA, 'all', true)::text;
        END IF;
        PERFORM pg_notify('tokenbroker_links', msg);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tokenbroker_links_notify
    AFTER INSERT OR UPDATE OR DELETE ON tokenbroker_links
    FOR EACH ROW EXECUTE FUNCTION tokenbroker_links_notify();
"#;

/// A [`TokenStore`](crate::TokenStore) in PostgreSQL (feature `postgres`), for deployments of several instances.
///
/// Every decision is one statement: compare-and-swap is an `UPDATE ... WHERE version = $n`,
/// versions come from a sequence, and the refresh lease is taken by one `UPDATE` judged by the
/// database server's clock, so instances with skewed clocks still never refresh the same link
/// at once. Each acquisition stores a fresh fencing token; release, extension and fenced
/// compare-and-swap compare it in the same statement.
///
/// Times in [`RecordMeta`](crate::store::RecordMeta) are kept to the millisecond.
///
/// Bring your own pool with [`from_pool`](PostgresStore::from_pool) (then call
/// [`migrate`](PostgresStore::migrate)), or let [`connect`](PostgresStore::connect) build one.
/// Tables live in the connection's `search_path`; to keep them in their own schema, set
/// `search_path` in the pool's connect options.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tokenbroker::store::sqlx::postgres::PgPoolOptions;
/// use tokenbroker::{PostgresStore, TokenStore};
///
/// let pool = PgPoolOptions::new()
///     .max_connections(16)
///     .connect("postgres://app@db.internal/app")
///     .await?;
/// let store = PostgresStore::from_pool(pool);
/// store.migrate().await?;
/// let store: Arc<dyn TokenStore> = Arc::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Only where it points: the connect options also hold the password.
        let options = self.pool.connect_options();
        f.debug_struct("PostgresStore")
            .field("host", &options.get_host())
            .field("port", &options.get_port())
            .field("database", &options.get_database())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    super::shared_link_queries!();
    super::shared_outbox_queries!();

    /// Starts a transaction that writes.
    async fn begin_write_tx(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        self.pool.begin().await.map_err(backend)
    }

    /// Opens a migration's transaction under a transaction-scoped advisory lock, taken before
    /// anything else, so even `CREATE TABLE IF NOT EXISTS` cannot race (two concurrent ones can
    /// fail on the catalog's unique index).
    async fn begin_migration(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(backend)?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        Ok(tx)
    }

    /// Connects a pool to `url` (`postgres://user:password@host/db`) and brings the schema up
    /// to date. Errors never repeat the URL.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(backend)?;
        let pool = PgPoolOptions::new()
            .connect_with(options)
            .await
            .map_err(backend)?;
        let store = PostgresStore::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Uses a pool the host configured. Nothing is checked or created: call
    /// [`migrate`](Self::migrate) before use.
    pub fn from_pool(pool: PgPool) -> Self {
        PostgresStore { pool }
    }

    /// The pool, e.g. to share it with the host's own tables.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A [`ChangeFeed`] of this store's links, for
    /// [`CachedStore::with_change_feed`](crate::store::CachedStore::with_change_feed): it
    /// `LISTEN`s on the channel `tokenbroker_links`, where migration 4's trigger announces every insert,
    /// write and delete of a link, whoever made it.
    ///
    /// The feed holds one connection of its own (a pool of one, with this pool's connect
    /// options: same server, credentials, `search_path` and `application_name`), so it takes
    /// nothing from the store's pool. It only reports changes to the table in its connection's
    /// `current_schema()`. When the connection is lost (the server restarts, an administrator
    /// ends it) it reports [`FeedEvent::Lost`], reconnects with a backoff (100 ms doubling to
    /// 10 s), and reports [`FeedEvent::Subscribed`] once it listens again.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tokenbroker::StoreError> {
    /// use tokenbroker::PostgresStore;
    /// use tokenbroker::store::CachedStore;
    ///
    /// let pg = PostgresStore::connect("postgres://app@db.internal/app").await?;
    /// let feed = pg.change_feed();
    /// let store = CachedStore::with_change_feed(pg, feed);
    /// # Ok(()) }
    /// ```
    pub fn change_feed(&self) -> PgChangeFeed {
        let options = (*self.pool.connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        PgChangeFeed {
            pool,
            listener: None,
            schema: None,
            pause: None,
        }
    }
}

/// The change feed of a [`PostgresStore`] (see [`PostgresStore::change_feed`]).
pub struct PgChangeFeed {
    pool: PgPool,
    listener: Option<PgListener>,
    /// The schema whose table is watched, read when connecting.
    schema: Option<String>,
    /// The pause before the next connection attempt, after a failure.
    pause: Option<Duration>,
}

impl std::fmt::Debug for PgChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgChangeFeed")
            .field("schema", &self.schema)
            .field("connected", &self.listener.is_some())
            .finish_non_exhaustive()
    }
}

/// A notification's payload, as migration 4's trigger writes it.
#[derive(serde::Deserialize)]
struct Notice {
    s: String,
    r: Option<String>,
    u: Option<String>,
    p: Option<String>,
    #[serde(default)]
    all: bool,
}

impl PgChangeFeed {
    async fn connect(&mut self) -> Result<(), sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.eager_reconnect(false);
        let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
            .fetch_one(&mut listener)
            .await?;
        listener.listen(CHANGES_CHANNEL).await?;
        self.schema = Some(schema);
        self.listener = Some(listener);
        Ok(())
    }

    fn event_of(&self, payload: &str) -> Option<FeedEvent> {
        let Ok(notice) = serde_json::from_str::<Notice>(payload) else {
            return Some(FeedEvent::ChangedAll);
        };
        if Some(&notice.s) != self.schema.as_ref() {
            return None; // another schema's table
        }
        if notice.all {
            return Some(FeedEvent::ChangedAll);
        }
        match (notice.r, notice.u, notice.p) {
            (Some(r), Some(u), Some(p)) => match TokenKey::parse(&r, &u, &p) {
                Ok(key) => Some(FeedEvent::Changed(key)),
                Err(_) => Some(FeedEvent::ChangedAll),
            },
            _ => Some(FeedEvent::ChangedAll),
        }
    }
}

#[async_trait::async_trait]
impl ChangeFeed for PgChangeFeed {
    async fn next_event(&mut self) -> Option<FeedEvent> {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                if let Some(pause) = self.pause {
                    tokio::time::sleep(pause).await;
                }
                match self.connect().await {
                    Ok(()) => {
                        self.pause = None;
                        return Some(FeedEvent::Subscribed);
                    }
                    Err(sqlx::Error::PoolClosed) => return None,
                    Err(e) => {
                        let pause = self.pause.map_or(Duration::from_millis(100), |p| {
                            (p * 2).min(Duration::from_secs(10))
                        });
                        self.pause = Some(pause);
                        tracing::warn!(target: "tokenbroker", error = %e, retry_in = ?pause, "cache change feed: cannot listen");
                        continue;
                    }
                }
            };
            match listener.try_recv().await {
                Ok(Some(notification)) => {
                    if let Some(event) = self.event_of(notification.payload()) {
                        return Some(event);
                    }
                }
                Ok(None) | Err(_) => {
                    // The connection is gone (or broken): a new one, from scratch.
                    self.listener = None;
                    self.pause = Some(Duration::from_millis(100));
                    tracing::warn!(target: "tokenbroker", "cache change feed: connection lost");
                    return Some(FeedEvent::Lost);
                }
            }
        }
    }
}

fn corrupt(key: &TokenKey) -> impl Fn(String) -> StoreError + '_ {
    move |reason| StoreError::Corrupt {
        key: key.clone(),
        reason,
        version: None,
    }
}

/// The statements this dialect does its own way. `sql_token_store!` implements
/// [`TokenStore`](crate::store::TokenStore) over them and the shared queries.
impl PostgresStore {
    async fn insert_link(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        let c = Columns::of(&record.meta);
        let query = sqlx::query_scalar(
            "INSERT INTO tokenbroker_links (realm, subject, provider, version, payload, state, \
             relink_reason, relink_since, expires_at, created_at, updated_at) \
             VALUES ($1, $2, $3, nextval('tokenbroker_link_version'), $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (realm, subject, provider) DO NOTHING RETURNING version",
        )
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(record.payload.expose_secret());
        let version: Option<i64> = super::bind_columns!(query, c)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        match version {
            Some(v) => version_from_db(v).map_err(corrupt(key)),
            None => Err(StoreError::Conflict { key: key.clone() }),
        }
    }

    async fn swap_link(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let c = Columns::of(&record.meta);
        // The lease columns are left alone: a write does not need the lease, and must not free
        // or steal one a refresh is holding. The fence is checked in the same statement: a
        // concurrent try_lease that changes the token either commits first (and we re-check
        // the WHERE against its row, and write nothing) or waits for our row lock.
        let query = sqlx::query_scalar(concat!(
            "UPDATE tokenbroker_links SET version = nextval('tokenbroker_link_version'), \
             payload = $5, state = $6, relink_reason = $7, relink_since = $8, expires_at = $9, \
             created_at = $10, updated_at = $11 WHERE ",
            key_where!(),
            " AND version = $4 AND ",
            fence_holds!("$12"),
            " RETURNING version"
        ))
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(version_to_db(&expected))
        .bind(record.payload.expose_secret());
        let version: Option<i64> = super::bind_columns!(query, c)
            .bind(fence.map(LeaseToken::as_str))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        match version {
            Some(v) => version_from_db(v).map_err(corrupt(key)),
            None => Err(StoreError::Conflict { key: key.clone() }),
        }
    }

    async fn delete_link(
        &self,
        key: &TokenKey,
        expected: Option<Version>,
    ) -> Result<bool, StoreError> {
        let Some(expected) = expected else {
            return self.delete_link_unconditionally(key).await;
        };
        // One statement: the EXISTS sees the snapshot the DELETE started from, so "not deleted"
        // and "present" describe the same moment.
        let row = sqlx::query(concat!(
            "WITH deleted AS (DELETE FROM tokenbroker_links WHERE ",
            key_where!(),
            " AND version = $4 RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM deleted) AS deleted, \
             EXISTS (SELECT 1 FROM tokenbroker_links WHERE ",
            key_where!(),
            ") AS present"
        ))
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(version_to_db(&expected))
        .fetch_one(&self.pool)
        .await
        .map_err(backend)?;
        let deleted: bool = row.try_get("deleted").map_err(backend)?;
        let present: bool = row.try_get("present").map_err(backend)?;
        match (deleted, present) {
            (true, _) => Ok(true),
            (false, true) => Err(StoreError::Conflict { key: key.clone() }),
            (false, false) => Ok(false),
        }
    }

    async fn try_lease_link(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        // One statement. A concurrent taker blocks on the row lock and then re-checks the WHERE
        // against the committed row, so only one wins; the EXISTS reads the statement's snapshot,
        // in which the row we failed to take was present.
        let token = LeaseToken::random();
        let row = sqlx::query(concat!(
            "WITH taken AS (UPDATE tokenbroker_links SET lease_holder = $4, lease_token = $6, \
             lease_expires_at = ",
            db_now_ms!(),
            " + $5 WHERE ",
            key_where!(),
            " AND ",
            lease_is_free!(db_now_ms!()),
            " RETURNING lease_expires_at) \
             SELECT (SELECT lease_expires_at FROM taken) AS lease_until, \
             EXISTS (SELECT 1 FROM tokenbroker_links WHERE ",
            key_where!(),
            ") AS present"
        ))
        .bind(key.realm.as_str())
        .bind(key.subject.as_str())
        .bind(key.provider.as_str())
        .bind(holder.as_str())
        .bind(duration_ms(ttl))
        .bind(token.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(backend)?;
        let until: Option<i64> = row.try_get("lease_until").map_err(backend)?;
        let present: bool = row.try_get("present").map_err(backend)?;
        Ok(match (until, present) {
            (Some(until), _) => super::acquired(key, holder, token, until)?,
            (None, true) => LeaseAttempt::Busy,
            (None, false) => LeaseAttempt::Missing,
        })
    }
}

super::sql_token_store!(PostgresStore);
