//! Reads from `RedisStore` without a cache, against the floor of a bare `HGETALL` of the same
//! link hash on the same `ConnectionManager`, and the same reads at 1k and at 100k links.
//!
//! - `redis_read`: `TokenStore::load` of a fresh 2.5 KB link (target ≤ 1.3× the floor, by the
//!   paired ratio), and a broker `retrieve` of it straight on the store (a reference: the
//!   store's read plus the broker's work). The floor is `HGETALL` of the link's hash, decoded
//!   into owned field and value bytes, on a clone of the very `ConnectionManager` the store
//!   uses (built here with the settings `RedisStore::connect` uses, then handed to
//!   `RedisStore::from_manager`).
//! - `redis_scale`: the store holds 1k links, then grows to 100k (real records, written by the
//!   store's own `insert`, 64 at a time on the multiplexed connection); at each size `load`,
//!   `retrieve` and the bare `HGETALL` read 1,024 links spread over the store in a scattered
//!   order. Target: 100k vs 1k ≤ 1.2×. The two sizes are measured seconds apart, so the ratio
//!   of their medians carries the machine's drift (printed, as a reference); at each size the
//!   reads are also paired against a `PING` on the same connection, which does not depend on
//!   the number of keys, and the ratio of those paired ratios (100k vs 1k) is the
//!   drift-corrected figure the target is judged by. Growth on the server's side (a bigger
//!   keyspace, colder caches) is not cancelled by it: `PING` looks nothing up.
//!
//! Needs the `redis` feature and `TOKENBROKER_TEST_REDIS_URL` (`scripts/setup-redis.sh`);
//! without the URL the bench is skipped with a note. Keys live under prefixes of their own
//! (`bench-redis-<pid>`, `bench-redis-scale-<pid>`), removed at the end.
//!
//! `cargo bench --all-features --bench redis_read`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use std::hint::black_box;
use time::OffsetDateTime;
use tokenbroker::store::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokenbroker::store::redis::{self, Client};
use tokenbroker::{Caller, RedisStore, TokenBroker, TokenKey, TokenStore};

use common::{Pair, caller, key, read_broker, record, token_set};

/// Links read at each size of the scale group (fits the broker's hot cache, as in `scale`).
const SAMPLE: usize = 1024;
/// Inserts in flight while filling the scale store.
const FILL_IN_FLIGHT: usize = 64;

/// A `ConnectionManager` with the settings `RedisStore::connect` gives its own.
async fn manager(url: &str) -> ConnectionManager {
    let client = Client::open(url).unwrap();
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(3)
        .set_max_delay(Duration::from_secs(2));
    ConnectionManager::new_with_config(client, config)
        .await
        .unwrap()
}

/// The hash of `k` in a store of `prefix`, named as the store names it
/// (`{prefix}:link:{realm}:{subject}:{provider}`). The bench's prefixes and keys hold none of
/// the characters the store percent-encodes (`%`, `:`, `{`, `}`); `checked_link_key` verifies
/// the name against what the store wrote.
fn link_key(prefix: &str, k: &TokenKey) -> String {
    for part in [
        prefix,
        k.realm.as_str(),
        k.subject.as_str(),
        k.provider.as_str(),
    ] {
        assert!(
            !part.contains(['%', ':', '{', '}']),
            "{part:?} would be percent-encoded by the store"
        );
    }
    format!(
        "{{{prefix}}}:link:{}:{}:{}",
        k.realm.as_str(),
        k.subject.as_str(),
        k.provider.as_str()
    )
}

/// The bare floor: `HGETALL` of one hash, every field and value as owned bytes.
async fn hgetall(conn: &mut ConnectionManager, hash: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    redis::cmd("HGETALL")
        .arg(hash)
        .query_async(conn)
        .await
        .unwrap()
}

async fn ping(conn: &mut ConnectionManager) -> String {
    redis::cmd("PING").query_async(conn).await.unwrap()
}

