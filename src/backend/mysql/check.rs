//! The MySQL waiter's check: which pending barriers committed (durably), which rolled back,
//! which are still running — from the rows alone, without waiting for a lock.

use super::schema::dtb_barriers;
use super::{in_transaction, read_committed, BEGIN_READ_UNCOMMITTED, IN_LIST_MAX};
use crate::backend::{Checked, Pending, Verdict};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
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
    // 2. Take the committed rows that nobody holds (a worker running the handler of
    //    another delivery may hold one; the locking read skips it without waiting) and
    //    fence them: the commit makes "committed" durable.
    let taken: HashSet<String> = if visible.is_empty() {
        HashSet::new()
    } else {
        read_committed(conn, |c| {
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
        in_transaction(conn, BEGIN_READ_UNCOMMITTED, |c| existing(c, &rest))?
    };
    // 4. For the rows step 3 did not find: is there a committed version now, after step 3?
    let absent: Vec<&String> = rest.into_iter().filter(|k| !exist.contains(*k)).collect();
    let still_visible: HashSet<String> = if absent.is_empty() {
        HashSet::new()
    } else {
        existing(conn, &absent)?
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
pub(super) fn fence(conn: &mut MysqlConnection, keys: &[String]) -> QueryResult<usize> {
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
