//! One delivery, from fetch to acknowledgement, on a Tokio task: read the job's barrier
//! descriptor, wait for the waiter's verdict, then take a handler slot and run the handler on a
//! blocking thread (`run.rs`) — or hand the job back, or report why it did not run. Each
//! outcome is counted here, once.

use super::builder::AbortPolicy;
use super::monitor::{Gauge, Stats};
use super::run::{self, Outcome};
use super::snooze::{hand_back, snooze};
use super::waiter::Answer;
use super::Shared;
use crate::backend::BarrierConnection;
use crate::descriptor::{BarrierRef, Descriptor};
use crate::error::{chain, Error, Result, TimeoutInfo};
use crate::handlers::{BarrierMode, Handler, Registration};
use faktory::Job;
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
    // What binds this delivery to the barrier it may consume.
    let digest = crate::binding::job_digest(&job);
    let (rx, waiting) = waiter.register(b.id, b.txid.clone(), Some(job.clone()), Some(digest));
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
        Answer::Parked => {
            // The waiter keeps the job until its transaction ends: this delivery is done.
            Stats::count(&shared.stats.parked_total);
            tracing::debug!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, "job parked until its transaction ends");
            Ok(())
        }
        Answer::Pending => {
            if age + waited >= cfg.deadline {
                Stats::count(&shared.stats.timed_out);
                return Err(timed_out(shared, &job, &b, age + waited).await);
            }
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
        Answer::Committed => run_on_pool(shared, reg, job, Some((b, false))).await,
        Answer::Bound => run_on_pool(shared, reg, job, Some((b, true))).await,
        Answer::Foreign => Err(refused(shared, &job, Some(b.id))),
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

/// Runs the job's handler — with a connection, in the worker transaction that claims its
/// barrier (`run.rs`), or without one (`detached.rs`) — then counts the outcome and reports
/// it. `barrier` comes with whether the waiter found it bound to this job.
async fn run_on_pool<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    reg: Registration<C>,
    job: Job,
    barrier: Option<(BarrierRef, bool)>,
) -> Result<()> {
    let (outcome, phases) = match reg.handler {
        Handler::Connected(handler) => {
            run_connected(shared, handler, &job, barrier.as_ref()).await?
        }
        Handler::Detached(handler) => {
            super::detached::run(
                shared,
                handler,
                &job,
                barrier.as_ref().map(|(b, bound)| (b, *bound)),
            )
            .await?
        }
    };
    let barrier = barrier.map(|(b, _)| b);
    let barrier_id = barrier.as_ref().map(|b| b.id);
    match outcome {
        Outcome::Ran => {
            Stats::count(&shared.stats.ran);
            match barrier_id {
                Some(id) => {
                    tracing::debug!(barrier_id = %id, jid = job.id().as_str(), kind = %job.kind, ?phases, "handler ran; barrier consumed");
                }
                None => {
                    tracing::debug!(jid = job.id().as_str(), kind = %job.kind, ?phases, "handler ran (no barrier)");
                }
            }
            Ok(())
        }
        Outcome::Duplicate => {
            Stats::count(&shared.stats.duplicates);
            tracing::info!(barrier_id = ?barrier_id, jid = job.id().as_str(), kind = %job.kind, "barrier already consumed: duplicate delivery skipped");
            Ok(())
        }
        Outcome::Busy => snooze(
            shared,
            &job,
            barrier.as_ref(),
            shared.config.snooze_delay,
            "another delivery holds the barrier",
        ),
        Outcome::Foreign => Err(refused(shared, &job, barrier_id)),
    }
}

/// Takes a handler slot and runs the job on a blocking thread, with a connection (see
/// `run.rs`).
async fn run_connected<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    handler: Arc<crate::handlers::HandlerFn<C>>,
    job: &Job,
    barrier: Option<&(BarrierRef, bool)>,
) -> Result<(Outcome, super::phases::Phases)> {
    let _slot = Arc::clone(&shared.handler_slots)
        .acquire_owned()
        .await
        .map_err(|_| Error::ShuttingDown)?;
    let slot_taken = Instant::now();
    let (shared2, job2, barrier2) = (
        Arc::clone(shared),
        job.clone(),
        barrier.map(|(b, _)| b.clone()),
    );
    tokio::task::spawn_blocking(move || {
        let _running = Gauge::up(
            &shared2.stats.running,
            Some(crate::metrics::HANDLERS_RUNNING),
        );
        // What binds this delivery to the barrier it may consume.
        let digest = barrier2.as_ref().map(|_| crate::binding::job_digest(&job2));
        let claim = barrier2.as_ref().zip(digest.as_deref());
        run::run(&shared2, &*handler, &job2, claim, slot_taken)
    })
    .await
    .map_err(|e| Error::HandlerPanic {
        jid: job.id().to_string(),
        message: e.to_string(),
    })?
}

/// Counts and logs a delivery refused for carrying another job's barrier; its error.
fn refused<C: BarrierConnection>(
    shared: &Shared<C>,
    job: &Job,
    barrier_id: Option<uuid::Uuid>,
) -> Error {
    Stats::count(&shared.stats.refused);
    tracing::error!(barrier_id = ?barrier_id, jid = job.id().as_str(), kind = %job.kind, "the job carries the barrier of another job (its kind, queue, arguments or custom data differ from those enqueued with the barrier): refused, the barrier is left to its own job");
    Error::ForeignBarrier {
        jid: job.id().to_string(),
        barrier_id: barrier_id.map(|id| id.to_string()).unwrap_or_default(),
    }
}

/// How long ago the job was created (or first enqueued).
fn job_age(job: &Job) -> Duration {
    let since = job.created_at.or(job.enqueued_at);
    since
        .and_then(|t| (chrono::Utc::now() - t).to_std().ok())
        .unwrap_or_default()
}
