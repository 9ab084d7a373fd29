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
//! ID tokens are **signed with RS256** by one of two RSA keys embedded in this file (test-only,
//! public: never trust them anywhere else). The header carries the key's `kid`, and
//! `GET /jwks` publishes the public keys, so a relying party can verify tokens for real, after
//! discovering everything from [`FakeIdp::discovery_url`]. To exercise its key handling:
//!
//! - [`FakeIdp::rotate_signing_key`] switches to the other key (a new `kid`): a relying party
//!   with a cached key set must re-fetch `/jwks` on the unknown `kid`. The old key stays listed
//!   unless [`FakeIdp::set_publish_retired_keys`]`(false)`;
//! - [`FakeIdp::issue_tampered_id_tokens`] (or one [`Fault::TamperedIdToken`]) alters the payload
//!   after signing, so the signature check must fail;
//! - [`Counters::jwks_calls`] and [`Counters::discovery_calls`] count the fetches.
//!
//! [`FakeIdpConfig::with_signed_id_tokens`]`(false)` brings back unsigned tokens
//! (`{"alg":"none"}`, empty signature part).
//!
//! RSA signing in an unoptimized build takes around 150 ms per token. Tests with short
//! time-outs should optimize the big-integer code in their own `Cargo.toml`, as this crate does
//! (profiles of a dependency do not carry over):
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

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, RawQuery, State as AxumState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use openidconnect::core::{CoreJwsSigningAlgorithm, CoreRsaPrivateSigningKey};
use openidconnect::{JsonWebKeyId, PrivateSigningKey};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use url::{Position, Url};

use crate::provider::ClientAuth;

/// Configuration of a [`FakeIdp`], built with `with_*` methods on top of [`Default`].
///
/// Defaults: client `fake-client` / `fake-client-secret`, any redirect URI accepted, default
/// user `alice`, access tokens valid for 3600 s, authorization codes for 60 s, refresh-token
/// rotation and reuse detection on, refresh tokens issued, RS256-signed ID tokens issued for
/// `openid`. [`FakeIdpConfig::google`] and [`FakeIdpConfig::microsoft`] are presets that
/// imitate those providers' quirks.
#[derive(Clone)]
pub struct FakeIdpConfig {
    client_id: String,
    client_secret: String,
    redirect_uris: Vec<Url>,
    default_user: String,
    access_token_ttl: Duration,
    code_ttl: Duration,
    rotate_refresh_tokens: bool,
    reuse_detection: bool,
    omit_refresh_token: bool,
    issue_id_token: bool,
    sign_id_tokens: bool,
    keep_rotated_refresh_tokens: bool,
    flavor: Flavor,
    client_auth: ClientAuthRegistration,
    login_extensions: LoginExtensions,
}

/// How the fake's client must authenticate (see [`FakeIdpConfig::with_client_auth_method`]).
#[derive(Clone, Default)]
struct ClientAuthRegistration {
    /// `None`: `client_secret_basic` or `client_secret_post`, as before the other methods.
    method: Option<ClientAuth>,
    /// SPKI PEM of the `private_key_jwt` public key.
    public_key_pem: Option<String>,
    /// The only `aud` accepted in assertions; `None`: the token endpoint or the issuer.
    assertion_audience: Option<String>,
}

/// RFC 9207 and RFC 9126 settings of the fake (see [`FakeIdpConfig::with_iss_in_response`] and
/// [`FakeIdpConfig::with_pushed_authorization_requests`]).
#[derive(Clone, Debug)]
struct LoginExtensions {
    iss_in_response: bool,
    par: bool,
    require_par: bool,
    request_uri_ttl: Duration,
}

/// Which real provider's quirks the fake imitates (set by the presets).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Flavor {
    /// A strict, standards-following provider (the default).
    Generic,
    /// [`FakeIdpConfig::google`].
    Google,
    /// [`FakeIdpConfig::microsoft`], with the tenant id.
    Microsoft { tenant: String },
}

impl Default for FakeIdpConfig {
    fn default() -> Self {
        Self {
            client_id: "fake-client".to_owned(),
            client_secret: "fake-client-secret".to_owned(),
            redirect_uris: Vec::new(),
            default_user: "alice".to_owned(),
            access_token_ttl: Duration::from_secs(3600),
            code_ttl: Duration::from_secs(60),
            rotate_refresh_tokens: true,
            reuse_detection: true,
            omit_refresh_token: false,
            issue_id_token: true,
            sign_id_tokens: true,
            keep_rotated_refresh_tokens: false,
            flavor: Flavor::Generic,
            client_auth: ClientAuthRegistration::default(),
            login_extensions: LoginExtensions {
                iss_in_response: true,
                par: false,
                require_par: false,
                request_uri_ttl: Duration::from_secs(60),
            },
        }
    }
}

impl fmt::Debug for FakeIdpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeIdpConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("redirect_uris", &self.redirect_uris)
            .field("default_user", &self.default_user)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("code_ttl", &self.code_ttl)
            .field("rotate_refresh_tokens", &self.rotate_refresh_tokens)
            .field("reuse_detection", &self.reuse_detection)
            .field("omit_refresh_token", &self.omit_refresh_token)
            .field("issue_id_token", &self.issue_id_token)
            .field("sign_id_tokens", &self.sign_id_tokens)
            .field(
                "keep_rotated_refresh_tokens",
                &self.keep_rotated_refresh_tokens,
            )
            .field("flavor", &self.flavor)
            .field("client_auth_method", &self.client_auth.method)
            .field("login_extensions", &self.login_extensions)
            .finish()
    }
}

impl FakeIdpConfig {
    /// A preset that behaves like Google's OAuth 2.0 / OpenID Connect endpoints:
    ///
    /// - `/authorize` issues a code whose exchange carries a `refresh_token` only when the
    ///   request had `access_type=offline` **and** it is the user's first consent for this
    ///   client or the request had `prompt=consent` (see [`FakeIdp::has_consented`] and
    ///   [`Counters::consent_prompts`]);
    /// - refresh responses carry no `refresh_token` (no rotation) and the old one stays valid;
    /// - `include_granted_scopes=true` grants the union of the requested scopes and the user's
    ///   earlier grants to this client (incremental authorization);
    /// - a dead refresh token gets `400 {"error":"invalid_grant","error_description":"Token has
    ///   been expired or revoked."}`;
    /// - `/revoke` works without client authentication too, and revoking either token of a grant
    ///   revokes the whole grant and forgets the user's consent.
    ///
    /// The `iss` of ID tokens stays this fake's [`FakeIdp::issuer`], so that discovery and
    /// verification can be pointed at it; real Google uses `https://accounts.google.com` and
    /// sometimes the bare `accounts.google.com`, which a relying party must accept both of.
    ///
    /// ```
    /// # use tokenbroker::testing::{FakeIdp, FakeIdpConfig};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let idp = FakeIdp::start(FakeIdpConfig::google()).await?;
    /// // A relying party discovers everything from here:
    /// assert_eq!(idp.discovery_url().as_str(),
    ///     format!("{}/.well-known/openid-configuration", idp.issuer()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn google() -> Self {
        Self {
            flavor: Flavor::Google,
            rotate_refresh_tokens: false,
            reuse_detection: false,
            ..Self::default()
        }
        .with_iss_in_response(false)
    }

    /// A preset that behaves like the Microsoft identity platform (Entra ID, v2.0 endpoints)
    /// for the tenant `tenant_id`:
    ///
    /// - refresh tokens are issued only when the granted scope includes `offline_access`;
    /// - every refresh rotates the refresh token, and the old ones **stay valid** (Microsoft does
    ///   not revoke them on rotation, so there is no reuse detection);
    /// - token responses carry `ext_expires_in` (a number) next to `expires_in`;
    /// - there is no revocation endpoint: `/revoke` answers 404 and discovery has no
    ///   `revocation_endpoint` (a provider must report revocation as unsupported);
    /// - ID tokens carry `tid` (the tenant id), `ver: "2.0"`, `preferred_username`, and
    ///   `iss` = `{base}/{tenant_id}/v2.0` ([`FakeIdp::issuer`]);
    /// - discovery is served at `/{tenant}/v2.0/.well-known/openid-configuration` for
    ///   `common`, `organizations`, `consumers` and the tenant id. As at Microsoft, the
    ///   multi-tenant documents have the literal template `{base}/{tenantid}/v2.0` as their
    ///   `issuer`, and the tenant's own document has the concrete issuer;
    /// - the authorization and token endpoints live at `/{tenant}/oauth2/v2.0/authorize` and
    ///   `/{tenant}/oauth2/v2.0/token` (`/authorize` and `/token` keep working as aliases).
    ///
    /// ```
    /// # use tokenbroker::testing::{FakeIdp, FakeIdpConfig};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// let idp = FakeIdp::start(FakeIdpConfig::microsoft("tenant-1")).await?;
    /// assert_eq!(idp.issuer(), format!("{}tenant-1/v2.0", idp.base_url()));
    /// assert_eq!(idp.token_endpoint().path(), "/tenant-1/oauth2/v2.0/token");
    /// assert_eq!(idp.discovery_url().path(), "/tenant-1/v2.0/.well-known/openid-configuration");
    /// # Ok(())
    /// # }
    /// ```
    pub fn microsoft(tenant_id: impl Into<String>) -> Self {
        Self {
            flavor: Flavor::Microsoft {
                tenant: tenant_id.into(),
            },
            rotate_refresh_tokens: true,
            reuse_detection: false,
            keep_rotated_refresh_tokens: true,
            ..Self::default()
        }
        .with_iss_in_response(false)
    }

    /// Signs ID tokens with RS256 (default) or, when off, sends them unsigned with
    /// `{"alg":"none"}` and an empty signature part (the fake's behaviour before signing).
    pub fn with_signed_id_tokens(mut self, on: bool) -> Self {
        self.sign_id_tokens = on;
        self
    }

    /// When on, a rotated refresh token stays valid after its successor is issued
    /// (Microsoft style): no reuse detection can happen. Off by default.
    pub fn with_keep_rotated_refresh_tokens(mut self, on: bool) -> Self {
        self.keep_rotated_refresh_tokens = on;
        self
    }

    /// Sets the one registered client's id.
    pub fn with_client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }

    /// Sets the one registered client's secret.
    pub fn with_client_secret(mut self, client_secret: impl Into<String>) -> Self {
        self.client_secret = client_secret.into();
        self
    }

    /// Registers the client with exactly one `token_endpoint_auth_method`, which `/token`,
    /// `/revoke` and `/introspect` then require, and which discovery advertises alone:
    ///
    /// - [`ClientAuth::SecretJwt`]: an HS256 assertion signed with the client secret;
    /// - [`ClientAuth::PrivateKeyJwt`]: an assertion signed with the private key of
    ///   [`FakeIdpConfig::with_client_public_key`] (ES256 for a P-256 key, RS256 or PS256 for
    ///   RSA);
    /// - [`ClientAuth::None`]: a public client, `client_id` only;
    /// - [`ClientAuth::Basic`] / [`ClientAuth::Post`]: only that one of the two.
    ///
    /// Assertions are checked as RFC 7523 §3 asks: signature, `iss` = `sub` = client id, `aud`
    /// (the token endpoint or the issuer, see [`FakeIdpConfig::with_client_assertion_audience`]),
    /// `exp` in the future and at most 5 minutes away, a `jti` never seen before. A bad one is
    /// answered `401 invalid_client`. Unset (the default), either secret method is accepted.
    pub fn with_client_auth_method(mut self, method: ClientAuth) -> Self {
        self.client_auth.method = Some(method);
        self
    }

    /// Registers the client's `private_key_jwt` public key: SPKI PEM (`-----BEGIN PUBLIC
    /// KEY-----`), P-256 or RSA.
    pub fn with_client_public_key(mut self, public_key_pem: impl Into<String>) -> Self {
        self.client_auth.public_key_pem = Some(public_key_pem.into());
        self
    }

    /// Accepts client assertions only with this `aud` (by default the token endpoint URL and
    /// the issuer are both accepted).
    pub fn with_client_assertion_audience(mut self, audience: impl Into<String>) -> Self {
        self.client_auth.assertion_audience = Some(audience.into());
        self
    }

    /// Registers a redirect URI. Once at least one is registered, `/authorize` accepts only
    /// registered ones (exact match after URL parsing); with none, any absolute URL is accepted.
    pub fn with_redirect_uri(mut self, redirect_uri: Url) -> Self {
        self.redirect_uris.push(redirect_uri);
        self
    }

    /// Sets the user that `/authorize` signs in when the request has no `login_hint`.
    pub fn with_default_user(mut self, user: impl Into<String>) -> Self {
        self.default_user = user.into();
        self
    }

    /// Sets the access-token lifetime (`expires_in`). Zero makes tokens inactive at once.
    pub fn with_access_token_ttl(mut self, ttl: Duration) -> Self {
        self.access_token_ttl = ttl;
        self
    }

    /// Sets the authorization-code lifetime (default 60 s). Zero makes codes expire at once.
    pub fn with_code_ttl(mut self, ttl: Duration) -> Self {
        self.code_ttl = ttl;
        self
    }

    /// Turns refresh-token rotation on (default) or off. Off: refresh responses carry no
    /// `refresh_token` field and the old one stays valid (Google style).
    pub fn with_rotation(mut self, on: bool) -> Self {
        self.rotate_refresh_tokens = on;
        self
    }

    /// Turns refresh-token reuse detection on (default) or off. On: presenting an already
    /// rotated refresh token revokes the whole grant. Off: it only gets `invalid_grant`.
    pub fn with_reuse_detection(mut self, on: bool) -> Self {
        self.reuse_detection = on;
        self
    }

    /// Issues no refresh tokens at all (a provider without offline access). Refreshes of
    /// grants issued earlier then behave as with rotation off.
    pub fn with_omit_refresh_token(mut self, on: bool) -> Self {
        self.omit_refresh_token = on;
        self
    }

    /// Turns `id_token` issuance for the `openid` scope on (default) or off.
    pub fn with_id_token(mut self, on: bool) -> Self {
        self.issue_id_token = on;
        self
    }

    /// Whether authorization responses (success and error redirects) carry `iss` =
    /// [`FakeIdp::issuer`] (RFC 9207), and discovery says
    /// `authorization_response_iss_parameter_supported: true`. On by default, as at
    /// `oidc-provider` and Keycloak; off in the Google and Microsoft presets, whose providers
    /// do not advertise it.
    pub fn with_iss_in_response(mut self, on: bool) -> Self {
        self.login_extensions.iss_in_response = on;
        self
    }

    /// Whether discovery advertises the pushed authorization request endpoint
    /// (`POST /par`, RFC 9126; [`FakeIdp::par_endpoint`]). Off by default; the endpoint is
    /// served either way.
    pub fn with_pushed_authorization_requests(mut self, on: bool) -> Self {
        self.login_extensions.par = on;
        self
    }

    /// Whether authorization requests must come through `POST /par` (an authorization request
    /// without `request_uri` is then refused) and discovery says
    /// `require_pushed_authorization_requests: true`. On implies
    /// [`with_pushed_authorization_requests`](Self::with_pushed_authorization_requests).
    pub fn with_require_pushed_authorization_requests(mut self, on: bool) -> Self {
        self.login_extensions.require_par = on;
        if on {
            self.login_extensions.par = true;
        }
        self
    }

    /// How long a `request_uri` from `POST /par` stays valid (default 60 s; single use).
    pub fn with_request_uri_ttl(mut self, ttl: Duration) -> Self {
        self.login_extensions.request_uri_ttl = ttl;
        self
    }
}

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

