//! The in-memory index of a tenant: every blob's location, loaded from all
//! index files. Ids are keyed per epoch, so blobs of different epochs never
//! collide and one map serves them all.

use std::collections::{BTreeMap, BTreeSet};

use crate::format::ids::{BlobId, IdMap, IndexId, PackId};
use crate::format::index::IndexFile;
use crate::format::pack::{BlobKind, PackEntry, min_pack_len};

/// Where a blob lives. `pack` indexes [`Index::packs`].
///
/// Packed: 21 bytes, not 24, so an index entry (id and location) is 53
/// bytes: 6 MiB less at a million blobs. The fields are read by value
/// (a reference to a field of a packed struct is refused by the compiler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed)]
pub struct Location {
    pub pack: u32,
    pub segment: u32,
    pub offset: u32,
    pub sealed_len: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
}

/// The index of a tenant, read-only once built ([`IndexBuilder::build`]).
///
/// Blobs are one table sorted by id, searched by bisection: 53 bytes a blob,
/// where a hash map took about twice that with its empty slots, and the
/// deduplication set a backup needs is a view of it ([`Dedup`]) rather than
/// a second copy of every id. Millions of files fit in a few hundred MiB.
#[derive(Debug, Default)]
pub struct Index {
    /// Pack ids and the epoch each pack was sealed under.
    packs: Vec<(PackId, u32)>,
    /// Per pack (same order): the end of its furthest indexed blob and one
    /// more than its highest indexed segment, from which the shortest length
    /// the whole pack can have follows ([`min_pack_len`]).
    extents: Vec<(u64, u64)>,
    pack_slots: IdMap<PackId, u32>,
    /// Every blob's location, sorted by id, each id once.
    blobs: Vec<(BlobId, Location)>,
    /// Where each run of ids sharing a prefix starts in `blobs`.
    buckets: Buckets,
    /// Further locations of blobs indexed more than once in different packs
    /// (a blob stored again after its pack was lost, an interrupted repack),
    /// until [`Index::prefer_stored`] has chosen among them.
    alternatives: IdMap<BlobId, Vec<Location>>,
    /// Index files loaded, with their epoch.
    pub files: Vec<(IndexId, u32)>,
}

/// What [`Index::usable_packs`] found missing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LostBlobs {
    /// Indexed blobs of the epoch whose pack is not in the store (or is
    /// shorter than the blobs indexed in it need).
    pub blobs: usize,
    /// Those packs, in id order.
    pub packs: Vec<PackId>,
}

/// Collects index files and packs, then sorts them into an [`Index`].
#[derive(Debug, Default)]
pub struct IndexBuilder {
    index: Index,
}

impl IndexBuilder {
    pub fn add_file(&mut self, id: IndexId, epoch: u32, file: &IndexFile) {
        self.index.files.push((id, epoch));
        for (pack, entries) in &file.packs {
            self.add_pack(*pack, epoch, entries);
        }
    }

    pub fn add_pack(&mut self, pack: PackId, epoch: u32, entries: &[PackEntry]) {
        let ix = &mut self.index;
        let slot = *ix.pack_slots.entry(pack).or_insert_with(|| {
            ix.packs.push((pack, epoch));
            ix.extents.push((0, 0));
            (ix.packs.len() - 1) as u32
        });
        let extent = &mut ix.extents[slot as usize];
        for e in entries {
            extent.0 = extent.0.max(u64::from(e.offset) + u64::from(e.sealed_len));
            extent.1 = extent.1.max(u64::from(e.segment) + 1);
        }
        ix.blobs.extend(entries.iter().map(|e| {
            (
                e.id,
                Location {
                    pack: slot,
                    segment: e.segment,
                    offset: e.offset,
                    sealed_len: e.sealed_len,
                    raw_len: e.raw_len,
                    kind: e.kind,
                },
            )
        }));
    }

    /// Sorts the blobs by id. Duplicates (after an interrupted repack, or a
    /// blob stored again after its pack was lost): the one in the pack added
    /// first is used, the others are kept aside for `prefer_stored`, which
    /// picks one whose pack exists; a repeat within the same pack is dropped.
    pub fn build(self) -> Index {
        let mut ix = self.index;
        // Unstable, so in place: a stable sort's scratch buffer is half the
        // table (28 MiB at 1,000,000 blobs) on top of it at the peak of every
        // index load. Pack slots number packs in the order they were added.
        ix.blobs
            .sort_unstable_by_key(|(id, l)| (*id, l.pack, l.segment, l.offset));
        let mut alternatives: IdMap<BlobId, Vec<Location>> = IdMap::default();
        ix.blobs.dedup_by(|later, first| {
            if later.0 != first.0 {
                return false;
            }
            if later.1.pack != first.1.pack {
                alternatives.entry(later.0).or_default().push(later.1);
            }
            true
        });
        ix.blobs.shrink_to_fit();
        ix.buckets = Buckets::new(ix.blobs.iter().map(|(id, _)| id), ix.blobs.len());
        ix.alternatives = alternatives;
        ix
    }
}

