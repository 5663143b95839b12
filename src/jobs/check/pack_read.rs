//! `check --read-data` of one pack, read in windows rather than whole.
//!
//! A pack is up to 144 MiB (the largest a policy asks for, plus one blob) and
//! four are checked at once: read whole, they were most of a check's memory.
//! Here the pack's tail is read first (trailer and sealed directory, about
//! 45 bytes a blob) and the directory authenticated under the header of the
//! first window; then the pack is read [`WINDOW`] bytes at a time, in order,
//! and every blob the directory lists is verified (decrypted, decompressed,
//! hashed to its id) as soon as its bytes are in, then dropped. The directory
//! lists the blobs back to back from the header to itself (checked when it
//! is parsed), so a pack being checked holds one window, the part of a blob
//! it cut and the directory. What is verified is what a whole read verified:
//! the header, the directory against the index, every blob of the directory.
//! Each read states the object's size and ETag: a pack that changes size or
//! version between the listing and the last window is corrupt, as a whole
//! read of another length was.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{Error, ErrorKind, Result};
use crate::format::ids::PackId;
use crate::format::pack::{PackEntry, TRAILER_LEN, directory_range, open_blob, open_directory};
use crate::format::seal::{HEADER_LEN, Header, ObjectKind, Opener};
use crate::keys::derive::EpochKeys;
use crate::repo::{Fault, Repo, is_object_fault};
use crate::store::ObjectName;

/// Bytes of a pack taken at a time from its one sequential read (not a
/// request each): four packs in flight hold four windows.
const WINDOW: u64 = 4 << 20;
/// The pack's end read first: its trailer and, for packs of up to about
/// 23,000 blobs, its whole directory in the same request.
const TAIL: u64 = 1 << 20;

