//! The barrier contract, scenario by scenario. Each public function is one test body, generic
//! over the backend; `suite.rs` lists them all, and a backend's `scenario_tests!` call makes a
//! test of each.

use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::testing::JobEventKind;
use diesel_transaction_barrier::{Error, CUSTOM_KEY};

// Scenarios of their own files; unused in the binaries that make no scenario tests.
#[allow(unused_imports)]
pub use super::{
    bulk::{
        bulk_enqueue_commits, bulk_enqueue_outside_a_transaction_and_inline,
        bulk_enqueue_rolls_back, bulk_push_answer_lost_rolls_back,
        bulk_push_cut_mid_batch_and_swallowed_runs_nothing,
    },
    detached::{
        detached_duplicate_delivery_runs_once, detached_forged_descriptor_is_refused,
        detached_handler_runs_after_commit_only,
        detached_job_is_acknowledged_after_its_barrier_is_deleted,
        detached_worker_killed_before_the_deletion_runs_again,
    },
    faults::{worker_killed_mid_wait_and_mid_handler, worker_killed_with_parked_jobs},
    guarantee::{
        awkward_payloads_still_bind, failed_job_survives_broker_loss,
        forged_descriptor_cannot_steal_a_barrier, swallowed_lost_push_answer_runs_nothing,
        swallowed_push_failure_leaves_nothing,
    },
    soak::soak_with_oracle,
};

/// Scenario 1: The handler runs once, after commit, and sees the transaction's writes; while the
/// transaction is open and the worker already holds the job, it has not run.
pub fn commit_runs_after_commit<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 2);
    let id = next_id();
    let mut conn = env.db.connect();
    let mut jid = None;
    conn.transaction(|c| {
        insert_order::<D>(c, id, "new");
        jid = Some(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
        // A write after the enqueue must be visible to the handler too.
        set_status::<D>(c, id, "paid");
        worker.wait_for_waiting(1);
        expect_no_run(&rx, "the transaction is still open");
        Ok::<_, Error>(())
    })
    .unwrap();
    let ran = expect_ran_once(&env, &rx, id);
    assert_eq!(ran.jid, jid.unwrap().as_str());
    expect_acked_without_failure(&env, &ran.jid);
}

/// Enqueues in a transaction that the worker is seen waiting on, then ends it with `end`.
fn enqueue_then<D: TestDb>(
    env: &Env<D>,
    worker: &RunningWorker,
    id: i64,
    end: impl FnOnce(&mut D::Conn, i64) -> Result<(), Error>,
) -> (Result<(), Error>, String) {
    let mut conn = env.db.connect();
    let session = D::session_id(&mut conn);
    let mut jid = None;
    let result = conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        jid = Some(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
        worker.wait_for_waiting(1);
        end(c, session)
    });
    (result, jid.expect("enqueued").as_str().to_string())
}

/// Scenario 2: The closure returns `Err`: the handler never runs, the job is acknowledged as aborted.
pub fn error_rolls_back<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let (result, jid) = enqueue_then(&env, &worker, id, |_, _| {
        Err(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());
    assert_aborted(&env, &worker, &rx, id, &jid);
}

/// Scenario 3: The closure panics: the connection is dropped mid-transaction, which rolls it back.
pub fn panic_rolls_back<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let (jid_tx, jid_rx) = unbounded();
    std::thread::scope(|s| {
        let env = &env;
        let worker = &worker;
        let outcome = s
            .spawn(move || {
                let mut conn = env.db.connect();
                let _ = conn.transaction(|c| {
                    insert_order::<D>(c, id, "paid");
                    let jid = c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
                    jid_tx.send(jid.as_str().to_string()).unwrap();
                    worker.wait_for_waiting(1);
                    if id >= 0 {
                        std::panic::resume_unwind(Box::new(
                            "the application panics inside its transaction",
                        ));
                    }
                    Ok::<_, Error>(())
                });
            })
            .join();
        assert!(outcome.is_err(), "the producer thread panicked");
    });
    let jid = jid_rx.recv().unwrap();
    assert_aborted(&env, &worker, &rx, id, &jid);
}

/// Scenario 4: The producer's connection is killed mid-transaction.
pub fn killed_producer_aborts<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let (result, jid) = enqueue_then(&env, &worker, id, |_, session| {
        env.db.kill(session);
        Ok(())
    });
    assert!(result.is_err(), "the commit of a killed session fails");
    assert_aborted(&env, &worker, &rx, id, &jid);
}

