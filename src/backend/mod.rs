//! What a database must provide to carry barriers: the sealed [`sealed::Backend`] trait, and
//! one implementation per backend, each behind its cargo feature (`postgres/`, `mysql/`,
//! `sqlite/`). Nothing outside this module knows which backend it talks to. How each backend
//! decides is argued in `docs/design/`. `conformance/` holds the tests every backend must pass.

use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel::Connection;
use std::time::Duration;

mod capabilities;
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
mod types;

#[allow(unreachable_pub)] // named by the sealed trait
pub use capabilities::{Awaited, CheckSchedule, Durability, Hint, Hints, Listen, LockWaits, Prove};
#[allow(unreachable_pub)] // named by the sealed trait
pub use types::{
    Checked, Claim, Claimed, Inserted, NewBarrier, Pending, ReapedBarrier, ServerTransaction,
    Unconsumed, Verdict,
};

/// The most barrier rows one [`sealed::Backend::insert_barriers`] call writes.
pub(crate) const INSERT_BATCH: usize = 1000;

/// A pool of Diesel connections, as the worker uses it.
pub type ConnectionPool<C> = Pool<ConnectionManager<C>>;

/// The name of the barrier table, the same on every backend.
///
/// It is prefixed (`dtb_`) so that it never clashes with an application's own tables.
pub const BARRIER_TABLE: &str = "dtb_barriers";

#[allow(unreachable_pub)]
pub(crate) mod sealed {
    use super::*;
    use crate::error::Error;

    /// The backend-specific half of [`BarrierConnection`](super::BarrierConnection). Private:
    /// only this crate implements it.
    ///
    /// It is what every backend must do; what a backend may offer beyond that (commit hints,
    /// a proof of durability) it declares as capabilities: [`hints`](Self::hints),
    /// [`durability`](Self::durability).
    pub trait Backend: Connection + R2D2Connection + Send + Sized + 'static {
        /// The name written into barrier descriptors.
        const NAME: &'static str;

        // --- The schema.

        /// Applies the embedded migrations.
        fn run_migrations(&mut self) -> Result<(), Error>;

        /// Whether the barrier table (and whatever else the backend needs) exists, as the
        /// newest migration left it.
        fn barrier_schema_present(&mut self) -> diesel::QueryResult<bool>;

        /// Names the barrier table this connection reads and writes (database and schema), so
        /// that a worker can refuse a barrier written to another one: a row it cannot see
        /// would otherwise look rolled back. `None` when the backend cannot name it (an
        /// in-memory SQLite database).
        fn barrier_location(&mut self) -> diesel::QueryResult<Option<String>>;

        // --- The producer.

        /// Asks the server whether the connection is inside a transaction, which Diesel's own
        /// count (`diesel_depth`) cannot tell alone: a `BEGIN` Diesel did not send, MySQL's
        /// `autocommit = 0`, or a transaction the server ended behind Diesel's back (a
        /// deadlock victim, an implicit commit). A backend whose driver keeps Diesel's count in
        /// step with the server may skip the question when `diesel_depth > 0`.
        fn server_transaction(
            &mut self,
            diesel_depth: u32,
        ) -> diesel::QueryResult<ServerTransaction>;

        /// Inserts the barrier rows `rows` (at most [`INSERT_BATCH`] of them) in the
        /// connection's current transaction, in one statement where the backend can.
        fn insert_barriers(&mut self, rows: &[NewBarrier<'_>]) -> diesel::QueryResult<Inserted>;

        /// Inserts one barrier row in the connection's current transaction.
        fn insert_barrier(&mut self, row: &NewBarrier<'_>) -> diesel::QueryResult<Inserted> {
            self.insert_barriers(std::slice::from_ref(row))
        }

        /// Deletes the barriers `ids`, which this connection's transaction inserted, after their
        /// jobs could not all be pushed: the transaction may still commit (an application that
        /// swallows the error), and must then leave nothing that could run.
        fn remove_barriers(&mut self, ids: &[uuid::Uuid]) -> diesel::QueryResult<usize>;

        /// Whether `error`, just returned by [`insert_barrier`](Self::insert_barrier) on this
        /// connection, says that the barrier table does not exist (the migrations have not
        /// run, or the connection's `search_path` does not reach them).
        fn missing_table(&mut self, error: &diesel::result::Error) -> bool;

        // --- The waiter.

        /// What the backend keeps from one check of a waiter to the next (PostgreSQL: when
        /// each barrier is due for its next authoritative probe).
        type Checker: Default + Send + 'static;

        /// Verdicts for a batch of pending barriers, one per entry, in order, without waiting
        /// on any producer. `Committed` must mean that the producer's commit is durable (or
        /// [`Verdict::Visible`], where the backend cannot tell yet), and `NotCommitted` that its
        /// transaction ended without the row: both decided by the database, never by a hint or
        /// a transaction id. The waiter calls it on the backend's [`CHECKS`](Self::CHECKS)
        /// schedule, and at once for new and hinted barriers; `checker` is this waiter's own
        /// state.
        fn check_pending(
            &mut self,
            checker: &mut Self::Checker,
            pending: &[Pending],
        ) -> diesel::QueryResult<Checked>;

        /// How often a waiting barrier is checked.
        const CHECKS: CheckSchedule;

        /// The backend's commit hints, if it has any.
        fn hints() -> Hints<Self>;

        /// How the backend makes sure a commit the waiter saw is durable.
        fn durability() -> Durability<Self>;

        // --- The handler.

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

        /// For a handler that takes no connection: the job digest stored with barrier `id` —
        /// `None` when the row is gone, `Some(None)` for a row stored without one — read
        /// without waiting for any lock.
        fn barrier_digest(
            &mut self,
            id: &uuid::Uuid,
        ) -> diesel::QueryResult<Option<Option<String>>>;

        /// For handlers that take no connection: deletes the barriers `ids`, whose handlers
        /// ran, in one transaction of its own, durable when this returns (its commit then
        /// proves durable every commit seen before it began); returns how many rows it deleted
        /// (fewer when some were gone already). This default wraps
        /// [`remove_barriers`](Self::remove_barriers) in a transaction; a backend whose one
        /// statement is its own transaction needs none.
        fn consume_barriers(&mut self, ids: &[uuid::Uuid]) -> diesel::QueryResult<usize> {
            self.transaction(|c| c.remove_barriers(ids))
        }

        /// After a handler failed and its transaction rolled back: records that the job reached
        /// a worker and now lives in Faktory's retries, due back within `retry_due` (`None`:
        /// no retry will come — the job went to the dead set, or retries are off), so that the
        /// reconciler leaves it to Faktory until then.
        fn mark_attempted(
            &mut self,
            id: &uuid::Uuid,
            retry_due: Option<Duration>,
        ) -> diesel::QueryResult<()>;

        // --- Maintenance.

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

        /// Deletes at most `limit` barrier rows created more than `older_than` ago, in a short
        /// transaction of its own that takes no row a transaction holds, and returns what it
        /// deleted (the reaper calls it until fewer than `limit` come back).
        fn reap(
            &mut self,
            older_than: Duration,
            limit: i64,
        ) -> diesel::QueryResult<Vec<ReapedBarrier>>;

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
