//! The broker: login, retrieval with refresh-and-rotate, unlink, and the retrieval response.

mod engine;
mod hot_cache;
mod lease_wake;
mod lifecycle;
mod login;
mod refresh;
mod revocations;
mod sessions;
mod shutdown;
mod view;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;
use tracing::Instrument;

use crate::access::{Caller, Decision, KeycloakRoles, ProviderPolicy, RoleChecker, RoleGrantHook};
use crate::clock::{self, SharedClock};
use crate::error::{Error, Result};
use crate::events::{self, BrokerEvent, EventSink, RevocationStatus};
use crate::http::{self, ClientDebug, SharedHttpClient};
use crate::ids::{ProviderId, TokenKey};
use crate::provider::{
    OAuth2Config, OAuth2Provider, OidcConfig, OidcProvider, Provider, ProviderError,
};
use crate::store::{LeaseHolder, MemoryStore, TokenStore};
use crate::telemetry::{ProviderMetrics, ReadOutcome, SubjectHash};
use crate::token::TokenSet;

pub use lifecycle::{GrantStatus, SweepOptions, SweepReport};
pub use login::{Callback, LinkOutcome, LoginOptions, LoginStart, PendingLogin, ReplacedAccount};
pub use revocations::{DrainOptions, DrainReport};
pub use shutdown::ShutdownReport;
pub use view::TokenView;

/// How much longer than the refresh time-out a lease must last by default, so that a holder
/// gets its answer (or gives up) before anyone else may take over (REFRESH-PROTOCOL.md, "The
/// lease"). Set another with [`TokenBrokerBuilder::with_lease_margin`].
pub const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// Brokers upstream tokens: links accounts, serves tokens to allowed callers, and refreshes
/// them so a caller always gets a token that works.
///
/// Cheap to clone (an `Arc` inside); clones share single-flight state. Several `TokenBroker`s
/// (in one process or many) may share one [`TokenStore`]: the store's lease makes sure only one
/// of them refreshes a link at a time.
///
/// ```
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use tokenbroker::{KeycloakRoles, MemoryStore, TokenBroker};
/// # use tokenbroker::provider::OAuth2Config;
/// # fn google_config() -> OAuth2Config { unimplemented!() }
///
/// let broker = TokenBroker::builder()
///     .with_store(Arc::new(MemoryStore::new()))
///     .with_role_checker(Arc::new(KeycloakRoles::new()))
///     .with_oauth2_provider(google_config(), Default::default())
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TokenBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("TokenBroker")
            .field("providers", &i.providers.keys().collect::<Vec<_>>())
            .field("store", &i.store)
            .field("role_checker", &i.checker)
            .field("skew", &i.config.skew)
            .field("lease_ttl", &i.config.lease_ttl)
            .field("refresh_timeout", &i.config.refresh_timeout)
            .field("holder", &i.holder)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct ProviderEntry {
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) policy: ProviderPolicy,
    /// This provider's metric handles, resolved once when the broker was built.
    pub(crate) metrics: ProviderMetrics,
    /// Whether the warning about access tokens shorter-lived than the skew was logged.
    pub(crate) short_lifetime_warned: Arc<AtomicBool>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) skew: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) refresh_timeout: Duration,
    pub(crate) lease_wait: Duration,
    pub(crate) login_ttl: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) max_retry_after: Duration,
    pub(crate) lease_margin: Duration,
}

