//! The write-ahead log: append-only segment files of checksummed batches.
//!
//! Layout: `data_dir/wal-<first batch seq, 20 digits>.log`. A segment holds whole batches; a
//! batch is what one group commit wrote with one `write` and one `fdatasync`:
//!
//! ```text
//! magic u32 | seq u64 | records u32 | payload_len u32 | crc32c(payload) u32 | crc32c(header) u32
//! payload = records, each framed by record.rs (len | crc32c | body)
//! ```
//!
//! Batch sequence numbers increase by one across segments: a snapshot names the last batch it
//! covers and recovery replays from the next one, detecting any gap. The payload CRC covers the
//! whole batch, so damage anywhere inside the last batch makes the whole batch the torn tail,
//! even when well-formed records follow inside it. Damage followed by a valid batch is not a
//! torn write but lost data in the middle, and `scan` reports it so recovery can refuse.

use crate::record::{self, Record};
use crate::storage::{self, Storage, StorageFile};
use std::io;
use std::path::{Path, PathBuf};

pub const BATCH_MAGIC: u32 = 0x3142_5052; // "RPB1" little-endian
pub const BATCH_HEADER_BYTES: usize = 28;
/// A batch payload is bounded: batches of at most `batch_records_max` draws, or one seed.
pub use crate::limits::BATCH_PAYLOAD_BYTES_MAX;

/// Builds one batch in memory: header space first, records appended, header filled last.
pub struct BatchBuilder {
    buf: Vec<u8>,
    records: u32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::with_capacity(4096)
    }

    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(BATCH_HEADER_BYTES + bytes);
        buf.extend_from_slice(&[0u8; BATCH_HEADER_BYTES]);
        BatchBuilder { buf, records: 0 }
    }
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
    pub fn push_record(&mut self, record: &Record) {
        record::encode(&mut self.buf, record);
        self.records += 1;
    }
    /// Call after appending one record's bytes directly through `buffer()`.
    pub fn count_record(&mut self) {
        self.records += 1;
    }
    pub fn records(&self) -> u32 {
        self.records
    }
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
    /// Fills the header and returns the finished batch bytes.
    pub fn finish(mut self, seq: u64) -> Vec<u8> {
        assert!(seq > 0);
        let payload_len = self.buf.len() - BATCH_HEADER_BYTES;
        assert!(payload_len <= BATCH_PAYLOAD_BYTES_MAX);
        let payload_crc = crc32c::crc32c(&self.buf[BATCH_HEADER_BYTES..]);
        let h = &mut self.buf[..BATCH_HEADER_BYTES];
        h[0..4].copy_from_slice(&BATCH_MAGIC.to_le_bytes());
        h[4..12].copy_from_slice(&seq.to_le_bytes());
        h[12..16].copy_from_slice(&self.records.to_le_bytes());
        h[16..20].copy_from_slice(&(payload_len as u32).to_le_bytes());
        h[20..24].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&h[0..24]);
        h[24..28].copy_from_slice(&header_crc.to_le_bytes());
        self.buf
    }
}

/// One decoded batch.
#[derive(Debug)]
pub struct Batch {
    pub seq: u64,
    pub offset: u64,
    pub len_bytes: u64,
    pub records: Vec<Record>,
}

/// Why the bytes at an offset are not a valid batch (a torn tail or corruption).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("truncated batch header ({got} of {BATCH_HEADER_BYTES} bytes)")]
    TruncatedHeader { got: usize },
    #[error("bad batch magic {0:#010x}")]
    BadMagic(u32),
    #[error("batch header checksum mismatch")]
    HeaderChecksum,
    #[error("batch payload length {0} exceeds the bound")]
    PayloadTooLong(usize),
    #[error("truncated batch payload ({got} of {len} bytes)")]
    TruncatedPayload { got: usize, len: usize },
    #[error("batch payload checksum mismatch")]
    PayloadChecksum,
    #[error("batch sequence number 0")]
    ZeroSeq,
    #[error("batch claims {count} records in {len} bytes")]
    TooManyRecords { count: usize, len: usize },
    /// The decode error is part of the message, not also a `source` (printed once).
    #[error("record at +{at}: {error}")]
    Record {
        at: usize,
        error: record::DecodeError,
    },
    #[error("batch header says {count} records, payload holds {held}")]
    CountMismatch { count: usize, held: usize },
}

