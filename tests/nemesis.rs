//! The nemesis soak (`tests/nemesis/`): random transactions under load while the database
//! server, the Faktory server, worker processes and database sessions are killed, judged by an
//! oracle at the end. Every server it crashes is private to the run (a PostgreSQL cluster or a
//! MariaDB server in a temporary folder, an SQLite file (worker and Faktory crashes only), the in-process Faktory server or, with
//! `FAKTORY_NEMESIS_GENUINE` naming its folder, a genuine one), so it disturbs nothing else;
//! it is long, so `#[ignore]`d and run only with `DTB_NEMESIS=1` and `--ignored`:
//!
//! ```sh
//! DTB_NEMESIS=1 DTB_NEMESIS_SECS=60 cargo test --all-features --test nemesis -- --ignored --nocapture --test-threads=3
//! ```

mod common;
#[path = "nemesis/mod.rs"]
mod nemesis;

use diesel::mysql::MysqlConnection;
use diesel::pg::PgConnection;
use diesel::sqlite::SqliteConnection;
use diesel::RunQueryDsl;
use nemesis::servers::{DbServer, PrivateMaria, PrivatePg, PrivateSqlite};
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

struct Sqlite;

impl Backend for Sqlite {
    type Conn = SqliteConnection;
    const NAME: &'static str = "sqlite";
    const INTEGER: &'static str = "INTEGER";
    const TEXT: &'static str = "TEXT";
    const POOL: u32 = 10;
    const DB_FAULTS: bool = false;

    fn server(dir: &Path) -> Box<dyn DbServer> {
        Box::new(PrivateSqlite::create(dir))
    }

    /// With the busy timeout every SQLite database with more than one connection needs.
    fn establish(url: &str) -> diesel::ConnectionResult<SqliteConnection> {
        use diesel::connection::SimpleConnection;
        use diesel::Connection;
        let mut conn = SqliteConnection::establish(url)?;
        conn.batch_execute("PRAGMA busy_timeout = 60000")
            .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))?;
        Ok(conn)
    }

    fn kill_sessions(_conn: &mut SqliteConnection) -> usize {
        0
    }

    fn pairs(conn: &mut SqliteConnection, sql: &str) -> Result<Vec<Pair>, diesel::result::Error> {
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

/// SQLite: worker processes and Faktory crash (no server, no sessions).
#[test]
#[ignore = "the nemesis soak (minutes, private servers it crashes); run with DTB_NEMESIS=1 and --ignored"]
fn nemesis_sqlite() {
    if nemesis::wanted("nemesis_sqlite") {
        nemesis::soak::<Sqlite>();
    }
}

/// A worker process of the soak: does nothing unless the soak started it.
#[test]
#[ignore = "a worker process of the nemesis soak, which starts it"]
fn nemesis_worker_process() {
    match std::env::var("NEMESIS_CHILD").as_deref() {
        Ok("postgres") => nemesis::worker_process::<Postgres>(),
        Ok("mariadb") => nemesis::worker_process::<Mariadb>(),
        Ok("sqlite") => nemesis::worker_process::<Sqlite>(),
        _ => {}
    }
}
