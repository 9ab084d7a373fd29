//! Graceful shutdown: no new refresh starts, and the refreshes in flight get to store what the
//! provider answered.
//!
//! The point is invariant 6 (a rotated refresh token is never discarded): a flight that has
//! called the provider holds the link's only live refresh token until its write lands. So
//! shutdown never cancels a flight and never releases a lease a flight still holds (another
//! instance would take it and present the spent token); it only stops new flights and waits.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::Instrument;

use super::{Inner, TokenBroker};

/// What [`TokenBroker::shutdown`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Refresh flights that were running when shutdown began and ended before the deadline:
    /// their results are stored (or parked) and their leases released.
    pub finished: usize,
    /// Refresh flights still running at the deadline. They go on in the background for as
    /// long as the runtime runs (they are bounded by the refresh time-out and the lease); each
    /// keeps its lease until it ends, because a flight may already have spent the refresh
    /// token. Dropping the runtime now may lose a rotated token.
    pub running: usize,
    /// Rotated token sets the store did not take in time, still held in this process's memory
    /// and being written in the background (see [`crate::BrokerEvent::WriteParked`]). Exiting
    /// the process loses them.
    pub parked: usize,
}

impl TokenBroker {
    /// Shuts the broker's refresh engine down gracefully.
    ///
    /// From the moment it is called, on this instance and all its clones:
    /// - no new refresh starts: a read whose token needs a refresh gets
    ///   [`Error::ShuttingDown`](crate::Error::ShuttingDown) without any upstream call (or,
    ///   when the provider is not reached yet but the access token is still unexpired, that
    ///   token, marked `stale`). Reads of a valid token are served as before. A read that
    ///   joins a refresh already in flight gets its answer;
    /// - the refreshes in flight are waited for, up to `deadline`: each stores what the
    ///   provider answered (or parks it), then releases its lease. A flight that has not called
    ///   the provider yet gives up at once, without calling it.
    ///
    /// Nothing is cancelled at the deadline: a flight still running keeps going (and keeps its
    /// lease) while the runtime runs, and the report counts it under `running`. Logins and
    /// unlinks are not affected.
    ///
    /// Safe to call more than once and from several clones: each call waits for the flights
    /// running at that moment.
    ///
    /// ```
    /// # async fn run(broker: tokenbroker::TokenBroker) {
    /// use std::time::Duration;
    /// let report = broker.shutdown(Duration::from_secs(15)).await;
    /// if report.running > 0 || report.parked > 0 {
    ///     eprintln!("exiting with {} refreshes unfinished", report.running + report.parked);
    /// }
    /// # }
    /// ```
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let span = tracing::info_span!(target: "tokenbroker", "tokenbroker.shutdown");
        self.inner.shutdown(deadline).instrument(span).await
    }

    /// Whether [`shutdown`](Self::shutdown) was called on this broker or a clone of it.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.is_closing()
    }
}

impl Inner {
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let until = tokio::time::Instant::now() + deadline;
        // Under the flights lock, where flights start: every flight starts either before the
        // flag (and is in this snapshot) or not at all.
        let answers: Vec<_> = {
            let flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            self.closing.store(true, Ordering::Release);
            flights.values().map(|f| f.answer.clone()).collect()
        };
        tracing::info!(target: "tokenbroker", flights = answers.len(), "shutting down: waiting for refreshes in flight");
        let mut report = ShutdownReport::default();
        for mut answer in answers {
            // A flight answers after its write and its lease release; a closed channel means
            // its task ended (a panic outside the lease, or the runtime going away).
            match tokio::time::timeout_at(until, answer.wait_for(Option::is_some)).await {
                Ok(_) => report.finished += 1,
                Err(_) => report.running += 1,
            }
        }
        report.parked = self.parked.lock().unwrap_or_else(|e| e.into_inner()).len();
        if report.running > 0 || report.parked > 0 {
            tracing::warn!(target: "tokenbroker", running = report.running, parked = report.parked, "shutdown deadline: refreshes still unfinished");
        }
        report
    }
}
