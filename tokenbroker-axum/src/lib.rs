//! An [axum] adapter for [`tokenbroker`]: the Keycloak-shaped broker routes, caller
//! authentication, and pending logins kept in the host's `tower-sessions` session.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;

pub use auth::{CallerAuthenticator, JwtAuthenticator, Unauthenticated};
