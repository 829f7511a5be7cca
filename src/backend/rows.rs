//! The rows the backends read back, shared by all of them.

use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;

/// A row taken by the reconciler.
#[derive(QueryableByName)]
pub(crate) struct UnconsumedRow {
    #[diesel(sql_type = Text)]
    pub(crate) id: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub(crate) txid: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    pub(crate) payload: Option<String>,
}

impl From<UnconsumedRow> for super::Unconsumed {
    fn from(r: UnconsumedRow) -> Self {
        super::Unconsumed {
            id: r.id,
            txid: r.txid.map(|t| t.to_string()),
            payload: r.payload,
        }
    }
}

/// A row deleted by the reaper.
#[derive(QueryableByName)]
pub(crate) struct ReapedRow {
    #[diesel(sql_type = Text)]
    pub(crate) id: String,
    #[diesel(sql_type = Text)]
    pub(crate) job_id: String,
    #[diesel(sql_type = Text)]
    pub(crate) job_kind: String,
}

impl From<ReapedRow> for super::ReapedBarrier {
    fn from(r: ReapedRow) -> Self {
        super::ReapedBarrier {
            id: r.id,
            job_id: r.job_id,
            job_kind: r.job_kind,
        }
    }
}
