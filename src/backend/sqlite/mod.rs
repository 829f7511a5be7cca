//! SQLite: barriers on `SqliteConnection` (cargo feature `sqlite`).
//!
//! SQLite has no server, no transaction ids and no row locks: the barrier rests on its single
//! write lock, which the producer's barrier insert takes and its transaction keeps until it
//! ends. A visible row means committed; the worker holding the write lock while the row is
//! still absent means not committed (`check.rs`). Handlers run holding the write lock
//! (`BEGIN IMMEDIATE`); `locks.rs` manages busy timeouts and the journal mode. The argument,
//! its price and its limits: `docs/design/sqlite.md`.

mod check;
mod claim;
mod hints;
mod inspect;
mod locks;
mod maintenance;
#[cfg(all(test, feature = "testing"))]
mod tests;

use super::sealed::Backend;
use super::{
    CheckSchedule, Checked, Claim, Durability, Hints, Inserted, NewBarrier, Pending, ReapedBarrier,
    ServerTransaction, Unconsumed,
};
use crate::error::Error;
use check::check_ids;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use locks::{enable_wal, is_busy, journal_mode, millis, with_busy_timeout};
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// The least time `worker_transaction`, `consume_barriers`, `run_migrations`, `mark_attempted`
/// and the reaper wait for the write lock.
pub(super) const WRITE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Ids per `IN (...)` list: under SQLite's oldest limit on bound parameters (999).
pub(super) const IDS_PER_QUERY: usize = 500;

#[derive(QueryableByName)]
pub(super) struct IntRow {
    #[diesel(sql_type = BigInt)]
    pub(super) value: i64,
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct BusyTimeoutRow {
    #[diesel(sql_type = BigInt)]
    timeout: i64,
}

#[derive(QueryableByName)]
struct JournalModeRow {
    #[diesel(sql_type = Text)]
    journal_mode: String,
}

impl Backend for SqliteConnection {
    const NAME: &'static str = "sqlite";
    fn run_migrations(&mut self) -> Result<(), Error> {
        with_busy_timeout(
            self,
            |previous| previous.max(millis(WRITE_LOCK_WAIT)),
            |c| {
                MigrationHarness::run_pending_migrations(c, MIGRATIONS)
                    .map(|_| ())
                    .map_err(Error::Migration)?;
                enable_wal(c)
            },
        )
    }

    fn barrier_schema_present(&mut self) -> QueryResult<bool> {
        // The table, with the newest column the migrations add.
        let row: IntRow = diesel::sql_query(
            "SELECT COUNT(*) AS value FROM sqlite_master m, pragma_table_info(m.name) c \
             WHERE m.type = 'table' AND m.name = ? AND c.name = 'retry_due_at'",
        )
        .bind::<Text, _>(super::BARRIER_TABLE)
        .get_result(self)?;
        if row.value > 0 {
            let mode = journal_mode(self)?;
            if !mode.eq_ignore_ascii_case("wal") {
                tracing::warn!(
                    journal_mode = %mode,
                    "the SQLite database is not in WAL mode: the worker's reads will delay the \
                     application's commits (diesel_transaction_barrier::run_migrations switches it)"
                );
            }
        }
        Ok(row.value > 0)
    }

    fn server_transaction(&mut self, _diesel_depth: u32) -> QueryResult<ServerTransaction> {
        // Diesel's count misses a `BEGIN` it did not send, and a transaction that SQLite rolled
        // back by itself (some I/O and out-of-memory errors do). SQLite refuses a `BEGIN` inside
        // a transaction; outside one, a deferred `BEGIN` takes no lock and is rolled back at
        // once. (SQLite answers this in-process: no round trip.)
        match self.batch_execute("BEGIN DEFERRED") {
            Ok(()) => {
                self.batch_execute("ROLLBACK")?;
                Ok(ServerTransaction::Closed)
            }
            Err(DieselError::DatabaseError(_, info))
                if info.message().contains("within a transaction") =>
            {
                Ok(ServerTransaction::Open)
            }
            Err(_) => Ok(ServerTransaction::Unknown),
        }
    }

