//! The refresh-and-rotate protocol (REFRESH-PROTOCOL.md), one function per step.
//!
//! 1. fast path: one load, no lock (in the caller's own future);
//! 2. the engine (`engine.rs`): one flight per key and scope set in this process, in a task the
//!    broker owns, which callers join and may abandon;
//! 3. the store's lease across processes: a loser waits and re-reads, it never calls the IdP;
//! 4. under the lease, re-read and re-check (someone may have just finished);
//! 5. call the provider, bounded by the refresh time-out and by what is left of the lease;
//! 6. compare-and-swap the merged set, fenced by the lease, and only then hand it out; a
//!    concurrent writer whose record still holds the spent refresh token gets ours on top.
//!
//! Everything from step 3 on runs inside the engine's task: no caller can cancel it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tokio::time::Instant;

use super::Inner;
use super::engine::{CatchUnwind, MAX_PARKED, Outcome};
use crate::error::{Error, Result};
use crate::events::BrokerEvent;
use crate::ids::{Scopes, TokenKey};
use crate::provider::{ProviderError, RefreshTokenReuse};
use crate::secret::Secret;
use crate::store::{Lease, LeaseAttempt, LinkState, Record, RecordMeta, StoreError, StoredRecord};
use crate::telemetry::RefreshOutcome;
use crate::token::TokenSet;

/// A key whose provider failed recently: no upstream call before `until`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    until: OffsetDateTime,
    failures: u32,
}

/// What a refresh must achieve. A read needs a token valid for the skew; a sweep one valid for
/// its window (or a link written recently enough to stay alive); a resource server's 401 needs
/// any token but the one it rejected.
#[derive(Clone)]
pub(crate) struct Need {
    /// The access token must stay valid at least this long.
    pub(crate) min_validity: Duration,
    /// The access token must not be this one (a resource server rejected it).
    pub(crate) reject: Option<Secret>,
    /// The link must have been written after this instant (keeps idle refresh tokens alive).
    pub(crate) written_after: Option<OffsetDateTime>,
    /// A token for these narrower scopes rather than the link's own.
    pub(crate) scopes: Option<Scopes>,
}

impl Backoff {
    /// Until when the key is left alone.
    pub(crate) fn until(&self) -> OffsetDateTime {
        self.until
    }
}

impl Need {
    pub(crate) fn fresh(skew: Duration) -> Self {
        Need {
            min_validity: skew,
            reject: None,
            written_after: None,
            scopes: None,
        }
    }

    /// Whether two needs ask for the same thing (then one flight answers both).
    pub(crate) fn same_as(&self, other: &Need) -> bool {
        self.min_validity == other.min_validity
            && self.written_after == other.written_after
            && self.scopes == other.scopes
            && match (&self.reject, &other.reject) {
                (None, None) => true,
                (Some(a), Some(b)) => a.constant_time_eq(b),
                _ => false,
            }
    }

    /// What this need serves from a set: the set itself, or its narrowed view.
    pub(crate) fn view(&self, set: &Arc<TokenSet>) -> Option<Arc<TokenSet>> {
        match &self.scopes {
            None => Some(Arc::clone(set)),
            Some(scopes) => set.narrowed_to(scopes).map(Arc::new),
        }
    }

    /// Whether `set` serves this need at `now`, for a broker whose expiry skew is `skew`.
    fn satisfied_by(
        &self,
        set: &Arc<TokenSet>,
        written_at: OffsetDateTime,
        now: OffsetDateTime,
        skew: Duration,
    ) -> bool {
        self.view(set).is_some_and(|view| {
            self.view_serves(&view, now, skew) && self.written_after_ok(written_at)
        })
    }

    /// Whether a flight's answer (already the view) serves this need too.
    pub(crate) fn served_by(
        &self,
        view: &TokenSet,
        refreshed: bool,
        now: OffsetDateTime,
        skew: Duration,
    ) -> bool {
        self.view_serves(view, now, skew) && (self.written_after.is_none() || refreshed)
    }

    fn view_serves(&self, view: &TokenSet, now: OffsetDateTime, skew: Duration) -> bool {
        // A need no stricter than a read's (reads, `send_authorized`) is judged like the read's
        // fast path, capped at half the token's lifetime, so that every check of one flight
        // (fast path, under the lease, after a lost race, a joiner's) agrees. A longer validity
        // was asked for on purpose (a sweep's window) and is kept whole.
        let fresh = if self.min_validity <= skew {
            view.is_fresh_for_read(now, self.min_validity)
        } else {
            view.is_fresh(now, self.min_validity)
        };
        fresh
            && self
                .reject
                .as_ref()
                .is_none_or(|r| !r.constant_time_eq(view.access_token()))
    }

    fn written_after_ok(&self, written_at: OffsetDateTime) -> bool {
        self.written_after.is_none_or(|t| written_at > t)
    }
}

/// A loaded link, decoded (or found already decoded in the hot cache).
pub(crate) struct Loaded {
    pub(crate) stored: StoredRecord,
    pub(crate) set: Arc<TokenSet>,
}

