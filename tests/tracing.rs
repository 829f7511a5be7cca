//! The crate's key `tracing` events, captured by a small `Layer` during one worker run against
//! PostgreSQL (`PG_DATABASE_URL`) and Faktory (`FAKTORY_URL`, else the in-process test server):
//! enqueue, the end of a barrier wait, handler run, abort, snooze, timeout and reaper.
//!
//! A subscriber set as the global default sees the events of every thread (the worker runs
//! on several); it can be set once per process, so the whole run is one test.
#![cfg(all(feature = "postgres", feature = "testing"))]

use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel_transaction_barrier::testing::{PgTestSchema, TestDatabase, TestFaktory};
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Job, Producer, WorkerBuilder};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tracing::field::{Field, Visit};
use tracing::{Level, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// How long the test waits for an event that must come.
const EVENTUALLY: Duration = Duration::from_secs(20);

/// One event as the layer saw it.
#[derive(Debug, Clone)]
struct Captured {
    level: Level,
    target: String,
    message: String,
    fields: BTreeMap<String, String>,
}

impl Captured {
    fn field(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("event {:?} has no field {name}: {self:?}", self.message))
    }
}

/// Records every event, and wakes whoever waits for one.
#[derive(Clone, Default)]
struct Capture {
    inner: Arc<(Mutex<Vec<Captured>>, Condvar)>,
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = BTreeMap::new();
        event.record(&mut Fields(&mut fields));
        let captured = Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            message: fields.remove("message").unwrap_or_default(),
            fields,
        };
        let (events, changed) = &*self.inner;
        events.lock().unwrap().push(captured);
        changed.notify_all();
    }
}

