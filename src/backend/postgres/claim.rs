//! How a PostgreSQL worker transaction takes a barrier for its handler: `BEGIN` and the claim
//! (`dtb_claim_barrier`, a function of the migrations) in one round trip, and, when that finds
//! nothing to take, the slow way, which tells a held row from a gone one and from another
//! job's.

use super::check::probe;
use super::{OptTextRow, TextRow};
use crate::backend::sealed::Backend;
use crate::backend::{Claim, Claimed, Verdict};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;

/// See `Backend::claiming_transaction`.
pub(super) fn claiming_transaction<R, E, F>(
    conn: &mut PgConnection,
    id: &uuid::Uuid,
    digest: &str,
    f: F,
) -> Result<Claimed<R>, E>
where
    F: FnOnce(&mut PgConnection) -> Result<R, E>,
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
        if AnsiTransactionManager::begin_transaction_sql(conn, &begin).is_ok() {
            return finish_transaction(conn, f).map(Claimed::Ran);
        }
        conn.batch_execute("ROLLBACK")?;
    }
    conn.worker_transaction(|c| crate::backend::claim_then(c, id, digest, f))
}

/// See `Backend::claim_barrier`.
pub(super) fn claim_barrier(
    conn: &mut PgConnection,
    id: &uuid::Uuid,
    digest: &str,
) -> QueryResult<Claim> {
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
    .get_result(conn)
    .optional()?;
    if claimed.is_some() {
        return Ok(Claim::Locked);
    }
    let row: Option<OptTextRow> =
        diesel::sql_query("SELECT job_digest AS value FROM dtb_barriers WHERE id = $1::uuid")
            .bind::<Text, _>(&id)
            .get_result(conn)
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
    Ok(match probe(conn, &id)? {
        Verdict::NotCommitted => Claim::Gone,
        // Still running, or committed just now: look again later.
        Verdict::Pending | Verdict::Committed | Verdict::Visible => Claim::Busy,
    })
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
