//! A seeded, deterministic, replayable explorer of refresh schedules: REFRESH-PROTOCOL.md, "What
//! tests must show" ("every entry point dropped at every await, every non-refresh writer racing a
//! refresh at every step ... explored by seeded, replayable schedules, with the invariants checked
//! after each").
//!
//! One schedule: two or three broker instances (default timing) share one store and one strict
//! rotating provider (`FakeProvider`: a consumed refresh token that comes back revokes the whole
//! grant). The user links an account, virtual time runs past the access token's expiry, and 2
//! to 6 actors run on random instances: reads of every kind, sweeps, signed requests, re-logins
//! with and without a new refresh token, key rotation, unlink. Every store call, provider call
//! and resource-server call is a **gate**, where the seed decides what happens: proceed, yield,
//! sleep, fail, stall past the lease TTL, answer after the refresh time-out, or abort the
//! calling actor; some callers are dropped after a while instead. Once the brokers are idle,
//! the invariants are checked (see [`Invariant`]); 1 and 3 are also checked as calls happen.
//!
//! The one loss the protocol cannot avoid is excused, and nothing else: a refresh answer lost
//! because the broker's own time-out (under its lease) gave up on a provider that had already
//! rotated the token. A loss caused by a cancelled caller is not excused.
//!
//! Determinism: each schedule runs on its own current-thread runtime with paused time, so every
//! timer fires in virtual time; the brokers and the store read a clock that follows it; every
//! choice comes from a PRNG seeded by the schedule's seed, one stream per actor. Tokio wakes
//! tasks woken together in an order it draws at random (and its seed can only be set with
//! `tokio_unstable`), so every call pauses a little, for a time distinct per actor, before its
//! gate decides: calls then meet the store in the same order on every run. What is left to
//! chance is the order of events within one instant that cross no gate (a reader returning its
//! answer), and the broker's backoff jitter after a provider time-out;
//! `a_seed_replays_identically` checks that a seed's trace, taken instant by instant, does not
//! change between runs.
//!
//! ```text
//! cargo test --features testing,encryption --test schedule_explorer            # 3,000 schedules
//! TOKENBROKER_EXPLORE_SCHEDULES=30000 cargo test ... --test schedule_explorer  # more
//! TOKENBROKER_EXPLORE_SEED=1234 cargo test ... --test schedule_explorer -- --nocapture  # replay
//! TOKENBROKER_EXPLORE_LIST=1 cargo test ... --test schedule_explorer -- --nocapture  # every violation
//! ```
//!
//! A seed's mix (which test explores it) is `seed % 3`. The harness uses the public API only,
//! so that it runs unchanged against any engine.
#![cfg(feature = "encryption")]

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;
use time::macros::datetime;
use tokenbroker::http::{HttpClient, HttpError, HttpRequest, HttpResponse};
use tokenbroker::provider::{AuthorizationRequest, CodeExchange, RefreshTokenReuse, TokenKind};
use tokenbroker::store::{
    EncryptedStore, KeyId, Lease, LeaseAttempt, LeaseHolder, LeaseToken, Record, StaticKeyring,
    StoredRecord, Version,
};
use tokenbroker::testing::FakeProvider;
use tokenbroker::{
    Caller, Clock, Error, GrantStatus, LoginOptions, MemoryStore, Provider, ProviderError,
    ProviderId, ProviderPolicy, ProviderTokens, Realm, Scopes, Secret, SharedClock, StoreError,
    Subject, SweepOptions, TokenBroker, TokenKey, TokenSet, TokenStore,
};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// What is explored
// ---------------------------------------------------------------------------------------------

/// Schedules explored by default, over all mixes together.
const DEFAULT_SCHEDULES: u64 = 3_000;

/// Where virtual time starts (any fixed instant: nothing may depend on the wall clock).
const START: OffsetDateTime = datetime!(2026-01-01 0:00 UTC);

/// The broker's default timing, which the harness keeps (a shorter lease would test another
/// configuration than the one users run). Gates use them to stall "past the lease TTL" and to
/// answer "after the refresh time-out".
const LEASE_TTL: Duration = Duration::from_secs(30);
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);
/// The broker's longest backoff after provider failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// The lifetime of the provider's access tokens (the `FakeProvider` default).
const ACCESS_TTL: Duration = Duration::from_secs(3600);

/// The scopes every login asks for besides the provider's `openid offline_access`, so that
/// narrowed reads have proper subsets to ask for.
const EXTRA_SCOPES: &str = "calendar.read calendar.write";
/// What narrowed reads ask for: two subsets of the grant, and one audience, which the provider
/// refuses (see [`AudienceRefusal`]).
const NARROWED: [&str; 3] = ["calendar.read", "openid calendar.read", "aud:reports"];

/// The actor mixes. A seed's mix is `seed % 3`, so that each `#[test]` explores its own seeds
/// and a replayed seed runs in the test that found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mix {
    /// Reads of every kind and sweeps, racing one another.
    Readers,
    /// Reads racing re-logins (with and without a new refresh token) and, rarely, an unlink.
    Writers,
    /// An encrypted store in the middle of a key rotation: reads and re-logins racing a rewrap.
    KeyRotation,
    /// The harness's own check: readers of the link's own scopes and of narrower ones, with
    /// every gate open and no caller giving up. Nothing may be reported then.
    Calm,
}

/// Seeds from here on are calm (see [`Mix::Calm`]).
const CALM_SEEDS: u64 = 1_000_000_000;

impl Mix {
    const ALL: [Mix; 3] = [Mix::Readers, Mix::Writers, Mix::KeyRotation];

    fn of(seed: u64) -> Mix {
        if seed >= CALM_SEEDS {
            return Mix::Calm;
        }
        Mix::ALL[(seed % 3) as usize]
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[test]
fn readers_racing_readers() {
    explore(Mix::Readers);
}

#[test]
fn readers_racing_relogins_and_unlink() {
    explore(Mix::Writers);
}

#[test]
fn readers_racing_a_key_rotation() {
    explore(Mix::KeyRotation);
}

/// The harness raises no alarm when nothing goes wrong: with every gate open, no caller giving
/// up and no provider refusing, readers racing readers break no invariant.
#[test]
fn calm_schedules_break_nothing() {
    explore(Mix::Calm);
}

/// A seed is a schedule: run twice, it crosses the same gates with the same outcomes at the
/// same virtual instants. (Events of one instant are compared as a set: tokio wakes tasks
/// woken together in an order it draws at random, and such tasks may finish in either order.)
#[test]
fn a_seed_replays_identically() {
    // TOKENBROKER_EXPLORE_DETERMINISM=N checks seeds 0..N; a replay checks its own seed.
    let seeds: Vec<u64> = match (
        env_u64("TOKENBROKER_EXPLORE_SEED"),
        env_u64("TOKENBROKER_EXPLORE_DETERMINISM"),
    ) {
        (Some(seed), _) => vec![seed],
        (None, Some(n)) => (0..n).collect(),
        (None, None) => (0..30).map(|i| i * 97).collect(),
    };
    let mut differ = Vec::new();
    for seed in seeds {
        let first = by_instant(run_schedule(seed, true).trace);
        let second = by_instant(run_schedule(seed, true).trace);
        if first != second {
            if differ.is_empty() {
                let at = first.iter().zip(&second).position(|(a, b)| a != b);
                let at = at.unwrap_or(first.len().min(second.len()));
                println!(
                    "seed {seed} first differs at {:?}\n---\n{:?}",
                    first.get(at),
                    second.get(at)
                );
            }
            differ.push(seed);
        }
    }
    assert!(differ.is_empty(), "seeds whose two runs differ: {differ:?}");
}

/// A trace as the sets of lines logged at each instant, in time order.
fn by_instant(trace: Vec<String>) -> Vec<BTreeSet<String>> {
    let mut instants: Vec<(String, BTreeSet<String>)> = Vec::new();
    for line in trace {
        let instant = line.split(']').next().unwrap_or_default().to_owned();
        match instants.last_mut() {
            Some((at, lines)) if *at == instant => {
                lines.insert(line);
            }
            _ => instants.push((instant, BTreeSet::from([line]))),
        }
    }
    instants.into_iter().map(|(_, lines)| lines).collect()
}

/// Runs this mix's share of the schedules (or the one seed to replay) and fails with every
/// violated invariant, a few seeds for each, and the command that replays them.
fn explore(mix: Mix) {
    if let Some(seed) = env_u64("TOKENBROKER_EXPLORE_SEED") {
        if Mix::of(seed) == mix {
            replay(seed);
        }
        return;
    }
    let total = env_u64("TOKENBROKER_EXPLORE_SCHEDULES").unwrap_or(DEFAULT_SCHEDULES);
    // With TOKENBROKER_EXPLORE_LIST=1 (and --nocapture), every violation is printed as found.
    let list = std::env::var_os("TOKENBROKER_EXPLORE_LIST").is_some();
    let seeds: Box<dyn Iterator<Item = u64>> = match mix {
        // A tenth as many calm schedules: they only check the harness.
        Mix::Calm => Box::new(CALM_SEEDS..CALM_SEEDS + total / 10),
        _ => Box::new((0..total).filter(move |s| Mix::of(*s) == mix)),
    };
    let mut failures: BTreeMap<Invariant, (usize, Vec<u64>, String)> = BTreeMap::new();
    let mut explored = 0;
    for seed in seeds {
        explored += 1;
        let report = run_schedule(seed, false);
        let mut seen = BTreeSet::new();
        for v in report.violations {
            if list {
                println!("seed {seed}: invariant {}: {}", v.invariant, v.detail);
            }
            // One count per schedule and invariant; the first message as the example.
            if !seen.insert(v.invariant) {
                continue;
            }
            let entry = failures
                .entry(v.invariant)
                .or_insert_with(|| (0, Vec::new(), v.detail.clone()));
            entry.0 += 1;
            if entry.1.len() < 8 {
                entry.1.push(seed);
            }
        }
    }
    if failures.is_empty() {
        println!("{mix:?}: {explored} schedules, no invariant violated");
        return;
    }
    let mut message = format!("{mix:?}: invariants violated in {explored} schedules explored:\n");
    for (invariant, (count, seeds, example)) in &failures {
        let _ = writeln!(
            message,
            "- invariant {invariant} in {count} schedules, e.g. seeds {seeds:?}\n  first: seed {}: {example}",
            seeds[0]
        );
    }
    let first = failures.values().next().map(|f| f.1[0]).unwrap_or_default();
    let _ = write!(message, "replay one with: {}", replay_command(first));
    panic!("{message}");
}

/// Runs one seed and prints its whole trace; fails if it violates an invariant.
fn replay(seed: u64) {
    let report = run_schedule(seed, true);
    println!("{}", report.trace.join("\n"));
    if !report.violations.is_empty() {
        let list: Vec<String> = report
            .violations
            .iter()
            .map(|v| format!("invariant {}: {}", v.invariant, v.detail))
            .collect();
        panic!(
            "seed {seed} violates:\n- {}\nreplay: {}",
            list.join("\n- "),
            replay_command(seed)
        );
    }
}

fn replay_command(seed: u64) -> String {
    format!(
        "TOKENBROKER_EXPLORE_SEED={seed} cargo test --features testing,encryption --test schedule_explorer -- --nocapture"
    )
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
    )
}

// ---------------------------------------------------------------------------------------------
// The invariants (REFRESH-PROTOCOL.md, "Invariants"), as checked here
// ---------------------------------------------------------------------------------------------

/// What a schedule must not do. The numbers are this harness's; each names the protocol
/// invariants it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Invariant {
    /// (1) No refresh token the provider already consumed is presented again (protocol 1, 5, 6),
    /// and none is presented without an unexpired lease on the key (what keeps it once).
    /// A second presentation is excused only when the first one's answer was lost to the
    /// broker's own time-out, under its lease: the protocol's one unavoidable loss.
    RefreshTokenReused,
    /// (2) No live link is lost or wrongly marked: unless unlinked, the link exists, is active,
    /// holds a refresh token still active at the provider, of the grant the last login wrote;
    /// and a plain read is never refused because a narrowed refresh failed (protocol 3, 4, 6).
    LiveLinkLost,
    /// (3) No caller is handed an access token that was not stored first (protocol 2).
    UnstoredTokenServed,
    /// (4) No lease is left held, or abandoned, once every actor finished (protocol 5, "The
    /// lease").
    LeaseLeftHeld,
    /// (5) The stored access and refresh tokens belong to one grant (protocol 7).
    TwoGrantsInOneLink,
    /// The engine did not go idle: actors or background work still running after hours of
    /// virtual time.
    NeverIdle,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::RefreshTokenReused => {
                "1 (a refresh token presented twice, or without a lease to keep it once)"
            }
            Invariant::LiveLinkLost => "2 (a live link lost or wrongly marked)",
            Invariant::UnstoredTokenServed => "3 (a caller handed a token that was not stored)",
            Invariant::LeaseLeftHeld => "4 (a lease left held after all actors finished)",
            Invariant::TwoGrantsInOneLink => "5 (one link holding two grants' tokens)",
            Invariant::NeverIdle => "liveness (the brokers never went idle)",
        })
    }
}

