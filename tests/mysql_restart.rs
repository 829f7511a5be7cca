//! MariaDB / MySQL killed (SIGKILL, as in a crash) and started again while a worker waits.
//! Kills the machine's server: `#[ignore]`d, run with `DTB_DB_RESTART=1` and `--ignored` (CI
//! does), and expects a Debian-style installation like the CI's (the server started with
//! `start-stop-daemon`, its settings in `my.cnf`).
#![cfg(feature = "mysql")]

mod common;

use common::mysql::Root;
use common::{poll_until, LoadOne, TestDb};
use diesel::mysql::MysqlConnection;
use diesel::{Connection, QueryResult};
use diesel_transaction_barrier::testing::MysqlTestDatabase;
use std::process::Command;
use std::time::Duration;

/// The server's pid (from its pid file), and its uptime in seconds, as `conn` sees them.
fn pid_and_uptime(conn: &mut MysqlConnection) -> (Option<String>, QueryResult<Option<i64>>) {
    let pid = conn
        .load_text("SELECT CAST(@@pid_file AS CHAR) AS v")
        .ok()
        .flatten()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|p| p.trim().to_string());
    let uptime = conn.load_i64(
        "SELECT CAST(VARIABLE_VALUE AS SIGNED) AS v FROM information_schema.GLOBAL_STATUS \
         WHERE VARIABLE_NAME = 'UPTIME'",
    );
    (pid, uptime)
}

fn kill_and_restart_server() {
    let server_url = MysqlTestDatabase::server_url();
    let mut conn = MysqlConnection::establish(&server_url).expect("MariaDB is reachable");
    let (pid, uptime) = pid_and_uptime(&mut conn);
    let pid = pid.expect("the server's pid file");
    let uptime = uptime.expect("uptime");
    let basedir = Root::query_string(&mut conn, "SELECT @@basedir").expect("the base directory");
    let pid_file = Root::query_string(&mut conn, "SELECT @@pid_file").expect("the pid file");
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
    poll_until(
        "the server to die",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || MysqlConnection::establish(&server_url).is_err(),
    );
    let status = Command::new("start-stop-daemon")
        // This server's pid file, not the executable alone: another server of the same
        // executable may run on the machine (with a data directory of its own), and would
        // pass for this one.
        .args([
            "--start",
            "--oknodo",
            "--background",
            "--pidfile",
            &pid_file,
        ])
        .args(["--exec", &server])
        .status()
        .expect("start-stop-daemon");
    assert!(status.success(), "starting {server} failed");
    let mut conn = None;
    poll_until(
        "the server to come back",
        Duration::from_secs(120),
        Duration::from_millis(200),
        || {
            conn = MysqlConnection::establish(&server_url).ok();
            conn.is_some()
        },
    );
    let (new_pid, new_uptime) = pid_and_uptime(conn.as_mut().unwrap());
    let new_uptime = new_uptime.ok().flatten();
    // Uptime has a one-second resolution: a server killed within a second of its start and
    // its successor can both say 0; the pid tells them apart.
    assert!(
        new_pid.as_deref() != Some(pid.as_str()) || new_uptime < uptime,
        "a new server runs"
    );
}

#[test]
#[ignore = "restarts the machine's MariaDB server; run with DTB_DB_RESTART=1 and --ignored, as CI does"]
fn database_restart_mid_wait() {
    common::restart::require_restart_permission();
    common::restart::database_restart_mid_wait::<Root>(kill_and_restart_server);
}
