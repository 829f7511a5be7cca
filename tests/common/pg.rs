//! The PostgreSQL `TestDb`: the crate's `PgTestSchema` (`PG_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), a schema of its own per test.
#![cfg(feature = "postgres")]

use super::TestDb;
use diesel::pg::PgConnection;
use diesel_transaction_barrier::testing::PgTestSchema;

pub struct Pg(PgTestSchema);

impl TestDb for Pg {
    type Conn = PgConnection;
    type Database = PgTestSchema;

    const INTEGER: &'static str = "BIGINT";
    const TEXT: &'static str = "TEXT";
    const TIMEOUT_DEBUG_INFO: &'static [&'static str] = &["txid", "transaction:"];
    /// A checking connection and four watchers.
    const WAITER_CONNECTIONS: u32 = 5;

    fn wrap(schema: PgTestSchema) -> Pg {
        Pg(schema)
    }

    fn database(&self) -> &PgTestSchema {
        &self.0
    }

    fn session_id(conn: &mut PgConnection) -> i64 {
        Pg::query_i64(conn, "SELECT pg_backend_pid()").unwrap()
    }

    fn waiters_on(&self, session: i64) -> i64 {
        let mut c = self.connect();
        Pg::query_i64(
            &mut c,
            &format!(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE {session} = ANY(pg_blocking_pids(pid))"
            ),
        )
        .unwrap()
    }

    fn kill_waiter_sessions(&self) -> Option<usize> {
        let mut c = self.connect();
        let n = Pg::query_i64(
            &mut c,
            &kill_waiter_sessions_where(&format!("application_name = '{}'", self.0.name())),
        );
        Some(n.unwrap_or(0) as usize)
    }

    fn kill_sessions_waiting_on(&self, session: i64) -> Option<usize> {
        Some(kill_sessions_waiting_on(&mut self.connect(), session))
    }

    fn kill(&self, session: i64) {
        let mut c = self.connect();
        Pg::exec(&mut c, &format!("SELECT pg_terminate_backend({session})"));
    }
}

/// The query that ends the server sessions `filter` selects (an SQL condition on
/// `pg_stat_activity`) which last ran a waiter's `LISTEN`, check or probe, and counts them.
/// Terminates the sessions that wait for a lock `session` holds; how many.
pub fn kill_sessions_waiting_on(admin: &mut PgConnection, session: i64) -> usize {
    Pg::query_i64(
        admin,
        &format!(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE {session} = ANY(pg_blocking_pids(pid))"
        ),
    )
    .unwrap_or(0) as usize
}

pub fn kill_waiter_sessions_where(filter: &str) -> String {
    format!(
        "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE {filter} AND pid <> pg_backend_pid() \
           AND (query LIKE '%unnest($1::text[]%' OR query LIKE '%dtb_await_barrier%')"
    )
}
