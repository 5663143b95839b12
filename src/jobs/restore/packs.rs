//! A restore batch's pack reads: for each pack, the blobs the batch needs
//! and where each goes, read (streamed whole, or by ranges when little of
//! the pack is wanted), authenticated against the pack's header and
//! directory, decrypted, checked against their keyed ids and written at
//! their offsets into the batch's files.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::StreamExt;

use crate::error::{Error, Result};
use crate::format::ids::{BlobId, PackId};
use crate::format::pack::{
    PackEntry, TRAILER_LEN, directory_range, open_blob_in, open_directory, sealed_directory_len,
};
use crate::format::seal::{HEADER_LEN, ObjectKind, Opener};
use crate::keys::derive::EpochKeys;
use crate::pipeline::blobs::get_pack_ranges;
use crate::repo::Location;
use crate::store::tenant::SequentialRead;
use crate::store::{ObjectName, TenantStore};

/// Pack reads running at once: over S3, latency rather than bandwidth bounds
/// one. A streamed read holds only the runs of blobs it has received and not
/// yet written, so eight fit in the budget below.
pub(super) const PACKS_IN_FLIGHT: usize = 8;
/// What the pack reads may hold at once, in MiB: a streamed read takes a
/// share of this for each run of blobs until it is written (and for the
/// pack's directory), a ranged read one for the ranges it fetches (all of
/// it for ranges this large or larger).
const READ_BUDGET_MIB: u32 = 72;
/// The budget's unit: shares are counted in KiB.
const BUDGET_UNIT: u64 = 1 << 10;
/// Blobs closer than this in a pack are fetched in one range request.
const COALESCE_GAP: u64 = 256 << 10;
const MAX_RANGE: u64 = 16 << 20;
/// A pack this small is read whole whatever is wanted of it: its header,
/// blobs and directory would be two requests otherwise (object stores merge
/// ranges this close), and a request costs more than its bytes.
const SMALL_PACK: u64 = 1 << 20;
/// A streamed pack hands its blobs to the writer in runs of about this many
/// bytes (a larger blob is a run of its own), and keeps this much of its end
/// for the directory (a longer directory is read on its own).
const RUN_BYTES: u64 = 1 << 20;
const TAIL_KEEP: u64 = 1 << 20;
/// What a ranged read fetches of a pack's end with its blobs: the trailer
/// and a directory of up to about 5,800 blobs.
const RANGED_TAIL: u64 = 256 << 10;
/// Runs received and waiting for a streamed pack's writer.
const RUNS_QUEUED: usize = 2;

/// What the reads of every batch share: the read budget and the reads running.
#[derive(Clone)]
pub(super) struct ReadLimits {
    /// KiB the reads may hold ([`READ_BUDGET_MIB`]).
    budget: Arc<tokio::sync::Semaphore>,
    /// Reads running ([`PACKS_IN_FLIGHT`]).
    running: Arc<tokio::sync::Semaphore>,
}

impl ReadLimits {
    pub(super) fn new() -> Self {
        ReadLimits {
            budget: Arc::new(tokio::sync::Semaphore::new(
                (u64::from(READ_BUDGET_MIB) << 20).div_ceil(BUDGET_UNIT) as usize,
            )),
            running: Arc::new(tokio::sync::Semaphore::new(PACKS_IN_FLIGHT)),
        }
    }
}

/// Whether a pack of `size` bytes is read whole (streamed) for these blobs:
/// when at least half of its bytes are wanted, or it is small
/// ([`SMALL_PACK`]). Otherwise by ranges.
fn streams_whole(blobs: &[PlannedBlob], size: u64) -> bool {
    let wanted: u64 = blobs.iter().map(|b| b.loc.sealed_len as u64).sum();
    wanted.saturating_mul(2) >= size || size <= SMALL_PACK
}

