//! The backend contract, tested once for every backend.
//!
//! Each function below is one test body, generic over the backend's test database; the
//! `conformance!` calls at the end run all of them against PostgreSQL, MySQL / MariaDB and
//! SQLite. A backend's own mechanics (PostgreSQL's probe schedule, MySQL's fence, SQLite's
//! busy timeouts) are tested beside it; what every backend promises the worker is tested here.
//!
//! Most interleavings run on one thread: the producer's transaction stays open while another
//! connection checks, which works only because no check ever waits for a producer — a check
//! that did would hang the test, not pass it.

mod claims;
mod consumption;
mod maintenance;

use super::sealed::Backend;
use super::{
    Awaited, Checked, Claim, Durability, Hint, Hints, NewBarrier, Pending, ServerTransaction,
    Verdict,
};
use crate::testing::TestDatabase;
use diesel::connection::SimpleConnection;
use diesel::Connection;
use std::time::{Duration, Instant};

type Conn<D> = <D as TestDatabase>::Conn;

/// The job digest of the barriers [`new_barrier`] writes.
pub(crate) const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub(crate) fn new_barrier(id: &uuid::Uuid) -> NewBarrier<'_> {
    NewBarrier {
        id,
        job_id: "jid",
        job_kind: "kind",
        job_queue: "default",
        payload: "{\"jid\":\"jid\",\"jobtype\":\"kind\",\"args\":[]}",
        job_digest: DIGEST,
    }
}

/// Whether the backend has one writer at a time (SQLite): a worker transaction then waits for
/// any open write transaction, a producer's included, so a test cannot hold one open while
/// another connection writes.
pub(crate) fn one_writer<C: Backend>() -> bool {
    C::NAME == "sqlite"
}

fn rollback<T>() -> diesel::QueryResult<T> {
    Err(diesel::result::Error::RollbackTransaction)
}

/// Checks `ids` with a fresh checker state, as the waiter does: barriers seen committed but not
/// yet proven durable are fenced, and committed once the fence committed. Panics on a database
/// error.
pub(crate) fn check<C: Backend>(conn: &mut C, ids: &[uuid::Uuid]) -> Vec<Verdict> {
    let pending: Vec<Pending> = ids.iter().map(|&id| Pending { id, txid: None }).collect();
    let Checked { mut verdicts, .. } = conn
        .check_pending(&mut C::Checker::default(), &pending)
        .expect("check_pending");
    assert_eq!(verdicts.len(), ids.len(), "one verdict per barrier");
    let visible: Vec<uuid::Uuid> = ids
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| **v == Verdict::Visible)
        .map(|(id, _)| *id)
        .collect();
    if !visible.is_empty() {
        let Durability::Proven(prove) = C::durability() else {
            panic!("a backend whose commits are durable before they are visible said Visible");
        };
        prove.fence(conn).expect("fence");
        for v in &mut verdicts {
            if *v == Verdict::Visible {
                *v = Verdict::Committed;
            }
        }
    }
    verdicts
}

/// Inserts barrier `id` in a transaction of its own that commits.
fn committed<C: Backend>(conn: &mut C, id: &uuid::Uuid) {
    conn.transaction(|c| c.insert_barrier(&new_barrier(id)))
        .expect("a committed barrier");
}

/// The migrations create what the backend needs, and can run again.
pub(super) fn migrations_are_idempotent<D: TestDatabase>() {
    let bare = D::create_unmigrated();
    let mut conn = bare.connect();
    assert!(!conn.barrier_schema_present().unwrap());
    conn.run_migrations().expect("first run");
    conn.run_migrations().expect("second run");
    assert!(conn.barrier_schema_present().unwrap());
}

