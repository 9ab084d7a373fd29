//! Client authentication with signed assertions (RFC 7523 §2.2, OpenID Connect Core §9):
//! `private_key_jwt` keys, their rotation, and the assertions sent to the token, revocation
//! and introspection endpoints.
//!
//! Signing is done by the `jsonwebtoken` crate; this module only chooses the header and claims.

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;
use sha2::Digest as _;

use super::{ClientAuth, ProviderError};
use crate::secret::Secret;

/// The `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long a client assertion is valid: long enough for one request, short enough that a
/// captured one is useless soon after.
pub const CLIENT_ASSERTION_LIFETIME_SECS: u64 = 60;

/// The signature algorithm of a [`ClientAssertionKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientAssertionAlgorithm {
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (what Microsoft Entra certificate credentials use).
    Rs256,
    /// RSASSA-PSS with SHA-256 (FAPI).
    Ps256,
}

impl ClientAssertionAlgorithm {
    /// The JOSE name (`ES256`, `RS256`, `PS256`).
    pub fn name(self) -> &'static str {
        match self {
            ClientAssertionAlgorithm::Es256 => "ES256",
            ClientAssertionAlgorithm::Rs256 => "RS256",
            ClientAssertionAlgorithm::Ps256 => "PS256",
        }
    }

    fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            ClientAssertionAlgorithm::Es256 => jsonwebtoken::Algorithm::ES256,
            ClientAssertionAlgorithm::Rs256 => jsonwebtoken::Algorithm::RS256,
            ClientAssertionAlgorithm::Ps256 => jsonwebtoken::Algorithm::PS256,
        }
    }
}

/// A `private_key_jwt` key could not be loaded. The message names what is wrong, never the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client assertion key rejected: {reason}")]
pub struct ClientAssertionKeyError {
    reason: &'static str,
}

impl ClientAssertionKeyError {
    fn new(reason: &'static str) -> Self {
        ClientAssertionKeyError { reason }
    }
}

/// The private key a client signs its `private_key_jwt` assertions with, and what the header
/// tells the provider about it: `kid`, and for certificate credentials (Microsoft Entra) the
/// certificate's thumbprints `x5t` (SHA-1) and `x5t#S256` (SHA-256).
///
/// The key is a secret: `Debug` shows only the algorithm and the public header values, and
/// the key bytes are zeroized when dropped (`jsonwebtoken`'s `EncodingKey` does it).
///
/// ```
/// use tokenbroker::provider::{ClientAssertionAlgorithm, ClientAssertionKey};
/// # let pem = tokenbroker_doc_key();
/// # fn tokenbroker_doc_key() -> String {
/// #     use p256::pkcs8::EncodePrivateKey;
/// #     let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
/// #     key.to_pkcs8_pem(Default::default()).unwrap().to_string()
/// # }
/// // `pem` holds a PKCS#8 "PRIVATE KEY" read from the host's secret store.
/// let key = ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, &pem)?
///     .with_key_id("2026-11");
/// assert!(!format!("{key:?}").contains(&pem));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ClientAssertionKey {
    algorithm: ClientAssertionAlgorithm,
    key: EncodingKey,
    key_id: Option<String>,
    x5t: Option<String>,
    x5t_s256: Option<String>,
}

