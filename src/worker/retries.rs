//! When Faktory brings a failed job back: the worker records it with the barrier, so that the
//! reconciler can push a committed job again if Faktory loses it while it waits in the retry
//! set (a broker that lost its data), and leaves it to Faktory until then.

use faktory::Job;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Faktory's retry policy when a job names none (`retry` absent).
const DEFAULT_RETRIES: isize = 25;
/// How late Faktory's scheduler may move a due retry to its queue, on top of its schedule.
const SCHEDULER_SLACK: Duration = Duration::from_secs(15);

/// The longest delay Faktory gives each retry of a failed job; see
/// [`WorkerBuilder::retry_schedule`](crate::WorkerBuilder::retry_schedule).
#[derive(Clone)]
pub(crate) struct RetrySchedule(Arc<dyn Fn(usize) -> Duration + Send + Sync>);

impl fmt::Debug for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetrySchedule(..)")
    }
}

impl Default for RetrySchedule {
    /// Faktory 1.x: retry `n` (the first is 0) comes `n⁴ + 15 + r·(n + 1)` seconds after the
    /// failure, `r` random below 30; its scheduler moves it to its queue within seconds.
    fn default() -> Self {
        RetrySchedule::new(|n| {
            let n = u64::try_from(n).unwrap_or(u64::MAX);
            let secs = n
                .saturating_pow(4)
                .saturating_add(15)
                .saturating_add(29u64.saturating_mul(n.saturating_add(1)));
            Duration::from_secs(secs).saturating_add(SCHEDULER_SLACK)
        })
    }
}

impl RetrySchedule {
    pub(crate) fn new(f: impl Fn(usize) -> Duration + Send + Sync + 'static) -> Self {
        RetrySchedule(Arc::new(f))
    }

    /// After `job`'s handler failed (this delivery's failure not yet reported): how long until
    /// Faktory brings it back at the latest, or `None` when it will not (retries off, or
    /// exhausted: the job goes to the dead set). Follows Faktory's own rules: the first
    /// failure is retry 0, a job without `retry` gets 25 retries, `retry: 0` none at all.
    pub(crate) fn due(&self, job: &Job) -> Option<Duration> {
        let retries = job.retry.unwrap_or(DEFAULT_RETRIES);
        let count = job.failure().map_or(0, |f| f.retry_count.saturating_add(1));
        let more = usize::try_from(retries).is_ok_and(|retries| count < retries);
        more.then(|| (self.0)(count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed_job(retry: Option<isize>, retry_count: Option<usize>) -> Job {
        let mut value = serde_json::to_value(Job::new("kind", vec![1])).unwrap();
        if let Some(retry) = retry {
            value["retry"] = retry.into();
        }
        if let Some(count) = retry_count {
            value["failure"] = serde_json::json!({
                "retry_count": count,
                "remaining": 0,
                "failed_at": "2026-12-02T10:00:00Z",
                "message": "boom",
            });
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn follows_faktorys_schedule_and_policy() {
        let schedule = RetrySchedule::default();
        // First failure: retry 0, at most 15 + 29 s, and the scheduler's slack.
        assert_eq!(
            schedule.due(&failed_job(None, None)),
            Some(Duration::from_secs(44) + SCHEDULER_SLACK)
        );
        // Its retry failed too: retry 1, 1 + 15 + 58 s.
        assert_eq!(
            schedule.due(&failed_job(None, Some(0))),
            Some(Duration::from_secs(74) + SCHEDULER_SLACK)
        );
        // The 25th failure of a default job: no retry left, the dead set.
        assert_eq!(schedule.due(&failed_job(None, Some(24))), None);
        assert!(schedule.due(&failed_job(None, Some(23))).is_some());
        // Retries off, or negative: none.
        assert_eq!(schedule.due(&failed_job(Some(0), None)), None);
        assert_eq!(schedule.due(&failed_job(Some(-1), None)), None);
        assert_eq!(schedule.due(&failed_job(Some(2), Some(1))), None);
        // Absurd counts saturate instead of overflowing.
        let far = schedule.due(&failed_job(Some(isize::MAX), Some(1 << 40)));
        assert!(far.is_some_and(|d| d > Duration::from_secs(u64::MAX / 2)));
    }

    #[test]
    fn a_custom_schedule_is_used() {
        let schedule = RetrySchedule::new(|n| Duration::from_secs(n as u64 + 1));
        assert_eq!(
            schedule.due(&failed_job(None, Some(2))),
            Some(Duration::from_secs(4))
        );
    }
}
