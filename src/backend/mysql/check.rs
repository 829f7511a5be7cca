//! The MySQL waiter's check: which pending barriers committed, which rolled back, which are
//! still running — from the rows alone, without waiting for a lock or taking one (see
//! `docs/design/mysql.md`).

use super::session::{Statement, SET_READ_COMMITTED, SET_READ_UNCOMMITTED};
use crate::backend::{Checked, Pending, Verdict};
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{Nullable, Text};
use std::collections::HashMap;

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Nullable<Text>)]
    job_digest: Option<String>,
}

/// Which of the barrier rows `ids` (a JSON array of ids) the next statement sees: one statement
/// text whatever the number of ids, so that it stays prepared, and a lookup by primary key for
/// each (the JSON column takes the key's character set and collation, or the join scans).
const EXISTING: &[&str] = &[
    "SELECT b.id, b.job_digest FROM JSON_TABLE(",
    ", '$[*]' COLUMNS (id CHAR(36) CHARACTER SET ascii COLLATE ascii_bin PATH '$')) AS j \
     JOIN dtb_barriers b ON b.id = j.id",
];

/// Decides every pending barrier without waiting for any lock: four prepared statements, one
/// round trip each, for any number of barriers.
pub(super) fn check_pending(
    conn: &mut MysqlConnection,
    pending: &[Pending],
) -> QueryResult<Checked> {
    if pending.is_empty() {
        return Ok(Checked::default());
    }
    let keys: Vec<String> = pending
        .iter()
        .map(|p| p.id.hyphenated().to_string())
        .collect();
    let ids = serde_json::to_string(&keys).expect("a list of strings is JSON");
    // 1. Which rows exist at all, committed or not. READ UNCOMMITTED sees a running producer's
    //    insert; a rolled-back insert (or savepoint), a committed delete and a delete not yet
    //    committed leave nothing. (`SET TRANSACTION` applies to the next statement's own
    //    transaction in autocommit.)
    let exist = existing(conn, SET_READ_UNCOMMITTED, &ids)?;
    // 2. Then, which have a committed version: a plain read in a transaction of its own, so
    //    with a snapshot taken when it starts, after step 1.
    let visible = existing(conn, SET_READ_COMMITTED, &ids)?;
    // Visible: committed; durable once the backend's proof comes (see `durability.rs`).
    // Pending: a version in step 1 and no committed one by step 2 — a running producer (or one
    // that ended between the two reads: the next check decides). Not committed: no version in
    // step 1 and no committed one in the later step 2 — a row without any version cannot come
    // back, except by the undoing of a delete, which step 2, after it, would have seen.
    let verdicts: Vec<Verdict> = keys
        .iter()
        .map(|k| {
            if visible.contains_key(k) {
                Verdict::Visible
            } else if exist.contains_key(k) {
                Verdict::Pending
            } else {
                Verdict::NotCommitted
            }
        })
        .collect();
    let digests = keys
        .iter()
        .map(|k| visible.get(k).cloned().flatten())
        .collect();
    Ok(Checked {
        digests,
        ..Checked::from(verdicts)
    })
}

/// The ids of `ids` (a JSON array) that a plain read at the isolation level `set_level` sets
/// sees, in autocommit, with their rows' job digests.
fn existing(
    conn: &mut MysqlConnection,
    set_level: &'static [&'static str],
    ids: &str,
) -> QueryResult<HashMap<String, Option<String>>> {
    Statement::plain(set_level).execute(conn)?;
    let rows: Vec<IdRow> = Statement::new(EXISTING, &[ids]).load(conn)?;
    Ok(rows.into_iter().map(|r| (r.id, r.job_digest)).collect())
}
