//! The list of shared scenarios, and the macro that makes a backend's tests of them.
//!
//! A backend file calls [`scenario_tests!`] once with its `TestDb` and the scenarios it
//! excludes, each with the reason:
//!
//! ```ignore
//! common::suite::scenario_tests! {
//!     Lite;
//!     exclude {
//!         waiter_connections_killed_mid_wait: "SQLite has no server sessions to kill",
//!     }
//! }
//! ```
//!
//! Every scenario becomes a `#[test]` of the same name that runs
//! `common::scenarios::<name>::<Lite>()`; an excluded one is `#[ignore]`d with its reason
//! (`--ignored` still runs it). An excluded name that is not in the list does not compile.
//! The backend's `worker_child` test, the worker process the fault scenarios start, comes
//! with it.
//!
//! `mod <name>: <TestDb>; only { ... }` makes tests of the named scenarios only, in a module
//! of their own: for a second configuration of a backend that needs only a few of them.

/// Makes a backend's tests of the shared scenarios; see the [module documentation](self).
/// (Unused in the binaries that make none.)
#[allow(unused_macros)]
macro_rules! scenario_tests {
    ($db:ty; exclude { $($excluded:ident: $reason:literal),* $(,)? }) => {
        $crate::common::suite::scenario_tests!(@list ($) exclude $db; { $($excluded: $reason),* });
    };
    (mod $module:ident: $db:ty; only { $($name:ident),* $(,)? }) => {
        $crate::common::suite::scenario_tests!(@list ($) only $module $db; { $($name),* });
    };

    // The shared scenarios, in the order of `common::scenarios`.
    (@list ($d:tt) $($args:tt)*) => {
        $crate::common::suite::scenario_tests!(@$($args)* [
            commit_runs_after_commit,
            error_rolls_back,
            panic_rolls_back,
            killed_producer_aborts,
            rolled_back_savepoint_never_runs,
            released_savepoint_runs,
            autocommit_runs_without_barrier,
            barrier_required_and_opt_out,
            inline_runs_at_once,
            fetched_after_commit_runs_at_once,
            duplicate_delivery_runs_once,
            faktory_unreachable_rolls_back,
            missing_migrations_are_reported,
            many_waiting_jobs_hold_few_connections,
            snoozed_after_block_limit,
            barrier_timeout_after_deadline,
            reaper_deletes_old_barriers,
            graceful_shutdown_loses_nothing,
            bad_input_fails_cleanly,
            broker_loss_is_reconciled,
            backlog_is_repushed_at_most_once_per_grace,
            waiter_connections_killed_mid_wait,
            faktory_restart_while_worker_runs,
            manual_transaction_rolled_back_never_runs,
            manual_transaction_committed_runs_after_commit,
            pooled_connection_left_in_a_transaction,
            barrier_in_another_table_is_refused,
            enqueue_after_a_failed_savepoint,
            handler_recovering_from_a_failed_savepoint_runs,
            soak_with_oracle,
            worker_killed_mid_wait_and_mid_handler,
            forged_descriptor_cannot_steal_a_barrier,
            awkward_payloads_still_bind,
            swallowed_push_failure_leaves_nothing,
            swallowed_lost_push_answer_runs_nothing,
            failed_job_survives_broker_loss,
            bulk_enqueue_commits,
            bulk_enqueue_rolls_back,
            bulk_push_cut_mid_batch_and_swallowed_runs_nothing,
            bulk_push_answer_lost_rolls_back,
            bulk_enqueue_outside_a_transaction_and_inline,
            worker_killed_with_parked_jobs,
            detached_handler_runs_after_commit_only,
            detached_job_is_acknowledged_after_its_barrier_is_deleted,
            detached_forged_descriptor_is_refused,
            detached_duplicate_delivery_runs_once,
            detached_worker_killed_before_the_deletion_runs_again,
            a_dead_kept_connection_fails_no_job,
        ] ($d));
    };

    (@exclude $db:ty; { $($excluded:ident: $reason:literal),* } [$($name:ident),* $(,)?] ($d:tt)) => {
        /// One variant per shared scenario: an exclusion that names none does not compile.
        #[allow(non_camel_case_types, dead_code)]
        enum SharedScenario {
            $($name),*
        }
        $(const _: SharedScenario = SharedScenario::$excluded;)*

        macro_rules! shared_scenario_test {
            $(
                ($excluded) => {
                    #[test]
                    #[ignore = $reason]
                    fn $excluded() {
                        $crate::common::scenarios::$excluded::<$db>();
                    }
                };
            )*
            ($d name:ident) => {
                #[test]
                fn $d name() {
                    if <$db as $crate::common::TestDb>::skipped() {
                        return;
                    }
                    $crate::common::scenarios::$d name::<$db>();
                }
            };
        }
        $(shared_scenario_test!($name);)*

        /// The worker process of the fault scenarios; does nothing unless started by one.
        #[test]
        #[ignore = "the child process of the worker-killing tests"]
        fn worker_child() {
            $crate::common::faults::worker_child_main::<$db>();
        }
    };

    (@only $module:ident $db:ty; { $($only:ident),* } [$($name:ident),* $(,)?] ($d:tt)) => {
        mod $module {
            use super::*;

            /// One variant per shared scenario: a name that is none does not compile.
            #[allow(non_camel_case_types, dead_code)]
            enum SharedScenario {
                $($name),*
            }

            $(
                #[test]
                fn $only() {
                    const _: SharedScenario = SharedScenario::$only;
                    if <$db as $crate::common::TestDb>::skipped() {
                        return;
                    }
                    $crate::common::scenarios::$only::<$db>();
                }
            )*
        }
    };
}

#[allow(unused_imports)]
pub(crate) use scenario_tests;
