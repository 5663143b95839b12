//! `custos backup`: walks the tenant's sources, chunks, deduplicates,
//! compresses, encrypts and uploads, then writes the index and, last, the
//! snapshot — so a snapshot exists only once everything it names is stored.
//!
//! One reader thread walks and chunks in tree order and computes blob ids;
//! new blobs go to the packer's worker threads (compression and sealing in
//! parallel) and on to concurrent uploads. Unchanged files (same size, mtime,
//! ctime and inode as in the parent snapshot) are not read again.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use tokio::runtime::Handle;

use super::Progress;
use crate::config::PathGlobs;
use crate::error::{Error, Result};
use crate::format::ids::{BlobId, SnapshotId};
use crate::format::pack::BlobKind;
use crate::format::snapshot::{SNAPSHOT_FORMAT, Snapshot, SourceRecord, Summary};
use crate::format::tree::{Entry, EntryKind, cmp_paths};
use crate::keys::derive::EpochKeys;
use crate::pipeline::chunker::{ChunkError, Chunker, DATA_CHUNKS};
use crate::pipeline::packer::{Packer, PackerConfig};
use crate::pipeline::tree::{TreeReader, TreeWriter};
use crate::repo::{Dedup, Index, Repo};
use crate::source::command::RunningCommand;
use crate::source::walk::{
    Found, HardLinks, Meta, Walker, after_failure, describe, is_exhaustion, open_file,
    source_root_exists,
};
use crate::source::{Source, origin};
use crate::store::ObjectName;
use crate::store::lease::LeaseGuard;
use rustix::fs::FileType;
use std::os::fd::BorrowedFd;

pub struct BackupOptions {
    pub sources: Vec<Source>,
    pub packer: PackerConfig,
    /// Unreadable files are skipped and counted instead of failing the backup.
    pub allow_unreadable: bool,
    pub tags: Vec<String>,
    /// Read every file even if the parent snapshot says it is unchanged.
    pub force_read: bool,
}

