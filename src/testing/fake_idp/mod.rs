//! An in-process fake OAuth 2.0 / OIDC identity provider on a loopback port.
//!
//! [`FakeIdp`] is a real HTTP server (axum on `127.0.0.1:0`) with real protocol logic, so the
//! broker can be exercised end to end without a network:
//!
//! | endpoint | what it does |
//! |---|---|
//! | `GET /authorize` | non-interactive authorization step (RFC 6749 §4.1.1, PKCE S256 required), answers `302` to the redirect URI |
//! | `POST /token` | `authorization_code` and `refresh_token` grants, with rotation and reuse detection |
//! | `POST /revoke` | RFC 7009 revocation; revoking a refresh token revokes its whole grant |
//! | `POST /introspect` | RFC 7662-style introspection |
//! | `GET /.well-known/openid-configuration` | OpenID Connect discovery ([`FakeIdp::discovery_url`]) |
//! | `GET /jwks` | the public keys that verify ID tokens, with `kid` ([`FakeIdp::jwks_uri`]) |
//! | `POST /par` | RFC 9126 pushed authorization requests: a single-use, expiring `request_uri` that `/authorize` resolves ([`FakeIdp::par_endpoint`]) |
//!
//! Authorization responses carry `iss` (RFC 9207) unless
//! [`FakeIdpConfig::with_iss_in_response`]`(false)`; PAR is advertised in discovery with
//! [`FakeIdpConfig::with_pushed_authorization_requests`] and can be required with
//! [`FakeIdpConfig::with_require_pushed_authorization_requests`].
//!
//! Everything that makes a provider hard to live with can be switched on from the test:
//! refresh-token rotation ([`FakeIdp::set_rotation`]), reuse detection, refresh responses without
//! a `refresh_token` (Google style), Google and Microsoft presets (see
//! [Provider flavors](#provider-flavors)), signing-key rotation and tampered ID tokens,
//! server-side revocation ([`FakeIdp::revoke_user_grants`]),
//! a slow provider ([`FakeIdp::set_token_delay`]) and one-shot faults ([`FakeIdp::inject`]):
//! 503 pages, 429 with `Retry-After`, garbage or truncated JSON, `invalid_grant`, GitHub-style
//! errors with status 200, `expires_in` as a string, dropped connections, bodies that stall
//! after the headers. [`FakeIdp::counters`] counts what reached the provider, so tests can
//! assert "exactly one refresh call" instead of measuring time.
//!
//! # Example
//!
//! ```
//! # use tokenbroker::testing::{FakeIdp, Fault};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let idp = FakeIdp::start_default().await?;
//! // Point the provider configuration at the fake:
//! let token_url = idp.token_endpoint();
//! assert_eq!(token_url.path(), "/token");
//! // The next token request gets a 503 HTML page and changes nothing.
//! idp.inject(Fault::Status { status: 503, body: "<h1>down</h1>".into(), retry_after: Some(5) });
//! assert_eq!(idp.counters().refresh_calls, 0);
//! # Ok(())
//! # }
//! ```
//!
//! # Strictness
//!
//! The fake is deliberately stricter than many real providers, so that broker bugs show up:
//! `state` and PKCE (`S256` only) are required at `/authorize`, request bodies must be
//! `application/x-www-form-urlencoded`, parameters must not repeat, and HTTP Basic credentials
//! are form-url-decoded before comparison (RFC 6749 §2.3.1, so a `+` in a secret must be sent
//! as `%2B`). By default the client authenticates with its secret (`client_secret_basic` or
//! `client_secret_post`); [`FakeIdpConfig::with_client_auth_method`] registers it for exactly
//! one method instead, including `client_secret_jwt`, `private_key_jwt` (assertions verified
//! as RFC 7523 §3 asks, replays refused) and `none` (public client). The one relaxation is
//! [`FakeIdpConfig::google`]'s `/revoke`, which, like Google's, also takes a bare token.
//!
//! # ID tokens
//!
//! For the `openid` scope (code exchange and refresh) the response carries an `id_token` with
//! `iss` ([`FakeIdp::issuer`]), `sub` (the user), `aud` and `azp` (the client id), `iat`, `exp`,
//! `email` (`{user}@example.com` unless the user name has an `@`), `email_verified`, and on
//! code exchange only the `nonce` of the authorization request (refreshed ID tokens have none).
//!
//! ID tokens are **signed with ES256** by a P-256 key that the fake makes when it starts. The
//! Google and Microsoft presets sign with **RS256** instead, as those providers do (and as
//! [`OidcConfig::google`](crate::provider::OidcConfig::google) and
//! [`OidcConfig::microsoft`](crate::provider::OidcConfig::microsoft) require), with 2048-bit
//! RSA keys made at run time too. No key is stored anywhere. The header carries the key's
//! `kid`, and `GET /jwks` publishes the public keys, so a relying party can verify tokens for
//! real, after discovering everything (the algorithm included) from
//! [`FakeIdp::discovery_url`]. To exercise its key handling:
//!
//! - [`FakeIdp::rotate_signing_key`] switches to a new key (a new `kid`): a relying party with
//!   a cached key set must re-fetch `/jwks` on the unknown `kid`. The old keys stay listed
//!   unless [`FakeIdp::set_publish_retired_keys`]`(false)`;
//! - [`FakeIdp::issue_tampered_id_tokens`] (or one [`Fault::TamperedIdToken`]) alters the payload
//!   after signing, so the signature check must fail;
//! - [`Counters::jwks_calls`] and [`Counters::discovery_calls`] count the fetches.
//!
//! [`FakeIdpConfig::with_signed_id_tokens`]`(false)` brings back unsigned tokens
//! (`{"alg":"none"}`, empty signature part).
//!
//! Making an RSA key is slow (it can take seconds in an unoptimized build), so the RS256 fakes
//! of one process share their keys: the first Google or Microsoft fake makes one, and a
//! rotation makes another only when it goes past the keys made so far. Each fake's ES256 keys
//! are its own. RSA signing in an unoptimized build still takes
//! around 150 ms per token; tests of the Google and Microsoft presets with short time-outs
//! should optimize the big-integer code in their own `Cargo.toml`, as this crate does (profiles
//! of a dependency do not carry over):
//!
//! ```toml
//! [profile.dev.package.num-bigint-dig]
//! opt-level = 3
//! [profile.dev.package.rsa]
//! opt-level = 3
//! ```
//!
//! # Provider flavors
//!
//! The default fake is a strict, standards-following provider. Two presets imitate the quirks
//! of real providers that brokers must survive:
//!
//! | | [`FakeIdpConfig::default`] | [`FakeIdpConfig::google`] | [`FakeIdpConfig::microsoft`] |
//! |---|---|---|---|
//! | refresh token on code exchange | always | `access_type=offline` and first consent or `prompt=consent` | scope has `offline_access` |
//! | refresh response | rotated, reuse detection | no `refresh_token`, old one stays valid | rotated, old ones stay valid |
//! | revocation | `/revoke` | `/revoke` (client auth optional) | none (404, not in discovery) |
//! | [`FakeIdp::issuer`] | base URL | base URL (real Google: `https://accounts.google.com`) | `{base}/{tenant}/v2.0` |
//! | extra | | `include_granted_scopes=true` unions scopes | `ext_expires_in`, `tid`, issuer template in multi-tenant discovery |
//!
//! Point a provider at a fake with [`FakeIdp::discovery_url`] (OIDC discovery) or with the
//! single endpoints ([`FakeIdp::authorization_endpoint`], [`FakeIdp::token_endpoint`], …),
//! which follow the flavor:
//!
//! ```
//! # use tokenbroker::testing::{FakeIdp, FakeIdpConfig};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let google = FakeIdp::start(FakeIdpConfig::google()).await?;
//! assert_eq!(google.discovery_url().path(), "/.well-known/openid-configuration");
//! let microsoft = FakeIdp::start(FakeIdpConfig::microsoft("my-tenant")).await?;
//! assert_eq!(microsoft.issuer(), format!("{}my-tenant/v2.0", microsoft.base_url()));
//! assert_eq!(microsoft.authorization_endpoint().path(), "/my-tenant/oauth2/v2.0/authorize");
//! assert!(!microsoft.supports_revocation());
//! # Ok(())
//! # }
//! ```
//!
//! # Time
//!
//! The fake uses the system clock (`iat`, `exp`, code and access-token lifetimes), like a real
//! provider would; it does not go through the broker's `Clock`. Tests should count calls with
//! [`Counters`], not measure time. Zero lifetimes ([`FakeIdpConfig::with_code_ttl`],
//! [`FakeIdp::set_access_token_ttl`]) make codes and access tokens expire at once.

