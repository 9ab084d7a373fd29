//! Client authentication methods against the loopback `FakeIdp`: `client_secret_basic`,
//! `client_secret_post`, `client_secret_jwt`, `private_key_jwt` (ES256, RS256, PS256) and
//! `none`, at the token endpoint (code exchange, refresh) and the revocation endpoint; what a
//! wrong key or secret does to a link; key rotation; the assertion's claims; discovery's
//! choice of method; and redaction. Keys are generated at run time.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::OsRng;
use tokenbroker::http::{HttpClient, HttpError, HttpRequest, HttpResponse, ReqwestClient};
use tokenbroker::provider::{
    CLIENT_ASSERTION_TYPE, ClientAssertionAlgorithm, ClientAssertionAudience, ClientAssertionKey,
    ClientAuth, ClientCredentials, OAuth2Config, OAuth2Provider, OidcConfig, Provider,
    SharedClientAssertionKey, TokenKind,
};
use tokenbroker::store::TokenStore;
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, ManualClock};
use tokenbroker::{
    Callback, Caller, Error, LoginOptions, MemoryStore, ProviderError, ProviderId, ProviderPolicy,
    RevocationStatus, Scopes, Secret, TokenBroker, TokenKey,
};

// ---------------------------------------------------------------------------------------------
// Keys, made at run time

struct KeyPair {
    private_pem: String,
    public_pem: String,
}

fn ec_pair() -> KeyPair {
    let key = p256::ecdsa::SigningKey::random(&mut OsRng);
    KeyPair {
        private_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        public_pem: key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    }
}

/// One RSA key per test binary: generation is the slow part.
fn rsa_pair() -> &'static KeyPair {
    static KEY: OnceLock<KeyPair> = OnceLock::new();
    KEY.get_or_init(|| {
        use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
        let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        KeyPair {
            private_pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
            public_pem: key
                .to_public_key()
                .to_public_key_pem(LineEnding::LF)
                .unwrap(),
        }
    })
}

fn assertion_key(alg: ClientAssertionAlgorithm, pair: &KeyPair, kid: &str) -> ClientAssertionKey {
    ClientAssertionKey::from_pkcs8_pem(alg, &pair.private_pem)
        .unwrap()
        .with_key_id(kid)
}

// ---------------------------------------------------------------------------------------------
// A broker on the fake

const SECRET: &str = "s3cr~t+/=-client-secret-long-enough-for-hs256";

struct World {
    idp: FakeIdp,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    broker: TokenBroker,
    key: TokenKey,
}

fn provider_config(idp: &FakeIdp, auth: ClientAuth) -> OAuth2Config {
    let mut config = OAuth2Config::new(
        ProviderId::new("fake").unwrap(),
        idp.client_id(),
        idp.authorization_endpoint(),
        idp.token_endpoint(),
        "http://127.0.0.1:9/callback".parse().unwrap(),
    )
    .with_client_auth(auth)
    .with_scopes(Scopes::parse("openid offline_access"))
    .with_revocation_endpoint(idp.revocation_endpoint());
    if auth != ClientAuth::None {
        config = config.with_client_secret(Secret::new(idp.client_secret()));
    }
    config
}

async fn world(idp_config: FakeIdpConfig, config: impl FnOnce(&FakeIdp) -> OAuth2Config) -> World {
    let idp = FakeIdp::start(idp_config.with_client_secret(SECRET))
        .await
        .unwrap();
    let clock = Arc::new(ManualClock::starting_now());
    let store = Arc::new(MemoryStore::with_clock(clock.clone()));
    let broker = TokenBroker::builder()
        .with_oauth2_provider(
            config(&idp),
            ProviderPolicy::default().expose_refresh_token(true),
        )
        .with_store(store.clone())
        .with_clock(clock.clone())
        .with_refresh_timeout(Duration::from_secs(5))
        .with_lease_ttl(Duration::from_secs(5) + tokenbroker::LEASE_MARGIN)
        .build()
        .unwrap();
    World {
        idp,
        clock,
        store,
        broker,
        key: TokenKey::parse("acme", "alice", "fake").unwrap(),
    }
}