/// Parses the batch at `offset`.
pub fn parse_batch(bytes: &[u8], offset: usize) -> Result<Batch, BatchError> {
    let rest = &bytes[offset..];
    if rest.len() < BATCH_HEADER_BYTES {
        return Err(BatchError::TruncatedHeader { got: rest.len() });
    }
    let h = &rest[..BATCH_HEADER_BYTES];
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
    if magic != BATCH_MAGIC {
        return Err(BatchError::BadMagic(magic));
    }
    let header_crc = u32::from_le_bytes(h[24..28].try_into().expect("4"));
    if crc32c::crc32c(&h[0..24]) != header_crc {
        return Err(BatchError::HeaderChecksum);
    }
    let seq = u64::from_le_bytes(h[4..12].try_into().expect("8"));
    let count = u32::from_le_bytes(h[12..16].try_into().expect("4")) as usize;
    let payload_len = u32::from_le_bytes(h[16..20].try_into().expect("4")) as usize;
    let payload_crc = u32::from_le_bytes(h[20..24].try_into().expect("4"));
    if payload_len > BATCH_PAYLOAD_BYTES_MAX {
        return Err(BatchError::PayloadTooLong(payload_len));
    }
    if rest.len() < BATCH_HEADER_BYTES + payload_len {
        return Err(BatchError::TruncatedPayload {
            got: rest.len() - BATCH_HEADER_BYTES,
            len: payload_len,
        });
    }
    let payload = &rest[BATCH_HEADER_BYTES..BATCH_HEADER_BYTES + payload_len];
    if crc32c::crc32c(payload) != payload_crc {
        return Err(BatchError::PayloadChecksum);
    }
    if seq == 0 {
        return Err(BatchError::ZeroSeq);
    }
    // Each record takes at least 9 bytes: bound the allocation by the payload.
    if count > payload_len / 9 + 1 {
        return Err(BatchError::TooManyRecords {
            count,
            len: payload_len,
        });
    }
    let mut records = Vec::with_capacity(count);
    let mut at = 0;
    while at < payload.len() {
        let (record, used) =
            record::decode(&payload[at..]).map_err(|error| BatchError::Record { at, error })?;
        records.push(record);
        at += used;
    }
    if records.len() != count {
        return Err(BatchError::CountMismatch {
            count,
            held: records.len(),
        });
    }
    Ok(Batch {
        seq,
        offset: offset as u64,
        len_bytes: (BATCH_HEADER_BYTES + payload_len) as u64,
        records,
    })
}

/// Where a scan of one segment stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Every byte belonged to a valid batch.
    Clean,
    /// Bytes from `offset` on do not form a valid batch.
    Damaged { offset: u64, reason: BatchError },
}

/// Scans a segment's bytes from the start; calls `on_batch` for each valid batch in order and
/// stops at the first invalid one.
pub fn scan<E>(
    bytes: &[u8],
    mut on_batch: impl FnMut(Batch) -> Result<(), E>,
) -> Result<ScanEnd, E> {
    let mut offset = 0;
    while offset < bytes.len() {
        match parse_batch(bytes, offset) {
            Ok(batch) => {
                offset += batch.len_bytes as usize;
                on_batch(batch)?;
            }
            Err(reason) => {
                return Ok(ScanEnd::Damaged {
                    offset: offset as u64,
                    reason,
                });
            }
        }
    }
    Ok(ScanEnd::Clean)
}

/// Looks for any valid batch starting after `from` (byte by byte, by magic). Used after damage
/// to tell a torn tail (nothing valid follows) from corruption in the middle (something does).
pub fn find_valid_batch_after(bytes: &[u8], from: usize) -> Option<(u64, u64)> {
    let magic = BATCH_MAGIC.to_le_bytes();
    let mut at = from + 1;
    while at + BATCH_HEADER_BYTES <= bytes.len() {
        if bytes[at..at + 4] == magic
            && let Ok(batch) = parse_batch(bytes, at)
        {
            return Some((at as u64, batch.seq));
        }
        at += 1;
    }
    None
}

/// A segment file on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub first_seq: u64,
}

pub fn segment_file_name(first_seq: u64) -> String {
    format!("wal-{first_seq:020}.log")
}

/// Files named `<prefix><number><suffix>` in `dir`, with their number, in no particular
/// order. A missing directory has none.
pub fn numbered_files(dir: &Path, prefix: &str, suffix: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    numbered_files_in(storage::real(), dir, prefix, suffix)
}

