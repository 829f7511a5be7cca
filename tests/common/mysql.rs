//! The MySQL / MariaDB `TestDb`: the crate's `MysqlTestDatabase` (`MYSQL_DATABASE_URL`, default
//! `mysql://root@127.0.0.1:3306/test`, an account that may create databases and users), a
//! database of its own per test, reached as that account ([`Root`]) or as an account of its
//! own without the PROCESS privilege ([`NoProcess`]). Also a recorder of the warnings the
//! crate logs.
#![cfg(feature = "mysql")]

use super::{I64Row, TestDb};
use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel_transaction_barrier::testing::{
    MysqlRestrictedTestDatabase, MysqlTestDatabase, TestDatabase,
};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

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

pub struct SharedTicket;

impl SharedTicket {
    pub fn acquire() -> SharedTicket {
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

pub struct ExclusiveTicket;

impl ExclusiveTicket {
    pub fn acquire() -> ExclusiveTicket {
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

/// The crate's MySQL test databases: one reached as the administrative account, one as an
/// account of its own.
pub trait MysqlDatabase: TestDatabase<Conn = MysqlConnection> {
    /// The database itself.
    fn mysql(&self) -> &MysqlTestDatabase;
}

impl MysqlDatabase for MysqlTestDatabase {
    fn mysql(&self) -> &MysqlTestDatabase {
        self
    }
}

impl MysqlDatabase for MysqlRestrictedTestDatabase {
    fn mysql(&self) -> &MysqlTestDatabase {
        self.database()
    }
}

/// A database of its own, and, unless the test runs alone, a shared ticket for as long as it
/// lives.
pub struct Maria<T> {
    database: T,
    _ticket: Option<SharedTicket>,
}

/// Connects as the administrative account (root: PROCESS included).
pub type Root = Maria<MysqlTestDatabase>;
/// Connects as an account of its own with every privilege on the database and none beyond
/// (so no PROCESS).
pub type NoProcess = Maria<MysqlRestrictedTestDatabase>;

impl<T> Maria<T> {
    /// For a test that holds an [`ExclusiveTicket`]: no shared ticket.
    pub fn alone(database: T) -> Self {
        record_warnings();
        Maria {
            database,
            _ticket: None,
        }
    }
}

impl NoProcess {
    /// The restricted account as `GRANT` spells it.
    pub fn account(&self) -> String {
        self.database.account()
    }
}

impl<T: MysqlDatabase> TestDb for Maria<T> {
    type Conn = MysqlConnection;
    type Database = T;

    const INTEGER: &'static str = "SIGNED";
    const TEXT: &'static str = "CHAR";
    const TIMEOUT_DEBUG_INFO: &'static [&'static str] = &["txid", "transaction:"];
    const WAITER_CONNECTIONS: u32 = 5;

    fn wrap(database: T) -> Self {
        // Before the scenario's environment would install a subscriber of its own.
        record_warnings();
        Maria {
            database,
            _ticket: Some(SharedTicket::acquire()),
        }
    }

    fn database(&self) -> &T {
        &self.database
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
        let mut admin = self.database.mysql().admin();
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

    fn kill_sessions_waiting_on(&self, session: i64) -> Option<usize> {
        let _serial = INNODB_TRX_READ
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::thread::sleep(Duration::from_millis(150));
        let mut admin = self.database.mysql().admin();
        let waiting: Vec<i64> = (0..)
            .map_while(|n| {
                Self::query_i64(
                    &mut admin,
                    &format!(
                        "SELECT r.trx_mysql_thread_id FROM information_schema.INNODB_LOCK_WAITS w \
                         JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id \
                         JOIN information_schema.INNODB_TRX r ON r.trx_id = w.requesting_trx_id \
                         WHERE b.trx_mysql_thread_id = {session} \
                         ORDER BY r.trx_mysql_thread_id LIMIT 1 OFFSET {n}"
                    ),
                )
            })
            .collect();
        for thread in &waiting {
            let _ = admin.batch_execute(&format!("KILL {thread}"));
        }
        Some(waiting.len())
    }

    fn kill(&self, session: i64) {
        self.database
            .mysql()
            .admin()
            .batch_execute(&format!("KILL {session}"))
            .expect("kill");
    }

    fn kill_waiter_sessions(&self) -> Option<usize> {
        // The waiter's watchers wait on the producers' rows (their lock-wait statements stay in
        // the process list while they wait); its checking connection is idle between checks,
        // and the process list shows a statement only while it runs: watch for both for a
        // while and kill every connection caught running one.
        let mut admin = self.database.mysql().admin();
        let mut killed = std::collections::HashSet::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(2) {
            let ids: Vec<I64Row> = diesel::sql_query(
                "SELECT CAST(ID AS SIGNED) AS v FROM information_schema.PROCESSLIST \
                 WHERE DB = ? AND ID <> CONNECTION_ID() \
                   AND (INFO LIKE 'SELECT id FROM dtb_barriers WHERE id = % LOCK IN SHARE MODE%' \
                        OR INFO LIKE '%JSON_TABLE%dtb_barriers%')",
            )
            .bind::<Text, _>(self.database.mysql().name())
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
pub fn record_warnings() {
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
pub fn recorded(needle: &str) -> Vec<String> {
    EVENTS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter(|e| e.contains(needle))
        .cloned()
        .collect()
}