/// A one-shot misbehaviour of the `/token` endpoint, queued with [`FakeIdp::inject`].
///
/// Faults are consumed first in, first out, one per `/token` request, whatever the request is
/// (even a malformed one). A faulted request does not touch grant state: a refresh token
/// presented in a faulted request is not consumed. Three faults answer normally and so do change
/// state: [`Fault::Delay`] (after its sleep), [`Fault::ExpiresInAsString`] and
/// [`Fault::TamperedIdToken`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this status and body (e.g. a 503 HTML page, or 429 with `Retry-After`).
    /// The Content-Type is `application/json` if the body starts with `{` or `[`, else
    /// `text/html`. A status outside 100..=999 is sent as 500.
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body, sent as is.
        body: String,
        /// Value of a `Retry-After` header in seconds, if any.
        retry_after: Option<u64>,
    },
    /// Sleep this long, then process the request and answer normally (time-out tests).
    /// The request is processed only after the sleep: a client that gives up earlier leaves
    /// the grant untouched.
    Delay(Duration),
    /// `200` with `Content-Type: application/json` and a body that is not JSON.
    GarbageBody,
    /// `200` with `Content-Type: application/json` and the body `{"access_token":"x","tok`.
    TruncatedJson,
    /// `400 {"error":"invalid_grant","error_description":"..."}`, without touching state.
    InvalidGrant,
    /// GitHub style: `200 {"error": error, "error_description": "..."}`.
    ErrorWith200 {
        /// The `error` code to send, e.g. `bad_verification_code`.
        error: String,
    },
    /// Process the request normally, but if it succeeds send `"expires_in":"3599"`-style
    /// (the number as a JSON string), as Azure AD v1 does.
    ExpiresInAsString,
    /// Close the connection without sending any response byte. The request is not processed.
    DropConnection,
    /// A body that stalls after prompt headers: `200` with `Content-Type: application/json`
    /// and the `Content-Length` of a complete token answer are sent at once, then the body
    /// `chunk_len` bytes at a time, waiting `pause` before every later chunk. The body never
    /// completes: after a last `pause`, the connection is closed before its final byte,
    /// however long the client waits. A client sees the status and headers right away and
    /// must bound the body read with its own time-out; `chunk_len: usize::MAX` sends all but
    /// the last byte at once and then stalls for one `pause`.
    ///
    /// Like [`Fault::DropConnection`], the request is not processed: the refresh token (or
    /// code) it presents is not consumed, the grant is not rotated, and the token-shaped body
    /// holds placeholder tokens that were never issued. A real IdP that has begun a `200`
    /// answer has usually rotated already ("rotated, answer lost": the client can only carry
    /// on if the IdP accepts the old refresh token for a while); this fault does not model
    /// that case.
    SlowBody {
        /// Body bytes per write (0 counts as 1).
        chunk_len: usize,
        /// The wait before each chunk after the first, and before the connection is closed.
        pause: Duration,
    },
    /// Process the request normally, but if the answer carries an `id_token`, alter its payload
    /// after signing (the `sub` changes), so its signature no longer verifies. See also
    /// [`FakeIdp::issue_tampered_id_tokens`].
    TamperedIdToken,
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
    /// Binds `127.0.0.1:0` and starts serving with `config`.
    pub async fn start(config: FakeIdpConfig) -> io::Result<FakeIdp> {
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
            state: Mutex::new(IdpState::new(&config)),
        });
        let router = Router::new()
            .route("/authorize", get(authorize_handler))
            .route("/token", post(token_handler))
            .route("/revoke", post(revoke_handler))
            .route("/introspect", post(introspect_handler))
            .route("/par", post(par_handler))
            .route("/.well-known/openid-configuration", get(discovery_handler))
            .route("/jwks", get(jwks_handler))
            // Microsoft's tenant-scoped paths; they answer 404 in the other flavors.
            .route(
                "/{tenant}/v2.0/.well-known/openid-configuration",
                get(tenant_discovery_handler),
            )
            .route(
                "/{tenant}/oauth2/v2.0/authorize",
                get(tenant_authorize_handler),
            )
            .route("/{tenant}/oauth2/v2.0/token", post(tenant_token_handler))
            // Where the Google and Microsoft presets look for keys and send the browser, so a
            // preset rebased onto the fake (`with_base_url`) finds them.
            .route("/{tenant}/discovery/v2.0/keys", get(jwks_handler))
            .route("/oauth2/v3/certs", get(jwks_handler))
            .route("/o/oauth2/v2/auth", get(authorize_handler))
            .route("/login/oauth/authorize", get(authorize_handler))
            .route("/login/oauth/access_token", post(token_handler))
            // GitHub's API `/user`, where the GitHub preset asks whose tokens a login brought.
            .route("/user", get(user_handler))
            .with_state(Arc::clone(&shared));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            // Errors of the accept loop are retried inside `Listener::accept`; `serve` only
            // returns on shutdown.
            let _ = axum::serve(
                KillableListener(listener),
                router.into_make_service_with_connect_info::<ConnTag>(),
            )
            .with_graceful_shutdown(async move {
                // Resolves on `shutdown()` or when the sender is dropped with the last clone.
                let _ = rx.await;
            })
            .await;
        });
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

    /// Switches ID-token signing to the other embedded test key (a new `kid`) and returns its
    /// `kid`. By default `/jwks` then lists both keys, as providers do during a rollover; after
    /// [`FakeIdp::set_publish_retired_keys`]`(false)` it lists only the new one. Either way a
    /// relying party that cached the old key set must re-fetch it on the unknown `kid`.
    pub fn rotate_signing_key(&self) -> String {
        let mut st = self.inner.shared.lock();
        st.signing_key = (st.signing_key + 1) % KEY_IDS.len();
        let current = st.signing_key;
        if !st.used_keys.contains(&current) {
            st.used_keys.push(current);
        }
        KEY_IDS[current].to_owned()
    }

    /// Whether `/jwks` keeps listing keys that no longer sign (default on). Off: only the
    /// current signing key is listed.
    pub fn set_publish_retired_keys(&self, on: bool) {
        self.inner.shared.lock().knobs.publish_retired_keys = on;
    }

    /// The `kid` of the key that signs ID tokens now.
    pub fn signing_key_id(&self) -> String {
        KEY_IDS[self.inner.shared.lock().signing_key].to_owned()
    }

    /// While on, every ID token in a token response has its payload altered after signing (the
    /// `sub` changes), so it fails signature verification. For a single response, inject
    /// [`Fault::TamperedIdToken`] instead.
    pub fn issue_tampered_id_tokens(&self, on: bool) {
        self.inner.shared.lock().knobs.tamper_id_tokens = on;
    }
}

// ---------------------------------------------------------------------------------------------
// State

struct Shared {
    client_id: String,
    client_secret: String,
    redirect_uris: Vec<Url>,
    default_user: String,
    /// The base URL without its trailing slash.
    base: String,
    issuer: String,
    code_ttl: Duration,
    issue_id_token: bool,
    sign_id_tokens: bool,
    flavor: Flavor,
    client_auth: ClientAuthRegistration,
    /// `jti`s of the client assertions accepted so far (a replay is refused). Its own lock:
    /// the handlers call [`authenticate`] while holding `state`.
    seen_assertion_ids: Mutex<std::collections::HashSet<String>>,
    login_extensions: LoginExtensions,
    state: Mutex<IdpState>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, IdpState> {
        lock(&self.state)
    }

    fn is_google(&self) -> bool {
        self.flavor == Flavor::Google
    }

    /// Whether `tenant` names a tenant path segment this fake serves: Microsoft's multi-tenant
    /// names and the configured tenant id. Always false for the other flavors.
    fn serves_tenant(&self, tenant: &str) -> bool {
        match &self.flavor {
            Flavor::Microsoft { tenant: own } => {
                matches!(tenant, "common" | "organizations" | "consumers") || tenant == own
            }
            Flavor::Generic | Flavor::Google => false,
        }
    }

    /// `/authorize`, or `/{tenant}/oauth2/v2.0/authorize` for a served tenant.
    fn is_authorize_path(&self, path: &str) -> bool {
        // Google's and GitHub's paths, served so that their presets can be rebased here.
        path == "/authorize"
            || path == "/o/oauth2/v2/auth"
            || path == "/login/oauth/authorize"
            || path
                .strip_prefix('/')
                .and_then(|p| p.strip_suffix("/oauth2/v2.0/authorize"))
                .is_some_and(|tenant| self.serves_tenant(tenant))
    }
}

/// Locks a mutex, ignoring poisoning: a panicking test thread must not wedge the server.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Knobs {
    access_token_ttl: Duration,
    rotate: bool,
    reuse_detection: bool,
    omit_refresh_token: bool,
    deny_consent: bool,
    token_delay: Option<Duration>,
    keep_rotated: bool,
    tamper_id_tokens: bool,
    publish_retired_keys: bool,
}

type GrantId = u64;

struct CodeRecord {
    client_id: String,
    /// The `redirect_uri` parameter as sent to `/authorize`, if it was sent.
    redirect_uri_param: Option<String>,
    user: String,
    scopes: Vec<String>,
    nonce: Option<String>,
    code_challenge: String,
    issued: Instant,
    used: bool,
    grant: Option<GrantId>,
    /// Whether the exchange may carry a refresh token (decided by the flavor at `/authorize`).
    offline: bool,
}

struct Grant {
    user: String,
    client_id: String,
    scopes: Vec<String>,
    revoked: bool,
}

struct AccessRecord {
    grant: GrantId,
    scopes: Vec<String>,
    exp: u64,
    revoked: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RefreshStatus {
    Active,
    Consumed,
}

struct RefreshRecord {
    grant: GrantId,
    status: RefreshStatus,
}

struct IdpState {
    knobs: Knobs,
    counters: Counters,
    faults: VecDeque<Fault>,
    codes: HashMap<String, CodeRecord>,
    grants: HashMap<GrantId, Grant>,
    access_tokens: HashMap<String, AccessRecord>,
    refresh_tokens: HashMap<String, RefreshRecord>,
    next_grant: GrantId,
    /// Per user: the scopes consented to for the one client.
    consents: HashMap<String, Vec<String>>,
    last_prompt: Option<String>,
    /// Index into [`KEY_IDS`] of the key that signs now.
    signing_key: usize,
    /// Keys that have signed, in order of first use (what `/jwks` lists by default).
    used_keys: Vec<usize>,
    /// Set by `token_handler` around one request: tamper with its ID token.
    tamper_this_response: bool,
    /// Pushed authorization requests by `request_uri` (RFC 9126), and faults for `POST /par`.
    pushed: PushedRequests,
}

impl IdpState {
    fn new(config: &FakeIdpConfig) -> Self {
        Self {
            knobs: Knobs {
                access_token_ttl: config.access_token_ttl,
                rotate: config.rotate_refresh_tokens,
                reuse_detection: config.reuse_detection,
                omit_refresh_token: config.omit_refresh_token,
                deny_consent: false,
                token_delay: None,
                keep_rotated: config.keep_rotated_refresh_tokens,
                tamper_id_tokens: false,
                publish_retired_keys: true,
            },
            counters: Counters::default(),
            faults: VecDeque::new(),
            codes: HashMap::new(),
            grants: HashMap::new(),
            access_tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            next_grant: 1,
            consents: HashMap::new(),
            last_prompt: None,
            signing_key: 0,
            used_keys: vec![0],
            tamper_this_response: false,
            pushed: PushedRequests::default(),
        }
    }

    fn revoke_grant(&mut self, grant: GrantId) {
        if let Some(g) = self.grants.get_mut(&grant) {
            g.revoked = true;
        }
    }

