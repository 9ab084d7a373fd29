//! The five ways the refresh protocol used to break off the plain `retrieve` path (issue 11),
//! each as its own regression test, with the broker's **default timing** (refresh time-out
//! 10 s, lease 30 s, lease wait 35 s): no lease wait shortened below the lease TTL.
//!
//! Time is tokio's paused clock, and the broker and the store read it through [`TokioClock`],
//! so leases expire in virtual time exactly as they would in real time. The provider is the
//! strict `FakeProvider`: rotating refresh tokens, and a consumed one presented again revokes
//! the whole grant. Nothing asserts on wall-clock time; upstream calls are counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokenbroker::http::{HttpError, HttpRequest, HttpResponse};
use tokenbroker::provider::ProviderError;
use tokenbroker::store::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, Record, ScannedLink, StoredRecord, Version,
};
use tokenbroker::testing::{FakeFault, FakeProvider};
use tokenbroker::{
    BrokerEvent, Caller, Clock, Error, EventSink, GrantStatus, LoginOptions, MemoryStore,
    ProviderPolicy, Realm, Scopes, StoreError, Subject, SweepOptions, TokenBroker, TokenKey,
    TokenSet, TokenStore,
};
use tokio::sync::watch;

const HOUR: Duration = Duration::from_secs(3600);

/// The broker's and the store's clock: tokio's (paused) time, from a fixed start.
#[derive(Debug)]
struct TokioClock {
    start: OffsetDateTime,
    origin: tokio::time::Instant,
}

impl TokioClock {
    fn new() -> Arc<Self> {
        Arc::new(TokioClock {
            start: OffsetDateTime::now_utc(),
            origin: tokio::time::Instant::now(),
        })
    }
}

impl Clock for TokioClock {
    fn now(&self) -> OffsetDateTime {
        self.start + self.origin.elapsed()
    }
}

/// A store whose lease-fenced compare-and-swaps (the refresh engine's writes) can be held at
/// the gate: the window between the provider's answer and the write, where a lost refresh
/// loses the rotated token. Other writers (a re-login) pass.
#[derive(Debug)]
struct GatedStore {
    inner: MemoryStore,
    hold_writes: watch::Sender<bool>,
    writes_waiting: AtomicU64,
}

impl GatedStore {
    fn new(clock: Arc<TokioClock>) -> Arc<Self> {
        Arc::new(GatedStore {
            inner: MemoryStore::with_clock(clock),
            hold_writes: watch::channel(false).0,
            writes_waiting: AtomicU64::new(0),
        })
    }

    fn hold_writes(&self) {
        self.hold_writes.send_replace(true);
    }

    fn release_writes(&self) {
        self.hold_writes.send_replace(false);
    }

    /// Waits (in virtual time) until a write is held at the gate.
    async fn wait_for_held_write(&self) {
        for _ in 0..10_000 {
            if self.writes_waiting.load(Ordering::SeqCst) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("no write reached the gate");
    }
}

#[async_trait]
impl TokenStore for GatedStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        self.inner.load(key).await
    }
    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        self.inner.insert(key, record).await
    }
    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let mut gate = self.hold_writes.subscribe();
        let held = fence.is_some() && *gate.borrow();
        if held {
            self.writes_waiting.fetch_add(1, Ordering::SeqCst);
            let _ = gate.wait_for(|held| !*held).await;
            self.writes_waiting.fetch_sub(1, Ordering::SeqCst);
        }
        self.inner
            .compare_and_swap(key, expected, record, fence)
            .await
    }
    async fn delete(&self, key: &TokenKey, expected: Option<Version>) -> Result<bool, StoreError> {
        self.inner.delete(key, expected).await
    }
    async fn list(&self, realm: &Realm, subject: &Subject) -> Result<Vec<TokenKey>, StoreError> {
        self.inner.list(realm, subject).await
    }
    async fn scan(
        &self,
        after: Option<&TokenKey>,
        limit: usize,
    ) -> Result<Vec<ScannedLink>, StoreError> {
        self.inner.scan(after, limit).await
    }
    async fn try_lease(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        self.inner.try_lease(key, holder, ttl).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release_lease(lease).await
    }
    async fn extend_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.inner.extend_lease(lease, ttl).await
    }
}

