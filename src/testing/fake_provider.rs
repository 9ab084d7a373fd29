//! An in-process provider with a strict IdP's rules, for fast, deterministic broker tests.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use oauth2::{PkceCodeChallenge, PkceCodeVerifier};
use tokio::sync::watch;
use url::Url;

use crate::account::UpstreamAccount;
use crate::broker::Callback;
use crate::ids::{ProviderId, Scopes};
use crate::provider::{
    AuthorizationRequest, CodeExchange, Provider, ProviderError, RefreshTokenReuse, TokenKind,
};
use crate::secret::{Secret, random_token};
use crate::token::ProviderTokens;

/// Counts of what reached a [`FakeProvider`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FakeCounters {
    /// Refresh requests (every call, failed or not).
    pub refresh_calls: u64,
    /// Refresh requests that returned tokens.
    pub refresh_successes: u64,
    /// A consumed refresh token was presented again.
    pub reuse_detected: u64,
    /// Code exchanges.
    pub code_exchanges: u64,
    /// Revocations.
    pub revocations: u64,
}

/// A scripted failure for the next provider call.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum FakeFault {
    /// Answer with this error, leaving the grant untouched.
    Error(ProviderError),
    /// Wait this long (real time), then answer normally.
    Delay(Duration),
    /// Panic inside the call, as a buggy provider would (the grant is untouched).
    Panic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenState {
    Active,
    Consumed,
}

#[derive(Debug)]
struct Grant {
    subject: String,
    scopes: Scopes,
    revoked: bool,
}

#[derive(Debug)]
struct PendingCode {
    challenge: String,
    scopes: Scopes,
    subject: String,
    used: bool,
    grant: Option<usize>,
}

#[derive(Debug)]
struct State {
    grants: Vec<Grant>,
    refresh_tokens: HashMap<String, (usize, TokenState)>,
    access_tokens: HashMap<String, usize>,
    codes: HashMap<String, PendingCode>,
    authorizations: HashMap<String, (String, Scopes)>,
    faults: VecDeque<FakeFault>,
    counters: FakeCounters,
    rotate: bool,
    strict_reuse: bool,
    omit_refresh_token: bool,
    access_ttl: Duration,
    refresh_account: Option<String>,
}

/// The issuer the fake names in the accounts it reports.
const FAKE_ISSUER: &str = "https://fake-provider.invalid";

/// A [`Provider`] that runs inside the test process and behaves like a strict IdP:
/// single-use codes with PKCE S256, rotating refresh tokens whose reuse revokes the whole
/// grant (RFC 9700 §4.14), revocation, scripted faults and counters.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tokenbroker::testing::FakeProvider;
/// use tokenbroker::{Caller, LoginOptions, ProviderPolicy, TokenBroker, TokenKey};
///
/// let idp = Arc::new(FakeProvider::new("fake")?);
/// let broker = TokenBroker::builder().with_provider(idp.clone(), ProviderPolicy::default()).build()?;
/// let key = TokenKey::parse("acme", "alice", "fake")?;
/// let start = broker.begin_login(&key, LoginOptions::default()).await?;
/// let callback = idp.approve(&start.authorization_url, "alice")?;
/// broker.complete_login(start.pending, &callback).await?;
///
/// let caller = Caller::new(key.realm.clone(), key.subject.clone(), "app").with_role("read-token").with_full_client_scope();
/// let got = broker.retrieve(&caller, &key).await?;
/// assert!(idp.is_active(got.tokens.access_token().expose_secret()));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FakeProvider {
    id: ProviderId,
    scopes: Scopes,
    state: Mutex<State>,
    paused: watch::Sender<bool>,
    in_flight: watch::Sender<u64>,
}