mod authorize;
mod client_auth;
mod config;
mod discovery;
mod faults;
mod grants;
mod id_token;
mod keys;
mod modes;
mod par;
mod protocol;
mod server;
mod state;
#[cfg(test)]
mod tests;
mod token_endpoints;

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use url::{Position, Url};

pub use config::FakeIdpConfig;
pub use faults::Fault;

use authorize::authorize_core;
use grants::token_info;
use keys::KeyRing;
use modes::Flavor;
use protocol::parse_params;
use state::{IdpState, Shared, lock};

/// A snapshot of the fake IdP's call counters. See [`FakeIdp::counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Authorization requests: `GET /authorize` (and Microsoft's tenant aliases) plus
    /// [`FakeIdp::authorize`] calls, valid or not.
    pub authorize_requests: u64,
    /// `authorization_code` grant requests that reached `/token`, including failed and faulted ones.
    pub code_exchanges: u64,
    /// `refresh_token` grant requests that reached `/token`, including failed and faulted ones.
    pub refresh_calls: u64,
    /// `refresh_token` grant requests answered with new tokens.
    pub refresh_successes: u64,
    /// Presentations of an already rotated refresh token (each revoked its grant).
    pub reuse_detected: u64,
    /// Requests that reached `/revoke`.
    pub revocations: u64,
    /// Requests that reached `/introspect`.
    pub introspections: u64,
    /// Requests that reached `/token`, whatever their grant type or outcome.
    pub token_requests: u64,
    /// Requests that reached `/jwks`.
    pub jwks_calls: u64,
    /// Discovery documents served (`…/.well-known/openid-configuration`).
    pub discovery_calls: u64,
    /// Accepted authorization requests with `prompt=consent` (the consent screen was forced).
    pub consent_prompts: u64,
    /// Requests that reached `POST /par` (RFC 9126), including failed and faulted ones.
    pub par_requests: u64,
    /// Pushed requests stored (answered `201` with a `request_uri`).
    pub par_successes: u64,
    /// Authorization requests that presented a `request_uri` (valid or not).
    pub request_uri_uses: u64,
}

