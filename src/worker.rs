//! The worker: a `faktory::Worker` whose handlers first resolve the job's barrier.
//!
//! Fetch slots and handler slots are separate. A fetched job that must wait for its barrier
//! holds a fetch slot (a Tokio task and its Faktory connection) but no thread and no database
//! connection: it registers with the [waiter](crate::waiter), which resolves every pending
//! barrier through at most two connections. Only a job whose barrier committed (or that needs
//! none) takes one of the `workers` handler slots, a blocking thread and a pooled connection.

use crate::backend::{
    diesel_transaction, poison, BarrierConnection, Claim, DieselTransaction, Verdict,
};
use crate::descriptor::{BarrierRef, Descriptor};
use crate::error::{Error, Result, TimeoutInfo};
use crate::handlers::{BarrierMode, Handlers, Registration};
use crate::producer::{env_url, redact, Producer};
use crate::waiter::{self, Answer, WaiterHandle};
use diesel::r2d2::{ConnectionManager, Pool};
use faktory::Job;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A pool of Diesel connections, as the worker uses it.
pub type ConnectionPool<C> = Pool<ConnectionManager<C>>;

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
    url: Option<String>,
    workers: usize,
    max_waiting: usize,
    config: Config,
    hostname: Option<String>,
    labels: Vec<String>,
}

#[derive(Debug, Clone)]
struct Config {
    abort_policy: AbortPolicy,
    block_limit: Duration,
    deadline: Duration,
    snooze_delay: Duration,
    overflow_delay: Duration,
    reconnect_backoff: Duration,
    shutdown_timeout: Duration,
    reap_interval: Duration,
    max_barrier_age: Duration,
    reconcile_grace: Option<Duration>,
}

