//! Who may read which link: [`Caller`], [`RoleChecker`] and the Keycloak-style default.
//!
//! The host authenticates its own callers (its bearer tokens, its sessions) and describes the
//! result as a [`Caller`]. The broker asks a [`RoleChecker`] before it loads anything, so a
//! denied caller cannot tell a missing link from a forbidden one.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::ids::{Realm, Scopes, Subject, TokenKey};

/// Keycloak's role name for reading stored tokens (a client role of the `broker` client).
pub const READ_TOKEN_ROLE: &str = "read-token";

/// The identity behind a retrieval request, as the host authenticated it.
///
/// ```
/// use tokenbroker::{Caller, Realm, Subject};
///
/// let caller = Caller::new(Realm::new("acme")?, Subject::new("user-1")?, "web-app")
///     .with_role("read-token");
/// assert!(caller.has_role("read-token"));
/// // Fails closed: the client's scope admits no role until the authenticator says so.
/// assert!(!caller.has_effective_role("read-token"));
/// let caller = caller.with_client_scope_roles(["read-token"]);
/// assert!(caller.has_effective_role("read-token"));
/// # Ok::<(), tokenbroker::InvalidId>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Caller {
    /// The realm the caller authenticated in.
    pub realm: Realm,
    /// The user the caller acts for.
    pub subject: Subject,
    /// The client (application) that made the call.
    pub client_id: String,
    /// The roles the user holds.
    pub roles: BTreeSet<String>,
    /// The roles the calling client's scope admits; `None` means the client has full scope
    /// (Keycloak's "Full scope allowed"). [`Caller::new`] starts with an empty set, so a
    /// caller holds no client-scoped role until the authenticator says which ones the client
    /// may use ([`with_client_scope_roles`](Self::with_client_scope_roles)) or that it has
    /// full scope ([`with_full_client_scope`](Self::with_full_client_scope)).
    pub client_scope_roles: Option<BTreeSet<String>>,
    /// The OAuth scopes of the caller's own access token.
    pub scopes: Scopes,
}

impl Caller {
    /// A caller with no roles, a client scope that admits no role, and no scopes.
    ///
    /// Fails closed: roles added with [`with_role`](Self::with_role) are not effective until
    /// the client's scope admits them, with
    /// [`with_client_scope_roles`](Self::with_client_scope_roles) (the roles in the caller's
    /// token, for a Keycloak token) or [`with_full_client_scope`](Self::with_full_client_scope).
    pub fn new(realm: Realm, subject: Subject, client_id: impl Into<String>) -> Self {
        Caller {
            realm,
            subject,
            client_id: client_id.into(),
            roles: BTreeSet::new(),
            client_scope_roles: Some(BTreeSet::new()),
            scopes: Scopes::new(),
        }
    }
    /// Lets the calling client use every role the user holds (Keycloak's "Full scope
    /// allowed"). Only for clients the host trusts with all of the user's roles.
    pub fn with_full_client_scope(mut self) -> Self {
        self.client_scope_roles = None;
        self
    }
    /// Adds a role the user holds.
    pub fn with_role(mut self, role: impl Into<String>) -> Self {
        self.roles.insert(role.into());
        self
    }
    /// Restricts the roles the calling client may use to `roles`.
    pub fn with_client_scope_roles<I: IntoIterator<Item = S>, S: Into<String>>(
        mut self,
        roles: I,
    ) -> Self {
        self.client_scope_roles = Some(roles.into_iter().map(Into::into).collect());
        self
    }
    /// Sets the caller's OAuth scopes.
    pub fn with_scopes(mut self, scopes: Scopes) -> Self {
        self.scopes = scopes;
        self
    }
    /// Whether the user holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains(role)
    }
    /// Whether the user holds `role` and the client's scope admits it (the role appears in
    /// the caller's token).
    pub fn has_effective_role(&self, role: &str) -> bool {
        self.has_role(role)
            && self
                .client_scope_roles
                .as_ref()
                .is_none_or(|allowed| allowed.contains(role))
    }
}

/// Why a read was denied. Goes to events and logs, never to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// The caller's realm is not the link's.
    OtherRealm,
    /// The caller asked for another user's link without the admin scope.
    NotOwner,
    /// The user lacks the read role.
    MissingRole,
    /// The user has the role but the calling client's scope does not admit it.
    RoleNotInClientScope,
    /// The provider's tokens are not readable (e.g. `store_tokens` is off).
    ProviderNotReadable,
    /// The client is not allowed this provider.
    ClientNotAllowed,
    /// A host-specific reason.
    Other(String),
}

