//! Attacks on the guarantee that once broke it, each replayed against real sessions: a job
//! pushed with another job's barrier descriptor, an `Err` from the enqueue that the application
//! swallows before committing, and a failed job lost with the broker's data.

use super::proxy::Proxy;
use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::testing::JobEventKind;
use diesel_transaction_barrier::{reconcile_barriers, Error, CUSTOM_KEY};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// Commits order `id` and its job; returns the job id.
fn commit_job<D: TestDb>(env: &Env<D>, id: i64, job: Job) -> String {
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        c.enqueue_with_barrier(&env.producer, job)
    })
    .expect("transaction commits")
    .as_str()
    .to_string()
}

/// The id of job `jid`'s barrier, as anyone who may read the barrier table finds it.
fn barrier_of<D: TestDb>(db: &D, jid: &str) -> String {
    let mut c = db.connect();
    D::query_string(
        &mut c,
        &format!("SELECT id FROM dtb_barriers WHERE job_id = '{jid}'"),
    )
    .expect("the job's barrier row")
}

/// Two jobs are committed; before a worker takes them, two other jobs (other arguments, one of
/// another kind) are pushed straight to Faktory with the real jobs' barrier descriptors, and
/// the worker fetches the forged ones first. They are refused, counted and never run; the real
/// jobs, whose transactions committed, run once each.
pub fn forged_descriptor_cannot_steal_a_barrier<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let real = [next_id(), next_id()];
    let jids: Vec<String> = real
        .iter()
        .map(|&id| commit_job(&env, id, env.job(PAID, id)))
        .collect();

    let forged_queue = format!("{}-forged", env.queue);
    let forged = [next_id(), next_id()];
    let mut conn = env.db.connect();
    let mut forged_jids = Vec::new();
    for ((kind, jid), id) in [PAID, PLAIN_OK].into_iter().zip(&jids).zip(forged) {
        insert_order::<D>(&mut conn, id, "forged");
        let mut job = Job::new(kind, vec![id]).on_queue(forged_queue.clone());
        job.custom.insert(
            CUSTOM_KEY.into(),
            serde_json::json!({
                "v": 1,
                "backend": <D::Conn as BarrierConnection>::backend_name(),
                "id": barrier_of(&env.db, jid),
            }),
        );
        forged_jids.push(job.id().as_str().to_string());
        env.producer.push(job).expect("a plain push");
    }

    // One fetch at a time, the forged jobs' queue first.
    let worker = env.start_worker_on_queues(
        env.db.pool(8),
        handlers::<D>(&tx),
        |b| b.workers(1).max_waiting(0),
        vec![forged_queue, env.queue.clone()],
    );
    expect_each_ran_once(&rx, &real, EVENTUALLY);
    wait_until("both forged jobs to be refused", EVENTUALLY, || {
        worker.monitor.refused() == 2
    });
    for id in real {
        wait_until("the run to commit", EVENTUALLY, || {
            runs_of(&env.db, id) == 1
        });
    }
    for id in forged {
        assert_eq!(runs_of(&env.db, id), 0, "a forged job ran");
    }
    assert_eq!(
        worker.monitor.aborted(),
        0,
        "no real job counted as aborted"
    );
    wait_until("no barrier left", EVENTUALLY, || env.db.barrier_rows() == 0);
    if let Some(server) = env.faktory.server_or_skip("the forged jobs' failures") {
        for jid in &forged_jids {
            assert!(server.wait_until_history(jid, JobEventKind::Failed, EVENTUALLY));
            let message = failure_message(server, jid).unwrap_or_default();
            assert!(message.contains("another job"), "{message}");
        }
    }
}

/// A job whose arguments and custom data change form on their way through a broker written in
/// another language (floats that are whole numbers, integers past 2^53, characters a JSON
/// encoder escapes, keys in another order) is still its own job: its delivery, and a snoozed
/// copy of it, consume its barrier.
pub fn awkward_payloads_still_bind<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.workers(1).block_limit(Duration::from_millis(100))
    });
    let id = next_id();
    let mut job = Job::new(
        PAID,
        vec![
            serde_json::json!(id),
            serde_json::json!(1.0),
            serde_json::json!(1u64 << 60),
            serde_json::json!(-2.5e-7),
            serde_json::json!("<é & 😀 \u{7f} \\ \"quoted\">"),
            serde_json::json!({"z": [null, true, {"b": 2, "a": 1}], "a": ""}),
        ],
    )
    .on_queue(env.queue.clone());
    job.custom.insert(
        "tenant".into(),
        serde_json::json!({"name": "acme", "id": 7.0}),
    );
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_order::<D>(c, id, "new");
        c.enqueue_with_barrier(&env.producer, job)?;
        // Held past the block limit: the delivery is snoozed, and a copy comes back.
        wait_until("a snooze", EVENTUALLY, || worker.monitor.snoozed() >= 1);
        set_status::<D>(c, id, "paid");
        Ok::<_, Error>(())
    })
    .unwrap();
    expect_ran_once(&env, &rx, id);
    assert_eq!(worker.monitor.refused(), 0);
}

