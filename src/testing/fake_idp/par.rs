//! Pushed authorization requests (RFC 9126): `POST /par` and the `request_uri` that
//! `/authorize` resolves.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::FakeIdpError;
use super::client_auth::authenticate;
use super::faults::{Fault, fault_response};
use super::grants::random_token;
use super::protocol::{OAuthError, Params, json_response, parse_form};
use super::server::ConnTag;
use super::state::{IdpState, Shared};

#[derive(Default)]
pub(super) struct PushedRequests {
    pub(super) requests: HashMap<String, PushedRequest>,
    pub(super) faults: VecDeque<Fault>,
}

pub(super) struct PushedRequest {
    pub(super) params: Params,
    pub(super) expires: Instant,
}

const REQUEST_URI_PREFIX: &str = "urn:ietf:params:oauth:request_uri:";

/// `POST /par`: client authentication as at `/token`, then the parameters are stored under a
/// fresh, single-use `request_uri`.
pub(super) async fn par_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    ConnectInfo(conn): ConnectInfo<ConnTag>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let fault = {
        let mut st = shared.lock();
        st.counters.par_requests += 1;
        st.pushed.faults.pop_front()
    };
    match fault {
        None | Some(Fault::ExpiresInAsString) | Some(Fault::TamperedIdToken) => {}
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(fault) => return fault_response(fault, &conn),
    }
    let result = parse_form(&headers, &body).and_then(|mut form| {
        authenticate(&shared, &headers, &form)?;
        if form.contains_key("request_uri") || form.contains_key("request") {
            return Err(OAuthError::invalid_request(
                "request_uri and request must not be pushed",
            ));
        }
        form.remove("client_secret");
        form.insert("client_id".to_owned(), shared.client_id.clone());
        let ttl = shared.login_extensions.request_uri_ttl;
        let request_uri = random_token(REQUEST_URI_PREFIX);
        let mut st = shared.lock();
        let now = Instant::now();
        st.pushed.requests.retain(|_, p| p.expires > now);
        st.pushed.requests.insert(
            request_uri.clone(),
            PushedRequest {
                params: form,
                expires: now + ttl,
            },
        );
        st.counters.par_successes += 1;
        Ok(json!({ "request_uri": request_uri, "expires_in": ttl.as_secs().max(1) }))
    });
    match result {
        Ok(body) => json_response(StatusCode::CREATED, &body),
        Err(e) => e.into_response(),
    }
}

/// The pushed parameters an authorization request's `request_uri` names (used up here), or
/// `None` for a request without one. A request without `request_uri` where PAR is required,
/// and an unknown, used or expired `request_uri`, are refused without a redirect.
#[expect(
    clippy::result_large_err,
    reason = "a rare test-helper error; keeping `Url` unboxed reads better"
)]
pub(super) fn resolve_request_uri(
    shared: &Shared,
    st: &mut IdpState,
    params: &Params,
) -> Result<Option<Params>, FakeIdpError> {
    let bad = |description: &str| FakeIdpError::BadRequest {
        description: description.to_owned(),
    };
    let Some(request_uri) = params.get("request_uri") else {
        if shared.login_extensions.require_par {
            return Err(bad(
                "pushed authorization requests are required: request_uri missing",
            ));
        }
        return Ok(None);
    };
    st.counters.request_uri_uses += 1;
    // Single use: removed whether or not the rest of the request is good.
    let pushed = st
        .pushed
        .requests
        .remove(request_uri)
        .filter(|p| p.expires > Instant::now())
        .ok_or_else(|| bad("request_uri is invalid, expired, or was already used"))?;
    if params.get("client_id") != pushed.params.get("client_id") {
        return Err(bad("client_id does not match the pushed request's"));
    }
    Ok(Some(pushed.params))
}