impl fmt::Debug for ClientAssertionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAssertionKey")
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("x5t", &self.x5t)
            .field("x5t#S256", &self.x5t_s256)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl ClientAssertionKey {
    /// Loads a PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`): a P-256 key for
    /// [`ClientAssertionAlgorithm::Es256`], an RSA key (2048 bits or more) for `Rs256` and
    /// `Ps256`. The key is tried once, so a key that cannot sign fails here and not at the
    /// first token request.
    pub fn from_pkcs8_pem(
        algorithm: ClientAssertionAlgorithm,
        pem: &str,
    ) -> Result<Self, ClientAssertionKeyError> {
        let key = match algorithm {
            ClientAssertionAlgorithm::Es256 => EncodingKey::from_ec_pem(pem.as_bytes()),
            ClientAssertionAlgorithm::Rs256 | ClientAssertionAlgorithm::Ps256 => {
                EncodingKey::from_rsa_pem(pem.as_bytes())
            }
        }
        .map_err(|_| {
            ClientAssertionKeyError::new(
                "not a PKCS#8 PEM private key of the algorithm's type (P-256 for ES256, RSA for RS256/PS256)",
            )
        })?;
        Self::checked(algorithm, key)
    }

    /// Microsoft Entra's certificate credential: the certificate's private key (PKCS#8 PEM)
    /// and the certificate itself (PEM), whose thumbprints go into the header as `x5t` and
    /// `x5t#S256`. Entra expects [`ClientAssertionAlgorithm::Rs256`] or `Ps256`.
    pub fn from_certificate_pem(
        algorithm: ClientAssertionAlgorithm,
        private_key_pem: &str,
        certificate_pem: &str,
    ) -> Result<Self, ClientAssertionKeyError> {
        Self::from_pkcs8_pem(algorithm, private_key_pem)?.with_certificate_pem(certificate_pem)
    }

    fn checked(
        algorithm: ClientAssertionAlgorithm,
        key: EncodingKey,
    ) -> Result<Self, ClientAssertionKeyError> {
        jsonwebtoken::encode(&Header::new(algorithm.jwt()), &serde_json::json!({}), &key)
            .map_err(|_| ClientAssertionKeyError::new("the key cannot sign with this algorithm"))?;
        Ok(ClientAssertionKey {
            algorithm,
            key,
            key_id: None,
            x5t: None,
            x5t_s256: None,
        })
    }

    /// Sets the `kid` header: the id of the public key registered at the provider.
    pub fn with_key_id(mut self, kid: impl Into<String>) -> Self {
        self.key_id = Some(kid.into());
        self
    }

    /// Sets `x5t` and `x5t#S256` from the certificate (DER) registered at the provider: the
    /// base64url SHA-1 and SHA-256 digests of the DER bytes.
    pub fn with_certificate_der(mut self, certificate_der: &[u8]) -> Self {
        self.x5t = Some(URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(certificate_der)));
        self.x5t_s256 = Some(URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(certificate_der)));
        self
    }

    /// Sets `x5t` and `x5t#S256` from the certificate in PEM (`-----BEGIN CERTIFICATE-----`).
    pub fn with_certificate_pem(
        self,
        certificate_pem: &str,
    ) -> Result<Self, ClientAssertionKeyError> {
        let block = pem::parse(certificate_pem)
            .map_err(|_| ClientAssertionKeyError::new("the certificate is not PEM"))?;
        if block.tag() != "CERTIFICATE" {
            return Err(ClientAssertionKeyError::new(
                "the PEM block is not a CERTIFICATE",
            ));
        }
        Ok(self.with_certificate_der(block.contents()))
    }

    /// Leaves out the SHA-1 `x5t` thumbprint, keeping only `x5t#S256`, for providers that
    /// refuse SHA-1.
    pub fn without_sha1_thumbprint(mut self) -> Self {
        self.x5t = None;
        self
    }

    /// The algorithm.
    pub fn algorithm(&self) -> ClientAssertionAlgorithm {
        self.algorithm
    }
    /// The `kid`, if set.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }
    /// The `x5t` (SHA-1) certificate thumbprint, if set.
    pub fn x5t(&self) -> Option<&str> {
        self.x5t.as_deref()
    }
    /// The `x5t#S256` certificate thumbprint, if set.
    pub fn x5t_s256(&self) -> Option<&str> {
        self.x5t_s256.as_deref()
    }
}

