//! MySQL and MariaDB: barriers on `MysqlConnection` (cargo feature `mysql`).
//!
//! # How it works
//!
//! * **Producer.** `enqueue_with_barrier` inserts the barrier row in the application's
//!   transaction, with the producer's `CONNECTION_ID()` in `txid`, and puts that id in the job's
//!   descriptor. The id is for diagnostics only (it names the session whose transaction a
//!   worker is waiting for); nothing is decided on it. The producer needs no privilege beyond
//!   `INSERT` on `dtb_barriers`, and never reads `information_schema`.
//! * **Waiting.** MySQL has nothing like PostgreSQL's `LISTEN`, so the worker's waiter checks
//!   every pending barrier in one batch, at once when a job starts waiting and then every
//!   2 ms while any job waits. A check never waits for a lock, and decides every barrier:
//!   1. A plain read outside any transaction (so with a fresh snapshot, whatever the
//!      session's isolation level): which rows have a committed version.
//!   2. Only if step 1 found some: a READ COMMITTED transaction takes those rows with
//!      `SELECT ... FOR UPDATE SKIP LOCKED` (skipping any that a worker running the handler of
//!      another delivery holds), fences them (below), and commits. They are *committed*.
//!   3. For the others, a READ UNCOMMITTED read: which rows exist at all. A running
//!      producer's insert is there (*pending*); a rolled-back insert (or a rolled-back
//!      savepoint around the enqueue) is not.
//!   4. Only for rows step 3 did not find: a second plain read. No committed version now
//!      either means *not committed*; one means *pending* (a handler's delete not yet
//!      committed hides a row from step 3 but not from step 4).
//!
//!   A row with no version at all, and afterwards no committed version, is gone for good, so a
//!   rollback is seen as soon as a commit would be. Every verdict rests on the rows themselves,
//!   never on `information_schema.innodb_trx`, which is a cache that can be arbitrarily stale.
//! * **Durability.** InnoDB releases the producer's row lock *before* its commit is flushed to
//!   the redo log, so seeing the row does not yet prove that the commit would survive a crash.
//!   Before answering "committed" the worker therefore commits a write of its own to the same
//!   row (`attempts = attempts + 1`); see [`fence`] for why that is a proof.
//! * **Running.** The handler runs in another READ COMMITTED transaction that claims the row
//!   with `FOR UPDATE SKIP LOCKED` (never waiting for a concurrent duplicate) and deletes it at
//!   once. After the handler, the worker checks that the server still holds that transaction:
//!   the row must be invisible to the worker's session (its own delete) and MariaDB's
//!   `@@in_transaction` must be 1. A deadlock or a lock wait timeout with
//!   `innodb_rollback_on_timeout` rolls the whole transaction back (the row is visible again),
//!   and DDL or `LOCK TABLES` in a handler commit it (no transaction is open any more): either
//!   way the delivery fails instead of being reported as run.
//! * **Transactions Diesel does not count.** Before the barrier insert the producer asks
//!   `@@in_transaction` and `@@autocommit`: a transaction opened by `SET autocommit = 0` (or a
//!   `BEGIN` sent as SQL) is a transaction; one the server ended behind Diesel's back (a
//!   deadlock victim, an implicit commit) is refused with `Error::TransactionEnded`. MySQL 8
//!   lacks `@@in_transaction`; there the producer writes the barrier whenever it cannot rule a
//!   transaction out, and the ended-transaction checks rest on the row alone.
//! * **Blocking form.** The backend can also wait for one barrier with a locking read that
//!   InnoDB blocks until the producer's transaction ends, bounded by `innodb_lock_wait_timeout`
//!   (whole seconds, so a bound is rounded up, to at least one second); the timeout, error
//!   1205, is recognised by its number through `GET DIAGNOSTICS`, not by its text. The worker's
//!   waiter does not use it, because it would hold a connection per waiting job.
//!
//! Each worker transaction sets its isolation level (`SET TRANSACTION ISOLATION LEVEL ...`
//! right before `BEGIN`), whatever the server's or the session's default: under REPEATABLE
//! READ a plain read in an older snapshot would not see a committed barrier. All values reach
//! the server as bind parameters.
//!
//! # Cost of waiting
//!
//! While jobs wait, the waiter checks every 2 ms on one connection; nothing runs while no job
//! waits. While nothing changes a check is two short reads (a count each): about 0.4 ms for one
//! waiting job and 2 ms for two hundred on a small machine (MariaDB 10.11, loopback,
//! unoptimised build). The interval bounds the time from a producer's commit to its
//! handler's start; on that machine `examples/latency.rs` (optimised build, 3 runs of
//! 300 jobs, commits at random points of the polling cycle) measured a median of about 2 ms
//! and a 99th percentile of 3–10 ms, depending on what else the machine was doing.
//!
//! # Maintenance
//!
//! The worker's reaper deletes old rows and its reconciler pushes again the jobs of committed
//! rows nobody consumed (`pushed_at`, `attempted_at`); both take rows with
//! `FOR UPDATE SKIP LOCKED`, so neither ever waits for a running producer, and the reaper
//! deletes row by row on the primary key (a `DELETE ... IN (...)` planned as a scan would wait
//! for rows other transactions hold, even under READ COMMITTED).
//!
//! # Privileges
//!
//! * Producer: `INSERT` on `dtb_barriers` (besides whatever the application needs).
//! * Worker: `SELECT`, `UPDATE` and `DELETE` on `dtb_barriers` (besides whatever the handlers
//!   need).
//! * [`run_migrations`](crate::run_migrations): `CREATE`, `DROP` and `INDEX` on the database,
//!   and access to Diesel's `__diesel_schema_migrations` table.
//! * Optional, worker only: `PROCESS` (a global privilege). Without it everything works the
//!   same, but a barrier timeout cannot describe the producer's transaction, whose details
//!   live in `information_schema.innodb_trx`; the worker says so once, as a warning, when it
//!   connects (`GRANT PROCESS ON *.* TO 'user'@'host'` adds it). The process list still shows
//!   producers that run as the worker's own account.
//!
//! # Server settings
//!
//! The durability proof needs `innodb_flush_log_at_trx_commit = 1` (the default), and, when
//! the binary log is on, `sync_binlog = 1`; the worker warns when it connects if either is
//! not so, and also if its connections run with `autocommit` off (Diesel expects it on; the
//! waiter's plain read relies on it). Barrier tables must be InnoDB (the migration says so).
//!
//! # What is tested
//!
//! The test suite runs against MariaDB 10.11. MySQL 8.0 is expected to work, because only
//! statements that both servers accept are used (`FOR UPDATE`, `FOR UPDATE SKIP LOCKED`,
//! `SET TRANSACTION ISOLATION LEVEL`, `SET SESSION innodb_lock_wait_timeout`,
//! `GET DIAGNOSTICS`, `CONNECTION_ID()`, `NOW(6) - INTERVAL ? MICROSECOND`, `LIMIT ?`), but it
//! is not tested: the query plans (and so the lock behaviour of the maintenance statements)
//! and the error numbers are the parts most likely to differ. MariaDB before 10.6 lacks
//! `SKIP LOCKED` and is not supported.

use super::rows::{ReapedRow, UnconsumedRow};
use super::sealed::Backend;
use super::{
    Checked, Claim, Inserted, NewBarrier, Pending, ReapedBarrier, ServerTransaction, Unconsumed,
    Verdict,
};
use crate::error::Error;
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamp, Unsigned};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/mysql");

