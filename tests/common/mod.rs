//! Scenario bodies shared by every backend's integration tests (`tests/{postgres,mysql,sqlite}.rs`).
//!
//! Each backend file implements [`TestDb`] (an isolated schema or database per test, and the
//! few statements that differ between backends) and calls the same scenarios, so every backend
//! is held to the same contract. Jobs go through a real Faktory protocol server: the one named
//! by `FAKTORY_URL` when set, else the in-process test server.
#![allow(dead_code)]

use crossbeam_channel::{Receiver, Sender};
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::Connection;
use diesel_transaction_barrier::testing::TestFaktory;
use diesel_transaction_barrier::{
    BarrierConnection, EnqueueWithBarrier, Handlers, Job, Producer, ShutdownHandle, StopReason,
    WorkerBuilder, WorkerMonitor,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod faults;
pub mod mysql;
pub mod pg;
pub mod pg_schema;
pub mod restart;
pub mod scenarios;
pub mod soak;

/// How long a test waits for something that must happen.
pub const EVENTUALLY: Duration = Duration::from_secs(20);
/// How long a test watches for something that must NOT happen.
pub const NOT_YET: Duration = Duration::from_millis(400);

/// One isolated database (a schema or a database of its own) with the barrier migrations and
/// the test application's tables.
pub trait TestDb: Sized + Send + Sync + 'static {
    /// The connection type under test.
    type Conn: BarrierConnection + diesel::r2d2::R2D2Connection + Connection;

    /// A fresh, isolated database with migrations applied and the app tables created.
    fn create() -> Self;
    /// A fresh database without the barrier migrations.
    fn create_unmigrated() -> Self;
    /// A new connection to it.
    fn connect(&self) -> Self::Conn;
    /// Its URL (so a child process can connect).
    fn url(&self) -> String;

    /// Runs a statement.
    fn exec(conn: &mut Self::Conn, sql: &str);
    /// Runs a statement, returning its error instead of panicking.
    fn try_exec(conn: &mut Self::Conn, sql: &str) -> Result<(), diesel::result::Error>;
    /// Runs a query returning one integer (or none).
    fn query_i64(conn: &mut Self::Conn, sql: &str) -> Option<i64>;
    /// Runs a query returning one string (or none).
    fn query_string(conn: &mut Self::Conn, sql: &str) -> Option<String>;

    /// The server-side id of a connection's session (PostgreSQL backend pid, MySQL thread id).
    fn session_id(conn: &mut Self::Conn) -> i64;
    /// How many other sessions are waiting on a lock held by `session`.
    fn waiters_on(&self, session: i64) -> i64;
    /// Kills `session` from another connection, as an operator or a crash would.
    fn kill(&self, session: i64);

    /// Kills the sessions of every worker's waiter on this database (its listening and
    /// checking connections). `None` when the backend has no server sessions.
    fn kill_waiter_sessions(&self) -> Option<usize> {
        None
    }

    /// A pool for the worker.
    fn pool(&self, size: u32) -> Pool<ConnectionManager<Self::Conn>> {
        Pool::builder()
            .max_size(size)
            .connection_timeout(Duration::from_secs(10))
            .build(ConnectionManager::new(self.url()))
            .expect("pool")
    }

    /// Rows in the barrier table.
    fn barrier_rows(&self) -> i64 {
        let mut c = self.connect();
        Self::query_i64(&mut c, "SELECT COUNT(*) FROM dtb_barriers").unwrap()
    }
}

/// Logs to the test output when `DTB_TEST_LOG` is set (an `EnvFilter` directive, e.g.
/// `diesel_transaction_barrier=debug`).
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("DTB_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Unique small integers for order ids and the like.
pub fn next_id() -> i64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed) as i64
}

