//! `JwtAuthenticator` against tokens signed at run time with keys generated at run time, and a
//! JWKS served over real HTTP on loopback by a server that counts its fetches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey;
use rand_core::OsRng;
use rsa::RsaPrivateKey;
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};
use tokenbroker::{Caller, Realm};
use tokenbroker_axum::auth::{CallerAuthenticator, ConfigError, JwtAuthenticator, Unauthenticated};
use url::Url;

const ISSUER: &str = "https://idp.test/realms/acme";
const AUDIENCE: &str = "broker";
const REJECTED: &str = "the request's caller could not be authenticated";

// ---------------------------------------------------------------------------------------
// Keys (generated once per test binary: RSA generation is the slow part)

struct Keys {
    rsa1: RsaPrivateKey,
    rsa2: RsaPrivateKey,
    ec: p256::ecdsa::SigningKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        rsa1: RsaPrivateKey::new(&mut OsRng, 2048).expect("RSA key"),
        rsa2: RsaPrivateKey::new(&mut OsRng, 2048).expect("RSA key"),
        ec: p256::ecdsa::SigningKey::random(&mut OsRng),
    })
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rsa_signing(key: &RsaPrivateKey) -> EncodingKey {
    EncodingKey::from_rsa_der(key.to_pkcs1_der().expect("PKCS#1 DER").as_bytes())
}

fn ec_signing(key: &p256::ecdsa::SigningKey) -> EncodingKey {
    EncodingKey::from_ec_der(key.to_pkcs8_der().expect("PKCS#8 DER").as_bytes())
}

fn rsa_verifying(key: &RsaPrivateKey) -> DecodingKey {
    let public = key.to_public_key();
    DecodingKey::from_rsa_der(public.to_pkcs1_der().expect("PKCS#1 DER").as_bytes())
}

fn rsa_jwk(key: &RsaPrivateKey, kid: &str, alg: Option<&str>) -> Value {
    let mut jwk = json!({
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "n": b64(&key.n().to_bytes_be()),
        "e": b64(&key.e().to_bytes_be()),
    });
    if let Some(alg) = alg {
        jwk["alg"] = json!(alg);
    }
    jwk
}

fn ec_jwk(key: &p256::ecdsa::SigningKey, kid: &str) -> Value {
    let point = key.verifying_key().to_encoded_point(false);
    json!({
        "kty": "EC",
        "kid": kid,
        "use": "sig",
        "alg": "ES256",
        "crv": "P-256",
        "x": b64(point.x().expect("x")),
        "y": b64(point.y().expect("y")),
    })
}

// ---------------------------------------------------------------------------------------
// Tokens

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Keycloak-shaped access-token claims.
fn good_claims() -> Value {
    let now = now();
    json!({
        "iss": ISSUER,
        "aud": [AUDIENCE, "account"],
        "sub": "user-1",
        "azp": "web-app",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
        "scope": "openid profile email",
        "realm_access": { "roles": ["offline_access", "uma_authorization"] },
        "resource_access": {
            "broker": { "roles": ["read-token"] },
            "account": { "roles": ["manage-account"] },
        },
    })
}

fn sign(claims: &Value, alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("signing")
}

fn rs256(claims: &Value, kid: &str) -> String {
    sign(
        claims,
        Algorithm::RS256,
        Some(kid),
        &rsa_signing(&keys().rsa1),
    )
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().expect("object").remove(name);
    claims
}

// ---------------------------------------------------------------------------------------
// The JWKS server

