//! One prize pool in memory: its items, their stock, and the weighted draw.
//!
//! A pool is either `by_quantity` (every remaining unit is equally likely, so
//! an item's weight is its remaining quantity) or `by_weight` (an item in stock
//! is drawn with probability weight / sum of the weights in stock; an item
//! with no quantity is unlimited and always in stock). Both reduce to "draw an
//! index with probability proportional to its current weight", which the
//! [`Fenwick`] tree answers in O(log n), and a draw changes at most one weight,
//! which the tree also updates in O(log n).
//!
//! The items (`Vec<Item>`) are the state that is persisted and replayed; the
//! tree is derived from them and is kept equal to them after every operation.
//! Debug builds check that relation from both sides (TigerBeetle-style pair
//! assertions): after each issue the tree's weight of the item is recomputed
//! from the tree and compared to the weight derived from the item, and
//! construction recomputes every weight.
//!
//! The draw takes an explicit seeded [`DrawRng`] so a run is reproducible, and
//! samples the target point with Lemire's multiply-and-reject method, which
//! is exactly unbiased for any range (rand's `random_range` is only unbiased
//! with its `unbiased` feature) and almost never needs a division.

use std::collections::HashSet;
use std::fmt;

use rand::Rng;

use crate::fenwick::Fenwick;
use crate::limits::{POOL_ITEMS_MAX, QUANTITY_MAX, WEIGHT_MAX};

/// The random stream of a draw: HMAC-SHA256 in counter mode keyed by the epoch secret
/// (src/epoch.rs), one stream per request.
pub use crate::epoch::DrawRng;

pub use crate::seed::Mode;
use crate::seed::PoolSeed;

/// State of one item. quantity None = unlimited (only allowed in by_weight pools).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Item {
    /// Item id from config.
    pub id: String,
    /// Units left; `None` = unlimited.
    pub quantity: Option<u64>,
    /// Draw weight (by_weight pools only).
    pub weight: Option<u64>,
    /// Units ever put in: the quantity at seeding plus every admin change (`restock`,
    /// `set_quantity`); `None` for unlimited items. Always `stocked = quantity + issued`.
    /// (Snapshots of version 1 called it `initial`.)
    #[serde(alias = "initial")]
    pub stocked: Option<u64>,
    /// Units issued so far.
    pub issued: u64,
}

/// One prize pool: items plus the Fenwick tree of their current weights.
#[derive(Clone, Debug)]
pub struct Pool {
    id: String,
    mode: Mode,
    items: Vec<Item>,
    /// `tree.weight(i) == draw_weight(mode, &items[i])` for every `i`.
    tree: Fenwick,
    /// Over the limited items, kept beside the items: `units_stocked == units_left +
    /// units_issued` is conservation, checked per batch in release builds.
    units_stocked: u64,
    units_left: u64,
    units_issued: u64,
}

/// Errors of pool construction and WAL replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolError {
    /// An item index that the pool does not have.
    UnknownItem { pool: String, index: u32 },
    /// An issue of an item with no units left.
    OutOfStock { pool: String, item: String },
    /// Items that break the pool's invariants.
    Invalid(String),
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::UnknownItem { pool, index } => {
                write!(f, "pool {pool:?} has no item with index {index}")
            }
            PoolError::OutOfStock { pool, item } => {
                write!(f, "item {item:?} of pool {pool:?} is out of stock")
            }
            PoolError::Invalid(reason) => write!(f, "invalid pool: {reason}"),
        }
    }
}

impl std::error::Error for PoolError {}

impl Pool {
    /// A new pool from its seed: stocked = quantity, issued = 0. The seed is checked again
    /// here (as for a snapshot), so a bad seed is an error, never a wrong pool.
    pub fn seed(seed: &PoolSeed) -> Result<Pool, PoolError> {
        let items = seed
            .items
            .iter()
            .map(|item| Item {
                id: item.id.clone(),
                quantity: item.stock.quantity(),
                weight: item.weight,
                stocked: item.stock.quantity(),
                issued: 0,
            })
            .collect();
        Pool::from_items(&seed.id, seed.mode, items)
    }

