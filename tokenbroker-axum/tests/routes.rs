//! The adapter's routes over real HTTP: the app on a loopback port, the in-process fake IdP
//! behind the broker, callers with ES256 JWTs from the host's IdP.

#[path = "support/app.rs"]
mod app;

use std::sync::Arc;

use app::{REALM, callback_url, claims, sign, user};
use reqwest::StatusCode;
use reqwest::redirect::Policy;
use serde_json::{Value, json};
use tokenbroker::testing::FakeIdp;
use tokenbroker::{MemoryStore, TOKEN_EXCHANGE_GRANT, TokenBroker, TokenStore};
use tokenbroker_axum::broker_router;
use url::Url;

const ALIAS: &str = "fake";

/// One adapter instance.
struct Instance {
    base: String,
}

struct World {
    idp: FakeIdp,
    a: Instance,
    b: Instance,
    broker_a: TokenBroker,
}

/// Two adapter instances (two routers, two brokers) sharing one token store and one session
/// store, as two servers behind a load balancer; the provider's redirect URI names instance A.
async fn world() -> World {
    let idp = FakeIdp::start_default().await.unwrap();
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let sessions = tower_sessions::MemoryStore::default();
    let (listener_a, base_a) = app::listener().await;
    let (listener_b, base_b) = app::listener().await;
    let mut brokers = Vec::new();
    for (listener, base) in [(listener_a, &base_a), (listener_b, &base_b)] {
        let broker = app::broker(
            &idp.issuer().parse().unwrap(),
            ALIAS,
            idp.client_id(),
            idp.client_secret(),
            callback_url(&base_a, ALIAS),
            store.clone(),
        )
        .await;
        let router = broker_router(broker.clone(), app::authenticator())
            .secure_cookie(false)
            .build(sessions.clone());
        app::serve(listener, router);
        brokers.push(broker);
        let _ = base;
    }
    World {
        idp,
        a: Instance { base: base_a },
        b: Instance { base: base_b },
        broker_a: brokers.remove(0),
    }
}

#[derive(Debug)]
struct Got {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Got {
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

/// A browser: keeps cookies, does not follow redirects (the test follows them).
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .cookie_store(true)
        .build()
        .unwrap()
}

async fn send(request: reqwest::RequestBuilder) -> Got {
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    Got {
        status,
        headers,
        body: response.text().await.unwrap(),
    }
}

impl Instance {
    fn url(&self, path: &str) -> String {
        format!("{}/realms/{REALM}{path}", self.base)
    }
    async fn get(&self, path: &str, bearer: Option<&str>) -> Got {
        let mut request = browser().get(self.url(path));
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        send(request).await
    }
}

impl World {
    /// Starts a link on instance A in `browser`: the provider URL the browser is sent to.
    async fn start_link(&self, browser: &reqwest::Client, who: &str, query: &str) -> Url {
        let login = send(
            browser
                .get(self.a.url(&format!("/broker/{ALIAS}/login{query}")))
                .bearer_auth(user(who)),
        )
        .await;
        assert_eq!(login.status, StatusCode::FOUND, "{}", login.body);
        assert_eq!(login.header("cache-control"), "no-store");
        let cookie = login.header("set-cookie");
        assert!(cookie.starts_with("tokenbroker.sid="), "{cookie}");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
            "{cookie}"
        );
        login.header("location").parse().unwrap()
    }

