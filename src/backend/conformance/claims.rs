//! The contract of the claim: a worker transaction takes a committed barrier once, for its own
//! job only, never a running producer's, and never waits for another worker that holds it.

use super::{check, committed, new_barrier, one_writer, rollback, Conn, DIGEST};
use crate::backend::sealed::Backend;
use crate::backend::{Claim, Claimed, ServerTransaction, Verdict};
use crate::testing::TestDatabase;
use diesel::connection::SimpleConnection;
use diesel::Connection;

/// A claim takes the barrier for the worker transaction: committing it consumes the barrier
/// (a second claim finds it gone, the waiter no longer sees it), rolling it back (a failed
/// handler) restores it.
pub(super) fn a_claim_consumes_once<D: TestDatabase>() {
    let db = D::create();
    let id = uuid::Uuid::new_v4();
    committed(&mut db.connect(), &id);
    let mut worker = db.connect();
    let failed = worker.worker_transaction(|w| {
        assert_eq!(w.claim_barrier(&id, DIGEST)?, Claim::Locked);
        assert!(w.claim_holds(&id)?);
        rollback::<()>()
    });
    assert!(failed.is_err());
    assert_eq!(check(&mut db.connect(), &[id]), [Verdict::Committed]);
    worker
        .worker_transaction(|w| {
            assert_eq!(w.claim_barrier(&id, DIGEST)?, Claim::Locked);
            assert!(w.claim_holds(&id)?);
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    let again = worker
        .worker_transaction(|w| w.claim_barrier(&id, DIGEST))
        .unwrap();
    assert_eq!(again, Claim::Gone);
    assert_eq!(check(&mut db.connect(), &[id]), [Verdict::NotCommitted]);
}

/// A barrier is consumed only by a delivery of its own job (same digest): a claim for another
/// job's digest is `Foreign`, takes nothing and runs nothing, and leaves the barrier to its
/// job. A row without a digest (written before the column existed) binds to nothing.
pub(super) fn a_claim_is_bound_to_its_job<D: TestDatabase>() {
    let db = D::create();
    let (id, unbound) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut conn = db.connect();
    committed(&mut conn, &id);
    committed(&mut conn, &unbound);
    conn.batch_execute(&format!(
        "UPDATE dtb_barriers SET job_digest = NULL WHERE id = '{unbound}'"
    ))
    .unwrap();
    let forged = "f".repeat(64);
    let mut worker = db.connect();
    let foreign = worker
        .worker_transaction(|w| w.claim_barrier(&id, &forged))
        .unwrap();
    assert_eq!(foreign, Claim::Foreign);
    let refused = worker
        .claiming_transaction(&id, &forged, |_| -> diesel::QueryResult<()> {
            panic!("ran for another job's barrier")
        })
        .unwrap();
    assert_eq!(refused, Claimed::Foreign);
    // Untouched: still committed, and its own job consumes it.
    assert_eq!(check(&mut db.connect(), &[id]), [Verdict::Committed]);
    let ran = worker
        .claiming_transaction(&id, DIGEST, |_| Ok::<_, diesel::result::Error>(()))
        .unwrap();
    assert_eq!(ran, Claimed::Ran(()));
    let any = worker
        .claiming_transaction(&unbound, &forged, |_| Ok::<_, diesel::result::Error>(()))
        .unwrap();
    assert_eq!(any, Claimed::Ran(()));
    // A digest that is not hexadecimal is only compared, never run as SQL.
    let odd = worker
        .claiming_transaction(
            &uuid::Uuid::new_v4(),
            "x'); DROP TABLE dtb_barriers; --",
            |_| Ok::<_, diesel::result::Error>(()),
        )
        .unwrap();
    assert_eq!(odd, Claimed::Gone);
    assert!(worker.barrier_schema_present().unwrap());
}

/// A barrier removed in its producer's transaction (a push that failed) leaves nothing: the
/// transaction commits, and the barrier is not committed.
pub(super) fn a_removed_barrier_is_never_committed<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let id = uuid::Uuid::new_v4();
    producer
        .transaction(|p| {
            p.insert_barrier(&new_barrier(&id))?;
            p.remove_barriers(&[id])?;
            assert_ne!(check(&mut worker, &[id]), [Verdict::Committed]);
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    assert_eq!(check(&mut worker, &[id]), [Verdict::NotCommitted]);
    let claim = worker
        .worker_transaction(|w| w.claim_barrier(&id, DIGEST))
        .unwrap();
    assert_eq!(claim, Claim::Gone);
}

/// The worker's claiming transaction runs its closure only with the barrier claimed: once
/// (then it is gone), never while another worker holds it, and a failure restores it.
pub(super) fn claiming_transactions_run_once<D: TestDatabase>() {
    let db = D::create();
    let id = uuid::Uuid::new_v4();
    committed(&mut db.connect(), &id);
    let mut worker = db.connect();
    let failed: Result<Claimed<()>, diesel::result::Error> =
        worker.claiming_transaction(&id, DIGEST, |_| rollback());
    assert!(failed.is_err());
    assert_eq!(check(&mut db.connect(), &[id]), [Verdict::Committed]);
    if !one_writer::<Conn<D>>() {
        let mut holder = db.connect();
        holder
            .worker_transaction(|h| {
                assert_eq!(h.claim_barrier(&id, DIGEST)?, Claim::Locked);
                let busy =
                    worker.claiming_transaction(&id, DIGEST, |_| -> diesel::QueryResult<()> {
                        panic!("ran while another worker held the barrier")
                    })?;
                assert_eq!(busy, Claimed::Busy);
                rollback::<()>()
            })
            .unwrap_err();
    }
    let mut runs = 0;
    let ran = worker
        .claiming_transaction(&id, DIGEST, |w| {
            runs += 1;
            assert!(w.claim_holds(&id)?);
            Ok::<_, diesel::result::Error>(7)
        })
        .unwrap();
    assert_eq!((ran, runs), (Claimed::Ran(7), 1));
    let again = worker
        .claiming_transaction(&id, DIGEST, |_| -> diesel::QueryResult<()> {
            panic!("ran for a consumed barrier")
        })
        .unwrap();
    assert_eq!(again, Claimed::Gone);
    // The connection is usable afterwards, outside any transaction.
    assert_eq!(
        worker.server_transaction(0).unwrap(),
        ServerTransaction::Closed
    );
}

/// While a worker's claim is not committed, the waiter never calls the barrier "not
/// committed" (the handler may still fail and restore it), and a second claim neither waits
/// nor takes it.
pub(super) fn a_held_claim_is_neither_gone_nor_taken<D: TestDatabase>() {
    let db = D::create();
    let id = uuid::Uuid::new_v4();
    committed(&mut db.connect(), &id);
    let mut first = db.connect();
    let mut second = db.connect();
    let mut waiter = db.connect();
    first
        .worker_transaction(|f| {
            assert_eq!(f.claim_barrier(&id, DIGEST)?, Claim::Locked);
            assert_ne!(check(&mut waiter, &[id]), [Verdict::NotCommitted]);
            if !one_writer::<Conn<D>>() {
                let busy = second.worker_transaction(|s| s.claim_barrier(&id, DIGEST))?;
                assert_eq!(busy, Claim::Busy);
            }
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    let gone = second
        .worker_transaction(|s| s.claim_barrier(&id, DIGEST))
        .unwrap();
    assert_eq!(gone, Claim::Gone);
}

/// A claim of a barrier whose producer is still running is never "gone" (which would drop a
/// job that may yet commit). Backends with one writer cannot even try: their worker
/// transaction waits for the producer's.
pub(super) fn a_running_producers_barrier_is_never_gone<D: TestDatabase>() {
    if one_writer::<Conn<D>>() {
        return;
    }
    let db = D::create();
    let id = uuid::Uuid::new_v4();
    let mut producer = db.connect();
    let mut worker = db.connect();
    producer
        .transaction(|p| {
            p.insert_barrier(&new_barrier(&id))?;
            let claim = worker.worker_transaction(|w| w.claim_barrier(&id, DIGEST))?;
            assert_eq!(claim, Claim::Busy);
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    let claim = worker
        .worker_transaction(|w| w.claim_barrier(&id, DIGEST))
        .unwrap();
    assert_eq!(claim, Claim::Locked);
}
