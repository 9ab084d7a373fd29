//! Reading tokens: Keycloak's `GET /realms/{realm}/broker/{alias}/token`.

use http::StatusCode;
use serde_json::{Map, Value, json};

use super::{BrokerResponse, key_of};
use crate::access::Caller;
use crate::broker::{RetrievedTokens, TokenBroker};
use crate::ids::TokenKey;

/// Answers `GET /realms/{realm}/broker/{alias}/token` for the caller's own link, in
/// Keycloak's format:
///
/// ```json
/// {"access_token":"…","expires_in":3599,"refresh_expires_in":0,"token_type":"Bearer",
///  "id_token":"…","scope":"email openid","not-before-policy":0,
///  "accessTokenExpiration":1767229199}
/// ```
///
/// `caller` is `None` when the host could not authenticate the request (→ 401). Then:
/// 400 for a malformed realm or alias, 403 when the checker denies (whether or not a
/// link exists), 404 when there is no link, 409 when the user must re-link, 502 when the
/// provider failed and no valid token was at hand, 503 while another instance refreshes.
/// `refresh_token` and `id_token` are included only when the provider's policy exposes them.
///
/// ```
/// # async fn demo(broker: tokenbroker::TokenBroker, caller: tokenbroker::Caller) {
/// use tokenbroker::endpoints;
///
/// let response = endpoints::read_tokens(&broker, Some(&caller), "acme", "google").await;
/// let http_response = response.into_http(); // send it as it is
/// # }
/// ```
pub async fn read_tokens(
    broker: &TokenBroker,
    caller: Option<&Caller>,
    realm: &str,
    alias: &str,
) -> BrokerResponse {
    let Some(caller) = caller else {
        return BrokerResponse::unauthenticated();
    };
    let key = match key_of(caller, realm, alias) {
        Ok(key) => key,
        Err(response) => return response,
    };
    read_tokens_for(broker, Some(caller), &key).await
}

/// The same answer for an explicit link, which may be another user's: for an admin caller
/// (the checker's admin scope, in the spirit of Auth0's `read:user_idp_tokens`) or a
/// route such as `GET /admin/realms/{realm}/users/{user}/broker/{alias}/token`. The checker
/// decides as for any read; a denied caller gets the same 403 whether or not the link
/// exists.
pub async fn read_tokens_for(
    broker: &TokenBroker,
    caller: Option<&Caller>,
    key: &TokenKey,
) -> BrokerResponse {
    let Some(caller) = caller else {
        return BrokerResponse::unauthenticated();
    };
    match broker.retrieve(caller, key).await {
        Ok(retrieved) => token_body(broker, &retrieved),
        Err(e) => BrokerResponse::from_error(&e),
    }
}

fn token_body(broker: &TokenBroker, retrieved: &RetrievedTokens) -> BrokerResponse {
    let now = broker.now();
    let view = &retrieved.tokens;
    let set = view.set();
    let secs_until = |at: time::OffsetDateTime| (at - now).whole_seconds().max(0);
    let mut body = Map::new();
    body.insert(
        "access_token".into(),
        json!(set.access_token().expose_secret()),
    );
    if let Some(exp) = set.expires_at() {
        body.insert("expires_in".into(), json!(secs_until(exp)));
    }
    body.insert(
        "refresh_expires_in".into(),
        json!(set.refresh_expires_at().map_or(0, secs_until)),
    );
    body.insert("token_type".into(), json!(set.token_type()));
    if let Some(id_token) = view.id_token() {
        body.insert("id_token".into(), json!(id_token.expose_secret()));
    }
    body.insert("scope".into(), json!(set.scopes().to_string()));
    body.insert("not-before-policy".into(), json!(0));
    body.insert(
        "accessTokenExpiration".into(),
        json!(set.expires_at().map_or(0, |e| e.unix_timestamp())),
    );
    if let Some(rt) = view.refresh_token() {
        body.insert("refresh_token".into(), json!(rt.expose_secret()));
    }
    BrokerResponse::json_body(StatusCode::OK, &Value::Object(body))
}
