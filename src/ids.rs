//! Validated identifiers: realms, subjects, provider aliases, record keys and scope sets.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// An identifier was rejected. The message names the kind and the rule; the value itself is
/// included (identifiers are not secrets) but cut to 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
#[error("invalid {kind} {value:?}: {rule}")]
pub struct InvalidId {
    /// Which identifier: `realm`, `subject`, `provider id`.
    pub kind: &'static str,
    /// The rejected value, cut to 64 characters.
    pub value: String,
    /// The rule it broke.
    pub rule: &'static str,
}

impl InvalidId {
    fn new(kind: &'static str, value: &str, rule: &'static str) -> Self {
        InvalidId {
            kind,
            value: value.chars().take(64).collect(),
            rule,
        }
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(Box<str>);

        impl $name {
            /// Validates and wraps a value.
            pub fn new(value: impl AsRef<str>) -> Result<Self, InvalidId> {
                let value = value.as_ref();
                let check: fn(&str) -> Result<(), &'static str> = $check;
                check(value).map_err(|rule| InvalidId::new($kind, value, rule))?;
                Ok($name(value.into()))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                $name::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                $name::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = InvalidId;
            fn try_from(s: &str) -> Result<Self, InvalidId> {
                $name::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

fn opaque(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > 255 {
        return Err("must be at most 255 bytes");
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters");
    }
    Ok(())
}

string_id!(
    /// A tenant namespace (Keycloak's realm). One store can serve many realms; records of one
    /// realm are invisible to callers of another.
    ///
    /// Rules: 1 to 255 bytes, no control characters, no `/`.
    ///
    /// ```
    /// use tokenbroker::Realm;
    /// assert!(Realm::new("acme").is_ok());
    /// assert!(Realm::new("a/b").is_err());
    /// ```
    Realm,
    "realm",
    |v| {
        opaque(v)?;
        if v.contains('/') { Err("must not contain '/'") } else { Ok(()) }
    }
);

string_id!(
    /// The host application's user id. Opaque to the broker: 1 to 255 bytes, no control
    /// characters.
    Subject,
    "subject",
    opaque
);

string_id!(
    /// A provider alias, as in `/broker/{alias}/token`: `[a-z0-9][a-z0-9._-]{0,63}`.
    ///
    /// ```
    /// use tokenbroker::ProviderId;
    /// assert!(ProviderId::new("google").is_ok());
    /// assert!(ProviderId::new("Google").is_err());
    /// assert!(ProviderId::new("../etc").is_err());
    /// ```
    ProviderId,
    "provider id",
    |v| {
        let mut chars = v.chars();
        match chars.next() {
            None => return Err("must not be empty"),
            Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => {}
            Some(_) => return Err("must start with a lowercase letter or digit"),
        }
        if v.len() > 64 {
            return Err("must be at most 64 characters");
        }
        if chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')) {
            Ok(())
        } else {
            Err("may contain only a-z, 0-9, '.', '_' and '-'")
        }
    }
);

/// The key of one stored link: a user's tokens from one provider, in one realm.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TokenKey {
    /// The tenant namespace.
    pub realm: Realm,
    /// The host's user.
    pub subject: Subject,
    /// The upstream provider.
    pub provider: ProviderId,
}

impl TokenKey {
    /// Builds a key.
    pub fn new(realm: Realm, subject: Subject, provider: ProviderId) -> Self {
        TokenKey {
            realm,
            subject,
            provider,
        }
    }

    /// Parses and builds a key from three strings.
    ///
    /// ```
    /// use tokenbroker::TokenKey;
    /// let key = TokenKey::parse("acme", "user-1", "google")?;
    /// assert_eq!(key.to_string(), "acme/user-1/google");
    /// # Ok::<(), tokenbroker::InvalidId>(())
    /// ```
    pub fn parse(realm: &str, subject: &str, provider: &str) -> Result<Self, InvalidId> {
        Ok(TokenKey::new(
            Realm::new(realm)?,
            Subject::new(subject)?,
            ProviderId::new(provider)?,
        ))
    }
}

impl fmt::Display for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.realm, self.subject, self.provider)
    }
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenKey({self})")
    }
}

/// A normalised set of OAuth scopes: de-duplicated, sorted, never containing an empty scope.
///
/// Parsing is lenient about separators because providers are (GitHub answers with commas).
///
/// ```
/// use tokenbroker::Scopes;
/// let s: Scopes = "email  openid email".parse().unwrap();
/// assert_eq!(s.to_string(), "email openid");
/// assert!(Scopes::parse("openid").is_subset(&s));
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(from = "ScopesRepr")]
pub struct Scopes(BTreeSet<String>);

/// As the space-separated string, written straight to the serializer (every stored set has
/// its scopes serialized on each write).
impl Serialize for Scopes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ScopesRepr {
    Text(String),
    List(Vec<String>),
}

