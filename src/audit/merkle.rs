//! The Merkle tree of the audit log, hashed as RFC 6962 / RFC 9162 §2.1 do:
//! `leaf = SHA-256(0x00 ‖ entry)`, `node = SHA-256(0x01 ‖ left ‖ right)`, and
//! the hash of the empty tree is `SHA-256("")`.
//!
//! Proofs are built with the recursive definitions of RFC 9162 §2.1.3.1
//! (`PATH`) and §2.1.4.1 (`PROOF` / `SUBPROOF`) and checked with the
//! iterative algorithms of §2.1.3.2 and §2.1.4.2, step by step. A
//! [`Frontier`] (the right edge of the tree: one perfect subtree hash per set
//! bit of the size) lets the log append a leaf and compute the new root in
//! O(log n) without re-reading earlier leaves.

use std::fmt;

use sha2::{Digest, Sha256};

/// A SHA-256 hash: a leaf, an interior node or a root.
pub type Hash = [u8; 32];

/// `SHA-256(0x00 ‖ entry)`.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(entry);
    h.finalize().into()
}

/// `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The root of the empty tree: `SHA-256("")`.
pub fn empty_root() -> Hash {
    Sha256::digest(b"").into()
}

/// The largest power of two strictly smaller than `n` (`n > 1`).
fn split_point(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// `MTH(D[n])` over leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    let mut f = Frontier::new();
    for l in leaves {
        f.push(*l);
    }
    f.root()
}

/// `PATH(m, D[n])` (RFC 9162 §2.1.3.1): the inclusion proof of leaf `index`
/// in the tree of `leaves`, from the leaf's sibling up. `None` if `index` is
/// out of range.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Option<Vec<Hash>> {
    let index = usize::try_from(index).ok()?;
    if index >= leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    path(index, leaves, &mut out);
    Some(out)
}

fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split_point(n);
    if m < k {
        path(m, &d[..k], out);
        out.push(root(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(root(&d[..k]));
    }
}

/// `PROOF(m, D[n])` (RFC 9162 §2.1.4.1): the consistency proof from the tree
/// of the first `old_size` leaves to the tree of all `leaves`. Empty when
/// `old_size` is 0 or equals the new size; `None` if `old_size > n`.
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Option<Vec<Hash>> {
    let m = usize::try_from(old_size).ok()?;
    if m > leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    if m > 0 && m < leaves.len() {
        subproof(m, leaves, true, &mut out);
    }
    Some(out)
}

fn subproof(m: usize, d: &[Hash], b: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !b {
            out.push(root(d));
        }
        return;
    }
    let k = split_point(n);
    if m <= k {
        subproof(m, &d[..k], b, out);
        out.push(root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root(&d[..k]));
    }
}

/// Why a proof did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is not below the tree size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("the tree sizes are not in order ({old} > {new})")]
    SizesOutOfOrder { old: u64, new: u64 },
    #[error("the proof has the wrong number of hashes")]
    WrongLength,
    #[error("the proof does not lead to the expected root")]
    RootMismatch,
}

/// Runs RFC 9162 §2.1.3.2 and returns the root the proof leads to.
pub fn root_from_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
) -> Result<Hash, ProofError> {
    // 1. leaf_index must be below tree_size.
    if index >= size {
        return Err(ProofError::IndexOutOfRange { index, size });
    }
    // 2. fn = leaf_index, sn = tree_size - 1.
    let (mut fn_, mut sn) = (index, size - 1);
    // 3. r = hash.
    let mut r = *leaf;
    // 4. For each p in inclusion_path:
    for p in proof {
        // a. sn == 0 → fail.
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        // b. LSB(fn) set, or fn == sn:
        if fn_ & 1 == 1 || fn_ == sn {
            // i. r = HASH(0x01 || p || r)
            r = node_hash(p, &r);
            // ii. If LSB(fn) is not set, right-shift both until LSB(fn) is set or fn is 0.
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            // Otherwise r = HASH(0x01 || r || p).
            r = node_hash(&r, p);
        }
        // c. Right-shift both once.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5. sn must be 0.
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    Ok(r)
}

/// RFC 9162 §2.1.3.2: does `proof` show `leaf` at `index` in the tree of
/// `size` leaves with root `root`?
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if root_from_inclusion(leaf, index, size, proof)? == *root {
        Ok(())
    } else {
        Err(ProofError::RootMismatch)
    }
}

