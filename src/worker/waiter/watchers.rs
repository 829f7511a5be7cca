//! The waiter's watchers, on backends whose hints are lock waits (PostgreSQL, MySQL): a few
//! threads, each with a connection of its own, each blocked in a wait on one running
//! transaction's barrier row (`LockWaits::await_row`), which ends the moment that transaction
//! does. The waiter hands each the youngest running transaction no other watches; a watcher
//! reports what it woke to, and the waiter checks that transaction's barriers. On MySQL a
//! watcher that wakes to a committed row first proves the commit durable with a fence on its
//! own connection (its commit proves everything seen before it); on PostgreSQL the waiter's
//! check compares the log's flushed position instead.
//!
//! A watcher's report is a hint, or, with its fence, a verdict on one barrier: the row it
//! waited on is there, committed and durable. It takes its connection from the pool when it
//! gets work and gives it back when it has had none for [`IDLE`].

use super::clock::CommitClock;
use super::Event;
use crate::backend::{Awaited, BarrierConnection, ConnectionPool, Durability, LockWaits, Prove};
use crate::error::chain;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

/// How long a watcher keeps its connection without work.
const IDLE: Duration = Duration::from_secs(10);
/// How long a watcher whose connection failed waits before it takes another.
const RETRY: Duration = Duration::from_millis(500);

/// What a watcher is asked to wait for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Assignment {
    pub(super) id: uuid::Uuid,
    pub(super) wait: Duration,
}

/// What a watcher found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Watched {
    /// The row is there, committed, and a fence of the watcher's, begun after it saw the
    /// commit (at this reading of the commit clock), proved it durable.
    Durable { fence_began: u64 },
    /// The row is there, committed; its durability is not proven (the fence failed).
    Visible,
    /// The transaction ended without the row (or the row was consumed).
    Ended,
    /// The transaction still ran when the wait was up.
    Running,
    /// The watcher could not wait (its connection failed); it takes another.
    Failed,
}

/// A watcher's report.
#[derive(Debug, Clone, Copy)]
pub(super) struct Report {
    pub(super) watcher: usize,
    pub(super) id: uuid::Uuid,
    pub(super) watched: Watched,
}

/// The watcher threads, and which of them are busy.
pub(super) struct Watchers {
    senders: Vec<Sender<Assignment>>,
    busy: Vec<Option<uuid::Uuid>>,
}

impl Watchers {
    /// Starts `n` watchers that take connections from `pool` and report to `events`.
    pub(super) fn start<C: BarrierConnection>(
        n: usize,
        waits: &'static dyn LockWaits<C>,
        pool: ConnectionPool<C>,
        events: Sender<Event>,
        clock: Arc<CommitClock>,
    ) -> Watchers {
        let mut senders = Vec::with_capacity(n);
        for watcher in 0..n {
            let (tx, rx) = crossbeam_channel::bounded(1);
            let (pool, events, clock) = (pool.clone(), events.clone(), Arc::clone(&clock));
            let spawned = std::thread::Builder::new()
                .name(format!("dtb-watcher-{watcher}"))
                .spawn(move || watch(watcher, waits, &pool, &rx, &events, &clock));
            match spawned {
                Ok(_) => senders.push(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a watcher thread: fewer watchers");
                    break;
                }
            }
        }
        let busy = vec![None; senders.len()];
        Watchers { senders, busy }
    }

    /// How many watchers have no work.
    pub(super) fn free(&self) -> usize {
        self.busy.iter().filter(|b| b.is_none()).count()
    }

    /// Gives `assignment` to a free watcher, and says which; `None` when none is free.
    pub(super) fn assign(&mut self, assignment: Assignment) -> Option<usize> {
        let watcher = self.busy.iter().position(Option::is_none)?;
        self.senders[watcher].try_send(assignment).ok()?;
        self.busy[watcher] = Some(assignment.id);
        Some(watcher)
    }

    /// Notes that watcher `report.watcher` is free again.
    pub(super) fn reported(&mut self, report: &Report) {
        if let Some(busy) = self.busy.get_mut(report.watcher) {
            *busy = None;
        }
    }
}

/// A watcher thread: waits for assignments until the waiter drops its sender.
fn watch<C: BarrierConnection>(
    watcher: usize,
    waits: &'static dyn LockWaits<C>,
    pool: &ConnectionPool<C>,
    assignments: &Receiver<Assignment>,
    events: &Sender<Event>,
    clock: &CommitClock,
) {
    let prove: Option<&'static dyn Prove<C>> = match C::durability() {
        Durability::Proven(prove) => Some(prove),
        Durability::BeforeVisible => None,
    };
    let mut conn: Option<r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>> = None;
    loop {
        let assignment = match assignments.recv_timeout(IDLE) {
            Ok(assignment) => assignment,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: the connection goes back to the pool.
                conn = None;
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let watched = match conn.as_mut() {
            Some(c) => wait(&mut **c, waits, prove, &assignment, clock),
            None => match pool.get() {
                Ok(c) => wait(&mut **conn.insert(c), waits, prove, &assignment, clock),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), "a watcher cannot get a database connection");
                    Watched::Failed
                }
            },
        };
        if watched == Watched::Failed {
            // A connection that failed (killed, say) is not reused; the pool checks the
            // others.
            if let Some(mut c) = conn.take() {
                crate::backend::poison(&mut *c);
            }
            std::thread::sleep(RETRY);
        }
        let report = Report {
            watcher,
            id: assignment.id,
            watched,
        };
        if events.send(Event::Watched(report)).is_err() {
            return;
        }
    }
}

/// Waits on `assignment`'s row, and fences a commit it wakes to.
fn wait<C: BarrierConnection>(
    conn: &mut C,
    waits: &'static dyn LockWaits<C>,
    prove: Option<&'static dyn Prove<C>>,
    assignment: &Assignment,
    clock: &CommitClock,
) -> Watched {
    let awaited = match waits.await_row(conn, &assignment.id, assignment.wait) {
        Ok(awaited) => awaited,
        Err(e) => {
            tracing::debug!(barrier_id = %assignment.id, error = %chain(&e), "a watcher's wait failed");
            return Watched::Failed;
        }
    };
    match awaited {
        Awaited::Absent => Watched::Ended,
        Awaited::Held => Watched::Running,
        Awaited::Present => {
            let prove = match prove {
                None => return Watched::Durable { fence_began: 0 },
                // Where only the log's flushed position proves a commit durable (PostgreSQL),
                // the waiter's check reads it: no fence, a hint.
                Some(prove) if !prove.handler_commits_prove() => return Watched::Visible,
                Some(prove) => prove,
            };
            // The fence begins after the wait saw the commit: once it commits, that commit
            // (and every one seen before) is durable.
            let began = clock.now();
            match prove.fence(conn) {
                Ok(()) => {
                    clock.committed(began);
                    Watched::Durable { fence_began: began }
                }
                Err(e) => {
                    tracing::debug!(barrier_id = %assignment.id, error = %chain(&e), "a watcher's fence failed");
                    Watched::Visible
                }
            }
        }
    }
}
