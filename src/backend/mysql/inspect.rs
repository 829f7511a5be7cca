//! What an operator sees of the barrier table on MySQL (see `src/backend/inspect.rs`): every
//! row, committed or not, and what `information_schema` says of a pending row's producer.

use super::session::{in_transaction, SET_READ_UNCOMMITTED};
use crate::backend::inspect::{BarrierRow, ListedRow, Listing, RowState};
use crate::backend::sealed::Backend;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::BigInt;
use std::collections::{HashMap, HashSet};

const LIST: &str = "SELECT id, job_id, job_kind, job_queue, txid, \
        CAST(TIMESTAMPDIFF(MICROSECOND, created_at, NOW(6)) AS SIGNED) AS age_us, \
        CAST(TIMESTAMPDIFF(MICROSECOND, pushed_at, NOW(6)) AS SIGNED) AS since_push_us, \
        CAST(attempted_at IS NOT NULL AS SIGNED) AS attempted, \
        CAST(NULL AS CHAR) AS xmax \
     FROM dtb_barriers ORDER BY created_at, id LIMIT ?";

/// Every row, committed or not: a READ UNCOMMITTED read sees the rows of running
/// producers, and a plain read right after it which rows have a committed version. A row
/// only the first read sees is pending; one only the second sees is being deleted by a
/// worker's open transaction (the handler is running). Neither read takes a lock.
pub(in crate::backend) fn list(conn: &mut MysqlConnection, limit: i64) -> QueryResult<Listing> {
    let all: Vec<ListedRow> = in_transaction(conn, SET_READ_UNCOMMITTED, |c| {
        diesel::sql_query(LIST).bind::<BigInt, _>(limit).load(c)
    })?;
    let committed: Vec<ListedRow> = diesel::sql_query(LIST)
        .bind::<BigInt, _>(limit)
        .load(conn)?;
    let seen: HashSet<String> = all.iter().map(|r| r.id.clone()).collect();
    let committed_ids: HashSet<String> = committed.iter().map(|r| r.id.clone()).collect();
    let mut rows: Vec<BarrierRow> = Vec::with_capacity(all.len());
    let mut producers: HashMap<String, Option<String>> = HashMap::new();
    for r in all {
        if committed_ids.contains(&r.id) {
            rows.push(r.into_row(RowState::Committed));
            continue;
        }
        let mut row = r.into_row(RowState::Pending);
        if let Some(txid) = row.txid.clone() {
            // What innodb_trx and the process list say of the producer's session, once per
            // session (it needs PROCESS for the transaction, and says so without it).
            let info = match producers.get(&txid) {
                Some(info) => info.clone(),
                None => {
                    let id = uuid::Uuid::try_parse(&row.id).unwrap_or_default();
                    let info = conn.transaction_info(&id, Some(&txid))?;
                    producers.insert(txid, info.clone());
                    info
                }
            };
            row.transaction = info;
        }
        rows.push(row);
    }
    for r in committed {
        if !seen.contains(&r.id) {
            rows.push(r.into_row(RowState::Consuming));
        }
    }
    rows.sort_by(|a, b| b.age.cmp(&a.age).then_with(|| a.id.cmp(&b.id)));
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    Ok(Listing {
        rows,
        transactions: Vec::new(),
    })
}
