//! PostgreSQL: barriers on `PgConnection` (cargo feature `postgres`).
//!
//! The producer inserts the barrier row (this file); the worker's waiter decides from the row
//! (visible: committed) and, once the producer's transaction looks over (or its probe is
//! due), from the lock wait of a conflicting insert in `dtb_await_barrier` (`check.rs`), which
//! ends exactly when the producer's transaction or savepoint does; its watchers wait on running
//! producers with the same lock wait, and wake it when they end (`hints.rs`). A commit seen before the WAL was flushed past it
//! waits for the flush, or for a fence (`durability.rs`). Handlers claim their barrier in the
//! transaction that runs them (`claim.rs`); the reconciler and the reaper have
//! `maintenance.rs`, an operator `inspect.rs`. Why, and what it rests on:
//! `docs/design/postgres.md`.

mod check;
mod claim;
mod durability;
mod hints;
mod inspect;
mod maintenance;
mod prepared;
#[cfg(all(test, feature = "testing"))]
mod tests;

use super::sealed::Backend;
use super::{
    CheckSchedule, Checked, Claim, Claimed, Durability, Hints, Inserted, NewBarrier, Pending,
    ReapedBarrier, ServerTransaction, Unconsumed,
};
use crate::error::Error;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use prepared::{Prepared, Value};
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct OptTextRow {
    #[diesel(sql_type = Nullable<Text>)]
    value: Option<String>,
}

#[derive(QueryableByName)]
struct BoolRow {
    #[diesel(sql_type = Bool)]
    value: bool,
}

#[derive(QueryableByName)]
struct InsertedRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    txid: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    location: Option<String>,
}

/// The database and schema of the barrier table whose oid is `$oid`, as `database.schema`
/// (each quoted as an identifier where it needs to be).
const LOCATION_OF: &str = "SELECT format('%I.%I', current_database(), n.nspname) \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $oid";

/// Where `dtb_barriers` appears in [`INSERT_BARRIER`] as the insert's target.
const INSERT_TARGET: &str = "INSERT INTO dtb_barriers ";

/// The producer's statement (see [`Backend::insert_barriers`] below): the rows come as one
/// array per column.
static INSERT_BARRIER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH ins AS ( \
             {INSERT_TARGET}(id, created_at, pushed_at, txid, job_id, job_kind, job_queue, payload, \
                             job_digest) \
             SELECT r.id, t.now, t.now, pg_current_xact_id()::text::bigint, r.job_id, r.job_kind, \
                    r.job_queue, r.payload, r.job_digest \
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[]) \
                  AS r(id, job_id, job_kind, job_queue, payload, job_digest), \
                  (SELECT clock_timestamp() AS now) AS t \
             RETURNING txid, tableoid), \
         one AS (SELECT txid, tableoid FROM ins LIMIT 1) \
         SELECT one.txid, ({location}) AS location \
         FROM one, \
              LATERAL (SELECT CASE WHEN current_setting('synchronous_commit') = 'off' \
                              THEN set_config('synchronous_commit', 'local', true) END) AS durable",
        location = LOCATION_OF.replace("$oid", "one.tableoid"),
    )
});

impl Backend for PgConnection {
    const NAME: &'static str = "postgres";

    fn run_migrations(&mut self) -> Result<(), Error> {
        MigrationHarness::run_pending_migrations(self, MIGRATIONS)
            .map(|_| ())
            .map_err(Error::Migration)
    }

    fn barrier_schema_present(&mut self) -> QueryResult<bool> {
        // The newest of each kind of object the migrations create.
        let row: BoolRow = diesel::sql_query(
            "SELECT to_regclass('dtb_barriers') IS NOT NULL \
                AND to_regprocedure('dtb_await_barrier(uuid, integer)') IS NOT NULL \
                AND to_regprocedure('dtb_claim_barrier(uuid, text)') IS NOT NULL \
                AND to_regprocedure('dtb_fence()') IS NOT NULL \
                AND EXISTS (SELECT 1 FROM pg_attribute \
                            WHERE attrelid = to_regclass('dtb_barriers') \
                              AND attname = 'retry_due_at' AND NOT attisdropped) AS value",
        )
        .get_result(self)?;
        Ok(row.value)
    }

