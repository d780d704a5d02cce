//! The worker's metrics and its health: every series of the contract, in one registry.
//!
//! Why it looks like this:
//!
//! * `prometheus-client` (the Prometheus project's own Rust client): an explicit registry per
//!   worker, not a process-global recorder, so tests and the benchmark can run several
//!   embedded workers in one process; typed handles made once and then updated without a
//!   lookup. Counters and gauges are atomics; a `Histogram` is one uncontended `Mutex` over
//!   its buckets (prometheus-client 0.2x), so each request stage observed costs one such lock
//!   (three per request, in ingest and the settler, never on the engine thread).
//! * Nothing here runs on the engine thread per request. Per-request counting happens in
//!   ingest and the settler (async tasks) on handles fetched once; per-item handles are cached
//!   by the settler ([`DrawCounters`]) so a draw costs an atomic add, never a lock nor an
//!   allocation. The engine touches only the WAL histograms, once per batch or per fsync
//!   (`EngineStats`).
//! * Readiness is one atomic ([`Readiness`]); the HTTP side reads it, the supervisor writes it.
//!   A broker resource alarm is a second atomic (the session it blocks), written by the
//!   session's event watcher: a ready worker whose publishes the broker blocks reads `blocked`.

use crate::state::{Outcome, State};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

type Labels = Vec<(String, String)>;

/// The contract's admin ops: their `rewardpool_admin_commands_total` series exist from start.
pub const ADMIN_OPS: [&str; 7] = [
    "restock",
    "set_quantity",
    "set_weight",
    "add_item",
    "add_pool",
    "close_pool",
    "open_pool",
];

/// WAL fsync latency buckets, seconds: 50 µs … 2.5 s.
pub const FSYNC_BUCKETS_SECONDS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
/// Request stage latency buckets, seconds: 1 ms … 10 s.
pub const STAGE_BUCKETS_SECONDS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of WAL fsync durations (seconds).
pub fn fsync_histogram() -> Histogram {
    Histogram::new(FSYNC_BUCKETS_SECONDS)
}

/// A histogram of records per WAL batch: 1 … 8192.
pub fn batch_records_histogram() -> Histogram {
    Histogram::new((0..14).map(|i| (1u64 << i) as f64))
}

/// Why the worker is not ready (or that it is), as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Readiness {
    Recovering = 0,
    Connecting = 1,
    Ready = 2,
    Reconnecting = 3,
    ShuttingDown = 4,
    /// Connected and consuming, but the broker blocks publishing (connection.blocked: a memory
    /// or disk alarm), so no result can go out. Never stored: [`Metrics::readiness`] derives
    /// it from `Ready` and the alarm.
    Blocked = 5,
}

impl Readiness {
    fn from_u8(v: u8) -> Readiness {
        match v {
            0 => Readiness::Recovering,
            1 => Readiness::Connecting,
            2 => Readiness::Ready,
            3 => Readiness::Reconnecting,
            _ => Readiness::ShuttingDown,
        }
    }

    /// The one-line reason `/readyz` gives.
    pub fn reason(self) -> &'static str {
        match self {
            Readiness::Recovering => "recovering",
            Readiness::Connecting => "connecting",
            Readiness::Ready => "ready",
            Readiness::Reconnecting => "reconnecting",
            Readiness::ShuttingDown => "shutting down",
            Readiness::Blocked => "blocked",
        }
    }
}

