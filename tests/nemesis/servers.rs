//! The servers the nemesis crashes, all private to one run: a PostgreSQL cluster or a MariaDB
//! server in a temporary folder on a free port, and a Faktory server (the in-process test
//! server, or a genuine one when `FAKTORY_NEMESIS_GENUINE` names its folder).

use diesel_transaction_barrier::testing::TestServer;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (and, with `pair`, the next one free too).
pub fn free_port(pair: bool) -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        if port < 65000 && (!pair || TcpListener::bind(("127.0.0.1", port + 1)).is_ok()) {
            return port;
        }
    }
    panic!("no free pair of ports");
}

/// Runs `cmd`, panicking with its output unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `ready` holds, checking every 50 ms, for at most `timeout`.
fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A database server of one run's own.
pub trait DbServer: Send {
    /// The URL of its database.
    fn url(&self) -> String;
    /// Crashes it (no clean shutdown: what is not on disk is lost, sessions die unwarned).
    fn crash(&mut self);
    /// Starts it again on its data (crash recovery) and returns once it accepts connections.
    fn start(&mut self);
    /// Stops it for good.
    fn stop(&mut self);
}

/// A PostgreSQL cluster in a folder of its own, run as the `postgres` user.
pub struct PrivatePg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    running: bool,
}

impl PrivatePg {
    /// The server binaries: PostgreSQL 15's, else the newest installed.
    fn bin() -> PathBuf {
        let root = Path::new("/usr/lib/postgresql");
        let mut versions: Vec<_> = std::fs::read_dir(root)
            .expect("PostgreSQL server binaries in /usr/lib/postgresql")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("pg_ctl").exists())
            .collect();
        versions.sort();
        versions.pop().expect("pg_ctl")
    }

    pub fn create(dir: &Path) -> PrivatePg {
        let bin = Self::bin();
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("chown").arg("postgres").arg(dir));
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]));
        let mut pg = PrivatePg {
            dir: dir.to_path_buf(),
            bin,
            port: free_port(false),
            running: false,
        };
        pg.start();
        pg
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(args);
        cmd
    }
}

impl DbServer for PrivatePg {
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn crash(&mut self) {
        run(&mut self.pg_ctl(&["stop", "-m", "immediate", "-w"]));
        self.running = false;
    }

    fn start(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 \
             -c shared_buffers=32MB",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log");
        run(&mut self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            "120",
            "-l",
            log.to_str().unwrap(),
            "-o",
            &options,
        ]));
        self.running = true;
    }

    fn stop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]).output();
            self.running = false;
        }
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An SQLite database file in a folder of its own: nothing to crash (its "server" is the
/// processes that open it).
pub struct PrivateSqlite {
    path: PathBuf,
}

impl PrivateSqlite {
    pub fn create(dir: &Path) -> PrivateSqlite {
        std::fs::create_dir_all(dir).unwrap();
        PrivateSqlite {
            path: dir.join("nemesis.db"),
        }
    }
}

impl DbServer for PrivateSqlite {
    fn url(&self) -> String {
        self.path.display().to_string()
    }
    fn crash(&mut self) {}
    fn start(&mut self) {}
    fn stop(&mut self) {}
}

/// A MariaDB (or MySQL) server in a folder of its own, its process a child of the test.
pub struct PrivateMaria {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateMaria {
    pub fn create(dir: &Path) -> PrivateMaria {
        std::fs::create_dir_all(dir).unwrap();
        let install = ["mariadb-install-db", "mysql_install_db"]
            .into_iter()
            .find(|c| {
                Command::new("which")
                    .arg(c)
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("mariadb-install-db");
        run(Command::new(install)
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--user=root",
                "--skip-test-db",
            ]));
        let mut maria = PrivateMaria {
            dir: dir.to_path_buf(),
            port: free_port(false),
            child: None,
        };
        maria.start();
        run(Command::new("mysql").args([
            "-h127.0.0.1",
            &format!("-P{}", maria.port),
            "-uroot",
            "-e",
            "CREATE DATABASE nemesis",
        ]));
        maria
    }

    fn server_binary() -> &'static str {
        ["/usr/sbin/mariadbd", "/usr/sbin/mysqld"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("/usr/sbin/mariadbd")
    }
}

impl DbServer for PrivateMaria {
    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/nemesis", self.port)
    }

    fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn start(&mut self) {
        let d = &self.dir;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("server.log"))
            .unwrap();
        let child = Command::new(Self::server_binary())
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-name-resolve",
                "--max-connections=400",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=1",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting mariadbd");
        self.child = Some(child);
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        let port = self.port;
        let child = self.child.as_mut().unwrap();
        wait_for(
            "MariaDB to accept connections",
            Duration::from_secs(120),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("mariadbd exited at start ({status}); see its server.log");
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    && Command::new("mysql")
                        .args([
                            "-h127.0.0.1",
                            &format!("-P{port}"),
                            "-uroot",
                            "-e",
                            "SELECT 1",
                        ])
                        .output()
                        .is_ok_and(|o| o.status.success())
            },
        );
    }

    fn stop(&mut self) {
        self.crash();
    }
}

