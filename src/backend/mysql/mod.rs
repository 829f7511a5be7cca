//! MySQL and MariaDB: barriers on `MysqlConnection` (cargo feature `mysql`).
//!
//! MySQL has nothing like `LISTEN`: the waiter checks the pending set every 2 ms, deciding each
//! barrier from the rows themselves (`check.rs`), and fences a commit it saw before calling it
//! durable, because InnoDB releases row locks before the commit is on disk. `diagnostics.rs`
//! describes a producer's transaction for timeout reports and checks the server's settings;
//! `inspect.rs` lists the table for an operator.
//! The argument, the privileges and the server settings it needs: `docs/design/mysql.md`.

mod check;
mod diagnostics;
mod inspect;
#[cfg(all(test, feature = "testing"))]
mod tests;

use super::rows::{ReapedRow, UnconsumedRow};
use super::sealed::Backend;
use super::{
    Checked, Claim, Inserted, NewBarrier, Pending, ReapedBarrier, ServerTransaction, Unconsumed,
};
use crate::error::Error;
use diesel::connection::{
    AnsiTransactionManager, SimpleConnection, TransactionDepthChange, TransactionManager,
};
use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Unsigned};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/mysql");

/// MySQL's error number for "Lock wait timeout exceeded".
const ER_LOCK_WAIT_TIMEOUT: i32 = 1205;
/// MySQL's error number for "Access denied; you need (at least one of) the PROCESS
/// privilege(s) for this operation".
pub(super) const ER_SPECIFIC_ACCESS_DENIED: i32 = 1227;
/// MySQL's error number for "Table doesn't exist".
const ER_NO_SUCH_TABLE: i32 = 1146;
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

/// Whether the server takes MariaDB's `SET STATEMENT ... FOR` (MySQL does not): not tried
/// yet, yes, no. Learnt as [`IN_TRANSACTION_VARIABLE`] is.
static SET_STATEMENT: AtomicU8 = AtomicU8::new(VARIABLE_UNKNOWN);
/// MySQL's error number for a syntax error.
const ER_PARSE_ERROR: i32 = 1064;

/// How often, in milliseconds, the waiter checks pending barriers.
const CHECK_INTERVAL_MS: u64 = 2;
/// The most ids in one `IN (...)` list.
pub(super) const IN_LIST_MAX: usize = 1000;

/// `d` in microseconds, for `NOW(6) - INTERVAL ? MICROSECOND` (see `bounded_age`).
fn micros(d: Duration) -> i64 {
    super::bounded_age(d).as_micros() as i64
}

#[allow(unreachable_pub, missing_docs)]
pub(super) mod schema {
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
            job_digest -> Nullable<Text>,
        }
    }
}

use schema::dtb_barriers;

#[derive(QueryableByName)]
pub(super) struct CountRow {
    #[diesel(sql_type = BigInt)]
    pub(super) value: i64,
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

/// How a worker transaction begins. `SET TRANSACTION ISOLATION LEVEL` (without `SESSION`)
/// applies to the next transaction only, so it comes right before `BEGIN`; the session's own
/// default (REPEATABLE READ unless configured otherwise) is untouched.
const SET_READ_COMMITTED: &str = "SET TRANSACTION ISOLATION LEVEL READ COMMITTED";
/// See [`SET_READ_COMMITTED`].
pub(super) const SET_READ_UNCOMMITTED: &str = "SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED";

/// Runs `f` in a transaction at the isolation level `set_level` sets, which commits when `f`
/// returns `Ok` and rolls back otherwise.
///
/// Every statement is a prepared one: the client sends a batch of several statements between
/// two switches of its multi-statement mode, each a round trip of its own, so a batched
/// `BEGIN` or `COMMIT` would cost three round trips instead of one. Diesel's count of open
/// transactions is kept in step, as its own transaction manager would.
pub(super) fn in_transaction<R, E, F>(
    conn: &mut MysqlConnection,
    set_level: &str,
    f: F,
) -> Result<R, E>
where
    F: FnOnce(&mut MysqlConnection) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    if super::diesel_transaction(conn) != super::DieselTransaction::None {
        return Err(diesel::result::Error::AlreadyInTransaction.into());
    }
    diesel::sql_query(set_level).execute(conn)?;
    diesel::sql_query("BEGIN").execute(conn)?;
    count_transaction(conn, TransactionDepthChange::IncreaseDepth)?;
    let result = f(conn);
    end_transaction(conn, result)
}

