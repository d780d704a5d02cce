//! Recovery: from the files in the data directory to a state the engine can own.
//!
//! `load` is read-only (used by `inspect` and before every start): the newest snapshot that
//! parses and checks out, else the older one, else an empty state; then every WAL batch after
//! it, in sequence order. Damage in the WAL is classified:
//!
//! * nothing valid follows it → a torn tail (the last group commit was cut short): dropped;
//! * a valid batch follows it → corruption in the middle: refuse, naming file and offset;
//! * a batch missing between the snapshot and the WAL → refuse: data would be lost.
//!
//! `recover` (for `run`) then makes it durable, each step safe to crash in: truncate the torn
//! tail, seed pools that are new in the config (as `Seed` records in a fresh segment), write a
//! snapshot, start a fresh segment for the engine, prune old files.

use crate::config::Config;
use crate::failpoint::failpoint;
use crate::lock::{DirLock, LockError};
use crate::record::Record;
use crate::seed::PoolSeed;
use crate::snapshot::{self, Image};
use crate::state::State;
use crate::storage::{self, Storage};
use crate::wal::{self, BatchBuilder, ScanEnd, SegmentWriter};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(
        "disk full while writing {path}: free space on the disk of the data directory and start again (nothing was lost)"
    )]
    DiskFull { path: String },
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: String,
        error: io::Error,
    },
    #[error(
        "WAL corrupt in {file} at byte offset {offset}: {reason}; valid data follows, so this is not a torn write. Refusing to start: move the damaged file aside only if losing its records is acceptable"
    )]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("WAL record invalid in {file} at byte offset {offset}: {reason}")]
    BadRecord {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error(
        "WAL gap: batch {expected} is missing ({detail}); refusing to start, data would be lost"
    )]
    Gap { expected: u64, detail: String },
    #[error("pool {pool:?} of the config cannot be seeded: {reason}")]
    Seed { pool: String, reason: String },
    // Transparent: the lock error is the whole message; with `{0}` plus `#[from]` an error
    // chain printed it twice (once as this error, once as its source).
    #[error(transparent)]
    Lock(#[from] LockError),
}

fn io_error(what: &'static str, path: &Path, error: io::Error) -> RecoveryError {
    if is_disk_full(&error) {
        return RecoveryError::DiskFull {
            path: path.display().to_string(),
        };
    }
    RecoveryError::Io {
        what,
        path: path.display().to_string(),
        error,
    }
}

use crate::engine::is_disk_full;

/// What `load` found, for logs and for `recover`'s repairs.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub snapshot: Option<(u64, PathBuf)>,
    /// Snapshots that failed their checks, with the reason.
    pub bad_snapshots: Vec<(PathBuf, String)>,
    pub batches_replayed: u64,
    pub records_replayed: u64,
    /// Torn tail: file, offset where it starts, bytes after it, reason.
    pub torn_tail: Option<(PathBuf, u64, u64, wal::BatchError)>,
    /// Segments after a torn tail that hold no valid batch.
    pub empty_after_tail: Vec<PathBuf>,
}

/// Read-only recovery of the durable state. Changes no file.
pub fn load(dir: &Path, dedupe_window: usize) -> Result<(State, LoadReport), RecoveryError> {
    load_in(storage::real(), dir, dedupe_window)
}

/// `load` through `fs`.
pub fn load_in(
    fs: &dyn Storage,
    dir: &Path,
    dedupe_window: usize,
) -> Result<(State, LoadReport), RecoveryError> {
    let mut report = LoadReport::default();
    let mut state = None;
    for (seq, path) in snapshot::list_in(fs, dir).map_err(|e| io_error("list", dir, e))? {
        match snapshot::load_in(fs, &path, dedupe_window) {
            Ok(s) => {
                report.snapshot = Some((seq, path));
                state = Some(s);
                break;
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), %reason, "snapshot invalid, trying an older one");
                report.bad_snapshots.push((path, reason));
            }
        }
    }
    let mut state = state.unwrap_or_else(|| State::new(dedupe_window));
    let base_seq = state.seq;
    let segments = wal::list_segments_in(fs, dir).map_err(|e| io_error("list", dir, e))?;
    for (i, segment) in segments.iter().enumerate() {
        let file = segment.path.display().to_string();
        let bytes = fs
            .read(&segment.path)
            .map_err(|e| io_error("read", &segment.path, e))?;
        let end = wal::scan(&bytes, |batch| {
            if batch.seq <= base_seq {
                return Ok(());
            }
            if batch.seq != state.seq + 1 {
                return Err(RecoveryError::Gap {
                    expected: state.seq + 1,
                    detail: format!(
                        "{file} at byte offset {} holds batch {}{}",
                        batch.offset,
                        batch.seq,
                        if report.snapshot.is_none() && state.seq == 0 {
                            " and no valid snapshot covers the batches before it"
                        } else {
                            ""
                        }
                    ),
                });
            }
            for record in &batch.records {
                state.apply(record).map_err(|e| RecoveryError::BadRecord {
                    file: file.clone(),
                    offset: batch.offset,
                    reason: e.to_string(),
                })?;
            }
            state.seq = batch.seq;
            report.batches_replayed += 1;
            report.records_replayed += batch.records.len() as u64;
            Ok(())
        })?;
        if let ScanEnd::Damaged { offset, reason } = end {
            if let Some((at, seq)) = wal::find_valid_batch_after(&bytes, offset as usize) {
                return Err(RecoveryError::Corrupt {
                    file,
                    offset,
                    reason: format!("{reason} (valid batch {seq} follows at offset {at})"),
                });
            }
            for later in &segments[i + 1..] {
                let later_bytes = fs
                    .read(&later.path)
                    .map_err(|e| io_error("read", &later.path, e))?;
                let valid_at_start = wal::parse_batch(&later_bytes, 0).is_ok();
                if valid_at_start || wal::find_valid_batch_after(&later_bytes, 0).is_some() {
                    return Err(RecoveryError::Corrupt {
                        file,
                        offset,
                        reason: format!(
                            "{reason} (valid batches follow in {})",
                            later.path.display()
                        ),
                    });
                }
                report.empty_after_tail.push(later.path.clone());
            }
            report.torn_tail = Some((
                segment.path.clone(),
                offset,
                bytes.len() as u64 - offset,
                reason,
            ));
            break;
        }
    }
    Ok((state, report))
}

