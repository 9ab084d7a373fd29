//! Upstream identity providers: the [`Provider`] trait and the generic OAuth 2.0 provider.
//!
//! The broker owns the login security parameters (state, PKCE S256 verifier, nonce) and the
//! refresh protocol; a provider only speaks its IdP's dialect: how to build the authorization
//! URL, how to call the token endpoint, how to read its answers and classify its errors.

mod client_auth;
mod oauth2;
mod oidc;
mod quirks;
mod response;

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use url::Url;

use crate::error::BoxError;
use crate::ids::{ProviderId, Scopes};
use crate::secret::Secret;
use crate::token::ProviderTokens;

pub use self::client_auth::{
    CLIENT_ASSERTION_LIFETIME_SECS, CLIENT_ASSERTION_TYPE, ClientAssertionAlgorithm,
    ClientAssertionAudience, ClientAssertionKey, ClientAssertionKeyError, ClientCredentials,
    SharedClientAssertionKey,
};
pub use self::oauth2::ParMode;
pub use self::oauth2::{AccountEndpoint, ClientAuth, OAuth2Config, OAuth2Provider};
pub use self::oidc::{IssuerPolicy, MicrosoftAuthority, OidcConfig, OidcProvider, VerifiedIdToken};
pub use self::quirks::{GitHubQuirks, GoogleQuirks, MicrosoftQuirks, Quirks, StandardQuirks};
pub use self::response::{classify_error_response, parse_token_response};

/// The authorization request parameters the broker (or the provider it drives) sets on every
/// login, which host-supplied extra parameters may not name: configured ones
/// ([`OAuth2Config::with_authorize_param`]) are refused when the broker is built, per-login ones
/// ([`LoginOptions::with_param`](crate::LoginOptions::with_param)) when the login starts, both
/// with a typed error naming the parameter ([`crate::Error::ReservedParameter`],
/// [`ProviderError::ReservedParameter`]).
///
/// Overriding any of them would defeat a protection or break the login: `state` (CSRF),
/// `nonce` (ID-token replay), `code_challenge`/`code_challenge_method` (PKCE), `redirect_uri` and
/// `client_id` (where the code goes), `response_type` (the code flow), `scope` (set with the
/// scope methods; a second `scope` would be a repeated parameter, which RFC 6749 §3.1 forbids),
/// and `request`/`request_uri`: a request object (RFC 9101) or a pushed request's reference
/// (RFC 9126) replaces the query's parameters at the provider, so a host-supplied one could
/// carry another state, nonce or challenge. Names are compared exactly, as OAuth parameters
/// are case-sensitive: `State` is not reserved.
///
/// ```
/// use tokenbroker::provider::{RESERVED_AUTHORIZATION_PARAMS, is_reserved_authorization_param};
///
/// assert!(is_reserved_authorization_param("state"));
/// assert!(is_reserved_authorization_param("request_uri"));
/// assert!(!is_reserved_authorization_param("prompt"));
/// assert!(!is_reserved_authorization_param("State"));
/// assert!(RESERVED_AUTHORIZATION_PARAMS.contains(&"code_challenge_method"));
/// ```
pub const RESERVED_AUTHORIZATION_PARAMS: &[&str] = &[
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
    "request",
    "request_uri",
];

/// Whether `name` is one of [`RESERVED_AUTHORIZATION_PARAMS`] (compared exactly).
pub fn is_reserved_authorization_param(name: &str) -> bool {
    RESERVED_AUTHORIZATION_PARAMS.contains(&name)
}

/// The first reserved name among `params`, as [`ProviderError::ReservedParameter`].
pub(crate) fn check_extra_params<'a>(
    params: impl IntoIterator<Item = &'a (String, String)>,
) -> Result<(), ProviderError> {
    match params
        .into_iter()
        .find(|(name, _)| is_reserved_authorization_param(name))
    {
        Some((name, _)) => Err(ProviderError::ReservedParameter { name: name.clone() }),
        None => Ok(()),
    }
}

