//! Time as stores see it.
//!
//! Stores take their notion of "now" from a [`Clock`] instead of the system
//! time directly, so a test can move time past a TTL or a lease without
//! sleeping. Times are Unix milliseconds: every backend can store them as a
//! plain integer and compare them inside a query or script.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in Unix milliseconds.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, millis)
    }
}

/// A clock that only moves when told to. Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use idempotent_core::clock::{Clock, ManualClock};
///
/// let clock = ManualClock::new(1_000);
/// clock.advance(Duration::from_secs(2));
/// assert_eq!(clock.now_millis(), 3_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock that reads `start_millis` until advanced.
    #[must_use]
    pub fn new(start_millis: u64) -> Self {
        Self {
            now: Arc::new(AtomicU64::new(start_millis)),
        }
    }

    /// A clock starting at the current system time.
    #[must_use]
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now_millis())
    }

    /// Moves the clock forward by `by`, stopping at the end of time
    /// rather than wrapping round to its start.
    pub fn advance(&self, by: Duration) {
        let by = millis(by);
        // The closure always returns `Some`, so this cannot fail.
        let _ = self
            .now
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(by))
            });
    }

    /// Sets the clock to `millis` since the Unix epoch.
    pub fn set(&self, millis: u64) {
        self.now.store(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

/// A shared, type-erased clock.
pub type SharedClock = Arc<dyn Clock>;

/// Whole milliseconds in `duration`, saturating at `u64::MAX`.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_stops_at_the_end_of_time() {
        let clock = ManualClock::new(1_000);
        clock.advance(Duration::from_millis(500));
        assert_eq!(clock.now_millis(), 1_500);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now_millis(), u64::MAX, "it wrapped round");
    }
}
