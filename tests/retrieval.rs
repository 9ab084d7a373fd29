//! The retrieval endpoint: the authorization matrix, Keycloak's response format, and the rule
//! that a denied caller cannot tell a missing link from a forbidden one.

use std::sync::Arc;
use std::time::Duration;

use tokenbroker::endpoints;
use tokenbroker::provider::ProviderError;
use tokenbroker::testing::{FakeFault, FakeProvider, ManualClock};
use tokenbroker::{
    BrokerResponse, Caller, KeycloakRoles, LoginOptions, MemoryStore, ProviderPolicy, Realm,
    Scopes, Subject, TokenBroker, TokenKey,
};

struct World {
    idp: Arc<FakeProvider>,
    private: Arc<FakeProvider>,
    clock: Arc<ManualClock>,
    broker: TokenBroker,
}

async fn world() -> World {
    let clock = Arc::new(ManualClock::starting_now());
    let idp = Arc::new(FakeProvider::new("google").unwrap());
    let exposed = Arc::new(FakeProvider::new("exposed").unwrap());
    let private = Arc::new(FakeProvider::new("private").unwrap());
    let broker = TokenBroker::builder()
        .with_provider(idp.clone(), ProviderPolicy::default())
        .with_provider(
            exposed.clone(),
            ProviderPolicy::default().expose_refresh_token(true),
        )
        .with_provider(
            private.clone(),
            ProviderPolicy::default().store_tokens(false),
        )
        .with_store(Arc::new(MemoryStore::with_clock(clock.clone())))
        .with_clock(clock.clone())
        .with_role_checker(Arc::new(
            KeycloakRoles::new().with_admin_scope("read:user_idp_tokens"),
        ))
        .build()
        .unwrap();
    for (p, alias) in [
        (&idp, "google"),
        (&exposed, "exposed"),
        (&private, "private"),
    ] {
        let key = TokenKey::parse("acme", "alice", alias).unwrap();
        let start = broker
            .begin_login(&key, LoginOptions::default())
            .await
            .unwrap();
        let cb = p.approve(&start.authorization_url, "alice").unwrap();
        broker.complete_login(start.pending, &cb).await.unwrap();
    }
    World {
        idp,
        private,
        clock,
        broker,
    }
}

/// A caller of a client with full scope (the checker's client-scope rule has its own case).
fn caller(subject: &str) -> Caller {
    Caller::new(
        Realm::new("acme").unwrap(),
        Subject::new(subject).unwrap(),
        "web",
    )
    .with_full_client_scope()
}

fn same(a: &BrokerResponse, b: &BrokerResponse) -> bool {
    a.status == b.status && a.headers == b.headers && a.body == b.body
}

#[tokio::test]
async fn the_owner_with_the_role_gets_a_keycloak_shaped_answer() {
    let w = world().await;
    let r = endpoints::read_tokens(
        &w.broker,
        Some(&caller("alice").with_role("read-token")),
        "acme",
        "google",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.headers["pragma"], "no-cache");
    let body = r.json().unwrap();
    let at = body["access_token"].as_str().unwrap();
    assert!(w.idp.is_active(at));
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["refresh_expires_in"], 0);
    assert_eq!(body["scope"], "offline_access openid");
    assert_eq!(body["not-before-policy"], 0);
    assert_eq!(body["accessTokenExpiration"], (w.clock.now_ts() + 3600));
    assert!(
        body.get("refresh_token").is_none(),
        "the refresh token never leaves by default"
    );
}

trait NowTs {
    fn now_ts(&self) -> i64;
}
impl NowTs for ManualClock {
    fn now_ts(&self) -> i64 {
        use tokenbroker::Clock;
        self.now().unix_timestamp()
    }
}

#[tokio::test]
async fn the_refresh_token_leaves_only_where_the_policy_exposes_it() {
    let w = world().await;
    let r = endpoints::read_tokens(
        &w.broker,
        Some(&caller("alice").with_role("read-token")),
        "acme",
        "exposed",
    )
    .await;
    assert!(r.json().unwrap()["refresh_token"].as_str().is_some());
}

