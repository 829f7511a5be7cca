//! The barrier contract on real PostgreSQL (`PG_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test gets a schema of its own.
#![cfg(feature = "postgres")]

mod common;

use common::scenarios;
use common::TestDb;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};

struct Pg {
    base: String,
    schema: String,
}

fn base_url() -> String {
    std::env::var("PG_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

#[derive(QueryableByName)]
struct I64Row {
    #[diesel(sql_type = Nullable<BigInt>)]
    v: Option<i64>,
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Nullable<Text>)]
    v: Option<String>,
}

impl Pg {
    fn with_schema(migrate: bool) -> Pg {
        let schema = format!("dtb_test_{}", uuid::Uuid::new_v4().simple());
        let base = base_url();
        let mut admin = PgConnection::establish(&base).expect("PostgreSQL is reachable");
        Pg::exec(&mut admin, &format!("CREATE SCHEMA {schema}"));
        let db = Pg { base, schema };
        let mut conn = db.connect();
        if migrate {
            diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        }
        common::create_app_tables::<Pg>(&mut conn);
        db
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.base) {
            let _ = diesel::sql_query(format!("DROP SCHEMA {} CASCADE", self.schema))
                .execute(&mut admin);
        }
    }
}

impl TestDb for Pg {
    type Conn = PgConnection;

    fn create() -> Self {
        Pg::with_schema(true)
    }

    fn create_unmigrated() -> Self {
        Pg::with_schema(false)
    }

    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-csearch_path%3D{}&application_name={}",
            self.base, self.schema, self.schema
        )
    }

    fn connect(&self) -> PgConnection {
        PgConnection::establish(&self.url()).expect("connect")
    }

    fn exec(conn: &mut PgConnection, sql: &str) {
        diesel::sql_query(sql)
            .execute(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn query_i64(conn: &mut PgConnection, sql: &str) -> Option<i64> {
        diesel::sql_query(format!("SELECT ({sql})::bigint AS v"))
            .get_result::<I64Row>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
    }

    fn query_string(conn: &mut PgConnection, sql: &str) -> Option<String> {
        diesel::sql_query(format!("SELECT ({sql})::text AS v"))
            .get_result::<TextRow>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
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
            &format!(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name = '{}' AND pid <> pg_backend_pid() \
                   AND (query LIKE 'LISTEN%' OR query LIKE '%unnest($1::text[]%' \
                        OR query LIKE '%dtb_await_barrier%')",
                self.schema
            ),
        );
        Some(n.unwrap_or(0) as usize)
    }

    fn kill(&self, session: i64) {
        let mut c = self.connect();
        Pg::exec(&mut c, &format!("SELECT pg_terminate_backend({session})"));
    }
}

#[test]
fn commit_runs_after_commit() {
    scenarios::commit_runs_after_commit::<Pg>();
}

#[test]
fn error_rolls_back() {
    scenarios::error_rolls_back::<Pg>();
}

#[test]
fn panic_rolls_back() {
    scenarios::panic_rolls_back::<Pg>();
}

#[test]
fn killed_producer_aborts() {
    scenarios::killed_producer_aborts::<Pg>();
}

#[test]
fn rolled_back_savepoint_never_runs() {
    scenarios::rolled_back_savepoint_never_runs::<Pg>();
}

#[test]
fn released_savepoint_runs() {
    scenarios::released_savepoint_runs::<Pg>();
}

#[test]
fn autocommit_runs_without_barrier() {
    scenarios::autocommit_runs_without_barrier::<Pg>();
}

#[test]
fn barrier_required_and_opt_out() {
    scenarios::barrier_required_and_opt_out::<Pg>();
}

#[test]
fn inline_runs_at_once() {
    scenarios::inline_runs_at_once::<Pg>();
}

#[test]
fn fetched_after_commit_runs_at_once() {
    scenarios::fetched_after_commit_runs_at_once::<Pg>();
}

#[test]
fn duplicate_delivery_runs_once() {
    scenarios::duplicate_delivery_runs_once::<Pg>();
}

#[test]
fn faktory_unreachable_rolls_back() {
    scenarios::faktory_unreachable_rolls_back::<Pg>();
}

#[test]
fn missing_migrations_are_reported() {
    scenarios::missing_migrations_are_reported::<Pg>();
}

#[test]
fn many_waiting_jobs_hold_few_connections() {
    scenarios::many_waiting_jobs_hold_few_connections::<Pg>();
}

#[test]
fn snoozed_after_block_limit() {
    scenarios::snoozed_after_block_limit::<Pg>();
}

#[test]
fn barrier_timeout_after_deadline() {
    scenarios::barrier_timeout_after_deadline::<Pg>();
}

#[test]
fn reaper_deletes_old_barriers() {
    scenarios::reaper_deletes_old_barriers::<Pg>();
}

#[test]
fn graceful_shutdown_loses_nothing() {
    scenarios::graceful_shutdown_loses_nothing::<Pg>();
}

#[test]
fn bad_input_fails_cleanly() {
    scenarios::bad_input_fails_cleanly::<Pg>();
}

#[test]
fn soak_with_oracle() {
    common::soak::soak::<Pg>();
}

#[test]
fn broker_loss_is_reconciled() {
    scenarios::broker_loss_is_reconciled::<Pg>();
}

#[test]
fn backlog_is_repushed_at_most_once_per_grace() {
    scenarios::backlog_is_repushed_at_most_once_per_grace::<Pg>();
}

#[test]
fn waiter_connections_killed_mid_wait() {
    scenarios::waiter_connections_killed_mid_wait::<Pg>();
}

#[test]
fn faktory_restart_while_worker_runs() {
    scenarios::faktory_restart_while_worker_runs::<Pg>();
}

#[test]
fn worker_killed_mid_wait_and_mid_handler() {
    common::faults::worker_killed_mid_wait_and_mid_handler::<Pg>("worker_child");
}

/// The worker process of `worker_killed_mid_wait_and_mid_handler`; does nothing unless
/// started by it.
#[test]
#[ignore = "the child process of worker_killed_mid_wait_and_mid_handler"]
fn worker_child() {
    common::faults::worker_child_main::<Pg>();
}
