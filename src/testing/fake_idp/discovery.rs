//! The OpenID Connect discovery document, at the root and under Microsoft's tenant paths.

use std::sync::Arc;

use axum::extract::{Path, State as AxumState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::modes::Flavor;
use super::protocol::json_response;
use super::state::Shared;

pub(super) async fn discovery_handler(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    match shared.flavor {
        // Microsoft serves discovery only under a tenant path.
        Flavor::Microsoft { .. } => StatusCode::NOT_FOUND.into_response(),
        Flavor::Generic | Flavor::Google => {
            shared.lock().counters.discovery_calls += 1;
            json_response(StatusCode::OK, &discovery_document(&shared, None))
        }
    }
}

pub(super) async fn tenant_discovery_handler(
    AxumState(shared): AxumState<Arc<Shared>>,
    Path(tenant): Path<String>,
) -> Response {
    if !shared.serves_tenant(&tenant) {
        return StatusCode::NOT_FOUND.into_response();
    }
    shared.lock().counters.discovery_calls += 1;
    json_response(StatusCode::OK, &discovery_document(&shared, Some(&tenant)))
}

/// The OpenID Connect discovery document; `tenant` is the path segment of a Microsoft request.
fn discovery_document(shared: &Shared, tenant: Option<&str>) -> Value {
    let base = &shared.base;
    let mut doc = json!({
        "jwks_uri": format!("{base}/jwks"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [shared.flavor.signing_alg().name()],
        "scopes_supported": ["openid", "email", "profile", "offline_access"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_methods_supported": match shared.client_auth.method {
            Some(method) => json!([method.method_name()]),
            None => json!(["client_secret_basic", "client_secret_post"]),
        },
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["iss", "sub", "aud", "azp", "iat", "exp", "nonce", "email", "email_verified"],
    });
    match (&shared.flavor, tenant) {
        (Flavor::Microsoft { tenant: own }, Some(tenant)) => {
            // As at Microsoft: the multi-tenant documents carry a template that the relying
            // party fills with the token's `tid`; the tenant's own document is concrete.
            doc["issuer"] = if tenant == own {
                shared.issuer.clone().into()
            } else {
                format!("{base}/{{tenantid}}/v2.0").into()
            };
            doc["authorization_endpoint"] = format!("{base}/{tenant}/oauth2/v2.0/authorize").into();
            doc["token_endpoint"] = format!("{base}/{tenant}/oauth2/v2.0/token").into();
            if let Some(claims) = doc["claims_supported"].as_array_mut() {
                claims.extend(["tid".into(), "ver".into(), "preferred_username".into()]);
            }
        }
        _ => {
            let ext = &shared.login_extensions;
            if ext.iss_in_response {
                doc["authorization_response_iss_parameter_supported"] = true.into();
            }
            if ext.par {
                doc["pushed_authorization_request_endpoint"] = format!("{base}/par").into();
            }
            if ext.require_par {
                doc["require_pushed_authorization_requests"] = true.into();
            }
            doc["issuer"] = shared.issuer.clone().into();
            doc["authorization_endpoint"] = format!("{base}/authorize").into();
            doc["token_endpoint"] = format!("{base}/token").into();
            doc["revocation_endpoint"] = format!("{base}/revoke").into();
            doc["introspection_endpoint"] = format!("{base}/introspect").into();
        }
    }
    doc
}
