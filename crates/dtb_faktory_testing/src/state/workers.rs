//! The worker processes the server knows: their `HELLO`, `BEAT`s and states, and the ones
//! that went silent.

use super::{Now, State, WorkerRecord};
use chrono::{DateTime, Utc};
use std::time::{Duration, Instant};

/// The lifecycle state the server asks a worker process to be in, answered to its `BEAT`.
///
/// States only move forward for a worker (`Running` → `Quiet` → `Terminate`), as on the
/// real server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum WorkerState {
    /// Keep fetching; `BEAT` is answered with `+OK`.
    #[default]
    Running,
    /// Stop fetching, finish current jobs; `BEAT` is answered with `{"state":"quiet"}`.
    Quiet,
    /// Stop now; `BEAT` is answered with `{"state":"terminate"}`.
    Terminate,
}

impl WorkerState {
    fn from_wire(s: &str) -> Option<WorkerState> {
        match s {
            "quiet" => Some(WorkerState::Quiet),
            "terminate" => Some(WorkerState::Terminate),
            _ => None,
        }
    }

    pub(crate) fn wire_name(self) -> &'static str {
        match self {
            WorkerState::Running => "running",
            WorkerState::Quiet => "quiet",
            WorkerState::Terminate => "terminate",
        }
    }
}

/// A worker process known to the server: a `wid` sent in `HELLO` by at least one open
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The worker id from `HELLO`.
    pub wid: String,
    /// The host name from `HELLO`.
    pub hostname: String,
    /// The process id from `HELLO`.
    pub pid: i64,
    /// The labels from `HELLO`.
    pub labels: Vec<String>,
    /// Open connections that said `HELLO` with this `wid`.
    pub connections: usize,
    /// Number of `BEAT`s received.
    pub beats: u64,
    /// When the last `BEAT` arrived.
    pub last_beat: Option<DateTime<Utc>>,
    /// The state the server currently wants this worker in.
    pub state: WorkerState,
    /// The state the last `BEAT` was answered with (`None` before the first `BEAT`).
    pub last_reply: Option<WorkerState>,
}

/// The identifying part of a `HELLO` from a worker.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hello {
    pub(crate) wid: String,
    pub(crate) hostname: String,
    pub(crate) pid: i64,
    pub(crate) labels: Vec<String>,
}

/// How long a worker may go without `BEAT` before the server forgets it and closes its
/// connections (the real server's heartbeat reaper uses one minute).
pub(crate) const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);

impl State {
    /// Connection `conn` said `HELLO` with a `wid`. Returns true when it is the worker's first
    /// open connection, the one whose `FETCH`es the worker's state applies to (as on the real
    /// server, which keeps the state in the data of the connection that registered the
    /// worker).
    pub(crate) fn worker_connected(&mut self, hello: &Hello, conn: u64, now: Instant) -> bool {
        self.touch();
        let rec = self
            .workers
            .entry(hello.wid.clone())
            .or_insert_with(|| WorkerRecord {
                hostname: hello.hostname.clone(),
                pid: hello.pid,
                labels: hello.labels.clone(),
                conns: Vec::new(),
                beats: 0,
                last_beat: None,
                last_seen: now,
                reported: WorkerState::Running,
                last_reply: None,
            });
        rec.conns.push(conn);
        rec.conns.len() == 1
    }

    /// Connection `conn` of worker `wid` closed; the worker is forgotten with its last one.
    pub(crate) fn worker_disconnected(&mut self, wid: &str, conn: u64) {
        self.touch();
        if let Some(rec) = self.workers.get_mut(wid) {
            rec.conns.retain(|&c| c != conn);
            if rec.conns.is_empty() {
                self.workers.remove(wid);
            }
        }
    }

    /// Forgets the workers that sent no `BEAT` (nor `HELLO`) for `timeout`, as the real
    /// server's heartbeat reaper does. Returns the connections to close, and when the next
    /// worker falls silent for that long.
    pub(crate) fn reap_silent_workers(
        &mut self,
        now: Instant,
        timeout: Duration,
    ) -> (Vec<u64>, Option<Instant>) {
        let silent: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, r)| now.saturating_duration_since(r.last_seen) >= timeout)
            .map(|(wid, _)| wid.clone())
            .collect();
        let mut close = Vec::new();
        for wid in silent {
            if let Some(rec) = self.workers.remove(&wid) {
                close.extend(rec.conns);
                self.workers_reaped += 1;
            }
        }
        if !close.is_empty() {
            self.touch();
        }
        let next = self.workers.values().map(|r| r.last_seen + timeout).min();
        (close, next)
    }

    /// The state the server wants worker `wid` in.
    pub(crate) fn worker_state(&self, wid: &str) -> WorkerState {
        let reported = self
            .workers
            .get(wid)
            .map_or(WorkerState::Running, |r| r.reported);
        let forced = self.worker_overrides.get(wid).copied().unwrap_or_default();
        self.global_worker_state.max(forced).max(reported)
    }

    /// `BEAT`: returns the state to answer with.
    pub(crate) fn beat(
        &mut self,
        wid: &str,
        current_state: Option<&str>,
        now: &Now,
    ) -> Result<WorkerState, String> {
        let Some(rec) = self.workers.get_mut(wid) else {
            return Err(format!("unknown worker {wid}"));
        };
        if let Some(s) = current_state.and_then(WorkerState::from_wire) {
            rec.reported = rec.reported.max(s);
        }
        rec.beats += 1;
        rec.last_beat = Some(now.wall);
        rec.last_seen = now.mono;
        let state = self.worker_state(wid);
        if let Some(rec) = self.workers.get_mut(wid) {
            rec.last_reply = Some(state);
        }
        self.touch();
        Ok(state)
    }

    pub(crate) fn set_global_worker_state(&mut self, state: WorkerState) {
        self.touch();
        self.global_worker_state = state;
    }

    pub(crate) fn set_worker_state_for(&mut self, wid: &str, state: WorkerState) {
        self.touch();
        self.worker_overrides.insert(wid.to_string(), state);
    }

    pub(crate) fn workers(&self) -> Vec<WorkerInfo> {
        let mut out: Vec<WorkerInfo> = self
            .workers
            .iter()
            .map(|(wid, r)| WorkerInfo {
                wid: wid.clone(),
                hostname: r.hostname.clone(),
                pid: r.pid,
                labels: r.labels.clone(),
                connections: r.conns.len(),
                beats: r.beats,
                last_beat: r.last_beat,
                state: self.worker_state(wid),
                last_reply: r.last_reply,
            })
            .collect();
        out.sort_by(|a, b| a.wid.cmp(&b.wid));
        out
    }
}
