//! The Keycloak-shaped broker routes as an axum [`Router`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::json;
use tokenbroker::endpoints::{self, ExchangeRequest, LinkRequest};
use tokenbroker::{BrokerResponse, Callback, Caller, Error, TokenBroker};
use tower_sessions::cookie::SameSite;
use tower_sessions::{Expiry, Session, SessionManagerLayer, SessionStore};

use crate::Answer;
use crate::auth::CallerAuthenticator;
use crate::extract::Authenticator;
use crate::pending::{self, StoredLogin};

/// The session cookie's default name; distinct from the host's own session cookie.
pub const DEFAULT_COOKIE_NAME: &str = "tokenbroker.sid";

/// How long a session with a login in progress lives without activity: a little longer than
/// the broker's default login window (10 minutes), which the broker enforces anyway.
const SESSION_IDLE: time::Duration = time::Duration::minutes(15);

/// Longest `return_to` accepted.
const MAX_RETURN_TO: usize = 2048;

/// Starts building the broker's routes. See [`BrokerRouterBuilder`].
pub fn broker_router(
    broker: TokenBroker,
    authenticator: impl CallerAuthenticator,
) -> BrokerRouterBuilder {
    BrokerRouterBuilder {
        broker,
        authenticator: Arc::new(authenticator),
        cookie_name: DEFAULT_COOKIE_NAME.to_owned(),
        secure_cookie: true,
    }
}

/// Builds the [`Router`] that serves the broker's routes:
///
/// | route | what it does |
/// |---|---|
/// | `GET /realms/{realm}/broker/{alias}/login` | starts linking `alias` for the caller: `302` to the provider |
/// | `POST /realms/{realm}/broker/{alias}/login` | the same for a page holding a bearer token: `200 {"authorization_url"}`, to navigate to |
/// | `GET /realms/{realm}/broker/{alias}/endpoint` | the provider's redirect back: completes the link (the provider's redirect URI) |
/// | `GET /realms/{realm}/broker/{alias}/token` | the caller's tokens in Keycloak's format |
/// | `POST /realms/{realm}/protocol/openid-connect/token` | RFC 8693 token exchange (`subject_token` authenticated) |
/// | `GET /realms/{realm}/broker/{alias}/link` | the link's status and upstream account |
/// | `DELETE /realms/{realm}/broker/{alias}/link` | unlinks: revokes upstream, deletes the tokens |
///
/// The login routes take `scope`, `login_hint` and `return_to` (a path on this site to send
/// the browser to when the link is done, with `?error=<code>` appended on failure) in the
/// query. Every route but the redirect back authenticates the caller with the
/// [`CallerAuthenticator`]; the redirect back is tied to the browser by the session cookie
/// and the login's single-use state.
///
/// Pending logins live in the session store given to [`build`](Self::build) (any
/// `tower-sessions` store: several instances sharing one complete each other's logins). The
/// cookie is `HttpOnly`, `SameSite=Lax` (it must come back on the provider's cross-site
/// redirect, a top-level `GET`) and `Secure` unless turned off for plain-HTTP loopback.
///
/// ```
/// use tokenbroker::{MemoryStore, TokenBroker};
/// use tokenbroker_axum::{JwtAuthenticator, broker_router};
/// use tower_sessions::MemoryStore as SessionMemory;
///
/// # fn demo(broker: TokenBroker, auth: JwtAuthenticator) {
/// let app: axum::Router = axum::Router::new()
///     .nest("/auth", broker_router(broker, auth).build(SessionMemory::default()));
/// # }
/// ```
pub struct BrokerRouterBuilder {
    broker: TokenBroker,
    authenticator: Arc<dyn CallerAuthenticator>,
    cookie_name: String,
    secure_cookie: bool,
}

impl std::fmt::Debug for BrokerRouterBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerRouterBuilder")
            .field("broker", &self.broker)
            .field("cookie_name", &self.cookie_name)
            .field("secure_cookie", &self.secure_cookie)
            .finish_non_exhaustive()
    }
}

impl BrokerRouterBuilder {
    /// The session cookie's name (default [`DEFAULT_COOKIE_NAME`]).
    pub fn cookie_name(mut self, name: impl Into<String>) -> Self {
        self.cookie_name = name.into();
        self
    }

    /// Whether the session cookie is `Secure` (default `true`). Turn it off only for a plain
    /// HTTP server on loopback (development, tests): a browser would not send a `Secure`
    /// cookie back over plain HTTP elsewhere, and the cookie must not travel unencrypted.
    pub fn secure_cookie(mut self, secure: bool) -> Self {
        self.secure_cookie = secure;
        self
    }

