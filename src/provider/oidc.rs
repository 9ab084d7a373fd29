//! OpenID Connect on top of the OAuth 2.0 provider: discovery, ID-token verification against the
//! provider's JWKS, and the Google and Microsoft presets.
//!
//! Token-endpoint traffic goes through [`OAuth2Provider`] (lenient reading, classified errors);
//! `openidconnect` is used only to verify ID tokens. The ID token is kept raw until it is
//! verified, because a malformed `id_token` inside an otherwise good answer must not cost the
//! one-time code its tokens (`openidconnect`'s own response type fails as a whole).

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use openidconnect::core::{
    CoreGenderClaim, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
};
use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, ClientSecret, IdToken, IdTokenVerifier,
    IssuerUrl, Nonce, SignatureVerificationError,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use url::Url;

use super::oauth2::transport_error;
use super::quirks::{GoogleQuirks, MicrosoftQuirks};
use super::{
    AuthorizationRequest, ClientAssertionAudience, ClientAuth, ClientCredentials, CodeExchange,
    OAuth2Config, OAuth2Provider, Provider, ProviderError, Quirks, RefreshTokenReuse,
    SharedClientAssertionKey, TokenKind,
};
use crate::account::UpstreamAccount;
use crate::clock::{self, SharedClock};
use crate::http::{HttpResponse, SharedHttpClient};
use crate::ids::{ProviderId, Scopes};
use crate::secret::Secret;
use crate::token::ProviderTokens;

/// Which `iss` values an ID token may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IssuerPolicy {
    /// Exactly this issuer (the discovery document's `issuer`).
    Exact(String),
    /// Any of these (Google signs with `https://accounts.google.com` or `accounts.google.com`).
    AnyOf(Vec<String>),
    /// Microsoft's multi-tenant template, e.g.
    /// `https://login.microsoftonline.com/{tenantid}/v2.0`: the token's `iss` must equal the
    /// template with `{tenantid}` replaced by the token's own `tid` claim, and, when `tenants`
    /// is set, that `tid` must be one of them.
    TenantTemplate {
        /// The template, with a literal `{tenantid}`.
        template: String,
        /// The tenants allowed to sign in (`None`: any).
        tenants: Option<Vec<String>>,
    },
}

