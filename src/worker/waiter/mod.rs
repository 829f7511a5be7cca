//! The waiter: one thread per worker that resolves every pending barrier through a small,
//! fixed number of database connections, however many jobs wait.
//!
//! Job tasks register the barrier they wait for and get a one-shot channel; the waiter answers
//! each registration once its verdict is known. Its rooms:
//!
//! * `pending/` — the bookkeeping, free of any database: who waits for what, when each
//!   barrier is due for its next check (at once when new, then on the backend's schedule: a
//!   steady pace, or backing off), which wait together (one producer transaction), admission
//!   (`max_waiting`) and parking, what waits for a proof;
//! * `listener.rs` — the listening connection of backends whose commit hints are heard on one
//!   (SQLite's newly visible rows);
//! * `watchers.rs` — the watchers of backends whose hints are lock waits (PostgreSQL, MySQL):
//!   a few threads blocked on the youngest running transactions' rows;
//! * `durability.rs` — the proofs that a commit seen is durable;
//! * `clock.rs` — the worker's own commits, on a clock, as such proofs;
//! * this file — the thread that drives them: registrations and watcher reports arrive as
//!   events, hints make barriers due at once, checks run in batches.
//!
//! A hint is never a verdict: it only makes the waiter check the hinted barriers at once.
//! Every verdict comes from the database. A job whose verdict does not come within its block
//! limit gives up its registration (its receiver is dropped) and is snoozed; the waiter forgets
//! registrations nobody listens to.

mod clock;
mod durability;
mod listener;
mod pending;
mod watchers;

use super::monitor::Gauge;
use crate::backend::{BarrierConnection, CheckSchedule, ConnectionPool, Hint, Hints};
use crate::error::chain;
use crate::worker::parking::Releaser;
pub(crate) use clock::CommitClock;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use durability::Prover;
use listener::{Listener, Pooled};
pub(crate) use pending::Limits;
use pending::{Delivery, Group, PendingSet};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use watchers::{Assignment, Report, Watched, Watchers};

/// What a waiting job hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The transaction committed, durably: run the handler (the claim checks that the barrier
    /// is this job's).
    Committed,
    /// The transaction committed, durably, and the check read the barrier's job digest: it is
    /// this delivery's job's.
    Bound,
    /// The transaction committed, and the check read the barrier's job digest: it is another
    /// job's (the delivery carries a copied descriptor). Refuse it, leave the barrier.
    Foreign,
    /// The transaction ended without the barrier (or the barrier was consumed).
    NotCommitted,
    /// The transaction is still running (the job's wait timed out; the waiter never says so).
    Pending,
    /// The worker is shutting down: hand the job back.
    ShuttingDown,
    /// The barrier's transaction is still running, and `max_waiting` jobs already wait for
    /// running transactions: hand the job back, so that waiting jobs never take every fetch
    /// slot from ready ones.
    Overflow,
    /// The barrier's transaction is still running, and the waiter keeps the job parked until
    /// it ends: let this delivery be acknowledged.
    Parked,
}

impl Answer {
    /// The answer as the wait-time histogram labels it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Answer::Committed | Answer::Bound => "committed",
            Answer::Foreign => "foreign",
            Answer::NotCommitted => "not_committed",
            Answer::Pending => "pending",
            Answer::ShuttingDown => "shutting_down",
            Answer::Overflow => "overflow",
            Answer::Parked => "parked",
        }
    }
}

struct Registration {
    id: uuid::Uuid,
    txid: Option<String>,
    reply: oneshot::Sender<Answer>,
    /// The job, so that it can be parked (`None`: it cannot).
    job: Option<Box<faktory::Job>>,
    /// The job's digest, to compare with the barrier's.
    digest: Option<String>,
}

/// What wakes the waiter thread.
enum Event {
    Register(Registration),
    Watched(Report),
    Stop,
}

/// The handle job tasks use; cheap to clone.
#[derive(Clone)]
pub(crate) struct WaiterHandle {
    tx: Sender<Event>,
    stopping: Arc<AtomicBool>,
    /// Set once the waiter, stopping, has answered every job and handed back the parked ones.
    stopped: Arc<AtomicBool>,
    waiting: Arc<AtomicUsize>,
}