    /// Rebuild from persisted items (snapshot). Checks invariants (stocked == quantity + issued for limited items, by_quantity has no unlimited item, weights present in by_weight) -> PoolError::Invalid on violation.
    ///
    /// Also rejected: a weight in a by_quantity pool, a weight of 0, bounds
    /// above [`QUANTITY_MAX`], [`WEIGHT_MAX`], [`POOL_ITEMS_MAX`], an unlimited
    /// item with a `stocked`, and duplicate item ids.
    pub fn from_items(id: &str, mode: Mode, items: Vec<Item>) -> Result<Pool, PoolError> {
        let invalid = |reason: String| Err(PoolError::Invalid(format!("pool {id:?}: {reason}")));
        if items.len() > POOL_ITEMS_MAX {
            return invalid(format!("{} items, more than {POOL_ITEMS_MAX}", items.len()));
        }
        let mut ids = HashSet::with_capacity(items.len());
        let mut weights = Vec::with_capacity(items.len());
        let mut total: u64 = 0;
        for item in &items {
            if let Err(reason) = check_item(mode, item) {
                return invalid(format!("item {:?}: {reason}", item.id));
            }
            if !ids.insert(item.id.as_str()) {
                return invalid(format!("duplicate item id {:?}", item.id));
            }
            let weight = draw_weight(mode, item);
            total = match total.checked_add(weight) {
                Some(total) => total,
                None => return invalid("sum of weights overflows u64".to_string()),
            };
            weights.push(weight);
        }
        let (mut units_stocked, mut units_left, mut units_issued) = (0u64, 0u64, 0u64);
        for item in &items {
            if let (Some(stocked), Some(quantity)) = (item.stocked, item.quantity) {
                // Each stocked <= QUANTITY_MAX and at most POOL_ITEMS_MAX items: checked sums.
                let sums = (
                    units_stocked.checked_add(stocked),
                    units_left.checked_add(quantity),
                    units_issued.checked_add(item.issued),
                );
                let (Some(a), Some(b), Some(c)) = sums else {
                    return invalid("sum of the stock overflows u64".to_string());
                };
                (units_stocked, units_left, units_issued) = (a, b, c);
            }
        }
        let pool = Pool {
            id: id.to_string(),
            mode,
            items,
            tree: Fenwick::from_weights(&weights),
            units_stocked,
            units_left,
            units_issued,
        };
        #[cfg(debug_assertions)]
        pool.check_invariants();
        Ok(pool)
    }

    /// Pool id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Pool mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Items, in config order; a draw returns an index into this slice.
    pub fn items(&self) -> &[Item] {
        &self.items
    }

    /// One draw: by_quantity: every remaining unit equally likely (weight of an item = its quantity); by_weight: P(item) = weight / sum of weights of items in stock (unlimited items always in stock). Returns item index, or None when nothing is in stock. Decrements quantity, increments issued, updates the tree. O(log n).
    #[inline]
    pub fn draw_one(&mut self, rng: &mut DrawRng) -> Option<u32> {
        let total = self.tree.total();
        if total == 0 {
            return None;
        }
        let target = uniform_below(rng, total);
        let index = self.tree.find(target);
        debug_assert!(index < self.items.len());
        // target < total, so find returns an item of weight > 0: in stock.
        if self.issue(index) {
            Some(index as u32)
        } else {
            None
        }
    }

    /// Draws up to `count` one after another from the changing pool, pushing indexes to `out`; returns how many were drawn (fewer only when the pool runs out).
    pub fn draw(&mut self, count: u32, rng: &mut DrawRng, out: &mut Vec<u32>) -> u32 {
        // Reserve once per call (bounded, so a huge count cannot allocate
        // gigabytes up front), never per draw.
        out.reserve((count as usize).min(1 << 16));
        let mut drawn = 0;
        while drawn < count {
            match self.draw_one(rng) {
                Some(index) => out.push(index),
                None => break,
            }
            drawn += 1;
        }
        drawn
    }

    /// Replay of a recorded issue (WAL replay): decrement item `index` exactly as a draw would have. Errors if index out of range or the item has quantity 0.
    pub fn apply_issue(&mut self, index: u32) -> Result<(), PoolError> {
        let position = index as usize;
        let Some(item) = self.items.get(position) else {
            return Err(PoolError::UnknownItem {
                pool: self.id.clone(),
                index,
            });
        };
        if item.quantity == Some(0) || draw_weight(self.mode, item) == 0 {
            return Err(PoolError::OutOfStock {
                pool: self.id.clone(),
                item: item.id.clone(),
            });
        }
        let issued = self.issue(position);
        debug_assert!(issued);
        Ok(())
    }

    /// Sum of the current weights of the items in stock (the tree total);
    /// 0 exactly when nothing can be drawn.
    pub fn in_stock_weight(&self) -> u64 {
        self.tree.total()
    }

