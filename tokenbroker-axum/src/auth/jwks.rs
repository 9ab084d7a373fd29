//! The verification keys: a static set, or a JWKS fetched from the issuer and cached.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::Reason;

/// One verification key with what it may verify.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    pub(crate) family: AlgorithmFamily,
    /// The only algorithm the key may verify, when its owner said (a JWK's `alg`, or the
    /// algorithm given with a static key).
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

impl Key {
    /// Whether this key may verify a token signed with `alg`. The family check is what stops
    /// an RSA public key from being used as an HMAC secret.
    fn fits(&self, alg: Algorithm) -> bool {
        self.family == alg.family() && self.alg.is_none_or(|own| own == alg)
    }

    /// A JWK as a verification key, or `None` for keys not meant for verifying signatures
    /// (encryption keys, unknown algorithms) and, unless `allow_hmac`, symmetric keys.
    pub(crate) fn from_jwk(jwk: &Jwk, allow_hmac: bool) -> Option<Key> {
        if jwk
            .common
            .public_key_use
            .as_ref()
            .is_some_and(|u| *u != PublicKeyUse::Signature)
        {
            return None;
        }
        if jwk
            .common
            .key_operations
            .as_ref()
            .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
        {
            return None;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
            AlgorithmParameters::OctetKey(_) if allow_hmac => AlgorithmFamily::Hmac,
            AlgorithmParameters::OctetKey(_) => return None,
        };
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(own) => {
                // A key declared for encryption (or an algorithm we do not know) never verifies.
                let alg = signing_algorithm(own)?;
                if alg.family() != family {
                    return None;
                }
                Some(alg)
            }
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(Key {
            kid: jwk.common.key_id.clone(),
            family,
            alg,
            key,
        })
    }
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The outcome of looking a token's key up in a set.
pub(crate) enum Lookup<'a> {
    Found(&'a Key),
    /// No key could be the one; a fresh JWKS might have it.
    Missing,
    /// A definite no that a re-fetch would not change.
    Rejected(Reason),
}

/// Finds the key for a token with header `kid` and `alg`.
pub(crate) fn lookup<'a>(keys: &'a [Key], kid: Option<&str>, alg: Algorithm) -> Lookup<'a> {
    match kid {
        Some(kid) => match keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
            Some(key) if key.fits(alg) => Lookup::Found(key),
            Some(_) => Lookup::Rejected(Reason::KeyMismatch),
            None => Lookup::Missing,
        },
        // Without a `kid`, trying every key in turn would let a token pick its key; accept
        // it only when the choice is not a choice.
        None => {
            let mut fitting = keys.iter().filter(|k| k.fits(alg));
            match (fitting.next(), fitting.next()) {
                (Some(key), None) => Lookup::Found(key),
                (None, _) => Lookup::Missing,
                (Some(_), Some(_)) => Lookup::Rejected(Reason::AmbiguousKey),
            }
        }
    }
}

/// A JWKS document, each key parsed on its own so that one key of a type `jsonwebtoken` does
/// not know does not hide the others.
#[derive(serde::Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

/// A snapshot of the fetched keys.
pub(crate) struct Snapshot {
    pub(crate) keys: Arc<Vec<Key>>,
    /// Bumped on every successful fetch, so a waiter can tell that someone else fetched.
    pub(crate) generation: u64,
    fetched_at: Option<Instant>,
}

/// When fetches were last tried; only touched while holding the fetch lock.
#[derive(Default)]
struct FetchLog {
    /// The last fetch made for a `kid` not in the cache.
    last_unknown_kid_fetch: Option<Instant>,
    /// The last failed fetch of any kind: no fetch at all for an interval after it, so an
    /// unreachable IdP is not hammered by every request.
    last_failure: Option<Instant>,
}

/// The keys published at a JWKS URL, fetched lazily and cached.
pub(crate) struct RemoteJwks {
    pub(crate) url: Url,
    client: reqwest::Client,
    ttl: Duration,
    refetch_interval: Duration,
    cache: RwLock<Snapshot>,
    // Held across the fetch, so concurrent requests that need new keys share one fetch.
    fetch: Mutex<FetchLog>,
}

