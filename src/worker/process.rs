//! One delivery, from fetch to acknowledgement: read the job's barrier descriptor, wait for
//! the waiter's verdict, then run the handler in the worker transaction that consumes the
//! barrier (or hand the job back, or report why it did not run).

use super::builder::AbortPolicy;
use super::monitor::{Gauge, Stats};
use super::snooze::{hand_back, snooze};
use super::waiter::Answer;
use super::Shared;
use crate::backend::{diesel_transaction, poison, BarrierConnection, Claimed, DieselTransaction};
use crate::descriptor::{BarrierRef, Descriptor};
use crate::error::{chain, Error, Result, TimeoutInfo};
use crate::handlers::{BarrierMode, Registration};
use faktory::Job;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Processes one job, on a Tokio task of the faktory worker.
pub(super) async fn process<C: BarrierConnection>(shared: Arc<Shared<C>>, job: Job) -> Result<()> {
    let _in_flight = Gauge::up(&shared.in_flight, None);
    tracing::trace!(jid = job.id().as_str(), kind = %job.kind, "job fetched");
    let result = process_inner(&shared, job).await;
    if result.is_err() {
        Stats::count(&shared.stats.failed);
    }
    Stats::count(&shared.stats.processed);
    result
}

async fn process_inner<C: BarrierConnection>(shared: &Arc<Shared<C>>, job: Job) -> Result<()> {
    let Some(reg) = shared.handlers.get(&job.kind).cloned() else {
        // faktory only calls us for kinds we registered.
        return Err(Error::UnknownKind {
            kind: job.kind.clone(),
            jid: job.id().to_string(),
        });
    };
    let descriptor = Descriptor::from_job(&job).inspect_err(|e| {
        tracing::error!(jid = job.id().as_str(), kind = %job.kind, error = %chain(e), "malformed barrier");
    })?;
    match descriptor {
        None if reg.mode == BarrierMode::Required => {
            tracing::error!(jid = job.id().as_str(), kind = %job.kind, "job pushed without a barrier");
            Err(Error::BarrierRequired {
                kind: job.kind.clone(),
                jid: job.id().to_string(),
            })
        }
        None | Some(Descriptor::NoWait) => {
            if shared.is_draining() {
                return hand_back(shared, &job, None, "shutting down");
            }
            run_on_pool(shared, reg, job, None).await
        }
        Some(Descriptor::Barrier(b)) => {
            if b.backend != C::NAME {
                return Err(Error::MalformedBarrier {
                    jid: job.id().to_string(),
                    reason: format!(
                        "the barrier lives on backend {:?}, this worker resolves {:?}",
                        truncated(&b.backend),
                        C::NAME
                    ),
                });
            }
            if let (Some(theirs), Some(ours)) = (&b.db, &shared.location) {
                if theirs != ours {
                    // The row is in a table this worker cannot see: waiting would end in "not
                    // committed" for a transaction that may well have committed.
                    tracing::error!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, barrier_table = %theirs, worker_table = %ours, "the barrier is in another barrier table");
                    return Err(Error::BarrierElsewhere {
                        jid: job.id().to_string(),
                        barrier_table: theirs.clone(),
                        worker_table: ours.clone(),
                    });
                }
            }
            run_barrier(shared, reg, job, b).await
        }
    }
}

