//! The Rocket example (`examples/rocket_app.rs`) over HTTP, through Rocket's local client,
//! against PostgreSQL (`PG_DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`,
//! a schema of its own per test, reached through the application's `rocket_sync_db_pools`
//! pool) and Faktory (`FAKTORY_URL`, else the in-process test server), with a real worker
//! running `send_receipt` on a thread.
#![cfg(all(feature = "postgres", feature = "testing"))]

#[path = "../examples/rocket_app.rs"]
#[allow(dead_code)]
mod app;

mod common;

use common::pg::Pg;
use common::{next_id, wait_until, RunningWorker, TestDb, EVENTUALLY};
use crossbeam_channel::{unbounded, Receiver};
use diesel::pg::PgConnection;
use diesel_transaction_barrier::testing::{PgTestSchema, TestDatabase, TestFaktory};
use diesel_transaction_barrier::{BoxError, Job, Producer, StopReason, WorkerBuilder};
use rocket::futures::future::join_all;
use rocket::http::{ContentType, Status};
use rocket::local::asynchronous::Client as AsyncClient;
use rocket::local::blocking::Client;
use rocket::{Build, Rocket};
use std::collections::BTreeSet;
use std::time::Duration;

/// The shop behind one of Rocket's local clients (blocking unless said), and its worker on a
/// thread of its own.
struct Shop<C = Client> {
    client: C,
    receipts: Receiver<app::Receipt>,
    worker: RunningWorker,
    // Dropped last: the worker and the client use them.
    faktory: TestFaktory,
    db: Pg,
}

impl Shop {
    fn open() -> Shop {
        Shop::open_with(|rocket| Client::tracked(rocket).expect("the application ignites"))
    }
}

impl<C> Shop<C> {
    /// Builds the application, `connect`s a local client to it (which ignites it), and starts
    /// the worker.
    fn open_with(connect: impl FnOnce(Rocket<Build>) -> C) -> Shop<C> {
        // An empty schema of its own: the application creates its tables when it ignites.
        let db = Pg::wrap(PgTestSchema::create_unmigrated());
        let faktory = TestFaktory::from_env_or_start().expect("faktory");
        let queue = faktory.unique_queue("shop");
        let producer = Producer::connect(&faktory.url()).expect("producer");

        // The application as its `main` builds it, with this test's database URL (the schema
        // is chosen by the URL's `options=-csearch_path%3D...`); the test only quiets the logs
        // and keeps the pool small.
        let rocket = app::rocket(&db.url(), producer, queue.clone());
        let figment = rocket
            .figment()
            .clone()
            .merge((rocket::Config::LOG_LEVEL, rocket::config::LogLevel::Off))
            .merge((rocket::Config::CLI_COLORS, false))
            .merge((format!("databases.{}.pool_size", app::DATABASE), 4));
        let rocket = rocket.configure(figment);
        let url: String = rocket
            .figment()
            .extract_inner(&format!("databases.{}.url", app::DATABASE))
            .expect("the database URL is configured");
        assert_eq!(url, db.url());
        let client = connect(rocket);

        // rocket_sync_db_pools passed the URL to r2d2 and Diesel as it was: the tables were
        // created in this test's schema.
        let tables = Pg::query_i64(
            &mut db.connect(),
            &format!(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = '{}' \
                 AND table_name IN ('orders', 'receipts', 'dtb_barriers')",
                db.database().name()
            ),
        );
        assert_eq!(
            tables,
            Some(3),
            "the application's tables are in the test's schema"
        );

        // The worker's handler is the example's, reporting each receipt to the test.
        let (tx, receipts) = unbounded();
        let worker = WorkerBuilder::new(db.pool(6))
            .url(faktory.url())
            .workers(1)
            .reconnect_backoff(Duration::from_millis(200))
            .register(
                app::SEND_RECEIPT,
                move |job: &Job, conn: &mut PgConnection| -> Result<(), BoxError> {
                    let receipt = app::send_receipt(job, conn)?;
                    let _ = tx.send(receipt);
                    Ok(())
                },
            )
            .connect()
            .expect("the worker connects");
        Shop {
            client,
            receipts,
            worker: RunningWorker::spawn(worker, queue),
            faktory,
            db,
        }
    }

    fn next_receipt(&self) -> app::Receipt {
        self.receipts
            .recv_timeout(EVENTUALLY)
            .expect("a receipt should have been sent")
    }

