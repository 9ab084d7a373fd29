//! `examples/axum_server.rs` end to end over real HTTP: the app on a loopback port, the fake
//! IdP behind it, and callers with HS256 JWTs: link through the browser round trip, read the
//! token, be denied, be refused without a valid JWT, exchange a token, unlink.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::{Value, json};
use tokenbroker::testing::FakeIdp;
use tokenbroker::{ProviderId, Realm, TOKEN_EXCHANGE_GRANT, TokenBroker, TokenKey, TokenSet};

#[allow(dead_code)] // `main` and its helpers are the example's, not the test's.
#[path = "../examples/axum_server.rs"]
mod server;

const REALM: &str = "demo";
const ALIAS: &str = "fake";

struct App {
    base: String,
    idp: FakeIdp,
    broker: TokenBroker,
    /// Every response body the app sent, to check none carries the refresh token.
    bodies: Vec<String>,
}

async fn start() -> App {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let realm = Realm::new(REALM).unwrap();
    let alias = ProviderId::new(ALIAS).unwrap();
    let (idp, broker) =
        server::fake_idp_broker(alias.clone(), server::callback_url(addr, &realm, &alias))
            .await
            .unwrap();
    let auth = server::CallerAuth::new(server::DEV_JWT_KEY, realm);
    let router = server::app(server::AppState::new(broker.clone(), auth));
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    App {
        base: format!("http://{addr}"),
        idp,
        broker,
        bodies: Vec::new(),
    }
}

fn jwt(claims: &Value) -> String {
    server::mint_hs256(server::DEV_JWT_KEY.as_bytes(), claims)
}

