//! A refresh: `retrieve` of an expired link (load, lease, refresh over HTTP against the loopback
//! `FakeIdp`, merge, compare-and-swap, release) against its floor, a bare `oauth2`
//! `exchange_refresh_token` to the same endpoint over the same transport. Current-thread
//! runtime; every iteration moves a `ManualClock` past the expiry so that every read refreshes.
//!
//! `cargo bench --all-features --bench refresh`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use std::hint::black_box;
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, FakeProvider, ManualClock};
use tokenbroker::{LoginOptions, MemoryStore, ProviderPolicy, TokenBroker, TokenKey};

use common::{BareRefresher, Pair, caller, idp_broker, link};

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let idp = rt
        .block_on(FakeIdp::start(FakeIdpConfig::default()))
        .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::with_clock(clock.clone()));
    let broker = idp_broker(&idp, store, clock.clone());
    let alice = TokenKey::parse("acme", "alice", "fake").unwrap();
    let bob = TokenKey::parse("acme", "bob", "fake").unwrap();
    rt.block_on(link(&idp, &broker, &alice, "alice"));
    // The floor spends bob's grant, which the broker never touches.
    let bobs = rt.block_on(link(&idp, &broker, &bob, "bob"));
    let floor = BareRefresher::new(&idp, bobs.refresh_token().unwrap().expose_secret());
    let who = caller(&alice);

    // Sanity: one broker refresh is one upstream call.
    let before = idp.counters().refresh_calls;
    clock.advance(Duration::from_secs(3601));
    let got = rt.block_on(broker.retrieve(&who, &alice)).unwrap();
    assert!(got.refreshed);
    assert_eq!(idp.counters().refresh_calls, before + 1);

    // The broker's own work per refresh (lease, loads, merge, encode, compare-and-swap, events)
    // without HTTP: the same refresh over an in-process provider.
    let fake = Arc::new(FakeProvider::new("fake").unwrap());
    let fake_clock = Arc::new(ManualClock::starting_now());
    let in_process = TokenBroker::builder()
        .with_provider(fake.clone(), ProviderPolicy::default())
        .with_store(Arc::new(MemoryStore::with_clock(fake_clock.clone())))
        .with_clock(fake_clock.clone())
        .build()
        .unwrap();
    rt.block_on(async {
        let start = in_process
            .begin_login(&alice, LoginOptions::default())
            .await
            .unwrap();
        let callback = fake.approve(&start.authorization_url, "alice").unwrap();
        in_process
            .complete_login(start.pending, &callback)
            .await
            .unwrap();
    });

    let ours = |n: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                clock.advance(Duration::from_secs(3601));
                let got = broker.retrieve(&who, &alice).await.unwrap();
                assert!(got.refreshed);
                black_box(got);
            }
            start.elapsed()
        })
    };
    let bare = |n: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                black_box(floor.refresh().await);
            }
            start.elapsed()
        })
    };
    let ours_in_process = |n: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..n {
                fake_clock.advance(Duration::from_secs(3601));
                let got = in_process.retrieve(&who, &alice).await.unwrap();
                assert!(got.refreshed);
                black_box(got);
            }
            start.elapsed()
        })
    };

    let mut g = c.benchmark_group("refresh");
    // Loopback HTTP moves by ±20 % from one second to the next on a shared machine: measure
    // longer than the other benches.
    g.measurement_time(Duration::from_secs(8));
    g.bench_function("tokenbroker", |b| b.iter_custom(ours));
    g.bench_function("floor_oauth2", |b| b.iter_custom(bare));
    g.bench_function("tokenbroker_in_process", |b| b.iter_custom(ours_in_process));
    g.finish();
    common::paired("refresh/tokenbroker", "refresh/floor_oauth2", ours, bare);
    assert_eq!(fake.counters().reuse_detected, 0);
}

fn main() {
    let mut c = common::criterion();
    benches(&mut c);
    c.final_summary();
    common::print_summary(
        "refresh",
        &[
            Pair::new(
                "refresh against FakeIdp (MemoryStore, current-thread)",
                "refresh/tokenbroker",
                "refresh/floor_oauth2",
                1.2,
            ),
            Pair::new(
                "the broker's own work: refresh over an in-process FakeProvider",
                "refresh/tokenbroker_in_process",
                "refresh/floor_oauth2",
                f64::INFINITY,
            ),
        ],
    );
}
