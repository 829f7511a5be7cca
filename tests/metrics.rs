//! The worker's metrics (feature `metrics`), seen by a recorder during one worker run against
//! PostgreSQL (`PG_DATABASE_URL`) and Faktory (`FAKTORY_URL`, else the in-process test server):
//! a job whose transaction stays open for a while and then commits, one that rolls back, one
//! that commits at once, and a reaped barrier.
//!
//! The worker records from several threads of its own, so the recorder is the global one; it
//! can be set once per process, so the whole run is one test.
#![cfg(all(feature = "metrics", feature = "postgres", feature = "testing"))]

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel_transaction_barrier::metrics::*;
use diesel_transaction_barrier::testing::{PgTestSchema, TestDatabase, TestFaktory};
use diesel_transaction_barrier::{
    reap_barriers, EnqueueWithBarrier, Error, Job, Producer, WorkerBuilder, WorkerMonitor,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const EVENTUALLY: Duration = Duration::from_secs(20);
const KIND: &str = "measured";

/// Everything recorded so far. A snapshot takes the values out of the recorder (counters and
/// gauges are swapped to zero, histograms cleared), so the totals add every snapshot up; for a
/// gauge that is its current value, as the worker only ever moves its gauges up and down.
#[derive(Default, Debug)]
struct Totals {
    counters: BTreeMap<String, u64>,
    gauges: BTreeMap<String, f64>,
    histograms: BTreeMap<String, Vec<f64>>,
    descriptions: BTreeMap<String, String>,
}

impl Totals {
    fn add(&mut self, snapshotter: &Snapshotter) {
        for (key, _unit, description, value) in snapshotter.snapshot().into_vec() {
            let (kind, key) = key.into_parts();
            let mut name = key.name().to_string();
            if let Some(d) = description {
                self.descriptions.insert(name.clone(), d.to_string());
            }
            for label in key.labels() {
                name.push_str(&format!("{{{}={}}}", label.key(), label.value()));
            }
            match (kind, value) {
                (MetricKind::Counter, DebugValue::Counter(n)) => {
                    *self.counters.entry(name).or_default() += n
                }
                (MetricKind::Gauge, DebugValue::Gauge(v)) => {
                    *self.gauges.entry(name).or_default() += v.into_inner()
                }
                (MetricKind::Histogram, DebugValue::Histogram(samples)) => self
                    .histograms
                    .entry(name)
                    .or_default()
                    .extend(samples.into_iter().map(|s| s.into_inner())),
                other => panic!("unexpected metric {name}: {other:?}"),
            }
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    fn gauge(&self, name: &str) -> f64 {
        self.gauges.get(name).copied().unwrap_or(0.0)
    }

    fn samples(&self, verdict: &str) -> &[f64] {
        self.histograms
            .get(&format!(
                "{BARRIER_WAIT_SECONDS}{{{VERDICT_LABEL}={verdict}}}"
            ))
            .map_or(&[], Vec::as_slice)
    }
}

fn wait_for(what: &str, monitor: &WorkerMonitor, cond: impl Fn(&WorkerMonitor) -> bool) {
    let start = Instant::now();
    while !cond(monitor) {
        assert!(start.elapsed() < EVENTUALLY, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn worker_metrics_reach_the_recorder() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only global recorder");
    let mut totals = Totals::default();

    let db = PgTestSchema::create();
    let faktory = TestFaktory::from_env_or_start().expect("faktory");
    let queue = faktory.unique_queue("measured");
    let producer = Producer::connect(&faktory.url()).expect("producer");
    let job = |n: i64| Job::new(KIND, vec![n]).on_queue(queue.clone());

    let mut worker = WorkerBuilder::new(db.pool(6))
        .url(faktory.url())
        .workers(1)
        .reconcile_grace(None)
        .reap_interval(Duration::ZERO)
        .register(KIND, |_: &Job, _: &mut PgConnection| Ok::<(), Error>(()))
        .connect()
        .expect("worker");
    let monitor = worker.monitor();
    let shutdown = worker.shutdown_handle();
    let worker_queue = queue.clone();
    let thread = std::thread::spawn(move || worker.run(&[worker_queue]).expect("worker runs"));

    // 1. A transaction that stays open while its job waits, then commits.
    let mut conn = db.connect();
    // From when the job was seen waiting to the commit: its wait lasted at least this long.
    let held = conn
        .transaction(|c| {
            c.enqueue_with_barrier(&producer, job(1))?;
            wait_for("the job to wait", &monitor, |m| m.waiting() == 1);
            let seen = Instant::now();
            totals.add(&snapshotter);
            Ok::<_, Error>(seen.elapsed())
        })
        .expect("commit");
    assert_eq!(totals.gauge(JOBS_WAITING), 1.0, "{totals:#?}");
    wait_for("the first run", &monitor, |m| m.ran() == 1);

    // 2. A rolled-back transaction: aborted.
    let result = conn.transaction(|c| {
        c.enqueue_with_barrier(&producer, job(2))?;
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());
    wait_for("the abort", &monitor, |m| m.aborted() == 1);

    // 3. A transaction that commits at once.
    conn.transaction(|c| c.enqueue_with_barrier(&producer, job(3)))
        .expect("commit");
    wait_for("the second run", &monitor, |m| m.ran() == 2);

    shutdown.shutdown();
    thread.join().expect("worker thread");

    // 4. The reaper, called directly, on a barrier whose job nobody takes.
    conn.transaction(|c| {
        c.enqueue_with_barrier(&producer, job(4).on_queue(format!("{queue}-nobody")))
    })
    .expect("commit");
    assert_eq!(reap_barriers(&mut conn, Duration::ZERO).expect("reap"), 1);

    totals.add(&snapshotter);
    assert_eq!(monitor.processed(), 3);
    assert_eq!(totals.counter(JOBS_RAN), 2, "{totals:#?}");
    assert_eq!(totals.counter(JOBS_ABORTED), 1, "{totals:#?}");
    assert_eq!(totals.counter(JOBS_PROCESSED), 3, "{totals:#?}");
    assert_eq!(totals.counter(JOBS_FAILED), 0, "{totals:#?}");
    assert_eq!(totals.counter(JOBS_DUPLICATE), 0, "{totals:#?}");
    assert_eq!(totals.counter(BARRIERS_REAPED), 1, "{totals:#?}");
    assert_eq!(
        totals.counter(JOBS_SNOOZED),
        monitor.snoozed(),
        "{totals:#?}"
    );
    // Every gauge is back to zero, and the running one was used.
    assert_eq!(totals.gauge(JOBS_WAITING), 0.0, "{totals:#?}");
    assert_eq!(totals.gauge(HANDLERS_RUNNING), 0.0, "{totals:#?}");
    assert!(totals.gauges.contains_key(HANDLERS_RUNNING), "{totals:#?}");
    // One wait per delivery, by verdict; the first one lasted while its transaction was open.
    let committed = totals.samples("committed");
    assert_eq!(committed.len(), 2, "{totals:#?}");
    assert!(committed.iter().all(|s| s.is_finite() && *s >= 0.0));
    let longest = committed.iter().copied().fold(0.0, f64::max);
    assert!(longest >= held.as_secs_f64(), "{committed:?} {held:?}");
    assert_eq!(totals.samples("not_committed").len(), 1, "{totals:#?}");
    assert!(
        totals.descriptions.contains_key(JOBS_RAN),
        "the metrics are described: {totals:#?}"
    );
}