struct JwksServer {
    url: Url,
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ServerState {
    jwks: Arc<Mutex<Value>>,
    fetches: Arc<AtomicUsize>,
}

async fn serve_jwks(state: State<ServerState>) -> Json<Value> {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    Json(state.jwks.lock().unwrap().clone())
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let state = ServerState {
            jwks: Arc::new(Mutex::new(json!({ "keys": keys }))),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let app = axum::Router::new()
            .route(
                "/realms/acme/protocol/openid-connect/certs",
                get(serve_jwks),
            )
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("JWKS server");
        });
        JwksServer {
            url: Url::parse(&format!(
                "http://{addr}/realms/acme/protocol/openid-connect/certs"
            ))
            .expect("URL"),
            jwks: state.jwks,
            fetches: state.fetches,
            task,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn publish(&self, keys: Vec<Value>) {
        *self.jwks.lock().unwrap() = json!({ "keys": keys });
    }

    /// Stops accepting connections (the authenticator's client keeps none open).
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn default_jwks() -> Vec<Value> {
    vec![
        rsa_jwk(&keys().rsa1, "rsa-1", Some("RS256")),
        ec_jwk(&keys().ec, "ec-1"),
    ]
}

fn realm() -> Realm {
    Realm::new("acme").expect("realm")
}

/// A client that keeps no idle connection, so a stopped server is really unreachable.
fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

fn remote(server: &JwksServer) -> tokenbroker_axum::auth::JwtAuthenticatorBuilder {
    JwtAuthenticator::builder(ISSUER, AUDIENCE)
        .realm(realm())
        .client_roles_of("broker")
        .jwks_url(server.url.clone())
        .http_client(http_client())
}

fn parts(authorization: &[&str]) -> http::request::Parts {
    let mut request = http::Request::builder().uri("/token");
    for value in authorization {
        request = request.header(http::header::AUTHORIZATION, *value);
    }
    request.body(()).expect("request").into_parts().0
}

async fn by_header(auth: &JwtAuthenticator, token: &str) -> Result<Caller, Unauthenticated> {
    auth.authenticate(&parts(&[&format!("Bearer {token}")]))
        .await
}

#[track_caller]
/// Asserts the uniform rejection, and that it was for `reason` (a part of its `Debug`, which
/// is what logs get), so that each case really exercises the check it is named after.
fn assert_rejected(result: Result<Caller, Unauthenticated>, case: &str, reason: &str) {
    match result {
        Ok(caller) => panic!("{case}: accepted as {caller:?}"),
        Err(rejection) => {
            assert_eq!(rejection.to_string(), REJECTED, "{case}");
            let debug = format!("{rejection:?}");
            assert!(debug.contains(reason), "{case}: {debug}, expected {reason}");
        }
    }
}

#[track_caller]
fn assert_user_1(caller: &Caller) {
    assert_eq!(caller.realm, realm());
    assert_eq!(caller.subject.as_str(), "user-1");
    assert_eq!(caller.client_id, "web-app");
    let roles: Vec<&str> = caller.roles.iter().map(String::as_str).collect();
    // The `account` client's roles are not read: only `client_roles_of("broker")`.
    assert_eq!(roles, ["offline_access", "read-token", "uma_authorization"]);
    assert_eq!(caller.client_scope_roles.as_ref(), Some(&caller.roles));
    assert!(caller.has_effective_role("read-token"));
    assert!(!caller.has_role("manage-account"));
    let scopes: Vec<&str> = caller.scopes.iter().collect();
    assert_eq!(scopes, ["email", "openid", "profile"]);
}

// ---------------------------------------------------------------------------------------
// Good tokens

#[tokio::test]
async fn a_good_rs256_token_gives_its_caller() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server).build().expect("authenticator");

