//! Several workers behind one routing exchange (`amqp.exchange`), each with its own pools, data
//! directory and queues: producers publish to the exchange with routing key = pool id and the
//! broker delivers each request to the pool's one owner; a pool nobody owns waits in
//! `<exchange>.unrouted`; a pool has one owner at a time (per-pool broker lock); a killed shard's
//! requests wait in its queue and are served after its restart.
//!
//! Every test uses a fresh exchange name, so pool lock names (`<exchange>.pool.<id>.lock`) and
//! bindings never meet another test's.

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::{BasicProperties, Channel, Connection};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// A fresh routing exchange name for one test.
fn exchange_name(test: &str) -> String {
    format!("{}.ex", Names::new(test).base)
}

/// One shard: its own names, data directory and pools, behind `exchange`.
fn shard(test: &str, exchange: &str, pools: Vec<PoolSpec>) -> Setup {
    let mut config = WorkerConfig::new(QueueType::Quorum, pools);
    config.amqp_extra.push(format!("exchange = {exchange:?}"));
    Setup::new(test, config)
}

/// Publishes to the routing exchange with confirms (one at a time: small test streams).
struct ExchangeProducer {
    ch: Channel,
    exchange: String,
}

impl ExchangeProducer {
    async fn new(conn: &Connection, exchange: &str) -> ExchangeProducer {
        let ch = op("channel.open", conn.create_channel()).await;
        op(
            "confirm.select",
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        ExchangeProducer {
            ch,
            exchange: exchange.to_string(),
        }
    }

    async fn publish(&self, routing_key: &str, body: &str, props: BasicProperties) {
        let confirm = op(
            "basic.publish",
            self.ch.basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            ),
        )
        .await;
        let confirm = op("publisher confirm", confirm).await;
        assert!(
            confirm.is_ack(),
            "the broker nacked a publish to the exchange"
        );
    }

