//! A Rocket 0.5 shop that enqueues a job inside the transaction that pays an order.
//!
//! `POST /orders/<id>/pay` with a JSON body `{"amount": 42}` runs one database transaction:
//! it marks order `<id>` as paid, enqueues `send_receipt` with a barrier, and only then
//! validates the amount. A non-positive amount answers `422 Unprocessable Entity` and rolls the
//! transaction back — the order is not paid, and the receipt job, already in Faktory, finds no
//! barrier and never runs. `GET /orders/<id>` shows what was committed.
//!
//! The database is reached the way Rocket applications reach a synchronous database, through
//! `rocket_sync_db_pools` (feature `diesel_postgres_pool`):
//!
//! ```rust,ignore
//! #[database("orders_db")]
//! pub struct Db(PgConnection);
//!
//! // In a route that takes `db: Db` and `producer: Producer` (cloned from managed state):
//! db.run(move |c| {
//!     c.transaction(|c| {
//!         // ... the order's writes ...
//!         c.enqueue_with_barrier(&producer, Job::new(SEND_RECEIPT, vec![id]))
//!     })
//! })
//! .await
//! ```
//!
//! `run` hands the closure a pooled connection on Tokio's blocking pool; the [`Producer`] is
//! synchronous too, and cheap to clone. The pool's URL is Rocket configuration,
//! `databases.orders_db.url`: `main` passes `DATABASE_URL` (else the local test database) to
//! `rocket()`, which merges it into Rocket's figment; `Rocket.toml` or `ROCKET_DATABASES` can
//! set the pool's other keys (`pool_size`, `timeout`).
//!
//! Run it with the worker (`examples/rocket_worker.rs`) beside it:
//!
//! ```text
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test FAKTORY_URL=tcp://127.0.0.1:7419
//! cargo run --features metrics --example rocket_worker &
//! cargo run --example rocket_app
//! curl -X POST -H 'Content-Type: application/json' -d '{"amount": 42}' localhost:8000/orders/1/pay
//! curl -X POST -H 'Content-Type: application/json' -d '{"amount": -1}' localhost:8000/orders/2/pay
//! curl localhost:8000/orders/1
//! ```
//!
//! `tests/rocket.rs` drives the same application through Rocket's local client.

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel_transaction_barrier::{BoxError, EnqueueWithBarrier, Job, Producer};
use rocket::fairing::{self, AdHoc};
use rocket::http::Status;
use rocket::response::status::Custom;
use rocket::serde::json::Json;
use rocket::serde::{Deserialize, Serialize};
use rocket::{Build, Rocket, State};
use rocket_sync_db_pools::database;

/// The job kind that the worker registers.
pub const SEND_RECEIPT: &str = "send_receipt";

/// The queue the application pushes to and the worker reads.
pub const QUEUE: &str = "default";

/// The name of the application's database in Rocket's configuration (`databases.orders_db`).
pub const DATABASE: &str = "orders_db";

/// A connection from the application's pool: a request guard that waits for a free
/// connection (`503 Service Unavailable` after the pool's `timeout`).
#[database("orders_db")]
pub struct Db(PgConnection);

diesel::table! {
    orders (id) {
        id -> BigInt,
        status -> Text,
        amount -> BigInt,
    }
}

diesel::table! {
    receipts (jid) {
        jid -> Text,
        order_id -> BigInt,
        amount -> BigInt,
    }
}

/// `DATABASE_URL`, else the local test database.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Creates the barrier table and the application's tables if they are missing.
///
/// The application and its worker may start together, and PostgreSQL's `CREATE ... IF NOT
/// EXISTS` is not safe against a concurrent creation: an advisory lock makes the second one
/// wait for the first.
pub fn setup(conn: &mut PgConnection) -> Result<(), BoxError> {
    conn.batch_execute("SELECT pg_advisory_lock(hashtext('rocket_app setup'))")?;
    let created = create_tables(conn);
    conn.batch_execute("SELECT pg_advisory_unlock(hashtext('rocket_app setup'))")?;
    created
}

