//! `enqueue_with_barrier`: the producer side.

use crate::backend::{
    diesel_transaction, BarrierConnection, DieselTransaction, NewBarrier, ServerTransaction,
};
use crate::descriptor::{BarrierRef, Descriptor, CUSTOM_KEY};
use crate::error::{Error, Result};
use crate::handlers::Handlers;
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
}

impl<C: BarrierConnection> EnqueueWithBarrier for C {
    fn enqueue_with_barrier(&mut self, producer: &Producer, mut job: Job) -> Result<JobId> {
        let jid = job.id().clone();
        if let Inner::Inline(handlers) = &*producer.inner {
            let handlers = handlers.as_any().downcast_ref::<Handlers<C>>().ok_or(
                Error::InlineWrongConnection {
                    expected: handlers.connection_type(),
                },
            )?;
            return run_inline(handlers, self, job).map(|()| jid);
        }

        let depth = match diesel_transaction(self) {
            DieselTransaction::Broken => return Err(Error::BrokenTransaction),
            DieselTransaction::Open {
                must_roll_back: true,
                ..
            } => return Err(Error::BrokenTransaction),
            DieselTransaction::Open { depth, .. } => depth,
            DieselTransaction::None => 0,
        };
        // Diesel's count is not the whole truth: ask the database.
        match (depth, self.server_transaction(depth)?) {
            (0, ServerTransaction::Closed) => {
                job.custom
                    .insert(CUSTOM_KEY.to_string(), Descriptor::NoWait.to_value());
                let kind = job.kind.clone();
                producer.push(job)?;
                tracing::debug!(jid = jid.as_str(), kind = %kind, "enqueued outside a transaction: no barrier");
                return Ok(jid);
            }
            (_, ServerTransaction::Closed) => {
                return Err(Error::TransactionEnded {
                    context: "before the barrier was written",
                })
            }
            (_, ServerTransaction::Open | ServerTransaction::Unknown) => {}
        }

        let id = uuid::Uuid::new_v4();
        // The payload stored with the barrier is the job as it will be pushed, minus the
        // descriptor (which needs the transaction id that the insert itself returns).
        let payload = serde_json::to_string(&job).map_err(|source| Error::JobEncoding {
            jid: jid.to_string(),
            source,
        })?;
        let digest = crate::binding::job_digest(&job);
        let inserted = self
            .insert_barrier(&NewBarrier {
                id: &id,
                job_id: jid.as_ref(),
                job_kind: &job.kind,
                job_queue: &job.queue,
                payload: &payload,
                job_digest: &digest,
            })
            .map_err(|e| {
                if self.missing_table(&e) {
                    Error::MigrationsMissing {
                        table: crate::BARRIER_TABLE,
                    }
                } else {
                    Error::Database(e)
                }
            })?;
        let descriptor = Descriptor::Barrier(BarrierRef {
            backend: C::NAME.to_string(),
            id,
            txid: inserted.txid,
            db: inserted.location,
        });
        job.custom
            .insert(CUSTOM_KEY.to_string(), descriptor.to_value());
        let kind = job.kind.clone();
        if let Err(e) = producer.push_barrier_job(job) {
            withdraw(self, &id);
            return Err(e);
        }
        tracing::debug!(barrier_id = %id, jid = jid.as_str(), kind = %kind, depth, "enqueued with barrier");
        Ok(jid)
    }
}

/// After a failed push: deletes barrier `id` from the connection's transaction, so that an
/// `Err` leaves nothing behind that could run even if the application commits anyway; a copy of
/// the job that reached Faktory despite the error finds no barrier and is aborted. If the row
/// cannot be deleted, the transaction is marked broken: Diesel then refuses to commit it.
fn withdraw<C: BarrierConnection>(conn: &mut C, id: &uuid::Uuid) {
    if let Err(e) = conn.remove_barrier(id) {
        tracing::warn!(barrier_id = %id, error = %crate::error::chain(&e), "could not delete the barrier of a job that was not pushed; the transaction is marked broken");
        crate::backend::poison(conn);
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
    (reg.handler)(&job, conn).map_err(|source| Error::Handler {
        jid: job.id().to_string(),
        source,
    })
}
