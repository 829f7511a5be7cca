//! What a database must provide to carry barriers: the sealed [`sealed::Backend`] trait, and
//! one implementation per backend, each behind its cargo feature (`postgres/`, `mysql/`,
//! `sqlite/`). Nothing outside this module knows which backend it talks to. How each backend
//! decides is argued in `docs/design/`. `conformance/` holds the tests every backend must pass.

use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel::Connection;
use std::time::Duration;

#[cfg(all(test, feature = "testing"))]
pub(crate) mod conformance;
pub(crate) mod inspect;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) mod rows;
#[cfg(feature = "sqlite")]
mod sqlite;

/// A pool of Diesel connections, as the worker uses it.
pub type ConnectionPool<C> = Pool<ConnectionManager<C>>;

/// The name of the barrier table, the same on every backend.
///
/// It is prefixed (`dtb_`) so that it never clashes with an application's own tables.
pub const BARRIER_TABLE: &str = "dtb_barriers";

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
    /// durable yet: only a write of the worker's own, begun after this check and committed,
    /// proves that it is (see [`sealed::Backend::fence`]). Only backends whose locks are
    /// released before the commit reaches the disk (MySQL) answer this.
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

/// The end of a [`sealed::Backend::claiming_transaction`].
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

/// What [`sealed::Backend::insert_barrier`] reports about the row it wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct Inserted {
    /// The producer's transaction (PostgreSQL) or session (MySQL) id, for diagnostics.
    pub txid: Option<String>,
    /// Which barrier table the row went to (see [`sealed::Backend::barrier_location`]).
    pub location: Option<String>,
}

/// The verdicts of one [`sealed::Backend::check_pending`] call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct Checked {
    /// One verdict per pending barrier, in order.
    pub verdicts: Vec<Verdict>,
    /// How many barriers got an authoritative probe (a short lock wait each).
    pub probed: usize,
    /// Where the database's log stood when the check saw the commits it calls
    /// [`Verdict::Visible`], on the backend's own scale (PostgreSQL: a WAL position): they are
    /// durable once [`flushed_position`](sealed::Backend::flushed_position) reaches it.
    /// `None` when the backend cannot tell.
    pub position: Option<u64>,
}

impl From<Vec<Verdict>> for Checked {
    fn from(verdicts: Vec<Verdict>) -> Self {
        Checked {
            verdicts,
            probed: 0,
            position: None,
        }
    }
}

/// A barrier the waiter is waiting for, as handed to [`sealed::Backend::check_pending`].
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
    #[cfg(any(feature = "postgres", feature = "sqlite"))]
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

#[allow(unreachable_pub)]
pub(crate) mod sealed {
    use super::*;
    use crate::error::Error;

    /// The backend-specific half of [`BarrierConnection`](super::BarrierConnection). Private:
    /// only this crate implements it.
    pub trait Backend: Connection + R2D2Connection + Send + Sized + 'static {
        /// The name written into barrier descriptors.
        const NAME: &'static str;

        /// Applies the embedded migrations.
        fn run_migrations(&mut self) -> Result<(), Error>;

        /// Whether the barrier table (and whatever else the backend needs) exists.
        fn barrier_schema_present(&mut self) -> diesel::QueryResult<bool>;

        /// Asks the server whether the connection is inside a transaction, which Diesel's own
        /// count (`diesel_depth`) cannot tell alone: a `BEGIN` Diesel did not send, MySQL's
        /// `autocommit = 0`, or a transaction the server ended behind Diesel's back (a
        /// deadlock victim, an implicit commit). A backend whose driver keeps Diesel's count in
        /// step with the server may skip the question when `diesel_depth > 0`.
        fn server_transaction(
            &mut self,
            diesel_depth: u32,
        ) -> diesel::QueryResult<ServerTransaction>;

