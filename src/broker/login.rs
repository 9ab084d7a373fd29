//! Linking an account: the authorization-code flow with state, PKCE S256 and nonce.

use std::fmt;
use std::time::Duration;

use oauth2::{PkceCodeChallenge, PkceCodeVerifier};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use url::Url;

use super::{Inner, TokenBroker};
use std::sync::Arc;

use super::TokenView;
use crate::account::UpstreamAccount;
use crate::error::{Error, Result};
use crate::events::{BrokerEvent, RevocationStatus};
use crate::ids::{Scopes, TokenKey};
use crate::provider::{AuthorizationRequest, CodeExchange, ProviderError};
use crate::secret::{Secret, random_token};
use crate::store::{LinkState, Record, RecordMeta, StoreError};
use crate::token::TokenSet;

/// Options for [`TokenBroker::begin_login`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct LoginOptions {
    /// Scopes to ask for besides the provider's defaults.
    pub scopes: Scopes,
    /// A `login_hint` for the provider.
    pub login_hint: Option<String>,
    /// Extra authorization parameters.
    pub extra_params: Vec<(String, String)>,
    /// The host's login session, for providers that keep session-bound links.
    pub session: Option<Secret>,
}

impl LoginOptions {
    /// Asks for more scopes.
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }
    /// Sets the `login_hint`.
    pub fn with_login_hint(mut self, hint: impl Into<String>) -> Self {
        self.login_hint = Some(hint.into());
        self
    }
    /// Binds the link to one login session of the host (for providers whose policy keeps
    /// [`LinkKind::SessionBound`](crate::LinkKind::SessionBound) links). The id is hashed before
    /// it is used as part of a store key.
    pub fn with_session(mut self, session_id: impl Into<String>) -> Self {
        self.session = Some(Secret::new(session_id.into()));
        self
    }
    /// Adds an authorization parameter (it replaces a configured or preset one of the same
    /// name, e.g. `prompt`). One the broker sets itself
    /// ([`RESERVED_AUTHORIZATION_PARAMS`](crate::provider::RESERVED_AUTHORIZATION_PARAMS)) makes
    /// [`TokenBroker::begin_login`] fail with [`Error::ReservedParameter`].
    pub fn with_param(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_params.push((name.into(), value.into()));
        self
    }
}

/// The first half of a login: where to send the browser, and what to keep until it returns.
///
/// `Debug` leaves out the URL's query, which carries the state and nonce.
#[non_exhaustive]
pub struct LoginStart {
    /// The provider's authorization URL. Redirect the user's browser to it.
    pub authorization_url: Url,
    /// Keep this in the user's server-side session until the callback arrives.
    pub pending: PendingLogin,
}

/// A login in progress: the state, PKCE verifier and nonce of one authorization request.
///
/// Serializable so the host can keep it in its session. **Its serialized form contains
/// secrets** (the PKCE verifier): keep it server-side, or in an encrypted, signed cookie.
/// `Debug` shows no secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingLogin {
    key: TokenKey,
    state: Secret,
    pkce_verifier: Secret,
    nonce: Secret,
    scopes: Scopes,
    #[serde(with = "time::serde::timestamp")]
    created_at: OffsetDateTime,
}

impl PendingLogin {
    /// The link this login will create or update.
    pub fn key(&self) -> &TokenKey {
        &self.key
    }
    /// The scopes requested.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }
    /// When the login began.
    pub fn created_at(&self) -> OffsetDateTime {
        self.created_at
    }
    /// Whether `state` (from the provider's redirect back) is this login's, compared in
    /// constant time. For adapters that keep several logins in one session and must find the
    /// one a callback belongs to; [`TokenBroker::complete_login`] checks it again.
    pub fn matches_state(&self, state: &str) -> bool {
        self.state.constant_time_eq(&Secret::new(state.to_owned()))
    }
}

