//! tokenbroker against a real, certified OpenID Provider (`oidc-provider` from npm), started
//! on 127.0.0.1 for each test with scripted login. Expiry is real (short access-token
//! lifetimes); calls are counted at the provider; nothing asserts on elapsed time.

#[path = "support/oidc_provider.rs"]
mod oidc_provider;

use std::sync::Arc;
use std::time::Duration;

use oidc_provider::{CLIENT_SECRET, JWT_CLIENT_SECRET, OidcProvider, Profile, ProviderOptions};
use tokenbroker::http::ReqwestClient;
use tokenbroker::provider::{
    ClientAuth, GoogleQuirks, IssuerPolicy, MicrosoftQuirks, OAuth2Config, OidcConfig, ParMode,
    ProviderError, Quirks, RefreshTokenReuse,
};
use tokenbroker::store::TokenStore;
use tokenbroker::{
    Callback, Caller, Error, LoginOptions, MemoryStore, ProviderId, ProviderPolicy,
    RevocationStatus, Scopes, Secret, TokenBroker, TokenKey, TokenView,
};

const TTL: u64 = 2;

fn config(idp: &OidcProvider, auth: ClientAuth, scopes: &str) -> OAuth2Config {
    let client_id = match auth {
        ClientAuth::Post => "tb-post",
        _ => "tb-basic",
    };
    OAuth2Config::new(
        ProviderId::new("idp").unwrap(),
        client_id,
        idp.authorization_endpoint(),
        idp.token_endpoint(),
        idp.redirect_uri(),
    )
    .with_client_secret(Secret::new(CLIENT_SECRET))
    .with_client_auth(auth)
    .with_scopes(Scopes::parse(scopes))
    .with_revocation_endpoint(idp.revocation_endpoint())
}

fn broker(config: OAuth2Config, store: &Arc<MemoryStore>) -> TokenBroker {
    TokenBroker::builder()
        .with_oauth2_provider(config, ProviderPolicy::default().expose_refresh_token(true))
        .with_store(store.clone())
        // Access tokens live 2 s here; refresh only once they are really gone.
        .with_skew(Duration::from_millis(200))
        .build()
        .unwrap()
}

fn key() -> TokenKey {
    TokenKey::parse("acme", "alice", "idp").unwrap()
}

fn alice() -> Caller {
    let key = key();
    Caller::new(key.realm, key.subject, "app")
        .with_role("read-token")
        .with_full_client_scope()
}

async fn link(broker: &TokenBroker, idp: &OidcProvider, options: LoginOptions) -> TokenView {
    let start = broker
        .begin_login(&key(), options.with_login_hint("alice"))
        .await
        .unwrap();
    let redirect = idp.login(&start.authorization_url).await;
    broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap()
        .tokens
}

fn consent() -> LoginOptions {
    LoginOptions::default().with_param("prompt", "consent")
}

async fn wait_for_expiry() {
    tokio::time::sleep(Duration::from_secs(TTL) + Duration::from_millis(300)).await;
}

