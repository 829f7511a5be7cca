//! MySQL's commit hints: it has nothing like `LISTEN`, but a locking read of a row that a
//! running transaction inserted waits for that transaction, and returns the moment it commits
//! (with the row) or rolls back (without). The waiter keeps a few watchers blocked in such
//! waits (`src/worker/waiter/watchers.rs`); this is the wait itself.
//!
//! Why a watcher never makes a producer lose a deadlock: the wait is one autocommit statement,
//! a READ COMMITTED locking read of one row by its primary key. It requests a single record
//! lock (no gap lock: READ COMMITTED takes none for it), and holds no lock at all while it
//! waits — it has none before its request, and its request is not granted yet. A deadlock is
//! a cycle of transactions each waiting for a lock another holds; a transaction that holds
//! nothing is in no cycle, so InnoDB never chooses a victim because of a watcher. Once granted
//! (the producer ended), the statement ends at once, and its lock with it.

use super::errors::{
    last_errno, looks_like_lock_wait_timeout, ER_LOCK_WAIT_TIMEOUT, ER_PARSE_ERROR,
};
use super::session::{Statement, SET_READ_COMMITTED};
use crate::backend::{Awaited, LockWaits};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use std::time::Duration;

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Text)]
    #[allow(dead_code)] // read only to see whether a row came back
    id: String,
}

/// The waits, by their bound in seconds (MariaDB's `WAIT n` takes whole seconds): a few
/// statement texts, each kept prepared.
const WAITS: [(u64, &[&str]); 4] = [
    (
        1,
        &[
            "SELECT id FROM dtb_barriers WHERE id = ",
            " LOCK IN SHARE MODE WAIT 1",
        ],
    ),
    (
        2,
        &[
            "SELECT id FROM dtb_barriers WHERE id = ",
            " LOCK IN SHARE MODE WAIT 2",
        ],
    ),
    (
        4,
        &[
            "SELECT id FROM dtb_barriers WHERE id = ",
            " LOCK IN SHARE MODE WAIT 4",
        ],
    ),
    (
        8,
        &[
            "SELECT id FROM dtb_barriers WHERE id = ",
            " LOCK IN SHARE MODE WAIT 8",
        ],
    ),
];

/// MySQL without `WAIT n`: bounded by the session's `innodb_lock_wait_timeout` instead.
const WAIT_SESSION_TIMEOUT: &[&str] = &[
    "SELECT id FROM dtb_barriers WHERE id = ",
    " LOCK IN SHARE MODE",
];

/// MySQL's [`LockWaits`] capability.
pub(super) struct RowLocks;

/// The one instance the backend hands out.
pub(super) static ROW_LOCKS: RowLocks = RowLocks;

impl LockWaits<MysqlConnection> for RowLocks {
    fn await_row(
        &self,
        conn: &mut MysqlConnection,
        id: &uuid::Uuid,
        wait: Duration,
    ) -> QueryResult<Awaited> {
        let key = id.hyphenated().to_string();
        let wait = wait.as_secs().max(1);
        let (_, mut sql) = WAITS[0];
        for (secs, statement) in WAITS {
            if secs <= wait {
                sql = statement;
            }
        }
        // READ COMMITTED for this statement's own transaction: no gap lock, ever.
        Statement::plain(SET_READ_COMMITTED).execute(conn)?;
        let mut found = Statement::new(sql, &[&key]).load::<IdRow>(conn);
        let mut errno = errno_of(conn, &found)?;
        if errno == Some(ER_PARSE_ERROR) {
            Statement::plain(SET_READ_COMMITTED).execute(conn)?;
            found = Statement::new(WAIT_SESSION_TIMEOUT, &[&key]).load::<IdRow>(conn);
            errno = errno_of(conn, &found)?;
        }
        match found {
            Ok(rows) if rows.is_empty() => Ok(Awaited::Absent),
            Ok(_) => Ok(Awaited::Present),
            Err(_) if errno == Some(ER_LOCK_WAIT_TIMEOUT) => Ok(Awaited::Held),
            Err(e) => Err(e),
        }
    }
}

/// The error number of `result`'s error, if it failed; a lock wait timeout is known by its
/// message without asking (the wait's usual end).
fn errno_of<T>(conn: &mut MysqlConnection, result: &QueryResult<T>) -> QueryResult<Option<i32>> {
    match result {
        Ok(_) => Ok(None),
        Err(e) if looks_like_lock_wait_timeout(e) => Ok(Some(ER_LOCK_WAIT_TIMEOUT)),
        Err(_) => last_errno(conn),
    }
}