    /// The whole round trip on instance A: login → provider → redirect back.
    async fn link(&self, who: &str) -> Got {
        let browser = browser();
        let to_provider = self.start_link(&browser, who, "").await;
        let back = self.idp.authorize(&to_provider, who).unwrap();
        send(browser.get(back.redirect_url.as_str())).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_read_status_exchange_unlink() {
    let w = world().await;
    let linked = w.link("alice").await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
    let body = linked.json();
    assert_eq!(body["provider"], ALIAS);
    assert_eq!(body["first_link"], true);
    assert_eq!(body["account"]["subject"], "alice", "{body}");
    assert!(
        !linked.body.contains("access_token"),
        "no token in the link answer"
    );

    let alice = user("alice");
    let read =
        w.a.get(&format!("/broker/{ALIAS}/token"), Some(&alice))
            .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    assert_eq!(read.header("cache-control"), "no-store");
    let token = read.json()["access_token"].as_str().unwrap().to_owned();
    assert!(w.idp.is_active(&token));
    assert!(read.json().get("refresh_token").is_none());

    let status =
        w.b.get(&format!("/broker/{ALIAS}/link"), Some(&alice))
            .await;
    assert_eq!(status.status, StatusCode::OK, "{}", status.body);
    assert_eq!(status.json()["state"], "active");
    assert_eq!(status.json()["account"]["subject"], "alice");
    assert!(!status.body.contains(&token));

    let form = [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", alice.as_str()),
        ("requested_issuer", ALIAS),
    ];
    let exchanged = send(
        browser()
            .post(w.b.url("/protocol/openid-connect/token"))
            .form(&form),
    )
    .await;
    assert_eq!(exchanged.status, StatusCode::OK, "{}", exchanged.body);
    assert_eq!(exchanged.json()["access_token"], token.as_str());

    let unlinked = send(
        browser()
            .delete(w.a.url(&format!("/broker/{ALIAS}/link")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(unlinked.status, StatusCode::OK, "{}", unlinked.body);
    assert_eq!(unlinked.json()["deleted"], true);
    assert_eq!(unlinked.json()["revocation"], "revoked");
    assert!(!w.idp.is_active(&token), "revoked upstream");
    let gone =
        w.a.get(&format!("/broker/{ALIAS}/token"), Some(&alice))
            .await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND, "{}", gone.body);
    let not_linked =
        w.a.get(&format!("/broker/{ALIAS}/link"), Some(&alice))
            .await;
    assert_eq!(not_linked.status, StatusCode::NOT_FOUND);
    let again = send(
        browser()
            .delete(w.a.url(&format!("/broker/{ALIAS}/link")))
            .bearer_auth(&alice),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

/// A login started on instance A completes on instance B: the pending login is in the shared
/// session store, not in A's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_started_on_one_instance_completes_on_another() {
    let w = world().await;
    let browser = browser();
    let to_provider = w.start_link(&browser, "alice", "").await;
    let back = w.idp.authorize(&to_provider, "alice").unwrap();
    // The same path and query, on instance B.
    let on_b = format!(
        "{}{}?{}",
        w.b.base,
        back.redirect_url.path(),
        back.redirect_url.query().unwrap()
    );
    let linked = send(browser.get(on_b)).await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
    let read =
        w.a.get(&format!("/broker/{ALIAS}/token"), Some(&user("alice")))
            .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
}

/// The redirect back is single-use, tied to the browser that started the login, and checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redirect_back_is_single_use_and_bound_to_the_browser() {
    let w = world().await;
    let started_in = browser();
    let to_provider = w.start_link(&started_in, "alice", "").await;
    let back = w.idp.authorize(&to_provider, "alice").unwrap();

    // Another browser (no session cookie) presenting the same callback: refused, nothing used.
    let stranger = send(browser().get(back.redirect_url.as_str())).await;
    assert_eq!(
        stranger.status,
        StatusCode::BAD_REQUEST,
        "{}",
        stranger.body
    );
    assert_eq!(stranger.json()["error"], "invalid_state");
    assert_eq!(stranger.header("cache-control"), "no-store");

    // A forged state in the right browser: refused, and the real login is still there.
    let mut forged = back.redirect_url.clone();
    forged.set_query(Some(&format!("code={}&state=forged", back.code)));
    let forged = send(started_in.get(forged.as_str())).await;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST, "{}", forged.body);

    let no_state = send(started_in.get(w.a.url(&format!("/broker/{ALIAS}/endpoint?code=x")))).await;
    assert_eq!(no_state.status, StatusCode::BAD_REQUEST);
    assert_eq!(no_state.json()["error"], "invalid_state");

    let linked = send(started_in.get(back.redirect_url.as_str())).await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
    // Replayed: the login was taken out of the session when it was used.
    let replay = send(started_in.get(back.redirect_url.as_str())).await;
    assert_eq!(replay.status, StatusCode::BAD_REQUEST, "{}", replay.body);
    assert_eq!(replay.json()["error"], "invalid_state");
    assert_eq!(
        w.idp.counters().code_exchanges,
        1,
        "the code was redeemed once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_to_sends_the_browser_back_to_a_local_path_only() {
    let w = world().await;
    let browser = browser();
    let to_provider = w
        .start_link(&browser, "alice", "?return_to=%2Fsettings%3Ftab%3Dlinks")
        .await;
    let back = w.idp.authorize(&to_provider, "alice").unwrap();
    let done = send(browser.get(back.redirect_url.as_str())).await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(done.header("location"), "/settings?tab=links");

    // A refusal at the provider comes back to the same page with the error's code.
    w.idp.set_deny_consent(true);
    let to_provider = w
        .start_link(&browser, "bob", "?return_to=%2Fsettings")
        .await;
    let redirect_url = match w.idp.authorize(&to_provider, "bob") {
        Err(tokenbroker::testing::FakeIdpError::Redirected { redirect_url, .. }) => redirect_url,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let refused = send(browser.get(redirect_url.as_str())).await;
    assert_eq!(refused.status, StatusCode::SEE_OTHER, "{}", refused.body);
    assert_eq!(refused.header("location"), "/settings?error=access_denied");

    for bad in [
        "https%3A%2F%2Fevil.example%2F",
        "%2F%2Fevil.example",
        "settings",
    ] {
        let login = send(
            browser
                .get(w.a.url(&format!("/broker/{ALIAS}/login?return_to={bad}")))
                .bearer_auth(user("alice")),
        )
        .await;
        assert_eq!(
            login.status,
            StatusCode::BAD_REQUEST,
            "{bad}: {}",
            login.body
        );
        assert_eq!(login.json()["error"], "invalid_request");
    }
}

/// A page holding a bearer token starts the link with `POST` and navigates to the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_login_answers_the_authorization_url() {
    let w = world().await;
    let browser = browser();
    let started = send(
        browser
            .post(w.a.url(&format!("/broker/{ALIAS}/login?scope=openid%20email")))
            .bearer_auth(user("alice")),
    )
    .await;
    assert_eq!(started.status, StatusCode::OK, "{}", started.body);
    assert_eq!(started.header("cache-control"), "no-store");
    let url: Url = started.json()["authorization_url"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let back = w.idp.authorize(&url, "alice").unwrap();
    let linked = send(browser.get(back.redirect_url.as_str())).await;
    assert_eq!(linked.status, StatusCode::OK, "{}", linked.body);
}

/// Every route refuses a request without a valid caller with one and the same `401`, whatever
/// was wrong with the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_caller_gets_the_same_401() {
    let w = world().await;
    w.link("alice").await;
    let good = claims("alice", true);
    let with = |name: &str, value: Value| {
        let mut c = good.clone();
        c[name] = value;
        sign(&c)
    };
    let expired = with("exp", json!(app::now() - 3600));
    let not_yet = with("nbf", json!(app::now() + 3600));
    let wrong_issuer = with("iss", json!("https://evil.example/realms/demo"));
    let wrong_audience = with("aud", json!("someone-else"));
    let alg_none = {
        let payload = user("alice").split('.').nth(1).unwrap().to_owned();
        format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.")
    };
    // HS256 "signed" with the public key's bytes: the classic RS/HS confusion.
    let hs_with_public_key = {
        use p256::pkcs8::EncodePublicKey;
        let pem = app::caller_key()
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("host-1".into());
        jsonwebtoken::encode(
            &header,
            &good,
            &jsonwebtoken::EncodingKey::from_secret(pem.as_bytes()),
        )
        .unwrap()
    };
    let other_key = {
        use p256::pkcs8::EncodePrivateKey;
        let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("host-1".into());
        jsonwebtoken::encode(
            &header,
            &good,
            &jsonwebtoken::EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes()),
        )
        .unwrap()
    };
    let bad_tokens = [
        None,
        Some("garbage".to_owned()),
        Some(expired),
        Some(not_yet),
        Some(wrong_issuer),
        Some(wrong_audience),
        Some(alg_none),
        Some(hs_with_public_key),
        Some(other_key),
    ];
    let mut answers = Vec::new();
    for token in &bad_tokens {
        let t = token.as_deref();
        answers.push(w.a.get(&format!("/broker/{ALIAS}/token"), t).await);
        answers.push(w.a.get(&format!("/broker/{ALIAS}/link"), t).await);
        answers.push(w.a.get(&format!("/broker/{ALIAS}/login"), t).await);
        let mut delete = browser().delete(w.a.url(&format!("/broker/{ALIAS}/link")));
        if let Some(t) = t {
            delete = delete.bearer_auth(t);
        }
        answers.push(send(delete).await);
        if let Some(t) = t {
            let form = [
                ("grant_type", TOKEN_EXCHANGE_GRANT),
                ("subject_token", t),
                ("requested_issuer", ALIAS),
            ];
            answers.push(
                send(
                    browser()
                        .post(w.a.url("/protocol/openid-connect/token"))
                        .form(&form),
                )
                .await,
            );
        }
    }
    let first = &answers[0];
    assert_eq!(first.status, StatusCode::UNAUTHORIZED, "{}", first.body);
    assert_eq!(first.header("www-authenticate"), "Bearer");
    assert_eq!(first.header("cache-control"), "no-store");
    assert_eq!(
        first.json(),
        json!({"error": "invalid_token", "error_description": "a valid bearer token is required"})
    );
    for answer in &answers {
        assert_eq!(
            (answer.status, &answer.body),
            (first.status, &first.body),
            "{answer:?}"
        );
    }
    // Nothing was unlinked by all that.
    let read =
        w.a.get(&format!("/broker/{ALIAS}/token"), Some(&user("alice")))
            .await;
    assert_eq!(read.status, StatusCode::OK);
}

/// A denied caller learns nothing about whether a link exists: the same bytes either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_is_indistinguishable_from_absent() {
    let w = world().await;
    w.link("alice").await;
    let no_role = |who: &str| sign(&claims(who, false));
    let denied_existing =
        w.a.get(&format!("/broker/{ALIAS}/token"), Some(&no_role("alice")))
            .await;
    let denied_missing =
        w.a.get(&format!("/broker/{ALIAS}/token"), Some(&no_role("carol")))
            .await;
    let denied_unknown_provider = w.a.get("/broker/nope/token", Some(&no_role("alice"))).await;
    let other_realm = send(
        browser()
            .get(format!("{}/realms/other/broker/{ALIAS}/token", w.a.base))
            .bearer_auth(user("alice")),
    )
    .await;
    assert_eq!(
        denied_existing.status,
        StatusCode::FORBIDDEN,
        "{}",
        denied_existing.body
    );
    for other in [&denied_missing, &denied_unknown_provider, &other_realm] {
        assert_eq!(
            (other.status, &other.body),
            (denied_existing.status, &denied_existing.body)
        );
        assert_eq!(other.header("cache-control"), "no-store");
    }
    // The same through the token exchange.
    let exchange_url = w.a.url("/protocol/openid-connect/token");
    let exchange = |token: String, alias: &'static str| {
        let url = exchange_url.clone();
        async move {
            let form = [
                ("grant_type", TOKEN_EXCHANGE_GRANT.to_owned()),
                ("subject_token", token),
                ("requested_issuer", alias.to_owned()),
            ];
            send(browser().post(url).form(&form)).await
        }
    };
    let ex_existing = exchange(no_role("alice"), ALIAS).await;
    let ex_missing = exchange(no_role("carol"), ALIAS).await;
    assert_eq!(ex_existing.status, StatusCode::FORBIDDEN);
    assert_eq!(ex_existing.body, ex_missing.body);
    assert_eq!(ex_existing.body, denied_existing.body);
    // The owner's own routes in another realm are refused too.
    let status_other_realm = send(
        browser()
            .get(format!("{}/realms/other/broker/{ALIAS}/link", w.a.base))
            .bearer_auth(user("alice")),
    )
    .await;
    assert_eq!(status_other_realm.status, StatusCode::FORBIDDEN);
}

/// Malformed input gets a typed `400`, not a `500` or a silent success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_400s() {
    let w = world().await;
    w.link("alice").await;
    let alice = user("alice");
    let bad_alias = w.a.get("/broker/Bad%20Alias/token", Some(&alice)).await;
    assert_eq!(
        bad_alias.status,
        StatusCode::BAD_REQUEST,
        "{}",
        bad_alias.body
    );
    assert_eq!(bad_alias.json()["error"], "invalid_request");
    let unknown_provider = w.a.get("/broker/nope/login", Some(&alice)).await;
    assert_eq!(
        unknown_provider.status,
        StatusCode::NOT_FOUND,
        "{}",
        unknown_provider.body
    );

