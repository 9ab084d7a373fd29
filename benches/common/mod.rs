//! Shared by the benches: the 2.5 KB token set, a broker over any store, criterion's settings,
//! and the summary that prints each tokenbroker median next to its floor's.
//!
//! Every bench binary includes this file with `mod common;` and uses only part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use time::OffsetDateTime;
use tokenbroker::provider::OAuth2Config;
use tokenbroker::store::{LinkState, Record, RecordMeta};
use tokenbroker::{
    Caller, ProviderId, ProviderPolicy, Scopes, Secret, TokenBroker, TokenKey, TokenSet, TokenStore,
};

/// The sizes the task fixes: a 1.2 KB access token (a typical JWT with claims), a 100 B
/// refresh token, a 1 KB ID token; with the JSON envelope the payload is about 2.5 KB.
pub const ACCESS_LEN: usize = 1200;
pub const REFRESH_LEN: usize = 100;
pub const ID_LEN: usize = 1024;

/// Deterministic token text of `len` bytes (base64url alphabet, like real JWTs), distinct
/// per `seed` so that no two links share a token.
pub fn token_text(len: usize, seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64: cheap and good enough to defeat any compression or interning.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ALPHABET[(x % 64) as usize] as char
        })
        .collect()
}

/// The 2.5 KB set, valid for an hour from `now`.
pub fn token_set(now: OffsetDateTime, seed: u64) -> TokenSet {
    TokenSet::new(Secret::new(token_text(ACCESS_LEN, seed)), now)
        .with_refresh_token(Secret::new(token_text(REFRESH_LEN, seed ^ 1)))
        .with_id_token(Secret::new(token_text(ID_LEN, seed ^ 2)))
        .with_expires_at(now + Duration::from_secs(3600))
        .with_scopes(Scopes::parse("openid email profile offline_access"))
}

/// A store record holding `set`.
pub fn record(set: &TokenSet, now: OffsetDateTime) -> Record {
    Record::new(
        set.to_payload(),
        RecordMeta::new(LinkState::Active, set.expires_at(), now, now),
    )
}

/// The key of link number `i`.
pub fn key(i: u64) -> TokenKey {
    TokenKey::parse("acme", &format!("user-{i}"), "fake").unwrap()
}

/// A caller allowed to read `key` (its own link, with the read role).
pub fn caller(key: &TokenKey) -> Caller {
    Caller::new(key.realm.clone(), key.subject.clone(), "bench-app")
        .with_role("read-token")
        .with_full_client_scope()
}

/// A broker over `store` with one OAuth 2.0 provider `fake`. The endpoints point at a closed
/// loopback port: the read benches serve fresh tokens and never call them.
pub fn read_broker(store: Arc<dyn TokenStore>) -> TokenBroker {
    let unused: url::Url = "http://127.0.0.1:9/unused".parse().unwrap();
    let config = OAuth2Config::new(
        ProviderId::new("fake").unwrap(),
        "bench-client",
        unused.clone(),
        unused.clone(),
        unused,
    );
    TokenBroker::builder()
        .with_oauth2_provider(config, ProviderPolicy::default())
        .with_store(store)
        .build()
        .unwrap()
}

/// Criterion with a short default measurement, so that the whole suite fits a few minutes on
/// two cores; command-line flags (`--measurement-time`, `--warm-up-time`) still win.
pub fn criterion() -> Criterion {
    let _ = START.set(std::time::SystemTime::now());
    Criterion::default()
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(50)
        .configure_from_args()
}

/// One line of the summary: a tokenbroker measurement against its floor, by criterion ids
/// (`group/function`), with the target ratio (infinite for a reference line without target).
pub struct Pair {
    pub label: &'static str,
    pub ours: String,
    pub floor: String,
    pub target: f64,
}

impl Pair {
    pub fn new(
        label: &'static str,
        ours: impl Into<String>,
        floor: impl Into<String>,
        target: f64,
    ) -> Self {
        Pair {
            label,
            ours: ours.into(),
            floor: floor.into(),
            target,
        }
    }
}