    let caller = by_header(&auth, &rs256(&good_claims(), "rsa-1"))
        .await
        .expect("accepted");
    assert_user_1(&caller);
    // The same through the body path, without a second fetch.
    let caller = auth
        .authenticate_token(&rs256(&good_claims(), "rsa-1"))
        .await
        .expect("accepted");
    assert_user_1(&caller);
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn a_good_es256_token_gives_its_caller() {
    let server = JwksServer::start(default_jwks()).await;
    // The default HTTP client this time.
    let auth = JwtAuthenticator::builder(ISSUER, AUDIENCE)
        .realm(realm())
        .client_roles_of("broker")
        .jwks_url(server.url.clone())
        .build()
        .expect("authenticator");

    let token = sign(
        &good_claims(),
        Algorithm::ES256,
        Some("ec-1"),
        &ec_signing(&keys().ec),
    );
    let caller = by_header(&auth, &token).await.expect("accepted");
    assert_user_1(&caller);
}

#[tokio::test]
async fn a_static_jwks_verifies_without_any_fetch() {
    let jwks: jsonwebtoken::jwk::JwkSet =
        serde_json::from_value(json!({ "keys": default_jwks() })).expect("JWKS");
    let auth = JwtAuthenticator::builder(ISSUER, AUDIENCE)
        .realm(realm())
        .client_roles_of("broker")
        .static_jwks(jwks)
        .build()
        .expect("authenticator");

    let rs = by_header(&auth, &rs256(&good_claims(), "rsa-1")).await;
    assert_user_1(&rs.expect("RS256"));
    let es = sign(
        &good_claims(),
        Algorithm::ES256,
        Some("ec-1"),
        &ec_signing(&keys().ec),
    );
    assert_user_1(&by_header(&auth, &es).await.expect("ES256"));
    assert_rejected(
        by_header(&auth, &rs256(&good_claims(), "rsa-2")).await,
        "kid not in the static set",
        "UnknownKey",
    );
}

#[tokio::test]
async fn client_id_falls_back_to_the_client_id_claim_and_roles_may_be_absent() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server).build().expect("authenticator");

    let claims = without(
        without(
            with(without(good_claims(), "azp"), "client_id", json!("svc")),
            "realm_access",
        ),
        "resource_access",
    );
    let caller = by_header(&auth, &rs256(&claims, "rsa-1"))
        .await
        .expect("accepted");
    assert_eq!(caller.client_id, "svc");
    assert!(caller.roles.is_empty());
    assert!(!caller.has_effective_role("read-token"));

    let no_client = without(good_claims(), "azp");
    assert_rejected(
        by_header(&auth, &rs256(&no_client, "rsa-1")).await,
        "no client id",
        r#"MissingClaim("azp")"#,
    );
}

// ---------------------------------------------------------------------------------------
// Bad tokens

#[tokio::test]
async fn bad_tokens_are_rejected_alike() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server).build().expect("authenticator");
    // The control: the same authenticator accepts a good token.
    by_header(&auth, &rs256(&good_claims(), "rsa-1"))
        .await
        .expect("the good token is accepted");

    let now = now();
    let other_key = rsa_signing(&keys().rsa2);
    let header_none = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(good_claims().to_string().as_bytes());
    let cases: Vec<(&str, &str, String)> = vec![
        (
            "bad signature",
            r#"BadSignature"#,
            sign(&good_claims(), Algorithm::RS256, Some("rsa-1"), &other_key),
        ),
        ("tampered payload", r#"BadSignature"#, {
            let token = rs256(&good_claims(), "rsa-1");
            let mut segments: Vec<&str> = token.split('.').collect();
            let evil = b64(with(good_claims(), "sub", json!("admin"))
                .to_string()
                .as_bytes());
            segments[1] = &evil;
            segments.join(".")
        }),
        (
            "expired beyond the leeway",
            r#"Expired"#,
            rs256(&with(good_claims(), "exp", json!(now - 120)), "rsa-1"),
        ),
        (
            "not yet valid beyond the leeway",
            r#"NotYetValid"#,
            rs256(&with(good_claims(), "nbf", json!(now + 120)), "rsa-1"),
        ),
        (
            "no exp",
            r#"MissingClaim("exp")"#,
            rs256(&without(good_claims(), "exp"), "rsa-1"),
        ),
        (
            "wrong issuer",
            r#"WrongIssuer"#,
            rs256(
                &with(good_claims(), "iss", json!("https://evil.test/realms/acme")),
                "rsa-1",
            ),
        ),
        (
            "no issuer",
            r#"MissingClaim("iss")"#,
            rs256(&without(good_claims(), "iss"), "rsa-1"),
        ),
        (
            "wrong audience",
            r#"WrongAudience"#,
            rs256(&with(good_claims(), "aud", json!(["account"])), "rsa-1"),
        ),
        (
            "no audience",
            r#"MissingClaim("aud")"#,
            rs256(&without(good_claims(), "aud"), "rsa-1"),
        ),
        (
            "missing sub",
            r#"MissingClaim("sub")"#,
            rs256(&without(good_claims(), "sub"), "rsa-1"),
        ),
        (
            "empty sub",
            r#"InvalidSubject"#,
            rs256(&with(good_claims(), "sub", json!("")), "rsa-1"),
        ),
        (
            "alg none",
            r#"Malformed"#,
            format!("{header_none}.{payload}."),
        ),
        ("alg none with kid", r#"Malformed"#, {
            let header = b64(br#"{"alg":"none","kid":"rsa-1"}"#);
            format!("{header}.{payload}.")
        }),
        ("garbage", r#"Malformed"#, "not-a-jwt".to_owned()),
        (
            "two segments",
            r#"Malformed"#,
            format!("{header_none}.{payload}"),
        ),
        (
            "unknown kid",
            r#"UnknownKey"#,
            rs256(&good_claims(), "rsa-404"),
        ),
        (
            "RS256 token naming the EC key",
            r#"KeyMismatch"#,
            rs256(&good_claims(), "ec-1"),
        ),
    ];
    for (case, reason, token) in &cases {
        assert_rejected(by_header(&auth, token).await, case, reason);
        assert_rejected(auth.authenticate_token(token).await, case, reason);
    }
}

