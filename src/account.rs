//! Whose tokens a link holds: the account at the upstream provider.

use std::fmt;

use crate::secret::Secret;

/// The account at the upstream provider that a link's tokens belong to.
///
/// Recorded when the link is made: from the verified ID token for OpenID Connect providers
/// (`iss`, `sub`, and Microsoft's `tid`), from a provider's account endpoint for plain OAuth 2.0
/// providers that have one (GitHub's `/user` `id`), or not at all when the provider cannot say.
/// A re-link with the **same** account merges into the link; with **another** account it
/// replaces the link, so two accounts' tokens never share one.
///
/// `Debug` leaves the e-mail address out (personal data in logs); [`email`](Self::email) has it
/// for the host's own display ("linked as alice@example.com").
///
/// ```
/// use tokenbroker::UpstreamAccount;
///
/// let a = UpstreamAccount::new(Some("https://accounts.google.com".into()), "1087");
/// let b = UpstreamAccount::new(Some("https://accounts.google.com".into()), "2213");
/// assert!(a.is_same_account(&a.clone().with_email("alice@example.com")));
/// assert!(!a.is_same_account(&b));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct UpstreamAccount {
    /// The provider's issuer (`iss`), when it has one.
    pub issuer: Option<String>,
    /// The account's stable id at the provider (`sub`, or an OAuth 2.0 provider's user id).
    pub subject: String,
    /// Microsoft's tenant (`tid`), when present.
    pub tenant_id: Option<String>,
    /// The account's e-mail address, when the provider said (for display only: it may change
    /// and is never used to tell accounts apart).
    pub email: Option<String>,
}

impl UpstreamAccount {
    /// An account with an issuer (or none) and a subject.
    pub fn new(issuer: Option<String>, subject: impl Into<String>) -> Self {
        UpstreamAccount {
            issuer,
            subject: subject.into(),
            tenant_id: None,
            email: None,
        }
    }

    /// Sets the tenant.
    pub fn with_tenant_id(mut self, tenant_id: impl Into<String>) -> Self {
        self.tenant_id = Some(tenant_id.into());
        self
    }

    /// Sets the e-mail address.
    pub fn with_email(mut self, email: impl Into<String>) -> Self {
        self.email = Some(email.into());
        self
    }

    /// The e-mail address, if known.
    pub fn email(&self) -> Option<&str> {
        self.email.as_deref()
    }

    /// Whether `other` is the same account: the same subject at the same issuer (OpenID Connect
    /// Core §2: `sub` is unique only within an `iss`) and tenant. Issuers and tenants are
    /// compared only when both sides know them; the e-mail address never counts.
    pub fn is_same_account(&self, other: &UpstreamAccount) -> bool {
        fn agree(a: &Option<String>, b: &Option<String>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
        }
        self.subject == other.subject
            && agree(&self.issuer, &other.issuer)
            && agree(&self.tenant_id, &other.tenant_id)
    }
}

impl fmt::Debug for UpstreamAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAccount")
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("tenant_id", &self.tenant_id)
            .field("email", &self.email.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl fmt::Display for UpstreamAccount {
    /// `subject@issuer` (or the subject alone), never the e-mail address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.issuer {
            Some(issuer) => write!(f, "{}@{issuer}", self.subject),
            None => f.write_str(&self.subject),
        }
    }
}

/// The account an ID token names, read without verifying it again: for ID tokens that were
/// verified when they were stored.
pub(crate) fn account_in_id_token(raw: &Secret) -> Option<UpstreamAccount> {
    use base64::Engine as _;
    let claims = raw.expose_secret().split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    let text = |name: &str| claims.get(name)?.as_str().map(str::to_owned);
    let mut account = UpstreamAccount::new(text("iss"), text("sub")?);
    account.tenant_id = text("tid");
    account.email = text("email");
    Some(account)
}
