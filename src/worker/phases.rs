//! Timings in microseconds: when each step of a handler run ended, for the debug event that
//! reports it, and the clock arithmetic they share with the waiter's commit clock.

use std::time::Instant;

/// Microseconds since `origin`, saturating.
pub(crate) fn micros_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// When each step of a handler run ended, in microseconds since its handler slot was taken.
#[derive(Clone, Copy)]
pub(super) struct Phases {
    start: Instant,
    /// A pooled connection was taken.
    pub(super) checked_out: u64,
    /// The worker transaction began and claimed the barrier (or just began).
    pub(super) claimed: u64,
    /// The handler returned.
    pub(super) handled: u64,
    /// The claim was found to still stand.
    pub(super) checked: u64,
    /// The worker transaction committed (or rolled back).
    pub(super) committed: u64,
}

impl Phases {
    pub(super) fn new(start: Instant) -> Phases {
        Phases {
            start,
            checked_out: 0,
            claimed: 0,
            handled: 0,
            checked: 0,
            committed: 0,
        }
    }

    /// Now, in microseconds since the start.
    pub(super) fn since(&self) -> u64 {
        micros_since(self.start)
    }
}

impl std::fmt::Debug for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkout {} µs, begin+claim {} µs, handler {} µs, check {} µs, commit {} µs",
            self.checked_out, self.claimed, self.handled, self.checked, self.committed
        )
    }
}