    /// With the in-process server: waits until every job pushed has been acknowledged, and
    /// checks that none failed.
    fn expect_all_acknowledged(&self) {
        if let Some(server) = self
            .faktory
            .server_or_skip("every job acknowledged, none failed")
        {
            let done = server.wait_for(
                |s| {
                    let stats = s.stats();
                    stats.processed >= stats.pushed
                },
                EVENTUALLY,
            );
            let stats = server.stats();
            assert!(done, "every job should be acknowledged: {stats:?}");
            assert_eq!(stats.failures, 0, "no job failed: {stats:?}");
        }
    }

    /// Receipts recorded for order `order_id`.
    fn receipts_of(&self, order_id: i64) -> i64 {
        let sql = format!("SELECT COUNT(*) FROM receipts WHERE order_id = {order_id}");
        Pg::query_i64(&mut self.db.connect(), &sql).unwrap()
    }

    fn pushed(&self) -> Option<u64> {
        self.faktory
            .server_or_skip("the count of pushed jobs")
            .map(|s| s.stats().pushed)
    }
}

impl Shop {
    /// `POST /orders/<id>/pay` with `{"amount": <amount>}`: the status and the body.
    fn pay(&self, id: i64, amount: i64) -> (Status, String) {
        let response = self
            .client
            .post(format!("/orders/{id}/pay"))
            .header(ContentType::JSON)
            .body(format!(r#"{{"amount": {amount}}}"#))
            .dispatch();
        let status = response.status();
        (status, response.into_string().unwrap_or_default())
    }

    /// `GET /orders/<id>`: the status and the body.
    fn get_order(&self, id: i64) -> (Status, String) {
        let response = self.client.get(format!("/orders/{id}")).dispatch();
        let status = response.status();
        (status, response.into_string().unwrap_or_default())
    }

    /// Pays a sentinel order after the requests under test and waits for its receipt: the
    /// worker has one handler slot and Faktory hands jobs out in order, so every job pushed
    /// before it has been fetched by then. Returns the other receipts seen meanwhile.
    fn drain_with_sentinel(&self) -> Vec<app::Receipt> {
        let sentinel = next_id() + 1_000_000;
        let (status, body) = self.pay(sentinel, 1);
        assert_eq!(status, Status::Ok, "{body}");
        let mut others = Vec::new();
        loop {
            let receipt = self.next_receipt();
            if receipt.order.id == sentinel {
                return others;
            }
            others.push(receipt);
        }
    }
}

#[test]
fn committed_payment_sends_its_receipt_after_commit() {
    let mut shop = Shop::open();
    let id = next_id();

    let (status, body) = shop.pay(id, 42);
    assert_eq!(status, Status::Ok, "{body}");
    let paid: app::Paid = serde_json::from_str(&body).expect("a Paid body");
    let expected = app::Order {
        id,
        status: "paid".into(),
        amount: 42,
    };
    assert_eq!(paid.order, expected);

    // The order row was written in the request's transaction: the handler can only see it
    // once that transaction has committed.
    let receipt = shop.next_receipt();
    assert_eq!(receipt.jid, paid.receipt_jid);
    assert_eq!(receipt.order, expected);

    let others = shop.drain_with_sentinel();
    assert!(others.is_empty(), "unexpected receipts: {others:?}");
    let (status, body) = shop.get_order(id);
    assert_eq!(status, Status::Ok, "{body}");
    let order: app::Order = serde_json::from_str(&body).expect("an Order body");
    assert_eq!(order, expected);

    shop.expect_all_acknowledged();
    assert_eq!(shop.worker.stop(), StopReason::Shutdown);
    assert_eq!(shop.worker.monitor.ran(), 2, "the payment and the sentinel");
    assert_eq!(shop.worker.monitor.aborted(), 0);
    assert_eq!(shop.receipts_of(id), 1, "one receipt, recorded once");
    assert_eq!(shop.db.barrier_rows(), 0, "no barrier row is left");
}

#[test]
fn payment_refused_after_enqueue_rolls_back_and_its_job_never_runs() {
    let mut shop = Shop::open();
    let id = next_id();
    let pending = app::Order {
        id,
        status: "pending".into(),
        amount: 0,
    };
    Pg::exec(
        &mut shop.db.connect(),
        &format!("INSERT INTO orders (id, status, amount) VALUES ({id}, 'pending', 0)"),
    );

    let pushed_before = shop.pushed();
    let (status, body) = shop.pay(id, -5);
    assert_eq!(status, Status::UnprocessableEntity, "{body}");
    let problem: app::Problem = serde_json::from_str(&body).expect("a Problem body");
    assert!(
        problem.error.contains("amount must be positive"),
        "{problem:?}"
    );
    if let (Some(before), Some(after)) = (pushed_before, shop.pushed()) {
        assert_eq!(
            after,
            before + 1,
            "the receipt job was pushed before the check"
        );
    }

    // Nothing of the transaction is visible: the order is still unpaid.
    let (status, body) = shop.get_order(id);
    assert_eq!(status, Status::Ok, "{body}");
    let order: app::Order = serde_json::from_str(&body).expect("an Order body");
    assert_eq!(order, pending);
    assert_eq!(shop.db.barrier_rows(), 0, "the barrier row was rolled back");

    // The job reached the worker, which found its transaction rolled back.
    let others = shop.drain_with_sentinel();
    assert!(
        others.is_empty(),
        "a refused payment sent a receipt: {others:?}"
    );
    wait_until(
        "the refused payment's job to be aborted",
        EVENTUALLY,
        || shop.worker.monitor.aborted() >= 1,
    );

    // Paying the same order again, correctly, works.
    let (status, body) = shop.pay(id, 7);
    assert_eq!(status, Status::Ok, "{body}");
    let receipt = shop.next_receipt();
    assert_eq!(receipt.order.id, id);
    assert_eq!(receipt.order.amount, 7);

    shop.expect_all_acknowledged();
    shop.worker.stop();
    assert_eq!(shop.worker.monitor.aborted(), 1);
    assert_eq!(
        shop.worker.monitor.ran(),
        2,
        "the sentinel and the second payment"
    );
    assert_eq!(shop.receipts_of(id), 1, "only the second payment's receipt");
    assert_eq!(shop.db.barrier_rows(), 0, "no barrier row is left");
}

#[test]
fn malformed_body_is_refused_before_any_transaction() {
    let shop = Shop::open();
    let id = next_id();
    let pushed_before = shop.pushed();

    let response = shop
        .client
        .post(format!("/orders/{id}/pay"))
        .header(ContentType::JSON)
        .body(r#"{"amount": "lots"}"#)
        .dispatch();
    assert_eq!(response.status(), Status::UnprocessableEntity);

    assert_eq!(shop.get_order(id).0, Status::NotFound);
    assert_eq!(shop.pushed(), pushed_before, "no job was pushed");
    assert_eq!(shop.db.barrier_rows(), 0);
}

#[test]
fn concurrent_payments_share_the_pool_and_each_commits_or_aborts_alone() {
    // Twelve requests at once through the asynchronous client, sharing a pool of four
    // connections: each transaction runs on the blocking pool with its own clone of the
    // producer, and commits or rolls back alone.
    let runtime = rocket::tokio::runtime::Runtime::new().expect("a runtime");
    let mut shop = Shop::open_with(|rocket| {
        runtime
            .block_on(AsyncClient::tracked(rocket))
            .expect("the application ignites")
    });
    // Every third payment is refused after its enqueue.
    let payments: Vec<(i64, i64)> = (0..12)
        .map(|i| (next_id(), if i % 3 == 2 { -1 } else { 10 + i }))
        .collect();
    let statuses = runtime.block_on(join_all(payments.iter().map(|&(id, amount)| {
        let client = &shop.client;
        async move {
            client
                .post(format!("/orders/{id}/pay"))
                .header(ContentType::JSON)
                .body(format!(r#"{{"amount": {amount}}}"#))
                .dispatch()
                .await
                .status()
        }
    })));
    let mut paid = BTreeSet::new();
    let mut refused = BTreeSet::new();
    for (&(id, amount), status) in payments.iter().zip(statuses) {
        if amount > 0 {
            assert_eq!(status, Status::Ok, "payment of order {id}");
            paid.insert(id);
        } else {
            assert_eq!(status, Status::UnprocessableEntity, "payment of order {id}");
            refused.insert(id);
        }
    }

    // One receipt per committed payment; every refused one's job is aborted.
    let receipts: BTreeSet<i64> = (0..paid.len())
        .map(|_| shop.next_receipt().order.id)
        .collect();
    assert_eq!(receipts, paid);
    wait_until(
        "the refused payments' jobs to be aborted",
        EVENTUALLY,
        || shop.worker.monitor.aborted() >= refused.len() as u64,
    );

    shop.expect_all_acknowledged();
    shop.worker.stop();
    assert_eq!(shop.worker.monitor.ran(), paid.len() as u64);
    assert_eq!(shop.worker.monitor.aborted(), refused.len() as u64);
    assert!(shop.receipts.try_recv().is_err(), "no other receipt");
    for &id in &paid {
        assert_eq!(shop.receipts_of(id), 1, "order {id}: one receipt");
    }
    let refused_list = refused
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT COUNT(*) FROM orders WHERE id IN ({refused_list})");
    assert_eq!(
        Pg::query_i64(&mut shop.db.connect(), &sql),
        Some(0),
        "no refused order was written"
    );
    assert_eq!(shop.db.barrier_rows(), 0, "no barrier row is left");
}
