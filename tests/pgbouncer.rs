//! The barrier contract through PgBouncer in transaction pooling mode (`DTB_PGBOUNCER_URL`,
//! e.g. `postgres://postgres@127.0.0.1:6432/test`; without it every test here passes without
//! running, after a note). The producers' connections and the worker's pool go through
//! PgBouncer; the schemas and roles of the tests are made directly (`PG_DATABASE_URL`). See
//! `tests/common/pgbouncer.rs`.
#![cfg(feature = "postgres")]

mod common;

use common::pgbouncer::{bouncer_url, Bouncer, BouncerSchema};
use common::*;
use crossbeam_channel::unbounded;
use diesel::connection::CacheSize;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use diesel_transaction_barrier::testing::TestDatabase;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error};

// Every shared scenario, with the worker's defaults: its watchers wait through PgBouncer.
common::suite::scenario_tests! {
    Bouncer;
    exclude {
        killed_producer_aborts: "behind PgBouncer the session read before the transaction may not be the one the transaction runs on: see killed_producer_server_session_aborts",
        a_dead_kept_connection_fails_no_job: "behind PgBouncer a server session serves every client in turn: killing the one a handler last ran on kills whatever runs there next, not the worker's connection to PgBouncer",
    }
}

// Commit hints off: the waiter's checks alone find every commit.
common::suite::scenario_tests! {
    mod hints_off: common::pgbouncer::BouncerHintsOff;
    only {
        commit_runs_after_commit,
        error_rolls_back,
        rolled_back_savepoint_never_runs,
        released_savepoint_runs,
        many_waiting_jobs_hold_few_connections,
        waiter_connections_killed_mid_wait,
    }
}

/// An environment through PgBouncer, or `None` (after a note) without `DTB_PGBOUNCER_URL`.
fn env() -> Option<Env<Bouncer>> {
    bouncer_url()?;
    Some(Env::new())
}

/// Kills the server session the producer's transaction runs on (read inside it: behind
/// PgBouncer the connection's next transaction may run on another one). PgBouncer ends the
/// client's connection with it; the job is aborted.
#[test]
fn killed_producer_server_session_aborts() {
    let Some(env) = env() else { return };
    let (tx, rx) = unbounded();
    let worker = env.start_worker(handlers::<Bouncer>(&tx), 1);
    let id = next_id();
    let mut conn = env.db.connect();
    let mut jid = None;
    let result = conn.transaction(|c| {
        insert_order::<Bouncer>(c, id, "paid");
        jid = Some(c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?);
        let session = Bouncer::session_id(c);
        worker.wait_for_waiting(1);
        env.db.kill(session);
        Ok::<_, Error>(())
    });
    assert!(result.is_err(), "the commit of a killed session fails");
    assert_aborted(&env, &worker, &rx, id, jid.unwrap().as_str());
}

/// Diesel's prepared statement cache names statements per connection (`__diesel_stmt_0`, ...):
/// behind PgBouncer 1.18 in transaction pooling mode another client's statement of the same
/// name is found on the shared server connection, or none. With the cache disabled, Diesel
/// prepares and runs each statement in one round trip, which works.
#[test]
fn prepared_statement_cache_needs_disabling() {
    if bouncer_url().is_none() {
        return;
    }
    let schema = BouncerSchema::create_unmigrated();
    let run = |disabled: bool| -> Vec<String> {
        let connect = || {
            let mut c = PgConnection::establish(&schema.url()).unwrap();
            if disabled {
                c.set_prepared_statement_cache_size(CacheSize::Disabled);
            }
            c
        };
        let (mut a, mut b) = (connect(), connect());
        let mut problems = Vec::new();
        for round in 0..5 {
            // The same statement name on each connection, for different statements.
            match diesel::select(2.into_sql::<Integer>()).get_result::<i32>(&mut a) {
                Ok(2) => {}
                other => problems.push(format!("round {round}, a: {other:?}")),
            }
            match diesel::select("bb".into_sql::<Text>()).get_result::<String>(&mut b) {
                Ok(s) if s == "bb" => {}
                other => problems.push(format!("round {round}, b: {other:?}")),
            }
        }
        problems
    };
    let cached = run(false);
    assert!(
        !cached.is_empty(),
        "named prepared statements survived transaction pooling"
    );
    eprintln!("with Diesel's statement cache: {cached:?}");
    assert_eq!(run(true), Vec::<String>::new(), "without the cache");

    // r2d2's health check (`SELECT 1`) is such a statement: a pool with the cache cannot hand
    // out its connections at once; one without can.
    let take_four = |pool: r2d2::Pool<diesel::r2d2::ConnectionManager<PgConnection>>| {
        let held: Vec<_> = (0..4).map(|_| pool.get()).collect();
        held.into_iter()
            .filter_map(Result::err)
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
    };
    let plain = r2d2::Pool::builder()
        .max_size(4)
        .connection_timeout(std::time::Duration::from_secs(1))
        .build(diesel::r2d2::ConnectionManager::new(schema.url()))
        .unwrap();
    let failed = take_four(plain);
    eprintln!("a pool with Diesel's statement cache: {failed:?}");
    assert!(
        failed.iter().any(|e| e.contains("prepared statement")),
        "{failed:?}"
    );
    assert_eq!(
        take_four(common::pgbouncer::bouncer_pool(&schema.url(), 4)),
        Vec::<String>::new()
    );
}

/// With commit hints set to `hints`, a worker behind PgBouncer starts `rounds` jobs, each
/// fetched while its transaction runs, within about one check interval after the commit, and
/// never hears a hint.
fn checks_alone_start_jobs(hints: bool, rounds: usize) {
    let Some(env) = env() else { return };
    let interval = std::time::Duration::from_millis(250);
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Bouncer>(&tx), |b| {
        b.workers(1).commit_hints(hints).check_interval(interval)
    });
    for _ in 0..rounds {
        let id = next_id();
        let committed = commit_once_waiting(&env, &worker, id, || {});
        expect_run_within(
            &rx,
            id,
            committed,
            interval + std::time::Duration::from_secs(1),
        );
        wait_until("the run to commit", EVENTUALLY, || {
            runs_of(&env.db, id) == 1
        });
    }
    assert_eq!(worker.monitor.hears_commit_hints(), hints);
}

/// Commit hints off: a job fetched while its transaction runs starts within about one check
/// interval after the commit, and the worker never hears a hint.
#[test]
fn without_hints_jobs_start_within_the_check_interval() {
    checks_alone_start_jobs(false, 3);
}

/// The worker's defaults behind PgBouncer: its watchers' lock waits are single statements,
/// which PgBouncer runs on one server connection each, so they wake the waiter as through a
/// direct connection: a job waiting for its transaction starts soon after the commit although
/// the checks are 30 seconds apart.
#[test]
fn watchers_hear_commits_through_pgbouncer() {
    let Some(env) = env() else { return };
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Bouncer>(&tx), |b| {
        b.workers(1)
            .check_interval(std::time::Duration::from_secs(30))
    });
    for _ in 0..3 {
        let id = next_id();
        let committed = commit_once_waiting(&env, &worker, id, || {
            // Let the waiter's first check find the transaction running, and a watcher wait.
            std::thread::sleep(std::time::Duration::from_millis(100));
        });
        expect_run_within(&rx, id, committed, std::time::Duration::from_secs(5));
        wait_until("the run to commit", EVENTUALLY, || {
            runs_of(&env.db, id) == 1
        });
    }
    assert!(worker.monitor.hears_commit_hints());
}