/// Where the last of these blobs ends in its pack.
pub(super) fn last_end(blobs: &[PlannedBlob]) -> u64 {
    blobs.iter().map(PlannedBlob::end).max().unwrap_or(0)
}

/// The reads of one batch.
#[derive(Clone)]
pub(super) struct PackReads {
    store: TenantStore,
    keys: Arc<EpochKeys>,
    limits: ReadLimits,
    /// Set when the batch failed or was dropped: its writers stop.
    stop: Arc<AtomicBool>,
    /// Bytes written into the batch's files (progress).
    written: Arc<AtomicU64>,
    /// The batch's files, by their index in the plan.
    files: Arc<Vec<(Arc<File>, PathBuf)>>,
    /// What a streamed read keeps of a pack's end ([`TAIL_KEEP`]), and at
    /// most what a ranged read fetches of it ([`RANGED_TAIL`]).
    tail_keep: u64,
}

/// One pack to read: its id, its listed size (none: not in the store) and
/// the blobs wanted of it.
pub(super) type PackPlan = (PackId, Option<u64>, Vec<PlannedBlob>);

impl PackReads {
    pub(super) fn new(
        store: TenantStore,
        keys: Arc<EpochKeys>,
        limits: ReadLimits,
        stop: Arc<AtomicBool>,
        written: Arc<AtomicU64>,
        files: Arc<Vec<(Arc<File>, PathBuf)>>,
    ) -> Self {
        PackReads {
            store,
            keys,
            limits,
            stop,
            written,
            files,
            tail_keep: TAIL_KEEP,
        }
    }

    /// Reads every pack of the plan, [`PACKS_IN_FLIGHT`] at once across
    /// batches, each started only when it can run.
    pub(super) async fn read_all(self, packs: Vec<PackPlan>) -> Result<()> {
        let mut running = futures::stream::iter(packs)
            .map(|(pack, size, blobs)| self.clone().restore_pack(pack, size, blobs))
            .buffer_unordered(PACKS_IN_FLIGHT);
        while let Some(read) = running.next().await {
            read?;
        }
        Ok(())
    }

