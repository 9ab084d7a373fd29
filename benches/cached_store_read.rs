//! A fresh read through `CachedStore` in front of a shared store: `retrieve` of a fresh 2.5 KB
//! set through `CachedStore<PostgresStore>` and `CachedStore<RedisStore>` (each with its change
//! feed subscribed) against the floor, the same `retrieve` on a `MemoryStore`. Target: ≤ 2×.
//! An uncached `retrieve` on the same backend is printed as a reference.
//!
//! PostgreSQL runs with the `postgres` feature and `TOKENBROKER_TEST_POSTGRES_URL`, Redis with
//! the `redis` feature and `TOKENBROKER_TEST_REDIS_URL`; a backend without them is skipped with
//! a note.
//!
//! `cargo bench --all-features --bench cached_store_read`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use std::hint::black_box;
use time::OffsetDateTime;
use tokenbroker::store::CachedStore;
use tokenbroker::{Caller, MemoryStore, TokenBroker, TokenKey, TokenStore};

use common::{Pair, caller, read_broker, record, token_set};

fn bench_key(backend: &str) -> TokenKey {
    TokenKey::parse(
        "acme",
        &format!("bench-cached-{backend}-{}", std::process::id()),
        "fake",
    )
    .unwrap()
}

/// `n` reads of `k` through `broker`, timed.
fn reads(
    rt: &tokio::runtime::Runtime,
    broker: &TokenBroker,
    who: &Caller,
    k: &TokenKey,
    n: u64,
) -> Duration {
    rt.block_on(async {
        let start = Instant::now();
        for _ in 0..n {
            black_box(broker.retrieve(who, k).await.unwrap());
        }
        start.elapsed()
    })
}

/// Criterion and the paired ratio for one backend: the cached read against a `MemoryStore`
/// read, plus the uncached read as a reference.
fn compare(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    group: &str,
    backend: Arc<dyn TokenStore>,
    cached: Arc<dyn TokenStore>,
    k: &TokenKey,
) {
    let now = OffsetDateTime::now_utc();
    let set = token_set(now, 9);
    let who = caller(k);
    rt.block_on(backend.delete(k, None)).unwrap();
    rt.block_on(backend.insert(k, &record(&set, now))).unwrap();
    let memory = Arc::new(MemoryStore::new());
    rt.block_on(memory.insert(k, &record(&set, now))).unwrap();
    let ours = read_broker(cached);
    let floor = read_broker(memory);
    let uncached = read_broker(backend.clone());
    for b in [&ours, &floor, &uncached] {
        let got = rt.block_on(b.retrieve(&who, k)).unwrap();
        assert_eq!(
            got.tokens.access_token().expose_secret(),
            set.access_token().expose_secret()
        );
    }
    let mut g = c.benchmark_group(group);
    g.bench_function("tokenbroker_cached", |b| {
        b.iter_custom(|n| reads(rt, &ours, &who, k, n))
    });
    g.bench_function("floor_memory", |b| {
        b.iter_custom(|n| reads(rt, &floor, &who, k, n))
    });
    g.bench_function("uncached", |b| {
        b.iter_custom(|n| reads(rt, &uncached, &who, k, n))
    });
    g.finish();
    common::paired(
        &format!("{group}/tokenbroker_cached"),
        &format!("{group}/floor_memory"),
        |n| reads(rt, &ours, &who, k, n),
        |n| reads(rt, &floor, &who, k, n),
    );
    rt.block_on(backend.delete(k, None)).unwrap();
}

/// Waits (at most 10 s) until the cache's feed is subscribed.
fn subscribed<S>(rt: &tokio::runtime::Runtime, cache: &CachedStore<S>) {
    rt.block_on(async {
        for _ in 0..1000 {
            if cache.stats().feed_live {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the change feed did not subscribe");
    });
}

#[cfg(feature = "postgres")]
fn postgres(c: &mut Criterion, rt: &tokio::runtime::Runtime) -> bool {
    use tokenbroker::PostgresStore;
    let Ok(url) = std::env::var("TOKENBROKER_TEST_POSTGRES_URL") else {
        return false;
    };
    let store = rt.block_on(PostgresStore::connect(&url)).unwrap();
    let feed = store.change_feed();
    let cache = rt.block_on(async { CachedStore::with_change_feed(store.clone(), feed) });
    subscribed(rt, &cache);
    compare(
        c,
        rt,
        "cached_postgres_read",
        Arc::new(store),
        Arc::new(cache),
        &bench_key("pg"),
    );
    true
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &mut Criterion, _: &tokio::runtime::Runtime) -> bool {
    false
}

#[cfg(feature = "redis")]
fn redis(c: &mut Criterion, rt: &tokio::runtime::Runtime) -> bool {
    use tokenbroker::RedisStore;
    let Ok(url) = std::env::var("TOKENBROKER_TEST_REDIS_URL") else {
        return false;
    };
    let prefix = format!("bench-cached-{}", std::process::id());
    let store = rt
        .block_on(RedisStore::connect(&url))
        .unwrap()
        .with_prefix(prefix);
    let feed = store.change_feed().unwrap();
    let cache = rt.block_on(async { CachedStore::with_change_feed(store.clone(), feed) });
    subscribed(rt, &cache);
    compare(
        c,
        rt,
        "cached_redis_read",
        Arc::new(store),
        Arc::new(cache),
        &bench_key("redis"),
    );
    true
}

#[cfg(not(feature = "redis"))]
fn redis(_: &mut Criterion, _: &tokio::runtime::Runtime) -> bool {
    false
}

fn main() {
    // Multi-threaded: the change feed's task runs beside the reads, as in a host.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut c = common::criterion();
    if !postgres(&mut c, &rt) {
        println!(
            "note: cached_postgres_read skipped (needs the `postgres` feature and TOKENBROKER_TEST_POSTGRES_URL)"
        );
    }
    if !redis(&mut c, &rt) {
        println!(
            "note: cached_redis_read skipped (needs the `redis` feature and TOKENBROKER_TEST_REDIS_URL)"
        );
    }
    c.final_summary();
    common::print_summary(
        "cached_store_read",
        &[
            Pair::new(
                "CachedStore<PostgresStore> fresh read vs MemoryStore",
                "cached_postgres_read/tokenbroker_cached",
                "cached_postgres_read/floor_memory",
                2.0,
            ),
            Pair::new(
                "PostgresStore uncached read vs MemoryStore",
                "cached_postgres_read/uncached",
                "cached_postgres_read/floor_memory",
                f64::INFINITY,
            ),
            Pair::new(
                "CachedStore<RedisStore> fresh read vs MemoryStore",
                "cached_redis_read/tokenbroker_cached",
                "cached_redis_read/floor_memory",
                2.0,
            ),
            Pair::new(
                "RedisStore uncached read vs MemoryStore",
                "cached_redis_read/uncached",
                "cached_redis_read/floor_memory",
                f64::INFINITY,
            ),
        ],
    );
}