impl<C: BarrierConnection> fmt::Debug for WorkerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("handlers", &self.handlers)
            .field("url", &self.url.as_deref().map(redact))
            .field("workers", &self.workers)
            .field("max_waiting", &self.max_waiting)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C: BarrierConnection> WorkerBuilder<C> {
    /// A builder whose barriers are resolved with connections from `pool`.
    ///
    /// The worker takes two connections for its waiter (however many jobs wait) and one per
    /// running handler: give the pool at least [`workers`](Self::workers) + 2 connections.
    pub fn new(pool: ConnectionPool<C>) -> Self {
        WorkerBuilder {
            pool,
            handlers: Handlers::new(),
            url: None,
            workers: 4,
            max_waiting: 32,
            config: Config {
                abort_policy: AbortPolicy::Ack,
                block_limit: Duration::from_secs(30),
                deadline: Duration::from_secs(15 * 60),
                snooze_delay: Duration::ZERO,
                overflow_delay: Duration::from_secs(1),
                reconnect_backoff: Duration::from_secs(2),
                shutdown_timeout: Duration::from_secs(10),
                reap_interval: Duration::from_secs(60 * 60),
                max_barrier_age: Duration::from_secs(30 * 24 * 60 * 60),
                reconcile_grace: Some(Duration::from_secs(15 * 60)),
            },
            hostname: None,
            labels: Vec::new(),
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

    /// The Faktory server, as `tcp://[:password@]host:port`.
    ///
    /// Defaults to `FAKTORY_PROVIDER` / `FAKTORY_URL`, else `tcp://localhost:7419`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// How many handlers run at once.
    ///
    /// Defaults to 4.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// How many fetched jobs may wait for their transactions at once, on top of the
    /// [`workers`](Self::workers) handler slots. Waiting costs no thread and no database
    /// connection, but each fetch slot keeps a Faktory connection. A job that would exceed
    /// the limit is snoozed at once, so waiting jobs never keep a ready job from being fetched.
    ///
    /// Defaults to 32.
    pub fn max_waiting(mut self, n: usize) -> Self {
        self.max_waiting = n;
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
    /// running then are failed back to Faktory, which retries them).
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
        self.config.reap_interval = interval;
        self
    }

    /// The age after which a barrier row can no longer be consumed and is deleted by the
    /// reaper. It must exceed the longest time a committed job may still be retried by
    /// Faktory (25 retries span about three weeks).
    ///
    /// Defaults to 30 days.
    pub fn max_barrier_age(mut self, age: Duration) -> Self {
        self.config.max_barrier_age = age;
        self
    }

    /// After how long a committed barrier whose job no worker consumed gets its job pushed
    /// again (see [`reconcile_barriers`](crate::reconcile_barriers)): the cure for a broker
    /// that lost jobs. `None` turns the reconciler off. The worker checks every quarter of the
    /// grace period (at most every minute).
    ///
    /// Defaults to 15 minutes.
    pub fn reconcile_grace(mut self, grace: Option<Duration>) -> Self {
        self.config.reconcile_grace = grace;
        self
    }

    /// The hostname reported to Faktory.
    ///
    /// Defaults to the machine's hostname.
    pub fn hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = Some(hostname.into());
        self
    }

    /// Labels reported to Faktory (shown in its web UI).
    ///
    /// Defaults to none.
    pub fn labels<I: IntoIterator<Item = String>>(mut self, labels: I) -> Self {
        self.labels = labels.into_iter().collect();
        self
    }

    /// Checks the database (the barrier table must exist) and Faktory, and returns the worker.
    pub fn connect(self) -> Result<Worker<C>> {
        let location = {
            let mut conn = self.pool.get()?;
            if !conn.barrier_schema_present()? {
                return Err(Error::MigrationsMissing {
                    table: crate::BARRIER_TABLE,
                });
            }
            for warning in conn.startup_warnings() {
                tracing::warn!(backend = C::NAME, "{warning}");
            }
            conn.barrier_location()?
        };
        let url = self.url.clone().unwrap_or_else(env_url);
        let producer = Producer::builder().url(url.clone()).connect()?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        Ok(Worker {
            shared: Arc::new(Shared {
                pool: self.pool,
                handlers: self.handlers,
                config: self.config,
                producer,
                handler_slots: Arc::new(tokio::sync::Semaphore::new(self.workers)),
                max_waiting: self.max_waiting,
                in_flight: AtomicUsize::new(0),
                stats: Arc::new(Stats::default()),
                waiter: std::sync::OnceLock::new(),
                draining: tokio::sync::watch::channel(false).0,
                location,
            }),
            url,
            workers: self.workers,
            hostname: self.hostname,
            labels: self.labels,
            shutdown_tx: Arc::new(tx),
            shutdown_rx: rx,
        })
    }
}

struct Shared<C: BarrierConnection> {
    pool: ConnectionPool<C>,
    handlers: Handlers<C>,
    config: Config,
    producer: Producer,
    handler_slots: Arc<tokio::sync::Semaphore>,
    max_waiting: usize,
    /// Jobs between fetch and return, for the shutdown drain.
    in_flight: AtomicUsize,
    stats: Arc<Stats>,
    waiter: std::sync::OnceLock<WaiterHandle>,
    /// Set when a shutdown begins: jobs still arriving or waiting are handed back.
    draining: tokio::sync::watch::Sender<bool>,
    /// The barrier table this worker reads, as the backend names it (see
    /// `Backend::barrier_location`).
    location: Option<String>,
}

impl<C: BarrierConnection> Shared<C> {
    fn waiter(&self) -> &WaiterHandle {
        self.waiter
            .get_or_init(|| waiter::start::<C>(self.pool.clone(), Arc::clone(&self.stats.waiting)))
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}

/// Fetches jobs from Faktory and runs each one's handler once its barrier says the producer's
/// transaction committed.
///
/// Build one with [`WorkerBuilder`], then call [`run`](Worker::run) (it blocks). Stop it with a
/// [`ShutdownHandle`] from [`shutdown_handle`](Worker::shutdown_handle), or from Faktory's web
/// UI.
pub struct Worker<C: BarrierConnection> {
    shared: Arc<Shared<C>>,
    url: String,
    workers: usize,
    hostname: Option<String>,
    labels: Vec<String>,
    shutdown_tx: Arc<tokio::sync::watch::Sender<bool>>,
    shutdown_rx: tokio::sync::watch::Receiver<bool>,
}

impl<C: BarrierConnection> fmt::Debug for Worker<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("url", &redact(&self.url))
            .field("workers", &self.workers)
            .field("handlers", &self.shared.handlers)
            .finish_non_exhaustive()
    }
}