    fn server_transaction(&mut self, diesel_depth: u32) -> QueryResult<ServerTransaction> {
        if diesel_depth > 0 {
            // Diesel reads libpq's transaction status after every statement and drops its own
            // count to zero when the server has none: a count above zero is the server's too.
            return Ok(ServerTransaction::Open);
        }
        // A `BEGIN` Diesel did not send leaves its count at zero. Ask the server: a setting
        // made local to the current transaction survives into the next statement only if a
        // transaction block holds both. (No single statement can tell: each runs inside a
        // transaction of its own in autocommit too.) A random value rules out a leftover.
        let token = uuid::Uuid::new_v4().simple().to_string();
        diesel::sql_query("SELECT set_config('dtb.transaction_probe', $1, true) AS value")
            .bind::<Text, _>(&token)
            .get_result::<TextRow>(self)?;
        let row: BoolRow = diesel::sql_query(
            "SELECT coalesce(current_setting('dtb.transaction_probe', true) = $1, false) AS value",
        )
        .bind::<Text, _>(&token)
        .get_result(self)?;
        Ok(if row.value {
            ServerTransaction::Open
        } else {
            ServerTransaction::Closed
        })
    }

    fn insert_barriers(&mut self, rows: &[NewBarrier<'_>]) -> QueryResult<Inserted> {
        // One statement:
        // * the rows, stamped with the clock (`now()` would be the transaction's start, which
        //   ages the rows of long transactions before they commit);
        // * a transaction that turned `synchronous_commit` off would release its locks (and so
        //   the waiting worker) before its commit reached the disk: this one is made to flush
        //   locally, so that a handler never runs for a commit that a crash can undo;
        // * which table the row went to, so that a worker reading another one refuses the job
        //   instead of taking the missing row for a rollback.
        let column = |f: fn(&NewBarrier<'_>) -> String| rows.iter().map(f).collect::<Vec<_>>();
        let columns = [
            column(|r| r.id.hyphenated().to_string()),
            column(|r| r.job_id.to_string()),
            column(|r| r.job_kind.to_string()),
            column(|r| r.job_queue.to_string()),
            column(|r| r.payload.to_string()),
            column(|r| r.job_digest.to_string()),
        ];
        let values: Vec<Value<'_>> = columns.iter().map(|c| Value::Texts(c)).collect();
        let inserted: InsertedRow = Prepared::new(&INSERT_BARRIER, &values).get_result(self)?;
        Ok(Inserted {
            txid: inserted.txid.map(|t| t.to_string()),
            location: inserted.location,
        })
    }

    fn remove_barriers(&mut self, ids: &[uuid::Uuid]) -> QueryResult<usize> {
        let ids: Vec<String> = ids.iter().map(|id| id.hyphenated().to_string()).collect();
        Prepared::new(
            "DELETE FROM dtb_barriers WHERE id = ANY($1::uuid[])",
            &[Value::Texts(&ids)],
        )
        .execute(self)
    }

    fn consume_barriers(&mut self, ids: &[uuid::Uuid]) -> QueryResult<usize> {
        // One statement, in autocommit: a transaction of its own, flushed before it returns
        // even where the session turned `synchronous_commit` off (so that its commit proves
        // durable every commit the waiter saw before it began).
        let ids: Vec<String> = ids.iter().map(|id| id.hyphenated().to_string()).collect();
        Prepared::new(
            "DELETE FROM dtb_barriers b \
             USING (SELECT CASE WHEN current_setting('synchronous_commit') = 'off' \
                           THEN set_config('synchronous_commit', 'local', true) END) AS durable \
             WHERE b.id = ANY($1::uuid[])",
            &[Value::Texts(&ids)],
        )
        .execute(self)
    }

    fn barrier_digest(&mut self, id: &uuid::Uuid) -> QueryResult<Option<Option<String>>> {
        let id = id.hyphenated().to_string();
        let row: Option<OptTextRow> = Prepared::new(
            "SELECT job_digest AS value FROM dtb_barriers WHERE id = $1::uuid",
            &[Value::Text(&id)],
        )
        .get_result(self)
        .optional()?;
        Ok(row.map(|r| r.value))
    }

    fn missing_table(&mut self, error: &diesel::result::Error) -> bool {
        // PostgreSQL reports a relation it cannot find (SQLSTATE 42P01, which Diesel does not
        // pass on) with the position of its name in the statement: the insert's target. This
        // needs no query (the failed insert aborted the transaction) and no error text (which
        // the server's language changes).
        let diesel::result::Error::DatabaseError(_, info) = error else {
            return false;
        };
        let target = INSERT_BARRIER
            .find(INSERT_TARGET)
            .map(|at| at + "INSERT INTO ".len());
        match (info.statement_position(), target) {
            (Some(position), Some(target)) => usize::try_from(position) == Ok(target + 1),
            _ => false,
        }
    }

    fn barrier_location(&mut self) -> QueryResult<Option<String>> {
        let row: Option<OptTextRow> = diesel::sql_query(format!(
            "SELECT ({}) AS value",
            LOCATION_OF.replace("$oid", "to_regclass('dtb_barriers')")
        ))
        .get_result(self)
        .optional()?;
        Ok(row.and_then(|r| r.value))
    }

    type Checker = check::ProbeSchedule;

    fn check_pending(
        &mut self,
        schedule: &mut check::ProbeSchedule,
        pending: &[Pending],
    ) -> QueryResult<Checked> {
        check::check_pending(self, schedule, pending)
    }

    // Commit hints wake the waiter at once; the checks are a safety net.
    // Watchers wake the waiter at once for the transactions they watch; the others' barriers
    // are checked 2 ms after their first check, then less and less often, at least every
    // 200 ms (one prepared statement per round, whatever the number of barriers).
    const CHECKS: CheckSchedule = CheckSchedule {
        first: Duration::from_millis(2),
        max: Duration::from_millis(200),
    };

    fn hints() -> Hints<Self> {
        Hints::LockWaits(&hints::ROW_WAITS)
    }

    fn durability() -> Durability<Self> {
        Durability::Proven(&durability::WAL_FLUSH)
    }

    fn worker_transaction<R, E, F>(&mut self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self) -> Result<R, E>,
        E: From<diesel::result::Error>,
    {
        self.build_transaction().read_committed().run(f)
    }

    fn claiming_transaction<R, E, F>(
        &mut self,
        id: &uuid::Uuid,
        digest: &str,
        f: F,
    ) -> Result<Claimed<R>, E>
    where
        F: FnOnce(&mut Self) -> Result<R, E>,
        E: From<diesel::result::Error>,
    {
        claim::claiming_transaction(self, id, digest, f)
    }

    fn claim_barrier(&mut self, id: &uuid::Uuid, digest: &str) -> QueryResult<Claim> {
        claim::claim_barrier(self, id, digest)
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
        let Some(txid) = txid else { return Ok(None) };
        // `pg_xact_status` errors for an id "in the future" (after a crash); report that too.
        let row: QueryResult<OptTextRow> = self.build_transaction().read_committed().run(|c| {
            diesel::sql_query("SELECT pg_xact_status($1::text::xid8)::text AS value")
                .bind::<Text, _>(txid)
                .get_result(c)
        });
        Ok(Some(match row {
            Ok(r) => r.value.unwrap_or_else(|| "unknown".into()),
            Err(e) => format!("unavailable ({e})"),
        }))
    }
}
