//! A generic OAuth 2.0 provider on the `oauth2` crate.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine as _;
use oauth2::basic::BasicClient;
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope, TokenUrl,
};
use url::Url;

use super::client_auth::{AssertionSigner, client_assertion};
use super::quirks::{GitHubQuirks, Quirks, StandardQuirks, set_param};
use super::response::parse_token_response;
use super::{
    AuthorizationRequest, CLIENT_ASSERTION_TYPE, ClientAssertionAudience, CodeExchange, Provider,
    ProviderError, RefreshTokenReuse, SharedClientAssertionKey, TokenKind,
};
use crate::account::UpstreamAccount;
use crate::http::{ClientDebug, HttpError, HttpErrorKind, HttpResponse, SharedHttpClient};
use crate::ids::{ProviderId, Scopes};
use crate::provider::oidc::ClassifyName as _;
use crate::secret::Secret;
use crate::token::ProviderTokens;

/// How the client authenticates at the token, revocation and introspection endpoints (the
/// `token_endpoint_auth_method` of OpenID Connect Dynamic Client Registration §2).
///
/// The same method is used at every endpoint. The JWT methods send a fresh assertion per
/// request (RFC 7523 §2.2: `iss` = `sub` = the client id, `aud` as set by
/// [`OAuth2Config::with_client_assertion_audience`], a unique `jti`, `iat`, and `exp` 60 s
/// later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`), the RFC 6749 default. Without a client secret the
    /// request carries only `client_id` in the body, as for [`ClientAuth::None`].
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the form body (`client_secret_post`). Use it for
    /// servers that do not decode form-encoded Basic credentials (secrets with `~`, `+`, `/`).
    Post,
    /// `client_secret_jwt`: an HS256 assertion signed with the client secret, which itself
    /// never leaves the process.
    SecretJwt,
    /// `private_key_jwt`: an assertion signed with the
    /// [`ClientAssertionKey`](super::ClientAssertionKey) set by
    /// [`OAuth2Config::with_client_assertion_key`] (ES256, RS256 or PS256).
    PrivateKeyJwt,
    /// `none`: a public client, identified by `client_id` only and protected by PKCE (which
    /// every login uses). A configured secret is not sent.
    None,
}

impl ClientAuth {
    /// The registered method name (`client_secret_basic`, `client_secret_post`,
    /// `client_secret_jwt`, `private_key_jwt`, `none`), as in
    /// `token_endpoint_auth_methods_supported`.
    pub fn method_name(self) -> &'static str {
        match self {
            ClientAuth::Basic => "client_secret_basic",
            ClientAuth::Post => "client_secret_post",
            ClientAuth::SecretJwt => "client_secret_jwt",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::None => "none",
        }
    }

    /// The method with this registered name, if it is one this crate speaks.
    ///
    /// ```
    /// use tokenbroker::provider::ClientAuth;
    /// assert_eq!(ClientAuth::from_method_name("private_key_jwt"), Some(ClientAuth::PrivateKeyJwt));
    /// assert_eq!(ClientAuth::from_method_name("tls_client_auth"), None);
    /// ```
    pub fn from_method_name(name: &str) -> Option<ClientAuth> {
        [
            ClientAuth::Basic,
            ClientAuth::Post,
            ClientAuth::SecretJwt,
            ClientAuth::PrivateKeyJwt,
            ClientAuth::None,
        ]
        .into_iter()
        .find(|m| m.method_name() == name)
    }
}

impl fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.method_name())
    }
}

/// Configuration of a generic OAuth 2.0 provider.
///
/// ```
/// use tokenbroker::provider::{ClientAuth, OAuth2Config};
/// use tokenbroker::{ProviderId, Scopes, Secret};
///
/// let config = OAuth2Config::new(
///     ProviderId::new("example")?,
///     "client-1",
///     "https://idp.example/authorize".parse()?,
///     "https://idp.example/token".parse()?,
///     "https://app.example/callback".parse()?,
/// )
/// .with_client_secret(Secret::new("s3cr~t"))
/// .with_client_auth(ClientAuth::Post)
/// .with_scopes(Scopes::parse("read write"))
/// .with_revocation_endpoint("https://idp.example/revoke".parse()?);
/// assert!(!format!("{config:?}").contains("s3cr~t"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OAuth2Config {
    /// The provider alias.
    pub id: ProviderId,
    /// The client id registered at the provider.
    pub client_id: String,
    /// The client secret (none for public clients).
    pub client_secret: Option<Secret>,
    /// The authorization endpoint.
    pub authorization_endpoint: Url,
    /// The token endpoint.
    pub token_endpoint: Url,
    /// The RFC 7009 revocation endpoint, if the provider has one.
    pub revocation_endpoint: Option<Url>,
    /// The provider's issuer identifier (RFC 8414 `issuer`), if known. With it, a callback's
    /// `iss` (RFC 9207) must equal it. Discovery fills it.
    pub issuer: Option<String>,
    /// The provider's metadata says `authorization_response_iss_parameter_supported: true`: a
    /// callback without `iss` is then refused.
    pub authorization_response_iss_parameter_supported: bool,
    /// The RFC 9126 pushed authorization request endpoint, if the provider has one.
    pub pushed_authorization_request_endpoint: Option<Url>,
    /// The provider's metadata says `require_pushed_authorization_requests: true`: every login
    /// goes through the PAR endpoint, whatever [`pushed_authorization`](Self::pushed_authorization) says.
    pub require_pushed_authorization_requests: bool,
    /// When logins use pushed authorization requests ([`ParMode::IfAdvertised`] by default).
    pub pushed_authorization: ParMode,
    /// The redirect URI registered for this client.
    pub redirect_uri: Url,
    /// The scopes every login asks for.
    pub scopes: Scopes,
    /// How the client authenticates.
    pub client_auth: ClientAuth,
    /// Extra authorization parameters added to every login (e.g. `access_type=offline`).
    pub authorize_params: Vec<(String, String)>,
    /// How the provider treats used refresh tokens.
    pub refresh_token_reuse: RefreshTokenReuse,
    /// The provider's deviations from RFC 6749 ([`StandardQuirks`] by default).
    pub quirks: Arc<dyn Quirks>,
    /// Where a plain OAuth 2.0 provider says whose tokens it issued (GitHub: `/user`), so that
    /// a link records its upstream account. None by default (OpenID Connect providers say it in
    /// the ID token).
    pub account_endpoint: Option<AccountEndpoint>,
    /// The RFC 7662 introspection endpoint, for [`OAuth2Provider::introspect`].
    pub introspection_endpoint: Option<Url>,
    /// The key `private_key_jwt` assertions are signed with, read at every request (rotate it
    /// through the handle).
    pub client_assertion_key: Option<SharedClientAssertionKey>,
    /// The `aud` of client assertions (the token endpoint by default).
    pub client_assertion_audience: ClientAssertionAudience,
}

