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

/// [`Error::MigrationsMissing`](crate::Error::MigrationsMissing) unless the barrier table (as the
/// newest migration left it) is present on `conn`'s database.
pub(crate) fn require_barrier_schema<C: BarrierConnection>(conn: &mut C) -> Result<()> {
    if conn.barrier_schema_present()? {
        Ok(())
    } else {
        Err(crate::Error::MigrationsMissing {
            table: crate::BARRIER_TABLE,
        })
    }
}
