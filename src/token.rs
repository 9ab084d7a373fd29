//! Token sets: what a provider answered, what the broker keeps, and how they merge.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretSlice};
use time::OffsetDateTime;

use crate::account::UpstreamAccount;
use crate::ids::Scopes;
use crate::secret::Secret;

mod stored;

/// How many narrowed tokens (distinct scope sets or audiences) a link keeps at most.
pub(crate) const MAX_NARROWED: usize = 16;

/// The tokens of one link, as the broker keeps them.
///
/// Built from a provider's answer by [`TokenSet::from_response`], and merged with a later answer
/// by [`TokenSet::merge`], which never drops a refresh token the answer did not replace.
///
/// It implements neither `Serialize` nor `Deserialize`, so that host code cannot serialize a
/// set's tokens by accident (into an HTTP response, a cookie, a log line). Stores keep
/// [`TokenSet::to_payload`]'s bytes, a private and versioned format.
///
/// ```compile_fail,E0277
/// # use tokenbroker::{Secret, TokenSet};
/// # let set = TokenSet::new(Secret::new("at"), time::OffsetDateTime::UNIX_EPOCH);
/// let json = serde_json::to_string(&set); // does not compile: use `set.to_payload()`
/// ```
///
/// ```
/// use tokenbroker::{Secret, TokenSet};
/// use time::macros::datetime;
///
/// let set = TokenSet::new(Secret::new("at-1"), datetime!(2026-01-01 0:00 UTC))
///     .with_refresh_token(Secret::new("rt-1"))
///     .with_expires_at(datetime!(2026-01-01 1:00 UTC));
/// assert!(format!("{set:?}").contains("[redacted]"));
/// assert!(!format!("{set:?}").contains("at-1"));
/// ```
#[derive(Clone)]
pub struct TokenSet {
    access_token: Secret,
    token_type: String,
    refresh_token: Option<Secret>,
    id_token: Option<Secret>,
    expires_at: Option<OffsetDateTime>,
    refresh_expires_at: Option<OffsetDateTime>,
    scopes: Scopes,
    obtained_at: OffsetDateTime,
    extras: BTreeMap<String, serde_json::Value>,
    /// Access tokens for narrower scope sets, obtained with this set's refresh token, keyed by
    /// the normalised scope string.
    narrowed: BTreeMap<String, NarrowedToken>,
    /// The upstream account these tokens belong to, when known.
    account: Option<UpstreamAccount>,
}

/// An access token for a narrower set of scopes (or one audience), obtained with the link's
/// refresh token and kept beside the link's own access token.
#[derive(Clone)]
struct NarrowedToken {
    access_token: Secret,
    token_type: String,
    expires_at: Option<OffsetDateTime>,
    scopes: Scopes,
    obtained_at: OffsetDateTime,
}

/// The longest lifetime [`TokenSet::from_response`] accepts from a provider (100 years);
/// longer ones are cut to it.
const MAX_LIFETIME: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

impl TokenSet {
    /// A set holding only an access token of type `Bearer`, obtained at `obtained_at`, with no
    /// known expiry.
    pub fn new(access_token: Secret, obtained_at: OffsetDateTime) -> Self {
        TokenSet {
            access_token,
            token_type: "Bearer".into(),
            refresh_token: None,
            id_token: None,
            expires_at: None,
            refresh_expires_at: None,
            scopes: Scopes::new(),
            obtained_at,
            extras: BTreeMap::new(),
            narrowed: BTreeMap::new(),
            account: None,
        }
    }

    /// Builds the set a provider's answer describes, turning relative lifetimes into instants
    /// with `now` (a lifetime longer than 100 years counts as 100 years). When the answer names no scopes, the granted scopes are `requested`
    /// (RFC 6749 §5.1: the scope is omitted when it equals the requested one).
    pub fn from_response(
        response: ProviderTokens,
        now: OffsetDateTime,
        requested: &Scopes,
    ) -> Self {
        // A provider may claim any lifetime (`"expires_in": 1e11`, or u64::MAX seconds);
        // `now + d` would panic past year 9999. Such a claim is capped, not trusted.
        let at = |d: Option<Duration>| d.map(|d| now + d.min(MAX_LIFETIME));
        TokenSet {
            access_token: response.access_token,
            token_type: response.token_type.unwrap_or_else(|| "Bearer".into()),
            refresh_token: response.refresh_token,
            id_token: response.id_token,
            expires_at: at(response.expires_in),
            refresh_expires_at: at(response.refresh_expires_in),
            scopes: response.scopes.unwrap_or_else(|| requested.clone()),
            obtained_at: now,
            extras: response.extras,
            narrowed: BTreeMap::new(),
            account: response.account,
        }
    }

