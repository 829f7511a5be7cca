//! The waiter's watchers on real sessions (PostgreSQL and MySQL): each waits on a running
//! producer's barrier row with a lock wait and wakes the moment that transaction ends — a
//! commit, a rollback, a killed session — survives its own session being killed and its wait
//! timing out, and never holds a producer up or makes it a deadlock's victim. Each backend's
//! test file (`tests/postgres/watchers.rs`, `tests/mysql/watchers.rs`) says how to see its
//! watchers on the server ([`Watching`]) and runs these with `watcher_tests!`.

use super::*;
use crossbeam_channel::unbounded;
use diesel::connection::SimpleConnection;
use diesel::Connection;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error};
use std::time::{Duration, Instant};

/// Long enough that the waiter's own checks, backing off, are far apart by the time a
/// transaction that waited ends: a job that starts at once was woken by its watcher.
const SLOW_CHECKS: Duration = Duration::from_secs(60);
/// How soon after its transaction ends a watched job must be answered.
const AT_ONCE: Duration = Duration::from_millis(500);

/// A backend whose waiter watches transactions, as the server shows it.
pub trait Watching: TestDb {
    /// `CREATE TABLE locks (id INT PRIMARY KEY, v INT NOT NULL)`, as the backend wants it.
    const CREATE_LOCKS: &'static str;
    /// The current time, to the microsecond, in SQL.
    const NOW: &'static str;

    /// The sessions of `db` blocked in a watcher's wait, each with a label of the wait that
    /// changes when the watcher waits again.
    fn watchers(db: &Self) -> Vec<(i64, String)>;

    /// Whether the wait labelled `now` is a renewal of the one labelled `first` (the backend
    /// may check that it is longer).
    fn renewed(first: &str, now: &str) -> bool {
        first != now
    }
}

/// Waits until `n` watchers wait on `db`.
fn wait_for_watchers<D: Watching>(db: &D, n: usize) -> Vec<(i64, String)> {
    let started = Instant::now();
    loop {
        let found = D::watchers(db);
        if found.len() >= n {
            return found;
        }
        assert!(started.elapsed() < EVENTUALLY, "{n} watcher(s) wait");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A test environment and a worker with one handler whose checks back off to a minute apart:
/// a job that starts soon after its commit was woken by a watcher.
fn watched<D: Watching>() -> (Env<D>, Receiver<Ran>, RunningWorker) {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.workers(1).check_interval(SLOW_CHECKS)
    });
    (env, rx, worker)
}

/// After `id` ran: it ran once, and nothing is left.
fn expect_ran_once_after<D: TestDb>(env: &Env<D>, rx: &Receiver<Ran>, id: i64) {
    assert!(drain_with_sentinel(env, rx).is_empty());
    assert_eq!(runs_of(&env.db, id), 1);
    assert_eq!(env.db.barrier_rows(), 0);
}

/// A job waits on a transaction held open for seconds; a watcher waits on it. The moment the
/// transaction commits, the job starts: long before the waiter's own next check.
pub fn a_watcher_starts_a_job_the_moment_its_transaction_commits<D: Watching>() {
    let (env, rx, worker) = watched::<D>();
    let id = next_id();
    let committed = commit_once_waiting(&env, &worker, id, || {
        wait_for_watchers(&env.db, 1);
        // Long enough for the checks to have backed off to seconds apart.
        std::thread::sleep(Duration::from_secs(3));
        expect_no_run(&rx, "the transaction is still open");
    });
    expect_run_within(&rx, id, committed, AT_ONCE);
    assert!(worker.monitor.hears_commit_hints());
    wait_until("no watcher left waiting", EVENTUALLY, || {
        D::watchers(&env.db).is_empty()
    });
}

/// The watched transaction rolls back: the job is aborted at once.
pub fn a_watcher_aborts_a_job_the_moment_its_transaction_rolls_back<D: Watching>() {
    let (env, rx, worker) = watched::<D>();
    let id = next_id();
    let mut conn = env.db.connect();
    let result = conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        worker.wait_for_waiting(1);
        wait_for_watchers(&env.db, 1);
        std::thread::sleep(Duration::from_secs(3));
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());
    let ended = Instant::now();
    wait_until("the job to be aborted", AT_ONCE, || {
        worker.monitor.aborted() == 1
    });
    assert!(ended.elapsed() < AT_ONCE);
    assert!(drain_with_sentinel(&env, &rx).is_empty(), "nothing ran");
}

