//! The worker of the Rocket shop (`examples/rocket_app.rs`): runs `send_receipt` for each
//! payment that committed, and never for one that rolled back.
//!
//! ```text
//! export DATABASE_URL=postgres://postgres@127.0.0.1:5432/test FAKTORY_URL=tcp://127.0.0.1:7419
//! cargo run --example rocket_worker
//! ```

#[path = "rocket_app.rs"]
#[allow(dead_code)]
mod app;

use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, Pool};
use diesel_transaction_barrier::{BoxError, Job, WorkerBuilder};

const WORKERS: usize = 4;

fn main() -> Result<(), BoxError> {
    // One connection per handler, and two for the waiter that resolves barriers.
    let pool = Pool::builder()
        .max_size(WORKERS as u32 + 2)
        .build(ConnectionManager::<PgConnection>::new(app::database_url()))?;
    app::setup(&mut *pool.get()?)?;
    let mut worker = WorkerBuilder::new(pool)
        .workers(WORKERS)
        .register(
            app::SEND_RECEIPT,
            |job: &Job, conn: &mut PgConnection| -> Result<(), BoxError> {
                let receipt = app::send_receipt(job, conn)?;
                // A real shop would send an email here. Side effects outside the database run
                // at least once: a worker that dies before the commit runs the job again.
                println!(
                    "receipt for order {}: {} cents (job {})",
                    receipt.order.id, receipt.order.amount, receipt.jid
                );
                Ok(())
            },
        )
        .connect()?;
    let reason = worker.run(&[app::QUEUE])?;
    println!("worker stopped: {reason:?}");
    Ok(())
}
