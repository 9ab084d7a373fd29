//! Every upstream fault the FakeIdp can produce, crossed with every store: the typed error,
//! the emitted event, and the stored record (unchanged, or marked relink-required exactly for
//! a dead grant). Then store faults: a SQLite file locked by another connection; PostgreSQL and
//! Redis going away and coming back (through a loopback proxy we cut), before a refresh and
//! after the IdP rotated the refresh token; and a Redis server killed and started again.
//!
//! Needs `TOKENBROKER_TEST_POSTGRES_URL`, `TOKENBROKER_TEST_REDIS_URL` and `redis-server` on
//! `PATH` (scripts/test.sh starts and installs them).

#![cfg(all(feature = "sqlite", feature = "postgres", feature = "encryption"))]

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::provider::OAuth2Config;
use tokenbroker::store::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokenbroker::store::sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions,
};
use tokenbroker::store::sqlx::{self, AssertSqlSafe, Connection};
use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring, StoredRecord};
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, Fault, ManualClock};
use tokenbroker::{
    BrokerEvent, Callback, Caller, Error, EventSink, LoginOptions, MemoryStore, PostgresStore,
    ProviderError, ProviderId, ProviderPolicy, RedisStore, Scopes, Secret, SqliteStore, StoreError,
    TokenBroker, TokenKey, TokenStore,
};

const REFRESH_TIMEOUT: Duration = Duration::from_millis(500);

/// Records every event the broker emits.
#[derive(Debug, Default)]
struct Events(Mutex<Vec<BrokerEvent>>);

impl EventSink for Events {
    fn emit(&self, event: &BrokerEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

impl Events {
    fn take(&self) -> Vec<BrokerEvent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn redis_url() -> String {
    std::env::var("TOKENBROKER_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("TOKENBROKER_TEST_REDIS_URL is not set: run scripts/test.sh, which starts Redis")
    })
}

/// A Redis store under a prefix of its own.
async fn redis_store(url: &str) -> RedisStore {
    RedisStore::connect(url)
        .await
        .expect("connect to the test Redis")
        .with_prefix(format!("fm_{}", unique()))
}

fn unique() -> String {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

fn postgres_url() -> String {
    std::env::var("TOKENBROKER_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "TOKENBROKER_TEST_POSTGRES_URL is not set: run scripts/test.sh, or \
             eval \"$(bash scripts/setup-postgres.sh)\" first"
        )
    })
}

/// A PostgreSQL store in a schema of its own, reached at `url`.
async fn postgres_store(url: &str, schema: Option<&str>) -> (PostgresStore, String) {
    let schema = match schema {
        Some(s) => s.to_owned(),
        None => {
            let schema = format!("fm_{}", unique());
            let admin = PgPool::connect(url)
                .await
                .expect("connect to the test server");
            sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
            schema
        }
    };
    let options = PgConnectOptions::from_str(url)
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(options)
        .await
        .unwrap();
    let store = PostgresStore::from_pool(pool);
    store.migrate().await.unwrap();
    (store, schema)
}

#[derive(Debug, Clone, Copy)]
enum StoreKind {
    Memory,
    Sqlite,
    Postgres,
    Redis,
    EncryptedMemory,
}

struct World {
    idp: FakeIdp,
    clock: Arc<ManualClock>,
    store: Arc<dyn TokenStore>,
    events: Arc<Events>,
    broker: TokenBroker,
    _dir: tempfile::TempDir,
}

fn provider_config(idp: &FakeIdp, token_endpoint: url::Url) -> OAuth2Config {
    OAuth2Config::new(
        ProviderId::new("fake").unwrap(),
        idp.client_id(),
        idp.authorization_endpoint(),
        token_endpoint,
        "http://127.0.0.1:9/callback".parse().unwrap(),
    )
    .with_client_secret(Secret::new(idp.client_secret()))
    .with_scopes(Scopes::parse("offline_access"))
}

fn broker_with(
    config: OAuth2Config,
    store: Arc<dyn TokenStore>,
    clock: Arc<ManualClock>,
    events: Arc<Events>,
) -> TokenBroker {
    TokenBroker::builder()
        .with_oauth2_provider(config, ProviderPolicy::default())
        .with_store(store)
        .with_clock(clock)
        .with_event_sink(events)
        .with_refresh_timeout(REFRESH_TIMEOUT)
        .with_lease_ttl(REFRESH_TIMEOUT + tokenbroker::LEASE_MARGIN)
        .build()
        .unwrap()
}

impl World {
    /// A world over a store of the test's own (for the store-fault tests).
    async fn over(store: Arc<dyn TokenStore>) -> World {
        let idp = FakeIdp::start(FakeIdpConfig::default().with_id_token(false))
            .await
            .unwrap();
        let clock = Arc::new(ManualClock::starting_now());
        World::assemble(idp, clock, store, tempfile::tempdir().unwrap())
    }

