//! The worker: a `faktory::Worker` whose handlers first resolve the job's barrier.

use crate::backend::{BarrierConnection, Claim, Verdict};
use crate::descriptor::{BarrierRef, Descriptor};
use crate::error::{Error, Result, TimeoutInfo};
use crate::handlers::{BarrierMode, Handlers, Registration};
use crate::producer::{env_url, redact, Producer};
use diesel::r2d2::{ConnectionManager, Pool};
use faktory::Job;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
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
    reconnect_backoff: Duration,
}

impl<C: BarrierConnection> fmt::Debug for WorkerBuilder<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("handlers", &self.handlers)
            .field("url", &self.url.as_deref().map(redact))
            .field("workers", &self.workers)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<C: BarrierConnection> WorkerBuilder<C> {
    /// A builder whose barriers are resolved with connections from `pool`.
    ///
    /// Each job waiting for a barrier holds one connection while it waits, and each running
    /// handler holds one: give the pool at least [`workers`](Self::workers) connections.
    pub fn new(pool: ConnectionPool<C>) -> Self {
        WorkerBuilder {
            pool,
            handlers: Handlers::new(),
            url: None,
            workers: 4,
            config: Config {
                abort_policy: AbortPolicy::Ack,
                block_limit: Duration::from_secs(30),
                deadline: Duration::from_secs(15 * 60),
                snooze_delay: Duration::ZERO,
                reconnect_backoff: Duration::from_secs(5),
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

    /// How many jobs are fetched and processed at once.
    ///
    /// Defaults to 4.
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n.max(1);
        self
    }

    /// What to do with jobs whose transaction did not commit.
    ///
    /// Defaults to [`AbortPolicy::Ack`].
    pub fn abort_policy(mut self, policy: AbortPolicy) -> Self {
        self.config.abort_policy = policy;
        self
    }

    /// How long one delivery of a job may wait for its transaction before the job is snoozed
    /// (pushed again, unchanged, and this delivery acknowledged). Keep it well under the jobs'
    /// `reserve_for`.
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
    /// Defaults to 5 seconds.
    pub fn reconnect_backoff(mut self, backoff: Duration) -> Self {
        self.config.reconnect_backoff = backoff;
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
        {
            let mut conn = self.pool.get()?;
            if !conn.barrier_schema_present()? {
                return Err(Error::MigrationsMissing {
                    table: crate::BARRIER_TABLE,
                });
            }
            for warning in conn.startup_warnings() {
                tracing::warn!(backend = C::NAME, "{warning}");
            }
        }
        let url = self.url.clone().unwrap_or_else(env_url);
        let producer = Producer::builder().url(url.clone()).connect()?;
        let (tx, rx) = tokio::sync::watch::channel(false);
        Ok(Worker {
            shared: Arc::new(Shared {
                pool: self.pool,
                handlers: self.handlers,
                config: self.config,
                producer,
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
    /// Asks the worker to stop: it stops fetching, hands the jobs it holds back to Faktory, and
    /// [`Worker::run`] returns.
    pub fn shutdown(&self) {
        let _ = self.tx.send(true);
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dtb-worker")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot build a Tokio runtime: {e}")))?;
        let result = runtime.block_on(self.run_async(queues));
        runtime.shutdown_timeout(Duration::from_secs(5));
        result
    }

    async fn run_async(&mut self, queues: &[String]) -> Result<StopReason> {
        let mut shutdown = self.shutdown_rx.clone();
        tracing::info!(
            url = %redact(&self.url),
            queues = ?queues,
            kinds = ?self.shared.handlers,
            "worker starting"
        );
        loop {
            if *shutdown.borrow() {
                return Ok(StopReason::Shutdown);
            }
            let mut builder = faktory::WorkerBuilder::<Error>::default().workers(self.workers);
            if let Some(h) = &self.hostname {
                builder = builder.hostname(h.clone());
            }
            builder = builder.labels(self.labels.clone());
            for kind in self.shared.handlers.kinds() {
                let shared = Arc::clone(&self.shared);
                builder = builder.register_blocking_fn(kind, move |job| process(&shared, job));
            }
            let mut signal = shutdown.clone();
            builder = builder
                .with_graceful_shutdown(async move {
                    let _ = signal.wait_for(|stop| *stop).await;
                })
                .shutdown_timeout(Duration::from_secs(5));

            let failure = match builder.connect_to(&self.url).await {
                Ok(mut worker) => match worker.run(queues).await {
                    Ok(details) => {
                        return Ok(match details.reason {
                            faktory::StopReason::GracefulShutdown => StopReason::Shutdown,
                            _ => StopReason::ServerInstruction,
                        });
                    }
                    Err(e) => e,
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

/// Processes one job; runs on a thread of Tokio's blocking pool.
fn process<C: BarrierConnection>(shared: &Shared<C>, job: Job) -> Result<()> {
    let Some(reg) = shared.handlers.get(&job.kind) else {
        // faktory only calls us for kinds we registered.
        return Err(Error::Config(format!("no handler for {}", job.kind)));
    };
    let descriptor = Descriptor::from_job(&job).inspect_err(|e| {
        tracing::error!(jid = job.id().as_str(), kind = %job.kind, error = %e, "malformed barrier");
    })?;
    match descriptor {
        None if reg.mode == BarrierMode::Required => {
            let e = Error::BarrierRequired {
                kind: job.kind.clone(),
                jid: job.id().to_string(),
            };
            tracing::error!(jid = job.id().as_str(), kind = %job.kind, "job pushed without a barrier");
            Err(e)
        }
        None | Some(Descriptor::NoWait) => run_plain(shared, reg, &job),
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
            run_barrier(shared, reg, &job, &b)
        }
    }
}

fn truncated(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn run_plain<C: BarrierConnection>(
    shared: &Shared<C>,
    reg: &Registration<C>,
    job: &Job,
) -> Result<()> {
    let mut conn = shared.pool.get()?;
    C::worker_transaction(&mut *conn, |c| call_handler(reg, job, c))?;
    tracing::debug!(jid = job.id().as_str(), kind = %job.kind, "ran job without barrier");
    Ok(())
}

enum Outcome {
    Ran,
    Duplicate,
    Busy,
}

fn run_barrier<C: BarrierConnection>(
    shared: &Shared<C>,
    reg: &Registration<C>,
    job: &Job,
    b: &BarrierRef,
) -> Result<()> {
    let cfg = &shared.config;
    let age = job_age(job);
    let mut conn = shared.pool.get()?;
    // Never wait past the deadline by much; once past it, look once more, briefly.
    let limit = cfg
        .block_limit
        .min(cfg.deadline.saturating_sub(age))
        .max(Duration::from_millis(50));
    let started = Instant::now();
    let verdict = conn.await_verdict(&b.id, limit)?;
    let waited = started.elapsed();
    tracing::debug!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, ?verdict, ?waited, "barrier resolved");
    match verdict {
        Verdict::Pending => {
            if age + waited >= cfg.deadline {
                let transaction = conn
                    .transaction_info(&b.id, b.txid.as_deref())
                    .unwrap_or_else(|e| Some(format!("unavailable ({e})")));
                let info = TimeoutInfo {
                    barrier_id: b.id.to_string(),
                    jid: job.id().to_string(),
                    age: age + waited,
                    txid: b.txid.clone(),
                    transaction,
                };
                tracing::warn!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, info = %info, "barrier timed out");
                return Err(Error::BarrierTimeout(Box::new(info)));
            }
            drop(conn);
            snooze(shared, job, b)
        }
        Verdict::NotCommitted => {
            tracing::info!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, "transaction did not commit (or the barrier was already consumed): job aborted");
            match cfg.abort_policy {
                AbortPolicy::Ack => Ok(()),
                AbortPolicy::Fail => Err(Error::Aborted {
                    barrier_id: b.id.to_string(),
                    jid: job.id().to_string(),
                }),
            }
        }
        Verdict::Committed => {
            let outcome = C::worker_transaction(&mut *conn, |c| -> Result<Outcome> {
                match c.claim_barrier(&b.id)? {
                    Claim::Gone => Ok(Outcome::Duplicate),
                    Claim::Busy => Ok(Outcome::Busy),
                    Claim::Locked => {
                        call_handler(reg, job, c)?;
                        c.delete_barrier(&b.id)?;
                        Ok(Outcome::Ran)
                    }
                }
            })?;
            match outcome {
                Outcome::Ran => {
                    tracing::debug!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, "handler ran; barrier consumed");
                    Ok(())
                }
                Outcome::Duplicate => {
                    tracing::info!(barrier_id = %b.id, jid = job.id().as_str(), kind = %job.kind, "barrier already consumed: duplicate delivery skipped");
                    Ok(())
                }
                Outcome::Busy => {
                    drop(conn);
                    snooze(shared, job, b)
                }
            }
        }
    }
}

fn call_handler<C: BarrierConnection>(reg: &Registration<C>, job: &Job, conn: &mut C) -> Result<()> {
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

/// The custom key that counts how often a job was snoozed.
const SNOOZES_KEY: &str = "transaction_barrier_snoozes";

/// Pushes a copy of `job` (same payload, new jid) and lets this delivery be acknowledged.
///
/// If the worker dies between the push and the ACK, both copies exist: the barrier row's
/// consumption makes sure the handler runs for one of them only.
fn snooze<C: BarrierConnection>(shared: &Shared<C>, job: &Job, b: &BarrierRef) -> Result<()> {
    let mut value = serde_json::to_value(job).map_err(|e| {
        Error::Config(format!("cannot serialise job {} for snoozing: {e}", job.id().as_str()))
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
    if let Some(custom) = obj.get_mut("custom").and_then(|c| c.as_object_mut()) {
        custom.insert(SNOOZES_KEY.into(), serde_json::Value::from(snoozes));
    }
    let delay = shared.config.snooze_delay;
    if delay.is_zero() {
        obj.remove("at");
    } else {
        let at = chrono::Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        obj.insert("at".into(), serde_json::to_value(at).unwrap_or_default());
    }
    let copy: Job = serde_json::from_value(value)
        .map_err(|e| Error::Config(format!("cannot rebuild job {} for snoozing: {e}", job.id().as_str())))?;
    shared.producer.push_barrier_job(copy)?;
    tracing::info!(barrier_id = %b.id, jid = job.id().as_str(), new_jid = jid.as_str(), kind = %job.kind, snoozes, "transaction still open: job snoozed");
    Ok(())
}