#[tokio::test]
async fn tokens_within_the_leeway_are_accepted() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server).build().expect("authenticator");
    let now = now();
    let claims = with(
        with(good_claims(), "exp", json!(now - 10)),
        "nbf",
        json!(now + 10),
    );
    by_header(&auth, &rs256(&claims, "rsa-1"))
        .await
        .expect("10 s off is within the 30 s leeway");
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    let rsa = &keys().rsa1;
    let public = rsa.to_public_key();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        (
            "SPKI PEM",
            public
                .to_public_key_pem(LineEnding::LF)
                .expect("PEM")
                .into_bytes(),
        ),
        (
            "PKCS#1 PEM",
            public
                .to_pkcs1_pem(LineEnding::LF)
                .expect("PEM")
                .into_bytes(),
        ),
        (
            "SPKI DER",
            public.to_public_key_der().expect("DER").as_bytes().to_vec(),
        ),
        (
            "PKCS#1 DER",
            public.to_pkcs1_der().expect("DER").as_bytes().to_vec(),
        ),
    ];

    // With the JWKS and the default (asymmetric) allow-list.
    let server = JwksServer::start(default_jwks()).await;
    let from_jwks = remote(&server).build().expect("authenticator");
    // Even with HS256 allowed: the RSA key must not become an HMAC secret, and the only HMAC
    // key is the real secret.
    let real_secret = b"the real shared secret, 32 bytes or more";
    let with_hs = JwtAuthenticator::builder(ISSUER, AUDIENCE)
        .realm(realm())
        .client_roles_of("broker")
        .algorithms(&[Algorithm::RS256, Algorithm::HS256])
        .static_key(Some("rsa-1".into()), rsa_verifying(rsa), Algorithm::RS256)
        .static_key(
            Some("hmac".into()),
            DecodingKey::from_secret(real_secret),
            Algorithm::HS256,
        )
        .build()
        .expect("authenticator");

    // Controls: both authenticators accept honest tokens.
    by_header(&from_jwks, &rs256(&good_claims(), "rsa-1"))
        .await
        .expect("RS256 via JWKS");
    by_header(&with_hs, &rs256(&good_claims(), "rsa-1"))
        .await
        .expect("RS256 via static key");
    let honest_hs = sign(
        &good_claims(),
        Algorithm::HS256,
        Some("hmac"),
        &EncodingKey::from_secret(real_secret),
    );
    by_header(&with_hs, &honest_hs)
        .await
        .expect("HS256 with the real secret");

    for (form, secret) in &secrets {
        let forged_key = EncodingKey::from_secret(secret);
        for kid in [Some("rsa-1"), None] {
            let forged = sign(&good_claims(), Algorithm::HS256, kid, &forged_key);
            let case = format!("HS256 with the {form} as secret, kid {kid:?}");
            assert_rejected(
                by_header(&from_jwks, &forged).await,
                &case,
                "AlgorithmNotAllowed",
            );
            // With a kid, the RSA key is refused as an HMAC key; without one, the only HMAC
            // key (the real secret) does not verify the forgery.
            let reason = if kid.is_some() {
                "KeyMismatch"
            } else {
                "BadSignature"
            };
            assert_rejected(by_header(&with_hs, &forged).await, &case, reason);
        }
    }
}

