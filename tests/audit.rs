//! `rewardpool audit` and the independent verifier (examples/verify/verify.py) on real data
//! directories written by the engine (the drill: both modes, count 1..=3, an unlimited item),
//! with SIGKILLs and restarts between runs, and on tampered copies: a WAL record re-framed
//! with valid checksums but a wrong item, an epoch record removed, a changed item in a bundle.
//! And a log with every admin command (restocks with draws after them, a closed pool, items
//! and a pool added, a restart): audit and verify.py verify it; a re-framed command that does
//! not apply, items drawn from a closed pool and a changed command in a bundle are caught.

use common::*;
use rewardpool::record::{self, Record};
use rewardpool::wal::{self, BATCH_HEADER_BYTES, BatchBuilder};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rewardpool"));
    c.env("RUST_LOG", "warn");
    c
}

fn drill(config: &Path, first: u64, requests: u64) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rewardpool-drill"));
    c.env("RUST_LOG", "warn")
        .args(["--keep-all-wal", "--quiet", "--config"])
        .arg(config)
        .args([
            "--first",
            &first.to_string(),
            "--requests",
            &requests.to_string(),
        ]);
    c
}

fn drill_ok(config: &Path, first: u64, requests: u64) {
    let out = drill(config, first, requests).output().unwrap();
    assert!(
        out.status.success(),
        "drill failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the drill without --quiet and SIGKILLs it after `done` lines.
fn drill_killed(config: &Path, first: u64, done: usize) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rewardpool-drill"));
    c.env("RUST_LOG", "warn")
        .args(["--keep-all-wal", "--config"])
        .arg(config)
        .args(["--first", &first.to_string(), "--requests", "1000000"])
        .stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let mut seen = 0;
    for line in reader.lines() {
        if line.unwrap().starts_with("done ") {
            seen += 1;
            if seen == done {
                break;
            }
        }
    }
    assert_eq!(seen, done, "the drill ended early");
    child.kill().unwrap();
    child.wait().unwrap();
}

fn audit(config: &Path, data: Option<&Path>, export: Option<&Path>) -> (Output, serde_json::Value) {
    let mut c = bin();
    c.args(["audit", "--config"]).arg(config);
    if let Some(data) = data {
        c.arg("--data-dir").arg(data);
    }
    if let Some(export) = export {
        c.arg("--export").arg(export);
    }
    let out = c.output().unwrap();
    let summary = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "audit printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, summary)
}

fn verify_py(bundle: &Path) -> (Output, serde_json::Value) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/verify/verify.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(bundle)
        .output()
        .expect("python3 runs (.ci/run installs it)");
    let summary = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, summary)
}

