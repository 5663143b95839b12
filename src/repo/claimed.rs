//! The set of blobs a backup has claimed since it started: one entry per new
//! blob, so it grows with the data, and it must cost as little per id as the
//! index it sits beside.
//!
//! A hash set of 32-byte ids keeps its table at most 7/8 full and doubles it,
//! and every slot of the table is touched: 66 bytes an id just after it
//! doubled (at 1,048,576 ids: 2^21 slots of 33 bytes), 132 MiB at 2,000,000.
//! This set keeps the newest ids in a small hash set and merges them into one
//! table sorted by id whenever that fills: 32 bytes an id plus a constant,
//! growing linearly. Merging is in place from the back, so the table is
//! never held twice (glibc grows a large block by remapping it, not by
//! copying).

use crate::format::ids::{BlobId, IdSet};

/// How many ids the hash set holds before they are merged into the sorted
/// table: about 4 MiB of hash table; at 2,000,000 ids, 30 merges that move
/// about 1 GB of ids in all (arithmetic, not measured apart: the whole first
/// backup of 2,000,000 files is in BENCHMARKS.md).
const RECENT_MAX: usize = 1 << 16;

#[derive(Default)]
pub struct ClaimedSet {
    /// Merged ids, sorted, each once.
    sorted: Vec<BlobId>,
    /// Ids since the last merge, none of them in `sorted`.
    recent: IdSet<BlobId>,
}

impl ClaimedSet {
    pub fn contains(&self, id: &BlobId) -> bool {
        self.recent.contains(id) || self.sorted.binary_search(id).is_ok()
    }

    /// Adds `id`; false if it was there already.
    pub fn insert(&mut self, id: BlobId) -> bool {
        if self.sorted.binary_search(&id).is_ok() || !self.recent.insert(id) {
            return false;
        }
        if self.recent.len() >= RECENT_MAX {
            self.merge();
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sorted.len() + self.recent.len()
    }

    /// Moves the recent ids into the sorted table: the table grows by
    /// exactly their number and both runs are merged from the back, where the
    /// new room is, so no id is overwritten before it is moved.
    fn merge(&mut self) {
        let mut recent: Vec<BlobId> = self.recent.drain().collect();
        recent.sort_unstable();
        let old = self.sorted.len();
        self.sorted.reserve_exact(recent.len());
        self.sorted.resize(old + recent.len(), BlobId([0; 32]));
        let (mut i, mut j) = (old, recent.len());
        let mut k = old + recent.len();
        while j > 0 {
            k -= 1;
            if i > 0 && self.sorted[i - 1] > recent[j - 1] {
                self.sorted[k] = self.sorted[i - 1];
                i -= 1;
            } else {
                self.sorted[k] = recent[j - 1];
                j -= 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn id(n: u32) -> BlobId {
        let mut b = [0u8; 32];
        // Spread over the first bytes too, so the sort order is not the
        // insertion order.
        b[..4].copy_from_slice(&n.wrapping_mul(2_654_435_761).to_be_bytes());
        b[28..].copy_from_slice(&n.to_be_bytes());
        BlobId(b)
    }

    #[test]
    fn ids_stay_members_across_merges() {
        let mut set = ClaimedSet::default();
        let n = 3 * RECENT_MAX as u32 + 17;
        for i in 0..n {
            assert!(set.insert(id(i)), "{i} is new");
        }
        assert_eq!(set.len(), n as usize);
        assert_eq!(set.recent.len(), 17, "three merges happened");
        assert!(set.sorted.windows(2).all(|w| w[0] < w[1]));
        for i in 0..n {
            assert!(set.contains(&id(i)), "{i} is a member");
            assert!(!set.insert(id(i)), "{i} is not new again");
        }
        assert!(!set.contains(&id(n)));
        assert_eq!(set.len(), n as usize);
    }

    proptest! {
        /// Against a model, with merges forced often by a small table.
        #[test]
        fn behaves_as_a_set(ops in prop::collection::vec((0u32..200, any::<bool>()), 0..600)) {
            let mut set = ClaimedSet::default();
            let mut model = BTreeSet::new();
            for (n, insert) in ops {
                if insert {
                    prop_assert_eq!(set.insert(id(n)), model.insert(id(n)));
                    if set.recent.len() >= 7 {
                        set.merge();
                    }
                } else {
                    prop_assert_eq!(set.contains(&id(n)), model.contains(&id(n)));
                }
                prop_assert_eq!(set.len(), model.len());
            }
            prop_assert!(set.sorted.windows(2).all(|w| w[0] < w[1]));
            let mut all: Vec<BlobId> = set.sorted.iter().chain(set.recent.iter()).copied().collect();
            all.sort();
            prop_assert_eq!(all, model.into_iter().collect::<Vec<_>>());
        }
    }
}
