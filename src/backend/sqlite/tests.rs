//! SQLite's own mechanics: the write lock, busy timeouts, the hint cursor. The contract every
//! backend keeps is tested in `backend/conformance`.

use super::locks::busy_timeout;
use super::*;
use crate::backend::conformance::{check, new_barrier, DIGEST};
use crate::backend::{Hint, Listen, Verdict};
use crate::testing::{SqliteTestFile, TestDatabase};
use std::sync::mpsc;

fn insert(c: &mut SqliteConnection, id: &uuid::Uuid) {
    c.insert_barrier(&new_barrier(id)).unwrap();
}

/// A worker connection: as a plain pool hands it out, without a busy timeout.
fn worker(db: &SqliteTestFile) -> SqliteConnection {
    SqliteConnection::establish(&db.url()).unwrap()
}

/// Runs a producer on a thread of its own, holding the write lock in an open transaction with
/// barrier `id` until the returned sender says to commit.
fn open_transaction(
    db: &SqliteTestFile,
    id: uuid::Uuid,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let (end_tx, end_rx) = mpsc::channel::<()>();
    let mut conn = db.connect();
    let thread = std::thread::spawn(move || {
        conn.transaction(|c| {
            insert(c, &id);
            ready_tx.send(()).unwrap();
            end_rx.recv().unwrap();
            Ok::<_, DieselError>(())
        })
        .unwrap();
    });
    ready_rx.recv().unwrap();
    (end_tx, thread)
}

#[test]
fn migrations_switch_to_wal_and_put_the_busy_timeout_back() {
    let db = SqliteTestFile::create_unmigrated();
    let mut w = worker(&db);
    w.batch_execute("PRAGMA journal_mode = DELETE").unwrap();
    Backend::run_migrations(&mut w).unwrap();
    assert_eq!(journal_mode(&mut w).unwrap(), "wal");
    assert_eq!(busy_timeout(&mut w).unwrap(), 0, "busy timeout put back");
}

#[test]
fn a_rolled_back_savepoint_waits_for_the_outer_transaction() {
    let db = SqliteTestFile::create();
    let id = uuid::Uuid::new_v4();
    let mut p = db.connect();
    let mut w = worker(&db);
    p.transaction(|c| {
        let inner = c.transaction(|c| {
            insert(c, &id);
            Err::<(), _>(DieselError::RollbackTransaction)
        });
        assert!(inner.is_err());
        // The row is gone, but the outer transaction still holds the write lock.
        assert_eq!(check(&mut w, &[id]), [Verdict::Pending]);
        Ok::<_, DieselError>(())
    })
    .unwrap();
    assert_eq!(check(&mut w, &[id]), [Verdict::NotCommitted]);
}

#[test]
fn a_batch_takes_one_lock_attempt_and_never_waits() {
    let db = SqliteTestFile::create();
    let (committed, rolled_back, open) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    insert(&mut db.connect(), &committed);
    let _ = db.connect().transaction(|c| {
        insert(c, &rolled_back);
        Err::<(), _>(DieselError::RollbackTransaction)
    });
    let mut w = worker(&db);
    // While some transaction holds the lock, what is not visible stays pending.
    let (end, producer) = open_transaction(&db, open);
    assert_eq!(
        check(&mut w, &[committed, rolled_back, open]),
        [Verdict::Committed, Verdict::Pending, Verdict::Pending]
    );
    end.send(()).unwrap();
    producer.join().unwrap();
    assert_eq!(
        check(&mut w, &[committed, rolled_back, open]),
        [
            Verdict::Committed,
            Verdict::NotCommitted,
            Verdict::Committed
        ]
    );
    assert_eq!(busy_timeout(&mut w).unwrap(), 0, "busy timeout put back");
}

#[test]
fn the_worker_transaction_waits_for_an_application_writer() {
    let db = SqliteTestFile::create();
    let id = uuid::Uuid::new_v4();
    insert(&mut db.connect(), &id);
    let (end, producer) = open_transaction(&db, uuid::Uuid::new_v4());
    let (claimed_tx, claimed_rx) = mpsc::channel();
    let mut w = worker(&db);
    let claimer = std::thread::spawn(move || {
        let claim = w
            .worker_transaction(|c| c.claim_barrier(&id, DIGEST))
            .unwrap();
        claimed_tx.send(claim).unwrap();
        assert_eq!(busy_timeout(&mut w).unwrap(), 0, "busy timeout put back");
    });
    assert!(
        claimed_rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the claim waits for the writer"
    );
    end.send(()).unwrap();
    producer.join().unwrap();
    assert_eq!(claimed_rx.recv().unwrap(), Claim::Locked);
    claimer.join().unwrap();
}

#[test]
fn transaction_info_reports_the_lock() {
    let db = SqliteTestFile::create();
    let id = uuid::Uuid::new_v4();
    let (end, producer) = open_transaction(&db, id);
    let mut w = worker(&db);
    let info = w.transaction_info(&id, None).unwrap().unwrap();
    assert!(info.contains("held"), "{info}");
    assert!(info.contains("wal"), "{info}");
    end.send(()).unwrap();
    producer.join().unwrap();
    let info = w.transaction_info(&id, None).unwrap().unwrap();
    assert!(info.contains("free"), "{info}");
}

#[test]
fn hints_follow_a_cursor_that_consumed_rows_do_not_move() {
    let db = SqliteTestFile::create();
    insert(&mut db.connect(), &uuid::Uuid::new_v4());
    let mut listener = worker(&db);
    hints::NEW_ROWS.listen(&mut listener).unwrap();
    assert!(
        hints::NEW_ROWS.take(&mut listener).unwrap().is_empty(),
        "rows from before"
    );
    let open = uuid::Uuid::new_v4();
    let (end, producer) = open_transaction(&db, open);
    assert!(
        hints::NEW_ROWS.take(&mut listener).unwrap().is_empty(),
        "open"
    );
    end.send(()).unwrap();
    producer.join().unwrap();
    let committed = uuid::Uuid::new_v4();
    insert(&mut db.connect(), &committed);
    assert_eq!(
        hints::NEW_ROWS.take(&mut listener).unwrap(),
        [Hint::Barrier(open), Hint::Barrier(committed)]
    );
    assert!(
        hints::NEW_ROWS.take(&mut listener).unwrap().is_empty(),
        "once"
    );
    // A consumed row's seq is not reused, so the next commit is still seen.
    worker(&db)
        .worker_transaction(|c| c.claim_barrier(&committed, DIGEST))
        .unwrap();
    let next = uuid::Uuid::new_v4();
    insert(&mut db.connect(), &next);
    assert_eq!(
        hints::NEW_ROWS.take(&mut listener).unwrap(),
        [Hint::Barrier(next)]
    );
    hints::NEW_ROWS.unlisten(&mut listener).unwrap();
    hints::NEW_ROWS.listen(&mut listener).unwrap();
    assert!(
        hints::NEW_ROWS.take(&mut listener).unwrap().is_empty(),
        "a new cursor"
    );
}

#[test]
fn busy_is_recognised() {
    let db = SqliteTestFile::create();
    let (end, producer) = open_transaction(&db, uuid::Uuid::new_v4());
    let mut w = worker(&db);
    let err = w
        .immediate_transaction(|_| Ok::<_, DieselError>(()))
        .unwrap_err();
    assert!(is_busy(&err), "{err}");
    end.send(()).unwrap();
    producer.join().unwrap();
    let other = diesel::sql_query("SELECT * FROM no_such_table")
        .execute(&mut w)
        .unwrap_err();
    assert!(!is_busy(&other), "{other}");
}