/// Asks a running [`Worker`] to stop. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: Arc<tokio::sync::watch::Sender<bool>>,
}

impl ShutdownHandle {
    /// Asks the worker to stop: waiting jobs are handed back to Faktory at once, running
    /// handlers may finish (within the shutdown timeout), and [`Worker::run`] returns.
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}

#[derive(Debug, Default)]
struct Stats {
    waiting: Arc<AtomicUsize>,
    running: AtomicUsize,
    ran: AtomicU64,
    aborted: AtomicU64,
    duplicates: AtomicU64,
    snoozed: AtomicU64,
    timed_out: AtomicU64,
    failed: AtomicU64,
    processed: AtomicU64,
}

/// Reads a [`Worker`]'s counters; cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct WorkerMonitor {
    stats: Arc<Stats>,
}

impl WorkerMonitor {
    /// Jobs fetched and now waiting for their transactions.
    pub fn waiting(&self) -> usize {
        self.stats.waiting.load(Ordering::SeqCst)
    }

    /// Handlers running now.
    pub fn running(&self) -> usize {
        self.stats.running.load(Ordering::SeqCst)
    }

    /// Handlers that ran to success (and consumed their barrier, if any).
    pub fn ran(&self) -> u64 {
        self.stats.ran.load(Ordering::SeqCst)
    }

    /// Jobs whose transaction did not commit (or whose barrier was already consumed).
    pub fn aborted(&self) -> u64 {
        self.stats.aborted.load(Ordering::SeqCst)
    }

    /// Deliveries skipped because another delivery of the same job already consumed the
    /// barrier.
    pub fn duplicates(&self) -> u64 {
        self.stats.duplicates.load(Ordering::SeqCst)
    }

    /// Jobs snoozed (pushed again and acknowledged) because they waited too long, too many were
    /// waiting, or the worker was shutting down.
    pub fn snoozed(&self) -> u64 {
        self.stats.snoozed.load(Ordering::SeqCst)
    }

    /// Jobs failed with [`Error::BarrierTimeout`].
    pub fn timed_out(&self) -> u64 {
        self.stats.timed_out.load(Ordering::SeqCst)
    }

    /// Deliveries that ended in a failure reported to Faktory (any error).
    pub fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::SeqCst)
    }

    /// Deliveries processed to the end, whatever the outcome.
    pub fn processed(&self) -> u64 {
        self.stats.processed.load(Ordering::SeqCst)
    }
}

/// Why [`Worker::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// [`ShutdownHandle::shutdown`] was called.
    Shutdown,
    /// Faktory told the worker to terminate.
    ServerInstruction,
}

