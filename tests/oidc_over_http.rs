//! OpenID Connect and the Google and Microsoft presets end to end over real HTTP, against the
//! loopback FakeIdp in its OIDC, Google and Microsoft modes: discovery, signed ID tokens, key
//! rotation at the provider, and each preset's quirks.

use std::sync::Arc;
use std::time::Duration;

use tokenbroker::http::ReqwestClient;
use tokenbroker::provider::{
    IssuerPolicy, MicrosoftAuthority, OidcConfig, OidcProvider, Provider, ProviderError, TokenKind,
};
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, ManualClock};
use tokenbroker::{
    Callback, Caller, Error, GrantStatus, LoginOptions, ProviderId, ProviderPolicy,
    RevocationStatus, Scopes, Secret, TokenBroker, TokenKey, TokenView,
};

fn redirect() -> url::Url {
    "http://127.0.0.1:9/callback".parse().unwrap()
}

fn key(provider: &str) -> TokenKey {
    TokenKey::parse("acme", "alice", provider).unwrap()
}

fn caller() -> Caller {
    let k = key("x");
    Caller::new(k.realm, k.subject, "app")
        .with_role("read-token")
        .with_full_client_scope()
}

fn broker(config: OidcConfig, clock: Option<Arc<ManualClock>>) -> TokenBroker {
    let mut b = TokenBroker::builder()
        .with_oidc_provider(config, ProviderPolicy::default().expose_refresh_token(true));
    if let Some(clock) = clock {
        b = b.with_clock(clock);
    }
    b.build().unwrap()
}

async fn link(broker: &TokenBroker, idp: &FakeIdp, key: &TokenKey) -> Result<TokenView, Error> {
    let start = broker.begin_login(key, LoginOptions::default()).await?;
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .map(|o| o.tokens)
}

#[tokio::test]
async fn keys_are_refetched_when_the_provider_rotates_them_and_not_for_made_up_kids() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await.unwrap();
    idp.set_publish_retired_keys(false);
    let http = Arc::new(ReqwestClient::new().unwrap());
    let config = OidcConfig::discover(
        ProviderId::new("corp").unwrap(),
        &idp.issuer().parse().unwrap(),
        idp.client_id(),
        Some(Secret::new(idp.client_secret())),
        redirect(),
        &*http,
    )
    .await
    .unwrap();
    let provider = OidcProvider::new(config.clone(), http.clone());
    let broker = broker(config, None);
    let k = key("corp");

    let first = link(&broker, &idp, &k).await.unwrap();
    assert_eq!(idp.counters().jwks_calls, 1, "keys fetched on first use");
    idp.rotate_signing_key();
    // The new token's kid is unknown to the cached set: one re-fetch, then it verifies.
    let second = link(&broker, &idp, &k)
        .await
        .expect("login after key rotation");
    assert_eq!(idp.counters().jwks_calls, 2);
    assert!(
        provider
            .verify_id_token(second.id_token().unwrap(), None)
            .await
            .is_ok()
    );
    // The retired key is no longer published: the old token no longer verifies...
    let provider_jwks_before = idp.counters().jwks_calls;
    assert!(matches!(
        provider
            .verify_id_token(first.id_token().unwrap(), None)
            .await,
        Err(ProviderError::IdToken { .. })
    ));
    // ...and a burst of tokens with unknown kids costs at most one more fetch per interval.
    for _ in 0..5 {
        let _ = provider
            .verify_id_token(first.id_token().unwrap(), None)
            .await;
    }
    assert!(idp.counters().jwks_calls <= provider_jwks_before + 1);
}

#[tokio::test]
async fn a_tampered_id_token_fails_the_login_and_stores_nothing() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await.unwrap();
    let http = Arc::new(ReqwestClient::new().unwrap());
    let config = OidcConfig::discover(
        ProviderId::new("corp").unwrap(),
        &idp.issuer().parse().unwrap(),
        idp.client_id(),
        Some(Secret::new(idp.client_secret())),
        redirect(),
        &*http,
    )
    .await
    .unwrap();
    let broker = broker(config, None);
    let k = key("corp");
    idp.issue_tampered_id_tokens(true);
    let err = link(&broker, &idp, &k).await.unwrap_err();
    assert!(err.to_string().contains("id token"), "{err}");
    assert!(matches!(
        broker.retrieve(&caller(), &k).await,
        Err(Error::NotFound { .. } | Error::Forbidden)
    ));
}

