//! Tree entries: the files, directories and symlinks of a snapshot, one JSON
//! object per line, in tree order (see [`cmp_paths`]). The JSON-lines stream
//! is cut into content-defined chunks stored as `tree` blobs, so an unchanged
//! part of a tree deduplicates across snapshots like file data does.

use std::cmp::Ordering;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use super::ids::BlobId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// One entry of a snapshot tree. `path` is relative: its first component is the
/// source name; components are separated by '/', never empty, '.' or '..'.
/// Names are bytes (Unix file names need not be UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (st_mode & 0o7777).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub uid: u32,
    pub gid: u32,
    /// Files: content size in bytes.
    pub size: u64,
    /// Files: content blobs in order.
    pub blobs: Vec<BlobId>,
    /// Symlinks: the link target, as stored.
    pub target: Option<Vec<u8>>,
    /// Files that had several names (st_nlink > 1) at backup: the path of the
    /// first name of the same inode in tree order (the entry's own path for
    /// that first one). Entries with the same value are one hard-link group;
    /// each still carries the full content, so any one of them restores alone.
    pub hardlink: Option<Vec<u8>>,
    /// Change detection against the parent snapshot (not restored).
    pub inode: u64,
    pub ctime_ns: i64,
}

/// The JSON shape: byte strings appear as `"path"` when valid UTF-8, else as
/// `"path_b64"` (standard base64); the same for `target`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path_b64: Option<String>,
    #[serde(rename = "type")]
    kind: EntryKind,
    mode: u32,
    mtime_ns: i64,
    #[serde(default)]
    uid: u32,
    #[serde(default)]
    gid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    blobs: Vec<BlobId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hardlink: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hardlink_b64: Option<String>,
    #[serde(default)]
    inode: u64,
    #[serde(default)]
    ctime_ns: i64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn split_bytes(b: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(b) {
        Ok(s) => (Some(s.to_owned()), None),
        Err(_) => (None, Some(STANDARD.encode(b))),
    }
}

fn join_bytes(
    text: Option<String>,
    b64: Option<String>,
    what: &str,
) -> Result<Option<Vec<u8>>, String> {
    match (text, b64) {
        (Some(s), None) => Ok(Some(s.into_bytes())),
        (None, Some(b)) => STANDARD
            .decode(b)
            .map(Some)
            .map_err(|e| format!("{what}_b64: {e}")),
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(format!("both {what} and {what}_b64")),
    }
}

impl Entry {
    pub fn to_json_line(&self, out: &mut Vec<u8>) {
        let (path, path_b64) = split_bytes(&self.path);
        let (target, target_b64) = match &self.target {
            Some(t) => split_bytes(t),
            None => (None, None),
        };
        let (hardlink, hardlink_b64) = match &self.hardlink {
            Some(t) => split_bytes(t),
            None => (None, None),
        };
        let json = EntryJson {
            path,
            path_b64,
            kind: self.kind,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            blobs: self.blobs.clone(),
            target,
            target_b64,
            hardlink,
            hardlink_b64,
            inode: self.inode,
            ctime_ns: self.ctime_ns,
        };
        serde_json::to_writer(&mut *out, &json).expect("entries serialise");
        out.push(b'\n');
    }

    pub fn from_json_line(line: &[u8]) -> Result<Self, String> {
        let j: EntryJson = serde_json::from_slice(line).map_err(|e| e.to_string())?;
        let path = join_bytes(j.path, j.path_b64, "path")?.ok_or("entry without a path")?;
        validate_path(&path)?;
        let target = join_bytes(j.target, j.target_b64, "target")?;
        let hardlink = join_bytes(j.hardlink, j.hardlink_b64, "hardlink")?;
        if let Some(first) = &hardlink {
            if j.kind != EntryKind::File {
                return Err("hardlink on a non-file".into());
            }
            validate_path(first)?;
            // The first name comes first: a reader links later names to it.
            if cmp_paths(first, &path) == Ordering::Greater {
                return Err("hardlink names a path after the entry's own".into());
            }
        }
        match j.kind {
            EntryKind::Symlink if target.is_none() => return Err("symlink without a target".into()),
            EntryKind::File | EntryKind::Dir if target.is_some() => {
                return Err("target on a non-symlink".into());
            }
            EntryKind::Dir | EntryKind::Symlink if !j.blobs.is_empty() => {
                return Err("blobs on a non-file".into());
            }
            _ => {}
        }
        Ok(Entry {
            path,
            kind: j.kind,
            mode: j.mode & 0o7777,
            mtime_ns: j.mtime_ns,
            uid: j.uid,
            gid: j.gid,
            size: j.size,
            blobs: j.blobs,
            target,
            hardlink,
            inode: j.inode,
            ctime_ns: j.ctime_ns,
        })
    }

