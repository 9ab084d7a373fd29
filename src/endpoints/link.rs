//! Linking, unlinking and a link's status: the routes a user acts on for their own links.
//!
//! These act only on the caller's own link (the key is built from the caller's realm and
//! subject), so no role is asked for; a caller from another realm gets `403`.

use http::StatusCode;
use serde_json::{Value, json};

use super::{BrokerResponse, own_key_of};
use crate::access::Caller;
use crate::account::UpstreamAccount;
use crate::broker::{
    Callback, GrantStatus, LinkOutcome, LoginOptions, LoginStart, PendingLogin, TokenBroker,
};
use crate::error::Error;
use crate::events::RevocationStatus;
use crate::ids::Scopes;

/// What the start of a link may ask for, from the login route's query string.
///
/// ```
/// use tokenbroker::endpoints::LinkRequest;
///
/// let request = LinkRequest::from_query("scope=calendar.readonly%20drive.file&login_hint=alice");
/// assert_eq!(request.scopes().map(|s| s.to_string()).as_deref(), Some("calendar.readonly drive.file"));
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LinkRequest {
    scopes: Option<Scopes>,
    login_hint: Option<String>,
}

impl LinkRequest {
    /// Reads `scope` (scopes to ask for instead of the provider's defaults) and `login_hint`.
    /// Other parameters are left to the adapter; a repeated one keeps its first value.
    pub fn from_query(query: &str) -> Self {
        let mut request = LinkRequest::default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "scope" if request.scopes.is_none() && !value.trim().is_empty() => {
                    request.scopes = Some(Scopes::parse(&value));
                }
                "login_hint" if request.login_hint.is_none() && !value.is_empty() => {
                    request.login_hint = Some(value.into_owned());
                }
                _ => {}
            }
        }
        request
    }

    /// The scopes asked for, if any.
    pub fn scopes(&self) -> Option<&Scopes> {
        self.scopes.as_ref()
    }

    /// The login hint, if any.
    pub fn login_hint(&self) -> Option<&str> {
        self.login_hint.as_deref()
    }
}

/// Starts linking `alias` for the caller: the authorization URL to send the browser to, and
/// the [`PendingLogin`] to keep in the user's server-side session until the browser comes back
/// (then pass it to [`complete_link`]).
///
/// # Errors
/// The answer to send instead: `401` without a caller, `400` for a malformed realm or alias,
/// `403` for a caller of another realm, `404` for a provider the broker does not know.
pub async fn begin_link(
    broker: &TokenBroker,
    caller: Option<&Caller>,
    realm: &str,
    alias: &str,
    request: &LinkRequest,
) -> Result<LoginStart, BrokerResponse> {
    let Some(caller) = caller else {
        return Err(BrokerResponse::unauthenticated());
    };
    let key = own_key_of(caller, realm, alias)?;
    let mut options = LoginOptions::default();
    if let Some(scopes) = &request.scopes {
        options = options.with_scopes(scopes.clone());
    }
    if let Some(hint) = &request.login_hint {
        options = options.with_login_hint(hint.clone());
    }
    broker
        .begin_login(&key, options)
        .await
        .map_err(|e| BrokerResponse::from_error(&e))
}

/// Completes a link when the provider redirects the browser back to
/// `/realms/{realm}/broker/{alias}/endpoint`: checks that `pending` (taken out of the
/// session, so it is used once) belongs to this realm and provider, then redeems the code.
///
/// # Errors
/// The answer to send instead: `400 invalid_state` for a pending login of another link or a
/// callback whose state does not match, `400 access_denied` when the user or provider refused,
/// `502` when the provider failed, and the statuses of [`BrokerResponse::from_error`].
pub async fn complete_link(
    broker: &TokenBroker,
    pending: PendingLogin,
    realm: &str,
    alias: &str,
    callback: &Callback,
) -> Result<LinkOutcome, BrokerResponse> {
    let key = pending.key();
    if key.realm.as_str() != realm || key.provider.as_str() != alias {
        return Err(BrokerResponse::from_error(&Error::LoginRejected {
            reason: "the pending login is for another link",
        }));
    }
    broker
        .complete_login(pending, callback)
        .await
        .map_err(|e| BrokerResponse::from_error(&e))
}

