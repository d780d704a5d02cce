//! A result queue that refuses publishes (classic queue, `overflow = reject-publish` policy):
//! the broker nacks result publishes, so the requests must not be acked; they come back as
//! repeats and complete, drawn once, when the result queue has room again.

use common::*;
use std::time::{Duration, Instant};

/// Removes the test's broker policy even when the test fails.
struct Policy(String);

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_results_keep_their_requests_unacked_until_the_result_queue_has_room() {
    const N: usize = 300;
    const ROOM: u32 = 50;
    let started = Instant::now();
    let conn = require_broker().await;
    let setup = Setup::new(
        "refused",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let names = setup.names.clone();
    // A policy, not queue arguments: the worker's own declaration stays equivalent.
    let policy = Policy(names.extra("policy"));
    let pattern = format!("^{}$", names.result.replace('.', "\\."));
    let definition = format!(r#"{{"max-length":{ROOM},"overflow":"reject-publish"}}"#);
    rabbitmqctl(&[
        "set_policy",
        &policy.0,
        &pattern,
        &definition,
        "--apply-to",
        "queues",
    ]);

    let mut worker = setup.start_ready(&conn, &[]).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &names.request, None, 0..N).await;

    // The result queue fills up; every other request stays unacked or goes back to the queue.
    wait_until(
        "the result queue to fill up",
        Duration::from_secs(60),
        async || must_queue_state(&conn, &names.result).await.messages >= ROOM,
    )
    .await;
    wait_until(
        "the worker to report refused results",
        Duration::from_secs(60),
        async || worker.log().contains("broker refused a result"),
    )
    .await;
    worker.assert_running();
    // Stopped now, the worker must have acked exactly the requests whose results the broker
    // took: every other one is back in the request queue.
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    assert_eq!(must_queue_state(&conn, &names.result).await.messages, ROOM);
    assert_eq!(
        must_queue_state(&conn, &names.request).await.messages,
        N as u32 - ROOM,
        "requests whose results were refused must not be acked"
    );

    // Room again: everything completes.
    let results = Collector::start(&names.result).await;
    let mut worker = setup.start_ready(&conn, &[]).await;
    results
        .wait_for("every request's result", Duration::from_secs(120), |m| {
            distinct_count(m) >= N
        })
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    let msgs = results.messages();
    let outcomes = distinct_results(&msgs);
    check_stream_outcomes(&outcomes, N);
    note(format!("{} results for {N} requests", msgs.len()));
    assert_queue_drained(&conn, &names.request).await;
    setup.check_conservation(outcomes.values());
    drop(results);
    drop(policy);
    names.delete(&conn).await;
    note(format!("took {:?}", started.elapsed()));
}
