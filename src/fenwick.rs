//! Fenwick (binary indexed) tree over `u64` weights, used to pick an item of a
//! prize pool with probability proportional to its weight.
//!
//! Why a Fenwick tree: a draw needs "which item owns the point `target` of the
//! cumulative weight line", and a draw changes one item's weight (a unit is
//! issued, or a limited item runs out). A flat prefix-sum array gives an
//! O(log n) search but an O(n) update; a linear scan gives an O(1) update but an
//! O(n) search. The Fenwick tree does both in O(log n) with one flat
//! `Vec<u64>` and no pointers, so a 1,000,000-item pool draws nearly as fast
//! as a 10-item one (about 20 steps instead of 4).
//!
//! Layout: the classic 1-based array, `tree[j]` holds the sum of the weights at
//! positions `(j - lowbit(j), j]`. The capacity is rounded up to a power of two
//! (the extra positions weigh 0) so that the search descent never has to test
//! whether it stepped past the end: it needs only one comparison per level.
//! The search descends from the highest power of two instead of binary
//! searching over `prefix()`, which would cost O(log² n).

/// Fenwick tree over `u64` weights of `len()` items, with the running total.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fenwick {
    /// 1-based: `tree[0]` is unused, `tree.len() == capacity + 1`.
    tree: Vec<u64>,
    /// Number of real items; positions `len..capacity` have weight 0.
    len: usize,
    /// Half the capacity (a power of two, 0 when the capacity is 1): the
    /// first step of the `find` descent.
    first_step: usize,
    /// Sum of all weights, kept so `total()` is O(1).
    total: u64,
}