#[derive(Debug, Clone)]
struct Violation {
    invariant: Invariant,
    detail: String,
}

// ---------------------------------------------------------------------------------------------
// Determinism: a seeded PRNG and a clock that follows tokio's virtual time
// ---------------------------------------------------------------------------------------------

/// SplitMix64: tiny, good enough for choosing schedules, and the same on every platform.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    /// A duration in `lo_ms..hi_ms` milliseconds.
    fn ms(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(lo_ms + self.below(hi_ms - lo_ms))
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// A [`Clock`] reading tokio's (paused, virtual) time: brokers and the store judge token and
/// lease expiry by it, so that timers and expiries agree and nothing reads the wall clock.
#[derive(Debug)]
struct VirtualClock {
    origin: Instant,
}

impl Clock for VirtualClock {
    fn now(&self) -> OffsetDateTime {
        START + (Instant::now() - self.origin)
    }
}

// ---------------------------------------------------------------------------------------------
// Gates and faults
// ---------------------------------------------------------------------------------------------

/// Which call reached a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Site {
    /// A store call, above the encryption layer (what brokers call) or below it (what the
    /// encryption layer and a rewrap call).
    Store(Layer, &'static str),
    /// A refresh at the provider, for the link's own scopes or narrower ones.
    Refresh { narrowed: bool },
    /// An authorization-code exchange (a login).
    Exchange,
    /// A revocation (an unlink).
    Revoke,
    /// The resource server a signed request goes to.
    ResourceServer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layer {
    /// What brokers see: plain payloads. Writes are recorded here.
    Top,
    /// Under an `EncryptedStore`: ciphertext; a rewrap's own calls go through here only.
    Raw,
}

/// What happens at a gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Proceed,
    /// Let other tasks run first.
    Yield(u32),
    /// A slow call, well within every time-out.
    Sleep(Duration),
    /// Store: `StoreError::Backend`, nothing done. Provider: a 503 with `Retry-After`, nothing
    /// consumed.
    Fail,
    /// Store writes: the write lands, the caller hears `StoreError::Backend` (the contract's
    /// "the write's outcome is unknown").
    FailAfter,
    /// Store: the call stalls past the lease TTL before it reaches the store. Provider: the
    /// request is held past the refresh time-out before the provider sees it (nothing is
    /// consumed if the caller gives up).
    StallBefore(Duration),
    /// Store: the call is done, its answer stalls past the lease TTL. Provider: the provider
    /// processed the request (a refresh token is consumed), the answer arrives after the
    /// refresh time-out: if the broker gave up, the answer is lost.
    StallAfter(Duration),
    /// Provider: the answer comes slowly but within the time-out.
    SlowAnswer(Duration),
    /// Store, `release_lease`: the store runs the release late, past the lease TTL, whether or
    /// not its caller still waits (a statement queued behind a lock runs after its client gave
    /// up). Only a fenced release makes that harmless.
    LateRelease(Duration),
    /// The calling actor is aborted here (its task's `JoinHandle::abort`).
    Abort,
}

/// How often gates misbehave in one schedule.
#[derive(Clone, Copy, Debug)]
struct FaultProfile {
    /// The share of gates (in percent) that do anything but proceed.
    rate: u64,
}

/// Draws what happens at one gate.
fn draw_fault(rng: &mut Rng, site: Site, profile: FaultProfile) -> Fault {
    if !rng.percent(profile.rate) {
        return Fault::Proceed;
    }
    let roll = rng.below(100);
    match site {
        Site::Store(layer, op) => {
            let write = matches!(op, "insert" | "compare_and_swap");
            match roll {
                0..30 => Fault::Yield(1 + rng.below(4) as u32),
                30..55 => Fault::Sleep(rng.ms(1, 3_000)),
                55..70 => Fault::Fail,
                // Writes are recorded above the encryption layer as they return: below it, a
                // write must return as soon as it lands, so that the record is kept in time.
                70..76 if write && layer == Layer::Top => Fault::FailAfter,
                70..88 if op == "release_lease" && rng.below(2) == 0 => {
                    Fault::LateRelease(past_lease_ttl(rng))
                }
                70..88 => Fault::StallBefore(past_lease_ttl(rng)),
                _ if write && layer == Layer::Raw => Fault::StallBefore(past_lease_ttl(rng)),
                _ => Fault::StallAfter(past_lease_ttl(rng)),
            }
        }
        Site::Refresh { .. } | Site::Exchange => match roll {
            0..25 => Fault::Yield(1 + rng.below(4) as u32),
            25..40 => Fault::Sleep(rng.ms(1, 2_000)),
            40..55 => Fault::Fail,
            55..70 => Fault::StallBefore(past_refresh_timeout(rng)),
            70..85 => Fault::StallAfter(past_refresh_timeout(rng)),
            _ => Fault::SlowAnswer(rng.ms(1, 2_000)),
        },
        Site::Revoke => match roll {
            0..40 => Fault::Yield(1 + rng.below(4) as u32),
            40..70 => Fault::Sleep(rng.ms(1, 2_000)),
            _ => Fault::Fail,
        },
        Site::ResourceServer => match roll {
            0..50 => Fault::Yield(1 + rng.below(4) as u32),
            _ => Fault::Sleep(rng.ms(1, 2_000)),
        },
    }
}

/// The most actors a schedule has.
const MAX_ACTORS: usize = 6;

/// How long a call takes before its gate decides: a little virtual time, distinct per actor.
/// Tokio wakes tasks woken together (the readers joined to one refresh) in an order it draws at
/// random; after this pause they reach their gates in one order, the actors', and a seed's
/// schedule stays the same from run to run.
fn call_latency(actor: Option<usize>) -> Duration {
    Duration::from_millis(1 + actor.unwrap_or(MAX_ACTORS) as u64)
}

/// The seed offset of a context's stream of gate decisions.
fn stream_of(actor: Option<usize>) -> u64 {
    let context = actor.map_or(0, |a| a as u64 + 1);
    context.wrapping_mul(0xA24B_AED4_963E_E407)
}

fn past_lease_ttl(rng: &mut Rng) -> Duration {
    LEASE_TTL + rng.ms(1, 10_000)
}

fn past_refresh_timeout(rng: &mut Rng) -> Duration {
    REFRESH_TIMEOUT + rng.ms(500, 5_000)
}

/// The error a failing store gate answers with; its store name tells it apart.
fn injected_store_error(what: &'static str) -> StoreError {
    StoreError::backend("explorer-gate", std::io::Error::other(what))
}

fn is_injected(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Backend {
            store: "explorer-gate",
            ..
        }
    )
}

