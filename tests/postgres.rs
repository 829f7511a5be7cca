//! The barrier contract on real PostgreSQL (`PG_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test gets a schema of its own.
#![cfg(feature = "postgres")]

mod common;

use common::pg::Pg;
use common::scenarios;
use common::*;
use crossbeam_channel::unbounded;
use diesel::prelude::*;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error};

#[test]
fn commit_runs_after_commit() {
    scenarios::commit_runs_after_commit::<Pg>();
}

#[test]
fn error_rolls_back() {
    scenarios::error_rolls_back::<Pg>();
}

#[test]
fn panic_rolls_back() {
    scenarios::panic_rolls_back::<Pg>();
}

#[test]
fn killed_producer_aborts() {
    scenarios::killed_producer_aborts::<Pg>();
}

#[test]
fn rolled_back_savepoint_never_runs() {
    scenarios::rolled_back_savepoint_never_runs::<Pg>();
}

#[test]
fn released_savepoint_runs() {
    scenarios::released_savepoint_runs::<Pg>();
}

#[test]
fn autocommit_runs_without_barrier() {
    scenarios::autocommit_runs_without_barrier::<Pg>();
}

#[test]
fn manual_transaction_rolled_back_never_runs() {
    scenarios::manual_transaction_rolled_back_never_runs::<Pg>();
}

#[test]
fn manual_transaction_committed_runs_after_commit() {
    scenarios::manual_transaction_committed_runs_after_commit::<Pg>();
}

#[test]
fn pooled_connection_left_in_a_transaction() {
    scenarios::pooled_connection_left_in_a_transaction::<Pg>();
}

#[test]
fn barrier_in_another_table_is_refused() {
    scenarios::barrier_in_another_table_is_refused::<Pg>();
}

#[test]
fn enqueue_after_a_failed_savepoint() {
    scenarios::enqueue_after_a_failed_savepoint::<Pg>();
}

#[test]
fn handler_recovering_from_a_failed_savepoint_runs() {
    scenarios::handler_recovering_from_a_failed_savepoint_runs::<Pg>();
}

#[test]
fn barrier_required_and_opt_out() {
    scenarios::barrier_required_and_opt_out::<Pg>();
}

#[test]
fn inline_runs_at_once() {
    scenarios::inline_runs_at_once::<Pg>();
}

#[test]
fn fetched_after_commit_runs_at_once() {
    scenarios::fetched_after_commit_runs_at_once::<Pg>();
}

#[test]
fn duplicate_delivery_runs_once() {
    scenarios::duplicate_delivery_runs_once::<Pg>();
}

#[test]
fn faktory_unreachable_rolls_back() {
    scenarios::faktory_unreachable_rolls_back::<Pg>();
}

#[test]
fn missing_migrations_are_reported() {
    scenarios::missing_migrations_are_reported::<Pg>();
}

#[test]
fn many_waiting_jobs_hold_few_connections() {
    scenarios::many_waiting_jobs_hold_few_connections::<Pg>();
}

#[test]
fn snoozed_after_block_limit() {
    scenarios::snoozed_after_block_limit::<Pg>();
}

#[test]
fn barrier_timeout_after_deadline() {
    scenarios::barrier_timeout_after_deadline::<Pg>(&["txid", "transaction:"]);
}

#[test]
fn reaper_deletes_old_barriers() {
    scenarios::reaper_deletes_old_barriers::<Pg>();
}

#[test]
fn graceful_shutdown_loses_nothing() {
    scenarios::graceful_shutdown_loses_nothing::<Pg>();
}

#[test]
fn bad_input_fails_cleanly() {
    scenarios::bad_input_fails_cleanly::<Pg>();
}

#[test]
fn soak_with_oracle() {
    common::soak::soak::<Pg>();
}

#[test]
fn broker_loss_is_reconciled() {
    scenarios::broker_loss_is_reconciled::<Pg>();
}

#[test]
fn backlog_is_repushed_at_most_once_per_grace() {
    scenarios::backlog_is_repushed_at_most_once_per_grace::<Pg>();
}

#[test]
fn waiter_connections_killed_mid_wait() {
    scenarios::waiter_connections_killed_mid_wait::<Pg>();
}

#[test]
fn faktory_restart_while_worker_runs() {
    scenarios::faktory_restart_while_worker_runs::<Pg>();
}

#[test]
fn worker_killed_mid_wait_and_mid_handler() {
    common::faults::worker_killed_mid_wait_and_mid_handler::<Pg>("worker_child");
}

/// The worker process of `worker_killed_mid_wait_and_mid_handler`; does nothing unless
/// started by it.
#[test]
#[ignore = "the child process of worker_killed_mid_wait_and_mid_handler"]
fn worker_child() {
    common::faults::worker_child_main::<Pg>();
}

// ---------------------------------------------------------------------------------------------
// What another session, or the producer's own settings, could do to a waiting job.

/// Any session may `NOTIFY` the barrier channel with a waiting job's barrier id (it is in the
/// job's payload, and no privilege is needed). The forged hint makes the worker look, and it
/// finds the transaction still running: the job keeps waiting, and runs once it commits.
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
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    assert_eq!(ran.seen_status.as_deref(), Some("paid"));
    assert!(drain_with_sentinel(&env, &rx).is_empty());
    assert_eq!(runs_of(&env.db, id), 1);
    assert_eq!(env.db.barrier_rows(), 0);
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
