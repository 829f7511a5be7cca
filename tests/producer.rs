//! The producer: a synchronous, shareable Faktory handle that works from plain threads and from
//! a Tokio runtime's blocking pool.

use diesel_transaction_barrier::testing::TestFaktory;
use diesel_transaction_barrier::{Error, Job, Producer};
use std::time::Duration;

fn count_in_queue(faktory: &TestFaktory, queue: &str, expected: usize) {
    if let Some(server) = faktory.server_or_skip("the queue size") {
        assert_eq!(server.queue_size(queue), expected);
    }
}

#[test]
fn pushes_from_many_plain_threads() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let queue = faktory.unique_queue("producer");
    let producer = Producer::connect(&faktory.url()).unwrap();
    std::thread::scope(|s| {
        for t in 0..8 {
            let producer = producer.clone();
            let queue = &queue;
            s.spawn(move || {
                for i in 0..25 {
                    producer
                        .push(Job::new("noop", vec![t * 100 + i]).on_queue(queue.clone()))
                        .unwrap();
                }
            });
        }
    });
    count_in_queue(&faktory, &queue, 200);
}

#[test]
fn works_inside_a_tokio_blocking_pool() {
    let faktory = TestFaktory::from_env_or_start().unwrap();
    let queue = faktory.unique_queue("producer");
    let url = faktory.url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Created, used and dropped on blocking-pool threads, as in Rocket's sync DB closures.
        let q = queue.clone();
        let producer = tokio::task::spawn_blocking(move || {
            let producer = Producer::connect(&url).unwrap();
            producer
                .push(Job::new("noop", vec![1]).on_queue(q.clone()))
                .unwrap();
            producer
        })
        .await
        .unwrap();
        let q = queue.clone();
        let p = producer.clone();
        tokio::task::spawn_blocking(move || {
            p.push(Job::new("noop", vec![2]).on_queue(q)).unwrap();
        })
        .await
        .unwrap();
        // Dropping the last handle inside an async task must not panic either.
        tokio::spawn(async move { drop(producer) }).await.unwrap();
    });
    count_in_queue(&faktory, &queue, 2);
}

#[test]
fn unreachable_server_is_an_error_not_a_hang() {
    let err = Producer::builder()
        .url("tcp://127.0.0.1:1")
        .timeout(Duration::from_secs(5))
        .connect()
        .unwrap_err();
    assert!(
        matches!(err, Error::Faktory(_) | Error::FaktoryTimeout(_)),
        "{err}"
    );
}

#[test]
fn a_restarted_server_is_reconnected_to() {
    // Needs a server it can stop and start again on the same port: always the local one.
    let server = diesel_transaction_barrier::testing::TestServer::start().unwrap();
    let addr = server.addr();
    let producer = Producer::connect(&server.url()).unwrap();
    producer.push(Job::new("noop", vec![1])).unwrap();
    server.shutdown();
    assert!(producer.push(Job::new("noop", vec![2])).is_err());
    let server = diesel_transaction_barrier::testing::TestServer::builder()
        .bind(addr)
        .start()
        .unwrap();
    producer.push(Job::new("noop", vec![3])).unwrap();
    assert_eq!(server.queue_size("default"), 1);
}

#[cfg(feature = "postgres")]
#[test]
fn inline_producer_refuses_plain_pushes() {
    let handlers = diesel_transaction_barrier::Handlers::<diesel::pg::PgConnection>::new();
    let producer = Producer::inline(handlers);
    assert!(producer.is_inline());
    assert!(matches!(
        producer.push(Job::new("noop", vec![1])),
        Err(Error::InlinePush)
    ));
}