/// A checker's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// The caller may read the link.
    Allow,
    /// The caller may not.
    Deny(DenyReason),
}

/// Deciding failed (e.g. the host's role database was unreachable). Not a denial.
#[derive(Debug, Clone, thiserror::Error)]
#[error("authorization check failed")]
pub struct AccessError {
    #[source]
    source: Option<BoxError>,
}

impl AccessError {
    /// An error caused by `source`.
    pub fn new(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        AccessError {
            source: Some(Arc::new(source)),
        }
    }
}

/// Decides who may read which link (one required method, as axum-login's `AuthzBackend`).
///
/// # Contract
/// - `decide` must not load tokens and must not reveal whether a link exists.
/// - The broker calls it before every retrieval and treats `Err` as a failure, never as allow.
#[async_trait]
pub trait RoleChecker: Debug + Send + Sync + 'static {
    /// Whether `caller` may read the link `target`.
    async fn decide(&self, caller: &Caller, target: &TokenKey) -> Result<Decision, AccessError>;
}

/// The default checker, with Keycloak's semantics.
///
/// - The caller and the link must be in the same realm.
/// - A caller reads its own links when the user holds the read role (`read-token` by default)
///   **and** the calling client's scope admits it.
/// - A caller whose token carries the admin scope (off by default; e.g.
///   `read:user_idp_tokens`) may read any link of its realm.
///
/// ```
/// use tokenbroker::KeycloakRoles;
/// let checker = KeycloakRoles::new().with_admin_scope("read:user_idp_tokens");
/// ```
#[derive(Debug, Clone)]
pub struct KeycloakRoles {
    role: String,
    admin_scope: Option<String>,
}

impl Default for KeycloakRoles {
    fn default() -> Self {
        KeycloakRoles::new()
    }
}

impl KeycloakRoles {
    /// Requires [`READ_TOKEN_ROLE`]; no admin scope.
    pub fn new() -> Self {
        KeycloakRoles {
            role: READ_TOKEN_ROLE.into(),
            admin_scope: None,
        }
    }
    /// Requires another role name.
    pub fn with_role(mut self, role: impl Into<String>) -> Self {
        self.role = role.into();
        self
    }
    /// Lets callers with this OAuth scope read any user's links in their realm.
    pub fn with_admin_scope(mut self, scope: impl Into<String>) -> Self {
        self.admin_scope = Some(scope.into());
        self
    }
    /// The synchronous decision (the checker needs no I/O).
    pub fn check(&self, caller: &Caller, target: &TokenKey) -> Decision {
        if caller.realm != target.realm {
            return Decision::Deny(DenyReason::OtherRealm);
        }
        if self
            .admin_scope
            .as_deref()
            .is_some_and(|s| caller.scopes.contains(s))
        {
            return Decision::Allow;
        }
        if caller.subject != target.subject {
            return Decision::Deny(DenyReason::NotOwner);
        }
        if !caller.has_role(&self.role) {
            return Decision::Deny(DenyReason::MissingRole);
        }
        if !caller.has_effective_role(&self.role) {
            return Decision::Deny(DenyReason::RoleNotInClientScope);
        }
        Decision::Allow
    }
}

#[async_trait]
impl RoleChecker for KeycloakRoles {
    async fn decide(&self, caller: &Caller, target: &TokenKey) -> Result<Decision, AccessError> {
        Ok(self.check(caller, target))
    }
}

/// Keycloak's V2 model: each client is allowed a list of providers, and a caller reads its
/// own links through a client only for the providers that client is allowed. No role is
/// involved.
///
/// ```
/// use tokenbroker::access::ClientAllowList;
/// use tokenbroker::ProviderId;
///
/// let checker = ClientAllowList::new()
///     .allow("reporting-service", [ProviderId::new("google")?, ProviderId::new("github")?]);
/// # Ok::<(), tokenbroker::InvalidId>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientAllowList {
    allowed: std::collections::HashMap<String, BTreeSet<crate::ids::ProviderId>>,
}

impl ClientAllowList {
    /// An empty list: every read is denied.
    pub fn new() -> Self {
        ClientAllowList::default()
    }

