//! Reading token-endpoint answers: lenient where providers are sloppy, strict where it matters.
//!
//! Every answer is read here, whatever `oauth2` thought of it, because `oauth2` drops the HTTP
//! status and rejects shapes real providers send (`"expires_in": "3599"`, `"token_type":
//! "bearer"`, comma-separated scopes, GitHub's errors with HTTP 200).
//!
//! Nothing here puts a response value into an error: a malformed success body can still carry
//! tokens, so errors name the field, never its content.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value};

use super::{ProviderError, truncate_description};
use crate::ids::Scopes;
use crate::secret::Secret;
use crate::token::ProviderTokens;

/// Fields of RFC 6749 §5.1 (and common extensions) that the parser maps itself; every other
/// field lands in [`ProviderTokens::extras`].
const KNOWN_FIELDS: &[&str] = &[
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "id_token",
    "scope",
    "refresh_token_expires_in",
    "refresh_expires_in",
];

/// Reads a token-endpoint answer into tokens or a classified error.
///
/// - 429 and 5xx are [`ProviderError::Transient`] whatever the body says, with `Retry-After`
///   (in seconds) when sent.
/// - A JSON body with an `error` field is an error even with status 200 (GitHub).
/// - A 200 without a usable `access_token`, or a body that is not a JSON object, is
///   [`ProviderError::Protocol`].
///
/// ```
/// use http::{HeaderMap, StatusCode};
/// use tokenbroker::provider::parse_token_response;
///
/// let body = br#"{"access_token":"at","token_type":"bearer","expires_in":"3599","scope":"a,b"}"#;
/// let tokens = parse_token_response(StatusCode::OK, &HeaderMap::new(), body).unwrap();
/// assert_eq!(tokens.expires_in, Some(std::time::Duration::from_secs(3599)));
/// assert_eq!(tokens.token_type.as_deref(), Some("Bearer"));
/// ```
pub fn parse_token_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<ProviderTokens, ProviderError> {
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(ProviderError::Transient {
            status: Some(status.as_u16()),
            retry_after: retry_after(headers),
            reason: error_code_of(body),
            source: None,
        });
    }
    let protocol = |reason: String| ProviderError::Protocol {
        status: Some(status.as_u16()),
        reason,
    };
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        // serde_json's syntax messages give a position, not input.
        protocol(format!(
            "body is not JSON ({} at line {} column {})",
            category(&e),
            e.line(),
            e.column()
        ))
    })?;
    let Value::Object(obj) = value else {
        return Err(protocol("body is not a JSON object".into()));
    };
    if obj.contains_key("error") {
        return Err(classify_error_response(status.as_u16(), &obj));
    }
    if !status.is_success() {
        return Err(protocol("error status without an OAuth error body".into()));
    }
    tokens_from_object(obj).map_err(protocol)
}

fn category(e: &serde_json::Error) -> &'static str {
    match e.classify() {
        serde_json::error::Category::Eof => "truncated",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected data",
        serde_json::error::Category::Io => "read error",
    }
}

fn error_code_of(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("error")?.as_str().map(truncate_description)
}

/// Parses `Retry-After` given in seconds.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Classifies an OAuth error object (`{"error": ..., "error_description": ...}`).
///
/// `invalid_grant` and GitHub's `bad_refresh_token`/`bad_verification_code` mean the grant is
/// gone; `invalid_client`, `unauthorized_client` and GitHub's `incorrect_client_credentials`
/// mean our credentials are wrong; `temporarily_unavailable`, `server_error` and `slow_down`
/// are transient; anything else is [`ProviderError::Rejected`].
pub fn classify_error_response(status: u16, obj: &Map<String, Value>) -> ProviderError {
    let error = obj
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let description = obj
        .get("error_description")
        .and_then(Value::as_str)
        .map(truncate_description);
    match error.as_str() {
        "invalid_grant" | "bad_refresh_token" | "bad_verification_code" => {
            ProviderError::InvalidGrant { description }
        }
        "invalid_client" | "unauthorized_client" | "incorrect_client_credentials" => {
            ProviderError::InvalidClient { description }
        }
        "temporarily_unavailable" | "server_error" | "slow_down" => ProviderError::Transient {
            status: Some(status),
            retry_after: None,
            reason: Some(error),
            source: None,
        },
        "" => ProviderError::Protocol {
            status: Some(status),
            reason: "`error` is not a non-empty string".into(),
        },
        _ => ProviderError::Rejected {
            error: truncate_description(&error),
            description,
            status,
        },
    }
}

