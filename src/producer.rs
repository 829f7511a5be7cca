//! A synchronous, shareable handle for pushing jobs to Faktory.

use crate::error::{Error, Result};
use crate::handlers::ErasedHandlers;
use faktory::Job;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A synchronous handle to Faktory, shared by all the threads of an application.
///
/// `Producer` is cheap to clone (`Arc` inside), `Send` and `Sync`. Behind it sits a small pool
/// of Faktory connections driven by a private Tokio runtime, so a push never holds a global
/// lock, and `push` blocks only the calling thread. It may be called from a plain thread or from
/// a thread of a Tokio runtime's blocking pool (for example inside the closure of a Rocket sync
/// database pool); it never starts a runtime on the caller's thread.
///
/// A producer built with [`Producer::inline`] talks to no server: it runs handlers at once, on
/// the calling thread (see *Testing* in the crate docs).
#[derive(Clone)]
pub struct Producer {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) enum Inner {
    Faktory(FaktoryPool),
    Inline(Arc<dyn ErasedHandlers>),
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            Inner::Faktory(p) => f
                .debug_struct("Producer")
                .field("url", &redact(&p.url))
                .field("max_idle", &p.max_idle)
                .finish(),
            Inner::Inline(_) => f.debug_struct("Producer").field("inline", &true).finish(),
        }
    }
}

/// Hides a password in a `tcp://:password@host:port` URL.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// Configures a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerBuilder {
    url: Option<String>,
    max_idle: usize,
    timeout: Duration,
}

impl Default for ProducerBuilder {
    fn default() -> Self {
        ProducerBuilder {
            url: None,
            max_idle: 8,
            timeout: Duration::from_secs(10),
        }
    }
}

impl ProducerBuilder {
    /// The Faktory server, as `tcp://[:password@]host:port`.
    ///
    /// Defaults to the URL named by `FAKTORY_PROVIDER` (or `FAKTORY_URL`), else
    /// `tcp://localhost:7419`, as the `faktory` crate does.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// How many idle Faktory connections are kept for reuse. More connections are opened when
    /// more threads push at once; those beyond this number are closed after use.
    ///
    /// Defaults to 8.
    pub fn max_idle(mut self, n: usize) -> Self {
        self.max_idle = n;
        self
    }

    /// How long one push (including connecting) may take before it fails with
    /// [`Error::FaktoryTimeout`].
    ///
    /// Defaults to 10 seconds.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Builds the producer and checks that the server answers.
    pub fn connect(self) -> Result<Producer> {
        let producer = self.build()?;
        producer.ping()?;
        Ok(producer)
    }

    /// Builds the producer without connecting; the first push connects.
    ///
    /// # Errors
    ///
    /// [`Error::Runtime`] when the private Tokio runtime cannot start (the system refused a
    /// thread).
    pub fn build(self) -> Result<Producer> {
        let url = self.url.clone().unwrap_or_else(env_url);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("dtb-producer")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        Ok(Producer {
            inner: Arc::new(Inner::Faktory(FaktoryPool {
                url,
                max_idle: self.max_idle,
                timeout: self.timeout,
                runtime: Some(runtime),
                idle: Arc::new(Mutex::new(Vec::new())),
            })),
        })
    }
}

/// The Faktory URL from the environment, as the `faktory` crate reads it.
pub(crate) fn env_url() -> String {
    let var = std::env::var("FAKTORY_PROVIDER").unwrap_or_else(|_| "FAKTORY_URL".to_string());
    std::env::var(var)
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "tcp://localhost:7419".to_string())
}

impl Producer {
    /// Connects to the Faktory server at `url` (`tcp://[:password@]host:port`) with default
    /// settings, and checks that it answers.
    pub fn connect(url: &str) -> Result<Producer> {
        ProducerBuilder::default().url(url).connect()
    }

    /// Connects to the Faktory server named by the environment (`FAKTORY_PROVIDER` /
    /// `FAKTORY_URL`, default `tcp://localhost:7419`), and checks that it answers.
    pub fn from_env() -> Result<Producer> {
        ProducerBuilder::default().connect()
    }

    /// A builder for a producer with non-default settings.
    pub fn builder() -> ProducerBuilder {
        ProducerBuilder::default()
    }