/// Scenario 5a: Enqueued inside a savepoint that rolls back while the outer transaction commits.
pub fn rolled_back_savepoint_never_runs<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let mut conn = env.db.connect();
    let jid = conn
        .transaction(|c| enqueue_in_rolled_back_savepoint(&env, c, id))
        .unwrap();
    assert_aborted(&env, &worker, &rx, id, &jid);
}

/// Scenario 5b: Enqueued inside a savepoint that is released, then the outer transaction commits.
pub fn released_savepoint_runs<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        enqueue_in_released_savepoint(&env, c, id)?;
        worker.wait_for_waiting(1);
        expect_no_run(&rx, "the outer transaction is still open");
        Ok::<_, Error>(())
    })
    .unwrap();
    expect_ran_once(&env, &rx, id);
}

/// Scenario 6: Outside a transaction nothing is written and the job runs at once, even for a kind that
/// requires a barrier.
pub fn autocommit_runs_without_barrier<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let id = next_id();
    let mut conn = env.db.connect();
    insert_order::<D>(&mut conn, id, "paid");
    conn.enqueue_with_barrier(&env.producer, env.job(PAID, id))
        .unwrap();
    assert_eq!(env.db.barrier_rows(), 0, "autocommit writes no barrier row");
    let _worker = env.start_worker(handlers::<D>(&tx), 1);
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    assert_eq!(ran.seen_status.as_deref(), Some("paid"));
    // The handler reports before its transaction commits.
    wait_until("the run to commit", EVENTUALLY, || {
        runs_of(&env.db, id) >= 1
    });
    expect_no_run(&rx, "the job runs once");
    assert_eq!(runs_of(&env.db, id), 1);
}

/// Scenario 7: A barrier-required kind pushed with a plain push fails with `BarrierRequired`; a kind
/// registered without barrier runs.
pub fn barrier_required_and_opt_out<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let (required, optional) = (next_id(), next_id());
    let mut conn = env.db.connect();
    insert_order::<D>(&mut conn, required, "paid");
    insert_order::<D>(&mut conn, optional, "paid");
    let mut bare = env.job(PAID, required);
    bare.retry = Some(0);
    let bare_jid = bare.id().as_str().to_string();
    env.producer.push(bare).unwrap();
    env.producer.push(env.job(PLAIN_OK, optional)).unwrap();
    wait_until("the bare job to fail", EVENTUALLY, || {
        worker.monitor.failed() >= 1
    });
    let others = drain_with_sentinel(&env, &rx);
    assert_eq!(others.len(), 1, "only the opt-out job ran: {others:?}");
    assert_eq!(others[0].order_id, optional);
    assert_eq!(runs_of(&env.db, required), 0);
    if let Some(server) = env
        .faktory
        .server_or_skip("the failure message of a bare job")
    {
        let failure = failure_message(server, &bare_jid).expect("the bare job failed");
        assert!(
            failure.contains("requires a transaction barrier"),
            "failure message names the problem: {failure}"
        );
    }
}

/// Scenario 8: Inline mode runs the handler before `enqueue_with_barrier` returns, inside the
/// transaction, with the caller's connection.
pub fn inline_runs_at_once<D: TestDb>() {
    let db = D::create();
    let (tx, rx) = unbounded();
    let producer = Producer::inline(handlers::<D>(&tx));
    let id = next_id();
    let mut conn = db.connect();
    conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        c.enqueue_with_barrier(&producer, Job::new(PAID, vec![id]))?;
        let ran = rx
            .try_recv()
            .expect("the handler ran before enqueue returned");
        assert_eq!(ran.seen_status.as_deref(), Some("paid"));
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(db.barrier_rows(), 0);
    // A kind without a handler is an error, not a silent drop.
    let err = conn
        .enqueue_with_barrier(&producer, Job::new("unknown_kind", vec![1]))
        .unwrap_err();
    assert!(matches!(err, Error::InlineNoHandler { .. }), "{err}");
}

