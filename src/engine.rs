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
use crate::epoch::{self, DrawKey};
use crate::failpoint::failpoint;
use crate::ids::IdAllocator;
use crate::limits::{
    BATCH_RECORD_BYTES_ESTIMATE, ENGINE_COMMITTED_BATCHES_MAX, ENGINE_JOBS_MAX,
    WAL_GROUP_BATCHES_MAX,
};
use crate::record::{EpochRecord, Record};
use crate::snapshot::{self, Image};
use crate::state::{AdminResult, DrawInput, Outcome, State};
use crate::storage::Storage;
use crate::wal::{BatchBuilder, SegmentWriter};
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
    /// Draws per epoch: a new secret after this many (src/epoch.rs).
    pub seed_epoch_records: u64,
    /// WAL bytes kept for `audit` after snapshots make them unnecessary for recovery.
    pub wal_retain_bytes: u64,
    pub keep_all_wal: bool,
    /// The file operations (`storage::real()`; the fault simulation passes its own).
    pub storage: &'static dyn Storage,
}

impl EngineOptions {
    /// The engine's options from the config's `[storage]` section. `keep_all_wal` keeps every
    /// WAL segment (no pruning), for tests that audit the whole history.
    pub fn from_config(config: &crate::config::Config, keep_all_wal: bool) -> EngineOptions {
        let s = &config.storage;
        EngineOptions {
            data_dir: s.data_dir.clone(),
            batch_records_max: s.batch_records_max,
            channel_capacity: s.channel_capacity,
            snapshot_every_records: s.snapshot_every_records,
            segment_bytes_max: s.segment_bytes_max,
            id_block_size: s.id_block_size,
            rng_seed: s.rng_seed,
            seed_epoch_records: s.seed_epoch_records,
            wal_retain_bytes: s.wal_retain_bytes,
            keep_all_wal,
            storage: crate::storage::real(),
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

/// An admin command with its ID: the engine checks it against the state between two draws and
/// applies it (a WAL record) or rejects it (nothing written, the ID is a gap).
pub struct AdminRequest<T> {
    pub request_id: u64,
    pub message_id: Option<String>,
    pub command: crate::admin::AdminCommand,
    pub ticket: T,
}

pub enum Command<T> {
    Draw(DrawRequest<T>),
    Repeat(RepeatRequest<T>),
    Admin(AdminRequest<T>),
    /// Nothing to draw; check whether an ID reservation is due.
    Wake,
}

pub struct Completion<T> {
    /// A draw's outcome, or an applied admin command's (`outcome.admin` holds its reply).
    pub outcome: Arc<Outcome>,
    pub repeat: bool,
    pub ticket: T,
    /// An admin command the state refused: the reason. `outcome` then only names the request
    /// ID and pool; nothing was written or changed.
    pub rejected: Option<String>,
}

/// Completions of requests whose records are durable, in draw order.
pub struct Committed<T> {
    /// The batch whose records these are (a repeat-only group: the last batch before it).
    pub seq: u64,
    pub completions: Vec<Completion<T>>,
    durable: Arc<DurableMark>,
}

impl<T> Committed<T> {
    /// Asserts, in release builds too, that the WAL writer's durable mark covers this batch:
    /// nothing completes before its records are on disk. Whoever completes calls it.
    pub fn assert_durable(&self) {
        self.durable.assert_covers(self.seq);
    }
}

/// "Durable through batch N": the highest batch sequence number the WAL writer has fsynced.
/// Only the writer advances it, after the fsync and before it sends any completion on.
#[derive(Debug, Default)]
pub struct DurableMark(AtomicU64);

impl DurableMark {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn advance(&self, seq: u64) {
        let before = self.0.fetch_max(seq, Ordering::AcqRel);
        assert!(
            before <= seq,
            "durable mark moved back from {before} to {seq}"
        );
    }

    pub fn assert_covers(&self, seq: u64) {
        let durable = self.get();
        assert!(
            seq <= durable,
            "batch {seq} completes before it is durable (durable through batch {durable})"
        );
    }
}

/// A fatal failure of the WAL writer or the snapshot thread. Never retried (an fsync error
/// leaves the page cache in an unknown state); the `io::Error` is kept, so a full disk stays
/// recognisable ([`StorageError::is_storage_full`]).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {seq}: {source}")]
    Snapshot {
        what: &'static str,
        seq: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot thread stopped")]
    SnapshotThreadGone,
}

impl StorageError {
    /// The kind of the underlying I/O error, if there is one.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            StorageError::Io { source, .. } | StorageError::Snapshot { source, .. } => {
                Some(source.kind())
            }
            StorageError::SnapshotThreadGone => None,
        }
    }

