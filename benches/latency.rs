//! Measures commit → handler-start latency when the worker already holds the job.
//!
//! ```text
//! cargo bench --bench latency --features testing            # PostgreSQL
//! DATABASE_URL=mysql://root@127.0.0.1:3306/test \
//!     cargo bench --bench latency --features mysql,testing  # MariaDB / MySQL
//! ```
//!
//! `DATABASE_URL` defaults to `postgres://postgres@127.0.0.1:5432/test`; `FAKTORY_URL`, when
//! set, names the Faktory server, else an in-process test server is started. `JOBS` sets the
//! number of transactions (default 300). Each transaction enqueues one job, waits until the
//! worker has fetched it (and so is waiting on the barrier), then commits; the handler notes the
//! instant it starts. A negative figure means the handler started before the producer's
//! `COMMIT` call had returned (the server releases waiters before it answers the client).

use crossbeam_channel::unbounded;
use diesel::query_builder::SqlQuery;
use diesel::query_dsl::methods::ExecuteDsl;
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel::RunQueryDsl;
use diesel_transaction_barrier::testing::{JobEventKind, TestFaktory};
use diesel_transaction_barrier::{
    BarrierConnection, EnqueueWithBarrier, Error, Job, Producer, WorkerBuilder,
};
use std::time::{Duration, Instant};

fn main() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let jobs: usize = std::env::var("JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    if url.starts_with("postgres") {
        #[cfg(feature = "postgres")]
        return measure::<diesel::pg::PgConnection>(&url, jobs);
    }
    if url.starts_with("mysql") {
        #[cfg(feature = "mysql")]
        return measure::<diesel::mysql::MysqlConnection>(&url, jobs);
    }
    eprintln!("DATABASE_URL {url:?} needs a backend feature this benchmark was not built with");
    std::process::exit(2);
}

#[allow(dead_code)]
fn measure<C>(url: &str, jobs: usize)
where
    C: BarrierConnection + R2D2Connection,
    SqlQuery: ExecuteDsl<C>,
{
    let faktory = TestFaktory::from_env_or_start().expect("faktory");
    let queue = faktory.unique_queue("latency");
    println!("database: {url}\nfaktory:  {}", faktory.url());
    let mut conn = C::establish(url).expect("database");
    diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
    diesel::sql_query("CREATE TABLE IF NOT EXISTS dtb_example_orders (id BIGINT PRIMARY KEY)")
        .execute(&mut conn)
        .expect("table");

    let (tx, rx) = unbounded::<Instant>();
    let pool = Pool::builder()
        .max_size(4)
        .build(ConnectionManager::<C>::new(url))
        .expect("pool");
    let mut worker = WorkerBuilder::new(pool)
        .url(faktory.url())
        .workers(2)
        .register("latency_probe", move |_job: &Job, _conn: &mut C| {
            let _ = tx.send(Instant::now());
            Ok::<(), std::io::Error>(())
        })
        .connect()
        .expect("worker");
    let stop = worker.shutdown_handle();
    let q = queue.clone();
    let worker_thread = std::thread::spawn(move || worker.run(&[q]));
    let producer = Producer::connect(&faktory.url()).expect("producer");

    let base = (uuid::Uuid::new_v4().as_u128() as i64 & 0x3fff_ffff_ffff) << 16;
    let mut latencies = Vec::with_capacity(jobs);
    let mut from_issue = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let id = base + i as i64;
        let mut commit_issued = Instant::now();
        conn.transaction(|c| {
            diesel::sql_query(format!("INSERT INTO dtb_example_orders (id) VALUES ({id})"))
                .execute(c)?;
            let jid = c.enqueue_with_barrier(
                &producer,
                Job::new("latency_probe", vec![id]).on_queue(queue.clone()),
            )?;
            wait_until_fetched(&faktory, jid.as_str());
            commit_issued = Instant::now();
            Ok::<_, Error>(())
        })
        .expect("transaction");
        let committed = Instant::now();
        let started = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("handler ran");
        latencies.push(signed_micros(started, committed));
        from_issue.push(signed_micros(started, commit_issued));
    }
    stop.shutdown();
    let _ = worker_thread.join();

    report("COMMIT returned -> handler start", latencies);
    report("COMMIT issued   -> handler start", from_issue);
}

fn report(what: &str, mut micros: Vec<i64>) {
    micros.sort_unstable();
    let pct = |p: f64| micros[((micros.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    println!(
        "{what} over {} jobs: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        micros.len(),
        pct(0.50),
        pct(0.99),
        pct(1.0),
    );
}

/// `a - b` in microseconds (negative when the handler started before COMMIT returned).
fn signed_micros(a: Instant, b: Instant) -> i64 {
    if a >= b {
        (a - b).as_micros() as i64
    } else {
        -((b - a).as_micros() as i64)
    }
}

/// Waits until the worker has fetched `jid` (and then a moment, so that it is blocked on the
/// barrier). Against a real Faktory, whose history cannot be inspected, waits a fixed 50 ms.
fn wait_until_fetched(faktory: &TestFaktory, jid: &str) {
    match faktory.server() {
        Some(server) => {
            let fetched = server.wait_for(
                |s| {
                    s.history(jid)
                        .iter()
                        .any(|e| e.kind() == JobEventKind::Fetched)
                },
                Duration::from_secs(10),
            );
            assert!(fetched, "the worker fetched the job");
            std::thread::sleep(Duration::from_millis(5));
        }
        None => std::thread::sleep(Duration::from_millis(50)),
    }
}
