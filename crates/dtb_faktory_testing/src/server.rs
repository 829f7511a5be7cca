//! The [`TestServer`] handle: its builder, starting and stopping the server's threads, and
//! what a test can read, change and wait for.

use crate::connection::{accept_loop, clock_loop};
use crate::events::{JobEvent, JobEventKind, RetryDelay, Stats};
use crate::job::Job;
use crate::shared::Shared;
use crate::state::{Config, Now, State, WorkerInfo, WorkerState, HEARTBEAT_TIMEOUT};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Configures and starts a [`TestServer`].
///
/// ```
/// use dtb_faktory_testing::TestServer;
/// use std::time::Duration;
///
/// let server = TestServer::builder()
///     .password("s3cret")
///     .retry_delay(Duration::from_millis(50))
///     .fetch_timeout(Duration::from_millis(200))
///     .min_reserve_for(Duration::ZERO)
///     .start()?;
/// assert!(server.url().starts_with("tcp://:s3cret@127.0.0.1:"));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
#[must_use = "call `start` to run the server"]
pub struct TestServerBuilder {
    pub(crate) config: Config,
    bind: SocketAddr,
}

impl fmt::Debug for TestServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        f.debug_struct("TestServerBuilder")
            // Never print the password itself.
            .field("password", &c.password.as_ref().map(|_| "***"))
            .field("retry_delay", &c.retry_delay)
            .field("fetch_timeout", &c.fetch_timeout)
            .field("min_reserve_for", &c.min_reserve_for)
            .field("max_line_length", &c.max_line_length)
            .field("bind", &self.bind)
            .finish()
    }
}

impl Default for TestServerBuilder {
    fn default() -> TestServerBuilder {
        TestServerBuilder {
            config: Config {
                password: None,
                retry_delay: RetryDelay::Faktory,
                fetch_timeout: Duration::from_secs(2),
                min_reserve_for: Duration::from_secs(60),
                max_line_length: 16 * 1024 * 1024,
                heartbeat_timeout: HEARTBEAT_TIMEOUT,
            },
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        }
    }
}

impl TestServerBuilder {
    /// Requires clients to authenticate with this password: `HI` then carries an iteration
    /// count and a salt, and `HELLO` must carry the matching `pwdhash`. [`TestServer::url`]
    /// embeds the password as is, so use one that needs no escaping in a URL.
    ///
    /// Defaults to no password.
    pub fn password(mut self, password: impl Into<String>) -> TestServerBuilder {
        self.config.password = Some(password.into());
        self
    }

    /// How long a failed job waits before it is fetchable again. Accepts a [`RetryDelay`] or
    /// a plain [`Duration`] (the same delay every time; `Duration::ZERO` retries at once).
    ///
    /// Defaults to [`RetryDelay::Faktory`], the real server's formula
    /// (`15 + count⁴ + rand(0..30) × (count + 1)` seconds).
    pub fn retry_delay(mut self, delay: impl Into<RetryDelay>) -> TestServerBuilder {
        self.config.retry_delay = delay.into();
        self
    }

    /// How long `FETCH` waits for a job before answering `$-1` (no job).
    ///
    /// Defaults to 2 seconds, like the real server.
    pub fn fetch_timeout(mut self, timeout: Duration) -> TestServerBuilder {
        self.config.fetch_timeout = timeout;
        self
    }

    /// The shortest reservation the server grants. A job's `reserve_for` (in whole seconds;
    /// 0 or missing means 1800) is raised to this, and capped at one day. Set it to
    /// `Duration::ZERO` to let tests use `reserve_for: 1` and see reservations expire fast.
    ///
    /// Defaults to 60 seconds, the real server's minimum.
    pub fn min_reserve_for(mut self, min: Duration) -> TestServerBuilder {
        self.config.min_reserve_for = min;
        self
    }

    /// The longest command line accepted, in bytes (without `\r\n`). A longer line is read,
    /// thrown away and answered with an error; the connection stays usable.
    ///
    /// Defaults to 16 MiB.
    pub fn max_line_length(mut self, bytes: usize) -> TestServerBuilder {
        self.config.max_line_length = bytes;
        self
    }

    /// The address to listen on; pass the [`TestServer::addr`] of a stopped server to start
    /// a new one on the same port.
    ///
    /// Defaults to `127.0.0.1:0` (a free port chosen by the system).
    pub fn bind(mut self, addr: SocketAddr) -> TestServerBuilder {
        self.bind = addr;
        self
    }

    /// Binds the listener and starts the server threads.
    pub fn start(self) -> io::Result<TestServer> {
        self.start_on(State::default())
    }