    fn grant_revoked(&self, grant: GrantId) -> bool {
        self.grants.get(&grant).is_none_or(|g| g.revoked)
    }
}

/// What `/introspect` reports about an active token.
struct TokenInfo {
    sub: String,
    client_id: String,
    scopes: Vec<String>,
    exp: Option<u64>,
    token_type: &'static str,
}

fn token_info(st: &IdpState, token: &str) -> Option<TokenInfo> {
    if let Some(at) = st.access_tokens.get(token) {
        if at.revoked || st.grant_revoked(at.grant) || unix_now() >= at.exp {
            return None;
        }
        let grant = st.grants.get(&at.grant)?;
        return Some(TokenInfo {
            sub: grant.user.clone(),
            client_id: grant.client_id.clone(),
            scopes: at.scopes.clone(),
            exp: Some(at.exp),
            token_type: "Bearer",
        });
    }
    let rt = st.refresh_tokens.get(token)?;
    if rt.status != RefreshStatus::Active || st.grant_revoked(rt.grant) {
        return None;
    }
    let grant = st.grants.get(&rt.grant)?;
    Some(TokenInfo {
        sub: grant.user.clone(),
        client_id: grant.client_id.clone(),
        scopes: grant.scopes.clone(),
        exp: None,
        token_type: "refresh_token",
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_token(prefix: &str) -> String {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("{prefix}{random}")
}

fn split_scopes(scope: Option<&String>) -> Vec<String> {
    let mut scopes: Vec<String> = Vec::new();
    for s in scope.map(String::as_str).unwrap_or("").split(' ') {
        if !s.is_empty() && !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_owned());
        }
    }
    scopes
}

// ---------------------------------------------------------------------------------------------
// Request parsing and OAuth error responses

/// An OAuth error answered as JSON (RFC 6749 §5.2).
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
        }
    }
    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
    fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }
    fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "error_description": self.description });
        let mut resp = json_response(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fake-idp\""),
            );
        }
        resp
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    raw_response(status, "application/json", body.to_string())
}

fn raw_response(status: StatusCode, content_type: &'static str, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

type Params = HashMap<String, String>;

/// Parses `application/x-www-form-urlencoded` data. Empty values count as absent
/// (RFC 6749 §3.1); a repeated parameter is an error (§3.1, §3.2).
fn parse_params(data: &[u8]) -> Result<Params, OAuthError> {
    let mut params = Params::new();
    for (k, v) in url::form_urlencoded::parse(data) {
        if v.is_empty() {
            continue;
        }
        if params
            .insert(k.clone().into_owned(), v.into_owned())
            .is_some()
        {
            return Err(OAuthError::invalid_request(format!(
                "parameter {k} repeated"
            )));
        }
    }
    Ok(params)
}

fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<Params, OAuthError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';').next().is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !is_form {
        return Err(OAuthError::invalid_request(
            "body must be application/x-www-form-urlencoded",
        ));
    }
    parse_params(body)
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn ct_eq(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Client authentication: `client_secret_basic` (RFC 6749 §2.3.1, id and secret
/// form-url-encoded before Base64) or `client_secret_post`, never both.
fn authenticate(shared: &Shared, headers: &HeaderMap, form: &Params) -> Result<(), OAuthError> {
    let method = shared.client_auth.method;
    if form.contains_key("client_assertion")
        || form.contains_key("client_assertion_type")
        || matches!(
            method,
            Some(ClientAuth::SecretJwt | ClientAuth::PrivateKeyJwt)
        )
    {
        return authenticate_assertion(shared, headers, form);
    }
    if method == Some(ClientAuth::None) {
        if headers.contains_key(header::AUTHORIZATION) || form.contains_key("client_secret") {
            return Err(OAuthError::invalid_client(
                "the client is registered with token_endpoint_auth_method none",
            ));
        }
        return match form.get("client_id") {
            Some(id) if ct_eq(id, &shared.client_id) => Ok(()),
            _ => Err(OAuthError::invalid_client("client authentication failed")),
        };
    }
    let used_basic = headers.contains_key(header::AUTHORIZATION);
    match (method, used_basic) {
        (Some(ClientAuth::Basic), false) | (Some(ClientAuth::Post), true) => {
            return Err(OAuthError::invalid_client(
                "the client is registered with another token_endpoint_auth_method",
            ));
        }
        _ => {}
    }
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| OAuthError::invalid_client("malformed Authorization header"))?;
            let (scheme, creds) = value.split_once(' ').unwrap_or((value, ""));
            if !scheme.eq_ignore_ascii_case("basic") {
                return Err(OAuthError::invalid_client(
                    "unsupported authentication scheme",
                ));
            }
            let decoded = STANDARD
                .decode(creds.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))?;
            let id = form_decode(id);
            let secret = form_decode(secret);
            match (id, secret) {
                (Some(id), Some(secret)) => Some((id, secret)),
                _ => return Err(OAuthError::invalid_client("malformed Basic credentials")),
            }
        }
    };
    let (id, secret) = match basic {
        Some((id, secret)) => {
            if form.contains_key("client_secret") {
                return Err(OAuthError::invalid_request(
                    "more than one client authentication method",
                ));
            }
            if form.get("client_id").is_some_and(|body_id| *body_id != id) {
                return Err(OAuthError::invalid_client("client_id mismatch"));
            }
            (id, secret)
        }
        None => match (form.get("client_id"), form.get("client_secret")) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone()),
            _ => return Err(OAuthError::invalid_client("client authentication required")),
        },
    };
    // Evaluate both comparisons so the answer does not say which part was wrong.
    let id_ok = ct_eq(&id, &shared.client_id);
    let secret_ok = ct_eq(&secret, &shared.client_secret);
    if id_ok && secret_ok {
        Ok(())
    } else {
        Err(OAuthError::invalid_client("client authentication failed"))
    }
}

// ---------------------------------------------------------------------------------------------
// /authorize

async fn authorize_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = {
        let mut st = shared.lock();
        st.counters.authorize_requests += 1;
        match parse_params(query.as_deref().unwrap_or("").as_bytes()) {
            Ok(params) => authorize_core(&shared, &mut st, &params, None),
            Err(e) => Err(FakeIdpError::BadRequest {
                description: e.description,
            }),
        }
    };
    match result {
        Ok(cb) => redirect(&cb.redirect_url),
        Err(FakeIdpError::Redirected { redirect_url, .. }) => redirect(&redirect_url),
        Err(FakeIdpError::BadRequest { description }) => (
            StatusCode::BAD_REQUEST,
            Html(format!(
                "<!doctype html><title>Bad request</title><h1>Bad request</h1><p>{}</p>",
                html_escape(&description)
            )),
        )
            .into_response(),
    }
}

fn redirect(url: &Url) -> Response {
    let mut resp = StatusCode::FOUND.into_response();
    if let Ok(location) = HeaderValue::from_str(url.as_str()) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The checks of RFC 6749 §4.1.1 and RFC 7636 §4.4, shared by `GET /authorize` and
/// [`FakeIdp::authorize`]. The caller counts the request.
#[expect(
    clippy::result_large_err,
    reason = "a rare test-helper error; keeping `Url` unboxed reads better"
)]
fn authorize_core(
    shared: &Shared,
    st: &mut IdpState,
    params: &Params,
    user: Option<&str>,
) -> Result<AuthorizationCallback, FakeIdpError> {
    let bad = |description: &str| FakeIdpError::BadRequest {
        description: description.to_owned(),
    };
    let pushed = resolve_request_uri(shared, st, params)?;
    let params = pushed.as_ref().unwrap_or(params);
    let iss = shared
        .login_extensions
        .iss_in_response
        .then(|| shared.issuer.clone());
    // Errors about the client or the redirect URI must not redirect (§4.1.2.1).
    let client_id = params
        .get("client_id")
        .ok_or_else(|| bad("client_id missing"))?;
    if !ct_eq(client_id, &shared.client_id) {
        return Err(bad("unknown client_id"));
    }
    let redirect_param = params.get("redirect_uri");
    let redirect_uri = match redirect_param {
        Some(raw) => {
            let url = Url::parse(raw).map_err(|_| bad("redirect_uri is not an absolute URL"))?;
            if url.fragment().is_some() {
                return Err(bad("redirect_uri must not have a fragment"));
            }
            if !shared.redirect_uris.is_empty() && !shared.redirect_uris.contains(&url) {
                return Err(bad("redirect_uri is not registered"));
            }
            url
        }
        None => match shared.redirect_uris.as_slice() {
            [only] => only.clone(),
            _ => return Err(bad("redirect_uri missing")),
        },
    };

    let state = params.get("state").cloned();
    let error_redirect = |error: &str, description: &str| {
        let mut url = redirect_uri.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("error", error)
                .append_pair("error_description", description);
            if let Some(state) = &state {
                q.append_pair("state", state);
            }
            if let Some(iss) = &iss {
                q.append_pair("iss", iss);
            }
        }
        FakeIdpError::Redirected {
            error: error.to_owned(),
            description: description.to_owned(),
            state: state.clone(),
            redirect_url: url,
        }
    };
    match params.get("response_type").map(String::as_str) {
        Some("code") => {}
        None => return Err(error_redirect("invalid_request", "response_type missing")),
        Some(_) => {
            return Err(error_redirect(
                "unsupported_response_type",
                "only code is supported",
            ));
        }
    }
    let Some(state) = state.clone() else {
        return Err(error_redirect(
            "invalid_request",
            "state missing (this fake requires it)",
        ));
    };
    let Some(challenge) = params.get("code_challenge") else {
        return Err(error_redirect(
            "invalid_request",
            "PKCE code_challenge required",
        ));
    };
    if params.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return Err(error_redirect(
            "invalid_request",
            "code_challenge_method must be S256",
        ));
    }
    let well_formed = challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(error_redirect(
            "invalid_request",
            "code_challenge must be 43 base64url characters",
        ));
    }
    if st.knobs.deny_consent {
        return Err(error_redirect("access_denied", "the user denied consent"));
    }

    let user = user
        .map(str::to_owned)
        .or_else(|| params.get("login_hint").cloned())
        .unwrap_or_else(|| shared.default_user.clone());

    // Consent: remembered per user, as the union of everything consented to.
    let requested = split_scopes(params.get("scope"));
    let prompt = params.get("prompt");
    let forced_consent = prompt.is_some_and(|p| p.split(' ').any(|v| v == "consent"));
    if forced_consent {
        st.counters.consent_prompts += 1;
    }
    st.last_prompt = prompt.cloned();
    let first_consent = !st.consents.contains_key(&user);
    let consented = st.consents.entry(user.clone()).or_default();
    let earlier = consented.clone();
    for scope in &requested {
        if !consented.contains(scope) {
            consented.push(scope.clone());
        }
    }
    let incremental = shared.is_google()
        && params.get("include_granted_scopes").map(String::as_str) == Some("true");
    let scopes = if incremental {
        let mut union = earlier;
        for scope in requested {
            if !union.contains(&scope) {
                union.push(scope);
            }
        }
        union
    } else {
        requested
    };
    let offline = match &shared.flavor {
        Flavor::Generic => true,
        // Google hands out a refresh token only for offline access, and only when the consent
        // screen was shown: the first time, or when forced with `prompt=consent`.
        Flavor::Google => {
            params.get("access_type").map(String::as_str) == Some("offline")
                && (first_consent || forced_consent)
        }
        Flavor::Microsoft { .. } => scopes.iter().any(|s| s == "offline_access"),
    };

    let code = random_token("code_");
    st.codes.insert(
        code.clone(),
        CodeRecord {
            client_id: client_id.clone(),
            redirect_uri_param: redirect_param.cloned(),
            user,
            scopes,
            nonce: params.get("nonce").cloned(),
            code_challenge: challenge.clone(),
            issued: Instant::now(),
            used: false,
            grant: None,
            offline,
        },
    );
    let mut redirect_url = redirect_uri;
    redirect_url
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &state);
    if let Some(iss) = &iss {
        redirect_url.query_pairs_mut().append_pair("iss", iss);
    }
    Ok(AuthorizationCallback {
        code,
        state,
        redirect_url,
    })
}

// ---------------------------------------------------------------------------------------------
// /token

async fn token_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnTag>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&headers, &body);
    let (fault, delay) = {
        let mut st = shared.lock();
        st.counters.token_requests += 1;
        let grant_type = form.as_ref().ok().and_then(|f| f.get("grant_type"));
        match grant_type.map(String::as_str) {
            Some("authorization_code") => st.counters.code_exchanges += 1,
            Some("refresh_token") => st.counters.refresh_calls += 1,
            _ => {}
        }
        (st.faults.pop_front(), st.knobs.token_delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut expires_in_as_string = false;
    let mut tamper = false;
    match fault {
        None => {}
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::ExpiresInAsString) => expires_in_as_string = true,
        Some(Fault::TamperedIdToken) => tamper = true,
        Some(fault) => return fault_response(fault, &conn),
    }
    let result = form.and_then(|form| {
        let mut st = shared.lock();
        authenticate(&shared, &headers, &form)?;
        // Read by `issue_tokens` for this request only.
        st.tamper_this_response = tamper || st.knobs.tamper_id_tokens;
        let result = match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => exchange_code(&shared, &mut st, &form),
            Some("refresh_token") => refresh(&shared, &mut st, &form),
            Some(_) => Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type not supported",
            )),
            None => Err(OAuthError::invalid_request("grant_type missing")),
        };
        st.tamper_this_response = false;
        result
    });
    match result {
        Ok(mut body) => {
            if expires_in_as_string && let Some(e) = body.get_mut("expires_in") {
                *e = Value::String(e.to_string());
            }
            json_response(StatusCode::OK, &Value::Object(body))
        }
        Err(e) => e.into_response(),
    }
}

