//! Property test of the storage engine, in process, on the real file system: for any sequence
//! of draws (some repeating a message_id), admin commands (restock, set_quantity, add_item,
//! close_pool, open_pool; some repeating a message_id, some breaking a rule) and restarts,
//! - each command is applied at most once, rejected exactly when the model says so;
//! - a draw on a closed pool has status closed and no items;
//! - quantities never go negative and initial = remaining + issued;
//! - a message_id is drawn at most once; repeats return the first outcome;
//! - recovery from snapshot + WAL at ANY batch boundary equals the state in memory at that
//!   point (the model: the config, then every draw and command committed up to that batch,
//!   with quantity, issued and stocked per item);
//! - epochs: the recovered epoch number at every cut is the model's (a new epoch at every
//!   session's first draw and after every `seed_epoch_records` draws; commands do not count),
//!   and `audit` of every cut re-derives exactly the draws and commands committed up to it,
//!   without a mismatch.

use common::*;
use proptest::prelude::*;
use rewardpool::admin::AdminCommand;
use rewardpool::admission::{AdminSpec, Admission, DrawSpec, Submission};
use rewardpool::config::Config;
use rewardpool::engine::Engine;
use rewardpool::wal;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;

#[derive(Debug, Clone)]
enum Op {
    Draw {
        pool: u32,
        count: u32,
        key: Option<u8>,
    },
    /// kind: 0 restock, 1 set_quantity, 2 add_item "extra", 3 close_pool, 4 open_pool.
    Admin {
        kind: u8,
        pool: u32,
        item: u8,
        value: u64,
        key: Option<u8>,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u32..2, 1u32..4, proptest::option::of(0u8..24))
            .prop_map(|(pool, count, key)| Op::Draw { pool, count, key }),
        3 => (0u8..5, 0u32..2, 0u8..4, 0u64..6, proptest::option::of(0u8..8))
            .prop_map(|(kind, pool, item, value, key)| Op::Admin { kind, pool, item, value, key }),
        1 => Just(Op::Restart),
    ]
}

/// The item names a command may name: the config's, then "extra" (added by add_item).
fn item_name(config: &Config, pool: u32, item: u8) -> String {
    let items = &config.pools[pool as usize].items;
    match items.get(item as usize) {
        Some(i) => i.id.clone(),
        None => "extra".to_string(),
    }
}

fn command(config: &Config, kind: u8, pool: u32, item: u8, value: u64) -> AdminCommand {
    let pool_id = config.pools[pool as usize].id.clone();
    let item = item_name(config, pool, item);
    match kind {
        0 => AdminCommand::Restock {
            pool: pool_id,
            item,
            add: value + 1,
        },
        1 => AdminCommand::SetQuantity {
            pool: pool_id,
            item,
            quantity: value,
        },
        2 => AdminCommand::AddItem {
            pool: pool_id,
            item: "extra".to_string(),
            quantity: Some(value),
            weight: (pool == 1).then_some(5),
        },
        3 => AdminCommand::ClosePool { pool: pool_id },
        _ => AdminCommand::OpenPool { pool: pool_id },
    }
}

/// What the engine completed, in completion (= draw) order.
#[derive(Debug, Clone)]
enum Event {
    Draw {
        pool: String,
        items: Vec<String>,
        closed: bool,
        session: usize,
    },
    Applied {
        key: Option<String>,
        command: AdminCommand,
    },
    AdminRepeat {
        key: String,
    },
    Rejected {
        command: AdminCommand,
    },
}

/// (batch seq, event) of every completion, in order.
type Drawn = Vec<(u64, Event)>;

type Ticket = Option<(Option<String>, AdminCommand)>;