/// A [`ClientAssertionKey`] that can be swapped while the broker runs: every request reads the
/// current key, so [`SharedClientAssertionKey::rotate`] takes effect at the next request,
/// without rebuilding the provider. Clones share the key.
///
/// ```
/// # use tokenbroker::provider::{ClientAssertionAlgorithm, ClientAssertionKey, SharedClientAssertionKey};
/// # fn key(kid: &str) -> ClientAssertionKey {
/// #     use p256::pkcs8::EncodePrivateKey;
/// #     let k = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
/// #     let pem = k.to_pkcs8_pem(Default::default()).unwrap();
/// #     ClientAssertionKey::from_pkcs8_pem(ClientAssertionAlgorithm::Es256, &pem).unwrap().with_key_id(kid)
/// # }
/// let shared = SharedClientAssertionKey::new(key("2026-11"));
/// let handle = shared.clone(); // given to the provider configuration
/// shared.rotate(key("2026-12"));
/// assert_eq!(handle.current().key_id(), Some("2026-12"));
/// ```
#[derive(Clone)]
pub struct SharedClientAssertionKey(Arc<RwLock<Arc<ClientAssertionKey>>>);

impl SharedClientAssertionKey {
    /// Shares `key`.
    pub fn new(key: ClientAssertionKey) -> Self {
        SharedClientAssertionKey(Arc::new(RwLock::new(Arc::new(key))))
    }

    /// Replaces the key for every holder of this handle; requests already signing finish with
    /// the old one.
    pub fn rotate(&self, key: ClientAssertionKey) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
    }

    /// The current key.
    pub fn current(&self) -> Arc<ClientAssertionKey> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl From<ClientAssertionKey> for SharedClientAssertionKey {
    fn from(key: ClientAssertionKey) -> Self {
        SharedClientAssertionKey::new(key)
    }
}

impl fmt::Debug for SharedClientAssertionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedClientAssertionKey")
            .field(&*self.current())
            .finish()
    }
}

/// The `aud` of client assertions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ClientAssertionAudience {
    /// The token endpoint URL (RFC 7523 §3 allows it; Microsoft, Okta, Keycloak and
    /// `oidc-provider` accept it). The same value is sent to the revocation and introspection
    /// endpoints.
    #[default]
    TokenEndpoint,
    /// A fixed value, usually the issuer identifier, for providers that require it (FAPI 2.0,
    /// some Ping and Auth0 setups).
    Issuer(String),
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    nbf: u64,
    exp: u64,
}

/// What signs an assertion.
pub(crate) enum AssertionSigner<'a> {
    /// `client_secret_jwt`: HS256 with the client secret.
    Secret(&'a Secret),
    /// `private_key_jwt`.
    Key(&'a ClientAssertionKey),
}

/// A fresh signed client assertion: `iss` = `sub` = the client id, `aud`, a random `jti`,
/// `iat` = `nbf` = now, `exp` = now + [`CLIENT_ASSERTION_LIFETIME_SECS`].
pub(crate) fn client_assertion(
    client_id: &str,
    audience: &str,
    signer: AssertionSigner<'_>,
) -> Result<Secret, ProviderError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut jti = [0u8; 18];
    getrandom::fill(&mut jti).map_err(|_| ProviderError::Config {
        reason: "no randomness for the client assertion's jti".into(),
    })?;
    let claims = AssertionClaims {
        iss: client_id,
        sub: client_id,
        aud: audience,
        jti: URL_SAFE_NO_PAD.encode(jti),
        iat: now,
        nbf: now,
        exp: now + CLIENT_ASSERTION_LIFETIME_SECS,
    };
    let signed = match signer {
        AssertionSigner::Secret(secret) => {
            let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
            let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
            header.typ = Some("JWT".into());
            jsonwebtoken::encode(&header, &claims, &key)
        }
        AssertionSigner::Key(key) => {
            let mut header = Header::new(key.algorithm.jwt());
            header.typ = Some("JWT".into());
            header.kid = key.key_id.clone();
            header.x5t = key.x5t.clone();
            header.x5t_s256 = key.x5t_s256.clone();
            jsonwebtoken::encode(&header, &claims, &key.key)
        }
    };
    signed.map(Secret::new).map_err(|_| ProviderError::Config {
        reason: "the client assertion could not be signed".into(),
    })
}

