//! A job payload kept as the JSON the producer sent.
//!
//! Every top-level field is stored as the exact text the producer sent (in its order), so
//! `custom`, `args` and any field this server does not know about come back byte for byte.
//! Only the fields the server itself manages (`queue`, `retry`, `created_at`, `enqueued_at`,
//! `failure`) are ever rewritten, as the real server rewrites them.

use crate::protocol::{format_time, parse_time};
use chrono::{DateTime, Utc};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::BTreeMap;
use std::fmt;

/// The default `retry` of a job that does not set one (the real server's
/// `RetryPolicyDefault`).
pub(crate) const DEFAULT_RETRY: i64 = 25;
/// The longest reservation the real server accepts, in seconds.
pub(crate) const MAX_RESERVE_FOR: i64 = 86_400;

/// A job as the server holds it.
#[derive(Clone)]
pub(crate) struct Job {
    fields: Vec<(String, Box<RawValue>)>,
    pub(crate) jid: String,
    pub(crate) jobtype: String,
    pub(crate) queue: String,
    pub(crate) retry: Option<i64>,
    pub(crate) reserve_for: i64,
    pub(crate) at: Option<String>,
    pub(crate) created_at: Option<String>,
    pub(crate) has_args: bool,
    pub(crate) failure: Option<Failure>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("jid", &self.jid)
            .field("jobtype", &self.jobtype)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// The `failure` object of a job, shaped and ordered like the real server's `client.Failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Failure {
    pub(crate) failed_at: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) next_at: String,
    #[serde(rename = "message", skip_serializing_if = "String::is_empty")]
    pub(crate) message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub(crate) errtype: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) backtrace: Vec<String>,
    pub(crate) retry_count: i64,
    #[serde(rename = "remaining")]
    pub(crate) remaining: i64,
}

/// The `failure` object as a producer may send it (every field optional, `null` allowed).
#[derive(Deserialize)]
struct FailureIn {
    failed_at: Option<String>,
    next_at: Option<String>,
    message: Option<String>,
    errtype: Option<String>,
    backtrace: Option<Vec<String>>,
    retry_count: Option<i64>,
    remaining: Option<i64>,
}

impl From<FailureIn> for Failure {
    fn from(f: FailureIn) -> Failure {
        Failure {
            failed_at: f.failed_at.unwrap_or_default(),
            next_at: f.next_at.unwrap_or_default(),
            message: f.message.unwrap_or_default(),
            errtype: f.errtype.unwrap_or_default(),
            backtrace: f.backtrace.unwrap_or_default(),
            retry_count: f.retry_count.unwrap_or_default(),
            remaining: f.remaining.unwrap_or_default(),
        }
    }
}

/// A JSON object read as an ordered list of `(key, raw value)` pairs. A repeated key keeps
/// its first position and its last value, like Go's decoder.
struct Fields(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Fields, D::Error> {
        struct FieldsVisitor;

        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut fields: Vec<(String, Box<RawValue>)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    match fields.iter_mut().find(|(k, _)| *k == key) {
                        Some(slot) => slot.1 = value,
                        None => fields.push((key, value)),
                    }
                }
                Ok(Fields(fields))
            }
        }

        deserializer.deserialize_map(FieldsVisitor)
    }
}

fn field<'a, T: Deserialize<'a>>(raw: &'a RawValue, name: &str, what: &str) -> Result<T, String> {
    serde_json::from_str(raw.get())
        .map_err(|_| format!("invalid JSON: field `{name}` must be {what}"))
}

fn to_raw<T: Serialize + ?Sized>(value: &T) -> Box<RawValue> {
    let text = serde_json::to_string(value).expect("plain data always serializes");
    RawValue::from_string(text).expect("serde_json output is valid JSON")
}

