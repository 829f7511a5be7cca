use std::fmt;
use std::time::Duration;

/// A boxed error returned by a job handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in this crate.
///
/// Each variant says what happened and, where there is one, what the caller can do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transaction that enqueued this job did not commit (it rolled back, the savepoint
    /// around the enqueue was rolled back, or the producer's connection died), or the barrier
    /// was already consumed by an earlier delivery of the same job.
    ///
    /// Workers report this only when configured with [`AbortPolicy::Fail`](crate::AbortPolicy);
    /// by default such jobs are acknowledged and logged.
    #[error("barrier {barrier_id} was never committed (job {jid} aborted)")]
    Aborted {
        /// The barrier's id.
        barrier_id: String,
        /// The Faktory job id.
        jid: String,
    },

    /// A job of a kind that requires a barrier arrived without one: it was pushed with a plain
    /// Faktory push instead of [`enqueue_with_barrier`](crate::EnqueueWithBarrier::enqueue_with_barrier).
    ///
    /// Push it through `enqueue_with_barrier`, or register the kind with
    /// [`WorkerBuilder::register_without_barrier`](crate::WorkerBuilder::register_without_barrier).
    #[error(
        "job {jid} of kind {kind:?} requires a transaction barrier but was pushed without one"
    )]
    BarrierRequired {
        /// The job kind.
        kind: String,
        /// The Faktory job id.
        jid: String,
    },

    /// The producer's transaction was still open when the worker's total waiting deadline
    /// passed. The job fails (and is retried by Faktory per its `retry` setting).
    #[error("gave up waiting: {0}")]
    BarrierTimeout(Box<TimeoutInfo>),

    /// The barrier descriptor attached to the job is not one this crate wrote.
    #[error("malformed barrier on job {jid}: {reason}")]
    MalformedBarrier {
        /// The Faktory job id.
        jid: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The barrier table does not exist: call [`run_migrations`](crate::run_migrations) (or
    /// apply the SQL shown in the crate docs) on this database first.
    #[error("the barrier table `{table}` is missing: run diesel_transaction_barrier::run_migrations on this database first")]
    MigrationsMissing {
        /// The table that was looked for.
        table: &'static str,
    },

    /// Applying the embedded migrations failed.
    #[error("running the barrier migrations failed: {0}")]
    Migration(BoxError),

    /// A database error (its cause is the error's [`source`](std::error::Error::source)).
    #[error("database error")]
    Database(#[from] diesel::result::Error),

    /// A database connection could not be obtained.
    #[error("database connection")]
    Connection(#[from] diesel::ConnectionError),

    /// The connection pool could not hand out a connection.
    #[error("connection pool")]
    Pool(#[from] r2d2::Error),

    /// Talking to Faktory failed.
    #[error("faktory")]
    Faktory(#[from] faktory::Error),

    /// Faktory refused some of the jobs of a bulk push (`PUSHB`): `count` of them, the first
    /// (by job id) with its reason.
    #[error("faktory refused {count} job(s) of a bulk push, first {first}")]
    PushRefused {
        /// How many jobs were refused.
        count: usize,
        /// The first refused job's id and Faktory's reason.
        first: String,
    },

    /// Talking to Faktory took longer than the configured timeout.
    #[error("faktory did not answer within {0:?}")]
    FaktoryTimeout(Duration),

    /// `enqueue_with_barrier` was called on a connection whose transaction is broken (a
    /// previous statement failed, or the transaction was chosen as a deadlock victim); roll it
    /// back first. Nothing was enqueued.
    #[error("the connection's transaction is broken; roll it back before enqueueing")]
    BrokenTransaction,

    /// The database ended a transaction that Diesel still counts as open: a deadlock or a lock
    /// wait timeout rolled it back, or a statement committed it implicitly (DDL, `LOCK TABLES`,
    /// `SET autocommit = 1` on MySQL; an explicit `COMMIT` or `ROLLBACK` sent as SQL).
    ///
    /// From `enqueue_with_barrier`: nothing was enqueued (a barrier written now would commit on
    /// its own); roll back and run the transaction again. From a worker: the handler's
    /// transaction was lost, so the delivery fails and Faktory retries it; a retry that finds
    /// the barrier consumed does not run the handler again.
    #[error("the database ended the transaction that Diesel still counts as open ({context})")]
    TransactionEnded {
        /// Where it was noticed.
        context: &'static str,
    },

    /// The job's barrier was written to a barrier table that this worker does not read (another
    /// database, or, on PostgreSQL, another schema reached through a different `search_path`).
    /// The worker cannot see the row, and would otherwise take it for a rollback: the job fails
    /// instead, and is retried. Point the producer and the worker at the same barrier table.
    #[error("job {jid}'s barrier was written to {barrier_table} but this worker reads {worker_table}; give the producer and the worker the same database and search_path")]
    BarrierElsewhere {
        /// The Faktory job id.
        jid: String,
        /// Where the producer wrote the barrier.
        barrier_table: String,
        /// Where this worker reads barriers.
        worker_table: String,
    },

    /// The job carries the descriptor of a barrier that was enqueued with another job: its kind,
    /// queue, arguments or custom data differ from those stored with the barrier (a job pushed
    /// to Faktory with a descriptor copied from another job). The worker does not run it and
    /// leaves the barrier to its own job; the delivery fails, so it shows in Faktory's retries
    /// and, in the end, its dead set.
    #[error("job {jid} carries the barrier {barrier_id} of another job: refused")]
    ForeignBarrier {
        /// The Faktory job id of the delivery refused.
        jid: String,
        /// The barrier's id.
        barrier_id: String,
    },

    /// A handler that takes no connection ran, but its barrier could not be deleted (the
    /// database failed, or the worker stopped first): the delivery fails, and the job will run
    /// again (see
    /// [`Handlers::register_without_connection`](crate::Handlers::register_without_connection)).
    #[error("job {jid} ran, but its barrier could not be deleted: {message}")]
    BarrierNotConsumed {
        /// The Faktory job id.
        jid: String,
        /// Why.
        message: String,
    },

    /// An inline producer ([`Producer::inline`](crate::Producer::inline)) was given a
    /// connection of another type than its handlers take.
    #[error("this inline producer's handlers take {expected}, not the connection it was given")]
    InlineWrongConnection {
        /// The connection type the handlers take.
        expected: &'static str,
    },

    /// An inline producer has no handler for the job's kind: register one in the
    /// [`Handlers`](crate::Handlers) it was built with.
    #[error("this inline producer has no handler for job kind {kind:?}")]
    InlineNoHandler {
        /// The job kind.
        kind: String,
    },

    /// [`Producer::push`](crate::Producer::push) was called on an inline producer, which has no
    /// connection to give a handler: use
    /// [`enqueue_with_barrier`](crate::EnqueueWithBarrier::enqueue_with_barrier).
    #[error("an inline producer cannot push: use enqueue_with_barrier")]
    InlinePush,

    /// The job handler returned an error (the handler's error is this error's
    /// [`source`](std::error::Error::source)).
    #[error("handler for job {jid} failed")]
    Handler {
        /// The Faktory job id.
        jid: String,
        /// The handler's error.
        source: BoxError,
    },

    /// The job handler panicked.
    #[error("handler for job {jid} panicked: {message}")]
    HandlerPanic {
        /// The Faktory job id.
        jid: String,
        /// The panic message.
        message: String,
    },

    /// A job reached the worker for a kind it has no handler for. (Faktory hands a worker only
    /// the kinds it registered, so this points at a bug.)
    #[error("no handler for job {jid} of kind {kind:?}")]
    UnknownKind {
        /// The job kind.
        kind: String,
        /// The Faktory job id.
        jid: String,
    },

    /// A job could not be turned into JSON, or back.
    #[error("job {jid} cannot be encoded as JSON")]
    JobEncoding {
        /// The Faktory job id.
        jid: String,
        /// What serde said.
        source: serde_json::Error,
    },

    /// The worker is shutting down: the job was not run (Faktory gives it to another worker).
    #[error("the worker is shutting down")]
    ShuttingDown,

    /// The private Tokio runtime that drives the Faktory client could not be started.
    #[error("cannot start a Tokio runtime")]
    Runtime(#[source] std::io::Error),

    /// The worker could not install its signal handlers
    /// ([`WorkerBuilder::handle_signals`](crate::WorkerBuilder::handle_signals)).
    #[error("cannot listen for the process's signals")]
    Signals(#[source] std::io::Error),

    /// The producer's runtime stopped before it answered (the producer is being dropped).
    #[error("the producer stopped before the push was answered")]
    ProducerStopped,

    /// The worker's connection pool is smaller than it needs: one connection per handler
    /// ([`WorkerBuilder::workers`](crate::WorkerBuilder::workers)) and two for the waiter.
    #[error("the connection pool holds at most {max_size} connections; the worker needs {needed} (one per handler, two for its waiter)")]
    PoolTooSmall {
        /// The pool's `max_size`.
        max_size: u32,
        /// The connections the worker needs.
        needed: u32,
    },
}

/// Shows an error followed by each of its causes: `outer: cause: root cause`. Logs use it, so
/// that nothing of the chain is lost.
pub(crate) fn chain<E: std::error::Error + ?Sized>(error: &E) -> Chain<'_, E> {
    Chain(error)
}

/// See [`chain`].
pub(crate) struct Chain<'a, E: ?Sized>(&'a E);

impl<E: std::error::Error + ?Sized> fmt::Display for Chain<'_, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// What a worker knew about a barrier when it gave up waiting for it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TimeoutInfo {
    /// The barrier's id.
    pub barrier_id: String,
    /// The Faktory job id.
    pub jid: String,
    /// How long ago the barrier was created (per the job's `created_at`, or the barrier row).
    pub age: Duration,
    /// The producer's transaction id, when the backend records one.
    pub txid: Option<String>,
    /// Backend-specific state of the producer's transaction (PostgreSQL: `pg_xact_status`;
    /// MySQL: the `information_schema.innodb_trx` row when readable).
    pub transaction: Option<String>,
}

impl fmt::Display for TimeoutInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "barrier {} of job {} still open after {:?}",
            self.barrier_id, self.jid, self.age
        )?;
        if let Some(txid) = &self.txid {
            write!(f, ", producer txid {txid}")?;
        }
        if let Some(state) = &self.transaction {
            write!(f, ", transaction: {state}")?;
        }
        Ok(())
    }
}

/// A `Result` whose error is this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Lets `?` carry an [`Error`] out of a `conn.transaction(|c| ...)` closure whose error type is
/// `diesel::result::Error`: a database error converts back to itself, anything else becomes
/// `QueryBuilderError` (the transaction is rolled back either way).
impl From<Error> for diesel::result::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Database(inner) => inner,
            other => diesel::result::Error::QueryBuilderError(Box::new(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_error_names_its_cause_once() {
        let e = Error::Handler {
            jid: "j1".into(),
            source: "the mail server is down".into(),
        };
        assert_eq!(e.to_string(), "handler for job j1 failed");
        assert_eq!(
            chain(&e).to_string(),
            "handler for job j1 failed: the mail server is down"
        );
        let db = Error::Database(diesel::result::Error::NotFound);
        assert_eq!(chain(&db).to_string(), "database error: Record not found");
    }
}
