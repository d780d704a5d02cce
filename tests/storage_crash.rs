//! Crash tests of the storage engine: a real child process (`rewardpool-drill`) draws under a
//! stream of requests and is killed with SIGKILL at chosen points — failpoints inside the WAL
//! writer, rotation, snapshot, pruning and recovery, and at random moments. After every kill
//! the next run recovers, and the invariants are checked against the full WAL (kept whole with
//! `--keep-all-wal`):
//! - recovered state = the WAL's story (config, draws, admin commands: the drill sends one
//!   every 50 requests, `--admin-every`); stocked = remaining + issued;
//! - every request reported done (after its fsync) is in the WAL with the same items; every
//!   command reported applied is in the WAL, one reported rejected is not, a repeat names the
//!   first's request ID (also across restarts);
//! - no message_id is drawn or applied twice, no request ID is given to two requests, IDs never
//!   go back.

use common::*;
use std::collections::HashMap;
use std::io::BufRead;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

#[derive(Debug, Clone)]
struct Line {
    kind: String,
    /// `new`/`repeat` for draws; `admin` (assigned), `applied`/`repeat`/`rejected` (done) for
    /// commands.
    kind_word: String,
    request_id: u64,
    message_id: String,
    repeat: bool,
    items: Vec<String>,
}

fn parse_lines(stdout: &str) -> Vec<Line> {
    stdout
        .lines()
        .filter_map(|l| {
            let parts: Vec<&str> = l.split(' ').collect();
            // A line cut by the kill is incomplete: ignore it.
            match parts.as_slice() {
                ["assigned", id, mid, rep] => Some(Line {
                    kind: "assigned".into(),
                    kind_word: rep.to_string(),
                    request_id: id.parse().ok()?,
                    message_id: mid.to_string(),
                    repeat: *rep == "repeat",
                    items: vec![],
                }),
                ["done", id, mid, rep, items] => Some(Line {
                    kind: "done".into(),
                    kind_word: rep.to_string(),
                    request_id: id.parse().ok()?,
                    message_id: mid.to_string(),
                    repeat: *rep == "repeat",
                    items: if *items == "-" {
                        vec![]
                    } else {
                        items.split(',').map(str::to_string).collect()
                    },
                }),
                _ => None,
            }
        })
        .collect()
}

