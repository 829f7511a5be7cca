//! The barrier contract on SQLite. Each test gets a database file of its own, in a temporary
//! directory that is removed when the test ends.
//!
//! SQLite has no server, so three `TestDb` methods have no direct equivalent:
//!
//! * `session_id`: a connection has no server-side id. It returns a number unique in this
//!   process, and nothing else uses it.
//! * `waiters_on`: SQLite cannot list who waits for a lock. The worker waits inside the
//!   `dtb_sqlite_wait` tracing span, which names the database file; a tracing layer installed
//!   by these tests counts the workers inside it, per file. A database has one write lock, held
//!   by one transaction at a time, and the scenarios ask while their own transaction holds it
//!   (it has written): so a worker waiting on this file waits on that session.
//! * `kill`: nothing can end another connection's transaction in SQLite. What a killed
//!   producer means here is a producer *process* that dies mid-transaction: see
//!   `killed_producer_aborts` below, which runs the producer as a child process (this test
//!   binary, run again with `producer_child` as its only test) and kills it.
#![cfg(feature = "sqlite")]

mod common;

use common::scenarios;
use common::{
    drain_with_sentinel, expect_no_run, expect_run, handlers, insert_order, next_id, runs_of,
    wait_until, Env, Ran, TestDb, EVENTUALLY, PAID,
};
use crossbeam_channel::{unbounded, Receiver};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel_transaction_barrier::testing::JobEventKind;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Job, Producer};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};

struct Lite {
    dir: PathBuf,
}

#[derive(QueryableByName)]
struct I64Row {
    #[diesel(sql_type = Nullable<BigInt>)]
    v: Option<i64>,
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Nullable<Text>)]
    v: Option<String>,
}

/// The database file's name inside the test's directory.
const FILE: &str = "test.db";

impl Lite {
    fn with_dir(migrate: bool) -> Lite {
        waits::install();
        let dir =
            std::env::temp_dir().join(format!("dtb-sqlite-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let db = Lite { dir };
        let mut conn = db.connect();
        if migrate {
            diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        } else {
            // The same journal mode as the migrated databases, without the barrier table.
            Lite::exec(&mut conn, "PRAGMA journal_mode = WAL");
        }
        common::create_app_tables::<Lite>(&mut conn);
        db
    }

    /// How many workers are waiting for this database's write lock right now.
    fn waiting_workers(&self) -> i64 {
        waits::waiting_on(&self.dir.join(FILE))
    }
}

impl Drop for Lite {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestDb for Lite {
    type Conn = SqliteConnection;

    fn create() -> Self {
        Lite::with_dir(true)
    }

    fn create_unmigrated() -> Self {
        Lite::with_dir(false)
    }

    fn url(&self) -> String {
        self.dir.join(FILE).to_string_lossy().into_owned()
    }

    /// An application connection. Like any SQLite application with more than one connection,
    /// it needs a busy timeout: the worker holds the write lock for a moment while it checks
    /// for a rollback, and while a handler runs. (The worker's pool needs none: the backend sets
    /// what it needs.)
    fn connect(&self) -> SqliteConnection {
        let mut conn = SqliteConnection::establish(&self.url()).expect("connect");
        conn.batch_execute("PRAGMA busy_timeout = 10000")
            .expect("busy timeout");
        conn
    }

    fn exec(conn: &mut SqliteConnection, sql: &str) {
        diesel::sql_query(sql)
            .execute(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn query_i64(conn: &mut SqliteConnection, sql: &str) -> Option<i64> {
        diesel::sql_query(format!("SELECT CAST(({sql}) AS INTEGER) AS v"))
            .get_result::<I64Row>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
    }

    fn query_string(conn: &mut SqliteConnection, sql: &str) -> Option<String> {
        diesel::sql_query(format!("SELECT CAST(({sql}) AS TEXT) AS v"))
            .get_result::<TextRow>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
    }

    fn session_id(_conn: &mut SqliteConnection) -> i64 {
        static NEXT: AtomicI64 = AtomicI64::new(1);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    fn waiters_on(&self, _session: i64) -> i64 {
        self.waiting_workers()
    }

    fn kill(&self, _session: i64) {
        panic!("SQLite has no server on which to kill a session; see killed_producer_aborts");
    }
}

/// Counts the workers inside the backend's `dtb_sqlite_wait` span, per database file.
mod waits {
    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::{Mutex, Once};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::Subscriber;
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;

    const SPAN: &str = "dtb_sqlite_wait";

    /// Database file → workers inside the span now.
    static WAITING: Mutex<Option<HashMap<String, i64>>> = Mutex::new(None);

    /// Installs the counting layer (and, with `RUST_LOG`, a log printer) once per process.
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            let log = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("off"));
            tracing_subscriber::registry()
                .with(Counter)
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_test_writer()
                        .with_filter(log),
                )
                .try_init()
                .expect("no other global tracing subscriber");
        });
    }

    /// How many workers wait on `file` now.
    pub fn waiting_on(file: &Path) -> i64 {
        let waiting = WAITING.lock().unwrap();
        waiting
            .iter()
            .flatten()
            .filter(|(f, _)| same_file(Path::new(f), file))
            .map(|(_, n)| *n)
            .sum()
    }

    /// SQLite reports the path it opened, made absolute; compare the last two components (the
    /// test's own directory and the file), which are unique.
    fn same_file(a: &Path, b: &Path) -> bool {
        fn tail(p: &Path) -> Vec<std::path::Component<'_>> {
            let mut c: Vec<_> = p.components().rev().take(2).collect();
            c.reverse();
            c
        }
        tail(a) == tail(b)
    }

