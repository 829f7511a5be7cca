//! MySQL and MariaDB: barriers on `MysqlConnection` (cargo feature `mysql`).
//!
//! MySQL has nothing like `LISTEN`. The waiter decides each barrier from the rows themselves
//! (`check.rs`), checked at once and then less and often the longer it waits, and learns of a
//! transaction's end sooner from a few watchers blocked in lock waits on running producers'
//! rows (`hints.rs`). It proves a commit it saw durable before calling it committed, because
//! InnoDB releases row locks before the commit is on disk (`durability.rs`). Handlers claim
//! their barrier in the transaction that runs them (`claim.rs`); the reconciler and the reaper
//! have `maintenance.rs`. `session.rs` holds the statement and transaction plumbing and what
//! the backend learnt about the server, `errors.rs` the error numbers it tells apart,
//! `diagnostics.rs` what it tells an operator about a producer's transaction and the server's
//! settings, `inspect.rs` its listing of the table. The argument, the privileges and the
//! server settings it needs: `docs/design/mysql.md`.

mod check;
mod claim;
mod diagnostics;
mod durability;
mod errors;
mod hints;
mod inspect;
mod maintenance;
mod session;
#[cfg(all(test, feature = "testing"))]
mod tests;

use super::sealed::Backend;
use super::{
    CheckSchedule, Checked, Claim, Durability, Hints, Inserted, NewBarrier, Pending, ReapedBarrier,
    ServerTransaction, Unconsumed,
};
use crate::error::Error;
use diesel::dsl::sql;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Unsigned};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use errors::{last_errno, ER_NO_SUCH_TABLE};
use session::{read_committed, with_in_transaction, InTransactionQuery};
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/mysql");

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
struct SessionRow {
    #[diesel(sql_type = Unsigned<BigInt>)]
    connection_id: u64,
    #[diesel(sql_type = Nullable<Text>)]
    database: Option<String>,
}

impl Backend for MysqlConnection {
    const NAME: &'static str = "mysql";

    fn run_migrations(&mut self) -> Result<(), Error> {
        MigrationHarness::run_pending_migrations(self, MIGRATIONS)
            .map(|_| ())
            .map_err(Error::Migration)
    }

    fn barrier_schema_present(&mut self) -> QueryResult<bool> {
        // The newest column and the newest table the migrations add.
        let row: CountRow = diesel::sql_query(
            "SELECT (SELECT COUNT(*) FROM information_schema.COLUMNS \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'dtb_barriers' \
                       AND COLUMN_NAME = 'retry_due_at') \
                  * (SELECT COUNT(*) FROM information_schema.TABLES \
                     WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'dtb_fences') AS value",
        )
        .get_result(self)?;
        Ok(row.value > 0)
    }

