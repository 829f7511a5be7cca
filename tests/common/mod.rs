//! What the integration tests of every backend share (`tests/{postgres,mysql,sqlite}.rs`).
//!
//! Each backend wraps the crate's [`TestDatabase`] in a [`TestDb`] (the few statements that
//! differ between backends) and runs the shared scenarios through one
//! [`scenario_tests!`](suite::scenario_tests) call, so every backend is held to the same
//! contract. Jobs go through a real Faktory protocol server: the one named by `FAKTORY_URL`
//! when set, else the in-process test server.
#![allow(dead_code)]

use crossbeam_channel::{Receiver, Sender};
use diesel::connection::{LoadConnection, SimpleConnection};
use diesel::query_builder::SqlQuery;
use diesel::query_dsl::LoadQuery;
use diesel::r2d2::R2D2Connection;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl};
use diesel_transaction_barrier::testing::{
    JobEvent, JobEventKind, TestDatabase, TestFaktory, TestServer,
};
use diesel_transaction_barrier::{
    BarrierConnection, ConnectionPool, EnqueueWithBarrier, Handlers, Job, Producer, ShutdownHandle,
    StopReason, Worker, WorkerBuilder, WorkerMonitor,
};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub mod bulk;
pub mod child;
pub mod detached;
pub mod faults;
pub mod guarantee;
pub mod mysql;
pub mod pg;
pub mod pgbouncer;
pub mod proxy;
pub mod restart;
pub mod scenarios;
pub mod soak;
pub mod sqlite;
pub mod suite;
pub mod watchers;

/// How long a test waits for something that must happen.
pub const EVENTUALLY: Duration = Duration::from_secs(20);
/// How long a test watches for something that must NOT happen.
pub const NOT_YET: Duration = Duration::from_millis(400);

