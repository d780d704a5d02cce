//! A broker resource alarm (memory watermark set to 0): the broker blocks publishing
//! connections (connection.blocked). The worker logs it, records it, and waits — its results
//! and confirms do not time out as a lost connection even with a 1 s operation timeout — and
//! finishes every request once the alarm clears. `/readyz` answers 503 `blocked` while the
//! broker blocks it (`rewardpool_ready` 0, still connected), 200 `ready` after. Disruptive (the alarm blocks every publisher
//! on the broker): runs alone (.config/nextest.toml), the alarm lasts a few seconds.

use common::metrics::*;
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
    let addr = format!("127.0.0.1:{}", free_port());
    let mut worker = setup
        .start_ready(&conn, &[("REWARDPOOL__METRICS__LISTEN", addr.as_str())])
        .await;
    assert_eq!(
        wait_readyz(&addr, 200, Duration::from_secs(30)).await,
        "ready\n"
    );
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
    // Blocked is not ready, and not a lost connection.
    assert_eq!(
        http(&addr, "/readyz").await,
        Ok((503, "blocked\n".to_owned()))
    );
    let s = scrape(&addr).await;
    assert_eq!(value(&s, "rewardpool_ready", &[]), Some(0.0));
    assert_eq!(value(&s, "rewardpool_broker_connected", &[]), Some(1.0));
    // Three operation timeouts with the broker blocking: waiting, not reconnecting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        http(&addr, "/readyz").await,
        Ok((503, "blocked\n".to_owned()))
    );
    drop(alarm);
    results
        .wait_for(
            "every result after the alarm",
            Duration::from_secs(120),
            |m| distinct_count(m) >= N,
        )
        .await;
    assert_eq!(
        wait_readyz(&addr, 200, Duration::from_secs(30)).await,
        "ready\n"
    );
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
