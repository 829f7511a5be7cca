//! The server's job store and the rules that move jobs between queues and sets.
//!
//! Everything here runs under the server's one mutex; nothing blocks or does I/O.

use super::job::{Failure, Job, MAX_RESERVE_FOR};
use super::protocol::format_time;
use chrono::{DateTime, Utc};
use rand::Rng;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a failed job waits before its next attempt.
///
/// Pass one to [`TestServerBuilder::retry_delay`](super::TestServerBuilder::retry_delay); a
/// plain [`Duration`] converts into [`RetryDelay::Fixed`].
#[derive(Clone, Default)]
pub enum RetryDelay {
    /// The real server's formula: `15 + count⁴ + rand(0..30) × (count + 1)` seconds, where
    /// `count` is the job's `failure.retry_count` (0 after the first failure).
    #[default]
    Faktory,
    /// The same delay before every retry (`Duration::ZERO` retries at once).
    Fixed(Duration),
    /// Any function of the retry count.
    Custom(Arc<dyn Fn(u32) -> Duration + Send + Sync>),
}

impl RetryDelay {
    /// A policy computed by `f` from the retry count (0 after the first failure).
    pub fn custom(f: impl Fn(u32) -> Duration + Send + Sync + 'static) -> RetryDelay {
        RetryDelay::Custom(Arc::new(f))
    }

    /// The delay before the retry that follows failure number `retry_count + 1`.
    pub fn delay(&self, retry_count: u32) -> Duration {
        match self {
            RetryDelay::Faktory => {
                let count = u64::from(retry_count);
                let jitter: u64 = rand::thread_rng().gen_range(0..30);
                // Saturating: a pushed job may carry an absurd `failure.retry_count`.
                let secs = count
                    .saturating_pow(4)
                    .saturating_add(15)
                    .saturating_add(jitter.saturating_mul(count.saturating_add(1)));
                Duration::from_secs(secs)
            }
            RetryDelay::Fixed(d) => *d,
            RetryDelay::Custom(f) => f(retry_count),
        }
    }
}

impl From<Duration> for RetryDelay {
    fn from(d: Duration) -> RetryDelay {
        RetryDelay::Fixed(d)
    }
}

impl fmt::Debug for RetryDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryDelay::Faktory => f.write_str("Faktory"),
            RetryDelay::Fixed(d) => f.debug_tuple("Fixed").field(d).finish(),
            RetryDelay::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Settings fixed when the server starts.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) password: Option<String>,
    pub(crate) retry_delay: RetryDelay,
    pub(crate) fetch_timeout: Duration,
    pub(crate) min_reserve_for: Duration,
    pub(crate) max_line_length: usize,
    /// How long a worker may go without `BEAT` ([`HEARTBEAT_TIMEOUT`]; shorter only in this
    /// crate's own tests).
    pub(crate) heartbeat_timeout: Duration,
}