/// The watched producer's session is killed (the server rolls its transaction back): the job
/// is aborted at once.
pub fn a_killed_producer_wakes_its_watcher<D: Watching>() {
    let (env, rx, worker) = watched::<D>();
    let id = next_id();
    let mut producer = env.db.connect();
    let session = D::session_id(&mut producer);
    producer.batch_execute("BEGIN").unwrap();
    insert_order::<D>(&mut producer, id, "paid");
    producer
        .enqueue_with_barrier(&env.producer, env.job(PAID, id))
        .unwrap();
    worker.wait_for_waiting(1);
    wait_for_watchers(&env.db, 1);
    std::thread::sleep(Duration::from_secs(3));
    env.db.kill(session);
    let killed = Instant::now();
    wait_until("the job to be aborted", AT_ONCE, || {
        worker.monitor.aborted() == 1
    });
    assert!(killed.elapsed() < AT_ONCE);
    assert!(drain_with_sentinel(&env, &rx).is_empty(), "nothing ran");
    assert_eq!(runs_of(&env.db, id), 0);
}

/// The watcher's own session is killed: another takes its place on the same transaction, and
/// the job still starts the moment the transaction commits.
pub fn a_killed_watcher_is_replaced<D: Watching>() {
    let (env, rx, worker) = watched::<D>();
    let id = next_id();
    let committed = commit_once_waiting(&env, &worker, id, || {
        let first = wait_for_watchers(&env.db, 1)[0].0;
        env.db.kill(first);
        wait_until("another watcher", EVENTUALLY, || {
            D::watchers(&env.db).iter().any(|(s, _)| *s != first)
        });
        std::thread::sleep(Duration::from_secs(2));
    });
    expect_run_within(&rx, id, committed, AT_ONCE);
    expect_ran_once_after(&env, &rx, id);
}

/// A transaction that runs past the watcher's first wait (2 s for a young transaction): the
/// wait times out, the watcher waits again, and the job still starts the moment it commits.
pub fn a_watch_that_times_out_is_renewed<D: Watching>() {
    let (env, rx, worker) = watched::<D>();
    let id = next_id();
    let committed = commit_once_waiting(&env, &worker, id, || {
        let first = wait_for_watchers(&env.db, 1)[0].1.clone();
        wait_until("a renewed wait", EVENTUALLY, || {
            D::watchers(&env.db)
                .iter()
                .any(|(_, now)| D::renewed(&first, now))
        });
        expect_no_run(&rx, "the transaction is still open");
    });
    expect_run_within(&rx, id, committed, AT_ONCE);
    expect_ran_once_after(&env, &rx, id);
}

