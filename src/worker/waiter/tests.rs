//! The waiter against live servers: verdicts that no commit of the worker's proves.

#[cfg(feature = "mysql")]
mod mysql {
    use super::super::*;
    use crate::backend::conformance::new_barrier;
    use crate::backend::sealed::Backend;
    use crate::testing::{MysqlTestDatabase, TestDatabase};
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sql_types::Text;

    /// The answer to `rx` within `limit`, if any.
    fn answer_within(rx: &mut oneshot::Receiver<Answer>, limit: Duration) -> Option<Answer> {
        let deadline = Instant::now() + limit;
        loop {
            match rx.try_recv() {
                Ok(answer) => return Some(answer),
                Err(oneshot::error::TryRecvError::Closed) => panic!("the waiter dropped the job"),
                Err(oneshot::error::TryRecvError::Empty) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(oneshot::error::TryRecvError::Empty) => return None,
            }
        }
    }

    /// A barrier seen committed while another delivery's handler holds its row is answered:
    /// the fence never waits for the held row (it writes to `dtb_fences`), so the verdict
    /// comes at once, and the job's own claim then finds the row held or consumed.
    #[test]
    fn a_visible_barrier_that_another_delivery_consumes_is_answered() {
        let db = MysqlTestDatabase::create();
        let id = uuid::Uuid::new_v4();
        let mut producer = db.connect();
        let inserted = producer
            .transaction(|c| c.insert_barrier(&new_barrier(&id)))
            .unwrap();
        // The other delivery's handler: the row deleted, not yet committed.
        let mut handler = db.connect();
        handler.batch_execute("BEGIN").unwrap();
        diesel::sql_query("DELETE FROM dtb_barriers WHERE id = ?")
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(&mut handler)
            .unwrap();
        let waiter = start(WaiterConfig {
            pool: db.pool(2),
            listen_pool: None,
            watchers: 0,
            schedule: <diesel::MysqlConnection as Backend>::CHECKS,
            limits: Limits::holding(8),
            releaser: None,
            parked: Arc::default(),
            hearing: Arc::default(),
            waiting: Arc::default(),
            clock: Arc::new(CommitClock::new()),
            // A handler runs: the waiter waits for its commit to prove, then fences anyway.
            running: Arc::new(AtomicUsize::new(1)),
        });
        let (mut rx, _gauge) = waiter.register(id, inserted.txid, None, None);
        let answer = answer_within(&mut rx, Duration::from_secs(10));
        handler.batch_execute("COMMIT").unwrap();
        waiter.stop();
        assert_eq!(answer, Some(Answer::Committed));
    }
}
