//! Snapshots: the whole durable state as JSON, written atomically, newest two kept.
//!
//! File `snapshot-<seq, 20 digits>.json` = one header line, then the body:
//!
//! ```text
//! {"format":"rewardpool-snapshot","version":2,"seq":N,"body_bytes":L,"body_crc32c":C}
//! {"seq":N,"reserved_ids":..,"last_drawn_id":..,"pools":[..],"window":[..],"admin_window":[..],"epoch":{..}}
//! ```
//!
//! `seq` is the last WAL batch the snapshot covers. Write: temp file, fsync, rename, fsync the
//! directory — a crash at any step leaves either the old set of snapshots or the new one, plus
//! perhaps a `.tmp` that recovery deletes. Taking a snapshot is split in two so the engine
//! barely stalls: `Image::capture` copies what changes (quantities, the window's `Arc`s) on the
//! engine thread; serialising and writing happen on the snapshot thread.

use crate::dedupe::{MessageKey, key_from_hex, key_to_hex};
use crate::epoch::{EpochState, from_hex32, to_hex};
use crate::failpoint::failpoint;
use crate::pool::{Item, Mode, Pool};
use crate::state::{Outcome, State};
use crate::storage::{self, Storage};
use crate::wal;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const FORMAT: &str = "rewardpool-snapshot";
/// Version 2 added closed pools (`closed`), closed draws in the window (`closed`) and the
/// applied admin commands' window (`admin_window`, entries with `admin`: op and first reply);
/// version 1 files (no admin commands yet) still load.
const VERSION: u32 = 2;
const VERSIONS_READ: [u32; 2] = [1, 2];
/// How many snapshots are kept. WAL segments are deleted only below the oldest kept one, so a
/// corrupt newest snapshot falls back to the older one with the WAL still there to replay.
pub const SNAPSHOTS_KEPT: usize = 2;

/// The state copied at a batch boundary, cheap to take on the engine thread.
pub struct Image {
    pub seq: u64,
    pub reserved_ids: u64,
    pub last_drawn_id: u64,
    pools: Vec<PoolImage>,
    window: Vec<(MessageKey, Arc<Outcome>)>,
    admin_window: Vec<(MessageKey, Arc<Outcome>)>,
    /// The current draw epoch, so `audit` can start from this snapshot (src/epoch.rs).
    epoch: Option<EpochState>,
}

struct PoolImage {
    id: Arc<str>,
    mode: Mode,
    names: Arc<[Arc<str>]>,
    statics: Arc<[(Option<u64>, Option<u64>)]>,
    closed: bool,
    /// (quantity, issued): the only per-item values a draw changes.
    counts: Vec<(Option<u64>, u64)>,
}

impl Image {
    pub fn capture(state: &State) -> Image {
        Image {
            seq: state.seq,
            reserved_ids: state.reserved_ids,
            last_drawn_id: state.last_drawn_id,
            pools: state
                .pools
                .iter()
                .map(|slot| PoolImage {
                    id: slot.id.clone(),
                    mode: slot.pool.mode(),
                    names: slot.names.clone(),
                    statics: slot.statics.clone(),
                    closed: slot.closed,
                    counts: slot
                        .pool
                        .items()
                        .iter()
                        .map(|i| (i.quantity, i.issued))
                        .collect(),
                })
                .collect(),
            window: state.window.iter().map(|(k, v)| (k, v.clone())).collect(),
            admin_window: state
                .admin_window
                .iter()
                .map(|(k, v)| (k, v.clone()))
                .collect(),
            epoch: state.epoch.clone(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
    seq: u64,
    body_bytes: u64,
    body_crc32c: u32,
}

#[derive(Serialize)]
struct BodyOut<'a> {
    seq: u64,
    reserved_ids: u64,
    last_drawn_id: u64,
    pools: Vec<PoolOut<'a>>,
    window: Vec<EntryOut<'a>>,
    admin_window: Vec<EntryOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<EpochJson>,
}

/// The current epoch in a snapshot; absent in snapshots written before epochs existed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochJson {
    number: u64,
    secret: String,
    commitment: String,
    draws: u64,
}

#[derive(Serialize)]
struct PoolOut<'a> {
    id: &'a str,
    mode: Mode,
    closed: bool,
    items: Vec<ItemOut<'a>>,
}

