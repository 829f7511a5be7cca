//! MySQL's proof of durability. InnoDB releases a committing transaction's row locks, and makes
//! it visible, *before* its commit is flushed to the redo log, so seeing a barrier row does not
//! yet prove that its commit would survive a crash.
//!
//! Why a write of the worker's own proves it:
//!
//! 1. A producer's commit writes its commit record to the redo log buffer, at some log
//!    sequence number L, before InnoDB releases the producer's row locks and before the
//!    transaction becomes visible to new read views; only then is the log flushed up to L
//!    (with `innodb_flush_log_at_trx_commit = 1`).
//! 2. So once the worker has seen the row (a read that began after the producer's
//!    transaction became visible, or a lock wait that ended with it), L had been assigned. A
//!    write the worker makes afterwards gets a later position in the log, and so does its
//!    commit record — if the write changes something: an update that changes nothing writes
//!    no redo and would prove nothing.
//! 3. The redo log is written and flushed in order, and with
//!    `innodb_flush_log_at_trx_commit = 1` a `COMMIT` returns only once the log is flushed
//!    past its own commit record — hence past L. (With the binary log on, commits are also
//!    ordered through it, and `sync_binlog = 1` gives the same prefix argument for it.)
//!
//! Any committed write of the worker's that began after the check proves it: the commits of
//! its handlers' transactions (each deletes a barrier row) while they come, and otherwise the
//! fence below.

use super::session::Statement;
use crate::backend::Prove;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;

/// How many rows of `dtb_fences` the workers spread their fences over.
const SLOTS: u16 = 64;

/// MySQL's [`Prove`] capability.
pub(super) struct RedoLog;

/// The one instance the backend hands out.
pub(super) static REDO_LOG: RedoLog = RedoLog;

impl Prove<MysqlConnection> for RedoLog {
    fn handler_commits_prove(&self) -> bool {
        // With `innodb_flush_log_at_trx_commit = 1`, which the worker checks when it connects.
        true
    }

    fn fence(&self, conn: &mut MysqlConnection) -> QueryResult<()> {
        // One statement in autocommit: a change to a row of `dtb_fences` (never a barrier row,
        // which a handler may be claiming just now), committed durably. The slot is picked by
        // process, so that workers rarely meet on one; when they do, one waits for the other's
        // statement (its lock goes with its commit, before the flush), never for a handler.
        static SLOT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            (uuid::Uuid::new_v4().as_u128() % u128::from(SLOTS)).to_string()
        });
        const FENCE: &[&str] = &[
            "INSERT INTO dtb_fences (slot, fences) VALUES (CAST(",
            " AS SIGNED), 1) ON DUPLICATE KEY UPDATE fences = fences + 1, fenced_at = NOW(6)",
        ];
        Statement::new(FENCE, &[SLOT.as_str()]).execute(conn)?;
        Ok(())
    }
}
