//! PostgreSQL: barriers on `PgConnection` (cargo feature `postgres`).
//!
//! The producer inserts the barrier row and `NOTIFY`s its id; the worker's waiter treats the
//! notification as a hint, decides from the row (visible: committed) and, once the producer's
//! transaction looks over (or its probe is due), from the lock wait of a conflicting insert in
//! `dtb_await_barrier` (see the migration), which ends exactly when the producer's transaction
//! or savepoint does. Why, and what it rests on: `docs/design/postgres.md`.

use super::rows::{ReapedRow, UnconsumedRow};
use super::sealed::Backend;
use super::{
    Checked, Claim, Claimed, Inserted, NewBarrier, Pending, ReapedBarrier, ServerTransaction,
    Unconsumed, Verdict,
};
use crate::error::Error;
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable, Text};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use std::collections::HashMap;
use std::time::{Duration, Instant};

mod inspect;

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
    #[diesel(sql_type = BigInt)]
    inserted_lsn: i64,
    #[diesel(sql_type = BigInt)]
    flushed_lsn: i64,
}

#[derive(QueryableByName)]
struct LsnRow {
    #[diesel(sql_type = BigInt)]
    inserted_lsn: i64,
    #[diesel(sql_type = BigInt)]
    flushed_lsn: i64,
}

/// The WAL's insert and flush positions now, as byte offsets.
const LSNS: &str = "(pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint AS inserted_lsn, \
                    (pg_current_wal_flush_lsn() - '0/0'::pg_lsn)::bigint AS flushed_lsn";

/// A WAL position read from the server (never negative: it counts bytes from zero).
fn lsn(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
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

/// How soon a pending barrier gets its first authoritative probe even if its transaction looks
/// alive (which catches a savepoint rolled back inside a running transaction). Later probes
/// back off with the barrier's age, to at most [`MAX_PROBE_INTERVAL`].
const FIRST_PROBE: Duration = Duration::from_secs(2);
/// The longest pause between two probes of one barrier.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// At most this many barriers of live-looking transactions are probed per check: each probe
/// is a lock wait of up to 1 ms on the waiter's thread.
const MAX_PROBES_PER_CHECK: usize = 8;
/// A barrier no check has named for this long is forgotten by the schedule.
const FORGET_AFTER: Duration = Duration::from_secs(10);

/// When each pending barrier is due for its next authoritative probe: the waiter's
/// [`Backend::Checker`] on PostgreSQL.
#[derive(Debug, Default)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct ProbeSchedule {
    due: HashMap<uuid::Uuid, Due>,
}

#[derive(Debug)]
struct Due {
    since: Instant,
    next: Instant,
    seen: Instant,
}

impl ProbeSchedule {
    /// Whether barrier `id` is due for a probe now, taking one from `budget` if it is.
    fn take(&mut self, id: uuid::Uuid, now: Instant, budget: &mut usize) -> bool {
        let due = self.due.entry(id).or_insert(Due {
            since: now,
            next: now + FIRST_PROBE,
            seen: now,
        });
        due.seen = now;
        let take = *budget > 0 && now >= due.next;
        *budget -= usize::from(take);
        take
    }

    /// After a probe that found `id` still running: probe it less and less often.
    fn probed_running(&mut self, id: &uuid::Uuid, now: Instant) {
        if let Some(due) = self.due.get_mut(id) {
            let age = now.duration_since(due.since).max(FIRST_PROBE);
            due.next = now + age.min(MAX_PROBE_INTERVAL);
        }
    }

    fn forget(&mut self, id: &uuid::Uuid) {
        self.due.remove(id);
    }

    fn forget_unseen(&mut self, now: Instant) {
        self.due
            .retain(|_, due| now.duration_since(due.seen) < FORGET_AFTER);
    }
}

/// Where `dtb_barriers` appears in [`INSERT_BARRIER`] as the insert's target.
const INSERT_TARGET: &str = "INSERT INTO dtb_barriers ";

