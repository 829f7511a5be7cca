//! The waiting-at-scale benchmark: prints a table of figures, each with its goal.
//!
//! ```text
//! cargo bench --bench throughput --features testing                      # PostgreSQL
//! DATABASE_URL=mysql://root@127.0.0.1:3306/test \
//!     cargo bench --bench throughput --features mysql,testing            # MariaDB
//! ```
//!
//! `DATABASE_URL` defaults to `postgres://postgres@127.0.0.1:5432/test`; `FAKTORY_URL` names a
//! Faktory server (else an in-process test server is started); `BENCH_SCALE` (default 1.0)
//! scales every job count. The benchmark exits non-zero only on a correctness failure (a job
//! lost, run twice or run early, a barrier row left), never because a figure missed its goal.
//!
//! 1. commit → handler start when the worker already holds the job (2,000 jobs);
//! 2. producer cost: update + `enqueue_with_barrier` vs update + plain push, transactions/s;
//! 3. worker throughput, 8 handlers: already-committed barrier jobs vs plain jobs;
//! 4. 500 jobs waiting on open transactions: database connections the worker process holds,
//!    and the commit → start latency of 200 short transactions' jobs meanwhile;
//! 5. barrier rows left after draining 10,000 jobs, and the worker process's peak RSS;
//! 6. big transactions: 10,000 jobs enqueued in one transaction with
//!    `enqueue_many_with_barrier` vs one at a time and vs a plain bulk push; a worker (8
//!    handlers, defaults) that fetches them while the transaction stays open for 10 s
//!    (`BENCH_HOLD_SECS`): hand-backs per job, none run early or twice, COMMIT → all done vs
//!    the same worker's steady rate on committed barrier jobs; and the same after a ROLLBACK:
//!    none runs.
//!
//! Parts 4 and 5 run the worker in a child process (this binary, re-executed) so that its
//! connections and memory are its own.

use crossbeam_channel::{unbounded, Receiver};
use diesel::query_builder::SqlQuery;
use diesel::query_dsl::methods::{ExecuteDsl, LoadQuery};
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel::sql_types::BigInt;
use diesel::{QueryableByName, RunQueryDsl};
use diesel_transaction_barrier::testing::TestFaktory;
use diesel_transaction_barrier::{
    BarrierConnection, EnqueueWithBarrier, Error, Job, Producer, WorkerBuilder,
};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KIND: &str = "bench_job";

/// What the benchmark's handler does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Takes a connection, writes nothing.
    NoWrite,
    /// Takes a connection, adds one to the job's row of `dtb_bench_accounts`.
    WriteOne,
    /// Takes no connection (`register_without_connection`).
    Detached,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn main() {
    if let Ok(filter) = std::env::var("DTB_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init();
    }
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    if url.starts_with("postgres") {
        #[cfg(feature = "postgres")]
        return dispatch::<diesel::pg::PgConnection>(&url);
    }
    if url.starts_with("mysql") {
        #[cfg(feature = "mysql")]
        return dispatch::<diesel::mysql::MysqlConnection>(&url);
    }
    eprintln!("DATABASE_URL {url:?} needs a backend feature this benchmark was not built with");
    std::process::exit(2);
}

#[allow(dead_code)]
fn dispatch<C>(url: &str)
where
    C: BarrierConnection + R2D2Connection,
    SqlQuery: ExecuteDsl<C> + for<'a> LoadQuery<'a, C, Count>,
{
    if std::env::var("DTB_BENCH_ROLE").as_deref() == Ok("worker") {
        child_worker::<C>(url);
    } else {
        Bench::<C>::new(url).run();
    }
}

fn scale(n: usize) -> usize {
    let s: f64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    ((n as f64 * s).round() as usize).max(10)
}

fn now_micros() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros()
}

struct Row {
    what: String,
    figure: String,
    goal: String,
    met: Option<bool>,
}

struct Bench<C: BarrierConnection> {
    url: String,
    faktory: TestFaktory,
    producer: Producer,
    rows: Vec<Row>,
    failures: Vec<String>,
    next_id: i64,
    _c: std::marker::PhantomData<C>,
}

