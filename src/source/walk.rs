//! Walks a directory tree in tree order (depth first, children sorted by name
//! bytes), the order snapshot trees are stored in, so a backup can merge the
//! walk with its parent snapshot's tree without holding either in memory.
//!
//! Everything beneath the root is reached through the handle of its
//! directory, one name at a time and never through a symlink: a local user
//! who can write in the tree and renames a directory, or swaps a file or a
//! directory for a symlink, while the walk runs cannot make the backup read
//! anything outside the tree (another tenant's files, custos' keys), nor pair
//! one file's metadata with another's content. A file is opened by the same
//! handle that examined it ([`open_file`]) and its descriptor checked to be
//! the inode examined.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::beneath::{DIR_FLAGS, open_dir_beneath, open_dir_resolved};
use crate::config::PathGlobs;

/// What a backup records of an entry: its `lstat`, or the `fstat` of the
/// descriptor it was read through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub file_type: FileType,
    /// Permission bits, set-id and sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub dev: u64,
    pub ino: u64,
    pub nlink: u64,
}

impl Meta {
    // The `Stat` fields' types differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    pub fn of(st: &rustix::fs::Stat) -> Meta {
        Meta {
            file_type: FileType::from_raw_mode(st.st_mode as _),
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            size: st.st_size.max(0) as u64,
            mtime_ns: nanos(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: nanos(st.st_ctime as i64, st.st_ctime_nsec as i64),
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            nlink: st.st_nlink as u64,
        }
    }

    /// The same inode (a name examined, then opened).
    pub fn same_inode(&self, other: &Meta) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// What the walker found at one path.
pub enum Found<'a> {
    Dir {
        meta: &'a Meta,
    },
    /// A regular file, to be opened (if at all) with [`open_file`]`(dir, name)`.
    File {
        dir: BorrowedFd<'a>,
        name: &'a [u8],
        meta: &'a Meta,
    },
    Symlink {
        target: Vec<u8>,
        meta: &'a Meta,
    },
    /// A fifo, socket or device: not backed up, counted.
    Special {
        what: &'static str,
    },
    /// Could not be listed or examined.
    Unreadable {
        error: io::Error,
    },
    /// Disappeared (or was replaced by something else) between listing and
    /// examining or opening.
    Vanished,
}

/// Walks one source. Excludes match the path relative to the source root
/// (see [`PathGlobs`]); an excluded directory is skipped whole.
pub struct Walker<'a> {
    pub excludes: &'a PathGlobs,
    pub one_file_system: bool,
}

/// Directories of the path being walked whose handles stay open; deeper
/// ones are opened again beneath the root after each subdirectory (a tree
/// nested without end must not run the process out of descriptors).
const HELD_DIRS: usize = 64;

/// Deeper than this, a directory is reported unreadable instead of walked.
/// The walk recurses once per level (about 1.2 KiB of stack a level in a
/// release build, 1.8 KiB in a debug one): the runtime's threads get a stack
/// that holds it (`cli::run`).
pub const MAX_DEPTH: usize = 1024;

/// One walk's fixed facts, and the directories on the path being walked.
struct Root<'r> {
    fd: &'r OwnedFd,
    /// Length of `<source name>/` in the snapshot paths.
    rel_start: usize,
    dev: u64,
    /// (dev, ino) of the directories from the root to the one being walked:
    /// a directory met again beneath itself (a bind mount of an ancestor, a
    /// looping FUSE file system) is not walked again, without end.
    ancestors: RefCell<Vec<(u64, u64)>>,
}

/// A directory being walked: its handle (dropped while a subdirectory is
/// walked beyond [`HELD_DIRS`]) and its inode, to find it again.
struct Held {
    fd: Option<Dir>,
    meta: Meta,
}

