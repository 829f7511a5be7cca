//! Connections kept for the handler slots: a run takes one kept by an earlier run, else one
//! from the pool, and keeps it afterwards — sparing each job a pool checkout and r2d2's health
//! query (`SELECT 1` with its default `test_on_check_out`). A connection goes back to the
//! pool, where the pool's own checks and lifetimes apply, when its run failed on the database
//! or left it in a transaction, and after [`KEEP_FOR`]; at most one per handler slot is kept.

use crate::backend::{diesel_transaction, BarrierConnection, ConnectionPool, DieselTransaction};
use diesel::r2d2::{ConnectionManager, PooledConnection};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a connection is kept before it goes back to the pool.
const KEEP_FOR: Duration = Duration::from_secs(60);

/// A pooled connection, and since when it is kept.
pub(super) struct Slot<C: BarrierConnection> {
    pub(super) conn: PooledConnection<ConnectionManager<C>>,
    since: Instant,
    /// Taken from the pool for this run (and tested there), not kept from an earlier one.
    pub(super) fresh: bool,
}

/// The kept connections.
pub(super) struct Kept<C: BarrierConnection> {
    idle: Mutex<Vec<Slot<C>>>,
    max: usize,
}

impl<C: BarrierConnection> Kept<C> {
    /// Keeps at most `max` connections (one per handler slot).
    pub(super) fn new(max: usize) -> Kept<C> {
        Kept {
            idle: Mutex::new(Vec::with_capacity(max)),
            max,
        }
    }

    /// A kept connection, or one from `pool`.
    pub(super) fn take(&self, pool: &ConnectionPool<C>) -> Result<Slot<C>, r2d2::Error> {
        let kept = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match kept {
            Some(slot) if slot.since.elapsed() < KEEP_FOR => Ok(Slot {
                fresh: false,
                ..slot
            }),
            // Too old: back to the pool (dropped), and a fresh one instead.
            _ => self.take_fresh(pool),
        }
    }

    /// A connection from `pool`.
    pub(super) fn take_fresh(&self, pool: &ConnectionPool<C>) -> Result<Slot<C>, r2d2::Error> {
        Ok(Slot {
            conn: pool.get()?,
            since: Instant::now(),
            fresh: true,
        })
    }

    /// Keeps `slot` after a run (`healthy`: it did not fail on the database), unless it must
    /// go back to the pool.
    pub(super) fn give_back(&self, mut slot: Slot<C>, healthy: bool) {
        if !healthy
            || diesel_transaction(&mut *slot.conn) != DieselTransaction::None
            || slot.since.elapsed() >= KEEP_FOR
        {
            return;
        }
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.max {
            idle.push(slot);
        }
    }
}