    /// Issues one unit of item `index`: decrements a limited quantity,
    /// increments `issued`, and moves the tree by the change of the item's
    /// weight. Precondition: the item is in stock (draw weight > 0), which
    /// `draw_one` knows from the search (a target below the total lands only
    /// on items of weight > 0) and `apply_issue` checks first. Returns false
    /// (and changes nothing) only if `index` is out of range.
    #[inline]
    fn issue(&mut self, index: usize) -> bool {
        let Some(item) = self.items.get_mut(index) else {
            return false;
        };
        debug_assert!(
            draw_weight(self.mode, item) > 0,
            "issue of {index}: out of stock"
        );
        let weight_after = match self.mode {
            Mode::ByQuantity => {
                // Weight = quantity > 0, so it drops by exactly 1. The tree
                // is updated without reading the item first, so the next
                // draw's search (which reads the nodes written here) does
                // not wait for the item's cache line, a DRAM miss in a big
                // pool: this took ~35% off a 1,000,000-item draw.
                self.tree.add(index, -1);
                let quantity = item
                    .quantity
                    .as_mut()
                    .expect("a by_quantity item is limited");
                *quantity = quantity
                    .checked_sub(1)
                    .expect("issue of a by_quantity item with no units left");
                item.issued += 1;
                self.units_left -= 1;
                self.units_issued += 1;
                *quantity
            }
            Mode::ByWeight => {
                // Mostly no tree change (unlimited, or units left); only the
                // last unit of a limited item takes its weight out.
                item.issued += 1;
                if let Some(quantity) = item.quantity.as_mut() {
                    *quantity = quantity
                        .checked_sub(1)
                        .expect("issue of a limited item with no units left");
                    self.units_left -= 1;
                    self.units_issued += 1;
                    if *quantity == 0 {
                        let weight = item.weight.unwrap_or(0);
                        // weight <= WEIGHT_MAX < 2^63: fits i64.
                        self.tree.add(index, -(weight as i64));
                    }
                }
                draw_weight(self.mode, item)
            }
        };
        // Pair assertion: the tree, read back independently, agrees with the
        // item it is derived from.
        debug_assert_eq!(self.tree.weight(index), weight_after);
        debug_assert_eq!(weight_after, draw_weight(self.mode, &self.items[index]));
        debug_assert!(self.items[index].stocked.is_none_or(|initial| {
            initial == self.items[index].quantity.unwrap_or(0) + self.items[index].issued
        }));
        true
    }

    /// Admin `restock`: `add` more units of the limited item `index`; its `stocked` moves with
    /// its quantity. The caller has checked the command ([`Pool::check_restock`]); a violation
    /// here is a broken invariant.
    pub fn restock(&mut self, index: u32, add: u64) -> Result<(), PoolError> {
        let quantity = self.check_restock(index, add)?;
        self.set_limited(index as usize, quantity)
    }

    /// The quantity after a restock, or why it cannot be applied.
    pub fn check_restock(&self, index: u32, add: u64) -> Result<u64, PoolError> {
        let item = self.limited(index)?;
        let quantity = item.quantity.expect("limited");
        let stocked = item.stocked.expect("limited");
        match (quantity.checked_add(add), stocked.checked_add(add)) {
            (Some(q), Some(s)) if s <= QUANTITY_MAX => Ok(q),
            _ => Err(PoolError::Invalid(format!(
                "item {:?}: stocked {stocked} + {add} would exceed {QUANTITY_MAX} (2^40)",
                item.id
            ))),
        }
    }

    /// Admin `set_quantity`: the limited item `index` has exactly `quantity` left; `stocked`
    /// becomes `quantity + issued` (so `stocked` moves by the change).
    pub fn set_quantity(&mut self, index: u32, quantity: u64) -> Result<(), PoolError> {
        self.check_set_quantity(index, quantity)?;
        self.set_limited(index as usize, quantity)
    }

    pub fn check_set_quantity(&self, index: u32, quantity: u64) -> Result<(), PoolError> {
        let item = self.limited(index)?;
        match quantity.checked_add(item.issued) {
            Some(stocked) if stocked <= QUANTITY_MAX => Ok(()),
            _ => Err(PoolError::Invalid(format!(
                "item {:?}: quantity {quantity} + issued {} would exceed {QUANTITY_MAX} (2^40)",
                item.id, item.issued
            ))),
        }
    }

    /// Admin `set_weight` (by_weight pools only).
    pub fn set_weight(&mut self, index: u32, weight: u64) -> Result<(), PoolError> {
        self.check_set_weight(index, weight)?;
        let position = index as usize;
        let before = draw_weight(self.mode, &self.items[position]);
        let mut probe = self.items[position].clone();
        probe.weight = Some(weight);
        self.check_tree_room(before, draw_weight(self.mode, &probe))?;
        self.items[position].weight = Some(weight);
        self.move_tree(position, before);
        Ok(())
    }

    pub fn check_set_weight(&self, index: u32, weight: u64) -> Result<(), PoolError> {
        let item = self.item(index)?;
        if self.mode != Mode::ByWeight {
            return Err(PoolError::Invalid(format!(
                "pool {:?} is by_quantity: its items have no weight",
                self.id
            )));
        }
        if weight == 0 || weight > WEIGHT_MAX {
            return Err(PoolError::Invalid(format!(
                "item {:?}: weight must be between 1 and {WEIGHT_MAX} (2^32), got {weight}",
                item.id
            )));
        }
        Ok(())
    }

