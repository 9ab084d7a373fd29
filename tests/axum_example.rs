//! `examples/axum_server.rs` end to end over real HTTP: the app it builds on a loopback port,
//! the in-process fake IdP behind it, and the dev caller token it prints: link through the
//! browser round trip, read the token, unlink. (The adapter's routes are tested in depth in
//! `tokenbroker-axum/tests/`.)

use reqwest::StatusCode;
use reqwest::redirect::Policy;
use tokenbroker::testing::FakeIdp;
use tokenbroker::{Realm, Secret};

#[allow(dead_code)] // `main` is the example's, not the test's.
#[path = "../examples/axum_server.rs"]
mod server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_links_reads_and_unlinks() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let idp = FakeIdp::start_default().await.unwrap();
    let upstream = (
        idp.issuer().parse().unwrap(),
        idp.client_id().to_owned(),
        Some(Secret::new(idp.client_secret())),
    );
    let redirect_uri = format!("{base}/realms/demo/broker/fake/endpoint")
        .parse()
        .unwrap();
    let (auth, alice) = server::dev_authenticator(Realm::new("demo").unwrap()).unwrap();
    let (router, _broker) = server::app("fake", upstream, redirect_uri, auth)
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let browser = reqwest::Client::builder()
        .redirect(Policy::none())
        .cookie_store(true)
        .build()
        .unwrap();
    let login = browser
        .get(format!("{base}/realms/demo/broker/fake/login"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::FOUND);
    let to_provider: url::Url = login.headers()["location"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let back = idp.authorize(&to_provider, "alice").unwrap();
    let linked = browser.get(back.redirect_url).send().await.unwrap();
    assert_eq!(linked.status(), StatusCode::OK);

    let read = browser
        .get(format!("{base}/realms/demo/broker/fake/token"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    let body: serde_json::Value = read.json().await.unwrap();
    assert!(idp.is_active(body["access_token"].as_str().unwrap()));

    let unlinked = browser
        .delete(format!("{base}/realms/demo/broker/fake/link"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(unlinked.status(), StatusCode::OK);
    let unauthenticated = browser
        .get(format!("{base}/realms/demo/broker/fake/token"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
}