impl World {
    fn caller(&self) -> Caller {
        Caller::new(self.key.realm.clone(), self.key.subject.clone(), "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    async fn try_link(&self) -> Result<tokenbroker::TokenView, Error> {
        let start = self
            .broker
            .begin_login(&self.key, LoginOptions::default())
            .await
            .unwrap();
        let cb = self
            .idp
            .authorize(&start.authorization_url, "alice")
            .unwrap();
        self.broker
            .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
            .await
            .map(|o| o.tokens)
    }

    /// Link, refresh after expiry, unlink with revocation: each step asserted at the fake.
    async fn full_cycle(&self, what: &str) {
        let linked = self
            .try_link()
            .await
            .unwrap_or_else(|e| panic!("{what}: link: {e:?}"));
        assert!(
            self.idp.is_active(linked.access_token().expose_secret()),
            "{what}"
        );
        self.clock.advance(Duration::from_secs(3601));
        let got = self
            .broker
            .retrieve(&self.caller(), &self.key)
            .await
            .unwrap_or_else(|e| panic!("{what}: refresh: {e:?}"));
        assert!(got.refreshed, "{what}");
        assert_eq!(self.idp.counters().refresh_successes, 1, "{what}");
        let rt = got
            .tokens
            .refresh_token()
            .unwrap()
            .expose_secret()
            .to_owned();
        assert!(self.idp.is_active(&rt), "{what}");
        let out = self.broker.unlink(&self.key).await.unwrap();
        assert_eq!(out.revocation, RevocationStatus::Revoked, "{what}");
        assert!(
            !self.idp.is_active(&rt),
            "{what}: revocation reached the provider"
        );
    }
}

fn is_invalid_client(e: &Error) -> bool {
    matches!(
        e,
        Error::Provider {
            source: ProviderError::InvalidClient { .. },
            ..
        }
    )
}

// ---------------------------------------------------------------------------------------------
// Each method, end to end

#[tokio::test]
async fn every_method_links_refreshes_and_revokes() {
    for auth in [
        ClientAuth::Basic,
        ClientAuth::Post,
        ClientAuth::SecretJwt,
        ClientAuth::None,
    ] {
        let w = world(
            FakeIdpConfig::default().with_client_auth_method(auth),
            |idp| provider_config(idp, auth),
        )
        .await;
        w.full_cycle(auth.method_name()).await;
    }
}

#[tokio::test]
async fn private_key_jwt_with_es256_rs256_and_ps256() {
    let ec = ec_pair();
    let cases = [
        (ClientAssertionAlgorithm::Es256, &ec),
        (ClientAssertionAlgorithm::Rs256, rsa_pair()),
        (ClientAssertionAlgorithm::Ps256, rsa_pair()),
    ];
    for (alg, pair) in cases {
        let w = world(
            FakeIdpConfig::default()
                .with_client_auth_method(ClientAuth::PrivateKeyJwt)
                .with_client_public_key(&pair.public_pem),
            |idp| {
                provider_config(idp, ClientAuth::PrivateKeyJwt)
                    .with_client_assertion_key(assertion_key(alg, pair, "k1"))
            },
        )
        .await;
        w.full_cycle(alg.name()).await;
    }
}

#[tokio::test]
async fn a_method_the_client_is_not_registered_for_is_refused() {
    // Registered for private_key_jwt; the broker sends its secret in Basic.
    let w = world(
        FakeIdpConfig::default()
            .with_client_auth_method(ClientAuth::PrivateKeyJwt)
            .with_client_public_key(ec_pair().public_pem),
        |idp| provider_config(idp, ClientAuth::Basic),
    )
    .await;
    let err = w.try_link().await.unwrap_err();
    assert!(is_invalid_client(&err), "{err:?}");
    assert!(
        w.store.load(&w.key).await.unwrap().is_none(),
        "nothing stored"
    );
}

// ---------------------------------------------------------------------------------------------
// Wrong credentials: a typed error, the link untouched

async fn assert_refresh_fails_and_link_is_untouched(w: &World, what: &str) {
    let before = w.store.load(&w.key).await.unwrap().unwrap();
    w.clock.advance(Duration::from_secs(3601));
    let err = w.broker.retrieve(&w.caller(), &w.key).await.unwrap_err();
    assert!(is_invalid_client(&err), "{what}: {err:?}");
    let after = w.store.load(&w.key).await.unwrap().unwrap();
    assert_eq!(after.version, before.version, "{what}: record rewritten");
    assert_eq!(
        after.record.payload.expose_secret(),
        before.record.payload.expose_secret(),
        "{what}"
    );
    assert_eq!(after.record.meta, before.record.meta, "{what}");
    assert!(!after.record.meta.state.is_relink_required(), "{what}");
    assert_eq!(w.idp.counters().refresh_successes, 0, "{what}");
}

#[tokio::test]
async fn a_wrong_key_or_secret_is_invalid_client_and_leaves_the_link_alone() {
    // private_key_jwt: linked with the right key, then the host rotates to a wrong one.
    let right = ec_pair();
    let shared = SharedClientAssertionKey::new(assertion_key(
        ClientAssertionAlgorithm::Es256,
        &right,
        "right",
    ));
    let handle = shared.clone();
    let w = world(
        FakeIdpConfig::default()
            .with_client_auth_method(ClientAuth::PrivateKeyJwt)
            .with_client_public_key(&right.public_pem),
        move |idp| {
            provider_config(idp, ClientAuth::PrivateKeyJwt).with_client_assertion_key(handle)
        },
    )
    .await;
    w.try_link().await.unwrap();
    shared.rotate(assertion_key(
        ClientAssertionAlgorithm::Es256,
        &ec_pair(),
        "wrong",
    ));
    assert_refresh_fails_and_link_is_untouched(&w, "private_key_jwt").await;
    // Rotating back (no rebuild of the broker) makes the same link refresh again, once the
    // broker's back-off after the failure has passed.
    w.clock.advance(Duration::from_secs(120));
    shared.rotate(assertion_key(
        ClientAssertionAlgorithm::Es256,
        &right,
        "right-again",
    ));
    let got = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(got.refreshed);

    // client_secret_jwt with a wrong secret.
    let w = world(
        FakeIdpConfig::default().with_client_auth_method(ClientAuth::SecretJwt),
        |idp| {
            provider_config(idp, ClientAuth::SecretJwt)
                .with_client_secret(Secret::new("not-the-registered-secret-at-all-no"))
        },
    )
    .await;
    // The code exchange fails with the same typed error and stores nothing.
    let err = w.try_link().await.unwrap_err();
    assert!(is_invalid_client(&err), "{err:?}");
    assert!(w.store.load(&w.key).await.unwrap().is_none());
}

#[tokio::test]
async fn a_wrong_secret_for_client_secret_jwt_at_refresh_leaves_the_link_alone() {
    // Two brokers on one store: the first links with the right secret, the second (same
    // provider alias) has a wrong one.
    let w = world(
        FakeIdpConfig::default().with_client_auth_method(ClientAuth::SecretJwt),
        |idp| provider_config(idp, ClientAuth::SecretJwt),
    )
    .await;
    w.try_link().await.unwrap();
    let wrong = TokenBroker::builder()
        .with_oauth2_provider(
            provider_config(&w.idp, ClientAuth::SecretJwt)
                .with_client_secret(Secret::new("not-the-registered-secret-at-all-no")),
            ProviderPolicy::default().expose_refresh_token(true),
        )
        .with_store(w.store.clone())
        .with_clock(w.clock.clone())
        .build()
        .unwrap();
    let w = World { broker: wrong, ..w };
    assert_refresh_fails_and_link_is_untouched(&w, "client_secret_jwt").await;
}

#[tokio::test]
async fn the_assertion_audience_is_configurable() {
    let pair = ec_pair();
    let idp_config = |idp_issuer: Option<String>| {
        let c = FakeIdpConfig::default()
            .with_client_auth_method(ClientAuth::PrivateKeyJwt)
            .with_client_public_key(&pair.public_pem);
        match idp_issuer {
            Some(aud) => c.with_client_assertion_audience(aud),
            None => c,
        }
    };
    // A fake that demands the issuer: first learn its issuer, then require it.
    let probe = FakeIdp::start(idp_config(None)).await.unwrap();
    let issuer = probe.issuer();
    drop(probe);
    let idp = FakeIdp::start(idp_config(Some("https://issuer.example/".into())))
        .await
        .unwrap();
    let http: Arc<dyn HttpClient> = Arc::new(ReqwestClient::new().unwrap());
    let base = provider_config(&idp, ClientAuth::PrivateKeyJwt)
        .with_client_assertion_key(assertion_key(ClientAssertionAlgorithm::Es256, &pair, "k"));
    let token_aud = OAuth2Provider::new(base.clone(), http.clone());
    let err = token_aud
        .revoke(&Secret::new("whatever"), TokenKind::RefreshToken)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::InvalidClient { .. }),
        "{err:?}"
    );
    let issuer_aud = OAuth2Provider::new(
        base.with_client_assertion_audience(ClientAssertionAudience::Issuer(
            "https://issuer.example/".into(),
        )),
        http,
    );
    issuer_aud
        .revoke(&Secret::new("whatever"), TokenKind::RefreshToken)
        .await
        .unwrap();
    assert!(!issuer.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The assertion itself

type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// The real transport, recording each request's URL and body.
fn recording() -> (Arc<dyn HttpClient>, Seen) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let inner = Arc::new(ReqwestClient::new().unwrap());
    let client = move |req: HttpRequest| {
        log.lock()
            .unwrap()
            .push((req.uri().to_string(), req.body().clone()));
        let inner = inner.clone();
        async move { inner.execute(req).await }
    };
    (Arc::new(client), seen)
}

