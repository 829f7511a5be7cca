//! `enqueue_with_barrier` and `enqueue_many_with_barrier`: the producer side.

use crate::backend::{
    diesel_transaction, BarrierConnection, DieselTransaction, NewBarrier, ServerTransaction,
    INSERT_BATCH,
};
use crate::descriptor::{BarrierRef, Descriptor, CUSTOM_KEY};
use crate::error::{Error, Result};
use crate::handlers::{Handler, Handlers};
use crate::producer::{Inner, Producer};
use faktory::{Job, JobId};

/// Pushes a Faktory job whose handler runs only once the caller's transaction has committed.
///
/// Implemented for every connection type that implements [`BarrierConnection`].
pub trait EnqueueWithBarrier {
    /// Pushes `job` to Faktory now, guarded by a barrier in this connection's transaction.
    ///
    /// * **Inside a transaction** (at any depth, a savepoint included): inserts a barrier row on
    ///   this connection, attaches a descriptor to the job's `custom` data under
    ///   [`CUSTOM_KEY`](crate::CUSTOM_KEY) (its `args` are left exactly as given) and pushes
    ///   it. A worker runs the handler only once this transaction has committed — and never if
    ///   it rolls back, or if the savepoint around this call does. A transaction Diesel did not
    ///   open counts too (a `BEGIN` sent as SQL, MySQL's `autocommit = 0`, a pooled connection
    ///   left inside one): when Diesel counts none, the database is asked.
    /// * **Outside a transaction** (autocommit, as the database confirms): writes nothing and
    ///   pushes the job marked as needing no wait; it runs as soon as a worker fetches it. Where
    ///   the database cannot tell (MySQL, unlike MariaDB, with autocommit on), a barrier row is
    ///   written anyway: it commits at once if there is no transaction, and the job runs then.
    /// * **Inline producer** ([`Producer::inline`]): runs the handler now, on this thread, with
    ///   this connection, even inside a transaction, and returns its error if it fails.
    ///
    /// Returns the job id. An `Err` means the job was not enqueued, whatever the application
    /// does next: when the push fails, the barrier row is deleted again before the error is
    /// returned, so a transaction that swallows the error and commits leaves nothing that could
    /// run — not even a copy of the job that reached Faktory although its answer was lost
    /// ([`Error::FaktoryTimeout`]): that copy finds no barrier and ends as aborted. (Should the
    /// deletion itself fail, the connection's transaction is marked broken, so that Diesel
    /// rolls it back instead of committing it.) Propagating the error with `?` rolls the
    /// transaction back, as usual.
    ///
    /// # Errors
    ///
    /// Besides database and Faktory errors: [`Error::BrokenTransaction`] when the transaction
    /// can only be rolled back (a statement in it failed), and [`Error::TransactionEnded`] when
    /// the database ended the transaction that Diesel still counts as open (a deadlock victim,
    /// an implicit commit). In every case nothing was enqueued.
    fn enqueue_with_barrier(&mut self, producer: &Producer, job: Job) -> Result<JobId>;

    /// Pushes `jobs` to Faktory now, each guarded by a barrier in this connection's
    /// transaction, as [`enqueue_with_barrier`](Self::enqueue_with_barrier) does one job, but
    /// in bulk: the barrier rows go in one statement per 1,000 jobs, and the jobs in one
    /// Faktory `PUSHB` per 1,000 — a few round trips for thousands of jobs. Returns their ids,
    /// in order.
    ///
    /// All or nothing, as for one job: inside a transaction, an `Err` leaves nothing that could
    /// run even if the application commits anyway — when any batch fails to push, every barrier
    /// this call wrote is deleted again before the error is returned, and the jobs of the
    /// batches already pushed find no barrier and end as aborted. Outside a transaction the jobs
    /// are plain jobs, pushed in batches as [`Producer::push_many`] does: an `Err` may then
    /// leave the batches before it pushed. An inline producer runs every handler now, in order.
    ///
    /// # Errors
    ///
    /// Those of [`enqueue_with_barrier`](Self::enqueue_with_barrier), and
    /// [`Error::PushRefused`] when Faktory refused some of the jobs.
    fn enqueue_many_with_barrier<I>(&mut self, producer: &Producer, jobs: I) -> Result<Vec<JobId>>
    where
        I: IntoIterator<Item = Job>;
}

