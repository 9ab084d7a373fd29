//! What happened: typed events for hosts (metrics, audit, webhooks) and `tracing`.
//!
//! Every event goes to `tracing` (target `tokenbroker`) and to the broker's [`EventSink`], if
//! one is set. Events carry keys, reasons and counts, never a token.

use std::fmt::Debug;
use std::time::Duration;

use crate::access::DenyReason;
use crate::account::UpstreamAccount;
use crate::ids::{Subject, TokenKey};

/// The outcome of an upstream revocation (on unlink, on a re-link that replaced another
/// account's grant, and for each entry a [`drain`](crate::TokenBroker::drain_revocations)
/// settles).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RevocationStatus {
    /// The provider accepted the revocation.
    Revoked,
    /// The provider has no revocation endpoint; the grant stays alive upstream until it
    /// expires or the user revokes it there.
    NotSupported,
    /// The revocation failed and will not be tried again; the message says why (no token in
    /// it).
    Failed(String),
    /// There was nothing to revoke (no record, or no token).
    NothingToRevoke,
    /// The revocation failed for now. It is kept in the store's outbox, and
    /// [`drain_revocations`](crate::TokenBroker::drain_revocations) (or a sweep), on any
    /// instance, tries it again from `retry_at` until the provider takes it.
    Deferred {
        /// Why the last try failed (no token in it).
        reason: String,
        /// When it may be tried again.
        retry_at: time::OffsetDateTime,
    },
    /// The token had expired before it could be revoked: nothing is left to revoke.
    Expired,
}

/// Something the broker did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerEvent {
    /// A user linked a provider (first time, or again after `relink`).
    Linked {
        /// The link.
        key: TokenKey,
        /// Whether a record existed before.
        relinked: bool,
        /// The upstream account the link now holds, when the provider said.
        account: Option<UpstreamAccount>,
    },
    /// A re-link brought another upstream account's tokens: the link's tokens were replaced
    /// (never merged), and the previous account's grant was revoked upstream where the provider
    /// supports it.
    AccountChanged {
        /// The link.
        key: TokenKey,
        /// The account the link held before, when it was known.
        previous: Option<UpstreamAccount>,
        /// What happened to the previous account's grant upstream.
        revocation: RevocationStatus,
    },
    /// A refresh answered with an ID token naming another account than the link's (OpenID
    /// Connect Core §12.2). Nothing of that answer was stored or served; the link was marked
    /// relink-required.
    AccountMismatch {
        /// The link.
        key: TokenKey,
    },
    /// A refresh succeeded and was stored.
    Refreshed {
        /// The link.
        key: TokenKey,
        /// Whether the provider rotated the refresh token.
        rotated: bool,
    },
    /// Another writer changed the record first; its tokens were used.
    LostRace {
        /// The link.
        key: TokenKey,
    },
    /// The provider refused the grant; the link was marked.
    RelinkRequired {
        /// The link.
        key: TokenKey,
        /// The provider's reason.
        reason: String,
    },
    /// A refresh failed in a way that may pass; the record is unchanged.
    TransientFailure {
        /// The link.
        key: TokenKey,
        /// The HTTP status, if an answer arrived.
        status: Option<u16>,
        /// When the broker will try again.
        retry_after: Option<Duration>,
        /// Whether a still-valid access token was served instead.
        served_stale: bool,
    },
    /// A link that had been failing transiently refreshed successfully again.
    Recovered {
        /// The link.
        key: TokenKey,
        /// How many consecutive failures preceded the recovery.
        failures: u32,
    },
    /// A read was allowed.
    ReadAllowed {
        /// The link read.
        key: TokenKey,
        /// Who read it.
        caller: Subject,
        /// Through which client.
        client_id: String,
    },
    /// A read was denied.
    ReadDenied {
        /// The link asked for.
        key: TokenKey,
        /// Who asked.
        caller: Subject,
        /// Through which client.
        client_id: String,
        /// Why.
        reason: DenyReason,
    },
    /// A link was removed.
    Unlinked {
        /// The link.
        key: TokenKey,
        /// What happened upstream.
        revocation: RevocationStatus,
    },
    /// Another writer (a re-link without a new refresh token, a key rotation, another holder)
    /// wrote the record during a refresh, but its record still held the refresh token that
    /// refresh had just spent: the rotated tokens were written on top of it, so they are not
    /// lost.
    MergedOntoConcurrentWrite {
        /// The link.
        key: TokenKey,
    },
    /// A narrowed read (narrower scopes or one audience) failed; the link itself is untouched.
    NarrowedRefreshFailed {
        /// The link.
        key: TokenKey,
        /// Why, without any token.
        reason: String,
    },
    /// The provider rotated the refresh token but the store did not take the new tokens within
    /// the lease. They are kept in this process's memory and written in the background; a
    /// process exit before [`BrokerEvent::ParkedWriteResolved`] loses them.
    WriteParked {
        /// The link.
        key: TokenKey,
    },
    /// A revocation owed to a provider (after an unlink, a re-link to another account, or a
    /// link deleted during its refresh) was settled: revoked, not supported, expired, or given
    /// up. It has left the store's outbox.
    RevocationSettled {
        /// The link it came from.
        key: TokenKey,
        /// How it ended.
        outcome: RevocationStatus,
        /// How many tries it took.
        attempts: u32,
    },
    /// A try of an owed revocation failed; it stays in the store's outbox for a later drain.
    RevocationDeferred {
        /// The link it came from.
        key: TokenKey,
        /// Tries so far.
        attempts: u32,
        /// When it may be tried again.
        retry_at: time::OffsetDateTime,
        /// Why this try failed (no token in it).
        reason: String,
    },
    /// A parked write ended: stored, or dropped because the record changed in a way that
    /// made it moot (unlinked, or a newer refresh token was written by someone else).
    ParkedWriteResolved {
        /// The link.
        key: TokenKey,
        /// Whether the parked tokens were written.
        stored: bool,
        /// How many write attempts it took.
        attempts: u32,
    },
}

/// Receives broker events. Called inline: keep it fast and non-blocking (send to a channel).
pub trait EventSink: Debug + Send + Sync + 'static {
    /// Handles one event.
    fn emit(&self, event: &BrokerEvent);
}

pub(crate) fn trace(event: &BrokerEvent) {
    match event {
        BrokerEvent::ReadAllowed { key, .. } => {
            tracing::debug!(target: "tokenbroker", %key, "read allowed")
        }
        BrokerEvent::ReadDenied {
            key,
            caller,
            reason,
            ..
        } => {
            tracing::info!(target: "tokenbroker", %key, %caller, ?reason, "read denied")
        }
        BrokerEvent::TransientFailure { key, status, .. } => {
            tracing::warn!(target: "tokenbroker", %key, ?status, "transient refresh failure")
        }
        BrokerEvent::RelinkRequired { key, reason } => {
            tracing::warn!(target: "tokenbroker", %key, %reason, "relink required")
        }
        BrokerEvent::WriteParked { key } => {
            tracing::error!(target: "tokenbroker", %key, "refreshed tokens could not be stored; kept in memory and retried")
        }
        BrokerEvent::RevocationDeferred {
            key,
            attempts,
            reason,
            ..
        } => {
            tracing::warn!(target: "tokenbroker", %key, attempts, %reason, "revocation failed; kept in the outbox")
        }
        BrokerEvent::NarrowedRefreshFailed { key, reason } => {
            tracing::warn!(target: "tokenbroker", %key, %reason, "narrowed refresh failed")
        }
        other => tracing::info!(target: "tokenbroker", event = ?other),
    }
}