        /// Inserts the barrier row in the connection's current transaction.
        fn insert_barrier(&mut self, row: &NewBarrier<'_>) -> diesel::QueryResult<Inserted>;

        /// Deletes barrier `id`, which this connection's transaction inserted, after its job
        /// could not be pushed: the transaction may still commit (an application that swallows
        /// the error), and must then leave nothing that could run.
        fn remove_barrier(&mut self, id: &uuid::Uuid) -> diesel::QueryResult<()>;

        /// Whether `error`, just returned by [`insert_barrier`](Self::insert_barrier) on this
        /// connection, says that the barrier table does not exist (the migrations have not
        /// run, or the connection's `search_path` does not reach them).
        fn missing_table(&mut self, error: &diesel::result::Error) -> bool;

        /// Names the barrier table this connection reads and writes (database and schema), so
        /// that a worker can refuse a barrier written to another one: a row it cannot see
        /// would otherwise look rolled back. `None` when the backend cannot name it reliably.
        fn barrier_location(&mut self) -> diesel::QueryResult<Option<String>> {
            Ok(None)
        }

        /// Runs `f` in a new READ COMMITTED transaction of the worker's, which commits when `f`
        /// returns `Ok` and rolls back otherwise.
        fn worker_transaction<R, E, F>(&mut self, f: F) -> Result<R, E>
        where
            F: FnOnce(&mut Self) -> Result<R, E>,
            E: From<diesel::result::Error>;

        /// Inside [`worker_transaction`](Self::worker_transaction): takes barrier `id` for this
        /// transaction, for a delivery whose job digest is `digest` — locks and deletes it, so
        /// that committing consumes it and rolling back restores it — without waiting for
        /// another worker that holds it. A row with another digest (a row with none binds to
        /// nothing) is `Foreign` and stays. `Gone` must be authoritative: never the answer for a
        /// row whose producer is still running.
        fn claim_barrier(&mut self, id: &uuid::Uuid, digest: &str) -> diesel::QueryResult<Claim>;

        /// Runs `f` in a new worker transaction that has claimed barrier `id` for a delivery
        /// whose job digest is `digest` (see [`claim_barrier`](Self::claim_barrier)),
        /// committing when `f` returns `Ok`; when the barrier is gone, busy or another job's,
        /// returns that without running `f`. A backend may begin the transaction and claim in
        /// fewer round trips than the two this default takes.
        fn claiming_transaction<R, E, F>(
            &mut self,
            id: &uuid::Uuid,
            digest: &str,
            f: F,
        ) -> Result<Claimed<R>, E>
        where
            F: FnOnce(&mut Self) -> Result<R, E>,
            E: From<diesel::result::Error>,
        {
            self.worker_transaction(|c| claim_then(c, id, digest, f))
        }

        /// Inside [`worker_transaction`](Self::worker_transaction), after the handler returned:
        /// whether the claim still stands, that is, the transaction that deleted barrier `id`
        /// is still open on the server (a handler can lose it to a deadlock, an implicit commit
        /// or a lock wait timeout that the server answered with a rollback). When it does not,
        /// the worker fails the delivery instead of reporting the handler as run.
        ///
        /// The generic part (Diesel's own view of the transaction) is checked by the caller;
        /// a backend whose driver keeps Diesel in step with the server needs nothing more.
        fn claim_holds(&mut self, _id: &uuid::Uuid) -> diesel::QueryResult<bool> {
            Ok(true)
        }

        /// Whether the backend delivers commit hints ([`take_commit_hints`](Self::take_commit_hints)).
        const HAS_HINTS: bool = false;
        /// How often the waiter looks for commit hints (or new registrations) while barriers
        /// are pending.
        const HINT_POLL: Duration = Duration::from_millis(1);
        /// How often the waiter runs [`check_pending`](Self::check_pending) while barriers are
        /// pending.
        const CHECK_INTERVAL: Duration = Duration::from_millis(200);

        /// Whether the database has one writer at a time (SQLite): a worker transaction then
        /// waits for any open write transaction, a producer's included.
        const ONE_WRITER: bool = false;

        /// What the backend keeps from one check of a waiter to the next (PostgreSQL: when
        /// each barrier is due for its next authoritative probe).
        type Checker: Default + Send + 'static;

        /// Makes this connection receive commit hints.
        fn listen_for_commits(&mut self) -> diesel::QueryResult<()> {
            Ok(())
        }

        /// Undoes [`listen_for_commits`](Self::listen_for_commits).
        fn stop_listening(&mut self) -> diesel::QueryResult<()> {
            Ok(())
        }

        /// Whether this connection's session is visibly shared with `other`, another client's
        /// connection: a setting made for this session is seen by `other`'s next statement.
        /// Then a pooler in between hands server sessions from client to client (PgBouncer in
        /// transaction pooling mode), and a `LISTEN` would hear nothing. `false` proves
        /// nothing (`other` may have been lent another session); it is never a false `true`.
        fn shares_sessions(&mut self, _other: &mut Self) -> diesel::QueryResult<bool> {
            Ok(false)
        }

        /// Sends a commit hint for `id` (which no producer wrote) from this connection, so that
        /// the waiter can tell whether its listening connection hears hints at all: behind
        /// PgBouncer in transaction pooling mode, a `LISTEN` is accepted and never hears
        /// anything. `Ok(false)` when the backend has no such test (its hints need none).
        fn send_test_hint(&mut self, _id: &uuid::Uuid) -> diesel::QueryResult<bool> {
            Ok(false)
        }

        /// The barrier ids whose transactions may have ended since the last call (may include
        /// ids nobody waits for), without blocking. A hint is never a verdict: anyone able to
        /// send one could forge it, so the waiter only checks the hinted barriers at once.
        fn take_commit_hints(&mut self) -> diesel::QueryResult<Vec<uuid::Uuid>> {
            Ok(Vec::new())
        }

        /// Verdicts for a batch of pending barriers, one per entry, in order, without waiting
        /// on any producer. `Committed` must mean that the producer's commit is durable and
        /// `NotCommitted` that its transaction ended without the row: both decided by the
        /// database, never by a hint or a transaction id. The waiter calls it with every
        /// pending barrier every [`CHECK_INTERVAL`](Self::CHECK_INTERVAL), and with the hinted
        /// ones in between; `checker` is this waiter's own state.
        fn check_pending(
            &mut self,
            checker: &mut Self::Checker,
            pending: &[Pending],
        ) -> diesel::QueryResult<Checked>;

        /// Commits a write of the worker's own, so that every commit the worker saw before it
        /// began is durable once it returns `Ok(true)` (see `docs/design/mysql.md`). It may
        /// write to the barrier rows `visible` (MySQL counts them in `attempts`), without ever
        /// waiting for a row another transaction holds; `Ok(false)` when it wrote nothing.
        /// Backends that never answer [`Verdict::Visible`] need not fence.
        fn fence(&mut self, _visible: &[uuid::Uuid]) -> diesel::QueryResult<bool> {
            Ok(true)
        }

        /// How far the database's log is durable now, on the scale of
        /// [`Checked::position`]; `None` when the backend cannot tell.
        fn flushed_position(&mut self) -> diesel::QueryResult<Option<u64>> {
            Ok(None)
        }

        /// Whether a committed write transaction of the worker's (a handler's, which consumes a
        /// barrier) is durable when its `COMMIT` returns, and so proves every commit seen before
        /// it began durable too (MySQL with `innodb_flush_log_at_trx_commit = 1`). PostgreSQL's
        /// handler transactions may run with `synchronous_commit` off: there only the log's
        /// flush position, or the fence, proves anything.
        const HANDLER_COMMITS_PROVE: bool = false;

        /// After a handler failed and its transaction rolled back: records that the job reached
        /// a worker and now lives in Faktory's retries, due back within `retry_due` (`None`:
        /// no retry will come — the job went to the dead set, or retries are off), so that the
        /// reconciler leaves it to Faktory until then.
        fn mark_attempted(
            &mut self,
            id: &uuid::Uuid,
            retry_due: Option<Duration>,
        ) -> diesel::QueryResult<()>;

        /// Inside [`worker_transaction`](Self::worker_transaction): takes up to `limit`
        /// committed barriers, younger than `max_age` and not locked by anyone, whose job is
        /// overdue by more than `grace`: last pushed more than `grace` ago and never attempted,
        /// or due back from Faktory's retries more than `grace` ago. Marks them pushed now (and
        /// no longer attempted) and returns them.
        fn take_unconsumed(
            &mut self,
            grace: Duration,
            max_age: Duration,
            limit: i64,
        ) -> diesel::QueryResult<Vec<Unconsumed>>;

        /// Deletes barrier rows created more than `older_than` ago, returning what it deleted.
        fn reap(&mut self, older_than: Duration) -> diesel::QueryResult<Vec<ReapedBarrier>>;

        /// The barrier rows, oldest first, at most `limit` of them, and the open transactions
        /// that hold rows other sessions cannot see, for an operator (`inspect.rs`). Takes no
        /// lock and waits for nothing.
        fn list_barriers(&mut self, limit: i64) -> diesel::QueryResult<inspect::Listing>;

        /// Describes the producer's transaction for a timeout report.
        fn transaction_info(
            &mut self,
            id: &uuid::Uuid,
            txid: Option<&str>,
        ) -> diesel::QueryResult<Option<String>>;

        /// Problems with the database's settings or the worker's privileges that do not stop
        /// barriers from working but that an operator should hear about (for example a missing
        /// privilege that diagnostics need). Called once when a worker connects; each message is
        /// logged as a warning.
        fn startup_warnings(&mut self) -> Vec<String> {
            Vec::new()
        }
    }
}