#[tokio::test]
async fn link_read_expire_refresh_rotate_and_the_old_refresh_token_is_dead() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let broker = broker(
        config(&idp, ClientAuth::Post, "openid offline_access email"),
        &store,
    );
    let linked = link(&broker, &idp, consent()).await;
    let first_rt = linked
        .refresh_token()
        .expect("offline_access + prompt=consent gives a refresh token")
        .clone();
    assert!(linked.id_token().is_some());
    assert!(linked.scopes().contains("offline_access"));

    let read = broker.retrieve(&alice(), &key()).await.unwrap();
    assert!(!read.refreshed);
    assert!(
        idp.is_active(read.tokens.access_token().expose_secret())
            .await
    );

    wait_for_expiry().await;
    assert!(
        !idp.is_active(linked.access_token().expose_secret()).await,
        "the provider expired it"
    );
    let read = broker.retrieve(&alice(), &key()).await.unwrap();
    assert!(read.refreshed);
    assert!(
        idp.is_active(read.tokens.access_token().expose_secret())
            .await
    );
    let second_rt = read.tokens.refresh_token().unwrap().clone();
    assert_ne!(
        second_rt.expose_secret(),
        first_rt.expose_secret(),
        "the provider rotated"
    );

    let c = idp.counters().await;
    assert_eq!(
        (c.refresh_requests, c.refresh_successes, c.reuse_detected),
        (1, 1, 0)
    );

    // The provider's own answer to a consumed refresh token: invalid_grant, and it revokes the
    // whole grant — which is why the broker must never present one twice.
    let (status, body) = idp.raw_refresh("tb-post", first_rt.expose_secret()).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(
        idp.counters().await.reuse_detected,
        1,
        "provider log:\n{}",
        idp.stderr()
    );
    assert!(
        !idp.is_active(second_rt.expose_secret()).await,
        "reuse killed the rotated token too"
    );
    wait_for_expiry().await;
    let err = broker.retrieve(&alice(), &key()).await.unwrap_err();
    assert!(matches!(err, Error::RelinkRequired { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_on_two_instances_cause_one_refresh_and_no_reuse() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let cfg = config(&idp, ClientAuth::Post, "openid offline_access");
    let (a, b) = (broker(cfg.clone(), &store), broker(cfg, &store));
    link(&a, &idp, consent()).await;
    wait_for_expiry().await;
    let mut readers = Vec::new();
    for i in 0..100 {
        let broker = if i % 2 == 0 { a.clone() } else { b.clone() };
        readers.push(tokio::spawn(async move {
            broker.retrieve(&alice(), &key()).await
        }));
    }
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
    let c = idp.counters().await;
    assert_eq!(
        c.refresh_requests, 1,
        "one refresh at the provider for 100 readers on 2 instances"
    );
    assert_eq!(c.reuse_detected, 0);
    assert_eq!(tokens.len(), 1);
    assert!(idp.is_active(tokens.iter().next().unwrap()).await);
}

#[tokio::test]
async fn a_grant_revoked_at_the_provider_asks_for_relink_and_keeps_the_record() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let broker = broker(
        config(&idp, ClientAuth::Basic, "openid offline_access"),
        &store,
    );
    link(&broker, &idp, consent()).await;
    idp.revoke_user("alice").await;
    wait_for_expiry().await;
    let before = store.load(&key()).await.unwrap().unwrap();
    let err = broker.retrieve(&alice(), &key()).await.unwrap_err();
    assert!(matches!(err, Error::RelinkRequired { .. }), "{err:?}");
    let after = store.load(&key()).await.unwrap().unwrap();
    assert!(after.record.meta.state.is_relink_required());
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret()
    );
    // Linking again repairs it.
    link(&broker, &idp, consent()).await;
    assert!(broker.retrieve(&alice(), &key()).await.is_ok());
}

#[tokio::test]
async fn unlink_revokes_at_the_provider() {
    let idp = OidcProvider::start(Profile::Oidc, 60).await;
    let store = Arc::new(MemoryStore::new());
    let broker = broker(
        config(&idp, ClientAuth::Basic, "openid offline_access"),
        &store,
    );
    let linked = link(&broker, &idp, consent()).await;
    let rt = linked.refresh_token().unwrap().expose_secret().to_owned();
    assert!(idp.is_active(&rt).await);
    let outcome = broker.unlink(&key()).await.unwrap();
    assert_eq!(outcome.revocation, RevocationStatus::Revoked);
    assert!(outcome.deleted);
    assert!(
        !idp.is_active(&rt).await,
        "introspection says inactive after unlink"
    );
    assert_eq!(idp.counters().await.revocation_requests, 1);
}

/// The revocation endpoint cannot be reached during the unlink: the link is deleted, the
/// revocation is kept in the store's outbox (deferred, not forgotten), and another instance's
/// drain, once it is due, revokes the grant at the real provider.
#[tokio::test]
async fn an_unlink_during_an_outage_is_revoked_at_the_provider_by_a_later_drain() {
    let idp = OidcProvider::start(Profile::Oidc, 60).await;
    let store = Arc::new(MemoryStore::new());
    let linking = broker(
        config(&idp, ClientAuth::Basic, "openid offline_access"),
        &store,
    );
    let linked = link(&linking, &idp, consent()).await;
    let rt = linked.refresh_token().unwrap().expose_secret().to_owned();

    // An instance whose way to the revocation endpoint is cut (nothing listens there).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unreachable = format!("http://{}/revoke", closed.local_addr().unwrap());
    drop(closed);
    let cut_off = broker(
        config(&idp, ClientAuth::Basic, "openid offline_access")
            .with_revocation_endpoint(unreachable.parse().unwrap()),
        &store,
    );
    let outcome = cut_off.unlink(&key()).await.unwrap();
    assert!(outcome.deleted);
    assert!(
        matches!(outcome.revocation, RevocationStatus::Deferred { .. }),
        "{:?}",
        outcome.revocation
    );
    assert!(idp.is_active(&rt).await, "nothing reached the provider yet");

    // Another instance, a minute later by its clock (the retry is due after 30 s).
    let later = Arc::new(tokenbroker::testing::ManualClock::new(
        time::OffsetDateTime::now_utc() + Duration::from_secs(60),
    ));
    let drainer = TokenBroker::builder()
        .with_oauth2_provider(
            config(&idp, ClientAuth::Basic, "openid offline_access"),
            ProviderPolicy::default(),
        )
        .with_store(store.clone())
        .with_clock(later)
        .build()
        .unwrap();
    let report = drainer
        .drain_revocations(tokenbroker::DrainOptions::default())
        .await
        .unwrap();
    assert_eq!((report.claimed, report.revoked), (1, 1), "{report:?}");
    assert!(
        !idp.is_active(&rt).await,
        "introspection says inactive after the drain"
    );
    assert_eq!(idp.counters().await.revocation_requests, 1);
}

