//! The waiter: one thread per worker that resolves every pending barrier through at most two
//! database connections, however many jobs wait.
//!
//! Job tasks register the barrier they wait for and get a one-shot channel; the waiter owns the
//! pending set and answers each registration once its verdict is known:
//!
//! * **Commit hints** (PostgreSQL's `NOTIFY`, SQLite's newly visible rows): the waiter's
//!   listening connection reads them every [`Backend::HINT_POLL`] (on PostgreSQL from its socket
//!   buffer, without a query). A hint is never a verdict — any PostgreSQL session may `NOTIFY`
//!   any channel with any payload — it only makes the waiter check the hinted barriers at once.
//! * **Checks**: every [`Backend::CHECK_INTERVAL`] (and at once for new registrations and for
//!   hinted barriers) one batched query per backend decides what it can — a visible row is
//!   committed; a transaction that has ended without a visible row is confirmed by the
//!   backend's authoritative probe before it is called not committed. Every verdict comes from
//!   the database.
//!
//! A job whose verdict does not come within its block limit gives up its registration (its
//! receiver is dropped) and is snoozed; the waiter forgets registrations nobody listens to.
//!
//! Hints are optional (`WorkerBuilder::commit_hints`), and may come through a connection of
//! their own (`WorkerBuilder::listen_url`). A `LISTEN` through PgBouncer in transaction pooling
//! mode is accepted and never hears anything, so before listening the waiter looks for a
//! session its listening connection visibly shares with its checking one
//! (`Backend::shares_sessions`; no listening then), and a new listening connection must prove
//! that it hears hints: the waiter sends one itself (`Backend::send_test_hint`), and a listener
//! that hears nothing within [`HINT_TEST_TIMEOUT`] is given up on. Either way the waiter warns,
//! and its checks alone find every commit.

mod clock;
mod listener;

use super::monitor::Gauge;
use crate::backend::{BarrierConnection, Checked, ConnectionPool, Pending, Verdict};
use crate::error::chain;
pub(crate) use clock::{micros_since, CommitClock};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
pub(crate) use listener::Listener;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What a waiting job hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The transaction committed, durably: run the handler.
    Committed,
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
}

impl Answer {
    /// The answer as the wait-time histogram labels it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Answer::Committed => "committed",
            Answer::NotCommitted => "not_committed",
            Answer::Pending => "pending",
            Answer::ShuttingDown => "shutting_down",
            Answer::Overflow => "overflow",
        }
    }
}

struct Registration {
    id: uuid::Uuid,
    txid: Option<String>,
    reply: oneshot::Sender<Answer>,
}

/// The handle job tasks use; cheap to clone.
#[derive(Clone)]
pub(crate) struct WaiterHandle {
    tx: Sender<Registration>,
    stopping: Arc<AtomicBool>,
    waiting: Arc<AtomicUsize>,
}

impl WaiterHandle {
    /// Registers interest in barrier `id`; the answer arrives on the returned receiver.
    pub(crate) fn register(
        &self,
        id: uuid::Uuid,
        txid: Option<String>,
    ) -> (oneshot::Receiver<Answer>, Gauge) {
        let guard = Gauge::up(&self.waiting, Some(crate::metrics::JOBS_WAITING));
        let (reply, rx) = oneshot::channel();
        if self.stopping.load(Ordering::SeqCst) {
            let _ = reply.send(Answer::ShuttingDown);
        } else if let Err(e) = self.tx.send(Registration { id, txid, reply }) {
            let _ = e.into_inner().reply.send(Answer::ShuttingDown);
        }
        (rx, guard)
    }

