//! Seeded choices: the random snapshot and the sample of files.
//!
//! The generator is SplitMix64, written out here rather than taken from a
//! crate, so a seed recorded in a drill report chooses the same snapshot and
//! the same files in every custos version (a crate may change its algorithm).
//! The sample is a reservoir sample (Algorithm R) over one pass of the tree,
//! so memory is bounded by the sample size, not by the number of files.

use super::report::SampleInfo;
use crate::error::Result;
use crate::format::snapshot::Snapshot;
use crate::format::tree::EntryKind;
use crate::jobs::restore::FileSet;
use crate::pipeline::tree::TreeReader;
use crate::repo::{Index, Repo};

pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias (Lemire's method).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }
}

/// A fresh seed below 2^53, so it survives any JSON reader exactly.
pub fn fresh_seed() -> u64 {
    u64::from_le_bytes(crate::util::random_bytes::<8>()) >> 11
}

pub struct Chosen {
    pub files: FileSet,
    pub info: SampleInfo,
}

/// Chooses `n` files of the snapshot at random, plus every file in `always`
/// (snapshot paths such as the verify command's `{file:NAME}`) that exists.
pub async fn choose(
    repo: &Repo,
    index: &Index,
    snapshot: &Snapshot,
    n: u32,
    always: &[String],
    rng: &mut SplitMix64,
) -> Result<Chosen> {
    let mut reservoir: Vec<(Vec<u8>, u64)> = Vec::with_capacity(n as usize);
    let mut fixed: Vec<(Vec<u8>, u64)> = Vec::new();
    let mut seen = 0u64;
    let mut population = 0u64;
    let mut tree = TreeReader::new(
        repo,
        index,
        &snapshot.tree,
        format!("tree of snapshot {}", snapshot.id),
    );
    while let Some(e) = tree.next_entry().await? {
        if e.kind != EntryKind::File {
            continue;
        }
        population += 1;
        if always.iter().any(|a| a.as_bytes() == e.path.as_slice()) {
            fixed.push((e.path, e.size));
            continue;
        }
        if (reservoir.len() as u64) < u64::from(n) {
            reservoir.push((e.path, e.size));
        } else {
            let j = rng.below(seen + 1);
            if j < u64::from(n) {
                reservoir[j as usize] = (e.path, e.size);
            }
        }
        seen += 1;
    }
    let mut files = FileSet::with_capacity(reservoir.len() + fixed.len());
    let mut bytes = 0u64;
    for (path, size) in reservoir.into_iter().chain(fixed) {
        bytes += size;
        files.insert(path);
    }
    Ok(Chosen {
        info: SampleInfo {
            requested: n,
            files: files.len() as u64,
            bytes,
            population,
            always: always.to_vec(),
        },
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_stable() {
        // Reference values of SplitMix64 with seed 0 (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = SplitMix64::new(42);
        let mut hit = [false; 7];
        for _ in 0..1000 {
            let v = r.below(7);
            assert!(v < 7);
            hit[v as usize] = true;
        }
        assert!(hit.iter().all(|&h| h));
    }

    #[test]
    fn fresh_seeds_fit_in_a_double() {
        for _ in 0..100 {
            assert!(fresh_seed() < 1 << 53);
        }
    }
}
