//! tokenbroker against a real, certified OpenID Provider (`oidc-provider` from npm), started
//! on 127.0.0.1 for each test with scripted login. Expiry is real (short access-token
//! lifetimes); calls are counted at the provider; nothing asserts on elapsed time.

#[path = "support/oidc_provider.rs"]
mod oidc_provider;

use std::sync::Arc;
use std::time::Duration;

use oidc_provider::{CLIENT_SECRET, OidcProvider, Profile};
use tokenbroker::provider::{ClientAuth, OAuth2Config, RefreshTokenReuse};
use tokenbroker::store::TokenStore;
use tokenbroker::{
    Callback, Caller, Error, LoginOptions, MemoryStore, ProviderId, ProviderPolicy,
    RevocationStatus, Scopes, Secret, TokenBroker, TokenKey, TokenSet,
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
        .with_oauth2_provider(config, ProviderPolicy::default())
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
    Caller::new(key.realm, key.subject, "app").with_role("read-token")
}

async fn link(broker: &TokenBroker, idp: &OidcProvider, options: LoginOptions) -> TokenSet {
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

#[tokio::test]
async fn without_prompt_consent_offline_access_is_dropped_and_no_refresh_token_issued() {
    let idp = OidcProvider::start(Profile::Oidc, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let broker = broker(
        config(&idp, ClientAuth::Basic, "openid offline_access"),
        &store,
    );
    let linked = link(&broker, &idp, LoginOptions::default()).await;
    assert!(
        linked.refresh_token().is_none(),
        "OIDC Core §11: offline_access needs prompt=consent"
    );
    wait_for_expiry().await;
    assert!(matches!(
        broker.retrieve(&alice(), &key()).await,
        Err(Error::NoRefreshToken { .. })
    ));
}

#[tokio::test]
async fn google_like_keeps_the_refresh_token_across_refreshes_and_relogins() {
    let idp = OidcProvider::start(Profile::GoogleLike, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let cfg = config(&idp, ClientAuth::Basic, "openid email")
        .with_authorize_param("access_type", "offline")
        .with_refresh_token_reuse(RefreshTokenReuse::Tolerated);
    let broker = broker(cfg, &store);
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
    // A second login without consent brings no refresh token; the stored one stays.
    let relinked = link(&broker, &idp, LoginOptions::default()).await;
    assert_eq!(relinked.refresh_token().unwrap().expose_secret(), rt);
    assert_eq!(idp.counters().await.refresh_successes, 2);
}

#[tokio::test]
async fn microsoft_like_rotates_and_keeps_ext_expires_in() {
    let idp = OidcProvider::start(Profile::MicrosoftLike, TTL).await;
    let store = Arc::new(MemoryStore::new());
    let broker = broker(
        config(&idp, ClientAuth::Post, "openid offline_access"),
        &store,
    );
    let linked = link(&broker, &idp, LoginOptions::default()).await;
    let rt = linked
        .refresh_token()
        .expect("offline_access suffices")
        .expose_secret()
        .to_owned();
    assert!(linked.extras().contains_key("ext_expires_in"));
    wait_for_expiry().await;
    let read = broker.retrieve(&alice(), &key()).await.unwrap();
    assert_ne!(read.tokens.refresh_token().unwrap().expose_secret(), rt);
    assert!(read.tokens.extras().contains_key("ext_expires_in"));
}
