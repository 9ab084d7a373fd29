//! The revocation outbox: what an unlink (or a re-link to another account) owes a provider is
//! kept in the store until the provider takes it, whatever happens to the caller, the process
//! or the provider meanwhile. In-process provider, manual clock; upstream calls counted, never
//! timed. The crash across processes is in `multi_instance.rs`; every store's part of the
//! contract is in the conformance suite.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::provider::ProviderError;
use tokenbroker::testing::{FakeFault, FakeProvider, ManualClock};
use tokenbroker::{
    BrokerEvent, Caller, Clock, DrainOptions, EventSink, LoginOptions, MemoryStore, ProviderPolicy,
    RevocationStatus, SweepOptions, TokenBroker, TokenKey, TokenStore,
};

#[derive(Debug, Default)]
struct Events(Mutex<Vec<BrokerEvent>>);

impl EventSink for Events {
    fn emit(&self, event: &BrokerEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

struct World {
    idp: Arc<FakeProvider>,
    clock: Arc<ManualClock>,
    store: Arc<dyn TokenStore>,
    events: Arc<Events>,
    broker: TokenBroker,
}

impl World {
    fn new() -> World {
        let clock = Arc::new(ManualClock::starting_now());
        World::on(Arc::new(MemoryStore::with_clock(clock.clone())), clock)
    }

    fn on(store: Arc<dyn TokenStore>, clock: Arc<ManualClock>) -> World {
        let idp = Arc::new(FakeProvider::new("fake").unwrap());
        let events = Arc::new(Events::default());
        let broker = TokenBroker::builder()
            .with_provider(idp.clone(), ProviderPolicy::default())
            .with_store(store.clone())
            .with_clock(clock.clone())
            .with_event_sink(events.clone())
            .with_refresh_timeout(Duration::from_millis(500))
            .with_lease_ttl(Duration::from_millis(500) + tokenbroker::LEASE_MARGIN)
            .build()
            .unwrap();
        World {
            idp,
            clock,
            store,
            events,
            broker,
        }
    }

    fn key() -> TokenKey {
        TokenKey::parse("acme", "alice", "fake").unwrap()
    }

    fn caller() -> Caller {
        let k = World::key();
        Caller::new(k.realm, k.subject, "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    /// Links alice as `upstream` and returns the access token.
    async fn link_as(&self, upstream: &str) -> String {
        let start = self
            .broker
            .begin_login(&World::key(), LoginOptions::default())
            .await
            .unwrap();
        let callback = self
            .idp
            .approve(&start.authorization_url, upstream)
            .unwrap();
        let outcome = self
            .broker
            .complete_login(start.pending, &callback)
            .await
            .unwrap();
        outcome.tokens.access_token().expose_secret().to_owned()
    }

    fn fail_next(&self, n: usize) {
        for _ in 0..n {
            self.idp.inject(FakeFault::Error(ProviderError::Transient {
                status: Some(503),
                retry_after: None,
                reason: None,
                source: None,
            }));
        }
    }

    async fn drain(&self) -> tokenbroker::DrainReport {
        self.broker
            .drain_revocations(DrainOptions::default())
            .await
            .unwrap()
    }

    fn events(&self) -> Vec<BrokerEvent> {
        self.events.0.lock().unwrap().clone()
    }
}

/// The provider is down during the unlink: the link is gone at once, the revocation is
/// deferred (not reported as failed and forgotten), and a drain after the retry time revokes
/// the grant.
#[tokio::test]
async fn an_unlink_while_the_provider_is_down_is_revoked_by_a_later_drain() {
    let w = World::new();
    let token = w.link_as("alice").await;
    w.fail_next(3);
    let outcome = w.broker.unlink(&World::key()).await.unwrap();
    assert!(outcome.deleted);
    let RevocationStatus::Deferred { retry_at, .. } = outcome.revocation else {
        panic!("{:?}", outcome.revocation)
    };
    assert_eq!(retry_at, w.clock.now() + Duration::from_secs(30));
    assert_eq!(w.idp.counters().revocations, 3, "three quick tries");
    assert!(w.idp.is_active(&token), "nothing was revoked yet");
    assert!(w.store.load(&World::key()).await.unwrap().is_none());

    assert_eq!(w.drain().await.claimed, 0, "not due before retry_at");
    w.clock.advance(Duration::from_secs(31));
    let report = w.drain().await;
    assert_eq!((report.claimed, report.revoked), (1, 1), "{report:?}");
    assert!(
        !w.idp.is_active(&token),
        "the grant is still alive upstream"
    );
    assert_eq!(w.idp.counters().revocations, 4);
    assert_eq!(w.drain().await.claimed, 0, "a settled entry is gone");

    let events = w.events();
    assert!(events.iter().any(|e| matches!(
        e,
        BrokerEvent::Unlinked {
            revocation: RevocationStatus::Deferred { .. },
            ..
        }
    )));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, BrokerEvent::RevocationDeferred { attempts: 1, .. }))
    );
    assert!(events.iter().any(|e| matches!(
        e,
        BrokerEvent::RevocationSettled {
            outcome: RevocationStatus::Revoked,
            attempts: 2,
            ..
        }
    )));
}

/// A provider that keeps failing: each drain try doubles the pause (30 s, 60 s, 120 s, ...),
/// and the entry is given up, with an outcome that says so, once it is older than the limit.
#[tokio::test]
async fn a_revocation_that_keeps_failing_backs_off_and_is_given_up_after_the_limit() {
    let w = World::new();
    let token = w.link_as("alice").await;
    w.fail_next(3);
    let started = w.clock.now();
    w.broker.unlink(&World::key()).await.unwrap();
    let mut expected_pause = Duration::from_secs(30);
    let options = DrainOptions::default().with_give_up_after(Duration::from_secs(3600));
    let mut tries = 0;
    loop {
        w.clock.advance(expected_pause);
        w.fail_next(1);
        let calls = w.idp.counters().revocations;
        let report = w.broker.drain_revocations(options.clone()).await.unwrap();
        assert_eq!(report.claimed, 1, "due exactly after the doubled pause");
        assert_eq!(
            w.idp.counters().revocations,
            calls + 1,
            "one call per drain try"
        );
        tries += 1;
        if report.given_up == 1 {
            assert!(w.clock.now() - started >= Duration::from_secs(3600));
            break;
        }
        assert_eq!(report.deferred, 1);
        expected_pause *= 2;
        assert!(tries < 10, "never given up");
    }
    assert!(w.idp.is_active(&token), "given up, not revoked");
    assert!(w.events().iter().any(|e| matches!(
        e,
        BrokerEvent::RevocationSettled { outcome: RevocationStatus::Failed(reason), .. }
            if reason.contains("given up")
    )));
    w.clock.advance(Duration::from_secs(86_400));
    assert_eq!(w.drain().await.claimed, 0, "a given-up entry is gone");
}

/// A provider without a revocation endpoint settles the entry at once: nothing is left behind
/// to retry forever.
#[tokio::test]
async fn a_provider_without_revocation_settles_at_once() {
    let w = World::new();
    w.link_as("alice").await;
    w.idp.inject(FakeFault::Error(ProviderError::Unsupported {
        operation: "revoke",
    }));
    let outcome = w.broker.unlink(&World::key()).await.unwrap();
    assert_eq!(outcome.revocation, RevocationStatus::NotSupported);
    w.clock.advance(Duration::from_secs(86_400));
    assert_eq!(w.drain().await.claimed, 0);
}

/// A token that expired while its revocation waited is not sent: nobody can use it any more.
#[tokio::test]
async fn a_token_that_expired_meanwhile_is_not_sent() {
    let w = World::new();
    // No refresh token: the access token is what an unlink revokes, and it expires in an hour.
    w.idp.set_omit_refresh_token(true);
    w.link_as("alice").await;
    w.fail_next(3);
    w.broker.unlink(&World::key()).await.unwrap();
    let calls = w.idp.counters().revocations;
    w.clock.advance(Duration::from_secs(2 * 3600));
    let report = w.drain().await;
    assert_eq!((report.claimed, report.expired), (1, 1), "{report:?}");
    assert_eq!(
        w.idp.counters().revocations,
        calls,
        "no call for an expired token"
    );
}

/// A sweep drains the outbox too, so hosts that run sweeps need no job of their own.
#[tokio::test]
async fn a_sweep_drains_the_outbox() {
    let w = World::new();
    let token = w.link_as("alice").await;
    w.fail_next(3);
    w.broker.unlink(&World::key()).await.unwrap();
    w.clock.advance(Duration::from_secs(60));
    let report = w
        .broker
        .sweep(SweepOptions::new(Duration::from_secs(300)))
        .await
        .unwrap();
    assert_eq!(report.revocations.revoked, 1, "{report:?}");
    assert!(!w.idp.is_active(&token));
}

/// The caller of an unlink goes away while the provider is answering: the revocation still
/// completes, in the broker's own task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlink_dropped_by_its_caller_still_revokes() {
    let w = Arc::new(World::new());
    let token = w.link_as("alice").await;
    w.idp.inject(FakeFault::Delay(Duration::from_millis(200)));
    let unlink = {
        let w = Arc::clone(&w);
        tokio::spawn(async move { w.broker.unlink(&World::key()).await })
    };
    while w.store.load(&World::key()).await.unwrap().is_some() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    unlink.abort();
    for _ in 0..500 {
        if !w.idp.is_active(&token) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !w.idp.is_active(&token),
        "the dropped unlink's revocation was lost"
    );
    w.clock.advance(Duration::from_secs(86_400));
    assert_eq!(w.drain().await.claimed, 0, "and it left nothing behind");
}

