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

/// The worker's counters, shared with its monitors (and recorded through `crate::metrics`).
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) waiting: Arc<AtomicUsize>,
    /// Jobs parked now.
    pub(crate) parked: Arc<AtomicUsize>,
    /// Deliveries parked so far.
    pub(crate) parked_total: Counter,
    pub(crate) running: Arc<AtomicUsize>,
    pub(crate) ran: Counter,
    pub(crate) aborted: Counter,
    pub(crate) duplicates: Counter,
    pub(crate) refused: Counter,
    pub(crate) snoozed: Counter,
    pub(crate) overflowed: Counter,
    pub(crate) timed_out: Counter,
    pub(crate) failed: Counter,
    pub(crate) processed: Counter,
    pub(crate) hearing_hints: Arc<AtomicBool>,
    /// Set while the worker holds a working connection to Faktory.
    pub(crate) connected: AtomicBool,
    /// Set once the worker takes no new job (quiet, or shutting down).
    pub(crate) quiet: AtomicBool,
}

impl Default for Stats {
    fn default() -> Self {
        use crate::metrics::*;
        Stats {
            waiting: Arc::default(),
            parked: Arc::default(),
            parked_total: Counter::new(JOBS_PARKED),
            running: Arc::default(),
            ran: Counter::new(JOBS_RAN),
            aborted: Counter::new(JOBS_ABORTED),
            duplicates: Counter::new(JOBS_DUPLICATE),
            refused: Counter::new(JOBS_REFUSED),
            snoozed: Counter::new(JOBS_SNOOZED),
            overflowed: Counter::new(JOBS_OVERFLOWED),
            timed_out: Counter::new(JOBS_TIMED_OUT),
            failed: Counter::new(JOBS_FAILED),
            processed: Counter::new(JOBS_PROCESSED),
            hearing_hints: Arc::default(),
            connected: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
        }
    }
}

impl Stats {
    /// Adds one to `counter`.
    pub(crate) fn count(counter: &Counter) {
        // The metric first: whoever sees the count has its metric recorded too.
        crate::metrics::count(counter.metric, 1);
        counter.value.fetch_add(1, Ordering::SeqCst);
    }
}

/// One of the worker's counters, and the metric it is recorded as.
#[derive(Debug)]
pub(crate) struct Counter {
    value: AtomicU64,
    metric: &'static str,
}

impl Counter {
    fn new(metric: &'static str) -> Counter {
        Counter {
            value: AtomicU64::new(0),
            metric,
        }
    }

    fn get(&self) -> u64 {
        self.value.load(Ordering::SeqCst)
    }
}

