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
//! * **Committed** — the row is visible. Another connection reads committed data only (a WAL
//!   reader sees the last commit; in rollback-journal mode an uncommitted change never reaches
//!   the file while a reader holds its lock). The row's id is random and only this producer
//!   writes it, so seeing it proves that its transaction committed.
//! * **Not committed** — the worker takes the write lock itself (`BEGIN IMMEDIATE`) and the row
//!   is still not there. Holding the lock proves that no write transaction is running, the
//!   producer's included, so it has ended; it ended without the row, so it rolled back (or the
//!   savepoint around the enqueue did, or an earlier delivery consumed the row).
//! * **Pending** — neither happened within the limit given to `await_verdict`.
//!
//! The worker alternates the two looks — read the row, try the lock — with pauses of at most
//! 5 ms, so it notices a commit or a rollback within a few milliseconds, and gives up at the
//! limit. It does its own waiting instead of leaving it to SQLite's busy handler, which sleeps
//! up to 100 ms between attempts and would not look at the row meanwhile. A commit is seen
//! without the lock, so commits are noticed even while other writers keep the lock busy.
//!
//! While it waits, the worker is inside a `debug` span named `dtb_sqlite_wait`, with the fields
//! `barrier_id` and `database` (the database file, filled in only when a subscriber listens to
//! the span).
//!
//! # The worker transaction holds the write lock
//!
//! `worker_transaction` is `BEGIN IMMEDIATE`: it takes the write lock before the claim, and the
//! handler runs inside it. So `claim_barrier` is a plain read that never waits, and it answers
//! `Locked` or `Gone`, never `Busy`: a second worker consuming the same barrier would hold the
//! write lock, so two consumers are serialised by the lock, and the second finds the row gone.
//! What the handler writes commits together with the row's deletion, exactly once, as on the
//! other backends.
//!
//! The price is SQLite's single writer: **while a handler runs, the application's writers
//! wait** for it. Their busy timeout must outlast the longest handler, or their writes fail with
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
//! one back afterwards, so a plain `ConnectionManager<SqliteConnection>` pool works:
//! `await_verdict` polls with a busy timeout of zero (its waiting is its own, bounded by the
//! limit), and `worker_transaction` waits at least 5 seconds for the write lock (longer if the
//! connection already had a longer busy timeout). If an application transaction keeps the lock
//! longer than that, the delivery fails and Faktory retries the job later; the handler has not
//! run.
//!
//! The application's connections need a busy timeout too, as they do whenever an SQLite
//! database has more than one connection: the worker takes the write lock for a moment to
//! check for a rollback, and for the length of each handler.
//!
//! # WAL
//!
//! [`run_migrations`](crate::run_migrations) switches the database to WAL journal mode (`PRAGMA
//! journal_mode = WAL`, which is stored in the database file, so once is enough; it cannot run
//! inside the migration's transaction, so it is not in the migration's SQL). Correctness does
//! not depend on it, but in rollback-journal mode the producer's `COMMIT` has to wait until the
//! worker's polling read lets go of its shared lock, and readers get "database is locked" while
//! a commit is written. In WAL mode readers and the writer do not block each other. The worker
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
//! * One writer at a time; a running handler holds the write lock (see above).
//! * Producer and worker must open the same database file. In-memory databases are private to
//!   their connection, and shared-cache databases lock differently: neither is supported.
//! * A producer connection in `PRAGMA locking_mode = EXCLUSIVE` never lets go of the lock: its
//!   rolled-back jobs wait until the deadline (its committed ones are still seen at once).
//! * A rolled-back savepoint removes the row, but the outer transaction keeps the write lock: the
//!   worker learns "not committed" when the outer transaction ends (PostgreSQL knows at the
//!   savepoint's rollback).
//! * Telling a rollback from a running transaction needs the write lock. In a database whose
//!   writers never pause, the worker may not win it (SQLite's locks are not fair) within
//!   `block_limit`, and snoozes the job.
//! * There is no transaction id: descriptors carry none, and a timeout report says only whether
//!   the write lock is held and the journal mode.
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
//! numbers this module computes. Every other value is bound.

