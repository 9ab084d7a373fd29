//! The broker's behaviour against an in-process strict provider: refresh on expiry, rotation,
//! single-flight across readers and instances, failure handling, authorization, login checks.
//!
//! Time is a `ManualClock`; nothing here asserts on wall-clock durations. Upstream calls are
//! counted at the provider.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::provider::ProviderError;
use tokenbroker::store::{StoredRecord, TokenStore};
use tokenbroker::testing::{FakeFault, FakeProvider, ManualClock};
use tokenbroker::{
    BrokerEvent, Caller, Error, EventSink, KeycloakRoles, LoginOptions, MemoryStore,
    ProviderPolicy, Scopes, TokenBroker, TokenKey, TokenSet,
};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Events(Mutex<Vec<BrokerEvent>>);

impl EventSink for Events {
    fn emit(&self, event: &BrokerEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

impl Events {
    fn count(&self, f: impl Fn(&BrokerEvent) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|e| f(e)).count()
    }
}

struct World {
    idp: Arc<FakeProvider>,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    events: Arc<Events>,
    broker: TokenBroker,
    key: TokenKey,
}

impl World {
    fn new() -> World {
        let clock = Arc::new(ManualClock::starting_now());
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let idp = Arc::new(FakeProvider::new("fake").unwrap());
        let events = Arc::new(Events::default());
        let broker = World::broker_on(&idp, &clock, &store, &events);
        World {
            idp,
            clock,
            store,
            events,
            broker,
            key: TokenKey::parse("acme", "alice", "fake").unwrap(),
        }
    }

    fn broker_on(
        idp: &Arc<FakeProvider>,
        clock: &Arc<ManualClock>,
        store: &Arc<MemoryStore>,
        events: &Arc<Events>,
    ) -> TokenBroker {
        TokenBroker::builder()
            .with_provider(idp.clone(), ProviderPolicy::default())
            .with_store(store.clone())
            .with_clock(clock.clone())
            .with_event_sink(events.clone())
            .with_role_checker(Arc::new(
                KeycloakRoles::new().with_admin_scope("read:user_idp_tokens"),
            ))
            .with_refresh_timeout(Duration::from_millis(300))
            .with_lease_ttl(Duration::from_millis(300) + tokenbroker::LEASE_MARGIN)
            .build()
            .unwrap()
    }

    fn second_instance(&self) -> TokenBroker {
        World::broker_on(&self.idp, &self.clock, &self.store, &self.events)
    }