    /// A producer that talks to no server and runs each job's handler at once, on the calling
    /// thread, with the caller's connection — even inside a transaction.
    ///
    /// This is how code that enqueues is unit-tested: build the [`Handlers`](crate::Handlers)
    /// once, give them to the worker in production and to an inline producer in tests.
    /// [`Producer::push`] has no connection to hand to a handler, so on an inline producer it
    /// returns [`Error::InlinePush`]; use `enqueue_with_barrier`.
    pub fn inline<C: crate::BarrierConnection>(handlers: crate::Handlers<C>) -> Producer {
        Producer {
            inner: Arc::new(Inner::Inline(Arc::new(handlers))),
        }
    }

    /// Whether this producer runs handlers inline.
    pub fn is_inline(&self) -> bool {
        matches!(&*self.inner, Inner::Inline(_))
    }

    /// Pushes `job` as it is, with no barrier: a plain Faktory push.
    pub fn push(&self, job: Job) -> Result<()> {
        match &*self.inner {
            Inner::Faktory(pool) => pool.push(job, false),
            Inner::Inline(_) => Err(Error::InlinePush),
        }
    }

    /// Pushes `jobs` as they are, with no barrier, in batches of at most 1,000 (Faktory's
    /// `PUSHB`, one round trip per batch): plain Faktory pushes.
    ///
    /// Not all or nothing: when a batch fails ([`Error::PushRefused`] when Faktory refused some
    /// of its jobs, or a connection error), the jobs of earlier batches, and perhaps some of
    /// that one, were pushed. [`enqueue_many_with_barrier`](crate::EnqueueWithBarrier::enqueue_many_with_barrier)
    /// inside a transaction is all or nothing.
    pub fn push_many<I: IntoIterator<Item = Job>>(&self, jobs: I) -> Result<()> {
        match &*self.inner {
            Inner::Faktory(pool) => {
                let jobs: Vec<Job> = jobs.into_iter().collect();
                for batch in jobs.chunks(BULK) {
                    pool.push_bulk(batch.to_vec(), false)?;
                }
                Ok(())
            }
            Inner::Inline(_) => Err(Error::InlinePush),
        }
    }

    /// Pushes jobs that carry barriers with `PUSHB`, in batches of at most 1,000: a lost answer
    /// may be retried once on a fresh connection, since a second copy of a barrier job cannot
    /// run twice.
    pub(crate) fn push_barrier_jobs(&self, jobs: Vec<Job>) -> Result<()> {
        match &*self.inner {
            Inner::Faktory(pool) => {
                for batch in jobs.chunks(BULK) {
                    pool.push_bulk(batch.to_vec(), true)?;
                }
                Ok(())
            }
            Inner::Inline(_) => unreachable!("inline producers run handlers instead of pushing"),
        }
    }

    /// Pushes a job that carries a barrier: a lost answer may be retried once on a fresh
    /// connection, since a second copy of a barrier job cannot run twice.
    pub(crate) fn push_barrier_job(&self, job: Job) -> Result<()> {
        match &*self.inner {
            Inner::Faktory(pool) => pool.push(job, true),
            Inner::Inline(_) => unreachable!("inline producers run handlers instead of pushing"),
        }
    }

    /// Opens a connection (or reuses an idle one) and checks the server answers `INFO`.
    pub fn ping(&self) -> Result<()> {
        match &*self.inner {
            Inner::Faktory(pool) => pool.ping(),
            Inner::Inline(_) => Ok(()),
        }
    }
}

/// The most jobs in one `PUSHB` (Faktory's advice).
pub(crate) const BULK: usize = 1000;

pub(crate) struct FaktoryPool {
    url: String,
    max_idle: usize,
    timeout: Duration,
    // `Some` until dropped.
    runtime: Option<tokio::runtime::Runtime>,
    idle: Arc<Mutex<Vec<Pooled>>>,
}

/// An idle client. Dropping a `faktory::Client` writes END through the Tokio runtime it
/// belongs to and panics anywhere else, so the pool drops its clients explicitly on its own
/// runtime; one that ends up dropped anywhere else is forgotten (leaking its socket) rather
/// than allowed to panic.
struct Pooled(Option<faktory::Client>);

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            std::mem::forget(client);
        }
    }
}

enum Op {
    Push(Box<Job>),
    /// Faktory's `PUSHB`.
    PushBulk(Vec<Job>),
    Ping,
}

impl FaktoryPool {
    fn push(&self, job: Job, may_retry: bool) -> Result<()> {
        match self.run(Op::Push(Box::new(job.clone())), true) {
            Err(Error::Faktory(faktory::Error::IO(e))) if may_retry => {
                tracing::debug!(error = %e, "faktory push failed on a pooled connection; retrying once on a new one");
                self.run(Op::Push(Box::new(job)), false)
            }
            other => other,
        }
    }

