//! Observability against a live worker, real broker, real HTTP: `/metrics` counters agree with
//! what was sent and received and with `inspect`; `/readyz` follows recovery, the broker
//! session and reconnects; JSON logs; a taken `metrics.listen` is a clear error.

use common::metrics::*;
use common::*;
use std::time::Duration;

const N: usize = 5000;
const BAD: usize = 50;
const REPEATS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_agree_with_what_was_sent_received_and_inspected() {
    let conn = require_broker().await;
    let setup = Setup::new(
        "metrics",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let names = setup.names.clone();
    let addr = format!("127.0.0.1:{}", free_port());
    let before = setup.inspect();
    let mut worker = setup
        .start_ready(
            &conn,
            &[
                ("REWARDPOOL__METRICS__LISTEN", addr.as_str()),
                ("REWARDPOOL__LOG__FORMAT", "json"),
            ],
        )
        .await;
    assert_eq!(
        wait_readyz(&addr, 200, Duration::from_secs(30)).await,
        "ready\n"
    );
    assert_eq!(
        http(&addr, "/healthz").await.unwrap(),
        (200, "ok\n".to_owned())
    );
    let results = Collector::start(&names.result).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &names.request, None, 0..N / 2).await;
    // A scrape while requests flow parses and is monotone afterwards.
    let during = scrape(&addr).await;
    let during_accepted = value(
        &during,
        "rewardpool_requests_total",
        &[("outcome", "accepted")],
    )
    .expect("requests_total{accepted}");
    publish_stream(&mut p, &names.request, None, N / 2..N).await;
    // Rejected: bodies that are not requests.
    for i in 0..BAD {
        p.publish(
            &names.request,
            b"not json",
            request_props(Some(&format!("bad-{i}")), None, Some(&format!("cbad-{i}"))),
        )
        .await;
    }
    // Repeats of requests already sent.
    publish_stream(&mut p, &names.request, None, 0..REPEATS).await;
    p.flush().await;
    results
        .wait_for("every result", Duration::from_secs(120), |m| {
            m.iter().filter(|m| m.kind() == Some("result")).count() >= N + REPEATS
        })
        .await;
    wait_until(
        "the worker to settle",
        Duration::from_secs(30),
        async || {
            let s = scrape(&addr).await;
            value(&s, "rewardpool_inflight_requests", &[]) == Some(0.0)
                && sum(&s, "rewardpool_requests_total", &[]) == (N + BAD + REPEATS) as f64
        },
    )
    .await;
    let s = scrape(&addr).await;
    let accepted = value(&s, "rewardpool_requests_total", &[("outcome", "accepted")]).unwrap();
    let repeat = value(&s, "rewardpool_requests_total", &[("outcome", "repeat")]).unwrap();
    let rejected = value(&s, "rewardpool_requests_total", &[("outcome", "rejected")]).unwrap();
    assert!(during_accepted <= accepted);
    assert_eq!(
        (accepted, repeat, rejected),
        (N as f64, REPEATS as f64, BAD as f64),
        "accepted + repeat + rejected = delivered"
    );
    // Results by status = the results seen on the result queue.
    let seen = results.messages();
    let seen: Vec<_> = seen.iter().filter(|m| m.kind() == Some("result")).collect();
    for pool in ["default", "tiny"] {
        for status in ["won", "empty"] {
            let count = seen
                .iter()
                .filter(|m| {
                    let v = m.json();
                    v["pool"] == pool && v["status"] == status
                })
                .count();
            assert_eq!(
                value(
                    &s,
                    "rewardpool_results_total",
                    &[("pool", pool), ("status", status)]
                ),
                Some(count as f64),
                "results {pool}/{status}"
            );
        }
    }
    // Items drawn = the pool's decrease; stock gauges = inspect.
    let after = setup.inspect();
    for (pi, pool) in after["pools"].as_array().unwrap().iter().enumerate() {
        let pid = pool["id"].as_str().unwrap();
        for (ii, item) in pool["items"].as_array().unwrap().iter().enumerate() {
            let iid = item["id"].as_str().unwrap();
            let was = before["pools"][pi]["items"][ii]["quantity"]
                .as_f64()
                .unwrap();
            let left = item["quantity"].as_f64().unwrap();
            let labels = [("pool", pid), ("item", iid)];
            assert_eq!(
                value(&s, "rewardpool_items_drawn_total", &labels),
                Some(was - left),
                "{pid}/{iid} drawn"
            );
            assert_eq!(
                value(&s, "rewardpool_stock_remaining", &labels),
                Some(left),
                "{pid}/{iid} stock"
            );
            // inspect's `stocked` (quantity + issued); before inspect prints it, the seeded
            // quantity (no admin command changed it here).
            let stocked = item["stocked"].as_f64().unwrap_or(was);
            assert_eq!(
                value(&s, "rewardpool_stock_stocked", &labels),
                Some(stocked),
                "{pid}/{iid} stocked"
            );
        }
    }
    let max_id = seen
        .iter()
        .filter_map(|m| m.header("request_id").and_then(amqp_int))
        .max()
        .unwrap();
    assert_eq!(
        value(&s, "rewardpool_last_request_id", &[]),
        Some(max_id as f64)
    );
    assert_eq!(value(&s, "rewardpool_broker_connected", &[]), Some(1.0));
    assert_eq!(value(&s, "rewardpool_ready", &[]), Some(1.0));
    assert_eq!(
        value(
            &s,
            "rewardpool_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    // Histograms: every accepted or repeated request was measured at each stage.
    for stage in ["accepted", "durable", "acked"] {
        let count = value(
            &s,
            "rewardpool_request_duration_seconds_count",
            &[("stage", stage)],
        )
        .unwrap_or_else(|| panic!("stage {stage} histogram"));
        assert_eq!(count, (N + REPEATS) as f64, "stage {stage}");
    }
    assert!(value(&s, "rewardpool_wal_fsync_duration_seconds_count", &[]).unwrap() >= 1.0);
    assert!(value(&s, "rewardpool_wal_batch_records_sum", &[]).unwrap() >= N as f64);
    // The admin series exists (no command yet): its family is declared.
    let (_, body) = http(&addr, "/metrics").await.unwrap();
    assert!(
        body.contains("# TYPE rewardpool_admin_commands counter"),
        "{body}"
    );

    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    // JSON logs: every line is an object with the fields; a rejected request's line names it.
    let log = worker.log();
    let mut rejected_lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(v.get(field).is_some(), "no {field}: {line}");
        }
        if v["message"] == "request rejected to the dead-letter queue" {
            assert!(
                v["message_id"].as_str().unwrap().starts_with("bad-"),
                "{line}"
            );
            assert!(
                v["correlation_id"].as_str().unwrap().starts_with("cbad-"),
                "{line}"
            );
            rejected_lines += 1;
        }
        assert!(!line.contains('\u{1b}'), "colour code in {line}");
    }
    assert_eq!(rejected_lines, BAD, "one line per rejected request");
    names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_broker_session_and_reconnects() {
    let conn = require_broker().await;
    let setup = Setup::new(
        "readyz",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    // A broker that is not there: the worker keeps connecting, /readyz says so.
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let mut worker = setup.start_worker(&[
        ("REWARDPOOL__METRICS__LISTEN", addr.as_str()),
        ("REWARDPOOL__AMQP__URL", closed.as_str()),
    ]);
    // "recovering" first, then "connecting" for as long as the broker is away.
    wait_until(
        "/readyz to say connecting",
        Duration::from_secs(30),
        async || http(&addr, "/readyz").await == Ok((503, "connecting\n".to_owned())),
    )
    .await;
    assert_eq!(http(&addr, "/healthz").await.unwrap().0, 200);
    let s = scrape(&addr).await;
    assert_eq!(value(&s, "rewardpool_broker_connected", &[]), Some(0.0));
    assert_eq!(value(&s, "rewardpool_ready", &[]), Some(0.0));
    worker.stop(libc::SIGTERM, Duration::from_secs(30)).await;

    // The real broker: ready; its connection closed by the broker: not ready, then ready again.
    let mut worker = setup
        .start_ready(&conn, &[("REWARDPOOL__METRICS__LISTEN", addr.as_str())])
        .await;
    wait_readyz(&addr, 200, Duration::from_secs(30)).await;
    let name = format!("rewardpool worker {}", worker.pid());
    close_connection_named(&name, "test: reconnect");
    // Between the close and the next session /readyz answers 503 "reconnecting" (the session
    // ends, the link closes, the backoff of at least 50 ms passes).
    wait_until(
        "/readyz to say reconnecting",
        Duration::from_secs(30),
        async || http(&addr, "/readyz").await == Ok((503, "reconnecting\n".to_owned())),
    )
    .await;
    wait_until(
        "a reconnect to be counted",
        Duration::from_secs(30),
        async || {
            let s = scrape(&addr).await;
            value(&s, "rewardpool_broker_reconnects_total", &[]) == Some(1.0)
        },
    )
    .await;
    wait_readyz(&addr, 200, Duration::from_secs(60)).await;
    // Shutdown: 503 "shutting down" until the listener closes with the process.
    worker.signal(libc::SIGTERM);
    let mut seen = Vec::new();
    while let Ok(answer) = http(&addr, "/readyz").await {
        if seen.last() != Some(&answer) {
            seen.push(answer);
        }
    }
    assert_eq!(
        seen.last(),
        Some(&(503, "shutting down\n".to_owned())),
        "answers after SIGTERM: {seen:?}"
    );
    worker.wait_exit(Duration::from_secs(60)).await;
    // One reconnect is one WARN line with its reason; lapin's own lines are filtered.
    let log = worker.log();
    let warns: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(warns.len(), 1, "{log}");
    assert!(
        warns[0].contains("broker session lost; reconnecting"),
        "{log}"
    );
    assert!(!log.contains(" ERROR "), "{log}");
    setup.names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_address_is_a_clear_error_naming_the_key() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let setup = Setup::new(
        "metricsbusy",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let mut worker = setup.start_worker(&[("REWARDPOOL__METRICS__LISTEN", addr.as_str())]);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let log = worker.log();
    assert!(
        log.contains("metrics.listen") && log.contains(&addr),
        "{log}"
    );
    drop(held);
}