fn fault_response(fault: Fault, conn: &ConnTag) -> Response {
    match fault {
        Fault::Status {
            status,
            body,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let trimmed = body.trim_start();
            let content_type = if trimmed.starts_with('{') || trimmed.starts_with('[') {
                "application/json"
            } else {
                "text/html; charset=utf-8"
            };
            let mut resp = raw_response(status, content_type, body);
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
        Fault::GarbageBody => raw_response(
            StatusCode::OK,
            "application/json",
            "<html><body>this is not JSON</body></html>".to_owned(),
        ),
        Fault::TruncatedJson => raw_response(
            StatusCode::OK,
            "application/json",
            r#"{"access_token":"x","tok"#.to_owned(),
        ),
        Fault::InvalidGrant => {
            OAuthError::invalid_grant("injected fault: invalid_grant").into_response()
        }
        Fault::ErrorWith200 { error } => json_response(
            StatusCode::OK,
            &json!({ "error": error, "error_description": "injected fault: error with status 200" }),
        ),
        Fault::DropConnection => {
            // The connection's writer fails from now on, so hyper closes the socket without
            // having sent a byte of this response.
            conn.kill.store(true, Ordering::SeqCst);
            Response::new(Body::empty())
        }
        Fault::SlowBody { chunk_len, pause } => slow_body_response(chunk_len, pause),
        // Answered normally by the caller.
        Fault::Delay(_) | Fault::ExpiresInAsString | Fault::TamperedIdToken => OAuthError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "unreachable",
        )
        .into_response(),
    }
}

/// The answer of [`Fault::SlowBody`]: headers at once, then a body that never completes.
fn slow_body_response(chunk_len: usize, pause: Duration) -> Response {
    // Token-shaped, so that the Content-Length is that of a plausible answer; never issued.
    let full = Bytes::from(
        json!({
            "access_token": "slow-body-placeholder-never-issued",
            "token_type": "Bearer",
            "expires_in": 3600,
            "refresh_token": "slow-body-placeholder-never-issued",
        })
        .to_string(),
    );
    let declared = full.len();
    // The last byte is never sent.
    let sendable = full.slice(..declared - 1);
    let chunk_len = chunk_len.max(1);
    // State: the bytes still to send, and whether one chunk has gone out.
    let chunks =
        futures_util::stream::unfold((sendable, false), move |(mut rest, started)| async move {
            if started {
                tokio::time::sleep(pause).await;
            }
            if rest.is_empty() {
                // hyper aborts the connection on a body error: the body stays one byte short.
                return Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "fake IdP stalled the body (Fault::SlowBody)",
                    )),
                    (rest, true),
                ));
            }
            let chunk = rest.split_to(chunk_len.min(rest.len()));
            Some((Ok(chunk), (rest, true)))
        });
    let mut resp = Response::new(Body::from_stream(chunks));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn exchange_code(
    shared: &Shared,
    st: &mut IdpState,
    form: &Params,
) -> Result<Map<String, Value>, OAuthError> {
    let code = form
        .get("code")
        .ok_or_else(|| OAuthError::invalid_request("code missing"))?;
    let Some(record) = st.codes.get_mut(code) else {
        return Err(OAuthError::invalid_grant("unknown authorization code"));
    };
    if record.client_id != shared.client_id {
        return Err(OAuthError::invalid_grant(
            "code was issued to another client",
        ));
    }
    if record.used {
        // RFC 6749 §4.1.2: a replayed code SHOULD revoke the tokens issued from it.
        let grant = record.grant;
        if let Some(grant) = grant {
            st.revoke_grant(grant);
        }
        return Err(OAuthError::invalid_grant("authorization code already used"));
    }
    // Any exchange attempt by the right client consumes the code, successful or not.
    record.used = true;
    if record.issued.elapsed() >= shared.code_ttl {
        return Err(OAuthError::invalid_grant("authorization code expired"));
    }
    match (&record.redirect_uri_param, form.get("redirect_uri")) {
        (Some(expected), Some(got)) if expected == got => {}
        (Some(_), _) => return Err(OAuthError::invalid_grant("redirect_uri mismatch")),
        (None, Some(_)) => return Err(OAuthError::invalid_grant("unexpected redirect_uri")),
        (None, None) => {}
    }
    let verifier = form
        .get("code_verifier")
        .ok_or_else(|| OAuthError::invalid_request("code_verifier missing"))?;
    let verifier_ok = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if !verifier_ok || !ct_eq(&computed, &record.code_challenge) {
        return Err(OAuthError::invalid_grant("PKCE verification failed"));
    }

    let grant_id = st.next_grant;
    st.next_grant += 1;
    record.grant = Some(grant_id);
    let grant = Grant {
        user: record.user.clone(),
        client_id: record.client_id.clone(),
        scopes: record.scopes.clone(),
        revoked: false,
    };
    let nonce = record.nonce.clone();
    let with_refresh = !st.knobs.omit_refresh_token && record.offline;
    let scopes = grant.scopes.clone();
    st.grants.insert(grant_id, grant);
    Ok(issue_tokens(
        shared,
        st,
        grant_id,
        &scopes,
        with_refresh,
        nonce.as_deref(),
    ))
}

fn refresh(
    shared: &Shared,
    st: &mut IdpState,
    form: &Params,
) -> Result<Map<String, Value>, OAuthError> {
    let result = refresh_core(shared, st, form);
    match result {
        // Google gives one description for every dead refresh token, whatever the reason.
        Err(mut e) if shared.is_google() && e.error == "invalid_grant" => {
            e.description = "Token has been expired or revoked.".to_owned();
            Err(e)
        }
        other => other,
    }
}

fn refresh_core(
    shared: &Shared,
    st: &mut IdpState,
    form: &Params,
) -> Result<Map<String, Value>, OAuthError> {
    let token = form
        .get("refresh_token")
        .ok_or_else(|| OAuthError::invalid_request("refresh_token missing"))?;
    let Some(record) = st.refresh_tokens.get(token) else {
        return Err(OAuthError::invalid_grant("unknown refresh token"));
    };
    let (grant_id, status) = (record.grant, record.status);
    let Some(grant) = st.grants.get(&grant_id) else {
        return Err(OAuthError::invalid_grant("unknown refresh token"));
    };
    if grant.client_id != shared.client_id {
        return Err(OAuthError::invalid_grant(
            "refresh token was issued to another client",
        ));
    }
    if grant.revoked {
        return Err(OAuthError::invalid_grant(
            "Token has been expired or revoked.",
        ));
    }
    if status == RefreshStatus::Consumed {
        if st.knobs.reuse_detection {
            st.revoke_grant(grant_id);
            st.counters.reuse_detected += 1;
            return Err(OAuthError::invalid_grant(
                "refresh token reuse detected; the grant is revoked",
            ));
        }
        return Err(OAuthError::invalid_grant("refresh token already used"));
    }
    let scopes = match form.get("scope") {
        None => grant.scopes.clone(),
        Some(_) => {
            let requested = split_scopes(form.get("scope"));
            if let Some(extra) = requested.iter().find(|s| !grant.scopes.contains(s)) {
                return Err(OAuthError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    format!("scope {extra} was not granted"),
                ));
            }
            requested
        }
    };
    let rotate = st.knobs.rotate && !st.knobs.omit_refresh_token;
    if rotate
        && !st.knobs.keep_rotated
        && let Some(old) = st.refresh_tokens.get_mut(token)
    {
        old.status = RefreshStatus::Consumed;
    }
    st.counters.refresh_successes += 1;
    // No `nonce` on refresh: it belongs to the authentication request (OIDC Core §12.2).
    Ok(issue_tokens(shared, st, grant_id, &scopes, rotate, None))
}

/// Mints an access token (and a refresh token and ID token when due) for `grant_id`, and
/// builds the RFC 6749 §5.1 response. `nonce` is that of the authorization request, on code
/// exchange only.
fn issue_tokens(
    shared: &Shared,
    st: &mut IdpState,
    grant_id: GrantId,
    scopes: &[String],
    with_refresh: bool,
    nonce: Option<&str>,
) -> Map<String, Value> {
    let now = unix_now();
    let ttl = st.knobs.access_token_ttl.as_secs();
    let access_token = random_token("at_");
    st.access_tokens.insert(
        access_token.clone(),
        AccessRecord {
            grant: grant_id,
            scopes: scopes.to_vec(),
            exp: now + ttl,
            revoked: false,
        },
    );
    let mut body = Map::new();
    body.insert("access_token".into(), access_token.into());
    body.insert("token_type".into(), "Bearer".into());
    body.insert("expires_in".into(), ttl.into());
    if matches!(shared.flavor, Flavor::Microsoft { .. }) {
        // Microsoft's "extended" lifetime, for resilience during outages; always a number.
        body.insert("ext_expires_in".into(), ttl.into());
    }
    if with_refresh {
        let refresh_token = random_token("rt_");
        st.refresh_tokens.insert(
            refresh_token.clone(),
            RefreshRecord {
                grant: grant_id,
                status: RefreshStatus::Active,
            },
        );
        body.insert("refresh_token".into(), refresh_token.into());
    }
    if !scopes.is_empty() {
        body.insert("scope".into(), scopes.join(" ").into());
    }
    if shared.issue_id_token
        && scopes.iter().any(|s| s == "openid")
        && let Some(grant) = st.grants.get(&grant_id)
    {
        let claims = id_token_claims(shared, grant, now, ttl, nonce);
        let id_token = if shared.sign_id_tokens {
            signed_jwt(st.signing_key, &claims, st.tamper_this_response)
        } else {
            unsigned_jwt(&claims)
        };
        body.insert("id_token".into(), id_token.into());
    }
    body
}

/// The claims of an ID token for `grant`, shaped like the flavor's real tokens.
fn id_token_claims(
    shared: &Shared,
    grant: &Grant,
    now: u64,
    ttl: u64,
    nonce: Option<&str>,
) -> Value {
    // Users in these tests are plain names; give them a stable address.
    let email = if grant.user.contains('@') {
        grant.user.clone()
    } else {
        format!("{}@example.com", grant.user)
    };
    let mut claims = json!({
        "iss": shared.issuer,
        "sub": grant.user,
        "aud": grant.client_id,
        "azp": grant.client_id,
        "exp": now + ttl,
        "iat": now,
        "email": email,
        "email_verified": true,
    });
    if let Some(nonce) = nonce {
        claims["nonce"] = nonce.into();
    }
    if let Flavor::Microsoft { tenant } = &shared.flavor {
        claims["tid"] = tenant.clone().into();
        claims["ver"] = "2.0".into();
        claims["preferred_username"] = email.into();
    }
    claims
}