impl Walker<'_> {
    /// Walks `root`, calling `visit(snapshot_path, found)` for the root (named
    /// `name`) and everything below it, parents before children. No symlink
    /// is followed, on the root's path ([`open_root`]) or beneath it.
    pub fn walk<E>(
        &self,
        name: &str,
        root: &Path,
        visit: &mut impl FnMut(&[u8], Found<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let rel = name.as_bytes();
        let opened = open_root(root)
            .and_then(|fd| Ok((Meta::of(&rustix::fs::fstat(&fd)?), fd)))
            .and_then(|(meta, fd)| Ok((meta, Dir::read_from(&fd)?, fd)));
        let (meta, dir, fd) = match opened {
            Ok(v) => v,
            Err(error) => return visit(rel, Found::Unreadable { error }),
        };
        let top = Root {
            fd: &fd,
            rel_start: rel.len() + 1,
            dev: meta.dev,
            ancestors: RefCell::new(Vec::new()),
        };
        let mut rel = rel.to_vec();
        let held = Held {
            fd: Some(dir),
            meta,
        };
        self.visit_dir(&top, held, &mut rel, 0, visit)
    }

    /// Lists the open directory at `rel`, visits it, then each entry in order.
    fn visit_dir<E>(
        &self,
        root: &Root<'_>,
        mut held: Held,
        rel: &mut Vec<u8>,
        depth: usize,
        visit: &mut impl FnMut(&[u8], Found<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let names = match held.fd.as_mut().map(list_names) {
            Some(Ok(n)) => n,
            Some(Err(Errno::NOENT)) | None => return visit(rel, Found::Vanished),
            Some(Err(e)) => return visit(rel, Found::Unreadable { error: e.into() }),
        };
        visit(rel, Found::Dir { meta: &held.meta })?;
        root.ancestors
            .borrow_mut()
            .push((held.meta.dev, held.meta.ino));
        let walked = self.visit_names(root, &mut held, names, rel, depth, visit);
        root.ancestors.borrow_mut().pop();
        walked
    }

    fn visit_names<E>(
        &self,
        root: &Root<'_>,
        held: &mut Held,
        names: Vec<Vec<u8>>,
        rel: &mut Vec<u8>,
        depth: usize,
        visit: &mut impl FnMut(&[u8], Found<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        for child in names {
            let len = rel.len();
            rel.push(b'/');
            rel.extend_from_slice(&child);
            let within = OsStr::from_bytes(&rel[root.rel_start.min(rel.len())..]);
            if child.contains(&b'/') {
                // Only a broken or hostile file server lists such a name; a
                // lookup of it would follow symlinks on the way.
                let error = io::Error::other("the file system listed a name containing '/'");
                visit(rel, Found::Unreadable { error })?;
            } else if !self.excludes.is_match(Path::new(within)) {
                // Opened again beneath the root after a deep subdirectory.
                let fd = match reopen(root, held, &rel[..len]) {
                    Ok(fd) => fd,
                    Err(e) => {
                        // This directory is gone or replaced: the rest of it is not walked.
                        rel.truncate(len);
                        return match e.kind() {
                            io::ErrorKind::NotFound => visit(rel, Found::Vanished),
                            _ => visit(rel, Found::Unreadable { error: e }),
                        };
                    }
                };
                match rustix::fs::statat(fd, child.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => {
                        let meta = Meta::of(&st);
                        self.visit_entry(root, held, rel, &child, meta, depth, visit)?
                    }
                    Err(Errno::NOENT) => visit(rel, Found::Vanished)?,
                    Err(e) => visit(rel, Found::Unreadable { error: e.into() })?,
                }
            }
            rel.truncate(len);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn visit_entry<E>(
        &self,
        root: &Root<'_>,
        parent: &mut Held,
        rel: &mut Vec<u8>,
        name: &[u8],
        meta: Meta,
        depth: usize,
        visit: &mut impl FnMut(&[u8], Found<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let fd = match held_fd(parent) {
            Ok(fd) => fd,
            Err(e) => return visit(rel, Found::Unreadable { error: e.into() }),
        };
        match meta.file_type {
            FileType::RegularFile => visit(
                rel,
                Found::File {
                    dir: fd,
                    name,
                    meta: &meta,
                },
            ),
            FileType::Symlink => match read_symlink(fd, name) {
                Ok((target, link)) => visit(
                    rel,
                    Found::Symlink {
                        target,
                        meta: &link,
                    },
                ),
                Err(e) => visit(rel, after_failure(fd, name, &meta, e)),
            },
            FileType::Directory => {
                if self.one_file_system && meta.dev != root.dev {
                    return Ok(());
                }
                if depth + 1 > MAX_DEPTH {
                    let error = io::Error::other(format!(
                        "nested deeper than {MAX_DEPTH} directories; not walked"
                    ));
                    return visit(rel, Found::Unreadable { error });
                }
                // Never through a symlink: ELOOP (or ENOTDIR) if it was swapped since.
                let opened = rustix::fs::openat(fd, name, DIR_FLAGS, Mode::empty())
                    .and_then(|child| Ok((Meta::of(&rustix::fs::fstat(&child)?), child)));
                let (child_meta, child) = match opened {
                    Ok(v) => v,
                    Err(e) => return visit(rel, after_failure(fd, name, &meta, e)),
                };
                if self.one_file_system && child_meta.dev != root.dev {
                    return Ok(()); // mounted on since it was examined
                }
                let key = (child_meta.dev, child_meta.ino);
                if root.ancestors.borrow().contains(&key) {
                    let error = io::Error::other(
                        "the directory contains itself (a mount loop); not walked again",
                    );
                    return visit(rel, Found::Unreadable { error });
                }
                let dir = match Dir::new(child) {
                    Ok(d) => d,
                    Err(e) => return visit(rel, Found::Unreadable { error: e.into() }),
                };
                if depth + 1 > HELD_DIRS {
                    parent.fd = None; // opened again for the next entry
                }
                let held = Held {
                    fd: Some(dir),
                    meta: child_meta,
                };
                self.visit_dir(root, held, rel, depth + 1, visit)
            }
            other => visit(
                rel,
                Found::Special {
                    what: describe(other),
                },
            ),
        }
    }
}

/// Opens a source root, a directory, following no symlink anywhere on its
/// path: whoever can write where a link is (the tenant's own user, owning a
/// directory above the source) could otherwise point the backup at anything
/// custos can read. `openat2(RESOLVE_NO_SYMLINKS)`, or one `O_NOFOLLOW`
/// component at a time where the kernel lacks it.
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    if let Some(opened) = open_dir_resolved(CWD, path, resolve) {
        return opened;
    }
    let start = if path.is_absolute() { "/" } else { "." };
    let mut fd = rustix::fs::open(start, DIR_FLAGS, Mode::empty())?;
    for c in path.components() {
        let name = match c {
            Component::RootDir | Component::CurDir => continue,
            Component::ParentDir => OsStr::new(".."),
            Component::Normal(n) => n,
            Component::Prefix(_) => return Err(io::ErrorKind::InvalidInput.into()),
        };
        fd = rustix::fs::openat(&fd, name, DIR_FLAGS, Mode::empty())?;
    }
    Ok(fd)
}

/// Opens the directory's handle again beneath the root if it was dropped,
/// only if the same directory is still there.
fn reopen<'h>(root: &Root<'_>, held: &'h mut Held, rel: &[u8]) -> io::Result<BorrowedFd<'h>> {
    if held.fd.is_some() {
        return Ok(held_fd(held)?);
    }
    let within = &rel[root.rel_start.min(rel.len())..];
    let fd = open_dir_beneath(root.fd.as_fd(), within)?;
    let meta = Meta::of(&rustix::fs::fstat(&fd)?);
    if !meta.same_inode(&held.meta) {
        return Err(Errno::NOENT.into()); // replaced by another directory
    }
    held.fd = Some(Dir::new(fd)?);
    Ok(held_fd(held)?)
}

fn held_fd(held: &Held) -> Result<BorrowedFd<'_>, Errno> {
    held.fd.as_ref().ok_or(Errno::BADF)?.fd()
}

/// A symlink's target and metadata, from one handle of the link (`O_PATH`):
/// the name swapped for another link in between cannot pair one link's
/// owner with another's target.
fn read_symlink(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(Vec<u8>, Meta), Errno> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    let meta = Meta::of(&rustix::fs::fstat(&fd)?);
    if meta.file_type != FileType::Symlink {
        return Err(Errno::INVAL); // replaced: told apart by `after_failure`
    }
    let target = rustix::fs::readlinkat(&fd, c"", Vec::new())?;
    Ok((target.into_bytes(), meta))
}

/// How a failure to open or read an entry examined as `meta` is reported:
/// `Vanished` when the name is gone or now names another inode or type (a
/// name swapped for a symlink fails with ELOOP, a file for a socket with
/// ENXIO, a symlink for a file with EINVAL: a race, not the entry's fault),
/// else `Unreadable` with the error. Out of descriptors or memory is always
/// `Unreadable` (and fails the job, see [`is_exhaustion`]).
pub fn after_failure(dir: BorrowedFd<'_>, name: &[u8], meta: &Meta, e: Errno) -> Found<'static> {
    let error = io::Error::from(e);
    if e == Errno::NOENT {
        return Found::Vanished;
    }
    if is_exhaustion(&error) {
        return Found::Unreadable { error };
    }
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Found::Vanished,
        Ok(st) => {
            let now = Meta::of(&st);
            match now.same_inode(meta) && now.file_type == meta.file_type {
                true => Found::Unreadable { error },
                false => Found::Vanished,
            }
        }
        Err(_) => Found::Unreadable { error },
    }
}

/// What a backup calls a file of this type in its messages.
pub fn describe(file_type: FileType) -> &'static str {
    match file_type {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::BlockDevice => "block device",
        FileType::CharacterDevice => "character device",
        FileType::Unknown => "file of unknown type",
    }
}

/// A directory's names in byte order, without `.` and `..`.
fn list_names(dir: &mut Dir) -> Result<Vec<Vec<u8>>, Errno> {
    let mut names = Vec::new();
    for entry in dir.by_ref() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            names.push(name);
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Opens a regular file the walk found, by the handle of its directory and
/// never through a symlink, and returns it with its `fstat`: the caller
/// checks it is the inode examined (else the name was replaced meanwhile)
/// and a regular file. Without blocking on what is not one: a fifo swapped
/// in is opened, not waited on, and its `fstat` shows what it is.
pub fn open_file(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(File, Meta), Errno> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = loop {
        match rustix::fs::openat(dir, name, flags, Mode::empty()) {
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => break open_leased(dir, name)?,
            other => break other?,
        }
    };
    let meta = Meta::of(&rustix::fs::fstat(&fd)?);
    if meta.file_type == FileType::RegularFile {
        // Reads block as on any file (a FUSE file system sees the flag).
        // F_SETFL changes only the status flags, of which only O_NONBLOCK
        // was set: one call, no F_GETFL first.
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    }
    Ok((File::from(fd), meta))
}

/// A file under a lease (`F_SETLEASE`, an NFS delegation, a Samba oplock)
/// refuses a non-blocking open. It is opened as a path handle first, and
/// only a regular file is then opened for reading, blocking (until the
/// lease holder lets go, at most the kernel's lease-break time), through its
/// `/proc/self/fd` link, which names that very inode. Anything else comes
/// back as the path handle, for its `fstat` to show what it is.
fn open_leased(dir: BorrowedFd<'_>, name: &[u8]) -> Result<OwnedFd, Errno> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let path_fd = rustix::fs::openat(dir, name, flags, Mode::empty())?;
    let st = rustix::fs::fstat(&path_fd)?;
    if FileType::from_raw_mode(st.st_mode as _) != FileType::RegularFile {
        return Ok(path_fd);
    }
    let link = format!("/proc/self/fd/{}", path_fd.as_raw_fd());
    let flags = OFlags::RDONLY | OFlags::NOCTTY | OFlags::CLOEXEC;
    loop {
        match rustix::fs::open(link.as_str(), flags, Mode::empty()) {
            Err(Errno::INTR) => continue,
            other => return other,
        }
    }
}

/// True for errors that say the process (not the entry) is short of
/// something: a job fails on them instead of skipping the entry as
/// unreadable, which would leave it out of the snapshot for a passing reason.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
    )
}

/// The hard links met in one walk: for every inode with more than one name
/// (st_nlink > 1), the first name recorded for it and what the caller stored
/// with it (a backup: the content it read). Walks visit paths in tree order,
/// so the first name recorded is the first in tree order. An inode is
/// forgotten once all its names were seen, so memory holds only groups still
/// open (names outside the source or excluded keep theirs to the walk's end).
pub struct HardLinks<T> {
    groups: HashMap<(u64, u64), Group<T>>,
}

struct Group<T> {
    first: Vec<u8>,
    value: T,
    /// Names of the inode not seen yet.
    unseen: u64,
    /// Size, mtime and ctime when recorded: an inode number freed during the
    /// walk (every name of the group removed) and given to a new file is not
    /// taken for the group's inode.
    stamp: (u64, i64, i64),
}

fn stamp(meta: &Meta) -> (u64, i64, i64) {
    (meta.size, meta.mtime_ns, meta.ctime_ns)
}

impl<T: Clone> HardLinks<T> {
    pub fn new() -> Self {
        HardLinks {
            groups: HashMap::new(),
        }
    }

    /// For a file whose inode was recorded under an earlier name: that first
    /// name and its value. `None` for a file with one link, or the first of
    /// its names met (record it with [`HardLinks::record`]).
    pub fn earlier(&mut self, meta: &Meta) -> Option<(Vec<u8>, T)> {
        if meta.nlink < 2 {
            return None;
        }
        let key = (meta.dev, meta.ino);
        let group = self.groups.get_mut(&key)?;
        if group.stamp != stamp(meta) {
            // Another inode by that number, or the same one changed since:
            // read again (and recorded as a group of its own).
            self.groups.remove(&key);
            return None;
        }
        group.unseen = group.unseen.saturating_sub(1);
        if group.unseen == 0 {
            let g = self.groups.remove(&key)?;
            return Some((g.first, g.value));
        }
        Some((group.first.clone(), group.value.clone()))
    }

    /// Records `path` as the first name of its inode (no-op for one link).
    pub fn record(&mut self, meta: &Meta, path: &[u8], value: T) {
        if meta.nlink < 2 {
            return;
        }
        self.groups.insert(
            (meta.dev, meta.ino),
            Group {
                first: path.to_vec(),
                value,
                unseen: meta.nlink - 1,
                stamp: stamp(meta),
            },
        );
    }
}

impl<T: Clone> Default for HardLinks<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Nanoseconds since the epoch of a metadata time pair.
pub fn nanos(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

/// Checks a source root before a backup: an existing directory, reached
/// without a symlink (see [`open_root`]); the error names what to change.
pub fn source_root_exists(path: &Path) -> Result<(), String> {
    let shown = path.display();
    match open_root(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::ENOENT) => format!("{shown} does not exist"),
            // O_DIRECTORY | O_NOFOLLOW on a symlink fails with ENOTDIR.
            Some(libc::ENOTDIR) if !fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) => {
                format!("{shown} is not a directory")
            }
            Some(libc::ENOTDIR | libc::ELOOP) => {
                let real = match fs::canonicalize(path) {
                    Ok(real) => format!(" ({})", real.display()),
                    Err(_) => String::new(),
                };
                format!(
                    "{shown} is or passes through a symlink, which a backup does not follow \
                     (whoever can change the link could point it anywhere): give the path \
                     it resolves to{real}"
                )
            }
            _ => format!("{shown}: {e}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tree::cmp_paths;

    #[test]
    fn hard_links_name_their_first_path_and_groups_close() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        fs::create_dir_all(r.join("a")).unwrap();
        fs::write(r.join("a/one"), "x").unwrap();
        fs::hard_link(r.join("a/one"), r.join("b")).unwrap();
        fs::hard_link(r.join("a/one"), r.join("c")).unwrap();
        fs::write(r.join("single"), "y").unwrap();
        let w = Walker {
            excludes: &PathGlobs::new(&[]).unwrap(),
            one_file_system: false,
        };
        let mut links = HardLinks::<u32>::new();
        let mut seen: Vec<(String, Option<(String, u32)>)> = Vec::new();
        w.walk::<()>("s", r, &mut |p, found| {
            if let Found::File { meta, .. } = found {
                let earlier = links.earlier(meta);
                if earlier.is_none() {
                    links.record(meta, p, seen.len() as u32);
                }
                let name = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                seen.push((name(p), earlier.map(|(f, v)| (name(&f), v))));
            }
            Ok(())
        })
        .unwrap();
        let first = Some(("s/a/one".to_owned(), 0));
        assert_eq!(
            seen,
            vec![
                ("s/a/one".to_owned(), None),
                ("s/b".to_owned(), first.clone()),
                ("s/c".to_owned(), first),
                ("s/single".to_owned(), None),
            ]
        );
        assert!(
            links.groups.is_empty(),
            "a group is forgotten once complete"
        );
    }

    /// Near the root directories keep their handles; deeper ones are opened
    /// again beneath the root after each subdirectory: both walk the same.
    #[test]
    fn deep_and_shallow_entries_are_examined_alike() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        let levels = HELD_DIRS + 6;
        for level in 0..levels {
            deep.push(format!("d{level}"));
            fs::create_dir_all(&deep).unwrap();
            // After the subdirectory in name order: read once it is walked.
            fs::write(deep.parent().unwrap().join("z"), "12345").unwrap();
            if level == 0 || level == levels - 1 {
                fs::write(deep.join("file"), "12345").unwrap();
                std::os::unix::fs::symlink("file", deep.join("link")).unwrap();
                std::os::unix::fs::symlink(".", deep.join("loop")).unwrap();
            }
        }
        let w = Walker {
            excludes: &PathGlobs::new(&[]).unwrap(),
            one_file_system: false,
        };
        let (mut dirs, mut files, mut links) = (0, 0, 0);
        w.walk::<()>("s", dir.path(), &mut |_, found| {
            match found {
                Found::Dir { .. } => dirs += 1,
                Found::File { dir, name, meta } => {
                    assert_eq!(meta.size, 5);
                    let (_, opened) = open_file(dir, name).map_err(|_| ()).unwrap();
                    assert!(opened.same_inode(meta));
                    files += 1
                }
                Found::Symlink { .. } => links += 1,
                _ => panic!("unexpected entry"),
            }
            Ok(())
        })
        .unwrap();
        assert_eq!((dirs, files, links), (levels + 1, levels + 2, 4));
    }

    /// The walk goes on through the handles it holds: a directory renamed
    /// and replaced while it is walked is walked as it was (no file of the
    /// new one paired with metadata of the old), and a file or directory
    /// swapped for a symlink is never followed out of the tree.
    #[test]
    fn renames_and_symlinks_swapped_in_do_not_lead_out_of_the_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let (root, outside) = (tmp.path().join("root"), tmp.path().join("outside"));
        fs::create_dir_all(root.join("a/sub")).unwrap();
        fs::create_dir_all(outside.join("secrets")).unwrap();
        fs::write(outside.join("key"), "outside").unwrap();
        fs::write(outside.join("secrets/more"), "outside").unwrap();
        fs::write(root.join("a/x"), "inside").unwrap();
        fs::write(root.join("a/y"), "inside").unwrap();
        let w = Walker {
            excludes: &PathGlobs::new(&[]).unwrap(),
            one_file_system: false,
        };
        let mut read: Vec<(String, String)> = Vec::new();
        w.walk::<()>("s", &root, &mut |p, found| {
            let path = String::from_utf8_lossy(p).into_owned();
            match found {
                Found::Dir { .. } if path == "s/a" => {
                    // Listed, not yet examined: `sub` becomes a symlink out.
                    fs::remove_dir(root.join("a/sub")).unwrap();
                    std::os::unix::fs::symlink(outside.join("secrets"), root.join("a/sub"))
                        .unwrap();
                }
                Found::File { dir, name, meta } if path == "s/a/x" => {
                    // Examined, not yet opened: `a` renamed and replaced, `x` a symlink out.
                    fs::rename(root.join("a"), root.join("a.old")).unwrap();
                    fs::create_dir(root.join("a")).unwrap();
                    fs::write(root.join("a/x"), "replaced").unwrap();
                    fs::remove_file(root.join("a.old/x")).unwrap();
                    std::os::unix::fs::symlink(outside.join("key"), root.join("a.old/x")).unwrap();
                    assert_eq!(open_file(dir, name).err(), Some(Errno::LOOP));
                    let _ = meta;
                }
                Found::File { dir, name, meta } => {
                    let (mut f, opened) = open_file(dir, name).map_err(|_| ()).unwrap();
                    assert!(opened.same_inode(meta), "{path}");
                    let flags = rustix::fs::fcntl_getfl(&f).unwrap();
                    assert!(
                        !flags.contains(OFlags::NONBLOCK),
                        "read blocking: {flags:?}"
                    );
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut f, &mut s).unwrap();
                    read.push((path, s));
                }
                _ => {}
            }
            Ok(())
        })
        .unwrap();
        // `y` read from the directory walked (now `a.old`), nothing from outside.
        assert_eq!(read, vec![("s/a/y".to_owned(), "inside".to_owned())]);
    }

    /// A tree nested deeper than PATH_MAX allows by path (made with
    /// `mkdirat`, one level at a time): walked to `MAX_DEPTH`, each deep
    /// directory's later entries reached by opening it again beneath the
    /// root, and the level below refused by name, not a stack overflow.
    #[test]
    fn a_tree_deeper_than_the_limit_is_walked_to_it_and_refused_below() {
        let tmp = tempfile::tempdir().unwrap();
        let mut fd = rustix::fs::open(tmp.path(), DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..MAX_DEPTH + 2 {
            rustix::fs::mkdirat(&fd, "d", Mode::from_raw_mode(0o755)).unwrap();
            let z = rustix::fs::openat(
                &fd,
                "z",
                OFlags::CREATE | OFlags::WRONLY,
                Mode::from_raw_mode(0o644),
            )
            .unwrap();
            drop(z);
            fd = rustix::fs::openat(&fd, "d", DIR_FLAGS, Mode::empty()).unwrap();
        }
        let root = tmp.path().to_path_buf();
        let counts = std::thread::Builder::new()
            .stack_size(16 << 20)
            .spawn(move || {
                let w = Walker {
                    excludes: &PathGlobs::new(&[]).unwrap(),
                    one_file_system: false,
                };
                let (mut dirs, mut files, mut refused) = (0usize, 0usize, Vec::new());
                w.walk::<()>("s", &root, &mut |p, found| {
                    match found {
                        Found::Dir { .. } => dirs += 1,
                        Found::File { .. } => files += 1,
                        Found::Unreadable { error } => refused.push((p.len(), error.to_string())),
                        _ => panic!("unexpected entry"),
                    }
                    Ok(())
                })
                .unwrap();
                (dirs, files, refused)
            })
            .unwrap()
            .join()
            .unwrap();
        let (dirs, files, refused) = counts;
        assert_eq!(dirs, MAX_DEPTH + 1);
        assert_eq!(files, MAX_DEPTH + 1, "every level's `z`, after its `d`");
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].1.contains("nested deeper than"), "{refused:?}");
    }

    /// No symlink on the source root's path is followed: the root itself or
    /// a directory above it being one is refused by name.
    #[test]
    fn a_symlink_on_the_source_path_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir_all(real.join("src")).unwrap();
        std::os::unix::fs::symlink(&real, tmp.path().join("up")).unwrap();
        std::os::unix::fs::symlink(real.join("src"), tmp.path().join("root")).unwrap();
        assert!(source_root_exists(&real.join("src")).is_ok());
        for linked in [tmp.path().join("root"), tmp.path().join("up/src")] {
            let err = source_root_exists(&linked).unwrap_err();
            assert!(err.contains("symlink"), "{err}");
            let w = Walker {
                excludes: &PathGlobs::new(&[]).unwrap(),
                one_file_system: false,
            };
            let mut outcomes = Vec::new();
            w.walk::<()>("s", &linked, &mut |_, found| {
                outcomes.push(matches!(found, Found::Unreadable { .. }));
                Ok(())
            })
            .unwrap();
            assert_eq!(outcomes, vec![true], "{}", linked.display());
        }
        let err = source_root_exists(&real.join("missing")).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }

    /// A symlink replaced by a file between being examined and read is
    /// reported as vanished (a race), not as unreadable (a failed job).
    #[test]
    fn an_entry_replaced_after_being_examined_is_vanished_not_unreadable() {
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("x", tmp.path().join("l")).unwrap();
        let dir = rustix::fs::open(tmp.path(), DIR_FLAGS, Mode::empty()).unwrap();
        let st = rustix::fs::statat(&dir, "l", AtFlags::SYMLINK_NOFOLLOW).unwrap();
        let examined = Meta::of(&st);
        let (target, link) = read_symlink(dir.as_fd(), b"l").unwrap();
        assert_eq!((target.as_slice(), link), (&b"x"[..], examined));
        fs::remove_file(tmp.path().join("l")).unwrap();
        fs::write(tmp.path().join("l"), "now a file").unwrap();
        let e = read_symlink(dir.as_fd(), b"l").unwrap_err();
        assert!(matches!(
            after_failure(dir.as_fd(), b"l", &examined, e),
            Found::Vanished
        ));
        // The same inode failing is the entry's own error.
        let file = Meta::of(&rustix::fs::statat(&dir, "l", AtFlags::SYMLINK_NOFOLLOW).unwrap());
        let found = after_failure(dir.as_fd(), b"l", &file, Errno::ACCESS);
        assert!(matches!(found, Found::Unreadable { .. }));
    }

    /// An inode number met again with another size or times is not the
    /// group's inode (freed and reused during the walk): not linked.
    #[test]
    fn a_reused_inode_number_is_not_taken_for_the_group() {
        let meta = Meta {
            file_type: FileType::RegularFile,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 5,
            mtime_ns: 1,
            ctime_ns: 1,
            dev: 1,
            ino: 42,
            nlink: 3,
        };
        let mut links = HardLinks::<u32>::new();
        links.record(&meta, b"s/a", 7);
        assert_eq!(links.earlier(&meta), Some((b"s/a".to_vec(), 7)));
        let reused = Meta {
            ctime_ns: 2,
            ..meta
        };
        assert_eq!(links.earlier(&reused), None);
        assert_eq!(links.earlier(&meta), None, "the stale group is gone");
    }

    #[test]
    fn walk_order_is_tree_order_and_excludes_apply() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for p in [
            "a/b/c.txt",
            "a-c/x",
            "a.d",
            "ab",
            "cache/big",
            "keep.tmp",
            "sub/cache/kept",
        ] {
            let full = r.join(p);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, "x").unwrap();
        }
        std::os::unix::fs::symlink("a.d", r.join("link")).unwrap();
        let ex = PathGlobs::new(&["*.tmp".into(), "/cache".into()]).unwrap();
        let w = Walker {
            excludes: &ex,
            one_file_system: false,
        };
        let mut seen: Vec<Vec<u8>> = Vec::new();
        w.walk::<()>("src", r, &mut |p, _| {
            seen.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        let mut sorted = seen.clone();
        sorted.sort_by(|a, b| cmp_paths(a, b));
        assert_eq!(seen, sorted, "walk order is tree order");
        let names: Vec<String> = seen
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        assert!(
            !names
                .iter()
                .any(|n| n.ends_with(".tmp") || n == "src/cache" || n.starts_with("src/cache/")),
            "{names:?}"
        );
        assert!(
            names.contains(&"src/sub/cache/kept".to_owned()),
            "{names:?}"
        );
        assert!(names.contains(&"src/link".to_owned()));
        assert_eq!(names[0], "src");
    }
}
