//! Time, behind a trait so tests can move it.
//!
//! Every decision about token expiry, lease expiry and login expiry asks a [`Clock`]. Tests use
//! `testing::ManualClock` and move time forward instead of sleeping.

use std::fmt::Debug;
use std::sync::Arc;

use time::OffsetDateTime;

/// A source of the current time.
pub trait Clock: Debug + Send + Sync + 'static {
    /// The current time, in UTC.
    fn now(&self) -> OffsetDateTime;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> OffsetDateTime {
        (**self).now()
    }
}

/// A shared clock handle, as the broker and stores keep it.
pub type SharedClock = Arc<dyn Clock>;

/// The system clock as a shared handle.
pub(crate) fn system() -> SharedClock {
    Arc::new(SystemClock)
}
