//! The worker of the Rocket shop (`examples/rocket_app.rs`), in the shape it is deployed in:
//! it runs `send_receipt` for each payment that committed, and never for one that rolled back.
//!
//! * **Signals** ([`WorkerBuilder::handle_signals`]): SIGTERM or SIGINT stops it gracefully —
//!   no new job, jobs waiting for their transactions back to Faktory at once, running handlers
//!   finish within `DTB_SHUTDOWN_TIMEOUT` — and the process exits 0; a second one stops it at
//!   once; SIGTSTP quiets it (no new job; what runs finishes).
//! * **Logs**: `tracing`, one line per event on stdout, filtered by `RUST_LOG` (default `info`).
//! * **HTTP** on `DTB_HTTP_ADDR` (default `127.0.0.1:9100`): `GET /metrics`, the worker's
//!   metrics in Prometheus's text format; `GET /livez`, 200 while the process runs (the worker
//!   reconnects to Faktory and the database by itself: a restart would not help); `GET /readyz`,
//!   200 when the worker is connected to Faktory, the database answers and it is not quiet,
//!   else 503 and why.
//! * `rocket_worker health` asks a running worker's `/readyz` and exits 0 when it is ready: the
//!   Docker image's health check.
//!
//! Settings, from the environment: `DATABASE_URL`, `FAKTORY_URL`, `DTB_QUEUES` (comma
//! separated, default `default`), `DTB_WORKERS` (handlers at once, default 4),
//! `DTB_MAX_WAITING` (default 32), `DTB_SHUTDOWN_TIMEOUT` (seconds, default 20) and
//! `DTB_HTTP_ADDR`.
//!
//! ```text
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test FAKTORY_URL=tcp://127.0.0.1:7419
//! cargo run --features metrics --example rocket_worker
//! curl localhost:9100/readyz; curl localhost:9100/metrics
//! ```
//!
//! `tests/deploy.rs` runs the same code as a process of its own and sends it signals.

#[path = "rocket_app.rs"]
#[allow(dead_code)]
mod app;

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_transaction_barrier::metrics::BARRIER_WAIT_SECONDS;
use diesel_transaction_barrier::{
    BoxError, ConnectionPool, Handlers, Job, StopReason, Worker, WorkerBuilder, WorkerMonitor,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use rocket::fairing::AdHoc;
use rocket::http::{ContentType, Status};
use rocket::State;
use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("health") {
        return health();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Rocket's own lines (its launch, at warning level) only when they are errors.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rocket::=error")),
        )
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    match serve() {
        Ok(reason) => {
            tracing::info!(?reason, "worker stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "worker failed");
            ExitCode::FAILURE
        }
    }
}

fn serve() -> Result<StopReason, BoxError> {
    let settings = Settings::from_env()?;
    let handlers = Handlers::new().register(
        app::SEND_RECEIPT,
        |job: &Job, conn: &mut PgConnection| -> Result<(), BoxError> {
            let receipt = app::send_receipt(job, conn)?;
            // A real shop would send an email here. Side effects outside the database run at
            // least once: a worker that dies before the commit runs the job again.
            tracing::info!(
                order = receipt.order.id,
                cents = receipt.order.amount,
                jid = %receipt.jid,
                "receipt sent"
            );
            Ok(())
        },
    );
    let process = WorkerProcess::start(&settings, handlers, app::setup)?;
    tracing::info!(addr = %process.http_addr(), "serving /metrics, /livez and /readyz");
    process.run()
}

/// The process's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `DTB_QUEUES`, comma separated.
    pub queues: Vec<String>,
    /// `DTB_WORKERS`: handlers at once.
    pub workers: usize,
    /// `DTB_MAX_WAITING`: jobs waiting for their transactions at once.
    pub max_waiting: usize,
    /// `DTB_SHUTDOWN_TIMEOUT`, in seconds: how long a stop waits for running handlers.
    pub shutdown_timeout: Duration,
    /// `DTB_HTTP_ADDR`: where `/metrics`, `/livez` and `/readyz` are served (port 0: any).
    pub http_addr: SocketAddr,
}

