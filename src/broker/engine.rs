//! The refresh engine: every refresh, whoever asks, runs here, in a task the broker owns.
//!
//! A refresh that lives inside a caller's future stops when that future is dropped, or simply
//! stops advancing when it is no longer polled: after the provider rotated the refresh token and
//! before the store took the new one, the rotated token is gone and the next refresh presents a
//! spent one (a strict provider then revokes the whole grant). So no caller ever runs a refresh.
//! Each (key, scope set) has at most one *flight* in this process: a spawned task that runs the
//! protocol of `refresh.rs` from the lease to the write and the release. Callers (reads of every
//! kind, sweeps, the forced refresh after a resource server's 401, the HTTP handlers) start it
//! or join it, and then only wait for its answer: dropping, aborting or timing out a caller
//! changes nothing for the flight. In-process joiners never go around a flight to the store's
//! lease; the flight's own bounds (the lease wait, the provider time-out, the lease-bounded
//! write) bound how long they wait.
//!
//! The price is a task hand-off per refresh (a few microseconds against a provider round trip
//! of tens of milliseconds); a cached read never comes here.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::watch;
use tracing::Instrument;

use super::Inner;
use super::refresh::Need;
use crate::error::{Error, Result};
use crate::ids::{Scopes, TokenKey};
use crate::telemetry::{RefreshOutcome, SubjectHash};
use crate::token::TokenSet;

/// What a flight answers: the tokens to serve and whether a refresh happened (here or in
/// another instance), or the error every waiter gets.
pub(crate) type Outcome = Result<(Arc<TokenSet>, bool)>;

/// One flight per key and scope set: a narrowed refresh does not wait for the link's own, and
/// the other way round (the store's lease still serializes them across instances).
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct FlightKey {
    pub(crate) key: TokenKey,
    pub(crate) scopes: Option<Scopes>,
}

pub(crate) struct Flight {
    /// Answered once the flight has written (or parked) its result and released its lease.
    pub(crate) answer: watch::Receiver<Option<Outcome>>,
    /// What the flight was started for; a joiner with another need checks the answer.
    need: Need,
}

/// Refreshes in flight in this process. An entry lives only while its flight runs, so the map
/// does not grow with the number of keys ever refreshed.
pub(crate) type Flights = Mutex<HashMap<FlightKey, Flight, foldhash::fast::RandomState>>;

/// Keys whose rotated tokens are waiting for the store (see `Inner::park`): no new flight
/// starts for them in this process, because it would present the spent refresh token.
pub(crate) type Parked = Mutex<HashMap<TokenKey, (), foldhash::fast::RandomState>>;

/// At most this many rotated sets wait for the store at once; past it, the rotated tokens of a
/// further failed write are lost (and logged), as they would be without parking.
pub(crate) const MAX_PARKED: usize = 1024;

impl Inner {
    /// Refreshes `key` as `need` asks, through the engine. The future only waits for the
    /// flight: dropping it changes nothing for the refresh.
    pub(crate) async fn refresh(self: &Arc<Self>, key: &TokenKey, need: Need) -> Outcome {
        let flight = FlightKey {
            key: key.clone(),
            scopes: need.scopes.clone(),
        };
        let mut round = 0;
        loop {
            round += 1;
            if self.is_parked(key) {
                return Err(Error::WritePending { key: key.clone() });
            }
            let (answer, same_need) = self.join_or_start(&flight, &need)?;
            let outcome = wait(answer).await;
            // A flight started for another need (a sweep's window, a token a resource server
            // rejected) may not serve ours; then our own flight follows it, once.
            if same_need || round > 1 {
                return outcome;
            }
            match &outcome {
                Ok((set, refreshed))
                    if need.served_by(set, *refreshed, self.clock.now(), self.config.skew) =>
                {
                    return outcome;
                }
                Ok(_) => {}
                Err(_) => return outcome,
            }
        }
    }