/// `link_key(prefix, k)` after checking that it names the hash the store wrote for `k`: its
/// `payload` field holds the stored payload and its `version` the stored version.
async fn checked_link_key(
    conn: &mut ConnectionManager,
    store: &RedisStore,
    prefix: &str,
    k: &TokenKey,
) -> String {
    let hash = link_key(prefix, k);
    let stored = store.load(k).await.unwrap().expect("the link was inserted");
    let fields = hgetall(conn, &hash).await;
    let field = |name: &str| {
        fields
            .iter()
            .find(|(f, _)| f == name.as_bytes())
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{hash} has no field {name}"))
    };
    assert_eq!(
        field("payload"),
        stored.record.payload.expose_secret().to_vec()
    );
    assert_eq!(
        field("version"),
        stored
            .version
            .number()
            .expect("RedisStore counts its versions")
            .to_string()
            .into_bytes()
    );
    hash
}

/// Removes every key of `prefix` (SCAN + UNLINK), so that the bench leaves nothing behind.
async fn remove_prefix(conn: &mut ConnectionManager, prefix: &str) {
    let pattern = format!("{{{prefix}}}:*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(conn)
                .await
                .unwrap();
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Times `n` runs of `f`, on `rt`; run `i` gets `i % len`, the index of the link it reads.
fn timed<F, Fut, R>(rt: &tokio::runtime::Runtime, len: usize, n: u64, mut f: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    rt.block_on(async {
        let start = Instant::now();
        let mut i = 0usize;
        for _ in 0..n {
            black_box(f(i).await);
            i += 1;
            if i == len {
                i = 0;
            }
        }
        start.elapsed()
    })
}

/// One link to read: its key, its caller and the name of its hash.
struct Target {
    key: TokenKey,
    caller: Caller,
    hash: String,
}

/// The three reads of a group, by closure: `load`, broker `retrieve`, bare `HGETALL`, and a
/// bare `PING` (the scale group's size-independent reference).
struct Reads<'a> {
    rt: &'a tokio::runtime::Runtime,
    store: &'a RedisStore,
    broker: &'a TokenBroker,
    conn: &'a ConnectionManager,
    targets: &'a [Target],
}

impl Reads<'_> {
    fn load(&self, n: u64) -> Duration {
        let targets = self.targets;
        timed(self.rt, targets.len(), n, |i| async move {
            self.store.load(&targets[i].key).await.unwrap().unwrap()
        })
    }

    fn retrieve(&self, n: u64) -> Duration {
        let targets = self.targets;
        timed(self.rt, targets.len(), n, |i| async move {
            let t = &targets[i];
            self.broker.retrieve(&t.caller, &t.key).await.unwrap()
        })
    }

    fn hgetall(&self, n: u64) -> Duration {
        let mut conn = self.conn.clone();
        self.rt.block_on(async {
            let start = Instant::now();
            let mut i = 0usize;
            for _ in 0..n {
                black_box(hgetall(&mut conn, &self.targets[i].hash).await);
                i += 1;
                if i == self.targets.len() {
                    i = 0;
                }
            }
            start.elapsed()
        })
    }

    fn ping(&self, n: u64) -> Duration {
        let mut conn = self.conn.clone();
        self.rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                black_box(ping(&mut conn).await);
            }
            start.elapsed()
        })
    }
}

