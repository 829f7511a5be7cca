//! The PostgreSQL `TestDb`: a schema of its own per test (`PG_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`).
#![cfg(feature = "postgres")]

use super::pg_schema::PgSchema;
use super::TestDb;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};

pub struct Pg {
    schema: PgSchema,
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
        let db = Pg {
            schema: PgSchema::create("dtb_test"),
        };
        let mut conn = db.connect();
        if migrate {
            diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        }
        super::create_app_tables::<Pg>(&mut conn);
        db
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
        self.schema.url()
    }

    fn connect(&self) -> PgConnection {
        self.schema.connect()
    }

    fn exec(conn: &mut PgConnection, sql: &str) {
        diesel::sql_query(sql)
            .execute(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn try_exec(conn: &mut PgConnection, sql: &str) -> Result<(), diesel::result::Error> {
        diesel::sql_query(sql).execute(conn).map(|_| ())
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
                self.schema.name()
            ),
        );
        Some(n.unwrap_or(0) as usize)
    }

    fn kill(&self, session: i64) {
        let mut c = self.connect();
        Pg::exec(&mut c, &format!("SELECT pg_terminate_backend({session})"));
    }
}
