//! Starting the worker: the data directory lock, queues (and the dead-letter exchange) that
//! exist with other arguments, and running on the built-in defaults with environment
//! overrides.

use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use std::ffi::OsString;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_worker_on_the_same_data_dir_refuses_to_start() {
    let conn = require_broker().await;
    let setup = Setup::new(
        "lock",
        WorkerConfig::new(
            QueueType::Classic,
            vec![PoolSpec::new("default", &[("gold", 10)])],
        ),
    );
    let names = setup.names.clone();
    let mut first = setup.start_ready(&conn, &[]).await;

    let mut second = setup.start_worker(&[]);
    let status = second.wait_exit(Duration::from_secs(60)).await;
    let log = second.log();
    assert!(
        !status.success(),
        "the second worker must fail; log:\n{log}"
    );
    assert!(
        status.code().is_some(),
        "an exit code, not a signal: {status}"
    );
    assert!(
        log.to_lowercase().contains("lock"),
        "the error must mention the lock:\n{log}"
    );
    assert!(
        log.contains(setup.data_dir.to_str().unwrap()),
        "the error should name the data directory:\n{log}"
    );

    first.assert_running();
    assert_eq!(must_queue_state(&conn, &names.request).await.consumers, 1);
    first.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    names.delete(&conn).await;
}

