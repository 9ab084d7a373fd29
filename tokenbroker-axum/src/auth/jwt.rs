//! [`JwtAuthenticator`]: callers authenticated by JWTs their IdP signed.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use tokenbroker::{Caller, Realm, Scopes, Subject};
use url::Url;

use super::jwks::{Key, Lookup, RemoteJwks, Trigger, lookup};
use super::{CallerAuthenticator, Reason, Unauthenticated, bearer_token};

/// Tokens longer than this are rejected before any parsing. Real access tokens, even
/// Keycloak's with many roles, stay far below it.
const MAX_TOKEN_LEN: usize = 64 * 1024;

/// Authenticates callers by JWT access tokens (Keycloak-shaped claims), verified with
/// [`jsonwebtoken`] against keys from the issuer's JWKS or given statically.
///
/// Checks: the signature, with a key whose type fits the token's `alg` and whose own JWK
/// `alg` (when present) equals it, `alg` being in the allow-list; `iss` equal to the issuer;
/// `aud` containing the audience; `exp` (required) and `nbf`, both with leeway; `sub`
/// (required) and a client id (`azp`, else `client_id`).
///
/// The [`Caller`] has the builder's realm, `sub` as subject, the client id, the roles of
/// `realm_access.roles` and of `resource_access.{client}.roles` for the client named with
/// [`client_roles_of`](JwtAuthenticatorBuilder::client_roles_of), and the `scope` claim as
/// scopes. As a Keycloak token carries exactly the roles the client's scope admits, those
/// roles are also the caller's client-scope roles.
///
/// Cloning is cheap and clones share the key cache.
///
/// ```
/// use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
/// use tokenbroker::Realm;
/// use tokenbroker_axum::auth::{CallerAuthenticator, JwtAuthenticator};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // HMAC keeps the example short; real deployments use the IdP's JWKS (`jwks_url`).
/// let secret = b"an example secret of at least 32 bytes!";
/// let auth = JwtAuthenticator::builder("https://idp.example/realms/acme", "broker")
///     .realm(Realm::new("acme")?)
///     .algorithms(&[Algorithm::HS256])
///     .static_key(None, DecodingKey::from_secret(secret), Algorithm::HS256)
///     .client_roles_of("broker")
///     .build()?;
///
/// let now = jsonwebtoken::get_current_timestamp();
/// let claims = serde_json::json!({
///     "iss": "https://idp.example/realms/acme",
///     "aud": "broker",
///     "sub": "user-1",
///     "azp": "web-app",
///     "exp": now + 300,
///     "scope": "openid profile",
///     "resource_access": { "broker": { "roles": ["read-token"] } },
/// });
/// let token = jsonwebtoken::encode(
///     &Header::new(Algorithm::HS256),
///     &claims,
///     &EncodingKey::from_secret(secret),
/// )?;
///
/// let caller = auth.authenticate_token(&token).await?;
/// assert_eq!(caller.subject.as_str(), "user-1");
/// assert_eq!(caller.client_id, "web-app");
/// assert!(caller.has_effective_role("read-token"));
/// assert!(caller.scopes.contains("profile"));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct JwtAuthenticator {
    inner: Arc<Inner>,
}

struct Inner {
    issuer: String,
    audience: String,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    realm: Realm,
    client_roles_of: Option<String>,
    keys: Keys,
}

enum Keys {
    Static(Arc<Vec<Key>>),
    Remote(Box<RemoteJwks>),
}

impl fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        let mut d = f.debug_struct("JwtAuthenticator");
        d.field("issuer", &inner.issuer)
            .field("audience", &inner.audience)
            .field("algorithms", &inner.algorithms)
            .field("leeway", &inner.leeway)
            .field("realm", &inner.realm)
            .field("client_roles_of", &inner.client_roles_of);
        // Key material stays out of logs; how many keys and where from is enough to debug.
        match &inner.keys {
            Keys::Static(keys) => d.field("static_keys", &keys.len()),
            Keys::Remote(remote) => d.field("jwks_url", &remote.url.as_str()),
        };
        d.finish()
    }
}