/// While a watcher waits on its row, the producer goes on as if nobody were there: it updates
/// and deletes its own barrier rows and inserts more beside them without waiting, and a
/// deadlock with a lighter transaction that waited first is the lighter one's loss: the
/// watcher waits for the producer and holds nothing the producer asks for.
pub fn a_watched_producer_never_waits_and_wins_its_deadlock<D: Watching>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| b.workers(1));
    let mut setup = env.db.connect();
    D::exec(&mut setup, D::CREATE_LOCKS);
    D::exec(&mut setup, "INSERT INTO locks VALUES (1, 0), (2, 0)");
    let (id, dropped) = (next_id(), next_id());
    let (ready_tx, ready_rx) = unbounded::<()>();
    let (go_tx, go_rx) = unbounded::<()>();
    // The light transaction: one row.
    let url = env.db.url();
    let light = std::thread::spawn(move || {
        let mut c = D::Conn::establish(&url).expect("connect");
        c.transaction(|c| {
            D::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 2");
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            D::try_exec(c, "UPDATE locks SET v = v + 1 WHERE id = 1")
        })
    });
    let mut conn = env.db.connect();
    let producer_session = D::session_id(&mut conn);
    conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        insert_order::<D>(c, dropped, "paid");
        let dropped_jid = c.enqueue_with_barrier(&env.producer, env.job(PAID, dropped))?;
        worker.wait_for_waiting(2);
        wait_for_watchers(&env.db, 1);
        // Its own rows, and more beside them: nothing waits.
        let started = Instant::now();
        D::exec(
            c,
            &format!("UPDATE dtb_barriers SET pushed_at = {}", D::NOW),
        );
        D::exec(
            c,
            &format!(
                "DELETE FROM dtb_barriers WHERE job_id = '{}'",
                dropped_jid.as_str()
            ),
        );
        for _ in 0..20 {
            let more = next_id();
            insert_order::<D>(c, more, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, more))?;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the producer never waited"
        );
        // The deadlock: the light transaction holds row 2 and waits for row 1 first (besides
        // the watcher, a second session waits for the producer).
        D::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 1");
        ready_rx.recv().unwrap();
        go_tx.send(()).unwrap();
        wait_until("the light transaction to wait", EVENTUALLY, || {
            env.db.waiters_on(producer_session) >= 2
        });
        D::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 2");
        Ok::<_, Error>(())
    })
    .expect("the producer commits");
    let light = light.join().unwrap();
    assert!(
        light.is_err(),
        "the light transaction is the deadlock's victim"
    );
    // Twenty-one jobs committed (the dropped one's barrier went with its delete).
    let mut ran_ids = Vec::new();
    while ran_ids.len() < 21 {
        let ran = expect_run(&rx);
        assert!(ran.seen_status.is_some(), "saw the producer's writes");
        ran_ids.push(ran.order_id);
    }
    assert!(ran_ids.contains(&id));
    assert!(
        !ran_ids.contains(&dropped),
        "the deleted barrier's job did not run"
    );
    wait_until(
        "the deleted barrier's job to be aborted",
        EVENTUALLY,
        || worker.monitor.aborted() == 1,
    );
}

/// More running transactions than watchers: as many watchers wait as there are, the others are
/// found by the checks, and every job runs once after its commit.
pub fn more_transactions_than_watchers<D: Watching>() {
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<D>(&tx), |b| b.workers(2).commit_watchers(2));
    let ids: Vec<i64> = (0..5).map(|_| next_id()).collect();
    let (release_tx, release_rx) = unbounded::<()>();
    let producers: Vec<_> = ids
        .iter()
        .map(|&id| {
            let url = env.db.url();
            let (producer, job) = (env.producer.clone(), env.job(PAID, id));
            let release = release_rx.clone();
            std::thread::spawn(move || {
                let mut c = D::Conn::establish(&url).expect("connect");
                c.transaction(|c| {
                    insert_order::<D>(c, id, "paid");
                    c.enqueue_with_barrier(&producer, job)?;
                    let _ = release.recv();
                    Ok::<_, Error>(())
                })
                .expect("commits");
            })
        })
        .collect();
    worker.wait_for_waiting(ids.len());
    wait_for_watchers(&env.db, 2);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        D::watchers(&env.db).len(),
        2,
        "no more watchers than asked for"
    );
    expect_no_run(&rx, "every transaction is still open");
    for _ in &ids {
        release_tx.send(()).unwrap();
    }
    for p in producers {
        p.join().unwrap();
    }
    expect_each_ran_once(&rx, &ids, EVENTUALLY);
}

/// One `#[test]` per watcher scenario above, for the backend `$db`.
#[macro_export]
macro_rules! watcher_tests {
    ($db:ty) => {
        $crate::watcher_tests!(@each $db;
            a_watcher_starts_a_job_the_moment_its_transaction_commits,
            a_watcher_aborts_a_job_the_moment_its_transaction_rolls_back,
            a_killed_producer_wakes_its_watcher,
            a_killed_watcher_is_replaced,
            a_watch_that_times_out_is_renewed,
            a_watched_producer_never_waits_and_wins_its_deadlock,
            more_transactions_than_watchers,
        );
    };
    (@each $db:ty; $($name:ident,)*) => {$(
        #[test]
        fn $name() {
            super::common::watchers::$name::<$db>();
        }
    )*};
}