#[tokio::test]
async fn algorithms_outside_the_allow_list_or_the_keys_alg_are_rejected() {
    let rsa = &keys().rsa1;
    // `rsa-1` declares RS256; `rsa-any` is the same key without `alg`.
    let server = JwksServer::start(vec![
        rsa_jwk(rsa, "rsa-1", Some("RS256")),
        rsa_jwk(rsa, "rsa-any", None),
        ec_jwk(&keys().ec, "ec-1"),
    ])
    .await;
    let ps256_any = sign(
        &good_claims(),
        Algorithm::PS256,
        Some("rsa-any"),
        &rsa_signing(rsa),
    );

    let rs256_only = remote(&server)
        .algorithms(&[Algorithm::RS256])
        .build()
        .expect("authenticator");
    by_header(&rs256_only, &rs256(&good_claims(), "rsa-any"))
        .await
        .expect("RS256 is allowed");
    assert_rejected(
        by_header(&rs256_only, &ps256_any).await,
        "PS256 not allowed",
        "AlgorithmNotAllowed",
    );
    let es256 = sign(
        &good_claims(),
        Algorithm::ES256,
        Some("ec-1"),
        &ec_signing(&keys().ec),
    );
    assert_rejected(
        by_header(&rs256_only, &es256).await,
        "ES256 not allowed",
        "AlgorithmNotAllowed",
    );

    // Default list (PS256 allowed): fine with a key without `alg`, not with one that says RS256.
    let default_list = remote(&server).build().expect("authenticator");
    by_header(&default_list, &ps256_any)
        .await
        .expect("PS256 with a key without alg");
    let ps256_rs_key = sign(
        &good_claims(),
        Algorithm::PS256,
        Some("rsa-1"),
        &rsa_signing(rsa),
    );
    assert_rejected(
        by_header(&default_list, &ps256_rs_key).await,
        "PS256 with an RS256 key",
        "KeyMismatch",
    );
    let rs384 = sign(
        &good_claims(),
        Algorithm::RS384,
        Some("rsa-any"),
        &rsa_signing(rsa),
    );
    assert_rejected(
        by_header(&default_list, &rs384).await,
        "RS384 not allowed",
        "AlgorithmNotAllowed",
    );
}

#[tokio::test]
async fn a_token_without_kid_needs_exactly_one_fitting_key() {
    let rsa = &keys().rsa1;
    let unkeyed = sign(&good_claims(), Algorithm::RS256, None, &rsa_signing(rsa));

    // One RSA key and one EC key: the RS256 token has one candidate.
    let server = JwksServer::start(default_jwks()).await;
    let one = remote(&server).build().expect("authenticator");
    by_header(&one, &unkeyed).await.expect("one RSA key fits");

    // Two RSA keys: no guessing.
    let two = JwksServer::start(vec![
        rsa_jwk(rsa, "rsa-1", Some("RS256")),
        rsa_jwk(&keys().rsa2, "rsa-2", Some("RS256")),
    ])
    .await;
    let ambiguous = remote(&two).build().expect("authenticator");
    assert_rejected(
        by_header(&ambiguous, &unkeyed).await,
        "two RSA keys fit",
        "AmbiguousKey",
    );
}

