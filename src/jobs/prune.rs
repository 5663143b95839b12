//! `custos prune`: removes data no snapshot needs. Unused packs are deleted;
//! packs mostly unused are repacked (their live blobs copied, still sealed
//! per epoch, into new packs). Safe to kill at any point:
//!
//! 1. new packs are uploaded (unreferenced until step 2);
//! 2. one consolidated index per epoch is written, covering every live blob;
//! 3. what goes is announced in a deletion plan, and readers that started
//!    before it are waited for (`jobs::deletion`; still reading after
//!    `reader_wait`: the run defers, deleting nothing, and says so);
//! 4. the old index files are deleted (recorded first, so one that comes back
//!    later is recognised as a rollback);
//! 5. unused and repacked packs are deleted.
//!
//! A run killed before 2 leaves unreferenced packs, after 2 duplicate index
//! entries, after 4 unreferenced packs: `check` passes in every case and the
//! next prune finishes the work. Plans of earlier prunes are dropped first:
//! this run decides afresh what is unused.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::runtime::Handle;

use crate::error::{Error, ErrorKind, Result};
use crate::format::ids::{BlobId, IdSet, PackId};
use crate::format::index::IndexFile;
use crate::format::snapshot::Snapshot;
use crate::format::tree::EntryKind;
use crate::jobs::deletion::{self, Deferred};
use crate::pipeline::blobs::read_frame;
use crate::pipeline::packer::{Packer, PackerConfig, Work};
use crate::pipeline::tree::{SeenTreeBlobs, TreeReader};
use crate::repo::{BlobMarks, Dedup, Index, IndexBuilder, Repo};
use crate::store::ObjectName;
use crate::store::deletions::{self as plans, DeletionPlan};
use crate::store::lease::LeaseGuard;

/// Packs with less than this fraction of live bytes are repacked.
const REPACK_BELOW: f64 = 0.5;

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub snapshots: usize,
    /// Indexed blobs the snapshots need.
    pub blobs_used: usize,
    pub packs_total: usize,
    pub packs_deleted: usize,
    pub packs_repacked: usize,
    pub packs_unreferenced_deleted: usize,
    pub bytes_freed: u64,
    pub bytes_written: u64,
    pub index_files_replaced: usize,
    /// Half-written objects of killed runs removed (local store only).
    pub staging_files_removed: usize,
    /// Readers still reading at the end of the wait: nothing was deleted
    /// (the deletion counts are 0), the next prune finishes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deferred: Option<Deferred>,
    pub dry_run: bool,
}

/// Every indexed blob the given snapshots need: tree blobs and file
/// content. (A blob they need that no index names has nothing to delete.)
pub async fn used_blobs(repo: &Repo, index: &Index, snapshots: &[Snapshot]) -> Result<BlobMarks> {
    let mut used = index.marks();
    // A tree blob whose lines an earlier snapshot yielded is not read
    // again: their file blobs are marked already.
    let mut seen = SeenTreeBlobs::default();
    for s in snapshots {
        for id in &s.tree {
            index.mark(&mut used, id);
        }
        let mut tree = TreeReader::new(repo, index, &s.tree, format!("tree of snapshot {}", s.id))
            .sharing(&mut seen);
        while let Some(e) = tree.next_entry().await? {
            if e.kind == EntryKind::File {
                for id in &e.blobs {
                    index.mark(&mut used, id);
                }
            }
        }
    }
    Ok(used)
}

/// What a prune would do, computed from the index and the snapshots alone:
/// `--dry-run` prints its [`PrunePlan::preview`] report, [`execute`] carries
/// it out.
#[derive(Debug)]
pub struct PrunePlan {
    index: Index,
    used: BlobMarks,
    /// Indexed packs with no live blob.
    delete: Vec<PackId>,
    /// Indexed packs mostly dead: their live blobs are copied, then they go.
    repack: Vec<PackId>,
    /// Stored packs no index names.
    unreferenced: Vec<PackId>,
    /// Whether the index files change (packs go, or an epoch has several files).
    index_changes: bool,
    /// The counts of the plan, as the report states them.
    summary: PruneReport,
}

impl PrunePlan {
    /// The report of a dry run: what a prune would delete now.
    pub fn preview(self) -> PruneReport {
        PruneReport {
            dry_run: true,
            ..self.summary
        }
    }

    /// Whether executing the plan changes nothing in the store.
    fn is_empty(&self) -> bool {
        !self.index_changes && self.unreferenced.is_empty()
    }
}

