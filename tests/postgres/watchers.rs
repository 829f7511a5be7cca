//! The waiter's watchers on real PostgreSQL sessions (`dtb_await_barrier`, a lock wait on the
//! producer's transaction): the scenarios of `tests/common/watchers.rs`.

use super::common::pg::Pg;
use super::common::watchers::Watching;
use super::common::TestDb;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};

impl Watching for Pg {
    const CREATE_LOCKS: &'static str = "CREATE TABLE locks (id INT PRIMARY KEY, v INT NOT NULL)";
    const NOW: &'static str = "clock_timestamp()";

    /// Labelled by when the wait's statement started.
    fn watchers(db: &Pg) -> Vec<(i64, String)> {
        #[derive(QueryableByName)]
        struct Session {
            #[diesel(sql_type = BigInt)]
            pid: i64,
            #[diesel(sql_type = Text)]
            started: String,
        }
        let mut admin = db.connect();
        diesel::sql_query(format!(
            "SELECT pid::bigint AS pid, query_start::text AS started FROM pg_stat_activity \
             WHERE application_name = '{}' AND pid <> pg_backend_pid() \
               AND query LIKE '%dtb_await_barrier%' AND wait_event_type = 'Lock'",
            db.database().name()
        ))
        .load::<Session>(&mut admin)
        .expect("pg_stat_activity")
        .into_iter()
        .map(|s| (s.pid, s.started))
        .collect()
    }
}

crate::watcher_tests!(Pg);
