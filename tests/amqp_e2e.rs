//! End to end over quorum queues: 10,000 requests through a real worker process.

use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const N: usize = 10_000;

/// Request `i` of the stream: every 10th goes to the small pool that runs out, every 10th
/// (offset 5) names no pool (the first pool, `default`, applies), the rest name `default`.
fn request(i: usize) -> (Option<&'static str>, u64) {
    let count = 1 + (i % 3) as u64;
    match i % 10 {
        0 => (Some("tiny"), count),
        5 => (None, count),
        _ => (Some("default"), count),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_quorum_10k_requests() {
    let started = Instant::now();
    let conn = require_broker().await;
    let default_pool = PoolSpec::new(
        "default",
        &[("gold", 100), ("silver", 1000), ("bronze", 100_000)],
    );
    let tiny = PoolSpec::new("tiny", &[("gem", 30), ("pearl", 20)]);
    let setup = Setup::new(
        "e2e",
        WorkerConfig::new(QueueType::Quorum, vec![default_pool.clone(), tiny.clone()]),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let results = Collector::start(&names.result).await;

    let mut producer = Producer::new(&conn).await;
    for i in 0..N {
        let (pool, count) = request(i);
        let mut body = json!({"user": format!("u{i}"), "count": count});
        if let Some(pool) = pool {
            body["pool"] = json!(pool);
        }
        producer
            .publish(
                &names.request,
                body.to_string().as_bytes(),
                request_props(
                    Some(&format!("m-{i}")),
                    Some(&replies.queue),
                    Some(&format!("c-{i}")),
                ),
            )
            .await;
    }
    producer.flush().await;
    note(format!("published {N} in {:?}", started.elapsed()));

    results
        .wait_for("a result per request", Duration::from_secs(300), |m| {
            m.len() >= N
        })
        .await;
    replies
        .wait_for(
            "an accepted reply and a result per request",
            Duration::from_secs(120),
            |m| m.len() >= 2 * N,
        )
        .await;
    note(format!("all results in after {:?}", started.elapsed()));
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    // Anything published more than once would be in the queues by now.
    results.barrier(&conn).await;
    replies.barrier(&conn).await;

    // The result queue: exactly one result per request, consistent and unique IDs.
    let result_msgs = results.messages();
    assert_eq!(result_msgs.len(), N, "exactly one result per request");
    for m in &result_msgs {
        assert_eq!(m.props.delivery_mode(), &Some(2), "results are persistent");
    }
    let outcomes = distinct_results(&result_msgs);
    assert_eq!(outcomes.len(), N);

    let pool_items = |pool: &str| -> Vec<String> {
        [&default_pool, &tiny]
            .into_iter()
            .find(|p| p.id == pool)
            .unwrap()
            .items
            .iter()
            .map(|(i, _)| i.clone())
            .collect()
    };
    let (mut tiny_items, mut tiny_empty, mut won) = (0usize, 0usize, 0usize);
    for i in 0..N {
        let o = &outcomes[&format!("m-{i}")];
        let (pool, count) = request(i);
        let pool = pool.unwrap_or("default");
        assert_eq!(o.pool, pool, "request {i}");
        assert_eq!(o.user, format!("u{i}"), "request {i}");
        assert_eq!(o.count, count, "request {i}");
        let allowed = pool_items(pool);
        assert!(
            o.items.iter().all(|it| allowed.contains(it)),
            "request {i}: items {:?} not in pool {pool}",
            o.items
        );
        if pool == "default" {
            // 101,100 units: the big pool never runs short here.
            assert_eq!(o.items.len() as u64, count, "request {i}: {o:?}");
        } else {
            tiny_items += o.items.len();
            if o.status == "empty" {
                tiny_empty += 1;
            }
        }
        if o.status == "won" {
            won += 1;
        }
    }
    assert_eq!(
        tiny_items as u64,
        tiny.total(),
        "the small pool is drawn dry"
    );
    assert!(tiny_empty > 0, "empty results once the small pool ran out");
    assert!(won > N / 2, "won must dominate, got {won} of {N}");

    // reply_to: one accepted reply then one result per request, in that order; the result
    // copy equals the result queue's and echoes the correlation_id.
    let reply_msgs = replies.messages();
    assert_eq!(
        reply_msgs.len(),
        2 * N,
        "one accepted reply and one result each"
    );
    let accepted = accepted_ids(&reply_msgs);
    let mut seen: HashMap<String, (Option<usize>, Option<usize>)> = HashMap::new();
    for (pos, m) in reply_msgs.iter().enumerate() {
        let corr = m
            .correlation_id()
            .unwrap_or_else(|| panic!("reply without correlation_id: {m:?}"))
            .to_string();
        let entry = seen.entry(corr.clone()).or_default();
        match m.kind() {
            Some("accepted") => {
                assert!(entry.0.is_none(), "{corr}: two accepted replies");
                entry.0 = Some(pos);
            }
            Some("result") => {
                assert!(entry.1.is_none(), "{corr}: two results on reply_to");
                entry.1 = Some(pos);
                let (message_id, outcome) = parse_result(m);
                let message_id = message_id.expect("message_id in the body");
                assert_eq!(
                    corr,
                    message_id.replace("m-", "c-"),
                    "correlation_id echoed"
                );
                assert_eq!(
                    outcomes[&message_id], outcome,
                    "reply copy = result queue's"
                );
            }
            other => panic!("unexpected reply type {other:?}: {m:?}"),
        }
    }
    let mut previous_id = 0u64;
    for i in 0..N {
        let corr = format!("c-{i}");
        let (a, r) = seen[&corr];
        let (a, r) = (a.expect("accepted reply"), r.expect("result on reply_to"));
        assert!(a < r, "{corr}: the accepted reply must precede the result");
        let ids = &accepted[&corr];
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0], outcomes[&format!("m-{i}")].request_id);
        // One producer, one queue, no redelivery: acceptance order is publish order.
        assert!(
            ids[0] > previous_id,
            "IDs strictly increase in acceptance order ({corr}: {} after {previous_id})",
            ids[0]
        );
        previous_id = ids[0];
    }

    // Everything acked, nothing dead-lettered, the pools conserved.
    assert_queue_drained(&conn, &names.request).await;
    assert_eq!(must_queue_state(&conn, &names.dead).await.messages, 0);
    let inspect = setup.check_conservation(outcomes.values());
    let last = inspect["last_request_id"]
        .as_u64()
        .expect("last_request_id");
    assert!(
        last >= previous_id,
        "last_request_id {last} < {previous_id}"
    );
    worker.assert_no_events_at_or_above(Level::Error);

    drop(results);
    drop(replies);
    names.delete(&conn).await;
    note(format!("end to end took {:?}", started.elapsed()));
}
