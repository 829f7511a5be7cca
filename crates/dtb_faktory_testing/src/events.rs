//! What a test reads from the server: the events of a job's history and the counters, and the
//! retry policy it is started with.

use chrono::{DateTime, Utc};
use rand::Rng;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// How long a failed job waits before its next attempt.
///
/// Pass one to [`TestServerBuilder::retry_delay`](crate::TestServerBuilder::retry_delay); a
/// plain [`Duration`] converts into [`RetryDelay::Fixed`].
#[derive(Clone, Default)]
pub enum RetryDelay {
    /// The real server's formula: `15 + count⁴ + rand(0..30) × (count + 1)` seconds, where
    /// `count` is the job's `failure.retry_count` (0 after the first failure).
    #[default]
    Faktory,
    /// The same delay before every retry (`Duration::ZERO` retries at once).
    Fixed(Duration),
    /// Any function of the retry count.
    Custom(Arc<dyn Fn(u32) -> Duration + Send + Sync>),
}

impl RetryDelay {
    /// A policy computed by `f` from the retry count (0 after the first failure).
    pub fn custom(f: impl Fn(u32) -> Duration + Send + Sync + 'static) -> RetryDelay {
        RetryDelay::Custom(Arc::new(f))
    }

    /// The delay before the retry that follows failure number `retry_count + 1`.
    pub fn delay(&self, retry_count: u32) -> Duration {
        match self {
            RetryDelay::Faktory => {
                let count = u64::from(retry_count);
                let jitter: u64 = rand::thread_rng().gen_range(0..30);
                // Saturating: a pushed job may carry an absurd `failure.retry_count`.
                let secs = count
                    .saturating_pow(4)
                    .saturating_add(15)
                    .saturating_add(jitter.saturating_mul(count.saturating_add(1)));
                Duration::from_secs(secs)
            }
            RetryDelay::Fixed(d) => *d,
            RetryDelay::Custom(f) => f(retry_count),
        }
    }
}

impl From<Duration> for RetryDelay {
    fn from(d: Duration) -> RetryDelay {
        RetryDelay::Fixed(d)
    }
}

impl fmt::Debug for RetryDelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryDelay::Faktory => f.write_str("Faktory"),
            RetryDelay::Fixed(d) => f.debug_tuple("Fixed").field(d).finish(),
            RetryDelay::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Something that happened to a job, with the time it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobEvent {
    /// Accepted by `PUSH` or `PUSHB` (into its queue, or into the scheduled set when `at` is
    /// in the future).
    Pushed {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// A scheduled job reached its `at` time and entered its queue.
    Enqueued {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Handed to a worker by `FETCH` (and so reserved).
    Fetched {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Acknowledged by `ACK`.
    Acked {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Reported failed by `FAIL`.
    Failed {
        /// When it happened.
        at: DateTime<Utc>,
        /// The message the worker sent (trimmed and cut to 1000 bytes like the real server).
        message: String,
    },
    /// Its reservation ran out before an `ACK` or `FAIL`; it counts as a failure.
    Expired {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// A failed job's retry time came and it went back to its queue (fetchable again).
    Retried {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Moved to the dead set: its retries are used up, or its `retry` is negative.
    Dead {
        /// When it happened.
        at: DateTime<Utc>,
    },
    /// Dropped after a failure because its `retry` is 0.
    Discarded {
        /// When it happened.
        at: DateTime<Utc>,
    },
}

/// The kind of a [`JobEvent`], without its data; handy for comparisons and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobEventKind {
    /// See [`JobEvent::Pushed`].
    Pushed,
    /// See [`JobEvent::Enqueued`].
    Enqueued,
    /// See [`JobEvent::Fetched`].
    Fetched,
    /// See [`JobEvent::Acked`].
    Acked,
    /// See [`JobEvent::Failed`].
    Failed,
    /// See [`JobEvent::Expired`].
    Expired,
    /// See [`JobEvent::Retried`].
    Retried,
    /// See [`JobEvent::Dead`].
    Dead,
    /// See [`JobEvent::Discarded`].
    Discarded,
}

impl JobEvent {
    pub(crate) fn new(kind: JobEventKind, at: DateTime<Utc>, message: Option<String>) -> JobEvent {
        match kind {
            JobEventKind::Pushed => JobEvent::Pushed { at },
            JobEventKind::Enqueued => JobEvent::Enqueued { at },
            JobEventKind::Fetched => JobEvent::Fetched { at },
            JobEventKind::Acked => JobEvent::Acked { at },
            JobEventKind::Failed => JobEvent::Failed {
                at,
                message: message.unwrap_or_default(),
            },
            JobEventKind::Expired => JobEvent::Expired { at },
            JobEventKind::Retried => JobEvent::Retried { at },
            JobEventKind::Dead => JobEvent::Dead { at },
            JobEventKind::Discarded => JobEvent::Discarded { at },
        }
    }

    /// The kind of event.
    pub fn kind(&self) -> JobEventKind {
        match self {
            JobEvent::Pushed { .. } => JobEventKind::Pushed,
            JobEvent::Enqueued { .. } => JobEventKind::Enqueued,
            JobEvent::Fetched { .. } => JobEventKind::Fetched,
            JobEvent::Acked { .. } => JobEventKind::Acked,
            JobEvent::Failed { .. } => JobEventKind::Failed,
            JobEvent::Expired { .. } => JobEventKind::Expired,
            JobEvent::Retried { .. } => JobEventKind::Retried,
            JobEvent::Dead { .. } => JobEventKind::Dead,
            JobEvent::Discarded { .. } => JobEventKind::Discarded,
        }
    }

    /// When it happened.
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            JobEvent::Pushed { at }
            | JobEvent::Enqueued { at }
            | JobEvent::Fetched { at }
            | JobEvent::Acked { at }
            | JobEvent::Failed { at, .. }
            | JobEvent::Expired { at }
            | JobEvent::Retried { at }
            | JobEvent::Dead { at }
            | JobEvent::Discarded { at } => *at,
        }
    }
}

/// Counters kept since the server started (or since the last `FLUSH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Jobs acknowledged (`total_processed` in `INFO`).
    pub processed: u64,
    /// Failures, counting `FAIL`s and expired reservations (`total_failures` in `INFO`).
    pub failures: u64,
    /// Jobs accepted by `PUSH` and `PUSHB`.
    pub pushed: u64,
}