    /// Starts a server that holds what a stopped one kept
    /// ([`TestServer::shutdown_keeping_data`]): its queues, scheduled jobs, retries, dead
    /// set, reservations (which expire at their time, as if the server had never stopped),
    /// histories and counters, as a real server restarted on its data does. Connected workers
    /// are not kept. Pair it with [`bind`](Self::bind) to serve on the same port.
    ///
    /// ```
    /// use dtb_faktory_testing::TestServer;
    ///
    /// let server = TestServer::start()?;
    /// server.push_json(r#"{"jid":"0123456789abcdef","jobtype":"x","args":[]}"#).unwrap();
    /// let addr = server.addr();
    /// let data = server.shutdown_keeping_data();
    /// let server = TestServer::builder().bind(addr).start_with_data(data)?;
    /// assert_eq!(server.queue_size("default"), 1);
    /// assert!(server.job("0123456789abcdef").is_some());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn start_with_data(self, data: ServerData) -> io::Result<TestServer> {
        self.start_on(data.0)
    }

    fn start_on(self, state: State) -> io::Result<TestServer> {
        let listener = TcpListener::bind(self.bind)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(self.config, state));
        let accept = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fwp-accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))?
        };
        let clock = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fwp-clock-{}", addr.port()))
                .spawn(move || clock_loop(shared))
        };
        let mut server = TestServer {
            shared,
            addr,
            threads: Some((accept, None)),
        };
        match clock {
            Ok(handle) => {
                if let Some(threads) = server.threads.as_mut() {
                    threads.1 = Some(handle);
                }
                Ok(server)
            }
            Err(e) => {
                server.stop();
                Err(e)
            }
        }
    }
}

/// What a stopped [`TestServer`] held, to start another one on
/// ([`TestServer::shutdown_keeping_data`], [`TestServerBuilder::start_with_data`]).
pub struct ServerData(State);

impl fmt::Debug for ServerData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerData")
            .field("working", &self.0.working_len())
            .field("retries", &self.0.retries_len())
            .finish_non_exhaustive()
    }
}

/// An in-process Faktory server for tests.
///
/// It speaks the Faktory Work Protocol on a loopback port, keeps every job in memory, and
/// lets a test look inside (queues, sets, per-job history) and wait for state changes
/// without polling. It stops when dropped (or on [`TestServer::shutdown`]): the listener and
/// every client connection are closed and all its threads are joined.
///
/// See the [module documentation](super) for an example.
pub struct TestServer {
    pub(crate) shared: Arc<Shared>,
    addr: SocketAddr,
    threads: Option<(JoinHandle<()>, Option<JoinHandle<()>>)>,
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .field("password", &self.shared.config.password.is_some())
            .field("running", &self.threads.is_some())
            .finish()
    }
}

impl TestServer {
    /// Starts a server with the default settings on a free loopback port.
    pub fn start() -> io::Result<TestServer> {
        TestServer::builder().start()
    }

    /// A builder to configure the server before starting it.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder::default()
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL clients connect to: `tcp://127.0.0.1:PORT`, or
    /// `tcp://:PASSWORD@127.0.0.1:PORT` when a password is set.
    pub fn url(&self) -> String {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        match &self.shared.config.password {
            Some(pw) => format!("tcp://:{pw}@{addr}"),
            None => format!("tcp://{addr}"),
        }
    }

    /// Stops the server: closes the listener and all client connections and joins every
    /// thread. Dropping the server does the same.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Stops the server like [`shutdown`](Self::shutdown) (the clients see their
    /// connections closed, as when a server crashes) and returns its data, for
    /// [`TestServerBuilder::start_with_data`].
    pub fn shutdown_keeping_data(mut self) -> ServerData {
        self.stop();
        let mut state = std::mem::take(&mut *self.shared.lock());
        state.restarted();
        ServerData(state)
    }

