//! The reconciler: pushes again the jobs of committed barriers that no worker consumed in
//! time — because the broker lost them (a Faktory restart without persistence, a `FLUSH`), or
//! because they still sit in a long backlog. A second copy never runs the handler twice: the
//! barrier row's consumption decides.

use crate::backend::BarrierConnection;
use crate::descriptor::{BarrierRef, Descriptor};
use crate::error::Result;
use crate::producer::Producer;
use crate::repush::{self, REPUSHES_KEY};
use faktory::Job;
use std::time::Duration;

/// How many barriers one round takes at most.
const BATCH: i64 = 500;

/// Pushes again the job of every committed barrier that was last pushed more than `grace` ago,
/// whose handler never ran (neither succeeded nor failed), and that is younger than `max_age`
/// (older ones belong to the reaper). Returns how many jobs it pushed.
///
/// A job merely waiting in a long backlog is pushed again at most once per `grace`; whichever
/// copy is fetched first consumes the barrier, the others are skipped as duplicates. Workers
/// call this periodically (see
/// [`WorkerBuilder::reconcile_grace`](crate::WorkerBuilder::reconcile_grace)).
pub fn reconcile_barriers<C: BarrierConnection>(
    conn: &mut C,
    producer: &Producer,
    grace: Duration,
    max_age: Duration,
) -> Result<usize> {
    // The copies name the table they were read from, as the producer's originals do.
    let location = conn.barrier_location()?;
    let mut pushed = 0;
    loop {
        let (taken, n) = C::worker_transaction(conn, |c| -> Result<(usize, usize)> {
            let rows = c.take_unconsumed(grace, max_age, BATCH)?;
            let mut n = 0;
            for row in &rows {
                let Some(job) = rebuild::<C>(
                    &row.id,
                    row.txid.clone(),
                    location.clone(),
                    row.payload.as_deref(),
                ) else {
                    tracing::warn!(barrier_id = %row.id, "cannot push again: the barrier has no usable payload");
                    continue;
                };
                let (jid, kind) = (job.id().as_str().to_string(), job.kind.clone());
                // An error rolls the round back: the rows keep their old push time and are
                // taken again next round.
                producer.push_barrier_job(job)?;
                tracing::warn!(barrier_id = %row.id, jid = %jid, kind = %kind, ?grace, "committed barrier not consumed in time: job pushed again");
                n += 1;
            }
            Ok((rows.len(), n))
        })?;
        pushed += n;
        crate::metrics::count(crate::metrics::JOBS_REPUSHED, n as u64);
        if taken < BATCH as usize {
            return Ok(pushed);
        }
    }
}

/// The job as it was pushed, with its descriptor, a new job id and a re-push count.
fn rebuild<C: BarrierConnection>(
    id: &str,
    txid: Option<String>,
    db: Option<String>,
    payload: Option<&str>,
) -> Option<Job> {
    let id = uuid::Uuid::try_parse(id).ok()?;
    let descriptor = Descriptor::Barrier(BarrierRef {
        backend: C::backend_name().to_string(),
        id,
        txid,
        db,
    });
    let value = serde_json::from_str(payload?).ok()?;
    repush::copy(
        value,
        REPUSHES_KEY,
        Duration::ZERO,
        Some(descriptor.to_value()),
    )
    .map(|c| c.job)
}
