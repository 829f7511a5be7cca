//! Big transactions: `enqueue_many_with_barrier` that commits, rolls back, loses Faktory in
//! the middle of its pushes (the error propagated, or swallowed and the transaction committed
//! anyway), outside a transaction and inline; and a worker that waits for a big open
//! transaction by parking its jobs, not by handing them back again and again.

use super::proxy::{Fault, Proxy};
use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::Error;

/// More jobs than fit in one insert and one `PUSHB` (1,000 each).
const JOBS: usize = 1_500;

/// Inserts orders `ids`, paid, in one statement.
fn insert_orders<D: TestDb>(conn: &mut D::Conn, ids: &[i64]) {
    for chunk in ids.chunks(500) {
        let values: Vec<String> = chunk.iter().map(|id| format!("({id}, 'paid')")).collect();
        D::exec(
            conn,
            &format!(
                "INSERT INTO orders (id, status) VALUES {}",
                values.join(", ")
            ),
        );
    }
}

fn fresh_ids(n: usize) -> Vec<i64> {
    (0..n).map(|_| next_id()).collect()
}

/// How many runs `handler_runs` holds for orders `ids`.
fn runs_of_all<D: TestDb>(db: &D, ids: &[i64]) -> i64 {
    let mut c = db.connect();
    let (lo, hi) = (ids.iter().min().unwrap(), ids.iter().max().unwrap());
    D::query_i64(
        &mut c,
        &format!("SELECT COUNT(*) FROM handler_runs WHERE order_id BETWEEN {lo} AND {hi}"),
    )
    .unwrap()
}

/// A producer whose connections go through `proxy` to the test's Faktory.
fn producer_through<D: TestDb>(env: &Env<D>, proxy: &Proxy) -> Producer {
    let url = env.faktory.url();
    let (scheme, rest) = url.split_once("://").expect("a Faktory URL");
    let url = match rest.rsplit_once('@') {
        Some((password, _)) => format!("{scheme}://{password}@{}", proxy.addr()),
        None => format!("{scheme}://{}", proxy.addr()),
    };
    Producer::builder()
        .url(url)
        .timeout(Duration::from_millis(500))
        .connect()
        .expect("a producer through the proxy")
}

fn proxy_to<D: TestDb>(env: &Env<D>) -> Proxy {
    let url = env.faktory.url();
    let target = url
        .split_once("://")
        .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, host)| host))
        .expect("a Faktory URL");
    Proxy::start(target)
}

/// 1,500 jobs enqueued in one call, in a transaction that stays open until the worker has
/// fetched every one of them (most are parked: acknowledged and kept in memory), then
/// commits. None runs before the commit; after it, each runs once and sees the transaction's
/// writes; no job went back to Faktory more than once, and nothing is left.
pub fn bulk_enqueue_commits<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 4);
    let ids = fresh_ids(JOBS);
    let mut conn = env.db.connect();
    let jids = conn
        .transaction(|c| {
            insert_orders::<D>(c, &ids);
            let jobs = ids.iter().map(|&id| env.job(PAID, id));
            let jids = c.enqueue_many_with_barrier(&env.producer, jobs)?;
            assert_eq!(
                env.db.barrier_rows(),
                0,
                "the barriers are not committed yet"
            );
            worker.wait_for_waiting(JOBS);
            assert!(
                worker.monitor.parked() > 0,
                "the transaction's jobs beyond its share of fetch slots are parked"
            );
            expect_no_run(&rx, "the transaction is still open");
            Ok::<_, Error>(jids)
        })
        .expect("the transaction commits");
    assert_eq!(jids.len(), JOBS);
    let distinct: HashSet<&str> = jids.iter().map(|j| j.as_str()).collect();
    assert_eq!(distinct.len(), JOBS, "one job id each");
    let mut seen = HashSet::new();
    while seen.len() < JOBS {
        let ran = rx
            .recv_timeout(EVENTUALLY)
            .expect("every committed job runs");
        assert_eq!(ran.seen_status.as_deref(), Some("paid"));
        assert!(seen.insert(ran.order_id), "ran twice: {ran:?}");
    }
    wait_until("every barrier to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    assert_eq!(runs_of_all(&env.db, &ids), JOBS as i64);
    assert_eq!(worker.monitor.overflowed(), 0, "no job was turned away");
    assert!(
        worker.monitor.snoozed() <= JOBS as u64,
        "{} hand-backs for {JOBS} jobs",
        worker.monitor.snoozed()
    );
    assert_eq!(worker.monitor.parked(), 0);
}

