//! Metrics and spans: what the broker reports to the host's observability stack.
//!
//! # Metrics
//!
//! Recorded through the [`metrics`](https://docs.rs/metrics/0.24) facade: the host installs
//! the recorder (exporter) it wants — Prometheus, OpenTelemetry, StatsD — and the library
//! depends on none. **Install the recorder before building the broker**: the broker resolves
//! its metric handles once, when it is built (one handle per provider and outcome), so that a
//! cached read costs an atomic increment rather than a registry lookup. A broker built while
//! no recorder is installed records nothing.
//!
//! Labels are low-cardinality only: `provider` is a configured provider alias (a read of an
//! alias the broker does not serve is counted under `provider="unknown"`, so a caller cannot
//! mint label values), and `outcome` is one of the fixed values below. No label ever holds a
//! subject, a realm, a caller, or a token.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `tokenbroker_reads_total` | counter | `provider`, `outcome` | reads (`retrieve`, `retrieve_in_session`, `retrieve_narrowed`) by outcome: `served` (cached, no refresh), `refreshed` (this read refreshed or joined a refresh), `stale` (provider failing, a still-valid token inside the skew served), `denied` (authorization refused), `not_found`, `error` (anything else, including `Error::ShuttingDown`) |
//! | `tokenbroker_read_duration_seconds` | histogram | `provider` | wall time of a read, as its caller sees it (authorization, load, any refresh) |
//! | `tokenbroker_refreshes_total` | counter | `provider`, `outcome` | what each turn of a refresh flight came to: `refreshed` (stored, same refresh token), `rotated` (stored, the provider rotated the refresh token), `joined` (another instance or a just-finished flight had already refreshed), `lost_race` (another writer stored a newer refresh token first), `relink_required` (verified `invalid_grant`), `account_mismatch`, `transient` (5xx, 429, time-out: record unchanged), `rejected` (another provider error), `narrowed_refused`, `backoff` (skipped: the key backs off), `parked` (rotated but the store would not take it; kept in memory), `shutting_down` (not started: the broker is shutting down) |
//! | `tokenbroker_refresh_duration_seconds` | histogram | `provider` | the provider call of a refresh (the token endpoint round trip), whatever it answered |
//! | `tokenbroker_lease_waits_total` | counter | `provider` | flights that found the store's lease held by another instance and waited for it |
//! | `tokenbroker_lease_takeovers_total` | counter | `provider` | leases of this instance taken over by another holder while a refresh was writing (the write went on unfenced, protected by the record's version) |
//! | `tokenbroker_links_active` | gauge | `provider` | links neither backing off nor relink-required, as the last complete [`sweep`](crate::TokenBroker::sweep) counted them |
//! | `tokenbroker_links_backoff` | gauge | `provider` | links backing off after transient failures, as of the last complete sweep |
//! | `tokenbroker_links_relink_required` | gauge | `provider` | links marked relink-required, as of the last complete sweep |
//! | `tokenbroker_revocations_total` | counter | `provider`, `outcome` | each try of a revocation owed after an unlink, a re-link to another account or a link deleted mid-refresh (see [`drain_revocations`](crate::TokenBroker::drain_revocations)): `revoked`, `not_supported`, `expired` (the token had expired anyway), `deferred` (failed; kept in the store's outbox for a later drain), `given_up` (failed for longer than the drain allows, or undecodable) |
//!
//! The gauges are set only by a sweep that scanned every link (not one whose time budget ran
//! out). Refresh outcomes are counted per turn under the lease, so one read that loses a race
//! and then refreshes counts `lost_race` and `refreshed`.
//!
//! # Spans
//!
//! `tracing` spans, target `tokenbroker`: `tokenbroker.read` (`DEBUG`, around every read),
//! `tokenbroker.refresh` (`INFO`, the engine's flight: it follows from the read that started
//! it but is not its child, since it outlives it), `tokenbroker.login` (`begin_login`,
//! `complete_login`), `tokenbroker.unlink` and `tokenbroker.shutdown` (`INFO`). Their fields are
//! `provider` (the key's provider alias) and `subject_hash`: the first 8 bytes of
//! SHA-256(salt ‖ subject), in hex, with a salt drawn at random once per process. The hash
//! correlates the spans of one user within one process's logs without naming them; it is not
//! stable across restarts. No span field holds a token, a secret, or the plain subject. The
//! existing events (see [`crate::events`]) are unchanged.