/// Commits the transaction when `result` is `Ok`, rolls it back otherwise, and returns
/// `result` (or the commit's error).
fn end_transaction<R, E>(conn: &mut MysqlConnection, result: Result<R, E>) -> Result<R, E>
where
    E: From<diesel::result::Error>,
{
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    let ended = diesel::sql_query(end).execute(conn);
    if ended.is_err() && result.is_ok() {
        // A failed COMMIT leaves the transaction to roll back.
        let _ = diesel::sql_query("ROLLBACK").execute(conn);
    }
    count_transaction(conn, TransactionDepthChange::DecreaseDepth)?;
    ended?;
    result
}

/// Tells Diesel's transaction manager that a transaction began or ended.
fn count_transaction(
    conn: &mut MysqlConnection,
    change: TransactionDepthChange,
) -> QueryResult<()> {
    <AnsiTransactionManager as TransactionManager<MysqlConnection>>::transaction_manager_status_mut(
        conn,
    )
    .transaction_state()?
    .change_transaction_depth(change)
}

/// Runs `f` in a READ COMMITTED transaction, whatever the session's default isolation level.
pub(super) fn read_committed<R, E, F>(conn: &mut MysqlConnection, f: F) -> Result<R, E>
where
    F: FnOnce(&mut MysqlConnection) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    in_transaction(conn, SET_READ_COMMITTED, f)
}

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

/// MariaDB's claim, in one statement: the delete takes the row's lock without waiting for it
/// (a lock wait timeout of 0 fails at once where it would wait), and only if the row is the
/// delivery's job's (`digest`). One row deleted is ours; none is gone, or, if the row is still
/// there, another job's; a lock wait timeout means held. `None` where the server does not know
/// `SET STATEMENT` (MySQL).
pub(super) fn claim_in_one_statement(
    conn: &mut MysqlConnection,
    key: &str,
    digest: &str,
) -> QueryResult<Option<Claim>> {
    let deleted = diesel::sql_query(
        "SET STATEMENT innodb_lock_wait_timeout = 0 FOR DELETE FROM dtb_barriers \
         WHERE id = ? AND (job_digest IS NULL OR job_digest = ?)",
    )
    .bind::<Text, _>(key)
    .bind::<Text, _>(digest)
    .execute(conn);
    match deleted {
        Ok(n) => {
            SET_STATEMENT.store(VARIABLE_PRESENT, Ordering::Relaxed);
            if n == 1 {
                return Ok(Some(Claim::Locked));
            }
            // Nothing deleted, and nothing held (that would have timed out): the row is gone,
            // or it is another job's.
            let theirs = dtb_barriers::table
                .find(key)
                .select(dtb_barriers::job_digest)
                .get_result::<Option<String>>(conn)
                .optional()?;
            Ok(Some(if theirs.is_some() {
                Claim::Foreign
            } else {
                Claim::Gone
            }))
        }
        Err(e) => match last_errno(conn)? {
            Some(ER_LOCK_WAIT_TIMEOUT) => Ok(Some(Claim::Busy)),
            Some(ER_PARSE_ERROR) => {
                SET_STATEMENT.store(VARIABLE_ABSENT, Ordering::Relaxed);
                Ok(None)
            }
            _ => Err(e),
        },
    }
}

/// MySQL's claim: a locking read that skips what is held, then the delete.
pub(super) fn claim_with_locking_read(
    conn: &mut MysqlConnection,
    key: &str,
    digest: &str,
) -> QueryResult<Claim> {
    // SKIP LOCKED never waits and never errors: a row held by a concurrent duplicate (or, were
    // the waiter ever wrong, by its running producer) simply does not come back.
    let locked = dtb_barriers::table
        .find(key)
        .select(dtb_barriers::job_digest)
        .for_update()
        .skip_locked()
        .get_result::<Option<String>>(conn)
        .optional()?;
    if let Some(Some(theirs)) = &locked {
        if theirs != digest {
            // Locked until the worker transaction rolls back, which lets it go untouched.
            return Ok(Claim::Foreign);
        }
    }
    if locked.is_none() {
        // Held, or gone? A second locking read that refuses to wait tells them apart: one that
        // meets a lock fails at once, and only an absent row comes back empty. A row let go of
        // in between is simply taken.
        let again = dtb_barriers::table
            .find(key)
            .select(dtb_barriers::job_digest)
            .for_update()
            .no_wait()
            .get_result::<Option<String>>(conn)
            .optional();
        match again {
            Ok(Some(Some(theirs))) if theirs != digest => return Ok(Claim::Foreign),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Claim::Gone),
            Err(e) => {
                return match last_errno(conn)? {
                    Some(ER_LOCK_WAIT_TIMEOUT | ER_LOCK_NOWAIT) => Ok(Claim::Busy),
                    _ => Err(e),
                }
            }
        }
    }
    diesel::delete(dtb_barriers::table.find(key)).execute(conn)?;
    Ok(Claim::Locked)
}

