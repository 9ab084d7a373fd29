//! A host app for the adapter's tests: a broker on the in-process fake IdP (or any OpenID
//! provider), the adapter's router on a loopback port, and callers with ES256 JWTs signed by a
//! key generated at run time (no private key is committed).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::EncodePrivateKey;
use rand_core::OsRng;
use serde_json::{Value, json};
use tokenbroker::http::{ReqwestClient, SharedHttpClient};
use tokenbroker::provider::OidcConfig;
use tokenbroker::{ProviderId, ProviderPolicy, Realm, Secret, TokenBroker, TokenStore};
use tokenbroker_axum::JwtAuthenticator;
use url::Url;

pub const ISSUER: &str = "https://sso.test/realms/demo";
pub const AUDIENCE: &str = "broker";
pub const REALM: &str = "demo";

/// The signing key of the host's own IdP (whose tokens callers present).
pub fn caller_key() -> &'static p256::ecdsa::SigningKey {
    static KEY: OnceLock<p256::ecdsa::SigningKey> = OnceLock::new();
    KEY.get_or_init(|| p256::ecdsa::SigningKey::random(&mut OsRng))
}

/// The JWKS that publishes [`caller_key`].
pub fn caller_jwks() -> jsonwebtoken::jwk::JwkSet {
    let point = caller_key().verifying_key().to_encoded_point(false);
    serde_json::from_value(json!({"keys": [{
        "kty": "EC", "kid": "host-1", "use": "sig", "alg": "ES256", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
        "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
    }]}))
    .unwrap()
}

/// The authenticator the app uses: the host IdP's issuer and audience, keys from its JWKS.
pub fn authenticator() -> JwtAuthenticator {
    JwtAuthenticator::builder(ISSUER, AUDIENCE)
        .static_jwks(caller_jwks())
        .realm(Realm::new(REALM).unwrap())
        .client_roles_of(AUDIENCE)
        .build()
        .unwrap()
}

pub fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// Keycloak-shaped claims of `who`, holding the broker's `read-token` role when `can_read`.
pub fn claims(who: &str, can_read: bool) -> Value {
    let roles: Vec<&str> = if can_read { vec!["read-token"] } else { vec![] };
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": who, "azp": "web-app",
        "iat": now(), "exp": now() + 300, "scope": "openid",
        "resource_access": { AUDIENCE: { "roles": roles } },
    })
}

/// A caller token signed by the host IdP's key.
pub fn sign(claims: &Value) -> String {
    let key = EncodingKey::from_ec_der(caller_key().to_pkcs8_der().unwrap().as_bytes());
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("host-1".into());
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

/// `who`'s token with the read role.
pub fn user(who: &str) -> String {
    sign(&claims(who, true))
}

/// Where the provider sends the browser back for `alias` on a server at `base`.
pub fn callback_url(base: &str, alias: &str) -> Url {
    format!("{base}/realms/{REALM}/broker/{alias}/endpoint")
        .parse()
        .unwrap()
}

/// A broker with one OpenID provider `alias`, found by discovery at `issuer`.
pub async fn broker(
    issuer: &Url,
    alias: &str,
    client_id: &str,
    client_secret: &str,
    redirect_uri: Url,
    store: Arc<dyn TokenStore>,
) -> TokenBroker {
    let http: SharedHttpClient = Arc::new(ReqwestClient::new().unwrap());
    let config = OidcConfig::discover(
        ProviderId::new(alias).unwrap(),
        issuer,
        client_id,
        Some(Secret::new(client_secret)),
        redirect_uri,
        &*http,
    )
    .await
    .unwrap();
    TokenBroker::builder()
        .with_oidc_provider(config, ProviderPolicy::default())
        .with_http_client(http)
        .with_store(store)
        .build()
        .unwrap()
}

/// A loopback listener, bound before the app exists so the redirect URI can name its port.
pub async fn listener() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    (listener, format!("http://{addr}"))
}

/// Serves `router` on `listener` until the test ends.
pub fn serve(listener: tokio::net::TcpListener, router: axum::Router) {
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
}

/// A JWKS endpoint of the host's IdP on loopback, whose published keys a test can change (key
/// rotation), counting how often it is fetched.
pub struct JwksServer {
    pub url: Url,
    keys: Arc<std::sync::Mutex<Value>>,
    fetches: Arc<std::sync::atomic::AtomicUsize>,
}

impl JwksServer {
    pub async fn start(jwks: Value) -> JwksServer {
        let keys = Arc::new(std::sync::Mutex::new(jwks));
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (k, f) = (keys.clone(), fetches.clone());
        let router = axum::Router::new().route(
            "/certs",
            axum::routing::get(move || {
                let (k, f) = (k.clone(), f.clone());
                async move {
                    f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    axum::Json(k.lock().unwrap().clone())
                }
            }),
        );
        let (listener, base) = listener().await;
        serve(listener, router);
        JwksServer {
            url: format!("{base}/certs").parse().unwrap(),
            keys,
            fetches,
        }
    }

    pub fn publish(&self, jwks: Value) {
        *self.keys.lock().unwrap() = jwks;
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A new ES256 key with its public JWK under `kid`.
pub fn new_key(kid: &str) -> (p256::ecdsa::SigningKey, Value) {
    let key = p256::ecdsa::SigningKey::random(&mut OsRng);
    let point = key.verifying_key().to_encoded_point(false);
    let jwk = json!({
        "kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
        "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
    });
    (key, jwk)
}

/// `claims` signed with `key` under `kid`.
pub fn sign_with(key: &p256::ecdsa::SigningKey, kid: &str, claims: &Value) -> String {
    let encoding = EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes());
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}