/// An endpoint that answers, for an access token, which account it belongs to: a `GET` with
/// `Authorization: Bearer`, answering a JSON object.
///
/// ```
/// use tokenbroker::provider::AccountEndpoint;
/// let github = AccountEndpoint::new("https://api.github.com/user".parse()?, "/id")
///     .with_email_pointer("/email");
/// # Ok::<(), url::ParseError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AccountEndpoint {
    /// The endpoint.
    pub url: Url,
    /// A JSON pointer (RFC 6901) to the account's stable id in the answer: a string or a
    /// number (GitHub: `/id`, not the login, which users can rename).
    pub id_pointer: String,
    /// A JSON pointer to an e-mail address to show, if the answer has one.
    pub email_pointer: Option<String>,
}

impl AccountEndpoint {
    /// An endpoint whose answer has the account id at `id_pointer`.
    pub fn new(url: Url, id_pointer: impl Into<String>) -> Self {
        AccountEndpoint {
            url,
            id_pointer: id_pointer.into(),
            email_pointer: None,
        }
    }
    /// Where the answer has an e-mail address.
    pub fn with_email_pointer(mut self, pointer: impl Into<String>) -> Self {
        self.email_pointer = Some(pointer.into());
        self
    }
}

impl OAuth2Config {
    /// A confidential-less configuration with the required endpoints; add a secret with
    /// [`OAuth2Config::with_client_secret`].
    pub fn new(
        id: ProviderId,
        client_id: impl Into<String>,
        authorization_endpoint: Url,
        token_endpoint: Url,
        redirect_uri: Url,
    ) -> Self {
        OAuth2Config {
            id,
            client_id: client_id.into(),
            client_secret: None,
            authorization_endpoint,
            token_endpoint,
            revocation_endpoint: None,
            issuer: None,
            authorization_response_iss_parameter_supported: false,
            pushed_authorization_request_endpoint: None,
            require_pushed_authorization_requests: false,
            pushed_authorization: ParMode::IfAdvertised,
            redirect_uri,
            scopes: Scopes::new(),
            client_auth: ClientAuth::Basic,
            authorize_params: Vec::new(),
            refresh_token_reuse: RefreshTokenReuse::Rejected,
            quirks: Arc::new(StandardQuirks),
            account_endpoint: None,
            introspection_endpoint: None,
            client_assertion_key: None,
            client_assertion_audience: ClientAssertionAudience::TokenEndpoint,
        }
    }

