//! The life of a grant after login: health states and their events, the keep-alive sweep,
//! requests signed with the user's token (with one forced refresh on a 401), and unlink's
//! revocation retries. In-process provider, manual clock; calls counted, never timed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::http::{HttpError, HttpRequest, HttpResponse};
use tokenbroker::provider::ProviderError;
use tokenbroker::testing::{FakeFault, FakeProvider, ManualClock};
use tokenbroker::{
    BrokerEvent, Caller, Clock, Error, EventSink, GrantStatus, LoginOptions, MemoryStore,
    ProviderPolicy, RevocationStatus, SweepOptions, TokenBroker, TokenKey,
};

const MINUTE: Duration = Duration::from_secs(60);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

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
    events: Arc<Events>,
    broker: TokenBroker,
}

impl World {
    fn new(policy: ProviderPolicy) -> World {
        let clock = Arc::new(ManualClock::starting_now());
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let idp = Arc::new(FakeProvider::new("fake").unwrap());
        let events = Arc::new(Events::default());
        let broker = TokenBroker::builder()
            .with_provider(idp.clone(), policy)
            .with_store(store)
            .with_clock(clock.clone())
            .with_event_sink(events.clone())
            .with_refresh_timeout(Duration::from_millis(500))
            .with_lease_ttl(Duration::from_millis(500) + tokenbroker::LEASE_MARGIN)
            .build()
            .unwrap();
        World {
            idp,
            clock,
            events,
            broker,
        }
    }

    fn key(user: &str) -> TokenKey {
        TokenKey::parse("acme", user, "fake").unwrap()
    }

    fn caller(user: &str) -> Caller {
        let k = World::key(user);
        Caller::new(k.realm, k.subject, "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    async fn link(&self, user: &str) {
        let start = self
            .broker
            .begin_login(&World::key(user), LoginOptions::default())
            .await
            .unwrap();
        let callback = self.idp.approve(&start.authorization_url, user).unwrap();
        self.broker
            .complete_login(start.pending, &callback)
            .await
            .unwrap();
    }

    fn recovered(&self) -> usize {
        self.events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, BrokerEvent::Recovered { .. }))
            .count()
    }
}

fn unavailable() -> FakeFault {
    FakeFault::Error(ProviderError::Transient {
        status: Some(503),
        retry_after: None,
        reason: None,
        source: None,
    })
}

#[tokio::test]
async fn a_grant_goes_through_its_states_and_says_so() {
    let w = World::new(ProviderPolicy::default());
    let alice = World::key("alice");
    assert_eq!(
        w.broker.status(&alice).await.unwrap(),
        GrantStatus::NotLinked
    );
    w.link("alice").await;
    assert!(matches!(
        w.broker.status(&alice).await.unwrap(),
        GrantStatus::Active {
            has_refresh_token: true,
            expires_at: Some(_),
            ..
        }
    ));

    // The provider fails while the token is expired: backoff, then recovery.
    w.clock.advance(HOUR + MINUTE);
    w.idp.inject(unavailable());
    assert!(matches!(
        w.broker.retrieve(&World::caller("alice"), &alice).await,
        Err(Error::Unavailable { .. })
    ));
    let GrantStatus::Backoff { until, failures } = w.broker.status(&alice).await.unwrap() else {
        panic!("expected backoff");
    };
    assert_eq!(failures, 1);
    assert!(until > w.clock.now());
    // While backing off, reads do not call the provider.
    let calls = w.idp.counters().refresh_calls;
    let _ = w.broker.retrieve(&World::caller("alice"), &alice).await;
    assert_eq!(w.idp.counters().refresh_calls, calls);

    w.clock.advance(MINUTE * 2);
    assert!(
        w.broker
            .retrieve(&World::caller("alice"), &alice)
            .await
            .unwrap()
            .refreshed
    );
    assert_eq!(w.recovered(), 1, "a recovered event after the failures");
    assert!(matches!(
        w.broker.status(&alice).await.unwrap(),
        GrantStatus::Active { .. }
    ));

    // The user revokes the grant at the provider.
    w.idp.revoke_user("alice");
    w.clock.advance(HOUR + MINUTE);
    let _ = w.broker.retrieve(&World::caller("alice"), &alice).await;
    assert!(matches!(
        w.broker.status(&alice).await.unwrap(),
        GrantStatus::RelinkRequired { .. }
    ));
    w.broker.unlink(&alice).await.unwrap();
    assert_eq!(
        w.broker.status(&alice).await.unwrap(),
        GrantStatus::NotLinked
    );
}