/// MySQL's error number for "Lock wait timeout exceeded".
const ER_LOCK_WAIT_TIMEOUT: i32 = 1205;
/// MySQL's error number for "Access denied; you need (at least one of) the PROCESS
/// privilege(s) for this operation".
const ER_SPECIFIC_ACCESS_DENIED: i32 = 1227;
/// MySQL's error number for "Unknown system variable".
const ER_UNKNOWN_SYSTEM_VARIABLE: i32 = 1193;
/// MySQL 8's error number for a locking read with `NOWAIT` that met a lock (MariaDB answers
/// [`ER_LOCK_WAIT_TIMEOUT`]).
const ER_LOCK_NOWAIT: i32 = 3572;

/// Whether the server has MariaDB's `@@in_transaction` (MySQL lacks it): not asked yet, yes,
/// no. Learnt from the first answer; a process that talks to both kinds of server only loses
/// the check on MariaDB, never gains a wrong one (a failed read teaches "no" again).
static IN_TRANSACTION_VARIABLE: AtomicU8 = AtomicU8::new(VARIABLE_UNKNOWN);
const VARIABLE_UNKNOWN: u8 = 0;
const VARIABLE_PRESENT: u8 = 1;
const VARIABLE_ABSENT: u8 = 2;

/// How often, in milliseconds, the waiter checks pending barriers.
const CHECK_INTERVAL_MS: u64 = 2;
/// The most ids in one `IN (...)` list.
const IN_LIST_MAX: usize = 1000;

/// The longest wait `innodb_lock_wait_timeout` accepts, in seconds.
const MAX_WAIT_SECS: u64 = 1_073_741_824;

/// The longest age handed to the server, in microseconds (a hundred years: beyond it MySQL's
/// date arithmetic would overflow).
const MAX_AGE_MICROS: u128 = 100 * 366 * 24 * 3600 * 1_000_000;

/// `d` in microseconds, for `NOW(6) - INTERVAL ? MICROSECOND`.
fn micros(d: Duration) -> i64 {
    d.as_micros().min(MAX_AGE_MICROS) as i64
}

#[allow(unreachable_pub, missing_docs)]
mod schema {
    diesel::table! {
        dtb_barriers (id) {
            id -> Text,
            txid -> Nullable<BigInt>,
            job_id -> Text,
            job_kind -> Text,
            job_queue -> Text,
            payload -> Nullable<Text>,
            pushed_at -> Timestamp,
            attempts -> Integer,
        }
    }
}

use schema::dtb_barriers;

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

#[derive(QueryableByName)]
struct TransactionRow {
    /// `@@in_transaction`, or `None` where the server has no such variable.
    #[diesel(sql_type = Nullable<BigInt>)]
    in_transaction: Option<i64>,
    #[diesel(sql_type = BigInt)]
    autocommit: i64,
}

#[derive(QueryableByName)]
struct ClaimCheckRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    in_transaction: Option<i64>,
    #[diesel(sql_type = BigInt)]
    remaining: i64,
}

#[derive(QueryableByName)]
struct SessionRow {
    #[diesel(sql_type = Unsigned<BigInt>)]
    connection_id: u64,
    #[diesel(sql_type = Nullable<Text>)]
    database: Option<String>,
}

/// Runs `query`, which reads `@@in_transaction` as the column `in_transaction`, or, on a
/// server without the variable, the same query with NULL in its place.
fn with_in_transaction<T: QueryableByName<diesel::mysql::Mysql> + 'static>(
    conn: &mut MysqlConnection,
    query: &str,
    bind: Option<&str>,
) -> QueryResult<T> {
    const VARIABLE: &str = "CAST(@@in_transaction AS SIGNED)";
    let run = |conn: &mut MysqlConnection, sql: &str| {
        let q = diesel::sql_query(sql).into_boxed();
        match bind {
            Some(b) => q.bind::<Text, _>(b.to_string()).get_result::<T>(conn),
            None => q.get_result::<T>(conn),
        }
    };
    if IN_TRANSACTION_VARIABLE.load(Ordering::Relaxed) != VARIABLE_ABSENT {
        match run(conn, &query.replace("$in_transaction", VARIABLE)) {
            Ok(row) => {
                IN_TRANSACTION_VARIABLE.store(VARIABLE_PRESENT, Ordering::Relaxed);
                return Ok(row);
            }
            Err(e) => {
                if last_errno(conn)? != Some(ER_UNKNOWN_SYSTEM_VARIABLE) {
                    return Err(e);
                }
                IN_TRANSACTION_VARIABLE.store(VARIABLE_ABSENT, Ordering::Relaxed);
            }
        }
    }
    run(
        conn,
        &query.replace("$in_transaction", "CAST(NULL AS SIGNED)"),
    )
}

#[derive(QueryableByName)]
struct SettingsRow {
    #[diesel(sql_type = Nullable<Text>)]
    flush_log_at_trx_commit: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    log_bin: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    sync_binlog: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    autocommit: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    account: Option<String>,
}

#[derive(QueryableByName)]
struct TrxRow {
    #[diesel(sql_type = Nullable<Text>)]
    trx_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    trx_state: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    trx_started: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    trx_rows_modified: Option<String>,
}

#[derive(QueryableByName)]
struct ProcessRow {
    #[diesel(sql_type = Nullable<Text>)]
    user: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    host: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    command: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    time: Option<String>,
}

/// Why the wait in [`Backend::await_verdict`] did not produce a row.
enum WaitError {
    /// The lock wait timed out: the producer's transaction is still running.
    TimedOut,
    Database(diesel::result::Error),
}

impl From<diesel::result::Error> for WaitError {
    fn from(e: diesel::result::Error) -> Self {
        WaitError::Database(e)
    }
}

/// How a worker transaction begins. `SET TRANSACTION ISOLATION LEVEL` (without `SESSION`)
/// applies to the next transaction only, so it comes right before `BEGIN`, in the same round
/// trip; the session's own default (REPEATABLE READ unless configured otherwise) is untouched.
const BEGIN_READ_COMMITTED: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; BEGIN";
/// See [`BEGIN_READ_COMMITTED`].
const BEGIN_READ_UNCOMMITTED: &str = "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED; BEGIN";

/// Runs `f` in a transaction begun with `begin`, which commits when `f` returns `Ok` and rolls
/// back otherwise.
fn in_transaction<R, E, F>(conn: &mut MysqlConnection, begin: &str, f: F) -> Result<R, E>
where
    F: FnOnce(&mut MysqlConnection) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    AnsiTransactionManager::begin_transaction_sql(conn, begin)?;
    match f(conn) {
        Ok(value) => {
            <AnsiTransactionManager as TransactionManager<MysqlConnection>>::commit_transaction(
                conn,
            )?;
            Ok(value)
        }
        Err(error) => {
            match <AnsiTransactionManager as TransactionManager<MysqlConnection>>::rollback_transaction(conn) {
                Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(error),
                Err(rollback_error) => Err(rollback_error.into()),
            }
        }
    }
}

/// Runs `f` in a READ COMMITTED transaction, whatever the session's default isolation level.
fn read_committed<R, E, F>(conn: &mut MysqlConnection, f: F) -> Result<R, E>
where
    F: FnOnce(&mut MysqlConnection) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    in_transaction(conn, BEGIN_READ_COMMITTED, f)
}

