//! An object-store prefix as a backup source (`type = "object_store"`,
//! `url = "s3://attachments/acme/"`): the objects under the prefix become a
//! directory tree under the source name, as if the keys were paths.
//!
//! - Keys are listed and put in tree order ([`cmp_paths`]), and a directory
//!   entry is synthesised for every key prefix, just before its first child,
//!   so the tree merges with the parent snapshot like a walked directory.
//! - Each object becomes a file: size, last-modified as mtime, mode 0644. Its
//!   e-tag (or version) is hashed into the entry's `inode` field and `ctime_ns`
//!   is 0, so change detection against the parent (size, mtime, ctime, inode)
//!   sees a changed e-tag without any change to the tree format.
//! - Content is streamed (a GET's body, chunk by chunk, into the chunker):
//!   no object is ever held whole in memory.
//! - Keys that cannot be paths (empty, `.` or `..` components, directory
//!   markers ending in `/`) or that are also a prefix of other keys (a file and
//!   a directory of one name) are skipped with a warning.
//!
//! The store is opened with the same AWS settings as the main store
//! (`[aws]` in custos.toml, or the AWS environment). `file:///dir/` URLs work
//! too (tests, NFS-mounted exports).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use tokio::runtime::Handle;

use crate::error::{Error, Result};
use crate::format::tree::{Entry, EntryKind, cmp_paths, validate_path};
use crate::store::SharedStore;
use crate::store::s3::S3Options;

/// Opens the store a source or restore URL names: `s3://bucket/prefix/` or
/// `file:///absolute/dir/`.
pub fn open_url(url: &str, s3: &S3Options) -> Result<SharedStore> {
    let bad = |message: String| Error::StoreConfig {
        url: url.to_owned(),
        message,
    };
    if url.starts_with("s3://") {
        let (bucket, prefix) = crate::config::settings::parse_s3_url(url).map_err(bad)?;
        return crate::store::s3::open(&bucket, &prefix, s3);
    }
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(bad("a file:// URL must be absolute (file:///dir)".into()));
        }
        let fs = object_store::local::LocalFileSystem::new_with_prefix(path)
            .map_err(|e| bad(e.to_string()))?;
        return Ok(Arc::new(fs));
    }
    Err(bad(
        "expected s3://bucket/prefix/ or file:///dir/ for an object-store URL".into(),
    ))
}

/// One item of a source tree, in tree order.
#[derive(Debug, Clone)]
pub enum Item {
    /// A synthesised directory (the source root or a key prefix).
    Dir { entry: Entry },
    /// An object: its tree path and its listed metadata.
    Object { path: Vec<u8>, meta: ObjectMeta },
}

/// Lists the objects of `store` as a tree under `name`, in tree order, with
/// warnings for the keys skipped.
pub async fn list_tree(store: &SharedStore, name: &str) -> Result<(Vec<Item>, Vec<String>)> {
    let mut metas = Vec::new();
    let mut listing = store.list(None);
    while let Some(m) = listing.next().await {
        metas.push(m.map_err(|e| Error::Source {
            source_name: name.to_owned(),
            message: format!("listing the objects: {e}"),
        })?);
    }
    Ok(tree_from_listing(name, metas))
}

/// The pure part of [`list_tree`]: sort, filter, synthesise directories.
pub fn tree_from_listing(name: &str, metas: Vec<ObjectMeta>) -> (Vec<Item>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut objects: Vec<(Vec<u8>, ObjectMeta)> = Vec::with_capacity(metas.len());
    for meta in metas {
        let key = meta.location.as_ref().as_bytes().to_vec();
        if let Err(why) = validate_path(&key) {
            warnings.push(format!(
                "object {:?} skipped: {why}",
                meta.location.as_ref()
            ));
            continue;
        }
        objects.push((key, meta));
    }
    objects.sort_by(|a, b| cmp_paths(&a.0, &b.0));
    // A key that is also a directory (`a` and `a/b`): keep the directory.
    let mut keep = vec![true; objects.len()];
    for i in 0..objects.len().saturating_sub(1) {
        let (k, next) = (&objects[i].0, &objects[i + 1].0);
        if next.len() > k.len() && next.starts_with(k) && next[k.len()] == b'/' {
            keep[i] = false;
            warnings.push(format!(
                "object {:?} skipped: other objects use it as a prefix (a file and a directory of one name)",
                String::from_utf8_lossy(k)
            ));
        }
    }
    let objects: Vec<_> = objects
        .into_iter()
        .zip(keep)
        .filter_map(|(o, k)| k.then_some(o))
        .collect();
    // A directory's mtime: its newest object's, so the tree is deterministic.
    let mut dir_mtime: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut newest = 0i64;
    for (key, meta) in &objects {
        let t = mtime_ns(meta);
        newest = newest.max(t);
        for (i, &b) in key.iter().enumerate() {
            if b == b'/' {
                let m = dir_mtime.entry(key[..i].to_vec()).or_insert(t);
                *m = (*m).max(t);
            }
        }
    }
    let dir = |path: Vec<u8>, mtime_ns: i64| Item::Dir {
        entry: Entry {
            path,
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns,
            uid: 0,
            gid: 0,
            size: 0,
            blobs: Vec::new(),
            target: None,
            hardlink: None,
            inode: 0,
            ctime_ns: 0,
        },
    };
    let mut items = Vec::with_capacity(objects.len() + 1);
    items.push(dir(name.as_bytes().to_vec(), newest));
    // Directories open above the current key, as key prefixes.
    let mut open: Vec<Vec<u8>> = Vec::new();
    for (key, meta) in objects {
        let parents: Vec<usize> = key
            .iter()
            .enumerate()
            .filter_map(|(i, &b)| (b == b'/').then_some(i))
            .collect();
        let depth = open
            .iter()
            .zip(&parents)
            .take_while(|(o, i)| o.as_slice() == &key[..**i])
            .count();
        open.truncate(depth);
        for &i in &parents[depth..] {
            let p = key[..i].to_vec();
            let mut path = name.as_bytes().to_vec();
            path.push(b'/');
            path.extend_from_slice(&p);
            items.push(dir(path, dir_mtime.get(&p).copied().unwrap_or(0)));
            open.push(p);
        }
        let mut path = name.as_bytes().to_vec();
        path.push(b'/');
        path.extend_from_slice(&key);
        items.push(Item::Object { path, meta });
    }
    (items, warnings)
}

