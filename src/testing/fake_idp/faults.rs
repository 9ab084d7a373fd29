//! One-shot misbehaviour of `/token` (and `/par`): [`Fault`] and the answers it gets.

use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[cfg(doc)]
use super::FakeIdp;
use super::protocol::{OAuthError, json_response, raw_response};
use super::server::ConnTag;

/// A one-shot misbehaviour of the `/token` endpoint, queued with [`FakeIdp::inject`].
///
/// Faults are consumed first in, first out, one per `/token` request, whatever the request is
/// (even a malformed one). A faulted request does not touch grant state: a refresh token
/// presented in a faulted request is not consumed. Three faults answer normally and so do change
/// state: [`Fault::Delay`] (after its sleep), [`Fault::ExpiresInAsString`] and
/// [`Fault::TamperedIdToken`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this status and body (e.g. a 503 HTML page, or 429 with `Retry-After`).
    /// The Content-Type is `application/json` if the body starts with `{` or `[`, else
    /// `text/html`. A status outside 100..=999 is sent as 500.
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body, sent as is.
        body: String,
        /// Value of a `Retry-After` header in seconds, if any.
        retry_after: Option<u64>,
    },
    /// Sleep this long, then process the request and answer normally (time-out tests).
    /// The request is processed only after the sleep: a client that gives up earlier leaves
    /// the grant untouched.
    Delay(Duration),
    /// `200` with `Content-Type: application/json` and a body that is not JSON.
    GarbageBody,
    /// `200` with `Content-Type: application/json` and the body `{"access_token":"x","tok`.
    TruncatedJson,
    /// `400 {"error":"invalid_grant","error_description":"..."}`, without touching state.
    InvalidGrant,
    /// GitHub style: `200 {"error": error, "error_description": "..."}`.
    ErrorWith200 {
        /// The `error` code to send, e.g. `bad_verification_code`.
        error: String,
    },
    /// Process the request normally, but if it succeeds send `"expires_in":"3599"`-style
    /// (the number as a JSON string), as Azure AD v1 does.
    ExpiresInAsString,
    /// Close the connection without sending any response byte. The request is not processed.
    DropConnection,
    /// A body that stalls after prompt headers: `200` with `Content-Type: application/json`
    /// and the `Content-Length` of a complete token answer are sent at once, then the body
    /// `chunk_len` bytes at a time, waiting `pause` before every later chunk. The body never
    /// completes: after a last `pause`, the connection is closed before its final byte,
    /// however long the client waits. A client sees the status and headers right away and
    /// must bound the body read with its own time-out; `chunk_len: usize::MAX` sends all but
    /// the last byte at once and then stalls for one `pause`.
    ///
    /// Like [`Fault::DropConnection`], the request is not processed: the refresh token (or
    /// code) it presents is not consumed, the grant is not rotated, and the token-shaped body
    /// holds placeholder tokens that were never issued. A real IdP that has begun a `200`
    /// answer has usually rotated already ("rotated, answer lost": the client can only carry
    /// on if the IdP accepts the old refresh token for a while); this fault does not model
    /// that case.
    SlowBody {
        /// Body bytes per write (0 counts as 1).
        chunk_len: usize,
        /// The wait before each chunk after the first, and before the connection is closed.
        pause: Duration,
    },
    /// Process the request normally, but if the answer carries an `id_token`, alter its payload
    /// after signing (the `sub` changes), so its signature no longer verifies. See also
    /// [`FakeIdp::issue_tampered_id_tokens`].
    TamperedIdToken,
}

pub(super) fn fault_response(fault: Fault, conn: &ConnTag) -> Response {
    match fault {
        Fault::Status {
            status,
            body,
            retry_after,
        } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let trimmed = body.trim_start();
            let content_type = if trimmed.starts_with('{') || trimmed.starts_with('[') {
                "application/json"
            } else {
                "text/html; charset=utf-8"
            };
            let mut resp = raw_response(status, content_type, body);
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            resp
        }
        Fault::GarbageBody => raw_response(
            StatusCode::OK,
            "application/json",
            "<html><body>this is not JSON</body></html>".to_owned(),
        ),
        Fault::TruncatedJson => raw_response(
            StatusCode::OK,
            "application/json",
            r#"{"access_token":"x","tok"#.to_owned(),
        ),
        Fault::InvalidGrant => {
            OAuthError::invalid_grant("injected fault: invalid_grant").into_response()
        }
        Fault::ErrorWith200 { error } => json_response(
            StatusCode::OK,
            &json!({ "error": error, "error_description": "injected fault: error with status 200" }),
        ),
        Fault::DropConnection => {
            // The connection's writer fails from now on, so hyper closes the socket without
            // having sent a byte of this response.
            conn.kill.store(true, Ordering::SeqCst);
            Response::new(Body::empty())
        }
        Fault::SlowBody { chunk_len, pause } => slow_body_response(chunk_len, pause),
        // Answered normally by the caller.
        Fault::Delay(_) | Fault::ExpiresInAsString | Fault::TamperedIdToken => OAuthError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "unreachable",
        )
        .into_response(),
    }
}

/// The answer of [`Fault::SlowBody`]: headers at once, then a body that never completes.
fn slow_body_response(chunk_len: usize, pause: Duration) -> Response {
    // Token-shaped, so that the Content-Length is that of a plausible answer; never issued.
    let full = Bytes::from(
        json!({
            "access_token": "slow-body-placeholder-never-issued",
            "token_type": "Bearer",
            "expires_in": 3600,
            "refresh_token": "slow-body-placeholder-never-issued",
        })
        .to_string(),
    );
    let declared = full.len();
    // The last byte is never sent.
    let sendable = full.slice(..declared - 1);
    let chunk_len = chunk_len.max(1);
    // State: the bytes still to send, and whether one chunk has gone out.
    let chunks =
        futures_util::stream::unfold((sendable, false), move |(mut rest, started)| async move {
            if started {
                tokio::time::sleep(pause).await;
            }
            if rest.is_empty() {
                // hyper aborts the connection on a body error: the body stays one byte short.
                return Some((
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "fake IdP stalled the body (Fault::SlowBody)",
                    )),
                    (rest, true),
                ));
            }
            let chunk = rest.split_to(chunk_len.min(rest.len()));
            Some((Ok(chunk), (rest, true)))
        });
    let mut resp = Response::new(Body::from_stream(chunks));
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}
