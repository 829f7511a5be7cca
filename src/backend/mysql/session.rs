//! How the MySQL backend talks to its server: statements Diesel keeps prepared, the worker's
//! transactions (begun, ended and counted the way Diesel's own transaction manager would), and
//! what it learnt about the server (MariaDB's `@@in_transaction` and `SET STATEMENT`, which
//! MySQL lacks).

use super::errors::{last_errno, ER_UNKNOWN_SYSTEM_VARIABLE};
use diesel::connection::{AnsiTransactionManager, TransactionDepthChange, TransactionManager};
use diesel::mysql::{Mysql, MysqlConnection};
use diesel::prelude::*;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Text, Untyped};
use std::sync::atomic::{AtomicU8, Ordering};

/// A statement whose SQL text never changes, with text values bound between its `parts`: Diesel
/// keeps it prepared on the connection, so that each run is one round trip (a `sql_query` is
/// prepared, run and closed every time: two round trips and a third packet).
#[derive(Debug, Clone, Copy)]
pub(super) struct Statement<'a> {
    parts: &'static [&'static str],
    binds: &'a [&'a str],
}

impl<'a> Statement<'a> {
    /// `parts[0]`, `binds[0]`, `parts[1]`, ... `parts[n]`: one part more than binds.
    pub(super) fn new(parts: &'static [&'static str], binds: &'a [&'a str]) -> Statement<'a> {
        assert_eq!(parts.len(), binds.len() + 1, "a part around every value");
        Statement { parts, binds }
    }

    /// A statement without values.
    pub(super) fn plain(parts: &'static [&'static str]) -> Statement<'static> {
        Statement::new(parts, &[])
    }
}

impl QueryId for Statement<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Statement<'_> {
    type SqlType = Untyped;
}

impl QueryFragment<Mysql> for Statement<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Mysql>) -> QueryResult<()> {
        // Never marked unsafe to cache: the text is the same whatever the values.
        for (part, value) in self.parts.iter().zip(self.binds) {
            out.push_sql(part);
            out.push_bind_param::<Text, str>(value)?;
        }
        out.push_sql(self.parts[self.binds.len()]);
        Ok(())
    }
}

impl RunQueryDsl<MysqlConnection> for Statement<'_> {}

/// Whether the server has MariaDB's `@@in_transaction` (MySQL lacks it): not asked yet, yes,
/// no. Learnt from the first answer; a process that talks to both kinds of server only loses
/// the check on MariaDB, never gains a wrong one (a failed read teaches "no" again).
static IN_TRANSACTION_VARIABLE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// Whether the server takes MariaDB's `SET STATEMENT ... FOR` (MySQL does not): learnt as
/// [`IN_TRANSACTION_VARIABLE`] is.
static SET_STATEMENT: AtomicU8 = AtomicU8::new(UNKNOWN);
const UNKNOWN: u8 = 0;
const PRESENT: u8 = 1;
const ABSENT: u8 = 2;

/// Whether `SET STATEMENT` may be tried (it is MariaDB's, or not known not to be).
pub(super) fn set_statement_may_work() -> bool {
    SET_STATEMENT.load(Ordering::Relaxed) != ABSENT
}

/// Records whether the server took a `SET STATEMENT`.
pub(super) fn learnt_set_statement(works: bool) {
    SET_STATEMENT.store(if works { PRESENT } else { ABSENT }, Ordering::Relaxed);
}

/// A statement that reads `@@in_transaction` as the column `in_transaction` (`with`), and the
/// same with NULL in its place (`without`), for a server without the variable.
#[derive(Debug, Clone, Copy)]
pub(super) struct InTransactionQuery {
    pub(super) with: &'static [&'static str],
    pub(super) without: &'static [&'static str],
}

