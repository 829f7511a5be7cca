//! Measures commit → handler-start latency on MariaDB / MySQL when the worker already waits
//! for the job's barrier.
//!
//! ```text
//! cargo run --release --example latency_mysql --features mysql,testing
//! ```
//!
//! `MYSQL_DATABASE_URL` (default `mysql://root@127.0.0.1:3306/test`) names an account that may
//! create a database: the example works in a database of its own and drops it at the end.
//! `FAKTORY_URL`, when set, names the Faktory server, else an in-process test server is
//! started. `JOBS` sets the number of transactions (default 300).
//!
//! The transactions run one after another. Each inserts a row and enqueues a job, waits until
//! the worker holds the job and waits for its barrier, lets a random 0–20 ms pass (so that
//! the commit falls anywhere in the waiter's polling cycle), and commits. The handler notes the
//! instant it starts; the figure is that instant minus the instant `COMMIT` returned.

use crossbeam_channel::unbounded;
use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel::{Connection, RunQueryDsl};
use diesel_transaction_barrier::testing::TestFaktory;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Job, Producer, WorkerBuilder};
use rand::Rng;
use std::time::{Duration, Instant};

fn main() {
    let admin_url = std::env::var("MYSQL_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let jobs: usize = std::env::var("JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let name = format!("dtb_latency_{}", uuid::Uuid::new_v4().simple());
    let mut admin = MysqlConnection::establish(&admin_url).expect("database");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("create database");
    let url = with_database(&admin_url, &name);
    let result = std::panic::catch_unwind(|| measure(&url, jobs));
    let _ = admin.batch_execute(&format!("DROP DATABASE {name}"));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn measure(url: &str, jobs: usize) {
    let faktory = TestFaktory::from_env_or_start().expect("faktory");
    let queue = faktory.unique_queue("latency");
    let mut conn = MysqlConnection::establish(url).expect("database");
    diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
    diesel::sql_query("CREATE TABLE dtb_example_orders (id BIGINT PRIMARY KEY)")
        .execute(&mut conn)
        .expect("table");
    let version: String = diesel::select(diesel::dsl::sql::<diesel::sql_types::Text>("VERSION()"))
        .get_result(&mut conn)
        .expect("version");
    println!("server {version}, faktory {}", faktory.url());

    let (tx, rx) = unbounded::<Instant>();
    let pool = Pool::builder()
        .max_size(4)
        .build(ConnectionManager::<MysqlConnection>::new(url))
        .expect("pool");
    let mut worker = WorkerBuilder::new(pool)
        .url(faktory.url())
        .workers(2)
        .register(
            "latency_probe",
            move |_job: &Job, _conn: &mut MysqlConnection| {
                let _ = tx.send(Instant::now());
                Ok::<(), std::io::Error>(())
            },
        )
        .connect()
        .expect("worker");
    let monitor = worker.monitor();
    let stop = worker.shutdown_handle();
    let q = queue.clone();
    let worker_thread = std::thread::spawn(move || worker.run(&[q]));
    let producer = Producer::connect(&faktory.url()).expect("producer");

    let mut rng = rand::thread_rng();
    let mut latencies = Vec::with_capacity(jobs);
    for id in 0..jobs as i64 {
        let pause = Duration::from_micros(rng.gen_range(0..=20_000));
        conn.transaction(|c| {
            diesel::sql_query(format!("INSERT INTO dtb_example_orders (id) VALUES ({id})"))
                .execute(c)?;
            c.enqueue_with_barrier(
                &producer,
                Job::new("latency_probe", vec![id]).on_queue(queue.clone()),
            )?;
            let since = Instant::now();
            while monitor.waiting() == 0 {
                assert!(
                    since.elapsed() < Duration::from_secs(10),
                    "the worker waits"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            std::thread::sleep(pause);
            Ok::<_, Error>(())
        })
        .expect("transaction");
        let committed = Instant::now();
        let started = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("handler ran");
        latencies.push(signed_micros(started, committed));
        // Let the worker finish the job before the next transaction starts.
        let since = Instant::now();
        while monitor.waiting() > 0 && since.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    stop.shutdown();
    let _ = worker_thread.join();

    latencies.sort_unstable();
    let pct =
        |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    println!(
        "COMMIT returned -> handler start over {} jobs: p50 {:.3} ms, p90 {:.3} ms, \
         p99 {:.3} ms, max {:.3} ms",
        latencies.len(),
        pct(0.50),
        pct(0.90),
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

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}