/// Why a [`JwtAuthenticatorBuilder`] could not build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The issuer or the audience is empty.
    #[error("the issuer and the audience must not be empty")]
    EmptyIssuerOrAudience,
    /// No [`realm`](JwtAuthenticatorBuilder::realm) was given.
    #[error("the realm callers authenticate in is required")]
    MissingRealm,
    /// Neither a JWKS URL nor a static key was given.
    #[error("no keys: give a JWKS URL, a static key or a static JWKS")]
    NoKeys,
    /// Both a JWKS URL and static keys were given.
    #[error("give either a JWKS URL or static keys, not both")]
    ConflictingKeySources,
    /// The algorithm allow-list is empty.
    #[error("the algorithm allow-list is empty")]
    NoAlgorithms,
    /// A static key's type does not fit the algorithm given with it.
    #[error("a static key's type does not fit its algorithm {0:?}")]
    KeyAlgorithmMismatch(Algorithm),
    /// An HMAC algorithm is allowed but no HMAC static key was given to verify it with.
    #[error("HMAC algorithms are allowed but no HMAC static key was given")]
    HmacWithoutSecret,
    /// The default HTTP client could not be built.
    #[error("the HTTP client for the JWKS could not be built: {0}")]
    HttpClient(String),
}

/// Configures a [`JwtAuthenticator`]; see [`JwtAuthenticator::builder`].
#[must_use]
pub struct JwtAuthenticatorBuilder {
    issuer: String,
    audience: String,
    jwks_url: Option<Url>,
    static_keys: Vec<Result<Key, ConfigError>>,
    static_given: bool,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    realm: Option<Realm>,
    client_roles_of: Option<String>,
    http_client: Option<reqwest::Client>,
    refetch_interval: Duration,
    ttl: Duration,
}

impl fmt::Debug for JwtAuthenticatorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtAuthenticatorBuilder")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &self.algorithms)
            .field("jwks_url", &self.jwks_url.as_ref().map(Url::as_str))
            .field("static_keys", &self.static_keys.len())
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    /// Starts a builder for tokens issued by `issuer` (the exact `iss`) for `audience` (a
    /// value `aud` must contain).
    pub fn builder(
        issuer: impl Into<String>,
        audience: impl Into<String>,
    ) -> JwtAuthenticatorBuilder {
        JwtAuthenticatorBuilder {
            issuer: issuer.into(),
            audience: audience.into(),
            jwks_url: None,
            static_keys: Vec::new(),
            static_given: false,
            algorithms: vec![Algorithm::RS256, Algorithm::ES256, Algorithm::PS256],
            leeway: Duration::from_secs(30),
            realm: None,
            client_roles_of: None,
            http_client: None,
            refetch_interval: Duration::from_secs(60),
            ttl: Duration::from_secs(600),
        }
    }

    /// The caller named by `token`, or why not (logged at debug level, without the token).
    async fn verify(&self, token: &str) -> Result<Caller, Unauthenticated> {
        let result = self.verify_inner(token).await;
        if let Err(rejection) = &result {
            tracing::debug!(reason = ?rejection.reason, "caller token rejected");
        }
        result
    }

    async fn verify_inner(&self, token: &str) -> Result<Caller, Unauthenticated> {
        let inner = &*self.inner;
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(Unauthenticated::because(Reason::BadTokenSize));
        }
        // `alg: none` never gets past this: `jsonwebtoken` has no such algorithm.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| Unauthenticated::because(Reason::Malformed))?;
        if header.crit.is_some() {
            return Err(Unauthenticated::because(Reason::CriticalHeader));
        }
        let alg = header.alg;
        if !inner.algorithms.contains(&alg) {
            return Err(Unauthenticated::because(Reason::AlgorithmNotAllowed));
        }
        let kid = header.kid.as_deref();

        let key = match &inner.keys {
            Keys::Static(keys) => match lookup(keys, kid, alg) {
                Lookup::Found(key) => key.clone(),
                Lookup::Missing => return Err(missing_key(kid)),
                Lookup::Rejected(reason) => return Err(Unauthenticated::because(reason)),
            },
            Keys::Remote(remote) => {
                let (mut keys, mut generation, stale) = remote.snapshot();
                if stale {
                    // A failed refresh leaves the old keys in use until a fetch succeeds.
                    if let Some(fresh) = remote.refresh(generation, Trigger::Stale).await {
                        (keys, generation) = fresh;
                    }
                }
                match lookup(&keys, kid, alg) {
                    Lookup::Found(key) => key.clone(),
                    Lookup::Rejected(reason) => return Err(Unauthenticated::because(reason)),
                    Lookup::Missing => {
                        // Perhaps the IdP rotated its keys: one rate-limited re-fetch.
                        let Some((fresh, _)) =
                            remote.refresh(generation, Trigger::UnknownKid).await
                        else {
                            return Err(missing_key(kid));
                        };
                        match lookup(&fresh, kid, alg) {
                            Lookup::Found(key) => key.clone(),
                            Lookup::Missing => return Err(missing_key(kid)),
                            Lookup::Rejected(reason) => {
                                return Err(Unauthenticated::because(reason));
                            }
                        }
                    }
                }
            }
        };

        let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(alg))
            .map_err(|e| Unauthenticated::because(reason_of(e.kind())))?
            .claims;
        self.caller_of(claims)
    }

    /// The checks `jsonwebtoken` makes for us, for a token whose `alg` was already allowed
    /// and matched to a key.
    fn validation(&self, alg: Algorithm) -> Validation {
        let inner = &*self.inner;
        // One algorithm only: `jsonwebtoken` requires every listed algorithm to fit the key.
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&inner.issuer]);
        validation.set_audience(&[&inner.audience]);
        // Without these, `jsonwebtoken` skips the `iss`/`aud` checks of a token lacking them.
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.leeway = inner.leeway.as_secs();
        validation
    }

    fn caller_of(&self, claims: Claims) -> Result<Caller, Unauthenticated> {
        let inner = &*self.inner;
        let sub = claims
            .sub
            .ok_or(Unauthenticated::because(Reason::MissingClaim("sub")))?;
        let subject =
            Subject::new(sub).map_err(|_| Unauthenticated::because(Reason::InvalidSubject))?;
        let client_id = claims
            .azp
            .or(claims.client_id)
            .filter(|id| !id.is_empty())
            .ok_or(Unauthenticated::because(Reason::MissingClaim("azp")))?;

        let mut roles: BTreeSet<String> = claims
            .realm_access
            .map(|access| access.roles.into_iter().collect())
            .unwrap_or_default();
        if let Some(client) = &inner.client_roles_of
            && let Some(mut resource_access) = claims.resource_access
            && let Some(access) = resource_access.remove(client)
        {
            roles.extend(access.roles);
        }
        let scopes = claims
            .scope
            .as_deref()
            .map(Scopes::parse)
            .unwrap_or_default();

        let caller = roles
            .iter()
            .fold(
                Caller::new(inner.realm.clone(), subject, client_id),
                |caller, role| caller.with_role(role.as_str()),
            )
            // A Keycloak token carries exactly the roles the client's scope admits; said
            // explicitly because the core's `Caller::new` is to grant no client scope.
            .with_client_scope_roles(roles.clone())
            .with_scopes(scopes);
        Ok(caller)
    }
}

