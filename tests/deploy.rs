//! The deployed worker, `examples/rocket_worker.rs`, as a process of its own: real signals
//! (SIGTERM while a handler runs, while jobs wait on an open transaction, twice; SIGTSTP), its
//! exit status and how long it takes to exit, and its HTTP endpoints (`/metrics` scraped
//! after a known workload, `/livez`, `/readyz`).
//!
//! The worker process is this test binary run again with only its `worker_process` test
//! (`#[ignore]`d, so that a normal run skips it), which runs the example's `WorkerProcess`
//! with the tests' handlers. It is configured through the example's environment variables and
//! talks to the test over its stdin and stdout:
//!
//! * it prints `HTTP <addr>` once it serves HTTP, `STARTED <id>` when a `held` job's handler
//!   starts, and `STOPPED <reason>` when the worker stopped;
//! * it answers `STATE` with `STATE <waiting> <running> <quiet> <connected> <processed>`, and
//!   `RELEASE <id>` lets the `held` handler of order `<id>` finish.
//!
//! PostgreSQL (`PG_DATABASE_URL`) and Faktory (`FAKTORY_URL`, else the in-process test server).
//! The TERM-to-exit times are printed (`cargo test --all-features --test deploy -- --nocapture`).
#![cfg(all(feature = "postgres", feature = "metrics", feature = "testing"))]

#[path = "../examples/rocket_worker.rs"]
#[allow(dead_code)]
mod example;

mod common;

use common::child::ChildTest;
use common::pg::Pg;
use common::*;
use crossbeam_channel::unbounded;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel_transaction_barrier::metrics::*;
use diesel_transaction_barrier::testing::{JobEventKind, TestFaktory, TestServer};
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Handlers, Job};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitStatus;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Set in the worker process's environment.
const CHILD: &str = "DTB_DEPLOY_CHILD";
/// The kind whose handler waits for the test's `RELEASE <id>` before it records its run.
const HELD: &str = "held";

// ---------------------------------------------------------------------------------------------
// The worker process.

/// Orders whose `held` handler may finish.
static RELEASED: (Mutex<Vec<i64>>, Condvar) = (Mutex::new(Vec::new()), Condvar::new());

fn wait_for_release(id: i64) {
    let (released, changed) = &RELEASED;
    let mut released = released.lock().unwrap();
    while !released.contains(&id) {
        released = changed.wait(released).unwrap();
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The worker process: the example's `WorkerProcess` with the tests' handlers.
#[test]
#[ignore = "the worker process of the tests of this file; does nothing on its own"]
fn worker_process() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    init_tracing();
    let settings = example::Settings::from_env().expect("settings");
    let (tx, _rx) = unbounded();
    let handlers: Handlers<PgConnection> = handlers::<Pg>(&tx).register_without_barrier(
        HELD,
        |job: &Job, conn: &mut PgConnection| -> Result<(), std::io::Error> {
            let id = job.args()[0].as_i64().expect("order id");
            say(&format!("STARTED {id}"));
            wait_for_release(id);
            insert_run::<Pg>(conn, job, id, None);
            Ok(())
        },
    );
    let process =
        example::WorkerProcess::start(&settings, handlers, |_| Ok(())).expect("worker process");
    let monitor = process.monitor();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if line == "STATE" {
                say(&format!(
                    "STATE {} {} {} {} {}",
                    monitor.waiting(),
                    monitor.running(),
                    u8::from(monitor.is_quiet()),
                    u8::from(monitor.is_connected()),
                    monitor.processed()
                ));
            } else if let Some(id) = line.strip_prefix("RELEASE ") {
                let (released, changed) = &RELEASED;
                released.lock().unwrap().push(id.parse().expect("order id"));
                changed.notify_all();
            }
        }
    });
    say(&format!("HTTP {}", process.http_addr()));
    let reason = process.run().expect("the worker runs");
    say(&format!("STOPPED {reason:?}"));
}

// ---------------------------------------------------------------------------------------------
// The tests' side.

/// What the worker process answers to `STATE`.
#[derive(Debug, Default, Clone, Copy)]
struct State {
    waiting: usize,
    running: usize,
    quiet: bool,
    connected: bool,
    processed: u64,
}

/// A worker process on the environment's queue.
struct WorkerChild {
    child: ChildTest,
    http: SocketAddr,
}

