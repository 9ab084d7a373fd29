//! `RedisStore` against a real server. Each test works under a key prefix of its own, so tests
//! run in parallel on one server; "two stores" are two connection managers on that prefix, as
//! two app instances would have.
//!
//! The server's URL comes from `TOKENBROKER_TEST_REDIS_URL` (eval "$(scripts/setup-redis.sh)"
//! starts one). The fail-over test starts servers of its own with the same `redis-server`.
#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokenbroker::store::redis::{self, AsyncCommands};
use tokenbroker::store::{LeaseAttempt, LeaseHolder, LinkState, Record, RecordMeta, StoreError};
use tokenbroker::{Payload, RedisStore, TokenKey, TokenStore};

fn key(realm: &str, subject: &str, provider: &str) -> TokenKey {
    TokenKey::parse(realm, subject, provider).unwrap()
}

fn active(secret: &str) -> Record {
    let now = OffsetDateTime::now_utc();
    let now = now
        .replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap();
    Record::new(
        Payload::new(secret.as_bytes().to_vec()),
        RecordMeta::new(
            LinkState::Active,
            Some(now + Duration::from_secs(600)),
            now - Duration::from_secs(3600),
            now,
        ),
    )
}

fn is_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::Conflict { .. }))
}

fn server_url() -> String {
    std::env::var("TOKENBROKER_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "TOKENBROKER_TEST_REDIS_URL is not set: run scripts/test.sh, which starts Redis \
             (or eval \"$(scripts/setup-redis.sh)\" and export it yourself)"
        )
    })
}

/// A prefix no other test, process or run uses.
fn unique_prefix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "tbtest-{}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000_000
    )
}

async fn open(prefix: &str) -> RedisStore {
    RedisStore::connect(&server_url())
        .await
        .expect("connect to the test server")
        .with_prefix(prefix)
}

async fn fresh() -> RedisStore {
    open(&unique_prefix()).await
}

async fn pair() -> [Arc<dyn TokenStore>; 2] {
    let prefix = unique_prefix();
    [Arc::new(open(&prefix).await), Arc::new(open(&prefix).await)]
}

/// The whole conformance suite, one test per check, each on its own prefix.
mod conformance {
    use std::sync::Arc;
    use tokenbroker::TokenStore;

    tokenbroker::store_conformance_tests!(async {
        Arc::new(super::fresh().await) as Arc<dyn TokenStore>
    });
}

/// `run_all` twice on one shared store: the checks coexist with each other's data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_twice_on_one_store() {
    let store: Arc<dyn TokenStore> = Arc::new(fresh().await);
    tokenbroker::testing::store_conformance::run_all(&store).await;
    tokenbroker::testing::store_conformance::run_all(&store).await;
}

/// Two instances (two connection managers) race for one lease: exactly one wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_race_between_two_instances() {
    let stores = pair().await;
    let k = key("acme", "alice", "google");
    stores[0].insert(&k, &active("x")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let store = stores[i % 2].clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            store
                .try_lease(
                    &k,
                    &LeaseHolder::new(format!("h{i}")),
                    Duration::from_secs(30),
                )
                .await
                .unwrap()
        }));
    }
    let mut won = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), LeaseAttempt::Acquired(_)) {
            won += 1;
        }
    }
    assert_eq!(won, 1, "one holder among 64 takers on two instances");
}

/// A key deleted and inserted again, through either instance, never gets a version it had:
/// the counter is per store, not per key.
#[tokio::test]
async fn versions_never_repeat_across_delete_and_reinsert() {
    let [a, b] = pair().await;
    let k = key("acme", "alice", "google");
    let mut seen = HashSet::new();
    for round in 0..5 {
        let store = if round % 2 == 0 { &a } else { &b };
        let v1 = store.insert(&k, &active("one")).await.unwrap();
        let v2 = store
            .compare_and_swap(&k, v1.clone(), &active("two"), None)
            .await
            .unwrap();
        assert!(seen.insert(v1.clone()), "version {v1} came back");
        assert!(seen.insert(v2.clone()), "version {v2} came back");
        assert!(v2.number() > v1.number(), "the counter went back");
        // A stale version from the previous life of the key must not delete the new one.
        if round > 0 {
            assert!(is_conflict(store.delete(&k, Some(v1.clone())).await));
        }
        assert!(store.delete(&k, Some(v2.clone())).await.unwrap());
        assert!(store.load(&k).await.unwrap().is_none());
        assert!(store.list(&k.realm, &k.subject).await.unwrap().is_empty());
        assert!(store.scan(None, 10).await.unwrap().links.is_empty());
    }
}