/// The error number of the statement that just failed on `conn`, read with
/// `GET DIAGNOSTICS` (which needs no privilege). Must be the next statement after the failed
/// one: any other statement clears the diagnostics area.
fn last_errno(conn: &mut MysqlConnection) -> QueryResult<Option<i32>> {
    conn.batch_execute("GET DIAGNOSTICS CONDITION 1 @dtb_errno = MYSQL_ERRNO")?;
    let errno =
        diesel::select(sql::<Nullable<Integer>>("CAST(@dtb_errno AS SIGNED)")).get_result(conn)?;
    // Never let a later call read this value (GET DIAGNOSTICS leaves the variable unchanged,
    // with only a warning, when there is no condition to read).
    conn.batch_execute("SET @dtb_errno = NULL")?;
    Ok(errno)
}

/// `limit` as a lock wait timeout: whole seconds, rounded up, at least one.
fn wait_secs(limit: Duration) -> u64 {
    let secs = limit
        .as_secs()
        .saturating_add(u64::from(limit.subsec_nanos() > 0));
    secs.clamp(1, MAX_WAIT_SECS)
}

/// The durability fence: a write of the worker's own to the barrier rows `keys`, which the
/// caller holds locked and whose transactions it has seen committed, committed by the caller's
/// transaction before any verdict of "committed" leaves this module.
///
/// Why it proves that the producer's commit is durable:
///
/// 1. The producer's commit writes its commit record to the redo log buffer, at some log
///    sequence number L, *before* InnoDB releases the producer's row locks; only then is the
///    log flushed up to L (with `innodb_flush_log_at_trx_commit = 1`). In the gap between the
///    two a locking read already sees the row, and a crash would erase the commit.
/// 2. The worker holds the row through a locking read, so the producer's locks were released,
///    so L had been assigned. This update changes the row (`attempts + 1` always differs from
///    `attempts`; an update that changes nothing writes no redo and would prove nothing), so
///    its redo, and the worker's commit record, come after L in the log.
/// 3. The redo log is written and flushed in order, and with
///    `innodb_flush_log_at_trx_commit = 1` the worker's `COMMIT` returns only once the log is
///    flushed past its own commit record — hence past L. When the worker's commit returns,
///    the producer's commit is on disk. (With the binary log on, commits are also ordered
///    through it, and `sync_binlog = 1` gives the same prefix argument for the binary log.)
///
/// The fence costs one row write and one log flush per delivery, and it counts the
/// deliveries that found the transaction committed.
///
/// Under READ COMMITTED an `UPDATE ... WHERE id IN (...)` never waits for rows outside `keys`,
/// even when it is planned as a scan: InnoDB checks a row that another transaction holds
/// against the last committed version ("semi-consistent read") and passes over it.
fn fence(conn: &mut MysqlConnection, keys: &[String]) -> QueryResult<usize> {
    let mut updated = 0;
    for chunk in keys.chunks(IN_LIST_MAX) {
        updated += diesel::update(dtb_barriers::table.filter(dtb_barriers::id.eq_any(chunk)))
            .set(dtb_barriers::attempts.eq(dtb_barriers::attempts + 1))
            .execute(conn)?;
    }
    Ok(updated)
}

/// Which of the barrier rows `keys` (distinct ids) this connection's next read sees (a plain,
/// non-locking read), in chunks of at most [`IN_LIST_MAX`] ids. A chunk is counted first, and
/// its ids are read only when some but not all of them are there: while jobs wait, the usual
/// answers are "all" (they exist) and "none" (none committed), one small row each.
fn existing(conn: &mut MysqlConnection, keys: &[&String]) -> QueryResult<HashSet<String>> {
    let mut found = HashSet::new();
    for chunk in keys.chunks(IN_LIST_MAX) {
        let count: i64 = dtb_barriers::table
            .filter(dtb_barriers::id.eq_any(chunk))
            .count()
            .get_result(conn)?;
        if count == 0 {
            continue;
        }
        if count == chunk.len() as i64 {
            found.extend(chunk.iter().map(|k| (*k).clone()));
            continue;
        }
        let rows: Vec<String> = dtb_barriers::table
            .filter(dtb_barriers::id.eq_any(chunk))
            .select(dtb_barriers::id)
            .load(conn)?;
        found.extend(rows);
    }
    Ok(found)
}

/// `'user'@'host'` from `CURRENT_USER()`'s `user@host`.
fn quoted_account(current_user: &str) -> String {
    let (user, host) = current_user.rsplit_once('@').unwrap_or((current_user, "%"));
    format!(
        "'{}'@'{}'",
        user.replace('\'', "''"),
        host.replace('\'', "''")
    )
}

fn setting_warnings(settings: &SettingsRow) -> Vec<String> {
    let mut warnings = Vec::new();
    let flush = settings.flush_log_at_trx_commit.as_deref().unwrap_or("?");
    if flush != "1" {
        warnings.push(format!(
            "innodb_flush_log_at_trx_commit is {flush}, not 1: a commit is not flushed to disk \
             when it returns, so a handler may run for a transaction that a server crash then \
             erases; set innodb_flush_log_at_trx_commit = 1"
        ));
    }
    let log_bin = settings.log_bin.as_deref().unwrap_or("0");
    let sync_binlog = settings.sync_binlog.as_deref().unwrap_or("?");
    if matches!(log_bin, "1" | "ON") && sync_binlog != "1" {
        warnings.push(format!(
            "the binary log is on and sync_binlog is {sync_binlog}, not 1: after an operating \
             system crash a committed transaction whose handler already ran may be lost; set \
             sync_binlog = 1"
        ));
    }
    if settings.autocommit.as_deref() == Some("0") {
        warnings.push(
            "autocommit is off on the worker's connections: the worker's checks read outside \
             transactions and fail, or see stale data, without it; leave autocommit on"
                .to_string(),
        );
    }
    warnings
}

impl Backend for MysqlConnection {
    const NAME: &'static str = "mysql";

    fn run_migrations(&mut self) -> Result<(), Error> {
        MigrationHarness::run_pending_migrations(self, MIGRATIONS)
            .map(|_| ())
            .map_err(Error::Migration)
    }

    fn barrier_schema_present(&mut self) -> QueryResult<bool> {
        // The `attempts` column is what this backend needs beyond a bare table.
        let row: CountRow = diesel::sql_query(
            "SELECT COUNT(*) AS value FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
        )
        .bind::<Text, _>(crate::BARRIER_TABLE)
        .bind::<Text, _>("attempts")
        .get_result(self)?;
        Ok(row.value > 0)
    }

    fn server_transaction(&mut self, diesel_depth: u32) -> QueryResult<ServerTransaction> {
        // Diesel counts only what it opened, and nothing the server does behind its back: a
        // deadlock victim (1213) or a lock wait timeout with `innodb_rollback_on_timeout` rolls
        // the whole transaction back, and DDL, `LOCK TABLES` or `SET autocommit = 1` commit it;
        // `SET autocommit = 0` opens one Diesel does not see. MariaDB says which is true.
        let row: TransactionRow = with_in_transaction(
            self,
            "SELECT $in_transaction AS in_transaction, \
                    CAST(@@autocommit AS SIGNED) AS autocommit",
            None,
        )?;
        Ok(match (row.in_transaction, diesel_depth) {
            (Some(1), _) => ServerTransaction::Open,
            // With autocommit off, the barrier insert itself opens the transaction, which lasts
            // until the application commits or rolls back.
            (_, 0) if row.autocommit == 0 => ServerTransaction::Open,
            (Some(_), _) => ServerTransaction::Closed,
            // MySQL: no way to ask.
            (None, _) => ServerTransaction::Unknown,
        })
    }

