//! Metrics, spans and graceful shutdown (issue 14).
//!
//! Metrics are read back through `metrics-util`'s `DebuggingRecorder`, installed for the
//! broker only (`metrics::with_local_recorder` around `build()`: the broker resolves its
//! handles then), so tests do not share counters. Spans are captured by a `tracing` layer set
//! as the test thread's default subscriber (tokio's test runtime is single-threaded, so the
//! engine's flights run on it too). Time is tokio's paused clock; upstream calls are counted
//! at the fake provider, never timed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use time::OffsetDateTime;
use tokenbroker::provider::ProviderError;
use tokenbroker::store::{LeaseAttempt, LeaseHolder};
use tokenbroker::testing::{FakeFault, FakeProvider};
use tokenbroker::{
    Caller, Clock, Error, LoginOptions, MemoryStore, ProviderPolicy, SweepOptions, TokenBroker,
    TokenKey, TokenSet, TokenStore,
};
use tracing::span;
use tracing_subscriber::layer::{Context, SubscriberExt};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct TokioClock {
    start: OffsetDateTime,
    origin: tokio::time::Instant,
}

impl Clock for TokioClock {
    fn now(&self) -> OffsetDateTime {
        self.start + self.origin.elapsed()
    }
}

struct World {
    idp: Arc<FakeProvider>,
    clock: Arc<TokioClock>,
    store: Arc<MemoryStore>,
    key: TokenKey,
    /// Every token seen anywhere in the test (stored or handed out), to search labels and
    /// span fields for.
    secrets: Mutex<BTreeSet<String>>,
}

impl World {
    fn new() -> World {
        let clock = Arc::new(TokioClock {
            start: OffsetDateTime::now_utc(),
            origin: tokio::time::Instant::now(),
        });
        World {
            idp: Arc::new(FakeProvider::new("fake").unwrap()),
            store: Arc::new(MemoryStore::with_clock(clock.clone())),
            clock,
            key: TokenKey::parse("acme", "alice", "fake").unwrap(),
            secrets: Mutex::default(),
        }
    }

    fn broker(&self) -> TokenBroker {
        TokenBroker::builder()
            .with_provider(
                self.idp.clone(),
                ProviderPolicy::default().expose_refresh_token(true),
            )
            .with_store(self.store.clone())
            .with_clock(self.clock.clone())
            .build()
            .unwrap()
    }

    fn caller(&self, key: &TokenKey) -> Caller {
        Caller::new(key.realm.clone(), key.subject.clone(), "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    async fn link(&self, broker: &TokenBroker, key: &TokenKey) -> TokenSet {
        let start = broker
            .begin_login(key, LoginOptions::default())
            .await
            .unwrap();
        let callback = self
            .idp
            .approve(&start.authorization_url, key.subject.as_str())
            .unwrap();
        broker
            .complete_login(start.pending, &callback)
            .await
            .unwrap();
        self.stored(key).await
    }

    /// The stored set of `key`; its tokens join the secrets searched for.
    async fn stored(&self, key: &TokenKey) -> TokenSet {
        let stored = self.store.load(key).await.unwrap().expect("linked");
        let set = TokenSet::from_payload(&stored.record.payload).unwrap();
        self.remember(&set);
        set
    }

    fn remember(&self, set: &TokenSet) {
        let mut secrets = self.secrets.lock().unwrap();
        secrets.insert(set.access_token().expose_secret().to_owned());
        if let Some(rt) = set.refresh_token() {
            secrets.insert(rt.expose_secret().to_owned());
        }
        if let Some(id) = set.id_token() {
            secrets.insert(id.expose_secret().to_owned());
        }
    }

    async fn expire(&self) {
        tokio::time::sleep(HOUR + Duration::from_secs(1)).await;
    }

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
}

fn rt(set: &TokenSet) -> Option<String> {
    set.refresh_token().map(|t| t.expose_secret().to_owned())
}

// ---------------------------------------------------------------------------------------------
// Metrics

type Labels = BTreeMap<String, String>;

/// What the recorder saw, summed over snapshots (a snapshot drains counters and histograms).
#[derive(Default)]
struct Seen {
    counters: HashMap<(String, Labels), u64>,
    histograms: HashMap<(String, Labels), usize>,
    gauges: HashMap<(String, Labels), f64>,
    label_sets: Vec<Labels>,
}

impl Seen {
    fn take(&mut self, snapshotter: &Snapshotter) {
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let (_, key) = key.into_parts();
            let labels: Labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            self.label_sets.push(labels.clone());
            let id = (key.name().to_owned(), labels);
            match value {
                DebugValue::Counter(n) => *self.counters.entry(id).or_default() += n,
                DebugValue::Histogram(values) => {
                    *self.histograms.entry(id).or_default() += values.len()
                }
                DebugValue::Gauge(v) => {
                    self.gauges.insert(id, v.into_inner());
                }
            }
        }
    }

