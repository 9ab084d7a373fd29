//! Helpers for tests, shipped behind the `testing` feature so host apps can use them too.
//!
//! - [`FakeIdp`]: a fake OAuth 2.0 identity provider on a loopback port, spoken to over real
//!   HTTP: rotation, reuse detection, revocation, introspection, counters, fault injection,
//!   signed ID tokens with discovery and JWKS, and Google and Microsoft modes.
//! - [`FakeProvider`]: an in-process provider with a strict IdP's rules, scripted faults and
//!   counters (no HTTP), for fast and deterministic tests of the refresh protocol.
//! - [`ManualClock`]: time that moves only when the test says so.
//! - [`store_conformance`]: the [`TokenStore`](crate::TokenStore) contract as executable
//!   checks, to run on your own store.
//!
//! Not covered by semver: these helpers may gain checks, knobs and fault kinds in minor
//! releases.

mod clock;
pub mod fake_idp;
mod fake_provider;
pub mod store_conformance;

pub use clock::ManualClock;
pub use fake_idp::*;
pub use fake_provider::{FakeCounters, FakeFault, FakeProvider};
