//! SQLite's locks, as the backend handles them: busy timeouts set for one operation and put
//! back, "database is locked" recognised, and the WAL journal mode.

use super::{BusyTimeoutRow, JournalModeRow};
use crate::error::Error;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sqlite::SqliteConnection;
use std::time::Duration;

/// `SQLITE_BUSY` (and its extended codes), which Diesel reports only by SQLite's message.
pub(super) fn is_busy(e: &DieselError) -> bool {
    matches!(e, DieselError::DatabaseError(_, info) if info.message().starts_with("database is locked"))
}

pub(super) fn journal_mode(conn: &mut SqliteConnection) -> QueryResult<String> {
    let row: JournalModeRow = diesel::sql_query("PRAGMA journal_mode").get_result(conn)?;
    Ok(row.journal_mode)
}

/// Switches the database to WAL unless it is in WAL mode already (an in-memory database stays
/// in `memory` mode, which is reported).
pub(super) fn enable_wal(conn: &mut SqliteConnection) -> Result<(), Error> {
    if journal_mode(conn)?.eq_ignore_ascii_case("wal") {
        return Ok(());
    }
    let row: JournalModeRow = diesel::sql_query("PRAGMA journal_mode = WAL")
        .get_result(conn)
        .map_err(|e| Error::Migration(format!("switching to WAL journal mode: {e}").into()))?;
    if !row.journal_mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %row.journal_mode, "the SQLite database could not be switched to WAL mode");
    }
    Ok(())
}

/// The connection's busy timeout, in milliseconds.
pub(super) fn busy_timeout(conn: &mut SqliteConnection) -> QueryResult<i64> {
    let row: BusyTimeoutRow = diesel::sql_query("PRAGMA busy_timeout").get_result(conn)?;
    Ok(row.timeout)
}

pub(super) fn set_busy_timeout(conn: &mut SqliteConnection, ms: i64) -> QueryResult<()> {
    let ms = ms.clamp(0, i64::from(i32::MAX));
    conn.batch_execute(&format!("PRAGMA busy_timeout = {ms}"))
}

/// Runs `f` with the busy timeout set to `timeout(previous)`, then puts `previous` back.
pub(super) fn with_busy_timeout<R, E>(
    conn: &mut SqliteConnection,
    timeout: impl FnOnce(i64) -> i64,
    f: impl FnOnce(&mut SqliteConnection) -> Result<R, E>,
) -> Result<R, E>
where
    E: From<DieselError>,
{
    let previous = busy_timeout(conn)?;
    set_busy_timeout(conn, timeout(previous))?;
    let result = f(conn);
    // What `f` did (a handler's commit, say) stands even if this fails: report it, don't hide it.
    if let Err(e) = set_busy_timeout(conn, previous) {
        tracing::warn!(error = %e, "could not restore the SQLite busy timeout");
    }
    result
}

/// `limit` in whole milliseconds, at least 1, as a busy timeout.
pub(super) fn millis(limit: Duration) -> i64 {
    limit.as_millis().clamp(1, i32::MAX as u128) as i64
}