impl<C: BarrierConnection> Worker<C> {
    /// A handle that stops this worker from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: Arc::clone(&self.shutdown_tx),
        }
    }

    /// A handle that reads this worker's counters from any thread.
    pub fn monitor(&self) -> WorkerMonitor {
        WorkerMonitor {
            stats: Arc::clone(&self.shared.stats),
        }
    }

    /// Fetches and processes jobs from `queues` (in priority order) until shut down.
    ///
    /// Blocks the calling thread. If the connection to Faktory fails, it reconnects after the
    /// configured backoff and goes on. Safe to call from inside a Tokio runtime (it then runs
    /// on a thread of its own).
    pub fn run<Q: AsRef<str>>(&mut self, queues: &[Q]) -> Result<StopReason> {
        let queues: Vec<String> = queues.iter().map(|q| q.as_ref().to_string()).collect();
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|s| {
                s.spawn(|| self.run_blocking(&queues))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
        } else {
            self.run_blocking(&queues)
        }
    }

    fn run_blocking(&mut self, queues: &[String]) -> Result<StopReason> {
        let fetch_slots = self.workers + self.shared.max_waiting;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(self.workers + 16)
            .thread_name("dtb-worker")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot build a Tokio runtime: {e}")))?;
        let reaper = self.start_reaper();
        let result = runtime.block_on(self.run_async(queues, fetch_slots));
        if let Some(waiter) = self.shared.waiter.get() {
            waiter.stop();
        }
        drop(reaper);
        runtime.shutdown_timeout(Duration::from_secs(5));
        result
    }

    /// The maintenance thread: the reaper and the reconciler.
    fn start_reaper(&self) -> Option<Reaper> {
        let cfg = self.shared.config.clone();
        let reconcile_every = cfg
            .reconcile_grace
            .map(|g| (g / 4).clamp(Duration::from_millis(50), Duration::from_secs(60)));
        if cfg.reap_interval.is_zero() && reconcile_every.is_none() {
            return None;
        }
        let tick = [
            Some(cfg.reap_interval).filter(|d| !d.is_zero()),
            reconcile_every,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(60));
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("dtb-maintenance".into())
            .spawn(move || {
                let mut next_reap = Instant::now() + cfg.reap_interval;
                let mut next_reconcile = Instant::now() + reconcile_every.unwrap_or_default();
                loop {
                    match stop_rx.recv_timeout(tick) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let now = Instant::now();
                    let reap = !cfg.reap_interval.is_zero() && now >= next_reap;
                    let reconcile = reconcile_every.is_some() && now >= next_reconcile;
                    if !reap && !reconcile {
                        continue;
                    }
                    let mut conn = match shared.pool.get() {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %e, "maintenance: no database connection");
                            continue;
                        }
                    };
                    if reap {
                        next_reap = now + cfg.reap_interval;
                        if let Err(e) = crate::reap_barriers(&mut *conn, cfg.max_barrier_age) {
                            tracing::warn!(error = %e, "reaping old barriers failed");
                        }
                    }
                    if let (true, Some(grace), Some(every)) =
                        (reconcile, cfg.reconcile_grace, reconcile_every)
                    {
                        next_reconcile = now + every;
                        if let Err(e) = crate::reconcile_barriers(
                            &mut *conn,
                            &shared.producer,
                            grace,
                            cfg.max_barrier_age,
                        ) {
                            tracing::warn!(error = %e, "reconciling unconsumed barriers failed");
                        }
                    }
                }
            })
            .ok()
            .map(|_| Reaper(stop_tx))
    }

    async fn run_async(&mut self, queues: &[String], fetch_slots: usize) -> Result<StopReason> {
        let mut shutdown = self.shutdown_rx.clone();
        tracing::info!(
            url = %redact(&self.url),
            queues = ?queues,
            handlers = self.workers,
            fetch_slots,
            kinds = ?self.shared.handlers,
            "worker starting"
        );
        loop {
            if *shutdown.borrow() {
                return Ok(StopReason::Shutdown);
            }
            let mut builder = faktory::WorkerBuilder::<Error>::default().workers(fetch_slots);
            if let Some(h) = &self.hostname {
                builder = builder.hostname(h.clone());
            }
            builder = builder.labels(self.labels.clone());
            for kind in self.shared.handlers.kinds() {
                let shared = Arc::clone(&self.shared);
                builder = builder.register_fn(kind, move |job| {
                    let shared = Arc::clone(&shared);
                    async move { process(shared, job).await }
                });
            }
            let shared = Arc::clone(&self.shared);
            let mut signal = shutdown.clone();
            builder = builder
                .with_graceful_shutdown(async move {
                    let _ = signal.wait_for(|stop| *stop).await;
                    drain(&shared).await;
                })
                .shutdown_timeout(Duration::from_secs(5));

            // faktory's clients say END when dropped and panic if the connection is already
            // broken (as after a Faktory restart), which can take `run` down with them: run it
            // on a task of its own, so that such a panic ends this attempt, not the worker.
            let url = self.url.clone();
            let queues_owned = queues.to_vec();
            let attempt = tokio::spawn(async move {
                let outcome = match builder.connect_to(&url).await {
                    Ok(mut worker) => {
                        let outcome = worker.run(&queues_owned).await;
                        // A worker whose connection broke panics when dropped: keep that
                        // inside this task.
                        drop(worker);
                        outcome
                    }
                    Err(e) => Err(e),
                };
                outcome.map_err(|e| e.to_string())
            });
            let outcome = attempt
                .await
                .unwrap_or_else(|e| Err(format!("the faktory worker failed: {e}")));
            // The fetch tasks faktory aborted are dropped when the runtime next polls them; let
            // that happen now, while their connections can still say END.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let failure = match outcome {
                Ok(details) => {
                    return Ok(match details.reason {
                        faktory::StopReason::GracefulShutdown => StopReason::Shutdown,
                        _ => StopReason::ServerInstruction,
                    });
                }
                Err(e) => e,
            };
            tracing::warn!(error = %failure, backoff = ?self.shared.config.reconnect_backoff, "lost the connection to faktory; reconnecting");
            tokio::select! {
                _ = tokio::time::sleep(self.shared.config.reconnect_backoff) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        }
    }
}

