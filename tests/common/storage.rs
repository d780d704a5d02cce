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

/// Every record in the WAL (all segments, oldest first: draws, admin commands, seeds,
/// reservations...), stopping at the first damage.
pub fn wal_records(data_dir: &Path) -> Vec<Record> {
    let mut out = Vec::new();
    let segments = wal::list_segments(data_dir)
        .unwrap_or_else(|e| panic!("list WAL segments in {}: {e}", data_dir.display()));
    for segment in segments {
        let bytes = std::fs::read(&segment.path)
            .unwrap_or_else(|e| panic!("read {}: {e}", segment.path.display()));
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
                    item.initial,
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
