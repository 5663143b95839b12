//! The local-directory store: `object_store`'s `LocalFileSystem` (with fsync,
//! so a snapshot is never durable before the packs it names), plus the one
//! thing it lacks: conditional updates (`PutMode::Update`), which leases need.
//! Updates and creates are serialised with an exclusive `flock` on the store's
//! root directory, so several processes on one machine can share the store.

use std::fs::File;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    Result,
};

#[derive(Debug)]
pub struct LocalStore {
    inner: LocalFileSystem,
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed, mode 0700) a store rooted at `root`.
    pub fn new(root: &FsPath) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        let inner = LocalFileSystem::new_with_prefix(root)
            .map_err(std::io::Error::other)?
            .with_fsync(true);
        Ok(LocalStore {
            inner,
            root: root.to_owned(),
        })
    }

    pub fn root(&self) -> &FsPath {
        &self.root
    }

    /// Runs `f` while holding the store's exclusive lock.
    async fn locked<T>(&self, f: impl AsyncFnOnce() -> Result<T>) -> Result<T> {
        let root = self.root.clone();
        let guard = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
            let dir = File::open(&root)?;
            dir.lock()?;
            Ok(dir)
        })
        .await
        .map_err(|e| object_store::Error::JoinError { source: e })?
        .map_err(|e| object_store::Error::Generic {
            store: "LocalStore",
            source: Box::new(e),
        })?;
        let out = f().await;
        drop(guard); // closing the descriptor releases the flock
        out
    }
}

impl std::fmt::Display for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalStore({})", self.root.display())
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        match &opts.mode {
            PutMode::Overwrite => self.inner.put_opts(location, payload, opts).await,
            PutMode::Create => {
                self.locked(async || self.inner.put_opts(location, payload, opts).await)
                    .await
            }
            PutMode::Update(expected) => {
                let expected = expected.clone();
                self.locked(async || {
                    let current = match self.inner.head(location).await {
                        Ok(meta) => meta.e_tag,
                        Err(object_store::Error::NotFound { .. }) => None,
                        Err(e) => return Err(e),
                    };
                    if current.is_none() || current != expected.e_tag {
                        return Err(object_store::Error::Precondition {
                            path: location.to_string(),
                            source: format!(
                                "expected e-tag {:?}, found {current:?}",
                                expected.e_tag
                            )
                            .into(),
                        });
                    }
                    let opts = PutOptions {
                        mode: PutMode::Overwrite,
                        ..opts
                    };
                    self.inner.put_opts(location, payload, opts).await
                })
                .await
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

/// Removes the staging files (`<name>#<digits>`, object_store's half-written
/// uploads, which listings skip) under a tenant's prefix: what a process
/// killed mid-upload leaves. Only for a caller holding the tenant lease
/// (prune): no other process then writes the tenant's packs, index files or
/// snapshots; the descriptor, envelopes and lease are written with
/// conditional puts, which hold the store's lock, and so does this sweep.
/// Returns how many were removed.
pub fn sweep_staging(root: &FsPath, tenant: &crate::TenantId) -> std::io::Result<usize> {
    let guard = File::open(root)?;
    guard.lock()?;
    let mut removed = 0;
    let mut stack = vec![root.join("tenants").join(tenant.as_str())];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() && is_staging_name(&entry.file_name()) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    drop(guard);
    Ok(removed)
}

/// `<name>#<digits>`, the names `LocalFileSystem` stages uploads under.
fn is_staging_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .and_then(|n| n.rsplit_once('#'))
        .is_some_and(|(base, n)| {
            !base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        })
}

/// The operating-system error behind a store failure that retrying cannot
/// fix: a read-only file system (EROFS), no space or quota left (ENOSPC,
/// EDQUOT), no permission (EACCES, EPERM, an immutable file) or a file too
/// large (EFBIG). `LocalFileSystem` reports every I/O failure as
/// `Generic`, the class custos retries as transient (network, 5xx); without
/// this a read-only store was retried until the lease gave up and reported
/// "lease held by another process".
pub fn permanent_os_error(e: &object_store::Error) -> Option<&std::io::Error> {
    use std::io::ErrorKind;
    let object_store::Error::Generic { source, .. } = e else {
        return None;
    };
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    while let Some(err) = next {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ReadOnlyFilesystem
                    | ErrorKind::StorageFull
                    | ErrorKind::QuotaExceeded
                    | ErrorKind::PermissionDenied
                    | ErrorKind::FileTooLarge
            )
        {
            return Some(io);
        }
        next = err.source();
    }
    None
}

