//! In-memory draw throughput of one pool, for 10, 10,000 and 1,000,000
//! items, in both modes: the figure behind the targets of >= 15,000,000
//! draws/s for 10 items and >= 1,000,000 draws/s for 1,000,000 items.
//!
//! The pools never run dry during a run: by_weight pools hold only unlimited
//! items, by_quantity pools hold 2^30..2^40 units per item, so every
//! iteration is a real draw (and in by_quantity also a tree update). Each
//! iteration is one `draw_one`, reported per element, so criterion's
//! "thrpt" line reads directly as draws per second.
//!
//! Run: `cargo bench --bench pool -- --warm-up-time 1 --measurement-time 3`.
//!
//! Wall-clock time: on a shared machine (the 2-core dev and CI machines run
//! other builds and benches) the figures drop with the load; read them next
//! to `/proc/loadavg`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::SeedableRng;
use rewardpool::pool::{DrawRng, Mode, Pool};
use rewardpool::seed::PoolSeed;

const SIZES: [usize; 3] = [10, 10_000, 1_000_000];

fn pool_of(mode: Mode, size: usize) -> Pool {
    // Large enough that no benchmark run can empty an item, small enough
    // that size * quantity stays within u64 (config bounds: 2^40 per item).
    let quantity_per_item: u64 = if size <= 1024 { 1 << 40 } else { 1 << 30 };
    let items: Vec<_> = (0..size)
        .map(|i| {
            let id = format!("item{i}");
            match mode {
                // Varied weights so the tree is not uniform.
                Mode::ByWeight => (id, None, Some(1 + (i as u64 * 7919) % 1000)),
                Mode::ByQuantity => (id, Some(quantity_per_item), None),
            }
        })
        .collect();
    Pool::seed(&PoolSeed::from_parts("bench", mode, &items)).expect("valid bench pool")
}

fn draws(c: &mut Criterion) {
    for (mode, name) in [
        (Mode::ByWeight, "by_weight"),
        (Mode::ByQuantity, "by_quantity"),
    ] {
        let mut group = c.benchmark_group(format!("draw_one/{name}"));
        group.throughput(Throughput::Elements(1));
        for size in SIZES {
            let mut pool = pool_of(mode, size);
            let mut rng = DrawRng::seed_from_u64(42);
            group.bench_function(BenchmarkId::from_parameter(size), |b| {
                b.iter(|| black_box(pool.draw_one(&mut rng)))
            });
        }
        group.finish();
    }

    // Batched draws through `draw` into a reused buffer, as the worker does
    // for a multi-draw request.
    let mut group = c.benchmark_group("draw_1000/by_quantity");
    group.throughput(Throughput::Elements(1000));
    for size in SIZES {
        let mut pool = pool_of(Mode::ByQuantity, size);
        let mut rng = DrawRng::seed_from_u64(43);
        let mut out = Vec::with_capacity(1000);
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| {
                out.clear();
                black_box(pool.draw(1000, &mut rng, &mut out))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, draws);
criterion_main!(benches);