    fn stop(&mut self) {
        let Some((accept, clock)) = self.threads.take() else {
            return;
        };
        {
            let mut st = self.shared.lock();
            st.shutdown = true;
        }
        self.shared.notify();
        // Wake the accept thread with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                SocketAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        if !accept.is_finished() {
            for _ in 0..20 {
                if TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok()
                    || accept.is_finished()
                {
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = accept.join();
        {
            let conns = self
                .shared
                .conns
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for stream in conns.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
        let handles = std::mem::take(
            &mut *self
                .shared
                .handles
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for handle in handles {
            let _ = handle.join();
        }
        if let Some(clock) = clock {
            let _ = clock.join();
        }
    }

    // ---- worker lifecycle ----

    /// Sets the state answered to the `BEAT` of every worker, connected now or later.
    /// `Quiet` tells workers to stop fetching; `Terminate` tells them to exit. This is a
    /// floor: a worker already told (or asked) to go further stays there. Setting `Running`
    /// lifts the floor.
    ///
    /// As on the real server, the state is also enforced on a worker's first connection
    /// (the one that registered its `wid`), whose `FETCH` then answers no job; its other
    /// connections fetch as before until the client itself stops them (the `faktory`
    /// worker does so when a `BEAT` is answered `quiet` or `terminate`).
    pub fn set_worker_state(&self, state: WorkerState) {
        self.shared.lock().set_global_worker_state(state);
        self.shared.notify();
    }

    /// Sets the state answered to the `BEAT` of the worker with this `wid` (it may connect
    /// later).
    pub fn set_worker_state_for(&self, wid: &str, state: WorkerState) {
        self.shared.lock().set_worker_state_for(wid, state);
        self.shared.notify();
    }

    /// The worker processes currently connected (those that sent a `wid` in `HELLO`).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.shared.lock().workers()
    }

    // ---- inspection ----

    /// Number of jobs waiting in `queue` (not counting reserved, scheduled or retrying ones).
    pub fn queue_size(&self, queue: &str) -> usize {
        self.shared.lock().queue_size(queue)
    }

    /// Names of the queues that have held a job since the start or the last `FLUSH`
    /// (empty ones included, as in `INFO`), sorted.
    pub fn queue_names(&self) -> Vec<String> {
        self.shared.lock().queue_names()
    }

    /// Number of jobs waiting for their `at` time.
    pub fn scheduled_len(&self) -> usize {
        self.shared.lock().scheduled_len()
    }

    /// Number of failed jobs waiting for their next attempt.
    pub fn retries_len(&self) -> usize {
        self.shared.lock().retries_len()
    }

    /// Number of jobs in the dead set.
    pub fn dead_len(&self) -> usize {
        self.shared.lock().dead_len()
    }

    /// Number of jobs fetched and neither acknowledged, failed nor expired yet.
    pub fn working_len(&self) -> usize {
        self.shared.lock().working_len()
    }

    /// The current payload of job `jid`, wherever it is (reserved, queued, scheduled,
    /// retrying or dead); `None` once acknowledged or discarded.
    pub fn job(&self, jid: &str) -> Option<serde_json::Value> {
        self.shared.lock().find_job(jid).map(Job::to_value)
    }

    /// Like [`job`](TestServer::job), but the exact JSON text `FETCH` would send, with every
    /// field the producer sent kept byte for byte and in order.
    pub fn job_json(&self, jid: &str) -> Option<String> {
        self.shared.lock().find_job(jid).map(Job::to_json)
    }

    /// Everything that happened to job `jid`, oldest first.
    pub fn history(&self, jid: &str) -> Vec<JobEvent> {
        self.shared.lock().history(jid)
    }

    /// The payloads waiting in `queue`, next to be fetched first.
    pub fn jobs_in_queue(&self, queue: &str) -> Vec<serde_json::Value> {
        self.shared.lock().jobs_in_queue(queue)
    }

    /// The payloads in the scheduled set, soonest first.
    pub fn scheduled_jobs(&self) -> Vec<serde_json::Value> {
        self.shared.lock().scheduled_jobs()
    }

    /// The payloads in the retry set, soonest first.
    pub fn retry_jobs(&self) -> Vec<serde_json::Value> {
        self.shared.lock().retry_jobs()
    }

    /// The payloads in the dead set, oldest first.
    pub fn dead_jobs(&self) -> Vec<serde_json::Value> {
        self.shared.lock().dead_jobs()
    }

    /// The payloads of the reserved jobs, soonest expiry first.
    pub fn working_jobs(&self) -> Vec<serde_json::Value> {
        self.shared.lock().working_jobs()
    }

    /// Counters since the start or the last `FLUSH`.
    pub fn stats(&self) -> Stats {
        self.shared.lock().stats()
    }

    /// Pushes a job given as JSON text, exactly as a `PUSH` command would.
    pub fn push_json(&self, job: &str) -> Result<(), String> {
        let job = Job::parse(job.as_bytes())?;
        let result = self.shared.lock().push(job, &Now::get());
        self.shared.notify();
        result
    }

    /// Empties everything, like the `FLUSH` command: queues, sets, reservations, histories
    /// and counters.
    pub fn flush(&self) {
        self.shared.lock().flush();
        self.shared.notify();
    }

    /// Blocks until `predicate` holds or `timeout` passes; returns whether it holds.
    ///
    /// The predicate is evaluated once at the start and again after every change of the
    /// server's state (no polling), so it should only look at the server (through `&self`
    /// methods). It must not wait itself.
    #[must_use = "the wait may have timed out"]
    pub fn wait_for<F>(&self, mut predicate: F, timeout: Duration) -> bool
    where
        F: FnMut(&TestServer) -> bool,
    {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.shared.lock().generation;
            if predicate(self) {
                return true;
            }
            let mut st = self.shared.lock();
            while st.generation == seen {
                let now = Instant::now();
                if now >= deadline {
                    drop(st);
                    return predicate(self);
                }
                st = self.shared.wait_timeout(st, deadline - now);
            }
        }
    }

    /// Blocks until job `jid` has an event of this kind in its history, or `timeout` passes;
    /// returns whether it has.
    #[must_use = "the wait may have timed out"]
    pub fn wait_until_history(&self, jid: &str, kind: JobEventKind, timeout: Duration) -> bool {
        self.wait_for(|s| s.shared.lock().has_event(jid, kind), timeout)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}
