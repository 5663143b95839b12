//! The write side of the data path: blobs in, sealed packs out, uploaded
//! concurrently. Each worker thread owns one open pack, compresses and seals
//! blobs into it, and hands finished packs to an async uploader; all queues
//! are bounded, so memory stays flat however much data flows through.
//!
//! ```text
//! caller ──(bounded)──▶ worker × N: zstd + AES-GCM into its own pack ──(bounded)──▶ uploader (K puts in flight)
//! ```
//!
//! Pack buffers are the big allocations (one per open, queued or uploading
//! pack), so they are counted: a worker opens a pack only under a permit of
//! the pack budget, released when the pack's upload ends. At most N + K
//! packs exist at once, however slow the store.
//!
//! A backup's packer also writes the index as it goes: once the uploaded
//! packs' entries fill an index file it is stored (while the job's lease is
//! held), so a first backup of millions of files holds one file's entries,
//! not one of every new blob. Entries only ever name uploaded packs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::format::ids::{BlobId, IndexId, PackId};
use crate::format::index::IndexFile;
use crate::format::pack::{BlobKind, FinishedPack, PackEntry, PackWriter, encode_frame};
use crate::keys::derive::EpochKeys;
use crate::pipeline::buffers::{BufferPool, Lent};
use crate::repo::{Dedup, write_index};
use crate::store::lease::LeaseCheck;
use crate::store::{ObjectName, TenantStore};

#[derive(Debug, Clone, Copy)]
pub struct PackerConfig {
    pub pack_size: usize,
    pub compression_level: i32,
    pub workers: usize,
    pub upload_concurrency: usize,
}

impl Default for PackerConfig {
    fn default() -> Self {
        PackerConfig {
            pack_size: 16 << 20,
            compression_level: 3,
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            upload_concurrency: 2,
        }
    }
}

impl PackerConfig {
    /// The packing a tenant's policy asks for (defaults without a policy):
    /// the one place backup, prune and forget, from the CLI or the daemon,
    /// take it from.
    pub fn for_policy(policy: Option<&crate::config::Policy>) -> PackerConfig {
        match policy {
            Some(p) => PackerConfig {
                pack_size: p.backup.pack_size as usize,
                compression_level: p.backup.compression_level,
                ..PackerConfig::default()
            },
            None => PackerConfig::default(),
        }
    }
}

/// A blob for the packer: raw plaintext, or an already-built frame (repacking
/// copies frames without recompressing them).
pub enum Work {
    Raw {
        id: BlobId,
        kind: BlobKind,
        data: Vec<u8>,
    },
    Frame {
        id: BlobId,
        kind: BlobKind,
        raw_len: u32,
        frame: Vec<u8>,
    },
}

/// What the packer stored.
#[derive(Debug, Default)]
pub struct PackerOutput {
    /// Entries of the uploaded packs not yet in a stored index file.
    pub index: IndexFile,
    /// Index files the packer stored on its way ([`Packer::start`]'s `flush`).
    pub index_files: Vec<IndexId>,
    /// Bytes of those index files.
    pub index_bytes: u64,
    pub packs: u64,
    pub blobs: u64,
    /// Raw (uncompressed) bytes of the blobs stored.
    pub raw_bytes: u64,
    /// Bytes uploaded (sum of pack sizes).
    pub bytes_stored: u64,
}

pub struct Packer {
    known: Mutex<Dedup>,
    /// Blobs added but not yet handed to a worker: small blobs travel in
    /// batches, so a backup of many small files does not wake a worker (a
    /// futex call and two context switches) for every one of them.
    pending: Mutex<Batch>,
    work_tx: Option<SyncSender<Vec<Work>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    uploader: tokio::task::JoinHandle<PackerOutput>,
    shared: Arc<Shared>,
}

struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    budget: PackBudget,
    /// Buffers of blobs handed to the workers, back once compressed.
    blob_buffers: BufferPool,
    /// Pack buffers, back once uploaded.
    pack_buffers: BufferPool,
}

/// What the blob buffers waiting for reuse may hold. On a first backup of
/// 1 GiB (BENCHMARKS.md, "Buffers reused by the backup"), the pools as set
/// here cost about 25 MiB of peak memory; twice this, with a pool of every
/// pack buffer, about 20 MiB more for little more time saved.
const BLOB_BUFFERS_HELD: usize = 16 << 20;

