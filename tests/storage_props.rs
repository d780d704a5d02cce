//! Property test of the storage engine, in process, on the real file system: for any sequence
//! of draws (some repeating a message_id) and restarts,
//! - quantities never go negative and initial = remaining + issued;
//! - a message_id is drawn at most once; repeats return the first outcome;
//! - recovery from snapshot + WAL at ANY batch boundary equals the state in memory at that
//!   point (the model: config minus the items of every draw committed up to that batch);
//! - epochs: the recovered epoch number at every cut is the model's (a new epoch at every
//!   session's first draw and after every `seed_epoch_records` draws), and `audit` of every cut
//!   re-derives exactly the draws committed up to it, without a mismatch.

use common::*;
use proptest::prelude::*;
use rewardpool::admission::{Admission, DrawSpec};
use rewardpool::engine::Engine;
use rewardpool::wal;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

#[derive(Debug, Clone)]
enum Op {
    Draw {
        pool: u32,
        count: u32,
        key: Option<u8>,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u32..2, 1u32..4, proptest::option::of(0u8..24))
            .prop_map(|(pool, count, key)| Op::Draw { pool, count, key }),
        1 => Just(Op::Restart),
    ]
}

/// (batch seq, pool, item names, session) of every new draw, in order.
type Drawn = Vec<(u64, u32, Vec<String>, usize)>;

fn run_ops(config: &rewardpool::config::Config, ops: &[Op]) -> Drawn {
    let mut drawn: Drawn = Vec::new();
    let mut first_outcome: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    let mut drawn_keys = std::collections::HashSet::new();
    for (session_index, session) in ops.split(|o| matches!(o, Op::Restart)).enumerate() {
        let recovered = rewardpool::recovery::recover(config, true).expect("recovers");
        let window = Admission::<()>::window_of(&recovered.state);
        let (mut engine, mut committed) = Engine::<()>::start(
            recovered.state,
            recovered.segment,
            rewardpool::engine::EngineOptions::from_config(config, true),
        );
        let mut admission = Admission::new(window, engine.ids(), engine.sender());
        let collector = std::thread::spawn(move || {
            let mut out = vec![];
            while let Some(batch) = committed.blocking_recv() {
                for c in batch.completions {
                    out.push((batch.seq, c.repeat, c.outcome));
                }
            }
            out
        });
        for op in session {
            let Op::Draw { pool, count, key } = op else {
                unreachable!()
            };
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
                    (),
                )
                .unwrap();
        }
        drop(admission);
        engine.close();
        let completions = collector.join().unwrap();
        engine.join().expect("clean stop");
        for (seq, repeat, outcome) in completions {
            let items: Vec<String> = outcome.items.iter().map(|s| s.to_string()).collect();
            let pool = config
                .pools
                .iter()
                .position(|p| *p.id == *outcome.pool)
                .unwrap() as u32;
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
                drawn.push((seq, pool, items.clone(), session_index));
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
/// session's first draw and before every `per_epoch`-th draw after it.
fn model_epoch(drawn: &Drawn, seq: u64, per_epoch: u64) -> u64 {
    let (mut epoch, mut in_epoch, mut session) = (0u64, 0u64, None);
    for (s, _, _, sess) in drawn {
        if *s > seq {
            break;
        }
        if session != Some(*sess) || in_epoch == per_epoch {
            epoch += 1;
            in_epoch = 0;
            session = Some(*sess);
        }
        in_epoch += 1;
    }
    epoch
}

/// Remaining quantity per (pool, item) after the draws committed in batches <= `seq`.
fn model(
    config: &rewardpool::config::Config,
    drawn: &Drawn,
    seq: u64,
) -> BTreeMap<(String, String), Option<u64>> {
    let mut out = BTreeMap::new();
    for p in &config.pools {
        for i in &p.items {
            out.insert((p.id.clone(), i.id.clone()), i.stock.quantity());
        }
    }
    for (s, pool, items, _) in drawn {
        if *s <= seq {
            for item in items {
                let pool_id = config.pools[*pool as usize].id.clone();
                if let Some(q) = out.get_mut(&(pool_id, item.clone())).unwrap() {
                    *q = q.checked_sub(1).expect("quantity never goes negative");
                }
            }
        }
    }
    out
}

fn recovered_quantities(
    config: &rewardpool::config::Config,
    dir: &Path,
) -> (u64, BTreeMap<(String, String), Option<u64>>) {
    let (mut state, _) = rewardpool::recovery::load(dir, config.storage.dedupe_window).unwrap();
    rewardpool::recovery::seed_in_memory(&mut state, config).unwrap();
    for (name, initial, remaining, issued) in state.conservation() {
        assert_eq!(initial, remaining + issued, "conservation of {name}");
    }
    let mut out = BTreeMap::new();
    for slot in &state.pools {
        for item in slot.pool.items() {
            out.insert((slot.id.to_string(), item.id.clone()), item.quantity);
        }
    }
    (state.seq, out)
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
                drawn.iter().filter(|d| d.0 <= *seq).count() as u64,
                "draws verified after batch {}", seq
            );
            fs::remove_dir_all(&cut).unwrap();
        }
    }
}
