//! The fake IdP's OpenID Connect side (discovery, JWKS, signed ID tokens, key rotation,
//! tampering) and its Google and Microsoft presets, spoken to over real HTTP with `reqwest`,
//! and ID tokens verified with `openidconnect`'s own verifier, as a relying party would.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use openidconnect::core::{
    CoreIdToken, CoreIdTokenVerifier, CoreJsonWebKeySet, CoreJwsSigningAlgorithm,
    CoreProviderMetadata,
};
use openidconnect::{ClaimsVerificationError, ClientId, ClientSecret, IssuerUrl, Nonce};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokenbroker::testing::{FakeIdp, FakeIdpConfig, Fault};
use url::Url;

const REDIRECT: &str = "http://127.0.0.1:9/callback";
const VERIFIER: &str = "fake-idp-modes-test-verifier-0123456789-abcdefghijklmnop";

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// An answer: status and JSON body (`Null` if the body is not JSON).
struct Reply {
    status: u16,
    json: Value,
}

impl Reply {
    fn str(&self, field: &str) -> String {
        self.json[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field} in {}", self.json))
            .to_owned()
    }
    fn has(&self, field: &str) -> bool {
        self.json.get(field).is_some()
    }
}

async fn get_json(url: Url) -> Reply {
    let resp = http().get(url).send().await.expect("GET");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    Reply {
        status,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// POSTs a form to `url` with `client_secret_basic` (or no client authentication).
async fn post_form(idp: &FakeIdp, url: Url, basic: bool, pairs: &[(&str, &str)]) -> Reply {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let mut req = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded");
    if basic {
        // The fake's client id and secret need no form-url-encoding.
        let creds = format!("{}:{}", idp.client_id(), idp.client_secret());
        req = req.header("authorization", format!("Basic {}", STANDARD.encode(creds)));
    }
    let resp = req.body(body).send().await.expect("POST");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    Reply {
        status,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// The authorization URL a relying party would build, at `endpoint`.
fn auth_url(idp: &FakeIdp, endpoint: Url, scope: &str, extra: &[(&str, &str)]) -> Url {
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(VERIFIER.as_bytes()));
    let mut url = endpoint;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", idp.client_id())
        .append_pair("redirect_uri", REDIRECT)
        .append_pair("scope", scope)
        .append_pair("state", "st")
        .append_pair("nonce", "n-1")
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256")
        .extend_pairs(extra);
    url
}

/// Authorization step (through `FakeIdp::authorize`) plus code exchange at the token endpoint.
async fn login(idp: &FakeIdp, user: &str, scope: &str, extra: &[(&str, &str)]) -> Reply {
    let url = auth_url(idp, idp.authorization_endpoint(), scope, extra);
    let cb = idp.authorize(&url, user).expect("authorize");
    let reply = exchange(idp, idp.token_endpoint(), &cb.code).await;
    assert_eq!(reply.status, 200, "{}", reply.json);
    reply
}

async fn exchange(idp: &FakeIdp, token_endpoint: Url, code: &str) -> Reply {
    post_form(
        idp,
        token_endpoint,
        true,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
        ],
    )
    .await
}

async fn refresh(idp: &FakeIdp, refresh_token: &str) -> Reply {
    post_form(
        idp,
        idp.token_endpoint(),
        true,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
    )
    .await
}

async fn fetch_jwks(idp: &FakeIdp) -> CoreJsonWebKeySet {
    let reply = get_json(idp.jwks_uri()).await;
    assert_eq!(reply.status, 200);
    serde_json::from_value(reply.json).expect("a JWK set openidconnect understands")
}

/// A verifier for the fake's ID tokens. It allows both algorithms the fake signs with (ES256,
/// RS256 in the Google and Microsoft modes; openidconnect alone allows RS256 only); the tests
/// assert which one each mode uses.
fn verifier(idp: &FakeIdp, jwks: CoreJsonWebKeySet) -> CoreIdTokenVerifier<'static> {
    CoreIdTokenVerifier::new_confidential_client(
        ClientId::new(idp.client_id().to_owned()),
        ClientSecret::new(idp.client_secret().to_owned()),
        IssuerUrl::new(idp.issuer()).expect("issuer URL"),
        jwks,
    )
    .set_allowed_algs([
        CoreJwsSigningAlgorithm::EcdsaP256Sha256,
        CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    ])
}

fn parse_id_token(jwt: &str) -> CoreIdToken {
    jwt.parse().expect("a JWT openidconnect can parse")
}

/// The decoded header and payload of a JWT, without any check.
fn jwt_parts(jwt: &str) -> (Value, Value) {
    let mut parts = jwt.split('.');
    let mut decode = || -> Value {
        let part = parts.next().expect("JWT part");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url")).expect("JSON")
    };
    (decode(), decode())
}

// ---------------------------------------------------------------------------------------------
// OIDC: discovery, JWKS, signed ID tokens

#[tokio::test]
async fn discovery_and_jwks_are_served_and_consistent() {
    let idp = FakeIdp::start_default().await.unwrap();
    assert_eq!(
        idp.discovery_url().as_str(),
        format!("{}/.well-known/openid-configuration", idp.issuer())
    );
    let doc = get_json(idp.discovery_url()).await;
    assert_eq!(doc.status, 200);
    let d = &doc.json;
    assert_eq!(d["issuer"], idp.issuer());
    assert_eq!(
        d["authorization_endpoint"],
        idp.authorization_endpoint().as_str()
    );
    assert_eq!(d["token_endpoint"], idp.token_endpoint().as_str());
    assert_eq!(d["revocation_endpoint"], idp.revocation_endpoint().as_str());
    assert_eq!(
        d["introspection_endpoint"],
        idp.introspection_endpoint().as_str()
    );
    assert_eq!(d["jwks_uri"], idp.jwks_uri().as_str());
    assert_eq!(
        d["id_token_signing_alg_values_supported"],
        serde_json::json!(["ES256"])
    );
    assert!(
        d["response_types_supported"]
            .as_array()
            .unwrap()
            .contains(&"code".into())
    );
    assert!(
        d["subject_types_supported"]
            .as_array()
            .unwrap()
            .contains(&"public".into())
    );
    let scopes = d["scopes_supported"].as_array().unwrap();
    assert!(scopes.contains(&"openid".into()) && scopes.contains(&"offline_access".into()));
    let metadata: CoreProviderMetadata =
        serde_json::from_value(doc.json.clone()).expect("openidconnect parses the document");
    assert_eq!(metadata.issuer().as_str(), idp.issuer());
    assert_eq!(metadata.jwks_uri().as_str(), idp.jwks_uri().as_str());

    let jwks = get_json(idp.jwks_uri()).await;
    let keys = jwks.json["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kty"], "EC");
    assert_eq!(keys[0]["crv"], "P-256");
    assert_eq!(keys[0]["alg"], "ES256");
    assert_eq!(keys[0]["use"], "sig");
    assert_eq!(keys[0]["kid"], idp.signing_key_id());
    assert!(keys[0].get("d").is_none(), "no private part");
    let c = idp.counters();
    assert_eq!((c.discovery_calls, c.jwks_calls), (1, 1));
}

