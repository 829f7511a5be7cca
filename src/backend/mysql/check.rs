//! The MySQL waiter's check: which pending barriers committed, which rolled back, which are
//! still running — from the rows alone, without waiting for a lock — and the fence that makes
//! a commit it saw durable.

use super::schema::dtb_barriers;
use super::{in_transaction, read_committed, IN_LIST_MAX, SET_READ_UNCOMMITTED};
use crate::backend::{Checked, Pending, Verdict};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use std::collections::HashSet;

/// Decides every pending barrier without waiting for any lock (see `docs/design/mysql.md`).
pub(super) fn check_pending(
    conn: &mut MysqlConnection,
    pending: &[Pending],
) -> QueryResult<Checked> {
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
    let visible = existing(conn, &all)?;
    // 3. For the others: which rows exist at all, committed or not. READ UNCOMMITTED sees
    //    a running producer's insert; a rolled-back insert (or savepoint) and a committed
    //    delete leave nothing; so does a delete not yet committed, which step 4 makes up
    //    for.
    let rest: Vec<&String> = keys.iter().filter(|k| !visible.contains(*k)).collect();
    let exist: HashSet<String> = if rest.is_empty() {
        HashSet::new()
    } else {
        in_transaction(conn, SET_READ_UNCOMMITTED, |c| existing(c, &rest))?
    };
    // 4. For the rows step 3 did not find: is there a committed version now, after step 3?
    let absent: Vec<&String> = rest.into_iter().filter(|k| !exist.contains(*k)).collect();
    let still_visible: HashSet<String> = if absent.is_empty() {
        HashSet::new()
    } else {
        existing(conn, &absent)?
    };
    // Visible: committed, durable once a write of the worker's own begun after this check has
    // committed (`fence`). Not committed: no version at all in step 3 and no committed one in
    // the later step 4 — a row without any version cannot come back, except by the undoing of
    // a delete, which step 4 would have seen. Anything else is still running.
    Ok(keys
        .iter()
        .map(|k| {
            if visible.contains(k) {
                Verdict::Visible
            } else if exist.contains(k) || still_visible.contains(k) {
                Verdict::Pending
            } else {
                Verdict::NotCommitted
            }
        })
        .collect::<Vec<_>>()
        .into())
}

/// The durability fence: a write of the worker's own, committed, which proves that every
/// commit the worker saw before the fence began is durable.
///
/// Why:
///
/// 1. A producer's commit writes its commit record to the redo log buffer, at some log
///    sequence number L, *before* InnoDB releases the producer's row locks and before the
///    transaction becomes visible to new read views; only then is the log flushed up to L
///    (with `innodb_flush_log_at_trx_commit = 1`). In the gap between the two the row is
///    already visible, and a crash would erase the commit.
/// 2. So once the worker has seen the row (a read that began after the producer's
///    transaction became visible), L had been assigned. A write the worker makes afterwards
///    gets a later position in the log, and so does its commit record — if the write changes
///    something: an update that changes nothing writes no redo and would prove nothing.
/// 3. The redo log is written and flushed in order, and with
///    `innodb_flush_log_at_trx_commit = 1` a `COMMIT` returns only once the log is flushed
///    past its own commit record — hence past L. (With the binary log on, commits are also
///    ordered through it, and `sync_binlog = 1` gives the same prefix argument for it.)
///
/// Any committed write of the worker's that began after the check proves it, and the worker
/// uses the commits of its handlers' transactions (each deleted a barrier row) as such proofs
/// while they come; this explicit fence is for when none does. It writes
/// `attempts = attempts + 1` on one of the rows `visible` that nobody holds (taken with
/// `FOR UPDATE SKIP LOCKED`, so it never waits for a handler that holds one), and it commits.
/// It wrote nothing when every row was held: those rows' handlers, committing, will prove
/// them.
pub(super) fn fence(conn: &mut MysqlConnection, visible: &[uuid::Uuid]) -> QueryResult<bool> {
    let keys: Vec<String> = visible
        .iter()
        .map(|id| id.hyphenated().to_string())
        .collect();
    read_committed(conn, |c| {
        let mut wrote = false;
        for chunk in keys.chunks(IN_LIST_MAX) {
            // Through the primary key only: a locking read planned as an index scan (which the
            // optimizer picks for small tables) would lock, for a moment, every row it passes,
            // and handlers claiming those rows would skip them as held.
            let list = vec!["?"; chunk.len()].join(", ");
            let mut take = diesel::sql_query(format!(
                "SELECT id AS value FROM dtb_barriers FORCE INDEX (PRIMARY) \
                 WHERE id IN ({list}) LIMIT 1 FOR UPDATE SKIP LOCKED"
            ))
            .into_boxed();
            for key in chunk {
                take = take.bind::<Text, _>(key.as_str());
            }
            let taken: Vec<IdRow> = take.load(c)?;
            // One changed row is enough: any write of the worker's proves every commit seen
            // before it (one primary-key update, for the same reason as above).
            if let Some(row) = taken.first() {
                let updated = diesel::sql_query(
                    "UPDATE dtb_barriers SET attempts = attempts + 1 WHERE id = ?",
                )
                .bind::<Text, _>(&row.value)
                .execute(c)?;
                wrote = updated > 0;
                break;
            }
        }
        Ok(wrote)
    })
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Text)]
    value: String,
}

/// Which of the barrier rows `keys` (distinct ids) this connection's next read sees (a plain,
/// non-locking read), in chunks of at most [`IN_LIST_MAX`] ids. A chunk is counted first, and
/// its ids are read only when some but not all of them are there: while jobs wait, the usual
/// answers are "all" (they exist) and "none" (none committed), one small row each.
pub(super) fn existing(
    conn: &mut MysqlConnection,
    keys: &[&String],
) -> QueryResult<HashSet<String>> {
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
