//! Keep your users' upstream identity-provider tokens, hand them to callers that may read them,
//! and refresh and rotate them so every caller gets a token that works.
//!
//! A user signs in to your app through Google, Microsoft or any OAuth 2.0 / OpenID Connect
//! provider. `tokenbroker` runs that login, stores the provider's tokens per user
//! ([`TokenStore`]), decides who may read them ([`RoleChecker`], Keycloak's `read-token`
//! semantics by default), and refreshes them on read, with **one** upstream refresh however
//! many readers and instances ask at once (see [`TokenBroker::retrieve`]).
//!
//! # Getting started
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use tokenbroker::testing::FakeProvider;
//! use tokenbroker::{Caller, LoginOptions, MemoryStore, ProviderPolicy, TokenBroker, TokenKey};
//!
//! // An in-process provider stands in for Google here (feature `testing`).
//! let google = Arc::new(FakeProvider::new("google")?);
//! let broker = TokenBroker::builder()
//!     .with_provider(google.clone(), ProviderPolicy::default())
//!     .with_store(Arc::new(MemoryStore::new()))
//!     .build()?;
//!
//! // 1. Link: send the user to the provider, keep `pending` in the session.
//! let key = TokenKey::parse("acme", "alice", "google")?;
//! let start = broker.begin_login(&key, LoginOptions::default()).await?;
//! // ... the browser comes back to your redirect URI with ?code=...&state=...
//! let callback = google.approve(&start.authorization_url, "alice")?;
//! broker.complete_login(start.pending, &callback).await?;
//!
//! // 2. Read: your app authenticated the caller; the broker checks it may read the link.
//! let caller = Caller::new(key.realm.clone(), key.subject.clone(), "my-app")
//!     .with_role("read-token")
//!     .with_client_scope_roles(["read-token"]); // the roles the client's token carries
//! let tokens = broker.retrieve(&caller, &key).await?.tokens;
//! assert!(!tokens.access_token().expose_secret().is_empty());
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `reqwest` | yes | [`http::ReqwestClient`], the default HTTP transport (rustls, no redirects, time-outs) |
//! | `testing` | no | `testing`: `FakeProvider`, a loopback fake IdP, `ManualClock`, the store conformance suite |
//! | `sqlite` | no | `SqliteStore`: links in a SQLite file (sqlx, bundled SQLite) |
//! | `postgres` | no | `PostgresStore`: links in PostgreSQL, for several instances (sqlx) |
//! | `redis` | no | `RedisStore`: links in Redis, for several instances (redis-rs `ConnectionManager`, Lua scripts) |
//! | `encryption` | no | `store::EncryptedStore`: envelope encryption of payloads at rest (XChaCha20-Poly1305), with key rotation |
//!
//! # Implementing a `TokenStore`
//!
//! Implement the fourteen methods of [`TokenStore`] following its `# Contract` (versions
//! assigned by the store, compare-and-swap on the version, an atomic refresh lease fenced by a
//! token per acquisition, a revocation outbox written atomically with deletes), then run the
//! conformance suite from the `testing` feature against it. The [`store`] module docs show a
//! complete minimal store.
//!
//! # Security
//!
//! - Tokens, client secrets, codes, PKCE verifiers and states are [`Secret`]s: no `Debug`
//!   output, no `Display`, no error message and no log line contains one
//!   (`tests/redaction.rs` checks every path).
//! - Stores receive the token set as an opaque [`Payload`], which is **plain text** unless
//!   the store is wrapped in an `EncryptedStore` (feature
//!   `encryption`).
//! - Authorization runs before any load, and a denied caller gets the same answer whether or
//!   not the link exists.
//! - A refresh token is presented to the provider at most once across all instances sharing
//!   a store, with one exception no client can avoid: when a refresh request times out, the
//!   broker cannot know whether the provider consumed the token. With a provider that rejects
//!   reuse, the next refresh may then get `invalid_grant` and the link asks for a re-link.
//! - The refresh token never leaves the broker unless a provider's [`ProviderPolicy`] says so.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod access;
mod account;
mod broker;
mod clock;
pub mod endpoints;
pub mod error;
pub mod events;
pub mod http;
mod ids;
pub mod provider;
mod secret;
pub mod store;
pub mod telemetry;
mod token;

/// The [`url`] crate (version 2), whose [`Url`](::url::Url) every endpoint and redirect
/// URI of the public API is. The `http` crate is re-exported as [`http::types`], since
/// [`http`] is this crate's HTTP seam.
#[doc(no_inline)]
pub use ::url;
pub use access::{
    AccessError, Caller, Decision, DenyReason, KeycloakRoles, LinkKind, ProviderPolicy,
    RoleChecker, RoleGrantHook,
};
pub use account::UpstreamAccount;
pub use broker::{
    Callback, DrainOptions, DrainReport, GrantStatus, LEASE_MARGIN, LinkOutcome, LoginOptions,
    LoginStart, PendingLogin, ReplacedAccount, RetrievedTokens, ShutdownReport, SweepOptions,
    SweepReport, TokenBroker, TokenBrokerBuilder, TokenView, UnlinkOutcome,
};
pub use clock::{Clock, SharedClock, SystemClock};
pub use endpoints::{ACCESS_TOKEN_TYPE, BrokerResponse, TOKEN_EXCHANGE_GRANT};
pub use error::{Error, Result};
pub use events::{BrokerEvent, EventSink, RevocationStatus};
pub use ids::{InvalidId, ProviderId, Realm, Scopes, Subject, TokenKey};
pub use provider::{Provider, ProviderError};
pub use secret::Secret;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub use store::PostgresStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use store::RedisStore;
#[cfg(feature = "sqlite")]
#[cfg_attr(docsrs, doc(cfg(feature = "sqlite")))]
pub use store::SqliteStore;
#[cfg(feature = "encryption")]
#[cfg_attr(docsrs, doc(cfg(feature = "encryption")))]
pub use store::{EncryptedStore, KeyProvider, StaticKeyring};
pub use store::{MemoryStore, StoreError, TokenStore};
pub use token::{DecodeError, Payload, ProviderTokens, TokenSet};

#[cfg(any(test, feature = "testing"))]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