    fn insert_barrier(&mut self, row: &NewBarrier<'_>) -> QueryResult<Inserted> {
        diesel::insert_into(dtb_barriers::table)
            .values((
                dtb_barriers::id.eq(row.id.hyphenated().to_string()),
                dtb_barriers::txid.eq(sql::<Nullable<BigInt>>("CONNECTION_ID()")),
                dtb_barriers::job_id.eq(row.job_id),
                dtb_barriers::job_kind.eq(row.job_kind),
                dtb_barriers::job_queue.eq(row.job_queue),
                dtb_barriers::payload.eq(row.payload),
            ))
            .execute(self)?;
        let session: SessionRow =
            diesel::sql_query("SELECT CONNECTION_ID() AS connection_id, DATABASE() AS `database`")
                .get_result(self)?;
        Ok(Inserted {
            txid: Some(session.connection_id.to_string()),
            location: session.database,
        })
    }

    fn barrier_location(&mut self) -> QueryResult<Option<String>> {
        diesel::select(sql::<Nullable<Text>>("DATABASE()")).get_result(self)
    }

    fn await_verdict(&mut self, id: &uuid::Uuid, limit: Duration) -> QueryResult<Verdict> {
        let key = id.hyphenated().to_string();
        // Bound the lock wait for this session, keeping its previous bound to restore below.
        // (MariaDB's `SET STATEMENT ... FOR` would scope it to one statement, but MySQL lacks it.)
        diesel::sql_query(
            "SET @dtb_saved_lock_wait_timeout = @@SESSION.innodb_lock_wait_timeout, \
                 SESSION innodb_lock_wait_timeout = ?",
        )
        .bind::<Unsigned<BigInt>, _>(wait_secs(limit))
        .execute(self)?;

        let outcome = read_committed(self, |c| -> Result<Verdict, WaitError> {
            // A locking read waits for the producer's transaction, which holds the row's lock
            // until it ends. Plain reads would not wait, and could miss an uncommitted row.
            let found = dtb_barriers::table
                .find(&key)
                .select(dtb_barriers::id)
                .for_update()
                .get_result::<String>(c)
                .optional();
            let found = match found {
                Ok(found) => found,
                Err(e) => {
                    return Err(match last_errno(c) {
                        Ok(Some(ER_LOCK_WAIT_TIMEOUT)) => WaitError::TimedOut,
                        _ => WaitError::Database(e),
                    })
                }
            };
            if found.is_none() {
                return Ok(Verdict::NotCommitted);
            }
            fence(c, std::slice::from_ref(&key))?;
            // The commit of this transaction (in `read_committed`) completes the fence.
            Ok(Verdict::Committed)
        });

        let restored = self
            .batch_execute("SET SESSION innodb_lock_wait_timeout = @dtb_saved_lock_wait_timeout");
        let verdict = match outcome {
            Ok(verdict) => verdict,
            Err(WaitError::TimedOut) => Verdict::Pending,
            Err(WaitError::Database(e)) => return Err(e),
        };
        restored?;
        Ok(verdict)
    }

    // No commit hints (MySQL has nothing like LISTEN/NOTIFY): the waiter polls with
    // `check_pending`, which is two short reads when nothing has changed. The interval bounds
    // the time from a producer's commit (or rollback) to the waiter's verdict.
    const CHECK_INTERVAL: Duration = Duration::from_millis(CHECK_INTERVAL_MS);

    fn check_pending(&mut self, pending: &[Pending]) -> QueryResult<Checked> {
        if pending.is_empty() {
            return Ok(Checked::default());
        }
        let keys: Vec<String> = pending
            .iter()
            .map(|p| p.id.hyphenated().to_string())
            .collect();
        let all: Vec<&String> = keys.iter().collect();
        // Every check decides every barrier (the `probe` hint is not needed): a rollback is
        // seen as soon as a commit would be.
        //
        // 1. Which rows have a committed version: one plain read outside any transaction, so
        //    with a snapshot taken when it starts, whatever the session's isolation level.
        let visible = existing(self, &all)?;
        // 2. Take the committed rows that nobody holds (a worker running the handler of
        //    another delivery may hold one; the locking read skips it without waiting) and
        //    fence them: the commit makes "committed" durable.
        let taken: HashSet<String> = if visible.is_empty() {
            HashSet::new()
        } else {
            read_committed(self, |c| {
                let mut taken = Vec::new();
                for chunk in visible.iter().collect::<Vec<_>>().chunks(IN_LIST_MAX) {
                    let rows: Vec<String> = dtb_barriers::table
                        .filter(dtb_barriers::id.eq_any(chunk))
                        .select(dtb_barriers::id)
                        .for_update()
                        .skip_locked()
                        .load(c)?;
                    taken.extend(rows);
                }
                if !taken.is_empty() {
                    fence(c, &taken)?;
                }
                Ok::<_, diesel::result::Error>(taken)
            })?
            .into_iter()
            .collect()
        };
        // 3. For the others: which rows exist at all, committed or not. READ UNCOMMITTED sees
        //    a running producer's insert; a rolled-back insert (or savepoint) and a committed
        //    delete leave nothing; so does a delete not yet committed, which step 4 makes up
        //    for.
        let rest: Vec<&String> = keys.iter().filter(|k| !taken.contains(*k)).collect();
        let exist: HashSet<String> = if rest.is_empty() {
            HashSet::new()
        } else {
            in_transaction(self, BEGIN_READ_UNCOMMITTED, |c| existing(c, &rest))?
        };
        // 4. For the rows step 3 did not find: is there a committed version now, after step 3?
        let absent: Vec<&String> = rest.into_iter().filter(|k| !exist.contains(*k)).collect();
        let still_visible: HashSet<String> = if absent.is_empty() {
            HashSet::new()
        } else {
            existing(self, &absent)?
        };
        // Committed: taken, fenced and (with the commit above) durable. Not committed: no
        // version at all in step 3 and no committed one in the later step 4 — a row without
        // any version cannot come back, except by the undoing of a delete, which step 4 would
        // have seen. Anything else is still running, or held by another delivery's handler.
        Ok(keys
            .iter()
            .map(|k| {
                if taken.contains(k) {
                    Verdict::Committed
                } else if exist.contains(k) || still_visible.contains(k) {
                    Verdict::Pending
                } else {
                    Verdict::NotCommitted
                }
            })
            .collect::<Vec<_>>()
            .into())
    }

    fn mark_attempted(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        read_committed(self, |c| {
            diesel::sql_query("UPDATE dtb_barriers SET attempted_at = NOW(6) WHERE id = ?")
                .bind::<Text, _>(id.hyphenated().to_string())
                .execute(c)
        })?;
        Ok(())
    }

    fn take_unconsumed(
        &mut self,
        grace: Duration,
        max_age: Duration,
        limit: i64,
    ) -> QueryResult<Vec<Unconsumed>> {
        // Inside the worker's READ COMMITTED transaction. SKIP LOCKED passes over rows that a
        // producer has not committed yet and rows a worker is consuming (or fencing) right now.
        // MySQL has neither UPDATE ... RETURNING nor an UPDATE that selects from its own
        // table, hence a locking read, then the update of what it locked.
        let rows: Vec<UnconsumedRow> = diesel::sql_query(
            "SELECT id, txid, payload FROM dtb_barriers \
             WHERE attempted_at IS NULL \
               AND pushed_at < NOW(6) - INTERVAL ? MICROSECOND \
               AND created_at > NOW(6) - INTERVAL ? MICROSECOND \
             ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED",
        )
        .bind::<BigInt, _>(micros(grace))
        .bind::<BigInt, _>(micros(max_age))
        .bind::<BigInt, _>(limit.clamp(0, IN_LIST_MAX as i64))
        .load(self)?;
        if !rows.is_empty() {
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            diesel::update(dtb_barriers::table.filter(dtb_barriers::id.eq_any(ids)))
                .set(dtb_barriers::pushed_at.eq(sql::<Timestamp>("NOW(6)")))
                .execute(self)?;
        }
        Ok(rows.into_iter().map(Into::into).collect())
    }

