//! A broker resource alarm (memory watermark set to 0): the broker blocks publishing
//! connections (connection.blocked). The worker logs it, records it, and waits — its results
//! and confirms do not time out as a lost connection even with a 1 s operation timeout — and
//! finishes every request once the alarm clears. Disruptive (the alarm blocks every publisher
//! on the broker): runs alone (.config/nextest.toml), the alarm lasts a few seconds.

use common::*;
use std::time::Duration;

/// Restores the broker's memory watermark even when the test fails.
struct Watermark(String);

impl Watermark {
    fn alarm() -> Watermark {
        let before = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        let before = before.trim().to_string();
        assert!(before.parse::<f64>().is_ok(), "watermark: {before:?}");
        rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
        Watermark(before)
    }
}

impl Drop for Watermark {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disruptive_a_memory_alarm_blocks_publishing_and_the_worker_waits_it_out() {
    const N: usize = 200;
    let conn = require_broker().await;
    let mut config = WorkerConfig::new(QueueType::Classic, stream_pools());
    config.amqp_extra.push("operation_timeout_ms = 1000".into());
    let setup = Setup::new("alarm", config);
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let results = Collector::start(&names.result).await;

    // Requests wait in the queue (worker paused) before the alarm blocks the producer too.
    worker.signal(libc::SIGSTOP);
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &names.request, None, 0..N).await;
    let alarm = Watermark::alarm();
    worker.signal(libc::SIGCONT);
    wait_until(
        "the worker logs the block",
        Duration::from_secs(30),
        async || worker.log().contains("the broker blocks publishing"),
    )
    .await;
    // Three operation timeouts with the broker blocking: waiting, not reconnecting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(alarm);
    results
        .wait_for(
            "every result after the alarm",
            Duration::from_secs(120),
            |m| distinct_count(m) >= N,
        )
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let log = worker.log();
    assert!(log.contains("the broker unblocked publishing"), "{log}");
    for bad in ["session lost", "timed out", "reconnecting"] {
        assert!(
            !log.contains(bad),
            "a blocked broker was taken for a lost one ({bad}):\n{log}"
        );
    }
    results.barrier(&conn).await;
    let outcomes = distinct_results(&results.messages());
    check_stream_outcomes(&outcomes, N);
    setup.check_conservation(outcomes.values());
    drop(results);
    names.delete(&conn).await;
}