/// A first step for the search by id: the table's ids are keyed hashes,
/// spread evenly, so their first bits find a run of about eight entries
/// (up to 2^16 runs: about 30 at 2,000,000 blobs) that a bisection finishes.
/// Bisecting the whole table instead compared 21 ids of 32 bytes for every
/// lookup at 2,000,000 blobs: a third of an incremental backup's profile,
/// which looks up every blob of every unchanged file. At most 4 bytes per
/// 8 blobs (256 KiB from 524,288 blobs on) for the runs, and 4 bytes a blob
/// for the tags.
#[derive(Debug, Default)]
struct Buckets {
    /// How far a 16-bit prefix is shifted right to give the bucket.
    shift: u32,
    /// `starts[b]..starts[b + 1]`: the positions of bucket `b` (empty: no
    /// table was built, one run covers everything).
    starts: Vec<u32>,
    /// Per position, the 32 bits of the id that follow the bucket's: within
    /// a bucket they ascend, so a lookup bisects these 4-byte tags (a cache
    /// line holds 16) and compares whole ids only where a tag matches. Bisecting
    /// the entries themselves touched a cache line per step: `memcmp`
    /// in [`Index::position`] was 18% of an incremental backup of 2,000,000
    /// files.
    tags: Vec<u32>,
}

impl Buckets {
    const MAX_BITS: u32 = 16;

    fn new<'a>(sorted: impl Iterator<Item = &'a BlobId>, len: usize) -> Buckets {
        let bits = match len / 8 {
            0 => 0,
            n => n.ilog2().min(Self::MAX_BITS),
        };
        let shift = Self::MAX_BITS - bits;
        let mut starts = vec![0u32; (1 << bits) + 1];
        let mut tags = Vec::with_capacity(len);
        for id in sorted {
            starts[Self::key(id, shift) + 1] += 1;
            tags.push(Self::tag(id, shift));
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        Buckets {
            shift,
            starts,
            tags,
        }
    }

    fn key(id: &BlobId, shift: u32) -> usize {
        usize::from(u16::from_be_bytes([id.0[0], id.0[1]])) >> shift
    }

    /// The 32 bits after the bucket's `16 - shift`.
    fn tag(id: &BlobId, shift: u32) -> u32 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&id.0[..8]);
        let bits = Self::MAX_BITS - shift;
        ((u64::from_be_bytes(first) << bits) >> 32) as u32
    }

    /// The positions where `id` would be, in a table of `len` entries.
    fn range(&self, id: &BlobId, len: usize) -> std::ops::Range<usize> {
        if self.starts.is_empty() {
            return 0..len;
        }
        let b = Self::key(id, self.shift);
        self.starts[b] as usize..self.starts[b + 1] as usize
    }
}

impl Index {
    /// True when some blob is indexed in more than one pack and
    /// [`Index::prefer_stored`] has not yet chosen.
    pub fn has_alternatives(&self) -> bool {
        !self.alternatives.is_empty()
    }

    /// For every blob indexed in more than one pack, uses a location whose
    /// pack is in `stored` (a listing: pack → size) when the one chosen first
    /// is not. A blob stored again after its pack was lost is then read from
    /// its new pack, whatever order the index files were loaded in, while the
    /// lost pack's other blobs stay indexed there (and `check` keeps
    /// reporting them). Returns how many blobs moved.
    pub fn prefer_stored(&mut self, stored: &BTreeMap<PackId, u64>) -> usize {
        let mut moved = 0;
        for (id, alternatives) in std::mem::take(&mut self.alternatives) {
            let Some(i) = self.position(&id) else {
                continue;
            };
            if self.is_stored(self.blobs[i].1.pack, stored) {
                continue;
            }
            if let Some(better) = alternatives.iter().find(|l| self.is_stored(l.pack, stored)) {
                self.blobs[i].1 = *better;
                moved += 1;
            }
        }
        moved
    }

