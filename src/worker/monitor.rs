//! What the outside sees of a running worker: its counters ([`WorkerMonitor`]), the handle
//! that stops it ([`ShutdownHandle`]) and why it stopped ([`StopReason`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Asks a running [`Worker`](crate::Worker) to stop. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    pub(crate) tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Asks the worker to stop: waiting jobs are handed back to Faktory at once, running
    /// handlers may finish (within the shutdown timeout), and [`Worker::run`](crate::Worker::run)
    /// returns.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}

/// The worker's counters, shared with its monitors.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) waiting: Arc<AtomicUsize>,
    pub(crate) running: Arc<AtomicUsize>,
    pub(crate) ran: AtomicU64,
    pub(crate) aborted: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) snoozed: AtomicU64,
    pub(crate) overflowed: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) hearing_hints: Arc<AtomicBool>,
}

impl Stats {
    /// Adds one to `counter`.
    pub(crate) fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

/// Counts one in `gauge` for as long as it lives.
#[derive(Debug)]
pub(crate) struct Gauge(Arc<AtomicUsize>);

impl Gauge {
    pub(crate) fn up(gauge: &Arc<AtomicUsize>) -> Gauge {
        gauge.fetch_add(1, Ordering::SeqCst);
        Gauge(Arc::clone(gauge))
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads a [`Worker`](crate::Worker)'s counters; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct WorkerMonitor {
    pub(crate) stats: Arc<Stats>,
}

impl WorkerMonitor {
    /// Jobs fetched and now waiting for their transactions.
    pub fn waiting(&self) -> usize {
        self.stats.waiting.load(Ordering::SeqCst)
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::SeqCst)
    }

    /// Handlers that ran to success (and consumed their barrier, if any).
    pub fn ran(&self) -> u64 {
        self.stats.ran.load(Ordering::SeqCst)
    }

    /// Jobs whose transaction did not commit (or whose barrier was already consumed).
    pub fn aborted(&self) -> u64 {
        self.stats.aborted.load(Ordering::SeqCst)
    }

    /// Deliveries skipped because another delivery of the same job already consumed the
    /// barrier.
    pub fn duplicates(&self) -> u64 {
        self.stats.duplicates.load(Ordering::SeqCst)
    }

    /// Jobs snoozed (pushed again and acknowledged) because they waited too long, too many were
    /// waiting, or the worker was shutting down.
    pub fn snoozed(&self) -> u64 {
        self.stats.snoozed.load(Ordering::SeqCst)
    }

    /// Deliveries handed back because `max_waiting` jobs already waited for running
    /// transactions (also counted in [`snoozed`](Self::snoozed)).
    pub fn overflowed(&self) -> u64 {
        self.stats.overflowed.load(Ordering::SeqCst)
    }

    /// Jobs failed with [`Error::BarrierTimeout`](crate::Error::BarrierTimeout).
    pub fn timed_out(&self) -> u64 {
        self.stats.timed_out.load(Ordering::SeqCst)
    }

    /// Deliveries that ended in a failure reported to Faktory (any error).
    pub fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::SeqCst)
    }

    /// Deliveries processed to the end, whatever the outcome.
    pub fn processed(&self) -> u64 {
        self.stats.processed.load(Ordering::SeqCst)
    }

    /// Whether the waiter's listening connection is known to hear commit hints: it heard one
    /// (a commit's, or a test hint of the waiter's own; on SQLite, whose hints need no test,
    /// as soon as it listens). The waiter starts with the first job that waits for its
    /// transaction. False before that, with
    /// [`commit_hints`](crate::WorkerBuilder::commit_hints) off, on MySQL, and once the waiter
    /// gave up on a listener that heard nothing (behind PgBouncer in transaction pooling mode,
    /// say): its jobs are then found by the periodic checks alone.
    pub fn hears_commit_hints(&self) -> bool {
        self.stats.hearing_hints.load(Ordering::SeqCst)
    }
}

/// Why [`Worker::run`](crate::Worker::run) returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// [`ShutdownHandle::shutdown`] was called.
    Shutdown,
    /// Faktory told the worker to terminate.
    ServerInstruction,
}
