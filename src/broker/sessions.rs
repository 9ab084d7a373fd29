//! Reads beyond "the user's token": narrower scopes (or one audience) from the same grant, and
//! session-bound links that live and die with one login session of the host.

use sha2::{Digest, Sha256};

use super::{RetrievedTokens, TokenBroker};
use crate::LoginOptions;
use crate::access::Caller;
use crate::error::{Error, Result};
use crate::events::BrokerEvent;
use crate::ids::{Realm, Scopes, Subject, TokenKey};
use crate::secret::Secret;

/// Scopes of the form `aud:<client>` ask for a token for one audience; the provider, not the
/// grant's scope list, decides whether it issues one.
pub(crate) const AUDIENCE_PREFIX: &str = "aud:";

/// Marks the realms that hold session-bound links. Host realms must not contain it.
const SESSION_MARK: &str = "~session~";

/// The key under which a session-bound link of `key` is kept for one session: the same
/// subject and provider in a derived realm named after a hash of the session id (the id
/// itself never reaches the store).
pub(crate) fn session_key(key: &TokenKey, session: &Secret) -> Result<TokenKey> {
    if key.realm.as_str().contains(SESSION_MARK) {
        return Err(Error::Config(format!(
            "realm names containing {SESSION_MARK} are reserved for session-bound links"
        )));
    }
    let digest = Sha256::digest(session.expose_secret().as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    let realm = Realm::new(format!("{}{SESSION_MARK}{hex}", key.realm))?;
    Ok(TokenKey::new(
        realm,
        key.subject.clone(),
        key.provider.clone(),
    ))
}

/// The user's own realm for a key's realm: the realm itself, or the one a session-bound link's
/// derived realm was made from.
pub(crate) fn user_realm(realm: &Realm) -> Realm {
    match realm.as_str().split_once(SESSION_MARK) {
        Some((user, _)) => Realm::new(user).unwrap_or_else(|_| realm.clone()),
        None => realm.clone(),
    }
}

impl TokenBroker {
    /// Reads a token for a subset of the link's granted scopes, or for one audience
    /// (`aud:<client>`): the broker refreshes with the narrower `scope` parameter and keeps that
    /// token beside the link's own (it shares the one refresh token; a rotation updates it for
    /// all). Asking for exactly the granted scopes is a plain [`retrieve`](Self::retrieve).
    ///
    /// # Errors
    /// [`Error::ScopesNotGranted`] names the scopes the grant does not cover; ask for them with
    /// [`begin_incremental_consent`](Self::begin_incremental_consent). Otherwise as `retrieve`.
    ///
    /// ```
    /// # async fn run(broker: tokenbroker::TokenBroker, caller: tokenbroker::Caller,
    /// #              key: tokenbroker::TokenKey) -> tokenbroker::Result<()> {
    /// use tokenbroker::Scopes;
    /// let read_only = broker
    ///     .retrieve_narrowed(&caller, &key, &Scopes::parse("calendar.readonly"))
    ///     .await?;
    /// # let _ = read_only; Ok(()) }
    /// ```
    pub async fn retrieve_narrowed(
        &self,
        caller: &Caller,
        target: &TokenKey,
        scopes: &Scopes,
    ) -> Result<RetrievedTokens> {
        self.observe_read(target, async {
            let entry = self.check_read(caller, target).await?;
            let (tokens, refreshed, stale) = self.inner.fresh_narrowed(target, scopes).await?;
            Ok(self.read_done(caller, target, entry, tokens, refreshed, stale))
        })
        .await
    }

    /// Starts a login that adds `missing` scopes to an existing link (incremental consent);
    /// Google's preset sends `include_granted_scopes=true`, so the new grant covers the old
    /// scopes too. Completing it merges into the link as any re-login does.
    pub async fn begin_incremental_consent(
        &self,
        key: &TokenKey,
        missing: Scopes,
    ) -> Result<super::LoginStart> {
        let granted = match self.inner.store.load(key).await? {
            Some(stored) => crate::token::TokenSet::from_payload(&stored.record.payload)
                .map(|set| set.scopes().clone())
                .unwrap_or_default(),
            None => Scopes::new(),
        };
        self.begin_login(
            key,
            LoginOptions::default().with_scopes(granted.union(&missing)),
        )
        .await
    }

    /// Reads `target` for one login session of the host: the session-bound link of that
    /// session when there is one, otherwise the user's offline link. Authorization is checked
    /// against `target`, as for [`retrieve`](Self::retrieve).
    pub async fn retrieve_in_session(
        &self,
        caller: &Caller,
        target: &TokenKey,
        session_id: &str,
    ) -> Result<RetrievedTokens> {
        self.observe_read(target, async {
            let entry = self.check_read(caller, target).await?;
            let session = session_key(target, &Secret::new(session_id))?;
            // One load when the session has its own link. `NotFound` also covers a session
            // link deleted (session ended) while it was being refreshed: the offline link is
            // then the right answer too.
            let (tokens, refreshed, stale) = match self.inner.fresh_tokens(&session).await {
                Err(Error::NotFound { .. }) => self.inner.fresh_tokens(target).await?,
                other => other?,
            };
            Ok(self.read_done(caller, target, entry, tokens, refreshed, stale))
        })
        .await
    }

    /// Ends a login session of the host: deletes every session-bound link of that session
    /// (offline links stay) and returns how many were removed. Nothing is revoked upstream:
    /// the provider's own session ends with its tokens' lifetimes.
    pub async fn end_session(
        &self,
        realm: &Realm,
        subject: &Subject,
        session_id: &str,
    ) -> Result<usize> {
        let probe = TokenKey::new(
            realm.clone(),
            subject.clone(),
            crate::ids::ProviderId::new("x")?,
        );
        let session_realm = session_key(&probe, &Secret::new(session_id))?.realm;
        let mut removed = 0;
        for key in self.inner.store.list(&session_realm, subject).await? {
            if self.inner.store.delete(&key, None).await? {
                removed += 1;
                self.inner.emit(BrokerEvent::Unlinked {
                    key,
                    revocation: crate::events::RevocationStatus::NothingToRevoke,
                });
            }
        }
        Ok(removed)
    }
}
