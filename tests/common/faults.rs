//! Fault injection that needs more than one process: a worker process killed with SIGKILL
//! while jobs wait on open transactions and while a handler runs.
//!
//! The worker process is this test binary run again with only its `worker_child` test (marked
//! `#[ignore]`, so that a normal run skips it), configured through environment variables. It
//! answers `STATE` on stdin with `STATE <waiting> <running>`.

use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::testing::{TestFaktory, TestServer};
use diesel_transaction_barrier::Error;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

const CHILD_QUEUE: &str = "DTB_CHILD_QUEUE";
const CHILD_FAKTORY: &str = "DTB_CHILD_FAKTORY";
const CHILD_DB_URL: &str = "DTB_CHILD_DB_URL";

/// The kind whose handler, in the child process only, blocks until the process is killed.
pub const SLOW: &str = "slow_kind";

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The body of a backend file's `#[ignore]`d `worker_child` test: runs a worker until killed.
pub fn worker_child_main<D: TestDb>() {
    let Ok(queue) = std::env::var(CHILD_QUEUE) else {
        return;
    };
    let faktory = std::env::var(CHILD_FAKTORY).expect("faktory url");
    let url = std::env::var(CHILD_DB_URL).expect("database url");
    let (tx, _rx) = unbounded();
    let handlers = handlers::<D>(&tx).register_without_barrier(
        SLOW,
        |job: &Job, conn: &mut D::Conn| -> Result<(), std::io::Error> {
            // Record the run inside the consuming transaction, then hang: the kill comes now.
            let id = job.args()[0].as_i64().unwrap();
            D::exec(
                conn,
                &format!(
                    "INSERT INTO handler_runs (jid, order_id, seen_status) VALUES ('{}', {id}, 'slow')",
                    job.id().as_str()
                ),
            );
            std::thread::sleep(Duration::from_secs(3600));
            Ok(())
        },
    );
    let pool = Pool::builder()
        .max_size(8)
        .build(ConnectionManager::<D::Conn>::new(url))
        .expect("pool");
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

/// A worker process is SIGKILLed while three jobs wait on an open transaction and one handler
/// runs. After a new worker starts, every committed job completes exactly once (the killed
/// handler's writes were rolled back with its transaction), and nothing is left.
pub fn worker_killed_mid_wait_and_mid_handler<D: TestDb>(child_test: &str) {
    // Redelivery needs the reservation to run out: short on the test server, the real
    // server's minimum (60 s) otherwise.
    let (faktory, reserve_for) = match std::env::var("FAKTORY_URL") {
        Ok(url) if !url.is_empty() => (TestFaktory::from_env_or_start().unwrap(), 61),
        _ => (
            TestFaktory::local(
                TestServer::builder()
                    .min_reserve_for(Duration::from_secs(1))
                    .retry_delay(Duration::from_millis(200))
                    .start()
                    .unwrap(),
            ),
            2,
        ),
    };
    let env = Env::<D>::with_db_and_faktory(D::create(), faktory);
    let job = |kind: &str, id: i64| {
        let mut j = env.job(kind, id);
        j.reserve_for = Some(Duration::from_secs(reserve_for));
        j
    };
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                child_test,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_QUEUE, &env.queue)
            .env(CHILD_FAKTORY, env.faktory.url())
            .env(CHILD_DB_URL, env.db.url())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("worker process"),
    );
    let mut child_in = child.0.stdin.take().unwrap();
    let (state_tx, state_rx) = unbounded::<(usize, usize)>();
    let out = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("STATE ").nth(1) {
                let mut it = rest.split_whitespace().map(|n| n.parse().unwrap_or(0));
                let _ = state_tx.send((it.next().unwrap_or(0), it.next().unwrap_or(0)));
            }
        }
    });
    let state = |child_in: &mut std::process::ChildStdin| -> (usize, usize) {
        let _ = writeln!(child_in, "STATE");
        state_rx.recv_timeout(EVENTUALLY).unwrap_or((0, 0))
    };

    let slow_id = next_id();
    let waiting_ids: Vec<i64> = (0..3).map(|_| next_id()).collect();
    let mut conn = env.db.connect();
    insert_order::<D>(&mut conn, slow_id, "paid");
    conn.transaction(|c| {
        for &id in &waiting_ids {
            insert_order::<D>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, job(PAID, id))?;
        }
        // A committed-at-once job whose handler hangs in the child.
        env.producer.push(job(SLOW, slow_id))?;
        wait_until(
            "the child to wait on 3 jobs and run 1 handler",
            EVENTUALLY,
            || {
                let (waiting, running) = state(&mut child_in);
                waiting >= 3 && running >= 1
            },
        );
        child.0.kill().expect("SIGKILL the worker process");
        let _ = child.0.wait();
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
    let handlers =
        handlers::<D>(&tx).register_without_barrier(SLOW, recording_handler::<D>(tx.clone()));
    let _worker = env.start_worker(handlers, 2);
    // An expired reservation counts as a failure: the job comes back after Faktory's retry
    // delay (15 to 45 s for a first retry on a real server).
    let deadline = Duration::from_secs(reserve_for + 60);
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 4 {
        let ran = rx
            .recv_timeout(deadline)
            .expect("every committed job completes after the restart");
        assert!(seen.insert(ran.order_id), "ran twice: {ran:?}");
    }
    for id in waiting_ids.iter().chain([&slow_id]) {
        wait_until("the run to commit", EVENTUALLY, || {
            runs_of(&env.db, *id) == 1
        });
    }
    wait_until("no barrier left", EVENTUALLY, || env.db.barrier_rows() == 0);
    expect_no_run(&rx, "each job ran once");
}
