//! `inspect` and `wal dump`: read-only views of the data directory.
//!
//! Both go through `recovery::load`, which changes no file, so they are safe on a stopped
//! worker's directory, on an empty or missing one, and (with the usual caveat that a batch
//! being written may show as a torn tail) beside a running worker.

use crate::admin::{ItemView, PoolView};
use crate::config::Config;
use crate::record::AdminOp;
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
    /// Where the config and the durable state differ (printed on stderr, not in the JSON).
    #[serde(skip)]
    pub drift: Vec<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct InspectEpoch {
    pub number: u64,
    pub commitment: String,
    /// Draws made under it so far.
    pub draws: u64,
}

/// A pool as `inspect` shows it: id, mode, closed, items (`quantity`, `issued`, `stocked`,
/// `weight`; `stocked = quantity + issued` for every limited item, asserted as it is shown).
pub type InspectPool = PoolView;
pub type InspectItem = ItemView;

/// The recovered state as the contract's `inspect` JSON. Pools and items keep the config's
/// order; pools and items that only the durable state knows follow in state order.
pub fn inspect(config: &Config, data_dir: &Path) -> Result<InspectOutput, RecoveryError> {
    let (mut state, _) = recovery::load(data_dir, config.storage.dedupe_window)?;
    let drift = recovery::config_drift(&state, config);
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
            closed: slot.closed,
            items: idx.into_iter().map(|i| ItemView::of(&items[i])).collect(),
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
        drift,
    })
}

/// Prints every WAL record, oldest first, one per line. Damage is reported on `err`.
pub fn wal_dump(
    data_dir: &Path,
    dedupe_window: usize,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> io::Result<()> {
    // Names come from the newest valid snapshot (pool and item indexes never change; admin
    // commands only append) and from Seed, add_pool and add_item records as they appear.
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
                        writeln!(
                            out,
                            "seed pool={pool_id:?} index={pool_index} mode={} items={} [{}]",
                            mode.as_str(),
                            items.len(),
                            items_text(items)
                        )?;
                    }
                    Record::Admin(a) => {
                        let index = a.op.pool_index() as usize;
                        if let AdminOp::AddPool { pool, .. } = &a.op {
                            if index >= names.len() {
                                names.resize(index + 1, (String::new(), vec![]));
                            }
                            names[index] = (
                                pool.id.clone(),
                                pool.items.iter().map(|i| i.id.clone()).collect(),
                            );
                        }
                        if let AdminOp::AddItem { item, .. } = &a.op
                            && let Some(pool) = names.get_mut(index)
                        {
                            pool.1.push(item.id.clone());
                        }
                        let pool = names.get(index);
                        let pool_name =
                            pool.map_or_else(|| format!("#{index}"), |p| format!("{:?}", p.0));
                        let item_name = |i: u32| {
                            pool.and_then(|p| p.1.get(i as usize))
                                .map_or_else(|| format!("#{i}"), |n| format!("{n:?}"))
                        };
                        let detail = match &a.op {
                            AdminOp::Restock {
                                item_index, add, ..
                            } => format!("item={} add={add}", item_name(*item_index)),
                            AdminOp::SetQuantity {
                                item_index,
                                quantity,
                                ..
                            } => format!("item={} quantity={quantity}", item_name(*item_index)),
                            AdminOp::SetWeight {
                                item_index, weight, ..
                            } => format!("item={} weight={weight}", item_name(*item_index)),
                            AdminOp::AddItem { item, .. } => format!(
                                "item={:?} quantity={} weight={}",
                                item.id,
                                item.stock
                                    .quantity()
                                    .map_or("unlimited".to_string(), |q| q.to_string()),
                                item.weight.map_or("none".to_string(), |w| w.to_string())
                            ),
                            AdminOp::AddPool { pool, .. } => format!(
                                "index={index} mode={} items={} [{}]",
                                pool.mode.as_str(),
                                pool.items.len(),
                                items_text(&pool.items)
                            ),
                            AdminOp::ClosePool { .. } | AdminOp::OpenPool { .. } => String::new(),
                        };
                        writeln!(
                            out,
                            "admin request_id={} message_id={} op={} pool={pool_name}{}{detail}",
                            a.request_id,
                            a.message_id
                                .as_ref()
                                .map_or("none".to_string(), |m| format!("{m:?}")),
                            a.op.name(),
                            if detail.is_empty() { "" } else { " " },
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

/// Seed items as `wal dump` shows them: `id:quantity` or `id:quantity@weight` (`unlimited`),
/// the first 20, then how many more.
fn items_text(items: &[crate::seed::SeedItem]) -> String {
    let mut shown: Vec<String> = items
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
    if items.len() > 20 {
        shown.push(format!("…+{}", items.len() - 20));
    }
    shown.join(", ")
}
