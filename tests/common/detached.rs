//! Handlers that take no connection (`register_without_connection`): they run after the
//! commit and never after a rollback, like any other; their barriers are deleted in batches and
//! each job is acknowledged only once its barrier's deletion committed; a job whose barrier is
//! another job's is refused; one process never runs two deliveries of one job at once; and a
//! worker killed between the handler's end and the deletion's commit runs the job again.

use super::faults::{faktory_with_short_reservations, reserved_job, WorkerProcess, DETACHED};
use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::testing::JobEventKind;
use diesel_transaction_barrier::BarrierConnection;
use diesel_transaction_barrier::{Error, CUSTOM_KEY};
use std::sync::{Arc, Mutex};

/// A handler without a connection that reports each run on `tx` (it sees no database).
fn detached_handlers<D: TestDb>(tx: &Sender<Ran>) -> Handlers<D::Conn> {
    let tx = tx.clone();
    Handlers::new().register_without_connection(DETACHED, move |job: &Job| {
        let _ = tx.send(Ran {
            jid: job.id().as_str().to_string(),
            order_id: job.args()[0].as_i64().expect("order id"),
            seen_status: None,
            at: Instant::now(),
        });
        Ok::<(), std::io::Error>(())
    })
}

fn detached_job<D: TestDb>(env: &Env<D>, id: i64) -> Job {
    env.job(DETACHED, id)
}

/// A barrier descriptor naming job `jid`'s barrier, read on `conn` (which may be the
/// producer's transaction, the only one to see an uncommitted row).
fn descriptor_of<D: TestDb>(conn: &mut D::Conn, jid: &str) -> serde_json::Value {
    let id = D::query_string(
        conn,
        &format!("SELECT id FROM dtb_barriers WHERE job_id = '{jid}'"),
    )
    .expect("the job's barrier row");
    serde_json::json!({
        "v": 1,
        "backend": <D::Conn as BarrierConnection>::backend_name(),
        "id": id,
    })
}

/// The job runs after the commit (not while the transaction is open), once; its barrier is
/// gone; a job of a rolled-back transaction is aborted, never run; a job enqueued outside a
/// transaction runs too; the inline producer runs the handler at once.
pub fn detached_handler_runs_after_commit_only<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(detached_handlers::<D>(&tx), 2);
    let (committed, rolled_back, plain) = (next_id(), next_id(), next_id());
    let mut conn = env.db.connect();
    let mut opened = Instant::now();
    conn.transaction(|c| {
        insert_order::<D>(c, committed, "paid");
        c.enqueue_with_barrier(&env.producer, detached_job(&env, committed))?;
        worker.wait_for_waiting(1);
        expect_no_run(&rx, "the transaction is still open");
        opened = Instant::now();
        Ok::<_, Error>(())
    })
    .unwrap();
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, committed);
    assert!(ran.at >= opened, "ran after the commit");
    wait_until("the barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });

    let mut jid = String::new();
    let _ = conn.transaction(|c| {
        jid = c
            .enqueue_with_barrier(&env.producer, detached_job(&env, rolled_back))?
            .as_str()
            .to_string();
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    wait_until("the job to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() == 1
    });
    conn.enqueue_with_barrier(&env.producer, detached_job(&env, plain))
        .unwrap();
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, plain, "the rolled-back job never runs");
    expect_no_run(&rx, "nothing else");
    assert_eq!(worker.monitor.ran(), 2);
    assert_eq!(env.db.barrier_rows(), 0);
    expect_acked_without_failure(&env, &jid);

    let inline = Producer::inline(detached_handlers::<D>(&tx));
    let inline_id = next_id();
    conn.transaction(|c| {
        c.enqueue_with_barrier(&inline, detached_job(&env, inline_id))?;
        assert_eq!(
            rx.try_recv().map(|r| r.order_id),
            Ok(inline_id),
            "run at once"
        );
        Ok::<_, Error>(())
    })
    .unwrap();
}

