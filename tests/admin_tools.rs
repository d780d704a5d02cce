//! Admin commands on disk, through the engine (as the worker's ingest submits them) and the real
//! binary: `rewardpool inspect` (mode, closed, issued, stocked, weight; the config drift on
//! stderr, stdout unchanged), `rewardpool wal dump` (each command readable), `rewardpool audit`
//! (every command verified), a restart (recovery replays the commands; a snapshot holds them;
//! a repeat gets the first reply), and a rejected command (no record, its ID a gap, not
//! remembered: a retry with the same message_id is checked again).

use common::*;
use rewardpool::admin::AdminCommand;
use rewardpool::seed::PoolSeed;
use std::process::Command;

fn tool(args: &[&str], config: &std::path::Path) -> (String, String) {
    let out = Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

fn draw(n: usize) -> Step {
    Step::Draw {
        pool_index: 0,
        count: 3,
        message_id: Some(format!("d-{n}")),
    }
}

fn admin(tag: &str, command: AdminCommand) -> Step {
    Step::Admin {
        message_id: Some(tag.to_string()),
        command,
    }
}

fn restock(add: u64) -> AdminCommand {
    AdminCommand::Restock {
        pool: "default".into(),
        item: "gold".into(),
        add,
    }
}

#[test]
fn commands_show_in_inspect_wal_dump_and_audit_and_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "");
    let config = load_config(&config_path);
    let steps = vec![
        draw(0),
        admin("cmd-1", restock(5)),
        draw(1),
        admin(
            "cmd-2",
            AdminCommand::SetWeight {
                pool: "spin".into(),
                item: "car".into(),
                weight: 7,
            },
        ),
        admin(
            "cmd-3",
            AdminCommand::AddItem {
                pool: "default".into(),
                item: "platinum".into(),
                quantity: Some(2),
                weight: None,
            },
        ),
        admin(
            "cmd-4",
            AdminCommand::AddPool {
                pool: PoolSeed::from_parts(
                    "xmas",
                    rewardpool::pool::Mode::ByQuantity,
                    &[("tree".into(), Some(4), None)],
                ),
            },
        ),
        admin(
            "cmd-5",
            AdminCommand::ClosePool {
                pool: "spin".into(),
            },
        ),
        // Rejected: an unlimited item has no quantity.
        admin(
            "cmd-6",
            AdminCommand::Restock {
                pool: "spin".into(),
                item: "try_again".into(),
                add: 1,
            },
        ),
        admin(
            "cmd-7",
            AdminCommand::SetQuantity {
                pool: "default".into(),
                item: "silver".into(),
                quantity: 9,
            },
        ),
        draw(2),
    ];
    let done = run_engine(&config, true, &steps);
    let commands: Vec<&Done> = done
        .iter()
        .filter(|d| matches!(steps[d.step], Step::Admin { .. }))
        .collect();
    assert_eq!(commands.len(), 7);
    for d in &commands {
        assert!(!d.repeat);
        if d.step == 7 {
            let reason = d.rejected.as_deref().unwrap();
            assert!(reason.contains("unlimited"), "{reason}");
            assert!(d.outcome.admin.is_none());
        } else {
            assert!(d.rejected.is_none(), "{:?}", d.rejected);
            assert_eq!(d.reply()["status"], "applied");
            assert_eq!(d.reply()["request_id"], d.outcome.request_id);
        }
    }
    // IDs increase in submission order; the rejected command's ID is a gap in the WAL.
    let ids: Vec<u64> = done.iter().map(|d| d.outcome.request_id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let rejected_id = commands
        .iter()
        .find(|d| d.step == 7)
        .unwrap()
        .outcome
        .request_id;
    let records = wal_records(&data);
    assert!(!records.iter().any(|r| match r {
        rewardpool::record::Record::Admin(a) => a.request_id == rejected_id,
        rewardpool::record::Record::Draw(d) => d.request_id == rejected_id,
        _ => false,
    }));
    let restocked = commands[0].reply();
    assert_eq!(restocked["op"], "restock");
    assert_eq!(restocked["pool"], "default");
    assert_eq!(restocked["item"]["id"], "gold");
    assert_eq!(restocked["item"]["stocked"], 45);
    let gold_issued = restocked["item"]["issued"].as_u64().unwrap();
    assert_eq!(
        restocked["item"]["quantity"].as_u64().unwrap() + gold_issued,
        45
    );
    let added_pool = commands[3].reply();
    assert_eq!(added_pool["pool_state"]["id"], "xmas");
    assert_eq!(added_pool["pool_state"]["closed"], false);
    assert!(added_pool.get("item").is_none());
    assert_eq!(commands[4].reply()["pool_state"]["closed"], true);
    let set_silver = commands[6].reply();
    assert_eq!(set_silver["item"]["quantity"], 9);
    assert_eq!(
        set_silver["item"]["stocked"].as_u64().unwrap(),
        9 + set_silver["item"]["issued"].as_u64().unwrap()
    );
    check_state_with_commands(&config, &data);

    let check = |phase: &str| {
        let (stdout, stderr) = tool(&["inspect"], &config_path);
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        // stdout is the contract's JSON only (the drift goes to stderr).
        let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["epoch", "last_request_id", "pools"], "{phase}");
        let default = &v["pools"][0];
        assert_eq!(default["mode"], "by_quantity", "{phase}");
        assert_eq!(default["closed"], false, "{phase}");
        for item in default["items"].as_array().unwrap() {
            let (q, i, s) = (&item["quantity"], &item["issued"], &item["stocked"]);
            assert_eq!(
                q.as_u64().unwrap() + i.as_u64().unwrap(),
                s.as_u64().unwrap(),
                "{phase}: {item}"
            );
            assert_eq!(item["weight"], serde_json::Value::Null);
        }
        assert_eq!(default["items"][0]["stocked"], 45, "{phase}");
        assert_eq!(
            default["items"][1]["stocked"], set_silver["item"]["stocked"],
            "{phase}"
        );
        assert_eq!(default["items"][3]["id"], "platinum", "{phase}: added last");
        assert_eq!(default["items"][3]["stocked"], 2);
        let spin = &v["pools"][1];
        assert_eq!(spin["mode"], "by_weight", "{phase}");
        assert_eq!(spin["closed"], true, "{phase}");
        assert_eq!(spin["items"][0]["weight"], 7, "{phase}");
        assert_eq!(spin["items"][2]["quantity"], serde_json::Value::Null);
        assert_eq!(spin["items"][2]["stocked"], serde_json::Value::Null);
        assert_eq!(v["pools"][2]["id"], "xmas", "{phase}");
        assert_eq!(v["pools"][2]["items"][0]["quantity"], 4);
        // Drift, one line each: pool, item, field, config value, durable value.
        for want in [
            "pool \"default\" item \"gold\" field quantity: config 40, durable 45",
            "pool \"default\" item \"silver\" field quantity: config 400, durable ",
            "pool \"default\" item \"platinum\" field item: config absent, durable present",
            "pool \"spin\" item \"car\" field weight: config 1, durable 7",
            "pool \"spin\" field closed: config false, durable true",
            "pool \"xmas\" field pool: config absent, durable present",
        ] {
            assert!(stderr.contains(want), "{phase}: no {want:?} in\n{stderr}");
        }
        assert_eq!(
            stderr.lines().filter(|l| l.contains(" field ")).count(),
            6,
            "{phase}: one line per difference:\n{stderr}"
        );
    };
    check("after the commands");

    let (dump, _) = tool(&["wal", "dump"], &config_path);
    for want in [
        "admin request_id=",
        "message_id=\"cmd-1\" op=restock pool=\"default\" item=\"gold\" add=5",
        "op=set_weight pool=\"spin\" item=\"car\" weight=7",
        "op=add_item pool=\"default\" item=\"platinum\" quantity=2 weight=none",
        "op=add_pool pool=\"xmas\" index=2 mode=by_quantity items=1 [tree:4]",
        "op=close_pool pool=\"spin\"",
        "op=set_quantity pool=\"default\" item=\"silver\" quantity=9",
    ] {
        assert!(dump.contains(want), "wal dump lacks {want:?}:\n{dump}");
    }
    assert_eq!(
        dump.matches(" admin ").count(),
        6,
        "the rejected command is no record:\n{dump}"
    );

    let (audit, _) = tool(&["audit"], &config_path);
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(audit["verified_commands"], 6, "{audit}");
    assert_eq!(audit["verified_draws"], 3, "{audit}");
    assert_eq!(audit["mismatches"], 0, "{audit}");

    // A restart replays the commands (and snapshots them); a repeat of a command's message_id
    // ("cmd-1", the restock) is not applied again and gets the first reply. The rejected
    // command's message_id was not remembered: the same command is checked again (rejected
    // again), and another command under it applies.
    let again = run_engine(
        &config,
        true,
        &[
            draw(3),
            admin("cmd-1", restock(1)),
            admin(
                "cmd-6",
                AdminCommand::Restock {
                    pool: "spin".into(),
                    item: "try_again".into(),
                    add: 1,
                },
            ),
            admin(
                "cmd-6",
                AdminCommand::OpenPool {
                    pool: "spin".into(),
                },
            ),
            admin(
                "cmd-6",
                AdminCommand::ClosePool {
                    pool: "spin".into(),
                },
            ),
        ],
    );
    assert_eq!(again.len(), 5);
    assert!(again[1].repeat && again[1].rejected.is_none());
    assert_eq!(again[1].reply(), restocked, "a repeat gets the first reply");
    assert_eq!(again[1].outcome.request_id, commands[0].outcome.request_id);
    assert!(
        !again[2].repeat && again[2].rejected.is_some(),
        "checked again"
    );
    assert!(
        !again[3].repeat && again[3].rejected.is_none(),
        "applied now"
    );
    assert_eq!(again[3].reply()["op"], "open_pool");
    // ... and now it is remembered: the close under the same message_id is a repeat.
    assert!(again[4].repeat);
    assert_eq!(again[4].reply()["op"], "open_pool");
    check_state_with_commands(&config, &data);
    let (stdout, _) = tool(&["inspect"], &config_path);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["pools"][1]["closed"], false);
}

