//! The keys that sign ID tokens, and `GET /jwks`.
//!
//! Every key is made at run time, when a fake starts and on each rotation: no private key is
//! in the source, so none can leak from it or be trusted by mistake elsewhere.

use std::io;
use std::sync::{Arc, Mutex};

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::{SignatureEncoding, Signer};
use rand_core::OsRng;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

use super::grants::random_token;
use super::protocol::json_response;
use super::state::{Shared, lock};

/// The JWS algorithm of a fake's ID tokens (chosen by its flavor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SigningAlg {
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit keys.
    Rs256,
}

impl SigningAlg {
    /// The JOSE name, as in a JWS header, a JWK and discovery.
    pub(super) fn name(self) -> &'static str {
        match self {
            SigningAlg::Es256 => "ES256",
            SigningAlg::Rs256 => "RS256",
        }
    }
}

/// A private signing key and its `kid`.
pub(super) struct SigningKey {
    kid: String,
    key: KeyPair,
}

enum KeyPair {
    Es256(p256::ecdsa::SigningKey),
    Rs256(Box<rsa::pkcs1v15::SigningKey<sha2::Sha256>>),
}

impl SigningKey {
    fn generate(alg: SigningAlg) -> io::Result<Self> {
        let key = match alg {
            SigningAlg::Es256 => KeyPair::Es256(p256::ecdsa::SigningKey::random(&mut OsRng)),
            SigningAlg::Rs256 => {
                let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048).map_err(io::Error::other)?;
                KeyPair::Rs256(Box::new(rsa::pkcs1v15::SigningKey::new(key)))
            }
        };
        // Random: a `kid` names one key, and one test may start many fakes.
        let kid = random_token(&format!("fake-idp-{}-", alg.name().to_ascii_lowercase()));
        Ok(SigningKey { kid, key })
    }

    pub(super) fn kid(&self) -> &str {
        &self.kid
    }

    pub(super) fn alg(&self) -> SigningAlg {
        match self.key {
            KeyPair::Es256(_) => SigningAlg::Es256,
            KeyPair::Rs256(_) => SigningAlg::Rs256,
        }
    }

    /// The JWS signature of `message` (for ES256 the fixed-size `r || s` of RFC 7518 §3.4, not
    /// DER). Empty if signing fails, which every verifier rejects: the safe side for a test IdP.
    pub(super) fn sign(&self, message: &[u8]) -> Vec<u8> {
        match &self.key {
            KeyPair::Es256(key) => Signer::<p256::ecdsa::Signature>::try_sign(key, message)
                .map(|s| s.to_vec())
                .unwrap_or_default(),
            KeyPair::Rs256(key) => {
                Signer::<rsa::pkcs1v15::Signature>::try_sign(key.as_ref(), message)
                    .map(|s| s.to_vec())
                    .unwrap_or_default()
            }
        }
    }

    /// The public half as a JWK, with `kid`, `use` and `alg`.
    fn public_jwk(&self) -> Value {
        let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut jwk = match &self.key {
            KeyPair::Es256(key) => {
                let point = key.verifying_key().to_encoded_point(false);
                json!({
                    "kty": "EC",
                    "crv": "P-256",
                    "x": point.x().map(|x| b64(x.as_slice())),
                    "y": point.y().map(|y| b64(y.as_slice())),
                })
            }
            KeyPair::Rs256(key) => {
                let key: &rsa::RsaPrivateKey = key.as_ref().as_ref();
                json!({
                    "kty": "RSA",
                    "n": b64(&key.n().to_bytes_be()),
                    "e": b64(&key.e().to_bytes_be()),
                })
            }
        };
        jwk["kid"] = self.kid.clone().into();
        jwk["use"] = "sig".into();
        jwk["alg"] = self.alg().name().into();
        jwk
    }
}

/// RSA keys made so far in this process, in order of making. Fakes that sign with RS256 share
/// them: a fake's first key is the first here, its first rotation switches to the second, and
/// so on. A 2048-bit RSA key is slow to make (it can take seconds in an unoptimized build, where
/// a P-256 key takes a moment), so a test suite pays that once per rotation depth instead of
/// once per fake.
static RSA_KEYS: Mutex<Vec<Arc<SigningKey>>> = Mutex::new(Vec::new());

/// One fake's keys: every key that has signed, in order; the last one signs now.
pub(super) struct KeyRing {
    alg: SigningAlg,
    keys: Vec<Arc<SigningKey>>,
}

impl KeyRing {
    /// A ring with its first key.
    pub(super) fn generate(alg: SigningAlg) -> io::Result<Self> {
        Ok(KeyRing {
            alg,
            keys: vec![Self::next_key(alg, 0)?],
        })
    }

    /// The key that signs now.
    pub(super) fn current(&self) -> &SigningKey {
        // Never empty: made with one key, and keys are only added.
        &self.keys[self.keys.len() - 1]
    }

    /// The key that a ring of `alg` switches to after `used` keys: a new one for ES256, the
    /// `used`-th shared one for RS256 (made now if no fake went that far yet). Apart from
    /// [`KeyRing::rotate_to`] so that the making happens outside the state's lock; slow the
    /// first time for RSA, so off the runtime's threads where that matters.
    pub(super) fn next_key(alg: SigningAlg, used: usize) -> io::Result<Arc<SigningKey>> {
        match alg {
            SigningAlg::Es256 => SigningKey::generate(alg).map(Arc::new),
            SigningAlg::Rs256 => {
                let mut keys = lock(&RSA_KEYS);
                while keys.len() <= used {
                    keys.push(Arc::new(SigningKey::generate(alg)?));
                }
                Ok(Arc::clone(&keys[used]))
            }
        }
    }

    pub(super) fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// How many keys have signed so far.
    pub(super) fn used(&self) -> usize {
        self.keys.len()
    }

    /// Switches signing to `key`. A shared RSA key that a concurrent rotation has already
    /// switched to is not listed twice.
    pub(super) fn rotate_to(&mut self, key: Arc<SigningKey>) {
        if self.keys.iter().all(|k| k.kid != key.kid) {
            self.keys.push(key);
        }
    }

    /// The JWK set `/jwks` serves: every key that has signed, or only the current one.
    fn jwks(&self, with_retired: bool) -> Value {
        let keys: Vec<Value> = if with_retired {
            self.keys.iter().map(|k| k.public_jwk()).collect()
        } else {
            vec![self.current().public_jwk()]
        };
        json!({ "keys": keys })
    }
}

pub(super) async fn jwks_handler(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let jwks = {
        let mut st = shared.lock();
        st.counters.jwks_calls += 1;
        st.keys.jwks(st.knobs.publish_retired_keys)
    };
    json_response(StatusCode::OK, &jwks)
}