impl WorkerChild {
    /// Starts it with `workers` handlers, `max_waiting` and `shutdown_timeout`, and waits until
    /// `/readyz` says it is ready (its signal handlers are then installed).
    fn start(
        env: &Env<Pg>,
        workers: usize,
        max_waiting: usize,
        shutdown_timeout: Duration,
    ) -> WorkerChild {
        let child = ChildTest::start(
            "worker_process",
            &[
                (CHILD, "1".to_string()),
                ("DATABASE_URL", env.db.url()),
                ("FAKTORY_URL", env.faktory.url()),
                ("DTB_QUEUES", env.queue.clone()),
                ("DTB_WORKERS", workers.to_string()),
                ("DTB_MAX_WAITING", max_waiting.to_string()),
                (
                    "DTB_SHUTDOWN_TIMEOUT",
                    shutdown_timeout.as_secs_f64().to_string(),
                ),
                ("DTB_HTTP_ADDR", "127.0.0.1:0".to_string()),
            ],
        );
        let http = child
            .next_after("HTTP ", EVENTUALLY)
            .expect("the worker process serves HTTP")
            .trim()
            .parse()
            .expect("its address");
        let child = WorkerChild { child, http };
        poll_until(
            "the worker process to be ready",
            EVENTUALLY,
            Duration::from_millis(20),
            || child.get("/readyz").0 == 200,
        );
        child
    }

    /// `GET path`: the status code and the body.
    fn get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.http).expect("connect to the worker's HTTP");
        stream
            .set_read_timeout(Some(EVENTUALLY))
            .expect("read timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.http
        )
        .expect("send the request");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("read the response");
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, body.to_string())
    }

    fn state(&mut self) -> State {
        self.child.send("STATE").expect("ask for the state");
        let line = self
            .child
            .next_after("STATE ", EVENTUALLY)
            .expect("the worker process's state");
        let n: Vec<u64> = line
            .split_whitespace()
            .map(|n| n.parse().expect("a number"))
            .collect();
        State {
            waiting: n[0] as usize,
            running: n[1] as usize,
            quiet: n[2] == 1,
            connected: n[3] == 1,
            processed: n[4],
        }
    }

    fn wait_for_state(&mut self, what: &str, cond: impl Fn(State) -> bool) -> State {
        let start = Instant::now();
        loop {
            let state = self.state();
            if cond(state) {
                return state;
            }
            assert!(
                start.elapsed() < EVENTUALLY,
                "timed out waiting for {what}: {state:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the `held` handler of order `id` runs.
    fn wait_started(&self, id: i64) {
        let line = self
            .child
            .next_after("STARTED ", EVENTUALLY)
            .expect("the held handler to start");
        assert_eq!(line.trim(), id.to_string());
    }

    fn release(&mut self, id: i64) {
        self.child
            .send(&format!("RELEASE {id}"))
            .expect("release the handler");
    }

    fn signal(&self, name: &str) {
        self.child.signal(name);
    }

    /// Waits for the process to exit, at most `timeout`.
    fn exit_within(&mut self, timeout: Duration) -> ExitStatus {
        self.child
            .wait_within(timeout)
            .unwrap_or_else(|| panic!("the worker process still runs after {timeout:?}"))
    }

    /// Whether the process still runs.
    fn runs(&mut self) -> bool {
        self.child.wait_within(Duration::ZERO).is_none()
    }

    /// Why the worker stopped, as it printed it.
    fn stop_reason(&self) -> String {
        self.child
            .next_after("STOPPED ", EVENTUALLY)
            .expect("the worker's stop reason")
            .trim()
            .to_string()
    }
}

/// The size of the environment's queue, as Faktory's `INFO` gives it.
fn queue_size(env: &Env<Pg>) -> usize {
    // A multi-threaded runtime: the client says END when dropped, through `block_in_place`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let info = runtime.block_on(async {
        let mut client = faktory::Client::connect_to(&env.faktory.url())
            .await
            .expect("connect to faktory");
        client.current_info().await.expect("INFO")
    });
    info.data.queues.get(&env.queue).copied().unwrap_or(0) as usize
}

