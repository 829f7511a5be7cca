//! A handler's run, on a blocking thread: a pooled connection, and for a barrier job the worker
//! transaction that claims the barrier, runs the handler, checks that the claim still stands,
//! and commits — the handler's writes and the barrier's consumption together, once.

use super::kept::Slot;
use super::phases::Phases;
use super::Shared;
use crate::backend::{diesel_transaction, poison, BarrierConnection, Claimed, DieselTransaction};
use crate::descriptor::BarrierRef;
use crate::error::BoxError;
use crate::error::{chain, Error, Result};
use crate::handlers::HandlerFn;
use faktory::Job;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// How a run ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The handler ran, and its transaction (consuming the barrier, if any) committed.
    Ran,
    /// The barrier is gone: an earlier delivery consumed it.
    Duplicate,
    /// Another delivery holds the barrier now.
    Busy,
    /// The barrier is another job's: the delivery carries a copied descriptor.
    Foreign,
}

/// Runs `job`'s handler on this thread, with a connection from the worker's pool: for a barrier
/// job, inside the worker transaction that claims and deletes its barrier (`digest` binds the
/// delivery to it). `slot_taken` is when the handler slot was taken, where the timings start.
pub(super) fn run<C: BarrierConnection>(
    shared: &Shared<C>,
    handler: &HandlerFn<C>,
    job: &Job,
    barrier: Option<(&BarrierRef, &str)>,
    slot_taken: Instant,
) -> Result<(Outcome, Phases)> {
    let slot = shared.kept.take(&shared.pool)?;
    let kept = !slot.fresh;
    match run_on(shared, slot, handler, job, barrier, slot_taken) {
        // A kept connection that failed before the handler was called (the server restarted,
        // say): the pool would have caught that at checkout. Once more, on one from the pool.
        Err((Error::Database(e), false)) if kept => {
            tracing::debug!(error = %chain(&Error::Database(e)), "a kept connection failed before the handler ran; once more on a pooled one");
            let slot = shared.kept.take_fresh(&shared.pool)?;
            run_on(shared, slot, handler, job, barrier, slot_taken).map_err(|(e, _)| e)
        }
        result => result.map_err(|(e, _)| e),
    }
}

/// [`run`] on the connection of `slot`; an error comes with whether the handler was called.
fn run_on<C: BarrierConnection>(
    shared: &Shared<C>,
    mut slot: Slot<C>,
    handler: &HandlerFn<C>,
    job: &Job,
    barrier: Option<(&BarrierRef, &str)>,
    slot_taken: Instant,
) -> std::result::Result<(Outcome, Phases), (Error, bool)> {
    let mut phases = Phases::new(slot_taken);
    let conn = &mut slot.conn;
    phases.checked_out = phases.since();
    let mut lost = false;
    let mut called = false;
    // The handler, and for a barrier job the check that its claim still stands.
    let mut handle = |c: &mut C| -> Result<()> {
        called = true;
        phases.claimed = phases.since();
        call_handler(job, || handler(job, c))?;
        phases.handled = phases.since();
        if let Some((b, _)) = barrier {
            // The barrier's deletion must commit with the handler's writes: the handler must
            // not have lost the transaction (a deadlock, an implicit commit, a `COMMIT` sent as
            // SQL), or "ran" would be a lie.
            let intact = matches!(
                diesel_transaction(c),
                DieselTransaction::Open {
                    depth: 1,
                    must_roll_back: false
                }
            );
            if !intact || !c.claim_holds(&b.id)? {
                lost = true;
                return Err(Error::TransactionEnded {
                    context: "while the handler ran",
                });
            }
        }
        phases.checked = phases.since();
        Ok(())
    };
    let result = match barrier {
        Some((b, digest)) => {
            // The claim is a write that begins after every check the waiter has made so far:
            // once it commits, every commit those checks saw is durable (where the backend's
            // commits are durable when they return).
            let began = shared.commits.now();
            conn.claiming_transaction(&b.id, digest, &mut handle)
                .map(|claimed| match claimed {
                    Claimed::Ran(()) => {
                        if handler_commits_prove::<C>() {
                            shared.commits.committed(began);
                        }
                        Outcome::Ran
                    }
                    Claimed::Gone => Outcome::Duplicate,
                    Claimed::Busy => Outcome::Busy,
                    Claimed::Foreign => Outcome::Foreign,
                })
        }
        None => C::worker_transaction(&mut *conn, |c| handle(c).map(|()| Outcome::Ran)),
    };
    phases.committed = phases.since();
    let result = if lost {
        // Whatever the rollback attempt answered, this is what happened; and the connection's
        // state no longer matches Diesel's: let the pool discard it.
        poison(&mut *conn);
        tracing::error!(jid = job.id().as_str(), kind = %job.kind, "the handler's transaction was ended by the database; the delivery fails and will be retried");
        Err(Error::TransactionEnded {
            context: "while the handler ran",
        })
    } else {
        result
    };
    if let (Err(Error::Handler { .. } | Error::HandlerPanic { .. }), Some((b, _))) =
        (&result, barrier)
    {
        // The job now lives in Faktory's retries: keep the reconciler off it until it is
        // overdue from there.
        let due = shared.config.retry_schedule.due(job);
        if let Err(e) = conn.mark_attempted(&b.id, due) {
            tracing::warn!(barrier_id = %b.id, error = %chain(&e), "could not mark the barrier attempted");
        }
    }
    // Kept for the next run only after a clean one: after any error it goes back to the
    // pool, which tests it before handing it out again.
    shared.kept.give_back(slot, result.is_ok());
    result
        .map(|outcome| (outcome, phases))
        .map_err(|e| (e, called))
}

/// Whether a committed handler transaction proves durable what the waiter saw before it began.
fn handler_commits_prove<C: BarrierConnection>() -> bool {
    match C::durability() {
        crate::backend::Durability::Proven(prove) => prove.handler_commits_prove(),
        crate::backend::Durability::BeforeVisible => false,
    }
}

/// Calls `handler` for `job`, turning its error or panic into the delivery's error.
pub(super) fn call_handler(
    job: &Job,
    handler: impl FnOnce() -> std::result::Result<(), BoxError>,
) -> Result<()> {
    match catch_unwind(AssertUnwindSafe(handler)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::Handler {
            jid: job.id().to_string(),
            source,
        }),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(jid = job.id().as_str(), kind = %job.kind, %message, "handler panicked");
            Err(Error::HandlerPanic {
                jid: job.id().to_string(),
                message,
            })
        }
    }
}