/// The lease this flight holds, and until when it may rely on it.
struct Held {
    lease: Lease,
    /// The lease's end as this instance counts it: taken *before* asking the store, so it is
    /// never later than the store's own expiry.
    until: Instant,
    /// Whether writes go out fenced by the lease. Cleared when the lease was taken over: a
    /// rotated set must still land then (see `store_refreshed`).
    fenced: bool,
}

impl Held {
    /// What is left of the lease after keeping `margin` in hand.
    fn left(&self, margin: Duration) -> Duration {
        self.until
            .saturating_duration_since(Instant::now())
            .saturating_sub(margin)
    }
}

/// What one turn under the lease came to.
enum Turn {
    /// The answer for every waiter.
    Done(Outcome),
    /// Release the lease and start over (the record changed under us and the newest one does
    /// not serve, or too little of the lease was left to call the provider). The error is what
    /// the waiters get if the turns run out.
    Again(Error),
}

/// How many turns under the lease one flight takes at most before it gives up.
const MAX_TURNS: u32 = 4;

impl Inner {
    /// Step 1: the fast path, then the engine.
    /// Returns the tokens, whether a refresh happened, and whether they are stale.
    pub(crate) async fn fresh_tokens(
        self: &Arc<Self>,
        key: &TokenKey,
    ) -> Result<(Arc<TokenSet>, bool, bool)> {
        let loaded = self.load(key).await?;
        if loaded
            .set
            .is_fresh_for_read(self.clock.now(), self.config.skew)
        {
            return Ok((loaded.set, false, false));
        }
        let (set, refreshed) = match self.refresh(key, Need::fresh(self.config.skew)).await {
            // Shutting down, no refresh: a token inside the skew but unexpired still works.
            Err(Error::ShuttingDown { .. }) if loaded.set.is_unexpired(self.clock.now()) => {
                (loaded.set, false)
            }
            other => other?,
        };
        let stale = !set.is_fresh_for_read(self.clock.now(), self.config.skew);
        Ok((set, refreshed, stale))
    }

    /// The narrowed read: checks audiences against the provider's policy and the scopes
    /// against the grant, serves a fresh narrowed token, or refreshes one through the engine.
    pub(crate) async fn fresh_narrowed(
        self: &Arc<Self>,
        key: &TokenKey,
        scopes: &Scopes,
    ) -> Result<(Arc<TokenSet>, bool, bool)> {
        let policy = &self.entry(&key.provider)?.policy;
        // Before anything is loaded or sent: an audience is the host's decision, not the grant's.
        if let Some(audience) = scopes
            .iter()
            .filter_map(|s| s.strip_prefix(super::sessions::AUDIENCE_PREFIX))
            .find(|aud| !policy.allows_audience(aud))
        {
            return Err(Error::AudienceNotAllowed {
                key: key.clone(),
                audience: audience.to_owned(),
            });
        }
        let loaded = self.load(key).await?;
        let granted = loaded.set.scopes();
        let missing: Scopes = scopes
            .difference(granted)
            .iter()
            .filter(|s| !s.starts_with(super::sessions::AUDIENCE_PREFIX))
            .collect();
        if !missing.is_empty() {
            return Err(Error::ScopesNotGranted {
                key: key.clone(),
                missing,
            });
        }
        if scopes == granted || scopes.is_empty() {
            return self.fresh_tokens(key).await;
        }
        let need = Need {
            scopes: Some(scopes.clone()),
            ..Need::fresh(self.config.skew)
        };
        let now = self.clock.now();
        if need.satisfied_by(
            &loaded.set,
            loaded.stored.record.meta.updated_at,
            now,
            self.config.skew,
        ) && let Some(view) = need.view(&loaded.set)
        {
            return Ok((view, false, false));
        }
        let (set, refreshed) = self.refresh(key, need).await?;
        let stale = !set.is_fresh_for_read(self.clock.now(), self.config.skew);
        Ok((set, refreshed, stale))
    }

    /// Loads and decodes a link; a link marked relink-required is an error.
    pub(crate) async fn load(&self, key: &TokenKey) -> Result<Loaded> {
        let stored = self
            .store
            .load(key)
            .await?
            .ok_or_else(|| Error::NotFound { key: key.clone() })?;
        if let LinkState::RelinkRequired { reason, .. } = &stored.record.meta.state {
            return Err(Error::RelinkRequired {
                key: key.clone(),
                reason: reason.clone(),
            });
        }
        let set = self.decode(key, &stored)?;
        Ok(Loaded { stored, set })
    }

