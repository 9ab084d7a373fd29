//! `POST /token`, `/revoke` (RFC 7009) and `/introspect` (RFC 7662).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::client_auth::authenticate;
use super::faults::{Fault, fault_response};
use super::grants::{exchange_code, refresh, token_info};
use super::modes::Flavor;
use super::protocol::{OAuthError, json_response, parse_form};
use super::server::ConnTag;
use super::state::Shared;

pub(super) async fn token_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnTag>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&headers, &body);
    let (fault, delay) = {
        let mut st = shared.lock();
        st.counters.token_requests += 1;
        let grant_type = form.as_ref().ok().and_then(|f| f.get("grant_type"));
        match grant_type.map(String::as_str) {
            Some("authorization_code") => st.counters.code_exchanges += 1,
            Some("refresh_token") => st.counters.refresh_calls += 1,
            _ => {}
        }
        (st.faults.pop_front(), st.knobs.token_delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut expires_in_as_string = false;
    let mut tamper = false;
    match fault {
        None => {}
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::ExpiresInAsString) => expires_in_as_string = true,
        Some(Fault::TamperedIdToken) => tamper = true,
        Some(fault) => return fault_response(fault, &conn),
    }
    let result = form.and_then(|form| {
        let mut st = shared.lock();
        authenticate(&shared, &headers, &form)?;
        // Read by `issue_tokens` for this request only.
        st.tamper_this_response = tamper || st.knobs.tamper_id_tokens;
        let result = match form.get("grant_type").map(String::as_str) {
            Some("authorization_code") => exchange_code(&shared, &mut st, &form),
            Some("refresh_token") => refresh(&shared, &mut st, &form),
            Some(_) => Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type not supported",
            )),
            None => Err(OAuthError::invalid_request("grant_type missing")),
        };
        st.tamper_this_response = false;
        result
    });
    match result {
        Ok(mut body) => {
            if expires_in_as_string && let Some(e) = body.get_mut("expires_in") {
                *e = Value::String(e.to_string());
            }
            json_response(StatusCode::OK, &Value::Object(body))
        }
        Err(e) => e.into_response(),
    }
}

pub(super) async fn revoke_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = shared.lock();
    st.counters.revocations += 1;
    if matches!(shared.flavor, Flavor::Microsoft { .. }) {
        // Microsoft has no token revocation endpoint.
        return StatusCode::NOT_FOUND.into_response();
    }
    let google = shared.is_google();
    let result = parse_form(&headers, &body).and_then(|form| {
        // Google's endpoint takes just the token; credentials, if sent, must still be right.
        let sent_credentials = headers.contains_key(header::AUTHORIZATION)
            || form.contains_key("client_id")
            || form.contains_key("client_secret");
        if !google || sent_credentials {
            authenticate(&shared, &headers, &form)?;
        }
        let token = form
            .get("token")
            .ok_or_else(|| OAuthError::invalid_request("token missing"))?;
        // `token_type_hint` is only a hint (RFC 7009 §2.1): both kinds are looked up.
        let grant = if let Some(at) = st.access_tokens.get_mut(token) {
            at.revoked = true;
            // Google revokes the whole grant whichever token is presented.
            google.then_some(at.grant)
        } else {
            st.refresh_tokens.get(token).map(|rt| rt.grant)
        };
        if let Some(grant) = grant {
            st.revoke_grant(grant);
            if google && let Some(user) = st.grants.get(&grant).map(|g| g.user.clone()) {
                // Revocation removes the app's access: the next login is a first consent.
                st.consents.remove(&user);
            }
        }
        Ok(())
    });
    match result {
        // Unknown tokens are answered with 200 too (RFC 7009 §2.2).
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    }
}

pub(super) async fn introspect_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = shared.lock();
    st.counters.introspections += 1;
    let result = parse_form(&headers, &body).and_then(|form| {
        authenticate(&shared, &headers, &form)?;
        let token = form
            .get("token")
            .ok_or_else(|| OAuthError::invalid_request("token missing"))?;
        Ok(match token_info(&st, token) {
            None => json!({ "active": false }),
            Some(info) => {
                let mut body = json!({
                    "active": true,
                    "sub": info.sub,
                    "client_id": info.client_id,
                    "scope": info.scopes.join(" "),
                    "token_type": info.token_type,
                });
                if let Some(exp) = info.exp {
                    body["exp"] = exp.into();
                }
                body
            }
        })
    });
    match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(e) => e.into_response(),
    }
}
