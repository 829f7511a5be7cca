//! MariaDB / MySQL killed (SIGKILL, as in a crash) and started again while a worker waits.
//! Kills the machine's server: `#[ignore]`d, run with `DTB_DB_RESTART=1` and `--ignored` (CI
//! does), and expects a Debian-style installation like the CI's (the server started with
//! `start-stop-daemon`, its settings in `my.cnf`).
#![cfg(feature = "mysql")]

mod common;

use common::mysql::{admin, admin_url, I64Row, Root};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Text)]
    v: String,
}

fn text(conn: &mut MysqlConnection, sql: &str) -> String {
    diesel::sql_query(sql)
        .get_result::<TextRow>(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .v
}

fn kill_and_restart_server() {
    let mut conn = admin();
    let pid = diesel::sql_query("SELECT CAST(@@pid_file AS CHAR) AS v")
        .get_result::<TextRow>(&mut conn)
        .map(|r| r.v)
        .ok()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|p| p.trim().to_string())
        .expect("the server's pid file");
    let basedir = text(&mut conn, "SELECT CAST(@@basedir AS CHAR) AS v");
    let uptime = diesel::sql_query(
        "SELECT CAST(VARIABLE_VALUE AS SIGNED) AS v FROM information_schema.GLOBAL_STATUS \
         WHERE VARIABLE_NAME = 'UPTIME'",
    )
    .get_result::<I64Row>(&mut conn)
    .expect("uptime")
    .v;
    drop(conn);
    let server = ["mariadbd", "mysqld"]
        .iter()
        .map(|name| format!("{}/sbin/{name}", basedir.trim_end_matches('/')))
        .find(|path| std::path::Path::new(path).exists())
        .expect("the server binary");
    let status = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(status.success(), "killing the server (pid {pid}) failed");
    // Gone: no connection succeeds any more.
    let start = Instant::now();
    while MysqlConnection::establish(&admin_url()).is_ok() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server did not die"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("start-stop-daemon")
        .args(["--start", "--oknodo", "--background", "--exec", &server])
        .status()
        .expect("start-stop-daemon");
    assert!(status.success(), "starting {server} failed");
    let start = Instant::now();
    loop {
        if let Ok(mut conn) = MysqlConnection::establish(&admin_url()) {
            let new_uptime = diesel::sql_query(
                "SELECT CAST(VARIABLE_VALUE AS SIGNED) AS v FROM information_schema.GLOBAL_STATUS \
                 WHERE VARIABLE_NAME = 'UPTIME'",
            )
            .get_result::<I64Row>(&mut conn)
            .ok()
            .and_then(|r| r.v);
            let new_pid = diesel::sql_query("SELECT CAST(@@pid_file AS CHAR) AS v")
                .get_result::<TextRow>(&mut conn)
                .ok()
                .and_then(|r| std::fs::read_to_string(r.v).ok())
                .map(|p| p.trim().to_string());
            // Uptime has a one-second resolution: a server killed within a second of its start
            // and its successor can both say 0; the pid tells them apart.
            assert!(
                new_pid.as_deref() != Some(pid.as_str()) || new_uptime < uptime,
                "a new server runs"
            );
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the server did not come back"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "restarts the machine's MariaDB server; run with DTB_DB_RESTART=1 and --ignored, as CI does"]
fn database_restart_mid_wait() {
    common::restart::require_restart_permission();
    common::restart::database_restart_mid_wait::<Root>(kill_and_restart_server);
}