#[test]
fn a_draw_on_a_closed_pool_is_closed_and_its_repeat_stays_closed_after_reopening() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "");
    let config = load_config(&config_path);
    let close = AdminCommand::ClosePool {
        pool: "default".into(),
    };
    let open = AdminCommand::OpenPool {
        pool: "default".into(),
    };
    let done = run_engine(
        &config,
        true,
        &[
            admin("c", close),
            draw(0),
            admin("o", open),
            draw(0),
            draw(1),
        ],
    );
    assert_eq!(done[1].outcome.status(), "closed");
    assert!(done[1].outcome.items.is_empty());
    assert!(done[3].repeat);
    assert_eq!(done[3].outcome.status(), "closed", "the first outcome");
    assert_eq!(done[4].outcome.status(), "won");
    // Across a restart too (window from snapshot + WAL).
    let again = run_engine(&config, true, &[draw(0)]);
    assert!(again[0].repeat);
    assert_eq!(again[0].outcome.status(), "closed");
    assert_eq!(again[0].outcome.request_id, done[1].outcome.request_id);
    // The closed draw is a record with no items, and the audit agrees.
    let (audit, _) = tool(&["audit"], &config_path);
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(audit["mismatches"], 0, "{audit}");
    assert_eq!(audit["verified_commands"], 2, "{audit}");
    assert_eq!(audit["verified_draws"], 2, "{audit}");
}

