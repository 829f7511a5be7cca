//! The SQLite `TestDb`: the crate's `SqliteTestFile`, a database file of its own per test in a
//! temporary directory that is removed when the test ends.
//!
//! SQLite has no server, so three `TestDb` methods have no direct equivalent:
//!
//! * `session_id`: a connection has no server-side id. It returns a number unique in this
//!   process, and nothing else uses it.
//! * `waiters_on`: SQLite cannot list who waits for a lock, and the worker never blocks on one
//!   (its checks try the lock without waiting). The shared scenarios watch the worker's own
//!   count of waiting jobs (`WorkerMonitor::waiting`) instead; this method panics.
//! * `kill`: nothing can end another connection's transaction in SQLite. What a killed
//!   producer means here is a producer *process* that dies mid-transaction: see
//!   `killed_producer_process_aborts` in `tests/sqlite.rs`.
#![cfg(feature = "sqlite")]

use super::TestDb;
use diesel::sqlite::SqliteConnection;
use diesel_transaction_barrier::testing::SqliteTestFile;
use std::sync::atomic::{AtomicI64, Ordering};

pub struct Lite(SqliteTestFile);

impl TestDb for Lite {
    type Conn = SqliteConnection;
    type Database = SqliteTestFile;

    const INTEGER: &'static str = "INTEGER";
    const TEXT: &'static str = "TEXT";
    /// SQLite has no transaction ids: its timeout report describes the write lock and the
    /// journal mode instead. (Held, or already free: the worker counts the timeout before it
    /// looks, and the transaction rolls back as soon as the count shows.)
    const TIMEOUT_DEBUG_INFO: &'static [&'static str] =
        &["transaction: the write lock is", "journal_mode wal"];
    const HOLD_BARRIERS: &'static str = "BEGIN IMMEDIATE";
    const HAS_SESSIONS: bool = false;

    fn wrap(file: SqliteTestFile) -> Lite {
        Lite(file)
    }

    fn database(&self) -> &SqliteTestFile {
        &self.0
    }

    fn session_id(_conn: &mut SqliteConnection) -> i64 {
        static NEXT: AtomicI64 = AtomicI64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    fn waiters_on(&self, _session: i64) -> i64 {
        panic!("SQLite cannot tell who waits for a lock; watch the worker's monitor instead");
    }

    fn kill(&self, _session: i64) {
        panic!(
            "SQLite has no server on which to kill a session; see killed_producer_process_aborts"
        );
    }
}
