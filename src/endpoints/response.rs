//! [`BrokerResponse`]: an HTTP answer any framework can send as it is, and how errors map to it.

use std::fmt;

use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::error::Error;

/// An HTTP answer for a framework adapter to send as it is.
///
/// The body of a `200` holds tokens: `Debug` shows only its length.
#[derive(Clone)]
#[non_exhaustive]
pub struct BrokerResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers (`Content-Type`, `Cache-Control: no-store`, `Pragma: no-cache`, and
    /// `Retry-After` / `WWW-Authenticate` where they apply).
    pub headers: HeaderMap,
    /// The JSON body.
    pub body: Vec<u8>,
}

impl fmt::Debug for BrokerResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field(
                "body",
                &format_args!("[redacted; {} bytes]", self.body.len()),
            )
            .finish()
    }
}

impl BrokerResponse {
    /// Converts into an `http::Response`.
    pub fn into_http(self) -> http::Response<Vec<u8>> {
        let mut response = http::Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }

    /// The body as JSON (for tests and adapters that re-encode).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A JSON answer with the broker's headers (`Content-Type: application/json`,
    /// `Cache-Control: no-store`, `Pragma: no-cache`).
    pub fn json_body(status: StatusCode, body: &Value) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        let body = serde_json::to_vec(body).expect("a JSON value always serializes");
        BrokerResponse {
            status,
            headers,
            body,
        }
    }

    /// An OAuth-style error answer (`{"error", "error_description"}`) with the broker's
    /// no-store headers, for adapter routes the broker has no handler for.
    pub fn error(status: StatusCode, error: &str, description: &str) -> Self {
        BrokerResponse::json_body(
            status,
            &json!({ "error": error, "error_description": description }),
        )
    }

    /// The answer for an error, with a status that fits it. Descriptions are generic where
    /// detail would leak: a denied caller learns nothing about the link.
    pub fn from_error(error: &Error) -> Self {
        let (status, description) = match error {
            Error::Forbidden => (
                StatusCode::FORBIDDEN,
                "the caller may not read this provider's tokens".to_owned(),
            ),
            Error::NotFound { .. } | Error::UnknownProvider(_) => (
                StatusCode::NOT_FOUND,
                "no tokens are stored for this user and provider".to_owned(),
            ),
            Error::RelinkRequired { reason, .. } => (
                StatusCode::CONFLICT,
                format!("the user must link the provider again: {reason}"),
            ),
            Error::AccountMismatch { .. } => (
                StatusCode::CONFLICT,
                "the provider's tokens name another account; the user must link again".to_owned(),
            ),
            Error::NoRefreshToken { .. } => (
                StatusCode::CONFLICT,
                "the token expired and cannot be refreshed; the user must link again".to_owned(),
            ),
            Error::Unavailable { .. } | Error::Provider { .. } => (
                StatusCode::BAD_GATEWAY,
                "the identity provider could not refresh the token; try again later".to_owned(),
            ),
            Error::RefreshInProgress { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "a refresh is in progress; try again shortly".to_owned(),
            ),
            Error::RecordChanged { .. }
            | Error::WritePending { .. }
            | Error::ShuttingDown { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the tokens are being updated; try again shortly".to_owned(),
            ),
            Error::InvalidAccessToken { .. } => (
                StatusCode::BAD_GATEWAY,
                "the identity provider issued an unusable access token".to_owned(),
            ),
            Error::AudienceNotAllowed { .. } => (
                StatusCode::FORBIDDEN,
                "tokens for this audience may not be requested".to_owned(),
            ),
            Error::NarrowedRefused { .. } => (
                StatusCode::FORBIDDEN,
                "the identity provider refused a token for these scopes".to_owned(),
            ),
            Error::InvalidId(e) => (StatusCode::BAD_REQUEST, e.to_string()),
            Error::LoginRejected { reason } => (StatusCode::BAD_REQUEST, (*reason).to_owned()),
            Error::IssuerMismatch { missing: false, .. } => (
                StatusCode::BAD_REQUEST,
                "the authorization response's issuer (iss) is not the provider's (RFC 9207)"
                    .to_owned(),
            ),
            Error::IssuerMismatch { missing: true, .. } => (
                StatusCode::BAD_REQUEST,
                "the authorization response has no issuer (iss) although the provider sends one \
                 (RFC 9207)"
                    .to_owned(),
            ),
            Error::AuthorizationDenied { .. } => (
                StatusCode::BAD_REQUEST,
                "the user or provider refused the authorization".to_owned(),
            ),
            Error::ScopesNotGranted { missing, .. } => (
                StatusCode::FORBIDDEN,
                format!("the user has not granted: {missing}"),
            ),
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error".to_owned(),
            ),
        };
        let mut response = BrokerResponse::error(status, error.code(), &description);
        let retry_after = match error {
            Error::Unavailable { retry_after, .. } => *retry_after,
            Error::RefreshInProgress { .. }
            | Error::RecordChanged { .. }
            | Error::WritePending { .. }
            | Error::ShuttingDown { .. } => Some(std::time::Duration::from_secs(1)),
            _ => None,
        };
        if let Some(after) = retry_after {
            let secs = after.as_secs().max(1);
            response
                .headers
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }

    /// The `401` (with `WWW-Authenticate: Bearer`) for a request whose caller could not be
    /// authenticated.
    pub fn unauthenticated() -> Self {
        let mut response = BrokerResponse::error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "a valid bearer token is required",
        );
        response
            .headers
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    }
}
