//! `PostgresStore` against a real server. Each test works in a schema of its own, so tests run
//! in parallel; "two stores" are two pools on that schema, as two app instances would have.
//!
//! The server's URL comes from `TOKENBROKER_TEST_POSTGRES_URL` (scripts/test.sh starts one).
#![cfg(feature = "postgres")]

#[cfg(feature = "encryption")]
#[path = "support/plain_migration.rs"]
mod plain_migration;
#[path = "support/store_cases.rs"]
mod store_cases;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokenbroker::store::StoreError;
use tokenbroker::store::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokenbroker::store::sqlx::{self, AssertSqlSafe};
use tokenbroker::{PostgresStore, TokenStore};

use store_cases::{active, key};

fn server_url() -> String {
    std::env::var("TOKENBROKER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "TOKENBROKER_TEST_POSTGRES_URL is not set: run scripts/test.sh, which starts \
             PostgreSQL (or eval \"$(scripts/setup-postgres.sh)\" and export it yourself)"
        )
    })
}

/// A fresh schema on the test server.
struct TestDb {
    url: String,
    schema: String,
}

impl TestDb {
    async fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let url = server_url();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        // Unique across parallel tests (sequence), test processes (pid) and runs (time).
        let schema = format!(
            "t_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            nanos % 1_000_000_000_000
        );
        let admin = PgPool::connect(&url)
            .await
            .expect("connect to the test server");
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        TestDb { url, schema }
    }

    /// A pool whose connections live in the test's schema.
    async fn pool(&self) -> PgPool {
        let options = PgConnectOptions::from_str(&self.url)
            .unwrap()
            .options([("search_path", self.schema.as_str())]);
        PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .unwrap()
    }

    async fn open(&self) -> PostgresStore {
        let store = PostgresStore::from_pool(self.pool().await);
        store.migrate().await.unwrap();
        store
    }

    async fn pair(&self) -> [Arc<dyn TokenStore>; 2] {
        [Arc::new(self.open().await), Arc::new(self.open().await)]
    }

    /// Drops the schema (left behind when a test fails, for a look at what it held).
    async fn cleanup(self) {
        let admin = PgPool::connect(&self.url).await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
    }
}

async fn migrations_applied(store: &PostgresStore) -> Vec<i32> {
    sqlx::query_scalar("SELECT version FROM tokenbroker_schema_migrations ORDER BY version")
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn connect_migrates_and_debug_hides_the_password() {
    let db = TestDb::new().await;
    // The test cluster trusts local connections, so any password is accepted; it must still
    // never be printed.
    let url = db.url.replacen(
        "postgres://tokenbroker@",
        "postgres://tokenbroker:hunter2-secret@",
        1,
    );
    assert_ne!(url, db.url, "test URL has the expected shape");
    let store = PostgresStore::connect(&url).await.unwrap();
    let debug = format!("{store:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("127.0.0.1"), "{debug}");
    assert_eq!(migrations_applied(&store).await, vec![1, 2, 3, 4]);
    // connect() used the default search_path (public): clean up there.
    sqlx::raw_sql(
        "DROP TABLE tokenbroker_links; DROP TABLE tokenbroker_revocations; \
         DROP TABLE tokenbroker_schema_migrations; \
         DROP SEQUENCE tokenbroker_link_version; \
         DROP FUNCTION tokenbroker_links_notify();",
    )
    .execute(store.pool())
    .await
    .unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn connect_errors_do_not_repeat_the_password() {
    // A URL that does not parse (the port): the error must not quote it back.
    let err = PostgresStore::connect("postgres://u:hunter2-secret@127.0.0.1:port/db")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Backend {
                store: "postgres",
                ..
            }
        ),
        "{err:?}"
    );
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    assert!(!text.contains("hunter2"), "{text}");
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let db = TestDb::new().await;
    let store = db.open().await;
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(migrations_applied(&store).await, vec![1, 2, 3, 4]);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_at_once_migrate_once() {
    let db = TestDb::new().await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(PostgresStore::from_pool(db.pool().await));
    }
    let tasks: Vec<_> = stores
        .iter()
        .cloned()
        .map(|s| tokio::spawn(async move { s.migrate().await }))
        .collect();
    for t in tasks {
        t.await.unwrap().expect("concurrent migrate succeeds");
    }
    assert_eq!(migrations_applied(&stores[0]).await, vec![1, 2, 3, 4]);
    let k = key("acme", "alice", "google");
    let v = stores[0].insert(&k, &active("x")).await.unwrap();
    assert_eq!(stores[3].load(&k).await.unwrap().unwrap().version, v);
    for s in stores {
        s.pool().close().await;
    }
    db.cleanup().await;
}

/// A database made before fenced leases (schema migration 1 only) is upgraded in place by
/// `migrate`: its links and the lease an instance of that version holds are kept, and the whole
/// contract, fenced leases included, holds on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_1_database_is_upgraded_in_place() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    sqlx::raw_sql(include_str!("support/schema_v1/postgres.sql"))
        .execute(&pool)
        .await
        .unwrap();

    let store = PostgresStore::from_pool(pool);
    store.migrate().await.unwrap();
    assert_eq!(migrations_applied(&store).await, vec![1, 2, 3, 4]);
    store_cases::upgraded_from_v1(&store).await;
    let store: Arc<dyn TokenStore> = Arc::new(store);
    tokenbroker::testing::store_conformance::run_all(&store).await;
    drop(store);
    db.cleanup().await;
}

