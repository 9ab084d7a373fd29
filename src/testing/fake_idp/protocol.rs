//! Request parsing and OAuth error answers, shared by every endpoint.

use std::collections::HashMap;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

/// An OAuth error answered as JSON (RFC 6749 §5.2).
pub(super) struct OAuthError {
    pub(super) status: StatusCode,
    pub(super) error: &'static str,
    pub(super) description: String,
}

impl OAuthError {
    pub(super) fn new(
        status: StatusCode,
        error: &'static str,
        description: impl Into<String>,
    ) -> Self {
        Self {
            status,
            error,
            description: description.into(),
        }
    }
    pub(super) fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }
    pub(super) fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }
    pub(super) fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.error, "error_description": self.description });
        let mut resp = json_response(self.status, &body);
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fake-idp\""),
            );
        }
        resp
    }
}

pub(super) fn json_response(status: StatusCode, body: &Value) -> Response {
    raw_response(status, "application/json", body.to_string())
}

pub(super) fn raw_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response {
    let mut resp = (status, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

pub(super) type Params = HashMap<String, String>;

/// Parses `application/x-www-form-urlencoded` data. Empty values count as absent
/// (RFC 6749 §3.1); a repeated parameter is an error (§3.1, §3.2).
pub(super) fn parse_params(data: &[u8]) -> Result<Params, OAuthError> {
    let mut params = Params::new();
    for (k, v) in url::form_urlencoded::parse(data) {
        if v.is_empty() {
            continue;
        }
        if params
            .insert(k.clone().into_owned(), v.into_owned())
            .is_some()
        {
            return Err(OAuthError::invalid_request(format!(
                "parameter {k} repeated"
            )));
        }
    }
    Ok(params)
}

pub(super) fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<Params, OAuthError> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';').next().is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    if !is_form {
        return Err(OAuthError::invalid_request(
            "body must be application/x-www-form-urlencoded",
        ));
    }
    parse_params(body)
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space).
pub(super) fn form_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

pub(super) fn ct_eq(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub(super) fn split_scopes(scope: Option<&String>) -> Vec<String> {
    let mut scopes: Vec<String> = Vec::new();
    for s in scope.map(String::as_str).unwrap_or("").split(' ') {
        if !s.is_empty() && !scopes.iter().any(|x| x == s) {
            scopes.push(s.to_owned());
        }
    }
    scopes
}
