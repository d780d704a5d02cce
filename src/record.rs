//! WAL records and their binary encoding.
//!
//! A record is the unit of durable change. Four kinds exist:
//!
//! * `Seed` — a pool entered the durable state (its full definition), so the WAL is
//!   self-describing and replay from an older snapshot never meets an unknown pool.
//! * `Reserve` — request IDs up to `ids_up_to` may have been handed out. Written ahead of need
//!   so ingest never waits for an fsync to give an ID, and so an ID handed out before a crash
//!   is never handed out again after it.
//! * `Draw` — one drawn request: everything replay needs and everything a republished result
//!   needs (request ID, `message_id`, pool, user, count, items). A draw on a closed pool has no
//!   items; its `closed` status is not stored: replay knows the pool was closed at that point.
//! * `Admin` — one applied admin command (kind 4, an op sub-tag inside): its request ID,
//!   `message_id` and the change by pool and item index (`add_item`/`add_pool` carry the new
//!   item or the whole pool). Only applied commands are records; a rejected one changes nothing.
//! * `Epoch` (kind 5) — a new draw epoch: its number, its 256-bit secret and sha256(secret);
//!   written before the first draw derived from it (src/epoch.rs).
//!
//! Frame: `len: u32 | crc32c(body): u32 | body`, little-endian. Every variable field carries its
//! length and is bounded (`*_BYTES_MAX`), so a decoder never allocates on a corrupt length.
//! Records are checked before they are written (`encode` asserts bounds) and after they are
//! read (`decode` checks the CRC and every bound): TigerBeetle's pair assertions.

use crate::pool::Mode;
use crate::seed::{PoolSeed, SeedItem, Stock};

use crate::limits::RECORD_NAME_BYTES_MAX as NAME_BYTES_MAX;
pub use crate::limits::{COUNT_MAX, MESSAGE_ID_BYTES_MAX, RECORD_BYTES_MAX, USER_BYTES_MAX};
const FRAME_HEADER_BYTES: usize = 8;

const KIND_SEED: u8 = 1;
const KIND_RESERVE: u8 = 2;
const KIND_DRAW: u8 = 3;
const KIND_ADMIN: u8 = 4;
const KIND_EPOCH: u8 = 5;

const OP_RESTOCK: u8 = 1;
const OP_SET_QUANTITY: u8 = 2;
const OP_SET_WEIGHT: u8 = 3;
const OP_ADD_ITEM: u8 = 4;
const OP_ADD_POOL: u8 = 5;
const OP_CLOSE_POOL: u8 = 6;
const OP_OPEN_POOL: u8 = 7;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Seed { pool_index: u32, pool: PoolSeed },
    Reserve { ids_up_to: u64 },
    Draw(DrawRecord),
    Epoch(EpochRecord),
    Admin(AdminRecord),
}

/// A draw epoch begins: every draw after it, up to the next one, derives from `secret`.
#[derive(Clone, PartialEq, Eq)]
pub struct EpochRecord {
    pub number: u64,
    pub secret: [u8; 32],
    /// sha256(secret), as published while the epoch ran.
    pub commitment: [u8; 32],
}

/// Never prints the secret.
impl std::fmt::Debug for EpochRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochRecord")
            .field("number", &self.number)
            .field("commitment", &crate::epoch::to_hex(&self.commitment))
            .finish_non_exhaustive()
    }
}

/// One applied admin command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminRecord {
    pub request_id: u64,
    pub message_id: Option<String>,
    pub op: AdminOp,
}

/// An admin command's change, by index (checked against the state before it is a record).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminOp {
    Restock {
        pool_index: u32,
        item_index: u32,
        add: u64,
    },
    SetQuantity {
        pool_index: u32,
        item_index: u32,
        quantity: u64,
    },
    SetWeight {
        pool_index: u32,
        item_index: u32,
        weight: u64,
    },
    /// The item's index is the pool's item count before it.
    AddItem {
        pool_index: u32,
        item: SeedItem,
    },
    /// The pool's index is the state's pool count before it.
    AddPool {
        pool_index: u32,
        pool: PoolSeed,
    },
    ClosePool {
        pool_index: u32,
    },
    OpenPool {
        pool_index: u32,
    },
}