/// The `200` for a completed link: which account is linked, never a token.
///
/// ```json
/// {"provider":"google","first_link":true,"stored":true,
///  "account":{"issuer":"https://accounts.google.com","subject":"1087","email":"alice@example.com"},
///  "replaced_account":null}
/// ```
pub fn link_body(outcome: &LinkOutcome) -> BrokerResponse {
    let replaced = outcome.replaced_account.as_ref().map(|r| {
        json!({
            "previous": r.previous.as_ref().map(account_json),
            "revocation": revocation_name(&r.revocation),
        })
    });
    BrokerResponse::json_body(
        StatusCode::OK,
        &json!({
            "provider": outcome.key.provider.as_str(),
            "first_link": outcome.first_link,
            "stored": outcome.stored,
            "account": outcome.tokens.set().account().map(account_json),
            "replaced_account": replaced,
        }),
    )
}

/// Unlinks the caller's link to `alias`: revokes the grant upstream where the provider
/// supports it and deletes the tokens. `200 {"deleted":true,"revocation":"revoked"}`
/// (`revocation` is one of `revoked`, `not_supported`, `failed`, `nothing_to_revoke`,
/// `deferred` (kept in the outbox and retried by the drain), `expired`), `404`
/// when there was no link.
pub async fn unlink(
    broker: &TokenBroker,
    caller: Option<&Caller>,
    realm: &str,
    alias: &str,
) -> BrokerResponse {
    let Some(caller) = caller else {
        return BrokerResponse::unauthenticated();
    };
    let key = match own_key_of(caller, realm, alias) {
        Ok(key) => key,
        Err(response) => return response,
    };
    match broker.unlink(&key).await {
        Ok(outcome) if outcome.deleted => BrokerResponse::json_body(
            StatusCode::OK,
            &json!({ "deleted": true, "revocation": revocation_name(&outcome.revocation) }),
        ),
        Ok(_) => BrokerResponse::from_error(&Error::NotFound { key }),
        Err(e) => BrokerResponse::from_error(&e),
    }
}

/// The health of the caller's link to `alias` and the upstream account it holds, never a
/// token: `200` with `state` one of `active`, `refreshing`, `backoff`, `relink_required`;
/// `404` when not linked.
///
/// ```json
/// {"provider":"google","state":"active","expires_at":1767229199,"has_refresh_token":true,
///  "account":{"issuer":"https://accounts.google.com","subject":"1087","email":"alice@example.com"}}
/// ```
pub async fn link_status(
    broker: &TokenBroker,
    caller: Option<&Caller>,
    realm: &str,
    alias: &str,
) -> BrokerResponse {
    let Some(caller) = caller else {
        return BrokerResponse::unauthenticated();
    };
    let key = match own_key_of(caller, realm, alias) {
        Ok(key) => key,
        Err(response) => return response,
    };
    let status = match broker.status(&key).await {
        Ok(status) => status,
        Err(e) => return BrokerResponse::from_error(&e),
    };
    let mut body = json!({ "provider": alias });
    let fields = body.as_object_mut().expect("an object");
    match status {
        GrantStatus::NotLinked => return BrokerResponse::from_error(&Error::NotFound { key }),
        GrantStatus::Active {
            expires_at,
            has_refresh_token,
            account,
        } => {
            fields.insert("state".into(), json!("active"));
            fields.insert(
                "expires_at".into(),
                json!(expires_at.map(|e| e.unix_timestamp())),
            );
            fields.insert("has_refresh_token".into(), json!(has_refresh_token));
            fields.insert(
                "account".into(),
                account.as_ref().map_or(Value::Null, account_json),
            );
        }
        GrantStatus::Refreshing => {
            fields.insert("state".into(), json!("refreshing"));
        }
        GrantStatus::Backoff { until, failures } => {
            fields.insert("state".into(), json!("backoff"));
            fields.insert("retry_at".into(), json!(until.unix_timestamp()));
            fields.insert("failures".into(), json!(failures));
        }
        GrantStatus::RelinkRequired { reason, since } => {
            fields.insert("state".into(), json!("relink_required"));
            fields.insert("reason".into(), json!(reason));
            fields.insert("since".into(), json!(since.unix_timestamp()));
        }
    }
    BrokerResponse::json_body(StatusCode::OK, &body)
}

fn account_json(account: &UpstreamAccount) -> Value {
    json!({
        "issuer": account.issuer,
        "subject": account.subject,
        "tenant_id": account.tenant_id,
        "email": account.email,
    })
}

fn revocation_name(status: &RevocationStatus) -> &'static str {
    match status {
        RevocationStatus::Revoked => "revoked",
        RevocationStatus::NotSupported => "not_supported",
        RevocationStatus::Failed(_) => "failed",
        RevocationStatus::NothingToRevoke => "nothing_to_revoke",
        RevocationStatus::Deferred { .. } => "deferred",
        RevocationStatus::Expired => "expired",
    }
}