/// Part 1: one fresh link, `load` and `retrieve` against `HGETALL`.
fn read(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) {
    let prefix = format!("bench-redis-{}", std::process::id());
    let conn = rt.block_on(manager(url));
    let store = RedisStore::from_manager(conn.clone()).with_prefix(prefix.as_str());
    let now = OffsetDateTime::now_utc();
    let set = token_set(now, 11);
    let k = TokenKey::parse(
        "acme",
        &format!("bench-redis-{}", std::process::id()),
        "fake",
    )
    .unwrap();
    rt.block_on(store.delete(&k, None)).unwrap();
    rt.block_on(store.insert(&k, &record(&set, now))).unwrap();
    let hash = rt.block_on(checked_link_key(&mut conn.clone(), &store, &prefix, &k));
    let broker = read_broker(Arc::new(store.clone()));
    let who = caller(&k);
    let got = rt.block_on(broker.retrieve(&who, &k)).unwrap();
    assert_eq!(
        got.tokens.access_token().expose_secret(),
        set.access_token().expose_secret()
    );
    let targets = [Target {
        key: k.clone(),
        caller: who,
        hash,
    }];
    let reads = Reads {
        rt,
        store: &store,
        broker: &broker,
        conn: &conn,
        targets: &targets,
    };

    let mut g = c.benchmark_group("redis_read");
    g.bench_function("load", |b| b.iter_custom(|n| reads.load(n)));
    g.bench_function("retrieve", |b| b.iter_custom(|n| reads.retrieve(n)));
    g.bench_function("floor_hgetall", |b| b.iter_custom(|n| reads.hgetall(n)));
    g.finish();
    common::paired(
        "redis_read/load",
        "redis_read/floor_hgetall",
        |n| reads.load(n),
        |n| reads.hgetall(n),
    );
    common::paired(
        "redis_read/retrieve",
        "redis_read/floor_hgetall",
        |n| reads.retrieve(n),
        |n| reads.hgetall(n),
    );
    rt.block_on(remove_prefix(&mut conn.clone(), &prefix));
}