    /// Allows `client_id` the given providers (added to any it already has).
    pub fn allow(
        mut self,
        client_id: impl Into<String>,
        providers: impl IntoIterator<Item = crate::ids::ProviderId>,
    ) -> Self {
        self.allowed
            .entry(client_id.into())
            .or_default()
            .extend(providers);
        self
    }

    /// The synchronous decision.
    pub fn check(&self, caller: &Caller, target: &TokenKey) -> Decision {
        if caller.realm != target.realm {
            return Decision::Deny(DenyReason::OtherRealm);
        }
        if caller.subject != target.subject {
            return Decision::Deny(DenyReason::NotOwner);
        }
        match self.allowed.get(&caller.client_id) {
            Some(providers) if providers.contains(&target.provider) => Decision::Allow,
            _ => Decision::Deny(DenyReason::ClientNotAllowed),
        }
    }
}

#[async_trait]
impl RoleChecker for ClientAllowList {
    async fn decide(&self, caller: &Caller, target: &TokenKey) -> Result<Decision, AccessError> {
        Ok(self.check(caller, target))
    }
}

/// Per-provider storage and exposure settings (Keycloak's "Store tokens" and "Stored tokens
/// readable").
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProviderPolicy {
    /// Keep the provider's tokens after login (Keycloak `storeToken`). When off, login still
    /// works but nothing is stored and nothing can be read. Default: on.
    pub store_tokens: bool,
    /// Grant the read role to a user the first time they link this provider, through the
    /// broker's [`RoleGrantHook`] (Keycloak `addReadTokenRoleOnCreate`). Default: off.
    pub stored_tokens_readable: bool,
    /// Let the refresh token leave the broker in retrieval responses and in the
    /// [`TokenView`](crate::TokenView) a read returns. Default: never.
    pub expose_refresh_token: bool,
    /// Let the ID token leave the broker in retrieval responses and reads. Default: yes, as
    /// Keycloak returns it.
    pub expose_id_token: bool,
    /// How long the provider keeps an unused refresh token alive, if it says: a
    /// [`sweep`](crate::TokenBroker::sweep) refreshes links not written for this long
    /// (Google apps in testing mode: about 7 days; Microsoft: 90 days). Default: none.
    pub idle_limit: Option<std::time::Duration>,
    /// Which kind of link a login creates. Default: [`LinkKind::Offline`].
    pub link_kind: LinkKind,
    /// The audiences a narrowed read may ask a token for (`aud:<client>` scopes of
    /// [`TokenBroker::retrieve_narrowed`](crate::TokenBroker::retrieve_narrowed)). A grant's
    /// scope list says nothing about audiences, so the host decides. Default: none, so every
    /// `aud:` request is refused with [`Error::AudienceNotAllowed`](crate::Error::AudienceNotAllowed).
    pub allowed_audiences: Vec<String>,
}

/// The two uses of a stored grant, from Keycloak's design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LinkKind {
    /// Offline access: the link belongs to the user and survives their login sessions.
    #[default]
    Offline,
    /// Authentication: the link belongs to one login session of the host (pass
    /// [`LoginOptions::with_session`](crate::LoginOptions::with_session)), is read back for that
    /// session first ([`TokenBroker::retrieve_in_session`](crate::TokenBroker::retrieve_in_session)),
    /// and is removed by [`TokenBroker::end_session`](crate::TokenBroker::end_session).
    SessionBound,
}

impl Default for ProviderPolicy {
    fn default() -> Self {
        ProviderPolicy {
            store_tokens: true,
            stored_tokens_readable: false,
            expose_refresh_token: false,
            expose_id_token: true,
            idle_limit: None,
            link_kind: LinkKind::Offline,
            allowed_audiences: Vec::new(),
        }
    }
}

