//! Handlers that take no connection (`Handlers::register_without_connection`): the job runs
//! with no worker transaction around it, and its barrier is deleted afterwards, in a batch
//! with other finished jobs' — one statement and one commit per batch — by the worker's
//! *consumer* thread. The delivery is acknowledged only once that deletion committed.
//!
//! What stands in for the claim of a worker transaction:
//! * the barrier is the job's: the waiter's check read the row's job digest and compared it
//!   with the delivery's ([`Answer::Bound`](super::waiter::Answer::Bound)); where it did not
//!   (a commit a watcher or a probe saw), one read here does;
//! * one run at a time per barrier in this process: a barrier being run or deleted is in the
//!   `consuming` set, and a second delivery meanwhile is snoozed;
//! * no run after the deletion: a later delivery's check finds no row (not committed, or gone).
//!
//! What it gives up, which such handlers never had (their effects are outside the database):
//! a job whose handler ran runs again if the worker dies before its barrier's deletion
//! commits (the delivery was not acknowledged, and Faktory hands it out again), and two
//! worker processes may run two deliveries of one job at once.

use super::monitor::Gauge;
use super::phases::Phases;
use super::run::{call_handler, Outcome};
use super::Shared;
use crate::backend::{BarrierConnection, ConnectionPool};
use crate::descriptor::BarrierRef;
use crate::error::{chain, Error, Result};
use crate::handlers::DetachedFn;
use crossbeam_channel::{Receiver, Sender};
use faktory::Job;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The most barriers one deletion takes.
const MAX_BATCH: usize = 1_000;
/// How long the consumer waits before it tries again after its connection failed.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How many times a batch is tried before its jobs' deliveries fail.
const ATTEMPTS: usize = 3;

/// A barrier to delete, and who waits for the deletion's commit.
struct Request {
    id: uuid::Uuid,
    done: oneshot::Sender<std::result::Result<(), String>>,
}

/// The handle of the consumer thread; cheap to clone. The thread ends when every handle is
/// gone.
#[derive(Clone)]
pub(crate) struct Consumer {
    tx: Sender<Request>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queued", &self.tx.len())
            .finish()
    }
}

impl Consumer {
    /// Starts the consumer thread, which deletes barriers through one connection of `pool`;
    /// `proves` tells whether its commits prove durable what the waiter saw before they
    /// began (recorded on `clock`).
    pub(crate) fn start<C: BarrierConnection>(
        pool: ConnectionPool<C>,
        clock: Arc<super::waiter::CommitClock>,
        proves: bool,
    ) -> Consumer {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("dtb-consumer".into())
            .spawn(move || consume_loop(&rx, &pool, &clock, proves))
            .expect("spawning the consumer thread");
        Consumer { tx }
    }

    /// Queues barrier `id` for deletion; the receiver hears when its deletion committed.
    fn delete(&self, id: uuid::Uuid) -> oneshot::Receiver<std::result::Result<(), String>> {
        let (done, rx) = oneshot::channel();
        if let Err(e) = self.tx.send(Request { id, done }) {
            let _ = e
                .into_inner()
                .done
                .send(Err("the worker is stopping".into()));
        }
        rx
    }
}

/// Takes what is queued — everything that arrived while the previous batch committed, up to
/// [`MAX_BATCH`] — and deletes it in one statement, until every handle is gone.
fn consume_loop<C: BarrierConnection>(
    rx: &Receiver<Request>,
    pool: &ConnectionPool<C>,
    clock: &super::waiter::CommitClock,
    proves: bool,
) {
    let mut conn = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        let ids: Vec<uuid::Uuid> = batch.iter().map(|r| r.id).collect();
        let mut outcome = Err(String::new());
        for attempt in 1..=ATTEMPTS {
            if conn.is_none() {
                conn = pool.get().ok();
            }
            let Some(c) = conn.as_mut() else {
                outcome = Err("no connection for the barriers' deletion".into());
                std::thread::sleep(RETRY_PAUSE);
                continue;
            };
            let began = clock.now();
            match c.consume_barriers(&ids) {
                Ok(deleted) => {
                    if proves {
                        clock.committed(began);
                    }
                    tracing::trace!(
                        barriers = ids.len(),
                        deleted,
                        "consumed barriers of handlers without a connection"
                    );
                    outcome = Ok(());
                    break;
                }
                Err(e) => {
                    tracing::warn!(barriers = ids.len(), attempt, error = %chain(&e), "deleting the barriers of finished jobs failed");
                    outcome = Err(e.to_string());
                    // Let the pool test it again, and take another.
                    conn = None;
                    if attempt < ATTEMPTS {
                        std::thread::sleep(RETRY_PAUSE);
                    }
                }
            }
        }
        for request in batch {
            let _ = request.done.send(outcome.clone());
        }
    }
}

/// How long a barrier consumed in this process is remembered (between one and two of these):
/// far longer than a delivery takes from its verdict to its handler slot.
const REMEMBER_CONSUMED: Duration = Duration::from_secs(30);

/// Barriers being run or deleted in this process by handlers without a connection, and those
/// consumed lately: a delivery whose verdict came before another's deletion committed must
/// not run after it.
#[derive(Debug)]
pub(crate) struct Consuming(Mutex<ConsumingState>);

#[derive(Debug)]
struct ConsumingState {
    running: HashSet<uuid::Uuid>,
    /// Consumed lately: this generation and the previous one.
    consumed: [HashSet<uuid::Uuid>; 2],
    rotated: Instant,
}

