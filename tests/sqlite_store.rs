//! `SqliteStore` against real database files. "Two stores" are two pools on one file, as two
//! processes would have.
#![cfg(feature = "sqlite")]

#[cfg(feature = "encryption")]
#[path = "support/plain_migration.rs"]
mod plain_migration;
#[path = "support/store_cases.rs"]
mod store_cases;

use std::path::PathBuf;
use std::sync::Arc;

use tokenbroker::store::StoreError;
use tokenbroker::{SqliteStore, TokenStore};

use store_cases::{active, key};

struct TestDb {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl TestDb {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("links.db");
        TestDb { _dir: dir, path }
    }

    async fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.path).await.unwrap()
    }

    async fn pair(&self) -> [Arc<dyn TokenStore>; 2] {
        [Arc::new(self.open().await), Arc::new(self.open().await)]
    }
}

async fn migrations_applied(store: &SqliteStore) -> Vec<i64> {
    sqlx_rows(
        store,
        "SELECT version FROM tokenbroker_schema_migrations ORDER BY version",
    )
    .await
}

async fn sqlx_rows(store: &SqliteStore, sql: &'static str) -> Vec<i64> {
    tokenbroker::store::sqlx::query_scalar(sql)
        .fetch_all(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn opening_creates_the_file_in_wal_mode() {
    let db = TestDb::new();
    assert!(!db.path.exists());
    let store = db.open().await;
    assert!(db.path.exists());
    let mode: String = tokenbroker::store::sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let debug = format!("{store:?}");
    assert!(debug.contains("links.db"), "{debug}");
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let db = TestDb::new();
    let store = db.open().await;
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert_eq!(migrations_applied(&store).await, vec![1, 2, 3]);
    // Reopening runs them again, as a restart would.
    let k = key("acme", "alice", "google");
    store.insert(&k, &active("x")).await.unwrap();
    let reopened = db.open().await;
    assert!(reopened.load(&k).await.unwrap().is_some());
    assert_eq!(migrations_applied(&reopened).await, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_opening_one_new_file_at_once_migrate_once() {
    let db = TestDb::new();
    let opens = (0..4).map(|_| {
        let path = db.path.clone();
        async move { SqliteStore::open(path).await }
    });
    let stores: Vec<SqliteStore> = futures_join_all(opens).await;
    for store in &stores {
        assert_eq!(migrations_applied(store).await, vec![1, 2, 3]);
    }
    // All of them work on the one schema.
    let k = key("acme", "alice", "google");
    let v = stores[0].insert(&k, &active("x")).await.unwrap();
    assert_eq!(stores[3].load(&k).await.unwrap().unwrap().version, v);
}

/// Runs the futures concurrently (tokio tasks), failing on the first error.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<SqliteStore>
where
    F: std::future::Future<Output = Result<SqliteStore, StoreError>> + Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap().expect("concurrent open succeeds"));
    }
    out
}

/// A database made before fenced leases (schema migration 1 only) is upgraded in place when
/// opened: its links and the lease an instance of that version holds are kept, and the whole
/// contract, fenced leases included, holds on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schema_1_database_is_upgraded_in_place() {
    let db = TestDb::new();
    let options = tokenbroker::store::sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db.path)
        .create_if_missing(true);
    let old = tokenbroker::store::sqlx::SqlitePool::connect_with(options)
        .await
        .unwrap();
    tokenbroker::store::sqlx::raw_sql(include_str!("support/schema_v1/sqlite.sql"))
        .execute(&old)
        .await
        .unwrap();
    old.close().await;

    let store = db.open().await;
    assert_eq!(migrations_applied(&store).await, vec![1, 2, 3]);
    store_cases::upgraded_from_v1(&store).await;
    let store: Arc<dyn TokenStore> = Arc::new(store);
    tokenbroker::testing::store_conformance::run_all(&store).await;
}

#[tokio::test]
async fn a_pool_from_the_host_needs_migrate() {
    let db = TestDb::new();
    let options = tokenbroker::store::sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db.path)
        .create_if_missing(true);
    let pool = tokenbroker::store::sqlx::SqlitePool::connect_with(options)
        .await
        .unwrap();
    let store = SqliteStore::from_pool(pool);
    let k = key("acme", "alice", "google");
    assert!(
        matches!(
            store.load(&k).await,
            Err(StoreError::Backend {
                store: "sqlite",
                ..
            })
        ),
        "no tables before migrate"
    );
    store.migrate().await.unwrap();
    store.insert(&k, &active("x")).await.unwrap();
}

