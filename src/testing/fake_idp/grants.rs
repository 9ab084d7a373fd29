//! Codes, grants and tokens: code exchange, refresh with rotation and reuse detection, and
//! what introspection sees.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::id_token::{id_token_claims, signed_jwt, unsigned_jwt};
use super::modes::Flavor;
use super::protocol::{OAuthError, Params, ct_eq, split_scopes};
use super::state::{IdpState, Shared};

pub(super) type GrantId = u64;

pub(super) struct CodeRecord {
    pub(super) client_id: String,
    /// The `redirect_uri` parameter as sent to `/authorize`, if it was sent.
    pub(super) redirect_uri_param: Option<String>,
    pub(super) user: String,
    pub(super) scopes: Vec<String>,
    pub(super) nonce: Option<String>,
    pub(super) code_challenge: String,
    pub(super) issued: Instant,
    pub(super) used: bool,
    pub(super) grant: Option<GrantId>,
    /// Whether the exchange may carry a refresh token (decided by the flavor at `/authorize`).
    pub(super) offline: bool,
}

pub(super) struct Grant {
    pub(super) user: String,
    pub(super) client_id: String,
    pub(super) scopes: Vec<String>,
    pub(super) revoked: bool,
}

pub(super) struct AccessRecord {
    pub(super) grant: GrantId,
    pub(super) scopes: Vec<String>,
    pub(super) exp: u64,
    pub(super) revoked: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum RefreshStatus {
    Active,
    Consumed,
}

pub(super) struct RefreshRecord {
    pub(super) grant: GrantId,
    pub(super) status: RefreshStatus,
}

/// What `/introspect` reports about an active token.
pub(super) struct TokenInfo {
    pub(super) sub: String,
    pub(super) client_id: String,
    pub(super) scopes: Vec<String>,
    pub(super) exp: Option<u64>,
    pub(super) token_type: &'static str,
}

pub(super) fn token_info(st: &IdpState, token: &str) -> Option<TokenInfo> {
    if let Some(at) = st.access_tokens.get(token) {
        if at.revoked || st.grant_revoked(at.grant) || unix_now() >= at.exp {
            return None;
        }
        let grant = st.grants.get(&at.grant)?;
        return Some(TokenInfo {
            sub: grant.user.clone(),
            client_id: grant.client_id.clone(),
            scopes: at.scopes.clone(),
            exp: Some(at.exp),
            token_type: "Bearer",
        });
    }
    let rt = st.refresh_tokens.get(token)?;
    if rt.status != RefreshStatus::Active || st.grant_revoked(rt.grant) {
        return None;
    }
    let grant = st.grants.get(&rt.grant)?;
    Some(TokenInfo {
        sub: grant.user.clone(),
        client_id: grant.client_id.clone(),
        scopes: grant.scopes.clone(),
        exp: None,
        token_type: "refresh_token",
    })
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn random_token(prefix: &str) -> String {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("{prefix}{random}")
}

pub(super) fn exchange_code(
    shared: &Shared,
    st: &mut IdpState,
    form: &Params,
) -> Result<Map<String, Value>, OAuthError> {
    let code = form
        .get("code")
        .ok_or_else(|| OAuthError::invalid_request("code missing"))?;
    let Some(record) = st.codes.get_mut(code) else {
        return Err(OAuthError::invalid_grant("unknown authorization code"));
    };
    if record.client_id != shared.client_id {
        return Err(OAuthError::invalid_grant(
            "code was issued to another client",
        ));
    }
    if record.used {
        // RFC 6749 §4.1.2: a replayed code SHOULD revoke the tokens issued from it.
        let grant = record.grant;
        if let Some(grant) = grant {
            st.revoke_grant(grant);
        }
        return Err(OAuthError::invalid_grant("authorization code already used"));
    }
    // Any exchange attempt by the right client consumes the code, successful or not.
    record.used = true;
    if record.issued.elapsed() >= shared.code_ttl {
        return Err(OAuthError::invalid_grant("authorization code expired"));
    }
    match (&record.redirect_uri_param, form.get("redirect_uri")) {
        (Some(expected), Some(got)) if expected == got => {}
        (Some(_), _) => return Err(OAuthError::invalid_grant("redirect_uri mismatch")),
        (None, Some(_)) => return Err(OAuthError::invalid_grant("unexpected redirect_uri")),
        (None, None) => {}
    }
    let verifier = form
        .get("code_verifier")
        .ok_or_else(|| OAuthError::invalid_request("code_verifier missing"))?;
    let verifier_ok = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if !verifier_ok || !ct_eq(&computed, &record.code_challenge) {
        return Err(OAuthError::invalid_grant("PKCE verification failed"));
    }

    let grant_id = st.next_grant;
    st.next_grant += 1;
    record.grant = Some(grant_id);
    let grant = Grant {
        user: record.user.clone(),
        client_id: record.client_id.clone(),
        scopes: record.scopes.clone(),
        revoked: false,
    };
    let nonce = record.nonce.clone();
    let with_refresh = !st.knobs.omit_refresh_token && record.offline;
    let scopes = grant.scopes.clone();
    st.grants.insert(grant_id, grant);
    Ok(issue_tokens(
        shared,
        st,
        grant_id,
        &scopes,
        with_refresh,
        nonce.as_deref(),
    ))
}

pub(super) fn refresh(
    shared: &Shared,
    st: &mut IdpState,
    form: &Params,
) -> Result<Map<String, Value>, OAuthError> {
    let result = refresh_core(shared, st, form);
    match result {
        // Google gives one description for every dead refresh token, whatever the reason.
        Err(mut e) if shared.is_google() && e.error == "invalid_grant" => {
            e.description = "Token has been expired or revoked.".to_owned();
            Err(e)
        }
        other => other,
    }
}

fn refresh_core(
    shared: &Shared,
    st: &mut IdpState,
    form: &Params,
) -> Result<Map<String, Value>, OAuthError> {
    let token = form
        .get("refresh_token")
        .ok_or_else(|| OAuthError::invalid_request("refresh_token missing"))?;
    let Some(record) = st.refresh_tokens.get(token) else {
        return Err(OAuthError::invalid_grant("unknown refresh token"));
    };
    let (grant_id, status) = (record.grant, record.status);
    let Some(grant) = st.grants.get(&grant_id) else {
        return Err(OAuthError::invalid_grant("unknown refresh token"));
    };
    if grant.client_id != shared.client_id {
        return Err(OAuthError::invalid_grant(
            "refresh token was issued to another client",
        ));
    }
    if grant.revoked {
        return Err(OAuthError::invalid_grant(
            "Token has been expired or revoked.",
        ));
    }
    if status == RefreshStatus::Consumed {
        if st.knobs.reuse_detection {
            st.revoke_grant(grant_id);
            st.counters.reuse_detected += 1;
            return Err(OAuthError::invalid_grant(
                "refresh token reuse detected; the grant is revoked",
            ));
        }
        return Err(OAuthError::invalid_grant("refresh token already used"));
    }
    let scopes = match form.get("scope") {
        None => grant.scopes.clone(),
        Some(_) => {
            let requested = split_scopes(form.get("scope"));
            if let Some(extra) = requested.iter().find(|s| !grant.scopes.contains(s)) {
                return Err(OAuthError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_scope",
                    format!("scope {extra} was not granted"),
                ));
            }
            requested
        }
    };
    let rotate = st.knobs.rotate && !st.knobs.omit_refresh_token;
    if rotate
        && !st.knobs.keep_rotated
        && let Some(old) = st.refresh_tokens.get_mut(token)
    {
        old.status = RefreshStatus::Consumed;
    }
    st.counters.refresh_successes += 1;
    // No `nonce` on refresh: it belongs to the authentication request (OIDC Core §12.2).
    Ok(issue_tokens(shared, st, grant_id, &scopes, rotate, None))
}

/// Mints an access token (and a refresh token and ID token when due) for `grant_id`, and
/// builds the RFC 6749 §5.1 response. `nonce` is that of the authorization request, on code
/// exchange only.
pub(super) fn issue_tokens(
    shared: &Shared,
    st: &mut IdpState,
    grant_id: GrantId,
    scopes: &[String],
    with_refresh: bool,
    nonce: Option<&str>,
) -> Map<String, Value> {
    let now = unix_now();
    let ttl = st.knobs.access_token_ttl.as_secs();
    let access_token = random_token("at_");
    st.access_tokens.insert(
        access_token.clone(),
        AccessRecord {
            grant: grant_id,
            scopes: scopes.to_vec(),
            exp: now + ttl,
            revoked: false,
        },
    );
    let mut body = Map::new();
    body.insert("access_token".into(), access_token.into());
    body.insert("token_type".into(), "Bearer".into());
    body.insert("expires_in".into(), ttl.into());
    if matches!(shared.flavor, Flavor::Microsoft { .. }) {
        // Microsoft's "extended" lifetime, for resilience during outages; always a number.
        body.insert("ext_expires_in".into(), ttl.into());
    }
    if with_refresh {
        let refresh_token = random_token("rt_");
        st.refresh_tokens.insert(
            refresh_token.clone(),
            RefreshRecord {
                grant: grant_id,
                status: RefreshStatus::Active,
            },
        );
        body.insert("refresh_token".into(), refresh_token.into());
    }
    if !scopes.is_empty() {
        body.insert("scope".into(), scopes.join(" ").into());
    }
    if shared.issue_id_token
        && scopes.iter().any(|s| s == "openid")
        && let Some(grant) = st.grants.get(&grant_id)
    {
        let claims = id_token_claims(shared, grant, now, ttl, nonce);
        let id_token = if shared.sign_id_tokens {
            signed_jwt(st.keys.current(), &claims, st.tamper_this_response)
        } else {
            unsigned_jwt(&claims)
        };
        body.insert("id_token".into(), id_token.into());
    }
    body
}