fn provider_unavailable() -> ProviderError {
    ProviderError::Transient {
        status: Some(503),
        retry_after: Some(Duration::from_secs(2)),
        reason: Some("injected at a gate".into()),
        source: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Actors
// ---------------------------------------------------------------------------------------------

tokio::task_local! {
    /// The actor whose task is running: gates abort it, and a provider answer dropped in its
    /// task at the moment the harness cancels it is the caller's doing, not a time-out.
    static ACTOR: usize;
}

fn current_actor() -> Option<usize> {
    ACTOR.try_with(|a| *a).ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ActorKind {
    Retrieve,
    /// A read for `NARROWED[i]`.
    Narrowed(usize),
    InSession,
    /// A signed request to the resource server, which answers 401 to some tokens.
    SendAuthorized,
    /// A sweep whose window covers the token.
    Sweep,
    /// Keycloak's `GET .../broker/{alias}/token`.
    TokenEndpoint,
    /// A re-login; the provider's answer carries a new refresh token, or none (Google and
    /// oidc-provider on re-consent).
    Relogin {
        with_refresh_token: bool,
    },
    /// `EncryptedStore::rewrap_page`: a key rotation.
    Rewrap,
    Unlink,
}

impl ActorKind {
    const READERS: [ActorKind; 8] = [
        ActorKind::Retrieve,
        ActorKind::Narrowed(0),
        ActorKind::Narrowed(1),
        ActorKind::Narrowed(2),
        ActorKind::InSession,
        ActorKind::SendAuthorized,
        ActorKind::Sweep,
        ActorKind::TokenEndpoint,
    ];

    /// Reads whose failure must come from a failure of a plain refresh.
    fn is_plain_read(self) -> bool {
        matches!(
            self,
            ActorKind::Retrieve
                | ActorKind::InSession
                | ActorKind::SendAuthorized
                | ActorKind::TokenEndpoint
        )
    }
}

/// How an actor's caller gives up, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cancel {
    Never,
    /// Its task is aborted when it reaches its n-th gate (counted from 1).
    AtGate(u32),
    /// Its future is dropped after this long (a caller's time-out, a client that went away).
    After(Duration),
}

#[derive(Clone, Copy, Debug)]
struct ActorPlan {
    kind: ActorKind,
    broker: usize,
    start: Duration,
    cancel: Cancel,
}

/// An actor as the gates see it.
#[derive(Debug)]
struct ActorSlot {
    plan: ActorPlan,
    crossings: u32,
    abort: Option<tokio::task::AbortHandle>,
}

// ---------------------------------------------------------------------------------------------
// The world: what one schedule shares (choices, trace, and the ledger the checks read)
// ---------------------------------------------------------------------------------------------

/// How the provider refuses a token for an audience it has no consent for. Neither consumes
/// the refresh token; neither says anything about the link's own grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AudienceRefusal {
    /// `invalid_grant` (Entra's AADSTS65001, consent missing for the resource).
    InvalidGrant,
    /// 503 with `Retry-After`.
    Unavailable,
}

struct World {
    seed: u64,
    origin: Instant,
    verbose: bool,
    faults_on: AtomicBool,
    profile: FaultProfile,
    audience_refusal: AudienceRefusal,
    /// Gate decisions: one stream per actor, and one for the engine's own tasks, so that the
    /// order in which concurrent actors reach their gates does not change what each meets.
    rngs: Mutex<BTreeMap<Option<usize>, Rng>>,
    trace: Mutex<Vec<String>>,
    /// When a call last crossed a gate.
    last_call: Mutex<Instant>,
    ledger: Mutex<Ledger>,
    actors: Mutex<Vec<ActorSlot>>,
}

impl fmt::Debug for World {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "World(seed {})", self.seed)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl World {
    fn elapsed(&self) -> Duration {
        Instant::now() - self.origin
    }

    fn log(&self, line: impl FnOnce() -> String) {
        let t = self.elapsed();
        let actor = match current_actor() {
            Some(a) => format!("a{a}"),
            None => "--".into(),
        };
        let line = format!("[{:>9.3}s] {actor:>3} {}", t.as_secs_f64(), line());
        lock(&self.trace).push(line);
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    fn violation(&self, invariant: Invariant, detail: String) {
        self.log(|| format!("VIOLATION of invariant {invariant}: {detail}"));
        self.ledger()
            .violations
            .push(Violation { invariant, detail });
    }

    /// Crosses a gate: decides what happens to this call and applies what comes before it.
    async fn cross(&self, site: Site) -> Fault {
        *lock(&self.last_call) = Instant::now();
        if self.faults_on.load(Ordering::SeqCst) {
            tokio::time::sleep(call_latency(current_actor())).await;
        }
        let fault = self.decide(site);
        match fault {
            Fault::Yield(n) => {
                for _ in 0..n {
                    tokio::task::yield_now().await;
                }
            }
            Fault::Sleep(d) | Fault::StallBefore(d) => tokio::time::sleep(d).await,
            // The abort takes effect when the task next yields; if the engine moves this future
            // to a task of its own meanwhile, it simply carries on there.
            Fault::Abort => tokio::task::yield_now().await,
            _ => {}
        }
        fault
    }

    fn decide(&self, site: Site) -> Fault {
        if !self.faults_on.load(Ordering::SeqCst) {
            return Fault::Proceed;
        }
        if let Some(actor) = current_actor()
            && self.abort_due(actor)
        {
            self.log(|| format!("gate {site:?}: ABORT the actor (its planned gate)"));
            return Fault::Abort;
        }
        let mut rngs = lock(&self.rngs);
        let rng = rngs
            .entry(current_actor())
            .or_insert_with(|| Rng::new(self.seed ^ stream_of(current_actor())));
        let mut fault = draw_fault(rng, site, self.profile);
        // A stall past the lease TTL while a rotated refresh token is on its way to the store
        // is a loss no protocol survives: the holder's lease runs out under a write it cannot
        // finish, and the next holder spends the old token. Such stalls become short sleeps.
        if matches!(site, Site::Store(..))
            && matches!(fault, Fault::StallBefore(_) | Fault::StallAfter(_))
            && !self.ledger().pending.is_empty()
        {
            fault = Fault::Sleep(rng.ms(1, 3_000));
        }
        drop(rngs);
        if fault != Fault::Proceed || self.verbose {
            self.log(|| format!("gate {site:?}: {fault:?}"));
        }
        fault
    }

    /// Whether `actor` reaches its planned abort gate now; if so, aborts its task.
    fn abort_due(&self, actor: usize) -> bool {
        let mut actors = lock(&self.actors);
        let slot = &mut actors[actor];
        slot.crossings += 1;
        if slot.plan.cancel != Cancel::AtGate(slot.crossings) {
            return false;
        }
        if let Some(abort) = &slot.abort {
            abort.abort();
        }
        drop(actors);
        self.ledger().cancelled.push((actor, Instant::now()));
        true
    }

    /// Whether something dropped now, in the current task, was dropped because the harness
    /// cancelled a caller at this very instant: in an actor's task, that actor; in a task of the
    /// engine's, any actor (a sweep's refresh tasks die with the sweep).
    fn dropped_by_cancellation(&self) -> bool {
        let now = Instant::now();
        let actor = current_actor();
        self.ledger()
            .cancelled
            .iter()
            .any(|(a, at)| *at == now && actor.is_none_or(|actor| actor == *a))
    }

    /// Why no lease covers the key now, if none does: the newest lease is released or expired
    /// (by the store's clock). A link deleted since its lease was taken does not count.
    fn unleased(&self) -> Option<String> {
        let now = START + self.elapsed();
        let ledger = self.ledger();
        let n = ledger.leases.len();
        match ledger.leases.last() {
            None => Some("no lease had ever been taken".into()),
            Some(l) if l.deleted_after => None,
            Some(l) if l.released => Some(format!("lease #{n} had been released")),
            Some(l) if l.expires_at <= now => Some(format!(
                "lease #{n} had run out {:.3}s earlier (slow calls ate it)",
                (now - l.expires_at).as_seconds_f64()
            )),
            Some(_) => None,
        }
    }

    /// Checks invariant 3 for a token a caller was handed.
    fn handed(&self, access_token: &str, to: &str) {
        let (known, label) = {
            let ledger = self.ledger();
            (
                ledger.written_ats.contains(access_token),
                ledger.label(access_token),
            )
        };
        if !known {
            self.violation(
                Invariant::UnstoredTokenServed,
                format!("{to} was handed {label}, which no write had stored"),
            );
        }
    }

    /// A plain read was refused as `Unavailable`. That is right while the link backs off after
    /// a failed plain refresh; after a failed narrowed refresh only, the narrowed failure held
    /// up the whole link.
    fn plain_read_refused(&self) {
        let now = Instant::now();
        // Twice the broker's longest backoff, so that a different backoff policy is no excuse
        // for a false alarm.
        let recent = |t: Option<Instant>| t.is_some_and(|t| now - t <= 2 * MAX_BACKOFF);
        let (plain, narrowed) = {
            let l = self.ledger();
            (recent(l.last_failure[0]), recent(l.last_failure[1]))
        };
        if !plain && narrowed {
            self.violation(
                Invariant::LiveLinkLost,
                "a plain read was refused as unavailable although no plain refresh failed: a narrowed refresh's failure backed off the whole link".into(),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The ledger: what the gates saw, for the checks
// ---------------------------------------------------------------------------------------------

/// Where an issued token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A code exchange; `with_refresh_token` says whether its answer carried one.
    Exchange {
        with_refresh_token: bool,
    },
    Refresh,
}

#[derive(Clone, Debug)]
struct TokenInfo {
    label: String,
    grant: usize,
    origin: Origin,
}

/// A refresh answer that never reached the broker.
#[derive(Clone, Debug)]
struct LostAnswer {
    spent: String,
    /// Lost to the broker's own time-out (unavoidable), rather than to a cancelled caller.
    excused: bool,
}

#[derive(Clone, Debug)]
struct LeaseEntry {
    token: String,
    /// When it expires, by the store's clock (extensions included).
    expires_at: OffsetDateTime,
    /// A release with its token succeeded.
    released: bool,
    /// A release, an extension or a fenced write with this lease's token reached the store.
    touched: bool,
    /// Its release failed at a gate (then the lease may be left until it expires).
    release_failed: bool,
    /// The record was deleted after it was taken (that drops the lease).
    deleted_after: bool,
    /// The store granted it, but the answer never reached the holder, and not because the
    /// harness cancelled a caller (the engine's own time-out on a stalled store call): nobody
    /// can release a lease they do not know they hold.
    unknown_to_holder: bool,
}

#[derive(Debug, Default)]
struct Ledger {
    /// A release below the encryption layer (a rewrap's lease, which the ledger does not
    /// list) failed at a gate: that lease may be left until it expires.
    raw_release_failed: bool,
    /// A `try_lease` whose answer never came back up (see `LeaseAnswerWatch`).
    lease_answer_lost: bool,
    /// Every token the provider handed out, by value.
    tokens: HashMap<String, TokenInfo>,
    issued_access: usize,
    issued_refresh: usize,
    /// Grants (one per successful code exchange), in order.
    grants: usize,
    /// Refresh tokens the provider consumed (rotated away).
    consumed: HashSet<String>,
    /// Presentations of consumed refresh tokens the gates saw.
    reuses: u64,
    /// Rotated refresh tokens not yet written, by the token they replace.
    pending: BTreeMap<String, String>,
    lost: Vec<LostAnswer>,
    /// Grants revoked at the provider by an unlink.
    revoked_by_unlink: BTreeSet<usize>,
    /// Grants revoked at the provider because a token whose answer was lost unavoidably was
    /// presented again.
    revoked_after_loss: BTreeSet<usize>,
    /// Every access token (own or narrowed) and refresh token some write stored.
    written_ats: HashSet<String>,
    written_rts: HashSet<String>,
    /// The grant of the refresh token in the last write that came from a login.
    /// (Writes are ordered by the version the store gave them, not by when their callers
    /// heard back.)
    expected_grant: Option<(Version, usize)>,
    unlink_started: bool,
    leases: Vec<LeaseEntry>,
    /// When the last refresh failed: `[plain, narrowed]`.
    last_failure: [Option<Instant>; 2],
    cancelled: Vec<(usize, Instant)>,
    violations: Vec<Violation>,
}

impl Ledger {
    fn label(&self, token: &str) -> String {
        match self.tokens.get(token) {
            Some(info) => format!("{}/g{}", info.label, info.grant),
            None => "an unknown token".into(),
        }
    }

    fn grant_of(&self, token: &str) -> Option<usize> {
        self.tokens.get(token).map(|i| i.grant)
    }

    fn issue(&mut self, answer: &ProviderTokens, grant: usize, origin: Origin) -> String {
        self.issued_access += 1;
        let at = format!("at{}", self.issued_access);
        self.tokens.insert(
            answer.access_token.expose_secret().to_owned(),
            TokenInfo {
                label: at.clone(),
                grant,
                origin,
            },
        );
        let mut text = format!("{at}/g{grant}");
        if let Some(rt) = &answer.refresh_token {
            self.issued_refresh += 1;
            let label = format!("rt{}", self.issued_refresh);
            let _ = write!(text, " {label}/g{grant}");
            self.tokens.insert(
                rt.expose_secret().to_owned(),
                TokenInfo {
                    label,
                    grant,
                    origin,
                },
            );
        }
        text
    }

    /// Records a write that reached the store (above the encryption layer).
    fn written(&mut self, set: &TokenSet, version: Version) -> String {
        let at = set.access_token().expose_secret().to_owned();
        let mut text = self.label(&at);
        self.written_ats.insert(at.clone());
        for scopes in NARROWED {
            if let Some(view) = set.narrowed_to(&Scopes::parse(scopes)) {
                self.written_ats
                    .insert(view.access_token().expose_secret().to_owned());
            }
        }
        if let Some(rt) = set.refresh_token() {
            let rt = rt.expose_secret().to_owned();
            let _ = write!(text, " {}", self.label(&rt));
            self.pending.retain(|_, new| *new != rt);
            let from_login = self
                .tokens
                .get(&at)
                .is_some_and(|i| matches!(i.origin, Origin::Exchange { .. }));
            if from_login
                && let Some(grant) = self.grant_of(&rt)
                && self
                    .expected_grant
                    .as_ref()
                    // The explorer's stores count versions: a later write has a larger one.
                    .is_none_or(|(v, _)| v.number() < version.number())
            {
                self.expected_grant = Some((version, grant));
            }
            self.written_rts.insert(rt);
        } else {
            text.push_str(" (no refresh token)");
        }
        text
    }
}

// ---------------------------------------------------------------------------------------------
// The gated store
// ---------------------------------------------------------------------------------------------

/// A [`TokenStore`] whose every call is a gate, and which records, above the encryption layer,
/// every write and lease that reaches the store.
#[derive(Debug)]
struct GatedStore {
    inner: Arc<dyn TokenStore>,
    world: Arc<World>,
    layer: Layer,
}

impl GatedStore {
    /// One call: the gate, the call itself, `seen` (with what the caller will hear, before an
    /// after-the-call fault), then the rest of the fault.
    async fn around<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
        seen: impl FnOnce(&World, &Result<T, StoreError>),
    ) -> Result<T, StoreError> {
        let fault = self.world.cross(Site::Store(self.layer, op)).await;
        if fault == Fault::Fail {
            if self.layer == Layer::Raw && op == "release_lease" {
                self.world.ledger().raw_release_failed = true;
            }
            let failed = Err(injected_store_error("injected failure"));
            if self.layer == Layer::Top {
                seen(&self.world, &failed);
            }
            return failed;
        }
        let result = call.await;
        if self.layer == Layer::Top {
            seen(&self.world, &result);
        } else if matches!(op, "insert" | "compare_and_swap") && result.is_ok() {
            self.world
                .log(|| format!("store {op} under the encryption layer: written"));
        }
        match fault {
            Fault::StallAfter(d) => tokio::time::sleep(d).await,
            Fault::FailAfter if result.is_ok() => {
                self.world
                    .log(|| format!("store {op}: landed, but the caller hears a failure"));
                return Err(injected_store_error("injected failure after the write"));
            }
            _ => {}
        }
        result
    }

    fn note_write(world: &World, record: &Record, result: &Result<Version, StoreError>) {
        if let Ok(version) = result {
            let text = match TokenSet::from_payload(&record.payload) {
                Ok(set) => world.ledger().written(&set, version.clone()),
                Err(e) => format!("an undecodable payload ({e})"),
            };
            let state = record.meta.state.name();
            world.log(|| format!("store write {version}: {text} [{state}]"));
        }
    }
}

#[async_trait]
impl TokenStore for GatedStore {
    async fn load(&self, key: &TokenKey) -> Result<Option<StoredRecord>, StoreError> {
        self.around("load", self.inner.load(key), |_, _| {}).await
    }

    async fn insert(&self, key: &TokenKey, record: &Record) -> Result<Version, StoreError> {
        self.around("insert", self.inner.insert(key, record), |w, r| {
            GatedStore::note_write(w, record, r)
        })
        .await
    }

    async fn compare_and_swap(
        &self,
        key: &TokenKey,
        expected: Version,
        record: &Record,
        fence: Option<&LeaseToken>,
    ) -> Result<Version, StoreError> {
        let call = self
            .inner
            .compare_and_swap(key, expected.clone(), record, fence);
        self.around("compare_and_swap", call, |w, r| {
            if let Some(fence) = fence {
                touch_lease(w, fence.as_str());
            }
            if let Err(StoreError::Conflict { .. }) = r {
                w.log(|| format!("store compare_and_swap on {expected}: conflict"));
            }
            GatedStore::note_write(w, record, r)
        })
        .await
    }

    async fn delete(&self, key: &TokenKey, expected: Option<Version>) -> Result<bool, StoreError> {
        self.around("delete", self.inner.delete(key, expected), |w, r| {
            if let Ok(true) = r {
                w.log(|| "store delete: the link is gone".into());
                for lease in &mut w.ledger().leases {
                    lease.deleted_after = true;
                }
            }
        })
        .await
    }

    async fn list(&self, realm: &Realm, subject: &Subject) -> Result<Vec<TokenKey>, StoreError> {
        self.around("list", self.inner.list(realm, subject), |_, _| {})
            .await
    }

    async fn scan(
        &self,
        cursor: Option<&tokenbroker::store::ScanCursor>,
        limit: usize,
    ) -> Result<tokenbroker::store::ScanPage, StoreError> {
        self.around("scan", self.inner.scan(cursor, limit), |_, _| {})
            .await
    }

    async fn try_lease(
        &self,
        key: &TokenKey,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> Result<LeaseAttempt, StoreError> {
        let mut watch = LeaseAnswerWatch {
            world: &self.world,
            raw: self.layer == Layer::Raw,
            acquired: Mutex::new(None),
            delivered: false,
        };
        let call = self.inner.try_lease(key, holder, ttl);
        let answer = self
            .around("try_lease", call, |w, r| {
                if let Ok(LeaseAttempt::Acquired(lease)) = r {
                    let n = {
                        let mut ledger = w.ledger();
                        ledger.leases.push(LeaseEntry {
                            token: lease.token.as_str().to_owned(),
                            expires_at: lease.expires_at,
                            released: false,
                            touched: false,
                            release_failed: false,
                            deleted_after: false,
                            unknown_to_holder: false,
                        });
                        ledger.leases.len()
                    };
                    *lock(&watch.acquired) = Some(n);
                    w.log(|| format!("store lease #{n} acquired"));
                }
            })
            .await;
        watch.delivered = true;
        answer
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        // The holder let go when it asked: a store that then stalls past the lease (and makes
        // the holder's bounded call give up) leaves the lease to expire, which is no holder's
        // fault. A lease still held at the check is caught there all the same.
        touch_lease(&self.world, lease.token.as_str());
        let top = self.layer == Layer::Top;
        let fault = self
            .world
            .cross(Site::Store(self.layer, "release_lease"))
            .await;
        if fault == Fault::Fail {
            if !top {
                self.world.ledger().raw_release_failed = true;
            }
            let failed = Err(injected_store_error("injected failure"));
            if top {
                note_release(&self.world, lease, &failed);
            }
            return failed;
        }
        if let Fault::LateRelease(delay) = fault {
            let (inner, world, lease) = (
                Arc::clone(&self.inner),
                Arc::clone(&self.world),
                lease.clone(),
            );
            let late = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                world.log(|| "a late release reaches the store".to_owned());
                let result = inner.release_lease(&lease).await;
                if top {
                    note_release(&world, &lease, &result);
                }
                result
            });
            return late.await.unwrap_or(Ok(()));
        }
        let result = self.inner.release_lease(lease).await;
        if top {
            note_release(&self.world, lease, &result);
        }
        if let Fault::StallAfter(d) = fault {
            tokio::time::sleep(d).await;
        }
        result
    }

    async fn extend_lease(
        &self,
        lease: &Lease,
        ttl: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        self.around(
            "extend_lease",
            self.inner.extend_lease(lease, ttl),
            |w, r| {
                touch_lease(w, lease.token.as_str());
                if let Ok(Some(extended)) = r {
                    let token = extended.token.as_str();
                    for l in w.ledger().leases.iter_mut().filter(|l| l.token == token) {
                        l.expires_at = extended.expires_at;
                    }
                }
            },
        )
        .await
    }

    // The revocation outbox is passed through untouched.
    async fn delete_and_enqueue_revocation(
        &self,
        key: &tokenbroker::TokenKey,
        expected: Option<tokenbroker::store::Version>,
        revocation: &tokenbroker::store::PendingRevocation,
    ) -> Result<bool, tokenbroker::StoreError> {
        self.inner
            .delete_and_enqueue_revocation(key, expected, revocation)
            .await
    }
    async fn enqueue_revocation(
        &self,
        revocation: &tokenbroker::store::PendingRevocation,
    ) -> Result<(), tokenbroker::StoreError> {
        self.inner.enqueue_revocation(revocation).await
    }
    async fn claim_revocations(
        &self,
        now: time::OffsetDateTime,
        until: time::OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<tokenbroker::store::PendingRevocation>, tokenbroker::StoreError> {
        self.inner.claim_revocations(now, until, limit).await
    }
    async fn reschedule_revocation(
        &self,
        claimed: &tokenbroker::store::PendingRevocation,
        due_at: time::OffsetDateTime,
    ) -> Result<bool, tokenbroker::StoreError> {
        self.inner.reschedule_revocation(claimed, due_at).await
    }
    async fn remove_revocation(
        &self,
        id: &tokenbroker::store::RevocationId,
    ) -> Result<(), tokenbroker::StoreError> {
        self.inner.remove_revocation(id).await
    }
}

/// Watches a `try_lease` call: a lease granted whose answer is dropped on its way back (while
/// the answer stalls) is unknown to its holder.
struct LeaseAnswerWatch<'a> {
    world: &'a World,
    /// Below the encryption layer: a rewrap's own lease request.
    raw: bool,
    /// The number of the lease granted, if one was.
    acquired: Mutex<Option<usize>>,
    delivered: bool,
}

impl Drop for LeaseAnswerWatch<'_> {
    fn drop(&mut self) {
        let Some(n) = *lock(&self.acquired) else {
            // No answer came back up at all (a stall below the encryption layer, and the
            // engine's own bound on the call; or a rewrap, which runs in its caller's future,
            // cancelled while its request was out): the store may have granted a lease nobody
            // can know of, which then runs until it expires.
            if !self.delivered && (self.raw || !self.world.dropped_by_cancellation()) {
                self.world.ledger().lease_answer_lost = true;
            }
            return;
        };
        if self.delivered {
            return;
        }
        // A cancelled caller that took the lease with it is the engine's fault (protocol 5);
        // a call the engine itself gave up on is not.
        let excused = !self.world.dropped_by_cancellation();
        self.world.ledger().leases[n - 1].unknown_to_holder = excused;
        self.world.log(|| {
            format!(
                "store lease #{n}: the answer never reached its holder ({})",
                if excused {
                    "dropped by the engine"
                } else {
                    "its caller was cancelled"
                }
            )
        });
    }
}

/// Records what a release did to the lease it names.
fn note_release(world: &World, lease: &Lease, result: &Result<(), StoreError>) {
    let token = lease.token.as_str();
    let n = touch_lease(world, token);
    for l in world
        .ledger()
        .leases
        .iter_mut()
        .filter(|l| l.token == token)
    {
        l.released |= result.is_ok();
        l.release_failed |= result.as_ref().is_err_and(is_injected);
    }
    world.log(|| {
        format!(
            "store lease #{n} release: {}",
            if result.is_ok() { "ok" } else { "failed" }
        )
    });
}

/// Marks a lease as still looked after by its holder; returns its number (from 1).
fn touch_lease(world: &World, token: &str) -> usize {
    let mut ledger = world.ledger();
    match ledger.leases.iter().position(|l| l.token == token) {
        Some(i) => {
            ledger.leases[i].touched = true;
            i + 1
        }
        None => 0,
    }
}

// ---------------------------------------------------------------------------------------------
// The gated provider
// ---------------------------------------------------------------------------------------------

/// A [`Provider`] whose calls are gates. It keeps the ledger of grants and tokens, counts
/// presentations of consumed refresh tokens, strips the refresh token from the answers of
/// logins that asked for it, and refuses audiences.
#[derive(Debug)]
struct GatedProvider {
    inner: Arc<FakeProvider>,
    world: Arc<World>,
    /// Codes whose exchange answers without a refresh token: the provider's answer to a
    /// re-consent (Google, `oidc-provider`). `FakeProvider::set_omit_refresh_token` is one
    /// switch for all logins, so concurrent logins are told apart here, by their code.
    omit_refresh_token: Mutex<HashSet<String>>,
}

/// Watches one refresh call: if the broker drops it before it returns, records a failure, and
/// after the provider processed it, a lost answer.
struct RefreshWatch<'a> {
    world: &'a World,
    spent: String,
    narrowed: bool,
    /// The rotated refresh token, once the provider answered.
    answered: Option<Option<String>>,
    /// The token was presented under an unexpired lease.
    leased: bool,
    done: bool,
}

impl Drop for RefreshWatch<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let world = self.world;
        let now = Instant::now();
        world.ledger().last_failure[usize::from(self.narrowed)] = Some(now);
        let Some(rotated) = &self.answered else {
            world.log(|| "provider refresh: dropped before the provider saw it".into());
            return;
        };
        // Dropped in the task of an actor the harness cancels at this instant: the caller's
        // cancellation reached the refresh (protocol 5 says it must not). Otherwise the broker
        // itself gave up waiting: the unavoidable loss.
        let excused = !world.dropped_by_cancellation() && self.leased;
        let spent_label = {
            let mut ledger = world.ledger();
            if let Some(rotated) = rotated {
                ledger.pending.retain(|_, new| new != rotated);
            }
            ledger.lost.push(LostAnswer {
                spent: self.spent.clone(),
                excused,
            });
            ledger.label(&self.spent)
        };
        world.log(|| {
            format!(
                "provider refresh of {spent_label}: answer LOST ({})",
                if excused {
                    "the broker's time-out: unavoidable"
                } else {
                    "its caller was cancelled"
                }
            )
        });
    }
}