#[tokio::test]
async fn id_tokens_verify_with_the_jwks_and_carry_the_claims() {
    let idp = FakeIdp::start_default().await.unwrap();
    let body = login(&idp, "bob", "openid email", &[]).await;
    let jwt = body.str("id_token");
    let (header, _) = jwt_parts(&jwt);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], idp.signing_key_id());

    let verifier = verifier(&idp, fetch_jwks(&idp).await);
    let token = parse_id_token(&jwt);
    let claims = token
        .claims(&verifier, &Nonce::new("n-1".to_owned()))
        .expect("signature and claims verify");
    assert_eq!(claims.issuer().as_str(), idp.issuer());
    assert_eq!(claims.subject().as_str(), "bob");
    assert_eq!(claims.audiences()[0].as_str(), idp.client_id());
    assert_eq!(claims.authorized_party().unwrap().as_str(), idp.client_id());
    assert_eq!(claims.email().unwrap().as_str(), "bob@example.com");
    assert!(claims.expiration() > claims.issue_time());
    // A wrong nonce is caught too: the check is real.
    assert!(
        token
            .claims(&verifier, &Nonce::new("other".to_owned()))
            .is_err()
    );

    // Refreshed ID tokens are signed too, and carry no nonce.
    let refreshed = refresh(&idp, &body.str("refresh_token")).await;
    let jwt = refreshed.str("id_token");
    assert!(jwt_parts(&jwt).1.get("nonce").is_none());
    let no_nonce = |nonce: Option<&Nonce>| {
        if nonce.is_none() {
            Ok(())
        } else {
            Err("unexpected nonce".to_owned())
        }
    };
    let token = parse_id_token(&jwt);
    let claims = token
        .claims(&verifier, no_nonce)
        .expect("refreshed ID token verifies");
    assert_eq!(claims.subject().as_str(), "bob");
}

