//! The life of a grant after login: its health, a keep-alive sweep, and requests signed with
//! its access token.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::TokenBroker;
use super::refresh::Need;
use crate::access::Caller;
use crate::error::{Error, Result};
use crate::http::{HttpClient, HttpRequest, HttpResponse};
use crate::ids::{ProviderId, TokenKey};
use crate::secret::Secret;
use crate::store::{LinkState, ScanCursor};
use crate::token::TokenSet;

/// The health of one link, as this broker instance sees it.
///
/// ```text
///              refresh ok                        invalid_grant
///   Active  ─────────────▶ Refreshing ─────────────────────────▶ RelinkRequired
///     ▲  ◀──────────────────┘   │ 5xx / 429 / time-out                │ login
///     │      recovered          ▼                                     │
///     └──────────────────── Backoff ◀─────────────────────────────────┘
///                                                       unlink ──▶ NotLinked
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrantStatus {
    /// Usable; the access token expires at `expires_at` (never, if `None`).
    Active {
        /// When the current access token expires.
        expires_at: Option<OffsetDateTime>,
        /// Whether a refresh token is held.
        has_refresh_token: bool,
        /// The upstream account the link holds, when known ("linked as ...").
        account: Option<crate::account::UpstreamAccount>,
    },
    /// A refresh of this link is running in this process.
    Refreshing,
    /// The last refreshes failed transiently; no upstream call before `until`.
    Backoff {
        /// When the next attempt may happen.
        until: OffsetDateTime,
        /// Consecutive failures.
        failures: u32,
    },
    /// The provider refused the grant: the user must link again.
    RelinkRequired {
        /// The provider's reason.
        reason: String,
        /// Since when.
        since: OffsetDateTime,
    },
    /// No link is stored (never linked, unlinked, or revoked and removed).
    NotLinked,
}

/// Bounds of one [`TokenBroker::sweep`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SweepOptions {
    /// Refresh links whose access token expires within this window.
    pub window: Duration,
    /// At most this many refreshes at once.
    pub concurrency: usize,
    /// Stop starting new refreshes after this long (refreshes started finish).
    pub time_budget: Duration,
    /// How many links to read per store page.
    pub page_size: usize,
}

impl SweepOptions {
    /// Refresh what expires within `window`, 4 at a time, for at most a minute.
    pub fn new(window: Duration) -> Self {
        SweepOptions {
            window,
            concurrency: 4,
            time_budget: Duration::from_secs(60),
            page_size: 500,
        }
    }
    /// Sets the concurrency (at least 1).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }
    /// Sets the time budget.
    pub fn with_time_budget(mut self, budget: Duration) -> Self {
        self.time_budget = budget;
        self
    }
}

/// What a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepReport {
    /// Links looked at.
    pub scanned: usize,
    /// Links refreshed (by this sweep, or by another instance while it waited for the lease).
    pub refreshed: Vec<TokenKey>,
    /// Links the provider refused: now relink-required.
    pub relink_required: Vec<TokenKey>,
    /// Links whose refresh failed transiently, with when they may be tried again.
    pub transient: Vec<(TokenKey, Option<OffsetDateTime>)>,
    /// Whether the time budget ran out before every due link was tried.
    pub budget_exhausted: bool,
    /// What the drain of owed revocations at the end of the sweep did (see
    /// [`TokenBroker::drain_revocations`]).
    pub revocations: super::DrainReport,
}

