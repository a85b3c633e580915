//! Time as stores see it.
//!
//! Stores take their notion of "now" from a [`Clock`] instead of the system
//! time directly, so a test can move time past a TTL or a lease without
//! sleeping. Times are Unix milliseconds: every backend can store them as a
//! plain integer and compare them inside a query or script.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Wall-clock time read once, then advanced by the system's monotonic
/// clock ([`Instant`]): it reads Unix milliseconds, as deadlines must, but
/// a step of the wall clock (an NTP correction, an operator setting the
/// time) does not move it.
///
/// This is [`MemoryStore`](crate::store::MemoryStore)'s default: its
/// deadlines are shared with no other process, so they need not agree with
/// anyone's wall clock, and on the system clock a step forward of the
/// lease left would make a running handler's claim look lapsed, letting a
/// retry run the handler a second time. Stores that share deadlines with
/// other processes (a database) read [`SystemClock`], so that they agree.
///
/// Its reading drifts from the wall clock by every step since it was
/// anchored, and by any time the machine was suspended (the monotonic
/// clock stops meanwhile; records then outlive their TTL by as long).
/// Clones share the anchor.
///
/// ```
/// use idempotent_core::clock::{Clock, MonotonicClock};
///
/// let clock = MonotonicClock::anchored_at(1_000);
/// assert!(clock.now_millis() >= 1_000);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    /// The wall-clock time at `anchor`, in Unix milliseconds.
    anchor_millis: u64,
    anchor: Instant,
}

impl MonotonicClock {
    /// A clock that reads the current system time now, and moves on with
    /// the monotonic clock.
    #[must_use]
    pub fn new() -> Self {
        Self::anchored_at(SystemClock.now_millis())
    }

    /// A clock that reads `millis` now, and moves on with the monotonic
    /// clock.
    #[must_use]
    pub fn anchored_at(millis: u64) -> Self {
        Self {
            anchor_millis: millis,
            anchor: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_millis(&self) -> u64 {
        self.anchor_millis
            .saturating_add(millis(self.anchor.elapsed()))
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

    #[test]
    fn a_monotonic_clock_reads_its_anchor_plus_the_time_since() {
        // An anchor an hour after the epoch, decades from the system time:
        // a clock that read the wall clock would be nowhere near it.
        let anchor = 3_600_000;
        let before = Instant::now();
        let clock = MonotonicClock::anchored_at(anchor);
        let first = clock.now_millis();
        let second = clock.now_millis();
        let since = millis(before.elapsed());
        assert!(
            anchor <= first && first <= second && second <= anchor + since,
            "read {first} then {second}, anchored at {anchor} {since} ms ago"
        );
    }
}
