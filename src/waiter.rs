//! The waiter: one thread per worker that resolves every pending barrier through at most two
//! database connections, however many jobs wait.
//!
//! Job tasks register the barrier they wait for and get a one-shot channel; the waiter owns the
//! pending set and answers each registration once its verdict is known:
//!
//! * **Commit hints** (PostgreSQL): the producer's insert issues a `NOTIFY` that the server
//!   delivers only once the transaction has committed; the waiter's listening connection reads
//!   them from its socket buffer without a query, every [`Backend::HINT_POLL`].
//! * **Checks**: every [`Backend::CHECK_INTERVAL`] (and at once for new registrations) one
//!   batched query per backend decides what it can — a visible row is committed; a transaction
//!   that has ended without a visible row is confirmed by the backend's authoritative probe
//!   before it is called not committed.
//!
//! A job whose verdict does not come within its block limit gives up its registration (its
//! receiver is dropped) and is snoozed; the waiter forgets registrations nobody listens to.

use crate::backend::{BarrierConnection, Pending, Verdict};
use crate::worker::ConnectionPool;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What a waiting job hears back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    Verdict(Verdict),
    /// The worker is shutting down: hand the job back.
    ShuttingDown,
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

/// Counts a job as waiting while it lives.
pub(crate) struct WaitingGuard(Arc<AtomicUsize>);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WaiterHandle {
    /// Registers interest in barrier `id`; the answer arrives on the returned receiver.
    pub(crate) fn register(
        &self,
        id: uuid::Uuid,
        txid: Option<String>,
    ) -> (oneshot::Receiver<Answer>, WaitingGuard) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = WaitingGuard(Arc::clone(&self.waiting));
        let (reply, rx) = oneshot::channel();
        if self.stopping.load(Ordering::SeqCst) {
            let _ = reply.send(Answer::ShuttingDown);
        } else if let Err(e) = self.tx.send(Registration { id, txid, reply }) {
            let _ = e.into_inner().reply.send(Answer::ShuttingDown);
        }
        (rx, guard)
    }

    /// How many jobs are waiting right now.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Tells every waiting job to hand its job back, and stops the waiter thread.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// Starts the waiter thread.
pub(crate) fn start<C: BarrierConnection>(
    pool: ConnectionPool<C>,
    waiting: Arc<AtomicUsize>,
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
        .spawn(move || Waiter::<C>::new(pool, rx, stopping).run())
        .expect("spawning the waiter thread");
    handle
}

struct Entry {
    txid: Option<String>,
    since: Instant,
    next_probe: Instant,
    replies: Vec<oneshot::Sender<Answer>>,
}

struct Waiter<C: BarrierConnection> {
    pool: ConnectionPool<C>,
    rx: Receiver<Registration>,
    stopping: Arc<AtomicBool>,
    pending: HashMap<uuid::Uuid, Entry>,
    listener: Option<r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>>,
    checker: Option<r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>>,
    next_check: Instant,
    retry_connect_at: Instant,
    /// Commit hints for barriers nobody waited for yet: a job fetched just after its commit
    /// is answered from here, without a query.
    recent: HashMap<uuid::Uuid, Instant>,
    recent_order: VecDeque<(uuid::Uuid, Instant)>,
}

/// At most this many barriers of live-looking transactions are probed per check.
const MAX_PROBES_PER_CHECK: usize = 8;

/// How long a commit hint is remembered for a job not fetched yet.
const RECENT_HINTS_KEEP: Duration = Duration::from_secs(60);
/// At most this many remembered hints (16 bytes each, plus bookkeeping).
const RECENT_HINTS_MAX: usize = 100_000;