    /// ENOSPC (or a quota): the operator frees space; nothing is corrupt.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StorageError::Io { source, .. } | StorageError::Snapshot { source, .. } => {
                is_disk_full(source)
            }
            StorageError::SnapshotThreadGone => false,
        }
    }
}

/// ENOSPC or a quota: the one storage failure an operator fixes by freeing space.
pub fn is_disk_full(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || error.raw_os_error() == Some(libc::ENOSPC)
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
    /// Images the engine copied for the snapshot thread (`snapshots` counts those written).
    pub snapshot_images: AtomicU64,
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
            snapshot_images: AtomicU64::new(0),
            fsync_seconds: crate::metrics::fsync_histogram(),
            batch_records: crate::metrics::batch_records_histogram(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("fatal storage error, the engine stopped: {0}")]
    Fatal(#[source] Arc<StorageError>),
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

type Fatal = Arc<Mutex<Option<Arc<StorageError>>>>;

pub struct Engine<T> {
    tx: Option<mpsc::Sender<Command<T>>>,
    ids: Arc<IdAllocator>,
    stats: Arc<EngineStats>,
    fatal: Fatal,
    durable: Arc<DurableMark>,
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
        let (out_tx, out_rx) = mpsc::channel(ENGINE_COMMITTED_BATCHES_MAX);
        let (job_tx, job_rx) = std_mpsc::sync_channel::<Job<T>>(ENGINE_JOBS_MAX);
        let (snap_tx, snap_rx) = std_mpsc::sync_channel::<Image>(1);
        let ids = Arc::new(IdAllocator::new(state.reserved_ids, options.id_block_size));
        let stats = Arc::new(EngineStats::default());
        let fatal: Fatal = Arc::new(Mutex::new(None));
        let snap_busy = Arc::new(AtomicBool::new(false));
        // The recovered state is on disk.
        let durable = Arc::new(DurableMark(AtomicU64::new(state.seq)));

        let mut threads = Vec::new();
        {
            let ids = ids.clone();
            let stats = stats.clone();
            let snap_busy = snap_busy.clone();
            let options = options.clone();
            let fatal = fatal.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("rp-engine".into())
                    .spawn(move || {
                        engine_loop(state, rx, job_tx, ids, stats, snap_busy, fatal, options)
                    })
                    .expect("spawn engine thread"),
            );
        }
        {
            let ids = ids.clone();
            let stats = stats.clone();
            let fatal = fatal.clone();
            let options = options.clone();
            let durable = durable.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("rp-writer".into())
                    .spawn(move || {
                        let writer = Writer {
                            out: out_tx,
                            snaps: snap_tx,
                            ids,
                            stats,
                            durable,
                            options,
                        };
                        if let Err(e) = writer.run(segment, job_rx) {
                            tracing::error!(error = %e, "WAL write failed; the engine stops");
                            fatal.lock().expect("fatal lock").get_or_insert(Arc::new(e));
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
                            fatal.lock().expect("fatal lock").get_or_insert(Arc::new(e));
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
                durable,
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
    pub fn fatal(&self) -> Option<Arc<StorageError>> {
        self.fatal.lock().expect("fatal lock").clone()
    }
    /// The writer's "durable through batch N" mark.
    pub fn durable(&self) -> Arc<DurableMark> {
        self.durable.clone()
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

#[allow(clippy::too_many_arguments)]
fn engine_loop<T>(
    mut state: State,
    mut rx: mpsc::Receiver<Command<T>>,
    job_tx: std_mpsc::SyncSender<Job<T>>,
    ids: Arc<IdAllocator>,
    stats: Arc<EngineStats>,
    snap_busy: Arc<AtomicBool>,
    fatal: Fatal,
    options: EngineOptions,
) {
    assert!(options.seed_epoch_records >= 1);
    // Every start draws under a new epoch, begun (and recorded) before its first draw.
    let mut draw_key: Option<DrawKey> = None;
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
        let mut batch =
            BatchBuilder::with_capacity(commands.len() * BATCH_RECORD_BYTES_ESTIMATE + 64);
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
                    let due = state
                        .epoch
                        .as_ref()
                        .is_none_or(|e| e.draws >= options.seed_epoch_records);
                    if draw_key.is_none() || due {
                        let record = new_epoch(&state, options.rng_seed);
                        batch.push_record(&record);
                        state
                            .apply(&record)
                            .unwrap_or_else(|e| panic!("engine invariant violated: {e}"));
                        let epoch = state.epoch.as_ref().expect("epoch just applied");
                        tracing::info!(
                            epoch = epoch.number,
                            commitment = %epoch::to_hex(&epoch.commitment),
                            "draw epoch begins"
                        );
                        draw_key = Some(epoch.key.clone());
                    }
                    let mut rng = draw_key
                        .as_ref()
                        .expect("epoch begun")
                        .stream(req.request_id);
                    // The engine never draws an ID twice nor out of order: `draw` checks it.
                    let outcome = state
                        .draw(&input, &mut rng, batch.buffer())
                        .unwrap_or_else(|e| panic!("engine invariant violated: {e}"));
                    batch.count_record();
                    completions.push(Completion {
                        outcome,
                        repeat: false,
                        ticket: req.ticket,
                        rejected: None,
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
                        rejected: None,
                    });
                }
                Command::Admin(req) => {
                    assert!(
                        req.request_id <= state.reserved_ids,
                        "request ID {} handed out beyond the reservation {}",
                        req.request_id,
                        state.reserved_ids
                    );
                    let applied = state
                        .admin(
                            req.request_id,
                            req.message_id.as_deref(),
                            &req.command,
                            batch.buffer(),
                        )
                        .unwrap_or_else(|e| panic!("engine invariant violated: {e}"));
                    let (outcome, repeat, rejected) = match applied {
                        AdminResult::Applied(outcome) => {
                            batch.count_record();
                            (outcome, false, None)
                        }
                        AdminResult::Repeat(first) => (first, true, None),
                        AdminResult::Rejected(reason) => (
                            Arc::new(Outcome {
                                request_id: req.request_id,
                                pool: Arc::from(req.command.pool()),
                                user: Arc::from(""),
                                count: 0,
                                items: Vec::new(),
                                closed: false,
                                admin: None,
                            }),
                            false,
                            Some(reason),
                        ),
                    };
                    completions.push(Completion {
                        outcome,
                        repeat,
                        ticket: req.ticket,
                        rejected,
                    });
                }
            }
        }
        if batch.is_empty() && completions.is_empty() {
            // Nothing to send the writer, so no failed send tells us it stopped: a caller
            // waking us for an ID (already reserved, never durable) would wait for ever.
            if fatal.lock().expect("fatal lock").is_some() {
                return;
            }
            continue;
        }
        // Conservation, per batch and in release builds: O(pools), not per draw.
        state.assert_conserved();
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
            stats.snapshot_images.fetch_add(1, Ordering::Relaxed);
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

/// The `Epoch` record that follows the state's current epoch: a fresh secret from the OS, or
/// under the test-only `rng_seed` one derived from it and the epoch number.
fn new_epoch(state: &State, rng_seed: Option<u64>) -> Record {
    let number = state.epoch.as_ref().map_or(0, |e| e.number) + 1;
    let secret = match rng_seed {
        Some(seed) => epoch::test_secret(seed, number),
        None => epoch::os_secret(),
    };
    Record::Epoch(EpochRecord {
        number,
        secret,
        commitment: epoch::commitment(&secret),
    })
}

/// The WAL writer thread: group commit, then completions, in batch order.
struct Writer<T> {
    out: mpsc::Sender<Committed<T>>,
    snaps: std_mpsc::SyncSender<Image>,
    ids: Arc<IdAllocator>,
    stats: Arc<EngineStats>,
    durable: Arc<DurableMark>,
    options: EngineOptions,
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> StorageError {
    move |source| StorageError::Io { what, source }
}

impl<T> Writer<T> {
    fn run(
        self,
        mut segment: SegmentWriter,
        jobs: std_mpsc::Receiver<Job<T>>,
    ) -> Result<(), StorageError> {
        let dir = self.options.data_dir.clone();
        let mut group: Vec<Job<T>> = Vec::new();
        loop {
            group.clear();
            match jobs.recv() {
                Ok(j) => group.push(j),
                Err(_) => return Ok(()),
            }
            while group.len() < WAL_GROUP_BATCHES_MAX {
                match jobs.try_recv() {
                    Ok(j) => group.push(j),
                    Err(_) => break,
                }
            }
            // 1. Write every batch of the group; rotate where a snapshot marked a batch.
            let mut dirty = false;
            let mut written_through = None;
            for job in &group {
                if let Job::Batch {
                    seq,
                    bytes: Some(bytes),
                    snapshot,
                    ..
                } = job
                {
                    if segment.len_bytes() >= self.options.segment_bytes_max {
                        segment.sync().map_err(io_error("fsync WAL segment"))?;
                        segment = SegmentWriter::create_in(self.options.storage, &dir, *seq)
                            .map_err(io_error("create WAL segment"))?;
                    }
                    segment
                        .append(bytes)
                        .map_err(io_error("write WAL segment"))?;
                    failpoint("wal.after_write");
                    dirty = true;
                    written_through = Some(*seq);
                    if snapshot.is_some() {
                        segment.sync().map_err(io_error("fsync WAL segment"))?;
                        failpoint("rotate.before_create");
                        segment = SegmentWriter::create_in(self.options.storage, &dir, seq + 1)
                            .map_err(io_error("create WAL segment"))?;
                        failpoint("rotate.after_create");
                        dirty = false;
                    }
                }
            }
            // 2. One fsync for the group; then, and only then, the mark moves.
            if dirty {
                let started = Instant::now();
                segment.sync().map_err(io_error("fsync WAL segment"))?;
                let took = started.elapsed();
                self.stats.fsync_seconds.observe(took.as_secs_f64());
                let us = took.as_micros() as u64;
                self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                self.stats.fsync_us_total.fetch_add(us, Ordering::Relaxed);
                self.stats.fsync_us_max.fetch_max(us, Ordering::Relaxed);
                failpoint("wal.after_sync");
            }
            if let Some(seq) = written_through {
                self.durable.advance(seq);
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
                            self.ids.set_durable(up_to);
                        }
                        if !completions.is_empty() {
                            let committed = Committed {
                                seq,
                                completions,
                                durable: self.durable.clone(),
                            };
                            committed.assert_durable();
                            // A caller that stopped listening loses nothing: the records are
                            // durable.
                            let _ = self.out.blocking_send(committed);
                        }
                        if let Some(image) = snapshot {
                            self.snaps
                                .send(image)
                                .map_err(|_| StorageError::SnapshotThreadGone)?;
                        }
                    }
                    Job::Final(image) => {
                        drop(self.out);
                        self.snaps
                            .send(image)
                            .map_err(|_| StorageError::SnapshotThreadGone)?;
                        return Ok(());
                    }
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
) -> Result<(), StorageError> {
    while let Ok(image) = images.recv() {
        let started = Instant::now();
        let seq = image.seq;
        snapshot::write_in(options.storage, &options.data_dir, &image).map_err(|source| {
            StorageError::Snapshot {
                what: "write snapshot",
                seq,
                source,
            }
        })?;
        failpoint("snapshot.before_prune");
        snapshot::prune_in(
            options.storage,
            &options.data_dir,
            options.keep_all_wal,
            options.wal_retain_bytes,
        )
        .map_err(|source| StorageError::Snapshot {
            what: "prune after snapshot",
            seq,
            source,
        })?;
        tracing::info!(
            seq = image.seq,
            write_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        // Not busy before counted: whoever sees the count sees the thread ready for the next.
        busy.store(false, Ordering::Release);
        stats.snapshots.fetch_add(1, Ordering::Release);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_errors_keep_the_io_error_kind() {
        let full = StorageError::Io {
            what: "fsync WAL segment",
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(full.is_storage_full());
        assert_eq!(full.io_kind(), Some(std::io::ErrorKind::StorageFull));
        assert!(full.to_string().starts_with("fsync WAL segment: "));
        let denied = StorageError::Snapshot {
            what: "write snapshot",
            seq: 7,
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(!denied.is_storage_full());
        assert_eq!(denied.io_kind(), Some(std::io::ErrorKind::PermissionDenied));
        assert!(!StorageError::SnapshotThreadGone.is_storage_full());
    }

    #[test]
    fn the_durable_mark_only_moves_forward_and_guards_completions() {
        let mark = DurableMark::default();
        mark.advance(3);
        mark.assert_covers(3);
        mark.assert_covers(1);
        assert!(std::panic::catch_unwind(|| mark.assert_covers(4)).is_err());
        let mark = DurableMark(AtomicU64::new(5));
        assert!(std::panic::catch_unwind(|| mark.advance(4)).is_err());
    }
}
