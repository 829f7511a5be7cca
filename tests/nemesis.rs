//! The nemesis soak (`tests/nemesis/`): random transactions under load while the database
//! server, the Faktory server, worker processes and database sessions are killed, judged by an
//! oracle at the end. Every server it crashes is private to the run (a PostgreSQL cluster or a
//! MariaDB server in a temporary folder, the in-process Faktory server or, with
//! `FAKTORY_NEMESIS_GENUINE` naming its folder, a genuine one), so it disturbs nothing else;
//! it is long, so `#[ignore]`d and run only with `DTB_NEMESIS=1` and `--ignored`:
//!
//! ```sh
//! DTB_NEMESIS=1 DTB_NEMESIS_SECS=60 cargo test --all-features --test nemesis -- --ignored --nocapture
//! ```

mod common;
#[path = "nemesis/mod.rs"]
mod nemesis;

use diesel::mysql::MysqlConnection;
use diesel::pg::PgConnection;
use diesel::RunQueryDsl;
use nemesis::servers::{DbServer, PrivateMaria, PrivatePg};
use nemesis::{Backend, Pair};
use std::path::Path;

struct Postgres;

impl Backend for Postgres {
    type Conn = PgConnection;
    const NAME: &'static str = "postgres";
    const INTEGER: &'static str = "BIGINT";
    const TEXT: &'static str = "TEXT";
    const POOL: u32 = 10;

    fn server(dir: &Path) -> Box<dyn DbServer> {
        Box::new(PrivatePg::create(dir))
    }

    fn kill_sessions(conn: &mut PgConnection) -> usize {
        Self::count(
            conn,
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND random() < 0.5",
        )
        .unwrap_or(0) as usize
    }

    fn pairs(conn: &mut PgConnection, sql: &str) -> Result<Vec<Pair>, diesel::result::Error> {
        diesel::sql_query(sql).load(conn)
    }
}

struct Mariadb;

impl Backend for Mariadb {
    type Conn = MysqlConnection;
    const NAME: &'static str = "mariadb";
    const INTEGER: &'static str = "SIGNED";
    const TEXT: &'static str = "CHAR";
    const POOL: u32 = 14;

    fn server(dir: &Path) -> Box<dyn DbServer> {
        Box::new(PrivateMaria::create(dir))
    }

    fn kill_sessions(conn: &mut MysqlConnection) -> usize {
        use common::LoadOne;
        let ids = conn
            .load_text(
                "SELECT CAST(GROUP_CONCAT(id) AS CHAR) AS v FROM information_schema.PROCESSLIST \
                 WHERE id <> CONNECTION_ID() AND user = 'root' AND command <> 'Daemon'",
            )
            .ok()
            .flatten()
            .unwrap_or_default();
        let mut killed = 0;
        for (i, id) in ids.split(',').filter(|s| !s.is_empty()).enumerate() {
            if (i + id.len() + nemesis::workload::now_ns() as usize) % 2 == 0
                && diesel::sql_query(format!("KILL {id}"))
                    .execute(conn)
                    .is_ok()
            {
                killed += 1;
            }
        }
        killed
    }

    fn pairs(conn: &mut MysqlConnection, sql: &str) -> Result<Vec<Pair>, diesel::result::Error> {
        diesel::sql_query(sql).load(conn)
    }
}

#[test]
#[ignore = "the nemesis soak (minutes, private servers it crashes); run with DTB_NEMESIS=1 and --ignored"]
fn nemesis_postgres() {
    if nemesis::wanted("nemesis_postgres") {
        nemesis::soak::<Postgres>();
    }
}

#[test]
#[ignore = "the nemesis soak (minutes, private servers it crashes); run with DTB_NEMESIS=1 and --ignored"]
fn nemesis_mariadb() {
    if nemesis::wanted("nemesis_mariadb") {
        nemesis::soak::<Mariadb>();
    }
}

/// A worker process of the soak: does nothing unless the soak started it.
#[test]
#[ignore = "a worker process of the nemesis soak, which starts it"]
fn nemesis_worker_process() {
    match std::env::var("NEMESIS_CHILD").as_deref() {
        Ok("postgres") => nemesis::worker_process::<Postgres>(),
        Ok("mariadb") => nemesis::worker_process::<Mariadb>(),
        _ => {}
    }
}
