//! Index files: which pack (and where in it) holds each blob.
//!
//! A sealed stream (kind 'I') whose plaintext is a zstd frame of:
//! `repeat { pack id[32] ‖ u32 BE n ‖ n × (blob id[32] ‖ kind u8 ‖ segment u32 BE
//! ‖ offset u32 BE ‖ sealed length u32 BE ‖ raw length u32 BE) }` until the end.
//! The index is a cache of what the pack directories say: `check` compares them.

use super::ids::{BlobId, IndexId, PackId};
use super::pack::{BlobKind, PackEntry};
use super::seal::{ObjectKind, Opener, SealError, Sealer, open_stream, seal_stream};
use crate::keys::derive::EpochKeys;

const ENTRY_LEN: usize = 32 + 1 + 4 * 4;

/// Blobs an index file written by custos holds at most (unless one pack
/// alone holds more: a pack's entries stay in one file). Loading an index
/// holds a few files at once, sealed, compressed, plain and parsed (about
/// 190 bytes a blob): small files keep that a few tens of MiB whatever the
/// repository's size, and far below the [`MAX_INDEX_PLAIN`] a reader accepts.
pub const MAX_FILE_BLOBS: usize = 16_384;

/// The entries of one index file, grouped by pack.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexFile {
    pub packs: Vec<(PackId, Vec<PackEntry>)>,
}

impl IndexFile {
    pub fn blob_count(&self) -> usize {
        self.packs.iter().map(|(_, e)| e.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.packs.is_empty()
    }

    /// The same entries as files of at most `max_blobs` blobs each (a pack
    /// with more alone in its file), packs in the same order.
    pub fn split(self, max_blobs: usize) -> Vec<IndexFile> {
        let mut files = Vec::new();
        let mut current = IndexFile::default();
        let mut blobs = 0;
        for (pack, entries) in self.packs {
            if !current.is_empty() && blobs + entries.len() > max_blobs {
                files.push(std::mem::take(&mut current));
                blobs = 0;
            }
            blobs += entries.len();
            current.packs.push((pack, entries));
        }
        if !current.is_empty() {
            files.push(current);
        }
        files
    }

    fn encode_plain(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.packs.len() * 36 + self.blob_count() * ENTRY_LEN);
        for (pack, entries) in &self.packs {
            out.extend_from_slice(&pack.0);
            out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
            for e in entries {
                out.extend_from_slice(&e.id.0);
                out.push(e.kind as u8);
                out.extend_from_slice(&e.segment.to_be_bytes());
                out.extend_from_slice(&e.offset.to_be_bytes());
                out.extend_from_slice(&e.sealed_len.to_be_bytes());
                out.extend_from_slice(&e.raw_len.to_be_bytes());
            }
        }
        out
    }

    fn decode_plain(mut p: &[u8]) -> Result<Self, SealError> {
        let bad = |m: &str| SealError::Malformed(format!("index: {m}"));
        let mut packs = Vec::new();
        while !p.is_empty() {
            if p.len() < 36 {
                return Err(bad("truncated pack group"));
            }
            let pack = PackId(p[..32].try_into().expect("32"));
            let n = u32::from_be_bytes(p[32..36].try_into().expect("4")) as usize;
            p = &p[36..];
            let need = n
                .checked_mul(ENTRY_LEN)
                .filter(|&l| l <= p.len())
                .ok_or_else(|| bad("truncated entries"))?;
            let mut entries = Vec::with_capacity(n);
            for rec in p[..need].chunks_exact(ENTRY_LEN) {
                let be =
                    |r: std::ops::Range<usize>| u32::from_be_bytes(rec[r].try_into().expect("4"));
                entries.push(PackEntry {
                    id: BlobId(rec[..32].try_into().expect("32")),
                    kind: BlobKind::from_byte(rec[32]).ok_or_else(|| bad("unknown blob kind"))?,
                    segment: be(33..37),
                    offset: be(37..41),
                    sealed_len: be(41..45),
                    raw_len: be(45..49),
                });
            }
            p = &p[need..];
            packs.push((pack, entries));
        }
        Ok(IndexFile { packs })
    }

