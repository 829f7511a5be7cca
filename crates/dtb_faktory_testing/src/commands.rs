//! The commands a connection serves after `HELLO`, each turned into a change of the state.

use crate::job::Job;
use crate::protocol::{printable, Reply};
use crate::session::{from_object, Session};
use crate::shared::Shared;
use crate::state::{Now, WorkerState};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::time::Instant;

/// A command handler: shared state, the session, the raw arguments (`None` when the line
/// has no space) and the same arguments as bytes (empty when absent).
type Command = fn(&Shared, &Session, Option<&[u8]>, &[u8]) -> Reply;

pub(crate) fn dispatch(
    shared: &Shared,
    session: &Session,
    verb: &[u8],
    args: Option<&[u8]>,
) -> Reply {
    let data = args.unwrap_or_default();
    // The real server cuts the verb and its space off these commands without checking that
    // there is more; on a bare verb that panics, and it answers `internal error`.
    if args.is_none() && matches!(verb, b"PUSH" | b"PUSHB" | b"ACK" | b"FAIL" | b"BEAT") {
        shared.lock().commands += 1;
        return Reply::err("internal error");
    }
    let command: Command = match verb {
        b"PUSH" => push,
        b"PUSHB" => push_bulk,
        b"FETCH" => fetch,
        b"ACK" => ack,
        b"FAIL" => fail,
        b"BEAT" => beat,
        b"INFO" => info,
        b"FLUSH" => flush,
        // Faktory (not Enterprise) knows these and refuses them.
        b"BATCH" => {
            shared.lock().commands += 1;
            return Reply::err("batch subsystem is only available in Faktory Enterprise");
        }
        b"TRACK" => {
            shared.lock().commands += 1;
            return Reply::err("tracking subsystem is only available in Faktory Enterprise");
        }
        _ => return Reply::err(format!("unknown command {}", printable(verb))),
    };
    shared.lock().commands += 1;
    command(shared, session, args, data)
}

fn push(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let job = match Job::parse(data) {
        Ok(job) => job,
        Err(e) => return Reply::err(e),
    };
    let result = shared.lock().push(job, &Now::get());
    shared.notify();
    match result {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::err(e),
    }
}

fn push_bulk(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let raws: Vec<Box<RawValue>> = match serde_json::from_slice(data) {
        Ok(raws) => raws,
        Err(e) => return Reply::err(format!("invalid JSON: {e}")),
    };
    // Like the real server, one malformed element rejects the whole command.
    let jobs = match raws
        .iter()
        .map(|raw| Job::parse_raw(raw))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(jobs) => jobs,
        Err(e) => return Reply::err(e),
    };
    let mut errors = serde_json::Map::new();
    {
        let mut st = shared.lock();
        let now = Now::get();
        for job in jobs {
            let jid = job.jid.clone();
            if let Err(e) = st.push(job, &now) {
                errors.insert(jid, serde_json::Value::String(e));
            }
        }
    }
    shared.notify();
    Reply::Bulk(serde_json::Value::Object(errors).to_string().into_bytes())
}

fn fetch(shared: &Shared, session: &Session, args: Option<&[u8]>, _: &[u8]) -> Reply {
    let Some(args) = args else {
        return Reply::err("must call fetch with at least one queue");
    };
    let queues: Vec<String> = args
        .split(|&b| b == b' ')
        .map(|q| String::from_utf8_lossy(q).into_owned())
        .collect();
    let deadline = Instant::now() + shared.config.fetch_timeout;
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return Reply::Null;
        }
        // A quiet or terminating worker gets no new job on the connection that holds its
        // state; its other connections fetch as usual (the client stops them itself).
        let running = !session.holds_state
            || session
                .wid
                .as_deref()
                .is_none_or(|wid| st.worker_state(wid) == WorkerState::Running);
        if running {
            if let Some(payload) = st.fetch(&queues, &Now::get(), &shared.config) {
                drop(st);
                shared.notify();
                return Reply::Bulk(payload.into_bytes());
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Reply::Null;
        }
        st = shared.wait_timeout(st, deadline - now);
    }
}

fn ack(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let parsed: Result<HashMap<String, String>, _> = serde_json::from_slice(data);
    let Some(jid) = parsed.ok().and_then(|mut m| m.remove("jid")) else {
        return Reply::err(format!("invalid ACK {}", printable(data)));
    };
    let changed = shared.lock().ack(&jid, &Now::get());
    if changed {
        shared.notify();
    }
    Reply::Ok
}

#[derive(Deserialize)]
struct FailIn {
    #[serde(default)]
    jid: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errtype: Option<String>,
    #[serde(default)]
    backtrace: Option<Vec<String>>,
}

fn fail(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let Ok(f) = from_object::<FailIn>(data) else {
        return Reply::err(format!("invalid FAIL {}", printable(data)));
    };
    let result = shared.lock().fail(
        f.jid.as_deref().unwrap_or_default(),
        f.errtype,
        f.message,
        f.backtrace,
        &Now::get(),
        &shared.config,
    );
    shared.notify();
    match result {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::err(e),
    }
}

#[derive(Deserialize)]
struct BeatIn {
    #[serde(default)]
    wid: Option<String>,
    #[serde(default)]
    current_state: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    rss_kb: Option<i64>,
}

fn beat(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let Ok(b) = from_object::<BeatIn>(data) else {
        return Reply::err(format!("invalid BEAT {}", printable(data)));
    };
    let result = shared.lock().beat(
        b.wid.as_deref().unwrap_or_default(),
        b.current_state.as_deref(),
        &Now::get(),
    );
    shared.notify();
    match result {
        Ok(WorkerState::Running) => Reply::Ok,
        Ok(state) => Reply::Bulk(format!(r#"{{"state":"{}"}}"#, state.wire_name()).into_bytes()),
        Err(e) => Reply::err(e),
    }
}

fn info(shared: &Shared, _: &Session, _: Option<&[u8]>, _: &[u8]) -> Reply {
    let doc = shared
        .lock()
        .info(shared.started.elapsed(), used_memory_mb());
    Reply::Bulk(doc.to_string().into_bytes())
}

fn flush(shared: &Shared, _: &Session, _: Option<&[u8]>, _: &[u8]) -> Reply {
    shared.lock().flush();
    shared.notify();
    Reply::Ok
}

/// Resident memory of this process in MiB, where the platform tells it (Linux); else 0.
fn used_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
