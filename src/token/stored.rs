//! The stored format of a link: what the bytes of a [`Payload`] hold.
//!
//! A versioned JSON record, defined by this module's own private structs, so that changing
//! the public [`TokenSet`] never changes what is stored, and no public type can serialize
//! tokens.
//!
//! - **Format 2** (written from now on):
//!   `{"v":2,"tokens":{...},"account":{"iss":..,"sub":..,"tid":..,"email":..}}`. Instants are
//!   unix seconds; absent optional values are absent, and so are empty scopes, extras and
//!   narrowed tokens; `account` is absent when the link's account is unknown.
//! - **Format 1** (read only): `{"v":1,"set":{...}}`, the derived serde form `TokenSet` had up
//!   to 0.1. Mirrored field for field by [`v1`], with the same leniency (scopes as a string or
//!   a list, `null` for absent optional values).
//!
//! Anything else that names a version is [`DecodeError::UnsupportedVersion`].
//!
//! Readers ignore fields they do not know. A change to what is stored therefore needs a new
//! version, not a new optional field: an older instance would drop the field when it writes the
//! record back.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;

use super::{DecodeError, NarrowedToken, Payload, TokenSet};
use crate::account::UpstreamAccount;
use crate::ids::Scopes;
use crate::secret::Secret;

/// The format version [`encode`] writes.
pub(super) const CURRENT_VERSION: u64 = 2;

/// Encodes `set` in the current format.
pub(super) fn encode(set: &TokenSet) -> Payload {
    let record = v2::RecordOut::from(set);
    Payload::new(serde_json::to_vec(&record).expect("a token set always serializes to JSON"))
}

/// Decodes a record of any format this release reads.
pub(super) fn decode(bytes: &[u8]) -> Result<TokenSet, DecodeError> {
    match serde_json::from_slice::<Decoded>(bytes) {
        Ok(Decoded::Set(set)) => Ok(*set),
        Ok(Decoded::Unsupported(version)) => Err(DecodeError::UnsupportedVersion { version }),
        Err(e) => Err(DecodeError::Malformed {
            reason: redacted_reason(&e),
        }),
    }
}

/// serde_json's message, unless it may quote a string of the input: "invalid type: string
/// \"…\", expected u64" would put a token that landed in the wrong field into an error message
/// and a log. Syntax errors name only the position; the data errors let through name this
/// module's own field names, or a JSON type (and at most a number).
fn redacted_reason(e: &serde_json::Error) -> String {
    const QUOTE_NO_STRING: [&str; 8] = [
        "missing field",
        "duplicate field",
        "invalid type: map",
        "invalid type: sequence",
        "invalid type: null",
        "invalid type: boolean",
        "invalid type: integer",
        "invalid type: floating point",
    ];
    let message = e.to_string();
    let quotes_nothing = e.classify() != serde_json::error::Category::Data
        || QUOTE_NO_STRING.iter().any(|p| message.starts_with(p));
    if quotes_nothing {
        message
    } else {
        format!(
            "a value has the wrong type or is out of range at line {} column {}",
            e.line(),
            e.column()
        )
    }
}

/// What a record decodes to: a set, or a version this release does not read (its body left
/// unread).
enum Decoded {
    Set(Box<TokenSet>),
    Unsupported(u64),
}

/// The top-level fields of any format.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    V,
    /// Format 1's set.
    Set,
    /// Format 2's tokens.
    Tokens,
    /// Format 2's account.
    Account,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Decoded {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RecordVisitor)
    }
}

/// Reads a record in one pass. Every writer puts `v` first, so the body is decoded straight
/// into the structs of its version; a body field met before `v` (a record some other tool
/// rewrote) is buffered as JSON until the version is known.
struct RecordVisitor;

/// The body fields of a record as read so far.
#[derive(Default)]
struct Body {
    set: Option<v1::Set>,
    tokens: Option<v2::TokensIn>,
    account: Option<Option<v2::AccountIn>>,
    /// Body fields met before `v`, with their names.
    early: Vec<(Field, serde_json::Value)>,
}

