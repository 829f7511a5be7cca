//! What a backend may offer the waiter beyond its checks, each a capability it has or has not:
//! commit hints (a listening connection, or lock waits on running producers' rows), a proof of
//! durability for commits that are visible before they are on disk, and how often its checks
//! run. The waiter (`src/worker/waiter/`) drives them; the backends implement them in their
//! own folders (`hints.rs`, `durability.rs`).

use diesel::QueryResult;
use std::time::Duration;

/// How a backend lets the waiter learn that a producer's transaction may have ended, sooner
/// than its next check. A hint is never a verdict: the waiter checks the hinted barriers in
/// the database.
#[allow(unreachable_pub)] // named by the sealed trait
pub enum Hints<C: 'static> {
    /// None: the checks alone find every commit.
    None,
    /// Hints read from a listening connection of the waiter's (SQLite's newly visible rows).
    Listen(&'static dyn Listen<C>),
    /// Lock waits on running producers' rows (PostgreSQL, MySQL): a few watchers, each
    /// blocked in a wait that ends the moment the transaction holding the row does.
    LockWaits(&'static dyn LockWaits<C>),
}

impl<C> std::fmt::Debug for Hints<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hints::None => "None",
            Hints::Listen(_) => "Listen",
            Hints::LockWaits(_) => "LockWaits",
        })
    }
}

/// Hints heard on a listening connection; see [`Hints::Listen`].
#[allow(unreachable_pub)] // named by the sealed trait
pub trait Listen<C>: Sync {
    /// How often the waiter reads the listening connection while barriers are pending.
    fn poll_interval(&self) -> Duration;

    /// Makes `conn` receive commit hints.
    fn listen(&self, conn: &mut C) -> QueryResult<()>;

    /// Undoes [`listen`](Self::listen), before the connection goes back to the pool.
    fn unlisten(&self, conn: &mut C) -> QueryResult<()>;

    /// What may have ended since the last call (barriers or transactions nobody waits for
    /// included), without blocking.
    fn take(&self, conn: &mut C) -> QueryResult<Vec<Hint>>;
}

/// What a hint names.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub enum Hint {
    /// The transaction that wrote this barrier may have ended.
    Barrier(uuid::Uuid),
}

/// Lock waits on running producers' rows; see [`Hints::LockWaits`].
#[allow(unreachable_pub)] // named by the sealed trait
pub trait LockWaits<C>: Sync {
    /// Waits at most `wait` (whole seconds, at least one) for whatever transaction holds
    /// barrier `id`'s row to end, and says what it left. The wait must hold no lock that
    /// anyone else could wait for, so that it can never be part of a deadlock: the producer is
    /// never the one that loses because a worker waited on its row.
    fn await_row(&self, conn: &mut C, id: &uuid::Uuid, wait: Duration) -> QueryResult<Awaited>;
}

/// What a [`LockWaits::await_row`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub enum Awaited {
    /// The row is there, committed, and nobody held it any more.
    Present,
    /// There is no committed row (the transaction rolled back, or the row was consumed).
    Absent,
    /// Some transaction still held the row when the wait ran out.
    Held,
}

/// How a backend makes sure a commit the waiter saw is durable before a handler starts.
#[allow(unreachable_pub)] // named by the sealed trait
pub enum Durability<C: 'static> {
    /// A commit is on disk before it is visible, and the checks never answer
    /// [`Verdict::Visible`](super::Verdict::Visible) (SQLite, whose commits are written before
    /// the write lock is let go).
    BeforeVisible,
    /// A commit may be visible before it is durable: the checks answer
    /// [`Verdict::Visible`](super::Verdict::Visible), and the waiter waits for a proof.
    Proven(&'static dyn Prove<C>),
}

impl<C> std::fmt::Debug for Durability<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::BeforeVisible => "BeforeVisible",
            Durability::Proven(_) => "Proven",
        })
    }
}

/// The proofs of durability a backend offers; see [`Durability::Proven`].
#[allow(unreachable_pub)] // named by the sealed trait
pub trait Prove<C>: Sync {
    /// Whether a committed write transaction of the worker's (a handler's, which consumes a
    /// barrier) is durable when its `COMMIT` returns, and so proves durable every commit seen
    /// before its first write began (MySQL with `innodb_flush_log_at_trx_commit = 1`: the log
    /// is flushed in order). A PostgreSQL session may run with `synchronous_commit` off: there
    /// only the flushed position, or the fence, proves anything.
    fn handler_commits_prove(&self) -> bool;

    /// How far the database's log is durable now, on the scale of
    /// [`Checked::position`](super::Checked::position); `None` when the backend cannot tell.
    fn flushed_position(&self, _conn: &mut C) -> QueryResult<Option<u64>> {
        Ok(None)
    }

    /// Commits a write of the worker's own, durably, so that every commit the worker saw
    /// before it began is durable once it returns. It never waits for a row a handler or a
    /// producer holds.
    fn fence(&self, conn: &mut C) -> QueryResult<()>;
}

/// How often the waiter checks a barrier that jobs wait for: `first` after the check at its
/// registration, then twice as long each time, up to `max`. Equal bounds check at a steady
/// pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct CheckSchedule {
    /// The interval after the first check.
    pub first: Duration,
    /// The longest interval.
    pub max: Duration,
}

impl CheckSchedule {
    /// A steady pace.
    pub const fn every(interval: Duration) -> CheckSchedule {
        CheckSchedule {
            first: interval,
            max: interval,
        }
    }

    /// The interval after one of `previous`.
    pub fn after(&self, previous: Duration) -> Duration {
        previous.saturating_mul(2).clamp(self.first, self.max)
    }

    /// This schedule with its longest interval set to `max` (and its first no longer).
    pub fn with_max(self, max: Duration) -> CheckSchedule {
        CheckSchedule {
            first: self.first.min(max),
            max,
        }
    }
}