/// A JWT with `alg: none` and an empty signature part (with
/// [`FakeIdpConfig::with_signed_id_tokens`] off). It cannot pass a real signature check.
fn unsigned_jwt(claims: &Value) -> String {
    let header = json!({ "alg": "none", "typ": "JWT" });
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// A JWS (RS256) over `claims` with the embedded test key `key`. With `tamper`, the payload is
/// replaced after signing (another `sub`), so that only the signature check can catch it.
fn signed_jwt(key: usize, claims: &Value, tamper: bool) -> String {
    let header = json!({ "alg": "RS256", "typ": "JWT", "kid": KEY_IDS[key] });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    // Signing with a valid embedded key cannot fail; should it anyway, the token goes out with
    // an empty signature, which every verifier rejects: the safe side for a test IdP.
    let signature = test_keys()[key]
        .sign(
            &CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
            signing_input.as_bytes(),
        )
        .unwrap_or_default();
    let signed_part = if tamper {
        let mut forged = claims.clone();
        let sub = forged["sub"].as_str().unwrap_or_default();
        forged["sub"] = format!("{sub}-tampered").into();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(forged.to_string())
        )
    } else {
        signing_input
    };
    format!("{signed_part}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// `client_secret_jwt` and `private_key_jwt` (RFC 7523 §2.2 and §3).
fn authenticate_assertion(
    shared: &Shared,
    headers: &HeaderMap,
    form: &Params,
) -> Result<(), OAuthError> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let method = shared.client_auth.method;
    if !matches!(
        method,
        Some(ClientAuth::SecretJwt | ClientAuth::PrivateKeyJwt)
    ) {
        return Err(OAuthError::invalid_client(
            "the client is not registered for client assertions",
        ));
    }
    let has_assertion =
        form.contains_key("client_assertion") || form.contains_key("client_assertion_type");
    let has_other =
        headers.contains_key(header::AUTHORIZATION) || form.contains_key("client_secret");
    if has_assertion && has_other {
        return Err(OAuthError::invalid_request(
            "more than one client authentication method",
        ));
    }
    if !has_assertion {
        return Err(OAuthError::invalid_client(
            "the client is registered for a client assertion",
        ));
    }
    if form.get("client_assertion_type").map(String::as_str)
        != Some(crate::provider::CLIENT_ASSERTION_TYPE)
    {
        return Err(OAuthError::invalid_client(
            "client_assertion_type missing or unsupported",
        ));
    }
    let assertion = form
        .get("client_assertion")
        .ok_or_else(|| OAuthError::invalid_client("client_assertion missing"))?;
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| OAuthError::invalid_client("malformed client assertion"))?;
    let (key, algorithms) = if method == Some(ClientAuth::SecretJwt) {
        (
            DecodingKey::from_secret(shared.client_secret.as_bytes()),
            vec![Algorithm::HS256],
        )
    } else {
        let pem = shared
            .client_auth
            .public_key_pem
            .as_deref()
            .ok_or_else(|| OAuthError::invalid_client("no public key registered"))?;
        if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
            (key, vec![Algorithm::ES256])
        } else if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
            (key, vec![Algorithm::RS256, Algorithm::PS256])
        } else {
            return Err(OAuthError::invalid_client(
                "the registered public key is unusable",
            ));
        }
    };
    if !algorithms.contains(&header.alg) {
        return Err(OAuthError::invalid_client(
            "client assertion algorithm not allowed",
        ));
    }
    let audiences = match &shared.client_auth.assertion_audience {
        Some(aud) => vec![aud.clone()],
        None => vec![format!("{}/token", shared.base), shared.issuer.clone()],
    };
    let mut validation = Validation::new(header.alg);
    validation.algorithms = algorithms;
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.set_issuer(&[&shared.client_id]);
    validation.set_audience(&audiences);
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|_| OAuthError::invalid_client("client assertion rejected"))?
        .claims;
    if claims["sub"].as_str() != Some(shared.client_id.as_str()) {
        return Err(OAuthError::invalid_client(
            "client assertion sub is not the client",
        ));
    }
    if form
        .get("client_id")
        .is_some_and(|id| *id != shared.client_id)
    {
        return Err(OAuthError::invalid_client("client_id mismatch"));
    }
    let now = unix_now();
    let exp = claims["exp"].as_u64().unwrap_or(0);
    if exp > now + 300 {
        return Err(OAuthError::invalid_client(
            "client assertion lives too long",
        ));
    }
    let jti = claims["jti"]
        .as_str()
        .filter(|j| !j.is_empty())
        .ok_or_else(|| OAuthError::invalid_client("client assertion has no jti"))?;
    if !lock(&shared.seen_assertion_ids).insert(jti.to_owned()) {
        return Err(OAuthError::invalid_client("client assertion replayed"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /revoke and /introspect

async fn revoke_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = shared.lock();
    st.counters.revocations += 1;
    if matches!(shared.flavor, Flavor::Microsoft { .. }) {
        // Microsoft has no token revocation endpoint.
        return StatusCode::NOT_FOUND.into_response();
    }
    let google = shared.is_google();
    let result = parse_form(&headers, &body).and_then(|form| {
        // Google's endpoint takes just the token; credentials, if sent, must still be right.
        let sent_credentials = headers.contains_key(header::AUTHORIZATION)
            || form.contains_key("client_id")
            || form.contains_key("client_secret");
        if !google || sent_credentials {
            authenticate(&shared, &headers, &form)?;
        }
        let token = form
            .get("token")
            .ok_or_else(|| OAuthError::invalid_request("token missing"))?;
        // `token_type_hint` is only a hint (RFC 7009 §2.1): both kinds are looked up.
        let grant = if let Some(at) = st.access_tokens.get_mut(token) {
            at.revoked = true;
            // Google revokes the whole grant whichever token is presented.
            google.then_some(at.grant)
        } else {
            st.refresh_tokens.get(token).map(|rt| rt.grant)
        };
        if let Some(grant) = grant {
            st.revoke_grant(grant);
            if google && let Some(user) = st.grants.get(&grant).map(|g| g.user.clone()) {
                // Revocation removes the app's access: the next login is a first consent.
                st.consents.remove(&user);
            }
        }
        Ok(())
    });
    match result {
        // Unknown tokens are answered with 200 too (RFC 7009 §2.2).
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// Discovery, JWKS and Microsoft's tenant-scoped aliases

async fn discovery_handler(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    match shared.flavor {
        // Microsoft serves discovery only under a tenant path.
        Flavor::Microsoft { .. } => StatusCode::NOT_FOUND.into_response(),
        Flavor::Generic | Flavor::Google => {
            shared.lock().counters.discovery_calls += 1;
            json_response(StatusCode::OK, &discovery_document(&shared, None))
        }
    }
}

async fn tenant_discovery_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(tenant): Path<String>,
) -> Response {
    if !shared.serves_tenant(&tenant) {
        return StatusCode::NOT_FOUND.into_response();
    }
    shared.lock().counters.discovery_calls += 1;
    json_response(StatusCode::OK, &discovery_document(&shared, Some(&tenant)))
}

/// The OpenID Connect discovery document; `tenant` is the path segment of a Microsoft request.
fn discovery_document(shared: &Shared, tenant: Option<&str>) -> Value {
    let base = &shared.base;
    let mut doc = json!({
        "jwks_uri": format!("{base}/jwks"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "email", "profile", "offline_access"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": match shared.client_auth.method {
            Some(method) => json!([method.method_name()]),
            None => json!(["client_secret_basic", "client_secret_post"]),
        },
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["iss", "sub", "aud", "azp", "iat", "exp", "nonce", "email", "email_verified"],
    });
    match (&shared.flavor, tenant) {
        (Flavor::Microsoft { tenant: own }, Some(tenant)) => {
            // As at Microsoft: the multi-tenant documents carry a template that the relying
            // party fills with the token's `tid`; the tenant's own document is concrete.
            doc["issuer"] = if tenant == own {
                shared.issuer.clone().into()
            } else {
                format!("{base}/{{tenantid}}/v2.0").into()
            };
            doc["authorization_endpoint"] = format!("{base}/{tenant}/oauth2/v2.0/authorize").into();
            doc["token_endpoint"] = format!("{base}/{tenant}/oauth2/v2.0/token").into();
            if let Some(claims) = doc["claims_supported"].as_array_mut() {
                claims.extend(["tid".into(), "ver".into(), "preferred_username".into()]);
            }
        }
        _ => {
            let ext = &shared.login_extensions;
            if ext.iss_in_response {
                doc["authorization_response_iss_parameter_supported"] = true.into();
            }
            if ext.par {
                doc["pushed_authorization_request_endpoint"] = format!("{base}/par").into();
            }
            if ext.require_par {
                doc["require_pushed_authorization_requests"] = true.into();
            }
            doc["issuer"] = shared.issuer.clone().into();
            doc["authorization_endpoint"] = format!("{base}/authorize").into();
            doc["token_endpoint"] = format!("{base}/token").into();
            doc["revocation_endpoint"] = format!("{base}/revoke").into();
            doc["introspection_endpoint"] = format!("{base}/introspect").into();
        }
    }
    doc
}

async fn jwks_handler(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let keys: Vec<usize> = {
        let mut st = shared.lock();
        st.counters.jwks_calls += 1;
        if st.knobs.publish_retired_keys {
            st.used_keys.clone()
        } else {
            vec![st.signing_key]
        }
    };
    let keys: Vec<Value> = keys.into_iter().map(public_jwk).collect();
    json_response(StatusCode::OK, &json!({ "keys": keys }))
}

/// The public half of embedded test key `key` as a JWK, with `kid`, `use` and `alg`.
fn public_jwk(key: usize) -> Value {
    let mut jwk =
        serde_json::to_value(test_keys()[key].as_verification_key()).unwrap_or_else(|_| json!({}));
    if let Some(fields) = jwk.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
        fields.insert("alg".into(), "RS256".into());
        fields.insert("use".into(), "sig".into());
    }
    jwk
}

async fn tenant_authorize_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(tenant): Path<String>,
    query: RawQuery,
) -> Response {
    if let Some(refused) = refuse_tenant(&shared, &tenant) {
        // At a Microsoft fake this is its authorization endpoint, answering an error, so it
        // counts like any authorization request; elsewhere the path does not exist.
        if matches!(shared.flavor, Flavor::Microsoft { .. }) {
            shared.lock().counters.authorize_requests += 1;
        }
        return refused;
    }
    authorize_handler(AxumState(shared), query).await
}

async fn tenant_token_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(tenant): Path<String>,
    conn: ConnectInfo<ConnTag>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_tenant(&shared, &tenant) {
        return refused;
    }
    token_handler(AxumState(shared), conn, headers, body).await
}

/// The answer for a tenant path this fake does not serve: 404 outside the Microsoft flavor,
/// Microsoft's "tenant not found" otherwise.
fn refuse_tenant(shared: &Shared, tenant: &str) -> Option<Response> {
    if shared.serves_tenant(tenant) {
        None
    } else if matches!(shared.flavor, Flavor::Microsoft { .. }) {
        Some(
            OAuthError::invalid_request(format!("AADSTS90002: Tenant '{tenant}' not found."))
                .into_response(),
        )
    } else {
        Some(StatusCode::NOT_FOUND.into_response())
    }
}

/// `GET /user` with `Authorization: Bearer <access token>`: the account the token belongs to,
/// as GitHub's API answers it (a stable numeric `id`, the `login`, an `email`).
async fn user_handler(AxumState(shared): AxumState<Arc<Shared>>, headers: HeaderMap) -> Response {
    let st = shared.lock();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.and_then(|t| token_info(&st, t)) {
        Some(info) if info.token_type == "Bearer" => {
            // FNV-1a: a stable number per user name, as GitHub's ids are per account.
            let id = info.sub.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            }) % 1_000_000_000;
            json_response(
                StatusCode::OK,
                &json!({ "id": id, "login": info.sub, "email": format!("{}@example.com", info.sub) }),
            )
        }
        _ => json_response(
            StatusCode::UNAUTHORIZED,
            &json!({ "message": "Bad credentials" }),
        ),
    }
}

async fn introspect_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = shared.lock();
    st.counters.introspections += 1;
    let result = parse_form(&headers, &body).and_then(|form| {
        authenticate(&shared, &headers, &form)?;
        let token = form
            .get("token")
            .ok_or_else(|| OAuthError::invalid_request("token missing"))?;
        Ok(match token_info(&st, token) {
            None => json!({ "active": false }),
            Some(info) => {
                let mut body = json!({
                    "active": true,
                    "sub": info.sub,
                    "client_id": info.client_id,
                    "scope": info.scopes.join(" "),
                    "token_type": info.token_type,
                });
                if let Some(exp) = info.exp {
                    body["exp"] = exp.into();
                }
                body
            }
        })
    });
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    }
}

// ---------------------------------------------------------------------------------------------
// A listener whose connections a handler can kill (for `Fault::DropConnection`).

struct KillableListener(TcpListener);

/// Connection info handed to handlers: the peer address and the connection's kill switch.
#[derive(Clone, Debug)]
struct ConnTag {
    // Only read through `Debug` (axum logs it).
    #[allow(dead_code)]
    peer: SocketAddr,
    kill: Arc<AtomicBool>,
}

impl Listener for KillableListener {
    type Io = KillableStream;
    type Addr = ConnTag;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok((stream, peer)) => {
                    let kill = Arc::new(AtomicBool::new(false));
                    let io = KillableStream {
                        inner: stream,
                        kill: Arc::clone(&kill),
                    };
                    return (io, ConnTag { peer, kill });
                }
                // E.g. too many open files: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(ConnTag {
            peer: self.0.local_addr()?,
            kill: Arc::new(AtomicBool::new(false)),
        })
    }
}

impl Connected<IncomingStream<'_, KillableListener>> for ConnTag {
    fn connect_info(stream: IncomingStream<'_, KillableListener>) -> Self {
        stream.remote_addr().clone()
    }
}

struct KillableStream {
    inner: TcpStream,
    kill: Arc<AtomicBool>,
}

impl KillableStream {
    fn killed(&self) -> bool {
        self.kill.load(Ordering::SeqCst)
    }
}

fn killed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "fake IdP dropped the connection",
    )
}