impl IssuerPolicy {
    /// Checks an ID token's `iss` (and `tid`, for tenant templates).
    pub fn check(&self, iss: &str, tid: Option<&str>) -> Result<(), String> {
        match self {
            IssuerPolicy::Exact(expected) if same_issuer(expected, iss) => Ok(()),
            IssuerPolicy::Exact(expected) => {
                Err(format!("issuer `{iss}` is not the expected `{expected}`"))
            }
            IssuerPolicy::AnyOf(list) if list.iter().any(|e| same_issuer(e, iss)) => Ok(()),
            IssuerPolicy::AnyOf(list) => Err(format!(
                "issuer `{iss}` is not one of the expected `{}`",
                list.join("`, `")
            )),
            IssuerPolicy::TenantTemplate { template, tenants } => {
                let Some(tid) = tid else {
                    return Err("the token has no `tid` claim to check its issuer with".into());
                };
                let expected = template.replace("{tenantid}", tid);
                if !same_issuer(&expected, iss) {
                    return Err(format!(
                        "issuer `{iss}` does not match `{template}` for tenant `{tid}`"
                    ));
                }
                match tenants {
                    Some(allowed) if !allowed.iter().any(|t| t == tid) => {
                        Err(format!("tenant `{tid}` is not allowed to sign in"))
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

fn same_issuer(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Where a Microsoft identity platform (Entra ID) tenant signs its users in, for
/// [`OidcConfig::microsoft_with_authority`]. The default is the public cloud.
///
/// ```
/// use tokenbroker::provider::MicrosoftAuthority;
///
/// assert_eq!(MicrosoftAuthority::China.url().as_str(), "https://login.chinacloudapi.cn/");
/// assert_eq!(
///     MicrosoftAuthority::China.issuer_template(),
///     "https://login.partner.microsoftonline.cn/{tenantid}/v2.0"
/// );
/// let proxy = MicrosoftAuthority::Custom("https://proxy.example/entra/".parse()?);
/// assert_eq!(proxy.issuer_template(), "https://proxy.example/entra/{tenantid}/v2.0");
/// assert_eq!(proxy.userinfo_endpoint(), None);
/// # Ok::<(), url::ParseError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MicrosoftAuthority {
    /// `https://login.microsoftonline.com`: Microsoft Entra ID, global service.
    #[default]
    Public,
    /// `https://login.microsoftonline.us`: Microsoft Entra ID for US Government (Azure
    /// Government, GCC High, DoD). Userinfo at `https://graph.microsoft.us`.
    UsGovernment,
    /// `https://login.chinacloudapi.cn`: Microsoft Entra ID operated by 21Vianet. Its ID tokens
    /// name `https://login.partner.microsoftonline.cn/{tenantid}/v2.0`, an alias host of the
    /// same service, as issuer. Userinfo at `https://microsoftgraph.chinacloudapi.cn`.
    China,
    /// Any other host: Entra External ID (`https://{subdomain}.ciamlogin.com`), a proxy in
    /// front of one of the clouds, a test double. Endpoints go under this URL, whose path is
    /// kept as a prefix. No userinfo endpoint is assumed.
    Custom(Url),
}

impl MicrosoftAuthority {
    /// The authority's base URL.
    pub fn url(&self) -> Url {
        let fixed = |s: &str| Url::parse(s).expect("the national clouds' URLs are valid");
        match self {
            MicrosoftAuthority::Public => fixed("https://login.microsoftonline.com"),
            MicrosoftAuthority::UsGovernment => fixed("https://login.microsoftonline.us"),
            MicrosoftAuthority::China => fixed("https://login.chinacloudapi.cn"),
            MicrosoftAuthority::Custom(url) => url.clone(),
        }
    }

    /// The issuer template of the authority's v2.0 ID tokens, with a literal `{tenantid}` (see
    /// [`IssuerPolicy::TenantTemplate`]).
    pub fn issuer_template(&self) -> String {
        let base = match self {
            MicrosoftAuthority::China => "https://login.partner.microsoftonline.cn".to_owned(),
            other => other.url().as_str().trim_end_matches('/').to_owned(),
        };
        format!("{base}/{{tenantid}}/v2.0")
    }

    /// The OpenID Connect userinfo endpoint of the cloud's Microsoft Graph; `None` for a
    /// custom authority.
    pub fn userinfo_endpoint(&self) -> Option<Url> {
        let graph = match self {
            MicrosoftAuthority::Public => "https://graph.microsoft.com/oidc/userinfo",
            MicrosoftAuthority::UsGovernment => "https://graph.microsoft.us/oidc/userinfo",
            MicrosoftAuthority::China => "https://microsoftgraph.chinacloudapi.cn/oidc/userinfo",
            MicrosoftAuthority::Custom(_) => return None,
        };
        Some(Url::parse(graph).expect("Microsoft Graph's URLs are valid"))
    }

    /// A custom authority must be a plain `http(s)://host[/prefix]` URL.
    fn check(&self) -> Result<(), ProviderError> {
        let MicrosoftAuthority::Custom(url) = self else {
            return Ok(());
        };
        let problem = if !matches!(url.scheme(), "https" | "http") {
            Some("is not an http or https URL")
        } else if url.host().is_none() {
            Some("has no host")
        } else if !url.username().is_empty() || url.password().is_some() {
            Some("carries credentials")
        } else if url.query().is_some() || url.fragment().is_some() {
            Some("has a query or fragment")
        } else {
            None
        };
        let Some(problem) = problem else {
            return Ok(());
        };
        // Credentials in the URL are refused, and never printed.
        let mut shown = url.clone();
        let _ = shown.set_username("");
        let _ = shown.set_password(None);
        Err(ProviderError::Config {
            reason: format!("the Microsoft authority {shown} {problem}"),
        })
    }

    /// `{authority}/{tenant}/{rest...}`, with the tenant as one path segment.
    fn endpoint(&self, tenant: &str, rest: &[&str]) -> Url {
        let mut url = self.url();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().push(tenant).extend(rest);
        }
        url
    }
}

/// The Microsoft preset at `authority` (already checked).
fn microsoft_config(
    authority: &MicrosoftAuthority,
    id: ProviderId,
    tenant: &str,
    client_id: String,
    client_secret: Secret,
    redirect_uri: Url,
) -> OidcConfig {
    let endpoint = |rest: &[&str]| authority.endpoint(tenant, rest);
    let oauth2 = OAuth2Config::new(
        id,
        client_id,
        endpoint(&["oauth2", "v2.0", "authorize"]),
        endpoint(&["oauth2", "v2.0", "token"]),
        redirect_uri,
    )
    .with_client_secret(client_secret)
    .with_client_auth(ClientAuth::Post)
    .with_scopes(Scopes::parse("openid profile email offline_access"))
    .with_refresh_token_reuse(RefreshTokenReuse::Tolerated)
    .with_quirks(MicrosoftQuirks);
    let multi_tenant = matches!(tenant, "common" | "organizations" | "consumers");
    let issuer = IssuerPolicy::TenantTemplate {
        template: authority.issuer_template(),
        // A domain name is not a `tid`; only a tenant id can be pinned here.
        tenants: (!multi_tenant && !tenant.contains('.')).then(|| vec![tenant.to_owned()]),
    };
    let mut config = OidcConfig::new(oauth2, issuer, endpoint(&["discovery", "v2.0", "keys"]));
    config.userinfo_endpoint = authority.userinfo_endpoint();
    config.end_session_endpoint = Some(endpoint(&["oauth2", "v2.0", "logout"]));
    config
}

/// Configuration of an OpenID Connect provider: the OAuth 2.0 part plus what ID-token
/// verification needs.
///
/// Build it from a discovery document with [`OidcConfig::discover`], from a preset
/// ([`OidcConfig::google`], [`OidcConfig::microsoft`], [`OidcConfig::microsoft_with_authority`]),
/// or by hand with [`OidcConfig::new`]; then adjust it with the `with_*` methods (scopes, extra
/// authorization parameters, client authentication, endpoints, ...). The fields are public to
/// read; the methods are the way to change them, and keep what belongs together (e.g.
/// `openid` in the scopes) together.
///
/// ```
/// use tokenbroker::provider::OidcConfig;
/// use tokenbroker::{ProviderId, Scopes, Secret};
///
/// let google = OidcConfig::google(
///     ProviderId::new("google")?,
///     "1234.apps.googleusercontent.com",
///     Secret::new("client-secret"),
///     "https://app.example/callback".parse()?,
/// )
/// .with_additional_scopes(Scopes::parse("https://www.googleapis.com/auth/drive.readonly"))
/// .with_authorize_param("hd", "example.com");
/// assert!(google.oauth2.scopes.contains("openid"));
/// assert!(google.validate().is_ok());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct OidcConfig {
    /// Endpoints, client, scopes and quirks.
    pub oauth2: OAuth2Config,
    /// Which issuers are accepted.
    pub issuer: IssuerPolicy,
    /// Where the signing keys are published.
    pub jwks_uri: Url,
    /// The userinfo endpoint, if any.
    pub userinfo_endpoint: Option<Url>,
    /// The RP-initiated logout endpoint, if any.
    pub end_session_endpoint: Option<Url>,
    /// Accepted ID-token signing algorithms (`RS256` when the provider says nothing; never
    /// `none`).
    pub signing_algs: Vec<CoreJwsSigningAlgorithm>,
    /// Tolerated clock difference when checking `exp` (default 60 s).
    pub clock_skew: Duration,
    /// The shortest time between two JWKS re-fetches forced by an unknown key id (default
    /// 10 s), so that tokens with made-up `kid`s cannot make us hammer the provider.
    pub jwks_refetch_interval: Duration,
    /// The clock that `exp` is checked against (the system clock by default).
    pub clock: SharedClock,
}

impl OidcConfig {
    /// A configuration from its parts; adds the `openid` scope.
    pub fn new(mut oauth2: OAuth2Config, issuer: IssuerPolicy, jwks_uri: Url) -> Self {
        oauth2.scopes.insert("openid");
        OidcConfig {
            oauth2,
            issuer,
            jwks_uri,
            userinfo_endpoint: None,
            end_session_endpoint: None,
            signing_algs: vec![CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256],
            clock_skew: Duration::from_secs(60),
            jwks_refetch_interval: Duration::from_secs(10),
            clock: clock::system(),
        }
    }

    /// Google, with [`GoogleQuirks`]: scopes `openid email profile`, `access_type=offline`,
    /// `include_granted_scopes=true`, `prompt=consent` only while no refresh token is held,
    /// both of Google's issuer spellings, RFC 7009 revocation at
    /// `https://oauth2.googleapis.com/revoke`, and refresh tokens that are not rotated.
    ///
    /// To go through a proxy (or reach a test double), move the endpoints with
    /// [`with_base_url`](Self::with_base_url) (one host for all) or one by one; the quirks and
    /// the issuer check stay:
    ///
    /// ```
    /// use tokenbroker::provider::OidcConfig;
    /// use tokenbroker::{ProviderId, Secret};
    ///
    /// let google = OidcConfig::google(
    ///     ProviderId::new("google")?,
    ///     "1234.apps.googleusercontent.com",
    ///     Secret::new("client-secret"),
    ///     "https://app.example/callback".parse()?,
    /// )
    /// .with_token_endpoint("https://egress.corp.example/google/token".parse()?)
    /// .with_jwks_uri("https://egress.corp.example/google/oauth2/v3/certs".parse()?);
    /// assert_eq!(google.oauth2.token_endpoint.host_str(), Some("egress.corp.example"));
    /// assert!(format!("{:?}", google.oauth2.quirks).contains("GoogleQuirks"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn google(
        id: ProviderId,
        client_id: impl Into<String>,
        client_secret: Secret,
        redirect_uri: Url,
    ) -> Self {
        let url = |s: &str| Url::parse(s).expect("Google's endpoint URLs are valid");
        let oauth2 = OAuth2Config::new(
            id,
            client_id,
            url("https://accounts.google.com/o/oauth2/v2/auth"),
            url("https://oauth2.googleapis.com/token"),
            redirect_uri,
        )
        .with_client_secret(client_secret)
        .with_client_auth(ClientAuth::Post)
        .with_revocation_endpoint(url("https://oauth2.googleapis.com/revoke"))
        .with_scopes(Scopes::parse("openid email profile"))
        .with_refresh_token_reuse(RefreshTokenReuse::Tolerated)
        .with_quirks(GoogleQuirks);
        let mut config = OidcConfig::new(
            oauth2,
            IssuerPolicy::AnyOf(vec![
                "https://accounts.google.com".into(),
                "accounts.google.com".into(),
            ]),
            url("https://www.googleapis.com/oauth2/v3/certs"),
        );
        config.userinfo_endpoint = Some(url("https://openidconnect.googleapis.com/v1/userinfo"));
        config
    }

    /// Microsoft identity platform v2 in the public cloud (`https://login.microsoftonline.com`),
    /// with [`MicrosoftQuirks`]; [`OidcConfig::microsoft_with_authority`] for national clouds,
    /// Entra External ID and other hosts. `tenant` is `common`, `organizations`, `consumers`,
    /// a tenant id or a verified domain (one path segment: it is percent-encoded, not checked;
    /// `microsoft_with_authority` checks it).
    ///
    /// Scopes `openid profile email offline_access`; new refresh token on every refresh (old
    /// ones stay valid at Microsoft, so the preset says [`RefreshTokenReuse::Tolerated`] and a
    /// refresh whose answer was lost is asked again at once, within the same lease); no RFC 7009
    /// revocation (unlink reports "not supported upstream" and deletes). ID tokens are checked
    /// against the `{tenantid}` issuer template with the token's own `tid`; with a specific
    /// tenant, only that tenant is accepted. Userinfo is Microsoft Graph's, logout the tenant's
    /// `oauth2/v2.0/logout`.
    ///
    /// ```
    /// use tokenbroker::provider::OidcConfig;
    /// use tokenbroker::{ProviderId, Scopes, Secret};
    ///
    /// let microsoft = OidcConfig::microsoft(
    ///     ProviderId::new("microsoft")?,
    ///     "organizations",
    ///     "00000000-0000-0000-0000-000000000001",
    ///     Secret::new("client-secret"),
    ///     "https://app.example/callback".parse()?,
    /// )
    /// .with_additional_scopes(Scopes::parse("User.Read"));
    /// assert_eq!(
    ///     microsoft.oauth2.token_endpoint.as_str(),
    ///     "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn microsoft(
        id: ProviderId,
        tenant: &str,
        client_id: impl Into<String>,
        client_secret: Secret,
        redirect_uri: Url,
    ) -> Self {
        microsoft_config(
            &MicrosoftAuthority::Public,
            id,
            tenant,
            client_id.into(),
            client_secret,
            redirect_uri,
        )
    }

    /// Microsoft identity platform v2 at `authority`: a national cloud
    /// ([`MicrosoftAuthority::UsGovernment`], [`MicrosoftAuthority::China`]) or any other host
    /// ([`MicrosoftAuthority::Custom`]: Entra External ID's `https://{subdomain}.ciamlogin.com`,
    /// a proxy, a test double). Everything else is as in [`OidcConfig::microsoft`]: the
    /// authorization, token, JWKS and logout endpoints and the `{tenantid}` issuer template all
    /// derive from the authority, and the userinfo endpoint is the cloud's Microsoft Graph
    /// (none for a custom authority: set one with [`OidcConfig::with_userinfo_endpoint`]).
    ///
    /// ```
    /// use tokenbroker::provider::{MicrosoftAuthority, OidcConfig};
    /// use tokenbroker::{ProviderId, Secret};
    ///
    /// let gov = OidcConfig::microsoft_with_authority(
    ///     ProviderId::new("entra-gov")?,
    ///     MicrosoftAuthority::UsGovernment,
    ///     "contoso.onmicrosoft.us",
    ///     "00000000-0000-0000-0000-000000000001",
    ///     Secret::new("client-secret"),
    ///     "https://app.example/callback".parse()?,
    /// )?;
    /// assert_eq!(
    ///     gov.oauth2.authorization_endpoint.as_str(),
    ///     "https://login.microsoftonline.us/contoso.onmicrosoft.us/oauth2/v2.0/authorize"
    /// );
    ///
    /// // Entra External ID: the tenant's own host.
    /// let ciam = OidcConfig::microsoft_with_authority(
    ///     ProviderId::new("customers")?,
    ///     MicrosoftAuthority::Custom("https://contoso.ciamlogin.com".parse()?),
    ///     "contoso.onmicrosoft.com",
    ///     "00000000-0000-0000-0000-000000000002",
    ///     Secret::new("client-secret"),
    ///     "https://app.example/callback".parse()?,
    /// )?;
    /// assert_eq!(
    ///     ciam.jwks_uri.as_str(),
    ///     "https://contoso.ciamlogin.com/contoso.onmicrosoft.com/discovery/v2.0/keys"
    /// );
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// The issuer template is `{authority}/{tenantid}/v2.0` (China:
    /// `https://login.partner.microsoftonline.cn/{tenantid}/v2.0`, the host its tokens name).
    /// Where a tenant's ID tokens name another issuer (compare the `issuer` of its discovery
    /// document), set it with [`OidcConfig::with_issuer`]; a template may use `{tenantid}` more
    /// than once.
    ///
    /// # Errors
    /// [`ProviderError::Config`] when a custom authority is not an `http`/`https` URL with a
    /// host and no credentials, query or fragment, or when `tenant` is empty or holds anything
    /// but ASCII letters, digits, `.`, `-` and `_`.
    pub fn microsoft_with_authority(
        id: ProviderId,
        authority: MicrosoftAuthority,
        tenant: &str,
        client_id: impl Into<String>,
        client_secret: Secret,
        redirect_uri: Url,
    ) -> Result<Self, ProviderError> {
        authority.check()?;
        if tenant.is_empty()
            || !tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(ProviderError::Config {
                reason: format!(
                    "Microsoft tenant {tenant:?} is not a tenant id, a domain name, `common`, \
                     `organizations` or `consumers`"
                ),
            });
        }
        Ok(microsoft_config(
            &authority,
            id,
            tenant,
            client_id.into(),
            client_secret,
            redirect_uri,
        ))
    }

    /// Reads the provider's discovery document (`{issuer}/.well-known/openid-configuration`)
    /// through `http` and builds a configuration from it. The document's `issuer` must be the
    /// one asked for; a Microsoft-style `{tenantid}` template becomes
    /// [`IssuerPolicy::TenantTemplate`]. The scopes are `openid` only: add the others with
    /// [`with_additional_scopes`](Self::with_additional_scopes), and set anything else with
    /// the other `with_*` methods.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use tokenbroker::provider::{OidcConfig, OidcProvider};
    /// use tokenbroker::{ProviderId, Scopes, Secret};
    ///
    /// let http = Arc::new(tokenbroker::http::ReqwestClient::new()?);
    /// let config = OidcConfig::discover(
    ///     ProviderId::new("corp")?,
    ///     &"https://idp.example".parse()?,
    ///     "client-1",
    ///     Some(Secret::new("client-secret")),
    ///     "https://app.example/callback".parse()?,
    ///     &*http,
    /// )
    /// .await?
    /// .with_additional_scopes(Scopes::parse("email profile offline_access"))
    /// .with_authorize_param("acr_values", "mfa");
    /// let provider = OidcProvider::new(config, http);
    /// # Ok(()) }
    /// ```
    ///
    /// The client authentication method is chosen from the document's
    /// `token_endpoint_auth_methods_supported` as [`ClientCredentials::choose_client_auth`]
    /// describes (a secret: `client_secret_basic`, then `client_secret_post`, then
    /// `client_secret_jwt`; no secret: `none`). Use
    /// [`OidcConfig::discover_with_credentials`] for a `private_key_jwt` key.
    pub async fn discover(
        id: ProviderId,
        issuer: &Url,
        client_id: impl Into<String>,
        client_secret: Option<Secret>,
        redirect_uri: Url,
        http: &dyn crate::http::HttpClient,
    ) -> Result<OidcConfig, ProviderError> {
        Self::discover_with_credentials(
            id,
            issuer,
            client_id,
            ClientCredentials::from(client_secret),
            redirect_uri,
            http,
        )
        .await
    }

    /// [`OidcConfig::discover`] with any [`ClientCredentials`]: a client secret, a
    /// `private_key_jwt` key, both, or none. The method is the first of
    /// [`ClientCredentials::usable_methods`] the provider accepts (a key: `private_key_jwt`
    /// first); when it accepts none of them, this fails with
    /// [`ProviderError::ClientAuthNotAccepted`] naming both sides.
    ///
    /// ```no_run
    /// # async fn run(pem: &str) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use tokenbroker::provider::*;
    /// use tokenbroker::ProviderId;
    ///
    /// let http = Arc::new(tokenbroker::http::ReqwestClient::new()?);
    /// let key = SharedClientAssertionKey::new(
    ///     ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Rs256, pem)?.with_key_id("k1"),
    /// );
    /// let config = OidcConfig::discover_with_credentials(
    ///     ProviderId::new("corp")?,
    ///     &"https://idp.example".parse()?,
    ///     "client-1",
    ///     ClientCredentials::assertion_key(key.clone()),
    ///     "https://app.example/callback".parse()?,
    ///     &*http,
    /// )
    /// .await?;
    /// assert_eq!(config.oauth2.client_auth, ClientAuth::PrivateKeyJwt);
    /// # Ok(()) }
    /// ```
    pub async fn discover_with_credentials(
        id: ProviderId,
        issuer: &Url,
        client_id: impl Into<String>,
        credentials: ClientCredentials,
        redirect_uri: Url,
        http: &dyn crate::http::HttpClient,
    ) -> Result<OidcConfig, ProviderError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.as_str().trim_end_matches('/')
        );
        let url = Url::parse(&url).map_err(|e| ProviderError::Config {
            reason: format!("bad issuer URL: {e}"),
        })?;
        let response = get_json(http, &url).await?;
        let doc: DiscoveryDocument =
            serde_json::from_slice(response.body()).map_err(|e| ProviderError::Protocol {
                status: Some(response.status().as_u16()),
                reason: format!(
                    "discovery document is not valid ({} at line {} column {})",
                    e.classify_name(),
                    e.line(),
                    e.column()
                ),
            })?;
        let issuer_policy = if doc.issuer.contains("{tenantid}") {
            IssuerPolicy::TenantTemplate {
                template: doc.issuer.clone(),
                tenants: None,
            }
        } else if same_issuer(&doc.issuer, issuer.as_str()) {
            IssuerPolicy::Exact(doc.issuer.clone())
        } else {
            // OpenID Connect Discovery §4.3: a mismatch means the document is not this issuer's.
            return Err(ProviderError::Config {
                reason: format!(
                    "discovery document names issuer `{}`, expected `{issuer}`",
                    doc.issuer
                ),
            });
        };
        let client_auth =
            credentials.choose_client_auth(&doc.token_endpoint_auth_methods_supported)?;
        let mut oauth2 = OAuth2Config::new(
            id,
            client_id,
            doc.authorization_endpoint,
            doc.token_endpoint,
            redirect_uri,
        )
        .with_client_auth(client_auth)
        .with_scopes(Scopes::parse("openid"));
        oauth2.client_secret = credentials.secret;
        oauth2.client_assertion_key = credentials.assertion_key;
        oauth2.revocation_endpoint = doc.revocation_endpoint;
        if !doc.issuer.contains("{tenantid}") {
            oauth2.issuer = Some(doc.issuer.clone());
        }
        oauth2.authorization_response_iss_parameter_supported =
            doc.authorization_response_iss_parameter_supported;
        oauth2.pushed_authorization_request_endpoint = doc.pushed_authorization_request_endpoint;
        oauth2.require_pushed_authorization_requests = doc.require_pushed_authorization_requests;
        let mut config = OidcConfig::new(oauth2, issuer_policy, doc.jwks_uri);
        config.userinfo_endpoint = doc.userinfo_endpoint;
        config.end_session_endpoint = doc.end_session_endpoint;
        let algs: Vec<CoreJwsSigningAlgorithm> = doc
            .id_token_signing_alg_values_supported
            .iter()
            .filter(|a| *a != "none")
            .filter_map(|a| serde_json::from_value(serde_json::Value::String(a.clone())).ok())
            .collect();
        if !algs.is_empty() {
            config.signing_algs = algs;
        }
        Ok(config)
    }

    /// Moves every endpoint (those of [`OAuth2Config::with_base_url`], and the JWKS, userinfo
    /// and end-session endpoints) to `base`'s scheme, host and port, with `base`'s path put
    /// before each endpoint's own: points a preset at a test double or at a proxy that serves
    /// them all, keeping its quirks. The issuer policy is unchanged (set it with
    /// [`with_issuer`](Self::with_issuer) when the double signs as another issuer). For
    /// endpoints on different hosts, set each with its `with_*_endpoint` method.
    pub fn with_base_url(mut self, base: &Url) -> Self {
        self.oauth2 = self.oauth2.with_base_url(base);
        self.jwks_uri = rebase(base, &self.jwks_uri);
        self.userinfo_endpoint = self.userinfo_endpoint.map(|u| rebase(base, &u));
        self.end_session_endpoint = self.end_session_endpoint.map(|u| rebase(base, &u));
        self
    }

    /// Sets the issuer policy.
    pub fn with_issuer(mut self, issuer: IssuerPolicy) -> Self {
        self.issuer = issuer;
        self
    }

    /// Sets the scopes every login asks for, replacing the preset's or discovery's; `openid`
    /// is always kept. See [`with_additional_scopes`](Self::with_additional_scopes) to add to
    /// them instead.
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        self.oauth2 = self.oauth2.with_scopes(scopes);
        self.oauth2.scopes.insert("openid");
        self
    }

    /// Adds scopes to the ones every login asks for (e.g. `offline_access`, or an API's scopes
    /// on top of a preset's).
    pub fn with_additional_scopes(mut self, scopes: Scopes) -> Self {
        self.oauth2 = self.oauth2.with_additional_scopes(scopes);
        self
    }

    /// Adds an authorization parameter sent on every login (see
    /// [`OAuth2Config::with_authorize_param`]; the reserved ones are refused).
    pub fn with_authorize_param(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.oauth2 = self.oauth2.with_authorize_param(name, value);
        self
    }

    /// Adds several authorization parameters sent on every login (see
    /// [`OAuth2Config::with_authorize_params`]).
    pub fn with_authorize_params<K, V>(mut self, params: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.oauth2 = self.oauth2.with_authorize_params(params);
        self
    }

    /// Sets the client secret (also the HS256 key of ID tokens signed with it).
    pub fn with_client_secret(mut self, secret: Secret) -> Self {
        self.oauth2 = self.oauth2.with_client_secret(secret);
        self
    }

    /// Sets the client authentication method (see [`ClientAuth`]).
    pub fn with_client_auth(mut self, auth: ClientAuth) -> Self {
        self.oauth2 = self.oauth2.with_client_auth(auth);
        self
    }

    /// Sets the key of `private_key_jwt` assertions (see
    /// [`OAuth2Config::with_client_assertion_key`]).
    pub fn with_client_assertion_key(mut self, key: impl Into<SharedClientAssertionKey>) -> Self {
        self.oauth2 = self.oauth2.with_client_assertion_key(key);
        self
    }

    /// Sets the `aud` of client assertions (see [`ClientAssertionAudience`]).
    pub fn with_client_assertion_audience(mut self, audience: ClientAssertionAudience) -> Self {
        self.oauth2 = self.oauth2.with_client_assertion_audience(audience);
        self
    }

    /// Declares how the provider treats used refresh tokens (see [`RefreshTokenReuse`]).
    pub fn with_refresh_token_reuse(mut self, reuse: RefreshTokenReuse) -> Self {
        self.oauth2 = self.oauth2.with_refresh_token_reuse(reuse);
        self
    }

    /// Sets the provider's quirks (a preset's are replaced).
    pub fn with_quirks(mut self, quirks: impl Quirks) -> Self {
        self.oauth2 = self.oauth2.with_quirks(quirks);
        self
    }

    /// Sets the authorization endpoint; the preset's quirks stay.
    pub fn with_authorization_endpoint(mut self, url: Url) -> Self {
        self.oauth2 = self.oauth2.with_authorization_endpoint(url);
        self
    }

    /// Sets the token endpoint; the preset's quirks stay.
    pub fn with_token_endpoint(mut self, url: Url) -> Self {
        self.oauth2 = self.oauth2.with_token_endpoint(url);
        self
    }

    /// Sets the RFC 7009 revocation endpoint.
    pub fn with_revocation_endpoint(mut self, url: Url) -> Self {
        self.oauth2 = self.oauth2.with_revocation_endpoint(url);
        self
    }

    /// Sets the RFC 7662 introspection endpoint.
    pub fn with_introspection_endpoint(mut self, url: Url) -> Self {
        self.oauth2 = self.oauth2.with_introspection_endpoint(url);
        self
    }

    /// Declares that the provider requires pushed authorization requests (discovery fills it
    /// from `require_pushed_authorization_requests`).
    pub fn with_require_pushed_authorization_requests(mut self, required: bool) -> Self {
        self.oauth2 = self
            .oauth2
            .with_require_pushed_authorization_requests(required);
        self
    }

    /// Sets where the provider publishes its signing keys.
    pub fn with_jwks_uri(mut self, url: Url) -> Self {
        self.jwks_uri = url;
        self
    }

    /// Sets the userinfo endpoint ([`OidcProvider::userinfo`]).
    pub fn with_userinfo_endpoint(mut self, url: Url) -> Self {
        self.userinfo_endpoint = Some(url);
        self
    }

    /// Sets the RP-initiated logout endpoint ([`OidcProvider::end_session_url`]).
    pub fn with_end_session_endpoint(mut self, url: Url) -> Self {
        self.end_session_endpoint = Some(url);
        self
    }

    /// Sets the accepted ID-token signing algorithms; `none` is never accepted and is dropped.
    /// An empty list keeps `RS256`.
    pub fn with_signing_algs(
        mut self,
        algs: impl IntoIterator<Item = CoreJwsSigningAlgorithm>,
    ) -> Self {
        let algs: Vec<_> = algs
            .into_iter()
            .filter(|a| *a != CoreJwsSigningAlgorithm::None)
            .collect();
        self.signing_algs = if algs.is_empty() {
            vec![CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256]
        } else {
            algs
        };
        self
    }

    /// Sets the clock `exp` is checked against.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Sets the tolerated clock difference.
    pub fn with_clock_skew(mut self, skew: Duration) -> Self {
        self.clock_skew = skew;
        self
    }

    /// Sets the shortest time between two forced JWKS re-fetches.
    pub fn with_jwks_refetch_interval(mut self, interval: Duration) -> Self {
        self.jwks_refetch_interval = interval;
        self
    }
}

