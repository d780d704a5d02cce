//! The engine: the single owner of pool state, with group commit.
//!
//! Three threads, data flowing one way:
//!
//! ```text
//! commands ─▶ [engine thread] ──jobs──▶ [writer thread] ──Committed──▶ caller
//!  (bounded)   draws, encodes      (bounded)  write + one fdatasync      (bounded)
//!              WAL records                    per group of batches
//!                                             └──images──▶ [snapshot thread]
//! ```
//!
//! * The engine thread takes what is waiting (at most `batch_records_max`), draws each request
//!   against the state it alone owns, and encodes the batch. Nothing else mutates pool state.
//! * The writer appends batches, fsyncs once for everything it has, and only then sends the
//!   outcomes on. So nothing reaches a caller before its record is on disk, and while one fsync
//!   is in flight the engine is already drawing the next batch (pipelining; completion order
//!   is the draw order). Any write or fsync error is fatal: the writer stops, completes
//!   nothing more, and the handle reports the error (never retry an fsync).
//! * Every `snapshot_every_records` the engine copies the state (`snapshot::Image`) and marks
//!   the batch; after that batch is durable the writer starts a new segment and passes the
//!   image to the snapshot thread, which serialises, writes and prunes off the hot path.
//!
//! Threads rather than tasks: fsync blocks, and must never block the async runtime.

use crate::dedupe::{MessageKey, message_key};
use crate::failpoint::failpoint;
use crate::ids::IdAllocator;
use crate::pool::DrawRng;
use crate::record::Record;
use crate::snapshot::{self, Image};
use crate::state::{DrawInput, Outcome, State};
use crate::wal::{BatchBuilder, SegmentWriter};
use rand::SeedableRng;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc;

#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub data_dir: PathBuf,
    pub batch_records_max: usize,
    pub channel_capacity: usize,
    pub snapshot_every_records: u64,
    pub segment_bytes_max: u64,
    pub id_block_size: u64,
    pub rng_seed: Option<u64>,
    pub wal_keep_all: bool,
}

impl EngineOptions {
    /// The engine's options from the config's `[storage]` section. `wal_keep_all` keeps every
    /// WAL segment (no pruning), for tests that audit the whole history.
    pub fn from_config(config: &crate::config::Config, wal_keep_all: bool) -> EngineOptions {
        let s = &config.storage;
        EngineOptions {
            data_dir: s.data_dir.clone(),
            batch_records_max: s.batch_records_max,
            channel_capacity: s.channel_capacity,
            snapshot_every_records: s.snapshot_every_records,
            segment_bytes_max: s.segment_bytes_max,
            id_block_size: s.id_block_size,
            rng_seed: s.rng_seed,
            wal_keep_all,
        }
    }
}

/// A new request, with its ID already handed out by `IdAllocator`.
pub struct DrawRequest<T> {
    pub request_id: u64,
    pub message_id: Option<String>,
    /// `message_key(message_id)`, computed once by admission.
    pub key: Option<MessageKey>,
    pub pool_index: u32,
    pub user: String,
    pub count: u32,
    pub ticket: T,
}

/// A repeat of a drawn or in-flight request: completes with the first request's outcome.
pub struct RepeatRequest<T> {
    pub request_id: u64,
    pub key: MessageKey,
    pub ticket: T,
}

pub enum Command<T> {
    Draw(DrawRequest<T>),
    Repeat(RepeatRequest<T>),
    /// Nothing to draw; check whether an ID reservation is due.
    Wake,
}

pub struct Completion<T> {
    pub outcome: Arc<Outcome>,
    pub repeat: bool,
    pub ticket: T,
}

/// Completions of requests whose records are durable, in draw order.
pub struct Committed<T> {
    pub seq: u64,
    pub completions: Vec<Completion<T>>,
}

/// Counters for benchmarks and logs; the two histograms are the worker's metrics series
/// (`rewardpool_wal_fsync_duration_seconds`, `rewardpool_wal_batch_records`), observed once
/// per fsync and once per batch, never per request.
#[derive(Debug)]
pub struct EngineStats {
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub fsyncs: AtomicU64,
    pub fsync_us_total: AtomicU64,
    pub fsync_us_max: AtomicU64,
    pub snapshots: AtomicU64,
    pub fsync_seconds: prometheus_client::metrics::histogram::Histogram,
    pub batch_records: prometheus_client::metrics::histogram::Histogram,
}