fn form(body: &[u8]) -> std::collections::HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn jwt_part(jwt: &str, i: usize) -> serde_json::Value {
    let part = jwt.split('.').nth(i).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn assertions_follow_rfc_7523_and_cannot_be_replayed() {
    let pair = ec_pair();
    let idp = FakeIdp::start(
        FakeIdpConfig::default()
            .with_client_auth_method(ClientAuth::PrivateKeyJwt)
            .with_client_public_key(&pair.public_pem),
    )
    .await
    .unwrap();
    let (http, seen) = recording();
    let p =
        OAuth2Provider::new(
            provider_config(&idp, ClientAuth::PrivateKeyJwt).with_client_assertion_key(
                assertion_key(ClientAssertionAlgorithm::Es256, &pair, "kid-7"),
            ),
            http,
        );
    p.revoke(&Secret::new("t1"), TokenKind::RefreshToken)
        .await
        .unwrap();
    p.revoke(&Secret::new("t2"), TokenKind::AccessToken)
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let forms: Vec<_> = seen.iter().map(|(_, b)| form(b)).collect();
    let mut jtis = Vec::new();
    for f in &forms {
        assert_eq!(f["client_assertion_type"], CLIENT_ASSERTION_TYPE);
        assert_eq!(f["client_id"], idp.client_id());
        assert!(!f.contains_key("client_secret"));
        let jwt = &f["client_assertion"];
        let header = jwt_part(jwt, 0);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "kid-7");
        let claims = jwt_part(jwt, 1);
        assert_eq!(claims["iss"], idp.client_id());
        assert_eq!(claims["sub"], idp.client_id());
        assert_eq!(
            claims["aud"],
            idp.token_endpoint().as_str(),
            "aud defaults to the token endpoint"
        );
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert_eq!(exp - iat, 60);
        jtis.push(claims["jti"].as_str().unwrap().to_owned());
    }
    assert_ne!(jtis[0], jtis[1], "a fresh jti per request");
    // Replaying the first request verbatim is refused.
    let replay = reqwest::Client::new()
        .post(seen[0].0.as_str())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(seen[0].1.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 401);
    let body: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test]