#[tokio::test]
async fn google_preset_consents_once_keeps_its_refresh_token_and_revokes_on_unlink() {
    let idp = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
    let config = OidcConfig::google(
        ProviderId::new("google").unwrap(),
        idp.client_id(),
        Secret::new(idp.client_secret()),
        redirect(),
    )
    .with_base_url(&idp.base_url())
    .with_issuer(IssuerPolicy::Exact(idp.issuer()));
    let clock = Arc::new(ManualClock::starting_now());
    let broker = broker(config, Some(clock.clone()));
    let k = key("google");

    let linked = link(&broker, &idp, &k).await.unwrap();
    let rt = linked
        .refresh_token()
        .expect("access_type=offline + prompt=consent on the first link")
        .expose_secret()
        .to_owned();
    assert_eq!(idp.counters().consent_prompts, 1);
    assert!(linked.scopes().contains("email"));

    // The second login asks for no consent; Google sends no refresh token; ours is kept.
    let relinked = link(&broker, &idp, &k).await.unwrap();
    assert_eq!(
        idp.counters().consent_prompts,
        1,
        "no consent screen while a token is held"
    );
    assert_eq!(relinked.refresh_token().unwrap().expose_secret(), rt);

    clock.advance(Duration::from_secs(3601));
    let read = broker.retrieve(&caller(), &k).await.unwrap();
    assert!(read.refreshed);
    assert_eq!(
        read.tokens.refresh_token().unwrap().expose_secret(),
        rt,
        "no rotation"
    );
    assert!(idp.is_active(read.tokens.access_token().expose_secret()));

    let outcome = broker.unlink(&k).await.unwrap();
    assert_eq!(outcome.revocation, RevocationStatus::Revoked);
    assert!(!idp.is_active(&rt));
}

#[tokio::test]
async fn microsoft_preset_rotates_checks_the_tenant_and_cannot_revoke() {
    let tenant = "9188040d-6c67-4c5b-b112-36a304b66dad";
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(tenant))
        .await
        .unwrap();
    let base = idp.base_url();
    let template = format!("{}/{{tenantid}}/v2.0", base.as_str().trim_end_matches('/'));
    let preset = |tenants: Option<Vec<String>>| {
        OidcConfig::microsoft(
            ProviderId::new("microsoft").unwrap(),
            "common",
            idp.client_id(),
            Secret::new(idp.client_secret()),
            redirect(),
        )
        .with_base_url(&base)
        .with_issuer(IssuerPolicy::TenantTemplate {
            template: template.clone(),
            tenants,
        })
    };
    let clock = Arc::new(ManualClock::starting_now());
    let broker = broker(preset(None), Some(clock.clone()));
    let k = key("microsoft");

    let linked = link(&broker, &idp, &k).await.unwrap();
    let rt = linked
        .refresh_token()
        .expect("offline_access is always asked for")
        .expose_secret()
        .to_owned();
    assert!(linked.extras().contains_key("ext_expires_in"));
    assert!(
        Scopes::parse("openid offline_access").is_subset(linked.scopes()),
        "offline_access counted as granted although Microsoft does not echo it"
    );

    clock.advance(Duration::from_secs(3601));
    let read = broker.retrieve(&caller(), &k).await.unwrap();
    assert!(read.refreshed);
    assert_ne!(
        read.tokens.refresh_token().unwrap().expose_secret(),
        rt,
        "rotated"
    );

    let outcome = broker.unlink(&k).await.unwrap();
    assert_eq!(outcome.revocation, RevocationStatus::NotSupported);
    assert!(outcome.deleted);

    // An app pinned to another tenant refuses this tenant's users.
    let other = "11111111-1111-1111-1111-111111111111".to_owned();
    let pinned = TokenBroker::builder()
        .with_oidc_provider(
            preset(Some(vec![other])),
            ProviderPolicy::default().expose_refresh_token(true),
        )
        .build()
        .unwrap();
    let err = link(&pinned, &idp, &k).await.unwrap_err();
    assert!(err.to_string().contains("tenant"), "{err}");
}