/// Serialises exactly as `pool::Item` deserialises.
#[derive(Serialize)]
struct ItemOut<'a> {
    id: &'a str,
    quantity: Option<u64>,
    weight: Option<u64>,
    stocked: Option<u64>,
    issued: u64,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    key: String,
    request_id: u64,
    pool: &'a str,
    user: &'a str,
    count: u32,
    items: Vec<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    closed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    admin: Option<AdminEntry>,
}

/// An applied admin command in the window: its op and first reply.
#[derive(Serialize, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct AdminEntry {
    op: String,
    reply: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyIn {
    seq: u64,
    reserved_ids: u64,
    last_drawn_id: u64,
    pools: Vec<PoolIn>,
    window: Vec<EntryIn>,
    #[serde(default)]
    admin_window: Vec<EntryIn>,
    #[serde(default)]
    epoch: Option<EpochJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolIn {
    id: String,
    mode: Mode,
    #[serde(default)]
    closed: bool,
    items: Vec<Item>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryIn {
    key: String,
    request_id: u64,
    pool: String,
    user: String,
    count: u32,
    items: Vec<String>,
    #[serde(default)]
    closed: bool,
    #[serde(default)]
    admin: Option<AdminEntry>,
}

pub fn file_name(seq: u64) -> String {
    format!("snapshot-{seq:020}.json")
}

/// Snapshots in the directory, newest first.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    list_in(storage::real(), dir)
}

/// `list` through `fs`.
pub fn list_in(fs: &dyn Storage, dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = wal::numbered_files_in(fs, dir, "snapshot-", ".json")?;
    out.sort_by_key(|s| std::cmp::Reverse(s.0));
    Ok(out)
}

/// Serialises the image (header line + body).
pub fn encode(image: &Image) -> Vec<u8> {
    let body = BodyOut {
        seq: image.seq,
        reserved_ids: image.reserved_ids,
        last_drawn_id: image.last_drawn_id,
        pools: image
            .pools
            .iter()
            .map(|p| PoolOut {
                id: &p.id,
                mode: p.mode,
                closed: p.closed,
                items: p
                    .names
                    .iter()
                    .zip(p.statics.iter())
                    .zip(p.counts.iter())
                    .map(|((name, (weight, initial)), (quantity, issued))| {
                        // The accounting, as written: stocked = quantity + issued.
                        if let (Some(q), Some(stocked)) = (quantity, initial) {
                            assert_eq!(
                                q.checked_add(*issued),
                                Some(*stocked),
                                "snapshot of pool {} item {name}: stocked != quantity + issued",
                                p.id
                            );
                        }
                        ItemOut {
                            id: name,
                            quantity: *quantity,
                            weight: *weight,
                            stocked: *initial,
                            issued: *issued,
                        }
                    })
                    .collect(),
            })
            .collect(),
        window: image.window.iter().map(entry_out).collect(),
        admin_window: image.admin_window.iter().map(entry_out).collect(),
        epoch: image.epoch.as_ref().map(|e| EpochJson {
            number: e.number,
            secret: to_hex(&e.secret),
            commitment: to_hex(&e.commitment),
            draws: e.draws,
        }),
    };
    let body = serde_json::to_vec(&body).expect("snapshot body serialises");
    let header = Header {
        format: FORMAT.into(),
        version: VERSION,
        seq: image.seq,
        body_bytes: body.len() as u64,
        body_crc32c: crc32c::crc32c(&body),
    };
    let mut out = serde_json::to_vec(&header).expect("header serialises");
    out.push(b'\n');
    out.extend_from_slice(&body);
    out.push(b'\n');
    out
}

fn entry_out((key, o): &(MessageKey, Arc<Outcome>)) -> EntryOut<'_> {
    EntryOut {
        key: key_to_hex(*key),
        request_id: o.request_id,
        pool: &o.pool,
        user: &o.user,
        count: o.count,
        items: o.items.iter().map(|s| &**s).collect(),
        closed: o.closed,
        admin: o.admin.as_ref().map(|a| AdminEntry {
            op: a.op.clone(),
            reply: a.reply.clone(),
        }),
    }
}