    fn reap(&mut self, older_than: Duration) -> QueryResult<Vec<ReapedBarrier>> {
        let older_than = micros(older_than);
        let mut reaped = Vec::new();
        // In batches, each in a short transaction of its own.
        loop {
            let batch: Vec<ReapedRow> = read_committed(self, |c| {
                // Rows of transactions still running are locked by their producers: skipped.
                let rows: Vec<ReapedRow> = diesel::sql_query(
                    "SELECT id, job_id, job_kind FROM dtb_barriers \
                     WHERE created_at < NOW(6) - INTERVAL ? MICROSECOND \
                     ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED",
                )
                .bind::<BigInt, _>(older_than)
                .bind::<BigInt, _>(IN_LIST_MAX as i64)
                .load(c)?;
                // One primary-key delete per row: a DELETE ... WHERE id IN (...) may be planned
                // as a scan, and a scanning DELETE waits for rows that other transactions hold,
                // even under READ COMMITTED (an UPDATE would pass over them).
                for r in &rows {
                    diesel::delete(dtb_barriers::table.find(&r.id)).execute(c)?;
                }
                Ok::<_, diesel::result::Error>(rows)
            })?;
            let done = batch.len() < IN_LIST_MAX;
            reaped.extend(batch.into_iter().map(Into::into));
            if done {
                return Ok(reaped);
            }
        }
    }

    fn worker_transaction<R, E, F>(&mut self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self) -> Result<R, E>,
        E: From<diesel::result::Error>,
    {
        read_committed(self, f)
    }

    fn claim_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<Claim> {
        let key = id.hyphenated().to_string();
        // SKIP LOCKED never waits and never errors: a row held by a concurrent duplicate (or,
        // were the waiter ever wrong, by its running producer) simply does not come back.
        let locked = dtb_barriers::table
            .find(&key)
            .select(dtb_barriers::id)
            .for_update()
            .skip_locked()
            .get_result::<String>(self)
            .optional()?;
        if locked.is_none() {
            // Held, or gone? A second locking read that refuses to wait tells them apart: one
            // that meets a lock fails at once, and only an absent row comes back empty. A row
            // let go of in between is simply taken.
            let again = dtb_barriers::table
                .find(&key)
                .select(dtb_barriers::id)
                .for_update()
                .no_wait()
                .get_result::<String>(self)
                .optional();
            match again {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(Claim::Gone),
                Err(e) => {
                    return match last_errno(self)? {
                        Some(ER_LOCK_WAIT_TIMEOUT | ER_LOCK_NOWAIT) => Ok(Claim::Busy),
                        _ => Err(e),
                    }
                }
            }
        }
        // Deleted now, inside the worker transaction: its commit consumes the barrier together
        // with the handler's writes, its rollback restores it. `claim_holds` checks afterwards
        // that the server did not end the transaction meanwhile.
        diesel::delete(dtb_barriers::table.find(&key)).execute(self)?;
        Ok(Claim::Locked)
    }

    fn claim_holds(&mut self, id: &uuid::Uuid) -> QueryResult<bool> {
        // The claim stands while the transaction that deleted the row is open: the row is then
        // invisible to this session (its own delete) and the server says a transaction is
        // open. After a deadlock or a lock wait timeout rolled it back, the row is visible
        // again; after an implicit commit (DDL in the handler, say), MariaDB says no
        // transaction is open — the retry then finds the row consumed and skips the handler.
        let row: ClaimCheckRow = with_in_transaction(
            self,
            "SELECT $in_transaction AS in_transaction, \
                    (SELECT COUNT(*) FROM dtb_barriers WHERE id = ?) AS remaining",
            Some(&id.hyphenated().to_string()),
        )?;
        Ok(row.remaining == 0 && row.in_transaction.is_none_or(|t| t == 1))
    }

    fn transaction_info(
        &mut self,
        _id: &uuid::Uuid,
        txid: Option<&str>,
    ) -> QueryResult<Option<String>> {
        let Some(thread) = txid.and_then(|t| t.parse::<u64>().ok()) else {
            return Ok(None);
        };
        let mut parts = vec![format!("MySQL thread {thread}")];
        // Diagnostics only: innodb_trx is a cache refreshed at most every 100 ms (and not at
        // all while anyone reads it more often), and it needs the PROCESS privilege.
        let trx: QueryResult<Vec<TrxRow>> = diesel::sql_query(
            "SELECT CAST(trx_id AS CHAR) AS trx_id, trx_state, \
                    CAST(trx_started AS CHAR) AS trx_started, \
                    CAST(trx_rows_modified AS CHAR) AS trx_rows_modified \
             FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = ?",
        )
        .bind::<Unsigned<BigInt>, _>(thread)
        .load(self);
        match trx {
            Ok(rows) => match rows.first() {
                Some(t) => parts.push(format!(
                    "InnoDB transaction {} {} since {}, {} rows modified (innodb_trx, which may \
                     lag by 100 ms or more)",
                    t.trx_id.as_deref().unwrap_or("?"),
                    t.trx_state.as_deref().unwrap_or("?"),
                    t.trx_started.as_deref().unwrap_or("?"),
                    t.trx_rows_modified.as_deref().unwrap_or("?"),
                )),
                None => parts.push(
                    "no InnoDB transaction listed in innodb_trx (a cache, which may lag)".into(),
                ),
            },
            Err(e) => {
                let why = match last_errno(self) {
                    Ok(Some(ER_SPECIFIC_ACCESS_DENIED)) => {
                        "needs the PROCESS privilege".to_string()
                    }
                    _ => e.to_string(),
                };
                parts.push(format!("innodb_trx unavailable ({why})"));
            }
        }
        // Without PROCESS, PROCESSLIST still shows the threads of the worker's own user.
        let process: QueryResult<Vec<ProcessRow>> = diesel::sql_query(
            "SELECT USER AS user, HOST AS host, COMMAND AS command, CAST(TIME AS CHAR) AS time \
             FROM information_schema.PROCESSLIST WHERE ID = ?",
        )
        .bind::<Unsigned<BigInt>, _>(thread)
        .load(self);
        match process {
            Ok(rows) => match rows.first() {
                Some(p) => parts.push(format!(
                    "connection of {}@{}, command {} for {} s (KILL {thread} would roll it back)",
                    p.user.as_deref().unwrap_or("?"),
                    p.host.as_deref().unwrap_or("?"),
                    p.command.as_deref().unwrap_or("?"),
                    p.time.as_deref().unwrap_or("?"),
                )),
                None => parts.push("not in the process list (gone, or not visible)".into()),
            },
            Err(e) => parts.push(format!("process list unavailable ({e})")),
        }
        Ok(Some(parts.join("; ")))
    }

