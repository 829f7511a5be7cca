//! A randomized soak with an oracle: many producer threads run random transactions against a
//! running worker; at the end every committed enqueue must have run exactly once (the crate's
//! contract for what a handler writes through its connection), no rolled-back enqueue may have
//! run, every handler must have seen its transaction's writes, and nothing may be left behind.
//!
//! `DTB_SOAK_TRANSACTIONS` sets the number of transactions (default 1500: the CI-sized run);
//! `DTB_SOAK_THREADS` the producer threads (default 4), `DTB_SOAK_WORKERS` the workers that
//! share the queue (default 1).

use super::*;
use crossbeam_channel::unbounded;
use diesel_transaction_barrier::Error;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy)]
enum Shape {
    Commit,
    ErrRollback,
    Panic,
    RolledBackSavepoint,
    ReleasedSavepoint,
    Autocommit,
    SeveralCommit,
    SeveralRollback,
}

const SHAPES: [Shape; 8] = [
    Shape::Commit,
    Shape::ErrRollback,
    Shape::Panic,
    Shape::RolledBackSavepoint,
    Shape::ReleasedSavepoint,
    Shape::Autocommit,
    Shape::SeveralCommit,
    Shape::SeveralRollback,
];

/// A small deterministic generator (xorshift), seeded per thread and printed, so a failing run
/// can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[derive(Default)]
struct Oracle {
    must_run: HashSet<i64>,
    must_not_run: HashSet<i64>,
    shapes: HashMap<String, usize>,
}

pub fn soak_with_oracle<D: TestDb>() {
    let transactions = env_usize("DTB_SOAK_TRANSACTIONS", 1500);
    let threads = env_usize("DTB_SOAK_THREADS", 4).max(1);
    let seed = std::env::var("DTB_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0 | 1);
    eprintln!("soak: {transactions} transactions on {threads} threads, seed {seed}");
    let env = Env::<D>::new();
    let (tx, rx) = unbounded();
    let workers: Vec<_> = (0..env_usize("DTB_SOAK_WORKERS", 1).max(1))
        .map(|_| {
            env.start_worker_with(handlers::<D>(&tx), |b| {
                b.workers(4)
                    .max_waiting(64)
                    .block_limit(Duration::from_millis(1500))
            })
        })
        .collect();
    let total = |count: fn(&diesel_transaction_barrier::WorkerMonitor) -> u64| {
        workers.iter().map(|w| count(&w.monitor)).sum::<u64>()
    };
    let oracle = Mutex::new(Oracle::default());
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let env = &env;
            let oracle = &oracle;
            let per_thread = transactions / threads + usize::from(t < transactions % threads);
            s.spawn(move || {
                let mut rng =
                    Rng(seed.wrapping_add((t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1);
                let mut conn = env.db.connect();
                for _ in 0..per_thread {
                    let shape = SHAPES[rng.below(SHAPES.len() as u64) as usize];
                    let delay = Duration::from_millis(rng.below(40));
                    let (run, not_run) = one_transaction::<D>(env, &mut conn, shape, delay);
                    let mut o = oracle.lock().unwrap();
                    o.must_run.extend(run);
                    o.must_not_run.extend(not_run);
                    *o.shapes.entry(format!("{shape:?}")).or_default() += 1;
                }
            });
        }
    });
    let oracle = oracle.into_inner().unwrap();
    eprintln!(
        "soak: produced in {:?}: {} jobs must run, {} must not; shapes {:?}",
        started.elapsed(),
        oracle.must_run.len(),
        oracle.must_not_run.len(),
        oracle.shapes
    );

    // Every committed job runs.
    let mut ran: HashMap<i64, usize> = HashMap::new();
    let mut violations = Vec::new();
    while oracle.must_run.iter().any(|id| !ran.contains_key(id)) {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(r) => {
                if r.seen_status.as_deref() != Some("paid") {
                    violations.push(format!(
                        "job of order {} saw {:?}, not its transaction's writes",
                        r.order_id, r.seen_status
                    ));
                }
                *ran.entry(r.order_id).or_default() += 1;
            }
            Err(_) => {
                let missing: Vec<_> = oracle
                    .must_run
                    .iter()
                    .filter(|id| !ran.contains_key(id))
                    .take(10)
                    .collect();
                panic!("committed jobs never ran, e.g. {missing:?}");
            }
        }
    }
    // Let aborted and duplicate deliveries finish, then look at the final state.
    wait_until("every delivery to settle", EVENTUALLY, || {
        workers
            .iter()
            .all(|w| w.monitor.waiting() == 0 && w.monitor.running() == 0)
    });
    for r in rx.try_iter() {
        *ran.entry(r.order_id).or_default() += 1;
    }
    for id in &oracle.must_not_run {
        if ran.contains_key(id) {
            violations.push(format!("rolled-back job of order {id} ran"));
        }
    }
    // Exactly once, counted in the database (what the handler wrote commits with the
    // consumption of the barrier).
    let mut conn = env.db.connect();
    let recorded = D::query_i64(&mut conn, "SELECT COUNT(*) FROM handler_runs").unwrap();
    let distinct = D::query_i64(
        &mut conn,
        "SELECT COUNT(*) FROM (SELECT DISTINCT order_id FROM handler_runs) AS d",
    )
    .unwrap();
    if recorded != distinct {
        violations.push(format!(
            "{} handler runs recorded for {distinct} orders: some ran twice",
            recorded
        ));
    }
    if recorded as usize != oracle.must_run.len() {
        violations.push(format!(
            "{recorded} runs recorded, {} committed enqueues",
            oracle.must_run.len()
        ));
    }
    wait_until("the barrier table to empty", EVENTUALLY, || {
        env.db.barrier_rows() == 0
    });
    if let Some(server) = env.faktory.server_or_skip("the jobs left in Faktory") {
        let settled = server.wait_for(
            |s| {
                s.queue_size(&env.queue) == 0
                    && s.working_len() == 0
                    && s.retries_len() == 0
                    && s.dead_len() == 0
                    && s.scheduled_len() == 0
            },
            EVENTUALLY,
        );
        if !settled {
            violations.push(format!(
                "jobs left in Faktory: queue {}, working {}, retries {}, dead {}, scheduled {}",
                server.queue_size(&env.queue),
                server.working_len(),
                server.retries_len(),
                server.dead_len(),
                server.scheduled_len()
            ));
        }
    }
    eprintln!(
        "soak: {transactions} transactions, {} jobs ran, {} workers: ran {} aborted {} duplicates {} snoozed {} (overflowed {}) failed {}; violations: {}",
        ran.len(),
        workers.len(),
        total(|m| m.ran()),
        total(|m| m.aborted()),
        total(|m| m.duplicates()),
        total(|m| m.snoozed()),
        total(|m| m.overflowed()),
        total(|m| m.failed()),
        violations.len()
    );
    assert!(violations.is_empty(), "violations: {violations:#?}");
}

