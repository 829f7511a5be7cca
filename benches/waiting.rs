//! What a worker whose jobs wait for open transactions costs the database, and how soon it
//! starts a job once its transaction ends: prints a table of figures, each with its goal.
//!
//! ```text
//! DATABASE_URL=mysql://root@127.0.0.1:3306/test \
//!     cargo bench --bench waiting --features mysql,testing            # MariaDB
//! cargo bench --bench waiting --features testing                      # PostgreSQL
//! ```
//!
//! The worker reaches the database through a loopback proxy that counts what the worker
//! sends: a *request* is a command that the server answers (MySQL: a command packet; PostgreSQL:
//! a simple query, or an extended-protocol batch ended by `Sync`), so a prepared statement that
//! is parsed and run costs one, a `sql_query` on MySQL (prepared, run, closed) costs two. The
//! producers talk to the database directly. `FAKTORY_URL` names a Faktory server (else an
//! in-process test server is started); `BENCH_ONLY` picks parts (`requests`, `latency`,
//! `fleet`); `WINDOW_SECS` sets how long each request count lasts (default 5).
//!
//! 1. requests/s of one worker while nothing waits, and while 1, 20 or 200 jobs wait in one
//!    transaction, and 20 jobs in 20 transactions;
//! 2. commit → handler start for transactions that commit 1 ms, 100 ms and 10 s after their
//!    push, and rollback → job acknowledged as aborted;
//! 3. four worker processes, 20 transactions waiting: requests/s in all, against one worker.
//!
//! The benchmark exits non-zero only on a correctness failure (a job lost or run early), never
//! because a figure missed its goal.

use crossbeam_channel::{unbounded, Receiver, Sender};
use diesel::query_builder::SqlQuery;
use diesel::query_dsl::methods::ExecuteDsl;
use diesel::r2d2::{ConnectionManager, Pool, R2D2Connection};
use diesel_transaction_barrier::testing::TestFaktory;
use diesel_transaction_barrier::{
    BarrierConnection, EnqueueWithBarrier, Error, Job, Producer, WorkerBuilder, WorkerMonitor,
};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIND: &str = "waiting_probe";

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
        return dispatch::<diesel::pg::PgConnection>(&url, Protocol::Postgres);
    }
    if url.starts_with("mysql") {
        #[cfg(feature = "mysql")]
        return dispatch::<diesel::mysql::MysqlConnection>(&url, Protocol::Mysql);
    }
    eprintln!("DATABASE_URL {url:?} needs a backend feature this benchmark was not built with");
    std::process::exit(2);
}

#[allow(dead_code)]
fn dispatch<C>(url: &str, protocol: Protocol)
where
    C: BarrierConnection + R2D2Connection,
    SqlQuery: ExecuteDsl<C>,
{
    if std::env::var("DTB_BENCH_ROLE").as_deref() == Ok("worker") {
        return child_worker::<C>();
    }
    Bench::<C>::new(url, protocol).run();
}

// ---------------------------------------------------------------------------------------------
// The counting proxy.

/// The wire protocol the proxy reads, to count requests.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    Mysql,
    Postgres,
}

/// What the proxy counted.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// A loopback proxy in front of the database that counts the requests clients send.
struct CountingProxy {
    port: u16,
    counts: Arc<Counts>,
}

