//! What the reconciler and the reaper do to SQLite's barrier table, and the mark a failed
//! handler leaves. Each holds the write lock while it writes, as a handler does.

use super::locks::{millis, with_busy_timeout};
use super::{TextRow, WRITE_LOCK_WAIT};
use crate::backend::rows::{ReapedRow, UnconsumedRow};
use crate::backend::{bounded_age, ReapedBarrier, Unconsumed};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use std::time::Duration;

/// See `Backend::mark_attempted`.
pub(super) fn mark_attempted(
    conn: &mut SqliteConnection,
    id: &uuid::Uuid,
    retry_due: Option<Duration>,
) -> QueryResult<()> {
    with_busy_timeout(
        conn,
        |previous| previous.max(millis(WRITE_LOCK_WAIT)),
        |c| {
            diesel::sql_query(
                "UPDATE dtb_barriers SET attempted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), \
                     retry_due_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) \
                 WHERE id = ?",
            )
            .bind::<Nullable<Text>, _>(retry_due.map(seconds_ahead))
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(c)
            .map(|_| ())
        },
    )
}

/// See `Backend::take_unconsumed`.
pub(super) fn take_unconsumed(
    conn: &mut SqliteConnection,
    grace: Duration,
    max_age: Duration,
    limit: i64,
) -> QueryResult<Vec<Unconsumed>> {
    // Inside `worker_transaction`: this connection holds the write lock, so no worker is
    // consuming any of these rows, and they stay as read until the commit. The times are
    // computed once, in one statement.
    #[derive(QueryableByName)]
    struct Times {
        #[diesel(sql_type = Text)]
        now: String,
        #[diesel(sql_type = Text)]
        pushed_before: String,
        #[diesel(sql_type = Text)]
        created_after: String,
    }
    let times: Times = diesel::sql_query(
        "SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now') AS now, \
                strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) AS pushed_before, \
                strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) AS created_after",
    )
    .bind::<Text, _>(seconds_ago(grace))
    .bind::<Text, _>(seconds_ago(max_age))
    .get_result(conn)?;
    let rows: Vec<UnconsumedRow> = diesel::sql_query(
        "SELECT id, NULL AS txid, payload FROM dtb_barriers \
         WHERE ((attempted_at IS NULL AND pushed_at < ?) OR retry_due_at < ?) \
           AND created_at > ? \
         ORDER BY created_at, seq LIMIT ?",
    )
    .bind::<Text, _>(&times.pushed_before)
    .bind::<Text, _>(&times.pushed_before)
    .bind::<Text, _>(&times.created_after)
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    for row in &rows {
        diesel::sql_query(
            "UPDATE dtb_barriers \
             SET pushed_at = ?, attempted_at = NULL, retry_due_at = NULL WHERE id = ?",
        )
        .bind::<Text, _>(&times.now)
        .bind::<Text, _>(&row.id)
        .execute(conn)?;
    }
    Ok(rows.into_iter().map(Into::into).collect())
}

/// See `Backend::reap`: one batch, in a transaction of its own.
pub(super) fn reap(
    conn: &mut SqliteConnection,
    older_than: Duration,
    limit: i64,
) -> QueryResult<Vec<ReapedBarrier>> {
    // The cutoff is computed once, so that the rows listed are exactly the rows deleted.
    // `created_at` is ISO 8601 text in UTC, which orders as it sorts.
    let modifier = seconds_ago(older_than);
    with_busy_timeout(
        conn,
        |previous| previous.max(millis(WRITE_LOCK_WAIT)),
        |c| {
            c.immediate_transaction(|c| {
                let cutoff: TextRow =
                    diesel::sql_query("SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) AS value")
                        .bind::<Text, _>(&modifier)
                        .get_result(c)?;
                // The same rows twice: nobody else writes while this transaction holds the
                // write lock.
                let rows: Vec<ReapedRow> = diesel::sql_query(
                    "SELECT id, job_id, job_kind FROM dtb_barriers WHERE created_at < ? \
                     ORDER BY created_at, seq LIMIT ?",
                )
                .bind::<Text, _>(&cutoff.value)
                .bind::<BigInt, _>(limit.max(0))
                .load(c)?;
                diesel::sql_query(
                    "DELETE FROM dtb_barriers WHERE seq IN ( \
                         SELECT seq FROM dtb_barriers WHERE created_at < ? \
                         ORDER BY created_at, seq LIMIT ?)",
                )
                .bind::<Text, _>(&cutoff.value)
                .bind::<BigInt, _>(limit.max(0))
                .execute(c)?;
                Ok(rows.into_iter().map(Into::into).collect())
            })
        },
    )
}

/// A date modifier for `strftime`: `d` before.
fn seconds_ago(d: Duration) -> String {
    format!("-{:.3} seconds", bounded_age(d).as_secs_f64())
}

/// A date modifier for `strftime`: `d` after.
fn seconds_ahead(d: Duration) -> String {
    format!("+{:.3} seconds", bounded_age(d).as_secs_f64())
}
