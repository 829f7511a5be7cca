//! What an operator sees of the barrier table on PostgreSQL (see `src/backend/inspect.rs`):
//! the committed rows, and the open transactions that write to the table, whose rows no other
//! session can read.

use crate::backend::inspect::{ListedRow, Listing, OpenTransaction, RowState};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};
use std::collections::HashMap;
use std::time::Duration;

#[derive(QueryableByName)]
struct TransactionRow {
    #[diesel(sql_type = Text)]
    pid: String,
    #[diesel(sql_type = Nullable<Text>)]
    xid: Option<String>,
    /// Every transaction id the session holds (its transaction's and its
    /// subtransactions'), comma-separated, from `pg_locks` (which every role may read).
    #[diesel(sql_type = Nullable<Text>)]
    xids: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    age_us: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    state: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    usename: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    application: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    client: Option<String>,
}

impl TransactionRow {
    fn describe(&self) -> String {
        let mut parts = vec![format!("pid {}", self.pid)];
        if let Some(xid) = &self.xid {
            parts.push(format!("xid {xid}"));
        }
        if let Some(state) = &self.state {
            parts.push(state.clone());
        }
        if let Some(age) = self.age_us {
            parts.push(format!("open {:.1} s", age as f64 / 1e6));
        }
        let who = match (&self.usename, &self.client) {
            (Some(u), Some(c)) => format!("{u}@{c}"),
            (Some(u), None) => u.clone(),
            (None, Some(c)) => c.clone(),
            (None, None) => String::new(),
        };
        if !who.is_empty() {
            parts.push(format!("by {who}"));
        }
        if let Some(app) = self.application.as_deref().filter(|a| !a.is_empty()) {
            parts.push(format!("application {app:?}"));
        }
        parts.join(", ")
    }
}

/// The committed rows (a plain read: uncommitted ones are invisible), and the open
/// transactions that hold a write lock on the table. A row whose `xmax` is the id of one of
/// those transactions (or of a subtransaction of one) is being consumed (or updated) by
/// it; the other transactions are producers whose rows are not committed yet (or a worker
/// between two statements).
pub(in crate::backend) fn list(conn: &mut PgConnection, limit: i64) -> QueryResult<Listing> {
    // One statement, one snapshot: the rows and the transactions are seen at once.
    let rows: Vec<ListedRow> = diesel::sql_query(
        "SELECT id::text AS id, job_id, job_kind, job_queue, txid, \
                (extract(epoch FROM clock_timestamp() - created_at) * 1e6)::bigint AS age_us, \
                (extract(epoch FROM clock_timestamp() - pushed_at) * 1e6)::bigint \
                    AS since_push_us, \
                (attempted_at IS NOT NULL)::int::bigint AS attempted, \
                xmax::text AS xmax \
         FROM dtb_barriers ORDER BY created_at, id LIMIT $1",
    )
    .bind::<BigInt, _>(limit)
    .load(conn)?;
    // Sessions of other roles show their transaction only to roles with
    // pg_read_all_stats: the columns are then NULL.
    let transactions: Vec<TransactionRow> = diesel::sql_query(
        "SELECT a.pid::text AS pid, a.backend_xid::text AS xid, \
                (SELECT string_agg(x.transactionid::text, ',') FROM pg_locks x \
                 WHERE x.pid = a.pid AND x.locktype = 'transactionid' \
                   AND x.mode = 'ExclusiveLock' AND x.granted) AS xids, \
                (extract(epoch FROM clock_timestamp() - a.xact_start) * 1e6)::bigint \
                    AS age_us, \
                a.state, a.usename::text AS usename, a.application_name AS application, \
                host(a.client_addr) AS client \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'relation' AND l.granted AND l.mode = 'RowExclusiveLock' \
           AND l.relation = to_regclass('dtb_barriers') \
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
           AND a.pid <> pg_backend_pid() \
         ORDER BY a.xact_start NULLS LAST, a.pid",
    )
    .load(conn)?;
    // A row's xmax is the id of the (sub)transaction that deleted or locked it.
    let by_xid: HashMap<&str, &TransactionRow> = transactions
        .iter()
        .flat_map(|t| {
            let held = t.xids.as_deref().unwrap_or("").split(',');
            held.chain(t.xid.as_deref()).map(move |x| (x, t))
        })
        .filter(|(x, _)| !x.is_empty())
        .collect();
    let mut consumers = std::collections::HashSet::new();
    let rows = rows
        .into_iter()
        .map(|r| {
            let holder = r.xmax.as_deref().and_then(|x| by_xid.get(x)).copied();
            match holder {
                Some(t) => {
                    consumers.insert(t.pid.clone());
                    let mut row = r.into_row(RowState::Consuming);
                    row.transaction = Some(t.describe());
                    row
                }
                None => r.into_row(RowState::Committed),
            }
        })
        .collect();
    let transactions = transactions
        .iter()
        .filter(|t| !consumers.contains(&t.pid))
        .map(|t| OpenTransaction {
            session: t.pid.clone(),
            txid: t.xid.clone(),
            age: t
                .age_us
                .map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
            description: t.describe(),
        })
        .collect();
    Ok(Listing { rows, transactions })
}