fn create_tables(conn: &mut PgConnection) -> Result<(), BoxError> {
    diesel_transaction_barrier::run_migrations(conn)?;
    conn.batch_execute(
        "CREATE TABLE IF NOT EXISTS orders (
             id BIGINT PRIMARY KEY,
             status TEXT NOT NULL,
             amount BIGINT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS receipts (
             jid TEXT PRIMARY KEY,
             order_id BIGINT NOT NULL,
             amount BIGINT NOT NULL
         );",
    )?;
    Ok(())
}

/// The body of `POST /orders/<id>/pay`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(crate = "rocket::serde")]
pub struct Payment {
    /// The amount paid, in cents. Must be positive.
    pub amount: i64,
}

/// An order as committed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Queryable)]
#[serde(crate = "rocket::serde")]
pub struct Order {
    /// The order's id.
    pub id: i64,
    /// `paid` once paid.
    pub status: String,
    /// The amount paid, in cents.
    pub amount: i64,
}

/// The answer to a payment that committed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(crate = "rocket::serde")]
pub struct Paid {
    /// The order, as committed.
    pub order: Order,
    /// The id of the `send_receipt` job.
    pub receipt_jid: String,
}

/// The body of an error answer.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(crate = "rocket::serde")]
pub struct Problem {
    /// What went wrong.
    pub error: String,
}

