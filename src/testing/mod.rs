//! Test helpers for host apps and for tokenbroker's own tests.
//!
//! Compiled for this crate's unit tests and, for host apps, behind the `testing` feature.
//! Not covered by semver: helpers may gain checks, knobs and fault kinds in minor releases.
//!
//! - [`FakeIdp`]: an in-process fake OAuth 2.0 identity provider on a loopback port, with
//!   refresh-token rotation, reuse detection, revocation, introspection, call counters and
//!   fault injection.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(missing_debug_implementations, unreachable_pub)]

pub mod fake_idp;

pub use fake_idp::*;