/// Prunes: first finishes what killed runs left, then plans and executes.
pub async fn run(repo: &Repo, lease: &LeaseGuard, packer_cfg: PackerConfig) -> Result<PruneReport> {
    let staging_files_removed = prepare(repo, lease).await?;
    let plan = plan(repo).await?;
    let mut report = execute(repo, lease, plan, packer_cfg).await?;
    report.staging_files_removed = staging_files_removed;
    Ok(report)
}

/// Before a prune that deletes: what killed runs left that no listing
/// shows or that a lease guards. Returns the staging files removed.
async fn prepare(repo: &Repo, lease: &LeaseGuard) -> Result<usize> {
    lease.ensure_held()?;
    crate::jobs::forget::finish_interrupted(repo, lease).await?;
    drop_index_plans(repo).await?;
    sweep_local_staging(repo).await
}

/// Decides what a prune deletes and repacks. Deletes nothing; records (in
/// this host's state) index removals an interrupted prune finished.
pub async fn plan(repo: &Repo) -> Result<PrunePlan> {
    let (index, index_faults) = repo.load_index().await?;
    finish_index_removal(repo, &index)?;
    if let Some(f) = index_faults
        .iter()
        .find(|f| f.kind != ErrorKind::UnknownObject)
    {
        return Err(Error::InvalidArgument(format!(
            "refusing to prune with an unreadable index ({}: {}); run `custos check` first",
            f.object, f.message
        )));
    }
    let (snapshots, snap_faults) = repo.list_snapshots().await?;
    if let Some(f) = snap_faults.iter().find(|f| {
        !matches!(
            f.kind,
            ErrorKind::UnknownObject | ErrorKind::RollbackDetected
        )
    }) {
        // An unreadable snapshot may still need data: deleting it could lose that data.
        return Err(Error::InvalidArgument(format!(
            "refusing to prune while a snapshot is unreadable ({}: {}); run `custos check`",
            f.object, f.message
        )));
    }
    let used = used_blobs(repo, &index, &snapshots).await?;
    let stored = repo.list_packs().await?;

    // Live and dead bytes per indexed pack.
    let mut live: BTreeMap<PackId, (u64, u64, u32)> = BTreeMap::new(); // (live, dead, epoch)
    for (_, loc, is_used) in index.blobs_marked(&used) {
        let (pack, epoch) = index.pack(loc);
        let slot = live.entry(pack).or_insert((0, 0, epoch));
        if is_used {
            slot.0 += loc.sealed_len as u64;
        } else {
            slot.1 += loc.sealed_len as u64;
        }
    }
    let mut delete: Vec<PackId> = Vec::new();
    let mut repack: Vec<PackId> = Vec::new();
    for (pack, &(l, d, _)) in &live {
        if !stored.contains_key(pack) {
            continue; // indexed but missing: check reports it; nothing to free
        }
        if l == 0 {
            delete.push(*pack);
        } else if d > 0 && (l as f64) < REPACK_BELOW * (l + d) as f64 {
            repack.push(*pack);
        }
    }
    let unreferenced: Vec<PackId> = stored
        .keys()
        .filter(|p| !live.contains_key(p))
        .copied()
        .collect();
    let summary = PruneReport {
        snapshots: snapshots.len(),
        blobs_used: used.len(),
        packs_total: stored.len(),
        packs_deleted: delete.len(),
        packs_repacked: repack.len(),
        packs_unreferenced_deleted: unreferenced.len(),
        bytes_freed: delete
            .iter()
            .chain(&repack)
            .chain(&unreferenced)
            .map(|p| stored[p])
            .sum(),
        ..Default::default()
    };
    let index_changes = !delete.is_empty() || !repack.is_empty() || index_fragmented(&index);
    Ok(PrunePlan {
        index,
        used,
        delete,
        repack,
        unreferenced,
        index_changes,
        summary,
    })
}