pub(crate) struct Inner {
    pub(crate) providers: HashMap<ProviderId, ProviderEntry, foldhash::fast::RandomState>,
    pub(crate) store: Arc<dyn TokenStore>,
    pub(crate) checker: Arc<dyn RoleChecker>,
    pub(crate) clock: SharedClock,
    pub(crate) events: Option<Arc<dyn EventSink>>,
    pub(crate) role_grants: Option<Arc<dyn RoleGrantHook>>,
    pub(crate) read_role: String,
    pub(crate) config: Timing,
    pub(crate) holder: LeaseHolder,
    pub(crate) flights: engine::Flights,
    pub(crate) parked: engine::Parked,
    /// Decoded sets of recent reads, so that a cached read does not decode JSON.
    pub(crate) hot: hot_cache::HotCache,
    pub(crate) backoff: Mutex<HashMap<TokenKey, refresh::Backoff, foldhash::fast::RandomState>>,
    pub(crate) used_states: Mutex<HashMap<[u8; 32], OffsetDateTime>>,
    /// Metric handles for reads of a provider alias this broker does not serve.
    pub(crate) unknown_metrics: ProviderMetrics,
    /// Set by `shutdown`: no new flight starts (checked under the `flights` lock).
    pub(crate) closing: AtomicBool,
}

/// What a caller gets from [`TokenBroker::retrieve`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RetrievedTokens {
    /// The tokens, as the provider's policy lets them out. The access token is valid for at
    /// least the skew, unless `stale` is set.
    pub tokens: TokenView,
    /// Whether this read refreshed the link (or joined a refresh in flight).
    pub refreshed: bool,
    /// The provider was unreachable and the access token is inside the skew but not expired:
    /// usable, but not for long.
    pub stale: bool,
}

/// What [`TokenBroker::unlink`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UnlinkOutcome {
    /// What happened upstream.
    pub revocation: RevocationStatus,
    /// Whether a record was deleted.
    pub deleted: bool,
}

impl TokenBroker {
    /// Starts configuring a broker.
    pub fn builder() -> TokenBrokerBuilder {
        TokenBrokerBuilder::default()
    }

    /// The broker's clock's now (the endpoints compute `expires_in` from it).
    pub(crate) fn now(&self) -> OffsetDateTime {
        self.inner.clock.now()
    }

    /// The lease holder id of this instance.
    pub fn holder(&self) -> &LeaseHolder {
        &self.inner.holder
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.inner.store
    }

    /// The configured provider aliases.
    pub fn providers(&self) -> impl Iterator<Item = &ProviderId> {
        self.inner.providers.keys()
    }

    /// Returns a working token set for `target`, if `caller` may read it.
    ///
    /// Authorization runs first: a denied caller gets [`Error::Forbidden`] whether or not the
    /// link exists. Then the link is loaded; when its access token expires within the skew it
    /// is refreshed first (one upstream call however many readers ask at once, in this process
    /// and across instances sharing the store).
    ///
    /// # Errors
    /// [`Error::Forbidden`], [`Error::NotFound`], [`Error::RelinkRequired`],
    /// [`Error::NoRefreshToken`], [`Error::Unavailable`] (the record is unchanged),
    /// [`Error::RefreshInProgress`], [`Error::Store`].
    pub async fn retrieve(&self, caller: &Caller, target: &TokenKey) -> Result<RetrievedTokens> {
        self.observe_read(target, async {
            let entry = self.check_read(caller, target).await?;
            let (tokens, refreshed, stale) = self.inner.fresh_tokens(target).await?;
            Ok(self.read_done(caller, target, entry, tokens, refreshed, stale))
        })
        .await
    }

    /// Runs a read inside its span, then counts it and records its duration (see
    /// [`crate::telemetry`]). On the cached path this is two clock reads, a map lookup and two
    /// atomic updates; the span costs nothing unless a subscriber enables `DEBUG`.
    pub(crate) async fn observe_read(
        &self,
        target: &TokenKey,
        read: impl Future<Output = Result<RetrievedTokens>>,
    ) -> Result<RetrievedTokens> {
        let started = std::time::Instant::now();
        // A disabled span still wraps every poll of the read in an enter and an exit, which
        // the benches show on the cached path: only build one when a subscriber wants it.
        let result = if tracing::enabled!(target: "tokenbroker", tracing::Level::DEBUG) {
            let span = tracing::debug_span!(
                target: "tokenbroker",
                "tokenbroker.read",
                provider = %target.provider,
                subject_hash = %SubjectHash(&target.subject),
            );
            read.instrument(span).await
        } else {
            read.await
        };
        let outcome = match &result {
            Ok(read) if read.stale => ReadOutcome::Stale,
            Ok(read) if read.refreshed => ReadOutcome::Refreshed,
            Ok(_) => ReadOutcome::Served,
            Err(Error::Forbidden) => ReadOutcome::Denied,
            Err(Error::NotFound { .. }) => ReadOutcome::NotFound,
            Err(_) => ReadOutcome::Error,
        };
        self.inner
            .metrics(&target.provider)
            .read(outcome, started.elapsed());
        result
    }