#[tokio::test]
async fn the_authorization_matrix() {
    let w = world().await;
    let owner = caller("alice").with_role("read-token");
    let admin = caller("carol").with_scopes(Scopes::parse("read:user_idp_tokens"));
    let allowed = [(&owner, "alice"), (&admin, "alice")];
    for (who, whose) in allowed {
        let key = TokenKey::parse("acme", whose, "google").unwrap();
        assert!(
            w.broker.retrieve(who, &key).await.is_ok(),
            "{who:?} may read {key}"
        );
    }

    let denied: Vec<(&str, Caller, &str)> = vec![
        (
            "another user's token",
            caller("bob").with_role("read-token"),
            "alice",
        ),
        ("no read-token role", caller("alice"), "alice"),
        (
            "client without the role in scope",
            caller("alice")
                .with_role("read-token")
                .with_client_scope_roles(["profile"]),
            "alice",
        ),
        (
            "another realm",
            Caller::new(
                Realm::new("other").unwrap(),
                Subject::new("alice").unwrap(),
                "web",
            )
            .with_role("read-token")
            .with_full_client_scope(),
            "alice",
        ),
    ];
    for (case, who, whose) in &denied {
        let existing = TokenKey::parse("acme", whose, "google").unwrap();
        let absent = TokenKey::parse("acme", "nobody", "google").unwrap();
        let e1 = w.broker.retrieve(who, &existing).await.unwrap_err();
        let e2 = w.broker.retrieve(who, &absent).await.unwrap_err();
        assert!(
            matches!(e1, tokenbroker::Error::Forbidden),
            "{case}: {e1:?}"
        );
        assert!(
            matches!(e2, tokenbroker::Error::Forbidden),
            "{case}: {e2:?}"
        );
    }
    // Through the endpoint, a denied caller's answers for an existing and an absent link are
    // identical, byte for byte.
    let no_role = caller("alice");
    let existing = endpoints::read_tokens(&w.broker, Some(&no_role), "acme", "google").await;
    let absent =
        endpoints::read_tokens(&w.broker, Some(&no_role), "acme", "unknown-provider").await;
    assert_eq!(existing.status, 403);
    assert!(
        same(&existing, &absent),
        "denied answers must not reveal existence"
    );
    let out_of_scope = caller("alice")
        .with_role("read-token")
        .with_client_scope_roles(["x"]);
    let a = endpoints::read_tokens(&w.broker, Some(&out_of_scope), "acme", "google").await;
    let b = endpoints::read_tokens(&w.broker, Some(&out_of_scope), "acme", "never-linked").await;
    assert!(same(&a, &b));
    assert!(
        endpoints::read_tokens(&w.broker, None, "acme", "google")
            .await
            .status
            == 401
    );
}

#[tokio::test]
async fn a_provider_that_stores_no_tokens_has_nothing_to_read() {
    let w = world().await;
    let r = endpoints::read_tokens(
        &w.broker,
        Some(&caller("alice").with_role("read-token")),
        "acme",
        "private",
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(w.private.counters().refresh_calls, 0);
}

#[tokio::test]
async fn error_statuses() {
    let w = world().await;
    let owner = caller("alice").with_role("read-token");
    assert_eq!(
        endpoints::read_tokens(&w.broker, Some(&owner), "acme", "Bad Alias")
            .await
            .status,
        400
    );
    assert_eq!(
        endpoints::read_tokens(&w.broker, Some(&owner), "a/b", "google")
            .await
            .status,
        400
    );
    assert_eq!(
        endpoints::read_tokens(&w.broker, Some(&owner), "acme", "nothing-here")
            .await
            .status,
        404
    );

    w.clock.advance(Duration::from_secs(3601));
    w.idp.inject(FakeFault::Error(ProviderError::Transient {
        status: Some(503),
        retry_after: Some(Duration::from_secs(20)),
        reason: None,
        source: None,
    }));
    let r = endpoints::read_tokens(&w.broker, Some(&owner), "acme", "google").await;
    assert_eq!(r.status, 502);
    assert_eq!(r.headers["retry-after"], "20");
    assert_eq!(r.json().unwrap()["error"], "temporarily_unavailable");

    w.clock.advance(Duration::from_secs(60));
    w.idp.revoke_user("alice");
    let r = endpoints::read_tokens(&w.broker, Some(&owner), "acme", "google").await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json().unwrap()["error"], "relink_required");
}

#[tokio::test]
async fn token_exchange_front_door() {
    let w = world().await;
    let owner = caller("alice").with_role("read-token");
    let grant = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange";
    let form = format!("{grant}&subject_token=host-checked&requested_issuer=google");
    let r = exchange(&w.broker, Some(&owner), "acme", form.as_bytes()).await;
    assert_eq!(r.status, 200);
    let body = r.json().unwrap();
    assert!(w.idp.is_active(body["access_token"].as_str().unwrap()));
    assert_eq!(body["issued_token_type"], tokenbroker::ACCESS_TOKEN_TYPE);
    assert_eq!(body["token_type"], "Bearer");
    assert!(body.get("refresh_token").is_none());

    // Same authorization as retrieval, and the same indistinguishable denial.
    let denied_a = exchange(&w.broker, Some(&caller("alice")), "acme", form.as_bytes()).await;
    let denied_b = exchange(
        &w.broker,
        Some(&caller("alice")),
        "acme",
        format!("{grant}&requested_issuer=nothing").as_bytes(),
    )
    .await;
    assert_eq!(denied_a.status, 403);
    assert!(same(&denied_a, &denied_b));

    let bad = [
        (
            "grant_type=client_credentials&requested_issuer=google".to_owned(),
            "unsupported_grant_type",
        ),
        (grant.to_owned(), "invalid_request"),
        (
            format!(
                "{grant}&requested_issuer=google&requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aid_token"
            ),
            "invalid_request",
        ),
        (
            format!("{grant}&requested_issuer=google&requested_issuer=github"),
            "invalid_request",
        ),
        (
            format!("{grant}&requested_issuer=google&scope=email"),
            "invalid_scope",
        ),
    ];
    for (form, error) in bad {
        let r = exchange(&w.broker, Some(&owner), "acme", form.as_bytes()).await;
        assert_eq!(r.status, 400, "{form}");
        assert_eq!(r.json().unwrap()["error"], error, "{form}");
    }
    assert_eq!(
        exchange(&w.broker, None, "acme", form.as_bytes())
            .await
            .status,
        401
    );
}