/// 1,500 jobs enqueued in one call, all fetched by the worker while the transaction is open,
/// then the transaction rolls back: every job ends as aborted, none runs, nothing is left.
pub fn bulk_enqueue_rolls_back<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 4);
    let ids = fresh_ids(JOBS);
    let mut conn = env.db.connect();
    let rolled_back = conn.transaction(|c| {
        insert_orders::<D>(c, &ids);
        c.enqueue_many_with_barrier(&env.producer, ids.iter().map(|&id| env.job(PAID, id)))?;
        worker.wait_for_waiting(JOBS);
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(rolled_back.is_err());
    wait_until("every job to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= JOBS as u64
    });
    let others = drain_with_sentinel(&env, &rx);
    assert!(
        others.is_empty(),
        "a job of the rolled-back transaction ran: {others:?}"
    );
    assert_eq!(runs_of_all(&env.db, &ids), 0);
    assert_eq!(env.db.barrier_rows(), 0, "no barrier row is left");
    assert_eq!(worker.monitor.parked(), 0);
}

/// Faktory stops in the middle of a bulk enqueue: the first `PUSHB` (1,000 jobs) went through,
/// the connection is cut at the second. The call fails; the application swallows the error and
/// commits anyway. Nothing can run: the barriers were deleted again before the error was
/// returned, and the 1,000 jobs that reached Faktory end as aborted.
pub fn bulk_push_cut_mid_batch_and_swallowed_runs_nothing<D: TestDb>() {
    let env = Env::<D>::new();
    let proxy = proxy_to(&env);
    let producer = producer_through(&env, &proxy);
    proxy.fault_on("PUSHB", 2, Fault::Cut);
    let ids = fresh_ids(JOBS);
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_orders::<D>(c, &ids);
        let failed =
            c.enqueue_many_with_barrier(&producer, ids.iter().map(|&id| env.job(PAID, id)));
        assert!(
            matches!(failed, Err(Error::Faktory(_) | Error::FaktoryTimeout(_))),
            "{failed:?}"
        );
        Ok::<_, Error>(())
    })
    .expect("the application commits anyway");
    assert_eq!(proxy.seen(), 2, "the second PUSHB was the one cut");
    assert_eq!(env.db.barrier_rows(), 0, "no barrier is left");
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 4);
    wait_until("the pushed jobs to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= 1_000
    });
    let others = drain_with_sentinel(&env, &rx);
    assert!(others.is_empty(), "a job ran: {others:?}");
    assert_eq!(worker.monitor.aborted(), 1_000);
    assert_eq!(runs_of_all(&env.db, &ids), 0);
}

/// The answer to the second `PUSHB` of a bulk enqueue is lost (its jobs reached Faktory): the
/// call fails, the application propagates the error and the transaction rolls back. All 1,500
/// jobs are in Faktory; every one ends as aborted.
pub fn bulk_push_answer_lost_rolls_back<D: TestDb>() {
    let env = Env::<D>::new();
    let proxy = proxy_to(&env);
    let producer = producer_through(&env, &proxy);
    proxy.fault_on("PUSHB", 2, Fault::LoseAnswers);
    let ids = fresh_ids(JOBS);
    let mut conn = env.db.connect();
    let failed = conn.transaction(|c| {
        insert_orders::<D>(c, &ids);
        c.enqueue_many_with_barrier(&producer, ids.iter().map(|&id| env.job(PAID, id)))
    });
    assert!(
        matches!(failed, Err(Error::FaktoryTimeout(_))),
        "{failed:?}"
    );
    assert_eq!(env.db.barrier_rows(), 0);
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 4);
    wait_until("every job to be aborted", EVENTUALLY, || {
        worker.monitor.aborted() >= JOBS as u64
    });
    let others = drain_with_sentinel(&env, &rx);
    assert!(others.is_empty(), "a job ran: {others:?}");
    assert_eq!(runs_of_all(&env.db, &ids), 0);
}

/// Outside a transaction the jobs are plain jobs (no barrier rows) and run; an empty list
/// enqueues nothing; with the inline producer every handler runs at once, in order, inside the
/// caller's transaction.
pub fn bulk_enqueue_outside_a_transaction_and_inline<D: TestDb>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let ids = fresh_ids(3);
    let mut conn = env.db.connect();
    insert_orders::<D>(&mut conn, &ids);
    let none = conn
        .enqueue_many_with_barrier(&env.producer, Vec::new())
        .unwrap();
    assert!(none.is_empty());
    let jids = conn
        .enqueue_many_with_barrier(&env.producer, ids.iter().map(|&id| env.job(PAID, id)))
        .unwrap();
    assert_eq!(jids.len(), 3);
    assert_eq!(env.db.barrier_rows(), 0, "no barrier outside a transaction");
    let worker = env.start_worker(handlers::<D>(&tx), 2);
    expect_each_ran_once(&rx, &ids, EVENTUALLY);
    drop(worker);

    let inline = Producer::inline(handlers::<D>(&tx));
    let later = fresh_ids(3);
    conn.transaction(|c| {
        insert_orders::<D>(c, &later);
        c.enqueue_many_with_barrier(&inline, later.iter().map(|&id| env.job(PAID, id)))?;
        let ran: Vec<i64> = rx.try_iter().map(|r| r.order_id).collect();
        assert_eq!(ran, later, "run at once, in order");
        Ok::<_, Error>(())
    })
    .unwrap();
    assert_eq!(env.db.barrier_rows(), 0);
}
