//! The local state directory: what this custos installation remembers about
//! each tenant, independent of the store. It is the trust anchor against a
//! store attacker replaying old objects: a descriptor older than one already
//! seen, a forgotten snapshot or a pruned index file coming back.
//!
//! ```text
//! <state_dir>/tenants/<tenant>.json     TenantMemory
//! <state_dir>/reports/<tenant>/…        one JSON report per job run
//! ```

use std::collections::BTreeSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::ids::{IndexId, SnapshotId};
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
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for sub in ["", "tenants", "reports"] {
            let dir = root.join(sub);
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| Error::io(&dir, e))?;
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
