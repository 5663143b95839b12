//! Walks a directory tree in tree order (depth first, children sorted by name
//! bytes), the order snapshot trees are stored in, so a backup can merge the
//! walk with its parent snapshot's tree without holding either in memory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::PathGlobs;

/// What the walker found at one path.
pub enum Found<'a> {
    Dir {
        meta: &'a Metadata,
    },
    File {
        path: &'a Path,
        meta: &'a Metadata,
    },
    Symlink {
        target: Vec<u8>,
        meta: &'a Metadata,
    },
    /// A fifo, socket or device: not backed up, counted.
    Special {
        what: &'static str,
    },
    /// Could not be listed or examined.
    Unreadable {
        error: io::Error,
    },
    /// Disappeared between listing and examining.
    Vanished,
}

/// Walks one source. Excludes match the path relative to the source root
/// (see [`PathGlobs`]); an excluded directory is skipped whole.
pub struct Walker<'a> {
    pub excludes: &'a PathGlobs,
    pub one_file_system: bool,
}

impl Walker<'_> {
    /// Walks `root`, calling `visit(snapshot_path, found)` for the root (named
    /// `name`) and everything below it, parents before children.
    pub fn walk<E>(
        &self,
        name: &str,
        root: &Path,
        visit: &mut impl FnMut(&[u8], Found<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let meta = match fs::symlink_metadata(root) {
            Ok(m) => m,
            Err(error) => return visit(name.as_bytes(), Found::Unreadable { error }),
        };
        let dev = meta.dev();
        let mut rel = name.as_bytes().to_vec();
        self.visit_path(root, &mut rel, name.len() + 1, meta, dev, 0, visit)
    }

    #[allow(clippy::too_many_arguments)]
    fn visit_path<E>(
        &self,
        path: &Path,
        rel: &mut Vec<u8>,
        root_len: usize,
        meta: Metadata,
        dev: u64,
        depth: usize,
        visit: &mut impl FnMut(&[u8], Found<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let ft = meta.file_type();
        if ft.is_file() {
            return visit(rel, Found::File { path, meta: &meta });
        }
        if ft.is_symlink() {
            return match fs::read_link(path) {
                Ok(t) => visit(
                    rel,
                    Found::Symlink {
                        target: t.as_os_str().as_bytes().to_vec(),
                        meta: &meta,
                    },
                ),
                Err(e) if e.kind() == io::ErrorKind::NotFound => visit(rel, Found::Vanished),
                Err(error) => visit(rel, Found::Unreadable { error }),
            };
        }
        if !ft.is_dir() {
            let what = if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() {
                "block device"
            } else {
                "character device"
            };
            return visit(rel, Found::Special { what });
        }
        let names = match list_dir(path, depth < HELD_DIRS) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return visit(rel, Found::Vanished),
            Err(error) => return visit(rel, Found::Unreadable { error }),
        };
        visit(rel, Found::Dir { meta: &meta })?;
        for (child, entry) in names {
            let len = rel.len();
            rel.push(b'/');
            rel.extend_from_slice(child.as_bytes());
            let child_path = path.join(&child);
            let within = OsStr::from_bytes(&rel[root_len.min(rel.len())..]);
            if !self.excludes.is_match(Path::new(within)) {
                // By the directory's descriptor where it is still open: the
                // kernel looks up one name, not every component of the path
                // (path lookups were 12% of an incremental backup of 2M files).
                let examined = match &entry {
                    Some(e) => e.metadata(),
                    None => fs::symlink_metadata(&child_path),
                };
                match examined {
                    Ok(m) if self.one_file_system && m.is_dir() && m.dev() != dev => {}
                    Ok(m) => {
                        self.visit_path(&child_path, rel, root_len, m, dev, depth + 1, visit)?
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => visit(rel, Found::Vanished)?,
                    Err(error) => visit(rel, Found::Unreadable { error })?,
                }
            }
            rel.truncate(len);
        }
        Ok(())
    }
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
    pub fn earlier(&mut self, meta: &Metadata) -> Option<(Vec<u8>, T)> {
        if meta.nlink() < 2 {
            return None;
        }
        let key = (meta.dev(), meta.ino());
        let group = self.groups.get_mut(&key)?;
        group.unseen = group.unseen.saturating_sub(1);
        if group.unseen == 0 {
            let g = self.groups.remove(&key)?;
            return Some((g.first, g.value));
        }
        Some((group.first.clone(), group.value.clone()))
    }

    /// Records `path` as the first name of its inode (no-op for one link).
    pub fn record(&mut self, meta: &Metadata, path: &[u8], value: T) {
        if meta.nlink() < 2 {
            return;
        }
        self.groups.insert(
            (meta.dev(), meta.ino()),
            Group {
                first: path.to_vec(),
                value,
                unseen: meta.nlink() - 1,
            },
        );
    }
}

impl<T: Clone> Default for HardLinks<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Directories deeper than this are examined by path: each directory whose
/// entries are kept holds a descriptor open until its walk ends, and a deep
/// tree must not run the process out of them.
const HELD_DIRS: usize = 64;

/// A directory's names in byte order, each with its entry (which examines
/// it through the directory's descriptor) when `keep_entries`.
fn list_dir(
    path: &Path,
    keep_entries: bool,
) -> io::Result<Vec<(std::ffi::OsString, Option<fs::DirEntry>)>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        names.push((entry.file_name(), keep_entries.then_some(entry)));
    }
    names.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(names)
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

    /// Near the root entries are examined by the directory's descriptor,
    /// deeper by path: both the same way (symlinks not followed).
    #[test]
    fn deep_and_shallow_entries_are_examined_alike() {
        let dir = tempfile::tempdir().unwrap();
        let mut deep = dir.path().to_path_buf();
        for level in 0..HELD_DIRS + 6 {
            deep.push(format!("d{level}"));
            if level == 0 || level == HELD_DIRS + 5 {
                fs::create_dir_all(&deep).unwrap();
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
                Found::File { meta, .. } => {
                    assert_eq!(meta.len(), 5);
                    files += 1
                }
                Found::Symlink { .. } => links += 1,
                _ => panic!("unexpected entry"),
            }
            Ok(())
        })
        .unwrap();
        assert_eq!((dirs, files, links), (HELD_DIRS + 7, 2, 4));
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
