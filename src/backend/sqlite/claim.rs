//! How an SQLite worker transaction takes a barrier for its handler: it holds the database's
//! write lock from its `BEGIN IMMEDIATE`, so deleting the row decides, and never waits.

use super::IntRow;
use crate::backend::sealed::Backend;
use crate::backend::{Claim, ServerTransaction};
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel::sqlite::SqliteConnection;

/// See `Backend::claim_barrier`.
pub(super) fn claim_barrier(
    conn: &mut SqliteConnection,
    id: &uuid::Uuid,
    digest: &str,
) -> QueryResult<Claim> {
    // Inside `worker_transaction` this connection holds the database's write lock, so no one
    // else can be consuming the row: deleting it decides, and never waits. Committing the
    // worker transaction consumes the barrier; rolling it back (handler error, panic) puts
    // the row back. `Busy` cannot happen: a concurrent duplicate waited in BEGIN IMMEDIATE
    // and now finds the row gone. A row left in place is another job's.
    let id = id.hyphenated().to_string();
    let deleted = diesel::sql_query(
        "DELETE FROM dtb_barriers WHERE id = ? AND (job_digest IS NULL OR job_digest = ?)",
    )
    .bind::<Text, _>(&id)
    .bind::<Text, _>(digest)
    .execute(conn)?;
    if deleted > 0 {
        return Ok(Claim::Locked);
    }
    let left: IntRow = diesel::sql_query("SELECT COUNT(*) AS value FROM dtb_barriers WHERE id = ?")
        .bind::<Text, _>(&id)
        .get_result(conn)?;
    Ok(if left.value > 0 {
        Claim::Foreign
    } else {
        Claim::Gone
    })
}

/// See `Backend::claim_holds`.
pub(super) fn claim_holds(conn: &mut SqliteConnection, id: &uuid::Uuid) -> QueryResult<bool> {
    // The deletion stands while this session no longer sees the row and its transaction is
    // still open (SQLite rolls a transaction back by itself after some errors).
    let row: IntRow = diesel::sql_query("SELECT COUNT(*) AS value FROM dtb_barriers WHERE id = ?")
        .bind::<Text, _>(id.hyphenated().to_string())
        .get_result(conn)?;
    Ok(row.value == 0 && conn.server_transaction(1)? == ServerTransaction::Open)
}
