//! The barrier contract on SQLite. Each test gets a database file of its own, in a temporary
//! directory that is removed when the test ends (`common::sqlite`).
//!
//! Three shared scenarios have SQLite versions in this file and one is not run, each saying
//! why.
#![cfg(feature = "sqlite")]

mod common;

use common::child::ChildTest;
use common::faults::{self, WorkerProcess, SLOW};
use common::sqlite::Lite;
use common::{
    assert_aborted, expect_each_ran_once, expect_no_run, handlers, insert_order, next_id,
    wait_until, Env, TestDb, EVENTUALLY, PAID,
};
use crossbeam_channel::unbounded;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Job, Producer};
use std::io::Write;

common::suite::scenario_tests! {
    Lite;
    exclude {
        killed_producer_aborts:
            "SQLite has no server session to kill; killed_producer_process_aborts kills the \
             producer's process instead",
        many_waiting_jobs_hold_few_connections:
            "a ready job cannot commit while the waiting jobs' transaction holds SQLite's only \
             write lock; many_waiting_jobs_hold_few_connections_behind_one_writer runs the rest",
        waiter_connections_killed_mid_wait:
            "it holds two write transactions open at once, which SQLite's one write lock \
             forbids, and there are no server sessions to kill",
        worker_killed_mid_wait_and_mid_handler:
            "a handler cannot run while a transaction holds SQLite's only write lock; \
             worker_process_killed_mid_wait_then_mid_handler injects the two faults one after \
             the other",
    }
}

/// The shared scenario's part (a), and all jobs running once after the commit. Its part (b), a
/// ready job committed and run while the others wait, cannot happen on SQLite: the waiting
/// jobs' transaction holds the database's only write lock, so the ready job's transaction
/// cannot commit (nor could its handler's transaction begin) until that one ends.
#[test]
fn many_waiting_jobs_hold_few_connections_behind_one_writer() {
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
    expect_each_ran_once(&rx, &ids, EVENTUALLY);
    wait_until("all barriers consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

// ---- The producer dies mid-transaction ----
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
fn killed_producer_process_aborts() {
    producer_dies_mid_transaction(Death::Killed);
}

#[test]
fn exiting_producer_aborts() {
    producer_dies_mid_transaction(Death::Exits);
}

/// The producer process of `killed_producer_process_aborts` and `exiting_producer_aborts`;
/// does nothing unless started by them.
#[test]
#[ignore = "the child process of killed_producer_process_aborts and exiting_producer_aborts"]
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
    let mut child = ChildTest::start(
        "producer_child",
        &[
            (CHILD_DB, env.db.url()),
            (CHILD_FAKTORY, env.faktory.url()),
            (CHILD_QUEUE, env.queue.clone()),
            (CHILD_ORDER, id.to_string()),
        ],
    );
    let jid = child
        .next_after(JID_LINE, EVENTUALLY)
        .expect("the producer process enqueued a job")
        .trim()
        .to_string();
    worker.wait_for_waiting(1);
    expect_no_run(&rx, "the producer's transaction is still open");

    let status = match death {
        Death::Killed => child.kill(),
        Death::Exits => {
            child.send("exit").unwrap();
            child.wait()
        }
    };
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

// ---- A worker process killed mid-wait and mid-handler ----
//
// The shared fault scenario kills the worker process while three jobs wait on an open
// transaction *and* a handler runs. On SQLite the two cannot happen at once: the open
// transaction holds the only write lock, and a handler runs inside a transaction that holds
// it too. (Run as written, the "running" handler would only be waiting for the lock.) So the
// two faults are injected one after the other, each into a worker process of its own (the
// shared `worker_child`), and the handler is known to be inside its transaction because the
// write lock is taken while no application transaction is open.

/// Whether some connection holds the database's write lock now.
fn write_lock_held(db: &Lite) -> bool {
    let mut probe = SqliteConnection::establish(&db.url()).unwrap();
    probe
        .immediate_transaction(|_| Ok::<_, diesel::result::Error>(()))
        .is_err()
}

#[test]
fn worker_process_killed_mid_wait_then_mid_handler() {
    let (faktory, reserve_for) = faults::faktory_with_short_reservations();
    let mut env = Env::<Lite>::with_db_and_faktory(Lite::create(), faktory);
    let (tx, rx) = unbounded();
    let mut conn = env.db.connect();

    // 1. Killed while three jobs wait on an open transaction.
    let waiting_ids: Vec<i64> = (0..3).map(|_| next_id()).collect();
    let mut child = WorkerProcess::start(&env);
    conn.transaction(|c| {
        for &id in &waiting_ids {
            insert_order::<Lite>(c, id, "paid");
            let job = faults::reserved_job(&env, PAID, id, reserve_for);
            c.enqueue_with_barrier(&env.producer, job)?;
        }
        wait_until("the worker process to wait on 3 jobs", EVENTUALLY, || {
            child.state().0 >= 3
        });
        child.kill();
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
    env.producer
        .push(faults::reserved_job(&env, SLOW, slow_id, reserve_for))
        .unwrap();
    wait_until(
        "the handler to run in the worker process",
        EVENTUALLY,
        || child.state().1 >= 1 && write_lock_held(&env.db),
    );
    child.kill();
    assert!(!write_lock_held(&env.db), "the dead process's lock is gone");
    assert_eq!(
        common::runs_of(&env.db, slow_id),
        0,
        "the killed handler's writes rolled back"
    );

    // New workers on both queues: Faktory hands the reserved jobs out again once their
    // reservations run out.
    let second = env.start_worker(faults::fault_handlers::<Lite>(&tx), 2);
    env.queue = first_queue;
    let first = env.start_worker(faults::fault_handlers::<Lite>(&tx), 2);
    let ids: Vec<i64> = waiting_ids.iter().copied().chain([slow_id]).collect();
    faults::expect_each_runs_once(&env, &rx, &ids, reserve_for);
    drop((first, second));
}