    fn startup_warnings(&mut self) -> Vec<String> {
        let mut warnings = Vec::new();
        let settings: QueryResult<SettingsRow> = diesel::sql_query(
            "SELECT CAST(@@GLOBAL.innodb_flush_log_at_trx_commit AS CHAR) \
                        AS flush_log_at_trx_commit, \
                    CAST(@@GLOBAL.log_bin AS CHAR) AS log_bin, \
                    CAST(@@GLOBAL.sync_binlog AS CHAR) AS sync_binlog, \
                    CAST(@@SESSION.autocommit AS CHAR) AS autocommit, \
                    CURRENT_USER() AS account",
        )
        .get_result(self);
        let account = match settings {
            Ok(s) => {
                warnings.extend(setting_warnings(&s));
                s.account.as_deref().map(quoted_account)
            }
            Err(e) => {
                warnings.push(format!("could not read the server's settings: {e}"));
                None
            }
        };
        // One read of innodb_trx tells whether diagnostics will be able to use it. (A single
        // read delays the cache's next refresh by at most 100 ms; it is never read again
        // except to describe a barrier that timed out.)
        let probe: QueryResult<CountRow> = diesel::sql_query(
            "SELECT COUNT(*) AS value FROM information_schema.INNODB_TRX \
             WHERE trx_mysql_thread_id = CONNECTION_ID()",
        )
        .get_result(self);
        if let Err(e) = probe {
            let account = account.unwrap_or_else(|| "'user'@'host'".into());
            warnings.push(match last_errno(self) {
                Ok(Some(ER_SPECIFIC_ACCESS_DENIED)) => format!(
                    "the worker's database account {account} lacks the PROCESS privilege: \
                     barriers work without it, but a barrier that times out cannot be described \
                     (information_schema.innodb_trx needs it); to add it: \
                     GRANT PROCESS ON *.* TO {account}"
                ),
                _ => format!(
                    "information_schema.innodb_trx cannot be read ({e}); barriers work without \
                     it, but a barrier that times out cannot be described"
                ),
            });
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_is_rounded_up_to_whole_seconds() {
        assert_eq!(wait_secs(Duration::ZERO), 1);
        assert_eq!(wait_secs(Duration::from_millis(50)), 1);
        assert_eq!(wait_secs(Duration::from_secs(1)), 1);
        assert_eq!(wait_secs(Duration::from_millis(1001)), 2);
        assert_eq!(wait_secs(Duration::from_secs(30)), 30);
        assert_eq!(wait_secs(Duration::MAX), MAX_WAIT_SECS);
    }

    #[test]
    fn accounts_are_quoted_for_grant() {
        assert_eq!(quoted_account("app@%"), "'app'@'%'");
        assert_eq!(quoted_account("app@10.0.0.1"), "'app'@'10.0.0.1'");
        assert_eq!(quoted_account("o'neil@localhost"), "'o''neil'@'localhost'");
        assert_eq!(quoted_account("a@b@c"), "'a@b'@'c'");
    }

    #[test]
    fn settings_warnings() {
        let settings = |flush: &str, log_bin: &str, sync: &str| SettingsRow {
            flush_log_at_trx_commit: Some(flush.into()),
            log_bin: Some(log_bin.into()),
            sync_binlog: Some(sync.into()),
            autocommit: Some("1".into()),
            account: Some("root@localhost".into()),
        };
        assert!(setting_warnings(&settings("1", "0", "0")).is_empty());
        assert!(setting_warnings(&settings("1", "1", "1")).is_empty());
        let w = setting_warnings(&settings("2", "0", "0"));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("innodb_flush_log_at_trx_commit is 2"),
            "{w:?}"
        );
        let w = setting_warnings(&settings("1", "1", "0"));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("sync_binlog is 0"), "{w:?}");
        let mut no_autocommit = settings("1", "0", "0");
        no_autocommit.autocommit = Some("0".into());
        let w = setting_warnings(&no_autocommit);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("autocommit is off"), "{w:?}");
    }

    /// Checks against a live server (`MYSQL_DATABASE_URL`, default
    /// `mysql://root@127.0.0.1:3306/test`), each in a database of its own. The backend trait is
    /// private, so its verdicts can only be checked from inside the crate.
    mod live {
        use super::*;
        use std::sync::mpsc;
        use std::time::Instant;

        struct Db {
            admin: String,
            name: String,
            url: String,
        }

        impl Db {
            fn new() -> Db {
                let admin = std::env::var("MYSQL_DATABASE_URL")
                    .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
                let name = format!("dtb_unit_{}", uuid::Uuid::new_v4().simple());
                let mut c = MysqlConnection::establish(&admin).expect("MariaDB is reachable");
                c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
                let url = with_database(&admin, &name);
                let db = Db { admin, name, url };
                Backend::run_migrations(&mut db.connect()).expect("migrations");
                db
            }

            fn connect(&self) -> MysqlConnection {
                MysqlConnection::establish(&self.url).expect("connect")
            }
        }

        impl Drop for Db {
            fn drop(&mut self) {
                if let Ok(mut c) = MysqlConnection::establish(&self.admin) {
                    let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {}", self.name));
                }
            }
        }

        fn with_database(url: &str, name: &str) -> String {
            let authority = url.find("://").map_or(0, |i| i + 3);
            let (base, query) = match url.find('?') {
                Some(q) => (&url[..q], &url[q..]),
                None => (url, ""),
            };
            let base = match base[authority..].find('/') {
                Some(slash) => &base[..authority + slash],
                None => base,
            };
            format!("{base}/{name}{query}")
        }

        fn new_barrier<'a>(id: &'a uuid::Uuid) -> NewBarrier<'a> {
            NewBarrier {
                id,
                job_id: "jid",
                job_kind: "kind",
                job_queue: "default",
                payload: "{}",
            }
        }

        fn i64_of(conn: &mut MysqlConnection, query: &str) -> i64 {
            diesel::select(sql::<BigInt>(query))
                .get_result(conn)
                .unwrap()
        }

        /// Opens a transaction that inserts barrier `id`, keeps it open until told how to end
        /// it, and returns the sender that ends it (`true` commits).
        fn open_producer(
            db: &Db,
            id: uuid::Uuid,
        ) -> (mpsc::Sender<bool>, std::thread::JoinHandle<()>, String) {
            let (end_tx, end_rx) = mpsc::channel::<bool>();
            let (txid_tx, txid_rx) = mpsc::channel();
            let mut conn = db.connect();
            let handle = std::thread::spawn(move || {
                let _ = conn.transaction(|c| {
                    let txid = c.insert_barrier(&new_barrier(&id))?;
                    txid_tx.send(txid.txid.unwrap()).unwrap();
                    if end_rx.recv().unwrap() {
                        Ok(())
                    } else {
                        Err(diesel::result::Error::RollbackTransaction)
                    }
                });
            });
            let txid = txid_rx.recv().unwrap();
            (end_tx, handle, txid)
        }

        #[test]
        fn txid_is_the_producers_connection_id() {
            let db = Db::new();
            let id = uuid::Uuid::new_v4();
            let mut conn = db.connect();
            let own = i64_of(&mut conn, "CAST(CONNECTION_ID() AS SIGNED)");
            let txid = conn
                .transaction(|c| c.insert_barrier(&new_barrier(&id)))
                .unwrap()
                .txid
                .unwrap();
            assert_eq!(txid, own.to_string());
            assert!(txid.bytes().all(|b| b.is_ascii_digit()));
            let stored = i64_of(&mut conn, "(SELECT txid FROM dtb_barriers)");
            assert_eq!(stored, own);
        }

        #[test]
        fn committed_after_the_wait_and_fenced() {
            let db = Db::new();
            let id = uuid::Uuid::new_v4();
            let (end, producer, _) = open_producer(&db, id);
            let mut worker = db.connect();
            let started = Instant::now();
            let waiter = std::thread::spawn(move || {
                let v = worker.await_verdict(&id, Duration::from_secs(20)).unwrap();
                (v, started.elapsed(), worker)
            });
            std::thread::sleep(Duration::from_millis(300));
            end.send(true).unwrap();
            producer.join().unwrap();
            let (verdict, waited, mut worker) = waiter.join().unwrap();
            assert_eq!(verdict, Verdict::Committed);
            assert!(waited >= Duration::from_millis(300), "{waited:?}");
            // The fence is committed: another connection reads it.
            let mut other = db.connect();
            assert_eq!(i64_of(&mut other, "(SELECT attempts FROM dtb_barriers)"), 1);
            // Asked again: still committed (the row is there), fenced again.
            assert_eq!(
                worker.await_verdict(&id, Duration::from_secs(1)).unwrap(),
                Verdict::Committed
            );
            assert_eq!(i64_of(&mut other, "(SELECT attempts FROM dtb_barriers)"), 2);
        }

        #[test]
        fn not_committed_after_rollback() {
            let db = Db::new();
            let id = uuid::Uuid::new_v4();
            let (end, producer, _) = open_producer(&db, id);
            let mut worker = db.connect();
            let waiter =
                std::thread::spawn(move || worker.await_verdict(&id, Duration::from_secs(20)));
            std::thread::sleep(Duration::from_millis(300));
            end.send(false).unwrap();
            producer.join().unwrap();
            assert_eq!(waiter.join().unwrap().unwrap(), Verdict::NotCommitted);
            let mut other = db.connect();
            assert_eq!(i64_of(&mut other, "(SELECT COUNT(*) FROM dtb_barriers)"), 0);
        }

        #[test]
        fn pending_when_the_wait_times_out_and_the_session_is_restored() {
            let db = Db::new();
            let id = uuid::Uuid::new_v4();
            let (end, producer, _) = open_producer(&db, id);
            let mut worker = db.connect();
            worker
                .batch_execute("SET SESSION innodb_lock_wait_timeout = 7")
                .unwrap();
            let started = Instant::now();
            let verdict = worker
                .await_verdict(&id, Duration::from_millis(200))
                .unwrap();
            let waited = started.elapsed();
            assert_eq!(verdict, Verdict::Pending);
            // Rounded up to one second, and not much more.
            assert!(waited >= Duration::from_millis(900), "{waited:?}");
            assert!(waited < Duration::from_secs(5), "{waited:?}");
            assert_eq!(i64_of(&mut worker, "@@SESSION.innodb_lock_wait_timeout"), 7);
            // The timeout left no transaction open and no stale error number behind.
            assert!(worker
                .transaction(|c| {
                    diesel::select(sql::<Nullable<Integer>>("@dtb_errno"))
                        .get_result::<Option<i32>>(c)
                })
                .unwrap()
                .is_none());
            end.send(true).unwrap();
            producer.join().unwrap();
            assert_eq!(
                worker.await_verdict(&id, Duration::from_secs(5)).unwrap(),
                Verdict::Committed
            );
        }

        #[test]
        fn other_errors_are_not_taken_for_a_timeout() {
            let db = Db::new();
            let mut worker = db.connect();
            worker.batch_execute("DROP TABLE dtb_barriers").unwrap();
            let err = worker
                .await_verdict(&uuid::Uuid::new_v4(), Duration::from_secs(1))
                .unwrap_err();
            assert!(err.to_string().contains("dtb_barriers"), "{err}");
        }

        #[test]
        fn checks_ignore_an_old_repeatable_read_snapshot() {
            // The session default is REPEATABLE READ; a worker connection that read the table
            // before the commit must still see the barrier afterwards.
            let db = Db::new();
            let id = uuid::Uuid::new_v4();
            let mut worker = db.connect();
            worker
                .batch_execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                .unwrap();
            let (end, producer, _) = open_producer(&db, id);
            end.send(true).unwrap();
            producer.join().unwrap();
            let claim = worker
                .worker_transaction(|c| {
                    let iso: String =
                        diesel::select(sql::<Text>("@@tx_isolation")).get_result(c)?;
                    assert_eq!(iso, "REPEATABLE-READ", "the session default is untouched");
                    c.claim_barrier(&id)
                })
                .unwrap();
            assert_eq!(claim, Claim::Locked);
        }

        #[test]
        fn claim_never_waits() {
            let db = Db::new();
            let id = uuid::Uuid::new_v4();
            let (end, producer, _) = open_producer(&db, id);
            end.send(true).unwrap();
            producer.join().unwrap();
            let mut first = db.connect();
            let mut second = db.connect();
            first
                .worker_transaction(|a| {
                    assert_eq!(a.claim_barrier(&id)?, Claim::Locked);
                    let started = Instant::now();
                    let busy = second.worker_transaction(|b| b.claim_barrier(&id))?;
                    assert_eq!(busy, Claim::Busy);
                    assert!(started.elapsed() < Duration::from_millis(500));
                    assert!(a.claim_holds(&id)?, "the claim stands");
                    Ok::<_, diesel::result::Error>(())
                })
                .unwrap();
            let gone = second.worker_transaction(|b| b.claim_barrier(&id)).unwrap();
            assert_eq!(gone, Claim::Gone);
            assert_eq!(
                second.await_verdict(&id, Duration::from_secs(1)).unwrap(),
                Verdict::NotCommitted
            );
        }

        #[test]
        fn schema_check_and_transaction_info() {
            let db = Db::new();
            let mut conn = db.connect();
            assert!(conn.barrier_schema_present().unwrap());
            let warnings = conn.startup_warnings();
            assert!(warnings.is_empty(), "root has PROCESS: {warnings:?}");
            let id = uuid::Uuid::new_v4();
            let (end, producer, txid) = open_producer(&db, id);
            // innodb_trx is a cache: give it time to refresh.
            std::thread::sleep(Duration::from_millis(250));
            let info = conn.transaction_info(&id, Some(&txid)).unwrap().unwrap();
            assert!(info.contains(&format!("MySQL thread {txid}")), "{info}");
            assert!(info.contains("RUNNING"), "{info}");
            end.send(false).unwrap();
            producer.join().unwrap();
            assert_eq!(conn.transaction_info(&id, None).unwrap(), None);
            conn.batch_execute("DROP TABLE dtb_barriers").unwrap();
            assert!(!conn.barrier_schema_present().unwrap());
        }

        /// The barriers `ids`, half of them marked as due for a probe (which this backend does
        /// not need).
        fn pending_of(ids: &[uuid::Uuid]) -> Vec<Pending> {
            ids.iter()
                .enumerate()
                .map(|(i, id)| Pending {
                    id: *id,
                    txid: None,
                    probe: i % 2 == 0,
                })
                .collect()
        }

        #[test]
        fn check_pending_never_waits_and_decides_each_barrier() {
            let db = Db::new();
            let (running, committed, rolled_back, unknown) = (
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
            );
            let (end_running, running_producer, _) = open_producer(&db, running);
            let (end, producer, _) = open_producer(&db, committed);
            end.send(true).unwrap();
            producer.join().unwrap();
            let (end, producer, _) = open_producer(&db, rolled_back);
            end.send(false).unwrap();
            producer.join().unwrap();

            let mut worker = db.connect();
            let started = Instant::now();
            let verdicts = worker
                .check_pending(&pending_of(&[running, committed, rolled_back, unknown]))
                .unwrap()
                .verdicts;
            assert!(started.elapsed() < Duration::from_millis(500), "no wait");
            assert_eq!(
                verdicts,
                [
                    Verdict::Pending,
                    Verdict::Committed,
                    Verdict::NotCommitted,
                    Verdict::NotCommitted
                ]
            );
            let mut other = db.connect();
            let fenced = format!("(SELECT attempts FROM dtb_barriers WHERE id = '{committed}')");
            assert_eq!(i64_of(&mut other, &fenced), 1, "the fence is committed");
            // Asked again: the row is still there, committed, and fenced again.
            assert_eq!(
                worker
                    .check_pending(&pending_of(&[rolled_back, committed]))
                    .unwrap()
                    .verdicts,
                [Verdict::NotCommitted, Verdict::Committed]
            );
            assert_eq!(i64_of(&mut other, &fenced), 2, "fenced again");

            end_running.send(true).unwrap();
            running_producer.join().unwrap();
            assert_eq!(
                worker
                    .check_pending(&pending_of(&[running]))
                    .unwrap()
                    .verdicts,
                [Verdict::Committed]
            );
            assert!(worker.check_pending(&[]).unwrap().verdicts.is_empty());
        }

        #[test]
        fn check_pending_waits_for_a_handler_that_holds_the_row() {
            let db = Db::new();
            let id = uuid::Uuid::new_v4();
            let (end, producer, _) = open_producer(&db, id);
            end.send(true).unwrap();
            producer.join().unwrap();
            let mut handler = db.connect();
            let mut waiter = db.connect();
            handler
                .worker_transaction(|h| {
                    // Claimed, so deleted but not yet committed: still pending, not "not
                    // committed".
                    assert_eq!(h.claim_barrier(&id)?, Claim::Locked);
                    assert_eq!(
                        waiter.check_pending(&pending_of(&[id]))?.verdicts,
                        [Verdict::Pending]
                    );
                    Err::<(), _>(diesel::result::Error::RollbackTransaction)
                })
                .unwrap_err();
            // The handler failed: the row is back, committed and free.
            assert_eq!(
                waiter.check_pending(&pending_of(&[id])).unwrap().verdicts,
                [Verdict::Committed]
            );
            handler
                .worker_transaction(|h| {
                    assert_eq!(h.claim_barrier(&id)?, Claim::Locked);
                    Ok::<_, diesel::result::Error>(())
                })
                .unwrap();
            assert_eq!(
                waiter.check_pending(&pending_of(&[id])).unwrap().verdicts,
                [Verdict::NotCommitted]
            );
        }

        #[test]
        fn check_pending_cost() {
            let db = Db::new();
            let ids: Vec<uuid::Uuid> = (0..200).map(|_| uuid::Uuid::new_v4()).collect();
            let (end_tx, end_rx) = mpsc::channel::<()>();
            let (ready_tx, ready_rx) = mpsc::channel::<()>();
            let mut conn = db.connect();
            let producer_ids = ids.clone();
            let producer = std::thread::spawn(move || {
                conn.transaction(|c| {
                    for id in &producer_ids {
                        c.insert_barrier(&new_barrier(id))?;
                    }
                    ready_tx.send(()).unwrap();
                    end_rx.recv().unwrap();
                    Err::<(), _>(diesel::result::Error::RollbackTransaction)
                })
                .unwrap_err();
            });
            ready_rx.recv().unwrap();
            let mut worker = db.connect();
            for n in [1, 200] {
                let batch = pending_of(&ids[..n]);
                let rounds = 50;
                let started = Instant::now();
                for _ in 0..rounds {
                    let v = worker.check_pending(&batch).unwrap().verdicts;
                    assert!(v.iter().all(|v| *v == Verdict::Pending));
                }
                eprintln!(
                    "check_pending of {n} pending barriers: {:?} each",
                    started.elapsed() / rounds
                );
            }
            end_tx.send(()).unwrap();
            producer.join().unwrap();
        }

        #[test]
        fn unconsumed_committed_barriers_are_taken_once_per_grace() {
            let db = Db::new();
            let (old, attempted, young, ancient, running) = (
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
                uuid::Uuid::new_v4(),
            );
            let mut conn = db.connect();
            for id in [old, attempted, young, ancient] {
                conn.transaction(|c| c.insert_barrier(&new_barrier(&id)))
                    .unwrap();
            }
            conn.batch_execute(&format!(
                "UPDATE dtb_barriers SET pushed_at = NOW(6) - INTERVAL 10 MINUTE \
                 WHERE id IN ('{old}', '{attempted}', '{ancient}'); \
                 UPDATE dtb_barriers SET created_at = NOW(6) - INTERVAL 2 DAY \
                 WHERE id = '{ancient}'"
            ))
            .unwrap();
            let (end, producer, _) = open_producer(&db, running);
            conn.mark_attempted(&attempted).unwrap();
            let (grace, max_age) = (Duration::from_secs(60), Duration::from_secs(86400));
            let started = Instant::now();
            let taken = conn
                .worker_transaction(|c| c.take_unconsumed(grace, max_age, 100))
                .unwrap();
            assert!(started.elapsed() < Duration::from_millis(500), "no wait");
            let ids: Vec<&str> = taken.iter().map(|u| u.id.as_str()).collect();
            assert_eq!(ids, [old.hyphenated().to_string()]);
            assert_eq!(taken[0].payload.as_deref(), Some("{}"));
            assert!(taken[0].txid.is_some());
            // Marked pushed now: not taken again within the grace period.
            let again = conn
                .worker_transaction(|c| c.take_unconsumed(grace, max_age, 100))
                .unwrap();
            assert!(again.is_empty(), "{again:?}");
            end.send(false).unwrap();
            producer.join().unwrap();
        }

        #[test]
        fn reap_works_in_batches() {
            let db = Db::new();
            let mut conn = db.connect();
            let n = 2 * IN_LIST_MAX + 17;
            conn.transaction(|c| {
                for _ in 0..n {
                    diesel::sql_query(
                        "INSERT INTO dtb_barriers (id, created_at, job_id, job_kind, job_queue) \
                         VALUES (UUID(), NOW(6) - INTERVAL 1 HOUR, 'j', 'k', 'q')",
                    )
                    .execute(c)?;
                }
                Ok::<_, diesel::result::Error>(())
            })
            .unwrap();
            assert_eq!(conn.reap(Duration::from_secs(60)).unwrap().len(), n);
            assert_eq!(i64_of(&mut conn, "(SELECT COUNT(*) FROM dtb_barriers)"), 0);
        }

        #[test]
        fn reap_deletes_old_committed_rows_only() {
            let db = Db::new();
            let old: Vec<uuid::Uuid> = (0..4).map(|_| uuid::Uuid::new_v4()).collect();
            let (young, running) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
            let mut conn = db.connect();
            for id in &old {
                conn.transaction(|c| c.insert_barrier(&new_barrier(id)))
                    .unwrap();
            }
            // Old too, but its transaction is still open: left alone, without waiting for it.
            let (end, producer, _) = open_producer(&db, running);
            std::thread::sleep(Duration::from_millis(1200));
            conn.transaction(|c| c.insert_barrier(&new_barrier(&young)))
                .unwrap();
            let started = Instant::now();
            let reaped = conn.reap(Duration::from_secs(1)).unwrap();
            assert!(started.elapsed() < Duration::from_millis(500), "no wait");
            let mut ids: Vec<String> = reaped.iter().map(|r| r.id.clone()).collect();
            ids.sort();
            let mut expected: Vec<String> =
                old.iter().map(|id| id.hyphenated().to_string()).collect();
            expected.sort();
            assert_eq!(ids, expected);
            assert_eq!(reaped[0].job_kind, "kind");
            end.send(true).unwrap();
            producer.join().unwrap();
            assert_eq!(i64_of(&mut conn, "(SELECT COUNT(*) FROM dtb_barriers)"), 2);
            assert!(conn.reap(Duration::MAX).unwrap().is_empty());
        }
    }
}
