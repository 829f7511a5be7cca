//! The barrier contract on real PostgreSQL (`PG_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test gets a schema of its own.
#![cfg(feature = "postgres")]

mod common;
#[path = "postgres/watchers.rs"]
mod watchers;

use common::pg::Pg;
use common::*;
use crossbeam_channel::unbounded;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Job};

common::suite::scenario_tests! {
    Pg;
    exclude {}
}

// ---------------------------------------------------------------------------------------------
// What another session, or the producer's own settings, could do to a waiting job.

/// Any session may `NOTIFY` the channel earlier versions listened on with a waiting job's
/// barrier id (it is in the job's payload, and no privilege is needed). The worker listens to
/// no channel, and its checks find the transaction still running: the job keeps waiting, and
/// runs once it commits.
#[test]
fn forged_notify_is_not_a_commit() {
    let env = Env::<Pg>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<Pg>(&tx), 1);
    let id = next_id();
    let mut conn = env.db.connect();
    let mut forger = env.db.connect();
    conn.transaction(|c| {
        insert_order::<Pg>(c, id, "new");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        let barrier = Pg::query_string(c, "SELECT id FROM dtb_barriers").expect("the row");
        worker.wait_for_waiting(1);
        Pg::exec(&mut forger, &format!("NOTIFY dtb_barriers, '{barrier}'"));
        Pg::exec(
            &mut forger,
            &format!("SELECT pg_notify('dtb_barriers', '{barrier}')"),
        );
        expect_no_run(&rx, "the transaction is still open");
        assert_eq!(
            worker.monitor.duplicates(),
            0,
            "not taken for a consumed barrier"
        );
        assert_eq!(worker.monitor.aborted(), 0, "not taken for a rollback");
        assert_eq!(worker.monitor.waiting(), 1, "still waiting");
        set_status::<Pg>(c, id, "paid");
        Ok::<_, Error>(())
    })
    .unwrap();
    expect_ran_once(&env, &rx, id);
}

/// A barrier written late in a long transaction is stamped with the time it was written, not
/// with the transaction's start (`now()`): the reconciler's grace period and the reaper's age
/// count from the push.
#[test]
fn barrier_rows_are_stamped_when_written() {
    let env = Env::<Pg>::new();
    let mut conn = env.db.connect();
    let result = conn.transaction(|c| {
        Pg::exec(c, "SELECT pg_sleep(0.2)");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, next_id()))?;
        for column in ["created_at", "pushed_at"] {
            let after_start = Pg::query_i64(
                c,
                &format!(
                    "SELECT (EXTRACT(EPOCH FROM {column} - now()) * 1000)::bigint \
                     FROM dtb_barriers"
                ),
            )
            .expect("the row");
            assert!(
                after_start >= 150,
                "{column} is {after_start} ms after the transaction's start"
            );
        }
        Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
    });
    assert!(result.is_err());
}

/// A transaction that turned `synchronous_commit` off would let its waiting job start before
/// its commit reached the disk: enqueueing makes it flush locally; stronger settings stay.
#[test]
fn enqueueing_makes_the_commit_durable() {
    let env = Env::<Pg>::new();
    let mut conn = env.db.connect();
    for (asked, kept) in [
        ("off", "local"),
        ("local", "local"),
        ("on", "on"),
        ("remote_apply", "remote_apply"),
    ] {
        let result = conn.transaction(|c| {
            Pg::exec(c, &format!("SET LOCAL synchronous_commit = {asked}"));
            c.enqueue_with_barrier(&env.producer, env.job(PAID, next_id()))?;
            let now = Pg::query_string(c, "current_setting('synchronous_commit')");
            assert_eq!(now.as_deref(), Some(kept), "asked for {asked}");
            Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
        });
        assert!(result.is_err());
    }
    // Outside the transaction, the session's own setting is untouched.
    let now = Pg::query_string(&mut conn, "current_setting('synchronous_commit')");
    assert_eq!(now.as_deref(), Some("on"));
}

/// A producer that turns `synchronous_commit` off after its enqueue (a later `SET LOCAL`
/// undoes anything the enqueue set) commits visibly before its commit record is flushed. The
/// worker does not trust the producer's settings: it starts the handler only once the WAL is
/// flushed past the commit. Each handler's first statement finds the flush position past the
/// position the producer read just before its `COMMIT`, in every try.
#[test]
fn asynchronous_commit_after_the_enqueue_waits_for_the_flush() {
    const TRIES: usize = 12;
    let env = Env::<Pg>::new();
    let (tx, rx) = unbounded();
    let handlers = diesel_transaction_barrier::Handlers::new().register(
        PAID,
        move |job: &Job, c: &mut PgConnection| -> Result<(), std::io::Error> {
            // First: where the WAL is flushed now, against where the producer's WAL stood
            // before its commit record was written.
            let id = job.args()[0].as_i64().unwrap();
            let durable = Pg::query_i64(
                c,
                &format!(
                    "SELECT (pg_current_wal_flush_lsn() >= status::pg_lsn)::int \
                     FROM orders WHERE id = {id}"
                ),
            );
            let _ = tx.send((id, durable == Some(1)));
            Ok(())
        },
    );
    let worker = env.start_worker(handlers, 1);
    let mut conn = env.db.connect();
    for _ in 0..TRIES {
        let id = next_id();
        conn.transaction(|c| {
            insert_order::<Pg>(c, id, "new");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
            worker.wait_for_waiting(1);
            Pg::exec(c, "SET LOCAL synchronous_commit = off");
            Pg::exec(
                c,
                &format!(
                    "UPDATE orders SET status = pg_current_wal_insert_lsn()::text WHERE id = {id}"
                ),
            );
            Ok::<_, Error>(())
        })
        .unwrap();
        let (ran, durable) = rx.recv_timeout(EVENTUALLY).expect("the handler runs");
        assert_eq!(ran, id);
        assert!(durable, "the handler started before the commit was flushed");
    }
}

/// A waiter takes its checking connection and, with commit hints on, its watchers' from the
/// pool: with hints or watchers off, four fewer.
#[test]
fn a_waiter_without_watchers_needs_four_connections_fewer() {
    let env = Env::<Pg>::new();
    let builder = || {
        diesel_transaction_barrier::WorkerBuilder::new(env.db.pool(2))
            .url(env.faktory.url())
            .workers(1)
    };
    let err = builder().connect().unwrap_err();
    assert_pool_too_small(&err, 2, 6);
    builder().commit_hints(false).connect().expect("hints off");
    builder().commit_watchers(0).connect().expect("no watchers");
}