/// A re-link that brings another upstream account replaces the link; the old account's grant
/// is owed a revocation, which survives a provider outage the same way.
#[tokio::test]
async fn a_replaced_accounts_grant_is_revoked_after_an_outage() {
    let w = World::new();
    let old = w.link_as("alice-upstream").await;
    // The code exchange goes through (a zero delay answers normally); the revocation fails.
    w.idp.inject(FakeFault::Delay(Duration::ZERO));
    w.fail_next(3);
    let outcome_token = w.link_as("bob-upstream").await;
    assert!(
        w.idp.is_active(&old),
        "the outage kept the old grant alive for now"
    );
    assert!(w.events().iter().any(|e| matches!(
        e,
        BrokerEvent::AccountChanged {
            revocation: RevocationStatus::Deferred { .. },
            ..
        }
    )));
    w.clock.advance(Duration::from_secs(31));
    assert_eq!(w.drain().await.revoked, 1);
    assert!(
        !w.idp.is_active(&old),
        "the replaced account's grant is still alive"
    );
    let read = w
        .broker
        .retrieve(&World::caller(), &World::key())
        .await
        .unwrap();
    assert_eq!(read.tokens.access_token().expose_secret(), outcome_token);
}

/// Through `EncryptedStore`, the outbox keeps the owed tokens encrypted like the records: the
/// inner store never sees them in the clear, and the drain still revokes.
#[cfg(feature = "encryption")]
#[tokio::test]
async fn the_outbox_is_encrypted_at_rest() {
    use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
    let clock = Arc::new(ManualClock::starting_now());
    let inner = Arc::new(MemoryStore::with_clock(clock.clone()));
    let keyring = StaticKeyring::new(KeyId::new("k1").unwrap(), [7u8; 32]);
    let encrypted = Arc::new(EncryptedStore::new(inner.clone(), Arc::new(keyring)));
    let w = World::on(encrypted, clock.clone());
    let token = w.link_as("alice").await;
    w.fail_next(3);
    w.broker.unlink(&World::key()).await.unwrap();

    let now = clock.now() + Duration::from_secs(31);
    let raw = inner.claim_revocations(now, now, 10).await.unwrap();
    assert_eq!(raw.len(), 1);
    let bytes = raw[0].payload.expose_secret();
    assert!(
        !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
        "the owed access token is stored in the clear"
    );
    assert!(
        !String::from_utf8_lossy(bytes).contains("refresh_token"),
        "the owed token set is stored in the clear"
    );
    // The raw claim above moved the entry to `now`; the broker's drain reads it decrypted.
    clock.advance(Duration::from_secs(31));
    assert_eq!(w.drain().await.revoked, 1);
    assert!(!w.idp.is_active(&token));
}
