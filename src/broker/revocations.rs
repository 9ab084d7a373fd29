//! Revocations the broker owes providers: written to the store's outbox before (or, for an
//! unlink, in the same step as) the local change that owes them, tried at once, and drained
//! later by any instance until the provider takes them.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::{Inner, TokenBroker};
use crate::error::Result;
use crate::events::{BrokerEvent, RevocationStatus};
use crate::ids::TokenKey;
use crate::provider::{ProviderError, TokenKind};
use crate::store::PendingRevocation;
use crate::telemetry::RevocationOutcome;
use crate::token::TokenSet;

/// The first pause after a failed try; it doubles with each try, up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_secs(30);
/// The longest pause between tries of one revocation.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(3600);

/// Bounds of one [`TokenBroker::drain_revocations`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DrainOptions {
    /// At most this many entries are claimed and tried.
    pub limit: usize,
    /// At most this many provider calls at once.
    pub concurrency: usize,
    /// An entry still failing this long after it was written is given up (removed, with a
    /// [`RevocationStatus::Failed`] outcome and event). By then an unused refresh token has
    /// usually died upstream anyway.
    pub give_up_after: Duration,
}

impl Default for DrainOptions {
    /// 100 entries, 4 at a time, given up after 7 days.
    fn default() -> Self {
        DrainOptions {
            limit: 100,
            concurrency: 4,
            give_up_after: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl DrainOptions {
    /// Sets [`limit`](Self::limit).
    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Sets [`concurrency`](Self::concurrency) (at least 1).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets [`give_up_after`](Self::give_up_after).
    pub fn with_give_up_after(mut self, age: Duration) -> Self {
        self.give_up_after = age;
        self
    }
}

/// What a drain did, entry by entry counted by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Entries claimed and tried.
    pub claimed: usize,
    /// Revoked by the provider.
    pub revoked: usize,
    /// The provider has no revocation endpoint.
    pub not_supported: usize,
    /// The token had expired anyway.
    pub expired: usize,
    /// Failed again; kept for a later drain.
    pub deferred: usize,
    /// Given up: failing for longer than [`DrainOptions::give_up_after`], or undecodable.
    pub given_up: usize,
}

impl DrainReport {
    fn count(&mut self, status: &RevocationStatus) {
        match status {
            RevocationStatus::Revoked => self.revoked += 1,
            RevocationStatus::NotSupported => self.not_supported += 1,
            RevocationStatus::Expired => self.expired += 1,
            RevocationStatus::Deferred { .. } => self.deferred += 1,
            RevocationStatus::Failed(_) | RevocationStatus::NothingToRevoke => self.given_up += 1,
        }
    }
}

impl TokenBroker {
    /// Tries the revocations owed to providers that are due: those an unlink, a re-link to
    /// another account, or a link deleted during its refresh could not finish at once (the
    /// provider was down, timed out, or the process stopped before it got an answer).
    ///
    /// Entries live in the store, so any instance drains what any other owed, and a process
    /// that was killed between deleting a link and revoking its grant leaves the entry for the
    /// next drain. Each entry is tried until the provider takes it, says it has no revocation
    /// endpoint, or the token expires; one that keeps failing is retried with a pause that
    /// doubles from 30 s up to an hour (or the provider's `Retry-After`), and given up after
    /// [`DrainOptions::give_up_after`]. Every try emits [`BrokerEvent::RevocationSettled`] or
    /// [`BrokerEvent::RevocationDeferred`] and counts `tokenbroker_revocations_total`.
    ///
    /// [`sweep`](Self::sweep) drains too; call this from a job of its own when you do not run
    /// sweeps.
    ///
    /// ```
    /// # async fn run(broker: tokenbroker::TokenBroker) -> tokenbroker::Result<()> {
    /// use tokenbroker::DrainOptions;
    ///
    /// let report = broker.drain_revocations(DrainOptions::default()).await?;
    /// if report.deferred > 0 {
    ///     println!("{} revocations still owed; the next drain retries them", report.deferred);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn drain_revocations(&self, options: DrainOptions) -> Result<DrainReport> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let claimed = inner
            .store
            .claim_revocations(now, now + inner.outbox_claim(), options.limit)
            .await?;
        let mut report = DrainReport {
            claimed: claimed.len(),
            ..DrainReport::default()
        };
        let semaphore = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for entry in claimed {
            let permit = Arc::clone(&semaphore)
                .acquire_owned()
                .await
                .expect("never closed");
            let inner = Arc::clone(inner);
            let give_up_after = options.give_up_after;
            // In tasks of their own: a drain dropped by its caller does not cut a provider call
            // off between its answer and the store's update (the entry would only be tried
            // again, but there is no need).
            tasks.spawn(async move {
                let _permit = permit;
                inner.settle_revocation(entry, 1, give_up_after).await
            });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(status) = done {
                report.count(&status);
            }
        }
        Ok(report)
    }
}

impl Inner {
    /// How long the writer (or a drain) of an entry has it to itself: long enough for the
    /// quick retries of an unlink, after which another instance may take it over.
    pub(crate) fn outbox_claim(&self) -> Duration {
        (self.config.refresh_timeout * 3 + Duration::from_secs(10)).max(Duration::from_secs(60))
    }

