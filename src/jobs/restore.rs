//! `custos restore`: writes a snapshot back to a directory.
//!
//! Files are restored in batches: the blobs a batch needs are grouped by pack,
//! packs are read concurrently (coalesced ranges), each blob is decrypted,
//! decompressed and checked against its keyed id, then written at its offsets
//! into temporary files. A file is renamed into place only once every one of
//! its blobs was verified and written; modes and mtimes are set last.
//! Never writes outside the target: stored paths are validated, and existing
//! symlinks in the way are refused rather than followed.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;

use super::Progress;
use crate::config::PathGlobs;
use crate::error::{Error, Result};
use crate::format::ids::{BlobId, IdMap, PackId, SnapshotId};
use crate::format::pack::{PackEntry, TRAILER_LEN, directory_range, open_blob, open_directory};
use crate::format::seal::{HEADER_LEN, ObjectKind, Opener};
use crate::format::snapshot::Snapshot;
use crate::format::tree::{Entry, EntryKind};
use crate::keys::derive::EpochKeys;
use crate::pipeline::blobs::get_pack_ranges;
use crate::pipeline::tree::TreeReader;
use crate::repo::{Index, Location, Repo};
use crate::store::ObjectName;

pub struct RestoreOptions {
    pub target: PathBuf,
    /// Globs over snapshot paths; a matching directory brings its subtree. Empty: everything.
    pub include: Vec<String>,
    pub overwrite: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreReport {
    pub snapshot: Option<SnapshotId>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub duration_ms: u64,
}

const BATCH_BYTES: u64 = 256 << 20;
const BATCH_FILES: usize = 4096;
const PACKS_IN_FLIGHT: usize = 4;
/// Blobs closer than this in a pack are fetched in one range request.
const COALESCE_GAP: u64 = 256 << 10;
const MAX_RANGE: u64 = 16 << 20;

/// Snapshot paths of the files a restore is limited to (a drill's sample).
pub type FileSet = HashSet<Vec<u8>>;

pub async fn run(
    repo: &Repo,
    snapshot: &Snapshot,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let started = Instant::now();
    repo.require_active("restore")?;
    let index = repo.load_index_strict().await?;
    run_with(repo, &index, snapshot, opts, None, progress, started).await
}

/// [`run`] with the index already loaded (a drill reuses it to verify the
/// result), optionally restoring only the files in `only`: on top of
/// `include`, a file is then restored only if its path is in the set,
/// directories only where a selected file needs them, and no symlinks.
/// `started` is when the caller's clock began (the report's duration).
pub async fn run_with(
    repo: &Repo,
    index: &Index,
    snapshot: &Snapshot,
    opts: &RestoreOptions,
    only: Option<&FileSet>,
    progress: &dyn Progress,
    started: Instant,
) -> Result<RestoreReport> {
    repo.require_active("restore")?;
    let include = PathGlobs::new(&opts.include)
        .map_err(|e| Error::InvalidArgument(format!("--include: {e}")))?;
    prepare_target(&opts.target, opts.overwrite)?;
    let keys = repo.epoch_keys(snapshot.epoch).await?;
    let pack_sizes = repo.list_packs().await?;
    let mut tree = TreeReader::new(
        repo,
        index,
        &snapshot.tree,
        format!("tree of snapshot {}", snapshot.id),
    );
    let mut r = Restorer {
        repo,
        index,
        pack_sizes,
        keys: keys.clone(),
        target: opts.target.clone(),
        include,
        filter: !opts.include.is_empty(),
        only,
        overwrite: opts.overwrite,
        ancestors: Vec::new(),
        dirs: Vec::new(),
        batch: Batch::default(),
        report: RestoreReport {
            snapshot: Some(snapshot.id),
            ..Default::default()
        },
        progress,
    };
    let result = async {
        while let Some(e) = tree.next_entry().await? {
            r.entry(e).await?;
        }
        r.flush().await?;
        r.finish_dirs()
    }
    .await;
    if result.is_err() {
        r.batch.discard();
    }
    result?;
    r.report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(r.report)
}

/// The target must not be a symlink, and must be empty unless overwriting.
fn prepare_target(target: &Path, overwrite: bool) -> Result<()> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() => {
            let to = fs::read_link(target)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            Err(Error::InvalidArgument(format!(
                "restore target {} is a symlink (to {to}); give the real directory instead",
                target.display()
            )))
        }
        Ok(m) if !m.is_dir() => Err(Error::InvalidArgument(format!(
            "restore target {} is not a directory",
            target.display()
        ))),
        Ok(_) => {
            let non_empty = fs::read_dir(target)
                .map_err(|e| Error::io(target, e))?
                .next()
                .is_some();
            if non_empty && !overwrite {
                return Err(Error::InvalidArgument(format!(
                    "restore target {} is not empty (use --overwrite to restore over existing files)",
                    target.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(target).map_err(|e| Error::io(target, e))
        }
        Err(e) => Err(Error::io(target, e)),
    }
}

struct PendingFile {
    final_path: PathBuf,
    temp_path: PathBuf,
    file: Arc<File>,
    entry: Entry,
}

#[derive(Default)]
struct Batch {
    files: Vec<PendingFile>,
    bytes: u64,
}

impl Batch {
    fn discard(&mut self) {
        for f in self.files.drain(..) {
            let _ = fs::remove_file(&f.temp_path);
        }
        self.bytes = 0;
    }
}

struct Restorer<'a> {
    repo: &'a Repo,
    index: &'a Index,
    /// Size of every pack in the store, listed once.
    pack_sizes: BTreeMap<PackId, u64>,
    keys: Arc<EpochKeys>,
    target: PathBuf,
    include: PathGlobs,
    filter: bool,
    only: Option<&'a FileSet>,
    overwrite: bool,
    /// Directory entries above the current entry, with whether each was created.
    ancestors: Vec<(Entry, bool)>,
    /// Directories created, for modes and mtimes once their content is in place.
    dirs: Vec<(PathBuf, u32, i64)>,
    batch: Batch,
    report: RestoreReport,
    progress: &'a dyn Progress,
}

impl Restorer<'_> {
    fn dest(&self, e: &Entry) -> PathBuf {
        self.target.join(OsStr::from_bytes(&e.path))
    }

    fn corrupt(&self, why: String) -> Error {
        Error::corrupt(
            format!("tree of a snapshot of tenant {}", self.repo.tenant()),
            why,
        )
    }

    async fn entry(&mut self, e: Entry) -> Result<()> {
        // Keep only the ancestors of this entry; its parent must be a directory.
        while let Some((top, _)) = self.ancestors.last() {
            if e.path.starts_with(&top.path) && e.path.get(top.path.len()) == Some(&b'/') {
                break;
            }
            self.ancestors.pop();
        }
        let has_parent = e.path.contains(&b'/');
        if has_parent && self.ancestors.is_empty() {
            return Err(self.corrupt(format!(
                "{} has no parent directory entry",
                e.display_path()
            )));
        }
        let selected = (!self.filter
            || self.include.is_match(Path::new(OsStr::from_bytes(&e.path)))
            || self
                .ancestors
                .iter()
                .any(|(a, _)| self.include.is_match(Path::new(OsStr::from_bytes(&a.path)))))
            && self
                .only
                .is_none_or(|set| e.kind == EntryKind::File && set.contains(&e.path));
        if selected {
            self.create_ancestors()?;
        }
        match e.kind {
            EntryKind::Dir => {
                let created = if selected { self.make_dir(&e)? } else { false };
                self.ancestors.push((e, created));
            }
            EntryKind::Symlink if selected => self.make_symlink(&e)?,
            EntryKind::File if selected => self.add_file(e).await?,
            _ => {}
        }
        Ok(())
    }

    fn create_ancestors(&mut self) -> Result<()> {
        for i in 0..self.ancestors.len() {
            if !self.ancestors[i].1 {
                let e = self.ancestors[i].0.clone();
                self.make_dir(&e)?;
                self.ancestors[i].1 = true;
            }
        }
        Ok(())
    }

    fn make_dir(&mut self, e: &Entry) -> Result<bool> {
        let path = self.dest(e);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && !m.file_type().is_symlink() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::InvalidArgument(format!(
                    "{} exists as a symlink; refusing to restore through it",
                    path.display()
                )));
            }
            Ok(_) if self.overwrite => {
                fs::remove_file(&path).map_err(|err| Error::io(&path, err))?;
                fs::create_dir(&path).map_err(|err| Error::io(&path, err))?;
            }
            Ok(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{} exists and is not a directory",
                    path.display()
                )));
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(&path).map_err(|err| Error::io(&path, err))?;
            }
            Err(err) => return Err(Error::io(&path, err)),
        }
        // Owner-writable until the end, whatever the stored mode, so content can go in.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .map_err(|err| Error::io(&path, err))?;
        self.dirs.push((path, e.mode, e.mtime_ns));
        self.report.dirs += 1;
        Ok(true)
    }

    fn make_symlink(&mut self, e: &Entry) -> Result<()> {
        let path = self.dest(e);
        let target = e
            .target
            .as_ref()
            .ok_or_else(|| self.corrupt(format!("symlink {} has no target", e.display_path())))?;
        let tmp = temp_name(&path);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), &tmp)
            .map_err(|err| Error::io(&tmp, err))?;
        self.replace(&tmp, &path)?;
        let t = filetime::FileTime::from_unix_time(
            e.mtime_ns.div_euclid(1_000_000_000),
            e.mtime_ns.rem_euclid(1_000_000_000) as u32,
        );
        let _ = filetime::set_symlink_file_times(&path, t, t);
        self.report.symlinks += 1;
        Ok(())
    }

    /// Renames `tmp` over `dest`, refusing to replace a directory or (without
    /// --overwrite) anything at all.
    fn replace(&self, tmp: &Path, dest: &Path) -> Result<()> {
        match fs::symlink_metadata(dest) {
            Ok(m) if m.is_dir() => {
                let _ = fs::remove_file(tmp);
                return Err(Error::InvalidArgument(format!(
                    "{} exists and is a directory",
                    dest.display()
                )));
            }
            Ok(_) if !self.overwrite => {
                let _ = fs::remove_file(tmp);
                return Err(Error::InvalidArgument(format!(
                    "{} exists (use --overwrite)",
                    dest.display()
                )));
            }
            _ => {}
        }
        fs::rename(tmp, dest).map_err(|err| {
            let _ = fs::remove_file(tmp);
            Error::io(dest, err)
        })
    }

    async fn add_file(&mut self, e: Entry) -> Result<()> {
        let final_path = self.dest(&e);
        let temp_path = temp_name(&final_path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc_o_nofollow())
            .mode(0o600)
            .open(&temp_path)
            .map_err(|err| Error::io(&temp_path, err))?;
        // Sized up front: zero runs are then simply not written (sparse files stay sparse).
        file.set_len(e.size)
            .map_err(|err| Error::io(&temp_path, err))?;
        self.batch.bytes += e.size;
        self.batch.files.push(PendingFile {
            final_path,
            temp_path,
            file: Arc::new(file),
            entry: e,
        });
        if self.batch.bytes >= BATCH_BYTES || self.batch.files.len() >= BATCH_FILES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Fetches, verifies and writes every blob of the batch, then puts its files in place.
    async fn flush(&mut self) -> Result<()> {
        if self.batch.files.is_empty() {
            return Ok(());
        }
        // Plan: for each pack, the blobs needed and where each goes.
        let mut plan: BTreeMap<u32, IdMap<BlobId, PlannedBlob>> = BTreeMap::new();
        for (fi, f) in self.batch.files.iter().enumerate() {
            let mut offset = 0u64;
            for id in &f.entry.blobs {
                let loc = *self.index.get(id).ok_or_else(|| {
                    Error::missing(
                        format!("blob {id} of tenant {}", self.repo.tenant()),
                        format!("needed by {} but in no index file", f.entry.display_path()),
                    )
                })?;
                plan.entry(loc.pack)
                    .or_default()
                    .entry(*id)
                    .or_insert_with(|| PlannedBlob {
                        id: *id,
                        loc,
                        targets: Vec::new(),
                    })
                    .targets
                    .push((fi, offset));
                offset += loc.raw_len as u64;
            }
            if offset != f.entry.size {
                return Err(self.corrupt(format!(
                    "{}: blobs add up to {offset} bytes, entry says {}",
                    f.entry.display_path(),
                    f.entry.size
                )));
            }
        }
        let files: Arc<Vec<(Arc<File>, PathBuf)>> = Arc::new(
            self.batch
                .files
                .iter()
                .map(|f| (f.file.clone(), f.final_path.clone()))
                .collect(),
        );
        let jobs = plan.into_values().map(|blobs| {
            let blobs: Vec<PlannedBlob> = blobs.into_values().collect();
            let (pack, _) = self.index.pack(&blobs[0].loc);
            self.restore_pack(pack, blobs, files.clone())
        });
        let mut stream = futures::stream::iter(jobs).buffer_unordered(PACKS_IN_FLIGHT);
        while let Some(r) = stream.next().await {
            let written = r?;
            self.progress.bytes_read(written);
        }
        drop(stream);
        for f in std::mem::take(&mut self.batch.files) {
            let e = &f.entry;
            let apply = || -> std::io::Result<()> {
                f.file
                    .set_permissions(fs::Permissions::from_mode(e.mode & 0o7777))?;
                let t = filetime::FileTime::from_unix_time(
                    e.mtime_ns.div_euclid(1_000_000_000),
                    e.mtime_ns.rem_euclid(1_000_000_000) as u32,
                );
                filetime::set_file_handle_times(&f.file, Some(t), Some(t))?;
                Ok(())
            };
            if let Err(err) = apply() {
                let _ = fs::remove_file(&f.temp_path);
                return Err(Error::io(&f.final_path, err));
            }
            if is_root() {
                let _ = std::os::unix::fs::lchown(&f.temp_path, Some(e.uid), Some(e.gid));
            }
            self.replace(&f.temp_path, &f.final_path)?;
            self.report.files += 1;
            self.report.bytes += e.size;
        }
        self.batch.bytes = 0;
        Ok(())
    }

    /// Reads the needed parts of one pack and writes its blobs to their files.
    fn restore_pack(
        &self,
        pack: PackId,
        mut blobs: Vec<PlannedBlob>,
        files: Arc<Vec<(Arc<File>, PathBuf)>>,
    ) -> impl Future<Output = Result<u64>> + use<> {
        let store = self.repo.store().clone();
        let keys = self.keys.clone();
        let size = self.pack_sizes.get(&pack).copied();
        blobs.sort_by_key(|b| b.loc.offset);
        async move {
            let name = ObjectName::Pack(pack);
            let object = store.display(&name);
            let size = size.ok_or_else(|| Error::missing(&object, "pack is not in the store"))?;
            // Header and trailer first: whose pack it is, and where its directory
            // lies. The directory is authenticated too, so a truncated, extended or
            // rearranged pack is caught, not only a bad blob.
            let ends = [
                0..HEADER_LEN as u64,
                size.saturating_sub(TRAILER_LEN as u64)..size,
            ];
            let head = get_pack_ranges(&store, &keys, pack, &ends).await?;
            let opener = Opener::new(&keys, ObjectKind::Pack, Some(&pack.0), &head[0])
                .map_err(|e| e.at(&object))?;
            let (n, dir_range) = directory_range(size, &head[1]).map_err(|e| e.at(&object))?;
            let mut ranges = coalesce(&blobs);
            if let Some(r) = ranges.iter().find(|r| r.end > dir_range.start) {
                return Err(Error::corrupt(
                    &object,
                    format!(
                        "the index places a blob at {}..{}, past the pack's blobs (truncated or replaced pack)",
                        r.start, r.end
                    ),
                ));
            }
            ranges.push(dir_range);
            let mut parts = get_pack_ranges(&store, &keys, pack, &ranges).await?;
            let dir = parts.pop().expect("directory range");
            ranges.pop();
            tokio::task::spawn_blocking(move || -> Result<u64> {
                let directory =
                    open_directory(&opener, n, &dir, size).map_err(|e| e.at(&object))?;
                let mut written = 0u64;
                for b in &blobs {
                    let (start, end) = (
                        b.loc.offset as u64,
                        b.loc.offset as u64 + b.loc.sealed_len as u64,
                    );
                    let ri = ranges
                        .iter()
                        .position(|r| r.start <= start && end <= r.end)
                        .expect("every blob is in a planned range");
                    let sealed = parts[ri]
                        .get((start - ranges[ri].start) as usize..(end - ranges[ri].start) as usize)
                        .ok_or_else(|| {
                            Error::corrupt(
                                &object,
                                "pack is shorter than its index says (truncated)",
                            )
                        })?;
                    let entry = PackEntry {
                        id: b.id,
                        kind: b.loc.kind,
                        segment: b.loc.segment,
                        offset: b.loc.offset,
                        sealed_len: b.loc.sealed_len,
                        raw_len: b.loc.raw_len,
                    };
                    if directory.get(b.loc.segment as usize) != Some(&entry) {
                        return Err(Error::corrupt(
                            &object,
                            format!(
                                "the index entry of blob {} disagrees with the pack directory",
                                b.id.short()
                            ),
                        ));
                    }
                    let plain =
                        open_blob(&opener, &keys, &entry, sealed).map_err(|e| e.at(&object))?;
                    if plain.iter().all(|&x| x == 0) {
                        continue; // the file was sized up front: zeros are a hole already
                    }
                    for &(fi, offset) in &b.targets {
                        let (file, path) = &files[fi];
                        file.write_all_at(&plain, offset)
                            .map_err(|e| Error::io(path, e))?;
                        written += plain.len() as u64;
                    }
                }
                Ok(written)
            })
            .await
            .map_err(|e| Error::Internal(format!("restore worker panicked: {e}")))?
        }
    }

    fn finish_dirs(&mut self) -> Result<()> {
        for (path, mode, mtime_ns) in self.dirs.iter().rev() {
            fs::set_permissions(path, fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| Error::io(path, e))?;
            let t = filetime::FileTime::from_unix_time(
                mtime_ns.div_euclid(1_000_000_000),
                mtime_ns.rem_euclid(1_000_000_000) as u32,
            );
            filetime::set_file_times(path, t, t).map_err(|e| Error::io(path, e))?;
        }
        Ok(())
    }
}

