//! The local state directory: what this custos installation remembers about
//! each tenant, independent of the store. It is the trust anchor against a
//! store attacker replaying old objects: a descriptor older than one already
//! seen, a forgotten snapshot or a pruned index file coming back.
//!
//! ```text
//! <state_dir>/tenants/<tenant>.json     TenantMemory
//! <state_dir>/reports/<tenant>/…        one JSON report per job run
//! <state_dir>/keys.json                 KeyRegistry: which tenant each key was bound to
//! ```
//!
//! Whoever can write it can make custos accept a replayed store, so it is
//! refused when another local user could (see [`crate::secure_fs`]).

use std::collections::BTreeSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::ids::{IndexId, SnapshotId};
use crate::keys::KeyRef;
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

/// Reads a file of the state directory, judged on its open descriptor
/// ([`secure_fs::open_trusted`]); the directories above it are checked by
/// [`StateDir::open`].
fn read_state_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let f = secure_fs::open_trusted(path, what, std::fs::OpenOptions::new().read(true))?;
    let mut b = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut b).map_err(|e| Error::io(path, e))?;
    Ok(b)
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
        // The directories above are checked too, not only the open file:
        // `state/tenants/` writable by others would let them delete this
        // file, and with it the replay memory (generations, forgotten
        // snapshots). The cost per survey is known (BENCHMARKS.md #16).
        if path.exists() {
            secure_fs::check_file(&path, "tenant state file")?;
        }
        let read = read_state_file(&path, "tenant state file");
        match read {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::Config {
                path: path.clone(),
                message: format!(
                    "unreadable tenant state (remove it only if you trust the store): {e}"
                ),
            }),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(TenantMemory::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads, changes and writes back a tenant's memory under an exclusive
    /// lock on `tenants/<tenant>.lock`: readers (which raise the descriptor
    /// generation seen) run beside a writer of the same tenant (which records
    /// forgotten snapshots and removed indexes), and a lost update would drop
    /// the record that turns a replay into an error.
    pub fn update_tenant_memory(
        &self,
        tenant: &TenantId,
        f: impl FnOnce(&mut TenantMemory),
    ) -> Result<TenantMemory> {
        let lock_path = self.root.join("tenants").join(format!("{tenant}.lock"));
        let _lock = self.lock(&lock_path, "tenant state lock")?;
        let mut mem = self.tenant_memory(tenant)?;
        f(&mut mem);
        let path = self.memory_path(tenant);
        let json = serde_json::to_vec_pretty(&mem).map_err(|e| Error::io(&path, e.into()))?;
        write_file_atomic(&path, &json, 0o600).map_err(|e| Error::io(path, e))?;
        Ok(mem)
    }

    /// Records that descriptor `generation` of `tenant` was seen; never
    /// lowers what a concurrent job recorded meanwhile.
    pub fn saw_descriptor_generation(&self, tenant: &TenantId, generation: u64) -> Result<()> {
        self.update_tenant_memory(tenant, |m| {
            m.descriptor_generation = m.descriptor_generation.max(generation)
        })
        .map(drop)
    }

    /// An exclusive `flock` on `path` (opened as a trusted file), released
    /// when the returned file is dropped, or by the kernel if the process dies.
    fn lock(&self, path: &Path, what: &str) -> Result<std::fs::File> {
        let lock = secure_fs::open_trusted(
            path,
            what,
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600),
        )?;
        lock.lock().map_err(|e| Error::io(path, e))?;
        Ok(lock)
    }

    pub fn reports_dir(&self, tenant: &TenantId) -> PathBuf {
        self.root.join("reports").join(tenant.as_str())
    }

    fn key_registry_path(&self) -> PathBuf {
        self.root.join("keys.json")
    }

    /// Which tenant each key was bound to by this installation. Empty when
    /// nothing was bound yet; an unreadable file is an error (the registry is
    /// evidence a shred relies on: never silently ignored).
    pub fn key_registry(&self) -> Result<KeyRegistry> {
        let path = self.key_registry_path();
        let read = read_state_file(&path, "key registry");
        match read {
            Ok(b) => {
                let r: KeyRegistry = serde_json::from_slice(&b).map_err(|e| Error::Config {
                    path: path.clone(),
                    message: format!("unreadable key registry: {e}"),
                })?;
                if r.format != KEY_REGISTRY_FORMAT {
                    return Err(Error::Config {
                        path,
                        message: format!("unsupported key registry format {:?}", r.format),
                    });
                }
                Ok(r)
            }
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Ok(KeyRegistry::default())
            }
            Err(e) => Err(e),
        }
    }

    /// Records that `binding.key` serves `binding.tenant`. Refuses, returning
    /// the conflicting entry, when the key (as written or by its resolved id)
    /// is bound to another tenant and not destroyed: one key, one tenant.
    /// Binding a key to the tenant it is bound to already is a no-op (its
    /// resolved id is filled in if it was missing).
    pub fn bind_key(
        &self,
        binding: KeyBinding,
    ) -> Result<std::result::Result<(), Box<KeyBinding>>> {
        self.update_key_registry(|r| {
            if let Some(other) = r
                .bindings_of(&binding.key, binding.key_id.as_deref())
                .find(|b| b.tenant != binding.tenant && b.destroyed_at.is_none())
            {
                return Err(Box::new(other.clone()));
            }
            match r
                .keys
                .iter_mut()
                .find(|b| b.key == binding.key && b.tenant == binding.tenant)
            {
                Some(b) => {
                    if b.key_id.is_none() {
                        b.key_id = binding.key_id.clone();
                    }
                }
                None => r.keys.push(binding),
            }
            Ok(())
        })
    }

    /// Marks the bindings of `key` to `tenant` destroyed (the key no longer
    /// serves anyone; the entry stays as evidence of whose it was).
    pub fn mark_key_destroyed(
        &self,
        key: &KeyRef,
        tenant: &TenantId,
        at: DateTime<Utc>,
    ) -> Result<()> {
        self.update_key_registry(|r| {
            for b in r
                .keys
                .iter_mut()
                .filter(|b| &b.key == key && &b.tenant == tenant)
            {
                b.destroyed_at.get_or_insert(at);
            }
        })
    }

    /// Read-modify-write of the registry under an exclusive lock on
    /// `keys.lock`: the daemon and CLI commands of other tenants update it at
    /// the same time, and a lost update would lose a binding.
    fn update_key_registry<T>(&self, f: impl FnOnce(&mut KeyRegistry) -> T) -> Result<T> {
        let lock = self.lock(&self.root.join("keys.lock"), "key registry lock")?;
        let mut registry = self.key_registry()?;
        registry.format = KEY_REGISTRY_FORMAT.into();
        let out = f(&mut registry);
        let path = self.key_registry_path();
        let json = serde_json::to_vec_pretty(&registry).expect("serialises");
        write_file_atomic(&path, &json, 0o600).map_err(|e| Error::io(&path, e))?;
        // Dropping the file releases the lock.
        drop(lock);
        Ok(out)
    }
}

