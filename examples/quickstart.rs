//! The whole story on embedded defaults: link an account, read its token, let it expire,
//! read again (the broker refreshes and rotates), watch a caller without the role be denied,
//! and unlink.
//!
//! Runs with no network and no services:
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! The provider is `FakeProvider` (feature `testing`), a strict in-process IdP; the store is a
//! `MemoryStore`; time is a `ManualClock`, so "an hour later" takes no time.

use std::sync::Arc;
use std::time::Duration;

use tokenbroker::endpoints;
use tokenbroker::testing::{FakeProvider, ManualClock};
use tokenbroker::{Caller, LoginOptions, MemoryStore, ProviderPolicy, TokenBroker, TokenKey};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let clock = Arc::new(ManualClock::starting_now());
    let idp = Arc::new(FakeProvider::new("google")?);
    let broker = TokenBroker::builder()
        .with_provider(idp.clone(), ProviderPolicy::default())
        .with_store(Arc::new(MemoryStore::with_clock(clock.clone())))
        .with_clock(clock.clone())
        .build()?;
    let key = TokenKey::parse("acme", "alice", "google")?;

    println!("1. link: alice signs in to the provider");
    let start = broker.begin_login(&key, LoginOptions::default()).await?;
    println!(
        "   authorization URL: {}",
        redact_query(&start.authorization_url)
    );
    let callback = idp.approve(&start.authorization_url, "alice")?; // the browser's round trip
    let linked = broker.complete_login(start.pending, &callback).await?;
    println!(
        "   linked {} (first link: {}), token set: {:?}",
        linked.key, linked.first_link, linked.tokens
    );

    println!("2. read: the app asks for alice's token on her behalf");
    let alice = Caller::new(key.realm.clone(), key.subject.clone(), "web-app")
        .with_role("read-token")
        .with_full_client_scope();
    let read = endpoints::read_tokens(&broker, Some(&alice), "acme", "google").await;
    println!("   GET /realms/acme/broker/google/token -> {}", read.status);
    let body = read.json().unwrap_or_default();
    println!(
        "   expires_in={} token_type={} scope={:?}",
        body["expires_in"], body["token_type"], body["scope"]
    );

    println!("3. an hour passes: the access token expires");
    clock.advance(Duration::from_secs(3601));

    println!(
        "4. read again: the broker refreshes first, and the provider rotates the refresh token"
    );
    let got = broker.retrieve(&alice, &key).await?;
    let rotated = got.tokens.refresh_token().map(|r| r.expose_secret())
        != linked.tokens.refresh_token().map(|r| r.expose_secret());
    println!(
        "   refreshed: {}, refresh token rotated: {}, provider refresh calls: {}",
        got.refreshed,
        rotated,
        idp.counters().refresh_calls
    );

    println!("5. bob's app has no read-token role: denied, and told nothing more");
    let bob = Caller::new(key.realm.clone(), "bob".parse()?, "other-app");
    let denied = endpoints::read_tokens(&broker, Some(&bob), "acme", "google").await;
    println!(
        "   -> {} {}",
        denied.status,
        String::from_utf8_lossy(&denied.body)
    );

    println!("6. unlink: revoke upstream, then delete");
    let outcome = broker.unlink(&key).await?;
    println!(
        "   revocation: {:?}, deleted: {}",
        outcome.revocation, outcome.deleted
    );
    let gone = endpoints::read_tokens(&broker, Some(&alice), "acme", "google").await;
    println!("   read after unlink -> {}", gone.status);
    Ok(())
}

/// The authorization URL without its query (state and nonce are not for logs).
fn redact_query(url: &url::Url) -> String {
    format!(
        "{}://{}{}?…",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.path()
    )
}