    pub fn display_path(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// A stored path must be relative and normal: no empty, '.' or '..' component,
/// no NUL. Restore relies on this to never write outside its target.
pub fn validate_path(path: &[u8]) -> Result<(), String> {
    if path.is_empty() || path.contains(&0) {
        return Err("empty path or NUL in path".into());
    }
    for comp in path.split(|&b| b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return Err(format!(
                "path {:?} is not a normal relative path",
                String::from_utf8_lossy(path)
            ));
        }
    }
    Ok(())
}

/// Tree order: component by component, each compared as bytes. Equivalent to
/// comparing bytes with '/' ranked below every other byte, which is the order
/// of a depth-first walk that visits the children of a directory sorted by name.
pub fn cmp_paths(a: &[u8], b: &[u8]) -> Ordering {
    let rank = |c: u8| if c == b'/' { 0u16 } else { c as u16 + 1 };
    for (x, y) in a.iter().zip(b) {
        match rank(*x).cmp(&rank(*y)) {
            Ordering::Equal => continue,
            other => return other,
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &[u8]) -> Entry {
        Entry {
            path: path.to_vec(),
            kind: EntryKind::File,
            mode: 0o644,
            mtime_ns: 1_700_000_000_123_456_789,
            uid: 1000,
            gid: 1000,
            size: 3,
            blobs: vec![BlobId([1; 32])],
            target: None,
            hardlink: None,
            inode: 42,
            ctime_ns: 5,
        }
    }

    #[test]
    fn json_round_trip_with_non_utf8_names() {
        for path in [b"docs/a.md".to_vec(), b"src/\xff\xfe-name".to_vec()] {
            let e = file(&path);
            let mut line = Vec::new();
            e.to_json_line(&mut line);
            assert_eq!(Entry::from_json_line(&line[..line.len() - 1]).unwrap(), e);
        }
        let mut link = file(b"s/link");
        link.kind = EntryKind::Symlink;
        link.blobs.clear();
        link.target = Some(b"../\x80target".to_vec());
        let mut line = Vec::new();
        link.to_json_line(&mut line);
        assert!(String::from_utf8_lossy(&line).contains("target_b64"));
        assert_eq!(Entry::from_json_line(&line).unwrap(), link);
    }

    #[test]
    fn hardlinks_round_trip_and_bad_ones_are_refused() {
        for (path, first) in [
            (&b"d/b"[..], &b"d/a"[..]),
            (b"d/b", b"d/b"),
            (b"z/\xff", b"a/\xfe"),
        ] {
            let mut e = file(path);
            e.hardlink = Some(first.to_vec());
            let mut line = Vec::new();
            e.to_json_line(&mut line);
            assert_eq!(Entry::from_json_line(&line).unwrap(), e);
        }
        let line = |json: &str| Entry::from_json_line(json.as_bytes());
        let ok = r#"{"path":"d/b","type":"file","mode":420,"mtime_ns":1,"hardlink":"d/a"}"#;
        assert_eq!(line(ok).unwrap().hardlink.as_deref(), Some(&b"d/a"[..]));
        for (bad, why) in [
            (
                r#"{"path":"d","type":"dir","mode":493,"mtime_ns":1,"hardlink":"c"}"#,
                "on a non-file",
            ),
            (
                r#"{"path":"d/a","type":"file","mode":420,"mtime_ns":1,"hardlink":"d/b"}"#,
                "after the entry's own",
            ),
            (
                r#"{"path":"d/b","type":"file","mode":420,"mtime_ns":1,"hardlink":"../etc/passwd"}"#,
                "not a normal relative path",
            ),
            (
                r#"{"path":"d/b","type":"file","mode":420,"mtime_ns":1,"hardlink":"/etc/passwd"}"#,
                "not a normal relative path",
            ),
            (
                r#"{"path":"d/b","type":"file","mode":420,"mtime_ns":1,"hardlink":"d/a","hardlink_b64":"ZC9h"}"#,
                "both hardlink and hardlink_b64",
            ),
        ] {
            let err = line(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for bad in [
            &b"/etc/passwd"[..],
            b"a/../../x",
            b"..",
            b"a//b",
            b"a/./b",
            b"",
            b"a\0b",
        ] {
            let mut line = Vec::new();
            file(b"ok").to_json_line(&mut line);
            let line = String::from_utf8(line).unwrap().replace(
                "\"ok\"",
                &serde_json::to_string(&String::from_utf8_lossy(bad)).unwrap(),
            );
            assert!(
                Entry::from_json_line(line.as_bytes()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tree_order_is_depth_first() {
        let mut paths: Vec<&[u8]> = vec![b"a-c", b"a/b", b"a", b"a/b/c", b"ab", b"a.d"];
        paths.sort_by(|x, y| cmp_paths(x, y));
        assert_eq!(
            paths,
            vec![&b"a"[..], b"a/b", b"a/b/c", b"a-c", b"a.d", b"ab"]
        );
    }
}