/// Every series of the contract, and the health flags.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub requests_accepted: Counter,
    pub requests_repeat: Counter,
    pub requests_rejected: Counter,
    results: Family<Labels, Counter>,
    items_drawn: Family<Labels, Counter>,
    stock_remaining: Family<Labels, Gauge>,
    stock_stocked: Family<Labels, Gauge>,
    admin_commands: Family<Labels, Counter>,
    pub stage_accepted: Histogram,
    pub stage_durable: Histogram,
    pub stage_acked: Histogram,
    pub inflight: Gauge,
    pub last_request_id: Gauge,
    pub broker_connected: Gauge,
    pub broker_reconnects: Counter,
    ready: Gauge,
    readiness: AtomicU8,
    /// The epoch of the broker session the broker blocks (connection.blocked); 0: none.
    blocked_epoch: AtomicU64,
    storage_failed: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every series but the WAL histograms, which are the engine's own
    /// ([`Metrics::register_engine`] once the engine runs, after recovery).
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        let outcome = |o: &str| requests.get_or_create_owned(&vec![("outcome".into(), o.into())]);
        let (requests_accepted, requests_repeat, requests_rejected) =
            (outcome("accepted"), outcome("repeat"), outcome("rejected"));
        registry.register(
            "rewardpool_requests",
            "Requests delivered, by what ingest made of them",
            requests,
        );
        let results = Family::<Labels, Counter>::default();
        registry.register(
            "rewardpool_results",
            "Results published, by pool and status",
            results.clone(),
        );
        let items_drawn = Family::<Labels, Counter>::default();
        registry.register(
            "rewardpool_items_drawn",
            "Units drawn (durable) since the worker started, by pool and item",
            items_drawn.clone(),
        );
        let stock_remaining = Family::<Labels, Gauge>::default();
        registry.register(
            "rewardpool_stock_remaining",
            "Units left of each limited item",
            stock_remaining.clone(),
        );
        let stock_stocked = Family::<Labels, Gauge>::default();
        registry.register(
            "rewardpool_stock_stocked",
            "Units ever put in of each limited item (inspect's `stocked`)",
            stock_stocked.clone(),
        );
        let admin_commands = Family::<Labels, Counter>::default();
        for op in ADMIN_OPS {
            for outcome in ["applied", "rejected"] {
                drop(admin_commands.get_or_create(&vec![
                    ("op".into(), op.into()),
                    ("outcome".into(), outcome.into()),
                ]));
            }
        }
        registry.register(
            "rewardpool_admin_commands",
            "Admin commands, by op and outcome",
            admin_commands.clone(),
        );
        let stages = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(STAGE_BUCKETS_SECONDS)) as fn() -> Histogram,
        );
        let stage = |s: &str| stages.get_or_create_owned(&vec![("stage".into(), s.into())]);
        let (stage_accepted, stage_durable, stage_acked) =
            (stage("accepted"), stage("durable"), stage("acked"));
        registry.register(
            "rewardpool_request_duration_seconds",
            "Time since delivery at which a request was accepted, durable, acked",
            stages,
        );
        let inflight = Gauge::default();
        registry.register(
            "rewardpool_inflight_requests",
            "Requests accepted whose results are not yet confirmed",
            inflight.clone(),
        );
        let last_request_id = Gauge::default();
        registry.register(
            "rewardpool_last_request_id",
            "Highest request ID handed out",
            last_request_id.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "rewardpool_broker_connected",
            "1 while a broker session is up",
            broker_connected.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "rewardpool_broker_reconnects",
            "Broker sessions lost (each followed by a reconnect)",
            broker_reconnects.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "rewardpool_ready",
            "1 when /readyz answers 200",
            ready.clone(),
        );
        let build = Family::<Labels, Gauge>::default();
        build
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register("rewardpool_build_info", "Always 1", build);
        Metrics {
            registry: Mutex::new(registry),
            requests_accepted,
            requests_repeat,
            requests_rejected,
            results,
            items_drawn,
            stock_remaining,
            stock_stocked,
            admin_commands,
            stage_accepted,
            stage_durable,
            stage_acked,
            inflight,
            last_request_id,
            broker_connected,
            broker_reconnects,
            ready,
            readiness: AtomicU8::new(Readiness::Recovering as u8),
            blocked_epoch: AtomicU64::new(0),
            storage_failed: AtomicBool::new(false),
        }
    }

    /// The Prometheus text exposition (OpenMetrics flavour) of every series.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let registry = self.registry.lock().expect("registry lock");
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }

    /// Registers the engine's WAL histograms (observed by its threads, once per fsync/batch).
    pub fn register_engine(&self, stats: &crate::engine::EngineStats) {
        let mut registry = self.registry.lock().expect("registry lock");
        registry.register(
            "rewardpool_wal_fsync_duration_seconds",
            "Duration of each WAL fsync",
            stats.fsync_seconds.clone(),
        );
        registry.register(
            "rewardpool_wal_batch_records",
            "Records per WAL batch",
            stats.batch_records.clone(),
        );
    }

    /// Sets every stock gauge from a state: at start (after recovery), and the hook for admin
    /// commands that change stock or add items (call it after the command is durable).
    pub fn set_stock(&self, state: &State) {
        for slot in &state.pools {
            for item in slot.pool.items() {
                let labels = pool_item(&slot.id, &item.id);
                drop(self.items_drawn.get_or_create(&labels));
                if let Some(quantity) = item.quantity {
                    self.stock_remaining
                        .get_or_create(&labels)
                        .set(quantity as i64);
                    self.stock_stocked
                        .get_or_create(&labels)
                        .set((quantity + item.issued) as i64);
                }
            }
            for status in ["won", "empty", "closed"] {
                drop(self.results.get_or_create(&vec![
                    ("pool".into(), slot.id.to_string()),
                    ("status".into(), status.into()),
                ]));
            }
        }
        self.last_request_id.set(state.last_drawn_id as i64);
    }

    /// Sets the stock gauges of what an applied admin command's reply shows (its `item`, or
    /// every item of its `pool_state`), in engine order before any later draw is counted, so a
    /// restock or a new item is on the gauges from its reply on. Unlimited items have none.
    pub fn admin_stock(&self, reply: &str) {
        let Ok(reply) = serde_json::from_str::<serde_json::Value>(reply) else {
            return;
        };
        let set = |pool: &str, item: &serde_json::Value| {
            let (Some(id), Some(quantity), Some(stocked)) = (
                item["id"].as_str(),
                item["quantity"].as_u64(),
                item["stocked"].as_u64(),
            ) else {
                return;
            };
            let labels = pool_item(pool, id);
            drop(self.items_drawn.get_or_create(&labels));
            self.stock_remaining
                .get_or_create(&labels)
                .set(quantity as i64);
            self.stock_stocked
                .get_or_create(&labels)
                .set(stocked as i64);
        };
        if let Some(pool) = reply["pool"].as_str() {
            if reply["item"].is_object() {
                set(pool, &reply["item"]);
            }
            if let Some(items) = reply["pool_state"]["items"].as_array() {
                for item in items {
                    set(pool, item);
                }
                for status in ["won", "empty", "closed"] {
                    drop(self.results.get_or_create(&vec![
                        ("pool".into(), pool.to_string()),
                        ("status".into(), status.into()),
                    ]));
                }
            }
        }
    }

    /// Counts one admin command (`outcome`: `applied` or `rejected`; `op` one of
    /// [`ADMIN_OPS`] or `unknown` for a body whose op is not one).
    pub fn admin_command(&self, op: &str, outcome: &str) {
        self.admin_commands
            .get_or_create(&vec![
                ("op".into(), op.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
    }

    /// `Blocked` while ready and the broker blocks publishing; the stored state otherwise.
    pub fn readiness(&self) -> Readiness {
        let r = Readiness::from_u8(self.readiness.load(Ordering::Acquire));
        if r == Readiness::Ready && self.blocked_epoch.load(Ordering::Acquire) != 0 {
            Readiness::Blocked
        } else {
            r
        }
    }

    /// The broker blocked (`true`) or unblocked publishing on session `epoch` (≥ 1). An
    /// unblock, or the end of a session, from an older session does not clear a newer one's.
    pub fn set_broker_blocked(&self, epoch: u64, blocked: bool) {
        assert!(epoch > 0, "session epochs start at 1");
        if blocked {
            self.blocked_epoch.store(epoch, Ordering::Release);
        } else {
            let _ =
                self.blocked_epoch
                    .compare_exchange(epoch, 0, Ordering::AcqRel, Ordering::Acquire);
        }
        self.ready
            .set(i64::from(self.readiness() == Readiness::Ready));
    }

    /// Moves readiness; `ShuttingDown` is final. `Blocked` is derived, never set.
    pub fn set_readiness(&self, r: Readiness) {
        assert!(
            r != Readiness::Blocked,
            "Blocked comes from set_broker_blocked"
        );
        let mut current = self.readiness.load(Ordering::Acquire);
        loop {
            if current == Readiness::ShuttingDown as u8 {
                return;
            }
            match self.readiness.compare_exchange(
                current,
                r as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.ready
            .set(i64::from(self.readiness() == Readiness::Ready));
        self.broker_connected.set(i64::from(r == Readiness::Ready));
    }

    /// The engine stopped on a storage error: `/healthz` answers 503 from now on.
    pub fn set_storage_failed(&self) {
        self.storage_failed.store(true, Ordering::Release);
    }

    pub fn storage_failed(&self) -> bool {
        self.storage_failed.load(Ordering::Acquire)
    }

    /// The settler's per-item counters, built from the stock already registered.
    pub fn draw_counters(self: &Arc<Self>) -> DrawCounters {
        DrawCounters {
            metrics: self.clone(),
            items: HashMap::new(),
            results: HashMap::new(),
        }
    }
}

fn pool_item(pool: &str, item: &str) -> Labels {
    vec![("pool".into(), pool.into()), ("item".into(), item.into())]
}

/// An item's drawn counter and (limited items) stock gauge.
type ItemHandles = (Counter, Option<Gauge>);

/// Per-item handles cached by the settler: after the first draw of an item, counting it is
/// one hash lookup (by `&str`, no allocation) and atomic adds.
pub struct DrawCounters {
    metrics: Arc<Metrics>,
    items: HashMap<Arc<str>, HashMap<Arc<str>, ItemHandles>>,
    results: HashMap<Arc<str>, Vec<(&'static str, Counter)>>,
}

impl DrawCounters {
    /// A durable draw (not a repeat): items drawn up, stock down.
    pub fn drawn(&mut self, outcome: &Outcome) {
        for item in &outcome.items {
            let pool = match self.items.get_mut(&*outcome.pool) {
                Some(pool) => pool,
                None => self.items.entry(outcome.pool.clone()).or_default(),
            };
            let handles = match pool.get(&**item) {
                Some(h) => h,
                None => {
                    // First draw of this item since start (or an item added later).
                    let labels = pool_item(&outcome.pool, item);
                    let drawn = self.metrics.items_drawn.get_or_create_owned(&labels);
                    let stock = self.metrics.stock_remaining.get(&labels).map(|g| g.clone());
                    pool.entry(item.clone()).or_insert((drawn, stock))
                }
            };
            handles.0.inc();
            if let Some(stock) = &handles.1 {
                stock.dec();
            }
        }
    }

    /// A result published (draws and repeats alike).
    pub fn result(&mut self, outcome: &Outcome) {
        let status = outcome.status();
        let counters = match self.results.get_mut(&*outcome.pool) {
            Some(c) => c,
            None => self.results.entry(outcome.pool.clone()).or_default(),
        };
        if let Some((_, counter)) = counters.iter().find(|(s, _)| *s == status) {
            counter.inc();
            return;
        }
        // First result of this status for this pool since start.
        let counter = self.metrics.results.get_or_create_owned(&vec![
            ("pool".into(), outcome.pool.to_string()),
            ("status".into(), status.into()),
        ]);
        counter.inc();
        counters.push((status, counter));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_gauge(m: &Metrics) -> bool {
        m.encode().lines().any(|l| l == "rewardpool_ready 1")
    }

    #[test]
    fn a_broker_alarm_makes_a_ready_worker_blocked_until_its_session_unblocks() {
        let m = Metrics::new();
        m.set_readiness(Readiness::Connecting);
        m.set_broker_blocked(1, true);
        assert_eq!(
            m.readiness(),
            Readiness::Connecting,
            "not ready stays as it is"
        );
        m.set_readiness(Readiness::Ready);
        assert_eq!(m.readiness(), Readiness::Blocked);
        assert_eq!(m.readiness().reason(), "blocked");
        assert!(!ready_gauge(&m));
        // An older session's unblock (or end) does not clear a newer session's alarm.
        m.set_broker_blocked(2, true);
        m.set_broker_blocked(1, false);
        assert_eq!(m.readiness(), Readiness::Blocked);
        m.set_broker_blocked(2, false);
        assert_eq!(m.readiness(), Readiness::Ready);
        assert!(ready_gauge(&m));
        m.set_broker_blocked(3, true);
        m.set_readiness(Readiness::ShuttingDown);
        assert_eq!(m.readiness(), Readiness::ShuttingDown);
    }
}