impl WaiterHandle {
    /// Registers interest in barrier `id`; the answer arrives on the returned receiver. With
    /// the job, the waiter may park it ([`Answer::Parked`]); with its digest, a commit is
    /// answered [`Answer::Bound`] or [`Answer::Foreign`] when the check read the barrier's.
    pub(crate) fn register(
        &self,
        id: uuid::Uuid,
        txid: Option<String>,
        job: Option<faktory::Job>,
        digest: Option<String>,
    ) -> (oneshot::Receiver<Answer>, Gauge) {
        let guard = Gauge::up(&self.waiting, Some(crate::metrics::JOBS_WAITING));
        let (reply, rx) = oneshot::channel();
        let job = job.map(Box::new);
        if self.stopping.load(Ordering::SeqCst) {
            let _ = reply.send(Answer::ShuttingDown);
        } else if let Err(e) = self.tx.send(Event::Register(Registration {
            id,
            txid,
            reply,
            job,
            digest,
        })) {
            if let Event::Register(r) = e.into_inner() {
                let _ = r.reply.send(Answer::ShuttingDown);
            }
        }
        (rx, guard)
    }

    /// Tells every waiting job to hand its job back, and stops the waiter thread.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.tx.send(Event::Stop);
    }

    /// Whether the waiter has stopped, every job answered and the parked ones handed back.
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

/// What the waiter runs with.
pub(crate) struct WaiterConfig<C: BarrierConnection> {
    /// The worker's pool: the checking connection, and the watchers'.
    pub(crate) pool: ConnectionPool<C>,
    /// Where the listening connection comes from, on backends that listen (the worker's
    /// pool); `None`: no listening.
    pub(crate) listen_pool: Option<ConnectionPool<C>>,
    /// How many watchers, on backends whose hints are lock waits.
    pub(crate) watchers: usize,
    /// When waiting barriers are checked.
    pub(crate) schedule: CheckSchedule,
    /// How many deliveries may wait, and how.
    pub(crate) limits: Limits,
    /// Where parked jobs go once their fate is decided; `None`: no parking.
    pub(crate) releaser: Option<Releaser>,
    /// Jobs parked now (for the monitor).
    pub(crate) parked: Arc<AtomicUsize>,
    /// Set while the listening connection is known to hear hints (for the monitor).
    pub(crate) hearing: Arc<AtomicBool>,
    /// Jobs waiting now (for the monitor).
    pub(crate) waiting: Arc<AtomicUsize>,
    /// The worker's commits, as proofs of durability.
    pub(crate) clock: Arc<CommitClock>,
    /// Handlers running now.
    pub(crate) running: Arc<AtomicUsize>,
}

impl<C: BarrierConnection> WaiterConfig<C> {
    /// How many connections the waiter takes from the worker's pool with these settings: its
    /// checking connection, its listening one when it comes from the pool, its watchers'.
    pub(crate) fn pooled_connections(listens_from_pool: bool, watchers: usize) -> u32 {
        let hints = match C::hints() {
            Hints::None => 0,
            Hints::Listen(_) => usize::from(listens_from_pool),
            Hints::LockWaits(_) => watchers,
        };
        u32::try_from(1 + hints).unwrap_or(u32::MAX)
    }
}

/// Starts the waiter thread.
pub(crate) fn start<C: BarrierConnection>(config: WaiterConfig<C>) -> WaiterHandle {
    let (tx, rx) = crossbeam_channel::unbounded();
    let stopping = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let handle = WaiterHandle {
        tx: tx.clone(),
        stopping: Arc::clone(&stopping),
        stopped: Arc::clone(&stopped),
        waiting: Arc::clone(&config.waiting),
    };
    std::thread::Builder::new()
        .name("dtb-waiter".into())
        .spawn(move || {
            Waiter::new(config, tx, rx, stopping).run();
            stopped.store(true, Ordering::SeqCst);
        })
        .expect("spawning the waiter thread");
    handle
}

/// Where the waiter's hints come from.
enum HintSource<C: BarrierConnection> {
    None,
    Listen(Listener<C>),
    Watch {
        watchers: Watchers,
        /// The group each busy watcher waits on.
        watching: HashMap<usize, Group>,
    },
}