    /// True when the pack of `loc` is listed in `stored` (pack → size) and
    /// long enough for every blob the index places in it.
    pub fn is_stored_at(&self, loc: &Location, stored: &BTreeMap<PackId, u64>) -> bool {
        self.is_stored(loc.pack, stored)
    }

    /// True when the pack in `slot` is listed in `stored` (pack → size) and
    /// long enough for every blob the index places in it: a pack that lost
    /// its end lost its directory, which every reader authenticates first.
    fn is_stored(&self, slot: u32, stored: &BTreeMap<PackId, u64>) -> bool {
        let (pack, _) = self.packs[slot as usize];
        let (end, blobs) = self.extents[slot as usize];
        stored
            .get(&pack)
            .is_some_and(|&size| size >= min_pack_len(end, blobs))
    }

    fn position(&self, id: &BlobId) -> Option<usize> {
        let run = self.buckets.range(id, self.blobs.len());
        let start = run.start;
        let Some(tags) = self.buckets.tags.get(run.clone()) else {
            // No tags (a table never built): bisect the entries themselves.
            return self.blobs[run]
                .binary_search_by(|(b, _)| b.cmp(id))
                .ok()
                .map(|i| start + i);
        };
        let tag = Buckets::tag(id, self.buckets.shift);
        let first = tags.partition_point(|&t| t < tag);
        (first..tags.len())
            .take_while(|&i| tags[i] == tag)
            .map(|i| start + i)
            .find(|&i| self.blobs[i].0 == *id)
    }

    /// Starts loading what a lookup of `id` will read (the tags around where
    /// its tag falls in its bucket, tags being even within one, and the entry
    /// there), so that a lookup made after other work finds them cached: in
    /// a table of millions of blobs, each lookup otherwise waits on memory.
    pub fn prefetch(&self, id: &BlobId) {
        let run = self.buckets.range(id, self.blobs.len());
        if run.is_empty() || self.buckets.tags.len() < run.end {
            return;
        }
        let tag = Buckets::tag(id, self.buckets.shift);
        let guess = run.start + ((u64::from(tag) * run.len() as u64) >> 32) as usize;
        prefetch(&self.buckets.tags[guess]);
        prefetch(&self.blobs[guess]);
    }

    pub fn get(&self, id: &BlobId) -> Option<&Location> {
        self.position(id).map(|i| &self.blobs[i].1)
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.position(id).is_some()
    }

    pub fn pack(&self, loc: &Location) -> (PackId, u32) {
        self.packs[loc.pack as usize]
    }

    pub fn packs(&self) -> impl Iterator<Item = (PackId, u32)> + '_ {
        self.packs.iter().copied()
    }

    /// Where each pack's indexed blobs end (by pack slot): one pass over
    /// the index.
    pub fn blob_ends(&self) -> Vec<u64> {
        let mut ends = vec![0u64; self.packs.len()];
        for (_, l) in &self.blobs {
            let end = l.offset as u64 + l.sealed_len as u64;
            let slot = &mut ends[l.pack as usize];
            *slot = (*slot).max(end);
        }
        ends
    }

    pub fn pack_epoch(&self, pack: &PackId) -> Option<u32> {
        self.pack_slots.get(pack).map(|&s| self.packs[s as usize].1)
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Every blob and its location, in id order.
    pub fn blobs(&self) -> impl Iterator<Item = (&BlobId, &Location)> {
        self.blobs.iter().map(|(id, l)| (id, l))
    }

    /// Which packs a backup in `epoch` may deduplicate against: those of the
    /// epoch that the store lists (`stored`: pack → size) whole. A blob whose
    /// pack is gone, or shorter than the blobs indexed in it need
    /// (truncated), is left out, so the backup stores it again rather than
    /// name data that is lost. Also returns what was left out.
    pub fn usable_packs(
        &self,
        epoch: u32,
        stored: &BTreeMap<PackId, u64>,
    ) -> (Vec<bool>, LostBlobs) {
        let usable: Vec<bool> = (0..self.packs.len() as u32)
            .map(|slot| self.packs[slot as usize].1 == epoch && self.is_stored(slot, stored))
            .collect();
        let mut lost = LostBlobs::default();
        let mut lost_packs = BTreeSet::new();
        for (_, l) in &self.blobs {
            let (pack, pack_epoch) = self.packs[l.pack as usize];
            if pack_epoch == epoch && !usable[l.pack as usize] {
                lost.blobs += 1;
                lost_packs.insert(pack);
            }
        }
        lost.packs = lost_packs.into_iter().collect();
        (usable, lost)
    }

    /// The chosen entries grouped by pack, each group in segment order: the
    /// shape of an index file. Costs 4 bytes a blob beside the index.
    pub fn by_pack(&self) -> ByPack<'_> {
        let mut order: Vec<u32> = (0..self.blobs.len() as u32).collect();
        order.sort_unstable_by_key(|&i| {
            let l = &self.blobs[i as usize].1;
            (l.pack, l.segment)
        });
        let mut starts: IdMap<PackId, (u32, u32, u32)> = IdMap::default();
        let mut i = 0;
        while i < order.len() {
            let slot = self.blobs[order[i] as usize].1.pack;
            let mut j = i;
            while j < order.len() && self.blobs[order[j] as usize].1.pack == slot {
                j += 1;
            }
            starts.insert(self.packs[slot as usize].0, (slot, i as u32, j as u32));
            i = j;
        }
        ByPack {
            index: self,
            order,
            starts,
        }
    }
}

