//! The local state directory: what this custos installation remembers about
//! each tenant, independent of the store. It is the trust anchor against a
//! store attacker replaying old objects: a descriptor older than one already
//! seen, a forgotten snapshot or a pruned index file coming back.
//!
//! ```text
//! <state_dir>/tenants/<tenant>.json     TenantMemory
//! <state_dir>/reports/<tenant>/…        one JSON report per job run
//! ```
//!
//! Whoever can write it can make custos accept a replayed store, so it is
//! refused when another local user could (see [`crate::secure_fs`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::ids::{IndexId, SnapshotId};
use crate::secure_fs::{self, Kind};
use crate::tenant::TenantId;
use crate::util::write_file_atomic;

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// What custos remembers about one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantMemory {
    /// Highest descriptor generation seen; an older one is a replay.
    pub descriptor_generation: u64,
    /// Snapshots this installation forgot; one reappearing is a replay.
    pub forgotten_snapshots: BTreeSet<SnapshotId>,
    /// Index files prune replaced; one reappearing is a rollback.
    pub removed_indexes: BTreeSet<IndexId>,
    /// Snapshots a forget decided to remove and is deleting. Recorded before the
    /// deletes and moved to `forgotten_snapshots` once they are done, so that
    /// one still present after a crash is a removal to finish, not a replay:
    /// it is never listed or restored, and the next forget or prune deletes it.
    pub forgetting_snapshots: BTreeSet<SnapshotId>,
    /// Index files a prune has replaced and is deleting (the same two phases):
    /// one still present after a crash is loaded as usual (the consolidated
    /// index already covers it) and deleted by the next prune.
    pub removing_indexes: BTreeSet<IndexId>,
}

impl StateDir {
    /// Opens (creating, mode 0700, with any missing parent) the state
    /// directory. Refused, with the fix in the message, when it, a directory
    /// above it or one of its subdirectories is writable by group or others
    /// or owned by another user (`insecure_permissions`).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in ["tenants", "reports"] {
            let dir = root.join(sub);
            secure_fs::create_private_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        secure_fs::check_dir(&root, "state directory", Kind::PrivateDir)?;
        // Its subdirectories too (those of other modules included: audit,
        // daemon): a group-writable one is open to the group if the root is
        // group-searchable.
        let entries = std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&root, e))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let dir = entry.path();
                secure_fs::check_dir(&dir, "state directory", Kind::PrivateDir)?;
            }
        }
        Ok(StateDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn memory_path(&self, tenant: &TenantId) -> PathBuf {
        self.root.join("tenants").join(format!("{tenant}.json"))
    }

    pub fn tenant_memory(&self, tenant: &TenantId) -> Result<TenantMemory> {
        let path = self.memory_path(tenant);
        if path.exists() {
            secure_fs::check_file(&path, "tenant state file")?;
        }
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Config {
                path: path.clone(),
                message: format!(
                    "unreadable tenant state (remove it only if you trust the store): {e}"
                ),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TenantMemory::default()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Reads, changes and writes back a tenant's memory. Callers hold the tenant lease.
    pub fn update_tenant_memory(
        &self,
        tenant: &TenantId,
        f: impl FnOnce(&mut TenantMemory),
    ) -> Result<TenantMemory> {
        let mut mem = self.tenant_memory(tenant)?;
        f(&mut mem);
        let path = self.memory_path(tenant);
        let json = serde_json::to_vec_pretty(&mem).expect("serialises");
        write_file_atomic(&path, &json, 0o600).map_err(|e| Error::io(path, e))?;
        Ok(mem)
    }

    pub fn reports_dir(&self, tenant: &TenantId) -> PathBuf {
        self.root.join("reports").join(tenant.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_state_dir_others_can_write_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("new/state");
        let s = StateDir::open(&root).unwrap();
        for d in [t.path().join("new"), root.clone(), root.join("tenants")] {
            assert_eq!(
                std::fs::metadata(&d).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        let tenant = TenantId::new("acme").unwrap();
        s.update_tenant_memory(&tenant, |m| m.descriptor_generation = 3)
            .unwrap();

        for (dir, mode) in [
            (root.clone(), 0o777),
            (root.join("tenants"), 0o770),
            (t.path().join("new"), 0o757),
        ] {
            chmod(&dir, mode);
            let err = StateDir::open(&root).unwrap_err();
            assert_eq!(err.kind(), "insecure_permissions", "{err}");
            assert!(
                err.to_string().contains(&dir.display().to_string()),
                "{err}"
            );
            chmod(&dir, 0o700);
        }
        // Another module's subdirectory counts too.
        std::fs::create_dir(root.join("audit")).unwrap();
        chmod(&root.join("audit"), 0o775);
        assert!(StateDir::open(&root).is_err());
        chmod(&root.join("audit"), 0o700);

        let file = root.join("tenants/acme.json");
        chmod(&file, 0o620);
        let err = s.tenant_memory(&tenant).unwrap_err();
        assert_eq!(err.kind(), "insecure_permissions", "{err}");
        chmod(&file, 0o600);
        assert_eq!(s.tenant_memory(&tenant).unwrap().descriptor_generation, 3);
    }
}
