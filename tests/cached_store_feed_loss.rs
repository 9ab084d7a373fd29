//! `CachedStore` over Redis when its feed's connection is killed (`CLIENT KILL TYPE pubsub`).
//! A test binary of its own: the kill ends every pub/sub connection on the server, which would
//! disturb the counted tests of `tests/cached_store.rs` if they ran at the same time.
#![cfg(feature = "redis")]

use std::time::Duration;

use time::OffsetDateTime;
use tokenbroker::store::redis::AsyncCommands;
use tokenbroker::store::{CachedStore, LinkState, Record, RecordMeta};
use tokenbroker::{Payload, RedisStore, TokenKey, TokenStore};

fn record(secret: &str) -> Record {
    let now = OffsetDateTime::now_utc();
    Record::new(
        Payload::new(secret.as_bytes().to_vec()),
        RecordMeta::new(LinkState::Active, None, now, now),
    )
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_feed_lost_and_back() {
    let url = std::env::var("TOKENBROKER_TEST_REDIS_URL")
        .expect("TOKENBROKER_TEST_REDIS_URL is not set: run scripts/test.sh");
    let prefix = format!("cached-loss-{}", std::process::id());
    let open = || async {
        RedisStore::connect(&url)
            .await
            .unwrap()
            .with_prefix(prefix.as_str())
    };
    let a = open().await;
    let b = open().await;
    let feed = b.change_feed().unwrap();
    let b = CachedStore::with_change_feed(b, feed);
    wait_until("subscribed", || b.stats().feed_live).await;
    let k = TokenKey::parse("acme", "alice", "google").unwrap();
    let v1 = a.insert(&k, &record("one")).await.unwrap();
    wait_until("insert received", || b.stats().invalidations_received >= 1).await;
    b.load(&k).await.unwrap();
    assert!(b.is_cached(&k));

    let client = tokenbroker::store::redis::Client::open(url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let killed: i64 = tokenbroker::store::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(killed >= 1, "killed {killed}");
    wait_until("B lost its feed", || b.stats().feed_losses >= 1).await;
    assert!(!b.is_cached(&k), "cleared when the feed was lost");
    wait_until("B subscribed again", || b.stats().feed_subscriptions >= 2).await;
    assert!(b.stats().feed_live);

    let seen = b.stats().invalidations_received;
    b.load(&k).await.unwrap();
    a.compare_and_swap(&k, v1, &record("two"), None)
        .await
        .unwrap();
    wait_until("change after reconnect", || {
        b.stats().invalidations_received > seen
    })
    .await;
    let got = b.load(&k).await.unwrap().unwrap();
    assert_eq!(got.record.payload.expose_secret(), b"two");
    let _: () = admin.del(format!("{{{prefix}}}:version")).await.unwrap();
}