async fn client_secret_jwt_never_sends_the_secret() {
    let idp = FakeIdp::start(
        FakeIdpConfig::default()
            .with_client_secret(SECRET)
            .with_client_auth_method(ClientAuth::SecretJwt),
    )
    .await
    .unwrap();
    let (http, seen) = recording();
    let p = OAuth2Provider::new(provider_config(&idp, ClientAuth::SecretJwt), http);
    p.revoke(&Secret::new("t1"), TokenKind::RefreshToken)
        .await
        .unwrap();
    let (_, body) = seen.lock().unwrap()[0].clone();
    assert!(!String::from_utf8_lossy(&body).contains(SECRET));
    let f = form(&body);
    assert_eq!(jwt_part(&f["client_assertion"], 0)["alg"], "HS256");
}

#[test]
fn certificate_thumbprints_go_into_x5t_and_x5t_s256() {
    // Only the bytes' digests matter to the header (SHA-1 and SHA-256, base64url).
    let der = b"not really a certificate, just DER-shaped bytes";
    let pem = format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    );
    let pair = ec_pair();
    let key = ClientAssertionKey::from_certificate_pem(
        ClientAssertionAlgorithm::Es256,
        &pair.private_pem,
        &pem,
    )
    .unwrap();
    assert_eq!(key.x5t(), Some("Eq5EHfXZZg162mcbjZGhU4P96Cw"));
    assert_eq!(
        key.x5t_s256(),
        Some("wwSrZqHFaVFdaA0ujM1W1vLVEZl1MH1QoJmjNYN65PM")
    );
    let der_key =
        assertion_key(ClientAssertionAlgorithm::Es256, &pair, "k").with_certificate_der(der);
    assert_eq!(der_key.x5t(), key.x5t());
    assert_eq!(der_key.without_sha1_thumbprint().x5t(), None);
    // A private key in place of the certificate is refused, without echoing it.
    let err = assertion_key(ClientAssertionAlgorithm::Es256, &pair, "k")
        .with_certificate_pem(&pair.private_pem)
        .unwrap_err();
    assert!(!err.to_string().contains(&pair.private_pem[30..80]));
}

