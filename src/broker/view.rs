//! What a host receives from a read: the tokens the provider's policy lets leave the broker.

use std::fmt;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::access::ProviderPolicy;
use crate::account::UpstreamAccount;
use crate::ids::Scopes;
use crate::secret::Secret;
use crate::token::TokenSet;

/// The tokens of a link as a caller may have them, by the provider's [`ProviderPolicy`]: the
/// access token, its type, expiry and scopes, the ID token (unless the policy keeps it in), the
/// upstream account, and the refresh token **only** where the policy exposes it.
///
/// It cannot be serialized, and `Debug` redacts every token, so host code cannot export a
/// refresh token the policy keeps inside by accident. Cheap to clone (an `Arc` inside).
///
/// ```
/// # async fn demo(broker: tokenbroker::TokenBroker, caller: tokenbroker::Caller,
/// #               key: tokenbroker::TokenKey) -> tokenbroker::Result<()> {
/// let read = broker.retrieve(&caller, &key).await?;
/// let bearer = read.tokens.access_token().expose_secret();
/// assert!(read.tokens.refresh_token().is_none()); // the default policy keeps it inside
/// if let Some(account) = read.tokens.account() {
///     println!("linked as {}", account.email().unwrap_or(&account.subject));
/// }
/// # let _ = bearer; Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenView {
    set: Arc<TokenSet>,
    expose_refresh_token: bool,
    expose_id_token: bool,
}

impl TokenView {
    pub(crate) fn new(set: Arc<TokenSet>, policy: &ProviderPolicy) -> Self {
        TokenView {
            set,
            expose_refresh_token: policy.expose_refresh_token,
            expose_id_token: policy.expose_id_token,
        }
    }

    /// The access token.
    pub fn access_token(&self) -> &Secret {
        self.set.access_token()
    }
    /// The token type (usually `Bearer`).
    pub fn token_type(&self) -> &str {
        self.set.token_type()
    }
    /// When the access token expires, if known.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.set.expires_at()
    }
    /// The scopes the access token was granted.
    pub fn scopes(&self) -> &Scopes {
        self.set.scopes()
    }
    /// When the access token was obtained.
    pub fn obtained_at(&self) -> OffsetDateTime {
        self.set.obtained_at()
    }
    /// The ID token, unless the provider's policy keeps it in
    /// ([`ProviderPolicy::expose_id_token`]).
    pub fn id_token(&self) -> Option<&Secret> {
        self.set.id_token().filter(|_| self.expose_id_token)
    }
    /// The refresh token, only where the provider's policy exposes it
    /// ([`ProviderPolicy::expose_refresh_token`], off by default).
    pub fn refresh_token(&self) -> Option<&Secret> {
        self.set
            .refresh_token()
            .filter(|_| self.expose_refresh_token)
    }
    /// When the refresh token expires, if the provider said (shown whether or not the refresh
    /// token itself is exposed).
    pub fn refresh_expires_at(&self) -> Option<OffsetDateTime> {
        self.set.refresh_expires_at()
    }
    /// Provider-specific fields kept from the answer (e.g. Microsoft's `ext_expires_in`).
    pub fn extras(&self) -> &std::collections::BTreeMap<String, serde_json::Value> {
        self.set.extras()
    }
    /// The upstream account the tokens belong to, when known.
    pub fn account(&self) -> Option<&UpstreamAccount> {
        self.set.account()
    }
    /// Whether the access token is valid for at least `skew` at `now` (a token without a known
    /// expiry counts as valid).
    pub fn is_fresh(&self, now: OffsetDateTime, skew: std::time::Duration) -> bool {
        self.set.is_fresh(now, skew)
    }
    /// Whether the provider's policy lets the refresh token leave the broker.
    pub fn exposes_refresh_token(&self) -> bool {
        self.expose_refresh_token
    }

    /// The whole set, for the crate's own responses.
    pub(crate) fn set(&self) -> &Arc<TokenSet> {
        &self.set
    }
}

impl fmt::Debug for TokenView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenView")
            .field("access_token", self.access_token())
            .field("token_type", &self.token_type())
            .field("expires_at", &self.expires_at())
            .field("scopes", self.scopes())
            .field("id_token", &self.id_token())
            .field("refresh_token", &self.refresh_token())
            .field("account", &self.account())
            .finish()
    }
}
