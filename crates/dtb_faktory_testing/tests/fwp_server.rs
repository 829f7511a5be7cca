//! End-to-end tests of the in-process Faktory server, driven by the real `faktory` client
//! and worker, and by raw TCP where the wire format itself is under test.
//!
//! Tests built on `TestFaktory::from_env_or_start()` also run against a real Faktory when
//! `FAKTORY_URL` is set (they then use unique queues and skip, with a printed note, only the
//! checks that look inside the test server). Tests of test-server-only behaviour (short
//! retry delays and reservations, passwords, BEAT instructions, FLUSH, raw protocol errors)
//! start their own `TestServer`.

use chrono::{DateTime, Utc};
use dtb_faktory_testing::{
    password_hash, JobEvent, JobEventKind, TestFaktory, TestServer, WorkerState,
};
use faktory::{Client, Job, JobId, StopReason, Worker, WorkerId};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bound for waits on things that must happen (they normally take milliseconds).
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn kinds(server: &TestServer, jid: &str) -> Vec<JobEventKind> {
    server.history(jid).iter().map(JobEvent::kind).collect()
}

fn event_time(server: &TestServer, jid: &str, kind: JobEventKind) -> DateTime<Utc> {
    server
        .history(jid)
        .iter()
        .find(|e| e.kind() == kind)
        .unwrap_or_else(|| panic!("no {kind:?} event for {jid}: {:?}", server.history(jid)))
        .at()
}

/// Runs blocking code (server waits) from inside an async test.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn connect(url: &str) -> Client {
    Client::connect_to(url).await.expect("client connects")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn job_on(kind: &str, queue: &str, args: Vec<Value>) -> Job {
    Job::builder(kind).args(args).queue(queue).build()
}

/// What a recording worker's handler does with each job.
#[derive(Clone, Copy)]
enum Outcome {
    Succeed,
    Fail,
}

type Runs = Arc<Mutex<Vec<(Job, DateTime<Utc>)>>>;

/// A worker that records every job it runs (with the time it ran) and then succeeds or
/// fails with the message "boom".
async fn recording_worker(url: &str, kind: &str, outcome: Outcome) -> (Worker<io::Error>, Runs) {
    let runs: Runs = Arc::default();
    let seen = Arc::clone(&runs);
    let worker = Worker::builder::<io::Error>()
        .register_fn(kind, move |job| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push((job, Utc::now()));
                match outcome {
                    Outcome::Succeed => Ok(()),
                    Outcome::Fail => Err(io::Error::other("boom")),
                }
            }
        })
        .connect_to(url)
        .await
        .expect("worker connects");
    (worker, runs)
}

/// Calls `run_one` until it has run a job (true) or `WAIT` has passed (false).
async fn run_until_job(worker: &mut Worker<io::Error>, queue: &str) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if worker.run_one(0, &[queue]).await.expect("run_one") {
            return true;
        }
    }
    false
}

fn snapshot(runs: &Runs) -> Vec<(Job, DateTime<Utc>)> {
    runs.lock().unwrap().clone()
}

/// The address of `faktory` for raw connections; `None`, with a printed note, when its URL
/// carries a password (raw connections do not answer the password challenge).
fn raw_addr(faktory: &TestFaktory) -> Option<SocketAddr> {
    use std::net::ToSocketAddrs;
    let url = faktory.url();
    let authority = url.split("://").nth(1).unwrap_or(&url);
    if authority.contains('@') {
        println!("note: FAKTORY_URL has a password; skipping the raw-protocol checks");
        return None;
    }
    let authority = authority.trim_end_matches('/');
    Some(
        authority
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("{authority}: {e}"))
            .next()
            .expect("an address"),
    )
}

/// A reply read off the wire.
#[derive(Debug, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Bulk(Vec<u8>),
    Null,
}

impl Resp {
    fn error(&self) -> &str {
        match self {
            Resp::Error(e) => e,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    fn bulk_json(&self) -> Value {
        match self {
            Resp::Bulk(b) => serde_json::from_slice(b).expect("bulk reply is JSON"),
            other => panic!("expected a bulk reply, got {other:?}"),
        }
    }
}

/// A raw FWP connection.
struct Raw {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    hi: Value,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            stream,
            hi: Value::Null,
        };
        match raw.read() {
            Resp::Simple(s) => {
                let json = s.strip_prefix("HI ").expect("greeting starts with HI");
                raw.hi = serde_json::from_str(json).expect("HI carries JSON");
            }
            other => panic!("expected HI, got {other:?}"),
        }
        raw
    }

    fn connect_hello(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr);
        assert_eq!(raw.call(br#"HELLO {"v":2}"#), Resp::Simple("OK".into()));
        raw
    }

    fn send(&mut self, line: &[u8]) {
        self.stream.write_all(line).unwrap();
        self.stream.write_all(b"\r\n").unwrap();
    }

    fn call(&mut self, line: &[u8]) -> Resp {
        self.send(line);
        self.read()
    }

    fn read(&mut self) -> Resp {
        self.try_read()
            .expect("read reply")
            .expect("connection closed before a reply")
    }

    /// `Ok(None)` on end of stream.
    fn try_read(&mut self) -> io::Result<Option<Resp>> {
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        assert!(
            line.ends_with(b"\r\n"),
            "reply line ends with CRLF: {line:?}"
        );
        line.truncate(line.len() - 2);
        // The real server echoes a command's bytes in its error, valid UTF-8 or not.
        let text = String::from_utf8_lossy(&line[1..]).into_owned();
        Ok(Some(match line[0] {
            b'+' => Resp::Simple(text),
            b'-' => Resp::Error(text),
            b'$' => {
                let len: i64 = text.parse().expect("bulk length");
                if len < 0 {
                    Resp::Null
                } else {
                    let mut body = vec![0; len as usize + 2];
                    self.reader.read_exact(&mut body)?;
                    assert!(body.ends_with(b"\r\n"));
                    body.truncate(len as usize);
                    Resp::Bulk(body)
                }
            }
            other => panic!("unexpected reply type {other}"),
        }))
    }
}

// ---------------------------------------------------------------------------------------
// the basic lifecycle
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_fetch_ack_records_history() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let queue = faktory.unique_queue("basic");
    assert_ne!(queue, faktory.unique_queue("basic"));

    let job = job_on("greet", &queue, vec![json!("hello"), json!({"n": 1})]);
    let jid = job.id().to_string();
    let mut client = connect(&url).await;
    client.enqueue(job).await.unwrap();

    if let Some(server) = faktory.server_or_skip("stored payload after PUSH") {
        assert_eq!(server.queue_size(&queue), 1);
        assert!(server.queue_names().contains(&queue));
        let stored = server.job(&jid).expect("job is stored");
        assert_eq!(stored["args"], json!(["hello", {"n": 1}]));
        assert_eq!(stored["queue"], json!(queue));
        assert_eq!(stored["jobtype"], json!("greet"));
        assert!(stored["enqueued_at"].is_string());
        assert!(stored["created_at"].is_string());
        assert_eq!(server.jobs_in_queue(&queue), vec![stored]);
        assert_eq!(kinds(server, &jid), [JobEventKind::Pushed]);
    }

