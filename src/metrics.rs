//! The worker's metrics, through the [`metrics`](https://docs.rs/metrics) facade (cargo
//! feature `metrics`).
//!
//! With the feature on, a worker records what its [`WorkerMonitor`](crate::WorkerMonitor)
//! counts, and how long each delivery waited for its barrier, to whatever recorder the
//! application installed (a Prometheus exporter such as `metrics-exporter-prometheus`, StatsD,
//! ...). Without a recorder, or without the feature, nothing is recorded and nothing costs:
//! the recording functions are empty and inlined away.
//!
//! | name | type | what |
//! | --- | --- | --- |
//! | `dtb_jobs_processed_total` | counter | deliveries processed to the end, whatever the outcome |
//! | `dtb_jobs_ran_total` | counter | handlers that ran to success (and consumed their barrier, if any) |
//! | `dtb_jobs_aborted_total` | counter | jobs whose transaction did not commit |
//! | `dtb_jobs_duplicate_total` | counter | deliveries skipped: another delivery of the job consumed the barrier |
//! | `dtb_jobs_refused_total` | counter | deliveries refused: they carry the barrier of another job |
//! | `dtb_jobs_snoozed_total` | counter | deliveries handed back to Faktory (block limit, busy barrier, overflow, shutdown) |
//! | `dtb_jobs_parked_total` | counter | deliveries parked until their transaction ends (pushed back once it commits) |
//! | `dtb_jobs_overflowed_total` | counter | deliveries handed back because `max_waiting` jobs already waited (also snoozed) |
//! | `dtb_jobs_timed_out_total` | counter | jobs failed with `BarrierTimeout` |
//! | `dtb_jobs_failed_total` | counter | deliveries that ended in a failure reported to Faktory |
//! | `dtb_jobs_waiting` | gauge | jobs fetched and waiting for their transactions now |
//! | `dtb_handlers_running` | gauge | handlers running now |
//! | `dtb_barrier_wait_seconds` | histogram | time from a delivery's registration with the waiter to its verdict; label `verdict`: `committed`, `not_committed`, `pending` (the block limit ended the wait), `overflow`, `shutting_down` |
//! | `dtb_barriers_reaped_total` | counter | barrier rows deleted by the reaper |
//! | `dtb_jobs_repushed_total` | counter | jobs pushed again by the reconciler |
//!
//! The names are the constants of this module. Every worker of a process records into the same
//! series; the recorder (or its exporter) adds whatever labels tell processes apart. Install the
//! recorder before the first worker connects: the metrics' units and help texts are described
//! to the recorder installed then, and every counter and gauge is recorded at zero, so that its
//! series exists from the start (the histogram's appear with their first sample of each
//! verdict).

/// Counter: deliveries processed to the end, whatever the outcome.
pub const JOBS_PROCESSED: &str = "dtb_jobs_processed_total";
/// Counter: handlers that ran to success.
pub const JOBS_RAN: &str = "dtb_jobs_ran_total";
/// Counter: jobs whose transaction did not commit.
pub const JOBS_ABORTED: &str = "dtb_jobs_aborted_total";
/// Counter: deliveries skipped because another delivery consumed the barrier.
pub const JOBS_DUPLICATE: &str = "dtb_jobs_duplicate_total";
/// Counter: deliveries refused because they carry the barrier of another job (see
/// [`Error::ForeignBarrier`](crate::Error::ForeignBarrier)).
pub const JOBS_REFUSED: &str = "dtb_jobs_refused_total";
/// Counter: deliveries handed back to Faktory without running.
pub const JOBS_SNOOZED: &str = "dtb_jobs_snoozed_total";
/// Counter: deliveries parked until their transaction ends (see
/// [`WorkerMonitor::parked`](crate::WorkerMonitor::parked)).
pub const JOBS_PARKED: &str = "dtb_jobs_parked_total";
/// Counter: deliveries handed back because too many jobs already waited.
pub const JOBS_OVERFLOWED: &str = "dtb_jobs_overflowed_total";
/// Counter: jobs failed with [`Error::BarrierTimeout`](crate::Error::BarrierTimeout).
pub const JOBS_TIMED_OUT: &str = "dtb_jobs_timed_out_total";
/// Counter: deliveries that ended in a failure reported to Faktory.
pub const JOBS_FAILED: &str = "dtb_jobs_failed_total";
/// Gauge: jobs waiting for their transactions now.
pub const JOBS_WAITING: &str = "dtb_jobs_waiting";
/// Gauge: handlers running now.
pub const HANDLERS_RUNNING: &str = "dtb_handlers_running";
/// Histogram, in seconds: how long a delivery waited for its barrier's verdict.
pub const BARRIER_WAIT_SECONDS: &str = "dtb_barrier_wait_seconds";
/// The label of [`BARRIER_WAIT_SECONDS`] that names the verdict.
pub const VERDICT_LABEL: &str = "verdict";
/// Counter: barrier rows deleted by the reaper.
pub const BARRIERS_REAPED: &str = "dtb_barriers_reaped_total";
/// Counter: jobs pushed again by the reconciler.
pub const JOBS_REPUSHED: &str = "dtb_jobs_repushed_total";

