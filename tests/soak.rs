//! Soak: three broker instances over one store (a SQLite file with a pool each; a shared
//! MemoryStore), a FakeIdp with rotation and reuse detection, a shared `ManualClock` that a
//! task moves forward fast (so access tokens expire every few hundred milliseconds), random
//! injected upstream faults, one grant revoked at the IdP mid-run, and concurrent readers.
//!
//! Beside the readers, callers that give up: every entry point (`retrieve`,
//! `retrieve_in_session`, `send_authorized` against a resource server that answers 401 half the
//! time, `sweep`, the token endpoint, token exchange) started and dropped after a random few
//! milliseconds, wherever it is. Re-logins, with and without a new refresh token, race the
//! refreshes; over the memory store, instances encrypt under different primary keys and a task
//! rewraps every link to one of them all the time.
//!
//! At the end: links lost = 0, refresh tokens presented twice = 0, reads that returned an
//! expired token = 0 (a `stale` token only while faults were being injected, and never an
//! expired one), links marked relink-required that the IdP did not revoke = 0.
//!
//! Runs about 60 s; `TOKENBROKER_SOAK_SECONDS` changes that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::endpoints;
use tokenbroker::http::{HttpClient, HttpError, HttpRequest};
use tokenbroker::provider::OAuth2Config;
use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, Fault, ManualClock};
use tokenbroker::{
    Callback, Caller, Clock, Error, LoginOptions, MemoryStore, ProviderId, ProviderPolicy, Scopes,
    Secret, SweepOptions, TokenBroker, TokenKey, TokenSet, TokenStore,
};

const INSTANCES: usize = 3;
const USERS: usize = 6;
const READERS: usize = 12;
/// Tasks that start a call on a random entry point and drop it after a few milliseconds.
const DROPPERS: usize = 3;
/// Access-token lifetime the IdP grants, in clock time; the broker refreshes 60 s (its skew)
/// before the end.
const ACCESS_TTL: Duration = Duration::from_secs(120);
/// Generous, so that a loaded CI machine does not turn a slow answer into a time-out in the
/// quiet phase (where every read must be fresh).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(2);
/// After the last fault: time for back-offs and delayed answers to run out.
const QUIET_GRACE: Duration = Duration::from_secs(5);

fn soak_duration() -> Duration {
    let secs = std::env::var("TOKENBROKER_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// A small xorshift: deterministic enough, no extra dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn key(user: usize) -> TokenKey {
    TokenKey::parse("acme", &format!("user-{user}"), "fake").unwrap()
}

fn caller(key: &TokenKey) -> Caller {
    Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope()
}

fn config(idp: &FakeIdp) -> OAuth2Config {
    OAuth2Config::new(
        ProviderId::new("fake").unwrap(),
        idp.client_id(),
        idp.authorization_endpoint(),
        idp.token_endpoint(),
        "http://127.0.0.1:9/callback".parse().unwrap(),
    )
    .with_client_secret(Secret::new(idp.client_secret()))
    .with_scopes(Scopes::parse("offline_access"))
}

fn broker(idp: &FakeIdp, store: Arc<dyn TokenStore>, clock: Arc<ManualClock>) -> TokenBroker {
    TokenBroker::builder()
        .with_oauth2_provider(config(idp), ProviderPolicy::default())
        .with_store(store)
        .with_clock(clock)
        .with_refresh_timeout(REFRESH_TIMEOUT)
        .with_lease_ttl(REFRESH_TIMEOUT + tokenbroker::LEASE_MARGIN)
        .build()
        .unwrap()
}

async fn link(idp: &FakeIdp, broker: &TokenBroker, key: &TokenKey) {
    let start = broker
        .begin_login(key, LoginOptions::default())
        .await
        .unwrap();
    let cb = idp
        .authorize(&start.authorization_url, key.subject.as_str())
        .unwrap();
    broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
}

fn faults() -> Vec<Fault> {
    let status = |status: u16, retry_after: Option<u64>| Fault::Status {
        status,
        body: "<html>down</html>".into(),
        retry_after,
    };
    vec![
        status(503, None),
        status(500, None),
        status(429, Some(1)),
        Fault::GarbageBody,
        Fault::TruncatedJson,
        Fault::DropConnection,
        Fault::ErrorWith200 {
            error: "temporarily_unavailable".into(),
        },
        // Beyond the refresh time-out: the broker gives up and the IdP never processes it.
        Fault::Delay(REFRESH_TIMEOUT * 2),
    ]
}

#[derive(Default, Debug)]
struct Tally {
    reads: AtomicU64,
    refreshed: AtomicU64,
    stale: AtomicU64,
    expired_reads: AtomicU64,
    stale_without_faults: AtomicU64,
    errors: Mutex<HashMap<String, u64>>,
    unexpected_errors: Mutex<Vec<String>>,
    dropped: AtomicU64,
    relogins: AtomicU64,
    rewrapped: AtomicU64,
}

/// Runs key rotation over the shared store, again and again (see `soak_..._memory_store`).
type Rewrapper = Arc<EncryptedStore<Arc<MemoryStore>>>;

/// A resource server that answers 401 to every other request, so `send_authorized` forces a
/// refresh half the time.
fn resource_server() -> Arc<dyn HttpClient> {
    let calls = Arc::new(AtomicU64::new(0));
    Arc::new(move |_request: HttpRequest| {
        let status = if calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
            401
        } else {
            200
        };
        async move {
            Ok::<_, HttpError>(
                http::Response::builder()
                    .status(status)
                    .body(Vec::new())
                    .unwrap(),
            )
        }
    })
}