struct Reaper(#[allow(dead_code)] crossbeam_channel::Sender<()>);

/// The first half of a shutdown: waiting jobs are handed back, new ones too, and running
/// handlers get up to the shutdown timeout to finish. Then faktory's own graceful shutdown
/// fails whatever is still running.
async fn drain<C: BarrierConnection>(shared: &Shared<C>) {
    shared.draining.send_replace(true);
    if let Some(waiter) = shared.waiter.get() {
        waiter.stop();
    }
    let deadline = Instant::now() + shared.config.shutdown_timeout;
    while shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let the last acknowledgements reach Faktory before it is told to fail what runs.
    tokio::time::sleep(Duration::from_millis(50)).await;
    tracing::info!(
        still_running = shared.in_flight.load(Ordering::SeqCst),
        "worker drained"
    );
}

struct InFlight<'a>(&'a AtomicUsize);

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Processes one job, on a Tokio task of the faktory worker.
async fn process<C: BarrierConnection>(shared: Arc<Shared<C>>, job: Job) -> Result<()> {
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let _in_flight = InFlight(&shared.in_flight);
    tracing::trace!(jid = job.id().as_str(), kind = %job.kind, "job fetched");
    let result = process_inner(&shared, job).await;
    if result.is_err() {
        shared.stats.failed.fetch_add(1, Ordering::SeqCst);
    }
    shared.stats.processed.fetch_add(1, Ordering::SeqCst);
    result
}

async fn process_inner<C: BarrierConnection>(shared: &Arc<Shared<C>>, job: Job) -> Result<()> {
    let Some(reg) = shared.handlers.get(&job.kind).cloned() else {
        // faktory only calls us for kinds we registered.
        return Err(Error::Config(format!("no handler for {}", job.kind)));
    };
    let descriptor = Descriptor::from_job(&job).inspect_err(|e| {
        tracing::error!(jid = job.id().as_str(), kind = %job.kind, error = %e, "malformed barrier");
    })?;
    match descriptor {
        None if reg.mode == BarrierMode::Required => {
            tracing::error!(jid = job.id().as_str(), kind = %job.kind, "job pushed without a barrier");
            Err(Error::BarrierRequired {
                kind: job.kind.clone(),
                jid: job.id().to_string(),
            })
        }
        None | Some(Descriptor::NoWait) => {
            if shared.is_draining() {
                return hand_back(shared, &job, None, "shutting down");
            }
            run_on_pool(shared, reg, job, None).await
        }
        Some(Descriptor::Barrier(b)) => {
            if b.backend != C::NAME {
                return Err(Error::MalformedBarrier {
                    jid: job.id().to_string(),
                    reason: format!(
                        "the barrier lives on backend {:?}, this worker resolves {:?}",
                        truncated(&b.backend),
                        C::NAME
                    ),
                });
            }
            if let (Some(theirs), Some(ours)) = (&b.db, &shared.location) {
                if theirs != ours {
                    // The row is in a table this worker cannot see: waiting would end in "not
                    // committed" for a transaction that may well have committed.
                    tracing::error!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, barrier_table = %theirs, worker_table = %ours, "the barrier is in another barrier table");
                    return Err(Error::BarrierElsewhere {
                        jid: job.id().to_string(),
                        barrier_table: theirs.clone(),
                        worker_table: ours.clone(),
                    });
                }
            }
            run_barrier(shared, reg, job, b).await
        }
    }
}

