//! A cached read on the SQL stores: `retrieve` of a fresh 2.5 KB set against its floor, a bare
//! `SELECT payload FROM tokenbroker_links WHERE realm=$1 AND subject=$2 AND provider=$3` on the
//! same pool.
//!
//! SQLite uses a file in a temporary directory. PostgreSQL runs when the `postgres` feature is on
//! and `TOKENBROKER_TEST_POSTGRES_URL` is set; otherwise that group is skipped with a note.
//!
//! `cargo bench --all-features --bench sql_read`

mod common;

use std::sync::Arc;
use std::time::Instant;

use criterion::Criterion;
use std::hint::black_box;
use time::OffsetDateTime;
use tokenbroker::store::sqlx::{self, Row as _};
use tokenbroker::{Caller, SqliteStore, TokenBroker, TokenKey, TokenStore};

use common::{Pair, caller, key, read_broker, record, token_set};

const BARE_SELECT: &str =
    "SELECT payload FROM tokenbroker_links WHERE realm = $1 AND subject = $2 AND provider = $3";

fn sqlite(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let store = rt
        .block_on(SqliteStore::open(dir.path().join("links.db")))
        .unwrap();
    let now = OffsetDateTime::now_utc();
    let set = token_set(now, 7);
    let k = key(7);
    let who = caller(&k);
    rt.block_on(store.insert(&k, &record(&set, now))).unwrap();
    let pool = store.pool().clone();
    let broker = read_broker(Arc::new(store));
    let got = rt.block_on(broker.retrieve(&who, &k)).unwrap();
    assert_eq!(
        got.tokens.access_token().expose_secret(),
        set.access_token().expose_secret()
    );

    let (pool, k) = (&pool, &k);
    read_vs_select(c, rt, "sqlite_read", &broker, &who, k, move || async move {
        let row = sqlx::query(BARE_SELECT)
            .bind(k.realm.as_str())
            .bind(k.subject.as_str())
            .bind(k.provider.as_str())
            .fetch_one(pool)
            .await
            .unwrap();
        row.get::<Vec<u8>, _>(0)
    });
}

/// Criterion and the paired ratio for one SQL store: `retrieve` against `select`, the bare
/// query on the same pool.
fn read_vs_select<F, Fut>(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    group: &str,
    broker: &TokenBroker,
    who: &Caller,
    k: &TokenKey,
    select: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<u8>>,
{
    let ours = |n: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                black_box(broker.retrieve(who, k).await.unwrap());
            }
            start.elapsed()
        })
    };
    let floor = |n: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                black_box(select().await);
            }
            start.elapsed()
        })
    };
    let mut g = c.benchmark_group(group);
    g.bench_function("tokenbroker", |b| b.iter_custom(ours));
    g.bench_function("floor_select", |b| b.iter_custom(floor));
    g.finish();
    common::paired(
        &format!("{group}/tokenbroker"),
        &format!("{group}/floor_select"),
        ours,
        floor,
    );
}

#[cfg(feature = "postgres")]
fn postgres(c: &mut Criterion, rt: &tokio::runtime::Runtime) -> bool {
    use tokenbroker::PostgresStore;
    let Ok(url) = std::env::var("TOKENBROKER_TEST_POSTGRES_URL") else {
        return false;
    };
    let store = rt.block_on(PostgresStore::connect(&url)).unwrap();
    let now = OffsetDateTime::now_utc();
    let set = token_set(now, 8);
    // A subject of its own, so that the bench never touches a test's rows; deleted at the end.
    let k = tokenbroker::TokenKey::parse("acme", &format!("bench-{}", std::process::id()), "fake")
        .unwrap();
    let who = caller(&k);
    rt.block_on(store.delete(&k, None)).unwrap();
    rt.block_on(store.insert(&k, &record(&set, now))).unwrap();
    let pool = store.pool().clone();
    let store = Arc::new(store);
    let broker = read_broker(store.clone());

    {
        let (pool, k) = (&pool, &k);
        read_vs_select(
            c,
            rt,
            "postgres_read",
            &broker,
            &who,
            k,
            move || async move {
                let row = sqlx::query(BARE_SELECT)
                    .bind(k.realm.as_str())
                    .bind(k.subject.as_str())
                    .bind(k.provider.as_str())
                    .fetch_one(pool)
                    .await
                    .unwrap();
                row.get::<Vec<u8>, _>(0)
            },
        );
    }
    rt.block_on(store.delete(&k, None)).unwrap();
    true
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &mut Criterion, _: &tokio::runtime::Runtime) -> bool {
    false
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut c = common::criterion();
    sqlite(&mut c, &rt);
    if !postgres(&mut c, &rt) {
        println!(
            "note: postgres_read skipped (needs the `postgres` feature and TOKENBROKER_TEST_POSTGRES_URL)"
        );
    }
    c.final_summary();
    common::print_summary(
        "sql_read",
        &[
            Pair::new(
                "SQLite read (file, WAL)",
                "sqlite_read/tokenbroker",
                "sqlite_read/floor_select",
                1.3,
            ),
            Pair::new(
                "PostgreSQL read",
                "postgres_read/tokenbroker",
                "postgres_read/floor_select",
                1.3,
            ),
        ],
    );
}