impl Capture {
    /// Waits for the first event with this message whose fields satisfy `pred`.
    fn wait_for(&self, message: &str, pred: impl Fn(&Captured) -> bool) -> Captured {
        let deadline = Instant::now() + EVENTUALLY;
        let (events, changed) = &*self.inner;
        let mut events = events.lock().unwrap();
        loop {
            if let Some(e) = events.iter().find(|e| e.message == message && pred(e)) {
                return e.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no event {message:?} came; saw: {:#?}",
                events.iter().map(|e| &e.message).collect::<Vec<_>>()
            );
            events = changed.wait_timeout(events, deadline - now).unwrap().0;
        }
    }

    fn all(&self, message: &str, pred: impl Fn(&Captured) -> bool) -> Vec<Captured> {
        let events = self.inner.0.lock().unwrap();
        events
            .iter()
            .filter(|e| e.message == message && pred(e))
            .cloned()
            .collect()
    }
}

const KIND: &str = "traced";

#[test]
fn key_events_of_one_worker_run() {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(
        capture
            .clone()
            .with_filter(Targets::new().with_target("diesel_transaction_barrier", Level::TRACE)),
    );
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");

    let db = PgTestSchema::create();
    let faktory = TestFaktory::from_env_or_start().expect("faktory");
    let queue = faktory.unique_queue("traced");
    let producer = Producer::connect(&faktory.url()).expect("producer");
    let job = |n: i64| Job::new(KIND, vec![n]).on_queue(queue.clone());
    let enqueued = |jid: &str| capture.wait_for("enqueued with barrier", |e| e.field("jid") == jid);

    // A committed barrier whose job no worker takes (its queue has none), aged past the
    // worker's max_barrier_age below: the reaper's prey.
    let mut conn = db.connect();
    let stale_jid = conn
        .transaction(|c| {
            c.enqueue_with_barrier(&producer, job(0).on_queue(format!("{queue}-nobody")))
        })
        .expect("commit");
    diesel::sql_query("UPDATE dtb_barriers SET created_at = created_at - interval '2 days'")
        .execute(&mut conn)
        .expect("age the barrier");
    let stale = enqueued(stale_jid.as_str());

    let mut worker = WorkerBuilder::new(db.pool(6))
        .url(faktory.url())
        .workers(1)
        .block_limit(Duration::from_millis(200))
        .deadline(Duration::from_millis(1500))
        .reap_interval(Duration::from_millis(100))
        .max_barrier_age(Duration::from_secs(24 * 60 * 60))
        .register(KIND, |_: &Job, _: &mut PgConnection| Ok::<(), Error>(()))
        .connect()
        .expect("worker");
    let shutdown = worker.shutdown_handle();
    let worker_queue = queue.clone();
    let thread = std::thread::spawn(move || worker.run(&[worker_queue]).expect("worker runs"));
    capture.wait_for("worker starting", |_| true);

    // 1. Enqueue, commit, run.
    let jid = conn
        .transaction(|c| c.enqueue_with_barrier(&producer, job(1)))
        .expect("commit");
    let e = enqueued(jid.as_str());
    assert_eq!(e.level, Level::DEBUG);
    assert_eq!(e.target, "diesel_transaction_barrier::enqueue");
    assert_eq!(e.field("kind"), KIND);
    let committed_barrier = e.field("barrier_id").to_string();
    assert_eq!(committed_barrier.len(), 36, "a UUID: {committed_barrier}");
    let e = capture.wait_for("barrier wait ended", |e| e.field("jid") == jid.as_str());
    assert_eq!(e.level, Level::DEBUG);
    assert_eq!(e.field("barrier_id"), committed_barrier);
    assert_eq!(e.field("kind"), KIND);
    // Bound: the check also found the barrier to be this job's.
    assert!(matches!(e.field("answer"), "Committed" | "Bound"), "{e:?}");
    assert!(!e.field("waited").is_empty());
    capture.wait_for("handler ran; barrier consumed", |e| {
        e.field("barrier_id") == committed_barrier && e.field("jid") == jid.as_str()
    });

    // 2. Enqueue, roll back: the job is aborted.
    let mut rolled_back = None;
    let result = conn.transaction(|c| {
        rolled_back = Some(c.enqueue_with_barrier(&producer, job(2))?);
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());
    let rolled_back = rolled_back.expect("enqueued");
    let aborted_barrier = enqueued(rolled_back.as_str())
        .field("barrier_id")
        .to_string();
    // The worker may look before the rollback, and reach the block limit before it looks
    // again: then the job is snoozed, and the copy it was handed back as is the one aborted.
    let e = capture.wait_for(
        "transaction did not commit (or the barrier was already consumed): job aborted",
        |e| e.field("barrier_id") == aborted_barrier,
    );
    assert_eq!(e.level, Level::INFO);
    let aborted_jid = e.field("jid").to_string();
    let mut copy = aborted_jid.clone();
    while copy != rolled_back.as_str() {
        let snoozed = capture.all("job snoozed", |s| s.field("new_jid") == copy);
        assert_eq!(
            snoozed.len(),
            1,
            "job {aborted_jid} is the rolled-back job {} or a copy of it",
            rolled_back.as_str()
        );
        assert_eq!(
            snoozed[0].field("barrier_id"),
            format!("Some({aborted_barrier})")
        );
        copy = snoozed[0].field("jid").to_string();
    }
    let e = capture.wait_for("barrier wait ended", |e| e.field("jid") == aborted_jid);
    assert!(e.field("answer").contains("NotCommitted"), "{e:?}");

    // 3. A transaction that stays open: snoozed at each block limit, then timed out at the
    // deadline.
    let mut open_job = job(3);
    open_job.retry = Some(0);
    let result = conn.transaction(|c| {
        let jid = c.enqueue_with_barrier(&producer, open_job)?;
        let barrier = enqueued(jid.as_str()).field("barrier_id").to_string();
        let e = capture.wait_for("job snoozed", |e| e.field("jid") == jid.as_str());
        assert_eq!(e.level, Level::INFO);
        assert_eq!(e.field("reason"), "block limit reached");
        assert_eq!(e.field("barrier_id"), format!("Some({barrier})"));
        assert_eq!(e.field("snoozes"), "1");
        assert_ne!(e.field("new_jid"), jid.as_str());
        let e = capture.wait_for("barrier wait ended", |e| {
            e.field("barrier_id") == barrier && e.field("answer").contains("Pending")
        });
        assert!(!e.field("waited").is_empty());
        let e = capture.wait_for("barrier timed out", |e| e.field("barrier_id") == barrier);
        assert_eq!(e.level, Level::WARN);
        assert_eq!(e.field("kind"), KIND);
        assert!(e.field("info").contains("still open"), "{e:?}");
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());

    // 4. The reaper deleted the aged barrier, and only that one.
    let stale_barrier = stale.field("barrier_id").to_string();
    let e = capture.wait_for("reaped a barrier that was never consumed", |e| {
        e.field("barrier_id") == stale_barrier
    });
    assert_eq!(e.level, Level::WARN);
    assert_eq!(e.target, "diesel_transaction_barrier::maintenance::reaper");
    assert_eq!(e.field("jid"), stale_jid.as_str());
    assert_eq!(e.field("kind"), KIND);
    assert_eq!(
        capture
            .all("reaped a barrier that was never consumed", |_| true)
            .len(),
        1
    );

    // 5. Outside a transaction there is no barrier.
    let plain = conn
        .enqueue_with_barrier(&producer, job(4))
        .expect("enqueue");
    let e = capture.wait_for("enqueued outside a transaction: no barrier", |e| {
        e.field("jid") == plain.as_str()
    });
    assert!(!e.fields.contains_key("barrier_id"));
    capture.wait_for("handler ran (no barrier)", |e| {
        e.field("jid") == plain.as_str()
    });

    shutdown.shutdown();
    thread.join().expect("worker thread");
    capture.wait_for("worker drained", |_| true);
    drop(db);
}