    fn id(name: &str, labels: &[(&str, &str)]) -> (String, Labels) {
        (
            name.to_owned(),
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.counters
            .get(&Self::id(name, labels))
            .copied()
            .unwrap_or(0)
    }

    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> usize {
        self.histograms
            .get(&Self::id(name, labels))
            .copied()
            .unwrap_or(0)
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.gauges.get(&Self::id(name, labels)).copied()
    }
}

fn read(outcome: &'static str) -> [(&'static str, &'static str); 2] {
    [("provider", "fake"), ("outcome", outcome)]
}

/// The tests of this file run one at a time. `tracing` caches per call site whether anyone
/// listens, and a call site first reached by another test, while the span test's subscriber was
/// being registered on its thread, could be cached as unheard and never reach that subscriber.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

#[tokio::test(start_paused = true)]
async fn metrics_count_reads_refreshes_relinks_and_sweeps_with_low_cardinality_labels() {
    let _serial = serial().await;
    use tokenbroker::telemetry::*;
    let w = World::new();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let broker = metrics::with_local_recorder(&recorder, || w.broker());
    let mut seen = Seen::default();
    let fake = [("provider", "fake")];

    // A served (cached) read.
    let linked = w.link(&broker, &w.key).await;
    let got = broker.retrieve(&w.caller(&w.key), &w.key).await.unwrap();
    assert!(!got.refreshed);
    seen.take(&snapshotter);
    assert_eq!(seen.counter(READS, &read("served")), 1);
    assert_eq!(seen.samples(READ_DURATION, &fake), 1);
    assert_eq!(seen.counter(REFRESHES, &read("rotated")), 0);

    // A read that refreshes (the fake provider rotates).
    w.expire().await;
    let got = broker.retrieve(&w.caller(&w.key), &w.key).await.unwrap();
    assert!(got.refreshed);
    assert_ne!(rt(&w.stored(&w.key).await), rt(&linked));
    seen.take(&snapshotter);
    assert_eq!(seen.counter(READS, &read("refreshed")), 1);
    assert_eq!(seen.counter(REFRESHES, &read("rotated")), 1);
    assert_eq!(seen.samples(REFRESH_DURATION, &fake), 1);
    assert_eq!(seen.samples(READ_DURATION, &fake), 2);

    // A refresh the provider refuses: relink required.
    w.expire().await;
    w.idp.inject(FakeFault::Error(ProviderError::InvalidGrant {
        description: None,
    }));
    let refused = broker.retrieve(&w.caller(&w.key), &w.key).await;
    assert!(
        matches!(refused, Err(Error::RelinkRequired { .. })),
        "{refused:?}"
    );
    seen.take(&snapshotter);
    assert_eq!(seen.counter(REFRESHES, &read("relink_required")), 1);
    assert_eq!(seen.counter(READS, &read("error")), 1);
    assert_eq!(seen.samples(REFRESH_DURATION, &fake), 2);

    // A denied read, and reads of a provider the broker does not serve: the alias a caller
    // sends never becomes a label value.
    let stranger = Caller::new(w.key.realm.clone(), w.key.subject.clone(), "app");
    assert!(matches!(
        broker.retrieve(&stranger, &w.key).await,
        Err(Error::Forbidden)
    ));
    let elsewhere = TokenKey::parse("acme", "alice", "made-up-by-caller").unwrap();
    assert!(
        broker
            .retrieve(&w.caller(&elsewhere), &elsewhere)
            .await
            .is_err()
    );
    seen.take(&snapshotter);
    assert_eq!(seen.counter(READS, &read("denied")), 1);
    assert_eq!(
        seen.counter(
            READS,
            &[("provider", UNKNOWN_PROVIDER), ("outcome", "not_found")]
        ),
        1
    );

    // A sweep sets the links-by-health gauges: bob active, alice relink-required.
    let bob = TokenKey::parse("acme", "bob", "fake").unwrap();
    w.link(&broker, &bob).await;
    let report = broker.sweep(SweepOptions::new(HOUR / 2)).await.unwrap();
    assert!(!report.budget_exhausted);
    seen.take(&snapshotter);
    assert_eq!(seen.gauge(LINKS_ACTIVE, &fake), Some(1.0));
    assert_eq!(seen.gauge(LINKS_RELINK_REQUIRED, &fake), Some(1.0));
    assert_eq!(seen.gauge(LINKS_BACKOFF, &fake), Some(0.0));

    // Only the allowed label keys, and no label value that names a user, a realm or a token.
    w.stored(&bob).await;
    let secrets = w.secrets.lock().unwrap().clone();
    assert!(secrets.len() >= 6, "tokens were collected");
    let allowed: BTreeSet<&str> = ["provider", "outcome"].into();
    assert!(!seen.label_sets.is_empty());
    for labels in &seen.label_sets {
        for (k, v) in labels {
            assert!(allowed.contains(k.as_str()), "label key {k}");
            for forbidden in ["alice", "bob", "acme", "made-up-by-caller"] {
                assert_ne!(v, forbidden, "label {k}={v}");
            }
            for secret in &secrets {
                assert!(!v.contains(secret.as_str()), "label {k} holds a token");
            }
        }
    }
    for name in seen.counters.keys().chain(seen.histograms.keys()) {
        assert!(name.0.starts_with("tokenbroker_"), "{}", name.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Spans

#[derive(Debug, Clone)]
struct CapturedSpan {
    name: &'static str,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<HashMap<u64, CapturedSpan>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, _: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0.lock().unwrap().insert(
            id.into_u64(),
            CapturedSpan {
                name: attrs.metadata().name(),
                fields,
            },
        );
    }
    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, _: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
}

#[tokio::test(start_paused = true)]
async fn spans_carry_the_provider_and_a_salted_subject_hash_never_the_subject_or_a_token() {
    let _serial = serial().await;
    let spans = Spans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let w = World::new();
    let broker = w.broker();

    let linked = w.link(&broker, &w.key).await;
    let got = broker.retrieve(&w.caller(&w.key), &w.key).await.unwrap();
    w.remember(
        &TokenSet::from_payload(&w.store.load(&w.key).await.unwrap().unwrap().record.payload)
            .unwrap(),
    );
    assert!(!got.refreshed);
    w.expire().await;
    let got = broker.retrieve(&w.caller(&w.key), &w.key).await.unwrap();
    assert!(got.refreshed);
    assert_ne!(rt(&w.stored(&w.key).await), rt(&linked));
    broker.unlink(&w.key).await.unwrap();

    let spans = spans
        .0
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect::<Vec<_>>();
    let hash = tokenbroker::telemetry::subject_hash(&w.key.subject);
    assert_eq!(hash.len(), 16);
    assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    let ours: Vec<_> = spans
        .iter()
        .filter(|s| s.name.starts_with("tokenbroker."))
        .collect();
    let names: BTreeSet<&str> = ours.iter().map(|s| s.name).collect();
    for name in [
        "tokenbroker.read",
        "tokenbroker.refresh",
        "tokenbroker.login",
        "tokenbroker.unlink",
    ] {
        assert!(names.contains(name), "no {name} span in {names:?}");
    }
    for span in &ours {
        assert_eq!(
            span.fields.get("provider").map(String::as_str),
            Some("fake")
        );
        assert_eq!(span.fields.get("subject_hash"), Some(&hash), "{span:?}");
    }
    let secrets = w.secrets.lock().unwrap().clone();
    assert!(secrets.len() >= 4, "tokens were collected");
    for span in &spans {
        for (field, value) in &span.fields {
            assert!(!value.contains("alice"), "{}.{field} = {value}", span.name);
            for secret in &secrets {
                assert!(
                    !value.contains(secret.as_str()),
                    "{}.{field} holds a token",
                    span.name
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shutdown

/// A refresh at the provider when shutdown begins is waited for: its rotated token is stored
/// and its lease released before shutdown returns. After that, no refresh starts (no upstream
/// call), while a valid token is still served. Shutdown is safe from several clones and twice.
#[tokio::test(start_paused = true)]
async fn shutdown_lets_a_refresh_in_flight_store_its_rotated_token_and_starts_no_new_one() {
    let _serial = serial().await;
    let w = World::new();
    let broker = w.broker();
    let linked = w.link(&broker, &w.key).await;
    w.expire().await;
    w.idp.pause();
    let reader = {
        let (broker, caller, key) = (broker.clone(), w.caller(&w.key), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.idp.wait_for_refresh_calls(1).await;

    // Two clones shut down at once while the provider still holds the call.
    let shutdowns = [broker.clone(), broker.clone()]
        .map(|b| tokio::spawn(async move { b.shutdown(Duration::from_secs(60)).await }));
    while !broker.is_shutting_down() {
        tokio::task::yield_now().await;
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(w.idp.counters().refresh_calls, 1);
    w.idp.resume();
    for shutdown in shutdowns {
        let report = shutdown.await.unwrap();
        assert_eq!((report.finished, report.running, report.parked), (1, 0, 0));
    }

    // Stored, handed out, lease free.
    let read = reader.await.unwrap().unwrap();
    assert!(read.refreshed);
    let stored = w.stored(&w.key).await;
    assert_ne!(rt(&stored), rt(&linked), "the rotated token was stored");
    assert_eq!(
        read.tokens.refresh_token().map(|t| t.expose_secret()),
        rt(&stored).as_deref()
    );
    assert!(w.idp.is_active(rt(&stored).as_deref().unwrap()));
    w.assert_no_lease_held().await;

    // A valid token is still served; one that needs a refresh is refused without a call.
    let cached = broker.retrieve(&w.caller(&w.key), &w.key).await.unwrap();
    assert!(!cached.refreshed);
    w.expire().await;
    let refused = broker.retrieve(&w.caller(&w.key), &w.key).await;
    assert!(
        matches!(refused, Err(Error::ShuttingDown { .. })),
        "{refused:?}"
    );
    let swept = broker.sweep(SweepOptions::new(HOUR)).await.unwrap();
    assert!(swept.refreshed.is_empty());
    assert_eq!(
        w.idp.counters().refresh_calls,
        1,
        "no upstream call after shutdown"
    );
    assert_eq!(w.idp.counters().reuse_detected, 0);

    // Again: nothing left to wait for.
    let again = broker.clone().shutdown(Duration::from_secs(60)).await;
    assert_eq!((again.finished, again.running), (0, 0));
    assert_eq!(rt(&w.stored(&w.key).await), rt(&stored));
}

/// A flight stuck at the provider past the deadline: shutdown returns at the deadline and
/// reports it running. The flight is not cancelled: once the provider answers, the rotated
/// token is stored all the same.
#[tokio::test(start_paused = true)]
async fn shutdown_returns_at_its_deadline_and_reports_a_stuck_flight_which_still_stores() {
    let _serial = serial().await;
    let w = World::new();
    let broker = w.broker();
    let linked = w.link(&broker, &w.key).await;
    w.expire().await;
    w.idp.pause();
    let reader = {
        let (broker, caller, key) = (broker.clone(), w.caller(&w.key), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.idp.wait_for_refresh_calls(1).await;

    // The provider call's time-out is 10 s; the deadline is 1 s (paused clock: it advances
    // only while everything waits).
    let report = broker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((report.finished, report.running), (0, 1));
    assert!(!reader.is_finished());

    w.idp.resume();
    let read = reader.await.unwrap().unwrap();
    assert!(read.refreshed);
    let stored = w.stored(&w.key).await;
    assert_ne!(rt(&stored), rt(&linked));
    w.assert_no_lease_held().await;
    let after = broker.shutdown(Duration::from_secs(1)).await;
    assert_eq!((after.finished, after.running), (0, 0));
    assert_eq!(w.idp.counters().refresh_calls, 1);
}
