//! Snapshot manifests: one small sealed object per snapshot (kind 'S'),
//! holding a zstd frame of one JSON document: when, what, the summary, and
//! the tree blobs that list its entries. Written last, after every pack and
//! index it depends on, so a snapshot never names missing data.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ids::{BlobId, SnapshotId};
use super::index::decompress_bounded;
use super::seal::{ObjectKind, Opener, SealError, Sealer, open_stream, seal_stream};
use crate::keys::derive::EpochKeys;
use crate::tenant::TenantId;

pub const SNAPSHOT_FORMAT: u32 = 1;
const MAX_SNAPSHOT_PLAIN: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub format: u32,
    pub id: SnapshotId,
    pub tenant: TenantId,
    pub epoch: u32,
    pub time: DateTime<Utc>,
    pub hostname: String,
    pub parent: Option<SnapshotId>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub sources: Vec<SourceRecord>,
    /// Tree blobs, in order; their concatenation is the JSON-lines entry stream.
    pub tree: Vec<BlobId>,
    pub summary: Summary,
    pub chunker: ChunkerParams,
    pub custos_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceRecord {
    pub name: String,
    /// "path", "command" or "object_store".
    pub kind: String,
    /// Where it came from (a directory, an argv, a URL), for operators.
    pub origin: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Total size of all files in the snapshot.
    pub bytes_in: u64,
    /// Files read (not reused unchanged from the parent snapshot).
    pub files_read: u64,
    /// Raw bytes of blobs new to the repository.
    pub bytes_new: u64,
    /// Bytes written to the store for this snapshot's data (packs + index).
    pub bytes_stored: u64,
    pub blobs_new: u64,
    pub packs_new: u64,
    /// Fifos, sockets and devices, which are not backed up.
    pub skipped_special: u64,
    /// Files that could not be read (only with `allow_unreadable`).
    pub unreadable: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Snapshot {
    pub fn seal(&self, keys: &EpochKeys) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("snapshots serialise");
        let compressed = zstd::bulk::compress(&json, 3).expect("zstd on memory does not fail");
        seal_stream(
            &Sealer::with_id(keys, ObjectKind::Snapshot, self.id.0),
            &compressed,
        )
    }

    /// Opens the snapshot object named `id`, checking the document agrees with
    /// its name, tenant and epoch.
    pub fn open(keys: &EpochKeys, id: &SnapshotId, bytes: &[u8]) -> Result<Self, SealError> {
        let opener = Opener::new(keys, ObjectKind::Snapshot, Some(&id.0), bytes)?;
        let compressed = open_stream(&opener, bytes)?;
        let plain = decompress_bounded(&compressed, MAX_SNAPSHOT_PLAIN)?;
        let snap: Snapshot = serde_json::from_slice(&plain)
            .map_err(|e| SealError::Malformed(format!("snapshot: {e}")))?;
        if snap.format != SNAPSHOT_FORMAT {
            return Err(SealError::Malformed(format!(
                "unsupported snapshot format {}",
                snap.format
            )));
        }
        if snap.id != *id || &snap.tenant != keys.tenant() || snap.epoch != keys.epoch() {
            return Err(SealError::Malformed(
                "snapshot document disagrees with its name, tenant or epoch".into(),
            ));
        }
        Ok(snap)
    }
}
