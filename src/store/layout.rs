//! The storage layout under a tenant's prefix, as typed names.
//!
//! ```text
//! tenants/<tenant>/tenant.json          descriptor
//! tenants/<tenant>/keys/<epoch>         key envelopes
//! tenants/<tenant>/keys/claims/<id>     key claims (proof a key was bound to the tenant)
//! tenants/<tenant>/packs/<xx>/<pack id> packs (xx = first two hex digits)
//! tenants/<tenant>/index/<index id>     index files
//! tenants/<tenant>/snapshots/<id>       snapshot manifests
//! tenants/<tenant>/locks/lease          the tenant lease (writers)
//! tenants/<tenant>/locks/readers/<id>   one running reader each (restore, check, drill…)
//! tenants/<tenant>/locks/deletions/<id> what a deleter is about to delete (readers hide it)
//! tenants/<tenant>/locks/schedule-<job> the last scheduled slot of a job that ran
//! ```

use std::fmt;

use object_store::path::Path;

use crate::format::ids::{ClaimId, IndexId, PackId, SnapshotId};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ObjectName {
    Descriptor,
    Envelope(u32),
    /// A key claim, named by [`crate::format::claim::claim_id`] of its key.
    KeyClaim(ClaimId),
    Pack(PackId),
    Index(IndexId),
    Snapshot(SnapshotId),
    Lease,
    /// A running reader's record (`locks/readers/<32 hex digits>`).
    Reader(String),
    /// A deletion plan (`locks/deletions/<32 hex digits>`).
    Deletion(String),
    /// The daemon's record of the last scheduled slot of a job that ran, so
    /// several daemons sharing the store run each slot once.
    Schedule(ScheduleName),
}

/// The name of a daemon's slot mark (`locks/schedule-<name>`). The store does
/// not know jobs: the daemon names each mark after its job (`daemon::slots`),
/// and the store holds any short lowercase word.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ScheduleName(String);

impl ScheduleName {
    /// 1 to 32 of `a-z`, `0-9`, `_`, starting with a letter; else `None`
    /// (a name that could not be a path component of its own).
    pub fn new(name: &str) -> Option<ScheduleName> {
        let ok = (1..=32).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
        ok.then(|| ScheduleName(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ScheduleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The directories of a tenant prefix, for listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Keys,
    Packs,
    Index,
    Snapshots,
    Locks,
    Readers,
    Deletions,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Keys => "keys",
            Dir::Packs => "packs",
            Dir::Index => "index",
            Dir::Snapshots => "snapshots",
            Dir::Locks => "locks",
            Dir::Readers => "locks/readers",
            Dir::Deletions => "locks/deletions",
        }
    }
}

impl ObjectName {
    /// Path relative to the tenant prefix.
    pub fn relative(&self) -> Path {
        match self {
            ObjectName::Descriptor => Path::from("tenant.json"),
            ObjectName::Envelope(e) => Path::from(format!("keys/{e}")),
            ObjectName::KeyClaim(id) => Path::from(format!("keys/claims/{id}")),
            ObjectName::Pack(id) => {
                let hex = id.to_hex();
                Path::from(format!("packs/{}/{hex}", &hex[..2]))
            }
            ObjectName::Index(id) => Path::from(format!("index/{id}")),
            ObjectName::Snapshot(id) => Path::from(format!("snapshots/{id}")),
            ObjectName::Lease => Path::from("locks/lease"),
            ObjectName::Reader(id) => Path::from(format!("locks/readers/{id}")),
            ObjectName::Deletion(id) => Path::from(format!("locks/deletions/{id}")),
            ObjectName::Schedule(job) => Path::from(format!("locks/schedule-{job}")),
        }
    }

    /// Parses a path relative to the tenant prefix. `None` for anything custos
    /// did not write (reported by `check`, never touched by prune).
    pub fn parse(rel: &Path) -> Option<Self> {
        let owned: Vec<String> = rel.parts().map(|p| p.as_ref().to_owned()).collect();
        let parts: Vec<&str> = owned.iter().map(String::as_str).collect();
        match parts.as_slice() {
            ["tenant.json"] => Some(ObjectName::Descriptor),
            ["keys", e] => {
                let n: u32 = e.parse().ok()?;
                (n.to_string() == *e).then_some(ObjectName::Envelope(n))
            }
            ["keys", "claims", id] => ClaimId::from_hex(id).map(ObjectName::KeyClaim),
            ["packs", xx, id] => PackId::from_hex(id)
                .filter(|p| p.to_hex()[..2] == **xx)
                .map(ObjectName::Pack),
            ["index", id] => IndexId::from_hex(id).map(ObjectName::Index),
            ["snapshots", id] => SnapshotId::from_hex(id).map(ObjectName::Snapshot),
            ["locks", "lease"] => Some(ObjectName::Lease),
            ["locks", "readers", id] if is_lock_id(id) => {
                Some(ObjectName::Reader((*id).to_owned()))
            }
            ["locks", "deletions", id] if is_lock_id(id) => {
                Some(ObjectName::Deletion((*id).to_owned()))
            }
            ["locks", name] => name
                .strip_prefix("schedule-")
                .and_then(ScheduleName::new)
                .map(ObjectName::Schedule),
            _ => None,
        }
    }
}

/// A new random id for a reader record or a deletion plan.
pub fn new_lock_id() -> String {
    hex::encode(crate::util::random_bytes::<16>())
}

/// 32 lowercase hex digits, as [`new_lock_id`] makes them.
pub fn is_lock_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.relative().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in [
            ObjectName::Descriptor,
            ObjectName::Envelope(3),
            ObjectName::KeyClaim(ClaimId::random()),
            ObjectName::Pack(PackId::random()),
            ObjectName::Index(IndexId::random()),
            ObjectName::Snapshot(SnapshotId::random()),
            ObjectName::Lease,
            ObjectName::Reader(new_lock_id()),
            ObjectName::Deletion(new_lock_id()),
            ObjectName::Schedule(ScheduleName::new("check").unwrap()),
        ] {
            assert_eq!(ObjectName::parse(&name.relative()), Some(name));
        }
        assert_eq!(ObjectName::parse(&Path::from("keys/03")), None);
        assert_eq!(ObjectName::parse(&Path::from("keys/claims/zz")), None);
        assert_eq!(ObjectName::parse(&Path::from("locks/readers/x")), None);
        assert_eq!(
            ObjectName::parse(&Path::from(format!("locks/deletions/{}", "A".repeat(32)))),
            None
        );
        assert_eq!(ObjectName::parse(&Path::from("packs/00/zz")), None);
        let p = PackId::random();
        assert_eq!(
            ObjectName::parse(&Path::from(format!("packs/zz/{p}"))),
            None
        );
    }
}
