//! The MySQL / MariaDB `TestDb`: a database of its own per test (`MYSQL_DATABASE_URL`, default
//! `mysql://root@127.0.0.1:3306/test`, an account that may create databases and users), and,
//! for [`NoProcess`], an account of its own without the PROCESS privilege. Also a recorder of
//! the warnings the crate logs.
#![cfg(feature = "mysql")]

use super::{create_app_tables, TestDb};
use diesel::connection::SimpleConnection;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

pub fn admin_url() -> String {
    std::env::var("MYSQL_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string())
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
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
pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
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

pub fn admin() -> MysqlConnection {
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

#[derive(QueryableByName)]
pub struct I64Row {
    #[diesel(sql_type = Nullable<BigInt>)]
    pub v: Option<i64>,
}

#[derive(QueryableByName)]
struct TextRow {
    #[diesel(sql_type = Nullable<Text>)]
    v: Option<String>,
}

/// A database of its own. With `RESTRICTED`, producers and workers connect as an account of
/// its own that has every privilege on that database and none beyond (so no PROCESS).
pub struct Maria<const RESTRICTED: bool> {
    admin: String,
    name: String,
    url: String,
    user: Option<String>,
    _ticket: Option<SharedTicket>,
}

/// Connects as the administrative account (root: PROCESS included).
pub type Root = Maria<false>;
/// Connects as an account without the PROCESS privilege.
pub type NoProcess = Maria<true>;

impl<const RESTRICTED: bool> Maria<RESTRICTED> {
    pub fn new(migrate: bool, ticket: Option<SharedTicket>) -> Self {
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
    pub fn account(&self) -> Option<String> {
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

    fn try_exec(conn: &mut MysqlConnection, sql: &str) -> Result<(), diesel::result::Error> {
        conn.batch_execute(sql)
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
