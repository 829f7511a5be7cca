//! The barrier contract on real MariaDB / MySQL (`MYSQL_DATABASE_URL`, default
//! `mysql://root@127.0.0.1:3306/test`, an account that may create databases and users). Each
//! test gets a database of its own; the `no_process_*` tests also get an account of their own
//! that lacks the PROCESS privilege.
#![cfg(feature = "mysql")]

mod common;

use common::scenarios;
use common::*;
use crossbeam_channel::unbounded;
use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel_transaction_barrier::testing::JobEventKind;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error, Handlers, Job, CUSTOM_KEY};
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

fn admin_url() -> String {
    std::env::var("MYSQL_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string())
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let base = match base[authority..].find('/') {
        Some(slash) => &base[..authority + slash],
        None => base,
    };
    format!("{base}/{name}{query}")
}

/// `url` with its user and password replaced.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let end = url[authority..]
        .find('/')
        .map_or(url.len(), |i| authority + i);
    let host = match url[authority..end].rfind('@') {
        Some(at) => &url[authority + at + 1..],
        None => &url[authority..],
    };
    format!("{}{user}:{password}@{host}", &url[..authority])
}

fn admin() -> MysqlConnection {
    MysqlConnection::establish(&admin_url()).expect("MariaDB is reachable")
}

// ---------------------------------------------------------------------------------------------
// Tests that read information_schema.innodb_trx.
//
// innodb_trx and innodb_lock_waits are a shared cache that is refreshed only when nobody has
// read it for 100 ms. `waiters_on` therefore spaces its reads by 150 ms across this whole test
// binary, and the stale-cache test, which polls the cache on purpose (and so would freeze what
// `waiters_on` and the worker's timeout reports see), runs alone: every other test holds a
// shared ticket for as long as its database lives.

struct GateState {
    shared: usize,
    exclusive: bool,
    exclusive_waiting: usize,
}

static GATE: Mutex<GateState> = Mutex::new(GateState {
    shared: 0,
    exclusive: false,
    exclusive_waiting: 0,
});
static GATE_CHANGED: Condvar = Condvar::new();

struct SharedTicket;

impl SharedTicket {
    fn acquire() -> SharedTicket {
        let mut g = GATE.lock().unwrap_or_else(PoisonError::into_inner);
        while g.exclusive || g.exclusive_waiting > 0 {
            g = GATE_CHANGED.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        g.shared += 1;
        SharedTicket
    }
}

impl Drop for SharedTicket {
    fn drop(&mut self) {
        GATE.lock().unwrap_or_else(PoisonError::into_inner).shared -= 1;
        GATE_CHANGED.notify_all();
    }
}

struct ExclusiveTicket;

impl ExclusiveTicket {
    fn acquire() -> ExclusiveTicket {
        let mut g = GATE.lock().unwrap_or_else(PoisonError::into_inner);
        g.exclusive_waiting += 1;
        while g.exclusive || g.shared > 0 {
            g = GATE_CHANGED.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        g.exclusive_waiting -= 1;
        g.exclusive = true;
        ExclusiveTicket
    }
}

impl Drop for ExclusiveTicket {
    fn drop(&mut self) {
        GATE.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .exclusive = false;
        GATE_CHANGED.notify_all();
    }
}

/// Serialises this binary's reads of the innodb_trx cache.
static INNODB_TRX_READ: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// The test databases.

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

/// A database of its own. With `RESTRICTED`, producers and workers connect as an account of
/// its own that has every privilege on that database and none beyond (so no PROCESS).
struct Maria<const RESTRICTED: bool> {
    admin: String,
    name: String,
    url: String,
    user: Option<String>,
    _ticket: Option<SharedTicket>,
}

/// Connects as the administrative account (root: PROCESS included).
type Root = Maria<false>;
/// Connects as an account without the PROCESS privilege.
type NoProcess = Maria<true>;

impl<const RESTRICTED: bool> Maria<RESTRICTED> {
    fn new(migrate: bool, ticket: Option<SharedTicket>) -> Self {
        // Before the scenario's environment would install a subscriber of its own.
        record_warnings();
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("dtb_test_{suffix}");
        let admin_url = admin_url();
        let mut admin = admin();
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        let mut url = with_database(&admin_url, &name);
        let mut user = None;
        if RESTRICTED {
            let account = format!("dtb_np_{}", &suffix[..12]);
            let password = uuid::Uuid::new_v4().simple().to_string();
            admin
                .batch_execute(&format!(
                    "CREATE USER '{account}'@'%' IDENTIFIED BY '{password}'; \
                     GRANT ALL PRIVILEGES ON {name}.* TO '{account}'@'%'"
                ))
                .expect("create user");
            url = with_credentials(&url, &account, &password);
            user = Some(account);
        }
        let db = Maria {
            admin: admin_url,
            name,
            url,
            user,
            _ticket: ticket,
        };
        let mut conn = db.connect();
        if migrate {
            diesel_transaction_barrier::run_migrations(&mut conn).expect("migrations");
        }
        create_app_tables::<Self>(&mut conn);
        db
    }

