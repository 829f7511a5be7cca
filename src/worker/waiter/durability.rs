//! The waiter's proofs of durability: a barrier a check saw committed (`Verdict::Visible`) is
//! answered committed only once its commit is proven durable — by a committed write of the
//! worker's own that began after the check (a handler's, where the backend's commits are
//! durable when they return; a watcher's fence), by the database's flushed log position, or,
//! when neither comes within [`PROOF_WAIT`], by a fence the waiter commits itself.

use super::clock::CommitClock;
use super::pending::{PendingSet, Seen};
use super::Answer;
use crate::backend::{BarrierConnection, Durability, Prove};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long barriers seen committed wait for another proof before the waiter commits a fence
/// of its own.
pub(super) const PROOF_WAIT: Duration = Duration::from_millis(5);

/// The least time between two readings of the database's flushed log position while barriers
/// wait for it.
const FLUSH_READ_GAP: Duration = Duration::from_millis(1);

/// The waiter's side of the backend's [`Durability`].
pub(super) struct Prover<C: 'static> {
    /// `None`: commits are durable before they are visible, and nothing waits for a proof.
    prove: Option<&'static dyn Prove<C>>,
    clock: Arc<CommitClock>,
    /// Handlers running now: their commits may prove durability; with none, fence at once.
    running_handlers: Arc<AtomicUsize>,
    last_flush_read: Instant,
}

impl<C: BarrierConnection> Prover<C> {
    pub(super) fn new(clock: Arc<CommitClock>, running_handlers: Arc<AtomicUsize>) -> Self {
        Prover {
            prove: match C::durability() {
                Durability::Proven(prove) => Some(prove),
                Durability::BeforeVisible => None,
            },
            clock,
            running_handlers,
            last_flush_read: Instant::now(),
        }
    }

    /// Now, on the commit clock.
    pub(super) fn clock_now(&self) -> u64 {
        self.clock.now()
    }

    /// When a proof may come or a fence be due, if barriers wait for one: the waiter wakes then.
    pub(super) fn wake_by(&self, pending: &PendingSet) -> Option<Instant> {
        (self.prove.is_some() && !pending.unproven().is_empty())
            .then(|| Instant::now() + FLUSH_READ_GAP)
    }

    /// Answers the barriers seen committed whose durability is now proven, and commits a fence
    /// when no other proof came soon enough. An error means `conn` failed.
    pub(super) fn prove(
        &mut self,
        pending: &mut PendingSet,
        conn: &mut C,
    ) -> diesel::QueryResult<()> {
        let Some(prove) = self.prove else {
            return Ok(());
        };
        let unproven = pending.unproven();
        if unproven.is_empty() {
            return Ok(());
        }
        let flushed = self.read_flushed_position(prove, &unproven, conn)?;
        let mut waiting_longest = 0;
        for &(id, seen) in &unproven {
            let flushed_past = matches!((flushed, seen.position), (Some(f), Some(p)) if f >= p);
            if self.clock.proves(seen.clock) || flushed_past {
                pending.answer(&id, Answer::Committed);
            } else {
                waiting_longest = waiting_longest.max(self.clock.now().saturating_sub(seen.clock));
            }
        }
        if waiting_longest == 0 {
            return Ok(());
        }
        // Where handler commits prove durability, wait a little for theirs while handlers run;
        // where the flushed position does, for the flush.
        let overdue = Duration::from_micros(waiting_longest) >= PROOF_WAIT;
        let handlers_will =
            prove.handler_commits_prove() && self.running_handlers.load(Ordering::SeqCst) > 0;
        let flush_may = !prove.handler_commits_prove();
        if !overdue && (handlers_will || flush_may) {
            return Ok(());
        }
        let began = self.clock.now();
        prove.fence(conn)?;
        self.clock.committed(began);
        tracing::trace!(barriers = unproven.len(), "durability fence");
        for (id, _) in unproven {
            pending.answer(&id, Answer::Committed);
        }
        Ok(())
    }

    /// The database's flushed log position, read at most every [`FLUSH_READ_GAP`], when some
    /// of `unproven` wait for it.
    fn read_flushed_position(
        &mut self,
        prove: &'static dyn Prove<C>,
        unproven: &[(uuid::Uuid, Seen)],
        conn: &mut C,
    ) -> diesel::QueryResult<Option<u64>> {
        if unproven.iter().all(|(_, seen)| seen.position.is_none())
            || self.last_flush_read.elapsed() < FLUSH_READ_GAP
        {
            return Ok(None);
        }
        self.last_flush_read = Instant::now();
        prove.flushed_position(conn)
    }
}