/// Scenario 9: A job fetched long after its transaction committed runs at once.
pub fn fetched_after_commit_runs_at_once<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let id = next_id();
    commit_order(&env, id, env.job(PAID, id));
    assert_eq!(env.db.barrier_rows(), 1);
    let started = Instant::now();
    let _worker = env.start_worker(handlers::<D>(&tx), 1);
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "no snooze or retry delay"
    );
    wait_until("the barrier row to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

/// Scenario 10: A barrier job delivered again after it succeeded does not run again.
pub fn duplicate_delivery_runs_once<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let (desc_tx, desc_rx) = unbounded();
    let handlers = Handlers::new().register(PAID, {
        let record = recording_handler::<D>(tx.clone());
        move |job: &Job, conn: &mut D::Conn| {
            let _ = desc_tx.send(job.clone());
            record(job, conn)
        }
    });
    let worker = env.start_worker(handlers, 1);
    let id = next_id();
    commit_order(&env, id, env.job(PAID, id));
    expect_run(&rx);
    let delivered: Job = desc_rx.recv().unwrap();
    assert!(delivered.custom.contains_key(CUSTOM_KEY));
    // Push the very same payload twice more: once with the same jid, once with a new one.
    let same_jid: Job = delivered.clone();
    let mut copy = Job::new(PAID, vec![id]).on_queue(env.queue.clone());
    copy.custom = delivered.custom.clone();
    env.producer.push(same_jid).unwrap();
    env.producer.push(copy).unwrap();
    wait_until("both copies to be skipped", EVENTUALLY, || {
        worker.monitor.duplicates() + worker.monitor.aborted() >= 2
    });
    let others = drain_with_sentinel(&env, &rx);
    assert!(others.is_empty(), "a duplicate ran: {others:?}");
    assert_eq!(runs_of(&env.db, id), 1);
}

/// Scenario 11: Faktory unreachable at enqueue: the error reaches the caller and the transaction rolls
/// back with nothing left.
pub fn faktory_unreachable_rolls_back<D: TestDb>() {
    let db = D::create();
    let unreachable = Producer::builder()
        .url("tcp://127.0.0.1:1")
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let id = next_id();
    let mut conn = db.connect();
    let result = conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        c.enqueue_with_barrier(&unreachable, Job::new(PAID, vec![id]))?;
        Ok::<_, Error>(())
    });
    assert!(
        matches!(
            result,
            Err(Error::Faktory(_)) | Err(Error::FaktoryTimeout(_))
        ),
        "{result:?}"
    );
    assert_eq!(db.barrier_rows(), 0);
    assert_eq!(
        D::query_i64(
            &mut conn,
            &format!("SELECT COUNT(*) FROM orders WHERE id = {id}")
        ),
        Some(0)
    );
}

/// A worker (or a producer) on a database without the barrier table gets a clear error that
/// names the migration call.
pub fn missing_migrations_are_reported<D: TestDb>() {
    let db = D::create_unmigrated();
    let faktory = TestFaktory::from_env_or_start().unwrap();
    // A pool too small for its handlers and the waiter is refused before anything else.
    let needed = 1 + D::WAITER_CONNECTIONS;
    let err = WorkerBuilder::<D::Conn>::new(db.pool(needed - 1))
        .url(faktory.url())
        .workers(1)
        .connect()
        .unwrap_err();
    assert_pool_too_small(&err, needed - 1, needed);
    let err = WorkerBuilder::<D::Conn>::new(db.pool(needed))
        .url(faktory.url())
        .workers(1)
        .connect()
        .unwrap_err();
    assert!(matches!(err, Error::MigrationsMissing { .. }), "{err}");
    assert!(err.to_string().contains("run_migrations"), "{err}");
    let producer = Producer::connect(&faktory.url()).unwrap();
    let mut conn = db.connect();
    let result = conn.transaction(|c| {
        c.enqueue_with_barrier(&producer, Job::new(PAID, vec![1]))?;
        Ok::<_, Error>(())
    });
    assert!(
        matches!(result, Err(Error::MigrationsMissing { .. })),
        "{result:?}"
    );
}