/// Why a payment failed. Every variant rolls the transaction back.
#[derive(Debug, thiserror::Error)]
pub enum PayError {
    /// The request was well-formed but its content is refused (422).
    #[error("{0}")]
    Invalid(String),
    /// The job could not be enqueued (503 when Faktory is unreachable, else 500).
    #[error("cannot enqueue the receipt: {0}")]
    Enqueue(#[from] diesel_transaction_barrier::Error),
    /// A query failed (500).
    #[error("database error: {0}")]
    Database(#[from] diesel::result::Error),
}

impl PayError {
    /// The HTTP status that this error answers with.
    pub fn status(&self) -> Status {
        match self {
            PayError::Invalid(_) => Status::UnprocessableEntity,
            PayError::Enqueue(
                diesel_transaction_barrier::Error::Faktory(_)
                | diesel_transaction_barrier::Error::FaktoryTimeout(_),
            ) => Status::ServiceUnavailable,
            _ => Status::InternalServerError,
        }
    }
}

/// What the routes share besides the database: the Faktory producer and the queue that receipt
/// jobs go to. Cheap to clone (the producer is a handle on a shared pool).
#[derive(Debug, Clone)]
pub struct ReceiptJobs {
    producer: Producer,
    queue: String,
}

type Answer<T> = Result<Json<T>, Custom<Json<Problem>>>;

fn problem(status: Status, error: impl ToString) -> Custom<Json<Problem>> {
    Custom(
        status,
        Json(Problem {
            error: error.to_string(),
        }),
    )
}

/// Pays order `<id>`: one transaction that writes the order, enqueues its receipt, and
/// validates the amount last.
#[rocket::post("/orders/<id>/pay", format = "json", data = "<payment>")]
async fn pay(db: Db, jobs: &State<ReceiptJobs>, id: i64, payment: Json<Payment>) -> Answer<Paid> {
    let amount = payment.amount;
    // `run` sends the closure to a blocking thread, so the closure owns what it uses: clones of
    // the producer (a handle on a shared pool) and of the queue's name.
    let ReceiptJobs { producer, queue } = jobs.inner().clone();
    db.run(move |c| {
        c.transaction(|c| {
            let order: Order = diesel::insert_into(orders::table)
                .values((
                    orders::id.eq(id),
                    orders::status.eq("paid"),
                    orders::amount.eq(amount),
                ))
                .on_conflict(orders::id)
                .do_update()
                .set((orders::status.eq("paid"), orders::amount.eq(amount)))
                .returning((orders::id, orders::status, orders::amount))
                .get_result(c)?;
            let job = Job::new(SEND_RECEIPT, vec![id]).on_queue(queue.as_str());
            let jid = c.enqueue_with_barrier(&producer, job)?;
            // Some checks can only run late (a fraud score, a stock count, a constraint checked
            // at the end). Failing one rolls everything back, the barrier row included: the job
            // that is already in Faktory then never runs.
            if amount <= 0 {
                return Err(PayError::Invalid(format!(
                    "amount must be positive, got {amount}"
                )));
            }
            Ok(Paid {
                order,
                receipt_jid: jid.to_string(),
            })
        })
    })
    .await
    .map(Json)
    .map_err(|e| problem(e.status(), e))
}

/// Order `<id>` as committed.
#[rocket::get("/orders/<id>")]
async fn order(db: Db, id: i64) -> Answer<Order> {
    match db
        .run(move |c| orders::table.find(id).first::<Order>(c).optional())
        .await
    {
        Ok(Some(order)) => Ok(Json(order)),
        Ok(None) => Err(problem(Status::NotFound, format!("no order {id}"))),
        Err(e) => Err(problem(Status::InternalServerError, PayError::Database(e))),
    }
}

/// Runs [`setup`] on one of the pool's connections before the application launches.
async fn setup_on_ignite(rocket: Rocket<Build>) -> fairing::Result {
    let Some(db) = Db::get_one(&rocket).await else {
        rocket::error!("no connection to database {DATABASE}");
        return Err(rocket);
    };
    match db.run(|c| setup(c).map_err(|e| e.to_string())).await {
        Ok(()) => Ok(rocket),
        Err(e) => {
            rocket::error!("cannot create the tables of database {DATABASE}: {e}");
            Err(rocket)
        }
    }
}

/// The application: its database pool (at `database_url`, over Rocket's configuration), the
/// tables it needs, its routes, and the producer that pushes receipt jobs to `queue`.
pub fn rocket(database_url: &str, producer: Producer, queue: impl Into<String>) -> Rocket<Build> {
    let figment =
        rocket::Config::figment().merge((format!("databases.{DATABASE}.url"), database_url));
    rocket::custom(figment)
        .attach(Db::fairing())
        .attach(AdHoc::try_on_ignite("create the tables", setup_on_ignite))
        .manage(ReceiptJobs {
            producer,
            queue: queue.into(),
        })
        .mount("/", rocket::routes![pay, order])
}

/// What `send_receipt` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The job's id.
    pub jid: String,
    /// The order, as the handler saw it.
    pub order: Order,
}

/// The `send_receipt` handler's work: reads the paid order (which it can see, since it runs
/// after the payment committed) and records the receipt. The insert commits together with the
/// consumption of the job's barrier, so a receipt is recorded once however often Faktory
/// delivers the job.
pub fn send_receipt(job: &Job, conn: &mut PgConnection) -> Result<Receipt, BoxError> {
    let id = job
        .args()
        .first()
        .and_then(|v| v.as_i64())
        .ok_or("send_receipt takes the order id as its first argument")?;
    let order: Order = orders::table.find(id).first(conn)?;
    if order.status != "paid" {
        return Err(format!("order {id} is {:?}, not paid", order.status).into());
    }
    diesel::insert_into(receipts::table)
        .values((
            receipts::jid.eq(job.id().as_str()),
            receipts::order_id.eq(order.id),
            receipts::amount.eq(order.amount),
        ))
        .execute(conn)?;
    Ok(Receipt {
        jid: job.id().to_string(),
        order,
    })
}

fn main() -> Result<(), BoxError> {
    // FAKTORY_URL, else tcp://localhost:7419.
    let producer = Producer::from_env()?;
    rocket::execute(rocket(&database_url(), producer, QUEUE).launch())?;
    Ok(())
}
