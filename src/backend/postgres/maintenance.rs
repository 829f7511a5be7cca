//! What the reconciler and the reaper do to PostgreSQL's barrier table, and the mark a failed
//! handler leaves. Rows held by a transaction (a running producer, a consuming handler) are
//! passed over with `SKIP LOCKED`, never waited for.

use crate::backend::rows::{ReapedRow, UnconsumedRow};
use crate::backend::{bounded_age, ReapedBarrier, Unconsumed};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use std::time::Duration;

/// See `Backend::mark_attempted`.
pub(super) fn mark_attempted(
    conn: &mut PgConnection,
    id: &uuid::Uuid,
    retry_due: Option<Duration>,
) -> QueryResult<()> {
    diesel::sql_query(
        "UPDATE dtb_barriers SET attempted_at = now(), \
             retry_due_at = now() + make_interval(secs => $2) \
         WHERE id = $1::uuid",
    )
    .bind::<Text, _>(id.hyphenated().to_string())
    .bind::<Nullable<Double>, _>(retry_due.map(|d| bounded_age(d).as_secs_f64()))
    .execute(conn)?;
    Ok(())
}

/// See `Backend::take_unconsumed`.
pub(super) fn take_unconsumed(
    conn: &mut PgConnection,
    grace: Duration,
    max_age: Duration,
    limit: i64,
) -> QueryResult<Vec<Unconsumed>> {
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
    .bind::<Double, _>(bounded_age(grace).as_secs_f64())
    .bind::<Double, _>(bounded_age(max_age).as_secs_f64())
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    Ok(rows.into_iter().map(Into::into).collect())
}

/// See `Backend::reap`: one statement, its own transaction.
pub(super) fn reap(
    conn: &mut PgConnection,
    older_than: Duration,
    limit: i64,
) -> QueryResult<Vec<ReapedBarrier>> {
    let rows: Vec<ReapedRow> = diesel::sql_query(
        "DELETE FROM dtb_barriers WHERE id IN ( \
             SELECT id FROM dtb_barriers \
             WHERE created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING id::text AS id, job_id, job_kind",
    )
    .bind::<Double, _>(bounded_age(older_than).as_secs_f64())
    .bind::<BigInt, _>(limit.max(0))
    .load(conn)?;
    Ok(rows.into_iter().map(Into::into).collect())
}