/// The provider's own rule (OIDC Core §11), seen without any help from the broker: a client
/// whose quirks never add `prompt=consent` gets no refresh token for `offline_access`.
#[tokio::test]
async fn without_prompt_consent_the_provider_drops_offline_access() {
    #[derive(Debug)]
    struct NoConsentPrompt;
    impl Quirks for NoConsentPrompt {}

    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let broker = broker(
        config(&idp, ClientAuth::Basic, "openid offline_access").with_quirks(NoConsentPrompt),
        &store,
    );
    let linked = link(&broker, &idp, LoginOptions::default()).await;
    assert!(linked.refresh_token().is_none());
    wait_for_expiry().await;
    assert!(matches!(
        broker.retrieve(&alice(), &key()).await,
        Err(Error::NoRefreshToken { .. })
    ));
}

/// With the standard quirks the broker asks for consent exactly when it holds no refresh
/// token: the first link gets one without the host doing anything, and a later login (no
/// consent screen, so no new refresh token) keeps it.
#[tokio::test]
async fn offline_access_asks_for_consent_on_the_first_link_only() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let broker = broker(
        config(&idp, ClientAuth::Basic, "openid offline_access"),
        &store,
    );
    let linked = link(&broker, &idp, LoginOptions::default()).await;
    let rt = linked
        .refresh_token()
        .expect("prompt=consent was added on the first link")
        .expose_secret()
        .to_owned();
    let relinked = link(&broker, &idp, LoginOptions::default()).await;
    assert_eq!(relinked.refresh_token().unwrap().expose_secret(), rt);
    assert!(
        idp.is_active(&rt).await,
        "the kept refresh token still works"
    );
}

fn http() -> Arc<ReqwestClient> {
    Arc::new(ReqwestClient::new().unwrap())
}

/// The provider's configuration from its discovery document, for one of its two clients.
async fn discovered(idp: &OidcProvider, auth: ClientAuth, scopes: &str) -> OidcConfig {
    let client_id = match auth {
        ClientAuth::Post => "tb-post",
        _ => "tb-basic",
    };
    let mut config = OidcConfig::discover(
        ProviderId::new("idp").unwrap(),
        &idp.issuer(),
        client_id,
        Some(Secret::new(CLIENT_SECRET)),
        idp.redirect_uri(),
        &*http(),
    )
    .await
    .expect("discovery");
    config.oauth2 = config
        .oauth2
        .with_client_auth(auth)
        .with_scopes(Scopes::parse(scopes));
    config
}

fn oidc_broker(config: OidcConfig, store: &Arc<MemoryStore>) -> TokenBroker {
    TokenBroker::builder()
        .with_oidc_provider(config, ProviderPolicy::default().expose_refresh_token(true))
        .with_store(store.clone())
        .with_skew(Duration::from_millis(200))
        .build()
        .unwrap()
}

/// Changes one claim of a signed JWT without re-signing it.
fn tamper(jwt: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&b64.decode(&parts[1]).unwrap()).unwrap();
    claims["sub"] = "mallory".into();
    parts[1] = b64.encode(serde_json::to_vec(&claims).unwrap());
    parts.join(".")
}