/// One test's database (the crate's [`TestDatabase`]) with the test application's tables,
/// and what differs between backends.
pub trait TestDb: Sized + Send + Sync + 'static {
    /// The connection type under test.
    type Conn: BarrierConnection + R2D2Connection + Connection + LoadOne;
    /// The crate's test database underneath.
    type Database: TestDatabase<Conn = Self::Conn>;

    /// The SQL type `query_i64` casts to.
    const INTEGER: &'static str;
    /// The SQL type `query_string` casts to.
    const TEXT: &'static str;
    /// What the backend's barrier-timeout message carries about the open transaction.
    const TIMEOUT_DEBUG_INFO: &'static [&'static str];
    /// The connections a worker's waiter takes from its pool with the default settings: a
    /// checking and a listening one (SQLite), or a checking one and four watchers.
    const WAITER_CONNECTIONS: u32 = 2;
    /// Statements that, on a connection of their own, keep every committed barrier row from
    /// being deleted until `ROLLBACK`.
    const HOLD_BARRIERS: &'static str = "BEGIN; SELECT id FROM dtb_barriers FOR UPDATE";
    /// Whether the database has server sessions (whose waits can be watched and killed).
    const HAS_SESSIONS: bool = true;

    /// Whether this configuration cannot run here (it says why on stderr): its scenario tests
    /// then pass without running.
    fn skipped() -> bool {
        false
    }

    /// Wraps a database created for this test.
    fn wrap(database: Self::Database) -> Self;
    /// The database underneath.
    fn database(&self) -> &Self::Database;

    /// A fresh database with the barrier migrations and the app tables.
    fn create() -> Self {
        Self::wrap(Self::Database::create()).with_app_tables()
    }
    /// A fresh database with the app tables, without the barrier migrations.
    fn create_unmigrated() -> Self {
        Self::wrap(Self::Database::create_unmigrated()).with_app_tables()
    }
    /// Creates the test application's tables.
    fn with_app_tables(self) -> Self {
        create_app_tables::<Self>(&mut self.connect());
        self
    }
    /// A new connection to it.
    fn connect(&self) -> Self::Conn {
        self.database().connect()
    }
    /// Its URL (so a child process can connect).
    fn url(&self) -> String {
        self.database().url()
    }
    /// A pool for the worker.
    fn pool(&self, size: u32) -> ConnectionPool<Self::Conn> {
        self.database().pool(size)
    }
    /// A pool of at most `size` connections to `url` (one of this configuration's URLs), as
    /// a worker process of its own makes it.
    fn pool_at(url: &str, size: u32) -> ConnectionPool<Self::Conn> {
        r2d2::Pool::builder()
            .max_size(size)
            .build(diesel::r2d2::ConnectionManager::new(url))
            .expect("pool")
    }
    /// The worker settings this configuration needs (after the test's defaults, before its
    /// own).
    fn configure_worker(&self, builder: WorkerBuilder<Self::Conn>) -> WorkerBuilder<Self::Conn> {
        builder
    }

    /// Runs a statement (or several).
    fn exec(conn: &mut Self::Conn, sql: &str) {
        conn.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    /// Runs a statement, returning its error instead of panicking.
    fn try_exec(conn: &mut Self::Conn, sql: &str) -> Result<(), diesel::result::Error> {
        conn.batch_execute(sql)
    }
    /// Runs a query returning one integer (or none).
    fn query_i64(conn: &mut Self::Conn, sql: &str) -> Option<i64> {
        conn.load_i64(&format!("SELECT CAST(({sql}) AS {}) AS v", Self::INTEGER))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
    /// Runs a query returning one string (or none).
    fn query_string(conn: &mut Self::Conn, sql: &str) -> Option<String> {
        conn.load_text(&format!("SELECT CAST(({sql}) AS {}) AS v", Self::TEXT))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The server-side id of a connection's session (PostgreSQL backend pid, MySQL thread id).
    fn session_id(conn: &mut Self::Conn) -> i64;
    /// How many other sessions are waiting on a lock held by `session`.
    fn waiters_on(&self, session: i64) -> i64;
    /// Kills `session` from another connection, as an operator or a crash would.
    fn kill(&self, session: i64);

    /// Kills the sessions waiting for a lock that `session` holds (as the server would, had
    /// their process died with the statement not yet sent); how many. `None` when the
    /// backend has no server sessions (a killed process's waits end with it).
    fn kill_sessions_waiting_on(&self, _session: i64) -> Option<usize> {
        None
    }

    /// Kills the sessions of every worker's waiter on this database (its listening and
    /// checking connections). `None` when the backend has no server sessions.
    fn kill_waiter_sessions(&self) -> Option<usize> {
        None
    }

    /// Rows in the barrier table.
    fn barrier_rows(&self) -> i64 {
        let mut c = self.connect();
        Self::query_i64(&mut c, "SELECT COUNT(*) FROM dtb_barriers").unwrap()
    }
}

/// A row of one nullable integer named `v`.
#[derive(QueryableByName)]
pub struct I64Row {
    #[diesel(sql_type = Nullable<BigInt>)]
    pub v: Option<i64>,
}

/// A row of one nullable string named `v`.
#[derive(QueryableByName)]
pub struct TextRow {
    #[diesel(sql_type = Nullable<Text>)]
    pub v: Option<String>,
}

/// Loads the one row of a query whose one column is `v`, on any backend.
pub trait LoadOne {
    fn load_i64(&mut self, sql: &str) -> diesel::QueryResult<Option<i64>>;
    fn load_text(&mut self, sql: &str) -> diesel::QueryResult<Option<String>>;
}

impl<C> LoadOne for C
where
    C: LoadConnection,
    SqlQuery: for<'a> LoadQuery<'a, C, I64Row> + for<'a> LoadQuery<'a, C, TextRow>,
{
    fn load_i64(&mut self, sql: &str) -> diesel::QueryResult<Option<i64>> {
        diesel::sql_query(sql)
            .get_result::<I64Row>(self)
            .map(|r| r.v)
    }

    fn load_text(&mut self, sql: &str) -> diesel::QueryResult<Option<String>> {
        diesel::sql_query(sql)
            .get_result::<TextRow>(self)
            .map(|r| r.v)
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
        insert_run::<D>(conn, job, order_id, seen.as_deref());
        let _ = tx.send(Ran {
            jid: job.id().as_str().to_string(),
            order_id,
            seen_status: seen,
            at,
        });
        Ok(())
    }
}

/// Records a run of `job` for order `order_id` in `handler_runs`, with the status it saw.
pub fn insert_run<D: TestDb>(conn: &mut D::Conn, job: &Job, order_id: i64, seen: Option<&str>) {
    let seen = seen.map_or("NULL".to_string(), |s| format!("'{s}'"));
    D::exec(
        conn,
        &format!(
            "INSERT INTO handler_runs (jid, order_id, seen_status) VALUES ('{}', {order_id}, {seen})",
            job.id().as_str()
        ),
    );
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
        pool: ConnectionPool<D::Conn>,
        handlers: Handlers<D::Conn>,
        configure: impl FnOnce(WorkerBuilder<D::Conn>) -> WorkerBuilder<D::Conn>,
    ) -> RunningWorker {
        self.start_worker_on_queues(pool, handlers, configure, vec![self.queue.clone()])
    }

    /// Starts a worker that fetches from `queues`, in that order of priority.
    pub fn start_worker_on_queues(
        &self,
        pool: ConnectionPool<D::Conn>,
        handlers: Handlers<D::Conn>,
        configure: impl FnOnce(WorkerBuilder<D::Conn>) -> WorkerBuilder<D::Conn>,
        queues: Vec<String>,
    ) -> RunningWorker {
        let builder = WorkerBuilder::new(pool)
            .handlers(handlers)
            .url(self.faktory.url())
            .reconnect_backoff(Duration::from_millis(200));
        let builder = self.db.configure_worker(builder);
        let worker = configure(builder).connect().expect("worker connects");
        RunningWorker::spawn_on(worker, queues)
    }
}

/// A worker running on a thread of its own; stopped on drop.
pub struct RunningWorker {
    pub handle: ShutdownHandle,
    pub monitor: WorkerMonitor,
    thread: Option<JoinHandle<StopReason>>,
}

impl RunningWorker {
    /// Runs `worker` on `queue`, on a thread of its own.
    pub fn spawn<C: BarrierConnection + R2D2Connection>(
        worker: Worker<C>,
        queue: String,
    ) -> RunningWorker {
        Self::spawn_on(worker, vec![queue])
    }

    /// Runs `worker` on `queues` (in that order of priority), on a thread of its own.
    pub fn spawn_on<C: BarrierConnection + R2D2Connection>(
        mut worker: Worker<C>,
        queues: Vec<String>,
    ) -> RunningWorker {
        let handle = worker.shutdown_handle();
        let monitor = worker.monitor();
        let thread = std::thread::spawn(move || worker.run(&queues).expect("worker runs"));
        RunningWorker {
            handle,
            monitor,
            thread: Some(thread),
        }
    }

    /// Waits until the worker holds `n` jobs waiting for their transactions.
    pub fn wait_for_waiting(&self, n: usize) {
        wait_until("the worker to wait on the barrier", EVENTUALLY, || {
            self.monitor.waiting() >= n
        });
    }

    /// Shuts the worker down and waits for its thread.
    pub fn stop(&mut self) -> StopReason {
        self.handle.shutdown();
        let thread = self.thread.take().expect("the worker runs");
        thread.join().expect("worker thread")
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

/// Waits until `cond` holds, checking it again every 5 ms.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    poll_until(what, timeout, Duration::from_millis(5), cond);
}

/// Waits until `cond` holds, checking it again whenever `step` has passed.
pub fn poll_until(what: &str, timeout: Duration, step: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(step);
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

/// The handler ran job `id` once, after its transaction committed, and saw its writes
/// (status `paid`); nothing else ran and nothing is left. Returns the run.
pub fn expect_ran_once<D: TestDb>(env: &Env<D>, rx: &Receiver<Ran>, id: i64) -> Ran {
    let ran = expect_run(rx);
    assert_eq!(ran.order_id, id);
    assert_eq!(ran.seen_status.as_deref(), Some("paid"));
    let others = drain_with_sentinel(env, rx);
    assert!(others.is_empty(), "unexpected runs: {others:?}");
    assert_eq!(runs_of(&env.db, id), 1);
    assert_eq!(env.db.barrier_rows(), 0, "no barrier row is left");
    ran
}

/// Receives a run of every job of `ids`, none twice and no other, waiting at most `timeout`
/// for each.
pub fn expect_each_ran_once(rx: &Receiver<Ran>, ids: &[i64], timeout: Duration) {
    let mut seen = HashSet::new();
    while seen.len() < ids.len() {
        let ran = rx
            .recv_timeout(timeout)
            .expect("every committed job should have run");
        assert!(seen.insert(ran.order_id), "ran twice: {ran:?}");
    }
    assert_eq!(seen, ids.iter().copied().collect::<HashSet<i64>>());
}

/// Inserts order `id` as new, enqueues its job in a savepoint that is released, then marks
/// the order paid.
pub fn enqueue_in_released_savepoint<D: TestDb>(
    env: &Env<D>,
    conn: &mut D::Conn,
    id: i64,
) -> Result<(), diesel_transaction_barrier::Error> {
    insert_order::<D>(conn, id, "new");
    conn.transaction(|c| {
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))
            .map(|_| ())
    })?;
    set_status::<D>(conn, id, "paid");
    Ok(())
}

/// Inserts order `id` as paid and enqueues its job in a savepoint that rolls back; returns
/// the job's id.
pub fn enqueue_in_rolled_back_savepoint<D: TestDb>(
    env: &Env<D>,
    conn: &mut D::Conn,
    id: i64,
) -> Result<String, diesel_transaction_barrier::Error> {
    insert_order::<D>(conn, id, "paid");
    let mut jid = None;
    let inner = conn.transaction(|c| {
        jid = Some(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
        Err::<(), _>(diesel_transaction_barrier::Error::Database(
            diesel::result::Error::RollbackTransaction,
        ))
    });
    assert!(inner.is_err());
    Ok(jid.expect("enqueued").as_str().to_string())
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

/// Commits order `order_id` with its job once `worker` holds the job waiting for that very
/// transaction (and `before_commit` returned); returns when the commit did.
pub fn commit_once_waiting<D: TestDb>(
    env: &Env<D>,
    worker: &RunningWorker,
    order_id: i64,
    before_commit: impl FnOnce(),
) -> Instant {
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_order::<D>(c, order_id, "paid");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, order_id))?;
        worker.wait_for_waiting(1);
        before_commit();
        Ok::<_, diesel_transaction_barrier::Error>(())
    })
    .expect("transaction commits");
    Instant::now()
}