/// Re-login keeps what the provider does not resend, for the Microsoft and GitHub presets too
/// (Google's is covered above, OIDC's in the real-IdP suite).
#[tokio::test]
async fn relogin_with_the_microsoft_and_github_presets_keeps_a_working_refresh_token() {
    // Microsoft: every login brings a new refresh token; the newest is kept and works.
    let tenant = "9188040d-6c67-4c5b-b112-36a304b66dad";
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(tenant))
        .await
        .unwrap();
    let base = idp.base_url();
    let config = OidcConfig::microsoft(
        ProviderId::new("microsoft").unwrap(),
        "common",
        idp.client_id(),
        Secret::new(idp.client_secret()),
        redirect(),
    )
    .with_base_url(&base)
    .with_issuer(IssuerPolicy::TenantTemplate {
        template: format!("{}/{{tenantid}}/v2.0", base.as_str().trim_end_matches('/')),
        tenants: None,
    });
    let clock = Arc::new(ManualClock::starting_now());
    let broker = broker(config, Some(clock.clone()));
    let k = key("microsoft");
    link(&broker, &idp, &k).await.unwrap();
    let second = link(&broker, &idp, &k).await.unwrap();
    let rt = second.refresh_token().unwrap().expose_secret().to_owned();
    clock.advance(Duration::from_secs(3601));
    let read = broker.retrieve(&caller(), &k).await.unwrap();
    assert!(read.refreshed, "the kept refresh token works: {rt:.4}…");

    // GitHub (plain OAuth 2.0): a re-login whose answer lacks a refresh token keeps the old one.
    let idp = FakeIdp::start(FakeIdpConfig::default()).await.unwrap();
    let config = tokenbroker::provider::OAuth2Config::github(
        ProviderId::new("github").unwrap(),
        idp.client_id(),
        Secret::new(idp.client_secret()),
        redirect(),
    )
    .with_base_url(&idp.base_url())
    .with_scopes(Scopes::parse("repo"));
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TokenBroker::builder()
        .with_oauth2_provider(config, ProviderPolicy::default().expose_refresh_token(true))
        .with_clock(clock.clone())
        .build()
        .unwrap();
    let k = key("github");
    let first = link(&broker, &idp, &k).await.unwrap();
    // The preset asked GitHub's `/user` whose tokens these are.
    let account = first
        .account()
        .expect("the account endpoint named the account");
    assert_eq!(account.email(), Some("alice@example.com"));
    let rt = first.refresh_token().unwrap().expose_secret().to_owned();
    idp.set_omit_refresh_token(true);
    let again = link(&broker, &idp, &k).await.unwrap();
    assert_eq!(again.refresh_token().unwrap().expose_secret(), rt);
    idp.set_omit_refresh_token(false);
    clock.advance(Duration::from_secs(3601));
    assert!(broker.retrieve(&caller(), &k).await.unwrap().refreshed);
    assert_eq!(idp.counters().reuse_detected, 0);
}

/// A Microsoft tenant at another authority (here the fake, as a proxy or a national cloud
/// would be): endpoints and the `{tenantid}` issuer template come from the authority alone, so
/// no issuer override is needed.
#[tokio::test]
async fn the_microsoft_preset_at_a_custom_authority_links_and_refreshes() {
    let tenant = "9188040d-6c67-4c5b-b112-36a304b66dad";
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(tenant))
        .await
        .unwrap();
    let config = OidcConfig::microsoft_with_authority(
        ProviderId::new("microsoft").unwrap(),
        MicrosoftAuthority::Custom(idp.base_url()),
        "organizations",
        idp.client_id(),
        Secret::new(idp.client_secret()),
        redirect(),
    )
    .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let broker = broker(config, Some(clock.clone()));
    let k = key("microsoft");
    let linked = link(&broker, &idp, &k).await.unwrap();
    assert_eq!(
        linked.account().and_then(|a| a.tenant_id.as_deref()),
        Some(tenant),
        "the ID token passed the issuer template derived from the authority"
    );
    clock.advance(Duration::from_secs(3601));
    let read = broker.retrieve(&caller(), &k).await.unwrap();
    assert!(read.refreshed);
    assert_eq!(idp.counters().refresh_successes, 1);
}

