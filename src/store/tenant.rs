//! The tenant-scoped view of a store: the only way jobs reach tenant data.

use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, PutResult,
};

use super::SharedStore;
use super::layout::{Dir, ObjectName};

mod sequential;
use crate::error::{Error, Result};
use crate::tenant::TenantId;
pub use sequential::SequentialRead;

/// Attempts for an operation that fails transiently (network, 5xx, throttling)
/// after the backend's own retries; then the job fails cleanly.
const ATTEMPTS: u32 = 4;

#[derive(Clone)]
pub struct TenantStore {
    scoped: PrefixStore<SharedStore>,
    tenant: TenantId,
    prefix: String,
}

/// What [`TenantStore::get_if_changed`] found.
#[derive(Debug)]
pub enum Fetched {
    Missing,
    /// Its ETag is still the one given.
    Unchanged,
    Changed(Bytes, ObjectMeta),
}

/// One listed object: its typed name when custos recognises it.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: Option<ObjectName>,
    /// Path relative to the tenant prefix.
    pub path: Path,
    pub meta: ObjectMeta,
}

impl std::fmt::Debug for TenantStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TenantStore({})", self.prefix)
    }
}

impl TenantStore {
    pub fn new(root: SharedStore, tenant: &TenantId) -> Self {
        let prefix = format!("tenants/{tenant}");
        TenantStore {
            scoped: PrefixStore::new(root, prefix.as_str()),
            tenant: tenant.clone(),
            prefix,
        }
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Full store path of an object, for messages and reports.
    pub fn display(&self, name: &ObjectName) -> String {
        format!("{}/{}", self.prefix, name)
    }

    fn path_display(&self, rel: &Path) -> String {
        format!("{}/{}", self.prefix, rel)
    }

    pub async fn get(&self, name: &ObjectName) -> Result<Bytes> {
        self.get_if_exists(name)
            .await?
            .map(|(b, _)| b)
            .ok_or_else(|| Error::missing(self.display(name), "not found in the store"))
    }

    pub async fn get_if_exists(&self, name: &ObjectName) -> Result<Option<(Bytes, ObjectMeta)>> {
        Ok(match self.get_if_changed(name, None).await? {
            Fetched::Changed(bytes, meta) => Some((bytes, meta)),
            Fetched::Missing | Fetched::Unchanged => None,
        })
    }

    /// Reads an object unless its ETag is still `e_tag` (`If-None-Match`):
    /// one request either way, and no body when it is unchanged.
    pub async fn get_if_changed(&self, name: &ObjectName, e_tag: Option<&str>) -> Result<Fetched> {
        let path = name.relative();
        let result = retry(|| async {
            let options = object_store::GetOptions {
                if_none_match: e_tag.map(str::to_owned),
                ..Default::default()
            };
            let r = self.scoped.get_opts(&path, options).await?;
            let meta = r.meta.clone();
            let bytes = r.bytes().await?;
            // A body cut short without an error (a proxy, a buggy server) is
            // a failed read to retry, not a truncated object.
            if bytes.len() as u64 != meta.size {
                return Err(short_read(&path, meta.size, bytes.len()));
            }
            Ok((bytes, meta))
        })
        .await;
        match result {
            Ok((bytes, meta)) => Ok(Fetched::Changed(bytes, meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(Fetched::Missing),
            Err(object_store::Error::NotModified { .. }) if e_tag.is_some() => {
                Ok(Fetched::Unchanged)
            }
            Err(e) => Err(Error::store("get", self.display(name), e)),
        }
    }

    pub async fn get_range(&self, name: &ObjectName, range: Range<u64>) -> Result<Bytes> {
        let mut parts = self.get_ranges(name, std::slice::from_ref(&range)).await?;
        Ok(parts.pop().expect("one range, one part"))
    }

    /// Reads byte ranges. A range past the end of the object means the object is
    /// shorter than its index or directory says: that is reported as a corrupt
    /// object (truncated or replaced), not retried as a transient failure.
    pub async fn get_ranges(&self, name: &ObjectName, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        let path = name.relative();
        let read = || async {
            let parts = self.scoped.get_ranges(&path, ranges).await?;
            for (part, r) in parts.iter().zip(ranges) {
                if part.len() as u64 != r.end - r.start {
                    return Err(short_read(&path, r.end - r.start, part.len()));
                }
            }
            Ok(parts)
        };
        match read().await {
            Ok(parts) => return Ok(parts),
            Err(object_store::Error::NotFound { .. }) => {
                return Err(Error::missing(self.display(name), "not found in the store"));
            }
            Err(_) => {}
        }
        let wanted = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        if let Some(meta) = self.head(name).await?
            && meta.size < wanted
        {
            return Err(Error::corrupt(
                self.display(name),
                format!(
                    "object is {} bytes, shorter than the {wanted} expected (truncated or replaced)",
                    meta.size
                ),
            ));
        }
        retry(read)
            .await
            .map_err(|e| self.map_read_error("get", name, e))
    }

    /// Reads `range` of an object a listing gave as `size` bytes, which must
    /// still be that object: the store states the object's whole size (and
    /// ETag) with each answer, and a size other than `size`, or an ETag other
    /// than `version` (an earlier read's), is a corrupt object, changed since
    /// it was listed or while being read. Returns the bytes and the ETag.
    pub async fn get_range_of(
        &self,
        name: &ObjectName,
        range: Range<u64>,
        size: u64,
        version: Option<&str>,
    ) -> Result<(Bytes, Option<String>)> {
        let path = name.relative();
        let changed = |what: String| Err(Error::corrupt(self.display(name), what));
        if range.end > size {
            return changed(format!("range {range:?} is past its listed {size} bytes"));
        }
        let read = || async {
            // The whole object unranged: a server may answer a range that
            // covers all of it with 200 rather than 206, which object_store
            // refuses for a ranged request.
            let whole = range.start == 0 && range.end == size;
            let options = object_store::GetOptions {
                range: (!whole).then(|| object_store::GetRange::Bounded(range.clone())),
                ..Default::default()
            };
            let r = self.scoped.get_opts(&path, options).await?;
            let meta = r.meta.clone();
            if meta.size != size {
                return Ok((Bytes::new(), meta));
            }
            let bytes = r.bytes().await?;
            if bytes.len() as u64 != range.end - range.start {
                return Err(short_read(&path, range.end - range.start, bytes.len()));
            }
            Ok((bytes, meta))
        };
        let (bytes, meta) = match retry(read).await {
            Ok(v) => v,
            Err(e) => {
                // A range past the end of an object cut short since the
                // listing is refused by the store: say so, not a store error.
                return match self.head(name).await? {
                    Some(meta) if meta.size != size => changed(format!(
                        "object is {} bytes, listed as {size} (changed since it was listed)",
                        meta.size
                    )),
                    None => Err(Error::missing(self.display(name), "not found in the store")),
                    Some(_) => Err(self.map_read_error("get", name, e)),
                };
            }
        };
        if meta.size != size {
            return changed(format!(
                "object is {} bytes, listed as {size} (changed since it was listed)",
                meta.size
            ));
        }
        if let (Some(before), Some(now)) = (version, meta.e_tag.as_deref())
            && before != now
        {
            return changed("object changed while being read (its ETag changed)".into());
        }
        Ok((bytes, meta.e_tag))
    }

    fn map_read_error(&self, op: &'static str, name: &ObjectName, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { .. } => {
                Error::missing(self.display(name), "not found in the store")
            }
            e => Error::store(op, self.display(name), e),
        }
    }
    pub async fn head(&self, name: &ObjectName) -> Result<Option<ObjectMeta>> {
        let path = name.relative();
        match retry(|| self.scoped.head(&path)).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store("head", self.display(name), e)),
        }
    }

    /// Writes an object, replacing any previous one. Only for objects with
    /// unique random names (packs, index, snapshots) or idempotent content.
    pub async fn put(&self, name: &ObjectName, bytes: Bytes) -> Result<PutResult> {
        let path = name.relative();
        retry(|| {
            self.scoped
                .put(&path, PutPayload::from_bytes(bytes.clone()))
        })
        .await
        .map_err(|e| Error::store("put", self.display(name), e))
    }

    /// A conditional write. Returns the backend error unchanged so callers can
    /// tell `AlreadyExists` / `Precondition` apart. Not retried: a retried
    /// conditional write could report a conflict with itself.
    pub async fn put_conditional(
        &self,
        name: &ObjectName,
        bytes: Bytes,
        mode: PutMode,
    ) -> std::result::Result<PutResult, object_store::Error> {
        self.scoped
            .put_opts(
                &name.relative(),
                PutPayload::from_bytes(bytes),
                PutOptions {
                    mode,
                    ..Default::default()
                },
            )
            .await
    }

    /// Creates an object under a fresh random name (a reader record, a
    /// deletion plan), retrying transient failures like [`Self::put`]. A
    /// create answered "already exists" is ours when the object holds
    /// exactly `body` (an earlier attempt landed, its answer lost); anything
    /// else there is an error. Returns the created object's ETag and version.
    /// `fail` names a store error for the caller.
    pub async fn create_unique(
        &self,
        name: &ObjectName,
        body: Bytes,
        fail: impl Fn(object_store::Error) -> Error,
    ) -> Result<(Option<String>, Option<String>)> {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            match self
                .put_conditional(name, body.clone(), PutMode::Create)
                .await
            {
                Ok(r) => return Ok((r.e_tag, r.version)),
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return match self.get_if_exists(name).await? {
                        Some((bytes, meta)) if bytes == body => Ok((meta.e_tag, meta.version)),
                        _ => Err(fail(object_store::Error::Generic {
                            store: "custos",
                            source: "an object with this random name already exists".into(),
                        })),
                    };
                }
                Err(e) if attempt < ATTEMPTS && is_transient(&e) => {
                    tracing::debug!(error = %e, attempt, "transient store error; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                }
                Err(e) => return Err(fail(e)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Deletes an object; deleting what is already gone succeeds.
    pub async fn delete(&self, name: &ObjectName) -> Result<()> {
        self.delete_path(&name.relative()).await
    }

    /// Deletes by relative path (prune removes leftovers it cannot name).
    pub async fn delete_path(&self, rel: &Path) -> Result<()> {
        match retry(|| self.scoped.delete(rel)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store("delete", self.path_display(rel), e)),
        }
    }

    pub async fn list(&self, dir: Dir) -> Result<Vec<Listed>> {
        self.list_prefix(Some(&Path::from(dir.name()))).await
    }

    /// Every object under the tenant prefix.
    pub async fn list_all(&self) -> Result<Vec<Listed>> {
        self.list_prefix(None).await
    }

    async fn list_prefix(&self, prefix: Option<&Path>) -> Result<Vec<Listed>> {
        let metas: Vec<ObjectMeta> = retry(|| self.scoped.list(prefix).try_collect())
            .await
            .map_err(|e| {
                Error::store(
                    "list",
                    format!(
                        "{}/{}",
                        self.prefix,
                        prefix.map(|p| p.as_ref()).unwrap_or("")
                    ),
                    e,
                )
            })?;
        let mut out: Vec<Listed> = metas
            .into_iter()
            .map(|meta| Listed {
                name: ObjectName::parse(&meta.location),
                path: meta.location.clone(),
                meta,
            })
            .collect();
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }
}

/// Retries an operation while it fails with a transient error (the backend's
/// `Generic` class: network, 5xx, throttling), with exponential backoff.
async fn retry<T, F, Fut>(mut op: F) -> std::result::Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, object_store::Error>>,
{
    let mut delay = Duration::from_millis(100);
    for attempt in 1.. {
        match op().await {
            Err(e) if attempt < ATTEMPTS && is_transient(&e) => {
                tracing::debug!(error = %e, attempt, "transient store error; retrying");
                let jitter =
                    Duration::from_millis(rand::random_range(0..=delay.as_millis() as u64 / 2));
                tokio::time::sleep(delay + jitter).await;
                delay *= 3;
            }
            other => return other,
        }
    }
    unreachable!("the loop returns on the last attempt")
}

/// A read that returned fewer bytes than asked for: transient (retried).
fn short_read(path: &Path, wanted: u64, got: usize) -> object_store::Error {
    object_store::Error::Generic {
        store: "custos",
        source: format!("short read of {path}: {got} of {wanted} bytes").into(),
    }
}

pub fn is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    ) && super::local::permanent_os_error(e).is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory;

    /// The "already exists" answer a retried create gets when its earlier
    /// attempt landed: ours when the bytes are, refused otherwise.
    #[tokio::test]
    async fn a_unique_create_finds_its_own_earlier_attempt_and_nothing_else() {
        let store = TenantStore::new(memory(), &TenantId::new("a").unwrap());
        let fail = |e| Error::store("put", "plan", e);
        let name = ObjectName::Deletion("0123456789abcdef0123456789abcdef".into());
        let body = Bytes::from_static(b"{\"plan\":1}");
        store
            .create_unique(&name, body.clone(), fail)
            .await
            .unwrap();
        // As if the answer to that create was lost and it was sent again.
        let (e_tag, _) = store
            .create_unique(&name, body.clone(), fail)
            .await
            .unwrap();
        assert!(e_tag.is_some());
        let other = Bytes::from_static(b"{\"plan\":2}");
        let err = store.create_unique(&name, other, fail).await.unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(store.get(&name).await.unwrap(), body);
    }

    #[tokio::test]
    async fn tenants_cannot_see_each_other() {
        let root = memory();
        let a = TenantStore::new(root.clone(), &TenantId::new("a").unwrap());
        let b = TenantStore::new(root.clone(), &TenantId::new("b").unwrap());
        a.put(&ObjectName::Descriptor, Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(
            b.get_if_exists(&ObjectName::Descriptor)
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(a.list_all().await.unwrap().len(), 1);
        assert!(b.list_all().await.unwrap().is_empty());
        let err = b.get(&ObjectName::Descriptor).await.unwrap_err();
        assert_eq!(err.kind(), "missing_object");
        assert!(err.to_string().contains("tenants/b/tenant.json"), "{err}");
        // "a" is not a prefix of "ab": listing is by path segment.
        let ab = TenantStore::new(root, &TenantId::new("ab").unwrap());
        assert!(ab.list_all().await.unwrap().is_empty());
    }
}