pub const KEY_REGISTRY_FORMAT: &str = "custos-key-registry/1";

/// `<state_dir>/keys.json`: every key this installation bound to a tenant
/// (`tenant init`, a first backup, `rotate --replace-cmk`, an epoch shred's
/// re-wrap). The store cannot write it, so it is evidence of ownership that
/// a store attacker cannot forge, and it outlives the key (a shred resumed
/// after its keys were destroyed still knows whose they were).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRegistry {
    pub format: String,
    pub keys: Vec<KeyBinding>,
}

/// One key bound to one tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBinding {
    pub key: KeyRef,
    /// The key as its provider resolved it (`local:<name>`, the key ARN), so
    /// an alias and an ARN of one KMS key are known to be the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    pub tenant: TenantId,
    pub bound_at: DateTime<Utc>,
    /// What bound it: `tenant-init`, `tenant-reinit`, `replace-cmk`,
    /// `epoch-shred-rewrap`, `proven-by-envelope`.
    pub why: String,
    /// Set when a shred or rotation destroyed the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed_at: Option<DateTime<Utc>>,
}

impl KeyBinding {
    /// Whether this entry is about `key`, named as written or by its resolved id.
    pub fn names(&self, key: &KeyRef, resolved: Option<&str>) -> bool {
        &self.key == key
            || resolved.is_some_and(|r| {
                self.key_id.as_deref() == Some(r) || self.key.to_string() == r || self.key.id() == r
            })
    }
}

