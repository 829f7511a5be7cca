//! The values the backend contract trades in: verdicts, claims, the rows written and read.

/// What the worker learned about a barrier's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub enum Verdict {
    /// The transaction committed and its commit is durable: the barrier row is visible.
    Committed,
    /// The transaction ended without the barrier row: it rolled back (or the savepoint around
    /// the enqueue did), or the row was already consumed.
    NotCommitted,
    /// The transaction is still running.
    Pending,
    /// The transaction committed (the barrier row is visible), but its commit may not be
    /// durable yet: the backend's [`Durability`](super::Durability) proof must come first.
    /// Backends whose commits can be visible before they are on disk (MySQL's locks are
    /// released before the log is flushed; a PostgreSQL transaction may turn
    /// `synchronous_commit` off) answer this.
    Visible,
}

/// What the worker found when it tried to take a committed barrier for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub enum Claim {
    /// The row is locked by this transaction: run the handler, then delete it.
    Locked,
    /// The row is gone: an earlier delivery consumed it.
    Gone,
    /// Another worker holds the row (a concurrent duplicate is running the handler).
    Busy,
    /// The row belongs to another job (its job digest differs from the delivery's): this
    /// delivery must not consume it. Nothing was taken.
    Foreign,
}

/// The end of a [`Backend::claiming_transaction`](super::sealed::Backend::claiming_transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub enum Claimed<R> {
    /// The barrier was claimed, the closure ran and returned this, and its transaction
    /// committed.
    Ran(R),
    /// The barrier is gone: an earlier delivery consumed it. Nothing ran.
    Gone,
    /// Another worker holds the barrier. Nothing ran.
    Busy,
    /// The barrier belongs to another job. Nothing ran.
    Foreign,
}

/// What the server says about a producer connection's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub enum ServerTransaction {
    /// A transaction is open: a barrier row inserted now commits or rolls back with it.
    Open,
    /// No transaction is open: a row inserted now would commit at once.
    Closed,
    /// The server cannot say (MySQL, which lacks MariaDB's `@@in_transaction`).
    Unknown,
}

/// What [`Backend::insert_barrier`](super::sealed::Backend::insert_barrier) reports about the
/// row it wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct Inserted {
    /// The producer's transaction (PostgreSQL) or session (MySQL) id, for diagnostics, and as
    /// a hint of which barriers end together.
    pub txid: Option<String>,
    /// Which barrier table the row went to (see
    /// [`Backend::barrier_location`](super::sealed::Backend::barrier_location)).
    pub location: Option<String>,
}

/// The verdicts of one [`Backend::check_pending`](super::sealed::Backend::check_pending) call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct Checked {
    /// One verdict per pending barrier, in order.
    pub verdicts: Vec<Verdict>,
    /// How many barriers got an authoritative probe (a short lock wait each).
    pub probed: usize,
    /// Where the database's log stood when the check saw the commits it calls
    /// [`Verdict::Visible`], on the backend's own scale (PostgreSQL: a WAL position): they are
    /// durable once [`Prove::flushed_position`](super::Prove::flushed_position) reaches it.
    /// `None` when the backend cannot tell.
    pub position: Option<u64>,
    /// The job digest stored with each barrier the check read as committed or visible, in
    /// the order of `verdicts` (`None` where it did not read one; empty: none read). It lets
    /// a delivery that runs no worker transaction check that the barrier is its job's.
    pub digests: Vec<Option<String>>,
}

impl Checked {
    /// The digest read with verdict `i`, if any.
    pub(crate) fn digest(&self, i: usize) -> Option<&str> {
        self.digests.get(i).and_then(Option::as_deref)
    }
}

impl From<Vec<Verdict>> for Checked {
    fn from(verdicts: Vec<Verdict>) -> Self {
        Checked {
            verdicts,
            probed: 0,
            position: None,
            digests: Vec::new(),
        }
    }
}

/// A barrier the waiter is waiting for, as handed to
/// [`Backend::check_pending`](super::sealed::Backend::check_pending).
#[allow(unreachable_pub)] // named by the sealed trait
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: uuid::Uuid,
    /// The producer's transaction id from the job's descriptor (untrusted: a hint only).
    pub txid: Option<String>,
}

/// A committed barrier whose job was not consumed in time, taken by the reconciler.
#[allow(unreachable_pub)] // named by the sealed trait
#[derive(Debug, Clone)]
pub struct Unconsumed {
    pub id: String,
    pub txid: Option<String>,
    pub payload: Option<String>,
}

/// A barrier row removed by the reaper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapedBarrier {
    /// The barrier id.
    pub id: String,
    /// The Faktory job id it guarded.
    pub job_id: String,
    /// The job kind.
    pub job_kind: String,
}

/// The barrier row written by the producer.
#[derive(Debug)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct NewBarrier<'a> {
    pub id: &'a uuid::Uuid,
    pub job_id: &'a str,
    pub job_kind: &'a str,
    pub job_queue: &'a str,
    pub payload: &'a str,
    /// The job's digest (see `crate::binding`), which a delivery must match to consume it.
    pub job_digest: &'a str,
}

impl NewBarrier<'_> {
    /// `query` with the row's values bound in this order: id (as text), job id, job kind, job
    /// queue, payload, job digest.
    #[cfg(feature = "sqlite")]
    pub(crate) fn bind_to<DB>(
        &self,
        query: diesel::query_builder::SqlQuery,
    ) -> diesel::query_builder::BoxedSqlQuery<'static, DB, diesel::query_builder::SqlQuery>
    where
        DB: diesel::backend::Backend + diesel::sql_types::HasSqlType<diesel::sql_types::Text>,
        String: diesel::serialize::ToSql<diesel::sql_types::Text, DB>,
    {
        use diesel::sql_types::Text;
        query
            .into_boxed()
            .bind::<Text, _>(self.id.hyphenated().to_string())
            .bind::<Text, _>(self.job_id.to_string())
            .bind::<Text, _>(self.job_kind.to_string())
            .bind::<Text, _>(self.job_queue.to_string())
            .bind::<Text, _>(self.payload.to_string())
            .bind::<Text, _>(self.job_digest.to_string())
    }
}