fn graceful(signal: &str) -> String {
    format!("Signal {{ signal: {signal}, immediate: false }}")
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// With the in-process server: job `jid` was acknowledged once and never failed.
fn expect_acked_once(env: &Env<Pg>, jid: &str) {
    if let Some(server) = env
        .faktory
        .server_or_skip("the job's history: acknowledged once, never failed")
    {
        let events = server.history(jid);
        let acks = events
            .iter()
            .filter(|e| e.kind() == JobEventKind::Acked)
            .count();
        assert_eq!(acks, 1, "job {jid}: {events:?}");
        expect_acked_without_failure(env, jid);
    }
}

// ---------------------------------------------------------------------------------------------
// Signals.

/// SIGTERM while a handler runs: the worker takes no new job, the handler finishes (its run is
/// recorded once, its job acknowledged once), and the process exits 0 within the shutdown
/// timeout, saying that SIGTERM stopped it. Prints the time from SIGTERM to exit.
#[test]
fn term_lets_the_running_handler_finish_then_exits_0() {
    let env = Env::<Pg>::new();
    let timeout = Duration::from_secs(10);
    let mut child = WorkerChild::start(&env, 2, 8, timeout);
    let id = next_id();
    let job = env.job(HELD, id);
    let jid = job.id().to_string();
    env.producer.push(job).expect("push");
    child.wait_started(id);

    let term = Instant::now();
    child.signal("TERM");
    child.wait_for_state("the worker to stop taking jobs", |s| s.quiet);
    assert!(child.runs(), "the handler still runs: the process waits");
    let released = Instant::now();
    child.release(id);
    let status = child.exit_within(timeout);
    let exited = Instant::now();
    assert!(status.success(), "{status}");
    assert!(
        exited - term < timeout,
        "exited within the shutdown timeout"
    );
    assert_eq!(child.stop_reason(), graceful("Term"));
    eprintln!(
        "measured: SIGTERM -> exit with a handler running: {} (the handler released {} after \
         SIGTERM; release -> exit {})",
        ms(exited - term),
        ms(released - term),
        ms(exited - released)
    );

    assert_eq!(runs_of(&env.db, id), 1, "the handler ran once, to the end");
    expect_acked_once(&env, &jid);
}

/// SIGTERM while 100 jobs wait on an open transaction: the process exits 0 at once, every job
/// went back to Faktory (pushed again, the delivery acknowledged) and none ran. Once the
/// transaction commits, a new worker runs each exactly once, and each sees the commit. Prints
/// the time from SIGTERM to exit.
#[test]
fn term_hands_waiting_jobs_back_at_once_and_none_is_lost() {
    const JOBS: usize = 100;
    let env = Env::<Pg>::new();
    let mut child = WorkerChild::start(&env, 2, JOBS, Duration::from_secs(10));
    let ids: Vec<i64> = (0..JOBS).map(|_| next_id()).collect();
    let mut conn = env.db.connect();
    let mut jids = Vec::new();
    let took = conn
        .transaction(|c| {
            for &id in &ids {
                insert_order::<Pg>(c, id, "new");
                jids.push(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
            }
            child.wait_for_state("every job to wait", |s| s.waiting == JOBS);
            let term = Instant::now();
            child.signal("TERM");
            let status = child.exit_within(Duration::from_secs(10));
            let took = term.elapsed();
            assert!(status.success(), "{status}");
            for &id in &ids {
                set_status::<Pg>(c, id, "paid");
            }
            Ok::<_, Error>(took)
        })
        .expect("commit");
    assert_eq!(child.stop_reason(), graceful("Term"));
    eprintln!(
        "measured: SIGTERM -> exit with {JOBS} jobs waiting: {}",
        ms(took)
    );
    for &id in &ids {
        assert_eq!(
            runs_of(&env.db, id),
            0,
            "no job ran while its transaction was open"
        );
    }
    if let Some(server) = env
        .faktory
        .server_or_skip("the jobs handed back: acknowledged, their copies in Faktory")
    {
        let copies = server
            .scheduled_jobs()
            .into_iter()
            .chain(server.jobs_in_queue(&env.queue))
            .filter(|j| j["queue"] == env.queue.as_str())
            .count();
        assert_eq!(copies, JOBS, "every job is back in Faktory");
        for jid in &jids {
            expect_acked_once(&env, jid.as_ref());
        }
    }

    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<Pg>(&tx), 4);
    let mut ran = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while ran.len() < JOBS {
        let run = rx
            .recv_deadline(deadline)
            .unwrap_or_else(|_| panic!("only {} of {JOBS} jobs ran", ran.len()));
        assert_eq!(run.seen_status.as_deref(), Some("paid"), "{run:?}");
        ran.push(run.order_id);
    }
    let distinct: HashSet<i64> = ran.iter().copied().collect();
    assert_eq!(distinct, ids.iter().copied().collect(), "each job ran");
    expect_no_run(&rx, "each job ran once");
    // The handlers report before their transactions commit.
    wait_until("every run to commit", EVENTUALLY, || {
        ids.iter().all(|&id| runs_of(&env.db, id) == 1)
    });
    wait_until("no barrier left", EVENTUALLY, || env.db.barrier_rows() == 0);
}

/// A second SIGTERM during the drain stops the worker at once, though its handler still runs
/// and the shutdown timeout is long: the process exits 0, saying so, the handler's writes are
/// not committed, and the job is failed back to Faktory, which retries it.
#[test]
fn second_term_stops_at_once() {
    // The test server retries the failed job after 3 s, longer than the `FETCH`es the worker
    // left blocked on the server may last (2 s): one of them could otherwise take the retry
    // for a connection that has since closed, which would keep it reserved.
    let faktory = TestFaktory::from_env_or_start_with(
        TestServer::builder().retry_delay(Duration::from_secs(3)),
    )
    .expect("faktory");
    let env = Env::<Pg>::with_db_and_faktory(Pg::create(), faktory);
    let timeout = Duration::from_secs(60);
    let mut child = WorkerChild::start(&env, 2, 8, timeout);
    let id = next_id();
    let job = env.job(HELD, id);
    let jid = job.id().to_string();
    env.producer.push(job).expect("push");
    child.wait_started(id);

    child.signal("TERM");
    child.wait_for_state("the worker to stop taking jobs", |s| s.quiet);
    assert!(child.runs(), "the first SIGTERM waits for the handler");
    let second = Instant::now();
    child.signal("TERM");
    // Not the 5 s a runtime's shutdown would give the handler's thread.
    let status = child.exit_within(Duration::from_secs(2));
    let took = second.elapsed();
    assert!(status.success(), "{status}");
    assert_eq!(
        child.stop_reason(),
        "Signal { signal: Term, immediate: true }"
    );
    eprintln!(
        "measured: second SIGTERM -> exit with a handler running: {}",
        ms(took)
    );
    assert_eq!(runs_of(&env.db, id), 0, "the handler never finished");

    if let Some(server) = env
        .faktory
        .server_or_skip("the cut job failed back to Faktory, and run again")
    {
        assert!(
            server.wait_until_history(&jid, JobEventKind::Failed, EVENTUALLY),
            "{:?}",
            server.history(&jid)
        );
        // The retry, on a worker whose `held` kind records at once.
        let (tx, rx) = unbounded();
        let handlers =
            handlers::<Pg>(&tx).register_without_barrier(HELD, recording_handler::<Pg>(tx.clone()));
        let _worker = env.start_worker(handlers, 1);
        expect_each_ran_once(&rx, &[id], EVENTUALLY);
        // The handler reports before its transaction commits.
        wait_until("the run to commit", EVENTUALLY, || {
            runs_of(&env.db, id) == 1
        });
    }
}

/// SIGTERM while a handler runs past the shutdown timeout: the process exits 0 right after the
/// timeout, the handler's writes are not committed, and its job is failed back to Faktory.
#[test]
fn term_gives_up_on_a_handler_after_the_shutdown_timeout() {
    let env = Env::<Pg>::new();
    let timeout = Duration::from_secs(1);
    let mut child = WorkerChild::start(&env, 2, 8, timeout);
    let id = next_id();
    let job = env.job(HELD, id);
    let jid = job.id().to_string();
    env.producer.push(job).expect("push");
    child.wait_started(id);

    let term = Instant::now();
    child.signal("TERM");
    // Not the 5 s more a runtime's shutdown would give the handler's thread.
    let status = child.exit_within(timeout + Duration::from_secs(2));
    let took = term.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= timeout,
        "the handler had the whole timeout: {took:?}"
    );
    assert_eq!(child.stop_reason(), graceful("Term"));
    eprintln!(
        "measured: SIGTERM -> exit with a handler running past a {} shutdown timeout: {}",
        ms(timeout),
        ms(took)
    );
    assert_eq!(runs_of(&env.db, id), 0, "the handler never finished");
    if let Some(server) = env
        .faktory
        .server_or_skip("the unfinished job failed back to Faktory")
    {
        assert!(
            server.wait_until_history(&jid, JobEventKind::Failed, EVENTUALLY),
            "{:?}",
            server.history(&jid)
        );
    }
}

