//! The login's RFC 9207 issuer check and RFC 9126 pushed authorization requests, end to end
//! over HTTP against the loopback FakeIdp (the same against `oidc-provider` is in
//! tests/real_idp.rs).

use std::sync::Arc;
use std::time::Duration;

use tokenbroker::http::ReqwestClient;
use tokenbroker::provider::{ClientAuth, OAuth2Config, OidcConfig, ParMode, ProviderError};
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, FakeIdpError, Fault, ManualClock};
use tokenbroker::{
    BrokerResponse, Callback, Caller, Error, LoginOptions, ProviderId, ProviderPolicy, Scopes,
    Secret, TokenBroker, TokenKey,
};
use url::Url;

fn redirect() -> Url {
    "http://127.0.0.1:9/callback".parse().unwrap()
}

fn key() -> TokenKey {
    TokenKey::parse("acme", "alice", "corp").unwrap()
}

fn caller() -> Caller {
    let k = key();
    Caller::new(k.realm, k.subject, "app")
        .with_role("read-token")
        .with_full_client_scope()
}

async fn discovered(idp: &FakeIdp) -> OidcConfig {
    let http = Arc::new(ReqwestClient::new().unwrap());
    OidcConfig::discover(
        ProviderId::new("corp").unwrap(),
        &idp.issuer().parse().unwrap(),
        idp.client_id(),
        Some(Secret::new(idp.client_secret())),
        redirect(),
        &*http,
    )
    .await
    .expect("discovery")
}

fn broker(config: OidcConfig) -> TokenBroker {
    TokenBroker::builder()
        .with_oidc_provider(config, ProviderPolicy::default().expose_refresh_token(true))
        .build()
        .unwrap()
}

/// `url` with its `iss` parameter replaced (`Some`) or removed (`None`).
fn with_iss(url: &Url, iss: Option<&str>) -> Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "iss")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let mut out = url.clone();
    out.set_query(None);
    {
        let mut q = out.query_pairs_mut();
        for (k, v) in &pairs {
            q.append_pair(k, v);
        }
        if let Some(iss) = iss {
            q.append_pair("iss", iss);
        }
    }
    out
}

fn param(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn nothing_stored(broker: &TokenBroker) {
    assert!(matches!(
        broker.retrieve(&caller(), &key()).await,
        Err(Error::NotFound { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// RFC 9207

#[tokio::test]
async fn a_foreign_iss_is_refused_before_the_code_is_redeemed_and_cannot_be_replayed() {
    let idp = FakeIdp::start_default().await.unwrap();
    let config = discovered(&idp).await;
    assert_eq!(config.oauth2.issuer.as_deref(), Some(idp.issuer().as_str()));
    assert!(config.oauth2.authorization_response_iss_parameter_supported);
    let broker = broker(config);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    assert_eq!(
        param(&cb.redirect_url, "iss").as_deref(),
        Some(idp.issuer().as_str())
    );

    let forged = with_iss(&cb.redirect_url, Some("https://attacker.example"));
    let err = broker
        .complete_login(start.pending.clone(), &Callback::from_url(&forged))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::IssuerMismatch { provider, missing: false } if provider == "corp"),
        "{err:?}"
    );
    let response = BrokerResponse::from_error(&err);
    assert_eq!(response.status, 400);
    assert_eq!(response.json().unwrap()["error"], "invalid_request");
    assert_eq!(
        idp.counters().code_exchanges,
        0,
        "the code was not redeemed"
    );

    // The refused attempt used the pending login up: the genuine callback (right iss, same
    // state and code) cannot complete a login afterwards.
    let err = broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::LoginRejected { reason } if reason.contains("already used")),
        "{err:?}"
    );
    assert_eq!(idp.counters().code_exchanges, 0);
    nothing_stored(&broker).await;
}

#[tokio::test]
async fn a_missing_iss_is_refused_where_the_provider_advertises_it() {
    let idp = FakeIdp::start_default().await.unwrap();
    let broker = broker(discovered(&idp).await);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    let stripped = with_iss(&cb.redirect_url, None);
    let err = broker
        .complete_login(start.pending.clone(), &Callback::from_url(&stripped))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::IssuerMismatch { missing: true, .. }),
        "{err:?}"
    );
    assert_eq!(idp.counters().code_exchanges, 0);
    // Replaying with the iss put back does not help either.
    let err = broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LoginRejected { .. }), "{err:?}");
    assert_eq!(idp.counters().code_exchanges, 0);
    nothing_stored(&broker).await;
}