    /// Merges a newer answer for the same grant into this set and returns the result.
    ///
    /// - The access token, its type, expiry and extras come from `newer`.
    /// - A refresh token in `newer` replaces the stored one (rotation); an answer without one
    ///   keeps the stored one and its expiry. A refresh token is never dropped.
    /// - An ID token is replaced only when `newer` has one.
    /// - Scopes come from `newer` (which `from_response` already filled from the request when
    ///   the provider was silent).
    pub fn merge(&self, newer: TokenSet) -> TokenSet {
        let (refresh_token, refresh_expires_at) = match newer.refresh_token {
            Some(rt) => (Some(rt), newer.refresh_expires_at),
            None => (self.refresh_token.clone(), self.refresh_expires_at),
        };
        TokenSet {
            refresh_token,
            refresh_expires_at,
            id_token: newer.id_token.or_else(|| self.id_token.clone()),
            // Narrowed tokens stay valid until they expire, whatever happens to the main one.
            narrowed: self.narrowed.clone(),
            // A refresh that names no account (no ID token) is still the link's account; one
            // that names another never gets this far (the broker checks before merging).
            account: newer.account.or_else(|| self.account.clone()),
            ..newer
        }
    }

    /// The set as seen through a narrower scope request: the narrowed access token, its expiry
    /// and scopes, with this set's ID and refresh tokens. `None` when none was obtained yet.
    pub fn narrowed_to(&self, scopes: &Scopes) -> Option<TokenSet> {
        let n = self.narrowed.get(&scopes.to_string())?;
        Some(TokenSet {
            access_token: n.access_token.clone(),
            token_type: n.token_type.clone(),
            expires_at: n.expires_at,
            scopes: n.scopes.clone(),
            obtained_at: n.obtained_at,
            narrowed: BTreeMap::new(),
            ..self.clone()
        })
    }