fn user(name: &str) -> String {
    jwt(&server::dev_claims(
        name,
        "web-app",
        Duration::from_secs(300),
    ))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .cookie_store(true)
        .build()
        .unwrap()
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl App {
    fn url(&self, path: &str) -> String {
        format!("{}/realms/{REALM}{path}", self.base)
    }

    async fn send(&mut self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let body = response.text().await.unwrap();
        self.bodies.push(body.clone());
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn token(&mut self, bearer: Option<&str>) -> Answer {
        self.token_at(&format!("/broker/{ALIAS}/token"), bearer)
            .await
    }

    async fn token_at(&mut self, path: &str, bearer: Option<&str>) -> Answer {
        let mut request = client().get(self.url(path));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// The whole browser round trip: login → provider → callback, with the session cookie.
    async fn link(&mut self, who: &str) -> Answer {
        let browser = client();
        let login = self
            .send(
                browser
                    .get(self.url(&format!("/broker/{ALIAS}/login")))
                    .bearer_auth(user(who)),
            )
            .await;
        assert_eq!(login.status, StatusCode::FOUND, "{}", login.body);
        assert_eq!(login.header("cache-control"), "no-store");
        let cookie = login.header("set-cookie");
        assert!(cookie.starts_with("tb_login="), "{cookie}");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
            "{cookie}"
        );
        let to_provider: url::Url = login.header("location").parse().unwrap();
        let back = self.idp.authorize(&to_provider, who).unwrap();
        assert!(
            back.redirect_url
                .as_str()
                .starts_with(&self.url(&format!("/broker/{ALIAS}/endpoint?"))),
            "the provider sends the browser back to the app"
        );
        self.send(browser.get(back.redirect_url.as_str())).await
    }

    /// The tokens the broker stored for `who` (to know the refresh token to look for).
    async fn stored(&self, who: &str) -> TokenSet {
        let key = TokenKey::parse(REALM, who, ALIAS).unwrap();
        let stored = self.broker.store().load(&key).await.unwrap().unwrap();
        TokenSet::from_payload(&stored.record.payload).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_read_deny_exchange_unlink_over_http() {
    let mut app = start().await;
    let alice = user("alice");

    // Link alice.
    let linked = app.link("alice").await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
    assert_eq!(
        linked.json(),
        json!({"linked": true, "realm": REALM, "provider": ALIAS, "subject": "alice", "first_link": true})
    );
    assert!(
        linked.header("set-cookie").contains("Max-Age=0"),
        "session cookie cleared"
    );
    let stored = app.stored("alice").await;
    let refresh_token = stored
        .refresh_token()
        .expect("the fake IdP issues refresh tokens")
        .expose_secret()
        .to_owned();

    // Read: 200, Keycloak's body, not cacheable, no refresh token.
    let read = app.token(Some(&alice)).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert_eq!(read.header("cache-control"), "no-store");
    assert_eq!(read.header("pragma"), "no-cache");
    assert!(read.header("content-type").starts_with("application/json"));
    let body = read.json();
    assert_eq!(body["access_token"], stored.access_token().expose_secret());
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].as_i64().unwrap() > 3000, "{body}");
    assert!(body["id_token"].is_string());
    assert_eq!(body["not-before-policy"], 0);
    assert!(body["accessTokenExpiration"].as_i64().unwrap() > 0);
    assert!(body.get("refresh_token").is_none(), "{body}");

    // Another user reads only their own link: bob has none, and cannot tell alice's exists.
    let bob = app.token(Some(&user("bob"))).await;
    assert_eq!(bob.status, StatusCode::NOT_FOUND, "{}", bob.body);

    // Denied callers get one answer, whether or not the link exists: alice without the
    // read-token role (her link exists), carol without it (no link), alice in another realm.
    let no_role = |who: &str| {
        jwt(&json!({"sub": who, "azp": "web-app", "exp": now() + 300, "scope": "openid"}))
    };
    let denied_existing = app.token(Some(&no_role("alice"))).await;
    let denied_missing = app.token(Some(&no_role("carol"))).await;
    let other_realm = app
        .send(
            client()
                .get(format!("{}/realms/other/broker/{ALIAS}/token", app.base))
                .bearer_auth(&alice),
        )
        .await;
    assert_eq!(
        denied_existing.status,
        StatusCode::FORBIDDEN,
        "{}",
        denied_existing.body
    );
    for other in [&denied_missing, &other_realm] {
        assert_eq!(other.status, denied_existing.status);
        assert_eq!(other.body, denied_existing.body);
    }
    // An unknown provider alias is denied the same way for a denied caller...
    let denied_unknown = app
        .token_at("/broker/nope/token", Some(&no_role("alice")))
        .await;
    assert_eq!(
        (denied_unknown.status, &denied_unknown.body),
        (denied_existing.status, &denied_existing.body)
    );

    // No valid JWT: 401, and the same 401 whatever was wrong with it.
    let expired = jwt(
        &json!({"sub": "alice", "azp": "web-app", "exp": now() - 120,
        "resource_access": {"broker": {"roles": ["read-token"]}}}),
    );
    let wrong_key = server::mint_hs256(
        b"some other key",
        &server::dev_claims("alice", "web-app", Duration::from_secs(300)),
    );
    let alg_none = {
        let (_, rest) = alice.split_once('.').unwrap();
        let (payload, _) = rest.split_once('.').unwrap();
        format!("eyJhbGciOiJub25lIn0.{payload}.")
    };
    let no_exp = jwt(&json!({"sub": "alice", "azp": "web-app",
        "resource_access": {"broker": {"roles": ["read-token"]}}}));
    let tampered = {
        let mut parts: Vec<String> = alice.split('.').map(str::to_owned).collect();
        parts[1] = server::mint_hs256(
            b"x",
            &server::dev_claims("bob", "web-app", Duration::from_secs(300)),
        )
        .split('.')
        .nth(1)
        .unwrap()
        .to_owned();
        parts.join(".")
    };
    let mut unauthenticated = Vec::new();
    for bad in [
        None,
        Some("garbage"),
        Some(&*expired),
        Some(&*wrong_key),
        Some(&*alg_none),
        Some(&*no_exp),
        Some(&*tampered),
    ] {
        unauthenticated.push(app.token(bad).await);
    }
    let basic = app
        .send(
            client()
                .get(app.url(&format!("/broker/{ALIAS}/token")))
                .basic_auth("alice", Some("pw")),
        )
        .await;
    unauthenticated.push(basic);
    for answer in &unauthenticated {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
        assert_eq!(answer.header("www-authenticate"), "Bearer");
        assert_eq!(
            answer.json(),
            json!({"error": "invalid_token", "error_description": "a valid bearer token is required"})
        );
    }
    // The other routes refuse them alike.
    let login = app
        .send(
            client()
                .get(app.url(&format!("/broker/{ALIAS}/login")))
                .bearer_auth(&expired),
        )
        .await;
    let unlink = app
        .send(
            client()
                .delete(app.url(&format!("/broker/{ALIAS}/link")))
                .bearer_auth(&wrong_key),
        )
        .await;
    for answer in [&login, &unlink] {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(answer.body, unauthenticated[0].body);
    }

    // Token exchange: alice's own JWT as the subject token → the provider's access token.
    let exchange_form = |subject_token: &str| {
        vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT.to_owned()),
            ("subject_token", subject_token.to_owned()),
            (
                "subject_token_type",
                tokenbroker::ACCESS_TOKEN_TYPE.to_owned(),
            ),
            ("requested_issuer", ALIAS.to_owned()),
        ]
    };
    let exchange_url = app.url("/protocol/openid-connect/token");
    let exchanged = app
        .send(client().post(&exchange_url).form(&exchange_form(&alice)))
        .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{}", exchanged.body);
    assert_eq!(exchanged.header("cache-control"), "no-store");
    let body = exchanged.json();
    assert_eq!(body["access_token"], stored.access_token().expose_secret());
    assert_eq!(body["issued_token_type"], tokenbroker::ACCESS_TOKEN_TYPE);
    assert!(body.get("refresh_token").is_none());
    let refused = app
        .send(client().post(&exchange_url).form(&exchange_form(&expired)))
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);
    let bob_exchange = app
        .send(
            client()
                .post(&exchange_url)
                .form(&exchange_form(&user("bob"))),
        )
        .await;
    assert_eq!(
        bob_exchange.status,
        StatusCode::NOT_FOUND,
        "{}",
        bob_exchange.body
    );

    // A callback without the session cookie, or replayed, links nothing.
    let stray = app
        .send(client().get(app.url(&format!("/broker/{ALIAS}/endpoint?code=x&state=y"))))
        .await;
    assert_eq!(stray.status, StatusCode::BAD_REQUEST);
    assert_eq!(stray.json()["error"], "invalid_state");

    // Unlink: revoked upstream, deleted; then the read is the same 404 as bob's.
    let unlinked = app
        .send(
            client()
                .delete(app.url(&format!("/broker/{ALIAS}/link")))
                .bearer_auth(&alice),
        )
        .await;
    assert_eq!(unlinked.status, StatusCode::OK, "{}", unlinked.body);
    assert_eq!(
        unlinked.json(),
        json!({"deleted": true, "revocation": "revoked"})
    );
    assert!(
        !app.idp.is_active(&refresh_token),
        "the grant was revoked at the provider"
    );
    let gone = app.token(Some(&alice)).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    assert_eq!(
        gone.body, bob.body,
        "a missing link reads the same for everyone"
    );
    // ...and a denied caller still gets the same 403 as while the link existed.
    let denied_after = app.token(Some(&no_role("alice"))).await;
    assert_eq!(denied_after.body, denied_existing.body);

    // Linking again works (a fresh login, a fresh cookie).
    let relinked = app.link("alice").await;
    assert_eq!(relinked.status, StatusCode::OK, "{}", relinked.body);
    assert_eq!(app.token(Some(&alice)).await.status, StatusCode::OK);
    let new_refresh_token = app
        .stored("alice")
        .await
        .refresh_token()
        .unwrap()
        .expose_secret()
        .to_owned();

    for body in &app.bodies {
        for rt in [&refresh_token, &new_refresh_token] {
            assert!(
                !body.contains(rt.as_str()),
                "a response carried a refresh token: {body}"
            );
        }
        assert!(!body.contains("refresh_token"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_is_used_once_and_only_with_its_own_cookie() {
    let mut app = start().await;
    let browser = client();
    let login = app
        .send(
            browser
                .get(app.url(&format!("/broker/{ALIAS}/login")))
                .bearer_auth(user("alice")),
        )
        .await;
    let to_provider: url::Url = login.header("location").parse().unwrap();
    let back = app.idp.authorize(&to_provider, "alice").unwrap();

    // Another browser (no cookie) cannot complete alice's login.
    let thief = app.send(client().get(back.redirect_url.as_str())).await;
    assert_eq!(thief.status, StatusCode::BAD_REQUEST);

    let done = app.send(browser.get(back.redirect_url.as_str())).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    // The same browser replaying the callback: the login is gone.
    let replay = app.send(browser.get(back.redirect_url.as_str())).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST);
    assert_eq!(replay.json()["error"], "invalid_state");
}

/// The broker's answers go out 1:1: a provider outage is a 502 with the provider's
/// `Retry-After`; a refused consent is a 400 at the callback and links nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_reach_the_caller_as_the_broker_says() {
    let mut app = start().await;
    let alice = user("alice");
    // Access tokens that expire at once: every read needs a refresh.
    app.idp.set_access_token_ttl(Duration::ZERO);
    let linked = app.link("alice").await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
    app.idp.inject(tokenbroker::testing::Fault::Status {
        status: 503,
        body: "<h1>down</h1>".into(),
        retry_after: Some(7),
    });
    let down = app.token(Some(&alice)).await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY, "{}", down.body);
    assert_eq!(down.header("retry-after"), "7");
    assert_eq!(down.header("cache-control"), "no-store");
    assert_eq!(down.json()["error"], "temporarily_unavailable");
    assert!(
        !down.body.contains("down"),
        "the provider's page is not passed on"
    );

    // Consent refused at the provider: the callback carries error=access_denied.
    app.idp.set_deny_consent(true);
    let browser = client();
    let login = app
        .send(
            browser
                .get(app.url(&format!("/broker/{ALIAS}/login")))
                .bearer_auth(user("bob")),
        )
        .await;
    let to_provider: url::Url = login.header("location").parse().unwrap();
    let tokenbroker::testing::FakeIdpError::Redirected { redirect_url, .. } =
        app.idp.authorize(&to_provider, "bob").unwrap_err()
    else {
        panic!("expected an error redirect")
    };
    let refused = app.send(browser.get(redirect_url.as_str())).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{}", refused.body);
    assert_eq!(refused.json()["error"], "access_denied");
    assert_eq!(
        app.token(Some(&user("bob"))).await.status,
        StatusCode::NOT_FOUND
    );
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The caller's JWT, claim by claim: what becomes the `Caller`, and what is refused.
#[test]
fn caller_jwts_map_keycloak_claims_and_refuse_the_rest() {
    let auth = server::CallerAuth::new(server::DEV_JWT_KEY, Realm::new(REALM).unwrap());
    let exp = now() + 300;
    let caller = auth
        .verify(&jwt(&json!({
            "sub": "alice", "azp": "reporting", "exp": exp, "nbf": now() - 5,
            "scope": "openid read:user_idp_tokens",
            "realm_access": {"roles": ["offline_access"]},
            "resource_access": {"broker": {"roles": ["read-token"]}, "account": {"roles": ["manage-account"]}},
        })))
        .expect("a valid token");
    assert_eq!(caller.realm.as_str(), REALM);
    assert_eq!(caller.subject.as_str(), "alice");
    assert_eq!(caller.client_id, "reporting");
    assert!(caller.has_effective_role("read-token"));
    assert!(caller.has_role("offline_access"), "realm roles count");
    assert!(
        !caller.has_role("manage-account"),
        "other clients' roles do not"
    );
    assert!(caller.scopes.contains("read:user_idp_tokens"));
    // A realm role named read-token is taken too (Keycloak setups that use a realm role).
    let realm_role = auth.verify(&jwt(
        &json!({"sub": "bob", "azp": "a", "exp": exp, "realm_access": {"roles": ["read-token"]}}),
    ));
    assert!(realm_role.unwrap().has_role("read-token"));

    // Correctly MACed with the key, but the header names another algorithm.
    let signed_with = |alg: &str, claims: &Value| {
        use hmac::Mac as _;
        let input = format!(
            "{}.{}",
            base64_url(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
            base64_url(&claims.to_string())
        );
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(server::DEV_JWT_KEY.as_bytes()).unwrap();
        mac.update(input.as_bytes());
        let signature =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{input}.{signature}")
    };
    let good = json!({"sub": "alice", "azp": "a", "exp": exp});
    for (why, token) in [
        (
            "not yet valid",
            jwt(&json!({"sub": "alice", "azp": "a", "exp": exp, "nbf": now() + 600})),
        ),
        ("no sub", jwt(&json!({"azp": "a", "exp": exp}))),
        ("no azp", jwt(&json!({"sub": "alice", "exp": exp}))),
        (
            "exp as text",
            jwt(&json!({"sub": "alice", "azp": "a", "exp": exp.to_string()})),
        ),
        (
            "empty sub",
            jwt(&json!({"sub": "", "azp": "a", "exp": exp})),
        ),
        ("HS512 header", signed_with("HS512", &good)),
        ("none header", signed_with("none", &good)),
        ("four parts", format!("{}.x", jwt(&good))),
        ("empty", String::new()),
    ] {
        assert!(auth.verify(&token).is_none(), "{why}");
    }
    assert!(auth.verify(&jwt(&good)).is_some());
    assert!(
        auth.verify(&signed_with("HS256", &good)).is_some(),
        "the hand-made signature is right"
    );
    // The header must say Bearer.
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        "authorization",
        format!("Token {}", jwt(&good)).parse().unwrap(),
    );
    assert!(auth.authenticate(&headers).is_none());
    headers.insert(
        "authorization",
        format!("bearer {}", jwt(&good)).parse().unwrap(),
    );
    assert!(auth.authenticate(&headers).is_some());
}

fn base64_url(text: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}