    let exchange_url = w.a.url("/protocol/openid-connect/token");
    let not_a_form = send(
        browser()
            .post(&exchange_url)
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(not_a_form.status, StatusCode::BAD_REQUEST);
    assert_eq!(not_a_form.json()["error"], "invalid_request");
    let other_grant = send(browser().post(&exchange_url).form(&[
        ("grant_type", "password"),
        ("subject_token", alice.as_str()),
    ]))
    .await;
    assert_eq!(other_grant.status, StatusCode::BAD_REQUEST);
    assert_eq!(other_grant.json()["error"], "unsupported_grant_type");
    let no_subject_token = send(browser().post(&exchange_url).form(&[
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("requested_issuer", ALIAS),
    ]))
    .await;
    assert_eq!(no_subject_token.status, StatusCode::BAD_REQUEST);
    let no_issuer = send(browser().post(&exchange_url).form(&[
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", alice.as_str()),
    ]))
    .await;
    assert_eq!(no_issuer.status, StatusCode::BAD_REQUEST);
    let repeated = send(
        browser()
            .post(&exchange_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "grant_type={}&subject_token={alice}&requested_issuer={ALIAS}&requested_issuer=x",
                url::form_urlencoded::byte_serialize(TOKEN_EXCHANGE_GRANT.as_bytes())
                    .collect::<String>()
            )),
    )
    .await;
    assert_eq!(
        repeated.status,
        StatusCode::BAD_REQUEST,
        "{}",
        repeated.body
    );
    let wrong_scope = send(browser().post(&exchange_url).form(&[
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", alice.as_str()),
        ("requested_issuer", ALIAS),
        ("scope", "admin"),
    ]))
    .await;
    assert_eq!(wrong_scope.status, StatusCode::BAD_REQUEST);
    assert_eq!(wrong_scope.json()["error"], "invalid_scope");
    // Still linked, still readable.
    let read =
        w.a.get(&format!("/broker/{ALIAS}/token"), Some(&alice))
            .await;
    assert_eq!(read.status, StatusCode::OK);
    let _ = &w.broker_a;
}