impl Drop for PrivateMaria {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Jobs a Faktory server holds, from its `INFO`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaktoryJobs {
    pub queued: u64,
    pub scheduled: u64,
    pub retries: u64,
    pub working: u64,
    pub dead: u64,
}

impl FaktoryJobs {
    pub fn total(&self) -> u64 {
        self.queued + self.scheduled + self.retries + self.working + self.dead
    }
}

/// Reads the server's `INFO` over a connection of its own.
pub fn faktory_jobs(addr: &str) -> std::io::Result<FaktoryJobs> {
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?; // +HI
    writer.write_all(b"HELLO {\"v\":2}\r\n")?;
    line.clear();
    reader.read_line(&mut line)?; // +OK
    writer.write_all(b"INFO\r\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    let len: usize = line
        .trim()
        .strip_prefix('$')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("INFO answered {line:?}")))?;
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let _ = writer.write_all(b"END\r\n");
    let info: serde_json::Value = serde_json::from_slice(&body).map_err(std::io::Error::other)?;
    let f = &info["faktory"];
    let size = |task: &str, set: &str| {
        f["tasks"][task]["size"]
            .as_u64()
            .or_else(|| f["sets"][set].as_u64())
            .unwrap_or(0)
    };
    let queued = f["queues"]
        .as_object()
        .map_or(0, |q| q.values().filter_map(|v| v.as_u64()).sum());
    Ok(FaktoryJobs {
        queued,
        scheduled: size("Scheduled", "scheduled"),
        retries: size("Retries", "retries"),
        working: f["sets"]["working"]
            .as_u64()
            .or_else(|| f["tasks"]["Working"]["size"].as_u64())
            .unwrap_or(0),
        dead: size("Dead", "dead"),
    })
}

/// The Faktory server of one run.
pub enum Broker {
    /// The in-process test server (`None` while crashed).
    InProcess {
        server: Option<TestServer>,
        addr: SocketAddr,
        retry_delay: Duration,
    },
    /// A genuine server started with `start.sh PORT DATADIR` from its folder.
    Genuine {
        folder: PathBuf,
        port: u16,
        data: PathBuf,
        scratch: PathBuf,
        generation: u32,
        pid: Option<u32>,
    },
}

impl Broker {
    fn in_process_builder(
        retry_delay: Duration,
    ) -> diesel_transaction_barrier::testing::TestServerBuilder {
        TestServer::builder()
            .retry_delay(retry_delay)
            .min_reserve_for(Duration::ZERO)
    }

    /// The in-process server, failed jobs retried after `retry_delay`.
    pub fn in_process(retry_delay: Duration) -> Broker {
        let server = Self::in_process_builder(retry_delay)
            .start()
            .expect("the in-process Faktory server");
        Broker::InProcess {
            addr: server.addr(),
            server: Some(server),
            retry_delay,
        }
    }

    /// A genuine server from `folder` (with `start.sh` and `stop.sh`), its data in folders
    /// under `scratch`.
    pub fn genuine(folder: &Path, scratch: &Path) -> Broker {
        let mut broker = Broker::Genuine {
            folder: folder.to_path_buf(),
            port: free_port(true),
            data: scratch.join("faktory-0"),
            scratch: scratch.to_path_buf(),
            generation: 0,
            pid: None,
        };
        broker.start();
        broker
    }

    pub fn is_genuine(&self) -> bool {
        matches!(self, Broker::Genuine { .. })
    }

    pub fn addr(&self) -> String {
        match self {
            Broker::InProcess { addr, .. } => addr.to_string(),
            Broker::Genuine { port, .. } => format!("127.0.0.1:{port}"),
        }
    }

    pub fn url(&self) -> String {
        format!("tcp://{}", self.addr())
    }

    fn start(&mut self) {
        if let Broker::Genuine {
            folder,
            port,
            data,
            pid,
            ..
        } = self
        {
            // The port was just released by the killed server: a few tries.
            let mut last = String::new();
            for _ in 0..50 {
                let out = Command::new(folder.join("start.sh"))
                    .arg(port.to_string())
                    .arg(&*data)
                    .output()
                    .expect("start.sh");
                if out.status.success() {
                    *pid = Some(
                        String::from_utf8_lossy(&out.stdout)
                            .trim()
                            .parse()
                            .expect("a pid"),
                    );
                    return;
                }
                last = String::from_utf8_lossy(&out.stderr).into_owned();
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("the genuine Faktory server did not start: {last}");
        }
    }

    /// Crashes the server and starts it again: on its data (`keep`), or on none (broker
    /// loss).
    pub fn crash(&mut self, keep: bool, down: Duration) {
        match self {
            Broker::InProcess {
                server,
                addr,
                retry_delay,
            } => {
                let data = server.take().expect("running").shutdown_keeping_data();
                std::thread::sleep(down);
                let builder = Self::in_process_builder(*retry_delay).bind(*addr);
                let started = if keep {
                    builder.start_with_data(data)
                } else {
                    builder.start()
                };
                *server = Some(started.expect("the in-process Faktory server starts again"));
            }
            Broker::Genuine {
                pid,
                data,
                scratch,
                generation,
                ..
            } => {
                let p = pid.take().expect("running");
                // Faktory's Redis dies with it.
                run(Command::new("kill").args(["-KILL", &p.to_string()]));
                wait_for("Faktory to die", Duration::from_secs(20), || {
                    !Path::new(&format!("/proc/{p}/exe")).exists()
                        || std::fs::read_to_string(format!("/proc/{p}/stat"))
                            .map_or(true, |s| s.split(' ').nth(2) == Some("Z"))
                });
                std::thread::sleep(down);
                if !keep {
                    *generation += 1;
                    *data = scratch.join(format!("faktory-{generation}"));
                }
                self.start();
            }
        }
    }

    pub fn jobs(&self) -> std::io::Result<FaktoryJobs> {
        faktory_jobs(&self.addr())
    }

    pub fn stop(&mut self) {
        match self {
            Broker::InProcess { server, .. } => drop(server.take()),
            Broker::Genuine { folder, pid, .. } => {
                if let Some(p) = pid.take() {
                    let _ = Command::new(folder.join("stop.sh"))
                        .arg(p.to_string())
                        .output();
                }
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