/// Something that happened to a job, with the time it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobEvent {
    /// Accepted by `PUSH` or `PUSHB` (into its queue, or into the scheduled set when `at` is
    /// in the future).
    Pushed {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// A scheduled job reached its `at` time and entered its queue.
    Enqueued {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Handed to a worker by `FETCH` (and so reserved).
    Fetched {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Acknowledged by `ACK`.
    Acked {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Reported failed by `FAIL`.
    Failed {
        /// When it happened.
        at: DateTime<Utc>,
        /// The message the worker sent (trimmed and cut to 1000 bytes like the real server).
        message: String,
    },
    /// Its reservation ran out before an `ACK` or `FAIL`; it counts as a failure.
    Expired {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// A failed job's retry time came and it went back to its queue (fetchable again).
    Retried {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Moved to the dead set: its retries are used up, or its `retry` is negative.
    Dead {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Dropped after a failure because its `retry` is 0.
    Discarded {
        /// When it happened.
        at: DateTime<Utc>,
    },
}

/// The kind of a [`JobEvent`], without its data; handy for comparisons and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobEventKind {
    /// See [`JobEvent::Pushed`].
    Pushed,
    /// See [`JobEvent::Enqueued`].
    Enqueued,
    /// See [`JobEvent::Fetched`].
    Fetched,
    /// See [`JobEvent::Acked`].
    Acked,
    /// See [`JobEvent::Failed`].
    Failed,
    /// See [`JobEvent::Expired`].
    Expired,
    /// See [`JobEvent::Retried`].
    Retried,
    /// See [`JobEvent::Dead`].
    Dead,
    /// See [`JobEvent::Discarded`].
    Discarded,
}

impl JobEvent {
    fn new(kind: JobEventKind, at: DateTime<Utc>, message: Option<String>) -> JobEvent {
        match kind {
            JobEventKind::Pushed => JobEvent::Pushed { at },
            JobEventKind::Enqueued => JobEvent::Enqueued { at },
            JobEventKind::Fetched => JobEvent::Fetched { at },
            JobEventKind::Acked => JobEvent::Acked { at },
            JobEventKind::Failed => JobEvent::Failed {
                at,
                message: message.unwrap_or_default(),
            },
            JobEventKind::Expired => JobEvent::Expired { at },
            JobEventKind::Retried => JobEvent::Retried { at },
            JobEventKind::Dead => JobEvent::Dead { at },
            JobEventKind::Discarded => JobEvent::Discarded { at },
        }
    }

    /// The kind of event.
    pub fn kind(&self) -> JobEventKind {
        match self {
            JobEvent::Pushed { .. } => JobEventKind::Pushed,
            JobEvent::Enqueued { .. } => JobEventKind::Enqueued,
            JobEvent::Fetched { .. } => JobEventKind::Fetched,
            JobEvent::Acked { .. } => JobEventKind::Acked,
            JobEvent::Failed { .. } => JobEventKind::Failed,
            JobEvent::Expired { .. } => JobEventKind::Expired,
            JobEvent::Retried { .. } => JobEventKind::Retried,
            JobEvent::Dead { .. } => JobEventKind::Dead,
            JobEvent::Discarded { .. } => JobEventKind::Discarded,
        }
    }

    /// When it happened.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            JobEvent::Pushed { at }
            | JobEvent::Enqueued { at }
            | JobEvent::Fetched { at }
            | JobEvent::Acked { at }
            | JobEvent::Failed { at, .. }
            | JobEvent::Expired { at }
            | JobEvent::Retried { at }
            | JobEvent::Dead { at }
            | JobEvent::Discarded { at } => *at,
        }
    }
}

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

/// Counters kept since the server started (or since the last `FLUSH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Jobs acknowledged (`total_processed` in `INFO`).
    pub processed: u64,
    /// Failures, counting `FAIL`s and expired reservations (`total_failures` in `INFO`).
    pub failures: u64,
    /// Jobs accepted by `PUSH` and `PUSHB`.
    pub pushed: u64,
}

/// The identifying part of a `HELLO` from a worker.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hello {
    pub(crate) wid: String,
    pub(crate) hostname: String,
    pub(crate) pid: i64,
    pub(crate) labels: Vec<String>,
}

#[derive(Debug)]
struct WorkerRecord {
    hostname: String,
    pid: i64,
    labels: Vec<String>,
    /// The server's ids of its open connections.
    conns: Vec<u64>,
    beats: u64,
    last_beat: Option<DateTime<Utc>>,
    /// `HELLO` or the last `BEAT`, whichever came last.
    last_seen: Instant,
    reported: WorkerState,
    last_reply: Option<WorkerState>,
}

/// What `INFO` reports about the passes over the scheduled, retry and dead sets.
#[derive(Debug, Default)]
struct Scans {
    cycles: u64,
    scheduled_enqueued: u64,
    retries_enqueued: u64,
    time: Duration,
}

#[derive(Debug)]
struct Reservation {
    job: Job,
    key: (Instant, u64),
}

type TimeKey = (Instant, u64);

/// How long a worker may go without `BEAT` before the server forgets it and closes its
/// connections (the real server's heartbeat reaper uses one minute).
pub(crate) const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);

/// All jobs and bookkeeping of one server.
#[derive(Debug, Default)]
pub(crate) struct State {
    queues: BTreeMap<String, VecDeque<Job>>,
    scheduled: BTreeMap<TimeKey, Job>,
    retries: BTreeMap<TimeKey, Job>,
    dead: BTreeMap<u64, Job>,
    working: HashMap<String, Reservation>,
    deadlines: BTreeMap<TimeKey, String>,
    history: HashMap<String, Vec<JobEvent>>,
    stats: Stats,
    reaped: u64,
    scans: Scans,
    workers: HashMap<String, WorkerRecord>,
    workers_reaped: u64,
    worker_overrides: HashMap<String, WorkerState>,
    global_worker_state: WorkerState,
    pub(crate) connections: u64,
    pub(crate) commands: u64,
    seq: u64,
    /// Bumped on every change; waiters compare it to know something happened.
    pub(crate) generation: u64,
    pub(crate) shutdown: bool,
}