impl Settings {
    /// Reads the settings from the environment. `FAKTORY_URL` is read by the worker itself.
    pub fn from_env() -> Result<Settings, BoxError> {
        let queues: Vec<String> = env_or("DTB_QUEUES", app::QUEUE.to_string())?
            .split(',')
            .map(|q| q.trim().to_string())
            .filter(|q| !q.is_empty())
            .collect();
        if queues.is_empty() {
            return Err("DTB_QUEUES names no queue".into());
        }
        let shutdown_timeout = env_or("DTB_SHUTDOWN_TIMEOUT", 20.0)?;
        Ok(Settings {
            database_url: app::database_url(),
            queues,
            workers: env_or("DTB_WORKERS", 4)?,
            max_waiting: env_or("DTB_MAX_WAITING", 32)?,
            shutdown_timeout: Duration::try_from_secs_f64(shutdown_timeout)
                .map_err(|e| format!("DTB_SHUTDOWN_TIMEOUT={shutdown_timeout}: {e}"))?,
            http_addr: env_or("DTB_HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 9100)))?,
        })
    }
}

fn env_or<T: FromStr>(name: &str, default: T) -> Result<T, BoxError>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse()
            .map_err(|e| format!("{name}={value:?}: {e}").into()),
        _ => Ok(default),
    }
}

/// A connected worker and its HTTP endpoints.
pub struct WorkerProcess {
    worker: Worker<PgConnection>,
    queues: Vec<String>,
    http: Http,
}

impl WorkerProcess {
    /// Installs the Prometheus recorder, runs `setup` on a connection of the pool, connects the
    /// worker (with signal handling) and starts serving HTTP. The recorder is global: once per
    /// process.
    pub fn start(
        settings: &Settings,
        handlers: Handlers<PgConnection>,
        setup: fn(&mut PgConnection) -> Result<(), BoxError>,
    ) -> Result<WorkerProcess, BoxError> {
        // Before the worker connects, which describes its metrics to the recorder installed then.
        let prometheus = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(BARRIER_WAIT_SECONDS.to_string()),
                &[0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0, 30.0, 120.0],
            )?
            .install_recorder()?;
        let upkeep = prometheus.clone();
        std::thread::Builder::new()
            .name("prometheus-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            })?;
        // One connection per handler, five for the waiter (a checking one and four
        // watchers), one for `/readyz`.
        let workers = u32::try_from(settings.workers)?;
        let pool = Pool::builder()
            .max_size(workers + 6)
            .connection_timeout(Duration::from_secs(10))
            .build(ConnectionManager::<PgConnection>::new(
                &settings.database_url,
            ))?;
        setup(&mut *pool.get()?)?;
        let worker = WorkerBuilder::new(pool.clone())
            .handlers(handlers)
            .workers(settings.workers)
            .max_waiting(settings.max_waiting)
            .shutdown_timeout(settings.shutdown_timeout)
            .handle_signals(true)
            .connect()?;
        let probe = Probe {
            monitor: worker.monitor(),
            pool,
            prometheus,
        };
        let http = Http::start(settings.http_addr, probe)?;
        Ok(WorkerProcess {
            worker,
            queues: settings.queues.clone(),
            http,
        })
    }

    /// Where `/metrics`, `/livez` and `/readyz` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.addr
    }

    /// The worker's monitor.
    pub fn monitor(&self) -> WorkerMonitor {
        self.worker.monitor()
    }

    /// Runs the worker until a signal stops it, then stops serving HTTP.
    pub fn run(mut self) -> Result<StopReason, BoxError> {
        let reason = self.worker.run(&self.queues);
        self.http.stop();
        Ok(reason?)
    }
}

/// What the HTTP endpoints read.
#[derive(Clone)]
struct Probe {
    monitor: WorkerMonitor,
    pool: ConnectionPool<PgConnection>,
    prometheus: PrometheusHandle,
}