    /// Admin `add_item`: a new item, last in the pool (its index is the old length). The tree
    /// is rebuilt (O(n)): commands are rare, draws are not slowed.
    pub fn add_item(&mut self, item: &crate::seed::SeedItem) -> Result<u32, PoolError> {
        self.check_add_item(item)?;
        let mut items = std::mem::take(&mut self.items);
        items.push(Item {
            id: item.id.clone(),
            quantity: item.stock.quantity(),
            weight: item.weight,
            stocked: item.stock.quantity(),
            issued: 0,
        });
        let index = items.len() as u32 - 1;
        *self = Pool::from_items(&self.id, self.mode, items)?;
        Ok(index)
    }

    pub fn check_add_item(&self, item: &crate::seed::SeedItem) -> Result<(), PoolError> {
        crate::seed::check_item(self.mode, item)
            .map_err(|e| PoolError::Invalid(format!("item {:?}: {e}", item.id)))?;
        if self.items.len() >= POOL_ITEMS_MAX {
            return Err(PoolError::Invalid(format!(
                "pool {:?} already has {POOL_ITEMS_MAX} items",
                self.id
            )));
        }
        if self.items.iter().any(|i| i.id == item.id) {
            return Err(PoolError::Invalid(format!(
                "pool {:?} already has an item {:?}",
                self.id, item.id
            )));
        }
        Ok(())
    }

    fn item(&self, index: u32) -> Result<&Item, PoolError> {
        self.items
            .get(index as usize)
            .ok_or_else(|| PoolError::UnknownItem {
                pool: self.id.clone(),
                index,
            })
    }

    fn limited(&self, index: u32) -> Result<&Item, PoolError> {
        let item = self.item(index)?;
        if item.quantity.is_none() {
            return Err(PoolError::Invalid(format!(
                "item {:?} is unlimited: it has no quantity to change",
                item.id
            )));
        }
        Ok(item)
    }

    /// Sets a limited item's quantity, `stocked = quantity + issued`, the unit totals and the
    /// tree; asserts the item's accounting and the pool's conservation (release builds too:
    /// commands are rare).
    fn set_limited(&mut self, position: usize, quantity: u64) -> Result<(), PoolError> {
        let before = draw_weight(self.mode, &self.items[position]);
        let item = &self.items[position];
        let (old_quantity, old_initial) = (
            item.quantity.expect("limited"),
            item.stocked.expect("limited"),
        );
        let initial = quantity
            .checked_add(item.issued)
            .filter(|s| *s <= QUANTITY_MAX)
            .ok_or_else(|| PoolError::Invalid(format!("item {:?}: stocked above 2^40", item.id)))?;
        let mut probe = item.clone();
        probe.quantity = Some(quantity);
        self.check_tree_room(before, draw_weight(self.mode, &probe))?;
        let item = &mut self.items[position];
        item.quantity = Some(quantity);
        item.stocked = Some(initial);
        assert_eq!(
            item.stocked,
            Some(quantity + item.issued),
            "stocked = quantity + issued"
        );
        self.units_left = self.units_left - old_quantity + quantity;
        self.units_stocked = self.units_stocked - old_initial + initial;
        self.move_tree(position, before);
        self.assert_conserved();
        Ok(())
    }

    /// The tree's total stays within u64 when one weight goes from `before` to `after`.
    fn check_tree_room(&self, before: u64, after: u64) -> Result<(), PoolError> {
        match (self.tree.total() - before).checked_add(after) {
            Some(_) => Ok(()),
            None => Err(PoolError::Invalid(format!(
                "pool {:?}: sum of weights would overflow u64",
                self.id
            ))),
        }
    }

    /// Moves the tree by the change of item `position`'s draw weight from `before`.
    fn move_tree(&mut self, position: usize, before: u64) {
        let after = draw_weight(self.mode, &self.items[position]);
        // Weights are <= 2^40 (quantities) or 2^32 (weights): the difference fits i64.
        self.tree.add(position, after as i64 - before as i64);
        assert_eq!(self.tree.weight(position), after, "tree follows the item");
        #[cfg(debug_assertions)]
        self.check_invariants();
    }

    /// Conservation over the pool's limited items: every unit put in is left or issued.
    /// O(1): the engine asserts it after every batch, in release builds too.
    pub fn assert_conserved(&self) {
        assert_eq!(
            self.units_stocked,
            self.units_left + self.units_issued,
            "pool {}: conservation broken (stocked = left + issued)",
            self.id
        );
    }