fn missing_key(kid: Option<&str>) -> Unauthenticated {
    Unauthenticated::because(match kid {
        Some(_) => Reason::UnknownKey,
        None => Reason::AmbiguousKey,
    })
}

fn reason_of(kind: &ErrorKind) -> Reason {
    match kind {
        ErrorKind::InvalidSignature => Reason::BadSignature,
        ErrorKind::ExpiredSignature => Reason::Expired,
        ErrorKind::ImmatureSignature => Reason::NotYetValid,
        ErrorKind::InvalidIssuer => Reason::WrongIssuer,
        ErrorKind::InvalidAudience => Reason::WrongAudience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Reason::AlgorithmNotAllowed,
        ErrorKind::MissingRequiredClaim(claim) => Reason::MissingClaim(match claim.as_str() {
            "exp" => "exp",
            "iss" => "iss",
            "aud" => "aud",
            "sub" => "sub",
            _ => "other",
        }),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidClaimFormat(_) => Reason::Malformed,
        _ => Reason::Invalid,
    }
}

/// The claims we read beyond those `jsonwebtoken` checks. Unknown claims are ignored.
#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    azp: Option<String>,
    client_id: Option<String>,
    scope: Option<String>,
    realm_access: Option<Access>,
    resource_access: Option<HashMap<String, Access>>,
}

#[derive(serde::Deserialize)]
struct Access {
    #[serde(default)]
    roles: Vec<String>,
}

#[async_trait]
impl CallerAuthenticator for JwtAuthenticator {
    async fn authenticate(&self, parts: &http::request::Parts) -> Result<Caller, Unauthenticated> {
        let token = bearer_token(parts).inspect_err(|rejection| {
            tracing::debug!(reason = ?rejection.reason, "caller rejected");
        })?;
        self.verify(token).await
    }

    async fn authenticate_token(&self, token: &str) -> Result<Caller, Unauthenticated> {
        self.verify(token).await
    }
}

impl JwtAuthenticatorBuilder {
    /// Fetches the verification keys from this JWKS URL (the issuer's `jwks_uri`), lazily
    /// and cached for [`jwks_ttl`](Self::jwks_ttl). Symmetric (`oct`) keys and keys not for
    /// signatures in it are ignored.
    pub fn jwks_url(mut self, url: Url) -> Self {
        self.jwks_url = Some(url);
        self
    }