impl<C: BarrierConnection> EnqueueWithBarrier for C {
    fn enqueue_with_barrier(&mut self, producer: &Producer, job: Job) -> Result<JobId> {
        let mut jids = enqueue(self, producer, vec![job])?;
        Ok(jids.remove(0))
    }

    fn enqueue_many_with_barrier<I>(&mut self, producer: &Producer, jobs: I) -> Result<Vec<JobId>>
    where
        I: IntoIterator<Item = Job>,
    {
        enqueue(self, producer, jobs.into_iter().collect())
    }
}

/// Where the jobs' transaction stands.
enum Destination {
    /// No transaction: plain jobs, nothing to wait for.
    Plain,
    /// Inside a transaction, `depth` deep as Diesel counts it (0: one Diesel did not open).
    Barrier { depth: u32 },
}

/// Asks Diesel, and where it cannot tell, the database, whether `conn` is in a transaction.
fn destination<C: BarrierConnection>(conn: &mut C) -> Result<Destination> {
    let depth = match diesel_transaction(conn) {
        DieselTransaction::Broken => return Err(Error::BrokenTransaction),
        DieselTransaction::Open {
            must_roll_back: true,
            ..
        } => return Err(Error::BrokenTransaction),
        DieselTransaction::Open { depth, .. } => depth,
        DieselTransaction::None => 0,
    };
    // Diesel's count is not the whole truth: ask the database.
    match (depth, conn.server_transaction(depth)?) {
        (0, ServerTransaction::Closed) => Ok(Destination::Plain),
        (_, ServerTransaction::Closed) => Err(Error::TransactionEnded {
            context: "before the barrier was written",
        }),
        (_, ServerTransaction::Open | ServerTransaction::Unknown) => {
            Ok(Destination::Barrier { depth })
        }
    }
}