/// Writes the snapshot atomically and durably; returns its path.
pub fn write(dir: &Path, image: &Image) -> io::Result<PathBuf> {
    write_in(storage::real(), dir, image)
}

/// `write` through `fs`.
pub fn write_in(fs: &dyn Storage, dir: &Path, image: &Image) -> io::Result<PathBuf> {
    let bytes = encode(image);
    let path = dir.join(file_name(image.seq));
    let tmp = dir.join(format!("{}.tmp", file_name(image.seq)));
    {
        // Owner only (Storage::create): a snapshot holds the current epoch's secret.
        let mut f = fs.create(&tmp)?;
        f.write_all(&bytes)?;
        failpoint("snapshot.after_tmp_write");
        f.sync_all()?;
    }
    fs.rename(&tmp, &path)?;
    failpoint("snapshot.after_rename");
    fs.sync_dir(dir)?;
    failpoint("snapshot.after_dir_sync");
    Ok(path)
}

/// Parses and checks a snapshot file into a `State`.
pub fn load(path: &Path, dedupe_window: usize) -> Result<State, String> {
    load_in(storage::real(), path, dedupe_window)
}

/// `load` through `fs`.
pub fn load_in(fs: &dyn Storage, path: &Path, dedupe_window: usize) -> Result<State, String> {
    let bytes = fs.read(path).map_err(|e| format!("read: {e}"))?;
    decode(&bytes, dedupe_window)
}

pub fn decode(bytes: &[u8], dedupe_window: usize) -> Result<State, String> {
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or("no header line")?;
    let header: Header =
        serde_json::from_slice(&bytes[..nl]).map_err(|e| format!("header: {e}"))?;
    if header.format != FORMAT || !VERSIONS_READ.contains(&header.version) {
        return Err(format!(
            "unsupported format {:?} version {}",
            header.format, header.version
        ));
    }
    let body = &bytes[nl + 1..];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    if body.len() as u64 != header.body_bytes {
        return Err(format!(
            "body is {} bytes, header says {}",
            body.len(),
            header.body_bytes
        ));
    }
    let crc = crc32c::crc32c(body);
    if crc != header.body_crc32c {
        return Err(format!(
            "body checksum {crc:#010x}, header says {:#010x}",
            header.body_crc32c
        ));
    }
    let body: BodyIn = serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
    if body.seq != header.seq {
        return Err("body and header disagree on seq".into());
    }
    if body.last_drawn_id > body.reserved_ids {
        return Err("last_drawn_id above reserved_ids".into());
    }
    let mut state = State::new(dedupe_window);
    state.seq = body.seq;
    state.reserved_ids = body.reserved_ids;
    state.last_drawn_id = body.last_drawn_id;
    if let Some(e) = body.epoch {
        let (Some(secret), Some(commitment)) = (from_hex32(&e.secret), from_hex32(&e.commitment))
        else {
            return Err("epoch secret or commitment is not 64 hex digits".into());
        };
        let epoch = EpochState::new(e.number, secret, commitment, e.draws);
        if !epoch.commitment_holds() {
            return Err(format!(
                "epoch {}: commitment is not sha256(secret)",
                e.number
            ));
        }
        state.epoch = Some(epoch);
    }
    for p in body.pools {
        // from_items checks every item's accounting: stocked = quantity + issued.
        let pool = Pool::from_items(&p.id, p.mode, p.items).map_err(|e| e.to_string())?;
        let index = state.add_pool(pool).map_err(|e| e.to_string())?;
        state.pools[index as usize].closed = p.closed;
    }
    let window = entries(&state, body.window, dedupe_window, false)?;
    let admin_window = entries(&state, body.admin_window, dedupe_window, true)?;
    for (key, outcome) in window {
        state.window.insert(key, outcome);
    }
    for (key, outcome) in admin_window {
        state.admin_window.insert(key, outcome);
    }
    Ok(state)
}