#[async_trait]
impl Provider for GatedProvider {
    fn id(&self) -> &ProviderId {
        self.inner.id()
    }

    fn default_scopes(&self) -> Scopes {
        self.inner.default_scopes()
    }

    fn authorization_url(&self, request: &AuthorizationRequest) -> Result<url::Url, ProviderError> {
        self.inner.authorization_url(request)
    }

    async fn exchange_code(
        &self,
        exchange: &CodeExchange,
    ) -> Result<ProviderTokens, ProviderError> {
        let world = &self.world;
        let fault = world.cross(Site::Exchange).await;
        if fault == Fault::Fail {
            return Err(provider_unavailable());
        }
        let mut answer = self.inner.exchange_code(exchange).await?;
        let strip = lock(&self.omit_refresh_token).contains(exchange.code.expose_secret());
        if strip {
            answer.refresh_token = None;
        }
        let text = {
            let mut ledger = world.ledger();
            let grant = ledger.grants;
            ledger.grants += 1;
            let origin = Origin::Exchange {
                with_refresh_token: answer.refresh_token.is_some(),
            };
            ledger.issue(&answer, grant, origin)
        };
        world.log(|| format!("provider code exchange: {text}"));
        answer_after(fault).await;
        Ok(answer)
    }

    async fn refresh(
        &self,
        refresh_token: &Secret,
        scopes: Option<&Scopes>,
    ) -> Result<ProviderTokens, ProviderError> {
        let world = &self.world;
        let narrowed = scopes.is_some();
        let spent = refresh_token.expose_secret().to_owned();
        let mut watch = RefreshWatch {
            world,
            spent: spent.clone(),
            narrowed,
            answered: None,
            leased: false,
            done: false,
        };
        let fault = world.cross(Site::Refresh { narrowed }).await;
        let label = world.ledger().label(&spent);
        if scopes.is_some_and(|s| s.iter().any(|s| s.starts_with("aud:"))) {
            watch.done = true;
            world.ledger().last_failure[1] = Some(Instant::now());
            world.log(|| format!("provider refresh of {label} for an audience: refused"));
            return Err(match world.audience_refusal {
                AudienceRefusal::InvalidGrant => ProviderError::InvalidGrant {
                    description: Some("consent required for this resource".into()),
                },
                AudienceRefusal::Unavailable => provider_unavailable(),
            });
        }
        if fault == Fault::Fail {
            watch.done = true;
            world.ledger().last_failure[usize::from(narrowed)] = Some(Instant::now());
            return Err(provider_unavailable());
        }
        // The lease is what keeps a token from being spent twice: the provider may see one only
        // while the key's lease is held and unexpired (protocol, "The lease": the provider
        // call is bounded by what is left of it).
        if let Some(why) = world.unleased() {
            world.violation(
                Invariant::RefreshTokenReused,
                format!("{label} was presented to the provider while {why}"),
            );
        } else {
            watch.leased = true;
        }
        let reused = world.ledger().consumed.contains(&spent);
        if reused {
            world.ledger().reuses += 1;
            world
                .log(|| format!("provider refresh: {label} PRESENTED AGAIN after it was consumed"));
            let excused = world
                .ledger()
                .lost
                .iter()
                .any(|l| l.spent == spent && l.excused);
            if !excused {
                world.violation(
                    Invariant::RefreshTokenReused,
                    format!("{label} was presented to the provider after it had been consumed"),
                );
            }
        }
        let answer = self.inner.refresh(refresh_token, scopes).await;
        if reused && matches!(answer, Err(ProviderError::InvalidGrant { .. })) {
            let mut ledger = world.ledger();
            let excused = ledger.lost.iter().any(|l| l.spent == spent && l.excused);
            if let (true, Some(grant)) = (excused, ledger.grant_of(&spent)) {
                ledger.revoked_after_loss.insert(grant);
            }
        }
        match &answer {
            Ok(tokens) => {
                let text = {
                    let mut ledger = world.ledger();
                    let grant = ledger.grant_of(&spent).unwrap_or(usize::MAX);
                    ledger.consumed.insert(spent.clone());
                    let rotated = tokens
                        .refresh_token
                        .as_ref()
                        .map(|rt| rt.expose_secret().to_owned());
                    if let Some(rotated) = &rotated {
                        ledger.pending.insert(spent.clone(), rotated.clone());
                    }
                    watch.answered = Some(rotated);
                    ledger.issue(tokens, grant, Origin::Refresh)
                };
                let what = if narrowed {
                    "narrowed refresh"
                } else {
                    "refresh"
                };
                world.log(|| format!("provider {what} of {label}: {text}"));
            }
            Err(e) => {
                watch.done = true;
                world.ledger().last_failure[usize::from(narrowed)] = Some(Instant::now());
                world.log(|| format!("provider refresh of {label}: {e}"));
            }
        }
        answer_after(fault).await;
        watch.done = true;
        answer
    }