/// A lease is judged by Redis' clock: its expiry is the server's `TIME` plus the TTL, it keeps
/// others out until then, and anyone may take it after.
#[tokio::test]
async fn lease_expires_by_the_servers_clock() {
    let store = fresh().await;
    let k = key("acme", "alice", "google");
    store.insert(&k, &active("x")).await.unwrap();

    let mut conn = redis::Client::open(server_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let server_before = secs * 1000 + micros / 1000;
    let ttl = Duration::from_millis(700);
    let LeaseAttempt::Acquired(lease) = store
        .try_lease(&k, &LeaseHolder::new("a"), ttl)
        .await
        .unwrap()
    else {
        panic!("lease on a fresh link")
    };
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let server_after = secs * 1000 + micros / 1000;
    let until = (lease.expires_at.unix_timestamp_nanos() / 1_000_000) as i64;
    assert!(
        (server_before + 700..=server_after + 700).contains(&until),
        "expiry {until} is not the server's clock ({server_before}..{server_after}) + 700 ms"
    );
    // What the hash holds is the same instant.
    let stored: i64 = conn
        .hget(
            format!("{{{}}}:link:acme:alice:google", store.prefix()),
            "lease_expires_at",
        )
        .await
        .unwrap();
    assert_eq!(stored, until);

    let b = LeaseHolder::new("b");
    assert_eq!(
        store.try_lease(&k, &b, ttl).await.unwrap(),
        LeaseAttempt::Busy
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.try_lease(&k, &b, ttl).await.unwrap() {
            LeaseAttempt::Acquired(_) => break,
            LeaseAttempt::Busy => {
                assert!(Instant::now() < deadline, "expired lease never freed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    assert!(
        secs * 1000 + micros / 1000 >= until,
        "taken over before the server's clock passed the expiry"
    );
}

/// A lease taken over after expiry leaves the old token powerless: it cannot release, extend,
/// or write under the new holder.
#[tokio::test]
async fn stale_lease_token_cannot_release_extend_or_write() {
    let store = fresh().await;
    let k = key("acme", "alice", "google");
    let v = store.insert(&k, &active("x")).await.unwrap();
    let ttl = Duration::from_millis(200);
    let LeaseAttempt::Acquired(old) = store
        .try_lease(&k, &LeaseHolder::new("same"), ttl)
        .await
        .unwrap()
    else {
        panic!("first lease")
    };
    // Taken again by the same holder id once expired: only the token tells them apart.
    let new = loop {
        match store
            .try_lease(&k, &LeaseHolder::new("same"), Duration::from_secs(30))
            .await
            .unwrap()
        {
            LeaseAttempt::Acquired(l) => break l,
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    };
    assert_ne!(old.token, new.token);

    store.release_lease(&old).await.unwrap();
    assert_eq!(
        store
            .try_lease(&k, &LeaseHolder::new("other"), ttl)
            .await
            .unwrap(),
        LeaseAttempt::Busy,
        "a stale token released the current lease"
    );
    assert!(
        store
            .extend_lease(&old, Duration::from_secs(60))
            .await
            .unwrap()
            .is_none(),
        "a stale token extended the current lease"
    );
    assert!(
        is_conflict(
            store
                .compare_and_swap(&k, v.clone(), &active("stale"), Some(&old.token))
                .await
        ),
        "a stale token wrote"
    );
    assert_eq!(
        store
            .load(&k)
            .await
            .unwrap()
            .unwrap()
            .record
            .payload
            .expose_secret(),
        b"x"
    );
    let extended = store
        .extend_lease(&new, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("the current token extends");
    assert!(extended.expires_at > new.expires_at);
    store
        .compare_and_swap(&k, v.clone(), &active("fresh"), Some(&new.token))
        .await
        .expect("the current token writes");
    store.release_lease(&new).await.unwrap();
    assert!(matches!(
        store
            .try_lease(&k, &LeaseHolder::new("other"), ttl)
            .await
            .unwrap(),
        LeaseAttempt::Acquired(_)
    ));
}

/// `Debug` names the server and the prefix, never the password of the URL.
#[tokio::test]
async fn debug_hides_the_password() {
    let base = server_url();
    // An ACL user of this test only, so the shared server needs no password of its own.
    let user = format!("u{}", unique_prefix().replace('-', "_"));
    let password = "hunter2-secret";
    let mut conn = redis::Client::open(base.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        // Writes publish on the store's changes channel (for `CachedStore` feeds).
        .arg("&*")
        .arg("+@all")
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = base.replacen("redis://", &format!("redis://{user}:{password}@"), 1);
    assert_ne!(url, base, "test URL has the expected shape");
    let store = RedisStore::connect(&url)
        .await
        .expect("connect as the ACL user")
        .with_prefix(unique_prefix());
    // The credentials work: the store can write.
    store
        .insert(&key("acme", "alice", "google"), &active("x"))
        .await
        .unwrap();
    let debug = format!("{store:?}");
    assert!(!debug.contains(password), "password in Debug: {debug}");
    assert!(
        debug.contains("127.0.0.1"),
        "Debug names the server: {debug}"
    );
    assert!(
        debug.contains(store.prefix()),
        "Debug names the prefix: {debug}"
    );
    // A failed connection's error does not repeat it either.
    let bad = base.replacen("redis://", &format!("redis://{user}:wrong-{password}@"), 1);
    let err = RedisStore::connect(&bad).await.unwrap_err();
    assert!(matches!(err, StoreError::Backend { store: "redis", .. }));
    let shown = format!("{err} {err:?} {:?}", std::error::Error::source(&err));
    assert!(!shown.contains(password), "password in error: {shown}");
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A `redis-server` of this test's own, on its own port, so it can be killed and restarted.
struct OwnServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnServer {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = OwnServer {
            port,
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.restart();
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/setup-redis.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "own redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis dies under load: every failing call is a typed `StoreError::Backend`, none hangs, and
/// after a restart the same store (its `ConnectionManager`) works again without being rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_stopped_mid_operation_is_a_backend_error_and_the_store_recovers() {
    let mut server = OwnServer::start();
    let store = Arc::new(
        RedisStore::connect(&server.url())
            .await
            .unwrap()
            .with_prefix(unique_prefix()),
    );
    let k = key("acme", "alice", "google");
    store.insert(&k, &active("x")).await.unwrap();

    // Workers keep reading and writing while the server is killed under them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let store = store.clone();
        let stop = stop.clone();
        let k = k.clone();
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let result = tokio::time::timeout(Duration::from_secs(15), async {
                    let loaded = store.load(&k).await?;
                    if let Some(loaded) = loaded {
                        store
                            .compare_and_swap(&k, loaded.version, &active("y"), None)
                            .await
                            .map(|_| ())
                            .or_else(|e| match e {
                                StoreError::Conflict { .. } => Ok(()),
                                e => Err(e),
                            })?;
                    }
                    Ok::<_, StoreError>(())
                })
                .await
                .expect("a store call hung while Redis was down");
                if let Err(e) = result {
                    errors.push(e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            errors
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    // Down for longer than the connection manager's reconnection attempts last (3 retries,
    // at most 2 s apart): it must try again on later calls, not give up for good.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // While it is down, a call fails, typed.
    let err = store.load(&k).await.expect_err("Redis is down");
    assert!(
        matches!(err, StoreError::Backend { store: "redis", .. }),
        "not a backend error: {err:?}"
    );

    server.restart();
    // The data went with the server (no persistence); the store must work again on its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    let version = loop {
        match store.insert(&k, &active("after restart")).await {
            Ok(v) => break v,
            Err(StoreError::Conflict { .. }) => {
                // A worker re-created nothing (they only swap), so a conflict means a retry
                // of ours already landed.
                break store.load(&k).await.unwrap().unwrap().version;
            }
            Err(e) => {
                assert!(
                    matches!(e, StoreError::Backend { store: "redis", .. }),
                    "{e:?}"
                );
                assert!(
                    Instant::now() < deadline,
                    "store did not recover after restart: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert!(!errors.is_empty(), "no worker saw the server go away");
    for e in &errors {
        assert!(
            matches!(e, StoreError::Backend { store: "redis", .. }),
            "a worker saw another kind of error: {e:?}"
        );
    }
    let loaded = store
        .load(&k)
        .await
        .unwrap()
        .expect("written after restart");
    assert!(loaded.version.number() >= version.number());
    assert!(matches!(
        store
            .try_lease(&k, &LeaseHolder::new("a"), Duration::from_secs(5))
            .await
            .unwrap(),
        LeaseAttempt::Acquired(_)
    ));
}

// The fan-in of several instances over one Redis (in-process and across OS processes) is in
// tests/multi_instance.rs, with the same checks as for SQLite and PostgreSQL.