/// Starts a call on one entry point; the caller drops it after a random few milliseconds.
async fn call_entry_point(
    entry: usize,
    broker: &TokenBroker,
    key: &TokenKey,
    http: &Arc<dyn HttpClient>,
) {
    let caller = caller(key);
    match entry {
        0 => drop(broker.retrieve(&caller, key).await),
        1 => drop(broker.retrieve_in_session(&caller, key, "session-1").await),
        2 => {
            let request = http::Request::get("https://api.example/me")
                .body(Vec::new())
                .unwrap();
            drop(broker.send_authorized(&caller, key, request, &**http).await)
        }
        3 => drop(
            broker
                .sweep(SweepOptions::new(ACCESS_TTL).with_concurrency(2))
                .await,
        ),
        4 => drop(endpoints::read_tokens(broker, Some(&caller), "acme", "fake").await),
        _ => {
            let form = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&requested_issuer=fake";
            let request = endpoints::ExchangeRequest::from_form(form).expect("a valid form");
            drop(endpoints::token_exchange(broker, Some(&caller), "acme", &request).await)
        }
    }
}

async fn soak(stores: Vec<Arc<dyn TokenStore>>, rewrapper: Option<Rewrapper>, label: &str) {
    let duration = soak_duration();
    let idp = Arc::new(
        FakeIdp::start(
            FakeIdpConfig::default()
                .with_id_token(false)
                .with_access_token_ttl(ACCESS_TTL),
        )
        .await
        .unwrap(),
    );
    let clock = Arc::new(ManualClock::starting_now());
    let brokers: Vec<TokenBroker> = stores
        .iter()
        .map(|s| broker(&idp, s.clone(), clock.clone()))
        .collect();
    for u in 0..USERS {
        link(&idp, &brokers[u % INSTANCES], &key(u)).await;
    }
    let revoked_user = USERS - 1;
    let revoked = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let faults_on = Arc::new(AtomicBool::new(true));
    let faults_injected = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();

    // The clock: 1 s of token time every 10 ms, so a token is due every ~0.6 s of real time.
    {
        let (clock, stop) = (clock.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                clock.advance(Duration::from_secs(1));
            }
        }));
    }
    // Faults: one every ~150 ms, for the first two thirds of the run; then a quiet phase in
    // which every read must be fresh.
    {
        let (idp, stop, on, n) = (
            idp.clone(),
            stop.clone(),
            faults_on.clone(),
            faults_injected.clone(),
        );
        let quiet_after = duration * 2 / 3;
        tasks.push(tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let all = faults();
            let mut rng = Rng::new(7);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                if started.elapsed() >= quiet_after {
                    if on.swap(false, Ordering::SeqCst) {
                        idp.clear_faults();
                    }
                    continue;
                }
                if idp.pending_faults() < 2 {
                    idp.inject(all[rng.below(all.len())].clone());
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // One grant revoked at the IdP, a third of the way in.
    {
        let (idp, stop, revoked) = (idp.clone(), stop.clone(), revoked.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(duration / 3).await;
            if !stop.load(Ordering::Relaxed) {
                revoked.store(true, Ordering::SeqCst);
                idp.revoke_user_grants(&format!("user-{revoked_user}"));
            }
        }));
    }
    // Callers that give up: every entry point, dropped wherever it is after 0-30 ms.
    for d in 0..DROPPERS {
        let (brokers, stop, tally) = (brokers.clone(), stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let http = resource_server();
            let mut rng = Rng::new(5000 + d as u64);
            while !stop.load(Ordering::Relaxed) {
                let key = key(rng.below(USERS));
                let broker = &brokers[rng.below(brokers.len())];
                let patience = Duration::from_millis(rng.below(30) as u64);
                let entry = rng.below(6);
                if tokio::time::timeout(patience, call_entry_point(entry, broker, &key, &http))
                    .await
                    .is_err()
                {
                    tally.dropped.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // Re-logins racing the refreshes: with a new refresh token, and (a re-consent at Google, or
    // at oidc-provider without prompt=consent) without one, which keeps the stored one.
    {
        let (idp, brokers, stop, tally) =
            (idp.clone(), brokers.clone(), stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(77);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                // Not the user whose grant gets revoked: a re-link would revive it.
                let user = rng.below(USERS - 1);
                let without_refresh_token = rng.below(2) == 0;
                if without_refresh_token {
                    idp.set_omit_refresh_token(true);
                }
                let broker = &brokers[rng.below(brokers.len())];
                let started = broker
                    .begin_login(&key(user), LoginOptions::default())
                    .await;
                if let Ok(start) = started
                    && let Ok(cb) = idp.authorize(&start.authorization_url, &format!("user-{user}"))
                {
                    let done = broker
                        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
                        .await;
                    if done.is_ok() {
                        tally.relogins.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if without_refresh_token {
                    idp.set_omit_refresh_token(false);
                }
            }
        }));
    }
    // Key rotation, all the time, over every link.
    if let Some(rewrapper) = rewrapper {
        let (stop, tally) = (stop.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(report) = rewrapper.rewrap(100).await {
                    tally
                        .rewrapped
                        .fetch_add(report.rewrapped as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    // Readers.
    let quiet_grace = Arc::new(AtomicBool::new(false));
    for r in 0..READERS {
        let (brokers, clock, stop, tally, faults_on, revoked, quiet_grace) = (
            brokers.clone(),
            clock.clone(),
            stop.clone(),
            tally.clone(),
            faults_on.clone(),
            revoked.clone(),
            quiet_grace.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(1000 + r as u64);
            while !stop.load(Ordering::Relaxed) {
                let user = rng.below(USERS);
                let key = key(user);
                let broker = &brokers[rng.below(brokers.len())];
                let faults_were_on =
                    faults_on.load(Ordering::SeqCst) || !quiet_grace.load(Ordering::SeqCst);
                let at_start = clock.now();
                let result = broker.retrieve(&caller(&key), &key).await;
                tally.reads.fetch_add(1, Ordering::Relaxed);
                match result {
                    Ok(got) => {
                        if got.refreshed {
                            tally.refreshed.fetch_add(1, Ordering::Relaxed);
                        }
                        if got.tokens.expires_at().is_some_and(|exp| exp <= at_start) {
                            tally.expired_reads.fetch_add(1, Ordering::Relaxed);
                        }
                        if got.stale {
                            tally.stale.fetch_add(1, Ordering::Relaxed);
                            if !faults_were_on {
                                tally.stale_without_faults.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(e) => {
                        let kind = match &e {
                            Error::Unavailable { .. } => "unavailable",
                            Error::RefreshInProgress { .. } => "refresh in progress",
                            Error::RecordChanged { .. } => "record changed",
                            Error::RelinkRequired { .. } => "relink required",
                            _ => "other",
                        };
                        *tally.errors.lock().unwrap().entry(kind.into()).or_default() += 1;
                        let allowed = match &e {
                            // Only with faults (or their back-off) about.
                            Error::Unavailable { .. } => faults_were_on,
                            // Another instance is refreshing slowly (a delayed IdP).
                            Error::RefreshInProgress { .. } => faults_were_on,
                            // Re-logins and rewraps kept winning the write: nothing lost,
                            // the reader is asked to try again.
                            Error::RecordChanged { .. } => true,
                            Error::RelinkRequired { .. } => {
                                user == revoked_user && revoked.load(Ordering::SeqCst)
                            }
                            _ => false,
                        };
                        if !allowed {
                            tally
                                .unexpected_errors
                                .lock()
                                .unwrap()
                                .push(format!("{key}: {e:?}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }

    // Run: faults for two thirds, then (after the back-off of the last fault has run out,
    // 60 s of token time at most, ~0.6 s real, and any delayed answer has come) a quiet phase.
    let quiet_at = duration * 2 / 3;
    tokio::time::sleep(quiet_at + QUIET_GRACE).await;
    quiet_grace.store(true, Ordering::SeqCst);
    tokio::time::sleep(duration.saturating_sub(quiet_at + QUIET_GRACE)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    idp.clear_faults();

    // Final pass: every link still there; the revoked one is relink-required, no other is,
    // and every other link's stored refresh token is the live one at the IdP.
    clock.advance(ACCESS_TTL);
    let mut lost = Vec::new();
    let mut wrongly_relinked = Vec::new();
    for u in 0..USERS {
        let key = key(u);
        let result = brokers[u % INSTANCES].retrieve(&caller(&key), &key).await;
        let stored = stores[0].load(&key).await.unwrap();
        let Some(stored) = stored else {
            lost.push(format!("{key}: record gone"));
            continue;
        };
        if u == revoked_user {
            assert!(
                matches!(result, Err(Error::RelinkRequired { .. })),
                "{label}: {key} was revoked at the IdP: {result:?}"
            );
            assert!(stored.record.meta.state.is_relink_required());
            continue;
        }
        if stored.record.meta.state.is_relink_required() {
            wrongly_relinked.push(format!("{key}: {:?}", stored.record.meta.state));
            continue;
        }
        if let Err(e) = &result {
            lost.push(format!("{key}: final read failed: {e:?}"));
        }
        let set = TokenSet::from_payload(&stored.record.payload).unwrap();
        let rt = set.refresh_token().expect("refresh token kept");
        if !idp.is_active(rt.expose_secret()) {
            lost.push(format!(
                "{key}: the stored refresh token is dead at the IdP"
            ));
        }
    }
    let c = idp.counters();
    let errors = tally.errors.lock().unwrap().clone();
    let unexpected = tally.unexpected_errors.lock().unwrap().clone();
    eprintln!(
        "soak {label} ({}s): reads={} refreshed={} stale={} errors={errors:?} faults={} \
         dropped calls={} re-logins={} rewrapped={} \
         idp refresh_calls={} successes={} reuse_detected={}",
        duration.as_secs(),
        tally.reads.load(Ordering::Relaxed),
        tally.refreshed.load(Ordering::Relaxed),
        tally.stale.load(Ordering::Relaxed),
        faults_injected.load(Ordering::Relaxed),
        tally.dropped.load(Ordering::Relaxed),
        tally.relogins.load(Ordering::Relaxed),
        tally.rewrapped.load(Ordering::Relaxed),
        c.refresh_calls,
        c.refresh_successes,
        c.reuse_detected,
    );
    assert!(lost.is_empty(), "{label}: links lost: {lost:#?}");
    assert_eq!(
        c.reuse_detected, 0,
        "{label}: refresh tokens presented twice"
    );
    assert_eq!(
        tally.expired_reads.load(Ordering::Relaxed),
        0,
        "{label}: reads returned an expired token"
    );
    assert_eq!(
        tally.stale_without_faults.load(Ordering::Relaxed),
        0,
        "{label}: stale tokens served with no fault about"
    );
    assert!(
        wrongly_relinked.is_empty(),
        "{label}: relink-required without revocation: {wrongly_relinked:#?}"
    );
    assert!(
        unexpected.is_empty(),
        "{label}: {} unexpected errors, first: {:#?}",
        unexpected.len(),
        &unexpected[..unexpected.len().min(5)]
    );
    assert!(
        c.refresh_successes > 20,
        "{label}: the soak did too little ({} refreshes)",
        c.refresh_successes
    );
    assert!(
        tally.dropped.load(Ordering::Relaxed) > 20 && tally.relogins.load(Ordering::Relaxed) > 5,
        "{label}: too few dropped calls or re-logins to mean anything"
    );
    idp.shutdown().await;
}

#[cfg(feature = "sqlite")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_three_instances_over_one_sqlite_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("links.db");
    let mut stores: Vec<Arc<dyn TokenStore>> = Vec::new();
    for _ in 0..INSTANCES {
        stores.push(Arc::new(
            tokenbroker::SqliteStore::open(&path).await.unwrap(),
        ));
    }
    soak(stores, None, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_three_instances_over_one_encrypted_memory_store() {
    // Leases follow the real clock (the store's), token expiry the fast ManualClock. Each
    // instance encrypts under its own primary key; the rewrapper moves every link to k1.
    let shared = Arc::new(MemoryStore::new());
    let keyring = |primary: &str| {
        let ring = StaticKeyring::new(KeyId::new("k1").unwrap(), [1; 32])
            .with_key(KeyId::new("k2").unwrap(), [2; 32])
            .unwrap()
            .with_key(KeyId::new("k3").unwrap(), [3; 32])
            .unwrap()
            .with_primary(&KeyId::new(primary).unwrap())
            .unwrap();
        Arc::new(ring)
    };
    let rewrapper = Arc::new(EncryptedStore::new(shared.clone(), keyring("k1")));
    let stores: Vec<Arc<dyn TokenStore>> = vec![
        rewrapper.clone(),
        Arc::new(EncryptedStore::new(shared.clone(), keyring("k2"))),
        Arc::new(EncryptedStore::new(shared, keyring("k3"))),
    ];
    soak(stores, Some(rewrapper), "encrypted memory").await;
}