fn temp_name(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".custos-{}.tmp",
        hex::encode(crate::util::random_bytes::<6>())
    ))
}

fn libc_o_nofollow() -> i32 {
    // O_NOFOLLOW on Linux (all architectures custos builds for).
    0o400000
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

/// One blob a batch needs, and where it goes: (file in the batch, offset).
struct PlannedBlob {
    id: BlobId,
    loc: Location,
    targets: Vec<(usize, u64)>,
}

/// Byte ranges to fetch from a pack: the blobs (sorted by offset), merged
/// where they are close, up to a bounded range size.
fn coalesce(blobs: &[PlannedBlob]) -> Vec<std::ops::Range<u64>> {
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::with_capacity(blobs.len() + 1);
    for b in blobs {
        let (start, end) = (
            b.loc.offset as u64,
            b.loc.offset as u64 + b.loc.sealed_len as u64,
        );
        match ranges.last_mut() {
            Some(last) if start <= last.end + COALESCE_GAP && end - last.start <= MAX_RANGE => {
                last.end = last.end.max(end)
            }
            _ => ranges.push(start..end),
        }
    }
    ranges
}

impl crate::report::JobOutput for RestoreReport {
    fn metrics(&self) -> crate::report::JobMetrics {
        crate::report::JobMetrics {
            bytes_in: Some(self.bytes),
            files: Some(self.files),
            snapshot: self.snapshot.map(|s| s.to_hex()),
            ..Default::default()
        }
    }
}