#[tokio::test]
async fn tampered_id_tokens_fail_verification() {
    let idp = FakeIdp::start_default().await.unwrap();
    let verifier = verifier(&idp, fetch_jwks(&idp).await);
    let nonce = Nonce::new("n-1".to_owned());

    idp.issue_tampered_id_tokens(true);
    let jwt = login(&idp, "alice", "openid", &[]).await.str("id_token");
    assert_eq!(jwt_parts(&jwt).1["sub"], "alice-tampered");
    let err = parse_id_token(&jwt)
        .claims(&verifier, &nonce)
        .expect_err("tampered");
    assert!(
        matches!(err, ClaimsVerificationError::SignatureVerification(_)),
        "{err:?}"
    );

    idp.issue_tampered_id_tokens(false);
    let jwt = login(&idp, "alice", "openid", &[]).await.str("id_token");
    assert!(parse_id_token(&jwt).claims(&verifier, &nonce).is_ok());

    // The one-shot fault spoils exactly one response.
    idp.inject(Fault::TamperedIdToken);
    let body = login(&idp, "alice", "openid", &[]).await;
    assert!(
        parse_id_token(&body.str("id_token"))
            .claims(&verifier, &nonce)
            .is_err()
    );
    let jwt = refresh(&idp, &body.str("refresh_token"))
        .await
        .str("id_token");
    assert!(
        parse_id_token(&jwt)
            .claims(&verifier, |_: Option<&Nonce>| Ok(()))
            .is_ok()
    );
}

#[tokio::test]
async fn signing_key_rotation_needs_a_jwks_refetch() {
    let idp = FakeIdp::start_default().await.unwrap();
    let old_kid = idp.signing_key_id();
    let cached = fetch_jwks(&idp).await;
    let new_kid = idp.rotate_signing_key();
    assert_ne!(new_kid, old_kid);
    assert_eq!(idp.signing_key_id(), new_kid);

    let jwt = login(&idp, "alice", "openid", &[]).await.str("id_token");
    assert_eq!(jwt_parts(&jwt).0["kid"], new_kid);
    let nonce = Nonce::new("n-1".to_owned());
    // The cached key set does not know the new `kid`...
    let err = parse_id_token(&jwt)
        .claims(&verifier(&idp, cached), &nonce)
        .expect_err("unknown kid");
    assert!(
        matches!(err, ClaimsVerificationError::SignatureVerification(_)),
        "{err:?}"
    );
    // ...the fresh one lists both keys and verifies.
    let jwks = get_json(idp.jwks_uri()).await.json;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert!(kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()));
    let fresh = verifier(&idp, fetch_jwks(&idp).await);
    assert!(parse_id_token(&jwt).claims(&fresh, &nonce).is_ok());

    // With retired keys unpublished, only the new key is listed.
    idp.set_publish_retired_keys(false);
    let jwks = get_json(idp.jwks_uri()).await.json;
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["kid"], new_kid);
    assert_eq!(idp.counters().jwks_calls, 4);
}

#[tokio::test]
async fn signing_keys_are_made_at_start() {
    // ES256 keys are cheap: each fake has its own.
    let a = FakeIdp::start_default().await.unwrap();
    let b = FakeIdp::start_default().await.unwrap();
    assert_ne!(a.signing_key_id(), b.signing_key_id());
    // RSA keys are not: the RS256 fakes of a process share them, rotation by rotation.
    let google = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
    let microsoft = FakeIdp::start(FakeIdpConfig::microsoft(TENANT))
        .await
        .unwrap();
    assert_eq!(google.signing_key_id(), microsoft.signing_key_id());
    let jwks = get_json(google.jwks_uri()).await.json;
    let key = &jwks["keys"][0];
    assert_eq!((&key["kty"], &key["alg"]), (&"RSA".into(), &"RS256".into()));
    assert!(key.get("n").is_some() && key.get("d").is_none());
}

