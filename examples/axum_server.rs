//! Serving Keycloak's broker routes with the `tokenbroker-axum` adapter.
//!
//! ```sh
//! cargo run --example axum_server          # against an in-process fake IdP, on 127.0.0.1:3000
//! ```
//!
//! Routes (see `tokenbroker_axum::broker_router`): `GET|POST /realms/{realm}/broker/{alias}/login`,
//! `GET .../endpoint` (the provider's redirect back), `GET .../token`, `GET|DELETE .../link`, and
//! `POST /realms/{realm}/protocol/openid-connect/token` (RFC 8693 token exchange).
//!
//! | variable | default | |
//! |---|---|---|
//! | `TB_LISTEN` | `127.0.0.1:3000` | listen address |
//! | `TB_REALM` | `demo` | the realm of the callers |
//! | `TB_OIDC_ISSUER`, `TB_CLIENT_ID`, `TB_CLIENT_SECRET` | (fake IdP) | the upstream provider to discover, and the client registered there |
//! | `TB_SCOPES` | (none) | scopes to ask for besides `openid`, space-separated (e.g. `email offline_access`) |
//! | `TB_CALLER_ISSUER`, `TB_CALLER_AUDIENCE`, `TB_CALLER_JWKS_URL` | (dev key) | the host's own IdP, whose access tokens callers present |
//!
//! Without `TB_CALLER_JWKS_URL`, callers are verified against an ES256 key made at start, and a
//! token for `alice` is printed. Logins in progress live in a `tower-sessions` memory store and
//! tokens in a `MemoryStore`: use shared stores when running more than one instance.

use std::sync::Arc;

use tokenbroker::http::{ReqwestClient, SharedHttpClient};
use tokenbroker::provider::OidcConfig;
use tokenbroker::testing::FakeIdp;
use tokenbroker::{ProviderId, ProviderPolicy, Realm, Scopes, Secret, TokenBroker};
use tokenbroker_axum::{JwtAuthenticator, broker_router};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The app: the adapter's routes over a broker with one OpenID provider, `alias`.
pub async fn app(
    alias: &str,
    (issuer, client_id, client_secret): (url::Url, String, Option<Secret>),
    redirect_uri: url::Url,
    auth: JwtAuthenticator,
) -> Result<(axum::Router, TokenBroker), Box<dyn std::error::Error>> {
    let http: SharedHttpClient = Arc::new(ReqwestClient::new()?);
    let provider = ProviderId::new(alias)?;
    let secure = redirect_uri.scheme() == "https";
    let config = OidcConfig::discover(
        provider,
        &issuer,
        &client_id,
        client_secret,
        redirect_uri,
        &*http,
    )
    .await?;
    // Discovery asks for `openid` only; anything else is set with the builder methods.
    let config = match env("TB_SCOPES") {
        Some(scopes) => config.with_additional_scopes(Scopes::parse(&scopes)),
        None => config,
    };
    let broker = TokenBroker::builder()
        .with_oidc_provider(config, ProviderPolicy::default())
        .with_http_client(http)
        .build()?;
    let router = broker_router(broker.clone(), auth)
        .secure_cookie(secure)
        .build(tower_sessions::MemoryStore::default());
    Ok((router, broker))
}

/// An authenticator for a key made here, and a caller token for `alice` signed with it.
pub fn dev_authenticator(
    realm: Realm,
) -> Result<(JwtAuthenticator, String), Box<dyn std::error::Error>> {
    use base64::Engine as _;
    use p256::pkcs8::EncodePrivateKey;
    let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
    let point = key.verifying_key().to_encoded_point(false);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let (x, y) = (b64(point.x().ok_or("x")?), b64(point.y().ok_or("y")?));
    let alg = jsonwebtoken::Algorithm::ES256;
    let auth = JwtAuthenticator::builder("dev-issuer", "broker")
        .static_key(
            None,
            jsonwebtoken::DecodingKey::from_ec_components(&x, &y)?,
            alg,
        )
        .algorithms(&[alg])
        .realm(realm)
        .client_roles_of("broker")
        .build()?;
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "iss": "dev-issuer", "aud": "broker", "sub": "alice", "azp": "example-client",
        "iat": now, "exp": now + 3600, "scope": "openid",
        "resource_access": { "broker": { "roles": ["read-token"] } },
    });
    let signing = jsonwebtoken::EncodingKey::from_ec_der(key.to_pkcs8_der()?.as_bytes());
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &signing)?;
    Ok((auth, token))
}

#[tokio::main]
pub async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let listen = env("TB_LISTEN").unwrap_or_else(|| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    let realm = Realm::new(env("TB_REALM").as_deref().unwrap_or("demo"))?;

    // The upstream provider: a real one from the environment, or a fake IdP in-process.
    let mut _fake_idp = None; // kept until the end: it stops when dropped
    let (alias, upstream) = match env("TB_OIDC_ISSUER") {
        Some(issuer) => {
            let client_id = env("TB_CLIENT_ID").ok_or("TB_OIDC_ISSUER needs TB_CLIENT_ID")?;
            (
                "oidc",
                (
                    issuer.parse()?,
                    client_id,
                    env("TB_CLIENT_SECRET").map(Secret::new),
                ),
            )
        }
        None => {
            let idp = FakeIdp::start_default().await?;
            let upstream = (
                idp.issuer().parse()?,
                idp.client_id().to_owned(),
                Some(Secret::new(idp.client_secret())),
            );
            _fake_idp = Some(idp);
            ("fake", upstream)
        }
    };
    let redirect_uri: url::Url =
        format!("http://{addr}/realms/{realm}/broker/{alias}/endpoint").parse()?;
    println!("redirect URI to register at the provider: {redirect_uri}");

    // The callers: the host IdP's tokens, or a dev key made here.
    let auth = match (env("TB_CALLER_ISSUER"), env("TB_CALLER_JWKS_URL")) {
        (Some(issuer), Some(jwks)) => JwtAuthenticator::builder(
            issuer,
            env("TB_CALLER_AUDIENCE").unwrap_or_else(|| "broker".into()),
        )
        .jwks_url(jwks.parse()?)
        .realm(realm.clone())
        .client_roles_of("broker")
        .build()?,
        _ => {
            let (auth, token) = dev_authenticator(realm.clone())?;
            println!("caller token for alice (1 h): {token}");
            auth
        }
    };

    let (router, _broker) = app(alias, upstream, redirect_uri, auth).await?;
    println!("listening on http://{addr}/realms/{realm}/broker/{alias}/{{login,token,link}}");
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