#[tokio::test]
async fn the_client_allow_list_preset_gates_providers_per_client() {
    let idp = Arc::new(FakeProvider::new("google").unwrap());
    let checker = tokenbroker::access::ClientAllowList::new()
        .allow("reports", [tokenbroker::ProviderId::new("google").unwrap()]);
    let broker = TokenBroker::builder()
        .with_provider(idp.clone(), ProviderPolicy::default())
        .with_role_checker(Arc::new(checker))
        .build()
        .unwrap();
    let key = TokenKey::parse("acme", "alice", "google").unwrap();
    let start = broker
        .begin_login(&key, LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.approve(&start.authorization_url, "alice").unwrap();
    broker.complete_login(start.pending, &cb).await.unwrap();
    let reports = Caller::new(key.realm.clone(), key.subject.clone(), "reports");
    assert_eq!(
        endpoints::read_tokens(&broker, Some(&reports), "acme", "google")
            .await
            .status,
        200
    );
    let web = Caller::new(key.realm.clone(), key.subject.clone(), "web")
        .with_role("read-token")
        .with_full_client_scope();
    assert_eq!(
        endpoints::read_tokens(&broker, Some(&web), "acme", "google")
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn an_admin_reads_another_users_token_through_the_explicit_endpoint() {
    let w = world().await;
    let alice = TokenKey::parse("acme", "alice", "google").unwrap();
    let admin = caller("carol").with_scopes(Scopes::parse("read:user_idp_tokens"));
    let r = endpoints::read_tokens_for(&w.broker, Some(&admin), &alice).await;
    assert_eq!(r.status, 200);
    assert!(r.json().unwrap()["access_token"].as_str().is_some());
    assert!(r.json().unwrap().get("refresh_token").is_none());
    // Without the admin scope the same request is a 403, identical for a missing link.
    let bob = caller("bob").with_role("read-token");
    let denied = endpoints::read_tokens_for(&w.broker, Some(&bob), &alice).await;
    let missing = TokenKey::parse("acme", "nobody", "google").unwrap();
    let denied_missing = endpoints::read_tokens_for(&w.broker, Some(&bob), &missing).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body, denied_missing.body);
    assert_eq!(
        endpoints::read_tokens_for(&w.broker, None, &alice)
            .await
            .status,
        401
    );
}

/// A token-exchange request as an adapter answers it: parse the form, then exchange.
async fn exchange(
    broker: &tokenbroker::TokenBroker,
    caller: Option<&Caller>,
    realm: &str,
    form: &[u8],
) -> tokenbroker::BrokerResponse {
    match endpoints::ExchangeRequest::from_form(form) {
        Ok(request) => endpoints::token_exchange(broker, caller, realm, &request).await,
        Err(bad_request) => bad_request,
    }
}

/// `Caller::new` fails closed: a caller whose authenticator never said which roles the
/// client's scope admits holds no effective role, and gets the same 403 as any denied caller.
#[tokio::test]
async fn a_caller_without_an_explicit_client_scope_reads_nothing() {
    let w = world().await;
    let unscoped = Caller::new(
        Realm::new("acme").unwrap(),
        Subject::new("alice").unwrap(),
        "web",
    )
    .with_role("read-token");
    let key = TokenKey::parse("acme", "alice", "google").unwrap();
    assert!(matches!(
        w.broker.retrieve(&unscoped, &key).await,
        Err(tokenbroker::Error::Forbidden)
    ));
    let denied = endpoints::read_tokens(&w.broker, Some(&unscoped), "acme", "google").await;
    let absent = endpoints::read_tokens(&w.broker, Some(&unscoped), "acme", "never-linked").await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body, absent.body);
    // Once the client's scope admits the role, the same caller reads.
    let scoped = unscoped.with_client_scope_roles(["read-token"]);
    assert!(w.broker.retrieve(&scoped, &key).await.is_ok());
}
