//! Scale: cached-read latency with 1k, 100k and 1M links in a `MemoryStore` (and 1k and 100k
//! in SQLite) should stay flat; and the memory a `MemoryStore` spends per link, measured with a
//! counting global allocator in this binary, against the serialized size of the set.
//!
//! A random lookup in a bigger map is slower on any machine (the map no longer fits the CPU
//! caches), so each size also measures a floor: a bare `HashMap` lookup of the same keys, in
//! the same order, in a map of the same size. Flat means our overhead over that floor does not
//! grow with the number of links.
//!
//! Reads go to 1,024 links spread over the whole store, in a scattered order, so that a large
//! store is not read from a warm corner of the CPU caches.
//!
//! `cargo bench --all-features --bench scale`

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use criterion::{BenchmarkGroup, measurement::WallTime};
use std::collections::HashMap;
use std::hint::black_box;
use time::OffsetDateTime;
use tokenbroker::Payload;
use tokenbroker::{Caller, MemoryStore, SqliteStore, TokenBroker, TokenKey, TokenStore};

use common::{Pair, caller, key, read_broker, record, token_set};

/// Counts live heap bytes and allocation calls, to measure the store's footprint and the
/// allocations of one read. Sizes are the ones requested: the allocator's own overhead per
/// block (typically 8 to 16 bytes) is not included.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call forwards to the system allocator with the caller's arguments unchanged;
// the counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Fits the broker's default hot cache (4096 sets), so that the bench measures the store's
/// lookup at each size rather than the hot cache's eviction (a miss adds one JSON decode).
const SAMPLE: usize = 1024;

/// The links read at a given size: `SAMPLE` of them spread over `0..n`, in scattered order.
fn sample(n: u64) -> Vec<(TokenKey, Caller)> {
    (0..SAMPLE as u64)
        .map(|i| {
            // Multiplying by an odd constant modulo n scatters the indices over the store.
            let k = key((i.wrapping_mul(2_654_435_761)) % n);
            let c = caller(&k);
            (k, c)
        })
        .collect()
}

/// Fills `store` with links `from..to`; returns the live heap bytes that stayed allocated.
fn fill(rt: &tokio::runtime::Runtime, store: &dyn TokenStore, from: u64, to: u64) -> i64 {
    let now = OffsetDateTime::now_utc();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    rt.block_on(async {
        for i in from..to {
            store
                .insert(&key(i), &record(&token_set(now, i), now))
                .await
                .unwrap();
        }
    });
    LIVE_BYTES.load(Ordering::Relaxed) - before
}

fn bench_reads(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &tokio::runtime::Runtime,
    broker: &TokenBroker,
    n: u64,
) {
    let reads = sample(n);
    let mut i = 0usize;
    g.bench_function(format!("links_{n}"), |b| {
        b.to_async(rt).iter(|| {
            i = (i + 1) % SAMPLE;
            let (k, c) = &reads[i];
            async move { black_box(broker.retrieve(c, k).await.unwrap()) }
        })
    });
}

/// The floor at `n` links: a bare `HashMap` lookup (plus an `Arc` clone of the payload, which
/// the map shares with the store, so the floor costs no token memory) of the same keys.
fn bench_floor(g: &mut BenchmarkGroup<'_, WallTime>, floor: &HashMap<TokenKey, Payload>, n: u64) {
    let reads = sample(n);
    let mut i = 0usize;
    g.bench_function(format!("floor_{n}"), |b| {
        b.iter(|| {
            i = (i + 1) % SAMPLE;
            black_box(floor.get(&reads[i].0).cloned())
        })
    });
}

/// Adds links `from..to` of `store` to the floor map (after the footprint was measured).
fn fill_floor(
    rt: &tokio::runtime::Runtime,
    store: &dyn TokenStore,
    floor: &mut HashMap<TokenKey, Payload>,
    from: u64,
    to: u64,
) {
    rt.block_on(async {
        for i in from..to {
            let k = key(i);
            let stored = store.load(&k).await.unwrap().unwrap();
            floor.insert(k, stored.record.payload);
        }
    });
}