impl AdminOp {
    /// The contract's name of the op.
    pub fn name(&self) -> &'static str {
        match self {
            AdminOp::Restock { .. } => "restock",
            AdminOp::SetQuantity { .. } => "set_quantity",
            AdminOp::SetWeight { .. } => "set_weight",
            AdminOp::AddItem { .. } => "add_item",
            AdminOp::AddPool { .. } => "add_pool",
            AdminOp::ClosePool { .. } => "close_pool",
            AdminOp::OpenPool { .. } => "open_pool",
        }
    }

    pub fn pool_index(&self) -> u32 {
        match self {
            AdminOp::Restock { pool_index, .. }
            | AdminOp::SetQuantity { pool_index, .. }
            | AdminOp::SetWeight { pool_index, .. }
            | AdminOp::AddItem { pool_index, .. }
            | AdminOp::AddPool { pool_index, .. }
            | AdminOp::ClosePool { pool_index }
            | AdminOp::OpenPool { pool_index } => *pool_index,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrawRecord {
    pub request_id: u64,
    pub message_id: Option<String>,
    pub pool_index: u32,
    pub user: String,
    pub count: u32,
    /// Item indexes within the pool, in draw order; fewer than `count` only when the pool ran out.
    pub items: Vec<u32>,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("record length {0} exceeds the bound")]
    TooLong(usize),
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("record field invalid: {0}")]
    Field(&'static str),
    #[error("record has {0} trailing bytes")]
    Trailing(usize),
}

/// A draw borrowed from the engine's request, encoded without copying its strings.
#[derive(Clone, Copy, Debug)]
pub struct DrawRef<'a> {
    pub request_id: u64,
    pub message_id: Option<&'a str>,
    pub pool_index: u32,
    pub user: &'a str,
    pub count: u32,
    pub items: &'a [u32],
}

impl DrawRecord {
    pub fn as_ref(&self) -> DrawRef<'_> {
        DrawRef {
            request_id: self.request_id,
            message_id: self.message_id.as_deref(),
            pool_index: self.pool_index,
            user: &self.user,
            count: self.count,
            items: &self.items,
        }
    }
}

impl DrawRef<'_> {
    pub fn to_owned(&self) -> DrawRecord {
        DrawRecord {
            request_id: self.request_id,
            message_id: self.message_id.map(str::to_string),
            pool_index: self.pool_index,
            user: self.user.to_string(),
            count: self.count,
            items: self.items.to_vec(),
        }
    }
}

/// Appends the framed encoding of a draw to `out` (hot path: no `Record`, no copies).
pub fn encode_draw(out: &mut Vec<u8>, draw: &DrawRef<'_>) {
    assert!(draw.request_id > 0);
    assert!(
        draw.message_id
            .is_none_or(|m| m.len() <= MESSAGE_ID_BYTES_MAX)
    );
    assert!(draw.user.len() <= USER_BYTES_MAX);
    assert!(draw.count >= 1 && draw.count <= COUNT_MAX);
    assert!(draw.items.len() <= draw.count as usize);
    let start = begin_frame(out);
    out.push(KIND_DRAW);
    out.extend_from_slice(&draw.request_id.to_le_bytes());
    match draw.message_id {
        None => out.push(0),
        Some(m) => {
            out.push(1);
            out.push(m.len() as u8);
            out.extend_from_slice(m.as_bytes());
        }
    }
    out.extend_from_slice(&draw.pool_index.to_le_bytes());
    out.extend_from_slice(&(draw.user.len() as u16).to_le_bytes());
    out.extend_from_slice(draw.user.as_bytes());
    out.push(draw.count as u8);
    out.push(draw.items.len() as u8);
    for item in draw.items {
        out.extend_from_slice(&item.to_le_bytes());
    }
    end_frame(out, start);
}

pub fn encode(out: &mut Vec<u8>, record: &Record) {
    match record {
        Record::Draw(draw) => encode_draw(out, &draw.as_ref()),
        Record::Admin(admin) => encode_admin(out, admin),
        Record::Reserve { ids_up_to } => {
            let start = begin_frame(out);
            out.push(KIND_RESERVE);
            out.extend_from_slice(&ids_up_to.to_le_bytes());
            end_frame(out, start);
        }
        Record::Epoch(epoch) => {
            let start = begin_frame(out);
            out.push(KIND_EPOCH);
            out.extend_from_slice(&epoch.number.to_le_bytes());
            out.extend_from_slice(&epoch.secret);
            out.extend_from_slice(&epoch.commitment);
            end_frame(out, start);
        }
        Record::Seed { pool_index, pool } => {
            let start = begin_frame(out);
            out.push(KIND_SEED);
            out.extend_from_slice(&pool_index.to_le_bytes());
            put_pool(out, pool);
            end_frame(out, start);
        }
    }
}

