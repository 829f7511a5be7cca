//! What an operator can see of the barrier table: its rows with their ages, and the
//! transactions that hold uncommitted barrier rows, as each backend can tell
//! ([`sealed::Backend::list_barriers`](super::sealed::Backend::list_barriers); each backend's
//! listing is its `inspect.rs`). Read-only: no row is locked and nothing waits (see
//! `crate::maintenance::inspect`).

use std::time::Duration;

/// Where a barrier row stands, as the database sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RowState {
    /// The producer's transaction has not committed yet (MySQL, where uncommitted rows can be
    /// read; on PostgreSQL such rows are invisible and their transactions are listed instead).
    Pending,
    /// The producer committed; the row waits for a worker to consume it.
    Committed,
    /// The producer committed, and an open transaction of a worker's is deleting (consuming)
    /// or updating the row right now.
    Consuming,
}

/// One barrier row.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BarrierRow {
    /// The barrier id.
    pub id: String,
    /// The Faktory job id it guards (as first pushed).
    pub job_id: String,
    /// The job kind.
    pub job_kind: String,
    /// The job's queue.
    pub job_queue: String,
    /// The producer's transaction id (PostgreSQL) or connection id (MySQL).
    pub txid: Option<String>,
    /// Time since the row was inserted, by the database's clock.
    pub age: Duration,
    /// Time since its job was last pushed (by the producer, or again by a reconciler).
    pub since_push: Duration,
    /// Whether a handler ran for it and failed: the job is then in Faktory's retries.
    pub attempted: bool,
    /// Committed or not, and whether a worker holds it.
    pub state: RowState,
    /// What the database says of the producer's transaction (pending rows) or of the worker
    /// that holds the row (consuming rows), when it can say.
    pub transaction: Option<String>,
}

/// An open transaction that wrote to the barrier table and may hold barrier rows no other
/// session can see yet (PostgreSQL: a producer that has not committed).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OpenTransaction {
    /// The server's id of the session (PostgreSQL: the backend's pid).
    pub session: String,
    /// The transaction's id, as the server shows it.
    pub txid: Option<String>,
    /// How long the transaction has been open, when the server shows it.
    pub age: Option<Duration>,
    /// Who runs it and what it is doing.
    pub description: String,
}

/// The rows (oldest first, at most the limit asked for) and the open transactions.
#[derive(Debug, Clone, Default, PartialEq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct Listing {
    pub rows: Vec<BarrierRow>,
    pub transactions: Vec<OpenTransaction>,
}

/// A row as every backend's listing query returns it.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[derive(diesel::QueryableByName)]
pub(super) struct ListedRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub(super) id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    job_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    job_kind: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    job_queue: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    pub(super) txid: Option<i64>,
    /// Microseconds since `created_at`.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    age_us: i64,
    /// Microseconds since `pushed_at`.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    since_push_us: i64,
    /// 1 when `attempted_at` is set.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    attempted: i64,
    /// PostgreSQL: the row's `xmax`, the transaction that deletes or locks it (or did).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub(super) xmax: Option<String>,
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
impl ListedRow {
    pub(super) fn into_row(self, state: RowState) -> BarrierRow {
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        BarrierRow {
            id: self.id,
            job_id: self.job_id,
            job_kind: self.job_kind,
            job_queue: self.job_queue,
            txid: self.txid.map(|t| t.to_string()),
            age: micros(self.age_us),
            since_push: micros(self.since_push_us),
            attempted: self.attempted != 0,
            state,
            transaction: None,
        }
    }
}
