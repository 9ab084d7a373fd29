//! Links know whose tokens they hold (issue 12): the upstream account is recorded with every
//! link, a re-link with another account replaces (never merges) and revokes the old grant, a
//! refresh naming another account is never stored or served, and nothing a host receives from
//! a read can show or serialize a refresh token the provider's policy keeps inside.
//!
//! The provider is the in-process strict `FakeProvider` (rotation, reuse detection, revocation;
//! it names the grant's user as the account). Time is a `ManualClock`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokenbroker::endpoints;
use tokenbroker::testing::{FakeProvider, ManualClock};
use tokenbroker::{
    AccessError, BrokerEvent, Caller, Error, EventSink, GrantStatus, LinkKind, LoginOptions,
    MemoryStore, ProviderPolicy, Realm, RevocationStatus, RoleGrantHook, Scopes, Subject,
    TokenBroker, TokenKey, TokenSet, TokenStore,
};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct Events(Mutex<Vec<BrokerEvent>>);

impl EventSink for Events {
    fn emit(&self, event: &BrokerEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

struct World {
    idp: Arc<FakeProvider>,
    clock: Arc<ManualClock>,
    store: Arc<MemoryStore>,
    events: Arc<Events>,
    broker: TokenBroker,
    key: TokenKey,
}

impl World {
    fn new(policy: ProviderPolicy) -> World {
        let clock = Arc::new(ManualClock::starting_now());
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let idp = Arc::new(FakeProvider::new("fake").unwrap());
        let events = Arc::new(Events::default());
        let broker = TokenBroker::builder()
            .with_provider(idp.clone(), policy)
            .with_store(store.clone())
            .with_clock(clock.clone())
            .with_event_sink(events.clone())
            .build()
            .unwrap();
        World {
            idp,
            clock,
            store,
            events,
            broker,
            key: TokenKey::parse("acme", "alice", "fake").unwrap(),
        }
    }

    fn caller(&self) -> Caller {
        Caller::new(self.key.realm.clone(), self.key.subject.clone(), "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    /// Links the key as `upstream_user` at the provider (the account the user picks there).
    async fn link_as(&self, upstream_user: &str) -> tokenbroker::LinkOutcome {
        let start = self
            .broker
            .begin_login(&self.key, LoginOptions::default())
            .await
            .unwrap();
        let callback = self
            .idp
            .approve(&start.authorization_url, upstream_user)
            .unwrap();
        self.broker
            .complete_login(start.pending, &callback)
            .await
            .unwrap()
    }

    async fn stored_set(&self) -> TokenSet {
        let stored = self.store.load(&self.key).await.unwrap().expect("linked");
        TokenSet::from_payload(&stored.record.payload).unwrap()
    }

    fn count(&self, f: impl Fn(&BrokerEvent) -> bool) -> usize {
        self.events
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| f(e))
            .count()
    }
}

fn secret(s: &tokenbroker::Secret) -> String {
    s.expose_secret().to_owned()
}

/// Google's way: a re-consent with an account that already consented brings no refresh token.
/// Alice's link is re-linked with Bob's account: the link now holds Bob's tokens only (no
/// refresh token, rather than Alice's), Alice's grant is revoked upstream, and the event and
/// the outcome say so.
#[tokio::test]
async fn a_relink_with_another_account_without_refresh_token_replaces_and_revokes() {
    let w = World::new(ProviderPolicy::default());
    w.link_as("alice-upstream").await;
    let alice = w.stored_set().await;
    let alice_rt = secret(alice.refresh_token().unwrap());
    assert_eq!(alice.account().unwrap().subject, "alice-upstream");

    w.idp.set_omit_refresh_token(true);
    let outcome = w.link_as("bob-upstream").await;
    let replaced = outcome
        .replaced_account
        .expect("another account replaced the link");
    assert_eq!(replaced.previous.unwrap().subject, "alice-upstream");
    assert_eq!(replaced.revocation, RevocationStatus::Revoked);
    assert_eq!(
        w.count(|e| matches!(
            e,
            BrokerEvent::AccountChanged { previous: Some(p), .. } if p.subject == "alice-upstream"
        )),
        1
    );

    let stored = w.stored_set().await;
    assert_eq!(stored.account().unwrap().subject, "bob-upstream");
    assert!(
        stored.refresh_token().is_none(),
        "Alice's refresh token is not kept beside Bob's tokens"
    );
    assert!(w.idp.is_active(stored.access_token().expose_secret()));
    assert!(
        !w.idp.is_active(&alice_rt),
        "Alice's grant was revoked upstream"
    );

    // The link serves Bob's access token, and after expiry it cannot quietly go back to
    // Alice's account: there is no refresh token to do it with.
    let read = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert_eq!(read.tokens.account().unwrap().subject, "bob-upstream");
    w.clock.advance(HOUR + Duration::from_secs(1));
    let expired = w.broker.retrieve(&w.caller(), &w.key).await;
    assert!(
        matches!(expired, Err(Error::NoRefreshToken { .. })),
        "{expired:?}"
    );
    assert_eq!(w.idp.counters().refresh_calls, 0);
}

/// The OpenID Connect way: the re-link with another account brings a refresh token. Bob's
/// tokens replace Alice's; Alice's grant is revoked.
#[tokio::test]
async fn a_relink_with_another_account_with_refresh_token_replaces_and_revokes() {
    let w = World::new(ProviderPolicy::default());
    w.link_as("alice-upstream").await;
    let alice_rt = secret(w.stored_set().await.refresh_token().unwrap());

    let outcome = w.link_as("bob-upstream").await;
    assert!(outcome.replaced_account.is_some());
    let stored = w.stored_set().await;
    assert_eq!(stored.account().unwrap().subject, "bob-upstream");
    let bob_rt = secret(stored.refresh_token().unwrap());
    assert_ne!(bob_rt, alice_rt);
    assert!(w.idp.is_active(&bob_rt));
    assert!(!w.idp.is_active(&alice_rt));

    // Bob's link refreshes with Bob's refresh token.
    w.clock.advance(HOUR + Duration::from_secs(1));
    let read = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(read.refreshed);
    assert_eq!(read.tokens.account().unwrap().subject, "bob-upstream");
    assert_eq!(w.idp.counters().reuse_detected, 0);
}

/// The same account re-linking merges: a re-consent without a refresh token keeps the link's
/// refresh token, and nothing is revoked.
#[tokio::test]
async fn the_same_account_relinking_merges_and_keeps_the_refresh_token() {
    let w = World::new(ProviderPolicy::default());
    w.link_as("alice-upstream").await;
    let first = w.stored_set().await;

    w.idp.set_omit_refresh_token(true);
    let outcome = w.link_as("alice-upstream").await;
    assert!(outcome.replaced_account.is_none());
    assert!(!outcome.first_link);
    let stored = w.stored_set().await;
    assert_eq!(
        stored.refresh_token().map(secret),
        first.refresh_token().map(secret),
        "the refresh token is kept"
    );
    assert_ne!(secret(stored.access_token()), secret(first.access_token()));
    assert!(w.idp.is_active(&secret(stored.refresh_token().unwrap())));
    assert_eq!(w.idp.counters().revocations, 0);
    assert_eq!(
        w.count(|e| matches!(e, BrokerEvent::AccountChanged { .. })),
        0
    );
}

/// A refresh whose ID token names another subject (OpenID Connect Core §12.2): nothing of the
/// answer is stored or served, the link is marked, and the caller learns why.
#[tokio::test]
async fn a_refresh_naming_another_account_is_never_stored_or_served() {
    let w = World::new(ProviderPolicy::default());
    w.link_as("alice-upstream").await;
    let before = w.store.load(&w.key).await.unwrap().unwrap();
    let before_set = TokenSet::from_payload(&before.record.payload).unwrap();

    w.idp.set_refresh_account(Some("mallory-upstream"));
    w.clock.advance(HOUR + Duration::from_secs(1));
    let read = w.broker.retrieve(&w.caller(), &w.key).await;
    assert!(
        matches!(read, Err(Error::AccountMismatch { .. })),
        "{read:?}"
    );
    assert_eq!(w.idp.counters().refresh_calls, 1);

    let after = w.store.load(&w.key).await.unwrap().unwrap();
    assert!(after.record.meta.state.is_relink_required());
    let after_set = TokenSet::from_payload(&after.record.payload).unwrap();
    assert_eq!(
        secret(after_set.access_token()),
        secret(before_set.access_token()),
        "none of the answer's tokens were stored"
    );
    assert_eq!(after_set.account().unwrap().subject, "alice-upstream");
    assert!(matches!(
        w.broker.status(&w.key).await.unwrap(),
        GrantStatus::RelinkRequired { .. }
    ));
    assert_eq!(
        w.count(|e| matches!(e, BrokerEvent::AccountMismatch { .. })),
        1
    );
    let again = w.broker.retrieve(&w.caller(), &w.key).await;
    assert!(
        matches!(again, Err(Error::RelinkRequired { .. })),
        "{again:?}"
    );
}

/// The account is visible to the host: in the read, in `status`, in the login outcome.
#[tokio::test]
async fn the_account_is_visible_to_the_host() {
    let w = World::new(ProviderPolicy::default());
    let outcome = w.link_as("alice-upstream").await;
    assert_eq!(outcome.tokens.account().unwrap().subject, "alice-upstream");
    let read = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    let account = read.tokens.account().unwrap();
    assert_eq!(account.subject, "alice-upstream");
    assert!(account.issuer.is_some());
    match w.broker.status(&w.key).await.unwrap() {
        GrantStatus::Active { account, .. } => {
            assert_eq!(account.unwrap().subject, "alice-upstream")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        w.count(|e| matches!(
            e,
            BrokerEvent::Linked { account: Some(a), .. } if a.subject == "alice-upstream"
        )),
        1,
        "the Linked event names the account"
    );
}

/// The first link of a session-bound link grants the read role in the user's own realm, not
/// in the realm derived for the session.
#[tokio::test]
async fn the_role_grant_hook_gets_the_users_realm_for_a_session_bound_link() {
    #[derive(Debug, Default)]
    struct Grants(Mutex<Vec<(String, String)>>);
    #[async_trait]
    impl RoleGrantHook for Grants {
        async fn grant_role(
            &self,
            realm: &Realm,
            subject: &Subject,
            _role: &str,
        ) -> Result<(), AccessError> {
            self.0
                .lock()
                .unwrap()
                .push((realm.to_string(), subject.to_string()));
            Ok(())
        }
    }
    let grants = Arc::new(Grants::default());
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    let broker = TokenBroker::builder()
        .with_provider(
            idp.clone(),
            ProviderPolicy::default()
                .link_kind(LinkKind::SessionBound)
                .stored_tokens_readable(true),
        )
        .with_role_grant_hook(grants.clone())
        .build()
        .unwrap();
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    let start = broker
        .begin_login(&key, LoginOptions::default().with_session("session-1"))
        .await
        .unwrap();
    let callback = idp.approve(&start.authorization_url, "alice").unwrap();
    broker
        .complete_login(start.pending, &callback)
        .await
        .unwrap();
    assert_eq!(
        *grants.0.lock().unwrap(),
        vec![("acme".to_owned(), "alice".to_owned())]
    );
}

// ---------------------------------------------------------------------------------------------
// Nothing a host receives from a read shows or serializes a refresh token the policy keeps in.

/// Serializes a value to JSON where its type implements `Serialize` (autoref specialization:
/// the inherent-looking call picks the `Serialize` impl when there is one, the fallback
/// otherwise), so that the check covers every value whatever its type.
// No type a read returns implements `Serialize` today, so the compiler sees the first path as
// unused; it is what catches one that starts to.
#[allow(dead_code)]
struct Probe<'a, T>(&'a T);

#[allow(dead_code)]
trait ViaSerialize {
    fn json(&self) -> Option<String>;
}

impl<T: Serialize> ViaSerialize for Probe<'_, T> {
    fn json(&self) -> Option<String> {
        serde_json::to_string(self.0).ok()
    }
}

trait ViaNothing {
    fn json(&self) -> Option<String>;
}

impl<T> ViaNothing for &Probe<'_, T> {
    fn json(&self) -> Option<String> {
        None
    }
}

macro_rules! shown {
    ($value:expr) => {{
        let value = &$value;
        let mut shown = vec![format!("{value:?}")];
        shown.extend((&Probe(value)).json());
        shown
    }};
}

#[tokio::test]
async fn no_value_a_read_returns_shows_a_refresh_token_the_policy_keeps_inside() {
    let w = World::new(ProviderPolicy::default().allow_audience("billing"));
    let outcome = w.link_as("alice-upstream").await;
    let rt = secret(w.stored_set().await.refresh_token().unwrap());
    let caller = w.caller();

    let mut shown = shown!(outcome);
    shown.extend(shown!(outcome.tokens));
    let read = w.broker.retrieve(&caller, &w.key).await.unwrap();
    shown.extend(shown!(read));
    shown.extend(shown!(read.tokens));
    assert!(read.tokens.refresh_token().is_none());
    let narrowed = w
        .broker
        .retrieve_narrowed(&caller, &w.key, &Scopes::parse("openid"))
        .await
        .unwrap();
    shown.extend(shown!(narrowed));
    assert!(narrowed.tokens.refresh_token().is_none());
    let in_session = w
        .broker
        .retrieve_in_session(&caller, &w.key, "session-1")
        .await
        .unwrap();
    shown.extend(shown!(in_session));
    assert!(in_session.tokens.refresh_token().is_none());
    let status = w.broker.status(&w.key).await.unwrap();
    shown.extend(shown!(status));
    let request = endpoints::ExchangeRequest::from_form(
        b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&requested_issuer=fake",
    )
    .unwrap();
    let exchange = endpoints::token_exchange(&w.broker, Some(&caller), "acme", &request).await;
    shown.extend(shown!(exchange));
    shown.push(String::from_utf8(exchange.into_http().into_body()).unwrap());
    let endpoint = endpoints::read_tokens(&w.broker, Some(&caller), "acme", "fake").await;
    let body = String::from_utf8(endpoint.into_http().into_body()).unwrap();
    assert!(body.contains("access_token"));
    shown.push(body);

    for text in &shown {
        assert!(!text.contains(&rt), "a refresh token leaked in: {text}");
    }
}

/// Where the policy exposes the refresh token, the view and Keycloak's body carry it (and
/// `Debug` still redacts it).
#[tokio::test]
async fn a_policy_that_exposes_the_refresh_token_hands_it_out() {
    let w = World::new(ProviderPolicy::default().expose_refresh_token(true));
    w.link_as("alice-upstream").await;
    let rt = secret(w.stored_set().await.refresh_token().unwrap());
    let read = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert_eq!(read.tokens.refresh_token().map(secret), Some(rt.clone()));
    assert!(!format!("{read:?}").contains(&rt));
    let endpoint = endpoints::read_tokens(&w.broker, Some(&w.caller()), "acme", "fake").await;
    let body = String::from_utf8(endpoint.into_http().into_body()).unwrap();
    assert!(body.contains(&rt));
}

/// A policy that keeps the ID token in: neither the view nor Keycloak's body has it.
#[tokio::test]
async fn a_policy_can_keep_the_id_token_inside() {
    let w = World::new(ProviderPolicy::default().expose_id_token(false));
    w.link_as("alice-upstream").await;
    let read = w.broker.retrieve(&w.caller(), &w.key).await.unwrap();
    assert!(read.tokens.id_token().is_none());
    let endpoint = endpoints::read_tokens(&w.broker, Some(&w.caller()), "acme", "fake").await;
    let body = String::from_utf8(endpoint.into_http().into_body()).unwrap();
    assert!(!body.contains("id_token"));
}

// ---------------------------------------------------------------------------------------------
// A record that cannot be read never blocks a re-link or an unlink.

/// Two brokers over one store, each encrypting with its own keyring: the second cannot read
/// what the first wrote (a retired key), and must still let the user re-link and unlink.
fn broker_with_keys(
    idp: &Arc<FakeProvider>,
    shared: &Arc<MemoryStore>,
    key_id: &str,
    key: [u8; 32],
) -> (TokenBroker, Arc<Events>) {
    use tokenbroker::store::{EncryptedStore, KeyId, StaticKeyring};
    let events = Arc::new(Events::default());
    let keys = Arc::new(StaticKeyring::new(KeyId::new(key_id).unwrap(), key));
    let broker = TokenBroker::builder()
        .with_provider(idp.clone(), ProviderPolicy::default())
        .with_store(Arc::new(EncryptedStore::new(shared.clone(), keys)))
        .with_event_sink(events.clone())
        .build()
        .unwrap();
    (broker, events)
}

async fn link_with(
    broker: &TokenBroker,
    idp: &FakeProvider,
    key: &TokenKey,
) -> tokenbroker::Result<()> {
    let start = broker.begin_login(key, LoginOptions::default()).await?;
    let callback = idp
        .approve(&start.authorization_url, "alice-upstream")
        .unwrap();
    broker
        .complete_login(start.pending, &callback)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_record_under_a_retired_key_is_replaced_by_a_relink() {
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    let shared = Arc::new(MemoryStore::new());
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    let (old, _) = broker_with_keys(&idp, &shared, "retired", [1; 32]);
    link_with(&old, &idp, &key).await.unwrap();

    let (new, _) = broker_with_keys(&idp, &shared, "current", [2; 32]);
    let caller = Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope();
    let unreadable = new.retrieve(&caller, &key).await;
    assert!(
        matches!(
            unreadable,
            Err(Error::Store(tokenbroker::StoreError::Corrupt { .. }))
        ),
        "{unreadable:?}"
    );
    link_with(&new, &idp, &key)
        .await
        .expect("re-link replaces the unreadable record");
    let read = new.retrieve(&caller, &key).await.unwrap();
    assert!(idp.is_active(read.tokens.access_token().expose_secret()));
}

#[tokio::test]
async fn a_record_under_a_retired_key_is_deleted_by_unlink_and_says_so() {
    let idp = Arc::new(FakeProvider::new("fake").unwrap());
    let shared = Arc::new(MemoryStore::new());
    let key = TokenKey::parse("acme", "alice", "fake").unwrap();
    let (old, _) = broker_with_keys(&idp, &shared, "retired", [1; 32]);
    link_with(&old, &idp, &key).await.unwrap();

    let (new, events) = broker_with_keys(&idp, &shared, "current", [2; 32]);
    let outcome = new.unlink(&key).await.unwrap();
    assert!(outcome.deleted);
    assert!(matches!(outcome.revocation, RevocationStatus::Failed(_)));
    assert!(shared.load(&key).await.unwrap().is_none());
    assert!(events.0.lock().unwrap().iter().any(|e| matches!(
        e,
        BrokerEvent::Unlinked {
            revocation: RevocationStatus::Failed(_),
            ..
        }
    )));
}
