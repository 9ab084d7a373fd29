//! Logins in progress, kept in the user's `tower-sessions` session.
//!
//! The session store is the host's (memory, Redis, SQL, ...), so an instance behind a load
//! balancer can complete a login that another one started. The pending login holds the PKCE
//! verifier: the session store must be server-side (tower-sessions keeps only an id in the
//! cookie).

use serde::{Deserialize, Serialize};
use tokenbroker::PendingLogin;
use tower_sessions::Session;

/// The session key the pending logins live under.
const SESSION_KEY: &str = "tokenbroker.pending_logins";

/// Logins one browser may have in progress at once (one per open "link" tab, say). The
/// oldest is dropped beyond this, so a session cannot grow without bound.
const MAX_PENDING: usize = 5;

/// One login in progress and where to send the browser when it is done.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct StoredLogin {
    pub(crate) pending: PendingLogin,
    pub(crate) return_to: Option<String>,
}

/// The session could not be read or written.
#[derive(Debug)]
pub(crate) struct SessionUnavailable;

/// Adds a login to the session.
pub(crate) async fn remember(
    session: &Session,
    login: StoredLogin,
) -> Result<(), SessionUnavailable> {
    let mut logins = load(session).await?;
    logins.push(login);
    if logins.len() > MAX_PENDING {
        let excess = logins.len() - MAX_PENDING;
        logins.drain(..excess);
    }
    session.insert(SESSION_KEY, &logins).await.map_err(|e| {
        tracing::warn!(target: "tokenbroker_axum", error = %e, "session write failed");
        SessionUnavailable
    })?;
    // Written now, not at the end of the response: the redirect to the provider must not
    // leave before the login it will come back to is in the store.
    session.save().await.map_err(|e| {
        tracing::warn!(target: "tokenbroker_axum", error = %e, "session save failed");
        SessionUnavailable
    })
}

/// Takes the login whose state is `state` out of the session, so it is used once: the session
/// is saved without it before the code is redeemed.
pub(crate) async fn take(
    session: &Session,
    state: &str,
) -> Result<Option<StoredLogin>, SessionUnavailable> {
    let mut logins = load(session).await?;
    let Some(at) = logins.iter().position(|l| l.pending.matches_state(state)) else {
        return Ok(None);
    };
    let login = logins.remove(at);
    let written = if logins.is_empty() {
        session.remove_value(SESSION_KEY).await.map(|_| ())
    } else {
        session.insert(SESSION_KEY, &logins).await
    };
    written.map_err(|e| {
        tracing::warn!(target: "tokenbroker_axum", error = %e, "session write failed");
        SessionUnavailable
    })?;
    session.save().await.map_err(|e| {
        tracing::warn!(target: "tokenbroker_axum", error = %e, "session save failed");
        SessionUnavailable
    })?;
    Ok(Some(login))
}

async fn load(session: &Session) -> Result<Vec<StoredLogin>, SessionUnavailable> {
    match session.get::<Vec<StoredLogin>>(SESSION_KEY).await {
        Ok(logins) => Ok(logins.unwrap_or_default()),
        Err(e) => {
            tracing::warn!(target: "tokenbroker_axum", error = %e, "session read failed");
            Err(SessionUnavailable)
        }
    }
}