/// The producer's statement (see [`Backend::insert_barrier`] below).
static INSERT_BARRIER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH ins AS ( \
             {INSERT_TARGET}(id, created_at, pushed_at, txid, job_id, job_kind, job_queue, payload, \
                             job_digest) \
             SELECT $1::uuid, t.now, t.now, pg_current_xact_id()::text::bigint, $2, $3, $4, $5, $6 \
             FROM (SELECT clock_timestamp() AS now) AS t \
             RETURNING id, txid, tableoid) \
         SELECT ins.txid, ({location}) AS location \
         FROM ins, \
              LATERAL (SELECT pg_notify('dtb_barriers', ins.id::text)) AS notified, \
              LATERAL (SELECT CASE WHEN current_setting('synchronous_commit') = 'off' \
                              THEN set_config('synchronous_commit', 'local', true) END) AS durable",
        location = LOCATION_OF.replace("$oid", "ins.tableoid"),
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

    fn insert_barrier(&mut self, row: &NewBarrier<'_>) -> QueryResult<Inserted> {
        // One statement:
        // * the row, stamped with the clock (`now()` would be the transaction's start, which
        //   ages the rows of long transactions before they commit);
        // * a NOTIFY, part of the transaction: delivered to the workers' listeners only when
        //   it commits, never on rollback (nor from a rolled-back savepoint) — a hint to look,
        //   never a verdict;
        // * a transaction that turned `synchronous_commit` off would release its locks (and so
        //   the waiting worker) before its commit reached the disk: this one is made to flush
        //   locally, so that a handler never runs for a commit that a crash can undo;
        // * which table the row went to, so that a worker reading another one refuses the job
        //   instead of taking the missing row for a rollback.
        let inserted: InsertedRow = row
            .bind_to(diesel::sql_query(&*INSERT_BARRIER))
            .get_result(self)?;
        Ok(Inserted {
            txid: inserted.txid.map(|t| t.to_string()),
            location: inserted.location,
        })
    }

    fn remove_barrier(&mut self, id: &uuid::Uuid) -> QueryResult<()> {
        diesel::sql_query("DELETE FROM dtb_barriers WHERE id = $1::uuid")
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(self)?;
        Ok(())
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

    type Checker = ProbeSchedule;

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

    fn shares_sessions(&mut self, other: &mut Self) -> QueryResult<bool> {
        // A session-level setting with a random value: no other session can see it, unless a
        // pooler lends this server session to the other client too (PgBouncer lends the one it
        // got back last first). The setting stays with the session: a custom one, of no use to
        // anyone.
        let token = uuid::Uuid::new_v4().simple().to_string();
        diesel::sql_query("SELECT set_config('dtb.session_probe', $1, false) AS value")
            .bind::<Text, _>(&token)
            .get_result::<TextRow>(self)?;
        let seen: BoolRow = diesel::sql_query(
            "SELECT coalesce(current_setting('dtb.session_probe', true) = $1, false) AS value",
        )
        .bind::<Text, _>(&token)
        .get_result(other)?;
        Ok(seen.value)
    }

    fn send_test_hint(&mut self, id: &uuid::Uuid) -> QueryResult<bool> {
        // A notification like a producer's, for a barrier nobody waits for: every listener
        // of the database hears it and drops it; the waiter that sent it learns that its
        // listener hears hints.
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(CHANNEL)
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(self)?;
        Ok(true)
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

    fn check_pending(
        &mut self,
        schedule: &mut ProbeSchedule,
        pending: &[Pending],
    ) -> QueryResult<Checked> {
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
        // whole batch. The snapshot's xmax is the latest completed id + 1, not the next id to
        // be handed out: a running producer's id may equal it (or exceed it, once later ids
        // are assigned but none completed), so ids from xmax on count as running, and only
        // the probe schedule looks closer at them.
        //
        // A visible row's commit record precedes, in the WAL, the insert position read after
        // the row became visible (read here, after the statement's snapshot). When the flush
        // position has reached it, the commit is durable; when not (a producer that turned
        // `synchronous_commit` off after its enqueue: its commit is visible before it is
        // flushed), the row is only *visible*, and the waiter waits for the flush, or fences.
        let rows: Vec<CheckRow> = diesel::sql_query(format!(
            "WITH lsn AS (SELECT {LSNS}) \
             SELECT p.id, (b.id IS NOT NULL) AS visible, \
                CASE WHEN p.txid IS NULL OR p.txid < 3 THEN 'unknown' \
                     WHEN p.txid >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint \
                     THEN 'in progress' \
                     ELSE COALESCE(pg_xact_status(p.txid::text::xid8), 'unknown') END AS status, \
                lsn.inserted_lsn, lsn.flushed_lsn \
             FROM unnest($1::text[], $2::bigint[]) AS p(id, txid) \
             CROSS JOIN lsn \
             LEFT JOIN dtb_barriers b ON b.id = p.id::uuid",
        ))
        .bind::<Array<Text>, _>(&ids)
        .bind::<Array<Nullable<BigInt>>, _>(&txids)
        .load(self)?;
        let mut durable = rows
            .first()
            .map(|r| (lsn(r.inserted_lsn), lsn(r.flushed_lsn)));
        let by_id: HashMap<String, CheckRow> =
            rows.into_iter().map(|r| (r.id.clone(), r)).collect();
        let now = Instant::now();
        schedule.forget_unseen(now);
        // Probing a live transaction costs a lock wait: only a few per check.
        let mut budget = MAX_PROBES_PER_CHECK;
        let mut verdicts = Vec::with_capacity(pending.len());
        let mut to_probe = Vec::new();
        for (i, (p, id)) in pending.iter().zip(&ids).enumerate() {
            let due = schedule.take(p.id, now, &mut budget);
            match by_id.get(id) {
                None => verdicts.push(Verdict::Pending),
                Some(row) if row.visible => verdicts.push(Verdict::Committed),
                Some(row) if row.status == "in progress" && !due => verdicts.push(Verdict::Pending),
                Some(_) => {
                    verdicts.push(Verdict::Pending);
                    to_probe.push(i);
                }
            }
        }
        let probed = to_probe.len();
        let mut probed_committed = false;
        if !to_probe.is_empty() {
            // The transaction has ended (or it is time to look closer): only the
            // conflicting-insert probe may say "not committed". It waits at most 1 ms, in READ
            // COMMITTED (under REPEATABLE READ the insert would fail instead of answering).
            self.build_transaction().read_committed().run(|c| {
                for &i in &to_probe {
                    let probe: TextRow =
                        diesel::sql_query("SELECT dtb_await_barrier($1::uuid, 1) AS value")
                            .bind::<Text, _>(&ids[i])
                            .get_result(c)?;
                    verdicts[i] = parse_verdict(&probe.value)?;
                    probed_committed |= verdicts[i] == Verdict::Committed;
                }
                Ok::<_, diesel::result::Error>(())
            })?;
        }
        if probed_committed {
            // A probe saw a commit after the positions above were read: read them again.
            let now: LsnRow = diesel::sql_query(format!("SELECT {LSNS}")).get_result(self)?;
            durable = Some((lsn(now.inserted_lsn), lsn(now.flushed_lsn)));
        }
        // Committed means durable: a commit seen before the WAL was flushed past the position
        // read after it is only visible.
        let mut position = None;
        if let Some((inserted, flushed)) = durable {
            if flushed < inserted {
                for verdict in verdicts.iter_mut() {
                    if *verdict == Verdict::Committed {
                        *verdict = Verdict::Visible;
                        position = Some(inserted);
                    }
                }
            }
        }
        for &i in &to_probe {
            if verdicts[i] == Verdict::Pending {
                schedule.probed_running(&pending[i].id, now);
            }
        }
        for (p, verdict) in pending.iter().zip(&verdicts) {
            if *verdict != Verdict::Pending {
                schedule.forget(&p.id);
            }
        }
        Ok(Checked {
            verdicts,
            probed,
            position,
        })
    }

    fn flushed_position(&mut self) -> QueryResult<Option<u64>> {
        let now: LsnRow = diesel::sql_query(format!("SELECT {LSNS}")).get_result(self)?;
        Ok(Some(lsn(now.flushed_lsn)))
    }

    fn fence(&mut self, _visible: &[uuid::Uuid]) -> QueryResult<bool> {
        // One round trip (the simple query protocol runs the whole batch): a write of the
        // worker's own, committed with a local flush (`dtb_fence` sets it), so the WAL is
        // durable past every commit seen before it began. Nothing of it stays.
        let fenced =
            self.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED; SELECT dtb_fence(); COMMIT");
        if let Err(e) = fenced {
            // A failed statement skips the rest of the batch and leaves the server inside an
            // aborted transaction that Diesel does not count: the pool must not hand this
            // connection out again.
            super::poison(self);
            return Err(e);
        }
        Ok(true)
    }

    fn mark_attempted(&mut self, id: &uuid::Uuid, retry_due: Option<Duration>) -> QueryResult<()> {
        diesel::sql_query(
            "UPDATE dtb_barriers SET attempted_at = now(), \
                 retry_due_at = now() + make_interval(secs => $2) \
             WHERE id = $1::uuid",
        )
        .bind::<Text, _>(id.hyphenated().to_string())
        .bind::<Nullable<Double>, _>(retry_due.map(|d| super::bounded_age(d).as_secs_f64()))
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
            "UPDATE dtb_barriers SET pushed_at = now(), attempted_at = NULL, retry_due_at = NULL \
             WHERE id IN ( \
                 SELECT id FROM dtb_barriers \
                 WHERE ((attempted_at IS NULL AND pushed_at < now() - make_interval(secs => $1)) \
                        OR retry_due_at < now() - make_interval(secs => $1)) \
                   AND created_at > now() - make_interval(secs => $2) \
                 ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING id::text AS id, txid, payload",
        )
        .bind::<Double, _>(super::bounded_age(grace).as_secs_f64())
        .bind::<Double, _>(super::bounded_age(max_age).as_secs_f64())
        .bind::<BigInt, _>(limit)
        .load(self)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    fn reap(&mut self, older_than: Duration) -> QueryResult<Vec<ReapedBarrier>> {
        let rows: Vec<ReapedRow> = diesel::sql_query(
            "DELETE FROM dtb_barriers WHERE created_at < now() - make_interval(secs => $1) \
             RETURNING id::text AS id, job_id, job_kind",
        )
        .bind::<Double, _>(super::bounded_age(older_than).as_secs_f64())
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
        // BEGIN and the claim in one round trip (the simple query protocol runs both, and the
        // transaction block stays open). The id is a UUID this crate formats, and the digest
        // hexadecimal digits the worker computed, not text from the job (anything else takes
        // the slow way). When the claim raises (the barrier is busy, gone, not committed or
        // another job's), the transaction is left aborted: roll it back and find out which,
        // the slow way.
        if digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            let begin = format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; SELECT dtb_claim_barrier('{}', '{digest}')",
                id.hyphenated()
            );
            if AnsiTransactionManager::begin_transaction_sql(self, &begin).is_ok() {
                return finish_transaction(self, f).map(Claimed::Ran);
            }
            self.batch_execute("ROLLBACK")?;
        }
        self.worker_transaction(|c| super::claim_then(c, id, digest, f))
    }

    fn claim_barrier(&mut self, id: &uuid::Uuid, digest: &str) -> QueryResult<Claim> {
        let id = id.hyphenated().to_string();
        // Lock and delete in one statement: committing the worker transaction consumes the
        // barrier, rolling it back (handler error, panic, lost connection) restores it. SKIP
        // LOCKED never waits and never errors: a row held by a concurrent duplicate simply does
        // not come back, and a second, non-locking read tells "held" from "gone". A row of
        // another job is locked but not deleted: the rollback that follows lets it go.
        let claimed: Option<TextRow> = diesel::sql_query(
            "WITH c AS (SELECT id, job_digest FROM dtb_barriers WHERE id = $1::uuid \
                        FOR UPDATE SKIP LOCKED) \
             DELETE FROM dtb_barriers b USING c \
             WHERE b.id = c.id AND (c.job_digest IS NULL OR c.job_digest = $2) \
             RETURNING b.id::text AS value",
        )
        .bind::<Text, _>(&id)
        .bind::<Text, _>(digest)
        .get_result(self)
        .optional()?;
        if claimed.is_some() {
            return Ok(Claim::Locked);
        }
        let row: Option<OptTextRow> =
            diesel::sql_query("SELECT job_digest AS value FROM dtb_barriers WHERE id = $1::uuid")
                .bind::<Text, _>(&id)
                .get_result(self)
                .optional()?;
        if let Some(row) = row {
            return Ok(match row.value {
                Some(theirs) if theirs != digest => Claim::Foreign,
                _ => Claim::Busy,
            });
        }
        // Not visible: consumed by an earlier delivery — or not committed yet, which the waiter
        // never answers "committed" for, but a verdict this final is confirmed by the row's
        // lock itself: a running producer's uncommitted row makes the probe wait (1 ms).
        let probe: TextRow = diesel::sql_query("SELECT dtb_await_barrier($1::uuid, 1) AS value")
            .bind::<Text, _>(&id)
            .get_result(self)?;
        Ok(match parse_verdict(&probe.value)? {
            Verdict::NotCommitted => Claim::Gone,
            // Still running, or committed just now: look again later.
            Verdict::Pending | Verdict::Committed | Verdict::Visible => Claim::Busy,
        })
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

/// Runs `f` in the transaction just begun on `conn` (with
/// `AnsiTransactionManager::begin_transaction_sql`), then commits it when `f` returns `Ok` and
/// rolls it back otherwise, as Diesel's own `transaction` does.
fn finish_transaction<R, E, F>(conn: &mut PgConnection, f: F) -> Result<R, E>
where
    F: FnOnce(&mut PgConnection) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    type Manager = AnsiTransactionManager;
    match f(conn) {
        Ok(value) => {
            <Manager as TransactionManager<PgConnection>>::commit_transaction(conn)?;
            Ok(value)
        }
        Err(error) => {
            match <Manager as TransactionManager<PgConnection>>::rollback_transaction(conn) {
                Ok(()) | Err(diesel::result::Error::BrokenTransactionManager) => Err(error),
                Err(rollback_error) => Err(rollback_error.into()),
            }
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests;