    /// Decodes a record. Skipped when the payload itself knows its decoding (a store that
    /// hands out its own allocation) or the hot cache holds the set decoded from these bytes.
    fn decode(&self, key: &TokenKey, stored: &StoredRecord) -> Result<Arc<TokenSet>> {
        if let Some(set) = stored.record.payload.decoded() {
            return Ok(set);
        }
        if let Some(set) = self.hot.get(key, stored) {
            return Ok(set);
        }
        let set =
            TokenSet::from_payload(&stored.record.payload).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
                version: Some(stored.version.clone()),
            })?;
        let set = Arc::new(set);
        self.remember(key, stored, &set);
        Ok(set)
    }

    /// Keeps `set` as the decoding of `stored`: strongly in the bounded hot cache, weakly in
    /// the payload.
    fn remember(&self, key: &TokenKey, stored: &StoredRecord, set: &Arc<TokenSet>) {
        stored.record.payload.remember_decoded(set);
        self.hot.put(key, stored, Arc::clone(set));
    }

    /// A store call the engine makes, bounded so that a hung store cannot hold up the flight
    /// (and with it every joined caller) for longer than `limit`.
    async fn bounded<T, E: Into<Error>>(
        &self,
        limit: Duration,
        call: impl Future<Output = std::result::Result<T, E>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, call).await {
            Ok(result) => result.map_err(Into::into),
            Err(_) => Err(StoreError::Backend {
                store: "store",
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("store call took longer than {limit:?}"),
                )),
            }
            .into()),
        }
    }

    /// Step 3 (the engine's task): takes the store's lease, or waits for the instance holding
    /// it; then runs a turn under the lease and releases it, whatever the turn did.
    pub(crate) async fn refresh_with_lease(
        self: &Arc<Self>,
        key: &TokenKey,
        need: &Need,
    ) -> Outcome {
        let ttl = self.config.lease_ttl;
        let deadline = Instant::now() + self.config.lease_wait;
        let mut pause = Duration::from_millis(10);
        let mut turns = 0;
        let mut waited = false;
        loop {
            let asked_at = Instant::now();
            match self
                .bounded(ttl, self.store.try_lease(key, &self.holder, ttl))
                .await?
            {
                LeaseAttempt::Missing => return Err(Error::NotFound { key: key.clone() }),
                LeaseAttempt::Acquired(lease) => {
                    let mut held = Held {
                        lease,
                        until: asked_at + ttl,
                        fenced: true,
                    };
                    let turn = CatchUnwind::new(self.refresh_holding_lease(key, need, &mut held))
                        .await
                        .unwrap_or(Turn::Done(Err(Error::Internal("a refresh panicked"))));
                    self.release(&held.lease).await;
                    match turn {
                        Turn::Done(outcome) => return outcome,
                        Turn::Again(error) => {
                            turns += 1;
                            if turns >= MAX_TURNS || Instant::now() >= deadline {
                                return Err(error);
                            }
                        }
                    }
                }
                LeaseAttempt::Busy => {
                    if !waited {
                        waited = true;
                        self.metrics(&key.provider).lease_waits.increment(1);
                    }
                    // An instance of this process sharing the store wakes us when it releases
                    // the lease; otherwise (another process) the pause runs out.
                    let waiter = super::lease_wake::Waiter::register(
                        super::lease_wake::store_id(&self.store),
                        key,
                    );
                    {
                        let woken = waiter.notify().notified();
                        tokio::pin!(woken);
                        woken.as_mut().enable();
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = &mut woken => {}
                        }
                    }
                    drop(waiter);
                    pause = (pause * 2).min(Duration::from_millis(250));
                    let loaded = self.bounded(ttl, self.load(key)).await?;
                    let written = loaded.stored.record.meta.updated_at;
                    if need.satisfied_by(&loaded.set, written, self.clock.now(), self.config.skew)
                        && let Some(view) = need.view(&loaded.set)
                    {
                        self.metrics(&key.provider).refresh(RefreshOutcome::Joined);
                        return Ok((view, true));
                    }
                    if self.is_closing() {
                        // Nothing was sent: stop waiting for the other instance.
                        self.metrics(&key.provider)
                            .refresh(RefreshOutcome::ShuttingDown);
                        return Err(Error::ShuttingDown { key: key.clone() });
                    }
                    if Instant::now() >= deadline {
                        return Err(Error::RefreshInProgress { key: key.clone() });
                    }
                }
            }
        }
    }

    /// Frees the lease (fenced by its token: a lease taken again since is left alone) and wakes
    /// the instances of this process waiting for it.
    async fn release(&self, lease: &Lease) {
        let limit = self.config.lease_ttl;
        if let Err(e) = self.bounded(limit, self.store.release_lease(lease)).await {
            // The lease expires on its own; others wait at most its TTL.
            tracing::warn!(target: "tokenbroker", key = %lease.key, error = %e, "could not release refresh lease");
        }
        super::lease_wake::wake(super::lease_wake::store_id(&self.store), &lease.key);
    }

    /// Steps 4 and 5, holding the lease.
    async fn refresh_holding_lease(
        self: &Arc<Self>,
        key: &TokenKey,
        need: &Need,
        held: &mut Held,
    ) -> Turn {
        let margin = self.config.lease_margin;
        let Loaded { stored, set } = match self.bounded(held.left(margin), self.load(key)).await {
            Ok(loaded) => loaded,
            Err(e) => return Turn::Done(Err(e)),
        };
        let now = self.clock.now();
        if need.satisfied_by(&set, stored.record.meta.updated_at, now, self.config.skew)
            && let Some(view) = need.view(&set)
        {
            self.metrics(&key.provider).refresh(RefreshOutcome::Joined);
            return Turn::Done(Ok((view, true)));
        }
        // What may be served if no refresh happens: never a wider token than was asked for.
        let fallback = need.view(&set);
        let Some(spent) = set.refresh_token().cloned() else {
            return Turn::Done(
                self.serve_unexpired(fallback, now, || Error::NoRefreshToken { key: key.clone() }),
            );
        };
        // The link's backoff (its provider is failing) holds narrowed refreshes back too; only
        // the link's own refreshes set it.
        if let Some(until) = self.backing_off(key, now) {
            self.metrics(&key.provider).refresh(RefreshOutcome::Backoff);
            let retry_after = Some((until - now).unsigned_abs());
            return Turn::Done(
                self.serve_unexpired(fallback, now, || self.unavailable(key, retry_after, None)),
            );
        }
        let (provider, metrics) = match self.entry(&key.provider) {
            Ok(entry) => (Arc::clone(&entry.provider), &entry.metrics),
            Err(e) => return Turn::Done(Err(e)),
        };
        // Shutting down: the refresh token is not spent yet, so this flight may give up. Past
        // this check (no await before the call) it runs to its write, and shutdown waits.
        if self.is_closing() {
            metrics.refresh(RefreshOutcome::ShuttingDown);
            return Turn::Done(
                self.serve_unexpired(fallback, now, || Error::ShuttingDown { key: key.clone() }),
            );
        }
        let mut retried = false;
        let answer = loop {
            // Bounded by what is left of the lease, counted from when it was taken: a holder
            // either has its answer, or has given up, before anyone else may take over.
            let budget = held.left(margin);
            if budget < self.config.refresh_timeout / 2 {
                return Turn::Again(self.unavailable(
                    key,
                    None,
                    Some(ProviderError::Transient {
                        status: None,
                        retry_after: None,
                        reason: Some("store calls left too little of the lease to refresh".into()),
                        source: None,
                    }),
                ));
            }
            let limit = self.config.refresh_timeout.min(budget);
            let called = Instant::now();
            let answer =
                tokio::time::timeout(limit, provider.refresh(&spent, need.scopes.as_ref()))
                    .await
                    .unwrap_or_else(|_| Err(timed_out()));
            metrics.provider_call(called.elapsed());
            // No answer at all (a time-out, a dropped connection): the provider may or may not
            // have used the token. Where old tokens stay valid, asking again is free.
            let unknown = matches!(answer, Err(ProviderError::Transient { status: None, .. }));
            if unknown && !retried && provider.refresh_token_reuse() == RefreshTokenReuse::Tolerated
            {
                retried = true;
                continue;
            }
            break answer;
        };
        let narrowed = need.scopes.is_some();
        match answer {
            Ok(tokens) => {
                let asked = need.scopes.as_ref().unwrap_or(set.scopes());
                let newer = TokenSet::from_response(tokens, self.clock.now(), asked);
                if names_another_account(&set, &newer) {
                    return self.on_account_mismatch(key, stored, held).await;
                }
                self.store_refreshed(key, need, stored, &set, spent, newer, held)
                    .await
            }
            Err(e) if narrowed => Turn::Done(self.on_narrowed_failure(key, need, fallback, e)),
            Err(ProviderError::InvalidGrant { description }) => {
                self.on_invalid_grant(key, need, stored, description, held)
                    .await
            }
            Err(e) => Turn::Done(self.on_failure(key, fallback, e)),
        }
    }

    /// Step 6: writes the merged set with compare-and-swap, fenced by the lease, before anyone
    /// sees it.
    ///
    /// On a conflict the record is read again. If the newer record still holds the refresh
    /// token this refresh spent (a re-link that brought no refresh token, a key rotation, a
    /// holder that outlived its lease), the answer is merged onto it and written again: its
    /// writer could not know that token was spent, and dropping ours would leave a spent token
    /// as the link's only one. Only a record with another refresh token wins outright.
    #[allow(clippy::too_many_arguments)]
    async fn store_refreshed(
        self: &Arc<Self>,
        key: &TokenKey,
        need: &Need,
        stored: StoredRecord,
        old: &TokenSet,
        spent: Secret,
        newer: TokenSet,
        held: &mut Held,
    ) -> Turn {
        let scopes = need.scopes.as_ref();
        let rotated = newer
            .refresh_token()
            .is_some_and(|rt| !rt.constant_time_eq(&spent));
        let mut merged = Arc::new(merge_answer(old, &newer, scopes));
        let mut expected = stored.version;
        let mut created_at = stored.record.meta.created_at;
        // Past this, a store that keeps failing gets the set parked rather than written.
        let write_deadline = Instant::now() + self.config.lease_ttl;
        let mut failures = 0u32;
        loop {
            let record = Record::new(
                merged.to_payload(),
                RecordMeta::new(
                    LinkState::Active,
                    merged.expires_at(),
                    created_at,
                    self.clock.now(),
                ),
            );
            let fence = held.fenced.then_some(&held.lease.token);
            // Within the lease while we hold it (a write that outlasts it is retried under an
            // extended one); within the write deadline once it was taken over.
            let mut limit = write_deadline.saturating_duration_since(Instant::now());
            if held.fenced {
                limit = limit.min(held.left(Duration::ZERO));
            }
            let limit = limit.max(Duration::from_millis(100));
            let written = self
                .bounded(
                    limit,
                    self.store
                        .compare_and_swap(key, expected.clone(), &record, fence),
                )
                .await;
            let conflict = match written {
                Ok(version) => {
                    // The next read loads exactly these bytes: let it skip the decode.
                    self.remember(key, &StoredRecord::new(record, version), &merged);
                    if scopes.is_none() {
                        self.clear_backoff(key);
                    }
                    self.note_lifetime(&key.provider, &newer);
                    self.metrics(&key.provider).refresh(if rotated {
                        RefreshOutcome::Rotated
                    } else {
                        RefreshOutcome::Refreshed
                    });
                    self.emit_info(|| BrokerEvent::Refreshed {
                        key: key.clone(),
                        rotated,
                    });
                    let served = need.view(&merged).unwrap_or(merged);
                    return Turn::Done(Ok((served, true)));
                }
                Err(Error::Store(StoreError::Conflict { .. })) => true,
                Err(_) => false,
            };
            if conflict {
                // A failed read counts as a failed write: retried below.
                let current = self.bounded(limit, self.store.load(key)).await.ok();
                if let Some(current) = current {
                    let Some(current) = current else {
                        // Unlinked meanwhile: the rotated token belongs to no link now.
                        if rotated {
                            self.revoke_orphan(key, &newer);
                        }
                        return Turn::Done(Err(Error::NotFound { key: key.clone() }));
                    };
                    let theirs = match self.decode(key, &current) {
                        Ok(set) => set,
                        Err(e) => return Turn::Done(Err(e)),
                    };
                    let holds_spent = theirs
                        .refresh_token()
                        .is_some_and(|rt| rt.constant_time_eq(&spent));
                    if !holds_spent {
                        self.metrics(&key.provider)
                            .refresh(RefreshOutcome::LostRace);
                        self.emit(BrokerEvent::LostRace { key: key.clone() });
                        return self.serve_winner(key, need, current, theirs);
                    }
                    if current.version == expected {
                        // Same version, so only the fence failed: the lease was taken over.
                        // The rotated token must land all the same; the version still keeps
                        // any other write from being lost.
                        if held.fenced {
                            self.metrics(&key.provider).lease_takeovers.increment(1);
                        }
                        held.fenced = false;
                    } else {
                        tracing::info!(target: "tokenbroker", %key, "record changed during refresh but holds the spent refresh token; writing the refreshed tokens onto it");
                        self.emit(BrokerEvent::MergedOntoConcurrentWrite { key: key.clone() });
                    }
                    merged = Arc::new(merge_answer(&theirs, &newer, scopes));
                    expected = current.version;
                    created_at = current.record.meta.created_at;
                    continue;
                }
            }
            // A store failure now would lose a rotated refresh token (the IdP has retired the
            // stored one): retry while the lease keeps other instances from refreshing, keeping
            // it alive, then park the set and keep trying in the background.
            failures += 1;
            let pause = write_pause(failures);
            if failures >= 3 && Instant::now() + pause >= write_deadline {
                return Turn::Done(self.park(key, spent, newer, scopes.cloned()));
            }
            tracing::warn!(target: "tokenbroker", %key, attempt = failures, "retrying the write of refreshed tokens");
            tokio::time::sleep(pause).await;
            if held.fenced {
                match self
                    .bounded(
                        limit,
                        self.store.extend_lease(&held.lease, self.config.lease_ttl),
                    )
                    .await
                {
                    Ok(Some(extended)) => {
                        held.until = Instant::now() + self.config.lease_ttl;
                        held.lease = extended;
                    }
                    Ok(None) => {
                        self.metrics(&key.provider).lease_takeovers.increment(1);
                        held.fenced = false;
                    }
                    Err(_) => {}
                }
            }
        }
    }

    /// The answer after losing a race to a record with another refresh token: its tokens if
    /// they serve, otherwise another turn.
    fn serve_winner(
        &self,
        key: &TokenKey,
        need: &Need,
        current: StoredRecord,
        theirs: Arc<TokenSet>,
    ) -> Turn {
        if let LinkState::RelinkRequired { reason, .. } = &current.record.meta.state {
            return Turn::Done(Err(Error::RelinkRequired {
                key: key.clone(),
                reason: reason.clone(),
            }));
        }
        let now = self.clock.now();
        if need.satisfied_by(
            &theirs,
            current.record.meta.updated_at,
            now,
            self.config.skew,
        ) && let Some(view) = need.view(&theirs)
        {
            return Turn::Done(Ok((view, true)));
        }
        Turn::Again(Error::RecordChanged { key: key.clone() })
    }

    /// Keeps a rotated set that the store would not take in memory, and goes on writing it in
    /// a task of its own: the provider has retired the stored refresh token, so this set is the
    /// link's only live one. Until it lands, no flight starts for the key in this process.
    fn park(
        self: &Arc<Self>,
        key: &TokenKey,
        spent: Secret,
        newer: TokenSet,
        scopes: Option<Scopes>,
    ) -> Outcome {
        {
            let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            if parked.len() >= MAX_PARKED {
                tracing::error!(target: "tokenbroker", %key, "refreshed tokens could not be stored and too many are already waiting; they are lost");
                return Err(Error::WritePending { key: key.clone() });
            }
            parked.insert(key.clone(), ());
        }
        self.metrics(&key.provider).refresh(RefreshOutcome::Parked);
        self.emit(BrokerEvent::WriteParked { key: key.clone() });
        let inner = Arc::clone(self);
        let parked_key = key.clone();
        tokio::spawn(async move {
            let key = parked_key;
            let (stored, attempts) = inner
                .write_parked(&key, &spent, &newer, scopes.as_ref())
                .await;
            inner
                .parked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
            inner.emit(BrokerEvent::ParkedWriteResolved {
                key,
                stored,
                attempts,
            });
        });
        Err(Error::WritePending { key: key.clone() })
    }

    /// The parked write's loop: by the same rule as `store_refreshed`, for as long as the
    /// process lives. Returns whether the set was written, and after how many attempts.
    async fn write_parked(
        self: &Arc<Self>,
        key: &TokenKey,
        spent: &Secret,
        newer: &TokenSet,
        scopes: Option<&Scopes>,
    ) -> (bool, u32) {
        let limit = self.config.lease_ttl;
        let mut pause = Duration::from_secs(1);
        let mut attempts = 0;
        loop {
            attempts += 1;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
            let current = match self.bounded(limit, self.store.load(key)).await {
                Ok(Some(current)) => current,
                Ok(None) => {
                    self.revoke_orphan(key, newer);
                    return (false, attempts);
                }
                Err(_) => continue,
            };
            let Ok(theirs) = self.decode(key, &current) else {
                return (false, attempts);
            };
            if !theirs
                .refresh_token()
                .is_some_and(|rt| rt.constant_time_eq(spent))
            {
                return (false, attempts); // someone wrote a newer refresh token
            }
            let merged = Arc::new(merge_answer(&theirs, newer, scopes));
            let record = Record::new(
                merged.to_payload(),
                RecordMeta::new(
                    LinkState::Active,
                    merged.expires_at(),
                    current.record.meta.created_at,
                    self.clock.now(),
                ),
            );
            match self
                .bounded(
                    limit,
                    self.store
                        .compare_and_swap(key, current.version, &record, None),
                )
                .await
            {
                Ok(version) => {
                    self.remember(key, &StoredRecord::new(record, version), &merged);
                    return (true, attempts);
                }
                Err(Error::Store(StoreError::Conflict { .. })) => {
                    pause = Duration::from_millis(10);
                }
                Err(_) => {}
            }
        }
    }

    /// Revokes a rotated refresh token whose link was deleted while it was being obtained, so
    /// that no live grant is left upstream without a record: through the store's outbox, in a
    /// task of its own, so neither a dropped caller nor a provider outage loses it.
    fn revoke_orphan(self: &Arc<Self>, key: &TokenKey, newer: &TokenSet) {
        if newer.refresh_token().is_none() {
            return;
        }
        let inner = Arc::clone(self);
        let key = key.clone();
        let newer = newer.clone();
        tokio::spawn(async move {
            let outcome = inner.revoke_owed(&key, &newer).await;
            tracing::info!(target: "tokenbroker", %key, ?outcome, "link was deleted during its refresh; revoking the new refresh token");
        });
    }

    /// `invalid_grant` on the link's own refresh: a dead grant only if nobody moved the record
    /// since we read it.
    async fn on_invalid_grant(
        &self,
        key: &TokenKey,
        need: &Need,
        stored: StoredRecord,
        description: Option<String>,
        held: &Held,
    ) -> Turn {
        let limit = held.left(Duration::ZERO).max(Duration::from_millis(100));
        let current = match self.bounded(limit, self.store.load(key)).await {
            Ok(Some(current)) => current,
            Ok(None) => return Turn::Done(Err(Error::NotFound { key: key.clone() })),
            Err(e) => return Turn::Done(Err(e)),
        };
        if current.version != stored.version {
            // Lost race: another writer refreshed (or re-linked) with a newer token.
            self.metrics(&key.provider)
                .refresh(RefreshOutcome::LostRace);
            self.emit(BrokerEvent::LostRace { key: key.clone() });
            return match self.decode(key, &current) {
                Ok(theirs) => self.serve_winner(key, need, current, theirs),
                Err(e) => Turn::Done(Err(e)),
            };
        }
        let reason = description.unwrap_or_else(|| "refresh token rejected (invalid_grant)".into());
        let mut meta = stored.record.meta.clone();
        meta.state = LinkState::RelinkRequired {
            reason: reason.clone(),
            since: self.clock.now(),
        };
        let marked = Record::new(stored.record.payload.clone(), meta);
        let fence = held.fenced.then_some(&held.lease.token);
        match self
            .bounded(
                limit,
                self.store
                    .compare_and_swap(key, stored.version, &marked, fence),
            )
            .await
        {
            Ok(_) => {}
            // Written meanwhile (or the lease was taken over): look again on the next turn.
            Err(Error::Store(StoreError::Conflict { .. })) => {
                return Turn::Again(Error::RecordChanged { key: key.clone() });
            }
            Err(e) => {
                tracing::warn!(target: "tokenbroker", %key, error = %e, "could not mark link relink-required")
            }
        }
        self.metrics(&key.provider)
            .refresh(RefreshOutcome::RelinkRequired);
        self.emit(BrokerEvent::RelinkRequired {
            key: key.clone(),
            reason: reason.clone(),
        });
        Turn::Done(Err(Error::RelinkRequired {
            key: key.clone(),
            reason,
        }))
    }

    /// A refresh whose ID token names another account than the link's (OpenID Connect Core
    /// §12.2): nothing of the answer is stored or served, since none of it provably belongs to
    /// the link's account, and the link is marked so that the user links again.
    async fn on_account_mismatch(&self, key: &TokenKey, stored: StoredRecord, held: &Held) -> Turn {
        tracing::error!(target: "tokenbroker", %key, "refreshed id_token names another account; link marked relink-required");
        let mut meta = stored.record.meta.clone();
        meta.state = LinkState::RelinkRequired {
            reason: "the provider's refreshed ID token names another account".into(),
            since: self.clock.now(),
        };
        let marked = Record::new(stored.record.payload.clone(), meta);
        let fence = held.fenced.then_some(&held.lease.token);
        let limit = held.left(Duration::ZERO).max(Duration::from_millis(100));
        match self
            .bounded(
                limit,
                self.store
                    .compare_and_swap(key, stored.version, &marked, fence),
            )
            .await
        {
            Ok(_) => {}
            Err(Error::Store(StoreError::Conflict { .. })) => {
                return Turn::Again(Error::RecordChanged { key: key.clone() });
            }
            Err(e) => {
                tracing::warn!(target: "tokenbroker", %key, error = %e, "could not mark link relink-required")
            }
        }
        self.metrics(&key.provider)
            .refresh(RefreshOutcome::AccountMismatch);
        self.emit(BrokerEvent::AccountMismatch { key: key.clone() });
        Turn::Done(Err(Error::AccountMismatch { key: key.clone() }))
    }

    /// Any other failure of the link's own refresh: the record stays exactly as it was; a
    /// still-valid token is served.
    fn on_failure(
        &self,
        key: &TokenKey,
        set: Option<Arc<TokenSet>>,
        error: ProviderError,
    ) -> Outcome {
        let now = self.clock.now();
        let retry_after = self.note_failure(key, now, error.retry_after());
        let status = match &error {
            ProviderError::Transient { status, .. } | ProviderError::Protocol { status, .. } => {
                *status
            }
            ProviderError::Rejected { status, .. } => Some(*status),
            _ => None,
        };
        let served_stale = set.as_ref().is_some_and(|s| s.is_unexpired(now));
        self.metrics(&key.provider)
            .refresh(if error.is_transient() {
                RefreshOutcome::Transient
            } else {
                RefreshOutcome::Rejected
            });
        self.emit(BrokerEvent::TransientFailure {
            key: key.clone(),
            status,
            retry_after: Some(retry_after),
            served_stale,
        });
        let provider = key.provider.to_string();
        self.serve_unexpired(set, now, || {
            if error.is_transient() {
                self.unavailable(key, Some(retry_after), Some(error.clone()))
            } else {
                Error::Provider {
                    provider,
                    source: error.clone(),
                }
            }
        })
    }

    /// A narrowed refresh failed. The link is not marked and not backed off: the provider may
    /// refuse these scopes (consent or interaction required, `invalid_scope`) while the link's
    /// own refresh token is alive, and a link's health is only judged by its own refreshes.
    fn on_narrowed_failure(
        &self,
        key: &TokenKey,
        need: &Need,
        fallback: Option<Arc<TokenSet>>,
        error: ProviderError,
    ) -> Outcome {
        self.metrics(&key.provider).refresh(match &error {
            ProviderError::InvalidGrant { .. } | ProviderError::Rejected { .. } => {
                RefreshOutcome::NarrowedRefused
            }
            e if e.is_transient() => RefreshOutcome::Transient,
            _ => RefreshOutcome::Rejected,
        });
        self.emit(BrokerEvent::NarrowedRefreshFailed {
            key: key.clone(),
            reason: error.to_string(),
        });
        let now = self.clock.now();
        let provider = key.provider.to_string();
        match error {
            ProviderError::InvalidGrant { .. } | ProviderError::Rejected { .. } => {
                Err(Error::NarrowedRefused {
                    key: key.clone(),
                    provider,
                    scopes: need.scopes.clone().unwrap_or_default(),
                    reason: error.to_string(),
                })
            }
            e if e.is_transient() => {
                let retry_after = e.retry_after();
                self.serve_unexpired(fallback, now, || {
                    self.unavailable(key, retry_after, Some(e))
                })
            }
            e => Err(Error::Provider {
                provider,
                source: e,
            }),
        }
    }

    fn serve_unexpired(
        &self,
        set: Option<Arc<TokenSet>>,
        now: OffsetDateTime,
        otherwise: impl FnOnce() -> Error,
    ) -> Outcome {
        match set {
            Some(set) if set.is_unexpired(now) => Ok((set, false)),
            _ => Err(otherwise()),
        }
    }

    fn unavailable(
        &self,
        key: &TokenKey,
        retry_after: Option<Duration>,
        source: Option<ProviderError>,
    ) -> Error {
        Error::Unavailable {
            provider: key.provider.to_string(),
            retry_after,
            source,
        }
    }

    fn backing_off(&self, key: &TokenKey, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key).map(|b| b.until).filter(|until| *until > now)
    }

    /// Records a failure and returns how long to leave the provider alone: its `Retry-After`
    /// (up to the configured maximum), or 1 s doubling per consecutive failure up to the
    /// maximum backoff.
    fn note_failure(
        &self,
        key: &TokenKey,
        now: OffsetDateTime,
        retry_after: Option<Duration>,
    ) -> Duration {
        let mut map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        // Pruned as it is used: an entry whose backoff ended long ago only kept a failure
        // count, and a key that fails again after that long starts over.
        if map.len() >= 64 {
            let forget = self.config.max_backoff.max(Duration::from_secs(60));
            map.retain(|_, b| b.until + forget > now);
        }
        let failures = map.get(key).map_or(1, |b| b.failures.saturating_add(1));
        let wait = match retry_after {
            Some(after) => after.min(self.config.max_retry_after),
            None => {
                let doubling = Duration::from_secs(1u64 << failures.saturating_sub(1).min(20));
                // Up to +25 % jitter, so that instances that failed together do not retry
                // together.
                let jitter = doubling.mul_f64(f64::from(jitter_permille()) / 4000.0);
                (doubling + jitter).min(self.config.max_backoff)
            }
        };
        map.insert(
            key.clone(),
            Backoff {
                until: now + wait,
                failures,
            },
        );
        wait
    }

    /// Warns once per provider (per broker) when its access tokens live less than twice the
    /// skew, so that reads serve them until half their lifetime is left rather than the skew.
    /// Called when a set is stored (login, refresh), never on a read. Logs lifetimes, never a
    /// token.
    pub(crate) fn note_lifetime(&self, provider: &crate::ids::ProviderId, set: &TokenSet) {
        let skew = self.config.skew;
        let Some(lifetime) = set.lifetime() else {
            return;
        };
        if lifetime >= skew.saturating_mul(2) {
            return;
        }
        let Ok(entry) = self.entry(provider) else {
            return;
        };
        if entry
            .short_lifetime_warned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        let lifetime = lifetime.max(time::Duration::ZERO).unsigned_abs();
        tracing::warn!(
            target: "tokenbroker",
            %provider,
            access_token_lifetime = ?lifetime,
            skew = ?skew,
            effective_skew = ?(lifetime / 2),
            "the provider's access tokens live less than twice the broker's expiry skew: reads \
             refresh them when half their lifetime is left instead of the skew (see \
             TokenBrokerBuilder::with_skew); logged once per provider"
        );
    }

    fn clear_backoff(&self, key: &TokenKey) {
        let was = {
            let mut map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
            if map.is_empty() {
                return;
            }
            map.remove(key)
        };
        if let Some(backoff) = was {
            self.emit(BrokerEvent::Recovered {
                key: key.clone(),
                failures: backoff.failures,
            });
        }
    }

    /// The backoff of a key, if it is backing off now.
    pub(crate) fn backoff_of(
        &self,
        key: &TokenKey,
        now: OffsetDateTime,
    ) -> Option<(OffsetDateTime, u32)> {
        let map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|b| b.until > now)
            .map(|b| (b.until, b.failures))
    }
}

