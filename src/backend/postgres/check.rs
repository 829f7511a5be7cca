//! The PostgreSQL waiter's check: one statement decides what it can for a whole batch (a
//! visible row is committed), and the conflicting-insert probe (`dtb_await_barrier`) confirms
//! every "not committed", on a schedule that backs off for transactions that look alive.

use super::durability::{lsn, LsnRow, LSNS, SELECT_LSNS};
use super::prepared::{Prepared, Value};
use super::TextRow;
use crate::backend::{Checked, Pending, Verdict};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Nullable, Text};
use std::collections::HashMap;
use std::time::{Duration, Instant};

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
    #[diesel(sql_type = Nullable<Text>)]
    digest: Option<String>,
}

/// The check of a batch (see [`check_pending`]).
static CHECK: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH lsn AS (SELECT {LSNS}) \
         SELECT p.id, (b.id IS NOT NULL) AS visible, b.job_digest AS digest, \
            CASE WHEN p.txid IS NULL OR p.txid < 3 THEN 'unknown' \
                 WHEN p.txid >= pg_snapshot_xmax(pg_current_snapshot())::text::bigint \
                 THEN 'in progress' \
                 ELSE COALESCE(pg_xact_status(p.txid::text::xid8), 'unknown') END AS status, \
            lsn.inserted_lsn, lsn.flushed_lsn \
         FROM unnest($1::text[], $2::bigint[]) AS p(id, txid) \
         CROSS JOIN lsn \
         LEFT JOIN dtb_barriers b ON b.id = p.id::uuid"
    )
});

/// Reads the answer of `dtb_await_barrier`.
pub(super) fn parse_verdict(value: &str) -> QueryResult<Verdict> {
    match value {
        "committed" => Ok(Verdict::Committed),
        "not_committed" => Ok(Verdict::NotCommitted),
        "pending" => Ok(Verdict::Pending),
        other => Err(diesel::result::Error::DeserializationError(
            format!("dtb_await_barrier returned {other:?}").into(),
        )),
    }
}

/// Waits at most 1 ms for the transaction that wrote barrier `id` (hyphenated) to end, inside
/// the caller's READ COMMITTED transaction (under REPEATABLE READ the insert would fail instead
/// of answering).
pub(super) fn probe(conn: &mut PgConnection, id: &str) -> QueryResult<Verdict> {
    let probe: TextRow = diesel::sql_query("SELECT dtb_await_barrier($1::uuid, 1) AS value")
        .bind::<Text, _>(id)
        .get_result(conn)?;
    parse_verdict(&probe.value)
}

/// [`probe`] for each of `ids`, in order, in one statement of a READ COMMITTED transaction of
/// its own.
fn probe_all(conn: &mut PgConnection, ids: &[&str]) -> QueryResult<Vec<Verdict>> {
    let ids: Vec<&str> = ids.to_vec();
    let rows: Vec<TextRow> = conn.build_transaction().read_committed().run(|c| {
        diesel::sql_query(
            "SELECT dtb_await_barrier(p.id::uuid, 1) AS value \
             FROM unnest($1::text[]) WITH ORDINALITY AS p(id, n) ORDER BY p.n",
        )
        .bind::<Array<Text>, _>(&ids)
        .load(c)
    })?;
    rows.iter().map(|r| parse_verdict(&r.value)).collect()
}

/// How soon a pending barrier gets its first authoritative probe even if its transaction looks
/// alive (which catches a savepoint rolled back inside a running transaction). Later probes
/// back off with the barrier's age, to at most [`MAX_PROBE_INTERVAL`].
pub(super) const FIRST_PROBE: Duration = Duration::from_secs(2);
/// The longest pause between two probes of one barrier.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// At most this many barriers of live-looking transactions are probed per check: each probe
/// is a lock wait of up to 1 ms on the waiter's thread.
const MAX_PROBES_PER_CHECK: usize = 8;
/// Live-looking transactions are probed in at most one check this often: what the probes look
/// for (a savepoint rolled back inside a transaction that runs on) can wait a second, and a
/// batch of many barriers waiting on a long transaction should not cost a round trip per check.
const LIVE_PROBE_GAP: Duration = Duration::from_secs(1);
/// A barrier no check has named for this long is forgotten by the schedule.
const FORGET_AFTER: Duration = Duration::from_secs(10);