#[tokio::test]
async fn discovery_login_verifies_the_id_token_and_rejects_tampered_ones() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let config = discovered(&idp, ClientAuth::Basic, "openid offline_access email").await;
    assert_eq!(
        config.issuer,
        IssuerPolicy::Exact(idp.issuer().as_str().trim_end_matches('/').to_owned())
    );
    let broker = oidc_broker(config.clone(), &store);
    // The broker's login verifies the ID token (signature, iss, aud, exp, nonce) before storing.
    let linked = link(&broker, &idp, LoginOptions::default()).await;
    let id_token = linked.id_token().expect("an ID token for openid").clone();

    let verifier = tokenbroker::provider::OidcProvider::new(config.clone(), http());
    let claims = verifier.verify_id_token(&id_token, None).await.unwrap();
    assert_eq!(claims.subject, "alice");
    assert_eq!(claims.audiences, vec!["tb-basic".to_owned()]);
    // The nonce of another login does not match.
    assert!(matches!(
        verifier
            .verify_id_token(&id_token, Some(&Secret::new("another-nonce")))
            .await,
        Err(ProviderError::IdToken { .. })
    ));

    let tampered = Secret::new(tamper(id_token.expose_secret()));
    match verifier.verify_id_token(&tampered, None).await {
        Err(ProviderError::IdToken { reason }) => assert!(reason.contains("signature"), "{reason}"),
        other => panic!("a tampered ID token passed: {other:?}"),
    }
    for junk in ["", "a.b", "not-a-jwt", "e30.e30.e30"] {
        assert!(matches!(
            verifier.verify_id_token(&Secret::new(junk), None).await,
            Err(ProviderError::IdToken { .. })
        ));
    }
    // Issued to tb-basic: another client must not accept it.
    let other_client = discovered(&idp, ClientAuth::Post, "openid").await;
    let other = tokenbroker::provider::OidcProvider::new(other_client, http());
    assert!(matches!(
        other.verify_id_token(&id_token, None).await,
        Err(ProviderError::IdToken { .. })
    ));
    // Three hours later the same token has expired (oidc-provider gives ID tokens an hour).
    let later = Arc::new(tokenbroker::testing::ManualClock::new(
        time::OffsetDateTime::now_utc() + Duration::from_secs(3 * 3600),
    ));
    let late = tokenbroker::provider::OidcProvider::new(config.clone().with_clock(later), http());
    match late.verify_id_token(&id_token, None).await {
        Err(ProviderError::IdToken { reason }) => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("an expired ID token passed: {other:?}"),
    }

    // A refresh brings a new ID token, verified the same way.
    wait_for_expiry().await;
    let read = broker.retrieve(&alice(), &key()).await.unwrap();
    assert!(read.refreshed);
    let refreshed = read.tokens.id_token().expect("ID token kept or renewed");
    assert!(verifier.verify_id_token(refreshed, None).await.is_ok());
}

#[tokio::test]
async fn a_login_whose_id_token_fails_verification_stores_nothing() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let config = discovered(&idp, ClientAuth::Basic, "openid offline_access")
        .await
        .with_issuer(IssuerPolicy::Exact("https://someone-else.example".into()));
    let broker = oidc_broker(config, &store);
    let start = broker
        .begin_login(&key(), LoginOptions::default().with_login_hint("alice"))
        .await
        .unwrap();
    let redirect = idp.login(&start.authorization_url).await;
    let err = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("id token"), "{err}");
    assert!(store.load(&key()).await.unwrap().is_none());
}