#[tokio::test]
async fn malformed_authorization_headers_are_rejected() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server).build().expect("authenticator");
    let token = rs256(&good_claims(), "rsa-1");

    for scheme in ["Bearer", "bearer", "BEARER"] {
        auth.authenticate(&parts(&[&format!("{scheme} {token}")]))
            .await
            .unwrap_or_else(|e| panic!("scheme {scheme}: {e:?}"));
    }
    let bearer = format!("Bearer {token}");
    let cases: Vec<(&str, &str, Vec<String>)> = vec![
        ("missing", "MissingHeader", vec![]),
        ("empty", "NotBearer", vec![String::new()]),
        ("garbage", "NotBearer", vec!["garbage".into()]),
        ("basic", "NotBearer", vec![format!("Basic {token}")]),
        ("no token", "NotBearer", vec!["Bearer".into()]),
        ("empty token", "NotBearer", vec!["Bearer ".into()]),
        (
            "two tokens",
            "NotBearer",
            vec![format!("Bearer {token} {token}")],
        ),
        ("token only", "NotBearer", vec![token.clone()]),
        (
            "duplicate header",
            "DuplicateHeader",
            vec![bearer.clone(), bearer.clone()],
        ),
        (
            "garbage bearer",
            "Malformed",
            vec!["Bearer not-a-jwt".into()],
        ),
    ];
    for (case, reason, values) in &cases {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        assert_rejected(auth.authenticate(&parts(&values)).await, case, reason);
    }
    let empty_body_token = auth.authenticate_token("").await;
    assert_rejected(empty_body_token, "empty subject_token", "BadTokenSize");
}

// ---------------------------------------------------------------------------------------
// The JWKS cache

#[tokio::test]
async fn a_rotated_key_is_picked_up_with_exactly_one_refetch() {
    let server = JwksServer::start(vec![rsa_jwk(&keys().rsa1, "key-1", Some("RS256"))]).await;
    let auth = remote(&server).build().expect("authenticator");
    let key_2 = rsa_signing(&keys().rsa2);

    for _ in 0..3 {
        by_header(&auth, &rs256(&good_claims(), "key-1"))
            .await
            .expect("key 1");
    }
    assert_eq!(server.fetches(), 1, "one lazy fetch, then the cache");

    server.publish(vec![rsa_jwk(&keys().rsa2, "key-2", Some("RS256"))]);
    let token_2 = sign(&good_claims(), Algorithm::RS256, Some("key-2"), &key_2);
    let caller = by_header(&auth, &token_2)
        .await
        .expect("key 2 after rotation");
    assert_user_1(&caller);
    assert_eq!(server.fetches(), 2, "exactly one re-fetch");

    by_header(&auth, &token_2)
        .await
        .expect("key 2 from the cache");
    assert_eq!(server.fetches(), 2);
    // Key 1 is gone from the JWKS, and asking again is rate limited.
    assert_rejected(
        by_header(&auth, &rs256(&good_claims(), "key-1")).await,
        "retired key",
        "UnknownKey",
    );
    assert_eq!(server.fetches(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server)
        .jwks_refetch_interval(Duration::from_millis(200))
        .build()
        .expect("authenticator");
    // Concurrent first requests share the one lazy fetch.
    let good = rs256(&good_claims(), "rsa-1");
    let firsts: Vec<_> = (0..20)
        .map(|_| {
            let auth = auth.clone();
            let good = good.clone();
            tokio::spawn(async move { auth.authenticate_token(&good).await })
        })
        .collect();
    for first in firsts {
        first.await.expect("task").expect("accepted");
    }
    assert_eq!(server.fetches(), 1);

    // Unknown kids are turned away before any signature check, so the flood re-uses one
    // signed token under new headers: no signing time between the floods.
    let payload_and_signature = good.split_once('.').expect("JWS").1.to_owned();
    let flood = |round: usize| {
        (0..50)
            .map(|i| {
                let auth = auth.clone();
                let header = json!({ "alg": "RS256", "kid": format!("random-{round}-{i}") });
                let token = format!(
                    "{}.{payload_and_signature}",
                    b64(header.to_string().as_bytes())
                );
                tokio::spawn(async move { auth.authenticate_token(&token).await })
            })
            .collect::<Vec<_>>()
    };
    for attempt in flood(1) {
        assert_rejected(attempt.await.expect("task"), "random kid", "UnknownKey");
    }
    assert_eq!(server.fetches(), 2, "one re-fetch for the whole flood");

    tokio::time::sleep(Duration::from_millis(300)).await;
    for attempt in flood(2) {
        assert_rejected(attempt.await.expect("task"), "random kid", "UnknownKey");
    }
    assert_eq!(server.fetches(), 3, "one more re-fetch after the interval");
    for attempt in flood(3) {
        assert_rejected(attempt.await.expect("task"), "random kid", "UnknownKey");
    }
    assert_eq!(server.fetches(), 3, "none within the interval");
    // The known key never needed any of those fetches.
    by_header(&auth, &good).await.expect("known key");
    assert_eq!(server.fetches(), 3);
}

#[tokio::test]
async fn keys_are_fetched_again_after_their_lifetime() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server)
        .jwks_ttl(Duration::from_millis(500))
        .build()
        .expect("authenticator");
    let good = rs256(&good_claims(), "rsa-1");

    by_header(&auth, &good).await.expect("accepted");
    by_header(&auth, &good).await.expect("accepted");
    assert_eq!(server.fetches(), 1);
    tokio::time::sleep(Duration::from_millis(600)).await;
    by_header(&auth, &good).await.expect("accepted");
    assert_eq!(server.fetches(), 2);
}

