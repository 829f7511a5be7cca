//! Fault injection that needs more than one process: a worker process killed with SIGKILL
//! while jobs wait on open transactions and while a handler runs.
//!
//! The worker process is this test binary run again with only its `worker_child` test (made
//! by `scenario_tests!`, and `#[ignore]`d so that a normal run skips it), configured through
//! environment variables. It answers `STATE` on stdin with `STATE <waiting> <running>`.

use super::child::ChildTest;
use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::testing::{TestFaktory, TestServer};
use diesel_transaction_barrier::Error;
use std::io::{BufRead, Write};

const CHILD_QUEUE: &str = "DTB_CHILD_QUEUE";
const CHILD_FAKTORY: &str = "DTB_CHILD_FAKTORY";
const CHILD_DB_URL: &str = "DTB_CHILD_DB_URL";

/// The kind whose handler, in the child process only, blocks until the process is killed.
pub const SLOW: &str = "slow_kind";
/// A kind whose handler takes no connection; in the child process it prints
/// `DETACHED_RAN <order id>`.
pub const DETACHED: &str = "detached_kind";

/// The body of a backend's `#[ignore]`d `worker_child` test: runs a worker until killed.
pub fn worker_child_main<D: TestDb>() {
    let Ok(queue) = std::env::var(CHILD_QUEUE) else {
        return;
    };
    init_tracing();
    let faktory = std::env::var(CHILD_FAKTORY).expect("faktory url");
    let url = std::env::var(CHILD_DB_URL).expect("database url");
    let (tx, _rx) = unbounded();
    let handlers = handlers::<D>(&tx)
        .register_without_barrier(
            SLOW,
            |job: &Job, conn: &mut D::Conn| -> Result<(), std::io::Error> {
                // Record the run inside the consuming transaction, then hang: the kill comes now.
                let id = job.args()[0].as_i64().unwrap();
                insert_run::<D>(conn, job, id, Some("slow"));
                std::thread::sleep(Duration::from_secs(3600));
                Ok(())
            },
        )
        .register_without_connection(DETACHED, |job: &Job| -> Result<(), std::io::Error> {
            let mut out = std::io::stdout().lock();
            writeln!(out, "DETACHED_RAN {}", job.args()[0])?;
            out.flush()
        });
    let pool = D::pool_at(&url, 8);
    let mut worker = WorkerBuilder::new(pool)
        .handlers(handlers)
        .url(faktory)
        .workers(2)
        .connect()
        .expect("child worker");
    let monitor = worker.monitor();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if line == "STATE" {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "STATE {} {}", monitor.waiting(), monitor.running());
                let _ = out.flush();
            }
        }
    });
    let _ = worker.run(&[queue]);
}

/// A worker process (`worker_child`) on the environment's queue.
pub struct WorkerProcess(ChildTest);

impl WorkerProcess {
    pub fn start<D: TestDb>(env: &Env<D>) -> WorkerProcess {
        Self::start_on(env, &env.queue)
    }

    /// A worker process (`worker_child`) on `queue`.
    pub fn start_on<D: TestDb>(env: &Env<D>, queue: &str) -> WorkerProcess {
        WorkerProcess(ChildTest::start(
            "worker_child",
            &[
                (CHILD_QUEUE, queue.to_string()),
                (CHILD_FAKTORY, env.faktory.url()),
                (CHILD_DB_URL, env.db.url()),
            ],
        ))
    }

    /// How many jobs the worker process holds waiting, and how many handlers it runs.
    pub fn state(&mut self) -> (usize, usize) {
        let _ = self.0.send("STATE");
        let Some(state) = self.0.next_after("STATE ", EVENTUALLY) else {
            return (0, 0);
        };
        let mut n = state.split_whitespace().map(|n| n.parse().unwrap_or(0));
        (n.next().unwrap_or(0), n.next().unwrap_or(0))
    }

    /// Waits for the child's handler without a connection to report a run of order `id`.
    pub fn wait_for_detached_run(&self, id: i64) -> bool {
        let deadline = std::time::Instant::now() + EVENTUALLY;
        while let Some(rest) = self.0.next_after(
            "DETACHED_RAN ",
            deadline.saturating_duration_since(std::time::Instant::now()),
        ) {
            if rest.trim() == id.to_string() {
                return true;
            }
        }
        false
    }

    /// SIGKILLs the worker process.
    pub fn kill(&mut self) {
        self.0.kill();
    }
}

/// The Faktory of a test that kills a worker holding jobs, and the reservation (in seconds)
/// its jobs ask for: redelivery needs the reservation to run out, so it is short on the test
/// server and the real server's minimum (60 s) otherwise.
pub fn faktory_with_short_reservations() -> (TestFaktory, u64) {
    let faktory = TestFaktory::from_env_or_start_with(
        TestServer::builder()
            .min_reserve_for(Duration::from_secs(1))
            .retry_delay(Duration::from_millis(200)),
    )
    .expect("faktory");
    let reserve_for = if faktory.is_external() { 61 } else { 2 };
    (faktory, reserve_for)
}