use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};
use sha2::{Digest, Sha256};

use crate::ids::Subject;

/// `tokenbroker_reads_total`.
pub const READS: &str = "tokenbroker_reads_total";
/// `tokenbroker_read_duration_seconds`.
pub const READ_DURATION: &str = "tokenbroker_read_duration_seconds";
/// `tokenbroker_refreshes_total`.
pub const REFRESHES: &str = "tokenbroker_refreshes_total";
/// `tokenbroker_refresh_duration_seconds`.
pub const REFRESH_DURATION: &str = "tokenbroker_refresh_duration_seconds";
/// `tokenbroker_lease_waits_total`.
pub const LEASE_WAITS: &str = "tokenbroker_lease_waits_total";
/// `tokenbroker_lease_takeovers_total`.
pub const LEASE_TAKEOVERS: &str = "tokenbroker_lease_takeovers_total";
/// `tokenbroker_links_active`.
pub const LINKS_ACTIVE: &str = "tokenbroker_links_active";
/// `tokenbroker_links_backoff`.
pub const LINKS_BACKOFF: &str = "tokenbroker_links_backoff";
/// `tokenbroker_revocations_total`.
pub const REVOCATIONS: &str = "tokenbroker_revocations_total";
/// `tokenbroker_links_relink_required`.
pub const LINKS_RELINK_REQUIRED: &str = "tokenbroker_links_relink_required";

/// The `provider` label of reads of an alias this broker does not serve.
pub const UNKNOWN_PROVIDER: &str = "unknown";

/// How a read ended (the `outcome` of `tokenbroker_reads_total`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReadOutcome {
    Served,
    Refreshed,
    Stale,
    Denied,
    NotFound,
    Error,
}

impl ReadOutcome {
    const ALL: [ReadOutcome; 6] = [
        ReadOutcome::Served,
        ReadOutcome::Refreshed,
        ReadOutcome::Stale,
        ReadOutcome::Denied,
        ReadOutcome::NotFound,
        ReadOutcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            ReadOutcome::Served => "served",
            ReadOutcome::Refreshed => "refreshed",
            ReadOutcome::Stale => "stale",
            ReadOutcome::Denied => "denied",
            ReadOutcome::NotFound => "not_found",
            ReadOutcome::Error => "error",
        }
    }
}

/// What a turn of a refresh flight came to (the `outcome` of `tokenbroker_refreshes_total`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum RefreshOutcome {
    Refreshed,
    Rotated,
    Joined,
    LostRace,
    RelinkRequired,
    AccountMismatch,
    Transient,
    Rejected,
    NarrowedRefused,
    Backoff,
    Parked,
    ShuttingDown,
}

impl RefreshOutcome {
    const ALL: [RefreshOutcome; 12] = [
        RefreshOutcome::Refreshed,
        RefreshOutcome::Rotated,
        RefreshOutcome::Joined,
        RefreshOutcome::LostRace,
        RefreshOutcome::RelinkRequired,
        RefreshOutcome::AccountMismatch,
        RefreshOutcome::Transient,
        RefreshOutcome::Rejected,
        RefreshOutcome::NarrowedRefused,
        RefreshOutcome::Backoff,
        RefreshOutcome::Parked,
        RefreshOutcome::ShuttingDown,
    ];

    fn label(self) -> &'static str {
        match self {
            RefreshOutcome::Refreshed => "refreshed",
            RefreshOutcome::Rotated => "rotated",
            RefreshOutcome::Joined => "joined",
            RefreshOutcome::LostRace => "lost_race",
            RefreshOutcome::RelinkRequired => "relink_required",
            RefreshOutcome::AccountMismatch => "account_mismatch",
            RefreshOutcome::Transient => "transient",
            RefreshOutcome::Rejected => "rejected",
            RefreshOutcome::NarrowedRefused => "narrowed_refused",
            RefreshOutcome::Backoff => "backoff",
            RefreshOutcome::Parked => "parked",
            RefreshOutcome::ShuttingDown => "shutting_down",
        }
    }
}

/// How one try of an owed revocation ended (the `outcome` of `tokenbroker_revocations_total`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum RevocationOutcome {
    Revoked,
    NotSupported,
    Expired,
    Deferred,
    GivenUp,
}

