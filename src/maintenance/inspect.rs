//! What an operator sees of the barrier table: [`inspect_barriers`] lists the barrier rows
//! with their ages, job kinds and the state of their producers' transactions, and sorts them
//! into [`Category`]s, some of which are problems a health check should report. It only
//! reads: no row is locked and nothing waits for a running transaction. The `dtb` command line
//! (feature `cli`) prints it.
//!
//! What each backend can see:
//!
//! * **PostgreSQL.** Committed rows. The rows of a producer that has not committed are
//!   invisible to every other session; its transaction is listed instead, as an
//!   [`OpenTransaction`] that holds a write lock on the table (from `pg_locks` and
//!   `pg_stat_activity`, whose details for other roles' sessions need `pg_read_all_stats`).
//!   A committed row whose deleting transaction is still open is [being
//!   consumed](RowState::Consuming).
//! * **MySQL / MariaDB.** Every row, committed or not (a READ UNCOMMITTED read); a pending
//!   row's producer session is described from `information_schema` (its InnoDB transaction
//!   needs the `PROCESS` privilege).
//! * **SQLite.** Committed rows only.
//!
//! It is a snapshot for people and health checks, never a verdict a worker acts on: a row that
//! commits or is consumed while it reads may show in the state it just left (on MySQL its two
//! reads follow each other).

use crate::backend::BarrierConnection;
use crate::error::Result;
use std::time::Duration;

pub use crate::backend::inspect::{BarrierRow, OpenTransaction, RowState};

/// What [`inspect_barriers`] calls old, and when a committed row counts as unconsumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// A barrier (or an open producer transaction) older than this is [`Category::Old`].
    pub older_than: Duration,
    /// A committed barrier whose job was last pushed longer ago than this, and that no
    /// handler has attempted, is [`Category::Unconsumed`]: a worker's reconciler with this
    /// grace period would push its job again.
    pub grace: Duration,
}

impl Default for Thresholds {
    /// `older_than` one hour, `grace` fifteen minutes (the worker's default reconcile grace).
    fn default() -> Self {
        Thresholds {
            older_than: Duration::from_secs(60 * 60),
            grace: Duration::from_secs(15 * 60),
        }
    }
}

/// Where a barrier row stands for an operator. The first that applies, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Category {
    /// A worker's open transaction holds the row: its handler is running.
    Consuming,
    /// Created more than [`Thresholds::older_than`] ago: a problem.
    Old,
    /// The producer's transaction has not committed yet.
    Pending,
    /// Committed; a handler ran and failed, so the job is in Faktory's retries.
    Attempted,
    /// Committed, never attempted, and last pushed more than [`Thresholds::grace`] ago: no
    /// worker took the job in time (Faktory lost it, or the backlog is long). A problem.
    Unconsumed,
    /// Committed and pushed recently: waiting for a worker.
    Waiting,
}

impl Category {
    /// Every category, in order.
    pub const ALL: [Category; 6] = [
        Category::Consuming,
        Category::Old,
        Category::Pending,
        Category::Attempted,
        Category::Unconsumed,
        Category::Waiting,
    ];

    /// Its name in lowercase, as the command line prints it.
    pub fn name(self) -> &'static str {
        match self {
            Category::Consuming => "consuming",
            Category::Old => "old",
            Category::Pending => "pending",
            Category::Attempted => "attempted",
            Category::Unconsumed => "unconsumed",
            Category::Waiting => "waiting",
        }
    }

    /// Whether a health check should report it.
    pub fn is_problem(self) -> bool {
        matches!(self, Category::Old | Category::Unconsumed)
    }
}

/// What [`inspect_barriers`] found.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Inspection {
    /// The backend's name (`"postgres"`, `"mysql"`, `"sqlite"`).
    pub backend: &'static str,
    /// The barrier table, as the backend names it (database and schema).
    pub location: Option<String>,
    /// The thresholds the rows were sorted by.
    pub thresholds: Thresholds,
    /// The barrier rows, oldest first.
    pub barriers: Vec<BarrierRow>,
    /// Open transactions that may hold barrier rows no other session can see yet
    /// (PostgreSQL), oldest first.
    pub transactions: Vec<OpenTransaction>,
    /// Whether there were more rows than the limit: [`barriers`](Self::barriers) holds the
    /// oldest ones.
    pub truncated: bool,
}

