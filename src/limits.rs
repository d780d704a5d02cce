//! Every bound and queue depth of the worker, in one place.
//!
//! Why one module: a bound is checked where a value enters (config, request parsing, admin
//! commands), relied on where it is stored (record length prefixes, pool arithmetic) and
//! re-checked where it is read back (record decoding). Defined once here, the compile-time
//! assertions at the bottom tie those places together: raising one bound past what another
//! layer can hold fails the build, not a production run.
//!
//! Names say the thing, then the unit, then `_MAX`/`_MIN` (`USER_BYTES_MAX`,
//! `TIMEOUT_MS_MAX`). Counts have no unit (`COUNT_MAX`, `POOL_ITEMS_MAX`).

// --- requests (contract) --------------------------------------------------------------------

/// Draws one request may ask for (`count`).
pub const COUNT_MAX: u32 = 100;
/// Longest `user` of a request.
pub const USER_BYTES_MAX: usize = 256;
/// Longest `message_id` (an AMQP short string).
pub const MESSAGE_ID_BYTES_MAX: usize = 255;
/// Largest request body (64 KiB).
pub const BODY_BYTES_MAX: usize = 64 * 1024;

// --- pools and items (config and, later, admin commands) ------------------------------------

/// Longest pool or item id.
pub const ID_BYTES_MAX: usize = 128;
/// Largest quantity of one item (2^40).
pub const QUANTITY_MAX: u64 = 1 << 40;
/// Largest weight of one item (2^32).
pub const WEIGHT_MAX: u64 = 1 << 32;
/// Most items in one pool (2^24).
pub const POOL_ITEMS_MAX: usize = 1 << 24;
/// Most pools in one configuration.
pub const CONFIG_POOLS_MAX: usize = 1024;

// --- broker -----------------------------------------------------------------------------------

/// Longest queue or exchange name (AMQP short string).
pub const AMQP_NAME_BYTES_MAX: usize = 255;
/// Smallest and largest `amqp.prefetch` (a `basic_qos` u16; 0 would mean unbounded).
pub const PREFETCH_MIN: u16 = 1;
pub const PREFETCH_MAX: u16 = u16::MAX;
/// Largest connect/operation timeout and reconnect backoff (1 hour).
pub const TIMEOUT_MS_MAX: u64 = 3_600_000;
/// Largest `amqp.shutdown_deadline_ms` (1 hour).
pub const SHUTDOWN_DEADLINE_MS_MAX: u64 = 3_600_000;
/// Accepted-reply confirms ingest keeps in flight before it stops reading deliveries.
pub const INGEST_REPLY_CONFIRMS_MAX: usize = 4096;
/// Deliveries lapin already buffered that ingest handles as one burst before it hands their
/// requests to the engine together (one engine wake-up per burst, not per request). Small
/// next to the prefetch: a burst is also an upper bound on what one engine batch holds of it.
pub const INGEST_BURST_DELIVERIES_MAX: usize = 64;
/// Durable batches settle publishes concurrently.
pub const SETTLE_BATCHES_IN_FLIGHT_MAX: usize = 256;
/// Completions settle groups into one ack pass.
pub const SETTLE_GROUP_COMPLETIONS_MAX: usize = 4096;
/// Unacked admin commands delivered to the worker at once (the admin consumer's own prefetch:
/// commands are rare, and a flood of them must not take the request queue's prefetch).
pub const ADMIN_PREFETCH: u16 = 16;
/// Largest admin reply the worker publishes as is: a `pool_state` over this (a pool of
/// millions of items) is sent without its items (`items_omitted`), so a reply can never exceed
/// the broker's message size and wedge the session in a redelivery loop.
pub const ADMIN_REPLY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Largest reply `rewardpool admin` reads (a bigger one is reported, not printed).
pub const ADMIN_CLIENT_REPLY_BYTES_MAX: usize = ADMIN_REPLY_BYTES_MAX + 64 * 1024;
/// Largest `rewardpool admin --timeout` (1 hour), in seconds.
pub const ADMIN_TIMEOUT_SECS_MAX: u64 = 3600;

// --- storage ----------------------------------------------------------------------------------