#[tokio::test]
async fn microsoft_style_certificate_assertions_carry_the_thumbprints() {
    let pair = rsa_pair();
    let der = b"not really a certificate, just DER-shaped bytes";
    let idp = FakeIdp::start(
        FakeIdpConfig::default()
            .with_client_auth_method(ClientAuth::PrivateKeyJwt)
            .with_client_public_key(&pair.public_pem),
    )
    .await
    .unwrap();
    let (http, seen) = recording();
    let key =
        ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Rs256, &pair.private_pem)
            .unwrap()
            .with_certificate_der(der);
    let p = OAuth2Provider::new(
        provider_config(&idp, ClientAuth::PrivateKeyJwt).with_client_assertion_key(key),
        http,
    );
    p.revoke(&Secret::new("t1"), TokenKind::RefreshToken)
        .await
        .unwrap();
    let f = form(&seen.lock().unwrap()[0].1);
    let header = jwt_part(&f["client_assertion"], 0);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["x5t"], "Eq5EHfXZZg162mcbjZGhU4P96Cw");
    assert_eq!(
        header["x5t#S256"],
        "wwSrZqHFaVFdaA0ujM1W1vLVEZl1MH1QoJmjNYN65PM"
    );
}

#[test]
fn keys_that_do_not_fit_their_algorithm_are_refused() {
    let ec = ec_pair();
    assert!(
        ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Rs256, &ec.private_pem)
            .is_err()
    );
    assert!(
        ClientAssertionKey::from_pkcs8_pem(
            ClientAssertionAlgorithm::Es256,
            &rsa_pair().private_pem
        )
        .is_err()
    );
    assert!(
        ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, "garbage").is_err()
    );
    assert!(
        ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, &ec.public_pem)
            .is_err()
    );
}

#[tokio::test]
async fn a_jwt_method_without_its_credential_is_a_configuration_error() {
    let idp = FakeIdp::start_default().await.unwrap();
    let http: Arc<dyn HttpClient> = Arc::new(ReqwestClient::new().unwrap());
    let p = OAuth2Provider::new(provider_config(&idp, ClientAuth::PrivateKeyJwt), http);
    let err = p
        .revoke(&Secret::new("t"), TokenKind::RefreshToken)
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Config { .. }), "{err:?}");
    assert_eq!(idp.counters().revocations, 0, "nothing was sent");
}