impl<C> Bench<C>
where
    C: BarrierConnection + R2D2Connection,
    SqlQuery: ExecuteDsl<C> + for<'a> LoadQuery<'a, C, Count>,
{
    fn new(url: &str) -> Self {
        let faktory = TestFaktory::from_env_or_start().expect("faktory");
        let producer = Producer::builder()
            .url(faktory.url())
            .max_idle(32)
            .connect()
            .expect("producer");
        let mut conn = C::establish(url).expect("database");
        diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        exec(&mut conn, "DROP TABLE IF EXISTS dtb_bench_orders");
        exec(
            &mut conn,
            "CREATE TABLE dtb_bench_orders (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)",
        );
        exec(&mut conn, "DROP TABLE IF EXISTS dtb_bench_accounts");
        exec(
            &mut conn,
            "CREATE TABLE dtb_bench_accounts (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)",
        );
        exec(&mut conn, "DROP TABLE IF EXISTS dtb_bench_commits");
        exec(
            &mut conn,
            "CREATE TABLE dtb_bench_commits (id BIGINT PRIMARY KEY)",
        );
        exec(&mut conn, "DELETE FROM dtb_barriers");
        println!("database: {url}");
        println!("faktory:  {}", faktory.url());
        println!(
            "machine:  {} cores; figures are ratios or latencies measured in this one run",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        Bench {
            url: url.to_string(),
            faktory,
            producer,
            rows: Vec::new(),
            failures: Vec::new(),
            next_id: 1,
            _c: std::marker::PhantomData,
        }
    }

    fn conn(&self) -> C {
        C::establish(&self.url).expect("database")
    }

    fn ids(&mut self, n: usize) -> Vec<i64> {
        let first = self.next_id;
        self.next_id += n as i64;
        (first..self.next_id).collect()
    }

    fn pool(&self, size: u32) -> Pool<ConnectionManager<C>> {
        Pool::builder()
            .max_size(size)
            .min_idle(Some(0))
            .build(ConnectionManager::new(self.url.clone()))
            .expect("pool")
    }

    fn row(&mut self, what: &str, figure: String, goal: &str, met: Option<bool>) {
        println!("  {what}: {figure}");
        self.rows.push(Row {
            what: what.into(),
            figure,
            goal: goal.into(),
            met,
        });
    }

    fn run(mut self) {
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let on = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);
        if on("1") {
            self.latency();
        }
        if on("2") {
            self.producer_cost();
        }
        if on("3") {
            self.throughput();
        } else if on("3C") {
            self.detached_throughput(0.0);
        }
        if on("4") {
            self.waiting_at_scale();
        }
        if on("6") {
            self.big_transactions();
        }
        self.print();
        if !self.failures.is_empty() {
            for f in &self.failures {
                eprintln!("CORRECTNESS FAILURE: {f}");
            }
            std::process::exit(1);
        }
    }

    fn print(&self) {
        println!();
        println!("| figure | measured | goal | met |");
        println!("| --- | --- | --- | --- |");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            println!("| {} | {} | {} | {} |", r.what, r.figure, r.goal, met);
        }
    }

    /// A worker in this process on `queue`, whose handler reports (id, start instant).
    fn start_worker(
        &self,
        queue: &str,
        workers: usize,
        max_waiting: usize,
    ) -> (
        diesel_transaction_barrier::ShutdownHandle,
        diesel_transaction_barrier::WorkerMonitor,
        std::thread::JoinHandle<()>,
        Receiver<(i64, Instant)>,
    ) {
        self.start_worker_shaped(queue, workers, max_waiting, Shape::NoWrite)
    }

    /// As [`start_worker`](Self::start_worker), with a handler of `shape`.
    fn start_worker_shaped(
        &self,
        queue: &str,
        workers: usize,
        max_waiting: usize,
        shape: Shape,
    ) -> (
        diesel_transaction_barrier::ShutdownHandle,
        diesel_transaction_barrier::WorkerMonitor,
        std::thread::JoinHandle<()>,
        Receiver<(i64, Instant)>,
    ) {
        let (tx, rx) = unbounded();
        let builder = WorkerBuilder::new(self.pool(workers as u32 + 8))
            .url(self.faktory.url())
            .workers(workers)
            .max_waiting(max_waiting);
        let builder = if shape == Shape::Detached {
            builder.register_without_connection(KIND, move |job: &Job| {
                let id = job.args()[0].as_i64().unwrap_or(-1);
                let _ = tx.send((id, Instant::now()));
                Ok::<(), std::io::Error>(())
            })
        } else {
            builder.register_without_barrier(KIND, move |job: &Job, conn: &mut C| {
                let id = job.args()[0].as_i64().unwrap_or(-1);
                if shape == Shape::WriteOne {
                    diesel::sql_query(format!(
                        "UPDATE dtb_bench_accounts SET n = n + 1 WHERE id = {id}"
                    ))
                    .execute(conn)?;
                }
                let _ = tx.send((id, Instant::now()));
                Ok::<(), diesel::result::Error>(())
            })
        };
        let mut worker = builder.connect().expect("worker");
        let stop = worker.shutdown_handle();
        let monitor = worker.monitor();
        let q = queue.to_string();
        let t = std::thread::spawn(move || {
            worker.run(&[q]).expect("worker run");
        });
        (stop, monitor, t, rx)
    }

    fn job(&self, queue: &str, id: i64) -> Job {
        Job::new(KIND, vec![id]).on_queue(queue.to_string())
    }

    /// 1. commit → handler start, the worker already waiting on the barrier.
    fn latency(&mut self) {
        let n = scale(2000);
        println!("\n1. commit -> handler start, worker already waiting ({n} jobs)");
        let queue = self.faktory.unique_queue("bench-latency");
        let (stop, monitor, t, rx) = self.start_worker(&queue, 2, 8);
        let mut conn = self.conn();
        let mut lat = Vec::with_capacity(n);
        for id in self.ids(n) {
            conn.transaction(|c| {
                exec(
                    c,
                    &format!("INSERT INTO dtb_bench_orders (id, n) VALUES ({id}, 0)"),
                );
                c.enqueue_with_barrier(&self.producer, self.job(&queue, id))?;
                let start = Instant::now();
                while monitor.waiting() == 0 {
                    if start.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                    std::thread::yield_now();
                }
                Ok::<_, Error>(())
            })
            .expect("transaction");
            let committed = Instant::now();
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((ran, at)) if ran == id => lat.push(signed_micros(at, committed)),
                Ok((ran, _)) => self
                    .failures
                    .push(format!("latency: job {ran} ran instead of {id}")),
                Err(_) => self.failures.push(format!("latency: job {id} never ran")),
            }
        }
        stop.shutdown();
        let _ = t.join();
        let (p50, p99) = percentiles(&mut lat);
        self.row(
            "1. commit → handler start, p50",
            format!("{:.3} ms", p50 / 1000.0),
            "≤ 2 ms",
            Some(p50 <= 2000.0),
        );
        self.row(
            "1. commit → handler start, p99",
            format!("{:.3} ms", p99 / 1000.0),
            "≤ 10 ms",
            Some(p99 <= 10_000.0),
        );
    }

    /// 2. transactions/s: update + enqueue_with_barrier vs update + plain push.
    fn producer_cost(&mut self) {
        let n = scale(2000);
        println!("\n2. producer cost ({n} transactions each way, 4 threads)");
        let queue = self.faktory.unique_queue("bench-producer");
        let ids = self.ids(n);
        {
            let mut c = self.conn();
            for chunk in ids.chunks(500) {
                let values: Vec<String> = chunk.iter().map(|id| format!("({id}, 0)")).collect();
                exec(
                    &mut c,
                    &format!(
                        "INSERT INTO dtb_bench_orders (id, n) VALUES {}",
                        values.join(",")
                    ),
                );
            }
        }
        let run = |barrier: bool| -> f64 {
            let start = Instant::now();
            std::thread::scope(|s| {
                for part in ids.chunks(ids.len().div_ceil(4)) {
                    let queue = &queue;
                    let producer = &self.producer;
                    let url = &self.url;
                    s.spawn(move || {
                        let mut conn = C::establish(url).expect("database");
                        for &id in part {
                            conn.transaction(|c| {
                                exec(
                                    c,
                                    &format!(
                                        "UPDATE dtb_bench_orders SET n = n + 1 WHERE id = {id}"
                                    ),
                                );
                                let job = Job::new(KIND, vec![id]).on_queue(queue.clone());
                                if barrier {
                                    c.enqueue_with_barrier(producer, job)?;
                                } else {
                                    producer.push(job)?;
                                }
                                Ok::<_, Error>(())
                            })
                            .expect("transaction");
                        }
                    });
                }
            });
            ids.len() as f64 / start.elapsed().as_secs_f64()
        };
        // Alternate to spread any drift over both; keep the best of two rounds each.
        let plain1 = run(false);
        let barrier1 = run(true);
        let plain2 = run(false);
        let barrier2 = run(true);
        let (plain, barrier) = (plain1.max(plain2), barrier1.max(barrier2));
        let ratio = barrier / plain;
        self.row(
            "2. producer: barrier tx/s vs plain-push tx/s",
            format!("{barrier:.0} / {plain:.0} = {ratio:.2}"),
            "ratio ≥ 0.7",
            Some(ratio >= 0.7),
        );
        // Leave nothing behind for the next parts: consume the barrier jobs.
        let (stop, _monitor, t, rx) = self.start_worker(&queue, 8, 64);
        let expected = 4 * n;
        let mut got = 0;
        while got < expected && rx.recv_timeout(Duration::from_secs(30)).is_ok() {
            got += 1;
        }
        stop.shutdown();
        let _ = t.join();
        if got < expected {
            self.failures
                .push(format!("producer cost: {got} of {expected} jobs ran"));
        }
    }

    /// 3. worker throughput on already-committed barrier jobs vs plain jobs, 8 handlers.
    fn throughput(&mut self) {
        let n = scale(4000);
        println!("\n3. worker throughput, 8 handlers ({n} jobs each way)");
        let plain = self.jobs_per_second(n, false, Shape::NoWrite);
        let barrier = self.jobs_per_second(n, true, Shape::NoWrite);
        let ratio = barrier / plain;
        self.row(
            "3. worker, no-write handler: barrier jobs/s vs plain jobs/s",
            format!("{barrier:.0} / {plain:.0} = {ratio:.2}"),
            "ratio ≥ 0.8",
            Some(ratio >= 0.8),
        );
        let plain_write = self.jobs_per_second(n, false, Shape::WriteOne);
        let barrier_write = self.jobs_per_second(n, true, Shape::WriteOne);
        let ratio = barrier_write / plain_write;
        self.row(
            "3A. worker, handler writing one row: barrier jobs/s vs plain jobs/s",
            format!("{barrier_write:.0} / {plain_write:.0} = {ratio:.2}"),
            "ratio ≥ 0.9",
            Some(ratio >= 0.9),
        );
        let commits = self.durable_commits_per_second(8);
        let ratio = barrier / commits;
        self.row(
            "3B. worker, no-write handler: barrier jobs/s vs the database's durable commits/s (8 threads)",
            format!("{barrier:.0} / {commits:.0} = {ratio:.2}"),
            "ratio ≥ 0.7",
            Some(ratio >= 0.7),
        );
        // What 3B can reach on this machine: jobs whose transactions write nothing, through the
        // same worker and Faktory server.
        let ceiling = plain / commits;
        self.row(
            "3B ceiling: plain jobs/s (their transactions write nothing) vs the same durable commits/s",
            format!("{plain:.0} / {commits:.0} = {ceiling:.2}"),
            "—",
            None,
        );
        self.detached_throughput(plain);
    }

    /// 3C. Handlers that write nothing, registered without a connection; `plain`: row 3's
    /// baseline (plain jobs, a no-write handler that takes a connection), if measured.
    fn detached_throughput(&mut self, plain: f64) {
        let n = scale(4000);
        println!("\n3C. worker throughput, 8 handlers without a connection ({n} jobs each way)");
        let plain_detached = self.jobs_per_second(n, false, Shape::Detached);
        let barrier_detached = self.jobs_per_second(n, true, Shape::Detached);
        let ratio = barrier_detached / plain_detached;
        self.row(
            "3C. worker, handler without a connection: barrier jobs/s vs plain jobs/s (the same handler)",
            format!("{barrier_detached:.0} / {plain_detached:.0} = {ratio:.2}"),
            "ratio ≥ 0.8",
            Some(ratio >= 0.8),
        );
        if plain > 0.0 {
            let ratio = barrier_detached / plain;
            self.row(
                "3C. the same barrier jobs vs plain jobs with a no-write handler that takes a connection (row 3's baseline)",
                format!("{barrier_detached:.0} / {plain:.0} = {ratio:.2}"),
                "ratio ≥ 0.8",
                Some(ratio >= 0.8),
            );
        }
    }

    /// How many jobs per second a worker with 8 handlers runs from a queue of `n` jobs pushed
    /// beforehand: barrier jobs (their transactions committed) or plain ones, with handlers
    /// that write one row each or nothing.
    fn jobs_per_second(&mut self, n: usize, barrier: bool, shape: Shape) -> f64 {
        let write = shape == Shape::WriteOne;
        let queue = self.faktory.unique_queue("bench-throughput");
        let ids = self.ids(n);
        let mut conn = self.conn();
        if write {
            for chunk in ids.chunks(500) {
                let rows: Vec<String> = chunk.iter().map(|id| format!("({id}, 0)")).collect();
                exec(
                    &mut conn,
                    &format!(
                        "INSERT INTO dtb_bench_accounts (id, n) VALUES {}",
                        rows.join(", ")
                    ),
                );
            }
        }
        if barrier {
            for chunk in ids.chunks(100) {
                conn.transaction(|c| {
                    for &id in chunk {
                        c.enqueue_with_barrier(&self.producer, self.job(&queue, id))?;
                    }
                    Ok::<_, Error>(())
                })
                .expect("transaction");
            }
        } else if shape == Shape::Detached {
            // Outside a transaction: plain jobs marked as needing no wait, which a kind that
            // requires a barrier accepts.
            for chunk in ids.chunks(1000) {
                conn.enqueue_many_with_barrier(
                    &self.producer,
                    chunk.iter().map(|&id| self.job(&queue, id)),
                )
                .expect("plain jobs");
            }
        } else {
            for &id in &ids {
                self.producer.push(self.job(&queue, id)).expect("push");
            }
        }
        let max_waiting = std::env::var("BENCH_MAX_WAITING")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(32);
        let (stop, monitor, t, rx) = self.start_worker_shaped(&queue, 8, max_waiting, shape);
        let start = Instant::now();
        let cpu_before = machine_cpu();
        let mut seen = std::collections::HashSet::new();
        while seen.len() < n {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((id, _)) => {
                    if !seen.insert(id) {
                        self.failures
                            .push(format!("throughput: job {id} ran twice"));
                    }
                }
                Err(_) => {
                    self.failures
                        .push(format!("throughput: only {} of {n} jobs ran", seen.len()));
                    break;
                }
            }
        }
        let elapsed = start.elapsed();
        let rate = seen.len() as f64 / elapsed.as_secs_f64();
        // The whole machine's CPU (worker, Faktory server, database): how busy it was, and
        // what each job cost it.
        if let (Some((busy0, total0)), Some((busy1, total1))) = (cpu_before, machine_cpu()) {
            let (busy, total) = ((busy1 - busy0) as f64, (total1 - total0) as f64);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let cpu_secs = elapsed.as_secs_f64() * cores * busy / total.max(1.0);
            println!(
                "  barrier {barrier}, {shape:?}: {rate:.0} jobs/s, machine CPU {:.0}% busy, {:.0} µs of CPU per job",
                100.0 * busy / total.max(1.0),
                1e6 * cpu_secs / seen.len().max(1) as f64
            );
        }
        if monitor.snoozed() > 0 {
            println!(
                "  ({} deliveries handed back or snoozed, barrier {barrier}, write {write})",
                monitor.snoozed()
            );
        }
        stop.shutdown();
        let _ = t.join();
        if write {
            let sum = count_rows(
                &mut conn,
                &format!(
                    "SELECT CAST(COALESCE(SUM(n), 0) AS {}) AS n FROM dtb_bench_accounts \
                     WHERE id BETWEEN {} AND {}",
                    if C::backend_name() == "mysql" {
                        "SIGNED"
                    } else {
                        "BIGINT"
                    },
                    ids[0],
                    ids[ids.len() - 1]
                ),
            );
            if sum != n as i64 {
                self.failures.push(format!(
                    "throughput: the handlers' writes add up to {sum}, not {n}"
                ));
            }
        }
        rate
    }

    /// The database's own rate of durable single-row commits (an insert, then a delete, each
    /// committing on its own) from `threads` connections at once, for about three seconds.
    fn durable_commits_per_second(&mut self, threads: usize) -> f64 {
        let span = Duration::from_secs_f64(3.0 * scale(1000) as f64 / 1000.0);
        let first = self.ids(1)[0] * 1_000_000;
        let started = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let url = self.url.clone();
                    s.spawn(move || {
                        let mut conn = C::establish(&url).expect("database");
                        let id = first + t as i64;
                        let mut commits = 0u64;
                        while started.elapsed() < span {
                            exec(
                                &mut conn,
                                &format!("INSERT INTO dtb_bench_commits (id) VALUES ({id})"),
                            );
                            exec(
                                &mut conn,
                                &format!("DELETE FROM dtb_bench_commits WHERE id = {id}"),
                            );
                            commits += 2;
                        }
                        commits
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        let rate = total as f64 / started.elapsed().as_secs_f64();
        println!("  the database's durable commits from {threads} threads: {rate:.0}/s");
        rate
    }

    /// 4 and 5, with the worker in a child process.
    fn waiting_at_scale(&mut self) {
        let waiting = scale(500);
        let short = scale(200);
        let drain = scale(10_000);
        let queue = self.faktory.unique_queue("bench-scale");
        // One connection per open transaction: stay within the server's limit.
        let limit = max_connections::<C>(&mut self.conn());
        let transactions = waiting.min(limit.saturating_sub(40).max(1));
        println!(
            "\n4. {waiting} jobs waiting on {transactions} open transactions (server max_connections {limit}), {short} short transactions meanwhile"
        );
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env("DTB_BENCH_ROLE", "worker")
            .env("DTB_BENCH_QUEUE", &queue)
            .env("DTB_BENCH_FAKTORY", self.faktory.url())
            .env("DTB_BENCH_WAITING", (waiting + 16).to_string())
            .env("DATABASE_URL", &self.url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("worker process");
        let pid = child.id();
        let mut child_in = child.stdin.take().unwrap();
        let (tx, rx) = unbounded::<String>();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let ran = |rx: &Receiver<String>| -> Option<(i64, u128)> {
            loop {
                let line = rx.recv_timeout(Duration::from_secs(60)).ok()?;
                let mut parts = line.split_whitespace();
                if parts.next() == Some("RAN") {
                    let id = parts.next()?.parse().ok()?;
                    let at = parts.next()?.parse().ok()?;
                    return Some((id, at));
                }
            }
        };
        let ask = |child_in: &mut std::process::ChildStdin,
                   rx: &Receiver<String>,
                   q: &str|
         -> Option<String> {
            writeln!(child_in, "{q}").ok()?;
            loop {
                let line = rx.recv_timeout(Duration::from_secs(30)).ok()?;
                if let Some(rest) = line.strip_prefix(&format!("{q} ")) {
                    return Some(rest.to_string());
                }
            }
        };

        // Open the long transactions, each with its share of the waiting jobs.
        let long_ids = self.ids(waiting);
        let release = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = unbounded::<()>();
        let mut holders = Vec::new();
        for part in long_ids.chunks(waiting.div_ceil(transactions)) {
            let part = part.to_vec();
            let url = self.url.clone();
            let producer = self.producer.clone();
            let queue = queue.clone();
            let release = Arc::clone(&release);
            let ready_tx = ready_tx.clone();
            holders.push(std::thread::spawn(move || {
                let mut conn = C::establish(&url).expect("database");
                conn.transaction(|c| {
                    for &id in &part {
                        c.enqueue_with_barrier(
                            &producer,
                            Job::new(KIND, vec![id]).on_queue(queue.clone()),
                        )?;
                    }
                    ready_tx.send(()).unwrap();
                    while !release.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok::<_, Error>(())
                })
                .expect("long transaction");
            }));
        }
        for _ in 0..holders.len() {
            ready_rx.recv().expect("long transaction ready");
        }
        let start = Instant::now();
        while ask(&mut child_in, &rx, "WAITING")
            .and_then(|s| s.parse::<usize>().ok())
            .unwrap_or(0)
            < waiting
        {
            if start.elapsed() > Duration::from_secs(60) {
                self.failures
                    .push("scale: the worker never held all waiting jobs".into());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let held = ask(&mut child_in, &rx, "POOL").unwrap_or_default();
        let server_side = worker_sessions::<C>(&mut self.conn(), pid);
        let held_n: usize = held
            .split('/')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        self.row(
            "4. DB connections held by the worker while jobs wait",
            format!("{held_n} (open/in use/max: {held}; server-side: {server_side})"),
            "≤ 1 + commit_watchers (5)",
            Some(held_n <= 5),
        );

        // Short transactions meanwhile, one at a time, each job waited on before commit.
        let mut conn = self.conn();
        let mut lat = Vec::new();
        for id in self.ids(short) {
            let mut committed = 0;
            conn.transaction(|c| {
                c.enqueue_with_barrier(&self.producer, self.job(&queue, id))?;
                committed = now_micros();
                Ok::<_, Error>(())
            })
            .expect("short transaction");
            match ran(&rx) {
                Some((ran_id, at)) if ran_id == id => lat.push(at as i64 - committed as i64),
                Some((ran_id, _)) => self.failures.push(format!("scale: job {ran_id} ran while {id} was expected (a long transaction is still open)")),
                None => self.failures.push(format!("scale: short job {id} never ran")),
            }
        }
        let (_, p99) = percentiles(&mut lat);
        self.row(
            "4. commit → start of short jobs meanwhile, p99",
            format!("{:.3} ms", p99 / 1000.0),
            "≤ 20 ms",
            Some(p99 <= 20_000.0),
        );
        let rss = peak_rss_kib(pid);
        self.row(
            "5. worker peak RSS with the jobs waiting",
            format!("{:.1} MiB", rss as f64 / 1024.0),
            "reported",
            None,
        );

        // Release the long transactions: every waiting job runs exactly once.
        release.store(true, Ordering::SeqCst);
        for h in holders {
            let _ = h.join();
        }
        let mut seen = std::collections::HashSet::new();
        while seen.len() < waiting {
            match ran(&rx) {
                Some((id, _)) => {
                    if !seen.insert(id) {
                        self.failures.push(format!("scale: job {id} ran twice"));
                    }
                }
                None => {
                    self.failures.push(format!(
                        "scale: {} of {waiting} waiting jobs ran",
                        seen.len()
                    ));
                    break;
                }
            }
        }

        // 5. Drain 10,000 jobs; no barrier row may be left.
        println!("\n5. draining {drain} barrier jobs");
        let drain_ids = self.ids(drain);
        for chunk in drain_ids.chunks(200) {
            conn.transaction(|c| {
                for &id in chunk {
                    c.enqueue_with_barrier(&self.producer, self.job(&queue, id))?;
                }
                Ok::<_, Error>(())
            })
            .expect("transaction");
        }
        let mut count = 0;
        while count < drain {
            if ran(&rx).is_none() {
                self.failures
                    .push(format!("drain: {count} of {drain} jobs ran"));
                break;
            }
            count += 1;
        }
        let rss_all = peak_rss_kib(pid);
        let _ = writeln!(child_in, "STOP");
        let _ = child.wait();
        let left = count_rows(&mut conn, "SELECT COUNT(*) AS n FROM dtb_barriers");
        self.row(
            "5. barrier rows left after draining",
            format!("{left} (after {drain} jobs)"),
            "0",
            Some(left == 0),
        );
        if left != 0 {
            self.failures.push(format!("{left} barrier rows left"));
        }
        if rss_all > 0 {
            self.row(
                "5. worker peak RSS over the whole run",
                format!("{:.1} MiB", rss_all as f64 / 1024.0),
                "reported",
                None,
            );
        }
    }

    /// Part 6, big transactions: the bulk enqueue's cost, and a worker waiting for a big
    /// open transaction.
    fn big_transactions(&mut self) {
        let n = scale(10_000);
        let singles = scale(1_000).min(n);
        let hold = Duration::from_secs(
            std::env::var("BENCH_HOLD_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(10),
        );
        println!("\n6. big transactions ({n} jobs in one transaction)");
        let per_job_us = |d: Duration, k: usize| d.as_secs_f64() * 1e6 / k as f64;
        let mut conn = self.conn();

        // 6a. Enqueueing: one at a time, in bulk, and a plain bulk push (no transaction, no
        // barriers); the best of two rounds each, alternated.
        let single_queue = self.faktory.unique_queue("bench-bulk-single");
        let bulk_queue = self.faktory.unique_queue("bench-bulk");
        let plain_queue = self.faktory.unique_queue("bench-bulk-plain");
        let (mut single, mut bulk, mut plain) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..2 {
            let jobs: Vec<Job> = self
                .ids(singles)
                .into_iter()
                .map(|id| self.job(&single_queue, id))
                .collect();
            let started = Instant::now();
            conn.transaction(|c| {
                for job in jobs {
                    c.enqueue_with_barrier(&self.producer, job)?;
                }
                Ok::<_, Error>(())
            })
            .expect("one at a time");
            single = single.min(per_job_us(started.elapsed(), singles));

            let jobs: Vec<Job> = self
                .ids(n)
                .into_iter()
                .map(|id| self.job(&bulk_queue, id))
                .collect();
            let started = Instant::now();
            conn.transaction(|c| c.enqueue_many_with_barrier(&self.producer, jobs))
                .expect("bulk");
            bulk = bulk.min(per_job_us(started.elapsed(), n));

            let jobs: Vec<Job> = self
                .ids(n)
                .into_iter()
                .map(|id| self.job(&plain_queue, id))
                .collect();
            let started = Instant::now();
            self.producer.push_many(jobs).expect("plain bulk push");
            plain = plain.min(per_job_us(started.elapsed(), n));
        }
        self.row(
            "6. enqueue in one transaction: one at a time vs `enqueue_many_with_barrier`, µs per job",
            format!("{single:.1} / {bulk:.1} = {:.1}×", single / bulk),
            "≥ 10×",
            Some(single / bulk >= 10.0),
        );
        self.row(
            "6. `enqueue_many_with_barrier` in a transaction vs a plain bulk push, µs per job",
            format!("{bulk:.1} / {plain:.1} = {:.2}", bulk / plain),
            "≤ 2",
            Some(bulk / plain <= 2.0),
        );

        // The worker's steady rate on committed barrier jobs: the bulk-enqueued ones.
        let steady = self.drain(&bulk_queue, 2 * n, "steady rate");
        self.drain(&single_queue, 2 * singles, "one-at-a-time jobs");
        self.drain(&plain_queue, 2 * n, "plain jobs");
        println!("  steady rate on committed barrier jobs: {steady:.0} jobs/s");

        // 6b. A worker that fetches a big transaction's jobs while it stays open.
        let queue = self.faktory.unique_queue("bench-bulk-open");
        let (stop, monitor, t, rx) = self.start_worker(&queue, 8, 32);
        let ids = self.ids(n);
        let jobs: Vec<Job> = ids.iter().map(|&id| self.job(&queue, id)).collect();
        let mut early = 0;
        conn.transaction(|c| {
            c.enqueue_many_with_barrier(&self.producer, jobs)?;
            let opened = Instant::now();
            while opened.elapsed() < hold {
                if rx.recv_timeout(hold - opened.elapsed()).is_ok() {
                    early += 1;
                }
            }
            println!(
                "  after {hold:?} open: {} jobs waiting ({} parked), {} handed back",
                monitor.waiting(),
                monitor.parked(),
                monitor.snoozed() + monitor.overflowed()
            );
            Ok::<_, Error>(())
        })
        .expect("the big transaction");
        let committed_at = Instant::now();
        if early > 0 {
            self.failures.push(format!(
                "big transaction: {early} jobs ran before the COMMIT"
            ));
        }
        let mut seen = std::collections::HashSet::new();
        while seen.len() < n {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok((id, _)) => {
                    if !seen.insert(id) {
                        self.failures
                            .push(format!("big transaction: job {id} ran twice"));
                    }
                }
                Err(_) => {
                    self.failures.push(format!(
                        "big transaction: {} of {n} jobs ran after the COMMIT",
                        seen.len()
                    ));
                    break;
                }
            }
        }
        let after_commit = seen.len() as f64 / committed_at.elapsed().as_secs_f64();
        let hand_backs = monitor.snoozed() + monitor.overflowed();
        self.row(
            "6. COMMIT → all handlers done (8 handlers, no writes) vs steady rate, jobs/s",
            format!(
                "{after_commit:.0} / {steady:.0} = {:.2}",
                after_commit / steady
            ),
            "≥ 0.8",
            Some(after_commit / steady >= 0.8),
        );
        let per_job = hand_backs as f64 / n as f64;
        self.row(
            &format!("6. hand-backs per job, the transaction open {hold:?}"),
            format!(
                "{hand_backs} / {n} = {per_job:.2} (parked {}, none early, none twice)",
                monitor.parked_total()
            ),
            "≤ 1",
            Some(per_job <= 1.0),
        );

        // 6c. The same, rolled back once every job was fetched: none runs.
        let aborted_before = monitor.aborted();
        let ids = self.ids(n);
        let jobs: Vec<Job> = ids.iter().map(|&id| self.job(&queue, id)).collect();
        let rolled_back = conn.transaction(|c| {
            c.enqueue_many_with_barrier(&self.producer, jobs)?;
            let opened = Instant::now();
            while monitor.waiting() < n && opened.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
        });
        assert!(rolled_back.is_err());
        let started = Instant::now();
        while monitor.aborted() - aborted_before < n as u64
            && started.elapsed() < Duration::from_secs(60)
        {
            if let Ok((id, _)) = rx.recv_timeout(Duration::from_millis(10)) {
                self.failures
                    .push(format!("big transaction: job {id} ran after the ROLLBACK"));
            }
        }
        let aborted = monitor.aborted() - aborted_before;
        if aborted < n as u64 {
            self.failures.push(format!(
                "big transaction: {aborted} of {n} jobs aborted after the ROLLBACK"
            ));
        }
        self.row(
            "6. after a ROLLBACK of such a transaction: jobs aborted, jobs run",
            format!(
                "{aborted} aborted in {:.2} s, {} run",
                started.elapsed().as_secs_f64(),
                rx.try_iter().count()
            ),
            "all aborted, none run",
            Some(aborted == n as u64),
        );
        stop.shutdown();
        let _ = t.join();
        let left = count_rows(&mut conn, "SELECT COUNT(*) AS n FROM dtb_barriers");
        if left != 0 {
            self.failures
                .push(format!("big transactions: {left} barrier rows left"));
        }
    }

    /// Runs the `n` jobs of `queue` with a fresh worker (8 handlers, defaults); returns its
    /// rate, jobs/s.
    fn drain(&mut self, queue: &str, n: usize, what: &str) -> f64 {
        let (stop, _monitor, t, rx) = self.start_worker(queue, 8, 32);
        let started = Instant::now();
        let mut seen = std::collections::HashSet::new();
        while seen.len() < n {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok((id, _)) => {
                    if !seen.insert(id) {
                        self.failures.push(format!("{what}: job {id} ran twice"));
                    }
                }
                Err(_) => {
                    self.failures
                        .push(format!("{what}: only {} of {n} jobs ran", seen.len()));
                    break;
                }
            }
        }
        let rate = seen.len() as f64 / started.elapsed().as_secs_f64();
        stop.shutdown();
        let _ = t.join();
        rate
    }
}

/// The worker process of parts 4 and 5: reports each handler start as `RAN <id> <unix µs>`
/// and answers `WAITING` and `POOL` on stdin.
fn child_worker<C>(url: &str)
where
    C: BarrierConnection + R2D2Connection,
{
    let queue = std::env::var("DTB_BENCH_QUEUE").expect("queue");
    let faktory = std::env::var("DTB_BENCH_FAKTORY").expect("faktory");
    let max_waiting: usize = std::env::var("DTB_BENCH_WAITING")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let pool = Pool::builder()
        .max_size(16)
        .min_idle(Some(0))
        .build(ConnectionManager::<C>::new(url))
        .expect("pool");
    let (tx, rx) = unbounded::<String>();
    let mut worker = WorkerBuilder::new(pool.clone())
        .url(faktory)
        .workers(8)
        .max_waiting(max_waiting)
        .block_limit(Duration::from_secs(600))
        .register(KIND, move |job: &Job, _conn: &mut C| {
            let at = now_micros();
            let _ = tx.send(format!("RAN {} {at}", job.args()[0].as_i64().unwrap_or(-1)));
            Ok::<(), std::io::Error>(())
        })
        .connect()
        .expect("worker");
    let stop = worker.shutdown_handle();
    let monitor = worker.monitor();
    std::thread::spawn(move || {
        let out = std::io::stdout();
        for line in rx {
            let mut out = out.lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    let (qtx, qrx) = unbounded::<String>();
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                let answer = match line.as_str() {
                    "WAITING" => format!("WAITING {}", monitor.waiting()),
                    "POOL" => {
                        let s = pool.state();
                        format!(
                            "POOL {}/{}/{}",
                            s.connections,
                            s.connections - s.idle_connections,
                            pool.max_size()
                        )
                    }
                    "STOP" => {
                        stop.shutdown();
                        break;
                    }
                    _ => continue,
                };
                if qtx.send(answer).is_err() {
                    break;
                }
            }
            stop.shutdown();
        });
    }
    std::thread::spawn(move || {
        let out = std::io::stdout();
        for line in qrx {
            let mut out = out.lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    worker.run(&[queue]).expect("worker run");
}

fn exec<C: diesel::Connection>(conn: &mut C, sql: &str)
where
    SqlQuery: ExecuteDsl<C>,
{
    diesel::sql_query(sql)
        .execute(conn)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn count_rows<C: diesel::Connection>(conn: &mut C, sql: &str) -> i64
where
    SqlQuery: for<'a> LoadQuery<'a, C, Count>,
{
    diesel::sql_query(sql)
        .load::<Count>(conn)
        .ok()
        .and_then(|v| v.into_iter().next())
        .map_or(-1, |c| c.n)
}

/// The machine's busy and total CPU time since boot (`/proc/stat`, in clock ticks), where
/// there is one.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    // idle and iowait
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn max_connections<C: BarrierConnection>(conn: &mut C) -> usize
where
    SqlQuery: for<'a> LoadQuery<'a, C, Count>,
{
    let sql = if C::NAME == "postgres" {
        "SELECT current_setting('max_connections')::bigint AS n"
    } else {
        "SELECT CAST(@@max_connections AS SIGNED) AS n"
    };
    count_rows(conn, sql).max(0) as usize
}

/// Server-side sessions of the worker process, where the server can tell (PostgreSQL).
fn worker_sessions<C: BarrierConnection>(conn: &mut C, _pid: u32) -> String
where
    SqlQuery: for<'a> LoadQuery<'a, C, Count>,
{
    if C::NAME == "postgres" {
        // Sessions that are neither ours (this process) nor idle-in-transaction producers:
        // the worker's are idle or active outside any transaction.
        let n = count_rows(
            conn,
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE datname = current_database() \
             AND backend_type = 'client backend' AND state = 'idle' AND xact_start IS NULL",
        );
        format!("{n} idle sessions outside transactions")
    } else {
        "n/a".into()
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn signed_micros(a: Instant, b: Instant) -> i64 {
    if a >= b {
        (a - b).as_micros() as i64
    } else {
        -((b - a).as_micros() as i64)
    }
}

/// (p50, p99) in microseconds.
fn percentiles(v: &mut [i64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_unstable();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] as f64;
    (at(0.5), at(0.99))
}
