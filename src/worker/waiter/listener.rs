//! The waiter's listening connection.

use crate::backend::BarrierConnection;
use crate::error::chain;

pub(crate) type Pooled<C> = r2d2::PooledConnection<diesel::r2d2::ConnectionManager<C>>;

/// The waiter's listening connection. However it is let go of — a stop, an error, a panic — it
/// stops listening before it goes back to the pool, or, when it cannot, is marked broken so
/// that the pool discards it: a pooled connection still listening would never read what it
/// receives, and PostgreSQL keeps every notification until all its listeners have read it,
/// until its queue is full and every producer's `COMMIT` fails.
pub(crate) struct Listener<C: BarrierConnection>(pub(super) Pooled<C>);

impl<C: BarrierConnection> Listener<C> {
    /// Makes `conn` listen for commit hints.
    pub(crate) fn start(mut conn: Pooled<C>) -> diesel::QueryResult<Self> {
        match conn.listen_for_commits() {
            Ok(()) => Ok(Listener(conn)),
            Err(e) => {
                crate::backend::poison(&mut *conn);
                Err(e)
            }
        }
    }

    pub(super) fn take_commit_hints(&mut self) -> diesel::QueryResult<Vec<uuid::Uuid>> {
        self.0.take_commit_hints()
    }
}

impl<C: BarrierConnection> Drop for Listener<C> {
    fn drop(&mut self) {
        if let Err(e) = self.0.stop_listening() {
            tracing::debug!(error = %chain(&e), "a listening connection could not stop listening; it is discarded");
            crate::backend::poison(&mut *self.0);
        }
    }
}