// ---------------------------------------------------------------------------------------------
// Discovery

async fn discover(
    idp: &FakeIdp,
    credentials: ClientCredentials,
) -> Result<OidcConfig, ProviderError> {
    let http = ReqwestClient::new().unwrap();
    OidcConfig::discover_with_credentials(
        ProviderId::new("fake").unwrap(),
        &idp.issuer().parse().unwrap(),
        idp.client_id(),
        credentials,
        "http://127.0.0.1:9/callback".parse().unwrap(),
        &http,
    )
    .await
}

#[tokio::test]
async fn discovery_picks_the_method_from_what_is_configured_and_accepted() {
    let pair = ec_pair();
    let key = || {
        SharedClientAssertionKey::new(assertion_key(ClientAssertionAlgorithm::Es256, &pair, "k"))
    };
    let secret = || Secret::new(SECRET);
    // (what the fake accepts, what the host has, what discovery must pick)
    let cases: Vec<(Option<ClientAuth>, ClientCredentials, ClientAuth)> = vec![
        (None, ClientCredentials::secret(secret()), ClientAuth::Basic),
        (
            Some(ClientAuth::Post),
            ClientCredentials::secret(secret()),
            ClientAuth::Post,
        ),
        (
            Some(ClientAuth::SecretJwt),
            ClientCredentials::secret(secret()),
            ClientAuth::SecretJwt,
        ),
        (
            Some(ClientAuth::PrivateKeyJwt),
            ClientCredentials::assertion_key(key()),
            ClientAuth::PrivateKeyJwt,
        ),
        (
            Some(ClientAuth::PrivateKeyJwt),
            ClientCredentials::secret(secret()).with_assertion_key(key()),
            ClientAuth::PrivateKeyJwt,
        ),
        (
            Some(ClientAuth::Basic),
            ClientCredentials::secret(secret()).with_assertion_key(key()),
            ClientAuth::Basic,
        ),
        (
            Some(ClientAuth::None),
            ClientCredentials::none(),
            ClientAuth::None,
        ),
    ];
    for (accepts, credentials, expected) in cases {
        let mut c = FakeIdpConfig::default().with_client_secret(SECRET);
        if let Some(m) = accepts {
            c = c.with_client_auth_method(m);
        }
        let idp = FakeIdp::start(c).await.unwrap();
        let config = discover(&idp, credentials).await.unwrap();
        assert_eq!(config.oauth2.client_auth, expected, "accepts {accepts:?}");
    }
    // The chosen method works: private_key_jwt picked by discovery revokes at the fake.
    let idp = FakeIdp::start(
        FakeIdpConfig::default()
            .with_client_auth_method(ClientAuth::PrivateKeyJwt)
            .with_client_public_key(&pair.public_pem),
    )
    .await
    .unwrap();
    let config = discover(&idp, ClientCredentials::assertion_key(key()))
        .await
        .unwrap();
    let http: Arc<dyn HttpClient> = Arc::new(ReqwestClient::new().unwrap());
    let p = OAuth2Provider::new(
        config
            .oauth2
            .with_revocation_endpoint(idp.revocation_endpoint()),
        http,
    );
    p.revoke(&Secret::new("t"), TokenKind::RefreshToken)
        .await
        .unwrap();
    assert_eq!(idp.counters().revocations, 1);
}