impl TokenBroker {
    /// The health of a link. For the host's own use (dashboards, webhooks): no caller is
    /// checked, so do not expose it to end users without your own authorization.
    pub async fn status(&self, key: &TokenKey) -> Result<GrantStatus> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let Some(stored) = inner.store.load(key).await? else {
            return Ok(GrantStatus::NotLinked);
        };
        if let LinkState::RelinkRequired { reason, since } = &stored.record.meta.state {
            return Ok(GrantStatus::RelinkRequired {
                reason: reason.clone(),
                since: *since,
            });
        }
        if inner.is_refreshing(key) {
            return Ok(GrantStatus::Refreshing);
        }
        if let Some((until, failures)) = inner.backoff_of(key, now) {
            return Ok(GrantStatus::Backoff { until, failures });
        }
        let set = TokenSet::from_payload(&stored.record.payload).map_err(|e| {
            crate::StoreError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
                version: Some(stored.version),
            }
        })?;
        Ok(GrantStatus::Active {
            expires_at: set.expires_at(),
            has_refresh_token: set.refresh_token().is_some(),
            account: set.account().cloned(),
        })
    }

    /// Keeps links alive: refreshes every link whose access token expires within
    /// `options.window`, and every link of a provider with an idle limit
    /// ([`ProviderPolicy::idle_limit`](crate::ProviderPolicy::idle_limit)) that was not written
    /// for that long (a refresh token unused for too long dies: Google apps in testing mode
    /// after about 7 days, Microsoft after 90).
    ///
    /// Refreshes go through the same lease as reads, so a sweep on every instance at once is
    /// safe; links backing off after transient failures are skipped until their time comes.
    /// At the end it drains the revocations owed to providers that are due
    /// ([`drain_revocations`](Self::drain_revocations)), up to one page of them.
    ///
    /// ```
    /// # async fn run(broker: tokenbroker::TokenBroker) -> tokenbroker::Result<()> {
    /// use std::time::Duration;
    /// use tokenbroker::SweepOptions;
    ///
    /// let report = broker
    ///     .sweep(SweepOptions::new(Duration::from_secs(300)).with_concurrency(8))
    ///     .await?;
    /// for key in &report.relink_required {
    ///     println!("{key}: ask the user to link again");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn sweep(&self, options: SweepOptions) -> Result<SweepReport> {
        let inner = &self.inner;
        let started = tokio::time::Instant::now();
        let mut report = SweepReport::default();
        let semaphore = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut cursor: Option<ScanCursor> = None;
        // Links per provider by stored state, for the health gauges: (active, relink-required).
        let mut health: HashMap<ProviderId, (u64, u64), foldhash::fast::RandomState> =
            HashMap::default();
        'pages: loop {
            let page = inner
                .store
                .scan(cursor.as_ref(), options.page_size.max(1))
                .await?;
            let last_page = page.next.is_none();
            cursor = page.next;
            for link in page.links {
                report.scanned += 1;
                let Ok(entry) = inner.entry(&link.key.provider) else {
                    continue; // a provider this instance does not serve
                };
                let counts = health.entry(link.key.provider.clone()).or_default();
                if link.meta.state.is_relink_required() {
                    counts.1 += 1;
                    continue;
                }
                counts.0 += 1;
                let now = inner.clock.now();
                let expiring = link
                    .meta
                    .expires_at
                    .is_some_and(|at| at <= now + options.window);
                let idle_since = entry.policy.idle_limit.map(|limit| now - limit);
                let idle = idle_since.is_some_and(|t| link.meta.updated_at <= t);
                if !(expiring || idle) || inner.backoff_of(&link.key, now).is_some() {
                    continue;
                }
                if started.elapsed() >= options.time_budget {
                    report.budget_exhausted = true;
                    break 'pages;
                }
                let permit = semaphore
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("never closed");
                let need = Need {
                    min_validity: options.window,
                    reject: None,
                    written_after: idle_since,
                    scopes: None,
                };
                let inner = Arc::clone(inner);
                // Each task only joins the engine's flight: aborting it (the sweep dropped,
                // or timed out by the host) cancels no refresh that has started.
                tasks.spawn(async move {
                    let _permit = permit;
                    let result = inner.refresh(&link.key, need).await;
                    (link.key, result)
                });
                while let Some(done) = tasks.try_join_next() {
                    record(&mut report, done, &self.inner);
                }
            }
            if last_page {
                break;
            }
        }
        while let Some(done) = tasks.join_next().await {
            record(&mut report, done, &self.inner);
        }
        if !report.budget_exhausted {
            self.set_health_gauges(health, &report);
        }
        // The outbox's failure does not undo the refreshes above: it is logged, and the next
        // sweep or drain tries again.
        match self
            .drain_revocations(
                super::DrainOptions::default()
                    .with_limit(options.page_size.max(1))
                    .with_concurrency(options.concurrency),
            )
            .await
        {
            Ok(drained) => report.revocations = drained,
            Err(e) => {
                tracing::warn!(target: "tokenbroker", error = %e, "could not drain the revocation outbox")
            }
        }
        Ok(report)
    }

    /// Attaches `Authorization: Bearer <access token>` of `key` to `request`, after the same
    /// authorization and refresh as [`retrieve`](Self::retrieve). The caller's code never sees
    /// the token.
    pub async fn authorize_request(
        &self,
        caller: &Caller,
        key: &TokenKey,
        request: HttpRequest,
    ) -> Result<HttpRequest> {
        let read = self.retrieve(caller, key).await?;
        with_bearer(request, key, read.tokens.access_token())
    }

    /// Sends `request` through `http` with `key`'s access token attached. When the resource
    /// server answers 401 (the token was revoked or is not accepted yet), the broker forces one
    /// refresh — unless another reader already replaced that token — and retries once. Any
    /// other answer, and the second 401, is returned as is.
    ///
    /// ```
    /// # async fn run(broker: tokenbroker::TokenBroker, caller: tokenbroker::Caller,
    /// #              key: tokenbroker::TokenKey,
    /// #              http: std::sync::Arc<dyn tokenbroker::http::HttpClient>)
    /// #              -> tokenbroker::Result<()> {
    /// let request = http::Request::get("https://api.example/me").body(Vec::new()).unwrap();
    /// let response = broker.send_authorized(&caller, &key, request, &*http).await?;
    /// println!("{}", response.status());
    /// # Ok(()) }
    /// ```
    pub async fn send_authorized(
        &self,
        caller: &Caller,
        key: &TokenKey,
        request: HttpRequest,
        http: &dyn HttpClient,
    ) -> Result<HttpResponse> {
        let read = self.retrieve(caller, key).await?;
        let retry = clone_request(&request);
        let response = http
            .execute(with_bearer(request, key, read.tokens.access_token())?)
            .await
            .map_err(|e| resource_server_unavailable(key, e))?;
        if response.status() != http::StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(retry) = retry else {
            return Ok(response);
        };
        let need = Need {
            min_validity: self.inner.config.skew,
            reject: Some(read.tokens.access_token().clone()),
            written_after: None,
            scopes: None,
        };
        let (fresh, _) = self.inner.refresh(key, need).await?;
        if fresh
            .access_token()
            .constant_time_eq(read.tokens.access_token())
        {
            return Ok(response);
        }
        http.execute(with_bearer(retry, key, fresh.access_token())?)
            .await
            .map_err(|e| resource_server_unavailable(key, e))
    }
}

