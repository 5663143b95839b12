//! The read side of the data path for single blobs (tree blobs, repacking):
//! fetch the pack header and the blob in one ranged request, check the key
//! commitment, decrypt, decompress, and verify the blob hashes to its id.

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
    let loc = *index.get(id).ok_or_else(|| {
        Error::missing(
            format!("blob {id} of tenant {}", repo.tenant()),
            "not in any index file",
        )
    })?;
    let (frame_or_plain, _) = fetch(repo, index, id, &loc, true).await?;
    Ok(frame_or_plain)
}

/// Reads one blob's frame (encoding byte ‖ payload) after authenticating it,
/// without decompressing: used to move blobs between packs.
pub async fn read_frame(repo: &Repo, index: &Index, id: &BlobId) -> Result<(Vec<u8>, Location)> {
    let loc = *index.get(id).ok_or_else(|| {
        Error::missing(
            format!("blob {id} of tenant {}", repo.tenant()),
            "not in any index file",
        )
    })?;
    fetch(repo, index, id, &loc, false).await
}

async fn fetch(
    repo: &Repo,
    index: &Index,
    id: &BlobId,
    loc: &Location,
    decode: bool,
) -> Result<(Vec<u8>, Location)> {
    let (pack, epoch) = index.pack(loc);
    let name = ObjectName::Pack(pack);
    let object = repo.store().display(&name);
    let start = loc.offset as u64;
    let ranges = [0..HEADER_LEN as u64, start..start + loc.sealed_len as u64];
    let keys = repo.epoch_keys(epoch).await?;
    let parts = get_pack_ranges(repo.store(), &keys, pack, &ranges).await?;
    let (header, sealed) = (parts[0].clone(), parts[1].clone());
    if sealed.len() != loc.sealed_len as usize {
        return Err(Error::corrupt(
            object,
            "pack is shorter than its index says (truncated)",
        ));
    }
    let id = *id;
    let loc = *loc;
    tokio::task::spawn_blocking(move || {
        let opener = Opener::new(&keys, ObjectKind::Pack, Some(&pack.0), &header)
            .map_err(|e| e.at(&object))?;
        let entry = PackEntry {
            id,
            kind: loc.kind,
            segment: loc.segment,
            offset: loc.offset,
            sealed_len: loc.sealed_len,
            raw_len: loc.raw_len,
        };
        if decode {
            open_blob(&opener, &keys, &entry, &sealed)
                .map(|p| (p, loc))
                .map_err(|e| e.at(&object))
        } else {
            let mut buf = sealed.to_vec();
            opener
                .open_segment(loc.segment as u64, false, &mut buf)
                .map_err(|e| e.at(&object))?;
            // Verify the content before moving it anywhere.
            let plain =
                crate::format::pack::decode_frame(&buf, loc.raw_len).map_err(|e| e.at(&object))?;
            if keys.blob_id(&plain) != id.0 {
                return Err(Error::corrupt(
                    object,
                    format!("blob {} does not hash to its id", id.short()),
                ));
            }
            Ok((buf, loc))
        }
    })
    .await
    .map_err(|e| Error::Internal(format!("blob decode panicked: {e}")))?
}