    /// Joins the flight of `flight`, or starts it. Returns its answer channel and whether it
    /// runs for the same need. Once the broker is shutting down, a flight in progress is
    /// still joined (it calls the provider at most once whoever waits), but none starts.
    fn join_or_start(
        self: &Arc<Self>,
        flight: &FlightKey,
        need: &Need,
    ) -> Result<(watch::Receiver<Option<Outcome>>, bool)> {
        let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = flights.get(flight) {
            return Ok((running.answer.clone(), running.need.same_as(need)));
        }
        // Checked under the lock `shutdown` takes to set the flag and list the flights: a
        // flight starts before it (and is waited for) or not at all.
        if self.is_closing() {
            drop(flights);
            self.metrics(&flight.key.provider)
                .refresh(RefreshOutcome::ShuttingDown);
            return Err(Error::ShuttingDown {
                key: flight.key.clone(),
            });
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(
            flight.clone(),
            Flight {
                answer: rx.clone(),
                need: need.clone(),
            },
        );
        drop(flights);
        let guard = FlightGuard {
            inner: Arc::clone(self),
            flight: flight.clone(),
            answer: rx.clone(),
        };
        let need = need.clone();
        // The flight outlives the caller that started it: its span is a root that follows
        // from the caller's, not a child of it.
        let span = tracing::info_span!(
            target: "tokenbroker",
            parent: None,
            "tokenbroker.refresh",
            provider = %flight.key.provider,
            subject_hash = %SubjectHash(&flight.key.subject),
            narrowed = need.scopes.is_some(),
        );
        span.follows_from(tracing::Span::current());
        // A panic outside the lease (the part under it is caught in `refresh_with_lease`,
        // which must release) ends the task: the guard still removes the flight, and the
        // dropped sender answers the joiners with `Error::Internal`.
        tokio::spawn(
            async move {
                let outcome = guard
                    .inner
                    .refresh_with_lease(&guard.flight.key, &need)
                    .await;
                // Removed before answering: a reader arriving after this starts a new flight, which
                // finds the fresh record under the lease without calling the provider.
                drop(guard);
                let _ = tx.send(Some(outcome));
            }
            .instrument(span),
        );
        Ok((rx, true))
    }

    /// Whether a refresh of `key` (its own scopes) is in flight in this process.
    pub(crate) fn is_refreshing(&self, key: &TokenKey) -> bool {
        self.flights
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&FlightKey {
                key: key.clone(),
                scopes: None,
            })
    }

    pub(crate) fn is_parked(&self, key: &TokenKey) -> bool {
        let parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        !parked.is_empty() && parked.contains_key(key)
    }
}

async fn wait(mut answer: watch::Receiver<Option<Outcome>>) -> Outcome {
    match answer.wait_for(Option::is_some).await {
        Ok(outcome) => outcome
            .clone()
            .unwrap_or(Err(Error::Internal("a refresh ended without an answer"))),
        // The task was dropped without answering: only a runtime shutting down does that.
        Err(_) => Err(Error::Internal("the refresh task ended without an answer")),
    }
}

/// Removes a flight's entry however the flight ends, so that the next reader starts a new
/// flight rather than joining one that will never answer.
struct FlightGuard {
    inner: Arc<Inner>,
    flight: FlightKey,
    answer: watch::Receiver<Option<Outcome>>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.inner.flights.lock().unwrap_or_else(|e| e.into_inner());
        if flights
            .get(&self.flight)
            .is_some_and(|f| f.answer.same_channel(&self.answer))
        {
            flights.remove(&self.flight);
        }
    }
}

/// Runs a future and turns a panic inside it into `None`, so that whatever the engine must do
/// after it (release the lease, answer the waiters) still happens.
pub(crate) struct CatchUnwind<'a, T>(Pin<Box<dyn Future<Output = T> + Send + 'a>>);

impl<'a, T> CatchUnwind<'a, T> {
    pub(crate) fn new(future: impl Future<Output = T> + Send + 'a) -> Self {
        CatchUnwind(Box::pin(future))
    }
}

impl<T> Future for CatchUnwind<'_, T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let future = self.0.as_mut();
        // A future that panicked is never polled again: `Ready(None)` ends it.
        match std::panic::catch_unwind(AssertUnwindSafe(|| future.poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Some(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(None),
        }
    }
}