impl From<ScopesRepr> for Scopes {
    fn from(r: ScopesRepr) -> Self {
        match r {
            ScopesRepr::Text(s) => Scopes::parse(&s),
            ScopesRepr::List(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

impl From<Scopes> for String {
    fn from(s: Scopes) -> String {
        s.to_string()
    }
}

impl Scopes {
    /// The empty set.
    pub fn new() -> Self {
        Scopes::default()
    }

    /// Parses a scope string separated by spaces (RFC 6749 §3.3), commas, or both.
    pub fn parse(text: &str) -> Self {
        std::iter::once(text).collect()
    }

    /// Whether the set holds `scope`.
    pub fn contains(&self, scope: &str) -> bool {
        self.0.contains(scope)
    }

    /// Adds a scope (ignored when empty). A value holding separators (whitespace or commas)
    /// adds each scope it names, as [`Scopes::parse`] would read it.
    pub fn insert(&mut self, scope: impl Into<String>) {
        let scope = scope.into();
        if split_scopes(&scope).eq([scope.as_str()]) {
            self.0.insert(scope);
        } else {
            self.0.extend(split_scopes(&scope).map(String::from));
        }
    }

    /// Whether every scope of `self` is in `other`.
    pub fn is_subset(&self, other: &Scopes) -> bool {
        self.0.is_subset(&other.0)
    }

    /// The scopes of `self` that are not in `other`.
    pub fn difference(&self, other: &Scopes) -> Scopes {
        Scopes(self.0.difference(&other.0).cloned().collect())
    }

    /// The union of both sets.
    pub fn union(&self, other: &Scopes) -> Scopes {
        Scopes(self.0.union(&other.0).cloned().collect())
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The number of scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The scopes in sorted order.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }
}

/// The scopes a text names: split on whitespace and commas, empty pieces dropped. Every way
/// into a [`Scopes`] goes through here, so that no scope holds a separator and the displayed
/// form parses back to the same set.
fn split_scopes(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
}

/// Each item may itself hold several scopes (`["a b", "c"]` is `{a, b, c}`): a scope never
/// contains a separator.
impl<'a> FromIterator<&'a str> for Scopes {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        Scopes(
            iter.into_iter()
                .flat_map(split_scopes)
                .map(String::from)
                .collect(),
        )
    }
}

impl FromStr for Scopes {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Scopes::parse(s))
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for s in &self.0 {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(s)?;
            first = false;
        }
        Ok(())
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scopes({:?})", self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_follow_the_alias_rule() {
        for ok in ["google", "ms-entra", "a", "0x", "a.b_c-d", &"a".repeat(64)] {
            assert!(ProviderId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Google", "-x", ".x", "a/b", "a b", "é", &"a".repeat(65)] {
            let err = ProviderId::new(bad).unwrap_err();
            assert_eq!(err.kind, "provider id");
        }
    }

    #[test]
    fn subjects_and_realms_are_opaque_but_bounded() {
        assert!(Subject::new("00u1ab2c3d@example.com|x").is_ok());
        assert!(Subject::new("").is_err());
        assert!(Subject::new("a\nb").is_err());
        assert!(Subject::new("x".repeat(256)).is_err());
        assert!(Realm::new("master").is_ok());
        assert!(Realm::new("x/y").is_err());
    }

    #[test]
    fn ids_deserialize_with_validation() {
        assert!(serde_json::from_str::<ProviderId>("\"google\"").is_ok());
        assert!(serde_json::from_str::<ProviderId>("\"GOOGLE\"").is_err());
    }

    #[test]
    fn scopes_normalise() {
        let s = Scopes::parse("  b a,c  a\tb ");
        assert_eq!(s.to_string(), "a b c");
        assert_eq!(s.len(), 3);
        assert!(Scopes::parse("").is_empty());
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "\"a b c\"");
        assert_eq!(
            serde_json::from_str::<Scopes>("[\"c\",\"a\",\"a\"]")
                .unwrap()
                .to_string(),
            "a c"
        );
        assert_eq!(
            Scopes::parse("a b c")
                .difference(&Scopes::parse("b"))
                .to_string(),
            "a c"
        );
    }

    /// Found by `tests/properties.rs` (`scopes_survive_storage`, shrunk to `["a য়"]`): a
    /// list item holding a separator became one scope whose displayed form parsed back as
    /// two, so a stored set changed on reload.
    #[test]
    fn scopes_never_hold_a_separator() {
        let from_list = serde_json::from_str::<Scopes>(r#"["b a", "c,d", " e "]"#).unwrap();
        assert_eq!(from_list.len(), 5);
        assert_eq!(Scopes::parse(&from_list.to_string()), from_list);
        let mut s = Scopes::new();
        s.insert("x y,z");
        s.insert(" ");
        assert_eq!(s.to_string(), "x y z");
        let json = serde_json::to_string(&from_list).unwrap();
        assert_eq!(serde_json::from_str::<Scopes>(&json).unwrap(), from_list);
    }
}
