//! The process's signals, for a worker built with
//! [`handle_signals(true)`](super::WorkerBuilder::handle_signals), after the convention of
//! Sidekiq and faktory_worker_ruby: SIGTERM and SIGINT stop the worker gracefully (the drain of
//! [`ShutdownHandle::shutdown`](super::ShutdownHandle::shutdown)), a second one stops it at
//! once, and SIGTSTP quiets it (no new job; what runs finishes).
//!
//! [`Control`] is what the signal listener and the run loop share: the run loop reads it in
//! `super::run_async`, `super::quiet_until_idle` and `super::drain`.

use super::monitor::StopReason;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A signal that stopped a worker; see [`StopReason::Signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Signal {
    /// SIGTERM: what `systemctl stop`, `docker stop` and Kubernetes send.
    Term,
    /// SIGINT: Ctrl-C in a terminal.
    Int,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
        })
    }
}

/// How the worker was asked to quiet or to stop, beside its shutdown channel.
#[derive(Debug)]
pub(crate) struct Control {
    /// Set by SIGTSTP: the worker takes no new job, and ends its run once nothing it took
    /// before is left.
    quiet: watch::Sender<bool>,
    /// Set once a quiet worker has nothing of its own left, or a stop began: the jobs its
    /// fetch slots hold go back to Faktory.
    released: watch::Sender<bool>,
    /// Jobs fetched while quiet, held (not run) until released.
    pub(crate) held: Arc<AtomicUsize>,
    /// Set by a second SIGTERM or SIGINT: the drain waits no longer.
    immediate: AtomicBool,
    /// The SIGTERM or SIGINT that stopped the worker (the second one, when there were two).
    signal: Mutex<Option<Signal>>,
}

impl Control {
    pub(crate) fn new() -> Control {
        Control {
            quiet: watch::channel(false).0,
            released: watch::channel(false).0,
            held: Arc::default(),
            immediate: AtomicBool::new(false),
            signal: Mutex::new(None),
        }
    }

    /// Whether SIGTSTP quieted the worker.
    pub(crate) fn is_quiet(&self) -> bool {
        *self.quiet.borrow()
    }

    /// Resolves once the worker is quiet.
    pub(crate) async fn quieted(&self) {
        let _ = self.quiet.subscribe().wait_for(|quiet| *quiet).await;
    }

    /// Whether a job fetched now must be held: the worker is quiet and still finishing what
    /// it took before.
    pub(crate) fn holds_new_jobs(&self) -> bool {
        self.is_quiet() && !*self.released.borrow()
    }

    /// Lets the held jobs go back to Faktory.
    pub(crate) fn release(&self) {
        self.released.send_replace(true);
    }

    /// Resolves once the held jobs may go back to Faktory.
    pub(crate) async fn released(&self) {
        let _ = self.released.subscribe().wait_for(|r| *r).await;
    }

    /// Whether a second SIGTERM or SIGINT asked for a stop at once.
    pub(crate) fn immediate(&self) -> bool {
        self.immediate.load(Ordering::SeqCst)
    }

    /// Why the run ended: the signal that stopped it, if any, else `otherwise`.
    pub(crate) fn reason(&self, otherwise: StopReason) -> StopReason {
        match *self.signal.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(signal) => StopReason::Signal {
                signal,
                immediate: self.immediate(),
            },
            None => otherwise,
        }
    }

    fn quiet_on_signal(&self) {
        if !self.quiet.send_replace(true) {
            tracing::info!("SIGTSTP: worker quiet; it takes no new job, and what it runs finishes");
        }
    }

    fn stop_on_signal(&self, signal: Signal, shutdown: &watch::Sender<bool>) {
        *self.signal.lock().unwrap_or_else(|e| e.into_inner()) = Some(signal);
        if shutdown.send_replace(true) {
            self.immediate.store(true, Ordering::SeqCst);
            tracing::warn!(%signal, "second stop signal: stopping at once; handlers still running are failed back to faktory");
        } else {
            tracing::info!(%signal, "stopping: waiting jobs go back to faktory, running handlers may finish");
        }
    }
}

/// The signal listener of one run; stops listening when dropped (the process keeps the
/// handlers installed: the signals are then ignored).
#[derive(Debug)]
pub(crate) struct Listening(tokio::task::JoinHandle<()>);

impl Drop for Listening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Installs the signal handlers now (a signal that arrives after this returns is seen), and
/// acts on each signal until the returned guard is dropped. Must be called on a Tokio runtime
/// with its I/O driver enabled.
pub(crate) fn listen(
    control: Arc<Control>,
    shutdown: Arc<watch::Sender<bool>>,
) -> std::io::Result<Listening> {
    let mut signals = Signals::new()?;
    Ok(Listening(tokio::spawn(async move {
        loop {
            match signals.next().await {
                Received::Quiet => control.quiet_on_signal(),
                Received::Stop(signal) => control.stop_on_signal(signal, &shutdown),
            }
        }
    })))
}

enum Received {
    Quiet,
    Stop(Signal),
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    tstp: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            tstp: signal(SignalKind::from_raw(libc::SIGTSTP))?,
        })
    }

    async fn next(&mut self) -> Received {
        tokio::select! {
            Some(()) = self.term.recv() => Received::Stop(Signal::Term),
            Some(()) = self.int.recv() => Received::Stop(Signal::Int),
            Some(()) = self.tstp.recv() => Received::Quiet,
            else => std::future::pending().await,
        }
    }
}

/// Elsewhere than on Unix, Ctrl-C only (as SIGINT).
#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn next(&mut self) -> Received {
        match tokio::signal::ctrl_c().await {
            Ok(()) => Received::Stop(Signal::Int),
            Err(_) => std::future::pending().await,
        }
    }
}