/// Scale (a) and (b): Many jobs wait on open transactions through a bounded number of database
/// connections, and a ready job still runs while they all wait.
pub fn many_waiting_jobs_hold_few_connections<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let pool = env.db.pool(8);
    let worker = env.start_worker_on(pool.clone(), handlers::<D>(&tx), |b| {
        b.workers(2).max_waiting(250)
    });
    let waiting = 200;
    let mut producer_conn = env.db.connect();
    let ids: Vec<i64> = (0..waiting).map(|_| next_id()).collect();
    let (held, ready_ran) = std::thread::scope(|s| {
        let (go_tx, go_rx) = unbounded::<()>();
        let (done_tx, done_rx) = unbounded::<()>();
        let env = &env;
        let ids = &ids;
        let conn = &mut producer_conn;
        let producer = s.spawn(move || {
            conn.transaction(|c| {
                for &id in ids {
                    insert_order::<D>(c, id, "paid");
                    c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
                }
                go_tx.send(()).unwrap();
                done_rx.recv().unwrap();
                Ok::<_, Error>(())
            })
            .unwrap();
        });
        go_rx.recv().unwrap();
        worker.wait_for_waiting(waiting);
        // Every job waits; the worker holds at most its waiter's connections.
        let state = pool.state();
        let held = state.connections - state.idle_connections;
        // A ready job is fetched and runs while all of them wait.
        let ready = next_id();
        commit_order(env, ready, env.job(PAID, ready));
        let ran = expect_run(&rx);
        assert_eq!(ran.order_id, ready, "the ready job ran first");
        assert!(worker.monitor.waiting() >= waiting, "the others still wait");
        done_tx.send(()).unwrap();
        producer.join().unwrap();
        (held, ran)
    });
    assert!(
        held <= 3,
        "the worker held {held} connections while {waiting} jobs waited"
    );
    let _ = ready_ran;
    expect_each_ran_once(&rx, &ids, EVENTUALLY);
    wait_until("all barriers consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

/// Scale (c): A job whose transaction stays open past the block limit is snoozed (not failed), and
/// runs once when the transaction finally commits.
pub fn snoozed_after_block_limit<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.workers(1).block_limit(Duration::from_millis(300))
    });
    let id = next_id();
    let mut conn = env.db.connect();
    let mut jid = None;
    conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        jid = Some(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
        wait_until("two snoozes", EVENTUALLY, || worker.monitor.snoozed() >= 2);
        expect_no_run(&rx, "the transaction is still open");
        Ok::<_, Error>(())
    })
    .unwrap();
    expect_ran_once(&env, &rx, id);
    assert_eq!(worker.monitor.timed_out(), 0);
    if let Some(server) = env.faktory.server_or_skip("the snoozed job's history") {
        let events = server.history(jid.unwrap().as_str());
        assert!(
            events.iter().any(|e| e.kind() == JobEventKind::Acked)
                && !events.iter().any(|e| e.kind() == JobEventKind::Failed),
            "the first delivery was snoozed, not failed: {events:?}"
        );
    }
}

/// Scale (c): Past the deadline the job fails with `BarrierTimeout`, whose message carries the debug
/// information (`TestDb::TIMEOUT_DEBUG_INFO`: what the backend's message must contain); nothing
/// runs.
pub fn barrier_timeout_after_deadline<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.workers(1)
            .block_limit(Duration::from_millis(200))
            .deadline(Duration::from_millis(800))
    });
    let id = next_id();
    let mut conn = env.db.connect();
    let mut job = env.job(PAID, id);
    job.retry = Some(1);
    let result = conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        c.enqueue_with_barrier(&env.producer, job)?;
        wait_until("the barrier to time out", EVENTUALLY, || {
            worker.monitor.timed_out() >= 1
        });
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());
    expect_no_run(&rx, "timed out");
    if let Some(server) = env
        .faktory
        .server_or_skip("the barrier timeout's failure message")
    {
        let failed = server.wait_for(|s| !s.retry_jobs().is_empty(), EVENTUALLY);
        assert!(failed, "the job failed and waits for its retry");
        let job = &server.retry_jobs()[0];
        let message = job["failure"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains("still open"), "{message}");
        for part in D::TIMEOUT_DEBUG_INFO {
            assert!(
                message.contains(part),
                "the message carries the debug info ({part}): {message}"
            );
        }
    }
}

