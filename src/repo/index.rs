//! The in-memory index of a tenant: every blob's location, loaded from all
//! index files. Ids are keyed per epoch, so blobs of different epochs never
//! collide and one map serves them all.

use crate::format::ids::{BlobId, IdMap, IndexId, PackId};
use crate::format::index::IndexFile;
use crate::format::pack::{BlobKind, PackEntry, min_pack_len};

/// Where a blob lives. `pack` indexes [`Index::packs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: u32,
    pub segment: u32,
    pub offset: u32,
    pub sealed_len: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
}

#[derive(Debug, Default)]
pub struct Index {
    /// Pack ids and the epoch each pack was sealed under.
    packs: Vec<(PackId, u32)>,
    /// Per pack (same order): the end of its furthest indexed blob and one
    /// more than its highest indexed segment, from which the shortest length
    /// the whole pack can have follows ([`min_pack_len`]).
    extents: Vec<(u64, u64)>,
    pack_slots: IdMap<PackId, u32>,
    blobs: IdMap<BlobId, Location>,
    /// Further locations of blobs indexed more than once in different packs
    /// (a blob stored again after its pack was lost, an interrupted repack),
    /// until [`Index::prefer_stored`] has chosen among them.
    alternatives: IdMap<BlobId, Vec<Location>>,
    /// Index files loaded, with their epoch.
    pub files: Vec<(IndexId, u32)>,
}

/// What [`Index::stored_blobs_of_epoch`] found missing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LostBlobs {
    /// Indexed blobs of the epoch whose pack is not in the store (or is
    /// shorter than the blobs indexed in it need).
    pub blobs: usize,
    /// Those packs, in id order.
    pub packs: Vec<PackId>,
}

impl Index {
    pub fn add_file(&mut self, id: IndexId, epoch: u32, file: &IndexFile) {
        self.files.push((id, epoch));
        for (pack, entries) in &file.packs {
            self.add_pack(*pack, epoch, entries);
        }
    }