enum Kill {
    /// SIGKILL from inside, at a named failpoint (see src/failpoint.rs).
    Failpoint(&'static str),
    /// SIGKILL from the test once this many completions were printed.
    AfterDone(usize),
    None,
}

struct Run {
    lines: Vec<Line>,
    killed: bool,
    stderr: String,
}

fn drill(config: &std::path::Path, first: u64, requests: u64, kill: Kill) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rewardpool-drill"));
    cmd.args(["--keep-all-wal", "--admin-every", "50", "--config"])
        .arg(config)
        .args([
            "--first",
            &first.to_string(),
            "--requests",
            &requests.to_string(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Kill::Failpoint(fp) = kill {
        cmd.env("REWARDPOOL_FAILPOINT", fp);
    }
    let mut child = cmd.spawn().expect("spawn drill");
    let mut early = String::new();
    if let Kill::AfterDone(n) = kill {
        let stdout = child.stdout.as_mut().expect("piped");
        let mut reader = std::io::BufReader::new(stdout);
        let mut done = 0;
        let mut line = String::new();
        while done < n {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            done += line.starts_with("done ") as usize;
            early.push_str(&line);
        }
        let _ = child.kill(); // SIGKILL
    }
    let mut out = child.wait_with_output().expect("drill output");
    let mut stdout = early.into_bytes();
    stdout.append(&mut out.stdout);
    out.stdout = stdout;
    let killed = out.status.signal() == Some(libc_sigkill());
    if !killed {
        assert!(
            out.status.success(),
            "drill failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Run {
        lines: parse_lines(&String::from_utf8_lossy(&out.stdout)),
        killed,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn libc_sigkill() -> i32 {
    9
}

#[test]
fn sigkill_at_many_points_loses_nothing_and_draws_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config_path = write_config(tmp.path(), &data, "");
    let config = load_config(&config_path);

    // (kill, must the kill happen?) Failpoints on the hot path are reached in every run; the
    // recovery ones at every start.
    let plan: Vec<(Kill, bool)> = vec![
        (Kill::None, false),
        (Kill::Failpoint("wal.after_write:3"), true),
        (Kill::Failpoint("wal.after_sync:2"), true),
        (Kill::Failpoint("wal.after_write:8"), true),
        (Kill::Failpoint("rotate.before_create:1"), true),
        (Kill::Failpoint("rotate.after_create:1"), true),
        (Kill::Failpoint("snapshot.after_tmp_write:1"), true),
        (Kill::Failpoint("snapshot.after_rename:1"), true),
        (Kill::Failpoint("snapshot.after_dir_sync:2"), true),
        (Kill::Failpoint("snapshot.before_prune:1"), true),
        (Kill::Failpoint("snapshot.mid_prune:1"), true),
        (Kill::Failpoint("recovery.after_snapshot:1"), true),
        (Kill::Failpoint("recovery.after_rotate:1"), true),
        (Kill::Failpoint("wal.after_sync:1"), true),
        (Kill::AfterDone(10), true),
        (Kill::AfterDone(300), true),
        (Kill::AfterDone(700), true),
        (Kill::Failpoint("snapshot.after_tmp_write:2"), true),
        (Kill::AfterDone(1), true),
        (Kill::AfterDone(1100), true),
        (Kill::Failpoint("wal.after_write:1"), true),
        (Kill::AfterDone(1500), true),
        (Kill::None, false),
    ];
    let kill_points = plan.len() - 2;
    assert!(kill_points >= 20);

    let mut done_new: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    let mut done_all: Vec<Line> = Vec::new();
    let mut assigned_new: HashMap<u64, String> = HashMap::new();
    let mut last_new_id_before_run = 0u64;
    let mut kills = 0;
    let mut applied_commands = 0;
    for (round, (kill, must_kill)) in plan.into_iter().enumerate() {
        // Overlapping message-id ranges: each run repeats part of the previous ones.
        let first = round as u64 * 1000;
        let run = drill(&config_path, first, 2000, kill);
        if must_kill {
            assert!(
                run.killed,
                "round {round}: the failpoint was not reached; stderr:\n{}",
                run.stderr
            );
        }
        kills += run.killed as usize;

        let mut max_new = last_new_id_before_run;
        for line in &run.lines {
            match line.kind.as_str() {
                "assigned" if !line.repeat => {
                    assert!(
                        line.request_id > last_new_id_before_run,
                        "round {round}: ID {} handed out again after a restart",
                        line.request_id
                    );
                    if let Some(other) =
                        assigned_new.insert(line.request_id, line.message_id.clone())
                    {
                        panic!(
                            "ID {} given to {} and {}",
                            line.request_id, other, line.message_id
                        );
                    }
                    max_new = max_new.max(line.request_id);
                }
                "done" => {
                    done_all.push(line.clone());
                    if !line.repeat {
                        done_new.insert(
                            line.message_id.clone(),
                            (line.request_id, line.items.clone()),
                        );
                    }
                }
                _ => {}
            }
        }
        last_new_id_before_run = max_new;

        // Invariants after every run (the next run recovers; checks read without changing).
        let draws = wal_draws(&data);
        let by_message = check_wal(&draws);
        let commands: HashMap<String, u64> = wal_records(&data)
            .into_iter()
            .filter_map(|r| match r {
                rewardpool::record::Record::Admin(a) => Some((a.message_id?, a.request_id)),
                _ => None,
            })
            .collect();
        for line in done_all.iter().filter(|l| l.message_id.starts_with("a-")) {
            let durable = commands.get(&line.message_id);
            match line.kind_word.as_str() {
                "applied" | "repeat" => assert_eq!(
                    durable,
                    Some(&line.request_id),
                    "round {round}: command {line:?} and the WAL"
                ),
                "rejected" => assert!(
                    durable.is_none(),
                    "round {round}: rejected command {line:?} is in the WAL"
                ),
                other => panic!("round {round}: {other} for a command: {line:?}"),
            }
            applied_commands += (line.kind_word == "applied") as usize;
        }
        let (state, _) =
            rewardpool::recovery::load(&data, config.storage.dedupe_window).expect("recovers");
        for line in done_all.iter().filter(|l| !l.message_id.starts_with("a-")) {
            let d = by_message.get(&line.message_id).unwrap_or_else(|| {
                panic!("round {round}: completed request {line:?} is not in the WAL")
            });
            assert_eq!(d.request_id, line.request_id, "round {round}: {line:?}");
            // Item names from the recovered state: commands add items after the config's.
            let items = state.items(d.pool_index);
            let names: Vec<String> = d
                .items
                .iter()
                .map(|i| items[*i as usize].id.clone())
                .collect();
            assert_eq!(names, line.items, "round {round}: items of {line:?}");
        }
        check_state_with_commands(&config, &data);
    }
    assert!(kills >= 20, "only {kills} runs were killed");
    assert!(applied_commands > 0, "no command was applied");
    assert!(!done_new.is_empty());
}
