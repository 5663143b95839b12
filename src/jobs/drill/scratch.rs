//! The drill's scratch space: the free-space check, and a private directory
//! per drill that is removed afterwards even where the restore set read-only
//! modes on its directories.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use crate::error::{Error, Result};
use crate::secure_fs;
use crate::tenant::TenantId;

/// Bytes an unprivileged process can still write on the file system holding
/// `path` (statvfs: `f_bavail * f_frsize`).
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a valid NUL-terminated string and `st` points to writable
    // memory of the right type; statvfs fills it on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Creates the scratch parent (and missing ancestors) with mode 0700, and
/// refuses one another local user could change, as StrictModes would (owned
/// by someone else, or writable by others without the sticky bit): they
/// could swap the drill's private directory for one of their own, which the
/// restore would then fill with the tenant's decrypted files.
pub fn ensure_parent(parent: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| Error::io(parent, e))?;
    secure_fs::check_dir(
        parent,
        "drill scratch directory",
        secure_fs::Kind::StickyDir,
    )?;
    Ok(())
}

/// Creates a new private directory for one drill under `parent`.
pub fn create_private(parent: &Path, tenant: &TenantId) -> Result<PathBuf> {
    let name = format!(
        "custos-drill-{tenant}-{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ"),
        hex::encode(crate::util::random_bytes::<4>())
    );
    let dir = parent.join(name);
    // Not recursive: the directory must be new, never one an attacker prepared.
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    // The umask may only have narrowed it; make the mode exact, on the
    // directory itself (a path would follow a symlink put in its place).
    chmod_dir(&dir, 0o700).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Removes a scratch directory. Restored directories carry their stored modes
/// (possibly read-only), so each is made owner-writable first; symlinks are
/// never followed.
pub fn remove(dir: &Path) -> io::Result<()> {
    make_writable(dir)?;
    fs::remove_dir_all(dir)
}

fn make_writable(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Ok(());
    }
    if meta.permissions().mode() & 0o700 != 0o700 {
        chmod_dir(dir, 0o700)?;
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_writable(&entry.path())?;
        }
    }
    Ok(())
}

/// Changes the mode of the directory at `path`, never through a symlink
/// (one swapped in after a check would otherwise pass the chmod, as root, to
/// whatever it names).
fn chmod_dir(path: &Path, mode: u32) -> io::Result<()> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_free_space_and_cleans_read_only_trees() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(available_bytes(tmp.path()).unwrap() > 0);
        let tenant = TenantId::new("acme").unwrap();
        let dir = create_private(tmp.path(), &tenant).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::create_dir_all(dir.join("a/b")).unwrap();
        fs::write(dir.join("a/b/f"), b"x").unwrap();
        fs::set_permissions(dir.join("a/b"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(dir.join("a"), fs::Permissions::from_mode(0o500)).unwrap();
        remove(&dir).unwrap();
        assert!(!dir.exists());
    }
}
