//! `inspect` and `wal dump`: read-only views of the data directory.
//!
//! Both go through `recovery::load`, which changes no file, so they are safe on a stopped
//! worker's directory, on an empty or missing one, and (with the usual caveat that a batch
//! being written may show as a torn tail) beside a running worker.

use crate::config::Config;
use crate::record::Record;
use crate::recovery::{self, RecoveryError};
use crate::seed::PoolSeed;
use crate::snapshot;
use crate::wal::{self, ScanEnd};
use serde::Serialize;
use std::fs;
use std::io::{self, Write};
use std::path::Path;

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct InspectOutput {
    pub pools: Vec<InspectPool>,
    pub last_request_id: u64,
    /// The current draw epoch: its number and commitment, sha256(secret) (src/epoch.rs).
    /// Absent before the first draw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<InspectEpoch>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct InspectEpoch {
    pub number: u64,
    pub commitment: String,
    /// Draws made under it so far.
    pub draws: u64,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct InspectPool {
    pub id: String,
    pub mode: crate::seed::Mode,
    /// No admin command can close a pool yet (issue 7): always `false` for now.
    pub closed: bool,
    pub items: Vec<InspectItem>,
}

/// The contract's item: `quantity` left, `issued` ever drawn, `stocked` ever put in (`null`
/// for an unlimited item), `weight` (`null` in a `by_quantity` pool). `stocked = quantity +
/// issued` for every limited item.
#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct InspectItem {
    pub id: String,
    pub quantity: Option<u64>,
    pub issued: u64,
    pub stocked: Option<u64>,
    pub weight: Option<u64>,
}

/// The recovered state as the contract's `inspect` JSON. Pools and items keep the config's
/// order; pools and items that only the durable state knows follow in state order.
pub fn inspect(config: &Config, data_dir: &Path) -> Result<InspectOutput, RecoveryError> {
    let (mut state, _) = recovery::load(data_dir, config.storage.dedupe_window)?;
    recovery::seed_in_memory(&mut state, config)?;
    let mut order: Vec<u32> = config
        .pools
        .iter()
        .filter_map(|p| state.pool_index(&p.id))
        .collect();
    for i in 0..state.pools.len() as u32 {
        if !order.contains(&i) {
            order.push(i);
        }
    }
    let mut pools = Vec::new();
    for index in order {
        let slot = &state.pools[index as usize];
        let items = slot.pool.items();
        let mut idx: Vec<usize> = Vec::with_capacity(items.len());
        if let Some(cfg) = config.pool(&slot.id) {
            let by_id: std::collections::HashMap<&str, usize> = items
                .iter()
                .enumerate()
                .map(|(i, it)| (it.id.as_str(), i))
                .collect();
            for it in &cfg.items {
                if let Some(i) = by_id.get(it.id.as_str()) {
                    idx.push(*i);
                }
            }
            let known: std::collections::HashSet<usize> = idx.iter().copied().collect();
            idx.extend((0..items.len()).filter(|i| !known.contains(i)));
        } else {
            idx.extend(0..items.len());
        }
        pools.push(InspectPool {
            id: slot.id.to_string(),
            mode: slot.pool.mode(),
            closed: false,
            items: idx
                .into_iter()
                .map(|i| InspectItem {
                    id: items[i].id.clone(),
                    quantity: items[i].quantity,
                    issued: items[i].issued,
                    stocked: items[i].initial,
                    weight: items[i].weight,
                })
                .collect(),
        });
    }
    Ok(InspectOutput {
        pools,
        last_request_id: state.reserved_ids.max(state.last_drawn_id),
        epoch: state.epoch.as_ref().map(|e| InspectEpoch {
            number: e.number,
            commitment: crate::epoch::to_hex(&e.commitment),
            draws: e.draws,
        }),
    })
}

/// Prints every WAL record, oldest first, one per line. Damage is reported on `err`.
pub fn wal_dump(
    data_dir: &Path,
    dedupe_window: usize,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> io::Result<()> {
    // Names come from the newest valid snapshot (pool and item indexes never change) and from
    // Seed records as they appear.
    let mut names: Vec<(String, Vec<String>)> = Vec::new();
    for (_, path) in snapshot::list(data_dir)? {
        if let Ok(state) = snapshot::load(&path, dedupe_window) {
            names = state
                .pools
                .iter()
                .map(|p| {
                    (
                        p.id.to_string(),
                        p.names.iter().map(|n| n.to_string()).collect(),
                    )
                })
                .collect();
            break;
        }
    }
    for segment in wal::list_segments(data_dir)? {
        let bytes = fs::read(&segment.path)?;
        let end = wal::scan::<io::Error>(&bytes, |batch| {
            for (i, record) in batch.records.iter().enumerate() {
                write!(out, "batch={} record={} ", batch.seq, i + 1)?;
                match record {
                    Record::Reserve { ids_up_to } => {
                        writeln!(out, "reserve ids_up_to={ids_up_to}")?
                    }
                    // The secret stays out of the dump: `audit --export` reveals ended epochs.
                    Record::Epoch(epoch) => writeln!(
                        out,
                        "epoch number={} commitment={}",
                        epoch.number,
                        crate::epoch::to_hex(&epoch.commitment)
                    )?,
                    Record::Seed {
                        pool_index,
                        pool:
                            PoolSeed {
                                id: pool_id,
                                mode,
                                items,
                            },
                    } => {
                        if *pool_index as usize >= names.len() {
                            names.resize(*pool_index as usize + 1, (String::new(), vec![]));
                        }
                        names[*pool_index as usize] = (
                            pool_id.clone(),
                            items.iter().map(|i| i.id.clone()).collect(),
                        );
                        let shown: Vec<String> = items
                            .iter()
                            .take(20)
                            .map(|i| {
                                let q = i
                                    .stock
                                    .quantity()
                                    .map_or("unlimited".to_string(), |q| q.to_string());
                                match i.weight {
                                    Some(w) => format!("{}:{}@{}", i.id, q, w),
                                    None => format!("{}:{}", i.id, q),
                                }
                            })
                            .collect();
                        let more = if items.len() > 20 {
                            format!(" …+{}", items.len() - 20)
                        } else {
                            String::new()
                        };
                        writeln!(
                            out,
                            "seed pool={pool_id:?} index={pool_index} mode={} items={} [{}{more}]",
                            serde_json::to_string(mode)
                                .unwrap_or_default()
                                .trim_matches('"'),
                            items.len(),
                            shown.join(", ")
                        )?;
                    }
                    Record::Draw(d) => {
                        let pool = names.get(d.pool_index as usize);
                        let pool_name =
                            pool.map_or_else(|| format!("#{}", d.pool_index), |p| p.0.clone());
                        let items: Vec<String> = d
                            .items
                            .iter()
                            .map(|i| {
                                pool.and_then(|p| p.1.get(*i as usize))
                                    .map_or_else(|| format!("#{i}"), |n| format!("{n:?}"))
                            })
                            .collect();
                        writeln!(
                            out,
                            "draw request_id={} message_id={} pool={pool_name:?} user={:?} count={} items=[{}]",
                            d.request_id,
                            d.message_id
                                .as_ref()
                                .map_or("none".to_string(), |m| format!("{m:?}")),
                            d.user,
                            d.count,
                            items.join(", ")
                        )?;
                    }
                }
            }
            Ok(())
        })?;
        if let ScanEnd::Damaged { offset, reason } = end {
            writeln!(
                err,
                "{}: damaged at byte offset {offset}: {reason}",
                segment.path.display()
            )?;
        }
    }
    Ok(())
}