/// What the pack buffers waiting for reuse may hold: two of the default
/// size, back from their uploads for the next packs opened. No buffer over
/// it is kept (a policy's `pack_size` of 48 MiB or more): the pool holds
/// what it keeps idle through a backup's stretches without new data.
const PACK_BUFFERS_HELD: usize = 48 << 20;

/// A batch is handed over once its blobs' buffers hold this many bytes (of
/// capacity: a reused buffer may be larger than its blob), or this many
/// blobs.
const BATCH_BYTES: usize = 512 << 10;
const BATCH_BLOBS: usize = 1024;

#[derive(Default)]
struct Batch {
    work: Vec<Work>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, work: Work) -> Option<Vec<Work>> {
        self.bytes += match &work {
            Work::Raw { data, .. } => data.capacity(),
            Work::Frame { frame, .. } => frame.len(),
        };
        self.work.push(work);
        (self.bytes >= BATCH_BYTES || self.work.len() >= BATCH_BLOBS).then(|| self.take())
    }

    fn take(&mut self) -> Vec<Work> {
        self.bytes = 0;
        std::mem::take(&mut self.work)
    }
}

/// Counts pack buffers alive (open, queued or uploading) against a limit.
struct PackBudget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

/// One pack buffer's place in the budget; dropping it frees the place.
struct Permit(Arc<Shared>);

impl Drop for Permit {
    fn drop(&mut self) {
        let b = &self.0.budget;
        *b.used.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        b.freed.notify_one();
    }
}

impl Shared {
    /// Blocks until a pack buffer may be allocated.
    fn permit(self: &Arc<Self>) -> Permit {
        let b = &self.budget;
        let mut used = b.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used >= b.limit {
            used = b.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        Permit(self.clone())
    }
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn take_error(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Packer {
    /// Starts workers and the uploader. `known` says which blobs are already
    /// stored in this epoch (deduplication); `rt` runs the uploads. With
    /// `flush` (the job's lease), each index file that fills is stored at
    /// once, only while the lease is held; without it every entry is
    /// returned by [`finish`](Self::finish) (a repack builds its own index).
    pub fn start(
        keys: Arc<EpochKeys>,
        store: TenantStore,
        known: Dedup,
        cfg: PackerConfig,
        flush: Option<LeaseCheck>,
        rt: &Handle,
    ) -> Self {
        let workers_n = cfg.workers.max(1);
        let shared = Arc::new(Shared {
            failed: AtomicBool::new(false),
            error: Mutex::new(None),
            budget: PackBudget {
                used: Mutex::new(0),
                freed: Condvar::new(),
                limit: workers_n + cfg.upload_concurrency.max(1),
            },
            blob_buffers: BufferPool::rounding_up(BLOB_BUFFERS_HELD),
            pack_buffers: BufferPool::new(
                PACK_BUFFERS_HELD,
                pack_buffer_len(&cfg).saturating_mul(2),
            ),
        });
        let (work_tx, work_rx) = sync_channel::<Vec<Work>>(workers_n * 2);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (pack_tx, pack_rx) = tokio::sync::mpsc::channel::<(FinishedPack, Permit)>(1);
        let workers = (0..workers_n)
            .map(|i| {
                let keys = keys.clone();
                let rx = work_rx.clone();
                let tx = pack_tx.clone();
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("custos-pack-{i}"))
                    .spawn(move || worker(keys, rx, tx, cfg, shared))
                    .expect("spawn packer worker")
            })
            .collect();
        drop(pack_tx);
        let flush = flush.map(|lease| IndexFlush {
            keys: keys.clone(),
            lease,
        });
        let uploader = rt.spawn(uploader(
            store,
            pack_rx,
            cfg.upload_concurrency.max(1),
            flush,
            shared.clone(),
        ));
        Packer {
            known: Mutex::new(known),
            pending: Mutex::new(Batch::default()),
            work_tx: Some(work_tx),
            workers,
            uploader,
            shared,
        }
    }

    /// True (and now reserved) if `id` is not stored yet: the caller must add it.
    pub fn claim(&self, id: &BlobId) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .claim(id)
    }

    pub fn is_known(&self, id: &BlobId) -> bool {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    /// Queues a copy of a claimed blob's plaintext (see [`Self::add`]).
    pub fn add_copy(&self, id: BlobId, kind: BlobKind, plaintext: &[u8]) -> Result<()> {
        let mut data = self.shared.blob_buffers.take(plaintext.len());
        data.extend_from_slice(plaintext);
        self.add(Work::Raw { id, kind, data })
    }

    /// Queues a claimed blob; blocks while the workers are busy.
    pub fn add(&self, work: Work) -> Result<()> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self
                .shared
                .take_error()
                .unwrap_or_else(|| Error::Internal("packer failed".into())));
        }
        let full = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(work);
        match full {
            Some(batch) => self.send(batch),
            None => Ok(()),
        }
    }

    fn send(&self, batch: Vec<Work>) -> Result<()> {
        let tx = self.work_tx.as_ref().expect("add after finish");
        tx.send(batch)
            .map_err(|_| Error::Internal("packer workers stopped".into()))
    }

    /// Stops after a failed job: no further pack or index file is started,
    /// and this returns once the uploads already under way have ended, so
    /// nothing lands after the caller gives up its lease. Their packs stay
    /// unreferenced until prune.
    pub async fn abandon(mut self) {
        self.shared.fail(Error::Internal("the job stopped".into()));
        drop(self.work_tx.take());
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        let _ = (&mut self.uploader).await;
    }

    /// Flushes open packs, waits for every upload, and returns what was stored.
    /// Nothing it returns refers to a pack that is not fully uploaded.
    pub async fn finish(mut self) -> Result<PackerOutput> {
        let last = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let tx = self.work_tx.take();
        let workers = std::mem::take(&mut self.workers);
        // Off the async workers: the last batch may wait for room.
        let (sent, panicked) = tokio::task::spawn_blocking(move || {
            let sent = last.is_empty() || tx.as_ref().is_some_and(|tx| tx.send(last).is_ok());
            drop(tx); // workers end once the channel is closed and drained
            let panicked = workers
                .into_iter()
                .map(|w| w.join())
                .filter(Result::is_err)
                .count();
            (sent, panicked)
        })
        .await
        .map_err(|e| Error::Internal(format!("joining the packer workers failed: {e}")))?;
        // Every worker has ended, so the uploader ends once its packs are stored.
        let out = (&mut self.uploader)
            .await
            .map_err(|e| Error::Internal(format!("uploader panicked: {e}")))?;
        if let Some(e) = self.shared.take_error() {
            return Err(e);
        }
        // A worker that panicked lost the blobs it held: nothing may name them.
        if panicked > 0 {
            return Err(Error::Internal(format!(
                "{panicked} packer worker(s) panicked"
            )));
        }
        if !sent {
            return Err(Error::Internal("packer workers stopped".into()));
        }
        Ok(out)
    }
}

