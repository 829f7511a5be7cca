//! The barrier contract on real MariaDB / MySQL (`MYSQL_DATABASE_URL`, default
//! `mysql://root@127.0.0.1:3306/test`, an account that may create databases and users). Each
//! test gets a database of its own; the tests of `no_process` and the `no_process_*` tests
//! reach it through an account of its own that lacks the PROCESS privilege.
#![cfg(feature = "mysql")]

mod common;
#[path = "mysql/watchers.rs"]
mod watchers;

use common::mysql::{record_warnings, recorded, ExclusiveTicket, NoProcess, Root};
use common::*;
use crossbeam_channel::unbounded;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel_transaction_barrier::testing::{JobEventKind, MysqlTestDatabase, TestDatabase};
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Handlers, Job};
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The shared scenarios, as the administrative account.

common::suite::scenario_tests! {
    Root;
    exclude {}
}

// ---------------------------------------------------------------------------------------------
// Without the PROCESS privilege: the producer and the worker run as an account that cannot
// read innodb_trx, and everything still holds.

common::suite::scenario_tests! {
    mod no_process: NoProcess;
    only {
        commit_runs_after_commit,
        error_rolls_back,
        killed_producer_aborts,
        rolled_back_savepoint_never_runs,
    }
}

#[test]
fn no_process_worker_warns_once() {
    record_warnings();
    let env = Env::<NoProcess>::new();
    let account = env.db.account();
    let mut conn = env.db.connect();
    let denied = diesel::sql_query("SELECT COUNT(*) AS v FROM information_schema.INNODB_TRX")
        .get_result::<I64Row>(&mut conn);
    assert!(denied.is_err(), "{account} must not have PROCESS");

    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<NoProcess>(&tx), 2);
    let id = next_id();
    commit_order(&env, id, env.job(PAID, id));
    assert_eq!(expect_run(&rx).order_id, id);
    // The handler reports before its transaction, which consumes the barrier, commits.
    wait_until("the barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });

    let warnings = recorded(&account);
    assert_eq!(warnings.len(), 1, "exactly one warning: {warnings:?}");
    assert!(
        warnings[0].contains("lacks the PROCESS privilege"),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains(&format!("GRANT PROCESS ON *.* TO {account}")),
        "{warnings:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Timeouts are described from innodb_trx when the worker may read it, and still described
// (less) when it may not.

fn timeout_report<D: TestDb<Conn = MysqlConnection>>(env: Env<D>) -> String {
    let (tx, _rx) = unbounded();
    let _worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.workers(1)
            .deadline(Duration::from_secs(1))
            .block_limit(Duration::from_secs(1))
    });
    let id = next_id();
    let mut conn = env.db.connect();
    let session = D::session_id(&mut conn);
    let result = conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        let jid = c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        // The worker reports the timeout (reading innodb_trx while this transaction is still
        // open), then fails the job.
        wait_until("the barrier timeout report", EVENTUALLY, || {
            recorded(jid.as_str())
                .iter()
                .any(|r| r.contains("barrier timed out"))
        });
        if let Some(server) = env.faktory.server_or_skip("the job's Failed history") {
            assert!(
                server.wait_until_history(jid.as_str(), JobEventKind::Failed, EVENTUALLY),
                "the job fails with a barrier timeout"
            );
        }
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());
    let reports: Vec<String> = recorded(&format!("MySQL thread {session}"))
        .into_iter()
        .filter(|r| r.contains("barrier timed out"))
        .collect();
    assert!(!reports.is_empty(), "the timeout was reported");
    eprintln!("timeout report: {}", reports[0]);
    reports[0].clone()
}

#[test]
fn timeout_report_reads_innodb_trx() {
    record_warnings();
    let report = timeout_report(Env::<Root>::new());
    assert!(report.contains("RUNNING"), "{report}");
    assert!(report.contains("rows modified"), "{report}");
}