/// The Google preset's quirks against a real provider that behaves like Google: a refresh
/// token only on the first consent with `access_type=offline`, no rotation.
#[tokio::test]
async fn google_quirks_keep_the_refresh_token_across_refreshes_and_relogins() {
    let idp = OidcProvider::start(Profile::GoogleLike, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let mut config = discovered(&idp, ClientAuth::Basic, "openid email").await;
    config.oauth2 = config
        .oauth2
        .with_quirks(GoogleQuirks)
        .with_refresh_token_reuse(RefreshTokenReuse::Tolerated);
    let broker = oidc_broker(config, &store);
    let linked = link(&broker, &idp, LoginOptions::default()).await;
    let rt = linked
        .refresh_token()
        .expect("first consent with access_type=offline")
        .expose_secret()
        .to_owned();
    for _ in 0..2 {
        wait_for_expiry().await;
        let read = broker.retrieve(&alice(), &key()).await.unwrap();
        assert!(read.refreshed);
        assert_eq!(
            read.tokens.refresh_token().unwrap().expose_secret(),
            rt,
            "no rotation: the old one is kept"
        );
    }
    // A second login does not ask for consent again, brings no refresh token, keeps ours.
    let start = broker
        .begin_login(&key(), LoginOptions::default().with_login_hint("alice"))
        .await
        .unwrap();
    assert!(
        !start
            .authorization_url
            .query_pairs()
            .any(|(k, _)| k == "prompt"),
        "no consent screen while a refresh token is held"
    );
    let redirect = idp.login(&start.authorization_url).await;
    let relinked = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap()
        .tokens;
    assert_eq!(relinked.refresh_token().unwrap().expose_secret(), rt);
    assert_eq!(idp.counters().await.refresh_successes, 2);
}

/// The Microsoft preset's quirks against a provider that behaves like Microsoft:
/// `offline_access` suffices, every refresh rotates, `ext_expires_in` is kept.
#[tokio::test]
async fn microsoft_quirks_rotate_and_keep_ext_expires_in() {
    let idp = OidcProvider::start(Profile::MicrosoftLike, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let mut config = discovered(&idp, ClientAuth::Post, "openid").await;
    config.oauth2 = config.oauth2.with_quirks(MicrosoftQuirks);
    let broker = oidc_broker(config, &store);
    let start = broker
        .begin_login(&key(), LoginOptions::default().with_login_hint("alice"))
        .await
        .unwrap();
    let q: std::collections::HashMap<_, _> =
        start.authorization_url.query_pairs().into_owned().collect();
    assert!(
        Scopes::parse(&q["scope"]).contains("offline_access"),
        "the quirk adds it"
    );
    assert!(!q.contains_key("prompt"));
    let redirect = idp.login(&start.authorization_url).await;
    let linked = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap()
        .tokens;
    let rt = linked
        .refresh_token()
        .expect("offline_access suffices")
        .expose_secret()
        .to_owned();
    assert!(linked.extras().contains_key("ext_expires_in"));
    assert!(
        linked.scopes().contains("offline_access"),
        "mapped back although not echoed"
    );
    wait_for_expiry().await;
    let read = broker.retrieve(&alice(), &key()).await.unwrap();
    assert_ne!(read.tokens.refresh_token().unwrap().expose_secret(), rt);
    assert!(read.tokens.extras().contains_key("ext_expires_in"));
}

/// Issue 12 against the real provider: Alice's link is re-linked with another account (Bob
/// signs in at the provider, which issues no refresh token on that re-consent, as OpenID
/// Connect Core §11 has it without `prompt=consent`). The link is replaced, never merged: it
/// holds only Bob's tokens, Alice's grant is revoked at the provider, and the outcome says so.
/// The same account re-linking merges and keeps the refresh token.
#[tokio::test]
async fn a_relink_with_another_account_replaces_the_link_and_revokes_the_old_grant() {
    let idp = OidcProvider::start(Profile::Oidc, 60).await;
    let store = Arc::new(MemoryStore::new());
    let config = discovered(&idp, ClientAuth::Basic, "openid offline_access").await;
    let broker = oidc_broker(config, &store);
    let alice_link = link(&broker, &idp, LoginOptions::default()).await;
    let alice_rt = alice_link
        .refresh_token()
        .expect("a first link with offline_access gets a refresh token")
        .expose_secret()
        .to_owned();
    assert_eq!(alice_link.account().unwrap().subject, "alice");

    // The same account again (the provider's session is Alice's): merged, refresh token kept.
    let start = broker
        .begin_login(&key(), LoginOptions::default().with_login_hint("alice"))
        .await
        .unwrap();
    let redirect = idp.login(&start.authorization_url).await;
    let again = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap();
    assert!(again.replaced_account.is_none());
    assert_eq!(
        again
            .tokens
            .refresh_token()
            .map(|t| t.expose_secret().to_owned()),
        Some(alice_rt.clone()),
        "the same account's re-link keeps its refresh token"
    );

    // Bob signs in (`prompt=login` makes the provider ask who it is).
    let start = broker
        .begin_login(
            &key(),
            LoginOptions::default()
                .with_login_hint("bob")
                .with_param("prompt", "login"),
        )
        .await
        .unwrap();
    let redirect = idp.login(&start.authorization_url).await;
    let outcome = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap();
    let replaced = outcome
        .replaced_account
        .expect("another account replaced the link");
    assert_eq!(replaced.previous.unwrap().subject, "alice");
    assert_eq!(replaced.revocation, RevocationStatus::Revoked);
    assert_eq!(outcome.tokens.account().unwrap().subject, "bob");

    let stored = store.load(&key()).await.unwrap().unwrap();
    let stored = tokenbroker::TokenSet::from_payload(&stored.record.payload).unwrap();
    assert_eq!(stored.account().unwrap().subject, "bob");
    if let Some(rt) = stored.refresh_token() {
        assert_ne!(
            rt.expose_secret(),
            alice_rt,
            "Alice's refresh token is not kept"
        );
    }
    assert!(idp.is_active(stored.access_token().expose_secret()).await);
    assert!(
        !idp.is_active(&alice_rt).await,
        "Alice's grant was revoked at the provider"
    );
    let read = broker.retrieve(&alice(), &key()).await.unwrap();
    assert_eq!(read.tokens.account().unwrap().subject, "bob");
}

// ---------------------------------------------------------------------------------------------
// Client authentication with assertions: `tb-pkjwt` (private_key_jwt, keys generated here and
// registered through CLIENT_JWKS) and `tb-secretjwt` (client_secret_jwt).

mod assertions {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};
    use rand_core::OsRng;
    use rsa::traits::PublicKeyParts;
    use tokenbroker::provider::{
        ClientAssertionAlgorithm, ClientAssertionKey, ClientCredentials, SharedClientAssertionKey,
    };

    /// A P-256 key (`kid` "ec-1") and a 2048-bit RSA key (`kid` "rsa-1"), both made now, and
    /// the public JWK Set that registers both.
    struct Keys {
        ec: ClientAssertionKey,
        rsa: ClientAssertionKey,
        jwks: String,
    }

    fn keys() -> Keys {
        let ec = p256::ecdsa::SigningKey::random(&mut OsRng);
        let point = ec.verifying_key().to_encoded_point(false);
        let rsa = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
             "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())},
            {"kty": "RSA", "kid": "rsa-1", "use": "sig",
             "n": b64(&rsa.n().to_bytes_be()), "e": b64(&rsa.e().to_bytes_be())},
        ]});
        let ec_pem = ec.to_pkcs8_pem(LineEnding::LF).unwrap();
        let rsa_pem = {
            use rsa::pkcs8::EncodePrivateKey;
            rsa.to_pkcs8_pem(LineEnding::LF).unwrap()
        };
        Keys {
            ec: ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, &ec_pem)
                .unwrap()
                .with_key_id("ec-1"),
            rsa: ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Ps256, &rsa_pem)
                .unwrap()
                .with_key_id("rsa-1"),
            jwks: jwks.to_string(),
        }
    }

    async fn discover(
        idp: &OidcProvider,
        client_id: &str,
        credentials: ClientCredentials,
    ) -> OidcConfig {
        let config = OidcConfig::discover_with_credentials(
            ProviderId::new("idp").unwrap(),
            &idp.issuer(),
            client_id,
            credentials,
            idp.redirect_uri(),
            &*http(),
        )
        .await
        .expect("discovery");
        let mut config = config;
        config.oauth2 = config
            .oauth2
            .with_scopes(Scopes::parse("openid offline_access"));
        config
    }

    async fn refresh_and_check(broker: &TokenBroker, idp: &OidcProvider) -> TokenView {
        wait_for_expiry().await;
        let read = broker.retrieve(&alice(), &key()).await.unwrap();
        assert!(read.refreshed);
        assert!(
            idp.is_active(read.tokens.access_token().expose_secret())
                .await
        );
        read.tokens
    }

    async fn unlink_and_check(broker: &TokenBroker, idp: &OidcProvider, tokens: &TokenView) {
        let rt = tokens.refresh_token().unwrap().expose_secret().to_owned();
        assert!(idp.is_active(&rt).await);
        let outcome = broker.unlink(&key()).await.unwrap();
        assert_eq!(outcome.revocation, RevocationStatus::Revoked);
        assert!(!idp.is_active(&rt).await, "revoked upstream");
        assert_eq!(idp.counters().await.revocation_requests, 1);
    }

    async fn assert_invalid_client_and_untouched(
        broker: &TokenBroker,
        store: &Arc<MemoryStore>,
        what: &str,
    ) {
        wait_for_expiry().await;
        let before = store.load(&key()).await.unwrap().unwrap();
        let err = broker.retrieve(&alice(), &key()).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Provider {
                    source: ProviderError::InvalidClient { .. },
                    ..
                }
            ),
            "{what}: {err:?}"
        );
        let after = store.load(&key()).await.unwrap().unwrap();
        assert_eq!(after.version, before.version, "{what}: record rewritten");
        assert_eq!(
            after.record.payload.expose_secret(),
            before.record.payload.expose_secret(),
            "{what}"
        );
        assert_eq!(after.record.meta, before.record.meta, "{what}");
        assert!(!after.record.meta.state.is_relink_required(), "{what}");
    }

    #[tokio::test]
    async fn private_key_jwt_links_refreshes_rotates_keys_and_revokes() {
        let keys = keys();
        let idp = OidcProvider::start_with(
            ProviderOptions::new(Profile::Oidc, TTL).client_jwks(&keys.jwks),
        )
        .await;
        let shared = SharedClientAssertionKey::new(keys.ec.clone());
        // Discovery with a key picks private_key_jwt from the provider's list.
        let config = discover(
            &idp,
            "tb-pkjwt",
            ClientCredentials::assertion_key(shared.clone()),
        )
        .await;
        assert_eq!(config.oauth2.client_auth, ClientAuth::PrivateKeyJwt);
        let store = Arc::new(MemoryStore::new());
        let broker = oidc_broker(config, &store);
        let linked = link(&broker, &idp, consent()).await;
        assert!(linked.id_token().is_some());
        assert!(linked.refresh_token().is_some());
        let refreshed = refresh_and_check(&broker, &idp).await;
        assert_ne!(
            refreshed.refresh_token().unwrap().expose_secret(),
            linked.refresh_token().unwrap().expose_secret()
        );

        // A key the provider does not know: invalid_client, the link untouched.
        let stranger = {
            let k = p256::ecdsa::SigningKey::random(&mut OsRng);
            let pem = k.to_pkcs8_pem(LineEnding::LF).unwrap();
            ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, &pem)
                .unwrap()
                .with_key_id("ec-1")
        };
        shared.rotate(stranger);
        assert_invalid_client_and_untouched(&broker, &store, "unknown key").await;

        // Rotating to the other registered key (PS256) works without rebuilding the broker.
        shared.rotate(keys.rsa.clone());
        let tokens = refresh_and_check(&broker, &idp).await;
        unlink_and_check(&broker, &idp, &tokens).await;
    }

    #[tokio::test]
    async fn client_secret_jwt_links_refreshes_and_revokes_and_a_wrong_secret_is_invalid_client() {
        let idp = OidcProvider::start(Profile::Oidc, TTL).await;
        let config = discover(
            &idp,
            "tb-secretjwt",
            ClientCredentials::secret(Secret::new(JWT_CLIENT_SECRET)),
        )
        .await;
        // oidc-provider lists client_secret_basic too, which comes first for a secret; this
        // client is registered for client_secret_jwt, so the host says so.
        assert_eq!(config.oauth2.client_auth, ClientAuth::Basic);
        let mut config = config;
        config.oauth2 = config.oauth2.with_client_auth(ClientAuth::SecretJwt);
        let store = Arc::new(MemoryStore::new());
        let broker = oidc_broker(config.clone(), &store);
        link(&broker, &idp, consent()).await;
        refresh_and_check(&broker, &idp).await;

        let mut wrong = config.clone();
        wrong.oauth2 = wrong
            .oauth2
            .with_client_secret(Secret::new("not-the-registered-secret-0123456789abcdef"));
        let wrong_broker = oidc_broker(wrong, &store);
        assert_invalid_client_and_untouched(&wrong_broker, &store, "wrong secret").await;

        let tokens = broker.retrieve(&alice(), &key()).await.unwrap().tokens;
        unlink_and_check(&broker, &idp, &tokens).await;
    }
}
// RFC 9207 (`iss` on the authorization response) and RFC 9126 (pushed authorization requests).
// oidc-provider 9 has both on by default and advertises them in discovery.