#[tokio::test]
async fn unsigned_id_tokens_on_request() {
    let idp = FakeIdp::start(FakeIdpConfig::default().with_signed_id_tokens(false))
        .await
        .unwrap();
    let jwt = login(&idp, "alice", "openid", &[]).await.str("id_token");
    assert_eq!(jwt_parts(&jwt).0["alg"], "none");
    assert!(jwt.ends_with('.'));
}

// ---------------------------------------------------------------------------------------------
// Google

fn offline() -> [(&'static str, &'static str); 1] {
    [("access_type", "offline")]
}

#[tokio::test]
async fn google_issues_refresh_tokens_only_offline_at_first_or_forced_consent() {
    let idp = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
    assert!(!idp.has_consented("alice"));

    // First consent, but online access: no refresh token.
    let body = login(&idp, "alice", "openid email", &[]).await;
    assert!(!body.has("refresh_token"));
    assert!(body.has("access_token") && body.has("id_token"));
    assert!(idp.has_consented("alice"));

    // Offline, but consent was given before and not forced: none either.
    let body = login(&idp, "alice", "openid email", &offline()).await;
    assert!(!body.has("refresh_token"));
    assert_eq!(idp.last_prompt(), None);

    // Offline with `prompt=consent`: one.
    let forced = [("access_type", "offline"), ("prompt", "consent")];
    let body = login(&idp, "alice", "openid email", &forced).await;
    assert!(body.str("refresh_token").starts_with("rt_"));
    assert_eq!(idp.last_prompt().as_deref(), Some("consent"));
    assert_eq!(idp.counters().consent_prompts, 1);

    // Another user's first consent, offline: one, without forcing.
    let body = login(&idp, "bob", "openid", &offline()).await;
    assert!(body.has("refresh_token"));
    assert_eq!(idp.counters().consent_prompts, 1);
}

#[tokio::test]
async fn google_refresh_does_not_rotate_and_the_old_token_stays_valid() {
    let idp = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
    let rt = login(&idp, "alice", "openid email", &offline())
        .await
        .str("refresh_token");
    for _ in 0..2 {
        let reply = refresh(&idp, &rt).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        assert!(!reply.has("refresh_token"));
        assert!(reply.has("access_token") && reply.has("id_token"));
    }
    assert!(idp.is_active(&rt));
    let c = idp.counters();
    assert_eq!((c.refresh_successes, c.reuse_detected), (2, 0));
}

#[tokio::test]
async fn google_dead_refresh_token_and_revocation() {
    let idp = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
    let body = login(&idp, "alice", "openid", &offline()).await;
    let rt = body.str("refresh_token");
    let at = body.str("access_token");

    // Google's revocation endpoint takes just the token.
    let reply = post_form(&idp, idp.revocation_endpoint(), false, &[("token", &at)]).await;
    assert_eq!(reply.status, 200);
    assert!(
        !idp.is_active(&rt),
        "revoking the access token ends the grant"
    );
    assert!(!idp.has_consented("alice"));

    let dead = refresh(&idp, &rt).await;
    assert_eq!(dead.status, 400);
    assert_eq!(
        dead.json,
        serde_json::json!({
            "error": "invalid_grant",
            "error_description": "Token has been expired or revoked."
        })
    );
    let unknown = refresh(&idp, "rt_never_issued").await;
    assert_eq!(unknown.json, dead.json);

    // Consent is gone, so the next offline login is a first consent again.
    assert!(
        login(&idp, "alice", "openid", &offline())
            .await
            .has("refresh_token")
    );
}

#[tokio::test]
async fn google_include_granted_scopes_unions_earlier_grants() {
    let idp = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
    let body = login(&idp, "alice", "openid email", &offline()).await;
    assert_eq!(body.str("scope"), "openid email");

    let body = login(&idp, "alice", "drive", &[]).await;
    assert_eq!(
        body.str("scope"),
        "drive",
        "without the flag, only what was asked"
    );

    let body = login(
        &idp,
        "alice",
        "calendar",
        &[("include_granted_scopes", "true")],
    )
    .await;
    assert_eq!(body.str("scope"), "openid email drive calendar");
    assert_eq!(
        idp.consented_scopes("alice").unwrap(),
        ["openid", "email", "drive", "calendar"]
    );
    // Another user's grants are not mixed in.
    let body = login(&idp, "bob", "drive", &[("include_granted_scopes", "true")]).await;
    assert_eq!(body.str("scope"), "drive");
}