impl Backend for MysqlConnection {
    const NAME: &'static str = "mysql";

    fn run_migrations(&mut self) -> Result<(), Error> {
        MigrationHarness::run_pending_migrations(self, MIGRATIONS)
            .map(|_| ())
            .map_err(Error::Migration)
    }

    fn barrier_schema_present(&mut self) -> QueryResult<bool> {
        // The newest column the migrations add.
        let row: CountRow = diesel::sql_query(
            "SELECT COUNT(*) AS value FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ? AND COLUMN_NAME = ?",
        )
        .bind::<Text, _>(crate::BARRIER_TABLE)
        .bind::<Text, _>("retry_due_at")
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
                dtb_barriers::job_digest.eq(row.job_digest),
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

    fn remove_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        diesel::delete(dtb_barriers::table.find(id.hyphenated().to_string())).execute(self)?;
        Ok(())
    }

    fn missing_table(&mut self, _error: &diesel::result::Error) -> bool {
        matches!(last_errno(self), Ok(Some(ER_NO_SUCH_TABLE)))
    }

    fn barrier_location(&mut self) -> QueryResult<Option<String>> {
        diesel::select(sql::<Nullable<Text>>("DATABASE()")).get_result(self)
    }

    // No commit hints (MySQL has nothing like LISTEN/NOTIFY): the waiter polls with
    // `check_pending`, which is two short reads when nothing has changed. The interval bounds
    // the time from a producer's commit (or rollback) to the waiter's verdict.
    const CHECK_INTERVAL: Duration = Duration::from_millis(CHECK_INTERVAL_MS);

    type Checker = ();

    fn check_pending(&mut self, _: &mut (), pending: &[Pending]) -> QueryResult<Checked> {
        check::check_pending(self, pending)
    }

    fn fence(&mut self, visible: &[uuid::Uuid]) -> QueryResult<bool> {
        check::fence(self, visible)
    }

    // Commits are durable when they return (`innodb_flush_log_at_trx_commit = 1`, which the
    // worker checks when it connects): each handler's commit proves what was seen before it.
    const HANDLER_COMMITS_PROVE: bool = true;

    fn mark_attempted(&mut self, id: &uuid::Uuid, retry_due: Option<Duration>) -> QueryResult<()> {
        read_committed(self, |c| {
            diesel::sql_query(
                "UPDATE dtb_barriers SET attempted_at = NOW(6), \
                     retry_due_at = NOW(6) + INTERVAL ? MICROSECOND \
                 WHERE id = ?",
            )
            .bind::<Nullable<BigInt>, _>(retry_due.map(micros))
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
             WHERE ((attempted_at IS NULL AND pushed_at < NOW(6) - INTERVAL ? MICROSECOND) \
                    OR retry_due_at < NOW(6) - INTERVAL ? MICROSECOND) \
               AND created_at > NOW(6) - INTERVAL ? MICROSECOND \
             ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED",
        )
        .bind::<BigInt, _>(micros(grace))
        .bind::<BigInt, _>(micros(grace))
        .bind::<BigInt, _>(micros(max_age))
        .bind::<BigInt, _>(limit.clamp(0, IN_LIST_MAX as i64))
        .load(self)?;
        // Row by row on the primary key: an `IN (...)` list planned as a scan would lock, for a
        // moment, rows that handlers are claiming.
        for row in &rows {
            diesel::sql_query(
                "UPDATE dtb_barriers \
                 SET pushed_at = NOW(6), attempted_at = NULL, retry_due_at = NULL WHERE id = ?",
            )
            .bind::<Text, _>(&row.id)
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

    fn claim_barrier(&mut self, id: &uuid::Uuid, digest: &str) -> QueryResult<Claim> {
        // Deleted now, inside the worker transaction: its commit consumes the barrier together
        // with the handler's writes, its rollback restores it. `claim_holds` checks afterwards
        // that the server did not end the transaction meanwhile.
        let key = id.hyphenated().to_string();
        if SET_STATEMENT.load(Ordering::Relaxed) != VARIABLE_ABSENT {
            if let Some(claim) = claim_in_one_statement(self, &key, digest)? {
                return Ok(claim);
            }
        }
        claim_with_locking_read(self, &key, digest)
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

    fn list_barriers(&mut self, limit: i64) -> QueryResult<super::inspect::Listing> {
        inspect::list(self, limit)
    }

    fn transaction_info(
        &mut self,
        _id: &uuid::Uuid,
        txid: Option<&str>,
    ) -> QueryResult<Option<String>> {
        Ok(diagnostics::transaction_info(self, txid))
    }

    fn startup_warnings(&mut self) -> Vec<String> {
        diagnostics::startup_warnings(self)
    }
}