    /// Seals this index as a new object; returns its id and bytes.
    pub fn seal(&self, keys: &EpochKeys) -> (IndexId, Vec<u8>) {
        let compressed =
            zstd::bulk::compress(&self.encode_plain(), 3).expect("zstd on memory does not fail");
        let sealer = Sealer::new(keys, ObjectKind::Index);
        (
            IndexId(*sealer.object_id()),
            seal_stream(&sealer, &compressed),
        )
    }

    /// Opens an index object named `id`.
    pub fn open(keys: &EpochKeys, id: &IndexId, bytes: &[u8]) -> Result<Self, SealError> {
        let opener = Opener::new(keys, ObjectKind::Index, Some(&id.0), bytes)?;
        let compressed = open_stream(&opener, bytes)?;
        let plain = decompress_bounded(&compressed, MAX_INDEX_PLAIN)?;
        Self::decode_plain(&plain)
    }
}

/// An index file never needs more than this much plaintext (about 5 M blobs).
const MAX_INDEX_PLAIN: usize = 256 << 20;

/// Decompresses a zstd frame, refusing to expand past `limit` bytes (a hostile
/// object must not exhaust memory).
pub fn decompress_bounded(compressed: &[u8], limit: usize) -> Result<Vec<u8>, SealError> {
    use std::io::Read;
    let mut out = Vec::new();
    let decoder = zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| SealError::Malformed(format!("zstd: {e}")))?;
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| SealError::Malformed(format!("zstd: {e}")))?;
    if out.len() > limit {
        return Err(SealError::Malformed(format!(
            "expands beyond {limit} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SecretKey;
    use crate::tenant::TenantId;

    /// Whole packs, in order, at most `max` blobs a file unless one pack
    /// alone has more; nothing lost or repeated.
    #[test]
    fn split_keeps_packs_whole_and_files_small() {
        let pack = |p: u8, n: usize| {
            let entries = (0..n)
                .map(|i| PackEntry {
                    id: BlobId([p ^ i as u8; 32]),
                    kind: BlobKind::Data,
                    segment: i as u32,
                    offset: 0,
                    sealed_len: 1,
                    raw_len: 1,
                })
                .collect();
            (PackId([p; 32]), entries)
        };
        let file = IndexFile {
            packs: vec![pack(1, 3), pack(2, 2), pack(3, 9), pack(4, 1), pack(5, 4)],
        };
        let sizes = |files: &[IndexFile]| -> Vec<Vec<usize>> {
            files
                .iter()
                .map(|f| f.packs.iter().map(|(_, e)| e.len()).collect())
                .collect()
        };
        let files = file.clone().split(5);
        assert_eq!(sizes(&files), vec![vec![3, 2], vec![9], vec![1, 4]]);
        let joined: Vec<_> = files.into_iter().flat_map(|f| f.packs).collect();
        assert_eq!(joined, file.packs);
        assert_eq!(sizes(&file.clone().split(100)), vec![vec![3, 2, 9, 1, 4]]);
        assert!(IndexFile::default().split(5).is_empty());
    }

    #[test]
    fn index_round_trip() {
        let k = EpochKeys::new(
            TenantId::new("acme").unwrap(),
            1,
            SecretKey::from_bytes([5; 32]),
        );
        let entry = |i: u8| PackEntry {
            id: BlobId([i; 32]),
            kind: BlobKind::Data,
            segment: i as u32,
            offset: 84 + i as u32 * 100,
            sealed_len: 100,
            raw_len: 1000,
        };
        let idx = IndexFile {
            packs: vec![
                (PackId([1; 32]), vec![entry(0), entry(1)]),
                (PackId([2; 32]), vec![entry(2)]),
            ],
        };
        let (id, bytes) = idx.seal(&k);
        assert_eq!(IndexFile::open(&k, &id, &bytes).unwrap(), idx);
        assert!(IndexFile::open(&k, &IndexId([0; 32]), &bytes).is_err());
        let empty = IndexFile::default();
        let (id, bytes) = empty.seal(&k);
        assert_eq!(IndexFile::open(&k, &id, &bytes).unwrap(), empty);
    }
}
