//! PostgreSQL's commit hints: lock waits, as on MySQL. An insert that conflicts with a running
//! producer's uncommitted barrier row waits for that producer's transaction, and goes on the
//! moment it commits (the row is there) or rolls back (it is not): `dtb_await_barrier`, a
//! function of the migrations, is that wait, bounded by a lock timeout and never keeping its
//! probe row. The waiter keeps a few watchers blocked in such waits
//! (`src/worker/waiter/watchers.rs`).
//!
//! The producer sends nothing: a `NOTIFY` would have told the waiter of every commit, but it
//! takes a lock that serializes the commits of every notifying transaction of the database,
//! flush included (a third of the producer's transactions per second, measured with four
//! threads), whether or not a worker waits.
//!
//! Why a watcher never makes a producer wait, nor lose a deadlock: while it waits, the
//! watcher has inserted nothing (the conflict is found before the row is written) and holds
//! only its own transaction id and a row-exclusive lock on the table, which no producer's
//! statement asks for; the producer never waits for it, so the wait is in no cycle.

use super::check::parse_verdict;
use super::TextRow;
use crate::backend::{Awaited, LockWaits, Verdict};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use std::time::Duration;

/// PostgreSQL's [`LockWaits`] capability.
pub(super) struct RowWaits;

/// The one instance the backend hands out.
pub(super) static ROW_WAITS: RowWaits = RowWaits;

impl LockWaits<PgConnection> for RowWaits {
    fn await_row(
        &self,
        conn: &mut PgConnection,
        id: &uuid::Uuid,
        wait: Duration,
    ) -> QueryResult<Awaited> {
        let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
        // READ COMMITTED: under REPEATABLE READ the conflicting insert would fail instead of
        // answering.
        let verdict: TextRow = conn.build_transaction().read_committed().run(|c| {
            diesel::sql_query("SELECT dtb_await_barrier($1::uuid, $2) AS value")
                .bind::<Text, _>(id.hyphenated().to_string())
                .bind::<Integer, _>(ms)
                .get_result(c)
        })?;
        Ok(match parse_verdict(&verdict.value)? {
            Verdict::Committed | Verdict::Visible => Awaited::Present,
            Verdict::NotCommitted => Awaited::Absent,
            Verdict::Pending => Awaited::Held,
        })
    }
}
