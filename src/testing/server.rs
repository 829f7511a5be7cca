//! The TCP side: listener, one thread per connection, the clock thread, and the
//! [`TestServer`] handle with its inspection methods.

use super::job::Job;
use super::protocol::{password_hash, printable, read_line, split_command, ReadLine, Reply};
use super::state::{
    Config, Hello, JobEvent, JobEventKind, Now, RetryDelay, State, Stats, WorkerInfo, WorkerState,
    HEARTBEAT_TIMEOUT,
};
use rand::Rng;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// State shared by the handle and every server thread.
struct Shared {
    state: Mutex<State>,
    /// Notified on every change of `state`.
    changed: Condvar,
    config: Config,
    started: Instant,
    /// Open client sockets, so that shutdown can close them.
    conns: Mutex<HashMap<u64, TcpStream>>,
    /// Connection threads, joined at shutdown.
    handles: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    fn notify(&self) {
        self.changed.notify_all();
    }
}

/// Configures and starts a [`TestServer`].
///
/// ```
/// use diesel_transaction_barrier::testing::TestServer;
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
    config: Config,
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
        let listener = TcpListener::bind(self.bind)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            config: self.config,
            started: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            handles: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
        });
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

/// An in-process Faktory server for tests.
///
/// It speaks the Faktory Work Protocol on a loopback port, keeps every job in memory, and
/// lets a test look inside (queues, sets, per-job history) and wait for state changes
/// without polling. It stops when dropped (or on [`TestServer::shutdown`]): the listener and
/// every client connection are closed and all its threads are joined.
///
/// See the [module documentation](super) for an example.
pub struct TestServer {
    shared: Arc<Shared>,
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

// ---- threads ----

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.lock().shutdown {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "test server accept failed");
                // Out of descriptors or an aborted handshake: try again shortly.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, registered);
        let spawned = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fwp-conn-{id}"))
                .spawn(move || serve_connection(&shared, stream, id))
        };
        let mut handles = shared
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        handles.retain(|h| !h.is_finished());
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                tracing::warn!(error = %e, "test server could not start a connection thread");
                if let Some(s) = shared
                    .conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id)
                {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

fn clock_loop(shared: Arc<Shared>) {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let before = st.generation;
        let now = Now::get();
        let next = st.tick(&now, &shared.config);
        let (silent, next_silent) =
            st.reap_silent_workers(now.mono, shared.config.heartbeat_timeout);
        if st.generation != before {
            shared.notify();
        }
        if !silent.is_empty() {
            // Their threads see the connection end and clean up after themselves.
            let conns = shared.conns.lock().unwrap_or_else(PoisonError::into_inner);
            for id in silent {
                if let Some(stream) = conns.get(&id) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
        let wait = [next, next_silent]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        st = shared.wait_timeout(st, wait.max(Duration::from_micros(100)));
    }
}

/// What a connection knows about its client after `HELLO`.
struct Session {
    wid: Option<String>,
    /// This connection registered the worker `wid` (it was its first open connection): the
    /// worker's state (quiet, terminate) applies to its `FETCH`es, and to no other
    /// connection's, as on the real server.
    holds_state: bool,
}

fn serve_connection(shared: &Shared, stream: TcpStream, id: u64) {
    let mut session: Option<Session> = None;
    if let Err(e) = run_connection(shared, &stream, id, &mut session) {
        tracing::trace!(error = %e, "test server connection ended");
    }
    let _ = stream.shutdown(Shutdown::Both);
    shared
        .conns
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    if let Some(session) = session {
        let mut st = shared.lock();
        st.connections = st.connections.saturating_sub(1);
        if let Some(wid) = &session.wid {
            st.worker_disconnected(wid, id);
        }
        drop(st);
        shared.notify();
    }
}

/// Password challenge sent in `HI`.
struct Challenge {
    iterations: usize,
    salt: String,
}

fn run_connection(
    shared: &Shared,
    stream: &TcpStream,
    id: u64,
    session: &mut Option<Session>,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut writer = BufWriter::with_capacity(64 * 1024, stream);

    let challenge = shared.config.password.as_ref().map(|_| {
        let mut rng = rand::thread_rng();
        Challenge {
            iterations: rng.gen_range(4000..8096),
            salt: format!("{:x}", rng.gen_range(0..i64::MAX)),
        }
    });
    let hi = match &challenge {
        Some(c) => format!(r#"HI {{"v":2,"i":{},"s":"{}"}}"#, c.iterations, c.salt),
        None => r#"HI {"v":2}"#.to_string(),
    };
    Reply::Simple(hi).write_to(&mut writer)?;
    writer.flush()?;

    let max = shared.config.max_line_length;
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line, max)? {
            ReadLine::Eof => return Ok(()),
            ReadLine::TooLong => {
                Reply::err(format!("command line too long (limit is {max} bytes)"))
                    .write_to(&mut writer)?;
                writer.flush()?;
                continue;
            }
            ReadLine::Line => {}
        }
        if std::str::from_utf8(&line).is_err() {
            // The real server decodes JSON with Go, which takes invalid UTF-8 in a string as
            // U+FFFD instead of refusing it.
            line = String::from_utf8_lossy(&line).into_owned().into_bytes();
        }
        if shared.lock().shutdown {
            Reply::err("shutdown in progress").write_to(&mut writer)?;
            writer.flush()?;
            return Ok(());
        }
        let (verb, args) = split_command(&line);
        if verb == b"END" {
            return Ok(());
        }
        match session {
            None => {
                if verb != b"HELLO" {
                    Reply::err(format!(
                        "expected HELLO before {}, is the client speaking FWP?",
                        printable(verb)
                    ))
                    .write_to(&mut writer)?;
                } else {
                    match hello(shared, args.unwrap_or_default(), challenge.as_ref(), id) {
                        Ok(new_session) => {
                            Reply::Ok.write_to(&mut writer)?;
                            *session = Some(new_session);
                        }
                        Err(HelloError::Refused(msg)) => {
                            Reply::err(msg).write_to(&mut writer)?;
                            writer.flush()?;
                            return Ok(());
                        }
                        Err(HelloError::Invalid(msg)) => Reply::err(msg).write_to(&mut writer)?,
                    }
                }
            }
            Some(session) => {
                let reply = dispatch(shared, session, verb, args);
                reply.write_to(&mut writer)?;
            }
        }
        writer.flush()?;
    }
}

enum HelloError {
    /// Answer with an error and keep the connection (the client may try again).
    Invalid(String),
    /// Answer with an error and close the connection (bad password, like the real server).
    Refused(String),
}

#[derive(Deserialize)]
struct HelloIn {
    #[serde(default)]
    wid: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    pid: Option<i64>,
    #[serde(default)]
    labels: Option<Vec<String>>,
    #[serde(default)]
    pwdhash: Option<String>,
    #[serde(default)]
    v: Option<i64>,
}

/// Decodes a JSON object into `T`. Unlike plain serde, an array is not accepted for a
/// struct (the real server's decoder refuses it too).
fn from_object<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, serde_json::Error> {
    let raw: Box<RawValue> = serde_json::from_slice(data)?;
    if !raw.get().starts_with('{') {
        return Err(serde::de::Error::custom("expected a JSON object"));
    }
    serde_json::from_str(raw.get())
}

fn hello(
    shared: &Shared,
    args: &[u8],
    challenge: Option<&Challenge>,
    conn: u64,
) -> Result<Session, HelloError> {
    let info: HelloIn =
        from_object(args).map_err(|e| HelloError::Invalid(format!("invalid HELLO: {e}")))?;
    if let (Some(password), Some(challenge)) = (&shared.config.password, challenge) {
        // The real server hashes once for clients older than protocol version 2.
        let iterations = if info.v.unwrap_or(0) < 2 {
            1
        } else {
            challenge.iterations
        };
        let expected = password_hash(password, &challenge.salt, iterations);
        if info.pwdhash.as_deref() != Some(expected.as_str()) {
            return Err(HelloError::Refused("Invalid password".into()));
        }
    }
    let wid = info.wid.filter(|w| !w.is_empty());
    let mut st = shared.lock();
    st.connections += 1;
    let holds_state = match &wid {
        Some(wid) => st.worker_connected(
            &Hello {
                wid: wid.clone(),
                hostname: info.hostname.unwrap_or_default(),
                pid: info.pid.unwrap_or_default(),
                labels: info.labels.unwrap_or_default(),
            },
            conn,
            Instant::now(),
        ),
        None => false,
    };
    drop(st);
    shared.notify();
    Ok(Session { wid, holds_state })
}

/// A command handler: shared state, the session, the raw arguments (`None` when the line
/// has no space) and the same arguments as bytes (empty when absent).
type Command = fn(&Shared, &Session, Option<&[u8]>, &[u8]) -> Reply;

fn dispatch(shared: &Shared, session: &Session, verb: &[u8], args: Option<&[u8]>) -> Reply {
    let data = args.unwrap_or_default();
    // The real server cuts the verb and its space off these commands without checking that
    // there is more; on a bare verb that panics, and it answers `internal error`.
    if args.is_none() && matches!(verb, b"PUSH" | b"PUSHB" | b"ACK" | b"FAIL" | b"BEAT") {
        shared.lock().commands += 1;
        return Reply::err("internal error");
    }
    let command: Command = match verb {
        b"PUSH" => push,
        b"PUSHB" => push_bulk,
        b"FETCH" => fetch,
        b"ACK" => ack,
        b"FAIL" => fail,
        b"BEAT" => beat,
        b"INFO" => info,
        b"FLUSH" => flush,
        // Faktory (not Enterprise) knows these and refuses them.
        b"BATCH" => {
            shared.lock().commands += 1;
            return Reply::err("batch subsystem is only available in Faktory Enterprise");
        }
        b"TRACK" => {
            shared.lock().commands += 1;
            return Reply::err("tracking subsystem is only available in Faktory Enterprise");
        }
        _ => return Reply::err(format!("unknown command {}", printable(verb))),
    };
    shared.lock().commands += 1;
    command(shared, session, args, data)
}

fn push(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let job = match Job::parse(data) {
        Ok(job) => job,
        Err(e) => return Reply::err(e),
    };
    let result = shared.lock().push(job, &Now::get());
    shared.notify();
    match result {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::err(e),
    }
}

fn push_bulk(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let raws: Vec<Box<RawValue>> = match serde_json::from_slice(data) {
        Ok(raws) => raws,
        Err(e) => return Reply::err(format!("invalid JSON: {e}")),
    };
    // Like the real server, one malformed element rejects the whole command.
    let jobs = match raws
        .iter()
        .map(|raw| Job::parse_raw(raw))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(jobs) => jobs,
        Err(e) => return Reply::err(e),
    };
    let mut errors = serde_json::Map::new();
    {
        let mut st = shared.lock();
        let now = Now::get();
        for job in jobs {
            let jid = job.jid.clone();
            if let Err(e) = st.push(job, &now) {
                errors.insert(jid, serde_json::Value::String(e));
            }
        }
    }
    shared.notify();
    Reply::Bulk(serde_json::Value::Object(errors).to_string().into_bytes())
}