fn truncated(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

async fn run_barrier<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    reg: Registration<C>,
    job: Job,
    b: BarrierRef,
) -> Result<()> {
    let cfg = &shared.config;
    if shared.is_draining() {
        return hand_back(shared, &job, Some(&b), "shutting down");
    }
    let waiter = shared.waiter();
    let age = job_age(&job);
    let limit = cfg
        .block_limit
        .min(cfg.deadline.saturating_sub(age))
        .max(Duration::from_millis(50));
    let started = Instant::now();
    let (rx, waiting) = waiter.register(b.id, b.txid.clone());
    let answer = match tokio::time::timeout(limit, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Answer::ShuttingDown,
        // Still running when the time was up.
        Err(_) => Answer::Pending,
    };
    drop(waiting);
    let waited = started.elapsed();
    crate::metrics::barrier_wait(answer.label(), waited);
    tracing::debug!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, ?answer, ?waited, "barrier wait ended");
    match answer {
        Answer::ShuttingDown => hand_back(shared, &job, Some(&b), "shutting down"),
        Answer::Overflow => {
            Stats::count(&shared.stats.overflowed);
            hand_back(shared, &job, Some(&b), "too many jobs waiting")
        }
        Answer::Pending => {
            if age + waited >= cfg.deadline {
                Stats::count(&shared.stats.timed_out);
                return Err(timed_out(shared, &job, &b, age + waited).await);
            }
            Stats::count(&shared.stats.snoozed);
            snooze(
                shared,
                &job,
                Some(&b),
                cfg.snooze_delay,
                "block limit reached",
            )
        }
        Answer::NotCommitted => {
            Stats::count(&shared.stats.aborted);
            tracing::info!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, "transaction did not commit (or the barrier was already consumed): job aborted");
            match cfg.abort_policy {
                AbortPolicy::Ack => Ok(()),
                AbortPolicy::Fail => Err(Error::Aborted {
                    barrier_id: b.id.to_string(),
                    jid: job.id().to_string(),
                }),
            }
        }
        Answer::Committed => run_on_pool(shared, reg, job, Some(b)).await,
    }
}

