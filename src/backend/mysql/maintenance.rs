//! What the reconciler and the reaper do to MySQL's barrier table, and the mark a failed
//! handler leaves. Rows held by a transaction (a running producer, a consuming handler) are
//! passed over with `SKIP LOCKED`, never waited for, and rows are written one by one through
//! the primary key: a statement over an `IN (...)` list planned as a scan would lock, for a
//! moment, rows that handlers are claiming, and a scanning `DELETE` waits for rows other
//! transactions hold even under READ COMMITTED.

use super::schema::dtb_barriers;
use super::session::read_committed;
use crate::backend::rows::{ReapedRow, UnconsumedRow};
use crate::backend::{bounded_age, ReapedBarrier, Unconsumed};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use std::time::Duration;

/// `d` in microseconds, for `NOW(6) - INTERVAL ? MICROSECOND` (see `bounded_age`).
fn micros(d: Duration) -> i64 {
    i64::try_from(bounded_age(d).as_micros()).unwrap_or(i64::MAX)
}

/// See `Backend::mark_attempted`.
pub(super) fn mark_attempted(
    conn: &mut MysqlConnection,
    id: &uuid::Uuid,
    retry_due: Option<Duration>,
) -> QueryResult<()> {
    read_committed(conn, |c| {
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

/// See `Backend::take_unconsumed`. Inside the worker's READ COMMITTED transaction. MySQL has
/// neither `UPDATE ... RETURNING` nor an `UPDATE` that selects from its own table, hence a
/// locking read, then the update of what it locked.
pub(super) fn take_unconsumed(
    conn: &mut MysqlConnection,
    grace: Duration,
    max_age: Duration,
    limit: i64,
) -> QueryResult<Vec<Unconsumed>> {
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
    .bind::<BigInt, _>(limit.max(0))
    .load(conn)?;
    for row in &rows {
        diesel::sql_query(
            "UPDATE dtb_barriers \
             SET pushed_at = NOW(6), attempted_at = NULL, retry_due_at = NULL WHERE id = ?",
        )
        .bind::<Text, _>(&row.id)
        .execute(conn)?;
    }
    Ok(rows.into_iter().map(Into::into).collect())
}

/// See `Backend::reap`: one batch, in a short transaction of its own.
pub(super) fn reap(
    conn: &mut MysqlConnection,
    older_than: Duration,
    limit: i64,
) -> QueryResult<Vec<ReapedBarrier>> {
    let rows: Vec<ReapedRow> = read_committed(conn, |c| {
        // Rows of transactions still running are locked by their producers: skipped.
        let rows: Vec<ReapedRow> = diesel::sql_query(
            "SELECT id, job_id, job_kind FROM dtb_barriers \
             WHERE created_at < NOW(6) - INTERVAL ? MICROSECOND \
             ORDER BY created_at LIMIT ? FOR UPDATE SKIP LOCKED",
        )
        .bind::<BigInt, _>(micros(older_than))
        .bind::<BigInt, _>(limit.max(0))
        .load(c)?;
        for r in &rows {
            diesel::delete(dtb_barriers::table.find(&r.id)).execute(c)?;
        }
        Ok::<_, diesel::result::Error>(rows)
    })?;
    Ok(rows.into_iter().map(Into::into).collect())
}