    /// GitHub (OAuth apps and GitHub Apps), a plain OAuth 2.0 provider with [`GitHubQuirks`]:
    /// `https://github.com/login/oauth/authorize` and `.../access_token`, client credentials in
    /// the body, no RFC 7009 revocation endpoint (unlink reports "not supported upstream"), and
    /// single-use refresh tokens (GitHub Apps with expiring user tokens). Classic OAuth-app
    /// tokens carry no `expires_in` and never expire: the token set says so with no expiry.
    /// Whose tokens a login brought is asked at `https://api.github.com/user`.
    ///
    /// The endpoints can be moved (a proxy, GitHub Enterprise Server, a test double) with
    /// [`with_base_url`](Self::with_base_url),
    /// [`with_authorization_endpoint`](Self::with_authorization_endpoint),
    /// [`with_token_endpoint`](Self::with_token_endpoint) and
    /// [`with_account_endpoint`](Self::with_account_endpoint); the quirks stay.
    ///
    /// ```
    /// use tokenbroker::provider::OAuth2Config;
    /// use tokenbroker::{ProviderId, Scopes, Secret};
    ///
    /// let github = OAuth2Config::github(
    ///     ProviderId::new("github")?,
    ///     "Iv1.0123456789abcdef",
    ///     Secret::new("client-secret"),
    ///     "https://app.example/callback".parse()?,
    /// )
    /// .with_scopes(Scopes::parse("read:user repo"));
    /// assert_eq!(github.token_endpoint.as_str(), "https://github.com/login/oauth/access_token");
    ///
    /// // GitHub Enterprise Server: the same paths on its host, the API under `/api/v3`.
    /// use tokenbroker::provider::AccountEndpoint;
    /// let ghes: url::Url = "https://github.corp.example".parse()?;
    /// let enterprise = github
    ///     .with_base_url(&ghes)
    ///     .with_account_endpoint(
    ///         AccountEndpoint::new(ghes.join("api/v3/user")?, "/id").with_email_pointer("/email"),
    ///     );
    /// assert_eq!(
    ///     enterprise.authorization_endpoint.as_str(),
    ///     "https://github.corp.example/login/oauth/authorize"
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn github(
        id: ProviderId,
        client_id: impl Into<String>,
        client_secret: Secret,
        redirect_uri: Url,
    ) -> Self {
        let url = |s: &str| Url::parse(s).expect("GitHub's endpoint URLs are valid");
        OAuth2Config::new(
            id,
            client_id,
            url("https://github.com/login/oauth/authorize"),
            url("https://github.com/login/oauth/access_token"),
            redirect_uri,
        )
        .with_client_secret(client_secret)
        .with_client_auth(ClientAuth::Post)
        .with_quirks(GitHubQuirks)
        .with_account_endpoint(
            AccountEndpoint::new(url("https://api.github.com/user"), "/id")
                .with_email_pointer("/email"),
        )
    }

    /// Moves every endpoint (authorization, token, revocation, introspection, PAR, account) to
    /// `base`'s scheme, host and port, with `base`'s path put before each endpoint's own:
    /// points a preset at a test double such as `testing::FakeIdp` (feature `testing`) or at a
    /// proxy that serves them all, keeping its quirks. For endpoints on different hosts, set
    /// each with its `with_*_endpoint` method instead (or after).
    ///
    /// ```
    /// # use tokenbroker::provider::OAuth2Config;
    /// # use tokenbroker::{ProviderId, Secret};
    /// let github = OAuth2Config::github(
    ///     ProviderId::new("github")?,
    ///     "Iv1.0123456789abcdef",
    ///     Secret::new("client-secret"),
    ///     "https://app.example/callback".parse()?,
    /// )
    /// .with_base_url(&"https://egress.corp.example/github/".parse()?);
    /// assert_eq!(
    ///     github.token_endpoint.as_str(),
    ///     "https://egress.corp.example/github/login/oauth/access_token"
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_base_url(mut self, base: &Url) -> Self {
        use super::oidc::rebase;
        self.authorization_endpoint = rebase(base, &self.authorization_endpoint);
        self.token_endpoint = rebase(base, &self.token_endpoint);
        self.revocation_endpoint = self.revocation_endpoint.map(|u| rebase(base, &u));
        self.introspection_endpoint = self.introspection_endpoint.map(|u| rebase(base, &u));
        self.pushed_authorization_request_endpoint = self
            .pushed_authorization_request_endpoint
            .map(|u| rebase(base, &u));
        if let Some(account) = &mut self.account_endpoint {
            account.url = rebase(base, &account.url);
        }
        self
    }