#[tokio::test]
async fn discovery_fails_clearly_when_no_configured_method_is_accepted() {
    let pair = ec_pair();
    let key =
        SharedClientAssertionKey::new(assertion_key(ClientAssertionAlgorithm::Es256, &pair, "k"));
    let cases: Vec<(ClientAuth, ClientCredentials, &str)> = vec![
        (
            ClientAuth::PrivateKeyJwt,
            ClientCredentials::secret(Secret::new(SECRET)),
            "a client secret",
        ),
        (
            ClientAuth::Basic,
            ClientCredentials::assertion_key(key.clone()),
            "a private key",
        ),
        (
            ClientAuth::Post,
            ClientCredentials::none(),
            "no credentials",
        ),
        (
            ClientAuth::None,
            ClientCredentials::secret(Secret::new(SECRET)),
            "a client secret",
        ),
    ];
    for (accepts, credentials, configured_text) in cases {
        let idp = FakeIdp::start(FakeIdpConfig::default().with_client_auth_method(accepts))
            .await
            .unwrap();
        let err = discover(&idp, credentials).await.unwrap_err();
        match &err {
            ProviderError::ClientAuthNotAccepted {
                accepted,
                configured,
                usable,
            } => {
                assert_eq!(accepted, &vec![accepts.method_name().to_owned()]);
                assert_eq!(*configured, configured_text);
                assert!(!usable.contains(&accepts));
            }
            other => panic!("accepts {accepts:?}: {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(accepts.method_name()), "{text}");
        assert!(text.contains(configured_text), "{text}");
        assert!(!text.contains(SECRET));
    }
}

/// A discovery document without `token_endpoint_auth_methods_supported` means RFC 8414's
/// default, `client_secret_basic`.
#[tokio::test]
async fn a_document_without_the_list_means_client_secret_basic() {
    let doc = r#"{"issuer":"https://idp.example","authorization_endpoint":"https://idp.example/a",
        "token_endpoint":"https://idp.example/t","jwks_uri":"https://idp.example/k"}"#;
    let http = move |_req: HttpRequest| async move {
        Ok::<HttpResponse, HttpError>(
            http::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(doc.as_bytes().to_vec())
                .unwrap(),
        )
    };
    let run = |credentials: ClientCredentials| async move {
        OidcConfig::discover_with_credentials(
            ProviderId::new("x").unwrap(),
            &"https://idp.example".parse().unwrap(),
            "c",
            credentials,
            "https://app.example/cb".parse().unwrap(),
            &http,
        )
        .await
    };
    let config = run(ClientCredentials::secret(Secret::new("s")))
        .await
        .unwrap();
    assert_eq!(config.oauth2.client_auth, ClientAuth::Basic);
    let err = run(ClientCredentials::none()).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::ClientAuthNotAccepted { accepted, .. } if accepted == &vec!["client_secret_basic".to_owned()]),
        "{err:?}"
    );
    let pair = ec_pair();
    let err = run(ClientCredentials::assertion_key(assertion_key(
        ClientAssertionAlgorithm::Es256,
        &pair,
        "k",
    )))
    .await
    .unwrap_err();
    assert!(
        matches!(err, ProviderError::ClientAuthNotAccepted { .. }),
        "{err:?}"
    );
    // The old entry point keeps working for secrets.
    let config = OidcConfig::discover(
        ProviderId::new("x").unwrap(),
        &"https://idp.example".parse().unwrap(),
        "c",
        Some(Secret::new("s")),
        "https://app.example/cb".parse().unwrap(),
        &http,
    )
    .await
    .unwrap();
    assert_eq!(config.oauth2.client_auth, ClientAuth::Basic);
}

// ---------------------------------------------------------------------------------------------
// Redaction

