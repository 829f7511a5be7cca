//! [`WorkerBuilder`]: the worker's settings, and the checks made before it connects.

use super::monitor::Stats;
use super::retries::RetrySchedule;
use super::{Shared, Worker};
use crate::backend::{BarrierConnection, ConnectionPool, Hints};
use crate::error::{Error, Result};
use crate::handlers::Handlers;
use crate::maintenance::Schedule;
use crate::producer::{env_url, redact, Producer};
use faktory::Job;
use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

/// What the worker does with a job whose transaction did not commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AbortPolicy {
    /// Acknowledge the job (it is done: there is nothing to do) and log it as aborted.
    #[default]
    Ack,
    /// Fail the job with [`Error::Aborted`], so that it shows in Faktory's retries and, in the
    /// end, its dead set.
    Fail,
}

/// Configures and connects a [`Worker`].
pub struct WorkerBuilder<C: BarrierConnection> {
    pool: ConnectionPool<C>,
    handlers: Handlers<C>,
    config: Config,
}

/// Every setting of a worker: what the builder collects and the running worker reads.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// The Faktory server; `None` until `connect` reads the environment.
    pub(crate) url: Option<String>,
    /// Handlers that run at once.
    pub(crate) workers: usize,
    /// Jobs that may wait for running transactions at once.
    pub(crate) max_waiting: usize,
    pub(crate) hostname: Option<String>,
    pub(crate) labels: Vec<String>,
    /// Whether the waiter uses the backend's commit hints.
    pub(crate) commit_hints: bool,
    /// How many watchers wait on running transactions, where hints are lock waits.
    pub(crate) commit_watchers: usize,
    /// Whether `run` stops on SIGTERM or SIGINT and quiets on SIGTSTP.
    pub(crate) handle_signals: bool,
    /// How many jobs may be parked.
    pub(crate) max_parked: usize,
    pub(crate) abort_policy: AbortPolicy,
    pub(crate) block_limit: Duration,
    pub(crate) deadline: Duration,
    pub(crate) snooze_delay: Duration,
    pub(crate) overflow_delay: Duration,
    pub(crate) reconnect_backoff: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) maintenance: Schedule,
    /// The waiter's check interval; `None`: the backend's.
    pub(crate) check_interval: Option<Duration>,
    /// When Faktory brings failed jobs back, at the latest.
    pub(crate) retry_schedule: RetrySchedule,
}

impl<C: BarrierConnection> fmt::Debug for WorkerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut config = self.config.clone();
        config.url = config.url.as_deref().map(redact);
        f.debug_struct("WorkerBuilder")
            .field("handlers", &self.handlers)
            .field("config", &config)
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The connections the worker takes from its pool: one per handler, and its waiter's.
    pub(crate) fn pooled_connections<C: BarrierConnection>(&self) -> u32 {
        let listens_from_pool = self.commit_hints;
        let watchers = if self.commit_hints {
            self.commit_watchers
        } else {
            0
        };
        u32::try_from(self.workers)
            .unwrap_or(u32::MAX)
            .saturating_add(super::waiter::WaiterConfig::<C>::pooled_connections(
                listens_from_pool,
                watchers,
            ))
    }
}

impl<C: BarrierConnection> WorkerBuilder<C> {
    /// A builder whose barriers are resolved with connections from `pool` (also
    /// [`Worker::builder`]).
    ///
    /// The worker takes one connection per running handler, and a few for its waiter, however
    /// many jobs wait: on PostgreSQL and MySQL a checking one and its
    /// [`commit_watchers`](Self::commit_watchers), so the pool needs
    /// [`workers`](Self::workers) plus 5 with the defaults; on SQLite a checking and a
    /// listening one (`workers` plus 2); one more when a handler takes no connection.
    /// [`connect`](Self::connect) checks.
    pub fn new(pool: ConnectionPool<C>) -> Self {
        WorkerBuilder {
            pool,
            handlers: Handlers::new(),
            config: Config {
                url: None,
                workers: 4,
                max_waiting: 32,
                hostname: None,
                labels: Vec::new(),
                commit_hints: true,
                commit_watchers: 4,
                handle_signals: false,
                max_parked: 10_000,
                abort_policy: AbortPolicy::Ack,
                block_limit: Duration::from_secs(30),
                deadline: Duration::from_secs(15 * 60),
                snooze_delay: Duration::ZERO,
                overflow_delay: Duration::from_secs(1),
                reconnect_backoff: Duration::from_secs(2),
                shutdown_timeout: Duration::from_secs(10),
                maintenance: Schedule {
                    reap_interval: Duration::from_secs(60 * 60),
                    max_barrier_age: Duration::from_secs(30 * 24 * 60 * 60),
                    reconcile_grace: Some(Duration::from_secs(15 * 60)),
                },
                check_interval: None,
                retry_schedule: RetrySchedule::default(),
            },
        }
    }

