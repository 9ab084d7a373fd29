//! Which real provider the fake imitates, and the quirks that live in routes of their own:
//! Microsoft's tenant-scoped paths and GitHub's `/user`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, RawQuery, State as AxumState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::authorize::authorize_handler;
use super::grants::token_info;
use super::keys::SigningAlg;
use super::protocol::{OAuthError, json_response};
use super::server::ConnTag;
use super::state::Shared;
use super::token_endpoints::token_handler;

/// Which real provider's quirks the fake imitates (set by the presets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Flavor {
    /// A strict, standards-following provider (the default).
    Generic,
    /// [`FakeIdpConfig::google`].
    Google,
    /// [`FakeIdpConfig::microsoft`], with the tenant id.
    Microsoft { tenant: String },
}

impl Flavor {
    /// How ID tokens are signed. Google and Microsoft sign with RS256, and
    /// `OidcConfig::google` and `OidcConfig::microsoft` accept nothing else, so their fakes do
    /// too. The generic fake uses ES256: its keys are quick to make, where an RSA key can take
    /// seconds in an unoptimized build.
    pub(super) fn signing_alg(&self) -> SigningAlg {
        match self {
            Flavor::Generic => SigningAlg::Es256,
            Flavor::Google | Flavor::Microsoft { .. } => SigningAlg::Rs256,
        }
    }
}

impl Shared {
    pub(super) fn is_google(&self) -> bool {
        self.flavor == Flavor::Google
    }

    /// Whether `tenant` names a tenant path segment this fake serves: Microsoft's multi-tenant
    /// names and the configured tenant id. Always false for the other flavors.
    pub(super) fn serves_tenant(&self, tenant: &str) -> bool {
        match &self.flavor {
            Flavor::Microsoft { tenant: own } => {
                matches!(tenant, "common" | "organizations" | "consumers") || tenant == own
            }
            Flavor::Generic | Flavor::Google => false,
        }
    }

    /// `/authorize`, or `/{tenant}/oauth2/v2.0/authorize` for a served tenant.
    pub(super) fn is_authorize_path(&self, path: &str) -> bool {
        // Google's and GitHub's paths, served so that their presets can be rebased here.
        path == "/authorize"
            || path == "/o/oauth2/v2/auth"
            || path == "/login/oauth/authorize"
            || path
                .strip_prefix('/')
                .and_then(|p| p.strip_suffix("/oauth2/v2.0/authorize"))
                .is_some_and(|tenant| self.serves_tenant(tenant))
    }
}

pub(super) async fn tenant_authorize_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(tenant): Path<String>,
    query: RawQuery,
) -> Response {
    if let Some(refused) = refuse_tenant(&shared, &tenant) {
        // At a Microsoft fake this is its authorization endpoint, answering an error, so it
        // counts like any authorization request; elsewhere the path does not exist.
        if matches!(shared.flavor, Flavor::Microsoft { .. }) {
            shared.lock().counters.authorize_requests += 1;
        }
        return refused;
    }
    authorize_handler(AxumState(shared), query).await
}

pub(super) async fn tenant_token_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(tenant): Path<String>,
    conn: ConnectInfo<ConnTag>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_tenant(&shared, &tenant) {
        return refused;
    }
    token_handler(AxumState(shared), conn, headers, body).await
}

/// The answer for a tenant path this fake does not serve: 404 outside the Microsoft flavor,
/// Microsoft's "tenant not found" otherwise.
fn refuse_tenant(shared: &Shared, tenant: &str) -> Option<Response> {
    if shared.serves_tenant(tenant) {
        None
    } else if matches!(shared.flavor, Flavor::Microsoft { .. }) {
        Some(
            OAuthError::invalid_request(format!("AADSTS90002: Tenant '{tenant}' not found."))
                .into_response(),
        )
    } else {
        Some(StatusCode::NOT_FOUND.into_response())
    }
}

/// `GET /user` with `Authorization: Bearer <access token>`: the account the token belongs to,
/// as GitHub's API answers it (a stable numeric `id`, the `login`, an `email`).
pub(super) async fn user_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
) -> Response {
    let st = shared.lock();
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.and_then(|t| token_info(&st, t)) {
        Some(info) if info.token_type == "Bearer" => {
            // FNV-1a: a stable number per user name, as GitHub's ids are per account.
            let id = info.sub.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            }) % 1_000_000_000;
            json_response(
                StatusCode::OK,
                &json!({ "id": id, "login": info.sub, "email": format!("{}@example.com", info.sub) }),
            )
        }
        _ => json_response(
            StatusCode::UNAUTHORIZED,
            &json!({ "message": "Bad credentials" }),
        ),
    }
}