/// Carries out a plan: repack, consolidated index, announce and wait for
/// readers, delete the old index files, then the packs.
async fn execute(
    repo: &Repo,
    lease: &LeaseGuard,
    plan: PrunePlan,
    packer_cfg: PackerConfig,
) -> Result<PruneReport> {
    if plan.is_empty() {
        return Ok(plan.summary);
    }
    let PrunePlan {
        index,
        used,
        delete,
        repack,
        unreferenced,
        summary: mut report,
        ..
    } = plan;
    lease.ensure_held()?;

    // 1. Repack live blobs of sparse packs, per epoch.
    let mut new_index = IndexBuilder::default();
    let repack_set: IdSet<PackId> = repack.iter().copied().collect();
    let drop_set: IdSet<PackId> = delete.iter().chain(&repack).copied().collect();
    let mut by_epoch: BTreeMap<u32, Vec<BlobId>> = BTreeMap::new();
    for (id, loc, is_used) in index.blobs_marked(&used) {
        let (pack, epoch) = index.pack(loc);
        if repack_set.contains(&pack) && is_used {
            by_epoch.entry(epoch).or_default().push(*id);
        }
    }
    for (epoch, blobs) in by_epoch {
        let keys = repo.epoch_keys(epoch).await?;
        let packer = Packer::start(
            keys,
            repo.store().clone(),
            Dedup::default(),
            packer_cfg,
            None,
            &Handle::current(),
        );
        let packer = Arc::new(packer);
        let wanted = blobs.len() as u64;
        for id in blobs {
            let (frame, loc) = read_frame(repo, &index, &id).await?;
            let p = packer.clone();
            tokio::task::spawn_blocking(move || {
                p.add(Work::Frame {
                    id,
                    kind: loc.kind,
                    raw_len: loc.raw_len,
                    frame,
                })
            })
            .await
            .map_err(|e| Error::Internal(e.to_string()))??;
        }
        let packer =
            Arc::try_unwrap(packer).map_err(|_| Error::Internal("packer still shared".into()))?;
        let out = packer.finish().await?;
        // The old packs are deleted below: every live blob must be in a new one.
        if out.blobs != wanted {
            return Err(Error::Internal(format!(
                "repacking epoch {epoch} stored {} of {wanted} blobs; nothing deleted",
                out.blobs
            )));
        }
        report.bytes_written += out.bytes_stored;
        for (pack, entries) in &out.index.packs {
            new_index.add_pack(*pack, epoch, entries);
        }
    }

    // 2. Consolidated index: every live blob of kept packs, plus the repacked ones.
    let by_pack = index.by_pack();
    for (pack, epoch) in by_pack.packs() {
        if drop_set.contains(&pack) {
            continue;
        }
        let live_entries: Vec<_> = by_pack
            .entries(&pack)
            .into_iter()
            .filter(|e| index.is_marked(&used, &e.id))
            .collect();
        if !live_entries.is_empty() {
            new_index.add_pack(pack, epoch, &live_entries);
        }
    }
    drop(by_pack);
    let new_index = new_index.build();
    let new_by_pack = new_index.by_pack();
    let mut written = Vec::new();
    for epoch in epochs_in(&new_index) {
        let keys = repo.epoch_keys(epoch).await?;
        let mut file = IndexFile::default();
        for (pack, pack_epoch) in new_by_pack.packs() {
            if pack_epoch == epoch {
                file.packs.push((pack, new_by_pack.entries(&pack)));
            }
        }
        file.packs.sort_by_key(|(p, _)| *p);
        let (ids, bytes) = repo.put_index(&keys, file, lease).await?;
        report.bytes_written += bytes;
        written.extend(ids);
    }

    let old: Vec<_> = index
        .files
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| !written.contains(id))
        .collect();

    // 3. Announce, and wait for readers that started before the new index.
    let mut plan = DeletionPlan::new(&repo.context().holder, "prune");
    plan.index = old.clone();
    plan.packs = delete
        .iter()
        .chain(&repack)
        .chain(&unreferenced)
        .copied()
        .collect();
    let announced = deletion::announce(repo, lease, plan).await?;
    if let Some(deferred) = announced.deferred() {
        report.packs_deleted = 0;
        report.packs_unreferenced_deleted = 0;
        report.bytes_freed = 0;
        report.deferred = Some(deferred);
        return Ok(report);
    }

    // 4. Old index files go (recorded first, for rollback detection).
    // Two phases, so a crash in between is not mistaken for a rollback: an
    // index still present while "removing" is loaded as usual and deleted by
    // the next prune; one that reappears once "removed" is a rollback.
    repo.context()
        .state
        .update_tenant_memory(repo.tenant(), |m| {
            m.removing_indexes.extend(old.iter().copied())
        })?;
    for id in &old {
        lease.ensure_held()?;
        repo.store().delete(&ObjectName::Index(*id)).await?;
    }
    repo.context()
        .state
        .update_tenant_memory(repo.tenant(), |m| {
            let done = std::mem::take(&mut m.removing_indexes);
            m.removed_indexes.extend(done);
        })?;
    report.index_files_replaced = old.len();

    // 5. Packs nothing references any more.
    for pack in delete.iter().chain(&repack).chain(&unreferenced) {
        lease.ensure_held()?;
        repo.store().delete(&ObjectName::Pack(*pack)).await?;
    }
    deletion::finish(repo, announced).await?;
    Ok(report)
}

