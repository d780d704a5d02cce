//! The disk fills while the worker runs (classic queues): the WAL write fails, the engine
//! stops at once (a storage error is fatal, never retried), the worker exits non-zero without
//! acking anything that is not on disk; with space back, a restart finishes every request, and
//! no request has two different outcomes. The data directory is a real small tmpfs (root).

use common::Tmpfs;
use common::*;
use std::time::Duration;

const FIRST: usize = 300;
const TOTAL: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_stops_the_worker_and_a_restart_finishes_every_request() {
    let conn = require_broker().await;
    let setup = Setup::new(
        "diskfull",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let names = setup.names.clone();
    let tmpfs = Tmpfs::mount_at(&setup.data_dir, "4m");
    let addr = format!("127.0.0.1:{}", common::metrics::free_port());
    let mut worker = setup
        .start_ready(&conn, &[("REWARDPOOL__METRICS__LISTEN", addr.as_str())])
        .await;
    // /healthz, polled until the listener goes away with the process: 200 while storage
    // works, 503 once the engine stopped on the full disk.
    let health = tokio::spawn(async move {
        let mut seen: Vec<(u16, String)> = Vec::new();
        while let Ok(answer) = common::metrics::http(&addr, "/healthz").await {
            if seen.last() != Some(&answer) {
                seen.push(answer);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen
    });
    let results = Collector::start(&names.result).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &names.request, None, 0..FIRST).await;
    results
        .wait_for("the first results", Duration::from_secs(60), |m| {
            distinct_count(m) >= FIRST
        })
        .await;

    // Leave room for a few batches only, then keep the requests coming.
    let filler = tmpfs.fill_leaving(24 * 1024);
    publish_stream(&mut p, &names.request, None, FIRST..TOTAL).await;
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    assert_ne!(
        status.code(),
        Some(0),
        "a failed WAL write must stop the worker with an error"
    );
    let log = worker.log();
    assert!(
        log.contains("No space left") || log.contains("disk full"),
        "the error names the cause:\n{log}"
    );
    let health = health.await.unwrap();
    assert_eq!(
        health,
        vec![
            (200, "ok\n".to_owned()),
            (503, "storage failed\n".to_owned())
        ],
        "/healthz answers"
    );
    results.barrier(&conn).await;
    let before = distinct_count(&results.messages());
    assert!(
        before < TOTAL,
        "the disk filled before the stream ended ({before} results)"
    );

    // Space is back: a restart recovers and finishes every request exactly once.
    std::fs::remove_file(&filler).unwrap();
    let mut worker = setup.start_ready(&conn, &[]).await;
    results
        .wait_for("every result", Duration::from_secs(120), |m| {
            distinct_count(m) >= TOTAL
        })
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    let outcomes = distinct_results(&results.messages());
    check_stream_outcomes(&outcomes, TOTAL);
    setup.check_conservation(outcomes.values());
    assert_queue_drained(&conn, &names.request).await;
    drop(results);
    names.delete(&conn).await;
}