/// What the redirect back to the client carries after a successful authorization step.
///
/// An authorization that ends in an error redirect (consent denied, missing PKCE, …) is
/// reported as [`FakeIdpError::Redirected`] instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationCallback {
    /// The authorization code (single use, valid for the configured code lifetime).
    pub code: String,
    /// The `state` parameter, echoed from the authorization request.
    pub state: String,
    /// The full redirect URL, `redirect_uri?code=…&state=…`, for driving a host callback handler.
    pub redirect_url: Url,
}

/// Why [`FakeIdp::authorize`] did not produce an authorization code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FakeIdpError {
    /// The request is rejected without redirecting (unknown client, bad or unregistered
    /// redirect URI, a URL that is not this IdP's authorization endpoint); `GET /authorize`
    /// answers these with a 400 page.
    #[error("authorization request rejected: {description}")]
    BadRequest {
        /// What was wrong.
        description: String,
    },
    /// The IdP redirects back to the client with an error (RFC 6749 §4.1.2.1), e.g.
    /// `access_denied` when consent is denied, or `invalid_request` without PKCE.
    #[error("authorization request redirected with error {error}: {description}")]
    Redirected {
        /// The `error` code, e.g. `access_denied`.
        error: String,
        /// The `error_description` sent along.
        description: String,
        /// The echoed `state`, if the request had one.
        state: Option<String>,
        /// The full error redirect URL.
        redirect_url: Url,
    },
}