/// Waits for the next run, which must be order `order_id`'s and must have started less than
/// `bound` after `committed`.
pub fn expect_run_within(rx: &Receiver<Ran>, order_id: i64, committed: Instant, bound: Duration) {
    let ran = expect_run(rx);
    assert_eq!(ran.order_id, order_id);
    let late = ran.at.saturating_duration_since(committed);
    assert!(late < bound, "started {late:?} after the commit");
}

/// `err` refuses a pool of `max_size` connections where the worker needs `needed`.
pub fn assert_pool_too_small(err: &diesel_transaction_barrier::Error, max_size: u32, needed: u32) {
    assert!(
        matches!(
            err,
            diesel_transaction_barrier::Error::PoolTooSmall { max_size: m, needed: n }
                if *m == max_size && *n == needed
        ),
        "{err}"
    );
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

/// With the in-process server: job `jid` was acknowledged and never failed.
pub fn expect_acked_without_failure<D: TestDb>(env: &Env<D>, jid: &str) {
    if let Some(server) = env
        .faktory
        .server_or_skip("the job's history: acknowledged, never failed")
    {
        let events = server.history(jid);
        assert!(
            events.iter().any(|e| e.kind() == JobEventKind::Acked),
            "job {jid} should have been acknowledged: {events:?}"
        );
        assert!(
            !events.iter().any(|e| e.kind() == JobEventKind::Failed),
            "job {jid} should not have failed: {events:?}"
        );
    }
}

/// The message of the first failure in job `jid`'s history.
pub fn failure_message(server: &TestServer, jid: &str) -> Option<String> {
    server.history(jid).iter().find_map(|e| match e {
        JobEvent::Failed { message, .. } => Some(message.clone()),
        _ => None,
    })
}

/// Job `jid`, whose transaction did not commit, was aborted: acknowledged without running,
/// and nothing of it is left.
pub fn assert_aborted<D: TestDb>(
    env: &Env<D>,
    worker: &RunningWorker,
    rx: &Receiver<Ran>,
    id: i64,
    jid: &str,
) {
    wait_until("the job to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= 1
    });
    if let Some(server) = env
        .faktory
        .server_or_skip("the aborted job's acknowledgement")
    {
        assert!(server.wait_until_history(jid, JobEventKind::Acked, EVENTUALLY));
    }
    let others = drain_with_sentinel(env, rx);
    assert!(others.is_empty(), "an aborted job ran: {others:?}");
    assert_eq!(runs_of(&env.db, id), 0);
    assert_eq!(env.db.barrier_rows(), 0, "no barrier row is left");
    expect_acked_without_failure(env, jid);
}
