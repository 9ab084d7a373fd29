//! ID tokens: claims shaped like the flavor's, signed or not, tampered with on request.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

#[cfg(doc)]
use super::FakeIdpConfig;
use super::grants::Grant;
use super::keys::SigningKey;
use super::modes::Flavor;
use super::state::Shared;

/// The claims of an ID token for `grant`, shaped like the flavor's real tokens.
pub(super) fn id_token_claims(
    shared: &Shared,
    grant: &Grant,
    now: u64,
    ttl: u64,
    nonce: Option<&str>,
) -> Value {
    // Users in these tests are plain names; give them a stable address.
    let email = if grant.user.contains('@') {
        grant.user.clone()
    } else {
        format!("{}@example.com", grant.user)
    };
    let mut claims = json!({
        "iss": shared.issuer,
        "sub": grant.user,
        "aud": grant.client_id,
        "azp": grant.client_id,
        "exp": now + ttl,
        "iat": now,
        "email": email,
        "email_verified": true,
    });
    if let Some(nonce) = nonce {
        claims["nonce"] = nonce.into();
    }
    if let Flavor::Microsoft { tenant } = &shared.flavor {
        claims["tid"] = tenant.clone().into();
        claims["ver"] = "2.0".into();
        claims["preferred_username"] = email.into();
    }
    claims
}

/// A JWT with `alg: none` and an empty signature part (with
/// [`FakeIdpConfig::with_signed_id_tokens`] off). It cannot pass a real signature check.
pub(super) fn unsigned_jwt(claims: &Value) -> String {
    let header = json!({ "alg": "none", "typ": "JWT" });
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// A JWS over `claims` signed by `key`, with its `alg` and `kid` in the header. With `tamper`,
/// the payload is replaced after signing (another `sub`), so that only the signature check can
/// catch it.
pub(super) fn signed_jwt(key: &SigningKey, claims: &Value, tamper: bool) -> String {
    let header = json!({ "alg": key.alg().name(), "typ": "JWT", "kid": key.kid() });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = key.sign(signing_input.as_bytes());
    let signed_part = if tamper {
        let mut forged = claims.clone();
        let sub = forged["sub"].as_str().unwrap_or_default();
        forged["sub"] = format!("{sub}-tampered").into();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(forged.to_string())
        )
    } else {
        signing_input
    };
    format!("{signed_part}.{}", URL_SAFE_NO_PAD.encode(signature))
}