    /// Request `i` of a stream over `pools`: pool `pools[i % len]`, message_id `m-<i>`; every
    /// fifth body names no pool (the routing key's pool is drawn from).
    async fn publish_request(&self, pools: &[&str], i: usize) {
        let pool = pools[i % pools.len()];
        let body = if i.is_multiple_of(5) {
            format!(r#"{{"user":"u{i}"}}"#)
        } else {
            format!(r#"{{"pool":"{pool}","user":"u{i}"}}"#)
        };
        self.publish(
            pool,
            &body,
            request_props(Some(&format!("m-{i}")), None, Some(&format!("c-{i}"))),
        )
        .await;
    }
}

/// The pool each request `m-<i>` of a stream over `pools` was sent to.
fn expected_pool(pools: &[&str], message_id: &str) -> String {
    let i: usize = message_id[2..].parse().expect("m-<i>");
    pools[i % pools.len()].to_string()
}

/// Every result on a shard's result queue, by `message_id`: the request IDs seen (a result may
/// be published again after a crash; it then carries the same ID).
fn results_by_message(msgs: &[Msg]) -> BTreeMap<String, Vec<(u64, Outcome)>> {
    let mut by: BTreeMap<String, Vec<(u64, Outcome)>> = BTreeMap::new();
    for m in msgs.iter().filter(|m| m.kind() == Some("result")) {
        let (mid, outcome) = parse_result(m);
        let mid = mid.expect("every stream request has a message_id");
        by.entry(mid)
            .or_default()
            .push((outcome.request_id, outcome));
    }
    by
}

/// Checks one shard's results: exactly the requests for its pools, each with one request ID,
/// drawn from the pool it was routed to, IDs never shared; returns one outcome per request.
fn check_shard(
    name: &str,
    results: &BTreeMap<String, Vec<(u64, Outcome)>>,
    all_pools: &[&str],
    own_pools: &[&str],
    n: usize,
    exactly_once: bool,
) -> Vec<Outcome> {
    let mut want: Vec<String> = (0..n)
        .map(|i| format!("m-{i}"))
        .filter(|m| own_pools.contains(&expected_pool(all_pools, m).as_str()))
        .collect();
    want.sort();
    let got: Vec<&String> = results.keys().collect();
    assert_eq!(
        got,
        want.iter().collect::<Vec<_>>(),
        "{name}: results for exactly its own pools' requests"
    );
    let mut ids = HashMap::new();
    let mut outcomes = Vec::new();
    for (mid, rs) in results {
        if exactly_once {
            assert_eq!(rs.len(), 1, "{name}: {mid} answered {} times", rs.len());
        }
        let first = rs[0].0;
        assert!(
            rs.iter().all(|(id, _)| *id == first),
            "{name}: {mid} drawn under several IDs: {rs:?}"
        );
        let outcome = rs[0].1.clone();
        assert_eq!(outcome.pool, expected_pool(all_pools, mid), "{name}: {mid}");
        assert_eq!(outcome.status, "won", "{name}: {mid}: {outcome:?}");
        if let Some(other) = ids.insert(first, mid.clone()) {
            panic!("{name}: request ID {first} given to {other} and {mid}");
        }
        outcomes.push(outcome);
    }
    outcomes
}

/// Deletes the routing objects of a test (best effort, at the end of a passing test).
async fn delete_routing(conn: &Connection, exchange: &str) {
    let ch = op("channel.open", conn.create_channel()).await;
    let _ = ch
        .queue_delete(
            format!("{exchange}.unrouted").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await;
    for ex in [exchange.to_string(), format!("{exchange}.ae")] {
        let _ = ch
            .exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pools_requests_reach_its_owner_once_and_unowned_pools_wait_unrouted() {
    let conn = require_broker().await;
    let ex = exchange_name("shards-route");
    let a = shard(
        "shards-route-a",
        &ex,
        vec![
            PoolSpec::new("a1", &[("gold", 40), ("silver", 400)]),
            PoolSpec::new("a2", &[("gem", 300)]),
        ],
    );
    let b = shard(
        "shards-route-b",
        &ex,
        vec![
            PoolSpec::new("b1", &[("car", 300)]),
            PoolSpec::new("b2", &[("cup", 20), ("pen", 500)]),
        ],
    );
    let mut wa = a.start_ready(&conn, &[]).await;
    let mut wb = b.start_ready(&conn, &[]).await;
    let results_a = Collector::start(&a.names.result).await;
    let results_b = Collector::start(&b.names.result).await;

    let all = ["a1", "a2", "b1", "b2"];
    let n = 200;
    let p = ExchangeProducer::new(&conn, &ex).await;
    for i in 0..n {
        p.publish_request(&all, i).await;
    }
    // A pool nobody owns: kept whole in <exchange>.unrouted.
    let unrouted_body = r#"{"pool":"nobody","user":"zed","count":2}"#;
    p.publish(
        "nobody",
        unrouted_body,
        request_props(Some("m-unrouted"), None, Some("c-unrouted")),
    )
    .await;
    // The body names another pool than the routing key: rejected, dead-lettered, a rejected
    // reply; nothing drawn from either pool.
    let replies_name = a.names.extra("replies");
    let replies = Collector::reply_queue(&replies_name).await;
    p.publish(
        "a1",
        r#"{"pool":"b1","user":"mallory"}"#,
        request_props(Some("m-mismatch"), Some(&replies_name), Some("c-mismatch")),
    )
    .await;

    results_a
        .wait_for("shard a's results", WAIT, |m| distinct_count(m) >= n / 2)
        .await;
    results_b
        .wait_for("shard b's results", WAIT, |m| distinct_count(m) >= n / 2)
        .await;
    replies
        .wait_for("the rejected reply", WAIT, |m| {
            m.iter().any(|m| m.kind() == Some("rejected"))
        })
        .await;
    let rejected = replies
        .messages()
        .into_iter()
        .find(|m| m.kind() == Some("rejected"))
        .unwrap();
    let error = rejected.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("\"b1\"") && error.contains("routing key \"a1\""),
        "{error}"
    );
    wait_until("the mismatch dead-lettered", WAIT, async || {
        queue_state(&conn, &a.names.dead)
            .await
            .is_some_and(|q| q.messages == 1)
    })
    .await;

    let unrouted = format!("{ex}.unrouted");
    assert_eq!(must_queue_state(&conn, &unrouted).await.messages, 1);
    let ch = op("channel.open", conn.create_channel()).await;
    let got = op(
        "basic.get",
        ch.basic_get(unrouted.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("the unrouted request is in the unrouted queue");
    assert_eq!(
        std::str::from_utf8(&got.delivery.data).unwrap(),
        unrouted_body
    );
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "m-unrouted"
    );
    assert_eq!(got.delivery.routing_key.as_str(), "nobody");

    wa.stop(libc::SIGTERM, WAIT).await;
    wb.stop(libc::SIGTERM, WAIT).await;
    let outcomes_a = check_shard(
        "a",
        &results_by_message(&results_a.messages()),
        &all,
        &["a1", "a2"],
        n,
        true,
    );
    let outcomes_b = check_shard(
        "b",
        &results_by_message(&results_b.messages()),
        &all,
        &["b1", "b2"],
        n,
        true,
    );
    // Stock per shard: what each shard's inspect shows left plus what it issued is what it
    // was seeded with (the mismatch drew nothing).
    let inspect_a = a.check_conservation(&outcomes_a);
    b.check_conservation(&outcomes_b);
    assert!(
        inspect_a["last_request_id"].as_u64().unwrap() >= n as u64 / 2,
        "{inspect_a}"
    );
    assert_queue_drained(&conn, &a.names.request).await;
    assert_queue_drained(&conn, &b.names.request).await;
    a.names.delete(&conn).await;
    b.names.delete(&conn).await;
    delete_routing(&conn, &ex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_owned_by_a_running_worker_is_refused_and_taken_again_after_a_clean_stop() {
    let conn = require_broker().await;
    let ex = exchange_name("shards-own");
    let a = shard(
        "shards-own-a",
        &ex,
        vec![
            PoolSpec::new("p1", &[("gold", 100)]),
            PoolSpec::new("p2", &[("gem", 100)]),
        ],
    );
    // Its own queues and data directory, but pool p2 of the first worker.
    let c = shard(
        "shards-own-c",
        &ex,
        vec![
            PoolSpec::new("c1", &[("cup", 100)]),
            PoolSpec::new("p2", &[("gem", 100)]),
        ],
    );
    let mut wa = a.start_ready(&conn, &[]).await;
    let results = Collector::start(&a.names.result).await;

    let mut wc = c.start_worker(&[]);
    let status = wc.wait_exit(WAIT).await;
    let log = wc.log();
    assert!(!status.success(), "the third worker must fail: {log}");
    assert!(
        log.contains("another worker holds the broker lock on pool \"p2\""),
        "the error must name the pool:\n{log}"
    );
    assert!(!log.contains("connected; consuming"), "{log}");
    wa.assert_running();
    // p1 is still served by its owner only.
    let p = ExchangeProducer::new(&conn, &ex).await;
    p.publish_request(&["p1", "p2"], 0).await;
    p.publish_request(&["p1", "p2"], 1).await;
    results
        .wait_for("2 results", WAIT, |m| distinct_count(m) >= 2)
        .await;

    // After a clean stop, the owner's pools are free: a worker with its data directory takes
    // them again and continues its ID sequence.
    wa.stop(libc::SIGTERM, WAIT).await;
    let mut again = a.start_ready(&conn, &[]).await;
    p.publish_request(&["p1", "p2"], 2).await;
    p.publish_request(&["p1", "p2"], 3).await;
    results
        .wait_for("4 results", WAIT, |m| distinct_count(m) >= 4)
        .await;
    again.stop(libc::SIGTERM, WAIT).await;
    let by = results_by_message(&results.messages());
    let outcomes = check_shard("a", &by, &["p1", "p2"], &["p1", "p2"], 4, true);
    let before = by["m-1"][0].0;
    let after = by["m-2"][0].0;
    assert!(after > before, "IDs continue after the restart: {by:?}");
    a.check_conservation(&outcomes);
    a.names.delete(&conn).await;
    c.names.delete(&conn).await;
    delete_routing(&conn, &ex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shards_requests_wait_and_are_served_once_after_restart() {
    let conn = require_broker().await;
    let ex = exchange_name("shards-kill");
    let a = shard(
        "shards-kill-a",
        &ex,
        vec![PoolSpec::new("ka", &[("gold", 100), ("silver", 10_000)])],
    );
    let b = shard(
        "shards-kill-b",
        &ex,
        vec![PoolSpec::new("kb", &[("car", 100), ("cup", 10_000)])],
    );
    let mut wa = a.start_ready(&conn, &[]).await;
    let mut wb = b.start_ready(&conn, &[]).await;
    let results_a = Collector::start(&a.names.result).await;
    let results_b = Collector::start(&b.names.result).await;
    let all = ["ka", "kb"];
    let n = 600;
    let p = ExchangeProducer::new(&conn, &ex).await;
    for i in 0..n / 2 {
        p.publish_request(&all, i).await;
    }
    results_a
        .wait_for("some of a's results", WAIT, |m| distinct_count(m) >= 20)
        .await;
    wa.kill().await;
    for i in n / 2..n {
        p.publish_request(&all, i).await;
    }
    // The other shard serves all its pools' requests while the first is down.
    results_b
        .wait_for("all of b's results", WAIT, |m| distinct_count(m) >= n / 2)
        .await;
    let waiting = must_queue_state(&conn, &a.names.request).await;
    assert!(
        waiting.messages > 0 && waiting.consumers == 0,
        "the killed shard's requests wait in its queue: {waiting:?}"
    );
    note(format!(
        "shard a killed; {} requests wait in its queue",
        waiting.messages
    ));

    let mut wa = a.start_ready(&conn, &[]).await;
    results_a
        .wait_for("all of a's results", WAIT, |m| distinct_count(m) >= n / 2)
        .await;
    wa.stop(libc::SIGTERM, WAIT).await;
    wb.stop(libc::SIGTERM, WAIT).await;
    // Results after the crash may repeat, always with the first ID: none lost, none doubled.
    let outcomes_a = check_shard(
        "a",
        &results_by_message(&results_a.messages()),
        &all,
        &["ka"],
        n,
        false,
    );
    let outcomes_b = check_shard(
        "b",
        &results_by_message(&results_b.messages()),
        &all,
        &["kb"],
        n,
        true,
    );
    a.check_conservation(&outcomes_a);
    b.check_conservation(&outcomes_b);
    assert_queue_drained(&conn, &a.names.request).await;
    a.names.delete(&conn).await;
    b.names.delete(&conn).await;
    delete_routing(&conn, &ex).await;
}

/// `rewardpool admin <args> --config <file>` off the async threads (it blocks until the
/// worker's reply), with a reply timeout under the harness's 60 s bound on a CLI run.
async fn admin(setup: &Setup, args: &[&str]) -> AdminRun {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--timeout".to_string(), "50".to_string()]);
    let config_path = setup.config_path.clone();
    tokio::task::spawn_blocking(move || {
        let mut argv: Vec<&str> = vec!["admin"];
        argv.extend(all.iter().map(String::as_str));
        argv.push("--config");
        argv.push(config_path.to_str().expect("utf-8 path"));
        let out = cli(&argv, None, &[]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        AdminRun {
            code: out.status.code(),
            json: serde_json::from_str(stdout.trim()).ok(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("admin run")
}

/// A pool's items in an `inspect` output or a `pool_state`: id → (quantity, issued, stocked).
fn items_of(pool: &serde_json::Value) -> BTreeMap<String, (u64, u64, u64)> {
    pool["items"]
        .as_array()
        .unwrap_or_else(|| panic!("items in {pool}"))
        .iter()
        .map(|i| {
            let n = |k: &str| i[k].as_u64().unwrap_or_else(|| panic!("{k} in {i}"));
            (
                i["id"].as_str().unwrap().to_string(),
                (n("quantity"), n("issued"), n("stocked")),
            )
        })
        .collect()
}

/// The pool `id` of an `inspect` output.
fn inspected_pool(inspect: &serde_json::Value, id: &str) -> serde_json::Value {
    inspect["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no pool {id} in {inspect}"))
        .clone()
}

/// Issue 12: a pool added by `add_pool` is part of the durable state, and the served set is
/// every pool of that state: after a restart (and after a lost session) the worker locks and
/// binds it again before consuming, draws through the exchange reach it, and another worker
/// configured with it is refused naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_added_by_add_pool_is_owned_again_after_a_restart_and_a_reconnect() {
    let conn = require_broker().await;
    let ex = exchange_name("shards-added");
    let a = shard(
        "shards-added-a",
        &ex,
        vec![PoolSpec::new("base", &[("cup", 100)])],
    );
    let mut wa = a.start_ready(&conn, &[]).await;
    let reply = admin(
        &a,
        &[
            "add-pool",
            "--pool",
            "xmas",
            "--mode",
            "by_quantity",
            "--items-json",
            r#"[{"id":"elf","quantity":50}]"#,
        ],
    )
    .await;
    reply.applied();
    let results = Collector::start(&a.names.result).await;
    let p = ExchangeProducer::new(&conn, &ex).await;
    let pools = ["xmas", "base"];
    p.publish_request(&pools, 0).await;
    results
        .wait_for("the first draw from xmas", WAIT, |m| distinct_count(m) >= 1)
        .await;

    // Restart: xmas is not in the config, only in the durable state; it is owned again.
    wa.stop(libc::SIGTERM, WAIT).await;
    let mut wa = a.start_ready(&conn, &[]).await;
    for i in 1..5 {
        p.publish_request(&pools, i).await;
    }
    results
        .wait_for("5 results after the restart", WAIT, |m| {
            distinct_count(m) >= 5
        })
        .await;
    let unrouted = format!("{ex}.unrouted");
    assert_eq!(
        must_queue_state(&conn, &unrouted).await.messages,
        0,
        "nothing for xmas may go unrouted after the restart"
    );

    // A lost session: the pool is locked and bound again before consuming.
    close_connection_named(
        &format!("rewardpool worker {}", wa.pid()),
        "test: lost session",
    );
    wait_until("the worker to reconnect", WAIT, async || {
        wa.log().matches("connected; consuming").count() >= 2
    })
    .await;
    for i in 5..10 {
        p.publish_request(&pools, i).await;
    }
    results
        .wait_for("10 results after the reconnect", WAIT, |m| {
            distinct_count(m) >= 10
        })
        .await;

    // Another worker (own queues, own data directory) configured with xmas is refused.
    let c = shard(
        "shards-added-c",
        &ex,
        vec![PoolSpec::new("xmas", &[("elf", 50)])],
    );
    let mut wc = c.start_worker(&[]);
    let status = wc.wait_exit(WAIT).await;
    let log = wc.log();
    assert!(!status.success(), "the other worker must fail: {log}");
    assert!(
        log.contains("another worker holds the broker lock on pool \"xmas\""),
        "the error must name the pool:\n{log}"
    );
    assert!(!log.contains("connected; consuming"), "{log}");
    wa.assert_running();

    wa.stop(libc::SIGTERM, WAIT).await;
    let by = results_by_message(&results.messages());
    let outcomes = check_shard("a", &by, &pools, &pools, 10, false);
    // xmas: what the results issued plus what is left is what add_pool put in.
    let elves = outcomes
        .iter()
        .filter(|o| o.pool == "xmas")
        .map(|o| o.items.len() as u64)
        .sum::<u64>();
    let xmas = items_of(&inspected_pool(&a.inspect(), "xmas"));
    assert_eq!(xmas["elf"], (50 - elves, elves, 50), "{xmas:?}");
    a.names.delete(&conn).await;
    c.names.delete(&conn).await;
    delete_routing(&conn, &ex).await;
}

/// The README's pool-move procedure, with two real workers behind the exchange while draws
/// flow: `close-pool` on the old owner A (its reply's `pool_state`, and `inspect`, show what
/// is left), A restarted with the pool in `amqp.released_pools` (its lock and binding go; it
/// answers requests still in its queue `closed`; new ones wait in `<exchange>.unrouted`),
/// `add-pool` on the new owner B with those quantities, the unrouted requests moved back into
/// the exchange. No prize lost or doubled: per item, issued on A + issued on B + left on B =
/// A's stocked; every request answered by exactly one worker under one request ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_moves_to_another_shard_with_the_admin_commands_while_draws_flow() {
    let conn = require_broker().await;
    let ex = exchange_name("shards-move");
    let start = [("gold", 40u64), ("silver", 3000)];
    let mut a = shard(
        "shards-move-a",
        &ex,
        vec![
            PoolSpec::new("stay", &[("cup", 5000)]),
            PoolSpec::new("mv", &start),
        ],
    );
    let b = shard(
        "shards-move-b",
        &ex,
        vec![PoolSpec::new("other", &[("pen", 5000)])],
    );
    let mut wa = a.start_ready(&conn, &[]).await;
    let mut wb = b.start_ready(&conn, &[]).await;
    let results_a = Collector::start(&a.names.result).await;
    let results_b = Collector::start(&b.names.result).await;
    // The stream: half of it for the moving pool, the rest for one pool of each shard.
    const POOLS: [&str; 4] = ["mv", "stay", "mv", "other"];
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let producer = {
        let conn = require_broker().await;
        let ex = ex.clone();
        tokio::spawn(async move {
            let p = ExchangeProducer::new(&conn, &ex).await;
            let mut i = 0;
            while !*stop_rx.borrow_and_update() {
                p.publish_request(&POOLS, i).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            i
        })
    };
    let mv_results = |m: &[Msg]| {
        m.iter()
            .filter(|m| m.kind() == Some("result") && m.json()["pool"] == "mv")
            .count()
    };
    results_a
        .wait_for("draws from mv on the old owner", WAIT, |m| {
            mv_results(m) >= 40
        })
        .await;

    // 1. Close the pool on the old owner: from its reply on, A draws nothing from it.
    let reply = admin(&a, &["close-pool", "--pool", "mv"]).await;
    let closed_state = reply.applied()["pool_state"].clone();
    assert_eq!(closed_state["closed"], true, "{closed_state}");
    let left = items_of(&closed_state);
    results_a
        .wait_for("a closed result on the old owner", WAIT, |m| {
            m.iter()
                .any(|m| m.kind() == Some("result") && m.json()["status"] == "closed")
        })
        .await;
    // 2. What is left: `inspect` beside the running worker agrees with the reply.
    assert_eq!(
        items_of(&inspected_pool(&a.inspect(), "mv")),
        left,
        "inspect and the close reply"
    );
    // 3. Release it on A: restart with amqp.released_pools (its lock and binding go).
    wa.stop(libc::SIGTERM, WAIT).await;
    a.config
        .amqp_extra
        .push(r#"released_pools = ["mv"]"#.into());
    std::fs::write(&a.config_path, a.render()).unwrap();
    let mut wa = a.start_ready(&conn, &[]).await;
    let unrouted = format!("{ex}.unrouted");
    wait_until("requests for mv waiting unrouted", WAIT, async || {
        must_queue_state(&conn, &unrouted).await.messages >= 3
    })
    .await;
    // An admin command for the released pool is for its new owner: rejected on A.
    let refused = admin(&a, &["open-pool", "--pool", "mv"]).await.rejected();
    assert!(refused.contains("amqp.released_pools"), "{refused}");
    // 4. The new owner takes it with exactly what was left (served open at once).
    let items_json = serde_json::to_string(
        &left
            .iter()
            .map(|(id, (quantity, _, _))| serde_json::json!({"id": id, "quantity": quantity}))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let added = admin(
        &b,
        &[
            "add-pool",
            "--pool",
            "mv",
            "--mode",
            "by_quantity",
            "--items-json",
            &items_json,
        ],
    )
    .await;
    let added_state = added.applied()["pool_state"].clone();
    assert_eq!(added_state["closed"], false, "{added_state}");
    // 5. The requests that waited go back into the exchange with their routing keys (what a
    //    shovel from the unrouted queue to the exchange does).
    let shovel = ExchangeProducer::new(&conn, &ex).await;
    let ch = op("channel.open", conn.create_channel()).await;
    let mut moved = 0;
    while let Some(got) = op(
        "basic.get",
        ch.basic_get(unrouted.as_str().into(), BasicGetOptions { no_ack: false }),
    )
    .await
    {
        let d = got.delivery;
        shovel
            .publish(
                d.routing_key.as_str(),
                std::str::from_utf8(&d.data).unwrap(),
                d.properties.clone(),
            )
            .await;
        op(
            "basic.ack",
            d.acker.ack(lapin::options::BasicAckOptions::default()),
        )
        .await;
        moved += 1;
    }
    note(format!(
        "{moved} unrouted requests moved back into the exchange"
    ));
    results_b
        .wait_for("draws from mv on the new owner", WAIT, |m| {
            mv_results(m) >= moved + 20
        })
        .await;
    stop_tx.send(true).unwrap();
    let n = producer.await.unwrap();
    note(format!("{n} requests published"));
    let answered = |a: &[Msg], b: &[Msg]| {
        let mut ids: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for m in a.iter().chain(b) {
            if m.kind() == Some("result") {
                ids.insert(parse_result(m).0.unwrap());
            }
        }
        ids.len()
    };
    wait_until("every request answered", WAIT, async || {
        answered(&results_a.messages(), &results_b.messages()) >= n
    })
    .await;
    wa.stop(libc::SIGTERM, WAIT).await;
    wb.stop(libc::SIGTERM, WAIT).await;
    assert_eq!(
        must_queue_state(&conn, &unrouted).await.messages,
        0,
        "nothing left unrouted"
    );

    // Every request answered by exactly one worker, under one request ID there.
    let by_a = results_by_message(&results_a.messages());
    let by_b = results_by_message(&results_b.messages());
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..n {
        let mid = format!("m-{i}");
        let pool = expected_pool(&POOLS, &mid);
        let (on_a, on_b) = (by_a.get(&mid), by_b.get(&mid));
        let rs = match (on_a, on_b) {
            (Some(rs), None) => {
                assert!(pool != "other", "{mid} for {pool} answered by A");
                rs
            }
            (None, Some(rs)) => {
                assert!(pool != "stay", "{mid} for {pool} answered by B");
                rs
            }
            (Some(x), Some(y)) => panic!("{mid} answered by both workers: {x:?} {y:?}"),
            (None, None) => panic!("{mid} ({pool}) never answered"),
        };
        assert!(
            rs.iter().all(|(id, o)| *id == rs[0].0 && *o == rs[0].1),
            "{mid} drawn more than once: {rs:?}"
        );
        assert_eq!(rs[0].1.pool, pool, "{mid}");
        *statuses
            .entry(if on_a.is_some() { "a" } else { "b" })
            .or_default() += 1;
    }
    let closed_on_a = by_a
        .values()
        .filter(|rs| rs[0].1.status == "closed")
        .count();
    note(format!(
        "answered per worker {statuses:?}; closed on A: {closed_on_a}"
    ));
    assert!(
        by_b.values().all(|rs| rs[0].1.status != "closed"),
        "nothing closed on the new owner"
    );
    assert!(
        by_a.values()
            .all(|rs| rs[0].1.status != "closed" || rs[0].1.pool == "mv"),
        "only mv was closed"
    );

    // No prize lost or doubled. A: its config's pools are conserved against its own results
    // (mv included: what A issued is stocked - left, and left did not move since the close).
    let outcomes_a: Vec<Outcome> = by_a.values().map(|rs| rs[0].1.clone()).collect();
    let inspect_a = a.check_conservation(&outcomes_a);
    let mv_a = items_of(&inspected_pool(&inspect_a, "mv"));
    assert_eq!(mv_a, left, "A's mv is unchanged since the close");
    // B: its config pool against its results; mv against what it was given.
    let outcomes_b: Vec<Outcome> = by_b.values().map(|rs| rs[0].1.clone()).collect();
    let (mv_b_outcomes, other_b): (Vec<Outcome>, Vec<Outcome>) =
        outcomes_b.into_iter().partition(|o| o.pool == "mv");
    let inspect_b = b.check_conservation(&other_b);
    let mv_b = items_of(&inspected_pool(&inspect_b, "mv"));
    let mut issued_b: HashMap<String, u64> = HashMap::new();
    for o in &mv_b_outcomes {
        for item in &o.items {
            *issued_b.entry(item.clone()).or_default() += 1;
        }
    }
    for (item, initial) in start {
        let (left_a, issued_a, stocked_a) = mv_a[item];
        let (left_b, issued_on_b, stocked_b) = mv_b[item];
        assert_eq!(stocked_a, initial, "{item}: A stocked");
        assert_eq!(stocked_b, left_a, "{item}: B was given what A had left");
        assert_eq!(
            issued_b.get(item).copied().unwrap_or(0),
            issued_on_b,
            "{item}: B's results and B's issued"
        );
        assert_eq!(
            issued_a + issued_on_b + left_b,
            stocked_a,
            "{item}: issued on A {issued_a} + issued on B {issued_on_b} + left on B {left_b} must be A's stocked {stocked_a}"
        );
    }
    assert!(
        mv_b_outcomes.len() >= moved,
        "B drew the requests that waited unrouted"
    );
    a.names.delete(&conn).await;
    b.names.delete(&conn).await;
    delete_routing(&conn, &ex).await;
}

/// A released pool must be one this data directory has: a typo would leave the real pool
/// served and its lock held, blocking its new owner. Checked after recovery, before the
/// broker is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_a_pool_the_state_does_not_have_stops_the_worker_at_start() {
    let mut a = shard(
        "shards-typo",
        &exchange_name("shards-typo"),
        vec![PoolSpec::new("mv", &[("gold", 1)])],
    );
    a.config
        .amqp_extra
        .push(r#"released_pools = ["vm"]"#.into());
    std::fs::write(&a.config_path, a.render()).unwrap();
    let mut w = a.start_worker(&[]);
    let status = w.wait_exit(WAIT).await;
    let log = w.log();
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("amqp.released_pools names pool \"vm\"") && log.contains("\"mv\""),
        "{log}"
    );
    assert!(!log.contains("connecting to the broker"), "{log}");
}

/// The race of the README: the owner's connection drops, the broker frees its locks, and a
/// worker with the same pool (another data directory) takes the pool in the gap. The first
/// worker, back on the broker, must not consume beside it: it says why and waits (it stops for
/// good after 180 s); once the other worker is gone it takes the pool back and serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lost_session_a_pool_taken_meanwhile_stops_consuming_with_the_reason() {
    let conn = require_broker().await;
    let ex = exchange_name("shards-race");
    let mut a = shard(
        "shards-race-a",
        &ex,
        vec![PoolSpec::new("rp", &[("gold", 100)])],
    );
    // A slow reconnect leaves the gap in which the other worker starts.
    a.config
        .amqp_extra
        .push("reconnect_backoff_min_ms = 4000".into());
    a.config
        .amqp_extra
        .push("reconnect_backoff_max_ms = 4000".into());
    std::fs::write(&a.config_path, a.render()).unwrap();
    let c = shard(
        "shards-race-c",
        &ex,
        vec![PoolSpec::new("rp", &[("gold", 100)])],
    );
    let mut wa = a.start_ready(&conn, &[]).await;
    close_connection_named(
        &format!("rewardpool worker {}", wa.pid()),
        "test: lost session",
    );
    let mut wc = c.start_ready(&conn, &[]).await;

    wait_until("the first worker to say why it waits", WAIT, async || {
        wa.log().contains("broker lock not free yet")
    })
    .await;
    let log = wa.log();
    assert!(
        log.contains("another worker holds the broker lock on pool \"rp\""),
        "{log}"
    );
    wa.assert_running();
    assert_eq!(
        must_queue_state(&conn, &a.names.request).await.consumers,
        0,
        "the first worker must not consume while the other owns its pool"
    );

    // The other worker goes; the first takes the pool back and serves it.
    wc.stop(libc::SIGTERM, WAIT).await;
    wa.wait_ready(&conn, &a.names.request, WAIT).await;
    let results = Collector::start(&a.names.result).await;
    let p = ExchangeProducer::new(&conn, &ex).await;
    p.publish_request(&["rp"], 1).await;
    results
        .wait_for("the result on the first worker", WAIT, |m| {
            distinct_count(m) >= 1
        })
        .await;
    wa.stop(libc::SIGTERM, WAIT).await;
    a.names.delete(&conn).await;
    c.names.delete(&conn).await;
    delete_routing(&conn, &ex).await;
}

/// `deploy/docker-compose.shards.yml` is valid for docker-compose, and its two shard configs
/// load, share one exchange, and own disjoint pools on distinct queues.
#[test]
fn the_shards_compose_file_and_its_shard_configs_are_valid() {
    let repo = |p: &str| format!("{}/{p}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("docker-compose")
        .args([
            "-f",
            &repo("deploy/docker-compose.shards.yml"),
            "config",
            "-q",
        ])
        .output()
        .unwrap_or_else(|e| panic!("docker-compose not found ({e}): `bash .ci/run` installs it"));
    assert!(
        out.status.success(),
        "docker-compose config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pools = Vec::new();
    let mut queues = Vec::new();
    for shard in ["a", "b"] {
        let path = repo(&format!("deploy/shards/shard-{shard}.toml"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("exchange = \"rewardpool\""), "{path}");
        let line = text
            .lines()
            .find(|l| l.starts_with("request_queue"))
            .unwrap();
        queues.push(line.to_string());
        let data = tempfile::tempdir().unwrap();
        let out = cli(
            &[
                "inspect",
                "--config",
                &path,
                "--data-dir",
                data.path().to_str().unwrap(),
            ],
            None,
            &[],
        );
        assert!(
            out.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for p in v["pools"].as_array().unwrap() {
            pools.push(p["id"].as_str().unwrap().to_string());
        }
    }
    let distinct: std::collections::BTreeSet<_> = pools.iter().collect();
    assert_eq!(
        distinct.len(),
        pools.len(),
        "each pool in one shard: {pools:?}"
    );
    assert_ne!(queues[0], queues[1]);
}
