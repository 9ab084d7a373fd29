//! The fake over real HTTP, spoken to as a client would; the suites under `tests/` cover the
//! broker against it.

use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use url::Url;

use super::grants::random_token;
use super::*;

/// How the test client authenticates at `/token`, `/revoke` and `/introspect`.
#[derive(Clone, Copy)]
enum Auth<'a> {
    /// `client_secret_basic`, id and secret form-url-encoded first (RFC 6749 §2.3.1).
    Basic,
    /// `client_secret_post`.
    Body,
    /// Basic with this secret, not form-url-encoded.
    RawBasic(&'a str),
    /// Body with this secret.
    BodySecret(&'a str),
    None,
}

struct Reply {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).expect("JSON body")
    }
    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
    fn str(&self, field: &str) -> String {
        self.json()[field].as_str().expect(field).to_owned()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn post(idp: &FakeIdp, url: Url, auth: Auth<'_>, pairs: &[(&str, &str)]) -> Reply {
    try_post(idp, url, auth, pairs).await.expect("HTTP request")
}

async fn try_post(
    idp: &FakeIdp,
    url: Url,
    auth: Auth<'_>,
    pairs: &[(&str, &str)],
) -> Result<Reply, reqwest::Error> {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        form.append_pair(k, v);
    }
    let mut req = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded");
    match auth {
        Auth::Basic => {
            let creds = format!(
                "{}:{}",
                encode(idp.client_id()),
                encode(idp.client_secret())
            );
            req = req.header("authorization", format!("Basic {}", STANDARD.encode(creds)));
        }
        Auth::RawBasic(secret) => req = req.basic_auth(idp.client_id(), Some(secret)),
        Auth::Body => {
            form.append_pair("client_id", idp.client_id());
            form.append_pair("client_secret", idp.client_secret());
        }
        Auth::BodySecret(secret) => {
            form.append_pair("client_id", idp.client_id());
            form.append_pair("client_secret", secret);
        }
        Auth::None => {}
    }
    let resp = req.body(form.finish()).send().await?;
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    Ok(Reply {
        status,
        headers,
        text,
    })
}

const REDIRECT: &str = "http://127.0.0.1:9/callback";

/// A PKCE pair: (verifier, S256 challenge).
fn pkce() -> (String, String) {
    let verifier = random_token("verifier-0123456789-");
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

fn authorization_url(idp: &FakeIdp, scope: &str, challenge: &str, extra: &[(&str, &str)]) -> Url {
    let mut url = idp.authorization_endpoint();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", idp.client_id())
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", scope)
        .append_pair("state", "st-1")
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256")
        .extend_pairs(extra);
    url
}

async fn get(url: Url) -> (StatusCode, Option<Url>, String) {
    let resp = http().get(url).send().await.expect("GET");
    let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
    let location = resp
        .headers()
        .get("location")
        .map(|l| Url::parse(l.to_str().expect("ascii")).expect("Location URL"));
    (status, location, resp.text().await.expect("body"))
}

fn query(url: &Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn exchange(idp: &FakeIdp, code: &str, verifier: &str, auth: Auth<'_>) -> Reply {
    post(
        idp,
        idp.token_endpoint(),
        auth,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
        ],
    )
    .await
}

async fn refresh_with(idp: &FakeIdp, rt: &str, extra: &[(&str, &str)]) -> Reply {
    let mut pairs = vec![("grant_type", "refresh_token"), ("refresh_token", rt)];
    pairs.extend_from_slice(extra);
    post(idp, idp.token_endpoint(), Auth::Basic, &pairs).await
}

/// Runs the code flow through `FakeIdp::authorize` and returns the token response.
async fn login(idp: &FakeIdp, user: &str, scope: &str) -> Reply {
    let (verifier, challenge) = pkce();
    let url = authorization_url(idp, scope, &challenge, &[]);
    let cb = idp.authorize(&url, user).expect("authorize");
    let reply = exchange(idp, &cb.code, &verifier, Auth::Basic).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    reply
}

async fn introspect(idp: &FakeIdp, token: &str) -> Value {
    let reply = post(
        idp,
        idp.introspection_endpoint(),
        Auth::Basic,
        &[("token", token)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    reply.json()
}

fn jwt_claims(idp: &FakeIdp, jwt: &str) -> Value {
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "header.payload.signature");
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
    // Signed by default, with the key made at start (ES256 outside the Google and Microsoft
    // presets); `tests/fake_idp_modes.rs` verifies the signatures.
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], idp.signing_key_id());
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json")
}

