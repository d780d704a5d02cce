//! Admin commands through the real broker: every op with `rewardpool admin` and with a raw
//! client, checked by the replies, by `inspect` and after a restart; rejections (each rule, the
//! allow list, a rejected command's `message_id` used again); draws at full speed while
//! restocking every few milliseconds; SIGKILL at 20+ points while commands and draws flow;
//! and the CLI's own exits when no worker answers.

use common::metrics::{free_port, scrape, value};
use common::*;
use rewardpool::record::{AdminOp, Record};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const SPIN: &str = r#"
[[pools]]
id = "spin"
mode = "by_weight"
items = [
  { id = "car",       quantity = 1,  weight = 1 },
  { id = "voucher",   quantity = 50, weight = 99 },
  { id = "try_again", weight = 900 },
]
"#;

fn config() -> WorkerConfig {
    let mut c = WorkerConfig::new(
        QueueType::Quorum,
        vec![PoolSpec::new("default", &[("gold", 10), ("silver", 100)])],
    );
    c.pools_toml = SPIN.into();
    c
}

/// Waits until the worker consumes the admin queue too (readiness counts both consumers).
async fn wait_admin_consumer(conn: &lapin::Connection, setup: &Setup) {
    wait_until(
        "the worker to consume the admin queue",
        Duration::from_secs(60),
        async || matches!(queue_state(conn, &setup.names.admin).await, Some(q) if q.consumers >= 1),
    )
    .await;
}

fn item(
    id: &str,
    quantity: Option<u64>,
    issued: u64,
    stocked: Option<u64>,
    weight: Option<u64>,
) -> Value {
    json!({"id": id, "quantity": quantity, "issued": issued, "stocked": stocked, "weight": weight})
}

/// The pool named `id` in `inspect` output.
fn pool<'a>(inspect: &'a Value, id: &str) -> &'a Value {
    inspect["pools"]
        .as_array()
        .expect("pools")
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no pool {id} in {inspect}"))
}

/// `stocked = quantity + issued` for every limited item of every pool.
fn assert_accounting(inspect: &Value) {
    for p in inspect["pools"].as_array().expect("pools") {
        for i in p["items"].as_array().expect("items") {
            if let (Some(q), Some(s)) = (i["quantity"].as_u64(), i["stocked"].as_u64()) {
                assert_eq!(
                    q + i["issued"].as_u64().expect("issued"),
                    s,
                    "pool {} item {}: stocked != quantity + issued: {inspect}",
                    p["id"],
                    i["id"]
                );
            }
        }
    }
}

/// Draw requests to the request queue, their results on a reply queue of their own.
struct Draws<'a> {
    setup: &'a Setup,
    replies: Collector,
    producer: Producer,
}

