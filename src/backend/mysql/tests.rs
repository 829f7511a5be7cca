//! MySQL's own mechanics, against a live server: the fence, both claims, the session
//! id in descriptors, diagnostics from `information_schema`. The contract every backend keeps
//! is tested in `backend/conformance`.

use super::claim::{claim_in_one_statement, claim_with_locking_read};
use super::*;
use crate::backend::conformance::{new_barrier, DIGEST};
use crate::backend::Prove;
use crate::backend::Verdict;
use crate::testing::{MysqlTestDatabase, TestDatabase};
use diesel::sql_types::BigInt;
use std::sync::mpsc;

fn i64_of(conn: &mut MysqlConnection, query: &str) -> i64 {
    diesel::select(sql::<BigInt>(query))
        .get_result(conn)
        .unwrap()
}

/// Opens a transaction that inserts barrier `id` on a thread of its own and keeps it open
/// until the returned sender says how to end it (`true` commits). Also returns its txid.
fn open_producer(
    db: &MysqlTestDatabase,
    id: uuid::Uuid,
) -> (mpsc::Sender<bool>, std::thread::JoinHandle<()>, String) {
    let (end_tx, end_rx) = mpsc::channel::<bool>();
    let (txid_tx, txid_rx) = mpsc::channel();
    let mut conn = db.connect();
    let handle = std::thread::spawn(move || {
        let _ = conn.transaction(|c| {
            let inserted = c.insert_barrier(&new_barrier(&id))?;
            txid_tx.send(inserted.txid.unwrap()).unwrap();
            if end_rx.recv().unwrap() {
                Ok(())
            } else {
                Err(diesel::result::Error::RollbackTransaction)
            }
        });
    });
    let txid = txid_rx.recv().unwrap();
    (end_tx, handle, txid)
}

#[test]
fn the_txid_is_the_producers_connection_id() {
    let db = MysqlTestDatabase::create();
    let id = uuid::Uuid::new_v4();
    let mut conn = db.connect();
    let own = i64_of(&mut conn, "CAST(CONNECTION_ID() AS SIGNED)");
    let inserted = conn
        .transaction(|c| c.insert_barrier(&new_barrier(&id)))
        .unwrap();
    assert_eq!(inserted.txid, Some(own.to_string()));
    assert_eq!(inserted.location.as_deref(), Some(db.name()));
    assert_eq!(i64_of(&mut conn, "(SELECT txid FROM dtb_barriers)"), own);
}

/// A commit the check sees is only "visible" until a write of the worker's own proves it
/// durable: the fence commits a change to a row of `dtb_fences`, never to a barrier row, so a
/// handler holding the barrier does not keep it waiting.
#[test]
fn visible_until_fenced() {
    let db = MysqlTestDatabase::create();
    let id = uuid::Uuid::new_v4();
    let (end, producer, _) = open_producer(&db, id);
    let mut worker = db.connect();
    let mut other = db.connect();
    let raw = |w: &mut MysqlConnection| {
        w.check_pending(&mut (), &[Pending { id, txid: None }])
            .unwrap()
            .verdicts
    };
    assert_eq!(raw(&mut worker), [Verdict::Pending]);
    end.send(true).unwrap();
    producer.join().unwrap();
    assert_eq!(raw(&mut worker), [Verdict::Visible]);
    let fences = "(SELECT CAST(COALESCE(SUM(fences), 0) AS SIGNED) FROM dtb_fences)";
    assert_eq!(i64_of(&mut other, fences), 0);
    durability::REDO_LOG.fence(&mut worker).unwrap();
    assert_eq!(i64_of(&mut other, fences), 1, "the fence is committed");
    // A row a handler holds does not hold the fence up.
    other
        .worker_transaction(|h| {
            assert_eq!(h.claim_barrier(&id, DIGEST)?, Claim::Locked);
            let started = std::time::Instant::now();
            durability::REDO_LOG.fence(&mut worker)?;
            assert!(started.elapsed() < Duration::from_secs(1));
            Ok::<_, diesel::result::Error>(())
        })
        .unwrap();
    assert_eq!(i64_of(&mut other, fences), 2);
    assert_eq!(
        i64_of(&mut other, "(SELECT COUNT(*) FROM dtb_barriers)"),
        0,
        "the barrier, consumed"
    );
}

