//! The PgBouncer `TestDb`s: PostgreSQL reached through PgBouncer in transaction pooling mode
//! (`DTB_PGBOUNCER_URL`, e.g. `postgres://postgres@127.0.0.1:6432/test`), a schema of its own
//! per test.
//!
//! PgBouncer refuses the `options` startup parameter that gives `PgTestSchema`'s connections
//! their `search_path`, so each test gets a role of its own instead, whose `search_path` is its
//! schema (`ALTER ROLE ... SET search_path`): PgBouncer keeps a pool per database and user, so
//! parallel tests never share a server connection. The schema and the role are made and dropped
//! through a direct connection (`PG_DATABASE_URL`); everything else — the migrations, the
//! producers' connections, the worker's pool — goes through PgBouncer, with Diesel's prepared
//! statement cache disabled (PgBouncer 1.18 does not carry prepared statements across server
//! connections). PgBouncer must let the roles in: `auth_type = trust` with an `auth_user` and an
//! `auth_query` (see `.ci/run`).
//!
//! `Bouncer` leaves the worker's defaults: its watchers wait through PgBouncer.
//! `BouncerHintsOff` turns the worker's commit hints off: its checks alone find every commit.
#![cfg(feature = "postgres")]

use super::TestDb;
use diesel::connection::{CacheSize, SimpleConnection};
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection};
use diesel::Connection;
use diesel_transaction_barrier::testing::{PgTestSchema, TestDatabase};
use diesel_transaction_barrier::{ConnectionPool, WorkerBuilder};
use std::time::Duration;

/// The variable that names PgBouncer.
pub const BOUNCER_URL: &str = "DTB_PGBOUNCER_URL";

/// PgBouncer's URL, or `None` (after a note on stderr) when `DTB_PGBOUNCER_URL` is unset.
pub fn bouncer_url() -> Option<String> {
    match std::env::var(BOUNCER_URL) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!(
                "note: {BOUNCER_URL} is not set: this PgBouncer test passes without running \
                 (CI sets it; see CONTRIBUTING.md)"
            );
            None
        }
    }
}

/// Turns Diesel's prepared statement cache off on every connection of a pool: named prepared
/// statements do not survive PgBouncer's transaction pooling.
#[derive(Debug, Clone, Copy)]
pub struct NoStatementCache;

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for NoStatementCache {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.set_prepared_statement_cache_size(CacheSize::Disabled);
        Ok(())
    }
}

/// A pool of at most `size` connections to `url`, without prepared statement cache.
pub fn bouncer_pool(url: &str, size: u32) -> ConnectionPool<PgConnection> {
    r2d2::Pool::builder()
        .max_size(size)
        .connection_timeout(Duration::from_secs(10))
        .connection_customizer(Box::new(NoStatementCache))
        .build(ConnectionManager::new(url))
        .unwrap_or_else(|e| panic!("a pool through PgBouncer: {e}"))
}

/// A connection to `url`, without prepared statement cache.
pub fn bouncer_connection(url: &str) -> PgConnection {
    let mut conn = PgConnection::establish(url)
        .unwrap_or_else(|e| panic!("connecting through PgBouncer: {e}"));
    conn.set_prepared_statement_cache_size(CacheSize::Disabled);
    conn
}

/// `url` with its user replaced by `user` (no password) and `application_name` set to it.
fn with_user(url: &str, user: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let end = url[authority..]
        .find(['/', '?'])
        .map_or(url.len(), |i| authority + i);
    let host = match url[authority..end].rfind('@') {
        Some(at) => &url[authority + at + 1..],
        None => &url[authority..],
    };
    let sep = if host.contains('?') { '&' } else { '?' };
    format!(
        "{}{user}@{host}{sep}application_name={user}",
        &url[..authority]
    )
}

/// A schema and a role of their own (same name), reached through PgBouncer.
#[derive(Debug)]
pub struct BouncerSchema {
    name: String,
    admin: String,
    bouncer: String,
    direct: String,
}

impl BouncerSchema {
    /// The schema's and role's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A direct URL (not through PgBouncer) as the test's role.
    pub fn direct_url(&self) -> String {
        self.direct.clone()
    }

    /// A direct connection as the server's administrator.
    pub fn admin(&self) -> PgConnection {
        PgConnection::establish(&self.admin).expect("PostgreSQL is reachable")
    }
}

impl TestDatabase for BouncerSchema {
    type Conn = PgConnection;