/// Statements of the test application, the same on every backend.
pub fn create_app_tables<D: TestDb>(conn: &mut D::Conn) {
    D::exec(
        conn,
        "CREATE TABLE orders (id BIGINT PRIMARY KEY, status VARCHAR(32) NOT NULL)",
    );
    D::exec(
        conn,
        "CREATE TABLE handler_runs (jid VARCHAR(64) NOT NULL, order_id BIGINT NOT NULL, seen_status VARCHAR(32))",
    );
}

pub fn insert_order<D: TestDb>(conn: &mut D::Conn, id: i64, status: &str) {
    D::exec(
        conn,
        &format!("INSERT INTO orders (id, status) VALUES ({id}, '{status}')"),
    );
}

pub fn set_status<D: TestDb>(conn: &mut D::Conn, id: i64, status: &str) {
    D::exec(
        conn,
        &format!("UPDATE orders SET status = '{status}' WHERE id = {id}"),
    );
}

pub fn runs_of<D: TestDb>(db: &D, order_id: i64) -> i64 {
    let mut c = db.connect();
    D::query_i64(
        &mut c,
        &format!("SELECT COUNT(*) FROM handler_runs WHERE order_id = {order_id}"),
    )
    .unwrap()
}

/// What a test handler observed.
#[derive(Debug, Clone)]
pub struct Ran {
    pub jid: String,
    pub order_id: i64,
    pub seen_status: Option<String>,
    pub at: Instant,
}

/// The standard test handler: reads the order named by the job's first argument, records what
/// it saw in `handler_runs` (inside the consuming transaction) and reports it on `tx`.
pub fn recording_handler<D: TestDb>(
    tx: Sender<Ran>,
) -> impl Fn(&Job, &mut D::Conn) -> Result<(), std::io::Error> + Send + Sync + 'static {
    move |job: &Job, conn: &mut D::Conn| {
        let at = Instant::now();
        let order_id = job.args()[0].as_i64().expect("order id");
        let seen = D::query_string(
            conn,
            &format!("SELECT status FROM orders WHERE id = {order_id}"),
        );
        let seen_sql = match &seen {
            Some(s) => format!("'{s}'"),
            None => "NULL".into(),
        };
        D::exec(
            conn,
            &format!(
                "INSERT INTO handler_runs (jid, order_id, seen_status) VALUES ('{}', {order_id}, {seen_sql})",
                job.id().as_str()
            ),
        );
        let _ = tx.send(Ran {
            jid: job.id().as_str().to_string(),
            order_id,
            seen_status: seen,
            at,
        });
        Ok(())
    }
}

/// The job kinds of the test application.
pub const PAID: &str = "order_paid";
pub const PLAIN_OK: &str = "plain_ok";

/// Handlers: `order_paid` (barrier required) and `plain_ok` (barrier optional), both recording.
pub fn handlers<D: TestDb>(tx: &Sender<Ran>) -> Handlers<D::Conn> {
    Handlers::new()
        .register(PAID, recording_handler::<D>(tx.clone()))
        .register_without_barrier(PLAIN_OK, recording_handler::<D>(tx.clone()))
}

/// A Faktory server for one test, and a queue of its own.
pub struct Env<D: TestDb> {
    pub db: D,
    pub faktory: TestFaktory,
    pub queue: String,
    pub producer: Producer,
}

impl<D: TestDb> Env<D> {
    pub fn new() -> Self {
        Self::with_db(D::create())
    }

    pub fn with_db(db: D) -> Self {
        Self::with_db_and_faktory(db, TestFaktory::from_env_or_start().expect("faktory"))
    }

    pub fn with_db_and_faktory(db: D, faktory: TestFaktory) -> Self {
        init_tracing();
        let queue = faktory.unique_queue("dtb");
        let producer = Producer::connect(&faktory.url()).expect("producer");
        Env {
            db,
            faktory,
            queue,
            producer,
        }
    }

    /// A job for this test's queue.
    pub fn job(&self, kind: &str, order_id: i64) -> Job {
        Job::new(kind, vec![order_id]).on_queue(self.queue.clone())
    }