    /// The restricted account as `GRANT` spells it.
    fn account(&self) -> Option<String> {
        self.user.as_ref().map(|u| format!("'{u}'@'%'"))
    }
}

impl<const RESTRICTED: bool> Drop for Maria<RESTRICTED> {
    fn drop(&mut self) {
        if let Ok(mut admin) = MysqlConnection::establish(&self.admin) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {}", self.name));
            if let Some(user) = &self.user {
                let _ = admin.batch_execute(&format!("DROP USER IF EXISTS '{user}'@'%'"));
            }
        }
    }
}

impl<const RESTRICTED: bool> TestDb for Maria<RESTRICTED> {
    type Conn = MysqlConnection;

    fn create() -> Self {
        Self::new(true, Some(SharedTicket::acquire()))
    }

    fn create_unmigrated() -> Self {
        Self::new(false, Some(SharedTicket::acquire()))
    }

    fn connect(&self) -> MysqlConnection {
        MysqlConnection::establish(&self.url).expect("connect")
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn exec(conn: &mut MysqlConnection, sql: &str) {
        conn.batch_execute(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn query_i64(conn: &mut MysqlConnection, sql: &str) -> Option<i64> {
        diesel::sql_query(format!("SELECT CAST(({sql}) AS SIGNED) AS v"))
            .get_result::<I64Row>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
    }

    fn query_string(conn: &mut MysqlConnection, sql: &str) -> Option<String> {
        diesel::sql_query(format!("SELECT CAST(({sql}) AS CHAR) AS v"))
            .get_result::<TextRow>(conn)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .v
    }

    fn session_id(conn: &mut MysqlConnection) -> i64 {
        Self::query_i64(conn, "SELECT CONNECTION_ID()").unwrap()
    }

    fn waiters_on(&self, session: i64) -> i64 {
        let _serial = INNODB_TRX_READ
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Let the cache go unread for more than 100 ms, so that this read refreshes it.
        std::thread::sleep(Duration::from_millis(150));
        let mut admin = admin();
        Self::query_i64(
            &mut admin,
            &format!(
                "SELECT COUNT(*) FROM information_schema.INNODB_LOCK_WAITS w \
                 JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id \
                 WHERE b.trx_mysql_thread_id = {session}"
            ),
        )
        .unwrap()
    }

    fn kill(&self, session: i64) {
        admin()
            .batch_execute(&format!("KILL {session}"))
            .expect("kill");
    }

    fn kill_waiter_sessions(&self) -> Option<usize> {
        // A waiter's connection is idle between checks, and the process list shows a
        // connection's statement only while it runs: watch for the check's count query (which
        // nothing else runs) for a while and kill every connection caught running it.
        let mut admin = admin();
        let mut killed = std::collections::HashSet::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            let ids: Vec<I64Row> = diesel::sql_query(
                "SELECT CAST(ID AS SIGNED) AS v FROM information_schema.PROCESSLIST \
                 WHERE DB = ? AND ID <> CONNECTION_ID() \
                   AND INFO LIKE 'SELECT COUNT(*) FROM `dtb_barriers` WHERE%IN (%'",
            )
            .bind::<Text, _>(&self.name)
            .load(&mut admin)
            .expect("process list");
            for id in ids.into_iter().filter_map(|r| r.v) {
                // It may have gone already; only a kill that worked counts.
                if admin.batch_execute(&format!("KILL {id}")).is_ok() {
                    killed.insert(id);
                }
            }
            if !killed.is_empty() && started.elapsed() > Duration::from_millis(200) {
                break;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Some(killed.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Recording tracing events, to check what the worker warns about.

static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Recorder;

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Recorder {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut fields = Fields(String::new());
            event.record(&mut fields);
            EVENTS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(fields.0);
        }
    }
}

/// Installs the recorder (once per test binary, before any database is created).
fn record_warnings() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // `DTB_TEST_LOG` (as in `common::init_tracing`) also prints the logs.
        let filter = std::env::var("DTB_TEST_LOG").unwrap_or_else(|_| "off".into());
        let log = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(tracing_subscriber::EnvFilter::new(filter));
        let subscriber = tracing_subscriber::registry().with(Recorder).with(log);
        tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    });
}

/// The warnings and errors recorded so far that contain `needle`.
fn recorded(needle: &str) -> Vec<String> {
    EVENTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|e| e.contains(needle))
        .cloned()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The shared scenarios, as the administrative account.

#[test]
fn commit_runs_after_commit() {
    scenarios::commit_runs_after_commit::<Root>();
}

#[test]
fn error_rolls_back() {
    scenarios::error_rolls_back::<Root>();
}

#[test]
fn panic_rolls_back() {
    scenarios::panic_rolls_back::<Root>();
}

#[test]
fn killed_producer_aborts() {
    scenarios::killed_producer_aborts::<Root>();
}

#[test]
fn rolled_back_savepoint_never_runs() {
    scenarios::rolled_back_savepoint_never_runs::<Root>();
}

#[test]
fn released_savepoint_runs() {
    scenarios::released_savepoint_runs::<Root>();
}

#[test]
fn autocommit_runs_without_barrier() {
    scenarios::autocommit_runs_without_barrier::<Root>();
}

#[test]
fn barrier_required_and_opt_out() {
    scenarios::barrier_required_and_opt_out::<Root>();
}

#[test]
fn inline_runs_at_once() {
    scenarios::inline_runs_at_once::<Root>();
}

#[test]
fn fetched_after_commit_runs_at_once() {
    scenarios::fetched_after_commit_runs_at_once::<Root>();
}

#[test]
fn duplicate_delivery_runs_once() {
    scenarios::duplicate_delivery_runs_once::<Root>();
}

#[test]
fn faktory_unreachable_rolls_back() {
    scenarios::faktory_unreachable_rolls_back::<Root>();
}

#[test]
fn missing_migrations_are_reported() {
    scenarios::missing_migrations_are_reported::<Root>();
}

#[test]
fn many_waiting_jobs_hold_few_connections() {
    scenarios::many_waiting_jobs_hold_few_connections::<Root>();
}

#[test]
fn snoozed_after_block_limit() {
    scenarios::snoozed_after_block_limit::<Root>();
}

#[test]
fn barrier_timeout_after_deadline() {
    scenarios::barrier_timeout_after_deadline::<Root>();
}

#[test]
fn reaper_deletes_old_barriers() {
    scenarios::reaper_deletes_old_barriers::<Root>();
}

#[test]
fn graceful_shutdown_loses_nothing() {
    scenarios::graceful_shutdown_loses_nothing::<Root>();
}

#[test]
fn bad_input_fails_cleanly() {
    scenarios::bad_input_fails_cleanly::<Root>();
}

#[test]
fn soak_with_oracle() {
    common::soak::soak::<Root>();
}

#[test]
fn broker_loss_is_reconciled() {
    scenarios::broker_loss_is_reconciled::<Root>();
}

#[test]
fn backlog_is_repushed_at_most_once_per_grace() {
    scenarios::backlog_is_repushed_at_most_once_per_grace::<Root>();
}

#[test]
fn waiter_connections_killed_mid_wait() {
    scenarios::waiter_connections_killed_mid_wait::<Root>();
}

#[test]
fn faktory_restart_while_worker_runs() {
    scenarios::faktory_restart_while_worker_runs::<Root>();
}

#[test]
fn worker_killed_mid_wait_and_mid_handler() {
    common::faults::worker_killed_mid_wait_and_mid_handler::<Root>("worker_child");
}

/// The worker process of `worker_killed_mid_wait_and_mid_handler`; does nothing unless
/// started by it.
#[test]
#[ignore = "the child process of worker_killed_mid_wait_and_mid_handler"]
fn worker_child() {
    common::faults::worker_child_main::<Root>();
}

// ---------------------------------------------------------------------------------------------
// Without the PROCESS privilege: the producer and the worker run as an account that cannot
// read innodb_trx, and everything still holds.

#[test]
fn no_process_commit_runs_after_commit() {
    scenarios::commit_runs_after_commit::<NoProcess>();
}

#[test]
fn no_process_error_rolls_back() {
    scenarios::error_rolls_back::<NoProcess>();
}

#[test]
fn no_process_killed_producer_aborts() {
    scenarios::killed_producer_aborts::<NoProcess>();
}

#[test]
fn no_process_rolled_back_savepoint_never_runs() {
    scenarios::rolled_back_savepoint_never_runs::<NoProcess>();
}

#[test]
fn no_process_worker_warns_once() {
    record_warnings();
    let env = Env::<NoProcess>::new();
    let account = env.db.account().unwrap();
    let mut conn = env.db.connect();
    let denied = diesel::sql_query("SELECT COUNT(*) AS v FROM information_schema.INNODB_TRX")
        .get_result::<I64Row>(&mut conn);
    assert!(denied.is_err(), "{account} must not have PROCESS");

    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<NoProcess>(&tx), 2);
    let id = next_id();
    commit_order(&env, id, env.job(PAID, id));
    assert_eq!(expect_run(&rx).order_id, id);
    assert_eq!(env.db.barrier_rows(), 0);

    let warnings = recorded(&account);
    assert_eq!(warnings.len(), 1, "exactly one warning: {warnings:?}");
    assert!(
        warnings[0].contains("lacks the PROCESS privilege"),
        "{warnings:?}"
    );
    assert!(
        warnings[0].contains(&format!("GRANT PROCESS ON *.* TO {account}")),
        "{warnings:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Timeouts are described from innodb_trx when the worker may read it, and still described
// (less) when it may not.

fn timeout_report<D: TestDb<Conn = MysqlConnection>>() -> (String, i64) {
    record_warnings();
    let env = Env::<D>::new();
    let (tx, _rx) = unbounded();
    let _worker = env.start_worker_with(handlers::<D>(&tx), |b| {
        b.workers(1)
            .deadline(Duration::from_secs(1))
            .block_limit(Duration::from_secs(1))
    });
    let id = next_id();
    let mut conn = env.db.connect();
    let session = D::session_id(&mut conn);
    let result = conn.transaction(|c| {
        insert_order::<D>(c, id, "paid");
        let jid = c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        let server = env.faktory.server().expect("the test server");
        assert!(
            server.wait_until_history(jid.as_str(), JobEventKind::Failed, EVENTUALLY),
            "the job fails with a barrier timeout"
        );
        Err::<(), _>(Error::Config("roll back".into()))
    });
    assert!(result.is_err());
    let reports: Vec<String> = recorded(&format!("MySQL thread {session}"))
        .into_iter()
        .filter(|r| r.contains("barrier timed out"))
        .collect();
    assert!(!reports.is_empty(), "the timeout was reported");
    eprintln!("timeout report: {}", reports[0]);
    (reports[0].clone(), session)
}

#[test]
fn timeout_report_reads_innodb_trx() {
    let (report, _) = timeout_report::<Root>();
    assert!(report.contains("RUNNING"), "{report}");
    assert!(report.contains("rows modified"), "{report}");
}

#[test]
fn no_process_timeout_report_says_what_is_missing() {
    let (report, _) = timeout_report::<NoProcess>();
    assert!(report.contains("needs the PROCESS privilege"), "{report}");
    // The producer runs as the same account, so the process list still shows it.
    assert!(report.contains("connection of dtb_np_"), "{report}");
}

// ---------------------------------------------------------------------------------------------
// The worker never queues behind a producer's row lock: its checks skip locked rows.

#[test]
fn waiting_jobs_take_no_row_lock_waits() {
    let env = Env::<Root>::new();
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<Root>(&tx), 2);
    let mut conn = env.db.connect();
    let session = Root::session_id(&mut conn);
    let ids: Vec<i64> = (0..3).map(|_| next_id()).collect();
    conn.transaction(|c| {
        for &id in &ids {
            insert_order::<Root>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        }
        worker.wait_for_waiting(ids.len());
        for _ in 0..3 {
            assert_eq!(
                env.db.waiters_on(session),
                0,
                "nobody waits on the producer's locks"
            );
        }
        expect_no_run(&rx, "the transaction is still open");
        Ok::<_, Error>(())
    })
    .unwrap();
    for _ in &ids {
        expect_run(&rx);
    }
    wait_until("the barrier rows to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

#[test]
fn waiters_on_sees_a_lock_wait() {
    // The helper itself: a session blocked on the producer's row is counted.
    let db = Root::create();
    let id = next_id();
    let mut producer = db.connect();
    let session = Root::session_id(&mut producer);
    std::thread::scope(|s| {
        let (locked_tx, locked_rx) = unbounded::<()>();
        let (end_tx, end_rx) = unbounded::<()>();
        s.spawn(move || {
            producer
                .transaction(|c| {
                    insert_order::<Root>(c, id, "new");
                    locked_tx.send(()).unwrap();
                    end_rx.recv().unwrap();
                    Ok::<_, diesel::result::Error>(())
                })
                .unwrap();
        });
        locked_rx.recv().unwrap();
        assert_eq!(db.waiters_on(session), 0);
        let db = &db;
        s.spawn(move || {
            let mut other = db.connect();
            Root::exec(
                &mut other,
                &format!("UPDATE orders SET status = 'seen' WHERE id = {id}"),
            );
        });
        wait_until("a lock wait", EVENTUALLY, || db.waiters_on(session) == 1);
        end_tx.send(()).unwrap();
    });
    let mut c = db.connect();
    assert_eq!(
        Root::query_string(
            &mut c,
            &format!("SELECT status FROM orders WHERE id = {id}")
        )
        .as_deref(),
        Some("seen")
    );
}

// ---------------------------------------------------------------------------------------------
// Durability: the handler starts only once the worker's own fence write is committed.

#[test]
fn handler_starts_after_the_fence_commits() {
    let env = Env::<Root>::new();
    let url = env.db.url();
    let (tx, rx) = unbounded::<(i64, Option<i64>)>();
    let handlers = Handlers::new().register(PAID, move |job: &Job, _conn: &mut MysqlConnection| {
        let barrier = job.custom[CUSTOM_KEY]["id"]
            .as_str()
            .expect("barrier id")
            .to_string();
        let order_id = job.args()[0].as_i64().expect("order id");
        // A separate autocommit connection sees only committed data.
        let mut side = MysqlConnection::establish(&url)?;
        let attempts = diesel::sql_query(
            "SELECT CAST(attempts AS SIGNED) AS v FROM dtb_barriers WHERE id = ?",
        )
        .bind::<Text, _>(&barrier)
        .get_result::<I64Row>(&mut side)
        .optional()?
        .and_then(|r| r.v);
        let _ = tx.send((order_id, attempts));
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    });
    let worker = env.start_worker(handlers, 2);
    for round in 0..10 {
        let id = next_id();
        let mut conn = env.db.connect();
        conn.transaction(|c| {
            insert_order::<Root>(c, id, "paid");
            c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
            if round % 2 == 0 {
                // Half of them with the worker already waiting for the barrier.
                worker.wait_for_waiting(1);
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        let (ran, attempts) = rx.recv_timeout(EVENTUALLY).expect("the handler ran");
        assert_eq!(ran, id);
        assert_eq!(
            attempts,
            Some(1),
            "the fence write (attempts = 1) is committed before the handler starts"
        );
    }
    wait_until("the barrier rows to be consumed", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
}

// ---------------------------------------------------------------------------------------------
// A stale innodb_trx cache changes nothing: the verdict never reads it.

#[test]
fn stale_innodb_trx_cache_changes_nothing() {
    const PER_OUTCOME: usize = 200;
    const PRODUCERS: usize = 8;
    let _alone = ExclusiveTicket::acquire();
    let env = Env::with_db(Root::new(true, None));
    let (tx, rx) = unbounded();
    let _worker = env.start_worker(handlers::<Root>(&tx), 12);

    // Two connections read innodb_trx every 10 ms, so that its cache never refreshes.
    let stop = Arc::new(AtomicBool::new(false));
    let polls = Arc::new(AtomicU64::new(0));
    let pollers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, polls) = (Arc::clone(&stop), Arc::clone(&polls));
            std::thread::spawn(move || {
                let mut c = admin();
                while !stop.load(Ordering::Relaxed) {
                    Root::query_i64(&mut c, "SELECT COUNT(*) FROM information_schema.INNODB_TRX");
                    polls.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();

    let started = Instant::now();
    let per_thread = 2 * PER_OUTCOME / PRODUCERS;
    // Per producer thread: (order id, jid) of the committed and of the rolled-back jobs.
    type Enqueued = Vec<(i64, String)>;
    let results: Vec<(Enqueued, Enqueued)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..PRODUCERS)
            .map(|_| {
                let env = &env;
                s.spawn(move || {
                    let mut rng = rand::thread_rng();
                    let mut conn = env.db.connect();
                    let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
                    for i in 0..per_thread {
                        let id = next_id();
                        let commit = i % 2 == 0;
                        let delay = Duration::from_millis(rng.gen_range(0..=300));
                        let mut jid = None;
                        let result = conn.transaction(|c| {
                            insert_order::<Root>(c, id, "paid");
                            jid = Some(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
                            std::thread::sleep(delay);
                            if commit {
                                Ok(())
                            } else {
                                Err(Error::Config("roll back".into()))
                            }
                        });
                        let jid = jid.expect("enqueued").as_str().to_string();
                        if commit {
                            result.expect("commit");
                            committed.push((id, jid));
                        } else {
                            assert!(result.is_err());
                            rolled_back.push((id, jid));
                        }
                    }
                    (committed, rolled_back)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let committed: Vec<(i64, String)> = results.iter().flat_map(|r| r.0.clone()).collect();
    let rolled_back: Vec<(i64, String)> = results.iter().flat_map(|r| r.1.clone()).collect();
    assert_eq!(committed.len(), PER_OUTCOME);
    assert_eq!(rolled_back.len(), PER_OUTCOME);

    let server = env.faktory.server().expect("the test server");
    let all_jids: Vec<&str> = committed
        .iter()
        .chain(&rolled_back)
        .map(|(_, jid)| jid.as_str())
        .collect();
    let done = server.wait_for(
        |s| {
            all_jids.iter().all(|jid| {
                s.history(jid)
                    .iter()
                    .any(|e| e.kind() == JobEventKind::Acked)
            })
        },
        Duration::from_secs(60),
    );
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for p in pollers {
        p.join().unwrap();
    }
    assert!(done, "every job was acknowledged");
    for jid in &all_jids {
        assert!(
            !server
                .history(jid)
                .iter()
                .any(|e| e.kind() == JobEventKind::Failed),
            "job {jid} failed"
        );
    }

    let runs: Vec<Ran> = rx.try_iter().collect();
    assert_eq!(runs.len(), PER_OUTCOME, "one run per committed transaction");
    let mut ran_ids: Vec<i64> = runs.iter().map(|r| r.order_id).collect();
    ran_ids.sort_unstable();
    let mut committed_ids: Vec<i64> = committed.iter().map(|(id, _)| *id).collect();
    committed_ids.sort_unstable();
    assert_eq!(
        ran_ids, committed_ids,
        "each committed job ran exactly once"
    );
    assert!(runs
        .iter()
        .all(|r| r.seen_status.as_deref() == Some("paid")));
    let rolled_back_ids: Vec<String> = rolled_back.iter().map(|(id, _)| id.to_string()).collect();
    let mut conn = env.db.connect();
    assert_eq!(
        Root::query_i64(
            &mut conn,
            &format!(
                "SELECT COUNT(*) FROM handler_runs WHERE order_id IN ({})",
                rolled_back_ids.join(",")
            )
        ),
        Some(0),
        "no rolled-back job ran"
    );
    assert_eq!(env.db.barrier_rows(), 0, "no barrier row is left");
    let polls = polls.load(Ordering::Relaxed);
    assert!(polls > 200, "innodb_trx was polled ({polls} reads)");
    eprintln!(
        "{} jobs in {elapsed:?}, innodb_trx read {polls} times meanwhile",
        2 * PER_OUTCOME
    );
}