    fn server_transaction(&mut self, diesel_depth: u32) -> QueryResult<ServerTransaction> {
        // Diesel counts only what it opened, and nothing the server does behind its back: a
        // deadlock victim (1213) or a lock wait timeout with `innodb_rollback_on_timeout` rolls
        // the whole transaction back, and DDL, `LOCK TABLES` or `SET autocommit = 1` commit it;
        // `SET autocommit = 0` opens one Diesel does not see. MariaDB says which is true.
        const SERVER_TRANSACTION: InTransactionQuery = InTransactionQuery {
            with: &[
                "SELECT CAST(@@in_transaction AS SIGNED) AS in_transaction, \
                     CAST(@@autocommit AS SIGNED) AS autocommit",
            ],
            without: &["SELECT CAST(NULL AS SIGNED) AS in_transaction, \
                        CAST(@@autocommit AS SIGNED) AS autocommit"],
        };
        let row: TransactionRow = with_in_transaction(self, SERVER_TRANSACTION, &[])?;
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

    fn insert_barriers(&mut self, rows: &[NewBarrier<'_>]) -> QueryResult<Inserted> {
        // Every row in one prepared statement: the rows travel as one JSON array, so the
        // statement's text is the same whatever their number.
        const INSERT: &[&str] = &[
            "INSERT INTO dtb_barriers \
             (id, txid, job_id, job_kind, job_queue, payload, job_digest) \
             SELECT r.id, CONNECTION_ID(), r.job_id, r.job_kind, r.job_queue, r.payload, \
                    r.job_digest \
             FROM JSON_TABLE(",
            ", '$[*]' COLUMNS ( \
                 id CHAR(36) CHARACTER SET ascii PATH '$[0]', \
                 job_id TEXT PATH '$[1]', job_kind TEXT PATH '$[2]', \
                 job_queue TEXT PATH '$[3]', payload LONGTEXT PATH '$[4]', \
                 job_digest CHAR(64) CHARACTER SET ascii PATH '$[5]')) AS r",
        ];
        const SESSION: &[&str] =
            &["SELECT CONNECTION_ID() AS connection_id, DATABASE() AS `database`"];
        let ids: Vec<String> = rows.iter().map(|r| r.id.hyphenated().to_string()).collect();
        let json: Vec<[&str; 6]> = rows
            .iter()
            .zip(&ids)
            .map(|(r, id)| {
                [
                    id,
                    r.job_id,
                    r.job_kind,
                    r.job_queue,
                    r.payload,
                    r.job_digest,
                ]
            })
            .collect();
        let json = serde_json::to_string(&json).expect("strings are JSON");
        session::Statement::new(INSERT, &[&json]).execute(self)?;
        let session: SessionRow = session::Statement::plain(SESSION).get_result(self)?;
        Ok(Inserted {
            txid: Some(session.connection_id.to_string()),
            location: session.database,
        })
    }

    fn remove_barriers(&mut self, ids: &[uuid::Uuid]) -> QueryResult<usize> {
        let ids: Vec<String> = ids.iter().map(|id| id.hyphenated().to_string()).collect();
        diesel::delete(dtb_barriers::table.filter(dtb_barriers::id.eq_any(&ids))).execute(self)
    }

    fn consume_barriers(&mut self, ids: &[uuid::Uuid]) -> QueryResult<usize> {
        // One statement, in autocommit: a transaction of its own, durable on return.
        self.remove_barriers(ids)
    }

    fn barrier_digest(&mut self, id: &uuid::Uuid) -> QueryResult<Option<Option<String>>> {
        // A plain read: a consistent snapshot, no lock taken or waited for.
        dtb_barriers::table
            .find(id.hyphenated().to_string())
            .select(dtb_barriers::job_digest)
            .get_result::<Option<String>>(self)
            .optional()
    }

    fn missing_table(&mut self, _error: &diesel::result::Error) -> bool {
        matches!(last_errno(self), Ok(Some(ER_NO_SUCH_TABLE)))
    }

    fn barrier_location(&mut self) -> QueryResult<Option<String>> {
        diesel::select(sql::<Nullable<Text>>("DATABASE()")).get_result(self)
    }

    type Checker = ();

    fn check_pending(&mut self, _: &mut (), pending: &[Pending]) -> QueryResult<Checked> {
        check::check_pending(self, pending)
    }

    // Checked at once, then 2 ms later, twice as long after each check, up to a second: most
    // transactions end within milliseconds of their push; the watchers learn of the end of
    // those that run longer.
    const CHECKS: CheckSchedule = CheckSchedule {
        first: Duration::from_millis(2),
        max: Duration::from_secs(1),
    };

    fn hints() -> Hints<Self> {
        Hints::LockWaits(&hints::ROW_LOCKS)
    }

    fn durability() -> Durability<Self> {
        Durability::Proven(&durability::REDO_LOG)
    }

    fn worker_transaction<R, E, F>(&mut self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self) -> Result<R, E>,
        E: From<diesel::result::Error>,
    {
        read_committed(self, f)
    }

    fn claim_barrier(&mut self, id: &uuid::Uuid, digest: &str) -> QueryResult<Claim> {
        claim::claim_barrier(self, id, digest)
    }

    fn claim_holds(&mut self, id: &uuid::Uuid) -> QueryResult<bool> {
        claim::claim_holds(self, id)
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
        txid: Option<&str>,
    ) -> QueryResult<Option<String>> {
        Ok(diagnostics::transaction_info(self, txid))
    }

    fn startup_warnings(&mut self) -> Vec<String> {
        diagnostics::startup_warnings(self)
    }
}
