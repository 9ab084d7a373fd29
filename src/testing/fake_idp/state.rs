//! The state of one fake: its registration, the settings a test can change while it runs, and
//! every code, grant and token it issued.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use url::Url;

use super::Counters;
use super::config::{ClientAuthRegistration, FakeIdpConfig, LoginExtensions};
use super::faults::Fault;
use super::grants::{AccessRecord, CodeRecord, Grant, GrantId, RefreshRecord};
use super::keys::KeyRing;
use super::modes::Flavor;
use super::par::PushedRequests;

/// Everything the handlers share: the fixed registration, and the mutable state behind a lock.
pub(super) struct Shared {
    pub(super) client_id: String,
    pub(super) client_secret: String,
    pub(super) redirect_uris: Vec<Url>,
    pub(super) default_user: String,
    /// The base URL without its trailing slash.
    pub(super) base: String,
    pub(super) issuer: String,
    pub(super) code_ttl: Duration,
    pub(super) issue_id_token: bool,
    pub(super) sign_id_tokens: bool,
    pub(super) flavor: Flavor,
    pub(super) client_auth: ClientAuthRegistration,
    /// `jti`s of the client assertions accepted so far (a replay is refused). Its own lock:
    /// the handlers call [`authenticate`](super::client_auth::authenticate) while holding `state`.
    pub(super) seen_assertion_ids: Mutex<std::collections::HashSet<String>>,
    pub(super) login_extensions: LoginExtensions,
    pub(super) state: Mutex<IdpState>,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, IdpState> {
        lock(&self.state)
    }
}

/// Locks a mutex, ignoring poisoning: a panicking test thread must not wedge the server.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) struct Knobs {
    pub(super) access_token_ttl: Duration,
    pub(super) rotate: bool,
    pub(super) reuse_detection: bool,
    pub(super) omit_refresh_token: bool,
    pub(super) deny_consent: bool,
    pub(super) token_delay: Option<Duration>,
    pub(super) keep_rotated: bool,
    pub(super) tamper_id_tokens: bool,
    pub(super) publish_retired_keys: bool,
}

pub(super) struct IdpState {
    pub(super) knobs: Knobs,
    pub(super) counters: Counters,
    pub(super) faults: VecDeque<Fault>,
    pub(super) codes: HashMap<String, CodeRecord>,
    pub(super) grants: HashMap<GrantId, Grant>,
    pub(super) access_tokens: HashMap<String, AccessRecord>,
    pub(super) refresh_tokens: HashMap<String, RefreshRecord>,
    pub(super) next_grant: GrantId,
    /// Per user: the scopes consented to for the one client.
    pub(super) consents: HashMap<String, Vec<String>>,
    pub(super) last_prompt: Option<String>,
    /// The ID-token signing keys: the current one and those retired (listed by `/jwks`
    /// unless [`Knobs::publish_retired_keys`] is off).
    pub(super) keys: KeyRing,
    /// Set by `token_handler` around one request: tamper with its ID token.
    pub(super) tamper_this_response: bool,
    /// Pushed authorization requests by `request_uri` (RFC 9126), and faults for `POST /par`.
    pub(super) pushed: PushedRequests,
}

impl IdpState {
    pub(super) fn new(config: &FakeIdpConfig, keys: KeyRing) -> Self {
        Self {
            knobs: Knobs {
                access_token_ttl: config.access_token_ttl,
                rotate: config.rotate_refresh_tokens,
                reuse_detection: config.reuse_detection,
                omit_refresh_token: config.omit_refresh_token,
                deny_consent: false,
                token_delay: None,
                keep_rotated: config.keep_rotated_refresh_tokens,
                tamper_id_tokens: false,
                publish_retired_keys: true,
            },
            counters: Counters::default(),
            faults: VecDeque::new(),
            codes: HashMap::new(),
            grants: HashMap::new(),
            access_tokens: HashMap::new(),
            refresh_tokens: HashMap::new(),
            next_grant: 1,
            consents: HashMap::new(),
            last_prompt: None,
            keys,
            tamper_this_response: false,
            pushed: PushedRequests::default(),
        }
    }

    pub(super) fn revoke_grant(&mut self, grant: GrantId) {
        if let Some(g) = self.grants.get_mut(&grant) {
            g.revoked = true;
        }
    }

    pub(super) fn grant_revoked(&self, grant: GrantId) -> bool {
        self.grants.get(&grant).is_none_or(|g| g.revoked)
    }
}