impl Inspection {
    /// The category of `row` under this inspection's thresholds.
    pub fn category(&self, row: &BarrierRow) -> Category {
        let t = &self.thresholds;
        match row.state {
            RowState::Consuming => Category::Consuming,
            _ if row.age > t.older_than => Category::Old,
            RowState::Pending => Category::Pending,
            _ if row.attempted => Category::Attempted,
            _ if row.since_push > t.grace => Category::Unconsumed,
            _ => Category::Waiting,
        }
    }

    /// Whether `transaction` has been open longer than [`Thresholds::older_than`]: a problem.
    pub fn is_old(&self, transaction: &OpenTransaction) -> bool {
        transaction
            .age
            .is_some_and(|age| age > self.thresholds.older_than)
    }

    /// How many barrier rows fall in `category`.
    pub fn count(&self, category: Category) -> usize {
        self.barriers
            .iter()
            .filter(|r| self.category(r) == category)
            .count()
    }

    /// How many problems a health check should report: old and unconsumed barriers, and
    /// producer transactions open for longer than [`Thresholds::older_than`].
    pub fn problems(&self) -> usize {
        let rows = self
            .barriers
            .iter()
            .filter(|r| self.category(r).is_problem())
            .count();
        rows + self.transactions.iter().filter(|t| self.is_old(t)).count()
    }
}

/// Reads the barrier table through `conn` (at most `limit` rows, the oldest) and the open
/// transactions that write to it, for an operator. Reads only, and waits for nothing.
///
/// # Errors
///
/// [`Error::MigrationsMissing`](crate::Error::MigrationsMissing) when the barrier table does
/// not exist, or the database's error.
pub fn inspect_barriers<C: BarrierConnection>(
    conn: &mut C,
    thresholds: Thresholds,
    limit: usize,
) -> Result<Inspection> {
    crate::migrations::require_barrier_schema(conn)?;
    read(conn, thresholds, limit)
}

/// [`inspect_barriers`] on a database whose barrier table is known to be there.
pub(crate) fn read<C: BarrierConnection>(
    conn: &mut C,
    thresholds: Thresholds,
    limit: usize,
) -> Result<Inspection> {
    let location = conn.barrier_location()?;
    let asked = i64::try_from(limit).unwrap_or(i64::MAX);
    // One more than asked, to tell whether there were more.
    let listing = conn.list_barriers(asked.saturating_add(1))?;
    let mut barriers = listing.rows;
    let truncated = barriers.len() > limit;
    barriers.truncate(limit);
    Ok(Inspection {
        backend: C::NAME,
        location,
        thresholds,
        barriers,
        transactions: listing.transactions,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: RowState, age: u64, since_push: u64, attempted: bool) -> BarrierRow {
        BarrierRow {
            id: "b".into(),
            job_id: "j".into(),
            job_kind: "k".into(),
            job_queue: "q".into(),
            txid: None,
            age: Duration::from_secs(age),
            since_push: Duration::from_secs(since_push),
            attempted,
            state,
            transaction: None,
        }
    }

    #[test]
    fn categories_and_problems() {
        let mut inspection = Inspection {
            backend: "postgres",
            location: None,
            thresholds: Thresholds {
                older_than: Duration::from_secs(100),
                grace: Duration::from_secs(10),
            },
            barriers: vec![
                row(RowState::Consuming, 1000, 1000, false),
                row(RowState::Committed, 1000, 5, false),
                row(RowState::Pending, 1000, 1000, false),
                row(RowState::Pending, 50, 50, false),
                row(RowState::Committed, 50, 50, true),
                row(RowState::Committed, 50, 50, false),
                row(RowState::Committed, 50, 5, false),
            ],
            transactions: vec![],
            truncated: false,
        };
        let categories: Vec<Category> = inspection
            .barriers
            .iter()
            .map(|r| inspection.category(r))
            .collect();
        use Category::*;
        assert_eq!(
            categories,
            [Consuming, Old, Old, Pending, Attempted, Unconsumed, Waiting]
        );
        assert_eq!(inspection.count(Old), 2);
        assert_eq!(inspection.problems(), 3);
        let open = |age: Option<u64>| OpenTransaction {
            session: "1".into(),
            txid: None,
            age: age.map(Duration::from_secs),
            description: String::new(),
        };
        inspection.transactions = vec![open(Some(101)), open(Some(99)), open(None)];
        assert_eq!(inspection.problems(), 4);
    }
}
