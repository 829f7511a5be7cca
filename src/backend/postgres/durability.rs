//! PostgreSQL's proof of durability: a commit is visible before it is flushed when its
//! transaction turned `synchronous_commit` off, so the waiter compares the WAL flush position
//! with the insert position its check read after seeing the commit, and commits a fence of its
//! own when the flush does not come soon enough (see `docs/design/postgres.md`).

use super::prepared::Prepared;
use crate::backend::Prove;
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;

#[derive(QueryableByName)]
pub(super) struct LsnRow {
    #[diesel(sql_type = BigInt)]
    pub(super) inserted_lsn: i64,
    #[diesel(sql_type = BigInt)]
    pub(super) flushed_lsn: i64,
}

/// The WAL's insert and flush positions now, as byte offsets.
pub(super) const LSNS: &str =
    "(pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS inserted_lsn, \
                    (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint AS flushed_lsn";

/// A statement that reads [`LSNS`].
pub(super) static SELECT_LSNS: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("SELECT {LSNS}"));

/// A WAL position read from the server (never negative: it counts bytes from zero).
pub(super) fn lsn(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// PostgreSQL's [`Prove`] capability.
pub(super) struct WalFlush;

/// The one instance the backend hands out.
pub(super) static WAL_FLUSH: WalFlush = WalFlush;

impl Prove<PgConnection> for WalFlush {
    fn handler_commits_prove(&self) -> bool {
        // A worker's own session may run with `synchronous_commit` off.
        false
    }

    fn flushed_position(&self, conn: &mut PgConnection) -> QueryResult<Option<u64>> {
        let now: LsnRow = Prepared::new(&SELECT_LSNS, &[]).get_result(conn)?;
        Ok(Some(lsn(now.flushed_lsn)))
    }

    fn fence(&self, conn: &mut PgConnection) -> QueryResult<()> {
        // One round trip (the simple query protocol runs the whole batch): a write of the
        // worker's own, committed with a local flush (`dtb_fence` sets it), so the WAL is
        // durable past every commit seen before it began. Nothing of it stays.
        let fenced =
            conn.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED; SELECT dtb_fence(); COMMIT");
        if let Err(e) = fenced {
            // A failed statement skips the rest of the batch and leaves the server inside an
            // aborted transaction that Diesel does not count: the pool must not hand this
            // connection out again.
            crate::backend::poison(conn);
            return Err(e);
        }
        Ok(())
    }
}
