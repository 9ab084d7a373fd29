//! Caller authentication: from an HTTP request (or a token given in a body) to a
//! [`tokenbroker::Caller`], or one uniform [`Unauthenticated`] rejection.
//!
//! The router answers every rejection with the same `401` and `WWW-Authenticate: Bearer`
//! ([`tokenbroker::BrokerResponse::unauthenticated`]), so a caller cannot probe which check
//! failed; the reason only reaches `tracing` at debug level, never with the token.

mod jwks;
mod jwt;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use tokenbroker::Caller;

pub use jwt::{ConfigError, JwtAuthenticator, JwtAuthenticatorBuilder};

/// Turns a request into the [`Caller`] behind it.
///
/// # Contract
/// - Every failure is the same [`Unauthenticated`]; implementations log the reason (without
///   the token) rather than putting it in the answer.
/// - `authenticate` reads only the headers; the body is the router's.
#[async_trait]
pub trait CallerAuthenticator: Send + Sync + 'static {
    /// The caller of a request, from its headers (e.g. `Authorization: Bearer`).
    async fn authenticate(&self, parts: &http::request::Parts) -> Result<Caller, Unauthenticated>;

    /// The caller named by a bearer token given in a body (the RFC 8693 `subject_token`).
    async fn authenticate_token(&self, token: &str) -> Result<Caller, Unauthenticated>;
}

// The router holds its authenticator as `Arc<dyn CallerAuthenticator>`; this lets that Arc
// be passed wherever an authenticator is expected.
#[async_trait]
impl<T: CallerAuthenticator + ?Sized> CallerAuthenticator for Arc<T> {
    async fn authenticate(&self, parts: &http::request::Parts) -> Result<Caller, Unauthenticated> {
        (**self).authenticate(parts).await
    }

    async fn authenticate_token(&self, token: &str) -> Result<Caller, Unauthenticated> {
        (**self).authenticate_token(token).await
    }
}

/// The request's caller could not be authenticated.
///
/// Deliberately says nothing more to the caller: its [`Display`](fmt::Display) is the same for
/// every reason. The reason is kept for logs (visible in [`Debug`](fmt::Debug)) and never
/// holds the token.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request's caller could not be authenticated")]
#[non_exhaustive]
pub struct Unauthenticated {
    reason: Reason,
}

impl Unauthenticated {
    /// A rejection from a host's own [`CallerAuthenticator`]. `reason` goes to logs only; it
    /// is a `&'static str` so that no token or claim can end up in it by accident.
    pub fn new(reason: &'static str) -> Self {
        Unauthenticated {
            reason: Reason::Other(reason),
        }
    }

    pub(crate) fn because(reason: Reason) -> Self {
        Unauthenticated { reason }
    }
}

impl fmt::Debug for Unauthenticated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Unauthenticated")
            .field("reason", &self.reason)
            .finish()
    }
}

/// Why a caller was rejected. Carries no token, claim value or key material, only which
/// check failed, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reason {
    /// No `Authorization` header.
    MissingHeader,
    /// More than one `Authorization` header: which one counts would be ambiguous.
    DuplicateHeader,
    /// The header is not `Bearer <token>`.
    NotBearer,
    /// The token is empty or longer than we are willing to parse.
    BadTokenSize,
    /// The token is not a JWS in compact form, or its header or claims do not parse.
    Malformed,
    /// The header names critical extensions, none of which we understand (RFC 7515 4.1.11).
    CriticalHeader,
    /// The header's `alg` is not in the allow-list.
    AlgorithmNotAllowed,
    /// No key with the token's `kid` (after the re-fetch we were allowed).
    UnknownKey,
    /// The token has no `kid` and not exactly one allowed key fits its `alg`.
    AmbiguousKey,
    /// The key with the token's `kid` is of another type, or its JWK `alg` differs.
    KeyMismatch,
    /// The signature does not verify.
    BadSignature,
    /// `exp` is past, beyond the leeway.
    Expired,
    /// `nbf` is ahead, beyond the leeway.
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    WrongAudience,
    /// A required claim is missing (`exp`, `iss`, `aud`, `sub`, or the client id).
    MissingClaim(&'static str),
    /// `sub` is not a valid [`tokenbroker::Subject`].
    InvalidSubject,
    /// Another failure of the token's verification.
    Invalid,
    /// A host authenticator's own reason.
    Other(&'static str),
}

/// The token of an `Authorization: Bearer <token>` header.
///
/// Exactly one `Authorization` header is accepted, the scheme is matched case-insensitively,
/// and the token must be non-empty. Anything else is [`Unauthenticated`].
///
/// ```
/// let (parts, ()) = http::Request::builder()
///     .header("authorization", "bearer abc.def.ghi")
///     .body(())
///     .unwrap()
///     .into_parts();
/// assert_eq!(tokenbroker_axum::auth::bearer_token(&parts).unwrap(), "abc.def.ghi");
/// ```
pub fn bearer_token(parts: &http::request::Parts) -> Result<&str, Unauthenticated> {
    let mut values = parts.headers.get_all(http::header::AUTHORIZATION).iter();
    let value = values
        .next()
        .ok_or(Unauthenticated::because(Reason::MissingHeader))?;
    if values.next().is_some() {
        return Err(Unauthenticated::because(Reason::DuplicateHeader));
    }
    let value = value
        .to_str()
        .map_err(|_| Unauthenticated::because(Reason::NotBearer))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(Unauthenticated::because(Reason::NotBearer))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Unauthenticated::because(Reason::NotBearer));
    }
    // RFC 6750 allows one or more spaces after the scheme; the token itself has none.
    let token = token.trim_start_matches(' ');
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(Unauthenticated::because(Reason::NotBearer));
    }
    Ok(token)
}