#[tokio::test]
async fn a_missing_iss_is_accepted_where_the_provider_does_not_advertise_it() {
    let idp = FakeIdp::start(FakeIdpConfig::default().with_iss_in_response(false))
        .await
        .unwrap();
    let config = discovered(&idp).await;
    assert!(!config.oauth2.authorization_response_iss_parameter_supported);
    let broker = broker(config);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    assert_eq!(param(&cb.redirect_url, "iss"), None);
    let outcome = broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
    assert!(outcome.first_link);
    assert_eq!(idp.counters().code_exchanges, 1);
}

#[tokio::test]
async fn a_foreign_iss_is_refused_even_where_the_provider_does_not_advertise_iss() {
    let idp = FakeIdp::start(FakeIdpConfig::default().with_iss_in_response(false))
        .await
        .unwrap();
    let broker = broker(discovered(&idp).await);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    let forged = with_iss(&cb.redirect_url, Some(&format!("{}/other", idp.issuer())));
    let err = broker
        .complete_login(start.pending, &Callback::from_url(&forged))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::IssuerMismatch { missing: false, .. }),
        "{err:?}"
    );
    assert_eq!(idp.counters().code_exchanges, 0);
}

#[tokio::test]
async fn the_right_iss_links() {
    let idp = FakeIdp::start_default().await.unwrap();
    let broker = broker(discovered(&idp).await);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    let callback = Callback::from_url(&cb.redirect_url);
    assert_eq!(callback.iss.as_deref(), Some(idp.issuer().as_str()));
    let outcome = broker
        .complete_login(start.pending, &callback)
        .await
        .unwrap();
    assert!(outcome.stored);
    assert!(broker.retrieve(&caller(), &key()).await.is_ok());
}

#[tokio::test]
async fn a_plain_oauth2_provider_checks_iss_against_its_configured_issuer() {
    let idp = FakeIdp::start_default().await.unwrap();
    let oauth2 = |issuer: Option<(String, bool)>| {
        let config = OAuth2Config::new(
            ProviderId::new("corp").unwrap(),
            idp.client_id(),
            idp.authorization_endpoint(),
            idp.token_endpoint(),
            redirect(),
        )
        .with_client_secret(Secret::new(idp.client_secret()))
        .with_scopes(Scopes::parse("email"));
        match issuer {
            Some((issuer, always)) => config.with_issuer(issuer, always),
            None => config,
        }
    };
    let run = |config: OAuth2Config, iss: Option<String>| {
        let idp = idp.clone();
        async move {
            let broker = TokenBroker::builder()
                .with_oauth2_provider(config, ProviderPolicy::default())
                .build()
                .unwrap();
            let start = broker
                .begin_login(&key(), LoginOptions::default())
                .await
                .unwrap();
            let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
            let url = with_iss(&cb.redirect_url, iss.as_deref());
            broker
                .complete_login(start.pending, &Callback::from_url(&url))
                .await
        }
    };
    let right = Some(idp.issuer());
    let foreign = Some("https://attacker.example".to_owned());
    let configured = || Some((idp.issuer(), true));

    assert!(run(oauth2(configured()), right.clone()).await.is_ok());
    assert!(matches!(
        run(oauth2(configured()), foreign.clone()).await,
        Err(Error::IssuerMismatch { missing: false, .. })
    ));
    assert!(matches!(
        run(oauth2(configured()), None).await,
        Err(Error::IssuerMismatch { missing: true, .. })
    ));
    // Known issuer that does not always send iss: a missing iss is fine.
    assert!(run(oauth2(Some((idp.issuer(), false))), None).await.is_ok());
    // No issuer configured: nothing to compare with, iss is not checked (documented).
    assert!(run(oauth2(None), foreign).await.is_ok());
    assert_eq!(idp.counters().code_exchanges, 3);
}