impl TokenBroker {
    /// Sets the links-by-health gauges from a complete sweep: what the scan found, with the
    /// links this sweep found dead moved to relink-required and the keys backing off now (in
    /// this process) moved from active to backoff.
    fn set_health_gauges(
        &self,
        mut health: HashMap<ProviderId, (u64, u64), foldhash::fast::RandomState>,
        report: &SweepReport,
    ) {
        let inner = &self.inner;
        for key in &report.relink_required {
            if let Some(counts) = health.get_mut(&key.provider) {
                counts.0 = counts.0.saturating_sub(1);
                counts.1 += 1;
            }
        }
        let now = inner.clock.now();
        let mut backoff: HashMap<&ProviderId, u64, foldhash::fast::RandomState> =
            HashMap::default();
        let backing_off = inner.backoff.lock().unwrap_or_else(|e| e.into_inner());
        for key in backing_off
            .iter()
            .filter(|(_, b)| b.until() > now)
            .map(|(key, _)| key)
        {
            *backoff.entry(&key.provider).or_default() += 1;
        }
        for (id, entry) in &inner.providers {
            let (active, relink) = health.get(id).copied().unwrap_or_default();
            let backing = backoff.get(id).copied().unwrap_or_default().min(active);
            entry.metrics.links_active.set((active - backing) as f64);
            entry.metrics.links_backoff.set(backing as f64);
            entry.metrics.links_relink_required.set(relink as f64);
        }
    }
}

type Done = std::result::Result<(TokenKey, Result<(Arc<TokenSet>, bool)>), tokio::task::JoinError>;

fn record(report: &mut SweepReport, done: Done, inner: &super::Inner) {
    let Ok((key, result)) = done else {
        return; // a panicked refresh task: nothing was written by it after the panic
    };
    let now = inner.clock.now();
    match result {
        Ok((_, true)) => report.refreshed.push(key),
        // A still-valid token was kept because the provider failed: a transient failure.
        Ok((_, false)) => {
            let until = inner.backoff_of(&key, now).map(|(until, _)| until);
            report.transient.push((key, until));
        }
        Err(Error::RelinkRequired { .. }) => report.relink_required.push(key),
        Err(Error::Unavailable { retry_after, .. }) => {
            report.transient.push((key, retry_after.map(|d| now + d)))
        }
        Err(_) => report.transient.push((key, None)),
    }
}

/// Attaches the bearer token. A token that is not a valid header value is an error: sending
/// the request without `Authorization` would hide the problem behind the resource server's 401.
fn with_bearer(
    mut request: HttpRequest,
    key: &TokenKey,
    access_token: &Secret,
) -> Result<HttpRequest> {
    let value = format!("Bearer {}", access_token.expose_secret());
    let mut value = http::HeaderValue::from_str(&value)
        .map_err(|_| Error::InvalidAccessToken { key: key.clone() })?;
    value.set_sensitive(true);
    request
        .headers_mut()
        .insert(http::header::AUTHORIZATION, value);
    Ok(request)
}

fn clone_request(request: &HttpRequest) -> Option<HttpRequest> {
    let mut builder = http::Request::builder()
        .method(request.method().clone())
        .uri(request.uri().clone())
        .version(request.version());
    for (name, value) in request.headers() {
        builder = builder.header(name, value);
    }
    builder.body(request.body().clone()).ok()
}

/// A resource server that could not be reached, as the caller sees it: transient, like an
/// unreachable provider.
fn resource_server_unavailable(key: &TokenKey, e: crate::http::HttpError) -> Error {
    Error::Unavailable {
        provider: format!("resource server ({})", key.provider),
        retry_after: None,
        source: Some(crate::provider::ProviderError::Transient {
            status: None,
            retry_after: None,
            reason: Some(format!("{:?}", e.kind()).to_lowercase()),
            source: Some(Arc::new(e)),
        }),
    }
}