/// The least time between two checks: under load, registrations arriving one by one are
/// checked in batches, not one query each.
const CHECK_GAP: Duration = Duration::from_micros(500);
/// How often an idle waiter wakes (to read its listening connection: unread notifications pile
/// up on the server for every session of the database).
const IDLE_WAKE: Duration = Duration::from_millis(10);
/// How long the waiter waits before it tries again to take its checking connection.
const RETRY: Duration = Duration::from_millis(500);

struct Waiter<C: BarrierConnection> {
    pool: ConnectionPool<C>,
    checker: Option<Pooled<C>>,
    retry_connect_at: Instant,
    events: Receiver<Event>,
    stopping: Arc<AtomicBool>,
    pending: PendingSet,
    /// The backend's own state between checks.
    checker_state: C::Checker,
    hints: HintSource<C>,
    prover: Prover<C>,
    releaser: Option<Releaser>,
    parked: Arc<AtomicUsize>,
    /// When the last check began.
    last_check: Instant,
}

impl<C: BarrierConnection> Waiter<C> {
    fn new(
        config: WaiterConfig<C>,
        events_tx: Sender<Event>,
        events: Receiver<Event>,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        let hints = match (C::hints(), config.listen_pool) {
            (Hints::Listen(listen), Some(pool)) => {
                HintSource::Listen(Listener::new(listen, pool, config.hearing))
            }
            (Hints::LockWaits(waits), _) if config.watchers > 0 => {
                config.hearing.store(true, Ordering::SeqCst);
                HintSource::Watch {
                    watchers: Watchers::start(
                        config.watchers,
                        waits,
                        config.pool.clone(),
                        events_tx,
                        Arc::clone(&config.clock),
                    ),
                    watching: HashMap::new(),
                }
            }
            _ => HintSource::None,
        };
        let now = Instant::now();
        Waiter {
            pool: config.pool,
            checker: None,
            retry_connect_at: now,
            events,
            stopping,
            pending: PendingSet::new(config.schedule, config.limits),
            checker_state: C::Checker::default(),
            hints,
            prover: Prover::new(config.clock, config.running),
            releaser: config.releaser,
            parked: config.parked,
            last_check: now - CHECK_GAP,
        }
    }

