//! An [axum] adapter for [`tokenbroker`]: the Keycloak-shaped broker routes, caller
//! authentication, and pending logins kept in the host's `tower-sessions` session.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tokenbroker::{KeycloakRoles, MemoryStore, Realm, TokenBroker};
//! use tokenbroker_axum::{JwtAuthenticator, broker_router};
//!
//! # async fn run(broker: TokenBroker) -> Result<(), Box<dyn std::error::Error>> {
//! // Callers present the host's own (Keycloak) access tokens, verified against its JWKS.
//! let auth = JwtAuthenticator::builder("https://sso.example.com/realms/acme", "broker")
//!     .jwks_url("https://sso.example.com/realms/acme/protocol/openid-connect/certs".parse()?)
//!     .realm(Realm::new("acme")?)
//!     .client_roles_of("broker")
//!     .build()?;
//! let app = axum::Router::new().nest(
//!     "/auth",
//!     broker_router(broker, auth).build(tower_sessions::MemoryStore::default()),
//! );
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! The pieces: [`broker_router`] (the routes), [`CallerAuthenticator`] and
//! [`JwtAuthenticator`] (who is calling), [`AuthenticatedCaller`] (the caller in the host's own
//! handlers) and [`Answer`] (the core's [`BrokerResponse`](tokenbroker::BrokerResponse) as an
//! axum response). The HTTP logic itself is the core's
//! [`tokenbroker::endpoints`]; this crate only moves bytes, cookies and sessions.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod answer;
pub mod auth;
mod extract;
mod pending;
mod router;

pub use answer::Answer;
pub use auth::{CallerAuthenticator, JwtAuthenticator, Unauthenticated};
pub use extract::{AuthenticatedCaller, Authenticator};
pub use router::{BrokerRouterBuilder, DEFAULT_COOKIE_NAME, broker_router};

/// The README's code blocks, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