    async fn revoke(&self, token: &Secret, kind: TokenKind) -> Result<(), ProviderError> {
        let world = &self.world;
        if world.cross(Site::Revoke).await == Fault::Fail {
            return Err(provider_unavailable());
        }
        self.inner.revoke(token, kind).await?;
        let label = {
            let mut ledger = world.ledger();
            if let Some(grant) = ledger.grant_of(token.expose_secret()) {
                ledger.revoked_by_unlink.insert(grant);
            }
            ledger.label(token.expose_secret())
        };
        world.log(|| format!("provider revoked the grant of {label}"));
        Ok(())
    }

    fn refresh_token_reuse(&self) -> RefreshTokenReuse {
        self.inner.refresh_token_reuse()
    }
}

/// The part of a provider fault that comes after the provider processed the request.
async fn answer_after(fault: Fault) {
    if let Fault::StallAfter(d) | Fault::SlowAnswer(d) = fault {
        tokio::time::sleep(d).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The resource server
// ---------------------------------------------------------------------------------------------

/// The API a signed request goes to: checks invariant 3 for the bearer token, and answers 401
/// to some tokens (chosen by the seed from the token's issue number).
struct ResourceServer {
    world: Arc<World>,
}

#[async_trait]
impl HttpClient for ResourceServer {
    async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let world = &self.world;
        world.cross(Site::ResourceServer).await;
        let bearer = request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        world.handed(&bearer, "the resource server");
        let label = world.ledger().label(&bearer);
        let number: u64 = label
            .trim_start_matches("at")
            .split('/')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let rejects = Rng::new(world.seed ^ number.wrapping_mul(0x2545_F491)).percent(40);
        let status = if rejects { 401 } else { 200 };
        world.log(|| format!("resource server: {label} -> {status}"));
        Ok(http::Response::builder()
            .status(status)
            .body(Vec::new())
            .expect("a valid response"))
    }
}

// ---------------------------------------------------------------------------------------------
// One schedule
// ---------------------------------------------------------------------------------------------

/// What one schedule left behind.
struct Report {
    violations: Vec<Violation>,
    trace: Vec<String>,
}

/// Runs one schedule on a fresh runtime whose time is virtual and starts paused.
fn run_schedule(seed: u64, verbose: bool) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(schedule(seed, verbose))
}

