//! The barrier contract on SQLite. Each test gets a database file of its own, in a temporary
//! directory that is removed when the test ends.
//!
//! SQLite has no server, so three `TestDb` methods have no direct equivalent:
//!
//! * `session_id`: a connection has no server-side id. It returns a number unique in this
//!   process, and nothing else uses it.
//! * `waiters_on`: SQLite cannot list who waits for a lock, and the worker never blocks on one
//!   (its checks try the lock without waiting). The shared scenarios watch the worker's own
//!   count of waiting jobs (`WorkerMonitor::waiting`) instead; this method panics.
//! * `kill`: nothing can end another connection's transaction in SQLite. What a killed
//!   producer means here is a producer *process* that dies mid-transaction: see
//!   `killed_producer_aborts` below, which runs the producer as a child process (this test
//!   binary, run again with `producer_child` as its only test) and kills it.
//!
//! Four shared scenarios have SQLite versions in this file, each saying why.
#![cfg(feature = "sqlite")]

mod common;

use common::scenarios;
use common::{
    drain_with_sentinel, expect_no_run, expect_run, handlers, insert_order, next_id, runs_of,
    wait_until, Env, Ran, RunningWorker, TestDb, EVENTUALLY, PAID,
};
use crossbeam_channel::{unbounded, Receiver};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel_transaction_barrier::testing::JobEventKind;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Job, Producer};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