impl AsyncRead for KillableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.killed() {
            return Poll::Ready(Err(killed_error()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Embedded signing keys

// TEST-ONLY KEYS. These RSA private keys are PUBLIC: they are published in this source file so
// that ID tokens of the fake IdP can be verified by anyone. Never use them for anything else.
// Generated with `openssl genrsa -traditional 2048` (PKCS #1 PEM, which is what
// `CoreRsaPrivateSigningKey::from_pem` reads).

/// The `kid`s of [`TEST_KEY_PEMS`], in the same order.
const KEY_IDS: [&str; 2] = ["fake-idp-test-key-1", "fake-idp-test-key-2"];

/// Test-only, public RSA keys (see above). Key 1 signs first; [`FakeIdp::rotate_signing_key`]
/// switches to key 2.
const TEST_KEY_PEMS: [&str; 2] = [
    "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAtDIEhFD/KR5XVdm1Tm5ppl380ytEjBzs01lGJNrnoS2n+3tn
xdPRR1klvMN44BCX1U0AFVPhiHtDlRQ7N35tqndV+ftiWFGRFl3+5H1ekUuOPvFd
+A4QkUr2cTZfv6AzOplcm7lM/GYzrlyrzMghRmNEo20+9y7qwKbUoLQ9+Uaow3UL
DTiD2xaNKxkcju514Q9oKeDbiy+q5QyQ1MHr1tb585OxbCfrhOrsFfITCzjvhL6B
URmtSGIcay0X8k6O8KlxjQMPR55/LlwMtAbPhI7WAS8x5Y9O/CFxUf14hO6Nk6kf
Z9/OLwUme+pxplGQwJGqjhkmFV0EtNSuENbdVwIDAQABAoIBADv4RX6Pwku5+FDv
EqMWpfyjXQgeZ0LGQZ8ZH/oWDG6c1kIg0OmK1CSNq7yFxY20mAN6C+QNNYsJkvVj
dU3DutW3v5phqlpAUywBflomyzlJzv5tr9tlOuhP7XLCKN2KgGIpNiPxaIi7rsmB
t/+AP2rAkNBfBEyZhbE2FJ+jPNjftz6x3s+shKna4jCsQA/Ji1PpF83M6gSc8Bnw
wZah703sW3Y3isVnh1Qo56AUNfU6zepqYeYWgKnFIE0H/llmzOmusvzSMOZowj4E
MuilOIa6zHZGpLA35sC7fQubC2zZglCNh3voYT7//+TknWVCLncvXqc01cXw3pOo
CNspbMECgYEA21inMKlYl+6Sf1YwcApZtpuAYutKs7DAV8DtBzSBw2m9KmxhmgCV
fMf61kmRbVta8+Af4C9diHE5+3j9Gwv9fao5KQt4tjTIUr5MIRjKWjO+KJpotl4q
II3itCRFyWUZSm5cFkxqekN625QJipbhRaE3mxYhiP3drRmaW2kIErcCgYEA0k6K
IqBOP0zxNZ0+9QekqVRdt0OH/bLkjCluGaYH6fxne5+28eij2ow/y4OJ1SWkFOkg
TFw3eDTheE3c/V1Rf4FXJWHZD5R3WlUzykNJrx84v7LpzNiHDiVasBcrV5Dr9cj9
XPDgmp7YssT9VqK10OwV7YqWpCMBCzzsi9M4amECgYBNvfIj8SGRV+FceHPaghCi
BCNQ7Awh+/dwItTfxOBpHkUJkDhXmPVisI5a/OAqXkKyRTGHB8Ki5V6jnpI2z90c
eQShY4t5KOQHT6Mz59Fwfv5a7b9HQ8CyoRdEucZyRv7bvpms3ZCvnNMimCl5kVhu
kWFf+kwQfcnf3D81Pti5qQKBgQC6krzPnUHtvHfdZaQ9w0scgeEmPX3+318MzZCE
ppwsxCSWMwodMJN0xqmuBgMYmm0ns+5YcBMxzFAe54zfJZOwt3E1k8n6nW8JL79j
eDB9cQhqYPI0LgAa157Ny7BC3inHgkjr1DKeWb/LUSGjY3RDZb7KXwHnmbpKWwFL
xtYs4QKBgDXWH/K8PuGuWoGDsyOe/lcx6OLXaLZv27CPkcDCp6IGUVmIm6JkfGkK
wbYx76xrHxDS1dmnMl1EhCGacyC1FDFxe065wfpgueqhxMGFyRLxl+i0HfO3oD/g
ExsLDJLhtSdzYKN2dzW84edWmMlYEE+2cVegLddnBT786LupgDy8
-----END RSA PRIVATE KEY-----
",
    "-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEAj+QMXopCXSwZVCunjeFAxFVYZ8VfWweSA8Cnc9Iu/2lyNypI
ARuVcAYnox7TUZQg+TSgmWYvPSCvHA9MLePLmlZOGqJFUVNaGhOl5eXyrE08KJTq
EH/S6SLxNx9iLRBKzBigcWmwkApzXLtIn0+HwxcGmhY+Lo5/695Pf6TK9adcXIbh
GL/+t9MQST4dCeoit30YHw6IxKOqj+FWpXWtc11Vl5ltb97QXE3XiNNnFLb5/u74
sd2NC1L5YuUQChJliduhM+JtFN4BMitUP8TvhPg+NTrCNmhpwTb82UDYAnw/iDLZ
pjxk83NQICC7rulyIhgcfnNkcWnMtNV3sESXwwIDAQABAoIBAACpvlzZKkEfqOY4
ZUdEGHZPJl8kC7JxsHyP8LWZ7FmE9N/INBi9Nc0UWi5oP/UKR7SeR3ctf146vlPU
xjcX66JEb4uz37nmNm4UVRlgG+QrXvGY7hMxY5lrbc0hOeSXRKD4JBUhtYyUX7+3
pTgGt8twWblwDM1OHszJc3hVHBJRt1hLu1lwXphKxfAi+bao/ZuY7b6MBXIf6PmT
Zh2jjIEjR07/QXx+EFgte9vb14j1zQjP70Wg1e0MJpklYxO/AtGgo9OvxilCelTr
+Gk5rX7cKLrhnPukVVRVMRU+MuYb9svCt2P+Eqp5DCo+ACSl9uNPVgEF2zGE8e5j
U637R7ECgYEAxFjoDlo3nW++9QVbvm/MYjaua+YF+XVXqv53SNiz/3PhcqoapdC0
wjiVHTq3bfzgVNbdDe1jnkY7FVmsPeWB7SxFpomU38IjWQeJEkbQCACLK9xK2pfW
XK3A3ns2xumy8RDyTTi+eNMW+hm7RwlP7cjGkniZ6uumfzQ4CgzUH68CgYEAu5tK
WxOKC/PYkt1jWCEmAG20Gt2uti3vhD4GSfQIw3Sl5GOxOx6yq5qK7AcoWr6MDb/U
0AMdEMa5QC6IUFWnufGKkvigwQDPWP5MXBWz3pWsJc9SWdcY21iHkUibv3VMxxHx
lf+/e8UNzv95eS7VP3RBKsc9UVz07yCbrPQA2i0CgYAx0fFHuwKDkxgb6bkmsA1n
GkLVo+7+JhURkTHJLRs3BTs+MgVC75r98Qd8/CoQ4Wo2fLJoV0TAo0dYmoFGz1ZR
TLt7j0tUH1mCvJO+LHOapDCr92CS6JX+vCPFD/SNMj0yR7+DcpN56u3YlfDcDHPY
fOpNvgYoApUjj6dsfWbRhwKBgExD+tw/ezUUsgwyN7qR7zLpZfgt+mJRFjd6R3A0
5oMennnUFS5lcljUgHknB76sC59jRo4xVdWGE7UFtaCC0aaDjMPmkuMjAye4aS5e
HDr2OX89Ysrm6FHzEVl8XOReORIMN1u1FhCosM5fiPA8m7AqAHv1dvXmhiPX67FJ
mDcZAoGATTTY+3lj7tKygXgg77+9un8liAdrlTjjGHRnDIf6lIuYZ1qeSIKUAK7m
C5yZHTvrxkGq26c9NmnQ7iqdNYmEu8gD3g3w2Dyg9T9CXlLn/llckCDPSHTFxcAO
/Z2QK2Z7wcvLWl7d6CkDT3IIaUPhlKZKoM4HVC3OpKe/aKOFFow=
-----END RSA PRIVATE KEY-----
",
];

/// The parsed keys, shared by every fake in the process (parsing RSA keys is not free).
fn test_keys() -> &'static [CoreRsaPrivateSigningKey] {
    static KEYS: OnceLock<Vec<CoreRsaPrivateSigningKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        TEST_KEY_PEMS
            .iter()
            .zip(KEY_IDS)
            .map(|(pem, kid)| {
                CoreRsaPrivateSigningKey::from_pem(pem, Some(JsonWebKeyId::new(kid.to_owned())))
                    // A constant of this file: failing here is a bug of the fake, not of a test.
                    .expect("embedded test key is a valid PKCS #1 PEM")
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How the test client authenticates at `/token`, `/revoke` and `/introspect`.
    #[derive(Clone, Copy)]
    enum Auth<'a> {
        /// `client_secret_basic`, id and secret form-url-encoded first (RFC 6749 §2.3.1).
        Basic,
        /// `client_secret_post`.
        Body,
        /// Basic with this secret, not form-url-encoded.
        RawBasic(&'a str),
        /// Body with this secret.
        BodySecret(&'a str),
        None,
    }

    struct Reply {
        status: StatusCode,
        headers: reqwest::header::HeaderMap,
        text: String,
    }

    impl Reply {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text).expect("JSON body")
        }
        fn error(&self) -> String {
            self.json()["error"].as_str().unwrap_or_default().to_owned()
        }
        fn str(&self, field: &str) -> String {
            self.json()[field].as_str().expect(field).to_owned()
        }
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client")
    }

    fn encode(s: &str) -> String {
        url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }

    async fn post(idp: &FakeIdp, url: Url, auth: Auth<'_>, pairs: &[(&str, &str)]) -> Reply {
        try_post(idp, url, auth, pairs).await.expect("HTTP request")
    }

    async fn try_post(
        idp: &FakeIdp,
        url: Url,
        auth: Auth<'_>,
        pairs: &[(&str, &str)],
    ) -> Result<Reply, reqwest::Error> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            form.append_pair(k, v);
        }
        let mut req = http()
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded");
        match auth {
            Auth::Basic => {
                let creds = format!(
                    "{}:{}",
                    encode(idp.client_id()),
                    encode(idp.client_secret())
                );
                req = req.header("authorization", format!("Basic {}", STANDARD.encode(creds)));
            }
            Auth::RawBasic(secret) => req = req.basic_auth(idp.client_id(), Some(secret)),
            Auth::Body => {
                form.append_pair("client_id", idp.client_id());
                form.append_pair("client_secret", idp.client_secret());
            }
            Auth::BodySecret(secret) => {
                form.append_pair("client_id", idp.client_id());
                form.append_pair("client_secret", secret);
            }
            Auth::None => {}
        }
        let resp = req.body(form.finish()).send().await?;
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        let headers = resp.headers().clone();
        let text = resp.text().await?;
        Ok(Reply {
            status,
            headers,
            text,
        })
    }

    const REDIRECT: &str = "http://127.0.0.1:9/callback";

    /// A PKCE pair: (verifier, S256 challenge).
    fn pkce() -> (String, String) {
        let verifier = random_token("verifier-0123456789-");
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        (verifier, challenge)
    }

    fn authorization_url(
        idp: &FakeIdp,
        scope: &str,
        challenge: &str,
        extra: &[(&str, &str)],
    ) -> Url {
        let mut url = idp.authorization_endpoint();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", idp.client_id())
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("scope", scope)
            .append_pair("state", "st-1")
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256")
            .extend_pairs(extra);
        url
    }

    async fn get(url: Url) -> (StatusCode, Option<Url>, String) {
        let resp = http().get(url).send().await.expect("GET");
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        let location = resp
            .headers()
            .get("location")
            .map(|l| Url::parse(l.to_str().expect("ascii")).expect("Location URL"));
        (status, location, resp.text().await.expect("body"))
    }

    fn query(url: &Url, name: &str) -> Option<String> {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    async fn exchange(idp: &FakeIdp, code: &str, verifier: &str, auth: Auth<'_>) -> Reply {
        post(
            idp,
            idp.token_endpoint(),
            auth,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", verifier),
            ],
        )
        .await
    }

    async fn refresh_with(idp: &FakeIdp, rt: &str, extra: &[(&str, &str)]) -> Reply {
        let mut pairs = vec![("grant_type", "refresh_token"), ("refresh_token", rt)];
        pairs.extend_from_slice(extra);
        post(idp, idp.token_endpoint(), Auth::Basic, &pairs).await
    }

    /// Runs the code flow through `FakeIdp::authorize` and returns the token response.
    async fn login(idp: &FakeIdp, user: &str, scope: &str) -> Reply {
        let (verifier, challenge) = pkce();
        let url = authorization_url(idp, scope, &challenge, &[]);
        let cb = idp.authorize(&url, user).expect("authorize");
        let reply = exchange(idp, &cb.code, &verifier, Auth::Basic).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply
    }

    async fn introspect(idp: &FakeIdp, token: &str) -> Value {
        let reply = post(
            idp,
            idp.introspection_endpoint(),
            Auth::Basic,
            &[("token", token)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        reply.json()
    }

    fn jwt_claims(jwt: &str) -> Value {
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3, "header.payload.signature");
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("b64")).expect("json");
        // Signed by default (RS256 with an embedded test key); see `signed_id_tokens_verify`.
        assert_eq!(header["alg"], "RS256");
        assert!(KEY_IDS.contains(&header["kid"].as_str().expect("kid")));
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("b64")).expect("json")
    }

    #[tokio::test]
    async fn code_flow_over_http_with_pkce() {
        let idp = FakeIdp::start_default().await.unwrap();
        let (verifier, challenge) = pkce();
        let url = authorization_url(
            &idp,
            "openid email",
            &challenge,
            &[("login_hint", "bob"), ("nonce", "n-0S6")],
        );
        let (status, location, _) = get(url).await;
        assert_eq!(status, StatusCode::FOUND);
        let location = location.expect("Location");
        assert_eq!(&location[..Position::AfterPath], REDIRECT);
        assert_eq!(query(&location, "state").as_deref(), Some("st-1"));
        let code = query(&location, "code").expect("code");

        let reply = exchange(&idp, &code, &verifier, Auth::Basic).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(reply.headers["cache-control"], "no-store");
        let body = reply.json();
        assert!(body["access_token"].as_str().unwrap().starts_with("at_"));
        assert!(body["refresh_token"].as_str().unwrap().starts_with("rt_"));
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["scope"], "openid email");
        let claims = jwt_claims(body["id_token"].as_str().unwrap());
        assert_eq!(claims["iss"], idp.issuer());
        assert_eq!(claims["sub"], "bob");
        assert_eq!(claims["aud"], idp.client_id());
        assert_eq!(claims["nonce"], "n-0S6");
        assert!(claims["exp"].as_u64() > claims["iat"].as_u64());

        let info = introspect(&idp, body["access_token"].as_str().unwrap()).await;
        assert_eq!(info["active"], true);
        assert_eq!(info["sub"], "bob");
        assert_eq!(info["scope"], "openid email");
        assert_eq!(info["token_type"], "Bearer");