/// A directory with a drill history: runs across epochs (`seed_epoch_records = 50`), a
/// SIGKILL mid-run, and restarts; every segment kept.
fn history() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = write_config(tmp.path(), &data, "seed_epoch_records = 50");
    drill_ok(&config, 0, 300);
    drill_killed(&config, 300, 250);
    drill_ok(&config, 200, 300);
    drill_ok(&config, 500, 10);
    (tmp, data, config)
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Offsets of every record of the WAL: (segment, record offset, batch offset, batch index in
/// segment order, record).
fn records(data: &Path) -> Vec<(PathBuf, u64, u64, Record)> {
    let mut out = Vec::new();
    for seg in wal::list_segments(data).unwrap() {
        let bytes = fs::read(&seg.path).unwrap();
        wal::scan::<()>(&bytes, |batch| {
            let mut at = batch.offset + BATCH_HEADER_BYTES as u64;
            for r in batch.records {
                let mut buf = Vec::new();
                record::encode(&mut buf, &r);
                out.push((seg.path.clone(), at, batch.offset, r));
                at += buf.len() as u64;
            }
            Ok(())
        })
        .unwrap();
    }
    out
}

/// Rewrites the batch at `offset` of `segment` with `edit` applied to its records, framed
/// again with valid checksums (what an attacker with write access could do).
fn reframe(segment: &Path, offset: u64, edit: impl FnOnce(&mut Vec<Record>)) {
    let bytes = fs::read(segment).unwrap();
    let batch = wal::parse_batch(&bytes, offset as usize).unwrap();
    let mut records = batch.records;
    edit(&mut records);
    let mut builder = BatchBuilder::new();
    for r in &records {
        builder.push_record(r);
    }
    let new = builder.finish(batch.seq);
    let start = offset as usize;
    let end = start + batch.len_bytes as usize;
    let mut out = bytes[..start].to_vec();
    out.extend_from_slice(&new);
    out.extend_from_slice(&bytes[end..]);
    fs::write(segment, out).unwrap();
}

#[test]
fn audit_and_the_python_verifier_agree_on_a_history_with_kills_and_restarts() {
    let (tmp, data, config) = history();
    let drawn = wal_draws(&data);
    let bundle = tmp.path().join("bundle.jsonl");
    let (out, summary) = audit(&config, None, Some(&bundle));
    assert!(
        out.status.success(),
        "{summary} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(u(&summary, "verified_draws"), drawn.len() as u64);
    assert_eq!(u(&summary, "mismatches"), 0);
    assert_eq!(u(&summary, "first_request_id"), drawn[0].request_id);
    assert_eq!(
        u(&summary, "last_request_id"),
        drawn.last().unwrap().request_id
    );
    // 4 starts, each a new epoch, and one more after every 50 draws of a run.
    assert!(
        u(&summary, "epochs") >= (drawn.len() as u64 / 50).max(4),
        "{summary}"
    );
    assert!(drawn.iter().any(|d| d.count > 1 && d.items.len() > 1));

    // Files are the owner's only: they hold the secrets.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for e in fs::read_dir(&data).unwrap() {
        let mode = e.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "group/other access: {mode:o}");
    }

    // The verifier re-derives every draw of the ended epochs; the running one's are applied.
    let (py, py_summary) = verify_py(&bundle);
    assert!(
        py.status.success(),
        "{py_summary} {}",
        String::from_utf8_lossy(&py.stderr)
    );
    let verified = u(&py_summary, "verified_draws");
    let unverified = u(&py_summary, "unverified_draws");
    assert_eq!(verified + unverified, drawn.len() as u64);
    assert!(unverified <= 50 && verified > 0, "{py_summary}");
    assert_eq!(u(&py_summary, "first_request_id"), drawn[0].request_id);

    // inspect shows the current epoch and its commitment.
    let out = bin()
        .args(["inspect", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let inspect: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(u(&inspect["epoch"], "number"), u(&summary, "last_epoch"));
    assert_eq!(inspect["epoch"]["commitment"].as_str().unwrap().len(), 64);

    // A bundle with one item changed: the verifier names the line and the request.
    let text = fs::read_to_string(&bundle).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let (at, draw) = lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["type"] == "draw" && v["pool_index"] == 0 && v["items"].as_array()?.len() == 1)
                .then_some((i, v))
        })
        .expect("a one-item draw of pool 0 (gold/silver) early in the bundle");
    let mut changed = draw.clone();
    changed["items"][0] = serde_json::json!(draw["items"][0].as_u64().unwrap() ^ 1);
    lines[at] = changed.to_string();
    let tampered = tmp.path().join("tampered.jsonl");
    fs::write(&tampered, lines.join("\n")).unwrap();
    let (py, py_summary) = verify_py(&tampered);
    assert_eq!(py.status.code(), Some(1), "{py_summary}");
    let reason = py_summary["first_mismatch"].as_str().unwrap();
    let rid = u(&draw, "request_id");
    assert!(
        reason.contains(&format!("line {}", at + 1)) && reason.contains(&format!("request {rid}")),
        "{reason}"
    );
}

