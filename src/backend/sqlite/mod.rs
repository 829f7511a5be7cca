//! SQLite: barriers on `SqliteConnection` (cargo feature `sqlite`).
//!
//! SQLite has no server, no transaction ids and no row locks: the barrier rests on its single
//! write lock, which the producer's barrier insert takes and its transaction keeps until it
//! ends. A visible row means committed; the worker holding the write lock while the row is
//! still absent means not committed (`check.rs`). Handlers run holding the write lock
//! (`BEGIN IMMEDIATE`); `locks.rs` manages busy timeouts and the journal mode. The argument,
//! its price and its limits: `docs/design/sqlite.md`.

mod check;
mod inspect;
mod locks;
#[cfg(all(test, feature = "testing"))]
mod tests;

use super::rows::{ReapedRow, UnconsumedRow};
use super::sealed::Backend;
use super::{
    Checked, Claim, Inserted, NewBarrier, Pending, ReapedBarrier, ServerTransaction, Unconsumed,
};
use crate::error::Error;
use check::check_ids;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use locks::{enable_wal, is_busy, journal_mode, millis, with_busy_timeout};
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// The least time `worker_transaction`, `run_migrations`, `mark_attempted` and the reaper
/// wait for the write lock.
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Ids per `IN (...)` list: under SQLite's oldest limit on bound parameters (999).
pub(super) const IDS_PER_QUERY: usize = 500;

#[derive(QueryableByName)]
struct IntRow {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct HintRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    id: String,
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
    const ONE_WRITER: bool = true;

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

    fn insert_barrier(&mut self, row: &NewBarrier<'_>) -> QueryResult<Inserted> {
        // This insert takes the write lock (if an earlier write of the transaction has not), and
        // the transaction keeps it until it ends: `check_pending` relies on that.
        row.bind_to(diesel::sql_query(
            "INSERT INTO dtb_barriers (id, job_id, job_kind, job_queue, payload, job_digest) \
             VALUES (?, ?, ?, ?, ?, ?)",
        ))
        .execute(self)?;
        Ok(Inserted {
            txid: None,
            location: self.barrier_location()?,
        })
    }