    /// Keeps the access token of a narrower refresh (`answer`, asked for `scopes`) beside this
    /// set's own. A refresh token in the answer replaces the stored one (rotation applies to
    /// the whole link); narrowed tokens that have expired by then are dropped.
    pub fn with_narrowed(&self, scopes: &Scopes, answer: TokenSet) -> TokenSet {
        let now = answer.obtained_at;
        let mut merged = self.clone();
        merged
            .narrowed
            .retain(|_, n| n.expires_at.is_none_or(|at| at > now));
        // Bounded: every distinct scope set a caller asks for would otherwise stay in the
        // record (and in every read's decode) until it expires. The least recently refreshed
        // one makes room; a read that needs it again refreshes it.
        let slot = scopes.to_string();
        while merged.narrowed.len() >= MAX_NARROWED && !merged.narrowed.contains_key(&slot) {
            let oldest = merged
                .narrowed
                .iter()
                .min_by_key(|(_, n)| n.obtained_at)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => merged.narrowed.remove(&k),
                None => break,
            };
        }
        if let Some(rt) = answer.refresh_token {
            merged.refresh_token = Some(rt);
            merged.refresh_expires_at = answer.refresh_expires_at;
        }
        merged.narrowed.insert(
            slot,
            NarrowedToken {
                access_token: answer.access_token,
                token_type: answer.token_type,
                expires_at: answer.expires_at,
                scopes: answer.scopes,
                obtained_at: now,
            },
        );
        merged
    }

    /// Whether `newer` carries a different refresh token than this set (the provider rotated).
    pub fn is_rotated_by(&self, newer: &TokenSet) -> bool {
        match (&self.refresh_token, &newer.refresh_token) {
            (Some(old), Some(new)) => !old.constant_time_eq(new),
            (None, Some(_)) => true,
            _ => false,
        }
    }

    /// Whether the access token is still usable for at least `skew` at `now`. A set without a
    /// known expiry counts as fresh (GitHub OAuth-app tokens never expire).
    pub fn is_fresh(&self, now: OffsetDateTime, skew: Duration) -> bool {
        match self.expires_at {
            None => true,
            Some(exp) => exp - now > skew,
        }
    }

    /// Whether a read of a broker with expiry skew `skew` serves this set's access token as it
    /// is at `now`: it stays valid for longer than the skew, or than half its lifetime when
    /// that is shorter. A provider whose tokens live shorter than the skew would otherwise have
    /// every read refresh (and a refreshed token would not even serve the read that asked for
    /// it). Pure arithmetic on two instants: the cached read path pays nothing for it.
    pub(crate) fn is_fresh_for_read(&self, now: OffsetDateTime, skew: Duration) -> bool {
        let Some(exp) = self.expires_at else {
            return true;
        };
        let left = exp - now;
        // Never below zero: a set whose expiry precedes its receipt (bad data) is not made
        // fresh by it, only unexpired ones are.
        let lifetime: time::Duration = exp - self.obtained_at;
        let half_life = (lifetime / 2_i32).max(time::Duration::ZERO);
        if half_life < skew {
            left > half_life
        } else {
            left > skew
        }
    }

    /// How long the access token was issued for (from its receipt to its expiry), if it has a
    /// known expiry.
    pub(crate) fn lifetime(&self) -> Option<time::Duration> {
        self.expires_at.map(|exp| exp - self.obtained_at)
    }

    /// Whether the access token has not yet expired at `now` (it may be inside the skew).
    pub fn is_unexpired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_none_or(|exp| exp > now)
    }

    /// The access token.
    pub fn access_token(&self) -> &Secret {
        &self.access_token
    }
    /// The token type, usually `Bearer`.
    pub fn token_type(&self) -> &str {
        &self.token_type
    }
    /// The refresh token, if the provider issued one.
    pub fn refresh_token(&self) -> Option<&Secret> {
        self.refresh_token.as_ref()
    }
    /// The raw ID token (a JWT), if any.
    pub fn id_token(&self) -> Option<&Secret> {
        self.id_token.as_ref()
    }
    /// When the access token expires, if the provider said.
    pub fn expires_at(&self) -> Option<OffsetDateTime> {
        self.expires_at
    }
    /// When the refresh token expires, if the provider said.
    pub fn refresh_expires_at(&self) -> Option<OffsetDateTime> {
        self.refresh_expires_at
    }
    /// The scopes the provider granted.
    pub fn scopes(&self) -> &Scopes {
        &self.scopes
    }
    /// When the broker received this access token.
    pub fn obtained_at(&self) -> OffsetDateTime {
        self.obtained_at
    }
    /// Provider-specific fields kept from the answer (e.g. Microsoft's `ext_expires_in`).
    pub fn extras(&self) -> &BTreeMap<String, serde_json::Value> {
        &self.extras
    }
    /// The upstream account the tokens belong to, when known. Stored with the tokens since
    /// stored format 2; a link stored by 0.1 has none until a login or refresh names it.
    pub fn account(&self) -> Option<&UpstreamAccount> {
        self.account.as_ref()
    }

    /// Sets the token type.
    pub fn with_token_type(mut self, token_type: impl Into<String>) -> Self {
        self.token_type = token_type.into();
        self
    }
    /// Sets the refresh token.
    pub fn with_refresh_token(mut self, token: Secret) -> Self {
        self.refresh_token = Some(token);
        self
    }
    /// Sets the ID token.
    pub fn with_id_token(mut self, token: Secret) -> Self {
        self.id_token = Some(token);
        self
    }
    /// Sets the access token's expiry.
    pub fn with_expires_at(mut self, at: OffsetDateTime) -> Self {
        self.expires_at = Some(at);
        self
    }
    /// Sets the refresh token's expiry.
    pub fn with_refresh_expires_at(mut self, at: OffsetDateTime) -> Self {
        self.refresh_expires_at = Some(at);
        self
    }
    /// Sets the upstream account the tokens belong to.
    pub fn with_account(mut self, account: UpstreamAccount) -> Self {
        self.account = Some(account);
        self
    }
    /// Sets the granted scopes.
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }
    /// Adds a provider-specific field.
    pub fn with_extra(mut self, name: impl Into<String>, value: serde_json::Value) -> Self {
        self.extras.insert(name.into(), value);
        self
    }

    /// Encodes the set for a store, in the current stored format (version 2, which also
    /// keeps the [`account`](Self::account)). The payload holds every token in clear text:
    /// stores keep it as an opaque blob, and `EncryptedStore` encrypts it.
    pub fn to_payload(&self) -> Payload {
        stored::encode(self)
    }

    /// Decodes a payload written by [`TokenSet::to_payload`] of this release or an earlier
    /// one (stored format versions 1 and 2).
    ///
    /// # Errors
    ///
    /// [`DecodeError::UnsupportedVersion`] for a record of a format this release does not
    /// read (written by a newer one), [`DecodeError::Malformed`] for anything else that is
    /// not a record (not JSON, truncated, a field missing or of the wrong type).
    pub fn from_payload(payload: &Payload) -> Result<TokenSet, DecodeError> {
        stored::decode(payload.expose_secret())
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("access_token", &self.access_token)
            .field("token_type", &self.token_type)
            .field("refresh_token", &self.refresh_token)
            .field("id_token", &self.id_token)
            .field("expires_at", &self.expires_at)
            .field("refresh_expires_at", &self.refresh_expires_at)
            .field("scopes", &self.scopes)
            .field("obtained_at", &self.obtained_at)
            // Unknown provider fields may hold secrets: show their names only.
            .field("extras", &self.extras.keys().collect::<Vec<_>>())
            .field("narrowed", &self.narrowed.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A stored payload could not be decoded by [`TokenSet::from_payload`]. No variant holds any
/// of the payload's tokens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload is not a stored token set: not JSON, truncated, or a field is missing or of
    /// the wrong type.
    #[error("token set payload could not be decoded: {reason}")]
    Malformed {
        /// What was wrong, with its position.
        reason: String,
    },
    /// The payload is a record of a stored format this release does not read, most likely
    /// written by a newer release.
    #[error("token set payload could not be decoded: unsupported stored format version {version}")]
    UnsupportedVersion {
        /// The format version the record names.
        version: u64,
    },
}

/// A provider's answer from the token endpoint, already parsed and classified, with lifetimes
/// still relative. Providers build it; the broker turns it into a [`TokenSet`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProviderTokens {
    /// The access token.
    pub access_token: Secret,
    /// The token type (`Bearer` when the provider omitted it).
    pub token_type: Option<String>,
    /// A refresh token, when the provider issued or rotated one.
    pub refresh_token: Option<Secret>,
    /// The raw ID token, when the provider sent one.
    pub id_token: Option<Secret>,
    /// The access token's lifetime.
    pub expires_in: Option<Duration>,
    /// The refresh token's lifetime, when the provider says (`refresh_token_expires_in`).
    pub refresh_expires_in: Option<Duration>,
    /// The granted scopes, when the provider says.
    pub scopes: Option<Scopes>,
    /// Other fields worth keeping (e.g. `ext_expires_in`).
    pub extras: BTreeMap<String, serde_json::Value>,
    /// The upstream account the tokens belong to, when the provider can say (from a verified
    /// ID token, or an account endpoint).
    pub account: Option<UpstreamAccount>,
}