/// RFC 9162 §2.1.4.2: is the tree of `old_size` leaves with root `old_root`
/// a prefix of the tree of `new_size` leaves with root `new_root`?
///
/// The RFC's algorithm covers `0 < old_size < new_size`; the trivial cases
/// are handled first as transparency-dev/merkle does: equal sizes need equal
/// roots and an empty proof, an empty old tree is consistent with anything
/// (with an empty proof).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old_size > new_size {
        return Err(ProofError::SizesOutOfOrder {
            old: old_size,
            new: new_size,
        });
    }
    if old_size == new_size {
        if !proof.is_empty() {
            return Err(ProofError::WrongLength);
        }
        return if old_root == new_root {
            Ok(())
        } else {
            Err(ProofError::RootMismatch)
        };
    }
    if old_size == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError::WrongLength)
        };
    }
    // 1. An empty consistency_path fails.
    if proof.is_empty() {
        return Err(ProofError::WrongLength);
    }
    // 2. If first is an exact power of 2, prepend first_hash.
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    // 3. fn = first - 1, sn = second - 1.
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    // 4. If LSB(fn) is set, right-shift both until it is not.
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    // 5. fr = sr = first value of the path.
    let (mut fr, mut sr) = (path[0], path[0]);
    // 6. For each subsequent value c:
    for c in &path[1..] {
        // a. sn == 0 → fail.
        if sn == 0 {
            return Err(ProofError::WrongLength);
        }
        // b. LSB(fn) set, or fn == sn:
        if fn_ & 1 == 1 || fn_ == sn {
            // i. fr = HASH(0x01 || c || fr); ii. sr = HASH(0x01 || c || sr)
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            // iii. If LSB(fn) is not set, right-shift both until LSB(fn) is set or fn is 0.
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            // Otherwise sr = HASH(0x01 || sr || c).
            sr = node_hash(&sr, c);
        }
        // c. Right-shift both once.
        fn_ >>= 1;
        sn >>= 1;
    }
    // 7. fr == first_hash, sr == second_hash and sn == 0.
    if sn != 0 {
        return Err(ProofError::WrongLength);
    }
    if fr != *old_root || sr != *new_root {
        return Err(ProofError::RootMismatch);
    }
    Ok(())
}

/// The right edge of a tree of `size` leaves: the roots of its maximal
/// perfect subtrees, largest (leftmost) first, one per set bit of `size`.
/// Enough to append leaves and compute the root; what the log keeps in its
/// tail cache.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    nodes: Vec<Hash>,
}

impl Frontier {
    pub fn new() -> Self {
        Frontier::default()
    }

    /// Rebuilds a frontier from stored parts; `None` unless there is exactly
    /// one node per set bit of `size`.
    pub fn from_parts(size: u64, nodes: Vec<Hash>) -> Option<Self> {
        (nodes.len() == size.count_ones() as usize).then_some(Frontier { size, nodes })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// Appends a leaf hash: O(log n) node hashes.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        // Each trailing one bit of the old size is a perfect subtree of the
        // same height as the carry: merge them, as in binary addition.
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.nodes.pop().expect("one node per set bit");
            node = node_hash(&left, &node);
            s >>= 1;
        }
        self.nodes.push(node);
        self.size += 1;
    }

    /// `MTH` of the leaves pushed so far: the subtrees folded right to left.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(last) = it.next() else {
            return empty_root();
        };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

