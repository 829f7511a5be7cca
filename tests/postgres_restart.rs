//! PostgreSQL restarted, crash-like (`-m immediate`), while a worker waits. Restarts the
//! machine's server: `#[ignore]`d, run with `DTB_DB_RESTART=1` and `--ignored` (CI does).
#![cfg(feature = "postgres")]

mod common;

use common::pg::Pg;
use common::poll_until;
use std::process::Command;
use std::time::Duration;

fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .expect("a PostgreSQL version");
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "immediate",
        ])
        .status()
        .expect("pg_ctlcluster");
    assert!(status.success(), "restarting PostgreSQL failed");
    poll_until(
        "PostgreSQL to come back",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            Command::new("pg_isready")
                .args(["-h", "127.0.0.1", "-p", "5432", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        },
    );
}

#[test]
#[ignore = "restarts the machine's PostgreSQL server; run with DTB_DB_RESTART=1 and --ignored, as CI does"]
fn database_restart_mid_wait() {
    common::restart::require_restart_permission();
    common::restart::database_restart_mid_wait::<Pg>(restart_postgres);
}