/// The host's IdP rotates its signing key: tokens under the new `kid` are accepted after one
/// re-fetch of the JWKS, and tokens under the retired key are refused with the same `401`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_caller_key_is_picked_up_from_the_jwks() {
    let idp = FakeIdp::start_default().await.unwrap();
    let (old_key, old_jwk) = app::new_key("k1");
    let (new_key, new_jwk) = app::new_key("k2");
    let jwks = app::JwksServer::start(json!({ "keys": [old_jwk] })).await;
    let auth = tokenbroker_axum::JwtAuthenticator::builder(app::ISSUER, app::AUDIENCE)
        .jwks_url(jwks.url.clone())
        .realm(tokenbroker::Realm::new(REALM).unwrap())
        .client_roles_of(app::AUDIENCE)
        .build()
        .unwrap();
    let (listener, base) = app::listener().await;
    let broker = app::broker(
        &idp.issuer().parse().unwrap(),
        ALIAS,
        idp.client_id(),
        idp.client_secret(),
        callback_url(&base, ALIAS),
        Arc::new(MemoryStore::new()),
    )
    .await;
    app::serve(
        listener,
        broker_router(broker, auth)
            .secure_cookie(false)
            .build(tower_sessions::MemoryStore::default()),
    );
    let status = |token: String| {
        let url = format!("{base}/realms/{REALM}/broker/{ALIAS}/link");
        async move { send(browser().get(url).bearer_auth(token)).await }
    };
    // Authenticated (no link yet: 404, not 401) with the current key.
    let before = status(app::sign_with(&old_key, "k1", &claims("alice", true))).await;
    assert_eq!(before.status, StatusCode::NOT_FOUND, "{}", before.body);
    assert_eq!(jwks.fetches(), 1);

    jwks.publish(json!({ "keys": [new_jwk] }));
    let rotated = status(app::sign_with(&new_key, "k2", &claims("alice", true))).await;
    assert_eq!(rotated.status, StatusCode::NOT_FOUND, "{}", rotated.body);
    assert_eq!(jwks.fetches(), 2, "one re-fetch for the unknown kid");

    // A token under a kid nobody published is refused with the uniform 401, and asks the IdP
    // for nothing: re-fetches for unknown kids are limited to one a minute.
    let (stranger, _) = app::new_key("k3");
    let refused = status(app::sign_with(&stranger, "k3", &claims("alice", true))).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.body);
    assert_eq!(refused.header("www-authenticate"), "Bearer");
    assert_eq!(jwks.fetches(), 2);
}