/// Commands keep their own window (of `dedupe_window` entries), apart from the draws': with a
/// window of 2, two commands between draws must not push a draw out of the engine's window
/// while admission (which never sees command keys) still holds it; and a draw may use a
/// command's message_id (different queues) without either being taken for the other.
#[test]
fn commands_and_draws_keep_separate_windows_in_step_with_admission() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "dedupe_window = 2");
    let config = load_config(&config_path);
    let named = |m: &str| Step::Draw {
        pool_index: 0,
        count: 1,
        message_id: Some(m.to_string()),
    };
    let done = run_engine(
        &config,
        true,
        &[
            named("a"),
            named("b"),
            admin("c1", restock(1)),
            admin("c2", restock(2)),
            named("a"),
            named("c1"),
            admin("c1", restock(3)),
            admin("c2", restock(4)),
        ],
    );
    assert_eq!(done.len(), 8);
    assert!(!done[0].repeat && !done[1].repeat);
    assert!(!done[2].repeat && !done[3].repeat);
    assert!(done[4].repeat, "draw a is still in both draw windows");
    assert_eq!(done[4].outcome.request_id, done[0].outcome.request_id);
    assert!(
        !done[5].repeat && done[5].outcome.admin.is_none(),
        "a new draw"
    );
    assert!(done[6].repeat && done[7].repeat);
    assert_eq!(done[6].reply(), done[2].reply());
    assert_eq!(done[7].reply(), done[3].reply());
    // Across a restart: both windows come back from the snapshot.
    let again = run_engine(&config, true, &[named("c1"), admin("c1", restock(5))]);
    assert!(again[0].repeat && again[0].outcome.admin.is_none());
    assert_eq!(again[0].outcome.request_id, done[5].outcome.request_id);
    assert!(again[1].repeat);
    assert_eq!(again[1].reply(), done[2].reply());
    check_state_with_commands(&config, &data);
}
