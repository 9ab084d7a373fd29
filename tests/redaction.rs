//! No token, client secret, code or PKCE verifier appears in any `Debug`, `Display`, error,
//! event or log line. The test drives every path that handles secrets, captures everything
//! printable, and searches it for every secret it saw.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokenbroker::provider::{OAuth2Config, ProviderError};
use tokenbroker::testing::{FakeFault, FakeProvider, ManualClock};
use tokenbroker::{
    BrokerEvent, Caller, EventSink, LoginOptions, MemoryStore, ProviderId, ProviderPolicy, Secret,
    TokenBroker, TokenKey,
};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Events(Mutex<Vec<String>>);
impl EventSink for Events {
    fn emit(&self, event: &BrokerEvent) {
        self.0.lock().unwrap().push(format!("{event:?}"));
    }
}

#[tokio::test]
async fn nothing_printable_contains_a_secret() {
    let logs = Buffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let clock = Arc::new(ManualClock::starting_now());
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    let events = Arc::new(Events::default());
    let broker = TokenBroker::builder()
        .with_provider(
            idp.clone(),
            // Exposed, so that reads hand the refresh token out too: it must still never print.
            ProviderPolicy::default().expose_refresh_token(true),
        )
        .with_store(Arc::new(MemoryStore::with_clock(clock.clone())))
        .with_clock(clock.clone())
        .with_event_sink(events.clone())
        .build()
        .unwrap();
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    let caller = Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope();

    let mut secrets: Vec<String> = vec![];
    let mut printed: Vec<String> = vec![];

    // Login.
    let start = broker
        .begin_login(&key, LoginOptions::default())
        .await
        .unwrap();
    let pending_json: serde_json::Value = serde_json::to_value(&start.pending).unwrap();
    for field in ["state", "pkce_verifier", "nonce"] {
        secrets.push(pending_json[field].as_str().unwrap().to_owned());
    }
    printed.push(format!("{start:?}"));
    let callback = idp.approve(&start.authorization_url, "alice").unwrap();
    secrets.push(callback.code.as_ref().unwrap().expose_secret().to_owned());
    printed.push(format!("{callback:?}"));
    let outcome = broker
        .complete_login(start.pending.clone(), &callback)
        .await
        .unwrap();
    printed.push(format!("{outcome:?}"));
    let mut remember = |set: &tokenbroker::TokenView| {
        secrets.push(set.access_token().expose_secret().to_owned());
        secrets.extend(set.refresh_token().map(|t| t.expose_secret().to_owned()));
    };
    remember(&outcome.tokens);
    // Replay: an error path.
    printed.push(format!(
        "{:?}",
        broker
            .complete_login(start.pending, &callback)
            .await
            .unwrap_err()
    ));

    // Reads, refreshes, failures.
    let got = broker.retrieve(&caller, &key).await.unwrap();
    printed.push(format!("{got:?}"));
    clock.advance(Duration::from_secs(3601));
    let got = broker.retrieve(&caller, &key).await.unwrap();
    remember(&got.tokens);
    printed.push(format!("{got:?}"));
    let response =
        tokenbroker::endpoints::read_tokens(&broker, Some(&caller), "acme", "fake").await;
    printed.push(format!("{response:?}"));
    clock.advance(Duration::from_secs(3601));
    idp.inject(FakeFault::Error(ProviderError::Protocol {
        status: Some(200),
        reason: "x".into(),
    }));
    let err = broker.retrieve(&caller, &key).await.unwrap_err();
    printed.push(format!("{err:?} {err}"));
    clock.advance(Duration::from_secs(120));
    idp.revoke_user("alice");
    let err = broker.retrieve(&caller, &key).await.unwrap_err();
    printed.push(format!("{err:?} {err}"));
    // Narrowed reads, status, sweep, session logins: new paths that handle tokens.
    let relinked = {
        let start = broker
            .begin_login(&key, LoginOptions::default())
            .await
            .unwrap();
        let cb = idp.approve(&start.authorization_url, "alice").unwrap();
        broker.complete_login(start.pending, &cb).await.unwrap()
    };
    remember(&relinked.tokens);
    let narrow = tokenbroker::Scopes::parse("openid");
    if let Ok(n) = broker.retrieve_narrowed(&caller, &key, &narrow).await {
        remember(&n.tokens);
        printed.push(format!("{n:?}"));
    }
    printed.push(format!("{:?}", broker.status(&key).await.unwrap()));
    // The stored record and its payload, while the link still exists.
    let stored = broker.store().load(&key).await.unwrap().unwrap();
    printed.push(format!("{:?}", stored.record.payload));
    printed.push(format!("{stored:?}"));
    printed.push(format!(
        "{:?}",
        broker
            .sweep(tokenbroker::SweepOptions::new(Duration::from_secs(7200)))
            .await
            .unwrap()
    ));
    let session_options = LoginOptions::default().with_session("host-session-id-secret-1234");
    secrets.push("host-session-id-secret-1234".into());
    printed.push(format!("{session_options:?}"));
    printed.push(format!("{:?}", broker.unlink(&key).await.unwrap()));
    printed.push(format!("{broker:?}"));

    // Configuration and raw types.
    let config = OAuth2Config::new(
        ProviderId::new("x").unwrap(),
        "client",
        "https://idp.example/a".parse().unwrap(),
        "https://idp.example/t".parse().unwrap(),
        "https://app.example/cb".parse().unwrap(),
    )
    .with_client_secret(Secret::new("client-secret-value-42"));
    secrets.push("client-secret-value-42".into());
    printed.push(format!("{config:?}"));
    let oidc = tokenbroker::provider::OidcConfig::google(
        ProviderId::new("google").unwrap(),
        "client",
        Secret::new("google-client-secret-value-77"),
        "https://app.example/cb".parse().unwrap(),
    );
    secrets.push("google-client-secret-value-77".into());
    printed.push(format!("{oidc:?}"));
    let http: Arc<dyn tokenbroker::http::HttpClient> =
        Arc::new(tokenbroker::http::ReqwestClient::new().unwrap());
    printed.push(format!(
        "{:?}",
        tokenbroker::provider::OidcProvider::new(oidc, http)
    ));
    printed.extend(events.0.lock().unwrap().iter().cloned());
    printed.push(String::from_utf8(logs.0.lock().unwrap().clone()).unwrap());
    assert!(!printed.last().unwrap().is_empty(), "logs were captured");

    let all = printed.join("\n");
    for secret in &secrets {
        assert!(secret.len() >= 16, "secrets are long enough to search for");
        assert!(
            !all.contains(secret.as_str()),
            "a secret leaked into printable output:\n{all}"
        );
    }
}
