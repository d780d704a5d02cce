//! One shutdown path for every signal (real worker processes, real broker, classic queues):
//! SIGINT and SIGHUP stop as cleanly as SIGTERM (tests/amqp_shutdown.rs); a passed
//! `amqp.shutdown_deadline_ms` and a second signal exit non-zero at once. In every case a
//! restart finishes every request, each drawn once (stock accounting holds).

use common::*;
use std::time::{Duration, Instant};

const N: usize = 3000;

enum Expect {
    /// Exit 0 after a clean shutdown.
    Clean,
    /// Exit non-zero, the log saying this.
    Fails { code: i32, log: &'static str },
}

/// Starts a worker, lets requests flow, sends `signals` (2 ms apart) once results come out,
/// checks the exit, then restarts the worker (default deadline) and checks that every request
/// ends with one outcome and the stock adds up.
async fn scenario(test: &str, signals: &[i32], deadline_ms: Option<u64>, expect: Expect) {
    let conn = require_broker().await;
    let mut config = WorkerConfig::new(QueueType::Classic, stream_pools());
    if let Some(ms) = deadline_ms {
        config
            .amqp_extra
            .push(format!("shutdown_deadline_ms = {ms}"));
    }
    let mut setup = Setup::new(test, config);
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let results = Collector::start(&names.result).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &names.request, None, 0..N).await;
    results
        .wait_for("300 results", Duration::from_secs(120), |m| {
            distinct_count(m) >= 300
        })
        .await;

    let t = Instant::now();
    for (k, sig) in signals.iter().enumerate() {
        if k > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        worker.signal(*sig);
    }
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    let took = t.elapsed();
    let log = worker.log();
    match expect {
        Expect::Clean => {
            assert_eq!(status.code(), Some(0), "{status}\n{log}");
            assert!(log.contains("stopped"), "{log}");
            assert!(!log.contains("deadline passed"), "{log}");
        }
        Expect::Fails { code, log: want } => {
            assert_eq!(status.code(), Some(code), "{status}\n{log}");
            assert!(log.contains(want), "the log should say {want:?}:\n{log}");
        }
    }
    let done = distinct_count(&results.messages());
    note(format!(
        "{test}: signals {signals:?}: exit {status} {took:?} after the first signal, {done} of {N} results out"
    ));

    // A restart with the default deadline finishes everything.
    setup.config.amqp_extra.clear();
    std::fs::write(&setup.config_path, setup.render()).unwrap();
    let mut worker = setup.start_ready(&conn, &[]).await;
    results
        .wait_for("every request's result", Duration::from_secs(300), |m| {
            distinct_count(m) >= N
        })
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    let outcomes = distinct_results(&results.messages());
    check_stream_outcomes(&outcomes, N);
    setup.check_conservation(outcomes.values());
    assert_queue_drained(&conn, &names.request).await;
    drop(results);
    names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_cleanly() {
    scenario("sigint", &[libc::SIGINT], None, Expect::Clean).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_stops_cleanly() {
    scenario("sighup", &[libc::SIGHUP], None, Expect::Clean).await;
}

/// A 1 ms deadline cannot cover cancelling the consumer, settling hundreds of accepted
/// requests and closing the connection: the worker exits non-zero, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_shutdown_deadline_exits_non_zero_and_nothing_is_lost() {
    scenario(
        "deadline",
        &[libc::SIGTERM],
        Some(1),
        Expect::Fails {
            code: 1,
            log: "shutdown deadline passed",
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_nothing_is_lost() {
    scenario(
        "second",
        &[libc::SIGTERM, libc::SIGINT],
        None,
        Expect::Fails {
            code: 2,
            log: "second signal: exiting at once",
        },
    )
    .await;
}
