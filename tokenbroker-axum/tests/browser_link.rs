//! The whole link in a real browser: headless Chromium on the host's page → the adapter's
//! login route → `oidc-provider`'s real login and consent pages (typing, pressing buttons) →
//! the redirect back → the host's page reads the user's token through the adapter; then the
//! user unlinks.
//!
//! The host is served on `localhost` and the provider on `127.0.0.1`: two sites, so the
//! provider's redirect back is a cross-site navigation, and the session cookie has to survive
//! it (`SameSite=Lax`; `Strict` would lose the login here, which is what this test is for).
//!
//! Needs Node with tests/idp's packages (`scripts/setup-idp.sh`) and Debian's chromium and
//! chromedriver (`scripts/setup-browser.sh`, run by `scripts/test.sh`); without the browser it
//! prints SKIPPED (or fails, with `TOKENBROKER_REQUIRE_BROWSER=1`).

#[path = "support/app.rs"]
mod app;
#[path = "support/browser.rs"]
mod browser;
#[path = "../../tests/support/oidc_provider.rs"]
mod oidc_provider;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::response::Html;
use axum::routing::get;
use browser::{Browser, sign_in_at_oidc_provider};
use oidc_provider::{CLIENT_SECRET, Interactions, OidcProvider, Profile, ProviderOptions};
use tokenbroker::{GrantStatus, MemoryStore, TokenKey, TokenSet, TokenStore};
use tokenbroker_axum::broker_router;

const ALIAS: &str = "oidc";

/// The host's page: a button that starts the link with the user's bearer token (a page can
/// send one with `fetch`; a navigation cannot), then navigates to the provider.
fn home_page(token: &str) -> String {
    format!(
        r#"<!DOCTYPE html><title>host</title>
<button id="link">Link your account</button>
<script>
const TOKEN = "{token}";
document.getElementById("link").onclick = async () => {{
  const r = await fetch("/realms/{realm}/broker/{ALIAS}/login?return_to=%2Fdone", {{
    method: "POST", headers: {{ Authorization: "Bearer " + TOKEN }} }});
  const body = await r.json();
  location.href = body.authorization_url;
}};
</script>"#,
        realm = app::REALM
    )
}

/// Where the adapter sends the browser back: shows the link's status and the user's token, as
/// the token route answers them, and offers to unlink.
fn done_page(token: &str) -> String {
    format!(
        r#"<!DOCTYPE html><title>done</title>
<p id="status">loading</p><pre id="token"></pre>
<button id="unlink">Unlink</button><p id="unlinked"></p>
<script>
const TOKEN = "{token}";
const base = "/realms/{realm}/broker/{ALIAS}";
const auth = {{ headers: {{ Authorization: "Bearer " + TOKEN }} }};
(async () => {{
  const status = await (await fetch(base + "/link", auth)).json();
  document.getElementById("status").textContent =
    "state=" + status.state + " account=" + (status.account && status.account.subject);
  const tokens = await (await fetch(base + "/token", auth)).json();
  document.getElementById("token").textContent = "access_token=" + tokens.access_token;
}})();
document.getElementById("unlink").onclick = async () => {{
  const r = await fetch(base + "/link", {{ method: "DELETE", ...auth }});
  const body = await r.json();
  document.getElementById("unlinked").textContent = "unlinked deleted=" + body.deleted;
}};
</script>"#,
        realm = app::REALM
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_links_reads_and_unlinks_in_a_real_browser() {
    let started = Instant::now();
    let browser = match Browser::start().await {
        Ok(browser) => browser,
        Err(skip) => {
            skip.report("a_user_links_reads_and_unlinks_in_a_real_browser");
            return;
        }
    };

    // The host, bound first: the provider must know its redirect URI.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let base = format!("http://localhost:{port}");
    let redirect_uri = app::callback_url(&base, ALIAS);
    let provider = OidcProvider::start_with(
        ProviderOptions::new(Profile::Oidc, 300)
            .redirect_uri(redirect_uri.clone())
            .interactions(Interactions::Pages),
    )
    .await;
    let store: Arc<dyn TokenStore> = Arc::new(MemoryStore::new());
    let broker = app::broker(
        &provider.issuer(),
        ALIAS,
        "tb-post",
        CLIENT_SECRET,
        redirect_uri,
        store.clone(),
    )
    .await;

    // The host app: its own pages, and the adapter mounted beside them.
    let user_token = app::user("alice");
    let (home, done) = (home_page(&user_token), done_page(&user_token));
    let host = Router::new()
        .route("/", get(move || async move { Html(home) }))
        .route("/done", get(move || async move { Html(done) }))
        .merge(
            broker_router(broker.clone(), app::authenticator())
                .secure_cookie(false) // plain HTTP on loopback
                .build(tower_sessions::MemoryStore::default()),
        );
    app::serve(listener, host);

    let flow_started = Instant::now();
    browser.goto(&format!("{base}/")).await;
    browser.click("#link").await;
    // oidc-provider's own login page: type the user and password, press Sign-in, then Continue.
    browser.wait_for("form input[name=login]").await;
    let landed = sign_in_at_oidc_provider(&browser, "alice", "correct horse").await;
    assert!(
        landed.as_str().starts_with(&format!("{base}/")),
        "landed at {landed}; {}",
        browser.describe().await
    );
    browser.wait_for_text("access_token=").await;
    let flow = flow_started.elapsed();
    let url = browser.current_url().await;
    assert_eq!(url.path(), "/done", "{}", browser.describe().await);
    assert!(url.query().is_none(), "no error on the way back: {url}");

    // What the page shows is what the broker holds, and the provider says it is live.
    let key = TokenKey::parse(app::REALM, "alice", ALIAS).unwrap();
    let stored = store.load(&key).await.unwrap().expect("the link is stored");
    let set = TokenSet::from_payload(&stored.record.payload).unwrap();
    let access_token = set.access_token().expose_secret().to_owned();
    let text = browser.page_text().await;
    assert!(
        text.contains(&format!("access_token={access_token}")),
        "{}",
        browser.describe().await
    );
    assert!(text.contains("state=active account=alice"), "{text}");
    assert!(provider.is_active(&access_token).await);
    assert_eq!(set.account().map(|a| a.subject.as_str()), Some("alice"));

    // The session cookie as the browser kept it.
    let cookies = browser.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c.name() == tokenbroker_axum::DEFAULT_COOKIE_NAME)
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(
        session.same_site().map(|s| format!("{s:?}")).as_deref(),
        Some("Lax")
    );

    // Unlink from the page: deleted here, revoked upstream.
    browser.click("#unlink").await;
    browser.wait_for_text("unlinked deleted=true").await;
    assert_eq!(broker.status(&key).await.unwrap(), GrantStatus::NotLinked);
    assert!(!provider.is_active(&access_token).await, "revoked upstream");

    browser.close().await;
    let line = format!(
        "browser link test: {:.1} s in all, {:.1} s from the host's page to the token shown",
        started.elapsed().as_secs_f64(),
        flow.as_secs_f64()
    );
    println!("{line}");
    eprintln!("{line}");
}
