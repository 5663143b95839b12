//! The local files custos trusts: key files, the state directory, the
//! configuration and the policies. Whoever can write them can make custos
//! destroy or unwrap keys, forget what it saw, or back up the wrong thing, so:
//!
//! - [`check_dir`] / [`check_file`] refuse a path that another local user
//!   could change, in the manner of ssh's `StrictModes`: the path itself, and
//!   every directory above it (as written and with symlinks resolved), must be
//!   owned by root or by the user running custos, and not writable by group
//!   or others. A directory above may be world-writable if it has the sticky
//!   bit (`/tmp`): others can then add entries but not move or replace ours.
//! - [`write_secret`] writes a file that holds key material so that a crash
//!   leaves either the old file or the new one, and at worst one temporary
//!   file beside it, private (0600, created `O_EXCL`), never a torn key;
//! - [`destroy_file`] removes such a file as destruction does: overwritten
//!   with zeros, fsynced, unlinked;
//! - [`DirLock`] serialises writers of one directory across processes
//!   (`flock`, released by the kernel when its holder dies, even by SIGKILL).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::util::sync_dir;

/// A path custos refuses to trust; the message names it and says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insecure {
    pub path: PathBuf,
    pub message: String,
}

impl fmt::Display for Insecure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Why a path could not be checked or was refused.
#[derive(Debug)]
pub enum CheckError {
    Insecure(Insecure),
    /// The path or a directory above it could not be examined.
    Io(PathBuf, io::Error),
}

impl fmt::Display for CheckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckError::Insecure(i) => i.fmt(f),
            CheckError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

impl From<CheckError> for crate::Error {
    fn from(e: CheckError) -> Self {
        match e {
            CheckError::Insecure(i) => crate::Error::InsecurePermissions {
                path: i.path,
                message: i.message,
            },
            CheckError::Io(p, e) => crate::Error::io(p, e),
        }
    }
}

/// What a checked path is, for the message and the suggested fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory only custos uses (keys, state): the fix is `chmod 700`.
    PrivateDir,
    /// A directory others may read (policies): the fix is `chmod go-w`.
    Dir,
    /// A directory custos makes its own private directories in (a drill's
    /// scratch parent): others may write it only if it is sticky (`/tmp`),
    /// so that they cannot rename what custos made there and put their own
    /// directory, or a symlink, in its place.
    StickyDir,
    File,
}

/// The user custos runs as (effective uid).
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks a directory custos trusts, and every directory above it.
pub fn check_dir(path: &Path, what: &str, kind: Kind) -> Result<(), CheckError> {
    check(path, what, kind)
}

/// Checks a file custos trusts (following symlinks), and every directory above it.
pub fn check_file(path: &Path, what: &str) -> Result<(), CheckError> {
    check(path, what, Kind::File)
}

