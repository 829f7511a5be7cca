//! SQLite's commit hints: barrier rows get an ever-growing `seq`, and become visible in `seq`
//! order (one transaction writes at a time), so the waiter's listening connection keeps a
//! cursor and reads the rows past it: each has committed since the last read.

use super::locks::is_busy;
use crate::backend::{Hint, Listen};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use std::time::Duration;

#[derive(QueryableByName)]
struct HintRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    id: String,
}

/// SQLite's [`Listen`] capability.
pub(super) struct NewRows;

/// The one instance the backend hands out.
pub(super) static NEW_ROWS: NewRows = NewRows;

impl Listen<SqliteConnection> for NewRows {
    fn poll_interval(&self) -> Duration {
        // An in-process read of one index.
        Duration::from_millis(1)
    }

    fn listen(&self, conn: &mut SqliteConnection) -> QueryResult<()> {
        // The listener's cursor lives in a temporary table: private to this connection, and
        // writing it takes no lock on the database.
        conn.batch_execute(
            "CREATE TEMP TABLE IF NOT EXISTS dtb_hint_cursor (seq INTEGER NOT NULL); \
             DELETE FROM temp.dtb_hint_cursor;",
        )?;
        // Rows committed before now are found by the first check of their jobs.
        diesel::sql_query(
            "INSERT INTO temp.dtb_hint_cursor (seq) \
             SELECT COALESCE(MAX(seq), 0) FROM main.dtb_barriers",
        )
        .execute(conn)?;
        Ok(())
    }

    fn unlisten(&self, conn: &mut SqliteConnection) -> QueryResult<()> {
        conn.batch_execute("DROP TABLE IF EXISTS temp.dtb_hint_cursor")
    }

    fn take(&self, conn: &mut SqliteConnection) -> QueryResult<Vec<Hint>> {
        // Rows past the cursor have committed (a read sees nothing else).
        let rows: QueryResult<Vec<HintRow>> = diesel::sql_query(
            "SELECT b.seq, b.id FROM main.dtb_barriers b, temp.dtb_hint_cursor c \
             WHERE b.seq > c.seq ORDER BY b.seq",
        )
        .load(conn);
        let rows = match rows {
            Ok(rows) => rows,
            // Rollback-journal mode refuses reads while a commit is written: look again later.
            Err(e) if is_busy(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let Some(last) = rows.last() else {
            return Ok(Vec::new());
        };
        diesel::sql_query("UPDATE temp.dtb_hint_cursor SET seq = ?")
            .bind::<BigInt, _>(last.seq)
            .execute(conn)?;
        Ok(rows
            .iter()
            .filter_map(|r| uuid::Uuid::try_parse(&r.id).ok())
            .map(Hint::Barrier)
            .collect())
    }
}
