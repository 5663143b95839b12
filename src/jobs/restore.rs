//! `custos restore`: writes a snapshot back to a directory.
//!
//! Files are restored in batches: the blobs a batch needs are grouped by pack,
//! packs are read concurrently (streamed front to back in one request when
//! at least half of a pack is wanted or the pack is small, each run of blobs
//! written as it arrives; else coalesced ranges), each blob is decrypted,
//! decompressed and checked against its keyed id, then written at its offsets
//! into temporary files. A file is renamed into place only once every one of
//! its blobs was verified and written; owners, modes and mtimes are set
//! first (owner before mode: a chown clears setuid/setgid bits).
//!
//! Never writes outside the target: the target is opened once and every
//! entry is created, linked, renamed and changed relative to a handle of its
//! directory, opened without following symlinks (see [`beneath`]), so a
//! directory swapped for a symlink while the restore runs cannot redirect a
//! write. Temporary entries are removed when a restore fails or is cancelled.
//! Hard links recorded in the tree are restored as hard links.

mod beneath;
mod packs;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::time::Instant;

use rustix::fs::{AtFlags, Gid, Mode, Timespec, Timestamps, Uid};
use rustix::io::Errno;

use self::beneath::{PlaceError, Target, TempEntry, TempNames, file_name, parent, shown};
use self::packs::{PackPlan, PackReads, PlannedBlob, ReadLimits, read_outcome};
use super::Progress;
use crate::config::PathGlobs;
use crate::error::{Error, Result};
use crate::format::ids::{BlobId, IdMap, PackId, SnapshotId};
use crate::format::snapshot::Snapshot;
use crate::format::tree::{Entry, EntryKind};
use crate::keys::derive::EpochKeys;
use crate::pipeline::tree::TreeReader;
use crate::repo::{Index, Repo};

pub struct RestoreOptions {
    pub target: PathBuf,
    /// Globs over snapshot paths; a matching directory brings its subtree. Empty: everything.
    pub include: Vec<String>,
    pub overwrite: bool,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreReport {
    pub snapshot: Option<SnapshotId>,
    /// Files restored, hard links among them.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Files restored as a hard link to another restored name of the same inode.
    pub hardlinks: u64,
    pub bytes: u64,
    pub duration_ms: u64,
}

const BATCH_BYTES: u64 = 256 << 20;
const BATCH_FILES: usize = 4096;

/// Files a batch takes at most: [`BATCH_FILES`], fewer when the open-file
/// limit is low. Each file of a batch stays open (with, at worst, a handle of
/// its own directory) until it is placed, and two batches are open at once.
fn batch_files() -> usize {
    use rustix::process::{Resource, getrlimit};
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let fit = soft.saturating_sub(256) / 4;
    crate::hooks::restore_batch_files(BATCH_FILES.min(fit.max(16) as usize))
}
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
    let target = Target::open(&opts.target, opts.overwrite)?;
    // The packs are listed after the index was loaded, never beside it: a
    // pack is stored before any index file names it, so every pack the index
    // names is in a listing made later (one made alongside could miss a pack
    // that a prune or backup stored meanwhile, and fail the restore). The
    // key (if not yet unwrapped) meanwhile.
    let (keys, pack_sizes) = tokio::try_join!(repo.epoch_keys(snapshot.epoch), repo.list_packs())?;
    let mut tree = TreeReader::new(
        repo,
        index,
        &snapshot.tree,
        format!("tree of snapshot {}", snapshot.id),
    );
    let mut r = Restorer {
        repo,
        index,
        blob_ends: std::cell::OnceCell::new(),
        pack_sizes,
        limits: ReadLimits::new(),
        keys: keys.clone(),
        root: target.fd,
        target: target.path,
        include,
        filter: !opts.include.is_empty(),
        only,
        overwrite: opts.overwrite,
        chown: rustix::process::geteuid().is_root(),
        temp: TempNames::new(),
        ancestors: Vec::new(),
        dirs: Vec::new(),
        links: HashMap::new(),
        batch: Batch::default(),
        batch_files: batch_files(),
        in_flight: None,
        report: RestoreReport {
            snapshot: Some(snapshot.id),
            ..Default::default()
        },
        progress,
    };
    // On failure the batch's temporary files are removed as it is dropped.
    while let Some(e) = tree.next_entry().await? {
        r.entry(e).await?;
    }
    r.finish_batches().await?;
    r.finish_dirs()?;
    r.report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(r.report)
}