    /// Sets where the provider says whose tokens it issued (see [`AccountEndpoint`]).
    pub fn with_account_endpoint(mut self, endpoint: AccountEndpoint) -> Self {
        self.account_endpoint = Some(endpoint);
        self
    }
    /// Sets the provider's quirks.
    pub fn with_quirks(mut self, quirks: impl Quirks) -> Self {
        self.quirks = Arc::new(quirks);
        self
    }
    /// Sets the client secret.
    pub fn with_client_secret(mut self, secret: Secret) -> Self {
        self.client_secret = Some(secret);
        self
    }
    /// Sets the revocation endpoint.
    pub fn with_revocation_endpoint(mut self, url: Url) -> Self {
        self.revocation_endpoint = Some(url);
        self
    }
    /// Sets the scopes every login asks for, replacing the preset's (see
    /// [`with_additional_scopes`](Self::with_additional_scopes) to keep them).
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }
    /// Adds scopes to the ones every login asks for (a preset's defaults stay).
    ///
    /// ```
    /// # use tokenbroker::provider::OAuth2Config;
    /// # use tokenbroker::{ProviderId, Scopes, Secret};
    /// let github = OAuth2Config::github(
    ///     ProviderId::new("github")?,
    ///     "Iv1.0123456789abcdef",
    ///     Secret::new("client-secret"),
    ///     "https://app.example/callback".parse()?,
    /// )
    /// .with_scopes(Scopes::parse("read:user"))
    /// .with_additional_scopes(Scopes::parse("repo"));
    /// assert_eq!(github.scopes, Scopes::parse("read:user repo"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_additional_scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = self.scopes.union(&scopes);
        self
    }
    /// Sets the authorization endpoint (a preset keeps its quirks; see also
    /// [`with_base_url`](Self::with_base_url)).
    pub fn with_authorization_endpoint(mut self, url: Url) -> Self {
        self.authorization_endpoint = url;
        self
    }
    /// Sets the token endpoint (a preset keeps its quirks; see also
    /// [`with_base_url`](Self::with_base_url)).
    pub fn with_token_endpoint(mut self, url: Url) -> Self {
        self.token_endpoint = url;
        self
    }
    /// Sets the client authentication method.
    pub fn with_client_auth(mut self, auth: ClientAuth) -> Self {
        self.client_auth = auth;
        self
    }
    /// Sets the key for `private_key_jwt` ([`ClientAuth::PrivateKeyJwt`], which this does not
    /// select by itself). Pass a [`SharedClientAssertionKey`] to keep a handle to rotate the
    /// key later, or a [`ClientAssertionKey`](super::ClientAssertionKey).
    ///
    /// ```
    /// # use tokenbroker::provider::*;
    /// # use tokenbroker::ProviderId;
    /// # use p256::pkcs8::EncodePrivateKey;
    /// # let pem = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng)
    /// #     .to_pkcs8_pem(Default::default()).unwrap();
    /// let key = SharedClientAssertionKey::new(
    ///     ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, &pem)?.with_key_id("k1"),
    /// );
    /// let config = OAuth2Config::new(
    ///     ProviderId::new("corp")?,
    ///     "client-1",
    ///     "https://idp.example/authorize".parse()?,
    ///     "https://idp.example/token".parse()?,
    ///     "https://app.example/callback".parse()?,
    /// )
    /// .with_client_auth(ClientAuth::PrivateKeyJwt)
    /// .with_client_assertion_key(key.clone());
    /// // Later, without rebuilding anything:
    /// # let pem2 = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng)
    /// #     .to_pkcs8_pem(Default::default()).unwrap();
    /// key.rotate(ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, &pem2)?.with_key_id("k2"));
    /// assert!(!format!("{config:?}").contains("PRIVATE KEY"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_client_assertion_key(mut self, key: impl Into<SharedClientAssertionKey>) -> Self {
        self.client_assertion_key = Some(key.into());
        self
    }
    /// Sets the RFC 7662 introspection endpoint ([`OAuth2Provider::introspect`]).
    pub fn with_introspection_endpoint(mut self, url: Url) -> Self {
        self.introspection_endpoint = Some(url);
        self
    }
    /// Sets the `aud` of client assertions (see [`ClientAssertionAudience`]).
    pub fn with_client_assertion_audience(mut self, audience: ClientAssertionAudience) -> Self {
        self.client_assertion_audience = audience;
        self
    }
    /// Adds an authorization parameter sent on every login (a later one of the same name
    /// replaces it; the quirks' and the login's own parameters come after it).
    ///
    /// The parameters the broker sets itself ([`RESERVED_AUTHORIZATION_PARAMS`](super::RESERVED_AUTHORIZATION_PARAMS):
    /// `state`, `nonce`, `redirect_uri`, `code_challenge`, ...) cannot be set this way:
    /// [`validate`](Self::validate) refuses them, and so do
    /// [`TokenBrokerBuilder::build`](crate::TokenBrokerBuilder::build) and every login.
    ///
    /// ```
    /// use tokenbroker::provider::{OAuth2Config, ProviderError};
    /// use tokenbroker::ProviderId;
    ///
    /// let config = OAuth2Config::new(
    ///     ProviderId::new("example")?,
    ///     "client-1",
    ///     "https://idp.example/authorize".parse()?,
    ///     "https://idp.example/token".parse()?,
    ///     "https://app.example/callback".parse()?,
    /// )
    /// .with_authorize_param("audience", "https://api.example");
    /// assert!(config.validate().is_ok());
    ///
    /// let hijacked = config.with_authorize_param("redirect_uri", "https://evil.example/cb");
    /// assert!(matches!(
    ///     hijacked.validate(),
    ///     Err(ProviderError::ReservedParameter { name }) if name == "redirect_uri"
    /// ));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_authorize_param(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.authorize_params.push((name.into(), value.into()));
        self
    }
    /// Adds several authorization parameters sent on every login, as
    /// [`with_authorize_param`](Self::with_authorize_param) does for one.
    ///
    /// ```
    /// # use tokenbroker::provider::OAuth2Config;
    /// # use tokenbroker::ProviderId;
    /// # let config = OAuth2Config::new(
    /// #     ProviderId::new("example")?,
    /// #     "client-1",
    /// #     "https://idp.example/authorize".parse()?,
    /// #     "https://idp.example/token".parse()?,
    /// #     "https://app.example/callback".parse()?,
    /// # );
    /// let config = config.with_authorize_params([("prompt", "select_account"), ("ui_locales", "de")]);
    /// assert_eq!(config.authorize_params.len(), 2);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn with_authorize_params<K, V>(mut self, params: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.authorize_params
            .extend(params.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }
    /// Checks the configuration for what can be told wrong before the first login: an extra
    /// authorization parameter that names a reserved one.
    /// [`TokenBrokerBuilder::build`](crate::TokenBrokerBuilder::build) calls it for every
    /// configuration it is given.
    ///
    /// # Errors
    /// [`ProviderError::ReservedParameter`], naming the first reserved parameter.
    pub fn validate(&self) -> Result<(), ProviderError> {
        super::check_extra_params(&self.authorize_params)
    }
    /// Declares how the provider treats used refresh tokens.
    pub fn with_refresh_token_reuse(mut self, reuse: RefreshTokenReuse) -> Self {
        self.refresh_token_reuse = reuse;
        self
    }
}