#[test]
fn no_process_timeout_report_says_what_is_missing() {
    record_warnings();
    let env = Env::<NoProcess>::new();
    let user = env.db.database().user().to_string();
    let report = timeout_report(env);
    assert!(report.contains("needs the PROCESS privilege"), "{report}");
    // The producer runs as the same account, so the process list still shows it.
    assert!(
        report.contains(&format!("connection of {user}@")),
        "{report}"
    );
}

// ---------------------------------------------------------------------------------------------
// The worker waits on a producer's row with one watcher per transaction, and never holds the
// producer up.

#[test]
fn one_watcher_waits_per_transaction_and_never_holds_the_producer_up() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<Root>(&tx), 2);
    let mut conn = env.db.connect();
    let session = Root::session_id(&mut conn);
    let ids: Vec<i64> = (0..3).map(|_| next_id()).collect();
    conn.transaction(|c| {
        for &id in &ids {
            insert_order::<Root>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        }
        worker.wait_for_waiting(ids.len());
        wait_until("a watcher to wait on the transaction", EVENTUALLY, || {
            env.db.waiters_on(session) == 1
        });
        // The producer goes on writing, its barrier rows too, without waiting for anyone.
        let started = std::time::Instant::now();
        for &id in &ids {
            set_status::<Root>(c, id, "paid");
        }
        Root::exec(c, "UPDATE dtb_barriers SET pushed_at = NOW(6)");
        let more = next_id();
        insert_order::<Root>(c, more, "paid");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, more))?;
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(
            env.db.waiters_on(session),
            1,
            "one watcher, however many jobs"
        );
        expect_no_run(&rx, "the transaction is still open");
        Ok::<_, Error>(())
    })
    .unwrap();
    expect_run(&rx);
    for _ in &ids {
        expect_run(&rx);
    }
    wait_until("the barrier rows to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

#[test]
fn waiters_on_sees_a_lock_wait() {
    // The helper itself: a session blocked on the producer's row is counted.
    let db = Root::create();
    let id = next_id();
    let mut producer = db.connect();
    let session = Root::session_id(&mut producer);
    std::thread::scope(|s| {
        let (locked_tx, locked_rx) = unbounded::<()>();
        let (end_tx, end_rx) = unbounded::<()>();
        s.spawn(move || {
            producer
                .transaction(|c| {
                    insert_order::<Root>(c, id, "new");
                    locked_tx.send(()).unwrap();
                    end_rx.recv().unwrap();
                    Ok::<_, diesel::result::Error>(())
                })
                .unwrap();
        });
        locked_rx.recv().unwrap();
        assert_eq!(db.waiters_on(session), 0);
        let db = &db;
        s.spawn(move || {
            let mut other = db.connect();
            Root::exec(
                &mut other,
                &format!("UPDATE orders SET status = 'seen' WHERE id = {id}"),
            );
        });
        wait_until("a lock wait", EVENTUALLY, || db.waiters_on(session) == 1);
        end_tx.send(()).unwrap();
    });
    let mut c = db.connect();
    assert_eq!(
        Root::query_string(
            &mut c,
            &format!("SELECT status FROM orders WHERE id = {id}")
        )
        .as_deref(),
        Some("seen")
    );
}

// ---------------------------------------------------------------------------------------------
// Durability: the handler starts only once the worker's own fence write is committed.

#[test]
fn handler_starts_after_the_fence_commits() {
    let env = Env::<Root>::new();
    let url = env.db.url();
    let (tx, rx) = unbounded::<(i64, Option<i64>)>();
    let handlers = Handlers::new().register(PAID, move |job: &Job, _conn: &mut MysqlConnection| {
        let order_id = job.args()[0].as_i64().expect("order id");
        // A separate autocommit connection sees only committed data.
        let mut side = MysqlConnection::establish(&url)?;
        let fences = diesel::sql_query(
            "SELECT CAST(COALESCE(SUM(fences), 0) AS SIGNED) AS v FROM dtb_fences",
        )
        .get_result::<I64Row>(&mut side)?
        .v;
        let _ = tx.send((order_id, fences));
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    });
    let worker = env.start_worker(handlers, 2);
    let mut seen_fences = 0;
    for round in 0..10 {
        let id = next_id();
        let mut conn = env.db.connect();
        conn.transaction(|c| {
            insert_order::<Root>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
            if round % 2 == 0 {
                // Half of them with the worker already waiting for the barrier.
                worker.wait_for_waiting(1);
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        let (ran, fences) = rx.recv_timeout(EVENTUALLY).expect("the handler ran");
        assert_eq!(ran, id);
        // One at a time, no handler commit comes after a commit is seen and before its job
        // starts: each start follows a fence of its own (the waiter's, or a watcher's).
        assert!(
            fences.unwrap_or(0) > seen_fences,
            "round {round}: a fence committed before the handler started ({fences:?})"
        );
        seen_fences = fences.unwrap_or(0);
    }
    wait_until("the barrier rows to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

// ---------------------------------------------------------------------------------------------
// A stale innodb_trx cache changes nothing: the verdict never reads it.

/// Threads reading innodb_trx every 10 ms until stopped or dropped.
struct Pollers {
    stop: Arc<AtomicBool>,
    polls: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Pollers {
    fn start(db: &Root, n: usize) -> Pollers {
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let (stop, polls) = (Arc::clone(&stop), Arc::clone(&polls));
                let mut c = db.database().admin();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        Root::query_i64(
                            &mut c,
                            "SELECT COUNT(*) FROM information_schema.INNODB_TRX",
                        );
                        polls.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                })
            })
            .collect();
        Pollers {
            stop,
            polls,
            threads,
        }
    }

    /// Stops the threads and returns how many reads they made.
    fn stop(mut self) -> u64 {
        self.join();
        self.polls.load(Ordering::Relaxed)
    }

    fn join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if let Err(panic) = t.join() {
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        self.join();
    }
}

#[test]
fn stale_innodb_trx_cache_changes_nothing() {
    const PER_OUTCOME: usize = 200;
    const PRODUCERS: usize = 8;
    let _alone = ExclusiveTicket::acquire();
    let env = Env::with_db(Root::alone(MysqlTestDatabase::create()).with_app_tables());
    let (tx, rx) = unbounded();
    let worker = env.start_worker_on(env.db.pool(20), handlers::<Root>(&tx), |b| b.workers(12));

    // Two connections read innodb_trx every 10 ms, so that its cache never refreshes. They
    // stop when `pollers` is dropped, also when this test fails: left running, they would
    // freeze the cache for every later test of this binary (`waiters_on` would read a stale
    // one forever).
    let pollers = Pollers::start(&env.db, 2);

    let started = Instant::now();
    let per_thread = 2 * PER_OUTCOME / PRODUCERS;
    // Per producer thread: (order id, jid) of the committed and of the rolled-back jobs.
    type Enqueued = Vec<(i64, String)>;
    let results: Vec<(Enqueued, Enqueued)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                let env = &env;
                s.spawn(move || {
                    let mut rng = rand::thread_rng();
                    let mut conn = env.db.connect();
                    let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
                    for i in 0..per_thread {
                        let id = next_id();
                        let commit = i % 2 == 0;
                        let delay = Duration::from_millis(rng.gen_range(0..=300));
                        let mut jid = None;
                        let result = conn.transaction(|c| {
                            insert_order::<Root>(c, id, "paid");
                            jid = Some(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
                            std::thread::sleep(delay);
                            if commit {
                                Ok(())
                            } else {
                                Err(Error::Database(diesel::result::Error::RollbackTransaction))
                            }
                        });
                        let jid = jid.expect("enqueued").as_str().to_string();
                        if commit {
                            result.expect("commit");
                            committed.push((id, jid));
                        } else {
                            assert!(result.is_err());
                            rolled_back.push((id, jid));
                        }
                    }
                    (committed, rolled_back)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let committed: Vec<(i64, String)> = results.iter().flat_map(|r| r.0.clone()).collect();
    let rolled_back: Vec<(i64, String)> = results.iter().flat_map(|r| r.1.clone()).collect();
    assert_eq!(committed.len(), PER_OUTCOME);
    assert_eq!(rolled_back.len(), PER_OUTCOME);

    let all_jids: Vec<&str> = committed
        .iter()
        .chain(&rolled_back)
        .map(|(_, jid)| jid.as_str())
        .collect();
    // Every delivery processed, as the worker counts them (on any Faktory)...
    let deliveries = all_jids.len() as u64;
    wait_until(
        "every delivery to be processed",
        Duration::from_secs(60),
        || worker.monitor.processed() >= deliveries,
    );
    // ... and acknowledged, as the test server records them.
    let acked = env
        .faktory
        .server_or_skip("every job's Acked history")
        .map(|server| {
            server.wait_for(
                |s| {
                    all_jids.iter().all(|jid| {
                        s.history(jid)
                            .iter()
                            .any(|e| e.kind() == JobEventKind::Acked)
                    })
                },
                Duration::from_secs(60),
            )
        });
    let elapsed = started.elapsed();
    let polls = pollers.stop();
    assert_eq!(worker.monitor.failed(), 0, "no job failed");
    assert_eq!(
        worker.monitor.snoozed(),
        0,
        "no job was snoozed (so each delivery processed was one of these jobs)"
    );
    if let Some(server) = env
        .faktory
        .server_or_skip("every job's history without a failure")
    {
        assert_eq!(acked, Some(true), "every job was acknowledged");
        for jid in &all_jids {
            assert!(
                !server
                    .history(jid)
                    .iter()
                    .any(|e| e.kind() == JobEventKind::Failed),
                "job {jid} failed"
            );
        }
    }

    let runs: Vec<Ran> = rx.try_iter().collect();
    assert_eq!(runs.len(), PER_OUTCOME, "one run per committed transaction");
    let mut ran_ids: Vec<i64> = runs.iter().map(|r| r.order_id).collect();
    ran_ids.sort_unstable();
    let mut committed_ids: Vec<i64> = committed.iter().map(|(id, _)| *id).collect();
    committed_ids.sort_unstable();
    assert_eq!(
        ran_ids, committed_ids,
        "each committed job ran exactly once"
    );
    assert!(runs
        .iter()
        .all(|r| r.seen_status.as_deref() == Some("paid")));
    let rolled_back_ids: Vec<String> = rolled_back.iter().map(|(id, _)| id.to_string()).collect();
    let mut conn = env.db.connect();
    assert_eq!(
        Root::query_i64(
            &mut conn,
            &format!(
                "SELECT COUNT(*) FROM handler_runs WHERE order_id IN ({})",
                rolled_back_ids.join(",")
            )
        ),
        Some(0),
        "no rolled-back job ran"
    );
    assert_eq!(env.db.barrier_rows(), 0, "no barrier row is left");
    assert!(polls > 200, "innodb_trx was polled ({polls} reads)");
    eprintln!(
        "{} jobs in {elapsed:?}, innodb_trx read {polls} times meanwhile",
        2 * PER_OUTCOME
    );
}

// ---------------------------------------------------------------------------------------------
// Transactions the server opens or ends behind Diesel's back.

/// `SET autocommit = 0` opens a transaction that Diesel does not count: a job enqueued in it
/// waits for it, never runs after its rollback, and runs after its commit.
#[test]
fn autocommit_off_is_a_transaction() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<Root>(&tx), 1);
    let (rolled_back, committed) = (next_id(), next_id());
    let mut conn = env.db.connect();
    Root::exec(&mut conn, "SET autocommit = 0");
    insert_order::<Root>(&mut conn, rolled_back, "paid");
    conn.enqueue_with_barrier(&env.producer, env.job(PAID, rolled_back))
        .expect("enqueued");
    worker.wait_for_waiting(1);
    expect_no_run(&rx, "autocommit is off: the transaction is open");
    Root::exec(&mut conn, "ROLLBACK");
    wait_until("the job to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= 1
    });
    insert_order::<Root>(&mut conn, committed, "new");
    conn.enqueue_with_barrier(&env.producer, env.job(PAID, committed))
        .expect("enqueued");
    set_status::<Root>(&mut conn, committed, "paid");
    worker.wait_for_waiting(1);
    expect_no_run(&rx, "autocommit is off: the transaction is open");
    Root::exec(&mut conn, "COMMIT");
    expect_ran_once(&env, &rx, committed);
    assert_eq!(runs_of(&env.db, rolled_back), 0);
}

/// Creates `locks` (rows 1 and 2) and `ballast` in the test's database.
fn create_lock_tables(db: &Root) {
    let mut c = db.connect();
    Root::exec(
        &mut c,
        "CREATE TABLE locks (id INT PRIMARY KEY, v INT NOT NULL) ENGINE = InnoDB; \
         INSERT INTO locks VALUES (1, 0), (2, 0); \
         CREATE TABLE ballast (id INT PRIMARY KEY) ENGINE = InnoDB",
    );
}

/// On a connection of its own, a transaction much heavier than the one it deadlocks with (so
/// that InnoDB picks the other as its victim): it takes row 2 of `locks`, says so on `ready`,
/// waits for `go`, then asks for row 1 and commits.
fn heavy_deadlocker(
    url: String,
    ready: crossbeam_channel::Sender<()>,
    go: crossbeam_channel::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut c = MysqlConnection::establish(&url).expect("connect");
        c.transaction(|c| {
            let rows: Vec<String> = (1..=300).map(|i| format!("({i})")).collect();
            Root::exec(
                c,
                &format!("INSERT INTO ballast (id) VALUES {}", rows.join(", ")),
            );
            Root::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 2");
            ready.send(()).unwrap();
            go.recv().unwrap();
            Root::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 1");
            Ok::<_, diesel::result::Error>(())
        })
        .expect("the heavy transaction survives the deadlock");
    })
}

/// The producer's transaction is chosen as a deadlock victim (error 1213 rolls the whole
/// transaction back) and the application swallows the error: enqueueing must fail, or the
/// barrier insert would commit on its own and the job run for a transaction that rolled back.
#[test]
fn deadlock_victim_cannot_enqueue() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<Root>(&tx), 1);
    create_lock_tables(&env.db);
    let id = next_id();
    let (ready_tx, ready_rx) = unbounded();
    let (go_tx, go_rx) = unbounded();
    let heavy = heavy_deadlocker(env.db.url(), ready_tx, go_rx);
    let mut conn = env.db.connect();
    let result = conn.transaction(|c| {
        insert_order::<Root>(c, id, "paid");
        diesel::sql_query("UPDATE locks SET v = v + 1 WHERE id = 1").execute(c)?;
        ready_rx.recv().unwrap();
        go_tx.send(()).unwrap();
        let deadlock = diesel::sql_query("UPDATE locks SET v = v + 1 WHERE id = 2").execute(c);
        assert!(deadlock.is_err(), "the producer is the deadlock victim");
        // The application ignores the error and goes on.
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        Ok::<_, Error>(())
    });
    heavy.join().unwrap();
    let err = result.expect_err("enqueueing after the deadlock fails");
    assert!(
        matches!(
            err,
            Error::BrokenTransaction | Error::TransactionEnded { .. }
        ),
        "{err}"
    );
    assert_eq!(env.db.barrier_rows(), 0, "no barrier was written");
    assert!(drain_with_sentinel(&env, &rx).is_empty(), "nothing ran");
    assert_eq!(runs_of(&env.db, id), 0);
}