/// Reads one pack and verifies everything in it. Returns the bytes read and
/// the faults found; an error only for what is not the pack's fault.
pub(super) async fn read_pack(
    repo: &Repo,
    pack: PackId,
    size: u64,
    expected: Vec<PackEntry>,
    epoch: Option<u32>,
) -> Result<(u64, Vec<Fault>)> {
    let name = ObjectName::Pack(pack);
    let object = repo.store().display(&name);
    let fault = |kind: ErrorKind, message: String| Fault {
        object: object.clone(),
        kind,
        message,
    };
    if size == 0 {
        return Ok((
            0,
            vec![fault(ErrorKind::CorruptObject, "pack is empty".into())],
        ));
    }
    let mut read = 0u64;
    // The tail's ETag, once read: every later read must be of that version.
    let mut version: Option<String> = None;
    macro_rules! fetch {
        ($range:expr) => {{
            let range: Range<u64> = $range;
            match repo
                .store()
                .get_range_of(&name, range, size, version.as_deref())
                .await
            {
                Ok((bytes, e_tag)) => {
                    read += bytes.len() as u64;
                    (bytes, e_tag)
                }
                Err(e) if is_object_fault(&e) => {
                    return Ok((read, vec![Fault::from_error(&object, &e)]));
                }
                Err(e) => return Err(e),
            }
        }};
    }
    macro_rules! sealed_fault {
        ($e:expr) => {
            return Ok((read, vec![Fault::from_error(&object, &$e.at(&object))]))
        };
    }
    let (window_len, tail_len) = crate::hooks::check_window((WINDOW, TAIL));
    // The first window holds the whole header; the tail, the whole trailer.
    let window_len = window_len.max(HEADER_LEN as u64);
    let tail_len = tail_len.max(TRAILER_LEN as u64);
    let tail_at = match size.checked_sub(tail_len) {
        Some(at) if at >= HEADER_LEN as u64 => at,
        _ => 0,
    };
    let (tail, e_tag) = fetch!(tail_at..size);
    version = e_tag;
    // The rest in one request, taken a window at a time: it must be the
    // version the tail came from.
    let mut rest = repo
        .store()
        .read_sequential(name.clone(), size)
        .until(tail_at)
        .of_version(version.clone());
    macro_rules! next_window {
        ($len:expr) => {{
            match rest.take($len).await {
                Ok(bytes) => {
                    read += bytes.len() as u64;
                    bytes.freeze()
                }
                Err(e) if is_object_fault(&e) => {
                    return Ok((read, vec![Fault::from_error(&object, &e)]));
                }
                Err(e) => return Err(e),
            }
        }};
    }
    let first = match tail_at {
        0 => tail.clone(),
        _ => next_window!(tail_at.min(window_len)),
    };
    let header_epoch = match Header::peek_epoch(&first) {
        Ok(e) => e,
        Err(e) => sealed_fault!(e),
    };
    let epoch = epoch.unwrap_or(header_epoch);
    // (A pack of a new epoch that a backup beside this check started is known
    // to the descriptor now in the store.)
    if !repo.knows_epoch(epoch).await? {
        return Ok((
            read,
            vec![fault(
                ErrorKind::CorruptObject,
                format!("sealed under unknown epoch {epoch}"),
            )],
        ));
    }
    let keys = repo.epoch_keys(epoch).await?;
    let opener = match Opener::new(&keys, ObjectKind::Pack, Some(&pack.0), &first) {
        Ok(o) => o,
        Err(e) => sealed_fault!(e),
    };
    let trailer = &tail[tail.len().saturating_sub(TRAILER_LEN)..];
    let (n, dir) = match directory_range(size, trailer) {
        Ok(v) => v,
        Err(e) => sealed_fault!(e),
    };
    let sealed_dir = if dir.start >= tail_at {
        tail.slice((dir.start - tail_at) as usize..(dir.end - tail_at) as usize)
    } else {
        let mut joined = fetch!(dir.start..tail_at).0.to_vec();
        joined.extend_from_slice(&tail[..(dir.end - tail_at) as usize]);
        Bytes::from(joined)
    };
    let entries = match open_directory(&opener, n, &sealed_dir, size) {
        Ok(entries) => entries,
        Err(e) => sealed_fault!(e),
    };
    drop(sealed_dir);
    let mut verifier = PackVerifier::new(keys, opener, entries, &expected);
    // The blobs end where the directory starts; the tail already holds
    // whatever of them lies past `tail_at`.
    let blobs_end = dir.start;
    let mut window = first;
    loop {
        verifier = blocking(move || {
            verifier.feed(window);
            verifier
        })
        .await?;
        let from = verifier.received;
        if from >= blobs_end {
            break;
        }
        window = if from >= tail_at {
            tail.slice((from - tail_at) as usize..(blobs_end - tail_at) as usize)
        } else {
            debug_assert_eq!(from, rest.position(), "windows are taken in order");
            next_window!((from + window_len).min(tail_at).min(blobs_end) - from)
        };
    }
    drop(tail);
    let faults = blocking(move || verifier.finish(&object)).await?;
    Ok((read, faults))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("check worker panicked: {e}")))
}

/// The verification of one pack whose directory is open, fed its bytes in
/// order.
struct PackVerifier {
    keys: Arc<EpochKeys>,
    opener: Opener,
    /// The directory's entries, back to back from the header (as
    /// `open_directory` checked); `next` is the first not yet verified.
    entries: Vec<PackEntry>,
    next: usize,
    /// Bytes received: the pack's `0..received`.
    received: u64,
    /// The received start of the blob `next` when a window cut it.
    pending: Vec<u8>,
    faults: Vec<String>,
}