impl BackupOptions {
    /// A scheduled backup of `policy`; the CLI overlays its flags (tags,
    /// `--force-read`) on the same options.
    pub fn from_policy(policy: &crate::config::Policy) -> BackupOptions {
        BackupOptions {
            sources: policy.sources.clone(),
            packer: PackerConfig::for_policy(Some(policy)),
            allow_unreadable: policy.backup.allow_unreadable,
            tags: Vec::new(),
            force_read: false,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub snapshot: SnapshotId,
    pub epoch: u32,
    pub parent: Option<SnapshotId>,
    pub summary: Summary,
    /// Paths skipped or changed during the backup, with why (capped).
    pub warnings: Vec<String>,
}

const MAX_WARNINGS: usize = 100;

pub async fn run(
    repo: &Repo,
    lease: &LeaseGuard,
    opts: BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let started = Instant::now();
    repo.require_active("backup")?;
    if opts.sources.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "tenant {} has no sources to back up",
            repo.tenant()
        )));
    }
    let sources = checked_sources(&opts.sources)?;
    // Open object-store sources before storing anything (a bad URL fails here).
    let mut object_stores = std::collections::HashMap::new();
    for s in &sources {
        if let Source::ObjectStore { name, url } = s {
            let store =
                crate::source::object_store::open_url(url, &repo.context().s3).map_err(|e| {
                    Error::Source {
                        source_name: name.clone(),
                        message: e.to_string(),
                    }
                })?;
            object_stores.insert(name.clone(), store);
        }
    }
    let keys = repo.current_keys().await?;
    let epoch = keys.epoch();
    let index = Arc::new(repo.load_index_strict().await?);
    let (snapshots, _) = repo.list_snapshots().await?;
    let parent = snapshots.iter().rev().find(|s| s.epoch == epoch).cloned();
    // Deduplicate only against packs the store still has (one listing): a
    // blob whose pack was deleted or lost is treated as new and stored again
    // (unchanged files whose blobs are gone are read again), so the snapshot
    // never names data that is not there.
    let stored_packs = repo.list_packs().await?;
    let (usable, lost) = index.usable_packs(epoch, &stored_packs);
    let mut warnings = Vec::new();
    if lost.blobs > 0 {
        let first = repo.store().display(&ObjectName::Pack(lost.packs[0]));
        let msg = format!(
            "{} indexed blob(s) live in {} pack(s) missing from the store (e.g. {first}): \
             stored again from the sources where they still are; older snapshots that need \
             the rest stay damaged (see `custos check`)",
            lost.blobs,
            lost.packs.len()
        );
        tracing::warn!(
            event = "backup.lost_packs",
            tenant = %repo.tenant(),
            blobs = lost.blobs,
            packs = lost.packs.len(),
            example = %first,
            "{msg}"
        );
        warnings.push(msg);
    }
    let packer = Packer::start(
        keys.clone(),
        repo.store().clone(),
        Dedup::new(index.clone(), usable),
        opts.packer,
        lease.check(),
        &Handle::current(),
    );

    // The reader runs on this thread, taken out of the async scheduler; it
    // reaches the store (parent tree) through the runtime handle.
    let walked = tokio::task::block_in_place(|| {
        let mut reader = Reader {
            keys: &keys,
            packer: &packer,
            chunker: Chunker::new(DATA_CHUNKS, keys.chunker_seed()),
            buf: Vec::new(),
            tree: TreeWriter::new(&keys),
            parent: parent
                .as_ref()
                .filter(|_| !opts.force_read)
                .map(|p| ParentCursor {
                    reader: TreeReader::new(
                        repo,
                        &index,
                        &p.tree,
                        format!("tree of snapshot {}", p.id),
                    ),
                    index: &index,
                    current: None,
                    done: false,
                }),
            summary: Summary::default(),
            warnings,
            allow_unreadable: opts.allow_unreadable,
            progress,
            rt: Handle::current(),
            object_stores: &object_stores,
        };
        for s in &sources {
            reader.source(s)?;
        }
        let (tree, _) = reader.tree.finish(&keys, &packer)?;
        Ok::<_, Error>((tree, reader.summary, reader.warnings))
    });
    let (tree, mut summary, warnings) = match walked {
        Ok(v) => v,
        Err(e) => {
            // Uploads under way end before the lease is released; their
            // packs stay unreferenced until prune.
            packer.abandon().await;
            return Err(e);
        }
    };
    let stored = packer.finish().await?;
    summary.blobs_new = stored.blobs;
    summary.packs_new = stored.packs;
    summary.bytes_stored = stored.bytes_stored + stored.index_bytes;

    let (_, index_bytes) = repo.put_index(&keys, stored.index, lease).await?;
    summary.bytes_stored += index_bytes;
    let snapshot = Snapshot {
        format: SNAPSHOT_FORMAT,
        id: SnapshotId::random(),
        tenant: repo.tenant().clone(),
        epoch,
        time: Utc::now(),
        hostname: crate::store::lease::hostname(),
        parent: parent.as_ref().map(|p| p.id),
        tags: opts.tags.clone(),
        sources: sources
            .iter()
            .map(|s| SourceRecord {
                name: s.name().into(),
                kind: s.kind().into(),
                origin: origin(s),
            })
            .collect(),
        tree,
        summary: Summary {
            duration_ms: started.elapsed().as_millis() as u64,
            ..summary
        },
        chunker: DATA_CHUNKS,
        custos_version: env!("CARGO_PKG_VERSION").into(),
    };
    let sealed = snapshot.seal(&keys);
    // The CMK may have been disabled since the data key was unwrapped: commit
    // only under a key that is still usable (the uploaded packs stay
    // unreferenced until prune).
    repo.confirm_key_usable().await?;
    lease.ensure_held()?;
    repo.store()
        .put(&ObjectName::Snapshot(snapshot.id), Bytes::from(sealed))
        .await?;
    Ok(BackupReport {
        snapshot: snapshot.id,
        epoch,
        parent: snapshot.parent,
        summary: snapshot.summary,
        warnings,
    })
}