/// A `401` from userinfo means the access token was refused (expired, revoked), not the
/// grant: the error says so, and the link keeps working.
#[tokio::test]
async fn a_401_from_userinfo_is_a_rejected_access_token_not_a_dead_grant() {
    let idp = FakeIdp::start(FakeIdpConfig::default()).await.unwrap();
    let http = Arc::new(ReqwestClient::new().unwrap());
    let config = OidcConfig::discover(
        ProviderId::new("corp").unwrap(),
        &idp.issuer().parse().unwrap(),
        idp.client_id(),
        Some(Secret::new(idp.client_secret())),
        redirect(),
        &*http,
    )
    .await
    .unwrap()
    // The fake's account endpoint answers a JSON object for a live access token and 401
    // otherwise, as a userinfo endpoint does.
    .with_userinfo_endpoint(idp.base_url().join("user").unwrap());
    let provider = OidcProvider::new(config.clone(), http.clone());
    let clock = Arc::new(ManualClock::starting_now());
    let broker = broker(config, Some(clock.clone()));
    let k = key("corp");
    let linked = link(&broker, &idp, &k).await.unwrap();
    let at = linked.access_token().clone();
    let claims = provider.userinfo(&at).await.unwrap();
    assert_eq!(claims["login"], "alice");

    // The access token alone is revoked upstream; the grant lives on.
    provider.revoke(&at, TokenKind::AccessToken).await.unwrap();
    let err = provider.userinfo(&at).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProviderError::AccessTokenRejected {
                endpoint: "userinfo",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_transient());
    assert!(!err.to_string().contains(at.expose_secret()));
    assert!(matches!(
        broker.status(&k).await.unwrap(),
        GrantStatus::Active { .. }
    ));

    // The remedy is a refresh, which works: the refresh token was never in question.
    clock.advance(Duration::from_secs(3601));
    let read = broker.retrieve(&caller(), &k).await.unwrap();
    assert!(read.refreshed);
    let claims = provider.userinfo(read.tokens.access_token()).await.unwrap();
    assert_eq!(claims["login"], "alice");
}

#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Access tokens that live 20 s, a 60 s skew: without the cap every read would refresh (and
/// a refreshed token would not even be fresh for the read that asked). Reads serve a token
/// until half its lifetime is left, and the first such token stored logs one warning for the
/// provider, without a token in it.
#[tokio::test]
async fn access_tokens_shorter_lived_than_the_skew_are_not_refreshed_on_every_read() {
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let idp =
        FakeIdp::start(FakeIdpConfig::default().with_access_token_ttl(Duration::from_secs(20)))
            .await
            .unwrap();
    let http = Arc::new(ReqwestClient::new().unwrap());
    let config = OidcConfig::discover(
        ProviderId::new("corp").unwrap(),
        &idp.issuer().parse().unwrap(),
        idp.client_id(),
        Some(Secret::new(idp.client_secret())),
        redirect(),
        &*http,
    )
    .await
    .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    // The default skew, 60 s.
    let broker = broker(config, Some(clock.clone()));
    let k = key("corp");
    let mut seen = vec![link(&broker, &idp, &k).await.unwrap()];

    // Right after the link: 50 reads, no refresh, none stale.
    for _ in 0..50 {
        let read = broker.retrieve(&caller(), &k).await.unwrap();
        assert!(!read.refreshed && !read.stale);
    }
    assert_eq!(idp.counters().refresh_calls, 0);

    // Less than half the lifetime left (9 s of 20): the next read refreshes, once.
    clock.advance(Duration::from_secs(11));
    let read = broker.retrieve(&caller(), &k).await.unwrap();
    assert!(
        read.refreshed && !read.stale,
        "a refreshed token serves its read"
    );
    seen.push(read.tokens);
    for _ in 0..50 {
        let read = broker.retrieve(&caller(), &k).await.unwrap();
        assert!(!read.refreshed && !read.stale);
    }
    assert_eq!(idp.counters().refresh_calls, 1);
    clock.advance(Duration::from_secs(11));
    seen.push(broker.retrieve(&caller(), &k).await.unwrap().tokens);
    assert_eq!(idp.counters().refresh_calls, 2);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        logs.matches("less than twice the broker's expiry skew")
            .count(),
        1,
        "one warning per provider: {logs}"
    );
    assert!(logs.contains("corp"), "{logs}");
    for tokens in &seen {
        assert!(!logs.contains(tokens.access_token().expose_secret()));
        if let Some(rt) = tokens.refresh_token() {
            assert!(!logs.contains(rt.expose_secret()));
        }
    }
}
