//! The workload: producers' random transactions (each job with a marker row written beside
//! it), the worker processes' handlers (a row in their consuming transaction, a side effect
//! in a file outside it), and the oracle that judges every job by its marker once the system
//! has quiesced.

use super::Backend;
use diesel::connection::SimpleConnection;
use diesel::Connection;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Handlers, Job, Producer};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The kind of the barrier jobs, and of the plain (autocommit) ones.
pub const KIND: &str = "nemesis";
pub const PLAIN: &str = "nemesis_plain";
/// The kind of the barrier jobs whose handler takes no connection (run at least once).
pub const DETACHED: &str = "nemesis_detached";

/// Wall-clock nanoseconds: comparable between the test and its worker processes.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

pub fn app_tables<B: Backend>(conn: &mut B::Conn) -> diesel::QueryResult<()> {
    conn.batch_execute(
        "CREATE TABLE nemesis_markers (txn BIGINT NOT NULL, idx BIGINT NOT NULL, \
         PRIMARY KEY (txn, idx))",
    )?;
    conn.batch_execute(
        "CREATE TABLE nemesis_runs (txn BIGINT NOT NULL, idx BIGINT NOT NULL, \
         jid VARCHAR(64) NOT NULL, pid BIGINT NOT NULL)",
    )
}

/// A small deterministic generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn millis(&mut self, max: u64) -> Duration {
        Duration::from_millis(self.below(max + 1))
    }
}

// ---------------------------------------------------------------------------------------------
// The worker processes' handlers.

/// Appends whole lines to this process's side-effect file (one `write` per line, so a
/// SIGKILL leaves whole lines).
pub struct Effects(Mutex<std::fs::File>);

impl Effects {
    pub fn open(dir: &Path) -> Effects {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("effects-{}.log", std::process::id())))
            .expect("the side-effect file");
        Effects(Mutex::new(file))
    }

    fn line(&self, line: String) -> std::io::Result<()> {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(format!("{line}\n").as_bytes())
    }
}

/// One handler for both kinds. Arguments: transaction, index, attempts to fail, milliseconds
/// to sleep. It records its start (with whether it sees its job's marker) and, after writing
/// its row, its side effect.
pub fn handlers<B: Backend>(effects: std::sync::Arc<Effects>) -> Handlers<B::Conn> {
    let handler_effects = std::sync::Arc::clone(&effects);
    let handler = move |job: &Job, conn: &mut B::Conn| -> Result<(), std::io::Error> {
        let start = now_ns();
        let arg = |i: usize| job.args().get(i).and_then(|v| v.as_i64()).unwrap_or(0);
        let (txn, idx, fail, slow) = (arg(0), arg(1), arg(2), arg(3));
        let jid = job.id().as_str().to_string();
        let seen = B::count(
            conn,
            &format!("SELECT COUNT(*) FROM nemesis_markers WHERE txn = {txn} AND idx = {idx}"),
        )
        .map_err(std::io::Error::other)?;
        handler_effects.line(format!(
            "start {txn} {idx} {jid} {start} {seen} {} {}",
            std::process::id(),
            job.kind()
        ))?;
        let failures = job.failure().map_or(0, |f| f.retry_count as i64 + 1);
        if failures < fail {
            return Err(std::io::Error::other(format!(
                "nemesis: attempt {} of {txn}/{idx} fails on purpose",
                failures + 1
            )));
        }
        if slow > 0 {
            std::thread::sleep(Duration::from_millis(slow as u64));
        }
        conn.batch_execute(&format!(
            "INSERT INTO nemesis_runs (txn, idx, jid, pid) VALUES ({txn}, {idx}, '{jid}', {})",
            std::process::id()
        ))
        .map_err(std::io::Error::other)?;
        handler_effects.line(format!("effect {txn} {idx} {jid} {}", now_ns()))
    };
    let handler = std::sync::Arc::new(handler);
    let plain = std::sync::Arc::clone(&handler);
    let detached = move |job: &Job| -> Result<(), std::io::Error> {
        let start = now_ns();
        let arg = |i: usize| job.args().get(i).and_then(|v| v.as_i64()).unwrap_or(0);
        let (txn, idx, fail, slow) = (arg(0), arg(1), arg(2), arg(3));
        let jid = job.id().as_str().to_string();
        effects.line(format!(
            "start {txn} {idx} {jid} {start} - {} {}",
            std::process::id(),
            job.kind()
        ))?;
        let failures = job.failure().map_or(0, |f| f.retry_count as i64 + 1);
        if failures < fail {
            return Err(std::io::Error::other(format!(
                "nemesis: attempt {} of {txn}/{idx} fails on purpose",
                failures + 1
            )));
        }
        if slow > 0 {
            std::thread::sleep(Duration::from_millis(slow as u64));
        }
        effects.line(format!("effect {txn} {idx} {jid} {}", now_ns()))
    };
    Handlers::new()
        .register(KIND, move |job: &Job, conn: &mut B::Conn| {
            handler(job, conn)
        })
        .register_without_barrier(PLAIN, move |job: &Job, conn: &mut B::Conn| plain(job, conn))
        .register_without_connection(DETACHED, detached)
}

