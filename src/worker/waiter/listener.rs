//! The waiter's listening connection, on backends whose hints are heard on one (SQLite's newly
//! visible rows): taking it from the worker's pool, making it listen, reading it, and letting
//! it go cleanly.

use crate::backend::{BarrierConnection, ConnectionPool, Hint, Listen};
use crate::error::chain;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) type Pooled<C> = r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>;

/// How long the listener waits before it tries again to take a connection.
const RETRY: Duration = Duration::from_millis(500);

/// A listening connection. However it is let go of — a stop, an error, a panic — it stops
/// listening before it goes back to the pool, or, when it cannot, is marked broken so that the
/// pool discards it.
pub(crate) struct Listening<C: BarrierConnection> {
    pub(super) conn: Pooled<C>,
    listen: &'static dyn Listen<C>,
}

impl<C: BarrierConnection> Listening<C> {
    /// Makes `conn` listen for commit hints.
    pub(crate) fn start(
        listen: &'static dyn Listen<C>,
        mut conn: Pooled<C>,
    ) -> diesel::QueryResult<Self> {
        match listen.listen(&mut conn) {
            Ok(()) => Ok(Listening { conn, listen }),
            Err(e) => {
                crate::backend::poison(&mut *conn);
                Err(e)
            }
        }
    }
}

impl<C: BarrierConnection> Drop for Listening<C> {
    fn drop(&mut self) {
        if let Err(e) = self.listen.unlisten(&mut self.conn) {
            tracing::debug!(error = %chain(&e), "a listening connection could not stop listening; it is discarded");
            crate::backend::poison(&mut *self.conn);
        }
    }
}

/// The waiter's listening connection.
pub(super) struct Listener<C: BarrierConnection> {
    listen: &'static dyn Listen<C>,
    pool: ConnectionPool<C>,
    listening: Option<Listening<C>>,
    /// Set while a connection listens (for the monitor).
    hearing: Arc<AtomicBool>,
    retry_at: Instant,
}

impl<C: BarrierConnection> Listener<C> {
    pub(super) fn new(
        listen: &'static dyn Listen<C>,
        pool: ConnectionPool<C>,
        hearing: Arc<AtomicBool>,
    ) -> Self {
        Listener {
            listen,
            pool,
            listening: None,
            hearing,
            retry_at: Instant::now(),
        }
    }

    /// How often the listening connection is to be read; `None` while nothing listens.
    pub(super) fn poll_interval(&self) -> Option<Duration> {
        self.listening.as_ref().map(|_| self.listen.poll_interval())
    }

    /// Makes sure a connection listens.
    pub(super) fn ensure(&mut self) {
        if self.listening.is_some() || Instant::now() < self.retry_at {
            return;
        }
        let started = self
            .pool
            .get()
            .map_err(crate::Error::from)
            .and_then(|conn| Ok(Listening::start(self.listen, conn)?));
        match started {
            Ok(listening) => {
                self.listening = Some(listening);
                self.hearing.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "the waiter cannot get its listening connection; retrying");
                self.retry_at = Instant::now() + RETRY;
            }
        }
    }

    /// The hints heard since the last call. One that fails is closed, and taken again later.
    /// Returns whether it failed (the caller then checks everything, in case a hint was lost).
    pub(super) fn take(&mut self) -> Result<Vec<Hint>, ()> {
        let Some(listening) = self.listening.as_mut() else {
            return Ok(Vec::new());
        };
        match self.listen.take(&mut listening.conn) {
            Ok(hints) => Ok(hints),
            Err(e) => {
                tracing::warn!(error = %chain(&e), "the waiter's listening connection failed; reconnecting");
                self.close();
                Err(())
            }
        }
    }

    /// Stops listening (dropping the connection makes it stop).
    pub(super) fn close(&mut self) {
        self.listening = None;
        self.hearing.store(false, Ordering::SeqCst);
    }
}
