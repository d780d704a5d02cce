//! Broker disruptions mid-stream (quorum queues): every connection closed by the broker, and
//! the broker application stopped and started. The worker must recover by itself, and every
//! request must end with one consistent result, drawn once.
//!
//! These disturb every client of the broker (other tests included), so their names start with
//! `disruptive_`: each takes every nextest thread (.config/nextest.toml), so it runs alone.
//! Under plain `cargo test` (test binaries run one after another, the tests of one binary in
//! parallel), the [`ALONE`] lock keeps them from running beside each other.

use common::*;
use std::time::{Duration, Instant};

/// Held by each test of this file for its whole run: one disruption at a time.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Enough requests that the stream is still flowing when a disruption lands (`rabbitmqctl`
/// itself takes a second or two to act; the worker draws several thousand per second, and
/// 30,000 once finished before the second disruption). `stream_pools` has stock for all.
const M: usize = 60_000;

fn config() -> WorkerConfig {
    let mut config = WorkerConfig::new(QueueType::Quorum, stream_pools());
    // RabbitMQ 3.10 counts every return of a delivery to a quorum queue (each lost connection
    // returns up to `prefetch` unacked deliveries) toward x-delivery-limit: raised so that no
    // request is dead-lettered because it was in flight during the disruptions.
    config.delivery_limit = Some(1000);
    config
}

/// Starts `rabbitmqctl start_app` again on drop if the test stopped the broker and failed
/// before starting it.
struct BrokerApp {
    stopped: bool,
}

impl BrokerApp {
    fn stop(&mut self) {
        self.stopped = true;
        rabbitmqctl(&["stop_app"]);
    }
    fn start(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
        self.stopped = false;
    }
}

impl Drop for BrokerApp {
    fn drop(&mut self) {
        if self.stopped {
            let _ = std::process::Command::new("rabbitmqctl")
                .arg("start_app")
                .status();
        }
    }
}

async fn wait_progress(results: &Collector, at_least: usize) {
    let target = at_least.min(M);
    results
        .wait_for(
            &format!("{target} distinct results"),
            Duration::from_secs(180),
            |m| distinct_count(m) >= target,
        )
        .await;
}

async fn wait_log(worker: &mut Worker, what: &str, pred: impl Fn(&str) -> bool) {
    wait_until(what, Duration::from_secs(60), async || {
        worker.assert_running();
        pred(&worker.log())
    })
    .await;
}

fn sessions(log: &str) -> usize {
    log.matches("connected; consuming").count()
}

/// The end of both tests: all results in, a clean stop, then the invariants.
async fn finish(setup: &Setup, mut worker: Worker, results: Collector, started: Instant) {
    let names = &setup.names;
    wait_progress(&results, M).await;
    let conn = connect_retrying("rewardpool test checks", Duration::from_secs(60)).await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    let msgs = results.messages();
    let outcomes = distinct_results(&msgs);
    check_stream_outcomes(&outcomes, M);
    note(format!(
        "{} result messages for {M} requests after {:?}",
        msgs.len(),
        started.elapsed()
    ));
    assert_queue_drained(&conn, &names.request).await;
    assert_eq!(
        must_queue_state(&conn, &names.dead).await.messages,
        0,
        "nothing dead-lettered"
    );
    setup.check_conservation(outcomes.values());
    drop(results);
    names.delete(&conn).await;
}