/// Inserts links `from..to` through the store's own `insert`, `FILL_IN_FLIGHT` at a time.
fn fill(rt: &tokio::runtime::Runtime, store: &RedisStore, from: u64, to: u64) {
    let now = OffsetDateTime::now_utc();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in from..to {
            if tasks.len() >= FILL_IN_FLIGHT {
                tasks.join_next().await.unwrap().unwrap();
            }
            let store = store.clone();
            tasks.spawn(async move {
                store
                    .insert(&key(i), &record(&token_set(now, i), now))
                    .await
                    .unwrap();
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    });
}

/// Part 2: 1k links, then 100k. Returns, per size, the paired ratios of `load`, `retrieve`
/// and the bare `HGETALL` against `PING`.
fn scale(c: &mut Criterion, rt: &tokio::runtime::Runtime, url: &str) -> Vec<[f64; 3]> {
    let prefix = format!("bench-redis-scale-{}", std::process::id());
    let conn = rt.block_on(manager(url));
    rt.block_on(remove_prefix(&mut conn.clone(), &prefix));
    let store = RedisStore::from_manager(conn.clone()).with_prefix(prefix.as_str());
    let broker = read_broker(Arc::new(store.clone()));
    let mut against_ping = Vec::new();
    let mut g = c.benchmark_group("redis_scale");
    let mut have = 0;
    for n in [1_000u64, 100_000] {
        let start = Instant::now();
        fill(rt, &store, have, n);
        have = n;
        let keys: i64 = rt
            .block_on(redis::cmd("DBSIZE").query_async(&mut conn.clone()))
            .unwrap();
        println!(
            "redis_scale: {n} links in the store ({:.1} s to fill; {keys} keys in the database)",
            start.elapsed().as_secs_f64()
        );
        let targets: Vec<Target> = (0..SAMPLE as u64)
            .map(|i| {
                // Multiplying by an odd constant modulo n scatters the indices over the store.
                let k = key(i.wrapping_mul(2_654_435_761) % n);
                Target {
                    caller: caller(&k),
                    hash: link_key(&prefix, &k),
                    key: k,
                }
            })
            .collect();
        rt.block_on(async {
            let mut conn = conn.clone();
            for t in targets.iter().take(8) {
                checked_link_key(&mut conn, &store, &prefix, &t.key).await;
            }
        });
        let reads = Reads {
            rt,
            store: &store,
            broker: &broker,
            conn: &conn,
            targets: &targets,
        };
        // Warm what the broker caches for these links.
        reads.retrieve(SAMPLE as u64);
        g.bench_function(format!("load_{n}"), |b| b.iter_custom(|i| reads.load(i)));
        g.bench_function(format!("retrieve_{n}"), |b| {
            b.iter_custom(|i| reads.retrieve(i))
        });
        g.bench_function(format!("hgetall_{n}"), |b| {
            b.iter_custom(|i| reads.hgetall(i))
        });
        g.bench_function(format!("ping_{n}"), |b| b.iter_custom(|i| reads.ping(i)));
        let load = common::paired(
            &format!("redis_scale/load_{n}"),
            &format!("redis_scale/ping_{n}"),
            |i| reads.load(i),
            |i| reads.ping(i),
        );
        let retrieve = common::paired(
            &format!("redis_scale/retrieve_{n}"),
            &format!("redis_scale/ping_{n}"),
            |i| reads.retrieve(i),
            |i| reads.ping(i),
        );
        let floor = common::paired(
            &format!("redis_scale/hgetall_{n}"),
            &format!("redis_scale/ping_{n}"),
            |i| reads.hgetall(i),
            |i| reads.ping(i),
        );
        common::paired(
            &format!("redis_scale/load_{n}"),
            &format!("redis_scale/hgetall_{n}"),
            |i| reads.load(i),
            |i| reads.hgetall(i),
        );
        against_ping.push([load, retrieve, floor]);
    }
    g.finish();
    drop(broker);
    rt.block_on(remove_prefix(&mut conn.clone(), &prefix));
    against_ping
}

fn main() {
    let Ok(url) = std::env::var("TOKENBROKER_TEST_REDIS_URL") else {
        println!(
            "note: redis_read skipped (needs the `redis` feature and TOKENBROKER_TEST_REDIS_URL)"
        );
        return;
    };
    // One thread, as in `sql_read` and `scale`: the connection's driver task and the reads
    // share it, on both sides of every comparison.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = common::criterion();
    read(&mut c, &rt, &url);
    let against_ping = scale(&mut c, &rt, &url);
    c.final_summary();
    common::print_summary(
        "redis_read",
        &[
            Pair::new(
                "RedisStore load vs bare HGETALL (same ConnectionManager)",
                "redis_read/load",
                "redis_read/floor_hgetall",
                1.3,
            ),
            Pair::new(
                "broker retrieve on RedisStore (no cache) vs bare HGETALL",
                "redis_read/retrieve",
                "redis_read/floor_hgetall",
                f64::INFINITY,
            ),
            Pair::new(
                "RedisStore load vs bare HGETALL, 1k links (scattered)",
                "redis_scale/load_1000",
                "redis_scale/hgetall_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "RedisStore load vs bare HGETALL, 100k links (scattered)",
                "redis_scale/load_100000",
                "redis_scale/hgetall_100000",
                f64::INFINITY,
            ),
        ],
    );
    // The two sizes are measured seconds apart: the ratio of medians carries the machine's
    // drift (the PING line shows how much), so the target is judged by the drift-corrected
    // ratio below.
    common::print_summary(
        "redis_scale (ratio of medians = latency at 100k links / latency at 1k links)",
        &[
            Pair::new(
                "RedisStore load, 100k vs 1k links",
                "redis_scale/load_100000",
                "redis_scale/load_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "broker retrieve on RedisStore, 100k vs 1k links",
                "redis_scale/retrieve_100000",
                "redis_scale/retrieve_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "bare HGETALL, 100k vs 1k links",
                "redis_scale/hgetall_100000",
                "redis_scale/hgetall_1000",
                f64::INFINITY,
            ),
            Pair::new(
                "bare PING, 100k vs 1k links (the machine's drift between the sizes)",
                "redis_scale/ping_100000",
                "redis_scale/ping_1000",
                f64::INFINITY,
            ),
        ],
    );
    println!("## redis_scale, drift-corrected: each read paired against PING at its size\n");
    println!("| read | vs PING at 1k | vs PING at 100k | 100k vs 1k | target |");
    println!("|---|---|---|---|---|");
    if let [small, large] = &against_ping[..] {
        for (i, name) in ["RedisStore load", "broker retrieve", "bare HGETALL"]
            .into_iter()
            .enumerate()
        {
            let growth = large[i] / small[i];
            let target = if i < 2 {
                let verdict = if growth <= 1.2 { "met" } else { "MISSED" };
                format!("≤ 1.2× ({verdict})")
            } else {
                "(reference)".to_owned()
            };
            println!(
                "| {name} | {:.2}× | {:.2}× | {growth:.2}× | {target} |",
                small[i], large[i]
            );
        }
    }
    println!();
}
