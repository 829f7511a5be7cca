//! The worker: a `faktory::Worker` whose handlers first resolve the job's barrier.
//!
//! Fetch slots and handler slots are separate. A fetched job that must wait for its barrier
//! holds a fetch slot (a Tokio task and its Faktory connection) but no thread and no database
//! connection: it registers with the [waiter](waiter), which resolves every pending barrier
//! through at most two database connections. Only a job whose barrier committed (or that needs
//! none) takes one of the `workers` handler slots, a blocking thread and a pooled connection.
//!
//! * `builder.rs` — [`WorkerBuilder`], every setting (`Config`) and the checks made before
//!   connecting;
//! * `process.rs` — one delivery, on a Tokio task: descriptor → wait → handler slot, and how
//!   each outcome is counted and reported;
//! * `run.rs` — the handler's run, on a blocking thread: claim, handler, commit;
//! * `waiter/` — the thread that resolves every pending barrier;
//! * `snooze.rs` — handing a delivery back to Faktory;
//! * `retries.rs` — when Faktory brings a failed job back;
//! * `phases.rs` — the timings of a handler's run;
//! * `monitor.rs` — counters, the shutdown handle, why the worker stopped;
//! * `signals.rs` — SIGTERM, SIGINT and SIGTSTP (`WorkerBuilder::handle_signals`);
//! * this file — [`Worker`]: the run loop, reconnecting, and the graceful drain.

mod builder;
mod detached;
mod kept;
mod monitor;
pub(crate) mod parking;
pub(crate) mod phases;
mod process;
mod retries;
mod run;
mod signals;
mod snooze;
mod waiter;

pub use builder::{AbortPolicy, WorkerBuilder};
pub use monitor::{ShutdownHandle, StopReason, WorkerMonitor};
pub use signals::Signal;

use crate::backend::{BarrierConnection, ConnectionPool};
use crate::error::{Error, Result};
use crate::handlers::Handlers;
use crate::maintenance::Maintenance;
use crate::producer::{redact, Producer};
use builder::Config;
use monitor::Stats;
use signals::Control;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use waiter::WaiterHandle;

/// What the worker's tasks share.
struct Shared<C: BarrierConnection> {
    pool: ConnectionPool<C>,
    handlers: Handlers<C>,
    config: Config,
    producer: Producer,
    handler_slots: Arc<tokio::sync::Semaphore>,
    /// Jobs between fetch and return, for the shutdown drain.
    in_flight: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    waiter: std::sync::OnceLock<WaiterHandle>,
    /// Where the waiter's parked jobs go once decided (started with the waiter, when it parks).
    releaser: std::sync::OnceLock<parking::Releaser>,
    /// Deletes the barriers of handlers without a connection (started when first needed).
    consumer: std::sync::OnceLock<detached::Consumer>,
    /// Barriers being run or deleted by handlers without a connection.
    consuming: Arc<detached::Consuming>,
    /// Connections kept from one handler run to the next.
    kept: kept::Kept<C>,
    /// Set when a shutdown begins: jobs still arriving or waiting are handed back.
    draining: tokio::sync::watch::Sender<bool>,
    /// The barrier table this worker reads, as the backend names it (see
    /// `Backend::barrier_location`).
    location: Option<String>,
    /// When the worker's own writes last committed: proofs of durability for the waiter.
    commits: Arc<waiter::CommitClock>,
    /// Where the waiter's listening connection comes from; `None`: no commit hints.
    listen_pool: Option<ConnectionPool<C>>,
}

impl<C: BarrierConnection> Shared<C> {
    /// The consumer thread of handlers without a connection, started when first needed.
    fn consumer(&self) -> &detached::Consumer {
        self.consumer.get_or_init(|| {
            // Its deletions are durable when they return: each proves what the waiter saw
            // before it began.
            let proves = matches!(C::durability(), crate::backend::Durability::Proven(_));
            detached::Consumer::start(self.pool.clone(), Arc::clone(&self.commits), proves)
        })
    }

    fn waiter(&self) -> &WaiterHandle {
        self.waiter.get_or_init(|| {
            let schedule = match self.config.check_interval {
                Some(interval) => C::CHECKS.with_max(interval),
                None => C::CHECKS,
            };
            waiter::start::<C>(waiter::WaiterConfig {
                pool: self.pool.clone(),
                listen_pool: self.listen_pool.clone(),
                watchers: self.config.commit_watchers,
                schedule,
                limits: self.limits(),
                releaser: self.parks().then(|| {
                    self.releaser
                        .get_or_init(|| {
                            parking::Releaser::start(
                                self.producer.clone(),
                                Arc::clone(&self.stats),
                                self.config.overflow_delay,
                            )
                        })
                        .clone()
                }),
                parked: Arc::clone(&self.stats.parked),
                hearing: Arc::clone(&self.stats.hearing_hints),
                waiting: Arc::clone(&self.stats.waiting),
                clock: Arc::clone(&self.commits),
                running: Arc::clone(&self.stats.running),
            })
        })
    }

    fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Whether the worker parks jobs of running transactions: only while its reconciler runs,
    /// which pushes a parked job again should the worker die with it.
    fn parks(&self) -> bool {
        self.config.max_parked > 0 && self.config.maintenance.reconcile_grace.is_some()
    }

    /// How many deliveries may wait in fetch slots, and parked.
    fn limits(&self) -> waiter::Limits {
        let max_waiting = self.config.max_waiting;
        waiter::Limits {
            max_waiting,
            per_transaction: (max_waiting / 4).max(1),
            max_parked: if self.parks() {
                self.config.max_parked
            } else {
                0
            },
            park_for: self.config.block_limit,
        }
    }

    /// From now on, jobs that arrive are handed back (quiet, or a shutdown began).
    fn stop_taking_jobs(&self) {
        self.draining.send_replace(true);
        self.stats.quiet.store(true, Ordering::SeqCst);
    }
}

/// Fetches jobs from Faktory and runs each one's handler once its barrier says the producer's
/// transaction committed.
///
/// Build one with [`Worker::builder`], then call [`run`](Worker::run) (it blocks). Stop it
/// with a [`ShutdownHandle`] from [`shutdown_handle`](Worker::shutdown_handle), or from
/// Faktory's web UI.
pub struct Worker<C: BarrierConnection> {
    shared: Arc<Shared<C>>,
    shutdown_tx: Arc<tokio::sync::watch::Sender<bool>>,
    shutdown_rx: tokio::sync::watch::Receiver<bool>,
    control: Arc<Control>,
}

impl<C: BarrierConnection> fmt::Debug for Worker<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("url", &redact(self.url()))
            .field("workers", &self.shared.config.workers)
            .field("handlers", &self.shared.handlers)
            .finish_non_exhaustive()
    }
}

impl<C: BarrierConnection> Worker<C> {
    /// A [`WorkerBuilder`] whose barriers are resolved with connections from `pool`.
    pub fn builder(pool: ConnectionPool<C>) -> WorkerBuilder<C> {
        WorkerBuilder::new(pool)
    }
}