fn truncated(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

async fn run_barrier<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    reg: Registration<C>,
    job: Job,
    b: BarrierRef,
) -> Result<()> {
    let cfg = &shared.config;
    if shared.is_draining() {
        return hand_back(shared, &job, Some(&b), "shutting down");
    }
    let waiter = shared.waiter();
    if waiter.waiting() >= shared.max_waiting {
        return hand_back(shared, &job, Some(&b), "too many jobs waiting");
    }
    let age = job_age(&job);
    let limit = cfg
        .block_limit
        .min(cfg.deadline.saturating_sub(age))
        .max(Duration::from_millis(50));
    let started = Instant::now();
    let (rx, waiting) = waiter.register(b.id, b.txid.clone());
    let answer = match tokio::time::timeout(limit, rx).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(_)) => Answer::ShuttingDown,
        Err(_) => Answer::Verdict(Verdict::Pending),
    };
    drop(waiting);
    let waited = started.elapsed();
    tracing::debug!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, ?answer, ?waited, "barrier wait ended");
    match answer {
        Answer::ShuttingDown => hand_back(shared, &job, Some(&b), "shutting down"),
        Answer::Verdict(Verdict::Pending) => {
            if age + waited >= cfg.deadline {
                shared.stats.timed_out.fetch_add(1, Ordering::SeqCst);
                return Err(timed_out(shared, &job, &b, age + waited).await);
            }
            shared.stats.snoozed.fetch_add(1, Ordering::SeqCst);
            snooze(
                shared,
                &job,
                Some(&b),
                cfg.snooze_delay,
                "block limit reached",
            )
        }
        Answer::Verdict(Verdict::NotCommitted) => {
            shared.stats.aborted.fetch_add(1, Ordering::SeqCst);
            tracing::info!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, "transaction did not commit (or the barrier was already consumed): job aborted");
            match cfg.abort_policy {
                AbortPolicy::Ack => Ok(()),
                AbortPolicy::Fail => Err(Error::Aborted {
                    barrier_id: b.id.to_string(),
                    jid: job.id().to_string(),
                }),
            }
        }
        Answer::Verdict(Verdict::Committed) => run_on_pool(shared, reg, job, Some(b)).await,
    }
}

async fn timed_out<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    job: &Job,
    b: &BarrierRef,
    age: Duration,
) -> Error {
    let (shared2, id, txid) = (Arc::clone(shared), b.id, b.txid.clone());
    let transaction = tokio::task::spawn_blocking(move || {
        let mut conn = shared2.pool.get().map_err(|e| e.to_string())?;
        conn.transaction_info(&id, txid.as_deref())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r)
    .unwrap_or_else(|e| Some(format!("unavailable ({e})")));
    let info = TimeoutInfo {
        barrier_id: b.id.to_string(),
        jid: job.id().to_string(),
        age,
        txid: b.txid.clone(),
        transaction,
    };
    tracing::warn!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, info = %info, "barrier timed out");
    Error::BarrierTimeout(Box::new(info))
}

enum Outcome {
    Ran,
    Duplicate,
    Busy,
}