    /// Adds a static key that verifies tokens signed with `alg` only. A token with a `kid`
    /// uses the key with that `kid` (so a key given without one never verifies it); a token
    /// without `kid` uses the only key fitting its `alg`, if there is exactly one.
    ///
    /// An HMAC key ([`DecodingKey::from_secret`]) is only used when an HS algorithm is also
    /// put in the allow-list with [`algorithms`](Self::algorithms).
    pub fn static_key(mut self, kid: Option<String>, key: DecodingKey, alg: Algorithm) -> Self {
        self.static_given = true;
        self.static_keys.push(if key.family() == alg.family() {
            Ok(Key {
                kid,
                family: key.family(),
                alg: Some(alg),
                key,
            })
        } else {
            Err(ConfigError::KeyAlgorithmMismatch(alg))
        });
        self
    }

    /// Adds the keys of a JWKS given by the host, as static keys. Keys not for signatures,
    /// or of a type `jsonwebtoken` cannot use, are skipped.
    pub fn static_jwks(mut self, jwks: JwkSet) -> Self {
        self.static_given = true;
        self.static_keys.extend(
            jwks.keys
                .iter()
                .filter_map(|jwk| Key::from_jwk(jwk, true))
                .map(Ok),
        );
        self
    }

    /// The algorithms a token may be signed with (default `RS256`, `ES256`, `PS256`). HS
    /// algorithms only work with an HMAC [`static_key`](Self::static_key).
    pub fn algorithms(mut self, algorithms: &[Algorithm]) -> Self {
        self.algorithms = algorithms.to_vec();
        self
    }

    /// How far `exp` and `nbf` may be off, for clock skew (default 30 s; whole seconds).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// The realm callers authenticate in (required).
    pub fn realm(mut self, realm: Realm) -> Self {
        self.realm = Some(realm);
        self
    }

    /// Also reads the client roles of `client_id` (`resource_access.{client_id}.roles`),
    /// e.g. the `broker` client's `read-token`.
    pub fn client_roles_of(mut self, client_id: impl Into<String>) -> Self {
        self.client_roles_of = Some(client_id.into());
        self
    }

    /// The HTTP client for fetching the JWKS (default: a new `reqwest::Client` that does not
    /// follow redirects). Each fetch has a 10 s time-out regardless.
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http_client = Some(client);
        self
    }

    /// The least time between two re-fetches of the JWKS for a `kid` it does not have, and
    /// after a failed fetch (default 60 s). Picks up key rotation without letting tokens
    /// with made-up `kid`s hammer the IdP.
    pub fn jwks_refetch_interval(mut self, interval: Duration) -> Self {
        self.refetch_interval = interval;
        self
    }

    /// How long fetched keys are used before being fetched again (default 10 min). If that
    /// fetch fails, the old keys stay in use.
    pub fn jwks_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The authenticator, or what is wrong with the configuration.
    pub fn build(self) -> Result<JwtAuthenticator, ConfigError> {
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err(ConfigError::EmptyIssuerOrAudience);
        }
        let realm = self.realm.ok_or(ConfigError::MissingRealm)?;
        if self.algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        let static_keys = self
            .static_keys
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let hmac_allowed = self
            .algorithms
            .iter()
            .any(|alg| alg.family() == AlgorithmFamily::Hmac);
        let keys = match (self.jwks_url, self.static_given) {
            (Some(_), true) => return Err(ConfigError::ConflictingKeySources),
            (None, false) => return Err(ConfigError::NoKeys),
            (Some(url), false) => {
                if hmac_allowed {
                    return Err(ConfigError::HmacWithoutSecret);
                }
                let client = match self.http_client {
                    Some(client) => client,
                    None => reqwest::Client::builder()
                        // The JWKS location is configuration; a redirect elsewhere is not.
                        .redirect(reqwest::redirect::Policy::none())
                        .build()
                        .map_err(|e| ConfigError::HttpClient(e.to_string()))?,
                };
                let remote = RemoteJwks::new(url, client, self.ttl, self.refetch_interval);
                Keys::Remote(Box::new(remote))
            }
            (None, true) => {
                if hmac_allowed
                    && !static_keys
                        .iter()
                        .any(|k| k.family == AlgorithmFamily::Hmac)
                {
                    return Err(ConfigError::HmacWithoutSecret);
                }
                Keys::Static(Arc::new(static_keys))
            }
        };
        Ok(JwtAuthenticator {
            inner: Arc::new(Inner {
                issuer: self.issuer,
                audience: self.audience,
                algorithms: self.algorithms,
                leeway: self.leeway,
                realm,
                client_roles_of: self.client_roles_of,
                keys,
            }),
        })
    }
}
