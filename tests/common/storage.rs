//! What is on disk: the one WAL reader of the tests (the library's own scanner, every segment,
//! oldest first), the storage tests' config, and the invariants checked against the WAL.

use crate::config::{ConfigFile, Setup};
use rewardpool::config::Config;
use rewardpool::record::{DrawRecord, Record};
use rewardpool::wal::{self, ScanEnd};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const POOLS_TOML: &str = r#"
[[pools]]
id = "default"
mode = "by_quantity"
items = [
  { id = "gold",   quantity = 40 },
  { id = "silver", quantity = 400 },
  { id = "bronze", quantity = 4000 },
]

[[pools]]
id = "spin"
mode = "by_weight"
items = [
  { id = "car",       quantity = 3,  weight = 1 },
  { id = "voucher",   quantity = 150, weight = 99 },
  { id = "try_again", weight = 900 },
]
"#;

/// Writes a config with small batches, snapshots and segments so a short run crosses many
/// snapshot, rotation and reservation boundaries. `extra_storage`: more `[storage]` keys, as
/// TOML lines.
pub fn write_config(dir: &Path, data_dir: &Path, extra_storage: &str) -> PathBuf {
    let path = dir.join("config.toml");
    ConfigFile::new()
        .set(
            "storage",
            "data_dir",
            data_dir.to_str().expect("utf-8 temp path"),
        )
        .set("storage", "batch_records_max", 64)
        .set("storage", "snapshot_every_records", 300)
        .set("storage", "segment_bytes_max", 16384)
        .set("storage", "id_block_size", 500)
        .merge("storage", extra_storage)
        .set("metrics", "listen", "")
        .pools_toml(POOLS_TOML)
        .write(&path);
    path
}

pub fn load_config(path: &Path) -> Config {
    Config::load_with_env(Some(path), &[]).expect("test config is valid")
}

/// Every draw in the WAL (all segments, oldest first), stopping at the first damage.
pub fn wal_draws(data_dir: &Path) -> Vec<DrawRecord> {
    let mut out = Vec::new();
    let segments = wal::list_segments(data_dir)
        .unwrap_or_else(|e| panic!("list WAL segments in {}: {e}", data_dir.display()));
    for segment in segments {
        let bytes = std::fs::read(&segment.path)
            .unwrap_or_else(|e| panic!("read {}: {e}", segment.path.display()));
        let end = wal::scan::<()>(&bytes, |batch| {
            for r in batch.records {
                if let Record::Draw(d) = r {
                    out.push(d);
                }
            }
            Ok(())
        })
        .unwrap();
        if let ScanEnd::Damaged { .. } = end {
            break;
        }
    }
    out
}

/// Initial quantities of limited items by (pool index, item index), from the config.
pub fn initial_quantities(config: &Config) -> BTreeMap<(u32, u32), u64> {
    let mut out = BTreeMap::new();
    for (p, pool) in config.pools.iter().enumerate() {
        for (i, item) in pool.items.iter().enumerate() {
            if let Some(q) = item.stock.quantity() {
                out.insert((p as u32, i as u32), q);
            }
        }
    }
    out
}

/// Checks the WAL alone: IDs strictly increasing (so never reused), each message_id drawn
/// at most once. Returns message_id → draw.
pub fn check_wal(draws: &[DrawRecord]) -> HashMap<String, DrawRecord> {
    let mut by_message = HashMap::new();
    let mut last = 0;
    for d in draws {
        assert!(
            d.request_id > last,
            "request IDs in the WAL must increase: {} after {last}",
            d.request_id
        );
        last = d.request_id;
        let mid = d
            .message_id
            .clone()
            .expect("drill requests carry message ids");
        if let Some(first) = by_message.insert(mid.clone(), d.clone()) {
            panic!(
                "message_id {mid} drawn twice: requests {} and {}",
                first.request_id, d.request_id
            );
        }
    }
    by_message
}