#[test]
fn the_reaper_works_in_batches() {
    let db = MysqlTestDatabase::create();
    let mut conn = db.connect();
    let n = 2 * 1000 + 17;
    conn.transaction(|c| {
        for _ in 0..n {
            diesel::sql_query(
                "INSERT INTO dtb_barriers (id, created_at, job_id, job_kind, job_queue) \
                 VALUES (UUID(), NOW(6) - INTERVAL 1 HOUR, 'j', 'k', 'q')",
            )
            .execute(c)?;
        }
        Ok::<_, diesel::result::Error>(())
    })
    .unwrap();
    assert_eq!(
        crate::reap_barriers(&mut conn, Duration::from_secs(60)).unwrap(),
        n
    );
    assert_eq!(i64_of(&mut conn, "(SELECT COUNT(*) FROM dtb_barriers)"), 0);
}

#[test]
fn transaction_info_reads_innodb_trx_and_the_process_list() {
    let db = MysqlTestDatabase::create();
    let mut conn = db.connect();
    assert!(
        conn.startup_warnings().is_empty(),
        "the administrative account has PROCESS"
    );
    let id = uuid::Uuid::new_v4();
    let (end, producer, txid) = open_producer(&db, id);
    // innodb_trx is a cache, refreshed only once nobody has read it for 100 ms (each read
    // restarts that wait, and other tests read it too): read it, 250 ms apart, until it shows
    // the transaction.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = conn.transaction_info(&id, Some(&txid)).unwrap().unwrap();
        if info.contains("RUNNING") || std::time::Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(info.contains(&format!("MySQL thread {txid}")), "{info}");
    assert!(info.contains("RUNNING"), "{info}");
    assert!(info.contains(&format!("KILL {txid}")), "{info}");
    end.send(false).unwrap();
    producer.join().unwrap();
    assert_eq!(conn.transaction_info(&id, None).unwrap(), None);
}

/// Both ways of claiming — MariaDB's one statement and MySQL's locking reads — tell a free row
/// (taken and deleted), a held one (busy), another job's (foreign, left in place) and a gone one
/// apart, without waiting.
#[test]
fn both_claims_tell_free_held_foreign_and_gone_apart() {
    type ClaimFn = fn(&mut MysqlConnection, &str, &str) -> QueryResult<Claim>;
    let one_statement: ClaimFn = |c, key, digest| {
        Ok(claim_in_one_statement(c, key, digest)?.expect("MariaDB knows SET STATEMENT"))
    };
    let other_digest = "f".repeat(64);
    let db = MysqlTestDatabase::create();
    for (name, claim) in [
        ("one statement", one_statement),
        ("locking reads", claim_with_locking_read as ClaimFn),
    ] {
        let id = uuid::Uuid::new_v4();
        let key = id.hyphenated().to_string();
        let mut producer = db.connect();
        producer
            .transaction(|c| c.insert_barrier(&new_barrier(&id)).map(|_| ()))
            .unwrap();
        let mut holder = db.connect();
        let mut other = db.connect();
        let foreign = other
            .worker_transaction(|o| claim(o, &key, &other_digest))
            .unwrap();
        assert_eq!(foreign, Claim::Foreign, "{name}: another job's row");
        let held = holder.worker_transaction(|h| {
            assert_eq!(claim(h, &key, DIGEST)?, Claim::Locked, "{name}: a free row");
            let started = std::time::Instant::now();
            let busy = other.worker_transaction(|o| claim(o, &key, DIGEST))?;
            assert_eq!(busy, Claim::Busy, "{name}: a held row");
            assert!(started.elapsed() < std::time::Duration::from_millis(500));
            Err::<(), _>(diesel::result::Error::RollbackTransaction)
        });
        assert!(held.is_err());
        // The holder rolled back: the row is there again, and free.
        let taken = other
            .worker_transaction(|o| claim(o, &key, DIGEST))
            .unwrap();
        assert_eq!(taken, Claim::Locked, "{name}: a row let go of");
        let gone = other
            .worker_transaction(|o| claim(o, &key, DIGEST))
            .unwrap();
        assert_eq!(gone, Claim::Gone, "{name}: a consumed row");
        assert_eq!(
            i64_of(
                &mut other,
                &format!("(SELECT COUNT(*) FROM dtb_barriers WHERE id = '{key}')")
            ),
            0
        );
    }
}
