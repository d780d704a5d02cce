//! Hostile producers through the real broker (classic queues): requests that would make the
//! worker act on its own messages, or that other parsers would read differently, are
//! dead-lettered; no reply ever goes to the worker's own queues; the worker keeps running and
//! draws only the valid request. The full attack list is in src/message.rs's unit tests.

use common::*;
use lapin::BasicProperties;
use lapin::types::ShortString;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_queues_own_types_and_ambiguous_bodies_are_rejected() {
    let conn = require_broker().await;
    let setup = Setup::new(
        "hostile",
        WorkerConfig::new(
            QueueType::Classic,
            vec![PoolSpec::new("default", &[("gold", 10)])],
        ),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let results = Collector::start(&names.result).await;
    let dead = Collector::start(&names.dead).await;
    let mut p = Producer::new(&conn).await;
    let reply = replies.queue.clone();
    let props = |k: &str, reply_to: &str| request_props(Some(k), Some(reply_to), Some(k));

    // (name, body, properties, a rejected reply expected on our reply queue with this text)
    let attacks: Vec<(&str, &[u8], BasicProperties, Option<&str>)> = vec![
        // The worker's accepted reply would land in its own request queue and be drawn.
        (
            "reply-to-request-queue",
            b"{}",
            props("h-1", &names.request),
            None,
        ),
        // Replies in the result stream; a copy of every result twice.
        (
            "reply-to-result-queue",
            b"{}",
            props("h-2", &names.result),
            None,
        ),
        (
            "reply-to-dead-letters",
            b"{}",
            props("h-3", &names.dead),
            None,
        ),
        (
            "own-result-type",
            br#"{"status":"won","request_id":1,"pool":"default","count":1}"#,
            props("h-4", &reply).with_type(ShortString::from("result")),
            Some("own messages"),
        ),
        (
            "duplicate-keys",
            br#"{"count":1,"count":100}"#,
            props("h-5", &reply),
            Some("duplicate key"),
        ),
        (
            "gzip-claim",
            br#"{"count":1}"#,
            props("h-6", &reply).with_content_encoding(ShortString::from("gzip")),
            Some("content_encoding"),
        ),
        (
            "bom",
            b"\xEF\xBB\xBF{}",
            props("h-7", &reply),
            Some("not valid JSON"),
        ),
        (
            "nul-user",
            br#"{"user":"a\u0000b"}"#,
            props("h-8", &reply),
            Some("control character"),
        ),
        ("empty-message-id", b"{}", props("", &reply), Some("empty")),
    ];
    for (_, body, props, _) in &attacks {
        p.publish(&names.request, body, props.clone()).await;
    }
    p.publish(&names.request, br#"{"user":"ok"}"#, props("h-ok", &reply))
        .await;
    p.flush().await;

    dead.wait_for("every attack dead-lettered", Duration::from_secs(60), |m| {
        m.len() >= attacks.len()
    })
    .await;
    results
        .wait_for("the valid request's result", Duration::from_secs(60), |m| {
            !m.is_empty()
        })
        .await;
    let n_rejected = attacks.iter().filter(|a| a.3.is_some()).count();
    replies
        .wait_for(
            "rejected replies + accepted + result",
            Duration::from_secs(60),
            |m| m.len() >= n_rejected + 2,
        )
        .await;
    worker.assert_running();
    results.barrier(&conn).await;
    replies.barrier(&conn).await;
    dead.barrier(&conn).await;

    // Only the valid request was drawn, once; nothing came back into the request queue.
    let result_msgs = results.messages();
    assert_eq!(result_msgs.len(), 1, "{result_msgs:?}");
    assert_eq!(result_msgs[0].kind(), Some("result"));
    assert_eq!(result_msgs[0].json()["message_id"], "h-ok");
    assert_eq!(dead.messages().len(), attacks.len());
    assert_queue_drained(&conn, &names.request).await;
    for (name, _, sent, says) in &attacks {
        let corr = sent.correlation_id().as_ref().unwrap().as_str();
        let mine: Vec<Msg> = replies
            .messages()
            .into_iter()
            .filter(|m| m.correlation_id() == Some(corr))
            .collect();
        match says {
            None => assert!(mine.is_empty(), "{name}: {mine:?}"),
            Some(text) => {
                assert_eq!(mine.len(), 1, "{name}: {mine:?}");
                assert_eq!(mine[0].kind(), Some("rejected"), "{name}");
                let error = mine[0].json()["error"].as_str().unwrap().to_string();
                assert!(error.contains(text), "{name}: {error}");
            }
        }
    }
    let state = setup.inspect();
    assert_eq!(state["pools"][0]["items"][0]["quantity"], 9, "{state}");
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    drop((results, replies, dead));
    names.delete(&conn).await;
}