/// Whether a refresh's answer names another account than the link holds. A link stored
/// before accounts were recorded is judged by the account its stored ID token names.
fn names_another_account(link: &TokenSet, answer: &TokenSet) -> bool {
    let Some(named) = answer.account() else {
        return false; // no ID token in the answer: nothing says otherwise
    };
    let held = link.account().cloned().or_else(|| {
        link.id_token()
            .and_then(crate::account::account_in_id_token)
    });
    held.is_some_and(|held| !held.is_same_account(named))
}

/// A provider's answer applied to a record: the link's own refresh merges (keeping the refresh
/// token when the answer has none); a narrowed one is kept beside the link's tokens.
fn merge_answer(base: &TokenSet, newer: &TokenSet, scopes: Option<&Scopes>) -> TokenSet {
    match scopes {
        None => base.merge(newer.clone()),
        Some(scopes) => base.with_narrowed(scopes, newer.clone()),
    }
}

fn timed_out() -> ProviderError {
    ProviderError::Transient {
        status: None,
        retry_after: None,
        reason: Some("timed out".into()),
        source: None,
    }
}

/// The pause before write retry `attempt` (1-based): 100 ms doubling up to 1.6 s.
fn write_pause(attempt: u32) -> Duration {
    Duration::from_millis(50 << attempt.min(5))
}

/// A random number in 0..1000.
fn jitter_permille() -> u32 {
    let mut b = [0u8; 4];
    // Jitter is not security-relevant: without randomness, no jitter.
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) % 1000
}
