//! The broker's HTTP endpoints without a framework: Keycloak's token route, RFC 8693 token
//! exchange, linking, unlinking and a link's status.
//!
//! Each handler takes the broker, the authenticated [`Caller`] (`None` when the adapter
//! could not authenticate the request: the handler answers the uniform `401`) and typed
//! inputs, and returns a [`BrokerResponse`] to send as it is. Parsing of forms and query
//! strings lives here too, so an adapter for any framework (axum, actix, a hand-written hyper
//! service) only moves bytes: see the `tokenbroker-axum` crate for one.
//!
//! | route (Keycloak's shape) | handler |
//! |---|---|
//! | `GET /realms/{realm}/broker/{alias}/token` | [`read_tokens`] |
//! | `POST /realms/{realm}/protocol/openid-connect/token` (token exchange) | [`ExchangeRequest::from_form`], [`token_exchange`] |
//! | start a link | [`LinkRequest::from_query`], [`begin_link`] |
//! | `GET /realms/{realm}/broker/{alias}/endpoint` (the provider's redirect back) | [`complete_link`], [`link_body`] |
//! | unlink | [`unlink`] |
//! | a link's status | [`link_status`] |
//!
//! Errors are `{"error", "error_description"}` with `Cache-Control: no-store`
//! ([`BrokerResponse::from_error`]); a caller denied a read gets the same `403` whether or not
//! the link exists.

// The error side of these handlers is the answer to send: rare, and boxing it would only move
// the allocation the response's header map makes anyway.
#![allow(clippy::result_large_err)]

mod exchange;
mod link;
mod read;
mod response;

pub use exchange::{ACCESS_TOKEN_TYPE, ExchangeRequest, TOKEN_EXCHANGE_GRANT, token_exchange};
pub use link::{LinkRequest, begin_link, complete_link, link_body, link_status, unlink};
pub use read::{read_tokens, read_tokens_for};
pub use response::BrokerResponse;

use crate::access::Caller;
use crate::access::DenyReason;
use crate::error::Error;
use crate::ids::{ProviderId, Realm, TokenKey};

/// The caller's own link in `realm` to `alias`, for reads (the role checker judges the realm).
fn key_of(caller: &Caller, realm: &str, alias: &str) -> Result<TokenKey, BrokerResponse> {
    match (Realm::new(realm), ProviderId::new(alias)) {
        (Ok(realm), Ok(provider)) => Ok(TokenKey::new(realm, caller.subject.clone(), provider)),
        (Err(e), _) | (_, Err(e)) => Err(BrokerResponse::from_error(&Error::InvalidId(e))),
    }
}

/// The caller's own link, for the routes that act on it without the role checker: a caller
/// of another realm is refused here.
fn own_key_of(caller: &Caller, realm: &str, alias: &str) -> Result<TokenKey, BrokerResponse> {
    let key = key_of(caller, realm, alias)?;
    if key.realm != caller.realm {
        tracing::debug!(target: "tokenbroker", ?key, reason = ?DenyReason::OtherRealm, "link route refused");
        return Err(BrokerResponse::from_error(&Error::Forbidden));
    }
    Ok(key)
}
