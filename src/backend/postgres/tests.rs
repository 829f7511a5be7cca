//! PostgreSQL's own mechanics, against a live server: the probe schedule, session sharing.
//! The contract every backend keeps is tested in `backend/conformance`.

use super::check::{Due, ProbeSchedule, FIRST_PROBE};
use super::*;
use crate::backend::conformance::new_barrier;
use crate::backend::Verdict;
use crate::testing::{PgTestSchema, TestDatabase};
use std::time::Instant;

fn pending(id: uuid::Uuid, txid: Option<String>) -> [Pending; 1] {
    [Pending { id, txid }]
}

/// A running producer is not probed (a lock wait each) until its probe is due, whatever
/// its transaction id looks like to the checker's snapshot: ids from the snapshot's xmax
/// on belong to running transactions too.
#[test]
fn a_running_producer_is_probed_only_when_due() {
    let schema = PgTestSchema::create();
    let mut producer = schema.connect();
    let mut checker = schema.connect();
    let id = uuid::Uuid::new_v4();
    let mut txid = None;
    let result = producer.transaction(|p| {
        txid = p.insert_barrier(&new_barrier(&id))?.txid;
        let own: i64 = txid.as_deref().expect("a txid").parse().expect("a number");
        // The producer's own id (at or past the checker's xmax while nothing later has
        // completed), and an id well past it (as after many more transactions began).
        for t in [own, own + 1_000_000] {
            let mut schedule = ProbeSchedule::default();
            let checked =
                checker.check_pending(&mut schedule, &pending(id, Some(t.to_string())))?;
            assert_eq!(checked.verdicts, [Verdict::Pending], "txid {t}");
            assert_eq!(checked.probed, 0, "txid {t}: no probe before it is due");
        }
        // Once due, it is probed, found running, and not probed again at once.
        let mut schedule = ProbeSchedule::default();
        schedule.due.insert(
            id,
            Due {
                since: Instant::now() - FIRST_PROBE,
                next: Instant::now(),
                seen: Instant::now(),
            },
        );
        let due = checker.check_pending(&mut schedule, &pending(id, txid.clone()))?;
        assert_eq!((due.verdicts, due.probed), (vec![Verdict::Pending], 1));
        let again = checker.check_pending(&mut schedule, &pending(id, txid.clone()))?;
        assert_eq!((again.verdicts, again.probed), (vec![Verdict::Pending], 0));
        Err::<(), _>(diesel::result::Error::RollbackTransaction)
    });
    assert!(result.is_err());
    // Ended without the row: probed at once, and found not committed.
    let mut schedule = ProbeSchedule::default();
    let ended = checker
        .check_pending(&mut schedule, &pending(id, txid))
        .unwrap();
    assert_eq!(
        (ended.verdicts, ended.probed),
        (vec![Verdict::NotCommitted], 1)
    );
    assert!(schedule.due.is_empty(), "a decided barrier is forgotten");
}