#[tokio::test]
async fn a_pool_from_the_host_needs_migrate() {
    let db = TestDb::new().await;
    let store = PostgresStore::from_pool(db.pool().await);
    let k = key("acme", "alice", "google");
    assert!(
        matches!(
            store.load(&k).await,
            Err(StoreError::Backend {
                store: "postgres",
                ..
            })
        ),
        "no tables before migrate"
    );
    store.migrate().await.unwrap();
    store.insert(&k, &active("x")).await.unwrap();
    db.cleanup().await;
}

#[tokio::test]
async fn a_version_beyond_bigint_never_matches() {
    let db = TestDb::new().await;
    store_cases::version_beyond_bigint_never_matches(&db.open().await).await;
    db.cleanup().await;
}

#[tokio::test]
async fn versions_never_repeat_across_stores() {
    let db = TestDb::new().await;
    let [a, b] = db.pair().await;
    let k = key("acme", "alice", "google");
    let v1 = a.insert(&k, &active("x")).await.unwrap();
    assert!(b.delete(&k, Some(v1.clone())).await.unwrap());
    let v2 = b.insert(&k, &active("y")).await.unwrap();
    assert_ne!(v1, v2);
    assert!(store_cases::is_conflict(
        a.compare_and_swap(&k, v1.clone(), &active("z"), None).await
    ));
    db.cleanup().await;
}

#[tokio::test]
async fn scan_walks_in_key_order() {
    let db = TestDb::new().await;
    store_cases::scan_walks_in_key_order(&db.open().await).await;
    db.cleanup().await;
}