#[tokio::test]
async fn a_jwks_outage_rejects_new_kids_and_keeps_the_cached_keys() {
    let server = JwksServer::start(default_jwks()).await;
    let auth = remote(&server)
        .jwks_ttl(Duration::from_millis(300))
        .jwks_refetch_interval(Duration::from_millis(50))
        .build()
        .expect("authenticator");
    let good = rs256(&good_claims(), "rsa-1");
    by_header(&auth, &good).await.expect("accepted");
    assert_eq!(server.fetches(), 1);
    server.stop().await;

    // A kid that needs a fetch: the fetch fails, the token is rejected.
    let key_2 = sign(
        &good_claims(),
        Algorithm::RS256,
        Some("rsa-2"),
        &rsa_signing(&keys().rsa2),
    );
    assert_rejected(
        by_header(&auth, &key_2).await,
        "kid needing a fetch, IdP down",
        "UnknownKey",
    );
    // The cached key still verifies, also once its lifetime is over and re-fetching fails.
    by_header(&auth, &good).await.expect("cached key");
    tokio::time::sleep(Duration::from_millis(400)).await;
    by_header(&auth, &good)
        .await
        .expect("stale cached key while the IdP is down");
    assert_rejected(by_header(&auth, &key_2).await, "still down", "UnknownKey");
}

#[tokio::test]
async fn an_unreachable_jwks_at_start_rejects() {
    let server = JwksServer::start(default_jwks()).await;
    let builder = remote(&server);
    server.stop().await;
    let auth = builder.build().expect("authenticator");
    assert_rejected(
        by_header(&auth, &rs256(&good_claims(), "rsa-1")).await,
        "no keys ever fetched",
        "UnknownKey",
    );
}

// ---------------------------------------------------------------------------------------
// Debug output and configuration

