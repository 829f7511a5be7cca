//! SQLite: barriers on `SqliteConnection`.
//!
//! SQLite has no server, no transaction ids, no row locks and no view of other connections'
//! sessions. What it has is one write lock per database file: a transaction takes it with its
//! first write and keeps it until it commits or rolls back. The barrier is built on that.
//!
//! # How the worker learns how the producer's transaction ended
//!
//! * The producer inserts the barrier row in its transaction *before* the job is pushed, so from
//!   then on its transaction holds the write lock. A worker can fetch the job only after the
//!   push: by then the producer's transaction still holds the lock, or it has ended.
//! * **Committed**: the row is visible. Another connection reads committed data only (a WAL
//!   reader sees the last commit; in rollback-journal mode an uncommitted change never reaches
//!   the file while a reader holds its lock). The row's id is random and only this producer
//!   writes it, so seeing it proves that its transaction committed.
//! * **Not committed**: the worker takes the write lock itself (`BEGIN IMMEDIATE`, which does
//!   not wait: busy timeout zero) and the row is still not there. Holding the lock proves that
//!   no write transaction is running, the producer's included, so it has ended; it ended
//!   without the row, so it rolled back (or the savepoint around the enqueue did, or an earlier
//!   delivery consumed the row). One lock taken this way settles every pending barrier at once.
//! * **Pending**: the row is not visible and the lock is taken.
//!
//! The worker's waiter thread does this through two pooled connections, however many jobs wait
//! (see `src/waiter.rs`). Every millisecond while jobs wait, the *listener* reads the barrier
//! rows committed since its last look, by their `seq` column (`AUTOINCREMENT`, so never
//! reused; and with one writer at a time, rows become visible in `seq` order). Those are
//! commit hints: a waiting job starts a millisecond or two after its transaction commits.
//! Every 200 ms, and at once for a newly fetched job, the *checker* runs
//! [`check_pending`](Backend::check_pending): one read for the visible rows, then one attempt
//! at the lock for the rest. A rollback is therefore noticed within about 200 ms.
//!
//! # The worker transaction holds the write lock
//!
//! `worker_transaction` is `BEGIN IMMEDIATE`: it takes the write lock before the claim, and the
//! handler runs inside it. The claim deletes the row (a rollback of the worker transaction puts
//! it back) and never waits, and it answers `Locked` or `Gone`, never `Busy`: a second worker
//! consuming the same barrier would hold the write lock, so two consumers are serialised by the
//! lock, and the second finds the row gone. What the handler writes commits together with the
//! row's deletion, exactly once, as on the other backends.
//!
//! The price is SQLite's single writer: **while a handler runs, the application's writers
//! wait** for it, and while an application transaction writes, no handler can start. The
//! application's busy timeout must outlast the longest handler, or its writes fail with
//! "database is locked". Keep handlers short, and do slow work outside the database (a handler
//! can enqueue a plain follow-up job for it).
//!
//! The alternative, a deferred `BEGIN` that takes the lock only at the handler's first write or
//! at the deletion, would let the application write while a handler runs, but it loses the
//! guarantee: a WAL read transaction that later writes fails with `SQLITE_BUSY_SNAPSHOT` if
//! anything committed since it began, so under load the handler would run, fail to delete its
//! row, and run again on the retry; and two deliveries could both read the row and both run the
//! handler. Exactly-once consumption was preferred.
//!
//! # Busy timeouts
//!
//! The backend sets the busy timeout it needs on the worker's connections and puts the previous
//! one back afterwards, so a plain `ConnectionManager<SqliteConnection>` pool works: checks
//! use zero (they never wait for a producer), and `worker_transaction`, the reaper and
//! `mark_attempted` wait at least 30 seconds for the write lock (longer if the connection
//! already had a longer busy timeout). SQLite's locks are not fair, so under heavy write
//! contention a waiter can lose the lock many times in a row; if the lock stays out of reach
//! for that long, the delivery fails and Faktory retries the job later (the handler has not
//! run).
//!
//! The application's connections need a busy timeout too, as they do whenever an SQLite
//! database has more than one connection: the worker takes the write lock for a moment to
//! check for a rollback, and for the length of each handler. Make it generous (tens of
//! seconds) if many threads write at once.
//!
//! # WAL
//!
//! [`run_migrations`](crate::run_migrations) switches the database to WAL journal mode (`PRAGMA
//! journal_mode = WAL`, which is stored in the database file, so once is enough; it cannot run
//! inside the migration's transaction, so it is not in the migration's SQL). Correctness does
//! not depend on it, but in rollback-journal mode the producer's `COMMIT` has to wait until the
//! worker's reads let go of their shared lock, and readers get "database is locked" while a
//! commit is written. In WAL mode readers and the writer do not block each other. The worker
//! logs a warning when it starts on a database that is not in WAL mode. Applications that copy
//! the SQL instead of calling `run_migrations` should run `PRAGMA journal_mode = WAL;` once.
//! WAL needs every process on the same host (no network file systems).
//!
//! Durability: a WAL commit becomes visible to readers only after its frames are written and,
//! with `synchronous = FULL` (SQLite's default), synced, so `Committed` means durable. With
//! `synchronous = NORMAL`, a common choice with WAL, a commit survives a crash of the
//! application but not a power failure: after one, a handler may have run for a transaction that
//! is gone (its own writes to the database are gone with it; effects outside are not).
//!
//! # Limits
//!
//! * One writer at a time: a running handler holds the write lock, and an open application
//!   write transaction holds up every handler (see above).
//! * The worker commits too (each consumed barrier is a write). A deferred application
//!   transaction that reads first and writes later fails with "database is locked"
//!   (`SQLITE_BUSY_SNAPSHOT`) if anyone committed in between, a worker included; as usual with
//!   SQLite, begin such transactions with `immediate_transaction`.
//! * Producer and worker must open the same database file. In-memory databases are private to
//!   their connection, and shared-cache databases lock differently: neither is supported.
//! * A producer connection in `PRAGMA locking_mode = EXCLUSIVE` never lets go of the lock: its
//!   rolled-back jobs wait until the deadline (its committed ones are still seen at once).
//! * A rolled-back savepoint removes the row, but the outer transaction keeps the write lock: the
//!   worker learns "not committed" when the outer transaction ends.
//! * Telling a rollback from a running transaction needs the write lock. In a database whose
//!   writers never pause, the worker may not find it free within `block_limit`, and snoozes the
//!   job; commits are seen without the lock.
//! * The reconciler takes unconsumed barriers inside a worker transaction and pushes their jobs
//!   again before it commits, so while it pushes it holds the write lock. It runs every quarter
//!   of `reconcile_grace`, and usually finds nothing.
//! * There is no transaction id: descriptors carry none, and a timeout report says only whether
//!   the write lock is held, and the journal mode.
//! * A "killed producer" is a producer whose process dies (or whose connection is dropped, as
//!   when its thread panics) in the middle of the transaction: there is no server on which to
//!   kill a session. The operating system releases the dead process's file locks, and its
//!   uncommitted changes never became part of the database (WAL frames without a commit record
//!   are ignored; a leftover rollback journal is rolled back by the next connection), so the
//!   worker gets the lock, finds no row, and the job is not run.
//! * Diesel does not expose SQLite's result codes, so "busy" is recognised by SQLite's fixed
//!   message for `SQLITE_BUSY`, "database is locked".
//!
//! `PRAGMA` values cannot be bound as parameters; the only ones formatted into SQL here are
//! numbers this module computes, and the only other formatted text is a list of `?`. Every
//! value is bound.