impl PackVerifier {
    /// Compares the index's entries for this pack with its directory first.
    fn new(
        keys: Arc<EpochKeys>,
        opener: Opener,
        entries: Vec<PackEntry>,
        expected: &[PackEntry],
    ) -> Self {
        let by_segment: BTreeMap<u32, &PackEntry> =
            entries.iter().map(|e| (e.segment, e)).collect();
        let faults = expected
            .iter()
            .filter(|want| by_segment.get(&want.segment).copied() != Some(*want))
            .map(|want| {
                format!(
                    "index entry for blob {} disagrees with the pack directory",
                    want.id.short()
                )
            })
            .collect();
        PackVerifier {
            keys,
            opener,
            entries,
            next: 0,
            received: 0,
            pending: Vec::new(),
            faults,
        }
    }

    /// Takes the next bytes of the pack (`received..`) and verifies every
    /// blob they complete. A blob the last window cut is completed by copying
    /// only its rest: a window itself is never copied.
    fn feed(&mut self, window: Bytes) {
        let mut at = self.received;
        self.received += window.len() as u64;
        let mut window = &window[..];
        if !self.pending.is_empty() {
            let Some(e) = self.entries.get(self.next).copied() else {
                return;
            };
            let have = self.pending.len() as u64;
            let take = (u64::from(e.sealed_len) - have).min(window.len() as u64) as usize;
            self.pending.reserve_exact(take);
            self.pending.extend_from_slice(&window[..take]);
            window = &window[take..];
            at += take as u64;
            if (self.pending.len() as u64) < u64::from(e.sealed_len) {
                return;
            }
            let sealed = std::mem::take(&mut self.pending);
            self.verify(&e, &sealed);
            self.next += 1;
        }
        while let Some(e) = self.entries.get(self.next).copied() {
            let (from, to) = (
                u64::from(e.offset),
                u64::from(e.offset) + u64::from(e.sealed_len),
            );
            let end = at + window.len() as u64;
            if from >= end {
                break;
            }
            // `from >= at`: blobs are back to back and `at` is where the
            // last one ended (or the header, before the first).
            let start = from.saturating_sub(at) as usize;
            if to > end {
                self.pending = Vec::with_capacity(e.sealed_len as usize);
                self.pending.extend_from_slice(&window[start..]);
                break;
            }
            self.verify(&e, &window[start..(to - at) as usize]);
            self.next += 1;
        }
    }

    fn verify(&mut self, e: &PackEntry, sealed: &[u8]) {
        if let Err(err) = open_blob(&self.opener, &self.keys, e, sealed) {
            self.faults.push(format!("blob {}: {err}", e.id.short()));
        }
    }