#[tokio::test]
async fn keys_secrets_and_assertions_never_show_in_debug_or_errors() {
    let pair = ec_pair();
    let rsa = rsa_pair();
    // A distinctive slice of each private key's base64 body.
    let ec_body = &pair.private_pem[40..100];
    let rsa_body = &rsa.private_pem[40..100];
    let key = assertion_key(ClientAssertionAlgorithm::Es256, &pair, "k");
    let shared = SharedClientAssertionKey::new(key.clone());
    let rsa_key = assertion_key(ClientAssertionAlgorithm::Ps256, rsa, "r");
    let config = OAuth2Config::new(
        ProviderId::new("p").unwrap(),
        "client",
        "https://idp.example/a".parse().unwrap(),
        "https://idp.example/t".parse().unwrap(),
        "https://app.example/cb".parse().unwrap(),
    )
    .with_client_secret(Secret::new(SECRET))
    .with_client_auth(ClientAuth::PrivateKeyJwt)
    .with_client_assertion_key(shared.clone());
    let credentials =
        ClientCredentials::secret(Secret::new(SECRET)).with_assertion_key(shared.clone());
    let idp_config = FakeIdpConfig::default()
        .with_client_secret(SECRET)
        .with_client_auth_method(ClientAuth::PrivateKeyJwt)
        .with_client_public_key(&pair.public_pem);
    let texts = [
        format!("{key:?}"),
        format!("{shared:?}"),
        format!("{rsa_key:?}"),
        format!("{config:?}"),
        format!("{credentials:?}"),
        format!("{idp_config:?}"),
        format!(
            "{:?}",
            OAuth2Provider::new(config.clone(), Arc::new(ReqwestClient::new().unwrap()))
        ),
        format!(
            "{:?}",
            ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Rs256, &pair.private_pem)
                .unwrap_err()
        ),
        ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Rs256, &pair.private_pem)
            .unwrap_err()
            .to_string(),
    ];
    for text in &texts {
        assert!(!text.contains(ec_body), "{text}");
        assert!(!text.contains(rsa_body), "{text}");
        assert!(!text.contains(SECRET), "{text}");
        assert!(!text.contains("PRIVATE KEY"), "{text}");
    }
    assert!(texts[0].contains("redacted"));

    // An assertion the provider refuses: neither the error nor its Debug carries it.
    let idp = FakeIdp::start(
        FakeIdpConfig::default()
            .with_client_auth_method(ClientAuth::PrivateKeyJwt)
            .with_client_public_key(ec_pair().public_pem),
    )
    .await
    .unwrap();
    let (http, seen) = recording();
    let p = OAuth2Provider::new(
        provider_config(&idp, ClientAuth::PrivateKeyJwt).with_client_assertion_key(key),
        http,
    );
    let err = p
        .revoke(&Secret::new("t"), TokenKind::RefreshToken)
        .await
        .unwrap_err();
    let assertion = form(&seen.lock().unwrap()[0].1)["client_assertion"].clone();
    let signature = assertion.rsplit('.').next().unwrap().to_owned();
    for text in [format!("{err:?}"), err.to_string(), format!("{p:?}")] {
        assert!(!text.contains(&signature), "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Introspection uses the same authentication

#[tokio::test]
async fn introspection_authenticates_like_the_token_endpoint() {
    let pair = ec_pair();
    for auth in [
        ClientAuth::Basic,
        ClientAuth::Post,
        ClientAuth::SecretJwt,
        ClientAuth::PrivateKeyJwt,
        ClientAuth::None,
    ] {
        let w = world(
            FakeIdpConfig::default()
                .with_client_auth_method(auth)
                .with_client_public_key(&pair.public_pem),
            |idp| {
                provider_config(idp, auth).with_client_assertion_key(assertion_key(
                    ClientAssertionAlgorithm::Es256,
                    &pair,
                    "k",
                ))
            },
        )
        .await;
        let linked = w.try_link().await.unwrap();
        let http: Arc<dyn HttpClient> = Arc::new(ReqwestClient::new().unwrap());
        let config = provider_config(&w.idp, auth)
            .with_client_assertion_key(assertion_key(ClientAssertionAlgorithm::Es256, &pair, "k"))
            .with_introspection_endpoint(w.idp.introspection_endpoint());
        let p = OAuth2Provider::new(config.clone(), http.clone());
        let at = linked.access_token();
        assert!(
            p.introspect(at, TokenKind::AccessToken).await.unwrap(),
            "{auth}"
        );
        p.revoke(linked.refresh_token().unwrap(), TokenKind::RefreshToken)
            .await
            .unwrap();
        assert!(
            !p.introspect(at, TokenKind::AccessToken).await.unwrap(),
            "{auth}"
        );
        assert_eq!(w.idp.counters().introspections, 2, "{auth}");
        if auth == ClientAuth::PrivateKeyJwt {
            let wrong = OAuth2Provider::new(
                config.with_client_assertion_key(assertion_key(
                    ClientAssertionAlgorithm::Es256,
                    &ec_pair(),
                    "k",
                )),
                http,
            );
            let err = wrong
                .introspect(at, TokenKind::AccessToken)
                .await
                .unwrap_err();
            assert!(
                matches!(err, ProviderError::InvalidClient { .. }),
                "{err:?}"
            );
        }
    }
}