/// A plain OAuth 2.0 provider: authorization code with PKCE S256, refresh, RFC 7009
/// revocation when configured.
///
/// ```no_run
/// # use tokenbroker::provider::{OAuth2Config, OAuth2Provider};
/// # fn config() -> OAuth2Config { unimplemented!() }
/// let http = std::sync::Arc::new(tokenbroker::http::ReqwestClient::new()?);
/// let provider = OAuth2Provider::new(config(), http);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct OAuth2Provider {
    config: OAuth2Config,
    http: SharedHttpClient,
}

impl fmt::Debug for OAuth2Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2Provider")
            .field("config", &self.config)
            .field("http", &ClientDebug)
            .finish()
    }
}

type TokenClient =
    BasicClient<EndpointSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

impl OAuth2Provider {
    /// A provider sending its requests through `http`.
    pub fn new(config: OAuth2Config, http: SharedHttpClient) -> Self {
        OAuth2Provider { config, http }
    }

    /// The configuration.
    pub fn config(&self) -> &OAuth2Config {
        &self.config
    }

    fn client(&self) -> TokenClient {
        let c = &self.config;
        let mut client = BasicClient::new(ClientId::new(c.client_id.clone()))
            .set_auth_uri(AuthUrl::from_url(c.authorization_endpoint.clone()))
            .set_token_uri(TokenUrl::from_url(c.token_endpoint.clone()))
            .set_redirect_uri(RedirectUrl::from_url(c.redirect_uri.clone()))
            .set_auth_type(match c.client_auth {
                ClientAuth::Basic => AuthType::BasicAuth,
                // The others send `client_id` in the body; the JWT methods add their assertion
                // with `client_auth_params`.
                _ => AuthType::RequestBody,
            });
        if let (ClientAuth::Basic | ClientAuth::Post, Some(secret)) =
            (c.client_auth, &c.client_secret)
        {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
        }
        client
    }

    /// The form parameters a JWT client authentication adds to a request (`client_assertion_type`
    /// and a freshly signed `client_assertion`); none for the other methods.
    fn client_auth_params(&self) -> Result<Vec<(&'static str, Secret)>, ProviderError> {
        let c = &self.config;
        let audience = match &c.client_assertion_audience {
            ClientAssertionAudience::TokenEndpoint => c.token_endpoint.as_str(),
            ClientAssertionAudience::Issuer(issuer) => issuer.as_str(),
        };
        let assertion = match c.client_auth {
            ClientAuth::SecretJwt => {
                let secret = c
                    .client_secret
                    .as_ref()
                    .ok_or_else(|| ProviderError::Config {
                        reason: "client_secret_jwt is configured but no client secret is set"
                            .into(),
                    })?;
                client_assertion(&c.client_id, audience, AssertionSigner::Secret(secret))?
            }
            ClientAuth::PrivateKeyJwt => {
                let key = c
                    .client_assertion_key
                    .as_ref()
                    .ok_or_else(|| ProviderError::Config {
                        reason: "private_key_jwt is configured but no client assertion key is set"
                            .into(),
                    })?
                    .current();
                client_assertion(&c.client_id, audience, AssertionSigner::Key(&key))?
            }
            ClientAuth::Basic | ClientAuth::Post | ClientAuth::None => return Ok(Vec::new()),
        };
        Ok(vec![
            ("client_assertion_type", Secret::new(CLIENT_ASSERTION_TYPE)),
            ("client_assertion", assertion),
        ])
    }

    /// Turns the outcome of an `oauth2` token request into tokens, reading the captured
    /// answer ourselves (see [`parse_token_response`]).
    fn finish<T, E>(
        result: Result<T, RequestTokenError<HttpError, E>>,
        capture: Capture,
    ) -> Result<ProviderTokens, ProviderError>
    where
        E: oauth2::ErrorResponse,
    {
        if let Err(RequestTokenError::Request(e)) = result {
            return Err(transport_error(e));
        }
        let Some(response) = capture.into_response() else {
            return Err(ProviderError::Protocol {
                status: None,
                reason: "no answer was received".into(),
            });
        };
        parse_token_response(response.status(), response.headers(), response.body())
    }

    /// Applies the quirks to a token-endpoint outcome.
    fn fixed(
        &self,
        outcome: Result<ProviderTokens, ProviderError>,
        requested: Option<&Scopes>,
    ) -> Result<ProviderTokens, ProviderError> {
        match outcome {
            Ok(mut tokens) => {
                self.config.quirks.fix_tokens(&mut tokens, requested);
                Ok(tokens)
            }
            Err(e) => Err(self.config.quirks.classify_error(e)),
        }
    }

    /// Posts a form to an endpoint with this client's authentication.
    async fn post_form(
        &self,
        url: &Url,
        mut form: Vec<(&str, &str)>,
    ) -> Result<HttpResponse, ProviderError> {
        let mut builder = http::Request::builder()
            .method(http::Method::POST)
            .uri(url.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        let secret = self
            .config
            .client_secret
            .as_ref()
            .map(Secret::expose_secret);
        let assertion = self.client_auth_params()?;
        match (self.config.client_auth, secret) {
            (ClientAuth::Basic, Some(secret)) => {
                // RFC 6749 §2.3.1: form-encode id and secret before Base64.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let creds = format!("{}:{}", enc(&self.config.client_id), enc(secret));
                let value = format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(creds)
                );
                builder = builder.header(http::header::AUTHORIZATION, value);
            }
            (ClientAuth::Post, secret) => {
                form.push(("client_id", &self.config.client_id));
                if let Some(secret) = secret {
                    form.push(("client_secret", secret));
                }
            }
            // `none`, Basic without a secret, and the JWT methods (whose assertion follows).
            _ => form.push(("client_id", &self.config.client_id)),
        }
        for (name, value) in &assertion {
            form.push((name, value.expose_secret()));
        }
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let request = builder
            .body(body.into_bytes())
            .map_err(|e| ProviderError::Config {
                reason: format!("cannot build request: {e}"),
            })?;
        self.http.execute(request).await.map_err(transport_error)
    }
}