impl Default for EngineStats {
    fn default() -> Self {
        EngineStats {
            batches: AtomicU64::new(0),
            records: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_us_total: AtomicU64::new(0),
            fsync_us_max: AtomicU64::new(0),
            snapshots: AtomicU64::new(0),
            fsync_seconds: crate::metrics::fsync_histogram(),
            batch_records: crate::metrics::batch_records_histogram(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("fatal storage error, the engine stopped: {0}")]
    Fatal(String),
    #[error("engine thread panicked")]
    Panicked,
}

enum Job<T> {
    Batch {
        seq: u64,
        bytes: Option<Vec<u8>>,
        completions: Vec<Completion<T>>,
        reserve: Option<u64>,
        snapshot: Option<Image>,
    },
    Final(Image),
}

type Fatal = Arc<Mutex<Option<String>>>;

pub struct Engine<T> {
    tx: Option<mpsc::Sender<Command<T>>>,
    ids: Arc<IdAllocator>,
    stats: Arc<EngineStats>,
    fatal: Fatal,
    threads: Vec<JoinHandle<()>>,
}

impl<T: Send + 'static> Engine<T> {
    /// Starts the engine on a recovered state, appending to `segment` (fresh, after recovery).
    pub fn start(
        state: State,
        segment: SegmentWriter,
        options: EngineOptions,
    ) -> (Engine<T>, mpsc::Receiver<Committed<T>>) {
        assert!(options.batch_records_max >= 1);
        let (tx, rx) = mpsc::channel(options.channel_capacity.max(1));
        let (out_tx, out_rx) = mpsc::channel(64);
        let (job_tx, job_rx) = std_mpsc::sync_channel::<Job<T>>(4);
        let (snap_tx, snap_rx) = std_mpsc::sync_channel::<Image>(1);
        let ids = Arc::new(IdAllocator::new(state.reserved_ids, options.id_block_size));
        let stats = Arc::new(EngineStats::default());
        let fatal: Fatal = Arc::new(Mutex::new(None));
        let snap_busy = Arc::new(AtomicBool::new(false));

        let mut threads = Vec::new();
        {
            let ids = ids.clone();
            let stats = stats.clone();
            let snap_busy = snap_busy.clone();
            let options = options.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("rp-engine".into())
                    .spawn(move || engine_loop(state, rx, job_tx, ids, stats, snap_busy, options))
                    .expect("spawn engine thread"),
            );
        }
        {
            let ids = ids.clone();
            let stats = stats.clone();
            let fatal = fatal.clone();
            let options = options.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("rp-writer".into())
                    .spawn(move || {
                        if let Err(e) =
                            writer_loop(segment, job_rx, out_tx, snap_tx, ids, stats, options)
                        {
                            tracing::error!(error = %e, "WAL write failed; the engine stops");
                            fatal.lock().expect("fatal lock").get_or_insert(e);
                        }
                    })
                    .expect("spawn writer thread"),
            );
        }
        {
            let stats = stats.clone();
            let fatal = fatal.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("rp-snapshot".into())
                    .spawn(move || {
                        if let Err(e) = snapshot_loop(snap_rx, snap_busy, stats, options) {
                            tracing::error!(error = %e, "snapshot failed; the engine stops");
                            fatal.lock().expect("fatal lock").get_or_insert(e);
                        }
                    })
                    .expect("spawn snapshot thread"),
            );
        }
        (
            Engine {
                tx: Some(tx),
                ids,
                stats,
                fatal,
                threads,
            },
            out_rx,
        )
    }
}

impl<T> Engine<T> {
    pub fn sender(&self) -> mpsc::Sender<Command<T>> {
        self.tx.clone().expect("engine is open")
    }
    pub fn ids(&self) -> Arc<IdAllocator> {
        self.ids.clone()
    }
    pub fn stats(&self) -> Arc<EngineStats> {
        self.stats.clone()
    }
    /// The fatal error, if the engine stopped on one.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().expect("fatal lock").clone()
    }

    /// Drops this handle's sender. Once every other sender is gone too the engine finishes
    /// what it has, writes a final snapshot and its threads end.
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// Closes and waits for every thread. Blocking: call from a blocking context, and keep
    /// draining the `Committed` receiver until it ends, or the writer cannot finish.
    pub fn join(mut self) -> Result<(), EngineError> {
        self.close();
        let mut panicked = false;
        for t in self.threads.drain(..) {
            panicked |= t.join().is_err();
        }
        if let Some(e) = self.fatal() {
            return Err(EngineError::Fatal(e));
        }
        if panicked {
            return Err(EngineError::Panicked);
        }
        Ok(())
    }
}

