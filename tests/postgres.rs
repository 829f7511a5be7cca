//! The barrier contract on real PostgreSQL (`PG_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`). Each test gets a schema of its own.
#![cfg(feature = "postgres")]

mod common;

use common::pg::Pg;
use common::scenarios;

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
