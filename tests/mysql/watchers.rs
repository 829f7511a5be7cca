//! The waiter's watchers on real MariaDB sessions: each waits on a running producer's barrier
//! row and wakes the moment that transaction ends — a commit, a rollback, a killed session —
//! survives its own connection being killed and its wait timing out, and never holds a
//! producer up or makes it a deadlock's victim.

use super::common::mysql::{MysqlDatabase, Root};
use super::common::*;
use crossbeam_channel::unbounded;
use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error};
use std::time::{Duration, Instant};

/// Long enough that the waiter's own checks, backing off, are seconds apart by the time a
/// transaction that waited ends: a job that starts at once was woken by its watcher.
const SLOW_CHECKS: Duration = Duration::from_secs(60);
/// How soon after its transaction ends a watched job must be answered.
const AT_ONCE: Duration = Duration::from_millis(500);

/// The sessions of `db` waiting in a watcher's statement, with the statement.
fn watchers(db: &Root) -> Vec<(i64, String)> {
    #[derive(QueryableByName)]
    struct Session {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        id: i64,
        #[diesel(sql_type = Text)]
        info: String,
    }
    let mut admin = db.database().mysql().admin();
    diesel::sql_query(
        "SELECT CAST(ID AS SIGNED) AS id, INFO AS info FROM information_schema.PROCESSLIST \
         WHERE DB = ? AND INFO LIKE 'SELECT id FROM dtb_barriers WHERE id = % LOCK IN SHARE MODE%'",
    )
    .bind::<Text, _>(db.database().mysql().name())
    .load::<Session>(&mut admin)
    .expect("the process list")
    .into_iter()
    .map(|s| (s.id, s.info))
    .collect()
}

/// Waits until `n` watchers wait on `db`.
fn wait_for_watchers(db: &Root, n: usize) -> Vec<(i64, String)> {
    let started = Instant::now();
    loop {
        let found = watchers(db);
        if found.len() >= n {
            return found;
        }
        assert!(started.elapsed() < EVENTUALLY, "{n} watcher(s) wait");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A job waits on a transaction held open for seconds; a watcher waits on it. The moment the
/// transaction commits, the job starts: long before the waiter's own next check.
#[test]
fn a_watcher_starts_a_job_the_moment_its_transaction_commits() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Root>(&tx), |b| {
        b.workers(1).check_interval(SLOW_CHECKS)
    });
    let id = next_id();
    let committed = commit_once_waiting(&env, &worker, id, || {
        wait_for_watchers(&env.db, 1);
        // Long enough for the checks to have backed off to seconds apart.
        std::thread::sleep(Duration::from_secs(3));
        expect_no_run(&rx, "the transaction is still open");
    });
    expect_run_within(&rx, id, committed, AT_ONCE);
    wait_until("no watcher left waiting", EVENTUALLY, || {
        watchers(&env.db).is_empty()
    });
}

/// The watched transaction rolls back: the job is aborted at once.
#[test]
fn a_watcher_aborts_a_job_the_moment_its_transaction_rolls_back() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Root>(&tx), |b| {
        b.workers(1).check_interval(SLOW_CHECKS)
    });
    let id = next_id();
    let mut conn = env.db.connect();
    let result = conn.transaction(|c| {
        insert_order::<Root>(c, id, "paid");
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
#[test]
fn a_killed_producer_wakes_its_watcher() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Root>(&tx), |b| {
        b.workers(1).check_interval(SLOW_CHECKS)
    });
    let id = next_id();
    let mut producer = env.db.connect();
    let session = Root::session_id(&mut producer);
    producer.batch_execute("BEGIN").unwrap();
    insert_order::<Root>(&mut producer, id, "paid");
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
#[test]
fn a_killed_watcher_is_replaced() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Root>(&tx), |b| {
        b.workers(1).check_interval(SLOW_CHECKS)
    });
    let id = next_id();
    let committed = commit_once_waiting(&env, &worker, id, || {
        let first = wait_for_watchers(&env.db, 1)[0].0;
        env.db.kill(first);
        wait_until("another watcher", EVENTUALLY, || {
            watchers(&env.db).iter().any(|(s, _)| *s != first)
        });
        std::thread::sleep(Duration::from_secs(2));
    });
    expect_run_within(&rx, id, committed, AT_ONCE);
    expect_ran_once_after(&env, &rx, id);
}