impl Default for Consuming {
    fn default() -> Self {
        Consuming(Mutex::new(ConsumingState {
            running: HashSet::new(),
            consumed: [HashSet::new(), HashSet::new()],
            rotated: Instant::now(),
        }))
    }
}

impl Consuming {
    fn state(&self) -> std::sync::MutexGuard<'_, ConsumingState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes barrier `id` for this delivery; `Busy` while another delivery has it,
    /// `Duplicate` when one consumed it lately.
    fn take(self: &Arc<Self>, id: uuid::Uuid) -> std::result::Result<Taken, Outcome> {
        let mut state = self.state();
        if state.rotated.elapsed() >= REMEMBER_CONSUMED {
            state.consumed.swap(0, 1);
            state.consumed[0].clear();
            state.rotated = Instant::now();
        }
        if state.consumed.iter().any(|set| set.contains(&id)) {
            return Err(Outcome::Duplicate);
        }
        if !state.running.insert(id) {
            return Err(Outcome::Busy);
        }
        Ok(Taken {
            set: Arc::clone(self),
            id,
            consumed: false,
        })
    }
}

/// A barrier taken in [`Consuming`]; given back when dropped, remembered as consumed once
/// its deletion committed.
struct Taken {
    set: Arc<Consuming>,
    id: uuid::Uuid,
    consumed: bool,
}

impl Taken {
    fn consumed(mut self) {
        self.consumed = true;
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut state = self.set.state();
        state.running.remove(&self.id);
        if self.consumed {
            state.consumed[0].insert(self.id);
        }
    }
}

/// Runs `job` with `handler`, which takes no connection, once a handler slot is free: for a
/// barrier job (`bound`: the waiter already found its barrier to be this job's), deletes the
/// barrier afterwards through the consumer, and returns once that deletion committed.
pub(super) async fn run<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    handler: Arc<DetachedFn>,
    job: &Job,
    barrier: Option<(&BarrierRef, bool)>,
) -> Result<(Outcome, Phases)> {
    let mut taken = None;
    if let Some((b, bound)) = barrier {
        if !bound {
            match verify(shared, job, b).await? {
                Outcome::Ran => {}
                other => return Ok((other, Phases::new(Instant::now()))),
            }
        }
        match shared.consuming.take(b.id) {
            Ok(t) => taken = Some(t),
            Err(outcome) => return Ok((outcome, Phases::new(Instant::now()))),
        }
    }
    let slot = Arc::clone(&shared.handler_slots)
        .acquire_owned()
        .await
        .map_err(|_| Error::ShuttingDown)?;
    let mut phases = Phases::new(Instant::now());
    let (shared2, job2) = (Arc::clone(shared), job.clone());
    let ran = tokio::task::spawn_blocking(move || {
        let _running = Gauge::up(
            &shared2.stats.running,
            Some(crate::metrics::HANDLERS_RUNNING),
        );
        call_handler(&job2, || handler(&job2))
    })
    .await
    .map_err(|e| Error::HandlerPanic {
        jid: job.id().to_string(),
        message: e.to_string(),
    })?;
    drop(slot);
    phases.handled = phases.since();
    let Some((b, _)) = barrier else {
        ran?;
        return Ok((Outcome::Ran, phases));
    };
    if let Err(e) = ran {
        // The job now lives in Faktory's retries: keep the reconciler off it until it is
        // overdue from there.
        mark_attempted(shared, job, b.id).await;
        return Err(e);
    }
    let message = match shared.consumer().delete(b.id).await {
        Ok(Ok(())) => {
            phases.committed = phases.since();
            if let Some(taken) = taken {
                taken.consumed();
            }
            return Ok((Outcome::Ran, phases));
        }
        Ok(Err(message)) => message,
        Err(_) => "the worker stopped before the barrier was deleted".to_string(),
    };
    drop(taken);
    tracing::error!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, %message, "the handler ran, but its barrier could not be deleted: the delivery fails, and the job will run again");
    Err(Error::BarrierNotConsumed {
        jid: job.id().to_string(),
        message,
    })
}

/// Reads the barrier's job digest, where the waiter did not: `Ran` when the barrier is this
/// job's (or binds to none), `Duplicate` when it is gone, `Foreign` when it is another job's.
async fn verify<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    job: &Job,
    b: &BarrierRef,
) -> Result<Outcome> {
    let (shared2, id) = (Arc::clone(shared), b.id);
    let digest = crate::binding::job_digest(job);
    tokio::task::spawn_blocking(move || -> Result<Outcome> {
        let mut conn = shared2.pool.get()?;
        Ok(match conn.barrier_digest(&id)? {
            None => Outcome::Duplicate,
            Some(Some(theirs)) if theirs != digest => Outcome::Foreign,
            Some(_) => Outcome::Ran,
        })
    })
    .await
    .map_err(|e| Error::HandlerPanic {
        jid: job.id().to_string(),
        message: e.to_string(),
    })?
}

/// After the handler failed: marks the barrier attempted, as the worker transaction does for a
/// handler with a connection.
async fn mark_attempted<C: BarrierConnection>(shared: &Arc<Shared<C>>, job: &Job, id: uuid::Uuid) {
    let due = shared.config.retry_schedule.due(job);
    let shared2 = Arc::clone(shared);
    let marked = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut conn = shared2.pool.get()?;
        conn.mark_attempted(&id, due)?;
        Ok(())
    })
    .await;
    if let Ok(Err(e)) = marked {
        tracing::warn!(barrier_id = %id, error = %chain(&e), "could not mark the barrier attempted");
    }
}