/// Where criterion keeps its results: `target/criterion` next to this binary's `deps` folder
/// (or `$CRITERION_HOME`).
fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let exe = std::env::current_exe().unwrap();
    // target/release/deps/<bench>-<hash>
    exe.ancestors()
        .nth(3)
        .map(|t| t.join("criterion"))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

/// When this run started: results written before it are an earlier run's, not ours.
static START: std::sync::OnceLock<std::time::SystemTime> = std::sync::OnceLock::new();

/// The median of a measurement finished in this run, in nanoseconds.
pub fn median_ns(id: &str) -> Option<f64> {
    let path = criterion_home().join(id).join("new").join("estimates.json");
    let written = std::fs::metadata(&path).ok()?.modified().ok()?;
    if START.get().is_some_and(|start| written < *start) {
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn human(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Paired ratios measured in this run, by the criterion ids of both sides.
static PAIRED: std::sync::Mutex<Vec<(String, String, f64)>> = std::sync::Mutex::new(Vec::new());

/// Rounds of a paired measurement.
const ROUNDS: usize = 21;
/// Time each side gets per round.
const ROUND_TIME: Duration = Duration::from_millis(40);

/// Measures `ours` against `floor` in alternating rounds (each closure runs `n` iterations and
/// returns the time they took) and records the median of the per-round ratios under the
/// criterion ids of both sides.
///
/// Criterion measures one function after the other, several seconds apart; on a shared machine
/// the speed of the whole box drifts by ±30 % over that time, and the ratio of two medians
/// picks the drift up. Rounds of 40 ms that alternate, and swap which side goes first, see the
/// same machine on both sides; their median ratio is what the targets are judged by.
pub fn paired(
    ours_id: &str,
    floor_id: &str,
    mut ours: impl FnMut(u64) -> Duration,
    mut floor: impl FnMut(u64) -> Duration,
) -> f64 {
    let n_ours = calibrate(&mut ours);
    let n_floor = calibrate(&mut floor);
    let per = |d: Duration, n: u64| d.as_secs_f64() / n as f64;
    let mut ratios: Vec<f64> = (0..ROUNDS)
        .map(|round| {
            let (o, f) = if round % 2 == 0 {
                let o = ours(n_ours);
                (o, floor(n_floor))
            } else {
                let f = floor(n_floor);
                (ours(n_ours), f)
            };
            per(o, n_ours) / per(f, n_floor)
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ROUNDS / 2];
    PAIRED
        .lock()
        .unwrap()
        .push((ours_id.to_owned(), floor_id.to_owned(), median));
    median
}

/// The number of iterations that takes about [`ROUND_TIME`] (after a warm-up).
fn calibrate(f: &mut impl FnMut(u64) -> Duration) -> u64 {
    let mut n = 1u64;
    loop {
        let took = f(n);
        if took >= ROUND_TIME / 4 || n >= 1 << 30 {
            let per = took.as_secs_f64() / n as f64;
            return ((ROUND_TIME.as_secs_f64() / per.max(1e-12)) as u64).max(1);
        }
        n *= 4;
    }
}

fn paired_ratio(ours_id: &str, floor_id: &str) -> Option<f64> {
    PAIRED
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|(o, f, _)| o == ours_id && f == floor_id)
        .map(|(_, _, r)| *r)
}

/// Prints the ratio of each pair (a Markdown table, pasted into the README), from the
/// medians criterion just wrote, and the paired ratio where the bench measured one (the
/// target is judged by the paired ratio when there is one). Pairs filtered out on the command
/// line print `n/a`.
pub fn print_summary(bench: &str, pairs: &[Pair]) {
    println!("\n## {bench}: tokenbroker vs floor (medians)\n");
    println!("| bench | tokenbroker | floor | ratio of medians | paired ratio | target |");
    println!("|---|---|---|---|---|---|");
    for p in pairs {
        match (median_ns(&p.ours), median_ns(&p.floor)) {
            (Some(o), Some(f)) => {
                let ratio = o / f;
                let paired = paired_ratio(&p.ours, &p.floor);
                let judged = paired.unwrap_or(ratio);
                let target = if p.target.is_finite() {
                    let verdict = if judged <= p.target { "met" } else { "MISSED" };
                    format!("≤ {}× ({verdict})", p.target)
                } else {
                    "(reference)".to_owned()
                };
                println!(
                    "| {} | {} | {} | {:.2}× | {} | {} |",
                    p.label,
                    human(o),
                    human(f),
                    ratio,
                    paired.map_or("–".to_owned(), |r| format!("{r:.2}×")),
                    target
                );
            }
            _ => println!("| {} | n/a | n/a | n/a | n/a | not run |", p.label),
        }
    }
    println!();
}

/// An OAuth 2.0 provider `fake` on `idp`, asking only `offline_access`: without `openid` the
/// fake signs no RSA ID token per refresh, which would dominate both sides of the comparison.
pub fn idp_config(idp: &tokenbroker::testing::FakeIdp) -> OAuth2Config {
    OAuth2Config::new(
        ProviderId::new("fake").unwrap(),
        idp.client_id(),
        idp.authorization_endpoint(),
        idp.token_endpoint(),
        "http://127.0.0.1:9/callback".parse().unwrap(),
    )
    .with_client_secret(Secret::new(idp.client_secret()))
    .with_scopes(Scopes::parse("offline_access"))
}

/// A broker instance on `idp`, `store` and `clock` (several may share the store).
pub fn idp_broker(
    idp: &tokenbroker::testing::FakeIdp,
    store: Arc<dyn TokenStore>,
    clock: Arc<tokenbroker::testing::ManualClock>,
) -> TokenBroker {
    TokenBroker::builder()
        .with_oauth2_provider(idp_config(idp), ProviderPolicy::default())
        .with_store(store)
        .with_clock(clock)
        .build()
        .unwrap()
}

/// Links `user` at the IdP to `key` through `broker` and returns the stored set.
pub async fn link(
    idp: &tokenbroker::testing::FakeIdp,
    broker: &TokenBroker,
    key: &TokenKey,
    user: &str,
) -> TokenSet {
    let start = broker
        .begin_login(key, tokenbroker::LoginOptions::default())
        .await
        .unwrap();
    let cb = idp.authorize(&start.authorization_url, user).unwrap();
    broker
        .complete_login(
            start.pending,
            &tokenbroker::Callback::from_url(&cb.redirect_url),
        )
        .await
        .unwrap();
    let stored = broker.store().load(key).await.unwrap().unwrap();
    TokenSet::from_payload(&stored.record.payload).unwrap()
}

/// The floor of a refresh: a bare `oauth2` `exchange_refresh_token` to the same endpoint over
/// the same HTTP transport (`ReqwestClient`), keeping the rotated refresh token for the next
/// call. Nothing else: no store, no lease, no merge.
pub struct BareRefresher {
    client: oauth2::basic::BasicClient<
        oauth2::EndpointSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointNotSet,
        oauth2::EndpointSet,
    >,
    http: tokenbroker::http::ReqwestClient,
    refresh_token: std::sync::Mutex<String>,
}

impl BareRefresher {
    pub fn new(idp: &tokenbroker::testing::FakeIdp, refresh_token: &str) -> Self {
        let client = oauth2::basic::BasicClient::new(oauth2::ClientId::new(idp.client_id().into()))
            .set_client_secret(oauth2::ClientSecret::new(idp.client_secret().into()))
            .set_auth_uri(oauth2::AuthUrl::from_url(idp.authorization_endpoint()))
            .set_token_uri(oauth2::TokenUrl::from_url(idp.token_endpoint()));
        BareRefresher {
            client,
            http: tokenbroker::http::ReqwestClient::new().unwrap(),
            refresh_token: std::sync::Mutex::new(refresh_token.to_owned()),
        }
    }

    /// One refresh; returns the new access token.
    pub async fn refresh(&self) -> String {
        use oauth2::TokenResponse as _;
        use tokenbroker::http::HttpClient as _;
        let rt = oauth2::RefreshToken::new(self.refresh_token.lock().unwrap().clone());
        let http = |request| self.http.execute(request);
        let answer = self
            .client
            .exchange_refresh_token(&rt)
            .request_async(&http)
            .await
            .unwrap();
        if let Some(next) = answer.refresh_token() {
            *self.refresh_token.lock().unwrap() = next.secret().clone();
        }
        answer.access_token().secret().clone()
    }
}