impl fmt::Debug for LoginStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = &self.authorization_url;
        f.debug_struct("LoginStart")
            .field(
                "authorization_url",
                &format_args!(
                    "{}://{}{}?[redacted]",
                    url.scheme(),
                    url.host_str().unwrap_or(""),
                    url.path()
                ),
            )
            .field("pending", &self.pending)
            .finish()
    }
}

impl fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingLogin")
            .field("key", &self.key)
            .field("state", &self.state)
            .field("pkce_verifier", &self.pkce_verifier)
            .field("nonce", &self.nonce)
            .field("scopes", &self.scopes)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// The query parameters of the redirect back from the provider.
///
/// ```
/// use tokenbroker::Callback;
/// let cb = Callback::from_query("code=abc&state=xyz");
/// assert!(format!("{cb:?}").contains("[redacted]"));
/// ```
#[derive(Clone, Default, Deserialize)]
#[non_exhaustive]
pub struct Callback {
    /// The authorization code.
    pub code: Option<Secret>,
    /// The echoed state.
    pub state: Option<Secret>,
    /// An error code (`access_denied`, ...).
    pub error: Option<String>,
    /// The error's description.
    pub error_description: Option<String>,
    /// The issuer identifier of the authorization response (RFC 9207 `iss`), if sent.
    pub iss: Option<String>,
}

impl fmt::Debug for Callback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Callback")
            .field("code", &self.code)
            .field("state", &self.state)
            .field("error", &self.error)
            .field("error_description", &self.error_description)
            .field("iss", &self.iss)
            .finish()
    }
}

impl Callback {
    /// A successful callback.
    pub fn new(code: impl Into<String>, state: impl Into<String>) -> Self {
        Callback {
            code: Some(Secret::new(code.into())),
            state: Some(Secret::new(state.into())),
            ..Default::default()
        }
    }

    /// Parses the callback's query string (without the `?`). Unknown parameters are ignored;
    /// a repeated parameter keeps its first value.
    pub fn from_query(query: &str) -> Self {
        let mut cb = Callback::default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "code" if cb.code.is_none() => cb.code = Some(Secret::new(value.into_owned())),
                "state" if cb.state.is_none() => cb.state = Some(Secret::new(value.into_owned())),
                "error" if cb.error.is_none() => {
                    cb.error = Some(crate::provider::truncate_description(&value))
                }
                "error_description" if cb.error_description.is_none() => {
                    cb.error_description = Some(crate::provider::truncate_description(&value))
                }
                "iss" if cb.iss.is_none() => cb.iss = Some(value.into_owned()),
                _ => {}
            }
        }
        cb
    }

    /// Sets the issuer identifier (RFC 9207 `iss`) of the authorization response.
    pub fn with_iss(mut self, iss: impl Into<String>) -> Self {
        self.iss = Some(iss.into());
        self
    }

    /// Parses the query of a full callback URL.
    pub fn from_url(url: &Url) -> Self {
        Callback::from_query(url.query().unwrap_or(""))
    }
}

/// The result of a completed login.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinkOutcome {
    /// The link.
    pub key: TokenKey,
    /// Whether the user linked this provider for the first time.
    pub first_link: bool,
    /// Whether the tokens were stored (the provider's `store_tokens` policy).
    pub stored: bool,
    /// The tokens as stored (merged with an earlier link's refresh token if the provider sent
    /// none this time and the account is the same), as the provider's policy lets them out.
    pub tokens: TokenView,
    /// When the link held another upstream account before this login: that account (if it
    /// was known) and what happened to its grant upstream. The old tokens were replaced, never
    /// merged.
    pub replaced_account: Option<ReplacedAccount>,
}

/// A re-link with another upstream account replaced the link's tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplacedAccount {
    /// The account the link held before, when it was known.
    pub previous: Option<UpstreamAccount>,
    /// The revocation of the previous account's grant upstream.
    pub revocation: RevocationStatus,
}

/// What a login did to the stored link.
enum Upsert {
    /// No link before.
    Created(TokenSet),
    /// The same account (or one that cannot be told apart): merged.
    Merged(TokenSet),
    /// Replaced: another account, a record marked relink-required, or one that did not decode.
    Replaced {
        set: TokenSet,
        /// The previous set, when it decoded and held another account.
        other_account: Option<Box<TokenSet>>,
    },
}