#[tokio::test]
async fn lease_expires_across_stores() {
    let db = TestDb::new().await;
    let [a, b] = db.pair().await;
    store_cases::lease_expires(&*a, &*b).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_race_has_one_winner() {
    let db = TestDb::new().await;
    store_cases::lease_race(db.pair().await).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_race_has_one_winner() {
    let db = TestDb::new().await;
    store_cases::cas_race(db.pair().await).await;
    db.cleanup().await;
}

#[tokio::test]
async fn purge() {
    let db = TestDb::new().await;
    let store = db.open().await;
    store_cases::purge(&store, |policy| {
        let store = store.clone();
        async move { store.purge(&policy).await.unwrap() }
    })
    .await;
    db.cleanup().await;
}

#[tokio::test]
async fn key_columns_sort_bytewise_whatever_the_database_collation() {
    let db = TestDb::new().await;
    let store = db.open().await;
    let collations: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT collation_name::text FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = 'tokenbroker_links' \
         AND column_name IN ('realm', 'subject', 'provider')",
    )
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(collations, vec![Some("C".to_string()); 3]);
    db.cleanup().await;
}

#[tokio::test]
async fn an_expired_lease_does_not_protect_from_purge() {
    let db = TestDb::new().await;
    let store = db.open().await;
    let k = key("acme", "alice", "google");
    let day = std::time::Duration::from_secs(24 * 3600);
    let old = store_cases::record(
        "x",
        tokenbroker::store::LinkState::Active,
        store_cases::now_ms() - 10 * day,
    );
    store.insert(&k, &old).await.unwrap();
    let holder = tokenbroker::store::LeaseHolder::new("refresher");
    store
        .try_lease(&k, &holder, 600 * std::time::Duration::from_secs(1))
        .await
        .unwrap();
    let policy = tokenbroker::store::RetentionPolicy::default().with_unused_for(5 * day);
    assert_eq!(store.purge(&policy).await.unwrap().unused, 0);
    // Expire the lease by the database's clock.
    sqlx::query("UPDATE tokenbroker_links SET lease_expires_at = 1")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(store.purge(&policy).await.unwrap().unused, 1);
    assert!(store.load(&k).await.unwrap().is_none());
    db.cleanup().await;
}

#[tokio::test]
async fn backend_failures_are_backend_errors() {
    let db = TestDb::new().await;
    let store = db.open().await;
    store.pool().close().await;
    let err = store
        .load(&key("acme", "alice", "google"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Backend {
                store: "postgres",
                ..
            }
        ),
        "{err:?}"
    );
    db.cleanup().await;
}

#[tokio::test]
async fn rows_that_do_not_map_back_are_corrupt() {
    let db = TestDb::new().await;
    let store = db.open().await;
    let k = key("acme", "alice", "google");
    store
        .insert(&k, &active("top-secret-payload"))
        .await
        .unwrap();

    sqlx::query("UPDATE tokenbroker_links SET state = 'zombie'")
        .execute(store.pool())
        .await
        .unwrap();
    let err = store.load(&k).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, reason, version: Some(_) } if key == &k && reason.contains("zombie")),
        "{err:?}"
    );
    assert!(!format!("{err} {err:?}").contains("top-secret-payload"));
    assert!(matches!(
        store.scan(None, 10).await,
        Err(StoreError::Corrupt { .. })
    ));

    sqlx::query("UPDATE tokenbroker_links SET state = 'active', provider = 'Bad Provider'")
        .execute(store.pool())
        .await
        .unwrap();
    let err = store.list(&k.realm, &k.subject).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("provider id")),
        "{err:?}"
    );
    db.cleanup().await;
}

/// The public conformance suite, one test per check, each in a fresh schema. (These schemas
/// are not dropped: the checks hold the store until they return.)
mod conformance {
    use std::sync::Arc;
    use tokenbroker::TokenStore;

    tokenbroker::store_conformance_tests!(async {
        Arc::new(super::TestDb::new().await.open().await) as Arc<dyn TokenStore>
    });
}

/// `run_all` twice on one schema: the checks share a database, as a host's run would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_run_all_on_one_schema() {
    let db = TestDb::new().await;
    let store: Arc<dyn TokenStore> = Arc::new(db.open().await);
    tokenbroker::testing::store_conformance::run_all(&store).await;
    tokenbroker::testing::store_conformance::run_all(&store).await;
    drop(store);
    db.cleanup().await;
}

/// The conformance suite through `EncryptedStore` over PostgreSQL.
#[cfg(feature = "encryption")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_run_all_encrypted() {
    use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
    let db = TestDb::new().await;
    let keyring = StaticKeyring::new(KeyId::new("k1").unwrap(), [9u8; 32]);
    let store: Arc<dyn TokenStore> =
        Arc::new(EncryptedStore::new(db.open().await, Arc::new(keyring)));
    tokenbroker::testing::store_conformance::run_all(&store).await;
    drop(store);
    db.cleanup().await;
}

/// Turning encryption on for a PostgreSQL database that holds plain records: read with the
/// opt-in, encrypted in place by `rewrap`, read without it afterwards.
#[cfg(feature = "encryption")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_turned_on_over_plain_records() {
    let db = TestDb::new().await;
    plain_migration::turn_encryption_on(|| db.open()).await;
    db.cleanup().await;
}
