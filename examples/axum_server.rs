//! Serving Keycloak's broker endpoints with axum: a thin adapter over the broker's
//! framework-agnostic handlers.
//!
//! ```sh
//! cargo run --example axum_server          # against an in-process fake IdP, on 127.0.0.1:3000
//! ```
//!
//! | route | what it does |
//! |---|---|
//! | `GET /realms/{realm}/broker/{alias}/login` | starts linking `alias` for the caller: `302` to the provider |
//! | `GET /realms/{realm}/broker/{alias}/endpoint` | the provider's redirect back: completes the link |
//! | `GET /realms/{realm}/broker/{alias}/token` | the caller's stored tokens, Keycloak's format ([`TokenBroker::token_endpoint`]) |
//! | `POST /realms/{realm}/protocol/openid-connect/token` | RFC 8693 token exchange ([`TokenBroker::token_exchange`]) |
//! | `DELETE /realms/{realm}/broker/{alias}/link` | unlinks: revokes upstream, deletes the tokens |
//!
//! **Callers** authenticate with `Authorization: Bearer <JWT>` (for the token exchange: the
//! `subject_token`), a JWT signed with HS256 under `TB_CALLER_JWT_KEY` (a built-in dev key
//! when unset; never use it elsewhere). Claims: `sub` (the user), `azp` (the client), `exp`
//! (required), `nbf`, `realm_access.roles` and `resource_access.broker.roles` (Keycloak's
//! shape; reading needs `read-token`), `scope`. A real deployment verifies its IdP's tokens
//! (RS256 against a JWKS) instead; only [`CallerAuth`] changes.
//!
//! **Configuration** (environment):
//!
//! | variable | default | |
//! |---|---|---|
//! | `TB_LISTEN` | `127.0.0.1:3000` | listen address |
//! | `TB_REALM` | `demo` | the realm whose users the caller key authenticates |
//! | `TB_CALLER_JWT_KEY` | dev key | HS256 key of caller JWTs |
//! | `TB_OIDC_ISSUER` | (fake IdP) | an OpenID Connect issuer to discover; without it a `FakeIdp` runs in-process |
//! | `TB_CLIENT_ID`, `TB_CLIENT_SECRET` | | the client registered at that issuer |
//! | `TB_REDIRECT_URI` | `http://{listen}/realms/{realm}/broker/{alias}/endpoint` | the redirect URI registered there |
//! | `TB_PROVIDER_ALIAS` | `fake`, or `oidc` with an issuer | the `{alias}` in the routes |
//! | `TB_SCOPES` | | scopes to ask for besides `openid` (e.g. `offline_access email`) |
//!
//! **Example shortcuts:** tokens live in a `MemoryStore` and logins in progress in an
//! in-memory map keyed by a random, `HttpOnly` cookie, so both are gone on restart and not
//! shared between instances (use `SqliteStore`/`PostgresStore` and your session store). One
//! login at a time per browser: a second one replaces the first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;
use tokenbroker::http::{ReqwestClient, SharedHttpClient};
use tokenbroker::provider::OidcConfig;
use tokenbroker::testing::FakeIdp;
use tokenbroker::{
    ACCESS_TOKEN_TYPE, BrokerResponse, Callback, Caller, Error, LoginOptions, ProviderId,
    ProviderPolicy, Realm, RevocationStatus, Scopes, Secret, Subject, TokenBroker, TokenKey,
};
use url::Url;

/// The HS256 key used when `TB_CALLER_JWT_KEY` is not set. Public: for local runs only.
pub const DEV_JWT_KEY: &str = "tokenbroker-axum-example-dev-key-do-not-deploy";
/// The cookie that ties the browser to its login in progress.
pub const LOGIN_COOKIE: &str = "tb_login";
/// How long a login may take (the broker's default login window).
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Logins in progress kept at most (an unauthenticated flood cannot reach this: `/login`
/// needs a caller).
const MAX_PENDING_LOGINS: usize = 10_000;

// ---------------------------------------------------------------------------------------------
// The router

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The broker.
    pub broker: TokenBroker,
    /// Authenticates callers.
    pub auth: CallerAuth,
    /// Logins in progress, by session cookie.
    pub logins: LoginSessions,
    /// Whether the session cookie gets `Secure` (when the redirect URI is `https`).
    pub secure_cookies: bool,
}