/// Recovers read-only and checks: recovered = config minus every draw in the WAL, and
/// conservation (initial = remaining + issued) for every limited item.
pub fn check_state(config: &Config, data_dir: &Path, draws: &[DrawRecord]) {
    let (mut state, _) =
        rewardpool::recovery::load(data_dir, config.storage.dedupe_window).expect("recovers");
    rewardpool::recovery::seed_in_memory(&mut state, config).unwrap();
    let mut expected = initial_quantities(config);
    let mut issued: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for d in draws {
        for item in &d.items {
            *issued.entry((d.pool_index, *item)).or_default() += 1;
            if let Some(q) = expected.get_mut(&(d.pool_index, *item)) {
                *q = q.checked_sub(1).expect("never more issued than there was");
            }
        }
    }
    for (p, pool) in config.pools.iter().enumerate() {
        let index = state.pool_index(&pool.id).unwrap();
        assert_eq!(index, p as u32, "pool order is seeding order");
        for (i, item) in state.items(index).iter().enumerate() {
            let key = (p as u32, i as u32);
            assert_eq!(
                item.issued,
                issued.get(&key).copied().unwrap_or(0),
                "issued of {}/{}",
                pool.id,
                item.id
            );
            if let Some(q) = expected.get(&key) {
                assert_eq!(
                    item.quantity,
                    Some(*q),
                    "remaining of {}/{}",
                    pool.id,
                    item.id
                );
                assert_eq!(
                    item.stocked,
                    Some(item.quantity.unwrap() + item.issued),
                    "conservation of {}/{}",
                    pool.id,
                    item.id
                );
            }
        }
    }
    for (name, initial, remaining, issued) in state.conservation() {
        assert_eq!(initial, remaining + issued, "conservation of {name}");
    }
}

impl Setup {
    /// Every draw record in the worker's WAL: (request_id, message_id), oldest first. Read
    /// with [`wal_draws`] while the worker is stopped; snapshots prune old segments, so a test
    /// that needs every draw configures a large `snapshot_every_records`.
    pub fn wal_draws(&self) -> Vec<(u64, String)> {
        wal_draws(&self.data_dir)
            .into_iter()
            .map(|d| {
                let message_id = d
                    .message_id
                    .unwrap_or_else(|| panic!("WAL draw {} without a message_id", d.request_id));
                (d.request_id, message_id)
            })
            .collect()
    }
}

/// One step of [`run_engine`]: a draw, or an admin command.
#[derive(Debug, Clone)]
pub enum Step {
    Draw {
        pool_index: u32,
        count: u32,
        message_id: Option<String>,
    },
    Admin {
        message_id: Option<String>,
        command: rewardpool::admin::AdminCommand,
    },
}

/// What the engine completed for one step (in completion order, which is the steps' order).
#[derive(Debug, Clone)]
pub struct Done {
    /// Index of the step in the slice given to [`run_engine`].
    pub step: usize,
    pub seq: u64,
    pub repeat: bool,
    /// A command the state refused: the reason.
    pub rejected: Option<String>,
    pub outcome: std::sync::Arc<rewardpool::state::Outcome>,
}

impl Done {
    /// An applied (or repeated) command's reply body, parsed.
    pub fn reply(&self) -> serde_json::Value {
        let admin = self.outcome.admin.as_ref().expect("an applied command");
        serde_json::from_str(&admin.reply).expect("reply is JSON")
    }
}

