//! Checksum repair for fuzz inputs. Every frame the decoders read carries a CRC32C, and a
//! mutated input almost never has a valid one, so on raw bytes the fuzzer would test little
//! beyond the checksum checks. Each target therefore decodes the input as given and, a second
//! time, a copy whose checksums (and, for snapshots, the header) are recomputed: the decoders
//! behind the checksums then see the mutations too.
#![allow(dead_code)] // each target uses some of these

use rewardpool::wal::BATCH_HEADER_BYTES;

const RECORD_HEADER_BYTES: usize = 8;

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> usize {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize
}

/// Records framed `len u32 | crc32c(body) u32 | body`, one after another: each frame whose
/// body fits gets its CRC recomputed.
pub fn records(buf: &mut [u8]) {
    let mut at = 0;
    while at + RECORD_HEADER_BYTES <= buf.len() {
        let len = get_u32(buf, at);
        let body = at + RECORD_HEADER_BYTES;
        if len > buf.len() - body {
            break;
        }
        let crc = crc32c::crc32c(&buf[body..body + len]);
        put_u32(buf, at + 4, crc);
        at = body + len;
    }
}

/// WAL batches one after another (`wal.rs` layout): the records inside each payload, the
/// payload CRC and the header CRC are recomputed, as far as the bytes go.
pub fn batches(buf: &mut [u8]) {
    let mut at = 0;
    while at + BATCH_HEADER_BYTES <= buf.len() {
        let payload = at + BATCH_HEADER_BYTES;
        let len = get_u32(buf, at + 16);
        let end = payload.saturating_add(len).min(buf.len());
        records(&mut buf[payload..end]);
        let crc = crc32c::crc32c(&buf[payload..end]);
        put_u32(buf, at + 20, crc);
        let crc = crc32c::crc32c(&buf[at..at + 24]);
        put_u32(buf, at + 24, crc);
        if end < payload + len {
            break;
        }
        at = end;
    }
}

/// A snapshot file (`snapshot.rs` layout) whose header line is rebuilt for the body that
/// follows it: the right length and CRC, the body's own `seq` when it has one, the header's
/// version.
pub fn snapshot(data: &[u8]) -> Vec<u8> {
    let (header, body) = match data.iter().position(|b| *b == b'\n') {
        Some(nl) => (&data[..nl], &data[nl + 1..]),
        None => (&data[..0], data),
    };
    // The format version as given (v1 and v2 both load), else the current one.
    let version = serde_json::from_slice::<serde_json::Value>(header)
        .ok()
        .and_then(|v| v.get("version").and_then(|s| s.as_u64()))
        .unwrap_or(2);
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let seq = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("seq").and_then(|s| s.as_u64()))
        .unwrap_or(0);
    let mut out = format!(
        "{{\"format\":\"rewardpool-snapshot\",\"version\":{version},\"seq\":{seq},\"body_bytes\":{},\"body_crc32c\":{}}}\n",
        body.len(),
        crc32c::crc32c(body)
    )
    .into_bytes();
    out.extend_from_slice(body);
    out.push(b'\n');
    out
}
