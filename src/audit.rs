//! `rewardpool audit`: re-derives every retained draw and checks the log's story.
//!
//! Read-only: it opens files for reading only, takes no lock, and so runs beside a working
//! worker (a batch being written shows as an unverified tail of the last segment). It starts
//! from an empty state when the WAL still begins at batch 1, else from the oldest snapshot that
//! checks out, and replays every later batch through the state's own `apply` (the recovery
//! path: seeds, reservations, epochs and whatever other records the state knows) except draws,
//! which it re-derives (`State::redraw`: the epoch secret, the request ID and the pool state
//! before the draw) and compares with what the record says. It checks:
//!
//! * recorded items = re-derived items;
//! * every epoch's commitment is sha256(secret), epoch numbers increase, no draw before one;
//! * stock accounting (`stocked = quantity + issued`, `stocked` = the initial quantity plus
//!   every admin change) for every item a batch touched, after the batch, and for every item
//!   after any record that is not a draw;
//! * admin commands (`Admin` records) legal against the state they met (the live checks:
//!   pool and item exist, limited items, modes, 2^40 stock), applied as recovery applies them;
//!   a draw on a closed pool has no items (its result was `closed`) and consumes no words;
//! * request IDs strictly increasing, within the reserved range; no `message_id` drawn twice
//!   within the window; batches consecutive; every record decodes.
//!
//! It stops at the first mismatch (the state after it is no longer the log's): exit non-zero,
//! naming the file, the byte offset and the request ID. `--export` writes the bundle of
//! docs/audit.md as it goes.