/// What the broker hands a provider to build an authorization URL.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AuthorizationRequest {
    /// The `state` parameter (random, single-use).
    pub state: Secret,
    /// The PKCE S256 code challenge (derived from a secret verifier; itself public).
    pub pkce_challenge: String,
    /// The OpenID Connect `nonce` (providers without OIDC ignore it).
    pub nonce: Secret,
    /// The scopes to ask for (already including the provider's defaults).
    pub scopes: Scopes,
    /// Whether the broker already holds a refresh token for this user and provider. Providers
    /// that issue refresh tokens only on first consent (Google) ask for consent when it is
    /// `false`, and only then.
    pub has_refresh_token: bool,
    /// An optional `login_hint`.
    pub login_hint: Option<String>,
    /// Extra query parameters from the host, added last. None may be one of
    /// [`RESERVED_AUTHORIZATION_PARAMS`].
    pub extra_params: Vec<(String, String)>,
}

impl AuthorizationRequest {
    /// A request with no login hint, no extra parameters, and no stored refresh token.
    pub fn new(state: Secret, pkce_challenge: String, nonce: Secret, scopes: Scopes) -> Self {
        AuthorizationRequest {
            state,
            pkce_challenge,
            nonce,
            scopes,
            has_refresh_token: false,
            login_hint: None,
            extra_params: Vec::new(),
        }
    }
}

/// What the broker hands a provider to redeem an authorization code.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CodeExchange {
    /// The authorization code from the callback.
    pub code: Secret,
    /// The PKCE verifier matching the challenge sent.
    pub pkce_verifier: Secret,
    /// The nonce sent (OIDC providers check the ID token's `nonce` against it).
    pub nonce: Secret,
    /// The scopes requested.
    pub requested_scopes: Scopes,
}

impl CodeExchange {
    /// An exchange of `code` with its PKCE verifier and nonce, with no requested scopes.
    pub fn new(code: Secret, pkce_verifier: Secret, nonce: Secret) -> Self {
        CodeExchange {
            code,
            pkce_verifier,
            nonce,
            requested_scopes: Scopes::new(),
        }
    }
}

/// Which token to revoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenKind {
    /// A refresh token (revoking it ends the grant at most providers).
    RefreshToken,
    /// An access token.
    AccessToken,
}

impl TokenKind {
    /// The RFC 7009 `token_type_hint` value.
    pub fn hint(self) -> &'static str {
        match self {
            TokenKind::RefreshToken => "refresh_token",
            TokenKind::AccessToken => "access_token",
        }
    }
}

/// How a provider treats a refresh token that was already used once.
///
/// The broker uses it in one place: when a refresh request got no answer at all (a time-out, a
/// dropped connection), it cannot know whether the provider used the token. With `Tolerated`
/// it asks once more at once, within the same lease; with `Rejected` it does not, because a
/// second use might revoke the grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefreshTokenReuse {
    /// A second use is an error and may revoke the whole grant (RFC 9700 §4.14, `oidc-provider`,
    /// GitHub Apps). The broker assumes this unless told otherwise.
    Rejected,
    /// Old refresh tokens stay valid after rotation (Microsoft) or are never rotated (Google).
    Tolerated,
}