async fn start_stream(test: &str) -> (Setup, Worker, Collector) {
    let conn = require_broker().await;
    let setup = Setup::new(test, config());
    let names = setup.names.clone();
    let worker = setup.start_ready(&conn, &[]).await;
    let results = Collector::start(&names.result).await;
    let mut producer = Producer::new(&conn).await;
    // No reply_to: reply queues are exclusive and die with the test's connections.
    publish_stream(&mut producer, &names.request, None, 0..M).await;
    (setup, worker, results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disruptive_close_all_connections_mid_stream() {
    let _alone = ALONE.lock().await;
    let started = Instant::now();
    let (setup, mut worker, results) = start_stream("close-all").await;
    for round in 1..=2 {
        wait_progress(&results, round * 8000).await;
        rabbitmqctl(&[
            "close_all_connections",
            "rewardpool test: close_all_connections",
        ]);
        let at = results.with(distinct_count);
        note(format!("closed every connection at {at} results"));
        assert!(at < M, "the stream finished before the disruption: raise M");
        // The worker noticed, reconnected (epoch round + 1) and carries on.
        wait_log(&mut worker, "the worker to reconnect", |log| {
            sessions(log) > round
        })
        .await;
    }
    finish(&setup, worker, results, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disruptive_broker_restart_mid_stream() {
    let _alone = ALONE.lock().await;
    let started = Instant::now();
    let (setup, mut worker, results) = start_stream("restart").await;
    let mut app = BrokerApp { stopped: false };
    wait_progress(&results, 8000).await;
    app.stop();
    let at = results.with(distinct_count);
    note(format!("broker app stopped at {at} results"));
    assert!(at < M, "the stream finished before the disruption: raise M");
    wait_log(
        &mut worker,
        "the worker to notice the broker is gone",
        |log| log.contains("broker unavailable; reconnecting"),
    )
    .await;
    app.start();
    note("broker app started");
    wait_log(&mut worker, "the worker to reconnect", |log| {
        sessions(log) >= 2
    })
    .await;
    finish(&setup, worker, results, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disruptive_broker_down_at_start_and_at_sigterm() {
    let _alone = ALONE.lock().await;
    const N: usize = M;
    let started = Instant::now();
    let setup = Setup::new("down", config());
    let names = setup.names.clone();
    let mut app = BrokerApp { stopped: false };
    let _ = require_broker().await;

    // Started while the broker is down: it retries, and consumes once the broker is back.
    app.stop();
    let mut worker = setup.start_worker(&[]);
    wait_log(&mut worker, "the worker to retry", |log| {
        log.contains("broker unavailable; reconnecting")
    })
    .await;
    app.start();
    let conn = connect_retrying("rewardpool test", Duration::from_secs(60)).await;
    worker
        .wait_ready(&conn, &names.request, Duration::from_secs(60))
        .await;
    let results = Collector::start(&names.result).await;
    let mut producer = Producer::new(&conn).await;
    publish_stream(&mut producer, &names.request, None, 0..N).await;

    // SIGTERM while the broker is down: the worker must still stop, within its shutdown
    // deadline (30 s by default), and lose nothing.
    wait_progress(&results, 8000).await;
    app.stop();
    let at = results.with(distinct_count);
    note(format!("broker app stopped at {at} results"));
    assert!(at < N, "the stream finished before the disruption: raise M");
    wait_log(&mut worker, "the worker to lose its session", |log| {
        log.contains("broker session lost")
    })
    .await;
    let t = Instant::now();
    worker.signal(libc::SIGTERM);
    let status = worker.wait_exit(Duration::from_secs(45)).await;
    note(format!(
        "SIGTERM with the broker down: {status} after {:?}",
        t.elapsed()
    ));
    app.start();

    // A restart finishes the stream.
    let conn = connect_retrying("rewardpool test", Duration::from_secs(60)).await;
    let mut worker = setup.start_ready(&conn, &[]).await;
    results
        .wait_for("every result", Duration::from_secs(180), |m| {
            distinct_count(m) >= N
        })
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    let outcomes = distinct_results(&results.messages());
    check_stream_outcomes(&outcomes, N);
    assert_queue_drained(&conn, &names.request).await;
    assert_eq!(must_queue_state(&conn, &names.dead).await.messages, 0);
    setup.check_conservation(outcomes.values());
    drop(results);
    names.delete(&conn).await;
    note(format!("took {:?}", started.elapsed()));
}