/// The handler has run, but its barrier's deletion cannot commit yet (another session holds
/// the row): the job is not acknowledged. Once the deletion commits, it is, and nothing is
/// left. Many jobs finishing together share deletions.
pub fn detached_job_is_acknowledged_after_its_barrier_is_deleted<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let id = next_id();
    let mut conn = env.db.connect();
    let jid = conn
        .transaction(|c| c.enqueue_with_barrier(&env.producer, detached_job(&env, id)))
        .unwrap()
        .as_str()
        .to_string();
    let mut holder = env.db.connect();
    // Held before a worker runs: the barrier is committed, and its deletion will wait.
    D::exec(&mut holder, D::HOLD_BARRIERS);
    let worker = env.start_worker(detached_handlers::<D>(&tx), 4);
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    std::thread::sleep(NOT_YET);
    assert_eq!(env.db.barrier_rows(), 1, "the deletion waits");
    if let Some(server) = env
        .faktory
        .server_or_skip("the job is not acknowledged yet")
    {
        assert!(
            !server
                .history(&jid)
                .iter()
                .any(|e| e.kind() == JobEventKind::Acked),
            "acknowledged before its barrier's deletion committed"
        );
    }
    D::exec(&mut holder, "ROLLBACK");
    wait_until("the barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    if let Some(server) = env.faktory.server_or_skip("the job is acknowledged") {
        assert!(server.wait_until_history(&jid, JobEventKind::Acked, EVENTUALLY));
    }
    expect_acked_without_failure(&env, &jid);
    assert_eq!(worker.monitor.ran(), 1);

    // A burst: every job runs once, and nothing is left.
    let ids: Vec<i64> = (0..200).map(|_| next_id()).collect();
    conn.transaction(|c| {
        c.enqueue_many_with_barrier(&env.producer, ids.iter().map(|&i| detached_job(&env, i)))
    })
    .unwrap();
    expect_each_ran_once(&rx, &ids, EVENTUALLY);
    wait_until("every barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    expect_no_run(&rx, "each job ran once");
}

/// A job pushed straight to Faktory with another job's barrier descriptor, while that job's
/// transaction is still open, is refused when it commits; the real job runs once.
pub fn detached_forged_descriptor_is_refused<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(detached_handlers::<D>(&tx), 2);
    let (real, forged) = (next_id(), next_id());
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        let jid = c.enqueue_with_barrier(&env.producer, detached_job(&env, real))?;
        worker.wait_for_waiting(1);
        let mut job = detached_job(&env, forged);
        job.custom
            .insert(CUSTOM_KEY.into(), descriptor_of::<D>(c, jid.as_str()));
        env.producer.push(job)?;
        wait_until("both to wait", EVENTUALLY, || worker.monitor.waiting() >= 2);
        Ok::<_, Error>(())
    })
    .unwrap();
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, real);
    wait_until("the forged job to be refused", EVENTUALLY, || {
        worker.monitor.refused() == 1
    });
    expect_no_run(&rx, "the forged job never runs");
    wait_until("no barrier left", EVENTUALLY, || env.db.barrier_rows() == 0);
}

/// Two deliveries of one job reach one worker while the first runs: the second waits its turn
/// (snoozed), and finds the barrier consumed: the handler runs once.
pub fn detached_duplicate_delivery_runs_once<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let (release_tx, release_rx) = unbounded::<()>();
    let runs = Arc::new(Mutex::new(0));
    let handlers = {
        let runs = Arc::clone(&runs);
        Handlers::<D::Conn>::new().register_without_connection(DETACHED, move |job: &Job| {
            *runs.lock().unwrap() += 1;
            let _ = tx.send(Ran {
                jid: job.id().as_str().to_string(),
                order_id: job.args()[0].as_i64().unwrap(),
                seen_status: None,
                at: Instant::now(),
            });
            release_rx
                .recv_timeout(EVENTUALLY)
                .map_err(std::io::Error::other)
        })
    };
    let worker = env.start_worker_with(handlers, |b| b.workers(2).snooze_delay(Duration::ZERO));
    let id = next_id();
    let mut conn = env.db.connect();
    let jid = conn
        .transaction(|c| c.enqueue_with_barrier(&env.producer, detached_job(&env, id)))
        .unwrap();
    let first = expect_run(&rx);
    assert_eq!(first.jid, jid.as_str());
    // A second delivery of the same job (as a lost push answer's retry makes one): the same
    // kind, queue, arguments and descriptor, another job id.
    let mut copy = detached_job(&env, id);
    copy.custom.insert(
        CUSTOM_KEY.into(),
        descriptor_of::<D>(&mut conn, jid.as_str()),
    );
    env.producer.push(copy).unwrap();
    wait_until("the copy to be handed back", EVENTUALLY, || {
        worker.monitor.snoozed() >= 1
    });
    release_tx.send(()).unwrap();
    wait_until("the barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    let _ = release_tx.send(());
    expect_no_run(&rx, "the copy finds the barrier consumed");
    assert_eq!(*runs.lock().unwrap(), 1);
}