    fn assemble(
        idp: FakeIdp,
        clock: Arc<ManualClock>,
        store: Arc<dyn TokenStore>,
        dir: tempfile::TempDir,
    ) -> World {
        let events = Arc::new(Events::default());
        let broker = broker_with(
            provider_config(&idp, idp.token_endpoint()),
            store.clone(),
            clock.clone(),
            events.clone(),
        );
        World {
            idp,
            clock,
            store,
            events,
            broker,
            _dir: dir,
        }
    }

    async fn new(kind: StoreKind) -> World {
        let idp = FakeIdp::start(FakeIdpConfig::default().with_id_token(false))
            .await
            .unwrap();
        let clock = Arc::new(ManualClock::starting_now());
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn TokenStore> = match kind {
            StoreKind::Memory => Arc::new(MemoryStore::with_clock(clock.clone())),
            StoreKind::Sqlite => Arc::new(
                SqliteStore::open(dir.path().join("links.db"))
                    .await
                    .unwrap(),
            ),
            StoreKind::Postgres => Arc::new(postgres_store(&postgres_url(), None).await.0),
            StoreKind::Redis => Arc::new(redis_store(&redis_url()).await),
            StoreKind::EncryptedMemory => Arc::new(EncryptedStore::new(
                MemoryStore::with_clock(clock.clone()),
                Arc::new(StaticKeyring::new(KeyId::new("k1").unwrap(), [7; 32])),
            )),
        };
        World::assemble(idp, clock, store, dir)
    }

    async fn link(&self, key: &TokenKey) {
        let start = self
            .broker
            .begin_login(key, LoginOptions::default())
            .await
            .unwrap();
        let cb = self
            .idp
            .authorize(&start.authorization_url, key.subject.as_str())
            .unwrap();
        self.broker
            .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
            .await
            .unwrap();
    }

    async fn load(&self, key: &TokenKey) -> StoredRecord {
        self.store.load(key).await.unwrap().expect("record present")
    }
}

fn caller(key: &TokenKey) -> Caller {
    Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope()
}

/// What a fault must lead to.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// `Error::Unavailable` (with this `Retry-After`, when given), a `TransientFailure`
    /// event with this HTTP status, the record untouched, and recovery afterwards. With
    /// `timed_out`, the error must come from the broker's refresh time-out (not, say, from the
    /// IdP closing the connection later on).
    Transient {
        status: Option<u16>,
        retry_after: Option<u64>,
        timed_out: bool,
    },
    /// `Error::Provider` with `InvalidClient`, a `TransientFailure` event, the record untouched.
    InvalidClient,
    /// `Error::RelinkRequired`, a `RelinkRequired` event, the record marked relink-required
    /// with the same payload, and no further call to the IdP.
    Relink,
}

struct Case {
    name: &'static str,
    /// `None`: the provider points at a closed port (connection refused).
    fault: Option<Fault>,
    expect: Expect,
}