/// Counts one in `gauge` (and in the metric, if any) for as long as it lives.
#[derive(Debug)]
pub(crate) struct Gauge(Arc<AtomicUsize>, Option<&'static str>);

impl Gauge {
    pub(crate) fn up(gauge: &Arc<AtomicUsize>, metric: Option<&'static str>) -> Gauge {
        if let Some(metric) = metric {
            crate::metrics::gauge_add(metric, 1.0);
        }
        gauge.fetch_add(1, Ordering::SeqCst);
        Gauge(Arc::clone(gauge), metric)
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        if let Some(metric) = self.1 {
            crate::metrics::gauge_add(metric, -1.0);
        }
    }
}

/// Reads a [`Worker`](crate::Worker)'s counters; cheap to clone, usable from any thread.
///
/// With the `metrics` feature the worker also records these counts through the `metrics`
/// facade (see [`metrics`](crate::metrics) for the names).
#[derive(Debug, Clone)]
pub struct WorkerMonitor {
    pub(crate) stats: Arc<Stats>,
}

impl WorkerMonitor {
    /// Jobs fetched and now waiting for their transactions: in their fetch slots, or parked.
    pub fn waiting(&self) -> usize {
        self.stats.waiting.load(Ordering::SeqCst) + self.stats.parked.load(Ordering::SeqCst)
    }

    /// Jobs parked now: of a transaction that was still running when they arrived, beyond the
    /// fetch slots it may hold (see [`WorkerBuilder::max_parked`](crate::WorkerBuilder::max_parked));
    /// acknowledged, kept in memory, and pushed back the moment their transaction commits.
    pub fn parked(&self) -> usize {
        self.stats.parked.load(Ordering::SeqCst)
    }

    /// Deliveries parked so far.
    pub fn parked_total(&self) -> u64 {
        self.stats.parked_total.get()
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::SeqCst)
    }

    /// Handlers that ran to success (and consumed their barrier, if any).
    pub fn ran(&self) -> u64 {
        self.stats.ran.get()
    }

    /// Jobs whose transaction did not commit (or whose barrier was already consumed).
    pub fn aborted(&self) -> u64 {
        self.stats.aborted.get()
    }

    /// Deliveries skipped because another delivery of the same job already consumed the
    /// barrier.
    pub fn duplicates(&self) -> u64 {
        self.stats.duplicates.get()
    }

    /// Deliveries refused because they carry the barrier of another job (a descriptor copied
    /// into a job pushed to Faktory): see [`Error::ForeignBarrier`](crate::Error::ForeignBarrier).
    pub fn refused(&self) -> u64 {
        self.stats.refused.get()
    }

    /// Jobs snoozed (pushed again and acknowledged) because they waited too long, too many were
    /// waiting, or the worker was shutting down.
    pub fn snoozed(&self) -> u64 {
        self.stats.snoozed.get()
    }

    /// Deliveries handed back because `max_waiting` jobs already waited for running
    /// transactions (also counted in [`snoozed`](Self::snoozed)).
    pub fn overflowed(&self) -> u64 {
        self.stats.overflowed.get()
    }

    /// Jobs failed with [`Error::BarrierTimeout`](crate::Error::BarrierTimeout).
    pub fn timed_out(&self) -> u64 {
        self.stats.timed_out.get()
    }

    /// Deliveries that ended in a failure reported to Faktory (any error).
    pub fn failed(&self) -> u64 {
        self.stats.failed.get()
    }

    /// Deliveries processed to the end, whatever the outcome.
    pub fn processed(&self) -> u64 {
        self.stats.processed.get()
    }

    /// Whether the waiter learns of commits as they happen: its watchers run (PostgreSQL,
    /// MySQL), or its listening connection listens (SQLite). The waiter starts with the first
    /// job that waits for its transaction. False before that, and with
    /// [`commit_hints`](crate::WorkerBuilder::commit_hints) or
    /// [`commit_watchers`](crate::WorkerBuilder::commit_watchers) off: its jobs are then found
    /// by the periodic checks alone.
    pub fn hears_commit_hints(&self) -> bool {
        self.stats.hearing_hints.load(Ordering::SeqCst)
    }

    /// Whether the worker is connected to Faktory: its last connection succeeded and has not
    /// failed since. A broken connection is noticed at the next fetch (Faktory answers an idle
    /// one every 2 seconds) or heartbeat (every 5 seconds). False before
    /// [`run`](crate::Worker::run), while it reconnects, once it is quiet and has nothing left
    /// to finish, and after it stopped.
    pub fn is_connected(&self) -> bool {
        self.stats.connected.load(Ordering::SeqCst)
    }

    /// Whether the worker takes no new job: it was quieted (SIGTSTP, with
    /// [`handle_signals`](crate::WorkerBuilder::handle_signals)) or a shutdown began. A quiet
    /// from Faktory's web UI is handled inside the `faktory` crate and is not seen here.
    pub fn is_quiet(&self) -> bool {
        self.stats.quiet.load(Ordering::SeqCst)
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
    /// SIGTERM or SIGINT stopped the worker (with
    /// [`handle_signals`](crate::WorkerBuilder::handle_signals)).
    Signal {
        /// The signal; the second one when two came.
        signal: super::Signal,
        /// Whether a second signal, during the drain, stopped the worker at once: the
        /// handlers still running then were failed back to Faktory, which retries them. False
        /// for a graceful stop.
        immediate: bool,
    },
}