#[tokio::test]
async fn a_version_beyond_bigint_never_matches() {
    let db = TestDb::new();
    store_cases::version_beyond_bigint_never_matches(&db.open().await).await;
}

#[tokio::test]
async fn versions_never_repeat_across_stores() {
    let db = TestDb::new();
    let [a, b] = db.pair().await;
    let k = key("acme", "alice", "google");
    let v1 = a.insert(&k, &active("x")).await.unwrap();
    assert!(b.delete(&k, Some(v1.clone())).await.unwrap());
    let v2 = b.insert(&k, &active("y")).await.unwrap();
    assert_ne!(v1, v2);
    assert!(store_cases::is_conflict(
        a.compare_and_swap(&k, v1.clone(), &active("z"), None).await
    ));
}

#[tokio::test]
async fn scan_walks_in_key_order() {
    let db = TestDb::new();
    store_cases::scan_walks_in_key_order(&db.open().await).await;
}

#[tokio::test]
async fn lease_expires_across_stores() {
    let db = TestDb::new();
    let [a, b] = db.pair().await;
    store_cases::lease_expires(&*a, &*b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_race_has_one_winner() {
    let db = TestDb::new();
    store_cases::lease_race(db.pair().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_race_has_one_winner() {
    let db = TestDb::new();
    store_cases::cas_race(db.pair().await).await;
}

#[tokio::test]
async fn purge() {
    let db = TestDb::new();
    let store = db.open().await;
    store_cases::purge(&store, |policy| {
        let store = store.clone();
        async move { store.purge(&policy).await.unwrap() }
    })
    .await;
}

#[tokio::test]
async fn rows_that_do_not_map_back_are_corrupt() {
    let db = TestDb::new();
    let store = db.open().await;
    let k = key("acme", "alice", "google");
    store
        .insert(&k, &active("top-secret-payload"))
        .await
        .unwrap();

    tokenbroker::store::sqlx::query("UPDATE tokenbroker_links SET state = 'zombie'")
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

    tokenbroker::store::sqlx::query(
        "UPDATE tokenbroker_links SET state = 'relink_required', relink_reason = NULL",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert!(matches!(
        store.load(&k).await,
        Err(StoreError::Corrupt { .. })
    ));

    tokenbroker::store::sqlx::query(
        "UPDATE tokenbroker_links SET state = 'active', provider = 'Bad Provider'",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let err = store.scan(None, 10).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { reason, .. } if reason.contains("provider id")),
        "{err:?}"
    );
    let err = store.list(&k.realm, &k.subject).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");

    tokenbroker::store::sqlx::query(
        "UPDATE tokenbroker_links SET provider = 'google', version = 0",
    )
    .execute(store.pool())
    .await
    .unwrap();
    assert!(matches!(
        store.load(&k).await,
        Err(StoreError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn an_expired_lease_does_not_protect_from_purge() {
    let db = TestDb::new();
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
    tokenbroker::store::sqlx::query("UPDATE tokenbroker_links SET lease_expires_at = 1")
        .execute(store.pool())
        .await
        .unwrap();
    assert_eq!(store.purge(&policy).await.unwrap().unused, 1);
    assert!(store.load(&k).await.unwrap().is_none());
}

#[tokio::test]
async fn backend_failures_are_backend_errors() {
    let db = TestDb::new();
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
                store: "sqlite",
                ..
            }
        ),
        "{err:?}"
    );
}

/// The public conformance suite, one test per check, each on a fresh database file.
mod conformance {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use tokenbroker::store::{
        Lease, LeaseAttempt, LeaseHolder, LeaseToken, Record, StoreError, StoredRecord, Version,
    };
    use tokenbroker::{Realm, SqliteStore, Subject, TokenKey, TokenStore};

    /// A `SqliteStore` that owns its temporary directory, so the file lives exactly as long as
    /// the store the check holds.
    #[derive(Debug)]
    pub(super) struct InTempDir {
        store: SqliteStore,
        _dir: tempfile::TempDir,
    }

    impl InTempDir {
        pub(super) async fn shared() -> Arc<dyn TokenStore> {
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path().join("links.db"))
                .await
                .unwrap();
            Arc::new(InTempDir { store, _dir: dir })
        }
    }

    #[async_trait]
    impl TokenStore for InTempDir {
        async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
            self.store.load(key).await
        }
        async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
            self.store.insert(key, record).await
        }
        async fn compare_and_swap(
            &self,
            key: &TokenKey,
            expected: Version,
            record: &Record,
            fence: Option<&LeaseToken>,
        ) -> Result<Version, StoreError> {
            self.store
                .compare_and_swap(key, expected.clone(), record, fence)
                .await
        }
        async fn delete(
            &self,
            key: &TokenKey,
            expected: Option<Version>,
        ) -> Result<bool, StoreError> {
            self.store.delete(key, expected).await
        }
        async fn list(
            &self,
            realm: &Realm,
            subject: &Subject,
        ) -> Result<Vec<TokenKey>, StoreError> {
            self.store.list(realm, subject).await
        }
        async fn scan(
            &self,
            cursor: Option<&tokenbroker::store::ScanCursor>,
            limit: usize,
        ) -> Result<tokenbroker::store::ScanPage, StoreError> {
            self.store.scan(cursor, limit).await
        }
        async fn try_lease(
            &self,
            key: &TokenKey,
            holder: &LeaseHolder,
            ttl: Duration,
        ) -> Result<LeaseAttempt, StoreError> {
            self.store.try_lease(key, holder, ttl).await
        }
        async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
            self.store.release_lease(lease).await
        }
        async fn extend_lease(
            &self,
            lease: &Lease,
            ttl: Duration,
        ) -> Result<Option<Lease>, StoreError> {
            self.store.extend_lease(lease, ttl).await
        }

        // The revocation outbox is passed through untouched.
        async fn delete_and_enqueue_revocation(
            &self,
            key: &tokenbroker::TokenKey,
            expected: Option<tokenbroker::store::Version>,
            revocation: &tokenbroker::store::PendingRevocation,
        ) -> Result<bool, tokenbroker::StoreError> {
            self.store
                .delete_and_enqueue_revocation(key, expected, revocation)
                .await
        }
        async fn enqueue_revocation(
            &self,
            revocation: &tokenbroker::store::PendingRevocation,
        ) -> Result<(), tokenbroker::StoreError> {
            self.store.enqueue_revocation(revocation).await
        }
        async fn claim_revocations(
            &self,
            now: time::OffsetDateTime,
            until: time::OffsetDateTime,
            limit: usize,
        ) -> Result<Vec<tokenbroker::store::PendingRevocation>, tokenbroker::StoreError> {
            self.store.claim_revocations(now, until, limit).await
        }
        async fn reschedule_revocation(
            &self,
            claimed: &tokenbroker::store::PendingRevocation,
            due_at: time::OffsetDateTime,
        ) -> Result<bool, tokenbroker::StoreError> {
            self.store.reschedule_revocation(claimed, due_at).await
        }
        async fn remove_revocation(
            &self,
            id: &tokenbroker::store::RevocationId,
        ) -> Result<(), tokenbroker::StoreError> {
            self.store.remove_revocation(id).await
        }
    }

    tokenbroker::store_conformance_tests!(InTempDir::shared());
}

/// `run_all` twice on one file: the checks share a database, as a host's run would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_run_all_on_one_file() {
    let store = conformance::InTempDir::shared().await;
    tokenbroker::testing::store_conformance::run_all(&store).await;
    tokenbroker::testing::store_conformance::run_all(&store).await;
}

/// The conformance suite through `EncryptedStore` over a SQLite file.
#[cfg(feature = "encryption")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_run_all_encrypted() {
    use std::sync::Arc;
    use tokenbroker::TokenStore;
    use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
    let keyring = StaticKeyring::new(KeyId::new("k1").unwrap(), [9u8; 32]);
    let inner = conformance::InTempDir::shared().await;
    let store: Arc<dyn TokenStore> = Arc::new(EncryptedStore::new(inner, Arc::new(keyring)));
    tokenbroker::testing::store_conformance::run_all(&store).await;
}

/// Turning encryption on for a SQLite file that holds plain records: read with the opt-in,
/// encrypted in place by `rewrap`, read without it afterwards.
#[cfg(feature = "encryption")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encryption_turned_on_over_plain_records() {
    let db = TestDb::new();
    plain_migration::turn_encryption_on(|| db.open()).await;
}
