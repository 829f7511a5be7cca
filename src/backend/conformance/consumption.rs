//! The contract of the bulk operations and of handlers without a connection: many barriers in
//! one insert, the job digests a check reads, and the deletion of barriers whose handlers ran.

use super::{check, committed, new_barrier, rollback, Conn, DIGEST};
use crate::backend::sealed::Backend;
use crate::backend::{NewBarrier, Pending, Verdict};
use crate::testing::TestDatabase;
use diesel::Connection;

/// A thousand barriers inserted in one call are pending together while their transaction
/// runs, committed together once it commits, and not committed when it rolls back.
pub(super) fn many_barriers_in_one_insert<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let ids: Vec<uuid::Uuid> = (0..1000).map(|_| uuid::Uuid::new_v4()).collect();
    let rows: Vec<NewBarrier<'_>> = ids.iter().map(new_barrier).collect();
    producer
        .transaction(|p| {
            let inserted = p.insert_barriers(&rows)?;
            if Conn::<D>::NAME != "sqlite" {
                assert!(inserted.txid.is_some(), "the transaction is named");
            }
            assert!(check(&mut worker, &ids[..3])
                .iter()
                .all(|v| *v == Verdict::Pending));
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    assert!(check(&mut worker, &ids)
        .iter()
        .all(|v| *v == Verdict::Committed));

    let others: Vec<uuid::Uuid> = (0..1000).map(|_| uuid::Uuid::new_v4()).collect();
    let rows: Vec<NewBarrier<'_>> = others.iter().map(new_barrier).collect();
    let _ = producer.transaction(|p| {
        p.insert_barriers(&rows)?;
        rollback::<()>()
    });
    assert!(check(&mut worker, &others)
        .iter()
        .all(|v| *v == Verdict::NotCommitted));
}

/// A check reads the job digest of each barrier it finds committed (or visible), and none of
/// a barrier still running or unknown.
pub(super) fn checks_read_the_digests<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let (done, running, unknown) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    committed(&mut producer, &done);
    let pending: Vec<Pending> = [done, running, unknown]
        .iter()
        .map(|&id| Pending { id, txid: None })
        .collect();
    let mut other = db.connect();
    other
        .transaction(|p| {
            p.insert_barrier(&new_barrier(&running))?;
            let checked = worker
                .check_pending(&mut Default::default(), &pending)
                .expect("check_pending");
            assert!(matches!(
                checked.verdicts[0],
                Verdict::Committed | Verdict::Visible
            ));
            assert_eq!(checked.digest(0), Some(DIGEST));
            assert_eq!(checked.digest(1), None, "a running producer's row");
            assert_eq!(checked.digest(2), None, "an unknown id");
            rollback::<()>()
        })
        .unwrap_err();
}

/// Barriers whose handlers ran without a connection are deleted together, for good; what is
/// gone already is skipped. Their digest reads as gone afterwards.
pub(super) fn consumed_barriers_are_gone<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let (a, b, unknown) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    committed(&mut producer, &a);
    committed(&mut producer, &b);
    assert_eq!(
        worker.barrier_digest(&a).unwrap(),
        Some(Some(DIGEST.to_string()))
    );
    assert_eq!(worker.barrier_digest(&unknown).unwrap(), None);
    assert_eq!(worker.consume_barriers(&[a, b, unknown]).unwrap(), 2);
    assert_eq!(worker.barrier_digest(&a).unwrap(), None);
    assert_eq!(
        check(&mut worker, &[a, b]),
        [Verdict::NotCommitted, Verdict::NotCommitted]
    );
    assert_eq!(worker.consume_barriers(&[a]).unwrap(), 0);
}
