//! rewardpool: a durable reward-pool draw worker.
//!
//! Data flows one way: broker → ingest → engine → results/acks → broker.
//!
//! Storage core (no broker in it):
//! - [`config`]: the configuration file, environment overrides, validation.
//! - [`limits`]: every bound and queue depth, tied together by compile-time assertions.
//! - [`seed`]: a pool as it enters the state (one type for config, records, pools) and the
//!   pool/item rules, usable without a file.
//! - [`pool`] and [`fenwick`]: one prize pool and its O(log n) draw.
//! - [`record`]: WAL records and their checksummed encoding.
//! - [`wal`]: segment files, batches (one per group commit), scanning.
//! - [`dedupe`]: the bounded idempotency window keyed by `message_id`.
//! - [`state`]: pools + window + request-ID marks; draw (live) and apply (replay).
//! - [`storage`]: the file operations under WAL, snapshots and recovery (a seam for the
//!   fault simulation, [`sim_fs`], test builds only).
//! - [`snapshot`]: atomic JSON snapshots, newest two kept, pruning of the WAL.
//! - [`recovery`]: snapshot + WAL → state; torn tails, corruption, seeding, rotation.
//! - [`ids`]: request IDs from an atomic counter backed by WAL reservations.
//! - [`engine`]: the single-writer engine thread, the WAL writer (group commit) and the
//!   snapshot thread.
//! - [`admission`]: IDs and repeat detection in front of the engine.
//! - [`lock`]: one process per data directory.
//! - [`inspect`]: `inspect` and `wal dump`.
//! - [`failpoint`]: SIGKILL at named points, for crash tests.
//!
//! Broker edge, in the order data flows:
//! - [`message`]: request parsing and validation, reply and result bodies (pure).
//! - [`amqp`]: connecting, declaring the contract's topology, a timeout on every call.
//! - [`session`]: one connection's channels, publishes, rejects and acks; the request ticket.
//! - [`ingest`]: deliveries → validated requests with IDs → engine; accepted/rejected replies.
//! - [`settle`]: durable outcomes → results with confirms → acks.
//! - [`acks`]: which delivery tags to ack, `multiple` where possible, never twice.
//! - [`worker`]: `rewardpool run`: recovery, the engine, the reconnect loop, the shutdown path.
//! - [`shutdown`]: SIGINT/SIGTERM into one watch channel.
//!
//! Tools live outside the library: `src/bin/rewardpool-drill.rs` (the engine alone under
//! synthetic load, for crash tests) and the `rewardpool-bench` crate in `tools/bench/`
//! (end-to-end throughput and latency next to the broker's ceiling).

pub mod acks;
pub mod admin;
pub mod admission;
pub mod amqp;
pub mod audit;
pub mod config;
pub mod dedupe;
pub mod engine;
pub mod epoch;
pub mod failpoint;
pub mod fenwick;
pub mod ids;
pub mod ingest;
pub mod inspect;
pub mod limits;
pub mod lock;
pub mod message;
pub mod metrics;
pub mod observe;
pub mod pool;
pub mod record;
pub mod recovery;
pub mod seed;
pub mod session;
pub mod settle;
pub mod shutdown;
#[cfg(any(test, feature = "failpoints"))]
pub mod sim_fs;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod top;
pub mod wal;
pub mod worker;