impl OAuth2Provider {
    /// Asks the account endpoint whose tokens these are. A login whose account cannot be told
    /// fails: storing tokens without knowing whose they are is how a re-link mixes accounts.
    async fn account(
        &self,
        endpoint: &AccountEndpoint,
        access_token: &Secret,
    ) -> Result<UpstreamAccount, ProviderError> {
        let request = http::Request::builder()
            .method(http::Method::GET)
            .uri(endpoint.url.as_str())
            .header(http::header::ACCEPT, "application/json")
            // GitHub's API refuses requests without one.
            .header(http::header::USER_AGENT, "tokenbroker")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", access_token.expose_secret()),
            )
            .body(Vec::new())
            .map_err(|e| ProviderError::Config {
                reason: format!("cannot build the account request: {e}"),
            })?;
        let response = self.http.execute(request).await.map_err(transport_error)?;
        let status = response.status();
        if !status.is_success() {
            return Err(ProviderError::Transient {
                status: Some(status.as_u16()),
                retry_after: None,
                reason: Some("the account endpoint failed".into()),
                source: None,
            });
        }
        let body: serde_json::Value =
            serde_json::from_slice(response.body()).map_err(|e| ProviderError::Protocol {
                status: Some(status.as_u16()),
                reason: format!(
                    "the account endpoint's answer is not JSON ({})",
                    e.classify_name()
                ),
            })?;
        let subject = match body.pointer(&endpoint.id_pointer) {
            Some(serde_json::Value::String(id)) if !id.is_empty() => id.clone(),
            Some(serde_json::Value::Number(id)) => id.to_string(),
            _ => {
                return Err(ProviderError::Protocol {
                    status: Some(status.as_u16()),
                    reason: format!(
                        "the account endpoint's answer has no id at {}",
                        endpoint.id_pointer
                    ),
                });
            }
        };
        let mut account =
            UpstreamAccount::new(Some(endpoint.url.origin().ascii_serialization()), subject);
        if let Some(serde_json::Value::String(email)) = endpoint
            .email_pointer
            .as_deref()
            .and_then(|p| body.pointer(p))
        {
            account.email = Some(email.clone());
        }
        Ok(account)
    }
}

impl OAuth2Provider {
    /// Asks the RFC 7662 introspection endpoint whether `token` is active, authenticating as
    /// at the token endpoint (any [`ClientAuth`]). [`ProviderError::Unsupported`] when no
    /// introspection endpoint is configured.
    pub async fn introspect(&self, token: &Secret, kind: TokenKind) -> Result<bool, ProviderError> {
        let Some(url) = &self.config.introspection_endpoint else {
            return Err(ProviderError::Unsupported {
                operation: "introspect",
            });
        };
        let response = self
            .post_form(
                url,
                vec![
                    ("token", token.expose_secret()),
                    ("token_type_hint", kind.hint()),
                ],
            )
            .await?;
        let status = response.status();
        if status.is_success() {
            let body: serde_json::Value =
                serde_json::from_slice(response.body()).map_err(|e| ProviderError::Protocol {
                    status: Some(status.as_u16()),
                    reason: format!("introspection answer is not JSON ({})", e.classify_name()),
                })?;
            return body["active"]
                .as_bool()
                .ok_or_else(|| ProviderError::Protocol {
                    status: Some(status.as_u16()),
                    reason: "introspection answer has no boolean `active`".into(),
                });
        }
        match parse_token_response(status, response.headers(), response.body()) {
            Err(e) => Err(self.config.quirks.classify_error(e)),
            Ok(_) => Err(ProviderError::Protocol {
                status: Some(status.as_u16()),
                reason: "unexpected answer".into(),
            }),
        }
    }
}

pub(crate) fn transport_error(e: HttpError) -> ProviderError {
    match e.kind() {
        HttpErrorKind::TooLarge => ProviderError::Protocol {
            status: None,
            reason: "answer larger than the 1 MiB limit".into(),
        },
        kind => ProviderError::Transient {
            status: None,
            retry_after: None,
            reason: Some(format!("{kind:?}").to_lowercase()),
            source: Some(std::sync::Arc::new(e)),
        },
    }
}

#[async_trait]
impl Provider for OAuth2Provider {
    fn id(&self) -> &ProviderId {
        &self.config.id
    }