impl Drop for Packer {
    fn drop(&mut self) {
        // Dropped without finish (job failed): stop feeding workers; they flush
        // nothing further once the uploader is gone.
        self.work_tx.take();
        self.uploader.abort();
    }
}

/// Room for a full pack and the blob that overfills it, in most cases.
fn pack_buffer_len(cfg: &PackerConfig) -> usize {
    cfg.pack_size + (1 << 20)
}

fn worker(
    keys: Arc<EpochKeys>,
    rx: Arc<Mutex<Receiver<Vec<Work>>>>,
    tx: tokio::sync::mpsc::Sender<(FinishedPack, Permit)>,
    cfg: PackerConfig,
    shared: Arc<Shared>,
) {
    let mut pack: Option<(PackWriter, Permit)> = None;
    let mut frame = Vec::new();
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(batch) = next else { break };
        for work in batch {
            if shared.failed.load(Ordering::SeqCst) {
                break; // drain, so the producer never blocks on a dead pipeline
            }
            let (w, _) = pack.get_or_insert_with(|| {
                let permit = shared.permit();
                let buf = shared.pack_buffers.take(pack_buffer_len(&cfg));
                (PackWriter::in_buffer(&keys, buf), permit)
            });
            match work {
                Work::Raw { id, kind, data } => {
                    encode_frame(&data, cfg.compression_level, &mut frame);
                    w.add(id, kind, data.len() as u32, &mut frame);
                    shared.blob_buffers.give(data);
                }
                Work::Frame {
                    id,
                    kind,
                    raw_len,
                    mut frame,
                } => {
                    w.add(id, kind, raw_len, &mut frame);
                }
            }
            if w.len() >= cfg.pack_size {
                let (w, permit) = pack.take().expect("pack is open");
                if tx.blocking_send((w.finish(), permit)).is_err() {
                    return;
                }
            }
        }
    }
    if let Some((w, permit)) = pack.take().filter(|(w, _)| !w.is_empty())
        && !shared.failed.load(Ordering::SeqCst)
    {
        let _ = tx.blocking_send((w.finish(), permit));
    }
}