impl KeyRegistry {
    /// Every entry about `key` (as written, or by its resolved id).
    pub fn bindings_of<'a>(
        &'a self,
        key: &'a KeyRef,
        resolved: Option<&'a str>,
    ) -> impl Iterator<Item = &'a KeyBinding> + 'a {
        self.keys.iter().filter(move |b| b.names(key, resolved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(key: &str, key_id: Option<&str>, tenant: &str) -> KeyBinding {
        KeyBinding {
            key: KeyRef::parse(key).unwrap(),
            key_id: key_id.map(str::to_owned),
            tenant: TenantId::new(tenant).unwrap(),
            bound_at: Utc::now(),
            why: "tenant-init".into(),
            destroyed_at: None,
        }
    }

    #[test]
    fn one_key_one_tenant_in_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.key_registry().unwrap().keys.is_empty());
        state
            .bind_key(binding("local:alpha", Some("local:alpha"), "alpha"))
            .unwrap()
            .unwrap();
        // Idempotent for the same tenant.
        state
            .bind_key(binding("local:alpha", None, "alpha"))
            .unwrap()
            .unwrap();
        assert_eq!(state.key_registry().unwrap().keys.len(), 1);
        // Another tenant: refused, naming the holder.
        let conflict = state
            .bind_key(binding("local:alpha", None, "beta"))
            .unwrap()
            .unwrap_err();
        assert_eq!(conflict.tenant.as_str(), "alpha");
        // The same KMS key by another name (alias vs ARN): refused by resolved id.
        let arn = "arn:aws:kms:eu-central-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        state
            .bind_key(binding(&format!("aws-kms:{arn}"), Some(arn), "alpha"))
            .unwrap()
            .unwrap();
        let conflict = state
            .bind_key(binding("aws-kms:alias/beta", Some(arn), "beta"))
            .unwrap()
            .unwrap_err();
        assert_eq!(conflict.tenant.as_str(), "alpha");
        // Once destroyed, the entry stays (evidence of whose it was) but binds no more.
        let k = KeyRef::local("alpha").unwrap();
        let t = TenantId::new("alpha").unwrap();
        state.mark_key_destroyed(&k, &t, Utc::now()).unwrap();
        let r = state.key_registry().unwrap();
        let b = r.bindings_of(&k, None).next().unwrap();
        assert!(b.destroyed_at.is_some());
        state
            .bind_key(binding("local:alpha", None, "beta"))
            .unwrap()
            .unwrap();
        // An unreadable registry is an error, not an empty one.
        fs_write(&dir.path().join("keys.json"), b"{junk");
        assert_eq!(state.key_registry().unwrap_err().kind(), "invalid_config");
    }

    fn fs_write(p: &Path, b: &[u8]) {
        std::fs::write(p, b).unwrap();
    }

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

    /// Readers raise the generation seen while a writer of the same tenant
    /// records removals: neither may lose the other's update, and a
    /// generation recorded is never lowered.
    #[test]
    fn concurrent_memory_updates_are_not_lost() {
        let t = tempfile::tempdir().unwrap();
        let s = StateDir::open(t.path().join("state")).unwrap();
        let tenant = TenantId::new("acme").unwrap();
        let ids: Vec<IndexId> = (0..40).map(|_| IndexId::random()).collect();
        std::thread::scope(|scope| {
            for chunk in ids.chunks(10) {
                let (s, tenant) = (&s, &tenant);
                scope.spawn(move || {
                    for id in chunk {
                        s.update_tenant_memory(tenant, |m| {
                            m.removed_indexes.insert(*id);
                        })
                        .unwrap();
                    }
                });
            }
            for thread in 0..4u64 {
                let (s, tenant) = (&s, &tenant);
                scope.spawn(move || {
                    for g in (1..=20u64).rev() {
                        s.saw_descriptor_generation(tenant, g * 4 + thread).unwrap();
                    }
                });
            }
        });
        let mem = s.tenant_memory(&tenant).unwrap();
        assert_eq!(mem.removed_indexes.len(), ids.len());
        assert_eq!(mem.descriptor_generation, 83);
    }
}