/// Enqueues `jobs`: one (a `PUSH`) or many (`PUSHB`s), with barriers inside a transaction.
fn enqueue<C: BarrierConnection>(
    conn: &mut C,
    producer: &Producer,
    mut jobs: Vec<Job>,
) -> Result<Vec<JobId>> {
    let jids: Vec<JobId> = jobs.iter().map(|j| j.id().clone()).collect();
    if let Inner::Inline(handlers) = &*producer.inner {
        let handlers = handlers.as_any().downcast_ref::<Handlers<C>>().ok_or(
            Error::InlineWrongConnection {
                expected: handlers.connection_type(),
            },
        )?;
        for job in jobs {
            run_inline(handlers, conn, job)?;
        }
        return Ok(jids);
    }
    let depth = match destination(conn)? {
        Destination::Plain => {
            for job in &mut jobs {
                job.custom
                    .insert(CUSTOM_KEY.to_string(), Descriptor::NoWait.to_value());
            }
            let kind = jobs.first().map(|j| j.kind.clone()).unwrap_or_default();
            push(producer, jobs, false)?;
            if let [jid] = jids.as_slice() {
                tracing::debug!(jid = jid.as_str(), kind = %kind, "enqueued outside a transaction: no barrier");
            } else {
                tracing::debug!(
                    jobs = jids.len(),
                    "enqueued outside a transaction: no barriers"
                );
            }
            return Ok(jids);
        }
        Destination::Barrier { depth } => depth,
    };

    // The payload stored with a barrier is the job as it will be pushed, minus the descriptor
    // (which needs the transaction id that the insert itself returns).
    let ids: Vec<uuid::Uuid> = jobs.iter().map(|_| uuid::Uuid::new_v4()).collect();
    let mut payloads = Vec::with_capacity(jobs.len());
    let mut digests = Vec::with_capacity(jobs.len());
    for job in &jobs {
        payloads.push(
            serde_json::to_string(job).map_err(|source| Error::JobEncoding {
                jid: job.id().to_string(),
                source,
            })?,
        );
        digests.push(crate::binding::job_digest(job));
    }
    let rows: Vec<NewBarrier<'_>> = jobs
        .iter()
        .zip(&ids)
        .zip(payloads.iter().zip(&digests))
        .map(|((job, id), (payload, digest))| NewBarrier {
            id,
            job_id: job.id().as_ref(),
            job_kind: &job.kind,
            job_queue: &job.queue,
            payload,
            job_digest: digest,
        })
        .collect();
    let mut inserted = None;
    for (n, batch) in rows.chunks(INSERT_BATCH).enumerate() {
        match conn.insert_barriers(batch) {
            Ok(i) => {
                inserted.get_or_insert(i);
            }
            Err(e) => {
                if conn.missing_table(&e) {
                    return Err(Error::MigrationsMissing {
                        table: crate::BARRIER_TABLE,
                    });
                }
                // Earlier batches are in: take them out again.
                withdraw(conn, &ids[..n * INSERT_BATCH]);
                return Err(Error::Database(e));
            }
        }
    }
    drop(rows);
    let inserted = inserted.unwrap_or_default();
    for (job, id) in jobs.iter_mut().zip(&ids) {
        let descriptor = Descriptor::Barrier(BarrierRef {
            backend: C::NAME.to_string(),
            id: *id,
            txid: inserted.txid.clone(),
            db: inserted.location.clone(),
        });
        job.custom
            .insert(CUSTOM_KEY.to_string(), descriptor.to_value());
    }
    let kind = jobs.first().map(|j| j.kind.clone()).unwrap_or_default();
    if let Err(e) = push(producer, jobs, true) {
        withdraw(conn, &ids);
        return Err(e);
    }
    if let [id] = ids.as_slice() {
        tracing::debug!(barrier_id = %id, jid = jids[0].as_str(), kind = %kind, depth, "enqueued with barrier");
    } else {
        tracing::debug!(jobs = ids.len(), first_barrier_id = ?ids.first(), depth, "enqueued with barriers");
    }
    Ok(jids)
}

/// Pushes `jobs`: one with `PUSH`, more with `PUSHB`s.
fn push(producer: &Producer, mut jobs: Vec<Job>, barriers: bool) -> Result<()> {
    match (jobs.len(), barriers) {
        (1, true) => producer.push_barrier_job(jobs.remove(0)),
        (1, false) => producer.push(jobs.remove(0)),
        (_, true) => producer.push_barrier_jobs(jobs),
        (_, false) => producer.push_many(jobs),
    }
}

/// After a failed push: deletes the barriers `ids` from the connection's transaction, so that
/// an `Err` leaves nothing behind that could run even if the application commits anyway; a
/// copy of a job that reached Faktory despite the error finds no barrier and is aborted. If the
/// rows cannot be deleted, the transaction is marked broken: Diesel then refuses to commit it.
fn withdraw<C: BarrierConnection>(conn: &mut C, ids: &[uuid::Uuid]) {
    if ids.is_empty() {
        return;
    }
    for batch in ids.chunks(INSERT_BATCH) {
        if let Err(e) = conn.remove_barriers(batch) {
            tracing::warn!(barriers = ids.len(), error = %crate::error::chain(&e), "could not delete the barriers of jobs that were not pushed; the transaction is marked broken");
            crate::backend::poison(conn);
            return;
        }
    }
}

/// Inline mode: run the handler now with the caller's connection.
fn run_inline<C: BarrierConnection>(handlers: &Handlers<C>, conn: &mut C, job: Job) -> Result<()> {
    let reg = handlers
        .get(&job.kind)
        .ok_or_else(|| Error::InlineNoHandler {
            kind: job.kind.clone(),
        })?;
    tracing::debug!(jid = job.id().as_str(), kind = %job.kind, "running handler inline");
    match &reg.handler {
        Handler::Connected(f) => f(&job, conn),
        Handler::Detached(f) => f(&job),
    }
    .map_err(|source| Error::Handler {
        jid: job.id().to_string(),
        source,
    })
}