    fn default_scopes(&self) -> Scopes {
        self.config.scopes.clone()
    }

    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<Url, ProviderError> {
        let state = request.state.expose_secret().to_owned();
        let client = self.client();
        let scopes = self.config.quirks.requested_scopes(request.scopes.clone());
        let mut auth = client
            .authorize_url(move || CsrfToken::new(state))
            .add_scopes(scopes.iter().map(|s| Scope::new(s.to_owned())))
            .add_extra_param("code_challenge", request.pkce_challenge.clone())
            .add_extra_param("code_challenge_method", "S256");
        if scopes.contains("openid") {
            auth = auth.add_extra_param("nonce", request.nonce.expose_secret().to_owned());
        }
        if let Some(hint) = &request.login_hint {
            auth = auth.add_extra_param("login_hint", hint.clone());
        }
        let mut params = self.config.authorize_params.clone();
        self.config.quirks.authorize_params(request, &mut params);
        // The host's own parameters come last and win (e.g. `prompt=select_account`), except
        // over the ones the login's security rests on: `add_extra_param` would send those a
        // second time, and a provider may take either.
        for (name, value) in &request.extra_params {
            set_param(&mut params, name, value);
        }
        super::check_extra_params(&params)?;
        for (name, value) in params {
            auth = auth.add_extra_param(name, value);
        }
        Ok(auth.url().0)
    }

    async fn exchange_code(
        &self,
        exchange: &CodeExchange,
    ) -> Result<ProviderTokens, ProviderError> {
        let capture = Capture::new(&self.http);
        let client = self.client();
        let mut request = client
            .exchange_code(AuthorizationCode::new(
                exchange.code.expose_secret().to_owned(),
            ))
            .set_pkce_verifier(PkceCodeVerifier::new(
                exchange.pkce_verifier.expose_secret().to_owned(),
            ));
        for (name, value) in self.client_auth_params()? {
            request = request.add_extra_param(name, value.expose_secret().to_owned());
        }
        let result = request.request_async(&capture).await;
        let mut tokens = self.fixed(
            Self::finish(result, capture),
            Some(&exchange.requested_scopes).filter(|s| !s.is_empty()),
        )?;
        if let Some(endpoint) = &self.config.account_endpoint {
            tokens.account = Some(self.account(endpoint, &tokens.access_token).await?);
        }
        Ok(tokens)
    }

    async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: Option<&Scopes>,
    ) -> Result<ProviderTokens, ProviderError> {
        let capture = Capture::new(&self.http);
        let token = RefreshToken::new(refresh_token.expose_secret().to_owned());
        let client = self.client();
        let mut request = client.exchange_refresh_token(&token);
        let scopes = scopes.map(|s| self.config.quirks.requested_scopes(s.clone()));
        if let Some(scopes) = &scopes {
            request = request.add_scopes(scopes.iter().map(|s| Scope::new(s.to_owned())));
        }
        for (name, value) in self.client_auth_params()? {
            request = request.add_extra_param(name, value.expose_secret().to_owned());
        }
        let result = request.request_async(&capture).await;
        self.fixed(Self::finish(result, capture), scopes.as_ref())
    }

    async fn revoke(&self, token: &Secret, kind: TokenKind) -> Result<(), ProviderError> {
        let Some(url) = &self.config.revocation_endpoint else {
            return Err(ProviderError::Unsupported {
                operation: "revoke",
            });
        };
        // Built by hand: `oauth2` refuses http:// revocation URLs, which rules out loopback IdPs.
        let response = self
            .post_form(
                url,
                vec![
                    ("token", token.expose_secret()),
                    ("token_type_hint", kind.hint()),
                ],
            )
            .await?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        match parse_token_response(status, response.headers(), response.body()) {
            Err(e) => Err(self.config.quirks.classify_error(e)),
            Ok(_) => Err(ProviderError::Protocol {
                status: Some(status.as_u16()),
                reason: "unexpected answer".into(),
            }),
        }
    }

    fn refresh_token_reuse(&self) -> RefreshTokenReuse {
        self.config.refresh_token_reuse
    }

    async fn start_authorization(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<Url, ProviderError> {
        self.pushed_authorization_url(request).await
    }

    fn authorization_response_issuer(&self) -> super::AuthorizationResponseIssuer {
        self.config.response_issuer()
    }
}

/// An `oauth2` HTTP client that forwards to ours and keeps the raw answer, because `oauth2`
/// drops the HTTP status and rejects answers we can still read.
///
/// `oauth2` itself gets the status and an empty body: [`OAuth2Provider::finish`] reads the
/// kept answer and ignores every conclusion of `oauth2`'s but a transport error, so handing it
/// the body would only copy and parse every token answer twice.
struct Capture {
    http: SharedHttpClient,
    response: Mutex<Option<HttpResponse>>,
}

impl Capture {
    fn new(http: &SharedHttpClient) -> Self {
        let http = http.clone();
        Capture {
            http,
            response: Mutex::new(None),
        }
    }

    fn into_response(self) -> Option<HttpResponse> {
        self.response
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl<'c> oauth2::AsyncHttpClient<'c> for Capture {
    type Error = HttpError;
    type Future =
        Pin<Box<dyn Future<Output = Result<oauth2::HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: oauth2::HttpRequest) -> Self::Future {
        Box::pin(async move {
            let response = self.http.execute(request).await?;
            let status_only = http::Response::builder()
                .status(response.status())
                .body(Vec::new())
                .map_err(|e| HttpError::with_source(HttpErrorKind::Other, e))?;
            *self.response.lock().unwrap_or_else(|e| e.into_inner()) = Some(response);
            Ok(status_only)
        })
    }
}

/// When a login uses a pushed authorization request (RFC 9126): the broker posts the
/// authorization parameters to the provider's `pushed_authorization_request_endpoint` with the
/// client's authentication, and the browser is sent to an authorization URL that carries only
/// `client_id` and the `request_uri` the provider answered.
///
/// Whatever the mode, a provider whose metadata says `require_pushed_authorization_requests:
/// true` is treated as [`ParMode::Required`] (and [`ParMode::Off`] is then a configuration
/// error).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ParMode {
    /// Never push: the parameters travel in the authorization URL.
    Off,
    /// Push when the provider has a PAR endpoint (from discovery or configuration).
    #[default]
    IfAdvertised,
    /// Always push; a provider without a PAR endpoint is a configuration error at login.
    Required,
}

