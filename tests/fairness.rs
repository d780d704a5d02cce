//! Statistical fairness of the draw: Pearson chi-square goodness-of-fit tests
//! of observed draw counts against the probabilities the pool promises.
//!
//! Every test uses a fixed seed, so it is deterministic: it either always
//! passes or always fails. Each compares its statistic with the chi-square
//! critical value at p = 0.001 for its degrees of freedom, so a correct draw
//! fails a given seed with probability 0.001, and a draw biased by more than
//! the noise of 10^5..10^6 draws fails for (practically) every seed. The
//! tests were checked to fail with a deliberately biased draw (2% of draws
//! forced onto the first item in stock) before that bias was removed.
//!
//! Run with `--nocapture` to see the statistics.

use rand::SeedableRng;
use rewardpool::pool::{DrawRng, Mode, Pool};
use rewardpool::seed::PoolSeed;

/// Upper critical values of the chi-square distribution at p = 0.001
/// (P(X >= value) = 0.001), by degrees of freedom. df 2 and 59 match the
/// printed tables (13.816, 98.324); df 999 is beyond printed tables and was
/// computed by inverting the regularized incomplete gamma function
/// Q(df/2, x/2) = 0.001 (it agrees with the Wilson-Hilferty approximation,
/// 1142.9).
fn critical_value_p001(degrees_of_freedom: usize) -> f64 {
    match degrees_of_freedom {
        2 => 13.816,
        9 => 27.877,
        59 => 98.324,
        99 => 148.230,
        999 => 1142.848,
        other => panic!("no critical value recorded for df {other}"),
    }
}

/// Pearson's statistic: sum over cells of (observed - expected)^2 / expected.
fn chi_square(observed: &[u64], expected: &[f64]) -> f64 {
    assert_eq!(observed.len(), expected.len());
    observed
        .iter()
        .zip(expected)
        .map(|(&o, &e)| {
            assert!(e >= 5.0, "expected count {e} too small for chi-square");
            let d = o as f64 - e;
            d * d / e
        })
        .sum()
}

fn assert_fits(name: &str, statistic: f64, degrees_of_freedom: usize) {
    let critical = critical_value_p001(degrees_of_freedom);
    println!(
        "{name}: chi2 = {statistic:.3}, df = {degrees_of_freedom}, critical(p=0.001) = {critical}"
    );
    assert!(
        statistic < critical,
        "{name}: chi2 {statistic:.3} >= {critical} (df {degrees_of_freedom}): draw is biased"
    );
}

fn named(items: &[(&str, Option<u64>, Option<u64>)]) -> Vec<(String, Option<u64>, Option<u64>)> {
    items
        .iter()
        .map(|&(id, quantity, weight)| (id.to_string(), quantity, weight))
        .collect()
}

/// by_weight: car w=1, voucher w=99, try_again w=900 (unlimited). The limited
/// quantities (10^6 each) are far above what 10^6 draws can take from car
/// (~1,000) and voucher (~99,000), so the weights never change and every
/// draw is an independent multinomial trial with P = w / 1000.
#[test]
fn by_weight_matches_weights() {
    let items = named(&[
        ("car", Some(1_000_000), Some(1)),
        ("voucher", Some(1_000_000), Some(99)),
        ("try_again", None, Some(900)),
    ]);
    let mut pool = Pool::seed(&PoolSeed::from_parts("weights", Mode::ByWeight, &items)).unwrap();
    let mut rng = DrawRng::seed_from_u64(0x5eed_0001);
    let draws: u64 = 1_000_000;
    let mut observed = [0u64; 3];
    for _ in 0..draws {
        observed[pool.draw_one(&mut rng).unwrap() as usize] += 1;
    }
    assert!(pool.items()[0].quantity.unwrap() > 0 && pool.items()[1].quantity.unwrap() > 0);
    let expected: Vec<f64> = [1.0, 99.0, 900.0]
        .iter()
        .map(|w| draws as f64 * w / 1000.0)
        .collect();
    println!("by_weight observed {observed:?} expected {expected:?}");
    assert_fits("by_weight 1/99/900", chi_square(&observed, &expected), 2);
}