impl Body {
    /// Takes the value of body field `field` of a record of format `version` (one this
    /// release reads).
    fn take<'de, V: FieldValue<'de>>(
        &mut self,
        version: u64,
        field: Field,
        value: V,
    ) -> Result<(), V::Error> {
        fn once<T, E: de::Error>(
            slot: &mut Option<T>,
            value: T,
            name: &'static str,
        ) -> Result<(), E> {
            match slot.replace(value) {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        match (version, field) {
            (1, Field::Set) => once(&mut self.set, value.read()?, "set"),
            (2, Field::Tokens) => once(&mut self.tokens, value.read()?, "tokens"),
            (2, Field::Account) => once(&mut self.account, value.read()?, "account"),
            // A field of another format: not part of this one.
            _ => value.read::<IgnoredAny>().map(|_| ()),
        }
    }

    fn finish<E: de::Error>(self, version: u64) -> Result<TokenSet, E> {
        match version {
            1 => Ok(self.set.ok_or_else(|| E::missing_field("set"))?.into()),
            2 => Ok(v2::decode(
                self.tokens.ok_or_else(|| E::missing_field("tokens"))?,
                self.account.flatten(),
            )),
            _ => unreachable!("only readable versions get this far"),
        }
    }
}

/// Where the value of a body field comes from: the record being read, or a value buffered
/// before `v` was known.
trait FieldValue<'de> {
    type Error: de::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, Self::Error>;
}

/// The value of the map entry being read.
struct InPlace<'a, A>(&'a mut A);

impl<'de, A: MapAccess<'de>> FieldValue<'de> for InPlace<'_, A> {
    type Error = A::Error;
    fn read<T: Deserialize<'de>>(self) -> Result<T, A::Error> {
        self.0.next_value()
    }
}

/// A value buffered before `v`, reporting errors as the record's deserializer's.
struct Buffered<E>(serde_json::Value, PhantomData<E>);

impl<'de, E: de::Error> FieldValue<'de> for Buffered<E> {
    type Error = E;
    fn read<T: Deserialize<'de>>(self) -> Result<T, E> {
        T::deserialize(self.0).map_err(E::custom)
    }
}

/// Whether this release reads format `version`.
fn readable(version: u64) -> bool {
    matches!(version, 1 | CURRENT_VERSION)
}

