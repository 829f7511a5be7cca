//! The MySQL error numbers the backend tells apart, and how it reads the number of the
//! statement that just failed (Diesel passes on only the message).

use diesel::connection::SimpleConnection;
use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Nullable};

/// "Lock wait timeout exceeded".
pub(super) const ER_LOCK_WAIT_TIMEOUT: i32 = 1205;
/// "Access denied; you need (at least one of) the PROCESS privilege(s) for this operation".
pub(super) const ER_SPECIFIC_ACCESS_DENIED: i32 = 1227;
/// "Table doesn't exist".
pub(super) const ER_NO_SUCH_TABLE: i32 = 1146;
/// "Unknown system variable".
pub(super) const ER_UNKNOWN_SYSTEM_VARIABLE: i32 = 1193;
/// MySQL 8's answer to a locking read with `NOWAIT` that met a lock (MariaDB answers
/// [`ER_LOCK_WAIT_TIMEOUT`]).
pub(super) const ER_LOCK_NOWAIT: i32 = 3572;
/// A syntax error.
pub(super) const ER_PARSE_ERROR: i32 = 1064;

/// Whether `error` is a lock wait timeout, by its message (MariaDB's and MySQL's English one):
/// a guess that saves the round trips of [`last_errno`] on a path that meets it often; a
/// server that speaks another language takes the slow way.
pub(super) fn looks_like_lock_wait_timeout(error: &diesel::result::Error) -> bool {
    matches!(error, diesel::result::Error::DatabaseError(_, info)
        if info.message().starts_with("Lock wait timeout exceeded"))
}

/// The error number of the statement that just failed on `conn`, read with
/// `GET DIAGNOSTICS` (which needs no privilege). Must be the next statement after the failed
/// one: any other statement clears the diagnostics area.
pub(super) fn last_errno(conn: &mut MysqlConnection) -> QueryResult<Option<i32>> {
    conn.batch_execute("GET DIAGNOSTICS CONDITION 1 @dtb_errno = MYSQL_ERRNO")?;
    // Read, and reset in the same statement: a later call must never read this value (GET
    // DIAGNOSTICS leaves the variable unchanged, with only a warning, when there is no
    // condition to read).
    let (errno, _): (Option<i32>, Option<i32>) = diesel::select((
        sql::<Nullable<Integer>>("CAST(@dtb_errno AS SIGNED)"),
        sql::<Nullable<Integer>>("CAST(@dtb_errno := NULL AS SIGNED)"),
    ))
    .get_result(conn)?;
    Ok(errno)
}