/// Statements that commit implicitly end the transaction that Diesel still counts as open:
/// enqueueing after one must fail, or the barrier would commit on its own while the
/// application goes on to roll back.
#[test]
fn implicit_commit_cannot_enqueue() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<Root>(&tx), 1);
    let mut conn = env.db.connect();
    for (before, statement, after) in [
        ("", "CREATE TABLE scratch (a INT)", ""),
        ("", "LOCK TABLES orders WRITE", "UNLOCK TABLES"),
        ("SET autocommit = 0", "SET autocommit = 1", ""),
    ] {
        if !before.is_empty() {
            Root::exec(&mut conn, before);
        }
        let id = next_id();
        let result = conn.transaction(|c| {
            insert_order::<Root>(c, id, "paid");
            Root::exec(c, statement);
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
            Ok::<_, Error>(())
        });
        if !after.is_empty() {
            Root::exec(&mut conn, after);
        }
        let err = result.expect_err(statement);
        assert!(
            matches!(err, Error::TransactionEnded { .. }),
            "{statement}: {err}"
        );
        assert_eq!(
            env.db.barrier_rows(),
            0,
            "{statement}: no barrier was written"
        );
    }
    assert!(drain_with_sentinel(&env, &rx).is_empty(), "nothing ran");
}

/// A handler whose transaction is rolled back under it (a deadlock victim whose error it
/// swallows) must not be reported as run: its writes are gone, so the barrier must stay, and
/// the delivery fails (Faktory retries it).
#[test]
fn handler_deadlock_victim_is_not_reported_as_run() {
    let env = Env::<Root>::new();
    create_lock_tables(&env.db);
    let (ready_tx, ready_rx) = unbounded::<()>();
    let (go_tx, go_rx) = unbounded::<()>();
    let (victim_tx, victim_rx) = unbounded::<bool>();
    let handlers = Handlers::new().register(PAID, move |job: &Job, c: &mut MysqlConnection| {
        let order_id = job.args()[0].as_i64().expect("order id");
        insert_run::<Root>(c, job, order_id, None);
        Root::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 1");
        ready_rx.recv().unwrap();
        go_tx.send(()).unwrap();
        let deadlock = diesel::sql_query("UPDATE locks SET v = v + 1 WHERE id = 2").execute(c);
        victim_tx.send(deadlock.is_err()).unwrap();
        // Swallowed.
        Ok::<(), std::io::Error>(())
    });
    let worker = env.start_worker(handlers, 1);
    let heavy = heavy_deadlocker(env.db.url(), ready_tx, go_rx);
    let id = next_id();
    let mut job = env.job(PAID, id);
    job.retry = Some(0);
    commit_order(&env, id, job);
    assert!(
        victim_rx.recv_timeout(EVENTUALLY).unwrap(),
        "the handler is the victim"
    );
    heavy.join().unwrap();
    wait_until("the delivery to fail", EVENTUALLY, || {
        worker.monitor.failed() >= 1
    });
    assert_eq!(worker.monitor.ran(), 0, "not reported as run");
    assert_eq!(runs_of(&env.db, id), 0, "its writes were rolled back");
    assert_eq!(
        env.db.barrier_rows(),
        1,
        "so the barrier stays for the retry"
    );
}