/// Takes a handler slot and runs the job on a blocking thread with a pooled connection: for a
/// barrier job, inside the worker transaction that claims and deletes the barrier row.
async fn run_on_pool<C: BarrierConnection>(
    shared: &Arc<Shared<C>>,
    reg: Registration<C>,
    job: Job,
    barrier: Option<BarrierRef>,
) -> Result<()> {
    let _slot = Arc::clone(&shared.handler_slots)
        .acquire_owned()
        .await
        .map_err(|_| Error::Config("handler slots closed".into()))?;
    let shared2 = Arc::clone(shared);
    let job2 = job.clone();
    let b2 = barrier.clone();
    let slot_taken = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        shared2.stats.running.fetch_add(1, Ordering::SeqCst);
        let _running = Decrement(&shared2.stats.running);
        let mut conn = shared2.pool.get()?;
        let mut lost = false;
        let result = C::worker_transaction(&mut *conn, |c| -> Result<Outcome> {
            if let Some(b) = &b2 {
                match c.claim_barrier(&b.id)? {
                    Claim::Gone => return Ok(Outcome::Duplicate),
                    Claim::Busy => return Ok(Outcome::Busy),
                    Claim::Locked => {}
                }
            }
            call_handler(&reg, &job2, c)?;
            if let Some(b) = &b2 {
                // The barrier's deletion must commit with the handler's writes: the handler
                // must not have lost the transaction (a deadlock, an implicit commit, a
                // `COMMIT` sent as SQL), or "ran" would be a lie.
                let intact = matches!(
                    diesel_transaction(c),
                    DieselTransaction::Open {
                        depth: 1,
                        must_roll_back: false
                    }
                );
                if !intact || !c.claim_holds(&b.id)? {
                    lost = true;
                    return Err(Error::TransactionEnded {
                        context: "while the handler ran",
                    });
                }
            }
            Ok(Outcome::Ran)
        });
        let result = if lost {
            // Whatever the rollback attempt answered, this is what happened; and the
            // connection's state no longer matches Diesel's: let the pool discard it.
            poison(&mut *conn);
            tracing::error!(jid = job2.id().as_str(), kind = %job2.kind, "the handler's transaction was ended by the database; the delivery fails and will be retried");
            Err(Error::TransactionEnded {
                context: "while the handler ran",
            })
        } else {
            result
        };
        if let (Err(Error::Handler { .. } | Error::HandlerPanic { .. }), Some(b)) = (&result, &b2) {
            // The job now lives in Faktory's retries: keep the reconciler off it.
            if let Err(e) = conn.mark_attempted(&b.id) {
                tracing::warn!(barrier_id = %b.id, error = %e, "could not mark the barrier attempted");
            }
        }
        result
    })
    .await
    .map_err(|e| Error::HandlerPanic {
        jid: job.id().to_string(),
        message: e.to_string(),
    })??;
    match &outcome {
        Outcome::Ran => &shared.stats.ran,
        Outcome::Duplicate => &shared.stats.duplicates,
        Outcome::Busy => &shared.stats.snoozed,
    }
    .fetch_add(1, Ordering::SeqCst);
    match (outcome, &barrier) {
        (Outcome::Ran, Some(b)) => {
            tracing::debug!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, took = ?slot_taken.elapsed(), "handler ran; barrier consumed");
            Ok(())
        }
        (Outcome::Ran, None) => {
            tracing::debug!(jid = job.id().as_str(), kind = %job.kind, took = ?slot_taken.elapsed(), "handler ran (no barrier)");
            Ok(())
        }
        (Outcome::Duplicate, b) => {
            tracing::info!(barrier_id = ?b.as_ref().map(|b| b.id), jid = job.id().as_str(), kind = %job.kind, "barrier already consumed: duplicate delivery skipped");
            Ok(())
        }
        (Outcome::Busy, b) => snooze(
            shared,
            &job,
            b.as_ref(),
            shared.config.snooze_delay,
            "another delivery holds the barrier",
        ),
    }
}