/// An upstream identity provider.
///
/// # Contract
/// - `authorization_url` must include `state`, the PKCE S256 challenge and, for OpenID
///   Connect, the nonce, and must not include anything secret besides those.
/// - `refresh` reports rotation by returning a new `refresh_token`; an answer without one
///   means "keep the old one".
/// - Errors must be classified: [`ProviderError::InvalidGrant`] only for a grant the provider
///   refused (the broker then marks the link), [`ProviderError::Transient`] for anything that
///   may work later (network, time-out, 429, 5xx).
#[async_trait]
pub trait Provider: Debug + Send + Sync + 'static {
    /// The alias the provider is configured under.
    fn id(&self) -> &ProviderId;

    /// The scopes every login asks for.
    fn default_scopes(&self) -> Scopes;

    /// Builds the URL to send the user's browser to.
    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<Url, ProviderError>;

    /// Redeems an authorization code.
    async fn exchange_code(&self, exchange: &CodeExchange)
    -> Result<ProviderTokens, ProviderError>;

    /// Uses a refresh token, optionally asking for narrower scopes.
    async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: Option<&Scopes>,
    ) -> Result<ProviderTokens, ProviderError>;

    /// Revokes a token upstream (RFC 7009). The default answers
    /// [`ProviderError::Unsupported`]: a provider without a revocation endpoint must say so
    /// rather than pretend.
    async fn revoke(&self, _token: &Secret, _kind: TokenKind) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported {
            operation: "revoke",
        })
    }

    /// How the provider treats a used refresh token. The default is the strict answer; say
    /// `Tolerated` only for a provider that keeps old refresh tokens valid.
    fn refresh_token_reuse(&self) -> RefreshTokenReuse {
        RefreshTokenReuse::Rejected
    }

    /// Builds the URL to send the user's browser to, making whatever requests that takes: a
    /// provider using pushed authorization requests (RFC 9126) posts the parameters first and
    /// answers a URL with only `client_id` and `request_uri`. The broker calls this, not
    /// [`Provider::authorization_url`]; the default calls [`Provider::authorization_url`].
    async fn start_authorization(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<Url, ProviderError> {
        self.authorization_url(request)
    }

    /// What the provider says about the `iss` parameter of its authorization responses
    /// (RFC 9207), which the broker checks on the callback before the code is redeemed. The
    /// default knows no issuer: the callback's `iss` is then not checked.
    fn authorization_response_issuer(&self) -> AuthorizationResponseIssuer {
        AuthorizationResponseIssuer::default()
    }
}

/// The issuer identification of a provider's authorization responses (RFC 9207), from
/// [`Provider::authorization_response_issuer`].
///
/// A callback that carries `iss` must name one of [`issuers`](Self::issuers) (compared exactly,
/// in constant time); with [`iss_parameter_supported`](Self::iss_parameter_supported), a
/// callback without `iss` is refused too. With no issuers known, `iss` is not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthorizationResponseIssuer {
    /// The issuer identifiers the provider may send (usually one: its `issuer`).
    pub issuers: Vec<String>,
    /// The provider's metadata says `authorization_response_iss_parameter_supported: true`: it
    /// always sends `iss`, so a callback without one did not come from it.
    pub iss_parameter_supported: bool,
}

impl AuthorizationResponseIssuer {
    /// A provider with one issuer identifier that does (or does not) always send `iss`.
    pub fn new(issuer: impl Into<String>, iss_parameter_supported: bool) -> Self {
        AuthorizationResponseIssuer {
            issuers: vec![issuer.into()],
            iss_parameter_supported,
        }
    }
}