#[test]
fn a_reframed_record_with_a_wrong_item_is_named_by_file_offset_and_request() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = write_config(tmp.path(), &data, "seed_epoch_records = 50");
    drill_ok(&config, 0, 200);
    // A by_quantity draw of one item in a pool with two items in stock: swap the item.
    let all = records(&data);
    let (segment, record_at, batch_at, request_id) = all
        .iter()
        .find_map(|(seg, at, batch, r)| match r {
            Record::Draw(d) if d.pool_index == 0 && d.items.len() == 1 && d.request_id > 20 => {
                Some((seg.clone(), *at, *batch, d.request_id))
            }
            _ => None,
        })
        .unwrap();
    reframe(&segment, batch_at, |records| {
        for r in records.iter_mut() {
            if let Record::Draw(d) = r
                && d.request_id == request_id
            {
                d.items[0] ^= 1;
            }
        }
    });
    // Recovery accepts it (checksums hold, the item was in stock): only the audit sees it.
    let (out, summary) = audit(&config, None, None);
    assert_eq!(out.status.code(), Some(1), "{summary}");
    assert_eq!(u(&summary, "mismatches"), 1);
    let m = &summary["first_mismatch"];
    assert_eq!(m["file"].as_str().unwrap(), segment.display().to_string());
    assert_eq!(u(m, "offset"), record_at);
    assert_eq!(u(m, "request_id"), request_id);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{} at byte offset {record_at} (request {request_id})",
            segment.display()
        )),
        "{stderr}"
    );
    assert!(u(&summary, "verified_draws") < 200);
}

#[test]
fn a_removed_epoch_record_is_reported_with_its_location() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = write_config(tmp.path(), &data, "seed_epoch_records = 50");
    drill_ok(&config, 0, 200);
    let all = records(&data);
    // The third epoch's record: draws after it now meet the second epoch's secret.
    let (segment, batch_at, number) = all
        .iter()
        .filter_map(|(seg, _, batch, r)| match r {
            Record::Epoch(e) => Some((seg.clone(), *batch, e.number)),
            _ => None,
        })
        .nth(2)
        .unwrap();
    let first_draw_after = all
        .iter()
        .skip_while(|(_, _, _, r)| !matches!(r, Record::Epoch(e) if e.number == number))
        .find_map(|(_, _, _, r)| match r {
            Record::Draw(d) => Some(d.request_id),
            _ => None,
        })
        .unwrap();
    reframe(&segment, batch_at, |records| {
        records.retain(|r| !matches!(r, Record::Epoch(e) if e.number == number));
    });
    let (out, summary) = audit(&config, None, None);
    assert_eq!(out.status.code(), Some(1), "{summary}");
    let m = &summary["first_mismatch"];
    assert_eq!(m["file"].as_str().unwrap(), segment.display().to_string());
    // The first draw that the wrong secret does not reproduce: at or after the removed epoch.
    assert!(u(m, "request_id") >= first_draw_after, "{summary}");
    assert!(u(m, "offset") >= batch_at);
    assert_eq!(u(&summary, "epochs"), 2);
}