fn fetch(shared: &Shared, session: &Session, args: Option<&[u8]>, _: &[u8]) -> Reply {
    let Some(args) = args else {
        return Reply::err("must call fetch with at least one queue");
    };
    let queues: Vec<String> = args
        .split(|&b| b == b' ')
        .map(|q| String::from_utf8_lossy(q).into_owned())
        .collect();
    let deadline = Instant::now() + shared.config.fetch_timeout;
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return Reply::Null;
        }
        // A quiet or terminating worker gets no new job on the connection that holds its
        // state; its other connections fetch as usual (the client stops them itself).
        let running = !session.holds_state
            || session
                .wid
                .as_deref()
                .is_none_or(|wid| st.worker_state(wid) == WorkerState::Running);
        if running {
            if let Some(payload) = st.fetch(&queues, &Now::get(), &shared.config) {
                drop(st);
                shared.notify();
                return Reply::Bulk(payload.into_bytes());
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Reply::Null;
        }
        st = shared.wait_timeout(st, deadline - now);
    }
}

fn ack(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let parsed: Result<HashMap<String, String>, _> = serde_json::from_slice(data);
    let Some(jid) = parsed.ok().and_then(|mut m| m.remove("jid")) else {
        return Reply::err(format!("invalid ACK {}", printable(data)));
    };
    let changed = shared.lock().ack(&jid, &Now::get());
    if changed {
        shared.notify();
    }
    Reply::Ok
}

