//! What binds a barrier to its job: a digest of everything a handler acts on, stored with the
//! barrier row by the producer and compared with the delivered job's before a worker may consume
//! the barrier.
//!
//! A barrier id is no secret (it travels in the job, readable by anyone who can see jobs in
//! Faktory or read the barrier table): without the digest, a job pushed straight to Faktory with
//! another job's descriptor would consume that job's barrier, and the real job, committed, would
//! then count as a duplicate and never run. With it, a delivery consumes a barrier only if it
//! carries the same kind, queue, arguments and custom data as the job enqueued with it: the job
//! itself, a Faktory retry of it, or one of the crate's own copies (a snooze, a reconciler's
//! re-push), which differ only in what the digest leaves out.
//!
//! Left out: the job id (copies take new ones), the broker's bookkeeping (`enqueued_at`, `at`,
//! `failure`, `created_at`), the delivery settings (`retry`, `reserve_for`, `priority`,
//! `backtrace`), and the crate's own `custom` keys (those starting with `transaction_barrier`:
//! the descriptor and the copies' counters).
//!
//! The genuine Faktory server decodes and re-encodes every job (Go's `encoding/json`): numbers
//! come back as 64-bit floats, object keys in another order, characters escaped differently.
//! The digest is taken over a canonical form that such a round trip does not change: keys
//! sorted, every number as the 64-bit float it parses to.

use faktory::Job;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;

/// The prefix of the `custom` keys this crate writes.
pub(crate) const CRATE_KEY_PREFIX: &str = "transaction_barrier";

/// The digest of `job`: 64 lowercase hexadecimal digits.
pub(crate) fn job_digest(job: &Job) -> String {
    let mut canonical = String::with_capacity(128);
    // A version tag, so that a later change of what is digested cannot match an old digest.
    canonical.push_str("dtb-job-1\n");
    write_string(&mut canonical, &job.kind);
    canonical.push('\n');
    write_string(&mut canonical, &job.queue);
    canonical.push('\n');
    canonical.push('[');
    for (i, arg) in job.args().iter().enumerate() {
        if i > 0 {
            canonical.push(',');
        }
        write_value(&mut canonical, arg);
    }
    canonical.push_str("]\n{");
    let mut keys: Vec<&String> = job
        .custom
        .keys()
        .filter(|k| !k.starts_with(CRATE_KEY_PREFIX))
        .collect();
    keys.sort();
    for (i, key) in keys.into_iter().enumerate() {
        if i > 0 {
            canonical.push(',');
        }
        write_string(&mut canonical, key);
        canonical.push(':');
        write_value(&mut canonical, &job.custom[key]);
    }
    canonical.push('}');
    let hash = Sha256::digest(canonical.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in hash {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Appends `v` in canonical form: objects with sorted keys, numbers as the `f64` they parse to.
fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            // Every JSON number a Go server passes on has been a float64: integers beyond 2^53
            // come back rounded, 1.0 comes back as 1. Both sides round alike.
            let f = n.as_f64().unwrap_or(f64::NAN);
            let _ = write!(out, "{f:?}");
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, key);
                out.push(':');
                write_value(out, &map[key]);
            }
            out.push('}');
        }
    }
}

/// Appends `s` quoted, with every character but printable ASCII escaped by its code point, so
/// that no two strings share a form.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            other => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(other));
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(kind: &str, args: Vec<Value>) -> Job {
        Job::new(kind, args).on_queue("q")
    }

    #[test]
    fn copies_and_round_trips_keep_the_digest() {
        let mut original = job(
            "send",
            vec![json!(42), json!("x"), json!({"b": 1, "a": [2.5]})],
        );
        original.custom.insert("tenant".into(), json!("acme"));
        let digest = job_digest(&original);
        assert_eq!(digest.len(), 64);

        // What the crate and the broker change: job id, bookkeeping, its own custom keys.
        let mut copy = original.clone();
        copy.custom
            .insert("transaction_barrier".into(), json!({"v": 1}));
        copy.custom
            .insert("transaction_barrier_snoozes".into(), json!(3));
        copy.retry = Some(3);
        copy.reserve_for = Some(std::time::Duration::from_secs(60));
        copy.at = Some(chrono::Utc::now());
        let copy: Job = serde_json::from_value({
            let mut v = serde_json::to_value(&copy).unwrap();
            v["jid"] = json!("another");
            v
        })
        .unwrap();
        assert_eq!(job_digest(&copy), digest);

        // A Go server's re-encoding: keys reordered, 42 as 42.0, escapes.
        let mut reencoded = serde_json::to_value(&original).unwrap();
        reencoded["jid"] = json!("j2");
        reencoded["args"] = serde_json::from_str(r#"[42.0,"x",{"b":1.0,"a":[2.5]}]"#).unwrap();
        reencoded["custom"] = serde_json::from_str(r#"{"tenant":"\u0061cme"}"#).unwrap();
        let reencoded: Job = serde_json::from_value(reencoded).unwrap();
        assert_eq!(job_digest(&reencoded), digest);
    }

    #[test]
    fn what_a_handler_acts_on_changes_the_digest() {
        let mut original = job("send", vec![json!(42)]);
        original.custom.insert("tenant".into(), json!("acme"));
        let digest = job_digest(&original);
        let mut other_kind = original.clone();
        other_kind.kind = "refund".into();
        let mut other_queue = original.clone();
        other_queue.queue = "elsewhere".into();
        let mut other_args = job("send", vec![json!(43)]);
        other_args.custom = original.custom.clone();
        let mut other_custom = original.clone();
        other_custom.custom.insert("tenant".into(), json!("evil"));
        let mut extra_custom = original.clone();
        extra_custom.custom.insert("admin".into(), json!(true));
        for forged in [
            other_kind,
            other_queue,
            other_args,
            other_custom,
            extra_custom,
        ] {
            assert_ne!(job_digest(&forged), digest, "{forged:?}");
        }
        // No two values share a canonical form.
        assert_ne!(
            job_digest(&job("k", vec![json!("1")])),
            job_digest(&job("k", vec![json!(1)]))
        );
        assert_ne!(
            job_digest(&job("k", vec![json!(["a,b"])])),
            job_digest(&job("k", vec![json!(["a", "b"])]))
        );
        assert_ne!(
            job_digest(&job("k\"", vec![])),
            job_digest(&job("k\\\"", vec![]))
        );
    }
}
