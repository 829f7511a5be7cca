//! The barrier table's migrations.

use crate::backend::BarrierConnection;
use crate::error::Result;

/// Creates the barrier table (and, on PostgreSQL, its wait function) if they are not there yet.
///
/// The migrations are embedded in the crate (`migrations/{postgres,mysql,sqlite}` in its
/// sources) and applied through Diesel's `MigrationHarness`, so they are recorded in
/// `__diesel_schema_migrations` beside the application's own. Run it once at deployment or
/// start-up, on the database that the producers' transactions write to. Applications that manage
/// their own migrations can copy the SQL instead (see the crate docs).
pub fn run_migrations<C: BarrierConnection>(conn: &mut C) -> Result<()> {
    conn.run_migrations()
}

/// Whether the barrier table is present on `conn`'s database.
pub fn barrier_schema_present<C: BarrierConnection>(conn: &mut C) -> Result<bool> {
    Ok(conn.barrier_schema_present()?)
}

/// Deletes barrier rows created more than `older_than` ago — rows whose job can no longer
/// consume them (it gave up, was lost, or died in Faktory's dead set) — and logs each one.
/// Returns how many it deleted.
///
/// Workers call it periodically (see
/// [`WorkerBuilder::reap_interval`](crate::WorkerBuilder::reap_interval)). `older_than` must
/// exceed the longest time a committed job may still run, or the job will be treated as
/// aborted when it finally does.
pub fn reap_barriers<C: BarrierConnection>(
    conn: &mut C,
    older_than: std::time::Duration,
) -> Result<usize> {
    let reaped = conn.reap(older_than)?;
    for r in &reaped {
        tracing::warn!(barrier_id = %r.id, jid = %r.job_id, kind = %r.job_kind, ?older_than, "reaped a barrier that was never consumed");
    }
    Ok(reaped.len())
}