/// SIGTSTP quiets the worker: it reports itself quiet and not ready, runs none of the jobs
/// pushed afterwards (it fetches at most one per idle fetch slot, and holds it without handing
/// it back), lets its running handler finish, then hands back what it holds, closes its Faktory
/// connections and keeps running until SIGTERM, on which it exits 0 at once. The jobs it did
/// not run run exactly once on a new worker.
#[test]
fn tstp_quiets_the_worker() {
    const LATER: usize = 20;
    let (workers, max_waiting) = (2, 8);
    let env = Env::<Pg>::new();
    let mut child = WorkerChild::start(&env, workers, max_waiting, Duration::from_secs(10));
    let running = next_id();
    let job = env.job(HELD, running);
    let running_jid = job.id().to_string();
    env.producer.push(job).expect("push");
    child.wait_started(running);

    child.signal("TSTP");
    child.wait_for_state("the worker to be quiet", |s| s.quiet);
    let (status, body) = child.get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("quiet"), "{body}");
    let later: Vec<i64> = (0..LATER).map(|_| next_id()).collect();
    let mut later_jids = Vec::new();
    for &id in &later {
        let job = env.job(PLAIN_OK, id);
        later_jids.push(job.id().to_string());
        env.producer.push(job).expect("push");
    }
    // Something that must not happen: the jobs pushed after SIGTSTP do not run.
    std::thread::sleep(NOT_YET);
    for &id in &later {
        assert_eq!(runs_of(&env.db, id), 0, "a quiet worker runs no new job");
    }
    let idle_slots = workers + max_waiting - 1;
    assert_eq!(
        queue_size(&env),
        LATER - idle_slots,
        "one job fetched per idle fetch slot, no more"
    );
    if let Some(server) = env
        .faktory
        .server_or_skip("what a quiet worker fetched: held, not handed back")
    {
        let scheduled = server.scheduled_jobs();
        let copies = scheduled
            .iter()
            .filter(|j| j["queue"] == env.queue.as_str());
        assert_eq!(
            copies.count(),
            0,
            "nothing handed back while the handler runs"
        );
    }

    child.release(running);
    wait_until("the running handler to finish", EVENTUALLY, || {
        runs_of(&env.db, running) == 1
    });
    let state = child.wait_for_state("the quiet worker to disconnect", |s| {
        !s.connected && s.running == 0
    });
    assert!(child.runs(), "quiet is not a stop: {state:?}");
    for &id in &later {
        assert_eq!(runs_of(&env.db, id), 0, "a quiet worker runs no new job");
    }
    assert_eq!(child.get("/livez").0, 200, "a quiet worker is alive");

    let term = Instant::now();
    child.signal("TERM");
    let status = child.exit_within(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert_eq!(child.stop_reason(), graceful("Term"));
    eprintln!(
        "measured: SIGTERM -> exit of a quiet worker: {}",
        ms(term.elapsed())
    );
    expect_acked_once(&env, &running_jid);
    if let Some(server) = env.faktory.server_or_skip("every job back in Faktory") {
        let copies = server
            .scheduled_jobs()
            .into_iter()
            .chain(server.jobs_in_queue(&env.queue))
            .filter(|j| j["queue"] == env.queue.as_str())
            .count();
        assert_eq!(copies, LATER);
    }

    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<Pg>(&tx), 2);
    expect_each_ran_once(&rx, &later, Duration::from_secs(30));
    expect_no_run(&rx, "each job ran once");
    // The handlers report before their transactions commit.
    wait_until("every run to commit", EVENTUALLY, || {
        later.iter().all(|&id| runs_of(&env.db, id) == 1)
    });
    assert_eq!(
        runs_of(&env.db, running),
        1,
        "the finished job did not run again"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// The names of the README's metrics table.
fn readme_metric_names() -> Vec<String> {
    let readme = include_str!("../README.md");
    let section = readme
        .split("\n## Metrics")
        .nth(1)
        .expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let names: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `dtb_"))
        .map(|l| format!("dtb_{}", l.split('`').next().unwrap()))
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    names
}

/// A scrape: each series (name and labels, as rendered) and its value.
fn parse_scrape(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            (series.to_string(), value.parse().unwrap_or(f64::NAN))
        })
        .collect()
}