fn query_param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `url` with its `iss` parameter replaced.
fn with_iss(url: &url::Url, iss: &str) -> url::Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "iss")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut out = url.clone();
    out.set_query(None);
    out.query_pairs_mut()
        .extend_pairs(pairs)
        .append_pair("iss", iss);
    out
}

#[tokio::test]
async fn rfc9207_a_callback_with_a_foreign_iss_is_refused_and_its_code_never_redeemed() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let config = discovered(&idp, ClientAuth::Basic, "openid offline_access email").await;
    assert!(config.oauth2.authorization_response_iss_parameter_supported);
    let broker = oidc_broker(config, &store);
    let start = broker
        .begin_login(&key(), consent().with_login_hint("alice"))
        .await
        .unwrap();
    let redirect = idp.login(&start.authorization_url).await;
    let iss = query_param(&redirect, "iss").expect("oidc-provider sends iss");
    assert_eq!(iss, idp.issuer().as_str().trim_end_matches('/'));

    let forged = with_iss(&redirect, "https://attacker.example");
    let err = broker
        .complete_login(start.pending.clone(), &Callback::from_url(&forged))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::IssuerMismatch { missing: false, .. }),
        "{err:?}"
    );
    // The genuine callback, replayed after the refusal, cannot complete the login either.
    let err = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LoginRejected { .. }), "{err:?}");
    assert_eq!(
        idp.counters().await.code_exchanges,
        0,
        "no code was redeemed"
    );
    assert!(store.load(&key()).await.unwrap().is_none());
}

