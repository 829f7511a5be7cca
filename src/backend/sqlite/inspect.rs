//! What an operator sees of the barrier table on SQLite (see `src/backend/inspect.rs`): the
//! committed rows.

use crate::backend::inspect::{ListedRow, Listing, RowState};
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use diesel::sqlite::SqliteConnection;

/// The committed rows. SQLite has no sessions to list: a producer's uncommitted rows
/// cannot be seen, and neither can who holds the write lock.
pub(in crate::backend) fn list(conn: &mut SqliteConnection, limit: i64) -> QueryResult<Listing> {
    let rows: Vec<ListedRow> = diesel::sql_query(
        "SELECT id, job_id, job_kind, job_queue, NULL AS txid, \
                CAST((julianday('now') - julianday(created_at)) * 86400000000.0 AS INTEGER) \
                    AS age_us, \
                CAST((julianday('now') - julianday(pushed_at)) * 86400000000.0 AS INTEGER) \
                    AS since_push_us, \
                (attempted_at IS NOT NULL) AS attempted, NULL AS xmax \
         FROM dtb_barriers ORDER BY created_at, id LIMIT ?",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    Ok(Listing {
        rows: rows
            .into_iter()
            .map(|r| r.into_row(RowState::Committed))
            .collect(),
        transactions: Vec::new(),
    })
}
