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

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use rustix::io::Errno;

use crate::beneath::{DIR_FLAGS, open_dir_beneath};
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
    fn of(st: &rustix::fs::Stat) -> Meta {
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

/// Deeper than this, a directory is reported unreadable instead of walked
/// (the walk recurses once per level).
pub const MAX_DEPTH: usize = 1024;

/// One walk's fixed facts.
struct Root<'r> {
    fd: &'r OwnedFd,
    /// Length of `<source name>/` in the snapshot paths.
    rel_start: usize,
    dev: u64,
}

/// A directory being walked: its handle (dropped while a subdirectory is
/// walked beyond [`HELD_DIRS`]) and its inode, to find it again.
struct Held {
    fd: Option<Dir>,
    meta: Meta,
}

impl Walker<'_> {
    /// Walks `root`, calling `visit(snapshot_path, found)` for the root (named
    /// `name`) and everything below it, parents before children. Symlinks in
    /// `root` itself are followed (it is the operator's path); none beneath it.
    pub fn walk<E>(
        &self,
        name: &str,
        root: &Path,
        visit: &mut impl FnMut(&[u8], Found<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let rel = name.as_bytes();
        let opened = rustix::fs::open(root, DIR_FLAGS.difference(OFlags::NOFOLLOW), Mode::empty())
            .and_then(|fd| Ok((Meta::of(&rustix::fs::fstat(&fd)?), fd)));
        let (meta, fd) = match opened {
            Ok(v) => v,
            Err(e) => return visit(rel, Found::Unreadable { error: e.into() }),
        };
        let dir = match Dir::read_from(&fd) {
            Ok(d) => d,
            Err(e) => return visit(rel, Found::Unreadable { error: e.into() }),
        };
        let top = Root {
            fd: &fd,
            rel_start: rel.len() + 1,
            dev: meta.dev,
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
            Some(Err(e)) => return visit(rel, found_for(e)),
            None => return visit(rel, Found::Vanished),
        };
        visit(rel, Found::Dir { meta: &held.meta })?;
        for child in names {
            let len = rel.len();
            rel.push(b'/');
            rel.extend_from_slice(&child);
            let within = OsStr::from_bytes(&rel[root.rel_start.min(rel.len())..]);
            if !self.excludes.is_match(Path::new(within)) {
                // Opened again beneath the root after a deep subdirectory.
                let fd = match reopen(root, &mut held, &rel[..len]) {
                    Ok(fd) => fd,
                    Err(e) => {
                        // This directory is gone or replaced: the rest of it is not walked.
                        rel.truncate(len);
                        return visit(rel, found_for_io(e));
                    }
                };
                match rustix::fs::statat(fd, child.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => {
                        let meta = Meta::of(&st);
                        self.visit_entry(root, &mut held, rel, &child, meta, depth, visit)?
                    }
                    Err(e) => visit(rel, found_for(e))?,
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
            Err(e) => return visit(rel, found_for(e)),
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
            FileType::Symlink => match rustix::fs::readlinkat(fd, name, Vec::new()) {
                Ok(t) => visit(
                    rel,
                    Found::Symlink {
                        target: t.into_bytes(),
                        meta: &meta,
                    },
                ),
                Err(e) => visit(rel, found_for(e)),
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
                    Err(e) => return visit(rel, found_for(e)),
                };
                if self.one_file_system && child_meta.dev != root.dev {
                    return Ok(()); // mounted on since it was examined
                }
                let dir = match Dir::new(child) {
                    Ok(d) => d,
                    Err(e) => return visit(rel, found_for(e)),
                };
                if depth + 1 >= HELD_DIRS {
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

/// The handle of a directory being walked: only dropped between entries, and
/// [`reopen`]ed before the next.
fn held_fd(held: &Held) -> Result<BorrowedFd<'_>, Errno> {
    held.fd.as_ref().ok_or(Errno::BADF)?.fd()
}

/// How a failure to list, examine or open an entry is reported: gone or
/// replaced (a name swapped for a symlink or a file fails with ELOOP or
/// ENOTDIR; a directory removed on an NFS server with ESTALE) is `Vanished`.
fn found_for(e: Errno) -> Found<'static> {
    match e {
        Errno::NOENT | Errno::LOOP | Errno::NOTDIR | Errno::STALE => Found::Vanished,
        e => Found::Unreadable { error: e.into() },
    }
}

fn found_for_io(e: io::Error) -> Found<'static> {
    match Errno::from_io_error(&e) {
        Some(errno) => found_for(errno),
        None => Found::Unreadable { error: e },
    }
}

/// What a backup calls a file of this type in its messages.
pub fn describe(file_type: FileType) -> &'static str {
    match file_type {
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::BlockDevice => "block device",
        FileType::CharacterDevice => "character device",
        _ => "file of unknown type",
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
/// checks it is the inode examined (else the name was replaced meanwhile).
/// Without blocking: a fifo swapped in is opened, not waited on, and its
/// `fstat` shows what it is. Errors as [`found_for`] reports them.
pub fn open_file(dir: BorrowedFd<'_>, name: &[u8]) -> Result<(File, Meta), Found<'static>> {
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(found_for)?;
    let meta = Meta::of(&rustix::fs::fstat(&fd).map_err(found_for)?);
    Ok((File::from(fd), meta))
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

pub fn source_root_exists(path: &PathBuf) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(format!("{} does not exist", path.display()))
        }
        Err(e) => Err(format!("{}: {e}", path.display())),
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
                    assert!(matches!(open_file(dir, name), Err(Found::Vanished)));
                    let _ = meta;
                }
                Found::File { dir, name, meta } => {
                    let (mut f, opened) = open_file(dir, name).map_err(|_| ()).unwrap();
                    assert!(opened.same_inode(meta), "{path}");
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