/// Runs one transaction of the given shape; returns the order ids whose jobs must run and
/// those whose jobs must not.
fn one_transaction<D: TestDb>(
    env: &Env<D>,
    conn: &mut D::Conn,
    shape: Shape,
    delay: Duration,
) -> (Vec<i64>, Vec<i64>) {
    let id = next_id();
    let enqueue = |c: &mut D::Conn, id: i64| -> Result<(), Error> {
        insert_order::<D>(c, id, "new");
        c.enqueue_with_barrier(&env.producer, env.job(PAID, id))?;
        set_status::<D>(c, id, "paid");
        Ok(())
    };
    match shape {
        Shape::Commit => {
            conn.transaction(|c| {
                enqueue(c, id)?;
                std::thread::sleep(delay);
                Ok::<_, Error>(())
            })
            .unwrap();
            (vec![id], vec![])
        }
        Shape::ErrRollback => {
            let r = conn.transaction(|c| {
                enqueue(c, id)?;
                std::thread::sleep(delay);
                Err::<(), _>(Error::Database(diesel::result::Error::RollbackTransaction))
            });
            assert!(r.is_err());
            (vec![], vec![id])
        }
        Shape::Panic => {
            std::thread::scope(|s| {
                let joined = s
                    .spawn(|| {
                        let mut own = env.db.connect();
                        let _ = own.transaction(|c| {
                            enqueue(c, id)?;
                            std::thread::sleep(delay);
                            if id >= 0 {
                                std::panic::resume_unwind(Box::new(
                                    "soak: a producer panics mid-transaction",
                                ));
                            }
                            Ok::<_, Error>(())
                        });
                    })
                    .join();
                assert!(joined.is_err());
            });
            (vec![], vec![id])
        }
        Shape::RolledBackSavepoint => {
            conn.transaction(|c| {
                enqueue_in_rolled_back_savepoint(env, c, id)?;
                std::thread::sleep(delay);
                Ok::<_, Error>(())
            })
            .unwrap();
            (vec![], vec![id])
        }
        Shape::ReleasedSavepoint => {
            conn.transaction(|c| {
                enqueue_in_released_savepoint(env, c, id)?;
                std::thread::sleep(delay);
                Ok::<_, Error>(())
            })
            .unwrap();
            (vec![id], vec![])
        }
        Shape::Autocommit => {
            insert_order::<D>(conn, id, "paid");
            conn.enqueue_with_barrier(&env.producer, env.job(PAID, id))
                .unwrap();
            (vec![id], vec![])
        }
        Shape::SeveralCommit | Shape::SeveralRollback => {
            let ids = [id, next_id(), next_id()];
            let commit = matches!(shape, Shape::SeveralCommit);
            let r = conn.transaction(|c| {
                for &i in &ids {
                    enqueue(c, i)?;
                }
                std::thread::sleep(delay);
                if commit {
                    Ok(())
                } else {
                    Err(Error::Database(diesel::result::Error::RollbackTransaction))
                }
            });
            assert_eq!(r.is_ok(), commit);
            if commit {
                (ids.to_vec(), vec![])
            } else {
                (vec![], ids.to_vec())
            }
        }
    }
}