/// Everything a schedule is made of.
struct Setup {
    world: Arc<World>,
    idp: Arc<FakeProvider>,
    provider: Arc<GatedProvider>,
    brokers: Vec<TokenBroker>,
    /// The store without gates, for the checks.
    plain: Arc<dyn TokenStore>,
    /// The base store, for the lease probe.
    memory: Arc<MemoryStore>,
    /// For the rewrap actor (key-rotation mix).
    rewrap: Option<Arc<EncryptedStore<Arc<dyn TokenStore>>>>,
    key: TokenKey,
    caller: Caller,
}

const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x22; 32];

async fn schedule(seed: u64, verbose: bool) -> Report {
    let mut plan_rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03);
    let mix = Mix::of(seed);
    let profile = FaultProfile {
        rate: match mix {
            Mix::Calm => 0,
            _ => plan_rng.pick(&[5, 15, 30]),
        },
    };
    let world = Arc::new(World {
        seed,
        origin: Instant::now(),
        verbose,
        faults_on: AtomicBool::new(false),
        profile,
        audience_refusal: plan_rng
            .pick(&[AudienceRefusal::InvalidGrant, AudienceRefusal::Unavailable]),
        rngs: Mutex::new(BTreeMap::new()),
        trace: Mutex::new(Vec::new()),
        last_call: Mutex::new(Instant::now()),
        ledger: Mutex::new(Ledger::default()),
        actors: Mutex::new(Vec::new()),
    });
    let setup = Arc::new(build(&world, mix, &mut plan_rng));
    world.log(|| {
        format!(
            "seed {seed}: mix {mix:?}, {} broker instances, gates misbehave {}% of the time, audiences refused with {:?}",
            setup.brokers.len(),
            profile.rate,
            world.audience_refusal
        )
    });

    // Link first, with every gate open, then let the access token expire (or come within the
    // skew, so that a failed refresh may still serve it).
    link(&setup).await;
    let past_expiry = if plan_rng.percent(80) {
        ACCESS_TTL + plan_rng.ms(1, 120_000)
    } else {
        ACCESS_TTL - plan_rng.ms(1_000, 59_000)
    };
    tokio::time::sleep(past_expiry).await;
    world.log(|| format!("the access token is now {:?} old", past_expiry));

    let plans = plan_actors(mix, setup.brokers.len(), &mut plan_rng);
    world.faults_on.store(true, Ordering::SeqCst);
    let finished = run_actors(&setup, &plans).await;
    if !finished {
        world.violation(
            Invariant::NeverIdle,
            "actors still running after 2 h of virtual time".into(),
        );
    }
    check_after(&setup).await;

    let violations = world.ledger().violations.clone();
    let trace = std::mem::take(&mut *lock(&world.trace));
    Report { violations, trace }
}

