//! The commit clock: the worker's own commits as proofs of durability.

use crate::worker::phases::micros_since;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// When the worker's own write commits happened, as a proof of durability for commits it saw
/// earlier (see `Backend::fence`): the latest moment after which some write of the worker's
/// began that has since committed. Times are microseconds since the clock was made.
#[derive(Debug)]
pub(crate) struct CommitClock {
    origin: Instant,
    proven: std::sync::atomic::AtomicU64,
}

impl CommitClock {
    pub(crate) fn new() -> CommitClock {
        CommitClock {
            origin: Instant::now(),
            proven: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Now, on this clock.
    pub(crate) fn now(&self) -> u64 {
        micros_since(self.origin)
    }

    /// A transaction whose first write came after `began` (a reading of [`now`](Self::now))
    /// has committed: every commit seen before `began` is durable.
    pub(crate) fn committed(&self, began: u64) {
        self.proven.fetch_max(began, Ordering::SeqCst);
    }

    /// Whether a commit seen at `seen` is proven durable.
    pub(crate) fn proves(&self, seen: u64) -> bool {
        self.proven.load(Ordering::SeqCst) > seen
    }
}