impl fmt::Debug for Frontier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Frontier(size={}, root={})",
            self.size,
            hex::encode(self.root())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // RFC 6962 test data and tree heads, as used by Certificate Transparency and
    // transparency-dev/merkle: leaves, roots of sizes 1..=8 and the proofs below
    // are copied from github.com/transparency-dev/merkle, proof/verify_test.go
    // (`leaves`, `roots`, `inclusionProofs`, `consistencyProofs`; that file
    // numbers leaves from 1, here they are 0-based). The same roots appear in
    // google/certificate-transparency's python/ct/crypto/merkle_test.py.
    fn ct_leaves() -> Vec<Vec<u8>> {
        vec![
            vec![],
            vec![0x00],
            vec![0x10],
            vec![0x20, 0x21],
            vec![0x30, 0x31],
            vec![0x40, 0x41, 0x42, 0x43],
            vec![0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57],
            (0x60..=0x6f).collect(),
        ]
    }

    const CT_ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    fn ct_leaf_hashes() -> Vec<Hash> {
        ct_leaves().iter().map(|l| leaf_hash(l)).collect()
    }

    #[test]
    fn empty_tree_is_sha256_of_nothing() {
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(root(&[]), empty_root());
    }

    #[test]
    fn roots_match_the_rfc6962_vectors() {
        let l = ct_leaf_hashes();
        for (n, want) in CT_ROOTS.iter().enumerate() {
            assert_eq!(hex::encode(root(&l[..=n])), *want, "tree size {}", n + 1);
        }
    }

    #[test]
    fn inclusion_proofs_match_the_vectors() {
        let l = ct_leaf_hashes();
        let vectors: [(u64, usize, &[&str]); 5] = [
            (0, 1, &[]),
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                3,
                &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (index, size, want) in vectors {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            let got = inclusion_proof(&l[..size], index).unwrap();
            assert_eq!(got, want, "PATH({index}, D[{size}])");
            let r = h(CT_ROOTS[size - 1]);
            verify_inclusion(&l[index as usize], index, size as u64, &got, &r).unwrap();
        }
    }

    #[test]
    fn consistency_proofs_match_the_vectors() {
        let l = ct_leaf_hashes();
        let vectors: [(u64, usize, &[&str]); 5] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
            (
                6,
                7,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (old, size, want) in vectors {
            let want: Vec<Hash> = want.iter().map(|s| h(s)).collect();
            let got = consistency_proof(&l[..size], old).unwrap();
            assert_eq!(got, want, "PROOF({old}, D[{size}])");
            let (r1, r2) = (h(CT_ROOTS[old as usize - 1]), h(CT_ROOTS[size - 1]));
            verify_consistency(old, size as u64, &r1, &r2, &got).unwrap();
        }
    }

    #[test]
    fn corrupted_vector_proofs_fail() {
        // The probes of transparency-dev/merkle's corruptInclusionProof.
        let l = ct_leaf_hashes();
        let (index, size) = (5u64, 8u64);
        let r = h(CT_ROOTS[7]);
        let proof = inclusion_proof(&l, index).unwrap();
        let leaf = l[index as usize];
        assert!(verify_inclusion(&leaf, index - 1, size, &proof, &r).is_err());
        assert!(verify_inclusion(&leaf, index + 1, size, &proof, &r).is_err());
        assert!(verify_inclusion(&leaf, index ^ 2, size, &proof, &r).is_err());
        assert!(verify_inclusion(&leaf, index, size * 2, &proof, &r).is_err());
        assert!(verify_inclusion(&leaf, index, size / 2, &proof, &r).is_err());
        assert!(verify_inclusion(&leaf_hash(b"WrongLeaf"), index, size, &proof, &r).is_err());
        assert!(verify_inclusion(&leaf, index, size, &proof, &empty_root()).is_err());
        let mut longer = proof.clone();
        longer.push(r);
        assert!(verify_inclusion(&leaf, index, size, &longer, &r).is_err());
        let mut front = vec![r];
        front.extend_from_slice(&proof);
        assert!(verify_inclusion(&leaf, index, size, &front, &r).is_err());
        assert!(verify_inclusion(&leaf, index, size, &proof[..2], &r).is_err());
        for i in 0..proof.len() {
            let mut bad = proof.clone();
            bad[i][0] ^= 8;
            assert!(verify_inclusion(&leaf, index, size, &bad, &r).is_err());
        }
    }

    #[test]
    fn trivial_consistency_cases() {
        let (a, b) = (leaf_hash(b"a"), leaf_hash(b"b"));
        verify_consistency(0, 0, &a, &a, &[]).unwrap();
        verify_consistency(0, 5, &a, &b, &[]).unwrap();
        verify_consistency(3, 3, &b, &b, &[]).unwrap();
        assert!(verify_consistency(3, 3, &a, &b, &[]).is_err());
        assert!(verify_consistency(0, 1, &a, &b, &[a]).is_err());
        assert!(verify_consistency(2, 1, &a, &b, &[]).is_err());
        assert!(verify_consistency(1, 2, &a, &b, &[]).is_err());
    }

    #[test]
    fn frontier_matches_the_recursive_root_and_round_trips() {
        let leaves: Vec<Hash> = (0..70u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut f = Frontier::new();
        for (i, l) in leaves.iter().enumerate() {
            f.push(*l);
            let slice = &leaves[..=i];
            // Recursive MTH, independent of the frontier.
            fn mth(d: &[Hash]) -> Hash {
                match d.len() {
                    0 => empty_root(),
                    1 => d[0],
                    n => {
                        let k = split_point(n);
                        node_hash(&mth(&d[..k]), &mth(&d[k..]))
                    }
                }
            }
            assert_eq!(f.root(), mth(slice), "size {}", i + 1);
            let again = Frontier::from_parts(f.size(), f.nodes().to_vec()).unwrap();
            assert_eq!(again, f);
        }
        assert!(Frontier::from_parts(3, vec![leaves[0]]).is_none());
    }

    fn tree(n: usize, salt: u8) -> Vec<Hash> {
        (0..n as u32)
            .map(|i| {
                let mut b = i.to_be_bytes().to_vec();
                b.push(salt);
                leaf_hash(&b)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_inclusion_proof_verifies_and_nothing_else(n in 1usize..150, salt: u8, pick: u64, flip: u8) {
            let l = tree(n, salt);
            let r = root(&l);
            let size = n as u64;
            for i in 0..size {
                let p = inclusion_proof(&l, i).unwrap();
                prop_assert!(verify_inclusion(&l[i as usize], i, size, &p, &r).is_ok());
            }
            let i = pick % size;
            let p = inclusion_proof(&l, i).unwrap();
            let leaf = l[i as usize];
            // Any other index of the same tree fails (a same-length path can
            // only match one position).
            for j in (0..size).filter(|&j| j != i) {
                prop_assert!(verify_inclusion(&leaf, j, size, &p, &r).is_err(), "index {} accepted for {}", j, i);
            }
            prop_assert!(verify_inclusion(&leaf_hash(b"other"), i, size, &p, &r).is_err());
            let mut wrong_root = r;
            wrong_root[(flip % 32) as usize] ^= 1;
            prop_assert!(verify_inclusion(&leaf, i, size, &p, &wrong_root).is_err());
            if !p.is_empty() {
                let mut bad = p.clone();
                let k = (flip as usize) % bad.len();
                bad[k][0] ^= 0x10;
                prop_assert!(verify_inclusion(&leaf, i, size, &bad, &r).is_err());
                prop_assert!(verify_inclusion(&leaf, i, size, &p[1..], &r).is_err());
            }
            prop_assert!(inclusion_proof(&l, size).is_none());
        }

        #[test]
        fn consistency_proofs_verify_between_any_sizes(n in 1usize..80, salt: u8, flip: u8) {
            let l = tree(n, salt);
            let roots: Vec<Hash> = (0..=n).map(|m| root(&l[..m])).collect();
            for new in 1..=n {
                for old in 0..=new {
                    let p = consistency_proof(&l[..new], old as u64).unwrap();
                    prop_assert!(
                        verify_consistency(old as u64, new as u64, &roots[old], &roots[new], &p).is_ok(),
                        "{} -> {}", old, new
                    );
                    if old > 0 && old < new {
                        let mut bad = p.clone();
                        let k = (flip as usize) % bad.len();
                        bad[k][(flip % 32) as usize] ^= 0x04;
                        prop_assert!(verify_consistency(old as u64, new as u64, &roots[old], &roots[new], &bad).is_err());
                        prop_assert!(verify_consistency(old as u64, new as u64, &roots[new], &roots[new], &p).is_err());
                        prop_assert!(verify_consistency(old as u64, new as u64, &roots[old], &roots[old], &p).is_err());
                    }
                }
            }
        }
    }
}