#[tokio::test]
async fn debug_output_has_no_token_or_key_material() {
    let rsa = &keys().rsa1;
    let n = b64(&rsa.n().to_bytes_be());
    let secret = "a-very-secret-hmac-key-of-32-bytes!!";
    let static_auth = JwtAuthenticator::builder(ISSUER, AUDIENCE)
        .realm(realm())
        .algorithms(&[Algorithm::RS256, Algorithm::HS256])
        .static_key(
            Some("rsa-1".into()),
            DecodingKey::from_rsa_components(&n, &b64(&rsa.e().to_bytes_be())).expect("key"),
            Algorithm::RS256,
        )
        .static_key(
            None,
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )
        .build()
        .expect("authenticator");
    let server = JwksServer::start(default_jwks()).await;
    let remote_auth = remote(&server).build().expect("authenticator");
    let good = rs256(&good_claims(), "rsa-1");
    by_header(&remote_auth, &good)
        .await
        .expect("keys now cached");

    for debug in [format!("{static_auth:?}"), format!("{remote_auth:?}")] {
        assert!(debug.contains(ISSUER), "{debug}");
        assert!(debug.contains(AUDIENCE), "{debug}");
        assert!(debug.contains("RS256"), "{debug}");
        for material in [&n[..40], secret, "[redacted]"] {
            assert!(!debug.contains(material), "{debug}");
        }
        let secret_bytes = format!("{:?}", secret.as_bytes());
        assert!(!debug.contains(&secret_bytes[1..40]), "{debug}");
    }

    let expired = rs256(&with(good_claims(), "exp", json!(now() - 600)), "rsa-1");
    let rejections = [
        by_header(&remote_auth, &expired)
            .await
            .expect_err("expired"),
        by_header(&remote_auth, &format!("{good}x"))
            .await
            .expect_err("bad signature"),
        remote_auth
            .authenticate(&parts(&[&format!("Basic {good}")]))
            .await
            .expect_err("not bearer"),
    ];
    for rejection in &rejections {
        let debug = format!("{rejection:?}");
        let display = rejection.to_string();
        for text in [&debug, &display] {
            for segment in expired.split('.').chain(good.split('.')) {
                assert!(!text.contains(segment), "{text}");
            }
            assert!(!text.contains("user-1"), "{text}");
        }
        assert_eq!(display, REJECTED);
    }
}

#[test]
fn bad_configurations_do_not_build() {
    let url = Url::parse("https://idp.test/jwks").expect("URL");
    let rsa_key = || {
        let rsa = &keys().rsa1;
        rsa_verifying(rsa)
    };
    let cases: Vec<(ConfigError, Result<JwtAuthenticator, ConfigError>)> = vec![
        (
            ConfigError::MissingRealm,
            JwtAuthenticator::builder(ISSUER, AUDIENCE)
                .jwks_url(url.clone())
                .build(),
        ),
        (
            ConfigError::NoKeys,
            JwtAuthenticator::builder(ISSUER, AUDIENCE)
                .realm(realm())
                .build(),
        ),
        (
            ConfigError::EmptyIssuerOrAudience,
            JwtAuthenticator::builder(ISSUER, "")
                .realm(realm())
                .jwks_url(url.clone())
                .build(),
        ),
        (
            ConfigError::ConflictingKeySources,
            JwtAuthenticator::builder(ISSUER, AUDIENCE)
                .realm(realm())
                .jwks_url(url.clone())
                .static_key(None, rsa_key(), Algorithm::RS256)
                .build(),
        ),
        (
            ConfigError::NoAlgorithms,
            JwtAuthenticator::builder(ISSUER, AUDIENCE)
                .realm(realm())
                .jwks_url(url.clone())
                .algorithms(&[])
                .build(),
        ),
        (
            ConfigError::HmacWithoutSecret,
            JwtAuthenticator::builder(ISSUER, AUDIENCE)
                .realm(realm())
                .jwks_url(url.clone())
                .algorithms(&[Algorithm::HS256])
                .build(),
        ),
        (
            ConfigError::HmacWithoutSecret,
            JwtAuthenticator::builder(ISSUER, AUDIENCE)
                .realm(realm())
                .algorithms(&[Algorithm::RS256, Algorithm::HS256])
                .static_key(None, rsa_key(), Algorithm::RS256)
                .build(),
        ),
        (
            // An RSA public key given as an HMAC key's algorithm.
            ConfigError::KeyAlgorithmMismatch(Algorithm::HS256),
            JwtAuthenticator::builder(ISSUER, AUDIENCE)
                .realm(realm())
                .algorithms(&[Algorithm::HS256])
                .static_key(None, rsa_key(), Algorithm::HS256)
                .build(),
        ),
    ];
    for (expected, built) in cases {
        assert_eq!(built.expect_err("must not build"), expected);
    }
}