    /// Reads the needed parts of one pack and writes its blobs to their
    /// files. Most of it wanted (at least half its bytes) or small (up to
    /// [`SMALL_PACK`]): streamed whole, in one request. Otherwise the header
    /// and trailer first, then the blobs' coalesced ranges and the directory.
    async fn restore_pack(
        self,
        pack: PackId,
        size: Option<u64>,
        mut blobs: Vec<PlannedBlob>,
    ) -> Result<()> {
        blobs.sort_by_key(|b| b.loc.offset);
        let object = self.store.display(&ObjectName::Pack(pack));
        let size = size.ok_or_else(|| Error::missing(&object, "pack is not in the store"))?;
        let _running = self
            .limits
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Internal("restore reads closed".into()))?;
        match streams_whole(&blobs, size) {
            true => self.stream(pack, size, blobs).await,
            false => self.ranged(pack, size, blobs).await,
        }
    }

    /// Takes `bytes` of the read budget until the permit drops.
    async fn hold(&self, bytes: u64) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let all = (u64::from(READ_BUDGET_MIB) << 20).div_ceil(BUDGET_UNIT);
        let share = bytes.div_ceil(BUDGET_UNIT).clamp(1, all) as u32;
        self.limits
            .budget
            .clone()
            .acquire_many_owned(share)
            .await
            .map_err(|_| Error::Internal("restore read budget closed".into()))
    }

    /// Streams a pack front to back in one request: its header (whose pack
    /// it is), then each run of wanted blobs as it arrives, handed to a
    /// blocking writer that opens and writes them while the next run is
    /// received, then its directory, which must list every blob written as
    /// the index placed it. `size` is the listed size: the authenticated
    /// directory must account for it, so a pack truncated, extended or
    /// rearranged is caught, not only a bad blob. The files are put in
    /// place only after every read of their batch succeeded.
    async fn stream(self, pack: PackId, size: u64, blobs: Vec<PlannedBlob>) -> Result<()> {
        let name = ObjectName::Pack(pack);
        let object = self.store.display(&name);
        let mut read = self.store.read_sequential(name, size);
        let header = read.take(HEADER_LEN as u64).await?;
        let opener = Opener::new(&self.keys, ObjectKind::Pack, Some(&pack.0), &header)
            .map_err(|e| e.at(&object))?;
        let (tx, rx) = tokio::sync::mpsc::channel(RUNS_QUEUED);
        let writer = {
            let reads = self.clone();
            tokio::task::spawn_blocking(move || reads.write_streamed(opener, rx, size, &object))
        };
        let fed = self.feed(pack, &mut read, blobs, &tx).await;
        drop(tx);
        let wrote = writer
            .await
            .map_err(|e| Error::Internal(format!("restore worker failed: {e}")))?;
        match (fed, wrote) {
            // The target's error (a full disk) even when the store failed
            // too while the feed had not noticed the writer was gone.
            (_, Err(e @ Error::Io { .. })) => Err(e),
            // Otherwise a failed read is the cause (the writer then saw the
            // pack end early); a writer that failed first stopped the feed.
            (Err(e), _) => Err(e),
            (Ok(()), wrote) => wrote,
        }
    }

    /// The reading half of [`Self::stream`]: skips what no file needs,
    /// sends the runs of wanted blobs, then the directory. Returns early,
    /// without error, when the writer is gone (its error is the one to
    /// report) or the batch was dropped.
    async fn feed(
        &self,
        pack: PackId,
        read: &mut SequentialRead,
        blobs: Vec<PlannedBlob>,
        tx: &tokio::sync::mpsc::Sender<Streamed>,
    ) -> Result<()> {
        let object = self.store.display(&ObjectName::Pack(pack));
        let mut blobs = blobs.into_iter().peekable();
        while let Some(first) = blobs.next() {
            if self.stop.load(Ordering::Relaxed) || tx.is_closed() {
                return Ok(()); // the batch was dropped, or the writer failed
            }
            let start = first.loc.offset as u64;
            if start < read.position() {
                return Err(Error::corrupt(
                    &object,
                    format!(
                        "the index places blob {} at offset {start}, inside the pack header or another blob",
                        first.id.short()
                    ),
                ));
            }
            let mut end = first.end();
            let mut run = vec![first];
            // Overlapping blobs end the run; the check above refuses them.
            while let Some(next) = blobs.next_if(|b| {
                b.loc.offset as u64 >= end && b.end().saturating_sub(start) <= RUN_BYTES
            }) {
                end = next.end();
                run.push(next);
            }
            read.skip(start - read.position()).await?;
            let held = self.hold(end - start).await?;
            let bytes = read.take(end - start).await?;
            let run = Streamed::Run {
                start,
                bytes,
                blobs: run,
                _held: held,
            };
            if tx.send(run).await.is_err() {
                return Ok(());
            }
        }
        let blobs_end = read.position();
        let size = read.size();
        let rest = size - blobs_end;
        if rest < TRAILER_LEN as u64 {
            return Err(past_the_blobs(&object, blobs_end));
        }
        let keep = rest.min(self.tail_keep.max(TRAILER_LEN as u64));
        read.skip(rest - keep).await?;
        let held = self.hold(keep).await?;
        let tail = read.take(keep).await?.freeze();
        let trailer = tail
            .get(tail.len().saturating_sub(TRAILER_LEN)..)
            .unwrap_or(&[]);
        let (n, dir_range) = directory_range(size, trailer).map_err(|e| e.at(&object))?;
        if blobs_end > dir_range.start {
            return Err(past_the_blobs(&object, blobs_end));
        }
        let tail_start = size - keep;
        let (sealed, held) = match dir_range.start.checked_sub(tail_start) {
            Some(from) => (
                tail.slice(from as usize..(dir_range.end - tail_start) as usize),
                held,
            ),
            None => {
                drop((tail, held));
                let held = self.hold(dir_range.end - dir_range.start).await?;
                let dir = get_pack_ranges(&self.store, &self.keys, pack, &[dir_range])
                    .await?
                    .pop()
                    .ok_or_else(|| Error::corrupt(&object, "pack read returned no directory"))?;
                (dir, held)
            }
        };
        let directory = Streamed::Directory {
            n,
            sealed,
            _held: held,
        };
        let _ = tx.send(directory).await; // a writer gone has its own error
        Ok(())
    }

    /// The writing half of [`Self::stream`], on a blocking thread. A blob
    /// that fails to open is reported once the directory has arrived, so an
    /// index entry that disagrees with the pack is named as such.
    fn write_streamed(
        self,
        opener: Opener,
        mut runs: tokio::sync::mpsc::Receiver<Streamed>,
        size: u64,
        object: &str,
    ) -> Result<()> {
        let mut opened: Vec<PackEntry> = Vec::new();
        let mut plain = Vec::new(); // reused: one allocation for the pack's blobs
        let mut failed: Option<(PackEntry, Error)> = None;
        while let Some(part) = runs.blocking_recv() {
            match part {
                Streamed::Run {
                    start,
                    mut bytes,
                    blobs,
                    _held,
                } => {
                    for b in blobs {
                        if self.stop.load(Ordering::Relaxed) {
                            return Ok(()); // the batch failed or was dropped: its files are gone
                        }
                        if failed.is_some() {
                            break;
                        }
                        let from = (b.loc.offset as u64 - start) as usize;
                        let sealed = &mut bytes[from..from + b.loc.sealed_len as usize];
                        let entry = b.entry();
                        match open_blob_in(&opener, &self.keys, &entry, sealed, &mut plain) {
                            Ok(opened_plain) => {
                                self.write_blob(opened_plain, &b.targets)?;
                                opened.push(entry);
                            }
                            Err(e) => failed = Some((entry, e.at(object))),
                        }
                    }
                }
                Streamed::Directory { n, sealed, _held } => {
                    let directory =
                        open_directory(&opener, n, &sealed, size).map_err(|e| e.at(object))?;
                    let listed = |e: &PackEntry| directory.get(e.segment as usize) == Some(e);
                    let failed_entry = failed.as_ref().map(|(entry, _)| entry);
                    if let Some(e) = opened.iter().chain(failed_entry).find(|e| !listed(e)) {
                        return Err(disagrees(object, e));
                    }
                    return failed.map_or(Ok(()), |(_, e)| Err(e));
                }
            }
        }
        match (failed, self.stop.load(Ordering::Relaxed)) {
            (Some((_, e)), _) => Err(e),
            (None, true) => Ok(()),
            // Only when the feed failed, whose error is the one reported.
            (None, false) => Err(Error::Internal(format!(
                "{object}: the read stopped before the pack's directory"
            ))),
        }
    }

    /// Reads a pack of which little is wanted by ranges ([`Self::read_ranges`]),
    /// held whole until written; every blob's index entry is checked against
    /// the directory before the blob is opened.
    async fn ranged(self, pack: PackId, size: u64, blobs: Vec<PlannedBlob>) -> Result<()> {
        let object = self.store.display(&ObjectName::Pack(pack));
        let Fetched {
            opener,
            n,
            dir,
            ranges,
            parts,
            _held,
        } = self.read_ranges(pack, size, &blobs).await?;
        tokio::task::spawn_blocking(move || -> Result<()> {
            let directory = open_directory(&opener, n, &dir, size).map_err(|e| e.at(&object))?;
            // Both reused from blob to blob: the sealed copy opened in place
            // and the plaintext.
            let (mut sealed, mut plain) = (Vec::new(), Vec::new());
            // Blobs and ranges are both in offset order: the range holding a
            // blob is the current one or a later one.
            let mut ri = 0;
            for b in &blobs {
                if self.stop.load(Ordering::Relaxed) {
                    return Ok(()); // the batch failed or was dropped: its files are gone
                }
                let (start, end) = (b.loc.offset as u64, b.end());
                while ranges.get(ri).is_some_and(|r| r.end < end) {
                    ri += 1;
                }
                let range = ranges.get(ri).expect("every blob is in a planned range");
                let part = parts[ri]
                    .get((start - range.start) as usize..(end - range.start) as usize)
                    .ok_or_else(|| {
                        Error::corrupt(&object, "pack is shorter than its index says (truncated)")
                    })?;
                let entry = b.entry();
                if directory.get(b.loc.segment as usize) != Some(&entry) {
                    return Err(disagrees(&object, &entry));
                }
                sealed.clear();
                sealed.extend_from_slice(part);
                let opened = open_blob_in(&opener, &self.keys, &entry, &mut sealed, &mut plain)
                    .map_err(|e| e.at(&object))?;
                self.write_blob(opened, &b.targets)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("restore worker failed: {e}")))?
    }

    /// Reads what a restore needs of a pack by ranges, in one round: the
    /// header, the blobs' coalesced ranges and the pack's end (its trailer,
    /// and its directory when that is no longer than [`RANGED_TAIL`] allows;
    /// a longer one takes a second round), with their share of the budget
    /// held.
    async fn read_ranges(&self, pack: PackId, size: u64, blobs: &[PlannedBlob]) -> Result<Fetched> {
        let (store, keys) = (&self.store, &*self.keys);
        let object = store.display(&ObjectName::Pack(pack));
        // Blobs the index places where the pack's directory and trailer must
        // be are refused before any request: the ranges asked for all lie in
        // the listed object (a range past its end, merged by an S3 client
        // with one that is not, is not answered in full).
        // Its header says why when it has one: a pack of another tenant
        // (or epoch) moved here is named as such, not as cut short.
        let blobs_end = blobs.iter().map(PlannedBlob::end).max().unwrap_or(0);
        let room = size.saturating_sub(TRAILER_LEN as u64 + sealed_directory_len(0));
        if blobs_end > room {
            let name = ObjectName::Pack(pack);
            let header = store.get_range(&name, 0..HEADER_LEN as u64).await?;
            Opener::new(keys, ObjectKind::Pack, Some(&pack.0), &header)
                .map_err(|e| e.at(&object))?;
            return Err(past_the_blobs(&object, blobs_end));
        }
        let tail_at = size.saturating_sub(RANGED_TAIL.min(self.tail_keep).max(TRAILER_LEN as u64));
        let header = std::iter::once(0..HEADER_LEN as u64);
        let mut ranges: Vec<_> = header
            .chain(coalesce(blobs))
            .chain(std::iter::once(tail_at..size))
            .collect();
        let mut held = self
            .hold(ranges.iter().map(|r| r.end - r.start).sum())
            .await?;
        let mut parts = get_pack_ranges(store, keys, pack, &ranges).await?;
        let (tail, header) = match (parts.pop(), parts.is_empty()) {
            (Some(tail), false) => (tail, parts.remove(0)),
            _ => return Err(Error::corrupt(&object, "pack read returned no parts")),
        };
        ranges.pop();
        ranges.remove(0);
        let opener = Opener::new(keys, ObjectKind::Pack, Some(&pack.0), &header)
            .map_err(|e| e.at(&object))?;
        let trailer = tail
            .get(tail.len().saturating_sub(TRAILER_LEN)..)
            .unwrap_or(&[]);
        let (n, dir_range) = directory_range(size, trailer).map_err(|e| e.at(&object))?;
        if blobs_end > dir_range.start {
            return Err(past_the_blobs(&object, blobs_end));
        }
        let dir = match dir_range.start.checked_sub(tail_at) {
            Some(from) => tail.slice(from as usize..(dir_range.end - tail_at) as usize),
            None => {
                // Taken again for all it holds, never while holding a share
                // (two reads each waiting for more than they hold would wait
                // for each other).
                let holds: u64 = parts.iter().map(|p| p.len() as u64).sum();
                drop((tail, held));
                held = self.hold(holds + (dir_range.end - dir_range.start)).await?;
                get_pack_ranges(store, keys, pack, &[dir_range])
                    .await?
                    .pop()
                    .ok_or_else(|| Error::corrupt(&object, "pack read returned no directory"))?
            }
        };
        Ok(Fetched {
            opener,
            n,
            dir,
            ranges,
            parts,
            _held: held,
        })
    }

    /// Writes one blob's plaintext at each of its places.
    fn write_blob(&self, plain: &[u8], targets: &[(usize, u64)]) -> Result<()> {
        if plain.iter().all(|&x| x == 0) {
            return Ok(()); // the file was sized up front: zeros are a hole already
        }
        for &(fi, offset) in targets {
            let (file, path) = &self.files[fi];
            file.write_all_at(plain, offset)
                .map_err(|e| Error::io(path, e))?;
            self.written
                .fetch_add(plain.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// What a streamed pack's reader hands its writer, with the share of the
/// read budget it holds until written.
enum Streamed {
    /// The bytes from `start` to the end of the run's last blob.
    Run {
        start: u64,
        bytes: bytes::BytesMut,
        blobs: Vec<PlannedBlob>,
        _held: tokio::sync::OwnedSemaphorePermit,
    },
    /// The pack's sealed directory, and the blob count its trailer gives.
    Directory {
        n: u32,
        sealed: bytes::Bytes,
        _held: tokio::sync::OwnedSemaphorePermit,
    },
}

fn disagrees(object: &str, entry: &PackEntry) -> Error {
    Error::corrupt(
        object,
        format!(
            "the index entry of blob {} disagrees with the pack directory",
            entry.id.short()
        ),
    )
}

fn past_the_blobs(object: &str, blobs_end: u64) -> Error {
    Error::corrupt(
        object,
        format!(
            "the index places a blob ending at {blobs_end}, past the pack's blobs (truncated or replaced pack)"
        ),
    )
}

/// A batch's reads, joined: their error, or a panic (a cancellation only
/// happens as the runtime shuts down).
pub(super) fn read_outcome(
    done: std::result::Result<Result<()>, tokio::task::JoinError>,
) -> Result<()> {
    match done {
        Ok(read) => read,
        Err(e) if e.is_panic() => Err(Error::Internal(format!("restore read panicked: {e}"))),
        Err(e) => Err(Error::Internal(format!("restore read cancelled: {e}"))),
    }
}

/// What a ranged read of one pack got: its opener, its sealed directory
/// (with the blob count the trailer gives) and the byte ranges holding the
/// blobs.
struct Fetched {
    opener: Opener,
    n: u32,
    dir: bytes::Bytes,
    ranges: Vec<std::ops::Range<u64>>,
    parts: Vec<bytes::Bytes>,
    /// Its share of the read budget, until the parts are dropped.
    _held: tokio::sync::OwnedSemaphorePermit,
}

/// One blob a batch needs, and where it goes: (file in the batch, offset).
pub(super) struct PlannedBlob {
    pub(super) id: BlobId,
    pub(super) loc: Location,
    pub(super) targets: Vec<(usize, u64)>,
}

impl PlannedBlob {
    /// Where the sealed blob ends in its pack.
    fn end(&self) -> u64 {
        self.loc.offset as u64 + self.loc.sealed_len as u64
    }

    /// The pack directory's entry the index implies for this blob.
    fn entry(&self) -> PackEntry {
        PackEntry {
            id: self.id,
            kind: self.loc.kind,
            segment: self.loc.segment,
            offset: self.loc.offset,
            sealed_len: self.loc.sealed_len,
            raw_len: self.loc.raw_len,
        }
    }
}

/// Byte ranges to fetch from a pack: the blobs (sorted by offset), merged
/// where they are close, up to a bounded range size.
fn coalesce(blobs: &[PlannedBlob]) -> Vec<std::ops::Range<u64>> {
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::with_capacity(blobs.len() + 1);
    for b in blobs {
        let (start, end) = (b.loc.offset as u64, b.end());
        match ranges.last_mut() {
            Some(last) if start <= last.end + COALESCE_GAP && end - last.start <= MAX_RANGE => {
                last.end = last.end.max(end)
            }
            _ => ranges.push(start..end),
        }
    }
    ranges
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use bytes::Bytes;

    use super::*;
    use crate::format::pack::{FinishedPack, testing};
    use crate::tenant::TenantId;

    fn keys() -> Arc<EpochKeys> {
        Arc::new(testing::keys())
    }

    /// A pack of `blobs` (incompressible, so a blob's bytes are its size),
    /// stored under tenant acme.
    async fn stored_pack(keys: &EpochKeys, blobs: &[Vec<u8>]) -> (TenantStore, FinishedPack) {
        let pack = testing::build(keys, blobs);
        let store = TenantStore::new(crate::store::memory(), &TenantId::new("acme").unwrap());
        let name = ObjectName::Pack(pack.id);
        store
            .put(&name, Bytes::from(pack.bytes.clone()))
            .await
            .unwrap();
        (store, pack)
    }

    fn random(len: usize, seed: u8) -> Vec<u8> {
        let mut x = u64::from(seed) + 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Restores the blobs `wanted` (by position in the pack) of `pack`, one
    /// file each, with `entry` changing what the index says of each; returns
    /// the files' contents or the error.
    async fn restore(
        keys: Arc<EpochKeys>,
        store: TenantStore,
        pack: &FinishedPack,
        wanted: &[usize],
        tail_keep: u64,
        entry: impl Fn(PackEntry) -> PackEntry,
    ) -> Result<Vec<Vec<u8>>> {
        let files: Vec<(Arc<File>, PathBuf)> = wanted
            .iter()
            .map(|&i| {
                let f = tempfile::tempfile().unwrap();
                f.set_len(pack.entries[i].raw_len as u64).unwrap();
                (Arc::new(f), PathBuf::from(format!("file{i}")))
            })
            .collect();
        let blobs = wanted
            .iter()
            .enumerate()
            .map(|(fi, &i)| {
                let e = entry(pack.entries[i]);
                PlannedBlob {
                    id: e.id,
                    loc: Location {
                        pack: 0,
                        segment: e.segment,
                        offset: e.offset,
                        sealed_len: e.sealed_len,
                        raw_len: e.raw_len,
                        kind: e.kind,
                    },
                    targets: vec![(fi, 0)],
                }
            })
            .collect();
        let mut reads = PackReads::new(
            store,
            keys,
            ReadLimits::new(),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(files.clone()),
        );
        reads.tail_keep = tail_keep;
        let size = pack.bytes.len() as u64;
        reads.restore_pack(pack.id, Some(size), blobs).await?;
        Ok(files
            .iter()
            .map(|(f, _)| {
                let mut out = Vec::new();
                (&**f).read_to_end(&mut out).unwrap();
                out
            })
            .collect())
    }

    #[tokio::test]
    async fn a_pack_mostly_wanted_is_streamed_and_its_blobs_land_in_their_files() {
        let keys = keys();
        let blobs: Vec<Vec<u8>> = (0..6)
            .map(|i| random(300_000 + i * 1000, i as u8))
            .collect();
        let (store, pack) = stored_pack(&keys, &blobs).await;
        // All of it, then blobs with gaps between them; the directory kept
        // with the tail, then read on its own (a tail kept too short for it).
        for (wanted, tail_keep) in [
            (vec![0, 1, 2, 3, 4, 5], TAIL_KEEP),
            (vec![0, 2, 3, 5], TAIL_KEEP),
            (vec![1, 2, 3, 4], 16),
        ] {
            let got = restore(
                keys.clone(),
                store.clone(),
                &pack,
                &wanted,
                tail_keep,
                |e| e,
            )
            .await
            .unwrap();
            for (content, &i) in got.iter().zip(&wanted) {
                assert!(content == &blobs[i], "blob {i} restored wrong");
            }
        }
    }

    #[tokio::test]
    async fn a_pack_little_wanted_is_read_by_ranges() {
        let keys = keys();
        let blobs: Vec<Vec<u8>> = (0..8).map(|i| random(400_000, i as u8)).collect();
        let (store, pack) = stored_pack(&keys, &blobs).await;
        assert!(pack.bytes.len() as u64 > SMALL_PACK);
        // The directory with the pack's end, then on its own.
        for tail_keep in [TAIL_KEEP, 16] {
            let got = restore(keys.clone(), store.clone(), &pack, &[6], tail_keep, |e| e)
                .await
                .unwrap();
            assert!(got[0] == blobs[6]);
        }
    }

    #[tokio::test]
    async fn an_index_entry_the_directory_contradicts_is_named_either_way() {
        let keys = keys();
        let blobs: Vec<Vec<u8>> = (0..8).map(|i| random(400_000, i as u8)).collect();
        let (store, pack) = stored_pack(&keys, &blobs).await;
        // Restoring `wanted` with the index entry of `segment` changed by
        // `change` fails, naming `why`.
        let refused =
            async |wanted: &[usize], segment: u32, change: fn(&mut PackEntry), why: &str| {
                let entry = |mut e: PackEntry| {
                    if e.segment == segment {
                        change(&mut e);
                    }
                    e
                };
                let err = restore(keys.clone(), store.clone(), &pack, wanted, TAIL_KEEP, entry)
                    .await
                    .unwrap_err();
                assert!(err.to_string().contains(why), "{wanted:?}: {err}");
            };
        let (all, most) = (&[0, 1, 2, 3, 4, 5, 6, 7][..], &[0, 1, 2, 3, 4, 5][..]);
        // Blob 3 given the segment of blob 4: it fails to open, and the error
        // names the disagreement, streamed (all wanted) or ranged.
        let disagrees = "disagrees with the pack directory";
        refused(all, 3, |e| e.segment = 4, disagrees).await;
        refused(&[3], 3, |e| e.segment = 4, disagrees).await;
        // Entries that overlap (or reach into the header) cannot be streamed.
        let overlap = "inside the pack header or another blob";
        refused(most, 2, |e| e.offset -= 10, overlap).await;
        // A blob the index places past the blobs (in the directory).
        let past = "past the pack's blobs";
        refused(all, 7, |e| e.offset += 100, past).await;
        refused(&[7], 7, |e| e.offset += 100, past).await;
        // Past the pack's end: refused before any range is asked for.
        refused(&[7], 7, |e| e.offset += 10_000, past).await;
        // Unless the pack there is another tenant's: its header says so.
        let other = EpochKeys::new(TenantId::new("other").unwrap(), 1, testing::key());
        let foreign = testing::build(&other, &blobs[..4]);
        let name = ObjectName::Pack(pack.id);
        store
            .put(&name, Bytes::from(foreign.bytes.clone()))
            .await
            .unwrap();
        // The listing gives the foreign pack's size; the index, this pack's entries.
        let listed = FinishedPack {
            bytes: foreign.bytes,
            ..pack
        };
        assert!(listed.bytes.len() as u64 > SMALL_PACK, "read by ranges");
        let err = restore(keys.clone(), store.clone(), &listed, &[7], TAIL_KEEP, |e| e)
            .await
            .unwrap_err();
        assert!(!err.to_string().contains(past), "{err}");
    }
}
