//! The broker with the generic OAuth 2.0 provider against the loopback `FakeIdp`, over real
//! HTTP: link, refresh and rotate, fan-in, and every upstream fault the fake can produce.

use std::sync::Arc;
use std::time::Duration;

use tokenbroker::provider::{ClientAuth, OAuth2Config};
use tokenbroker::store::TokenStore;
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, Fault, ManualClock};
use tokenbroker::{
    Callback, Caller, Error, LoginOptions, MemoryStore, ProviderId, ProviderPolicy,
    RevocationStatus, Scopes, Secret, TokenBroker, TokenKey, TokenView,
};

struct World {
    idp: FakeIdp,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    broker: TokenBroker,
    key: TokenKey,
}

fn config(idp: &FakeIdp, auth: ClientAuth) -> OAuth2Config {
    OAuth2Config::new(
        ProviderId::new("fake").unwrap(),
        idp.client_id(),
        idp.authorization_endpoint(),
        idp.token_endpoint(),
        "http://127.0.0.1:9/callback".parse().unwrap(),
    )
    .with_client_secret(Secret::new(idp.client_secret()))
    .with_client_auth(auth)
    .with_scopes(Scopes::parse("openid offline_access"))
    .with_revocation_endpoint(idp.revocation_endpoint())
}

async fn world_with(auth: ClientAuth) -> World {
    let idp = FakeIdp::start(FakeIdpConfig::default().with_client_secret("s3cr~t+/="))
        .await
        .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::with_clock(clock.clone()));
    let broker = broker_on(&idp, &clock, &store, auth);
    World {
        idp,
        clock,
        store,
        broker,
        key: TokenKey::parse("acme", "alice", "fake").unwrap(),
    }
}

fn broker_on(
    idp: &FakeIdp,
    clock: &Arc<ManualClock>,
    store: &Arc<MemoryStore>,
    auth: ClientAuth,
) -> TokenBroker {
    TokenBroker::builder()
        .with_oauth2_provider(
            config(idp, auth),
            ProviderPolicy::default().expose_refresh_token(true),
        )
        .with_store(store.clone())
        .with_clock(clock.clone())
        .with_refresh_timeout(Duration::from_millis(500))
        .with_lease_ttl(Duration::from_millis(500) + tokenbroker::LEASE_MARGIN)
        .build()
        .unwrap()
}

async fn world() -> World {
    world_with(ClientAuth::Basic).await
}

