//! What the [`TestServer`](crate::TestServer) handle and every server thread share: the
//! state behind one lock, the condition variable notified on each change, the configuration
//! and the open connections.

use crate::state::{Config, State};
use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::AtomicU64;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// State shared by the handle and every server thread.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Notified on every change of `state`.
    changed: Condvar,
    pub(crate) config: Config,
    pub(crate) started: Instant,
    /// Open client sockets, so that shutdown can close them.
    pub(crate) conns: Mutex<HashMap<u64, TcpStream>>,
    /// Connection threads, joined at shutdown.
    pub(crate) handles: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) next_conn: AtomicU64,
}

impl Shared {
    pub(crate) fn new(config: Config, state: State) -> Shared {
        Shared {
            state: Mutex::new(state),
            changed: Condvar::new(),
            config,
            started: Instant::now(),
            conns: Mutex::new(HashMap::new()),
            handles: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    pub(crate) fn notify(&self) {
        self.changed.notify_all();
    }
}