#[tokio::test]
async fn code_flow_over_http_with_pkce() {
    let idp = FakeIdp::start_default().await.unwrap();
    let (verifier, challenge) = pkce();
    let url = authorization_url(
        &idp,
        "openid email",
        &challenge,
        &[("login_hint", "bob"), ("nonce", "n-0S6")],
    );
    let (status, location, _) = get(url).await;
    assert_eq!(status, StatusCode::FOUND);
    let location = location.expect("Location");
    assert_eq!(&location[..Position::AfterPath], REDIRECT);
    assert_eq!(query(&location, "state").as_deref(), Some("st-1"));
    let code = query(&location, "code").expect("code");

    let reply = exchange(&idp, &code, &verifier, Auth::Basic).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.headers["cache-control"], "no-store");
    let body = reply.json();
    assert!(body["access_token"].as_str().unwrap().starts_with("at_"));
    assert!(body["refresh_token"].as_str().unwrap().starts_with("rt_"));
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "openid email");
    let claims = jwt_claims(&idp, body["id_token"].as_str().unwrap());
    assert_eq!(claims["iss"], idp.issuer());
    assert_eq!(claims["sub"], "bob");
    assert_eq!(claims["aud"], idp.client_id());
    assert_eq!(claims["nonce"], "n-0S6");
    assert!(claims["exp"].as_u64() > claims["iat"].as_u64());

    let info = introspect(&idp, body["access_token"].as_str().unwrap()).await;
    assert_eq!(info["active"], true);
    assert_eq!(info["sub"], "bob");
    assert_eq!(info["scope"], "openid email");
    assert_eq!(info["token_type"], "Bearer");

    let c = idp.counters();
    assert_eq!(
        (c.authorize_requests, c.code_exchanges, c.token_requests),
        (1, 1, 1)
    );
    assert_eq!(c.introspections, 1);
}

#[tokio::test]
async fn no_id_token_without_openid_scope() {
    let idp = FakeIdp::start_default().await.unwrap();
    let body = login(&idp, "alice", "email").await.json();
    assert!(body.get("id_token").is_none());
    let idp = FakeIdp::start(FakeIdpConfig::default().with_id_token(false))
        .await
        .unwrap();
    let body = login(&idp, "alice", "openid").await.json();
    assert!(body.get("id_token").is_none());
}

#[tokio::test]
async fn wrong_or_missing_verifier_is_rejected() {
    let idp = FakeIdp::start_default().await.unwrap();
    let (_, challenge) = pkce();
    let (other_verifier, _) = pkce();
    let cb = idp
        .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
        .unwrap();
    let reply = exchange(&idp, &cb.code, &other_verifier, Auth::Basic).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error(), "invalid_grant");

    let (verifier, challenge) = pkce();
    let cb = idp
        .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
        .unwrap();
    let reply = post(
        &idp,
        idp.token_endpoint(),
        Auth::Basic,
        &[
            ("grant_type", "authorization_code"),
            ("code", &cb.code),
            ("redirect_uri", REDIRECT),
        ],
    )
    .await;
    assert_eq!(reply.error(), "invalid_request");
    // The failed attempt consumed the code.
    let reply = exchange(&idp, &cb.code, &verifier, Auth::Basic).await;
    assert_eq!(reply.error(), "invalid_grant");
}

