//! Helpers for tests (cargo feature `testing`): an in-process Faktory server, and a database
//! of its own for each test.
//!
//! [`TestServer`] speaks the Faktory Work Protocol (FWP) on a loopback port, so the real
//! `faktory` client and worker talk to it as they would to Faktory. It keeps jobs in memory
//! and follows the real server's rules for queues, scheduled jobs (`at`), reservations
//! (`reserve_for`), failures, retries and the dead set, and lets a test look inside:
//! queue sizes, the sets, each job's payload and [history](TestServer::history), and
//! [waits](TestServer::wait_for) that wake on every state change instead of sleeping. It
//! comes from the [`dtb_faktory_testing`] crate, re-exported here; its documentation lists
//! where it differs from the real server.
//!
//! [`TestFaktory`] picks a real Faktory from `FAKTORY_URL` when it is set, and starts a
//! `TestServer` otherwise, so the same tests can run against both.
//!
//! [`TestDatabase`] gives each test a database of its own with the barrier table: a
//! PostgreSQL schema ([`PgTestSchema`]), a MySQL database ([`MysqlTestDatabase`], or
//! [`MysqlRestrictedTestDatabase`] reached through an account without `PROCESS`) or an
//! SQLite file ([`SqliteTestFile`]), removed when dropped.
//!
//! # Example
//!
//! ```
//! use diesel_transaction_barrier::testing::{JobEventKind, TestServer};
//! use faktory::{Client, Job};
//!
//! let server = TestServer::start()?;
//! let url = server.url();
//!
//! // The faktory client is async; drive it from a multi-thread runtime (its `Drop`
//! // needs one).
//! let runtime = tokio::runtime::Builder::new_multi_thread()
//!     .worker_threads(1)
//!     .enable_all()
//!     .build()?;
//! let job = Job::new("send_email", vec!["user@example.com"]).on_queue("mail");
//! let jid = job.id().to_string();
//! runtime.block_on(async {
//!     let mut client = Client::connect_to(&url).await.expect("connect");
//!     client.enqueue(job).await.expect("enqueue");
//! });
//!
//! assert_eq!(server.queue_size("mail"), 1);
//! let kinds: Vec<_> = server.history(&jid).iter().map(|e| e.kind()).collect();
//! assert_eq!(kinds, [JobEventKind::Pushed]);
//! assert_eq!(server.job(&jid).unwrap()["args"][0], "user@example.com");
//! # Ok::<(), std::io::Error>(())
//! ```

mod db;

#[cfg(feature = "postgres")]
pub use db::PgTestSchema;
#[cfg(feature = "sqlite")]
pub use db::SqliteTestFile;
pub use db::TestDatabase;
#[cfg(feature = "mysql")]
pub use db::{MysqlRestrictedTestDatabase, MysqlTestDatabase};
pub use dtb_faktory_testing::{
    password_hash, JobEvent, JobEventKind, RetryDelay, Stats, TestFaktory, TestServer,
    TestServerBuilder, WorkerInfo, WorkerState,
};