/// `url` with `base`'s scheme, host and port, and `base`'s path prefixed to its own.
pub(crate) fn rebase(base: &Url, url: &Url) -> Url {
    let mut new = base.clone();
    new.set_path(&format!(
        "{}{}",
        base.path().trim_end_matches('/'),
        url.path()
    ));
    new.set_query(url.query());
    new
}

#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: String,
    authorization_endpoint: Url,
    token_endpoint: Url,
    jwks_uri: Url,
    #[serde(default)]
    userinfo_endpoint: Option<Url>,
    #[serde(default)]
    revocation_endpoint: Option<Url>,
    #[serde(default)]
    end_session_endpoint: Option<Url>,
    #[serde(default)]
    id_token_signing_alg_values_supported: Vec<String>,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Vec<String>,
    #[serde(default)]
    pushed_authorization_request_endpoint: Option<Url>,
    #[serde(default)]
    require_pushed_authorization_requests: bool,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

pub(crate) trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Eof => "truncated",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "missing or mistyped field",
            serde_json::error::Category::Io => "read error",
        }
    }
}

async fn get_json(
    http: &dyn crate::http::HttpClient,
    url: &Url,
) -> Result<HttpResponse, ProviderError> {
    let request = http::Request::builder()
        .method(http::Method::GET)
        .uri(url.as_str())
        .header(http::header::ACCEPT, "application/json")
        .body(Vec::new())
        .map_err(|e| ProviderError::Config {
            reason: format!("cannot build request: {e}"),
        })?;
    let response = http.execute(request).await.map_err(transport_error)?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    if status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(ProviderError::Transient {
            status: Some(status.as_u16()),
            retry_after: super::response::retry_after(response.headers()),
            reason: Some(format!("GET {} failed", url.path())),
            source: None,
        });
    }
    Err(ProviderError::Protocol {
        status: Some(status.as_u16()),
        reason: format!("GET {} answered {status}", url.path()),
    })
}