/// Seeds, in memory only, the config's pools that the state does not have (for `inspect`).
/// Seeds, in memory, the config's pools that the state does not have, and returns their
/// `Seed` records (`recover` makes them durable; `inspect` only shows the result).
pub fn seed_in_memory(state: &mut State, config: &Config) -> Result<Vec<Record>, RecoveryError> {
    let mut seeds = Vec::new();
    for pool in &config.pools {
        if state.pool_index(&pool.id).is_none() {
            let record = state.seed_record(pool);
            state.apply(&record).map_err(|e| RecoveryError::Seed {
                pool: pool.id.clone(),
                reason: e.to_string(),
            })?;
            seeds.push(record);
        }
    }
    Ok(seeds)
}

/// Differences between the config and a pool that already has durable state, one line each
/// naming the pool, the item, the field, the config's value and the durable value. A config
/// item's `quantity` is the stock it puts in, so it is compared with the durable `stocked`
/// (draws do not make drift; admin changes do). The durable state wins.
pub fn config_differences(state: &State, pool: &PoolSeed) -> Vec<String> {
    let Some(index) = state.pool_index(&pool.id) else {
        return vec![];
    };
    let units = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |q| q.to_string());
    let weight = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |w| w.to_string());
    let mut out = vec![];
    let mode = state.mode(index);
    if mode != pool.mode {
        out.push(format!(
            "pool {:?} field mode: config {}, durable {}",
            pool.id,
            pool.mode.as_str(),
            mode.as_str()
        ));
    }
    if state.pools[index as usize].closed {
        out.push(format!(
            "pool {:?} field closed: config false, durable true",
            pool.id
        ));
    }
    let items = state.items(index);
    for item in &pool.items {
        match items.iter().find(|i| i.id == item.id) {
            None => out.push(format!(
                "pool {:?} item {:?} field item: config present, durable absent",
                pool.id, item.id
            )),
            Some(have) => {
                if have.stocked != item.stock.quantity() {
                    out.push(format!(
                        "pool {:?} item {:?} field quantity: config {}, durable {} (stocked; {} left, {} issued)",
                        pool.id,
                        item.id,
                        units(item.stock.quantity()),
                        units(have.stocked),
                        units(have.quantity),
                        have.issued
                    ));
                }
                if have.weight != item.weight {
                    out.push(format!(
                        "pool {:?} item {:?} field weight: config {}, durable {}",
                        pool.id,
                        item.id,
                        weight(item.weight),
                        weight(have.weight)
                    ));
                }
            }
        }
    }
    for have in items {
        if !pool.items.iter().any(|i| i.id == have.id) {
            out.push(format!(
                "pool {:?} item {:?} field item: config absent, durable present",
                pool.id, have.id
            ));
        }
    }
    out
}

/// Every difference between the config and the durable state ([`config_differences`] for
/// each config pool, then one line for each durable pool the config does not name).
pub fn config_drift(state: &State, config: &Config) -> Vec<String> {
    let mut out: Vec<String> = config
        .pools
        .iter()
        .flat_map(|pool| config_differences(state, pool))
        .collect();
    for slot in &state.pools {
        if config.pool(&slot.id).is_none() {
            out.push(format!(
                "pool {:?} field pool: config absent, durable present",
                &*slot.id
            ));
        }
    }
    out
}

pub struct Recovered {
    pub lock: DirLock,
    pub state: State,
    /// A fresh segment the engine appends to.
    pub segment: SegmentWriter,
    pub report: LoadReport,
}

/// Full recovery for `run`: lock, load, repair, seed, snapshot, rotate, prune.
pub fn recover(config: &Config, keep_all_wal: bool) -> Result<Recovered, RecoveryError> {
    recover_in(storage::real(), config, keep_all_wal)
}