// ---------------------------------------------------------------------------------------------
// The producers.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Commit,
    Several,
    Many,
    Error,
    Panic,
    SavepointRolledBack,
    SavepointReleased,
    LongOpen,
    Autocommit,
}

const SHAPES: [(Shape, u64); 9] = [
    (Shape::Commit, 25),
    (Shape::Several, 10),
    (Shape::Many, 8),
    (Shape::Error, 10),
    (Shape::Panic, 4),
    (Shape::SavepointRolledBack, 8),
    (Shape::SavepointReleased, 6),
    (Shape::LongOpen, 4),
    (Shape::Autocommit, 5),
];

/// One job as planned.
#[derive(Debug, Clone)]
pub struct PlannedJob {
    pub idx: i64,
    pub fail: i64,
    pub slow_ms: i64,
    /// Enqueued in a savepoint that was rolled back (its marker with it).
    pub rolled_back_savepoint: bool,
    pub plain: bool,
    /// Its handler takes no connection: no row, its side effect at least once.
    pub detached: bool,
    pub jid: Option<String>,
}

/// What a producer did and saw in one transaction.
#[derive(Debug, Clone)]
pub struct TxnRecord {
    pub txn: i64,
    pub shape: Shape,
    pub jobs: Vec<PlannedJob>,
    pub began_ns: u64,
    /// Taken as the transaction's closure returned, just before Diesel sent `COMMIT`.
    pub commit_sent_ns: Option<u64>,
    pub ended_ns: u64,
    /// What the client saw: `committed`, or the error.
    pub outcome: String,
}

impl TxnRecord {
    /// The client sent `COMMIT` and saw an error: only the marker tells.
    pub fn uncertain(&self) -> bool {
        self.commit_sent_ns.is_some() && self.outcome != "committed"
    }
}

/// An error with its sources.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn job_of(txn: i64, j: &PlannedJob, queue: &str) -> Job {
    let mut job = Job::new(
        if j.plain {
            PLAIN
        } else if j.detached {
            DETACHED
        } else {
            KIND
        },
        vec![txn, j.idx, j.fail, j.slow_ms],
    )
    .on_queue(queue);
    job.reserve_for = Some(Duration::from_secs(15));
    job
}