/// Runs `steps` through the engine (in process, on the config's data directory: recovery,
/// admission, the engine, a clean stop), the way the worker's ingest submits them: draws
/// through `assign_blocking` (repeats by message_id), commands through `assign_admin_blocking`
/// (the engine catches their repeats). Returns every completion.
pub fn run_engine(config: &Config, keep_all_wal: bool, steps: &[Step]) -> Vec<Done> {
    use rewardpool::admission::{AdminSpec, Admission, DrawSpec, Submission};
    use rewardpool::engine::{Engine, EngineOptions};
    let recovered = rewardpool::recovery::recover(config, keep_all_wal).expect("recovers");
    let window = Admission::<usize>::window_of(&recovered.state);
    let (mut engine, mut committed) = Engine::<usize>::start(
        recovered.state,
        recovered.segment,
        EngineOptions::from_config(config, keep_all_wal),
    );
    let mut admission = Admission::new(window, engine.ids(), engine.sender());
    let collector = std::thread::spawn(move || {
        let mut out = vec![];
        while let Some(batch) = committed.blocking_recv() {
            batch.assert_durable();
            for c in batch.completions {
                out.push(Done {
                    step: c.ticket,
                    seq: batch.seq,
                    repeat: c.repeat,
                    rejected: c.rejected,
                    outcome: c.outcome,
                });
            }
        }
        out
    });
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Draw {
                pool_index,
                count,
                message_id,
            } => {
                let assigned = admission.assign_blocking(message_id.as_deref()).unwrap();
                let draw = DrawSpec {
                    message_id: message_id.clone(),
                    pool_index: *pool_index,
                    user: format!("u{n}"),
                    count: *count,
                };
                admission
                    .submit_blocking(assigned.with_draw(draw), n)
                    .unwrap();
            }
            Step::Admin {
                message_id,
                command,
            } => {
                let new = admission.assign_admin_blocking().unwrap();
                let spec = AdminSpec {
                    message_id: message_id.clone(),
                    command: command.clone(),
                };
                admission
                    .submit_blocking(Submission::Admin(new, spec), n)
                    .unwrap();
            }
        }
    }
    drop(admission);
    engine.close();
    let out = collector.join().unwrap();
    engine.join().expect("clean stop");
    out
}

/// Every record in the WAL (all segments, oldest first), stopping at the first damage.
pub fn wal_records(data_dir: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    for segment in wal::list_segments(data_dir).expect("list WAL segments") {
        let bytes = std::fs::read(&segment.path).expect("read WAL segment");
        let end = wal::scan::<()>(&bytes, |batch| {
            out.extend(batch.records);
            Ok(())
        })
        .unwrap();
        if let ScanEnd::Damaged { .. } = end {
            break;
        }
    }
    out
}

/// A simple model of the pools, independent of the library's: per (pool, item) id
/// (quantity, issued, stocked, weight), pool modes and closed flags; built from the config and
/// the WAL's records, applying draws and admin commands by their plain meaning.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolModel {
    /// pool id → (mode, closed, items in order: (id, quantity, issued, stocked, weight)).
    #[allow(clippy::type_complexity)]
    pub pools: Vec<(
        String,
        rewardpool::seed::Mode,
        bool,
        Vec<(String, Option<u64>, u64, Option<u64>, Option<u64>)>,
    )>,
}

