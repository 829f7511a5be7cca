//! The waiter's watchers on real MariaDB sessions (a locking read of the producer's
//! uncommitted row, bounded by `WAIT n`): the scenarios of `tests/common/watchers.rs`.

use super::common::mysql::{MysqlDatabase, Root};
use super::common::watchers::Watching;
use super::common::TestDb;
use diesel::prelude::*;
use diesel::sql_types::Text;

impl Watching for Root {
    const CREATE_LOCKS: &'static str =
        "CREATE TABLE locks (id INT PRIMARY KEY, v INT NOT NULL) ENGINE = InnoDB";
    const NOW: &'static str = "NOW(6)";

    /// Labelled by the statement, which ends with its wait (`WAIT 2`).
    fn watchers(db: &Root) -> Vec<(i64, String)> {
        #[derive(QueryableByName)]
        struct Session {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            id: i64,
            #[diesel(sql_type = Text)]
            info: String,
        }
        let mut admin = db.database().mysql().admin();
        diesel::sql_query(
            "SELECT CAST(ID AS SIGNED) AS id, INFO AS info FROM information_schema.PROCESSLIST \
             WHERE DB = ? AND INFO LIKE 'SELECT id FROM dtb_barriers WHERE id = % LOCK IN SHARE MODE%'",
        )
        .bind::<Text, _>(db.database().mysql().name())
        .load::<Session>(&mut admin)
        .expect("the process list")
        .into_iter()
        .map(|s| (s.id, s.info))
        .collect()
    }

    /// A young transaction gets a short wait; once it has run for a second or more, the
    /// renewed wait is longer.
    fn renewed(first: &str, now: &str) -> bool {
        assert!(first.ends_with("WAIT 2"), "{first}");
        now.ends_with("WAIT 4")
    }
}

crate::watcher_tests!(Root);