/// Scale (d): The reaper deletes barrier rows that can no longer be consumed, and only those.
pub fn reaper_deletes_old_barriers<D: TestDb>() {
    let env = Env::<D>::new();
    let id = next_id();
    // A committed barrier whose job nobody will ever fetch (its queue has no worker).
    commit_order(
        &env,
        id,
        env.job(PAID, id).on_queue(format!("{}-nobody", env.queue)),
    );
    assert_eq!(env.db.barrier_rows(), 1);
    let mut conn = env.db.connect();
    let kept =
        diesel_transaction_barrier::reap_barriers(&mut conn, Duration::from_secs(3600)).unwrap();
    assert_eq!(kept, 0, "a young barrier is kept");
    assert_eq!(env.db.barrier_rows(), 1);
    std::thread::sleep(Duration::from_millis(1100));
    let reaped =
        diesel_transaction_barrier::reap_barriers(&mut conn, Duration::from_secs(1)).unwrap();
    assert_eq!(reaped, 1);
    assert_eq!(env.db.barrier_rows(), 0);

    // The worker's own reaper does the same periodically.
    let id = next_id();
    commit_order(
        &env,
        id,
        env.job(PAID, id).on_queue(format!("{}-nobody", env.queue)),
    );
    let (tx, _rx) = unbounded();
    let _worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.reap_interval(Duration::from_millis(100))
            .max_barrier_age(Duration::from_secs(1))
    });
    wait_until("the worker's reaper", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

/// Scale (e): A graceful shutdown hands waiting jobs back at once; after a restart every committed
/// job runs exactly once.
pub fn graceful_shutdown_loses_nothing<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let mut worker = env.start_worker(handlers::<D>(&tx), 2);
    let mut conn = env.db.connect();
    let ids: Vec<i64> = (0..5).map(|_| next_id()).collect();
    conn.transaction(|c| {
        for &id in &ids {
            insert_order::<D>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        }
        worker.wait_for_waiting(ids.len());
        let started = Instant::now();
        let reason = worker.stop();
        assert_eq!(reason, StopReason::Shutdown);
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "shutdown took {:?}",
            started.elapsed()
        );
        Ok::<_, Error>(())
    })
    .unwrap();
    expect_no_run(&rx, "the worker is stopped");
    let _worker = env.start_worker(handlers::<D>(&tx), 2);
    expect_each_ran_once(&rx, &ids, EVENTUALLY);
    assert!(drain_with_sentinel(&env, &rx).is_empty());
    wait_until("all barriers consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

/// Hostile or broken barrier descriptors fail their job with a clear `MalformedBarrier` (or,
/// for a well-formed id with no row, count as never committed); a panicking handler fails its
/// job; the worker keeps serving throughout.
pub fn bad_input_fails_cleanly<D: TestDb>() {
    use serde_json::json;
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let panicking = "panicking_kind";
    let handlers = handlers::<D>(&tx).register_without_barrier(
        panicking,
        |_job: &Job, _conn: &mut D::Conn| -> Result<(), std::io::Error> {
            panic!("the handler blew up")
        },
    );
    let worker = env.start_worker(handlers, 2);
    let id = uuid::Uuid::new_v4().to_string();
    let huge = "x".repeat(1 << 20);
    let malformed = vec![
        json!("not an object"),
        json!({"v": 1, "backend": "postgres"}),
        json!({"v": 1, "id": id}),
        json!({"v": 1, "backend": 7, "id": id}),
        json!({"v": 1, "backend": "postgres", "id": "not-a-uuid"}),
        json!({"v": 1, "backend": "postgres", "id": id, "txid": "1; DROP TABLE orders"}),
        json!({"v": 1, "backend": "oracle", "id": id}),
        json!({"v": 1, "backend": huge, "id": id}),
        json!({"v": 99, "backend": "postgres", "id": id}),
    ];
    let mut jids = Vec::new();
    for (i, d) in malformed.into_iter().enumerate() {
        let mut job = env.job(PAID, next_id());
        job.retry = Some(0);
        job.custom.insert(CUSTOM_KEY.to_string(), d);
        jids.push((i, job.id().as_str().to_string()));
        env.producer.push(job).unwrap();
    }
    // A well-formed descriptor whose barrier row does not exist: never committed.
    let mut forged = env.job(PAID, next_id());
    forged.custom.insert(
        CUSTOM_KEY.to_string(),
        json!({"v": 1, "backend": <D::Conn as BarrierConnection>::backend_name(), "id": uuid::Uuid::new_v4().to_string(), "txid": "12345"}),
    );
    env.producer.push(forged).unwrap();
    let mut boom = env.job(panicking, next_id());
    boom.retry = Some(0);
    let boom_jid = boom.id().as_str().to_string();
    env.producer.push(boom).unwrap();

    let bad = jids.len() as u64;
    wait_until(
        "the malformed and panicking jobs to fail",
        EVENTUALLY,
        || worker.monitor.failed() > bad,
    );
    wait_until("the forged barrier to count as aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= 1
    });
    // The worker still serves.
    let others = drain_with_sentinel(&env, &rx);
    assert!(others.is_empty(), "nothing else ran: {others:?}");
    if let Some(server) = env
        .faktory
        .server_or_skip("the failure messages of malformed and panicking jobs")
    {
        for (i, jid) in &jids {
            assert!(server.wait_until_history(jid, JobEventKind::Failed, EVENTUALLY));
            let message = failure_message(server, jid).unwrap();
            assert!(
                message.contains("malformed barrier"),
                "descriptor #{i}: {message}"
            );
            assert!(
                message.len() < 600,
                "the message stays short: {}",
                message.len()
            );
        }
        assert!(server.wait_until_history(&boom_jid, JobEventKind::Failed, EVENTUALLY));
        let message = failure_message(server, &boom_jid).unwrap();
        assert!(message.contains("the handler blew up"), "{message}");
    }
}