#[tokio::test]
async fn google_discovery_lists_revocation() {
    let idp = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
    let doc = get_json(idp.discovery_url()).await.json;
    assert_eq!(doc["issuer"], idp.issuer());
    assert_eq!(
        doc["revocation_endpoint"],
        idp.revocation_endpoint().as_str()
    );
    assert!(idp.supports_revocation());
    // RS256 as at Google: `OidcConfig::google` accepts nothing else.
    assert_eq!(
        doc["id_token_signing_alg_values_supported"],
        serde_json::json!(["RS256"])
    );
    let jwt = login(&idp, "alice", "openid", &offline())
        .await
        .str("id_token");
    assert_eq!(jwt_parts(&jwt).0["alg"], "RS256");
    let claims = parse_id_token(&jwt)
        .claims(
            &verifier(&idp, fetch_jwks(&idp).await),
            &Nonce::new("n-1".to_owned()),
        )
        .expect("verifies")
        .clone();
    assert_eq!(claims.issuer().as_str(), idp.issuer());
}

// ---------------------------------------------------------------------------------------------
// Microsoft

const TENANT: &str = "9188040d-6c67-4c5b-b112-36a304b66dad";

#[tokio::test]
async fn microsoft_refresh_tokens_need_offline_access() {
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(TENANT))
        .await
        .unwrap();
    let body = login(&idp, "alice", "openid email", &[]).await;
    assert!(!body.has("refresh_token"));
    let body = login(&idp, "alice", "openid email offline_access", &[]).await;
    assert!(body.has("refresh_token"));
}

#[tokio::test]
async fn microsoft_rotates_on_every_refresh_and_keeps_old_tokens_valid() {
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(TENANT))
        .await
        .unwrap();
    let body = login(&idp, "alice", "openid offline_access", &[]).await;
    assert!(body.json["ext_expires_in"].is_u64());
    assert!(body.json["expires_in"].is_u64());
    let rt1 = body.str("refresh_token");

    let second = refresh(&idp, &rt1).await;
    assert_eq!(second.status, 200, "{}", second.json);
    assert!(second.json["ext_expires_in"].is_u64());
    let rt2 = second.str("refresh_token");
    assert_ne!(rt1, rt2);

    // The old one still works (and rotates again); so does the new one.
    let third = refresh(&idp, &rt1).await;
    assert_eq!(third.status, 200, "{}", third.json);
    let rt3 = third.str("refresh_token");
    assert!(rt3 != rt1 && rt3 != rt2);
    assert_eq!(refresh(&idp, &rt2).await.status, 200);
    for rt in [&rt1, &rt2, &rt3] {
        assert!(idp.is_active(rt));
    }
    let c = idp.counters();
    assert_eq!((c.refresh_successes, c.reuse_detected), (3, 0));
}

#[tokio::test]
async fn microsoft_id_token_has_tid_and_tenant_issuer() {
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(TENANT))
        .await
        .unwrap();
    let issuer = format!("{}{TENANT}/v2.0", idp.base_url());
    assert_eq!(idp.issuer(), issuer);
    assert_eq!(idp.tenant_id(), Some(TENANT));
    let jwt = login(&idp, "alice", "openid offline_access", &[])
        .await
        .str("id_token");
    let (header, claims) = jwt_parts(&jwt);
    // RS256 as at Microsoft: `OidcConfig::microsoft` accepts nothing else.
    assert_eq!(header["alg"], "RS256");
    assert_eq!(claims["tid"], TENANT);
    assert_eq!(claims["iss"], issuer);
    assert_eq!(claims["ver"], "2.0");
    let verified = parse_id_token(&jwt)
        .claims(
            &verifier(&idp, fetch_jwks(&idp).await),
            &Nonce::new("n-1".to_owned()),
        )
        .expect("verifies against the tenant issuer")
        .clone();
    assert_eq!(verified.issuer().as_str(), issuer);
}

