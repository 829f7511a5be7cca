// The crate's documentation begins with its README, whose example is compiled as a doctest.
#![doc = include_str!("../README.md")]
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
mod session;
mod shared;
mod state;

pub use env::TestFaktory;
pub use events::{JobEvent, JobEventKind, RetryDelay, Stats};
pub use protocol::password_hash;
pub use server::{ServerData, TestServer, TestServerBuilder};
pub use state::{WorkerInfo, WorkerState};

/// The Faktory version this server reports in `INFO` (the real server whose behaviour it
/// follows).
pub(crate) const FAKTORY_VERSION: &str = "1.10.0";