impl<C: BarrierConnection> Waiter<C> {
    fn new(pool: ConnectionPool<C>, rx: Receiver<Registration>, stopping: Arc<AtomicBool>) -> Self {
        let now = Instant::now();
        Waiter {
            pool,
            rx,
            stopping,
            pending: HashMap::new(),
            listener: None,
            checker: None,
            next_check: now,
            retry_connect_at: now,
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
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
                C::HINT_POLL.min(self.next_check.saturating_duration_since(Instant::now()))
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
                continue;
            }
            if Instant::now() >= self.next_check {
                self.check();
                self.next_check = Instant::now() + C::CHECK_INTERVAL;
            }
        }
    }

    fn add(&mut self, r: Registration) {
        let now = Instant::now();
        if self.recent.contains_key(&r.id) {
            // Its commit hint came before the job did.
            let _ = r.reply.send(Answer::Verdict(Verdict::Committed));
            return;
        }
        let entry = self.pending.entry(r.id).or_insert_with(|| Entry {
            txid: r.txid.clone(),
            since: now,
            next_probe: now + C::PROBE_INTERVAL,
            replies: Vec::new(),
        });
        entry.replies.push(r.reply);
        // New registrations are checked at once: a job fetched after its commit runs now.
        self.next_check = now;
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
        if (self.listener.is_some() || !C::HAS_HINTS) && self.checker.is_some() {
            return;
        }
        if Instant::now() < self.retry_connect_at {
            return;
        }
        let result = (|| -> Result<(), crate::Error> {
            if self.checker.is_none() {
                self.checker = Some(self.pool.get()?);
            }
            if C::HAS_HINTS && self.listener.is_none() {
                let mut conn = self.pool.get()?;
                conn.listen_for_commits()?;
                self.listener = Some(conn);
            }
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "the waiter cannot get a database connection; retrying");
            self.retry_connect_at = Instant::now() + Duration::from_millis(500);
        }
    }

    fn close_listener(&mut self) {
        if let Some(mut conn) = self.listener.take() {
            let _ = conn.stop_listening();
        }
    }

    fn take_hints(&mut self) {
        let Some(conn) = self.listener.as_mut() else {
            return;
        };
        match conn.take_commit_hints() {
            Ok(ids) => {
                let now = Instant::now();
                for id in ids {
                    if self.pending.contains_key(&id) {
                        // The NOTIFY is delivered only after the producer's commit is durable,
                        // and the claim that follows re-reads the row: a hint is enough.
                        self.answer(&id, Answer::Verdict(Verdict::Committed));
                    } else if self.recent.insert(id, now).is_none() {
                        self.recent_order.push_back((id, now));
                    }
                }
                while let Some(&(id, at)) = self.recent_order.front() {
                    if self.recent_order.len() <= RECENT_HINTS_MAX
                        && now.duration_since(at) < RECENT_HINTS_KEEP
                    {
                        break;
                    }
                    self.recent_order.pop_front();
                    self.recent.remove(&id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the waiter's listening connection failed; reconnecting");
                // A broken connection is discarded by the pool when it comes back.
                self.listener = None;
                self.next_check = Instant::now();
            }
        }
    }

    fn check(&mut self) {
        let Some(conn) = self.checker.as_mut() else {
            return;
        };
        let now = Instant::now();
        // Probing a live transaction costs a short lock wait: only a few per round.
        let mut probes = MAX_PROBES_PER_CHECK;
        let batch: Vec<Pending> = self
            .pending
            .iter()
            .map(|(id, e)| {
                let probe = probes > 0 && now >= e.next_probe;
                probes -= usize::from(probe);
                Pending {
                    id: *id,
                    txid: e.txid.clone(),
                    probe,
                }
            })
            .collect();
        let started = Instant::now();
        let result = conn.check_pending(&batch);
        tracing::trace!(batch = batch.len(), took = ?started.elapsed(), "checked pending barriers");
        match result {
            Ok(verdicts) => {
                for (p, verdict) in batch.iter().zip(verdicts) {
                    match verdict {
                        Verdict::Pending => {
                            if let Some(e) = self.pending.get_mut(&p.id) {
                                if p.probe {
                                    // Probe old waiters less and less often.
                                    let age = e.since.elapsed().max(C::PROBE_INTERVAL);
                                    e.next_probe = now + age.min(Duration::from_secs(30));
                                }
                            }
                        }
                        v => self.answer(&p.id, Answer::Verdict(v)),
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "checking pending barriers failed; reconnecting");
                self.checker = None;
            }
        }
    }
}
