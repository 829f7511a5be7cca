//! PostgreSQL: barriers on `PgConnection`.
//!
//! * The producer inserts the barrier row and records its top-level transaction id
//!   (`pg_current_xact_id()`, which is the same inside a savepoint).
//! * The worker waits with `dtb_await_barrier` (see the migration): an `INSERT ... ON CONFLICT
//!   DO NOTHING` of the same id blocks on the producer's row lock until the producer's
//!   transaction (or the savepoint around the enqueue) ends, bounded by `lock_timeout`. The row
//!   itself is the ground truth, never the transaction id's status: ids can be reused after a
//!   crash. A waiter is released only once the producer's commit is flushed to WAL (with the
//!   default `synchronous_commit`), so `Committed` is durable.
//! * Every worker statement runs in an explicit READ COMMITTED transaction, whatever the
//!   database's default isolation: under REPEATABLE READ a conflicting insert fails with a
//!   serialization error instead of answering.

use super::sealed::Backend;
use super::{Claim, NewBarrier, Verdict};
use crate::error::Error;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
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
struct TxidRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    txid: Option<i64>,
}

impl Backend for PgConnection {
    const NAME: &'static str = "postgres";

    fn run_migrations(&mut self) -> Result<(), Error> {
        MigrationHarness::run_pending_migrations(self, MIGRATIONS)
            .map(|_| ())
            .map_err(Error::Migration)
    }

    fn barrier_schema_present(&mut self) -> QueryResult<bool> {
        let row: BoolRow = diesel::sql_query(
            "SELECT to_regclass('dtb_barriers') IS NOT NULL \
                AND to_regprocedure('dtb_await_barrier(uuid, integer)') IS NOT NULL AS value",
        )
        .get_result(self)?;
        Ok(row.value)
    }

    fn insert_barrier(&mut self, row: &NewBarrier<'_>) -> QueryResult<Option<String>> {
        let inserted: TxidRow = diesel::sql_query(
            "INSERT INTO dtb_barriers (id, txid, job_id, job_kind, job_queue, payload) \
             VALUES ($1::uuid, pg_current_xact_id()::text::bigint, $2, $3, $4, $5) \
             RETURNING txid",
        )
        .bind::<Text, _>(row.id.hyphenated().to_string())
        .bind::<Text, _>(row.job_id)
        .bind::<Text, _>(row.job_kind)
        .bind::<Text, _>(row.job_queue)
        .bind::<Text, _>(row.payload)
        .get_result(self)?;
        Ok(inserted.txid.map(|t| t.to_string()))
    }

    fn await_verdict(&mut self, id: &uuid::Uuid, limit: Duration) -> QueryResult<Verdict> {
        let id = id.hyphenated().to_string();
        let ms = super::millis(limit);
        let row: TextRow = self.build_transaction().read_committed().run(|c| {
            diesel::sql_query("SELECT dtb_await_barrier($1::uuid, $2) AS value")
                .bind::<Text, _>(&id)
                .bind::<Integer, _>(ms)
                .get_result(c)
        })?;
        match row.value.as_str() {
            "committed" => Ok(Verdict::Committed),
            "not_committed" => Ok(Verdict::NotCommitted),
            "pending" => Ok(Verdict::Pending),
            other => Err(diesel::result::Error::DeserializationError(
                format!("dtb_await_barrier returned {other:?}").into(),
            )),
        }
    }

    fn worker_transaction<R, E, F>(&mut self, f: F) -> Result<R, E>
    where
        F: FnOnce(&mut Self) -> Result<R, E>,
        E: From<diesel::result::Error>,
    {
        self.build_transaction().read_committed().run(f)
    }

    fn claim_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<Claim> {
        let id = id.hyphenated().to_string();
        // SKIP LOCKED never waits and never errors: a row held by a concurrent duplicate simply
        // does not come back, and a second, non-locking read tells "held" from "gone".
        let locked: Option<TextRow> = diesel::sql_query(
            "SELECT id::text AS value FROM dtb_barriers WHERE id = $1::uuid FOR UPDATE SKIP LOCKED",
        )
        .bind::<Text, _>(&id)
        .get_result(self)
        .optional()?;
        if locked.is_some() {
            return Ok(Claim::Locked);
        }
        let exists: BoolRow = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM dtb_barriers WHERE id = $1::uuid) AS value",
        )
        .bind::<Text, _>(&id)
        .get_result(self)?;
        Ok(if exists.value { Claim::Busy } else { Claim::Gone })
    }

    fn delete_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        diesel::sql_query("DELETE FROM dtb_barriers WHERE id = $1::uuid")
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(self)?;
        Ok(())
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
