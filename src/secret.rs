//! Secret values: tokens, client secrets, login state.
//!
//! Every token the broker handles is held in a [`Secret`]. It never prints its contents through
//! `Debug`, has no `Display`, and its buffer is zeroized when the last copy is dropped. The only
//! way to the text is [`Secret::expose_secret`], which makes every place that reads a token easy
//! to find in review.

use std::fmt;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;

/// A secret string: an access, refresh or ID token, a client secret, a PKCE verifier, a state.
///
/// Cloning is cheap (the value is shared behind an `Arc`) and the buffer is zeroized when the
/// last clone is dropped.
///
/// ```
/// use tokenbroker::Secret;
///
/// let token = Secret::new("ya29.a0Af...");
/// assert_eq!(format!("{token:?}"), "Secret([redacted])");
/// assert_eq!(token.expose_secret(), "ya29.a0Af...");
/// ```
#[derive(Clone)]
pub struct Secret(Arc<SecretString>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::new(SecretString::from(value.into())))
    }

    /// The secret text. Call this only where the value must leave the process (an HTTP request,
    /// a store write) and never to log it.
    pub fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }

    /// Compares two secrets in constant time (for the length of the shorter one).
    pub fn constant_time_eq(&self, other: &Secret) -> bool {
        let (a, b) = (
            self.expose_secret().as_bytes(),
            other.expose_secret().as_bytes(),
        );
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }

    /// The length of the secret in bytes (safe to log).
    pub fn len(&self) -> usize {
        self.expose_secret().len()
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.expose_secret().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

/// Serializes the secret text. Only [`PendingLogin`](crate::PendingLogin) uses this, and it
/// documents that its serialized form is secret. (The stored format of a link does not: it
/// writes the text through its own private structs.)
impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose_secret())
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Random URL-safe text with `bytes` bytes of entropy (state, nonce, PKCE verifier, lease holder).
pub(crate) fn random_token(bytes: usize) -> String {
    use base64::Engine as _;
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_serde_round_trips() {
        let s = Secret::new("tok-123");
        assert!(!format!("{s:?}").contains("tok-123"));
        let json = serde_json::to_string(&s).unwrap();
        let back: Secret = serde_json::from_str(&json).unwrap();
        assert!(s.constant_time_eq(&back));
        assert!(!s.constant_time_eq(&Secret::new("tok-124")));
        assert!(!s.constant_time_eq(&Secret::new("tok-1234")));
    }

    #[test]
    fn random_tokens_differ() {
        assert_ne!(random_token(32), random_token(32));
        assert_eq!(random_token(32).len(), 43);
    }
}