/// A file of the batch: its content goes into `file`, under a temporary name
/// until it is complete.
struct PendingFile {
    temp: TempEntry,
    file: Arc<File>,
    /// The final path, for messages.
    shown: PathBuf,
    entry: Entry,
    /// Carried over from the batch before, which wrote all its blobs but
    /// those of the packs it deferred ([`Batch::carried_packs`]).
    carried: bool,
}

/// A later name of a hard-link group whose first restored name is in this
/// batch or an earlier one: linked once that name is in place.
struct PendingLink {
    dir: Arc<OwnedFd>,
    entry: Entry,
    to: LinkSource,
}

#[derive(Default)]
struct Batch {
    files: Vec<PendingFile>,
    links: Vec<PendingLink>,
    bytes: u64,
    /// Packs (by index slot) whose reads the batch before deferred to this
    /// one ([`Restorer::start_batch`]): read here, whatever is wanted of
    /// them, and the only packs read for the files it carried over.
    carried_packs: HashSet<u32>,
}

/// A batch whose pack reads run: one task drives them (at most
/// [`packs::PACKS_IN_FLIGHT`] at once, created as they start). Dropped on failure,
/// which aborts the task, stops its blocking writers before their next blob
/// and removes the batch's temporary files.
struct InFlight {
    /// Declared first: dropped (the abort requested) before the files are unlinked.
    reads: tokio::task::JoinSet<Result<()>>,
    /// Set when the batch is dropped: a blocking writer of its blobs stops
    /// before the next (an abort cannot interrupt it).
    stop: Arc<AtomicBool>,
    /// Bytes written so far, reported as progress while the next batch fills.
    written: Arc<AtomicU64>,
    reported: u64,
    files: Vec<PendingFile>,
    links: Vec<PendingLink>,
}

