//! The barrier descriptor attached to a job's `custom` data.

use crate::error::Error;
use faktory::Job;
use serde_json::{Map, Value};

/// The key under which [`enqueue_with_barrier`](crate::EnqueueWithBarrier::enqueue_with_barrier)
/// stores the barrier descriptor in a job's `custom` data.
///
/// Its value is a JSON object:
///
/// * inside a transaction: `{"v": 1, "backend": "postgres", "id": "<uuid>", "txid": "<id>",
///   "db": "<database>.<schema>"}` (`txid` is present when the backend recorded the producer's
///   transaction id, `db` when it can name where the barrier table is: the database and schema
///   on PostgreSQL, the database on MySQL, the file's path on SQLite);
/// * outside a transaction: `{"v": 1, "wait": false}` — nothing to wait for, the job runs at once.
///
/// The job's `args` are never touched.
pub const CUSTOM_KEY: &str = "transaction_barrier";

/// Longest string accepted in a descriptor field; anything longer is rejected as malformed.
const MAX_FIELD_LEN: usize = 64;
/// Longest `db` accepted: a file path on SQLite (`PATH_MAX` on Linux), much shorter elsewhere.
const MAX_DB_LEN: usize = 4096;

/// A parsed barrier descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Descriptor {
    /// Enqueued outside a transaction: run at once.
    NoWait,
    /// Enqueued inside a transaction: wait for barrier `id` on `backend`.
    Barrier(BarrierRef),
}

/// Where a barrier lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BarrierRef {
    pub(crate) backend: String,
    pub(crate) id: uuid::Uuid,
    pub(crate) txid: Option<String>,
    /// Which barrier table the producer wrote to, as its backend names it.
    pub(crate) db: Option<String>,
}

impl Descriptor {
    pub(crate) fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("v".into(), Value::from(1));
        match self {
            Descriptor::NoWait => {
                m.insert("wait".into(), Value::Bool(false));
            }
            Descriptor::Barrier(b) => {
                m.insert("backend".into(), Value::from(b.backend.clone()));
                m.insert("id".into(), Value::from(b.id.hyphenated().to_string()));
                if let Some(txid) = &b.txid {
                    m.insert("txid".into(), Value::from(txid.clone()));
                }
                if let Some(db) = &b.db {
                    m.insert("db".into(), Value::from(db.clone()));
                }
            }
        }
        Value::Object(m)
    }

    /// Reads the descriptor of `job`: `Ok(None)` when it has none.
    pub(crate) fn from_job(job: &Job) -> Result<Option<Descriptor>, Error> {
        match job.custom.get(CUSTOM_KEY) {
            None => Ok(None),
            Some(v) => Self::parse(v)
                .map(Some)
                .map_err(|reason| Error::MalformedBarrier {
                    jid: job.id().to_string(),
                    reason,
                }),
        }
    }

    pub(crate) fn parse(v: &Value) -> Result<Descriptor, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("expected a JSON object, found {}", kind_of(v)))?;
        match obj.get("v") {
            Some(Value::Number(n)) if n.as_u64() == Some(1) => {}
            Some(other) => return Err(format!("unsupported version {}", short(other))),
            None => return Err("missing field `v`".into()),
        }
        if let Some(wait) = obj.get("wait") {
            return match wait {
                Value::Bool(false) if obj.len() == 2 => Ok(Descriptor::NoWait),
                Value::Bool(false) => Err("`wait: false` carries unexpected fields".into()),
                other => Err(format!(
                    "field `wait` must be false, found {}",
                    short(other)
                )),
            };
        }
        for key in obj.keys() {
            if !matches!(key.as_str(), "v" | "backend" | "id" | "txid" | "db") {
                return Err(format!("unknown field `{}`", truncate(key)));
            }
        }
        let backend =
            string_field(obj, "backend", MAX_FIELD_LEN)?.ok_or("missing field `backend`")?;
        let id = string_field(obj, "id", MAX_FIELD_LEN)?.ok_or("missing field `id`")?;
        let id = uuid::Uuid::try_parse(&id)
            .map_err(|_| format!("`id` is not a UUID: {}", truncate(&id)))?;
        let txid = string_field(obj, "txid", MAX_FIELD_LEN)?;
        if let Some(t) = &txid {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("`txid` is not a transaction id: {}", truncate(t)));
            }
        }
        let db = string_field(obj, "db", MAX_DB_LEN)?;
        if let Some(db) = &db {
            if db.is_empty() {
                return Err(format!("`db` is not a database name: {}", truncate(db)));
            }
        }
        Ok(Descriptor::Barrier(BarrierRef {
            backend,
            id,
            txid,
            db,
        }))
    }
}

fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    max_len: usize,
) -> Result<Option<String>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= max_len => Ok(Some(s.clone())),
        Some(Value::String(s)) => Err(format!("field `{key}` is too long ({} bytes)", s.len())),
        Some(other) => Err(format!(
            "field `{key}` must be a string, found {}",
            kind_of(other)
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn short(v: &Value) -> String {
    truncate(&v.to_string())
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_FIELD_LEN {
        return s.to_string();
    }
    let mut end = MAX_FIELD_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip() {
        let d = Descriptor::Barrier(BarrierRef {
            backend: "postgres".into(),
            id: uuid::Uuid::new_v4(),
            txid: Some("1234".into()),
            db: Some("app.\"My Schema\"".into()),
        });
        assert_eq!(Descriptor::parse(&d.to_value()).unwrap(), d);
        assert_eq!(
            Descriptor::parse(&Descriptor::NoWait.to_value()).unwrap(),
            Descriptor::NoWait
        );
    }

    #[test]
    fn rejects_bad_input() {
        let id = uuid::Uuid::new_v4().to_string();
        let huge = "x".repeat(1 << 20);
        for bad in [
            json!(null),
            json!("str"),
            json!([]),
            json!({}),
            json!({"v": 2, "backend": "postgres", "id": id}),
            json!({"v": "1", "backend": "postgres", "id": id}),
            json!({"v": 1, "id": id}),
            json!({"v": 1, "backend": "postgres"}),
            json!({"v": 1, "backend": 5, "id": id}),
            json!({"v": 1, "backend": "postgres", "id": "not-a-uuid"}),
            json!({"v": 1, "backend": "postgres", "id": 42}),
            json!({"v": 1, "backend": "postgres", "id": id, "txid": 12}),
            json!({"v": 1, "backend": "postgres", "id": id, "txid": "12; DROP TABLE x"}),
            json!({"v": 1, "backend": "postgres", "id": id, "extra": true}),
            json!({"v": 1, "backend": "postgres", "id": id, "db": ""}),
            json!({"v": 1, "backend": "postgres", "id": id, "db": 3}),
            json!({"v": 1, "backend": "postgres", "id": id, "db": huge}),
            json!({"v": 1, "backend": huge, "id": id}),
            json!({"v": 1, "wait": true}),
            json!({"v": 1, "wait": false, "id": id}),
        ] {
            let err = Descriptor::parse(&bad).unwrap_err();
            assert!(!err.is_empty());
            assert!(err.len() < 200, "error message is bounded: {err}");
        }
    }
}
