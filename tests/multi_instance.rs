//! Several broker instances, each with its own connection pool, over one SQLite file, one
//! PostgreSQL database and one Redis, against the loopback FakeIdp with rotation and reuse detection on.
//! The claims: one refresh at the IdP however many readers and instances, every reader gets
//! the new token, no rotated refresh token is ever presented twice, and a dead lease holder is
//! taken over. One test runs the instances as separate OS processes (this test binary,
//! re-executed as children).
//!
//! Needs `TOKENBROKER_TEST_POSTGRES_URL` and `TOKENBROKER_TEST_REDIS_URL` (scripts/test.sh
//! starts both servers and sets them).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokenbroker::provider::OAuth2Config;
use tokenbroker::store::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokenbroker::store::sqlx::{self, AssertSqlSafe};
use tokenbroker::store::{LeaseAttempt, LeaseHolder};
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, ManualClock};
use tokenbroker::{
    Callback, Caller, Clock, LoginOptions, PostgresStore, ProviderId, ProviderPolicy, RedisStore,
    Scopes, Secret, SqliteStore, TokenBroker, TokenKey, TokenStore,
};

const INSTANCES: usize = 4;
const READERS_PER_INSTANCE: usize = 100;

/// Where the instances keep their links.
#[derive(Clone, Debug)]
enum Db {
    Sqlite(PathBuf),
    Postgres { url: String, schema: String },
    Redis { url: String, prefix: String },
}

impl Db {
    async fn postgres() -> Db {
        let url = std::env::var("TOKENBROKER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
            panic!("TOKENBROKER_TEST_POSTGRES_URL is not set: run scripts/test.sh, which starts PostgreSQL")
        });
        let schema = format!("mi_{}", unique());
        let admin = PgPool::connect(&url)
            .await
            .expect("connect to the test server");
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        Db::Postgres { url, schema }
    }

    fn redis() -> Db {
        let url = std::env::var("TOKENBROKER_TEST_REDIS_URL").unwrap_or_else(|_| {
            panic!("TOKENBROKER_TEST_REDIS_URL is not set: run scripts/test.sh, which starts Redis")
        });
        Db::Redis {
            url,
            prefix: format!("mi_{}", unique()),
        }
    }

    /// A new store with its own pool: what one more app instance would open.
    async fn open(&self) -> Arc<dyn TokenStore> {
        match self {
            Db::Sqlite(path) => Arc::new(SqliteStore::open(path).await.expect("open sqlite")),
            Db::Postgres { url, schema } => {
                let options = PgConnectOptions::from_str(url)
                    .unwrap()
                    .options([("search_path", schema.as_str())]);
                let pool = PgPoolOptions::new()
                    .max_connections(8)
                    .connect_with(options)
                    .await
                    .unwrap();
                let store = PostgresStore::from_pool(pool);
                store.migrate().await.unwrap();
                Arc::new(store)
            }
            Db::Redis { url, prefix } => Arc::new(
                RedisStore::connect(url)
                    .await
                    .expect("connect to redis")
                    .with_prefix(prefix.as_str()),
            ),
        }
    }

    fn to_env(&self) -> String {
        match self {
            Db::Sqlite(path) => format!("sqlite:{}", path.display()),
            Db::Postgres { url, schema } => format!("postgres:{schema}:{url}"),
            Db::Redis { url, prefix } => format!("redis:{prefix}:{url}"),
        }
    }

    fn from_env(text: &str) -> Db {
        if let Some(path) = text.strip_prefix("sqlite:") {
            return Db::Sqlite(PathBuf::from(path));
        }
        if let Some(rest) = text.strip_prefix("redis:") {
            let (prefix, url) = rest.split_once(':').expect("prefix:url");
            return Db::Redis {
                url: url.into(),
                prefix: prefix.into(),
            };
        }
        let rest = text.strip_prefix("postgres:").expect("db spec");
        let (schema, url) = rest.split_once(':').expect("schema:url");
        Db::Postgres {
            url: url.into(),
            schema: schema.into(),
        }
    }
}

/// A name no other test, process or run uses.
fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000_000
    )
}

fn key() -> TokenKey {
    TokenKey::parse("acme", "alice", "fake").unwrap()
}

fn caller() -> Caller {
    let k = key();
    Caller::new(k.realm, k.subject, "app")
        .with_role("read-token")
        .with_full_client_scope()
}