fn run_ops(config: &Config, ops: &[Op]) -> Drawn {
    let mut drawn: Drawn = Vec::new();
    let mut first_outcome: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    let mut drawn_keys = std::collections::HashSet::new();
    for (session_index, session) in ops.split(|o| matches!(o, Op::Restart)).enumerate() {
        let recovered = rewardpool::recovery::recover(config, true).expect("recovers");
        let window = Admission::<Ticket>::window_of(&recovered.state);
        let (mut engine, mut committed) = Engine::<Ticket>::start(
            recovered.state,
            recovered.segment,
            rewardpool::engine::EngineOptions::from_config(config, true),
        );
        let mut admission = Admission::new(window, engine.ids(), engine.sender());
        let collector = std::thread::spawn(move || {
            let mut out = vec![];
            while let Some(batch) = committed.blocking_recv() {
                for c in batch.completions {
                    out.push((batch.seq, c.repeat, c.outcome, c.ticket, c.rejected));
                }
            }
            out
        });
        for op in session {
            match op {
                Op::Draw { pool, count, key } => {
                    let mid = key.map(|k| format!("m-{k}"));
                    let assigned = admission.assign_blocking(mid.as_deref()).unwrap();
                    admission
                        .submit_blocking(
                            assigned.with_draw(DrawSpec {
                                message_id: mid.clone(),
                                pool_index: *pool,
                                user: mid.unwrap_or_default(),
                                count: *count,
                            }),
                            None,
                        )
                        .unwrap();
                }
                Op::Admin {
                    kind,
                    pool,
                    item,
                    value,
                    key,
                } => {
                    let mid = key.map(|k| format!("a-{k}"));
                    let command = command(config, *kind, *pool, *item, *value);
                    let new = admission.assign_admin_blocking().unwrap();
                    let spec = AdminSpec {
                        message_id: mid.clone(),
                        command: command.clone(),
                    };
                    admission
                        .submit_blocking(Submission::Admin(new, spec), Some((mid, command)))
                        .unwrap();
                }
                Op::Restart => unreachable!(),
            }
        }
        drop(admission);
        engine.close();
        let completions = collector.join().unwrap();
        engine.join().expect("clean stop");
        for (seq, repeat, outcome, ticket, rejected) in completions {
            if let Some((key, command)) = ticket {
                let event = match (rejected, repeat) {
                    (Some(_), _) => Event::Rejected { command },
                    (None, true) => Event::AdminRepeat {
                        key: key.expect("a repeat has a key"),
                    },
                    (None, false) => {
                        assert_eq!(outcome.admin.as_ref().unwrap().op, command.op());
                        Event::Applied { key, command }
                    }
                };
                drawn.push((seq, event));
                continue;
            }
            let items: Vec<String> = outcome.items.iter().map(|s| s.to_string()).collect();
            if repeat {
                let key = first_outcome
                    .iter()
                    .find(|(_, v)| v.0 == outcome.request_id)
                    .map(|(k, _)| k.clone());
                let key = key.expect("a repeat names a drawn request");
                assert_eq!(
                    first_outcome[&key].1, items,
                    "repeat returns the first outcome"
                );
            } else {
                if !outcome.user.is_empty() {
                    assert!(
                        drawn_keys.insert(outcome.user.to_string()),
                        "message_id {} drawn twice",
                        outcome.user
                    );
                }
                drawn.push((
                    seq,
                    Event::Draw {
                        pool: outcome.pool.to_string(),
                        items: items.clone(),
                        closed: outcome.closed,
                        session: session_index,
                    },
                ));
                first_outcome.insert(
                    format!("id-{}", outcome.request_id),
                    (outcome.request_id, items),
                );
            }
        }
    }
    drawn
}

/// The epoch number after the draws committed in batches <= `seq`: a new epoch at each
/// session's first draw and before every `per_epoch`-th draw after it (commands do not count).
fn model_epoch(drawn: &Drawn, seq: u64, per_epoch: u64) -> u64 {
    let (mut epoch, mut in_epoch, mut session) = (0u64, 0u64, None);
    for (s, event) in drawn {
        if *s > seq {
            break;
        }
        let Event::Draw { session: sess, .. } = event else {
            continue;
        };
        if session != Some(*sess) || in_epoch == per_epoch {
            epoch += 1;
            in_epoch = 0;
            session = Some(*sess);
        }
        in_epoch += 1;
    }
    epoch
}