#[tokio::test]
async fn redirect_uri_must_match_the_authorization_request() {
    let idp = FakeIdp::start_default().await.unwrap();
    let (verifier, challenge) = pkce();
    let cb = idp
        .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
        .unwrap();
    let reply = post(
        &idp,
        idp.token_endpoint(),
        Auth::Basic,
        &[
            ("grant_type", "authorization_code"),
            ("code", &cb.code),
            ("redirect_uri", "http://127.0.0.1:9/other"),
            ("code_verifier", &verifier),
        ],
    )
    .await;
    assert_eq!(reply.error(), "invalid_grant");
}

#[tokio::test]
async fn expired_code_and_expired_access_token() {
    let config = FakeIdpConfig::default()
        .with_code_ttl(Duration::ZERO)
        .with_access_token_ttl(Duration::ZERO);
    let idp = FakeIdp::start(config).await.unwrap();
    let (verifier, challenge) = pkce();
    let cb = idp
        .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
        .unwrap();
    let reply = exchange(&idp, &cb.code, &verifier, Auth::Basic).await;
    assert_eq!(reply.error(), "invalid_grant");

    idp.reset_counters();
    let idp = FakeIdp::start(FakeIdpConfig::default().with_access_token_ttl(Duration::ZERO))
        .await
        .unwrap();
    let body = login(&idp, "alice", "email").await.json();
    assert_eq!(body["expires_in"], 0);
    assert!(!idp.is_active(body["access_token"].as_str().unwrap()));
    assert!(idp.is_active(body["refresh_token"].as_str().unwrap()));
}