    /// The router, with its session layer on the store the host passes in.
    pub fn build<St: SessionStore + Clone>(self, session_store: St) -> Router {
        let state = AdapterState {
            broker: self.broker,
            authenticator: self.authenticator.clone(),
        };
        let sessions = SessionManagerLayer::new(session_store)
            .with_name(self.cookie_name)
            .with_same_site(SameSite::Lax)
            .with_http_only(true)
            .with_secure(self.secure_cookie)
            .with_path("/")
            .with_expiry(Expiry::OnInactivity(SESSION_IDLE));
        let with_session = Router::new()
            .route(
                "/realms/{realm}/broker/{alias}/login",
                get(login_redirect).post(login_json),
            )
            .route("/realms/{realm}/broker/{alias}/endpoint", get(callback))
            .layer(sessions);
        Router::new()
            .route("/realms/{realm}/broker/{alias}/token", get(read_tokens))
            .route(
                "/realms/{realm}/broker/{alias}/link",
                get(link_status).delete(unlink),
            )
            .route(
                "/realms/{realm}/protocol/openid-connect/token",
                post(token_exchange),
            )
            .merge(with_session)
            .layer(axum::Extension(Authenticator(self.authenticator)))
            .with_state(state)
    }
}

#[derive(Clone)]
struct AdapterState {
    broker: TokenBroker,
    authenticator: Arc<dyn CallerAuthenticator>,
}

impl AdapterState {
    /// The caller, or `None` (the handlers answer the uniform `401`).
    async fn caller(&self, parts: &Parts) -> Option<Caller> {
        match self.authenticator.authenticate(parts).await {
            Ok(caller) => Some(caller),
            Err(e) => {
                tracing::debug!(target: "tokenbroker_axum", reason = ?e, "caller not authenticated");
                None
            }
        }
    }
}

type Shared = State<AdapterState>;

async fn read_tokens(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    parts: Parts,
) -> Answer {
    let caller = s.caller(&parts).await;
    Answer(endpoints::read_tokens(&s.broker, caller.as_ref(), &realm, &alias).await)
}

async fn link_status(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    parts: Parts,
) -> Answer {
    let caller = s.caller(&parts).await;
    Answer(endpoints::link_status(&s.broker, caller.as_ref(), &realm, &alias).await)
}

async fn unlink(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    parts: Parts,
) -> Answer {
    let caller = s.caller(&parts).await;
    Answer(endpoints::unlink(&s.broker, caller.as_ref(), &realm, &alias).await)
}

