//! Checks restored files against the snapshot's manifest, from disk.
//!
//! The restore already authenticates and hashes every blob as it decrypts
//! it; this pass proves what actually landed on disk: each file is re-read,
//! cut at the blob boundaries the index gives (raw lengths), and each piece
//! must hash (keyed BLAKE3, [`EpochKeys::blob_id`]) to the blob id the tree
//! entry lists, and the file's size must match the entry. It catches a
//! restore that wrote to the wrong offset, a truncated or replaced file, and
//! anything that changed the files between the restore and the check.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::ids::BlobId;
use crate::format::snapshot::Snapshot;
use crate::format::tree::EntryKind;
use crate::jobs::restore::FileSet;
use crate::keys::derive::EpochKeys;
use crate::pipeline::tree::TreeReader;
use crate::repo::{Index, Repo};

/// Files (and their bytes) that matched the manifest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    pub files: u64,
    pub bytes: u64,
}

/// Files checked per blocking task.
const BATCH_FILES: usize = 256;
const BATCH_BYTES: u64 = 256 << 20;

struct FileCheck {
    path: PathBuf,
    display: String,
    size: u64,
    blobs: Vec<(BlobId, u32)>,
}

/// Checks every file of `snapshot` restored under `dir` (only those in `only`,
/// if given) against the manifest. The first mismatch is a `corrupt_object`
/// error naming the file and the blob.
pub async fn verify_restored(
    repo: &Repo,
    index: &Index,
    keys: Arc<EpochKeys>,
    snapshot: &Snapshot,
    dir: &Path,
    only: Option<&FileSet>,
) -> Result<Verified> {
    let mut tree = TreeReader::new(
        repo,
        index,
        &snapshot.tree,
        format!("tree of snapshot {}", snapshot.id),
    );
    let mut total = Verified::default();
    let mut batch: Vec<FileCheck> = Vec::new();
    let mut batch_bytes = 0u64;
    while let Some(e) = tree.next_entry().await? {
        if e.kind != EntryKind::File || only.is_some_and(|s| !s.contains(&e.path)) {
            continue;
        }
        let mut blobs = Vec::with_capacity(e.blobs.len());
        for id in &e.blobs {
            let loc = index.get(id).ok_or_else(|| {
                Error::missing(
                    format!("blob {id} of tenant {}", repo.tenant()),
                    format!("needed by {} but in no index file", e.display_path()),
                )
            })?;
            blobs.push((*id, loc.raw_len));
        }
        batch_bytes += e.size;
        batch.push(FileCheck {
            path: dir.join(OsStr::from_bytes(&e.path)),
            display: e.display_path(),
            size: e.size,
            blobs,
        });
        if batch.len() >= BATCH_FILES || batch_bytes >= BATCH_BYTES {
            let v = check_batch(std::mem::take(&mut batch), keys.clone()).await?;
            total.files += v.files;
            total.bytes += v.bytes;
            batch_bytes = 0;
        }
    }
    let v = check_batch(batch, keys).await?;
    total.files += v.files;
    total.bytes += v.bytes;
    Ok(total)
}

async fn check_batch(batch: Vec<FileCheck>, keys: Arc<EpochKeys>) -> Result<Verified> {
    if batch.is_empty() {
        return Ok(Verified::default());
    }
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let mut v = Verified::default();
        for f in &batch {
            check_file(f, &keys, &mut buf)?;
            v.files += 1;
            v.bytes += f.size;
        }
        Ok(v)
    })
    .await
    .map_err(|e| Error::Internal(format!("drill verify worker panicked: {e}")))?
}

fn check_file(f: &FileCheck, keys: &EpochKeys, buf: &mut Vec<u8>) -> Result<()> {
    let what = || format!("restored file {}", f.display);
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&f.path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(Error::corrupt(what(), "not on disk after the restore"));
        }
        Err(e) => return Err(Error::io(&f.path, e)),
    };
    let meta = file.metadata().map_err(|e| Error::io(&f.path, e))?;
    if !meta.is_file() {
        return Err(Error::corrupt(what(), "is not a regular file"));
    }
    if meta.len() != f.size {
        return Err(Error::corrupt(
            what(),
            format!(
                "is {} bytes on disk, the manifest says {}",
                meta.len(),
                f.size
            ),
        ));
    }
    let listed: u64 = f.blobs.iter().map(|&(_, n)| u64::from(n)).sum();
    if listed != f.size {
        return Err(Error::corrupt(
            what(),
            format!(
                "its blobs add up to {listed} bytes, the manifest says {}",
                f.size
            ),
        ));
    }
    let mut offset = 0u64;
    for (i, &(id, len)) in f.blobs.iter().enumerate() {
        buf.resize(len as usize, 0);
        file.read_exact(buf).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => Error::corrupt(what(), "shorter than the manifest says"),
            _ => Error::io(&f.path, e),
        })?;
        if keys.blob_id(buf) != id.0 {
            return Err(Error::corrupt(
                what(),
                format!(
                    "bytes {offset}..{} (blob {} of {}, {}) do not hash to the blob id in the manifest",
                    offset + u64::from(len),
                    i + 1,
                    f.blobs.len(),
                    id.short()
                ),
            ));
        }
        offset += u64::from(len);
    }
    Ok(())
}