impl CountingProxy {
    fn start(target: String, protocol: Protocol) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Counts::default());
        let c = Arc::clone(&counts);
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let counts = Arc::clone(&c);
                std::thread::spawn(move || count_requests(client, server, protocol, &counts));
                std::thread::spawn(move || copy(server2, client2));
            }
        });
        CountingProxy { port, counts }
    }

    /// Requests and bytes counted so far.
    fn read(&self) -> (u64, u64) {
        (
            self.counts.requests.load(Ordering::SeqCst),
            self.counts.bytes.load(Ordering::SeqCst),
        )
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Forwards what a client sends, counting its requests.
fn count_requests(mut from: TcpStream, mut to: TcpStream, protocol: Protocol, counts: &Counts) {
    let mut buf = [0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    // PostgreSQL's first message (startup, or a TLS request) has no type byte.
    let mut started = matches!(protocol, Protocol::Mysql);
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
        counts.bytes.fetch_add(n as u64, Ordering::SeqCst);
        pending.extend_from_slice(&buf[..n]);
        loop {
            let consumed = match protocol {
                // A packet: 3-byte length, sequence number, payload. A command is a packet
                // with sequence number 0.
                Protocol::Mysql => {
                    if pending.len() < 4 {
                        break;
                    }
                    let len = u32::from_le_bytes([pending[0], pending[1], pending[2], 0]) as usize;
                    if pending.len() < 4 + len {
                        break;
                    }
                    if pending[3] == 0 {
                        counts.requests.fetch_add(1, Ordering::SeqCst);
                    }
                    4 + len
                }
                // A message: type byte, 4-byte length (itself included), body; the startup
                // message: length, body. A simple query ('Q') or a Sync ('S') asks for an answer.
                Protocol::Postgres => {
                    let header = if started { 5 } else { 4 };
                    if pending.len() < header {
                        break;
                    }
                    let at = header - 4;
                    let len = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap()) as usize;
                    if pending.len() < at + len {
                        break;
                    }
                    if started && matches!(pending[0], b'Q' | b'S') {
                        counts.requests.fetch_add(1, Ordering::SeqCst);
                    }
                    started = true;
                    at + len
                }
            };
            pending.drain(..consumed);
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// The database URL through the proxy on `port`: the same database, user and password.
fn through_proxy(url: &str, port: u16, protocol: Protocol) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    let mut proxied = format!("{scheme}://{auth}127.0.0.1:{port}{path}");
    if matches!(protocol, Protocol::Postgres) {
        // The proxy reads the protocol: no TLS on this leg.
        proxied.push(if proxied.contains('?') { '&' } else { '?' });
        proxied.push_str("sslmode=disable");
    }
    proxied
}

/// `host:port` of a database URL.
fn target_of(url: &str, protocol: Protocol) -> String {
    let rest = url.split_once("://").expect("a URL").1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("127.0.0.1");
    if host.contains(':') {
        host.to_string()
    } else {
        let port = match protocol {
            Protocol::Mysql => 3306,
            Protocol::Postgres => 5432,
        };
        format!("{host}:{port}")
    }
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

struct Bench<C: BarrierConnection> {
    url: String,
    protocol: Protocol,
    faktory: TestFaktory,
    producer: Producer,
    window: Duration,
    rows: Vec<String>,
    next_id: i64,
    _conn: std::marker::PhantomData<C>,
}

impl<C> Bench<C>
where
    C: BarrierConnection + R2D2Connection,
    SqlQuery: ExecuteDsl<C>,
{
    fn new(url: &str, protocol: Protocol) -> Self {
        let faktory = TestFaktory::from_env_or_start().expect("faktory");
        let producer = Producer::connect(&faktory.url()).expect("producer");
        let mut conn = C::establish(url).expect("database");
        diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        let window = Duration::from_secs(
            std::env::var("WINDOW_SECS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(5),
        );
        println!(
            "database: {url}\nfaktory:  {}\nbackend:  {}",
            faktory.url(),
            C::backend_name()
        );
        Bench {
            url: url.to_string(),
            protocol,
            faktory,
            producer,
            window,
            rows: Vec::new(),
            // Below 2^53: the genuine Faktory server reads numbers as doubles.
            next_id: (uuid::Uuid::new_v4().as_u128() as i64 & 0x7_ffff) << 32,
            _conn: std::marker::PhantomData,
        }
    }

    fn row(&mut self, what: &str, figure: String, goal: &str) {
        let line = format!("| {what} | {figure} | {goal} |");
        println!("{line}");
        self.rows.push(line);
    }

    fn run(mut self) {
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let part = |p: &str| only.is_empty() || only.split(',').any(|o| o == p);
        println!("\n| what | measured | goal |\n| --- | --- | --- |");
        if part("requests") {
            self.requests();
        }
        if part("latency") {
            self.latency();
        }
        if part("fleet") {
            self.fleet();
        }
    }

    /// A worker on `queue` whose pool goes through a counting proxy.
    fn worker(&self, queue: &str) -> (RunningWorker, CountingProxy, Receiver<(i64, Instant)>) {
        let proxy = CountingProxy::start(target_of(&self.url, self.protocol), self.protocol);
        let proxied = through_proxy(&self.url, proxy.port, self.protocol);
        let (tx, rx) = unbounded();
        let worker = start_worker::<C>(&proxied, &self.faktory.url(), queue, tx);
        (worker, proxy, rx)
    }

    fn ids(&mut self, n: usize) -> Vec<i64> {
        let first = self.next_id;
        self.next_id += n as i64;
        (first..first + n as i64).collect()
    }

    /// Part 1: requests/s while jobs wait.
    fn requests(&mut self) {
        let queue = self.faktory.unique_queue("waiting");
        let (worker, proxy, rx) = self.worker(&queue);
        // Idle: nothing waits.
        std::thread::sleep(Duration::from_millis(500));
        let (idle, _) = count_over(&proxy, self.window);
        self.row("requests/s, nothing waiting", format!("{idle:.1}"), "0");
        for (transactions, per) in [(1, 1), (1, 20), (1, 200), (20, 1)] {
            let ids = self.ids(transactions * per);
            let open = OpenTransactions::<C>::start(&self.url, &self.producer, &queue, &ids, per);
            wait_for(&worker.monitor, ids.len());
            // The registration burst, then the steady state.
            let (first, _) = count_over(&proxy, Duration::from_secs(1));
            let (steady, bytes) = count_over(&proxy, self.window);
            open.commit();
            receive(&rx, &ids);
            self.row(
                &format!(
                    "requests/s, {} job(s) waiting in {transactions} transaction(s)",
                    ids.len()
                ),
                format!(
                    "{steady:.1} ({:.1} KB/s; {first:.0} in the first second)",
                    bytes / 1000.0
                ),
                "≤ 20",
            );
        }
        drop(worker);
    }

    /// Part 2: commit → handler start, and rollback → aborted.
    fn latency(&mut self) {
        let queue = self.faktory.unique_queue("waiting");
        let (worker, _proxy, rx) = self.worker(&queue);
        let mut conn = C::establish(&self.url).expect("database");
        for (after, samples) in [
            (Duration::from_millis(1), 300),
            (Duration::from_millis(100), 50),
        ] {
            let mut micros = Vec::with_capacity(samples);
            for id in self.ids(samples) {
                let committed = self.commit_after(&mut conn, &queue, id, after, true);
                let (ran, started) = rx
                    .recv_timeout(Duration::from_secs(30))
                    .expect("handler ran");
                assert_eq!(ran, id, "the job of this transaction ran");
                micros.push(signed_micros(started, committed));
            }
            let (p50, p99) = percentiles(&mut micros);
            self.row(
                &format!("commit → handler start, commit {after:?} after the push"),
                format!("p50 {p50:.2} ms, p99 {p99:.2} ms ({samples} jobs)"),
                "p50 ≤ 2 ms, p99 ≤ 10 ms",
            );
        }
        // Transactions that commit 10 s after their push: four at a time, a quarter of a
        // second apart.
        let mut micros = Vec::new();
        for _ in 0..2 {
            let ids = self.ids(4);
            let starts: Vec<Instant> = std::thread::scope(|s| {
                let handles: Vec<_> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &id)| {
                        let (url, producer, queue) = (&self.url, &self.producer, &queue);
                        s.spawn(move || {
                            let mut conn = C::establish(url).expect("database");
                            let after =
                                Duration::from_secs(10) + Duration::from_millis(250 * i as u64);
                            commit_after_on::<C>(&mut conn, producer, queue, id, after, true)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut seen = std::collections::HashMap::new();
            for _ in &ids {
                let (ran, started) = rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("handler ran");
                seen.insert(ran, started);
            }
            for (id, committed) in ids.iter().zip(starts) {
                micros.push(signed_micros(seen[id], committed));
            }
        }
        let (p50, p99) = percentiles(&mut micros);
        self.row(
            "commit → handler start, commit 10 s after the push",
            format!("p50 {p50:.2} ms, max {p99:.2} ms ({} jobs)", micros.len()),
            "p50 ≤ 2 ms, p99 ≤ 10 ms",
        );
        // Rollbacks: the time until the worker counts the job aborted.
        let mut micros = Vec::new();
        for id in self.ids(50) {
            let before = worker.monitor.aborted();
            let ended = self.commit_after(&mut conn, &queue, id, Duration::from_millis(100), false);
            let deadline = Instant::now() + Duration::from_secs(30);
            while worker.monitor.aborted() == before {
                assert!(Instant::now() < deadline, "the job was aborted");
                std::thread::sleep(Duration::from_micros(50));
            }
            micros.push(signed_micros(Instant::now(), ended));
        }
        let (p50, p99) = percentiles(&mut micros);
        self.row(
            "rollback → job aborted, rollback 100 ms after the push",
            format!("p50 {p50:.2} ms, p99 {p99:.2} ms (50 jobs)"),
            "p50 ≤ 2 ms, p99 ≤ 10 ms",
        );
        drop(worker);
    }

    /// Enqueues job `id` in a transaction that ends `after` its push; returns when the end
    /// returned.
    fn commit_after(
        &self,
        conn: &mut C,
        queue: &str,
        id: i64,
        after: Duration,
        commit: bool,
    ) -> Instant {
        commit_after_on::<C>(conn, &self.producer, queue, id, after, commit)
    }

    /// Part 3: four worker processes, 20 transactions waiting.
    fn fleet(&mut self) {
        const WORKERS: usize = 4;
        const TRANSACTIONS: usize = 20;
        let queue = self.faktory.unique_queue("fleet");
        let proxy = CountingProxy::start(target_of(&self.url, self.protocol), self.protocol);
        let proxied = through_proxy(&self.url, proxy.port, self.protocol);
        let mut children: Vec<_> = (0..WORKERS)
            .map(|_| {
                let mut child = Command::new(std::env::current_exe().unwrap())
                    .env("DTB_BENCH_ROLE", "worker")
                    .env("DTB_BENCH_DB", &proxied)
                    .env("DTB_BENCH_FAKTORY", self.faktory.url())
                    .env("DTB_BENCH_QUEUE", &queue)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("a worker process");
                let mut out = BufReader::new(child.stdout.take().unwrap());
                let mut line = String::new();
                out.read_line(&mut line).expect("the worker is ready");
                assert_eq!(line.trim(), "READY");
                (child, out)
            })
            .collect();
        let ids = self.ids(TRANSACTIONS);
        let open = OpenTransactions::<C>::start(&self.url, &self.producer, &queue, &ids, 1);
        // Every job fetched: the workers hold them all (each says how many it holds).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let held: usize = children
                .iter_mut()
                .map(|(child, out)| {
                    writeln!(child.stdin.as_mut().unwrap(), "WAITING").unwrap();
                    let mut line = String::new();
                    out.read_line(&mut line).unwrap();
                    line.trim().parse::<usize>().unwrap_or(0)
                })
                .sum();
            if held >= TRANSACTIONS {
                break;
            }
            assert!(Instant::now() < deadline, "the workers hold every job");
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = count_over(&proxy, Duration::from_secs(1));
        let (steady, bytes) = count_over(&proxy, self.window);
        open.commit();
        for (child, _) in &mut children {
            drop(child.stdin.take());
        }
        for (mut child, _) in children {
            let _ = child.wait();
        }
        self.row(
            &format!("requests/s, {WORKERS} worker processes, {TRANSACTIONS} transactions waiting"),
            format!(
                "{steady:.1} in all, {:.1} per worker ({:.1} KB/s in all)",
                steady / WORKERS as f64,
                bytes / 1000.0
            ),
            "≤ 20 per worker",
        );
    }
}

/// Enqueues job `id` in a transaction that ends `after` its push (committing or rolling back);
/// returns when the `COMMIT` (or `ROLLBACK`) returned.
fn commit_after_on<C>(
    conn: &mut C,
    producer: &Producer,
    queue: &str,
    id: i64,
    after: Duration,
    commit: bool,
) -> Instant
where
    C: BarrierConnection,
{
    let result = conn.transaction(|c| {
        c.enqueue_with_barrier(producer, Job::new(KIND, vec![id]).on_queue(queue))?;
        std::thread::sleep(after);
        if commit {
            Ok(())
        } else {
            Err(Error::Database(diesel::result::Error::RollbackTransaction))
        }
    });
    assert_eq!(result.is_ok(), commit);
    Instant::now()
}

/// Transactions kept open, each with jobs enqueued, until `commit`.
struct OpenTransactions<C> {
    commit: Vec<Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    _conn: std::marker::PhantomData<C>,
}

impl<C: BarrierConnection> OpenTransactions<C> {
    /// Opens one transaction per `per` jobs of `ids`.
    fn start(url: &str, producer: &Producer, queue: &str, ids: &[i64], per: usize) -> Self {
        let (mut commit, mut threads) = (Vec::new(), Vec::new());
        let (ready_tx, ready) = unbounded::<()>();
        for chunk in ids.chunks(per) {
            let (tx, rx) = unbounded::<()>();
            let (url, producer, queue, chunk) = (
                url.to_string(),
                producer.clone(),
                queue.to_string(),
                chunk.to_vec(),
            );
            let ready_tx = ready_tx.clone();
            threads.push(std::thread::spawn(move || {
                let mut conn = C::establish(&url).expect("database");
                conn.transaction(|c| {
                    for id in chunk {
                        c.enqueue_with_barrier(
                            &producer,
                            Job::new(KIND, vec![id]).on_queue(queue.clone()),
                        )?;
                    }
                    ready_tx.send(()).unwrap();
                    let _ = rx.recv();
                    Ok::<_, Error>(())
                })
                .expect("the transaction commits");
            }));
            commit.push(tx);
        }
        for _ in 0..commit.len() {
            ready.recv().unwrap();
        }
        OpenTransactions {
            commit,
            threads,
            _conn: std::marker::PhantomData,
        }
    }

    fn commit(self) {
        for tx in self.commit {
            let _ = tx.send(());
        }
        for t in self.threads {
            t.join().expect("a producer thread");
        }
    }
}

/// A worker running on a thread of its own, stopped on drop.
struct RunningWorker {
    monitor: WorkerMonitor,
    stop: diesel_transaction_barrier::ShutdownHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A worker with default settings (4 handlers) on `queue`, whose handlers report the job's
/// first argument and when they started.
fn start_worker<C: BarrierConnection + R2D2Connection>(
    db_url: &str,
    faktory_url: &str,
    queue: &str,
    tx: Sender<(i64, Instant)>,
) -> RunningWorker {
    let pool = Pool::builder()
        .max_size(12)
        .build(ConnectionManager::<C>::new(db_url))
        .expect("pool");
    let mut worker = WorkerBuilder::new(pool)
        .url(faktory_url)
        .max_waiting(256)
        .register(KIND, move |job: &Job, _conn: &mut C| {
            let _ = tx.send((job.args()[0].as_i64().unwrap_or(0), Instant::now()));
            Ok::<(), std::io::Error>(())
        })
        .connect()
        .expect("worker");
    let monitor = worker.monitor();
    let stop = worker.shutdown_handle();
    let queue = queue.to_string();
    let thread = std::thread::spawn(move || {
        worker.run(&[queue]).expect("worker runs");
    });
    RunningWorker {
        monitor,
        stop,
        thread: Some(thread),
    }
}

/// A worker process of part 3: runs until its stdin closes, answering `WAITING` with the
/// number of jobs it holds waiting.
fn child_worker<C: BarrierConnection + R2D2Connection>() {
    let db = std::env::var("DTB_BENCH_DB").expect("database");
    let faktory = std::env::var("DTB_BENCH_FAKTORY").expect("faktory");
    let queue = std::env::var("DTB_BENCH_QUEUE").expect("queue");
    let (tx, _rx) = unbounded();
    let worker = start_worker::<C>(&db, &faktory, &queue, tx);
    println!("READY");
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if line == "WAITING" {
            println!("{}", worker.monitor.waiting());
        }
    }
}

/// Waits until the worker holds `n` jobs waiting.
fn wait_for(monitor: &WorkerMonitor, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while monitor.waiting() < n {
        assert!(
            Instant::now() < deadline,
            "the worker holds {n} jobs waiting"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Receives a handler start for each of `ids`.
fn receive(rx: &Receiver<(i64, Instant)>, ids: &[i64]) {
    let mut left: std::collections::HashSet<i64> = ids.iter().copied().collect();
    while !left.is_empty() {
        let (id, _) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("every job ran");
        left.remove(&id);
    }
}

/// Requests/s and bytes/s the proxy counts over `window`.
fn count_over(proxy: &CountingProxy, window: Duration) -> (f64, f64) {
    let (r0, b0) = proxy.read();
    std::thread::sleep(window);
    let (r1, b1) = proxy.read();
    let secs = window.as_secs_f64();
    ((r1 - r0) as f64 / secs, (b1 - b0) as f64 / secs)
}

/// p50 and p99 of `micros`, in milliseconds.
fn percentiles(micros: &mut [i64]) -> (f64, f64) {
    micros.sort_unstable();
    let pct = |p: f64| micros[((micros.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
    (pct(0.50), pct(0.99))
}

/// `a - b` in microseconds (negative when the handler started before the end returned).
fn signed_micros(a: Instant, b: Instant) -> i64 {
    if a >= b {
        (a - b).as_micros() as i64
    } else {
        -((b - a).as_micros() as i64)
    }
}