/// A set of indexed blobs, one bit a blob by its place in the index (a set
/// of ids is 32 bytes a blob and more in its table's empty slots): what a
/// prune marks as used. Only for the index that made it ([`Index::marks`]).
pub struct BlobMarks {
    bits: Vec<u64>,
    marked: usize,
}

impl std::fmt::Debug for BlobMarks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobMarks({} of {})", self.marked, self.bits.len() * 64)
    }
}

impl BlobMarks {
    /// How many blobs are marked.
    pub fn len(&self) -> usize {
        self.marked
    }

    pub fn is_empty(&self) -> bool {
        self.marked == 0
    }

    fn set(&mut self, i: usize) {
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.bits[word] & bit == 0 {
            self.bits[word] |= bit;
            self.marked += 1;
        }
    }

    fn get(&self, i: usize) -> bool {
        self.bits[i / 64] & (1u64 << (i % 64)) != 0
    }
}

impl Index {
    /// An empty set of this index's blobs.
    pub fn marks(&self) -> BlobMarks {
        BlobMarks {
            bits: vec![0; self.blobs.len().div_ceil(64)],
            marked: 0,
        }
    }

    /// Marks `id` if it is indexed; false if it is not (nothing to mark).
    pub fn mark(&self, marks: &mut BlobMarks, id: &BlobId) -> bool {
        match self.position(id) {
            Some(i) => {
                marks.set(i);
                true
            }
            None => false,
        }
    }

    pub fn is_marked(&self, marks: &BlobMarks, id: &BlobId) -> bool {
        self.position(id).is_some_and(|i| marks.get(i))
    }

    /// Every blob, its location and whether it is marked, in id order.
    pub fn blobs_marked<'a>(
        &'a self,
        marks: &'a BlobMarks,
    ) -> impl Iterator<Item = (&'a BlobId, &'a Location, bool)> {
        self.blobs
            .iter()
            .enumerate()
            .map(|(i, (id, l))| (id, l, marks.get(i)))
    }
}

/// [`Index::by_pack`]: the index's entries grouped by pack.
pub struct ByPack<'a> {
    index: &'a Index,
    /// Positions in `index.blobs`, sorted by pack slot and segment.
    order: Vec<u32>,
    /// Per pack with entries: its slot and its run in `order`.
    starts: IdMap<PackId, (u32, u32, u32)>,
}

impl ByPack<'_> {
    /// The packs with at least one entry, with their epochs.
    pub fn packs(&self) -> impl Iterator<Item = (PackId, u32)> + '_ {
        self.starts
            .iter()
            .map(|(pack, &(slot, _, _))| (*pack, self.index.packs[slot as usize].1))
    }

    pub fn contains(&self, pack: &PackId) -> bool {
        self.starts.contains_key(pack)
    }

    /// The entries in `pack`, in segment order; empty for a pack without any.
    pub fn entries(&self, pack: &PackId) -> Vec<PackEntry> {
        let Some(&(_, from, to)) = self.starts.get(pack) else {
            return Vec::new();
        };
        self.order[from as usize..to as usize]
            .iter()
            .map(|&i| {
                let (id, l) = &self.index.blobs[i as usize];
                PackEntry {
                    id: *id,
                    kind: l.kind,
                    segment: l.segment,
                    offset: l.offset,
                    sealed_len: l.sealed_len,
                    raw_len: l.raw_len,
                }
            })
            .collect()
    }

    pub fn len(&self, pack: &PackId) -> usize {
        self.starts
            .get(pack)
            .map_or(0, |&(_, from, to)| (to - from) as usize)
    }
}