        let c = idp.counters();
        assert_eq!(
            (c.authorize_requests, c.code_exchanges, c.token_requests),
            (1, 1, 1)
        );
        assert_eq!(c.introspections, 1);
    }

    #[tokio::test]
    async fn no_id_token_without_openid_scope() {
        let idp = FakeIdp::start_default().await.unwrap();
        let body = login(&idp, "alice", "email").await.json();
        assert!(body.get("id_token").is_none());
        let idp = FakeIdp::start(FakeIdpConfig::default().with_id_token(false))
            .await
            .unwrap();
        let body = login(&idp, "alice", "openid").await.json();
        assert!(body.get("id_token").is_none());
    }

    #[tokio::test]
    async fn wrong_or_missing_verifier_is_rejected() {
        let idp = FakeIdp::start_default().await.unwrap();
        let (_, challenge) = pkce();
        let (other_verifier, _) = pkce();
        let cb = idp
            .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
            .unwrap();
        let reply = exchange(&idp, &cb.code, &other_verifier, Auth::Basic).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.error(), "invalid_grant");

        let (verifier, challenge) = pkce();
        let cb = idp
            .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
            .unwrap();
        let reply = post(
            &idp,
            idp.token_endpoint(),
            Auth::Basic,
            &[
                ("grant_type", "authorization_code"),
                ("code", &cb.code),
                ("redirect_uri", REDIRECT),
            ],
        )
        .await;
        assert_eq!(reply.error(), "invalid_request");
        // The failed attempt consumed the code.
        let reply = exchange(&idp, &cb.code, &verifier, Auth::Basic).await;
        assert_eq!(reply.error(), "invalid_grant");
    }

    #[tokio::test]
    async fn redirect_uri_must_match_the_authorization_request() {
        let idp = FakeIdp::start_default().await.unwrap();
        let (verifier, challenge) = pkce();
        let cb = idp
            .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
            .unwrap();
        let reply = post(
            &idp,
            idp.token_endpoint(),
            Auth::Basic,
            &[
                ("grant_type", "authorization_code"),
                ("code", &cb.code),
                ("redirect_uri", "http://127.0.0.1:9/other"),
                ("code_verifier", &verifier),
            ],
        )
        .await;
        assert_eq!(reply.error(), "invalid_grant");
    }

    #[tokio::test]
    async fn expired_code_and_expired_access_token() {
        let config = FakeIdpConfig::default()
            .with_code_ttl(Duration::ZERO)
            .with_access_token_ttl(Duration::ZERO);
        let idp = FakeIdp::start(config).await.unwrap();
        let (verifier, challenge) = pkce();
        let cb = idp
            .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
            .unwrap();
        let reply = exchange(&idp, &cb.code, &verifier, Auth::Basic).await;
        assert_eq!(reply.error(), "invalid_grant");

        idp.reset_counters();
        let idp = FakeIdp::start(FakeIdpConfig::default().with_access_token_ttl(Duration::ZERO))
            .await
            .unwrap();
        let body = login(&idp, "alice", "email").await.json();
        assert_eq!(body["expires_in"], 0);
        assert!(!idp.is_active(body["access_token"].as_str().unwrap()));
        assert!(idp.is_active(body["refresh_token"].as_str().unwrap()));
    }

    #[tokio::test]
    async fn authorize_rejections() {
        let config = FakeIdpConfig::default().with_redirect_uri(Url::parse(REDIRECT).unwrap());
        let idp = FakeIdp::start(config).await.unwrap();
        let (_, challenge) = pkce();

        // Unknown client: a 400 page, no redirect.
        let mut url = authorization_url(&idp, "email", &challenge, &[]);
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "client_id" {
                    "intruder".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
        let (status, location, page) = get(url.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(location.is_none());
        assert!(page.contains("unknown client_id"));
        assert!(matches!(
            idp.authorize(&url, "alice"),
            Err(FakeIdpError::BadRequest { .. })
        ));

        // Unregistered redirect URI: a 400 page, no redirect.
        let mut url = idp.authorization_endpoint();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", idp.client_id())
            .append_pair("redirect_uri", "http://evil.example/cb")
            .append_pair("state", "s")
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        let (status, location, _) = get(url).await;
        assert_eq!((status, location), (StatusCode::BAD_REQUEST, None));

        // No PKCE: an error redirect.
        let mut url = idp.authorization_endpoint();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", idp.client_id())
            .append_pair("redirect_uri", REDIRECT)
            .append_pair("state", "s");
        let (status, location, _) = get(url).await;
        assert_eq!(status, StatusCode::FOUND);
        let location = location.unwrap();
        assert_eq!(
            query(&location, "error").as_deref(),
            Some("invalid_request")
        );
        assert_eq!(query(&location, "state").as_deref(), Some("s"));

        // `plain` PKCE is refused.
        let url = authorization_url(&idp, "email", &challenge, &[])
            .as_str()
            .replace("code_challenge_method=S256", "code_challenge_method=plain");
        let err = idp
            .authorize(&Url::parse(&url).unwrap(), "alice")
            .unwrap_err();
        assert!(
            matches!(err, FakeIdpError::Redirected { ref error, .. } if error == "invalid_request")
        );

        // Not this IdP's endpoint.
        let mut elsewhere = authorization_url(&idp, "email", &challenge, &[]);
        elsewhere.set_path("/oauth/authorize");
        assert!(matches!(
            idp.authorize(&elsewhere, "alice"),
            Err(FakeIdpError::BadRequest { .. })
        ));
        assert_eq!(idp.counters().authorize_requests, 6);
    }

    #[tokio::test]
    async fn deny_consent_redirects_with_access_denied() {
        let idp = FakeIdp::start_default().await.unwrap();
        idp.set_deny_consent(true);
        let (_, challenge) = pkce();
        let url = authorization_url(&idp, "email", &challenge, &[]);
        let (status, location, _) = get(url.clone()).await;
        assert_eq!(status, StatusCode::FOUND);
        let location = location.unwrap();
        assert_eq!(query(&location, "error").as_deref(), Some("access_denied"));
        assert_eq!(query(&location, "state").as_deref(), Some("st-1"));
        assert!(query(&location, "code").is_none());
        match idp.authorize(&url, "alice") {
            Err(FakeIdpError::Redirected {
                error,
                state,
                redirect_url,
                ..
            }) => {
                assert_eq!(error, "access_denied");
                assert_eq!(state.as_deref(), Some("st-1"));
                assert_eq!(
                    query(&redirect_url, "error").as_deref(),
                    Some("access_denied")
                );
            }
            other => panic!("expected access_denied, got {other:?}"),
        }
        idp.set_deny_consent(false);
        let cb = idp.authorize(&url, "alice").unwrap();
        assert_eq!(cb.state, "st-1");
        assert_eq!(query(&cb.redirect_url, "code"), Some(cb.code));
    }

    #[tokio::test]
    async fn replayed_code_is_rejected_and_revokes_its_tokens() {
        let idp = FakeIdp::start_default().await.unwrap();
        let (verifier, challenge) = pkce();
        let cb = idp
            .authorize(&authorization_url(&idp, "email", &challenge, &[]), "alice")
            .unwrap();
        let first = exchange(&idp, &cb.code, &verifier, Auth::Basic)
            .await
            .json();
        let at = first["access_token"].as_str().unwrap();
        let rt = first["refresh_token"].as_str().unwrap();
        assert!(idp.is_active(at) && idp.is_active(rt));

        let replay = exchange(&idp, &cb.code, &verifier, Auth::Basic).await;
        assert_eq!(replay.status, StatusCode::BAD_REQUEST);
        assert_eq!(replay.error(), "invalid_grant");
        assert!(!idp.is_active(at));
        assert!(!idp.is_active(rt));
        assert_eq!(refresh_with(&idp, rt, &[]).await.error(), "invalid_grant");
        assert_eq!(idp.counters().code_exchanges, 2);
    }

    #[tokio::test]
    async fn refresh_rotates() {
        let idp = FakeIdp::start_default().await.unwrap();
        let rt1 = login(&idp, "alice", "openid email")
            .await
            .str("refresh_token");
        let reply = refresh_with(&idp, &rt1, &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        let body = reply.json();
        let rt2 = body["refresh_token"].as_str().unwrap();
        assert_ne!(rt1, rt2);
        assert_eq!(body["scope"], "openid email");
        assert!(body["id_token"].is_string());
        assert!(!idp.is_active(&rt1));
        assert!(idp.is_active(rt2));
        assert!(idp.is_active(body["access_token"].as_str().unwrap()));
        let c = idp.counters();
        assert_eq!(
            (c.refresh_calls, c.refresh_successes, c.reuse_detected),
            (1, 1, 0)
        );
    }

    #[tokio::test]
    async fn reuse_of_a_rotated_refresh_token_revokes_the_family() {
        let idp = FakeIdp::start_default().await.unwrap();
        let first = login(&idp, "alice", "email").await.json();
        let at1 = first["access_token"].as_str().unwrap();
        let rt1 = first["refresh_token"].as_str().unwrap();
        let second = refresh_with(&idp, rt1, &[]).await.json();
        let at2 = second["access_token"].as_str().unwrap();
        let rt2 = second["refresh_token"].as_str().unwrap();

        let reuse = refresh_with(&idp, rt1, &[]).await;
        assert_eq!(reuse.status, StatusCode::BAD_REQUEST);
        assert_eq!(reuse.error(), "invalid_grant");
        for token in [at1, rt1, at2, rt2] {
            assert!(!idp.is_active(token), "{token} should be revoked");
        }
        assert_eq!(refresh_with(&idp, rt2, &[]).await.error(), "invalid_grant");
        let c = idp.counters();
        assert_eq!(
            (c.refresh_calls, c.refresh_successes, c.reuse_detected),
            (3, 1, 1)
        );

        // Another user's grant is untouched.
        let other = login(&idp, "bob", "email").await.str("refresh_token");
        assert!(idp.is_active(&other));
    }

    #[tokio::test]
    async fn reuse_without_detection_only_fails() {
        let idp = FakeIdp::start(FakeIdpConfig::default().with_reuse_detection(false))
            .await
            .unwrap();
        let rt1 = login(&idp, "alice", "email").await.str("refresh_token");
        let rt2 = refresh_with(&idp, &rt1, &[]).await.str("refresh_token");
        assert_eq!(refresh_with(&idp, &rt1, &[]).await.error(), "invalid_grant");
        assert!(idp.is_active(&rt2));
        assert_eq!(idp.counters().reuse_detected, 0);
    }

    #[tokio::test]
    async fn rotation_off_returns_no_refresh_token() {
        let idp = FakeIdp::start_default().await.unwrap();
        idp.set_rotation(false);
        let rt = login(&idp, "alice", "email").await.str("refresh_token");
        for _ in 0..2 {
            let reply = refresh_with(&idp, &rt, &[]).await;
            assert_eq!(reply.status, StatusCode::OK);
            assert!(reply.json().get("refresh_token").is_none());
        }
        assert!(idp.is_active(&rt));
        assert_eq!(idp.counters().refresh_successes, 2);
    }

    #[tokio::test]
    async fn omit_refresh_token() {
        let idp = FakeIdp::start(FakeIdpConfig::default().with_omit_refresh_token(true))
            .await
            .unwrap();
        let body = login(&idp, "alice", "email").await.json();
        assert!(body.get("refresh_token").is_none());
        assert!(body["access_token"].is_string());

        // Switched on later: an existing grant refreshes without rotation.
        let idp = FakeIdp::start_default().await.unwrap();
        let rt = login(&idp, "alice", "email").await.str("refresh_token");
        idp.set_omit_refresh_token(true);
        let reply = refresh_with(&idp, &rt, &[]).await;
        assert!(reply.json().get("refresh_token").is_none());
        assert!(idp.is_active(&rt));
    }

    #[tokio::test]
    async fn refresh_with_narrower_scope() {
        let idp = FakeIdp::start_default().await.unwrap();
        let rt1 = login(&idp, "alice", "openid email drive")
            .await
            .str("refresh_token");

        let wider = refresh_with(&idp, &rt1, &[("scope", "email admin")]).await;
        assert_eq!(wider.status, StatusCode::BAD_REQUEST);
        assert_eq!(wider.error(), "invalid_scope");
        assert!(idp.is_active(&rt1), "a refused refresh consumes nothing");

        let narrow = refresh_with(&idp, &rt1, &[("scope", "email")]).await.json();
        assert_eq!(narrow["scope"], "email");
        assert!(narrow.get("id_token").is_none());
        let info = introspect(&idp, narrow["access_token"].as_str().unwrap()).await;
        assert_eq!(info["scope"], "email");
        // The grant keeps its scopes: the new refresh token can ask for all of them again.
        let rt2 = narrow["refresh_token"].as_str().unwrap();
        let full = refresh_with(&idp, rt2, &[]).await.json();
        assert_eq!(full["scope"], "openid email drive");
    }

    #[tokio::test]
    async fn revoke_and_introspect() {
        let idp = FakeIdp::start_default().await.unwrap();
        let body = login(&idp, "alice", "email").await.json();
        let at = body["access_token"].as_str().unwrap();
        let rt = body["refresh_token"].as_str().unwrap();

        let info = introspect(&idp, rt).await;
        assert_eq!(info["active"], true);
        assert_eq!(info["sub"], "alice");
        assert_eq!(info["token_type"], "refresh_token");

        let reply = post(
            &idp,
            idp.revocation_endpoint(),
            Auth::Body,
            &[("token", at), ("token_type_hint", "access_token")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(introspect(&idp, at).await, json!({ "active": false }));
        assert!(
            idp.is_active(rt),
            "revoking an access token leaves the grant"
        );

        let second = refresh_with(&idp, rt, &[]).await.json();
        let at2 = second["access_token"].as_str().unwrap();
        let rt2 = second["refresh_token"].as_str().unwrap();
        let reply = post(
            &idp,
            idp.revocation_endpoint(),
            Auth::Basic,
            &[("token", rt2)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(!idp.is_active(rt2));
        assert!(
            !idp.is_active(at2),
            "revoking a refresh token revokes the grant"
        );

        let reply = post(
            &idp,
            idp.revocation_endpoint(),
            Auth::Basic,
            &[("token", "nonsense")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(introspect(&idp, "nonsense").await["active"], false);

        let reply = post(
            &idp,
            idp.revocation_endpoint(),
            Auth::BodySecret("bad"),
            &[("token", rt)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        let reply = post(
            &idp,
            idp.introspection_endpoint(),
            Auth::None,
            &[("token", rt)],
        )
        .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

        let c = idp.counters();
        assert_eq!((c.revocations, c.introspections), (4, 4));
    }

    #[tokio::test]
    async fn server_side_revocation_of_a_user() {
        let idp = FakeIdp::start_default().await.unwrap();
        let alice = login(&idp, "alice", "email").await.str("refresh_token");
        let bob = login(&idp, "bob", "email").await.str("refresh_token");
        idp.revoke_user_grants("alice");
        assert_eq!(
            refresh_with(&idp, &alice, &[]).await.error(),
            "invalid_grant"
        );
        assert_eq!(idp.counters().reuse_detected, 0);
        assert_eq!(refresh_with(&idp, &bob, &[]).await.status, StatusCode::OK);
    }

    #[tokio::test]
    async fn client_authentication() {
        let secret = "s3cr~t+/:%x y";
        let idp = FakeIdp::start(FakeIdpConfig::default().with_client_secret(secret))
            .await
            .unwrap();
        let rt = login(&idp, "alice", "email").await.str("refresh_token");
        let grant = [
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
        ];

        // Basic with form-url-encoding (RFC 6749 §2.3.1), then the body method.
        let reply = post(&idp, idp.token_endpoint(), Auth::Basic, &grant).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        let rt = reply.str("refresh_token");
        let grant = [
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
        ];
        let reply = post(&idp, idp.token_endpoint(), Auth::Body, &grant).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        let rt = reply.str("refresh_token");
        let grant = [
            ("grant_type", "refresh_token"),
            ("refresh_token", rt.as_str()),
        ];

        // Failures: none of them consumes the refresh token.
        for auth in [
            Auth::RawBasic(secret),
            Auth::BodySecret("wrong"),
            Auth::None,
        ] {
            let reply = post(&idp, idp.token_endpoint(), auth, &grant).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
            assert_eq!(reply.error(), "invalid_client");
            assert!(reply.headers.contains_key("www-authenticate"));
        }
        // Two methods at once.
        let mut both = grant.to_vec();
        both.push(("client_secret", secret));
        let reply = post(&idp, idp.token_endpoint(), Auth::Basic, &both).await;
        assert_eq!(reply.error(), "invalid_request");
        assert!(idp.is_active(&rt));
        let c = idp.counters();
        assert_eq!((c.refresh_calls, c.refresh_successes), (6, 2));
    }

    #[tokio::test]
    async fn bad_token_requests() {
        let idp = FakeIdp::start_default().await.unwrap();
        let reply = post(
            &idp,
            idp.token_endpoint(),
            Auth::Basic,
            &[("grant_type", "password")],
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST);
        assert_eq!(reply.error(), "unsupported_grant_type");

        let reply = http()
            .post(idp.token_endpoint())
            .header("content-type", "application/json")
            .body(r#"{"grant_type":"refresh_token"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status().as_u16(), 400);

        let reply = post(
            &idp,
            idp.token_endpoint(),
            Auth::Basic,
            &[
                ("grant_type", "refresh_token"),
                ("refresh_token", "rt_unknown"),
            ],
        )
        .await;
        assert_eq!(reply.error(), "invalid_grant");
        let c = idp.counters();
        assert_eq!(
            (c.token_requests, c.refresh_calls, c.refresh_successes),
            (3, 1, 0)
        );
    }

    /// A fresh IdP with one logged-in grant; returns its refresh token.
    async fn idp_with_grant() -> (FakeIdp, String) {
        let idp = FakeIdp::start_default().await.unwrap();
        let rt = login(&idp, "alice", "email").await.str("refresh_token");
        idp.reset_counters();
        (idp, rt)
    }

    #[tokio::test]
    async fn fault_status_pages() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::Status {
            status: 503,
            body: "<html><h1>Service Unavailable</h1></html>".into(),
            retry_after: None,
        });
        idp.inject(Fault::Status {
            status: 429,
            body: r#"{"error":"slow_down"}"#.into(),
            retry_after: Some(7),
        });
        assert_eq!(idp.pending_faults(), 2);

        let reply = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            reply.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(reply.text.contains("Service Unavailable"));
        assert!(idp.is_active(&rt));

        let reply = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(reply.headers["retry-after"], "7");
        assert_eq!(reply.error(), "slow_down");
        assert!(idp.is_active(&rt));

        assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
        let c = idp.counters();
        assert_eq!((c.refresh_calls, c.refresh_successes), (3, 1));
    }

    #[tokio::test]
    async fn fault_bodies() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::GarbageBody);
        idp.inject(Fault::TruncatedJson);
        idp.inject(Fault::InvalidGrant);
        idp.inject(Fault::ErrorWith200 {
            error: "bad_verification_code".into(),
        });

        let garbage = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(garbage.status, StatusCode::OK);
        assert!(serde_json::from_str::<Value>(&garbage.text).is_err());

        let truncated = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(truncated.status, StatusCode::OK);
        assert_eq!(truncated.text, r#"{"access_token":"x","tok"#);
        assert!(serde_json::from_str::<Value>(&truncated.text).is_err());

        let invalid = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
        assert_eq!(invalid.error(), "invalid_grant");
        assert!(invalid.json()["error_description"].is_string());

        let github = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(github.status, StatusCode::OK);
        assert_eq!(github.error(), "bad_verification_code");
        assert!(github.json().get("access_token").is_none());

        // None of them touched the grant.
        assert!(idp.is_active(&rt));
        assert_eq!(idp.counters().reuse_detected, 0);
        assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
        let c = idp.counters();
        assert_eq!((c.refresh_calls, c.refresh_successes), (5, 1));
    }

    #[tokio::test]
    async fn fault_expires_in_as_string_still_rotates() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::ExpiresInAsString);
        let reply = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        let body = reply.json();
        assert_eq!(body["expires_in"], "3600");
        assert!(idp.is_active(body["refresh_token"].as_str().unwrap()));
        assert!(!idp.is_active(&rt));
        // Only successful answers are rewritten; the next one is normal.
        let reply = refresh_with(&idp, body["refresh_token"].as_str().unwrap(), &[]).await;
        assert_eq!(reply.json()["expires_in"], 3600);
    }

    #[tokio::test]
    async fn fault_drop_connection() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::DropConnection);
        let form = format!("grant_type=refresh_token&refresh_token={rt}");
        let result = http()
            .post(idp.token_endpoint())
            .basic_auth(idp.client_id(), Some(idp.client_secret()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await;
        let err = result.expect_err("no response expected");
        assert!(err.is_request() || err.is_connect(), "{err:?}");
        assert!(idp.is_active(&rt));
        assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
        let c = idp.counters();
        assert_eq!((c.refresh_calls, c.refresh_successes), (2, 1));
    }

    /// Sends a refresh request and returns the response as soon as its headers are in.
    async fn refresh_headers_only(idp: &FakeIdp, rt: &str) -> reqwest::Response {
        http()
            .post(idp.token_endpoint())
            .basic_auth(idp.client_id(), Some(idp.client_secret()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("grant_type=refresh_token&refresh_token={rt}"))
            .send()
            .await
            .expect("status and headers arrive")
    }

    #[tokio::test]
    async fn fault_slow_body_sends_headers_then_stalls() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::SlowBody {
            chunk_len: 16,
            pause: Duration::from_secs(3600),
        });
        let mut resp = refresh_headers_only(&idp, &rt).await;
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let declared = resp.content_length().expect("Content-Length");
        let first = resp
            .chunk()
            .await
            .expect("first chunk")
            .expect("body bytes");
        assert!(first.starts_with(b"{\""), "{first:?}");
        assert!((first.len() as u64) < declared);
        // The rest waits an hour: it is not there a moment later.
        let more = tokio::time::timeout(Duration::from_millis(50), resp.chunk()).await;
        assert!(more.is_err(), "the body went on: {more:?}");
        drop(resp);

        // Counted as a refresh call, and nothing was consumed or rotated.
        let c = idp.counters();
        assert_eq!((c.refresh_calls, c.refresh_successes), (1, 0));
        assert!(idp.is_active(&rt));
        assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
        assert_eq!(idp.counters().reuse_detected, 0);
    }

    #[tokio::test]
    async fn fault_slow_body_never_completes() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::SlowBody {
            chunk_len: 8,
            pause: Duration::from_millis(1),
        });
        let mut resp = refresh_headers_only(&idp, &rt).await;
        let declared = resp.content_length().expect("Content-Length");
        let mut got = Vec::new();
        let end = loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => got.extend_from_slice(&chunk),
                other => break other,
            }
        };
        assert!(end.is_err(), "the body completed: {end:?}");
        // Dribbled up to its last byte, which never comes.
        assert_eq!(got.len() as u64, declared - 1);
        assert!(serde_json::from_slice::<Value>(&got).is_err());
        assert!(idp.is_active(&rt));
        assert_eq!(idp.counters().refresh_successes, 0);
    }

    #[tokio::test]
    async fn fault_delay_and_token_delay_answer_normally() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::Delay(Duration::from_millis(20)));
        let reply = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        let rt = reply.str("refresh_token");

        idp.set_token_delay(Some(Duration::from_millis(10)));
        let reply = refresh_with(&idp, &rt, &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        idp.set_token_delay(None);
        let c = idp.counters();
        assert_eq!((c.refresh_calls, c.refresh_successes), (2, 2));
    }

    #[tokio::test]
    async fn client_time_out_during_delay_leaves_the_grant() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject(Fault::Delay(Duration::from_secs(3600)));
        let form = format!("grant_type=refresh_token&refresh_token={rt}");
        let result = http()
            .post(idp.token_endpoint())
            .basic_auth(idp.client_id(), Some(idp.client_secret()))
            .header("content-type", "application/x-www-form-urlencoded")
            .timeout(Duration::from_millis(50))
            .body(form)
            .send()
            .await;
        assert!(result.expect_err("timed out").is_timeout());
        assert!(idp.is_active(&rt));
        assert_eq!(idp.counters().refresh_calls, 1);
    }

    #[tokio::test]
    async fn faults_are_consumed_in_order() {
        let (idp, rt) = idp_with_grant().await;
        idp.inject_n(Fault::InvalidGrant, 2);
        idp.inject(Fault::GarbageBody);
        assert_eq!(refresh_with(&idp, &rt, &[]).await.error(), "invalid_grant");
        assert_eq!(refresh_with(&idp, &rt, &[]).await.error(), "invalid_grant");
        assert!(serde_json::from_str::<Value>(&refresh_with(&idp, &rt, &[]).await.text).is_err());
        assert_eq!(idp.pending_faults(), 0);
        idp.inject(Fault::InvalidGrant);
        idp.clear_faults();
        assert_eq!(refresh_with(&idp, &rt, &[]).await.status, StatusCode::OK);
        let c = idp.counters();
        assert_eq!(
            (c.token_requests, c.refresh_calls, c.refresh_successes),
            (4, 4, 1)
        );
    }

    #[tokio::test]
    async fn shutdown_and_last_drop_stop_the_server() {
        let idp = FakeIdp::start_default().await.unwrap();
        let clone = idp.clone();
        clone.shutdown().await;
        let result = try_post(&idp, idp.token_endpoint(), Auth::Basic, &[]).await;
        assert!(result.is_err());

        let idp = FakeIdp::start_default().await.unwrap();
        let addr = idp.base_url();
        let addr = format!("{}:{}", addr.host_str().unwrap(), addr.port().unwrap());
        drop(idp);
        let mut refused = false;
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(&addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            refused,
            "server still accepting after the last clone was dropped"
        );
    }

    #[tokio::test]
    async fn debug_hides_the_secret() {
        let config = FakeIdpConfig::default().with_client_secret("very-secret-value");
        assert!(!format!("{config:?}").contains("very-secret-value"));
        let idp = FakeIdp::start(config).await.unwrap();
        let shown = format!("{idp:?}");
        assert!(!shown.contains("very-secret-value"));
        assert!(shown.contains(idp.client_id()));
    }
}