/// The credentials a host holds for one provider, from which discovery chooses the client
/// authentication method ([`ClientCredentials::choose_client_auth`]).
///
/// ```
/// use tokenbroker::provider::{ClientAuth, ClientCredentials};
/// use tokenbroker::Secret;
///
/// let credentials = ClientCredentials::secret(Secret::new("s3cr~t"));
/// let accepted = ["client_secret_post".to_owned(), "private_key_jwt".to_owned()];
/// assert_eq!(credentials.choose_client_auth(&accepted)?, ClientAuth::Post);
/// // A public client against a provider that takes only confidential ones: an error, not a guess.
/// assert!(ClientCredentials::none().choose_client_auth(&accepted).is_err());
/// # Ok::<(), tokenbroker::ProviderError>(())
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ClientCredentials {
    /// The client secret (`client_secret_basic`, `client_secret_post`, `client_secret_jwt`).
    pub secret: Option<Secret>,
    /// The `private_key_jwt` key.
    pub assertion_key: Option<SharedClientAssertionKey>,
}

impl ClientCredentials {
    /// No credentials: a public client (`none`, with PKCE).
    pub fn none() -> Self {
        ClientCredentials::default()
    }
    /// A client secret.
    pub fn secret(secret: Secret) -> Self {
        ClientCredentials::none().with_secret(secret)
    }
    /// A `private_key_jwt` key.
    pub fn assertion_key(key: impl Into<SharedClientAssertionKey>) -> Self {
        ClientCredentials::none().with_assertion_key(key)
    }
    /// Adds a client secret.
    pub fn with_secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }
    /// Adds a `private_key_jwt` key.
    pub fn with_assertion_key(mut self, key: impl Into<SharedClientAssertionKey>) -> Self {
        self.assertion_key = Some(key.into());
        self
    }

    /// The methods these credentials allow, best first: with a key `private_key_jwt`; with a
    /// secret `client_secret_basic`, `client_secret_post`, `client_secret_jwt` (after the key's
    /// method when both are set); with neither `none`.
    pub fn usable_methods(&self) -> Vec<ClientAuth> {
        let mut methods = Vec::new();
        if self.assertion_key.is_some() {
            methods.push(ClientAuth::PrivateKeyJwt);
        }
        if self.secret.is_some() {
            methods.extend([ClientAuth::Basic, ClientAuth::Post, ClientAuth::SecretJwt]);
        }
        if methods.is_empty() {
            methods.push(ClientAuth::None);
        }
        methods
    }

    /// Chooses the first of [`ClientCredentials::usable_methods`] that the provider lists in
    /// `token_endpoint_auth_methods_supported` (`supported`; empty means RFC 8414's default,
    /// `client_secret_basic` only). Fails with [`ProviderError::ClientAuthNotAccepted`] when
    /// none is listed.
    pub fn choose_client_auth(&self, supported: &[String]) -> Result<ClientAuth, ProviderError> {
        let accepted: Vec<String> = if supported.is_empty() {
            vec![ClientAuth::Basic.method_name().to_owned()]
        } else {
            supported.to_vec()
        };
        let usable = self.usable_methods();
        if let Some(method) = usable
            .iter()
            .find(|m| accepted.iter().any(|a| a == m.method_name()))
        {
            return Ok(*method);
        }
        let configured = match (self.assertion_key.is_some(), self.secret.is_some()) {
            (true, true) => "a private key and a client secret",
            (true, false) => "a private key",
            (false, true) => "a client secret",
            (false, false) => "no credentials",
        };
        Err(ProviderError::ClientAuthNotAccepted {
            accepted,
            configured,
            usable,
        })
    }
}

impl From<Option<Secret>> for ClientCredentials {
    fn from(secret: Option<Secret>) -> Self {
        ClientCredentials {
            secret,
            assertion_key: None,
        }
    }
}