struct ParentCursor<'a> {
    reader: TreeReader<'a>,
    /// To prefetch the lookups of the entry read ahead.
    index: &'a Index,
    current: Option<Entry>,
    done: bool,
}

impl ParentCursor<'_> {
    /// Reads the next entry into `current` unless one is there.
    fn fill(&mut self, rt: &Handle) {
        if self.current.is_some() || self.done {
            return;
        }
        match rt.block_on(self.reader.next_entry()) {
            Ok(Some(p)) => self.current = Some(p),
            Ok(None) => self.done = true,
            Err(err) => {
                tracing::warn!(error = %err, "parent tree unreadable; reading every file");
                self.done = true;
            }
        }
    }
}

struct Reader<'a> {
    keys: &'a Arc<EpochKeys>,
    packer: &'a Packer,
    chunker: Chunker,
    buf: Vec<u8>,
    tree: TreeWriter,
    parent: Option<ParentCursor<'a>>,
    summary: Summary,
    warnings: Vec<String>,
    allow_unreadable: bool,
    progress: &'a dyn Progress,
    rt: Handle,
    object_stores: &'a std::collections::HashMap<String, crate::store::SharedStore>,
}

impl Reader<'_> {
    fn warn(&mut self, msg: String) {
        tracing::warn!(message = %msg);
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(msg);
        }
    }

    fn source(&mut self, s: &Source) -> Result<()> {
        match s {
            Source::Path {
                name,
                path,
                exclude,
                one_file_system,
            } => {
                let ex = PathGlobs::new(exclude).map_err(|m| Error::Source {
                    source_name: name.clone(),
                    message: m,
                })?;
                let walker = Walker {
                    excludes: &ex,
                    one_file_system: *one_file_system,
                };
                // Hard links are matched within one source (one walk).
                let mut links = HardLinks::new();
                walker.walk(name, path, &mut |rel, found| {
                    self.found(name, rel, found, &mut links)
                })
            }
            Source::Command {
                name,
                argv,
                timeout,
            } => self.command(name, argv, *timeout),
            Source::ObjectStore { name, url } => self.object_store(name, url),
        }
    }

    fn found(
        &mut self,
        source: &str,
        rel: &[u8],
        found: Found<'_>,
        links: &mut Links,
    ) -> Result<()> {
        let shown = || String::from_utf8_lossy(rel).into_owned();
        match found {
            Found::Dir { meta } => {
                self.summary.dirs += 1;
                self.push(entry(rel, EntryKind::Dir, meta))
            }
            Found::Symlink { target, meta } => {
                self.summary.symlinks += 1;
                let mut e = entry(rel, EntryKind::Symlink, meta);
                e.target = Some(target);
                self.push(e)
            }
            Found::File { dir, name, meta } => self.file(source, rel, dir, name, meta, links),
            Found::Special { what } => {
                self.summary.skipped_special += 1;
                tracing::debug!(path = %shown(), what, "special file skipped");
                Ok(())
            }
            Found::Vanished => {
                self.warn(format!("{}: vanished during the backup; skipped", shown()));
                Ok(())
            }
            Found::Unreadable { error } => self.unreadable(source, rel, error),
        }
    }

    /// A regular file: another name of an inode already stored, unchanged
    /// since the parent snapshot, or read through the descriptor its
    /// directory's handle opens. A name replaced between being examined and
    /// opened is recorded as the file opened: metadata and content of one inode.
    fn file(
        &mut self,
        source: &str,
        rel: &[u8],
        dir: BorrowedFd<'_>,
        name: &[u8],
        meta: &Meta,
        links: &mut Links,
    ) -> Result<()> {
        let shown = || String::from_utf8_lossy(rel).into_owned();
        let mut e = entry(rel, EntryKind::File, meta);
        if let Some(first) = links.earlier(meta) {
            return self.push_link(e, first);
        }
        if let Some(blobs) = self.unchanged_in_parent(&e) {
            e.blobs = blobs;
            return self.push_file(e, meta, links);
        }
        let (f, opened) = match open_file(dir, name) {
            Ok(v) => v,
            Err(e) => match after_failure(dir, name, meta, e) {
                Found::Unreadable { error } => return self.unreadable(source, rel, error),
                _ => {
                    self.warn(format!(
                        "{}: vanished or replaced before it could be read; skipped",
                        shown()
                    ));
                    return Ok(());
                }
            },
        };
        if opened.file_type != FileType::RegularFile {
            self.warn(format!(
                "{}: replaced by a {} while being backed up; skipped",
                shown(),
                describe(opened.file_type)
            ));
            return Ok(());
        }
        let meta = match opened.same_inode(meta) {
            true => meta,
            false => {
                e = entry(rel, EntryKind::File, &opened);
                if let Some(first) = links.earlier(&opened) {
                    return self.push_link(e, first);
                }
                &opened
            }
        };
        let (blobs, size) = match self.read_content(&f) {
            Ok(v) => v,
            Err(ReadFailure::Io(error)) => return self.unreadable(source, rel, error),
            Err(ReadFailure::Job(e)) => return Err(e),
        };
        // The file read, by its descriptor: no second lookup of the path (a
        // `statx` of every component, per file, was 9% of a small-file
        // backup's profile with the walk's own).
        if let Ok(after) = rustix::fs::fstat(&f).map(|st| Meta::of(&st))
            && (after.size != size || after.mtime_ns != e.mtime_ns)
        {
            self.warn(format!(
                "{}: changed while being read; stored as read",
                shown()
            ));
        }
        e.size = size;
        e.blobs = blobs;
        self.summary.files_read += 1;
        self.push_file(e, meta, links)
    }

    /// Pushes a file's entry, first recording it for the inode's other names.
    fn push_file(&mut self, mut e: Entry, meta: &Meta, links: &mut Links) -> Result<()> {
        if meta.nlink > 1 {
            e.hardlink = Some(e.path.clone());
            links.record(meta, &e.path, (e.size, e.blobs.clone()));
        }
        self.push_counted(e)
    }

    /// Pushes another name of an inode already stored: the same content (not
    /// read twice), linked to that first name on restore.
    fn push_link(&mut self, mut e: Entry, (first, (size, blobs)): (Vec<u8>, Linked)) -> Result<()> {
        e.size = size;
        e.blobs = blobs;
        e.hardlink = Some(first);
        self.push_counted(e)
    }

    /// Pushes a file's entry and counts it as backed up.
    fn push_counted(&mut self, e: Entry) -> Result<()> {
        self.summary.files += 1;
        self.summary.bytes_in += e.size;
        self.progress.file_done(e.size);
        self.push(e)
    }

    fn unreadable(&mut self, source: &str, rel: &[u8], error: std::io::Error) -> Result<()> {
        let shown = String::from_utf8_lossy(rel).into_owned();
        // Out of descriptors or memory is the process' state, not the entry's:
        // skipping would leave the entry out of the snapshot for no reason of its own.
        let exhausted = is_exhaustion(&error);
        if self.allow_unreadable && !exhausted {
            self.summary.unreadable += 1;
            self.warn(format!("{shown}: unreadable ({error}); skipped"));
            return Ok(());
        }
        let hint = match exhausted {
            true => "custos ran out of descriptors or memory: nothing is skipped for that",
            false => "set backup.allow_unreadable = true to skip such files",
        };
        Err(Error::Source {
            source_name: source.into(),
            message: format!("{shown}: cannot read: {error} ({hint})"),
        })
    }

    fn push(&mut self, e: Entry) -> Result<()> {
        self.tree.push(&e, self.keys, self.packer)
    }

    /// Blobs of the parent's entry for this path, if the file is unchanged and
    /// every blob is still stored.
    fn unchanged_in_parent(&mut self, e: &Entry) -> Option<Vec<BlobId>> {
        let cursor = self.parent.as_mut()?;
        loop {
            cursor.fill(&self.rt);
            let p = cursor.current.as_ref()?;
            match cmp_paths(&p.path, &e.path) {
                std::cmp::Ordering::Less => cursor.current = None,
                std::cmp::Ordering::Greater => return None,
                std::cmp::Ordering::Equal => {
                    let p = cursor.current.take()?;
                    // The next entry is read now and where its blob ids sit in
                    // the index fetched into the cache, while the next file is
                    // examined: the index is too large to stay cached, and its
                    // lookups were the largest part of an incremental backup of
                    // millions of files.
                    cursor.fill(&self.rt);
                    if let Some(next) = &cursor.current {
                        next.blobs
                            .iter()
                            .take(4)
                            .for_each(|b| cursor.index.prefetch(b));
                    }
                    let same = p.kind == EntryKind::File
                        && p.size == e.size
                        && p.mtime_ns == e.mtime_ns
                        && p.ctime_ns == e.ctime_ns
                        && p.inode == e.inode;
                    return (same && p.blobs.iter().all(|b| self.packer.is_known(b)))
                        .then_some(p.blobs);
                }
            }
        }
    }

    fn read_content(
        &mut self,
        reader: impl Read,
    ) -> std::result::Result<(Vec<BlobId>, u64), ReadFailure> {
        let mut blobs = Vec::new();
        let keys = self.keys;
        let packer = self.packer;
        let summary = &mut self.summary;
        let progress = self.progress;
        let size = self
            .chunker
            .chunk_reader(reader, &mut self.buf, |chunk| {
                let id = BlobId(keys.blob_id(chunk));
                if packer.claim(&id) {
                    summary.bytes_new += chunk.len() as u64;
                    packer.add_copy(id, BlobKind::Data, chunk)?;
                }
                progress.bytes_read(chunk.len() as u64);
                blobs.push(id);
                Ok::<_, Error>(())
            })
            .map_err(|e| match e {
                ChunkError::Read(io) => ReadFailure::Io(io),
                ChunkError::Emit(job) => ReadFailure::Job(job),
            })?;
        Ok((blobs, size))
    }

    /// An object-store prefix, as a tree: objects listed in tree order, each
    /// streamed from its GET into the chunker unless unchanged since the parent.
    fn object_store(&mut self, name: &str, url: &str) -> Result<()> {
        use crate::source::object_store::{Item, StreamReader, file_entry, list_tree};
        let store =
            self.object_stores.get(name).cloned().ok_or_else(|| {
                Error::Internal(format!("object-store source {name} was not opened"))
            })?;
        let (items, warnings) = self.rt.block_on(list_tree(&store, name))?;
        for w in warnings {
            self.warn(format!("{name} ({url}): {w}"));
        }
        for item in items {
            match item {
                Item::Dir { entry } => {
                    self.summary.dirs += 1;
                    self.push(entry)?;
                }
                Item::Object { path, meta } => {
                    let mut e = file_entry(path, &meta);
                    if let Some(blobs) = self.unchanged_in_parent(&e) {
                        e.blobs = blobs;
                    } else {
                        let (reader, got) =
                            match StreamReader::open(&self.rt, &store, &meta.location) {
                                Ok(v) => v,
                                Err(object_store::Error::NotFound { .. }) => {
                                    self.warn(format!(
                                        "{}: vanished before it could be read; skipped",
                                        e.display_path()
                                    ));
                                    continue;
                                }
                                Err(err) => {
                                    return Err(Error::Source {
                                        source_name: name.into(),
                                        message: format!("reading {}: {err}", meta.location),
                                    });
                                }
                            };
                        // Record what was actually read (it may have changed since the listing).
                        e = file_entry(e.path, &got);
                        let (blobs, size) = match self.read_content(reader) {
                            Ok(v) => v,
                            Err(ReadFailure::Io(err)) => {
                                return Err(Error::Source {
                                    source_name: name.into(),
                                    message: format!("reading {}: {err}", meta.location),
                                });
                            }
                            Err(ReadFailure::Job(err)) => return Err(err),
                        };
                        if size != got.size {
                            self.warn(format!(
                                "{}: {size} bytes read, {} announced; stored as read",
                                e.display_path(),
                                got.size
                            ));
                        }
                        e.size = size;
                        e.blobs = blobs;
                        self.summary.files_read += 1;
                    }
                    self.summary.files += 1;
                    self.summary.bytes_in += e.size;
                    self.progress.file_done(e.size);
                    self.push(e)?;
                }
            }
        }
        Ok(())
    }

    fn command(
        &mut self,
        name: &str,
        argv: &[String],
        timeout: Option<std::time::Duration>,
    ) -> Result<()> {
        let fail = |message: String| Error::Source {
            source_name: name.into(),
            message,
        };
        let mut cmd = RunningCommand::spawn(argv, timeout).map_err(fail)?;
        let (blobs, size) = match self.read_content(cmd.stdout()) {
            Ok(v) => v,
            Err(ReadFailure::Io(e)) => {
                return Err(fail(format!(
                    "reading the output of `{}`: {e}",
                    argv.join(" ")
                )));
            }
            Err(ReadFailure::Job(e)) => return Err(e),
        };
        cmd.finish().map_err(fail)?;
        let now = Utc::now();
        let e = Entry {
            path: name.as_bytes().to_vec(),
            kind: EntryKind::File,
            mode: 0o600,
            mtime_ns: now.timestamp_nanos_opt().unwrap_or(0),
            uid: 0,
            gid: 0,
            size,
            blobs,
            target: None,
            hardlink: None,
            inode: 0,
            ctime_ns: 0,
        };
        self.summary.files += 1;
        self.summary.files_read += 1;
        self.summary.bytes_in += size;
        self.push(e)
    }
}