impl Fenwick {
    /// Builds the tree in O(n). Panics only if the weights sum past `u64::MAX`
    /// (callers bound the weights so that it cannot happen).
    pub fn from_weights(weights: &[u64]) -> Fenwick {
        let len = weights.len();
        let capacity = len.max(1).next_power_of_two();
        let mut tree = vec![0u64; capacity + 1];
        tree[1..=len].copy_from_slice(weights);
        // Each node pushes its (complete) sum to its parent once: O(n).
        for j in 1..=capacity {
            let parent = j + lowbit(j);
            if parent <= capacity {
                tree[parent] = tree[parent]
                    .checked_add(tree[j])
                    .expect("fenwick: sum of weights overflows u64");
            }
        }
        let total = tree[capacity];
        Fenwick {
            tree,
            len,
            first_step: capacity / 2,
            total,
        }
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the tree has no items.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sum of all weights. O(1).
    #[inline]
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Adds `delta` (which may be negative) to the weight of item `index`.
    /// O(log n). An index out of range is ignored (debug builds assert).
    /// The resulting weight must stay within `0..=u64::MAX`: callers only
    /// remove weight that they added, which debug builds assert.
    #[inline]
    pub fn add(&mut self, index: usize, delta: i64) {
        debug_assert!(index < self.len, "fenwick: index {index} >= {}", self.len);
        if index >= self.len {
            return;
        }
        debug_assert!(
            self.total.checked_add_signed(delta).is_some(),
            "fenwick: total {} + {delta} out of range",
            self.total
        );
        self.total = self.total.wrapping_add_signed(delta);
        let capacity = self.tree.len() - 1;
        let mut j = index + 1;
        while j <= capacity {
            debug_assert!(self.tree[j].checked_add_signed(delta).is_some());
            self.tree[j] = self.tree[j].wrapping_add_signed(delta);
            j += lowbit(j);
        }
    }

    /// Sets the weight of item `index` to `weight`. O(log n).
    pub fn set(&mut self, index: usize, weight: u64) {
        let old = self.weight(index);
        if weight >= old {
            self.add_unsigned(index, weight - old, true);
        } else {
            self.add_unsigned(index, old - weight, false);
        }
    }

    /// `add` for a magnitude that may not fit `i64`.
    fn add_unsigned(&mut self, index: usize, magnitude: u64, grow: bool) {
        if index >= self.len {
            return;
        }
        let capacity = self.tree.len() - 1;
        let step = |x: u64| {
            if grow {
                x.wrapping_add(magnitude)
            } else {
                x.wrapping_sub(magnitude)
            }
        };
        self.total = step(self.total);
        let mut j = index + 1;
        while j <= capacity {
            self.tree[j] = step(self.tree[j]);
            j += lowbit(j);
        }
    }

    /// Weight of item `index` (0 when out of range), recomputed from the tree
    /// in O(log n), so it is an independent view of what `find` will see.
    pub fn weight(&self, index: usize) -> u64 {
        if index >= self.len {
            return 0;
        }
        let node = index + 1;
        let mut weight = self.tree[node];
        // tree[node] covers (node - lowbit(node), node]; subtract the sums of
        // (node - lowbit(node), node - 1] that its children hold.
        let stop = node - lowbit(node);
        let mut j = node - 1;
        while j > stop {
            weight = weight.wrapping_sub(self.tree[j]);
            j -= lowbit(j);
        }
        weight
    }

    /// Sum of the weights of items `0..end` (`end` is clamped to `len()`).
    /// O(log n).
    pub fn prefix(&self, end: usize) -> u64 {
        let mut j = end.min(self.len);
        let mut sum = 0u64;
        while j > 0 {
            sum = sum.wrapping_add(self.tree[j]);
            j -= lowbit(j);
        }
        sum
    }

    /// The index `i` with `prefix(i) <= target < prefix(i + 1)`: the item
    /// that owns the point `target` of the cumulative weight line. Items of
    /// weight 0 own no point and are never returned. Returns `len()` when
    /// `target >= total()`. O(log n): one descent from the highest power of
    /// two, one comparison per level.
    #[inline]
    pub fn find(&self, target: u64) -> usize {
        if target >= self.total {
            return self.len;
        }
        let tree = self.tree.as_slice();
        let mut position = 0usize; // items 0..position lie wholly below target
        let mut remaining = target; // target - prefix(position)
        let mut step = self.first_step;
        while step > 0 {
            // position + step <= capacity always holds: position is a sum of
            // distinct larger powers of two below capacity.
            let sum = tree[position + step];
            if sum <= remaining {
                position += step;
                remaining -= sum;
            }
            step >>= 1;
        }
        // target < total, and padding positions weigh 0, so position < len.
        debug_assert!(position < self.len);
        position
    }
}

/// Lowest set bit of `j`: the length of the range that node `j` covers.
#[inline]
fn lowbit(j: usize) -> usize {
    j & j.wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference answer: linear scan over the weights.
    fn find_linear(weights: &[u64], target: u64) -> usize {
        let mut sum = 0u64;
        for (i, &w) in weights.iter().enumerate() {
            sum += w;
            if target < sum {
                return i;
            }
        }
        weights.len()
    }

    fn assert_matches(tree: &Fenwick, weights: &[u64]) {
        assert_eq!(tree.len(), weights.len());
        assert_eq!(tree.total(), weights.iter().sum::<u64>());
        for (i, &w) in weights.iter().enumerate() {
            assert_eq!(tree.weight(i), w, "weight({i})");
            assert_eq!(tree.prefix(i), weights[..i].iter().sum::<u64>());
        }
    }

    #[test]
    fn empty_tree() {
        let tree = Fenwick::from_weights(&[]);
        assert!(tree.is_empty());
        assert_eq!(tree.total(), 0);
        assert_eq!(tree.find(0), 0);
        assert_eq!(tree.weight(0), 0);
    }

    #[test]
    fn single_item() {
        let tree = Fenwick::from_weights(&[5]);
        assert_eq!(tree.total(), 5);
        for target in 0..5 {
            assert_eq!(tree.find(target), 0);
        }
        assert_eq!(tree.find(5), 1);
    }

    #[test]
    fn find_skips_zero_weights_and_respects_boundaries() {
        let weights = [0, 3, 0, 0, 1, 2, 0];
        let tree = Fenwick::from_weights(&weights);
        let found: Vec<usize> = (0..7).map(|t| tree.find(t)).collect();
        assert_eq!(found, vec![1, 1, 1, 4, 5, 5, 7]);
    }

    #[test]
    fn add_and_set_keep_tree_consistent() {
        let mut weights = vec![4u64, 0, 7, 1, 1, 9, 2, 3, 8];
        let mut tree = Fenwick::from_weights(&weights);
        assert_matches(&tree, &weights);
        tree.add(2, -7);
        weights[2] = 0;
        assert_matches(&tree, &weights);
        tree.set(1, 11);
        weights[1] = 11;
        assert_matches(&tree, &weights);
        tree.set(8, 0);
        weights[8] = 0;
        assert_matches(&tree, &weights);
        tree.set(0, u64::from(u32::MAX) << 8);
        weights[0] = u64::from(u32::MAX) << 8;
        assert_matches(&tree, &weights);
    }

    #[test]
    fn power_of_two_and_odd_sizes() {
        for len in [1usize, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 1000, 1024, 1025] {
            let weights: Vec<u64> = (0..len as u64).map(|i| i % 3).collect();
            let tree = Fenwick::from_weights(&weights);
            assert_matches(&tree, &weights);
            for target in 0..=tree.total() {
                assert_eq!(tree.find(target), find_linear(&weights, target));
            }
        }
    }

    proptest! {
        #[test]
        fn find_agrees_with_linear_scan(
            weights in proptest::collection::vec(0u64..50, 0..80),
            targets in proptest::collection::vec(any::<u64>(), 1..40),
        ) {
            let tree = Fenwick::from_weights(&weights);
            let total = weights.iter().sum::<u64>();
            prop_assert_eq!(tree.total(), total);
            for t in targets {
                // Half the targets in range, the rest anywhere.
                let t = if total > 0 && t % 2 == 0 { t % total } else { t };
                prop_assert_eq!(tree.find(t), find_linear(&weights, t));
            }
        }

        #[test]
        fn updates_agree_with_plain_array(
            weights in proptest::collection::vec(0u64..1000, 1..60),
            updates in proptest::collection::vec((any::<usize>(), 0u64..1000), 0..60),
        ) {
            let mut weights = weights;
            let mut tree = Fenwick::from_weights(&weights);
            for (i, w) in updates {
                let i = i % weights.len();
                if w % 2 == 0 {
                    tree.set(i, w);
                } else {
                    tree.add(i, w as i64 - weights[i] as i64);
                }
                weights[i] = w;
                prop_assert_eq!(tree.weight(i), w);
            }
            assert_matches(&tree, &weights);
            for t in 0..=tree.total() {
                prop_assert_eq!(tree.find(t), find_linear(&weights, t));
            }
        }
    }
}
