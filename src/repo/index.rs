//! The in-memory index of a tenant: every blob's location, loaded from all
//! index files. Ids are keyed per epoch, so blobs of different epochs never
//! collide and one map serves them all.

use crate::format::ids::{BlobId, IdMap, IndexId, PackId};
use crate::format::index::IndexFile;
use crate::format::pack::{BlobKind, PackEntry};

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
    pack_slots: IdMap<PackId, u32>,
    blobs: IdMap<BlobId, Location>,
    /// Index files loaded, with their epoch.
    pub files: Vec<(IndexId, u32)>,
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
            (self.packs.len() - 1) as u32
        });
        for e in entries {
            // Duplicates (after an interrupted repack) are harmless: keep the first.
            self.blobs.entry(e.id).or_insert(Location {
                pack: slot,
                segment: e.segment,
                offset: e.offset,
                sealed_len: e.sealed_len,
                raw_len: e.raw_len,
                kind: e.kind,
            });
        }
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

    /// Blob ids of one epoch: the deduplication set of a backup in that epoch.
    pub fn blob_ids_of_epoch(&self, epoch: u32) -> crate::format::ids::IdSet<BlobId> {
        self.blobs
            .iter()
            .filter(|(_, l)| self.packs[l.pack as usize].1 == epoch)
            .map(|(id, _)| *id)
            .collect()
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
