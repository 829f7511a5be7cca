//! Handing a delivery back to Faktory without running it: a snooze pushes a copy of the job
//! (see `crate::repush`) and lets this delivery be acknowledged.

use super::monitor::Stats;
use super::Shared;
use crate::backend::BarrierConnection;
use crate::descriptor::BarrierRef;
use crate::error::{Error, Result};
use crate::repush::{self, SNOOZES_KEY};
use faktory::Job;
use std::time::Duration;

/// How far ahead jobs handed back at shutdown are scheduled; see [`hand_back`].
pub(super) const SHUTDOWN_HAND_BACK_DELAY: Duration = Duration::from_secs(4);

/// The longest delay of a job handed back again and again.
const MAX_DELAY: Duration = Duration::from_secs(60);

/// `base`, doubled for each time `job` was handed back already, at most a minute: a job whose
/// transaction stays open comes back less and less often.
pub(super) fn growing_delay(job: &Job, base: Duration) -> Duration {
    let handed_back = job
        .custom
        .get(SNOOZES_KEY)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0)
        .min(16);
    base.saturating_mul(1 << handed_back).min(MAX_DELAY)
}

/// Hands a job back to Faktory without running it (shutdown, or too many waiting): when too
/// many wait, a little later each time the same job comes back ([`growing_delay`]).
///
/// On shutdown the copy is scheduled a few seconds ahead: `FETCH`es this worker issued just
/// before it stopped are still blocked on the server (for up to 2 s), and a job handed to a
/// connection that has since closed stays reserved until its `reserve_for` runs out.
pub(super) fn hand_back<C: BarrierConnection>(
    shared: &Shared<C>,
    job: &Job,
    b: Option<&BarrierRef>,
    why: &str,
) -> Result<()> {
    let delay = if shared.is_draining() {
        shared.config.snooze_delay.max(SHUTDOWN_HAND_BACK_DELAY)
    } else {
        growing_delay(
            job,
            shared.config.snooze_delay.max(shared.config.overflow_delay),
        )
    };
    snooze(shared, job, b, delay, why)
}

/// Pushes a copy of `job` (same payload, new jid, `at` = now + `delay` when positive) and lets
/// this delivery be acknowledged; counted as snoozed.
///
/// If the worker dies between the push and the ACK, both copies exist: the barrier row's
/// consumption makes sure the handler runs for one of them only.
pub(super) fn snooze<C: BarrierConnection>(
    shared: &Shared<C>,
    job: &Job,
    b: Option<&BarrierRef>,
    delay: Duration,
    why: &str,
) -> Result<()> {
    let value = serde_json::to_value(job).map_err(|source| Error::JobEncoding {
        jid: job.id().to_string(),
        source,
    })?;
    let copy = repush::copy(value, SNOOZES_KEY, delay, None).ok_or_else(|| Error::JobEncoding {
        jid: job.id().to_string(),
        source: serde::de::Error::custom("the job's JSON form does not read back as a job"),
    })?;
    shared.producer.push_barrier_job(copy.job)?;
    Stats::count(&shared.stats.snoozed);
    tracing::info!(barrier_id = ?b.map(|b| b.id), jid = job.id().as_str(), new_jid = copy.jid.as_str(), kind = %job.kind, snoozes = copy.count, reason = why, "job snoozed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_backs_wait_longer_and_longer() {
        let mut job = Job::new("kind", vec![1]);
        let base = Duration::from_millis(500);
        assert_eq!(growing_delay(&job, base), base);
        job.custom.insert(SNOOZES_KEY.into(), 3.into());
        assert_eq!(growing_delay(&job, base), Duration::from_secs(4));
        job.custom.insert(SNOOZES_KEY.into(), 1000.into());
        assert_eq!(growing_delay(&job, base), MAX_DELAY);
        job.custom.insert(SNOOZES_KEY.into(), "nonsense".into());
        assert_eq!(growing_delay(&job, base), base);
    }
}