fn put_pool(out: &mut Vec<u8>, pool: &PoolSeed) {
    let PoolSeed {
        id: pool_id,
        mode,
        items,
    } = pool;
    assert!(pool_id.len() <= NAME_BYTES_MAX);
    put_name(out, pool_id);
    out.push(match mode {
        Mode::ByQuantity => 0,
        Mode::ByWeight => 1,
    });
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    for item in items {
        put_item(out, item);
    }
}

fn put_item(out: &mut Vec<u8>, item: &SeedItem) {
    put_name(out, &item.id);
    put_opt_u64(out, item.stock.quantity());
    put_opt_u64(out, item.weight);
}

/// Appends the framed encoding of an applied admin command.
pub fn encode_admin(out: &mut Vec<u8>, admin: &AdminRecord) {
    assert!(admin.request_id > 0);
    assert!(
        admin
            .message_id
            .as_ref()
            .is_none_or(|m| m.len() <= MESSAGE_ID_BYTES_MAX)
    );
    let start = begin_frame(out);
    out.push(KIND_ADMIN);
    out.extend_from_slice(&admin.request_id.to_le_bytes());
    match &admin.message_id {
        None => out.push(0),
        Some(m) => {
            out.push(1);
            out.push(m.len() as u8);
            out.extend_from_slice(m.as_bytes());
        }
    }
    let pool_index = admin.op.pool_index();
    let (tag, a, b) = match &admin.op {
        AdminOp::Restock {
            item_index, add, ..
        } => (OP_RESTOCK, *item_index, *add),
        AdminOp::SetQuantity {
            item_index,
            quantity,
            ..
        } => (OP_SET_QUANTITY, *item_index, *quantity),
        AdminOp::SetWeight {
            item_index, weight, ..
        } => (OP_SET_WEIGHT, *item_index, *weight),
        AdminOp::AddItem { .. } => (OP_ADD_ITEM, 0, 0),
        AdminOp::AddPool { .. } => (OP_ADD_POOL, 0, 0),
        AdminOp::ClosePool { .. } => (OP_CLOSE_POOL, 0, 0),
        AdminOp::OpenPool { .. } => (OP_OPEN_POOL, 0, 0),
    };
    out.push(tag);
    out.extend_from_slice(&pool_index.to_le_bytes());
    match &admin.op {
        AdminOp::Restock { .. } | AdminOp::SetQuantity { .. } | AdminOp::SetWeight { .. } => {
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&b.to_le_bytes());
        }
        AdminOp::AddItem { item, .. } => put_item(out, item),
        AdminOp::AddPool { pool, .. } => put_pool(out, pool),
        AdminOp::ClosePool { .. } | AdminOp::OpenPool { .. } => {}
    }
    end_frame(out, start);
}

fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    start
}

fn end_frame(out: &mut [u8], start: usize) {
    let body = &out[start + FRAME_HEADER_BYTES..];
    assert!(body.len() <= RECORD_BYTES_MAX);
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    assert!(name.len() <= NAME_BYTES_MAX);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
}