/// Runs one random transaction on `conn` (a fresh connection of its own for a panic) and
/// returns its record.
pub fn one_transaction<B: Backend>(
    rng: &mut Rng,
    conn: &mut B::Conn,
    url: &str,
    producer: &Producer,
    queue: &str,
    txn: i64,
    max_fail: i64,
) -> TxnRecord {
    let mut pick = rng.below(SHAPES.iter().map(|s| s.1).sum());
    let shape = SHAPES
        .iter()
        .find(|(_, w)| {
            if pick < *w {
                true
            } else {
                pick -= w;
                false
            }
        })
        .unwrap()
        .0;
    let count = match shape {
        Shape::Several => 2 + rng.below(3),
        Shape::Many => 2 + rng.below(12),
        Shape::SavepointRolledBack | Shape::SavepointReleased => 2,
        _ => 1,
    };
    let mut jobs: Vec<PlannedJob> = (0..count as i64)
        .map(|idx| PlannedJob {
            idx,
            fail: if rng.chance(15) {
                1 + rng.below(max_fail.max(1) as u64) as i64
            } else {
                0
            }
            .min(max_fail),
            slow_ms: if rng.chance(8) {
                100 + rng.below(900) as i64
            } else {
                0
            },
            rolled_back_savepoint: shape == Shape::SavepointRolledBack && idx == 1,
            plain: shape == Shape::Autocommit,
            detached: shape != Shape::Autocommit && rng.chance(20),
            jid: None,
        })
        .collect();
    let pause = match shape {
        Shape::LongOpen => Duration::from_millis(300 + rng.below(1200)),
        _ => {
            let max = if rng.chance(30) { 40 } else { 3 };
            rng.millis(max)
        }
    };
    let began_ns = now_ns();
    let mut commit_sent_ns = None;
    let marker = |c: &mut B::Conn, idx: i64| {
        c.batch_execute(&format!(
            "INSERT INTO nemesis_markers (txn, idx) VALUES ({txn}, {idx})"
        ))
    };
    let outcome: Result<(), String> = match shape {
        Shape::Autocommit => (|| {
            marker(conn, 0).map_err(|e| e.to_string())?;
            let job = job_of(txn, &jobs[0], queue);
            jobs[0].jid = Some(job.id().as_str().to_string());
            producer.push(job).map_err(|e| chain(&e))
        })(),
        Shape::Panic => {
            let jobs = &mut jobs;
            let result = std::thread::scope(|s| {
                s.spawn(|| {
                    let Ok(mut own) = B::establish(url) else {
                        return "no connection".to_string();
                    };
                    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let _ = own.transaction(|c| {
                            marker(c, 0)?;
                            let jid =
                                c.enqueue_with_barrier(producer, job_of(txn, &jobs[0], queue))?;
                            jobs[0].jid = Some(jid.as_str().to_string());
                            std::thread::sleep(pause);
                            std::panic::resume_unwind(Box::new("nemesis: a producer panics"));
                            #[allow(unreachable_code)]
                            Ok::<_, Error>(())
                        });
                    }));
                    drop(own);
                    match caught {
                        Ok(()) => "ended before its panic".to_string(),
                        Err(_) => "panicked".to_string(),
                    }
                })
                .join()
                .unwrap_or_else(|_| "panicked".to_string())
            });
            Err(result)
        }
        _ => {
            let jobs = &mut jobs;
            let commit_sent = &mut commit_sent_ns;
            conn.transaction(|c| {
                match shape {
                    Shape::Many => {
                        for j in jobs.iter() {
                            marker(c, j.idx)?;
                        }
                        let batch: Vec<Job> = jobs.iter().map(|j| job_of(txn, j, queue)).collect();
                        let jids = c.enqueue_many_with_barrier(producer, batch)?;
                        for (j, jid) in jobs.iter_mut().zip(jids) {
                            j.jid = Some(jid.as_str().to_string());
                        }
                    }
                    Shape::SavepointRolledBack | Shape::SavepointReleased => {
                        marker(c, 0)?;
                        let jid = c.enqueue_with_barrier(producer, job_of(txn, &jobs[0], queue))?;
                        jobs[0].jid = Some(jid.as_str().to_string());
                        let rolled_back = shape == Shape::SavepointRolledBack;
                        let inner = c.transaction(|c| {
                            marker(c, 1)?;
                            let jid =
                                c.enqueue_with_barrier(producer, job_of(txn, &jobs[1], queue))?;
                            jobs[1].jid = Some(jid.as_str().to_string());
                            if rolled_back {
                                Err(Error::Database(diesel::result::Error::RollbackTransaction))
                            } else {
                                Ok(())
                            }
                        });
                        match inner {
                            Err(Error::Database(diesel::result::Error::RollbackTransaction))
                                if rolled_back => {}
                            other => other?,
                        }
                    }
                    _ => {
                        for j in jobs.iter_mut() {
                            marker(c, j.idx)?;
                            let jid = c.enqueue_with_barrier(producer, job_of(txn, j, queue))?;
                            j.jid = Some(jid.as_str().to_string());
                        }
                    }
                }
                std::thread::sleep(pause);
                if shape == Shape::Error {
                    return Err(Error::Database(diesel::result::Error::RollbackTransaction));
                }
                *commit_sent = Some(now_ns());
                Ok(())
            })
            .map_err(|e: Error| chain(&e))
        }
    };
    TxnRecord {
        txn,
        shape,
        jobs,
        began_ns,
        commit_sent_ns,
        ended_ns: now_ns(),
        outcome: match outcome {
            Ok(()) => "committed".to_string(),
            Err(e) => e,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle.

/// One line of a side-effect file.
#[derive(Debug, Clone)]
pub struct EffectLine {
    pub start: bool,
    pub jid: String,
    pub at_ns: u64,
    /// Start lines: whether the handler saw its job's marker; its process.
    pub saw_marker: bool,
    pub pid: String,
}

/// Reads every worker process's side-effect file: lines by (transaction, index).
pub fn read_effects(dir: &Path) -> HashMap<(i64, i64), Vec<EffectLine>> {
    let mut all: HashMap<(i64, i64), Vec<EffectLine>> = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("effects-") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).unwrap();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() < 5 {
                continue;
            }
            let (Ok(txn), Ok(idx), Ok(at)) = (f[1].parse(), f[2].parse(), f[4].parse()) else {
                continue;
            };
            all.entry((txn, idx)).or_default().push(EffectLine {
                start: f[0] == "start",
                jid: f[3].to_string(),
                at_ns: at,
                saw_marker: f.get(5) == Some(&"1"),
                pid: f.get(6).map_or(name.clone(), |p| p.to_string()),
            });
        }
    }
    all
}

