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

use super::rows::{ReapedRow, UnconsumedRow};
use super::sealed::Backend;
use super::{Claim, NewBarrier, Pending, ReapedBarrier, Unconsumed, Verdict};
use crate::error::Error;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Integer, Nullable, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::time::Duration;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// The `NOTIFY` channel of commit hints.
const CHANNEL: &str = "dtb_barriers";

#[derive(QueryableByName)]
struct CheckRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Bool)]
    visible: bool,
    #[diesel(sql_type = Text)]
    status: String,
}

fn parse_verdict(value: &str) -> QueryResult<Verdict> {
    match value {
        "committed" => Ok(Verdict::Committed),
        "not_committed" => Ok(Verdict::NotCommitted),
        "pending" => Ok(Verdict::Pending),
        other => Err(diesel::result::Error::DeserializationError(
            format!("dtb_await_barrier returned {other:?}").into(),
        )),
    }
}

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
        // The NOTIFY is part of the transaction: delivered to the workers' listeners only when
        // it commits, never on rollback (nor from a rolled-back savepoint).
        let inserted: TxidRow = diesel::sql_query(
            "WITH ins AS ( \
                 INSERT INTO dtb_barriers (id, txid, job_id, job_kind, job_queue, payload) \
                 VALUES ($1::uuid, pg_current_xact_id()::text::bigint, $2, $3, $4, $5) \
                 RETURNING id, txid) \
             SELECT ins.txid FROM ins, LATERAL (SELECT pg_notify('dtb_barriers', ins.id::text)) AS n",
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
        parse_verdict(&row.value)
    }

    const HAS_HINTS: bool = true;
    const HINT_POLL: Duration = Duration::from_micros(500);

    fn listen_for_commits(&mut self) -> QueryResult<()> {
        diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(self)?;
        Ok(())
    }

    fn stop_listening(&mut self) -> QueryResult<()> {
        diesel::sql_query(format!("UNLISTEN {CHANNEL}")).execute(self)?;
        Ok(())
    }

    fn take_commit_hints(&mut self) -> QueryResult<Vec<uuid::Uuid>> {
        // Reads what the server already sent to this idle connection: no query, no round trip.
        let mut ids = Vec::new();
        for n in self.notifications_iter() {
            let n = n?;
            if n.channel == CHANNEL {
                if let Ok(id) = uuid::Uuid::try_parse(&n.payload) {
                    ids.push(id);
                }
            }
        }
        Ok(ids)
    }

    fn check_pending(&mut self, pending: &[Pending]) -> QueryResult<Vec<Verdict>> {
        let ids: Vec<String> = pending
            .iter()
            .map(|p| p.id.hyphenated().to_string())
            .collect();
        let txids: Vec<Option<i64>> = pending
            .iter()
            .map(|p| p.txid.as_deref().and_then(|t| t.parse().ok()))
            .collect();
        // One statement for the whole batch: is the row visible, and has the producer's
        // transaction ended? A single statement sees one fresh snapshot whatever the isolation
        // level, so it needs no transaction of its own. The transaction id comes from the job
        // and is only a hint for when to probe: an id the server has not assigned yet (a forged
        // one, or one from before a crash) must not reach pg_xact_status, which would fail the
        // whole batch.
        let rows: Vec<CheckRow> = diesel::sql_query(
            "SELECT p.id, (b.id IS NOT NULL) AS visible, \
                CASE WHEN p.txid IS NULL OR p.txid < 3 \
                       OR p.txid >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint \
                     THEN 'unknown' \
                     ELSE COALESCE(pg_xact_status(p.txid::text::xid8), 'unknown') END AS status \
             FROM unnest($1::text[], $2::bigint[]) AS p(id, txid) \
             LEFT JOIN dtb_barriers b ON b.id = p.id::uuid",
        )
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<Nullable<BigInt>>, _>(&txids)
        .load(self)?;
        let by_id: std::collections::HashMap<String, CheckRow> =
            rows.into_iter().map(|r| (r.id.clone(), r)).collect();
        let mut verdicts = Vec::with_capacity(pending.len());
        let mut to_probe = Vec::new();
        for (i, (p, id)) in pending.iter().zip(&ids).enumerate() {
            match by_id.get(id) {
                None => verdicts.push(Verdict::Pending),
                Some(row) if row.visible => verdicts.push(Verdict::Committed),
                Some(row) if row.status == "in progress" && !p.probe => {
                    verdicts.push(Verdict::Pending)
                }
                Some(_) => {
                    verdicts.push(Verdict::Pending);
                    to_probe.push(i);
                }
            }
        }
        if !to_probe.is_empty() {
            // The transaction has ended (or it is time to look closer): only the
            // conflicting-insert probe may say "not committed". It waits at most 1 ms, in READ
            // COMMITTED (under REPEATABLE READ the insert would fail instead of answering).
            self.build_transaction().read_committed().run(|c| {
                for i in to_probe {
                    let probe: TextRow =
                        diesel::sql_query("SELECT dtb_await_barrier($1::uuid, 1) AS value")
                            .bind::<Text, _>(&ids[i])
                            .get_result(c)?;
                    verdicts[i] = parse_verdict(&probe.value)?;
                }
                Ok::<_, diesel::result::Error>(())
            })?;
        }
        Ok(verdicts)
    }

    fn mark_attempted(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        diesel::sql_query("UPDATE dtb_barriers SET attempted_at = now() WHERE id = $1::uuid")
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(self)?;
        Ok(())
    }

    fn take_unconsumed(
        &mut self,
        grace: Duration,
        max_age: Duration,
        limit: i64,
    ) -> QueryResult<Vec<Unconsumed>> {
        // SKIP LOCKED passes over rows a worker is consuming right now.
        let rows: Vec<UnconsumedRow> = diesel::sql_query(
            "UPDATE dtb_barriers SET pushed_at = now() WHERE id IN ( \
                 SELECT id FROM dtb_barriers \
                 WHERE attempted_at IS NULL \
                   AND pushed_at < now() - make_interval(secs => $1) \
                   AND created_at > now() - make_interval(secs => $2) \
                 ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING id::text AS id, txid, payload",
        )
        .bind::<Double, _>(grace.as_secs_f64())
        .bind::<Double, _>(max_age.as_secs_f64())
        .bind::<BigInt, _>(limit)
        .load(self)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    fn reap(&mut self, older_than: Duration) -> QueryResult<Vec<ReapedBarrier>> {
        let rows: Vec<ReapedRow> = diesel::sql_query(
            "DELETE FROM dtb_barriers WHERE created_at < now() - make_interval(secs => $1) \
             RETURNING id::text AS id, job_id, job_kind",
        )
        .bind::<Double, _>(older_than.as_secs_f64())
        .load(self)?;
        Ok(rows.into_iter().map(Into::into).collect())
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
        // Lock and delete in one statement: committing the worker transaction consumes the
        // barrier, rolling it back (handler error, panic, lost connection) restores it. SKIP
        // LOCKED never waits and never errors: a row held by a concurrent duplicate simply does
        // not come back, and a second, non-locking read tells "held" from "gone".
        let claimed: Option<TextRow> = diesel::sql_query(
            "WITH c AS (SELECT id FROM dtb_barriers WHERE id = $1::uuid FOR UPDATE SKIP LOCKED) \
             DELETE FROM dtb_barriers b USING c WHERE b.id = c.id RETURNING b.id::text AS value",
        )
        .bind::<Text, _>(&id)
        .get_result(self)
        .optional()?;
        if claimed.is_some() {
            return Ok(Claim::Locked);
        }
        let exists: BoolRow = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM dtb_barriers WHERE id = $1::uuid) AS value",
        )
        .bind::<Text, _>(&id)
        .get_result(self)?;
        Ok(if exists.value {
            Claim::Busy
        } else {
            Claim::Gone
        })
    }

    fn delete_barrier(&mut self, _id: &uuid::Uuid) -> QueryResult<()> {
        // `claim_barrier` already deleted it inside this transaction.
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
