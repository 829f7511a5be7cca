//! An in-process Faktory server for tests.
//!
//! [`TestServer`] speaks the Faktory Work Protocol (FWP) on a loopback port, so the real
//! `faktory` client and worker talk to it as they would to Faktory. It keeps jobs in memory
//! and follows the real server's rules for queues, scheduled jobs (`at`), reservations
//! (`reserve_for`), failures, retries and the dead set, and lets a test look inside:
//! queue sizes, the sets, each job's payload and [history](TestServer::history), and
//! [waits](TestServer::wait_for) that wake on every state change instead of sleeping.
//!
//! [`TestFaktory`] picks a real Faktory from `FAKTORY_URL` when it is set, and starts a
//! `TestServer` otherwise, so the same tests can run against both.
//!
//! `diesel_transaction_barrier` re-exports this crate under its `testing` feature
//! (`diesel_transaction_barrier::testing`).
//!
//! # Example
//!
//! ```
//! use dtb_faktory_testing::{JobEventKind, TestServer};
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
//!
//! # Differences from the real server
//!
//! It follows Faktory 1.10.0 and is tested side by side with it. What differs on purpose:
//!
//! - Everything is in memory and lost when the server stops.
//! - Payloads are stored as sent: unknown fields, `custom` and `args` come back byte for
//!   byte (the real server drops unknown fields and re-encodes `custom`, so numbers beyond
//!   `f64` precision and key order change there).
//! - Time is exact: scheduled jobs and retries become fetchable, reservations expire and
//!   silent workers are dropped at their time; the real server checks every 5 or 15 s.
//! - A job pushed without `retry` gets 25 (Faktory 1.10 gives it the `retry` of the last
//!   `PUSH` that set one, a bug).
//! - Error texts are the same up to where the real server quotes Go's decoders.
//! - A command sent before `HELLO`, or a malformed `HELLO`, gets an error and the
//!   connection stays open (the real server closes it without a word). A wrong password is
//!   answered `Invalid password` and the connection is closed, as on the real server.
//! - Command lines are limited (16 MiB by default); a longer one is answered with an error.
//! - Only `HELLO`, `PUSH`, `PUSHB`, `FETCH`, `ACK`, `FAIL`, `BEAT`, `INFO`, `FLUSH` and
//!   `END` are served; `QUEUE` and `MUTATE` answer `unknown command`, `BATCH` and `TRACK`
//!   that they need Faktory Enterprise. There is no priority, no queue pausing, no web UI.
//! - Reservations may be shorter than 60 seconds when
//!   [`min_reserve_for`](TestServerBuilder::min_reserve_for) allows it, and the retry delay
//!   is configurable ([`RetryDelay`]).
//!
//! The `docs/testing-server.md` of `diesel_transaction_barrier` lists the differences found
//! by running both servers and how each was settled.
#![deny(missing_docs, unsafe_code)]
#![warn(unreachable_pub, missing_debug_implementations)]

mod commands;
mod connection;
mod env;
mod events;
mod job;
mod protocol;
mod server;
mod state;

pub use env::TestFaktory;
pub use events::{JobEvent, JobEventKind, RetryDelay, Stats};
pub use protocol::password_hash;
pub use server::{TestServer, TestServerBuilder};
pub use state::{WorkerInfo, WorkerState};

/// The Faktory version this server reports in `INFO` (the real server whose behaviour it
/// follows).
pub(crate) const FAKTORY_VERSION: &str = "1.10.0";