/// A running producer's barrier is pending; once it commits, committed; once it rolls back, or
/// for an id nobody wrote, not committed.
pub(super) fn verdicts_follow_the_producer<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let (commits, rolls_back, unknown) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    producer
        .transaction(|p| {
            p.insert_barrier(&new_barrier(&commits))?;
            assert_eq!(check(&mut worker, &[commits]), [Verdict::Pending]);
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    let _ = producer.transaction(|p| {
        p.insert_barrier(&new_barrier(&rolls_back))?;
        assert_eq!(check(&mut worker, &[rolls_back]), [Verdict::Pending]);
        rollback::<()>()
    });
    assert_eq!(
        check(&mut worker, &[commits, rolls_back, unknown]),
        [
            Verdict::Committed,
            Verdict::NotCommitted,
            Verdict::NotCommitted
        ]
    );
    // Asking again changes nothing.
    assert_eq!(check(&mut worker, &[commits]), [Verdict::Committed]);
}

/// A barrier inserted in a savepoint that rolls back is not committed, though the outer
/// transaction commits; one in a released savepoint is.
pub(super) fn savepoints_decide<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let (inner, released) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    producer
        .transaction(|p| {
            let _ = p.transaction(|p| {
                p.insert_barrier(&new_barrier(&inner))?;
                rollback::<()>()
            });
            p.transaction(|p| p.insert_barrier(&new_barrier(&released)))?;
            // The outer transaction runs on: neither may be called committed yet, and the
            // released one not "not committed" either.
            let open = check(&mut worker, &[inner, released]);
            assert_ne!(open[0], Verdict::Committed);
            assert_eq!(open[1], Verdict::Pending);
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    assert_eq!(
        check(&mut worker, &[inner, released]),
        [Verdict::NotCommitted, Verdict::Committed]
    );
}

/// One check decides more barriers than any single statement of the backend takes.
pub(super) fn many_barriers_in_one_check<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let ids: Vec<uuid::Uuid> = (0..1_234).map(|_| uuid::Uuid::new_v4()).collect();
    producer
        .transaction(|p| {
            for id in ids.iter().step_by(2) {
                p.insert_barrier(&new_barrier(id))?;
            }
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    let verdicts = check(&mut worker, &ids);
    for (i, verdict) in verdicts.iter().enumerate() {
        let expected = if i % 2 == 0 {
            Verdict::Committed
        } else {
            Verdict::NotCommitted
        };
        assert_eq!(*verdict, expected, "barrier {i}");
    }
}

/// The server is asked about transactions Diesel did not open.
pub(super) fn the_server_knows_about_transactions<D: TestDatabase>() {
    let db = D::create();
    let mut conn = db.connect();
    assert_eq!(
        conn.server_transaction(0).unwrap(),
        ServerTransaction::Closed
    );
    conn.batch_execute("BEGIN").unwrap();
    assert_eq!(conn.server_transaction(0).unwrap(), ServerTransaction::Open);
    conn.batch_execute("ROLLBACK").unwrap();
    assert_eq!(
        conn.server_transaction(0).unwrap(),
        ServerTransaction::Closed
    );
    conn.transaction(|c| {
        assert_eq!(c.server_transaction(1)?, ServerTransaction::Open);
        c.transaction(|c| {
            assert_eq!(c.server_transaction(2)?, ServerTransaction::Open);
            Ok::<_, diesel::result::Error>(())
        })
    })
    .unwrap();
    assert_eq!(
        conn.server_transaction(0).unwrap(),
        ServerTransaction::Closed
    );
}

/// The producer names the table it wrote to as the worker names the one it reads.
pub(super) fn producer_and_worker_name_the_same_table<D: TestDatabase>() {
    let db = D::create();
    let mut producer = db.connect();
    let id = uuid::Uuid::new_v4();
    let inserted = producer
        .transaction(|p| p.insert_barrier(&new_barrier(&id)))
        .unwrap();
    let ours = db.connect().barrier_location().unwrap();
    assert!(ours.is_some(), "every backend can name its table");
    assert_eq!(inserted.location, ours);
    let other = D::create();
    assert_ne!(other.connect().barrier_location().unwrap(), ours);
}

/// A missing barrier table is recognised from the insert's error, and other errors are not
/// taken for it.
pub(super) fn a_missing_table_is_recognised<D: TestDatabase>() {
    let bare = D::create_unmigrated();
    let mut conn = bare.connect();
    let id = uuid::Uuid::new_v4();
    let _ = conn.transaction(|c| {
        let e = c.insert_barrier(&new_barrier(&id)).unwrap_err();
        assert!(c.missing_table(&e), "{e}");
        rollback::<()>()
    });
    let db = D::create();
    let mut conn = db.connect();
    let _ = conn.transaction(|c| {
        c.insert_barrier(&new_barrier(&id))?;
        let e = c.insert_barrier(&new_barrier(&id)).unwrap_err();
        assert!(
            !c.missing_table(&e),
            "a duplicate is not a missing table: {e}"
        );
        rollback::<()>()
    });
}

/// Backends whose hints are heard on a listening connection name the committed transactions,
/// or their barriers (and nothing of a rolled-back one); a hint is never more than a reason to
/// check.
pub(super) fn hints_name_committed_barriers<D: TestDatabase>() {
    let Hints::Listen(listen) = Conn::<D>::hints() else {
        return;
    };
    let db = D::create();
    let mut listener = db.connect();
    listen.listen(&mut listener).unwrap();
    let mut producer = db.connect();
    let (committed_id, rolled_back) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let mut rolled_back_txid = None;
    let _ = producer.transaction(|p| {
        rolled_back_txid = p.insert_barrier(&new_barrier(&rolled_back))?.txid;
        rollback::<()>()
    });
    let committed_txid = producer
        .transaction(|p| p.insert_barrier(&new_barrier(&committed_id)))
        .expect("a committed barrier")
        .txid;
    let names = |hint: &Hint, id: uuid::Uuid, _txid: &Option<String>| match hint {
        Hint::Barrier(hinted) => *hinted == id,
    };
    let mut hinted = Vec::new();
    let started = Instant::now();
    while !hinted
        .iter()
        .any(|h| names(h, committed_id, &committed_txid))
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no hint for the commit"
        );
        hinted.extend(listen.take(&mut listener).unwrap());
        std::thread::sleep(Duration::from_millis(1));
    }
    hinted.extend(listen.take(&mut listener).unwrap());
    assert!(
        !hinted
            .iter()
            .any(|h| names(h, rolled_back, &rolled_back_txid)),
        "a rollback is never hinted: {hinted:?}"
    );
    listen.unlisten(&mut listener).unwrap();
}

/// Backends whose hints are lock waits: a wait on a running producer's row ends when the
/// producer does — with the row when it committed, without when it rolled back — and is
/// bounded; a row already committed or gone answers at once.
pub(super) fn lock_waits_end_with_the_transaction<D: TestDatabase>() {
    let Hints::LockWaits(waits) = Conn::<D>::hints() else {
        return;
    };
    let db = D::create();
    let second = Duration::from_secs(1);
    for commits in [true, false] {
        let id = uuid::Uuid::new_v4();
        let (inserted_tx, inserted) = std::sync::mpsc::channel();
        let (end_tx, end) = std::sync::mpsc::channel::<()>();
        let mut producer = db.connect();
        let thread = std::thread::spawn(move || {
            let _ = producer.transaction(|p| {
                p.insert_barrier(&new_barrier(&id))?;
                inserted_tx.send(()).unwrap();
                end.recv().unwrap();
                // Let the watcher's wait begin before the end.
                std::thread::sleep(Duration::from_millis(100));
                if commits {
                    Ok(())
                } else {
                    rollback::<()>()
                }
            });
        });
        inserted.recv().unwrap();
        let mut watcher = db.connect();
        let started = Instant::now();
        assert_eq!(
            waits.await_row(&mut watcher, &id, second).unwrap(),
            Awaited::Held
        );
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "the wait is bounded, not skipped"
        );
        end_tx.send(()).unwrap();
        let awaited = waits
            .await_row(&mut watcher, &id, Duration::from_secs(8))
            .unwrap();
        thread.join().unwrap();
        let expected = if commits {
            Awaited::Present
        } else {
            Awaited::Absent
        };
        assert_eq!(awaited, expected, "commits: {commits}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "woken by the end, not the bound"
        );
        // Decided rows answer at once, again and again.
        for _ in 0..2 {
            let at_once = Instant::now();
            assert_eq!(
                waits.await_row(&mut watcher, &id, second).unwrap(),
                expected
            );
            assert!(at_once.elapsed() < Duration::from_millis(500));
        }
    }
}

