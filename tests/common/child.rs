//! Child processes: this test binary run again with only one of its `#[ignore]`d tests (which
//! does nothing unless started this way), told what to do through environment variables, and
//! talking to the test over its stdin and stdout.

use crossbeam_channel::{unbounded, Receiver};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A child process running one test of this binary; killed on drop if still running.
pub struct ChildTest {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl ChildTest {
    /// Starts this test binary with only its test `name`, and `vars` in its environment.
    pub fn start(name: &str, vars: &[(&str, String)]) -> ChildTest {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                name,
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the child process {name}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = unbounded();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        ChildTest {
            child,
            stdin,
            lines,
        }
    }

    /// Writes one line to the child's stdin.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        writeln!(self.stdin, "{line}")
    }

    /// What follows `marker` on the next line of the child's stdout that contains it (the
    /// test harness may have begun the line), or `None` after `timeout`.
    pub fn next_after(&self, marker: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.lines.recv_deadline(deadline).ok()?;
            if let Some((_, rest)) = line.split_once(marker) {
                return Some(rest.to_string());
            }
        }
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends the child the signal `name` (`TERM`, `INT`, `TSTP`, ...) through `kill`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill -s {name}: {e}"));
        assert!(status.success(), "kill -s {name}: {status}");
    }

    /// The child's exit status once it exited, or `None` if it still runs after `timeout`.
    pub fn wait_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child's status") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills the child with SIGKILL and waits for it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL the child process");
        self.wait()
    }

    /// Waits for the child to exit.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("the child process's exit status")
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
