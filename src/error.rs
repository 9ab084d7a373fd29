//! The crate's error types.
//!
//! Errors are values a caller acts on: [`Error`] says *what to do* (re-link, retry later, fix
//! the configuration), and keeps the lower-level [`StoreError`] or [`ProviderError`] as its
//! source. No error carries a token, a client secret or a key; `tests/redaction.rs` checks it.
//!
//! All errors are `Clone` (sources are shared behind an `Arc`), because one refresh answers
//! many waiting readers.

use std::sync::Arc;
use std::time::Duration;

pub use crate::access::AccessError;
pub use crate::ids::InvalidId;
use crate::ids::{Scopes, TokenKey};
pub use crate::provider::ProviderError;
pub use crate::store::StoreError;

/// A shared, thread-safe error source.
pub type BoxError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, in terms a host can act on.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The caller may not read this link. Returned before anything is loaded, so it says
    /// nothing about whether the link exists.
    #[error("access denied")]
    Forbidden,

    /// No link exists for the key (only returned to callers allowed to read it).
    #[error("no tokens stored for {key}")]
    NotFound {
        /// The key looked up.
        key: TokenKey,
    },

    /// The provider no longer accepts the grant (`invalid_grant`): the user must sign in to the
    /// provider again. The link is kept, marked, so a re-link replaces it.
    #[error("user must re-link {key}: {reason}")]
    RelinkRequired {
        /// The link.
        key: TokenKey,
        /// The provider's description, or ours.
        reason: String,
    },

    /// A refresh answered with an ID token naming another upstream account than the link's
    /// (OpenID Connect Core §12.2). Nothing of that answer was stored or served, and the link
    /// is marked relink-required: the user must link the account again.
    #[error("the provider's refreshed tokens for {key} name another account; user must re-link")]
    AccountMismatch {
        /// The link.
        key: TokenKey,
    },

    /// The access token expired and there is no refresh token to renew it.
    #[error("access token for {key} expired and no refresh token is stored; user must re-link")]
    NoRefreshToken {
        /// The link.
        key: TokenKey,
    },

    /// A read asked for scopes the user never granted. Ask for them with an incremental
    /// consent ([`TokenBroker::begin_incremental_consent`](crate::TokenBroker::begin_incremental_consent)).
    #[error("scopes not granted for {key}: {missing}")]
    ScopesNotGranted {
        /// The link.
        key: TokenKey,
        /// The scopes asked for that the grant does not cover.
        missing: Scopes,
    },

    /// The provider could not be reached or failed temporarily, and no still-valid access
    /// token was at hand. The stored record is unchanged; retry after `retry_after`.
    #[error("provider {provider} is temporarily unavailable")]
    Unavailable {
        /// The provider alias.
        provider: String,
        /// When to try again, if known.
        retry_after: Option<Duration>,
        /// The provider error.
        #[source]
        source: Option<ProviderError>,
    },

    /// A narrowed read asked for an audience (`aud:<client>`) that the provider's
    /// [`ProviderPolicy::allowed_audiences`](crate::ProviderPolicy::allowed_audiences) does not
    /// list. Nothing was sent upstream.
    #[error("audience {audience:?} is not allowed for {key}")]
    AudienceNotAllowed {
        /// The link.
        key: TokenKey,
        /// The audience asked for.
        audience: String,
    },

    /// The provider would not issue a token for the narrower scopes of a
    /// [`retrieve_narrowed`](crate::TokenBroker::retrieve_narrowed) (consent or interaction
    /// required for them, `invalid_scope`, or the grant refused for this request). The link
    /// itself is untouched: it is neither marked nor backed off, and plain reads go on working.
    /// Ask for the scopes with
    /// [`begin_incremental_consent`](crate::TokenBroker::begin_incremental_consent).
    #[error("provider {provider} refused a token for scopes {scopes} of {key}: {reason}")]
    NarrowedRefused {
        /// The link.
        key: TokenKey,
        /// The provider alias.
        provider: String,
        /// The scopes asked for.
        scopes: Scopes,
        /// What the provider said.
        reason: String,
    },

    /// Another instance held the refresh lease for longer than the broker waits.
    #[error("refresh of {key} is still in progress elsewhere; try again")]
    RefreshInProgress {
        /// The link.
        key: TokenKey,
    },

    /// The link kept changing under the refresh (re-links, key rotation or other instances
    /// wrote it first), and the newest record's access token had already expired. Nothing was
    /// lost; try again.
    #[error("{key} was changed concurrently during the refresh; try again")]
    RecordChanged {
        /// The link.
        key: TokenKey,
    },

    /// The provider rotated the refresh token but the store could not take the new tokens
    /// within the lease. The broker keeps them in memory and goes on writing them in the
    /// background (see `docs/refresh-protocol.md`); until that lands, reads of the link on
    /// this instance answer this. A process exit before then loses them.
    #[error("refreshed tokens for {key} are waiting for the store; try again")]
    WritePending {
        /// The link.
        key: TokenKey,
    },

    /// The provider's access token cannot be sent in an HTTP `Authorization` header (it holds
    /// characters a header value may not). Nothing was sent.
    #[error("access token for {key} is not a valid header value")]
    InvalidAccessToken {
        /// The link.
        key: TokenKey,
    },

    /// The provider alias is not configured on this broker.
    #[error("unknown provider {0:?}")]
    UnknownProvider(String),

    /// An identifier in the request was malformed.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),

    /// The login callback did not match the pending login (wrong or missing `state`), came too
    /// late, or was already used.
    #[error("login callback rejected: {reason}")]
    LoginRejected {
        /// Why (never contains the state or code).
        reason: &'static str,
    },

    /// The callback's `iss` (RFC 9207) is not the provider's issuer, or the callback has none
    /// although the provider always sends it (`authorization_response_iss_parameter_supported`):
    /// the response may come from another provider (a mix-up attack). Checked before the code
    /// is redeemed, so the code was not sent anywhere; the pending login is used up, so the
    /// same callback cannot complete a login later either. Start the login again.
    #[error("login callback for provider {provider} rejected: {}", if *.missing { "the authorization response has no iss" } else { "the authorization response's iss is not the provider's issuer" })]
    IssuerMismatch {
        /// The provider alias the login was for.
        provider: String,
        /// Whether `iss` was missing (rather than wrong).
        missing: bool,
    },

    /// The user or provider refused the authorization (`error=access_denied` on the callback).
    #[error("provider refused the authorization: {error}")]
    AuthorizationDenied {
        /// The `error` parameter.
        error: String,
        /// The `error_description` parameter, if any.
        description: Option<String>,
    },

    /// The provider rejected the request for a reason the user cannot fix (a bad client
    /// secret, a protocol error). The stored record is unchanged.
    #[error("provider {provider} rejected the request: {source}")]
    Provider {
        /// The provider alias.
        provider: String,
        /// What the provider said.
        #[source]
        source: ProviderError,
    },

    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// The role checker failed (not a denial: an error while deciding).
    #[error(transparent)]
    Access(#[from] AccessError),

    /// The broker is shutting down ([`TokenBroker::shutdown`](crate::TokenBroker::shutdown)):
    /// it starts no new refresh, and this read needed one (its access token is expired, or
    /// within the skew with nothing valid to serve). Nothing was sent upstream; the link is
    /// unchanged. Retry on another instance.
    #[error("the broker is shutting down; {key} needs a refresh")]
    ShuttingDown {
        /// The link.
        key: TokenKey,
    },

    /// A broker invariant broke (a bug): e.g. a refresh task panicked.
    #[error("internal error: {0}")]
    Internal(&'static str),

    /// The broker was configured inconsistently.
    #[error("configuration error: {0}")]
    Config(String),

    /// An extra authorization parameter names one the broker sets itself
    /// ([`RESERVED_AUTHORIZATION_PARAMS`](crate::provider::RESERVED_AUTHORIZATION_PARAMS):
    /// `state`, `nonce`, `redirect_uri`, `code_challenge`, `client_id`, `response_type`, ...).
    /// [`TokenBrokerBuilder::build`](crate::TokenBrokerBuilder::build) returns it for a
    /// parameter configured on a provider, and
    /// [`begin_login`](crate::TokenBroker::begin_login) for one passed with
    /// [`LoginOptions::with_param`](crate::LoginOptions::with_param), before anything is
    /// loaded or sent.
    #[error(
        "provider {provider}: authorization parameter `{name}` is reserved (the broker sets it)"
    )]
    ReservedParameter {
        /// The provider alias.
        provider: String,
        /// The parameter's name.
        name: String,
    },
}