/// An in-process fake OAuth 2.0 / OIDC identity provider serving HTTP on `127.0.0.1`.
///
/// Cheap to clone (an `Arc` inside). The server stops when the last clone is dropped, or on
/// [`FakeIdp::shutdown`]; requests in flight are allowed to finish. It must be started and
/// dropped inside a Tokio runtime.
#[derive(Clone)]
pub struct FakeIdp {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    base_url: Url,
    shutdown: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for FakeIdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeIdp")
            .field("base_url", &self.inner.base_url.as_str())
            .field("client_id", &self.inner.shared.client_id)
            .finish_non_exhaustive()
    }
}

impl FakeIdp {
    /// Makes the first ID-token signing key, binds `127.0.0.1:0` and starts serving with
    /// `config`.
    pub async fn start(config: FakeIdpConfig) -> io::Result<FakeIdp> {
        let alg = config.flavor.signing_alg();
        // Making an RSA key takes a while: off the runtime's threads, as other tasks (and other
        // fakes starting) may be waiting on them.
        let keys = tokio::task::spawn_blocking(move || KeyRing::generate(alg))
            .await
            .map_err(io::Error::other)??;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let base_url = Url::parse(&format!("http://{addr}/")).map_err(io::Error::other)?;
        let base = base_url.as_str().trim_end_matches('/').to_owned();
        let issuer = match &config.flavor {
            Flavor::Microsoft { tenant } => format!("{base}/{tenant}/v2.0"),
            Flavor::Generic | Flavor::Google => base.clone(),
        };
        let shared = Arc::new(Shared {
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            redirect_uris: config.redirect_uris.clone(),
            default_user: config.default_user.clone(),
            base,
            issuer,
            code_ttl: config.code_ttl,
            issue_id_token: config.issue_id_token,
            sign_id_tokens: config.sign_id_tokens,
            flavor: config.flavor.clone(),
            client_auth: config.client_auth.clone(),
            seen_assertion_ids: Mutex::new(std::collections::HashSet::new()),
            login_extensions: config.login_extensions.clone(),
            state: Mutex::new(IdpState::new(&config, keys)),
        });
        let (tx, task) = server::serve(listener, Arc::clone(&shared));
        Ok(FakeIdp {
            inner: Arc::new(Inner {
                shared,
                base_url,
                shutdown: Mutex::new(Some(tx)),
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// Starts a fake IdP with [`FakeIdpConfig::default`].
    pub async fn start_default() -> io::Result<FakeIdp> {
        Self::start(FakeIdpConfig::default()).await
    }

    /// Stops the server and waits until it has stopped. Requests in flight (e.g. one sleeping
    /// in a [`Fault::Delay`]) are allowed to finish first. Later requests fail to connect.
    pub async fn shutdown(&self) {
        if let Some(tx) = lock(&self.inner.shutdown).take() {
            let _ = tx.send(());
        }
        let task = lock(&self.inner.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// `http://127.0.0.1:PORT/`.
    pub fn base_url(&self) -> Url {
        self.inner.base_url.clone()
    }

    /// The `iss` of ID tokens and the `issuer` of the discovery document: the base URL without
    /// its trailing slash, or `{base}/{tenant_id}/v2.0` for [`FakeIdpConfig::microsoft`].
    /// Relying parties that discover from an issuer URL fetch
    /// `{issuer}/.well-known/openid-configuration` ([`FakeIdp::discovery_url`]).
    pub fn issuer(&self) -> String {
        self.inner.shared.issuer.clone()
    }

    /// `GET {issuer}/.well-known/openid-configuration`: the OpenID Connect discovery document.
    /// Counted in [`Counters::discovery_calls`].
    pub fn discovery_url(&self) -> Url {
        let mut url = self.inner.base_url.clone();
        url.set_path(&match &self.inner.shared.flavor {
            Flavor::Microsoft { tenant } => {
                format!("{tenant}/v2.0/.well-known/openid-configuration")
            }
            Flavor::Generic | Flavor::Google => ".well-known/openid-configuration".to_owned(),
        });
        url
    }

    /// `GET /jwks`: the JSON Web Key Set with the public keys that verify ID tokens.
    /// Counted in [`Counters::jwks_calls`].
    pub fn jwks_uri(&self) -> Url {
        self.endpoint("jwks")
    }

    /// The tenant id given to [`FakeIdpConfig::microsoft`], if this is a Microsoft fake.
    pub fn tenant_id(&self) -> Option<&str> {
        match &self.inner.shared.flavor {
            Flavor::Microsoft { tenant } => Some(tenant),
            Flavor::Generic | Flavor::Google => None,
        }
    }

    /// `GET /authorize`, or `GET /{tenant_id}/oauth2/v2.0/authorize` for
    /// [`FakeIdpConfig::microsoft`] (`/authorize` works there too).
    pub fn authorization_endpoint(&self) -> Url {
        match self.tenant_id() {
            Some(tenant) => self.endpoint(&format!("{tenant}/oauth2/v2.0/authorize")),
            None => self.endpoint("authorize"),
        }
    }

    /// `POST /token`, or `POST /{tenant_id}/oauth2/v2.0/token` for
    /// [`FakeIdpConfig::microsoft`] (`/token` works there too).
    pub fn token_endpoint(&self) -> Url {
        match self.tenant_id() {
            Some(tenant) => self.endpoint(&format!("{tenant}/oauth2/v2.0/token")),
            None => self.endpoint("token"),
        }
    }

    /// `POST /revoke` (RFC 7009). Note that it is plain `http`. For
    /// [`FakeIdpConfig::microsoft`] it answers 404, as Microsoft has no revocation endpoint
    /// (see [`FakeIdp::supports_revocation`]).
    pub fn revocation_endpoint(&self) -> Url {
        self.endpoint("revoke")
    }

    /// Whether `/revoke` is served and listed in discovery: false only for
    /// [`FakeIdpConfig::microsoft`].
    pub fn supports_revocation(&self) -> bool {
        !matches!(self.inner.shared.flavor, Flavor::Microsoft { .. })
    }

    /// `POST /par`: the pushed authorization request endpoint (RFC 9126). It authenticates
    /// the client as `/token` does, stores the parameters and answers `201` with a single-use
    /// `request_uri` (valid for [`FakeIdpConfig::with_request_uri_ttl`]) that `/authorize`
    /// then resolves. Faults for it are queued with [`FakeIdp::inject_par`].
    pub fn par_endpoint(&self) -> Url {
        self.endpoint("par")
    }

    /// Queues `fault` for the next `POST /par` request (its own queue, apart from `/token`'s).
    /// [`Fault::Delay`] sleeps and then answers normally; [`Fault::ExpiresInAsString`] and
    /// [`Fault::TamperedIdToken`] change nothing there; the others answer as at `/token`.
    pub fn inject_par(&self, fault: Fault) {
        self.inner.shared.lock().pushed.faults.push_back(fault);
    }

    /// How many pushed requests are stored and neither used nor expired.
    pub fn pending_pushed_requests(&self) -> usize {
        let now = Instant::now();
        let st = self.inner.shared.lock();
        st.pushed
            .requests
            .values()
            .filter(|p| p.expires > now)
            .count()
    }

    /// `POST /introspect` (RFC 7662).
    pub fn introspection_endpoint(&self) -> Url {
        self.endpoint("introspect")
    }

    fn endpoint(&self, path: &str) -> Url {
        let mut url = self.inner.base_url.clone();
        url.set_path(path);
        url
    }

    /// The registered client's id.
    pub fn client_id(&self) -> &str {
        &self.inner.shared.client_id
    }

    /// The registered client's secret.
    pub fn client_secret(&self) -> &str {
        &self.inner.shared.client_secret
    }

    /// Runs the authorization step for `user` without a browser.
    ///
    /// Takes the authorization URL the broker built, applies the same checks as
    /// `GET /authorize` (and counts as one authorization request), and returns what the
    /// redirect would carry. The code is shared with the HTTP endpoint: it can be exchanged
    /// at `/token`. `user` overrides any `login_hint`. The URL must point at
    /// [`FakeIdp::authorization_endpoint`] (scheme, host, port and path; `/authorize` and, for
    /// Microsoft, every tenant alias are accepted too), else [`FakeIdpError::BadRequest`].
    #[expect(
        clippy::result_large_err,
        reason = "a rare test-helper error; keeping `Url` unboxed reads better"
    )]
    pub fn authorize(
        &self,
        authorization_url: &Url,
        user: &str,
    ) -> Result<AuthorizationCallback, FakeIdpError> {
        let shared = &self.inner.shared;
        let mut st = shared.lock();
        st.counters.authorize_requests += 1;
        let endpoint = self.authorization_endpoint();
        let same_server = authorization_url[..Position::BeforePath]
            == self.inner.base_url[..Position::BeforePath];
        if !same_server || !shared.is_authorize_path(authorization_url.path()) {
            return Err(FakeIdpError::BadRequest {
                description: format!("{authorization_url} is not {endpoint}"),
            });
        }
        let params =
            parse_params(authorization_url.query().unwrap_or("").as_bytes()).map_err(|e| {
                FakeIdpError::BadRequest {
                    description: e.description,
                }
            })?;
        authorize_core(shared, &mut st, &params, Some(user))
    }

    /// A snapshot of the call counters.
    pub fn counters(&self) -> Counters {
        self.inner.shared.lock().counters
    }

    /// Sets every counter back to zero.
    pub fn reset_counters(&self) {
        self.inner.shared.lock().counters = Counters::default();
    }

    /// Queues `fault` for the next `/token` request (after the faults already queued).
    pub fn inject(&self, fault: Fault) {
        self.inject_n(fault, 1);
    }

    /// Queues `fault` for the next `times` `/token` requests.
    pub fn inject_n(&self, fault: Fault, times: usize) {
        let mut st = self.inner.shared.lock();
        st.faults.extend(std::iter::repeat_n(fault, times));
    }

    /// How many injected faults are still queued.
    pub fn pending_faults(&self) -> usize {
        self.inner.shared.lock().faults.len()
    }

    /// Drops every queued fault.
    pub fn clear_faults(&self) {
        self.inner.shared.lock().faults.clear();
    }

    /// Sets the lifetime of access tokens issued from now on.
    pub fn set_access_token_ttl(&self, ttl: Duration) {
        self.inner.shared.lock().knobs.access_token_ttl = ttl;
    }

    /// Turns refresh-token rotation on or off (see [`FakeIdpConfig::with_rotation`]).
    pub fn set_rotation(&self, on: bool) {
        self.inner.shared.lock().knobs.rotate = on;
    }

    /// Turns reuse detection on or off (see [`FakeIdpConfig::with_reuse_detection`]).
    pub fn set_reuse_detection(&self, on: bool) {
        self.inner.shared.lock().knobs.reuse_detection = on;
    }

    /// Stops or resumes issuing refresh tokens (see [`FakeIdpConfig::with_omit_refresh_token`]).
    pub fn set_omit_refresh_token(&self, on: bool) {
        self.inner.shared.lock().knobs.omit_refresh_token = on;
    }

    /// While on, authorization requests are answered with an `error=access_denied` redirect.
    pub fn set_deny_consent(&self, on: bool) {
        self.inner.shared.lock().knobs.deny_consent = on;
    }

    /// Makes every `/token` answer wait this long (a slow IdP); `None` for no delay.
    /// As with [`Fault::Delay`], the request is processed after the wait.
    pub fn set_token_delay(&self, delay: Option<Duration>) {
        self.inner.shared.lock().knobs.token_delay = delay;
    }

    /// Server-side revocation: revokes every grant of `user`. Their access tokens become
    /// inactive and their refresh tokens get `invalid_grant`, and their consent is forgotten
    /// (see [`FakeIdp::has_consented`]).
    pub fn revoke_user_grants(&self, user: &str) {
        let mut st = self.inner.shared.lock();
        for grant in st.grants.values_mut().filter(|g| g.user == user) {
            grant.revoked = true;
        }
        // As when a user removes an app's access: the next login asks for consent again.
        st.consents.remove(user);
    }

    /// Whether `token` (access or refresh token) is currently active, as `/introspect` would
    /// say, without counting an introspection.
    pub fn is_active(&self, token: &str) -> bool {
        token_info(&self.inner.shared.lock(), token).is_some()
    }

    /// Whether `user` has consented to this client: an authorization request for them went
    /// through since the fake started (or since their grants were revoked). With
    /// [`FakeIdpConfig::google`], only the first consent (or a forced `prompt=consent`) brings
    /// a refresh token.
    pub fn has_consented(&self, user: &str) -> bool {
        self.inner.shared.lock().consents.contains_key(user)
    }

    /// The scopes `user` has consented to for this client so far (the union over their
    /// authorization requests), or `None` without consent.
    pub fn consented_scopes(&self, user: &str) -> Option<Vec<String>> {
        self.inner.shared.lock().consents.get(user).cloned()
    }

    /// The `prompt` parameter of the last accepted authorization request (`None` if it had
    /// none, or if there was no such request yet). Forced consents are also counted in
    /// [`Counters::consent_prompts`].
    pub fn last_prompt(&self) -> Option<String> {
        self.inner.shared.lock().last_prompt.clone()
    }

    /// Switches ID-token signing to a newly made key (a new `kid`) and returns its `kid`. By
    /// default `/jwks` then lists the old keys too, as providers do during a rollover; after
    /// [`FakeIdp::set_publish_retired_keys`]`(false)` it lists only the new one. Either way a
    /// relying party that cached the old key set must re-fetch it on the unknown `kid`.
    ///
    /// The Google and Microsoft presets sign with RSA keys shared by the fakes of the process
    /// (see [ID tokens](self#id-tokens)); the first rotation that goes past the keys made so
    /// far makes one, which holds up the calling thread for a moment.
    ///
    /// # Panics
    ///
    /// If no key can be made, which means the operating system's random number generator
    /// failed.
    pub fn rotate_signing_key(&self) -> String {
        let (alg, used) = {
            let st = self.inner.shared.lock();
            (st.keys.alg(), st.keys.used())
        };
        // Made outside the lock, so that the fake keeps answering meanwhile.
        let key = KeyRing::next_key(alg, used).expect("the fake IdP could not make a signing key");
        let mut st = self.inner.shared.lock();
        st.keys.rotate_to(key);
        st.keys.current().kid().to_owned()
    }

    /// Whether `/jwks` keeps listing keys that no longer sign (default on). Off: only the
    /// current signing key is listed.
    pub fn set_publish_retired_keys(&self, on: bool) {
        self.inner.shared.lock().knobs.publish_retired_keys = on;
    }

    /// The `kid` of the key that signs ID tokens now.
    pub fn signing_key_id(&self) -> String {
        self.inner.shared.lock().keys.current().kid().to_owned()
    }

    /// While on, every ID token in a token response has its payload altered after signing (the
    /// `sub` changes), so it fails signature verification. For a single response, inject
    /// [`Fault::TamperedIdToken`] instead.
    pub fn issue_tampered_id_tokens(&self, on: bool) {
        self.inner.shared.lock().knobs.tamper_id_tokens = on;
    }
}