/// Declares the request queue durable with `args` plus the dead-letter arguments the worker
/// uses (so that `argument` is the one difference), starts a worker, and expects it to exit
/// non-zero with an error naming the queue and `argument`.
async fn inequivalent(test: &str, config: WorkerConfig, mut args: FieldTable, argument: &str) {
    let conn = require_broker().await;
    let setup = Setup::new(test, config);
    let names = setup.names.clone();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dlx().as_str().into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(names.dead.as_str().into()),
    );
    let ch = op("channel.open", conn.create_channel()).await;
    op(
        "queue.declare",
        ch.queue_declare(
            names.request.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        ),
    )
    .await;

    let mut worker = setup.start_worker(&[]);
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    let log = worker.log();
    assert!(!status.success(), "the worker must fail; log:\n{log}");
    assert!(
        status.code().is_some(),
        "an exit code, not a signal: {status}"
    );
    let error: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(!error.is_empty(), "an error line on stderr:\n{log}");
    assert!(
        error.iter().any(|l| l.contains(&names.request)),
        "the error must name the queue {}:\n{log}",
        names.request
    );
    assert!(
        error.iter().any(|l| l.contains(argument)),
        "the error must name the argument {argument}:\n{log}"
    );
    let q = must_queue_state(&conn, &names.request).await;
    assert_eq!(q.consumers, 0, "the failed worker consumes nothing");
    names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_request_queue_stops_a_worker_configured_for_quorum() {
    inequivalent(
        "inequivalent-type",
        WorkerConfig::new(
            QueueType::Quorum,
            vec![PoolSpec::new("default", &[("gold", 10)])],
        ),
        FieldTable::default(),
        "x-queue-type",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_request_queue_with_another_delivery_limit_stops_the_worker() {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(5));
    let mut config = WorkerConfig::new(
        QueueType::Quorum,
        vec![PoolSpec::new("default", &[("gold", 10)])],
    );
    config.delivery_limit = Some(7);
    inequivalent("inequivalent-limit", config, args, "x-delivery-limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_a_config_file_uses_the_defaults_and_stops_on_sigint() {
    let conn = require_broker().await;
    let names = Names::new("defaults");
    let cwd = tempfile::Builder::new()
        .prefix("rpt-defaults-")
        .tempdir()
        .expect("temp cwd");
    // Only the queue names are overridden (from the environment, which also tests the
    // overrides): everything else is built in, the data directory ./data included.
    let env = [
        ("REWARDPOOL__AMQP__REQUEST_QUEUE", names.request.as_str()),
        ("REWARDPOOL__AMQP__RESULT_QUEUE", names.result.as_str()),
        ("REWARDPOOL__AMQP__DEAD_LETTER_QUEUE", names.dead.as_str()),
        ("REWARDPOOL__AMQP__ADMIN_QUEUE", names.admin.as_str()),
    ];
    let args: Vec<OsString> = vec!["run".into()];
    let mut worker = Worker::spawn(&args, Some(cwd.path()), &env, cwd.path().join("worker.log"));
    worker
        .wait_ready(&conn, &names.request, Duration::from_secs(60))
        .await;

    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let mut p = Producer::new(&conn).await;
    p.publish(
        &names.request,
        br#"{"user":"d","count":3}"#,
        request_props(Some("d-1"), Some(&replies.queue), Some("d1")),
    )
    .await;
    p.flush().await;
    replies
        .wait_for("the result", Duration::from_secs(60), |m| {
            m.iter().any(|m| m.kind() == Some("result"))
        })
        .await;
    let result = replies
        .messages()
        .into_iter()
        .find(|m| m.kind() == Some("result"))
        .unwrap();
    let (_, outcome) = parse_result(&result);
    assert_eq!(outcome.pool, "default", "the built-in pool");
    assert_eq!(outcome.items.len(), 3);
    assert!(
        outcome
            .items
            .iter()
            .all(|i| ["gold", "silver", "bronze"].contains(&i.as_str())),
        "{outcome:?}"
    );

    // The built-in queue type is quorum: the request queue must be one.
    let out = rabbitmqctl(&["list_queues", "name", "type", "--no-table-headers", "-q"]);
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(names.request.as_str()))
        .unwrap_or_else(|| panic!("{} not listed:\n{out}", names.request));
    assert!(line.contains("quorum"), "built-in queue type: {line}");

    worker.stop(libc::SIGINT, Duration::from_secs(60)).await;
    assert!(
        cwd.path().join("data").is_dir(),
        "./data is the default data dir"
    );
    let out = cli(&["inspect"], Some(cwd.path()), &env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    let items = &v["pools"][0]["items"];
    let total: u64 = items
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["quantity"].as_u64().unwrap())
        .sum();
    assert_eq!(v["pools"][0]["id"], "default");
    assert_eq!(
        total,
        10 + 100 + 1000 - 3,
        "built-in pool less the 3 drawn: {v}"
    );

    drop(replies);
    names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_exchange_of_another_type_stops_the_worker() {
    let conn = require_broker().await;
    let setup = Setup::new(
        "inequivalent-dlx",
        WorkerConfig::new(
            QueueType::Classic,
            vec![PoolSpec::new("default", &[("gold", 10)])],
        ),
    );
    let names = setup.names.clone();
    let ch = op("channel.open", conn.create_channel()).await;
    op(
        "exchange.declare",
        ch.exchange_declare(
            names.dlx().as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;

    // A misconfiguration no reconnect can fix: an error naming the exchange, not a retry loop.
    let mut worker = setup.start_worker(&[]);
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    let log = worker.log();
    assert!(!status.success(), "the worker must fail; log:\n{log}");
    assert!(
        log.lines()
            .any(|l| l.starts_with("error:") && l.contains(&names.dlx())),
        "the error must name the exchange {}:\n{log}",
        names.dlx()
    );
    // No retry loop: the one error, and no warning (a retry is logged at warn).
    let events = worker.events();
    let warnings = events.iter().filter(|e| e.level == Level::Warn).count();
    assert_eq!(warnings, 0, "no retry loop: {events:#?}");
    names.delete(&conn).await;
}

/// Two workers with their own request and dead-letter queues, one after the other, on one
/// admin queue name (a benchmark's next run, or the built-in `rewardpool.admin`): the admin
/// queue's arguments name only its own dead-letter exchange (`<admin_queue>.dlx`), so the
/// second declares it without a conflict, and a command it rejects lands in its own
/// dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_one_after_another_share_an_admin_queue_name() {
    let conn = require_broker().await;
    let config = || {
        WorkerConfig::new(
            QueueType::Quorum,
            vec![PoolSpec::new("default", &[("gold", 10)])],
        )
    };
    let first = Setup::new("admin-share-a", config());
    let second = Setup::new("admin-share-b", config());
    let admin_queue = first.names.extra("shared-admin");
    let env = [("REWARDPOOL__AMQP__ADMIN_QUEUE", admin_queue.as_str())];

    let mut worker = first.start_ready(&conn, &env).await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let mut worker = second.start_ready(&conn, &env).await;
    let dead_before = must_queue_state(&conn, &second.names.dead).await.messages;
    let mut producer = Producer::new(&conn).await;
    producer
        .publish(
            &admin_queue,
            br#"{"op":"no_such_op"}"#,
            request_props(Some("share-1"), None, None),
        )
        .await;
    producer.flush().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while must_queue_state(&conn, &second.names.dead).await.messages == dead_before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rejected command never reached the second worker's dead-letter queue; log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
}