    fn caller(&self) -> Caller {
        Caller::new(self.key.realm.clone(), self.key.subject.clone(), "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    async fn link(&self) -> TokenSet {
        let start = self
            .broker
            .begin_login(&self.key, LoginOptions::default())
            .await
            .unwrap();
        let callback = self.idp.approve(&start.authorization_url, "alice").unwrap();
        self.broker
            .complete_login(start.pending, &callback)
            .await
            .unwrap();
        self.stored_set().await
    }

    async fn stored(&self) -> StoredRecord {
        self.store
            .load(&self.key)
            .await
            .unwrap()
            .expect("the link is stored")
    }

    async fn stored_set(&self) -> TokenSet {
        TokenSet::from_payload(&self.stored().await.record.payload).unwrap()
    }

    /// Moves time past the access token's expiry.
    fn expire(&self) {
        self.clock.advance(HOUR + Duration::from_secs(1));
    }
}

/// The access token of a stored set or of what a read returned (which never shows the
/// refresh token under the default policy).
trait AccessToken {
    fn access(&self) -> &tokenbroker::Secret;
}

impl AccessToken for TokenSet {
    fn access(&self) -> &tokenbroker::Secret {
        self.access_token()
    }
}

impl AccessToken for tokenbroker::TokenView {
    fn access(&self) -> &tokenbroker::Secret {
        self.access_token()
    }
}

fn secret(s: &impl AccessToken) -> String {
    s.access().expose_secret().to_owned()
}

#[tokio::test]
async fn a_fresh_token_is_served_without_calling_the_provider() {
    let w = World::new();
    let linked = w.link().await;
    let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert_eq!(secret(&got.tokens), secret(&linked));
    assert!(!got.refreshed);
    assert_eq!(w.idp.counters().refresh_calls, 0);
}

#[tokio::test]
async fn an_expired_token_is_refreshed_and_the_rotated_refresh_token_stored() {
    let w = World::new();
    let linked = w.link().await;
    w.expire();
    let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(got.refreshed);
    assert_ne!(
        got.tokens.access_token().expose_secret(),
        linked.access_token().expose_secret()
    );
    assert!(w.idp.is_active(got.tokens.access_token().expose_secret()));
    let stored = w.stored_set().await;
    assert_eq!(
        secret(&stored),
        secret(&got.tokens),
        "what was served is what was stored"
    );
    assert_ne!(
        stored.refresh_token().unwrap().expose_secret(),
        linked.refresh_token().unwrap().expose_secret()
    );
    assert!(
        !w.idp
            .is_active(linked.refresh_token().unwrap().expose_secret()),
        "old refresh token consumed"
    );
    assert_eq!(
        w.events
            .count(|e| matches!(e, BrokerEvent::Refreshed { rotated: true, .. })),
        1
    );
}

#[tokio::test]
async fn a_token_inside_the_skew_is_refreshed_before_it_expires() {
    let w = World::new();
    w.link().await;
    w.clock.advance(HOUR - Duration::from_secs(30)); // 30 s left, skew is 60 s
    let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(got.refreshed);
    assert_eq!(w.idp.counters().refresh_calls, 1);
}

#[tokio::test]
async fn an_answer_without_a_refresh_token_keeps_the_old_one() {
    let w = World::new();
    w.idp.set_rotation(false);
    let linked = w.link().await;
    for _ in 0..3 {
        w.expire();
        w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    }
    assert_eq!(w.idp.counters().refresh_successes, 3);
    let stored = w.stored_set().await;
    assert_eq!(
        stored.refresh_token().unwrap().expose_secret(),
        linked.refresh_token().unwrap().expose_secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_reads_cause_one_refresh() {
    let w = World::new();
    w.link().await;
    w.expire();
    w.idp.pause(); // keep the refresh in flight while readers pile up
    let mut readers = Vec::new();
    for _ in 0..1000 {
        let (broker, caller, key) = (w.broker.clone(), w.caller(), w.key.clone());
        readers.push(tokio::spawn(
            async move { broker.retrieve(&caller, &key).await },
        ));
    }
    w.idp.wait_for_refresh_calls(1).await;
    tokio::task::yield_now().await;
    w.idp.resume();
    let mut tokens = std::collections::HashSet::new();
    for r in readers {
        let got = r.await.unwrap().unwrap();
        tokens.insert(got.tokens.access_token().expose_secret().to_owned());
    }
    let c = w.idp.counters();
    assert_eq!(c.refresh_calls, 1, "one upstream refresh for 1,000 readers");
    assert_eq!(c.reuse_detected, 0);
    assert_eq!(tokens.len(), 1, "every reader got the same new token");
    assert_eq!(
        tokens.into_iter().next().unwrap(),
        w.stored_set().await.access_token().expose_secret()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_store_refresh_once() {
    let w = World::new();
    w.link().await;
    w.expire();
    let other = w.second_instance();
    w.idp.pause();
    let mut readers = Vec::new();
    for i in 0..400 {
        let broker = if i % 2 == 0 {
            w.broker.clone()
        } else {
            other.clone()
        };
        let (caller, key) = (w.caller(), w.key.clone());
        readers.push(tokio::spawn(
            async move { broker.retrieve(&caller, &key).await },
        ));
    }
    w.idp.wait_for_refresh_calls(1).await;
    // Give the other instance time to find the lease taken and start waiting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.idp.resume();
    let mut tokens = std::collections::HashSet::new();
    for r in readers {
        tokens.insert(
            r.await
                .unwrap()
                .unwrap()
                .tokens
                .access_token()
                .expose_secret()
                .to_owned(),
        );
    }
    let c = w.idp.counters();
    assert_eq!(c.refresh_calls, 1, "the lease lets one instance refresh");
    assert_eq!(c.reuse_detected, 0, "no refresh token was presented twice");
    assert_eq!(tokens.len(), 1);
}

#[tokio::test]
async fn invalid_grant_marks_the_link_relink_required_and_keeps_it() {
    let w = World::new();
    w.link().await;
    w.idp.revoke_user("alice");
    w.expire();
    let before = w.stored().await;
    let err = w.broker.retrieve(&w.caller(), &w.key).await.unwrap_err();
    assert!(matches!(err, Error::RelinkRequired { .. }), "{err:?}");
    let after = w.stored().await;
    assert!(after.record.meta.state.is_relink_required());
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret(),
        "tokens kept"
    );
    // Later reads say so without calling the provider again.
    let calls = w.idp.counters().refresh_calls;
    assert!(matches!(
        w.broker.retrieve(&w.caller(), &w.key).await,
        Err(Error::RelinkRequired { .. })
    ));
    assert_eq!(w.idp.counters().refresh_calls, calls);
    // A new login repairs the link.
    w.link().await;
    assert!(w.broker.retrieve(&w.caller(), &w.key).await.is_ok());
    assert_eq!(
        w.events
            .count(|e| matches!(e, BrokerEvent::RelinkRequired { .. })),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_after_a_lost_race_returns_the_newer_set_and_marks_nothing() {
    let w = World::new();
    w.link().await;
    w.expire();
    w.idp.pause();
    let (broker, caller, key) = (w.broker.clone(), w.caller(), w.key.clone());
    let reader = tokio::spawn(async move { broker.retrieve(&caller, &key).await });
    w.idp.wait_for_refresh_calls(1).await;
    // While the refresh is in flight, the user re-links (a newer grant is written) and the
    // provider answers the old refresh token with invalid_grant.
    let relinked = w.link().await;
    w.idp.inject(FakeFault::Error(ProviderError::InvalidGrant {
        description: Some("stale".into()),
    }));
    w.idp.resume();
    let got = reader.await.unwrap().expect("the newer set is served");
    assert_eq!(secret(&got.tokens), secret(&relinked));
    assert!(!w.stored().await.record.meta.state.is_relink_required());
    assert_eq!(
        w.events
            .count(|e| matches!(e, BrokerEvent::LostRace { .. })),
        1
    );
    assert_eq!(
        w.events
            .count(|e| matches!(e, BrokerEvent::RelinkRequired { .. })),
        0
    );
}

async fn assert_failure_keeps_record(fault: FakeFault, expect: fn(&Error) -> bool) {
    let w = World::new();
    w.link().await;
    w.expire();
    let before = w.stored().await;
    w.idp.inject(fault);
    let err = w.broker.retrieve(&w.caller(), &w.key).await.unwrap_err();
    assert!(expect(&err), "unexpected error {err:?}");
    let after = w.stored().await;
    assert_eq!(after.version, before.version, "record not rewritten");
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret(),
        "byte-for-byte unchanged"
    );
    assert_eq!(after.record.meta, before.record.meta);
    // The grant survived: once the provider recovers (and the backoff passed), refresh works.
    w.clock.advance(Duration::from_secs(120));
    assert!(
        w.broker
            .retrieve(&w.caller(), &w.key)
            .await
            .unwrap()
            .refreshed
    );
}

#[tokio::test]
async fn a_503_leaves_the_record_unchanged() {
    let fault = FakeFault::Error(ProviderError::Transient {
        status: Some(503),
        retry_after: Some(Duration::from_secs(30)),
        reason: None,
        source: None,
    });
    assert_failure_keeps_record(fault, |e| {
        matches!(e, Error::Unavailable { retry_after: Some(d), .. } if *d == Duration::from_secs(30))
    })
    .await;
}

#[tokio::test]
async fn a_time_out_leaves_the_record_unchanged() {
    assert_failure_keeps_record(FakeFault::Delay(Duration::from_secs(5)), |e| {
        matches!(e, Error::Unavailable { .. })
    })
    .await;
}

/// A `401` from a resource endpoint (userinfo) refused an access token, not the grant: a
/// provider that reports it must not get the link marked relink-required.
#[tokio::test]
async fn a_rejected_access_token_is_not_a_dead_grant() {
    let fault = FakeFault::Error(ProviderError::AccessTokenRejected {
        endpoint: "userinfo",
        description: Some("invalid_token: the access token expired".into()),
    });
    assert_failure_keeps_record(fault, |e| {
        matches!(
            e,
            Error::Provider {
                source: ProviderError::AccessTokenRejected { .. },
                ..
            }
        )
    })
    .await;
}

#[tokio::test]
async fn reserved_authorization_parameters_are_refused_at_build_and_at_login() {
    let config = tokenbroker::provider::OAuth2Config::new(
        tokenbroker::ProviderId::new("corp").unwrap(),
        "client-1",
        "https://idp.example/authorize".parse().unwrap(),
        "https://idp.example/token".parse().unwrap(),
        "https://app.example/callback".parse().unwrap(),
    );
    let built = TokenBroker::builder()
        .with_http_client(Arc::new(|_req: tokenbroker::http::HttpRequest| async {
            Err::<tokenbroker::http::HttpResponse, _>(tokenbroker::http::HttpError::new(
                tokenbroker::http::HttpErrorKind::Connect,
                None,
            ))
        }))
        .with_oauth2_provider(
            config.with_authorize_param("redirect_uri", "https://evil.example/cb"),
            ProviderPolicy::default(),
        )
        .build();
    match built {
        Err(Error::ReservedParameter { provider, name }) => {
            assert_eq!((provider.as_str(), name.as_str()), ("corp", "redirect_uri"));
        }
        other => panic!("{other:?}"),
    }

    // Per login, whatever the provider: nothing is loaded or sent.
    let w = World::new();
    for name in [
        "state",
        "nonce",
        "code_challenge",
        "client_id",
        "response_type",
        "request_uri",
    ] {
        let err = w
            .broker
            .begin_login(&w.key, LoginOptions::default().with_param(name, "x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::ReservedParameter { name: n, .. } if n == name),
            "{name}: {err:?}"
        );
        assert_eq!(err.code(), "server_error");
    }
    // Not reserved: a case variant, and the parameters a host is meant to set.
    w.broker
        .begin_login(
            &w.key,
            LoginOptions::default()
                .with_param("State", "x")
                .with_param("prompt", "select_account"),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_garbage_body_leaves_the_record_unchanged() {
    let fault = FakeFault::Error(ProviderError::Protocol {
        status: Some(200),
        reason: "body is not JSON".into(),
    });
    assert_failure_keeps_record(fault, |e| matches!(e, Error::Unavailable { .. })).await;
}

#[tokio::test]
async fn a_transient_failure_serves_the_still_valid_token_and_backs_off() {
    let w = World::new();
    let linked = w.link().await;
    w.clock.advance(HOUR - Duration::from_secs(30)); // inside the skew, not expired
    w.idp.inject(FakeFault::Error(ProviderError::Transient {
        status: Some(500),
        retry_after: None,
        reason: None,
        source: None,
    }));
    let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(got.stale);
    assert_eq!(secret(&got.tokens), secret(&linked));
    assert_eq!(w.idp.counters().refresh_calls, 1);
    // Within the backoff the provider is left alone.
    let again = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(again.stale);
    assert_eq!(w.idp.counters().refresh_calls, 1, "no call during backoff");
    w.clock.advance(Duration::from_secs(2));
    assert!(
        w.broker
            .retrieve(&w.caller(), &w.key)
            .await
            .unwrap()
            .refreshed
    );
    assert_eq!(w.idp.counters().refresh_calls, 2);
    assert_eq!(
        w.events.count(|e| matches!(
            e,
            BrokerEvent::TransientFailure {
                served_stale: true,
                ..
            }
        )),
        1
    );
}

#[tokio::test]
async fn an_expired_token_without_refresh_token_asks_for_relink() {
    let w = World::new();
    w.idp.set_omit_refresh_token(true);
    w.link().await;
    w.expire();
    assert!(matches!(
        w.broker.retrieve(&w.caller(), &w.key).await,
        Err(Error::NoRefreshToken { .. })
    ));
    assert_eq!(w.idp.counters().refresh_calls, 0);
}

#[tokio::test]
async fn a_relink_without_refresh_token_keeps_the_stored_one() {
    let w = World::new();
    let first = w.link().await;
    w.idp.set_omit_refresh_token(true);
    let second = w.link().await;
    assert_eq!(
        second.refresh_token().unwrap().expose_secret(),
        first.refresh_token().unwrap().expose_secret()
    );
    assert_ne!(
        second.access_token().expose_secret(),
        first.access_token().expose_secret()
    );
    assert_eq!(secret(&w.stored_set().await), secret(&second));
}

#[tokio::test]
async fn the_callback_state_must_match_and_is_single_use() {
    let w = World::new();
    let start = w
        .broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let good = w.idp.approve(&start.authorization_url, "alice").unwrap();
    let code = good.code.clone().unwrap();
    let forged = tokenbroker::Callback::new(code.expose_secret(), "not-the-state");
    assert!(matches!(
        w.broker
            .complete_login(start.pending.clone(), &forged)
            .await,
        Err(Error::LoginRejected { .. })
    ));
    let missing = tokenbroker::Callback::from_query(&format!("code={}", code.expose_secret()));
    assert!(matches!(
        w.broker
            .complete_login(start.pending.clone(), &missing)
            .await,
        Err(Error::LoginRejected { .. })
    ));
    assert_eq!(
        w.idp.counters().code_exchanges,
        0,
        "a bad state never reaches the provider"
    );

    w.broker
        .complete_login(start.pending.clone(), &good)
        .await
        .unwrap();
    let replay = w.broker.complete_login(start.pending.clone(), &good).await;
    assert!(
        matches!(replay, Err(Error::LoginRejected { reason }) if reason.contains("already used"))
    );
    assert_eq!(w.idp.counters().code_exchanges, 1);
}

#[tokio::test]
async fn a_replayed_code_is_rejected_by_the_provider_across_instances() {
    let w = World::new();
    let start = w
        .broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let callback = w.idp.approve(&start.authorization_url, "alice").unwrap();
    w.broker
        .complete_login(start.pending.clone(), &callback)
        .await
        .unwrap();
    // A second instance has no record of the used state; the provider refuses the code.
    let other = w.second_instance();
    let err = other
        .complete_login(start.pending, &callback)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::LoginRejected { reason } if reason.contains("invalid_grant")),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_expired_pending_login_is_rejected() {
    let w = World::new();
    let start = w
        .broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let callback = w.idp.approve(&start.authorization_url, "alice").unwrap();
    w.clock.advance(Duration::from_secs(11 * 60));
    assert!(matches!(
        w.broker.complete_login(start.pending, &callback).await,
        Err(Error::LoginRejected { .. })
    ));
}

#[tokio::test]
async fn a_refused_authorization_is_typed() {
    let w = World::new();
    let start = w
        .broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let state = start
        .authorization_url
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let cb = tokenbroker::Callback::from_query(&format!(
        "error=access_denied&error_description=no&state={state}"
    ));
    assert!(matches!(
        w.broker.complete_login(start.pending, &cb).await,
        Err(Error::AuthorizationDenied { error, .. }) if error == "access_denied"
    ));
}

#[tokio::test]
async fn the_pending_login_round_trips_through_a_session() {
    let w = World::new();
    let start = w
        .broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let json = serde_json::to_string(&start.pending).unwrap();
    let pending: tokenbroker::PendingLogin = serde_json::from_str(&json).unwrap();
    let callback = w.idp.approve(&start.authorization_url, "alice").unwrap();
    w.broker.complete_login(pending, &callback).await.unwrap();
    assert!(serde_json::from_str::<tokenbroker::PendingLogin>("{\"key\":1}").is_err());
}

#[tokio::test]
async fn the_authorization_url_carries_state_pkce_and_nonce() {
    let w = World::new();
    let start = w
        .broker
        .begin_login(
            &w.key,
            LoginOptions::default().with_scopes(Scopes::parse("email")),
        )
        .await
        .unwrap();
    let q: std::collections::HashMap<_, _> =
        start.authorization_url.query_pairs().into_owned().collect();
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["code_challenge"].len(), 43);
    assert!(q["state"].len() >= 43);
    assert!(q.contains_key("nonce"));
    assert_eq!(q["scope"], "email offline_access openid");
}

#[tokio::test]
async fn unlink_revokes_upstream_and_deletes() {
    let w = World::new();
    let linked = w.link().await;
    let outcome = w.broker.unlink(&w.key).await.unwrap();
    assert_eq!(outcome.revocation, tokenbroker::RevocationStatus::Revoked);
    assert!(outcome.deleted);
    assert!(
        !w.idp
            .is_active(linked.refresh_token().unwrap().expose_secret())
    );
    assert!(w.store.load(&w.key).await.unwrap().is_none());
    assert!(matches!(
        w.broker.retrieve(&w.caller(), &w.key).await,
        Err(Error::NotFound { .. })
    ));
    let again = w.broker.unlink(&w.key).await.unwrap();
    assert!(!again.deleted);
}

#[tokio::test]
async fn stored_tokens_readable_grants_the_role_on_first_link() {
    #[derive(Debug, Default)]
    struct Grants(Mutex<Vec<(String, String)>>);
    #[async_trait::async_trait]
    impl tokenbroker::RoleGrantHook for Grants {
        async fn grant_role(
            &self,
            _realm: &tokenbroker::Realm,
            subject: &tokenbroker::Subject,
            role: &str,
        ) -> Result<(), tokenbroker::AccessError> {
            self.0
                .lock()
                .unwrap()
                .push((subject.to_string(), role.to_owned()));
            Ok(())
        }
    }
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    let hook = Arc::new(Grants::default());
    let broker = TokenBroker::builder()
        .with_provider(
            idp.clone(),
            ProviderPolicy::default().stored_tokens_readable(true),
        )
        .with_role_grant_hook(hook.clone())
        .build()
        .unwrap();
    let key = TokenKey::parse("acme", "bob", "fake").unwrap();
    for _ in 0..2 {
        let start = broker
            .begin_login(&key, LoginOptions::default())
            .await
            .unwrap();
        let cb = idp.approve(&start.authorization_url, "bob").unwrap();
        broker.complete_login(start.pending, &cb).await.unwrap();
    }
    assert_eq!(
        *hook.0.lock().unwrap(),
        vec![("bob".to_owned(), "read-token".to_owned())],
        "granted once"
    );
}

#[tokio::test]
async fn store_tokens_off_stores_nothing() {
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    let store = Arc::new(MemoryStore::new());
    let broker = TokenBroker::builder()
        .with_provider(idp.clone(), ProviderPolicy::default().store_tokens(false))
        .with_store(store.clone())
        .build()
        .unwrap();
    let key = TokenKey::parse("acme", "bob", "fake").unwrap();
    let start = broker
        .begin_login(&key, LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.approve(&start.authorization_url, "bob").unwrap();
    let outcome = broker.complete_login(start.pending, &cb).await.unwrap();
    assert!(!outcome.stored);
    assert!(store.is_empty());
}

#[test]
fn a_lease_shorter_than_the_refresh_time_out_is_a_configuration_error() {
    let err = TokenBroker::builder()
        .with_refresh_timeout(Duration::from_secs(10))
        .with_lease_ttl(Duration::from_secs(12))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Config(m) if m.contains("lease TTL")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_provider_answer_within_the_lease_is_not_taken_over() {
    let w = World::new();
    w.link().await;
    w.expire();
    let other = w.second_instance();
    // The provider answers after most of the refresh time-out (300 ms of a 5.3 s lease).
    w.idp.inject(FakeFault::Delay(Duration::from_millis(250)));
    let (b1, b2, c, k) = (w.broker.clone(), other.clone(), w.caller(), w.key.clone());
    let (c2, k2) = (c.clone(), k.clone());
    let first = tokio::spawn(async move { b1.retrieve(&c, &k).await });
    w.idp.wait_for_refresh_calls(1).await;
    let second = tokio::spawn(async move { b2.retrieve(&c2, &k2).await });
    let a = first.await.unwrap().unwrap();
    let b = second.await.unwrap().unwrap();
    assert_eq!(secret(&a.tokens), secret(&b.tokens));
    assert_eq!(
        w.idp.counters().refresh_calls,
        1,
        "the waiting instance re-read instead of refreshing"
    );
    assert_eq!(w.idp.counters().reuse_detected, 0);
}

#[tokio::test]
async fn a_dead_lease_holder_is_taken_over_after_the_ttl() {
    let w = World::new();
    w.link().await;
    w.expire();
    // Another instance took the lease and died before releasing it.
    let dead = tokenbroker::store::LeaseHolder::new("crashed-instance");
    let attempt = w
        .store
        .try_lease(&w.key, &dead, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(matches!(
        attempt,
        tokenbroker::store::LeaseAttempt::Acquired(_)
    ));
    let (broker, caller, key) = (w.broker.clone(), w.caller(), w.key.clone());
    let reader = tokio::spawn(async move { broker.retrieve(&caller, &key).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        w.idp.counters().refresh_calls,
        0,
        "the reader waits while the lease is held"
    );
    w.clock.advance(Duration::from_secs(31)); // the store's clock passes the lease's expiry
    let got = reader.await.unwrap().expect("taken over after the TTL");
    assert!(got.refreshed);
    assert_eq!(w.idp.counters().refresh_calls, 1);
    assert!(!w.stored().await.record.meta.state.is_relink_required());
}

#[tokio::test]
async fn a_lease_held_longer_than_the_wait_is_a_typed_error_and_changes_nothing() {
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::with_clock(clock.clone()));
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    let broker = TokenBroker::builder()
        .with_provider(idp.clone(), ProviderPolicy::default())
        .with_store(store.clone())
        .with_clock(clock.clone())
        .with_lease_wait(Duration::from_millis(200))
        .build()
        .unwrap();
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    let start = broker
        .begin_login(&key, LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.approve(&start.authorization_url, "alice").unwrap();
    broker.complete_login(start.pending, &cb).await.unwrap();
    clock.advance(HOUR + Duration::from_secs(1));
    let holder = tokenbroker::store::LeaseHolder::new("busy-elsewhere");
    store
        .try_lease(&key, &holder, Duration::from_secs(30))
        .await
        .unwrap();
    let before = store.load(&key).await.unwrap().unwrap();
    let caller = Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope();
    assert!(matches!(
        broker.retrieve(&caller, &key).await,
        Err(Error::RefreshInProgress { .. })
    ));
    assert_eq!(idp.counters().refresh_calls, 0);
    assert_eq!(
        store.load(&key).await.unwrap().unwrap().version,
        before.version
    );
}

#[tokio::test]
async fn a_relink_after_relink_required_does_not_keep_the_dead_refresh_token() {
    let w = World::new();
    w.link().await;
    w.idp.revoke_user("alice");
    w.expire();
    assert!(matches!(
        w.broker.retrieve(&w.caller(), &w.key).await,
        Err(Error::RelinkRequired { .. })
    ));
    // The provider sends no refresh token this time (as Google does without consent).
    w.idp.set_omit_refresh_token(true);
    let relinked = w.link().await;
    assert!(
        relinked.refresh_token().is_none(),
        "the dead refresh token is not carried over"
    );
    let stored = w.stored().await;
    assert!(!stored.record.meta.state.is_relink_required());
    assert!(w.broker.retrieve(&w.caller(), &w.key).await.is_ok());
}

/// A reader that gives up while it leads a refresh (its request was cancelled) must not cut
/// the refresh off: the provider has already been asked, and may rotate; the new tokens must
/// still reach the store, and the old refresh token must never be presented again.
#[tokio::test]
async fn a_reader_dropped_mid_refresh_does_not_lose_the_rotated_token() {
    let w = World::new();
    let linked = w.link().await;
    w.clock.advance(HOUR);
    w.idp.pause();
    let reader = {
        let (broker, caller, key) = (w.broker.clone(), w.caller(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    w.idp.wait_for_refresh_calls(1).await;
    reader.abort();
    assert!(reader.await.unwrap_err().is_cancelled());
    w.idp.resume();

    // The rest of the refresh runs on its own: wait for its write, counting store reads only.
    let mut stored = w.stored().await;
    for _ in 0..1000 {
        if rt(&TokenSet::from_payload(&stored.record.payload).unwrap()) != rt(&linked) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        stored = w.stored().await;
    }
    let now = TokenSet::from_payload(&stored.record.payload).unwrap();
    assert_ne!(
        rt(&now),
        rt(&linked),
        "the rotated refresh token reached the store"
    );

    let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(!got.refreshed, "the next reader finds fresh tokens");
    assert!(w.idp.is_active(got.tokens.access_token().expose_secret()));
    let counters = w.idp.counters();
    assert_eq!(counters.refresh_calls, 1);
    assert_eq!(counters.reuse_detected, 0);
}

fn rt(set: &TokenSet) -> Option<String> {
    set.refresh_token().map(|t| t.expose_secret().to_owned())
}

/// Issue 11, scenario 1: a reader whose future is kept but never polled again (held by a
/// combinator, say) after its refresh reached the provider. The refresh does not live in that
/// future: it runs in the broker's engine, so it completes, and the reader joined to it gets the
/// new tokens. Default timing (refresh time-out 10 s, lease 30 s, lease wait 35 s), the one
/// under which a joiner used to take the expired lease and present the spent refresh token.
#[tokio::test(start_paused = true)]
async fn a_leader_that_is_never_polled_again_does_not_hold_up_its_joiners() {
    let w = World::new();
    w.link().await;
    let broker = TokenBroker::builder()
        .with_provider(w.idp.clone(), ProviderPolicy::default())
        .with_store(w.store.clone())
        .with_clock(w.clock.clone())
        .build()
        .unwrap();
    w.clock.advance(HOUR);
    w.idp.pause();

    // Poll the leader until its refresh is at the provider, then stop polling it.
    let caller = w.caller();
    let mut leader = Box::pin(broker.retrieve(&caller, &w.key));
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
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
        "the leader reached the provider"
    );

    let joined = {
        let (broker, caller, key) = (broker.clone(), caller.clone(), w.key.clone());
        tokio::spawn(async move { broker.retrieve(&caller, &key).await })
    };
    // Far past the lease and the lease wait, with the leader still unpolled.
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.idp.resume();
    let got = joined
        .await
        .unwrap()
        .expect("the joined reader gets the refreshed tokens");
    assert!(got.refreshed);
    assert!(w.idp.is_active(got.tokens.access_token().expose_secret()));
    assert_eq!(w.idp.counters().refresh_calls, 1);
    assert_eq!(w.idp.counters().reuse_detected, 0);
    drop(leader);
}