/// `recover` through `fs` (the directory lock is always a real file).
pub fn recover_in(
    fs: &dyn Storage,
    config: &Config,
    keep_all_wal: bool,
) -> Result<Recovered, RecoveryError> {
    let dir = config.storage.data_dir.as_path();
    fs.create_dir_all(dir)
        .map_err(|e| io_error("create data directory", dir, e))?;
    // Owner only (0700, 0600): the WAL and the snapshots hold draw epoch secrets.
    fs.restrict_to_owner(dir)
        .map_err(|e| io_error("restrict permissions of", dir, e))?;
    let lock = DirLock::acquire(dir).map_err(|e| match e {
        LockError::Io { path, error } if is_disk_full(&error) => RecoveryError::DiskFull { path },
        e => RecoveryError::Lock(e),
    })?;
    remove_temp_files(fs, dir)?;
    let (mut state, report) = load_in(fs, dir, config.storage.dedupe_window)?;
    for (path, reason) in &report.bad_snapshots {
        let aside = path.with_extension("json.corrupt");
        tracing::warn!(file = %path.display(), %reason, moved_to = %aside.display(), "corrupt snapshot moved aside");
        fs.rename(path, &aside)
            .map_err(|e| io_error("move aside", path, e))?;
    }
    if let Some((path, offset, dropped, reason)) = &report.torn_tail {
        tracing::warn!(
            file = %path.display(), offset, dropped_bytes = dropped, %reason,
            "torn WAL tail: truncating the last, incomplete group commit"
        );
        // Truncating destroys bytes: only on damage a second read shows again (a byte
        // corrupted on one read must not cost a durable batch). Found by tests/storage_sim.rs.
        let again = fs.read(path).map_err(|e| io_error("read", path, e))?;
        let same = matches!(
            wal::scan::<()>(&again, |_| Ok(())),
            Ok(ScanEnd::Damaged { offset: o, .. }) if o == *offset
        ) && again.len() as u64 == offset + dropped;
        if !same {
            return Err(RecoveryError::Io {
                what: "re-read before truncating",
                path: path.display().to_string(),
                error: io::Error::other("two reads of the segment disagree; nothing truncated"),
            });
        }
        fs.truncate(path, *offset)
            .map_err(|e| io_error("truncate", path, e))?;
        for empty in &report.empty_after_tail {
            tracing::warn!(file = %empty.display(), "removing WAL segment after the torn tail: it holds no valid batch");
            fs.remove(empty).map_err(|e| io_error("remove", empty, e))?;
        }
        fs.sync_dir(dir).map_err(|e| io_error("fsync", dir, e))?;
        failpoint("recovery.after_truncate");
    }
    tracing::info!(
        snapshot = ?report.snapshot.as_ref().map(|s| s.0),
        batches = report.batches_replayed,
        records = report.records_replayed,
        "state recovered"
    );

    for pool in &config.pools {
        let diffs = config_differences(&state, pool);
        if !diffs.is_empty() {
            tracing::warn!(pool = %pool.id, differences = %diffs.join("; "),
                "config differs from the pool's durable state; the durable state is kept");
        }
    }
    // Seed new pools durably before anything can draw from them.
    let seeds = seed_in_memory(&mut state, config)?;
    for seed in &seeds {
        if let Record::Seed { pool, .. } = seed {
            tracing::info!(pool = %pool.id, "pool seeded from the config");
        }
    }
    if !seeds.is_empty() {
        let seq = state.seq + 1;
        let mut segment =
            SegmentWriter::create_in(fs, dir, seq).map_err(|e| io_error("create", dir, e))?;
        let mut batch = BatchBuilder::new();
        for r in &seeds {
            batch.push_record(r);
        }
        let bytes = batch.finish(seq);
        segment
            .append(&bytes)
            .map_err(|e| io_error("write", segment.path(), e))?;
        segment
            .sync()
            .map_err(|e| io_error("fsync", segment.path(), e))?;
        state.seq = seq;
        failpoint("recovery.after_seed");
    }
    snapshot::write_in(fs, dir, &Image::capture(&state))
        .map_err(|e| io_error("write snapshot in", dir, e))?;
    failpoint("recovery.after_snapshot");
    let segment =
        SegmentWriter::create_in(fs, dir, state.seq + 1).map_err(|e| io_error("create", dir, e))?;
    failpoint("recovery.after_rotate");
    snapshot::prune_in(fs, dir, keep_all_wal, config.storage.wal_retain_bytes)
        .map_err(|e| io_error("prune", dir, e))?;
    Ok(Recovered {
        lock,
        state,
        segment,
        report,
    })
}

fn remove_temp_files(fs: &dyn Storage, dir: &Path) -> Result<(), RecoveryError> {
    for (name, path) in fs.list(dir).map_err(|e| io_error("list", dir, e))? {
        if name.ends_with(".tmp") {
            fs.remove(&path).map_err(|e| io_error("remove", &path, e))?;
        }
    }
    Ok(())
}