impl Job {
    /// Parses one job from the bytes of a `PUSH` command.
    ///
    /// Syntax errors and fields of the wrong type give an `invalid JSON: …` message, as the
    /// real server's JSON decoding does. Missing required fields are checked later by
    /// [`Job::validate`].
    pub(crate) fn parse(bytes: &[u8]) -> Result<Job, String> {
        let fields: Fields =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))?;
        Job::from_fields(fields.0)
    }

    /// Parses one element of a `PUSHB` array.
    pub(crate) fn parse_raw(raw: &RawValue) -> Result<Job, String> {
        Job::parse(raw.get().as_bytes())
    }

    fn from_fields(fields: Vec<(String, Box<RawValue>)>) -> Result<Job, String> {
        let mut job = Job {
            fields: Vec::new(),
            jid: String::new(),
            jobtype: String::new(),
            queue: String::new(),
            retry: None,
            reserve_for: 0,
            at: None,
            created_at: None,
            has_args: false,
            failure: None,
        };
        for (key, raw) in &fields {
            let raw: &RawValue = raw;
            match key.as_str() {
                "jid" => {
                    job.jid = field::<Option<String>>(raw, key, "a string")?.unwrap_or_default()
                }
                "jobtype" => {
                    job.jobtype = field::<Option<String>>(raw, key, "a string")?.unwrap_or_default()
                }
                "queue" => {
                    job.queue = field::<Option<String>>(raw, key, "a string")?.unwrap_or_default()
                }
                "args" => {
                    job.has_args = field::<Option<Vec<IgnoredAny>>>(raw, key, "an array")?.is_some()
                }
                "retry" => job.retry = field::<Option<i64>>(raw, key, "an integer")?,
                "reserve_for" => {
                    job.reserve_for =
                        field::<Option<i64>>(raw, key, "an integer")?.unwrap_or_default()
                }
                "backtrace" => {
                    field::<Option<i64>>(raw, key, "an integer")?;
                }
                "at" => {
                    job.at =
                        field::<Option<String>>(raw, key, "a string")?.filter(|s| !s.is_empty())
                }
                "created_at" => {
                    job.created_at =
                        field::<Option<String>>(raw, key, "a string")?.filter(|s| !s.is_empty())
                }
                "enqueued_at" => {
                    field::<Option<String>>(raw, key, "a string")?;
                }
                "custom" => {
                    field::<Option<BTreeMap<String, IgnoredAny>>>(raw, key, "an object")?;
                }
                "failure" => {
                    // serde would also take an array for a struct; Go does not.
                    if raw.get().starts_with('[') {
                        return Err("invalid JSON: field `failure` must be an object".into());
                    }
                    job.failure =
                        field::<Option<FailureIn>>(raw, key, "an object")?.map(Failure::from)
                }
                _ => {}
            }
        }
        job.fields = fields;
        Ok(job)
    }

    /// The checks the real server's `manager.Push` makes, with its messages.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.jid.len() < 8 {
            return Err("jobs must have a reasonable jid parameter".into());
        }
        if self.jobtype.is_empty() {
            return Err("jobs must have a jobtype parameter".into());
        }
        if !self.has_args {
            return Err("jobs must have an args parameter".into());
        }
        if self.reserve_for > MAX_RESERVE_FOR {
            return Err("jobs cannot be reserved for more than one day".into());
        }
        if let Some(at) = &self.at {
            if parse_time(at).is_none() {
                return Err(format!("invalid timestamp for 'at': {at:?}"));
            }
        }
        Ok(())
    }

    /// The time in `at`, when it is set and valid.
    pub(crate) fn at_time(&self) -> Option<DateTime<Utc>> {
        self.at.as_deref().and_then(parse_time)
    }

    /// Fills in what the server fills in when a job is pushed: `retry` (default 25) when
    /// missing or null, `created_at` when missing or empty, `queue` when missing or empty.
    pub(crate) fn prepare_for_push(&mut self, now: DateTime<Utc>) {
        if self.retry.is_none() {
            self.retry = Some(DEFAULT_RETRY);
            self.set("retry", &DEFAULT_RETRY);
        }
        if self.created_at.is_none() {
            let ts = format_time(now);
            self.set("created_at", &ts);
            self.created_at = Some(ts);
        }
        if self.queue.is_empty() {
            self.queue = "default".into();
            self.set("queue", "default");
        }
    }

    /// Stamps `enqueued_at`, as the server does every time a job enters a queue.
    pub(crate) fn mark_enqueued(&mut self, now: DateTime<Utc>) {
        self.set("enqueued_at", &format_time(now));
    }

    /// Stores `failure` into the payload.
    pub(crate) fn set_failure(&mut self, failure: Failure) {
        self.set("failure", &failure);
        self.failure = Some(failure);
    }

    /// Replaces a field's value in place, or appends the field.
    fn set<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) {
        let raw = to_raw(value);
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = raw,
            None => self.fields.push((key.to_string(), raw)),
        }
    }

    /// The payload as JSON text, fields in their original order.
    pub(crate) fn to_json(&self) -> String {
        let size: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let mut out = String::with_capacity(size + 2);
        out.push('{');
        for (i, (key, value)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(key).expect("strings always serialize"));
            out.push(':');
            out.push_str(value.get());
        }
        out.push('}');
        out
    }

    /// The payload as a `serde_json::Value`.
    pub(crate) fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.to_json()).expect("the payload is valid JSON")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2024, 5, 6, 7, 8, 9).unwrap()
    }

    #[test]
    fn keeps_fields_byte_for_byte_and_in_order() {
        let input = r#"{"zeta":1,"jid":"abcdefgh","custom":{"b": 12345678901234567890, "a":1.0e300,"ü":"✓"},"jobtype":"t","args":[1, 2]}"#;
        let job = Job::parse(input.as_bytes()).unwrap();
        assert_eq!(job.to_json(), input);
        assert_eq!(job.jid, "abcdefgh");
        assert_eq!(job.jobtype, "t");
        assert!(job.has_args);
        job.validate().unwrap();
    }

    #[test]
    fn push_fills_in_server_fields() {
        let mut job =
            Job::parse(br#"{"jid":"abcdefgh","jobtype":"t","args":[],"queue":""}"#).unwrap();
        job.prepare_for_push(now());
        job.mark_enqueued(now());
        assert_eq!(
            job.to_json(),
            r#"{"jid":"abcdefgh","jobtype":"t","args":[],"queue":"default","retry":25,"created_at":"2024-05-06T07:08:09Z","enqueued_at":"2024-05-06T07:08:09Z"}"#
        );
    }

    #[test]
    fn explicit_retry_and_created_at_are_kept() {
        let input =
            r#"{"jid":"abcdefgh","jobtype":"t","args":[],"retry":0,"created_at":"x","queue":"q"}"#;
        let mut job = Job::parse(input.as_bytes()).unwrap();
        job.prepare_for_push(now());
        assert_eq!(job.to_json(), input);
        assert_eq!(job.retry, Some(0));
    }

    #[test]
    fn repeated_keys_keep_the_last_value() {
        let job = Job::parse(br#"{"jid":"aaaaaaaa","x":1,"jid":"bbbbbbbb"}"#).unwrap();
        assert_eq!(job.jid, "bbbbbbbb");
        assert_eq!(job.to_json(), r#"{"jid":"bbbbbbbb","x":1}"#);
    }

    #[test]
    fn rejects_wrong_types_as_invalid_json() {
        for bad in [
            &br#"[1]"#[..],
            br#"{"jid":5}"#,
            br#"{"args":{}}"#,
            br#"{"args":"x"}"#,
            br#"{"retry":1.5}"#,
            br#"{"reserve_for":"60"}"#,
            br#"{"custom":[1]}"#,
            br#"{"failure":3}"#,
            br#"{"failure":["2024-01-01T00:00:00Z"]}"#,
            br#"{"jid":"abcdefgh""#,
            b"\xff",
        ] {
            let err = Job::parse(bad).unwrap_err();
            assert!(err.starts_with("invalid JSON"), "{err}");
        }
    }

    #[test]
    fn validation_mirrors_the_real_server() {
        let check = |s: &str| Job::parse(s.as_bytes()).unwrap().validate();
        assert_eq!(
            check(r#"{"jid":"short","jobtype":"t","args":[]}"#).unwrap_err(),
            "jobs must have a reasonable jid parameter"
        );
        assert_eq!(
            check(r#"{"jid":"abcdefgh","args":[]}"#).unwrap_err(),
            "jobs must have a jobtype parameter"
        );
        assert_eq!(
            check(r#"{"jid":"abcdefgh","jobtype":"t","args":null}"#).unwrap_err(),
            "jobs must have an args parameter"
        );
        assert_eq!(
            check(r#"{"jid":"abcdefgh","jobtype":"t","args":[],"reserve_for":86401}"#).unwrap_err(),
            "jobs cannot be reserved for more than one day"
        );
        assert!(
            check(r#"{"jid":"abcdefgh","jobtype":"t","args":[],"at":"soon"}"#)
                .unwrap_err()
                .starts_with("invalid timestamp for 'at'")
        );
        check(r#"{"jid":"abcdefgh","jobtype":"t","args":[],"at":""}"#).unwrap();
    }

    #[test]
    fn failure_is_shaped_like_the_real_one() {
        let mut job = Job::parse(br#"{"jid":"abcdefgh","jobtype":"t","args":[]}"#).unwrap();
        job.set_failure(Failure {
            failed_at: "2024-05-06T07:08:09Z".into(),
            message: "boom".into(),
            errtype: "unknown".into(),
            retry_count: 0,
            remaining: 25,
            ..Failure::default()
        });
        assert_eq!(
            job.to_json(),
            r#"{"jid":"abcdefgh","jobtype":"t","args":[],"failure":{"failed_at":"2024-05-06T07:08:09Z","message":"boom","errtype":"unknown","retry_count":0,"remaining":25}}"#
        );
        let reparsed = Job::parse(job.to_json().as_bytes()).unwrap();
        assert_eq!(reparsed.failure, job.failure);
    }
}