impl TokenBroker {
    /// Starts linking `key.provider` for `key.subject`: builds the authorization URL with a
    /// fresh state, PKCE S256 challenge and nonce.
    ///
    /// # Errors
    /// [`Error::UnknownProvider`], [`Error::Store`] (the broker checks whether a refresh
    /// token is held, so providers such as Google ask for consent only when needed). With a
    /// pushed authorization request (RFC 9126): [`Error::Unavailable`] (the PAR endpoint failed
    /// with 5xx, answered something unreadable, or did not answer in time),
    /// [`Error::Provider`] (it refused the request or the client), [`Error::Config`] (PAR
    /// required but the provider has no PAR endpoint, or required by the provider but turned
    /// off). [`Error::ReservedParameter`]: an extra parameter names one the broker sets
    /// itself (checked first). Nothing is stored in either case.
    #[tracing::instrument(name = "tokenbroker.login", target = "tokenbroker", skip_all, fields(provider = %key.provider, subject_hash = %crate::telemetry::SubjectHash(&key.subject)))]
    pub async fn begin_login(&self, key: &TokenKey, options: LoginOptions) -> Result<LoginStart> {
        let inner = &self.inner;
        let entry = inner.entry(&key.provider)?;
        let reserved = |e: ProviderError| match e {
            ProviderError::ReservedParameter { name } => Error::ReservedParameter {
                provider: key.provider.to_string(),
                name,
            },
            other => Error::Config(format!("provider {}: {other}", key.provider)),
        };
        // Whatever the provider does with them: a custom `Provider` may not check.
        crate::provider::check_extra_params(&options.extra_params).map_err(reserved)?;
        let key = &match entry.policy.link_kind {
            crate::access::LinkKind::SessionBound => {
                let Some(session) = &options.session else {
                    return Err(Error::Config(format!(
                        "provider {} keeps session-bound links: pass LoginOptions::with_session",
                        key.provider
                    )));
                };
                super::sessions::session_key(key, session)?
            }
            _ => key.clone(),
        };
        let has_refresh_token = match inner.store.load(key).await {
            Ok(Some(stored)) if !stored.record.meta.state.is_relink_required() => {
                TokenSet::from_payload(&stored.record.payload)
                    .is_ok_and(|s| s.refresh_token().is_some())
            }
            Ok(_) => false,
            // A record that does not decrypt or decode never blocks a re-link: the login's
            // tokens will replace it.
            Err(StoreError::Corrupt { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        let verifier = Secret::new(random_token(32));
        let challenge = PkceCodeChallenge::from_code_verifier_sha256(&PkceCodeVerifier::new(
            verifier.expose_secret().to_owned(),
        ));
        let scopes = entry.provider.default_scopes().union(&options.scopes);
        let pending = PendingLogin {
            key: key.clone(),
            state: Secret::new(random_token(32)),
            pkce_verifier: verifier,
            nonce: Secret::new(random_token(32)),
            scopes: scopes.clone(),
            created_at: inner.clock.now(),
        };
        let request = AuthorizationRequest {
            state: pending.state.clone(),
            pkce_challenge: challenge.as_str().to_owned(),
            nonce: pending.nonce.clone(),
            scopes,
            has_refresh_token,
            login_hint: options.login_hint,
            extra_params: options.extra_params,
        };
        let provider = key.provider.to_string();
        // A pushed authorization request (RFC 9126) makes this a network call.
        let authorization_url = tokio::time::timeout(
            inner.config.refresh_timeout,
            entry.provider.start_authorization(&request),
        )
        .await
        .map_err(|_| Error::Unavailable {
            provider: provider.clone(),
            retry_after: None,
            source: None,
        })?
        .map_err(|e| match e {
            ProviderError::Config { reason } => {
                Error::Config(format!("provider {provider}: {reason}"))
            }
            // A quirk's parameter: the configured ones were checked when the broker was built.
            ProviderError::ReservedParameter { name } => Error::ReservedParameter {
                provider: provider.clone(),
                name,
            },
            e if e.is_transient() => Error::Unavailable {
                provider: provider.clone(),
                retry_after: e.retry_after(),
                source: Some(e),
            },
            source => Error::Provider {
                provider: provider.clone(),
                source,
            },
        })?;
        Ok(LoginStart {
            authorization_url,
            pending,
        })
    }

    /// Finishes a login: checks the callback against the pending login (state compared in
    /// constant time, expiry, single use), redeems the code, and stores the tokens. A re-link
    /// merges with the stored set, so a refresh token is never lost because the provider did
    /// not send a new one.
    ///
    /// # Errors
    /// [`Error::LoginRejected`] (wrong or missing state, expired, already used, code rejected
    /// by the provider), [`Error::IssuerMismatch`] (RFC 9207: the callback's `iss` is not the
    /// provider's, or is missing where the provider always sends it; checked before the code is
    /// redeemed, after the pending login is used up, so the callback cannot be replayed),
    /// [`Error::AuthorizationDenied`], [`Error::Unavailable`], [`Error::Provider`],
    /// [`Error::Store`].
    #[tracing::instrument(name = "tokenbroker.login", target = "tokenbroker", skip_all, fields(provider = %pending.key().provider, subject_hash = %crate::telemetry::SubjectHash(&pending.key().subject)))]
    pub async fn complete_login(
        &self,
        pending: PendingLogin,
        callback: &Callback,
    ) -> Result<LinkOutcome> {
        let inner = &self.inner;
        let state = callback.state.as_ref().ok_or(Error::LoginRejected {
            reason: "callback has no state",
        })?;
        if !state.constant_time_eq(&pending.state) {
            return Err(Error::LoginRejected {
                reason: "state does not match the pending login",
            });
        }
        let now = inner.clock.now();
        if now - pending.created_at > inner.config.login_ttl {
            return Err(Error::LoginRejected {
                reason: "pending login expired",
            });
        }
        inner.consume_state(&pending.state, now)?;
        // RFC 9207, before anything else of the response is believed and before the code goes
        // anywhere. The state is already used up: a refused callback cannot be replayed, with
        // or without a corrected `iss` (the user starts the login again).
        let entry = inner.entry(&pending.key.provider)?;
        check_issuer(
            &entry.provider.authorization_response_issuer(),
            callback.iss.as_deref(),
        )
        .map_err(|missing| Error::IssuerMismatch {
            provider: pending.key.provider.to_string(),
            missing,
        })?;
        if let Some(error) = &callback.error {
            return Err(Error::AuthorizationDenied {
                error: error.clone(),
                description: callback.error_description.clone(),
            });
        }
        let code = callback.code.clone().ok_or(Error::LoginRejected {
            reason: "callback has no code",
        })?;
        let exchange = CodeExchange {
            code,
            pkce_verifier: pending.pkce_verifier.clone(),
            nonce: pending.nonce.clone(),
            requested_scopes: pending.scopes.clone(),
        };
        let provider = pending.key.provider.to_string();
        let tokens = tokio::time::timeout(
            inner.config.refresh_timeout,
            entry.provider.exchange_code(&exchange),
        )
        .await
        .map_err(|_| Error::Unavailable {
            provider: provider.clone(),
            retry_after: None,
            source: None,
        })?
        .map_err(|e| match e {
            ProviderError::InvalidGrant { .. } => Error::LoginRejected {
                reason: "authorization code rejected by the provider (invalid_grant)",
            },
            e if e.is_transient() => Error::Unavailable {
                provider: provider.clone(),
                retry_after: e.retry_after(),
                source: Some(e),
            },
            e => Error::Provider {
                provider: provider.clone(),
                source: e,
            },
        })?;
        let set = TokenSet::from_response(tokens, inner.clock.now(), &pending.scopes);
        if !entry.policy.store_tokens {
            return Ok(LinkOutcome {
                key: pending.key,
                first_link: false,
                stored: false,
                tokens: TokenView::new(Arc::new(set), &entry.policy),
                replaced_account: None,
            });
        }
        inner.note_lifetime(&pending.key.provider, &set);
        let upsert = inner.upsert_link(&pending.key, set).await?;
        let first_link = matches!(upsert, Upsert::Created(_));
        if first_link
            && entry.policy.stored_tokens_readable
            && let Some(hook) = &inner.role_grants
        {
            // The user's own realm, also for a session-bound link (whose key lives in a realm
            // derived for the session): roles belong to the user.
            let realm = super::sessions::user_realm(&pending.key.realm);
            hook.grant_role(&realm, &pending.key.subject, &inner.read_role)
                .await?;
        }
        let (tokens, replaced_account) = match upsert {
            Upsert::Created(set) | Upsert::Merged(set) => (set, None),
            Upsert::Replaced { set, other_account } => {
                let replaced = match other_account {
                    Some(old) => {
                        // The old account's grant has no link any more: revoke it, through the
                        // outbox so that an outage or a crash does not leave it alive.
                        let revocation = inner.revoke_owed(&pending.key, &old).await;
                        inner.emit(BrokerEvent::AccountChanged {
                            key: pending.key.clone(),
                            previous: old.account().cloned(),
                            revocation: revocation.clone(),
                        });
                        Some(ReplacedAccount {
                            previous: old.account().cloned(),
                            revocation,
                        })
                    }
                    None => None,
                };
                (set, replaced)
            }
        };
        inner.emit(BrokerEvent::Linked {
            key: pending.key.clone(),
            relinked: !first_link,
            account: tokens.account().cloned(),
        });
        Ok(LinkOutcome {
            key: pending.key,
            first_link,
            stored: true,
            tokens: TokenView::new(Arc::new(tokens), &entry.policy),
            replaced_account,
        })
    }
}

/// RFC 9207: a callback's `iss` must be one of the provider's issuers (exact, constant-time
/// comparison), and must be present where the provider always sends it. `Err(true)`: missing,
/// `Err(false)`: wrong. A provider that knows no issuer cannot check a sent `iss`.
fn check_issuer(
    expected: &crate::provider::AuthorizationResponseIssuer,
    iss: Option<&str>,
) -> std::result::Result<(), bool> {
    use subtle::ConstantTimeEq as _;
    match iss {
        None if expected.iss_parameter_supported => Err(true),
        None => Ok(()),
        Some(_) if expected.issuers.is_empty() => Ok(()),
        Some(iss) => {
            let matched = expected
                .issuers
                .iter()
                .fold(subtle::Choice::from(0), |found, issuer| {
                    found | issuer.as_bytes().ct_eq(iss.as_bytes())
                });
            if bool::from(matched) {
                Ok(())
            } else {
                Err(false)
            }
        }
    }
}

impl Inner {
    /// Marks a state as used. Callbacks are single-use: a replayed callback is rejected here,
    /// in this instance, before the code reaches the provider (which rejects it anyway).
    fn consume_state(&self, state: &Secret, now: OffsetDateTime) -> Result<()> {
        use sha2::Digest as _;
        // A digest, so the replay cache holds no usable state value.
        let id: [u8; 32] = sha2::Sha256::digest(state.expose_secret().as_bytes()).into();
        let ttl = self.config.login_ttl;
        let mut used = self.used_states.lock().unwrap_or_else(|e| e.into_inner());
        used.retain(|_, at| now - *at <= ttl + Duration::from_secs(60));
        if used.insert(id, now).is_some() {
            return Err(Error::LoginRejected {
                reason: "callback was already used",
            });
        }
        Ok(())
    }

    /// Inserts a link, or merges into the existing one (re-link with the same account), or
    /// replaces it (another account, a link marked relink-required, a record that does not
    /// decode). Never merges two accounts' tokens.
    async fn upsert_link(&self, key: &TokenKey, set: TokenSet) -> Result<Upsert> {
        for _ in 0..5 {
            let now = self.clock.now();
            let loaded = match self.store.load(key).await {
                Ok(loaded) => loaded,
                // A record that does not decrypt or decode (a retired key, a flipped bit, a
                // plain record in an encrypted store) is unusable: the login's tokens replace
                // it, at the version the store reported, so the user is never stuck.
                Err(StoreError::Corrupt {
                    version: Some(version),
                    reason,
                    ..
                }) => {
                    tracing::warn!(target: "tokenbroker", %key, %reason, "re-link replaces a record that could not be read");
                    let record = Record::new(
                        set.to_payload(),
                        RecordMeta::new(LinkState::Active, set.expires_at(), now, now),
                    );
                    match self
                        .store
                        .compare_and_swap(key, version, &record, None)
                        .await
                    {
                        Ok(_) => {
                            return Ok(Upsert::Replaced {
                                set,
                                other_account: None,
                            });
                        }
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            match loaded {
                None => {
                    let record = Record::new(
                        set.to_payload(),
                        RecordMeta::new(LinkState::Active, set.expires_at(), now, now),
                    );
                    match self.store.insert(key, &record).await {
                        Ok(_) => return Ok(Upsert::Created(set)),
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(stored) => {
                    let outcome = match TokenSet::from_payload(&stored.record.payload) {
                        // A link marked relink-required: its refresh token is known to be
                        // dead, and keeping it would only earn the next refresh another
                        // invalid_grant.
                        Ok(_) if stored.record.meta.state.is_relink_required() => {
                            Upsert::Replaced {
                                set: set.clone(),
                                other_account: None,
                            }
                        }
                        Ok(old) => match account_of(&old, &set) {
                            Account::Same => Upsert::Merged(old.merge(set.clone())),
                            Account::Other => Upsert::Replaced {
                                set: set.clone(),
                                other_account: Some(Box::new(old)),
                            },
                            // Cannot tell: merge only to keep a refresh token the login did not
                            // bring again (a re-consent at Google); with a new one, replacing
                            // loses nothing. Nothing is revoked: it may be the same grant.
                            Account::Unknown if set.refresh_token().is_none() => {
                                Upsert::Merged(old.merge(set.clone()))
                            }
                            Account::Unknown => Upsert::Replaced {
                                set: set.clone(),
                                other_account: None,
                            },
                        },
                        // A record we cannot decode is unusable: the new tokens replace it.
                        Err(_) => Upsert::Replaced {
                            set: set.clone(),
                            other_account: None,
                        },
                    };
                    let written = match &outcome {
                        Upsert::Created(s)
                        | Upsert::Merged(s)
                        | Upsert::Replaced { set: s, .. } => s,
                    };
                    let record = Record::new(
                        written.to_payload(),
                        RecordMeta::new(
                            LinkState::Active,
                            written.expires_at(),
                            stored.record.meta.created_at,
                            now,
                        ),
                    );
                    // A refresh that rotates meanwhile makes this conflict; the next turn
                    // merges onto its newer refresh token (or replaces it for another account).
                    match self
                        .store
                        .compare_and_swap(key, stored.version, &record, None)
                        .await
                    {
                        Ok(_) => {
                            self.backoff
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .remove(key);
                            return Ok(outcome);
                        }
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(StoreError::Conflict { key: key.clone() }.into())
    }
}

/// Whether a re-link's tokens belong to the account the link holds.
enum Account {
    Same,
    Other,
    /// One side cannot say (a provider without ID tokens or an account endpoint).
    Unknown,
}

/// Accounts recorded on both sides decide. A link stored before accounts were recorded is
/// judged by the account its stored ID token names (it was verified when it was stored).
fn account_of(old: &TokenSet, new: &TokenSet) -> Account {
    let old_account = old
        .account()
        .cloned()
        .or_else(|| old.id_token().and_then(crate::account::account_in_id_token));
    match (old_account, new.account()) {
        (Some(old), Some(new)) if old.is_same_account(new) => Account::Same,
        (Some(_), Some(_)) => Account::Other,
        _ => Account::Unknown,
    }
}
