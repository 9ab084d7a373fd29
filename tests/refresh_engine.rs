//! The five ways the refresh protocol used to break off the plain `retrieve` path (issue 11),
//! each as its own regression test, with the broker's **default timing** (refresh time-out
//! 10 s, lease 30 s, lease wait 35 s): no lease wait shortened below the lease TTL.
//!
//! Time is tokio's paused clock, and the broker and the store read it through [`TokioClock`],
//! so leases expire in virtual time exactly as they would in real time. The provider is the
//! strict `FakeProvider`: rotating refresh tokens, and a consumed one presented again revokes
//! the whole grant. Nothing asserts on wall-clock time; upstream calls are counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use tokenbroker::http::{HttpError, HttpRequest};
use tokenbroker::provider::ProviderError;
use tokenbroker::store::{
    Lease, LeaseAttempt, LeaseHolder, LeaseToken, Record, StoredRecord, Version,
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
    /// Every compare-and-swap fails as a backend error (a database that is down).
    fail_writes: AtomicBool,
    /// Every load takes this long (a database that is slow).
    load_delay: Mutex<Duration>,
}

impl GatedStore {
    fn new(clock: Arc<TokioClock>) -> Arc<Self> {
        Arc::new(GatedStore {
            inner: MemoryStore::with_clock(clock),
            hold_writes: watch::channel(false).0,
            writes_waiting: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
            load_delay: Mutex::new(Duration::ZERO),
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
        let delay = *self.load_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
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
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(StoreError::backend(
                "gated",
                std::io::Error::other("database is down"),
            ));
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
        cursor: Option<&tokenbroker::store::ScanCursor>,
        limit: usize,
    ) -> Result<tokenbroker::store::ScanPage, StoreError> {
        self.inner.scan(cursor, limit).await
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

    // The revocation outbox is passed through untouched.
    async fn delete_and_enqueue_revocation(
        &self,
        key: &tokenbroker::TokenKey,
        expected: Option<tokenbroker::store::Version>,
        revocation: &tokenbroker::store::PendingRevocation,
    ) -> Result<bool, tokenbroker::StoreError> {
        self.inner
            .delete_and_enqueue_revocation(key, expected, revocation)
            .await
    }
    async fn enqueue_revocation(
        &self,
        revocation: &tokenbroker::store::PendingRevocation,
    ) -> Result<(), tokenbroker::StoreError> {
        self.inner.enqueue_revocation(revocation).await
    }
    async fn claim_revocations(
        &self,
        now: time::OffsetDateTime,
        until: time::OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<tokenbroker::store::PendingRevocation>, tokenbroker::StoreError> {
        self.inner.claim_revocations(now, until, limit).await
    }
    async fn reschedule_revocation(
        &self,
        claimed: &tokenbroker::store::PendingRevocation,
        due_at: time::OffsetDateTime,
    ) -> Result<bool, tokenbroker::StoreError> {
        self.inner.reschedule_revocation(claimed, due_at).await
    }
    async fn remove_revocation(
        &self,
        id: &tokenbroker::store::RevocationId,
    ) -> Result<(), tokenbroker::StoreError> {
        self.inner.remove_revocation(id).await
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

    /// A broker instance on the shared store, with default timing. Reads expose the refresh
    /// token here, so that tests can follow rotation through what readers get.
    fn instance(&self, policy: ProviderPolicy) -> TokenBroker {
        TokenBroker::builder()
            .with_provider(self.idp.clone(), policy.expose_refresh_token(true))
            .with_store(self.store.clone())
            .with_clock(self.clock.clone())
            .with_event_sink(self.events.clone())
            .build()
            .unwrap()
    }

    fn caller(&self) -> Caller {
        Caller::new(self.key.realm.clone(), self.key.subject.clone(), "app")
            .with_role("read-token")
            .with_full_client_scope()
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
            .unwrap();
        self.stored_set().await
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

/// The refresh token of a stored set, or of what a read handed out.
trait RefreshToken {
    fn refresh(&self) -> Option<&tokenbroker::Secret>;
}

impl RefreshToken for TokenSet {
    fn refresh(&self) -> Option<&tokenbroker::Secret> {
        self.refresh_token()
    }
}

impl RefreshToken for tokenbroker::TokenView {
    fn refresh(&self) -> Option<&tokenbroker::Secret> {
        self.refresh_token()
    }
}

fn rt(set: &impl RefreshToken) -> Option<String> {
    set.refresh().map(|t| t.expose_secret().to_owned())
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

// ---------------------------------------------------------------------------------------------
// The engine's smaller rules.

fn count(events: &Events, f: impl Fn(&BrokerEvent) -> bool) -> usize {
    events.0.lock().unwrap().iter().filter(|e| f(e)).count()
}

/// A lost race to a record with another refresh token whose access token has already expired
/// is not an error for the reader: the flight takes another turn and refreshes the winner's
/// token (and never the one it spent).
#[tokio::test(start_paused = true)]
async fn a_lost_race_to_an_expired_winner_refreshes_the_winner() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    w.link(&broker).await;
    w.expire().await;
    w.store.hold_writes();
    let reader = {
        let (broker, caller, key) = (broker.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.store.wait_for_held_write().await;
    // A re-link that brought a new grant, written with an access token that is already past
    // its expiry by the time the refresh looks at it.
    let start = broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let callback = w.idp.approve(&start.authorization_url, "alice").unwrap();
    broker
        .complete_login(start.pending, &callback)
        .await
        .unwrap();
    let relinked = w.stored_set().await;
    let current = w.store.inner.load(&w.key).await.unwrap().unwrap();
    let expired = relinked
        .clone()
        .with_expires_at(w.clock.now() - Duration::from_secs(1));
    let mut record = current.record.clone();
    record.payload = expired.to_payload();
    w.store
        .inner
        .compare_and_swap(&w.key, current.version, &record, None)
        .await
        .unwrap();
    w.store.release_writes();

    let read = reader.await.unwrap().unwrap();
    assert!(w.idp.is_active(read.tokens.access_token().expose_secret()));
    assert_ne!(
        rt(&read.tokens),
        rt(&relinked),
        "the winner's token was refreshed"
    );
    assert_eq!(w.idp.counters().refresh_calls, 2);
    assert_eq!(w.idp.counters().reuse_detected, 0);
    assert_eq!(
        count(&w.events, |e| matches!(e, BrokerEvent::LostRace { .. })),
        1
    );
}

/// An unlink that lands while a refresh is between the provider and its write: the refresh's
/// rotated token belongs to no link any more, so it is revoked rather than left alive upstream.
#[tokio::test(start_paused = true)]
async fn an_unlink_during_a_refresh_revokes_the_rotated_token_too() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    w.link(&broker).await;
    w.expire().await;
    w.store.hold_writes();
    let reader = {
        let (broker, caller, key) = (broker.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.store.wait_for_held_write().await;
    let unlinked = broker.unlink(&w.key).await.unwrap();
    assert!(unlinked.deleted);
    w.store.release_writes();
    let read = reader.await.unwrap();
    assert!(matches!(read, Err(Error::NotFound { .. })), "{read:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        w.idp.counters().revocations,
        2,
        "the old and the rotated token"
    );
    assert!(w.store.load(&w.key).await.unwrap().is_none());
}

/// A store that does not take the write of a rotated set: retried for a lease's length, then
/// kept in memory and written in the background once the store is back. Meanwhile reads on
/// this instance say so, and never present the spent token again.
#[tokio::test(start_paused = true)]
async fn a_store_that_refuses_the_write_gets_the_rotated_set_once_it_is_back() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let linked = w.link(&broker).await;
    w.expire().await;
    w.store.fail_writes.store(true, Ordering::SeqCst);
    let first = broker.retrieve(&w.caller(), &w.key).await;
    assert!(
        matches!(first, Err(Error::WritePending { .. })),
        "{first:?}"
    );
    let again = broker.retrieve(&w.caller(), &w.key).await;
    assert!(
        matches!(again, Err(Error::WritePending { .. })),
        "{again:?}"
    );
    assert_eq!(
        w.idp.counters().refresh_calls,
        1,
        "the spent token is not presented again"
    );
    assert_eq!(
        count(&w.events, |e| matches!(e, BrokerEvent::WriteParked { .. })),
        1
    );

    w.store.fail_writes.store(false, Ordering::SeqCst);
    let stored = w.wait_for_rotation(&linked).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        count(&w.events, |e| matches!(
            e,
            BrokerEvent::ParkedWriteResolved { stored: true, .. }
        )),
        1
    );
    let read = broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(!read.refreshed);
    assert_eq!(rt(&read.tokens), rt(&stored));
    assert_eq!(w.idp.counters().refresh_calls, 1);
    w.assert_link_alive(&broker).await;
}

/// Store calls that eat the lease leave no time for the provider: the engine releases the
/// lease and does not call the provider with a time-out it could not wait out.
#[tokio::test(start_paused = true)]
async fn the_provider_is_not_called_when_the_store_left_too_little_of_the_lease() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    w.link(&broker).await;
    w.expire().await;
    // Lease 30 s, margin 5 s: a 22 s load leaves 3 s, less than half the 10 s time-out.
    *w.store.load_delay.lock().unwrap() = Duration::from_secs(22);
    let read = broker.retrieve(&w.caller(), &w.key).await;
    assert!(matches!(read, Err(Error::Unavailable { .. })), "{read:?}");
    assert_eq!(w.idp.counters().refresh_calls, 0);
    *w.store.load_delay.lock().unwrap() = Duration::ZERO;
    w.assert_no_lease_held().await;
    w.assert_link_alive(&broker).await;
}

/// A request that got no answer may have spent the token. A provider known to keep old tokens
/// valid is asked again at once; a strict one is not.
#[tokio::test(start_paused = true)]
async fn a_time_out_is_asked_again_only_where_reuse_is_tolerated() {
    for tolerated in [true, false] {
        let w = World::new();
        w.idp.set_strict_reuse(!tolerated);
        let broker = w.instance(ProviderPolicy::default());
        w.link(&broker).await;
        w.expire().await;
        w.idp.inject(FakeFault::Delay(Duration::from_secs(60)));
        let read = broker.retrieve(&w.caller(), &w.key).await;
        if tolerated {
            assert!(read.is_ok(), "{read:?}");
            assert_eq!(w.idp.counters().refresh_calls, 2);
        } else {
            assert!(matches!(read, Err(Error::Unavailable { .. })), "{read:?}");
            assert_eq!(w.idp.counters().refresh_calls, 1);
        }
    }
}

/// `Retry-After` is honoured past a minute, up to the configured maximum.
#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_up_to_the_configured_maximum() {
    for (max, expected) in [(None, 600), (Some(Duration::from_secs(300)), 300)] {
        let w = World::new();
        let mut builder = TokenBroker::builder()
            .with_provider(w.idp.clone(), ProviderPolicy::default())
            .with_store(w.store.clone())
            .with_clock(w.clock.clone());
        if let Some(max) = max {
            builder = builder.with_max_retry_after(max);
        }
        let broker = builder.build().unwrap();
        w.link(&broker).await;
        w.expire().await;
        w.idp.inject(FakeFault::Error(ProviderError::Transient {
            status: Some(503),
            retry_after: Some(Duration::from_secs(600)),
            reason: None,
            source: None,
        }));
        let read = broker.retrieve(&w.caller(), &w.key).await;
        match read {
            Err(Error::Unavailable { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(expected)))
            }
            other => panic!("{other:?}"),
        }
        let GrantStatus::Backoff { until, .. } = broker.status(&w.key).await.unwrap() else {
            panic!("backing off");
        };
        assert_eq!((until - w.clock.now()).whole_seconds(), expected as i64);
    }
}

/// The backoff without `Retry-After` doubles up to the configured maximum.
#[tokio::test(start_paused = true)]
async fn the_maximum_backoff_is_configurable() {
    let w = World::new();
    let broker = TokenBroker::builder()
        .with_provider(w.idp.clone(), ProviderPolicy::default())
        .with_store(w.store.clone())
        .with_clock(w.clock.clone())
        .with_max_backoff(Duration::from_secs(3))
        .build()
        .unwrap();
    w.link(&broker).await;
    w.expire().await;
    for _ in 0..5 {
        w.idp.inject(FakeFault::Error(ProviderError::Transient {
            status: Some(503),
            retry_after: None,
            reason: None,
            source: None,
        }));
        let _ = broker.retrieve(&w.caller(), &w.key).await;
        let GrantStatus::Backoff { until, .. } = broker.status(&w.key).await.unwrap() else {
            panic!("backing off");
        };
        assert!(until - w.clock.now() <= time::Duration::seconds(3));
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
}

/// The lease must outlast the refresh time-out by the configured margin.
#[test]
fn the_lease_margin_is_checked_when_the_broker_is_built() {
    let built = TokenBroker::builder()
        .with_refresh_timeout(Duration::from_secs(10))
        .with_lease_ttl(Duration::from_secs(15))
        .with_lease_margin(Duration::from_secs(6))
        .build();
    assert!(matches!(built, Err(Error::Config(_))));
    let built = TokenBroker::builder()
        .with_refresh_timeout(Duration::from_secs(10))
        .with_lease_ttl(Duration::from_secs(15))
        .with_lease_margin(Duration::from_secs(5))
        .build();
    assert!(built.is_ok());
}

/// An access token that cannot be a header value is an error, not a request sent without
/// `Authorization`.
#[tokio::test(start_paused = true)]
async fn send_authorized_refuses_a_token_that_is_not_a_header_value() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    let now = w.clock.now();
    let set =
        TokenSet::new(tokenbroker::Secret::new("line\nbreak"), now).with_expires_at(now + HOUR);
    let record = Record::new(
        set.to_payload(),
        tokenbroker::store::RecordMeta::new(
            tokenbroker::store::LinkState::Active,
            set.expires_at(),
            now,
            now,
        ),
    );
    w.store.insert(&w.key, &record).await.unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let resource_server = move |_request: HttpRequest| {
        counter.fetch_add(1, Ordering::SeqCst);
        async {
            Ok::<_, HttpError>(
                http::Response::builder()
                    .status(200)
                    .body(Vec::new())
                    .unwrap(),
            )
        }
    };
    let request = http::Request::get("https://api.example/me")
        .body(Vec::new())
        .unwrap();
    let outcome = broker
        .send_authorized(&w.caller(), &w.key, request, &resource_server)
        .await;
    assert!(
        matches!(outcome, Err(Error::InvalidAccessToken { .. })),
        "{outcome:?}"
    );
    assert_eq!(sent.load(Ordering::SeqCst), 0);
}

/// A provider that panics mid-refresh (a bug in a host's own `Provider`): the reader gets
/// `Error::Internal`, the lease is released, and the next read refreshes normally.
#[tokio::test(start_paused = true)]
async fn a_panicking_provider_releases_the_lease_and_the_next_read_works() {
    let w = World::new();
    let broker = w.instance(ProviderPolicy::default());
    w.link(&broker).await;
    w.expire().await;
    w.idp.inject(FakeFault::Panic);
    let read = broker.retrieve(&w.caller(), &w.key).await;
    assert!(matches!(read, Err(Error::Internal(_))), "{read:?}");
    w.assert_no_lease_held().await;
    let read = broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(read.refreshed);
    assert!(w.idp.is_active(read.tokens.access_token().expose_secret()));
    assert_eq!(w.idp.counters().reuse_detected, 0);
}
