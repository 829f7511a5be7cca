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
//! Five shared scenarios have SQLite versions in this file and one is not run, each saying
//! why.
#![cfg(feature = "sqlite")]

mod common;

use common::faults::SLOW;
use common::scenarios;
use common::{
    drain_with_sentinel, expect_no_run, expect_run, handlers, insert_order, next_id,
    recording_handler, runs_of, wait_until, Env, Ran, RunningWorker, TestDb, EVENTUALLY, PAID,
};
use crossbeam_channel::{unbounded, Receiver};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel_transaction_barrier::testing::{JobEventKind, TestFaktory, TestServer};
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
        conn.batch_execute("PRAGMA busy_timeout = 60000")
            .expect("busy timeout");
        conn
    }

    fn exec(conn: &mut SqliteConnection, sql: &str) {
        diesel::sql_query(sql)
            .execute(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn try_exec(conn: &mut SqliteConnection, sql: &str) -> Result<(), diesel::result::Error> {
        diesel::sql_query(sql).execute(conn).map(|_| ())
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

#[test]
fn autocommit_runs_without_barrier() {
    scenarios::autocommit_runs_without_barrier::<Lite>();
}

#[test]
fn manual_transaction_rolled_back_never_runs() {
    scenarios::manual_transaction_rolled_back_never_runs::<Lite>();
}

#[test]
fn manual_transaction_committed_runs_after_commit() {
    scenarios::manual_transaction_committed_runs_after_commit::<Lite>();
}

#[test]
fn pooled_connection_left_in_a_transaction() {
    scenarios::pooled_connection_left_in_a_transaction::<Lite>();
}

#[test]
fn barrier_in_another_table_is_refused() {
    scenarios::barrier_in_another_table_is_refused::<Lite>();
}

#[test]
fn enqueue_after_a_failed_savepoint() {
    scenarios::enqueue_after_a_failed_savepoint::<Lite>();
}

#[test]
fn handler_recovering_from_a_failed_savepoint_runs() {
    scenarios::handler_recovering_from_a_failed_savepoint_runs::<Lite>();
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

#[test]
fn bad_input_fails_cleanly() {
    scenarios::bad_input_fails_cleanly::<Lite>();
}

#[test]
fn soak_with_oracle() {
    common::soak::soak::<Lite>();
}

#[test]
fn broker_loss_is_reconciled() {
    scenarios::broker_loss_is_reconciled::<Lite>();
}

#[test]
fn backlog_is_repushed_at_most_once_per_grace() {
    scenarios::backlog_is_repushed_at_most_once_per_grace::<Lite>();
}

// Not run on SQLite: `waiter_connections_killed_mid_wait`. It holds two write transactions
// open at once on one thread (the second waits for the first's write lock until its busy
// timeout fails it), and what it injects, killing the waiter's server sessions, does not exist
// without a server: `kill_waiter_sessions` is `None`.

#[test]
fn faktory_restart_while_worker_runs() {
    scenarios::faktory_restart_while_worker_runs::<Lite>();
}

/// The worker process of the worker-killing tests; does nothing unless started by them.
#[test]
#[ignore = "the child process of the worker-killing tests"]
fn worker_child() {
    common::faults::worker_child_main::<Lite>();
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

/// SQLite has no transaction ids: its timeout report describes the write lock and the journal
/// mode instead. (Held, or already free: the worker counts the timeout before it looks, and
/// the transaction rolls back as soon as the count shows.)
#[test]
fn barrier_timeout_after_deadline() {
    scenarios::barrier_timeout_after_deadline::<Lite>(&[
        "transaction: the write lock is",
        "journal_mode wal",
    ]);
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
    conn.batch_execute("PRAGMA busy_timeout = 60000").unwrap();
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

// ---- A worker process killed mid-wait and mid-handler ----
//
// The shared fault scenario kills the worker process while three jobs wait on an open
// transaction *and* a handler runs. On SQLite the two cannot happen at once: the open
// transaction holds the only write lock, and a handler runs inside a transaction that holds
// it too. (Run as written, the "running" handler would only be waiting for the lock.) So the
// two faults are injected one after the other, each into a worker process of its own (the
// shared `worker_child`), and the handler is known to be inside its transaction because the
// write lock is taken while no application transaction is open.

/// The variables `common::faults::worker_child_main` reads.
const WORKER_QUEUE: &str = "DTB_CHILD_QUEUE";
const WORKER_FAKTORY: &str = "DTB_CHILD_FAKTORY";
const WORKER_DB_URL: &str = "DTB_CHILD_DB_URL";

/// A worker process that answers `STATE` with its waiting and running counts.
struct WorkerProcess {
    child: KillOnDrop,
    stdin: std::process::ChildStdin,
    states: Receiver<(usize, usize)>,
}

impl WorkerProcess {
    fn start(env: &Env<Lite>) -> WorkerProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "worker_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WORKER_QUEUE, &env.queue)
            .env(WORKER_FAKTORY, env.faktory.url())
            .env(WORKER_DB_URL, env.db.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("worker process");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, states) = unbounded();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Some(rest) = line.split("STATE ").nth(1) {
                    let mut n = rest.split_whitespace().map(|n| n.parse().unwrap_or(0));
                    let _ = tx.send((n.next().unwrap_or(0), n.next().unwrap_or(0)));
                }
            }
        });
        WorkerProcess {
            child: KillOnDrop(child),
            stdin,
            states,
        }
    }

    /// (waiting, running)
    fn state(&mut self) -> (usize, usize) {
        let _ = writeln!(self.stdin, "STATE");
        self.states.recv_timeout(EVENTUALLY).unwrap_or((0, 0))
    }

    fn kill(mut self) {
        self.child.0.kill().expect("SIGKILL the worker process");
        let _ = self.child.0.wait();
    }
}

/// Whether some connection holds the database's write lock now.
fn write_lock_held(db: &Lite) -> bool {
    let mut probe = SqliteConnection::establish(&db.url()).unwrap();
    probe
        .immediate_transaction(|_| Ok::<_, diesel::result::Error>(()))
        .is_err()
}

#[test]
fn worker_killed_mid_wait_and_mid_handler() {
    // Redelivery needs the reservation to run out: short on the test server, the real
    // server's minimum (60 s) otherwise.
    let (faktory, reserve_for) = match std::env::var("FAKTORY_URL") {
        Ok(url) if !url.is_empty() => (TestFaktory::from_env_or_start().unwrap(), 61),
        _ => (
            TestFaktory::local(
                TestServer::builder()
                    .min_reserve_for(Duration::from_secs(1))
                    .retry_delay(Duration::from_millis(200))
                    .start()
                    .unwrap(),
            ),
            2,
        ),
    };
    let mut env = Env::<Lite>::with_db_and_faktory(Lite::create(), faktory);
    let job = |env: &Env<Lite>, kind: &str, id: i64| {
        let mut j = env.job(kind, id);
        j.reserve_for = Some(Duration::from_secs(reserve_for));
        j
    };
    let (tx, rx) = unbounded();
    let handlers = || {
        handlers::<Lite>(&tx).register_without_barrier(SLOW, recording_handler::<Lite>(tx.clone()))
    };
    // An expired reservation counts as a failure: the job comes back after Faktory's retry
    // delay (15 to 45 s for a first retry on a real server).
    let redelivery = Duration::from_secs(reserve_for + 60);
    let mut conn = env.db.connect();

    // 1. Killed while three jobs wait on an open transaction.
    let waiting_ids: Vec<i64> = (0..3).map(|_| next_id()).collect();
    let mut child = Some(WorkerProcess::start(&env));
    conn.transaction(|c| {
        for &id in &waiting_ids {
            insert_order::<Lite>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, job(&env, PAID, id))?;
        }
        let process = child.as_mut().unwrap();
        wait_until("the worker process to wait on 3 jobs", EVENTUALLY, || {
            process.state().0 >= 3
        });
        child.take().unwrap().kill();
        Ok::<_, Error>(())
    })
    .unwrap();
    let first_queue = env.queue.clone();

    // 2. Killed while a handler runs inside its transaction, while the jobs of part 1 are
    // still reserved to the dead process (so that both wait for their reservations at once).
    //
    // On a new queue: the killed process's pending FETCHes went with its connections, but
    // Faktory goes on serving each for up to its 2 s fetch timeout, and a job pushed
    // meanwhile to the queue they named would be reserved to a connection that is gone.
    env.queue = env.faktory.unique_queue("dtb");
    let mut child = WorkerProcess::start(&env);
    let slow_id = next_id();
    insert_order::<Lite>(&mut conn, slow_id, "paid");
    env.producer.push(job(&env, SLOW, slow_id)).unwrap();
    wait_until(
        "the handler to run in the worker process",
        EVENTUALLY,
        || child.state().1 >= 1 && write_lock_held(&env.db),
    );
    child.kill();
    assert!(!write_lock_held(&env.db), "the dead process's lock is gone");
    assert_eq!(
        runs_of(&env.db, slow_id),
        0,
        "the killed handler's writes rolled back"
    );

    // New workers on both queues: Faktory hands the reserved jobs out again once their
    // reservations run out.
    let second = env.start_worker(handlers(), 2);
    env.queue = first_queue;
    let first = env.start_worker(handlers(), 2);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < waiting_ids.len() + 1 {
        let ran = rx
            .recv_timeout(redelivery)
            .expect("every committed job completes after the restart");
        assert!(seen.insert(ran.order_id), "ran twice: {ran:?}");
    }
    let expected: std::collections::HashSet<i64> =
        waiting_ids.iter().copied().chain([slow_id]).collect();
    assert_eq!(seen, expected);
    for id in waiting_ids.iter().chain([&slow_id]) {
        wait_until("the run to commit", EVENTUALLY, || {
            runs_of(&env.db, *id) == 1
        });
    }
    wait_until("no barrier left", EVENTUALLY, || env.db.barrier_rows() == 0);
    expect_no_run(&rx, "each job ran once");
    drop((first, second));
}
