//! `GET /authorize` and [`FakeIdp::authorize`](super::FakeIdp::authorize): the authorization
//! step, consent, and the code it issues.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{RawQuery, State as AxumState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use url::Url;

use super::grants::{CodeRecord, random_token};
use super::modes::Flavor;
use super::par::resolve_request_uri;
use super::protocol::{Params, ct_eq, parse_params, split_scopes};
use super::state::{IdpState, Shared};
use super::{AuthorizationCallback, FakeIdpError};

pub(super) async fn authorize_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Response {
    let result = {
        let mut st = shared.lock();
        st.counters.authorize_requests += 1;
        match parse_params(query.as_deref().unwrap_or("").as_bytes()) {
            Ok(params) => authorize_core(&shared, &mut st, &params, None),
            Err(e) => Err(FakeIdpError::BadRequest {
                description: e.description,
            }),
        }
    };
    match result {
        Ok(cb) => redirect(&cb.redirect_url),
        Err(FakeIdpError::Redirected { redirect_url, .. }) => redirect(&redirect_url),
        Err(FakeIdpError::BadRequest { description }) => (
            StatusCode::BAD_REQUEST,
            Html(format!(
                "<!doctype html><title>Bad request</title><h1>Bad request</h1><p>{}</p>",
                html_escape(&description)
            )),
        )
            .into_response(),
    }
}

fn redirect(url: &Url) -> Response {
    let mut resp = StatusCode::FOUND.into_response();
    if let Ok(location) = HeaderValue::from_str(url.as_str()) {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The checks of RFC 6749 §4.1.1 and RFC 7636 §4.4, shared by `GET /authorize` and
/// [`FakeIdp::authorize`]. The caller counts the request.
#[expect(
    clippy::result_large_err,
    reason = "a rare test-helper error; keeping `Url` unboxed reads better"
)]
pub(super) fn authorize_core(
    shared: &Shared,
    st: &mut IdpState,
    params: &Params,
    user: Option<&str>,
) -> Result<AuthorizationCallback, FakeIdpError> {
    let bad = |description: &str| FakeIdpError::BadRequest {
        description: description.to_owned(),
    };
    let pushed = resolve_request_uri(shared, st, params)?;
    let params = pushed.as_ref().unwrap_or(params);
    let iss = shared
        .login_extensions
        .iss_in_response
        .then(|| shared.issuer.clone());
    // Errors about the client or the redirect URI must not redirect (§4.1.2.1).
    let client_id = params
        .get("client_id")
        .ok_or_else(|| bad("client_id missing"))?;
    if !ct_eq(client_id, &shared.client_id) {
        return Err(bad("unknown client_id"));
    }
    let redirect_param = params.get("redirect_uri");
    let redirect_uri = match redirect_param {
        Some(raw) => {
            let url = Url::parse(raw).map_err(|_| bad("redirect_uri is not an absolute URL"))?;
            if url.fragment().is_some() {
                return Err(bad("redirect_uri must not have a fragment"));
            }
            if !shared.redirect_uris.is_empty() && !shared.redirect_uris.contains(&url) {
                return Err(bad("redirect_uri is not registered"));
            }
            url
        }
        None => match shared.redirect_uris.as_slice() {
            [only] => only.clone(),
            _ => return Err(bad("redirect_uri missing")),
        },
    };

    let state = params.get("state").cloned();
    let error_redirect = |error: &str, description: &str| {
        let mut url = redirect_uri.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("error", error)
                .append_pair("error_description", description);
            if let Some(state) = &state {
                q.append_pair("state", state);
            }
            if let Some(iss) = &iss {
                q.append_pair("iss", iss);
            }
        }
        FakeIdpError::Redirected {
            error: error.to_owned(),
            description: description.to_owned(),
            state: state.clone(),
            redirect_url: url,
        }
    };
    match params.get("response_type").map(String::as_str) {
        Some("code") => {}
        None => return Err(error_redirect("invalid_request", "response_type missing")),
        Some(_) => {
            return Err(error_redirect(
                "unsupported_response_type",
                "only code is supported",
            ));
        }
    }
    let Some(state) = state.clone() else {
        return Err(error_redirect(
            "invalid_request",
            "state missing (this fake requires it)",
        ));
    };
    let Some(challenge) = params.get("code_challenge") else {
        return Err(error_redirect(
            "invalid_request",
            "PKCE code_challenge required",
        ));
    };
    if params.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return Err(error_redirect(
            "invalid_request",
            "code_challenge_method must be S256",
        ));
    }
    let well_formed = challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(error_redirect(
            "invalid_request",
            "code_challenge must be 43 base64url characters",
        ));
    }
    if st.knobs.deny_consent {
        return Err(error_redirect("access_denied", "the user denied consent"));
    }

    let user = user
        .map(str::to_owned)
        .or_else(|| params.get("login_hint").cloned())
        .unwrap_or_else(|| shared.default_user.clone());

    // Consent: remembered per user, as the union of everything consented to.
    let requested = split_scopes(params.get("scope"));
    let prompt = params.get("prompt");
    let forced_consent = prompt.is_some_and(|p| p.split(' ').any(|v| v == "consent"));
    if forced_consent {
        st.counters.consent_prompts += 1;
    }
    st.last_prompt = prompt.cloned();
    let first_consent = !st.consents.contains_key(&user);
    let consented = st.consents.entry(user.clone()).or_default();
    let earlier = consented.clone();
    for scope in &requested {
        if !consented.contains(scope) {
            consented.push(scope.clone());
        }
    }
    let incremental = shared.is_google()
        && params.get("include_granted_scopes").map(String::as_str) == Some("true");
    let scopes = if incremental {
        let mut union = earlier;
        for scope in requested {
            if !union.contains(&scope) {
                union.push(scope);
            }
        }
        union
    } else {
        requested
    };
    let offline = match &shared.flavor {
        Flavor::Generic => true,
        // Google hands out a refresh token only for offline access, and only when the consent
        // screen was shown: the first time, or when forced with `prompt=consent`.
        Flavor::Google => {
            params.get("access_type").map(String::as_str) == Some("offline")
                && (first_consent || forced_consent)
        }
        Flavor::Microsoft { .. } => scopes.iter().any(|s| s == "offline_access"),
    };

    let code = random_token("code_");
    st.codes.insert(
        code.clone(),
        CodeRecord {
            client_id: client_id.clone(),
            redirect_uri_param: redirect_param.cloned(),
            user,
            scopes,
            nonce: params.get("nonce").cloned(),
            code_challenge: challenge.clone(),
            issued: Instant::now(),
            used: false,
            grant: None,
            offline,
        },
    );
    let mut redirect_url = redirect_uri;
    redirect_url
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &state);
    if let Some(iss) = &iss {
        redirect_url.query_pairs_mut().append_pair("iss", iss);
    }
    Ok(AuthorizationCallback {
        code,
        state,
        redirect_url,
    })
}