    /// Starts a worker on this test's queue.
    pub fn start_worker(&self, handlers: Handlers<D::Conn>, workers: usize) -> RunningWorker {
        self.start_worker_with(handlers, |b| b.workers(workers))
    }

    pub fn start_worker_with(
        &self,
        handlers: Handlers<D::Conn>,
        configure: impl FnOnce(WorkerBuilder<D::Conn>) -> WorkerBuilder<D::Conn>,
    ) -> RunningWorker {
        self.start_worker_on(self.db.pool(16), handlers, configure)
    }

    pub fn start_worker_on(
        &self,
        pool: Pool<ConnectionManager<D::Conn>>,
        handlers: Handlers<D::Conn>,
        configure: impl FnOnce(WorkerBuilder<D::Conn>) -> WorkerBuilder<D::Conn>,
    ) -> RunningWorker {
        let builder = WorkerBuilder::new(pool)
            .handlers(handlers)
            .url(self.faktory.url())
            .reconnect_backoff(Duration::from_millis(200));
        let mut worker = configure(builder).connect().expect("worker connects");
        let handle = worker.shutdown_handle();
        let monitor = worker.monitor();
        let queue = self.queue.clone();
        let thread = std::thread::spawn(move || worker.run(&[queue]).expect("worker runs"));
        RunningWorker {
            handle,
            monitor,
            thread: Some(thread),
        }
    }
}

/// A worker running on a thread of its own; stopped on drop.
pub struct RunningWorker {
    pub handle: ShutdownHandle,
    pub monitor: WorkerMonitor,
    thread: Option<JoinHandle<StopReason>>,
}

impl RunningWorker {
    /// Waits until the worker holds `n` jobs waiting for their transactions.
    pub fn wait_for_waiting(&self, n: usize) {
        wait_until("the worker to wait on the barrier", EVENTUALLY, || {
            self.monitor.waiting() >= n
        });
    }

    pub fn stop(mut self) -> StopReason {
        self.handle.shutdown();
        self.thread.take().unwrap().join().expect("worker thread")
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.handle.shutdown();
            let _ = t.join();
        }
    }
}

/// Waits until `cond` holds, checking it again whenever `step` has passed.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Receives the next run, or fails the test.
pub fn expect_run(rx: &Receiver<Ran>) -> Ran {
    rx.recv_timeout(EVENTUALLY)
        .expect("the handler should have run")
}

/// Asserts that nothing arrives on `rx` for a short while.
pub fn expect_no_run(rx: &Receiver<Ran>, why: &str) {
    if let Ok(ran) = rx.recv_timeout(NOT_YET) {
        panic!("the handler ran but should not have ({why}): {ran:?}");
    }
}

/// Enqueues `job` in a committed transaction that first inserts order `order_id`.
pub fn commit_order<D: TestDb>(env: &Env<D>, order_id: i64, job: Job) {
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_order::<D>(c, order_id, "paid");
        c.enqueue_with_barrier(&env.producer, job)?;
        Ok::<_, diesel_transaction_barrier::Error>(())
    })
    .expect("transaction commits");
}

/// Pushes a committed sentinel job after the jobs under test and waits for it: with one worker
/// thread, everything pushed before it has been processed once it ran. Returns the other runs
/// seen meanwhile.
pub fn drain_with_sentinel<D: TestDb>(env: &Env<D>, rx: &Receiver<Ran>) -> Vec<Ran> {
    let sentinel = next_id() + 1_000_000;
    commit_order(env, sentinel, env.job(PAID, sentinel));
    let mut others = Vec::new();
    loop {
        let ran = expect_run(rx);
        if ran.order_id == sentinel {
            // The handler reports before its transaction (which deletes the barrier row)
            // commits: wait for that commit, or the next check may still see the row.
            wait_until("the sentinel's transaction to commit", EVENTUALLY, || {
                runs_of(&env.db, sentinel) == 1
            });
            return others;
        }
        others.push(ran);
    }
}