#[tokio::test]
async fn authorize_rejections() {
    let config = FakeIdpConfig::default().with_redirect_uri(Url::parse(REDIRECT).unwrap());
    let idp = FakeIdp::start(config).await.unwrap();
    let (_, challenge) = pkce();

    // Unknown client: a 400 page, no redirect.
    let mut url = authorization_url(&idp, "email", &challenge, &[]);
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "client_id" {
                "intruder".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    url.query_pairs_mut().clear().extend_pairs(pairs);
    let (status, location, page) = get(url.clone()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(location.is_none());
    assert!(page.contains("unknown client_id"));
    assert!(matches!(
        idp.authorize(&url, "alice"),
        Err(FakeIdpError::BadRequest { .. })
    ));

    // Unregistered redirect URI: a 400 page, no redirect.
    let mut url = idp.authorization_endpoint();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", idp.client_id())
        .append_pair("redirect_uri", "http://evil.example/cb")
        .append_pair("state", "s")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    let (status, location, _) = get(url).await;
    assert_eq!((status, location), (StatusCode::BAD_REQUEST, None));

    // No PKCE: an error redirect.
    let mut url = idp.authorization_endpoint();
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", idp.client_id())
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("state", "s");
    let (status, location, _) = get(url).await;
    assert_eq!(status, StatusCode::FOUND);
    let location = location.unwrap();
    assert_eq!(
        query(&location, "error").as_deref(),
        Some("invalid_request")
    );
    assert_eq!(query(&location, "state").as_deref(), Some("s"));

    // `plain` PKCE is refused.
    let url = authorization_url(&idp, "email", &challenge, &[])
        .as_str()
        .replace("code_challenge_method=S256", "code_challenge_method=plain");
    let err = idp
        .authorize(&Url::parse(&url).unwrap(), "alice")
        .unwrap_err();
    assert!(
        matches!(err, FakeIdpError::Redirected { ref error, .. } if error == "invalid_request")
    );

    // Not this IdP's endpoint.
    let mut elsewhere = authorization_url(&idp, "email", &challenge, &[]);
    elsewhere.set_path("/oauth/authorize");
    assert!(matches!(
        idp.authorize(&elsewhere, "alice"),
        Err(FakeIdpError::BadRequest { .. })
    ));
    assert_eq!(idp.counters().authorize_requests, 6);
}

#[tokio::test]
async fn deny_consent_redirects_with_access_denied() {
    let idp = FakeIdp::start_default().await.unwrap();
    idp.set_deny_consent(true);
    let (_, challenge) = pkce();
    let url = authorization_url(&idp, "email", &challenge, &[]);
    let (status, location, _) = get(url.clone()).await;
    assert_eq!(status, StatusCode::FOUND);
    let location = location.unwrap();
    assert_eq!(query(&location, "error").as_deref(), Some("access_denied"));
    assert_eq!(query(&location, "state").as_deref(), Some("st-1"));
    assert!(query(&location, "code").is_none());
    match idp.authorize(&url, "alice") {
        Err(FakeIdpError::Redirected {
            error,
            state,
            redirect_url,
            ..
        }) => {
            assert_eq!(error, "access_denied");
            assert_eq!(state.as_deref(), Some("st-1"));
            assert_eq!(
                query(&redirect_url, "error").as_deref(),
                Some("access_denied")
            );
        }
        other => panic!("expected access_denied, got {other:?}"),
    }
    idp.set_deny_consent(false);
    let cb = idp.authorize(&url, "alice").unwrap();
    assert_eq!(cb.state, "st-1");
    assert_eq!(query(&cb.redirect_url, "code"), Some(cb.code));
}

#[tokio::test]
async fn replayed_code_is_rejected_and_revokes_its_tokens() {
    let idp = FakeIdp::start_default().await.unwrap();
    let (verifier, challenge) = pkce();
    let cb = idp
        .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
        .unwrap();
    let first = exchange(&idp, &cb.code, &verifier, Auth::Basic)
        .await
        .json();
    let at = first["access_token"].as_str().unwrap();
    let rt = first["refresh_token"].as_str().unwrap();
    assert!(idp.is_active(at) && idp.is_active(rt));

    let replay = exchange(&idp, &cb.code, &verifier, Auth::Basic).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert_eq!(replay.error(), "invalid_grant");
    assert!(!idp.is_active(at));
    assert!(!idp.is_active(rt));
    assert_eq!(refresh_with(&idp, rt, &[]).await.error(), "invalid_grant");
    assert_eq!(idp.counters().code_exchanges, 2);
}

#[tokio::test]
async fn refresh_rotates() {
    let idp = FakeIdp::start_default().await.unwrap();
    let rt1 = login(&idp, "alice", "openid email")
        .await
        .str("refresh_token");
    let reply = refresh_with(&idp, &rt1, &[]).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let body = reply.json();
    let rt2 = body["refresh_token"].as_str().unwrap();
    assert_ne!(rt1, rt2);
    assert_eq!(body["scope"], "openid email");
    assert!(body["id_token"].is_string());
    assert!(!idp.is_active(&rt1));
    assert!(idp.is_active(rt2));
    assert!(idp.is_active(body["access_token"].as_str().unwrap()));
    let c = idp.counters();
    assert_eq!(
        (c.refresh_calls, c.refresh_successes, c.reuse_detected),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn reuse_of_a_rotated_refresh_token_revokes_the_family() {
    let idp = FakeIdp::start_default().await.unwrap();
    let first = login(&idp, "alice", "email").await.json();
    let at1 = first["access_token"].as_str().unwrap();
    let rt1 = first["refresh_token"].as_str().unwrap();
    let second = refresh_with(&idp, rt1, &[]).await.json();
    let at2 = second["access_token"].as_str().unwrap();
    let rt2 = second["refresh_token"].as_str().unwrap();

    let reuse = refresh_with(&idp, rt1, &[]).await;
    assert_eq!(reuse.status, StatusCode::BAD_REQUEST);
    assert_eq!(reuse.error(), "invalid_grant");
    for token in [at1, rt1, at2, rt2] {
        assert!(!idp.is_active(token), "{token} should be revoked");
    }
    assert_eq!(refresh_with(&idp, rt2, &[]).await.error(), "invalid_grant");
    let c = idp.counters();
    assert_eq!(
        (c.refresh_calls, c.refresh_successes, c.reuse_detected),
        (3, 1, 1)
    );

    // Another user's grant is untouched.
    let other = login(&idp, "bob", "email").await.str("refresh_token");
    assert!(idp.is_active(&other));
}

#[tokio::test]
async fn reuse_without_detection_only_fails() {
    let idp = FakeIdp::start(FakeIdpConfig::default().with_reuse_detection(false))
        .await
        .unwrap();
    let rt1 = login(&idp, "alice", "email").await.str("refresh_token");
    let rt2 = refresh_with(&idp, &rt1, &[]).await.str("refresh_token");
    assert_eq!(refresh_with(&idp, &rt1, &[]).await.error(), "invalid_grant");
    assert!(idp.is_active(&rt2));
    assert_eq!(idp.counters().reuse_detected, 0);
}

#[tokio::test]
async fn rotation_off_returns_no_refresh_token() {
    let idp = FakeIdp::start_default().await.unwrap();
    idp.set_rotation(false);
    let rt = login(&idp, "alice", "email").await.str("refresh_token");
    for _ in 0..2 {
        let reply = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(reply.json().get("refresh_token").is_none());
    }
    assert!(idp.is_active(&rt));
    assert_eq!(idp.counters().refresh_successes, 2);
}

#[tokio::test]
async fn omit_refresh_token() {
    let idp = FakeIdp::start(FakeIdpConfig::default().with_omit_refresh_token(true))
        .await
        .unwrap();
    let body = login(&idp, "alice", "email").await.json();
    assert!(body.get("refresh_token").is_none());
    assert!(body["access_token"].is_string());

    // Switched on later: an existing grant refreshes without rotation.
    let idp = FakeIdp::start_default().await.unwrap();
    let rt = login(&idp, "alice", "email").await.str("refresh_token");
    idp.set_omit_refresh_token(true);
    let reply = refresh_with(&idp, &rt, &[]).await;
    assert!(reply.json().get("refresh_token").is_none());
    assert!(idp.is_active(&rt));
}

#[tokio::test]
async fn refresh_with_narrower_scope() {
    let idp = FakeIdp::start_default().await.unwrap();
    let rt1 = login(&idp, "alice", "openid email drive")
        .await
        .str("refresh_token");

    let wider = refresh_with(&idp, &rt1, &[("scope", "email admin")]).await;
    assert_eq!(wider.status, StatusCode::BAD_REQUEST);
    assert_eq!(wider.error(), "invalid_scope");
    assert!(idp.is_active(&rt1), "a refused refresh consumes nothing");

    let narrow = refresh_with(&idp, &rt1, &[("scope", "email")]).await.json();
    assert_eq!(narrow["scope"], "email");
    assert!(narrow.get("id_token").is_none());
    let info = introspect(&idp, narrow["access_token"].as_str().unwrap()).await;
    assert_eq!(info["scope"], "email");
    // The grant keeps its scopes: the new refresh token can ask for all of them again.
    let rt2 = narrow["refresh_token"].as_str().unwrap();
    let full = refresh_with(&idp, rt2, &[]).await.json();
    assert_eq!(full["scope"], "openid email drive");
}

#[tokio::test]
async fn revoke_and_introspect() {
    let idp = FakeIdp::start_default().await.unwrap();
    let body = login(&idp, "alice", "email").await.json();
    let at = body["access_token"].as_str().unwrap();
    let rt = body["refresh_token"].as_str().unwrap();

    let info = introspect(&idp, rt).await;
    assert_eq!(info["active"], true);
    assert_eq!(info["sub"], "alice");
    assert_eq!(info["token_type"], "refresh_token");

    let reply = post(
        &idp,
        idp.revocation_endpoint(),
        Auth::Body,
        &[("token", at), ("token_type_hint", "access_token")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(introspect(&idp, at).await, json!({ "active": false }));
    assert!(
        idp.is_active(rt),
        "revoking an access token leaves the grant"
    );

    let second = refresh_with(&idp, rt, &[]).await.json();
    let at2 = second["access_token"].as_str().unwrap();
    let rt2 = second["refresh_token"].as_str().unwrap();
    let reply = post(
        &idp,
        idp.revocation_endpoint(),
        Auth::Basic,
        &[("token", rt2)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!idp.is_active(rt2));
    assert!(
        !idp.is_active(at2),
        "revoking a refresh token revokes the grant"
    );

    let reply = post(
        &idp,
        idp.revocation_endpoint(),
        Auth::Basic,
        &[("token", "nonsense")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(introspect(&idp, "nonsense").await["active"], false);

    let reply = post(
        &idp,
        idp.revocation_endpoint(),
        Auth::BodySecret("bad"),
        &[("token", rt)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let reply = post(
        &idp,
        idp.introspection_endpoint(),
        Auth::None,
        &[("token", rt)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    let c = idp.counters();
    assert_eq!((c.revocations, c.introspections), (4, 4));
}

#[tokio::test]
async fn server_side_revocation_of_a_user() {
    let idp = FakeIdp::start_default().await.unwrap();
    let alice = login(&idp, "alice", "email").await.str("refresh_token");
    let bob = login(&idp, "bob", "email").await.str("refresh_token");
    idp.revoke_user_grants("alice");
    assert_eq!(
        refresh_with(&idp, &alice, &[]).await.error(),
        "invalid_grant"
    );
    assert_eq!(idp.counters().reuse_detected, 0);
    assert_eq!(refresh_with(&idp, &bob, &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn client_authentication() {
    let secret = "s3cr~t+/:%x y";
    let idp = FakeIdp::start(FakeIdpConfig::default().with_client_secret(secret))
        .await
        .unwrap();
    let rt = login(&idp, "alice", "email").await.str("refresh_token");
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", rt.as_str()),
    ];

    // Basic with form-url-encoding (RFC 6749 §2.3.1), then the body method.
    let reply = post(&idp, idp.token_endpoint(), Auth::Basic, &grant).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let rt = reply.str("refresh_token");
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", rt.as_str()),
    ];
    let reply = post(&idp, idp.token_endpoint(), Auth::Body, &grant).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let rt = reply.str("refresh_token");
    let grant = [
        ("grant_type", "refresh_token"),
        ("refresh_token", rt.as_str()),
    ];

    // Failures: none of them consumes the refresh token.
    for auth in [
        Auth::RawBasic(secret),
        Auth::BodySecret("wrong"),
        Auth::None,
    ] {
        let reply = post(&idp, idp.token_endpoint(), auth, &grant).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.error(), "invalid_client");
        assert!(reply.headers.contains_key("www-authenticate"));
    }
    // Two methods at once.
    let mut both = grant.to_vec();
    both.push(("client_secret", secret));
    let reply = post(&idp, idp.token_endpoint(), Auth::Basic, &both).await;
    assert_eq!(reply.error(), "invalid_request");
    assert!(idp.is_active(&rt));
    let c = idp.counters();
    assert_eq!((c.refresh_calls, c.refresh_successes), (6, 2));
}

#[tokio::test]
async fn bad_token_requests() {
    let idp = FakeIdp::start_default().await.unwrap();
    let reply = post(
        &idp,
        idp.token_endpoint(),
        Auth::Basic,
        &[("grant_type", "password")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error(), "unsupported_grant_type");

    let reply = http()
        .post(idp.token_endpoint())
        .header("content-type", "application/json")
        .body(r#"{"grant_type":"refresh_token"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 400);

    let reply = post(
        &idp,
        idp.token_endpoint(),
        Auth::Basic,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", "rt_unknown"),
        ],
    )
    .await;
    assert_eq!(reply.error(), "invalid_grant");
    let c = idp.counters();
    assert_eq!(
        (c.token_requests, c.refresh_calls, c.refresh_successes),
        (3, 1, 0)
    );
}

/// A fresh IdP with one logged-in grant; returns its refresh token.
async fn idp_with_grant() -> (FakeIdp, String) {
    let idp = FakeIdp::start_default().await.unwrap();
    let rt = login(&idp, "alice", "email").await.str("refresh_token");
    idp.reset_counters();
    (idp, rt)
}

#[tokio::test]
async fn fault_status_pages() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::Status {
        status: 503,
        body: "<html><h1>Service Unavailable</h1></html>".into(),
        retry_after: None,
    });
    idp.inject(Fault::Status {
        status: 429,
        body: r#"{"error":"slow_down"}"#.into(),
        retry_after: Some(7),
    });
    assert_eq!(idp.pending_faults(), 2);

    let reply = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(reply.text.contains("Service Unavailable"));
    assert!(idp.is_active(&rt));

    let reply = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.headers["retry-after"], "7");
    assert_eq!(reply.error(), "slow_down");
    assert!(idp.is_active(&rt));

    assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
    let c = idp.counters();
    assert_eq!((c.refresh_calls, c.refresh_successes), (3, 1));
}

#[tokio::test]
async fn fault_bodies() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::GarbageBody);
    idp.inject(Fault::TruncatedJson);
    idp.inject(Fault::InvalidGrant);
    idp.inject(Fault::ErrorWith200 {
        error: "bad_verification_code".into(),
    });

    let garbage = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(garbage.status, StatusCode::OK);
    assert!(serde_json::from_str::<Value>(&garbage.text).is_err());

    let truncated = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(truncated.status, StatusCode::OK);
    assert_eq!(truncated.text, r#"{"access_token":"x","tok"#);
    assert!(serde_json::from_str::<Value>(&truncated.text).is_err());

    let invalid = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert_eq!(invalid.error(), "invalid_grant");
    assert!(invalid.json()["error_description"].is_string());

    let github = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(github.status, StatusCode::OK);
    assert_eq!(github.error(), "bad_verification_code");
    assert!(github.json().get("access_token").is_none());

    // None of them touched the grant.
    assert!(idp.is_active(&rt));
    assert_eq!(idp.counters().reuse_detected, 0);
    assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
    let c = idp.counters();
    assert_eq!((c.refresh_calls, c.refresh_successes), (5, 1));
}

#[tokio::test]
async fn fault_expires_in_as_string_still_rotates() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::ExpiresInAsString);
    let reply = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["expires_in"], "3600");
    assert!(idp.is_active(body["refresh_token"].as_str().unwrap()));
    assert!(!idp.is_active(&rt));
    // Only successful answers are rewritten; the next one is normal.
    let reply = refresh_with(&idp, body["refresh_token"].as_str().unwrap(), &[]).await;
    assert_eq!(reply.json()["expires_in"], 3600);
}

#[tokio::test]
async fn fault_drop_connection() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::DropConnection);
    let form = format!("grant_type=refresh_token&refresh_token={rt}");
    let result = http()
        .post(idp.token_endpoint())
        .basic_auth(idp.client_id(), Some(idp.client_secret()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await;
    let err = result.expect_err("no response expected");
    assert!(err.is_request() || err.is_connect(), "{err:?}");
    assert!(idp.is_active(&rt));
    assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
    let c = idp.counters();
    assert_eq!((c.refresh_calls, c.refresh_successes), (2, 1));
}

/// Sends a refresh request and returns the response as soon as its headers are in.
async fn refresh_headers_only(idp: &FakeIdp, rt: &str) -> reqwest::Response {
    http()
        .post(idp.token_endpoint())
        .basic_auth(idp.client_id(), Some(idp.client_secret()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("grant_type=refresh_token&refresh_token={rt}"))
        .send()
        .await
        .expect("status and headers arrive")
}

#[tokio::test]
async fn fault_slow_body_sends_headers_then_stalls() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::SlowBody {
        chunk_len: 16,
        pause: Duration::from_secs(3600),
    });
    let mut resp = refresh_headers_only(&idp, &rt).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let declared = resp.content_length().expect("Content-Length");
    let first = resp
        .chunk()
        .await
        .expect("first chunk")
        .expect("body bytes");
    assert!(first.starts_with(b"{\""), "{first:?}");
    assert!((first.len() as u64) < declared);
    // The rest waits an hour: it is not there a moment later.
    let more = tokio::time::timeout(Duration::from_millis(50), resp.chunk()).await;
    assert!(more.is_err(), "the body went on: {more:?}");
    drop(resp);

    // Counted as a refresh call, and nothing was consumed or rotated.
    let c = idp.counters();
    assert_eq!((c.refresh_calls, c.refresh_successes), (1, 0));
    assert!(idp.is_active(&rt));
    assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
    assert_eq!(idp.counters().reuse_detected, 0);
}

#[tokio::test]
async fn fault_slow_body_never_completes() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::SlowBody {
        chunk_len: 8,
        pause: Duration::from_millis(1),
    });
    let mut resp = refresh_headers_only(&idp, &rt).await;
    let declared = resp.content_length().expect("Content-Length");
    let mut got = Vec::new();
    let end = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            other => break other,
        }
    };
    assert!(end.is_err(), "the body completed: {end:?}");
    // Dribbled up to its last byte, which never comes.
    assert_eq!(got.len() as u64, declared - 1);
    assert!(serde_json::from_slice::<Value>(&got).is_err());
    assert!(idp.is_active(&rt));
    assert_eq!(idp.counters().refresh_successes, 0);
}

#[tokio::test]
async fn fault_delay_and_token_delay_answer_normally() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::Delay(Duration::from_millis(20)));
    let reply = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let rt = reply.str("refresh_token");

    idp.set_token_delay(Some(Duration::from_millis(10)));
    let reply = refresh_with(&idp, &rt, &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    idp.set_token_delay(None);
    let c = idp.counters();
    assert_eq!((c.refresh_calls, c.refresh_successes), (2, 2));
}

#[tokio::test]
async fn client_time_out_during_delay_leaves_the_grant() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject(Fault::Delay(Duration::from_secs(3600)));
    let form = format!("grant_type=refresh_token&refresh_token={rt}");
    let result = http()
        .post(idp.token_endpoint())
        .basic_auth(idp.client_id(), Some(idp.client_secret()))
        .header("content-type", "application/x-www-form-urlencoded")
        .timeout(Duration::from_millis(50))
        .body(form)
        .send()
        .await;
    assert!(result.expect_err("timed out").is_timeout());
    assert!(idp.is_active(&rt));
    assert_eq!(idp.counters().refresh_calls, 1);
}

