//! How a MySQL worker transaction takes a barrier for its handler, and how it checks afterwards
//! that the server still holds that transaction. MariaDB claims in one statement; MySQL, which
//! lacks `SET STATEMENT`, with two locking reads and a delete.

use super::errors::{
    last_errno, looks_like_lock_wait_timeout, ER_LOCK_NOWAIT, ER_LOCK_WAIT_TIMEOUT, ER_PARSE_ERROR,
};
use super::schema::dtb_barriers;
use super::session::{
    learnt_set_statement, set_statement_may_work, with_in_transaction, InTransactionQuery,
    Statement,
};
use crate::backend::Claim;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable};

#[derive(QueryableByName)]
struct ClaimCheckRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    in_transaction: Option<i64>,
    #[diesel(sql_type = BigInt)]
    remaining: i64,
}

/// See `Backend::claim_barrier`: deleted now, inside the worker transaction, whose commit
/// consumes the barrier together with the handler's writes and whose rollback restores it.
/// [`claim_holds`] checks afterwards that the server did not end the transaction meanwhile.
pub(super) fn claim_barrier(
    conn: &mut MysqlConnection,
    id: &uuid::Uuid,
    digest: &str,
) -> QueryResult<Claim> {
    let key = id.hyphenated().to_string();
    if set_statement_may_work() {
        if let Some(claim) = claim_in_one_statement(conn, &key, digest)? {
            return Ok(claim);
        }
    }
    claim_with_locking_read(conn, &key, digest)
}

/// MariaDB's claim, in one statement: the delete takes the row's lock without waiting for it
/// (a lock wait timeout of 0 fails at once where it would wait), and only if the row is the
/// delivery's job's (`digest`). One row deleted is ours; none is gone, or, if the row is still
/// there, another job's; a lock wait timeout means held. `None` where the server does not know
/// `SET STATEMENT` (MySQL).
pub(super) fn claim_in_one_statement(
    conn: &mut MysqlConnection,
    key: &str,
    digest: &str,
) -> QueryResult<Option<Claim>> {
    const CLAIM: &[&str] = &[
        "SET STATEMENT innodb_lock_wait_timeout = 0 FOR DELETE FROM dtb_barriers \
         WHERE id = ",
        " AND (job_digest IS NULL OR job_digest = ",
        ")",
    ];
    match Statement::new(CLAIM, &[key, digest]).execute(conn) {
        Ok(n) => {
            learnt_set_statement(true);
            if n == 1 {
                return Ok(Some(Claim::Locked));
            }
            // Nothing deleted, and nothing held (that would have timed out): the row is gone,
            // or it is another job's.
            let theirs = dtb_barriers::table
                .find(key)
                .select(dtb_barriers::job_digest)
                .get_result::<Option<String>>(conn)
                .optional()?;
            Ok(Some(if theirs.is_some() {
                Claim::Foreign
            } else {
                Claim::Gone
            }))
        }
        Err(e) if looks_like_lock_wait_timeout(&e) => Ok(Some(Claim::Busy)),
        Err(e) => match last_errno(conn)? {
            Some(ER_LOCK_WAIT_TIMEOUT) => Ok(Some(Claim::Busy)),
            Some(ER_PARSE_ERROR) => {
                learnt_set_statement(false);
                Ok(None)
            }
            _ => Err(e),
        },
    }
}

/// MySQL's claim: a locking read that skips what is held, then the delete.
pub(super) fn claim_with_locking_read(
    conn: &mut MysqlConnection,
    key: &str,
    digest: &str,
) -> QueryResult<Claim> {
    // SKIP LOCKED never waits and never errors: a row held by a concurrent duplicate (or, were
    // the waiter ever wrong, by its running producer) simply does not come back.
    let locked = dtb_barriers::table
        .find(key)
        .select(dtb_barriers::job_digest)
        .for_update()
        .skip_locked()
        .get_result::<Option<String>>(conn)
        .optional()?;
    if let Some(Some(theirs)) = &locked {
        if theirs != digest {
            // Locked until the worker transaction rolls back, which lets it go untouched.
            return Ok(Claim::Foreign);
        }
    }
    if locked.is_none() {
        // Held, or gone? A second locking read that refuses to wait tells them apart: one that
        // meets a lock fails at once, and only an absent row comes back empty. A row let go of
        // in between is simply taken.
        let again = dtb_barriers::table
            .find(key)
            .select(dtb_barriers::job_digest)
            .for_update()
            .no_wait()
            .get_result::<Option<String>>(conn)
            .optional();
        match again {
            Ok(Some(Some(theirs))) if theirs != digest => return Ok(Claim::Foreign),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Claim::Gone),
            Err(e) => {
                return match last_errno(conn)? {
                    Some(ER_LOCK_WAIT_TIMEOUT | ER_LOCK_NOWAIT) => Ok(Claim::Busy),
                    _ => Err(e),
                }
            }
        }
    }
    diesel::delete(dtb_barriers::table.find(key)).execute(conn)?;
    Ok(Claim::Locked)
}

/// See `Backend::claim_holds`. The claim stands while the transaction that deleted the row is
/// open: the row is then invisible to this session (its own delete) and the server says a
/// transaction is open. After a deadlock or a lock wait timeout rolled it back, the row is
/// visible again; after an implicit commit (DDL in the handler, say), MariaDB says no
/// transaction is open — the retry then finds the row consumed and skips the handler.
pub(super) fn claim_holds(conn: &mut MysqlConnection, id: &uuid::Uuid) -> QueryResult<bool> {
    const CLAIM_HOLDS: InTransactionQuery = InTransactionQuery {
        with: &[
            "SELECT CAST(@@in_transaction AS SIGNED) AS in_transaction, \
                    (SELECT COUNT(*) FROM dtb_barriers WHERE id = ",
            ") AS remaining",
        ],
        without: &[
            "SELECT CAST(NULL AS SIGNED) AS in_transaction, \
                    (SELECT COUNT(*) FROM dtb_barriers WHERE id = ",
            ") AS remaining",
        ],
    };
    let id = id.hyphenated().to_string();
    let row: ClaimCheckRow = with_in_transaction(conn, CLAIM_HOLDS, &[&id])?;
    Ok(row.remaining == 0 && row.in_transaction.is_none_or(|t| t == 1))
}
