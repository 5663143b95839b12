//! Directory handles for restores. Every name a restore creates, opens,
//! links, renames, changes or removes is resolved relative to a handle of a
//! directory beneath its target, one component at a time and never through a
//! symlink. A string path would be resolved again at every call, so a
//! directory swapped for a symlink (or renamed) while the restore runs could
//! redirect writes outside the target; a held handle cannot be redirected.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};

use crate::beneath::DIR_FLAGS;
pub use crate::beneath::{open_dir, open_dir_beneath};

/// The restore target, opened once. Everything the restore writes is named
/// relative to this handle, so what the target path names later (a rename, a
/// symlink put in its place) does not matter.
pub struct Target {
    pub fd: Arc<OwnedFd>,
    /// The target as given, without trailing `/` or `.` components; for messages.
    pub path: PathBuf,
}

impl Target {
    /// Opens (creating it if missing) the target directory. Its last component
    /// must be a real directory: a symlink is refused with or without a
    /// trailing slash (`link` and `link/` alike), since following it would put
    /// the restore somewhere the operator did not name. Symlinks among the
    /// target's parent directories are followed as the OS does: they are the
    /// operator's own path. Without `overwrite` the target must be empty.
    pub fn open(given: &Path, overwrite: bool) -> Result<Target> {
        // `Path::components` drops trailing slashes and `.` components, which
        // would otherwise make the kernel follow a final symlink.
        let path: PathBuf = given.components().collect();
        let path = if path.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            path
        };
        let fd = match open_target_dir(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                open_target_dir(&path)
            }
            other => other,
        }
        .map_err(|e| target_error(&path, e))?;
        if !overwrite {
            let mut entries =
                rustix::fs::Dir::read_from(&fd).map_err(|e| Error::io(&path, e.into()))?;
            let mut non_empty = false;
            for d in entries.by_ref() {
                let d = d.map_err(|e| Error::io(&path, e.into()))?;
                if !matches!(d.file_name().to_bytes(), b"." | b"..") {
                    non_empty = true;
                    break;
                }
            }
            if non_empty {
                return Err(Error::InvalidArgument(format!(
                    "restore target {} is not empty (use --overwrite to restore over existing files)",
                    path.display()
                )));
            }
        }
        Ok(Target {
            fd: Arc::new(fd),
            path,
        })
    }
}

fn open_target_dir(path: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(path, DIR_FLAGS, Mode::empty()).map_err(io::Error::from)
}

/// Why the target could not be opened, in the operator's terms.
fn target_error(path: &Path, err: io::Error) -> Error {
    let meta = std::fs::symlink_metadata(path);
    match meta {
        Ok(m) if m.file_type().is_symlink() => {
            let to = std::fs::read_link(path)
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            Error::UnsafeTarget {
                path: path.to_owned(),
                reason: format!("is a symlink (to {to}); give the real directory instead"),
            }
        }
        Ok(m) if !m.is_dir() => Error::InvalidArgument(format!(
            "restore target {} is not a directory",
            path.display()
        )),
        _ => Error::io(path, err),
    }
}

/// Names for temporary entries: `.custos-<random>-<n>.tmp`, random per
/// restore and counted, so a file costs no extra system call for its name.
pub struct TempNames {
    prefix: String,
    next: u64,
}

/// Tries before giving up on finding a free temporary name (each collision
/// means someone else created that exact name in the meantime).
const TEMP_TRIES: usize = 8;

impl TempNames {
    pub fn new() -> Self {
        TempNames {
            prefix: hex::encode(crate::util::random_bytes::<6>()),
            next: 0,
        }
    }

    fn next(&mut self) -> Vec<u8> {
        self.next += 1;
        format!(".custos-{}-{:x}.tmp", self.prefix, self.next).into_bytes()
    }

