//! The browser test infrastructure end to end, without the adapter: a real headless Chromium
//! opens a hand-built authorization URL at the real `oidc-provider`, signs in on its login page
//! by typing, presses its consent button, and lands on a tiny axum server standing in for the
//! adapter's callback, which gets the code and the state.
//!
//! Needs Node with tests/idp's packages (`scripts/setup-idp.sh`) and Debian's chromium and
//! chromedriver (`scripts/setup-browser.sh`); without the browser it prints SKIPPED.

#[path = "support/browser.rs"]
mod browser;
#[path = "../../tests/support/oidc_provider.rs"]
mod oidc_provider;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{Query, State};
use axum::response::Html;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use url::Url;

use browser::{Browser, sign_in_at_oidc_provider};
use oidc_provider::{CLIENT_SECRET, Interactions, OidcProvider, Profile, ProviderOptions};

/// Where the adapter's callback will be; the stand-in answers on the same path.
const CALLBACK_PATH: &str = "/realms/test/broker/oidc/endpoint";

type Received = Arc<Mutex<Vec<HashMap<String, String>>>>;

async fn callback(
    State(received): State<Received>,
    Query(query): Query<HashMap<String, String>>,
) -> Html<&'static str> {
    received.lock().unwrap().push(query);
    Html("<!DOCTYPE html><title>done</title><h1>linked</h1>")
}

/// A value that differs between runs (state, PKCE verifier); uniqueness is all it needs here.
fn nonce(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{label}-{nanos:x}-{:x}-0123456789abcdefghijklmnop",
        std::process::id()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_signs_in_at_oidc_provider_and_lands_on_the_callback() {
    let started = Instant::now();
    let browser = match Browser::start().await {
        Ok(browser) => browser,
        Err(skip) => {
            skip.report("chromium_signs_in_at_oidc_provider_and_lands_on_the_callback");
            return;
        }
    };
    let browser_ready = started.elapsed();

    // The stand-in callback, bound first: its URL is registered at the provider.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect_uri: Url = format!("http://{}{CALLBACK_PATH}", listener.local_addr().unwrap())
        .parse()
        .unwrap();
    let received = Received::default();
    let app = Router::new()
        .route(CALLBACK_PATH, get(callback))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let provider = OidcProvider::start_with(
        ProviderOptions::new(Profile::Oidc, 60)
            .redirect_uri(redirect_uri.clone())
            .interactions(Interactions::Pages),
    )
    .await;

    // tests/idp/server.mjs: clients `tb-basic` and `tb-post`, PKCE (S256) required.
    let state = nonce("state");
    let verifier = nonce("verifier");
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    let mut authorization_url = provider.authorization_endpoint();
    authorization_url
        .query_pairs_mut()
        .append_pair("client_id", "tb-post")
        .append_pair("response_type", "code")
        .append_pair("scope", "openid email")
        .append_pair("redirect_uri", redirect_uri.as_str())
        .append_pair("state", &state)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");

    let sign_in_started = Instant::now();
    browser.goto(authorization_url.as_str()).await;
    // The login page is the provider's, not a redirect straight back.
    browser.wait_for("form input[name=login]").await;
    let landed = sign_in_at_oidc_provider(&browser, "carol", "any-password").await;
    assert!(
        landed.as_str().starts_with(redirect_uri.as_str()),
        "landed at {landed}, not the callback {redirect_uri}; {}",
        browser.describe().await
    );
    browser.wait_for_text("linked").await;
    let sign_in = sign_in_started.elapsed();

    let calls = received.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "the callback was called {calls:?}");
    let query = &calls[0];
    assert_eq!(query.get("state"), Some(&state), "{query:?}");
    let code = query
        .get("code")
        .unwrap_or_else(|| panic!("no code in {query:?}"));
    assert!(!code.is_empty());
    assert_eq!(
        query.get("iss").map(String::as_str),
        Some(provider.issuer().as_str().trim_end_matches('/')),
        "RFC 9207 iss: {query:?}"
    );

    // The code is the real thing: the provider exchanges it, for the account typed in.
    let token: serde_json::Value = reqwest::Client::new()
        .post(provider.token_endpoint())
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
            ("code_verifier", verifier.as_str()),
            ("client_id", "tb-post"),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id_token = token["id_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no id_token in {token}"));
    let payload = id_token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["sub"], "carol", "{claims}");
    assert_eq!(provider.counters().await.code_exchanges, 1);

    // Again in the same browser: the provider's session and the grant skip both pages, and
    // the helper copes with landing straight on the callback.
    let again_state = nonce("again");
    let mut again = authorization_url.clone();
    again.query_pairs_mut().clear();
    for (name, value) in authorization_url.query_pairs() {
        let value = if name == "state" {
            again_state.clone()
        } else {
            value.into_owned()
        };
        again.query_pairs_mut().append_pair(&name, &value);
    }
    browser.goto(again.as_str()).await;
    let landed = sign_in_at_oidc_provider(&browser, "carol", "any-password").await;
    assert!(
        landed.as_str().starts_with(redirect_uri.as_str()),
        "landed at {landed}; {}",
        browser.describe().await
    );
    browser.wait_for_text("linked").await;
    let calls = received.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "the callback was called {calls:?}");
    assert_eq!(calls[1].get("state"), Some(&again_state), "{:?}", calls[1]);
    assert!(calls[1].contains_key("code"), "{:?}", calls[1]);

    browser.close().await;
    // Straight to stderr (uncaptured): the timings show in a plain `cargo test` run.
    let _ = writeln!(
        std::io::stderr(),
        "browser smoke: Chromium ready in {browser_ready:.1?}, first sign-in to callback in {sign_in:.1?}, whole test {:.1?}",
        started.elapsed()
    );
}