impl FakeProvider {
    /// A provider under `alias` with rotation and strict reuse detection on, one-hour access
    /// tokens, default scopes `openid offline_access`.
    pub fn new(alias: &str) -> Result<Self, crate::InvalidId> {
        Ok(FakeProvider {
            id: ProviderId::new(alias)?,
            scopes: Scopes::parse("openid offline_access"),
            state: Mutex::new(State {
                grants: Vec::new(),
                refresh_tokens: HashMap::new(),
                access_tokens: HashMap::new(),
                codes: HashMap::new(),
                authorizations: HashMap::new(),
                faults: VecDeque::new(),
                counters: FakeCounters::default(),
                rotate: true,
                strict_reuse: true,
                omit_refresh_token: false,
                access_ttl: Duration::from_secs(3600),
                refresh_account: None,
            }),
            paused: watch::channel(false).0,
            in_flight: watch::channel(0).0,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns refresh-token rotation on or off (off: refresh answers carry no refresh token,
    /// like Google).
    pub fn set_rotation(&self, on: bool) {
        self.state().rotate = on;
    }
    /// Whether presenting a consumed refresh token revokes the grant (on) or still works
    /// (off, like Microsoft).
    pub fn set_strict_reuse(&self, on: bool) {
        self.state().strict_reuse = on;
    }
    /// Makes refresh answers name another account than their grant's (`Some(subject)`), as a
    /// refreshed ID token of a broken or mixed-up IdP would; `None` restores the grant's.
    pub fn set_refresh_account(&self, subject: Option<&str>) {
        self.state().refresh_account = subject.map(str::to_owned);
    }
    /// Leave the refresh token out of code-exchange answers.
    pub fn set_omit_refresh_token(&self, on: bool) {
        self.state().omit_refresh_token = on;
    }
    /// The lifetime of new access tokens.
    pub fn set_access_ttl(&self, ttl: Duration) {
        self.state().access_ttl = ttl;
    }
    /// Queues a fault for the next refresh or code exchange.
    pub fn inject(&self, fault: FakeFault) {
        self.state().faults.push_back(fault);
    }
    /// The counters so far.
    pub fn counters(&self) -> FakeCounters {
        self.state().counters
    }
    /// Whether a token (access or refresh) is still valid at the provider.
    pub fn is_active(&self, token: &str) -> bool {
        let s = self.state();
        let grant = match (s.access_tokens.get(token), s.refresh_tokens.get(token)) {
            (Some(g), _) => Some(*g),
            (_, Some((g, TokenState::Active))) => Some(*g),
            _ => None,
        };
        grant.is_some_and(|g| !s.grants[g].revoked)
    }
    /// Revokes every grant of `subject` at the provider (the user removed the app there).
    pub fn revoke_user(&self, subject: &str) {
        for g in self
            .state()
            .grants
            .iter_mut()
            .filter(|g| g.subject == subject)
        {
            g.revoked = true;
        }
    }

    /// Holds every refresh at the provider until [`FakeProvider::resume`]: a refresh in
    /// flight stays in flight, so a test can pile readers on it.
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }
    /// Lets held refreshes answer.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }
    /// Waits until at least `n` refresh calls have arrived (counting from creation).
    pub async fn wait_for_refresh_calls(&self, n: u64) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(|c| *c >= n).await;
    }

    /// Plays the user at the provider: approves the authorization request in `url` for
    /// `subject` and returns the callback the browser would bring back.
    pub fn approve(&self, url: &Url, subject: &str) -> Result<Callback, ProviderError> {
        let param = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let bad = |what: &str| ProviderError::Rejected {
            error: "invalid_request".into(),
            description: Some(what.into()),
            status: 400,
        };
        let state = param("state").ok_or_else(|| bad("missing state"))?;
        let challenge = param("code_challenge").ok_or_else(|| bad("missing code_challenge"))?;
        if param("code_challenge_method").as_deref() != Some("S256") {
            return Err(bad("PKCE S256 required"));
        }
        let mut s = self.state();
        let (_, scopes) = s
            .authorizations
            .remove(&state)
            .ok_or_else(|| bad("unknown authorization request"))?;
        let code = format!("code_{}", random_token(16));
        s.codes.insert(
            code.clone(),
            PendingCode {
                challenge,
                scopes,
                subject: subject.into(),
                used: false,
                grant: None,
            },
        );
        Ok(Callback::new(code, state))
    }

    fn issue(s: &mut State, grant: usize, with_refresh: bool, scopes: Scopes) -> ProviderTokens {
        let access = format!("at_{}", random_token(16));
        s.access_tokens.insert(access.clone(), grant);
        let mut tokens = ProviderTokens::new(Secret::new(access));
        tokens.token_type = Some("Bearer".into());
        tokens.expires_in = Some(s.access_ttl);
        let openid = scopes.contains("openid");
        tokens.scopes = Some(scopes);
        // An opaque stand-in for an ID token (this provider signs nothing), so that what the
        // broker does with ID tokens (keep, expose by policy, redact) can be tested.
        if openid {
            tokens.id_token = Some(Secret::new(format!("idt_{}", random_token(16))));
        }
        let subject = s.grants[grant].subject.clone();
        tokens.account = Some(UpstreamAccount::new(Some(FAKE_ISSUER.into()), subject));
        if with_refresh {
            let rt = format!("rt_{}", random_token(16));
            s.refresh_tokens
                .insert(rt.clone(), (grant, TokenState::Active));
            tokens.refresh_token = Some(Secret::new(rt));
        }
        tokens
    }

    fn revoke_grant(s: &mut State, grant: usize) {
        s.grants[grant].revoked = true;
    }

    async fn before_call(&self) -> Option<ProviderError> {
        let fault = self.state().faults.pop_front();
        match fault {
            Some(FakeFault::Error(e)) => Some(e),
            Some(FakeFault::Delay(d)) => {
                tokio::time::sleep(d).await;
                None
            }
            Some(FakeFault::Panic) => panic!("FakeProvider: injected panic"),
            None => None,
        }
    }
}

fn invalid_grant(what: &str) -> ProviderError {
    ProviderError::InvalidGrant {
        description: Some(what.into()),
    }
}

#[async_trait]
impl Provider for FakeProvider {
    fn id(&self) -> &ProviderId {
        &self.id
    }

    fn default_scopes(&self) -> Scopes {
        self.scopes.clone()
    }

    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<Url, ProviderError> {
        let mut url = Url::parse("https://fake-idp.invalid/authorize").expect("a valid URL");
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("state", request.state.expose_secret())
            .append_pair("code_challenge", &request.pkce_challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("nonce", request.nonce.expose_secret())
            .append_pair("scope", &request.scopes.to_string());
        self.state().authorizations.insert(
            request.state.expose_secret().to_owned(),
            (String::new(), request.scopes.clone()),
        );
        Ok(url)
    }

    async fn exchange_code(
        &self,
        exchange: &CodeExchange,
    ) -> Result<ProviderTokens, ProviderError> {
        if let Some(e) = self.before_call().await {
            return Err(e);
        }
        let mut s = self.state();
        s.counters.code_exchanges += 1;
        let code = exchange.code.expose_secret();
        let Some(pending) = s.codes.get_mut(code) else {
            return Err(invalid_grant("unknown code"));
        };
        if pending.used {
            // RFC 6749 §4.1.2: a replayed code revokes what it produced.
            let grant = pending.grant;
            if let Some(g) = grant {
                FakeProvider::revoke_grant(&mut s, g);
            }
            return Err(invalid_grant("code already used"));
        }
        let expected = PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
            exchange.pkce_verifier.expose_secret().to_owned(),
        ));
        if expected.as_str() != pending.challenge {
            return Err(invalid_grant("PKCE verification failed"));
        }
        pending.used = true;
        let (subject, scopes) = (pending.subject.clone(), pending.scopes.clone());
        let grant = s.grants.len();
        s.grants.push(Grant {
            subject,
            scopes: scopes.clone(),
            revoked: false,
        });
        if let Some(p) = s.codes.get_mut(code) {
            p.grant = Some(grant);
        }
        let with_refresh = !s.omit_refresh_token;
        Ok(FakeProvider::issue(&mut s, grant, with_refresh, scopes))
    }

    async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: Option<&Scopes>,
    ) -> Result<ProviderTokens, ProviderError> {
        {
            let mut s = self.state();
            s.counters.refresh_calls += 1;
            let calls = s.counters.refresh_calls;
            self.in_flight.send_replace(calls);
        }
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| !*p).await;
        if let Some(e) = self.before_call().await {
            return Err(e);
        }
        let mut s = self.state();
        let Some(&(grant, token_state)) = s.refresh_tokens.get(refresh_token.expose_secret())
        else {
            return Err(invalid_grant("unknown refresh token"));
        };
        if s.grants[grant].revoked {
            return Err(invalid_grant("grant revoked"));
        }
        if token_state == TokenState::Consumed && s.strict_reuse {
            s.counters.reuse_detected += 1;
            FakeProvider::revoke_grant(&mut s, grant);
            return Err(invalid_grant("refresh token reused; grant revoked"));
        }
        let granted = s.grants[grant].scopes.clone();
        let scopes = match scopes {
            Some(asked) if !asked.is_subset(&granted) => {
                return Err(ProviderError::Rejected {
                    error: "invalid_scope".into(),
                    description: None,
                    status: 400,
                });
            }
            Some(asked) => asked.clone(),
            None => granted,
        };
        let rotate = s.rotate;
        if rotate {
            s.refresh_tokens.insert(
                refresh_token.expose_secret().to_owned(),
                (grant, TokenState::Consumed),
            );
        }
        s.counters.refresh_successes += 1;
        let mut tokens = FakeProvider::issue(&mut s, grant, rotate, scopes);
        if let Some(other) = s.refresh_account.clone() {
            tokens.account = Some(UpstreamAccount::new(Some(FAKE_ISSUER.into()), other));
        }
        Ok(tokens)
    }

    async fn revoke(&self, token: &Secret, _kind: TokenKind) -> Result<(), ProviderError> {
        self.state().counters.revocations += 1;
        // Injected faults apply to revocation too (an unlink against a failing provider).
        if let Some(e) = self.before_call().await {
            return Err(e);
        }
        let mut s = self.state();
        let grant = s
            .refresh_tokens
            .get(token.expose_secret())
            .map(|(g, _)| *g)
            .or_else(|| s.access_tokens.get(token.expose_secret()).copied());
        if let Some(g) = grant {
            FakeProvider::revoke_grant(&mut s, g);
        }
        Ok(())
    }

    fn refresh_token_reuse(&self) -> RefreshTokenReuse {
        if self.state().strict_reuse {
            RefreshTokenReuse::Rejected
        } else {
            RefreshTokenReuse::Tolerated
        }
    }
}