/// True when the store failed because it is out of space (ENOSPC, EDQUOT).
pub fn is_out_of_space(e: &object_store::Error) -> bool {
    permanent_os_error(e).is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    })
}

/// Opens a local store as a shared store.
pub fn open(root: &FsPath) -> crate::Result<Arc<dyn ObjectStore>> {
    let store = LocalStore::new(root).map_err(|e| crate::Error::StoreConfig {
        url: format!("file://{}", root.display()),
        message: format!("cannot open the store directory: {e}"),
    })?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::UpdateVersion;

    #[tokio::test]
    async fn conditional_create_and_update() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::new(dir.path()).unwrap();
        let p = Path::from("locks/lease");
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let first = s.put_opts(&p, "a".into(), create()).await.unwrap();
        assert!(matches!(
            s.put_opts(&p, "b".into(), create()).await,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        let update = |tag: Option<String>| PutOptions {
            mode: PutMode::Update(UpdateVersion {
                e_tag: tag,
                version: None,
            }),
            ..Default::default()
        };
        let second = s
            .put_opts(&p, "c".into(), update(first.e_tag.clone()))
            .await
            .unwrap();
        // The stale version loses.
        assert!(matches!(
            s.put_opts(&p, "d".into(), update(first.e_tag)).await,
            Err(object_store::Error::Precondition { .. })
        ));
        s.put_opts(&p, "e".into(), update(second.e_tag))
            .await
            .unwrap();
        assert_eq!(s.get(&p).await.unwrap().bytes().await.unwrap(), "e");
    }
}

#[cfg(test)]
mod sweep_tests {
    use super::*;

    #[test]
    fn only_staging_files_of_the_tenant_data_go() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("tenants/acme");
        for p in ["packs/ab", "index", "snapshots", "locks", "keys"] {
            std::fs::create_dir_all(t.join(p)).unwrap();
        }
        for f in [
            "packs/ab/abcd#1",
            "index/ef#12",
            "snapshots/01#3",
            "tenant.json#1",
            "keys/2#1",
            "locks/lease#1",
            "packs/ab/abcd",
            "index/x#y",
            "tenant.json",
        ] {
            std::fs::write(t.join(f), b"x").unwrap();
        }
        let acme = crate::TenantId::new("acme").unwrap();
        assert_eq!(sweep_staging(dir.path(), &acme).unwrap(), 6);
        assert!(t.join("packs/ab/abcd").exists());
        assert!(t.join("index/x#y").exists());
        assert!(t.join("tenant.json").exists());
        let other = crate::TenantId::new("nobody").unwrap();
        assert_eq!(sweep_staging(dir.path(), &other).unwrap(), 0);
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    fn local_error(kind: std::io::ErrorKind) -> object_store::Error {
        object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(std::io::Error::from(kind)),
        }
    }

    #[test]
    fn permanent_os_errors_are_not_retried() {
        use std::io::ErrorKind;
        for kind in [
            ErrorKind::ReadOnlyFilesystem,
            ErrorKind::StorageFull,
            ErrorKind::QuotaExceeded,
            ErrorKind::PermissionDenied,
            ErrorKind::FileTooLarge,
        ] {
            let e = local_error(kind);
            assert!(permanent_os_error(&e).is_some(), "{kind:?}");
            assert!(!crate::store::tenant::is_transient(&e), "{kind:?}");
            let err = crate::Error::store("put", "tenants/acme/locks/lease", e);
            assert!(!err.is_transient());
            let want = if matches!(kind, ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
                "insufficient_space"
            } else {
                "store_error"
            };
            assert_eq!(err.kind(), want, "{kind:?}");
        }
        for kind in [
            ErrorKind::ConnectionReset,
            ErrorKind::TimedOut,
            ErrorKind::Other,
        ] {
            let e = local_error(kind);
            assert!(permanent_os_error(&e).is_none(), "{kind:?}");
            assert!(crate::store::tenant::is_transient(&e), "{kind:?}");
        }
    }
}