impl InFlight {
    /// Bytes its reads wrote since this was last asked.
    fn newly_written(&mut self) -> u64 {
        let written = self.written.load(Ordering::Relaxed);
        let new = written - self.reported;
        self.reported = written;
        new
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The first name restored of a hard-link group, and its inode, so a later
/// name is linked to exactly that file.
#[derive(Clone)]
struct LinkSource {
    path: Vec<u8>,
    dev: u64,
    ino: u64,
    size: u64,
    /// The blob list of the first name: every name of a group has the same.
    blobs: Arc<[BlobId]>,
}

/// A directory entry above the current entry, and its handle once created.
struct Ancestor {
    entry: Entry,
    dir: Option<Arc<OwnedFd>>,
}

/// A created directory, finished (owner, mode, mtime) once its content is in place.
struct DirToFinish {
    path: Vec<u8>,
    /// Its inode: what is found at `path` when finishing must be this directory.
    dev: u64,
    ino: u64,
    mode: u32,
    mtime_ns: i64,
    uid: u32,
    gid: u32,
}

struct Restorer<'a> {
    repo: &'a Repo,
    index: &'a Index,
    /// Where each pack's indexed blobs end, by slot: computed when a first
    /// batch considers deferring a pack ([`Restorer::start_batch`]).
    blob_ends: std::cell::OnceCell<Vec<u64>>,
    /// Size of every pack in the store, listed once.
    pack_sizes: BTreeMap<PackId, u64>,
    /// What the pack reads of every batch share.
    limits: ReadLimits,
    keys: Arc<EpochKeys>,
    /// The target directory, opened once: everything is created beneath it.
    root: Arc<OwnedFd>,
    /// The target's path, for messages only.
    target: PathBuf,
    include: PathGlobs,
    filter: bool,
    only: Option<&'a FileSet>,
    overwrite: bool,
    /// Restore owners (root only; cleared after the first refusal, see
    /// [`Restorer::owner_refused`]). Without it, files get no set-id bits.
    chown: bool,
    temp: TempNames,
    /// Directory entries above the current entry, each with its handle once created.
    ancestors: Vec<Ancestor>,
    /// Directories created, for owners, modes and mtimes once their content is in place.
    dirs: Vec<DirToFinish>,
    /// Hard-link groups (the `hardlink` value) → the name restored first.
    links: HashMap<Vec<u8>, LinkSource>,
    batch: Batch,
    /// Files (and links) a batch takes at most ([`batch_files`]).
    batch_files: usize,
    /// The batch before `batch`, whose reads run while `batch` fills.
    in_flight: Option<InFlight>,
    report: RestoreReport,
    progress: &'a dyn Progress,
}

/// A pack a batch wants blobs of.
struct BatchPack {
    slot: u32,
    plan: PackPlan,
    /// Whether the pack's indexed blobs go on past the last one the batch
    /// wants, and it may be deferred (not the last batch, nor a pack the
    /// batch before deferred).
    goes_on: bool,
}

/// What a batch reads now, and what it leaves to the next batch.
struct Deferral {
    packs: Vec<PackPlan>,
    /// Slots of the packs deferred.
    deferred: HashSet<u32>,
    /// The batch's files (by index) that need them: carried over.
    carry: HashSet<usize>,
}

/// Defers the packs that go on past what a batch of `files` files wants
/// (see [`Restorer::start_batch`]), unless that would leave the batch
/// nothing to read or carry more than half of its files over.
fn defer_packs(planned: Vec<BatchPack>, files: usize) -> Deferral {
    let mut out = Deferral {
        packs: Vec::with_capacity(planned.len()),
        deferred: HashSet::new(),
        carry: HashSet::new(),
    };
    let mut deferred = Vec::new();
    for p in planned {
        if p.goes_on {
            let targets = p.plan.2.iter().flat_map(|b| b.targets.iter());
            out.carry.extend(targets.map(|&(fi, _)| fi));
            out.deferred.insert(p.slot);
            deferred.push(p.plan);
        } else {
            out.packs.push(p.plan);
        }
    }
    if out.packs.is_empty() || out.carry.len() > files / 2 {
        out.packs.append(&mut deferred);
        out.deferred.clear();
        out.carry.clear();
    }
    out
}

fn timestamps(mtime_ns: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime_ns.div_euclid(1_000_000_000),
        tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

impl Restorer<'_> {
    fn shown(&self, rel: &[u8]) -> PathBuf {
        shown(&self.target, rel)
    }

    fn corrupt(&self, why: String) -> Error {
        Error::corrupt(
            format!("tree of a snapshot of tenant {}", self.repo.tenant()),
            why,
        )
    }

    fn io(&self, rel: &[u8], err: impl Into<std::io::Error>) -> Error {
        let err: std::io::Error = err.into();
        let err = match err.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => std::io::Error::new(
                err.kind(),
                format!("{err}: raise the open-file limit (`ulimit -n`, LimitNOFILE=)"),
            ),
            _ => err,
        };
        Error::io(self.shown(rel), err)
    }

    fn unsafe_target(&self, rel: &[u8], reason: &str) -> Error {
        Error::UnsafeTarget {
            path: self.shown(rel),
            reason: reason.to_owned(),
        }
    }

