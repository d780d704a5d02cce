//! Graceful shutdown mid-stream (classic queues): SIGTERM while requests flow exits 0 after
//! finishing every accepted request; unaccepted deliveries go back to the queue; a restart
//! carries on, and every request ends with exactly one result.

use common::*;
use std::time::{Duration, Instant};

const M: usize = 8000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_finishes_accepted_requests_and_a_restart_carries_on() {
    let started = Instant::now();
    let conn = require_broker().await;
    let setup = Setup::new(
        "shutdown",
        WorkerConfig::new(QueueType::Classic, stream_pools()),
    );
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let results = Collector::start(&names.result).await;

    // Requests keep flowing in chunks while the signal arrives.
    let producer = {
        let request = names.request.clone();
        let reply = replies.queue.clone();
        tokio::spawn(async move {
            let conn = require_broker().await;
            let mut p = Producer::new(&conn).await;
            for chunk in (0..M).step_by(250) {
                publish_stream(&mut p, &request, Some(&reply), chunk..(chunk + 250).min(M)).await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    results
        .wait_for("2000 results", Duration::from_secs(120), |m| {
            distinct_count(m) >= 2000
        })
        .await;
    let t = Instant::now();
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    // A missed deadline, unreturned deliveries or a lost session are warnings or errors: a
    // clean shutdown logs none.
    worker.assert_no_events_at_or_above(Level::Warn);
    note(format!(
        "SIGTERM at ~2000 results: exit 0 after {:?}, producer still running: {}",
        t.elapsed(),
        !producer.is_finished()
    ));
    tokio::time::timeout(Duration::from_secs(120), producer)
        .await
        .expect("producer finished")
        .expect("producer task");
    replies.barrier(&conn).await;
    results.barrier(&conn).await;

    // Every request accepted before the signal was finished: its result is out.
    let outcomes = distinct_results(&results.messages());
    let accepted = accepted_ids(&replies.messages());
    assert!(!accepted.is_empty());
    for (corr, ids) in &accepted {
        let message_id = corr.replace("c-", "m-");
        let o = outcomes
            .get(&message_id)
            .unwrap_or_else(|| panic!("{message_id} accepted (ID {ids:?}) but no result"));
        assert_eq!(ids, &vec![o.request_id], "{message_id}");
    }
    assert_eq!(accepted.len(), outcomes.len());
    // ... and everything else is back in the queue: nothing lost, nothing left unacked.
    let expected = (M - outcomes.len()) as u32;
    wait_until(
        "the unfinished requests back in the request queue",
        Duration::from_secs(30),
        async || must_queue_state(&conn, &names.request).await.messages == expected,
    )
    .await;
    note(format!("first run finished {} requests", outcomes.len()));

    // Restart: it carries on.
    let mut worker = setup.start_ready(&conn, &[]).await;
    results
        .wait_for("every request's result", Duration::from_secs(300), |m| {
            distinct_count(m) >= M
        })
        .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    replies.barrier(&conn).await;

    // A clean shutdown publishes nothing twice: exactly one result and one accepted reply
    // per request, the same ID in both.
    let result_msgs = results.messages();
    assert_eq!(result_msgs.len(), M, "exactly one result per request");
    let outcomes = distinct_results(&result_msgs);
    check_stream_outcomes(&outcomes, M);
    let reply_msgs = replies.messages();
    let accepted = accepted_ids(&reply_msgs);
    assert_eq!(accepted.len(), M);
    for (message_id, o) in &outcomes {
        assert_eq!(
            accepted[&message_id.replace("m-", "c-")],
            vec![o.request_id]
        );
    }
    assert_eq!(
        reply_msgs.len(),
        2 * M,
        "one accepted reply and one result each"
    );
    assert_queue_drained(&conn, &names.request).await;
    setup.check_conservation(outcomes.values());
    drop((results, replies));
    names.delete(&conn).await;
    note(format!("shutdown test took {:?}", started.elapsed()));
}
