//! A token-exchange front door (RFC 8693 shape), for clients written against Keycloak's
//! internal-to-external exchange.

use http::StatusCode;
use serde_json::{Map, Value, json};

use super::{BrokerResponse, TokenBroker};
use crate::access::Caller;
use crate::error::Error;
use crate::ids::{ProviderId, Realm, Scopes, TokenKey};

/// The RFC 8693 grant type.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The RFC 8693 token type of an access token.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

impl TokenBroker {
    /// Answers a token-exchange request (`POST .../protocol/openid-connect/token` with
    /// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange`), as Keycloak does for
    /// internal-to-external exchange: `requested_issuer` names the provider alias, and the
    /// answer carries that provider's access token for the caller.
    ///
    /// The host authenticates the request's `subject_token` (its own token) and passes the
    /// resulting [`Caller`] (`None` → 401). `form` is the request's form body. Authorization
    /// is the same as for retrieval. Only `requested_token_type` =
    /// `urn:ietf:params:oauth:token-type:access_token` (or none) is supported; a `scope`
    /// parameter must equal the granted scopes (narrowed exchange is not offered).
    ///
    /// ```
    /// # async fn demo(broker: tokenbroker::TokenBroker, caller: tokenbroker::Caller) {
    /// let form = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&requested_issuer=google";
    /// let response = broker.token_exchange(Some(&caller), "acme", form).await;
    /// # }
    /// ```
    pub async fn token_exchange(
        &self,
        caller: Option<&Caller>,
        realm: &str,
        form: &[u8],
    ) -> BrokerResponse {
        let Some(caller) = caller else {
            return BrokerResponse::unauthenticated();
        };
        let mut params = std::collections::HashMap::new();
        for (name, value) in url::form_urlencoded::parse(form) {
            if params
                .insert(name.clone().into_owned(), value.into_owned())
                .is_some()
            {
                return invalid_request(&format!("parameter {name} is repeated"));
            }
        }
        if params.get("grant_type").map(String::as_str) != Some(TOKEN_EXCHANGE_GRANT) {
            return BrokerResponse::error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "expected the token-exchange grant type",
            );
        }
        if let Some(t) = params.get("requested_token_type")
            && t != ACCESS_TOKEN_TYPE
        {
            return invalid_request(
                "only requested_token_type=urn:ietf:params:oauth:token-type:access_token is supported",
            );
        }
        let Some(alias) = params.get("requested_issuer") else {
            return invalid_request("requested_issuer (the provider alias) is required");
        };
        let key = match (Realm::new(realm), ProviderId::new(alias)) {
            (Ok(realm), Ok(provider)) => TokenKey::new(realm, caller.subject.clone(), provider),
            (Err(e), _) | (_, Err(e)) => return BrokerResponse::from_error(&Error::InvalidId(e)),
        };
        let retrieved = match self.retrieve(caller, &key).await {
            Ok(r) => r,
            Err(e) => return BrokerResponse::from_error(&e),
        };
        let set = &retrieved.tokens;
        if let Some(scope) = params.get("scope")
            && &Scopes::parse(scope) != set.scopes()
        {
            return BrokerResponse::error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "scope must equal the scopes granted by the provider",
            );
        }
        let now = self.inner.clock.now();
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
        BrokerResponse::new(StatusCode::OK, &Value::Object(body))
    }
}

fn invalid_request(description: &str) -> BrokerResponse {
    BrokerResponse::error(StatusCode::BAD_REQUEST, "invalid_request", description)
}