#[cfg(feature = "metrics")]
mod record {
    use ::metrics::{
        counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
    };

    /// Adds `n` to counter `name`.
    pub(crate) fn count(name: &'static str, n: u64) {
        counter!(name).increment(n);
    }

    /// Adds `delta` (positive or negative) to gauge `name`.
    pub(crate) fn gauge_add(name: &'static str, delta: f64) {
        if delta >= 0.0 {
            gauge!(name).increment(delta);
        } else {
            gauge!(name).decrement(-delta);
        }
    }

    /// Records one barrier wait.
    pub(crate) fn barrier_wait(verdict: &'static str, waited: std::time::Duration) {
        histogram!(super::BARRIER_WAIT_SECONDS, super::VERDICT_LABEL => verdict)
            .record(waited.as_secs_f64());
    }

    /// Describes every metric to the recorder installed now, and records each counter and
    /// gauge at zero; once per process.
    pub(crate) fn describe() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            use super::*;
            let counters = [
                (
                    JOBS_PROCESSED,
                    "Deliveries processed to the end, whatever the outcome.",
                ),
                (JOBS_RAN, "Handlers that ran to success."),
                (JOBS_ABORTED, "Jobs whose transaction did not commit."),
                (
                    JOBS_DUPLICATE,
                    "Deliveries skipped: another delivery consumed the barrier.",
                ),
                (
                    JOBS_REFUSED,
                    "Deliveries refused: they carry the barrier of another job.",
                ),
                (
                    JOBS_SNOOZED,
                    "Deliveries handed back to Faktory without running.",
                ),
                (
                    JOBS_PARKED,
                    "Deliveries parked until their transaction ends.",
                ),
                (
                    JOBS_OVERFLOWED,
                    "Deliveries handed back: max_waiting jobs already waited.",
                ),
                (JOBS_TIMED_OUT, "Jobs failed with BarrierTimeout."),
                (
                    JOBS_FAILED,
                    "Deliveries that ended in a failure reported to Faktory.",
                ),
                (BARRIERS_REAPED, "Barrier rows deleted by the reaper."),
                (JOBS_REPUSHED, "Jobs pushed again by the reconciler."),
            ];
            for (name, help) in counters {
                describe_counter!(name, Unit::Count, help);
                counter!(name).increment(0);
            }
            describe_gauge!(
                JOBS_WAITING,
                Unit::Count,
                "Jobs waiting for their transactions."
            );
            describe_gauge!(HANDLERS_RUNNING, Unit::Count, "Handlers running.");
            for name in [JOBS_WAITING, HANDLERS_RUNNING] {
                gauge!(name).increment(0.0);
            }
            describe_histogram!(
                BARRIER_WAIT_SECONDS,
                Unit::Seconds,
                "Time from a delivery's registration with the waiter to its verdict."
            );
        });
    }
}

#[cfg(not(feature = "metrics"))]
mod record {
    #[inline(always)]
    pub(crate) fn count(_name: &'static str, _n: u64) {}

    #[inline(always)]
    pub(crate) fn gauge_add(_name: &'static str, _delta: f64) {}

    #[inline(always)]
    pub(crate) fn barrier_wait(_verdict: &'static str, _waited: std::time::Duration) {}

    #[inline(always)]
    pub(crate) fn describe() {}
}

pub(crate) use record::{barrier_wait, count, describe, gauge_add};