/// The worker's `/metrics` after a known workload — a job that waits while its transaction
/// stays open and then commits, one whose transaction rolls back, one that commits at once —
/// has every series of the README's Metrics section, with the values that workload gives.
/// `/livez` and `/readyz` answer 200.
#[test]
fn metrics_endpoint_serves_the_readme_series() {
    let env = Env::<Pg>::new();
    let mut child = WorkerChild::start(&env, 1, 8, Duration::from_secs(10));
    assert_eq!(child.get("/livez").0, 200);
    let (status, body) = child.get("/readyz");
    assert_eq!((status, body.trim()), (200, "ready"));
    let scrape = |child: &WorkerChild| {
        let (status, body) = child.get("/metrics");
        assert_eq!(status, 200, "{body}");
        parse_scrape(&body)
    };
    let wait_for_series = |child: &WorkerChild, series: &str, value: f64| {
        poll_until(
            &format!("{series} = {value}"),
            EVENTUALLY,
            Duration::from_millis(20),
            || scrape(child).get(series) == Some(&value),
        )
    };

    // 1. A transaction that stays open while its job waits, then commits.
    let mut conn = env.db.connect();
    let held = conn
        .transaction(|c| {
            let id = next_id();
            insert_order::<Pg>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
            child.wait_for_state("the job to wait", |s| s.waiting == 1);
            let seen = Instant::now();
            wait_for_series(&child, JOBS_WAITING, 1.0);
            Ok::<_, Error>(seen.elapsed())
        })
        .expect("commit");
    wait_for_series(&child, JOBS_RAN, 1.0);
    // 2. A rolled-back transaction: aborted.
    let rolled_back = conn.transaction(|c| {
        c.enqueue_with_barrier(&env.producer, env.job(PAID, next_id()))?;
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(rolled_back.is_err());
    wait_for_series(&child, JOBS_ABORTED, 1.0);
    // 3. A transaction that commits at once.
    conn.transaction(|c| c.enqueue_with_barrier(&env.producer, env.job(PAID, next_id())))
        .expect("commit");
    wait_for_series(&child, JOBS_RAN, 2.0);
    child.wait_for_state("every delivery processed", |s| s.processed == 3);

    let metrics = scrape(&child);
    let shown: Vec<&String> = metrics.keys().collect();
    for name in readme_metric_names() {
        let found = metrics.keys().any(|series| {
            series == &name
                || series.starts_with(&format!("{name}{{"))
                || series.starts_with(&format!("{name}_bucket{{"))
        });
        assert!(found, "{name} is not served: {shown:#?}");
    }
    let expected = [
        (JOBS_PROCESSED, 3.0),
        (JOBS_RAN, 2.0),
        (JOBS_ABORTED, 1.0),
        (JOBS_DUPLICATE, 0.0),
        (JOBS_SNOOZED, 0.0),
        (JOBS_OVERFLOWED, 0.0),
        (JOBS_TIMED_OUT, 0.0),
        (JOBS_FAILED, 0.0),
        (JOBS_WAITING, 0.0),
        (HANDLERS_RUNNING, 0.0),
        (BARRIERS_REAPED, 0.0),
        (JOBS_REPUSHED, 0.0),
    ];
    for (name, value) in expected {
        assert_eq!(metrics.get(name), Some(&value), "{name}: {metrics:#?}");
    }
    let wait = |verdict: &str, part: &str| {
        metrics
            .get(&format!(
                "{BARRIER_WAIT_SECONDS}_{part}{{{VERDICT_LABEL}=\"{verdict}\"}}"
            ))
            .copied()
    };
    assert_eq!(wait("committed", "count"), Some(2.0), "{metrics:#?}");
    assert_eq!(wait("not_committed", "count"), Some(1.0), "{metrics:#?}");
    let committed_sum = wait("committed", "sum").expect("the waits' sum");
    assert!(
        committed_sum >= held.as_secs_f64(),
        "the first job waited while its transaction was open: {committed_sum} < {held:?}"
    );
    let inf = metrics
        .get(&format!(
            "{BARRIER_WAIT_SECONDS}_bucket{{{VERDICT_LABEL}=\"committed\",le=\"+Inf\"}}"
        ))
        .copied();
    assert_eq!(inf, Some(2.0), "a Prometheus histogram: {metrics:#?}");

    child.signal("TERM");
    let status = child.exit_within(Duration::from_secs(10));
    assert!(status.success(), "{status}");
}