#[derive(Deserialize)]
struct FailIn {
    #[serde(default)]
    jid: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errtype: Option<String>,
    #[serde(default)]
    backtrace: Option<Vec<String>>,
}

fn fail(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let Ok(f) = from_object::<FailIn>(data) else {
        return Reply::err(format!("invalid FAIL {}", printable(data)));
    };
    let result = shared.lock().fail(
        f.jid.as_deref().unwrap_or_default(),
        f.errtype,
        f.message,
        f.backtrace,
        &Now::get(),
        &shared.config,
    );
    shared.notify();
    match result {
        Ok(()) => Reply::Ok,
        Err(e) => Reply::err(e),
    }
}

#[derive(Deserialize)]
struct BeatIn {
    #[serde(default)]
    wid: Option<String>,
    #[serde(default)]
    current_state: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    rss_kb: Option<i64>,
}

fn beat(shared: &Shared, _: &Session, _: Option<&[u8]>, data: &[u8]) -> Reply {
    let Ok(b) = from_object::<BeatIn>(data) else {
        return Reply::err(format!("invalid BEAT {}", printable(data)));
    };
    let result = shared.lock().beat(
        b.wid.as_deref().unwrap_or_default(),
        b.current_state.as_deref(),
        &Now::get(),
    );
    shared.notify();
    match result {
        Ok(WorkerState::Running) => Reply::Ok,
        Ok(state) => Reply::Bulk(format!(r#"{{"state":"{}"}}"#, state.wire_name()).into_bytes()),
        Err(e) => Reply::err(e),
    }
}

fn info(shared: &Shared, _: &Session, _: Option<&[u8]>, _: &[u8]) -> Reply {
    let doc = shared
        .lock()
        .info(shared.started.elapsed(), used_memory_mb());
    Reply::Bulk(doc.to_string().into_bytes())
}

fn flush(shared: &Shared, _: &Session, _: Option<&[u8]>, _: &[u8]) -> Reply {
    shared.lock().flush();
    shared.notify();
    Reply::Ok
}

/// Resident memory of this process in MiB, where the platform tells it (Linux); else 0.
fn used_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read};

    fn line(reader: &mut impl BufRead) -> String {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        l
    }

    #[test]
    fn a_worker_without_beat_is_reaped_and_its_connections_closed() {
        let mut builder = TestServer::builder();
        builder.config.heartbeat_timeout = Duration::from_secs(1);
        let server = builder.start().unwrap();
        let connect = |wid: &str| {
            let stream = TcpStream::connect(server.addr()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            assert!(line(&mut reader).starts_with("+HI"));
            (&stream)
                .write_all(format!("HELLO {{\"v\":2,\"wid\":\"{wid}\"}}\r\n").as_bytes())
                .unwrap();
            assert_eq!(line(&mut reader), "+OK\r\n");
            (stream, reader)
        };
        let (beating, mut beating_reader) = connect("beating");
        let (_silent, mut silent_reader) = connect("silent");
        // The one that beats well within the timeout is kept, for longer than the timeout...
        for _ in 0..6 {
            (&beating)
                .write_all(b"BEAT {\"wid\":\"beating\"}\r\n")
                .unwrap();
            assert_eq!(line(&mut beating_reader), "+OK\r\n");
            thread::sleep(Duration::from_millis(250));
        }
        // ... and the silent one's connection was closed by the server.
        let mut rest = Vec::new();
        assert_eq!(silent_reader.read_to_end(&mut rest).unwrap(), 0);
        let workers = server.workers();
        assert_eq!(workers.len(), 1);
        assert_eq!(workers[0].wid, "beating");
        assert_eq!(
            server.shared.lock().info(Duration::ZERO, 0)["faktory"]["tasks"]["Workers"]["reaped"],
            1
        );
    }
}
