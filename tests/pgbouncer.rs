//! The barrier contract through PgBouncer in transaction pooling mode (`DTB_PGBOUNCER_URL`,
//! e.g. `postgres://postgres@127.0.0.1:6432/test`; without it every test here passes without
//! running, after a note). The producers' connections and the worker's pool go through
//! PgBouncer; the schemas and roles of the tests are made directly (`PG_DATABASE_URL`). See
//! `tests/common/pgbouncer.rs`.
#![cfg(feature = "postgres")]

mod common;

use common::pgbouncer::{bouncer_connection, bouncer_url, Bouncer, BouncerSchema};
use common::*;
use crossbeam_channel::unbounded;
use diesel::connection::CacheSize;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Integer, Text};
use diesel_transaction_barrier::testing::TestDatabase;
use diesel_transaction_barrier::{EnqueueWithBarrier, Error};

// Every shared scenario, with the worker's commit hints off: its checks find every commit.
common::suite::scenario_tests! {
    Bouncer;
    exclude {
        killed_producer_aborts: "behind PgBouncer the session read before the transaction may not be the one the transaction runs on: see killed_producer_server_session_aborts",
    }
}

// The worker's commit hints through a direct listening connection (`listen_url`).
common::suite::scenario_tests! {
    mod direct_listen: common::pgbouncer::BouncerListening;
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

/// A channel name of this test's own.
fn channel() -> String {
    format!("dtb_test_{}", uuid::Uuid::new_v4().simple())
}

fn heard(conn: &mut PgConnection, channel: &str) -> Vec<String> {
    conn.notifications_iter()
        .map(|n| n.expect("a notification"))
        .filter(|n| n.channel == channel)
        .map(|n| n.payload)
        .collect()
}

/// What PgBouncer does with `LISTEN` in transaction pooling mode: it accepts it, and the
/// connection never hears a notification (the registration stays on whichever server
/// connection ran it, which PgBouncer hands to other clients). A direct connection hears the
/// same notification.
#[test]
fn listen_through_pgbouncer_hears_nothing() {
    if bouncer_url().is_none() {
        return;
    }
    let schema = BouncerSchema::create_unmigrated();
    let channel = channel();
    let mut through = bouncer_connection(&schema.url());
    let mut direct = PgConnection::establish(&schema.direct_url()).unwrap();
    Bouncer::exec(&mut through, &format!("LISTEN {channel}"));
    Bouncer::exec(&mut direct, &format!("LISTEN {channel}"));
    let mut notifier = PgConnection::establish(&schema.direct_url()).unwrap();
    Bouncer::exec(&mut notifier, &format!("NOTIFY {channel}, 'hello'"));
    let mut direct_heard = Vec::new();
    wait_until("the direct connection to hear it", EVENTUALLY, || {
        direct_heard.extend(heard(&mut direct, &channel));
        !direct_heard.is_empty()
    });
    assert_eq!(direct_heard, ["hello"]);
    // What must not happen: watched for a while, as `expect_no_run` does.
    let mut through_heard = Vec::new();
    let started = std::time::Instant::now();
    while started.elapsed() < NOT_YET {
        through_heard.extend(heard(&mut through, &channel));
        std::thread::sleep(NOT_YET / 20);
    }
    assert!(
        through_heard.is_empty(),
        "a LISTEN through PgBouncer heard {through_heard:?}"
    );
}

/// What lets the worker see that it is behind PgBouncer before it listens: a session-level
/// setting one client makes is seen by another client's next statement, which PgBouncer runs on
/// the server connection it got back last (in a pool of the test's own, nobody else's).
#[test]
fn pgbouncer_lends_one_session_to_several_clients() {
    if bouncer_url().is_none() {
        return;
    }
    let schema = BouncerSchema::create_unmigrated();
    let mut a = bouncer_connection(&schema.url());
    let mut b = bouncer_connection(&schema.url());
    let token = uuid::Uuid::new_v4().simple().to_string();
    Bouncer::exec(
        &mut a,
        &format!("SELECT set_config('dtb.session_probe', '{token}', false)"),
    );
    let seen = Bouncer::query_string(&mut b, "current_setting('dtb.session_probe', true)");
    assert_eq!(seen.as_deref(), Some(token.as_str()));
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
    assert!(!worker.monitor.hears_commit_hints());
}

/// Commit hints off: a job fetched while its transaction runs starts within about one check
/// interval after the commit, and the worker never hears a hint.
#[test]
fn without_hints_jobs_start_within_the_check_interval() {
    checks_alone_start_jobs(false, 3);
}

/// A direct `listen_url`: the worker hears commits through it, and a job waiting for its
/// transaction starts soon after the commit although the checks are 30 seconds apart.
#[test]
fn a_direct_listen_url_hears_commits() {
    let Some(env) = env() else { return };
    let (tx, rx) = unbounded();
    let worker = env.start_worker_with(handlers::<Bouncer>(&tx), |b| {
        b.workers(1)
            .commit_hints(true)
            .listen_url(env.db.database().direct_url())
            .check_interval(std::time::Duration::from_secs(30))
    });
    let id = next_id();
    let committed = commit_once_waiting(&env, &worker, id, || {
        wait_until("the listener to hear its test hint", EVENTUALLY, || {
            worker.monitor.hears_commit_hints()
        })
    });
    expect_run_within(&rx, id, committed, std::time::Duration::from_secs(5));
}

/// The worker's defaults behind PgBouncer: its listening connection comes from the pool, where
/// a `LISTEN` would hear nothing. The waiter sees it (the session is shared; else its test hint
/// does not arrive) and does not listen; its checks still start every job soon after its
/// commit.
#[test]
fn behind_pgbouncer_the_waiter_does_not_listen_and_checks_go_on() {
    checks_alone_start_jobs(true, 1);
}
