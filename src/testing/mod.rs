//! Helpers for tests, shipped behind the `testing` feature so host apps can use them too.
//!
//! Not covered by semver: these helpers may gain checks and knobs in minor releases.

mod clock;

pub use clock::ManualClock;