/// A window's entries, checked: keys once, request IDs increasing and drawn, names known;
/// `admin`: every entry is an applied command (no items), else none is.
fn entries(
    state: &State,
    list: Vec<EntryIn>,
    dedupe_window: usize,
    admin: bool,
) -> Result<Vec<(MessageKey, Arc<Outcome>)>, String> {
    // A smaller configured window keeps the newest entries.
    let skip = list.len().saturating_sub(dedupe_window);
    let mut last_id = 0;
    let mut keys = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(list.len() - skip);
    let mut name_maps: Vec<Option<std::collections::HashMap<Arc<str>, Arc<str>>>> =
        vec![None; state.pools.len()];
    for e in list.into_iter().skip(skip) {
        let key = key_from_hex(&e.key).ok_or("bad window key")?;
        let index = state
            .pool_index(&e.pool)
            .ok_or_else(|| format!("window entry names unknown pool {:?}", e.pool))?;
        let slot = state.pool(index).expect("index from pool_index");
        let names = name_maps[index as usize]
            .get_or_insert_with(|| slot.names.iter().map(|n| (n.clone(), n.clone())).collect());
        let mut items = Vec::with_capacity(e.items.len());
        for name in &e.items {
            let found = names
                .get(name.as_str())
                .ok_or_else(|| format!("window entry names unknown item {name:?}"))?;
            items.push(found.clone());
        }
        if (e.closed || e.admin.is_some()) && !items.is_empty() {
            return Err("closed or admin window entry with items".into());
        }
        if e.admin.is_some() != admin {
            return Err(if admin {
                "admin window entry without its command".into()
            } else {
                "draw window entry with an admin command".into()
            });
        }
        if e.request_id <= last_id || e.request_id > state.last_drawn_id {
            return Err("window entries out of order".into());
        }
        last_id = e.request_id;
        if !keys.insert(key) {
            return Err("window key twice".into());
        }
        let outcome = Outcome {
            request_id: e.request_id,
            pool: slot.id.clone(),
            user: Arc::from(e.user),
            count: e.count,
            items,
            closed: e.closed,
            admin: e.admin.map(|a| {
                Arc::new(crate::admin::AdminApplied {
                    op: a.op,
                    reply: a.reply,
                })
            }),
        };
        out.push((key, Arc::new(outcome)));
    }
    Ok(out)
}

/// Deletes snapshots beyond the newest `SNAPSHOTS_KEPT`, then the WAL segments whose batches
/// all lie at or below the oldest kept snapshot (recovery no longer needs them), oldest first,
/// except the newest of them up to `retain_bytes` in total (`storage.wal_retain_bytes`: history
/// kept for `rewardpool audit`; 0 = none). Oldest files go first, so a crash midway leaves a
/// WAL without holes.
pub fn prune(dir: &Path, keep_all_wal: bool, retain_bytes: u64) -> io::Result<()> {
    prune_in(storage::real(), dir, keep_all_wal, retain_bytes)
}