    fn run(mut self) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                self.pending.answer_all(Answer::ShuttingDown);
                self.release();
                // Registrations that raced with the stop.
                while let Ok(event) = self.events.try_recv() {
                    if let Event::Register(r) = event {
                        let _ = r.reply.send(Answer::ShuttingDown);
                    }
                }
                return;
            }
            match self.events.recv_timeout(self.timeout()) {
                Ok(event) => {
                    self.handle(event);
                    while let Ok(event) = self.events.try_recv() {
                        self.handle(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The worker is gone.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            self.pending.prune();
            self.ensure_connections();
            self.take_hints();
            if self.pending.is_empty() {
                continue;
            }
            self.check_due();
            self.prove_durable();
            self.assign_watchers();
            self.pending.age_parked(Instant::now());
            self.release();
        }
    }

    /// Hands the parked jobs whose fate was decided to the releaser.
    fn release(&mut self) {
        for (jobs, why) in self.pending.take_released() {
            if let Some(releaser) = &self.releaser {
                releaser.release(jobs, why);
            }
        }
        self.parked.store(self.pending.parked(), Ordering::SeqCst);
    }

    /// How long to sleep until something is due.
    fn timeout(&self) -> Duration {
        let now = Instant::now();
        let listening = match &self.hints {
            HintSource::Listen(listener) => listener.poll_interval(),
            _ => None,
        };
        if self.pending.is_empty() {
            return listening.map_or(Duration::from_secs(1), |_| IDLE_WAKE);
        }
        let mut wake = self
            .pending
            .next_due()
            .map_or(now + Duration::from_secs(1), |due| {
                due.max(self.last_check + CHECK_GAP)
            });
        if let Some(by) = self.prover.wake_by(&self.pending) {
            wake = wake.min(by);
        }
        if let Some(poll) = listening {
            wake = wake.min(now + poll);
        }
        wake.saturating_duration_since(now)
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Register(r) => self.pending.add(
                r.id,
                r.txid,
                Delivery {
                    reply: r.reply,
                    job: r.job,
                    digest: r.digest,
                },
                Instant::now(),
            ),
            Event::Watched(report) => self.watched(report),
            Event::Stop => {}
        }
    }

    /// A watcher's report: the barrier it waited on is decided (a durable commit), or its
    /// transaction ended, and the barriers of that transaction are checked at once.
    fn watched(&mut self, report: Report) {
        let HintSource::Watch { watchers, watching } = &mut self.hints else {
            return;
        };
        watchers.reported(&report);
        if let Some(group) = watching.remove(&report.watcher) {
            self.pending.set_watched(group, false);
        }
        tracing::trace!(barrier_id = %report.id, watched = ?report.watched, "watcher report");
        match report.watched {
            Watched::Durable { .. } => {
                self.pending
                    .hint(&[Hint::Barrier(report.id)], Instant::now());
                self.pending.answer(&report.id, Answer::Committed);
            }
            Watched::Visible | Watched::Ended => {
                self.pending
                    .hint(&[Hint::Barrier(report.id)], Instant::now());
            }
            Watched::Running | Watched::Failed => {}
        }
    }

    fn ensure_connections(&mut self) {
        if self.checker.is_none() && Instant::now() >= self.retry_connect_at {
            match self.pool.get() {
                Ok(conn) => self.checker = Some(conn),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "the waiter cannot get a database connection; retrying");
                    self.retry_connect_at = Instant::now() + RETRY;
                }
            }
        }
        if let HintSource::Listen(listener) = &mut self.hints {
            listener.ensure();
        }
    }

    fn take_hints(&mut self) {
        let HintSource::Listen(listener) = &mut self.hints else {
            return;
        };
        match listener.take() {
            Ok(hints) => self.pending.hint(&hints, Instant::now()),
            // A hint may have been lost with the connection: check everything now.
            Err(()) => self.pending.all_due(Instant::now()),
        }
    }

    /// Checks the barriers due, in one batch.
    fn check_due(&mut self) {
        let now = Instant::now();
        if now < self.last_check + CHECK_GAP {
            return;
        }
        let batch = self.pending.due(now);
        if batch.is_empty() {
            return;
        }
        let Some(conn) = self.checker.as_mut() else {
            return;
        };
        self.last_check = now;
        match conn.check_pending(&mut self.checker_state, &batch) {
            Ok(checked) => {
                tracing::trace!(batch = batch.len(), probed = checked.probed, took = ?now.elapsed(), "checked pending barriers");
                let seen = self.prover_clock_now();
                self.pending.read_digests(&batch, &checked);
                self.pending.apply(
                    &batch,
                    &checked.verdicts,
                    seen,
                    checked.position,
                    Instant::now(),
                );
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "checking pending barriers failed; reconnecting");
                self.checker = None;
            }
        }
    }

    fn prover_clock_now(&self) -> u64 {
        self.prover.clock_now()
    }

    fn prove_durable(&mut self) {
        let Some(conn) = self.checker.as_mut() else {
            return;
        };
        if let Err(e) = self.prover.prove(&mut self.pending, conn) {
            tracing::warn!(error = %chain(&e), "proving commits durable failed; reconnecting");
            self.checker = None;
        }
    }

    /// Gives free watchers the youngest running transactions no other watches.
    fn assign_watchers(&mut self) {
        let HintSource::Watch { watchers, watching } = &mut self.hints else {
            return;
        };
        let free = watchers.free();
        if free == 0 {
            return;
        }
        for (group, id, waited) in self.pending.watch_candidates(free, Instant::now()) {
            let assignment = Assignment {
                id,
                wait: wait_for(waited),
            };
            let Some(watcher) = watchers.assign(assignment) else {
                break;
            };
            watching.insert(watcher, group.clone());
            self.pending.set_watched(group, true);
        }
    }
}

/// How long a watcher waits on a transaction that has run for `waited`: short while it is
/// young (it will likely end soon, and a younger one may need the watcher next), longer as
/// it ages, so that a long transaction costs few round trips.
fn wait_for(waited: Duration) -> Duration {
    let secs = match waited.as_secs() {
        0 => 2,
        1..=3 => 4,
        _ => 8,
    };
    Duration::from_secs(secs)
}

#[cfg(all(test, feature = "testing"))]
mod tests;
