//! Repeats (classic queues): a `message_id` that was already drawn is never drawn again; the
//! repeat gets the first request's ID and outcome with its own `correlation_id`, also when it
//! is in flight at the same time as the first, and after a restart.

use common::*;
use std::time::{Duration, Instant};

fn find<'a>(msgs: &'a [Msg], kind: &str, corr: &str) -> Vec<&'a Msg> {
    msgs.iter()
        .filter(|m| m.kind() == Some(kind) && m.correlation_id() == Some(corr))
        .collect()
}

async fn wait_result(replies: &Collector, corr: &str) {
    replies
        .wait_for(
            &format!("the result for {corr}"),
            Duration::from_secs(60),
            |m| !find(m, "result", corr).is_empty(),
        )
        .await;
}

/// The one accepted ID and the one result (reply copy) of `corr`.
fn reply_of(msgs: &[Msg], corr: &str) -> (u64, Outcome, Option<String>) {
    let accepted = find(msgs, "accepted", corr);
    assert_eq!(accepted.len(), 1, "{corr}: one accepted reply");
    let id = accepted[0].json()["request_id"].as_u64().unwrap();
    let results = find(msgs, "result", corr);
    assert_eq!(results.len(), 1, "{corr}: one result");
    let (message_id, outcome) = parse_result(results[0]);
    assert_eq!(outcome.request_id, id, "{corr}: accepted and result IDs");
    (id, outcome, message_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_message_id_gets_the_first_id_and_outcome_and_is_not_drawn_again() {
    let started = Instant::now();
    let conn = require_broker().await;
    let setup = Setup::new(
        "repeats",
        WorkerConfig::new(
            QueueType::Classic,
            vec![PoolSpec::new("default", &[("gold", 5), ("silver", 5)])],
        ),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let results = Collector::start(&names.result).await;
    let mut p = Producer::new(&conn).await;
    let reply = replies.queue.clone();
    let props = |m: Option<&str>, c: &str| request_props(m, Some(&reply), Some(c));

    // The first request, drawn and finished...
    p.publish(
        &names.request,
        br#"{"user":"alice","count":2}"#,
        props(Some("m-a"), "a1"),
    )
    .await;
    p.flush().await;
    wait_result(&replies, "a1").await;
    // ... republished: another body (never looked at), even an invalid one.
    p.publish(
        &names.request,
        br#"{"user":"bob","count":1}"#,
        props(Some("m-a"), "a2"),
    )
    .await;
    p.publish(&names.request, b"not json", props(Some("m-a"), "a3"))
        .await;
    // Back to back: the repeat is in flight with its first.
    p.publish(
        &names.request,
        br#"{"user":"carol","count":3}"#,
        props(Some("m-b"), "b1"),
    )
    .await;
    p.publish(
        &names.request,
        br#"{"user":"carol","count":3}"#,
        props(Some("m-b"), "b2"),
    )
    .await;
    p.publish(
        &names.request,
        br#"{"user":"dave","count":1}"#,
        props(Some("m-b"), "b3"),
    )
    .await;
    // Without message_id there is no repeat: two requests, two IDs.
    p.publish(&names.request, br#"{"user":"nobody"}"#, props(None, "n1"))
        .await;
    p.publish(&names.request, br#"{"user":"nobody"}"#, props(None, "n2"))
        .await;
    p.flush().await;
    for corr in ["a2", "a3", "b1", "b2", "b3", "n1", "n2"] {
        wait_result(&replies, corr).await;
    }
    replies.barrier(&conn).await;
    let msgs = replies.messages();

    let (a_id, a, a_mid) = reply_of(&msgs, "a1");
    assert_eq!(a_mid.as_deref(), Some("m-a"));
    assert_eq!((a.user.as_str(), a.count), ("alice", 2));
    for corr in ["a2", "a3"] {
        let (id, o, mid) = reply_of(&msgs, corr);
        assert_eq!(id, a_id, "{corr}: the first request's ID");
        assert_eq!(o, a, "{corr}: the first request's outcome");
        assert_eq!(mid.as_deref(), Some("m-a"));
    }
    let (b_id, b, _) = reply_of(&msgs, "b1");
    assert_ne!(b_id, a_id);
    assert_eq!((b.user.as_str(), b.count), ("carol", 3));
    for corr in ["b2", "b3"] {
        let (id, o, _) = reply_of(&msgs, corr);
        assert_eq!(id, b_id, "{corr}: back-to-back duplicate gets the same ID");
        assert_eq!(o, b, "{corr}: and the same outcome");
    }
    let (n1_id, n1, _) = reply_of(&msgs, "n1");
    let (n2_id, n2, _) = reply_of(&msgs, "n2");
    assert_ne!(n1_id, n2_id, "no message_id: two requests");
    assert!(
        find(&msgs, "rejected", "a3").is_empty(),
        "a repeat's body is not looked at"
    );

    // The result queue got every publish, repeats included, all consistent.
    results
        .wait_for("8 results", Duration::from_secs(30), |m| {
            m.iter().filter(|m| m.kind() == Some("result")).count() >= 8
        })
        .await;
    results.barrier(&conn).await;
    let rq = results.messages();
    assert_eq!(rq.len(), 8);
    let with_id: Vec<Msg> = rq
        .iter()
        .filter(|m| m.json()["message_id"].is_string())
        .cloned()
        .collect();
    let outcomes = distinct_results(&with_id);
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes["m-a"], a);
    assert_eq!(outcomes["m-b"], b);
    for corr in ["a1", "a2", "a3", "b1", "b2", "b3", "n1", "n2"] {
        assert_eq!(
            find(&rq, "result", corr).len(),
            1,
            "{corr} on the result queue"
        );
    }

    // Drawn once each: the pool lost exactly the four requests' items.
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    setup.check_conservation([&a, &b, &n1, &n2]);

    // After a restart the repeat is still known (the window is durable).
    let mut worker = setup.start_ready(&conn, &[]).await;
    p.publish(
        &names.request,
        br#"{"user":"eve"}"#,
        props(Some("m-a"), "a4"),
    )
    .await;
    p.flush().await;
    wait_result(&replies, "a4").await;
    let (id, o, _) = reply_of(&replies.messages(), "a4");
    assert_eq!((id, &o), (a_id, &a), "a repeat after a restart");
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    setup.check_conservation([&a, &b, &n1, &n2]);
    assert_queue_drained(&conn, &names.request).await;

    drop((results, replies));
    names.delete(&conn).await;
    note(format!("repeats test took {:?}", started.elapsed()));
}