impl<'de> Visitor<'de> for RecordVisitor {
    type Value = Decoded;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a stored token set record (a JSON object with a version `v`)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Decoded, A::Error> {
        let mut version: Option<u64> = None;
        let mut body = Body::default();
        while let Some(field) = map.next_key::<Field>()? {
            match (field, version) {
                (Field::V, Some(_)) => return Err(de::Error::duplicate_field("v")),
                (Field::V, None) => {
                    let v: u64 = map.next_value()?;
                    if readable(v) {
                        for (field, value) in std::mem::take(&mut body.early) {
                            body.take(v, field, Buffered(value, PhantomData))?;
                        }
                    }
                    version = Some(v);
                }
                (Field::Other, _) => {
                    map.next_value::<IgnoredAny>()?;
                }
                (field, None) => body.early.push((field, map.next_value()?)),
                (field, Some(v)) if readable(v) => {
                    body.take(v, field, InPlace(&mut map))?;
                }
                // The body of a version this release does not read is not looked at.
                (_, Some(_)) => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match version {
            None => Err(de::Error::missing_field("v")),
            Some(v) if readable(v) => Ok(Decoded::Set(Box::new(body.finish(v)?))),
            Some(v) => Ok(Decoded::Unsupported(v)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the formats' structs.

/// Scopes as their space-separated text (`Scopes`' `Display`, which `Scopes::parse` reads back
/// unchanged).
fn scope_text<S: Serializer>(scopes: &&Scopes, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(*scopes)
}

fn no_scopes(scopes: &&Scopes) -> bool {
    scopes.is_empty()
}

fn no_extras(extras: &&BTreeMap<String, serde_json::Value>) -> bool {
    extras.is_empty()
}

/// Format 1, read only: the layout of the derived serde impls `TokenSet` and its narrowed
/// tokens had up to 0.1, field for field, defaults and leniency included.
mod v1 {
    use super::*;

    /// `TokenSet`'s derived form. (Its `account` field was `#[serde(skip)]`: never written,
    /// and ignored if present.)
    #[derive(Deserialize)]
    pub(super) struct Set {
        access_token: String,
        token_type: String,
        #[serde(default)]
        refresh_token: Option<String>,
        #[serde(default)]
        id_token: Option<String>,
        #[serde(default, with = "time::serde::timestamp::option")]
        expires_at: Option<OffsetDateTime>,
        #[serde(default, with = "time::serde::timestamp::option")]
        refresh_expires_at: Option<OffsetDateTime>,
        #[serde(default, deserialize_with = "scopes_text_or_list")]
        scopes: Scopes,
        #[serde(with = "time::serde::timestamp")]
        obtained_at: OffsetDateTime,
        #[serde(default)]
        extras: BTreeMap<String, serde_json::Value>,
        #[serde(default)]
        narrowed: BTreeMap<String, Narrowed>,
    }

    /// `NarrowedToken`'s derived form.
    #[derive(Deserialize)]
    struct Narrowed {
        access_token: String,
        token_type: String,
        #[serde(default, with = "time::serde::timestamp::option")]
        expires_at: Option<OffsetDateTime>,
        #[serde(default, deserialize_with = "scopes_text_or_list")]
        scopes: Scopes,
        #[serde(with = "time::serde::timestamp")]
        obtained_at: OffsetDateTime,
    }

    /// What `Scopes`' `Deserialize` accepted: the scope text (separated by spaces, commas or
    /// both), or a list of scopes.
    fn scopes_text_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Scopes, D::Error> {
        struct ScopesVisitor;
        impl<'de> Visitor<'de> for ScopesVisitor {
            type Value = Scopes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scope string or a list of scopes")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Scopes, E> {
                Ok(Scopes::parse(text))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Scopes, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(items.iter().map(String::as_str).collect())
            }
        }
        d.deserialize_any(ScopesVisitor)
    }

    impl From<Set> for TokenSet {
        fn from(s: Set) -> TokenSet {
            TokenSet {
                access_token: Secret::new(s.access_token),
                token_type: s.token_type,
                refresh_token: s.refresh_token.map(Secret::new),
                id_token: s.id_token.map(Secret::new),
                expires_at: s.expires_at,
                refresh_expires_at: s.refresh_expires_at,
                scopes: s.scopes,
                obtained_at: s.obtained_at,
                extras: s.extras,
                narrowed: s
                    .narrowed
                    .into_iter()
                    .map(|(slot, n)| {
                        let token = NarrowedToken {
                            access_token: Secret::new(n.access_token),
                            token_type: n.token_type,
                            expires_at: n.expires_at,
                            scopes: n.scopes,
                            obtained_at: n.obtained_at,
                        };
                        (slot, token)
                    })
                    .collect(),
                account: None,
            }
        }
    }
}

/// Format 2: written from borrowed structs (no copy of a token is made to encode it), read
/// into owned ones with the same field names.
mod v2 {
    use super::*;

    #[derive(Serialize)]
    pub(super) struct RecordOut<'a> {
        v: u64,
        tokens: TokensOut<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        account: Option<AccountOut<'a>>,
    }

    impl<'a> From<&'a TokenSet> for RecordOut<'a> {
        fn from(set: &'a TokenSet) -> Self {
            RecordOut {
                v: CURRENT_VERSION,
                tokens: TokensOut {
                    access_token: set.access_token.expose_secret(),
                    token_type: &set.token_type,
                    refresh_token: set.refresh_token.as_ref().map(Secret::expose_secret),
                    id_token: set.id_token.as_ref().map(Secret::expose_secret),
                    expires_at: set.expires_at,
                    refresh_expires_at: set.refresh_expires_at,
                    scope: &set.scopes,
                    obtained_at: set.obtained_at,
                    extras: &set.extras,
                    narrowed: NarrowedOut(&set.narrowed),
                },
                account: set.account.as_ref().map(|a| AccountOut {
                    iss: a.issuer.as_deref(),
                    sub: &a.subject,
                    tid: a.tenant_id.as_deref(),
                    email: a.email.as_deref(),
                }),
            }
        }
    }

    /// The link's own tokens, and its narrowed ones.
    #[derive(Serialize)]
    struct TokensOut<'a> {
        access_token: &'a str,
        token_type: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        refresh_token: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id_token: Option<&'a str>,
        #[serde(
            with = "time::serde::timestamp::option",
            skip_serializing_if = "Option::is_none"
        )]
        expires_at: Option<OffsetDateTime>,
        #[serde(
            with = "time::serde::timestamp::option",
            skip_serializing_if = "Option::is_none"
        )]
        refresh_expires_at: Option<OffsetDateTime>,
        /// The granted scopes, space-separated (RFC 6749 §3.3).
        #[serde(serialize_with = "scope_text", skip_serializing_if = "no_scopes")]
        scope: &'a Scopes,
        #[serde(with = "time::serde::timestamp")]
        obtained_at: OffsetDateTime,
        #[serde(skip_serializing_if = "no_extras")]
        extras: &'a BTreeMap<String, serde_json::Value>,
        #[serde(skip_serializing_if = "NarrowedOut::is_empty")]
        narrowed: NarrowedOut<'a>,
    }

    /// Narrowed tokens by slot (the normalised scope string they were asked for), written
    /// without building a map of borrowed structs first.
    struct NarrowedOut<'a>(&'a BTreeMap<String, NarrowedToken>);

    impl NarrowedOut<'_> {
        fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
    }

    impl Serialize for NarrowedOut<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(self.0.iter().map(|(slot, n)| {
                let token = NarrowedTokenOut {
                    access_token: n.access_token.expose_secret(),
                    token_type: &n.token_type,
                    expires_at: n.expires_at,
                    scope: &n.scopes,
                    obtained_at: n.obtained_at,
                };
                (slot, token)
            }))
        }
    }

    #[derive(Serialize)]
    struct NarrowedTokenOut<'a> {
        access_token: &'a str,
        token_type: &'a str,
        #[serde(
            with = "time::serde::timestamp::option",
            skip_serializing_if = "Option::is_none"
        )]
        expires_at: Option<OffsetDateTime>,
        #[serde(serialize_with = "scope_text", skip_serializing_if = "no_scopes")]
        scope: &'a Scopes,
        #[serde(with = "time::serde::timestamp")]
        obtained_at: OffsetDateTime,
    }

    /// The upstream account, under the names of the ID token claims it comes from.
    #[derive(Serialize)]
    struct AccountOut<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        iss: Option<&'a str>,
        sub: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        tid: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        email: Option<&'a str>,
    }

    #[derive(Deserialize)]
    pub(super) struct TokensIn {
        access_token: String,
        token_type: String,
        #[serde(default)]
        refresh_token: Option<String>,
        #[serde(default)]
        id_token: Option<String>,
        #[serde(default, with = "time::serde::timestamp::option")]
        expires_at: Option<OffsetDateTime>,
        #[serde(default, with = "time::serde::timestamp::option")]
        refresh_expires_at: Option<OffsetDateTime>,
        #[serde(default)]
        scope: String,
        #[serde(with = "time::serde::timestamp")]
        obtained_at: OffsetDateTime,
        #[serde(default)]
        extras: BTreeMap<String, serde_json::Value>,
        #[serde(default)]
        narrowed: BTreeMap<String, NarrowedTokenIn>,
    }

    #[derive(Deserialize)]
    struct NarrowedTokenIn {
        access_token: String,
        token_type: String,
        #[serde(default, with = "time::serde::timestamp::option")]
        expires_at: Option<OffsetDateTime>,
        #[serde(default)]
        scope: String,
        #[serde(with = "time::serde::timestamp")]
        obtained_at: OffsetDateTime,
    }

    #[derive(Deserialize)]
    pub(super) struct AccountIn {
        #[serde(default)]
        iss: Option<String>,
        sub: String,
        #[serde(default)]
        tid: Option<String>,
        #[serde(default)]
        email: Option<String>,
    }

    pub(super) fn decode(t: TokensIn, account: Option<AccountIn>) -> TokenSet {
        TokenSet {
            access_token: Secret::new(t.access_token),
            token_type: t.token_type,
            refresh_token: t.refresh_token.map(Secret::new),
            id_token: t.id_token.map(Secret::new),
            expires_at: t.expires_at,
            refresh_expires_at: t.refresh_expires_at,
            scopes: Scopes::parse(&t.scope),
            obtained_at: t.obtained_at,
            extras: t.extras,
            narrowed: t
                .narrowed
                .into_iter()
                .map(|(slot, n)| {
                    let token = NarrowedToken {
                        access_token: Secret::new(n.access_token),
                        token_type: n.token_type,
                        expires_at: n.expires_at,
                        scopes: Scopes::parse(&n.scope),
                        obtained_at: n.obtained_at,
                    };
                    (slot, token)
                })
                .collect(),
            account: account.map(|a| UpstreamAccount {
                issuer: a.iss,
                subject: a.sub,
                tenant_id: a.tid,
                email: a.email,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::macros::datetime;

    use super::*;

    const V1_FULL: &[u8] = include_bytes!("../../tests/fixtures/stored/v1-full.json");
    const V1_MINIMAL: &[u8] = include_bytes!("../../tests/fixtures/stored/v1-minimal.json");

    /// Every field, narrowed tokens and account included, is the same.
    #[track_caller]
    fn assert_same(a: &TokenSet, b: &TokenSet) {
        fn secret(s: &Option<Secret>) -> Option<&str> {
            s.as_ref().map(Secret::expose_secret)
        }
        assert_eq!(
            a.access_token.expose_secret(),
            b.access_token.expose_secret()
        );
        assert_eq!(a.token_type, b.token_type);
        assert_eq!(secret(&a.refresh_token), secret(&b.refresh_token));
        assert_eq!(secret(&a.id_token), secret(&b.id_token));
        assert_eq!(a.expires_at, b.expires_at);
        assert_eq!(a.refresh_expires_at, b.refresh_expires_at);
        assert_eq!(a.scopes, b.scopes);
        assert_eq!(a.obtained_at, b.obtained_at);
        assert_eq!(a.extras, b.extras);
        assert_eq!(
            a.narrowed.keys().collect::<Vec<_>>(),
            b.narrowed.keys().collect::<Vec<_>>()
        );
        for (x, y) in a.narrowed.values().zip(b.narrowed.values()) {
            assert_eq!(
                x.access_token.expose_secret(),
                y.access_token.expose_secret()
            );
            assert_eq!(x.token_type, y.token_type);
            assert_eq!(x.expires_at, y.expires_at);
            assert_eq!(x.scopes, y.scopes);
            assert_eq!(x.obtained_at, y.obtained_at);
        }
        assert_eq!(a.account, b.account);
    }

    fn account() -> UpstreamAccount {
        UpstreamAccount::new(
            Some("https://login.microsoftonline.com/9188040d/v2.0".into()),
            "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
        )
        .with_tenant_id("9188040d-6c67-4c5b-b112-36a304b66dad")
        .with_email("alice@example.com")
    }

    /// A set with every field, two narrowed tokens, and no account.
    fn full() -> TokenSet {
        let t0 = datetime!(2026-01-01 0:00 UTC);
        let hour = Duration::from_secs(3600);
        let set = TokenSet::new(Secret::new("at-ü-🔑 \"q\""), t0)
            .with_token_type("DPoP")
            .with_refresh_token(Secret::new("rt-1"))
            .with_id_token(Secret::new("h.p.s"))
            .with_expires_at(t0 + hour)
            .with_refresh_expires_at(t0 + 24 * hour)
            .with_scopes(Scopes::parse("openid email"))
            .with_extra("ext_expires_in", serde_json::json!(3599))
            .with_extra("nested", serde_json::json!({"a": [1, "x", null, true]}));
        let narrow = TokenSet::new(Secret::new("at-narrow-1"), t0)
            .with_expires_at(t0 + hour)
            .with_scopes(Scopes::parse("mail.read openid"));
        let set = set.with_narrowed(&Scopes::parse("mail.read"), narrow);
        let narrow = TokenSet::new(Secret::new("at-narrow-2"), t0).with_token_type("bearer");
        set.with_narrowed(&Scopes::parse("api://x/.default"), narrow)
    }

    fn minimal() -> TokenSet {
        TokenSet::new(Secret::new("at"), datetime!(2026-01-01 0:00 UTC))
    }

    fn text(payload: &Payload) -> &str {
        std::str::from_utf8(payload.expose_secret()).unwrap()
    }

    #[test]
    fn v2_round_trips_losslessly_and_byte_stably() {
        let only_subject = UpstreamAccount::new(None, "12345");
        let sets = [
            full(),
            full().with_account(account()),
            full().with_account(only_subject.clone()),
            minimal(),
            minimal().with_account(account()),
            minimal().with_account(only_subject),
        ];
        for set in &sets {
            let bytes = set.to_payload();
            assert!(
                text(&bytes).starts_with(r#"{"v":2,"tokens":{"#),
                "{}",
                text(&bytes)
            );
            let back = TokenSet::from_payload(&bytes).unwrap();
            assert_same(&back, set);
            let again = back.to_payload();
            assert_eq!(text(&again), text(&bytes));
        }
    }

    /// The layout, pinned: a change here is a new format version, not an edit.
    #[test]
    fn v2_layout() {
        let t0 = datetime!(2026-01-01 0:00 UTC);
        let set = minimal()
            .with_refresh_token(Secret::new("rt"))
            .with_expires_at(t0 + Duration::from_secs(3600))
            .with_scopes(Scopes::parse("openid email"))
            .with_account(UpstreamAccount::new(Some("https://idp".into()), "sub-1"));
        let set = set.with_narrowed(
            &Scopes::parse("b a"),
            TokenSet::new(Secret::new("at-n"), t0).with_scopes(Scopes::parse("a b c")),
        );
        assert_eq!(
            text(&set.to_payload()),
            concat!(
                r#"{"v":2,"tokens":{"access_token":"at","token_type":"Bearer","refresh_token":"rt","#,
                r#""expires_at":1767229200,"scope":"email openid","obtained_at":1767225600,"#,
                r#""narrowed":{"a b":{"access_token":"at-n","token_type":"Bearer","scope":"a b c","#,
                r#""obtained_at":1767225600}}},"account":{"iss":"https://idp","sub":"sub-1"}}"#
            )
        );
        assert_eq!(
            text(&minimal().to_payload()),
            r#"{"v":2,"tokens":{"access_token":"at","token_type":"Bearer","obtained_at":1767225600}}"#
        );
    }

    /// Format 1 reads into the same set, and rewritten as format 2 loses nothing.
    #[test]
    fn v1_fixtures_read_and_rewrite_as_v2() {
        for fixture in [V1_FULL, V1_MINIMAL] {
            let v1 = decode(fixture).unwrap();
            assert!(v1.account.is_none());
            let v2 = v1.to_payload();
            assert!(text(&v2).starts_with(r#"{"v":2,"#));
            assert_same(&decode(v2.expose_secret()).unwrap(), &v1);
        }
        assert_eq!(decode(V1_FULL).unwrap().narrowed.len(), 2);
    }

    /// What format 1's derived impls accepted beyond what they wrote keeps loading.
    #[test]
    fn v1_leniency_is_kept() {
        let lenient = br#"{"set":{"access_token":"gh","token_type":"bearer","refresh_token":null,
            "expires_at":null,"scopes":["repo","gist","repo"],"obtained_at":0,"account":{"sub":"x"},
            "unknown":1,"narrowed":{"gist":{"access_token":"n","token_type":"bearer",
            "scopes":"gist,repo","obtained_at":5}}},"v":1,"later":[]}"#;
        let set = decode(lenient).unwrap();
        assert_eq!(set.access_token.expose_secret(), "gh");
        assert!(set.refresh_token.is_none() && set.expires_at.is_none());
        assert_eq!(set.scopes, Scopes::parse("gist repo"));
        // Format 1 never kept the account: one found there is not trusted.
        assert!(set.account.is_none());
        assert_eq!(set.narrowed["gist"].scopes, Scopes::parse("gist repo"));
        assert_eq!(
            set.narrowed["gist"].obtained_at,
            OffsetDateTime::UNIX_EPOCH + Duration::from_secs(5)
        );
    }

    /// `v` is not always first in a record some other tool rewrote.
    #[test]
    fn fields_in_any_order() {
        let bytes = full().with_account(account()).to_payload();
        let mut value: serde_json::Value = serde_json::from_slice(bytes.expose_secret()).unwrap();
        let v = value.as_object_mut().unwrap().remove("v").unwrap();
        value.as_object_mut().unwrap().insert("v".into(), v);
        let reordered = serde_json::to_vec(&value).unwrap();
        assert!(reordered.ends_with(br#""v":2}"#));
        assert_same(
            &decode(&reordered).unwrap(),
            &full().with_account(account()),
        );
    }

    #[test]
    fn other_versions_are_a_typed_error_naming_the_version() {
        for (bytes, version) in [
            (&br#"{"v":3,"tokens":{"access_token":"at"}}"#[..], 3),
            (br#"{"v":0}"#, 0),
            (br#"{"tokens":7,"v":18446744073709551615}"#, u64::MAX),
        ] {
            let err = decode(bytes).unwrap_err();
            assert_eq!(err, DecodeError::UnsupportedVersion { version });
            assert!(
                err.to_string().contains(&format!("version {version}")),
                "{err}"
            );
        }
    }

    #[test]
    fn malformed_records_are_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"not json",
            b"null",
            b"[]",
            br#""v""#,
            b"{}",
            br#"{"v":"2","tokens":{}}"#,
            br#"{"v":-1}"#,
            br#"{"v":2.5}"#,
            br#"{"v":2,"v":2}"#,
            br#"{"v":2}"#,
            br#"{"v":2,"set":{"access_token":"a","token_type":"B","obtained_at":0}}"#,
            br#"{"v":1,"tokens":{"access_token":"a","token_type":"B","obtained_at":0}}"#,
            br#"{"v":2,"tokens":[]}"#,
            br#"{"v":2,"tokens":{"access_token":"a","token_type":"B"}}"#,
            br#"{"v":2,"tokens":{"access_token":"a","token_type":"B","obtained_at":1e400}}"#,
            br#"{"v":2,"tokens":{"access_token":"a","token_type":"B","obtained_at":999999999999999}}"#,
            br#"{"v":2,"tokens":{"access_token":"a","token_type":"B","obtained_at":0,"scope":[]}}"#,
            br#"{"v":2,"tokens":{"access_token":"a","token_type":"B","obtained_at":0},"account":{}}"#,
            br#"{"v":2,"tokens":{"access_token":"a","token_type":"B","obtained_at":0},"tokens":{}}"#,
            br#"{"v":1,"set":{"access_token":"a","token_type":"B","obtained_at":0,"scopes":null}}"#,
            br#"{"v":2,"tokens":{"access_token":"a","token_type":"B","obtained_at":0}} x"#,
        ];
        for bytes in cases {
            match decode(bytes) {
                Err(DecodeError::Malformed { .. }) => {}
                other => panic!("{}: {other:?}", String::from_utf8_lossy(bytes)),
            }
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for payload in [
            full().with_account(account()).to_payload(),
            Payload::new(V1_FULL.to_vec()),
        ] {
            let bytes = payload.expose_secret();
            for end in 0..bytes.len() {
                assert!(
                    decode(&bytes[..end]).is_err(),
                    "prefix of {end} bytes decoded"
                );
            }
        }
    }

    /// A token in a field of another type is not quoted by the error.
    #[test]
    fn errors_do_not_quote_values() {
        for bytes in [
            &br#"{"v":2,"tokens":{"access_token":"a","token_type":"B","obtained_at":"tok-secret"}}"#[..],
            br#"{"tokens":{"access_token":"a","token_type":"B","obtained_at":"tok-secret"},"v":2}"#,
            br#"{"v":1,"set":{"access_token":"a","token_type":"B","obtained_at":0,"scopes":{"tok-secret":1}}}"#,
            br#"{"v":"tok-secret"}"#,
        ] {
            let err = decode(bytes).unwrap_err();
            assert!(!err.to_string().contains("tok-secret"), "{err}");
            assert!(err.to_string().contains("line 1 column"), "{err}");
        }
        let err = decode(br#"{"v":2,"tokens":{"token_type":"B","obtained_at":0}}"#).unwrap_err();
        assert!(
            err.to_string().contains("missing field `access_token`"),
            "{err}"
        );
        let err = decode(b"[]").unwrap_err();
        assert!(err.to_string().contains("invalid type: sequence"), "{err}");
    }
}