fn provider_config(
    token_endpoint: url::Url,
    authorization_endpoint: url::Url,
    client_id: &str,
    secret: &str,
) -> OAuth2Config {
    OAuth2Config::new(
        ProviderId::new("fake").unwrap(),
        client_id,
        authorization_endpoint,
        token_endpoint,
        "http://127.0.0.1:9/callback".parse().unwrap(),
    )
    .with_client_secret(Secret::new(secret))
    .with_scopes(Scopes::parse("offline_access"))
}

fn broker(
    config: OAuth2Config,
    store: Arc<dyn TokenStore>,
    clock: Arc<ManualClock>,
) -> TokenBroker {
    TokenBroker::builder()
        .with_oauth2_provider(config, ProviderPolicy::default())
        .with_store(store)
        .with_clock(clock)
        .with_refresh_timeout(Duration::from_secs(5))
        .with_lease_ttl(Duration::from_secs(5) + tokenbroker::LEASE_MARGIN)
        .build()
        .unwrap()
}

async fn start_idp() -> FakeIdp {
    // Rotation and reuse detection on (the defaults): a refresh token presented twice would
    // revoke the grant and show up in the counters.
    FakeIdp::start(FakeIdpConfig::default()).await.unwrap()
}

fn config_for(idp: &FakeIdp) -> OAuth2Config {
    provider_config(
        idp.token_endpoint(),
        idp.authorization_endpoint(),
        idp.client_id(),
        idp.client_secret(),
    )
}

/// Links alice through the first instance and returns the linked access token.
async fn link(idp: &FakeIdp, broker: &TokenBroker) -> String {
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    let outcome = broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
    outcome.tokens.access_token().expose_secret().to_owned()
}