    struct Counter;

    /// The database a wait span is about.
    struct WaitsOn(String);

    struct DatabaseField(Option<String>);

    impl Visit for DatabaseField {
        fn record_str(&mut self, field: &Field, value: &str) {
            if field.name() == "database" {
                self.0 = Some(value.to_string());
            }
        }
        fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
    }

    fn note<S: Subscriber + for<'a> LookupSpan<'a>>(
        id: &Id,
        ctx: &Context<'_, S>,
        file: Option<String>,
    ) {
        if let (Some(file), Some(span)) = (file, ctx.span(id)) {
            if span.name() == SPAN {
                span.extensions_mut().replace(WaitsOn(file));
            }
        }
    }

    fn add<S: Subscriber + for<'a> LookupSpan<'a>>(id: &Id, ctx: &Context<'_, S>, n: i64) {
        if let Some(span) = ctx.span(id) {
            if let Some(WaitsOn(file)) = span.extensions().get::<WaitsOn>() {
                let mut waiting = WAITING.lock().unwrap();
                *waiting
                    .get_or_insert_with(HashMap::new)
                    .entry(file.clone())
                    .or_default() += n;
            }
        }
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Counter {
        fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
            let mut field = DatabaseField(None);
            attrs.record(&mut field);
            note(id, &ctx, field.0);
        }

        fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
            let mut field = DatabaseField(None);
            values.record(&mut field);
            note(id, &ctx, field.0);
        }

        fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
            add(id, &ctx, 1);
        }

        fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
            add(id, &ctx, -1);
        }
    }
}

#[test]
fn commit_runs_after_commit() {
    scenarios::commit_runs_after_commit::<Lite>();
}

#[test]
fn error_rolls_back() {
    scenarios::error_rolls_back::<Lite>();
}

#[test]
fn panic_rolls_back() {
    scenarios::panic_rolls_back::<Lite>();
}

#[test]
fn rolled_back_savepoint_never_runs() {
    scenarios::rolled_back_savepoint_never_runs::<Lite>();
}

#[test]
fn released_savepoint_runs() {
    scenarios::released_savepoint_runs::<Lite>();
}

/// The shared scenario with one change: it waits for the handler's transaction to commit before
/// counting the handler's rows. The handler reports on its channel from inside that transaction,
/// so the shared body's immediate `runs_of(..) == 1` races the worker's COMMIT on every backend;
/// SQLite, whose connections open in microseconds, loses the race.
#[test]
fn autocommit_runs_without_barrier() {
    let env = Env::<Lite>::new();
    let (tx, rx) = unbounded();
    let id = next_id();
    let mut conn = env.db.connect();
    insert_order::<Lite>(&mut conn, id, "paid");
    conn.enqueue_with_barrier(&env.producer, env.job(PAID, id))
        .unwrap();
    assert_eq!(env.db.barrier_rows(), 0, "autocommit writes no barrier row");
    let _worker = env.start_worker(handlers::<Lite>(&tx), 1);
    let ran = expect_run(&rx);
    assert_eq!(ran.order_id, id);
    assert_eq!(ran.seen_status.as_deref(), Some("paid"));
    wait_until("the handler's transaction to commit", EVENTUALLY, || {
        runs_of(&env.db, id) >= 1
    });
    expect_no_run(&rx, "the job runs once");
    assert_eq!(runs_of(&env.db, id), 1);
}

#[test]
fn barrier_required_and_opt_out() {
    scenarios::barrier_required_and_opt_out::<Lite>();
}

#[test]
fn inline_runs_at_once() {
    scenarios::inline_runs_at_once::<Lite>();
}

#[test]
fn fetched_after_commit_runs_at_once() {
    scenarios::fetched_after_commit_runs_at_once::<Lite>();
}

#[test]
fn duplicate_delivery_runs_once() {
    scenarios::duplicate_delivery_runs_once::<Lite>();
}

#[test]
fn faktory_unreachable_rolls_back() {
    scenarios::faktory_unreachable_rolls_back::<Lite>();
}

#[test]
fn missing_migrations_are_reported() {
    scenarios::missing_migrations_are_reported::<Lite>();
}

// ---- 4. The producer dies mid-transaction ----
//
// The shared scenario kills the producer's *session* from another connection and expects its
// commit to fail. SQLite has no sessions to kill: nothing can end another connection's
// transaction. The SQLite equivalent of a killed producer is a producer process that dies in
// the middle of its transaction, so the producer here is a child process: this test binary run
// again with only `producer_child`, told what to do through environment variables. It enqueues
// inside a transaction, prints the job id and waits; once the worker is seen waiting on its
// transaction, the child is killed (SIGKILL) or told to exit (`std::process::exit`, which runs
// no destructors). Either way its connection never sends COMMIT or ROLLBACK.

