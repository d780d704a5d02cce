//! Poison requests (classic queues): each is dead-lettered untouched with a `rejected` reply,
//! the valid requests around them are served, and the worker keeps running. Also: poisons and
//! repeats mixed into a stream at volume, `prefetch = 1`, a `reply_to` naming no queue, and a
//! `message_id` that is not UTF-8.

use common::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use std::time::{Duration, Instant};

struct Poison {
    name: &'static str,
    body: Vec<u8>,
    /// A word the `error` must contain (lowercase).
    says: &'static str,
    with_reply: bool,
}

fn poisons() -> Vec<Poison> {
    let p = |name, body: &[u8], says, with_reply| Poison {
        name,
        body: body.to_vec(),
        says,
        with_reply,
    };
    let long_user = format!(r#"{{"user":"{}"}}"#, "u".repeat(257));
    // A valid JSON object, but one byte over 64 KiB.
    let mut huge = br#"{"user":"big"}"#.to_vec();
    huge.resize(64 * 1024 + 1, b' ');
    vec![
        p("not-json", b"not json at all", "json", true),
        p("empty-body", b"", "json", true),
        p("array", b"[1,2,3]", "object", true),
        p("null", b"null", "object", true),
        p("count-string", br#"{"count":"2"}"#, "count", true),
        p("count-float", br#"{"count":1.5}"#, "count", true),
        p("pool-number", br#"{"pool":7}"#, "pool", true),
        p("user-number", br#"{"user":42}"#, "user", true),
        p("unknown-pool", br#"{"pool":"nope"}"#, "pool", true),
        p("count-0", br#"{"count":0}"#, "count", true),
        p("count-101", br#"{"count":101}"#, "count", true),
        p("count-negative", br#"{"count":-1}"#, "count", true),
        Poison {
            name: "user-257-bytes",
            body: long_user.into_bytes(),
            says: "user",
            with_reply: true,
        },
        Poison {
            name: "body-over-64k",
            body: huge,
            says: "64",
            with_reply: true,
        },
        p("not-json-no-reply-to", b"{{{", "json", false),
        // Rejected requests get no ID: the same message_id, valid, is drawn later.
        p("reused-id", br#"{"count":"x"}"#, "count", true),
    ]
}

fn poison_props(k: usize, name: &str, reply_to: Option<&str>) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert("x-test-case".into(), AMQPValue::LongString(name.into()));
    headers.insert("x-test-k".into(), AMQPValue::LongLongInt(k as i64));
    let message_id = if name == "reused-id" {
        "reused".to_string()
    } else {
        format!("p-{k}")
    };
    request_props(Some(&message_id), reply_to, Some(&format!("x-{k}")))
        .with_headers(headers)
        .with_app_id(ShortString::from("rewardpool-tests"))
        .with_priority(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_requests_are_dead_lettered_and_the_worker_keeps_running() {
    let started = Instant::now();
    let conn = require_broker().await;
    let setup = Setup::new(
        "poison",
        WorkerConfig::new(
            QueueType::Classic,
            vec![PoolSpec::new("default", &[("gold", 10), ("silver", 100)])],
        ),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let results = Collector::start(&names.result).await;
    let dead = Collector::start(&names.dead).await;

    let poisons = poisons();
    let mut producer = Producer::new(&conn).await;
    let valid = |k: usize| {
        (
            format!(r#"{{"user":"v{k}","count":1}}"#),
            request_props(
                Some(&format!("v-{k}")),
                Some(&replies.queue),
                Some(&format!("y-{k}")),
            ),
        )
    };
    // valid, poison, valid, poison, ..., valid
    for (k, p) in poisons.iter().enumerate() {
        let (body, props) = valid(k);
        producer
            .publish(&names.request, body.as_bytes(), props)
            .await;
        let reply_to = p.with_reply.then_some(replies.queue.as_str());
        producer
            .publish(&names.request, &p.body, poison_props(k, p.name, reply_to))
            .await;
    }
    let (body, props) = valid(poisons.len());
    producer
        .publish(&names.request, body.as_bytes(), props)
        .await;
    // The message_id of a rejected request, now valid: a new request with an ID.
    producer
        .publish(
            &names.request,
            br#"{"user":"reused"}"#,
            request_props(Some("reused"), Some(&replies.queue), Some("reused-ok")),
        )
        .await;
    producer.flush().await;

    let n_valid = poisons.len() + 1 + 1;
    let n_rejected_replies = poisons.iter().filter(|p| p.with_reply).count();
    dead.wait_for("every poison dead-lettered", Duration::from_secs(60), |m| {
        m.len() >= poisons.len()
    })
    .await;
    replies
        .wait_for(
            "accepted + result per valid request, rejected per poison",
            Duration::from_secs(60),
            |m| m.len() >= 2 * n_valid + n_rejected_replies,
        )
        .await;
    results
        .wait_for("a result per valid request", Duration::from_secs(60), |m| {
            m.len() >= n_valid
        })
        .await;
    worker.assert_running();

    // Dead-lettered: body and properties untouched, x-death added by the broker.
    let dead_msgs = dead.messages();
    assert_eq!(dead_msgs.len(), poisons.len());
    for (k, p) in poisons.iter().enumerate() {
        let m = dead_msgs
            .iter()
            .find(|m| m.correlation_id() == Some(format!("x-{k}").as_str()))
            .unwrap_or_else(|| panic!("poison {} not in the dead-letter queue", p.name));
        assert!(m.body == p.body, "{}: body changed", p.name);
        let sent = poison_props(k, p.name, p.with_reply.then_some(replies.queue.as_str()));
        assert_eq!(m.props.message_id(), sent.message_id(), "{}", p.name);
        assert_eq!(m.props.reply_to(), sent.reply_to(), "{}", p.name);
        assert_eq!(m.props.content_type(), sent.content_type(), "{}", p.name);
        assert_eq!(m.props.delivery_mode(), sent.delivery_mode(), "{}", p.name);
        assert_eq!(m.props.app_id(), sent.app_id(), "{}", p.name);
        assert_eq!(m.props.priority(), sent.priority(), "{}", p.name);
        for h in ["x-test-case", "x-test-k"] {
            assert_eq!(
                m.header(h),
                sent.headers().as_ref().unwrap().inner().get(h),
                "{}: header {h}",
                p.name
            );
        }
        let Some(AMQPValue::FieldArray(deaths)) = m.header("x-death") else {
            panic!("{}: no x-death header: {:?}", p.name, m.props.headers());
        };
        let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
            panic!("{}: x-death is not a list of tables", p.name);
        };
        let field = |k: &str| match death.inner().get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            Some(AMQPValue::ShortString(s)) => s.as_str().to_string(),
            other => panic!("{}: x-death {k}: {other:?}", p.name),
        };
        assert_eq!(field("reason"), "rejected", "{}", p.name);
        assert_eq!(field("queue"), names.request, "{}", p.name);
    }

    // Rejected replies: type, correlation_id, body; no ID for a poison.
    replies.barrier(&conn).await;
    let reply_msgs = replies.messages();
    for (k, p) in poisons.iter().enumerate() {
        let corr = format!("x-{k}");
        let mine: Vec<&Msg> = reply_msgs
            .iter()
            .filter(|m| m.correlation_id() == Some(corr.as_str()))
            .collect();
        if !p.with_reply {
            assert!(mine.is_empty(), "{}: a reply without reply_to", p.name);
            continue;
        }
        assert_eq!(mine.len(), 1, "{}: exactly one reply, got {mine:?}", p.name);
        assert_eq!(mine[0].kind(), Some("rejected"), "{}", p.name);
        let v = mine[0].json();
        assert_eq!(v["status"], "rejected", "{}: {v}", p.name);
        let error = v["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(
            error.contains(p.says),
            "{}: error {error:?} should say what is wrong ({:?})",
            p.name,
            p.says
        );
        assert_eq!(
            v.as_object().unwrap().len(),
            2,
            "{}: rejected body has status and error only: {v}",
            p.name
        );
    }

    // The valid requests were all served, the reused message_id included.
    let accepted = accepted_ids(&reply_msgs);
    let mut served: Vec<String> = (0..=poisons.len()).map(|k| format!("y-{k}")).collect();
    served.push("reused-ok".into());
    for corr in &served {
        assert_eq!(accepted[corr].len(), 1, "{corr}: one accepted reply");
    }
    assert_eq!(accepted.len(), served.len(), "only valid requests get IDs");
    let outcomes = distinct_results(&results.messages());
    assert_eq!(outcomes.len(), n_valid);
    assert_eq!(outcomes["reused"].user, "reused");
    for k in 0..=poisons.len() {
        assert_eq!(outcomes[&format!("v-{k}")].user, format!("v{k}"));
    }

    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    assert_queue_drained(&conn, &names.request).await;
    setup.check_conservation(outcomes.values());
    drop((replies, results, dead));
    names.delete(&conn).await;
    note(format!("poison test took {:?}", started.elapsed()));
}

/// Poisons, repeats and valid requests mixed at volume: rejects interleave with multiple
/// acks (a double or lost ack would close the channel), repeats complete behind their firsts.
/// Nothing may be published twice and the session must never be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_stream_of_valid_poison_and_repeated_requests_at_volume() {
    const N: usize = 5000;
    let started = Instant::now();
    let conn = require_broker().await;
    let setup = Setup::new(
        "mixed",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let results = Collector::start(&names.result).await;
    let dead = Collector::start(&names.dead).await;
    let mut p = Producer::new(&conn).await;
    let is_poison = |i: usize| i % 7 == 3;
    let (mut poisons, mut publishes) = (0usize, std::collections::HashMap::new());
    for i in 0..N {
        let corr = format!("c-{i}");
        if is_poison(i) {
            poisons += 1;
            p.publish(
                &names.request,
                br#"{"count":0}"#,
                request_props(Some(&format!("p-{i}")), Some(&replies.queue), Some(&corr)),
            )
            .await;
        } else {
            *publishes.entry(format!("m-{i}")).or_insert(0usize) += 1;
            p.publish(
                &names.request,
                stream_body(i).as_bytes(),
                request_props(Some(&format!("m-{i}")), Some(&replies.queue), Some(&corr)),
            )
            .await;
        }
        // Every 5th: a repeat of an earlier valid request, sometimes still in flight.
        if i.is_multiple_of(5) && i >= 40 && !is_poison(i - 40) {
            let j = i - 40;
            *publishes.entry(format!("m-{j}")).or_insert(0usize) += 1;
            p.publish(
                &names.request,
                b"ignored: a repeat's body is not looked at",
                request_props(
                    Some(&format!("m-{j}")),
                    Some(&replies.queue),
                    Some(&format!("r-{i}")),
                ),
            )
            .await;
        }
    }
    p.flush().await;
    let total_results: usize = publishes.values().sum();
    results
        .wait_for("every result", Duration::from_secs(180), |m| {
            m.len() >= total_results
        })
        .await;
    dead.wait_for("every poison", Duration::from_secs(60), |m| {
        m.len() >= poisons
    })
    .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    replies.barrier(&conn).await;
    dead.barrier(&conn).await;

    // A lost session and a refused publish are both warnings: none at all.
    worker.assert_no_events_at_or_above(Level::Warn);
    assert_eq!(dead.messages().len(), poisons);
    let result_msgs = results.messages();
    assert_eq!(result_msgs.len(), total_results, "one result per publish");
    let outcomes = distinct_results(&result_msgs);
    assert_eq!(outcomes.len(), publishes.len());
    let mut per_message: std::collections::HashMap<String, usize> = Default::default();
    for m in &result_msgs {
        let (message_id, _) = parse_result(m);
        *per_message.entry(message_id.unwrap()).or_default() += 1;
    }
    assert_eq!(
        per_message, publishes,
        "results per message_id = its publishes"
    );
    let reply_msgs = replies.messages();
    let rejected = reply_msgs
        .iter()
        .filter(|m| m.kind() == Some("rejected"))
        .count();
    assert_eq!(rejected, poisons);
    // Accepted replies: a repeat (r-<i>, of m-<i-40>) carries its first's ID.
    let mut accepted = 0;
    for m in reply_msgs.iter().filter(|m| m.kind() == Some("accepted")) {
        accepted += 1;
        let corr = m.correlation_id().unwrap();
        let message_id = match corr.strip_prefix("r-") {
            Some(i) => format!("m-{}", i.parse::<usize>().unwrap() - 40),
            None => corr.replace("c-", "m-"),
        };
        let id = m.json()["request_id"].as_u64().unwrap();
        assert_eq!(id, outcomes[&message_id].request_id, "{corr}");
    }
    assert_eq!(accepted, total_results);
    assert_queue_drained(&conn, &names.request).await;
    setup.check_conservation(outcomes.values());
    drop((replies, results, dead));
    names.delete(&conn).await;
    note(format!("mixed stream took {:?}", started.elapsed()));
}

/// With `prefetch = 1` the pipeline holds one delivery at a time: nothing may wait for a
/// batch to fill or for a second delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_one_still_serves_every_request() {
    const N: usize = 300;
    let conn = require_broker().await;
    let mut config = WorkerConfig::new(QueueType::Classic, stream_pools());
    config.amqp_extra.push("prefetch = 1".into());
    let setup = Setup::new("prefetch1", config);
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let results = Collector::start(&names.result).await;
    let mut p = Producer::new(&conn).await;
    publish_stream(&mut p, &names.request, None, 0..N).await;
    results
        .wait_for("every result", Duration::from_secs(120), |m| m.len() >= N)
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    let msgs = results.messages();
    assert_eq!(msgs.len(), N);
    let outcomes = distinct_results(&msgs);
    check_stream_outcomes(&outcomes, N);
    assert_queue_drained(&conn, &names.request).await;
    setup.check_conservation(outcomes.values());
    drop(results);
    names.delete(&conn).await;
}

/// `reply_to` naming no queue loses only the reply: the result still reaches the result
/// queue, the request is acked, the session survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_naming_no_queue_loses_only_the_reply() {
    const N: usize = 200;
    let conn = require_broker().await;
    let setup = Setup::new(
        "noreply",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let results = Collector::start(&names.result).await;
    let mut p = Producer::new(&conn).await;
    let nowhere = names.extra("no-such-queue");
    publish_stream(&mut p, &names.request, Some(&nowhere), 0..N).await;
    results
        .wait_for("every result", Duration::from_secs(60), |m| m.len() >= N)
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    let msgs = results.messages();
    assert_eq!(msgs.len(), N);
    check_stream_outcomes(&distinct_results(&msgs), N);
    // A lost session is a warning: none at all.
    worker.assert_no_events_at_or_above(Level::Warn);
    assert_queue_drained(&conn, &names.request).await;
    drop(results);
    names.delete(&conn).await;
}

/// A `message_id` that is not UTF-8 is something a producer can send (AMQP short strings are
/// bytes, RabbitMQ passes them on), and the contract wants every request that can never be
/// drawn dead-lettered while the worker keeps serving the others.
///
/// Unpatched, lapin (amq-protocol-types) cannot parse a non-UTF-8 short string: the whole
/// connection failed on that delivery, and the worker reconnected and got the same message
/// again, for ever on a classic queue. vendor/amq-protocol-types decodes it lossily; ingest
/// rejects a `message_id` holding U+FFFD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_message_id_is_dead_lettered_and_the_worker_keeps_serving() {
    let conn = require_broker().await;
    let setup = Setup::new(
        "non-utf8",
        WorkerConfig::new(
            QueueType::Classic,
            vec![PoolSpec::new("default", &[("gold", 10), ("silver", 100)])],
        ),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let results = Collector::start(&names.result).await;
    let request = names.request.clone();
    tokio::task::spawn_blocking(move || raw_publish(&request, br#"{"user":"x"}"#, b"\xff\xfe"))
        .await
        .expect("raw publish");
    let mut p = Producer::new(&conn).await;
    p.publish(
        &names.request,
        br#"{"user":"after"}"#,
        request_props(Some("after"), None, None),
    )
    .await;
    p.flush().await;
    results
        .wait_for("the valid request's result", Duration::from_secs(30), |m| {
            distinct_count(m) >= 1
        })
        .await;
    // Not consumed with lapin: it could not parse the poison either.
    wait_until(
        "the poison dead-lettered",
        Duration::from_secs(30),
        async || must_queue_state(&conn, &names.dead).await.messages == 1,
    )
    .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    drop(results);
    names.delete(&conn).await;
}

/// Quorum flavour: before the patch, the delivery limit (3 here) ended the loop by
/// dead-lettering the poison, but every valid request returned with it counted toward the same
/// limit (10 of 400 valid requests were dead-lettered undrawn in one run). Now none may be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_utf8_message_id_on_a_quorum_queue_takes_no_valid_request_with_it() {
    let conn = require_broker().await;
    let mut config = WorkerConfig::new(
        QueueType::Quorum,
        vec![PoolSpec::new("default", &[("gold", 10), ("silver", 1000)])],
    );
    config.delivery_limit = Some(3);
    let setup = Setup::new("non-utf8-q", config);
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let results = Collector::start(&names.result).await;
    // Not consumed with lapin: it could not parse the poison either.
    let dead = async || must_queue_state(&conn, &names.dead).await.messages as usize;
    let mut p = Producer::new(&conn).await;
    for i in 0..400 {
        if i == 200 {
            p.flush().await;
            let request = names.request.clone();
            tokio::task::spawn_blocking(move || {
                raw_publish(&request, br#"{"user":"x"}"#, b"\xff\xfe")
            })
            .await
            .expect("raw publish");
        }
        p.publish(
            &names.request,
            br#"{"user":"around"}"#,
            request_props(Some(&format!("around-{i}")), None, None),
        )
        .await;
    }
    p.flush().await;
    wait_until(
        "the poison dead-lettered",
        Duration::from_secs(60),
        async || dead().await >= 1,
    )
    .await;
    wait_until(
        "every request drawn or dead-lettered",
        Duration::from_secs(60),
        async || results.with(distinct_count) + dead().await >= 401,
    )
    .await;
    let lost = dead().await - 1;
    assert_eq!(
        lost, 0,
        "{lost} valid requests dead-lettered with the poison"
    );
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    drop(results);
    names.delete(&conn).await;
}