fn mtime_ns(meta: &ObjectMeta) -> i64 {
    meta.last_modified.timestamp_nanos_opt().unwrap_or(0)
}

/// The change-detection fingerprint of an object: its e-tag (else version)
/// hashed to 64 bits, stored in the entry's `inode` field.
pub fn etag_fingerprint(meta: &ObjectMeta) -> u64 {
    let tag = meta
        .e_tag
        .as_deref()
        .or(meta.version.as_deref())
        .unwrap_or("");
    if tag.is_empty() {
        return 0;
    }
    let h = blake3::hash(tag.as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The tree entry of an object (content blobs to be filled in).
pub fn file_entry(path: Vec<u8>, meta: &ObjectMeta) -> Entry {
    Entry {
        path,
        kind: EntryKind::File,
        mode: 0o644,
        mtime_ns: mtime_ns(meta),
        uid: 0,
        gid: 0,
        size: meta.size,
        blobs: Vec::new(),
        target: None,
        hardlink: None,
        inode: etag_fingerprint(meta),
        ctime_ns: 0,
    }
}

/// An object's body as a blocking [`Read`], pulled chunk by chunk from the
/// GET stream through the runtime handle (for the backup's reader thread).
pub struct StreamReader {
    rt: Handle,
    stream: BoxStream<'static, object_store::Result<Bytes>>,
    current: Bytes,
}

impl StreamReader {
    /// GETs `location`; returns the reader and the metadata of what is read.
    pub fn open(
        rt: &Handle,
        store: &SharedStore,
        location: &Path,
    ) -> object_store::Result<(Self, ObjectMeta)> {
        let r = rt.block_on(store.get(location))?;
        let meta = r.meta.clone();
        Ok((
            StreamReader {
                rt: rt.clone(),
                stream: r.into_stream(),
                current: Bytes::new(),
            },
            meta,
        ))
    }
}

impl Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta {
            location: Path::from(key),
            last_modified: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            size: 1,
            e_tag: Some(format!("\"{key}\"")),
            version: None,
        }
    }

    #[test]
    fn keys_become_a_tree_in_tree_order() {
        let (items, warnings) = tree_from_listing(
            "att",
            ["b.txt", "a/x/1", "a-c", "a/y", "a/x/2", "c", "c/d", "a.d"]
                .into_iter()
                .map(meta)
                .collect(),
        );
        let paths: Vec<String> = items
            .iter()
            .map(|i| match i {
                Item::Dir { entry } => format!("{}/", entry.display_path()),
                Item::Object { path, .. } => String::from_utf8_lossy(path).into_owned(),
            })
            .collect();
        assert_eq!(
            paths,
            [
                "att/",
                "att/a/",
                "att/a/x/",
                "att/a/x/1",
                "att/a/x/2",
                "att/a/y",
                "att/a-c",
                "att/a.d",
                "att/b.txt",
                "att/c/",
                "att/c/d"
            ]
        );
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("\"c\""));
        // Tree order holds across the whole sequence.
        let raw: Vec<&[u8]> = items
            .iter()
            .map(|i| match i {
                Item::Dir { entry } => entry.path.as_slice(),
                Item::Object { path, .. } => path.as_slice(),
            })
            .collect();
        assert!(raw.windows(2).all(|w| cmp_paths(w[0], w[1]).is_lt()));
    }

    #[test]
    fn etag_changes_change_the_fingerprint() {
        let a = meta("k");
        let mut b = meta("k");
        b.e_tag = Some("\"other\"".into());
        assert_ne!(etag_fingerprint(&a), etag_fingerprint(&b));
        assert_eq!(file_entry(b"s/k".to_vec(), &a).inode, etag_fingerprint(&a));
    }
}