/// Set in the child's environment; holds the database path.
const CHILD_DB: &str = "DTB_SQLITE_CHILD_DB";
const CHILD_FAKTORY: &str = "DTB_SQLITE_CHILD_FAKTORY";
const CHILD_QUEUE: &str = "DTB_SQLITE_CHILD_QUEUE";
const CHILD_ORDER: &str = "DTB_SQLITE_CHILD_ORDER";
/// The child's stdout line that carries the job id.
const JID_LINE: &str = "dtb-child-jid: ";
/// The exit code of a child told to exit.
const EXIT_CODE: i32 = 3;

#[derive(Debug, Clone, Copy)]
enum Death {
    /// The parent kills the child with SIGKILL.
    Killed,
    /// The child calls `std::process::exit` itself.
    Exits,
}

#[test]
fn killed_producer_aborts() {
    producer_dies_mid_transaction(Death::Killed);
}

#[test]
fn exiting_producer_aborts() {
    producer_dies_mid_transaction(Death::Exits);
}

/// The producer process of `killed_producer_aborts`; does nothing unless started by it.
#[test]
#[ignore = "the child process of killed_producer_aborts and exiting_producer_aborts"]
fn producer_child() {
    let Ok(db) = std::env::var(CHILD_DB) else {
        return;
    };
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let id: i64 = var(CHILD_ORDER).parse().unwrap();
    let producer = Producer::connect(&var(CHILD_FAKTORY)).expect("producer");
    let mut conn = SqliteConnection::establish(&db).expect("connect");
    conn.batch_execute("PRAGMA busy_timeout = 10000").unwrap();
    let _ = conn.transaction::<(), Error, _>(|c| {
        insert_order::<Lite>(c, id, "paid");
        let job = Job::new(PAID, vec![id]).on_queue(var(CHILD_QUEUE));
        let jid = c.enqueue_with_barrier(&producer, job)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{JID_LINE}{}", jid.as_str()).unwrap();
        out.flush().unwrap();
        drop(out);
        // In the middle of the transaction: wait for the word, or for SIGKILL.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        std::process::exit(EXIT_CODE)
    });
}

fn producer_dies_mid_transaction(death: Death) {
    let env = Env::<Lite>::new();
    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<Lite>(&tx), 1);
    let id = next_id();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "producer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB, env.db.url())
        .env(CHILD_FAKTORY, env.faktory.url())
        .env(CHILD_QUEUE, &env.queue)
        .env(CHILD_ORDER, id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the producer process");
    let mut stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut child = KillOnDrop(child);
    let (jid_tx, jid_rx) = unbounded();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            // The harness may have begun the line ("test producer_child ... ").
            if let Some((_, jid)) = line.unwrap_or_default().split_once(JID_LINE) {
                let _ = jid_tx.send(jid.trim().to_string());
            }
        }
    });
    let jid = jid_rx
        .recv_timeout(EVENTUALLY)
        .expect("the producer process enqueued a job");
    wait_until(
        "the worker to wait on the producer process's transaction",
        EVENTUALLY,
        || env.db.waiting_workers() > 0,
    );
    expect_no_run(&rx, "the producer's transaction is still open");

    match death {
        Death::Killed => child.0.kill().unwrap(),
        Death::Exits => writeln!(stdin, "exit").unwrap(),
    }
    let status = child.0.wait().unwrap();
    match death {
        Death::Killed => assert_eq!(status.code(), None, "killed by a signal: {status}"),
        Death::Exits => assert_eq!(status.code(), Some(EXIT_CODE), "{status}"),
    }

    assert_aborted(&env, &rx, id, &jid);
    let mut conn = env.db.connect();
    assert_eq!(
        Lite::query_i64(
            &mut conn,
            &format!("SELECT COUNT(*) FROM orders WHERE id = {id}")
        ),
        Some(0),
        "the dead producer's other writes are gone too"
    );
}

/// Kills the producer process if the test fails before it does.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The checks of the shared scenarios' `assert_aborted`.
fn assert_aborted(env: &Env<Lite>, rx: &Receiver<Ran>, id: i64, jid: &str) {
    let others = drain_with_sentinel(env, rx);
    assert!(others.is_empty(), "an aborted job ran: {others:?}");
    assert_eq!(runs_of(&env.db, id), 0);
    assert_eq!(env.db.barrier_rows(), 0, "no barrier row is left");
    match env.faktory.server() {
        Some(server) => {
            let events = server.history(jid);
            assert!(
                events.iter().any(|e| e.kind() == JobEventKind::Acked),
                "job {jid} should have been acknowledged: {events:?}"
            );
            assert!(
                !events.iter().any(|e| e.kind() == JobEventKind::Failed),
                "job {jid} should not have failed: {events:?}"
            );
        }
        None => eprintln!("real Faktory: skipping the job-history inspection of {jid}"),
    }
}