/// Links through PAR and checks what the browser was sent to; then a refresh.
async fn link_with_par(idp: &OidcProvider, config: OidcConfig) {
    assert_eq!(
        config.oauth2.pushed_authorization_request_endpoint,
        Some(idp.issuer().join("/request").unwrap()),
        "discovery fills the PAR endpoint"
    );
    let store = Arc::new(MemoryStore::new());
    let broker = oidc_broker(config, &store);
    let start = broker
        .begin_login(&key(), consent().with_login_hint("alice"))
        .await
        .unwrap();
    let url = &start.authorization_url;
    let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    assert_eq!(names, ["client_id", "request_uri"], "{url}");
    assert_eq!(url.path(), "/auth");
    let redirect = idp.login(url).await;
    assert!(query_param(&redirect, "code").is_some(), "{redirect}");
    let linked = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap()
        .tokens;
    assert!(
        linked.refresh_token().is_some(),
        "prompt=consent went through PAR"
    );
    assert!(linked.id_token().is_some(), "the nonce went through PAR");
    wait_for_expiry().await;
    let read = broker.retrieve(&alice(), &key()).await.unwrap();
    assert!(read.refreshed);
    assert!(
        idp.is_active(read.tokens.access_token().expose_secret())
            .await
    );
}

#[tokio::test]
async fn par_end_to_end_with_basic_and_post_client_authentication() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    for auth in [ClientAuth::Basic, ClientAuth::Post] {
        let config = discovered(&idp, auth, "openid offline_access email").await;
        assert!(!config.oauth2.require_pushed_authorization_requests);
        link_with_par(&idp, config).await;
    }
}