impl ProviderTokens {
    /// An answer with just an access token.
    pub fn new(access_token: Secret) -> Self {
        ProviderTokens {
            access_token,
            token_type: None,
            refresh_token: None,
            id_token: None,
            expires_in: None,
            refresh_expires_in: None,
            scopes: None,
            extras: BTreeMap::new(),
            account: None,
        }
    }
}

/// An encoded token set as a store keeps it: opaque, secret bytes.
///
/// Cheap to clone; zeroized when the last clone is dropped; `Debug` shows only the length.
#[derive(Clone)]
pub struct Payload(Arc<PayloadInner>);

struct PayloadInner {
    bytes: SecretSlice<u8>,
    /// The set decoded from these bytes, for as long as something else (the broker's bounded
    /// hot cache) keeps it alive. A store that hands out its own payload (`MemoryStore`) thus
    /// lets a cached read skip both the decode and the hot cache's lookup. Weak, so that the
    /// decoded tokens never outlive the cache's bound or an unlink.
    decoded: OnceLock<Weak<TokenSet>>,
}

impl Payload {
    /// Wraps bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Payload(Arc::new(PayloadInner {
            bytes: SecretSlice::from(bytes),
            decoded: OnceLock::new(),
        }))
    }
    /// The bytes. Stores write them; nothing should log them.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.bytes.expose_secret()
    }
    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.expose_secret().len()
    }
    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether both hold the same bytes: the same allocation (a `MemoryStore` hands out its
    /// own), or equal contents.
    pub(crate) fn same_bytes(&self, other: &Payload) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.expose_secret() == other.expose_secret()
    }
    /// The set decoded from these bytes earlier, if it is still alive.
    pub(crate) fn decoded(&self) -> Option<Arc<TokenSet>> {
        self.0.decoded.get()?.upgrade()
    }
    /// Remembers `set` as the decoding of these bytes. The first decoding wins; a later one
    /// (after the first was dropped) is simply not remembered here.
    pub(crate) fn remember_decoded(&self, set: &Arc<TokenSet>) {
        let _ = self.0.decoded.set(Arc::downgrade(set));
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload([redacted; {} bytes])", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn set(rt: Option<&str>) -> TokenSet {
        let s = TokenSet::new(Secret::new("at"), datetime!(2026-01-01 0:00 UTC))
            .with_expires_at(datetime!(2026-01-01 1:00 UTC))
            .with_id_token(Secret::new("idt"));
        match rt {
            Some(rt) => s.with_refresh_token(Secret::new(rt)),
            None => s,
        }
    }

    #[test]
    fn merge_keeps_refresh_token_when_answer_has_none() {
        let old = set(Some("rt-1"));
        let merged = old.merge(TokenSet::new(
            Secret::new("at-2"),
            datetime!(2026-01-01 2:00 UTC),
        ));
        assert_eq!(merged.refresh_token().unwrap().expose_secret(), "rt-1");
        assert_eq!(merged.access_token().expose_secret(), "at-2");
        assert_eq!(merged.id_token().unwrap().expose_secret(), "idt");
        assert!(!old.is_rotated_by(&merged));
    }

    #[test]
    fn merge_replaces_rotated_refresh_token() {
        let old = set(Some("rt-1"));
        let newer = set(Some("rt-2"));
        assert!(old.is_rotated_by(&newer));
        assert_eq!(
            old.merge(newer).refresh_token().unwrap().expose_secret(),
            "rt-2"
        );
    }

    #[test]
    fn narrowed_tokens_are_bounded_and_the_least_recently_refreshed_makes_room() {
        let mut link = set(Some("rt-1"));
        let base = datetime!(2026-01-01 0:00 UTC);
        for i in 0..MAX_NARROWED + 4 {
            let at = base + Duration::from_secs(i as u64);
            let answer = TokenSet::new(Secret::new(format!("at-{i}")), at)
                .with_expires_at(at + Duration::from_secs(3600));
            link = link.with_narrowed(&Scopes::parse(&format!("scope-{i}")), answer);
        }
        assert_eq!(link.narrowed.len(), MAX_NARROWED);
        assert!(link.narrowed_to(&Scopes::parse("scope-0")).is_none());
        assert!(link.narrowed_to(&Scopes::parse("scope-3")).is_none());
        let newest = format!("scope-{}", MAX_NARROWED + 3);
        assert!(link.narrowed_to(&Scopes::parse(&newest)).is_some());
        assert!(link.narrowed_to(&Scopes::parse("scope-4")).is_some());
    }

    #[test]
    fn freshness_uses_the_skew() {
        let s = set(None);
        let skew = Duration::from_secs(60);
        assert!(s.is_fresh(datetime!(2026-01-01 0:58 UTC), skew));
        assert!(!s.is_fresh(datetime!(2026-01-01 0:59:30 UTC), skew));
        assert!(s.is_unexpired(datetime!(2026-01-01 0:59:30 UTC)));
        assert!(!s.is_unexpired(datetime!(2026-01-01 1:00 UTC)));
        let no_expiry = TokenSet::new(Secret::new("gh"), datetime!(2026-01-01 0:00 UTC));
        assert!(no_expiry.is_fresh(datetime!(2099-01-01 0:00 UTC), skew));
    }

    #[test]
    fn reads_judge_freshness_by_at_most_half_the_lifetime() {
        let skew = Duration::from_secs(60);
        let t0 = datetime!(2026-01-01 0:00 UTC);
        // A 20 s token: fresh while more than 10 s are left, not while more than 60 s are.
        let short =
            TokenSet::new(Secret::new("at"), t0).with_expires_at(t0 + Duration::from_secs(20));
        assert!(short.is_fresh_for_read(t0, skew));
        assert!(short.is_fresh_for_read(t0 + Duration::from_secs(9), skew));
        assert!(!short.is_fresh_for_read(t0 + Duration::from_secs(10), skew));
        assert!(
            !short.is_fresh(t0, skew),
            "the plain check still uses the whole skew"
        );
        // A long-lived token: the skew, unchanged.
        let hour =
            TokenSet::new(Secret::new("at"), t0).with_expires_at(t0 + Duration::from_secs(3600));
        assert!(hour.is_fresh_for_read(t0 + Duration::from_secs(3539), skew));
        assert!(!hour.is_fresh_for_read(t0 + Duration::from_secs(3540), skew));
        // Between one and two skews: half the lifetime (50 s of 100).
        let hundred =
            TokenSet::new(Secret::new("at"), t0).with_expires_at(t0 + Duration::from_secs(100));
        assert!(hundred.is_fresh_for_read(t0 + Duration::from_secs(49), skew));
        assert!(!hundred.is_fresh_for_read(t0 + Duration::from_secs(50), skew));
        // An expiry before receipt (bad data) or at it is never fresh once expired.
        let odd =
            TokenSet::new(Secret::new("at"), t0).with_expires_at(t0 - Duration::from_secs(30));
        assert!(!odd.is_fresh_for_read(t0 - Duration::from_secs(10), skew));
        assert!(!odd.is_fresh_for_read(t0, skew));
        let zero = TokenSet::new(Secret::new("at"), t0).with_expires_at(t0);
        assert!(!zero.is_fresh_for_read(t0, skew));
        // No expiry: fresh.
        assert!(TokenSet::new(Secret::new("gh"), t0).is_fresh_for_read(t0, skew));
    }

    #[test]
    fn payload_round_trips_byte_exact() {
        let long = "x".repeat(10_000);
        let s = set(Some("rt-ü-🔑")).with_extra("ext_expires_in", serde_json::json!(3599));
        let s = TokenSet {
            access_token: Secret::new(long.clone()),
            ..s
        };
        let back = TokenSet::from_payload(&s.to_payload()).unwrap();
        assert_eq!(back.access_token().expose_secret(), long);
        assert_eq!(back.refresh_token().unwrap().expose_secret(), "rt-ü-🔑");
        assert_eq!(back.expires_at(), s.expires_at());
        assert_eq!(back.refresh_expires_at(), None);
        assert_eq!(back.extras()["ext_expires_in"], 3599);
    }

    /// Found reviewing `parse_token_response` for the `token_response` fuzz target (now a seed
    /// of it): `"expires_in": 18446744073709551615` (or any lifetime reaching past year 9999)
    /// parsed fine and then panicked in `now + d` ("overflow adding duration to date").
    #[test]
    fn absurd_lifetimes_are_capped_not_a_panic() {
        let now = datetime!(2026-01-01 0:00 UTC);
        for secs in [u64::MAX, 1_000_000_000_000, 999_999_999_999] {
            let mut answer = ProviderTokens::new(Secret::new("at"));
            answer.expires_in = Some(Duration::from_secs(secs));
            answer.refresh_expires_in = Some(Duration::MAX);
            let set = TokenSet::from_response(answer, now, &Scopes::new());
            assert_eq!(set.expires_at(), Some(now + MAX_LIFETIME));
            assert_eq!(set.refresh_expires_at(), Some(now + MAX_LIFETIME));
            let back = TokenSet::from_payload(&set.to_payload()).unwrap();
            assert_eq!(back.expires_at(), set.expires_at());
        }
    }

    /// Compiles only while `T` implements neither `Serialize` nor `Deserialize` (with either,
    /// the `_` below would be ambiguous between two impls).
    macro_rules! assert_no_serde {
        ($t:ty) => {{
            trait AmbiguousIfSerde<A> {
                fn check() {}
            }
            impl<T: ?Sized> AmbiguousIfSerde<()> for T {}
            impl<T: ?Sized + serde::Serialize> AmbiguousIfSerde<u8> for T {}
            impl<T: ?Sized + serde::de::DeserializeOwned> AmbiguousIfSerde<u16> for T {}
            <$t as AmbiguousIfSerde<_>>::check();
        }};
    }

    #[test]
    fn token_sets_have_no_serde_impls() {
        assert_no_serde!(TokenSet);
        assert_no_serde!(NarrowedToken);
    }

    #[test]
    fn garbage_payload_is_a_typed_error() {
        let err = TokenSet::from_payload(&Payload::new(b"{\"v\":1".to_vec())).unwrap_err();
        assert!(err.to_string().contains("could not be decoded"));
        assert!(matches!(err, DecodeError::Malformed { .. }), "{err:?}");
        let err =
            TokenSet::from_payload(&Payload::new(br#"{"v":9,"set":{}}"#.to_vec())).unwrap_err();
        assert_eq!(err, DecodeError::UnsupportedVersion { version: 9 });
        assert!(err.to_string().contains("could not be decoded"), "{err}");
    }
}