impl AppState {
    /// State for `broker`, with callers authenticated by `auth`.
    pub fn new(broker: TokenBroker, auth: CallerAuth) -> Self {
        AppState {
            broker,
            auth,
            logins: LoginSessions::default(),
            secure_cookies: false,
        }
    }
}

/// The app: every route of the example.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/realms/{realm}/broker/{alias}/login", get(login))
        .route("/realms/{realm}/broker/{alias}/endpoint", get(callback))
        .route("/realms/{realm}/broker/{alias}/token", get(token))
        .route("/realms/{realm}/broker/{alias}/link", delete(unlink))
        .route(
            "/realms/{realm}/protocol/openid-connect/token",
            post(token_exchange),
        )
        .with_state(Arc::new(state))
}

type Shared = State<Arc<AppState>>;

/// `GET /realms/{realm}/broker/{alias}/login`: a fresh state, PKCE verifier and nonce, kept
/// server-side under a random cookie; `302` to the provider.
async fn login(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(caller) = s.auth.authenticate(&headers) else {
        return unauthenticated();
    };
    let key = match own_key(&caller, &realm, &alias) {
        Ok(key) => key,
        Err(response) => return response,
    };
    let start = match s.broker.begin_login(&key, LoginOptions::default()).await {
        Ok(start) => start,
        Err(e) => return send(BrokerResponse::from_error(&e)),
    };
    let Some(session) = s.logins.insert(start.pending) else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "too many logins in progress; try again later",
        );
    };
    let secure = if s.secure_cookies { "; Secure" } else { "" };
    let cookie = format!(
        "{LOGIN_COOKIE}={session}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        LOGIN_TTL.as_secs()
    );
    // A URL and a cookie of base64url characters are valid header values; checked anyway.
    let (Ok(location), Ok(cookie)) = (
        HeaderValue::from_str(start.authorization_url.as_str()),
        HeaderValue::from_str(&cookie),
    ) else {
        s.logins.take(&session);
        return send(BrokerResponse::from_error(&Error::Internal(
            "unusable authorization URL",
        )));
    };
    let mut response = StatusCode::FOUND.into_response();
    let h = response.headers_mut();
    h.insert(header::LOCATION, location);
    h.insert(header::SET_COOKIE, cookie);
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /realms/{realm}/broker/{alias}/endpoint`: the provider's redirect back, with
/// `?code=…&state=…` (or `?error=…`). The session cookie finds the login in progress, once.
async fn callback(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let pending = cookie(&headers, LOGIN_COOKIE).and_then(|id| s.logins.take(id));
    let mut response = match pending {
        None => json_error(
            StatusCode::BAD_REQUEST,
            "invalid_state",
            "no login is in progress in this browser; start it again",
        ),
        Some(p) if p.key().realm.as_str() != realm || p.key().provider.as_str() != alias => {
            json_error(
                StatusCode::BAD_REQUEST,
                "invalid_state",
                "the callback does not belong to the login in progress",
            )
        }
        Some(pending) => {
            let callback = Callback::from_query(query.as_deref().unwrap_or(""));
            match s.broker.complete_login(pending, &callback).await {
                // `outcome.tokens` holds the tokens: they stay in the store.
                Ok(outcome) => json_response(
                    StatusCode::OK,
                    &json!({
                        "linked": true,
                        "realm": outcome.key.realm.as_str(),
                        "provider": outcome.key.provider.as_str(),
                        "subject": outcome.key.subject.as_str(),
                        "first_link": outcome.first_link,
                    }),
                ),
                Err(e) => login_error(&e),
            }
        }
    };
    let secure = if s.secure_cookies { "; Secure" } else { "" };
    let clear = format!("{LOGIN_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}");
    if let Ok(clear) = HeaderValue::from_str(&clear) {
        response.headers_mut().insert(header::SET_COOKIE, clear);
    }
    response
}

/// `GET /realms/{realm}/broker/{alias}/token`: the broker's answer, sent as it is.
async fn token(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let caller = s.auth.authenticate(&headers);
    send(tokenbroker::endpoints::read_tokens(&s.broker, caller.as_ref(), &realm, &alias).await)
}

/// `POST /realms/{realm}/protocol/openid-connect/token` with the token-exchange grant. The
/// caller is the form's `subject_token`, verified like a bearer token; the client is its
/// `azp` (this example does not authenticate clients separately).
async fn token_exchange(
    State(s): Shared,
    Path(realm): Path<String>,
    headers: HeaderMap,
    form: Bytes,
) -> Response {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        );
    }
    let param = |name: &str| {
        url::form_urlencoded::parse(&form)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.into_owned())
    };
    if let Some(kind) = param("subject_token_type")
        && kind != ACCESS_TOKEN_TYPE
        && kind != "urn:ietf:params:oauth:token-type:jwt"
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "subject_token must be an access token",
        );
    }
    let caller = param("subject_token").and_then(|t| s.auth.verify(&t));
    match tokenbroker::endpoints::ExchangeRequest::from_form(&form) {
        Ok(request) => send(
            tokenbroker::endpoints::token_exchange(&s.broker, caller.as_ref(), &realm, &request)
                .await,
        ),
        Err(bad_request) => send(bad_request),
    }
}

/// `DELETE /realms/{realm}/broker/{alias}/link`: the caller unlinks its own account.
async fn unlink(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(caller) = s.auth.authenticate(&headers) else {
        return unauthenticated();
    };
    let key = match own_key(&caller, &realm, &alias) {
        Ok(key) => key,
        Err(response) => return response,
    };
    match s.broker.unlink(&key).await {
        Ok(outcome) => {
            // `Failed` carries the provider's reason: logged by the broker, not sent.
            let revocation = match outcome.revocation {
                RevocationStatus::Revoked => "revoked",
                RevocationStatus::NotSupported => "not_supported",
                RevocationStatus::NothingToRevoke => "nothing_to_revoke",
                RevocationStatus::Failed(_) => "failed",
                _ => "unknown",
            };
            json_response(
                StatusCode::OK,
                &json!({ "deleted": outcome.deleted, "revocation": revocation }),
            )
        }
        Err(e) => send(BrokerResponse::from_error(&e)),
    }
}

/// The caller's own link in `realm` (validated like the broker does: 400 for a malformed
/// identifier, then 403 for another realm).
#[expect(
    clippy::result_large_err,
    reason = "the error is the ready answer; this runs once per request"
)]
fn own_key(caller: &Caller, realm: &str, alias: &str) -> Result<TokenKey, Response> {
    let (realm, provider) = match (Realm::new(realm), ProviderId::new(alias)) {
        (Ok(realm), Ok(provider)) => (realm, provider),
        (Err(e), _) | (_, Err(e)) => {
            return Err(send(BrokerResponse::from_error(&Error::InvalidId(e))));
        }
    };
    if realm != caller.realm {
        return Err(send(BrokerResponse::from_error(&Error::Forbidden)));
    }
    Ok(TokenKey::new(realm, caller.subject.clone(), provider))
}

/// Login failures, which `BrokerResponse::from_error` does not cover (it answers them 500).
fn login_error(e: &Error) -> Response {
    match e {
        Error::LoginRejected { .. } => json_error(
            StatusCode::BAD_REQUEST,
            "invalid_state",
            "the login could not be completed; start it again",
        ),
        Error::AuthorizationDenied { .. } => json_error(
            StatusCode::BAD_REQUEST,
            "access_denied",
            "the provider did not authorize the link",
        ),
        e => send(BrokerResponse::from_error(e)),
    }
}

/// A `BrokerResponse` as an axum response: status, headers and body unchanged.
pub fn send(response: BrokerResponse) -> Response {
    response.into_http().map(Body::from).into_response()
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn json_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({ "error": error, "error_description": description }),
    )
}

/// The same `401` as the broker's handlers give (no detail on what was wrong).
fn unauthenticated() -> Response {
    let mut response = json_error(
        StatusCode::UNAUTHORIZED,
        "invalid_token",
        "a valid bearer token is required",
    );
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// The value of cookie `name`, if the request has it.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

// ---------------------------------------------------------------------------------------------
// Logins in progress

/// Logins in progress by session id, in memory (an example's session store).
#[derive(Default)]
pub struct LoginSessions {
    map: Mutex<HashMap<String, (tokenbroker::PendingLogin, Instant)>>,
}

impl std::fmt::Debug for LoginSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("LoginSessions")
            .field("in_progress", &n)
            .finish()
    }
}

impl LoginSessions {
    /// Keeps `pending` under a new random id; `None` when too many logins are in progress.
    pub fn insert(&self, pending: tokenbroker::PendingLogin) -> Option<String> {
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).ok()?;
        let id = URL_SAFE_NO_PAD.encode(id);
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, (_, at)| at.elapsed() < LOGIN_TTL);
        if map.len() >= MAX_PENDING_LOGINS {
            return None;
        }
        map.insert(id.clone(), (pending, Instant::now()));
        Some(id)
    }

    /// Removes and returns the login under `id` (each is used once).
    pub fn take(&self, id: &str) -> Option<tokenbroker::PendingLogin> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(id)
            .filter(|(_, at)| at.elapsed() < LOGIN_TTL)
            .map(|(p, _)| p)
    }
}

// ---------------------------------------------------------------------------------------------
// Caller authentication: HS256 JWTs in Keycloak's claim shape

type HmacSha256 = Hmac<Sha256>;

/// Verifies callers' HS256 JWTs and turns their claims into a [`Caller`] of one realm.
pub struct CallerAuth {
    key: Vec<u8>,
    realm: Realm,
    leeway: Duration,
}

impl std::fmt::Debug for CallerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerAuth")
            .field("key", &"[redacted]")
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    azp: String,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    realm_access: Roles,
    #[serde(default)]
    resource_access: HashMap<String, Roles>,
}

#[derive(Deserialize, Default)]
struct Roles {
    #[serde(default)]
    roles: Vec<String>,
}

impl CallerAuth {
    /// Callers of `realm`, with JWTs signed under `key`; 30 s of clock leeway.
    pub fn new(key: impl Into<Vec<u8>>, realm: Realm) -> Self {
        CallerAuth {
            key: key.into(),
            realm,
            leeway: Duration::from_secs(30),
        }
    }

    /// The caller of a request with `Authorization: Bearer <JWT>`, if the JWT verifies.
    pub fn authenticate(&self, headers: &HeaderMap) -> Option<Caller> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.verify(token.trim())
    }

    /// The caller a JWT stands for, if its signature, `alg` (HS256 only), `exp` and `nbf`
    /// check out. Why it failed is deliberately not said.
    pub fn verify(&self, jwt: &str) -> Option<Caller> {
        if jwt.len() > 16 * 1024 {
            return None;
        }
        let mut parts = jwt.split('.');
        let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let head: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
        // Only the algorithm we hold a key for: no `none`, no RS256/HS256 confusion, and no
        // critical extensions we would not understand (RFC 7515 §4.1.11).
        if head.get("alg")?.as_str()? != "HS256" || head.get("crit").is_some() {
            return None;
        }
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(signature).ok()?)
            .ok()?; // constant time
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        let now = unix_now();
        let leeway = self.leeway.as_secs();
        if claims.exp.saturating_add(leeway) <= now
            || claims
                .nbf
                .is_some_and(|nbf| nbf > now.saturating_add(leeway))
        {
            return None;
        }
        let subject = Subject::new(&claims.sub).ok()?;
        let broker_roles = claims.resource_access.get("broker").map(|r| &r.roles);
        let roles = claims
            .realm_access
            .roles
            .iter()
            .chain(broker_roles.into_iter().flatten());
        // Keycloak puts only the roles the client's scope admits in the token, so the token's
        // roles are the effective ones: full client scope from the broker's point of view.
        let caller = roles.fold(
            Caller::new(self.realm.clone(), subject, claims.azp).with_full_client_scope(),
            |caller, role| caller.with_role(role.clone()),
        );
        Some(caller.with_scopes(Scopes::parse(&claims.scope)))
    }
}

/// Signs `claims` as an HS256 JWT (dev tokens and tests).
pub fn mint_hs256(key: &[u8], claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("{header}.{payload}").as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{signature}")
}

/// Claims of a caller token for `user` in Keycloak's shape, with `read-token`, valid for
/// `ttl`.
pub fn dev_claims(user: &str, client: &str, ttl: Duration) -> Value {
    let now = unix_now();
    json!({
        "sub": user,
        "azp": client,
        "iat": now,
        "exp": now + ttl.as_secs(),
        "scope": "openid",
        "resource_access": { "broker": { "roles": ["read-token"] } },
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// Wiring

/// `http://{addr}/realms/{realm}/broker/{alias}/endpoint`, where the provider sends the browser back.
pub fn callback_url(addr: SocketAddr, realm: &Realm, alias: &ProviderId) -> Url {
    let mut url = Url::parse(&format!("http://{addr}/")).expect("a socket address is a host");
    url.path_segments_mut()
        .expect("http URLs have paths")
        .clear()
        .extend([
            "realms",
            realm.as_str(),
            "broker",
            alias.as_str(),
            "endpoint",
        ]);
    url
}