/// The discovered configuration of the `tb-par` client, which must push its requests.
async fn tb_par(idp: &OidcProvider) -> OidcConfig {
    let mut config = OidcConfig::discover(
        ProviderId::new("idp").unwrap(),
        &idp.issuer(),
        "tb-par",
        Some(Secret::new(CLIENT_SECRET)),
        idp.redirect_uri(),
        &*http(),
    )
    .await
    .expect("discovery");
    config.oauth2 = config
        .oauth2
        .with_client_auth(ClientAuth::Basic)
        .with_scopes(Scopes::parse("openid offline_access email"));
    config
}

#[tokio::test]
async fn par_a_client_that_requires_it_links_with_par_and_is_refused_without() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    // Without PAR the provider refuses the authorization request: the requirement is real.
    let store = Arc::new(MemoryStore::new());
    let broker = oidc_broker(
        tb_par(&idp).await.with_pushed_authorization(ParMode::Off),
        &store,
    );
    let start = broker
        .begin_login(&key(), consent().with_login_hint("alice"))
        .await
        .unwrap();
    let redirect = idp.login(&start.authorization_url).await;
    let err = broker
        .complete_login(start.pending, &Callback::from_url(&redirect))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AuthorizationDenied { error, .. } if error == "invalid_request"),
        "{err:?}"
    );

    link_with_par(&idp, tb_par(&idp).await).await;
}

#[tokio::test]
async fn par_a_provider_that_requires_it_is_honoured_from_discovery() {
    let idp = OidcProvider::start_with(
        oidc_provider::ProviderOptions::new(Profile::Oidc, TTL).require_par(true),
    )
    .await;
    let config = discovered(&idp, ClientAuth::Basic, "openid offline_access email").await;
    assert!(config.oauth2.require_pushed_authorization_requests);
    // Turning PAR off cannot work with this provider: a configuration error, before any request.
    let store = Arc::new(MemoryStore::new());
    let off = oidc_broker(
        config.clone().with_pushed_authorization(ParMode::Off),
        &store,
    );
    let err = off
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    link_with_par(&idp, config).await;
}