    /// Recomputes every item's weight and the total from the items and
    /// compares them with the tree, and rechecks every item invariant.
    /// O(n log n): for construction, tests and debugging, not per draw.
    #[cfg(any(test, debug_assertions))]
    pub fn check_invariants(&self) {
        assert_eq!(self.tree.len(), self.items.len(), "pool {}", self.id);
        let mut total: u64 = 0;
        for (index, item) in self.items.iter().enumerate() {
            if let Err(reason) = check_item(self.mode, item) {
                panic!("pool {} item {}: {reason}", self.id, item.id);
            }
            let weight = draw_weight(self.mode, item);
            assert_eq!(
                self.tree.weight(index),
                weight,
                "pool {} item {}: tree weight differs from item",
                self.id,
                item.id
            );
            total = total.checked_add(weight).expect("weights overflow u64");
        }
        assert_eq!(self.tree.total(), total, "pool {}: tree total", self.id);
        let limited = self.items.iter().filter(|item| item.quantity.is_some());
        let left: u64 = limited.clone().filter_map(|item| item.quantity).sum();
        let issued: u64 = limited.map(|item| item.issued).sum();
        assert_eq!(
            (self.units_left, self.units_issued),
            (left, issued),
            "pool {}",
            self.id
        );
        self.assert_conserved();
        assert_eq!(self.tree.prefix(self.items.len()), total);
    }
}

/// The weight with which `item` takes part in the next draw: its quantity in
/// a by_quantity pool; its weight in a by_weight pool unless a limited
/// quantity has run out. 0 means "cannot be drawn".
#[inline]
fn draw_weight(mode: Mode, item: &Item) -> u64 {
    match mode {
        Mode::ByQuantity => item.quantity.unwrap_or(0),
        Mode::ByWeight => match item.quantity {
            Some(0) => 0,
            _ => item.weight.unwrap_or(0),
        },
    }
}

/// Checks one item against the pool invariants.
fn check_item(mode: Mode, item: &Item) -> Result<(), String> {
    match mode {
        Mode::ByQuantity => {
            if item.quantity.is_none() {
                return Err("by_quantity items must have a quantity".to_string());
            }
            if item.weight.is_some() {
                return Err("by_quantity items have no weight".to_string());
            }
        }
        Mode::ByWeight => match item.weight {
            None => return Err("by_weight items must have a weight".to_string()),
            Some(0) => return Err("weight must be >= 1".to_string()),
            Some(weight) if weight > WEIGHT_MAX => {
                return Err(format!("weight {weight} > {WEIGHT_MAX}"));
            }
            Some(_) => {}
        },
    }
    match (item.quantity, item.stocked) {
        (Some(quantity), Some(initial)) => {
            if initial > QUANTITY_MAX {
                return Err(format!("stocked {initial} > {QUANTITY_MAX}"));
            }
            if quantity.checked_add(item.issued) != Some(initial) {
                return Err(format!(
                    "stocked {initial} != quantity {quantity} + issued {}",
                    item.issued
                ));
            }
        }
        (Some(_), None) => return Err("limited item without stocked".to_string()),
        (None, Some(_)) => return Err("unlimited item with a stocked".to_string()),
        (None, None) => {}
    }
    Ok(())
}