/// The claims of an ID token that passed verification.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedIdToken {
    /// `iss`.
    pub issuer: String,
    /// `sub`: the user at the provider.
    pub subject: String,
    /// `aud`.
    pub audiences: Vec<String>,
    /// `exp`.
    pub expires_at: OffsetDateTime,
    /// `tid` (Microsoft's tenant), if present.
    pub tenant_id: Option<String>,
    /// `email`, if present.
    pub email: Option<String>,
}

impl VerifiedIdToken {
    /// The upstream account the token names.
    pub fn account(&self) -> UpstreamAccount {
        UpstreamAccount {
            issuer: Some(self.issuer.clone()),
            subject: self.subject.clone(),
            tenant_id: self.tenant_id.clone(),
            email: self.email.clone(),
        }
    }
}

impl fmt::Debug for VerifiedIdToken {
    // The subject and e-mail are personal data: keep them out of logs by default.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedIdToken")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("expires_at", &self.expires_at)
            .field("tenant_id", &self.tenant_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ExtraClaims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tid: Option<String>,
}

impl AdditionalClaims for ExtraClaims {}

type RawIdToken = IdToken<
    ExtraClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

struct JwksState {
    keys: Option<Arc<CoreJsonWebKeySet>>,
    last_forced_fetch: Option<std::time::Instant>,
}

/// An OpenID Connect provider: the OAuth 2.0 provider plus ID-token verification.
///
/// - Code exchange: the answer must carry an ID token, verified (signature against the JWKS,
///   `iss` per the [`IssuerPolicy`], `aud`, `azp`, `exp` with the configured skew, and the
///   login's `nonce`); otherwise the login fails with [`ProviderError::IdToken`].
/// - Refresh: an ID token in the answer is verified too (without nonce, which refreshed
///   tokens need not carry). One that fails is dropped with a warning while the new access and
///   refresh tokens are kept: the refresh token may already have been rotated, and throwing it
///   away would end the grant. The set keeps its earlier, verified ID token.
/// - Keys are fetched on first use and cached; a token signed with an unknown `kid` triggers
///   one re-fetch (at most once per [`OidcConfig::jwks_refetch_interval`]), so key rotation at
///   the provider needs no restart.
pub struct OidcProvider {
    oauth2: OAuth2Provider,
    config: OidcConfig,
    http: SharedHttpClient,
    jwks: RwLock<JwksState>,
    refetch: tokio::sync::Mutex<()>,
}

impl fmt::Debug for OidcProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OidcProvider {
    /// A provider sending its requests through `http`. Nothing is fetched until needed.
    pub fn new(config: OidcConfig, http: SharedHttpClient) -> Self {
        OidcProvider {
            oauth2: OAuth2Provider::new(config.oauth2.clone(), http.clone()),
            config,
            http,
            jwks: RwLock::new(JwksState {
                keys: None,
                last_forced_fetch: None,
            }),
            refetch: tokio::sync::Mutex::new(()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Fetches the signing keys now (they are otherwise fetched on first use).
    pub async fn refresh_keys(&self) -> Result<(), ProviderError> {
        self.fetch_keys().await.map(|_| ())
    }

    async fn fetch_keys(&self) -> Result<Arc<CoreJsonWebKeySet>, ProviderError> {
        let response = get_json(&*self.http, &self.config.jwks_uri).await?;
        let keys: CoreJsonWebKeySet =
            serde_json::from_slice(response.body()).map_err(|e| ProviderError::Protocol {
                status: Some(response.status().as_u16()),
                reason: format!("JWKS is not valid ({})", e.classify_name()),
            })?;
        let keys = Arc::new(keys);
        write(&self.jwks).keys = Some(keys.clone());
        Ok(keys)
    }

    async fn cached_keys(&self) -> Result<Arc<CoreJsonWebKeySet>, ProviderError> {
        if let Some(keys) = read(&self.jwks).keys.clone() {
            return Ok(keys);
        }
        let _one_fetch = self.refetch.lock().await;
        if let Some(keys) = read(&self.jwks).keys.clone() {
            return Ok(keys);
        }
        self.fetch_keys().await
    }

    /// Re-fetches the keys after an unknown `kid`, unless that happened too recently.
    async fn keys_after_unknown_kid(
        &self,
        seen: &Arc<CoreJsonWebKeySet>,
    ) -> Result<Option<Arc<CoreJsonWebKeySet>>, ProviderError> {
        let _one_fetch = self.refetch.lock().await;
        {
            let state = read(&self.jwks);
            // Someone else re-fetched while we waited: use theirs.
            if let Some(current) = &state.keys
                && !Arc::ptr_eq(current, seen)
            {
                return Ok(Some(current.clone()));
            }
            if state
                .last_forced_fetch
                .is_some_and(|t| t.elapsed() < self.config.jwks_refetch_interval)
            {
                return Ok(None);
            }
        }
        write(&self.jwks).last_forced_fetch = Some(std::time::Instant::now());
        self.fetch_keys().await.map(Some)
    }

    /// Verifies a raw ID token: signature (against the JWKS, re-fetched once on an unknown key
    /// id), issuer, audience and `azp`, expiry, and — when `nonce` is given — the nonce.
    pub async fn verify_id_token(
        &self,
        raw: &Secret,
        nonce: Option<&Secret>,
    ) -> Result<VerifiedIdToken, ProviderError> {
        // The parse error of a JWT could quote it; say only what kind of problem it was.
        let token: RawIdToken =
            raw.expose_secret()
                .parse()
                .map_err(|_| ProviderError::IdToken {
                    reason: "not a well-formed signed JWT".into(),
                })?;
        let keys = self.cached_keys().await?;
        match self.check(&token, &keys, nonce) {
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) => match self.keys_after_unknown_kid(&keys).await? {
                Some(fresh) => self.check(&token, &fresh, nonce),
                None => Err(ClaimsVerificationError::SignatureVerification(
                    SignatureVerificationError::NoMatchingKey,
                )),
            },
            other => other,
        }
        .map_err(|e| ProviderError::IdToken {
            reason: id_token_reason(&e),
        })
        .and_then(|claims| {
            self.config
                .issuer
                .check(&claims.issuer, claims.tenant_id.as_deref())
                .map_err(|reason| ProviderError::IdToken { reason })?;
            Ok(claims)
        })
    }

    fn check(
        &self,
        token: &RawIdToken,
        keys: &CoreJsonWebKeySet,
        nonce: Option<&Secret>,
    ) -> Result<VerifiedIdToken, ClaimsVerificationError> {
        let client_id = ClientId::new(self.config.oauth2.client_id.clone());
        // The issuer is checked by `IssuerPolicy` (openidconnect compares one exact string,
        // which Google's two spellings and Microsoft's template break); this URL is unused.
        let placeholder = IssuerUrl::from_url(self.config.jwks_uri.clone());
        let verifier = match &self.config.oauth2.client_secret {
            // A confidential client can also check HS256 tokens, keyed with its secret.
            Some(secret) => IdTokenVerifier::new_confidential_client(
                client_id,
                ClientSecret::new(secret.expose_secret().to_owned()),
                placeholder,
                keys.clone(),
            ),
            None => IdTokenVerifier::new_public_client(client_id, placeholder, keys.clone()),
        };
        let clock = self.config.clock.clone();
        let skew = self.config.clock_skew;
        let verifier = verifier
            .require_issuer_match(false)
            .set_allowed_algs(self.config.signing_algs.iter().cloned())
            .set_time_fn(move || {
                let now = clock.now() - skew;
                chrono::DateTime::from_timestamp(now.unix_timestamp(), now.nanosecond())
                    .unwrap_or_default()
            });
        let claims = match nonce {
            Some(nonce) => {
                let nonce = Nonce::new(nonce.expose_secret().to_owned());
                token.claims(&verifier, &nonce)?
            }
            None => token.claims(&verifier, |_: Option<&Nonce>| Ok(()))?,
        };
        Ok(VerifiedIdToken {
            issuer: claims.issuer().as_str().to_owned(),
            subject: claims.subject().as_str().to_owned(),
            audiences: claims
                .audiences()
                .iter()
                .map(|a| a.as_str().to_owned())
                .collect(),
            expires_at: OffsetDateTime::from_unix_timestamp(claims.expiration().timestamp())
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
            tenant_id: claims.additional_claims().tid.clone(),
            email: claims.email().map(|e| e.as_str().to_owned()),
        })
    }

    /// Calls the userinfo endpoint with an access token and returns its JSON claims.
    ///
    /// # Errors
    /// [`ProviderError::AccessTokenRejected`] when the endpoint answers `401`: the access token
    /// expired or was revoked, which says nothing about the grant (the link is not
    /// relink-required; refresh and try again). [`ProviderError::Unsupported`] without a
    /// userinfo endpoint, [`ProviderError::Transient`] for other failures,
    /// [`ProviderError::Protocol`] for an answer that is not a JSON object.
    pub async fn userinfo(
        &self,
        access_token: &Secret,
    ) -> Result<serde_json::Map<String, serde_json::Value>, ProviderError> {
        let Some(url) = &self.config.userinfo_endpoint else {
            return Err(ProviderError::Unsupported {
                operation: "userinfo",
            });
        };
        let request = http::Request::builder()
            .method(http::Method::GET)
            .uri(url.as_str())
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", access_token.expose_secret()),
            )
            .body(Vec::new())
            .map_err(|e| ProviderError::Config {
                reason: format!("cannot build request: {e}"),
            })?;
        let response = self.http.execute(request).await.map_err(transport_error)?;
        let status = response.status();
        if status == http::StatusCode::UNAUTHORIZED {
            // The access token was refused, not the grant (RFC 6750 §3.1 `invalid_token`):
            // `InvalidGrant` here would tell the broker to give up a link whose refresh token
            // may be fine.
            return Err(ProviderError::AccessTokenRejected {
                endpoint: "userinfo",
                description: bearer_challenge(response.headers()),
            });
        }
        if !status.is_success() {
            return Err(ProviderError::Transient {
                status: Some(status.as_u16()),
                retry_after: super::response::retry_after(response.headers()),
                reason: Some("userinfo failed".into()),
                source: None,
            });
        }
        serde_json::from_slice(response.body()).map_err(|e| ProviderError::Protocol {
            status: Some(status.as_u16()),
            reason: format!("userinfo is not a JSON object ({})", e.classify_name()),
        })
    }

    /// The RP-initiated logout URL (OpenID Connect RP-Initiated Logout 1.0), when the provider
    /// publishes an `end_session_endpoint`.
    pub fn end_session_url(
        &self,
        id_token_hint: Option<&Secret>,
        post_logout_redirect_uri: Option<&Url>,
    ) -> Option<Url> {
        let mut url = self.config.end_session_endpoint.clone()?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("client_id", &self.config.oauth2.client_id);
            if let Some(hint) = id_token_hint {
                q.append_pair("id_token_hint", hint.expose_secret());
            }
            if let Some(uri) = post_logout_redirect_uri {
                q.append_pair("post_logout_redirect_uri", uri.as_str());
            }
        }
        Some(url)
    }
}

/// The `error` and `error_description` of a `WWW-Authenticate: Bearer` challenge (RFC 6750
/// §3), as one line cut to a loggable size. The challenge carries no token.
fn bearer_challenge(headers: &http::HeaderMap) -> Option<String> {
    let challenge = headers
        .get_all(http::header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| {
            v.trim_start()
                .get(..6)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer"))
        })?;
    let param = |name: &str| {
        let start = challenge.find(&format!("{name}=\""))? + name.len() + 2;
        let len = challenge[start..].find('"')?;
        Some(&challenge[start..start + len])
    };
    let text = match (param("error"), param("error_description")) {
        (Some(error), Some(description)) => format!("{error}: {description}"),
        (Some(error), None) => error.to_owned(),
        (None, Some(description)) => description.to_owned(),
        (None, None) => return None,
    };
    Some(super::truncate_description(&text))
}

/// Says which check failed, with nothing from inside the token but issuer and audience names.
fn id_token_reason(e: &ClaimsVerificationError) -> String {
    match e {
        ClaimsVerificationError::SignatureVerification(
            SignatureVerificationError::NoMatchingKey,
        ) => "no published key matches the token's key id".into(),
        ClaimsVerificationError::SignatureVerification(inner) => {
            format!("signature check failed: {inner}")
        }
        ClaimsVerificationError::Expired(_) => "the token has expired".into(),
        ClaimsVerificationError::InvalidNonce(_) => "nonce mismatch".into(),
        other => other.to_string(),
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Provider for OidcProvider {
    fn id(&self) -> &ProviderId {
        self.oauth2.id()
    }

    fn default_scopes(&self) -> Scopes {
        self.oauth2.default_scopes()
    }

    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<Url, ProviderError> {
        self.oauth2.authorization_url(request)
    }

    async fn exchange_code(
        &self,
        exchange: &CodeExchange,
    ) -> Result<ProviderTokens, ProviderError> {
        let mut tokens = self.oauth2.exchange_code(exchange).await?;
        let Some(id_token) = &tokens.id_token else {
            return Err(ProviderError::IdToken {
                reason: "the token answer has no id_token".into(),
            });
        };
        let verified = self
            .verify_id_token(id_token, Some(&exchange.nonce))
            .await?;
        tokens.account = Some(verified.account());
        Ok(tokens)
    }

    async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: Option<&Scopes>,
    ) -> Result<ProviderTokens, ProviderError> {
        let mut tokens = self.oauth2.refresh(refresh_token, scopes).await?;
        if let Some(id_token) = &tokens.id_token {
            match self.verify_id_token(id_token, None).await {
                // The broker checks that it names the link's account (OpenID Connect Core
                // §12.2) before anything is stored.
                Ok(verified) => tokens.account = Some(verified.account()),
                Err(e) => {
                    tracing::warn!(
                        provider = %self.oauth2.id(),
                        error = %e,
                        "refreshed id_token failed verification; keeping the new tokens without it"
                    );
                    tokens.id_token = None;
                }
            }
        }
        Ok(tokens)
    }

    async fn revoke(&self, token: &Secret, kind: TokenKind) -> Result<(), ProviderError> {
        self.oauth2.revoke(token, kind).await
    }

    fn refresh_token_reuse(&self) -> RefreshTokenReuse {
        self.oauth2.refresh_token_reuse()
    }

    async fn start_authorization(
        &self,
        request: &AuthorizationRequest,
    ) -> Result<Url, ProviderError> {
        self.oauth2.start_authorization(request).await
    }

    fn authorization_response_issuer(&self) -> super::AuthorizationResponseIssuer {
        let mut answer = self.config.oauth2.response_issuer();
        if answer.issuers.is_empty() {
            answer.issuers = match &self.config.issuer {
                IssuerPolicy::Exact(issuer) => vec![issuer.clone()],
                IssuerPolicy::AnyOf(list) => list.clone(),
                // One pinned tenant names one issuer; a multi-tenant template names none.
                IssuerPolicy::TenantTemplate {
                    template,
                    tenants: Some(tenants),
                } if tenants.len() == 1 => vec![template.replace("{tenantid}", &tenants[0])],
                IssuerPolicy::TenantTemplate { .. } => Vec::new(),
            };
        }
        answer
    }
}

impl OidcConfig {
    /// Checks the configuration for what can be told wrong before the first login (see
    /// [`OAuth2Config::validate`]).
    ///
    /// # Errors
    /// [`ProviderError::ReservedParameter`], naming the first reserved extra parameter.
    pub fn validate(&self) -> Result<(), ProviderError> {
        self.oauth2.validate()
    }

    /// Sets when logins use pushed authorization requests (RFC 9126, see [`ParMode`](super::ParMode)).
    /// Discovery fills the endpoint and whether the provider requires them.
    pub fn with_pushed_authorization(mut self, mode: super::ParMode) -> Self {
        self.oauth2.pushed_authorization = mode;
        self
    }

    /// Sets the pushed authorization request endpoint (RFC 9126).
    pub fn with_pushed_authorization_request_endpoint(mut self, url: Url) -> Self {
        self.oauth2.pushed_authorization_request_endpoint = Some(url);
        self
    }

    /// Declares whether the provider always sends `iss` on its authorization responses
    /// (RFC 9207 `authorization_response_iss_parameter_supported`); discovery fills it.
    pub fn with_authorization_response_iss(mut self, supported: bool) -> Self {
        self.oauth2.authorization_response_iss_parameter_supported = supported;
        self
    }
}