    fn remove_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        diesel::sql_query("DELETE FROM dtb_barriers WHERE id = ?")
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(self)?;
        Ok(())
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
        .execute(self)?;
        if deleted > 0 {
            return Ok(Claim::Locked);
        }
        let left: IntRow =
            diesel::sql_query("SELECT COUNT(*) AS value FROM dtb_barriers WHERE id = ?")
                .bind::<Text, _>(&id)
                .get_result(self)?;
        Ok(if left.value > 0 {
            Claim::Foreign
        } else {
            Claim::Gone
        })
    }

    fn claim_holds(&mut self, id: &uuid::Uuid) -> QueryResult<bool> {
        // The deletion stands while this session no longer sees the row and its transaction is
        // still open (SQLite rolls a transaction back by itself after some errors).
        let row: IntRow =
            diesel::sql_query("SELECT COUNT(*) AS value FROM dtb_barriers WHERE id = ?")
                .bind::<Text, _>(id.hyphenated().to_string())
                .get_result(self)?;
        Ok(row.value == 0 && self.server_transaction(1)? == ServerTransaction::Open)
    }

    const HAS_HINTS: bool = true;

    fn listen_for_commits(&mut self) -> QueryResult<()> {
        // The listener's cursor lives in a temporary table: private to this connection, and
        // writing it takes no lock on the database.
        self.batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS dtb_hint_cursor (seq INTEGER NOT NULL); \
             DELETE FROM temp.dtb_hint_cursor;",
        )?;
        // Rows committed before now are found by the first check of their jobs.
        diesel::sql_query(
            "INSERT INTO temp.dtb_hint_cursor (seq) \
             SELECT COALESCE(MAX(seq), 0) FROM main.dtb_barriers",
        )
        .execute(self)?;
        Ok(())
    }

    fn stop_listening(&mut self) -> QueryResult<()> {
        self.batch_execute("DROP TABLE IF EXISTS temp.dtb_hint_cursor")
    }

    fn take_commit_hints(&mut self) -> QueryResult<Vec<uuid::Uuid>> {
        // Rows past the cursor have committed (a read sees nothing else). They become visible
        // in `seq` order, because one transaction writes at a time and `seq` is never reused.
        let rows: QueryResult<Vec<HintRow>> = diesel::sql_query(
            "SELECT b.seq, b.id FROM main.dtb_barriers b, temp.dtb_hint_cursor c \
             WHERE b.seq > c.seq ORDER BY b.seq",
        )
        .load(self);
        let rows = match rows {
            Ok(rows) => rows,
            // Rollback-journal mode refuses reads while a commit is written: look again later.
            Err(e) if is_busy(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let Some(last) = rows.last() else {
            return Ok(Vec::new());
        };
        diesel::sql_query("UPDATE temp.dtb_hint_cursor SET seq = ?")
            .bind::<BigInt, _>(last.seq)
            .execute(self)?;
        Ok(rows
            .iter()
            .filter_map(|r| uuid::Uuid::try_parse(&r.id).ok())
            .collect())
    }

    type Checker = ();

    fn check_pending(&mut self, _: &mut (), pending: &[Pending]) -> QueryResult<Checked> {
        let ids: Vec<String> = pending
            .iter()
            .map(|p| p.id.hyphenated().to_string())
            .collect();
        // Busy timeout zero: nothing here waits for a producer.
        with_busy_timeout(self, |_| 0, |c| check_ids(c, &ids)).map(Checked::from)
    }

    fn mark_attempted(&mut self, id: &uuid::Uuid, retry_due: Option<Duration>) -> QueryResult<()> {
        with_busy_timeout(
            self,
            |previous| previous.max(millis(WRITE_LOCK_WAIT)),
            |c| {
                diesel::sql_query(
                    "UPDATE dtb_barriers SET attempted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), \
                         retry_due_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) \
                     WHERE id = ?",
                )
                .bind::<Nullable<Text>, _>(retry_due.map(seconds_ahead))
                .bind::<Text, _>(id.hyphenated().to_string())
                .execute(c)
                .map(|_| ())
            },
        )
    }

    fn take_unconsumed(
        &mut self,
        grace: Duration,
        max_age: Duration,
        limit: i64,
    ) -> QueryResult<Vec<Unconsumed>> {
        // Inside `worker_transaction`: this connection holds the write lock, so no worker is
        // consuming any of these rows, and they stay as read until the commit. The times are
        // computed once, in one statement.
        #[derive(QueryableByName)]
        struct Times {
            #[diesel(sql_type = Text)]
            now: String,
            #[diesel(sql_type = Text)]
            pushed_before: String,
            #[diesel(sql_type = Text)]
            created_after: String,
        }
        let times: Times = diesel::sql_query(
            "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now') AS now, \
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) AS pushed_before, \
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) AS created_after",
        )
        .bind::<Text, _>(seconds_ago(grace))
        .bind::<Text, _>(seconds_ago(max_age))
        .get_result(self)?;
        let rows: Vec<UnconsumedRow> = diesel::sql_query(
            "SELECT id, NULL AS txid, payload FROM dtb_barriers \
             WHERE ((attempted_at IS NULL AND pushed_at < ?) OR retry_due_at < ?) \
               AND created_at > ? \
             ORDER BY created_at, seq LIMIT ?",
        )
        .bind::<Text, _>(&times.pushed_before)
        .bind::<Text, _>(&times.pushed_before)
        .bind::<Text, _>(&times.created_after)
        .bind::<BigInt, _>(limit)
        .load(self)?;
        for row in &rows {
            diesel::sql_query(
                "UPDATE dtb_barriers \
                 SET pushed_at = ?, attempted_at = NULL, retry_due_at = NULL WHERE id = ?",
            )
            .bind::<Text, _>(&times.now)
            .bind::<Text, _>(&row.id)
            .execute(self)?;
        }
        Ok(rows.into_iter().map(Into::into).collect())
    }

    fn reap(&mut self, older_than: Duration) -> QueryResult<Vec<ReapedBarrier>> {
        // The cutoff is computed once, so that the rows listed are exactly the rows deleted.
        // `created_at` is ISO 8601 text in UTC, which orders as it sorts.
        let modifier = seconds_ago(older_than);
        with_busy_timeout(
            self,
            |previous| previous.max(millis(WRITE_LOCK_WAIT)),
            |c| {
                c.immediate_transaction(|c| {
                    let cutoff: TextRow = diesel::sql_query(
                        "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) AS value",
                    )
                    .bind::<Text, _>(&modifier)
                    .get_result(c)?;
                    let rows: Vec<ReapedRow> = diesel::sql_query(
                        "SELECT id, job_id, job_kind FROM dtb_barriers WHERE created_at < ?",
                    )
                    .bind::<Text, _>(&cutoff.value)
                    .load(c)?;
                    diesel::sql_query("DELETE FROM dtb_barriers WHERE created_at < ?")
                        .bind::<Text, _>(&cutoff.value)
                        .execute(c)?;
                    Ok(rows.into_iter().map(Into::into).collect())
                })
            },
        )
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

/// A date modifier for `strftime`: `d` before.
fn seconds_ago(d: Duration) -> String {
    format!("-{:.3} seconds", super::bounded_age(d).as_secs_f64())
}

/// A date modifier for `strftime`: `d` after.
fn seconds_ahead(d: Duration) -> String {
    format!("+{:.3} seconds", super::bounded_age(d).as_secs_f64())
}