    /// A directory this restore created could not be found again at its path:
    /// someone replaced (ELOOP, ENOTDIR), moved or removed (ENOENT) it meanwhile.
    fn moved(&self, rel: &[u8], err: std::io::Error) -> Error {
        match err.raw_os_error() {
            Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV) => self.unsafe_target(
                rel,
                "is no longer a directory (a symlink or file was put in its place)",
            ),
            Some(libc::ENOENT) => self.unsafe_target(rel, "was moved or removed while restoring"),
            _ => self.io(rel, err),
        }
    }

    fn place_error(&self, rel: &[u8], err: PlaceError) -> Error {
        match err {
            PlaceError::Exists => Error::InvalidArgument(format!(
                "{} exists (use --overwrite)",
                self.shown(rel).display()
            )),
            PlaceError::IsDir => Error::InvalidArgument(format!(
                "{} exists and is a directory",
                self.shown(rel).display()
            )),
            PlaceError::Io(e) => self.io(rel, e),
        }
    }

    async fn entry(&mut self, e: Entry) -> Result<()> {
        // Keep only the ancestors of this entry; its parent must be the last.
        while let Some(top) = self.ancestors.last() {
            if e.path.starts_with(&top.entry.path)
                && e.path.get(top.entry.path.len()) == Some(&b'/')
            {
                break;
            }
            self.ancestors.pop();
        }
        if parent(&e.path) != self.ancestors.last().map(|a| &a.entry.path[..]) {
            return Err(self.corrupt(format!(
                "{} has no parent directory entry",
                e.display_path()
            )));
        }
        let selected = (!self.filter
            || self.include.is_match(Path::new(OsStr::from_bytes(&e.path)))
            || self.ancestors.iter().any(|a| {
                self.include
                    .is_match(Path::new(OsStr::from_bytes(&a.entry.path)))
            }))
            && self
                .only
                .is_none_or(|set| e.kind == EntryKind::File && set.contains(&e.path));
        if !selected {
            if e.kind == EntryKind::Dir {
                self.ancestors.push(Ancestor {
                    entry: e,
                    dir: None,
                });
            }
            return Ok(());
        }
        self.create_ancestors()?;
        let dir = self.parent_dir();
        match e.kind {
            EntryKind::Dir => {
                let fd = self.make_dir(&dir, &e)?;
                self.ancestors.push(Ancestor {
                    entry: e,
                    dir: Some(fd),
                });
            }
            EntryKind::Symlink => self.make_symlink(&dir, &e)?,
            EntryKind::File => self.add_file(dir, e).await?,
        }
        Ok(())
    }

    /// The handle of the current entry's parent (the target at the top).
    /// Called after [`Restorer::create_ancestors`], so every ancestor has one.
    fn parent_dir(&self) -> Arc<OwnedFd> {
        self.ancestors
            .last()
            .and_then(|a| a.dir.clone())
            .unwrap_or_else(|| self.root.clone())
    }

    /// Creates the directories above a selected entry that were not selected themselves.
    fn create_ancestors(&mut self) -> Result<()> {
        for i in 0..self.ancestors.len() {
            if self.ancestors[i].dir.is_none() {
                let parent = match i {
                    0 => self.root.clone(),
                    _ => self.ancestors[i - 1]
                        .dir
                        .clone()
                        .ok_or_else(|| Error::Internal("restore: ancestor not created".into()))?,
                };
                let e = self.ancestors[i].entry.clone();
                let fd = self.make_dir(&parent, &e)?;
                self.ancestors[i].dir = Some(fd);
            }
        }
        Ok(())
    }

    /// Creates (or, restoring over existing files, opens) the directory of
    /// `e` in `parent` and returns its handle. A symlink in its place is
    /// refused, never followed, whether it was there before or appears
    /// while the restore runs.
    fn make_dir(&mut self, parent: &OwnedFd, e: &Entry) -> Result<Arc<OwnedFd>> {
        let name = file_name(&e.path);
        let dir = parent.as_fd();
        match rustix::fs::mkdirat(dir, name, Mode::RWXU) {
            Ok(()) => {}
            Err(Errno::EXIST) if self.overwrite => {}
            // Without --overwrite the target was empty when the restore
            // began: a directory here now was made by someone else, who may
            // have put files in it (and would get it owned as stored).
            Err(Errno::EXIST) => {
                return Err(self.unsafe_target(
                    &e.path,
                    "appeared while restoring; without --overwrite nothing already there is used",
                ));
            }
            // ENOENT: the parent was removed after we opened it.
            Err(err) => return Err(self.moved(&e.path, err.into())),
        }
        let fd = match beneath::open_dir(dir, name) {
            Ok(fd) => fd,
            Err(err) if matches!(err.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                self.replace_with_dir(dir, e)?
            }
            // ENOENT: the directory just made was moved away before we opened it.
            Err(err) => return Err(self.moved(&e.path, err)),
        };
        // Owner-writable until the end, whatever the stored mode, so content
        // can go in (and no one else can meanwhile).
        rustix::fs::fchmod(&fd, Mode::RWXU).map_err(|err| self.io(&e.path, err))?;
        let st = rustix::fs::fstat(&fd).map_err(|err| self.io(&e.path, err))?;
        self.dirs.push(DirToFinish {
            path: e.path.clone(),
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: e.mode,
            mtime_ns: e.mtime_ns,
            uid: e.uid,
            gid: e.gid,
        });
        self.report.dirs += 1;
        Ok(Arc::new(fd))
    }

    /// Something other than a directory is where the directory of `e` goes.
    fn replace_with_dir(&self, dir: std::os::fd::BorrowedFd<'_>, e: &Entry) -> Result<OwnedFd> {
        let name = file_name(&e.path);
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| self.moved(&e.path, err.into()))?;
        let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if kind == rustix::fs::FileType::Symlink {
            return Err(self.unsafe_target(
                &e.path,
                "exists as a symlink; refusing to restore through it",
            ));
        }
        if kind == rustix::fs::FileType::Directory {
            // It was a symlink or a file a moment ago: someone is changing the target.
            return Err(self.unsafe_target(&e.path, "changed while being restored"));
        }
        if !self.overwrite {
            return Err(Error::InvalidArgument(format!(
                "{} exists and is not a directory",
                self.shown(&e.path).display()
            )));
        }
        rustix::fs::unlinkat(dir, name, AtFlags::empty())
            .map_err(|err| self.moved(&e.path, err.into()))?;
        rustix::fs::mkdirat(dir, name, Mode::RWXU).map_err(|err| match err {
            Errno::EXIST => self.unsafe_target(&e.path, "changed while being restored"),
            _ => self.moved(&e.path, err.into()),
        })?;
        beneath::open_dir(dir, name).map_err(|err| self.moved(&e.path, err))
    }

    /// Sets an owner as root. A refusal (no CAP_CHOWN, an NFS export that
    /// squashes root, an id not mapped in this user namespace) is warned about
    /// once and owners are not restored from then on; other errors fail.
    fn owner(
        &mut self,
        rel: &[u8],
        set: impl FnOnce(Option<Uid>, Option<Gid>) -> rustix::io::Result<()>,
        uid: u32,
        gid: u32,
    ) -> Result<()> {
        if !self.chown {
            return Ok(());
        }
        match set(Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))) {
            Ok(()) => Ok(()),
            Err(err @ (Errno::PERM | Errno::INVAL)) => {
                self.owner_refused(rel, err);
                Ok(())
            }
            Err(err) => Err(self.io(rel, err)),
        }
    }

    fn owner_refused(&mut self, rel: &[u8], err: Errno) {
        tracing::warn!(
            event = "restore.owners_not_restored",
            path = %self.shown(rel).display(),
            error = %std::io::Error::from(err),
            "cannot set owners in the target; restoring the rest without them (and without setuid/setgid bits on files)"
        );
        self.chown = false;
    }

    fn make_symlink(&mut self, dir: &Arc<OwnedFd>, e: &Entry) -> Result<()> {
        let target = e
            .target
            .as_ref()
            .ok_or_else(|| self.corrupt(format!("symlink {} has no target", e.display_path())))?;
        let tmp = self
            .temp
            .symlink(dir, target)
            .map_err(|err| self.io(&e.path, err))?;
        // On the temporary name, never following it: the link's own owner and times.
        self.owner(
            &e.path,
            |u, g| rustix::fs::chownat(tmp.dir(), tmp.name(), u, g, AtFlags::SYMLINK_NOFOLLOW),
            e.uid,
            e.gid,
        )?;
        rustix::fs::utimensat(
            tmp.dir(),
            tmp.name(),
            &timestamps(e.mtime_ns),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|err| self.io(&e.path, err))?;
        tmp.place(file_name(&e.path), self.overwrite)
            .map_err(|err| self.place_error(&e.path, err))?;
        self.report.symlinks += 1;
        Ok(())
    }

    async fn add_file(&mut self, dir: Arc<OwnedFd>, e: Entry) -> Result<()> {
        if let Some(group) = &e.hardlink
            && let Some(to) = self.links.get(group)
        {
            if to.size != e.size || to.blobs[..] != e.blobs[..] {
                return Err(self.corrupt(format!(
                    "{} is a hard link of {} but their contents differ",
                    e.display_path(),
                    String::from_utf8_lossy(&to.path)
                )));
            }
            let to = to.clone();
            self.batch.links.push(PendingLink { dir, entry: e, to });
        } else {
            let (temp, file) = self.temp.file(&dir).map_err(|err| self.io(&e.path, err))?;
            // Sized up front: zero runs are then simply not written (sparse files stay sparse).
            file.set_len(e.size).map_err(|err| self.io(&e.path, err))?;
            if let Some(group) = &e.hardlink {
                // The first name of its group restored: later names link to this inode.
                let st = rustix::fs::fstat(&file).map_err(|err| self.io(&e.path, err))?;
                self.links.insert(
                    group.clone(),
                    LinkSource {
                        path: e.path.clone(),
                        dev: st.st_dev as u64,
                        ino: st.st_ino as u64,
                        size: e.size,
                        blobs: e.blobs.clone().into(),
                    },
                );
            }
            self.batch.bytes += e.size;
            self.batch.files.push(PendingFile {
                temp,
                file: Arc::new(file),
                shown: self.shown(&e.path),
                entry: e,
                carried: false,
            });
        }
        if self.batch.bytes >= BATCH_BYTES
            || self.batch.files.len() + self.batch.links.len() >= self.batch_files
        {
            self.flush(false).await?;
        }
        self.poll_in_flight()
    }

    /// Starts fetching, verifying and writing every blob of the batch, then
    /// finishes the batch started before it (its reads first, then its files
    /// put in place, then its hard links). Two batches overlap: the next
    /// one's files are created and its reads queued while the packs of the
    /// one before are still arriving, so the reads in flight do not drain at
    /// every batch's end (over S3, each drain was a gap of 0.3–0.4 s).
    async fn flush(&mut self, last: bool) -> Result<()> {
        let started = self.start_batch(last)?;
        let before = self.in_flight.replace(started);
        // Lets the reads just queued start before this task goes on (a task
        // spawned from a worker waits in its slot until the spawner yields).
        tokio::task::yield_now().await;
        match before {
            Some(before) => self.finish_batch(before).await,
            None => Ok(()),
        }
    }

    /// Flushes the last batch and waits for every batch to be in place.
    async fn finish_batches(&mut self) -> Result<()> {
        self.flush(true).await?;
        match self.in_flight.take() {
            Some(last) => self.finish_batch(last).await,
            None => Ok(()),
        }
    }

    /// Reports the in-flight batch's progress and fails as soon as one of
    /// its reads failed, without waiting for the next batch to fill.
    fn poll_in_flight(&mut self) -> Result<()> {
        let Some(batch) = self.in_flight.as_mut() else {
            return Ok(());
        };
        let written = batch.newly_written();
        if written > 0 {
            self.progress.bytes_read(written);
        }
        match batch.reads.try_join_next() {
            Some(done) => read_outcome(done),
            None => Ok(()),
        }
    }

    /// Waits for a batch's reads, then puts its files in place, then links.
    async fn finish_batch(&mut self, mut batch: InFlight) -> Result<()> {
        while let Some(done) = batch.reads.join_next().await {
            read_outcome(done)?;
        }
        self.progress.bytes_read(batch.newly_written());
        self.place_files(std::mem::take(&mut batch.files))?;
        for link in std::mem::take(&mut batch.links) {
            self.make_link(link)?;
        }
        Ok(())
    }

    /// Plans the batch (for each pack, the blobs needed and where each goes)
    /// and queues its pack reads on the runtime, within the read budget.
    ///
    /// A batch ends somewhere in the packs the backup was filling at that
    /// point of the tree: it wants their first blobs, the next batch the
    /// rest, and each such pack was read twice (streamed by one batch, by
    /// ranges by the next: 5% more bytes and 20 more requests for 1 GiB).
    /// So, unless it is the last batch, a pack whose indexed blobs go on
    /// past the last one the batch wants is deferred to the next batch, with
    /// the files that need it (and the batch's hard links, which may name
    /// them), and read there once. A pack is deferred once (the next batch
    /// reads what it wants of it), and only while that costs little: never
    /// every pack of a batch, never with more than half of its files (packs
    /// of small files span many batches, and each reads them as before).
    fn start_batch(&mut self, last: bool) -> Result<InFlight> {
        let mut batch = std::mem::take(&mut self.batch);
        let mut started = InFlight {
            reads: tokio::task::JoinSet::new(),
            stop: Arc::new(AtomicBool::new(false)),
            written: Arc::new(AtomicU64::new(0)),
            reported: 0,
            files: Vec::new(),
            links: Vec::new(),
        };
        if batch.files.is_empty() {
            started.links = batch.links;
            return Ok(started);
        }
        let mut plan: BTreeMap<u32, IdMap<BlobId, PlannedBlob>> = BTreeMap::new();
        for (fi, f) in batch.files.iter().enumerate() {
            let mut offset = 0u64;
            for id in &f.entry.blobs {
                let loc = *self.index.get(id).ok_or_else(|| {
                    Error::missing(
                        format!("blob {id} of tenant {}", self.repo.tenant()),
                        format!("needed by {} but in no index file", f.entry.display_path()),
                    )
                })?;
                // A carried file's other blobs were written by the batch before.
                if !f.carried || batch.carried_packs.contains(&{ loc.pack }) {
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
                }
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
            batch
                .files
                .iter()
                .map(|f| (f.file.clone(), f.shown.clone()))
                .collect(),
        );
        let reads = PackReads::new(
            self.repo.store().clone(),
            self.keys.clone(),
            self.limits.clone(),
            started.stop.clone(),
            started.written.clone(),
            files,
        );
        let mut planned = Vec::with_capacity(plan.len());
        for (slot, blobs) in plan {
            let blobs: Vec<PlannedBlob> = blobs.into_values().collect();
            let (pack, _) = self.index.pack(&blobs[0].loc);
            let size = self.pack_sizes.get(&pack).copied();
            let goes_on = !last
                && size.is_some()
                && !batch.carried_packs.contains(&slot)
                && packs::last_end(&blobs)
                    < self.blob_ends.get_or_init(|| self.index.blob_ends())[slot as usize];
            planned.push(BatchPack {
                slot,
                plan: (pack, size, blobs),
                goes_on,
            });
        }
        let Deferral {
            packs,
            deferred,
            carry,
        } = defer_packs(planned, batch.files.len());
        started.reads.spawn(reads.read_all(packs));
        if carry.is_empty() {
            started.files = batch.files;
            started.links = batch.links;
        } else {
            for (fi, mut f) in batch.files.into_iter().enumerate() {
                if carry.contains(&fi) {
                    f.carried = true;
                    self.batch.files.push(f);
                } else {
                    started.files.push(f);
                }
            }
            self.batch.links.append(&mut batch.links);
            self.batch.carried_packs = deferred;
        }
        Ok(started)
    }

    /// Puts a batch's files in place, their blobs all written: owner, mode,
    /// mtime, then the rename from the temporary name.
    fn place_files(&mut self, files: Vec<PendingFile>) -> Result<()> {
        // Files not yet in place when this fails are removed as they drop.
        for f in files {
            let e = &f.entry;
            // Owner first: a chown clears the setuid and setgid bits.
            self.owner(
                &e.path,
                |u, g| rustix::fs::fchown(&*f.file, u, g),
                e.uid,
                e.gid,
            )?;
            // Set-id bits only on a file given its stored owner: otherwise
            // it would run as whoever restored it (as a non-root restore, the
            // user custos runs as, who can read every tenant's keys), with
            // content the tenant's source chose.
            let mode = match self.chown {
                true => e.mode & 0o7777,
                false => e.mode & 0o1777,
            };
            rustix::fs::fchmod(&*f.file, Mode::from_raw_mode(mode))
                .map_err(|err| Error::io(&f.shown, err.into()))?;
            rustix::fs::futimens(&*f.file, &timestamps(e.mtime_ns))
                .map_err(|err| Error::io(&f.shown, err.into()))?;
            f.temp
                .place(file_name(&e.path), self.overwrite)
                .map_err(|err| self.place_error(&e.path, err))?;
            self.report.files += 1;
            self.report.bytes += e.size;
        }
        Ok(())
    }

    /// Links a later name of a hard-link group to the name restored first,
    /// looked up again beneath the target; the link must reach that very
    /// inode (not whatever was put at its name meanwhile).
    fn make_link(&mut self, link: PendingLink) -> Result<()> {
        let e = &link.entry;
        let from_parent = parent(&link.to.path);
        let from_dir: Arc<OwnedFd> = match from_parent {
            None => self.root.clone(),
            Some(p) if Some(p) == parent(&e.path) => link.dir.clone(),
            Some(p) => Arc::new(
                beneath::open_dir_beneath(self.root.as_fd(), p)
                    .map_err(|err| self.moved(p, err))?,
            ),
        };
        let tmp = self
            .temp
            .link(from_dir.as_fd(), file_name(&link.to.path), &link.dir)
            .map_err(|err| match err.raw_os_error() {
                Some(libc::ENOENT) => {
                    self.unsafe_target(&link.to.path, "was moved or removed while restoring")
                }
                _ => self.io(&e.path, err),
            })?;
        let st = rustix::fs::statat(tmp.dir(), tmp.name(), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|err| self.io(&e.path, err))?;
        if (st.st_dev as u64, st.st_ino as u64) != (link.to.dev, link.to.ino) {
            return Err(self.unsafe_target(
                &link.to.path,
                "was replaced while restoring; not linking to it",
            ));
        }
        tmp.place(file_name(&e.path), self.overwrite)
            .map_err(|err| self.place_error(&e.path, err))?;
        self.report.files += 1;
        self.report.hardlinks += 1;
        Ok(())
    }

    /// Sets owners, modes and mtimes of the directories created, deepest
    /// first (a directory's own changes come after its content's). Each is
    /// looked up again beneath the target, never through a symlink.
    fn finish_dirs(&mut self) -> Result<()> {
        let dirs = std::mem::take(&mut self.dirs);
        for d in dirs.iter().rev() {
            let fd = beneath::open_dir_beneath(self.root.as_fd(), &d.path)
                .map_err(|err| self.moved(&d.path, err))?;
            let st = rustix::fs::fstat(&fd).map_err(|err| self.io(&d.path, err))?;
            if (st.st_dev as u64, st.st_ino as u64) != (d.dev, d.ino) {
                // Never give the stored owner and mode to a directory someone else put there.
                return Err(self.unsafe_target(&d.path, "was replaced while restoring"));
            }
            self.owner(&d.path, |u, g| rustix::fs::fchown(&fd, u, g), d.uid, d.gid)?;
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(d.mode & 0o7777))
                .map_err(|err| self.io(&d.path, err))?;
            rustix::fs::futimens(&fd, &timestamps(d.mtime_ns))
                .map_err(|err| self.io(&d.path, err))?;
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::BlobKind;
    use crate::repo::Location;

    /// A pack (`slot`) of which the batch wants blobs for `files`, deferrable or not.
    fn pack(slot: u32, files: &[usize], goes_on: bool) -> BatchPack {
        let blobs = files
            .iter()
            .enumerate()
            .map(|(i, &fi)| PlannedBlob {
                id: BlobId([i as u8 + 1; 32]),
                loc: Location {
                    pack: slot,
                    segment: i as u32,
                    offset: 100 * i as u32,
                    sealed_len: 100,
                    raw_len: 80,
                    kind: BlobKind::Data,
                },
                targets: vec![(fi, 0)],
            })
            .collect();
        BatchPack {
            slot,
            plan: (PackId([slot as u8; 32]), Some(1 << 20), blobs),
            goes_on,
        }
    }

    fn read(d: &Deferral) -> Vec<u8> {
        d.packs.iter().map(|(p, _, _)| p.0[0]).collect()
    }

    #[test]
    fn a_pack_going_on_past_the_batch_is_deferred_with_the_files_it_feeds() {
        let d = defer_packs(
            vec![
                pack(1, &[0, 1], false),
                pack(2, &[1, 2], true),
                pack(3, &[3], false),
            ],
            10,
        );
        assert_eq!(read(&d), [1, 3]);
        assert_eq!(d.deferred, HashSet::from([2]));
        assert_eq!(d.carry, HashSet::from([1, 2]));
    }

    #[test]
    fn a_batch_that_would_read_nothing_defers_nothing() {
        let d = defer_packs(vec![pack(1, &[0], true), pack(2, &[1], true)], 10);
        assert_eq!(read(&d), [1, 2]);
        assert!(d.deferred.is_empty() && d.carry.is_empty());
    }

    #[test]
    fn carrying_over_more_than_half_of_the_files_defers_nothing() {
        // Packs of small files span many batches: deferring would carry
        // most of every batch over.
        let d = defer_packs(vec![pack(1, &[0], false), pack(2, &[1, 2, 3], true)], 5);
        assert_eq!(read(&d), [1, 2]);
        assert!(d.deferred.is_empty() && d.carry.is_empty());
        // Half is still fine.
        let d = defer_packs(vec![pack(1, &[0], false), pack(2, &[1, 2], true)], 4);
        assert_eq!(read(&d), [1]);
        assert_eq!(d.carry, HashSet::from([1, 2]));
    }
}