fn check(path: &Path, what: &str, kind: Kind) -> Result<(), CheckError> {
    let me = euid();
    let abs = std::path::absolute(path).map_err(|e| CheckError::Io(path.to_owned(), e))?;
    let meta = fs::metadata(&abs).map_err(|e| CheckError::Io(abs.clone(), e))?;
    let shown = abs.display();
    let mode = meta.mode() & 0o7777;
    if meta.uid() != me && meta.uid() != 0 {
        return Err(insecure(
            &abs,
            format!(
                "{what} {shown} is owned by uid {}, neither root nor uid {me} that runs custos: its owner could change it; run chown {me} {shown}",
                meta.uid()
            ),
        ));
    }
    if mode & 0o022 != 0 && !(kind == Kind::StickyDir && mode & 0o1000 != 0) {
        let (could, fix) = match kind {
            Kind::PrivateDir => (
                "plant, replace or remove files in it",
                format!("chmod 700 {shown}"),
            ),
            Kind::Dir => (
                "plant, replace or remove files in it",
                format!("chmod go-w {shown}"),
            ),
            Kind::StickyDir => (
                "move what custos creates in it and put their own in its place",
                format!("chmod go-w {shown} (or chmod +t, as /tmp)"),
            ),
            Kind::File => ("change it", format!("chmod go-w {shown}")),
        };
        return Err(insecure(
            &abs,
            format!(
                "{what} {shown} is writable by group or others (mode {mode:04o}): any local user could {could}; run {fix}"
            ),
        ));
    }
    // The directories above, as written (a symlink's own directory decides
    // who can redirect it) and as resolved (who can move the target away).
    let mut seen = std::collections::BTreeSet::new();
    let resolved = fs::canonicalize(&abs).map_err(|e| CheckError::Io(abs.clone(), e))?;
    for start in [&abs, &resolved] {
        for dir in start.ancestors().skip(1) {
            if !seen.insert(dir.to_owned()) {
                continue;
            }
            let m = fs::metadata(dir).map_err(|e| CheckError::Io(dir.to_owned(), e))?;
            let d = dir.display();
            if m.uid() != me && m.uid() != 0 {
                return Err(insecure(
                    &abs,
                    format!(
                        "{what} {shown} is inside {d}, owned by uid {}, neither root nor uid {me} that runs custos: that user could move it away and put another in its place; run chown {me} {d}, or move {what} elsewhere",
                        m.uid()
                    ),
                ));
            }
            let dmode = m.mode() & 0o7777;
            // Sticky (1777 /tmp): others may add entries but cannot rename ours.
            if dmode & 0o022 != 0 && dmode & 0o1000 == 0 {
                return Err(insecure(
                    &abs,
                    format!(
                        "{what} {shown} is inside {d}, which is writable by group or others (mode {dmode:04o}) without the sticky bit: any local user could move it away and put another in its place; run chmod go-w {d}"
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn insecure(path: &Path, message: String) -> CheckError {
    CheckError::Insecure(Insecure {
        path: path.to_owned(),
        message,
    })
}

/// Opens a file key decisions rest on (the key registry, its lock) as
/// StrictModes would judge it, on the open descriptor: never through a
/// symbolic link, only a regular file owned by this user (or root) that
/// neither group nor others can write. Whoever can edit the key registry can
/// make any key provably a tenant's (and a shred destroy it). The directory
/// holding it is checked by [`check_dir`] when the state directory is opened.
pub fn open_trusted(
    path: &Path,
    what: &str,
    opts: &mut fs::OpenOptions,
) -> Result<fs::File, CheckError> {
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    // O_NONBLOCK: a FIFO put in the file's place must not block the open
    // (it is refused below as not a regular file); no effect on a file.
    let file = opts
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => insecure(
                path,
                format!(
                    "{what} {shown} is a symbolic link: it must be a regular file; remove the link"
                ),
            ),
            _ => CheckError::Io(path.to_owned(), e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| CheckError::Io(path.to_owned(), e))?;
    let me = euid();
    if !meta.file_type().is_file() {
        return Err(insecure(
            path,
            format!("{what} {shown} is not a regular file"),
        ));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(insecure(
            path,
            format!(
                "{what} {shown} is owned by uid {}, neither root nor uid {me} that runs custos: its owner could change it; run chown {me} {shown}",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(insecure(
            path,
            format!(
                "{what} {shown} is writable by group or others (mode {:04o}): any local user could change it; run chmod 600 {shown}",
                meta.mode() & 0o7777
            ),
        ));
    }
    Ok(file)
}

/// Who may read a file [`read_trusted`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readers {
    /// Anyone may read it (a CA certificate); no one else may change it.
    Anyone,
    /// It holds a secret (a PIN, a TLS private key): neither group nor others
    /// may read or write it.
    OwnerOnly,
}

/// Reads a small file custos trusts: [`check_file`] on its path and every
/// directory above, then [`open_trusted`] and the mode on the descriptor it
/// reads (so a file swapped in between the check and the read is judged
/// too). More than `max` bytes is refused: a PIN or a PEM file is small, and
/// a FIFO or `/dev/zero` put in its place must not hang or fill memory.
pub fn read_trusted(
    path: &Path,
    what: &str,
    readers: Readers,
    max: u64,
) -> Result<zeroize::Zeroizing<Vec<u8>>, CheckError> {
    use std::io::Read;
    check_file(path, what)?;
    let file = open_trusted(path, what, OpenOptions::new().read(true))?;
    let meta = file
        .metadata()
        .map_err(|e| CheckError::Io(path.to_owned(), e))?;
    let mode = meta.mode() & 0o7777;
    let shown = path.display();
    if readers == Readers::OwnerOnly && mode & 0o077 != 0 {
        return Err(insecure(
            path,
            format!(
                "{what} {shown} is readable or writable by group or others (mode {mode:04o}): it holds a secret; run chmod 600 {shown}"
            ),
        ));
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| CheckError::Io(path.to_owned(), e))?;
    if bytes.len() as u64 > max {
        return Err(CheckError::Io(
            path.to_owned(),
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the {what} is larger than {max} bytes"),
            ),
        ));
    }
    Ok(bytes)
}

/// Creates `dir` and any missing parent with mode 0700 (parents that exist
/// are left alone; [`check_dir`] judges them).
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// How [`write_secret`] puts the new file in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Atomically replace the target (rename).
    Replace,
    /// Only if the target does not exist yet (hard link, which fails if it does).
    CreateNew,
}

/// Writes a file that holds secrets: `dir/tmp_name` is created `O_EXCL |
/// O_NOFOLLOW` with mode 0600 (no other user can ever open it, and nothing
/// planted under that name is followed), written, fsynced, put in place as
/// `dir/target`, then the directory is fsynced. If anything fails the
/// temporary file is overwritten and unlinked before the error is returned,
/// so only a crash can leave it behind (callers sweep those, see
/// `keys::local`). `hook` is called with `"written"` once the temporary file
/// is durable and `"installed"` once it is in place (crash-test hooks).
///
/// Returns false when `Install::CreateNew` found the target already there
/// (the temporary file is then destroyed and nothing changes).
pub fn write_secret(
    dir: &Path,
    target: &str,
    tmp_name: &str,
    contents: &[u8],
    install: Install,
    // Generic, not `dyn`: the default build's empty hooks then compile to nothing.
    hook: &impl Fn(&str),
) -> io::Result<bool> {
    let tmp = dir.join(tmp_name);
    let dest = dir.join(target);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = f.write_all(contents).and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = written {
        let _ = destroy_file(&tmp, None);
        return Err(e);
    }
    hook("written");
    let installed = match install {
        Install::Replace => fs::rename(&tmp, &dest).map(|_| true),
        Install::CreateNew => match fs::hard_link(&tmp, &dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        },
    };
    match (install, &installed) {
        // The temporary name is now a second link to the new file: unlink
        // it only, never overwrite (that would zero the file just installed).
        // Gone already: a sweeper that saw the target in place took it.
        (Install::CreateNew, Ok(true)) => match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
        (Install::Replace, Ok(true)) => {}
        _ => {
            let _ = destroy_file(&tmp, None);
        }
    }
    let installed = installed?;
    hook("installed");
    sync_dir(dir)?;
    Ok(installed)
}

/// Destroys a file as key destruction does: overwrites its bytes with zeros,
/// fsyncs and unlinks it, never following a symlink (a symlink is unlinked
/// as such). When the file is the inode `keep` (`(dev, ino)`, e.g. a live
/// key file that this name is a second link to) it is only unlinked:
/// overwriting it would destroy the live file.
pub fn destroy_file(path: &Path, keep: Option<(u64, u64)>) -> io::Result<()> {
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path);
    match opened {
        Ok(mut f) => {
            let m = f.metadata()?;
            if !m.is_file() {
                return Err(io::Error::other(format!(
                    "{} is not a regular file; not removed",
                    path.display()
                )));
            }
            if keep != Some((m.dev(), m.ino())) {
                let zeros = [0u8; 64 << 10];
                let mut left = m.len();
                while left > 0 {
                    let n = left.min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..n])?;
                    left -= n as u64;
                }
                f.sync_all()?;
            }
        }
        // ELOOP: a symlink; its target is not ours to overwrite.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `(dev, ino)` of a file, if it exists (not following symlinks).
pub fn inode_of(path: &Path) -> Option<(u64, u64)> {
    fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| (m.dev(), m.ino()))
}

/// An exclusive `flock` on `<dir>/<name>`, held until dropped. The kernel
/// drops it when the holder exits in any way, so a crashed writer never
/// leaves the directory locked.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    fn open(dir: &Path, name: &str) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dir.join(name))
    }

    /// Takes the lock if it is free; `None` when another holder has it.
    pub fn try_acquire(dir: &Path, name: &str) -> io::Result<Option<DirLock>> {
        let file = Self::open(dir, name)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DirLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Waits up to `wait` for the lock: writers hold it for milliseconds, so
    /// a longer wait means a stopped process, which an error reports rather
    /// than hanging.
    pub fn acquire(dir: &Path, name: &str, wait: Duration) -> io::Result<DirLock> {
        let file = Self::open(dir, name)?;
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(2);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(fs::TryLockError::Error(e)) => return Err(e),
                Err(fs::TryLockError::WouldBlock) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "{} is locked by another process for over {} s",
                            dir.join(name).display(),
                            wait.as_secs()
                        ),
                    ));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(100));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn message(r: Result<(), CheckError>) -> String {
        match r {
            Err(CheckError::Insecure(i)) => i.message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn read_trusted_judges_the_file_it_reads() {
        let t = tempfile::tempdir().unwrap();
        chmod(t.path(), 0o700);
        let f = t.path().join("client.key");
        fs::write(&f, b"secret").unwrap();
        chmod(&f, 0o600);
        let read = |readers| read_trusted(&f, "KMIP client key", readers, 16);
        assert_eq!(&read(Readers::OwnerOnly).unwrap()[..], b"secret");
        // Readable by others: fine for a certificate, not for a secret.
        chmod(&f, 0o644);
        assert_eq!(&read(Readers::Anyone).unwrap()[..], b"secret");
        let m = match read(Readers::OwnerOnly) {
            Err(CheckError::Insecure(i)) => i.message,
            other => panic!("{other:?}"),
        };
        assert!(m.contains("chmod 600"), "{m}");
        // Writable by others: refused for both.
        chmod(&f, 0o664);
        assert!(matches!(
            read(Readers::Anyone),
            Err(CheckError::Insecure(_))
        ));
        chmod(&f, 0o600);
        // A symlink in its place, even to a good file: refused.
        let real = t.path().join("real.key");
        fs::rename(&f, &real).unwrap();
        std::os::unix::fs::symlink(&real, &f).unwrap();
        assert!(matches!(
            read(Readers::Anyone),
            Err(CheckError::Insecure(_))
        ));
        fs::remove_file(&f).unwrap();
        // A FIFO is not a regular file: refused at once, not waited on.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &f,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(matches!(
            read(Readers::Anyone),
            Err(CheckError::Insecure(_))
        ));
        fs::remove_file(&f).unwrap();
        // Larger than the limit: refused, whatever it holds.
        fs::write(&f, [b'x'; 17]).unwrap();
        chmod(&f, 0o600);
        let e = read(Readers::OwnerOnly).unwrap_err().to_string();
        assert!(e.contains("larger than 16 bytes"), "{e}");
    }

    #[test]
    fn refuses_group_or_other_writable_paths_and_names_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("keys");
        create_private_dir(&d).unwrap();
        check_dir(&d, "key directory", Kind::PrivateDir).unwrap();
        for mode in [0o777, 0o770, 0o702, 0o1777] {
            chmod(&d, mode);
            let m = message(check_dir(&d, "key directory", Kind::PrivateDir));
            assert!(m.contains(&d.display().to_string()), "{m}");
            assert!(m.contains(&format!("chmod 700 {}", d.display())), "{m}");
        }
        // Readable by others is no write access: accepted.
        chmod(&d, 0o755);
        check_dir(&d, "key directory", Kind::PrivateDir).unwrap();
        let f = d.join("alpha.toml");
        fs::write(&f, "x").unwrap();
        chmod(&f, 0o664);
        let m = message(check_file(&f, "policy file"));
        assert!(m.contains(&format!("chmod go-w {}", f.display())), "{m}");
        chmod(&f, 0o644);
        check_file(&f, "policy file").unwrap();
    }

    #[test]
    fn refuses_a_writable_directory_above_unless_it_is_sticky() {
        let t = tempfile::tempdir().unwrap();
        let top = t.path().join("top");
        let d = top.join("a/keys");
        create_private_dir(&d).unwrap();
        chmod(&top, 0o777);
        let m = message(check_dir(&d, "key directory", Kind::PrivateDir));
        assert!(m.contains(&format!("chmod go-w {}", top.display())), "{m}");
        // Like /tmp: others may add entries, not move ours.
        chmod(&top, 0o1777);
        check_dir(&d, "key directory", Kind::PrivateDir).unwrap();
    }

    #[test]
    fn checks_the_directories_of_a_symlink_and_of_its_target() {
        let t = tempfile::tempdir().unwrap();
        let open = t.path().join("open");
        let real = open.join("keys");
        create_private_dir(&real).unwrap();
        chmod(&open, 0o777);
        let link = t.path().join("keys");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // The link's own directory is fine; the target's is world-writable.
        let m = message(check_dir(&link, "key directory", Kind::PrivateDir));
        assert!(m.contains(&open.display().to_string()), "{m}");
        chmod(&open, 0o755);
        check_dir(&link, "key directory", Kind::PrivateDir).unwrap();
    }

    #[test]
    fn refuses_paths_owned_by_another_user() {
        if euid() != 0 {
            eprintln!("skipped: chown needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("state");
        create_private_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
        let m = message(check_dir(&d, "state directory", Kind::PrivateDir));
        assert!(m.contains("owned by uid 65534"), "{m}");
        assert!(m.contains(&format!("chown 0 {}", d.display())), "{m}");
        let inner = d.join("tenants");
        create_private_dir(&inner).unwrap();
        let m = message(check_dir(&inner, "state directory", Kind::PrivateDir));
        assert!(m.contains(&format!("inside {}", d.display())), "{m}");
    }

    #[test]
    fn write_secret_is_private_and_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let calls = std::cell::RefCell::new(Vec::new());
        let hook = |p: &str| calls.borrow_mut().push(p.to_owned());
        assert!(write_secret(t.path(), "k", ".k.tmp-1", b"one", Install::Replace, &hook).unwrap());
        assert!(write_secret(t.path(), "k", ".k.tmp-2", b"two", Install::Replace, &hook).unwrap());
        assert_eq!(fs::read(t.path().join("k")).unwrap(), b"two");
        assert_eq!(
            fs::metadata(t.path().join("k")).unwrap().mode() & 0o777,
            0o600
        );
        // CreateNew never replaces, and destroys its temporary file.
        assert!(
            !write_secret(t.path(), "k", ".k.tmp-3", b"new", Install::CreateNew, &hook).unwrap()
        );
        assert_eq!(fs::read(t.path().join("k")).unwrap(), b"two");
        assert!(write_secret(t.path(), "n", ".n.tmp-4", b"n", Install::CreateNew, &hook).unwrap());
        let names: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(
            calls.borrow().as_slice(),
            [
                "written",
                "installed",
                "written",
                "installed",
                "written",
                "installed",
                "written",
                "installed"
            ]
        );
        // A name planted where the temporary file goes is never followed or reused.
        std::os::unix::fs::symlink("/etc/passwd", t.path().join(".k.tmp-5")).unwrap();
        assert!(write_secret(t.path(), "k", ".k.tmp-5", b"x", Install::Replace, &hook).is_err());
        assert_eq!(fs::read(t.path().join("k")).unwrap(), b"two");
    }

    #[test]
    fn destroy_file_overwrites_unless_it_is_the_kept_inode() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let witness = t.path().join("witness");
        fs::write(&a, b"secret material").unwrap();
        fs::hard_link(&a, &witness).unwrap();
        destroy_file(&a, None).unwrap();
        assert!(!a.exists());
        assert_eq!(fs::read(&witness).unwrap(), vec![0u8; 15]);

        let live = t.path().join("live");
        let second = t.path().join("second");
        fs::write(&live, b"live key").unwrap();
        fs::hard_link(&live, &second).unwrap();
        destroy_file(&second, inode_of(&live)).unwrap();
        assert!(!second.exists());
        assert_eq!(fs::read(&live).unwrap(), b"live key");

        // A symlink is removed, its target untouched; a missing file is fine.
        let target = t.path().join("target");
        fs::write(&target, b"keep").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        destroy_file(&link, None).unwrap();
        assert!(fs::symlink_metadata(&link).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        destroy_file(&link, None).unwrap();
    }

    #[test]
    fn dir_lock_excludes_other_holders_until_dropped() {
        let t = tempfile::tempdir().unwrap();
        let held = DirLock::try_acquire(t.path(), ".lock").unwrap().unwrap();
        assert!(DirLock::try_acquire(t.path(), ".lock").unwrap().is_none());
        let err = DirLock::acquire(t.path(), ".lock", Duration::from_millis(30)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(held);
        DirLock::acquire(t.path(), ".lock", Duration::from_millis(30)).unwrap();
    }
}