fn engine_loop<T>(
    mut state: State,
    mut rx: mpsc::Receiver<Command<T>>,
    job_tx: std_mpsc::SyncSender<Job<T>>,
    ids: Arc<IdAllocator>,
    stats: Arc<EngineStats>,
    snap_busy: Arc<AtomicBool>,
    options: EngineOptions,
) {
    let mut rng = match options.rng_seed {
        Some(seed) => DrawRng::seed_from_u64(seed),
        None => {
            let mut seed = [0u8; 32];
            rand::fill(&mut seed);
            DrawRng::from_seed(seed)
        }
    };
    let mut commands: Vec<Command<T>> = Vec::with_capacity(options.batch_records_max);
    let mut since_snapshot: u64 = 0;
    let mut open = true;
    while open {
        commands.clear();
        if ids.reservation_due(state.reserved_ids).is_none() {
            match rx.blocking_recv() {
                Some(c) => commands.push(c),
                None => break,
            }
        }
        while commands.len() < options.batch_records_max {
            match rx.try_recv() {
                Ok(c) => commands.push(c),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }

        // Sized for the batch so appending never reallocates: a draw record is ~40-600 bytes.
        let mut batch = BatchBuilder::with_capacity(commands.len() * 96 + 64);
        let mut completions = Vec::with_capacity(commands.len());
        let reserve = ids.reservation_due(state.reserved_ids);
        if let Some(up_to) = reserve {
            batch.push_record(&Record::Reserve { ids_up_to: up_to });
            state.reserved_ids = up_to;
        }
        for command in commands.drain(..) {
            match command {
                Command::Wake => {}
                Command::Draw(req) => {
                    assert!(
                        req.request_id <= state.reserved_ids,
                        "request ID {} handed out beyond the reservation {}",
                        req.request_id,
                        state.reserved_ids
                    );
                    debug_assert_eq!(req.key, req.message_id.as_deref().map(message_key));
                    let key = req.key;
                    // Admission sent this as new: its key is not in the window (admission's
                    // window holds the same keys). `draw` asserts it when it inserts the key.
                    let input = DrawInput {
                        request_id: req.request_id,
                        message_id: req.message_id.as_deref(),
                        key,
                        pool_index: req.pool_index,
                        user: &req.user,
                        count: req.count,
                    };
                    // The engine never draws an ID twice nor out of order: `draw` checks it.
                    let outcome = state
                        .draw(&input, &mut rng, batch.buffer())
                        .unwrap_or_else(|e| panic!("engine invariant violated: {e}"));
                    batch.count_record();
                    completions.push(Completion {
                        outcome,
                        repeat: false,
                        ticket: req.ticket,
                    });
                }
                Command::Repeat(rep) => {
                    let first = state.window.get(&rep.key).unwrap_or_else(|| {
                        panic!(
                            "repeat of request {} is not in the window: ingest and engine windows diverged",
                            rep.request_id
                        )
                    });
                    assert_eq!(first.request_id, rep.request_id, "repeat names another ID");
                    completions.push(Completion {
                        outcome: first.clone(),
                        repeat: true,
                        ticket: rep.ticket,
                    });
                }
            }
        }
        if batch.is_empty() && completions.is_empty() {
            continue;
        }
        let bytes = if batch.is_empty() {
            None
        } else {
            state.seq += 1;
            since_snapshot += batch.records() as u64;
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .records
                .fetch_add(batch.records() as u64, Ordering::Relaxed);
            stats.batch_records.observe(batch.records() as f64);
            Some(batch.finish(state.seq))
        };
        let mut image = None;
        if bytes.is_some()
            && since_snapshot >= options.snapshot_every_records
            && !snap_busy.swap(true, Ordering::AcqRel)
        {
            let started = Instant::now();
            image = Some(Image::capture(&state));
            tracing::debug!(
                seq = state.seq,
                stall_us = started.elapsed().as_micros() as u64,
                "snapshot state copied"
            );
            since_snapshot = 0;
        }
        let job = Job::Batch {
            seq: state.seq,
            bytes,
            completions,
            reserve,
            snapshot: image,
        };
        if job_tx.send(job).is_err() {
            // The writer stopped on a fatal error: complete nothing more.
            return;
        }
    }
    let _ = job_tx.send(Job::Final(Image::capture(&state)));
}

fn writer_loop<T>(
    mut segment: SegmentWriter,
    jobs: std_mpsc::Receiver<Job<T>>,
    out: mpsc::Sender<Committed<T>>,
    snaps: std_mpsc::SyncSender<Image>,
    ids: Arc<IdAllocator>,
    stats: Arc<EngineStats>,
    options: EngineOptions,
) -> Result<(), String> {
    let dir = options.data_dir.clone();
    let io = |what: &str, e: std::io::Error| format!("{what}: {e}");
    let mut group: Vec<Job<T>> = Vec::new();
    loop {
        group.clear();
        match jobs.recv() {
            Ok(j) => group.push(j),
            Err(_) => return Ok(()),
        }
        while group.len() < 64 {
            match jobs.try_recv() {
                Ok(j) => group.push(j),
                Err(_) => break,
            }
        }
        // 1. Write every batch of the group; rotate where a snapshot marked a batch.
        let mut dirty = false;
        for job in &group {
            if let Job::Batch {
                seq,
                bytes: Some(bytes),
                snapshot,
                ..
            } = job
            {
                if segment.len_bytes() >= options.segment_bytes_max {
                    segment.sync().map_err(|e| io("fsync WAL segment", e))?;
                    segment = SegmentWriter::create(&dir, *seq)
                        .map_err(|e| io("create WAL segment", e))?;
                }
                segment
                    .append(bytes)
                    .map_err(|e| io("write WAL segment", e))?;
                failpoint("wal.after_write");
                dirty = true;
                if snapshot.is_some() {
                    segment.sync().map_err(|e| io("fsync WAL segment", e))?;
                    failpoint("rotate.before_create");
                    segment = SegmentWriter::create(&dir, seq + 1)
                        .map_err(|e| io("create WAL segment", e))?;
                    failpoint("rotate.after_create");
                    dirty = false;
                }
            }
        }
        // 2. One fsync for the group.
        if dirty {
            let started = Instant::now();
            segment.sync().map_err(|e| io("fsync WAL segment", e))?;
            let took = started.elapsed();
            stats.fsync_seconds.observe(took.as_secs_f64());
            let us = took.as_micros() as u64;
            stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            stats.fsync_us_total.fetch_add(us, Ordering::Relaxed);
            stats.fsync_us_max.fetch_max(us, Ordering::Relaxed);
            failpoint("wal.after_sync");
        }
        // 3. Durable: publish reservations, complete in order, hand snapshots on.
        for job in group.drain(..) {
            match job {
                Job::Batch {
                    seq,
                    completions,
                    reserve,
                    snapshot,
                    ..
                } => {
                    if let Some(up_to) = reserve {
                        ids.set_durable(up_to);
                    }
                    if !completions.is_empty() {
                        // A caller that stopped listening loses nothing: the records are durable.
                        let _ = out.blocking_send(Committed { seq, completions });
                    }
                    if let Some(image) = snapshot {
                        snaps
                            .send(image)
                            .map_err(|_| "snapshot thread stopped".to_string())?;
                    }
                }
                Job::Final(image) => {
                    drop(out);
                    snaps
                        .send(image)
                        .map_err(|_| "snapshot thread stopped".to_string())?;
                    return Ok(());
                }
            }
        }
    }
}

fn snapshot_loop(
    images: std_mpsc::Receiver<Image>,
    busy: Arc<AtomicBool>,
    stats: Arc<EngineStats>,
    options: EngineOptions,
) -> Result<(), String> {
    while let Ok(image) = images.recv() {
        let started = Instant::now();
        snapshot::write(&options.data_dir, &image)
            .map_err(|e| format!("write snapshot {}: {e}", image.seq))?;
        failpoint("snapshot.before_prune");
        snapshot::prune(&options.data_dir, options.wal_keep_all)
            .map_err(|e| format!("prune after snapshot {}: {e}", image.seq))?;
        stats.snapshots.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            seq = image.seq,
            write_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        busy.store(false, Ordering::Release);
    }
    Ok(())
}