impl PoolModel {
    /// The model after every record of `records` (seeds from the WAL), then the config's
    /// pools the WAL did not seed (as recovery seeds them).
    pub fn from_wal(config: &Config, records: &[Record]) -> PoolModel {
        use rewardpool::record::AdminOp;
        let mut m = PoolModel::default();
        let seed = |pool: &rewardpool::seed::PoolSeed| {
            (
                pool.id.clone(),
                pool.mode,
                false,
                pool.items
                    .iter()
                    .map(|i| {
                        let q = i.stock.quantity();
                        (i.id.clone(), q, 0, q, i.weight)
                    })
                    .collect(),
            )
        };
        for r in records {
            match r {
                Record::Seed { pool_index, pool } => {
                    assert_eq!(*pool_index as usize, m.pools.len(), "seed order");
                    m.pools.push(seed(pool));
                }
                Record::Draw(d) => {
                    let pool = &mut m.pools[d.pool_index as usize];
                    assert!(
                        !pool.2 || d.items.is_empty(),
                        "request {}: items from closed pool {}",
                        d.request_id,
                        pool.0
                    );
                    for i in &d.items {
                        let item = &mut pool.3[*i as usize];
                        if let Some(q) = &mut item.1 {
                            *q = q.checked_sub(1).expect("never more issued than there was");
                        }
                        item.2 += 1;
                    }
                }
                Record::Admin(a) => {
                    let index = a.op.pool_index() as usize;
                    match &a.op {
                        AdminOp::Restock {
                            item_index, add, ..
                        } => {
                            let item = &mut m.pools[index].3[*item_index as usize];
                            *item.1.as_mut().expect("limited") += add;
                            *item.3.as_mut().expect("limited") += add;
                        }
                        AdminOp::SetQuantity {
                            item_index,
                            quantity,
                            ..
                        } => {
                            let item = &mut m.pools[index].3[*item_index as usize];
                            item.1 = Some(*quantity);
                            item.3 = Some(quantity + item.2);
                        }
                        AdminOp::SetWeight {
                            item_index, weight, ..
                        } => m.pools[index].3[*item_index as usize].4 = Some(*weight),
                        AdminOp::AddItem { item, .. } => {
                            let q = item.stock.quantity();
                            m.pools[index]
                                .3
                                .push((item.id.clone(), q, 0, q, item.weight));
                        }
                        AdminOp::AddPool { pool, .. } => {
                            assert_eq!(index, m.pools.len(), "add_pool index");
                            m.pools.push(seed(pool));
                        }
                        AdminOp::ClosePool { .. } => m.pools[index].2 = true,
                        AdminOp::OpenPool { .. } => m.pools[index].2 = false,
                    }
                }
                Record::Reserve { .. } | Record::Epoch(_) => {}
            }
        }
        for pool in &config.pools {
            if !m.pools.iter().any(|p| p.0 == pool.id) {
                m.pools.push(seed(pool));
            }
        }
        m
    }

    /// The same view of a recovered state.
    pub fn of_state(state: &rewardpool::state::State) -> PoolModel {
        PoolModel {
            pools: state
                .pools
                .iter()
                .map(|slot| {
                    (
                        slot.id.to_string(),
                        slot.pool.mode(),
                        slot.closed,
                        slot.pool
                            .items()
                            .iter()
                            .map(|i| (i.id.clone(), i.quantity, i.issued, i.stocked, i.weight))
                            .collect(),
                    )
                })
                .collect(),
        }
    }
}

/// Recovers read-only and checks the state against the WAL's story ([`PoolModel`]: draws and
/// admin commands) and `stocked = quantity + issued` for every limited item; and the WAL
/// alone: request IDs (draws and commands) strictly increasing, no draw `message_id` twice,
/// no command `message_id` applied twice.
pub fn check_state_with_commands(config: &Config, data_dir: &Path) {
    let records = wal_records(data_dir);
    let mut last = 0;
    let mut draw_keys = std::collections::HashSet::new();
    let mut admin_keys = std::collections::HashSet::new();
    for r in &records {
        let (id, key, keys) = match r {
            Record::Draw(d) => (d.request_id, &d.message_id, &mut draw_keys),
            Record::Admin(a) => (a.request_id, &a.message_id, &mut admin_keys),
            _ => continue,
        };
        assert!(id > last, "request IDs must increase: {id} after {last}");
        last = id;
        if let Some(key) = key {
            assert!(keys.insert(key.clone()), "message_id {key} used twice");
        }
    }
    let (mut state, _) =
        rewardpool::recovery::load(data_dir, config.storage.dedupe_window).expect("recovers");
    rewardpool::recovery::seed_in_memory(&mut state, config).unwrap();
    assert_eq!(
        PoolModel::of_state(&state),
        PoolModel::from_wal(config, &records),
        "recovered state = the WAL's story"
    );
    for (name, stocked, remaining, issued) in state.conservation() {
        assert_eq!(stocked, remaining + issued, "conservation of {name}");
    }
}