impl RevocationOutcome {
    const ALL: [RevocationOutcome; 5] = [
        RevocationOutcome::Revoked,
        RevocationOutcome::NotSupported,
        RevocationOutcome::Expired,
        RevocationOutcome::Deferred,
        RevocationOutcome::GivenUp,
    ];

    fn label(self) -> &'static str {
        match self {
            RevocationOutcome::Revoked => "revoked",
            RevocationOutcome::NotSupported => "not_supported",
            RevocationOutcome::Expired => "expired",
            RevocationOutcome::Deferred => "deferred",
            RevocationOutcome::GivenUp => "given_up",
        }
    }
}

/// The metric handles of one provider, resolved once when the broker is built against the
/// recorder installed then (global, or the thread's local one).
#[derive(Debug, Clone)]
pub(crate) struct ProviderMetrics {
    reads: [Counter; ReadOutcome::ALL.len()],
    read_duration: Histogram,
    refreshes: [Counter; RefreshOutcome::ALL.len()],
    refresh_duration: Histogram,
    pub(crate) lease_waits: Counter,
    pub(crate) lease_takeovers: Counter,
    pub(crate) links_active: Gauge,
    pub(crate) links_backoff: Gauge,
    pub(crate) links_relink_required: Gauge,
    revocations: [Counter; RevocationOutcome::ALL.len()],
}

impl ProviderMetrics {
    pub(crate) fn new(provider: &str) -> Self {
        let p = provider.to_owned();
        ProviderMetrics {
            reads: ReadOutcome::ALL
                .map(|o| metrics::counter!(READS, "provider" => p.clone(), "outcome" => o.label())),
            read_duration: metrics::histogram!(READ_DURATION, "provider" => p.clone()),
            refreshes: RefreshOutcome::ALL.map(
                |o| metrics::counter!(REFRESHES, "provider" => p.clone(), "outcome" => o.label()),
            ),
            refresh_duration: metrics::histogram!(REFRESH_DURATION, "provider" => p.clone()),
            lease_waits: metrics::counter!(LEASE_WAITS, "provider" => p.clone()),
            lease_takeovers: metrics::counter!(LEASE_TAKEOVERS, "provider" => p.clone()),
            links_active: metrics::gauge!(LINKS_ACTIVE, "provider" => p.clone()),
            links_backoff: metrics::gauge!(LINKS_BACKOFF, "provider" => p.clone()),
            links_relink_required: metrics::gauge!(LINKS_RELINK_REQUIRED, "provider" => p.clone()),
            revocations: RevocationOutcome::ALL.map(
                |o| metrics::counter!(REVOCATIONS, "provider" => p.clone(), "outcome" => o.label()),
            ),
        }
    }

    /// Counts a read and records its duration.
    pub(crate) fn read(&self, outcome: ReadOutcome, took: Duration) {
        self.reads[outcome as usize].increment(1);
        self.read_duration.record(took.as_secs_f64());
    }

    /// Counts what a refresh turn came to.
    pub(crate) fn refresh(&self, outcome: RefreshOutcome) {
        self.refreshes[outcome as usize].increment(1);
    }

    /// Counts one try of an owed revocation.
    pub(crate) fn revocation(&self, outcome: RevocationOutcome) {
        self.revocations[outcome as usize].increment(1);
    }

    /// Records how long a provider call took.
    pub(crate) fn provider_call(&self, took: Duration) {
        self.refresh_duration.record(took.as_secs_f64());
    }
}

/// The process's salt for subject hashes: random, drawn once.
fn salt() -> &'static [u8; 16] {
    static SALT: OnceLock<[u8; 16]> = OnceLock::new();
    SALT.get_or_init(|| {
        let mut salt = [0u8; 16];
        // Without randomness the hash is still one-way, only not salted.
        let _ = getrandom::fill(&mut salt);
        salt
    })
}

/// A subject as spans show it: the first 8 bytes of SHA-256(salt ‖ subject), hex. Computed
/// only when a span is recorded.
pub(crate) struct SubjectHash<'a>(pub(crate) &'a Subject);

impl fmt::Display for SubjectHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut hasher = Sha256::new();
        hasher.update(salt());
        hasher.update(self.0.as_str().as_bytes());
        let digest = hasher.finalize();
        for b in &digest[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The hash of `subject` that spans carry (see the module docs). For hosts that want to put
/// the same value on their own spans or logs, to correlate them with the broker's.
pub fn subject_hash(subject: &Subject) -> String {
    SubjectHash(subject).to_string()
}