/// A job of `kind` for order `id` on the environment's queue, reserved for `reserve_for`
/// seconds.
pub fn reserved_job<D: TestDb>(env: &Env<D>, kind: &str, id: i64, reserve_for: u64) -> Job {
    let mut job = env.job(kind, id);
    job.reserve_for = Some(Duration::from_secs(reserve_for));
    job
}

/// The handlers of the workers started after a kill: the standard ones, and `SLOW` recording
/// like them.
pub fn fault_handlers<D: TestDb>(tx: &Sender<Ran>) -> Handlers<D::Conn> {
    handlers::<D>(tx).register_without_barrier(SLOW, recording_handler::<D>(tx.clone()))
}

/// With new workers running: every job of `ids` completes exactly once, and nothing is left.
/// An expired reservation counts as a failure: a job comes back after Faktory's retry delay
/// (15 to 45 s for a first retry on a real server), so each may take its reservation and a
/// minute more.
pub fn expect_each_runs_once<D: TestDb>(
    env: &Env<D>,
    rx: &Receiver<Ran>,
    ids: &[i64],
    reserve_for: u64,
) {
    expect_each_ran_once(rx, ids, Duration::from_secs(reserve_for + 60));
    for id in ids {
        wait_until("the run to commit", EVENTUALLY, || {
            runs_of(&env.db, *id) == 1
        });
    }
    wait_until("no barrier left", EVENTUALLY, || env.db.barrier_rows() == 0);
    expect_no_run(rx, "each job ran once");
}

/// A worker process is SIGKILLed while three jobs wait on an open transaction and one handler
/// runs. After a new worker starts, every committed job completes exactly once (the killed
/// handler's writes were rolled back with its transaction), and nothing is left.
pub fn worker_killed_mid_wait_and_mid_handler<D: TestDb>() {
    let (faktory, reserve_for) = faktory_with_short_reservations();
    let env = Env::<D>::with_db_and_faktory(D::create(), faktory);
    let mut child = WorkerProcess::start(&env);

    let slow_id = next_id();
    let waiting_ids: Vec<i64> = (0..3).map(|_| next_id()).collect();
    let mut conn = env.db.connect();
    insert_order::<D>(&mut conn, slow_id, "paid");
    conn.transaction(|c| {
        for &id in &waiting_ids {
            insert_order::<D>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, reserved_job(&env, PAID, id, reserve_for))?;
        }
        // A committed-at-once job whose handler hangs in the child.
        env.producer
            .push(reserved_job(&env, SLOW, slow_id, reserve_for))?;
        wait_until(
            "the child to wait on 3 jobs and run 1 handler",
            EVENTUALLY,
            || {
                let (waiting, running) = child.state();
                waiting >= 3 && running >= 1
            },
        );
        child.kill();
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(
        runs_of(&env.db, slow_id),
        0,
        "the killed handler's writes rolled back"
    );

    // A new worker: Faktory hands the reserved jobs out again once their reservation runs out.
    let (tx, rx) = unbounded();
    let _worker = env.start_worker(fault_handlers::<D>(&tx), 2);
    let ids: Vec<i64> = waiting_ids.iter().copied().chain([slow_id]).collect();
    expect_each_runs_once(&env, &rx, &ids, reserve_for);
}

/// A worker process is SIGKILLed while it holds the jobs of a big open transaction, most of
/// them parked (acknowledged, kept only in its memory). The transaction then commits. A new
/// worker's reconciler pushes the parked jobs again once their rows are overdue; the held
/// ones come back when their reservation runs out: every job runs exactly once, and nothing
/// is left.
pub fn worker_killed_with_parked_jobs<D: TestDb>() {
    let (faktory, reserve_for) = faktory_with_short_reservations();
    let env = Env::<D>::with_db_and_faktory(D::create(), faktory);
    let mut child = WorkerProcess::start(&env);
    let ids: Vec<i64> = (0..100).map(|_| next_id()).collect();
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        for &id in &ids {
            insert_order::<D>(c, id, "paid");
        }
        let jobs = ids
            .iter()
            .map(|&id| reserved_job(&env, PAID, id, reserve_for));
        c.enqueue_many_with_barrier(&env.producer, jobs)?;
        wait_until("the child to hold every job", EVENTUALLY, || {
            child.state().0 >= ids.len()
        });
        child.kill();
        Ok::<_, Error>(())
    })
    .unwrap();
    if let Some(server) = env.faktory.server_or_skip("the parked jobs left Faktory") {
        assert_eq!(server.queue_size(&env.queue), 0);
        let reserved = server.working_len();
        // At most one per fetch slot (2 handlers + 32 waiting): held ones, and those not yet
        // parked or not yet acknowledged. (SQLite names no transaction, so its barriers are
        // not counted together and may hold every slot.)
        assert!(
            reserved <= 34,
            "only the held jobs stay reserved, the parked ones were acknowledged: {reserved}"
        );
    }
    let (tx, rx) = unbounded();
    let _worker = env.start_worker_with(fault_handlers::<D>(&tx), |b| {
        b.workers(4)
            .reconcile_grace(Some(Duration::from_millis(500)))
    });
    expect_each_runs_once(&env, &rx, &ids, reserve_for);
}