/// by_quantity: gold 100,000, silver 300,000, bronze 600,000 units
/// (N = 10^6), draw k = 500,000. Drawing units without replacement makes the
/// per-item counts multivariate hypergeometric, not multinomial: the means
/// are k * q_i / N, and the covariance is the multinomial one times the
/// finite-population correction (N - k) / (N - 1). So Pearson's statistic
/// divided by that correction is asymptotically chi-square with
/// (items - 1) df. Without the correction the test would still be valid but
/// too lenient (here by half).
#[test]
fn by_quantity_matches_units_without_replacement() {
    let quantities = [100_000u64, 300_000, 600_000];
    let items = named(&[
        ("gold", Some(quantities[0]), None),
        ("silver", Some(quantities[1]), None),
        ("bronze", Some(quantities[2]), None),
    ]);
    let mut pool = Pool::seed(&PoolSeed::from_parts("units", Mode::ByQuantity, &items)).unwrap();
    let mut rng = DrawRng::seed_from_u64(0x5eed_0002);
    let units: u64 = quantities.iter().sum();
    let draws: u64 = 500_000;
    let mut out = Vec::new();
    assert_eq!(pool.draw(draws as u32, &mut rng, &mut out), draws as u32);
    let mut observed = [0u64; 3];
    for &index in &out {
        observed[index as usize] += 1;
    }
    let expected: Vec<f64> = quantities
        .iter()
        .map(|&q| draws as f64 * q as f64 / units as f64)
        .collect();
    let correction = (units - draws) as f64 / (units - 1) as f64;
    println!("by_quantity observed {observed:?} expected {expected:?}");
    assert_fits(
        "by_quantity 100k/300k/600k, 500k draws (finite-population corrected)",
        chi_square(&observed, &expected) / correction,
        2,
    );
}

/// by_quantity, exact law of whole draw sequences: emptying a pool of
/// gold 1, silver 2, bronze 3 must give every distinct order of those six
/// units the same probability, 1 / (6! / (1! 2! 3!)) = 1/60, because each
/// draw picks uniformly among the units left. This tests how the draw follows
/// the stock as it runs down, not just the totals. 100,000 independent pools
/// (one RNG stream) -> 60 cells of ~1,667, df = 59.
#[test]
fn by_quantity_orders_are_uniform_while_stock_runs_down() {
    let template = Pool::seed(&PoolSeed::from_parts(
        "orders",
        Mode::ByQuantity,
        &named(&[
            ("gold", Some(1), None),
            ("silver", Some(2), None),
            ("bronze", Some(3), None),
        ]),
    ))
    .unwrap();
    let mut rng = DrawRng::seed_from_u64(0x5eed_0003);
    let pools: u64 = 100_000;
    // Cell = the sequence read as a base-3 number; only 60 of 729 can occur.
    let mut cells = vec![0u64; 729];
    let mut out = Vec::with_capacity(6);
    for _ in 0..pools {
        let mut pool = template.clone();
        out.clear();
        assert_eq!(pool.draw(10, &mut rng, &mut out), 6);
        let code = out.iter().fold(0usize, |acc, &i| acc * 3 + i as usize);
        cells[code] += 1;
    }
    let possible = |mut code: usize| {
        let mut counts = [0; 3];
        for _ in 0..6 {
            counts[code % 3] += 1;
            code /= 3;
        }
        counts == [1, 2, 3]
    };
    let mut observed = Vec::new();
    for (code, &count) in cells.iter().enumerate() {
        if possible(code) {
            observed.push(count);
        } else {
            assert_eq!(count, 0, "impossible sequence {code} drawn");
        }
    }
    assert_eq!(observed.len(), 60);
    let expected = vec![pools as f64 / 60.0; 60];
    assert_fits(
        "by_quantity 1/2/3 full orders",
        chi_square(&observed, &expected),
        59,
    );
}

/// Builds a 1,000,000-item pool: by_weight items of weight 1 (unlimited) or
/// by_quantity items of quantity 1.
fn million_item_pool(mode: Mode) -> Pool {
    let items: Vec<_> = (0..1_000_000)
        .map(|i| match mode {
            Mode::ByWeight => (format!("item{i}"), None, Some(1)),
            Mode::ByQuantity => (format!("item{i}"), Some(1), None),
        })
        .collect();
    Pool::seed(&PoolSeed::from_parts("million", mode, &items)).unwrap()
}

const BUCKETS: usize = 1000;
const ITEMS_PER_BUCKET: usize = 1000;