/// Uniform integer in `0..range` (`range > 0`), exactly unbiased: Lemire's
/// multiply-and-reject ("Fast Random Integer Generation in an Interval",
/// 2019). The high word of `x * range` is the candidate; it is rejected only
/// when the low word falls in the `2^64 mod range` values that would bias it,
/// and the modulo is computed only when a rejection is possible.
#[inline]
fn uniform_below(rng: &mut DrawRng, range: u64) -> u64 {
    debug_assert!(range > 0);
    let mut product = u128::from(rng.next_u64()) * u128::from(range);
    let mut low = product as u64;
    if low < range {
        let threshold = range.wrapping_neg() % range; // 2^64 mod range
        while low < threshold {
            product = u128::from(rng.next_u64()) * u128::from(range);
            low = product as u64;
        }
    }
    (product >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn quantity_pool(quantities: &[u64]) -> Pool {
        let items: Vec<_> = quantities
            .iter()
            .enumerate()
            .map(|(i, &q)| (format!("item{i}"), Some(q), None))
            .collect();
        Pool::seed(&PoolSeed::from_parts("pq", Mode::ByQuantity, &items)).unwrap()
    }

    fn item(id: &str, quantity: Option<u64>, weight: Option<u64>, issued: u64) -> Item {
        Item {
            id: id.to_string(),
            quantity,
            weight,
            stocked: quantity.map(|q| q + issued),
            issued,
        }
    }

    #[test]
    fn seed_sets_initial_and_issued() {
        let pool = quantity_pool(&[3, 0, 5]);
        assert_eq!(pool.id(), "pq");
        assert_eq!(pool.mode(), Mode::ByQuantity);
        assert_eq!(pool.in_stock_weight(), 8);
        for item in pool.items() {
            assert_eq!(item.stocked, item.quantity);
            assert_eq!(item.issued, 0);
        }
    }

    #[test]
    fn by_quantity_exhaustion() {
        let initial = [5u64, 1, 0, 17, 9];
        let mut pool = quantity_pool(&initial);
        let mut rng = DrawRng::seed_from_u64(1);
        let mut counts = [0u64; 5];
        for _ in 0..initial.iter().sum::<u64>() {
            let index = pool.draw_one(&mut rng).expect("stock left");
            counts[index as usize] += 1;
            pool.check_invariants();
        }
        assert_eq!(counts, initial);
        assert_eq!(pool.in_stock_weight(), 0);
        assert_eq!(pool.draw_one(&mut rng), None);
        assert_eq!(pool.draw_one(&mut rng), None);
        for (item, &q) in pool.items().iter().zip(&initial) {
            assert_eq!(item.quantity, Some(0));
            assert_eq!(item.issued, q);
        }
    }

    #[test]
    fn by_weight_limited_item_runs_out_unlimited_never() {
        let items = vec![
            ("rare".to_string(), Some(3), Some(1000)),
            ("common".to_string(), None, Some(1)),
        ];
        let mut pool = Pool::seed(&PoolSeed::from_parts("pw", Mode::ByWeight, &items)).unwrap();
        let mut rng = DrawRng::seed_from_u64(7);
        let mut rare_draws = 0;
        let mut out = Vec::new();
        assert_eq!(pool.draw(20_000, &mut rng, &mut out), 20_000);
        for (n, &index) in out.iter().enumerate() {
            if index == 0 {
                rare_draws += 1;
                // With weight 1000 vs 1, the 3 rare units go almost at once.
                assert!(n < 100, "rare drawn late at {n}");
            }
        }
        assert_eq!(rare_draws, 3);
        assert_eq!(pool.items()[0].quantity, Some(0));
        assert_eq!(pool.items()[0].issued, 3);
        assert_eq!(pool.items()[1].quantity, None);
        assert_eq!(pool.items()[1].issued, 19_997);
        assert_eq!(pool.in_stock_weight(), 1);
        pool.check_invariants();
    }

    #[test]
    fn by_weight_all_limited_runs_dry() {
        let items = vec![
            ("a".to_string(), Some(2), Some(5)),
            ("b".to_string(), Some(1), Some(1)),
        ];
        let mut pool = Pool::seed(&PoolSeed::from_parts("pw", Mode::ByWeight, &items)).unwrap();
        let mut rng = DrawRng::seed_from_u64(3);
        let mut out = Vec::new();
        assert_eq!(pool.draw(10, &mut rng, &mut out), 3);
        out.sort_unstable();
        assert_eq!(out, vec![0, 0, 1]);
        assert_eq!(pool.draw_one(&mut rng), None);
    }

    #[test]
    fn multi_draw_is_short_only_at_exhaustion() {
        let mut pool = quantity_pool(&[4, 6]);
        let mut rng = DrawRng::seed_from_u64(11);
        let mut out = Vec::new();
        assert_eq!(pool.draw(3, &mut rng, &mut out), 3);
        assert_eq!(pool.draw(0, &mut rng, &mut out), 0);
        assert_eq!(pool.draw(7, &mut rng, &mut out), 7);
        assert_eq!(out.len(), 10);
        assert_eq!(pool.draw(5, &mut rng, &mut out), 0);
        assert_eq!(out.len(), 10);

        let mut pool = quantity_pool(&[4, 6]);
        let mut out = Vec::new();
        assert_eq!(pool.draw(25, &mut rng, &mut out), 10);
        assert_eq!(out.iter().filter(|&&i| i == 0).count(), 4);
        assert_eq!(out.iter().filter(|&&i| i == 1).count(), 6);
    }

    #[test]
    fn empty_pool_draws_nothing() {
        let mut pool = Pool::seed(&PoolSeed::from_parts("empty", Mode::ByWeight, &[])).unwrap();
        let mut rng = DrawRng::seed_from_u64(0);
        assert_eq!(pool.draw_one(&mut rng), None);
        let mut out = Vec::new();
        assert_eq!(pool.draw(3, &mut rng, &mut out), 0);
    }

    #[test]
    fn apply_issue_matches_draw_and_errors() {
        let items = vec![
            ("one".to_string(), Some(1), Some(2)),
            ("free".to_string(), None, Some(3)),
        ];
        let mut pool = Pool::seed(&PoolSeed::from_parts("pw", Mode::ByWeight, &items)).unwrap();
        assert_eq!(pool.in_stock_weight(), 5);
        pool.apply_issue(0).unwrap();
        assert_eq!(pool.in_stock_weight(), 3);
        assert_eq!(pool.items()[0].quantity, Some(0));
        assert_eq!(pool.items()[0].issued, 1);
        assert_eq!(
            pool.apply_issue(0),
            Err(PoolError::OutOfStock {
                pool: "pw".to_string(),
                item: "one".to_string()
            })
        );
        assert_eq!(
            pool.apply_issue(2),
            Err(PoolError::UnknownItem {
                pool: "pw".to_string(),
                index: 2
            })
        );
        assert!(matches!(
            pool.apply_issue(u32::MAX),
            Err(PoolError::UnknownItem { .. })
        ));
        pool.apply_issue(1).unwrap();
        pool.apply_issue(1).unwrap();
        assert_eq!(pool.items()[1].issued, 2);
        assert_eq!(pool.items()[1].quantity, None);
        pool.check_invariants();

        let mut pool = quantity_pool(&[0, 2]);
        assert!(matches!(
            pool.apply_issue(0),
            Err(PoolError::OutOfStock { .. })
        ));
        pool.apply_issue(1).unwrap();
        assert_eq!(pool.in_stock_weight(), 1);
        // Errors leave the pool unchanged.
        assert!(pool.apply_issue(0).is_err());
        assert_eq!(pool.items()[0].issued, 0);
        pool.check_invariants();
    }

    #[test]
    fn replay_reproduces_draws() {
        let items: Vec<_> = (0..50)
            .map(|i| (format!("i{i}"), Some(i % 4), Some(1 + i % 7)))
            .collect();
        let mut live = Pool::seed(&PoolSeed::from_parts("p", Mode::ByWeight, &items)).unwrap();
        let mut replayed = live.clone();
        let mut rng = DrawRng::seed_from_u64(42);
        let mut out = Vec::new();
        live.draw(60, &mut rng, &mut out);
        for &index in &out {
            replayed.apply_issue(index).unwrap();
        }
        assert_eq!(live.items(), replayed.items());
        assert_eq!(live.in_stock_weight(), replayed.in_stock_weight());
        let restored = Pool::from_items("p", Mode::ByWeight, live.items().to_vec()).unwrap();
        assert_eq!(restored.in_stock_weight(), live.in_stock_weight());
    }

    #[test]
    fn same_seed_same_draws() {
        let mut a = quantity_pool(&[10, 20, 30]);
        let mut b = a.clone();
        let (mut out_a, mut out_b) = (Vec::new(), Vec::new());
        a.draw(40, &mut DrawRng::seed_from_u64(5), &mut out_a);
        b.draw(40, &mut DrawRng::seed_from_u64(5), &mut out_b);
        assert_eq!(out_a, out_b);
    }

    #[test]
    fn from_items_rejects_broken_invariants() {
        let invalid = |mode, items| {
            matches!(
                Pool::from_items("p", mode, items),
                Err(PoolError::Invalid(_))
            )
        };
        // initial != quantity + issued
        let mut bad = item("a", Some(3), None, 1);
        bad.stocked = Some(5);
        assert!(invalid(Mode::ByQuantity, vec![bad]));
        let mut bad = item("a", Some(3), Some(2), 0);
        bad.issued = 1;
        assert!(invalid(Mode::ByWeight, vec![bad]));
        // unlimited item in by_quantity
        assert!(invalid(Mode::ByQuantity, vec![item("a", None, None, 4)]));
        // weight missing or 0 in by_weight
        assert!(invalid(Mode::ByWeight, vec![item("a", Some(1), None, 0)]));
        assert!(invalid(Mode::ByWeight, vec![item("a", None, Some(0), 0)]));
        // weight in by_quantity
        assert!(invalid(
            Mode::ByQuantity,
            vec![item("a", Some(1), Some(1), 0)]
        ));
        // limited without initial, unlimited with initial
        let mut bad = item("a", Some(1), Some(1), 0);
        bad.stocked = None;
        assert!(invalid(Mode::ByWeight, vec![bad]));
        let mut bad = item("a", None, Some(1), 0);
        bad.stocked = Some(1);
        assert!(invalid(Mode::ByWeight, vec![bad]));
        // bounds and duplicates
        assert!(invalid(
            Mode::ByWeight,
            vec![item("a", None, Some(WEIGHT_MAX + 1), 0)]
        ));
        assert!(invalid(
            Mode::ByQuantity,
            vec![item("a", Some(QUANTITY_MAX + 1), None, 0)]
        ));
        assert!(invalid(
            Mode::ByQuantity,
            vec![item("a", Some(1), None, 0), item("a", Some(2), None, 0)]
        ));
        // seed goes through the same checks
        assert!(matches!(
            Pool::seed(&PoolSeed::from_parts(
                "p",
                Mode::ByQuantity,
                &[("a".to_string(), None, None)]
            )),
            Err(PoolError::Invalid(_))
        ));
        // and accepts valid snapshots, including partly issued ones
        let pool = Pool::from_items(
            "p",
            Mode::ByWeight,
            vec![item("a", Some(0), Some(4), 2), item("b", None, Some(6), 9)],
        )
        .unwrap();
        assert_eq!(pool.in_stock_weight(), 6);
    }

    #[test]
    fn error_messages_name_the_pool() {
        let err = PoolError::OutOfStock {
            pool: "p1".to_string(),
            item: "car".to_string(),
        };
        assert_eq!(
            err.to_string(),
            "item \"car\" of pool \"p1\" is out of stock"
        );
        let err = PoolError::UnknownItem {
            pool: "p1".to_string(),
            index: 9,
        };
        assert_eq!(err.to_string(), "pool \"p1\" has no item with index 9");
    }

    #[test]
    fn serde_round_trip_and_snake_case_mode() {
        assert_eq!(
            serde_json::to_string(&Mode::ByQuantity).unwrap(),
            "\"by_quantity\""
        );
        let mode: Mode = serde_json::from_str("\"by_weight\"").unwrap();
        assert_eq!(mode, Mode::ByWeight);
        let item = item("car", Some(3), Some(1), 2);
        let json = serde_json::to_string(&item).unwrap();
        assert_eq!(serde_json::from_str::<Item>(&json).unwrap(), item);
    }

    #[test]
    fn uniform_below_covers_range_including_huge_ones() {
        let mut rng = DrawRng::seed_from_u64(9);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let x = uniform_below(&mut rng, 7);
            assert!(x < 7);
            seen[x as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(uniform_below(&mut rng, 1), 0);
        for _ in 0..1000 {
            let range = (1u64 << 63) + 12345;
            assert!(uniform_below(&mut rng, range) < range);
            assert!(uniform_below(&mut rng, u64::MAX) < u64::MAX);
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Draw(u32),
        Apply(u32),
    }

    fn pool_strategy() -> impl Strategy<Value = Pool> {
        let quantity_items = proptest::collection::vec(0u64..6, 0..12).prop_map(|qs| {
            let items: Vec<_> = qs
                .iter()
                .enumerate()
                .map(|(i, &q)| (format!("q{i}"), Some(q), None))
                .collect();
            Pool::seed(&PoolSeed::from_parts("pq", Mode::ByQuantity, &items)).unwrap()
        });
        let weight_items =
            proptest::collection::vec((proptest::option::weighted(0.8, 0u64..6), 1u64..20), 0..12)
                .prop_map(|spec| {
                    let items: Vec<_> = spec
                        .iter()
                        .enumerate()
                        .map(|(i, &(q, w))| (format!("w{i}"), q, Some(w)))
                        .collect();
                    Pool::seed(&PoolSeed::from_parts("pw", Mode::ByWeight, &items)).unwrap()
                });
        prop_oneof![quantity_items, weight_items]
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![(0u32..4).prop_map(Op::Draw), (0u32..14).prop_map(Op::Apply)]
    }

    proptest! {
        #[test]
        fn any_ops_keep_invariants(
            mut pool in pool_strategy(),
            ops in proptest::collection::vec(op_strategy(), 0..60),
            seed in any::<u64>(),
        ) {
            let mut rng = DrawRng::seed_from_u64(seed);
            let mut out = Vec::new();
            for op in ops {
                let before = pool.items().to_vec();
                let weight_before = pool.in_stock_weight();
                match op {
                    Op::Draw(count) => {
                        out.clear();
                        let drawn = pool.draw(count, &mut rng, &mut out);
                        prop_assert_eq!(drawn as usize, out.len());
                        prop_assert!(drawn == count || pool.in_stock_weight() == 0);
                        for &index in &out {
                            prop_assert!((index as usize) < pool.items().len());
                        }
                    }
                    Op::Apply(index) => {
                        let in_stock = before
                            .get(index as usize)
                            .is_some_and(|item| item.quantity != Some(0));
                        let result = pool.apply_issue(index);
                        prop_assert_eq!(result.is_ok(), in_stock);
                        if result.is_err() {
                            prop_assert_eq!(pool.items(), &before[..]);
                            prop_assert_eq!(pool.in_stock_weight(), weight_before);
                        }
                    }
                }
                for (item, old) in pool.items().iter().zip(&before) {
                    // Quantities only go down, one issue at a time, never below 0
                    // (an underflow would wrap to a huge number or panic).
                    if let (Some(q), Some(q_old)) = (item.quantity, old.quantity) {
                        prop_assert!(q <= q_old);
                        prop_assert_eq!(q_old - q, item.issued - old.issued);
                    }
                    prop_assert_eq!(item.quantity.is_none(), old.quantity.is_none());
                    if let Some(initial) = item.stocked {
                        prop_assert_eq!(initial, item.quantity.unwrap() + item.issued);
                    }
                }
                pool.check_invariants();
            }
        }
    }
}