impl Probe {
    /// Why the worker is not ready, if it is not.
    fn not_ready(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.monitor.is_connected() {
            why.push("not connected to faktory".to_string());
        }
        if self.monitor.is_quiet() {
            why.push("quiet: taking no new job".to_string());
        }
        let database = self
            .pool
            .get_timeout(Duration::from_secs(2))
            .map_err(|e| e.to_string())
            .and_then(|mut conn| conn.batch_execute("SELECT 1").map_err(|e| e.to_string()));
        if let Err(e) = database {
            why.push(format!("database: {e}"));
        }
        why
    }
}

#[rocket::get("/metrics")]
fn metrics(probe: &State<Probe>) -> (ContentType, String) {
    let text = ContentType::new("text", "plain").with_params(("version", "0.0.4"));
    (text, probe.prometheus.render())
}

#[rocket::get("/livez")]
fn livez() -> &'static str {
    "alive\n"
}

#[rocket::get("/readyz")]
async fn readyz(probe: &State<Probe>) -> (Status, String) {
    let probe = probe.inner().clone();
    match rocket::tokio::task::spawn_blocking(move || probe.not_ready()).await {
        Ok(why) if why.is_empty() => (Status::Ok, "ready\n".to_string()),
        Ok(why) => (
            Status::ServiceUnavailable,
            format!("not ready: {}\n", why.join("; ")),
        ),
        Err(e) => (Status::ServiceUnavailable, format!("not ready: {e}\n")),
    }
}

/// The HTTP server: Rocket, on a thread of its own, leaving the signals to the worker.
struct Http {
    addr: SocketAddr,
    shutdown: rocket::Shutdown,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Http {
    fn start(addr: SocketAddr, probe: Probe) -> Result<Http, BoxError> {
        let config = rocket::Config {
            address: addr.ip(),
            port: addr.port(),
            workers: 2,
            log_level: rocket::config::LogLevel::Critical,
            cli_colors: false,
            shutdown: rocket::config::Shutdown {
                ctrlc: false,
                #[cfg(unix)]
                signals: Default::default(),
                grace: 0,
                mercy: 0,
                ..Default::default()
            },
            ..rocket::Config::release_default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let rocket = rocket::custom(config)
            .manage(probe)
            .mount("/", rocket::routes![metrics, livez, readyz])
            .attach(AdHoc::on_liftoff("report the address", move |rocket| {
                Box::pin(async move {
                    let config = rocket.config();
                    let addr = SocketAddr::new(config.address, config.port);
                    let _ = tx.send((addr, rocket.shutdown()));
                })
            }));
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                rocket::execute(rocket.launch())
                    .map(drop)
                    .map_err(|e| e.to_string())
            })?;
        match rx.recv() {
            Ok((addr, shutdown)) => Ok(Http {
                addr,
                shutdown,
                thread,
            }),
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(format!("serving HTTP on {addr}: {e}").into()),
                _ => Err(format!("serving HTTP on {addr}: the server stopped").into()),
            },
        }
    }

    fn stop(self) {
        self.shutdown.notify();
        let _ = self.thread.join();
    }
}

/// `rocket_worker health`: asks `/readyz` of the worker at `DTB_HTTP_ADDR`; 0 when ready.
fn health() -> ExitCode {
    let check = || -> Result<(), BoxError> {
        let mut addr = env_or("DTB_HTTP_ADDR", SocketAddr::from(([127, 0, 0, 1], 9100)))?;
        if addr.ip().is_unspecified() {
            addr = ("localhost", addr.port())
                .to_socket_addrs()?
                .next()
                .ok_or("localhost does not resolve")?;
        }
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            stream,
            "GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
        match response.split_whitespace().nth(1) {
            Some("200") => Ok(()),
            _ => Err(body.to_string().into()),
        }
    };
    match check() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rocket_worker health: {e}");
            ExitCode::FAILURE
        }
    }
}