fn cases() -> Vec<Case> {
    let html = "<html><body><h1>Bad Gateway</h1></body></html>".to_owned();
    let status = |status: u16, body: &str, retry_after: Option<u64>| Fault::Status {
        status,
        body: body.to_owned(),
        retry_after,
    };
    let transient = |status: Option<u16>| Expect::Transient {
        status,
        retry_after: None,
        timed_out: false,
    };
    let timed_out = Expect::Transient {
        status: None,
        retry_after: None,
        timed_out: true,
    };
    vec![
        Case {
            name: "connection refused",
            fault: None,
            expect: transient(None),
        },
        Case {
            name: "time-out (delay beyond the refresh time-out)",
            fault: Some(Fault::Delay(REFRESH_TIMEOUT * 4)),
            expect: timed_out,
        },
        // Status and headers at once, then a body that does not complete within the refresh
        // time-out: the time-out must bound the body read too. Either body is cut (never
        // completed) by the fake only well after the time-out, so an unbounded read would
        // fail with another reason.
        Case {
            // 8 bytes every 100 ms: never idle for long, cut only after about 2 s.
            name: "slow body (dribbled past the refresh time-out)",
            fault: Some(Fault::SlowBody {
                chunk_len: 8,
                pause: REFRESH_TIMEOUT / 5,
            }),
            expect: timed_out,
        },
        Case {
            name: "slow body (stalls mid-body past the refresh time-out)",
            fault: Some(Fault::SlowBody {
                chunk_len: usize::MAX,
                pause: REFRESH_TIMEOUT * 4,
            }),
            expect: timed_out,
        },
        Case {
            name: "connection dropped",
            fault: Some(Fault::DropConnection),
            expect: transient(None),
        },
        Case {
            name: "429 with Retry-After",
            fault: Some(status(429, "{}", Some(9))),
            expect: Expect::Transient {
                status: Some(429),
                retry_after: Some(9),
                timed_out: false,
            },
        },
        Case {
            name: "500",
            fault: Some(status(500, "", None)),
            expect: transient(Some(500)),
        },
        Case {
            name: "503 with Retry-After",
            fault: Some(status(503, &html, Some(7))),
            expect: Expect::Transient {
                status: Some(503),
                retry_after: Some(7),
                timed_out: false,
            },
        },
        Case {
            name: "garbage 200",
            fault: Some(Fault::GarbageBody),
            expect: transient(Some(200)),
        },
        Case {
            name: "HTML error page (400)",
            fault: Some(status(400, &html, None)),
            expect: transient(Some(400)),
        },
        Case {
            name: "truncated JSON",
            fault: Some(Fault::TruncatedJson),
            expect: transient(Some(200)),
        },
        Case {
            name: "invalid_grant",
            fault: Some(Fault::InvalidGrant),
            expect: Expect::Relink,
        },
        Case {
            name: "invalid_client",
            fault: Some(status(401, r#"{"error":"invalid_client"}"#, None)),
            expect: Expect::InvalidClient,
        },
        Case {
            name: "GitHub 200 with bad_refresh_token",
            fault: Some(Fault::ErrorWith200 {
                error: "bad_refresh_token".into(),
            }),
            expect: Expect::Relink,
        },
        Case {
            name: "GitHub 200 with temporarily_unavailable",
            fault: Some(Fault::ErrorWith200 {
                error: "temporarily_unavailable".into(),
            }),
            expect: transient(Some(200)),
        },
    ]
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn matrix(kind: StoreKind) {
    let w = World::new(kind).await;
    let refused_url: url::Url = format!("http://127.0.0.1:{}/token", closed_port())
        .parse()
        .unwrap();
    let refused = broker_with(
        provider_config(&w.idp, refused_url),
        w.store.clone(),
        w.clock.clone(),
        w.events.clone(),
    );
    for (i, case) in cases().into_iter().enumerate() {
        let name = format!("{kind:?} / {}", case.name);
        let key = TokenKey::parse("acme", &format!("user-{i}"), "fake").unwrap();
        w.link(&key).await;
        w.clock.advance(Duration::from_secs(3601));
        let before = w.load(&key).await;
        let calls_before = w.idp.counters().refresh_calls;
        w.events.take();

        let broker = match &case.fault {
            Some(fault) => {
                w.idp.inject(fault.clone());
                &w.broker
            }
            None => &refused,
        };
        let err = broker.retrieve(&caller(&key), &key).await.unwrap_err();
        let events = w.events.take();
        let after = w.load(&key).await;
        assert_eq!(
            w.idp.pending_faults(),
            0,
            "{name}: the fault was not consumed"
        );
        assert_eq!(
            after.record.payload.expose_secret(),
            before.record.payload.expose_secret(),
            "{name}: payload changed"
        );

        match case.expect {
            Expect::Transient {
                status,
                retry_after,
                timed_out,
            } => {
                match &err {
                    Error::Unavailable {
                        retry_after: got,
                        source,
                        ..
                    } => {
                        if let Some(secs) = retry_after {
                            assert_eq!(*got, Some(Duration::from_secs(secs)), "{name}");
                        }
                        if timed_out {
                            assert!(
                                matches!(
                                    source,
                                    Some(ProviderError::Transient {
                                        status: None,
                                        reason: Some(reason),
                                        source: None,
                                        ..
                                    }) if reason == "timed out"
                                ),
                                "{name}: not the refresh time-out: {source:?}"
                            );
                        }
                    }
                    other => panic!("{name}: expected Error::Unavailable, got {other:?}"),
                }
                assert!(
                    matches!(
                        events.as_slice(),
                        [BrokerEvent::TransientFailure { key: k, status: s, served_stale: false, .. }]
                            if *k == key && *s == status
                    ),
                    "{name}: events {events:?}"
                );
            }
            Expect::InvalidClient => {
                assert!(
                    matches!(
                        &err,
                        Error::Provider {
                            source: ProviderError::InvalidClient { .. },
                            ..
                        }
                    ),
                    "{name}: {err:?}"
                );
                assert!(
                    matches!(
                        events.as_slice(),
                        [BrokerEvent::TransientFailure {
                            served_stale: false,
                            ..
                        }]
                    ),
                    "{name}: events {events:?}"
                );
            }
            Expect::Relink => {
                assert!(
                    matches!(&err, Error::RelinkRequired { key: k, .. } if *k == key),
                    "{name}: {err:?}"
                );
                assert!(
                    matches!(events.as_slice(), [BrokerEvent::RelinkRequired { key: k, .. }] if *k == key),
                    "{name}: events {events:?}"
                );
                assert!(
                    after.record.meta.state.is_relink_required(),
                    "{name}: not marked relink-required"
                );
                assert_ne!(after.version, before.version, "{name}: mark not written");
                // Sticky, and the IdP is not asked again.
                w.clock.advance(Duration::from_secs(120));
                let again = w.broker.retrieve(&caller(&key), &key).await.unwrap_err();
                assert!(matches!(again, Error::RelinkRequired { .. }), "{name}");
                assert_eq!(
                    w.idp.counters().refresh_calls,
                    calls_before + 1,
                    "{name}: the IdP was asked again"
                );
                continue;
            }
        }
        // Everything but a dead grant leaves the record exactly as it was...
        assert_eq!(after.version, before.version, "{name}: record rewritten");
        assert_eq!(
            after.record.meta, before.record.meta,
            "{name}: meta changed"
        );
        assert!(!after.record.meta.state.is_relink_required(), "{name}");
        // ... and the next read after the back-off refreshes.
        w.clock.advance(Duration::from_secs(120));
        let got = w
            .broker
            .retrieve(&caller(&key), &key)
            .await
            .unwrap_or_else(|e| panic!("{name}: no recovery: {e:?}"));
        assert!(got.refreshed && !got.stale, "{name}: {got:?}");
        assert!(
            w.events
                .take()
                .iter()
                .any(|e| matches!(e, BrokerEvent::Refreshed { .. })),
            "{name}"
        );
    }
    let c = w.idp.counters();
    assert_eq!(
        c.reuse_detected, 0,
        "{kind:?}: a refresh token was presented twice"
    );
    w.idp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_with_memory_store() {
    matrix(StoreKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_with_sqlite_store() {
    matrix(StoreKind::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_with_postgres_store() {
    matrix(StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_with_redis_store() {
    matrix(StoreKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_faults_with_encrypted_store() {
    matrix(StoreKind::EncryptedMemory).await;
}

// ---------------------------------------------------------------------------------------------
// Store faults

fn assert_store_error(err: &Error, what: &str) {
    assert!(
        matches!(err, Error::Store(StoreError::Backend { .. })),
        "{what}: expected Error::Store(Backend), got {err:?}"
    );
    // Clear enough to act on, and no token in it.
    let text = err.to_string();
    assert!(text.contains("store"), "{what}: {text}");
}

/// A second connection holds SQLite's write lock (BEGIN EXCLUSIVE) while the token is due:
/// the read fails with `Error::Store` once the busy timeout runs out, the IdP is not called,
/// nothing is lost, and the next read after the lock is released refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_by_another_connection() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("links.db");
    // The broker's pool, with a short busy timeout so that the test does not wait 5 s.
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let store = SqliteStore::from_pool(pool);
    store.migrate().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(store);

    let idp = FakeIdp::start(FakeIdpConfig::default().with_id_token(false))
        .await
        .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let events = Arc::new(Events::default());
    let broker = broker_with(
        provider_config(&idp, idp.token_endpoint()),
        store.clone(),
        clock.clone(),
        events.clone(),
    );
    let w = World {
        idp,
        clock,
        store,
        events,
        broker,
        _dir: tempfile::tempdir().unwrap(),
    };
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    w.link(&key).await;
    w.clock.advance(Duration::from_secs(3601));
    let before = w.load(&key).await;

    let mut locker = sqlx::SqliteConnection::connect_with(
        &SqliteConnectOptions::new()
            .filename(&path)
            .busy_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();

    let err = w.broker.retrieve(&caller(&key), &key).await.unwrap_err();
    assert_store_error(&err, "locked sqlite");
    assert_eq!(w.idp.counters().refresh_calls, 0, "the IdP was called");

    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let after = w.load(&key).await;
    assert_eq!(after.version, before.version);
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret()
    );
    let got = w.broker.retrieve(&caller(&key), &key).await.unwrap();
    assert!(got.refreshed && !got.stale);

    // The lock taken while the IdP answers: the write of the rotated token waits and retries
    // (it must not be lost), and succeeds once the lock is gone.
    w.clock.advance(Duration::from_secs(3601));
    w.idp.inject(Fault::Delay(Duration::from_millis(300)));
    let reader = {
        let broker = w.broker.clone();
        let key = key.clone();
        tokio::spawn(async move { broker.retrieve(&caller(&key), &key).await })
    };
    // The fault is taken when the refresh request arrives: the lease is held by then.
    let waiting = tokio::time::Instant::now();
    while w.idp.pending_faults() > 0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "no refresh request"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut locker)
        .await
        .unwrap();
    // Held past the IdP's answer and the first write attempt's busy timeout.
    tokio::time::sleep(Duration::from_millis(700)).await;
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let got = reader.await.unwrap().expect("the rotated token was stored");
    assert!(got.refreshed && !got.stale);
    let stored = w.load(&key).await;
    let set = tokenbroker::TokenSet::from_payload(&stored.record.payload).unwrap();
    assert!(
        w.idp
            .is_active(set.refresh_token().unwrap().expose_secret()),
        "the stored refresh token is the live one"
    );
    assert_eq!(w.idp.counters().reuse_detected, 0);
}

/// A TCP proxy on loopback in front of PostgreSQL that can be cut (every connection
/// closed, new ones refused) and restored: the server "goes away" and "comes back".
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = {
            let (up, conns) = (up.clone(), conns.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if !up.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    conns.lock().unwrap().push(task.abort_handle());
                }
            })
        };
        Proxy {
            port,
            up,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// `url` with its port moved to this proxy's.
    fn url_for(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// PostgreSQL unreachable (through a loopback proxy we cut), then back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_unreachable_and_back() {
    let url = postgres_url();
    let proxy = Proxy::start(socket_of(&url, 5432)).await;
    let (_, schema) = postgres_store(&url, None).await;
    let (store, _) = postgres_store(&proxy.url_for(&url), Some(&schema)).await;
    store_unreachable_and_back(World::over(Arc::new(store)).await, &proxy).await;
}

/// The same with Redis cut off: the `ConnectionManager` reconnects on its own once the server
/// is reachable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_and_back() {
    let proxy = Proxy::start(socket_of(&redis_url(), 6379)).await;
    let store: Arc<dyn TokenStore> = Arc::new(redis_store(&proxy.url_for(&redis_url())).await);
    store_unreachable_and_back(World::over(store).await, &proxy).await;
}

/// The store is unreachable: fresh reads and due refreshes alike fail with a clear store error
/// and the IdP is not called. It is back: nothing was lost, and the client reconnects on its
/// own.
async fn store_unreachable_and_back(w: World, proxy: &Proxy) {
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    w.link(&key).await;
    let before = w.load(&key).await;

    proxy.cut();
    let err = w.broker.retrieve(&caller(&key), &key).await.unwrap_err();
    assert_store_error(&err, "store gone (fresh token)");
    w.clock.advance(Duration::from_secs(3601));
    let err = w.broker.retrieve(&caller(&key), &key).await.unwrap_err();
    assert_store_error(&err, "store gone (due refresh)");
    assert_eq!(w.idp.counters().refresh_calls, 0, "the IdP was called");

    proxy.restore();
    let after = w.load(&key).await;
    assert_eq!(after.version, before.version);
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret()
    );
    let got = w.broker.retrieve(&caller(&key), &key).await.unwrap();
    assert!(got.refreshed && !got.stale);
    assert_eq!(w.idp.counters().reuse_detected, 0);
}

/// PostgreSQL goes away *after* the IdP rotated the refresh token, and comes back while the
/// broker still holds its refresh lease. The rotated token exists only in the pending write:
/// before the fix the broker gave up after three quick retries (~0.7 s plus the pool's
/// time-outs), the record kept the retired token, and the next refresh presented a spent
/// token (reuse detection revoked the grant: the link was lost). Now the write is retried for
/// as long as the lease keeps other instances away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_gone_during_rotation_and_back_within_the_lease() {
    let url = postgres_url();
    let proxy = Proxy::start(socket_of(&url, 5432)).await;
    let (_, schema) = postgres_store(&url, None).await;
    let (store, _) = postgres_store(&proxy.url_for(&url), Some(&schema)).await;
    let w = World::over(Arc::new(store)).await;
    gone_during_rotation_and_back_within_the_lease(&w, async {
        proxy.cut();
        // Down for longer than the old retries lasted, shorter than the lease (5.5 s here).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        proxy.restore();
    })
    .await;
}

/// The same with Redis cut off after the rotation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_gone_during_rotation_and_back_within_the_lease() {
    let proxy = Proxy::start(socket_of(&redis_url(), 6379)).await;
    let store: Arc<dyn TokenStore> = Arc::new(redis_store(&proxy.url_for(&redis_url())).await);
    let w = World::over(store).await;
    gone_during_rotation_and_back_within_the_lease(&w, async {
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        proxy.restore();
    })
    .await;
}

/// Redis itself **stopped and started again** after the IdP rotated the refresh token: the
/// test's own `redis-server` (append-only file, fsync on every write, as a deployment that
/// keeps tokens in Redis must run it) is killed with SIGKILL and restarted on the same port and
/// data directory within the lease. The link, its lease and its fence come back from the file,
/// and the rotated token is written once the server answers again. (Without the append-only
/// file the link is gone after the restart and this test fails: the broker then answers
/// `NotFound` rather than writing the tokens back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_during_rotation_keeps_the_rotated_token() {
    let mut server = OwnRedis::start().await;
    let store: Arc<dyn TokenStore> = Arc::new(redis_store(&server.url()).await);
    let w = World::over(store).await;
    gone_during_rotation_and_back_within_the_lease(&w, async {
        server.kill();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        server.start_again().await;
    })
    .await;
    assert_eq!(server.starts, 2, "the server was not restarted");
}

/// Links a user, lets a refresh reach the IdP (which rotates the refresh token and answers
/// 300 ms later), runs `outage` on the store meanwhile, and checks that the rotated token was
/// written once the store was back, and that the next refresh presents it (no reuse).
async fn gone_during_rotation_and_back_within_the_lease(
    w: &World,
    outage: impl std::future::Future<Output = ()>,
) {
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    w.link(&key).await;
    w.clock.advance(Duration::from_secs(3601));

    w.idp.inject(Fault::Delay(Duration::from_millis(300)));
    let reader = {
        let broker = w.broker.clone();
        let key = key.clone();
        tokio::spawn(async move { broker.retrieve(&caller(&key), &key).await })
    };
    let waiting = tokio::time::Instant::now();
    while w.idp.pending_faults() > 0 {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "no refresh request"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    outage.await;
    let first = reader.await.unwrap();
    assert_eq!(w.idp.counters().refresh_successes, 1, "the IdP rotated");
    let first = first.expect("the rotated token was written once the store was back");
    assert!(first.refreshed && !first.stale);
    let stored = w.load(&key).await;
    let set = tokenbroker::TokenSet::from_payload(&stored.record.payload).unwrap();
    assert!(
        w.idp
            .is_active(set.refresh_token().unwrap().expose_secret())
    );

    w.clock.advance(Duration::from_secs(3601));
    let again = w.broker.retrieve(&caller(&key), &key).await;
    assert_eq!(
        w.idp.counters().reuse_detected,
        0,
        "the spent refresh token was presented again: {again:?}"
    );
    assert!(again.is_ok(), "the link survived the outage: {again:?}");
}

/// The host and port of a server URL.
fn socket_of(url: &str, default_port: u16) -> std::net::SocketAddr {
    let url = url::Url::parse(url).unwrap();
    format!(
        "{}:{}",
        url.host_str().unwrap(),
        url.port().unwrap_or(default_port)
    )
    .parse()
    .unwrap()
}

/// A `redis-server` of one test's own, on a free loopback port, persisting every write to an
/// append-only file in a throwaway directory, so that it can be killed and started again with
/// its data. (`scripts/setup-redis.sh` installs the server.)
struct OwnRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    starts: u32,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = OwnRedis {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
            starts: 0,
        };
        server.start_again().await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn start_again(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .args(["--maxmemory-policy", "noeviction"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/setup-redis.sh installs it)");
        self.child = Some(child);
        self.starts += 1;
        let started = tokio::time::Instant::now();
        while !self.answers_ping().await {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "redis-server did not answer on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the server answers `PING` with `PONG` (not `-LOADING` while it reads its file).
    async fn answers_ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if conn.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut answer = [0u8; 7];
        matches!(conn.read(&mut answer).await, Ok(n) if answer[..n].starts_with(b"+PONG"))
    }

    /// SIGKILL: no shutdown, no last save; what the file holds is what was acknowledged.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