fn tokens_from_object(mut obj: Map<String, Value>) -> Result<ProviderTokens, String> {
    let access_token = match obj.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => Secret::new(s.clone()),
        Some(_) => return Err("`access_token` is not a non-empty string".into()),
        None => return Err("`access_token` is missing".into()),
    };
    let mut tokens = ProviderTokens::new(access_token);
    tokens.token_type = match obj.get("token_type") {
        None | Some(Value::Null) => None,
        // RFC 6749 §5.1: the value is case-insensitive; normalise the common one.
        Some(Value::String(s)) if s.eq_ignore_ascii_case("bearer") => Some("Bearer".into()),
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("`token_type` is not a string".into()),
    };
    tokens.expires_in = seconds(&obj, "expires_in")?;
    tokens.refresh_expires_in = match seconds(&obj, "refresh_token_expires_in")? {
        Some(d) => Some(d),
        // Keycloak says `refresh_expires_in`, with 0 meaning "no expiry".
        None => seconds(&obj, "refresh_expires_in")?.filter(|d| !d.is_zero()),
    };
    tokens.refresh_token = optional_secret(&obj, "refresh_token")?;
    tokens.id_token = optional_secret(&obj, "id_token")?;
    tokens.scopes = match obj.get("scope") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(Scopes::parse(s)),
        Some(Value::Array(items)) => Some(items.iter().filter_map(Value::as_str).collect()),
        Some(_) => return Err("`scope` is neither a string nor a list".into()),
    };
    for field in KNOWN_FIELDS {
        obj.remove(*field);
    }
    tokens.extras = obj.into_iter().collect::<BTreeMap<_, _>>();
    Ok(tokens)
}

fn optional_secret(obj: &Map<String, Value>, field: &str) -> Result<Option<Secret>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(Secret::new(s.clone()))),
        Some(_) => Err(format!("`{field}` is not a string")),
    }
}

/// A lifetime in seconds, given as a number or as a string of digits (Azure AD v1).
fn seconds(obj: &Map<String, Value>, field: &str) -> Result<Option<Duration>, String> {
    let bad = || format!("`{field}` is not a number of seconds");
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(s), _) => Ok(Some(Duration::from_secs(s))),
            (None, Some(f)) if f.is_finite() && (0.0..1e12).contains(&f) => {
                Ok(Some(Duration::from_secs(f as u64)))
            }
            _ => Err(bad()),
        },
        Some(Value::String(s)) => s
            .trim()
            .parse::<u64>()
            .map(|s| Some(Duration::from_secs(s)))
            .map_err(|_| bad()),
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(status: u16, body: &str) -> Result<ProviderTokens, ProviderError> {
        parse_token_response(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body.as_bytes(),
        )
    }

    #[test]
    fn reads_a_standard_answer() {
        let t = parse(
            200,
            r#"{"access_token":"at","token_type":"Bearer","expires_in":3600,"refresh_token":"rt",
                "scope":"openid email","id_token":"h.p.s","ext_expires_in":7200}"#,
        )
        .unwrap();
        assert_eq!(t.access_token.expose_secret(), "at");
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "rt");
        assert_eq!(t.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(t.scopes.unwrap().to_string(), "email openid");
        assert_eq!(t.extras["ext_expires_in"], 7200);
        assert!(!t.extras.contains_key("access_token"));
    }

    #[test]
    fn tolerates_odd_shapes() {
        let t = parse(
            200,
            r#"{"access_token":"at","expires_in":"3599","scope":"repo,gist"}"#,
        )
        .unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(3599)));
        assert_eq!(t.token_type, None);
        assert_eq!(t.scopes.unwrap().to_string(), "gist repo");
        let t = parse(
            200,
            r#"{"access_token":"at","token_type":"bearer","refresh_token":""}"#,
        )
        .unwrap();
        assert_eq!(t.token_type.as_deref(), Some("Bearer"));
        assert!(t.refresh_token.is_none());
    }

    #[test]
    fn classifies_errors() {
        assert!(matches!(
            parse(400, r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#),
            Err(ProviderError::InvalidGrant { description: Some(d) }) if d.contains("revoked")
        ));
        assert!(matches!(
            parse(401, r#"{"error":"invalid_client"}"#),
            Err(ProviderError::InvalidClient { .. })
        ));
        assert!(matches!(
            parse(200, r#"{"error":"bad_refresh_token"}"#),
            Err(ProviderError::InvalidGrant { .. })
        ));
        assert!(matches!(
            parse(400, r#"{"error":"invalid_scope"}"#),
            Err(ProviderError::Rejected { status: 400, .. })
        ));
        assert!(matches!(
            parse(503, "<html>down</html>"),
            Err(ProviderError::Transient {
                status: Some(503),
                ..
            })
        ));
        // A 5xx is transient even when its body claims a dead grant.
        assert!(matches!(
            parse(502, r#"{"error":"invalid_grant"}"#),
            Err(ProviderError::Transient { .. })
        ));
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "7".parse().unwrap());
        let e = parse_token_response(StatusCode::TOO_MANY_REQUESTS, &h, b"").unwrap_err();
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn malformed_answers_are_protocol_errors_without_content() {
        for body in [
            "garbage",
            r#"{"access_token":"secret-at","tok"#,
            r#"{"token_type":"Bearer"}"#,
            r#"{"access_token":12}"#,
            r#"{"access_token":"secret-at","expires_in":"soon"}"#,
            r#"{"access_token":"secret-at","refresh_token":{"x":1}}"#,
            "[]",
            "",
        ] {
            let err = parse(200, body).unwrap_err();
            assert!(
                matches!(err, ProviderError::Protocol { .. }),
                "{body}: {err:?}"
            );
            assert!(!err.to_string().contains("secret-at"), "{err}");
        }
        assert!(matches!(
            parse(400, "<html/>"),
            Err(ProviderError::Protocol {
                status: Some(400),
                ..
            })
        ));
    }
}