impl Error {
    /// A short, stable code for the error (used as the `error` field of JSON responses and in
    /// events).
    pub fn code(&self) -> &'static str {
        match self {
            Error::Forbidden => "forbidden",
            Error::NotFound { .. } => "not_found",
            Error::RelinkRequired { .. }
            | Error::NoRefreshToken { .. }
            | Error::AccountMismatch { .. } => "relink_required",
            Error::Unavailable { .. }
            | Error::RefreshInProgress { .. }
            | Error::RecordChanged { .. }
            | Error::WritePending { .. }
            | Error::ShuttingDown { .. } => "temporarily_unavailable",
            Error::AudienceNotAllowed { .. } | Error::NarrowedRefused { .. } => "invalid_scope",
            Error::InvalidAccessToken { .. } => "upstream_error",
            Error::UnknownProvider(_) | Error::InvalidId(_) => "invalid_request",
            Error::LoginRejected { .. } => "invalid_state",
            Error::IssuerMismatch { .. } => "invalid_request",
            Error::ScopesNotGranted { .. } => "invalid_scope",
            Error::AuthorizationDenied { .. } => "access_denied",
            Error::Provider { .. } => "upstream_error",
            Error::Store(_) | Error::Access(_) => "server_error",
            Error::Config(_) | Error::Internal(_) | Error::ReservedParameter { .. } => {
                "server_error"
            }
        }
    }
}