/// Drops the deletion plans of earlier prunes (deferred or killed): this run
/// recomputes what is unused from the whole repository, and a plan left in
/// place could hide a pack its new index names. Readers then see those
/// objects again: all that remain are consistent (a prune deletes index
/// files before packs, so no index file left names a deleted pack). Plans of
/// forgets and epoch shreds are kept: they hide snapshots and epochs.
async fn drop_index_plans(repo: &Repo) -> Result<()> {
    for (id, plan) in plans::list(repo.store()).await? {
        if plan.job == "prune" && plan.snapshots.is_empty() {
            plans::remove(repo.store(), &id).await?;
        }
    }
    Ok(())
}

/// On the local store, a run killed mid-upload leaves its object's staging
/// file (`<name>#<n>`), which listings do not show; prune holds the tenant
/// lease, so no other writer of this tenant's data can be mid-upload.
/// The sweep waits for the store's lock: on a blocking thread, so that the
/// tasks of this process that hold it (a reader renewing its record beside
/// this prune) keep running meanwhile.
async fn sweep_local_staging(repo: &Repo) -> Result<usize> {
    let Some(root) = repo.context().store_url.strip_prefix("file://") else {
        return Ok(0);
    };
    let root = std::path::PathBuf::from(root);
    let tenant = repo.tenant().clone();
    tokio::task::spawn_blocking(move || {
        crate::store::local::sweep_staging(&root, &tenant).map_err(|e| Error::io(&root, e))
    })
    .await
    .map_err(|e| Error::Internal(format!("staging sweep: {e}")))?
}

/// Index files an interrupted prune was removing and that are all gone now
/// are recorded as removed (a later reappearance is then a rollback).
fn finish_index_removal(repo: &Repo, index: &Index) -> Result<()> {
    let state = &repo.context().state;
    let removing = state.tenant_memory(repo.tenant())?.removing_indexes;
    if !removing.is_empty() && !index.files.iter().any(|(id, _)| removing.contains(id)) {
        state.update_tenant_memory(repo.tenant(), |m| {
            let done = std::mem::take(&mut m.removing_indexes);
            m.removed_indexes.extend(done);
        })?;
    }
    Ok(())
}

/// Whether an epoch's index is in more files than consolidating would
/// leave by more than a quarter (at least one file): each backup adds a
/// small file, and a prune that rewrote an index of millions of blobs for
/// each of them would rewrite it daily; this way a large index is
/// rewritten once every few dozen backups, a small one at every prune.
fn index_fragmented(index: &Index) -> bool {
    let max = crate::hooks::index_file_blobs();
    let mut blobs: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, loc) in index.blobs() {
        *blobs.entry(index.pack(loc).1).or_default() += 1;
    }
    let mut files: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, epoch) in &index.files {
        *files.entry(*epoch).or_default() += 1;
    }
    files.iter().any(|(epoch, &n)| {
        let needed = blobs.get(epoch).copied().unwrap_or(0).div_ceil(max).max(1);
        n > needed + needed / 4
    })
}

fn epochs_in(index: &Index) -> Vec<u32> {
    let mut e: Vec<u32> = index.packs().map(|(_, e)| e).collect();
    e.sort_unstable();
    e.dedup();
    e
}

impl crate::report::JobOutput for PruneReport {
    fn metrics(&self) -> crate::report::JobMetrics {
        crate::report::JobMetrics {
            bytes_stored: Some(self.bytes_written),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ids::{BlobId, IndexId, PackId};
    use crate::format::index::{IndexFile, MAX_FILE_BLOBS};
    use crate::format::pack::{BlobKind, PackEntry};
    use crate::repo::index::IndexBuilder;

    /// An index of epoch 1 whose files hold `sizes` blobs each.
    fn index(sizes: &[usize]) -> Index {
        let mut b = IndexBuilder::default();
        for &blobs in sizes {
            let entries: Vec<PackEntry> = (0..blobs)
                .map(|i| PackEntry {
                    id: BlobId::random(),
                    kind: BlobKind::Data,
                    segment: i as u32,
                    offset: 84,
                    sealed_len: 100,
                    raw_len: 80,
                })
                .collect();
            let file = IndexFile {
                packs: vec![(PackId::random(), entries)],
            };
            b.add_file(IndexId::random(), 1, &file);
        }
        b.build()
    }

    /// A small index is consolidated as soon as it has a second file; a
    /// large one only once its small files add a quarter to what it needs.
    #[test]
    fn an_index_is_consolidated_once_fragmented_by_a_quarter() {
        assert!(!index_fragmented(&index(&[10])));
        assert!(index_fragmented(&index(&[10, 1])));
        // 40 full files and some small ones need 41: 51 are left alone.
        let with_small = |n: usize| {
            let mut sizes = vec![MAX_FILE_BLOBS; 40];
            sizes.extend(std::iter::repeat_n(1, n));
            index(&sizes)
        };
        assert!(!index_fragmented(&with_small(11)));
        assert!(index_fragmented(&with_small(12)));
    }
}