#[derive(Debug, Default)]
struct Events(Mutex<Vec<BrokerEvent>>);

impl EventSink for Events {
    fn emit(&self, event: &BrokerEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

struct World {
    idp: Arc<FakeProvider>,
    clock: Arc<TokioClock>,
    store: Arc<GatedStore>,
    events: Arc<Events>,
    key: TokenKey,
}

impl World {
    fn new() -> World {
        let clock = TokioClock::new();
        World {
            idp: Arc::new(FakeProvider::new("fake").unwrap()),
            store: GatedStore::new(clock.clone()),
            clock,
            events: Arc::new(Events::default()),
            key: TokenKey::parse("acme", "alice", "fake").unwrap(),
        }
    }

    /// A broker instance on the shared store, with default timing.
    fn instance(&self, policy: ProviderPolicy) -> TokenBroker {
        TokenBroker::builder()
            .with_provider(self.idp.clone(), policy)
            .with_store(self.store.clone())
            .with_clock(self.clock.clone())
            .with_event_sink(self.events.clone())
            .build()
            .unwrap()
    }

    fn caller(&self) -> Caller {
        Caller::new(self.key.realm.clone(), self.key.subject.clone(), "app").with_role("read-token")
    }

    async fn link(&self, broker: &TokenBroker) -> TokenSet {
        let start = broker
            .begin_login(&self.key, LoginOptions::default())
            .await
            .unwrap();
        let callback = self.idp.approve(&start.authorization_url, "alice").unwrap();
        broker
            .complete_login(start.pending, &callback)
            .await
            .unwrap()
            .tokens
    }

    async fn stored_set(&self) -> TokenSet {
        let stored = self.store.load(&self.key).await.unwrap().expect("linked");
        TokenSet::from_payload(&stored.record.payload).unwrap()
    }

    /// Passes the access token's expiry (in virtual time).
    async fn expire(&self) {
        tokio::time::sleep(HOUR + Duration::from_secs(1)).await;
    }

    /// Waits until the stored refresh token is no longer `old`: the engine's write landed.
    async fn wait_for_rotation(&self, old: &TokenSet) -> TokenSet {
        for _ in 0..10_000 {
            let now = self.stored_set().await;
            if rt(&now) != rt(old) {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the rotated refresh token never reached the store");
    }

    /// No lease is left on the key: a fresh holder takes it at once (long before any lease
    /// could have merely expired).
    async fn assert_no_lease_held(&self) {
        let probe = LeaseHolder::new("probe");
        match self
            .store
            .try_lease(&self.key, &probe, Duration::from_secs(1))
            .await
            .unwrap()
        {
            LeaseAttempt::Acquired(lease) => self.store.release_lease(&lease).await.unwrap(),
            other => panic!("a lease was left held: {other:?}"),
        }
    }

    /// The link works: a plain read after the next expiry refreshes with the stored (rotated)
    /// token, and the provider never saw a spent one.
    async fn assert_link_alive(&self, broker: &TokenBroker) {
        self.expire().await;
        let got = broker.retrieve(&self.caller(), &self.key).await.unwrap();
        assert!(
            self.idp
                .is_active(got.tokens.access_token().expose_secret()),
            "the link serves a live token"
        );
        assert_eq!(
            self.idp.counters().reuse_detected,
            0,
            "no refresh token spent twice"
        );
    }
}

fn rt(set: &TokenSet) -> Option<String> {
    set.refresh_token().map(|t| t.expose_secret().to_owned())
}

/// Scenario 1: a leading reader kept but not polled. Its refresh reached the provider; the
/// future is held (as in a `FuturesUnordered` nobody drives) and never polled again. The
/// refresh lives in the broker's engine, not in that future: it finishes, and a reader arriving
/// after the lease and the lease wait have both run out gets its tokens instead of taking the
/// expired lease and presenting the spent refresh token.
#[tokio::test(start_paused = true)]
async fn scenario_1_a_leader_kept_but_never_polled_does_not_stall_its_refresh() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let linked = w.link(&broker).await;
    w.expire().await;
    w.idp.pause();

    let caller = w.caller();
    let mut leader = Box::pin(broker.retrieve(&caller, &w.key));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for _ in 0..100 {
        assert!(leader.as_mut().poll(&mut cx).is_pending());
        if w.idp.counters().refresh_calls == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        w.idp.counters().refresh_calls,
        1,
        "the refresh is at the provider"
    );
    w.idp.resume();

    // Past the lease (30 s) and the lease wait (35 s), the leader still unpolled.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let joined = broker.retrieve(&caller, &w.key).await.unwrap();
    assert!(
        w.idp
            .is_active(joined.tokens.access_token().expose_secret())
    );
    assert_ne!(rt(&w.stored_set().await), rt(&linked));
    assert_eq!(w.idp.counters().refresh_calls, 1);
    assert_eq!(w.idp.counters().reuse_detected, 0);
    w.assert_no_lease_held().await;
    drop(leader);
    w.assert_link_alive(&broker).await;
}

/// Scenario 2a: a narrowed read dropped after the provider rotated the refresh token and
/// before the write landed. The write lands all the same.
#[tokio::test(start_paused = true)]
async fn scenario_2_a_narrowed_read_dropped_mid_refresh_loses_nothing() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let linked = w.link(&broker).await;
    w.store.hold_writes();
    let reader = {
        let (broker, caller, key) = (broker.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move {
            broker
                .retrieve_narrowed(&caller, &key, &Scopes::parse("openid"))
                .await
        })
    };
    w.store.wait_for_held_write().await;
    reader.abort();
    assert!(reader.await.unwrap_err().is_cancelled());
    w.store.release_writes();

    w.wait_for_rotation(&linked).await;
    w.assert_no_lease_held().await;
    w.assert_link_alive(&broker).await;
}

/// Scenario 2b: `send_authorized`'s forced refresh (the resource server answered 401),
/// dropped between the provider's answer and the write, as hyper drops a handler whose client
/// went away.
#[tokio::test(start_paused = true)]
async fn scenario_2_send_authorized_dropped_mid_forced_refresh_loses_nothing() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let linked = w.link(&broker).await;
    let resource_server = |_request: HttpRequest| async {
        Ok::<_, HttpError>(
            http::Response::builder()
                .status(401)
                .body(Vec::new())
                .unwrap(),
        )
    };
    let resource_server: Arc<dyn tokenbroker::http::HttpClient> = Arc::new(resource_server);
    w.store.hold_writes();
    let sender = {
        let (broker, caller, key) = (broker.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move {
            let request = http::Request::get("https://api.example/me")
                .body(Vec::new())
                .unwrap();
            broker
                .send_authorized(&caller, &key, request, &*resource_server)
                .await
        })
    };
    w.store.wait_for_held_write().await;
    sender.abort();
    assert!(sender.await.unwrap_err().is_cancelled());
    w.store.release_writes();

    w.wait_for_rotation(&linked).await;
    w.assert_no_lease_held().await;
    w.assert_link_alive(&broker).await;
}

/// Scenario 2c: a sweep dropped mid-refresh (hosts wrap sweeps in `timeout`; its `JoinSet`
/// aborts the refresh tasks it spawned).
#[tokio::test(start_paused = true)]
async fn scenario_2_a_sweep_dropped_mid_refresh_loses_nothing() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let linked = w.link(&broker).await;
    w.store.hold_writes();
    let sweep = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.sweep(SweepOptions::new(2 * HOUR)).await })
    };
    w.store.wait_for_held_write().await;
    sweep.abort();
    assert!(sweep.await.unwrap_err().is_cancelled());
    w.store.release_writes();

    w.wait_for_rotation(&linked).await;
    w.assert_no_lease_held().await;
    w.assert_link_alive(&broker).await;
}