/// What the oracle found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub violations: Vec<String>,
    pub committed_jobs: u64,
    /// Committed jobs whose handler takes no connection.
    pub committed_detached: u64,
    pub aborted_jobs: u64,
    pub committed_txns: u64,
    pub uncertain: u64,
    pub plain_pushed: u64,
    pub plain_ran: u64,
    pub shapes: BTreeMap<String, u64>,
    /// What the clients saw, by the first words of their errors.
    pub outcomes: BTreeMap<String, u64>,
}

/// Judges every job of `records` by its marker: a committed job's row exists exactly once and
/// its side effect at least once, and no attempt started before the `COMMIT` was sent; a job
/// that did not commit left neither a row, a side effect nor a start.
pub fn judge(
    records: &[TxnRecord],
    markers: &std::collections::HashSet<(i64, i64)>,
    runs: &HashMap<(i64, i64), Vec<String>>,
    effects: &HashMap<(i64, i64), Vec<EffectLine>>,
) -> Verdict {
    let mut v = Verdict::default();
    let mut known = std::collections::HashSet::new();
    for r in records {
        *v.shapes.entry(format!("{:?}", r.shape)).or_default() += 1;
        let outcome: String = r.outcome.chars().take(100).collect();
        *v.outcomes.entry(outcome).or_default() += 1;
        if r.uncertain() {
            v.uncertain += 1;
        }
        let mut problems = Vec::new();
        let mut any_committed = false;
        for j in &r.jobs {
            let key = (r.txn, j.idx);
            known.insert(key);
            let committed = markers.contains(&key);
            let rows = runs.get(&key).map_or(0, |r| r.len());
            let lines = effects.get(&key).map(Vec::as_slice).unwrap_or(&[]);
            let starts: Vec<&EffectLine> = lines.iter().filter(|l| l.start).collect();
            let done = lines.iter().filter(|l| !l.start).count();
            if j.plain {
                if committed && j.jid.is_some() && r.outcome == "committed" {
                    v.plain_pushed += 1;
                    if rows > 0 {
                        v.plain_ran += 1;
                    }
                }
                continue;
            }
            any_committed |= committed;
            if committed {
                v.committed_jobs += 1;
                v.committed_detached += u64::from(j.detached);
                if j.rolled_back_savepoint {
                    problems.push(format!(
                        "job {}: its rolled-back savepoint's marker exists",
                        j.idx
                    ));
                }
                let want = usize::from(!j.detached);
                if rows != want {
                    problems.push(format!(
                        "job {}: committed, {rows} handler rows (want {want})",
                        j.idx
                    ));
                }
                if done == 0 {
                    problems.push(format!("job {}: committed, no side effect", j.idx));
                }
                match r.commit_sent_ns {
                    None => problems.push(format!(
                        "job {}: committed although the client never sent COMMIT",
                        j.idx
                    )),
                    Some(sent) => {
                        for s in starts.iter().filter(|s| s.at_ns < sent) {
                            problems.push(format!(
                                "job {}: handler started {} µs before COMMIT was sent ({} in {})",
                                j.idx,
                                (sent - s.at_ns) / 1000,
                                s.jid,
                                s.pid
                            ));
                        }
                    }
                }
                for s in starts.iter().filter(|s| !s.saw_marker && !j.detached) {
                    problems.push(format!(
                        "job {}: handler ran without seeing its marker ({} in {})",
                        j.idx, s.jid, s.pid
                    ));
                }
            } else {
                v.aborted_jobs += 1;
                if rows != 0 || !starts.is_empty() || done != 0 {
                    problems.push(format!(
                        "job {}: not committed, yet {rows} handler rows, {} starts, {done} side effects",
                        j.idx,
                        starts.len()
                    ));
                }
            }
            if r.outcome == "committed" && !committed && !j.rolled_back_savepoint {
                problems.push(format!(
                    "job {}: the client saw its COMMIT succeed but the marker is missing",
                    j.idx
                ));
            }
        }
        if any_committed {
            v.committed_txns += 1;
        }
        if !problems.is_empty() {
            let mut history = format!(
                "transaction {} ({:?}): client outcome {:?}, began {}, COMMIT sent {:?}, ended {}\n",
                r.txn, r.shape, r.outcome, r.began_ns, r.commit_sent_ns, r.ended_ns
            );
            for j in &r.jobs {
                let key = (r.txn, j.idx);
                history.push_str(&format!(
                    "    job {} ({}) jid {:?} fail {} slow {} ms savepoint-rolled-back {} marker {} rows {:?}\n",
                    j.idx,
                    if j.detached { "without connection" } else { "with connection" },
                    j.jid,
                    j.fail,
                    j.slow_ms,
                    j.rolled_back_savepoint,
                    markers.contains(&key),
                    runs.get(&key)
                ));
                for l in effects.get(&key).map(Vec::as_slice).unwrap_or(&[]) {
                    history.push_str(&if l.start {
                        format!(
                            "      start  {} at {} saw-marker {} in process {}\n",
                            l.jid, l.at_ns, l.saw_marker, l.pid
                        )
                    } else {
                        format!("      effect {} at {} ({})\n", l.jid, l.at_ns, l.pid)
                    });
                }
            }
            v.violations
                .push(format!("{}  {}", history, problems.join("\n  ")));
        }
    }
    for (key, rows) in runs {
        if !known.contains(key) {
            v.violations
                .push(format!("handler rows for an unknown job {key:?}: {rows:?}"));
        }
    }
    v
}