    pub fn add_pack(&mut self, pack: PackId, epoch: u32, entries: &[PackEntry]) {
        let slot = *self.pack_slots.entry(pack).or_insert_with(|| {
            self.packs.push((pack, epoch));
            self.extents.push((0, 0));
            (self.packs.len() - 1) as u32
        });
        for e in entries {
            let extent = &mut self.extents[slot as usize];
            extent.0 = extent.0.max(u64::from(e.offset) + u64::from(e.sealed_len));
            extent.1 = extent.1.max(u64::from(e.segment) + 1);
            let loc = Location {
                pack: slot,
                segment: e.segment,
                offset: e.offset,
                sealed_len: e.sealed_len,
                raw_len: e.raw_len,
                kind: e.kind,
            };
            // Duplicates (after an interrupted repack, or a blob stored again
            // after its pack was lost): the first is used, the others are kept
            // aside for `prefer_stored`, which picks one whose pack exists.
            match self.blobs.entry(e.id) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(loc);
                }
                std::collections::hash_map::Entry::Occupied(o) if o.get().pack != slot => {
                    self.alternatives.entry(e.id).or_default().push(loc);
                }
                std::collections::hash_map::Entry::Occupied(_) => {}
            }
        }
    }

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
    pub fn prefer_stored(&mut self, stored: &std::collections::BTreeMap<PackId, u64>) -> usize {
        let mut moved = 0;
        for (id, alternatives) in std::mem::take(&mut self.alternatives) {
            let Some(&current) = self.blobs.get(&id) else {
                continue;
            };
            if self.is_stored(current.pack, stored) {
                continue;
            }
            if let Some(better) = alternatives.iter().find(|l| self.is_stored(l.pack, stored)) {
                self.blobs.insert(id, *better);
                moved += 1;
            }
        }
        moved
    }

    /// True when the pack of `loc` is listed in `stored` (pack → size) and
    /// long enough for every blob the index places in it.
    pub fn is_stored_at(
        &self,
        loc: &Location,
        stored: &std::collections::BTreeMap<PackId, u64>,
    ) -> bool {
        self.is_stored(loc.pack, stored)
    }

    /// True when the pack in `slot` is listed in `stored` (pack → size) and
    /// long enough for every blob the index places in it: a pack that lost
    /// its end lost its directory, which every reader authenticates first.
    fn is_stored(&self, slot: u32, stored: &std::collections::BTreeMap<PackId, u64>) -> bool {
        let (pack, _) = self.packs[slot as usize];
        let (end, blobs) = self.extents[slot as usize];
        stored
            .get(&pack)
            .is_some_and(|&size| size >= min_pack_len(end, blobs))
    }

    pub fn get(&self, id: &BlobId) -> Option<&Location> {
        self.blobs.get(id)
    }

    pub fn contains(&self, id: &BlobId) -> bool {
        self.blobs.contains_key(id)
    }

    pub fn pack(&self, loc: &Location) -> (PackId, u32) {
        self.packs[loc.pack as usize]
    }

    pub fn packs(&self) -> impl Iterator<Item = (PackId, u32)> + '_ {
        self.packs.iter().copied()
    }

    pub fn pack_epoch(&self, pack: &PackId) -> Option<u32> {
        self.pack_slots.get(pack).map(|&s| self.packs[s as usize].1)
    }

    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    pub fn blobs(&self) -> impl Iterator<Item = (&BlobId, &Location)> {
        self.blobs.iter()
    }

    /// The deduplication set of a backup in `epoch` that trusts only packs
    /// the store lists (`stored`: pack → size): a blob whose pack is gone, or
    /// shorter than the blobs indexed in it need (truncated), is left out, so
    /// the backup stores it again rather than name data that is lost. Also
    /// returns what was left out.
    pub fn stored_blobs_of_epoch(
        &self,
        epoch: u32,
        stored: &std::collections::BTreeMap<PackId, u64>,
    ) -> (crate::format::ids::IdSet<BlobId>, LostBlobs) {
        let mut known = crate::format::ids::IdSet::default();
        let mut lost = LostBlobs::default();
        let mut lost_packs = std::collections::BTreeSet::new();
        for (id, l) in &self.blobs {
            let (pack, pack_epoch) = self.packs[l.pack as usize];
            if pack_epoch != epoch {
                continue;
            }
            if self.is_stored(l.pack, stored) {
                known.insert(*id);
            } else {
                lost.blobs += 1;
                lost_packs.insert(pack);
            }
        }
        lost.packs = lost_packs.into_iter().collect();
        (known, lost)
    }

    /// Entries grouped by pack, for writing a consolidated index.
    pub fn entries_by_pack(&self) -> IdMap<PackId, Vec<PackEntry>> {
        let mut out: IdMap<PackId, Vec<PackEntry>> = IdMap::default();
        for (id, l) in &self.blobs {
            out.entry(self.packs[l.pack as usize].0)
                .or_default()
                .push(PackEntry {
                    id: *id,
                    kind: l.kind,
                    segment: l.segment,
                    offset: l.offset,
                    sealed_len: l.sealed_len,
                    raw_len: l.raw_len,
                });
        }
        for v in out.values_mut() {
            v.sort_by_key(|e| e.segment);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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

    /// Blob `x` was in `lost`, which is gone; a backup stored it again in
    /// `new`. Whichever index file loads first, reads go to `new`.
    #[test]
    fn a_blob_stored_again_is_read_from_the_pack_that_exists() {
        let (x, y) = (BlobId::random(), BlobId::random());
        let (lost, new) = (PackId::random(), PackId::random());
        let stored = BTreeMap::from([(new, 10_000)]);
        for lost_first in [true, false] {
            let mut index = Index::default();
            let old_file = (lost, vec![entry(x, 0), entry(y, 100)]);
            let new_file = (new, vec![entry(x, 500)]);
            let (a, b) = if lost_first {
                (old_file, new_file)
            } else {
                (new_file, old_file)
            };
            index.add_pack(a.0, 1, &a.1);
            index.add_pack(b.0, 1, &b.1);
            assert!(index.has_alternatives());
            let moved = index.prefer_stored(&stored);
            assert_eq!(moved, usize::from(lost_first));
            assert!(!index.has_alternatives());
            assert_eq!(index.pack(index.get(&x).unwrap()).0, new);
            assert_eq!(index.get(&x).unwrap().offset, 500);
            // y was not stored again: it stays indexed in the lost pack.
            assert_eq!(index.pack(index.get(&y).unwrap()).0, lost);
            // A consolidated index drops the superseded entry, keeps y's.
            let by_pack = index.entries_by_pack();
            assert_eq!(by_pack[&lost].len(), 1);
            assert_eq!(by_pack[&new].len(), 1);
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
        let mut index = Index::default();
        index.add_pack(kept, 1, &[entry(x, 84)]);
        index.add_pack(lost, 1, &[entry(y, 84)]);
        // Listed, but cut short: its directory is gone, so both of its blobs
        // are lost, even the one whose bytes are still there.
        index.add_pack(truncated, 1, &[entry(z, 84), entry(w, 184)]);
        index.add_pack(other_epoch, 2, &[entry(BlobId::random(), 84)]);
        let whole = |end: u64, n: u64| min_pack_len(end, n);
        let stored = BTreeMap::from([
            (kept, whole(184, 1)),
            (truncated, whole(284, 2) - 1),
            (other_epoch, whole(184, 1)),
        ]);
        let (known, lost_blobs) = index.stored_blobs_of_epoch(1, &stored);
        assert!(known.contains(&x));
        assert!(!known.contains(&y) && !known.contains(&z) && !known.contains(&w));
        assert_eq!(known.len(), 1);
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
        assert_eq!(index.stored_blobs_of_epoch(1, &all).1, LostBlobs::default());
    }
}
