//! The `dtb` command line (feature `cli`), run as a process against PostgreSQL
//! (`PG_DATABASE_URL`) and MariaDB or MySQL (`MYSQL_DATABASE_URL`), each test in a database of
//! its own, with Faktory at `FAKTORY_URL` or the in-process test server: what `status` shows of
//! old, committed-unconsumed, waiting, pending and consuming barriers and with which exit code,
//! then `reap` and `reconcile` run once, and the failures that exit 2.
#![cfg(all(
    feature = "cli",
    feature = "postgres",
    feature = "mysql",
    feature = "testing"
))]

use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::pg::PgConnection;
use diesel::Connection;
use diesel_transaction_barrier::testing::{
    MysqlTestDatabase, PgTestSchema, TestDatabase, TestFaktory,
};
use diesel_transaction_barrier::{BarrierConnection, EnqueueWithBarrier, Error, Job, Producer};
use std::process::{Command, Output};

/// Runs `dtb` with `args` and no database or Faktory from the environment.
fn dtb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dtb"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("FAKTORY_URL")
        .env_remove("FAKTORY_PROVIDER")
        .output()
        .expect("dtb runs")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("dtb exited")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn status_json(url: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["--database-url", url, "status", "--json"];
    args.extend_from_slice(extra);
    let out = dtb(&args);
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("JSON ({e}): {}\n{}", stdout(&out), stderr(&out)));
    (code(&out), report)
}

/// The listed barrier whose job is `jid`.
fn barrier<'a>(report: &'a serde_json::Value, jid: &str) -> &'a serde_json::Value {
    report["barriers"]
        .as_array()
        .expect("barriers")
        .iter()
        .find(|b| b["job_id"] == jid)
        .unwrap_or_else(|| panic!("no barrier for job {jid}: {report:#}"))
}

/// What differs between the backends in this test.
trait Backend {
    type Db: TestDatabase<Conn = Self::Conn>;
    type Conn: BarrierConnection + SimpleConnection;
    /// `column` moved `days` days into the past, as SQL.
    fn days_ago(column: &str, days: u32) -> String;
}

struct Pg;
impl Backend for Pg {
    type Db = PgTestSchema;
    type Conn = PgConnection;
    fn days_ago(column: &str, days: u32) -> String {
        format!("{column} - interval '{days} days'")
    }
}

struct My;
impl Backend for My {
    type Db = MysqlTestDatabase;
    type Conn = MysqlConnection;
    fn days_ago(column: &str, days: u32) -> String {
        format!("{column} - INTERVAL {days} DAY")
    }
}

/// Commits a barrier for a job on `queue`, which no worker reads; returns its job id.
fn commit<B: Backend>(conn: &mut B::Conn, producer: &Producer, kind: &str, queue: &str) -> String {
    conn.transaction(|c| {
        c.enqueue_with_barrier(producer, Job::new(kind, vec![1]).on_queue(queue))
            .map(|jid| jid.as_str().to_string())
    })
    .expect("commit")
}