/// Broker loss: the job is committed but the Faktory that held it loses it (here: the server
/// it was pushed to goes away, as a Faktory restarted without persistence does). The worker's
/// reconciler pushes it again; the handler runs exactly once.
pub fn broker_loss_is_reconciled<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let id = next_id();
    {
        let doomed = diesel_transaction_barrier::testing::TestServer::start().unwrap();
        let producer = Producer::connect(&doomed.url()).unwrap();
        let mut conn = env.db.connect();
        conn.transaction(|c| {
            insert_order::<D>(c, id, "paid");
            c.enqueue_with_barrier(&producer, env.job(PAID, id))?;
            Ok::<_, Error>(())
        })
        .unwrap();
        assert_eq!(doomed.queue_size(&env.queue), 1);
        drop(producer);
        doomed.shutdown(); // and with it the job
    }
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.reconcile_grace(Some(Duration::from_millis(400)))
    });
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    assert_eq!(ran.seen_status.as_deref(), Some("paid"));
    wait_until("the barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    // Nothing else comes: the reconciler does not push a consumed barrier again.
    expect_no_run(&rx, "the barrier is consumed");
    assert_eq!(runs_of(&env.db, id), 1);
    assert_eq!(worker.monitor.ran(), 1);
}

/// A barrier job merely waiting in a long backlog is pushed again at most once per grace
/// period, and still runs once.
pub fn backlog_is_repushed_at_most_once_per_grace<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let backlog = format!("{}-backlog", env.queue);
    let id = next_id();
    commit_order(&env, id, env.job(PAID, id).on_queue(backlog.clone()));
    let grace = Duration::from_millis(500);
    // A worker on another queue runs the reconciler over the whole barrier table.
    let started = Instant::now();
    let reconciler = env.start_worker_with(handlers::<D>(&tx), |b| b.reconcile_grace(Some(grace)));
    std::thread::sleep(Duration::from_millis(1800));
    drop(reconciler);
    let elapsed = started.elapsed();
    let copies = env
        .faktory
        .server_or_skip("the count of the backlog job's copies")
        .map(|server| {
            let copies = server.queue_size(&backlog);
            let bound = (elapsed.as_millis() / grace.as_millis()) as usize + 1;
            assert!(
                copies >= 2,
                "the backlog job was pushed again ({copies} copies)"
            );
            assert!(
                copies <= bound,
                "{copies} copies in {elapsed:?}: more than one per grace period"
            );
            copies
        });
    // A consumer for the backlog: one copy runs, the others are duplicates.
    let mut consumer = env
        .db
        .configure_worker(WorkerBuilder::new(env.db.pool(16)))
        .handlers(handlers::<D>(&tx))
        .url(env.faktory.url())
        .reconcile_grace(None)
        .connect()
        .unwrap();
    let handle = consumer.shutdown_handle();
    let monitor = consumer.monitor();
    let q = backlog.clone();
    let thread = std::thread::spawn(move || consumer.run(&[q]).unwrap());
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    if let Some(copies) = copies {
        wait_until("every copy to be processed", EVENTUALLY, || {
            monitor.ran() + monitor.duplicates() + monitor.aborted() >= copies as u64
        });
    }
    expect_no_run(&rx, "only one copy runs");
    assert_eq!(runs_of(&env.db, id), 1);
    handle.shutdown();
    let _ = thread.join();
}

/// The waiter's database connections are killed mid-wait: the worker reconnects and resolves
/// both barriers correctly (one transaction commits, the other rolls back).
pub fn waiter_connections_killed_mid_wait<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let (commit_id, abort_id) = (next_id(), next_id());
    let mut committer = env.db.connect();
    let mut aborter = env.db.connect();
    let mut killed = None;
    committer
        .transaction(|c1| {
            insert_order::<D>(c1, commit_id, "paid");
            c1.enqueue_with_barrier(&env.producer, env.job(PAID, commit_id))?;
            let r = aborter.transaction(|c2| {
                insert_order::<D>(c2, abort_id, "paid");
                c2.enqueue_with_barrier(&env.producer, env.job(PAID, abort_id))?;
                worker.wait_for_waiting(2);
                // Let the waiter look at both at least once, then cut it off.
                std::thread::sleep(Duration::from_millis(300));
                killed = env.db.kill_waiter_sessions();
                Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
            });
            assert!(r.is_err());
            Ok::<_, Error>(())
        })
        .unwrap();
    match killed {
        Some(n) => assert!(n >= 1, "the waiter's sessions were found and killed"),
        None => {
            eprintln!("this backend has no server sessions to kill: only the outcome is checked")
        }
    }
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, commit_id);
    wait_until("the rolled-back job to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= 1
    });
    let others = drain_with_sentinel(&env, &rx);
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(runs_of(&env.db, abort_id), 0);
    assert_eq!(env.db.barrier_rows(), 0);
}

