//! Quickstart: one job per outcome — a committed transaction, a rolled-back one, and no
//! transaction at all.
//!
//! ```text
//! cargo run --example quickstart --features sqlite,testing
//! cargo quickstart            # the same, through the alias in .cargo/config.toml
//! ```
//!
//! With nothing set it needs no services: the database is an SQLite file in a new temporary
//! directory, and Faktory is the in-process test server. Set `DATABASE_URL` (`postgres://…`, or
//! `mysql://…` with `--features sqlite,testing,mysql`) and/or `FAKTORY_URL` to run the same
//! demo against those. It uses a table `dtb_quickstart_orders`, dropped at the end.

use crossbeam_channel::unbounded;
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::query_builder::SqlQuery;
use diesel::query_dsl::methods::ExecuteDsl;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::sqlite::SqliteConnection;
use diesel_transaction_barrier::testing::TestFaktory;
use diesel_transaction_barrier::{
    BarrierConnection, EnqueueWithBarrier, Job, Producer, WorkerBuilder,
};
use std::time::{Duration, Instant};

type AnyError = Box<dyn std::error::Error>;

fn main() -> Result<(), AnyError> {
    let faktory = TestFaktory::from_env_or_start()?;
    if faktory.is_external() {
        println!("Faktory:  the server named by FAKTORY_URL");
    } else {
        println!(
            "Faktory:  in-process test server at {} (set FAKTORY_URL for a real one)",
            faktory.url()
        );
    }

    let url = std::env::var("DATABASE_URL").unwrap_or_default();
    if url.starts_with("postgres") {
        println!("database: PostgreSQL, from DATABASE_URL");
        #[cfg(feature = "postgres")]
        return demo::<diesel::pg::PgConnection>(&url, &faktory, |_| Ok(()));
        #[cfg(not(feature = "postgres"))]
        return Err("build with --features postgres for a postgres:// DATABASE_URL".into());
    }
    if url.starts_with("mysql") {
        println!("database: MySQL/MariaDB, from DATABASE_URL");
        #[cfg(feature = "mysql")]
        return demo::<diesel::mysql::MysqlConnection>(&url, &faktory, |_| Ok(()));
        #[cfg(not(feature = "mysql"))]
        return Err("build with --features mysql for a mysql:// DATABASE_URL".into());
    }

    // SQLite: the file named by DATABASE_URL, else a new one that is removed at the end.
    // Application connections to SQLite need a busy timeout: the worker holds the write lock
    // for a moment while it checks a barrier, and while a handler runs.
    let busy_timeout = |c: &mut SqliteConnection| c.batch_execute("PRAGMA busy_timeout = 30000");
    if !url.is_empty() {
        println!("database: SQLite file {url}");
        return demo::<SqliteConnection>(&url, &faktory, busy_timeout);
    }
    let dir = std::env::temp_dir().join(format!("dtb-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("quickstart.db").to_string_lossy().into_owned();
    println!("database: SQLite file {file} (new; set DATABASE_URL for another database)");
    let result = demo::<SqliteConnection>(&file, &faktory, busy_timeout);
    std::fs::remove_dir_all(&dir)?;
    result
}

fn demo<C>(
    url: &str,
    faktory: &TestFaktory,
    setup: fn(&mut C) -> QueryResult<()>,
) -> Result<(), AnyError>
where
    C: BarrierConnection,
    SqlQuery: ExecuteDsl<C>,
{
    let mut conn = C::establish(url)?;
    setup(&mut conn)?;
    diesel_transaction_barrier::run_migrations(&mut conn)?;
    exec(&mut conn, "DROP TABLE IF EXISTS dtb_quickstart_orders")?;
    exec(
        &mut conn,
        "CREATE TABLE dtb_quickstart_orders \
         (id BIGINT PRIMARY KEY, status VARCHAR(16) NOT NULL, receipts INTEGER NOT NULL DEFAULT 0)",
    )?;

    // The worker. Its handler runs in the transaction that consumes the job's barrier; the
    // UPDATE matches only if the order is visible as paid, i.e. if the handler sees the
    // producer's committed writes.
    let (ran_tx, ran_rx) = unbounded();
    // One connection per handler (one worker thread), five for the worker's waiter (SQLite:
    // two).
    let pool = Pool::builder()
        .max_size(6)
        .build(ConnectionManager::<C>::new(url))?;
    let mut worker = WorkerBuilder::new(pool)
        .url(faktory.url())
        .workers(1)
        .register("send_receipt", move |job: &Job, conn: &mut C| {
            let started = Instant::now();
            let order = job.args()[0].as_i64().unwrap_or_default();
            let sql = format!(
                "UPDATE dtb_quickstart_orders SET receipts = receipts + 1 \
                 WHERE id = {order} AND status = 'paid'"
            );
            let saw_paid = diesel::sql_query(sql).execute(conn)? == 1;
            let _ = ran_tx.send((order, saw_paid, started));
            Ok::<_, diesel::result::Error>(())
        })
        .connect()?;
    let stop = worker.shutdown_handle();
    let monitor = worker.monitor();
    let queue = faktory.unique_queue("quickstart");
    let worker_queue = queue.clone();
    let worker_thread = std::thread::spawn(move || worker.run(&[worker_queue]));
    let producer = Producer::connect(&faktory.url())?;
    let receipt = |order: i64| Job::new("send_receipt", vec![order]).on_queue(queue.clone());
    println!("migrations applied, worker thread started\n");

    println!("1. A transaction that commits: order 1 inserted, its job enqueued");
    let mut commit_sent = Instant::now();
    conn.transaction(|c| {
        exec(
            c,
            "INSERT INTO dtb_quickstart_orders (id, status) VALUES (1, 'paid')",
        )?;
        c.enqueue_with_barrier(&producer, receipt(1))?;
        wait_for("the worker to hold the job", || monitor.waiting() == 1);
        println!("   the worker has fetched the job and waits for the transaction to end");
        let early = ran_rx.recv_timeout(Duration::from_millis(300));
        assert!(early.is_err(), "the handler ran before COMMIT");
        println!("   300 ms more inside the transaction: the job has not run");
        commit_sent = Instant::now();
        Ok::<_, diesel_transaction_barrier::Error>(())
    })?;
    let (order, saw_paid, started) = ran_rx.recv_timeout(Duration::from_secs(30))?;
    assert_eq!(order, 1);
    println!(
        "   COMMIT -> the handler ran {:.1} ms later and saw order 1 {}\n",
        ms(started.saturating_duration_since(commit_sent)),
        if saw_paid {
            "as paid"
        } else {
            "NOT as paid (unexpected)"
        },
    );

    println!("2. A transaction that rolls back: order 2 inserted, its job enqueued");
    let rolled_back = conn.transaction(|c| {
        exec(
            c,
            "INSERT INTO dtb_quickstart_orders (id, status) VALUES (2, 'paid')",
        )?;
        c.enqueue_with_barrier(&producer, receipt(2))?;
        wait_for("the worker to hold the job", || monitor.waiting() == 1);
        println!("   the worker has fetched the job and waits for the transaction to end");
        // Say the payment was declined.
        Err::<(), _>(diesel::result::Error::RollbackTransaction)
    });
    assert!(rolled_back.is_err());
    let rolled_back_at = Instant::now();
    wait_for("the job to be aborted", || monitor.aborted() == 1);
    assert!(ran_rx.is_empty(), "the job of order 2 ran");
    println!(
        "   ROLLBACK -> {:.0} ms later the worker dropped the job without running it (aborted)\n",
        ms(rolled_back_at.elapsed())
    );

    println!("3. No transaction: order 3 inserted, its job enqueued");
    exec(
        &mut conn,
        "INSERT INTO dtb_quickstart_orders (id, status) VALUES (3, 'paid')",
    )?;
    let pushed = Instant::now();
    conn.enqueue_with_barrier(&producer, receipt(3))?;
    let (order, _, started) = ran_rx.recv_timeout(Duration::from_secs(30))?;
    assert_eq!(order, 3);
    println!(
        "   no barrier to wait for -> the handler ran {:.1} ms after the push\n",
        ms(started.saturating_duration_since(pushed))
    );

    stop.shutdown();
    let _ = worker_thread.join();
    exec(&mut conn, "DROP TABLE dtb_quickstart_orders")?;
    println!(
        "done: {} jobs ran, {} aborted; the worker has stopped",
        monitor.ran(),
        monitor.aborted()
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn exec<C: Connection>(conn: &mut C, sql: &str) -> QueryResult<usize>
where
    SqlQuery: ExecuteDsl<C>,
{
    diesel::sql_query(sql).execute(conn)
}

/// Waits up to 30 seconds for `cond`.
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