fn call_handler<C: BarrierConnection>(
    reg: &Registration<C>,
    job: &Job,
    conn: &mut C,
) -> Result<()> {
    match catch_unwind(AssertUnwindSafe(|| (reg.handler)(job, conn))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(Error::Handler {
            jid: job.id().to_string(),
            source,
        }),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic payload".into());
            tracing::error!(jid = job.id().as_str(), kind = %job.kind, %message, "handler panicked");
            Err(Error::HandlerPanic {
                jid: job.id().to_string(),
                message,
            })
        }
    }
}

/// How long ago the job was created (or first enqueued).
fn job_age(job: &Job) -> Duration {
    let since = job.created_at.or(job.enqueued_at);
    since
        .and_then(|t| (chrono::Utc::now() - t).to_std().ok())
        .unwrap_or_default()
}

/// How far ahead jobs handed back at shutdown are scheduled; see [`hand_back`].
const SHUTDOWN_HAND_BACK_DELAY: Duration = Duration::from_secs(4);

/// The custom key that counts how often a job was snoozed.
pub(crate) const SNOOZES_KEY: &str = "transaction_barrier_snoozes";

/// Hands a job back to Faktory without running it (shutdown, or too many waiting).
///
/// On shutdown the copy is scheduled a few seconds ahead: `FETCH`es this worker issued just
/// before it stopped are still blocked on the server (for up to 2 s), and a job handed to a
/// connection that has since closed stays reserved until its `reserve_for` runs out.
fn hand_back<C: BarrierConnection>(
    shared: &Shared<C>,
    job: &Job,
    b: Option<&BarrierRef>,
    why: &str,
) -> Result<()> {
    let floor = if shared.is_draining() {
        SHUTDOWN_HAND_BACK_DELAY
    } else {
        shared.config.overflow_delay
    };
    let delay = shared.config.snooze_delay.max(floor);
    shared.stats.snoozed.fetch_add(1, Ordering::SeqCst);
    snooze(shared, job, b, delay, why)
}

/// Pushes a copy of `job` (same payload, new jid, `at` = now + `delay` when positive) and lets
/// this delivery be acknowledged.
///
/// If the worker dies between the push and the ACK, both copies exist: the barrier row's
/// consumption makes sure the handler runs for one of them only.
fn snooze<C: BarrierConnection>(
    shared: &Shared<C>,
    job: &Job,
    b: Option<&BarrierRef>,
    delay: Duration,
    why: &str,
) -> Result<()> {
    let mut value = serde_json::to_value(job).map_err(|e| {
        Error::Config(format!(
            "cannot serialise job {} for snoozing: {e}",
            job.id().as_str()
        ))
    })?;
    let obj = value
        .as_object_mut()
        .expect("a job serialises to a JSON object");
    let jid = faktory::JobId::random();
    obj.insert("jid".into(), serde_json::Value::from(jid.to_string()));
    obj.remove("enqueued_at");
    let snoozes = job
        .custom
        .get(SNOOZES_KEY)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
        + 1;
    obj.entry("custom")
        .or_insert_with(|| serde_json::Value::Object(Default::default()))
        .as_object_mut()
        .map(|custom| custom.insert(SNOOZES_KEY.into(), serde_json::Value::from(snoozes)));
    if delay.is_zero() {
        obj.remove("at");
    } else {
        let at = chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        obj.insert("at".into(), serde_json::to_value(at).unwrap_or_default());
    }
    let copy: Job = serde_json::from_value(value).map_err(|e| {
        Error::Config(format!(
            "cannot rebuild job {} for snoozing: {e}",
            job.id().as_str()
        ))
    })?;
    shared.producer.push_barrier_job(copy)?;
    tracing::info!(barrier_id = ?b.map(|b| b.id), jid = job.id().as_str(), new_jid = jid.as_str(), kind = %job.kind, snoozes, reason = why, "job snoozed");
    Ok(())
}
