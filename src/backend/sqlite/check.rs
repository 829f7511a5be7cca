//! The SQLite waiter's check: a visible row is committed; a row still absent once the worker
//! holds the write lock (taken without waiting) is not.

use super::locks::is_busy;
use super::IDS_PER_QUERY;
use crate::backend::Verdict;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use diesel::sqlite::SqliteConnection;
use std::collections::HashMap;

#[derive(QueryableByName)]
struct VisibleRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Nullable<Text>)]
    job_digest: Option<String>,
}

/// Verdicts for `ids`, in order, with the job digest of each row found committed. The
/// connection's busy timeout is zero: nothing here waits.
pub(super) fn check_ids(
    conn: &mut SqliteConnection,
    ids: &[String],
) -> QueryResult<(Vec<Verdict>, Vec<Option<String>>)> {
    // Committed? A read sees committed rows only, and only the producer writes its row.
    let visible = match visible_ids(conn, ids) {
        Ok(visible) => visible,
        // Rollback-journal mode refuses reads while a commit is written: look again later.
        Err(e) if is_busy(&e) => return Ok((vec![Verdict::Pending; ids.len()], Vec::new())),
        Err(e) => return Err(e),
    };
    let mut verdicts: Vec<Verdict> = ids
        .iter()
        .map(|id| {
            if visible.contains_key(id) {
                Verdict::Committed
            } else {
                Verdict::Pending
            }
        })
        .collect();
    let rest: Vec<String> = ids
        .iter()
        .filter(|id| !visible.contains_key(*id))
        .cloned()
        .collect();
    let mut digests: HashMap<String, Option<String>> = visible;
    let found = |digests: &HashMap<String, Option<String>>| -> Vec<Option<String>> {
        ids.iter()
            .map(|id| digests.get(id).cloned().flatten())
            .collect()
    };
    if rest.is_empty() {
        let digests = found(&digests);
        return Ok((verdicts, digests));
    }
    // Ended? Each producer took the write lock with its barrier insert, before its job was
    // pushed, fetched and handed to us. If we get the lock now, all those transactions are
    // over, and what we read while holding the lock is their final outcome.
    match conn.immediate_transaction(|c| visible_ids(c, &rest)) {
        Ok(committed) => {
            for (verdict, id) in verdicts.iter_mut().zip(ids) {
                if *verdict == Verdict::Pending {
                    *verdict = if committed.contains_key(id) {
                        Verdict::Committed
                    } else {
                        Verdict::NotCommitted
                    };
                }
            }
            digests.extend(committed);
        }
        // Some transaction holds the lock: the rest stay pending.
        Err(e) if is_busy(&e) => {}
        Err(e) => return Err(e),
    }
    let digests = found(&digests);
    Ok((verdicts, digests))
}

/// Which of `ids` have a visible barrier row, with its job digest.
pub(super) fn visible_ids(
    conn: &mut SqliteConnection,
    ids: &[String],
) -> QueryResult<HashMap<String, Option<String>>> {
    let mut found = HashMap::new();
    for chunk in ids.chunks(IDS_PER_QUERY) {
        let params = vec!["?"; chunk.len()].join(", ");
        let mut query = diesel::sql_query(format!(
            "SELECT id, job_digest FROM dtb_barriers WHERE id IN ({params})"
        ))
        .into_boxed();
        for id in chunk {
            query = query.bind::<Text, _>(id.as_str());
        }
        let rows: Vec<VisibleRow> = query.load(conn)?;
        found.extend(rows.into_iter().map(|r| (r.id, r.job_digest)));
    }
    Ok(found)
}
