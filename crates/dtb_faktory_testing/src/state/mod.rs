//! The server's job store and the rules that move jobs between queues and sets.
//!
//! Everything here runs under the server's one mutex; nothing blocks or does I/O.

use crate::events::{JobEvent, JobEventKind, RetryDelay, Stats};
use crate::job::{Failure, Job, MAX_RESERVE_FOR};
use crate::protocol::format_time;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

mod inspect;
#[cfg(test)]
mod tests;
mod workers;

pub(crate) use workers::{Hello, HEARTBEAT_TIMEOUT};
pub use workers::{WorkerInfo, WorkerState};

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
    /// Prepares the state of a stopped server for a new one: no shutdown, no connected
    /// worker.
    pub(crate) fn restarted(&mut self) {
        self.shutdown = false;
        self.workers.clear();
        self.touch();
    }

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
        let retry = job.retry.unwrap_or(crate::job::DEFAULT_RETRY);
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
}