    /// Creates a new empty file (mode 0600) under a temporary name in `dir`.
    pub fn file(&mut self, dir: &Arc<OwnedFd>) -> io::Result<(TempEntry, File)> {
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        self.create(dir, |name| {
            rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o600)).map(File::from)
        })
    }

    /// Creates a symlink to `target` under a temporary name in `dir`.
    pub fn symlink(&mut self, dir: &Arc<OwnedFd>, target: &[u8]) -> io::Result<TempEntry> {
        self.create(dir, |name| rustix::fs::symlinkat(target, dir, name))
            .map(|(t, ())| t)
    }

    /// Links `from_name` in `from_dir` (never following a symlink there) under
    /// a temporary name in `dir`.
    pub fn link(
        &mut self,
        from_dir: BorrowedFd<'_>,
        from_name: &[u8],
        dir: &Arc<OwnedFd>,
    ) -> io::Result<TempEntry> {
        self.create(dir, |name| {
            rustix::fs::linkat(from_dir, from_name, dir, name, AtFlags::empty())
        })
        .map(|(t, ())| t)
    }

    fn create<T>(
        &mut self,
        dir: &Arc<OwnedFd>,
        mut make: impl FnMut(&[u8]) -> rustix::io::Result<T>,
    ) -> io::Result<(TempEntry, T)> {
        let mut last = Errno::EXIST;
        for _ in 0..TEMP_TRIES {
            let name = self.next();
            match make(&name) {
                Ok(v) => {
                    return Ok((
                        TempEntry {
                            dir: dir.clone(),
                            name,
                            armed: true,
                        },
                        v,
                    ));
                }
                Err(Errno::EXIST) => last = Errno::EXIST,
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.into())
    }
}

/// An entry under a temporary name, removed when dropped unless it was put in
/// place: a restore that fails, is cancelled or panics leaves no
/// `.custos-*.tmp` behind.
pub struct TempEntry {
    dir: Arc<OwnedFd>,
    name: Vec<u8>,
    armed: bool,
}

/// Why an entry could not be put in place.
pub enum PlaceError {
    /// Something is there already and the restore does not overwrite.
    Exists,
    /// A directory is there (never replaced by a file or symlink).
    IsDir,
    Io(io::Error),
}

/// Set once the file system refused RENAME_NOREPLACE (EINVAL): checked by a
/// lookup before the rename from then on.
static NO_NOREPLACE: AtomicBool = AtomicBool::new(false);

impl TempEntry {
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    pub fn name(&self) -> &[u8] {
        &self.name
    }

    /// Renames the entry to `name` in the same directory. Without `overwrite`
    /// the rename itself refuses an existing name (RENAME_NOREPLACE), so
    /// nothing created meanwhile is replaced; with it, anything but a
    /// directory is replaced (a symlink in the way is replaced, not followed).
    pub fn place(mut self, name: &[u8], overwrite: bool) -> Result<(), PlaceError> {
        let dir = self.dir.as_fd();
        let renamed = if overwrite {
            rustix::fs::renameat(dir, &self.name, dir, name)
        } else if !NO_NOREPLACE.load(Ordering::Relaxed) {
            match rustix::fs::renameat_with(dir, &self.name, dir, name, RenameFlags::NOREPLACE) {
                Err(Errno::INVAL) => {
                    NO_NOREPLACE.store(true, Ordering::Relaxed);
                    rename_if_absent(dir, &self.name, name)
                }
                other => other,
            }
        } else {
            rename_if_absent(dir, &self.name, name)
        };
        match renamed {
            Ok(()) => {
                self.armed = false;
                Ok(())
            }
            Err(Errno::EXIST) => Err(PlaceError::Exists),
            Err(Errno::ISDIR | Errno::NOTEMPTY) => Err(PlaceError::IsDir),
            Err(e) => Err(PlaceError::Io(e.into())),
        }
    }
}

/// RENAME_NOREPLACE where the file system lacks it: a lookup, then the rename.
fn rename_if_absent(dir: BorrowedFd<'_>, from: &[u8], to: &[u8]) -> rustix::io::Result<()> {
    match rustix::fs::statat(dir, to, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => Err(Errno::EXIST),
        Err(Errno::NOENT) => rustix::fs::renameat(dir, from, dir, to),
        Err(e) => Err(e),
    }
}

impl Drop for TempEntry {
    fn drop(&mut self) {
        if self.armed {
            let _ = rustix::fs::unlinkat(&self.dir, &self.name, AtFlags::empty());
        }
    }
}

/// The last component of a stored path.
pub fn file_name(path: &[u8]) -> &[u8] {
    path.rsplit(|&b| b == b'/').next().unwrap_or(path)
}

/// The parent of a stored path (`None` at the top).
pub fn parent(path: &[u8]) -> Option<&[u8]> {
    path.iter().rposition(|&b| b == b'/').map(|i| &path[..i])
}

