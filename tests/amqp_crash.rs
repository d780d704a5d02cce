//! Crashes mid-stream (quorum queues): the worker is SIGKILLed nine times at different points
//! (from outside after results were seen, while connecting, and by failpoints right after a
//! WAL write and right after its fsync), restarted each time, then allowed to finish. Nothing
//! may be lost, drawn twice or given two IDs.

use common::*;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

/// Requests published at the start. The plan must not run out of them before its last step:
/// the `AfterMoreResults` kills land some time after the results were seen, while the worker
/// keeps going, and a failpoint that counts WAL writes (`wal.after_write:20`) needs that many
/// group commits still to come. How many requests a group commit holds depends on the worker's
/// speed (a faster worker finished a fixed stream before the last failpoint, twice), so before
/// each failpoint step the stream is topped up to at least `BACKLOG_MIN` unanswered requests.
const M: usize = 24_000;
/// Unanswered requests left before each failpoint step (at most 600 per WAL write of its count).
const BACKLOG_MIN: usize = 12_000;

#[derive(Debug, Clone, Copy)]
enum Kill {
    /// Armed with `REWARDPOOL_FAILPOINT`: the worker SIGKILLs itself there.
    Failpoint(&'static str),
    /// SIGKILL once recovery is done, while the worker connects.
    DuringStartup,
    /// SIGKILL after this many more distinct results.
    AfterMoreResults(usize),
}

/// The draws every read of the WAL showed, request ID → message_id. Reads overlap (recovery keeps
/// the segments behind the older of two snapshots); one ID must always show one message_id.
fn collect_wal(setup: &Setup, draws: &mut BTreeMap<u64, String>) {
    for (id, message_id) in setup.wal_draws() {
        if let Some(prev) = draws.insert(id, message_id.clone()) {
            assert_eq!(
                prev, message_id,
                "WAL: request ID {id} drawn for two messages"
            );
        }
    }
}

async fn wait_consumer_gone(conn: &lapin::Connection, queue: &str) {
    wait_until(
        "the killed worker's consumer to go",
        Duration::from_secs(30),
        async || matches!(queue_state(conn, queue).await, Some(q) if q.consumers == 0),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_and_draws_nothing_twice() {
    let started = Instant::now();
    let conn = require_broker().await;
    let mut config = WorkerConfig::new(QueueType::Quorum, stream_pools());
    // RabbitMQ 3.10 counts every return of a delivery to a quorum queue (each SIGKILL returns
    // up to `prefetch` unacked deliveries) toward x-delivery-limit; with the default of 20 a
    // request caught in every one of the nine crashes would come close. Raised far above the
    // number of crashes so that no request is dead-lettered for being unlucky.
    config.delivery_limit = Some(1000);
    // No snapshot mid-run: a run's draws stay in the WAL until the next start prunes behind
    // its recovery snapshot, so a `wal dump` after each crash sees every draw of that run.
    config
        .storage_extra
        .push("snapshot_every_records = 10000000".into());
    // Every run's WAL kept after the snapshots, so `audit` at the end re-derives every draw.
    config
        .storage_extra
        .push("wal_retain_bytes = 1000000000".into());
    let setup = Setup::new("crash", config);
    let names = setup.names.clone();
    let mut draws: BTreeMap<u64, String> = BTreeMap::new();

    let mut worker = setup.start_ready(&conn, &[]).await;
    let replies = Collector::reply_queue(&names.extra("reply")).await;
    let results = Collector::start(&names.result).await;
    let mut producer = Producer::new(&conn).await;
    publish_stream(&mut producer, &names.request, Some(&replies.queue), 0..M).await;
    let mut published = M;
    note("published");

    // The first worker dies after 1500 results; then a restart per step of the plan.
    results
        .wait_for("1500 results", Duration::from_secs(120), |m| {
            distinct_count(m) >= 1500
        })
        .await;
    let status = worker.kill().await;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    note(format!(
        "killed at {} results",
        results.with(distinct_count)
    ));
    wait_consumer_gone(&conn, &names.request).await;
    collect_wal(&setup, &mut draws);

    // Progress-based kill points are drawn at random; the seed is printed to reproduce a run.
    let mut rng = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64)
        | 1;
    note(format!("kill plan seed {rng}"));
    let mut random_progress = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        300 + (rng % 1200) as usize
    };
    let plan = [
        // Right after a group's fsync: draws durable, their results not yet published.
        Kill::Failpoint("wal.after_sync:15"),
        // After a write, before its fsync: those draws may be lost (new IDs later).
        Kill::Failpoint("wal.after_write:15"),
        // While connecting and declaring, redeliveries not yet handled.
        Kill::DuringStartup,
        Kill::AfterMoreResults(random_progress()),
        Kill::Failpoint("wal.after_sync:1"),
        Kill::AfterMoreResults(random_progress()),
        Kill::Failpoint("wal.after_write:20"),
        Kill::AfterMoreResults(random_progress()),
    ];
    for step in plan {
        let before = results.with(distinct_count);
        if matches!(step, Kill::Failpoint(_)) && published - before < BACKLOG_MIN {
            let more = published..before + BACKLOG_MIN;
            publish_stream(&mut producer, &names.request, Some(&replies.queue), more).await;
            note(format!(
                "topped up: {published} -> {} requests",
                before + BACKLOG_MIN
            ));
            published = before + BACKLOG_MIN;
        }
        match step {
            Kill::Failpoint(fp) => {
                let mut w = setup.start_worker(&[("REWARDPOOL_FAILPOINT", fp)]);
                let status = w.wait_exit(Duration::from_secs(120)).await;
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGKILL),
                    "the failpoint {fp} should have killed the worker; log:\n{}",
                    w.log()
                );
                let name = fp.split(':').next().unwrap();
                assert!(
                    w.log().contains(&format!("failpoint {name}: SIGKILL")),
                    "killed by something else than {fp}:\n{}",
                    w.log()
                );
            }
            Kill::DuringStartup => {
                let mut w = setup.start_worker(&[]);
                wait_until(
                    "the worker to recover",
                    Duration::from_secs(60),
                    async || w.log().contains("connecting to the broker"),
                )
                .await;
                let status = w.kill().await;
                assert_eq!(status.signal(), Some(libc::SIGKILL));
            }
            Kill::AfterMoreResults(more) => {
                let mut w = setup.start_worker(&[]);
                w.wait_ready(&conn, &names.request, Duration::from_secs(60))
                    .await;
                let target = (before + more).min(published);
                results
                    .wait_for("more results", Duration::from_secs(120), |m| {
                        distinct_count(m) >= target
                    })
                    .await;
                let status = w.kill().await;
                assert_eq!(status.signal(), Some(libc::SIGKILL));
            }
        }
        wait_consumer_gone(&conn, &names.request).await;
        collect_wal(&setup, &mut draws);
        note(format!(
            "{step:?}: results {before} -> {}",
            results.with(distinct_count)
        ));
    }

    // Then let it finish.
    let mut worker = setup.start_ready(&conn, &[]).await;
    results
        .wait_for("every request's result", Duration::from_secs(300), |m| {
            distinct_count(m) >= published
        })
        .await;
    // Every draw of this run is durable (results go out after the fsync): dump it while the
    // worker runs, before the final snapshot prunes the WAL.
    collect_wal(&setup, &mut draws);
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;
    replies.barrier(&conn).await;
    note(format!("finished after {:?}", started.elapsed()));

    // Results: one outcome per message_id however often published, no ID shared.
    let result_msgs = results.messages();
    let outcomes = distinct_results(&result_msgs);
    check_stream_outcomes(&outcomes, published);
    note(format!(
        "{} result messages for {published} requests",
        result_msgs.len()
    ));

    // The WAL: every request drawn exactly once, with the ID its results carry.
    let mut drawn: HashMap<&str, Vec<u64>> = HashMap::new();
    for (id, message_id) in &draws {
        drawn.entry(message_id.as_str()).or_default().push(*id);
    }
    for (message_id, ids) in &drawn {
        assert_eq!(
            ids.len(),
            1,
            "{message_id} drawn more than once: IDs {ids:?}"
        );
    }
    assert_eq!(drawn.len(), published, "every request drawn");
    for (message_id, o) in &outcomes {
        assert_eq!(
            drawn[message_id.as_str()],
            vec![o.request_id],
            "{message_id}: the result's ID is the drawn one"
        );
    }

    // reply_to: accepted IDs never shared (checked by accepted_ids); every result copy agrees
    // with the result queue; each request's result carries one of the IDs it was accepted
    // with (a request accepted before a crash whose draw was lost gets a new one later).
    let reply_msgs = replies.messages();
    let accepted = accepted_ids(&reply_msgs);
    for m in reply_msgs.iter().filter(|m| m.kind() == Some("result")) {
        let (message_id, o) = parse_result(m);
        let message_id = message_id.unwrap();
        assert_eq!(outcomes[&message_id], o, "{message_id}: reply copy differs");
        assert_eq!(
            m.correlation_id(),
            Some(message_id.replace("m-", "c-").as_str())
        );
    }
    for (message_id, o) in &outcomes {
        let corr = message_id.replace("m-", "c-");
        let ids = accepted
            .get(&corr)
            .unwrap_or_else(|| panic!("{message_id}: no accepted reply"));
        assert!(
            ids.contains(&o.request_id),
            "{message_id}: result ID {} was never in an accepted reply ({ids:?})",
            o.request_id
        );
    }

    assert_queue_drained(&conn, &names.request).await;
    assert_eq!(
        must_queue_state(&conn, &names.dead).await.messages,
        0,
        "nothing dead-lettered"
    );
    let inspect = setup.check_conservation(outcomes.values());
    let max_id = accepted.values().flatten().max().copied().unwrap_or(0);
    assert!(inspect["last_request_id"].as_u64().unwrap() >= max_id);
    // `rewardpool audit` re-derives every retained draw of the SIGKILLed runs.
    let audit = std::process::Command::new(env!("CARGO_BIN_EXE_rewardpool"))
        .args(["audit", "--config"])
        .arg(&setup.config_path)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run rewardpool audit");
    let summary: serde_json::Value = serde_json::from_slice(&audit.stdout).expect("audit JSON");
    assert!(
        audit.status.success(),
        "audit: {summary} {}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert_eq!(summary["mismatches"], 0);
    assert_eq!(
        summary["verified_draws"].as_u64().unwrap(),
        draws.len() as u64,
        "{summary}"
    );
    assert_eq!(summary["first_request_id"], 1, "{summary}");

    drop((results, replies));
    names.delete(&conn).await;
    note(format!("crash test took {:?}", started.elapsed()));
}
