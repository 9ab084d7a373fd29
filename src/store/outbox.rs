//! The revocation outbox: revocations the broker owes providers, kept in the store until a
//! provider confirms them.
//!
//! Unlinking deletes a link and, in the same atomic step, writes the revocation it owes
//! ([`TokenStore::delete_and_enqueue_revocation`]). Only then does the broker call the
//! provider. A crash, an outage or a time-out between the two leaves the entry behind, and the
//! next [`TokenBroker::drain_revocations`](crate::TokenBroker::drain_revocations) (on any
//! instance) finishes the job. Revoking a token twice is harmless (RFC 7009 §2.2: the provider
//! answers 200 for a token it no longer knows), so claims only keep instances from doing the
//! same work at once; they are not needed for correctness.
//!
//! [`TokenStore::delete_and_enqueue_revocation`]: super::TokenStore::delete_and_enqueue_revocation

use std::fmt;
use std::sync::Arc;

use time::OffsetDateTime;

use crate::ids::TokenKey;
use crate::token::Payload;

/// The id of one owed revocation: random, unique, not secret.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RevocationId(Arc<str>);

impl RevocationId {
    /// A fresh random id (128 bits).
    pub fn random() -> Self {
        RevocationId(crate::secret::random_token(16).into())
    }

    /// An id a store read back.
    pub fn new(id: impl Into<String>) -> Self {
        RevocationId(id.into().into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RevocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RevocationId({})", self.0)
    }
}

impl fmt::Display for RevocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A revocation the broker owes a provider, as kept in a store's outbox.
///
/// The payload is the token set of the deleted link, encoded like a record's payload: it is a
/// secret, and [`EncryptedStore`](crate::EncryptedStore) encrypts it as it encrypts records.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PendingRevocation {
    /// Its id.
    pub id: RevocationId,
    /// The link it came from; its provider alias says which provider to call.
    pub key: TokenKey,
    /// The tokens to revoke (secret).
    pub payload: Payload,
    /// How many times it was claimed, including the current claim. It is the claim's fence:
    /// [`TokenStore::reschedule_revocation`](super::TokenStore::reschedule_revocation) acts
    /// only while it is unchanged.
    pub attempts: u32,
    /// When it may next be claimed (by the broker's clock).
    pub due_at: OffsetDateTime,
    /// When it was first written.
    pub created_at: OffsetDateTime,
}

impl PendingRevocation {
    /// A new entry with a fresh id, claimed by its writer until `due_at` (`attempts` = 1): the
    /// writer tries the provider at once, and others take over only if it has not finished by
    /// then.
    pub fn new(
        key: TokenKey,
        payload: Payload,
        created_at: OffsetDateTime,
        due_at: OffsetDateTime,
    ) -> Self {
        PendingRevocation {
            id: RevocationId::random(),
            key,
            payload,
            attempts: 1,
            due_at,
            created_at,
        }
    }

    /// Rebuilds an entry a store read back (for store implementations).
    pub fn from_parts(
        id: RevocationId,
        key: TokenKey,
        payload: Payload,
        attempts: u32,
        due_at: OffsetDateTime,
        created_at: OffsetDateTime,
    ) -> Self {
        PendingRevocation {
            id,
            key,
            payload,
            attempts,
            due_at,
            created_at,
        }
    }

    /// The same entry with another payload (for stores that encrypt it).
    pub fn with_payload(&self, payload: Payload) -> Self {
        PendingRevocation {
            payload,
            ..self.clone()
        }
    }
}