impl World {
    fn caller(&self) -> Caller {
        Caller::new(self.key.realm.clone(), self.key.subject.clone(), "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    async fn link(&self) -> TokenView {
        let start = self
            .broker
            .begin_login(&self.key, LoginOptions::default())
            .await
            .unwrap();
        let cb = self
            .idp
            .authorize(&start.authorization_url, "alice")
            .unwrap();
        let outcome = self
            .broker
            .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
            .await
            .unwrap();
        outcome.tokens
    }

    fn expire(&self) {
        self.clock.advance(Duration::from_secs(3601));
    }
}

#[tokio::test]
async fn link_read_refresh_rotate_unlink_with_basic_and_post_client_auth() {
    for auth in [ClientAuth::Basic, ClientAuth::Post] {
        let w = world_with(auth).await;
        let linked = w.link().await;
        assert!(
            linked.id_token().is_some(),
            "openid scope brings an id_token"
        );
        assert!(w.idp.is_active(linked.access_token().expose_secret()));
        w.expire();
        let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
        assert!(got.refreshed);
        let new_rt = got
            .tokens
            .refresh_token()
            .unwrap()
            .expose_secret()
            .to_owned();
        assert_ne!(new_rt, linked.refresh_token().unwrap().expose_secret());
        assert!(w.idp.is_active(&new_rt));
        assert_eq!(w.idp.counters().refresh_successes, 1);
        let out = w.broker.unlink(&w.key).await.unwrap();
        assert_eq!(out.revocation, RevocationStatus::Revoked);
        assert!(!w.idp.is_active(&new_rt), "revocation reached the provider");
        assert!(
            !w.idp.is_active(got.tokens.access_token().expose_secret()),
            "the whole grant ended"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_across_two_instances_make_one_refresh_over_http() {
    let w = world().await;
    w.link().await;
    w.expire();
    let other = broker_on(&w.idp, &w.clock, &w.store, ClientAuth::Basic);
    w.idp.set_token_delay(Some(Duration::from_millis(100)));
    let mut readers = Vec::new();
    for i in 0..200 {
        let b = if i % 2 == 0 {
            w.broker.clone()
        } else {
            other.clone()
        };
        let (c, k) = (w.caller(), w.key.clone());
        readers.push(tokio::spawn(async move { b.retrieve(&c, &k).await }));
    }
    let mut seen = std::collections::HashSet::new();
    for r in readers {
        seen.insert(
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
    assert_eq!(c.refresh_calls, 1);
    assert_eq!(c.reuse_detected, 0);
    assert_eq!(seen.len(), 1);
}

/// Every fault leaves the stored record exactly as it was, and the grant alive.
#[tokio::test]
async fn upstream_faults_leave_the_record_unchanged() {
    let html = "<html><body>Service Unavailable</body></html>".to_owned();
    type Case = (&'static str, Fault, fn(&Error) -> bool);
    let faults: Vec<Case> = vec![
        (
            "503 html",
            Fault::Status {
                status: 503,
                body: html.clone(),
                retry_after: Some(7),
            },
            |e| matches!(e, Error::Unavailable { retry_after: Some(d), .. } if d.as_secs() == 7),
        ),
        (
            "500",
            Fault::Status {
                status: 500,
                body: String::new(),
                retry_after: None,
            },
            |e| matches!(e, Error::Unavailable { .. }),
        ),
        (
            "429",
            Fault::Status {
                status: 429,
                body: "{}".into(),
                retry_after: Some(3),
            },
            |e| matches!(e, Error::Unavailable { .. }),
        ),
        ("garbage 200", Fault::GarbageBody, |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        ("truncated json", Fault::TruncatedJson, |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        ("dropped connection", Fault::DropConnection, |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        ("time-out", Fault::Delay(Duration::from_secs(3)), |e| {
            matches!(e, Error::Unavailable { .. })
        }),
        (
            "html 400",
            Fault::Status {
                status: 400,
                body: html,
                retry_after: None,
            },
            |e| matches!(e, Error::Unavailable { .. }),
        ),
        (
            "invalid_client",
            Fault::Status {
                status: 401,
                body: r#"{"error":"invalid_client"}"#.into(),
                retry_after: None,
            },
            |e| {
                matches!(
                    e,
                    Error::Provider {
                        source: tokenbroker::ProviderError::InvalidClient { .. },
                        ..
                    }
                )
            },
        ),
        (
            "github-style 200 error",
            Fault::ErrorWith200 {
                error: "temporarily_unavailable".into(),
            },
            |e| matches!(e, Error::Unavailable { .. }),
        ),
    ];
    for (name, fault, expect) in faults {
        let w = world().await;
        let linked = w.link().await;
        w.expire();
        let before = w.store.load(&w.key).await.unwrap().unwrap();
        w.idp.inject(fault);
        let err = w.broker.retrieve(&w.caller(), &w.key).await.unwrap_err();
        assert!(expect(&err), "{name}: unexpected {err:?}");
        let after = w.store.load(&w.key).await.unwrap().unwrap();
        assert_eq!(after.version, before.version, "{name}: record rewritten");
        assert_eq!(
            after.record.payload.expose_secret(),
            before.record.payload.expose_secret(),
            "{name}"
        );
        assert_eq!(after.record.meta, before.record.meta, "{name}");
        assert!(
            w.idp
                .is_active(linked.refresh_token().unwrap().expose_secret()),
            "{name}: grant survived"
        );
        w.clock.advance(Duration::from_secs(120));
        assert!(
            w.broker
                .retrieve(&w.caller(), &w.key)
                .await
                .unwrap()
                .refreshed,
            "{name}: recovers"
        );
    }
}

#[tokio::test]
async fn expires_in_as_a_string_is_understood() {
    let w = world().await;
    w.link().await;
    w.expire();
    w.idp.inject(Fault::ExpiresInAsString);
    let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(got.tokens.expires_at().is_some());
    assert!(!got.stale);
}

#[tokio::test]
async fn a_grant_revoked_at_the_provider_asks_for_relink_and_keeps_the_record() {
    let w = world().await;
    w.link().await;
    w.idp.revoke_user_grants("alice");
    w.expire();
    let before = w.store.load(&w.key).await.unwrap().unwrap();
    assert!(matches!(
        w.broker.retrieve(&w.caller(), &w.key).await,
        Err(Error::RelinkRequired { .. })
    ));
    let after = w.store.load(&w.key).await.unwrap().unwrap();
    assert!(after.record.meta.state.is_relink_required());
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret()
    );
}

#[tokio::test]
async fn a_replayed_code_is_refused_and_a_denied_consent_is_typed() {
    let w = world().await;
    let start = w
        .broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let cb = w.idp.authorize(&start.authorization_url, "alice").unwrap();
    let callback = Callback::from_url(&cb.redirect_url);
    let first = w
        .broker
        .complete_login(start.pending.clone(), &callback)
        .await
        .unwrap();
    let other = broker_on(&w.idp, &w.clock, &w.store, ClientAuth::Basic);
    let err = other
        .complete_login(start.pending, &callback)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LoginRejected { .. }), "{err:?}");
    // RFC 6749 §4.1.2: the provider revoked what the replayed code had produced.
    assert!(!w.idp.is_active(first.tokens.access_token().expose_secret()));

    w.idp.set_deny_consent(true);
    let start = w
        .broker
        .begin_login(&w.key, LoginOptions::default())
        .await
        .unwrap();
    let denied = w
        .idp
        .authorize(&start.authorization_url, "alice")
        .unwrap_err();
    let tokenbroker::testing::FakeIdpError::Redirected { redirect_url, .. } = denied else {
        panic!("{denied:?}")
    };
    let err = w
        .broker
        .complete_login(start.pending, &Callback::from_url(&redirect_url))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AuthorizationDenied { .. }), "{err:?}");
}