impl ProviderPolicy {
    /// Sets `store_tokens`.
    pub fn store_tokens(mut self, on: bool) -> Self {
        self.store_tokens = on;
        self
    }
    /// Sets `stored_tokens_readable`.
    pub fn stored_tokens_readable(mut self, on: bool) -> Self {
        self.stored_tokens_readable = on;
        self
    }
    /// Sets `expose_refresh_token`.
    pub fn expose_refresh_token(mut self, on: bool) -> Self {
        self.expose_refresh_token = on;
        self
    }
    /// Sets `expose_id_token`.
    pub fn expose_id_token(mut self, on: bool) -> Self {
        self.expose_id_token = on;
        self
    }
    /// Sets the kind of link a login creates.
    pub fn link_kind(mut self, kind: LinkKind) -> Self {
        self.link_kind = kind;
        self
    }
    /// Sets `idle_limit`; pick a value comfortably below the provider's.
    pub fn idle_limit(mut self, limit: std::time::Duration) -> Self {
        self.idle_limit = Some(limit);
        self
    }
    /// Lets narrowed reads ask for a token for `audience` (`aud:<audience>`).
    ///
    /// ```
    /// use tokenbroker::ProviderPolicy;
    /// let policy = ProviderPolicy::default().allow_audience("billing-api");
    /// assert!(policy.allows_audience("billing-api"));
    /// assert!(!policy.allows_audience("admin-api"));
    /// ```
    pub fn allow_audience(mut self, audience: impl Into<String>) -> Self {
        self.allowed_audiences.push(audience.into());
        self
    }
    /// Whether narrowed reads may ask for a token for `audience`.
    pub fn allows_audience(&self, audience: &str) -> bool {
        self.allowed_audiences.iter().any(|a| a == audience)
    }
}

/// Grants the read role to a user when they first link a provider whose policy has
/// `stored_tokens_readable` (the host owns its users' roles, so the broker asks it).
#[async_trait]
pub trait RoleGrantHook: Debug + Send + Sync + 'static {
    /// Grants `role` to `subject` in `realm`. Called once per first link.
    async fn grant_role(
        &self,
        realm: &Realm,
        subject: &Subject,
        role: &str,
    ) -> Result<(), AccessError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(realm: &str, subject: &str) -> TokenKey {
        TokenKey::parse(realm, subject, "google").unwrap()
    }

    fn caller(subject: &str) -> Caller {
        Caller::new(
            Realm::new("acme").unwrap(),
            Subject::new(subject).unwrap(),
            "app",
        )
        .with_full_client_scope()
    }

    #[test]
    fn client_allow_list() {
        let c =
            ClientAllowList::new().allow("svc", [crate::ids::ProviderId::new("google").unwrap()]);
        let own = key("acme", "alice");
        let svc = Caller::new(
            Realm::new("acme").unwrap(),
            Subject::new("alice").unwrap(),
            "svc",
        );
        assert_eq!(c.check(&svc, &own), Decision::Allow);
        let other_client = Caller {
            client_id: "web".into(),
            ..svc.clone()
        };
        assert_eq!(
            c.check(&other_client, &own),
            Decision::Deny(DenyReason::ClientNotAllowed)
        );
        assert_eq!(
            c.check(&svc, &key("acme", "bob")),
            Decision::Deny(DenyReason::NotOwner)
        );
        let github = TokenKey::parse("acme", "alice", "github").unwrap();
        assert_eq!(
            c.check(&svc, &github),
            Decision::Deny(DenyReason::ClientNotAllowed)
        );
    }

    #[test]
    fn keycloak_matrix() {
        let c = KeycloakRoles::new().with_admin_scope("read:user_idp_tokens");
        let own = key("acme", "alice");
        assert_eq!(
            c.check(&caller("alice").with_role(READ_TOKEN_ROLE), &own),
            Decision::Allow
        );
        assert_eq!(
            c.check(&caller("alice"), &own),
            Decision::Deny(DenyReason::MissingRole)
        );
        assert_eq!(
            c.check(
                &caller("alice")
                    .with_role(READ_TOKEN_ROLE)
                    .with_client_scope_roles(["other"]),
                &own
            ),
            Decision::Deny(DenyReason::RoleNotInClientScope)
        );
        assert_eq!(
            c.check(&caller("bob").with_role(READ_TOKEN_ROLE), &own),
            Decision::Deny(DenyReason::NotOwner)
        );
        // Caller::new fails closed: a role is not effective until the client's scope admits it.
        let unscoped = Caller::new(
            Realm::new("acme").unwrap(),
            Subject::new("alice").unwrap(),
            "app",
        )
        .with_role(READ_TOKEN_ROLE);
        assert_eq!(
            c.check(&unscoped, &own),
            Decision::Deny(DenyReason::RoleNotInClientScope)
        );
        let admin = caller("bob").with_scopes(Scopes::parse("read:user_idp_tokens"));
        assert_eq!(c.check(&admin, &own), Decision::Allow);
        assert_eq!(
            c.check(&admin, &key("other", "alice")),
            Decision::Deny(DenyReason::OtherRealm)
        );
    }
}