impl OAuth2Config {
    /// Sets the provider's issuer identifier (RFC 8414), so that a callback's `iss` (RFC 9207)
    /// is checked against it. `iss_parameter_supported`: the provider always sends `iss`
    /// (`authorization_response_iss_parameter_supported`), so a callback without it is refused.
    pub fn with_issuer(mut self, issuer: impl Into<String>, iss_parameter_supported: bool) -> Self {
        self.issuer = Some(issuer.into());
        self.authorization_response_iss_parameter_supported = iss_parameter_supported;
        self
    }

    /// Sets the pushed authorization request endpoint (RFC 9126).
    pub fn with_pushed_authorization_request_endpoint(mut self, url: Url) -> Self {
        self.pushed_authorization_request_endpoint = Some(url);
        self
    }

    /// Sets when logins use pushed authorization requests (see [`ParMode`]).
    pub fn with_pushed_authorization(mut self, mode: ParMode) -> Self {
        self.pushed_authorization = mode;
        self
    }

    /// Declares that the provider requires pushed authorization requests
    /// (`require_pushed_authorization_requests`).
    pub fn with_require_pushed_authorization_requests(mut self, required: bool) -> Self {
        self.require_pushed_authorization_requests = required;
        self
    }

    /// The PAR endpoint a login must use, `None` to send the parameters in the URL.
    pub(crate) fn par_endpoint(&self) -> Result<Option<&Url>, ProviderError> {
        let required = self.pushed_authorization == ParMode::Required
            || self.require_pushed_authorization_requests;
        match (
            self.pushed_authorization,
            &self.pushed_authorization_request_endpoint,
        ) {
            (ParMode::Off, _) if self.require_pushed_authorization_requests => {
                Err(ProviderError::Config {
                    reason: format!(
                        "provider {} requires pushed authorization requests \
                         (require_pushed_authorization_requests) but ParMode::Off is configured",
                        self.id
                    ),
                })
            }
            (ParMode::Off, _) => Ok(None),
            (_, Some(url)) => Ok(Some(url)),
            (_, None) if required => Err(ProviderError::Config {
                reason: format!(
                    "provider {} requires pushed authorization requests but has no \
                     pushed_authorization_request_endpoint",
                    self.id
                ),
            }),
            (_, None) => Ok(None),
        }
    }

    /// The RFC 9207 issuer identification this configuration declares.
    pub(crate) fn response_issuer(&self) -> super::AuthorizationResponseIssuer {
        super::AuthorizationResponseIssuer {
            issuers: self.issuer.iter().cloned().collect(),
            iss_parameter_supported: self.authorization_response_iss_parameter_supported,
        }
    }
}

/// A PAR endpoint's success answer (RFC 9126 §2.2).
#[derive(serde::Deserialize)]
struct ParAnswer {
    request_uri: String,
    expires_in: u64,
}

impl OAuth2Provider {
    /// The authorization URL of a login, through the PAR endpoint when the configuration says
    /// so (see [`ParMode`]).
    pub(crate) async fn pushed_authorization_url(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<Url, ProviderError> {
        let full = self.authorization_url(request)?;
        let Some(endpoint) = self.config.par_endpoint()? else {
            return Ok(full);
        };
        // The same parameters the URL would carry. RFC 9126 §2.1 has `client_id` in the body;
        // `post_form` already adds it for every client authentication but Basic with a secret,
        // and a second one would be refused as a repeated parameter.
        let basic = matches!(
            (self.config.client_auth, &self.config.client_secret),
            (ClientAuth::Basic, Some(_))
        );
        let params: Vec<(String, String)> = full
            .query_pairs()
            .filter(|(name, _)| basic || name != "client_id")
            .map(|(n, v)| (n.into_owned(), v.into_owned()))
            .collect();
        let form = params
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        let response = self.post_form(endpoint, form).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(
                match parse_token_response(status, response.headers(), response.body()) {
                    Err(e) => self.config.quirks.classify_error(e),
                    Ok(_) => ProviderError::Protocol {
                        status: Some(status.as_u16()),
                        reason: "the pushed authorization request failed".into(),
                    },
                },
            );
        }
        let answer: ParAnswer =
            serde_json::from_slice(response.body()).map_err(|e| ProviderError::Protocol {
                status: Some(status.as_u16()),
                reason: format!(
                    "the pushed authorization response is not valid ({})",
                    e.classify_name()
                ),
            })?;
        if answer.request_uri.is_empty() || answer.expires_in == 0 {
            return Err(ProviderError::Protocol {
                status: Some(status.as_u16()),
                reason: "the pushed authorization response has an empty request_uri or \
                         expires_in"
                    .into(),
            });
        }
        let mut url = self.config.authorization_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("client_id", &self.config.client_id)
            .append_pair("request_uri", &answer.request_uri);
        Ok(url)
    }
}