/// A Diesel connection type that can carry transaction barriers: `PgConnection` (feature
/// `postgres`), `MysqlConnection` (feature `mysql`), `SqliteConnection` (feature `sqlite`).
///
/// The trait is sealed; its methods are this crate's business.
pub trait BarrierConnection: sealed::Backend {
    /// The backend's name as written into barrier descriptors: `"postgres"`, `"mysql"` or
    /// `"sqlite"`.
    fn backend_name() -> &'static str {
        <Self as sealed::Backend>::NAME
    }
}

impl<C: sealed::Backend> BarrierConnection for C {}

/// What Diesel itself knows about a connection's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DieselTransaction {
    /// Diesel's transaction manager is broken (a failed `BEGIN`, `COMMIT` or `ROLLBACK`).
    Broken,
    /// Inside a transaction Diesel opened, `depth` deep (savepoints count), and whether a
    /// failed statement (a deadlock, a serialization failure, an aborted PostgreSQL
    /// transaction) means it can only be rolled back.
    Open { depth: u32, must_roll_back: bool },
    /// No transaction that Diesel opened (the server may still hold one: see
    /// [`sealed::Backend::server_transaction`]).
    None,
}

/// Diesel's own view of `conn`'s transaction.
pub(crate) fn diesel_transaction<C: Connection>(conn: &mut C) -> DieselTransaction {
    use diesel::connection::{TransactionManager, TransactionManagerStatus};
    match <C::TransactionManager as TransactionManager<C>>::transaction_manager_status_mut(conn) {
        TransactionManagerStatus::InError => DieselTransaction::Broken,
        TransactionManagerStatus::Valid(valid) => match &valid.in_transaction {
            Some(t) => DieselTransaction::Open {
                depth: t.transaction_depth.get(),
                must_roll_back: t.requires_rollback_maybe_up_to_top_level,
            },
            None => DieselTransaction::None,
        },
    }
}