/// With Faktory refusing the connection, `enqueue_with_barrier` fails; the application
/// swallows the error and commits. Nothing is left that could run: no barrier row, and so
/// nothing for the reconciler to push.
pub fn swallowed_push_failure_leaves_nothing<D: TestDb>() {
    let env = Env::<D>::new();
    let unreachable = Producer::builder()
        .url("tcp://127.0.0.1:1")
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let id = next_id();
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        let failed = c.enqueue_with_barrier(&unreachable, env.job(PAID, id));
        assert!(
            matches!(failed, Err(Error::Faktory(_) | Error::FaktoryTimeout(_))),
            "{failed:?}"
        );
        Ok::<_, Error>(())
    })
    .expect("the application commits anyway");
    let orders = D::query_i64(
        &mut conn,
        &format!("SELECT COUNT(*) FROM orders WHERE id = {id}"),
    );
    assert_eq!(orders, Some(1), "the application's writes committed");
    assert_eq!(env.db.barrier_rows(), 0, "no barrier is left");
    let pushed = reconcile_barriers(
        &mut conn,
        &env.producer,
        Duration::ZERO,
        Duration::from_secs(3600),
    )
    .unwrap();
    assert_eq!(pushed, 0, "nothing for the reconciler to push");
}

/// `url` (a Faktory URL, perhaps with a password) pointing at `addr` instead.
fn through(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a Faktory URL");
    match rest.rsplit_once('@') {
        Some((password, _)) => format!("{scheme}://{password}@{addr}"),
        None => format!("{scheme}://{addr}"),
    }
}

/// The push reaches Faktory but its answer is lost: `enqueue_with_barrier` fails with a
/// timeout, the application swallows the error and commits. The copy that reached Faktory
/// finds no barrier and is aborted: the handler never runs, and nothing is left.
pub fn swallowed_lost_push_answer_runs_nothing<D: TestDb>() {
    let env = Env::<D>::new();
    let url = env.faktory.url();
    let target = url
        .split_once("://")
        .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, host)| host))
        .expect("a Faktory URL");
    let proxy = Proxy::start(target);
    let producer = Producer::builder()
        .url(through(&url, proxy.addr()))
        .timeout(Duration::from_millis(500))
        .connect()
        .expect("a producer through the proxy");
    proxy.lose_answers();
    let id = next_id();
    let mut conn = env.db.connect();
    let jid = conn
        .transaction(|c| {
            insert_order::<D>(c, id, "paid");
            let job = env.job(PAID, id);
            let jid = job.id().as_str().to_string();
            let failed = c.enqueue_with_barrier(&producer, job);
            assert!(
                matches!(failed, Err(Error::FaktoryTimeout(_))),
                "{failed:?}"
            );
            Ok::<_, Error>(jid)
        })
        .expect("the application commits anyway");
    assert_eq!(env.db.barrier_rows(), 0, "no barrier is left");
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 1);
    assert_aborted(&env, &worker, &rx, id, &jid);
}

/// A committed job whose handler failed once sits in Faktory's retry set when the broker loses
/// its data. The worker recorded when the retry was due; once it is overdue by the grace
/// period, the reconciler pushes the job again, and it runs once.
pub fn failed_job_survives_broker_loss<D: TestDb>() {
    let env = Env::<D>::new();
    let id = next_id();
    let retry_due = Duration::from_millis(300);
    {
        // The broker that will lose its data: an in-process server, dropped with its jobs.
        let doomed = diesel_transaction_barrier::testing::TestServer::start().unwrap();
        let producer = Producer::connect(&doomed.url()).unwrap();
        let mut conn = env.db.connect();
        conn.transaction(|c| {
            insert_order::<D>(c, id, "paid");
            c.enqueue_with_barrier(&producer, env.job(PAID, id))
        })
        .unwrap();
        let attempts = Arc::new(AtomicUsize::new(0));
        let failing = Handlers::new().register(PAID, {
            let attempts = Arc::clone(&attempts);
            move |_: &Job, _: &mut D::Conn| {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(std::io::Error::other("the first attempt fails"))
            }
        });
        let url = doomed.url();
        let mut worker = env.start_worker_with(failing, move |b| {
            b.url(url)
                .workers(1)
                .reconcile_grace(None)
                .retry_schedule(move |_| retry_due)
        });
        assert!(doomed.wait_for(|s| s.retries_len() == 1, EVENTUALLY));
        let mut c = env.db.connect();
        wait_until("the barrier to be marked attempted", EVENTUALLY, || {
            D::query_i64(
                &mut c,
                "SELECT COUNT(*) FROM dtb_barriers WHERE attempted_at IS NOT NULL",
            ) == Some(1)
        });
        worker.stop();
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        drop(producer);
        doomed.shutdown(); // and with it the job in its retry set
    }
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.reconcile_grace(Some(Duration::from_millis(300)))
    });
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    wait_until("the barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    expect_no_run(&rx, "the barrier is consumed");
    assert_eq!(runs_of(&env.db, id), 1);
    assert_eq!(worker.monitor.ran(), 1);
}
