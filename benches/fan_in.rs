//! Fan-in: 1,000 concurrent reads of one expired link make exactly one upstream call (asserted
//! from the `FakeIdp`'s counters on every iteration), with the token endpoint answering at once
//! and after 50 ms, through 1 broker instance and through 4 instances sharing one
//! `MemoryStore`. Measured: the time until the last reader has its token, against one bare
//! refresh to the same endpoint.
//!
//! `cargo bench --all-features --bench fan_in`

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode};
use std::hint::black_box;
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, ManualClock};
use tokenbroker::{MemoryStore, TokenBroker, TokenKey};

use common::{BareRefresher, Pair, caller, idp_broker, link};

const READERS: usize = 1000;

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let idp = rt
        .block_on(FakeIdp::start(FakeIdpConfig::default()))
        .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::with_clock(clock.clone()));
    let brokers: Vec<TokenBroker> = (0..4)
        .map(|_| idp_broker(&idp, store.clone(), clock.clone()))
        .collect();
    let alice = TokenKey::parse("acme", "alice", "fake").unwrap();
    let bob = TokenKey::parse("acme", "bob", "fake").unwrap();
    rt.block_on(link(&idp, &brokers[0], &alice, "alice"));
    let bobs = rt.block_on(link(&idp, &brokers[0], &bob, "bob"));
    let floor = Arc::new(BareRefresher::new(
        &idp,
        bobs.refresh_token().unwrap().expose_secret(),
    ));
    let read = Arc::new((caller(&alice), alice.clone()));

    // `iters` fan-ins through `brokers`, each asserted to make exactly one upstream call.
    let fan_in = |brokers: &[TokenBroker], iters: u64| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            clock.advance(Duration::from_secs(3601));
            let before = idp.counters().refresh_calls;
            total += rt.block_on(async {
                let start = Instant::now();
                let readers: Vec<_> = (0..READERS)
                    .map(|i| {
                        // Like the reference below, a task clones two `Arc`s: building a
                        // caller per request is the host's cost.
                        let broker = brokers[i % brokers.len()].clone();
                        let read = read.clone();
                        tokio::spawn(
                            async move { broker.retrieve(&read.0, &read.1).await.unwrap() },
                        )
                    })
                    .collect();
                for r in readers {
                    black_box(r.await.unwrap());
                }
                start.elapsed()
            });
            let calls = idp.counters().refresh_calls - before;
            assert_eq!(calls, 1, "{READERS} readers made {calls} upstream calls");
        }
        total
    };
    let bare = |iters: u64| {
        rt.block_on(async {
            let start = Instant::now();
            for _ in 0..iters {
                black_box(floor.refresh().await);
            }
            start.elapsed()
        })
    };

    for delay_ms in [0u64, 50] {
        let mut g = c.benchmark_group(format!("fan_in_{delay_ms}ms"));
        g.sampling_mode(SamplingMode::Flat).sample_size(10);
        idp.set_token_delay((delay_ms > 0).then(|| Duration::from_millis(delay_ms)));
        for instances in [1usize, 4] {
            let brokers = &brokers[..instances];
            g.bench_function(format!("tokenbroker_{instances}inst"), |b| {
                b.iter_custom(|iters| fan_in(brokers, iters))
            });
            common::paired(
                &format!("fan_in_{delay_ms}ms/tokenbroker_{instances}inst"),
                &format!("fan_in_{delay_ms}ms/floor_one_refresh"),
                |iters| fan_in(brokers, iters),
                bare,
            );
        }
        g.bench_function("floor_one_refresh", |b| b.iter_custom(bare));
        // A reference, not the target's floor: one bare refresh, then 1,000 spawned tasks that
        // each read the new token from a shared map. What any fan-in costs on this runtime
        // before the broker does anything; at 0 ms it dwarfs the refresh itself.
        g.bench_function("floor_refresh_then_1000_tasks", |b| {
            b.to_async(&rt).iter(|| async {
                let token: Arc<std::sync::RwLock<Arc<str>>> =
                    Arc::new(std::sync::RwLock::new(floor.refresh().await.into()));
                let readers: Vec<_> = (0..READERS)
                    .map(|_| {
                        let token = token.clone();
                        tokio::spawn(async move { token.read().unwrap().clone() })
                    })
                    .collect();
                for r in readers {
                    black_box(r.await.unwrap());
                }
            })
        });
        g.finish();
    }
    idp.set_token_delay(None);
}

fn main() {
    let mut c = common::criterion();
    benches(&mut c);
    c.final_summary();
    let mut pairs = Vec::new();
    for (delay, label1, label4) in [
        (
            0,
            "fan-in 1,000 readers, 1 instance, 0 ms IdP",
            "fan-in 1,000 readers, 4 instances, 0 ms IdP",
        ),
        (
            50,
            "fan-in 1,000 readers, 1 instance, 50 ms IdP",
            "fan-in 1,000 readers, 4 instances, 50 ms IdP",
        ),
    ] {
        let floor = format!("fan_in_{delay}ms/floor_one_refresh");
        pairs.push(Pair::new(
            label1,
            format!("fan_in_{delay}ms/tokenbroker_1inst"),
            floor.clone(),
            2.0,
        ));
        pairs.push(Pair::new(
            label4,
            format!("fan_in_{delay}ms/tokenbroker_4inst"),
            floor,
            2.0,
        ));
    }
    for delay in [0, 50] {
        pairs.push(Pair::new(
            if delay == 0 {
                "reference: 1 refresh + 1,000 spawned tasks, 0 ms IdP"
            } else {
                "reference: 1 refresh + 1,000 spawned tasks, 50 ms IdP"
            },
            format!("fan_in_{delay}ms/floor_refresh_then_1000_tasks"),
            format!("fan_in_{delay}ms/floor_one_refresh"),
            f64::INFINITY,
        ));
    }
    // At 0 ms the runtime's own cost of 1,000 tasks dwarfs the refresh: the broker's share is
    // what it adds over the reference.
    pairs.push(Pair::new(
        "fan-in, 1 instance, 0 ms IdP, vs the reference",
        "fan_in_0ms/tokenbroker_1inst",
        "fan_in_0ms/floor_refresh_then_1000_tasks",
        f64::INFINITY,
    ));
    pairs.push(Pair::new(
        "fan-in, 4 instances, 0 ms IdP, vs the reference",
        "fan_in_0ms/tokenbroker_4inst",
        "fan_in_0ms/floor_refresh_then_1000_tasks",
        f64::INFINITY,
    ));
    common::print_summary("fan_in", &pairs);
}