// ---------------------------------------------------------------------------------------------
// RFC 9126

fn par_idp() -> FakeIdpConfig {
    FakeIdpConfig::default().with_pushed_authorization_requests(true)
}

#[tokio::test]
async fn an_advertised_par_endpoint_is_used_and_the_url_carries_only_client_id_and_request_uri() {
    let idp = FakeIdp::start(par_idp()).await.unwrap();
    let config = discovered(&idp).await;
    assert_eq!(
        config.oauth2.pushed_authorization_request_endpoint,
        Some(idp.par_endpoint())
    );
    assert_eq!(config.oauth2.pushed_authorization, ParMode::IfAdvertised);
    let clock = Arc::new(ManualClock::starting_now());
    let broker = TokenBroker::builder()
        .with_oidc_provider(config, ProviderPolicy::default().expose_refresh_token(true))
        .with_clock(clock.clone())
        .build()
        .unwrap();
    let start = broker
        .begin_login(&key(), LoginOptions::default().with_login_hint("alice"))
        .await
        .unwrap();
    let url = &start.authorization_url;
    let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    assert_eq!(names, ["client_id", "request_uri"], "{url}");
    assert_eq!(param(url, "client_id").as_deref(), Some(idp.client_id()));
    assert!(
        param(url, "request_uri")
            .unwrap()
            .starts_with("urn:ietf:params:oauth:request_uri:")
    );
    assert_eq!(url.path(), "/authorize");
    let c = idp.counters();
    assert_eq!((c.par_requests, c.par_successes), (1, 1));
    assert_eq!(idp.pending_pushed_requests(), 1);

    let cb = idp.authorize(url, "alice").unwrap();
    assert_eq!(idp.counters().request_uri_uses, 1);
    assert_eq!(idp.pending_pushed_requests(), 0, "single use");
    let linked = broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
    assert!(
        linked.tokens.id_token().is_some(),
        "nonce and PKCE went through PAR"
    );
    // The request_uri is single use.
    assert!(matches!(
        idp.authorize(url, "alice"),
        Err(FakeIdpError::BadRequest { .. })
    ));
    // And the grant refreshes as any other.
    clock.advance(Duration::from_secs(7200));
    let read = broker.retrieve(&caller(), &key()).await.unwrap();
    assert!(read.refreshed);
    assert_eq!(idp.counters().refresh_successes, 1);
}

#[tokio::test]
async fn par_with_client_secret_post_links() {
    let idp = FakeIdp::start(par_idp()).await.unwrap();
    let mut config = discovered(&idp).await;
    config.oauth2 = config.oauth2.with_client_auth(ClientAuth::Post);
    let broker = broker(config);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    assert!(param(&start.authorization_url, "request_uri").is_some());
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
}

#[tokio::test]
async fn par_off_sends_the_parameters_in_the_url() {
    let idp = FakeIdp::start(par_idp()).await.unwrap();
    let broker = broker(
        discovered(&idp)
            .await
            .with_pushed_authorization(ParMode::Off),
    );
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let url = &start.authorization_url;
    assert!(param(url, "request_uri").is_none());
    assert!(param(url, "state").is_some() && param(url, "code_challenge").is_some());
    let cb = idp.authorize(url, "alice").unwrap();
    broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
    assert_eq!(idp.counters().par_requests, 0);
}

#[tokio::test]
async fn par_if_advertised_without_an_endpoint_sends_the_parameters_in_the_url() {
    let idp = FakeIdp::start_default().await.unwrap();
    let config = discovered(&idp).await;
    assert_eq!(config.oauth2.pushed_authorization_request_endpoint, None);
    let broker = broker(config);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    assert!(param(&start.authorization_url, "state").is_some());
    assert_eq!(idp.counters().par_requests, 0);
}

#[tokio::test]
async fn par_required_without_an_endpoint_is_a_configuration_error() {
    let idp = FakeIdp::start_default().await.unwrap();
    let broker = broker(
        discovered(&idp)
            .await
            .with_pushed_authorization(ParMode::Required),
    );
    let err = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(reason) if reason.contains("pushed_authorization_request_endpoint")),
        "{err:?}"
    );
    assert_eq!(idp.counters().par_requests, 0);
}