use crate::epoch::to_hex;
use crate::record::{self, AdminOp, Record};
use crate::snapshot;
use crate::state::State;
use crate::wal::{self, BATCH_HEADER_BYTES, ScanEnd};
use serde::Serialize;
use serde_json::json;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Where and why the log's story does not hold.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Mismatch {
    pub file: String,
    pub offset: u64,
    pub request_id: Option<u64>,
    pub reason: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte offset {}", self.file, self.offset)?;
        if let Some(id) = self.request_id {
            write!(f, " (request {id})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// The JSON summary `audit` prints.
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub verified_draws: u64,
    /// Admin command records, each checked against the state it met and applied.
    pub verified_commands: u64,
    /// Epoch records met (their commitment checked).
    pub epochs: u64,
    /// The verified request-ID range, draws and commands (`null` when none was verified).
    pub first_request_id: Option<u64>,
    pub last_request_id: Option<u64>,
    pub mismatches: u64,
    /// The newest epoch (its secret is never exported: it may still be drawing).
    pub last_epoch: Option<u64>,
    pub records: u64,
    pub batches: u64,
    /// Where replay started: the snapshot's batch number (0 = the empty state, batch 1 on).
    pub from_snapshot_seq: u64,
    pub last_batch: u64,
    /// A torn or in-progress tail of the last segment that was not verified.
    pub unverified_tail: Option<Mismatch>,
    pub first_mismatch: Option<Mismatch>,
}

/// Audits `data_dir`; with `export`, writes the bundle there. Errors are I/O errors of the
/// audit itself; the log's faults are in the summary (`mismatches`, `first_mismatch`).
pub fn audit(
    data_dir: &Path,
    dedupe_window: usize,
    export: Option<&Path>,
    progress: bool,
) -> io::Result<Summary> {
    let summary = pass(data_dir, dedupe_window, None, progress, u64::MAX)?;
    let Some(path) = export else {
        return Ok(summary);
    };
    // Second pass, writing the bundle: now the last epoch is known, and every earlier one has
    // ended, so their secrets go out with their epoch lines. It stops where the first pass
    // stopped, so a worker writing meanwhile changes nothing in it.
    let mut out = Exporter::create(path, summary.last_epoch)?;
    let exported = pass(
        data_dir,
        dedupe_window,
        Some(&mut out),
        progress,
        summary.last_batch,
    )?;
    out.end(&exported)?;
    Ok(exported)
}

fn pass(
    data_dir: &Path,
    dedupe_window: usize,
    mut out: Option<&mut Exporter>,
    progress: bool,
    until_batch: u64,
) -> io::Result<Summary> {
    let mut summary = Summary::default();
    let segments = wal::list_segments(data_dir)?;
    let first_seq = segments.first().map_or(1, |s| s.first_seq);
    let (mut state, from) = start_state(data_dir, dedupe_window, first_seq)?;
    summary.from_snapshot_seq = from;
    summary.last_batch = state.seq;
    summary.last_epoch = state.epoch.as_ref().map(|e| e.number);
    if let Some(out) = &mut out {
        out.header(&state)?;
    }
    let bar = progress_bar(progress, &segments);
    let mut touched: Vec<(u32, u32)> = Vec::new();
    'segments: for (i, segment) in segments.iter().enumerate() {
        let file = segment.path.display().to_string();
        let bytes = fs::read(&segment.path)?;
        let mut stop = None;
        let end = wal::scan::<io::Error>(&bytes, |batch| {
            if stop.is_some() || batch.seq <= state.seq || batch.seq > until_batch {
                return Ok(());
            }
            let fail = |offset: u64, request_id: Option<u64>, reason: String| Mismatch {
                file: file.clone(),
                offset,
                request_id,
                reason,
            };
            if batch.seq != state.seq + 1 {
                stop = Some(fail(
                    batch.offset,
                    None,
                    format!("batch {} follows batch {}: a gap", batch.seq, state.seq),
                ));
                return Ok(());
            }
            let mut at = batch.offset + BATCH_HEADER_BYTES as u64;
            touched.clear();
            for record in &batch.records {
                let record_at = at;
                at += encoded_len(record);
                match record {
                    Record::Draw(draw) => {
                        let rid = Some(draw.request_id);
                        match state.redraw(draw) {
                            Err(e) => {
                                stop = Some(fail(record_at, rid, e.to_string()));
                                return Ok(());
                            }
                            Ok(items) if items != draw.items => {
                                stop = Some(fail(
                                    record_at,
                                    rid,
                                    format!(
                                        "recorded items {:?}, re-derived {:?} (pool index {})",
                                        draw.items, items, draw.pool_index
                                    ),
                                ));
                                return Ok(());
                            }
                            Ok(_) => {}
                        }
                        touched.extend(draw.items.iter().map(|i| (draw.pool_index, *i)));
                        summary.verified_draws += 1;
                        summary.first_request_id.get_or_insert(draw.request_id);
                        summary.last_request_id = Some(draw.request_id);
                        if let Some(out) = &mut out {
                            out.draw(draw)?;
                        }
                    }
                    Record::Epoch(epoch) => {
                        if crate::epoch::commitment(&epoch.secret) != epoch.commitment {
                            stop = Some(fail(
                                record_at,
                                None,
                                format!("epoch {}: commitment is not sha256(secret)", epoch.number),
                            ));
                            return Ok(());
                        }
                        if let Err(e) = state.apply(record) {
                            stop = Some(fail(record_at, None, e.to_string()));
                            return Ok(());
                        }
                        summary.epochs += 1;
                        summary.last_epoch = Some(epoch.number);
                        if let Some(out) = &mut out {
                            out.epoch(epoch.number, &epoch.commitment, &epoch.secret)?;
                        }
                    }
                    Record::Admin(admin) => {
                        let rid = Some(admin.request_id);
                        if let Err(e) = state.apply(record) {
                            stop = Some(fail(record_at, rid, e.to_string()));
                            return Ok(());
                        }
                        if let Some(bad) = stock_fault(&state, None) {
                            stop = Some(fail(record_at, rid, bad));
                            return Ok(());
                        }
                        summary.verified_commands += 1;
                        summary.first_request_id.get_or_insert(admin.request_id);
                        summary.last_request_id = Some(admin.request_id);
                        if let Some(out) = &mut out {
                            // The command, for the verifier to apply, then the pool as the
                            // audit has it after the command, for the verifier to compare.
                            out.command(admin)?;
                            out.pool(&state, admin.op.pool_index())?;
                        }
                    }
                    other => {
                        let pools_before = state.pools.len();
                        if let Err(e) = state.apply(other) {
                            stop = Some(fail(record_at, None, e.to_string()));
                            return Ok(());
                        }
                        if let Some(bad) = stock_fault(&state, None) {
                            stop = Some(fail(record_at, None, bad));
                            return Ok(());
                        }
                        if let Some(out) = &mut out {
                            // A seed adds a pool.
                            for index in pools_before..state.pools.len() {
                                out.pool(&state, index as u32)?;
                            }
                        }
                    }
                }
            }
            if let Some(bad) = stock_fault(&state, Some(&touched)) {
                stop = Some(fail(batch.offset, None, bad));
                return Ok(());
            }
            state.seq = batch.seq;
            summary.batches += 1;
            summary.records += batch.records.len() as u64;
            if let Some(bar) = &bar {
                bar.inc(batch.len_bytes);
            }
            Ok(())
        })?;
        if let Some(mismatch) = stop {
            summary.mismatches += 1;
            summary.first_mismatch = Some(mismatch);
            break 'segments;
        }
        if let ScanEnd::Damaged { offset, reason } = end {
            let damage = Mismatch {
                file: file.clone(),
                offset,
                request_id: None,
                reason: reason.to_string(),
            };
            let last = i + 1 == segments.len();
            if last && wal::find_valid_batch_after(&bytes, offset as usize).is_none() {
                // The tail of the newest segment: a torn write, or a batch a running worker
                // is writing now. Nothing after it, so nothing verified is in doubt.
                summary.unverified_tail = Some(damage);
            } else {
                summary.mismatches += 1;
                summary.first_mismatch = Some(damage);
            }
            break 'segments;
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    summary.last_batch = state.seq;
    Ok(summary)
}

/// The framed size of a record (to name a record's own offset within its batch).
fn encoded_len(record: &Record) -> u64 {
    match record {
        Record::Draw(draw) => {
            let message = draw.message_id.as_ref().map_or(0, |m| 1 + m.len());
            (8 + 1 + 8 + 1 + message + 4 + 2 + draw.user.len() + 2 + 4 * draw.items.len()) as u64
        }
        Record::Reserve { .. } => 8 + 1 + 8,
        Record::Epoch(_) => 8 + 1 + 8 + 32 + 32,
        other => {
            let mut buf = Vec::new();
            record::encode(&mut buf, other);
            buf.len() as u64
        }
    }
}

/// A stock accounting fault among `items` (all items when `None`).
fn stock_fault(state: &State, items: Option<&[(u32, u32)]>) -> Option<String> {
    let check = |pool: u32, index: u32| -> Option<String> {
        let slot = state.pool(pool)?;
        let item = slot.pool.items().get(index as usize)?;
        match (item.stocked, item.quantity) {
            (Some(stocked), Some(quantity))
                if quantity.checked_add(item.issued) != Some(stocked) =>
            {
                Some(format!(
                    "pool {:?} item {:?}: stocked {stocked} != quantity {quantity} + issued {}",
                    slot.id, item.id, item.issued
                ))
            }
            (Some(_), None) | (None, Some(_)) => Some(format!(
                "pool {:?} item {:?}: stocked and quantity disagree on being limited",
                slot.id, item.id
            )),
            _ => None,
        }
    };
    match items {
        Some(items) => items.iter().find_map(|(p, i)| check(*p, *i)),
        None => (0..state.pools.len() as u32)
            .find_map(|p| (0..state.items(p).len() as u32).find_map(|i| check(p, i))),
    }
}

/// The empty state when the WAL begins at batch 1; else the oldest snapshot that checks out
/// and that the retained WAL continues.
fn start_state(dir: &Path, window: usize, first_seq: u64) -> io::Result<(State, u64)> {
    if first_seq <= 1 {
        return Ok((State::new(window), 0));
    }
    let mut snapshots = snapshot::list(dir)?;
    snapshots.reverse();
    for (seq, path) in snapshots {
        if seq + 1 < first_seq {
            continue;
        }
        if let Ok(state) = snapshot::load(&path, window) {
            return Ok((state, seq));
        }
    }
    // No usable snapshot: replay from nothing; the first batch shows as a gap.
    Ok((State::new(window), 0))
}

fn progress_bar(wanted: bool, segments: &[wal::SegmentInfo]) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !wanted || !io::stderr().is_terminal() {
        return None;
    }
    let total: u64 = segments
        .iter()
        .filter_map(|s| fs::metadata(&s.path).ok())
        .map(|m| m.len())
        .sum();
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "audit {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    Some(bar)
}

/// Writes the audit bundle (docs/audit.md), one JSON object per line.
pub struct Exporter {
    out: BufWriter<fs::File>,
    path: PathBuf,
    /// Epochs below this one have ended: their secrets are written.
    last_epoch: Option<u64>,
}

impl Exporter {
    fn create(path: &Path, last_epoch: Option<u64>) -> io::Result<Exporter> {
        // It holds ended epochs' secrets: owner only until the operator publishes it.
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(path)?;
        Ok(Exporter {
            out: BufWriter::with_capacity(1 << 20, file),
            path: path.to_path_buf(),
            last_epoch,
        })
    }

    fn line(&mut self, value: &serde_json::Value) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")
    }

    fn header(&mut self, state: &State) -> io::Result<()> {
        self.line(&json!({
            "type": "header",
            "format": "rewardpool-audit-bundle",
            "version": 2,
            "stream": "hmac-sha256-ctr",
            "sampling": "lemire-u64",
        }))?;
        for index in 0..state.pools.len() {
            self.pool(state, index as u32)?;
        }
        if let Some(epoch) = &state.epoch {
            self.epoch(epoch.number, &epoch.commitment, &epoch.secret)?;
        }
        Ok(())
    }

    fn pool(&mut self, state: &State, index: u32) -> io::Result<()> {
        let slot = state.pool(index).expect("pool index in range");
        let items: Vec<_> = slot
            .pool
            .items()
            .iter()
            .map(|i| {
                json!({"id": i.id, "quantity": i.quantity, "weight": i.weight,
                       "issued": i.issued, "stocked": i.stocked})
            })
            .collect();
        self.line(&json!({
            "type": "pool",
            "pool_index": index,
            "id": &*slot.id,
            "mode": slot.pool.mode(),
            "closed": slot.closed,
            "items": items,
        }))
    }

    /// An applied admin command, by index (docs/audit.md, "command").
    fn command(&mut self, admin: &record::AdminRecord) -> io::Result<()> {
        let seed_item = |item: &crate::seed::SeedItem| json!({"id": item.id, "quantity": item.stock.quantity(), "weight": item.weight});
        let mut line = json!({
            "type": "command",
            "request_id": admin.request_id,
            "op": admin.op.name(),
            "pool_index": admin.op.pool_index(),
        });
        let fields = match &admin.op {
            AdminOp::Restock {
                item_index, add, ..
            } => json!({"item_index": item_index, "add": add}),
            AdminOp::SetQuantity {
                item_index,
                quantity,
                ..
            } => json!({"item_index": item_index, "quantity": quantity}),
            AdminOp::SetWeight {
                item_index, weight, ..
            } => json!({"item_index": item_index, "weight": weight}),
            AdminOp::AddItem { item, .. } => json!({"item": seed_item(item)}),
            AdminOp::AddPool { pool, .. } => json!({"pool": {
                "id": pool.id,
                "mode": pool.mode,
                "items": pool.items.iter().map(seed_item).collect::<Vec<_>>(),
            }}),
            AdminOp::ClosePool { .. } | AdminOp::OpenPool { .. } => json!({}),
        };
        if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), fields) {
            line.extend(fields);
        }
        self.line(&line)
    }

    fn epoch(&mut self, number: u64, commitment: &[u8; 32], secret: &[u8; 32]) -> io::Result<()> {
        let ended = self.last_epoch.is_some_and(|last| number < last);
        self.line(&json!({
            "type": "epoch",
            "number": number,
            "commitment": to_hex(commitment),
            "secret": if ended { Some(to_hex(secret)) } else { None },
        }))
    }

    fn draw(&mut self, draw: &record::DrawRecord) -> io::Result<()> {
        self.line(&json!({
            "type": "draw",
            "request_id": draw.request_id,
            "pool_index": draw.pool_index,
            "count": draw.count,
            "items": draw.items,
        }))
    }

    fn end(&mut self, summary: &Summary) -> io::Result<()> {
        self.line(&json!({
            "type": "end",
            "draws": summary.verified_draws,
            "commands": summary.verified_commands,
            "first_request_id": summary.first_request_id,
            "last_request_id": summary.last_request_id,
        }))?;
        self.out.flush()?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))
    }
}