#[tokio::test]
async fn the_sweep_refreshes_what_expires_soon_and_reports_what_it_found() {
    let w = World::new(ProviderPolicy::default());
    w.idp.set_access_ttl(HOUR);
    w.link("alice").await;
    w.link("carol").await;
    w.link("dave").await;
    w.idp.set_access_ttl(3 * HOUR);
    w.link("bob").await;
    w.idp.revoke_user("carol");

    w.clock.advance(HOUR - 3 * MINUTE);
    let report = w
        .broker
        .sweep(SweepOptions::new(5 * MINUTE).with_concurrency(1))
        .await
        .unwrap();
    assert_eq!(report.scanned, 4);
    assert_eq!(
        report.refreshed,
        vec![World::key("alice"), World::key("dave")]
    );
    assert_eq!(report.relink_required, vec![World::key("carol")]);
    assert!(report.transient.is_empty());
    assert_eq!(w.idp.counters().refresh_calls, 3, "bob was not due");

    // Nothing is due right after.
    let again = w.broker.sweep(SweepOptions::new(5 * MINUTE)).await.unwrap();
    assert!(again.refreshed.is_empty() && again.relink_required.is_empty());
    assert_eq!(w.idp.counters().refresh_calls, 3);

    // A transient failure is reported with its next retry time, and skipped while backing off.
    w.clock.advance(3 * HOUR);
    w.idp.inject(unavailable());
    let report = w
        .broker
        .sweep(SweepOptions::new(5 * MINUTE).with_concurrency(1))
        .await
        .unwrap();
    assert_eq!(report.transient.len(), 1);
    let (failed, next) = &report.transient[0];
    assert!(
        next.is_some_and(|t| t > w.clock.now()),
        "{failed}: {next:?}"
    );
    let calls = w.idp.counters().refresh_calls;
    let skipped = w.broker.sweep(SweepOptions::new(5 * MINUTE)).await.unwrap();
    assert!(!skipped.transient.iter().any(|(k, _)| k == failed));
    assert!(w.idp.counters().refresh_calls <= calls + 2);
}

