//! Client authentication at `/token`, `/revoke`, `/introspect` and `/par`: the secret methods,
//! client assertions (RFC 7523) and public clients.

use axum::http::{HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use super::grants::unix_now;
use super::protocol::{OAuthError, Params, ct_eq, form_decode};
use super::state::{Shared, lock};
use crate::provider::ClientAuth;

/// Client authentication: `client_secret_basic` (RFC 6749 §2.3.1, id and secret
/// form-url-encoded before Base64) or `client_secret_post`, never both.
pub(super) fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    form: &Params,
) -> Result<(), OAuthError> {
    let method = shared.client_auth.method;
    if form.contains_key("client_assertion")
        || form.contains_key("client_assertion_type")
        || matches!(
            method,
            Some(ClientAuth::SecretJwt | ClientAuth::PrivateKeyJwt)
        )
    {
        return authenticate_assertion(shared, headers, form);
    }
    if method == Some(ClientAuth::None) {
        if headers.contains_key(header::AUTHORIZATION) || form.contains_key("client_secret") {
            return Err(OAuthError::invalid_client(
                "the client is registered with token_endpoint_auth_method none",
            ));
        }
        return match form.get("client_id") {
            Some(id) if ct_eq(id, &shared.client_id) => Ok(()),
            _ => Err(OAuthError::invalid_client("client authentication failed")),
        };
    }
    let used_basic = headers.contains_key(header::AUTHORIZATION);
    match (method, used_basic) {
        (Some(ClientAuth::Basic), false) | (Some(ClientAuth::Post), true) => {
            return Err(OAuthError::invalid_client(
                "the client is registered with another token_endpoint_auth_method",
            ));
        }
        _ => {}
    }
    let basic = match headers.get(header::AUTHORIZATION) {
        None => None,
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| OAuthError::invalid_client("malformed Authorization header"))?;
            let (scheme, creds) = value.split_once(' ').unwrap_or((value, ""));
            if !scheme.eq_ignore_ascii_case("basic") {
                return Err(OAuthError::invalid_client(
                    "unsupported authentication scheme",
                ));
            }
            let decoded = STANDARD
                .decode(creds.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))?;
            let (id, secret) = decoded
                .split_once(':')
                .ok_or_else(|| OAuthError::invalid_client("malformed Basic credentials"))?;
            let id = form_decode(id);
            let secret = form_decode(secret);
            match (id, secret) {
                (Some(id), Some(secret)) => Some((id, secret)),
                _ => return Err(OAuthError::invalid_client("malformed Basic credentials")),
            }
        }
    };
    let (id, secret) = match basic {
        Some((id, secret)) => {
            if form.contains_key("client_secret") {
                return Err(OAuthError::invalid_request(
                    "more than one client authentication method",
                ));
            }
            if form.get("client_id").is_some_and(|body_id| *body_id != id) {
                return Err(OAuthError::invalid_client("client_id mismatch"));
            }
            (id, secret)
        }
        None => match (form.get("client_id"), form.get("client_secret")) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone()),
            _ => return Err(OAuthError::invalid_client("client authentication required")),
        },
    };
    // Evaluate both comparisons so the answer does not say which part was wrong.
    let id_ok = ct_eq(&id, &shared.client_id);
    let secret_ok = ct_eq(&secret, &shared.client_secret);
    if id_ok && secret_ok {
        Ok(())
    } else {
        Err(OAuthError::invalid_client("client authentication failed"))
    }
}

/// `client_secret_jwt` and `private_key_jwt` (RFC 7523 §2.2 and §3).
fn authenticate_assertion(
    shared: &Shared,
    headers: &HeaderMap,
    form: &Params,
) -> Result<(), OAuthError> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let method = shared.client_auth.method;
    if !matches!(
        method,
        Some(ClientAuth::SecretJwt | ClientAuth::PrivateKeyJwt)
    ) {
        return Err(OAuthError::invalid_client(
            "the client is not registered for client assertions",
        ));
    }
    let has_assertion =
        form.contains_key("client_assertion") || form.contains_key("client_assertion_type");
    let has_other =
        headers.contains_key(header::AUTHORIZATION) || form.contains_key("client_secret");
    if has_assertion && has_other {
        return Err(OAuthError::invalid_request(
            "more than one client authentication method",
        ));
    }
    if !has_assertion {
        return Err(OAuthError::invalid_client(
            "the client is registered for a client assertion",
        ));
    }
    if form.get("client_assertion_type").map(String::as_str)
        != Some(crate::provider::CLIENT_ASSERTION_TYPE)
    {
        return Err(OAuthError::invalid_client(
            "client_assertion_type missing or unsupported",
        ));
    }
    let assertion = form
        .get("client_assertion")
        .ok_or_else(|| OAuthError::invalid_client("client_assertion missing"))?;
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| OAuthError::invalid_client("malformed client assertion"))?;
    let (key, algorithms) = if method == Some(ClientAuth::SecretJwt) {
        (
            DecodingKey::from_secret(shared.client_secret.as_bytes()),
            vec![Algorithm::HS256],
        )
    } else {
        let pem = shared
            .client_auth
            .public_key_pem
            .as_deref()
            .ok_or_else(|| OAuthError::invalid_client("no public key registered"))?;
        if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
            (key, vec![Algorithm::ES256])
        } else if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
            (key, vec![Algorithm::RS256, Algorithm::PS256])
        } else {
            return Err(OAuthError::invalid_client(
                "the registered public key is unusable",
            ));
        }
    };
    if !algorithms.contains(&header.alg) {
        return Err(OAuthError::invalid_client(
            "client assertion algorithm not allowed",
        ));
    }
    let audiences = match &shared.client_auth.assertion_audience {
        Some(aud) => vec![aud.clone()],
        None => vec![format!("{}/token", shared.base), shared.issuer.clone()],
    };
    let mut validation = Validation::new(header.alg);
    validation.algorithms = algorithms;
    validation.leeway = 5;
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.set_issuer(&[&shared.client_id]);
    validation.set_audience(&audiences);
    let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
        .map_err(|_| OAuthError::invalid_client("client assertion rejected"))?
        .claims;
    if claims["sub"].as_str() != Some(shared.client_id.as_str()) {
        return Err(OAuthError::invalid_client(
            "client assertion sub is not the client",
        ));
    }
    if form
        .get("client_id")
        .is_some_and(|id| *id != shared.client_id)
    {
        return Err(OAuthError::invalid_client("client_id mismatch"));
    }
    let now = unix_now();
    let exp = claims["exp"].as_u64().unwrap_or(0);
    if exp > now + 300 {
        return Err(OAuthError::invalid_client(
            "client assertion lives too long",
        ));
    }
    let jti = claims["jti"]
        .as_str()
        .filter(|j| !j.is_empty())
        .ok_or_else(|| OAuthError::invalid_client("client assertion has no jti"))?;
    if !lock(&shared.seen_assertion_ids).insert(jti.to_owned()) {
        return Err(OAuthError::invalid_client("client assertion replayed"));
    }
    Ok(())
}