/// Why [`RemoteJwks::refresh`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// The cache is empty or older than its lifetime.
    Stale,
    /// A token names a `kid` the cache does not have.
    UnknownKid,
}

const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

impl RemoteJwks {
    pub(crate) fn new(
        url: Url,
        client: reqwest::Client,
        ttl: Duration,
        refetch_interval: Duration,
    ) -> Self {
        RemoteJwks {
            url,
            client,
            ttl,
            refetch_interval,
            cache: RwLock::new(Snapshot {
                keys: Arc::new(Vec::new()),
                generation: 0,
                fetched_at: None,
            }),
            fetch: Mutex::new(FetchLog::default()),
        }
    }

    /// The cached keys, and whether they are missing or past their lifetime.
    pub(crate) fn snapshot(&self) -> (Arc<Vec<Key>>, u64, bool) {
        let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
        let stale = cache.fetched_at.is_none_or(|at| at.elapsed() >= self.ttl);
        (Arc::clone(&cache.keys), cache.generation, stale)
    }

    /// Fetches the JWKS again unless someone did since `seen_generation` or the rate limit
    /// forbids it. Returns the keys to use from now on and their generation: new ones when a
    /// fetch (ours or a concurrent one) succeeded, `None` otherwise. A failed fetch keeps the
    /// old cache.
    pub(crate) async fn refresh(
        &self,
        seen_generation: u64,
        trigger: Trigger,
    ) -> Option<(Arc<Vec<Key>>, u64)> {
        let mut log = match trigger {
            // Stale keys are still good while someone else fetches; only the request that
            // fetches waits for the IdP (up to the time-out when it is down).
            Trigger::Stale if seen_generation > 0 => self.fetch.try_lock().ok()?,
            _ => self.fetch.lock().await,
        };
        {
            let cache = self.cache.read().unwrap_or_else(|e| e.into_inner());
            if cache.generation != seen_generation {
                return Some((Arc::clone(&cache.keys), cache.generation));
            }
        }
        let recent =
            |at: Option<Instant>| at.is_some_and(|at| at.elapsed() < self.refetch_interval);
        if recent(log.last_failure) {
            tracing::debug!(url = %self.url, ?trigger, "JWKS fetch skipped: one failed recently");
            return None;
        }
        if trigger == Trigger::UnknownKid {
            if recent(log.last_unknown_kid_fetch) {
                tracing::debug!(url = %self.url, "JWKS re-fetch for an unknown kid skipped: rate limited");
                return None;
            }
            log.last_unknown_kid_fetch = Some(Instant::now());
        }
        match self.fetch_keys().await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
                cache.keys = Arc::clone(&keys);
                cache.generation += 1;
                cache.fetched_at = Some(Instant::now());
                tracing::debug!(url = %self.url, keys = keys.len(), ?trigger, "JWKS fetched");
                Some((keys, cache.generation))
            }
            Err(error) => {
                log.last_failure = Some(Instant::now());
                tracing::warn!(url = %self.url, ?trigger, %error, "JWKS fetch failed; keeping the cached keys");
                None
            }
        }
    }

    async fn fetch_keys(&self) -> Result<Vec<Key>, FetchError> {
        let response = self
            .client
            .get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .timeout(FETCH_TIMEOUT)
            .send()
            .await?
            .error_for_status()?;
        let body = response.bytes().await?;
        let raw: RawJwks = serde_json::from_slice(&body)?;
        Ok(raw
            .keys
            .into_iter()
            .filter_map(|value| serde_json::from_value::<Jwk>(value).ok())
            // An IdP publishing a shared secret would be handing it to everyone.
            .filter_map(|jwk| Key::from_jwk(&jwk, false))
            .collect())
    }
}

#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(transparent)]
    Http(#[from] reqwest::Error),
    #[error("the JWKS does not parse: {0}")]
    Json(#[from] serde_json::Error),
}