    /// Replaces the registered handlers with `handlers`.
    ///
    /// Defaults to none.
    pub fn handlers(mut self, handlers: Handlers<C>) -> Self {
        self.handlers = handlers;
        self
    }

    /// Registers a handler for `kind`; see [`Handlers::register`].
    pub fn register<K, F, E>(mut self, kind: K, handler: F) -> Self
    where
        K: Into<String>,
        F: Fn(&Job, &mut C) -> std::result::Result<(), E> + Send + Sync + 'static,
        E: Into<crate::BoxError>,
    {
        self.handlers = self.handlers.register(kind, handler);
        self
    }

    /// Registers a handler for `kind` whose jobs may arrive without a barrier; see
    /// [`Handlers::register_without_barrier`].
    pub fn register_without_barrier<K, F, E>(mut self, kind: K, handler: F) -> Self
    where
        K: Into<String>,
        F: Fn(&Job, &mut C) -> std::result::Result<(), E> + Send + Sync + 'static,
        E: Into<crate::BoxError>,
    {
        self.handlers = self.handlers.register_without_barrier(kind, handler);
        self
    }

    /// Registers a handler that takes no database connection for `kind`; see
    /// [`Handlers::register_without_connection`]. The pool then needs one connection more,
    /// through which the barriers of such jobs are deleted in batches.
    pub fn register_without_connection<K, F, E>(mut self, kind: K, handler: F) -> Self
    where
        K: Into<String>,
        F: Fn(&Job) -> std::result::Result<(), E> + Send + Sync + 'static,
        E: Into<crate::BoxError>,
    {
        self.handlers = self.handlers.register_without_connection(kind, handler);
        self
    }

