//! The database server restarted (crash-like) while a worker waits: committed jobs still run,
//! the transactions the restart killed count as not committed — judged by the barrier row,
//! never by a transaction id the server may hand out again after recovery.
//!
//! It restarts the server the whole machine uses, so its tests are `#[ignore]`d (a plain
//! `cargo test` lists them as ignored, with the reason), run only when asked for with
//! `--ignored` and `DTB_DB_RESTART=1` (CI does both), and live in test binaries of their own
//! (cargo runs test binaries one at a time).

use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::testing::JobEventKind;
use diesel_transaction_barrier::Error;

/// Fails the test unless `DTB_DB_RESTART=1` confirms that the database server may be
/// restarted: a restart test run by `--ignored` or `--include-ignored` alone neither restarts
/// the server nor passes.
pub fn require_restart_permission() {
    assert!(
        std::env::var("DTB_DB_RESTART").as_deref() == Ok("1"),
        "this test restarts the machine's database server; it runs only with DTB_DB_RESTART=1: \
         DTB_DB_RESTART=1 cargo test --all-features --test postgres_restart \
         --test mysql_restart -- --ignored"
    );
}

/// `restart` restarts the server and returns once it accepts connections again.
pub fn database_restart_mid_wait<D: TestDb>(restart: impl FnOnce()) {
    use diesel_transaction_barrier::testing::{TestFaktory, TestServer};
    // A handler whose consuming transaction the restart kills fails, and Faktory retries it:
    // soon on the test server, after 15-45 s on a real one.
    let faktory = TestFaktory::from_env_or_start_with(
        TestServer::builder().retry_delay(Duration::from_millis(200)),
    )
    .unwrap();
    let env = Env::<D>::with_db_and_faktory(D::create(), faktory);
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<D>(&tx), 2);
    let (open_id, committed_id) = (next_id(), next_id());
    let (ready_tx, ready_rx) = unbounded::<()>();
    let (jid_tx, jid_rx) = unbounded::<String>();
    std::thread::scope(|s| {
        let env = &env;
        // A transaction that the restart kills.
        let holder = s.spawn(move || {
            let mut conn = env.db.connect();
            let _ = conn.transaction(|c| {
                insert_order::<D>(c, open_id, "paid");
                let jid = c.enqueue_with_barrier(&env.producer, env.job(PAID, open_id))?;
                jid_tx.send(jid.as_str().to_string()).unwrap();
                ready_tx.send(()).unwrap();
                // Keep the transaction open until the server goes away under it.
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    if D::try_exec(c, "SELECT 1").is_err() {
                        return Err(Error::Database(diesel::result::Error::RollbackTransaction));
                    }
                }
                #[allow(unreachable_code)]
                Ok::<_, Error>(())
            });
        });
        ready_rx.recv().unwrap();
        worker.wait_for_waiting(1);
        // A transaction that commits just before the restart.
        commit_order(env, committed_id, env.job(PAID, committed_id));
        restart();
        holder.join().unwrap();
    });
    let jid = jid_rx.recv().unwrap();
    // After recovery a new transaction may be handed the killed one's id: keep one open
    // while the worker judges the killed transaction's barrier.
    let mut reuse = env.db.connect();
    reuse
        .transaction(|c| {
            insert_order::<D>(c, next_id(), "reuse");
            let mut ran = Vec::new();
            wait_until("the committed job to run", Duration::from_secs(60), || {
                ran.extend(rx.try_iter());
                ran.iter().any(|r: &Ran| r.order_id == committed_id)
            });
            wait_until(
                "the killed transaction's job to be aborted",
                Duration::from_secs(60),
                || worker.monitor.aborted() >= 1,
            );
            assert!(
                ran.iter().all(|r| r.order_id != open_id),
                "a job of a killed transaction ran"
            );
            Ok::<_, Error>(())
        })
        .unwrap();
    // The committed job runs to completion exactly once, even if the restart killed the
    // transaction of a first run.
    wait_until(
        "the committed job's run to commit",
        Duration::from_secs(90),
        || runs_of(&env.db, committed_id) == 1,
    );
    // A run whose transaction the restart killed reported before it died: only the committed
    // job may show up here.
    for ran in rx.try_iter() {
        assert_eq!(
            ran.order_id, committed_id,
            "only the committed job ran: {ran:?}"
        );
    }
    expect_no_run(&rx, "nothing else");
    assert_eq!(runs_of(&env.db, committed_id), 1);
    assert_eq!(runs_of(&env.db, open_id), 0);
    wait_until("no barrier left", EVENTUALLY, || env.db.barrier_rows() == 0);
    if let Some(server) = env.faktory.server_or_skip("the killed job's history") {
        assert!(server.wait_until_history(&jid, JobEventKind::Acked, EVENTUALLY));
    }
}