/// `prune` through `fs`.
pub fn prune_in(
    fs: &dyn Storage,
    dir: &Path,
    keep_all_wal: bool,
    retain_bytes: u64,
) -> io::Result<()> {
    let snapshots = list_in(fs, dir)?;
    if snapshots.len() < SNAPSHOTS_KEPT {
        return Ok(());
    }
    let oldest_kept = snapshots[SNAPSHOTS_KEPT - 1].0;
    for (_, path) in snapshots.iter().skip(SNAPSHOTS_KEPT).rev() {
        fs.remove(path)?;
        failpoint("snapshot.mid_prune");
    }
    if !keep_all_wal {
        let segments = wal::list_segments_in(fs, dir)?;
        // pair[0] holds batches first_seq ..= pair[1].first_seq - 1.
        let unneeded: Vec<&wal::SegmentInfo> = segments
            .windows(2)
            .take_while(|pair| pair[1].first_seq - 1 <= oldest_kept)
            .map(|pair| &pair[0])
            .collect();
        let mut sizes = Vec::with_capacity(unneeded.len());
        for segment in &unneeded {
            sizes.push(fs.len(&segment.path)?);
        }
        let mut retained: u64 = sizes.iter().sum();
        for (segment, size) in unneeded.iter().zip(sizes) {
            if retained <= retain_bytes {
                break;
            }
            fs.remove(&segment.path)?;
            retained -= size;
            failpoint("snapshot.mid_prune");
        }
    }
    fs.sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot file (header line + body) of `version` around `body`.
    fn file(version: u32, body: &str) -> Vec<u8> {
        let header = serde_json::json!({
            "format": FORMAT,
            "version": version,
            "seq": 3,
            "body_bytes": body.len(),
            "body_crc32c": crc32c::crc32c(body.as_bytes()),
        });
        format!("{header}\n{body}\n").into_bytes()
    }

    #[test]
    fn a_version_1_snapshot_loads_its_initial_as_stocked() {
        let body = r#"{"seq":3,"reserved_ids":64,"last_drawn_id":2,"pools":[{"id":"default","mode":"by_quantity","items":[{"id":"gold","quantity":9,"weight":null,"initial":10,"issued":1}]}],"window":[{"key":"2127ddaa7e87c1d2f991b2739b898616","request_id":2,"pool":"default","user":"u","count":1,"items":["gold"]}]}"#;
        let state = decode(&file(1, body), 16).unwrap();
        let gold = &state.items(0)[0];
        assert_eq!(
            (gold.quantity, gold.issued, gold.stocked),
            (Some(9), 1, Some(10))
        );
        assert!(!state.pools[0].closed);
        assert_eq!(state.window.len(), 1);
        assert!(state.admin_window.is_empty());
    }

    #[test]
    fn a_snapshot_whose_stock_does_not_add_up_or_whose_windows_are_mixed_is_refused() {
        let bad_stock = r#"{"seq":3,"reserved_ids":64,"last_drawn_id":2,"pools":[{"id":"default","mode":"by_quantity","closed":true,"items":[{"id":"gold","quantity":9,"weight":null,"stocked":11,"issued":1}]}],"window":[],"admin_window":[]}"#;
        let err = decode(&file(2, bad_stock), 16).unwrap_err();
        assert!(err.contains("stocked 11 != quantity 9 + issued 1"), "{err}");
        let draw_in_admin_window = r#"{"seq":3,"reserved_ids":64,"last_drawn_id":2,"pools":[{"id":"default","mode":"by_quantity","items":[{"id":"gold","quantity":9,"weight":null,"stocked":10,"issued":1}]}],"window":[],"admin_window":[{"key":"2127ddaa7e87c1d2f991b2739b898616","request_id":2,"pool":"default","user":"u","count":1,"items":[]}]}"#;
        let err = decode(&file(2, draw_in_admin_window), 16).unwrap_err();
        assert!(
            err.contains("admin window entry without its command"),
            "{err}"
        );
        let ok = draw_in_admin_window.replace(
            r#""items":[]}]"#,
            r#""items":[],"admin":{"op":"restock","reply":"{}"}}]"#,
        );
        let state = decode(&file(2, &ok), 16).unwrap();
        assert_eq!(state.admin_window.len(), 1);
    }
}
