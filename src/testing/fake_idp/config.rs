//! [`FakeIdpConfig`]: how a fake is set up before it starts.

use std::fmt;
use std::time::Duration;

use url::Url;

use super::modes::Flavor;
#[cfg(doc)]
use super::{Counters, FakeIdp};
use crate::provider::ClientAuth;

/// Configuration of a [`FakeIdp`], built with `with_*` methods on top of [`Default`].
///
/// Defaults: client `fake-client` / `fake-client-secret`, any redirect URI accepted, default
/// user `alice`, access tokens valid for 3600 s, authorization codes for 60 s, refresh-token
/// rotation and reuse detection on, refresh tokens issued, signed ID tokens (ES256) issued for
/// `openid`. [`FakeIdpConfig::google`] and [`FakeIdpConfig::microsoft`] are presets that
/// imitate those providers' quirks.
#[derive(Clone)]
pub struct FakeIdpConfig {
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) redirect_uris: Vec<Url>,
    pub(super) default_user: String,
    pub(super) access_token_ttl: Duration,
    pub(super) code_ttl: Duration,
    pub(super) rotate_refresh_tokens: bool,
    pub(super) reuse_detection: bool,
    pub(super) omit_refresh_token: bool,
    pub(super) issue_id_token: bool,
    pub(super) sign_id_tokens: bool,
    pub(super) keep_rotated_refresh_tokens: bool,
    pub(super) flavor: Flavor,
    pub(super) client_auth: ClientAuthRegistration,
    pub(super) login_extensions: LoginExtensions,
}

/// How the fake's client must authenticate (see [`FakeIdpConfig::with_client_auth_method`]).
#[derive(Clone, Default)]
pub(super) struct ClientAuthRegistration {
    /// `None`: `client_secret_basic` or `client_secret_post`, as before the other methods.
    pub(super) method: Option<ClientAuth>,
    /// SPKI PEM of the `private_key_jwt` public key.
    pub(super) public_key_pem: Option<String>,
    /// The only `aud` accepted in assertions; `None`: the token endpoint or the issuer.
    pub(super) assertion_audience: Option<String>,
}

/// RFC 9207 and RFC 9126 settings of the fake (see [`FakeIdpConfig::with_iss_in_response`] and
/// [`FakeIdpConfig::with_pushed_authorization_requests`]).
#[derive(Clone, Debug)]
pub(super) struct LoginExtensions {
    pub(super) iss_in_response: bool,
    pub(super) par: bool,
    pub(super) require_par: bool,
    pub(super) request_uri_ttl: Duration,
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

    /// Signs ID tokens (default; ES256, or RS256 in the Google and Microsoft presets) or, when
    /// off, sends them unsigned with `{"alg":"none"}` and an empty signature part.
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