    fn push_bulk(&self, jobs: Vec<Job>, may_retry: bool) -> Result<()> {
        match self.run(Op::PushBulk(jobs.clone()), true) {
            Err(Error::Faktory(faktory::Error::IO(e))) if may_retry => {
                tracing::debug!(error = %e, "faktory bulk push failed on a pooled connection; retrying once on a new one");
                self.run(Op::PushBulk(jobs), false)
            }
            other => other,
        }
    }

    fn ping(&self) -> Result<()> {
        self.run(Op::Ping, true)
    }

    /// Runs `op` on the private runtime and waits for its answer on this thread.
    fn run(&self, op: Op, reuse: bool) -> Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let idle = Arc::clone(&self.idle);
        let url = self.url.clone();
        let max_idle = self.max_idle;
        let timeout = self.timeout;
        let runtime = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as the pool");
        runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let pooled = if reuse {
                idle.lock().unwrap().pop().and_then(|mut p| p.0.take())
            } else {
                None
            };
            let mut client = match pooled {
                Some(c) => c,
                None => {
                    match tokio::time::timeout_at(deadline, faktory::Client::connect_to(&url)).await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => return drop(tx.send(Err(Error::Faktory(e)))),
                        Err(_) => return drop(tx.send(Err(Error::FaktoryTimeout(timeout)))),
                    }
                }
            };
            let r = match op {
                Op::Push(job) => tokio::time::timeout_at(deadline, client.enqueue(*job)).await,
                Op::PushBulk(jobs) => {
                    let pushed = tokio::time::timeout_at(deadline, client.enqueue_many(jobs)).await;
                    match pushed {
                        // Refused, but the connection is fine: back into the pool, then answer.
                        Ok(Ok((_, Some(refused)))) => {
                            let mut refused: Vec<(String, String)> = refused.into_iter().collect();
                            refused.sort();
                            let first = refused
                                .first()
                                .map(|(jid, why)| format!("{jid}: {why}"))
                                .unwrap_or_default();
                            let count = refused.len();
                            give_back(&idle, max_idle, client);
                            return drop(tx.send(Err(Error::PushRefused { count, first })));
                        }
                        Ok(Ok((_, None))) => Ok(Ok(())),
                        Ok(Err(e)) => Ok(Err(e)),
                        Err(elapsed) => Err(elapsed),
                    }
                }
                Op::Ping => {
                    tokio::time::timeout_at(deadline, async {
                        client.current_info().await.map(|_| ())
                    })
                    .await
                }
            };
            match r {
                Ok(Ok(())) => {
                    // Back into the pool before answering: once the caller has its answer the
                    // producer may be dropped, and the pool with it.
                    give_back(&idle, max_idle, client);
                    let _ = tx.send(Ok(()));
                }
                failed => {
                    let _ = tx.send(match failed {
                        Ok(Err(e)) => Err(Error::Faktory(e)),
                        _ => Err(Error::FaktoryTimeout(timeout)),
                    });
                    // A client whose connection failed or hung is not reused, and not dropped
                    // either: its destructor writes END and panics (or blocks) on a broken
                    // socket. Forgetting it leaks one socket per broken connection.
                    std::mem::forget(client);
                }
            }
        });
        rx.recv().unwrap_or(Err(Error::ProducerStopped))
    }
}

/// Puts a healthy client back into the idle pool, or says END with it when the pool is full.
/// Runs on the producer's runtime (a client's destructor needs one).
fn give_back(idle: &Mutex<Vec<Pooled>>, max_idle: usize, client: faktory::Client) {
    let mut guard = idle.lock().unwrap();
    if guard.len() < max_idle {
        guard.push(Pooled(Some(client)));
    } else {
        drop(guard);
        drop(client);
    }
}

impl Drop for FaktoryPool {
    fn drop(&mut self) {
        let clients: Vec<_> = std::mem::take(&mut *self.idle.lock().unwrap());
        if let Some(runtime) = self.runtime.take() {
            if !clients.is_empty() {
                // Close idle connections politely on a runtime thread (their destructor needs
                // one), then stop the runtime without blocking the caller.
                let (tx, rx) = crossbeam_channel::bounded::<()>(1);
                runtime.spawn(async move {
                    for mut pooled in clients {
                        drop(pooled.0.take());
                    }
                    drop(tx);
                });
                let _ = rx.recv_timeout(Duration::from_secs(1));
            }
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("tcp://:secret@localhost:7419"),
            "tcp://***@localhost:7419"
        );
        assert_eq!(redact("tcp://localhost:7419"), "tcp://localhost:7419");
    }
}
