//! The refresh-and-rotate protocol (REFRESH-PROTOCOL.md), one function per step.
//!
//! 1. fast path: one load, no lock;
//! 2. single-flight in this process: readers of one key share one refresh, led by the first;
//! 3. the store's lease across processes: a loser waits and re-reads, it never calls the IdP;
//! 4. under the lease, re-read and re-check (someone may have just finished);
//! 5. call the provider, bounded by the refresh time-out (shorter than the lease);
//! 6. compare-and-swap the merged set, and only then hand it out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::watch;

use super::Inner;
use crate::error::{Error, Result};
use crate::events::BrokerEvent;
use crate::ids::TokenKey;
use crate::provider::ProviderError;
use crate::store::{LeaseAttempt, LinkState, Record, RecordMeta, StoreError, StoredRecord};
use crate::token::TokenSet;

type FlightResult = Option<Result<(Arc<TokenSet>, bool)>>;

/// Refreshes in flight in this process, one per key. An entry lives only while its refresh
/// runs, so the map does not grow with the number of keys ever refreshed.
pub(crate) type Flights =
    Mutex<HashMap<TokenKey, watch::Receiver<FlightResult>, foldhash::fast::RandomState>>;

/// Ends a flight: removes its entry however the flight ends (a panic included), so that the
/// next reader leads a new flight rather than joining one that will never answer.
struct FlightGuard {
    inner: Arc<Inner>,
    key: TokenKey,
    rx: watch::Receiver<FlightResult>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            flights.remove(&self.key);
        }
    }
}

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
    pub(crate) reject: Option<crate::secret::Secret>,
    /// The link must have been written after this instant (keeps idle refresh tokens alive).
    pub(crate) written_after: Option<OffsetDateTime>,
    /// A token for these narrower scopes rather than the link's own.
    pub(crate) scopes: Option<crate::ids::Scopes>,
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

    /// What this need serves from a set: the set itself, or its narrowed view.
    pub(crate) fn view(&self, set: &Arc<TokenSet>) -> Option<Arc<TokenSet>> {
        match &self.scopes {
            None => Some(Arc::clone(set)),
            Some(scopes) => set.narrowed_to(scopes).map(Arc::new),
        }
    }

    fn satisfied_by(
        &self,
        set: &Arc<TokenSet>,
        written_at: OffsetDateTime,
        now: OffsetDateTime,
    ) -> bool {
        let Some(set) = self.view(set) else {
            return false;
        };
        set.is_fresh(now, self.min_validity)
            && self
                .reject
                .as_ref()
                .is_none_or(|r| !r.constant_time_eq(set.access_token()))
            && self.written_after.is_none_or(|t| written_at > t)
    }
}

/// A loaded link, decoded (or found already decoded in the hot cache).
struct Loaded {
    stored: StoredRecord,
    set: Arc<TokenSet>,
}

impl Inner {
    /// Step 1: the fast path, then the shared refresh.
    /// Returns the tokens, whether a refresh happened, and whether they are stale.
    pub(crate) async fn fresh_tokens(
        self: &Arc<Self>,
        key: &TokenKey,
    ) -> Result<(Arc<TokenSet>, bool, bool)> {
        let loaded = self.load(key).await?;
        if loaded.set.is_fresh(self.clock.now(), self.config.skew) {
            return Ok((loaded.set, false, false));
        }
        let (set, refreshed) = self.refresh_shared(key).await?;
        let stale = !set.is_fresh(self.clock.now(), self.config.skew);
        Ok((set, refreshed, stale))
    }