/// Checks decide by the barrier row, whatever isolation level the session defaults to.
pub(super) fn checks_ignore_the_default_isolation<D: TestDatabase>() {
    let set_default = match Conn::<D>::NAME {
        "postgres" => "SET default_transaction_isolation = 'repeatable read'",
        "mysql" => "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        _ => return, // SQLite has no isolation levels to choose from.
    };
    let db = D::create();
    let id = uuid::Uuid::new_v4();
    let mut worker = db.connect();
    worker.batch_execute(set_default).unwrap();
    let mut producer = db.connect();
    producer
        .transaction(|p| {
            p.insert_barrier(&new_barrier(&id))?;
            assert_eq!(check(&mut worker, &[id]), [Verdict::Pending]);
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    assert_eq!(check(&mut worker, &[id]), [Verdict::Committed]);
    let claim = worker
        .worker_transaction(|w| w.claim_barrier(&id, DIGEST))
        .unwrap();
    assert_eq!(claim, Claim::Locked);
}

/// A timeout report can always be written, whether the producer still runs or not.
pub(super) fn transaction_info_never_fails<D: TestDatabase>() {
    let db = D::create();
    let id = uuid::Uuid::new_v4();
    let mut producer = db.connect();
    let mut worker = db.connect();
    let _ = producer.transaction(|p| {
        let inserted = p.insert_barrier(&new_barrier(&id))?;
        worker.transaction_info(&id, inserted.txid.as_deref())?;
        rollback::<()>()
    });
    worker.transaction_info(&id, Some("12345")).unwrap();
    worker.transaction_info(&id, None).unwrap();
}

/// Runs every test above against each backend given, in a module named after it.
macro_rules! conformance {
    ($($(#[$attr:meta])* $backend:ident: $db:ty;)*) => {$(
        $(#[$attr])*
        mod $backend {
            type Db = $db;

            #[test]
            fn migrations_are_idempotent() {
                super::migrations_are_idempotent::<Db>();
            }
            #[test]
            fn verdicts_follow_the_producer() {
                super::verdicts_follow_the_producer::<Db>();
            }
            #[test]
            fn savepoints_decide() {
                super::savepoints_decide::<Db>();
            }
            #[test]
            fn many_barriers_in_one_check() {
                super::many_barriers_in_one_check::<Db>();
            }
            #[test]
            fn a_claim_consumes_once() {
                super::claims::a_claim_consumes_once::<Db>();
            }
            #[test]
            fn claiming_transactions_run_once() {
                super::claims::claiming_transactions_run_once::<Db>();
            }
            #[test]
            fn a_claim_is_bound_to_its_job() {
                super::claims::a_claim_is_bound_to_its_job::<Db>();
            }
            #[test]
            fn a_removed_barrier_is_never_committed() {
                super::claims::a_removed_barrier_is_never_committed::<Db>();
            }
            #[test]
            fn a_held_claim_is_neither_gone_nor_taken() {
                super::claims::a_held_claim_is_neither_gone_nor_taken::<Db>();
            }
            #[test]
            fn a_running_producers_barrier_is_never_gone() {
                super::claims::a_running_producers_barrier_is_never_gone::<Db>();
            }
            #[test]
            fn the_server_knows_about_transactions() {
                super::the_server_knows_about_transactions::<Db>();
            }
            #[test]
            fn producer_and_worker_name_the_same_table() {
                super::producer_and_worker_name_the_same_table::<Db>();
            }
            #[test]
            fn a_missing_table_is_recognised() {
                super::a_missing_table_is_recognised::<Db>();
            }
            #[test]
            fn hints_name_committed_barriers() {
                super::hints_name_committed_barriers::<Db>();
            }
            #[test]
            fn lock_waits_end_with_the_transaction() {
                super::lock_waits_end_with_the_transaction::<Db>();
            }
            #[test]
            fn checks_ignore_the_default_isolation() {
                super::checks_ignore_the_default_isolation::<Db>();
            }
            #[test]
            fn transaction_info_never_fails() {
                super::transaction_info_never_fails::<Db>();
            }
            #[test]
            fn unconsumed_barriers_are_taken_once_per_grace() {
                super::maintenance::unconsumed_barriers_are_taken_once_per_grace::<Db>();
            }
            #[test]
            fn attempted_barriers_are_left_to_faktory() {
                super::maintenance::attempted_barriers_are_left_to_faktory::<Db>();
            }
            #[test]
            fn overdue_retries_are_taken() {
                super::maintenance::overdue_retries_are_taken::<Db>();
            }
            #[test]
            fn the_reaper_deletes_old_rows_only() {
                super::maintenance::the_reaper_deletes_old_rows_only::<Db>();
            }
            #[test]
            fn many_barriers_in_one_insert() {
                super::consumption::many_barriers_in_one_insert::<Db>();
            }
            #[test]
            fn checks_read_the_digests() {
                super::consumption::checks_read_the_digests::<Db>();
            }
            #[test]
            fn consumed_barriers_are_gone() {
                super::consumption::consumed_barriers_are_gone::<Db>();
            }
        }
    )*};
}

conformance! {
    #[cfg(feature = "postgres")]
    postgres: crate::testing::PgTestSchema;
    #[cfg(feature = "mysql")]
    mysql: crate::testing::MysqlTestDatabase;
    #[cfg(feature = "sqlite")]
    sqlite: crate::testing::SqliteTestFile;
}