/// A handler whose transaction is committed under it (DDL commits implicitly) is not reported
/// as run either: the delivery fails. The barrier's deletion committed together with the
/// handler's writes before the DDL, so a retry finds it consumed and does not run them again.
#[test]
fn handler_implicit_commit_is_not_reported_as_run() {
    let env = Env::<Root>::new();
    let handlers = Handlers::new().register(PAID, |job: &Job, c: &mut MysqlConnection| {
        let order_id = job.args()[0].as_i64().expect("order id");
        insert_run::<Root>(c, job, order_id, None);
        Root::exec(c, "CREATE TABLE IF NOT EXISTS handler_scratch (a INT)");
        Ok::<(), std::io::Error>(())
    });
    let worker = env.start_worker(handlers, 1);
    let id = next_id();
    let mut job = env.job(PAID, id);
    job.retry = Some(0);
    commit_order(&env, id, job);
    wait_until("the delivery to fail", EVENTUALLY, || {
        worker.monitor.failed() >= 1
    });
    assert_eq!(worker.monitor.ran(), 0, "not reported as run");
    assert_eq!(
        runs_of(&env.db, id),
        1,
        "the writes before the DDL committed"
    );
    assert_eq!(
        env.db.barrier_rows(),
        0,
        "together with the barrier's deletion"
    );
}