fn put_opt_u64(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Decodes one framed record at the start of `bytes`; returns it and the bytes consumed.
pub fn decode(bytes: &[u8]) -> Result<(Record, usize), DecodeError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(DecodeError::Truncated {
            need: FRAME_HEADER_BYTES,
            have: bytes.len(),
        });
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let stored = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if len > RECORD_BYTES_MAX {
        return Err(DecodeError::TooLong(len));
    }
    let total = FRAME_HEADER_BYTES + len;
    if bytes.len() < total {
        return Err(DecodeError::Truncated {
            need: total,
            have: bytes.len(),
        });
    }
    let body = &bytes[FRAME_HEADER_BYTES..total];
    let computed = crc32c::crc32c(body);
    if computed != stored {
        return Err(DecodeError::Checksum { stored, computed });
    }
    let mut r = Reader { bytes: body };
    let record = match r.u8()? {
        KIND_DRAW => {
            let request_id = r.u64()?;
            let message_id = match r.u8()? {
                0 => None,
                1 => {
                    let n = r.u8()? as usize;
                    Some(r.string(n, "message_id")?)
                }
                _ => return Err(DecodeError::Field("message_id flag")),
            };
            let pool_index = r.u32()?;
            let user_len = r.u16()? as usize;
            if user_len > USER_BYTES_MAX {
                return Err(DecodeError::Field("user length"));
            }
            let user = r.string(user_len, "user")?;
            let count = r.u8()? as u32;
            let n = r.u8()? as usize;
            if count == 0 || count > COUNT_MAX || n > count as usize {
                return Err(DecodeError::Field("count"));
            }
            if request_id == 0 {
                return Err(DecodeError::Field("request_id"));
            }
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(r.u32()?);
            }
            Record::Draw(DrawRecord {
                request_id,
                message_id,
                pool_index,
                user,
                count,
                items,
            })
        }
        KIND_RESERVE => Record::Reserve {
            ids_up_to: r.u64()?,
        },
        KIND_EPOCH => {
            let number = r.u64()?;
            let secret = r.take(32)?.try_into().expect("32 bytes");
            let commitment = r.take(32)?.try_into().expect("32 bytes");
            Record::Epoch(EpochRecord {
                number,
                secret,
                commitment,
            })
        }
        KIND_SEED => {
            let pool_index = r.u32()?;
            let pool = r.pool()?;
            Record::Seed { pool_index, pool }
        }
        KIND_ADMIN => {
            let request_id = r.u64()?;
            if request_id == 0 {
                return Err(DecodeError::Field("request_id"));
            }
            let message_id = match r.u8()? {
                0 => None,
                1 => {
                    let n = r.u8()? as usize;
                    Some(r.string(n, "message_id")?)
                }
                _ => return Err(DecodeError::Field("message_id flag")),
            };
            let tag = r.u8()?;
            let pool_index = r.u32()?;
            let op = match tag {
                OP_RESTOCK | OP_SET_QUANTITY | OP_SET_WEIGHT => {
                    let item_index = r.u32()?;
                    let value = r.u64()?;
                    match tag {
                        OP_RESTOCK => AdminOp::Restock {
                            pool_index,
                            item_index,
                            add: value,
                        },
                        OP_SET_QUANTITY => AdminOp::SetQuantity {
                            pool_index,
                            item_index,
                            quantity: value,
                        },
                        _ => AdminOp::SetWeight {
                            pool_index,
                            item_index,
                            weight: value,
                        },
                    }
                }
                OP_ADD_ITEM => AdminOp::AddItem {
                    pool_index,
                    item: r.item()?,
                },
                OP_ADD_POOL => AdminOp::AddPool {
                    pool_index,
                    pool: r.pool()?,
                },
                OP_CLOSE_POOL => AdminOp::ClosePool { pool_index },
                OP_OPEN_POOL => AdminOp::OpenPool { pool_index },
                _ => return Err(DecodeError::Field("admin op")),
            };
            Record::Admin(AdminRecord {
                request_id,
                message_id,
                op,
            })
        }
        kind => return Err(DecodeError::UnknownKind(kind)),
    };
    if !r.bytes.is_empty() {
        return Err(DecodeError::Trailing(r.bytes.len()));
    }
    Ok((record, total))
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated {
                need: n,
                have: self.bytes.len(),
            });
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn opt_u64(&mut self) -> Result<Option<u64>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(DecodeError::Field("option flag")),
        }
    }
    fn item(&mut self) -> Result<SeedItem, DecodeError> {
        let n = self.u8()? as usize;
        let id = self.string(n, "item id")?;
        let quantity = self.opt_u64()?;
        let weight = self.opt_u64()?;
        Ok(SeedItem {
            id,
            stock: Stock::from_quantity(quantity),
            weight,
        })
    }
    fn pool(&mut self) -> Result<PoolSeed, DecodeError> {
        let n = self.u8()? as usize;
        let id = self.string(n, "pool id")?;
        let mode = match self.u8()? {
            0 => Mode::ByQuantity,
            1 => Mode::ByWeight,
            _ => return Err(DecodeError::Field("mode")),
        };
        let count = self.u32()? as usize;
        // Each item takes at least 3 bytes: bound the allocation by what is there.
        if count > self.bytes.len() / 3 {
            return Err(DecodeError::Field("seed item count"));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(self.item()?);
        }
        Ok(PoolSeed { id, mode, items })
    }
    fn string(&mut self, n: usize, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Field(what))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn draw_strategy() -> impl Strategy<Value = DrawRecord> {
        (
            1u64..u64::MAX,
            proptest::option::of("[a-z0-9-]{0,255}"),
            any::<u32>(),
            "[a-zA-Z]{0,200}",
            1u32..=100,
        )
            .prop_flat_map(|(request_id, message_id, pool_index, user, count)| {
                proptest::collection::vec(any::<u32>(), 0..=count as usize).prop_map(move |items| {
                    DrawRecord {
                        request_id,
                        message_id: message_id.clone(),
                        pool_index,
                        user: user.clone(),
                        count,
                        items,
                    }
                })
            })
    }

    proptest! {
        #[test]
        fn draw_roundtrip(draw in draw_strategy()) {
            let mut buf = Vec::new();
            encode_draw(&mut buf, &draw.as_ref());
            let (back, used) = decode(&buf).unwrap();
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(back, Record::Draw(draw));
        }

        #[test]
        fn any_single_bit_flip_is_detected(draw in draw_strategy(), bit in any::<prop::sample::Index>()) {
            let mut buf = Vec::new();
            encode_draw(&mut buf, &draw.as_ref());
            let i = bit.index(buf.len() * 8);
            buf[i / 8] ^= 1 << (i % 8);
            prop_assert!(decode(&buf).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn seed_reserve_and_epoch_roundtrip() {
        let records = vec![
            Record::Reserve { ids_up_to: 65536 },
            Record::Epoch(EpochRecord {
                number: 9,
                secret: [3; 32],
                commitment: crate::epoch::commitment(&[3; 32]),
            }),
            Record::Seed {
                pool_index: 3,
                pool: PoolSeed::from_parts(
                    "spin",
                    Mode::ByWeight,
                    &[
                        ("car".into(), Some(1), Some(1)),
                        ("try_again".into(), None, Some(900)),
                    ],
                ),
            },
        ];
        let mut buf = Vec::new();
        for r in &records {
            encode(&mut buf, r);
        }
        let mut at = 0;
        for r in &records {
            let (back, used) = decode(&buf[at..]).unwrap();
            assert_eq!(&back, r);
            at += used;
        }
        assert_eq!(at, buf.len());
    }

    fn admin_records() -> Vec<Record> {
        let seed = PoolSeed::from_parts(
            "xmas",
            Mode::ByWeight,
            &[
                ("tree".into(), Some(3), Some(2)),
                ("card".into(), None, Some(9)),
            ],
        );
        let ops = vec![
            AdminOp::Restock {
                pool_index: 1,
                item_index: 2,
                add: 1 << 40,
            },
            AdminOp::SetQuantity {
                pool_index: 0,
                item_index: 0,
                quantity: 0,
            },
            AdminOp::SetWeight {
                pool_index: 7,
                item_index: 3,
                weight: 1 << 32,
            },
            AdminOp::AddItem {
                pool_index: 2,
                item: seed.items[1].clone(),
            },
            AdminOp::AddPool {
                pool_index: 4,
                pool: seed,
            },
            AdminOp::ClosePool { pool_index: 9 },
            AdminOp::OpenPool { pool_index: 9 },
        ];
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| {
                Record::Admin(AdminRecord {
                    request_id: 100 + i as u64,
                    message_id: (i % 2 == 0).then(|| format!("cmd-{i}")),
                    op,
                })
            })
            .collect()
    }

    #[test]
    fn admin_records_roundtrip_and_detect_damage() {
        for record in admin_records() {
            let mut buf = Vec::new();
            encode(&mut buf, &record);
            let (back, used) = decode(&buf).unwrap();
            assert_eq!(used, buf.len());
            assert_eq!(back, record);
            for cut in 0..buf.len() {
                assert!(decode(&buf[..cut]).is_err(), "{record:?} cut at {cut}");
            }
            for bit in 0..buf.len() * 8 {
                let mut bad = buf.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(decode(&bad).is_err(), "{record:?} bit {bit}");
            }
        }
    }

    #[test]
    fn an_unknown_admin_op_is_a_field_error() {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            &Record::Admin(AdminRecord {
                request_id: 1,
                message_id: None,
                op: AdminOp::ClosePool { pool_index: 0 },
            }),
        );
        // kind, request_id (8), message_id flag: the op tag is at body offset 10.
        buf[8 + 10] = 99;
        let crc = crc32c::crc32c(&buf[8..]);
        buf[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&buf), Err(DecodeError::Field("admin op")));
    }

    #[test]
    fn truncated_record_is_an_error() {
        let mut buf = Vec::new();
        encode(&mut buf, &Record::Reserve { ids_up_to: 7 });
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
    }
}
