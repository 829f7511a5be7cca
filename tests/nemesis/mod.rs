//! The nemesis soak: producers run random transactions while worker processes consume their
//! jobs and a nemesis crashes the database server, the Faktory server and the workers, kills
//! database sessions, and once makes Faktory lose all its data. Once the faults stop and the
//! system has quiesced, an oracle judges every job by its marker row (see `workload.rs`).
//!
//! Every server is private to the run (`servers.rs`): crashing them disturbs nothing else.

pub mod servers;
pub mod workload;

use crate::common::child::ChildTest;
use crate::common::LoadOne;
use diesel::connection::SimpleConnection;
use diesel::r2d2::{ConnectionManager, R2D2Connection};
use diesel::Connection;
use diesel_transaction_barrier::{BarrierConnection, Producer, WorkerBuilder};
use servers::{Broker, DbServer};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workload::{Rng, TxnRecord};

/// What differs between the backends.
pub trait Backend: Send + Sync + 'static {
    type Conn: BarrierConnection + R2D2Connection + Connection + LoadOne + Send + 'static;
    /// Its name, as the child processes are told it.
    const NAME: &'static str;
    /// The SQL type counts are cast to.
    const INTEGER: &'static str;
    /// The SQL type texts are cast to.
    const TEXT: &'static str;
    /// The connections a worker process's pool holds.
    const POOL: u32;

    /// Creates and starts a private server in `dir`, with an empty database at its URL.
    fn server(dir: &Path) -> Box<dyn DbServer>;

    /// Whether the nemesis crashes its server and kills its sessions (SQLite has neither:
    /// there, worker processes and Faktory are what crash).
    const DB_FAULTS: bool = true;

    /// A connection as the application opens one.
    fn establish(url: &str) -> diesel::ConnectionResult<Self::Conn> {
        Self::Conn::establish(url)
    }

    /// Kills about half the client sessions but the caller's; how many.
    fn kill_sessions(conn: &mut Self::Conn) -> usize;

    /// Rows of `txn`, `idx` and `jid`.
    fn pairs(conn: &mut Self::Conn, sql: &str) -> Result<Vec<Pair>, diesel::result::Error>;

    /// One integer.
    fn count(conn: &mut Self::Conn, sql: &str) -> Result<i64, diesel::result::Error> {
        conn.load_i64(&format!("SELECT CAST(({sql}) AS {}) AS v", Self::INTEGER))
            .map(|v| v.unwrap_or(0))
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Whether the soak was asked for; says how to ask for it otherwise.
pub fn wanted(test: &str) -> bool {
    if std::env::var("DTB_NEMESIS").as_deref() == Ok("1") {
        return true;
    }
    eprintln!(
        "{test}: skipped; the nemesis soak runs with DTB_NEMESIS=1: DTB_NEMESIS=1 cargo test \
         --all-features --test nemesis -- --ignored --nocapture (DTB_NEMESIS_SECS sets how \
         long the faults go on)"
    );
    false
}

/// The settings of one run, from the environment.
#[derive(Debug, Clone)]
struct Settings {
    secs: u64,
    producers: u64,
    workers: u64,
    pause_ms: u64,
    think_ms: u64,
    quiesce_secs: u64,
    grace_ms: u64,
    seed: u64,
    genuine: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Settings {
        let genuine = std::env::var_os("FAKTORY_NEMESIS_GENUINE")
            .map(PathBuf::from)
            .filter(|p| p.join("start.sh").exists());
        Settings {
            secs: env_u64("DTB_NEMESIS_SECS", 60),
            producers: env_u64("DTB_NEMESIS_PRODUCERS", 3).max(1),
            workers: env_u64("DTB_NEMESIS_WORKERS", 2).max(2),
            pause_ms: env_u64("DTB_NEMESIS_PAUSE_MS", 2500).max(100),
            think_ms: env_u64("DTB_NEMESIS_THINK_MS", 10),
            quiesce_secs: env_u64("DTB_NEMESIS_QUIESCE_SECS", 300),
            grace_ms: env_u64("DTB_NEMESIS_GRACE_MS", 4000),
            seed: std::env::var("DTB_NEMESIS_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 | 1),
            genuine,
        }
    }
}

/// The worker process: the name of its test, and what it is told.
const CHILD_TEST: &str = "nemesis_worker_process";
const QUEUE: &str = "nemesis";

/// A worker process's body: connects (again and again while the database or Faktory is
/// down) and runs until killed.
pub fn worker_process<B: Backend>() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set"));
    let url = var("NEMESIS_DB_URL");
    let faktory = var("NEMESIS_FAKTORY_URL");
    let effects = Arc::new(workload::Effects::open(Path::new(&var("NEMESIS_EFFECTS"))));
    let retry_ms: u64 = var("NEMESIS_RETRY_MS").parse().unwrap();
    let grace = Duration::from_millis(var("NEMESIS_GRACE_MS").parse().unwrap());
    crate::common::init_tracing();
    let mut announced = false;
    loop {
        let pool = r2d2::Pool::builder()
            .max_size(B::POOL)
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(5))
            .build_unchecked(ConnectionManager::<B::Conn>::new(&url));
        let mut builder = WorkerBuilder::new(pool)
            .handlers(workload::handlers::<B>(Arc::clone(&effects)))
            .url(faktory.clone())
            .workers(3)
            .max_waiting(24)
            .block_limit(Duration::from_secs(3))
            .reconnect_backoff(Duration::from_millis(200))
            .shutdown_timeout(Duration::from_secs(2))
            .reap_interval(Duration::from_secs(5))
            .reconcile_grace(Some(grace));
        if retry_ms > 0 {
            builder = builder.retry_schedule(move |_| Duration::from_millis(retry_ms));
        }
        match builder.connect() {
            Ok(mut worker) => {
                if !announced {
                    println!("nemesis-worker: ready");
                    announced = true;
                }
                match worker.run(&[QUEUE]) {
                    Ok(reason) => {
                        eprintln!("nemesis worker {}: stopped: {reason:?}", std::process::id())
                    }
                    Err(e) => eprintln!("nemesis worker {}: run: {e}", std::process::id()),
                }
            }
            Err(e) => eprintln!("nemesis worker {}: connect: {e}", std::process::id()),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    WorkerKill,
    SessionKill,
    DbCrash,
    FaktoryCrash,
    BrokerLoss,
}

const FAULTS: [(Fault, u64); 4] = [
    (Fault::WorkerKill, 30),
    (Fault::SessionKill, 25),
    (Fault::DbCrash, 27),
    (Fault::FaktoryCrash, 18),
];

struct Run {
    backend: &'static str,
    settings: Settings,
    db: Mutex<Box<dyn DbServer>>,
    broker: Mutex<Broker>,
    workers: Mutex<Vec<ChildTest>>,
    effects: PathBuf,
    url: String,
}

impl Run {
    fn start_worker(&self, broker_url: &str) -> ChildTest {
        ChildTest::start(
            CHILD_TEST,
            &[
                ("NEMESIS_CHILD", self.backend.to_string()),
                ("NEMESIS_DB_URL", self.url.clone()),
                ("NEMESIS_FAKTORY_URL", broker_url.to_string()),
                ("NEMESIS_EFFECTS", self.effects.display().to_string()),
                (
                    "NEMESIS_RETRY_MS",
                    if self.settings.genuine.is_some() {
                        "0"
                    } else {
                        "1500"
                    }
                    .to_string(),
                ),
                ("NEMESIS_GRACE_MS", self.settings.grace_ms.to_string()),
                // The faktory client panics in its Drop when its server went away: one line
                // each, not a backtrace.
                ("RUST_BACKTRACE", "0".to_string()),
            ],
        )
    }
}

/// Runs the soak on backend `B` and fails on any violation.
pub fn soak<B: Backend>() {
    let settings = Settings::from_env();
    let scratch = std::env::temp_dir().join(format!(
        "dtb-nemesis-{}-{}-{}",
        B::NAME,
        std::process::id(),
        settings.seed % 100_000
    ));
    std::fs::create_dir_all(&scratch).unwrap();
    // The folder must be reachable by the postgres user.
    let _ = std::process::Command::new("chmod")
        .arg("755")
        .arg(&scratch)
        .status();
    eprintln!(
        "nemesis {}: {} s of faults, {} producers, {} worker processes, seed {}, Faktory {}, in {}",
        B::NAME,
        settings.secs,
        settings.producers,
        settings.workers,
        settings.seed,
        settings
            .genuine
            .as_ref()
            .map_or("in-process".to_string(), |p| format!(
                "genuine ({})",
                p.display()
            )),
        scratch.display()
    );
    let db = B::server(&scratch.join("db"));
    let url = db.url();
    {
        let mut conn = B::establish(&url).expect("the private database");
        diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        workload::app_tables::<B>(&mut conn).expect("the test's tables");
    }
    let broker = match &settings.genuine {
        Some(folder) => Broker::genuine(folder, &scratch),
        None => Broker::in_process(Duration::from_millis(300)),
    };
    let effects = scratch.join("effects");
    std::fs::create_dir_all(&effects).unwrap();
    let max_fail = if broker.is_genuine() { 1 } else { 2 };
    let broker_url = broker.url();
    let run = Run {
        backend: B::NAME,
        settings: settings.clone(),
        db: Mutex::new(db),
        broker: Mutex::new(broker),
        workers: Mutex::new(Vec::new()),
        effects: effects.clone(),
        url: url.clone(),
    };
    {
        let mut workers = run.workers.lock().unwrap();
        for _ in 0..settings.workers {
            workers.push(run.start_worker(&broker_url));
        }
        for w in workers.iter() {
            assert!(
                w.next_after("nemesis-worker: ready", Duration::from_secs(60))
                    .is_some(),
                "a worker process did not start"
            );
        }
    }
    let producer = Producer::builder()
        .url(broker_url.clone())
        .timeout(Duration::from_secs(5))
        .connect()
        .expect("producer");
    let records: Mutex<Vec<TxnRecord>> = Mutex::new(Vec::new());
    let next_txn = AtomicI64::new(1);
    let producing = AtomicBool::new(true);
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..settings.producers {
            let (records, next_txn, producing, producer, url) =
                (&records, &next_txn, &producing, &producer, &url);
            let think_ms = settings.think_ms;
            let mut rng = Rng(settings
                .seed
                .wrapping_add(t.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                | 1);
            s.spawn(move || {
                let mut conn: Option<B::Conn> = None;
                while producing.load(Ordering::Relaxed) {
                    let Some(c) = conn.as_mut() else {
                        conn = B::establish(url).ok();
                        if conn.is_none() {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        continue;
                    };
                    let txn = next_txn.fetch_add(1, Ordering::Relaxed);
                    let record = workload::one_transaction::<B>(
                        &mut rng, c, url, producer, QUEUE, txn, max_fail,
                    );
                    if record.outcome != "committed" && c.batch_execute("SELECT 1").is_err() {
                        conn = None;
                    }
                    if record.outcome.contains("Connection refused") {
                        // Faktory or the database is down: a little patience.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    records.lock().unwrap().push(record);
                    std::thread::sleep(rng.millis(think_ms));
                }
            });
        }
        // The nemesis.
        let mut rng = Rng(settings.seed.rotate_left(17) | 1);
        let deadline = Duration::from_secs(settings.secs);
        let mut broker_lost = false;
        let mut progress = Instant::now();
        while started.elapsed() < deadline {
            if progress.elapsed() >= Duration::from_secs(60) {
                progress = Instant::now();
                eprintln!(
                    "nemesis {}: {:.0?} of faults, {} transactions, faults {faults:?}",
                    B::NAME,
                    started.elapsed(),
                    records.lock().unwrap().len()
                );
            }
            std::thread::sleep(Duration::from_millis(100 + rng.below(settings.pause_ms)));
            let mut chosen: Vec<Fault> = Vec::new();
            if !broker_lost && started.elapsed() > deadline * 2 / 5 {
                chosen.push(Fault::BrokerLoss);
                broker_lost = true;
            }
            let n = if rng.chance(20) { 2 } else { 1 };
            while chosen.len() < n {
                let mut pick = rng.below(100);
                if !B::DB_FAULTS {
                    // Worker kills and Faktory crashes only, in the same proportions.
                    pick = if rng.below(48) < 30 { 0 } else { 99 };
                }
                let fault = FAULTS
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
                if !chosen.contains(&fault) {
                    chosen.push(fault);
                }
            }
            if chosen.len() > 1 {
                *faults.entry("two at once".into()).or_default() += 1;
            }
            // Break everything chosen, then repair what stays broken.
            let mut db_down = false;
            let mut killed_workers = 0;
            for fault in &chosen {
                match fault {
                    Fault::WorkerKill => {
                        let mut workers = run.workers.lock().unwrap();
                        let i = rng.below(workers.len() as u64) as usize;
                        workers.remove(i).kill();
                        killed_workers += 1;
                        *faults.entry("worker killed".into()).or_default() += 1;
                    }
                    Fault::SessionKill if !db_down => {
                        if let Ok(mut c) = B::establish(&url) {
                            let n = B::kill_sessions(&mut c);
                            *faults.entry("sessions killed (rounds)".into()).or_default() += 1;
                            *faults
                                .entry("sessions killed (sessions)".into())
                                .or_default() += n as u64;
                        }
                    }
                    Fault::SessionKill => {}
                    Fault::DbCrash => {
                        run.db.lock().unwrap().crash();
                        db_down = true;
                        *faults.entry("database crashed".into()).or_default() += 1;
                    }
                    Fault::FaktoryCrash | Fault::BrokerLoss => {
                        let keep = *fault == Fault::FaktoryCrash;
                        run.broker.lock().unwrap().crash(keep, rng.millis(800));
                        *faults
                            .entry(
                                if keep {
                                    "Faktory crashed"
                                } else {
                                    "Faktory lost its data"
                                }
                                .into(),
                            )
                            .or_default() += 1;
                    }
                }
            }
            if db_down {
                std::thread::sleep(rng.millis(1500));
                run.db.lock().unwrap().start();
            }
            let mut workers = run.workers.lock().unwrap();
            for _ in 0..killed_workers {
                workers.push(run.start_worker(&broker_url));
            }
        }
        producing.store(false, Ordering::Relaxed);
    });
    let faults_over = started.elapsed();
    // Quiesce: no barrier row, no job in Faktory.
    let quiesce_start = Instant::now();
    let mut last = String::new();
    let quiesced = loop {
        let rows = B::establish(&url)
            .ok()
            .and_then(|mut c| B::count(&mut c, "SELECT COUNT(*) FROM dtb_barriers").ok());
        let jobs = run.broker.lock().unwrap().jobs().ok();
        if let (Some(0), Some(j)) = (rows, jobs) {
            if j.total() == 0 {
                break true;
            }
        }
        last = format!("barrier rows {rows:?}, Faktory {jobs:?}");
        if quiesce_start.elapsed() > Duration::from_secs(settings.quiesce_secs) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let quiesce = quiesce_start.elapsed();
    // Stop the workers, then judge.
    for mut w in run.workers.lock().unwrap().drain(..) {
        w.kill();
    }
    let records = records.into_inner().unwrap();
    let mut conn = B::establish(&url).expect("the database after the run");
    let markers: HashSet<(i64, i64)> = load_pairs::<B>(&mut conn, "nemesis_markers")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut runs: HashMap<(i64, i64), Vec<String>> = HashMap::new();
    for (k, jid) in load_pairs::<B>(&mut conn, "nemesis_runs") {
        runs.entry(k).or_default().push(jid);
    }
    let effect_lines = workload::read_effects(&effects);
    let mut verdict = workload::judge(&records, &markers, &runs, &effect_lines);
    if !quiesced {
        verdict.violations.push(format!(
            "did not quiesce within {} s: {last}",
            settings.quiesce_secs
        ));
    }
    let left_rows = B::count(&mut conn, "SELECT COUNT(*) FROM dtb_barriers").unwrap_or(-1);
    if left_rows != 0 {
        verdict
            .violations
            .push(format!("{left_rows} barrier rows left"));
    }
    let left_jobs = run.broker.lock().unwrap().jobs();
    if !matches!(left_jobs, Ok(j) if j.total() == 0) {
        verdict
            .violations
            .push(format!("jobs left in Faktory: {left_jobs:?}"));
    }
    for v in &verdict.violations {
        eprintln!("VIOLATION: {v}");
    }
    let jobs: usize = records.iter().map(|r| r.jobs.len()).sum();
    eprintln!(
        "nemesis {} figures: transactions {} (committed {}), jobs {} (committed {}, {} of them \
         without a connection, not committed {}, \
         plain {} pushed / {} ran), uncertain outcomes {}, faults {:?}, violations {}, faults for {:.1?}, \
         quiesced in {:.1?} ({}), wall time {:.1?}, seed {}, shapes {:?}, client outcomes {:?}",
        B::NAME,
        records.len(),
        verdict.committed_txns,
        jobs,
        verdict.committed_jobs,
        verdict.committed_detached,
        verdict.aborted_jobs,
        verdict.plain_pushed,
        verdict.plain_ran,
        verdict.uncertain,
        faults,
        verdict.violations.len(),
        faults_over,
        quiesce,
        if quiesced { "quiet" } else { "NOT quiet" },
        started.elapsed(),
        settings.seed,
        verdict.shapes,
        verdict.outcomes,
    );
    drop(conn);
    drop(run);
    if verdict.violations.is_empty() {
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        eprintln!(
            "nemesis {}: the run's files are kept in {}",
            B::NAME,
            scratch.display()
        );
    }
    assert!(
        verdict.violations.is_empty(),
        "{} violations (above)",
        verdict.violations.len()
    );
}

/// A row of `nemesis_markers` or `nemesis_runs`.
#[derive(diesel::QueryableByName)]
pub struct Pair {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub txn: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub idx: i64,
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub jid: String,
}

/// The (txn, idx) pairs of `table`, with `jid` where it has one.
fn load_pairs<B: Backend>(conn: &mut B::Conn, table: &str) -> Vec<((i64, i64), String)> {
    let jid = if table == "nemesis_runs" {
        "jid".to_string()
    } else {
        format!("CAST('' AS {})", B::TEXT)
    };
    B::pairs(conn, &format!("SELECT txn, idx, {jid} AS jid FROM {table}"))
        .expect("the run's rows")
        .into_iter()
        .map(|p| ((p.txn, p.idx), p.jid))
        .collect()
}
