//! What an operator can see of the barrier table: its rows with their ages, and the
//! transactions that hold uncommitted barrier rows, as each backend can tell. Read-only: no
//! row is locked and nothing waits (see `crate::maintenance::inspect`).

use std::time::Duration;

/// Where a barrier row stands, as the database sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RowState {
    /// The producer's transaction has not committed yet (MySQL, where uncommitted rows can be
    /// read; on PostgreSQL such rows are invisible and their transactions are listed instead).
    Pending,
    /// The producer committed; the row waits for a worker to consume it.
    Committed,
    /// The producer committed, and an open transaction of a worker's is deleting (consuming)
    /// or updating the row right now.
    Consuming,
}

/// One barrier row.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BarrierRow {
    /// The barrier id.
    pub id: String,
    /// The Faktory job id it guards (as first pushed).
    pub job_id: String,
    /// The job kind.
    pub job_kind: String,
    /// The job's queue.
    pub job_queue: String,
    /// The producer's transaction id (PostgreSQL) or connection id (MySQL).
    pub txid: Option<String>,
    /// Time since the row was inserted, by the database's clock.
    pub age: Duration,
    /// Time since its job was last pushed (by the producer, or again by a reconciler).
    pub since_push: Duration,
    /// Whether a handler ran for it and failed: the job is then in Faktory's retries.
    pub attempted: bool,
    /// Committed or not, and whether a worker holds it.
    pub state: RowState,
    /// What the database says of the producer's transaction (pending rows) or of the worker
    /// that holds the row (consuming rows), when it can say.
    pub transaction: Option<String>,
}

/// An open transaction that wrote to the barrier table and may hold barrier rows no other
/// session can see yet (PostgreSQL: a producer that has not committed).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct OpenTransaction {
    /// The server's id of the session (PostgreSQL: the backend's pid).
    pub session: String,
    /// The transaction's id, as the server shows it.
    pub txid: Option<String>,
    /// How long the transaction has been open, when the server shows it.
    pub age: Option<Duration>,
    /// Who runs it and what it is doing.
    pub description: String,
}

/// The rows (oldest first, at most the limit asked for) and the open transactions.
#[derive(Debug, Clone, Default, PartialEq)]
#[allow(unreachable_pub)] // named by the sealed trait
pub struct Listing {
    pub rows: Vec<BarrierRow>,
    pub transactions: Vec<OpenTransaction>,
}

/// A row as every backend's listing query returns it.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
#[derive(diesel::QueryableByName)]
struct ListedRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    job_id: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    job_kind: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    job_queue: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::BigInt>)]
    txid: Option<i64>,
    /// Microseconds since `created_at`.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    age_us: i64,
    /// Microseconds since `pushed_at`.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    since_push_us: i64,
    /// 1 when `attempted_at` is set.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    attempted: i64,
    /// PostgreSQL: the row's `xmax`, the transaction that deletes or locks it (or did).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    xmax: Option<String>,
}

#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
impl ListedRow {
    fn into_row(self, state: RowState) -> BarrierRow {
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        BarrierRow {
            id: self.id,
            job_id: self.job_id,
            job_kind: self.job_kind,
            job_queue: self.job_queue,
            txid: self.txid.map(|t| t.to_string()),
            age: micros(self.age_us),
            since_push: micros(self.since_push_us),
            attempted: self.attempted != 0,
            state,
            transaction: None,
        }
    }
}

#[cfg(feature = "postgres")]
pub(super) mod postgres {
    use super::*;
    use diesel::pg::PgConnection;
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Nullable, Text};
    use std::collections::HashMap;

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
}

#[cfg(feature = "mysql")]
pub(super) mod mysql {
    use super::*;
    use crate::backend::mysql::{in_transaction, SET_READ_UNCOMMITTED};
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
}

#[cfg(feature = "sqlite")]
pub(super) mod sqlite {
    use super::*;
    use diesel::prelude::*;
    use diesel::sql_types::BigInt;
    use diesel::sqlite::SqliteConnection;

    /// The committed rows. SQLite has no sessions to list: a producer's uncommitted rows
    /// cannot be seen, and neither can who holds the write lock.
    pub(in crate::backend) fn list(
        conn: &mut SqliteConnection,
        limit: i64,
    ) -> QueryResult<Listing> {
        let rows: Vec<ListedRow> = diesel::sql_query(
            "SELECT id, job_id, job_kind, job_queue, NULL AS txid, \
                    CAST((julianday('now') - julianday(created_at)) * 86400000000.0 AS INTEGER) \
                        AS age_us, \
                    CAST((julianday('now') - julianday(pushed_at)) * 86400000000.0 AS INTEGER) \
                        AS since_push_us, \
                    (attempted_at IS NOT NULL) AS attempted, NULL AS xmax \
             FROM dtb_barriers ORDER BY created_at, id LIMIT ?",
        )
        .bind::<BigInt, _>(limit)
        .load(conn)?;
        Ok(Listing {
            rows: rows
                .into_iter()
                .map(|r| r.into_row(RowState::Committed))
                .collect(),
            transactions: Vec::new(),
        })
    }
}
