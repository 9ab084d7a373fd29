//! Helpers for tests, shipped behind the `testing` feature so host apps can use them too.
//!
//! - [`FakeProvider`]: an in-process provider with a strict IdP's rules, scripted faults and
//!   counters (no HTTP).
//! - [`ManualClock`]: time that moves only when the test says so.
//!
//! Not covered by semver: these helpers may gain checks and knobs in minor releases.

mod clock;
mod fake_provider;

pub use clock::ManualClock;
pub use fake_provider::{FakeCounters, FakeFault, FakeProvider};