#[tokio::test]
async fn faults_are_consumed_in_order() {
    let (idp, rt) = idp_with_grant().await;
    idp.inject_n(Fault::InvalidGrant, 2);
    idp.inject(Fault::GarbageBody);
    assert_eq!(refresh_with(&idp, &rt, &[]).await.error(), "invalid_grant");
    assert_eq!(refresh_with(&idp, &rt, &[]).await.error(), "invalid_grant");
    assert!(serde_json::from_str::<Value>(&refresh_with(&idp, &rt, &[]).await.text).is_err());
    assert_eq!(idp.pending_faults(), 0);
    idp.inject(Fault::InvalidGrant);
    idp.clear_faults();
    assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
    let c = idp.counters();
    assert_eq!(
        (c.token_requests, c.refresh_calls, c.refresh_successes),
        (4, 4, 1)
    );
}

#[tokio::test]
async fn shutdown_and_last_drop_stop_the_server() {
    let idp = FakeIdp::start_default().await.unwrap();
    let clone = idp.clone();
    clone.shutdown().await;
    let result = try_post(&idp, idp.token_endpoint(), Auth::Basic, &[]).await;
    assert!(result.is_err());

    let idp = FakeIdp::start_default().await.unwrap();
    let addr = idp.base_url();
    let addr = format!("{}:{}", addr.host_str().unwrap(), addr.port().unwrap());
    drop(idp);
    let mut refused = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        refused,
        "server still accepting after the last clone was dropped"
    );
}

#[tokio::test]
async fn debug_hides_the_secret() {
    let config = FakeIdpConfig::default().with_client_secret("very-secret-value");
    assert!(!format!("{config:?}").contains("very-secret-value"));
    let idp = FakeIdp::start(config).await.unwrap();
    let shown = format!("{idp:?}");
    assert!(!shown.contains("very-secret-value"));
    assert!(shown.contains(idp.client_id()));
}