/// What the uploader needs to store index files as they fill.
struct IndexFlush {
    keys: Arc<EpochKeys>,
    lease: LeaseCheck,
}

impl IndexFlush {
    /// Stores every full index file's worth of `out.index`; the rest (less
    /// than a file) stays, to fill further.
    async fn full_files(&self, store: &TenantStore, out: &mut PackerOutput) -> Result<()> {
        let max = crate::hooks::index_file_blobs();
        if out.index.blob_count() < max {
            return Ok(());
        }
        let mut files = std::mem::take(&mut out.index).split(max);
        if let Some(last) = files.pop_if(|f| f.blob_count() < max) {
            out.index = last;
        }
        for file in files {
            let (ids, bytes) =
                write_index(store, &self.keys, file, || self.lease.ensure_held()).await?;
            out.index_files.extend(ids);
            out.index_bytes += bytes;
        }
        Ok(())
    }
}

async fn uploader(
    store: TenantStore,
    mut rx: tokio::sync::mpsc::Receiver<(FinishedPack, Permit)>,
    concurrency: usize,
    flush: Option<IndexFlush>,
    shared: Arc<Shared>,
) -> PackerOutput {
    let mut out = PackerOutput::default();
    let mut in_flight = FuturesUnordered::new();
    let upload = |(pack, permit): (FinishedPack, Permit)| {
        let store = store.clone();
        let bytes = Lent::bytes(pack.bytes, &shared.pack_buffers);
        async move {
            let size = bytes.len() as u64;
            let r = store.put(&ObjectName::Pack(pack.id), bytes).await;
            // Released when the put returns, not when the last reference to
            // the bytes drops (and the buffer returns to its pool): a store
            // that keeps them, as the memory store does, would stop the
            // packer. A client still holding them briefly only delays the
            // buffer's reuse.
            drop(permit);
            (pack.id, pack.entries, pack.raw_bytes, size, r)
        }
    };
    let record =
        |out: &mut PackerOutput,
         (id, entries, raw, size, r): (PackId, Vec<PackEntry>, u64, u64, Result<_>)| match r
        {
            Ok(_) => {
                out.packs += 1;
                out.blobs += entries.len() as u64;
                out.raw_bytes += raw;
                out.bytes_stored += size;
                out.index.packs.push((id, entries));
            }
            Err(e) => shared.fail(e),
        };
    let mut all_received = false;
    loop {
        tokio::select! {
            pack = rx.recv(), if !all_received && in_flight.len() < concurrency => match pack {
                Some(pack) if !shared.failed.load(Ordering::SeqCst) => in_flight.push(upload(pack)),
                Some(_) => {}
                None => all_received = true,
            },
            Some(done) = in_flight.next() => {
                record(&mut out, done);
                if let Some(flush) = &flush
                    && !shared.failed.load(Ordering::SeqCst)
                    && let Err(e) = flush.full_files(&store, &mut out).await
                {
                    shared.fail(e);
                }
            }
            else => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use std::collections::BTreeSet;
    use std::time::Duration;

    use super::*;
    use crate::format::index::MAX_FILE_BLOBS;
    use crate::keys::SecretKey;
    use crate::store::layout::Dir;
    use crate::store::lease::LeaseGuard;
    use crate::tenant::TenantId;

    fn setup() -> (Arc<EpochKeys>, TenantStore, PackerConfig) {
        let tenant = TenantId::new("acme").unwrap();
        let keys = Arc::new(EpochKeys::new(
            tenant.clone(),
            1,
            SecretKey::from_bytes([9; 32]),
        ));
        let store = TenantStore::new(crate::store::memory(), &tenant);
        // Small packs: many uploads, so index files fill across packs.
        let cfg = PackerConfig {
            pack_size: 64 << 10,
            workers: 2,
            ..PackerConfig::default()
        };
        (keys, store, cfg)
    }

    async fn pack(packer: Packer, blobs: u32) -> Result<(PackerOutput, Vec<BlobId>)> {
        let mut ids = Vec::new();
        for i in 0..blobs {
            let data = format!("blob {i}").into_bytes();
            let id = BlobId(blake3::hash(&data).into());
            assert!(packer.claim(&id));
            tokio::task::block_in_place(|| {
                packer.add(Work::Raw {
                    id,
                    kind: BlobKind::Data,
                    data,
                })
            })?;
            ids.push(id);
        }
        Ok((packer.finish().await?, ids))
    }

    async fn stored_index_files(store: &TenantStore) -> Vec<IndexId> {
        store
            .list(Dir::Index)
            .await
            .unwrap()
            .into_iter()
            .map(|l| match l.name {
                Some(ObjectName::Index(id)) => id,
                other => panic!("not an index file: {other:?}"),
            })
            .collect()
    }

    /// A backup's packer stores each index file as it fills, every file
    /// within the limit and naming only uploaded packs; what it returns is
    /// the rest, and together they list every blob once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_index_files_are_stored_as_they_fill() {
        let (keys, store, cfg) = setup();
        let lease = LeaseGuard::acquire(&store, "test", "backup", Duration::from_secs(60))
            .await
            .unwrap();
        let packer = Packer::start(
            keys.clone(),
            store.clone(),
            Dedup::default(),
            cfg,
            lease.check(),
            &Handle::current(),
        );
        let blobs = 2 * MAX_FILE_BLOBS as u32 + 5_000;
        let (out, ids) = pack(packer, blobs).await.unwrap();
        assert!(out.index_files.len() >= 2, "{:?}", out.index_files);
        assert!(out.index.blob_count() < MAX_FILE_BLOBS);
        let listed = stored_index_files(&store).await;
        assert_eq!(
            listed.iter().collect::<BTreeSet<_>>(),
            out.index_files.iter().collect::<BTreeSet<_>>()
        );
        let packs: BTreeSet<PackId> = store
            .list(Dir::Packs)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|l| match l.name {
                Some(ObjectName::Pack(id)) => Some(id),
                _ => None,
            })
            .collect();
        let mut indexed = Vec::new();
        let mut index_bytes = 0;
        for id in &out.index_files {
            let bytes = store.get(&ObjectName::Index(*id)).await.unwrap();
            index_bytes += bytes.len() as u64;
            let file = IndexFile::open(&keys, id, &bytes).unwrap();
            assert!(file.blob_count() <= MAX_FILE_BLOBS);
            for (pack, entries) in file.packs {
                assert!(
                    packs.contains(&pack),
                    "an index file names a pack not stored"
                );
                indexed.extend(entries.iter().map(|e| e.id));
            }
        }
        assert_eq!(index_bytes, out.index_bytes);
        for (pack, entries) in &out.index.packs {
            assert!(packs.contains(pack));
            indexed.extend(entries.iter().map(|e| e.id));
        }
        indexed.sort();
        let mut ids = ids;
        ids.sort();
        assert_eq!(indexed, ids, "every blob indexed exactly once");
        lease.release().await;
    }

    /// A packer with nothing to deduplicate against and no lease to check.
    fn unleased(keys: &Arc<EpochKeys>, store: &TenantStore, cfg: PackerConfig) -> Packer {
        Packer::start(
            keys.clone(),
            store.clone(),
            Dedup::default(),
            cfg,
            None,
            &Handle::current(),
        )
    }

    /// A batch counts its blobs' buffers by capacity: a small blob in a
    /// large reused buffer fills a batch as the buffer would.
    #[test]
    fn a_batch_counts_buffers_by_capacity() {
        let mut batch = Batch::default();
        let mut data = Vec::with_capacity(BATCH_BYTES);
        data.extend_from_slice(b"small blob");
        let id = BlobId([1; 32]);
        let full = batch.push(Work::Raw {
            id,
            kind: BlobKind::Data,
            data,
        });
        assert_eq!(full.map(|w| w.len()), Some(1));
    }

    /// Small blobs travel in batches; whatever the batching, every blob
    /// added reaches a pack, including the last batch, which is not full.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_blob_of_a_partial_last_batch_is_stored() {
        let (keys, store, cfg) = setup();
        for blobs in [1, BATCH_BLOBS as u32 - 1, BATCH_BLOBS as u32 + 1] {
            let packer = unleased(&keys, &store, cfg);
            let (out, mut ids) = pack(packer, blobs).await.unwrap();
            let mut indexed: Vec<BlobId> = out
                .index
                .packs
                .iter()
                .flat_map(|(_, entries)| entries.iter().map(|e| e.id))
                .collect();
            indexed.sort();
            ids.sort();
            assert_eq!(indexed, ids, "{blobs} blobs");
        }
    }

    /// Blob and pack buffers come back for reuse, and a pack built in a
    /// reused buffer holds exactly its own blobs: every stored pack opens,
    /// and each blob in it decrypts to the plaintext its id names.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn packs_built_in_reused_buffers_hold_exactly_their_blobs() {
        let (keys, memory, cfg) = setup();
        // A store on disk: the memory store keeps the uploaded bytes
        // themselves, so no pack buffer would come back.
        let dir = tempfile::tempdir().unwrap();
        let store = TenantStore::new(
            crate::store::local::open(dir.path()).unwrap(),
            memory.tenant(),
        );
        let packer = unleased(&keys, &store, cfg);
        let pools = (
            packer.shared.blob_buffers.clone(),
            packer.shared.pack_buffers.clone(),
        );
        let mut plaintexts = std::collections::HashMap::new();
        for i in 0..60u32 {
            // Larger than a pool's smallest, in several sizes, half of them
            // incompressible so that packs fill at different lengths.
            let len = crate::pipeline::buffers::SMALL + (i as usize % 7) * 40_000;
            let data: Vec<u8> = if i % 2 == 0 {
                (0..len)
                    .map(|j| (j as u32 ^ i).to_le_bytes()[j % 4])
                    .collect()
            } else {
                let mut seed = blake3::Hasher::new();
                seed.update(&i.to_le_bytes());
                let mut data = vec![0; len];
                seed.finalize_xof().fill(&mut data);
                data
            };
            let id = BlobId(keys.blob_id(&data));
            assert!(packer.claim(&id));
            tokio::task::block_in_place(|| packer.add_copy(id, BlobKind::Data, &data)).unwrap();
            plaintexts.insert(id, data);
        }
        let out = packer.finish().await.unwrap();
        assert!(out.packs >= 10, "{} packs", out.packs);
        let mut opened = 0;
        for (pack, entries) in &out.index.packs {
            let bytes = store.get(&ObjectName::Pack(*pack)).await.unwrap();
            let (opener, listed) = crate::format::pack::open_pack(&keys, pack, &bytes).unwrap();
            assert_eq!(&listed, entries);
            for e in entries {
                let sealed = &bytes[e.offset as usize..(e.offset + e.sealed_len) as usize];
                let plain = crate::format::pack::open_blob(&opener, &keys, e, sealed).unwrap();
                assert_eq!(Some(&plain), plaintexts.get(&e.id));
                opened += 1;
            }
        }
        assert_eq!(opened, plaintexts.len());
        assert!(
            pools.0.reused() > 0,
            "no blob was copied into a reused buffer"
        );
        assert!(pools.1.reused() > 0, "no pack was built in a reused buffer");
    }

    /// When uploads fail, the job ends with the store's error, whether it
    /// shows at an `add` or only at `finish` (the blobs still batched).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_fails_the_job_without_hanging() {
        let (keys, store, cfg) = setup();
        let failing = crate::store::faults::FaultyStore::new(
            crate::store::memory(),
            crate::store::faults::FaultConfig {
                error: 1.0,
                ..Default::default()
            },
        );
        let store = TenantStore::new(Arc::new(failing), store.tenant());
        for blobs in [3, 5 * BATCH_BLOBS as u32] {
            let packer = unleased(&keys, &store, cfg);
            let ended = tokio::time::timeout(Duration::from_secs(60), pack(packer, blobs)).await;
            match ended.expect("the packer hung") {
                Ok(_) => panic!("{blobs} blobs: stored into a store that fails every put"),
                Err(e) => assert!(e.to_string().contains("injected"), "{blobs} blobs: {e}"),
            }
        }
    }

    /// Once the lease is lost, no further index file is stored and the
    /// packer fails with the lease's error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_lease_stops_the_index_writes() {
        let (keys, store, cfg) = setup();
        let lease = LeaseGuard::acquire(&store, "test", "backup", Duration::from_millis(300))
            .await
            .unwrap();
        // Taken over behind the holder's back: its next renewal notices.
        store
            .put(&ObjectName::Lease, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let packer = Packer::start(
            keys,
            store.clone(),
            Dedup::default(),
            cfg,
            lease.check(),
            &Handle::current(),
        );
        match pack(packer, 3 * MAX_FILE_BLOBS as u32).await {
            Ok((out, _)) => panic!(
                "the packer went on: {} index file(s) stored",
                out.index_files.len()
            ),
            Err(e) => assert_eq!(e.kind(), "lease_contended", "{e}"),
        }
        assert!(stored_index_files(&store).await.is_empty());
    }
}