/// `numbered_files` through `fs`.
pub fn numbered_files_in(
    fs: &dyn Storage,
    dir: &Path,
    prefix: &str,
    suffix: &str,
) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match fs.list(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for (name, path) in entries {
        if let Some(seq) = name
            .strip_prefix(prefix)
            .and_then(|s| s.strip_suffix(suffix))
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, path));
        }
    }
    Ok(out)
}

/// Segments in the directory, oldest first. A missing directory has none.
pub fn list_segments(dir: &Path) -> io::Result<Vec<SegmentInfo>> {
    list_segments_in(storage::real(), dir)
}

/// `list_segments` through `fs`.
pub fn list_segments_in(fs: &dyn Storage, dir: &Path) -> io::Result<Vec<SegmentInfo>> {
    let mut out: Vec<SegmentInfo> = numbered_files_in(fs, dir, "wal-", ".log")?
        .into_iter()
        .map(|(first_seq, path)| SegmentInfo { path, first_seq })
        .collect();
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// The segment being appended to. Only the engine's writer thread holds one.
pub struct SegmentWriter {
    file: Box<dyn StorageFile>,
    path: PathBuf,
    len_bytes: u64,
}

impl SegmentWriter {
    /// Creates a new, empty segment whose first batch will be `first_seq`, and makes its
    /// directory entry durable.
    pub fn create(dir: &Path, first_seq: u64) -> io::Result<SegmentWriter> {
        Self::create_in(storage::real(), dir, first_seq)
    }

    /// `create` through `fs`.
    pub fn create_in(fs: &dyn Storage, dir: &Path, first_seq: u64) -> io::Result<SegmentWriter> {
        let path = dir.join(segment_file_name(first_seq));
        // Owner only (Storage::create): segments hold the epoch secrets (src/epoch.rs).
        let mut file = fs.create(&path)?;
        file.sync_all()?;
        fs.sync_dir(dir)?;
        Ok(SegmentWriter {
            file,
            path,
            len_bytes: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Writes one batch (no sync).
    pub fn append(&mut self, batch: &[u8]) -> io::Result<()> {
        self.file.write_all(batch)?;
        self.len_bytes += batch.len() as u64;
        Ok(())
    }

    /// `fdatasync`: the appended bytes and the file length are durable when this returns Ok.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// fsync a directory so that creates, renames and deletes in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    storage::real().sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, n: u64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for i in 0..n {
            b.push_record(&Record::Reserve { ids_up_to: i });
        }
        b.finish(seq)
    }

    #[test]
    fn scan_reads_batches_in_order() {
        let mut bytes = batch(1, 3);
        bytes.extend(batch(2, 0));
        bytes.extend(batch(3, 5));
        let mut seen = vec![];
        let end = scan::<()>(&bytes, |b| {
            seen.push((b.seq, b.records.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(end, ScanEnd::Clean);
        assert_eq!(seen, vec![(1, 3), (2, 0), (3, 5)]);
    }

    #[test]
    fn every_cut_inside_the_last_batch_is_a_torn_tail() {
        let first = batch(1, 2);
        let second = batch(2, 4);
        let mut bytes = first.clone();
        bytes.extend(&second);
        for cut in first.len() + 1..bytes.len() {
            let mut n = 0;
            let end = scan::<()>(&bytes[..cut], |_| {
                n += 1;
                Ok(())
            })
            .unwrap();
            assert_eq!(n, 1, "cut {cut}");
            assert!(matches!(end, ScanEnd::Damaged { offset, .. } if offset == first.len() as u64));
            assert_eq!(find_valid_batch_after(&bytes[..cut], first.len()), None);
        }
    }

    #[test]
    fn damage_before_a_valid_batch_is_found() {
        let mut bytes = batch(1, 2);
        let second_at = bytes.len();
        bytes.extend(batch(2, 2));
        let third_at = bytes.len();
        bytes.extend(batch(3, 2));
        bytes[second_at + BATCH_HEADER_BYTES + 3] ^= 0xff;
        let end = scan::<()>(&bytes, |_| Ok(())).unwrap();
        assert!(matches!(end, ScanEnd::Damaged { offset, .. } if offset == second_at as u64));
        assert_eq!(
            find_valid_batch_after(&bytes, second_at),
            Some((third_at as u64, 3))
        );
    }
}