use super::rows::{ReapedRow, UnconsumedRow};
use super::sealed::Backend;
use super::{
    Checked, Claim, Inserted, NewBarrier, Pending, ReapedBarrier, ServerTransaction, Unconsumed,
    Verdict,
};
use crate::error::Error;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// The least time `worker_transaction`, `run_migrations`, `mark_attempted` and the reaper
/// wait for the write lock.
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// The longest pause between two checks in `await_verdict`.
const MAX_POLL_PAUSE: Duration = Duration::from_millis(5);

/// Ids per `IN (...)` list: under SQLite's oldest limit on bound parameters (999).
const IDS_PER_QUERY: usize = 500;

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

    fn run_migrations(&mut self) -> Result<(), Error> {
        with_busy_timeout(
            self,
            |previous| previous.max(i64::from(super::millis(WRITE_LOCK_WAIT))),
            |c| {
                MigrationHarness::run_pending_migrations(c, MIGRATIONS)
                    .map(|_| ())
                    .map_err(Error::Migration)?;
                enable_wal(c)
            },
        )
    }

    fn barrier_schema_present(&mut self) -> QueryResult<bool> {
        let row: IntRow = diesel::sql_query(
            "SELECT COUNT(*) AS value FROM sqlite_master WHERE type = 'table' AND name = ?",
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
        diesel::sql_query(
            "INSERT INTO dtb_barriers (id, job_id, job_kind, job_queue, payload) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind::<Text, _>(row.id.hyphenated().to_string())
        .bind::<Text, _>(row.job_id)
        .bind::<Text, _>(row.job_kind)
        .bind::<Text, _>(row.job_queue)
        .bind::<Text, _>(row.payload)
        .execute(self)?;
        Ok(Inserted {
            txid: None,
            location: self.barrier_location()?,
        })
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

    fn await_verdict(&mut self, id: &uuid::Uuid, limit: Duration) -> QueryResult<Verdict> {
        // Checks again and again, never waiting on the producer in SQLite itself: its busy
        // handler sleeps up to 100 ms between attempts and would not look at the row meanwhile.
        let batch = [Pending {
            id: *id,
            txid: None,
            probe: true,
        }];
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let verdict = self.check_pending(&batch)?.verdicts[0];
            let elapsed = started.elapsed();
            if verdict != Verdict::Pending || elapsed >= limit {
                return Ok(verdict);
            }
            std::thread::sleep(pause.min(limit - elapsed));
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
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
            |previous| previous.max(i64::from(super::millis(WRITE_LOCK_WAIT))),
            |c| c.immediate_transaction(f),
        )
    }

    fn claim_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<Claim> {
        // Inside `worker_transaction` this connection holds the database's write lock, so no one
        // else can be consuming the row: deleting it decides, and never waits. Committing the
        // worker transaction consumes the barrier; rolling it back (handler error, panic) puts
        // the row back. `Busy` cannot happen: a concurrent duplicate waited in BEGIN IMMEDIATE
        // and now finds the row gone.
        let deleted = diesel::sql_query("DELETE FROM dtb_barriers WHERE id = ?")
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(self)?;
        Ok(if deleted > 0 {
            Claim::Locked
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

    fn check_pending(&mut self, pending: &[Pending]) -> QueryResult<Checked> {
        let ids: Vec<String> = pending
            .iter()
            .map(|p| p.id.hyphenated().to_string())
            .collect();
        // Busy timeout zero: nothing here waits for a producer.
        with_busy_timeout(self, |_| 0, |c| check_ids(c, &ids)).map(Checked::from)
    }

    fn mark_attempted(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        with_busy_timeout(
            self,
            |previous| previous.max(i64::from(super::millis(WRITE_LOCK_WAIT))),
            |c| {
                diesel::sql_query(
                    "UPDATE dtb_barriers SET attempted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
                     WHERE id = ?",
                )
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
             WHERE attempted_at IS NULL AND pushed_at < ? AND created_at > ? \
             ORDER BY created_at, seq LIMIT ?",
        )
        .bind::<Text, _>(&times.pushed_before)
        .bind::<Text, _>(&times.created_after)
        .bind::<BigInt, _>(limit)
        .load(self)?;
        for row in &rows {
            diesel::sql_query("UPDATE dtb_barriers SET pushed_at = ? WHERE id = ?")
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
            |previous| previous.max(i64::from(super::millis(WRITE_LOCK_WAIT))),
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

/// Verdicts for `ids`, in order. The connection's busy timeout is zero: nothing here waits.
fn check_ids(conn: &mut SqliteConnection, ids: &[String]) -> QueryResult<Vec<Verdict>> {
    // Committed? A read sees committed rows only, and only the producer writes its row.
    let visible = match visible_ids(conn, ids) {
        Ok(visible) => visible,
        // Rollback-journal mode refuses reads while a commit is written: look again later.
        Err(e) if is_busy(&e) => return Ok(vec![Verdict::Pending; ids.len()]),
        Err(e) => return Err(e),
    };
    let mut verdicts: Vec<Verdict> = ids
        .iter()
        .map(|id| {
            if visible.contains(id) {
                Verdict::Committed
            } else {
                Verdict::Pending
            }
        })
        .collect();
    let rest: Vec<String> = ids
        .iter()
        .filter(|id| !visible.contains(*id))
        .cloned()
        .collect();
    if rest.is_empty() {
        return Ok(verdicts);
    }
    // Ended? Each producer took the write lock with its barrier insert, before its job was
    // pushed, fetched and handed to us. If we get the lock now, all those transactions are
    // over, and what we read while holding the lock is their final outcome.
    match conn.immediate_transaction(|c| visible_ids(c, &rest)) {
        Ok(committed) => {
            for (verdict, id) in verdicts.iter_mut().zip(ids) {
                if *verdict == Verdict::Pending {
                    *verdict = if committed.contains(id) {
                        Verdict::Committed
                    } else {
                        Verdict::NotCommitted
                    };
                }
            }
        }
        // Some transaction holds the lock: the rest stay pending.
        Err(e) if is_busy(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(verdicts)
}

/// Which of `ids` have a visible barrier row.
fn visible_ids(conn: &mut SqliteConnection, ids: &[String]) -> QueryResult<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let params = vec!["?"; chunk.len()].join(", ");
        let mut query = diesel::sql_query(format!(
            "SELECT id AS value FROM dtb_barriers WHERE id IN ({params})"
        ))
        .into_boxed();
        for id in chunk {
            query = query.bind::<Text, _>(id.as_str());
        }
        let rows: Vec<TextRow> = query.load(conn)?;
        found.extend(rows.into_iter().map(|r| r.value));
    }
    Ok(found)
}

/// `SQLITE_BUSY` (and its extended codes), which Diesel reports only by SQLite's message.
fn is_busy(e: &DieselError) -> bool {
    matches!(e, DieselError::DatabaseError(_, info) if info.message().starts_with("database is locked"))
}

fn journal_mode(conn: &mut SqliteConnection) -> QueryResult<String> {
    let row: JournalModeRow = diesel::sql_query("PRAGMA journal_mode").get_result(conn)?;
    Ok(row.journal_mode)
}

/// Switches the database to WAL unless it is in WAL mode already (an in-memory database stays
/// in `memory` mode, which is reported).
fn enable_wal(conn: &mut SqliteConnection) -> Result<(), Error> {
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
fn busy_timeout(conn: &mut SqliteConnection) -> QueryResult<i64> {
    let row: BusyTimeoutRow = diesel::sql_query("PRAGMA busy_timeout").get_result(conn)?;
    Ok(row.timeout)
}

fn set_busy_timeout(conn: &mut SqliteConnection, ms: i64) -> QueryResult<()> {
    let ms = ms.clamp(0, i64::from(i32::MAX));
    conn.batch_execute(&format!("PRAGMA busy_timeout = {ms}"))
}

/// Runs `f` with the busy timeout set to `timeout(previous)`, then puts `previous` back.
fn with_busy_timeout<R, E>(
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

/// A date modifier for `strftime`: `d` before.
fn seconds_ago(d: Duration) -> String {
    format!("-{:.3} seconds", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::mpsc;

    /// A database file in a directory of its own, removed on drop.
    struct TempDb {
        dir: PathBuf,
    }

    impl TempDb {
        fn new() -> TempDb {
            let dir =
                std::env::temp_dir().join(format!("dtb-sqlite-unit-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).unwrap();
            let db = TempDb { dir };
            let mut c = db.connect();
            Backend::run_migrations(&mut c).unwrap();
            db
        }

        fn url(&self) -> String {
            self.dir.join("db.sqlite").to_string_lossy().into_owned()
        }

        /// An application connection: with a busy timeout, as SQLite applications need.
        fn connect(&self) -> SqliteConnection {
            let mut c = SqliteConnection::establish(&self.url()).unwrap();
            c.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
            c
        }

        /// A worker connection: as a plain pool hands it out, without a busy timeout.
        fn worker(&self) -> SqliteConnection {
            SqliteConnection::establish(&self.url()).unwrap()
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn insert(c: &mut SqliteConnection, id: &uuid::Uuid) {
        c.insert_barrier(&NewBarrier {
            id,
            job_id: "jid",
            job_kind: "kind",
            job_queue: "default",
            payload: "{}",
        })
        .unwrap();
    }

    const SHORT: Duration = Duration::from_millis(60);

    /// Runs `producer` on a thread of its own: it gets a connection in an open transaction
    /// with the barrier inserted, and a receiver that says when to end it. Returns the sender
    /// and the thread.
    fn open_transaction(
        db: &TempDb,
        id: uuid::Uuid,
        commit: bool,
    ) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (end_tx, end_rx) = mpsc::channel::<()>();
        let mut conn = db.connect();
        let thread = std::thread::spawn(move || {
            let _ = conn.transaction(|c| {
                insert(c, &id);
                ready_tx.send(()).unwrap();
                end_rx.recv().unwrap();
                if commit {
                    Ok(())
                } else {
                    Err(DieselError::RollbackTransaction)
                }
            });
        });
        ready_rx.recv().unwrap();
        (end_tx, thread)
    }

    #[test]
    fn migrations_create_the_table_and_switch_to_wal() {
        let db = TempDb::new();
        let mut c = db.worker();
        assert!(c.barrier_schema_present().unwrap());
        assert_eq!(journal_mode(&mut c).unwrap(), "wal");
        // Running them again changes nothing.
        Backend::run_migrations(&mut c).unwrap();
        assert_eq!(busy_timeout(&mut c).unwrap(), 0, "busy timeout put back");
    }

    #[test]
    fn pending_while_open_then_committed() {
        let db = TempDb::new();
        let id = uuid::Uuid::new_v4();
        let (end, producer) = open_transaction(&db, id, true);
        let mut w = db.worker();
        let started = Instant::now();
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::Pending);
        let waited = started.elapsed();
        assert!(
            waited >= SHORT && waited < SHORT * 5,
            "bounded wait: {waited:?}"
        );
        end.send(()).unwrap();
        producer.join().unwrap();
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::Committed);
        assert_eq!(busy_timeout(&mut w).unwrap(), 0, "busy timeout put back");
    }

    #[test]
    fn rollback_is_not_committed() {
        let db = TempDb::new();
        let id = uuid::Uuid::new_v4();
        let (end, producer) = open_transaction(&db, id, false);
        let mut w = db.worker();
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::Pending);
        end.send(()).unwrap();
        producer.join().unwrap();
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::NotCommitted);
    }

    #[test]
    fn a_waiting_worker_sees_the_commit_at_once() {
        for commit in [true, false] {
            let db = TempDb::new();
            let id = uuid::Uuid::new_v4();
            let (end, producer) = open_transaction(&db, id, commit);
            let mut w = db.worker();
            let waiter = std::thread::spawn(move || {
                let v = w.await_verdict(&id, Duration::from_secs(20)).unwrap();
                (v, Instant::now())
            });
            std::thread::sleep(Duration::from_millis(100));
            end.send(()).unwrap();
            producer.join().unwrap();
            let ended = Instant::now();
            let (verdict, seen) = waiter.join().unwrap();
            let expected = if commit {
                Verdict::Committed
            } else {
                Verdict::NotCommitted
            };
            assert_eq!(verdict, expected);
            let late = seen.saturating_duration_since(ended);
            assert!(
                late < Duration::from_secs(1),
                "noticed {late:?} after the end"
            );
        }
    }

    #[test]
    fn rolled_back_savepoint_waits_for_the_outer_transaction() {
        let db = TempDb::new();
        let id = uuid::Uuid::new_v4();
        let mut p = db.connect();
        let mut w = db.worker();
        p.transaction(|c| {
            let inner = c.transaction(|c| {
                insert(c, &id);
                Err::<(), _>(DieselError::RollbackTransaction)
            });
            assert!(inner.is_err());
            // The row is gone, but the outer transaction still holds the write lock.
            assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::Pending);
            Ok::<_, DieselError>(())
        })
        .unwrap();
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::NotCommitted);
    }

    #[test]
    fn claim_then_delete_consumes_once() {
        let db = TempDb::new();
        let id = uuid::Uuid::new_v4();
        insert(&mut db.connect(), &id);
        let mut w = db.worker();
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::Committed);
        let claim = w
            .worker_transaction(|c| {
                let claim = c.claim_barrier(&id)?;
                assert!(c.claim_holds(&id)?, "the claim stands");
                Ok::<_, DieselError>(claim)
            })
            .unwrap();
        assert_eq!(claim, Claim::Locked);
        let again = w.worker_transaction(|c| c.claim_barrier(&id)).unwrap();
        assert_eq!(again, Claim::Gone);
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::NotCommitted);
        assert_eq!(busy_timeout(&mut w).unwrap(), 0, "busy timeout put back");
    }

    #[test]
    fn a_failed_handler_keeps_the_barrier() {
        let db = TempDb::new();
        let id = uuid::Uuid::new_v4();
        insert(&mut db.connect(), &id);
        let mut w = db.worker();
        let result = w.worker_transaction(|c| {
            assert_eq!(c.claim_barrier(&id)?, Claim::Locked);
            Err::<(), _>(DieselError::RollbackTransaction)
        });
        assert!(result.is_err());
        assert_eq!(w.await_verdict(&id, SHORT).unwrap(), Verdict::Committed);
    }

    #[test]
    fn worker_transaction_waits_for_an_application_writer() {
        let db = TempDb::new();
        let id = uuid::Uuid::new_v4();
        insert(&mut db.connect(), &id);
        let other = uuid::Uuid::new_v4();
        let (end, producer) = open_transaction(&db, other, true);
        let ender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            end.send(()).unwrap();
        });
        let mut w = db.worker();
        let started = Instant::now();
        let claim = w.worker_transaction(|c| c.claim_barrier(&id)).unwrap();
        assert_eq!(claim, Claim::Locked);
        assert!(started.elapsed() >= Duration::from_millis(100));
        ender.join().unwrap();
        producer.join().unwrap();
    }

    #[test]
    fn transaction_info_reports_the_lock() {
        let db = TempDb::new();
        let id = uuid::Uuid::new_v4();
        let (end, producer) = open_transaction(&db, id, true);
        let mut w = db.worker();
        let info = w.transaction_info(&id, None).unwrap().unwrap();
        assert!(info.contains("held"), "{info}");
        assert!(info.contains("wal"), "{info}");
        end.send(()).unwrap();
        producer.join().unwrap();
        let info = w.transaction_info(&id, None).unwrap().unwrap();
        assert!(info.contains("free"), "{info}");
    }

    #[test]
    fn check_pending_decides_a_batch_with_one_lock_attempt() {
        let db = TempDb::new();
        let committed = uuid::Uuid::new_v4();
        let rolled_back = uuid::Uuid::new_v4();
        insert(&mut db.connect(), &committed);
        let mut p = db.connect();
        let _ = p.transaction(|c| {
            insert(c, &rolled_back);
            Err::<(), _>(DieselError::RollbackTransaction)
        });
        let pending = |id| Pending {
            id,
            txid: None,
            probe: false,
        };
        let mut w = db.worker();
        let batch = [pending(committed), pending(rolled_back)];
        assert_eq!(
            w.check_pending(&batch).unwrap().verdicts,
            [Verdict::Committed, Verdict::NotCommitted]
        );

        // While some transaction holds the lock, what is not visible stays pending.
        let open = uuid::Uuid::new_v4();
        let (end, producer) = open_transaction(&db, open, true);
        let batch = [pending(committed), pending(rolled_back), pending(open)];
        let started = Instant::now();
        assert_eq!(
            w.check_pending(&batch).unwrap().verdicts,
            [Verdict::Committed, Verdict::Pending, Verdict::Pending]
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "it did not wait"
        );
        end.send(()).unwrap();
        producer.join().unwrap();
        assert_eq!(
            w.check_pending(&batch).unwrap().verdicts,
            [
                Verdict::Committed,
                Verdict::NotCommitted,
                Verdict::Committed
            ]
        );
        assert_eq!(busy_timeout(&mut w).unwrap(), 0, "busy timeout put back");
    }

    #[test]
    fn check_pending_handles_more_ids_than_one_query_takes() {
        let db = TempDb::new();
        let ids: Vec<uuid::Uuid> = (0..IDS_PER_QUERY * 2 + 7)
            .map(|_| uuid::Uuid::new_v4())
            .collect();
        let mut p = db.connect();
        p.transaction(|c| {
            for id in ids.iter().step_by(2) {
                insert(c, id);
            }
            Ok::<_, DieselError>(())
        })
        .unwrap();
        let batch: Vec<Pending> = ids
            .iter()
            .map(|&id| Pending {
                id,
                txid: None,
                probe: false,
            })
            .collect();
        let verdicts = db.worker().check_pending(&batch).unwrap().verdicts;
        for (i, v) in verdicts.iter().enumerate() {
            let expected = if i % 2 == 0 {
                Verdict::Committed
            } else {
                Verdict::NotCommitted
            };
            assert_eq!(*v, expected, "barrier {i}");
        }
    }

    #[test]
    fn commit_hints_name_committed_rows_once() {
        let db = TempDb::new();
        let before = uuid::Uuid::new_v4();
        insert(&mut db.connect(), &before);
        let mut listener = db.worker();
        listener.listen_for_commits().unwrap();
        assert!(
            listener.take_commit_hints().unwrap().is_empty(),
            "rows from before"
        );

        let mut p = db.connect();
        let _ = p.transaction(|c| {
            insert(c, &uuid::Uuid::new_v4());
            Err::<(), _>(DieselError::RollbackTransaction)
        });
        assert!(
            listener.take_commit_hints().unwrap().is_empty(),
            "rolled back"
        );
        let open = uuid::Uuid::new_v4();
        let (end, producer) = open_transaction(&db, open, true);
        assert!(listener.take_commit_hints().unwrap().is_empty(), "open");
        end.send(()).unwrap();
        producer.join().unwrap();
        let committed = uuid::Uuid::new_v4();
        insert(&mut db.connect(), &committed);
        assert_eq!(listener.take_commit_hints().unwrap(), [open, committed]);
        assert!(listener.take_commit_hints().unwrap().is_empty(), "once");

        // A consumed row's seq is not reused, so the next commit is still seen.
        let mut w = db.worker();
        w.worker_transaction(|c| c.claim_barrier(&committed))
            .unwrap();
        let next = uuid::Uuid::new_v4();
        insert(&mut db.connect(), &next);
        assert_eq!(listener.take_commit_hints().unwrap(), [next]);

        listener.stop_listening().unwrap();
        listener.listen_for_commits().unwrap();
        assert!(
            listener.take_commit_hints().unwrap().is_empty(),
            "a new cursor"
        );
    }

    #[test]
    fn reap_deletes_old_rows_only() {
        let db = TempDb::new();
        let old = uuid::Uuid::new_v4();
        let young = uuid::Uuid::new_v4();
        let mut c = db.connect();
        insert(&mut c, &old);
        insert(&mut c, &young);
        c.batch_execute(&format!(
            "UPDATE dtb_barriers SET created_at = '2000-01-01T00:00:00.000Z' WHERE id = '{old}'"
        ))
        .unwrap();
        let mut w = db.worker();
        let reaped = w.reap(Duration::from_secs(3600)).unwrap();
        assert_eq!(reaped.len(), 1);
        assert_eq!(reaped[0].id, old.hyphenated().to_string());
        assert_eq!(reaped[0].job_id, "jid");
        assert_eq!(w.await_verdict(&young, SHORT).unwrap(), Verdict::Committed);
        assert_eq!(w.await_verdict(&old, SHORT).unwrap(), Verdict::NotCommitted);
    }

    #[test]
    fn unconsumed_rows_are_taken_once_per_grace_and_attempted_ones_never() {
        let db = TempDb::new();
        let (plain, attempted, young) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        let mut c = db.connect();
        for id in [&plain, &attempted] {
            insert(&mut c, id);
        }
        c.batch_execute(
            "UPDATE dtb_barriers SET pushed_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-60 seconds')",
        )
        .unwrap();
        insert(&mut c, &young);
        let mut w = db.worker();
        w.mark_attempted(&attempted).unwrap();
        let take = |w: &mut SqliteConnection| {
            w.worker_transaction(|c| {
                c.take_unconsumed(Duration::from_secs(30), Duration::from_secs(3600), 10)
            })
            .unwrap()
        };
        let taken = take(&mut w);
        assert_eq!(taken.len(), 1, "{taken:?}");
        assert_eq!(taken[0].id, plain.hyphenated().to_string());
        assert_eq!(taken[0].payload.as_deref(), Some("{}"));
        assert!(take(&mut w).is_empty(), "pushed again just now");
        assert_eq!(busy_timeout(&mut w).unwrap(), 0, "busy timeout put back");
    }

    #[test]
    fn busy_is_recognised() {
        let db = TempDb::new();
        let (end, producer) = open_transaction(&db, uuid::Uuid::new_v4(), true);
        let mut w = db.worker();
        let err = w
            .immediate_transaction(|_| Ok::<_, DieselError>(()))
            .unwrap_err();
        assert!(is_busy(&err), "{err}");
        end.send(()).unwrap();
        producer.join().unwrap();
        let other = diesel::sql_query("SELECT * FROM no_such_table")
            .execute(&mut w)
            .unwrap_err();
        assert!(!is_busy(&other), "{other}");
    }
}