/// Faktory goes away while the worker runs and comes back on the same address: the worker
/// reconnects and resumes. Needs a server it can stop: always the in-process one.
pub fn faktory_restart_while_worker_runs<D: TestDb>() {
    use diesel_transaction_barrier::testing::{TestFaktory, TestServer};
    let server = TestServer::start().unwrap();
    let addr = server.addr();
    let env = Env::<D>::with_db_and_faktory(D::create(), TestFaktory::local(server));
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let first = next_id();
    commit_order(&env, first, env.job(PAID, first));
    assert_eq!(expect_run(&rx).order_id, first);
    // Down.
    let Env {
        db,
        faktory,
        queue,
        producer,
    } = env;
    drop(faktory);
    std::thread::sleep(Duration::from_millis(500));
    // Up again, empty, on the same port.
    let server = TestServer::builder().bind(addr).start().unwrap();
    let env = Env {
        db,
        faktory: TestFaktory::local(server),
        queue,
        producer,
    };
    let second = next_id();
    commit_order(&env, second, env.job(PAID, second));
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, second, "the worker reconnected and resumed");
    drop(worker);
}

/// A transaction Diesel did not open (a `BEGIN` sent as SQL) is a transaction all the same:
/// the job waits for it, and never runs once it rolls back.
pub fn manual_transaction_rolled_back_never_runs<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let mut conn = env.db.connect();
    D::exec(&mut conn, "BEGIN");
    insert_order::<D>(&mut conn, id, "paid");
    let jid = conn
        .enqueue_with_barrier(&env.producer, env.job(PAID, id))
        .expect("enqueued");
    worker.wait_for_waiting(1);
    expect_no_run(&rx, "the manual transaction is still open");
    D::exec(&mut conn, "ROLLBACK");
    assert_aborted(&env, &worker, &rx, id, jid.as_str());
}

/// The job of a transaction Diesel did not open runs once it commits, and sees its writes.
pub fn manual_transaction_committed_runs_after_commit<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let mut conn = env.db.connect();
    D::exec(&mut conn, "BEGIN");
    insert_order::<D>(&mut conn, id, "new");
    conn.enqueue_with_barrier(&env.producer, env.job(PAID, id))
        .expect("enqueued");
    set_status::<D>(&mut conn, id, "paid");
    worker.wait_for_waiting(1);
    expect_no_run(&rx, "the manual transaction is still open");
    D::exec(&mut conn, "COMMIT");
    expect_ran_once(&env, &rx, id);
}

/// A pooled connection given back inside a transaction Diesel did not open passes the pool's
/// health check (which asks Diesel); enqueueing on it later still waits for that transaction.
pub fn pooled_connection_left_in_a_transaction<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    let pool = env.db.pool(1);
    let id = next_id();
    {
        let mut conn = pool.get().expect("a connection");
        D::exec(&mut conn, "BEGIN");
        insert_order::<D>(&mut conn, id, "paid");
    }
    let mut conn = pool.get().expect("the pool hands the connection out again");
    let jid = conn
        .enqueue_with_barrier(&env.producer, env.job(PAID, id))
        .expect("enqueued");
    worker.wait_for_waiting(1);
    expect_no_run(&rx, "the leftover transaction is still open");
    D::exec(&mut conn, "ROLLBACK");
    assert_aborted(&env, &worker, &rx, id, jid.as_str());
}