/// The stores, provider and brokers of a schedule.
fn build(world: &Arc<World>, mix: Mix, rng: &mut Rng) -> Setup {
    let clock: SharedClock = Arc::new(VirtualClock {
        origin: world.origin,
    });
    let memory = Arc::new(MemoryStore::with_clock(clock.clone()));
    let idp = Arc::new(FakeProvider::new("fake").expect("a valid alias"));
    idp.set_rotation(true);
    idp.set_strict_reuse(true);
    let provider = Arc::new(GatedProvider {
        inner: idp.clone(),
        world: world.clone(),
        omit_refresh_token: Mutex::new(HashSet::new()),
    });
    let gated = |inner: Arc<dyn TokenStore>, layer| -> Arc<dyn TokenStore> {
        Arc::new(GatedStore {
            inner,
            world: world.clone(),
            layer,
        })
    };
    let instances = 2 + rng.below(2) as usize;
    let (stores, plain, rewrap): (Vec<Arc<dyn TokenStore>>, Arc<dyn TokenStore>, _) = match mix {
        Mix::KeyRotation => {
            // Mid-rotation: every instance knows both keys; some still write under k1, others
            // already under k2, and the rewrap moves k1 records to k2.
            let (k1, k2) = (KeyId::new("k1").unwrap(), KeyId::new("k2").unwrap());
            let old = || {
                StaticKeyring::new(k1.clone(), K1)
                    .with_key(k2.clone(), K2)
                    .unwrap()
            };
            let new = || {
                StaticKeyring::new(k2.clone(), K2)
                    .with_key(k1.clone(), K1)
                    .unwrap()
            };
            let raw = gated(memory.clone(), Layer::Raw);
            let encrypted = |keys: StaticKeyring| EncryptedStore::new(raw.clone(), Arc::new(keys));
            // The first instance links, under the old key, so that the rewrap has work to do.
            let mut stores = vec![gated(Arc::new(encrypted(old())), Layer::Top)];
            for _ in 1..instances {
                let keys = if rng.percent(50) { old() } else { new() };
                stores.push(gated(Arc::new(encrypted(keys)), Layer::Top));
            }
            let plain: Arc<dyn TokenStore> = Arc::new(EncryptedStore::new(
                memory.clone() as Arc<dyn TokenStore>,
                Arc::new(new()),
            ));
            (stores, plain, Some(Arc::new(encrypted(new()))))
        }
        _ => {
            // One store handle shared by instances of one process, or one handle each (as
            // separate processes would have; then they only poll the lease).
            let shared = gated(memory.clone(), Layer::Top);
            let stores = (0..instances)
                .map(|_| {
                    if rng.percent(50) {
                        shared.clone()
                    } else {
                        gated(memory.clone(), Layer::Top)
                    }
                })
                .collect();
            (stores, memory.clone() as Arc<dyn TokenStore>, None)
        }
    };
    let brokers = stores
        .into_iter()
        .map(|store| {
            TokenBroker::builder()
                .with_provider(provider.clone(), ProviderPolicy::default())
                .with_store(store)
                .with_clock(clock.clone())
                .build()
                .expect("a broker with the default timing")
        })
        .collect();
    let key = TokenKey::parse("acme", "alice", "fake").expect("a valid key");
    let caller = Caller::new(key.realm.clone(), key.subject.clone(), "app")
        .with_role("read-token")
        .with_full_client_scope();
    Setup {
        world: world.clone(),
        idp,
        provider,
        brokers,
        plain,
        memory,
        rewrap,
        key,
        caller,
    }
}

/// Links the account through the first instance.
async fn link(setup: &Setup) {
    let outcome = login(setup, &setup.brokers[0], true)
        .await
        .expect("the first login succeeds with every gate open");
    let at = outcome.tokens.access_token().expose_secret();
    let label = setup.world.ledger().label(at);
    setup.world.log(|| format!("linked: {label}"));
}

/// One login: authorization request, the user's approval at the provider, the callback.
async fn login(
    setup: &Setup,
    broker: &TokenBroker,
    with_refresh_token: bool,
) -> Result<tokenbroker::LinkOutcome, String> {
    let options = LoginOptions::default().with_scopes(Scopes::parse(EXTRA_SCOPES));
    let start = broker
        .begin_login(&setup.key, options)
        .await
        .map_err(|e| e.to_string())?;
    let callback = setup
        .idp
        .approve(&start.authorization_url, "alice")
        .map_err(|e| e.to_string())?;
    if !with_refresh_token {
        let code = callback.code.as_ref().expect("an approval carries a code");
        lock(&setup.provider.omit_refresh_token).insert(code.expose_secret().to_owned());
    }
    broker
        .complete_login(start.pending, &callback)
        .await
        .map_err(|e| e.to_string())
}

/// Chooses 2 to 6 actors for a mix: what they do, on which instance, when they start and how
/// their caller gives up.
fn plan_actors(mix: Mix, instances: usize, rng: &mut Rng) -> Vec<ActorPlan> {
    let count = 2 + rng.below(MAX_ACTORS as u64 - 1) as usize;
    let relogin = |rng: &mut Rng| ActorKind::Relogin {
        with_refresh_token: rng.percent(50),
    };
    let mut kinds: Vec<ActorKind> = (0..count)
        .map(|_| match mix {
            Mix::Readers => rng.pick(&ActorKind::READERS),
            // Audiences are refused: not calm.
            Mix::Calm => loop {
                let kind = rng.pick(&ActorKind::READERS);
                if kind != ActorKind::Narrowed(2) {
                    break kind;
                }
            },
            Mix::Writers if rng.percent(30) => relogin(rng),
            Mix::KeyRotation if rng.percent(25) => {
                if rng.percent(50) {
                    ActorKind::Rewrap
                } else {
                    relogin(rng)
                }
            }
            _ => rng.pick(&ActorKind::READERS),
        })
        .collect();
    // Each mix has at least one of what it is about.
    match mix {
        Mix::Writers => {
            if rng.percent(10) {
                kinds[0] = ActorKind::Unlink;
            } else if !kinds.iter().any(|k| matches!(k, ActorKind::Relogin { .. })) {
                kinds[0] = relogin(rng);
            }
        }
        Mix::KeyRotation if !kinds.contains(&ActorKind::Rewrap) => kinds[0] = ActorKind::Rewrap,
        _ => {}
    }
    kinds
        .into_iter()
        .map(|kind| ActorPlan {
            kind,
            broker: rng.below(instances as u64) as usize,
            start: match rng.below(10) {
                0..5 => Duration::ZERO,
                5..9 => rng.ms(1, 3_000),
                _ => rng.ms(3_000, 45_000),
            },
            cancel: match rng.below(100) {
                _ if mix == Mix::Calm => Cancel::Never,
                0..55 => Cancel::Never,
                55..80 => Cancel::AtGate(1 + rng.below(8) as u32),
                _ => Cancel::After(rng.ms(1, 15_000)),
            },
        })
        .collect()
}

type ActorFuture = Pin<Box<dyn Future<Output = String> + Send>>;

/// Spawns every actor and waits for all of them (aborted ones included), for at most two hours
/// of virtual time. Returns whether they all finished.
async fn run_actors(setup: &Arc<Setup>, plans: &[ActorPlan]) -> bool {
    let world = &setup.world;
    *lock(&world.actors) = plans
        .iter()
        .map(|plan| ActorSlot {
            plan: *plan,
            crossings: 0,
            abort: None,
        })
        .collect();
    let mut handles = Vec::new();
    for (id, plan) in plans.iter().enumerate() {
        world.log(|| format!("actor a{id}: {plan:?}"));
        let body = actor_body(setup.clone(), *plan);
        let world2 = world.clone();
        let plan = *plan;
        let task = ACTOR.scope(id, async move {
            tokio::time::sleep(plan.start).await;
            world2.log(|| format!("start {:?} on broker {}", plan.kind, plan.broker));
            let outcome = match plan.cancel {
                Cancel::After(d) => {
                    let mut body = body;
                    tokio::select! {
                        biased;
                        outcome = &mut body => outcome,
                        _ = tokio::time::sleep(d) => {
                            world2.ledger().cancelled.push((id, Instant::now()));
                            world2.log(|| "caller gave up: its future is DROPPED".into());
                            drop(body);
                            return;
                        }
                    }
                }
                _ => body.await,
            };
            world2.log(|| format!("done: {outcome}"));
        });
        let handle = tokio::spawn(task);
        lock(&world.actors)[id].abort = Some(handle.abort_handle());
        handles.push(handle);
    }
    let all = async {
        for handle in handles {
            let _ = handle.await;
        }
    };
    tokio::time::timeout(Duration::from_secs(7_200), all)
        .await
        .is_ok()
}