    /// The faults found: index entries the directory contradicts, and blobs
    /// that did not open as their entry says (or were never received).
    fn finish(mut self, object: &str) -> Vec<Fault> {
        for e in &self.entries[self.next..] {
            self.faults
                .push(format!("blob {}: its bytes were not read", e.id.short()));
        }
        self.faults
            .into_iter()
            .map(|message| Fault {
                object: object.to_string(),
                kind: ErrorKind::CorruptObject,
                message,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::format::pack::{BlobKind, FinishedPack, testing};

    fn keys() -> Arc<EpochKeys> {
        Arc::new(testing::keys())
    }

    fn pack(keys: &EpochKeys) -> FinishedPack {
        // Compressible and not, of different lengths.
        let blobs: Vec<Vec<u8>> = (0..12u32)
            .map(|i| match i % 2 {
                0 => vec![i as u8; 300 + 50 * i as usize],
                _ => (0..200 + 37 * i)
                    .map(|j| (j.wrapping_mul(2_654_435_761) >> 13) as u8)
                    .collect(),
            })
            .collect();
        testing::build(keys, &blobs)
    }

    /// Opens the directory as `read_pack` does, then feeds the blobs in
    /// windows of `window` (the first `fed` bytes only, when given); returns
    /// the faults and the most bytes `pending` held.
    fn verify(
        keys: &Arc<EpochKeys>,
        p: &FinishedPack,
        bytes: &[u8],
        expected: &[PackEntry],
        window: usize,
        fed: Option<usize>,
    ) -> (Vec<Fault>, usize) {
        let opener = Opener::new(keys, ObjectKind::Pack, Some(&p.id.0), bytes).expect("header");
        let len = bytes.len() as u64;
        let (n, dir) = directory_range(len, &bytes[bytes.len() - TRAILER_LEN..]).expect("trailer");
        let sealed = &bytes[dir.start as usize..dir.end as usize];
        let entries = open_directory(&opener, n, sealed, len).expect("directory");
        let mut v = PackVerifier::new(keys.clone(), opener, entries, expected);
        let mut most = 0;
        let blobs = &bytes[..fed.unwrap_or(dir.start as usize)];
        for chunk in blobs.chunks(window) {
            v.feed(Bytes::copy_from_slice(chunk));
            most = most.max(v.pending.len());
        }
        (v.finish("p"), most)
    }

    const WINDOWS: [usize; 6] = [1, 7, 64, 1000, 4096, usize::MAX];

    #[test]
    fn a_sound_pack_verifies_in_any_windows_holding_at_most_one_blob() {
        let k = keys();
        let p = pack(&k);
        let largest = p
            .entries
            .iter()
            .map(|e| e.sealed_len as usize)
            .max()
            .unwrap();
        for w in WINDOWS {
            let (faults, most) = verify(&k, &p, &p.bytes, &p.entries, w, None);
            assert_eq!(faults, vec![], "window {w}");
            assert!(most < largest, "window {w}: held {most} bytes");
        }
    }

    #[test]
    fn a_damaged_blob_is_named_once_in_any_windows() {
        let k = keys();
        let p = pack(&k);
        for hit in [p.entries[0], p.entries[5], p.entries[11]] {
            let mut bytes = p.bytes.clone();
            bytes[hit.offset as usize + 3] ^= 1;
            for w in WINDOWS {
                let (faults, _) = verify(&k, &p, &bytes, &p.entries, w, None);
                assert_eq!(faults.len(), 1, "window {w}: {faults:?}");
                assert!(
                    faults[0]
                        .message
                        .starts_with(&format!("blob {}:", hit.id.short()))
                );
                assert_eq!(faults[0].kind, ErrorKind::CorruptObject);
            }
        }
    }

    #[test]
    fn an_index_entry_the_directory_contradicts_is_named() {
        let k = keys();
        let p = pack(&k);
        let mut wrong_kind = p.entries.clone();
        wrong_kind[3].kind = BlobKind::Tree;
        let mut wrong_place = p.entries.clone();
        wrong_place[7].offset += 1;
        wrong_place[7].sealed_len -= 1;
        let mut unknown = p.entries.clone();
        unknown[9].segment = 40;
        for expected in [wrong_kind, wrong_place, unknown] {
            for w in WINDOWS {
                let (faults, _) = verify(&k, &p, &p.bytes, &expected, w, None);
                assert_eq!(faults.len(), 1, "window {w}: {faults:?}");
                assert!(
                    faults[0]
                        .message
                        .contains("disagrees with the pack directory")
                );
            }
        }
    }

    #[test]
    fn blobs_never_received_are_faults() {
        let k = keys();
        let p = pack(&k);
        let cut = p.entries[10].offset as usize + 5;
        let (faults, _) = verify(&k, &p, &p.bytes, &p.entries, 64, Some(cut));
        assert_eq!(faults.len(), 2, "{faults:?}");
        assert!(faults.iter().all(|f| f.message.contains("not read")));
    }

    proptest! {
        /// Any windows, any subset of the entries indexed: sound.
        #[test]
        fn any_windows_and_index_subset(window in 1usize..3000, keep in prop::collection::vec(any::<bool>(), 12)) {
            let k = keys();
            let p = pack(&k);
            let expected: Vec<PackEntry> =
                p.entries.iter().zip(&keep).filter(|(_, k)| **k).map(|(e, _)| *e).collect();
            let (faults, _) = verify(&k, &p, &p.bytes, &expected, window, None);
            prop_assert_eq!(faults, vec![]);
        }
    }
}