#[tokio::test]
async fn microsoft_discovery_uses_the_issuer_template() {
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(TENANT))
        .await
        .unwrap();
    let base = idp.base_url();
    let template = format!("{base}{{tenantid}}/v2.0");
    for tenant in ["common", "organizations"] {
        let url = base
            .join(&format!("{tenant}/v2.0/.well-known/openid-configuration"))
            .unwrap();
        let doc = get_json(url).await;
        assert_eq!(doc.status, 200);
        assert_eq!(doc.json["issuer"], template, "literal {{tenantid}}");
        assert_eq!(
            doc.json["authorization_endpoint"],
            format!("{base}{tenant}/oauth2/v2.0/authorize")
        );
        assert_eq!(
            doc.json["token_endpoint"],
            format!("{base}{tenant}/oauth2/v2.0/token")
        );
        assert!(doc.json.get("revocation_endpoint").is_none());
    }
    // The tenant's own document is concrete, so standard discovery from the issuer works.
    let doc = get_json(idp.discovery_url()).await;
    assert_eq!(
        idp.discovery_url().as_str(),
        format!("{}/.well-known/openid-configuration", idp.issuer())
    );
    assert_eq!(doc.json["issuer"], idp.issuer());
    assert_eq!(doc.json["token_endpoint"], idp.token_endpoint().as_str());
    assert_eq!(doc.json["jwks_uri"], idp.jwks_uri().as_str());
    assert!(doc.json.get("revocation_endpoint").is_none());
    let metadata: CoreProviderMetadata = serde_json::from_value(doc.json).expect("parses");
    assert_eq!(metadata.issuer().as_str(), idp.issuer());
    assert_eq!(idp.counters().discovery_calls, 3);

    // No discovery at the root, none for unknown tenants, and no revocation endpoint.
    let root = base.join(".well-known/openid-configuration").unwrap();
    assert_eq!(get_json(root).await.status, 404);
    let unknown = base
        .join("other-tenant/v2.0/.well-known/openid-configuration")
        .unwrap();
    assert_eq!(get_json(unknown).await.status, 404);
    assert!(!idp.supports_revocation());
    let revoke = post_form(&idp, idp.revocation_endpoint(), true, &[("token", "x")]).await;
    assert_eq!(revoke.status, 404);
}

#[tokio::test]
async fn microsoft_tenant_endpoints_over_http() {
    let idp = FakeIdp::start(FakeIdpConfig::microsoft(TENANT))
        .await
        .unwrap();
    let base = idp.base_url();
    for tenant in ["common", "organizations", TENANT] {
        let endpoint = base
            .join(&format!("{tenant}/oauth2/v2.0/authorize"))
            .unwrap();
        let url = auth_url(&idp, endpoint, "openid offline_access", &[]);
        let resp = http().get(url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 302, "{tenant}");
        let location = Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
        let code = location
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .expect("code");
        let token = base.join(&format!("{tenant}/oauth2/v2.0/token")).unwrap();
        let reply = exchange(&idp, token, &code).await;
        assert_eq!(reply.status, 200, "{}", reply.json);
        assert!(reply.has("refresh_token") && reply.has("ext_expires_in"));
    }
    // The plain paths stay as aliases.
    let url = auth_url(&idp, base.join("authorize").unwrap(), "openid", &[]);
    let cb = idp.authorize(&url, "alice").expect("/authorize alias");
    let reply = exchange(&idp, base.join("token").unwrap(), &cb.code).await;
    assert_eq!(reply.status, 200);
    // An unknown tenant is refused.
    let endpoint = base.join("contoso/oauth2/v2.0/authorize").unwrap();
    let url = auth_url(&idp, endpoint, "openid", &[]);
    assert!(idp.authorize(&url, "alice").is_err());
    assert_eq!(http().get(url).send().await.unwrap().status().as_u16(), 400);
}

#[tokio::test]
async fn tenant_paths_are_absent_outside_microsoft() {
    let idp = FakeIdp::start_default().await.unwrap();
    assert_eq!(idp.tenant_id(), None);
    let url = idp
        .base_url()
        .join("common/v2.0/.well-known/openid-configuration")
        .unwrap();
    assert_eq!(get_json(url).await.status, 404);
    let token = idp.base_url().join("common/oauth2/v2.0/token").unwrap();
    assert_eq!(post_form(&idp, token, true, &[]).await.status, 404);
}

// ---------------------------------------------------------------------------------------------
// The broker's generic OAuth 2.0 provider pointed at each flavor

mod broker {
    use std::sync::Arc;
    use std::time::Duration;