    /// Authorization and the provider's policy, before anything is loaded. Returns the
    /// provider's entry, so that the read looks it up once.
    async fn check_read(&self, caller: &Caller, target: &TokenKey) -> Result<&ProviderEntry> {
        self.authorize(caller, target).await?;
        let entry = self
            .inner
            .entry(&target.provider)
            .map_err(|_| Error::NotFound {
                key: target.clone(),
            })?;
        if !entry.policy.store_tokens {
            return Err(Error::NotFound {
                key: target.clone(),
            });
        }
        Ok(entry)
    }

    fn read_done(
        &self,
        caller: &Caller,
        target: &TokenKey,
        entry: &ProviderEntry,
        tokens: Arc<TokenSet>,
        refreshed: bool,
        stale: bool,
    ) -> RetrievedTokens {
        // The event clones five strings; on the cached-read path that is most of the
        // allocations, so build it only when a sink or a debug subscriber will see it.
        if self.inner.events.is_some()
            || tracing::enabled!(target: "tokenbroker", tracing::Level::DEBUG)
        {
            self.inner.emit(BrokerEvent::ReadAllowed {
                key: target.clone(),
                caller: caller.subject.clone(),
                client_id: caller.client_id.clone(),
            });
        }
        RetrievedTokens {
            tokens: TokenView::new(tokens, &entry.policy),
            refreshed,
            stale,
        }
    }

    async fn authorize(&self, caller: &Caller, target: &TokenKey) -> Result<()> {
        match self.inner.checker.decide(caller, target).await? {
            Decision::Allow => Ok(()),
            Decision::Deny(reason) => {
                self.inner.emit(BrokerEvent::ReadDenied {
                    key: target.clone(),
                    caller: caller.subject.clone(),
                    client_id: caller.client_id.clone(),
                    reason,
                });
                Err(Error::Forbidden)
            }
        }
    }

    /// Removes a link and revokes its grant upstream where the provider supports it.
    ///
    /// The record is deleted and the revocation it owes written to the store's outbox in one
    /// atomic step; then the provider is called (up to three times while it fails
    /// transiently). The outcome says honestly what happened upstream: when the provider could
    /// not be reached it is [`RevocationStatus::Deferred`], and
    /// [`drain_revocations`](Self::drain_revocations) (or a [`sweep`](Self::sweep)) on any
    /// instance finishes the job, also after a crash at any point of this call.
    ///
    /// A refresh writing the record at the same time makes the delete retry on the newer
    /// version (so the newer tokens are the ones revoked); after five such conflicts in a row
    /// the unlink fails with [`StoreError::Conflict`](crate::StoreError::Conflict) and nothing
    /// was deleted.
    pub async fn unlink(&self, key: &TokenKey) -> Result<UnlinkOutcome> {
        let span = tracing::info_span!(
            target: "tokenbroker",
            "tokenbroker.unlink",
            provider = %key.provider,
            subject_hash = %SubjectHash(&key.subject),
        );
        self.unlink_inner(key).instrument(span).await
    }