async fn token_exchange(
    State(s): Shared,
    Path(realm): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    if !is_form(&headers) {
        return Answer(invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let request = match ExchangeRequest::from_form(&body) {
        Ok(request) => request,
        Err(bad_request) => return Answer(bad_request),
    };
    let Some(subject_token) = request.subject_token() else {
        return Answer(invalid_request("subject_token is required"));
    };
    let caller = match s
        .authenticator
        .authenticate_token(subject_token.expose_secret())
        .await
    {
        Ok(caller) => Some(caller),
        Err(e) => {
            tracing::debug!(target: "tokenbroker_axum", reason = ?e, "subject token not authenticated");
            None
        }
    };
    Answer(endpoints::token_exchange(&s.broker, caller.as_ref(), &realm, &request).await)
}

/// `GET .../login`: `302` to the provider.
async fn login_redirect(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    session: Session,
    parts: Parts,
) -> Response {
    match begin(&s, &realm, &alias, query.as_deref(), &session, &parts).await {
        Ok(url) => redirect(StatusCode::FOUND, &url),
        Err(answer) => answer.into_response(),
    }
}

/// `POST .../login`: the authorization URL as JSON, for a page that holds a bearer token
/// (a browser navigation cannot carry one).
async fn login_json(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    session: Session,
    parts: Parts,
) -> Answer {
    match begin(&s, &realm, &alias, query.as_deref(), &session, &parts).await {
        Ok(url) => Answer(BrokerResponse::json_body(
            StatusCode::OK,
            &json!({ "authorization_url": url }),
        )),
        Err(answer) => answer,
    }
}

async fn begin(
    s: &AdapterState,
    realm: &str,
    alias: &str,
    query: Option<&str>,
    session: &Session,
    parts: &Parts,
) -> Result<String, Answer> {
    let caller = s.caller(parts).await;
    let query = query.unwrap_or("");
    let return_to = return_to_of(query).map_err(|ReturnToRefused| {
        Answer(invalid_request(
            "return_to must be a path on this site, such as /settings",
        ))
    })?;
    let request = LinkRequest::from_query(query);
    let start = endpoints::begin_link(&s.broker, caller.as_ref(), realm, alias, &request)
        .await
        .map_err(Answer)?;
    let url = start.authorization_url.to_string();
    pending::remember(
        session,
        StoredLogin {
            pending: start.pending,
            return_to,
        },
    )
    .await
    .map_err(|_| Answer(session_unavailable()))?;
    Ok(url)
}

/// `GET .../endpoint`: the provider's redirect back.
async fn callback(
    State(s): Shared,
    Path((realm, alias)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    session: Session,
) -> Response {
    let callback = Callback::from_query(query.as_deref().unwrap_or(""));
    let Some(state) = callback.state.as_ref() else {
        return Answer(BrokerResponse::from_error(&Error::LoginRejected {
            reason: "callback has no state",
        }))
        .into_response();
    };
    let login = match pending::take(&session, state.expose_secret()).await {
        Ok(Some(login)) => login,
        // No login with this state in this browser's session: another browser's callback, a
        // replay of one already completed, or a session that expired.
        Ok(None) => {
            return Answer(BrokerResponse::from_error(&Error::LoginRejected {
                reason: "no login in progress in this browser matches the state",
            }))
            .into_response();
        }
        Err(_) => return Answer(session_unavailable()).into_response(),
    };
    let return_to = login.return_to.clone();
    let result =
        endpoints::complete_link(&s.broker, login.pending, &realm, &alias, &callback).await;
    match (result, return_to) {
        (Ok(_), Some(to)) => redirect(StatusCode::SEE_OTHER, &to),
        (Ok(outcome), None) => Answer(endpoints::link_body(&outcome)).into_response(),
        (Err(answer), Some(to)) => {
            let code = answer
                .json()
                .and_then(|body| body["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "server_error".to_owned());
            let sep = if to.contains('?') { '&' } else { '?' };
            let to = format!(
                "{to}{sep}error={}",
                url::form_urlencoded::byte_serialize(code.as_bytes()).collect::<String>()
            );
            redirect(StatusCode::SEE_OTHER, &to)
        }
        (Err(answer), None) => Answer(answer).into_response(),
    }
}

/// A redirect that no cache keeps (the provider's URL carries the state and challenge).
fn redirect(status: StatusCode, location: &str) -> Response {
    let mut response = status.into_response();
    let headers = response.headers_mut();
    match HeaderValue::from_str(location) {
        Ok(value) => {
            headers.insert(header::LOCATION, value);
        }
        Err(_) => {
            return Answer(BrokerResponse::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error",
            ))
            .into_response();
        }
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// `return_to` from the query: a path on this site, never another origin (an open redirect
/// would hand the browser, after a real login, to an attacker's page).
fn return_to_of(query: &str) -> Result<Option<String>, ReturnToRefused> {
    let Some(to) = url::form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == "return_to")
        .map(|(_, value)| value.into_owned())
    else {
        return Ok(None);
    };
    if is_local_path(&to) {
        Ok(Some(to))
    } else {
        Err(ReturnToRefused)
    }
}

/// `return_to` names another site, or is no path at all.
struct ReturnToRefused;

/// A path-absolute URL reference with no authority: `/x`, not `//host`, `/\host`, `x:`.
fn is_local_path(to: &str) -> bool {
    to.len() <= MAX_RETURN_TO
        && to.starts_with('/')
        && !to.starts_with("//")
        && !to.starts_with("/\\")
        && !to.chars().any(|c| c.is_control() || c == '\\')
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

fn invalid_request(description: &str) -> BrokerResponse {
    BrokerResponse::error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn session_unavailable() -> BrokerResponse {
    let mut response = BrokerResponse::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "the session store is unavailable; try again shortly",
    );
    response
        .headers
        .insert(header::RETRY_AFTER, HeaderValue::from(1));
    response
}

#[cfg(test)]
mod tests {
    use super::is_local_path;

    #[test]
    fn return_to_is_a_path_on_this_site() {
        for ok in ["/", "/settings", "/a/b?c=d#e"] {
            assert!(is_local_path(ok), "{ok}");
        }
        for bad in [
            "",
            "settings",
            "//evil.example",
            "/\\evil.example",
            "https://evil.example/",
            "javascript:alert(1)",
            "/a\r\nSet-Cookie: x",
            "/a\\b",
        ] {
            assert!(!is_local_path(bad), "{bad}");
        }
    }
}