    /// An entry for `set`'s tokens, claimed by this instance for [`Self::outbox_claim`].
    pub(crate) fn owed_revocation(&self, key: &TokenKey, set: &TokenSet) -> PendingRevocation {
        let now = self.clock.now();
        PendingRevocation::new(
            key.clone(),
            set.to_payload(),
            now,
            now + self.outbox_claim(),
        )
    }

    /// Revokes `set`, a grant that no link holds any more (another account's, replaced by a
    /// re-link; or one obtained for a link deleted meanwhile): written to the outbox first, so
    /// that it is not lost if this process stops before the provider answers.
    pub(crate) async fn revoke_owed(&self, key: &TokenKey, set: &TokenSet) -> RevocationStatus {
        let entry = self.owed_revocation(key, set);
        if let Err(e) = self.store.enqueue_revocation(&entry).await {
            // Not kept: try at once anyway, and say so.
            tracing::warn!(target: "tokenbroker", %key, error = %e, "the owed revocation could not be written to the outbox; trying it once, unrecorded");
            let Ok(entry_of) = self.entry(&key.provider) else {
                return RevocationStatus::Failed("provider not configured".into());
            };
            return self.revoke_upstream(&*entry_of.provider, set).await;
        }
        self.settle_revocation(entry, QUICK_TRIES, DrainOptions::default().give_up_after)
            .await
    }

    /// Tries a claimed entry (up to `tries` times in a row for transient failures), then
    /// removes it from the outbox when it is settled or reschedules it when it is not.
    pub(crate) async fn settle_revocation(
        &self,
        entry: PendingRevocation,
        tries: u32,
        give_up_after: Duration,
    ) -> RevocationStatus {
        let now = self.clock.now();
        let status = match TokenSet::from_payload(&entry.payload) {
            Err(_) => RevocationStatus::Failed(
                "the owed revocation could not be decoded (or decrypted), so it was given up"
                    .into(),
            ),
            Ok(set) if token_expired(&set, now) => RevocationStatus::Expired,
            Ok(set) => match self.entry(&entry.key.provider) {
                Ok(provider) => match self.try_revoke(&*provider.provider, &set, tries).await {
                    Ok(()) => RevocationStatus::Revoked,
                    Err(ProviderError::Unsupported { .. }) => RevocationStatus::NotSupported,
                    Err(e) => {
                        self.defer(&entry, now, give_up_after, e.retry_after(), e.to_string())
                    }
                },
                // Another instance may serve it.
                Err(_) => self.defer(
                    &entry,
                    now,
                    give_up_after,
                    None,
                    format!(
                        "provider {} is not configured on this instance",
                        entry.key.provider
                    ),
                ),
            },
        };
        self.record_settlement(&entry, &status).await;
        status
    }