/// Scenario 3a: a re-login whose answer carries no new refresh token (Google; `oidc-provider`
/// without `prompt=consent`) writes while a refresh is between the provider and its write.
/// The re-login's record still holds the refresh token the refresh just spent, so the rotated
/// one is written on top of it instead of being dropped.
#[tokio::test(start_paused = true)]
async fn scenario_3_a_relogin_without_refresh_token_during_a_refresh_keeps_the_rotated_token() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let linked = w.link(&broker).await;
    w.expire().await;
    w.store.hold_writes();
    let reader = {
        let (broker, caller, key) = (broker.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.store.wait_for_held_write().await;

    // The re-login writes first: it finds the record holding the spent token, and its answer
    // has no refresh token, so it keeps that one.
    w.idp.set_omit_refresh_token(true);
    let relogin = {
        let broker = broker.clone();
        let start = broker
            .begin_login(&w.key, LoginOptions::default())
            .await
            .unwrap();
        let callback = w.idp.approve(&start.authorization_url, "alice").unwrap();
        tokio::spawn(async move { broker.complete_login(start.pending, &callback).await })
    };
    let relinked = relogin.await.unwrap().unwrap();
    w.store.release_writes();
    assert_eq!(
        rt(&relinked.tokens),
        rt(&linked),
        "the re-login kept the refresh token it found"
    );
    let read = reader.await.unwrap().unwrap();
    assert!(w.idp.is_active(read.tokens.access_token().expose_secret()));

    let stored = w.stored_set().await;
    assert_ne!(
        rt(&stored),
        rt(&linked),
        "the spent refresh token is not the stored one"
    );
    assert_eq!(rt(&stored), rt(&read.tokens));
    w.idp.set_omit_refresh_token(false);
    w.assert_no_lease_held().await;
    w.assert_link_alive(&broker).await;
}

/// Scenario 3b: a writer that is not a refresh and carries the spent refresh token: written
/// with a plain compare-and-swap between the refresh's load and its write (what a key rotation
/// does). The rotated token is merged onto it.
#[tokio::test(start_paused = true)]
async fn scenario_3_a_concurrent_rewrite_of_the_spent_token_gets_the_rotated_one_on_top() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let linked = w.link(&broker).await;
    w.expire().await;
    w.store.hold_writes();
    let reader = {
        let (broker, caller, key) = (broker.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.store.wait_for_held_write().await;
    // Rewrite the record as it is (same tokens, new version), straight on the inner store.
    let current = w.store.inner.load(&w.key).await.unwrap().unwrap();
    w.store
        .inner
        .compare_and_swap(&w.key, current.version, &current.record, None)
        .await
        .unwrap();
    w.store.release_writes();
    let read = reader.await.unwrap().unwrap();
    assert!(w.idp.is_active(read.tokens.access_token().expose_secret()));
    let stored = w.stored_set().await;
    assert_ne!(rt(&stored), rt(&linked));
    assert_eq!(rt(&stored), rt(&read.tokens));
    let merged = w
        .events
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, BrokerEvent::MergedOntoConcurrentWrite { .. }))
        .count();
    assert_eq!(merged, 1);
    w.assert_link_alive(&broker).await;
}