/// A provider call failed.
///
/// Descriptions come from the provider's `error_description` and are cut to 200 characters;
/// response bodies are never kept, because a malformed success body can still hold tokens.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The provider refused the grant: the refresh token (or code) is expired, revoked, used
    /// or was never valid. For a refresh, the user must link again.
    #[error("grant rejected by provider (invalid_grant){}", fmt_desc(.description))]
    InvalidGrant {
        /// The provider's description.
        description: Option<String>,
    },
    /// The provider could not answer now: network failure, time-out, 429, 5xx.
    #[error("provider temporarily unavailable{}{}", fmt_status(.status), fmt_desc(.reason))]
    Transient {
        /// The HTTP status, when an answer arrived.
        status: Option<u16>,
        /// The `Retry-After` the provider sent.
        retry_after: Option<Duration>,
        /// A short reason.
        reason: Option<String>,
        /// The transport error.
        #[source]
        source: Option<BoxError>,
    },
    /// The provider rejected our client credentials (`invalid_client`, `unauthorized_client`):
    /// a configuration problem, not the user's.
    #[error("client authentication failed{}", fmt_desc(.description))]
    InvalidClient {
        /// The provider's description.
        description: Option<String>,
    },
    /// The provider accepts none of the client authentication methods the configured
    /// credentials allow (chosen at discovery, see
    /// [`ClientCredentials::choose_client_auth`]): a configuration problem, reported instead
    /// of falling back to a method the provider would refuse.
    #[error(
        "no client authentication method fits: the provider accepts [{}], the configured credentials ({configured}) allow [{}]",
        .accepted.join(", "),
        fmt_methods(.usable)
    )]
    ClientAuthNotAccepted {
        /// The provider's `token_endpoint_auth_methods_supported` (RFC 8414's default
        /// `client_secret_basic` when it has none).
        accepted: Vec<String>,
        /// What the host configured: `a private key`, `a client secret`, `a private key and a
        /// client secret` or `no credentials`.
        configured: &'static str,
        /// The methods those credentials allow, in order of preference.
        usable: Vec<ClientAuth>,
    },
    /// The provider answered with another OAuth error (`invalid_request`, `invalid_scope`, ...).
    #[error("provider rejected the request: {error}{}", fmt_desc(.description))]
    Rejected {
        /// The `error` code.
        error: String,
        /// The provider's description.
        description: Option<String>,
        /// The HTTP status.
        status: u16,
    },
    /// The answer could not be understood (not JSON, missing fields, wrong types, truncated).
    #[error("malformed provider response{}: {reason}", fmt_status(.status))]
    Protocol {
        /// The HTTP status.
        status: Option<u16>,
        /// What was wrong, naming fields but no values.
        reason: String,
    },
    /// The ID token failed verification (signature, issuer, audience, expiry, nonce).
    #[error("id token rejected: {reason}")]
    IdToken {
        /// Which check failed.
        reason: String,
    },
    /// The provider does not support the operation (e.g. revocation at Microsoft).
    #[error("{operation} is not supported by this provider")]
    Unsupported {
        /// The operation.
        operation: &'static str,
    },
    /// The provider is configured wrongly (e.g. an unparsable endpoint URL).
    #[error("provider configuration error: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// A host-supplied extra authorization parameter names one the broker sets itself (see
    /// [`RESERVED_AUTHORIZATION_PARAMS`]): a configuration error, reported instead of sending
    /// the parameter twice or letting it replace the broker's.
    #[error("authorization parameter `{name}` is reserved: the broker sets it on every login")]
    ReservedParameter {
        /// The parameter's name.
        name: String,
    },
    /// A resource endpoint of the provider (userinfo) refused the access token with `401`: the
    /// access token expired, was revoked, or was never valid there. It says nothing about the
    /// grant: the refresh token may well be alive, so the link is **not** relink-required.
    /// Refresh (e.g. [`TokenBroker::send_authorized`](crate::TokenBroker::send_authorized)
    /// forces one on a 401) and try again.
    #[error("access token rejected by the provider's {endpoint} endpoint (HTTP 401){}", fmt_desc(.description))]
    AccessTokenRejected {
        /// Which endpoint refused it (`userinfo`).
        endpoint: &'static str,
        /// The `error` and `error_description` of the answer's `WWW-Authenticate` challenge
        /// (RFC 6750 §3), when it has them (cut to 200 characters).
        description: Option<String>,
    },
}

impl ProviderError {
    /// Whether a retry later may succeed with the same input: transient failures and answers
    /// that could not be read (a proxy error page, a truncated body).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProviderError::Transient { .. } | ProviderError::Protocol { .. }
        )
    }

    /// The `Retry-After` the provider sent, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn fmt_desc(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
}

fn fmt_status(s: &Option<u16>) -> String {
    s.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

/// Cuts provider-supplied text to a loggable size.
fn fmt_methods(methods: &[ClientAuth]) -> String {
    methods
        .iter()
        .map(|m| m.method_name())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn truncate_description(text: &str) -> String {
    const MAX: usize = 200;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut t: String = text.chars().take(MAX).collect();
        t.push('…');
        t
    }
}