    fn insert_barriers(&mut self, rows: &[NewBarrier<'_>]) -> QueryResult<Inserted> {
        // The first insert takes the write lock (if an earlier write of the transaction has
        // not), and the transaction keeps it until it ends: `check_pending` relies on that. Row
        // by row: SQLite runs them in-process, without a round trip.
        for row in rows {
            row.bind_to(diesel::sql_query(
                "INSERT INTO dtb_barriers (id, job_id, job_kind, job_queue, payload, job_digest) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            ))
            .execute(self)?;
        }
        Ok(Inserted {
            txid: None,
            location: self.barrier_location()?,
        })
    }

    fn remove_barriers(&mut self, ids: &[uuid::Uuid]) -> QueryResult<usize> {
        let mut deleted = 0;
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let params = vec!["?"; chunk.len()].join(", ");
            let mut query =
                diesel::sql_query(format!("DELETE FROM dtb_barriers WHERE id IN ({params})"))
                    .into_boxed();
            for id in chunk {
                query = query.bind::<Text, _>(id.hyphenated().to_string());
            }
            deleted += query.execute(self)?;
        }
        Ok(deleted)
    }

    /// In an immediate transaction that waits for the write lock as the worker's own
    /// transactions do: a pooled connection's busy timeout may be zero, and a deletion that
    /// gave up at once on a lock held for a moment would fail a job whose handler ran.
    fn consume_barriers(&mut self, ids: &[uuid::Uuid]) -> QueryResult<usize> {
        with_busy_timeout(
            self,
            |previous| previous.max(millis(WRITE_LOCK_WAIT)),
            |c| c.immediate_transaction(|c| c.remove_barriers(ids)),
        )
    }

    fn barrier_digest(&mut self, id: &uuid::Uuid) -> QueryResult<Option<Option<String>>> {
        #[derive(QueryableByName)]
        struct DigestRow {
            #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
            job_digest: Option<String>,
        }
        let row: Option<DigestRow> =
            diesel::sql_query("SELECT job_digest FROM dtb_barriers WHERE id = ?")
                .bind::<Text, _>(id.hyphenated().to_string())
                .get_result(self)
                .optional()?;
        Ok(row.map(|r| r.job_digest))
    }

    fn missing_table(&mut self, error: &DieselError) -> bool {
        // SQLite's messages are fixed (not translated), and Diesel passes on no result code.
        matches!(error, DieselError::DatabaseError(_, info)
            if info.message().starts_with("no such table: dtb_barriers"))
    }

    fn barrier_location(&mut self) -> QueryResult<Option<String>> {
        // The path of the database file, as SQLite resolved it when the connection opened it
        // (empty for an in-memory or temporary database).
        let row: Option<TextRow> =
            diesel::sql_query("SELECT file AS value FROM pragma_database_list WHERE name = 'main'")
                .get_result(self)
                .optional()?;
        Ok(row.map(|r| r.value).filter(|file| !file.is_empty()))
    }

    fn worker_transaction<R, E, F>(&mut self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self) -> Result<R, E>,
        E: From<diesel::result::Error>,
    {
        // BEGIN IMMEDIATE: the write lock is ours from the start, so the claim below cannot be
        // contested and the handler's writes never wait. See "The worker transaction holds the
        // write lock" above for why not a deferred BEGIN.
        with_busy_timeout(
            self,
            |previous| previous.max(millis(WRITE_LOCK_WAIT)),
            |c| c.immediate_transaction(f),
        )
    }

    fn claim_barrier(&mut self, id: &uuid::Uuid, digest: &str) -> QueryResult<Claim> {
        claim::claim_barrier(self, id, digest)
    }

    fn claim_holds(&mut self, id: &uuid::Uuid) -> QueryResult<bool> {
        claim::claim_holds(self, id)
    }

    type Checker = ();

    fn check_pending(&mut self, _: &mut (), pending: &[Pending]) -> QueryResult<Checked> {
        let ids: Vec<String> = pending
            .iter()
            .map(|p| p.id.hyphenated().to_string())
            .collect();
        // Busy timeout zero: nothing here waits for a producer.
        let (verdicts, digests) = with_busy_timeout(self, |_| 0, |c| check_ids(c, &ids))?;
        Ok(Checked {
            digests,
            ..Checked::from(verdicts)
        })
    }

    // Commit hints wake the waiter at once; the checks are a safety net.
    const CHECKS: CheckSchedule = CheckSchedule::every(Duration::from_millis(200));

    fn hints() -> Hints<Self> {
        Hints::Listen(&hints::NEW_ROWS)
    }

    fn durability() -> Durability<Self> {
        // A commit is written (in WAL mode: appended to the log) before the write lock is let
        // go, and the checks decide only from committed rows.
        Durability::BeforeVisible
    }

    fn mark_attempted(&mut self, id: &uuid::Uuid, retry_due: Option<Duration>) -> QueryResult<()> {
        maintenance::mark_attempted(self, id, retry_due)
    }

    fn take_unconsumed(
        &mut self,
        grace: Duration,
        max_age: Duration,
        limit: i64,
    ) -> QueryResult<Vec<Unconsumed>> {
        maintenance::take_unconsumed(self, grace, max_age, limit)
    }

    fn reap(&mut self, older_than: Duration, limit: i64) -> QueryResult<Vec<ReapedBarrier>> {
        maintenance::reap(self, older_than, limit)
    }

    fn list_barriers(&mut self, limit: i64) -> QueryResult<super::inspect::Listing> {
        inspect::list(self, limit)
    }

    fn transaction_info(
        &mut self,
        _id: &uuid::Uuid,
        _txid: Option<&str>,
    ) -> QueryResult<Option<String>> {
        // No transaction ids and no session list: say whether some connection holds the write
        // lock right now, and in which journal mode.
        let mode = journal_mode(self)?;
        let held = with_busy_timeout(
            self,
            |_| 0,
            |c| match c.immediate_transaction(|_| Ok::<_, DieselError>(())) {
                Ok(()) => Ok(false),
                Err(e) if is_busy(&e) => Ok(true),
                Err(e) => Err(e),
            },
        )?;
        let lock = if held {
            "the write lock is held by another connection"
        } else {
            "the write lock is free"
        };
        Ok(Some(format!("{lock} (journal_mode {mode})")))
    }
}