/// Marks `conn` broken, so that a pool discards it instead of handing it out again.
pub(crate) fn poison<C: Connection>(conn: &mut C) {
    use diesel::connection::TransactionManager;
    <C::TransactionManager as TransactionManager<C>>::transaction_manager_status_mut(conn)
        .set_in_error();
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
/// The longest age handed to a database (a hundred years): date arithmetic beyond it fails or
/// overflows on every backend, and no barrier lives that long.
const MAX_AGE: Duration = Duration::from_secs(100 * 366 * 24 * 3600);

/// `age`, at most a hundred years: what "older than `age`" can mean to a database.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
pub(crate) fn bounded_age(age: Duration) -> Duration {
    age.min(MAX_AGE)
}

/// Inside a worker transaction: claims barrier `id` for a delivery whose job digest is
/// `digest`, and runs `f` if that worked.
pub(crate) fn claim_then<C, R, E, F>(
    conn: &mut C,
    id: &uuid::Uuid,
    digest: &str,
    f: F,
) -> Result<Claimed<R>, E>
where
    C: sealed::Backend,
    F: FnOnce(&mut C) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    match conn.claim_barrier(id, digest)? {
        Claim::Locked => f(conn).map(Claimed::Ran),
        Claim::Gone => Ok(Claimed::Gone),
        Claim::Busy => Ok(Claimed::Busy),
        Claim::Foreign => Ok(Claimed::Foreign),
    }
}