/// 1,000,000 unlimited items of weight 1, 10^6 draws, counted in 1,000
/// buckets of 1,000 consecutive items (expected 1,000 each), df = 999.
/// Consecutive buckets catch any bias tied to position in the tree.
#[test]
fn million_items_by_weight_is_uniform() {
    let mut pool = million_item_pool(Mode::ByWeight);
    let mut rng = DrawRng::seed_from_u64(0x5eed_0004);
    let draws: u64 = 1_000_000;
    let mut observed = vec![0u64; BUCKETS];
    for _ in 0..draws {
        observed[pool.draw_one(&mut rng).unwrap() as usize / ITEMS_PER_BUCKET] += 1;
    }
    let expected = vec![draws as f64 / BUCKETS as f64; BUCKETS];
    assert_fits(
        "1M items by_weight, 1000 buckets",
        chi_square(&observed, &expected),
        BUCKETS - 1,
    );
}

/// 1,000,000 items of quantity 1, draw half of them: each bucket of 1,000
/// units gives a multivariate hypergeometric count (expected 500), so the
/// statistic is divided by the finite-population correction
/// (N - k) / (N - 1) as in the by_quantity test above, df = 999. Half the
/// items leave the tree during the test, so this also exercises updates.
#[test]
fn million_items_by_quantity_is_uniform() {
    let mut pool = million_item_pool(Mode::ByQuantity);
    let mut rng = DrawRng::seed_from_u64(0x5eed_0005);
    let units: u64 = 1_000_000;
    let draws: u64 = 500_000;
    let mut observed = vec![0u64; BUCKETS];
    let mut seen = vec![false; units as usize];
    for _ in 0..draws {
        let index = pool.draw_one(&mut rng).unwrap() as usize;
        assert!(!seen[index], "item {index} of quantity 1 drawn twice");
        seen[index] = true;
        observed[index / ITEMS_PER_BUCKET] += 1;
    }
    assert_eq!(pool.in_stock_weight(), units - draws);
    let expected = vec![draws as f64 / BUCKETS as f64; BUCKETS];
    let correction = (units - draws) as f64 / (units - 1) as f64;
    assert_fits(
        "1M items by_quantity, half drawn, 1000 buckets (finite-population corrected)",
        chi_square(&observed, &expected) / correction,
        BUCKETS - 1,
    );
}

/// The engine's path: one stream per request, `DrawKey(epoch secret).stream(request_id)`, over
/// 10 epochs of 20,000 consecutive requests. Ten equally weighted unlimited items: each epoch's
/// outcomes are uniform (df 9), and the pairs (outcome of request r, outcome of request r + 1)
/// are uniform over the 100 cells (df 99), which they are not if consecutive requests' streams
/// are correlated (e.g. a stream that ignored the request ID would put every pair on the
/// diagonal).
#[test]
fn per_request_streams_are_uniform_across_epochs_and_uncorrelated() {
    use rewardpool::epoch::{DrawKey, test_secret};
    let items: Vec<(String, Option<u64>, Option<u64>)> =
        (0..10).map(|i| (format!("i{i}"), None, Some(7))).collect();
    let mut pool = Pool::seed(&PoolSeed::from_parts("uniform", Mode::ByWeight, &items)).unwrap();
    let requests_per_epoch = 20_000u64;
    let mut pairs = vec![0u64; 100];
    let mut total = vec![0u64; 10];
    let mut out = Vec::with_capacity(1);
    let mut previous: Option<u32> = None;
    for epoch in 1..=10u64 {
        let key = DrawKey::new(&test_secret(0x5eed_0006, epoch));
        let mut counts = vec![0u64; 10];
        for r in 0..requests_per_epoch {
            let request_id = (epoch - 1) * requests_per_epoch + r + 1;
            out.clear();
            pool.draw(1, &mut key.stream(request_id), &mut out);
            let item = out[0];
            counts[item as usize] += 1;
            if let Some(p) = previous {
                pairs[p as usize * 10 + item as usize] += 1;
            }
            previous = Some(item);
        }
        let expected = [requests_per_epoch as f64 / 10.0; 10];
        assert_fits(&format!("epoch {epoch}"), chi_square(&counts, &expected), 9);
        for (t, c) in total.iter_mut().zip(&counts) {
            *t += c;
        }
    }
    let n: u64 = total.iter().sum();
    assert_fits("all epochs", chi_square(&total, &[n as f64 / 10.0; 10]), 9);
    let n_pairs: u64 = pairs.iter().sum();
    assert_fits(
        "consecutive pairs",
        chi_square(&pairs, &[n_pairs as f64 / 100.0; 100]),
        99,
    );
}