    async fn unlink_inner(&self, key: &TokenKey) -> Result<UnlinkOutcome> {
        let inner = &self.inner;
        inner.entry(&key.provider)?;
        // A refresh may write between our load and our delete; the versioned delete notices,
        // and we read again, so that the revocation owed is for the tokens actually deleted.
        const TRIES: u32 = 5;
        for attempt in 0..TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(10 << attempt)).await;
            }
            let stored = match inner.store.load(key).await {
                Ok(Some(stored)) => stored,
                Ok(None) => {
                    return Ok(UnlinkOutcome {
                        revocation: RevocationStatus::NothingToRevoke,
                        deleted: false,
                    });
                }
                // A record that cannot be read never blocks an unlink: it is deleted at the
                // version the store reported; its tokens could not be revoked, and the outcome
                // and the event say so.
                Err(crate::StoreError::Corrupt {
                    version: Some(version),
                    ..
                }) => {
                    let revocation = RevocationStatus::Failed(
                        "the stored record could not be read, so its tokens were not revoked"
                            .into(),
                    );
                    match inner.store.delete(key, Some(version)).await {
                        Ok(deleted) => return Ok(inner.unlinked(key, revocation, deleted)),
                        Err(crate::StoreError::Conflict { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => return Err(e.into()),
            };
            let Ok(set) = TokenSet::from_payload(&stored.record.payload) else {
                let revocation =
                    RevocationStatus::Failed("stored record could not be decoded".into());
                match inner.store.delete(key, Some(stored.version)).await {
                    Ok(deleted) => return Ok(inner.unlinked(key, revocation, deleted)),
                    Err(crate::StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            // The revocation is owed from the moment the link is gone, so it is written in the
            // same step as the delete: a crash, an outage or a dropped caller after this point
            // leaves it in the outbox for a drain, never a live grant without a record.
            let entry = inner.owed_revocation(key, &set);
            match inner
                .store
                .delete_and_enqueue_revocation(key, Some(stored.version), &entry)
                .await
            {
                Ok(true) => {
                    inner.forget(key);
                    // In a task of its own, so that a caller dropped mid-call does not cut the
                    // provider call off between its answer and the outbox's update.
                    let settling = Arc::clone(inner);
                    let revocation = tokio::spawn(async move {
                        settling
                            .settle_revocation(
                                entry,
                                revocations::QUICK_TRIES,
                                DrainOptions::default().give_up_after,
                            )
                            .await
                    })
                    .await
                    .unwrap_or_else(|_| {
                        RevocationStatus::Failed("the revocation task panicked".into())
                    });
                    return Ok(inner.unlinked(key, revocation, true));
                }
                Ok(false) => {
                    return Ok(inner.unlinked(key, RevocationStatus::NothingToRevoke, false));
                }
                Err(crate::StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(crate::StoreError::Conflict { key: key.clone() }.into())
    }
}

impl Inner {
    /// The metric handles of `provider`; those of [`UNKNOWN_PROVIDER`] for an alias this
    /// broker does not serve, so that callers cannot mint label values.
    ///
    /// [`UNKNOWN_PROVIDER`]: crate::telemetry::UNKNOWN_PROVIDER
    pub(crate) fn metrics(&self, provider: &ProviderId) -> &ProviderMetrics {
        self.providers
            .get(provider)
            .map_or(&self.unknown_metrics, |entry| &entry.metrics)
    }

    pub(crate) fn entry(&self, id: &ProviderId) -> Result<&ProviderEntry> {
        self.providers
            .get(id)
            .ok_or_else(|| Error::UnknownProvider(id.to_string()))
    }

    /// Emits an event logged at `INFO`, built only when a sink or a subscriber will see it
    /// (building one clones the key: three allocations on every refresh otherwise).
    pub(crate) fn emit_info(&self, event: impl FnOnce() -> BrokerEvent) {
        if self.events.is_some() || tracing::enabled!(target: "tokenbroker", tracing::Level::INFO) {
            self.emit(event());
        }
    }

    pub(crate) fn emit(&self, event: BrokerEvent) {
        events::trace(&event);
        if let Some(sink) = &self.events {
            sink.emit(&event);
        }
    }

    /// Revokes `set` at once, without the outbox (its fallback when the store would not take
    /// the entry).
    pub(crate) async fn revoke_upstream(
        &self,
        provider: &dyn Provider,
        set: &TokenSet,
    ) -> RevocationStatus {
        match self
            .try_revoke(provider, set, revocations::QUICK_TRIES)
            .await
        {
            Ok(()) => RevocationStatus::Revoked,
            Err(ProviderError::Unsupported { .. }) => RevocationStatus::NotSupported,
            Err(e) => RevocationStatus::Failed(format!("{e}")),
        }
    }

    /// Drops what this process remembers of a link: its hot-cache entry and backoff.
    fn forget(&self, key: &TokenKey) {
        self.backoff
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.hot.remove(key);
    }

    fn unlinked(
        &self,
        key: &TokenKey,
        revocation: RevocationStatus,
        deleted: bool,
    ) -> UnlinkOutcome {
        self.forget(key);
        self.emit(BrokerEvent::Unlinked {
            key: key.clone(),
            revocation: revocation.clone(),
        });
        UnlinkOutcome {
            revocation,
            deleted,
        }
    }
}

/// Configures a [`TokenBroker`].
///
/// Defaults: a [`MemoryStore`], the [`KeycloakRoles`] checker, the system clock, a 60 s skew,
/// a 10 s refresh time-out, a 30 s lease, a 10 min login window.
#[derive(Default)]
pub struct TokenBrokerBuilder {
    providers: Vec<(Arc<dyn Provider>, ProviderPolicy)>,
    oauth2: Vec<(OAuth2Config, ProviderPolicy)>,
    oidc: Vec<(OidcConfig, ProviderPolicy)>,
    store: Option<Arc<dyn TokenStore>>,
    checker: Option<Arc<dyn RoleChecker>>,
    clock: Option<SharedClock>,
    http: Option<SharedHttpClient>,
    events: Option<Arc<dyn EventSink>>,
    role_grants: Option<Arc<dyn RoleGrantHook>>,
    read_role: Option<String>,
    holder: Option<LeaseHolder>,
    skew: Option<Duration>,
    lease_ttl: Option<Duration>,
    refresh_timeout: Option<Duration>,
    lease_wait: Option<Duration>,
    lease_margin: Option<Duration>,
    login_ttl: Option<Duration>,
    max_backoff: Option<Duration>,
    max_retry_after: Option<Duration>,
    hot_cache_capacity: Option<usize>,
}

impl fmt::Debug for TokenBrokerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBrokerBuilder")
            .field("providers", &self.providers)
            .field("oauth2", &self.oauth2)
            .field("oidc", &self.oidc)
            .field("store", &self.store)
            .field("http", &self.http.as_ref().map(|_| ClientDebug))
            .finish_non_exhaustive()
    }
}

impl TokenBrokerBuilder {
    /// Adds a provider with its policy.
    pub fn with_provider(mut self, provider: Arc<dyn Provider>, policy: ProviderPolicy) -> Self {
        self.providers.push((provider, policy));
        self
    }
    /// Adds a generic OAuth 2.0 provider that will use the broker's HTTP client.
    pub fn with_oauth2_provider(mut self, config: OAuth2Config, policy: ProviderPolicy) -> Self {
        self.oauth2.push((config, policy));
        self
    }
    /// Adds an OpenID Connect provider (generic, or a Google/Microsoft preset) that will use
    /// the broker's HTTP client and clock.
    pub fn with_oidc_provider(mut self, config: OidcConfig, policy: ProviderPolicy) -> Self {
        self.oidc.push((config, policy));
        self
    }
    /// Sets the store (default: a new [`MemoryStore`]).
    pub fn with_store(mut self, store: Arc<dyn TokenStore>) -> Self {
        self.store = Some(store);
        self
    }
    /// Sets the role checker (default: [`KeycloakRoles::new`]).
    pub fn with_role_checker(mut self, checker: Arc<dyn RoleChecker>) -> Self {
        self.checker = Some(checker);
        self
    }
    /// Sets the clock (default: the system clock).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }
    /// Sets the HTTP client for providers added with
    /// [`with_oauth2_provider`](Self::with_oauth2_provider) (default: `ReqwestClient`).
    pub fn with_http_client(mut self, http: SharedHttpClient) -> Self {
        self.http = Some(http);
        self
    }
    /// Subscribes a sink to broker events.
    pub fn with_event_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.events = Some(sink);
        self
    }
    /// Sets the hook that grants the read role on first link (`stored_tokens_readable`).
    pub fn with_role_grant_hook(mut self, hook: Arc<dyn RoleGrantHook>) -> Self {
        self.role_grants = Some(hook);
        self
    }
    /// The role the grant hook grants (default `read-token`).
    pub fn with_read_role(mut self, role: impl Into<String>) -> Self {
        self.read_role = Some(role.into());
        self
    }
    /// Sets this instance's lease holder id (default: random).
    pub fn with_lease_holder(mut self, holder: LeaseHolder) -> Self {
        self.holder = Some(holder);
        self
    }
    /// A token expiring within `skew` is refreshed before it is served (default 60 s).
    ///
    /// A token issued for less than twice the skew is served until half its lifetime is left
    /// instead: with 20 s tokens and the default skew, reads refresh once 10 s are left rather
    /// than on every read. The first such token stored for a provider logs a warning (once per
    /// provider).
    pub fn with_skew(mut self, skew: Duration) -> Self {
        self.skew = Some(skew);
        self
    }
    /// How long a refresh lease lasts (default 30 s). Must exceed the refresh time-out by at
    /// least [`LEASE_MARGIN`].
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = Some(ttl);
        self
    }
    /// How long a refresh request may take before the broker gives up (default 10 s).
    pub fn with_refresh_timeout(mut self, timeout: Duration) -> Self {
        self.refresh_timeout = Some(timeout);
        self
    }
    /// How long a reader waits for another instance's refresh before it answers
    /// [`Error::RefreshInProgress`] (default: the lease TTL plus the margin).
    pub fn with_lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = Some(wait);
        self
    }
    /// How much of a lease a holder keeps in hand (default [`LEASE_MARGIN`], 5 s): the
    /// provider call is bounded by what is left of the lease minus this margin, so that the
    /// holder has its answer, or has given up, before another instance may take over. Leave
    /// room for the clock difference between this host and the store.
    pub fn with_lease_margin(mut self, margin: Duration) -> Self {
        self.lease_margin = Some(margin);
        self
    }
    /// The longest the broker leaves a failing provider alone after consecutive transient
    /// failures without a `Retry-After` (default 60 s; the pause starts at 1 s and doubles).
    pub fn with_max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = Some(max);
        self
    }
    /// The longest `Retry-After` from a provider the broker honours (default 1 h): a provider
    /// that asks for a longer pause gets this one.
    pub fn with_max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = Some(max);
        self
    }
    /// How long a pending login stays valid (default 10 min).
    pub fn with_login_ttl(mut self, ttl: Duration) -> Self {
        self.login_ttl = Some(ttl);
        self
    }

    /// How many decoded token sets this instance keeps in memory (default 4096; 0 turns the
    /// cache off). Every read still loads the link from the store; a set is reused only when
    /// the loaded record is byte-for-byte the one it was decoded from, which saves the JSON
    /// decode on every cached read. Entries past the capacity are evicted at random.
    pub fn with_hot_cache_capacity(mut self, capacity: usize) -> Self {
        self.hot_cache_capacity = Some(capacity);
        self
    }

    /// Builds the broker.
    ///
    /// # Errors
    /// [`Error::Config`] when the lease does not outlast the refresh time-out by the lease
    /// margin, when two providers share an alias, or when an OAuth 2.0 provider needs an HTTP
    /// client and none is available. [`Error::ReservedParameter`] when a provider configuration
    /// given to [`with_oauth2_provider`](Self::with_oauth2_provider) or
    /// [`with_oidc_provider`](Self::with_oidc_provider) has an extra authorization parameter
    /// the broker sets itself (see [`OAuth2Config::validate`]).
    pub fn build(self) -> Result<TokenBroker> {
        let refresh_timeout = self.refresh_timeout.unwrap_or(Duration::from_secs(10));
        let lease_ttl = self.lease_ttl.unwrap_or(Duration::from_secs(30));
        let lease_margin = self.lease_margin.unwrap_or(LEASE_MARGIN);
        if lease_ttl < refresh_timeout + lease_margin {
            return Err(Error::Config(format!(
                "lease TTL ({lease_ttl:?}) must exceed the refresh time-out ({refresh_timeout:?}) by at least the lease margin ({lease_margin:?}), \
                 or a second instance could spend the same refresh token"
            )));
        }
        if refresh_timeout.is_zero() {
            return Err(Error::Config("refresh time-out must not be zero".into()));
        }
        let mut providers = self.providers;
        let clock = self.clock.unwrap_or_else(clock::system);
        if !self.oauth2.is_empty() || !self.oidc.is_empty() {
            let http = match self.http.or_else(http::default_client) {
                Some(http) => http,
                None => return Err(Error::Config("OAuth 2.0 providers need an HTTP client: enable the `reqwest` feature or call with_http_client".into())),
            };
            for (config, policy) in self.oauth2 {
                config.validate().map_err(|e| config_error(&config.id, e))?;
                providers.push((Arc::new(OAuth2Provider::new(config, http.clone())), policy));
            }
            for (config, policy) in self.oidc {
                config
                    .validate()
                    .map_err(|e| config_error(&config.oauth2.id, e))?;
                let config = config.with_clock(clock.clone());
                providers.push((Arc::new(OidcProvider::new(config, http.clone())), policy));
            }
        }
        let mut map = HashMap::default();
        for (provider, policy) in providers {
            let id = provider.id().clone();
            if map
                .insert(
                    id.clone(),
                    ProviderEntry {
                        metrics: ProviderMetrics::new(id.as_str()),
                        provider,
                        policy,
                        short_lifetime_warned: Arc::default(),
                    },
                )
                .is_some()
            {
                return Err(Error::Config(format!(
                    "provider alias {id} is configured twice"
                )));
            }
        }
        let inner = Inner {
            providers: map,
            store: self
                .store
                .unwrap_or_else(|| Arc::new(MemoryStore::with_clock(clock.clone()))),
            checker: self
                .checker
                .unwrap_or_else(|| Arc::new(KeycloakRoles::new())),
            clock,
            events: self.events,
            role_grants: self.role_grants,
            read_role: self
                .read_role
                .unwrap_or_else(|| crate::access::READ_TOKEN_ROLE.into()),
            config: Timing {
                skew: self.skew.unwrap_or(Duration::from_secs(60)),
                lease_ttl,
                refresh_timeout,
                lease_wait: self.lease_wait.unwrap_or(lease_ttl + lease_margin),
                login_ttl: self.login_ttl.unwrap_or(Duration::from_secs(600)),
                max_backoff: self.max_backoff.unwrap_or(Duration::from_secs(60)),
                max_retry_after: self.max_retry_after.unwrap_or(Duration::from_secs(3600)),
                lease_margin,
            },
            holder: self.holder.unwrap_or_else(LeaseHolder::random),
            flights: Default::default(),
            parked: Default::default(),
            hot: hot_cache::HotCache::new(
                self.hot_cache_capacity
                    .unwrap_or(hot_cache::DEFAULT_CAPACITY),
            ),
            backoff: Mutex::default(),
            used_states: Mutex::new(HashMap::new()),
            unknown_metrics: ProviderMetrics::new(crate::telemetry::UNKNOWN_PROVIDER),
            closing: AtomicBool::new(false),
        };
        Ok(TokenBroker {
            inner: Arc::new(inner),
        })
    }
}

/// A provider configuration's validation error as the broker's.
fn config_error(provider: &ProviderId, error: ProviderError) -> Error {
    match error {
        ProviderError::ReservedParameter { name } => Error::ReservedParameter {
            provider: provider.to_string(),
            name,
        },
        other => Error::Config(format!("provider {provider}: {other}")),
    }
}
