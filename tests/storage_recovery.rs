//! Recovery from damaged data directories, on the real file system: torn tails at every byte
//! of the last batch, corruption in the middle, corrupt snapshots, missing history, a full
//! disk at start and during a run, a second process on the same directory.

use common::Tmpfs;
use common::*;
use rewardpool::recovery::{self, RecoveryError};
use rewardpool::wal::{self, ScanEnd};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rewardpool"));
    c.env("RUST_LOG", "warn");
    c
}

fn drill_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rewardpool-drill"));
    c.env("RUST_LOG", "warn");
    c
}

/// Runs the drill to completion (clean stop) with every WAL segment kept.
fn drill_ok(config: &Path, first: u64, requests: u64) {
    let out = drill_bin()
        .args(["--keep-all-wal", "--quiet", "--config"])
        .arg(config)
        .args([
            "--first",
            &first.to_string(),
            "--requests",
            &requests.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "drill failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "LOCK" {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// (segment path, offset, length) of the last batch in the WAL.
fn last_batch(data: &Path) -> (PathBuf, u64, u64, u64) {
    let mut last = None;
    for seg in wal::list_segments(data).unwrap() {
        let bytes = fs::read(&seg.path).unwrap();
        let end = wal::scan::<()>(&bytes, |b| {
            last = Some((seg.path.clone(), b.offset, b.len_bytes, b.seq));
            Ok(())
        })
        .unwrap();
        assert_eq!(end, ScanEnd::Clean);
    }
    last.expect("the WAL has batches")
}

/// Deletes snapshots covering batch `seq` or later, so the WAL tail is what recovery replays.
fn drop_snapshots_from(data: &Path, seq: u64) {
    for (s, path) in rewardpool::snapshot::list(data).unwrap() {
        if s >= seq {
            fs::remove_file(path).unwrap();
        }
    }
}

fn setup(requests: u64) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = write_config(tmp.path(), &data, "");
    drill_ok(&config, 0, requests);
    (tmp, data, config)
}

#[test]
fn torn_tail_at_every_byte_of_the_last_batch_loses_exactly_that_batch() {
    let (tmp, data, config_path) = setup(700);
    let config = load_config(&config_path);
    // A small last batch: one more request after the clean run.
    drill_ok(&config_path, 100_000, 1);
    let (segment, offset, len, seq) = last_batch(&data);
    drop_snapshots_from(&data, seq);
    let all = wal_draws(&data);
    let last_batch_draws = {
        let bytes = fs::read(&segment).unwrap();
        wal::parse_batch(&bytes, offset as usize)
            .unwrap()
            .records
            .iter()
            .filter(|r| matches!(r, rewardpool::record::Record::Draw(_)))
            .count()
    };
    assert!(last_batch_draws >= 1);
    let kept = &all[..all.len() - last_batch_draws];
    let name = segment.file_name().unwrap();
    let mut cases = 0;
    // Cut at every offset inside the batch, and also damage (not cut) its last byte.
    for cut in (offset..offset + len).chain(std::iter::once(u64::MAX)) {
        let copy = tmp.path().join(format!("cut-{cut}"));
        copy_dir(&data, &copy);
        let seg = copy.join(name);
        if cut == u64::MAX {
            let mut bytes = fs::read(&seg).unwrap();
            let at = (offset + len - 1) as usize;
            bytes[at] ^= 0x55;
            fs::write(&seg, bytes).unwrap();
        } else {
            let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
            f.set_len(cut).unwrap();
        }
        let mut cfg = config.clone();
        cfg.storage.data_dir = copy.clone();
        let recovered = recovery::recover(&cfg, true)
            .unwrap_or_else(|e| panic!("cut at {cut}: recovery failed: {e}"));
        assert_eq!(
            recovered.state.seq,
            seq - 1,
            "cut at {cut}: exactly the last batch is lost"
        );
        drop(recovered);
        // The truncated segment now ends where the lost batch started.
        assert_eq!(fs::metadata(&seg).unwrap().len(), offset, "cut at {cut}");
        check_state(&cfg, &copy, kept);
        fs::remove_dir_all(&copy).unwrap();
        cases += 1;
    }
    assert!(cases > 20);
}

#[test]
fn corruption_followed_by_valid_batches_refuses_to_start_naming_file_and_offset() {
    let (_tmp, data, config_path) = setup(2000);
    let config = load_config(&config_path);
    // Damage a batch in the middle of a segment that has valid batches after it.
    let mut target = None;
    for seg in wal::list_segments(&data).unwrap() {
        let bytes = fs::read(&seg.path).unwrap();
        let mut batches = vec![];
        wal::scan::<()>(&bytes, |b| {
            batches.push((b.offset, b.len_bytes));
            Ok(())
        })
        .unwrap();
        if batches.len() >= 3 {
            target = Some((seg.path.clone(), batches[1]));
            break;
        }
    }
    let (path, (offset, len)) = target.expect("a segment with 3 batches");
    let mut bytes = fs::read(&path).unwrap();
    bytes[(offset + len / 2) as usize] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    drop_snapshots_from(&data, 1);

    let err = match recovery::recover(&config, true) {
        Err(e) => e,
        Ok(_) => panic!("recovery must refuse"),
    };
    assert!(matches!(err, RecoveryError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("offset {offset}")), "{msg}");
    // And through the binary: non-zero exit, the same message on stderr, nothing changed.
    let before = fs::read(&path).unwrap();
    let out = bin()
        .args(["inspect", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("corrupt") && stderr.contains(&format!("offset {offset}")),
        "{stderr}"
    );
    assert_eq!(fs::read(&path).unwrap(), before);
}

#[test]
fn corrupt_newest_snapshot_falls_back_to_the_older_one_with_nothing_lost() {
    // Default pruning (WAL kept from the older snapshot on), many snapshots taken.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "");
    let config = load_config(&config_path);
    let out = drill_bin()
        .args(["--quiet", "--config"])
        .arg(&config_path)
        .args(["--requests", "3000"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = rewardpool::inspect::inspect(&config, &data).unwrap();
    let snapshots = rewardpool::snapshot::list(&data).unwrap();
    assert_eq!(snapshots.len(), 2, "the newest two are kept");
    let newest = &snapshots[0].1;
    let mut bytes = fs::read(newest).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x01;
    fs::write(newest, bytes).unwrap();

    assert_eq!(
        rewardpool::inspect::inspect(&config, &data).unwrap(),
        expected
    );
    let recovered = recovery::recover(&config, false).expect("falls back");
    assert_eq!(recovered.report.bad_snapshots.len(), 1);
    assert_eq!(
        recovered.report.snapshot.as_ref().unwrap().0,
        snapshots[1].0
    );
    drop(recovered);
    assert!(
        newest.with_extension("json.corrupt").exists(),
        "moved aside, not deleted"
    );
    assert_eq!(
        rewardpool::inspect::inspect(&config, &data).unwrap(),
        expected
    );
}

#[test]
fn missing_history_refuses_instead_of_losing_data() {
    let (_tmp, data, config_path) = setup(3000);
    let config = load_config(&config_path);
    // Without snapshots, the WAL must reach back to batch 1; remove its first segment.
    for (_, path) in rewardpool::snapshot::list(&data).unwrap() {
        fs::remove_file(path).unwrap();
    }
    let first = wal::list_segments(&data).unwrap().remove(0);
    fs::remove_file(&first.path).unwrap();
    let err = match recovery::recover(&config, true) {
        Err(e) => e,
        Ok(_) => panic!("must refuse"),
    };
    assert!(matches!(err, RecoveryError::Gap { .. }), "{err}");
    assert!(err.to_string().contains("data would be lost"), "{err}");
}

#[test]
fn inspect_and_wal_dump_change_no_file() {
    let (_tmp, data, config_path) = setup(500);
    let snapshot_of = |dir: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot_of(&data);
    let out = bin()
        .args(["inspect", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pools"][0]["id"], "default");
    assert_eq!(
        v["pools"][1]["items"][2]["quantity"],
        serde_json::Value::Null
    );
    assert!(v["last_request_id"].as_u64().unwrap() >= 500);
    let dump = bin()
        .args(["wal", "dump", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(dump.status.success());
    let text = String::from_utf8_lossy(&dump.stdout);
    assert_eq!(text.lines().filter(|l| l.contains(" draw ")).count(), 500);
    assert!(
        text.lines()
            .next()
            .unwrap()
            .contains("seed pool=\"default\"")
    );
    assert_eq!(snapshot_of(&data), before);
}

#[test]
fn inspect_on_an_empty_or_missing_data_dir_shows_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("nothing-here");
    let config_path = write_config(tmp.path(), &data, "");
    let out = bin()
        .args(["inspect", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"pools": [
            {"id": "default", "mode": "by_quantity", "closed": false, "items": [
                {"id": "gold", "quantity": 40, "issued": 0, "stocked": 40, "weight": null},
                {"id": "silver", "quantity": 400, "issued": 0, "stocked": 400, "weight": null},
                {"id": "bronze", "quantity": 4000, "issued": 0, "stocked": 4000, "weight": null}]},
            {"id": "spin", "mode": "by_weight", "closed": false, "items": [
                {"id": "car", "quantity": 3, "issued": 0, "stocked": 3, "weight": 1},
                {"id": "voucher", "quantity": 150, "issued": 0, "stocked": 150, "weight": 99},
                {"id": "try_again", "quantity": null, "issued": 0, "stocked": null, "weight": 900}]}
        ], "last_request_id": 0})
    );
    assert!(!data.exists(), "inspect creates nothing");
}

#[test]
fn a_second_process_on_the_same_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "");
    let config = load_config(&config_path);
    let held = recovery::recover(&config, false).unwrap();
    let out = drill_bin()
        .args(["--quiet", "--config"])
        .arg(&config_path)
        .args(["--requests", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another rewardpool process"),
        "{stderr}"
    );
    drop(held);
}

#[test]
fn a_full_disk_at_start_is_a_clear_error() {
    let fs_ = Tmpfs::mount("256k");
    let data = fs_.dir.join("data");
    let config_path = write_config(&fs_.dir, &data, "");
    fs_.fill_leaving(0);
    let out = bin()
        .args(["run", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("disk full"), "{stderr}");
}

#[test]
fn a_disk_that_fills_mid_run_stops_the_engine_and_loses_nothing() {
    let fs_ = Tmpfs::mount("1m");
    let data = fs_.dir.join("data");
    let config_path = write_config(&fs_.dir, &data, "");
    let config = load_config(&config_path);
    drill_ok(&config_path, 0, 10);
    fs_.fill_leaving(40 * 1024);
    let out = drill_bin()
        .args(["--keep-all-wal", "--config"])
        .arg(&config_path)
        .args(["--first", "10", "--requests", "20000"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the engine must stop on a write error"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("No space left") || stderr.contains("disk full"),
        "{stderr}"
    );
    let done: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("done "))
        .map(|l| l.split(' ').nth(2).unwrap().to_string())
        .collect();
    fs::remove_file(fs_.dir.join("filler")).unwrap();
    // Space is back: the next start recovers; everything completed is there.
    drill_ok(&config_path, 20_000, 10);
    let draws = wal_draws(&data);
    let by_message = check_wal(&draws);
    for mid in &done {
        assert!(by_message.contains_key(mid), "completed {mid} lost");
    }
    check_state(&config, &data, &draws);
}

/// The commands of the admin tests below: every op, each with its own message_id.
fn admin_steps(tag: &str) -> Vec<Step> {
    use rewardpool::admin::AdminCommand as C;
    use rewardpool::seed::{Mode, PoolSeed};
    let commands = [
        C::Restock {
            pool: "default".into(),
            item: "gold".into(),
            add: 5,
        },
        C::SetQuantity {
            pool: "default".into(),
            item: "silver".into(),
            quantity: 7,
        },
        C::SetWeight {
            pool: "spin".into(),
            item: "car".into(),
            weight: 50,
        },
        C::AddItem {
            pool: "default".into(),
            item: format!("platinum-{tag}"),
            quantity: Some(2),
            weight: None,
        },
        C::AddPool {
            pool: PoolSeed::from_parts(
                &format!("xmas-{tag}"),
                Mode::ByQuantity,
                &[("tree".into(), Some(4), None)],
            ),
        },
        C::ClosePool {
            pool: "spin".into(),
        },
    ];
    commands
        .into_iter()
        .enumerate()
        .map(|(n, command)| Step::Admin {
            message_id: Some(format!("{tag}-{n}")),
            command,
        })
        .collect()
}

fn draws(from: usize, n: usize) -> Vec<Step> {
    (from..from + n)
        .map(|k| Step::Draw {
            pool_index: (k % 2) as u32,
            count: 1 + (k % 3) as u32,
            message_id: Some(format!("m-{k}")),
        })
        .collect()
}

#[test]
fn torn_tail_and_corruption_in_batches_of_admin_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "");
    let config = load_config(&config_path);
    // Draws, the commands (and draws after them), then a last session of commands alone.
    let mut first = draws(0, 40);
    first.extend(admin_steps("early"));
    first.extend(draws(40, 40));
    run_engine(&config, true, &first);
    let last = admin_steps("late");
    let done = run_engine(&config, true, &last);
    assert!(done.iter().all(|d| d.rejected.is_none() && !d.repeat));
    check_state_with_commands(&config, &data);

    let (segment, offset, len, seq) = last_batch(&data);
    drop_snapshots_from(&data, 1);
    let bytes = fs::read(&segment).unwrap();
    let lost: Vec<String> = wal::parse_batch(&bytes, offset as usize)
        .unwrap()
        .records
        .into_iter()
        .filter_map(|r| match r {
            rewardpool::record::Record::Admin(a) => a.message_id,
            _ => None,
        })
        .collect();
    assert!(!lost.is_empty(), "the last batch holds commands");
    let name = segment.file_name().unwrap();
    for cut in (offset..offset + len).chain(std::iter::once(u64::MAX)) {
        let copy = tmp.path().join(format!("cut-{cut}"));
        copy_dir(&data, &copy);
        let seg = copy.join(name);
        if cut == u64::MAX {
            let mut bytes = fs::read(&seg).unwrap();
            bytes[(offset + len - 1) as usize] ^= 0x55;
            fs::write(&seg, bytes).unwrap();
        } else {
            let f = fs::OpenOptions::new().write(true).open(&seg).unwrap();
            f.set_len(cut).unwrap();
        }
        let mut cfg = config.clone();
        cfg.storage.data_dir = copy.clone();
        let recovered = recovery::recover(&cfg, true)
            .unwrap_or_else(|e| panic!("cut at {cut}: recovery failed: {e}"));
        assert_eq!(recovered.state.seq, seq - 1, "cut at {cut}");
        drop(recovered);
        assert_eq!(fs::metadata(&seg).unwrap().len(), offset, "cut at {cut}");
        // The state is the (shorter) WAL's story: the lost commands are not applied.
        check_state_with_commands(&cfg, &copy);
        if cut == offset || cut == u64::MAX {
            // Sent again: a lost command applies anew, a durable one is a repeat with the
            // first reply (the window across a restart).
            let again = run_engine(&cfg, true, &last);
            for d in &again {
                let Step::Admin { message_id, .. } = &last[d.step] else {
                    unreachable!()
                };
                let was_lost = lost.contains(message_id.as_ref().unwrap());
                assert_eq!(d.repeat, !was_lost, "cut at {cut}: {message_id:?}");
                assert!(d.rejected.is_none(), "cut at {cut}: {:?}", d.rejected);
            }
            check_state_with_commands(&cfg, &copy);
        }
        fs::remove_dir_all(&copy).unwrap();
    }

    // A command record damaged in the middle of the log, valid batches after it: recovery
    // refuses and names the file and the batch.
    let (segment, batch_at) = {
        let mut found = None;
        for seg in wal::list_segments(&data).unwrap() {
            let bytes = fs::read(&seg.path).unwrap();
            wal::scan::<()>(&bytes, |b| {
                let has_admin = b
                    .records
                    .iter()
                    .any(|r| matches!(r, rewardpool::record::Record::Admin(_)));
                if has_admin && found.is_none() && b.seq < seq {
                    found = Some((seg.path.clone(), b.offset));
                }
                Ok(())
            })
            .unwrap();
        }
        found.expect("an early batch with a command")
    };
    let mut bytes = fs::read(&segment).unwrap();
    let batch = wal::parse_batch(&bytes, batch_at as usize).unwrap();
    bytes[(batch_at + batch.len_bytes - 2) as usize] ^= 0xff;
    fs::write(&segment, &bytes).unwrap();
    let err = match recovery::recover(&config, true) {
        Err(e) => e,
        Ok(_) => panic!("recovery must refuse a damaged command followed by valid batches"),
    };
    assert!(matches!(err, RecoveryError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&segment.display().to_string()) && msg.contains(&format!("offset {batch_at}")),
        "{msg}"
    );
}