struct Lite {
    dir: PathBuf,
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

/// The database file's name inside the test's directory.
const FILE: &str = "test.db";

impl Lite {
    fn with_dir(migrate: bool) -> Lite {
        let dir =
            std::env::temp_dir().join(format!("dtb-sqlite-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let db = Lite { dir };
        let mut conn = db.connect();
        if migrate {
            diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        } else {
            // The same journal mode as the migrated databases, without the barrier table.
            Lite::exec(&mut conn, "PRAGMA journal_mode = WAL");
        }
        common::create_app_tables::<Lite>(&mut conn);
        db
    }
}

impl Drop for Lite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestDb for Lite {
    type Conn = SqliteConnection;

    fn create() -> Self {
        Lite::with_dir(true)
    }

    fn create_unmigrated() -> Self {
        Lite::with_dir(false)
    }

    fn url(&self) -> String {
        self.dir.join(FILE).to_string_lossy().into_owned()
    }

    /// An application connection. Like any SQLite application with more than one connection,
    /// it needs a busy timeout: the worker holds the write lock for a moment while it checks
    /// for a rollback, and while a handler runs. (The worker's pool needs none: the backend sets
    /// what it needs.)
    fn connect(&self) -> SqliteConnection {
        let mut conn = SqliteConnection::establish(&self.url()).expect("connect");
        conn.batch_execute("PRAGMA busy_timeout = 10000")
            .expect("busy timeout");
        conn
    }

    fn exec(conn: &mut SqliteConnection, sql: &str) {
        diesel::sql_query(sql)
            .execute(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn query_i64(conn: &mut SqliteConnection, sql: &str) -> Option<i64> {
        diesel::sql_query(format!("SELECT CAST(({sql}) AS INTEGER) AS v"))
            .get_result::<I64Row>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
    }

    fn query_string(conn: &mut SqliteConnection, sql: &str) -> Option<String> {
        diesel::sql_query(format!("SELECT CAST(({sql}) AS TEXT) AS v"))
            .get_result::<TextRow>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
    }

    fn session_id(_conn: &mut SqliteConnection) -> i64 {
        static NEXT: AtomicI64 = AtomicI64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    fn waiters_on(&self, _session: i64) -> i64 {
        panic!("SQLite cannot tell who waits for a lock; watch the worker's monitor instead");
    }

    fn kill(&self, _session: i64) {
        panic!("SQLite has no server on which to kill a session; see killed_producer_aborts");
    }
}

#[test]
fn commit_runs_after_commit() {
    scenarios::commit_runs_after_commit::<Lite>();
}

#[test]
fn error_rolls_back() {
    scenarios::error_rolls_back::<Lite>();
}

#[test]
fn panic_rolls_back() {
    scenarios::panic_rolls_back::<Lite>();
}

#[test]
fn rolled_back_savepoint_never_runs() {
    scenarios::rolled_back_savepoint_never_runs::<Lite>();
}

#[test]
fn released_savepoint_runs() {
    scenarios::released_savepoint_runs::<Lite>();
}

/// The shared scenario with one change: it waits for the handler's transaction to commit before
/// counting the handler's rows. The handler reports on its channel from inside that transaction,
/// so the shared body's immediate `runs_of(..) == 1` races the worker's COMMIT on every backend;
/// SQLite, whose connections open in microseconds, loses the race.
#[test]
fn autocommit_runs_without_barrier() {
    let env = Env::<Lite>::new();
    let (tx, rx) = unbounded();
    let id = next_id();
    let mut conn = env.db.connect();
    insert_order::<Lite>(&mut conn, id, "paid");
    conn.enqueue_with_barrier(&env.producer, env.job(PAID, id))
        .unwrap();
    assert_eq!(env.db.barrier_rows(), 0, "autocommit writes no barrier row");
    let _worker = env.start_worker(handlers::<Lite>(&tx), 1);
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    assert_eq!(ran.seen_status.as_deref(), Some("paid"));
    wait_until("the handler's transaction to commit", EVENTUALLY, || {
        runs_of(&env.db, id) >= 1
    });
    expect_no_run(&rx, "the job runs once");
    assert_eq!(runs_of(&env.db, id), 1);
}

#[test]
fn barrier_required_and_opt_out() {
    scenarios::barrier_required_and_opt_out::<Lite>();
}

#[test]
fn inline_runs_at_once() {
    scenarios::inline_runs_at_once::<Lite>();
}

#[test]
fn fetched_after_commit_runs_at_once() {
    scenarios::fetched_after_commit_runs_at_once::<Lite>();
}

#[test]
fn duplicate_delivery_runs_once() {
    scenarios::duplicate_delivery_runs_once::<Lite>();
}

#[test]
fn faktory_unreachable_rolls_back() {
    scenarios::faktory_unreachable_rolls_back::<Lite>();
}

#[test]
fn missing_migrations_are_reported() {
    scenarios::missing_migrations_are_reported::<Lite>();
}

#[test]
fn snoozed_after_block_limit() {
    scenarios::snoozed_after_block_limit::<Lite>();
}

#[test]
fn reaper_deletes_old_barriers() {
    scenarios::reaper_deletes_old_barriers::<Lite>();
}

#[test]
fn graceful_shutdown_loses_nothing() {
    scenarios::graceful_shutdown_loses_nothing::<Lite>();
}

/// The shared scenario's part (a), and all jobs running once after the commit. Its part (b), a
/// ready job committed and run while the others wait, cannot happen on SQLite: the waiting
/// jobs' transaction holds the database's only write lock, so the ready job's transaction
/// cannot commit (nor could its handler's transaction begin) until that one ends.
#[test]
fn many_waiting_jobs_hold_few_connections() {
    let env = Env::<Lite>::new();
    let (tx, rx) = unbounded();
    let pool = env.db.pool(8);
    let worker = env.start_worker_on(pool.clone(), handlers::<Lite>(&tx), |b| {
        b.workers(2).max_waiting(250)
    });
    let waiting = 200;
    let ids: Vec<i64> = (0..waiting).map(|_| next_id()).collect();
    let mut conn = env.db.connect();
    let held = conn
        .transaction(|c| {
            for &id in &ids {
                insert_order::<Lite>(c, id, "paid");
                c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
            }
            worker.wait_for_waiting(waiting);
            expect_no_run(&rx, "the transaction is still open");
            let state = pool.state();
            Ok::<_, Error>(state.connections - state.idle_connections)
        })
        .unwrap();
    assert!(
        held <= 3,
        "the worker held {held} connections while {waiting} jobs waited"
    );
    let mut seen = std::collections::HashSet::new();
    while seen.len() < waiting {
        let ran = expect_run(&rx);
        assert!(seen.insert(ran.order_id), "ran twice: {ran:?}");
    }
    assert!(ids.iter().all(|id| seen.contains(id)));
    wait_until("all barriers consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

/// The shared scenario without its check for "txid" in the failure message: SQLite has no
/// transaction ids. What the message says about the transaction is checked instead.
#[test]
fn barrier_timeout_after_deadline() {
    let env = Env::<Lite>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Lite>(&tx), |b| {
        b.workers(1)
            .block_limit(Duration::from_millis(200))
            .deadline(Duration::from_millis(800))
    });
    let id = next_id();
    let mut conn = env.db.connect();
    let mut job = env.job(PAID, id);
    job.retry = Some(1);
    let result = conn.transaction(|c| {
        insert_order::<Lite>(c, id, "paid");
        c.enqueue_with_barrier(&env.producer, job)?;
        wait_until("the barrier to time out", EVENTUALLY, || {
            worker.monitor.timed_out() >= 1
        });
        Err::<(), _>(Error::Config("roll back at last".into()))
    });
    assert!(result.is_err());
    expect_no_run(&rx, "timed out");
    match env.faktory.server() {
        Some(server) => {
            let failed = server.wait_for(|s| !s.retry_jobs().is_empty(), EVENTUALLY);
            assert!(failed, "the job failed and waits for its retry");
            let job = &server.retry_jobs()[0];
            let message = job["failure"]["message"].as_str().unwrap_or_default();
            assert!(message.contains("still open"), "{message}");
            assert!(
                message.contains("transaction: the write lock is held by another connection"),
                "the message carries the debug info: {message}"
            );
            assert!(message.contains("journal_mode wal"), "{message}");
        }
        None => eprintln!("real Faktory: skipping the failure-message inspection"),
    }
}

// ---- 4. The producer dies mid-transaction ----
//
// The shared scenario kills the producer's *session* from another connection and expects its
// commit to fail. SQLite has no sessions to kill: nothing can end another connection's
// transaction. The SQLite equivalent of a killed producer is a producer process that dies in
// the middle of its transaction, so the producer here is a child process: this test binary run
// again with only `producer_child`, told what to do through environment variables. It enqueues
// inside a transaction, prints the job id and waits; once the worker is seen waiting on its
// transaction, the child is killed (SIGKILL) or told to exit (`std::process::exit`, which runs
// no destructors). Either way its connection never sends COMMIT or ROLLBACK.

/// Set in the child's environment; holds the database path.
const CHILD_DB: &str = "DTB_SQLITE_CHILD_DB";
const CHILD_FAKTORY: &str = "DTB_SQLITE_CHILD_FAKTORY";
const CHILD_QUEUE: &str = "DTB_SQLITE_CHILD_QUEUE";
const CHILD_ORDER: &str = "DTB_SQLITE_CHILD_ORDER";
/// The child's stdout line that carries the job id.
const JID_LINE: &str = "dtb-child-jid: ";
/// The exit code of a child told to exit.
const EXIT_CODE: i32 = 3;

#[derive(Debug, Clone, Copy)]
enum Death {
    /// The parent kills the child with SIGKILL.
    Killed,
    /// The child calls `std::process::exit` itself.
    Exits,
}

#[test]
fn killed_producer_aborts() {
    producer_dies_mid_transaction(Death::Killed);
}

#[test]
fn exiting_producer_aborts() {
    producer_dies_mid_transaction(Death::Exits);
}

/// The producer process of `killed_producer_aborts`; does nothing unless started by it.
#[test]
#[ignore = "the child process of killed_producer_aborts and exiting_producer_aborts"]
fn producer_child() {
    let Ok(db) = std::env::var(CHILD_DB) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let id: i64 = var(CHILD_ORDER).parse().unwrap();
    let producer = Producer::connect(&var(CHILD_FAKTORY)).expect("producer");
    let mut conn = SqliteConnection::establish(&db).expect("connect");
    conn.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
    let _ = conn.transaction::<(), Error, _>(|c| {
        insert_order::<Lite>(c, id, "paid");
        let job = Job::new(PAID, vec![id]).on_queue(var(CHILD_QUEUE));
        let jid = c.enqueue_with_barrier(&producer, job)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{JID_LINE}{}", jid.as_str()).unwrap();
        out.flush().unwrap();
        drop(out);
        // In the middle of the transaction: wait for the word, or for SIGKILL.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        std::process::exit(EXIT_CODE)
    });
}

fn producer_dies_mid_transaction(death: Death) {
    let env = Env::<Lite>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<Lite>(&tx), 1);
    let id = next_id();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "producer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, env.db.url())
        .env(CHILD_FAKTORY, env.faktory.url())
        .env(CHILD_QUEUE, &env.queue)
        .env(CHILD_ORDER, id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the producer process");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut child = KillOnDrop(child);
    let (jid_tx, jid_rx) = unbounded();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            // The harness may have begun the line ("test producer_child ... ").
            if let Some((_, jid)) = line.unwrap_or_default().split_once(JID_LINE) {
                let _ = jid_tx.send(jid.trim().to_string());
            }
        }
    });
    let jid = jid_rx
        .recv_timeout(EVENTUALLY)
        .expect("the producer process enqueued a job");
    worker.wait_for_waiting(1);
    expect_no_run(&rx, "the producer's transaction is still open");

    match death {
        Death::Killed => child.0.kill().unwrap(),
        Death::Exits => writeln!(stdin, "exit").unwrap(),
    }
    let status = child.0.wait().unwrap();
    match death {
        Death::Killed => assert_eq!(status.code(), None, "killed by a signal: {status}"),
        Death::Exits => assert_eq!(status.code(), Some(EXIT_CODE), "{status}"),
    }

    assert_aborted(&env, &worker, &rx, id, &jid);
    let mut conn = env.db.connect();
    assert_eq!(
        Lite::query_i64(
            &mut conn,
            &format!("SELECT COUNT(*) FROM orders WHERE id = {id}")
        ),
        Some(0),
        "the dead producer's other writes are gone too"
    );
}

/// Kills the producer process if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The checks of the shared scenarios' `assert_aborted`.
fn assert_aborted(env: &Env<Lite>, worker: &RunningWorker, rx: &Receiver<Ran>, id: i64, jid: &str) {
    wait_until("the job to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= 1
    });
    let others = drain_with_sentinel(env, rx);
    assert!(others.is_empty(), "an aborted job ran: {others:?}");
    assert_eq!(runs_of(&env.db, id), 0);
    assert_eq!(env.db.barrier_rows(), 0, "no barrier row is left");
    match env.faktory.server() {
        Some(server) => {
            assert!(server.wait_until_history(jid, JobEventKind::Acked, EVENTUALLY));
            let events = server.history(jid);
            assert!(
                !events.iter().any(|e| e.kind() == JobEventKind::Failed),
                "job {jid} should not have failed: {events:?}"
            );
        }
        None => eprintln!("real Faktory: skipping the job-history inspection of {jid}"),
    }
}