/// Scenario 4: a stale release by the same instance. A lease this instance took earlier and
/// outlived (as a refresh stuck in a slow store call would) is released while the same
/// instance holds a newer lease on the key, with its refresh at the provider. Releases are
/// fenced by the acquisition's token, so the newer lease stays held and a second instance
/// does not refresh at the same time.
#[tokio::test(start_paused = true)]
async fn scenario_4_a_stale_release_by_the_same_instance_frees_nothing() {
    let w = World::new();
    let a = w.instance(ProviderPolicy::default());
    let b = w.instance(ProviderPolicy::default());
    w.link(&a).await;
    let LeaseAttempt::Acquired(stale) = w
        .store
        .try_lease(&w.key, a.holder(), Duration::from_secs(30))
        .await
        .unwrap()
    else {
        panic!("lease");
    };
    w.expire().await; // the stale lease ran out long ago
    w.idp.pause();
    let reader_a = {
        let (broker, caller, key) = (a.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.idp.wait_for_refresh_calls(1).await;
    // The stale holder lets go of "its" lease: by token, so this frees nothing.
    w.store.release_lease(&stale).await.unwrap();
    let reader_b = {
        let (broker, caller, key) = (b.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.idp.counters().refresh_calls, 1, "B waits for A's lease");
    w.idp.resume();
    let got_a = reader_a.await.unwrap().unwrap();
    let got_b = reader_b.await.unwrap().unwrap();
    assert_eq!(
        got_a.tokens.access_token().expose_secret(),
        got_b.tokens.access_token().expose_secret()
    );
    assert_eq!(w.idp.counters().refresh_calls, 1);
    assert_eq!(w.idp.counters().reuse_detected, 0);
    w.assert_no_lease_held().await;
}

/// Scenario 5a: `aud:<anything>` is refused by policy before anything is sent, unless the
/// provider's policy allows that audience.
#[tokio::test(start_paused = true)]
async fn scenario_5_audiences_are_checked_against_the_policy() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default().allow_audience("billing"));
    w.link(&broker).await;
    let refused = broker
        .retrieve_narrowed(&w.caller(), &w.key, &Scopes::parse("aud:admin"))
        .await;
    assert!(
        matches!(&refused, Err(Error::AudienceNotAllowed { audience, .. }) if audience == "admin"),
        "{refused:?}"
    );
    assert_eq!(w.idp.counters().refresh_calls, 0);
}

/// Scenario 5b: `invalid_scope` on a narrowed refresh is the narrowed read's own typed error;
/// the link is not backed off, and its next plain refresh goes to the provider.
#[tokio::test(start_paused = true)]
async fn scenario_5_invalid_scope_on_a_narrowed_refresh_does_not_back_the_link_off() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    w.link(&broker).await;
    w.idp.inject(FakeFault::Error(ProviderError::Rejected {
        error: "invalid_scope".into(),
        description: None,
        status: 400,
    }));
    let narrowed = broker
        .retrieve_narrowed(&w.caller(), &w.key, &Scopes::parse("openid"))
        .await;
    assert!(
        matches!(narrowed, Err(Error::NarrowedRefused { .. })),
        "{narrowed:?}"
    );
    assert!(
        matches!(
            broker.status(&w.key).await.unwrap(),
            GrantStatus::Active { .. }
        ),
        "no backoff"
    );
    let calls = w.idp.counters().refresh_calls;
    w.assert_link_alive(&broker).await;
    assert_eq!(
        w.idp.counters().refresh_calls,
        calls + 1,
        "the link refreshed at once"
    );
}

/// Scenario 5c: Microsoft's `interaction_required` (or `consent_required`) on a narrowed
/// refresh comes back as `invalid_grant`; it must not mark the link relink-required while the
/// link's own refresh token is alive.
#[tokio::test(start_paused = true)]
async fn scenario_5_invalid_grant_on_a_narrowed_refresh_does_not_mark_the_link() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    w.link(&broker).await;
    w.idp.inject(FakeFault::Error(ProviderError::InvalidGrant {
        description: Some("interaction_required: AADSTS65001".into()),
    }));
    let narrowed = broker
        .retrieve_narrowed(&w.caller(), &w.key, &Scopes::parse("openid"))
        .await;
    assert!(
        matches!(narrowed, Err(Error::NarrowedRefused { .. })),
        "{narrowed:?}"
    );
    assert!(
        matches!(
            broker.status(&w.key).await.unwrap(),
            GrantStatus::Active { .. }
        ),
        "the link is not marked"
    );
    w.assert_link_alive(&broker).await;
}