#[tokio::test]
async fn the_sweep_keeps_idle_refresh_tokens_alive() {
    let w = World::new(ProviderPolicy::default().idle_limit(6 * DAY));
    w.idp.set_access_ttl(30 * DAY);
    w.link("alice").await;
    w.clock.advance(5 * DAY);
    let report = w.broker.sweep(SweepOptions::new(5 * MINUTE)).await.unwrap();
    assert!(report.refreshed.is_empty(), "not idle long enough");
    w.clock.advance(2 * DAY);
    let report = w.broker.sweep(SweepOptions::new(5 * MINUTE)).await.unwrap();
    assert_eq!(
        report.refreshed,
        vec![World::key("alice")],
        "idle for 7 days > 6"
    );
    assert_eq!(w.idp.counters().refresh_calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_never_runs_more_refreshes_at_once_than_allowed() {
    let w = Arc::new(World::new(ProviderPolicy::default()));
    for user in ["u1", "u2", "u3", "u4", "u5"] {
        w.link(user).await;
    }
    w.clock.advance(HOUR);
    w.idp.pause();
    let sweeper = {
        let w = w.clone();
        tokio::spawn(async move {
            w.broker
                .sweep(SweepOptions::new(5 * MINUTE).with_concurrency(2))
                .await
        })
    };
    w.idp.wait_for_refresh_calls(2).await;
    // Give a third refresh every chance to start while two are held.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        w.idp.counters().refresh_calls,
        2,
        "concurrency 2 means two at a time"
    );
    w.idp.resume();
    let report = sweeper.await.unwrap().unwrap();
    assert_eq!(report.refreshed.len(), 5);
}

/// A resource server that accepts only the tokens it was told about, and records what it saw.
#[derive(Default)]
struct ResourceServer {
    rejected: Mutex<Vec<String>>,
    seen: Mutex<Vec<String>>,
    always_401: bool,
}

impl ResourceServer {
    fn client(self: &Arc<Self>) -> Arc<dyn tokenbroker::http::HttpClient> {
        let me = self.clone();
        Arc::new(move |req: HttpRequest| {
            let me = me.clone();
            async move {
                let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
                let token = auth.strip_prefix("Bearer ").unwrap().to_owned();
                me.seen.lock().unwrap().push(token.clone());
                let status = if me.always_401 || me.rejected.lock().unwrap().contains(&token) {
                    401
                } else {
                    200
                };
                Ok::<HttpResponse, HttpError>(
                    http::Response::builder()
                        .status(status)
                        .body(Vec::new())
                        .unwrap(),
                )
            }
        })
    }
}

fn api_request() -> HttpRequest {
    http::Request::post("https://api.example/me")
        .header("content-type", "application/json")
        .body(b"{\"q\":1}".to_vec())
        .unwrap()
}

#[tokio::test]
async fn a_signed_request_refreshes_once_on_401_and_retries() {
    let w = World::new(ProviderPolicy::default());
    w.link("alice").await;
    let alice = World::key("alice");
    let current = w
        .broker
        .retrieve(&World::caller("alice"), &alice)
        .await
        .unwrap()
        .tokens
        .access_token()
        .expose_secret()
        .to_owned();
    // The resource server no longer accepts the (unexpired) token: revoked there, say.
    let rs = Arc::new(ResourceServer::default());
    rs.rejected.lock().unwrap().push(current.clone());
    let response = w
        .broker
        .send_authorized(
            &World::caller("alice"),
            &alice,
            api_request(),
            &*rs.client(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(w.idp.counters().refresh_calls, 1, "one forced refresh");
    let seen = rs.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], current);
    assert_ne!(seen[1], current, "the retry carries the new token");

    // A server that refuses everything gets exactly one retry, not a loop.
    let wall = Arc::new(ResourceServer {
        always_401: true,
        ..Default::default()
    });
    let response = w
        .broker
        .send_authorized(
            &World::caller("alice"),
            &alice,
            api_request(),
            &*wall.client(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(wall.seen.lock().unwrap().len(), 2);
    assert_eq!(w.idp.counters().refresh_calls, 2);
}

#[tokio::test]
async fn a_signed_request_for_someone_elses_link_is_never_sent() {
    let w = World::new(ProviderPolicy::default());
    w.link("alice").await;
    let rs = Arc::new(ResourceServer::default());
    let err = w
        .broker
        .send_authorized(
            &World::caller("mallory"),
            &World::key("alice"),
            api_request(),
            &*rs.client(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Forbidden));
    assert!(rs.seen.lock().unwrap().is_empty());
    // authorize_request attaches the header, marked sensitive so it is not logged by `http`.
    let signed = w
        .broker
        .authorize_request(&World::caller("alice"), &World::key("alice"), api_request())
        .await
        .unwrap();
    assert!(signed.headers()["authorization"].is_sensitive());
}

#[tokio::test]
async fn unlink_retries_a_failing_revocation_and_reports_how_it_ended() {
    let w = World::new(ProviderPolicy::default());
    w.link("alice").await;
    w.link("bob").await;
    // One transient failure, then success.
    w.idp.inject(unavailable());
    let outcome = w.broker.unlink(&World::key("alice")).await.unwrap();
    assert_eq!(outcome.revocation, RevocationStatus::Revoked);
    assert!(outcome.deleted);
    assert_eq!(w.idp.counters().revocations, 2);

    // Failing every time: three quick tries, then deferred to the store's outbox (see
    // tests/revocation_outbox.rs), deleted locally anyway.
    for _ in 0..3 {
        w.idp.inject(unavailable());
    }
    let outcome = w.broker.unlink(&World::key("bob")).await.unwrap();
    match &outcome.revocation {
        RevocationStatus::Deferred { reason, .. } => {
            assert!(reason.contains("503"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.idp.counters().revocations, 5);
    assert!(outcome.deleted);
    assert_eq!(
        w.broker.status(&World::key("bob")).await.unwrap(),
        GrantStatus::NotLinked
    );
}

// ---------------------------------------------------------------------------------------------
// Narrowed reads
// ---------------------------------------------------------------------------------------------

async fn link_with_scopes(w: &World, user: &str, scopes: &str) {
    let start = w
        .broker
        .begin_login(
            &World::key(user),
            LoginOptions::default().with_scopes(tokenbroker::Scopes::parse(scopes)),
        )
        .await
        .unwrap();
    let callback = w.idp.approve(&start.authorization_url, user).unwrap();
    w.broker
        .complete_login(start.pending, &callback)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_narrowed_read_gets_its_own_token_from_the_same_grant() {
    use tokenbroker::Scopes;
    let w = World::new(ProviderPolicy::default());
    link_with_scopes(&w, "alice", "calendar mail").await;
    let alice = World::key("alice");
    let caller = World::caller("alice");
    let main = w.broker.retrieve(&caller, &alice).await.unwrap().tokens;
    let wide = main.scopes().clone();
    assert!(Scopes::parse("calendar mail").is_subset(&wide));

    let narrow = Scopes::parse("calendar");
    let first = w
        .broker
        .retrieve_narrowed(&caller, &alice, &narrow)
        .await
        .unwrap();
    assert!(first.refreshed);
    assert_eq!(
        first.tokens.scopes(),
        &narrow,
        "the token carries only what was asked"
    );
    assert_ne!(
        first.tokens.access_token().expose_secret(),
        main.access_token().expose_secret()
    );
    assert_eq!(w.idp.counters().refresh_calls, 1);
    // Kept beside the link: the next narrowed read costs nothing upstream.
    let again = w
        .broker
        .retrieve_narrowed(&caller, &alice, &narrow)
        .await
        .unwrap();
    assert!(!again.refreshed);
    assert_eq!(
        again.tokens.access_token().expose_secret(),
        first.tokens.access_token().expose_secret()
    );
    // The link's own token is untouched, and the rotation of the shared refresh token applies
    // to it: its next refresh presents the new refresh token (reuse would be detected).
    let own = w.broker.retrieve(&caller, &alice).await.unwrap();
    assert!(!own.refreshed);
    assert_eq!(
        own.tokens.access_token().expose_secret(),
        main.access_token().expose_secret()
    );
    w.clock.advance(HOUR + MINUTE);
    assert!(w.broker.retrieve(&caller, &alice).await.unwrap().refreshed);
    assert!(
        w.broker
            .retrieve_narrowed(&caller, &alice, &narrow)
            .await
            .unwrap()
            .refreshed
    );
    assert_eq!(w.idp.counters().reuse_detected, 0);
    assert_eq!(w.idp.counters().refresh_calls, 3);
}

#[tokio::test]
async fn asking_for_scopes_never_granted_says_which_and_offers_incremental_consent() {
    use tokenbroker::Scopes;
    let w = World::new(ProviderPolicy::default());
    link_with_scopes(&w, "alice", "calendar").await;
    let alice = World::key("alice");
    let err = w
        .broker
        .retrieve_narrowed(
            &World::caller("alice"),
            &alice,
            &Scopes::parse("calendar drive"),
        )
        .await
        .unwrap_err();
    match &err {
        Error::ScopesNotGranted { missing, .. } => assert_eq!(missing, &Scopes::parse("drive")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        w.idp.counters().refresh_calls,
        0,
        "nothing was asked upstream"
    );
    assert_eq!(tokenbroker::BrokerResponse::from_error(&err).status, 403);
    let start = w
        .broker
        .begin_incremental_consent(&alice, Scopes::parse("drive"))
        .await
        .unwrap();
    let asked: Scopes = start
        .authorization_url
        .query_pairs()
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| Scopes::parse(&v))
        .unwrap();
    assert!(Scopes::parse("calendar drive").is_subset(&asked), "{asked}");
    // A denied caller learns nothing about scopes.
    assert!(matches!(
        w.broker
            .retrieve_narrowed(&World::caller("mallory"), &alice, &Scopes::parse("drive"))
            .await,
        Err(Error::Forbidden)
    ));
}

// ---------------------------------------------------------------------------------------------
// Session-bound links
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn session_bound_links_live_and_end_with_their_session() {
    use tokenbroker::LinkKind;
    let w = World::new(ProviderPolicy::default().link_kind(LinkKind::SessionBound));
    let alice = World::key("alice");
    let caller = World::caller("alice");
    assert!(matches!(
        w.broker.begin_login(&alice, LoginOptions::default()).await,
        Err(Error::Config(_))
    ));
    let start = w
        .broker
        .begin_login(&alice, LoginOptions::default().with_session("session-1"))
        .await
        .unwrap();
    let callback = w.idp.approve(&start.authorization_url, "alice").unwrap();
    w.broker
        .complete_login(start.pending, &callback)
        .await
        .unwrap();

    let read = w
        .broker
        .retrieve_in_session(&caller, &alice, "session-1")
        .await
        .unwrap();
    assert!(w.idp.is_active(read.tokens.access_token().expose_secret()));
    // Not an offline link, and not another session's.
    assert!(matches!(
        w.broker.retrieve(&caller, &alice).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        w.broker
            .retrieve_in_session(&caller, &alice, "session-2")
            .await,
        Err(Error::NotFound { .. })
    ));
    // Someone else cannot read it through the session either.
    assert!(matches!(
        w.broker
            .retrieve_in_session(&World::caller("mallory"), &alice, "session-1")
            .await,
        Err(Error::Forbidden)
    ));
    let removed = w
        .broker
        .end_session(&alice.realm, &alice.subject, "session-1")
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert!(matches!(
        w.broker
            .retrieve_in_session(&caller, &alice, "session-1")
            .await,
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_session_read_falls_back_to_the_offline_link() {
    let w = World::new(ProviderPolicy::default());
    w.link("alice").await;
    let read = w
        .broker
        .retrieve_in_session(&World::caller("alice"), &World::key("alice"), "any-session")
        .await
        .unwrap();
    assert!(w.idp.is_active(read.tokens.access_token().expose_secret()));
    assert_eq!(
        w.broker
            .end_session(
                &World::key("alice").realm,
                &World::key("alice").subject,
                "any-session"
            )
            .await
            .unwrap(),
        0,
        "ending a session leaves offline links alone"
    );
    assert!(
        w.broker
            .retrieve(&World::caller("alice"), &World::key("alice"))
            .await
            .is_ok()
    );
}
