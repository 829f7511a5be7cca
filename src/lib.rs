//! Push a [Faktory](https://contribsys.com/faktory/) job from inside a Diesel transaction; the
//! worker runs it only once that transaction has committed, and never if it rolls back.
//!
//! # Overview
//!
//! ```text
//!  application thread                      Faktory                 worker process
//!  ──────────────────                      ───────                 ──────────────
//!  BEGIN
//!  UPDATE orders ...
//!  enqueue_with_barrier(job) ──► INSERT dtb_barriers (id)    (same transaction)
//!                            ──► PUSH job + {"transaction_barrier": {id, ...}} ──► FETCH
//!  ...                                                                  wait on barrier `id`
//!  COMMIT ───────────────────────────────────────────────────────────►  committed: run handler,
//!                                                                       delete the row, ACK
//!  (or ROLLBACK) ────────────────────────────────────────────────────►  not committed: ACK as
//!                                                                       aborted, never run
//! ```
//!
//! The job is pushed at once, so nothing is lost if the application dies right after its
//! commit; the *barrier* — a row written in the same transaction — tells the worker when, and
//! whether, to run it.
//!
//! # The guarantee
//!
//! For a job enqueued with [`EnqueueWithBarrier::enqueue_with_barrier`] inside a transaction:
//!
//! * **Never early.** The handler starts only after the transaction has committed (and, on
//!   PostgreSQL and MySQL, and on SQLite with its default `synchronous = FULL`, after that
//!   commit is durable), and it sees every write of it.
//! * **Never after an abort.** If the transaction rolls back — an `Err`, a panic, a killed
//!   connection, or a rolled-back savepoint around the enqueue — the handler never runs; the
//!   job is acknowledged as aborted ([`AbortPolicy`] can make that a failure instead).
//! * **Never lost after commit.** The job was already in Faktory before the commit; and if
//!   Faktory loses it, a worker's reconciler pushes it again from the barrier row
//!   ([`WorkerBuilder::reconcile_grace`]).
//! * **Once.** The handler runs in the worker transaction that deletes the barrier row; a second
//!   delivery of the same job finds the row gone and does not run the handler. Writes the handler
//!   makes through the connection it is given commit together with that deletion, so they happen
//!   exactly once. Side effects outside the database are at least once: if the worker dies after
//!   the handler's side effect but before its commit, the job runs again.
//! * **Never waiting forever.** Each delivery waits at most
//!   [`block_limit`](WorkerBuilder::block_limit), then the job is snoozed; after
//!   [`deadline`](WorkerBuilder::deadline) it fails with [`Error::BarrierTimeout`].
//! * **Nothing left behind.** The row is deleted when the handler succeeds; a rolled-back
//!   transaction never leaves one.
//!
//! Outside a transaction the job is a plain job that runs at once.
//!
//! ## How this differs from after-commit hooks
//!
//! An after-commit hook pushes the job *after* `COMMIT` returns: if the process dies, or Faktory
//! is unreachable, between the commit and the push, the job is lost although its data was
//! committed. Here the push happens inside the transaction, so a push failure rolls the
//! transaction back (`?`), and a crash after commit cannot lose the job. The price is that a
//! worker may fetch the job before the commit; the barrier makes it wait.
//!
//! # Feature flags
//!
//! * `postgres` (default): `PgConnection` (PostgreSQL 13 or later).
//! * `mysql`: `MysqlConnection` (MariaDB 10.11; MySQL 8 through the same statements).
//! * `sqlite`: `SqliteConnection`, in WAL mode (which [`run_migrations`] sets). SQLite has one
//!   writer at a time: a handler runs holding the write lock, and no handler starts while an
//!   application transaction writes. `cargo quickstart` runs the demo in
//!   `examples/quickstart.rs` on SQLite.
//! * `testing`: [`testing::TestServer`], an in-process Faktory server for tests.
//!
//! # Getting started
//!
//! Create the barrier table once (or copy the SQL from `migrations/` into your own
//! migrations), enqueue inside your transactions, and run a worker:
//!
//! ```no_run
//! # #[cfg(feature = "postgres")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use diesel::prelude::*;
//! use diesel::pg::PgConnection;
//! use diesel::r2d2::{ConnectionManager, Pool};
//! use diesel_transaction_barrier::{EnqueueWithBarrier, Job, Producer, WorkerBuilder};
//!
//! let url = "postgres://postgres@localhost/app";
//! let mut conn = PgConnection::establish(url)?;
//! diesel_transaction_barrier::run_migrations(&mut conn)?;
//!
//! // In the application: one producer, shared by every request thread.
//! let producer = Producer::connect("tcp://localhost:7419")?;
//! conn.transaction(|c| {
//!     diesel::sql_query("UPDATE orders SET status = 'paid' WHERE id = 42").execute(c)?;
//!     c.enqueue_with_barrier(&producer, Job::new("send_receipt", vec![42]))?;
//!     Ok::<_, diesel_transaction_barrier::Error>(())
//! })?;
//!
//! // In the worker process.
//! let pool = Pool::builder().build(ConnectionManager::<PgConnection>::new(url))?;
//! let mut worker = WorkerBuilder::new(pool)
//!     .url("tcp://localhost:7419")
//!     .register("send_receipt", |job: &Job, conn: &mut PgConnection| {
//!         // Runs after the transaction above committed, and sees its writes.
//!         let order_id = job.args()[0].as_i64();
//!         println!("sending the receipt of order {order_id:?}");
//!         Ok::<(), std::io::Error>(())
//!     })
//!     .connect()?;
//! worker.run(&["default"])?;
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "postgres"))]
//! # fn main() {}
//! ```
//!
//! The error type converts into `diesel::result::Error`, so `?` also works in closures that
//! return Diesel's error.
//!
//! # Testing code that enqueues
//!
//! Give the same [`Handlers`] to the worker and, in tests, to [`Producer::inline`]: an inline
//! producer runs the handler at once, on the calling thread, with the caller's connection —
//! even inside a transaction (including Diesel's `begin_test_transaction`).
//!
//! To test the whole path through Faktory without installing it, enable the `testing` feature
//! and start a [`testing::TestServer`] (or [`testing::TestFaktory`], which uses `FAKTORY_URL`
//! when it is set).
//!
//! # The barrier table
//!
//! `dtb_barriers` ([`BARRIER_TABLE`]) holds one row per job enqueued inside a transaction that
//! has not run yet: its id (a random UUID, also in the job's descriptor under [`CUSTOM_KEY`]),
//! creation time, the producer's transaction id where the backend has one, the job's id, kind,
//! queue and payload. On PostgreSQL the migration also creates the function
//! `dtb_await_barrier(uuid, integer)`, which the worker waits with.
#![deny(missing_docs, unsafe_code)]
#![warn(unreachable_pub, missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod descriptor;
mod enqueue;
mod error;
mod handlers;
mod migrations;
mod maintenance;
mod producer;
mod repush;
mod worker;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

pub use backend::{BarrierConnection, BARRIER_TABLE};
pub use descriptor::CUSTOM_KEY;
pub use enqueue::EnqueueWithBarrier;
pub use error::{BoxError, Error, Result, TimeoutInfo};
pub use handlers::Handlers;
pub use maintenance::{reap_barriers, reconcile_barriers};
pub use migrations::{barrier_schema_present, run_migrations};
pub use producer::{Producer, ProducerBuilder};
pub use backend::ConnectionPool;
pub use worker::{
    AbortPolicy, ShutdownHandle, StopReason, Worker, WorkerBuilder, WorkerMonitor,
};

pub use faktory::{Job, JobId};
