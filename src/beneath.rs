//! Opening directories beneath a held directory handle, one component at a
//! time and never through a symlink: what a restore writes and what a backup
//! reads stay beneath their root whatever a concurrent rename or symlink
//! does to the paths (a string path is resolved anew at every call).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How a directory beneath a held one is opened: a symlink in its place fails
/// with ELOOP, anything else that is not a directory with ENOTDIR.
pub const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Set once openat2 turned out to be unavailable (kernels before 5.6, or a
/// seccomp filter that refuses it): later lookups go per component at once.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens the directory `name` (one component) in `parent`, never through a symlink.
pub fn open_dir(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    rustix::fs::openat(parent, name, DIR_FLAGS, Mode::empty()).map_err(io::Error::from)
}

/// Opens the directory at `rel` (a stored path: relative, no empty, `.` or
/// `..` component) beneath `root`, refusing any symlink on the way. Uses
/// openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS (one system call), and
/// falls back to opening component by component with O_NOFOLLOW where
/// openat2 is missing or the path is longer than the kernel takes at once.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    match open_dir_resolved(root, rel, resolve) {
        Some(opened) => opened,
        None => open_dir_by_components(root, rel),
    }
}

/// Opens the directory at `path` from `base` with `openat2` and `resolve`;
/// `None` where the kernel cannot (no openat2, a seccomp filter, a path
/// longer than it takes at once, or renames racing it three times): the
/// caller then opens one `O_NOFOLLOW` component at a time.
pub fn open_dir_resolved<P: rustix::path::Arg + Copy>(
    base: BorrowedFd<'_>,
    path: P,
    resolve: ResolveFlags,
) -> Option<io::Result<OwnedFd>> {
    if NO_OPENAT2.load(Ordering::Relaxed) {
        return None;
    }
    // EAGAIN: the kernel saw a concurrent rename and asks to try again.
    for _ in 0..3 {
        match rustix::fs::openat2(base, path, DIR_FLAGS, Mode::empty(), resolve) {
            Ok(fd) => return Some(Ok(fd)),
            Err(Errno::AGAIN) => continue,
            Err(Errno::NOSYS | Errno::PERM) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                return None;
            }
            Err(Errno::NAMETOOLONG) => return None,
            Err(e) => return Some(Err(e.into())),
        }
    }
    None
}

/// [`open_dir_beneath`] without openat2: each component opened with
/// O_NOFOLLOW | O_DIRECTORY relative to the one before.
pub(crate) fn open_dir_by_components(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    let mut fd: Option<OwnedFd> = None;
    for comp in rel.split(|&b| b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a normal relative path",
            ));
        }
        let next = open_dir(fd.as_ref().map_or(root, |f| f.as_fd()), comp)?;
        fd = Some(next);
    }
    fd.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty path"))
}