enum ReadFailure {
    Io(std::io::Error),
    Job(Error),
}

/// What a hard-link group's first name stored: its size and blobs.
type Linked = (u64, Vec<BlobId>);
type Links = HardLinks<Linked>;

fn entry(rel: &[u8], kind: EntryKind, meta: &Meta) -> Entry {
    Entry {
        path: rel.to_vec(),
        kind,
        mode: meta.mode,
        mtime_ns: meta.mtime_ns,
        uid: meta.uid,
        gid: meta.gid,
        size: if kind == EntryKind::File {
            meta.size
        } else {
            0
        },
        blobs: Vec::new(),
        target: None,
        hardlink: None,
        inode: meta.ino,
        ctime_ns: meta.ctime_ns,
    }
}

impl crate::report::JobOutput for BackupReport {
    fn metrics(&self) -> crate::report::JobMetrics {
        crate::report::JobMetrics {
            bytes_in: Some(self.summary.bytes_in),
            bytes_stored: Some(self.summary.bytes_stored),
            files: Some(self.summary.files),
            snapshot: Some(self.snapshot.to_hex()),
            ..Default::default()
        }
    }
}

/// Checks the sources before anything is stored (callers run it before the
/// tenant is initialised, too): unique names, existing directories, valid
/// excludes. Returns them in tree order.
pub fn checked_sources(sources: &[Source]) -> Result<Vec<Source>> {
    if sources.is_empty() {
        return Err(Error::InvalidArgument("no sources to back up".into()));
    }
    let mut sorted = sources.to_vec();
    sorted.sort_by(|a, b| cmp_paths(a.name().as_bytes(), b.name().as_bytes()));
    for pair in sorted.windows(2) {
        if pair[0].name() == pair[1].name() {
            return Err(Error::InvalidArgument(format!(
                "two sources are named {:?}",
                pair[0].name()
            )));
        }
    }
    for s in &sorted {
        let fail = |message: String| Error::Source {
            source_name: s.name().into(),
            message,
        };
        if let Source::Path { path, exclude, .. } = s {
            source_root_exists(path).map_err(fail)?;
            PathGlobs::new(exclude).map_err(fail)?;
        }
    }
    Ok(sorted)
}