/// The current time, as wall clock (for payloads and events) and monotonic (for deadlines).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    pub(crate) wall: DateTime<Utc>,
    pub(crate) mono: Instant,
}

impl Now {
    pub(crate) fn get() -> Now {
        Now {
            wall: Utc::now(),
            mono: Instant::now(),
        }
    }

    fn after(&self, d: Duration) -> (DateTime<Utc>, Instant) {
        let wall = chrono::Duration::from_std(d)
            .ok()
            .and_then(|cd| self.wall.checked_add_signed(cd))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let mono = self
            .mono
            .checked_add(d)
            .unwrap_or(self.mono + Duration::from_secs(100 * 365 * 86_400));
        (wall, mono)
    }
}

/// Whether the real server accepts `name` for a queue (`\A[a-zA-Z0-9._-]+\z`); its error
/// otherwise.
pub(crate) fn check_queue_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "cannot get {name:?} queue: queue names must match \\A[a-zA-Z0-9._-]+\\z"
        ))
    }
}

/// Cuts a string to at most `max` bytes on a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

impl State {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn touch(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    fn record(&mut self, jid: &str, kind: JobEventKind, now: &Now, message: Option<String>) {
        self.history
            .entry(jid.to_string())
            .or_default()
            .push(JobEvent::new(kind, now.wall, message));
    }

    fn enqueue(&mut self, mut job: Job, now: &Now) {
        job.mark_enqueued(now.wall);
        self.queues
            .entry(job.queue.clone())
            .or_default()
            .push_back(job);
    }

    /// `PUSH`: validates and stores one job.
    ///
    /// Like the real server, the queue name is checked only when the job enters its queue: a
    /// job scheduled for later is accepted with any name, and dropped when it comes due if
    /// the name is not valid (see [`tick`](State::tick)).
    pub(crate) fn push(&mut self, mut job: Job, now: &Now) -> Result<(), String> {
        job.validate()?;
        job.prepare_for_push(now.wall);
        let later = job
            .at_time()
            .filter(|at| *at > now.wall)
            .map(|at| (at - now.wall).to_std().unwrap_or_default());
        if later.is_none() {
            check_queue_name(&job.queue)?;
        }
        self.touch();
        self.stats.pushed += 1;
        self.record(&job.jid.clone(), JobEventKind::Pushed, now, None);
        if let Some(wait) = later {
            let key = (now.after(wait).1, self.next_seq());
            self.scheduled.insert(key, job);
            return Ok(());
        }
        self.enqueue(job, now);
        Ok(())
    }

    /// `FETCH`: takes the first job found in `queues` (checked in order) and reserves it.
    /// Returns the payload to send.
    pub(crate) fn fetch(&mut self, queues: &[String], now: &Now, cfg: &Config) -> Option<String> {
        let job = queues
            .iter()
            .find_map(|q| self.queues.get_mut(q).and_then(VecDeque::pop_front))?;
        self.touch();
        let secs = match job.reserve_for {
            0 => 1800,
            n => n,
        };
        let timeout = Duration::from_secs(u64::try_from(secs).unwrap_or(0))
            .max(cfg.min_reserve_for)
            .min(Duration::from_secs(MAX_RESERVE_FOR as u64));
        let key = (now.after(timeout).1, self.next_seq());
        let payload = job.to_json();
        let jid = job.jid.clone();
        self.record(&jid, JobEventKind::Fetched, now, None);
        self.deadlines.insert(key, jid.clone());
        // Like the real server, a second reservation of the same jid replaces the first.
        if let Some(old) = self.working.insert(jid, Reservation { job, key }) {
            self.deadlines.remove(&old.key);
        }
        Some(payload)
    }

    /// `ACK`: true when the job was reserved (an unknown jid is not an error).
    pub(crate) fn ack(&mut self, jid: &str, now: &Now) -> bool {
        let Some(res) = self.working.remove(jid) else {
            return false;
        };
        self.touch();
        self.deadlines.remove(&res.key);
        self.stats.processed += 1;
        self.record(jid, JobEventKind::Acked, now, None);
        true
    }

    /// `FAIL`: records the failure of a reserved job and decides its fate.
    pub(crate) fn fail(
        &mut self,
        jid: &str,
        errtype: Option<String>,
        message: Option<String>,
        backtrace: Option<Vec<String>>,
        now: &Now,
        cfg: &Config,
    ) -> Result<(), String> {
        if jid.is_empty() {
            return Err("missing JID".into());
        }
        let Some(res) = self.working.remove(jid) else {
            return Err(format!("Job not found {jid}"));
        };
        self.touch();
        self.deadlines.remove(&res.key);
        // Cleaned up like the real server's `cleanse`.
        let errtype = errtype.unwrap_or_default().trim().to_string();
        let errtype = if errtype.is_empty() {
            "unknown".to_string()
        } else {
            truncate(errtype, 100)
        };
        let message = message.unwrap_or_default().trim().to_string();
        let message = if message.is_empty() {
            "unknown".to_string()
        } else {
            truncate(message, 1000)
        };
        let mut backtrace = backtrace.unwrap_or_default();
        backtrace.truncate(50);
        self.record(jid, JobEventKind::Failed, now, Some(message.clone()));
        self.process_failure(res.job, errtype, message, backtrace, now, cfg);
        Ok(())
    }

    fn process_failure(
        &mut self,
        mut job: Job,
        errtype: String,
        message: String,
        backtrace: Vec<String>,
        now: &Now,
        cfg: &Config,
    ) {
        self.stats.failures += 1;
        let retry = job.retry.unwrap_or(super::job::DEFAULT_RETRY);
        let mut failure = match job.failure.take() {
            Some(mut f) => {
                f.retry_count = f.retry_count.saturating_add(1);
                if f.remaining > 0 {
                    f.remaining -= 1;
                }
                f.message = message;
                f.errtype = errtype;
                f.backtrace = backtrace;
                f
            }
            None => Failure {
                failed_at: format_time(now.wall),
                next_at: String::new(),
                message,
                errtype,
                backtrace,
                retry_count: 0,
                remaining: retry,
            },
        };
        let jid = job.jid.clone();
        if retry == 0 {
            job.set_failure(failure);
            self.record(&jid, JobEventKind::Discarded, now, None);
            return;
        }
        if failure.retry_count < retry {
            let count = u32::try_from(failure.retry_count).unwrap_or(u32::MAX);
            let (wall, mono) = now.after(cfg.retry_delay.delay(count));
            failure.next_at = format_time(wall);
            job.set_failure(failure);
            let key = (mono, self.next_seq());
            self.retries.insert(key, job);
        } else {
            job.set_failure(failure);
            let key = self.next_seq();
            self.dead.insert(key, job);
            self.record(&jid, JobEventKind::Dead, now, None);
        }
    }

    /// Moves everything whose time has come: expired reservations fail, due scheduled jobs
    /// and due retries enter their queues. Returns the next time something is due.
    pub(crate) fn tick(&mut self, now: &Now, cfg: &Config) -> Option<Instant> {
        let started = Instant::now();
        self.scans.cycles += 1;
        let next = self.tick_inner(now, cfg);
        self.scans.time += started.elapsed();
        next
    }

    fn tick_inner(&mut self, now: &Now, cfg: &Config) -> Option<Instant> {
        loop {
            let mut moved = false;
            while let Some(entry) = self.deadlines.first_entry() {
                if entry.key().0 > now.mono {
                    break;
                }
                let jid = entry.remove();
                moved = true;
                if let Some(res) = self.working.remove(&jid) {
                    self.reaped += 1;
                    self.record(&jid, JobEventKind::Expired, now, None);
                    // The real server's `JobReservationExpired` failure.
                    self.process_failure(
                        res.job,
                        "ReservationExpired".into(),
                        "Faktory job reservation expired".into(),
                        Vec::new(),
                        now,
                        cfg,
                    );
                }
            }
            while let Some(entry) = self.scheduled.first_entry() {
                if entry.key().0 > now.mono {
                    break;
                }
                let job = entry.remove();
                moved = true;
                if check_queue_name(&job.queue).is_err() {
                    // The real server takes the job out of its set, fails to enqueue it,
                    // logs a warning and forgets it.
                    self.record(&job.jid.clone(), JobEventKind::Discarded, now, None);
                    continue;
                }
                self.scans.scheduled_enqueued += 1;
                self.record(&job.jid.clone(), JobEventKind::Enqueued, now, None);
                self.enqueue(job, now);
            }
            while let Some(entry) = self.retries.first_entry() {
                if entry.key().0 > now.mono {
                    break;
                }
                let job = entry.remove();
                moved = true;
                self.scans.retries_enqueued += 1;
                self.record(&job.jid.clone(), JobEventKind::Retried, now, None);
                self.enqueue(job, now);
            }
            if !moved {
                break;
            }
            self.touch();
        }
        [
            self.deadlines.keys().next(),
            self.scheduled.keys().next(),
            self.retries.keys().next(),
        ]
        .into_iter()
        .flatten()
        .map(|k| k.0)
        .min()
    }

    /// `FLUSH`: forgets every job, queue, set, history and counter.
    pub(crate) fn flush(&mut self) {
        self.touch();
        self.queues.clear();
        self.scheduled.clear();
        self.retries.clear();
        self.dead.clear();
        self.working.clear();
        self.deadlines.clear();
        self.history.clear();
        self.stats = Stats::default();
        self.reaped = 0;
    }

    // ---- workers ----

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

    // ---- inspection ----

    pub(crate) fn queue_size(&self, queue: &str) -> usize {
        self.queues.get(queue).map_or(0, VecDeque::len)
    }

    pub(crate) fn queue_names(&self) -> Vec<String> {
        self.queues.keys().cloned().collect()
    }

    pub(crate) fn scheduled_len(&self) -> usize {
        self.scheduled.len()
    }

    pub(crate) fn retries_len(&self) -> usize {
        self.retries.len()
    }

    pub(crate) fn dead_len(&self) -> usize {
        self.dead.len()
    }

    pub(crate) fn working_len(&self) -> usize {
        self.working.len()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }

    /// Finds a job wherever it is: reserved, queued, scheduled, retrying or dead.
    pub(crate) fn find_job(&self, jid: &str) -> Option<&Job> {
        if let Some(res) = self.working.get(jid) {
            return Some(&res.job);
        }
        self.queues
            .values()
            .flat_map(|q| q.iter())
            .chain(self.scheduled.values())
            .chain(self.retries.values())
            .chain(self.dead.values())
            .find(|j| j.jid == jid)
    }

    pub(crate) fn history(&self, jid: &str) -> Vec<JobEvent> {
        self.history.get(jid).cloned().unwrap_or_default()
    }

    pub(crate) fn has_event(&self, jid: &str, kind: JobEventKind) -> bool {
        self.history
            .get(jid)
            .is_some_and(|h| h.iter().any(|e| e.kind() == kind))
    }

    pub(crate) fn jobs_in_queue(&self, queue: &str) -> Vec<serde_json::Value> {
        self.queues
            .get(queue)
            .map(|q| q.iter().map(Job::to_value).collect())
            .unwrap_or_default()
    }

    pub(crate) fn scheduled_jobs(&self) -> Vec<serde_json::Value> {
        self.scheduled.values().map(Job::to_value).collect()
    }

    pub(crate) fn retry_jobs(&self) -> Vec<serde_json::Value> {
        self.retries.values().map(Job::to_value).collect()
    }

    pub(crate) fn dead_jobs(&self) -> Vec<serde_json::Value> {
        self.dead.values().map(Job::to_value).collect()
    }

    pub(crate) fn working_jobs(&self) -> Vec<serde_json::Value> {
        let mut res: Vec<&Reservation> = self.working.values().collect();
        res.sort_by_key(|r| r.key);
        res.into_iter().map(|r| r.job.to_value()).collect()
    }

    /// The `INFO` document, shaped like the real server's `FaktoryState`.
    pub(crate) fn info(&self, uptime: Duration, used_memory_mb: u64) -> serde_json::Value {
        let now = Utc::now();
        let queues: serde_json::Map<String, serde_json::Value> = self
            .queues
            .iter()
            .map(|(name, q)| (name.clone(), serde_json::Value::from(q.len() as u64)))
            .collect();
        let total_enqueued: usize = self.queues.values().map(VecDeque::len).sum();
        serde_json::json!({
            "now": format_time(now),
            "server_utc_time": now.format("%H:%M:%S UTC").to_string(),
            "faktory": {
                "total_failures": self.stats.failures,
                "total_processed": self.stats.processed,
                "total_enqueued": total_enqueued,
                "total_queues": self.queues.len(),
                "queues": queues,
                "tasks": {
                    "Busy": { "size": self.working.len(), "reaped": self.reaped },
                    "Workers": { "size": self.workers.len(), "reaped": self.workers_reaped },
                    "Scheduled": {
                        "size": self.scheduled.len(),
                        "cycles": self.scans.cycles,
                        "enqueued": self.scans.scheduled_enqueued,
                        "wall_time_sec": self.scans.time.as_secs_f64(),
                    },
                    "Retries": {
                        "size": self.retries.len(),
                        "cycles": self.scans.cycles,
                        "enqueued": self.scans.retries_enqueued,
                        "wall_time_sec": self.scans.time.as_secs_f64(),
                    },
                    "Dead": {
                        "size": self.dead.len(),
                        "cycles": self.scans.cycles,
                        // Dead jobs are kept until FLUSH: none is ever purged.
                        "enqueued": 0,
                        "wall_time_sec": self.scans.time.as_secs_f64(),
                    },
                },
                "sets": {
                    "scheduled": self.scheduled.len(),
                    "retries": self.retries.len(),
                    "dead": self.dead.len(),
                    "working": self.working.len(),
                },
            },
            "server": {
                "description": "Faktory test server",
                "faktory_version": super::FAKTORY_VERSION,
                "uptime": uptime.as_secs(),
                "connections": self.connections,
                "command_count": self.commands,
                "used_memory_mb": used_memory_mb,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(delay: Duration) -> Config {
        Config {
            password: None,
            retry_delay: RetryDelay::Fixed(delay),
            fetch_timeout: Duration::from_millis(10),
            min_reserve_for: Duration::ZERO,
            max_line_length: 1024,
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
        }
    }

    fn job(extra: &str) -> Job {
        Job::parse(format!(r#"{{"jid":"abcdefgh","jobtype":"t","args":[]{extra}}}"#).as_bytes())
            .unwrap()
    }

    fn kinds(state: &State, jid: &str) -> Vec<JobEventKind> {
        state.history(jid).iter().map(JobEvent::kind).collect()
    }

    fn later(now: &Now, d: Duration) -> Now {
        Now {
            wall: now.after(d).0,
            mono: now.after(d).1,
        }
    }

    #[test]
    fn faktory_retry_delay_stays_within_the_formula() {
        let policy = RetryDelay::default();
        for count in [0u32, 1, 2, 5, 25] {
            let c = u64::from(count);
            let min = 15 + c.pow(4);
            let max = min + 29 * (c + 1);
            for _ in 0..200 {
                let secs = policy.delay(count).as_secs();
                assert!((min..=max).contains(&secs), "count {count}: {secs}");
            }
        }
        assert_eq!(
            RetryDelay::from(Duration::from_millis(5)).delay(7),
            Duration::from_millis(5)
        );
        assert_eq!(
            RetryDelay::custom(|n| Duration::from_secs(n.into())).delay(3),
            Duration::from_secs(3)
        );
    }

    #[test]
    fn fail_retries_then_buries() {
        let cfg = cfg(Duration::ZERO);
        let mut s = State::default();
        let mut now = Now::get();
        s.push(job(r#","retry":2"#), &now).unwrap();
        let mut remaining = Vec::new();
        for round in 0..3 {
            assert!(
                s.fetch(&["default".into()], &now, &cfg).is_some(),
                "{round}"
            );
            s.fail("abcdefgh", None, Some(" boom ".into()), None, &now, &cfg)
                .unwrap();
            now = later(&now, Duration::from_millis(1));
            s.tick(&now, &cfg);
            if let Some(j) = s.find_job("abcdefgh") {
                let f = j.failure.clone().unwrap();
                assert_eq!(f.message, "boom");
                assert_eq!(f.errtype, "unknown");
                remaining.push((f.retry_count, f.remaining));
            }
        }
        assert_eq!(remaining, vec![(0, 2), (1, 1), (2, 0)]);
        assert_eq!(s.dead_len(), 1);
        assert_eq!(s.queue_size("default"), 0);
        assert_eq!(s.stats().failures, 3);
        use JobEventKind::*;
        assert_eq!(
            kinds(&s, "abcdefgh"),
            vec![Pushed, Fetched, Failed, Retried, Fetched, Failed, Retried, Fetched, Failed, Dead]
        );
    }

    #[test]
    fn retry_zero_discards_and_negative_buries() {
        let cfg = cfg(Duration::ZERO);
        let now = Now::get();
        let mut s = State::default();
        s.push(job(r#","retry":0"#), &now).unwrap();
        s.fetch(&["default".into()], &now, &cfg).unwrap();
        s.fail("abcdefgh", None, None, None, &now, &cfg).unwrap();
        assert!(s.find_job("abcdefgh").is_none());
        assert!(s.has_event("abcdefgh", JobEventKind::Discarded));

        let mut s = State::default();
        s.push(job(r#","retry":-1"#), &now).unwrap();
        s.fetch(&["default".into()], &now, &cfg).unwrap();
        s.fail("abcdefgh", None, None, None, &now, &cfg).unwrap();
        assert_eq!(s.dead_len(), 1);
    }

    #[test]
    fn expired_reservation_counts_as_failure() {
        let cfg = cfg(Duration::from_secs(3600));
        let now = Now::get();
        let mut s = State::default();
        s.push(job(r#","reserve_for":1"#), &now).unwrap();
        s.fetch(&["default".into()], &now, &cfg).unwrap();
        let next = s.tick(&now, &cfg).unwrap();
        assert!(next > now.mono);
        assert_eq!(s.working_len(), 1);
        let now = later(&now, Duration::from_secs(1));
        s.tick(&now, &cfg);
        assert_eq!(s.working_len(), 0);
        assert_eq!(s.retries_len(), 1);
        let job = s.find_job("abcdefgh").unwrap();
        let f = job.failure.clone().unwrap();
        assert_eq!(f.errtype, "ReservationExpired");
        assert_eq!(f.message, "Faktory job reservation expired");
        assert!(!f.next_at.is_empty());
        // A late ACK is accepted but changes nothing.
        assert!(!s.ack("abcdefgh", &now));
        assert_eq!(
            s.fail("abcdefgh", None, None, None, &now, &cfg)
                .unwrap_err(),
            "Job not found abcdefgh"
        );
    }

    #[test]
    fn fetch_checks_queues_in_order_and_scheduled_jobs_wait() {
        let cfg = cfg(Duration::ZERO);
        let now = Now::get();
        let mut s = State::default();
        let at = format_time(now.wall + chrono::Duration::seconds(5));
        s.push(job(&format!(r#","queue":"b","at":"{at}""#)), &now)
            .unwrap();
        let mut second = job(r#","queue":"a""#);
        second.jid = "12345678".into();
        s.push(second, &now).unwrap();
        assert_eq!(s.scheduled_len(), 1);
        let got = s.fetch(&["b".into(), "a".into()], &now, &cfg).unwrap();
        assert!(got.contains(r#""queue":"a""#));
        assert!(s.fetch(&["b".into(), "a".into()], &now, &cfg).is_none());
        s.tick(&later(&now, Duration::from_secs(4)), &cfg);
        assert_eq!(s.queue_size("b"), 0);
        s.tick(&later(&now, Duration::from_secs(6)), &cfg);
        assert_eq!(s.queue_size("b"), 1);
        assert!(s.has_event("abcdefgh", JobEventKind::Enqueued));
    }

    #[test]
    fn absurd_failure_counts_from_a_producer_do_not_panic() {
        let now = Now::get();
        for (retry, count) in [(i64::MAX, i64::MAX), (i64::MAX, i64::MAX - 1), (5, -7)] {
            let cfg = Config {
                retry_delay: RetryDelay::Faktory,
                ..cfg(Duration::ZERO)
            };
            let mut s = State::default();
            let extra =
                format!(r#","retry":{retry},"failure":{{"retry_count":{count},"remaining":-3}}"#);
            s.push(job(&extra), &now).unwrap();
            s.fetch(&["default".into()], &now, &cfg).unwrap();
            s.fail("abcdefgh", None, None, None, &now, &cfg).unwrap();
            s.tick(&now, &cfg);
            assert!(s.find_job("abcdefgh").is_some());
        }
        assert!(RetryDelay::Faktory.delay(u32::MAX) >= Duration::from_secs(u64::MAX / 2));
    }

    #[test]
    fn worker_state_only_moves_forward_and_global_is_a_floor() {
        let now = Now::get();
        let mut s = State::default();
        let hello = Hello {
            wid: "w1".into(),
            ..Hello::default()
        };
        assert!(s.beat("w1", None, &now).is_err());
        assert!(s.worker_connected(&hello, 1, now.mono));
        assert_eq!(s.beat("w1", None, &now), Ok(WorkerState::Running));
        s.set_worker_state_for("w1", WorkerState::Quiet);
        assert_eq!(s.beat("w1", None, &now), Ok(WorkerState::Quiet));
        assert_eq!(
            s.beat("w1", Some("terminate"), &now),
            Ok(WorkerState::Terminate)
        );
        s.set_worker_state_for("w1", WorkerState::Running);
        assert_eq!(
            s.beat("w1", Some("running"), &now),
            Ok(WorkerState::Terminate)
        );
        s.worker_disconnected("w1", 1);
        assert!(s.workers().is_empty());
        s.set_global_worker_state(WorkerState::Quiet);
        s.worker_connected(&hello, 2, now.mono);
        assert_eq!(s.beat("w1", None, &now), Ok(WorkerState::Quiet));
    }

    #[test]
    fn the_first_connection_of_a_worker_holds_its_state() {
        let now = Now::get();
        let mut s = State::default();
        let hello = Hello {
            wid: "w1".into(),
            ..Hello::default()
        };
        assert!(s.worker_connected(&hello, 1, now.mono));
        assert!(!s.worker_connected(&hello, 2, now.mono));
        assert_eq!(s.workers()[0].connections, 2);
        // The first one closes: the worker stays, and a later connection does not take over.
        s.worker_disconnected("w1", 1);
        assert_eq!(s.workers()[0].connections, 1);
        assert!(!s.worker_connected(&hello, 3, now.mono));
        s.worker_disconnected("w1", 2);
        s.worker_disconnected("w1", 3);
        assert!(s.workers().is_empty());
        // Forgotten with its last connection: the next one registers it afresh.
        assert!(s.worker_connected(&hello, 4, now.mono));
    }

    #[test]
    fn workers_silent_for_a_minute_are_reaped() {
        let start = Instant::now();
        let mut s = State::default();
        let hello = |wid: &str| Hello {
            wid: wid.into(),
            ..Hello::default()
        };
        s.worker_connected(&hello("quiet"), 1, start);
        s.worker_connected(&hello("quiet"), 2, start);
        s.worker_connected(&hello("beating"), 3, start);
        let (close, next) = s.reap_silent_workers(start, HEARTBEAT_TIMEOUT);
        assert!(close.is_empty());
        assert_eq!(next, Some(start + HEARTBEAT_TIMEOUT));
        // A BEAT just before the minute is up keeps a worker.
        let beat = Now {
            wall: Utc::now(),
            mono: start + HEARTBEAT_TIMEOUT - Duration::from_secs(1),
        };
        s.beat("beating", None, &beat).unwrap();
        let (mut close, next) = s.reap_silent_workers(start + HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT);
        close.sort_unstable();
        assert_eq!(close, [1, 2]);
        assert_eq!(next, Some(beat.mono + HEARTBEAT_TIMEOUT));
        assert_eq!(s.workers().len(), 1);
        assert_eq!(s.workers()[0].wid, "beating");
        assert_eq!(
            s.info(Duration::ZERO, 0)["faktory"]["tasks"]["Workers"]["reaped"],
            1
        );
        // The reaped worker's connections closing later changes nothing.
        s.worker_disconnected("quiet", 1);
        assert_eq!(s.workers().len(), 1);
    }

    #[test]
    fn queue_names_are_checked_when_a_job_enters_its_queue() {
        let now = Now::get();
        let cfg = cfg(Duration::ZERO);
        let mut s = State::default();
        for name in ["bad queue", "bad/queue", "naïve", "q:x"] {
            let extra = format!(r#","queue":{name:?}"#);
            let err = s.push(job(&extra), &now).unwrap_err();
            assert_eq!(
                err,
                format!("cannot get {name:?} queue: queue names must match \\A[a-zA-Z0-9._-]+\\z")
            );
        }
        assert_eq!(s.stats().pushed, 0);
        s.push(job(r#","queue":"Ok.name_1-2""#), &now).unwrap();
        // Scheduled for later, any name is accepted; when it comes due the job is dropped.
        let later = format_time(now.wall + chrono::Duration::seconds(60));
        let mut j = job(&format!(r#","queue":"bad queue","at":"{later}""#));
        j.jid = "scheduled".into();
        s.push(j, &now).unwrap();
        assert_eq!(s.scheduled_len(), 1);
        let due = Now {
            wall: now.wall + chrono::Duration::seconds(61),
            mono: now.mono + Duration::from_secs(61),
        };
        s.tick(&due, &cfg);
        assert_eq!(s.scheduled_len(), 0);
        assert_eq!(s.queue_names(), ["Ok.name_1-2"]);
        let kinds: Vec<_> = s.history("scheduled").iter().map(JobEvent::kind).collect();
        assert_eq!(kinds, [JobEventKind::Pushed, JobEventKind::Discarded]);
    }
}