/// Per (pool, item): (quantity, issued, stocked); and the closed pools.
type Stock = (
    BTreeMap<(String, String), (Option<u64>, u64, Option<u64>)>,
    BTreeSet<String>,
);

/// The simple model: the config, then every completion of a batch <= `seq` in order. It also
/// predicts which commands are rejected and which are repeats, and asserts the engine agreed.
fn model(config: &Config, drawn: &Drawn, seq: u64) -> Stock {
    let mut items = BTreeMap::new();
    for p in &config.pools {
        for i in &p.items {
            let q = i.stock.quantity();
            items.insert((p.id.clone(), i.id.clone()), (q, 0, q));
        }
    }
    let mut closed = BTreeSet::new();
    let mut applied_keys = BTreeSet::new();
    for (s, event) in drawn {
        if *s > seq {
            continue;
        }
        match event {
            Event::Draw {
                pool,
                items: got,
                closed: was_closed,
                ..
            } => {
                assert_eq!(
                    *was_closed,
                    closed.contains(pool),
                    "closed status of a draw on {pool}"
                );
                for item in got {
                    let (q, issued, _) = items.get_mut(&(pool.clone(), item.clone())).unwrap();
                    if let Some(q) = q {
                        *q = q.checked_sub(1).expect("quantity never goes negative");
                    }
                    *issued += 1;
                }
            }
            Event::AdminRepeat { key } => {
                assert!(
                    applied_keys.contains(key),
                    "repeat of {key}, which was not applied"
                );
            }
            Event::Applied { command, .. } | Event::Rejected { command } => {
                let applied = matches!(event, Event::Applied { .. });
                if let Event::Applied { key: Some(key), .. } = event {
                    assert!(
                        applied_keys.insert(key.clone()),
                        "command {key} applied twice"
                    );
                }
                let at = |pool: &str, item: &str| (pool.to_string(), item.to_string());
                let expect_ok = match command {
                    AdminCommand::Restock { pool, item, add } => {
                        match items.get_mut(&at(pool, item)) {
                            Some((Some(q), _, Some(stocked))) => {
                                if applied {
                                    *q += add;
                                    *stocked += add;
                                }
                                true
                            }
                            _ => false,
                        }
                    }
                    AdminCommand::SetQuantity {
                        pool,
                        item,
                        quantity,
                    } => match items.get_mut(&at(pool, item)) {
                        Some((Some(q), issued, Some(stocked))) => {
                            if applied {
                                *q = *quantity;
                                *stocked = *quantity + *issued;
                            }
                            true
                        }
                        _ => false,
                    },
                    AdminCommand::AddItem {
                        pool,
                        item,
                        quantity,
                        ..
                    } => {
                        let known = items.contains_key(&at(pool, item));
                        if applied && !known {
                            items.insert(at(pool, item), (*quantity, 0, *quantity));
                        }
                        !known
                    }
                    AdminCommand::ClosePool { pool } => {
                        if applied {
                            closed.insert(pool.clone());
                        }
                        true
                    }
                    AdminCommand::OpenPool { pool } => {
                        if applied {
                            closed.remove(pool);
                        }
                        true
                    }
                    other => panic!("not generated: {other:?}"),
                };
                assert_eq!(
                    applied, expect_ok,
                    "{command:?}: applied {applied}, model says {expect_ok}"
                );
            }
        }
    }
    (items, closed)
}