    /// Tells every waiting job to hand its job back, and stops the waiter thread.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// Where the waiter's commit hints come from, and how often it checks.
pub(crate) struct HintSettings<C: BarrierConnection> {
    /// The pool of the listening connection (the worker's own, or one of its own); `None`: no
    /// commit hints.
    pub(crate) listen_pool: Option<ConnectionPool<C>>,
    /// How often every pending barrier is checked.
    pub(crate) check_interval: Duration,
    /// Set while the listening connection is known to hear hints (for the monitor).
    pub(crate) hearing: Arc<AtomicBool>,
}

/// Starts the waiter thread.
pub(crate) fn start<C: BarrierConnection>(
    pool: ConnectionPool<C>,
    hints: HintSettings<C>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    clock: Arc<CommitClock>,
    running: Arc<AtomicUsize>,
) -> WaiterHandle {
    let (tx, rx) = crossbeam_channel::unbounded();
    let stopping = Arc::new(AtomicBool::new(false));
    let handle = WaiterHandle {
        tx,
        stopping: Arc::clone(&stopping),
        waiting,
    };
    std::thread::Builder::new()
        .name("dtb-waiter".into())
        .spawn(move || {
            Waiter::<C>::new(pool, hints, rx, stopping, max_waiting, clock, running).run()
        })
        .expect("spawning the waiter thread");
    handle
}

struct Entry {
    txid: Option<String>,
    since: Instant,
    /// Whether a check found its transaction still running (until then it may well be
    /// committed already, and does not count against `max_waiting`).
    running: bool,
    /// When a check saw it committed but not yet proven durable (`Verdict::Visible`).
    seen_committed: Option<Seen>,
    replies: Vec<oneshot::Sender<Answer>>,
}

/// When a check saw a barrier committed before its commit was proven durable.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// On the commit clock: a worker write begun later and committed proves it durable.
    clock: u64,
    /// Where the database's log stood (`Checked::position`): once the flushed position
    /// reaches it, the commit is durable.
    position: Option<u64>,
}

/// Where a new listening connection stands in proving that it hears hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HintTest {
    /// Nothing to prove: no listener, or it heard a hint, or the backend needs no test.
    Done,
    /// A test hint is to be sent (once the checking connection is there).
    Due,
    /// A test hint was sent; the listener must hear a hint by then.
    Sent(Instant),
}

struct Waiter<C: BarrierConnection> {
    pool: ConnectionPool<C>,
    /// Where commit hints come from: `None` when there are none (the backend has none, the
    /// worker was built without them, or the listener heard nothing and was given up on).
    listen_pool: Option<ConnectionPool<C>>,
    check_interval: Duration,
    hint_test: HintTest,
    hearing: Arc<AtomicBool>,
    rx: Receiver<Registration>,
    stopping: Arc<AtomicBool>,
    pending: HashMap<uuid::Uuid, Entry>,
    /// The backend's own state between checks.
    checker_state: C::Checker,
    listener: Option<Listener<C>>,
    checker: Option<r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>>,
    next_check: Instant,
    /// When the last check of any kind began.
    last_check: Instant,
    retry_connect_at: Instant,
    /// How many jobs may wait for running transactions.
    max_waiting: usize,
    /// Barriers registered since the last check: checked at once.
    fresh: Vec<uuid::Uuid>,
    clock: Arc<CommitClock>,
    /// Handlers running now: their commits will prove durability; with none, fence at once.
    running_handlers: Arc<AtomicUsize>,
    /// When the database's flushed log position was last read (backends that report one).
    last_flush_read: Instant,
}

/// The least time between two checks of newly registered barriers: under load, registrations
/// arriving one by one are checked in batches, not one query each.
const FRESH_CHECK_GAP: Duration = Duration::from_micros(500);

/// How long barriers seen committed wait for a handler's commit to prove them durable before
/// the waiter commits a fence of its own.
const PROOF_WAIT: Duration = Duration::from_millis(5);

/// The least time between two readings of the database's flushed log position while barriers
/// wait for it.
const FLUSH_READ_GAP: Duration = Duration::from_millis(1);

/// How long a new listening connection may take to hear a hint (the waiter's own test hint, or
/// any other) before the waiter stops listening and relies on its checks alone.
pub(crate) const HINT_TEST_TIMEOUT: Duration = Duration::from_secs(2);

