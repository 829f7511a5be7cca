//! The reaper: deletes barrier rows that no job can consume any more.

use crate::backend::BarrierConnection;
use crate::error::Result;
use std::time::Duration;

/// How many rows one batch deletes at most.
const BATCH: i64 = 1000;

/// Deletes barrier rows created more than `older_than` ago — rows whose job can no longer
/// consume them (it gave up, was lost, or died in Faktory's dead set) — and logs each one.
/// Returns how many it deleted.
///
/// Workers call it periodically (see
/// [`WorkerBuilder::reap_interval`](crate::WorkerBuilder::reap_interval)). `older_than` must
/// exceed the longest time a committed job may still run, or the job will be treated as
/// aborted when it finally does.
pub fn reap_barriers<C: BarrierConnection>(conn: &mut C, older_than: Duration) -> Result<usize> {
    let mut total = 0;
    // In batches, each in a short transaction of its own: a table with a backlog of old rows
    // never holds locks on all of them at once.
    loop {
        let reaped = conn.reap(older_than, BATCH)?;
        for r in &reaped {
            tracing::warn!(barrier_id = %r.id, jid = %r.job_id, kind = %r.job_kind, ?older_than, "reaped a barrier that was never consumed");
        }
        crate::metrics::count(crate::metrics::BARRIERS_REAPED, reaped.len() as u64);
        total += reaped.len();
        if reaped.len() < BATCH as usize {
            return Ok(total);
        }
    }
}