async fn timed_out<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    job: &Job,
    b: &BarrierRef,
    age: Duration,
) -> Error {
    let (shared2, id, txid) = (Arc::clone(shared), b.id, b.txid.clone());
    let transaction = tokio::task::spawn_blocking(move || {
        let mut conn = shared2.pool.get().map_err(|e| e.to_string())?;
        conn.transaction_info(&id, txid.as_deref())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .unwrap_or_else(|e| Some(format!("unavailable ({e})")));
    let info = TimeoutInfo {
        barrier_id: b.id.to_string(),
        jid: job.id().to_string(),
        age,
        txid: b.txid.clone(),
        transaction,
    };
    tracing::warn!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, info = %info, "barrier timed out");
    Error::BarrierTimeout(Box::new(info))
}

enum Outcome {
    Ran,
    Duplicate,
    Busy,
    /// The barrier is another job's: the delivery carries a copied descriptor.
    Foreign,
}

/// Takes a handler slot and runs the job on a blocking thread with a pooled connection: for a
/// barrier job, inside the worker transaction that claims and deletes the barrier row.
async fn run_on_pool<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    reg: Registration<C>,
    job: Job,
    barrier: Option<BarrierRef>,
) -> Result<()> {
    let _slot = Arc::clone(&shared.handler_slots)
        .acquire_owned()
        .await
        .map_err(|_| Error::ShuttingDown)?;
    let shared2 = Arc::clone(shared);
    let job2 = job.clone();
    let b2 = barrier.clone();
    // What binds this delivery to the barrier it may consume.
    let digest = barrier.as_ref().map(|_| crate::binding::job_digest(&job));
    let slot_taken = Instant::now();
    let (outcome, phases) = tokio::task::spawn_blocking(move || {
        let _running = Gauge::up(&shared2.stats.running, Some(crate::metrics::HANDLERS_RUNNING));
        let mut phases = Phases::new(slot_taken);
        let mut conn = shared2.pool.get()?;
        phases.checked_out = phases.since();
        let mut lost = false;
        // The handler, and for a barrier job the check that its claim still stands.
        let mut run = |c: &mut C| -> Result<()> {
            phases.claimed = phases.since();
            call_handler(&reg, &job2, c)?;
            phases.handled = phases.since();
            if let Some(b) = &b2 {
                // The barrier's deletion must commit with the handler's writes: the handler
                // must not have lost the transaction (a deadlock, an implicit commit, a
                // `COMMIT` sent as SQL), or "ran" would be a lie.
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
        let result = match (&b2, &digest) {
            (Some(b), Some(digest)) => {
                // The claim is a write that begins after every check the waiter has made so
                // far: once it commits, every commit those checks saw is durable (where the
                // backend's commits are durable when they return).
                let began = shared2.commits.now();
                conn.claiming_transaction(&b.id, digest, &mut run)
                    .map(|claimed| match claimed {
                        Claimed::Ran(()) => {
                            if C::HANDLER_COMMITS_PROVE {
                                shared2.commits.committed(began);
                            }
                            Outcome::Ran
                        }
                        Claimed::Gone => Outcome::Duplicate,
                        Claimed::Busy => Outcome::Busy,
                        Claimed::Foreign => Outcome::Foreign,
                    })
            }
            _ => C::worker_transaction(&mut *conn, |c| run(c).map(|()| Outcome::Ran)),
        };
        phases.committed = phases.since();
        let result = if lost {
            // Whatever the rollback attempt answered, this is what happened; and the
            // connection's state no longer matches Diesel's: let the pool discard it.
            poison(&mut *conn);
            tracing::error!(jid = job2.id().as_str(), kind = %job2.kind, "the handler's transaction was ended by the database; the delivery fails and will be retried");
            Err(Error::TransactionEnded {
                context: "while the handler ran",
            })
        } else {
            result
        };
        if let (Err(Error::Handler { .. } | Error::HandlerPanic { .. }), Some(b)) = (&result, &b2) {
            // The job now lives in Faktory's retries: keep the reconciler off it until it is
            // overdue from there.
            let due = shared2.config.retry_schedule.due(&job2);
            if let Err(e) = conn.mark_attempted(&b.id, due) {
                tracing::warn!(barrier_id = %b.id, error = %chain(&e), "could not mark the barrier attempted");
            }
        }
        result.map(|outcome| (outcome, phases))
    })
    .await
    .map_err(|e| Error::HandlerPanic {
        jid: job.id().to_string(),
        message: e.to_string(),
    })??;
    Stats::count(match &outcome {
        Outcome::Ran => &shared.stats.ran,
        Outcome::Duplicate => &shared.stats.duplicates,
        Outcome::Busy => &shared.stats.snoozed,
        Outcome::Foreign => &shared.stats.refused,
    });
    match (outcome, &barrier) {
        (Outcome::Ran, Some(b)) => {
            tracing::debug!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, took = ?slot_taken.elapsed(), checkout_us = phases.checked_out, begin_claim_us = phases.claimed, handler_us = phases.handled, check_us = phases.checked, commit_us = phases.committed, "handler ran; barrier consumed");
            Ok(())
        }
        (Outcome::Ran, None) => {
            tracing::debug!(jid = job.id().as_str(), kind = %job.kind, took = ?slot_taken.elapsed(), checkout_us = phases.checked_out, begin_us = phases.claimed, handler_us = phases.handled, commit_us = phases.committed, "handler ran (no barrier)");
            Ok(())
        }
        (Outcome::Duplicate, b) => {
            tracing::info!(barrier_id = ?b.as_ref().map(|b| b.id), jid = job.id().as_str(), kind = %job.kind, "barrier already consumed: duplicate delivery skipped");
            Ok(())
        }
        (Outcome::Busy, b) => snooze(
            shared,
            &job,
            b.as_ref(),
            shared.config.snooze_delay,
            "another delivery holds the barrier",
        ),
        (Outcome::Foreign, b) => {
            let barrier_id = b.as_ref().map(|b| b.id.to_string()).unwrap_or_default();
            tracing::error!(%barrier_id, jid = job.id().as_str(), kind = %job.kind, "the job carries the barrier of another job (its kind, queue, arguments or custom data differ from those enqueued with the barrier): refused, the barrier is left to its own job");
            Err(Error::ForeignBarrier {
                jid: job.id().to_string(),
                barrier_id,
            })
        }
    }
}

/// When each step of a handler run ended, in microseconds since its handler slot was taken
/// (for the debug event that reports a run).
struct Phases {
    start: Instant,
    checked_out: u64,
    claimed: u64,
    handled: u64,
    checked: u64,
    committed: u64,
}

impl Phases {
    fn new(start: Instant) -> Phases {
        Phases {
            start,
            checked_out: 0,
            claimed: 0,
            handled: 0,
            checked: 0,
            committed: 0,
        }
    }

    fn since(&self) -> u64 {
        super::waiter::micros_since(self.start)
    }
}

fn call_handler<C: BarrierConnection>(
    reg: &Registration<C>,
    job: &Job,
    conn: &mut C,
) -> Result<()> {
    match catch_unwind(AssertUnwindSafe(|| (reg.handler)(job, conn))) {
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

/// How long ago the job was created (or first enqueued).
fn job_age(job: &Job) -> Duration {
    let since = job.created_at.or(job.enqueued_at);
    since
        .and_then(|t| (chrono::Utc::now() - t).to_std().ok())
        .unwrap_or_default()
}
