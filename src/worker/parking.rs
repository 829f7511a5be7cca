//! Parked jobs: deliveries of a transaction that is still running, which the worker
//! acknowledges and keeps in memory instead of holding them in fetch slots (or handing them
//! back to Faktory over and over). The waiter goes on checking their barriers; once a
//! transaction ends, its parked jobs are released here — pushed back to Faktory, in bulk, when
//! it committed (they then run as soon as they are fetched), dropped as aborted when it did
//! not — or handed back with a growing delay when they were parked past the block limit, or
//! when the worker stops.
//!
//! A parked job exists only in this worker's memory and as its barrier row: were the worker
//! killed, the reconciler pushes the job again once its transaction has committed (its row is
//! then overdue), so the worker parks only while its reconciler runs.

use super::monitor::Stats;
use super::snooze::{growing_delay, SHUTDOWN_HAND_BACK_DELAY};
use crate::producer::Producer;
use crate::repush::{self, SNOOZES_KEY};
use crossbeam_channel::{Receiver, Sender};
use faktory::Job;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why parked jobs are released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    /// Their transaction committed: pushed back at once.
    Committed,
    /// Their transaction did not commit: dropped, counted as aborted.
    NotCommitted,
    /// Parked past the block limit, their transaction still running: handed back with a delay
    /// that grows with each hand-back.
    Aged,
    /// The worker is stopping: handed back, a few seconds ahead.
    ShuttingDown,
}

/// The handle the waiter releases parked jobs through; cheap to clone.
#[derive(Clone)]
pub(crate) struct Releaser {
    tx: Sender<(Vec<Job>, Release)>,
    /// Jobs sent and not released yet (for the shutdown drain).
    pending: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Releaser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Releaser")
            .field("pending", &self.pending.load(Ordering::SeqCst))
            .finish()
    }
}

impl Releaser {
    /// Starts the thread that releases parked jobs.
    pub(crate) fn start(producer: Producer, stats: Arc<Stats>, aged_delay: Duration) -> Releaser {
        let (tx, rx) = crossbeam_channel::unbounded();
        let pending = Arc::new(AtomicUsize::new(0));
        let p = Arc::clone(&pending);
        std::thread::Builder::new()
            .name("dtb-releaser".into())
            .spawn(move || release_loop(&rx, &producer, &stats, aged_delay, &p))
            .expect("spawning the releaser thread");
        Releaser { tx, pending }
    }

    /// Releases `jobs` for `why`.
    pub(crate) fn release(&self, jobs: Vec<Job>, why: Release) {
        if jobs.is_empty() {
            return;
        }
        self.pending.fetch_add(jobs.len(), Ordering::SeqCst);
        let n = jobs.len();
        if self.tx.send((jobs, why)).is_err() {
            self.pending.fetch_sub(n, Ordering::SeqCst);
        }
    }

    /// Jobs sent and not released yet.
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

fn release_loop(
    rx: &Receiver<(Vec<Job>, Release)>,
    producer: &Producer,
    stats: &Stats,
    aged_delay: Duration,
    pending: &AtomicUsize,
) {
    while let Ok((jobs, why)) = rx.recv() {
        let n = jobs.len();
        match why {
            Release::NotCommitted => {
                for job in &jobs {
                    Stats::count(&stats.aborted);
                    tracing::info!(jid = job.id().as_str(), kind = %job.kind, "parked job's transaction did not commit: job aborted");
                }
            }
            Release::Committed | Release::Aged | Release::ShuttingDown => {
                let copies: Vec<Job> = jobs
                    .iter()
                    .filter_map(|job| {
                        let delay = match why {
                            Release::Committed => Duration::ZERO,
                            Release::ShuttingDown => SHUTDOWN_HAND_BACK_DELAY,
                            _ => growing_delay(job, aged_delay),
                        };
                        let value = serde_json::to_value(job).ok()?;
                        repush::copy(value, SNOOZES_KEY, delay, None).map(|c| c.job)
                    })
                    .collect();
                match producer.push_barrier_jobs(copies) {
                    Ok(()) => {
                        for _ in 0..n {
                            Stats::count(&stats.snoozed);
                        }
                        tracing::debug!(jobs = n, reason = ?why, "parked jobs pushed back");
                    }
                    // Their barriers stay: once committed and overdue, the reconciler pushes
                    // them again.
                    Err(e) => {
                        tracing::warn!(jobs = n, reason = ?why, error = %crate::error::chain(&e), "parked jobs could not be pushed back; the reconciler will push them again once their transactions committed and their barriers are overdue");
                    }
                }
            }
        }
        pending.fetch_sub(n, Ordering::SeqCst);
    }
}
