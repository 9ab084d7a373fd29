//! [`AuthenticatedCaller`]: the request's caller, for the host's own handlers.

use std::sync::Arc;

use axum::extract::FromRequestParts;
use http::request::Parts;
use tokenbroker::{BrokerResponse, Caller};

use crate::Answer;
use crate::auth::CallerAuthenticator;

/// The authenticator the [`AuthenticatedCaller`] extractor uses, found in the request's
/// extensions. The broker router adds it to its own routes; add it to yours with
/// `.layer(axum::Extension(Authenticator::new(auth)))`.
#[derive(Clone)]
pub struct Authenticator(pub Arc<dyn CallerAuthenticator>);

impl Authenticator {
    /// Wraps an authenticator.
    pub fn new(authenticator: impl CallerAuthenticator) -> Self {
        Authenticator(Arc::new(authenticator))
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator")
    }
}

/// The caller of a request, authenticated by the [`Authenticator`] in the request's
/// extensions; rejects with the uniform `401`.
///
/// A host's own handler can act as the user, e.g. call the upstream API with the user's
/// token through [`TokenBroker::send_authorized`](tokenbroker::TokenBroker::send_authorized):
///
/// ```
/// use axum::{Extension, Router, routing::get};
/// use tokenbroker_axum::{AuthenticatedCaller, Authenticator};
///
/// async fn whoami(AuthenticatedCaller(caller): AuthenticatedCaller) -> String {
///     caller.subject.to_string()
/// }
///
/// fn routes(authenticator: Authenticator) -> Router {
///     Router::new()
///         .route("/whoami", get(whoami))
///         .layer(Extension(authenticator))
/// }
/// ```
#[derive(Debug, Clone)]
pub struct AuthenticatedCaller(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for AuthenticatedCaller {
    type Rejection = Answer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(Authenticator(authenticator)) = parts.extensions.get::<Authenticator>().cloned()
        else {
            tracing::error!(
                target: "tokenbroker_axum",
                "AuthenticatedCaller used without an Authenticator extension: add \
                 .layer(Extension(Authenticator::new(...)))"
            );
            return Err(Answer(BrokerResponse::error(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error",
            )));
        };
        match authenticator.authenticate(parts).await {
            Ok(caller) => Ok(AuthenticatedCaller(caller)),
            Err(e) => {
                tracing::debug!(target: "tokenbroker_axum", reason = ?e, "caller not authenticated");
                Err(Answer(BrokerResponse::unauthenticated()))
            }
        }
    }
}