/// PostgreSQL at 1k and 100k links, in a schema of its own that is dropped at the end.
#[cfg(feature = "postgres")]
fn scale_postgres(c: &mut criterion::Criterion, rt: &tokio::runtime::Runtime) -> bool {
    use std::str::FromStr;
    use tokenbroker::PostgresStore;
    use tokenbroker::store::sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
    use tokenbroker::store::sqlx::{self, AssertSqlSafe};

    let Ok(url) = std::env::var("TOKENBROKER_TEST_POSTGRES_URL") else {
        return false;
    };
    let schema = format!("bench_scale_{}", std::process::id());
    rt.block_on(async {
        let admin = PgPool::connect(&url).await.unwrap();
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
    });
    let options = PgConnectOptions::from_str(&url)
        .unwrap()
        .options([("search_path", schema.as_str())]);
    let pool = rt
        .block_on(
            PgPoolOptions::new()
                .max_connections(8)
                .connect_with(options),
        )
        .unwrap();
    let store = Arc::new(PostgresStore::from_pool(pool.clone()));
    rt.block_on(store.migrate()).unwrap();
    let broker = read_broker(store.clone());
    {
        let mut g = c.benchmark_group("scale_postgres");
        let mut have = 0;
        for n in [1_000u64, 100_000] {
            fill(rt, &*store, have, n);
            have = n;
            bench_reads(&mut g, rt, &broker, n);
        }
        g.finish();
    }
    drop(broker);
    rt.block_on(async {
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    true
}

#[cfg(not(feature = "postgres"))]
fn scale_postgres(_: &mut criterion::Criterion, _: &tokio::runtime::Runtime) -> bool {
    false
}

fn allocations_per_read(rt: &tokio::runtime::Runtime, broker: &TokenBroker) -> f64 {
    let reads = sample(1000);
    // Warm whatever the broker caches, then count.
    rt.block_on(async {
        for (k, c) in &reads {
            broker.retrieve(c, k).await.unwrap();
        }
    });
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    rt.block_on(async {
        for (k, c) in &reads {
            black_box(broker.retrieve(c, k).await.unwrap());
        }
    });
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / reads.len() as f64
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = common::criterion();
    let now = OffsetDateTime::now_utc();
    let serialized = record(&token_set(now, 1), now).payload.len();

    let store = Arc::new(MemoryStore::new());
    let broker = read_broker(store.clone());
    let mut footprint = Vec::new();
    {
        let mut g = c.benchmark_group("scale_memory");
        let mut floor = HashMap::new();
        let mut have = 0;
        for n in [1_000u64, 100_000, 1_000_000] {
            let added = fill(&rt, &*store, have, n);
            footprint.push((n - have, added));
            fill_floor(&rt, &*store, &mut floor, have, n);
            have = n;
            bench_reads(&mut g, &rt, &broker, n);
            bench_floor(&mut g, &floor, n);
        }
        g.finish();
    }
    let allocs = allocations_per_read(&rt, &broker);
    drop(broker);
    drop(store);

    let dir = tempfile::tempdir().unwrap();
    let sqlite = Arc::new(
        rt.block_on(SqliteStore::open(dir.path().join("links.db")))
            .unwrap(),
    );
    let sql_broker = read_broker(sqlite.clone());
    {
        let mut g = c.benchmark_group("scale_sqlite");
        let mut have = 0;
        for n in [1_000u64, 100_000] {
            fill(&rt, &*sqlite, have, n);
            have = n;
            bench_reads(&mut g, &rt, &sql_broker, n);
        }
        g.finish();
    }
    let postgres = scale_postgres(&mut c, &rt);

    c.final_summary();
    common::print_summary(
        "scale (ratio = latency at size / latency at 1k links)",
        &[
            // The raw growth includes the memory hierarchy's, which the floor shows too; the
            // target applies to our overhead over the floor (the table printed below).
            Pair::new(
                "MemoryStore read, 100k vs 1k links (raw)",
                "scale_memory/links_100000",
                "scale_memory/links_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "MemoryStore read, 1M vs 1k links (raw)",
                "scale_memory/links_1000000",
                "scale_memory/links_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "bare HashMap lookup, 1M vs 1k links (raw)",
                "scale_memory/floor_1000000",
                "scale_memory/floor_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "MemoryStore read vs bare HashMap lookup, 1k links",
                "scale_memory/links_1000",
                "scale_memory/floor_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "MemoryStore read vs bare HashMap lookup, 100k links",
                "scale_memory/links_100000",
                "scale_memory/floor_100000",
                f64::INFINITY,
            ),
            Pair::new(
                "MemoryStore read vs bare HashMap lookup, 1M links",
                "scale_memory/links_1000000",
                "scale_memory/floor_1000000",
                f64::INFINITY,
            ),
            Pair::new(
                "SQLite read, 100k vs 1k links",
                "scale_sqlite/links_100000",
                "scale_sqlite/links_1000",
                1.5,
            ),
            Pair::new(
                "PostgreSQL read, 100k vs 1k links",
                "scale_postgres/links_100000",
                "scale_postgres/links_1000",
                1.5,
            ),
        ],
    );
    if !postgres {
        println!(
            "note: scale_postgres skipped (needs the `postgres` feature and TOKENBROKER_TEST_POSTGRES_URL)\n"
        );
    }
    println!("## MemoryStore read: overhead over the bare lookup at each size\n");
    println!("| links | tokenbroker | bare HashMap lookup | overhead | overhead vs 1k | target |");
    println!("|---|---|---|---|---|---|");
    let mut base = None;
    for n in [1_000u64, 100_000, 1_000_000] {
        if let (Some(ours), Some(floor)) = (
            common::median_ns(&format!("scale_memory/links_{n}")),
            common::median_ns(&format!("scale_memory/floor_{n}")),
        ) {
            let overhead = ours - floor;
            let base = *base.get_or_insert(overhead);
            let growth = overhead / base;
            let verdict = if growth <= 1.5 { "met" } else { "MISSED" };
            println!(
                "| {n} | {ours:.0} ns | {floor:.0} ns | {overhead:.0} ns | {growth:.2}× | ≤ 1.5× ({verdict}) |"
            );
        }
    }
    println!();
    println!("## MemoryStore memory per link (serialized set: {serialized} B)\n");
    println!("| links added | live heap bytes per link | ratio to serialized | target |");
    println!("|---|---|---|---|");
    for (added, bytes) in footprint {
        let per = bytes as f64 / added as f64;
        let ratio = per / serialized as f64;
        let verdict = if ratio <= 1.5 { "met" } else { "MISSED" };
        println!("| {added} | {per:.0} B | {ratio:.2}× | ≤ 1.5× ({verdict}) |");
    }
    println!("\nallocations per cached read (MemoryStore, warm): {allocs:.1}\n");
}
