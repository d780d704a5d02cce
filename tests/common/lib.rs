//! The test harness of rewardpool's integration tests (`tests/*.rs`), as a library crate
//! (`rewardpool-testkit`, used as `common`): a helper a test binary does not use costs no
//! warning, and there is one copy of each helper.
//!
//! The worker is always driven as a real process (`rewardpool run --config <file>`); the tests
//! talk to it only through RabbitMQ (lapin) and the command line, as producers, result
//! consumers and operators would. Modules, by concern:
//!
//! - [`admin`]: admin commands: `rewardpool admin` runs, a raw admin client, broker users.
//! - [`broker`]: broker URL, connecting (or failing with how to start it), fresh queue names,
//!   queue state, publishing with confirms, `rabbitmqctl`, bounded waits.
//! - [`process`]: the binaries under test, run to completion or as a `Worker` (ready, signals).
//! - [`collect`]: consumers recording results and replies, and the contract checks over them.
//! - [`raw_amqp`]: a hand-rolled publisher for what lapin will not send.
//! - [`storage`]: the one WAL reader (the library's scanner) and on-disk invariants.
//! - [`config`]: the one config writer (`toml`-serialised) and a broker test's `Setup`.
//! - [`metrics`]: a free port, scraping and reading `/metrics`, HTTP to the worker's listener.
//! - [`tmpfs`]: a small real tmpfs, so the disk really fills.
//!
//! Everything is re-exported at the top: `use common::*;`.

pub mod admin;
pub mod broker;
pub mod collect;
pub mod config;
pub mod metrics;
pub mod process;
pub mod raw_amqp;
pub mod storage;
pub mod tmpfs;

pub use admin::*;
pub use broker::*;
pub use collect::*;
pub use config::*;
pub use process::*;
pub use raw_amqp::*;
pub use storage::*;
pub use tmpfs::*;
