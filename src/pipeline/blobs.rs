//! The read side of the data path for single blobs and runs of blobs of one
//! pack (tree blobs, repacking): fetch the pack header and the blobs in one
//! ranged request, check the key commitment, decrypt, decompress, and verify
//! each blob hashes to its id.

use std::ops::Range;

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::format::ids::{BlobId, PackId};
use crate::format::pack::{PackEntry, open_blob};
use crate::format::seal::{HEADER_LEN, ObjectKind, Opener};
use crate::keys::derive::EpochKeys;
use crate::repo::{Index, Location, Repo};
use crate::store::{ObjectName, TenantStore};

/// Reads byte ranges of a pack. A pack shorter than its index says may be
/// another tenant's pack moved here, or one renamed: its header then tells
/// why, and that is the error reported rather than "truncated".
pub async fn get_pack_ranges(
    store: &TenantStore,
    keys: &EpochKeys,
    pack: PackId,
    ranges: &[Range<u64>],
) -> Result<Vec<Bytes>> {
    let name = ObjectName::Pack(pack);
    match store.get_ranges(&name, ranges).await {
        Err(short @ Error::Corrupt { .. }) => {
            let Ok(header) = store.get_range(&name, 0..HEADER_LEN as u64).await else {
                return Err(short);
            };
            match Opener::new(keys, ObjectKind::Pack, Some(&pack.0), &header) {
                Err(e) => Err(e.at(store.display(&name))),
                Ok(_) => Err(short),
            }
        }
        other => other,
    }
}

/// Reads one blob's plaintext.
pub async fn read_blob(repo: &Repo, index: &Index, id: &BlobId) -> Result<Vec<u8>> {
    let mut out = read_blobs(repo, index, std::slice::from_ref(id)).await?;
    out.pop()
        .map(|(plain, _)| plain)
        .ok_or_else(|| Error::Internal("a blob read returned nothing".into()))
}

/// Reads the plaintexts of blobs that lie in one pack, in order, with one
/// `get_ranges` call: the pack header once and every blob's range (an S3
/// client sends ranges less than 1 MiB apart as one GET). Blobs of another
/// pack are refused.
pub async fn read_blobs(
    repo: &Repo,
    index: &Index,
    ids: &[BlobId],
) -> Result<Vec<(Vec<u8>, Location)>> {
    fetch(repo, index, &locate(repo, index, ids)?, true).await
}

/// Reads one blob's frame (encoding byte ‖ payload) after authenticating it,
/// without decompressing: used to move blobs between packs.
pub async fn read_frame(repo: &Repo, index: &Index, id: &BlobId) -> Result<(Vec<u8>, Location)> {
    let mut out = fetch(
        repo,
        index,
        &locate(repo, index, std::slice::from_ref(id))?,
        false,
    )
    .await?;
    out.pop()
        .ok_or_else(|| Error::Internal("a blob read returned nothing".into()))
}

fn locate(repo: &Repo, index: &Index, ids: &[BlobId]) -> Result<Vec<(BlobId, Location)>> {
    ids.iter()
        .map(|id| {
            let loc = *index.get(id).ok_or_else(|| {
                Error::missing(
                    format!("blob {id} of tenant {}", repo.tenant()),
                    "not in any index file",
                )
            })?;
            Ok((*id, loc))
        })
        .collect()
}

async fn fetch(
    repo: &Repo,
    index: &Index,
    blobs: &[(BlobId, Location)],
    decode: bool,
) -> Result<Vec<(Vec<u8>, Location)>> {
    let Some((_, first)) = blobs.first() else {
        return Ok(Vec::new());
    };
    let (pack, epoch) = index.pack(first);
    if blobs.iter().any(|(_, l)| l.pack != first.pack) {
        return Err(Error::Internal("blobs of several packs read as one".into()));
    }
    let name = ObjectName::Pack(pack);
    let object = repo.store().display(&name);
    let mut ranges = Vec::with_capacity(blobs.len() + 1);
    ranges.push(0..HEADER_LEN as u64);
    ranges.extend(blobs.iter().map(|(_, l)| {
        let start = l.offset as u64;
        start..start + l.sealed_len as u64
    }));
    let keys = repo.epoch_keys(epoch).await?;
    let mut parts = get_pack_ranges(repo.store(), &keys, pack, &ranges).await?;
    if parts.len() != ranges.len() {
        return Err(Error::corrupt(object, "pack read returned too few ranges"));
    }
    let header = parts.remove(0);
    for ((_, loc), sealed) in blobs.iter().zip(&parts) {
        if sealed.len() != loc.sealed_len as usize {
            return Err(Error::corrupt(
                object,
                "pack is shorter than its index says (truncated)",
            ));
        }
    }
    let blobs = blobs.to_vec();
    tokio::task::spawn_blocking(move || {
        let opener = Opener::new(&keys, ObjectKind::Pack, Some(&pack.0), &header)
            .map_err(|e| e.at(&object))?;
        blobs
            .iter()
            .zip(&parts)
            .map(|((id, loc), sealed)| open_one(&opener, &keys, &object, *id, *loc, sealed, decode))
            .collect()
    })
    .await
    .map_err(|e| Error::Internal(format!("blob decode panicked: {e}")))?
}

/// Authenticates one blob; `decode`: its plaintext, else its frame.
fn open_one(
    opener: &Opener,
    keys: &EpochKeys,
    object: &str,
    id: BlobId,
    loc: Location,
    sealed: &[u8],
    decode: bool,
) -> Result<(Vec<u8>, Location)> {
    let entry = PackEntry {
        id,
        kind: loc.kind,
        segment: loc.segment,
        offset: loc.offset,
        sealed_len: loc.sealed_len,
        raw_len: loc.raw_len,
    };
    if decode {
        return open_blob(opener, keys, &entry, sealed)
            .map(|p| (p, loc))
            .map_err(|e| e.at(object));
    }
    let mut buf = sealed.to_vec();
    opener
        .open_segment(loc.segment as u64, false, &mut buf)
        .map_err(|e| e.at(object))?;
    // Verify the content before moving it anywhere.
    let plain = crate::format::pack::decode_frame(&buf, loc.raw_len).map_err(|e| e.at(object))?;
    if keys.blob_id(&plain) != id.0 {
        return Err(Error::corrupt(
            object,
            format!("blob {} does not hash to its id", id.short()),
        ));
    }
    Ok((buf, loc))
}