#[test]
fn audit_of_a_pruned_directory_starts_at_the_oldest_snapshot_and_wal_retain_bytes_keeps_history() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = write_config(tmp.path(), &data, "seed_epoch_records = 70");
    for first in [0, 300, 600] {
        let out = Command::new(env!("CARGO_BIN_EXE_rewardpool-drill"))
            .env("RUST_LOG", "warn")
            .args(["--quiet", "--config"])
            .arg(&config)
            .args(["--first", &first.to_string(), "--requests", "300"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let (out, summary) = audit(&config, None, None);
    assert!(out.status.success(), "{summary}");
    assert!(u(&summary, "from_snapshot_seq") > 0, "{summary}");
    assert!(u(&summary, "first_request_id") > 1, "{summary}");

    // storage.wal_retain_bytes keeps the history snapshots made unnecessary: all of it here.
    let kept = tmp.path().join("kept");
    fs::create_dir_all(&kept).unwrap();
    let kept_data = kept.join("data");
    let kept_config = write_config(
        &kept,
        &kept_data,
        "seed_epoch_records = 70\nwal_retain_bytes = 100000000",
    );
    for first in [0, 300, 600] {
        let out = Command::new(env!("CARGO_BIN_EXE_rewardpool-drill"))
            .env("RUST_LOG", "warn")
            .args(["--quiet", "--config"])
            .arg(&kept_config)
            .args(["--first", &first.to_string(), "--requests", "300"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let (out, kept_summary) = audit(&kept_config, None, None);
    assert!(out.status.success(), "{kept_summary}");
    assert_eq!(u(&kept_summary, "from_snapshot_seq"), 0, "{kept_summary}");
    assert_eq!(u(&kept_summary, "first_request_id"), 1, "{kept_summary}");
    assert_eq!(u(&kept_summary, "verified_draws"), 900);
    // An empty directory audits to nothing, and is not created.
    let empty = tmp.path().join("nothing");
    let (out, summary) = audit(&config, Some(&empty), None);
    assert!(out.status.success());
    assert_eq!(u(&summary, "verified_draws"), 0);
    assert!(!empty.exists());
}

/// Every op, draws between them (a closed pool among them), a restart, more draws.
fn admin_history() -> (tempfile::TempDir, PathBuf, PathBuf, usize) {
    use rewardpool::admin::AdminCommand as C;
    use rewardpool::seed::{Mode, PoolSeed};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "seed_epoch_records = 20");
    let config = load_config(&config_path);
    let mut n = 0;
    let mut draws = |pool: u32, k: usize| -> Vec<Step> {
        (0..k)
            .map(|_| {
                n += 1;
                Step::Draw {
                    pool_index: pool,
                    count: 1 + (n % 3) as u32,
                    message_id: Some(format!("m-{n}")),
                }
            })
            .collect()
    };
    let admin = |tag: &str, command: C| Step::Admin {
        message_id: Some(tag.to_string()),
        command,
    };
    let mut steps = draws(0, 15);
    steps.extend(draws(1, 15));
    steps.push(admin(
        "restock",
        C::Restock {
            pool: "default".into(),
            item: "gold".into(),
            add: 25,
        },
    ));
    steps.extend(draws(0, 15));
    steps.push(admin(
        "set-quantity",
        C::SetQuantity {
            pool: "default".into(),
            item: "silver".into(),
            quantity: 3,
        },
    ));
    steps.push(admin(
        "set-weight",
        C::SetWeight {
            pool: "spin".into(),
            item: "car".into(),
            weight: 400,
        },
    ));
    steps.push(admin(
        "add-item",
        C::AddItem {
            pool: "spin".into(),
            item: "hat".into(),
            quantity: None,
            weight: Some(50),
        },
    ));
    steps.extend(draws(1, 15));
    steps.push(admin(
        "add-pool",
        C::AddPool {
            pool: PoolSeed::from_parts(
                "xmas",
                Mode::ByQuantity,
                &[
                    ("tree".into(), Some(6), None),
                    ("star".into(), Some(30), None),
                ],
            ),
        },
    ));
    steps.extend(draws(2, 10));
    steps.push(admin(
        "close",
        C::ClosePool {
            pool: "spin".into(),
        },
    ));
    steps.extend(draws(1, 5));
    steps.push(admin(
        "open",
        C::OpenPool {
            pool: "spin".into(),
        },
    ));
    steps.extend(draws(1, 10));
    let applied = steps
        .iter()
        .filter(|s| matches!(s, Step::Admin { .. }))
        .count();
    let done = run_engine(&config, true, &steps);
    assert!(done.iter().all(|d| d.rejected.is_none()));
    assert!(done.iter().any(|d| d.outcome.closed));
    // A restart: a new epoch, another restock, more draws everywhere.
    let mut more = vec![admin(
        "restock-2",
        C::Restock {
            pool: "xmas".into(),
            item: "tree".into(),
            add: 4,
        },
    )];
    more.extend(draws(2, 10));
    more.extend(draws(0, 30));
    run_engine(&config, true, &more);
    (tmp, data, config_path, applied + 1)
}

#[test]
fn a_log_with_every_admin_command_verifies_in_audit_and_verify_py() {
    let (tmp, data, config, commands) = admin_history();
    let drawn = wal_draws(&data);
    let bundle = tmp.path().join("bundle.jsonl");
    let (out, summary) = audit(&config, None, Some(&bundle));
    assert!(
        out.status.success(),
        "{summary} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(u(&summary, "verified_draws"), drawn.len() as u64);
    assert_eq!(u(&summary, "verified_commands"), commands as u64);
    assert_eq!(u(&summary, "mismatches"), 0);
    let text = fs::read_to_string(&bundle).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["version"], 2);
    assert_eq!(
        lines.iter().filter(|l| l["type"] == "command").count(),
        commands
    );
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "pool" && l["closed"] == true),
        "a closed pool is restated as closed"
    );

    let (py, py_summary) = verify_py(&bundle);
    assert!(
        py.status.success(),
        "{py_summary} {}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(u(&py_summary, "verified_commands"), commands as u64);
    assert_eq!(
        u(&py_summary, "verified_draws") + u(&py_summary, "unverified_draws"),
        drawn.len() as u64
    );
    assert!(u(&py_summary, "verified_draws") > 100, "{py_summary}");

    // A changed command in the bundle (restock 25 → 26): the pool the audit restated after
    // it no longer matches the verifier's, named by line and request.
    let mut tampered: Vec<serde_json::Value> = lines.clone();
    let at = tampered
        .iter()
        .position(|l| l["type"] == "command" && l["op"] == "restock")
        .unwrap();
    tampered[at]["add"] = serde_json::json!(26);
    let rid = u(&tampered[at], "request_id");
    let path = tmp.path().join("tampered.jsonl");
    let text: Vec<String> = tampered.iter().map(|l| l.to_string()).collect();
    fs::write(&path, text.join("\n")).unwrap();
    let (py, py_summary) = verify_py(&path);
    assert_eq!(py.status.code(), Some(1), "{py_summary}");
    let reason = py_summary["first_mismatch"].as_str().unwrap();
    assert!(reason.contains(&format!("line {}", at + 2)), "{reason}");
    assert!(reason.contains("after the command"), "{reason}");
    let _ = rid;
}

#[test]
fn a_reframed_command_that_does_not_apply_and_items_from_a_closed_pool_are_caught() {
    let (_tmp, data, config, _) = admin_history();
    let all = records(&data);
    // The restock, re-framed onto spin's unlimited item (valid checksums): not a legal command.
    let (segment, record_at, batch_at, request_id) = all
        .iter()
        .find_map(|(seg, at, batch, r)| match r {
            Record::Admin(a) if a.op.name() == "restock" => {
                Some((seg.clone(), *at, *batch, a.request_id))
            }
            _ => None,
        })
        .unwrap();
    let original = fs::read(&segment).unwrap();
    reframe(&segment, batch_at, |records| {
        for r in records.iter_mut() {
            if let Record::Admin(a) = r
                && a.request_id == request_id
            {
                a.op = rewardpool::record::AdminOp::Restock {
                    pool_index: 1,
                    item_index: 2,
                    add: 25,
                };
            }
        }
    });
    let (out, summary) = audit(&config, None, None);
    assert_eq!(out.status.code(), Some(1), "{summary}");
    let m = &summary["first_mismatch"];
    assert_eq!(m["file"].as_str().unwrap(), segment.display().to_string());
    assert_eq!(u(m, "offset"), record_at);
    assert_eq!(u(m, "request_id"), request_id);
    assert!(
        m["reason"].as_str().unwrap().contains("unlimited"),
        "{summary}"
    );
    fs::write(&segment, &original).unwrap();
    let (out, summary) = audit(&config, None, None);
    assert!(out.status.success(), "restored: {summary}");

    // A draw on the closed pool, re-framed with an item: the audit names it.
    let close_id = all
        .iter()
        .find_map(|(_, _, _, r)| match r {
            Record::Admin(a) if a.op.name() == "close_pool" => Some(a.request_id),
            _ => None,
        })
        .unwrap();
    let (segment, record_at, batch_at, request_id) = all
        .iter()
        .find_map(|(seg, at, batch, r)| match r {
            Record::Draw(d) if d.request_id > close_id && d.pool_index == 1 => {
                assert!(d.items.is_empty(), "a draw on a closed pool has no items");
                Some((seg.clone(), *at, *batch, d.request_id))
            }
            _ => None,
        })
        .unwrap();
    reframe(&segment, batch_at, |records| {
        for r in records.iter_mut() {
            if let Record::Draw(d) = r
                && d.request_id == request_id
            {
                d.items = vec![1];
            }
        }
    });
    let (out, summary) = audit(&config, None, None);
    assert_eq!(out.status.code(), Some(1), "{summary}");
    let m = &summary["first_mismatch"];
    assert_eq!(u(m, "offset"), record_at);
    assert_eq!(u(m, "request_id"), request_id);
    assert!(
        m["reason"].as_str().unwrap().contains("closed"),
        "{summary}"
    );
}
