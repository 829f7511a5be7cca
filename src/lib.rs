// The crate's documentation is its README, whose example is compiled as a doctest (it needs
// the `postgres` feature, on by default and on docs.rs).
#![cfg_attr(feature = "postgres", doc = include_str!("../README.md"))]
#![cfg_attr(
    not(feature = "postgres"),
    doc = "Push a Faktory job from inside a Diesel transaction: the worker runs it only once \
           that transaction has committed, and never if it rolls back. (The full \
           documentation is built with the `postgres` feature.)"
)]
#![deny(missing_docs, unsafe_code)]
#![warn(unreachable_pub, missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod binding;
mod descriptor;
mod enqueue;
mod error;
mod handlers;
mod maintenance;
pub mod metrics;
mod migrations;
mod producer;
mod repush;
mod worker;

#[cfg(feature = "testing")]
#[cfg_attr(docsrs, doc(cfg(feature = "testing")))]
pub mod testing;

#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod cli;

pub use backend::ConnectionPool;
pub use backend::{BarrierConnection, BARRIER_TABLE};
pub use descriptor::CUSTOM_KEY;
pub use enqueue::EnqueueWithBarrier;
pub use error::{BoxError, Error, Result, TimeoutInfo};
pub use handlers::Handlers;
pub use maintenance::{inspect, reap_barriers, reconcile_barriers};
pub use migrations::{barrier_schema_present, run_migrations};
pub use producer::{Producer, ProducerBuilder};
pub use worker::{
    AbortPolicy, ShutdownHandle, Signal, StopReason, Worker, WorkerBuilder, WorkerMonitor,
};

pub use faktory::{Job, JobId};