    /// The Faktory server, as `tcp://[:password@]host:port`.
    ///
    /// Defaults to `FAKTORY_PROVIDER` / `FAKTORY_URL`, else `tcp://localhost:7419`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.config.url = Some(url.into());
        self
    }

    /// How many handlers run at once.
    ///
    /// Defaults to 4.
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n.max(1);
        self
    }

    /// How many fetched jobs may wait for transactions that are still running, on top of the
    /// [`workers`](Self::workers) handler slots. Waiting costs no thread and no database
    /// connection, but each fetch slot keeps a Faktory connection. One transaction holds at
    /// most a quarter of them (at least one). A job whose check finds its transaction running
    /// while that many already wait is parked (see [`max_parked`](Self::max_parked)), or, when
    /// it cannot be, handed back (pushed again a second later, twice as late each time the same
    /// job comes back, at most a minute; [`WorkerMonitor::overflowed`](crate::WorkerMonitor::overflowed)
    /// counts them), so waiting jobs never keep a ready job from being fetched. Jobs whose
    /// transactions have committed never count.
    ///
    /// Defaults to 32.
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.config.max_waiting = n;
        self
    }

    /// How many jobs of running transactions the worker may park: acknowledge, keep in memory
    /// and push back the moment their transaction commits (or drop as aborted when it does
    /// not), instead of holding each in a fetch slot, or handing it back to Faktory again and
    /// again while the transaction runs. A transaction holds at most a quarter of
    /// [`max_waiting`](Self::max_waiting) fetch slots (at least one); its other jobs are parked,
    /// as are those of transactions that arrive when `max_waiting` are full. A job parked for
    /// [`block_limit`](Self::block_limit) is handed back, a little later each time. Jobs
    /// beyond this many are handed back at once, likewise.
    ///
    /// A parked job lives only in this worker's memory and as its barrier row: should the
    /// worker die, the reconciler pushes it again once its transaction has committed and its
    /// row is overdue, so the worker parks only while its reconciler runs
    /// ([`reconcile_grace`](Self::reconcile_grace) is set). Zero parks nothing.
    ///
    /// Defaults to 10,000.
    pub fn max_parked(mut self, n: usize) -> Self {
        self.config.max_parked = n;
        self
    }

    /// What to do with jobs whose transaction did not commit.
    ///
    /// Defaults to [`AbortPolicy::Ack`].
    pub fn abort_policy(mut self, policy: AbortPolicy) -> Self {
        self.config.abort_policy = policy;
        self
    }

    /// How long one delivery of a job may wait for its transaction before the job is snoozed:
    /// pushed again, unchanged but for a new job id, and this delivery acknowledged — without
    /// the retry penalty a failure would cost. Keep it well under the jobs' `reserve_for`.
    ///
    /// Defaults to 30 seconds.
    pub fn block_limit(mut self, limit: Duration) -> Self {
        self.config.block_limit = limit.max(Duration::from_millis(1));
        self
    }

    /// How old a job (by its `created_at`) may grow while its transaction stays open before it
    /// fails with [`Error::BarrierTimeout`]. A later retry that finds the transaction committed
    /// still runs the job.
    ///
    /// Defaults to 15 minutes.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.config.deadline = deadline;
        self
    }

    /// How far in the future a snoozed job is scheduled. Zero pushes it straight back to its
    /// queue; a positive delay schedules it with `at` (Faktory's scheduler checks scheduled jobs
    /// every few seconds).
    ///
    /// Defaults to zero.
    pub fn snooze_delay(mut self, delay: Duration) -> Self {
        self.config.snooze_delay = delay;
        self
    }

    /// How long to wait before reconnecting after the connection to Faktory failed.
    ///
    /// Defaults to 2 seconds.
    pub fn reconnect_backoff(mut self, backoff: Duration) -> Self {
        self.config.reconnect_backoff = backoff;
        self
    }

    /// How long a shutdown waits for running handlers before it returns anyway (jobs still
    /// running then are failed back to Faktory, which retries them, within a second more).
    ///
    /// Defaults to 10 seconds.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// How often the worker deletes barrier rows older than
    /// [`max_barrier_age`](Self::max_barrier_age) (see [`reap_barriers`](crate::reap_barriers)).
    /// Zero turns the reaper off.
    ///
    /// Defaults to one hour.
    pub fn reap_interval(mut self, interval: Duration) -> Self {
        self.config.maintenance.reap_interval = interval;
        self
    }

    /// The age after which a barrier row can no longer be consumed and is deleted by the
    /// reaper. It must exceed the longest time a committed job may still be retried by
    /// Faktory (25 retries span about three weeks).
    ///
    /// Defaults to 30 days.
    pub fn max_barrier_age(mut self, age: Duration) -> Self {
        self.config.maintenance.max_barrier_age = age;
        self
    }

    /// After how long a committed barrier whose job no worker consumed gets its job pushed
    /// again (see [`reconcile_barriers`](crate::reconcile_barriers)): the cure for a broker
    /// that lost jobs. `None` turns the reconciler off. The worker checks every quarter of the
    /// grace period (at most every minute).
    ///
    /// Defaults to 15 minutes.
    pub fn reconcile_grace(mut self, grace: Option<Duration>) -> Self {
        self.config.maintenance.reconcile_grace = grace;
        self
    }

    /// The longest delay Faktory gives retry `n` of a failed job (`n` counts from 0, the
    /// retry after the first failure). When a handler fails, the worker records with the
    /// barrier when the job is due back at the latest; if the retry has not consumed the
    /// barrier [`reconcile_grace`](Self::reconcile_grace) after that (the broker lost it with
    /// its data, say), the reconciler pushes the job again. Jobs with no retry left (or with
    /// `retry: 0`) are left to the dead set and the reaper. Set it when your Faktory retries on
    /// another schedule.
    ///
    /// Defaults to Faktory's own schedule: `n⁴ + 15 + 29·(n + 1)` seconds, plus 15 s for its
    /// scheduler.
    pub fn retry_schedule(
        mut self,
        max_delay: impl Fn(usize) -> Duration + Send + Sync + 'static,
    ) -> Self {
        self.config.retry_schedule = RetrySchedule::new(max_delay);
        self
    }

    /// Whether the waiter uses commit hints (the [watchers](Self::commit_watchers) of
    /// PostgreSQL and MySQL, SQLite's newly written rows), which make it check a barrier as
    /// soon as its transaction ends. Without them it finds commits by its
    /// [checks](Self::check_interval) alone: a job fetched before its transaction commits
    /// then starts up to one check interval later. Hints are never verdicts, so turning them
    /// off changes only how soon jobs start (and spares the watchers' connections).
    ///
    /// Defaults to `true`.
    pub fn commit_hints(mut self, enabled: bool) -> Self {
        self.config.commit_hints = enabled;
        self
    }

    /// PostgreSQL and MySQL: how many of the running transactions that jobs wait for the
    /// waiter watches at once, each with a lock wait on its connection of its own, which ends
    /// the moment the transaction does (the youngest first: most transactions end soon after
    /// they push). The others are checked on a schedule that backs off from 2 ms to the
    /// [`check_interval`](Self::check_interval). Each watcher takes a connection from the pool
    /// while it has work. Zero watches nothing. SQLite has no watchers.
    ///
    /// Defaults to 4.
    pub fn commit_watchers(mut self, n: usize) -> Self {
        self.config.commit_watchers = n;
        self
    }

    /// The longest time between two checks of a barrier that jobs wait for (new jobs, and the
    /// barriers a commit hint names, are checked at once). The bound on how late a job starts
    /// after its commit when no hint comes: lower it when [`commit_hints`](Self::commit_hints)
    /// are off. On SQLite every waiting barrier is checked at that pace; on PostgreSQL and
    /// MySQL a waiting barrier is checked 2 ms after its first check, then twice as long after
    /// each, up to this interval (those of a transaction a [watcher](Self::commit_watchers)
    /// waits on only at this interval).
    ///
    /// Defaults to the backend's: 200 ms on PostgreSQL and SQLite, 1 s on MySQL.
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.config.check_interval = Some(interval.max(Duration::from_millis(1)));
        self
    }

    /// Whether [`run`](Worker::run) stops on the process's signals, as Sidekiq and
    /// faktory_worker_ruby do, for `systemctl stop`, `docker stop`, Kubernetes and Ctrl-C:
    ///
    /// * **SIGTERM or SIGINT**: the graceful stop of [`ShutdownHandle::shutdown`](crate::ShutdownHandle::shutdown).
    ///   No new job is taken, jobs waiting for their transactions go back to Faktory at once
    ///   (without the retry penalty), running handlers get up to the
    ///   [`shutdown_timeout`](Self::shutdown_timeout) to finish, and `run` returns
    ///   [`StopReason::Signal`](crate::StopReason::Signal).
    /// * **A second SIGTERM or SIGINT** during that drain: `run` returns at once; handlers still
    ///   running are failed back to Faktory, which retries them.
    /// * **SIGTSTP**: quiet. No new job is taken (a job fetched from then on waits, without
    ///   running, until what runs has finished or [`block_limit`](Self::block_limit) passed,
    ///   then goes back to Faktory); running handlers and waiting jobs finish; then the worker
    ///   closes its Faktory connections and waits for SIGTERM or SIGINT.
    ///
    /// The handlers are installed when `run` starts (through Tokio's `signal` module) and stay
    /// installed for the life of the process: after `run` returns, these signals no longer end
    /// or suspend the process. Elsewhere than on Unix, only Ctrl-C is handled (as SIGINT).
    ///
    /// Defaults to `false`: the worker leaves the process's signals alone.
    pub fn handle_signals(mut self, enabled: bool) -> Self {
        self.config.handle_signals = enabled;
        self
    }

    /// The hostname reported to Faktory.
    ///
    /// Defaults to the machine's hostname.
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.config.hostname = Some(hostname.into());
        self
    }

    /// Labels reported to Faktory (shown in its web UI).
    ///
    /// Defaults to none.
    pub fn labels<I: IntoIterator<Item = String>>(mut self, labels: I) -> Self {
        self.config.labels = labels.into_iter().collect();
        self
    }

    /// Checks the pool (big enough for [`workers`](Self::workers) handlers and the waiter),
    /// the database (the barrier table must exist) and Faktory, and returns the worker.
    ///
    /// # Errors
    ///
    /// [`Error::PoolTooSmall`], [`Error::MigrationsMissing`], or the error met reaching the
    /// database or Faktory.
    pub fn connect(mut self) -> Result<Worker<C>> {
        // Handlers without a connection: their barriers are deleted through one more.
        let needed = self
            .config
            .pooled_connections::<C>()
            .saturating_add(u32::from(self.handlers.any_detached()));
        if self.pool.max_size() < needed {
            return Err(Error::PoolTooSmall {
                max_size: self.pool.max_size(),
                needed,
            });
        }
        let location = {
            let mut conn = self.pool.get()?;
            crate::migrations::require_barrier_schema(&mut *conn)?;
            for warning in conn.startup_warnings() {
                tracing::warn!(backend = C::NAME, "{warning}");
            }
            conn.barrier_location()?
        };
        crate::metrics::describe();
        let listen_pool = match (self.config.commit_hints, C::hints()) {
            (true, Hints::Listen(_)) => Some(self.pool.clone()),
            _ => None,
        };
        if !self.config.commit_hints {
            self.config.commit_watchers = 0;
        }
        let url = self.config.url.get_or_insert_with(env_url).clone();
        let producer = Producer::builder().url(url).connect()?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        let workers = self.config.workers;
        Ok(Worker {
            shared: Arc::new(Shared {
                pool: self.pool,
                handlers: self.handlers,
                handler_slots: Arc::new(tokio::sync::Semaphore::new(self.config.workers)),
                config: self.config,
                producer,
                in_flight: Arc::new(AtomicUsize::new(0)),
                stats: Arc::new(Stats::default()),
                waiter: std::sync::OnceLock::new(),
                releaser: std::sync::OnceLock::new(),
                consumer: std::sync::OnceLock::new(),
                consuming: Arc::default(),
                kept: super::kept::Kept::new(workers),
                draining: tokio::sync::watch::channel(false).0,
                location,
                commits: Arc::new(super::waiter::CommitClock::new()),
                listen_pool,
            }),
            shutdown_tx: Arc::new(tx),
            shutdown_rx: rx,
            control: Arc::new(super::signals::Control::new()),
        })
    }
}