// ---------------------------------------------------------------------------------------------
// Pushed authorization requests (RFC 9126)

#[derive(Default)]
struct PushedRequests {
    requests: HashMap<String, PushedRequest>,
    faults: VecDeque<Fault>,
}

struct PushedRequest {
    params: Params,
    expires: Instant,
}

const REQUEST_URI_PREFIX: &str = "urn:ietf:params:oauth:request_uri:";

/// `POST /par`: client authentication as at `/token`, then the parameters are stored under a
/// fresh, single-use `request_uri`.
async fn par_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnTag>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = {
        let mut st = shared.lock();
        st.counters.par_requests += 1;
        st.pushed.faults.pop_front()
    };
    match fault {
        None | Some(Fault::ExpiresInAsString) | Some(Fault::TamperedIdToken) => {}
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(fault) => return fault_response(fault, &conn),
    }
    let result = parse_form(&headers, &body).and_then(|mut form| {
        authenticate(&shared, &headers, &form)?;
        if form.contains_key("request_uri") || form.contains_key("request") {
            return Err(OAuthError::invalid_request(
                "request_uri and request must not be pushed",
            ));
        }
        form.remove("client_secret");
        form.insert("client_id".to_owned(), shared.client_id.clone());
        let ttl = shared.login_extensions.request_uri_ttl;
        let request_uri = random_token(REQUEST_URI_PREFIX);
        let mut st = shared.lock();
        let now = Instant::now();
        st.pushed.requests.retain(|_, p| p.expires > now);
        st.pushed.requests.insert(
            request_uri.clone(),
            PushedRequest {
                params: form,
                expires: now + ttl,
            },
        );
        st.counters.par_successes += 1;
        Ok(json!({ "request_uri": request_uri, "expires_in": ttl.as_secs().max(1) }))
    });
    match result {
        Ok(body) => json_response(StatusCode::CREATED, &body),
        Err(e) => e.into_response(),
    }
}

/// The pushed parameters an authorization request's `request_uri` names (used up here), or
/// `None` for a request without one. A request without `request_uri` where PAR is required,
/// and an unknown, used or expired `request_uri`, are refused without a redirect.
#[expect(
    clippy::result_large_err,
    reason = "a rare test-helper error; keeping `Url` unboxed reads better"
)]
fn resolve_request_uri(
    shared: &Shared,
    st: &mut IdpState,
    params: &Params,
) -> Result<Option<Params>, FakeIdpError> {
    let bad = |description: &str| FakeIdpError::BadRequest {
        description: description.to_owned(),
    };
    let Some(request_uri) = params.get("request_uri") else {
        if shared.login_extensions.require_par {
            return Err(bad(
                "pushed authorization requests are required: request_uri missing",
            ));
        }
        return Ok(None);
    };
    st.counters.request_uri_uses += 1;
    // Single use: removed whether or not the rest of the request is good.
    let pushed = st
        .pushed
        .requests
        .remove(request_uri)
        .filter(|p| p.expires > Instant::now())
        .ok_or_else(|| bad("request_uri is invalid, expired, or was already used"))?;
    if params.get("client_id") != pushed.params.get("client_id") {
        return Err(bad("client_id does not match the pushed request's"));
    }
    Ok(Some(pushed.params))
}