use super::sealed::Backend;
use super::{Claim, NewBarrier, ReapedBarrier, Verdict};
use crate::error::Error;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::Error as DieselError;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::time::{Duration, Instant};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// The least time `worker_transaction` (and `run_migrations`) wait for the write lock.
const WRITE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The longest pause between two looks in `await_verdict`: how late, at most, the worker
/// notices that the producer's transaction ended.
const MAX_POLL_PAUSE: Duration = Duration::from_millis(5);

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
struct ReapedRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    job_id: String,
    #[diesel(sql_type = Text)]
    job_kind: String,
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

    fn insert_barrier(&mut self, row: &NewBarrier<'_>) -> QueryResult<Option<String>> {
        // This insert takes the write lock (if an earlier write of the transaction has not), and
        // the transaction keeps it until it ends: `await_verdict` relies on that.
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
        Ok(None)
    }

    fn await_verdict(&mut self, id: &uuid::Uuid, limit: Duration) -> QueryResult<Verdict> {
        let id = id.hyphenated().to_string();
        // Busy timeout zero: a look never blocks, the loop does the (bounded) waiting.
        with_busy_timeout(self, |_| 0, |c| poll_verdict(c, &id, limit))
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

    fn claim_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<Claim> {
        // Inside `worker_transaction` this connection holds the database's write lock, so no one
        // else can be consuming the row: a read decides, and never waits. `Busy` cannot happen;
        // a concurrent duplicate waited in BEGIN IMMEDIATE and now finds the row gone.
        let present = barrier_visible(self, &id.hyphenated().to_string())?;
        Ok(if present { Claim::Locked } else { Claim::Gone })
    }

    fn delete_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        diesel::sql_query("DELETE FROM dtb_barriers WHERE id = ?")
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(self)?;
        Ok(())
    }

    fn reap(&mut self, older_than: Duration) -> QueryResult<Vec<ReapedBarrier>> {
        // The cutoff is computed once, so that the rows listed are exactly the rows deleted.
        // `created_at` is ISO 8601 text in UTC, which orders as it sorts.
        let modifier = format!("-{:.3} seconds", older_than.as_secs_f64());
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
                    Ok(rows
                        .into_iter()
                        .map(|r| ReapedBarrier {
                            id: r.id,
                            job_id: r.job_id,
                            job_kind: r.job_kind,
                        })
                        .collect())
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

/// The loop of `await_verdict`; the connection's busy timeout is zero.
fn poll_verdict(conn: &mut SqliteConnection, id: &str, limit: Duration) -> QueryResult<Verdict> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut waiting: Option<tracing::span::EnteredSpan> = None;
    loop {
        // Committed? A read sees committed rows only, and only the producer writes this one.
        match barrier_visible(conn, id) {
            Ok(true) => return Ok(Verdict::Committed),
            Ok(false) => {}
            // In rollback-journal mode a read is refused while a commit is being written.
            Err(e) if is_busy(&e) => {}
            Err(e) => return Err(e),
        }
        // Ended? The producer's transaction took the write lock with its barrier insert, before
        // the job was pushed. If we get the lock now, that transaction is over, and what we read
        // while holding the lock is its final outcome.
        match conn.immediate_transaction(|c| barrier_visible(c, id)) {
            Ok(true) => return Ok(Verdict::Committed),
            Ok(false) => return Ok(Verdict::NotCommitted),
            Err(e) if is_busy(&e) => {}
            Err(e) => return Err(e),
        }
        if waiting.is_none() {
            waiting = Some(wait_span(conn, id).entered());
        }
        let elapsed = started.elapsed();
        if elapsed >= limit {
            return Ok(Verdict::Pending);
        }
        std::thread::sleep(pause.min(limit - elapsed));
        pause = (pause * 2).min(MAX_POLL_PAUSE);
    }
}

/// The span the worker waits in, with the database file when someone listens.
fn wait_span(conn: &mut SqliteConnection, id: &str) -> tracing::Span {
    let span = tracing::debug_span!(
        "dtb_sqlite_wait",
        barrier_id = id,
        database = tracing::field::Empty
    );
    if !span.is_disabled() {
        let file: QueryResult<TextRow> =
            diesel::sql_query("SELECT file AS value FROM pragma_database_list WHERE name = 'main'")
                .get_result(conn);
        if let Ok(file) = file {
            span.record("database", file.value.as_str());
        }
    }
    span
}

fn barrier_visible(conn: &mut SqliteConnection, id: &str) -> QueryResult<bool> {
    let row: IntRow = diesel::sql_query("SELECT COUNT(*) AS value FROM dtb_barriers WHERE id = ?")
        .bind::<Text, _>(id)
        .get_result(conn)?;
    Ok(row.value > 0)
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

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
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
                c.delete_barrier(&id)?;
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
            c.delete_barrier(&id)?;
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