impl<C: BarrierConnection> Worker<C> {
    /// The Faktory server's URL, as `connect` resolved it.
    fn url(&self) -> &str {
        self.shared.config.url.as_deref().unwrap_or_default()
    }

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
        let config = &self.shared.config;
        let fetch_slots = config.workers + config.max_waiting;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(config.workers + 16)
            .thread_name("dtb-worker")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let maintenance = Maintenance::start(
            self.shared.pool.clone(),
            self.shared.producer.clone(),
            &self.shared.config.maintenance,
        );
        let result = runtime.block_on(self.run_async(queues, fetch_slots));
        self.shared.stats.connected.store(false, Ordering::SeqCst);
        if let Some(waiter) = self.shared.waiter.get() {
            waiter.stop();
        }
        drop(maintenance);
        // Handlers still running now were failed back to Faktory (a stop at once, or past the
        // shutdown timeout): they are not waited for.
        let abandoned =
            self.control.immediate() || self.shared.stats.running.load(Ordering::SeqCst) > 0;
        runtime.shutdown_timeout(if abandoned {
            Duration::ZERO
        } else {
            LAST_WORDS
        });
        result
    }

    async fn run_async(&mut self, queues: &[String], fetch_slots: usize) -> Result<StopReason> {
        let mut shutdown = self.shutdown_rx.clone();
        let config = &self.shared.config;
        let _signals = match config.handle_signals {
            true => Some(
                signals::listen(Arc::clone(&self.control), Arc::clone(&self.shutdown_tx))
                    .map_err(Error::Signals)?,
            ),
            false => None,
        };
        tracing::info!(
            url = %redact(self.url()),
            queues = ?queues,
            handlers = config.workers,
            fetch_slots,
            kinds = ?self.shared.handlers,
            signals = config.handle_signals,
            "worker starting"
        );
        loop {
            if *shutdown.borrow() {
                return Ok(self.control.reason(StopReason::Shutdown));
            }
            if self.control.is_quiet() {
                // Quiet, with nothing left of its own: no connection until it is stopped.
                self.shared.stop_taking_jobs();
                tracing::info!("worker quiet and idle; waiting to be stopped");
                let _ = shutdown.wait_for(|stop| *stop).await;
                return Ok(self.control.reason(StopReason::Shutdown));
            }
            let config = &self.shared.config;
            let mut builder = faktory::WorkerBuilder::<Error>::default().workers(fetch_slots);
            if let Some(h) = &config.hostname {
                builder = builder.hostname(h.clone());
            }
            builder = builder.labels(config.labels.clone());
            for kind in self.shared.handlers.kinds() {
                let shared = Arc::clone(&self.shared);
                let control = Arc::clone(&self.control);
                let stop = shutdown.clone();
                builder = builder.register_fn(kind, move |job| {
                    let shared = Arc::clone(&shared);
                    let control = Arc::clone(&control);
                    let stop = stop.clone();
                    async move {
                        if control.holds_new_jobs() {
                            hold(&shared, &control, stop).await;
                        }
                        process::process(shared, job).await
                    }
                });
            }
            let shared = Arc::clone(&self.shared);
            let control = Arc::clone(&self.control);
            let mut signal = shutdown.clone();
            let quiet_signal = shutdown.clone();
            builder = builder
                .with_graceful_shutdown(async move {
                    tokio::select! {
                        _ = signal.wait_for(|stop| *stop) => {}
                        () = quiet_until_idle(&shared, &control, quiet_signal) => {}
                    }
                    drain(&shared, &control).await;
                })
                .shutdown_timeout(LAST_WORDS);

            // faktory's clients say END when dropped and panic if the connection is already
            // broken (as after a Faktory restart), which can take `run` down with them: run it
            // on a task of its own, so that such a panic ends this attempt, not the worker.
            let url = self.url().to_string();
            let queues_owned = queues.to_vec();
            let stats = Arc::clone(&self.shared.stats);
            let attempt = tokio::spawn(async move {
                let outcome = match builder.connect_to(&url).await {
                    Ok(mut worker) => {
                        stats.connected.store(true, Ordering::SeqCst);
                        let outcome = worker.run(&queues_owned).await;
                        stats.connected.store(false, Ordering::SeqCst);
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
            self.shared.stats.connected.store(false, Ordering::SeqCst);
            // The fetch tasks faktory aborted are dropped when the runtime next polls them; let
            // that happen now, while their connections can still say END.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let failure = match outcome {
                Ok(details) => match details.reason {
                    // A quiet run that ended: the loop waits for the stop.
                    faktory::StopReason::GracefulShutdown if !*shutdown.borrow() => continue,
                    faktory::StopReason::GracefulShutdown => {
                        return Ok(self.control.reason(StopReason::Shutdown))
                    }
                    _ => return Ok(self.control.reason(StopReason::ServerInstruction)),
                },
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

/// How long a stopping worker gives faktory, once the drain is over (all jobs answered, or the
/// shutdown timeout passed), to fail back the jobs that still run and to say goodbye: a
/// shutdown takes at most `shutdown_timeout` and this.
const LAST_WORDS: Duration = Duration::from_secs(1);

/// The first half of a shutdown: waiting jobs are handed back, new ones too, and running
/// handlers get up to the shutdown timeout to finish (no time at all after a second stop
/// signal). Then faktory's own graceful shutdown fails whatever is still running.
async fn drain<C: BarrierConnection>(shared: &Shared<C>, control: &Control) {
    shared.stop_taking_jobs();
    control.release();
    if let Some(waiter) = shared.waiter.get() {
        waiter.stop();
    }
    let deadline = Instant::now() + shared.config.shutdown_timeout;
    // Deliveries still between fetch and answer, and parked jobs not yet handed back.
    let in_flight = || {
        let waiter_busy = shared
            .waiter
            .get()
            .is_some_and(|waiter| !waiter.is_stopped());
        shared.in_flight.load(Ordering::SeqCst)
            + control.held.load(Ordering::SeqCst)
            + usize::from(waiter_busy)
            + shared.releaser.get().map_or(0, parking::Releaser::pending)
    };
    while in_flight() > 0 && Instant::now() < deadline && !control.immediate() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !control.immediate() {
        // Let the last acknowledgements reach Faktory before it is told to fail what runs.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(still_running = in_flight(), "worker drained");
}

/// Resolves once the worker is quiet (SIGTSTP) and nothing it took before is left; the jobs
/// its fetch slots took since then are then released. Pending while no stop was asked for.
async fn quiet_until_idle<C: BarrierConnection>(
    shared: &Shared<C>,
    control: &Control,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    control.quieted().await;
    shared.stop_taking_jobs();
    while shared.in_flight.load(Ordering::SeqCst) > 0 {
        let stopped = tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => false,
            stopped = async { stop.wait_for(|stop| *stop).await.is_ok() } => stopped,
        };
        if stopped {
            // The drain takes over.
            std::future::pending::<()>().await;
        }
    }
    tracing::info!(
        held = control.held.load(Ordering::SeqCst),
        "quiet worker has finished what it ran; closing its faktory connections"
    );
}

/// Holds a job fetched while the worker is quiet, without running it, until what the worker
/// runs has finished, a stop begins or the block limit passes; it then goes to `process`,
/// which hands it back to Faktory. Its fetch slot fetches nothing meanwhile.
async fn hold<C: BarrierConnection>(
    shared: &Shared<C>,
    control: &Control,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let _held = monitor::Gauge::up(&control.held, None);
    tokio::select! {
        () = control.released() => {}
        _ = stop.wait_for(|stop| *stop) => {}
        () = tokio::time::sleep(shared.config.block_limit) => {}
    }
}