#[tokio::test]
async fn par_required_with_an_endpoint_links() {
    let idp = FakeIdp::start(par_idp()).await.unwrap();
    let broker = broker(
        discovered(&idp)
            .await
            .with_pushed_authorization(ParMode::Required),
    );
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
    assert_eq!(idp.counters().par_successes, 1);
}

#[tokio::test]
async fn a_provider_that_requires_par_gets_it_and_refuses_urls_without_it() {
    let idp =
        FakeIdp::start(FakeIdpConfig::default().with_require_pushed_authorization_requests(true))
            .await
            .unwrap();
    let config = discovered(&idp).await;
    assert!(config.oauth2.require_pushed_authorization_requests);

    // ParMode::Off cannot override the provider's requirement: a clear configuration error.
    let off = broker(config.clone().with_pushed_authorization(ParMode::Off));
    let err = off
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config(reason) if reason.contains("require_pushed_authorization_requests")),
        "{err:?}"
    );

    // The fake refuses a classic authorization URL.
    let mut classic = idp.authorization_endpoint();
    classic
        .query_pairs_mut()
        .append_pair("client_id", idp.client_id())
        .append_pair("response_type", "code")
        .append_pair("state", "s")
        .append_pair("code_challenge", &"a".repeat(43))
        .append_pair("code_challenge_method", "S256")
        .append_pair("redirect_uri", redirect().as_str());
    assert!(matches!(
        idp.authorize(&classic, "alice"),
        Err(FakeIdpError::BadRequest { .. })
    ));

    let broker = broker(config);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
    broker
        .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_expired_request_uri_is_refused() {
    let idp = FakeIdp::start(par_idp().with_request_uri_ttl(Duration::from_millis(200)))
        .await
        .unwrap();
    let broker = broker(discovered(&idp).await);
    let start = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(idp.pending_pushed_requests(), 0);
    assert!(matches!(
        idp.authorize(&start.authorization_url, "alice"),
        Err(FakeIdpError::BadRequest { .. })
    ));
}

#[tokio::test]
async fn a_failing_par_endpoint_is_a_typed_error_and_nothing_is_stored() {
    let idp = FakeIdp::start(par_idp()).await.unwrap();
    let broker = broker(discovered(&idp).await);

    idp.inject_par(Fault::Status {
        status: 500,
        body: "<h1>down</h1>".into(),
        retry_after: None,
    });
    let err = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Unavailable {
                source: Some(ProviderError::Transient {
                    status: Some(500),
                    ..
                }),
                ..
            }
        ),
        "{err:?}"
    );

    idp.inject_par(Fault::GarbageBody);
    let err = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Unavailable {
                source: Some(ProviderError::Protocol { .. }),
                ..
            }
        ),
        "{err:?}"
    );

    idp.inject_par(Fault::Status {
        status: 400,
        body: r#"{"error":"invalid_request","error_description":"nope"}"#.into(),
        retry_after: None,
    });
    let err = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Provider {
                source: ProviderError::Rejected { status: 400, .. },
                ..
            }
        ),
        "{err:?}"
    );

    // A 201 without request_uri is a bad answer too.
    idp.inject_par(Fault::Status {
        status: 201,
        body: r#"{"expires_in":60}"#.into(),
        retry_after: None,
    });
    let err = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Unavailable {
                source: Some(ProviderError::Protocol { .. }),
                ..
            }
        ),
        "{err:?}"
    );

    assert_eq!(idp.counters().par_requests, 4);
    assert_eq!(idp.counters().par_successes, 0);
    assert_eq!(idp.counters().authorize_requests, 0);
    assert_eq!(idp.pending_pushed_requests(), 0);
    nothing_stored(&broker).await;
}

#[tokio::test]
async fn a_wrong_client_secret_at_the_par_endpoint_is_invalid_client() {
    let idp = FakeIdp::start(par_idp()).await.unwrap();
    let config = discovered(&idp)
        .await
        .with_client_secret(Secret::new("wrong"));
    let broker = broker(config);
    let err = broker
        .begin_login(&key(), LoginOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Provider {
                source: ProviderError::InvalidClient { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(idp.pending_pushed_requests(), 0);
}