    /// The status of a failed try: given up when the entry is too old, deferred otherwise.
    fn defer(
        &self,
        entry: &PendingRevocation,
        now: OffsetDateTime,
        give_up_after: Duration,
        retry_after: Option<Duration>,
        reason: String,
    ) -> RevocationStatus {
        if now - entry.created_at >= give_up_after {
            return RevocationStatus::Failed(format!(
                "given up after {} tries over {}: {reason}",
                entry.attempts,
                humantime_ish(give_up_after)
            ));
        }
        let doubling = FIRST_RETRY_PAUSE
            .saturating_mul(1 << entry.attempts.saturating_sub(1).min(16))
            .min(MAX_RETRY_PAUSE);
        let pause = retry_after.map_or(doubling, |r| r.max(doubling).min(MAX_RETRY_PAUSE));
        RevocationStatus::Deferred {
            reason,
            retry_at: now + pause,
        }
    }

    /// Removes or reschedules the entry as `status` says, with its event and metric.
    async fn record_settlement(&self, entry: &PendingRevocation, status: &RevocationStatus) {
        let metrics = self.metrics(&entry.key.provider);
        let stored = match status {
            RevocationStatus::Deferred { retry_at, reason } => {
                metrics.revocation(RevocationOutcome::Deferred);
                self.emit(BrokerEvent::RevocationDeferred {
                    key: entry.key.clone(),
                    attempts: entry.attempts,
                    retry_at: *retry_at,
                    reason: reason.clone(),
                });
                // A claim taken over meanwhile (this try outlived it) is the new claimant's
                // to reschedule.
                self.store
                    .reschedule_revocation(entry, *retry_at)
                    .await
                    .map(|_| ())
            }
            settled => {
                metrics.revocation(match settled {
                    RevocationStatus::Revoked => RevocationOutcome::Revoked,
                    RevocationStatus::NotSupported => RevocationOutcome::NotSupported,
                    RevocationStatus::Expired => RevocationOutcome::Expired,
                    _ => RevocationOutcome::GivenUp,
                });
                self.emit(BrokerEvent::RevocationSettled {
                    key: entry.key.clone(),
                    outcome: settled.clone(),
                    attempts: entry.attempts,
                });
                self.store.remove_revocation(&entry.id).await
            }
        };
        if let Err(e) = stored {
            // The entry stays due after its claim: at worst it is tried once more, and a second
            // revocation of the same token is harmless.
            tracing::warn!(target: "tokenbroker", key = %entry.key, error = %e, "could not update the revocation outbox");
        }
    }

    /// Calls the provider's revocation endpoint up to `tries` times while it fails
    /// transiently, with short pauses.
    pub(crate) async fn try_revoke(
        &self,
        provider: &dyn crate::provider::Provider,
        set: &TokenSet,
        tries: u32,
    ) -> std::result::Result<(), ProviderError> {
        let (token, kind) = token_to_revoke(set);
        let mut attempt = 1;
        loop {
            let outcome =
                tokio::time::timeout(self.config.refresh_timeout, provider.revoke(token, kind))
                    .await
                    .unwrap_or_else(|_| {
                        Err(ProviderError::Transient {
                            status: None,
                            retry_after: None,
                            reason: Some("timed out".into()),
                            source: None,
                        })
                    });
            match outcome {
                Err(e) if e.is_transient() && attempt < tries => {
                    let pause = e
                        .retry_after()
                        .unwrap_or(Duration::from_millis(200 << attempt))
                        .min(Duration::from_secs(2));
                    tracing::warn!(target: "tokenbroker", error = %e, attempt, "revocation failed; retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// How many times an unlink (or a re-link that replaced an account) tries the provider in a
/// row before leaving the revocation to the drain.
pub(crate) const QUICK_TRIES: u32 = 3;

/// The refresh token when there is one (revoking it ends the grant, RFC 7009 §2.1), else the
/// access token.
pub(crate) fn token_to_revoke(set: &TokenSet) -> (&crate::Secret, TokenKind) {
    match set.refresh_token() {
        Some(rt) => (rt, TokenKind::RefreshToken),
        None => (set.access_token(), TokenKind::AccessToken),
    }
}

/// Whether the token [`token_to_revoke`] picks has expired by `now`: then no one can use it,
/// and there is nothing left to revoke.
fn token_expired(set: &TokenSet, now: OffsetDateTime) -> bool {
    let expires_at = match set.refresh_token() {
        Some(_) => set.refresh_expires_at(),
        None => set.expires_at(),
    };
    expires_at.is_some_and(|at| at <= now)
}

/// A duration as a short text: days, hours, minutes or seconds.
fn humantime_ish(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{} d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}
