//! [`PostgresStore`]: links in a PostgreSQL database, shared by every instance of a deployment.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgListener, PgPool, PgPoolOptions};

use crate::ids::TokenKey;
use crate::store::{ChangeFeed, FeedEvent, StoreError};

super::dialect!(
    store: PostgresStore,
    name: "postgres",
    pool: PgPool,
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

/// The version of a write, drawn from the sequence in the statement itself.
macro_rules! next_version {
    () => {
        "nextval('tokenbroker_link_version')"
    };
}

/// A statement on one key (returning one `BIGINT` when it acts) made into one that also tells
/// whether the key's row was there, for `run_with_presence`.
macro_rules! with_presence {
    ($statement:expr) => {
        concat!(
            "WITH acted AS (",
            $statement,
            ") SELECT (SELECT * FROM acted) AS acted, \
             EXISTS (SELECT 1 FROM tokenbroker_links WHERE ",
            super::key_where!(),
            ") AS present"
        )
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

    /// Runs an insert or compare-and-swap that sets `version = next_version!()` and returns
    /// it: one statement, the sequence drawn inside it.
    async fn versioned_write(
        &self,
        query: sqlx::query::QueryScalar<'_, sqlx::Postgres, i64, PgArguments>,
    ) -> Result<Option<i64>, StoreError> {
        query.fetch_optional(&self.pool).await.map_err(backend)
    }

    /// Runs a statement made by `with_presence!`: one statement, whose `EXISTS` reads the
    /// snapshot the statement started from, so "did nothing" and "present" describe the same
    /// moment. A concurrent writer of the row blocks on its row lock and then re-checks the
    /// `WHERE` against the committed row, so of two lease takers only one wins.
    async fn run_with_presence(
        &self,
        query: sqlx::query::Query<'_, sqlx::Postgres, PgArguments>,
        _key: &TokenKey,
    ) -> Result<(Option<i64>, bool), StoreError> {
        let row = query.fetch_one(&self.pool).await.map_err(backend)?;
        let acted: Option<i64> = row.try_get("acted").map_err(backend)?;
        let present: bool = row.try_get("present").map_err(backend)?;
        Ok((acted, present))
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
        Self::migrated(pool).await
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

super::sql_token_store!(PostgresStore);