fn status_reap_and_reconcile<B: Backend>() {
    let db = B::Db::create();
    let url = db.url();
    let faktory = TestFaktory::from_env_or_start().expect("faktory");
    let queue = faktory.unique_queue("dtb-cli");
    let producer = Producer::connect(&faktory.url()).expect("producer");
    let mut conn = db.connect();

    // An empty table: nothing to report.
    let out = dtb(&["--database-url", &url, "status"]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("ok: no problems"), "{}", stdout(&out));

    // A committed barrier pushed just now: waiting for a worker, no problem.
    let waiting = commit::<B>(&mut conn, &producer, "send_receipt", &queue);
    let (exit, report) = status_json(&url, &[]);
    assert_eq!(exit, 0, "{report:#}");
    assert_eq!(barrier(&report, &waiting)["category"], "waiting");
    assert_eq!(barrier(&report, &waiting)["state"], "committed");
    assert_eq!(barrier(&report, &waiting)["job_kind"], "send_receipt");
    assert_eq!(barrier(&report, &waiting)["job_queue"], queue.as_str());

    // A committed barrier whose job was pushed two days ago and never taken: unconsumed. One
    // created three days ago: old.
    let unconsumed = commit::<B>(&mut conn, &producer, "ship_order", &queue);
    conn.batch_execute(&format!(
        "UPDATE dtb_barriers SET pushed_at = {} WHERE job_id = '{unconsumed}'",
        B::days_ago("pushed_at", 2)
    ))
    .expect("age the push");
    let old = commit::<B>(&mut conn, &producer, "refund", &queue);
    conn.batch_execute(&format!(
        "UPDATE dtb_barriers SET created_at = {}, pushed_at = {} WHERE job_id = '{old}'",
        B::days_ago("created_at", 3),
        B::days_ago("pushed_at", 3)
    ))
    .expect("age the barrier");

    // A worker's transaction consuming the waiting barrier (deleting it through its primary
    // key, as a worker does), and a producer whose transaction is still open, while dtb looks.
    let waiting_id = barrier(&report, &waiting)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut producer_conn = db.connect();
    let mut pending = None;
    let mut looked = None;
    let rolled_back = conn.transaction(|w| {
        w.batch_execute(&format!(
            "DELETE FROM dtb_barriers WHERE id = '{waiting_id}'"
        ))?;
        producer_conn.transaction(|c| {
            let jid =
                c.enqueue_with_barrier(&producer, Job::new("invoice", vec![2]).on_queue(&queue))?;
            pending = Some(jid.as_str().to_string());
            let text = dtb(&["--database-url", &url, "status", "--grace", "1d"]);
            let json = status_json(&url, &["--older-than", "1d", "--grace", "1h"]);
            looked = Some((text, json));
            Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
        })
    });
    assert!(rolled_back.is_err());
    let (text, (exit, report)) = looked.expect("looked");
    let pending = pending.expect("enqueued");

    // The text report: one line per barrier, oldest first, and the verdict.
    let shown = stdout(&text);
    assert_eq!(code(&text), 1, "{shown}{}", stderr(&text));
    assert!(
        shown.contains("PROBLEMS: 2 (1 older than 1h, 1 committed but not consumed within 1d)"),
        "{shown}"
    );
    let line = |jid: &str| {
        shown
            .lines()
            .find(|l| l.contains(jid))
            .unwrap_or_else(|| panic!("no line for {jid}: {shown}"))
            .to_string()
    };
    assert!(line(&old).starts_with("old "), "{shown}");
    assert!(line(&old).contains("refund"), "{shown}");
    assert!(line(&old).contains("  3d  "), "{shown}");
    // Under a grace of a day, the job pushed two days ago is still unconsumed.
    assert!(line(&unconsumed).starts_with("unconsumed "), "{shown}");
    assert!(line(&waiting).starts_with("consuming "), "{shown}");
    assert!(
        shown.find(&old) < shown.find(&unconsumed),
        "oldest first: {shown}"
    );

    // The JSON report, with other thresholds: the three-day-old barrier is old, the one
    // pushed two days ago is unconsumed.
    assert_eq!(exit, 1, "{report:#}");
    assert_eq!(report["problems"], 2, "{report:#}");
    assert_eq!(report["counts"]["old"], 1, "{report:#}");
    assert_eq!(report["counts"]["unconsumed"], 1, "{report:#}");
    assert_eq!(report["counts"]["consuming"], 1, "{report:#}");
    assert_eq!(barrier(&report, &old)["category"], "old");
    assert!(barrier(&report, &old)["age_secs"].as_f64().unwrap() > 3.0 * 86_400.0 - 60.0);
    assert_eq!(barrier(&report, &unconsumed)["category"], "unconsumed");
    assert_eq!(barrier(&report, &unconsumed)["job_kind"], "ship_order");
    assert_eq!(barrier(&report, &waiting)["category"], "consuming");
    assert_eq!(barrier(&report, &waiting)["state"], "consuming");
    // The pending barrier: on MySQL the row itself and its producer's session; on
    // PostgreSQL, where it is invisible, its producer's open transaction.
    match B::Conn::backend_name() {
        "mysql" => {
            let b = barrier(&report, &pending);
            assert_eq!(b["category"], "pending", "{report:#}");
            assert_eq!(b["state"], "pending");
            assert_eq!(b["job_kind"], "invoice");
            let producer = b["transaction"].as_str().expect("the producer's session");
            assert!(producer.contains("MySQL thread"), "{producer}");
            assert_eq!(report["counts"]["pending"], 1, "{report:#}");
        }
        _ => {
            assert!(
                report["barriers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|b| b["job_id"] != pending.as_str()),
                "an uncommitted row is invisible: {report:#}"
            );
            let open = report["open_transactions"].as_array().unwrap();
            assert_eq!(open.len(), 1, "the producer, not the consumer: {report:#}");
            assert_eq!(open[0]["old"], false);
            let description = open[0]["description"].as_str().unwrap();
            assert!(description.contains("idle in transaction"), "{description}");
            let consumer = barrier(&report, &waiting)["transaction"].as_str().unwrap();
            assert!(consumer.starts_with("pid "), "{consumer}");
        }
    }

    // Both rolled back: the pending barrier is gone, the waiting one is back.
    let (exit, report) = status_json(&url, &["--older-than", "1d", "--grace", "1h"]);
    assert_eq!(exit, 1);
    assert_eq!(report["total"], 3, "{report:#}");
    assert_eq!(report["open_transactions"].as_array().unwrap().len(), 0);
    assert_eq!(barrier(&report, &waiting)["category"], "waiting");

    // The reconciler pushes the unconsumed job again (and leaves the old one to the reaper).
    let before = faktory
        .server_or_skip("the queue's size")
        .map(|s| s.queue_size(&queue));
    let out = dtb(&[
        "--database-url",
        &url,
        "reconcile",
        "--grace",
        "1h",
        "--max-age",
        "1d",
        "--faktory-url",
        &faktory.url(),
    ]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        stdout(&out).trim(),
        "pushed 1 job again (committed, not consumed within 1h)"
    );
    if let (Some(server), Some(before)) = (faktory.server_or_skip("the queue's size"), before) {
        assert_eq!(server.queue_size(&queue), before + 1);
    }
    let (_, report) = status_json(&url, &["--older-than", "1d", "--grace", "1h"]);
    assert_eq!(barrier(&report, &unconsumed)["category"], "waiting");

    // The reaper deletes the old one; what is left is no problem.
    let out = dtb(&["--database-url", &url, "reap", "--older-than", "1d"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "reaped 1 barrier older than 1d");
    let (exit, report) = status_json(&url, &["--older-than", "1d", "--grace", "1h"]);
    assert_eq!(exit, 0, "{report:#}");
    assert_eq!(report["total"], 2, "{report:#}");
    assert_eq!(report["problems"], 0, "{report:#}");

    // The database may come from DATABASE_URL too.
    let out = Command::new(env!("CARGO_BIN_EXE_dtb"))
        .args(["status", "--older-than", "1d", "--grace", "1h"])
        .env("DATABASE_URL", &url)
        .output()
        .expect("dtb runs");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

/// What exits 2: a database without the barrier table, one that cannot be reached, and a
/// Faktory that cannot be reached.
fn cannot_run<B: Backend>(unreachable: &str) {
    let db = B::Db::create_unmigrated();
    let out = dtb(&["--database-url", &db.url(), "status"]);
    assert_eq!(code(&out), 2, "{}", stdout(&out));
    assert!(stdout(&out).is_empty());
    assert!(
        stderr(&out).contains("run diesel_transaction_barrier::run_migrations"),
        "{}",
        stderr(&out)
    );
    let out = dtb(&["--database-url", unreachable, "reap"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).starts_with("dtb: cannot connect to the database"),
        "{}",
        stderr(&out)
    );
    let db = B::Db::create();
    let out = dtb(&[
        "--database-url",
        &db.url(),
        "reconcile",
        "--faktory-url",
        "tcp://127.0.0.1:1",
    ]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).starts_with("dtb: cannot reach Faktory"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn postgres_status_reap_and_reconcile() {
    status_reap_and_reconcile::<Pg>();
}

#[test]
fn mysql_status_reap_and_reconcile() {
    status_reap_and_reconcile::<My>();
}

#[test]
fn postgres_failures_exit_2() {
    cannot_run::<Pg>("postgres://postgres@127.0.0.1:1/test");
}

#[test]
fn mysql_failures_exit_2() {
    cannot_run::<My>("mysql://root@127.0.0.1:1/test");
}

#[test]
fn no_database_exits_2() {
    let out = dtb(&["status"]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("--database-url"), "{}", stderr(&out));
    let out = dtb(&["status", "--older-than", "soon"]);
    assert_eq!(code(&out), 2);
    let out = dtb(&["--help"]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).contains("Exit codes"), "{}", stdout(&out));
}

/// SQLite: committed rows only, by file path; a path with no file is refused rather than
/// created.
#[cfg(feature = "sqlite")]
#[test]
fn sqlite_status_and_reap() {
    use diesel_transaction_barrier::testing::SqliteTestFile;
    let db = SqliteTestFile::create();
    let url = db.url();
    let faktory = TestFaktory::from_env_or_start().expect("faktory");
    let queue = faktory.unique_queue("dtb-cli");
    let producer = Producer::connect(&faktory.url()).expect("producer");
    let mut conn = db.connect();
    let old = conn
        .transaction(|c| {
            c.enqueue_with_barrier(&producer, Job::new("refund", vec![1]).on_queue(&queue))
                .map(|jid| jid.as_str().to_string())
        })
        .expect("commit");
    conn.batch_execute(
        "UPDATE dtb_barriers SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-3 days')",
    )
    .expect("age the barrier");
    let (exit, report) = status_json(&url, &[]);
    assert_eq!(exit, 1, "{report:#}");
    assert_eq!(report["backend"], "sqlite");
    assert_eq!(barrier(&report, &old)["category"], "old");
    assert_eq!(barrier(&report, &old)["job_kind"], "refund");
    let out = dtb(&[
        "--database-url",
        &format!("sqlite://{url}"),
        "reap",
        "--older-than",
        "1d",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), "reaped 1 barrier older than 1d");
    let (exit, report) = status_json(&url, &[]);
    assert_eq!((exit, &report["total"]), (0, &serde_json::json!(0)));

    let missing = db.path().with_file_name("missing.db");
    let out = dtb(&["--database-url", missing.to_str().unwrap(), "status"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("no SQLite database file"),
        "{}",
        stderr(&out)
    );
    assert!(!missing.exists());
}