/// A worker that reads another barrier table than the producer wrote to (another database, or
/// another PostgreSQL schema through a different `search_path`) cannot see the row: it fails
/// the job, which stays in Faktory's hands, instead of taking the invisible row for a rollback.
pub fn barrier_in_another_table_is_refused<D: TestDb>() {
    let env = Env::<D>::new();
    let elsewhere = D::create();
    let (tx, rx) = unbounded();
    let id = next_id();
    let mut job = env.job(PAID, id);
    job.retry = Some(0);
    let jid = job.id().as_str().to_string();
    commit_order(&env, id, job);
    let wrong = env.start_worker_on(
        elsewhere.pool(1 + D::WAITER_CONNECTIONS),
        handlers::<D>(&tx),
        |b| b.workers(1),
    );
    wait_until("the job to fail", EVENTUALLY, || {
        wrong.monitor.failed() >= 1
    });
    assert_eq!(wrong.monitor.aborted(), 0, "never taken for a rollback");
    expect_no_run(&rx, "the worker cannot see the barrier");
    drop(wrong);
    assert_eq!(
        env.db.barrier_rows(),
        1,
        "the committed barrier is still there"
    );
    if let Some(server) = env
        .faktory
        .server_or_skip("the failure message of a barrier in another table")
    {
        assert!(server.wait_until_history(&jid, JobEventKind::Failed, EVENTUALLY));
        let message = failure_message(server, &jid).expect("a failure");
        assert!(message.contains("search_path"), "{message}");
    }
}

/// A statement that failed inside a savepoint, rolled back with the savepoint, leaves the
/// outer transaction usable: enqueueing in it afterwards works, and the job runs after commit.
pub fn enqueue_after_a_failed_savepoint<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<D>(&tx), 1);
    let id = next_id();
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        let failed = c.transaction(|c| D::try_exec(c, "INSERT INTO no_such_table VALUES (1)"));
        assert!(failed.is_err());
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        Ok::<_, Error>(())
    })
    .expect("the transaction commits");
    assert_eq!(expect_run(&rx).order_id, id);
    assert!(drain_with_sentinel(&env, &rx).is_empty());
    assert_eq!(env.db.barrier_rows(), 0);
}

/// A handler that recovers from a failed statement by rolling back a savepoint of its own
/// still holds its transaction: it is reported as run, and its writes commit.
pub fn handler_recovering_from_a_failed_savepoint_runs<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let record = recording_handler::<D>(tx);
    let handlers = Handlers::new().register(PAID, move |job: &Job, c: &mut D::Conn| {
        let failed = c.transaction(|c| D::try_exec(c, "INSERT INTO no_such_table VALUES (1)"));
        assert!(failed.is_err());
        record(job, c)
    });
    let worker = env.start_worker(handlers, 1);
    let id = next_id();
    commit_order(&env, id, env.job(PAID, id));
    assert_eq!(expect_run(&rx).order_id, id);
    wait_until("the run to commit", EVENTUALLY, || {
        runs_of(&env.db, id) == 1
    });
    wait_until("the run to be counted", EVENTUALLY, || {
        worker.monitor.ran() == 1
    });
    assert_eq!(worker.monitor.failed(), 0);
    assert_eq!(env.db.barrier_rows(), 0);
}

/// The worker keeps its handlers' connections from one job to the next. One of them dies
/// between two jobs (its server session killed, as a database restart would): the next job
/// still runs, on a fresh connection, and no delivery fails.
pub fn a_dead_kept_connection_fails_no_job<D: TestDb>() {
    if !D::HAS_SESSIONS {
        eprintln!("this backend has no server sessions to kill");
        return;
    }
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let (session_tx, session_rx) = unbounded();
    let handlers = Handlers::new().register(PAID, {
        let record = recording_handler::<D>(tx.clone());
        move |job: &Job, conn: &mut D::Conn| {
            let _ = session_tx.send(D::session_id(conn));
            record(job, conn)
        }
    });
    let worker = env.start_worker(handlers, 1);
    let (first, second) = (next_id(), next_id());
    commit_order(&env, first, env.job(PAID, first));
    assert_eq!(expect_run(&rx).order_id, first);
    let session = session_rx.recv_timeout(EVENTUALLY).unwrap();
    wait_until("the first run to commit", EVENTUALLY, || {
        runs_of(&env.db, first) == 1
    });
    env.db.kill(session);
    commit_order(&env, second, env.job(PAID, second));
    assert_eq!(expect_run(&rx).order_id, second);
    let again = session_rx.recv_timeout(EVENTUALLY).unwrap();
    assert_ne!(again, session, "a fresh connection");
    wait_until("the second run to commit", EVENTUALLY, || {
        runs_of(&env.db, second) == 1
    });
    wait_until("the second run to be counted", EVENTUALLY, || {
        worker.monitor.ran() == 2
    });
    assert_eq!(worker.monitor.failed(), 0, "no delivery failed");
}