/// When each pending barrier is due for its next authoritative probe: the waiter's
/// `Backend::Checker` on PostgreSQL.
#[derive(Debug, Default)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct ProbeSchedule {
    pub(super) due: HashMap<uuid::Uuid, Due>,
    /// When live-looking transactions were last probed.
    live_round: Option<Instant>,
}

#[derive(Debug)]
pub(super) struct Due {
    pub(super) since: Instant,
    pub(super) next: Instant,
    pub(super) seen: Instant,
}

impl ProbeSchedule {
    /// Whether barrier `id` is due for a probe now, taking one from `budget` if it is.
    pub(super) fn take(&mut self, id: uuid::Uuid, now: Instant, budget: &mut usize) -> bool {
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
    pub(super) fn probed_running(&mut self, id: &uuid::Uuid, now: Instant) {
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

/// Decides every barrier of `pending` that the database can decide now, without waiting for a
/// running producer (see `docs/design/postgres.md`).
pub(super) fn check_pending(
    conn: &mut PgConnection,
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
    let rows: Vec<CheckRow> = Prepared::new(
        &CHECK,
        &[Value::Texts(&ids), Value::OptionalBigInts(&txids)],
    )
    .load(conn)?;
    let mut durable = rows
        .first()
        .map(|r| (lsn(r.inserted_lsn), lsn(r.flushed_lsn)));
    let by_id: HashMap<String, CheckRow> = rows.into_iter().map(|r| (r.id.clone(), r)).collect();
    let now = Instant::now();
    schedule.forget_unseen(now);
    // Probing a live transaction costs a lock wait: only a few per check, and in one check a
    // second.
    let live_round = schedule
        .live_round
        .is_none_or(|last| now.duration_since(last) >= LIVE_PROBE_GAP);
    let mut budget = if live_round { MAX_PROBES_PER_CHECK } else { 0 };
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
        // conflicting-insert probe may say "not committed". It waits at most 1 ms each.
        let probe_ids: Vec<&str> = to_probe.iter().map(|&i| ids[i].as_str()).collect();
        for (&i, verdict) in to_probe.iter().zip(probe_all(conn, &probe_ids)?) {
            verdicts[i] = verdict;
            probed_committed |= verdict == Verdict::Committed;
        }
        if budget < MAX_PROBES_PER_CHECK {
            schedule.live_round = Some(now);
        }
    }
    if probed_committed {
        // A probe saw a commit after the positions above were read: read them again.
        let now: LsnRow = Prepared::new(&SELECT_LSNS, &[]).get_result(conn)?;
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
    let digests = ids
        .iter()
        .map(|id| by_id.get(id).and_then(|r| r.digest.clone()))
        .collect();
    Ok(Checked {
        verdicts,
        probed,
        position,
        digests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Probes of a long-running producer back off, and at most a few run per check.
    #[test]
    fn probes_back_off_and_are_rationed() {
        let mut schedule = ProbeSchedule::default();
        let start = Instant::now();
        let ids: Vec<uuid::Uuid> = (0..20).map(|_| uuid::Uuid::new_v4()).collect();
        let mut budget = MAX_PROBES_PER_CHECK;
        assert!(ids.iter().all(|id| !schedule.take(*id, start, &mut budget)));
        let later = start + FIRST_PROBE;
        let taken = ids
            .iter()
            .filter(|id| schedule.take(**id, later, &mut budget))
            .count();
        assert_eq!(taken, MAX_PROBES_PER_CHECK);
        schedule.probed_running(&ids[0], later);
        let next = schedule.due[&ids[0]].next;
        assert_eq!(next, later + FIRST_PROBE);
        let much_later = start + Duration::from_secs(600);
        schedule.take(ids[0], much_later, &mut MAX_PROBES_PER_CHECK.clone());
        schedule.probed_running(&ids[0], much_later);
        assert_eq!(schedule.due[&ids[0]].next, much_later + MAX_PROBE_INTERVAL);
        schedule.forget_unseen(much_later);
        assert_eq!(schedule.due.len(), 1, "only the barrier seen last is kept");
    }
}