async fn fan_in(db: Db) {
    let idp = start_idp().await;
    let clock = Arc::new(ManualClock::starting_now());
    let mut brokers = Vec::new();
    for _ in 0..INSTANCES {
        brokers.push(broker(config_for(&idp), db.open().await, clock.clone()));
    }
    let linked = link(&idp, &brokers[0]).await;
    // Every instance shares the clock: the token is now expired for all of them.
    clock.advance(Duration::from_secs(3601));

    let mut readers = Vec::new();
    for i in 0..INSTANCES * READERS_PER_INSTANCE {
        let broker = brokers[i % INSTANCES].clone();
        readers.push(tokio::spawn(async move {
            broker.retrieve(&caller(), &key()).await
        }));
    }
    let mut tokens = HashSet::new();
    for reader in readers {
        let read = reader.await.unwrap().expect("every reader gets a token");
        tokens.insert(read.tokens.access_token().expose_secret().to_owned());
    }
    let counters = idp.counters();
    assert_eq!(
        counters.refresh_calls,
        1,
        "one refresh at the IdP for {} readers on {INSTANCES} instances",
        INSTANCES * READERS_PER_INSTANCE
    );
    assert_eq!(
        counters.reuse_detected, 0,
        "no rotated refresh token was presented twice"
    );
    assert_eq!(tokens.len(), 1, "every reader got the same, new token");
    let new = tokens.into_iter().next().unwrap();
    assert_ne!(new, linked);
    assert!(idp.is_active(&new));
    // And what the store holds is that token, for any instance.
    let stored = brokers[INSTANCES - 1]
        .retrieve(&caller(), &key())
        .await
        .unwrap();
    assert_eq!(stored.tokens.access_token().expose_secret(), new);
    assert!(!stored.refreshed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_in_across_instances_on_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    fan_in(Db::Sqlite(dir.path().join("links.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_in_across_instances_on_one_postgres_database() {
    fan_in(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_in_across_instances_on_one_redis() {
    fan_in(Db::redis()).await;
}

/// An instance died holding the refresh lease (before it reached the IdP): the others wait,
/// take the lease over when it expires by the database's clock, refresh once, and lose nothing.
async fn dead_holder(db: Db) {
    let idp = start_idp().await;
    let clock = Arc::new(ManualClock::starting_now());
    let store = db.open().await;
    let survivor = broker(config_for(&idp), db.open().await, clock.clone());
    link(&idp, &survivor).await;
    let dead = LeaseHolder::new("instance-that-crashed");
    let attempt = store
        .try_lease(&key(), &dead, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(matches!(attempt, LeaseAttempt::Acquired(_)));
    drop(store); // never released

    clock.advance(Duration::from_secs(3601));
    let read = survivor
        .retrieve(&caller(), &key())
        .await
        .expect("taken over after the lease TTL");
    assert!(read.refreshed);
    let counters = idp.counters();
    assert_eq!(counters.refresh_calls, 1);
    assert_eq!(counters.reuse_detected, 0);
    assert!(idp.is_active(read.tokens.access_token().expose_secret()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lease_holder_is_taken_over_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    dead_holder(Db::Sqlite(dir.path().join("links.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lease_holder_is_taken_over_on_postgres() {
    dead_holder(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lease_holder_is_taken_over_on_redis() {
    dead_holder(Db::redis()).await;
}

// ---------------------------------------------------------------------------------------------
// Separate OS processes
// ---------------------------------------------------------------------------------------------

const CHILD_ENV: &str = "TOKENBROKER_MULTI_PROCESS_CHILD";
const CHILD_READERS: usize = 50;
const CHILDREN: usize = 3;

/// The child's side: only does something when started by `fan_in_across_processes`.
#[test]
fn multi_process_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(child(spec));
}

/// spec: `db|token_endpoint|authorization_endpoint|client_id|client_secret|go_file|now_unix`
async fn child(spec: String) {
    let parts: Vec<&str> = spec.split('|').collect();
    let db = Db::from_env(parts[0]);
    let config = provider_config(
        parts[1].parse().unwrap(),
        parts[2].parse().unwrap(),
        parts[3],
        parts[4],
    );
    let go = Path::new(parts[5]);
    let now = time::OffsetDateTime::from_unix_timestamp(parts[6].parse().unwrap()).unwrap();
    let broker = broker(config, db.open().await, Arc::new(ManualClock::new(now)));
    println!("READY");
    // Start together, so that the processes really race.
    while !go.exists() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut readers = Vec::new();
    for _ in 0..CHILD_READERS {
        let broker = broker.clone();
        readers.push(tokio::spawn(async move {
            broker.retrieve(&caller(), &key()).await
        }));
    }
    for reader in readers {
        match reader.await.unwrap() {
            Ok(read) => {
                // Only a digest: the token itself must not go to a log.
                use sha2::Digest;
                let digest = sha2::Sha256::digest(read.tokens.access_token().expose_secret());
                println!("TOKEN {:x}", digest);
            }
            Err(e) => println!("ERROR {e}"),
        }
    }
}

async fn fan_in_across_processes(db: Db) {
    let idp = start_idp().await;
    let clock = Arc::new(ManualClock::starting_now());
    let parent = broker(config_for(&idp), db.open().await, clock.clone());
    link(&idp, &parent).await;
    let later = clock.now() + Duration::from_secs(3601);

    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let spec = [
        db.to_env(),
        idp.token_endpoint().to_string(),
        idp.authorization_endpoint().to_string(),
        idp.client_id().to_owned(),
        idp.client_secret().to_owned(),
        go.display().to_string(),
        later.unix_timestamp().to_string(),
    ]
    .join("|");
    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    for _ in 0..CHILDREN {
        let child = tokio::process::Command::new(&exe)
            .args([
                "--exact",
                "multi_process_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &spec)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        children.push(child);
    }
    // Wait until every child has its broker, then let them go at once.
    let mut outputs = Vec::new();
    let mut stdouts = Vec::new();
    for child in &mut children {
        use tokio::io::AsyncBufReadExt;
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("child exited before READY");
            if line.contains("READY") {
                break;
            }
        }
        stdouts.push(lines);
    }
    // A slow IdP keeps the one refresh in flight while the other processes arrive.
    idp.set_token_delay(Some(Duration::from_millis(300)));
    std::fs::write(&go, b"go").unwrap();
    for (child, mut lines) in children.into_iter().zip(stdouts) {
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.push(line);
        }
        let output = child.wait_with_output().await.unwrap();
        assert!(
            output.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push(seen);
    }
    let mut digests = HashSet::new();
    let mut reads = 0;
    for lines in &outputs {
        for line in lines {
            assert!(!line.starts_with("ERROR"), "a reader failed: {line}");
            if let Some(d) = line.strip_prefix("TOKEN ") {
                digests.insert(d.to_owned());
                reads += 1;
            }
        }
    }
    assert_eq!(
        reads,
        CHILDREN * CHILD_READERS,
        "every reader in every process answered"
    );
    let counters = idp.counters();
    assert_eq!(
        counters.refresh_calls, 1,
        "one refresh at the IdP across {CHILDREN} processes"
    );
    assert_eq!(counters.reuse_detected, 0);
    assert_eq!(digests.len(), 1, "all processes got the same new token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_across_processes_on_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    fan_in_across_processes(Db::Sqlite(dir.path().join("links.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_across_processes_on_one_postgres_database() {
    fan_in_across_processes(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_in_across_processes_on_one_redis() {
    fan_in_across_processes(Db::redis()).await;
}

// An unlink killed between its delete and its revocation
// ---------------------------------------------------------------------------------------------

const UNLINK_CHILD_ENV: &str = "TOKENBROKER_UNLINK_CHILD";

/// The child's side of `a_killed_unlink_is_finished_by_another_process`: unlinks alice against
/// a revocation endpoint that never answers, and is killed while it waits.
#[test]
fn unlink_child() {
    let Ok(spec) = std::env::var(UNLINK_CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        // spec: `db|token_endpoint|authorization_endpoint|client_id|client_secret|revocation`
        let parts: Vec<&str> = spec.split('|').collect();
        let config = provider_config(
            parts[1].parse().unwrap(),
            parts[2].parse().unwrap(),
            parts[3],
            parts[4],
        )
        .with_revocation_endpoint(parts[5].parse().unwrap());
        let store = Db::from_env(parts[0]).open().await;
        let broker = broker(config, store, Arc::new(ManualClock::starting_now()));
        println!("READY");
        let outcome = broker.unlink(&key()).await;
        // Not reached: the parent kills this process while the revocation hangs.
        println!("DONE {outcome:?}");
    });
}

/// A process killed after its unlink deleted the link, before the provider answered the
/// revocation: the revocation it owed is in the store's outbox, and another process's drain
/// revokes the grant. Without the outbox, the grant would stay alive upstream with no record
/// left to retry from.
async fn a_killed_unlink_is_finished_by_another_process(db: Db) {
    let idp = start_idp().await;
    let clock = Arc::new(ManualClock::starting_now());
    let store = db.open().await;
    let survivor = broker(
        config_for(&idp).with_revocation_endpoint(idp.revocation_endpoint()),
        store.clone(),
        clock.clone(),
    );
    let access_token = link(&idp, &survivor).await;

    // Accepts connections (the kernel's backlog does) and never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = [
        db.to_env(),
        idp.token_endpoint().to_string(),
        idp.authorization_endpoint().to_string(),
        idp.client_id().to_owned(),
        idp.client_secret().to_owned(),
        format!("http://{}/revoke", black_hole.local_addr().unwrap()),
    ]
    .join("|");
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "unlink_child", "--nocapture", "--test-threads=1"])
        .env(UNLINK_CHILD_ENV, &spec)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Kill it as soon as the link is gone from the store: it is then waiting on the revocation.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.load(&key()).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the child never deleted the link"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().await.unwrap();
    let output = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("DONE"),
        "the child finished its unlink before it was killed: {stdout}"
    );
    assert!(
        idp.is_active(&access_token),
        "the grant was revoked before the kill"
    );
    assert_eq!(idp.counters().revocations, 0);

    // The entry is the child's until its claim runs out; then any instance may drain it.
    let early = survivor
        .drain_revocations(tokenbroker::DrainOptions::default())
        .await
        .unwrap();
    assert_eq!(early.claimed, 0, "the dead child's claim was taken early");
    clock.advance(Duration::from_secs(600));
    let report = survivor
        .drain_revocations(tokenbroker::DrainOptions::default())
        .await
        .unwrap();
    assert_eq!((report.claimed, report.revoked), (1, 1), "{report:?}");
    assert!(
        !idp.is_active(&access_token),
        "the grant is still alive upstream"
    );
    assert_eq!(idp.counters().revocations, 1);
    let again = survivor
        .drain_revocations(tokenbroker::DrainOptions::default())
        .await
        .unwrap();
    assert_eq!(again.claimed, 0, "a settled revocation was claimed again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_unlink_is_finished_by_another_process_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    a_killed_unlink_is_finished_by_another_process(Db::Sqlite(dir.path().join("links.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_unlink_is_finished_by_another_process_on_postgres() {
    a_killed_unlink_is_finished_by_another_process(Db::postgres().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_unlink_is_finished_by_another_process_on_redis() {
    a_killed_unlink_is_finished_by_another_process(Db::redis()).await;
}
