//! A token-exchange front door (RFC 8693 shape), for clients written against Keycloak's
//! internal-to-external exchange.

use std::collections::HashMap;
use std::fmt;

use http::StatusCode;
use serde_json::{Map, Value, json};

use super::{BrokerResponse, key_of};
use crate::access::Caller;
use crate::broker::TokenBroker;
use crate::ids::Scopes;
use crate::secret::Secret;

/// The RFC 8693 grant type.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The RFC 8693 token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// The RFC 8693 token type of a JWT (a subject token that is a JWT access token).
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// A parsed token-exchange request (`POST .../protocol/openid-connect/token` with
/// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`).
///
/// Parse it first, authenticate [`subject_token`](Self::subject_token) (the host's own token
/// for the user) into a [`Caller`], then answer with [`token_exchange`].
///
/// ```
/// use tokenbroker::endpoints::ExchangeRequest;
///
/// let form = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
///              &subject_token=eyJ...&requested_issuer=google";
/// let request = ExchangeRequest::from_form(form).expect("a valid request");
/// assert_eq!(request.requested_issuer(), "google");
/// assert!(format!("{request:?}").contains("[redacted]"));
/// ```
#[derive(Clone)]
pub struct ExchangeRequest {
    requested_issuer: String,
    subject_token: Option<Secret>,
    scope: Option<String>,
}

impl fmt::Debug for ExchangeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExchangeRequest")
            .field("requested_issuer", &self.requested_issuer)
            .field("subject_token", &self.subject_token)
            .field("scope", &self.scope)
            .finish()
    }
}

impl ExchangeRequest {
    /// Parses the request's `application/x-www-form-urlencoded` body.
    ///
    /// # Errors
    /// The `400` to send: a repeated parameter, another grant type
    /// (`unsupported_grant_type`), a `requested_token_type` other than an access token, or no
    /// `requested_issuer` (the provider alias).
    pub fn from_form(form: &[u8]) -> Result<Self, BrokerResponse> {
        let mut params = HashMap::new();
        for (name, value) in url::form_urlencoded::parse(form) {
            if params
                .insert(name.clone().into_owned(), value.into_owned())
                .is_some()
            {
                return Err(invalid_request(&format!("parameter {name} is repeated")));
            }
        }
        if params.get("grant_type").map(String::as_str) != Some(TOKEN_EXCHANGE_GRANT) {
            return Err(BrokerResponse::error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "expected the token-exchange grant type",
            ));
        }
        if let Some(t) = params.get("requested_token_type")
            && t != ACCESS_TOKEN_TYPE
        {
            return Err(invalid_request(
                "only requested_token_type=urn:ietf:params:oauth:token-type:access_token is supported",
            ));
        }
        if let Some(t) = params.get("subject_token_type")
            && t != ACCESS_TOKEN_TYPE
            && t != JWT_TOKEN_TYPE
        {
            return Err(invalid_request(
                "subject_token_type must be an access token (access_token or jwt)",
            ));
        }
        let Some(requested_issuer) = params.remove("requested_issuer") else {
            return Err(invalid_request(
                "requested_issuer (the provider alias) is required",
            ));
        };
        Ok(ExchangeRequest {
            requested_issuer,
            subject_token: params
                .remove("subject_token")
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            scope: params.remove("scope"),
        })
    }

    /// The provider alias whose token is asked for.
    pub fn requested_issuer(&self) -> &str {
        &self.requested_issuer
    }

    /// The host's token for the user, to authenticate into the [`Caller`]. `None` when the
    /// request carried none (the caller may then be authenticated otherwise, e.g. by an
    /// `Authorization` header).
    pub fn subject_token(&self) -> Option<&Secret> {
        self.subject_token.as_ref()
    }
}

/// Answers a token-exchange request as Keycloak does for internal-to-external exchange:
/// `requested_issuer` names the provider alias, and the answer carries that provider's access
/// token for the caller.
///
/// `caller` is `None` when the host could not authenticate the subject token (→ 401).
/// Authorization is the same as for [`read_tokens`](super::read_tokens), so are the error
/// statuses. A `scope` parameter must equal the granted scopes (narrowed exchange is not
/// offered).
///
/// ```
/// # async fn demo(broker: tokenbroker::TokenBroker, caller: tokenbroker::Caller) {
/// use tokenbroker::endpoints::{self, ExchangeRequest};
///
/// let form = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&requested_issuer=google";
/// let response = match ExchangeRequest::from_form(form) {
///     Ok(request) => endpoints::token_exchange(&broker, Some(&caller), "acme", &request).await,
///     Err(bad_request) => bad_request,
/// };
/// # }
/// ```
pub async fn token_exchange(
    broker: &TokenBroker,
    caller: Option<&Caller>,
    realm: &str,
    request: &ExchangeRequest,
) -> BrokerResponse {
    let Some(caller) = caller else {
        return BrokerResponse::unauthenticated();
    };
    let key = match key_of(caller, realm, &request.requested_issuer) {
        Ok(key) => key,
        Err(response) => return response,
    };
    let retrieved = match broker.retrieve(caller, &key).await {
        Ok(r) => r,
        Err(e) => return BrokerResponse::from_error(&e),
    };
    let set = &retrieved.tokens;
    if let Some(scope) = &request.scope
        && &Scopes::parse(scope) != set.scopes()
    {
        return BrokerResponse::error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "scope must equal the scopes granted by the provider",
        );
    }
    let now = broker.now();
    let mut body = Map::new();
    body.insert(
        "access_token".into(),
        json!(set.access_token().expose_secret()),
    );
    body.insert("issued_token_type".into(), json!(ACCESS_TOKEN_TYPE));
    body.insert("token_type".into(), json!(set.token_type()));
    if let Some(exp) = set.expires_at() {
        body.insert(
            "expires_in".into(),
            json!((exp - now).whole_seconds().max(0)),
        );
    }
    body.insert("scope".into(), json!(set.scopes().to_string()));
    BrokerResponse::json_body(StatusCode::OK, &Value::Object(body))
}

pub(super) fn invalid_request(description: &str) -> BrokerResponse {
    BrokerResponse::error(StatusCode::BAD_REQUEST, "invalid_request", description)
}
