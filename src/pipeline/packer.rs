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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::format::ids::{BlobId, PackId};
use crate::format::index::IndexFile;
use crate::format::pack::{BlobKind, FinishedPack, PackEntry, PackWriter, encode_frame};
use crate::keys::derive::EpochKeys;
use crate::repo::Dedup;
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
    pub index: IndexFile,
    pub packs: u64,
    pub blobs: u64,
    /// Raw (uncompressed) bytes of the blobs stored.
    pub raw_bytes: u64,
    /// Bytes uploaded (sum of pack sizes).
    pub bytes_stored: u64,
}

pub struct Packer {
    known: Mutex<Dedup>,
    work_tx: Option<SyncSender<Work>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    uploader: tokio::task::JoinHandle<PackerOutput>,
    shared: Arc<Shared>,
}

struct Shared {
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    budget: PackBudget,
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
    /// stored in this epoch (deduplication); `rt` runs the uploads.
    pub fn start(
        keys: Arc<EpochKeys>,
        store: TenantStore,
        known: Dedup,
        cfg: PackerConfig,
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
        });
        let (work_tx, work_rx) = sync_channel::<Work>(workers_n * 2);
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
        let uploader = rt.spawn(uploader(
            store,
            pack_rx,
            cfg.upload_concurrency.max(1),
            shared.clone(),
        ));
        Packer {
            known: Mutex::new(known),
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

    /// Queues a claimed blob; blocks while the workers are busy.
    pub fn add(&self, work: Work) -> Result<()> {
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self
                .shared
                .take_error()
                .unwrap_or_else(|| Error::Internal("packer failed".into())));
        }
        let tx = self.work_tx.as_ref().expect("add after finish");
        tx.send(work)
            .map_err(|_| Error::Internal("packer workers stopped".into()))
    }

    /// Flushes open packs, waits for every upload, and returns what was stored.
    /// Nothing it returns refers to a pack that is not fully uploaded.
    pub async fn finish(mut self) -> Result<PackerOutput> {
        drop(self.work_tx.take());
        let workers = std::mem::take(&mut self.workers);
        tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("packer worker panicked: {e}")))?;
        let out = (&mut self.uploader)
            .await
            .map_err(|e| Error::Internal(format!("uploader panicked: {e}")))?;
        match self.shared.take_error() {
            Some(e) => Err(e),
            None => Ok(out),
        }
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

fn worker(
    keys: Arc<EpochKeys>,
    rx: Arc<Mutex<Receiver<Work>>>,
    tx: tokio::sync::mpsc::Sender<(FinishedPack, Permit)>,
    cfg: PackerConfig,
    shared: Arc<Shared>,
) {
    let mut pack: Option<(PackWriter, Permit)> = None;
    let mut frame = Vec::new();
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok(work) = next else { break };
        if shared.failed.load(Ordering::SeqCst) {
            continue; // drain, so the producer never blocks on a dead pipeline
        }
        let (w, _) = pack.get_or_insert_with(|| {
            let permit = shared.permit();
            (PackWriter::new(&keys, cfg.pack_size + (1 << 20)), permit)
        });
        match work {
            Work::Raw { id, kind, data } => {
                encode_frame(&data, cfg.compression_level, &mut frame);
                w.add(id, kind, data.len() as u32, &mut frame);
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
    if let Some((w, permit)) = pack.take().filter(|(w, _)| !w.is_empty())
        && !shared.failed.load(Ordering::SeqCst)
    {
        let _ = tx.blocking_send((w.finish(), permit));
    }
}

async fn uploader(
    store: TenantStore,
    mut rx: tokio::sync::mpsc::Receiver<(FinishedPack, Permit)>,
    concurrency: usize,
    shared: Arc<Shared>,
) -> PackerOutput {
    let mut out = PackerOutput::default();
    let mut in_flight = FuturesUnordered::new();
    let upload = |(pack, permit): (FinishedPack, Permit)| {
        let store = store.clone();
        async move {
            let size = pack.bytes.len() as u64;
            let r = store
                .put(&ObjectName::Pack(pack.id), Bytes::from(pack.bytes))
                .await;
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
    loop {
        tokio::select! {
            pack = rx.recv(), if in_flight.len() < concurrency => match pack {
                Some(pack) if !shared.failed.load(Ordering::SeqCst) => in_flight.push(upload(pack)),
                Some(_) => {}
                None => break,
            },
            Some(done) = in_flight.next() => record(&mut out, done),
        }
    }
    while let Some(done) = in_flight.next().await {
        record(&mut out, done);
    }
    out
}