    let (mut worker, runs) = recording_worker(&url, "greet", Outcome::Succeed).await;
    assert!(run_until_job(&mut worker, &queue).await);
    let runs = snapshot(&runs);
    assert_eq!(runs.len(), 1);
    let ran = &runs[0].0;
    assert_eq!(ran.id().as_str(), jid);
    assert_eq!(ran.args(), &[json!("hello"), json!({"n": 1})]);
    assert!(ran.enqueued_at.is_some());
    assert!(ran.failure().is_none());

    if let Some(server) = faktory.server_or_skip("history after ACK") {
        use JobEventKind::*;
        assert_eq!(kinds(server, &jid), [Pushed, Fetched, Acked]);
        let h = server.history(&jid);
        assert!(h.windows(2).all(|w| w[0].at() <= w[1].at()));
        assert_eq!(server.queue_size(&queue), 0);
        assert_eq!(server.working_len(), 0);
        assert_eq!(server.stats().processed, 1);
        assert_eq!(server.stats().pushed, 1);
        assert!(server.job(&jid).is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_checks_queues_in_the_given_order() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let (low, high) = (faktory.unique_queue("low"), faktory.unique_queue("high"));
    let mut client = connect(&url).await;
    for (queue, n) in [(&low, 1), (&high, 2), (&low, 3), (&high, 4)] {
        client
            .enqueue(job_on("ordered", queue, vec![json!(n)]))
            .await
            .unwrap();
    }
    let (mut worker, runs) = recording_worker(&url, "ordered", Outcome::Succeed).await;
    for _ in 0..4 {
        assert!(worker.run_one(0, &[&high, &low]).await.unwrap());
    }
    let order: Vec<Value> = snapshot(&runs)
        .iter()
        .map(|(j, _)| j.args()[0].clone())
        .collect();
    // Every job of the first queue, oldest first, before any of the second.
    assert_eq!(order, [json!(2), json!(4), json!(1), json!(3)]);
}

#[test]
fn fetch_waits_for_a_job_and_gives_up_after_the_fetch_timeout() {
    let server = TestServer::builder()
        .fetch_timeout(Duration::from_millis(300))
        .start()
        .unwrap();
    let mut raw = Raw::connect_hello(server.addr());

    // Nothing to fetch: a null reply once the fetch timeout has passed.
    let asked = Instant::now();
    assert_eq!(raw.call(b"FETCH empty"), Resp::Null);
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(290),
        "answered after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "answered after {waited:?}");

    // A job pushed while FETCH waits is handed over at once.
    let patient = TestServer::builder()
        .fetch_timeout(Duration::from_secs(60))
        .start()
        .unwrap();
    let mut raw = Raw::connect_hello(patient.addr());
    raw.send(b"FETCH later");
    raw.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let early = raw.try_read();
    assert!(
        matches!(&early, Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)),
        "FETCH answered before any job existed: {early:?}"
    );
    raw.stream.set_read_timeout(Some(WAIT)).unwrap();
    let pushed = Instant::now();
    patient
        .push_json(r#"{"jid":"late-0001","jobtype":"t","args":[],"queue":"later"}"#)
        .unwrap();
    assert_eq!(raw.read().bulk_json()["jid"], json!("late-0001"));
    assert!(pushed.elapsed() < Duration::from_secs(5));
    assert_eq!(patient.working_len(), 1);
}

// ---------------------------------------------------------------------------------------
// failures, retries, the dead set
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_job_is_retried_then_dead() {
    let server = TestServer::builder()
        .retry_delay(Duration::ZERO)
        .fetch_timeout(Duration::from_millis(200))
        .start()
        .unwrap();
    let url = server.url();
    let mut job = job_on("flaky", "default", vec![json!(7)]);
    job.retry = Some(2);
    let jid = job.id().to_string();
    let mut client = connect(&url).await;
    client.enqueue(job).await.unwrap();

    let (mut worker, runs) = recording_worker(&url, "flaky", Outcome::Fail).await;
    for attempt in 0..3 {
        assert!(
            run_until_job(&mut worker, "default").await,
            "attempt {attempt}"
        );
    }
    assert!(blocking(|| server.wait_until_history(
        &jid,
        JobEventKind::Dead,
        WAIT
    )));

    // Each attempt saw the failure record of the previous ones.
    let seen: Vec<Option<(usize, usize)>> = snapshot(&runs)
        .iter()
        .map(|(j, _)| j.failure().map(|f| (f.retry_count, f.retry_remaining)))
        .collect();
    assert_eq!(seen, [None, Some((0, 2)), Some((1, 1))]);

    use JobEventKind::*;
    assert_eq!(
        kinds(&server, &jid),
        [Pushed, Fetched, Failed, Retried, Fetched, Failed, Retried, Fetched, Failed, Dead]
    );
    for event in server.history(&jid) {
        if let JobEvent::Failed { message, .. } = event {
            assert_eq!(message, "boom");
        }
    }

    assert_eq!(server.dead_len(), 1);
    assert_eq!(server.retries_len(), 0);
    assert_eq!(server.queue_size("default"), 0);
    assert_eq!(server.working_len(), 0);
    let stats = server.stats();
    assert_eq!((stats.failures, stats.processed), (3, 0));

    let dead = server.dead_jobs();
    assert_eq!(dead.len(), 1);
    assert_eq!(server.job(&jid).as_ref(), Some(&dead[0]));
    let failure = &dead[0]["failure"];
    assert_eq!(failure["retry_count"], json!(2));
    assert_eq!(failure["remaining"], json!(0));
    assert_eq!(failure["errtype"], json!("unknown"));
    assert_eq!(failure["message"], json!("boom"));
    assert!(failure["failed_at"].is_string());
    assert!(failure["next_at"].is_string());

    // Dead means dead: nothing comes back to the queue.
    assert!(!worker.run_one(0, &["default"]).await.unwrap());
    assert_eq!(snapshot(&runs).len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_retry_delay_follows_the_faktory_formula() {
    let server = TestServer::builder()
        .fetch_timeout(Duration::from_millis(200))
        .start()
        .unwrap();
    let url = server.url();
    let job = job_on("flaky", "default", vec![]);
    let jid = job.id().to_string();
    let mut client = connect(&url).await;
    client.enqueue(job).await.unwrap();
    let (mut worker, _runs) = recording_worker(&url, "flaky", Outcome::Fail).await;
    assert!(run_until_job(&mut worker, "default").await);

    assert_eq!(server.retries_len(), 1);
    assert_eq!(server.queue_size("default"), 0);
    let retry = &server.retry_jobs()[0];
    let failure = &retry["failure"];
    let failed_at: DateTime<Utc> = failure["failed_at"].as_str().unwrap().parse().unwrap();
    let next_at: DateTime<Utc> = failure["next_at"].as_str().unwrap().parse().unwrap();
    // First failure: 15 + 0⁴ + rand(0..30) × 1 seconds.
    let delay = (next_at - failed_at).num_milliseconds();
    assert!((15_000..45_000).contains(&delay), "delay was {delay} ms");
    assert_eq!(failure["remaining"], json!(25));
    assert_eq!(retry["retry"], json!(25));
    assert!(!worker.run_one(0, &["default"]).await.unwrap());
    assert_eq!(kinds(&server, &jid).last(), Some(&JobEventKind::Failed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_zero_discards_and_negative_retry_buries_at_once() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let queue = faktory.unique_queue("noretry");
    let mut ephemeral = job_on("flaky", &queue, vec![]);
    ephemeral.retry = Some(0);
    let mut morgue = job_on("flaky", &queue, vec![]);
    morgue.retry = Some(-1);
    let (ephemeral_id, morgue_id) = (ephemeral.id().to_string(), morgue.id().to_string());
    let mut client = connect(&url).await;
    client.enqueue(ephemeral).await.unwrap();
    client.enqueue(morgue).await.unwrap();

    let (mut worker, runs) = recording_worker(&url, "flaky", Outcome::Fail).await;
    assert!(run_until_job(&mut worker, &queue).await);
    assert!(run_until_job(&mut worker, &queue).await);
    assert_eq!(snapshot(&runs).len(), 2);
    let info = client.current_info().await.unwrap();
    assert_eq!(info.data.queues.get(&queue).copied().unwrap_or(0), 0);

    if let Some(server) = faktory.server_or_skip("discarded and dead sets") {
        use JobEventKind::*;
        assert_eq!(
            kinds(server, &ephemeral_id),
            [Pushed, Fetched, Failed, Discarded]
        );
        assert!(server.job(&ephemeral_id).is_none());
        assert_eq!(kinds(server, &morgue_id), [Pushed, Fetched, Failed, Dead]);
        assert_eq!(server.dead_len(), 1);
        assert_eq!(server.dead_jobs()[0]["jid"], json!(morgue_id));
        assert_eq!(server.retries_len(), 0);
    }
}

// ---------------------------------------------------------------------------------------
// scheduled jobs and reservations
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_job_is_fetchable_only_after_its_time() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let queue = faktory.unique_queue("later");
    let at = Utc::now() + chrono::Duration::milliseconds(1500);
    let mut job = job_on("later", &queue, vec![]);
    job.at = Some(at);
    let jid = job.id().to_string();
    let mut client = connect(&url).await;
    client.enqueue(job).await.unwrap();

    if let Some(server) = faktory.server_or_skip("scheduled set contents") {
        assert_eq!(server.scheduled_len(), 1);
        assert_eq!(server.queue_size(&queue), 0);
        assert_eq!(server.scheduled_jobs()[0]["jid"], json!(jid));
    }

    let (mut worker, runs) = recording_worker(&url, "later", Outcome::Succeed).await;
    assert!(run_until_job(&mut worker, &queue).await);
    let ran_at = snapshot(&runs)[0].1;
    assert!(ran_at >= at, "ran at {ran_at}, scheduled for {at}");

    if let Some(server) = faktory.server_or_skip("scheduled history") {
        use JobEventKind::*;
        assert_eq!(kinds(server, &jid), [Pushed, Enqueued, Fetched, Acked]);
        let enqueued = event_time(server, &jid, Enqueued);
        assert!(
            enqueued >= at - chrono::Duration::milliseconds(5),
            "{enqueued} < {at}"
        );
        assert_eq!(server.scheduled_len(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_reservation_requeues_the_job() {
    let server = Arc::new(
        TestServer::builder()
            .min_reserve_for(Duration::ZERO)
            .retry_delay(Duration::ZERO)
            .fetch_timeout(Duration::from_millis(200))
            .start()
            .unwrap(),
    );
    let url = server.url();
    let mut job = job_on("slow", "default", vec![]);
    job.reserve_for = Some(Duration::from_secs(1));
    let jid = job.id().to_string();
    let mut client = connect(&url).await;
    client.enqueue(job).await.unwrap();

    // The first run holds the job until the server has given up on it, then ACKs too late.
    let runs: Runs = Arc::default();
    let mut worker = {
        let server = Arc::clone(&server);
        let runs = Arc::clone(&runs);
        Worker::builder::<io::Error>()
            .register_blocking_fn("slow", move |job| {
                let first = runs.lock().unwrap().is_empty();
                runs.lock().unwrap().push((job.clone(), Utc::now()));
                if first {
                    assert!(server.wait_until_history(job.id(), JobEventKind::Expired, WAIT));
                }
                Ok(())
            })
            .connect_to(&url)
            .await
            .unwrap()
    };
    assert!(run_until_job(&mut worker, "default").await);
    assert!(run_until_job(&mut worker, "default").await);

    let runs = snapshot(&runs);
    assert_eq!(runs.len(), 2);
    let failure = runs[1].0.failure().expect("second run sees the expiry");
    assert_eq!(failure.retry_count, 0);
    assert_eq!(
        failure.message.as_deref(),
        Some("Faktory job reservation expired")
    );

    use JobEventKind::*;
    assert_eq!(
        kinds(&server, &jid),
        [Pushed, Fetched, Expired, Retried, Fetched, Acked]
    );
    let held = event_time(&server, &jid, Expired) - event_time(&server, &jid, Fetched);
    assert!(held.num_milliseconds() >= 990, "held for {held}");
    let stats = server.stats();
    assert_eq!((stats.processed, stats.failures), (1, 1));
    assert_eq!(server.working_len(), 0);
}

#[test]
fn job_held_by_a_vanished_client_comes_back_after_reserve_for() {
    let server = TestServer::builder()
        .min_reserve_for(Duration::ZERO)
        .retry_delay(Duration::ZERO)
        .start()
        .unwrap();
    server
        .push_json(r#"{"jid":"vanish-0001","jobtype":"t","args":[],"reserve_for":1}"#)
        .unwrap();

    let mut raw = Raw::connect(server.addr());
    assert_eq!(
        raw.call(br#"HELLO {"v":2,"wid":"vanishing-worker","hostname":"h","pid":1,"labels":[]}"#),
        Resp::Simple("OK".into())
    );
    let fetched = raw.call(b"FETCH default").bulk_json();
    assert_eq!(fetched["jid"], json!("vanish-0001"));
    assert_eq!(server.workers()[0].wid, "vanishing-worker");
    drop(raw);

    // The worker is gone, the job is still reserved...
    assert!(server.wait_for(|s| s.workers().is_empty(), WAIT));
    assert_eq!(server.working_len(), 1);
    assert_eq!(server.working_jobs()[0]["jid"], json!("vanish-0001"));
    // ...until its reservation runs out; then it is fetchable again.
    assert!(server.wait_until_history("vanish-0001", JobEventKind::Retried, WAIT));
    assert_eq!(server.queue_size("default"), 1);
    let held = event_time(&server, "vanish-0001", JobEventKind::Expired)
        - event_time(&server, "vanish-0001", JobEventKind::Fetched);
    assert!(held.num_milliseconds() >= 990, "held for {held}");

    let mut raw = Raw::connect_hello(server.addr());
    let again = raw.call(b"FETCH default").bulk_json();
    assert_eq!(again["jid"], json!("vanish-0001"));
    assert_eq!(again["failure"]["errtype"], json!("ReservationExpired"));
    assert_eq!(
        raw.call(br#"ACK {"jid":"vanish-0001"}"#),
        Resp::Simple("OK".into())
    );
    assert_eq!(server.stats().processed, 1);
}

// ---------------------------------------------------------------------------------------
// authentication
// ---------------------------------------------------------------------------------------

#[test]
fn password_is_required_and_checked() {
    let server = TestServer::builder().password("s3cret").start().unwrap();
    let addr = server.addr();
    assert_eq!(server.url(), format!("tcp://:s3cret@{addr}"));

    runtime().block_on(async {
        let mut client = connect(&server.url()).await;
        client
            .enqueue(job_on("auth", "default", vec![]))
            .await
            .unwrap();
        drop(client);

        let wrong = Client::connect_to(&format!("tcp://:wrong@{addr}")).await;
        let err = wrong.err().expect("a wrong password is refused");
        assert!(format!("{err:?}").contains("Invalid password"), "{err:?}");

        let missing = Client::connect_to(&format!("tcp://{addr}")).await;
        assert!(missing.is_err(), "connecting without a password fails");
    });
    assert_eq!(server.queue_size("default"), 1);

    // On the wire: HI carries the challenge...
    let mut raw = Raw::connect(addr);
    let iterations = raw.hi["i"].as_u64().expect("i") as usize;
    let salt = raw.hi["s"].as_str().expect("s").to_string();
    assert_eq!(raw.hi["v"], json!(2));
    assert!((4000..8096).contains(&iterations));
    assert!(!salt.is_empty());
    // ...a HELLO without pwdhash is refused and the connection closed...
    assert_eq!(
        raw.call(br#"HELLO {"v":2}"#),
        Resp::Error("ERR Invalid password".into())
    );
    assert!(raw.try_read().map(|r| r.is_none()).unwrap_or(true));

    // ...a wrong hash too...
    let mut raw = Raw::connect(addr);
    let bad = format!(r#"HELLO {{"v":2,"pwdhash":"{}"}}"#, "0".repeat(64));
    assert_eq!(raw.call(bad.as_bytes()).error(), "ERR Invalid password");

    // ...and the right one is accepted.
    let mut raw = Raw::connect(addr);
    let i = raw.hi["i"].as_u64().unwrap() as usize;
    let s = raw.hi["s"].as_str().unwrap().to_string();
    let hello = format!(
        r#"HELLO {{"v":2,"pwdhash":"{}"}}"#,
        password_hash("s3cret", &s, i)
    );
    assert_eq!(raw.call(hello.as_bytes()), Resp::Simple("OK".into()));
    assert!(matches!(raw.call(b"INFO"), Resp::Bulk(_)));

    // A server without a password does not challenge.
    let open = TestServer::start().unwrap();
    let raw = Raw::connect(open.addr());
    assert_eq!(raw.hi, json!({"v": 2}));
    assert_eq!(open.url(), format!("tcp://{}", open.addr()));
}

// ---------------------------------------------------------------------------------------
// PUSHB, INFO, FLUSH
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushb_rejects_only_the_invalid_job() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let queue = faktory.unique_queue("bulk");
    let good = job_on("bulk", &queue, vec![json!(1)]);
    let also_good = job_on("bulk", &queue, vec![json!(2)]);
    let bad = Job::builder("bulk")
        .jid(JobId::new("short"))
        .queue(queue.clone())
        .build();
    let good_ids = [good.id().to_string(), also_good.id().to_string()];

    let mut client = connect(&url).await;
    let (accepted, errors) = client
        .enqueue_many(vec![good, bad, also_good])
        .await
        .unwrap();
    assert_eq!(accepted, 2);
    let errors = errors.expect("the short jid is reported");
    assert_eq!(errors.len(), 1);
    assert_eq!(
        errors.get("short").map(String::as_str),
        Some("jobs must have a reasonable jid parameter")
    );

    // All valid: the server answers {} and the client reports no errors.
    let last = job_on("bulk", &queue, vec![json!(3)]);
    let last_id = last.id().to_string();
    assert_eq!(client.enqueue_many(vec![last]).await.unwrap(), (1, None));

    if let Some(server) = faktory.server_or_skip("bulk queue contents") {
        assert_eq!(server.queue_size(&queue), 3);
        assert!(server.history("short").is_empty());
        let queued: Vec<Value> = server
            .jobs_in_queue(&queue)
            .iter()
            .map(|j| j["jid"].clone())
            .collect();
        assert_eq!(
            queued,
            [json!(good_ids[0]), json!(good_ids[1]), json!(last_id)]
        );
    }

    let (mut worker, runs) = recording_worker(&url, "bulk", Outcome::Succeed).await;
    for _ in 0..3 {
        assert!(run_until_job(&mut worker, &queue).await);
    }
    let ran: Vec<Value> = snapshot(&runs)
        .iter()
        .map(|(j, _)| j.args()[0].clone())
        .collect();
    assert_eq!(ran, [json!(1), json!(2), json!(3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_deserializes_and_shows_queue_sizes() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let queue = faktory.unique_queue("info");
    let mut client = connect(&url).await;
    for n in 0..3 {
        client
            .enqueue(job_on("info", &queue, vec![json!(n)]))
            .await
            .unwrap();
    }
    let info = client
        .current_info()
        .await
        .expect("INFO parses as FaktoryState");
    assert_eq!(info.data.queues.get(&queue), Some(&3));
    assert!(info.data.total_enqueued >= 3);
    assert!(info.data.total_queues >= 1);
    assert!(info.server.version.major >= 1);
    assert!(info.server.connections >= 1);
    assert!(info.server.command_count >= 4);
    assert!((Utc::now() - info.now).num_seconds().abs() < 60);

    if let Some(server) = faktory.server_or_skip("exact INFO counters") {
        assert_eq!(info.server.description, "Faktory test server");
        assert_eq!(info.data.total_enqueued, 3);
        assert_eq!(info.data.total_queues, 1);
        assert_eq!(info.data.total_processed, 0);
        assert_eq!(info.server.command_count, 4);
        assert_eq!(server.queue_size(&queue), 3);
    }

    let (mut worker, _runs) = recording_worker(&url, "info", Outcome::Succeed).await;
    for _ in 0..3 {
        assert!(run_until_job(&mut worker, &queue).await);
    }
    let info = client.current_info().await.unwrap();
    assert_eq!(info.data.queues.get(&queue).copied().unwrap_or(0), 0);
    if faktory.server_or_skip("processed counter").is_some() {
        assert_eq!(info.data.total_processed, 3);
        assert_eq!(info.data.total_failures, 0);
    }
}

#[test]
fn flush_empties_everything() {
    let server = TestServer::builder()
        .min_reserve_for(Duration::ZERO)
        .retry_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    let push = |jid: &str, extra: &str| {
        server
            .push_json(&format!(
                r#"{{"jid":"{jid}","jobtype":"t","args":[],"queue":"q-{jid}"{extra}}}"#
            ))
            .unwrap()
    };
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    push("retrying", "");
    push("dying-01", r#","retry":-1"#);
    push("working1", "");
    push("queued01", "");
    push("schedule", &format!(r#","at":"{later}""#));

    let mut raw = Raw::connect_hello(server.addr());
    for jid in ["retrying", "dying-01", "working1"] {
        let fetched = raw.call(format!("FETCH q-{jid}").as_bytes()).bulk_json();
        assert_eq!(fetched["jid"], json!(jid));
    }
    for jid in ["retrying", "dying-01"] {
        let fail = format!(r#"FAIL {{"jid":"{jid}","errtype":"E","message":"m"}}"#);
        assert_eq!(raw.call(fail.as_bytes()), Resp::Simple("OK".into()));
    }
    assert_eq!(
        (
            server.queue_size("q-queued01"),
            server.scheduled_len(),
            server.retries_len(),
            server.dead_len(),
            server.working_len()
        ),
        (1, 1, 1, 1, 1)
    );

    assert_eq!(raw.call(b"FLUSH"), Resp::Simple("OK".into()));
    assert_eq!(
        (
            server.queue_size("q-queued01"),
            server.scheduled_len(),
            server.retries_len(),
            server.dead_len(),
            server.working_len()
        ),
        (0, 0, 0, 0, 0)
    );
    assert!(server.queue_names().is_empty());
    assert!(server.history("queued01").is_empty());
    assert_eq!(server.stats().failures, 0);
    assert!(server.job("working1").is_none());
    let info = raw.call(b"INFO").bulk_json();
    assert_eq!(info["faktory"]["queues"], json!({}));
    assert_eq!(info["faktory"]["total_enqueued"], json!(0));
    // The flushed reservation is gone: a late ACK is a no-op, a FAIL finds nothing.
    assert_eq!(
        raw.call(br#"ACK {"jid":"working1"}"#),
        Resp::Simple("OK".into())
    );
    assert_eq!(
        raw.call(br#"FAIL {"jid":"working1"}"#).error(),
        "ERR Job not found working1"
    );
    assert_eq!(server.stats().processed, 0);
    // And the scheduled job never shows up.
    assert!(!server.wait_for(|s| !s.queue_names().is_empty(), Duration::from_millis(200)));

    // The inspection API flushes too.
    push("again-01", "");
    server.flush();
    assert!(server.queue_names().is_empty());
}

// ---------------------------------------------------------------------------------------
// malformed input
// ---------------------------------------------------------------------------------------

#[test]
fn malformed_input_gets_errors_and_the_server_keeps_serving() {
    let server = TestServer::start().unwrap();
    let addr = server.addr();

    // A connection that sends half a line and vanishes.
    {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"HELLO {\"v\":2").unwrap();
    }

    let mut raw = Raw::connect(addr);
    // Before HELLO.
    assert!(raw
        .call(b"\x00\xff\xfe garbage \x1b[31m")
        .error()
        .starts_with("ERR expected HELLO"));
    assert!(raw.call(b"INFO").error().starts_with("ERR expected HELLO"));
    assert!(raw
        .call(b"HELLO {not json")
        .error()
        .starts_with("ERR invalid HELLO"));
    assert!(raw.call(b"HELLO").error().starts_with("ERR invalid HELLO"));
    assert!(raw
        .call(br#"HELLO [2]"#)
        .error()
        .starts_with("ERR invalid HELLO"));
    assert_eq!(raw.call(br#"HELLO {"v":2}"#), Resp::Simple("OK".into()));
    // (What comes after HELLO is checked against both servers in
    // `commands_get_the_real_servers_replies`.)
    assert!(raw
        .call(b"PUSH {bad json")
        .error()
        .starts_with("ERR invalid JSON"));

    // An overlong line (one byte over the 16 MiB default) is refused as a whole...
    let mut huge = b"PUSH ".to_vec();
    huge.resize(16 * 1024 * 1024 + 1, b'A');
    assert!(raw.call(&huge).error().contains("too long"));
    // ...and the connection is still in sync and usable.
    assert!(matches!(raw.call(b"INFO"), Resp::Bulk(_)));
    assert_eq!(
        raw.call(br#"PUSH {"jid":"fine-0001","jobtype":"t","args":[]}"#),
        Resp::Simple("OK".into())
    );

    // None of the bad input got in, and other clients are served.
    assert_eq!(server.stats().pushed, 1);
    assert_eq!(server.queue_names(), ["default"]);
    runtime().block_on(async {
        let mut client = connect(&server.url()).await;
        client
            .enqueue(job_on("t", "default", vec![]))
            .await
            .unwrap();
        let info = client.current_info().await.unwrap();
        assert_eq!(info.data.queues.get("default"), Some(&2));
    });

    // END closes the connection without a reply.
    raw.send(b"END");
    assert!(raw.try_read().map(|r| r.is_none()).unwrap_or(true));
}

/// Commands after `HELLO`, well-formed or not, get the replies the real server gives (the
/// same error, or the same start of it where the decoder's own words follow). Also against
/// a real Faktory when `FAKTORY_URL` is set, which is how these replies were found.
#[test]
fn commands_get_the_real_servers_replies() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let Some(addr) = raw_addr(&faktory) else {
        return;
    };
    let queue = faktory.unique_queue("malformed");
    let push = |fields: &str| format!(r#"PUSH {{"queue":"{queue}",{fields}}}"#).into_bytes();
    let ghost = format!("ghost-{queue}");
    let mut raw = Raw::connect_hello(addr);
    let cases: Vec<(Vec<u8>, String)> = vec![
        (b"DANCE now".to_vec(), "ERR unknown command DANCE".into()),
        (
            b"BATCH NEW {}".to_vec(),
            "ERR batch subsystem is only available in Faktory Enterprise".into(),
        ),
        (
            b"TRACK GET x".to_vec(),
            "ERR tracking subsystem is only available in Faktory Enterprise".into(),
        ),
        (b"\xff\xfe".to_vec(), "ERR unknown command".into()),
        (b"".to_vec(), "ERR unknown command".into()),
        (
            br#"HELLO {"v":2}"#.to_vec(),
            "ERR unknown command HELLO".into(),
        ),
        // A bare verb that takes an argument: the real server's slicing panics.
        (b"PUSH".to_vec(), "ERR internal error".into()),
        (b"PUSHB".to_vec(), "ERR internal error".into()),
        (b"ACK".to_vec(), "ERR internal error".into()),
        (b"FAIL".to_vec(), "ERR internal error".into()),
        (b"BEAT".to_vec(), "ERR internal error".into()),
        (b"PUSH {bad json".to_vec(), "ERR invalid JSON".into()),
        (b"PUSH [1,2]".to_vec(), "ERR invalid JSON".into()),
        // Invalid UTF-8 in a string is read as U+FFFD, not refused.
        (
            [
                &b"PUSH {\"queue\":\"x\",\"jid\":\""[..],
                b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8\"}",
            ]
            .concat(),
            "ERR jobs must have a jobtype parameter".into(),
        ),
        (
            push(r#""jid":"abcdefgh","jobtype":"t","args":{}"#),
            "ERR invalid JSON".into(),
        ),
        (
            push(r#""jid":"short","jobtype":"t","args":[]"#),
            "ERR jobs must have a reasonable jid parameter".into(),
        ),
        (
            push(r#""jid":"abcdefgh","args":[]"#),
            "ERR jobs must have a jobtype parameter".into(),
        ),
        (
            push(r#""jid":"abcdefgh","jobtype":"t""#),
            "ERR jobs must have an args parameter".into(),
        ),
        (
            push(r#""jid":"abcdefgh","jobtype":"t","args":[],"reserve_for":86401"#),
            "ERR jobs cannot be reserved for more than one day".into(),
        ),
        (
            push(r#""jid":"abcdefgh","jobtype":"t","args":[],"at":"whenever""#),
            "ERR invalid timestamp for 'at'".into(),
        ),
        (
            br#"PUSH {"jid":"abcdefgh","jobtype":"t","args":[],"queue":"no spaces"}"#.to_vec(),
            r#"ERR cannot get "no spaces" queue: queue names must match \A[a-zA-Z0-9._-]+\z"#
                .into(),
        ),
        (b"PUSHB {}".to_vec(), "ERR invalid JSON".into()),
        (
            br#"PUSHB [{"jid":"abcdefgh","jobtype":"t","args":[]},{"jid":1}]"#.to_vec(),
            "ERR invalid JSON".into(),
        ),
        (
            b"FETCH".to_vec(),
            "ERR must call fetch with at least one queue".into(),
        ),
        (b"ACK nope".to_vec(), "ERR invalid ACK".into()),
        (b"ACK {}".to_vec(), "ERR invalid ACK".into()),
        (b"FAIL []".to_vec(), "ERR invalid FAIL".into()),
        (br#"FAIL ["abcdefgh"]"#.to_vec(), "ERR invalid FAIL".into()),
        (b"FAIL {}".to_vec(), "ERR missing JID".into()),
        (
            format!(r#"FAIL {{"jid":"{ghost}"}}"#).into_bytes(),
            format!("ERR Job not found {ghost}"),
        ),
        (b"BEAT x".to_vec(), "ERR invalid BEAT".into()),
        (br#"BEAT ["ghost"]"#.to_vec(), "ERR invalid BEAT".into()),
        (
            format!(r#"BEAT {{"wid":"{ghost}"}}"#).into_bytes(),
            format!("ERR unknown worker {ghost}"),
        ),
    ];
    for (line, expected) in &cases {
        let reply = raw.call(line);
        assert!(
            matches!(&reply, Resp::Error(e) if e.starts_with(expected.as_str())),
            "{:?}: {reply:?}, expected {expected:?}",
            String::from_utf8_lossy(line)
        );
    }
    // Acknowledging a job nobody holds is no error.
    assert_eq!(
        raw.call(format!(r#"ACK {{"jid":"{ghost}"}}"#).as_bytes()),
        Resp::Simple("OK".into())
    );

    // None of it got in; a good job still does.
    assert_eq!(
        raw.call(&push(r#""jid":"fine-0001","jobtype":"t","args":[]"#)),
        Resp::Simple("OK".into())
    );
    let info = raw.call(b"INFO").bulk_json();
    assert_eq!(info["faktory"]["queues"][&queue], json!(1), "{info}");
    // The scanners' figures, as the real server reports them.
    for task in ["Scheduled", "Retries", "Dead"] {
        let figures = &info["faktory"]["tasks"][task];
        for field in ["size", "cycles", "enqueued"] {
            assert!(figures[field].is_u64(), "{task}.{field}: {info}");
        }
        // A float, but Go writes 0.0 as 0.
        assert!(figures["wall_time_sec"].is_number(), "{task}: {info}");
    }
    for task in ["Busy", "Workers"] {
        let figures = &info["faktory"]["tasks"][task];
        for field in ["size", "reaped"] {
            assert!(figures[field].is_u64(), "{task}.{field}: {info}");
        }
    }
    if let Some(server) = faktory.server_or_skip("stored jobs after malformed input") {
        assert_eq!(server.stats().pushed, 1);
        assert_eq!(server.queue_names(), [queue]);
    }
}

/// A worker's state (quiet, terminate) keeps jobs from the `FETCH`es of the connection that
/// registered the worker only: its other connections go on fetching until the client stops
/// them. Also against a real Faktory when `FAKTORY_URL` is set.
#[test]
fn a_worker_state_holds_on_its_first_connection_only() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let Some(addr) = raw_addr(&faktory) else {
        return;
    };
    let queue = faktory.unique_queue("state");
    let wid = format!("w-{queue}");
    let hello = format!(r#"HELLO {{"v":2,"wid":"{wid}","hostname":"box","pid":7,"labels":[]}}"#);
    let mut first = Raw::connect(addr);
    assert_eq!(first.call(hello.as_bytes()), Resp::Simple("OK".into()));
    let mut second = Raw::connect(addr);
    assert_eq!(second.call(hello.as_bytes()), Resp::Simple("OK".into()));
    let mut producer = Raw::connect_hello(addr);
    let jid = format!("job-{queue}");
    assert_eq!(
        producer.call(
            format!(r#"PUSH {{"jid":"{jid}","jobtype":"t","args":[],"queue":"{queue}"}}"#)
                .as_bytes()
        ),
        Resp::Simple("OK".into())
    );
    // The worker says it is quiet (from any of its connections).
    assert_eq!(
        second.call(format!(r#"BEAT {{"wid":"{wid}","current_state":"quiet"}}"#).as_bytes()),
        Resp::Bulk(br#"{"state":"quiet"}"#.to_vec())
    );
    assert_eq!(first.call(format!("FETCH {queue}").as_bytes()), Resp::Null);
    let fetched = second.call(format!("FETCH {queue}").as_bytes()).bulk_json();
    assert_eq!(fetched["jid"], json!(jid));
    assert_eq!(
        second.call(format!(r#"ACK {{"jid":"{jid}"}}"#).as_bytes()),
        Resp::Simple("OK".into())
    );
}

/// A `FETCH` whose client closed the connection while it waited still takes the next job
/// pushed to its queue within the fetch timeout, and that job stays reserved to the closed
/// connection (until its reservation runs out). A worker that stops with `FETCH`es pending
/// therefore takes the jobs pushed right after. Also against a real Faktory when
/// `FAKTORY_URL` is set.
#[test]
fn a_fetch_whose_client_left_still_takes_a_job() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let Some(addr) = raw_addr(&faktory) else {
        return;
    };
    let queue = faktory.unique_queue("abandoned");
    {
        let mut gone = Raw::connect(addr);
        let hello = format!(r#"HELLO {{"v":2,"wid":"gone-{queue}","hostname":"h","pid":1}}"#);
        assert_eq!(gone.call(hello.as_bytes()), Resp::Simple("OK".into()));
        gone.send(format!("FETCH {queue}").as_bytes());
    }
    let jid = format!("job-{queue}");
    let mut producer = Raw::connect_hello(addr);
    assert_eq!(
        producer.call(
            format!(
                r#"PUSH {{"jid":"{jid}","jobtype":"t","args":[],"queue":"{queue}","reserve_for":600}}"#
            )
            .as_bytes()
        ),
        Resp::Simple("OK".into())
    );
    // Another worker finds nothing within its whole fetch timeout: the job is taken.
    let mut other = Raw::connect(addr);
    let hello = format!(r#"HELLO {{"v":2,"wid":"other-{queue}","hostname":"h","pid":2}}"#);
    assert_eq!(other.call(hello.as_bytes()), Resp::Simple("OK".into()));
    assert_eq!(other.call(format!("FETCH {queue}").as_bytes()), Resp::Null);
    if let Some(server) = faktory.server_or_skip("the abandoned FETCH's reservation") {
        use JobEventKind::*;
        assert_eq!(kinds(server, &jid), [Pushed, Fetched]);
        assert_eq!(server.working_jobs()[0]["jid"], json!(jid));
    }
}

// ---------------------------------------------------------------------------------------
// BEAT
// ---------------------------------------------------------------------------------------

#[test]
fn beat_replies_follow_the_requested_worker_state() {
    let server = TestServer::builder()
        .fetch_timeout(Duration::from_millis(100))
        .start()
        .unwrap();
    server
        .push_json(r#"{"jid":"beat-job-1","jobtype":"t","args":[]}"#)
        .unwrap();
    let mut raw = Raw::connect(server.addr());
    let hello = br#"HELLO {"v":2,"wid":"raw-worker","hostname":"box","pid":42,"labels":["rust"]}"#;
    assert_eq!(raw.call(hello), Resp::Simple("OK".into()));
    let info = &server.workers()[0];
    assert_eq!(
        (info.wid.as_str(), info.hostname.as_str(), info.pid),
        ("raw-worker", "box", 42)
    );
    assert_eq!(info.labels, ["rust"]);
    assert_eq!(info.last_reply, None);

    assert_eq!(
        raw.call(br#"BEAT {"wid":"raw-worker","rss_kb":1000}"#),
        Resp::Simple("OK".into())
    );
    server.set_worker_state(WorkerState::Quiet);
    assert_eq!(
        raw.call(br#"BEAT {"wid":"raw-worker"}"#),
        Resp::Bulk(br#"{"state":"quiet"}"#.to_vec())
    );
    // A quiet worker gets no jobs.
    assert_eq!(raw.call(b"FETCH default"), Resp::Null);
    assert_eq!(server.queue_size("default"), 1);
    // The worker itself may move on to terminate; it never goes back.
    assert_eq!(
        raw.call(br#"BEAT {"wid":"raw-worker","current_state":"terminate"}"#),
        Resp::Bulk(br#"{"state":"terminate"}"#.to_vec())
    );
    server.set_worker_state(WorkerState::Running);
    assert_eq!(
        raw.call(br#"BEAT {"wid":"raw-worker"}"#),
        Resp::Bulk(br#"{"state":"terminate"}"#.to_vec())
    );
    let info = &server.workers()[0];
    assert_eq!(info.beats, 4);
    assert_eq!(info.last_reply, Some(WorkerState::Terminate));
    assert_eq!(info.state, WorkerState::Terminate);

    // Producers (no wid) still fetch.
    let mut producer = Raw::connect_hello(server.addr());
    assert_eq!(
        producer.call(b"FETCH default").bulk_json()["jid"],
        json!("beat-job-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_is_quieted_then_terminated_by_beat() {
    let server = TestServer::builder()
        .fetch_timeout(Duration::from_millis(200))
        .start()
        .unwrap();
    let wid = "beat-test-worker-0001";
    server.set_worker_state_for(wid, WorkerState::Quiet);
    let ran = Arc::new(AtomicUsize::new(0));
    let mut worker = {
        let ran = Arc::clone(&ran);
        Worker::builder::<io::Error>()
            .wid(WorkerId::new(wid))
            .workers(2)
            .register_fn("beat", move |_job| {
                let ran = Arc::clone(&ran);
                async move {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })
            .connect_to(&server.url())
            .await
            .unwrap()
    };
    let running = tokio::spawn(async move {
        let result = worker.run(&["beatq"]).await;
        (result, worker)
    });

    // The worker's first BEAT (about 5 s in) is answered "quiet".
    assert!(blocking(|| server.wait_for(
        |s| s
            .workers()
            .iter()
            .any(|w| w.wid == wid && w.last_reply == Some(WorkerState::Quiet)),
        WAIT
    )));
    // Told "quiet", the worker ends its fetching tasks (each closes its connection once its
    // pending FETCH has returned); only the connection that BEATs is left. (The server
    // itself refuses jobs to the worker's first connection only, as the real server does.)
    assert!(blocking(|| server.wait_for(
        |s| s
            .workers()
            .iter()
            .any(|w| w.wid == wid && w.connections == 1),
        WAIT
    )));
    // A quiet worker takes no new job.
    server
        .push_json(r#"{"jid":"quiet-job-1","jobtype":"beat","args":[],"queue":"beatq"}"#)
        .unwrap();
    assert!(!blocking(|| server.wait_for(
        |s| s.queue_size("beatq") == 0,
        Duration::from_millis(700)
    )));
    assert!(!running.is_finished());

    server.set_worker_state_for(wid, WorkerState::Terminate);
    let (result, worker) = tokio::time::timeout(WAIT, running)
        .await
        .expect("worker stops")
        .unwrap();
    let details = result.expect("run ends without error");
    assert_eq!(details.reason, StopReason::ServerInstruction);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert_eq!(kinds(&server, "quiet-job-1"), [JobEventKind::Pushed]);
    drop(worker);
}

// ---------------------------------------------------------------------------------------
// payload preservation
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_data_round_trips_through_the_faktory_client() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let queue = faktory.unique_queue("custom");
    let mut custom: HashMap<String, Value> = HashMap::new();
    custom.insert(
        "nested".into(),
        json!({"a": [1, {"b": "ü€😀"}], "z": null, "t": true}),
    );
    custom.insert("float".into(), json!(1.0e300));
    custom.insert("neg".into(), json!(-42));
    custom.insert("text".into(), json!("line\nbreak \"quoted\" \u{2028}"));
    if faktory.server().is_some() {
        // Beyond f64 precision: kept only by the test server (the real one re-encodes
        // numbers as float64).
        custom.insert("big".into(), json!(12_345_678_901_234_567_890_u64));
    }
    let mut job = job_on("custom", &queue, vec![json!({"deep": {"er": [1, 2, 3]}})]);
    job.custom = custom.clone();
    let mut client = connect(&url).await;
    client.enqueue(job).await.unwrap();

    let (mut worker, runs) = recording_worker(&url, "custom", Outcome::Succeed).await;
    assert!(run_until_job(&mut worker, &queue).await);
    let ran = snapshot(&runs).remove(0).0;
    assert_eq!(ran.custom, custom);
    assert_eq!(ran.args(), &[json!({"deep": {"er": [1, 2, 3]}})]);
}

#[test]
fn custom_and_unknown_fields_are_preserved_byte_for_byte() {
    let server = TestServer::start().unwrap();
    let custom = r#"{"zeta":1,"alpha":{"nested":[true,null,{"k":"ü😀\u00e9"}], "empty":{}},"big":12345678901234567890,"huge":1.0e300,"neg":-0.0,"sep":"\u2028"}"#;
    let args = r#"[1,  2.50, "x", 1E+2]"#;
    let payload = format!(
        r#"{{"jid":"bytes-0001","jobtype":"t","args":{args},"queue":"raw","custom":{custom},"x-extra":{{"keep":["me"]}},"priority":9}}"#
    );
    let mut raw = Raw::connect_hello(server.addr());
    assert_eq!(
        raw.call(format!("PUSH {payload}").as_bytes()),
        Resp::Simple("OK".into())
    );
    let stored = server.job_json("bytes-0001").unwrap();
    let fetched = match raw.call(b"FETCH raw") {
        Resp::Bulk(bytes) => String::from_utf8(bytes).unwrap(),
        other => panic!("expected the job, got {other:?}"),
    };
    assert_eq!(fetched, stored);
    // Everything the producer sent, byte for byte and in order, then the fields the
    // server adds.
    let sent_without_brace = &payload[..payload.len() - 1];
    assert!(
        fetched.starts_with(sent_without_brace),
        "sent:    {payload}\nfetched: {fetched}"
    );
    let added: Value = serde_json::from_str(&format!("{{{}", &fetched[payload.len()..])).unwrap();
    let added_keys: HashSet<&str> = added
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added_keys,
        HashSet::from(["retry", "created_at", "enqueued_at"])
    );
    assert_eq!(added["retry"], json!(25));
}

// ---------------------------------------------------------------------------------------
// load
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_producers_and_eight_workers_move_5000_jobs_exactly_once() {
    const PRODUCERS: usize = 50;
    const PER_PRODUCER: usize = 100;
    const TOTAL: usize = PRODUCERS * PER_PRODUCER;
    const WORKERS: usize = 8;

    let faktory = TestFaktory::from_env_or_start().unwrap();
    let url = faktory.url();
    let queue = faktory.unique_queue("load");
    let started = Instant::now();

    let pushed: Arc<Mutex<HashSet<String>>> = Arc::default();
    let executions: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let acked = Arc::new(AtomicUsize::new(0));

    let mut tasks = tokio::task::JoinSet::new();
    for p in 0..PRODUCERS {
        let (url, queue, pushed) = (url.clone(), queue.clone(), Arc::clone(&pushed));
        tasks.spawn(async move {
            let mut client = connect(&url).await;
            for n in 0..PER_PRODUCER {
                let job = job_on("load", &queue, vec![json!(p), json!(n)]);
                let jid = job.id().to_string();
                client.enqueue(job).await.expect("enqueue");
                assert!(pushed.lock().unwrap().insert(jid), "jid collision");
            }
        });
    }
    for _ in 0..WORKERS {
        let (url, queue) = (url.clone(), queue.clone());
        let (executions, acked) = (Arc::clone(&executions), Arc::clone(&acked));
        tasks.spawn(async move {
            let seen = Arc::clone(&executions);
            let mut worker = Worker::builder::<io::Error>()
                .register_fn("load", move |job| {
                    let seen = Arc::clone(&seen);
                    async move {
                        *seen
                            .lock()
                            .unwrap()
                            .entry(job.id().to_string())
                            .or_default() += 1;
                        Ok(())
                    }
                })
                .connect_to(&url)
                .await
                .expect("worker connects");
            let deadline = Instant::now() + Duration::from_secs(60);
            while acked.load(Ordering::SeqCst) < TOTAL && Instant::now() < deadline {
                if worker.run_one(0, &[&queue]).await.expect("run_one") {
                    acked.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task succeeded");
    }

    let pushed = pushed.lock().unwrap().clone();
    let executions = executions.lock().unwrap().clone();
    assert_eq!(pushed.len(), TOTAL);
    assert_eq!(acked.load(Ordering::SeqCst), TOTAL);
    let missing = pushed
        .iter()
        .filter(|j| !executions.contains_key(*j))
        .count();
    let repeated: Vec<_> = executions.iter().filter(|(_, n)| **n != 1).collect();
    let unknown = executions.keys().filter(|j| !pushed.contains(*j)).count();
    assert_eq!(missing, 0, "jobs never run");
    assert!(repeated.is_empty(), "jobs run more than once: {repeated:?}");
    assert_eq!(unknown, 0);

    if let Some(server) = faktory.server_or_skip("server-side counts after the load") {
        assert_eq!(server.stats().processed, TOTAL as u64);
        assert_eq!(server.stats().pushed, TOTAL as u64);
        assert_eq!(server.queue_size(&queue), 0);
        assert_eq!(server.working_len(), 0);
        use JobEventKind::*;
        for jid in &pushed {
            assert_eq!(kinds(server, jid), [Pushed, Fetched, Acked], "{jid}");
        }
    }
    println!("moved {TOTAL} jobs in {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// lifecycle of the server itself
// ---------------------------------------------------------------------------------------

#[test]
fn drop_closes_connections_without_hanging_and_the_port_can_be_reused() {
    let server = TestServer::builder()
        .fetch_timeout(Duration::from_secs(120))
        .start()
        .unwrap();
    let addr = server.addr();
    let mut idle = Raw::connect_hello(addr);
    let mut fetching = Raw::connect_hello(addr);
    fetching.send(b"FETCH nothing-ever-arrives");
    let mut unidentified = Raw::connect(addr);

    let stopping = Instant::now();
    drop(server);
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        stopping.elapsed()
    );
    // Every client sees its connection end (a blocked FETCH may first get its null reply).
    for raw in [&mut idle, &mut fetching, &mut unidentified] {
        let mut replies = 0;
        while let Ok(Some(reply)) = raw.try_read() {
            assert!(matches!(reply, Resp::Null | Resp::Error(_)), "{reply:?}");
            replies += 1;
            assert!(replies < 3);
        }
    }

    let again = TestServer::builder().bind(addr).start().unwrap();
    assert_eq!(again.addr(), addr);
    let mut raw = Raw::connect_hello(addr);
    assert!(matches!(raw.call(b"INFO"), Resp::Bulk(_)));
    again.shutdown();
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn test_faktory_uses_faktory_url_or_starts_a_server() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    match std::env::var("FAKTORY_URL") {
        Ok(url) if !url.trim().is_empty() => {
            assert!(faktory.is_external());
            assert!(faktory.server().is_none());
            assert_eq!(faktory.url(), url.trim());
        }
        _ => {
            let server = faktory.server().expect("a local server");
            assert_eq!(faktory.url(), server.url());
            assert!(!faktory.is_external());
            let debug = format!("{faktory:?}");
            assert!(debug.contains("TestServer"), "{debug}");
        }
    }
    let q = faktory.unique_queue("p");
    assert!(q.starts_with("p-") && q.len() == 14, "{q}");
}

// ---------------------------------------------------------------------------------------
// a crash that keeps the data
// ---------------------------------------------------------------------------------------

#[test]
fn a_server_started_with_a_stopped_ones_data_serves_its_jobs() {
    let builder = TestServer::builder().retry_delay(Duration::from_secs(3600));
    let server = builder.clone().start().unwrap();
    for jid in ["keep-reserved1", "keep-failed-01", "keep-queued-01"] {
        server
            .push_json(&format!(
                r#"{{"jid":"{jid}","jobtype":"t","args":[],"queue":"q"}}"#
            ))
            .unwrap();
    }
    let mut raw = Raw::connect(server.addr());
    assert_eq!(
        raw.call(br#"HELLO {"v":2,"wid":"crashing-worker","hostname":"h","pid":1,"labels":[]}"#),
        Resp::Simple("OK".into())
    );
    let reserved = raw.call(b"FETCH q").bulk_json();
    assert_eq!(reserved["jid"], json!("keep-reserved1"));
    let failed = raw.call(b"FETCH q").bulk_json();
    assert_eq!(failed["jid"], json!("keep-failed-01"));
    assert_eq!(
        raw.call(br#"FAIL {"jid":"keep-failed-01","errtype":"E","message":"m"}"#),
        Resp::Simple("OK".into())
    );
    let addr = server.addr();
    let data = server.shutdown_keeping_data();
    // The crash closed the client's connection.
    let mut rest = Vec::new();
    assert_eq!(
        raw.reader
            .read_to_end(&mut rest)
            .map(|_| rest.len())
            .unwrap_or(0),
        0
    );

    let server = builder.bind(addr).start_with_data(data).unwrap();
    assert_eq!(server.addr(), addr);
    assert_eq!(server.queue_size("q"), 1);
    assert_eq!(server.working_len(), 1);
    assert_eq!(server.retries_len(), 1);
    assert!(
        server.workers().is_empty(),
        "connected workers are not kept"
    );
    assert_eq!(
        kinds(&server, "keep-failed-01"),
        vec![
            JobEventKind::Pushed,
            JobEventKind::Fetched,
            JobEventKind::Failed
        ]
    );
    // A new connection acknowledges the job the old one held, and fetches the queued one.
    let mut raw = Raw::connect(addr);
    assert_eq!(
        raw.call(br#"HELLO {"v":2,"wid":"new-worker","hostname":"h","pid":2,"labels":[]}"#),
        Resp::Simple("OK".into())
    );
    assert_eq!(
        raw.call(br#"ACK {"jid":"keep-reserved1"}"#),
        Resp::Simple("OK".into())
    );
    assert_eq!(server.working_len(), 0);
    assert_eq!(
        raw.call(b"FETCH q").bulk_json()["jid"],
        json!("keep-queued-01")
    );
}
