//! Maintenance of the barrier table, as River keeps its own in one place: the
//! [reaper](reap_barriers) deletes rows whose job can no longer consume them, the
//! [reconciler](reconcile_barriers) pushes again the jobs of committed rows no worker took, and
//! [`Maintenance`] runs both on a thread of the worker's. [`inspect`] shows an operator what is
//! in the table.

pub mod inspect;
mod reaper;
mod reconciler;

pub use reaper::reap_barriers;
pub use reconciler::reconcile_barriers;

use crate::backend::{BarrierConnection, ConnectionPool};
use crate::error::chain;
use crate::producer::Producer;
use std::time::{Duration, Instant};

/// When the maintenance thread reaps and reconciles.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    /// How often to reap (zero: never).
    pub(crate) reap_interval: Duration,
    /// Rows older than this are reaped, and never reconciled.
    pub(crate) max_barrier_age: Duration,
    /// The reconciler's grace period (`None`: no reconciler).
    pub(crate) reconcile_grace: Option<Duration>,
}

/// The worker's maintenance thread; stops when dropped.
#[derive(Debug)]
pub(crate) struct Maintenance {
    _stop: crossbeam_channel::Sender<()>,
}

impl Maintenance {
    /// Starts the thread, unless both the reaper and the reconciler are off.
    pub(crate) fn start<C: BarrierConnection>(
        pool: ConnectionPool<C>,
        producer: Producer,
        cfg: &Schedule,
    ) -> Option<Maintenance> {
        let cfg = cfg.clone();
        // The reconciler looks every quarter of its grace period, at most every minute.
        let reconcile_every = cfg
            .reconcile_grace
            .map(|g| (g / 4).clamp(Duration::from_millis(50), Duration::from_secs(60)));
        let reap_every = Some(cfg.reap_interval).filter(|d| !d.is_zero());
        let tick = reap_every.into_iter().chain(reconcile_every).min()?;
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let spawned = std::thread::Builder::new()
            .name("dtb-maintenance".into())
            .spawn(move || {
                let started = Instant::now();
                let mut next_reap = reap_every.map(|every| started + every);
                let mut next_reconcile = reconcile_every.map(|every| started + every);
                // Until the worker drops its end of the channel.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(tick)
                {
                    let now = Instant::now();
                    let reap = next_reap.is_some_and(|at| now >= at);
                    let reconcile = next_reconcile.is_some_and(|at| now >= at);
                    if !reap && !reconcile {
                        continue;
                    }
                    let mut conn = match pool.get() {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %chain(&e), "maintenance: no database connection");
                            continue;
                        }
                    };
                    if reap {
                        next_reap = reap_every.map(|every| now + every);
                        if let Err(e) = reap_barriers(&mut *conn, cfg.max_barrier_age) {
                            tracing::warn!(error = %chain(&e), "reaping old barriers failed");
                        }
                    }
                    if let (true, Some(grace)) = (reconcile, cfg.reconcile_grace) {
                        next_reconcile = reconcile_every.map(|every| now + every);
                        if let Err(e) =
                            reconcile_barriers(&mut *conn, &producer, grace, cfg.max_barrier_age)
                        {
                            tracing::warn!(error = %chain(&e), "reconciling unconsumed barriers failed");
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Maintenance { _stop: stop }),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the maintenance thread: no reaper, no reconciler");
                None
            }
        }
    }
}