/// Worker processes are SIGKILLed after a handler without a connection ran and before its
/// barrier's deletion committed (another session holds the row). Job A: the killed worker's
/// deletion was already on the server, waiting, and commits once the row is let go (a
/// statement the server had received outlives its client). Job B: the server never runs it
/// (its session is killed too). Neither delivery was acknowledged, so Faktory hands both out
/// again once their reservations run out. A, whose barrier is gone, ends as aborted and never
/// runs again; B runs again — at least once, as documented — and its barrier is deleted.
/// (SQLite has no server sessions: a killed process's deletion dies with it, and both run
/// again.)
pub fn detached_worker_killed_before_the_deletion_runs_again<D: TestDb>() {
    let (faktory, reserve_for) = faktory_with_short_reservations();
    let env = Env::<D>::with_db_and_faktory(D::create(), faktory);
    let (tx, rx) = unbounded();
    let mut conn = env.db.connect();
    // A queue for each job: a killed worker's last fetches may still wait on the server, and
    // would take a job pushed to its queue next (which then waits out its reservation).
    let queues = [format!("{}-a", env.queue), format!("{}-b", env.queue)];
    let mut killed_run = |id: i64, queue: &str, kill_the_deletion: bool| -> String {
        let job = reserved_job(&env, DETACHED, id, reserve_for).on_queue(queue.to_string());
        let jid = conn
            .transaction(|c| c.enqueue_with_barrier(&env.producer, job))
            .unwrap();
        let mut holder = env.db.connect();
        D::exec(&mut holder, D::HOLD_BARRIERS);
        let holder_session = D::session_id(&mut holder);
        let mut child = WorkerProcess::start_on(&env, queue);
        assert!(child.wait_for_detached_run(id), "the child ran job {id}");
        if D::HAS_SESSIONS {
            wait_until("the child's deletion to wait", EVENTUALLY, || {
                env.db.waiters_on(holder_session) >= 1
            });
        }
        child.kill();
        if kill_the_deletion && D::HAS_SESSIONS {
            env.db.kill_sessions_waiting_on(holder_session);
            wait_until("the deletion to be gone", EVENTUALLY, || {
                env.db.waiters_on(holder_session) == 0
            });
        }
        D::exec(&mut holder, "ROLLBACK");
        jid.as_str().to_string()
    };
    let (a, b) = (next_id(), next_id());
    let jobs = [
        (a, killed_run(a, &queues[0], false)),
        (b, killed_run(b, &queues[1], true)),
    ];
    let left: Vec<i64> = {
        let mut c = env.db.connect();
        jobs.iter()
            .filter(|(_, jid)| {
                D::query_i64(
                    &mut c,
                    &format!("SELECT COUNT(*) FROM dtb_barriers WHERE job_id = '{jid}'"),
                ) == Some(1)
            })
            .map(|(id, _)| *id)
            .collect()
    };
    assert!(left.contains(&b), "job B's deletion never committed");
    if D::HAS_SESSIONS {
        assert!(
            !left.contains(&a),
            "job A's deletion committed after its worker died"
        );
    }

    let _worker = env.start_worker_on_queues(
        env.db.pool(16),
        detached_handlers::<D>(&tx),
        |b| b.workers(2),
        queues.to_vec(),
    );
    expect_each_ran_once(&rx, &left, Duration::from_secs(reserve_for + 60));
    wait_until("every barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    if let Some(server) = env.faktory.server_or_skip("both jobs end acknowledged") {
        for (_, jid) in &jobs {
            assert!(server.wait_until_history(jid, JobEventKind::Acked, EVENTUALLY));
        }
    }
    expect_no_run(&rx, "each job ran again at most once");
}
