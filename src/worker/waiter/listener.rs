//! The waiter's listening connection, on backends whose hints are heard on one (PostgreSQL's
//! `LISTEN`, SQLite's newly visible rows): taking it (from the worker's pool, or from a
//! `listen_url` of its own), making it listen, proving that it hears hints, and giving it up
//! when it does not.
//!
//! A `LISTEN` through PgBouncer in transaction pooling mode is accepted and never hears
//! anything, so before listening the listener looks for a session its connection visibly
//! shares with the waiter's checking one (`Listen::shares_sessions`; no listening then), and a
//! new listening connection must prove that it hears hints: the waiter sends one itself
//! (`Listen::send_test_hint`), and a listener that hears nothing within [`HINT_TEST_TIMEOUT`]
//! is given up on. Either way the waiter warns, and its checks alone find every commit.

use crate::backend::{BarrierConnection, ConnectionPool, Hint, Listen};
use crate::error::chain;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) type Pooled<C> = r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>;

/// How long a new listening connection may take to hear a hint (the waiter's own test hint, or
/// any other) before the waiter stops listening and relies on its checks alone.
pub(crate) const HINT_TEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the listener waits before it tries again to take a connection.
const RETRY: Duration = Duration::from_millis(500);

/// A listening connection. However it is let go of — a stop, an error, a panic — it stops
/// listening before it goes back to the pool, or, when it cannot, is marked broken so that the
/// pool discards it: a pooled connection still listening would never read what it receives,
/// and PostgreSQL keeps every notification until all its listeners have read it, until its
/// queue is full and every producer's `COMMIT` fails.
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

/// Where a new listening connection stands in proving that it hears hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HintTest {
    /// Nothing to prove: no listener, or it heard a hint, or the backend needs no test.
    Done,
    /// A test hint is to be sent (once the checking connection is there).
    Due,
    /// A test hint was sent; the listener must hear a hint by then.
    Sent(Instant),
}

/// The waiter's listening connection, and what it knows about it.
pub(super) struct Listener<C: BarrierConnection> {
    listen: &'static dyn Listen<C>,
    /// Where the listening connection comes from; `None` once the listener was given up on.
    pool: Option<ConnectionPool<C>>,
    listening: Option<Listening<C>>,
    test: HintTest,
    /// Set while the listening connection is known to hear hints (for the monitor).
    hearing: Arc<AtomicBool>,
    /// For the warnings: how late a job may start without hints.
    check_interval: Duration,
    retry_at: Instant,
}

impl<C: BarrierConnection> Listener<C> {
    pub(super) fn new(
        listen: &'static dyn Listen<C>,
        pool: ConnectionPool<C>,
        hearing: Arc<AtomicBool>,
        check_interval: Duration,
    ) -> Self {
        Listener {
            listen,
            pool: Some(pool),
            listening: None,
            test: HintTest::Done,
            hearing,
            check_interval,
            retry_at: Instant::now(),
        }
    }

    /// How often the listening connection is to be read; `None` while nothing listens.
    pub(super) fn poll_interval(&self) -> Option<Duration> {
        self.listening.as_ref().map(|_| self.listen.poll_interval())
    }

    /// Makes sure a connection listens, and sends the test hint a new one is due, from
    /// `checker`, the waiter's checking connection (which is also what the new connection must
    /// not share a session with).
    pub(super) fn ensure(&mut self, checker: &mut C) {
        if let (None, Some(pool)) = (&self.listening, self.pool.clone()) {
            if Instant::now() < self.retry_at {
                return;
            }
            let taken = (|| -> Result<(), crate::Error> {
                let mut conn = pool.get()?;
                if self.listen.shares_sessions(&mut conn, checker)? {
                    tracing::warn!(
                        check_interval = ?self.check_interval,
                        "the waiter's listening connection shares its server session with \
                         other clients (PgBouncer in transaction pooling mode?), where a LISTEN \
                         hears nothing: the waiter does not listen, and finds commits by its \
                         checks alone (give the worker a direct listen_url, or turn \
                         commit_hints off)"
                    );
                    self.pool = None;
                } else {
                    self.listening = Some(Listening::start(self.listen, conn)?);
                    self.test = HintTest::Due;
                }
                Ok(())
            })();
            if let Err(e) = taken {
                tracing::warn!(error = %chain(&e), "the waiter cannot get its listening connection; retrying");
                self.retry_at = Instant::now() + RETRY;
            }
        }
        if self.test != HintTest::Due {
            return;
        }
        match self.listen.send_test_hint(checker, &uuid::Uuid::new_v4()) {
            Ok(true) => self.test = HintTest::Sent(Instant::now() + HINT_TEST_TIMEOUT),
            Ok(false) => {
                self.test = HintTest::Done;
                self.hearing.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                // The checking connection failed: the waiter takes another and tries again.
                tracing::warn!(error = %chain(&e), "the waiter could not send its test hint");
            }
        }
    }

    /// The hints heard since the last call. A listener that has not heard its test hint in
    /// time is given up on; one that fails is closed, and taken again later. Returns whether
    /// it failed (the caller then checks everything, in case a hint was lost).
    pub(super) fn take(&mut self) -> Result<Vec<Hint>, ()> {
        let Some(listening) = self.listening.as_mut() else {
            return Ok(Vec::new());
        };
        match self.listen.take(&mut listening.conn) {
            Ok(hints) => {
                if !hints.is_empty() && self.test != HintTest::Done {
                    // Any hint proves that the listener hears them.
                    self.test = HintTest::Done;
                    self.hearing.store(true, Ordering::SeqCst);
                    tracing::debug!("the waiter's listening connection hears commit hints");
                }
                if let HintTest::Sent(by) = self.test {
                    if Instant::now() >= by {
                        tracing::warn!(
                            check_interval = ?self.check_interval,
                            "the waiter's listening connection heard no commit hint, not even its \
                             own test hint, within {HINT_TEST_TIMEOUT:?}: the waiter stops \
                             listening and finds commits by its checks alone (a LISTEN through \
                             PgBouncer in transaction pooling mode hears nothing: give the worker \
                             a direct listen_url, or turn commit_hints off)"
                        );
                        self.close();
                        self.pool = None;
                    }
                }
                Ok(hints)
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "the waiter's listening connection failed; reconnecting");
                self.close();
                Err(())
            }
        }
    }

    /// Stops listening (dropping the connection makes it `UNLISTEN`).
    pub(super) fn close(&mut self) {
        self.listening = None;
        self.test = HintTest::Done;
        self.hearing.store(false, Ordering::SeqCst);
    }
}
