//! Storage benchmarks on the real disk (criterion):
//!
//! - `engine_durable/batch_max=N`: requests per second through admission, draw, WAL append and
//!   `fdatasync`, counted when the caller sees the completion (after the fsync). The fsync
//!   latency measured in the same run is printed, with the ceiling `batch ÷ fsync latency`.
//! - `admin/restock_10000`: the time to apply 10,000 admin `restock` commands durably (through
//!   admission, the engine's checks, the WAL and `fdatasync`, batch_max=1024, counted when the
//!   last completion is seen), each iteration a fresh engine on the same directory.
//! - `recovery/replay_1m_records`: `recovery::load` of a WAL of 1,000,000 draw records.
//! - `snapshot/capture_1m_items_100k_window`: the engine's stall while a snapshot is taken
//!   (copying the state); `snapshot/write_...` is the background part (serialise + fsync).
//!
//! Data lives under `target/bench-data` (the real disk, not a tmpfs) unless
//! `REWARDPOOL_BENCH_DIR` says otherwise.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rewardpool::admin::AdminCommand;
use rewardpool::admission::{AdminSpec, Admission, DrawSpec, Submission};
use rewardpool::config::Config;
use rewardpool::engine::Engine;
use rewardpool::pool::{DrawRng, Mode};
use rewardpool::record::Record;
use rewardpool::seed::{PoolSeed, SeedItem, Stock};
use rewardpool::snapshot::{self, Image};
use rewardpool::state::{DrawInput, State};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `REWARDPOOL_BENCH_DIR` moves the data (e.g. to a tmpfs, to see the CPU-bound ceiling with
/// fsync costing nothing); the default is the real disk.
fn bench_dir(name: &str) -> PathBuf {
    let base = std::env::var_os("REWARDPOOL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data"));
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(data_dir: &Path, batch_records_max: usize) -> Config {
    let mut c = Config::builtin();
    c.storage.data_dir = data_dir.to_path_buf();
    c.storage.batch_records_max = batch_records_max;
    c.storage.channel_capacity = (batch_records_max * 4).max(1024);
    c.storage.snapshot_every_records = 10_000_000;
    c.storage.id_block_size = 1 << 20;
    // An unlimited item: the pool never runs out, every request really draws.
    c.pools[0].mode = Mode::ByWeight;
    c.pools[0].items = vec![
        item("gold", Some(1_000_000_000), Some(1)),
        item("silver", Some(1_000_000_000), Some(9)),
        item("try_again", None, Some(90)),
    ];
    c
}

fn item(id: &str, quantity: Option<u64>, weight: Option<u64>) -> SeedItem {
    SeedItem {
        id: id.into(),
        stock: Stock::from_quantity(quantity),
        weight,
    }
}

/// Pushes `n` requests through a fresh engine; returns the elapsed time until the last
/// completion and the engine's fsync statistics (count, total µs).
fn durable_run(cfg: &Config, n: u64, first_key: u64) -> (Duration, u64, u64, u64) {
    let recovered = rewardpool::recovery::recover(cfg, false).unwrap();
    let window = Admission::<()>::window_of(&recovered.state);
    let (mut engine, mut committed) = Engine::<()>::start(
        recovered.state,
        recovered.segment,
        rewardpool::engine::EngineOptions::from_config(cfg, false),
    );
    let stats = engine.stats();
    let mut admission = Admission::new(window, engine.ids(), engine.sender());
    let started = Instant::now();
    let consumer = std::thread::spawn(move || {
        let mut done = 0u64;
        while done < n {
            match committed.blocking_recv() {
                Some(batch) => done += batch.completions.len() as u64,
                None => break,
            }
        }
        let elapsed = started.elapsed();
        while committed.blocking_recv().is_some() {}
        elapsed
    });
    for k in first_key..first_key + n {
        let mid = format!("bench-{k}");
        let assigned = admission.assign_blocking(Some(&mid)).unwrap();
        admission
            .submit_blocking(
                assigned.with_draw(DrawSpec {
                    message_id: Some(mid),
                    pool_index: 0,
                    user: "bench-user".into(),
                    count: 1,
                }),
                (),
            )
            .unwrap();
    }
    drop(admission);
    engine.close();
    let elapsed = consumer.join().unwrap();
    let fsyncs = stats.fsyncs.load(Ordering::Relaxed);
    let fsync_us = stats.fsync_us_total.load(Ordering::Relaxed);
    let batches = stats.batches.load(Ordering::Relaxed);
    engine.join().unwrap();
    (elapsed, fsyncs, fsync_us, batches)
}

/// Pushes `n` restock commands through a fresh engine; the elapsed time until the last one is
/// durable and completed.
fn restock_run(cfg: &Config, n: u64) -> Duration {
    let recovered = rewardpool::recovery::recover(cfg, false).unwrap();
    let window = Admission::<()>::window_of(&recovered.state);
    let (mut engine, mut committed) = Engine::<()>::start(
        recovered.state,
        recovered.segment,
        rewardpool::engine::EngineOptions::from_config(cfg, false),
    );
    let mut admission = Admission::new(window, engine.ids(), engine.sender());
    let started = Instant::now();
    let consumer = std::thread::spawn(move || {
        let mut done = 0u64;
        while done < n {
            match committed.blocking_recv() {
                Some(batch) => {
                    for c in &batch.completions {
                        assert!(c.rejected.is_none(), "restock rejected: {:?}", c.rejected);
                    }
                    done += batch.completions.len() as u64;
                }
                None => break,
            }
        }
        let elapsed = started.elapsed();
        while committed.blocking_recv().is_some() {}
        elapsed
    });
    for _ in 0..n {
        let new = admission.assign_admin_blocking().unwrap();
        let spec = AdminSpec {
            message_id: None,
            command: AdminCommand::Restock {
                pool: "default".into(),
                item: "gold".into(),
                add: 1,
            },
        };
        admission
            .submit_blocking(Submission::Admin(new, spec), ())
            .unwrap();
    }
    drop(admission);
    engine.close();
    let elapsed = consumer.join().unwrap();
    engine.join().unwrap();
    elapsed
}

fn admin_restock(c: &mut Criterion) {
    let mut group = c.benchmark_group("admin");
    group.sample_size(10);
    const RESTOCKS: u64 = 10_000;
    group.throughput(Throughput::Elements(RESTOCKS));
    let dir = bench_dir("admin-restock");
    let cfg = config(&dir, 1024);
    let mut totals = (0u64, Duration::ZERO);
    group.bench_function("restock_10000", |b| {
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            for _ in 0..iters {
                elapsed += restock_run(&cfg, RESTOCKS);
            }
            totals.0 += iters;
            totals.1 += elapsed;
            elapsed
        })
    });
    if totals.0 > 0 {
        let per_run = totals.1.as_secs_f64() / totals.0 as f64;
        println!(
            "admin/restock_10000: 10,000 durable restocks take {:.1} ms ({:.0} commands/s)",
            per_run * 1e3,
            RESTOCKS as f64 / per_run
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    group.finish();
}

fn engine_durable(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine_durable");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(1));
    for batch in [1usize, 64, 1024, 4096] {
        let dir = bench_dir(&format!("durable-{batch}"));
        let cfg = config(&dir, batch);
        let mut key = 0u64;
        let mut totals = (0u64, 0u64, 0u64, 0u64, Duration::ZERO);
        group.bench_function(format!("batch_max={batch}"), |b| {
            b.iter_custom(|iters| {
                let (elapsed, fsyncs, fsync_us, batches) = durable_run(&cfg, iters, key);
                key += iters;
                totals.0 += iters;
                totals.1 += fsyncs;
                totals.2 += fsync_us;
                totals.3 += batches;
                totals.4 += elapsed;
                elapsed
            })
        });
        let _ = std::fs::remove_dir_all(&dir);
        if totals.0 == 0 {
            continue; // filtered out
        }
        let fsync_avg_us = totals.2 as f64 / totals.1.max(1) as f64;
        let per_fsync = totals.0 as f64 / totals.1.max(1) as f64;
        let measured = totals.0 as f64 / totals.4.as_secs_f64();
        let ceiling = batch as f64 / (fsync_avg_us / 1e6);
        eprintln!(
            "engine_durable batch_max={batch}: {measured:.0} draws/s; fsync avg {fsync_avg_us:.0} µs over {} fsyncs; {per_fsync:.1} draws per fsync, {:.1} per batch; ceiling batch÷fsync = {ceiling:.0}/s; measured/ceiling = {:.2}",
            totals.1,
            totals.0 as f64 / totals.3.max(1) as f64,
            measured / ceiling
        );
    }
    group.finish();
}

fn recovery_replay(c: &mut Criterion) {
    let dir = bench_dir("replay");
    let cfg = config(&dir, 4096);
    let records = 1_000_000u64;
    durable_run(&cfg, records, 0);
    // The clean stop wrote a final snapshot covering everything: remove it so the replay
    // starts from the start-up snapshot and reads every record.
    let snaps = snapshot::list(&dir).unwrap();
    std::fs::remove_file(&snaps[0].1).unwrap();
    let (state, report) = rewardpool::recovery::load(&dir, cfg.storage.dedupe_window).unwrap();
    assert!(report.records_replayed >= records, "{report:?}");
    drop(state);
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    group.throughput(Throughput::Elements(records));
    group.bench_function("replay_1m_records", |b| {
        b.iter(|| rewardpool::recovery::load(&dir, cfg.storage.dedupe_window).unwrap())
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A state with a 1,000,000-item pool and a full 100,000-entry window.
fn big_state() -> State {
    let mut state = State::new(100_000);
    state
        .apply(&Record::Reserve {
            ids_up_to: 10_000_000,
        })
        .unwrap();
    let items: Vec<SeedItem> = (0..1_000_000)
        .map(|i| SeedItem {
            id: format!("item-{i:07}"),
            stock: Stock::Limited(1000),
            weight: None,
        })
        .collect();
    state
        .apply(&Record::Seed {
            pool_index: 0,
            pool: PoolSeed {
                id: "big".into(),
                mode: Mode::ByQuantity,
                items,
            },
        })
        .unwrap();
    let mut rng = <DrawRng as rand::SeedableRng>::seed_from_u64(7);
    let mut wal = Vec::new();
    for id in 1..=100_000u64 {
        let mid = format!("m-{id}");
        state
            .draw(
                &DrawInput {
                    request_id: id,
                    message_id: Some(&mid),
                    key: Some(rewardpool::dedupe::message_key(&mid)),
                    pool_index: 0,
                    user: "user-name",
                    count: 1,
                },
                &mut rng,
                &mut wal,
            )
            .unwrap();
        wal.clear();
    }
    state
}

fn snapshot_stall(c: &mut Criterion) {
    let state = big_state();
    let dir = bench_dir("snapshot");
    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.bench_function("capture_1m_items_100k_window", |b| {
        b.iter(|| Image::capture(&state))
    });
    group.bench_function("write_1m_items_100k_window", |b| {
        b.iter_batched(
            || Image::capture(&state),
            |image| snapshot::write(&dir, &image).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(
    benches,
    engine_durable,
    admin_restock,
    recovery_replay,
    snapshot_stall
);
criterion_main!(benches);