/// A transaction that runs past the watcher's wait: the wait times out, the watcher waits
/// again (longer, as the transaction ages), and the job still starts the moment it commits.
#[test]
fn a_watch_that_times_out_is_renewed() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Root>(&tx), |b| {
        b.workers(1).check_interval(SLOW_CHECKS)
    });
    let id = next_id();
    let committed = commit_once_waiting(&env, &worker, id, || {
        // A young transaction gets a short wait; once it has run for a second or more, the
        // renewed wait is longer.
        let first = wait_for_watchers(&env.db, 1)[0].1.clone();
        assert!(first.ends_with("WAIT 2"), "{first}");
        wait_until("a renewed, longer wait", EVENTUALLY, || {
            watchers(&env.db)
                .iter()
                .any(|(_, info)| info.ends_with("WAIT 4"))
        });
        expect_no_run(&rx, "the transaction is still open");
    });
    expect_run_within(&rx, id, committed, AT_ONCE);
}

/// While a watcher waits on its row, the producer goes on as if nobody were there: it updates
/// and deletes its own barrier rows and inserts more beside them without waiting, and in a
/// deadlock with a lighter transaction it is not the victim — the watcher holds no lock, so it
/// is in no cycle and adds nothing to the producer's weight.
#[test]
fn a_watched_producer_never_waits_and_wins_its_deadlock() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Root>(&tx), |b| b.workers(1));
    let mut setup = env.db.connect();
    Root::exec(
        &mut setup,
        "CREATE TABLE locks (id INT PRIMARY KEY, v INT NOT NULL) ENGINE = InnoDB; \
         INSERT INTO locks VALUES (1, 0), (2, 0)",
    );
    let (id, dropped) = (next_id(), next_id());
    let (ready_tx, ready_rx) = unbounded::<()>();
    let (go_tx, go_rx) = unbounded::<()>();
    // The light transaction: one row.
    let url = env.db.url();
    let light = std::thread::spawn(move || {
        let mut c = MysqlConnection::establish(&url).expect("connect");
        c.transaction(|c| {
            Root::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 2");
            ready_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            diesel::sql_query("UPDATE locks SET v = v + 1 WHERE id = 1").execute(c)
        })
    });
    let mut conn = env.db.connect();
    conn.transaction(|c| {
        insert_order::<Root>(c, id, "paid");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        insert_order::<Root>(c, dropped, "paid");
        let dropped_jid = c.enqueue_with_barrier(&env.producer, env.job(PAID, dropped))?;
        worker.wait_for_waiting(2);
        wait_for_watchers(&env.db, 1);
        // Its own rows, and the gaps beside them: nothing waits.
        let started = Instant::now();
        Root::exec(c, "UPDATE dtb_barriers SET pushed_at = NOW(6)");
        Root::exec(
            c,
            &format!(
                "DELETE FROM dtb_barriers WHERE job_id = '{}'",
                dropped_jid.as_str()
            ),
        );
        for _ in 0..20 {
            let more = next_id();
            insert_order::<Root>(c, more, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, more))?;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the producer never waited"
        );
        // The deadlock: the light transaction holds row 2 and will ask for row 1.
        Root::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 1");
        ready_rx.recv().unwrap();
        go_tx.send(()).unwrap();
        Root::exec(c, "UPDATE locks SET v = v + 1 WHERE id = 2");
        Ok::<_, Error>(())
    })
    .expect("the producer commits");
    let light = light.join().unwrap();
    assert!(
        light.is_err(),
        "the light transaction is the deadlock's victim"
    );
    let ran = expect_run(&rx);
    assert!(ran.seen_status.is_some());
    // Twenty-one jobs committed (the dropped one's barrier went with its delete).
    let mut ran_ids = vec![ran.order_id];
    while ran_ids.len() < 21 {
        ran_ids.push(expect_run(&rx).order_id);
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
#[test]
fn more_transactions_than_watchers() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Root>(&tx), |b| b.workers(2).commit_watchers(2));
    let ids: Vec<i64> = (0..5).map(|_| next_id()).collect();
    let (release_tx, release_rx) = unbounded::<()>();
    let producers: Vec<_> = ids
        .iter()
        .map(|&id| {
            let url = env.db.url();
            let (producer, job) = (env.producer.clone(), env.job(PAID, id));
            let release = release_rx.clone();
            std::thread::spawn(move || {
                let mut c = MysqlConnection::establish(&url).expect("connect");
                c.transaction(|c| {
                    insert_order::<Root>(c, id, "paid");
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
        watchers(&env.db).len(),
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

/// After `id` ran: it ran once, and nothing is left.
fn expect_ran_once_after(env: &Env<Root>, rx: &crossbeam_channel::Receiver<Ran>, id: i64) {
    assert!(drain_with_sentinel(env, rx).is_empty());
    assert_eq!(runs_of(&env.db, id), 1);
    assert_eq!(env.db.barrier_rows(), 0);
}
