//! The waiter against live servers: what its listening connection leaves behind, and verdicts
//! that no commit of the worker's proves.

#[cfg(feature = "postgres")]
mod postgres {
    use super::super::listener::Listening;
    use super::super::*;
    use crate::backend::sealed::Backend;
    use crate::testing::{PgTestSchema as Schema, TestDatabase};
    use diesel::connection::SimpleConnection;
    use diesel::pg::PgConnection;
    use diesel::prelude::*;
    use diesel::sql_types::{BigInt, Integer};

    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    #[derive(QueryableByName)]
    struct Pid {
        #[diesel(sql_type = Integer)]
        pid: i32,
    }

    fn channels(conn: &mut PgConnection) -> i64 {
        diesel::sql_query("SELECT COUNT(*) AS n FROM pg_listening_channels()")
            .get_result::<Count>(conn)
            .unwrap()
            .n
    }

    fn pid(conn: &mut PgConnection) -> i32 {
        diesel::sql_query("SELECT pg_backend_pid() AS pid")
            .get_result::<Pid>(conn)
            .unwrap()
            .pid
    }

    fn listening(pool: &ConnectionPool<PgConnection>) -> Listening<PgConnection> {
        let Hints::Listen(listen) = PgConnection::hints() else {
            panic!("PostgreSQL listens");
        };
        Listening::start(listen, pool.get().unwrap()).unwrap()
    }

    fn one_connection_pool(schema: &Schema) -> ConnectionPool<PgConnection> {
        r2d2::Pool::builder()
            .max_size(1)
            .min_idle(Some(0))
            .build(diesel::r2d2::ConnectionManager::new(schema.url()))
            .unwrap()
    }

    /// A listening connection goes back to the pool without listening.
    #[test]
    fn a_listener_stops_listening_before_it_goes_back() {
        let schema = Schema::create();
        let pool = one_connection_pool(&schema);
        let mut listener = listening(&pool);
        assert_eq!(channels(&mut listener.conn), 1);
        let before = pid(&mut listener.conn);
        drop(listener);
        let mut conn = pool.get().unwrap();
        assert_eq!(
            pid(&mut conn),
            before,
            "the same connection, back in the pool"
        );
        assert_eq!(channels(&mut conn), 0, "no longer listening");
    }

    /// A listening connection that cannot stop listening (here: stuck in a failed transaction)
    /// is discarded by the pool, never handed out again still listening.
    #[test]
    fn a_listener_that_cannot_stop_is_discarded() {
        let schema = Schema::create();
        let pool = one_connection_pool(&schema);
        let mut listener = listening(&pool);
        let before = pid(&mut listener.conn);
        listener.conn.batch_execute("BEGIN").unwrap();
        assert!(listener.conn.batch_execute("SELECT 1 / 0").is_err());
        drop(listener);
        let mut conn = pool.get().unwrap();
        assert_ne!(pid(&mut conn), before, "a new connection");
        assert_eq!(channels(&mut conn), 0);
    }
}

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