fn recovered_quantities(config: &Config, dir: &Path) -> (u64, Stock) {
    let (mut state, _) = rewardpool::recovery::load(dir, config.storage.dedupe_window).unwrap();
    rewardpool::recovery::seed_in_memory(&mut state, config).unwrap();
    for (name, initial, remaining, issued) in state.conservation() {
        assert_eq!(initial, remaining + issued, "conservation of {name}");
    }
    let mut out = BTreeMap::new();
    let mut closed = BTreeSet::new();
    for slot in &state.pools {
        if slot.closed {
            closed.insert(slot.id.to_string());
        }
        for item in slot.pool.items() {
            out.insert(
                (slot.id.to_string(), item.id.clone()),
                (item.quantity, item.issued, item.stocked),
            );
        }
    }
    (state.seq, (out, closed))
}

/// Copies the data dir as it was right after batch `seq` was written.
fn cut_at(data: &Path, to: &Path, seq: u64) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(data).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("snapshot-") {
            let s: u64 = name[9..29].parse().unwrap();
            if s > seq {
                continue;
            }
        }
        if name != "LOCK" && !name.starts_with("wal-") {
            fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
    for seg in wal::list_segments(data).unwrap() {
        if seg.first_seq > seq {
            break;
        }
        let bytes = fs::read(&seg.path).unwrap();
        let mut end = 0;
        wal::scan::<()>(&bytes, |b| {
            if b.seq <= seq {
                end = (b.offset + b.len_bytes) as usize;
            }
            Ok(())
        })
        .unwrap();
        fs::write(to.join(seg.path.file_name().unwrap()), &bytes[..end]).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn recovery_at_any_cut_equals_the_state_at_that_point(ops in proptest::collection::vec(op(), 1..60)) {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let config_path = write_config(
            tmp.path(),
            &data,
            "dedupe_window = 1000\n",
        );
        let mut config = load_config(&config_path);
        config.storage.snapshot_every_records = 5;
        config.storage.batch_records_max = 3;
        config.storage.id_block_size = 6;
        config.storage.segment_bytes_max = 512;
        config.storage.seed_epoch_records = 4;

        let drawn = run_ops(&config, &ops);
        let (last_seq, final_state) = recovered_quantities(&config, &data);
        prop_assert_eq!(&final_state, &model(&config, &drawn, last_seq));

        let mut seqs: Vec<u64> = vec![];
        for seg in wal::list_segments(&data).unwrap() {
            let bytes = fs::read(&seg.path).unwrap();
            wal::scan::<()>(&bytes, |b| { seqs.push(b.seq); Ok(()) }).unwrap();
        }
        for (i, seq) in seqs.iter().enumerate() {
            let cut = tmp.path().join(format!("cut-{i}"));
            cut_at(&data, &cut, *seq);
            let (recovered_seq, state) = recovered_quantities(&config, &cut);
            prop_assert_eq!(recovered_seq, *seq);
            prop_assert_eq!(&state, &model(&config, &drawn, *seq), "cut after batch {}", seq);
            let (recovered, _) = rewardpool::recovery::load(&cut, 1000).unwrap();
            prop_assert_eq!(
                recovered.epoch.as_ref().map_or(0, |e| e.number),
                model_epoch(&drawn, *seq, 4),
                "epoch after batch {}", seq
            );
            let audit = rewardpool::audit::audit(&cut, 1000, None, false).unwrap();
            prop_assert_eq!(audit.mismatches, 0, "audit of the cut after batch {}: {:?}", seq, audit.first_mismatch);
            prop_assert_eq!(
                audit.verified_draws,
                drawn.iter().filter(|d| d.0 <= *seq && matches!(d.1, Event::Draw { .. })).count() as u64,
                "draws verified after batch {}", seq
            );
            prop_assert_eq!(
                audit.verified_commands,
                drawn.iter().filter(|d| d.0 <= *seq && matches!(d.1, Event::Applied { .. })).count() as u64,
                "commands verified after batch {}", seq
            );
            fs::remove_dir_all(&cut).unwrap();
        }
    }
}