/// Runs `query` with `binds`: the variant that reads `@@in_transaction`, or, on a server
/// without the variable, the other. Both stay prepared.
pub(super) fn with_in_transaction<T: QueryableByName<Mysql> + 'static>(
    conn: &mut MysqlConnection,
    query: InTransactionQuery,
    binds: &[&str],
) -> QueryResult<T> {
    let run = |conn: &mut MysqlConnection, parts: &'static [&'static str]| {
        Statement::new(parts, binds).get_result::<T>(conn)
    };
    if IN_TRANSACTION_VARIABLE.load(Ordering::Relaxed) != ABSENT {
        match run(conn, query.with) {
            Ok(row) => {
                IN_TRANSACTION_VARIABLE.store(PRESENT, Ordering::Relaxed);
                return Ok(row);
            }
            Err(e) => {
                if last_errno(conn)? != Some(ER_UNKNOWN_SYSTEM_VARIABLE) {
                    return Err(e);
                }
                IN_TRANSACTION_VARIABLE.store(ABSENT, Ordering::Relaxed);
            }
        }
    }
    run(conn, query.without)
}

/// How a worker transaction begins. `SET TRANSACTION ISOLATION LEVEL` (without `SESSION`)
/// applies to the next transaction only — an explicit one, or the next statement's in
/// autocommit — so it comes right before it; the session's own default (REPEATABLE READ unless
/// configured otherwise) is untouched.
pub(super) const SET_READ_COMMITTED: &[&str] = &["SET TRANSACTION ISOLATION LEVEL READ COMMITTED"];
/// See [`SET_READ_COMMITTED`].
pub(super) const SET_READ_UNCOMMITTED: &[&str] =
    &["SET TRANSACTION ISOLATION LEVEL READ UNCOMMITTED"];

/// Runs `f` in a transaction at the isolation level `set_level` sets, which commits when `f`
/// returns `Ok` and rolls back otherwise.
///
/// Every statement is one Diesel keeps prepared: a batch of several statements costs a round
/// trip for each, and two more to switch the client's multi-statement mode on and off.
/// Diesel's count of open transactions is kept in step, as its own transaction manager would.
pub(super) fn in_transaction<R, E, F>(
    conn: &mut MysqlConnection,
    set_level: &'static [&'static str],
    f: F,
) -> Result<R, E>
where
    F: FnOnce(&mut MysqlConnection) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    if crate::backend::diesel_transaction(conn) != crate::backend::DieselTransaction::None {
        return Err(diesel::result::Error::AlreadyInTransaction.into());
    }
    Statement::plain(set_level).execute(conn)?;
    Statement::plain(&["BEGIN"]).execute(conn)?;
    count_transaction(conn, TransactionDepthChange::IncreaseDepth)?;
    let result = f(conn);
    end_transaction(conn, result)
}

/// Commits the transaction when `result` is `Ok`, rolls it back otherwise, and returns
/// `result` (or the commit's error).
fn end_transaction<R, E>(conn: &mut MysqlConnection, result: Result<R, E>) -> Result<R, E>
where
    E: From<diesel::result::Error>,
{
    let end: &'static [&'static str] = if result.is_ok() {
        &["COMMIT"]
    } else {
        &["ROLLBACK"]
    };
    let ended = Statement::plain(end).execute(conn);
    if ended.is_err() && result.is_ok() {
        // A failed COMMIT leaves the transaction to roll back.
        let _ = Statement::plain(&["ROLLBACK"]).execute(conn);
    }
    count_transaction(conn, TransactionDepthChange::DecreaseDepth)?;
    ended?;
    result
}

/// Tells Diesel's transaction manager that a transaction began or ended.
fn count_transaction(
    conn: &mut MysqlConnection,
    change: TransactionDepthChange,
) -> QueryResult<()> {
    <AnsiTransactionManager as TransactionManager<MysqlConnection>>::transaction_manager_status_mut(
        conn,
    )
    .transaction_state()?
    .change_transaction_depth(change)
}

/// Runs `f` in a READ COMMITTED transaction, whatever the session's default isolation level.
pub(super) fn read_committed<R, E, F>(conn: &mut MysqlConnection, f: F) -> Result<R, E>
where
    F: FnOnce(&mut MysqlConnection) -> Result<R, E>,
    E: From<diesel::result::Error>,
{
    in_transaction(conn, SET_READ_COMMITTED, f)
}