/// The deduplication set of one backup: the blobs the index places in usable
/// packs of its epoch ([`Index::usable_packs`]), plus those claimed since.
/// The default knows nothing (a repack writes every blob it is given).
#[derive(Default)]
pub struct Dedup {
    index: std::sync::Arc<Index>,
    usable: Vec<bool>,
    claimed: super::claimed::ClaimedSet,
}

impl Dedup {
    pub fn new(index: std::sync::Arc<Index>, usable: Vec<bool>) -> Self {
        Dedup {
            index,
            usable,
            claimed: Default::default(),
        }
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.claimed.contains(id) || self.is_stored(id)
    }

    /// True (and now claimed) if `id` is not stored yet.
    pub fn claim(&mut self, id: &BlobId) -> bool {
        !self.is_stored(id) && self.claimed.insert(*id)
    }

    fn is_stored(&self, id: &BlobId) -> bool {
        self.index
            .get(id)
            .is_some_and(|l| self.usable.get(l.pack as usize).copied().unwrap_or(false))
    }
}

/// A hint to load `value`'s cache line; it reads nothing.
#[inline]
fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch neither reads for the program nor faults, and the
    // pointer comes from a reference.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>((value as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    fn entry(id: BlobId, offset: u32) -> PackEntry {
        PackEntry {
            id,
            kind: BlobKind::Data,
            segment: offset / 100,
            offset,
            sealed_len: 100,
            raw_len: 80,
        }
    }

    proptest::proptest! {
        /// Every indexed id is found at its location and no other id is,
        /// whatever the table's size (buckets of 0 to 16 bits) and however
        /// the ids crowd into few prefixes; prefetching any of them is safe.
        #[test]
        fn lookups_find_exactly_the_indexed_ids(
            seeds in proptest::collection::vec((proptest::prelude::any::<[u8; 32]>(), 0u8..5), 0..3000),
            absent in proptest::collection::vec(proptest::prelude::any::<[u8; 32]>(), 0..50),
        ) {
            // Crowded prefixes: a quarter of the ids share their first byte or two.
            let crowd = |(mut b, c): ([u8; 32], u8)| {
                if c == 0 { b[0] = 7; }
                if c == 1 { b[..2].copy_from_slice(&[7, 7]); }
                // Same bucket and same tag: told apart by the whole id only.
                if c == 2 { b[..6].copy_from_slice(&[7, 7, 7, 7, 7, 7]); }
                BlobId(b)
            };
            let ids: BTreeSet<BlobId> = seeds.into_iter().map(crowd).collect();
            let pack = PackId::random();
            let entries: Vec<PackEntry> =
                ids.iter().rev().enumerate().map(|(i, id)| entry(*id, i as u32 * 100)).collect();
            let mut builder = IndexBuilder::default();
            builder.add_pack(pack, 1, &entries);
            let index = builder.build();
            // (A prefetch first: a hint, for any id, whatever the table.)
            for e in &entries {
                index.prefetch(&e.id);
                proptest::prop_assert_eq!(index.get(&e.id).map(|l| l.offset), Some(e.offset));
            }
            for a in absent.into_iter().map(BlobId).filter(|a| !ids.contains(a)) {
                index.prefetch(&a);
                proptest::prop_assert!(!index.contains(&a));
            }
        }
    }

    /// Marks are by place in the index: exactly the ids marked read as
    /// marked, each counted once; an id the index lacks is not marked.
    #[test]
    fn marks_hold_exactly_the_indexed_ids_marked() {
        let ids: Vec<BlobId> = (0..300).map(|_| BlobId::random()).collect();
        let entries: Vec<PackEntry> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| entry(*id, i as u32 * 100))
            .collect();
        let mut builder = IndexBuilder::default();
        builder.add_pack(PackId::random(), 1, &entries);
        let index = builder.build();
        let mut marks = index.marks();
        for id in ids.iter().step_by(3).chain(ids.iter().step_by(6)) {
            assert!(index.mark(&mut marks, id));
        }
        assert!(!index.mark(&mut marks, &BlobId::random()));
        assert_eq!(marks.len(), 100);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(index.is_marked(&marks, id), i % 3 == 0, "{i}");
        }
        let marked: BTreeSet<BlobId> = index
            .blobs_marked(&marks)
            .filter(|(_, _, m)| *m)
            .map(|(id, _, _)| *id)
            .collect();
        assert_eq!(marked, ids.iter().step_by(3).copied().collect());
    }

    /// The table's entry is what the memory figures in BENCHMARKS.md count.
    #[test]
    fn an_index_entry_is_53_bytes() {
        assert_eq!(std::mem::size_of::<(BlobId, Location)>(), 53);
    }

    #[test]
    fn buckets_split_large_tables_in_runs_of_about_eight() {
        for (len, bits) in [(0, 0), (7, 0), (8, 0), (16, 1), (1_000, 6), (2_000_000, 16)] {
            let ids: Vec<BlobId> = Vec::new();
            let b = Buckets::new(ids.iter(), len);
            assert_eq!(b.starts.len(), (1 << bits) + 1, "{len} blobs");
        }
    }

    /// Blob `x` was in `lost`, which is gone; a backup stored it again in
    /// `new`. Whichever index file loads first, reads go to `new`.
    #[test]
    fn a_blob_stored_again_is_read_from_the_pack_that_exists() {
        let (x, y) = (BlobId::random(), BlobId::random());
        let (lost, new) = (PackId::random(), PackId::random());
        let stored = BTreeMap::from([(new, 10_000)]);
        for lost_first in [true, false] {
            let mut builder = IndexBuilder::default();
            let old_file = (lost, vec![entry(x, 0), entry(y, 100)]);
            let new_file = (new, vec![entry(x, 500)]);
            let (a, b) = if lost_first {
                (old_file, new_file)
            } else {
                (new_file, old_file)
            };
            builder.add_pack(a.0, 1, &a.1);
            builder.add_pack(b.0, 1, &b.1);
            let mut index = builder.build();
            assert!(index.has_alternatives());
            let moved = index.prefer_stored(&stored);
            assert_eq!(moved, usize::from(lost_first));
            assert!(!index.has_alternatives());
            assert_eq!(index.pack(index.get(&x).unwrap()).0, new);
            assert_eq!({ index.get(&x).unwrap().offset }, 500);
            // y was not stored again: it stays indexed in the lost pack.
            assert_eq!(index.pack(index.get(&y).unwrap()).0, lost);
            // A consolidated index drops the superseded entry, keeps y's.
            let by_pack = index.by_pack();
            assert_eq!(by_pack.entries(&lost), vec![entry(y, 100)]);
            assert_eq!(by_pack.entries(&new), vec![entry(x, 500)]);
        }
    }

    #[test]
    fn deduplication_trusts_only_listed_packs_of_the_epoch() {
        let (x, y, z, w) = (
            BlobId::random(),
            BlobId::random(),
            BlobId::random(),
            BlobId::random(),
        );
        let (kept, lost, truncated, other_epoch) = (
            PackId::random(),
            PackId::random(),
            PackId::random(),
            PackId::random(),
        );
        let mut builder = IndexBuilder::default();
        builder.add_pack(kept, 1, &[entry(x, 84)]);
        builder.add_pack(lost, 1, &[entry(y, 84)]);
        // Listed, but cut short: its directory is gone, so both of its blobs
        // are lost, even the one whose bytes are still there.
        builder.add_pack(truncated, 1, &[entry(z, 84), entry(w, 184)]);
        let foreign = BlobId::random();
        builder.add_pack(other_epoch, 2, &[entry(foreign, 84)]);
        let index = std::sync::Arc::new(builder.build());
        let whole = |end: u64, n: u64| min_pack_len(end, n);
        let stored = BTreeMap::from([
            (kept, whole(184, 1)),
            (truncated, whole(284, 2) - 1),
            (other_epoch, whole(184, 1)),
        ]);
        let (usable, lost_blobs) = index.usable_packs(1, &stored);
        let mut known = Dedup::new(index.clone(), usable);
        assert!(known.contains(&x) && !known.claim(&x));
        for other in [y, z, w, foreign] {
            assert!(!known.contains(&other));
        }
        // A lost blob is claimed once (stored again by this backup), then known.
        assert!(known.claim(&y));
        assert!(!known.claim(&y) && known.contains(&y));
        assert_eq!(lost_blobs.blobs, 3);
        let mut want = vec![lost, truncated];
        want.sort();
        assert_eq!(lost_blobs.packs, want);
        // Nothing missing: nothing lost.
        let all = BTreeMap::from([
            (kept, whole(184, 1)),
            (lost, whole(184, 1)),
            (truncated, whole(284, 2)),
        ]);
        assert_eq!(index.usable_packs(1, &all).1, LostBlobs::default());
    }
}