/// A stored path under the target, for messages.
pub fn shown(target: &Path, rel: &[u8]) -> PathBuf {
    target.join(OsStr::from_bytes(rel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn root(dir: &Path) -> OwnedFd {
        open_target_dir(dir).unwrap()
    }

    #[test]
    fn lookups_beneath_refuse_symlinks_with_and_without_openat2() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("t");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(t.join("a/b")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink(&outside, t.join("a/link")).unwrap();
        symlink("b", t.join("a/rel")).unwrap();
        let r = root(&t);
        for open in [open_dir_beneath, crate::beneath::open_dir_by_components] {
            assert!(open(r.as_fd(), b"a/b").is_ok());
            for bad in [&b"a/link"[..], b"a/link/x", b"a/rel", b"a/rel/x"] {
                let err = open(r.as_fd(), bad).unwrap_err();
                assert!(
                    matches!(
                        err.raw_os_error(),
                        Some(libc::ELOOP | libc::ENOTDIR | libc::ENOENT)
                    ),
                    "{}: {err}",
                    String::from_utf8_lossy(bad)
                );
            }
            assert!(open(r.as_fd(), b"../t").is_err());
            assert!(open(r.as_fd(), b"/tmp").is_err());
        }
    }

    #[test]
    fn a_symlinked_target_is_refused_with_or_without_a_trailing_slash() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir_all(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        for given in ["link", "link/", "link//", "link/.", "link/./"] {
            let err = Target::open(&tmp.path().join(given), true).err().unwrap();
            assert_eq!(err.kind(), "unsafe_target", "{given}: {err}");
            assert!(err.to_string().contains("is a symlink"), "{given}: {err}");
        }
        for given in ["real", "real/", "real/."] {
            let t = Target::open(&tmp.path().join(given), false).unwrap();
            assert_eq!(t.path, real);
        }
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        let err = Target::open(&file, true).err().unwrap();
        assert!(err.to_string().contains("not a directory"), "{err}");
        fs::write(real.join("x"), "x").unwrap();
        let err = Target::open(&real, false).err().unwrap();
        assert!(err.to_string().contains("not empty"), "{err}");
        let made = tmp.path().join("new/deeper/");
        Target::open(&made, false).unwrap();
        assert!(made.is_dir());
    }

    #[test]
    fn temporary_entries_are_removed_unless_placed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = Arc::new(root(tmp.path()));
        let mut names = TempNames::new();
        let (dropped, _f) = names.file(&dir).unwrap();
        let dropped_name = dropped.name().to_vec();
        assert!(dropped_name.starts_with(b".custos-") && dropped_name.ends_with(b".tmp"));
        drop(dropped);
        let (kept, _f) = names.file(&dir).unwrap();
        assert!(kept.place(b"kept", false).is_ok());
        let (again, _f) = names.file(&dir).unwrap();
        assert!(matches!(
            again.place(b"kept", false),
            Err(PlaceError::Exists)
        ));
        let link = names.symlink(&dir, b"/etc/passwd").unwrap();
        assert!(
            link.place(b"kept", true).is_ok(),
            "a file is replaced by the link itself"
        );
        fs::create_dir(tmp.path().join("d")).unwrap();
        let (f, _f) = names.file(&dir).unwrap();
        assert!(matches!(f.place(b"d", true), Err(PlaceError::IsDir)));
        let left: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(left, ["d", "kept"]);
        assert!(
            fs::symlink_metadata(tmp.path().join("kept"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn rename_without_noreplace_still_refuses_an_existing_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = root(tmp.path());
        fs::write(tmp.path().join("from"), "new").unwrap();
        fs::write(tmp.path().join("there"), "old").unwrap();
        assert_eq!(
            rename_if_absent(dir.as_fd(), b"from", b"there"),
            Err(Errno::EXIST)
        );
        symlink("/nonexistent", tmp.path().join("dangling")).unwrap();
        assert_eq!(
            rename_if_absent(dir.as_fd(), b"from", b"dangling"),
            Err(Errno::EXIST),
            "a dangling symlink is an existing name"
        );
        rename_if_absent(dir.as_fd(), b"from", b"free").unwrap();
        assert_eq!(fs::read_to_string(tmp.path().join("free")).unwrap(), "new");
        assert_eq!(fs::read_to_string(tmp.path().join("there")).unwrap(), "old");
    }

    #[test]
    fn stored_path_parts() {
        assert_eq!(file_name(b"a/b/c"), b"c");
        assert_eq!(file_name(b"c"), b"c");
        assert_eq!(parent(b"a/b/c"), Some(&b"a/b"[..]));
        assert_eq!(parent(b"c"), None);
    }
}
