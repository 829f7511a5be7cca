//! The contract of the backend's maintenance operations: what the reconciler takes and what
//! the reaper deletes.

use super::{committed, new_barrier, rollback, Conn};
use crate::backend::sealed::Backend;
use crate::testing::TestDatabase;
use diesel::Connection;
use std::time::Duration;

/// Moves `column` of barrier `id` `seconds` into the past.
fn age<C: Backend>(conn: &mut C, id: &uuid::Uuid, column: &str, seconds: u32) {
    let sql = match C::NAME {
        "postgres" => format!(
            "UPDATE dtb_barriers SET {column} = {column} - make_interval(secs => {seconds}) \
             WHERE id = '{id}'"
        ),
        "mysql" => format!(
            "UPDATE dtb_barriers SET {column} = {column} - INTERVAL {seconds} SECOND \
             WHERE id = '{id}'"
        ),
        _ => format!(
            "UPDATE dtb_barriers \
             SET {column} = strftime('%Y-%m-%dT%H:%M:%fZ', {column}, '-{seconds} seconds') \
             WHERE id = '{id}'"
        ),
    };
    conn.batch_execute(&sql).expect("ageing a barrier");
}

const GRACE: Duration = Duration::from_secs(60);
const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The reconciler takes committed barriers pushed longer than the grace period ago and younger
/// than the maximum age, marks them pushed now (so that it takes each at most once per grace
/// period), and never waits for a producer or takes its barrier.
pub(super) fn unconsumed_barriers_are_taken_once_per_grace<D: TestDatabase>() {
    let db = D::create();
    let mut conn = db.connect();
    let (old, young, ancient, running) = (
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
    );
    for id in [old, young, ancient] {
        committed(&mut conn, &id);
    }
    age(&mut conn, &old, "pushed_at", 600);
    age(&mut conn, &ancient, "pushed_at", 600);
    age(&mut conn, &ancient, "created_at", 2 * 24 * 3600);
    let take = |c: &mut Conn<D>| {
        c.worker_transaction(|w| w.take_unconsumed(GRACE, MAX_AGE, 100))
            .expect("take_unconsumed")
    };
    let mut producer = db.connect();
    let taken = if super::one_writer::<Conn<D>>() {
        take(&mut conn)
    } else {
        let mut taken = Vec::new();
        let _ = producer.transaction(|p| {
            p.insert_barrier(&new_barrier(&running))?;
            age(p, &running, "pushed_at", 600);
            taken = take(&mut conn);
            rollback::<()>()
        });
        taken
    };
    let ids: Vec<String> = taken.iter().map(|u| u.id.clone()).collect();
    assert_eq!(ids, [old.hyphenated().to_string()]);
    let payload = taken[0].payload.as_deref().expect("the job's payload");
    assert!(payload.contains("\"kind\""), "{payload}");
    assert!(
        take(&mut conn).is_empty(),
        "not again within the grace period"
    );
    let none = conn
        .worker_transaction(|w| w.take_unconsumed(Duration::MAX, Duration::MAX, 100))
        .expect("any duration is accepted");
    assert!(none.is_empty());
}

/// A barrier whose handler ran and failed lives in Faktory's retries: the reconciler leaves it
/// alone while its retry may still come, and for good when none will (the dead set).
pub(super) fn attempted_barriers_are_left_to_faktory<D: TestDatabase>() {
    let db = D::create();
    let mut conn = db.connect();
    let (dead, retrying) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for id in [dead, retrying] {
        committed(&mut conn, &id);
        age(&mut conn, &id, "pushed_at", 600);
    }
    conn.mark_attempted(&dead, None).unwrap();
    conn.mark_attempted(&retrying, Some(Duration::from_secs(30)))
        .unwrap();
    let taken = conn
        .worker_transaction(|w| w.take_unconsumed(GRACE, MAX_AGE, 100))
        .unwrap();
    assert!(taken.is_empty(), "{taken:?}");
}

/// A failed job's retry that is overdue by more than the grace period was lost with the
/// broker's data: the reconciler takes its barrier, once, like a never-attempted one.
pub(super) fn overdue_retries_are_taken<D: TestDatabase>() {
    let db = D::create();
    let mut conn = db.connect();
    let (overdue, due_later) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for id in [overdue, due_later] {
        committed(&mut conn, &id);
        age(&mut conn, &id, "pushed_at", 600);
        conn.mark_attempted(&id, Some(Duration::from_secs(30)))
            .unwrap();
    }
    // Due 30 s after its failure, which was 120 s ago: overdue by 90 s, more than the grace.
    age(&mut conn, &overdue, "retry_due_at", 120);
    let take = |c: &mut Conn<D>| {
        c.worker_transaction(|w| w.take_unconsumed(GRACE, MAX_AGE, 100))
            .expect("take_unconsumed")
    };
    let ids: Vec<String> = take(&mut conn).into_iter().map(|u| u.id).collect();
    assert_eq!(ids, [overdue.hyphenated().to_string()]);
    assert!(
        take(&mut conn).is_empty(),
        "pushed again now: not again within the grace period"
    );
}

/// The reaper deletes the rows older than asked and no others, and never waits for (or takes)
/// a running producer's row.
pub(super) fn the_reaper_deletes_old_rows_only<D: TestDatabase>() {
    let db = D::create();
    let mut conn = db.connect();
    let old: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    let (young, running) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    for id in old.iter().chain([&young]) {
        committed(&mut conn, id);
    }
    for id in &old {
        age(&mut conn, id, "created_at", 7200);
    }
    let hour = Duration::from_secs(3600);
    let mut producer = db.connect();
    let mut reaped = if super::one_writer::<Conn<D>>() {
        conn.reap(hour, 100).unwrap()
    } else {
        producer
            .transaction(|p| {
                p.insert_barrier(&new_barrier(&running))?;
                age(p, &running, "created_at", 7200);
                let reaped = conn.reap(hour, 100).expect("reap");
                Ok::<_, diesel::result::Error>(reaped)
            })
            .unwrap()
    };
    reaped.sort_by(|a, b| a.id.cmp(&b.id));
    let mut expected: Vec<String> = old.iter().map(|id| id.hyphenated().to_string()).collect();
    expected.sort();
    let ids: Vec<String> = reaped.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, expected);
    assert_eq!(reaped[0].job_kind, "kind");
    let left = conn.reap(hour, 100).unwrap();
    if super::one_writer::<Conn<D>>() {
        assert!(left.is_empty());
    } else {
        // The running producer's row, committed since.
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, running.hyphenated().to_string());
    }
    assert!(
        conn.reap(Duration::MAX, 100).unwrap().is_empty(),
        "a maximal age reaps nothing"
    );
}
