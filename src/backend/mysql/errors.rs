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

/// The error number of the statement that just failed on `conn`, read with
/// `GET DIAGNOSTICS` (which needs no privilege). Must be the next statement after the failed
/// one: any other statement clears the diagnostics area.
pub(super) fn last_errno(conn: &mut MysqlConnection) -> QueryResult<Option<i32>> {
    conn.batch_execute("GET DIAGNOSTICS CONDITION 1 @dtb_errno = MYSQL_ERRNO")?;
    let errno =
        diesel::select(sql::<Nullable<Integer>>("CAST(@dtb_errno AS SIGNED)")).get_result(conn)?;
    // Never let a later call read this value (GET DIAGNOSTICS leaves the variable unchanged,
    // with only a warning, when there is no condition to read).
    conn.batch_execute("SET @dtb_errno = NULL")?;
    Ok(errno)
}