/// What one actor does. Every token it is handed is checked against the writes (invariant 3);
/// the returned text is its outcome, for the trace.
fn actor_body(setup: Arc<Setup>, plan: ActorPlan) -> ActorFuture {
    Box::pin(async move {
        let s = &*setup;
        let world = &s.world;
        let broker = &s.brokers[plan.broker];
        let plain_read = plan.kind.is_plain_read();
        let read = |r: Result<tokenbroker::RetrievedTokens, Error>, what: &str| match r {
            Ok(got) => {
                let at = got.tokens.access_token().expose_secret();
                world.handed(at, what);
                let label = world.ledger().label(at);
                format!("got {label}{}", if got.stale { " (stale)" } else { "" })
            }
            Err(e) => {
                if matches!(e, Error::Unavailable { .. }) && plain_read {
                    world.plain_read_refused();
                }
                format!("error: {e}")
            }
        };
        match plan.kind {
            ActorKind::Retrieve => read(broker.retrieve(&s.caller, &s.key).await, "retrieve"),
            ActorKind::Narrowed(i) => {
                let scopes = Scopes::parse(NARROWED[i]);
                let got = broker.retrieve_narrowed(&s.caller, &s.key, &scopes).await;
                read(got, "retrieve_narrowed")
            }
            ActorKind::InSession => {
                let got = broker
                    .retrieve_in_session(&s.caller, &s.key, "session-1")
                    .await;
                read(got, "retrieve_in_session")
            }
            ActorKind::TokenEndpoint => {
                let response =
                    tokenbroker::endpoints::read_tokens(broker, Some(&s.caller), "acme", "fake")
                        .await;
                let body = response.json().unwrap_or_default();
                match body["access_token"].as_str() {
                    Some(at) => {
                        world.handed(at, "token_endpoint");
                        format!("200 with {}", world.ledger().label(at))
                    }
                    None => {
                        // 502: the provider failed (503 is "a refresh is in progress").
                        if response.status == http::StatusCode::BAD_GATEWAY {
                            world.plain_read_refused();
                        }
                        format!("{} {}", response.status, body["error"])
                    }
                }
            }
            ActorKind::SendAuthorized => {
                let server = ResourceServer {
                    world: world.clone(),
                };
                let request = http::Request::get("https://api.example/me")
                    .body(Vec::new())
                    .expect("a valid request");
                match broker
                    .send_authorized(&s.caller, &s.key, request, &server)
                    .await
                {
                    Ok(response) => format!("resource server answered {}", response.status()),
                    Err(e) => {
                        if matches!(e, Error::Unavailable { .. }) {
                            world.plain_read_refused();
                        }
                        format!("error: {e}")
                    }
                }
            }
            ActorKind::Sweep => {
                let options = SweepOptions::new(ACCESS_TTL * 2);
                match broker.sweep(options).await {
                    Ok(report) => format!(
                        "swept: {} refreshed, {} relink, {} transient",
                        report.refreshed.len(),
                        report.relink_required.len(),
                        report.transient.len()
                    ),
                    Err(e) => format!("error: {e}"),
                }
            }
            ActorKind::Relogin { with_refresh_token } => {
                match login(s, broker, with_refresh_token).await {
                    Ok(outcome) => {
                        let at = outcome.tokens.access_token().expose_secret();
                        world.handed(at, "complete_login");
                        format!("re-linked: {}", world.ledger().label(at))
                    }
                    Err(e) => format!("login failed: {e}"),
                }
            }
            ActorKind::Rewrap => {
                let store = s.rewrap.as_ref().expect("a rewrap store in this mix");
                match store.rewrap_page(None, 16).await {
                    Ok((report, _)) => format!("rewrap: {report:?}"),
                    Err(e) => format!("rewrap error: {e}"),
                }
            }
            ActorKind::Unlink => {
                world.ledger().unlink_started = true;
                match broker.unlink(&s.key).await {
                    Ok(outcome) => format!("unlinked: {outcome:?}"),
                    Err(e) => format!("unlink error: {e}"),
                }
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// The checks after a schedule
// ---------------------------------------------------------------------------------------------

/// Waits until the brokers are idle, then checks invariants 2, 4 and 5 (1 and 3 are checked as
/// they happen).
async fn check_after(setup: &Setup) {
    let world = &setup.world;
    if !settle(world).await {
        world.violation(
            Invariant::NeverIdle,
            "the brokers still call the store or the provider an hour after the actors finished"
                .into(),
        );
        return;
    }
    world.faults_on.store(false, Ordering::SeqCst);
    // No instance may still count itself refreshing; then, at once (before a lease left
    // behind could merely expire), the lease must be free.
    let mut refreshing = Vec::new();
    for _ in 0..100 {
        refreshing.clear();
        for (i, broker) in setup.brokers.iter().enumerate() {
            if let Ok(GrantStatus::Refreshing) = broker.status(&setup.key).await {
                refreshing.push(i);
            }
        }
        if refreshing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    world.log(|| "idle: checking".into());
    if !refreshing.is_empty() {
        world.violation(
            Invariant::LeaseLeftHeld,
            format!("brokers {refreshing:?} report a refresh in flight although nothing runs"),
        );
    }
    check_leases(setup).await;
    check_link(setup).await;
    // The provider's own count of reuses, against the gates': a reuse the gates missed would
    // mean the harness cannot see invariant 1.
    let detected = setup.idp.counters().reuse_detected;
    let seen = world.ledger().reuses;
    if detected > seen {
        world.violation(
            Invariant::RefreshTokenReused,
            format!("the provider detected {detected} reuses, the gates saw {seen}"),
        );
    }
}

/// Waits, stepping virtual time forward gently, until the brokers are idle: no task is left
/// (background work, such as a refresh that outlived its caller or a sweep's tasks, finishes in
/// virtual time), or, for an engine that keeps tasks of its own, no call crossed a gate for
/// ten minutes. Gives up after an hour.
async fn settle(world: &World) -> bool {
    let metrics = tokio::runtime::Handle::current().metrics();
    let give_up = Instant::now() + Duration::from_secs(3_600);
    let mut step = Duration::from_millis(1);
    loop {
        let quiet = Instant::now() - *lock(&world.last_call) >= Duration::from_secs(600);
        if metrics.num_alive_tasks() == 0 || quiet {
            return true;
        }
        if Instant::now() > give_up {
            return false;
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(Duration::from_secs(1));
    }
}

/// Invariant 4: no lease is held now, and none was abandoned (taken and never released,
/// extended or written under by its holder: the holder was cancelled mid-refresh, and only
/// the lease's expiry let others in).
async fn check_leases(setup: &Setup) {
    let world = &setup.world;
    let probe = LeaseHolder::new("explorer-probe");
    let attempt = setup
        .memory
        .try_lease(&setup.key, &probe, LEASE_TTL)
        .await
        .expect("the memory store does not fail");
    let leases = world.ledger().leases.clone();
    match attempt {
        LeaseAttempt::Busy => {
            let excused = leases
                .last()
                .is_some_and(|l| l.release_failed || l.unknown_to_holder)
                || world.ledger().raw_release_failed
                || world.ledger().lease_answer_lost;
            if !excused {
                world.violation(
                    Invariant::LeaseLeftHeld,
                    format!(
                        "lease #{} is still held after every actor finished",
                        leases.len()
                    ),
                );
            }
        }
        LeaseAttempt::Acquired(lease) => {
            let _ = setup.memory.release_lease(&lease).await;
        }
        _ => {}
    }
    for (i, lease) in leases.iter().enumerate() {
        if !lease.touched && !lease.deleted_after && !lease.unknown_to_holder {
            world.violation(
                Invariant::LeaseLeftHeld,
                format!(
                    "lease #{} was abandoned: its holder never released it (a cancelled caller took the refresh with it)",
                    i + 1
                ),
            );
        }
    }
}

/// Invariants 2 and 5 on the stored link.
async fn check_link(setup: &Setup) {
    let world = &setup.world;
    let stored = setup
        .plain
        .load(&setup.key)
        .await
        .expect("the plain store does not fail");
    let unlinked = world.ledger().unlink_started;
    let Some(stored) = stored else {
        if !unlinked {
            world.violation(
                Invariant::LiveLinkLost,
                "the link is gone although nobody unlinked it".into(),
            );
        }
        return;
    };
    let set = TokenSet::from_payload(&stored.record.payload).expect("a stored payload decodes");
    let at = set.access_token().expose_secret().to_owned();
    let Some(rt) = set.refresh_token().map(|r| r.expose_secret().to_owned()) else {
        // A re-login answered without a refresh token replaces a link whose grant died (it is
        // marked relink-required): then the link rightly holds none. The grant may die only
        // by an unlink or an unavoidable loss.
        let grant_died = {
            let l = world.ledger();
            !l.revoked_by_unlink.is_empty()
                || !l.revoked_after_loss.is_empty()
                || l.lost.iter().any(|x| x.excused)
        };
        if !unlinked && !grant_died {
            world.violation(
                Invariant::LiveLinkLost,
                format!(
                    "the link lost its refresh token (it holds {} only)",
                    world.ledger().label(&at)
                ),
            );
        }
        return;
    };
    let (rt_label, at_label, rt_grant, at_info, excused, expected) = {
        let l = world.ledger();
        let rt_grant = l.grant_of(&rt);
        // A grant may die without a fault of the broker's: an unlink revoked it, or an
        // answer was lost to the broker's time-out (the stored token is the one it spent, or
        // presenting that one again revoked the grant).
        let excused = rt_grant
            .is_some_and(|g| l.revoked_by_unlink.contains(&g) || l.revoked_after_loss.contains(&g))
            || l.lost.iter().any(|x| x.excused && x.spent == rt);
        (
            l.label(&rt),
            l.label(&at),
            rt_grant,
            l.tokens.get(&at).cloned(),
            excused,
            l.expected_grant.as_ref().map(|(_, grant)| *grant),
        )
    };
    let state = &stored.record.meta.state;
    if state.is_relink_required() && !excused {
        world.violation(
            Invariant::LiveLinkLost,
            format!(
                "the link is marked relink-required ({state:?}), and neither an unlink nor an unavoidable loss killed its grant"
            ),
        );
    } else if !state.is_relink_required() && !setup.idp.is_active(&rt) && !excused {
        world.violation(
            Invariant::LiveLinkLost,
            format!("the link holds {rt_label}, which the provider no longer honours (spent, or its grant revoked)"),
        );
    }
    if !unlinked && expected.is_some() && rt_grant != expected {
        world.violation(
            Invariant::LiveLinkLost,
            format!(
                "the link holds {rt_label}, but the last login wrote grant g{}",
                expected.unwrap_or_default()
            ),
        );
    }
    // Invariant 5. A re-login answered without a refresh token keeps the stored one by design
    // (protocol 4): its access token then sits beside the older grant's refresh token.
    if let Some(at_info) = at_info
        && Some(at_info.grant) != rt_grant
        && at_info.origin
            != (Origin::Exchange {
                with_refresh_token: false,
            })
    {
        world.violation(
            Invariant::TwoGrantsInOneLink,
            format!("the link holds {at_label} beside {rt_label}, of another grant"),
        );
    }
    let counters = setup.idp.counters();
    world.log(|| {
        format!(
            "stored: {at_label} {rt_label} [{}]; provider counters: {counters:?}",
            state.name()
        )
    });
}