impl<'a> Draws<'a> {
    async fn new(conn: &lapin::Connection, setup: &'a Setup) -> Draws<'a> {
        let replies = Collector::reply_queue(&setup.names.extra("draw-replies")).await;
        let producer = Producer::new(conn).await;
        Draws {
            setup,
            replies,
            producer,
        }
    }

    /// Publishes one draw request (message_id `mid`, correlation `mid`), confirmed.
    async fn draw(&mut self, mid: &str, body: &str) {
        let props = request_props(Some(mid), Some(&self.replies.queue), Some(mid));
        let queue = &self.setup.names.request;
        self.producer.publish(queue, body.as_bytes(), props).await;
        self.producer.flush().await;
    }

    /// Draws and waits for the result.
    async fn result(&mut self, mid: &str, body: &str) -> Value {
        self.draw(mid, body).await;
        result_of(&self.replies, mid).await
    }
}

/// The result on `replies` whose correlation_id is `mid` (waits).
async fn result_of(replies: &Collector, mid: &str) -> Value {
    replies
        .wait_for(
            &format!("the result of {mid}"),
            Duration::from_secs(60),
            |m| {
                m.iter()
                    .any(|m| m.kind() == Some("result") && m.correlation_id() == Some(mid))
            },
        )
        .await;
    let msgs = replies.messages();
    let m = msgs
        .iter()
        .rev()
        .find(|m| m.kind() == Some("result") && m.correlation_id() == Some(mid))
        .expect("just seen");
    parse_result(m);
    m.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_applies_through_the_cli_and_a_raw_client_and_survives_a_restart() {
    let conn = require_broker().await;
    let setup = Setup::new("admin_ops", config());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let env = [("REWARDPOOL__METRICS__LISTEN", listen.as_str())];
    let mut worker = setup.start_ready(&conn, &env).await;
    wait_admin_consumer(&conn, &setup).await;

    // The CLI: every op, replies as the contract shows them.
    let restock = [
        "restock", "--pool", "default", "--item", "gold", "--add", "5",
    ];
    let first = setup.admin_cli(
        &[&restock[..], &["--message-id", "cli-1"][..]].concat(),
        &[],
    );
    let v = first.applied().clone();
    assert_eq!(v["op"], "restock");
    assert_eq!(v["pool"], "default");
    assert_eq!(v["item"], item("gold", Some(15), 0, Some(15), None));
    assert!(v["request_id"].as_u64().unwrap() > 0);
    // The same --message-id again: not applied twice, the first reply.
    let again = setup.admin_cli(
        &[&restock[..], &["--message-id", "cli-1"][..]].concat(),
        &[],
    );
    assert_eq!(again.applied(), &v, "a repeat gets the first reply");

    let cases: [(&[&str], Value); 5] = [
        (
            &[
                "set-quantity",
                "--pool",
                "default",
                "--item",
                "silver",
                "--quantity",
                "40",
            ],
            item("silver", Some(40), 0, Some(40), None),
        ),
        (
            &[
                "set-weight",
                "--pool",
                "spin",
                "--item",
                "car",
                "--weight",
                "5",
            ],
            item("car", Some(1), 0, Some(1), Some(5)),
        ),
        (
            &[
                "add-item",
                "--pool",
                "default",
                "--item",
                "platinum",
                "--quantity",
                "2",
            ],
            item("platinum", Some(2), 0, Some(2), None),
        ),
        (
            &[
                "add-item", "--pool", "spin", "--item", "sticker", "--weight", "50",
            ],
            item("sticker", None, 0, None, Some(50)),
        ),
        (
            &[
                "set-quantity",
                "--pool",
                "spin",
                "--item",
                "voucher",
                "--quantity",
                "60",
            ],
            item("voucher", Some(60), 0, Some(60), Some(99)),
        ),
    ];
    for (args, want) in cases {
        let run = setup.admin_cli(args, &[]);
        let v = run.applied();
        assert_eq!(v["item"], want, "{args:?}: {v}");
        assert!(v.get("pool_state").is_none(), "{v}");
    }
    let added = setup.admin_cli(
        &[
            "add-pool",
            "--pool",
            "xmas",
            "--mode",
            "by_quantity",
            "--items-json",
            r#"[{"id":"elf","quantity":3}]"#,
        ],
        &[],
    );
    let v = added.applied();
    assert_eq!(
        v["pool_state"],
        json!({"id":"xmas","mode":"by_quantity","closed":false,"items":[item("elf", Some(3), 0, Some(3), None)]}),
        "{v}"
    );
    let closed = setup.admin_cli(&["close-pool", "--pool", "xmas"], &[]);
    assert_eq!(closed.applied()["pool_state"]["closed"], true);

    // A raw client: the same contract, correlation_id echoed (the client matches on it).
    let mut admin = AdminClient::new(&setup, "admin-replies").await;
    let v = admin
        .applied(r#"{"op":"open_pool","pool":"xmas"}"#, "raw-1")
        .await;
    assert_eq!(
        (v["op"].clone(), v["pool_state"]["closed"].clone()),
        (json!("open_pool"), json!(false))
    );
    let v = admin
        .applied(
            r#"{"op":"restock","pool":"xmas","item":"elf","add":2}"#,
            "raw-2",
        )
        .await;
    assert_eq!(v["item"], item("elf", Some(5), 0, Some(5), None));
    let v = admin
        .applied(
            r#"{"op":"add_pool","pool":"gift","mode":"by_weight","items":[{"id":"bow","quantity":1,"weight":1},{"id":"card","weight":9}]}"#,
            "raw-3",
        )
        .await;
    assert_eq!(v["pool_state"]["mode"], "by_weight");
    admin
        .applied(r#"{"op":"close_pool","pool":"default"}"#, "raw-4")
        .await;

    // Draws see every applied command: the added pools serve, the closed one answers closed.
    let mut draws = Draws::new(&conn, &setup).await;
    draws.draw("d-1", r#"{"pool":"xmas","count":5}"#).await;
    draws.draw("d-2", r#"{"pool":"default"}"#).await;
    draws.draw("d-3", r#"{"pool":"gift","count":3}"#).await;
    let d1 = result_of(&draws.replies, "d-1").await;
    assert_eq!(d1["status"], "won");
    assert_eq!(d1["items"], json!(["elf", "elf", "elf", "elf", "elf"]));
    let d2 = result_of(&draws.replies, "d-2").await;
    assert_eq!(
        (d2["status"].clone(), d2["items"].clone()),
        (json!("closed"), json!([]))
    );
    let d3 = result_of(&draws.replies, "d-3").await;
    assert_eq!(d3["status"], "won");
    admin
        .applied(r#"{"op":"open_pool","pool":"default"}"#, "raw-5")
        .await;
    let d4 = draws.result("d-4", r#"{"pool":"default"}"#).await;
    assert_eq!(d4["status"], "won");
    // A repeat of the closed draw after the pool opened: still the first outcome.
    draws.draw("d-2", r#"{"pool":"default"}"#).await;
    (draws.replies)
        .wait_for("two results of d-2", Duration::from_secs(60), |m| {
            m.iter()
                .filter(|m| m.kind() == Some("result") && m.correlation_id() == Some("d-2"))
                .count()
                >= 2
        })
        .await;
    for m in (draws.replies)
        .messages()
        .iter()
        .filter(|m| m.kind() == Some("result") && m.correlation_id() == Some("d-2"))
    {
        assert_eq!(m.json()["status"], "closed");
        assert_eq!(m.json()["request_id"], d2["request_id"]);
    }

    // The metric: each command counted once (the CLI's repeat is not applied again).
    let s = scrape(&listen).await;
    let applied = |op: &str| {
        value(
            &s,
            "rewardpool_admin_commands_total",
            &[("op", op), ("outcome", "applied")],
        )
        .unwrap_or_else(|| panic!("no admin_commands_total for {op}"))
    };
    assert_eq!(applied("restock"), 2.0);
    assert_eq!(applied("set_quantity"), 2.0);
    assert_eq!(applied("set_weight"), 1.0);
    assert_eq!(applied("add_item"), 2.0);
    assert_eq!(applied("add_pool"), 2.0);
    assert_eq!(applied("close_pool"), 2.0);
    assert_eq!(applied("open_pool"), 2.0);
    assert_eq!(
        value(
            &s,
            "rewardpool_stock_stocked",
            &[("pool", "xmas"), ("item", "elf")]
        ),
        Some(5.0)
    );

    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let before = setup.inspect();
    assert_accounting(&before);
    let ids: Vec<&str> = before["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["default", "spin", "xmas", "gift"], "{before}");
    let items = |p: &str| -> Vec<String> {
        pool(&before, p)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(items("default"), ["gold", "silver", "platinum"]);
    assert_eq!(items("spin"), ["car", "voucher", "try_again", "sticker"]);
    assert_eq!(
        pool(&before, "xmas")["items"][0],
        item("elf", Some(0), 5, Some(5), None)
    );
    let default = pool(&before, "default");
    assert_eq!(default["closed"], false);
    let stocked: Vec<Value> = default["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["stocked"].clone())
        .collect();
    assert_eq!(stocked, [json!(15), json!(40), json!(2)]);
    let spin = pool(&before, "spin");
    assert_eq!(spin["items"][0]["weight"], 5);
    assert_eq!(spin["items"][1]["stocked"], 60);
    // `wal dump` shows the commands.
    let dump = cli(
        &[
            "wal",
            "dump",
            "--config",
            setup.config_path.to_str().unwrap(),
        ],
        None,
        &[],
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    for op in [
        "restock",
        "set_quantity",
        "set_weight",
        "add_item",
        "add_pool",
        "close_pool",
        "open_pool",
    ] {
        assert!(dump.contains(op), "wal dump shows no {op}:\n{dump}");
    }

    // After a restart: the same state, the added pools still served.
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;
    assert_eq!(
        setup.inspect()["pools"],
        before["pools"],
        "a restart changed the state"
    );
    let d5 = draws.result("d-5", r#"{"pool":"gift"}"#).await;
    assert_eq!(d5["status"], "won");
    let d6 = draws.result("d-6", r#"{"pool":"xmas"}"#).await;
    assert_eq!(d6["status"], "empty");
    // A repeat across the restart: the first reply, nothing applied.
    let v2 = admin
        .applied(
            r#"{"op":"restock","pool":"xmas","item":"elf","add":2}"#,
            "raw-2",
        )
        .await;
    assert_eq!(
        v2["item"],
        item("elf", Some(5), 0, Some(5), None),
        "the first reply"
    );
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let after = setup.inspect();
    assert_eq!(pool(&after, "xmas")["items"][0]["stocked"], 5);
    assert_eq!(
        must_queue_state(&conn, &setup.names.dead).await.messages,
        0,
        "nothing dead-lettered"
    );
    drop((admin, draws));
    setup.names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_rejected_dead_lettered_and_change_nothing() {
    let conn = require_broker().await;
    let setup = Setup::new("admin_reject", config());
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;
    let mut admin = AdminClient::new(&setup, "admin-replies").await;
    let before = setup.inspect();

    // (body, words the reason must contain)
    let cases: &[(&str, &[&str])] = &[
        (r#"{"op":"explode","pool":"default"}"#, &["unknown op"]),
        (r#"{"pool":"default"}"#, &["op"]),
        ("not json", &["json"]),
        ("[1]", &["object"]),
        (
            r#"{"op":"close_pool","pool":"default","pool":"spin"}"#,
            &["duplicate"],
        ),
        (
            r#"{"op":"restock","pool":"default","item":"gold","add":1,"force":true}"#,
            &["force"],
        ),
        (
            r#"{"op":"restock","pool":"nope","item":"gold","add":1}"#,
            &["nope"],
        ),
        (
            r#"{"op":"restock","pool":"default","item":"nope","add":1}"#,
            &["nope"],
        ),
        (
            r#"{"op":"restock","pool":"default","item":"gold","add":0}"#,
            &["add"],
        ),
        (
            r#"{"op":"restock","pool":"default","item":"gold","add":1099511627777}"#,
            &["add"],
        ),
        (
            r#"{"op":"restock","pool":"default","item":"gold","add":-3}"#,
            &["negative"],
        ),
        (
            r#"{"op":"restock","pool":"spin","item":"try_again","add":1}"#,
            &["unlimited"],
        ),
        (
            r#"{"op":"set_quantity","pool":"default","item":"gold","quantity":1099511627777}"#,
            &["quantity"],
        ),
        (
            r#"{"op":"set_quantity","pool":"spin","item":"try_again","quantity":3}"#,
            &["unlimited"],
        ),
        (
            r#"{"op":"set_weight","pool":"default","item":"gold","weight":5}"#,
            &["weight"],
        ),
        (
            r#"{"op":"set_weight","pool":"spin","item":"car","weight":0}"#,
            &["weight"],
        ),
        (
            r#"{"op":"set_weight","pool":"spin","item":"car","weight":4294967297}"#,
            &["weight"],
        ),
        (
            r#"{"op":"add_item","pool":"default","item":"gold","quantity":1}"#,
            &["gold"],
        ),
        (
            r#"{"op":"add_item","pool":"default","item":"lead"}"#,
            &["quantity"],
        ),
        (
            r#"{"op":"add_item","pool":"default","item":"lead","quantity":1,"weight":2}"#,
            &["weight"],
        ),
        (
            r#"{"op":"add_item","pool":"spin","item":"lead","quantity":1}"#,
            &["weight"],
        ),
        (
            r#"{"op":"add_item","pool":"default","item":"","quantity":1}"#,
            &["empty"],
        ),
        (
            r#"{"op":"add_pool","pool":"default","mode":"by_quantity","items":[{"id":"a","quantity":1}]}"#,
            &["default"],
        ),
        (
            r#"{"op":"add_pool","pool":"n","mode":"random","items":[{"id":"a","quantity":1}]}"#,
            &["mode"],
        ),
        (
            r#"{"op":"add_pool","pool":"n","mode":"by_quantity","items":[]}"#,
            &["items"],
        ),
        (
            r#"{"op":"add_pool","pool":"n","mode":"by_quantity","items":[{"id":"a","quantity":1},{"id":"a","quantity":2}]}"#,
            &["duplicate"],
        ),
        (
            r#"{"op":"add_pool","pool":"n","mode":"by_quantity","items":[{"id":"a"}]}"#,
            &["quantity"],
        ),
        (r#"{"op":"close_pool","pool":"nope"}"#, &["nope"]),
    ];
    let mut rejected = 0u32;
    for (i, (body, words)) in cases.iter().enumerate() {
        let mid = format!("bad-{i}");
        let reason = admin
            .rejected(
                body,
                AdminProps {
                    message_id: Some(&mid),
                    ..Default::default()
                },
            )
            .await;
        rejected += 1;
        let lower = reason.to_lowercase();
        for w in *words {
            assert!(
                lower.contains(w),
                "{body}: the reason {reason:?} does not name {w:?}"
            );
        }
    }
    // The worker's own message type is never acted on.
    let reason = admin
        .rejected(
            r#"{"op":"close_pool","pool":"default"}"#,
            AdminProps {
                kind: Some("admin_result"),
                ..Default::default()
            },
        )
        .await;
    rejected += 1;
    assert!(reason.contains("type"), "{reason}");

    // A rejected command leaves no trace: its message_id is checked again, and applied once
    // the command is valid (then it is a repeat like any other).
    let props = || AdminProps {
        message_id: Some("retry-1"),
        ..Default::default()
    };
    let r1 = admin
        .rejected(
            r#"{"op":"restock","pool":"default","item":"nope","add":1}"#,
            props(),
        )
        .await;
    let r2 = admin
        .rejected(
            r#"{"op":"restock","pool":"default","item":"nope","add":1}"#,
            props(),
        )
        .await;
    rejected += 2;
    assert_eq!(r1, r2, "the same rejection again, not a repeat of anything");
    let applied = admin
        .applied(
            r#"{"op":"restock","pool":"default","item":"gold","add":1}"#,
            "retry-1",
        )
        .await;
    assert_eq!(applied["item"]["stocked"], 11);
    let repeat = admin
        .applied(
            r#"{"op":"restock","pool":"default","item":"gold","add":1}"#,
            "retry-1",
        )
        .await;
    assert_eq!(
        repeat, applied,
        "the applied command's repeat gets its first reply"
    );

    // Draws and commands keep their message_ids apart (the engine's two windows): a command
    // may reuse a draw's id and a draw a command's, each applied once in its own kind.
    let mut draws = Draws::new(&conn, &setup).await;
    let first = draws.result("shared-1", r#"{"pool":"default"}"#).await;
    let command = admin
        .applied(
            r#"{"op":"restock","pool":"default","item":"gold","add":1}"#,
            "shared-1",
        )
        .await;
    assert_ne!(command["request_id"], first["request_id"]);
    let drawn = draws.result("retry-1", r#"{"pool":"spin"}"#).await;
    assert_ne!(drawn["request_id"], applied["request_id"]);
    worker.assert_running();

    // Everything rejected is in the dead-letter queue, untouched; the state moved only by the
    // two applied restocks and the two draws.
    wait_until(
        "every rejected command in the dead-letter queue",
        Duration::from_secs(30),
        async || must_queue_state(&conn, &setup.names.dead).await.messages == rejected,
    )
    .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let after = setup.inspect();
    assert_accounting(&after);
    let gold = &pool(&after, "default")["items"][0];
    assert_eq!(gold["stocked"], 12, "{after}");
    let spin_issued: u64 = pool(&after, "spin")["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["issued"].as_u64().unwrap())
        .sum();
    assert_eq!(spin_issued, 1, "only the one draw moved spin");
    let stocked = |v: &Value| -> Vec<Value> {
        pool(v, "spin")["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| json!([i["id"], i["stocked"], i["weight"]]))
            .collect()
    };
    assert_eq!(
        stocked(&after),
        stocked(&before),
        "a rejected command changed spin"
    );
    assert_eq!(after["pools"].as_array().unwrap().len(), 2);
    drop((admin, draws));
    setup.names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_allowed_users_only_their_commands_apply() {
    let conn = require_broker().await;
    let ops = BrokerUser::create("ops");
    let other = BrokerUser::create("other");
    let mut c = config();
    c.allowed_users = vec![ops.name.clone()];
    let setup = Setup::new("admin_users", c);
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;

    // The CLI as an allowed user (user_id = the user of amqp.url).
    let ops_url = ops.url();
    let run = setup.admin_cli(
        &[
            "restock", "--pool", "default", "--item", "gold", "--add", "3",
        ],
        &[("REWARDPOOL__AMQP__URL", ops_url.as_str())],
    );
    assert_eq!(run.applied()["item"]["stocked"], 13);
    // The CLI as guest, who is not listed: exit 1, the reason names the rule.
    let run = setup.admin_cli(
        &[
            "restock", "--pool", "default", "--item", "gold", "--add", "3",
        ],
        &[],
    );
    let reason = run.rejected();
    assert!(
        reason.contains("allowed_users") && reason.contains("guest"),
        "{reason}"
    );
    // Another broker user publishing with its own (broker-checked) user_id.
    let mut as_other = AdminClient::with_url(&setup, "other-replies", &other.url()).await;
    let reason = as_other
        .rejected(
            r#"{"op":"restock","pool":"default","item":"gold","add":3}"#,
            AdminProps {
                user_id: Some(&other.name),
                ..Default::default()
            },
        )
        .await;
    assert!(
        reason.contains(&other.name) && reason.contains("allowed_users"),
        "{reason}"
    );
    // No user_id at all while the list is set.
    let mut anonymous = AdminClient::new(&setup, "anon-replies").await;
    let reason = anonymous
        .rejected(
            r#"{"op":"restock","pool":"default","item":"gold","add":3}"#,
            AdminProps::default(),
        )
        .await;
    assert!(
        reason.contains("user_id") && reason.contains("allowed_users"),
        "{reason}"
    );

    wait_until(
        "three rejected commands dead-lettered",
        Duration::from_secs(30),
        async || must_queue_state(&conn, &setup.names.dead).await.messages == 3,
    )
    .await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let after = setup.inspect();
    assert_eq!(
        pool(&after, "default")["items"][0]["stocked"],
        13,
        "only ops' command applied"
    );
    drop((as_other, anonymous));
    setup.names.delete(&conn).await;
    drop((ops, other));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_when_nothing_answers_and_an_unanswered_command_expires_unapplied() {
    let conn = require_broker().await;
    let setup = Setup::new("admin_cli_exits", config());
    // Never started: the admin queue does not exist. Not sent (exit 3).
    let run = setup.admin_cli(&["close-pool", "--pool", "default", "--timeout", "2"], &[]);
    assert_eq!(run.code, Some(3), "{run:#?}");
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);

    // Declared, but the worker is stopped: no reply in time (exit 2), and the command expires
    // in the queue instead of being applied when a worker starts later.
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let run = setup.admin_cli(
        &[
            "close-pool",
            "--pool",
            "default",
            "--timeout",
            "1",
            "--message-id",
            "late-1",
        ],
        &[],
    );
    assert_eq!(run.code, Some(2), "{run:#?}");
    assert!(
        run.stderr.contains("no reply within 1 s") && run.stderr.contains("late-1"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("no worker consumed"), "{}", run.stderr);
    wait_until(
        "the unanswered command to expire into the dead-letter queue",
        Duration::from_secs(30),
        async || must_queue_state(&conn, &setup.names.dead).await.messages == 1,
    )
    .await;
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;
    // A later command is applied; the expired one never was (the pool is open).
    let run = setup.admin_cli(
        &[
            "restock", "--pool", "default", "--item", "gold", "--add", "1",
        ],
        &[],
    );
    run.applied();
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    assert_eq!(pool(&setup.inspect(), "default")["closed"], false);
    // Help lists every op with an example.
    let help = cli(&["admin", "--help"], None, &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    for op in [
        "restock",
        "set-quantity",
        "set-weight",
        "add-item",
        "add-pool",
        "close-pool",
        "open-pool",
    ] {
        assert!(
            help.contains(&format!("rewardpool admin {op}")),
            "no example of {op}:\n{help}"
        );
    }
    setup.names.delete(&conn).await;
}

const HOT: &str = r#"
[[pools]]
id = "hot"
mode = "by_weight"
items = [
  { id = "gold", quantity = 0, weight = 1000 },
  { id = "tin",  weight = 1 },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draws_at_full_speed_while_restocking_conserve_and_restocked_units_go_to_later_requests() {
    const DRAWS: usize = 8000;
    // Restocks go on every few ms until every draw has its result (at most this many).
    const RESTOCKS_MAX: usize = 3000;
    let conn = require_broker().await;
    let mut c = WorkerConfig::new(QueueType::Quorum, Vec::new());
    c.pools_toml = HOT.into();
    // Snapshots during the run (the engine checks the accounting at each).
    c.storage_extra.push("snapshot_every_records = 1000".into());
    let setup = Arc::new(Setup::new("admin_speed", c));
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;
    let results = Collector::start(&setup.names.result).await;

    // Draws at full speed from one task, restocks every few ms from another.
    let drawing = {
        let setup = setup.clone();
        tokio::spawn(async move {
            let conn = require_broker().await;
            let mut producer = Producer::new(&conn).await;
            for i in 0..DRAWS {
                producer
                    .publish(
                        &setup.names.request,
                        br#"{"pool":"hot"}"#,
                        request_props(Some(&format!("m-{i}")), None, Some(&format!("c-{i}"))),
                    )
                    .await;
            }
            producer.flush().await;
        })
    };
    let mut admin = AdminClient::new(&setup, "admin-replies").await;
    let mut corr = Vec::new();
    let mut inspections = 0;
    for k in 0..RESTOCKS_MAX {
        if k >= 20 && results.with(distinct_count) >= DRAWS {
            break;
        }
        corr.push(
            admin
                .publish_nowait(
                    r#"{"op":"restock","pool":"hot","item":"gold","add":1}"#,
                    AdminProps {
                        message_id: Some(&format!("r-{k}")),
                        ..Default::default()
                    },
                )
                .await,
        );
        tokio::time::sleep(Duration::from_millis(4)).await;
        if k % 100 == 50 {
            // Accounting beside the running worker, at whatever point it is.
            assert_accounting(&setup.inspect());
            inspections += 1;
        }
    }
    admin.flush().await;
    let restocks_sent = corr.len();
    drawing.await.expect("draw publisher");
    results
        .wait_for("every draw's result", Duration::from_secs(180), |m| {
            distinct_count(m) >= DRAWS
        })
        .await;
    let mut restocks: Vec<(u64, u64)> = Vec::new(); // (request_id, stocked after)
    for c in &corr {
        let m = admin.reply(c).await;
        assert_eq!(m.kind(), Some("admin_result"), "{}", m.json());
        let v = m.json();
        restocks.push((
            v["request_id"].as_u64().unwrap(),
            v["item"]["stocked"].as_u64().unwrap(),
        ));
    }
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    results.barrier(&conn).await;

    // Applied exactly once each, in ID order: the k-th restock by ID has stocked k.
    restocks.sort();
    for (k, (id, stocked)) in restocks.iter().enumerate() {
        assert_eq!(*stocked, k as u64 + 1, "restock {id} saw stocked {stocked}");
    }
    // Every gold unit went to a request after a restock that put it there: counting in ID
    // order, gold drawn up to a request never exceeds the restocks before it. (A request
    // accepted after a restock's reply has a higher ID than the restock.)
    let outcomes = distinct_results(&results.messages());
    assert_eq!(outcomes.len(), DRAWS);
    let mut draws: Vec<(u64, usize)> = outcomes
        .values()
        .map(|o| {
            (
                o.request_id,
                o.items.iter().filter(|i| *i == "gold").count(),
            )
        })
        .collect();
    draws.sort();
    let mut gold_drawn = 0;
    let mut gold_drawn_total = 0;
    for (id, gold) in &draws {
        gold_drawn += gold;
        gold_drawn_total += gold;
        let stocked_before = restocks.iter().filter(|(r, _)| r < id).count();
        assert!(
            gold_drawn <= stocked_before,
            "request {id}: {gold_drawn} gold drawn up to it, only {stocked_before} restocked before it"
        );
    }
    // Conservation at the end, and the gold was actually contended for.
    let inspect = setup.inspect();
    assert_accounting(&inspect);
    let gold = &pool(&inspect, "hot")["items"][0];
    assert_eq!(gold["stocked"], restocks_sent as u64);
    assert_eq!(gold["issued"], gold_drawn_total as u64, "{inspect}");
    assert!(gold_drawn_total > 0, "no gold was drawn at all");
    note(format!(
        "{DRAWS} draws, {restocks_sent} restocks, {gold_drawn_total} gold drawn, {inspections} inspections"
    ));
    drop((admin, results));
    setup.names.delete(&conn).await;
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    Failpoint(&'static str),
    DuringStartup,
    AfterMoreReplies(usize),
}

/// What the WAL says happened, across every read (reads overlap; one ID is one record).
#[derive(Default)]
struct Story {
    /// request ID → the message_id of the command applied under it.
    commands: BTreeMap<u64, String>,
    /// request ID → message_id of the draw.
    draws: BTreeMap<u64, String>,
}

impl Story {
    fn read(&mut self, setup: &Setup) {
        for r in wal_records(&setup.data_dir) {
            match r {
                Record::Admin(a) => {
                    let mid = a
                        .message_id
                        .clone()
                        .expect("test commands have message_ids");
                    if let Some(prev) = self.commands.insert(a.request_id, mid.clone()) {
                        assert_eq!(
                            prev, mid,
                            "request ID {} applied for two commands",
                            a.request_id
                        );
                    }
                }
                Record::Draw(d) => {
                    let mid = d.message_id.clone().expect("test draws have message_ids");
                    if let Some(prev) = self.draws.insert(d.request_id, mid.clone()) {
                        assert_eq!(
                            prev, mid,
                            "request ID {} drawn for two messages",
                            d.request_id
                        );
                    }
                }
                _ => {}
            }
        }
        let mut seen = HashSet::new();
        for mid in self.commands.values() {
            assert!(seen.insert(mid), "command {mid} applied twice");
        }
    }
}

/// The state the WAL's story gives (`stock` pool: gold, silver) from the config and every
/// record in order: restocks add to `stocked`, draws move `issued`. Compared with `inspect`.
fn model_from_wal(setup: &Setup) -> [(u64, u64); 2] {
    let mut stocked = [100u64, 1_000_000];
    let mut issued = [0u64, 0];
    for r in wal_records(&setup.data_dir) {
        match r {
            Record::Admin(a) => match a.op {
                AdminOp::Restock {
                    pool_index: 0,
                    item_index,
                    add,
                } => stocked[item_index as usize] += add,
                other => panic!("unexpected command in the WAL: {other:?}"),
            },
            Record::Draw(d) => {
                assert_eq!(d.pool_index, 0);
                for i in d.items {
                    issued[i as usize] += 1;
                }
            }
            _ => {}
        }
    }
    [(stocked[0], issued[0]), (stocked[1], issued[1])]
}

fn check_state_is_the_wals_story(setup: &Setup) {
    let model = model_from_wal(setup);
    let inspect = setup.inspect();
    assert_accounting(&inspect);
    let items = pool(&inspect, "stock")["items"].as_array().unwrap().clone();
    for (k, (stocked, issued)) in model.iter().enumerate() {
        assert_eq!(
            (
                items[k]["stocked"].as_u64().unwrap(),
                items[k]["issued"].as_u64().unwrap()
            ),
            (*stocked, *issued),
            "item {}: inspect vs the WAL's story",
            items[k]["id"]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_commands_and_draws_flow_applies_each_command_once_and_keeps_acked_ones() {
    let started = Instant::now();
    let conn = require_broker().await;
    let mut c = WorkerConfig::new(
        QueueType::Quorum,
        vec![PoolSpec::new(
            "stock",
            &[("gold", 100), ("silver", 1_000_000)],
        )],
    );
    // Every SIGKILL returns the unacked deliveries; RabbitMQ 3.10 counts each return.
    c.delivery_limit = Some(1000);
    // Keep every run's WAL so the story can be read from the start after each crash.
    c.storage_extra
        .push("snapshot_every_records = 10000000".into());
    c.storage_extra.push("wal_retain_bytes = 1000000000".into());
    let setup = Arc::new(Setup::new("admin_crash", c));
    let names = setup.names.clone();
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;
    let results = Collector::start(&names.result).await;
    // Replies to the commands land here; the flow task publishes with this reply_to.
    let replies = Collector::reply_queue(&names.extra("admin-replies")).await;

    // Commands and draws flow from a background task for the whole kill phase: every 10 ms
    // one restock (message_id cmd-k) and 10 draws (m-i).
    let stop = Arc::new(AtomicBool::new(false));
    let flow = {
        let (setup, stop) = (setup.clone(), stop.clone());
        let reply_to = replies.queue.clone();
        tokio::spawn(async move {
            let conn = require_broker().await;
            let mut producer = Producer::new(&conn).await;
            let mut admin = AdminClient::new(&setup, "flow-unused").await;
            let mut sent: Vec<(String, String)> = Vec::new(); // (message_id, correlation)
            let mut draws = 0usize;
            while !stop.load(Ordering::Acquire) {
                let mid = format!("cmd-{}", sent.len());
                let corr = admin
                    .publish(
                        r#"{"op":"restock","pool":"stock","item":"gold","add":1}"#,
                        AdminProps {
                            message_id: Some(&mid),
                            reply_to: Some(&reply_to),
                            ..Default::default()
                        },
                    )
                    .await;
                sent.push((mid, corr));
                for _ in 0..10 {
                    producer
                        .publish(
                            &setup.names.request,
                            br#"{"pool":"stock"}"#,
                            request_props(Some(&format!("m-{draws}")), None, None),
                        )
                        .await;
                    draws += 1;
                }
                producer.flush().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (sent, draws)
        })
    };

    let replies_seen = || replies.count_kind("admin_result");
    replies
        .wait_for("some command replies", Duration::from_secs(60), |m| {
            m.len() >= 20
        })
        .await;
    worker.kill().await;
    let mut story = Story::default();
    let mut kills = 1;
    let wait_gone =
        async |conn: &lapin::Connection| {
            wait_until("the killed worker's consumers to go", Duration::from_secs(30), async || {
            matches!(queue_state(conn, &names.request).await, Some(q) if q.consumers == 0)
                && matches!(queue_state(conn, &names.admin).await, Some(q) if q.consumers == 0)
        })
        .await;
        };
    wait_gone(&conn).await;

    let mut rng = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64)
        | 1;
    note(format!("kill plan seed {rng}"));
    let mut random = move |lo: u64, span: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        lo + rng % span
    };
    let mut plan = Vec::new();
    for round in 0..6 {
        let k = random(1, 20);
        plan.push(match round % 2 {
            0 => Kill::Failpoint(if k % 2 == 0 {
                "wal.after_sync"
            } else {
                "wal.after_write"
            }),
            _ => Kill::Failpoint("settle.before_admin_reply"),
        });
        plan.push(Kill::Failpoint("settle.before_ack"));
        plan.push(Kill::AfterMoreReplies(random(5, 40) as usize));
        if round % 2 == 1 {
            plan.push(Kill::DuringStartup);
        }
    }
    for step in plan {
        let before = replies_seen();
        match step {
            Kill::Failpoint(fp) => {
                let n = random(1, 15);
                let armed = format!("{fp}:{n}");
                let mut w = setup.start_worker(&[("REWARDPOOL_FAILPOINT", armed.as_str())]);
                let status = w.wait_exit(Duration::from_secs(120)).await;
                assert_eq!(
                    status.signal(),
                    Some(libc::SIGKILL),
                    "{armed}; log:\n{}",
                    w.log()
                );
                assert!(
                    w.log().contains(&format!("failpoint {fp}: SIGKILL")),
                    "{armed}:\n{}",
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
                w.kill().await;
            }
            Kill::AfterMoreReplies(more) => {
                let mut w = setup.start_worker(&[]);
                w.wait_ready(&conn, &names.request, Duration::from_secs(60))
                    .await;
                replies
                    .wait_for("more command replies", Duration::from_secs(120), |m| {
                        m.iter()
                            .filter(|m| m.kind() == Some("admin_result"))
                            .count()
                            >= before + more
                    })
                    .await;
                w.kill().await;
            }
        }
        kills += 1;
        wait_gone(&conn).await;
        story.read(&setup);
        check_state_is_the_wals_story(&setup);
        // Every command that has a reply is in the WAL (a reply goes out only once durable).
        let replied: Vec<u64> = replies
            .messages()
            .iter()
            .filter(|m| m.kind() == Some("admin_result"))
            .map(|m| m.json()["request_id"].as_u64().unwrap())
            .collect();
        for id in replied {
            assert!(
                story.commands.contains_key(&id),
                "command {id} replied but not in the WAL"
            );
        }
        note(format!("{step:?}: replies {before} -> {}", replies_seen()));
    }
    assert!(kills >= 20, "only {kills} kills");

    // Stop the flow, let a worker finish everything.
    stop.store(true, Ordering::Release);
    let (sent, draws) = flow.await.expect("flow task");
    let mut worker = setup.start_ready(&conn, &[]).await;
    replies
        .wait_for("every command's reply", Duration::from_secs(300), |m| {
            let got: HashSet<&str> = m.iter().filter_map(|m| m.correlation_id()).collect();
            sent.iter().all(|(_, c)| got.contains(c.as_str()))
        })
        .await;
    results
        .wait_for("every draw's result", Duration::from_secs(300), |m| {
            distinct_count(m) >= draws
        })
        .await;
    story.read(&setup);
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    check_state_is_the_wals_story(&setup);

    // Each command applied exactly once, under the ID its replies carry.
    let by_mid: HashMap<&str, u64> = story
        .commands
        .iter()
        .map(|(id, mid)| (mid.as_str(), *id))
        .collect();
    assert_eq!(by_mid.len(), sent.len(), "every command applied once");
    for (mid, corr) in &sent {
        for m in replies
            .messages()
            .iter()
            .filter(|m| m.correlation_id() == Some(corr))
        {
            assert_eq!(m.kind(), Some("admin_result"), "{mid}: {}", m.json());
            assert_eq!(
                m.json()["request_id"].as_u64(),
                Some(by_mid[mid.as_str()]),
                "{mid}"
            );
        }
    }
    let inspect = setup.inspect();
    assert_eq!(
        pool(&inspect, "stock")["items"][0]["stocked"],
        100 + sent.len() as u64
    );
    assert_eq!(
        must_queue_state(&conn, &names.dead).await.messages,
        0,
        "nothing dead-lettered"
    );
    assert_queue_drained(&conn, &names.admin).await;
    note(format!(
        "{kills} kills, {} commands, {draws} draws, {:?}",
        sent.len(),
        started.elapsed()
    ));
    drop((results, replies));
    names.delete(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_routing_exchange_an_added_pool_is_locked_and_bound_before_its_reply() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions};
    let conn = require_broker().await;
    let exchange = format!("{}.ex", Names::new("admin_shard").base);
    let mut c = config();
    c.amqp_extra.push(format!("exchange = {exchange:?}"));
    let setup = Setup::new("admin_shard", c);
    let mut worker = setup.start_ready(&conn, &[]).await;
    wait_admin_consumer(&conn, &setup).await;
    let run = setup.admin_cli(
        &[
            "add-pool",
            "--pool",
            "xmas",
            "--mode",
            "by_quantity",
            "--items-json",
            r#"[{"id":"elf","quantity":3}]"#,
        ],
        &[],
    );
    run.applied();
    // Right after the reply: a request routed by the new pool's id reaches this worker.
    let ch = op("channel.open", conn.create_channel()).await;
    op(
        "confirm.select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    let replies = Collector::reply_queue(&setup.names.extra("draw-replies")).await;
    let publish = async |mid: &str| {
        let confirm = op(
            "basic.publish",
            ch.basic_publish(
                exchange.as_str().into(),
                "xmas".into(),
                BasicPublishOptions::default(),
                b"{}",
                request_props(Some(mid), Some(&replies.queue), Some(mid)),
            ),
        )
        .await;
        assert!(op("confirm", confirm).await.is_ack());
    };
    publish("x-1").await;
    let r = result_of(&replies, "x-1").await;
    assert_eq!(
        (r["pool"].clone(), r["items"].clone()),
        (json!("xmas"), json!(["elf"]))
    );
    // The pool's broker lock is this worker's: a second connection cannot take it.
    let other = require_broker().await;
    let lock_ch = op("channel.open", other.create_channel()).await;
    let taken = rewardpool::amqp::take_lock(
        &lock_ch,
        "pool",
        &rewardpool::amqp::pool_lock_name(&exchange, "xmas"),
        5000,
    )
    .await;
    assert!(
        matches!(taken, Err(rewardpool::amqp::AmqpError::LockHeld(_))),
        "{taken:?}"
    );
    // After a restart xmas (added by add_pool, not in the config) is still served: the
    // durable state is the truth, and the worker locks and binds it again before consuming.
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    let mut worker = setup.start_ready(&conn, &[]).await;
    publish("x-2").await;
    let r = result_of(&replies, "x-2").await;
    assert_eq!(r["pool"], json!("xmas"));
    let unrouted = format!("{exchange}.unrouted");
    assert_eq!(must_queue_state(&conn, &unrouted).await.messages, 0);
    worker.stop(libc::SIGTERM, Duration::from_secs(60)).await;
    drop(replies);
    setup.names.delete(&conn).await;
    let ch = op("channel.open", conn.create_channel()).await;
    for ex in [exchange.clone(), format!("{exchange}.ae")] {
        let _ = tokio::time::timeout(
            OP_TIMEOUT,
            ch.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default()),
        )
        .await;
    }
    let _ = tokio::time::timeout(
        OP_TIMEOUT,
        ch.queue_delete(unrouted.as_str().into(), Default::default()),
    )
    .await;
}