impl<C: BarrierConnection> Waiter<C> {
    fn new(
        pool: ConnectionPool<C>,
        hints: HintSettings<C>,
        rx: Receiver<Registration>,
        stopping: Arc<AtomicBool>,
        max_waiting: usize,
        clock: Arc<CommitClock>,
        running_handlers: Arc<AtomicUsize>,
    ) -> Self {
        let now = Instant::now();
        Waiter {
            pool,
            listen_pool: hints.listen_pool.filter(|_| C::HAS_HINTS),
            check_interval: hints.check_interval,
            hint_test: HintTest::Done,
            hearing: hints.hearing,
            rx,
            stopping,
            max_waiting,
            fresh: Vec::new(),
            clock,
            running_handlers,
            pending: HashMap::new(),
            checker_state: C::Checker::default(),
            listener: None,
            checker: None,
            next_check: now,
            last_check: now - FRESH_CHECK_GAP,
            last_flush_read: now,
            retry_connect_at: now,
        }
    }

    fn run(mut self) {
        loop {
            if self.stopping.load(Ordering::SeqCst) {
                self.answer_all(Answer::ShuttingDown);
                // Drain registrations that raced with the stop.
                while let Ok(r) = self.rx.try_recv() {
                    let _ = r.reply.send(Answer::ShuttingDown);
                }
                self.close_listener();
                return;
            }
            let timeout = if self.pending.is_empty() {
                // Idle, but hints must still be read: unread notifications pile up on the
                // server for every session of the database.
                Duration::from_millis(10)
            } else {
                let now = Instant::now();
                let mut wake = self.next_check;
                if !self.fresh.is_empty() {
                    wake = wake.min(self.last_check + FRESH_CHECK_GAP);
                }
                let poll = if self.listener.is_some() || !C::HAS_HINTS {
                    C::HINT_POLL
                } else {
                    // Hints turned off: nothing to read between checks but new registrations,
                    // which wake the waiter as they arrive.
                    self.check_interval
                };
                poll.min(wake.saturating_duration_since(now))
            };
            match self.rx.recv_timeout(timeout) {
                Ok(r) => {
                    self.add(r);
                    while let Ok(r) = self.rx.try_recv() {
                        self.add(r);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The worker is gone.
                    self.close_listener();
                    return;
                }
            }
            self.pending.retain(|_, e| {
                e.replies.retain(|r| !r.is_closed());
                !e.replies.is_empty()
            });
            self.ensure_connections();
            self.take_hints();
            if self.pending.is_empty() {
                self.fresh.clear();
                continue;
            }
            if Instant::now() >= self.next_check {
                self.fresh.clear();
                self.check();
                self.next_check = Instant::now() + self.check_interval;
            } else if !self.fresh.is_empty() && Instant::now() >= self.last_check + FRESH_CHECK_GAP
            {
                // New registrations are checked at once (a job fetched after its commit runs
                // now), or, under load, with the others that arrived meanwhile.
                let fresh = std::mem::take(&mut self.fresh);
                self.check_ids(fresh);
            }
            self.prove_durable();
        }
    }

    /// Answers the barriers seen committed whose durability is now proven (by a worker commit
    /// begun after the check, or by the database's flushed log position); commits a fence when
    /// no such proof came soon enough.
    fn prove_durable(&mut self) {
        let unproven: Vec<(uuid::Uuid, Seen)> = self
            .pending
            .iter()
            .filter_map(|(id, e)| e.seen_committed.map(|seen| (*id, seen)))
            .collect();
        if unproven.is_empty() {
            return;
        }
        let flushed = self.read_flushed_position(&unproven);
        let mut waiting_longest = 0;
        for &(id, seen) in &unproven {
            let flushed_past = matches!((flushed, seen.position), (Some(f), Some(p)) if f >= p);
            if self.clock.proves(seen.clock) || flushed_past {
                self.answer(&id, Answer::Committed);
            } else {
                waiting_longest = waiting_longest.max(self.clock.now().saturating_sub(seen.clock));
            }
        }
        // Handler commits prove durability where the backend's commits are durable when they
        // return: while handlers run, wait a little for theirs.
        let idle = !C::HANDLER_COMMITS_PROVE || self.running_handlers.load(Ordering::SeqCst) == 0;
        let overdue = Duration::from_micros(waiting_longest) >= PROOF_WAIT;
        let flush_may_come = !C::HANDLER_COMMITS_PROVE && !overdue;
        if waiting_longest == 0 || flush_may_come || !(idle || overdue) {
            return;
        }
        let Some(conn) = self.checker.as_mut() else {
            return;
        };
        let ids: Vec<uuid::Uuid> = unproven
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.pending.contains_key(id))
            .collect();
        let began = self.clock.now();
        let fenced = conn.fence(&ids);
        tracing::trace!(barriers = ids.len(), ?fenced, "durability fence");
        match fenced {
            Ok(true) => {
                self.clock.committed(began);
                for id in ids {
                    self.answer(&id, Answer::Committed);
                }
            }
            // Nothing written: every row is held by a handler (another delivery of the same
            // barrier) or already gone, consumed by one. Neither needs a proof any longer, and
            // no commit of the worker's is bound to come after them: check them again, on the
            // regular schedule, and let that check decide.
            Ok(false) => {
                for id in ids {
                    if let Some(entry) = self.pending.get_mut(&id) {
                        entry.seen_committed = None;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "the durability fence failed; reconnecting");
                self.checker = None;
            }
        }
    }

    /// The database's flushed log position, read at most every [`FLUSH_READ_GAP`], when some
    /// of `unproven` wait for it.
    fn read_flushed_position(&mut self, unproven: &[(uuid::Uuid, Seen)]) -> Option<u64> {
        if unproven.iter().all(|(_, seen)| seen.position.is_none())
            || self.last_flush_read.elapsed() < FLUSH_READ_GAP
        {
            return None;
        }
        let conn = self.checker.as_mut()?;
        self.last_flush_read = Instant::now();
        match conn.flushed_position() {
            Ok(position) => position,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "reading the database's flushed log position failed; reconnecting");
                self.checker = None;
                None
            }
        }
    }

    fn add(&mut self, r: Registration) {
        let now = Instant::now();
        let entry = self.pending.entry(r.id).or_insert_with(|| Entry {
            txid: r.txid.clone(),
            since: now,
            running: false,
            seen_committed: None,
            replies: Vec::new(),
        });
        entry.replies.push(r.reply);
        if entry.replies.len() == 1 {
            self.fresh.push(r.id);
        }
    }

    fn answer(&mut self, id: &uuid::Uuid, answer: Answer) {
        if let Some(entry) = self.pending.remove(id) {
            tracing::trace!(barrier_id = %id, ?answer, waited = ?entry.since.elapsed(), "barrier answered");
            for r in entry.replies {
                let _ = r.send(answer);
            }
        }
    }

    fn answer_all(&mut self, answer: Answer) {
        for (_, entry) in self.pending.drain() {
            for r in entry.replies {
                let _ = r.send(answer);
            }
        }
    }

    fn ensure_connections(&mut self) {
        let wants_listener = self.listen_pool.is_some() && self.listener.is_none();
        if !wants_listener && self.checker.is_some() {
            self.test_hints();
            return;
        }
        if Instant::now() < self.retry_connect_at {
            return;
        }
        let result = (|| -> Result<(), crate::Error> {
            if self.checker.is_none() {
                self.checker = Some(self.pool.get()?);
            }
            if let (Some(pool), None, Some(checker)) = (
                self.listen_pool.clone(),
                &self.listener,
                self.checker.as_mut(),
            ) {
                let mut conn = pool.get()?;
                if conn.shares_sessions(checker)? {
                    tracing::warn!(
                        check_interval = ?self.check_interval,
                        "the waiter's listening connection shares its server session with \
                         other clients (PgBouncer in transaction pooling mode?), where a LISTEN \
                         hears nothing: the waiter does not listen, and finds commits by its \
                         checks alone (give the worker a direct listen_url, or turn \
                         commit_hints off)"
                    );
                    self.listen_pool = None;
                } else {
                    self.listener = Some(Listener::start(conn)?);
                    self.hint_test = HintTest::Due;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %chain(&e), "the waiter cannot get a database connection; retrying");
            self.retry_connect_at = Instant::now() + Duration::from_millis(500);
        }
        self.test_hints();
    }

    /// Sends the test hint a new listener is due, from the checking connection.
    fn test_hints(&mut self) {
        if self.hint_test != HintTest::Due {
            return;
        }
        let Some(conn) = self.checker.as_mut() else {
            return;
        };
        match conn.send_test_hint(&uuid::Uuid::new_v4()) {
            Ok(true) => self.hint_test = HintTest::Sent(Instant::now() + HINT_TEST_TIMEOUT),
            Ok(false) => {
                self.hint_test = HintTest::Done;
                self.hearing.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "the waiter could not send its test hint; reconnecting");
                self.checker = None;
            }
        }
    }

    fn close_listener(&mut self) {
        // Dropping it stops its listening (see `Listener`).
        self.listener = None;
        self.hint_test = HintTest::Done;
        self.hearing.store(false, Ordering::SeqCst);
    }

    fn take_hints(&mut self) {
        let Some(conn) = self.listener.as_mut() else {
            return;
        };
        match conn.take_commit_hints() {
            Ok(ids) => {
                if !ids.is_empty() && self.hint_test != HintTest::Done {
                    // Any hint proves that the listener hears them.
                    self.hint_test = HintTest::Done;
                    self.hearing.store(true, Ordering::SeqCst);
                    tracing::debug!("the waiter's listening connection hears commit hints");
                }
                if let HintTest::Sent(by) = self.hint_test {
                    if Instant::now() >= by {
                        tracing::warn!(
                            check_interval = ?self.check_interval,
                            "the waiter's listening connection heard no commit hint, not even its \
                             own test hint, within {HINT_TEST_TIMEOUT:?}: the waiter stops \
                             listening and finds commits by its checks alone (a LISTEN through \
                             PgBouncer in transaction pooling mode hears nothing: give the worker \
                             a direct listen_url, or turn commit_hints off)"
                        );
                        self.close_listener();
                        self.listen_pool = None;
                        return;
                    }
                }
                // A hint only says where to look now; the check decides. Hints for barriers
                // nobody waits for are dropped: a job fetched later is checked when it
                // registers.
                self.check_ids(ids);
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "the waiter's listening connection failed; reconnecting");
                self.close_listener();
                self.next_check = Instant::now();
            }
        }
    }

    fn check(&mut self) {
        let ids: Vec<uuid::Uuid> = self
            .pending
            .iter()
            .filter(|(_, e)| e.seen_committed.is_none())
            .map(|(id, _)| *id)
            .collect();
        self.check_ids(ids);
    }

    /// Checks the pending barriers `ids`.
    fn check_ids(&mut self, ids: Vec<uuid::Uuid>) {
        let batch: Vec<Pending> = ids
            .into_iter()
            .filter_map(|id| {
                let e = self.pending.get(&id)?;
                (e.seen_committed.is_none()).then(|| Pending {
                    id,
                    txid: e.txid.clone(),
                })
            })
            .collect();
        if !batch.is_empty() {
            self.check_batch(batch);
        }
    }

    /// Checks `batch` and answers every barrier it decides.
    fn check_batch(&mut self, batch: Vec<Pending>) {
        let Some(conn) = self.checker.as_mut() else {
            return;
        };
        let started = Instant::now();
        self.last_check = started;
        match conn.check_pending(&mut self.checker_state, &batch) {
            Ok(Checked {
                verdicts,
                probed,
                position,
            }) => {
                tracing::trace!(batch = batch.len(), probed, took = ?started.elapsed(), "checked pending barriers");
                let seen = self.clock.now();
                let mut running = self.pending.values().filter(|e| e.running).count();
                for (p, verdict) in batch.iter().zip(verdicts) {
                    match verdict {
                        Verdict::Committed => self.answer(&p.id, Answer::Committed),
                        Verdict::NotCommitted => self.answer(&p.id, Answer::NotCommitted),
                        Verdict::Visible => {
                            if let Some(entry) = self.pending.get_mut(&p.id) {
                                entry.seen_committed = Some(Seen {
                                    clock: seen,
                                    position,
                                });
                            }
                        }
                        Verdict::Pending => {}
                    }
                    if verdict != Verdict::Pending {
                        continue;
                    }
                    let Some(entry) = self.pending.get_mut(&p.id) else {
                        continue;
                    };
                    if entry.running {
                        continue;
                    }
                    // Found running for the first time: it waits only if there is room.
                    if running >= self.max_waiting {
                        self.answer(&p.id, Answer::Overflow);
                    } else {
                        entry.running = true;
                        running += 1;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "checking pending barriers failed; reconnecting");
                self.checker = None;
            }
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests;