    /// The narrowed read: checks the scopes against the grant, serves a fresh narrowed token,
    /// or refreshes one under the lease.
    pub(crate) async fn fresh_narrowed(
        self: &Arc<Self>,
        key: &TokenKey,
        scopes: &crate::ids::Scopes,
    ) -> Result<(Arc<TokenSet>, bool, bool)> {
        let loaded = self.load(key).await?;
        let granted = loaded.set.scopes();
        let missing: crate::ids::Scopes = scopes
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
            min_validity: self.config.skew,
            reject: None,
            written_after: None,
            scopes: Some(scopes.clone()),
        };
        let now = self.clock.now();
        if need.satisfied_by(&loaded.set, loaded.stored.record.meta.updated_at, now)
            && let Some(view) = need.view(&loaded.set)
        {
            return Ok((view, false, false));
        }
        let (set, refreshed) = self.refresh_with_lease(key, &need).await?;
        let stale = !set.is_fresh(self.clock.now(), self.config.skew);
        Ok((set, refreshed, stale))
    }

    /// Loads and decodes a link; a link marked relink-required is an error. The decode is
    /// skipped when the hot cache holds the set decoded from these very bytes.
    async fn load(&self, key: &TokenKey) -> Result<Loaded> {
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
        // The payload itself may know its decoding (a store that hands out its own
        // allocation); otherwise the hot cache may; otherwise decode.
        if let Some(set) = stored.record.payload.decoded() {
            return Ok(Loaded { stored, set });
        }
        if let Some(set) = self.hot.get(key, &stored) {
            return Ok(Loaded { stored, set });
        }
        let set =
            TokenSet::from_payload(&stored.record.payload).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        let set = Arc::new(set);
        self.remember(key, &stored, &set);
        Ok(Loaded { stored, set })
    }

    /// Keeps `set` as the decoding of `stored`: strongly in the bounded hot cache, weakly in
    /// the payload.
    fn remember(&self, key: &TokenKey, stored: &StoredRecord, set: &Arc<TokenSet>) {
        stored.record.payload.remember_decoded(set);
        self.hot.put(key, stored, Arc::clone(set));
    }

    /// Step 2: joins the refresh in flight for `key`, or leads one. The leader runs the
    /// refresh itself, in its own task, as a [`Detached`](super::detach::Detached) future: if
    /// the leader gives up (a dropped request), the rest of the refresh is spawned, so that it
    /// can never be cut off between the provider's answer and the store write (a rotated
    /// refresh token would be lost). The refresh advances as the leader's task polls it; a
    /// joiner waits for it at most the lease wait (a leader future kept but no longer polled
    /// must not hold the others up), then goes through the store's lease itself.
    async fn refresh_shared(self: &Arc<Self>, key: &TokenKey) -> Result<(Arc<TokenSet>, bool)> {
        let (mut rx, flight) = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            match flights.get(key) {
                Some(rx) => (rx.clone(), None),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key.clone(), rx.clone());
                    let guard = FlightGuard {
                        inner: Arc::clone(self),
                        key: key.clone(),
                        rx: rx.clone(),
                    };
                    let flight = async move {
                        let need = Need::fresh(guard.inner.config.skew);
                        let result = guard.inner.refresh_with_lease(&guard.key, &need).await;
                        // Remove first: a reader arriving after this starts a new flight, which
                        // finds the fresh record under the lease without calling the provider.
                        drop(guard);
                        let _ = tx.send(Some(result));
                    };
                    (rx, Some(super::detach::Detached::new(flight)))
                }
            }
        };
        if let Some(flight) = flight {
            flight.await;
        }
        let waited = tokio::time::timeout(self.config.lease_wait, rx.wait_for(Option::is_some));
        // Owned before anything else awaits: the channel's guard must not live across one.
        let answer = match waited.await {
            Ok(Ok(result)) => Some(
                result
                    .clone()
                    .expect("wait_for returned a completed flight"),
            ),
            Ok(Err(_)) => return Err(Error::Internal("the refresh task ended without an answer")),
            Err(_) => None,
        };
        match answer {
            Some(answer) => answer,
            // The leader has not finished within the lease wait: its future may be held
            // somewhere without being polled. Stop waiting on it and go through the store's
            // lease, as another instance would; the lease still allows one upstream call.
            None => {
                self.refresh_with_lease(key, &Need::fresh(self.config.skew))
                    .await
            }
        }
    }

    /// Refreshes unless `need` is already met, without joining reads in flight: for sweeps and
    /// for tokens a resource server rejected. Still under the store's lease.
    pub(crate) async fn refresh_for(
        &self,
        key: &TokenKey,
        need: &Need,
    ) -> Result<(Arc<TokenSet>, bool)> {
        self.refresh_with_lease(key, need).await
    }

    /// Step 3: takes the store's lease, or waits for the instance holding it.
    async fn refresh_with_lease(
        &self,
        key: &TokenKey,
        need: &Need,
    ) -> Result<(Arc<TokenSet>, bool)> {
        let deadline = tokio::time::Instant::now() + self.config.lease_wait;
        let mut pause = Duration::from_millis(10);
        loop {
            // Taken before asking, so it is never later than the store's own expiry.
            let lease_until = tokio::time::Instant::now() + self.config.lease_ttl;
            match self
                .store
                .try_lease(key, &self.holder, self.config.lease_ttl)
                .await?
            {
                LeaseAttempt::Missing => return Err(Error::NotFound { key: key.clone() }),
                LeaseAttempt::Acquired(lease) => {
                    let result = self.refresh_holding_lease(key, need, lease_until).await;
                    if let Err(e) = self.store.release_lease(&lease).await {
                        // The lease expires on its own; others wait at most its TTL.
                        tracing::warn!(target: "tokenbroker", %key, error = %e, "could not release refresh lease");
                    }
                    super::lease_wake::wake(super::lease_wake::store_id(&self.store), key);
                    return result;
                }
                LeaseAttempt::Busy => {
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
                    let loaded = self.load(key).await?;
                    let written = loaded.stored.record.meta.updated_at;
                    if need.satisfied_by(&loaded.set, written, self.clock.now())
                        && let Some(view) = need.view(&loaded.set)
                    {
                        return Ok((view, true));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::RefreshInProgress { key: key.clone() });
                    }
                }
            }
        }
    }

    /// Steps 4 to 6, holding the lease.
    async fn refresh_holding_lease(
        &self,
        key: &TokenKey,
        need: &Need,
        lease_until: tokio::time::Instant,
    ) -> Result<(Arc<TokenSet>, bool)> {
        let Loaded { stored, set } = self.load(key).await?;
        let now = self.clock.now();
        if need.satisfied_by(&set, stored.record.meta.updated_at, now)
            && let Some(view) = need.view(&set)
        {
            return Ok((view, true));
        }
        // What may be served if no refresh happens: never a wider token than was asked for.
        let fallback = need.view(&set);
        let Some(refresh_token) = set.refresh_token().cloned() else {
            return self
                .serve_unexpired(fallback, now, || Error::NoRefreshToken { key: key.clone() });
        };
        if let Some(until) = self.backing_off(key, now) {
            let retry_after = Some((until - now).unsigned_abs());
            return self
                .serve_unexpired(fallback, now, || self.unavailable(key, retry_after, None));
        }
        let provider = &self.entry(&key.provider)?.provider;
        let answer = tokio::time::timeout(
            self.config.refresh_timeout,
            provider.refresh(&refresh_token, need.scopes.as_ref()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ProviderError::Transient {
                status: None,
                retry_after: None,
                reason: Some("timed out".into()),
                source: None,
            })
        });
        match answer {
            Ok(tokens) => {
                let asked = need.scopes.as_ref().unwrap_or(set.scopes());
                let newer = TokenSet::from_response(tokens, self.clock.now(), asked);
                self.store_refreshed(key, stored, set, newer, need.scopes.as_ref(), lease_until)
                    .await
            }
            Err(ProviderError::InvalidGrant { description }) => {
                self.on_invalid_grant(key, stored, description).await
            }
            Err(e) => self.on_failure(key, fallback, e),
        }
    }

    /// Step 6: writes the merged set with compare-and-swap before anyone sees it.
    async fn store_refreshed(
        &self,
        key: &TokenKey,
        stored: StoredRecord,
        old: Arc<TokenSet>,
        newer: TokenSet,
        scopes: Option<&crate::ids::Scopes>,
        lease_until: tokio::time::Instant,
    ) -> Result<(Arc<TokenSet>, bool)> {
        let merged = Arc::new(match scopes {
            None => old.merge(newer),
            Some(scopes) => old.with_narrowed(scopes, newer),
        });
        let rotated = old.is_rotated_by(&merged);
        let now = self.clock.now();
        let record = Record::new(
            merged.to_payload(),
            RecordMeta::new(
                LinkState::Active,
                merged.expires_at(),
                stored.record.meta.created_at,
                now,
            ),
        );
        let mut attempt = 0;
        loop {
            match self
                .store
                .compare_and_swap(key, stored.version, &record, None)
                .await
            {
                Ok(version) => {
                    // The next read loads exactly these bytes: let it skip the decode.
                    self.remember(key, &StoredRecord::new(record.clone(), version), &merged);
                    self.clear_backoff(key);
                    self.emit_info(|| BrokerEvent::Refreshed {
                        key: key.clone(),
                        rotated,
                    });
                    let served = match scopes {
                        None => merged,
                        Some(scopes) => merged.narrowed_to(scopes).map_or(merged, Arc::new),
                    };
                    return Ok((served, true));
                }
                Err(StoreError::Conflict { .. }) => {
                    // Someone wrote while we held the lease (a re-link, or a holder whose lease
                    // we outlived). Their record wins; ours is dropped.
                    tracing::warn!(target: "tokenbroker", %key, rotated, "record changed during refresh; using the newer record");
                    self.emit(BrokerEvent::LostRace { key: key.clone() });
                    let loaded = self.load(key).await?;
                    let now = self.clock.now();
                    let view = match scopes {
                        None => Some(loaded.set),
                        Some(scopes) => loaded.set.narrowed_to(scopes).map(Arc::new),
                    };
                    return self
                        .serve_unexpired(view, now, || Error::RefreshInProgress {
                            key: key.clone(),
                        })
                        .map(|(set, _)| (set, true));
                }
                // A store hiccup now would lose a rotated refresh token (the IdP has retired
                // the stored one): retry, a few times at least and then for as long as our
                // lease keeps other instances from refreshing, so that an outage shorter than
                // the lease loses nothing.
                Err(e)
                    if attempt < 3
                        || tokio::time::Instant::now() + Self::write_pause(attempt + 1)
                            < lease_until =>
                {
                    attempt += 1;
                    tracing::warn!(target: "tokenbroker", %key, error = %e, attempt, "retrying the write of refreshed tokens");
                    tokio::time::sleep(Self::write_pause(attempt)).await;
                }
                Err(e) => {
                    tracing::error!(target: "tokenbroker", %key, error = %e, rotated, "refreshed tokens could not be stored");
                    return Err(e.into());
                }
            }
        }
    }

    /// The pause before write retry `attempt` (1-based): 100 ms doubling up to 1.6 s.
    fn write_pause(attempt: u32) -> Duration {
        Duration::from_millis(50 << attempt.min(5))
    }

    /// `invalid_grant`: a dead grant only if nobody moved the record since we read it.
    async fn on_invalid_grant(
        &self,
        key: &TokenKey,
        stored: StoredRecord,
        description: Option<String>,
    ) -> Result<(Arc<TokenSet>, bool)> {
        let current = self
            .store
            .load(key)
            .await?
            .ok_or_else(|| Error::NotFound { key: key.clone() })?;
        if current.version != stored.version {
            // Lost race: another writer refreshed (or re-linked) with a newer token.
            self.emit(BrokerEvent::LostRace { key: key.clone() });
            let loaded = self.load(key).await?;
            let now = self.clock.now();
            return self
                .serve_unexpired(Some(loaded.set), now, || Error::RefreshInProgress {
                    key: key.clone(),
                })
                .map(|(set, _)| (set, true));
        }
        let reason = description.unwrap_or_else(|| "refresh token rejected (invalid_grant)".into());
        let mut meta = stored.record.meta.clone();
        meta.state = LinkState::RelinkRequired {
            reason: reason.clone(),
            since: self.clock.now(),
        };
        match self
            .store
            .compare_and_swap(
                key,
                stored.version,
                &Record::new(stored.record.payload.clone(), meta),
                None,
            )
            .await
        {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => {
                tracing::warn!(target: "tokenbroker", %key, error = %e, "could not mark link relink-required")
            }
        }
        self.emit(BrokerEvent::RelinkRequired {
            key: key.clone(),
            reason: reason.clone(),
        });
        Err(Error::RelinkRequired {
            key: key.clone(),
            reason,
        })
    }

    /// Any other failure: the record stays exactly as it was; a still-valid token is served.
    fn on_failure(
        &self,
        key: &TokenKey,
        set: Option<Arc<TokenSet>>,
        error: ProviderError,
    ) -> Result<(Arc<TokenSet>, bool)> {
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

    fn serve_unexpired(
        &self,
        set: Option<Arc<TokenSet>>,
        now: OffsetDateTime,
        otherwise: impl FnOnce() -> Error,
    ) -> Result<(Arc<TokenSet>, bool)> {
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

    /// Records a failure and returns how long to leave the provider alone: its `Retry-After`,
    /// or 1 s doubling per consecutive failure up to the maximum.
    fn note_failure(
        &self,
        key: &TokenKey,
        now: OffsetDateTime,
        retry_after: Option<Duration>,
    ) -> Duration {
        let mut map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let failures = map.get(key).map_or(1, |b| b.failures.saturating_add(1));
        let doubling = Duration::from_secs(1u64 << failures.saturating_sub(1).min(10));
        // Up to +25 % jitter, so that instances that failed together do not retry together.
        let jitter = doubling.mul_f64(f64::from(jitter_permille()) / 4000.0);
        let wait = retry_after
            .unwrap_or(doubling + jitter)
            .min(self.config.max_backoff);
        map.insert(
            key.clone(),
            Backoff {
                until: now + wait,
                failures,
            },
        );
        wait
    }

    fn clear_backoff(&self, key: &TokenKey) {
        let was = self
            .backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
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

    /// Whether a refresh of `key` is in flight in this process.
    pub(crate) fn is_refreshing(&self, key: &TokenKey) -> bool {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }
}

/// A random number in 0..1000.
fn jitter_permille() -> u32 {
    let mut b = [0u8; 4];
    // Jitter is not security-relevant: without randomness, no jitter.
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) % 1000
}