    fn create_unmigrated() -> Self {
        let bouncer = bouncer_url().expect("DTB_PGBOUNCER_URL names PgBouncer");
        let admin = PgTestSchema::server_url();
        let name = format!("dtb_bouncer_{}", uuid::Uuid::new_v4().simple());
        PgConnection::establish(&admin)
            .expect("PostgreSQL is reachable")
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN; \
                 CREATE SCHEMA {name} AUTHORIZATION {name}; \
                 ALTER ROLE {name} SET search_path = {name}"
            ))
            .expect("a role and a schema of the test's own");
        BouncerSchema {
            bouncer: with_user(&bouncer, &name),
            direct: with_user(&admin, &name),
            name,
            admin,
        }
    }

    fn url(&self) -> String {
        self.bouncer.clone()
    }

    fn connect(&self) -> PgConnection {
        bouncer_connection(&self.bouncer)
    }

    fn pool(&self, size: u32) -> ConnectionPool<PgConnection> {
        bouncer_pool(&self.bouncer, size)
    }
}

impl Drop for BouncerSchema {
    fn drop(&mut self) {
        // The role's server connections would idle in PgBouncer's pool for minutes: end them,
        // or the tests together would exhaust the server's connections.
        if let Ok(mut admin) = PgConnection::establish(&self.admin) {
            let _ = admin.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {0} CASCADE; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{0}'; \
                 DROP ROLE IF EXISTS {0}",
                self.name
            ));
        }
    }
}

/// What differs between the two PgBouncer `TestDb`s: how the worker hears of commits.
pub trait Hearing: Send + Sync + 'static {
    /// The connections the waiter takes from the pool.
    const WAITER_CONNECTIONS: u32;

    fn configure(builder: WorkerBuilder<PgConnection>) -> WorkerBuilder<PgConnection>;
}

/// The defaults: a checking connection and four watchers.
pub struct Watchers;

impl Hearing for Watchers {
    const WAITER_CONNECTIONS: u32 = 5;

    fn configure(builder: WorkerBuilder<PgConnection>) -> WorkerBuilder<PgConnection> {
        builder
    }
}

/// Commit hints off: the waiter's checks find every commit.
pub struct HintsOff;

impl Hearing for HintsOff {
    const WAITER_CONNECTIONS: u32 = 1;

    fn configure(builder: WorkerBuilder<PgConnection>) -> WorkerBuilder<PgConnection> {
        builder.commit_hints(false)
    }
}

/// The PgBouncer `TestDb`, generic over how the worker hears of commits.
pub struct Through<H: Hearing>(BouncerSchema, std::marker::PhantomData<H>);

/// Through PgBouncer, the worker's defaults.
pub type Bouncer = Through<Watchers>;
/// Through PgBouncer, commit hints off.
pub type BouncerHintsOff = Through<HintsOff>;

impl<H: Hearing> TestDb for Through<H> {
    type Conn = PgConnection;
    type Database = BouncerSchema;

    const INTEGER: &'static str = "BIGINT";
    const TEXT: &'static str = "TEXT";
    const TIMEOUT_DEBUG_INFO: &'static [&'static str] = &["txid", "transaction:"];
    const WAITER_CONNECTIONS: u32 = H::WAITER_CONNECTIONS;

    fn skipped() -> bool {
        bouncer_url().is_none()
    }

    fn wrap(schema: BouncerSchema) -> Self {
        Through(schema, std::marker::PhantomData)
    }

    fn database(&self) -> &BouncerSchema {
        &self.0
    }

    fn configure_worker(
        &self,
        builder: WorkerBuilder<PgConnection>,
    ) -> WorkerBuilder<PgConnection> {
        H::configure(builder)
    }

    fn pool_at(url: &str, size: u32) -> ConnectionPool<PgConnection> {
        bouncer_pool(url, size)
    }

    /// The server session of the connection's current transaction: behind PgBouncer, another
    /// transaction of the same connection may run on another one.
    fn session_id(conn: &mut PgConnection) -> i64 {
        Self::query_i64(conn, "SELECT pg_backend_pid()").unwrap()
    }

    fn waiters_on(&self, session: i64) -> i64 {
        let mut c = self.0.admin();
        Self::query_i64(
            &mut c,
            &format!(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE {session} = ANY(pg_blocking_pids(pid))"
            ),
        )
        .unwrap()
    }

    /// The server sessions that last ran a check, a probe or a watcher's wait of a waiter on
    /// this schema: behind PgBouncer these are its server connections, and the waiter's own
    /// connections to PgBouncer survive.
    fn kill_waiter_sessions(&self) -> Option<usize> {
        let mut c = self.0.admin();
        let n = Self::query_i64(
            &mut c,
            &super::pg::kill_waiter_sessions_where(&format!("usename = '{}'", self.0.name())),
        );
        Some(n.unwrap_or(0) as usize)
    }

    fn kill_sessions_waiting_on(&self, session: i64) -> Option<usize> {
        Some(super::pg::kill_sessions_waiting_on(
            &mut self.0.admin(),
            session,
        ))
    }

    fn kill(&self, session: i64) {
        let mut c = self.0.admin();
        Self::exec(&mut c, &format!("SELECT pg_terminate_backend({session})"));
    }
}