/// Largest `storage.dedupe_window`.
pub const DEDUPE_WINDOW_MAX: usize = 10_000_000;
/// Largest `storage.batch_records_max`.
pub const BATCH_RECORDS_MAX: usize = 1 << 20;
/// Largest `storage.channel_capacity`.
pub const CHANNEL_CAPACITY_MAX: usize = 1 << 20;
/// Largest `storage.snapshot_every_records`.
pub const SNAPSHOT_EVERY_RECORDS_MAX: u64 = 1 << 40;
/// `storage.seed_epoch_records`: draws per epoch secret.
pub const SEED_EPOCH_RECORDS_MAX: u64 = 1 << 40;
/// Largest `storage.segment_bytes_max` (4 GiB).
pub const SEGMENT_BYTES_MAX: u64 = 1 << 32;
/// Largest `storage.id_block_size`.
pub const ID_BLOCK_SIZE_MAX: u64 = 1 << 32;
/// Longest pool or item id a record can hold (one-byte length prefix).
pub const RECORD_NAME_BYTES_MAX: usize = 255;
/// Bound on one record's body. A `Seed` of a pool with [`POOL_ITEMS_MAX`] items is the largest.
pub const RECORD_BYTES_MAX: usize = 1 << 30;
/// Bound on one WAL batch payload: a batch of draws, or one seed, plus slack.
pub const BATCH_PAYLOAD_BYTES_MAX: usize = RECORD_BYTES_MAX + 4096;

// --- engine pipeline ---------------------------------------------------------------------------

/// Batches of outcomes between the WAL writer and the caller (settle or drill).
pub const ENGINE_COMMITTED_BATCHES_MAX: usize = 64;
/// Batches between the engine thread and the WAL writer (the engine draws ahead by this many).
pub const ENGINE_JOBS_MAX: usize = 4;
/// Batches the WAL writer groups under one fsync.
pub const WAL_GROUP_BATCHES_MAX: usize = 64;
/// Encoded bytes reserved per record when a batch buffer is sized (a draw is ~40-600 bytes).
pub const BATCH_RECORD_BYTES_ESTIMATE: usize = 96;

// --- ties between layers (checked at compile time) ---------------------------------------------

// `rewardpool admin` reads every reply the worker may send.
const _: () = assert!(ADMIN_REPLY_BYTES_MAX < ADMIN_CLIENT_REPLY_BYTES_MAX);
// The admin timeout is a message TTL in milliseconds (a u32-sized AMQP expiration is plenty).
const _: () = assert!(ADMIN_TIMEOUT_SECS_MAX * 1000 <= TIMEOUT_MS_MAX);

// An id that config or an admin command accepts fits a record's one-byte length prefix.
const _: () = assert!(ID_BYTES_MAX <= RECORD_NAME_BYTES_MAX);
const _: () = assert!(RECORD_NAME_BYTES_MAX <= u8::MAX as usize);
// A message_id fits a record's one-byte length prefix, and the user its two-byte prefix.
const _: () = assert!(MESSAGE_ID_BYTES_MAX <= u8::MAX as usize);
const _: () = assert!(USER_BYTES_MAX <= u16::MAX as usize);
// `count` fits the record's count byte and the draw scratch space.
const _: () = assert!(COUNT_MAX as usize <= u8::MAX as usize);
// An item index fits the record's u32 item index.
const _: () = assert!(POOL_ITEMS_MAX <= u32::MAX as usize);
// A pool's total stock can overflow u64 (2^24 items * 2^40): `seed::check_pool` checks the sum.
const _: () = assert!((POOL_ITEMS_MAX as u128) * (QUANTITY_MAX as u128) >= u64::MAX as u128);
// A pool's total weight fits the Fenwick tree's i64 sums.
const _: () = assert!((POOL_ITEMS_MAX as u128) * (WEIGHT_MAX as u128) < i64::MAX as u128);
// A seed of the largest pool fits one record with short ids (per item: length byte, id,
// stock and weight with their flags); long ids are bounded by `seed::check_pool`.
const _: () = assert!(POOL_ITEMS_MAX * (1 + 1 + 9 + 9) + 1024 <= RECORD_BYTES_MAX);
// A batch of draws fits a batch payload.
const _: () = assert!(RECORD_BYTES_MAX < BATCH_PAYLOAD_BYTES_MAX);
// The largest batch the config allows is a bounded buffer.
const _: () = assert!(BATCH_RECORDS_MAX * BATCH_RECORD_BYTES_ESTIMATE < RECORD_BYTES_MAX);