    use tokenbroker::provider::{OAuth2Config, RefreshTokenReuse};
    use tokenbroker::testing::{FakeIdp, FakeIdpConfig, ManualClock};
    use tokenbroker::{
        Callback, Caller, LoginOptions, MemoryStore, ProviderId, ProviderPolicy, RevocationStatus,
        Scopes, Secret, TokenBroker, TokenKey,
    };

    /// A broker with one provider, `config`, and a linked key for `alice`.
    async fn linked(
        idp: &FakeIdp,
        config: OAuth2Config,
    ) -> (TokenBroker, Arc<ManualClock>, TokenKey) {
        let clock = Arc::new(ManualClock::starting_now());
        let store = Arc::new(MemoryStore::with_clock(clock.clone()));
        let key = TokenKey::parse("acme", "alice", "up").unwrap();
        let broker = TokenBroker::builder()
            .with_oauth2_provider(config, ProviderPolicy::default().expose_refresh_token(true))
            .with_store(store)
            .with_clock(clock.clone())
            .build()
            .unwrap();
        let start = broker
            .begin_login(&key, LoginOptions::default())
            .await
            .unwrap();
        let cb = idp.authorize(&start.authorization_url, "alice").unwrap();
        broker
            .complete_login(start.pending, &Callback::from_url(&cb.redirect_url))
            .await
            .unwrap();
        (broker, clock, key)
    }

    fn base_config(idp: &FakeIdp, scopes: &str) -> OAuth2Config {
        OAuth2Config::new(
            ProviderId::new("up").unwrap(),
            idp.client_id(),
            idp.authorization_endpoint(),
            idp.token_endpoint(),
            "http://127.0.0.1:9/callback".parse().unwrap(),
        )
        .with_client_secret(Secret::new(idp.client_secret()))
        .with_scopes(Scopes::parse(scopes))
    }

    fn caller(key: &TokenKey) -> Caller {
        Caller::new(key.realm.clone(), key.subject.clone(), "app")
            .with_role("read-token")
            .with_full_client_scope()
    }

    #[tokio::test]
    async fn google_flavor() {
        let idp = FakeIdp::start(FakeIdpConfig::google()).await.unwrap();
        // Google: offline access is asked for with a parameter, refresh tokens never rotate.
        let config = base_config(&idp, "openid email")
            .with_authorize_param("access_type", "offline")
            .with_revocation_endpoint(idp.revocation_endpoint())
            .with_refresh_token_reuse(RefreshTokenReuse::Tolerated);
        let (broker, clock, key) = linked(&idp, config).await;
        let rt = broker
            .retrieve(&caller(&key), &key)
            .await
            .unwrap()
            .tokens
            .refresh_token()
            .expect("first consent with access_type=offline")
            .expose_secret()
            .to_owned();
        clock.advance(Duration::from_secs(3601));
        let got = broker.retrieve(&caller(&key), &key).await.unwrap();
        assert!(got.refreshed);
        assert_eq!(got.tokens.refresh_token().unwrap().expose_secret(), rt);
        assert_eq!(idp.counters().refresh_successes, 1);
        let out = broker.unlink(&key).await.unwrap();
        assert_eq!(out.revocation, RevocationStatus::Revoked);
        assert!(!idp.is_active(&rt));
    }

    #[tokio::test]
    async fn microsoft_flavor() {
        let idp = FakeIdp::start(FakeIdpConfig::microsoft("tenant-1"))
            .await
            .unwrap();
        // Microsoft: `offline_access` brings refresh tokens; no revocation endpoint to set.
        let config = base_config(&idp, "openid offline_access")
            .with_refresh_token_reuse(RefreshTokenReuse::Tolerated);
        let (broker, clock, key) = linked(&idp, config).await;
        let first = broker.retrieve(&caller(&key), &key).await.unwrap().tokens;
        let rt1 = first.refresh_token().unwrap().expose_secret().to_owned();
        clock.advance(Duration::from_secs(3601));
        let got = broker.retrieve(&caller(&key), &key).await.unwrap();
        assert!(got.refreshed);
        let rt2 = got.tokens.refresh_token().unwrap().expose_secret();
        assert_ne!(rt2, rt1, "rotated");
        assert!(idp.is_active(&rt1), "the old one stays valid at Microsoft");
        let out = broker.unlink(&key).await.unwrap();
        assert_eq!(out.revocation, RevocationStatus::NotSupported);
    }
}
