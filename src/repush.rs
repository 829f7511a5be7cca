//! Copies of a job pushed again: by a worker that hands a delivery back (a snooze) and by the
//! reconciler (a committed barrier whose job no worker took). A copy keeps the payload and the
//! barrier descriptor, takes a new job id, drops the broker's bookkeeping, and counts itself in
//! `custom`. Whichever copy consumes the barrier first runs the handler; the others are
//! skipped as duplicates.

use crate::descriptor::CUSTOM_KEY;
use faktory::{Job, JobId};
use serde_json::{Map, Value};
use std::time::Duration;

/// The `custom` key that counts how often a job was snoozed.
pub(crate) const SNOOZES_KEY: &str = "transaction_barrier_snoozes";
/// The `custom` key that counts how often the reconciler pushed a job again.
pub(crate) const REPUSHES_KEY: &str = "transaction_barrier_repushes";

/// A copy of the job whose JSON form is `job`.
pub(crate) struct Copy {
    /// The job to push.
    pub(crate) job: Job,
    /// Its new job id.
    pub(crate) jid: JobId,
    /// How many copies of this kind (per `counter`) there have been, this one included.
    pub(crate) count: u64,
}

/// Builds a copy of `job` (a job's JSON form): a new job id, no `enqueued_at`, `at` set to
/// now + `delay` (none when `delay` is zero), `custom[counter]` incremented, and, when given,
/// `descriptor` as its barrier descriptor. `None` when `job` is not a job.
pub(crate) fn copy(
    mut job: Value,
    counter: &str,
    delay: Duration,
    descriptor: Option<Value>,
) -> Option<Copy> {
    let obj = job.as_object_mut()?;
    let jid = JobId::random();
    obj.insert("jid".into(), Value::from(jid.to_string()));
    obj.remove("enqueued_at");
    if delay.is_zero() {
        obj.remove("at");
    } else {
        let at = chrono::Utc::now() + chrono::Duration::from_std(delay).ok()?;
        obj.insert("at".into(), serde_json::to_value(at).ok()?);
    }
    let custom = obj
        .entry("custom")
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()?;
    if let Some(descriptor) = descriptor {
        custom.insert(CUSTOM_KEY.into(), descriptor);
    }
    let count = custom.get(counter).and_then(Value::as_u64).unwrap_or(0) + 1;
    custom.insert(counter.into(), Value::from(count));
    let job = serde_json::from_value(job).ok()?;
    Some(Copy { job, jid, count })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_the_payload_and_counts_itself() {
        let mut original = Job::new("kind", vec![1, 2]).on_queue("q");
        original.custom.insert("mine".into(), Value::from("kept"));
        let value = serde_json::to_value(&original).unwrap();
        let first = copy(value, SNOOZES_KEY, Duration::ZERO, None).unwrap();
        assert_ne!(first.jid, *original.id());
        assert_eq!(first.job.id(), &first.jid);
        assert_eq!(
            (first.job.kind.as_str(), first.job.queue.as_str()),
            ("kind", "q")
        );
        assert_eq!(first.job.args(), original.args());
        assert_eq!(first.job.custom["mine"], "kept");
        assert_eq!(first.count, 1);
        assert!(first.job.at.is_none());
        let value = serde_json::to_value(&first.job).unwrap();
        let second = copy(value, SNOOZES_KEY, Duration::from_secs(5), None).unwrap();
        assert_eq!(second.count, 2);
        assert!(second.job.at.is_some());
        let value = serde_json::to_value(&second.job).unwrap();
        let third = copy(value, REPUSHES_KEY, Duration::ZERO, Some(Value::from("d"))).unwrap();
        assert_eq!(
            (third.count, third.job.custom[SNOOZES_KEY].as_u64()),
            (1, Some(2))
        );
        assert_eq!(third.job.custom[CUSTOM_KEY], "d");
        assert!(copy(Value::from("not a job"), SNOOZES_KEY, Duration::ZERO, None).is_none());
    }
}
