//! The storage layout under a tenant's prefix, as typed names.
//!
//! ```text
//! tenants/<tenant>/tenant.json          descriptor
//! tenants/<tenant>/keys/<epoch>         key envelopes
//! tenants/<tenant>/keys/claims/<id>     key claims (proof a key was bound to the tenant)
//! tenants/<tenant>/packs/<xx>/<pack id> packs (xx = first two hex digits)
//! tenants/<tenant>/index/<index id>     index files
//! tenants/<tenant>/snapshots/<id>       snapshot manifests
//! tenants/<tenant>/locks/lease          the tenant lease
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
    /// The daemon's record of the last scheduled slot of a job that ran, so
    /// several daemons sharing the store run each slot once.
    Schedule(crate::report::JobKind),
}

/// The directories of a tenant prefix, for listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Keys,
    Packs,
    Index,
    Snapshots,
    Locks,
}

impl Dir {
    pub fn name(self) -> &'static str {
        match self {
            Dir::Keys => "keys",
            Dir::Packs => "packs",
            Dir::Index => "index",
            Dir::Snapshots => "snapshots",
            Dir::Locks => "locks",
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
            ["locks", name] => name
                .strip_prefix("schedule-")
                .and_then(crate::report::JobKind::parse)
                .map(ObjectName::Schedule),
            _ => None,
        }
    }
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
            ObjectName::Schedule(crate::report::JobKind::Check),
        ] {
            assert_eq!(ObjectName::parse(&name.relative()), Some(name));
        }
        assert_eq!(ObjectName::parse(&Path::from("keys/03")), None);
        assert_eq!(ObjectName::parse(&Path::from("keys/claims/zz")), None);
        assert_eq!(ObjectName::parse(&Path::from("packs/00/zz")), None);
        let p = PackId::random();
        assert_eq!(
            ObjectName::parse(&Path::from(format!("packs/zz/{p}"))),
            None
        );
    }
}
