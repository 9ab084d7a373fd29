//! A clock that moves only when told to.

use std::sync::Mutex;
use std::time::Duration;

use time::OffsetDateTime;

use crate::clock::Clock;

/// A [`Clock`] for tests: it stands still until [`ManualClock::advance`] or
/// [`ManualClock::set`] moves it.
///
/// ```
/// use std::time::Duration;
/// use tokenbroker::Clock;
/// use tokenbroker::testing::ManualClock;
///
/// let clock = ManualClock::new(time::macros::datetime!(2026-01-01 0:00 UTC));
/// clock.advance(Duration::from_secs(3600));
/// assert_eq!(clock.now(), time::macros::datetime!(2026-01-01 1:00 UTC));
/// ```
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        ManualClock {
            now: Mutex::new(start),
        }
    }

    /// A clock showing the current system time (whole seconds), standing still from then on.
    pub fn starting_now() -> Self {
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 is a valid nanosecond");
        ManualClock::new(now)
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Sets the clock.
    pub fn set(&self, to: OffsetDateTime) {
        *self.now.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}
