//! The broker lock on the request queue: a second worker pointed at the same queues (its own
//! data directory, so its own copy of the pools) does not consume; it exits non-zero with an
//! error naming the queue. Once the first worker's connection ends, the lock is free again.

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_queues_exits_naming_the_queue() {
    let conn = require_broker().await;
    // Quorum: the queue type on which exclusive consumers are not enforced (NOTES.md).
    let setup = Setup::new("lock", WorkerConfig::new(QueueType::Quorum, stream_pools()));
    let names = setup.names.clone();
    let mut first = setup.start_ready(&conn, &[]).await;

    let other_dir = setup.dir.path().join("other-data");
    let other = other_dir.to_str().unwrap().to_string();
    let mut second = setup.start_worker(&[("REWARDPOOL__STORAGE__DATA_DIR", &other)]);
    let status = second.wait_exit(Duration::from_secs(60)).await;
    let log = second.log();
    assert!(
        !status.success(),
        "the second worker must fail: {status}\n{log}"
    );
    assert!(
        log.contains("another worker holds the broker lock")
            && log.contains(&format!("request queue {:?}", names.request)),
        "the error must name the queue and the other worker:\n{log}"
    );
    assert!(!log.contains("connected; consuming"), "{log}");
    // The first worker keeps the queue alone.
    first.assert_running();
    assert_eq!(must_queue_state(&conn, &names.request).await.consumers, 1);

    // Requests are drawn by the first worker.
    let results = Collector::start(&names.result).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &names.request, None, 0..3).await;
    results
        .wait_for("3 results", Duration::from_secs(60), |m| {
            distinct_count(m) >= 3
        })
        .await;

    // The lock goes with the first worker's connection: a worker started after it holds it.
    first.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let mut third = setup.start_worker(&[("REWARDPOOL__STORAGE__DATA_DIR", &other)]);
    third
        .wait_ready(&conn, &names.request, Duration::from_secs(60))
        .await;
    third.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    names.delete(&conn).await;
}