/// A broker with one OpenID Connect provider, configured from its discovery document.
pub async fn oidc_broker(
    alias: ProviderId,
    issuer: &Url,
    client_id: &str,
    client_secret: Option<Secret>,
    redirect_uri: Url,
    extra_scopes: &Scopes,
) -> Result<TokenBroker, Box<dyn std::error::Error>> {
    let http: SharedHttpClient = Arc::new(ReqwestClient::new()?);
    let mut config = OidcConfig::discover(
        alias,
        issuer,
        client_id,
        client_secret,
        redirect_uri,
        &*http,
    )
    .await?;
    config.oauth2.scopes = config.oauth2.scopes.union(extra_scopes);
    // A MemoryStore by default; `.with_store(...)` for SqliteStore / PostgresStore.
    Ok(TokenBroker::builder()
        .with_oidc_provider(config, ProviderPolicy::default())
        .with_http_client(http)
        .build()?)
}

/// A broker on an in-process fake IdP (started here; it stops when dropped).
pub async fn fake_idp_broker(
    alias: ProviderId,
    redirect_uri: Url,
) -> Result<(FakeIdp, TokenBroker), Box<dyn std::error::Error>> {
    let idp = FakeIdp::start_default().await?;
    let broker = oidc_broker(
        alias,
        &idp.issuer().parse()?,
        idp.client_id(),
        Some(Secret::new(idp.client_secret())),
        redirect_uri,
        &Scopes::new(),
    )
    .await?;
    Ok((idp, broker))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let listener =
        tokio::net::TcpListener::bind(env("TB_LISTEN").as_deref().unwrap_or("127.0.0.1:3000"))
            .await?;
    let addr = listener.local_addr()?;
    let realm = Realm::new(env("TB_REALM").as_deref().unwrap_or("demo"))?;
    let issuer = env("TB_OIDC_ISSUER");
    let default_alias = if issuer.is_some() { "oidc" } else { "fake" };
    let alias = ProviderId::new(env("TB_PROVIDER_ALIAS").as_deref().unwrap_or(default_alias))?;
    let redirect_uri = match env("TB_REDIRECT_URI") {
        Some(uri) => uri.parse()?,
        None => callback_url(addr, &realm, &alias),
    };
    let secure_cookies = redirect_uri.scheme() == "https";

    // Kept alive until the end of `main`: the fake IdP stops when dropped.
    let mut _fake_idp = None;
    let broker = match issuer {
        Some(issuer) => {
            let client_id = env("TB_CLIENT_ID").ok_or("TB_OIDC_ISSUER needs TB_CLIENT_ID")?;
            let scopes = Scopes::parse(&env("TB_SCOPES").unwrap_or_default());
            println!("provider {alias}: {issuer} (redirect URI to register: {redirect_uri})");
            oidc_broker(
                alias.clone(),
                &issuer.parse()?,
                &client_id,
                env("TB_CLIENT_SECRET").map(Secret::new),
                redirect_uri,
                &scopes,
            )
            .await?
        }
        None => {
            let (idp, broker) = fake_idp_broker(alias.clone(), redirect_uri).await?;
            println!(
                "fake IdP: {} (signs users in without a page; `login_hint` picks the user, alice by default)",
                idp.base_url()
            );
            _fake_idp = Some(idp);
            broker
        }
    };

    let key = env("TB_CALLER_JWT_KEY");
    if key.is_none() {
        let token = mint_hs256(
            DEV_JWT_KEY.as_bytes(),
            &dev_claims("alice", "example-client", Duration::from_secs(3600)),
        );
        println!("dev caller token for alice (1 h, dev key): {token}");
    }
    let auth = CallerAuth::new(key.unwrap_or_else(|| DEV_JWT_KEY.to_owned()), realm.clone());
    let mut state = AppState::new(broker, auth);
    state.secure_cookies = secure_cookies;

    println!("listening on http://{addr}/realms/{realm}/broker/{alias}/{{login,token,link}}");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
